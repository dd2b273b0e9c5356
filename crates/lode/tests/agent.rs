//! System tests of `lode agent` and the commands that talk to it: each test has its own
//! `$LODE_HOME`, runs the real binary as a child process (killed by a Drop guard), and
//! reads attached images with clients no one here wrote: `nbdcopy`, libnbd's Python
//! binding, `nbdfuse`, fio's nbd engine, and the kernel (a loop device and an ext4 mount).
//! Each test skips with a printed reason only when a tool it drives is absent (or, for
//! the kernel mounts, when not running as root).
//!
//! Everything a test sets up (processes, FUSE mounts, loop devices, ext4 mounts) has a
//! guard declared after what it depends on, so a failing test releases it all in order.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lode_testkit::{LoopMount, root_or_skip, seeded_bytes};
use serde_json::Value;

#[path = "common/harness.rs"]
mod harness;
use harness::*;

impl Home {
    /// A 6 MiB raw image of pseudo-random bytes with zero stretches, imported as `tag`.
    fn import(&self, tag: &str) -> (String, PathBuf) {
        let mut img = seeded_bytes(6 << 20, 0x9e37_79b9_7f4a_7c15);
        img[1 << 20..2 << 20].fill(0);
        img[(5 << 20) + 1234..].fill(0);
        self.import_bytes(tag, &img)
    }

    /// `img` imported as `tag`; its manifest id, and `lode export`'s copy, checked equal.
    fn import_bytes(&self, tag: &str, img: &[u8]) -> (String, PathBuf) {
        let raw = self.path("img.raw");
        fs::write(&raw, img).expect("write image");
        let v = self.json(&["import", raw.to_str().expect("path"), "--tag", tag]);
        let id = v["id"].as_str().expect("id").to_string();
        let exported = self.path("exported.img");
        self.ok(&["export", tag, exported.to_str().expect("path")]);
        assert!(fs::read(&exported).expect("read") == img, "export differs");
        (id, exported)
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd_sock().display())
    }

    /// `nbdcopy` of export `name` into a file; its bytes.
    fn nbdcopy(&self, name: &str) -> Vec<u8> {
        self.nbdcopy_at(&self.nbd_sock(), name)
    }

    /// `nbdcopy` of export `name` on the NBD socket `sock` into a file; its bytes.
    fn nbdcopy_at(&self, sock: &Path, name: &str) -> Vec<u8> {
        let out = self.path("nbd.out");
        let _ = fs::remove_file(&out);
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        let st = Command::new("nbdcopy")
            .arg(&uri)
            .arg(&out)
            .status()
            .expect("run nbdcopy");
        assert!(st.success(), "nbdcopy {uri} failed: {st:?}");
        fs::read(&out).expect("read nbdcopy output")
    }
}

fn names(ls: &Value) -> Vec<String> {
    ls.as_array()
        .expect("ls is an array")
        .iter()
        .map(|a| a["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn attach_read_restart_detach() {
    if !have_nbdcopy() {
        return;
    }
    let h = Home::new();
    let (id, exported) = h.import("app:1");
    let want = fs::read(&exported).expect("read export");

    // Nothing running yet: a clear error.
    let err = h.fails(&["ls"]);
    assert!(
        err.contains("no agent listening on") && err.contains("start `lode agent`"),
        "{err}"
    );

    let agent = h.start_agent();
    let a = h.json(&["attach", "app:1", "--name", "app"]);
    assert_eq!(a["name"], "app");
    assert_eq!(a["id"], id.as_str());
    assert_eq!(a["size"], want.len() as u64);
    assert_eq!(a["nbd_export"], "app");
    assert!(h.nbdcopy("app") == want, "nbdcopy differs from lode export");

    assert_eq!(names(&h.json(&["ls"])), ["app"]);
    let human = h.ok(&["ls"]);
    assert!(human.contains("app") && human.contains(&id), "{human}");

    let stats = h.json(&["stats"]);
    let origin = stats["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["name"] == "origin")
        .expect("origin tier");
    assert!(origin["hits"].as_u64().expect("hits") > 0, "{stats}");
    assert!(h.ok(&["stats"]).contains("origin"));
    assert_eq!(
        stats["cache_policy"], "s3-fifo",
        "the default eviction policy"
    );
    assert!(h.ok(&["stats"]).contains("eviction   s3-fifo"));

    // A second attachment of the same image, and the errors.
    h.ok(&["attach", &id, "--name", "byid", "--rw"]);
    let err = h.fails(&["attach", "nope"]);
    assert!(err.contains("nope"), "{err}");
    let err = h.fails(&["attach", "app:1", "--name", "app"]);
    assert!(err.contains("already exists"), "{err}");

    // kill -9 and restart (under another eviction policy, over the same disk cache):
    // the attachments come back and read the same.
    let _dead = agent.kill_hard();
    let err = h.fails(&["ls"]);
    assert!(err.contains("no agent listening on"), "{err}");
    let _agent = h.start_agent_with(&["--cache-memory", "1048576", "--cache-policy", "w-tinylfu"]);
    assert_eq!(names(&h.json(&["ls"])), ["app", "byid"]);
    assert!(h.nbdcopy("app") == want, "nbdcopy differs after restart");
    assert!(h.nbdcopy("byid") == want, "writable attachment differs");
    assert_eq!(h.json(&["stats"])["cache_policy"], "w-tinylfu");

    // Detach: gone from ls and from NBD; the overlay file is deleted.
    let overlays = h.home().join("agent/overlays");
    assert_eq!(fs::read_dir(&overlays).expect("overlays").count(), 1);
    h.ok(&["detach", "byid"]);
    assert_eq!(fs::read_dir(&overlays).expect("overlays").count(), 0);
    h.ok(&["detach", "app"]);
    assert!(names(&h.json(&["ls"])).is_empty());
    let err = h.fails(&["detach", "app"]);
    assert!(err.contains("no attachment named \"app\""), "{err}");
    let st = Command::new("nbdcopy")
        .arg(format!("nbd+unix:///app?socket={}", h.nbd_sock().display()))
        .arg(h.path("gone.img"))
        .stderr(Stdio::null())
        .status()
        .expect("run nbdcopy");
    assert!(!st.success(), "a detached export still reads");
}

/// Raw bytes to the control socket: malformed requests get 400/404/405/413, not a hang.
#[test]
fn control_rejects_malformed() {
    if !have_nbdcopy() {
        return;
    }
    let h = Home::new();
    h.import("app:1");
    let _agent = h.start_agent();
    // The answer, or None if the agent closed on us before reading everything (it
    // answers an oversized request at once; the rest of our bytes then reset).
    let try_send = |req: &[u8]| -> Option<String> {
        let mut s = std::os::unix::net::UnixStream::connect(h.control()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(req).ok()?;
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let send = |req: &[u8]| try_send(req).expect("an answer");
    let status = |r: &str| r.split(' ').nth(1).unwrap_or_default().to_string();
    assert_eq!(status(&send(b"GET /ls HTTP/1.1\r\n\r\n")), "200");
    assert_eq!(status(&send(b"garbage\r\n\r\n")), "400");
    assert_eq!(status(&send(b"GET /nope HTTP/1.1\r\n\r\n")), "404");
    assert_eq!(status(&send(b"GET /attach HTTP/1.1\r\n\r\n")), "405");
    assert_eq!(
        status(&send(
            b"POST /attach HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}"
        )),
        "400"
    );
    assert_eq!(
        status(&send(
            b"POST /attach HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"
        )),
        "413"
    );
    let mut huge = b"GET /ls HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100_000));
    if let Some(r) = try_send(&huge) {
        assert_eq!(status(&r), "413", "{r}");
    }
    assert_eq!(status(&send(b"GET /ls HTTP/1.1\r\n")), "400");
    let m = send(b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(m.starts_with("HTTP/1.1 200") && m.contains("lode_"), "{m}");
    // Still healthy.
    assert!(names(&h.json(&["ls"])).is_empty());
}

/// The reader of `kill_9_while_a_client_reads`: random 64 KiB reads through libnbd, each
/// compared with the expected image; one line per read ("ok", "mismatch OFFSET" or
/// "error MESSAGE"); it stops at the first mismatch or error, or after SECONDS.
const READER_PY: &str = r#"
import random, sys, time
import nbd

uri, expected, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
want = open(expected, "rb").read()
h = nbd.NBD()
try:
    h.connect_uri(uri)
    size = h.get_size()
except nbd.Error as e:
    print(f"error connecting: {e}", flush=True)
    sys.exit(1)
if size != len(want):
    print(f"error size {size}, want {len(want)}", flush=True)
    sys.exit(1)
block = 64 << 10
rng = random.Random(7)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    off = rng.randrange(0, (size - block) // 4096 + 1) * 4096
    try:
        got = h.pread(block, off)
    except nbd.Error as e:
        print(f"error {e}", flush=True)
        sys.exit(0)
    if got != want[off:off + block]:
        print(f"mismatch {off}", flush=True)
        sys.exit(1)
    print("ok", flush=True)
print("timeout", flush=True)
"#;

/// kill -9 while a libnbd client reads: every block it got was right, it gets an error
/// (not a hang), and a new agent on the same state directory (clearing the dead FUSE
/// mount) serves the same bytes again.
#[test]
fn kill_9_while_a_client_reads() {
    if !have_nbdcopy() {
        return;
    }
    let Some(python) = lode_testkit::python_with_nbd() else {
        return;
    };
    let h = Home::new();
    let (_, exported) = h.import("app:1");
    let want = fs::read(&exported).expect("read export");
    // Caches of one or two chunks, so reads keep going through the tiers to the store.
    let agent = h.start_agent_with(&["--cache-decrypted", "1MiB", "--cache-memory", "1MiB"]);
    h.ok(&["attach", "app:1", "--name", "app"]);

    let script = h.path("reader.py");
    fs::write(&script, READER_PY).expect("write reader");
    let log = h.path("reader.log");
    let child = Command::new(python)
        .arg(&script)
        .arg(h.uri("app"))
        .arg(&exported)
        .arg("60")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).expect("log"))
        .stderr(fs::File::create(h.path("reader.err")).expect("log"))
        .spawn()
        .expect("spawn the reader");
    let mut reader = ChildGuard(child);
    let lines = || fs::read_to_string(&log).unwrap_or_default();
    let oks = |s: &str| s.lines().filter(|l| *l == "ok").count();
    let started = Instant::now();
    while oks(&lines()) < 50 {
        if let Some(st) = reader.0.try_wait().expect("wait") {
            panic!(
                "the reader exited ({st:?}) before the kill:\n{}\n{}",
                lines(),
                fs::read_to_string(h.path("reader.err")).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "fewer than 50 reads in 30 s:\n{}",
            lines()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let _dead = agent.kill_hard();
    let killed = Instant::now();
    let st = reader.wait_for(Duration::from_secs(10));
    let out = lines();
    let last = out.lines().last().unwrap_or_default();
    assert!(
        st.is_some(),
        "the reader still runs 10 s after kill -9 (hung); last line {last:?}"
    );
    let bad: Vec<&str> = out.lines().filter(|l| *l != "ok").collect();
    assert!(
        bad.len() == 1 && last.starts_with("error "),
        "want reads then one error, got {} ok and {bad:?}\n{}",
        oks(&out),
        fs::read_to_string(h.path("reader.err")).unwrap_or_default()
    );
    eprintln!(
        "{} good reads, then {last:?} {:?} after the kill",
        oks(&out),
        killed.elapsed()
    );

    // The dead agent's FUSE mount answers ENOTCONN until the next agent clears it.
    let files = h.home().join("agent/files");
    assert_eq!(
        fs::metadata(&files).err().and_then(|e| e.raw_os_error()),
        Some(libc::ENOTCONN),
        "the killed agent's FUSE mount"
    );
    let _agent = h.start_agent();
    assert_eq!(names(&h.json(&["ls"])), ["app"]);
    assert!(h.nbdcopy("app") == want, "nbdcopy differs after restart");
    assert!(
        fs::read(files.join("app")).expect("read the FUSE file") == want,
        "the FUSE file differs after restart"
    );
}

/// `nbdfuse -r DIR URI` in the background: DIR/nbd is the export as a file. Dropped:
/// unmounted with fusermount3 (lazily if still busy), then the process killed.
struct NbdFuse {
    dir: PathBuf,
    child: ChildGuard,
}

impl NbdFuse {
    /// Starts nbdfuse and waits until DIR/nbd has `size` bytes.
    fn start(dir: &Path, uri: &str, size: u64, log: &Path) -> NbdFuse {
        fs::create_dir_all(dir).expect("create nbdfuse dir");
        let child = Command::new("nbdfuse")
            .arg("-r")
            .arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).expect("log"))
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = NbdFuse {
            dir: dir.to_path_buf(),
            child: ChildGuard(child),
        };
        let started = Instant::now();
        while fs::metadata(dir.join("nbd")).map(|m| m.len()).ok() != Some(size) {
            if let Some(st) = f.child.0.try_wait().expect("wait") {
                panic!(
                    "nbdfuse exited ({st:?}):\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{}/nbd did not appear with {size} bytes in 10 s",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("fusermount3")
                    .args(["-u", "-z"])
                    .arg(&self.dir)
                    .status();
            }
        }
    }
}

/// Every file of `want` under `dir` reads back byte for byte, and the root holds exactly
/// `top` (and mkfs's lost+found).
fn check_tree(dir: &Path, want: &[(&str, Vec<u8>)], top: &[&str]) {
    let mut found: Vec<String> = fs::read_dir(dir)
        .expect("read the mounted root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut expected: Vec<String> = top.iter().map(|s| s.to_string()).collect();
    expected.push("lost+found".into());
    expected.sort();
    assert_eq!(found, expected, "the root of {}", dir.display());
    for (name, bytes) in want {
        let got = fs::read(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert!(
            got == *bytes,
            "{name} differs through {} ({} bytes, want {})",
            dir.display(),
            got.len(),
            bytes.len()
        );
    }
}

/// An ext4 image read by the kernel: on a loop device over nbdfuse's file (libnbd's FUSE
/// client of the NBD export), then on a loop device over the agent's own FUSE file.
#[test]
fn ext4_on_loop_over_nbdfuse_and_over_the_agent_file() {
    if !have_nbdcopy()
        || !have("nbdfuse", &["--version"], "nbdfuse")
        || !have("mkfs.ext4", &["-V"], "e2fsprogs")
        || !have("losetup", &["--version"], "util-linux")
        || !have("fusermount3", &["-V"], "fuse3")
        || !root_or_skip("loop devices and mounts need root")
    {
        return;
    }
    let h = Home::new();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("big.bin", seeded_bytes(3 << 20, 42)),
        ("hello.txt", b"hello from lode\n".to_vec()),
        ("empty", Vec::new()),
        ("dir/sub/odd.bin", seeded_bytes(12_345, 7)),
    ];
    let top = ["big.bin", "dir", "empty", "hello.txt"];
    let src = h.path("src");
    for (name, bytes) in &files {
        let p = src.join(name);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, bytes).expect("write source file");
    }
    let img = h.path("fs.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M")
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = fs::read(&img).expect("read image");
    h.import_bytes("fs:1", &img);
    let _agent = h.start_agent();
    h.ok(&["attach", "fs:1", "--name", "fs"]);

    let fuse_dir = h.path("nbdfuse");
    let nbdfuse = NbdFuse::start(
        &fuse_dir,
        &h.uri("fs"),
        img.len() as u64,
        &h.path("nbdfuse.err"),
    );
    let Some(lm) = LoopMount::at(&fuse_dir.join("nbd"), &h.path("mnt-nbdfuse")) else {
        return;
    };
    check_tree(lm.path(), &files, &top);
    lm.release();
    drop(nbdfuse);
    assert!(!is_mounted(&fuse_dir), "nbdfuse still mounted");

    let Some(lm) = LoopMount::at(&h.home().join("agent/files/fs"), &h.path("mnt-agent")) else {
        return;
    };
    check_tree(lm.path(), &files, &top);
    lm.release();
}

/// fio's nbd engine with `ARGS`, writing 16 MiB of checksummed 4 KiB blocks at random
/// (then reading every one back to verify it): its exit status, its JSON report
/// (Null if it wrote none) and its output.
fn fio(h: &Home, name: &str, args: &[&str]) -> (bool, Value, String) {
    let report = h.path("fio.json");
    let _ = fs::remove_file(&report);
    let out = Command::new("fio")
        // fio saves a verify state file in its working directory.
        .current_dir(h.dir.path())
        .arg("--name=lode")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", h.uri(name)))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--output-format=json",
        ])
        .arg(format!("--output={}", report.display()))
        .args(args)
        .output()
        .expect("run fio");
    let text = fs::read_to_string(&report).unwrap_or_default();
    // fio may put messages before the JSON, and after it.
    let json = text
        .find("{\n")
        .and_then(|i| {
            serde_json::Deserializer::from_str(&text[i..])
                .into_iter::<Value>()
                .next()
        })
        .and_then(Result::ok)
        .unwrap_or(Value::Null);
    let said = format!(
        "{text}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), json, said)
}

/// fio verifies its own writes through a writable attachment's overlay, twice (once
/// right after writing, once in a later run); the same check fails on a fresh overlay of
/// the image, so it checks something; and the store is untouched by it all.
#[test]
fn fio_verifies_writes_through_the_overlay() {
    if !have_nbdcopy() || !have("fio", &["--enghelp=nbd"], "fio with its nbd engine") {
        return;
    }
    let h = Home::new();
    let img = seeded_bytes(20 << 20, 0x5eed);
    h.import_bytes("app:1", &img);
    let store_before = h.json(&["store", "stats"]);
    let _agent = h.start_agent();
    let a = h.json(&["attach", "app:1", "--name", "app", "--rw"]);
    assert_eq!(a["writable"], true);
    h.ok(&["attach", "app:1", "--name", "fresh", "--rw"]);
    let mib16 = 16u64 << 20;

    let (ok, v, said) = fio(&h, "app", &[]);
    let job = &v["jobs"][0];
    assert!(ok && job["error"] == 0, "fio write+verify failed:\n{said}");
    assert_eq!(job["write"]["io_bytes"], mib16, "{said}");
    assert_eq!(job["read"]["io_bytes"], mib16, "verify reads: {said}");

    let overlay = |what: &str| h.json(&["stats"])[what].as_u64().expect(what);
    let written = overlay("overlay_written_blocks");
    let read = overlay("overlay_read_blocks");
    assert!(written > 0, "fio's writes did not reach the overlay");

    // verify_only replays the job without writing (fio still counts the writes it
    // skipped) and reads every block back.
    let (ok, v, said) = fio(&h, "app", &["--verify_only"]);
    let job = &v["jobs"][0];
    assert!(ok && job["error"] == 0, "fio verify_only failed:\n{said}");
    assert_eq!(job["read"]["io_bytes"], mib16, "{said}");
    assert_eq!(
        overlay("overlay_written_blocks"),
        written,
        "verify_only wrote"
    );
    assert!(
        overlay("overlay_read_blocks") > read,
        "verify_only read no overlay"
    );

    let (ok, v, said) = fio(&h, "fresh", &["--verify_only"]);
    assert!(
        !ok && v["jobs"][0]["error"] != 0 && said.contains("verify: bad magic header"),
        "verify_only did not fail as it should on blocks fio never wrote:\n{said}"
    );

    // The writes are in the overlay only: the first 16 MiB changed, the rest did not,
    // and the other attachment of the same image reads the image.
    let got = h.nbdcopy("app");
    assert_eq!(got.len(), img.len());
    let cut = 16 << 20;
    assert!(got[..cut] != img[..cut], "fio's writes are not visible");
    assert!(got[cut..] == img[cut..], "bytes fio did not write changed");
    assert!(h.nbdcopy("fresh") == img, "a fresh overlay differs");

    h.ok(&["detach", "app"]);
    h.ok(&["detach", "fresh"]);
    h.ok(&["verify", "app:1"]);
    let copy = h.path("after.img");
    h.ok(&["export", "app:1", copy.to_str().expect("path")]);
    assert!(
        fs::read(&copy).expect("read export") == img,
        "the image changed"
    );
    assert_eq!(
        h.json(&["store", "stats"]),
        store_before,
        "the store changed"
    );
}

/// `METHOD PATH` over plain HTTP/1.1 (the way a scraper asks, no half-close): the
/// status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("{method} {path}: {e} (no reply, or not closed)"));
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A counter's value in Prometheus text.
fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// `lode agent --config FILE`: the state directory, metrics listener and cache sizes
/// (written for people) come from the file; /metrics serves Prometheus text whose origin
/// counter follows the reads, and nothing else on that port answers; a misspelt key
/// fails naming the file and the key, before anything is created.
#[test]
fn config_file_and_metrics_endpoint() {
    if !have_nbdcopy() {
        return;
    }
    let h = Home::new();
    let (_, exported) = h.import("app:1");
    let want = fs::read(&exported).expect("read export");

    let bad = h.path("bad.toml");
    fs::write(&bad, "[cache]\nmemroy = \"64MiB\"\n").expect("write config");
    let mut bad_agent = AgentProc {
        child: h
            .cmd(&["agent", "--config", bad.to_str().expect("path")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(h.path("bad.err")).expect("log"))
            .spawn()
            .expect("spawn lode agent"),
        files: Some(h.home().join("agent/files")),
    };
    let started = Instant::now();
    let st = loop {
        if let Some(st) = bad_agent.child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "lode agent with an unknown key in its config still runs after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(bad_agent);
    let err = fs::read_to_string(h.path("bad.err")).expect("read stderr");
    assert!(!st.success(), "{err}");
    assert!(
        err.contains(&*bad.to_string_lossy()) && err.contains("memroy"),
        "{err}"
    );
    assert!(
        !h.home().join("agent").exists(),
        "a refused config still created the state directory"
    );

    let state = h.path("state");
    let config = h.path("agent.toml");
    fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
             [cache]\ndecrypted = \"1MiB\"\nmemory = \"2MiB\"\ndisk = \"64MiB\"\n",
            state.display()
        ),
    )
    .expect("write config");
    let _agent = h.spawn_agent(&["--config", config.to_str().expect("path")], &state);
    let control = state.join("control.sock");
    let ctl = control.to_str().expect("path");

    // The startup line names the address bound for port 0.
    let started = Instant::now();
    let addr = loop {
        let out = fs::read_to_string(h.path("agent.out")).unwrap_or_default();
        if let Some(rest) = out.split("metrics on http://").nth(1) {
            let addr = rest.split("/metrics").next().expect("address").to_string();
            assert!(out.contains(&*state.to_string_lossy()), "{out}");
            break addr;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no metrics address in the startup line: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    let stats = h.json(&["stats", "--control", ctl]);
    let capacity = |tier: &str| {
        stats["tiers"]
            .as_array()
            .expect("tiers")
            .iter()
            .find(|t| t["name"] == tier)
            .unwrap_or_else(|| panic!("no tier {tier}: {stats}"))["capacity_bytes"]
            .clone()
    };
    assert_eq!(capacity("decrypted"), 1u64 << 20);
    assert_eq!(capacity("memory"), 2u64 << 20);
    assert_eq!(capacity("disk"), 64u64 << 20);

    let origin = "lode_tier_hits_total{tier=\"origin\"}";
    let (status, text) = http(&addr, "GET", "/metrics", "");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("# TYPE lode_tier_hits_total counter"),
        "{text}"
    );
    assert_eq!(counter(&text, origin), 0, "nothing read yet");

    h.ok(&["attach", "app:1", "--name", "app", "--control", ctl]);
    assert!(
        h.nbdcopy_at(&state.join("nbd.sock"), "app") == want,
        "nbdcopy differs from lode export"
    );
    let (status, text) = http(&addr, "GET", "/metrics", "");
    assert_eq!(status, 200, "{text}");
    // The image has 9 chunks that are not all zeros, each fetched at least once.
    let fetched = counter(&text, origin);
    assert!(fetched >= 9, "{origin} {fetched} after reading the image");
    let stats = h.json(&["stats", "--control", ctl]);
    let hits = stats["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["name"] == "origin")
        .expect("origin tier")["hits"]
        .clone();
    assert_eq!(hits, fetched, "/metrics and lode stats disagree");

    // Only /metrics on the TCP port: the control API stays on its 0600 socket.
    let (status, body) = http(&addr, "GET", "/ls", "");
    assert_eq!(status, 404, "{body}");
    let (status, body) = http(
        &addr,
        "POST",
        "/attach",
        r#"{"image":"app:1","name":"evil"}"#,
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(names(&h.json(&["ls", "--control", ctl])), ["app"]);

    // A listener serves 64 connections at once: idle clients of the metrics port hold
    // their slots, the next one is told 503 at once (without sending anything), the
    // control socket is not affected, and /metrics answers again once they leave.
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    let mut extra = TcpStream::connect(&addr).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = String::new();
    extra
        .read_to_string(&mut out)
        .expect("a refusal, not a wait");
    assert!(
        out.starts_with("HTTP/1.1 503 ") && out.contains("64 metrics connections are open"),
        "{out}"
    );
    assert_eq!(names(&h.json(&["ls", "--control", ctl])), ["app"]);
    drop(idle);
    let started = Instant::now();
    loop {
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut out = String::new();
        let answered = write!(s, "GET /metrics HTTP/1.1\r\n\r\n").is_ok()
            && s.read_to_string(&mut out).is_ok();
        if answered && out.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "/metrics still refused 10 s after the idle clients left: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `[nbd]` limits from the config file bound real clients of a real agent: a
/// connection over `max_connections` is closed before the greeting and logged with its
/// peer, silent ones are dropped after `handshake_timeout_ms`, and `lode stats` counts
/// both; a limit out of range stops the agent with the key named.
#[test]
fn nbd_limits_from_the_config_file_bound_clients() {
    use std::os::unix::net::UnixStream;

    let h = Home::new();
    // The agent needs a keyring, which the first import makes.
    h.import("app:1");
    let bad = h.path("bad.toml");
    fs::write(&bad, "[nbd]\nmax_buffered_bytes = \"1KiB\"\n").expect("write config");
    let mut bad_agent = AgentProc {
        child: h
            .cmd(&[
                "agent",
                "--no-files",
                "--config",
                bad.to_str().expect("path"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(h.path("bad.err")).expect("log"))
            .spawn()
            .expect("spawn lode agent"),
        files: None,
    };
    let started = Instant::now();
    let st = loop {
        if let Some(st) = bad_agent.child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "lode agent with an out-of-range [nbd] limit still runs after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(bad_agent);
    let err = fs::read_to_string(h.path("bad.err")).expect("read stderr");
    assert!(!st.success(), "{err}");
    assert!(
        err.contains("[nbd] max_buffered_bytes must be between 65536 and 1073741824, got 1024"),
        "{err}"
    );

    let config = h.path("agent.toml");
    fs::write(
        &config,
        "[nbd]\nmax_connections = 2\nhandshake_timeout_ms = 300\n",
    )
    .expect("write config");
    let _agent = h.start_agent_with(&["--no-files", "--config", config.to_str().expect("path")]);
    let connect = || {
        let s = UnixStream::connect(h.nbd_sock()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s
    };
    // Two clients that take the greeting and then say nothing...
    let mut silent: Vec<UnixStream> = (0..2)
        .map(|_| {
            let mut s = connect();
            let mut greeting = [0u8; 18];
            s.read_exact(&mut greeting).expect("greeting");
            assert_eq!(&greeting[..8], b"NBDMAGIC");
            s
        })
        .collect();
    // ...fill the limit: a third is closed without a byte.
    let mut third = connect();
    let mut b = [0u8; 18];
    assert_eq!(
        third.read(&mut b).expect("read"),
        0,
        "the third got a greeting"
    );
    // The silent two are dropped once the handshake timeout passes.
    for s in &mut silent {
        assert_eq!(s.read(&mut b).expect("read"), 0);
    }

    let stats = h.json(&["stats"]);
    let nbd = &stats["nbd"];
    assert_eq!(nbd["connections_refused"], 1, "{nbd}");
    assert_eq!(nbd["connection_errors"], 2, "{nbd}");
    assert_eq!(nbd["max_connections"], 2, "{nbd}");
    let text = h.ok(&["stats"]);
    assert!(
        text.contains("nbd        0 connections open (limit 2), 1 refused, 2 ended by an error"),
        "{text}"
    );
    let log = fs::read_to_string(h.path("agent.err")).expect("read stderr");
    let pid = std::process::id();
    assert!(
        log.contains(&format!(
            "lode agent: nbd connection from unix socket pid {pid} uid "
        )) && log.contains("refused: 2 connections are open, the max_connections limit"),
        "{log}"
    );
    assert!(
        log.contains(": handshake not finished within 300ms"),
        "{log}"
    );
    // The limit is free again: a client is greeted.
    let mut again = connect();
    again
        .read_exact(&mut b)
        .expect("greeting after the others left");
}

/// A read of an attachment's FUSE file that the store cannot serve fails with EIO, and
/// the agent's log says which file, which offset and which chunk, as it does for NBD.
#[test]
fn a_failed_read_of_a_fuse_file_is_logged_with_its_chunk() {
    if !have("fusermount3", &["-V"], "fuse3") {
        return;
    }
    let h = Home::new();
    let (_, _) = h.import("app:1");
    // Every chunk object goes from the store: the first read must fail.
    let mut gone = 0;
    let mut dirs = vec![h.home().join("store")];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).expect("read the store") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p
                .parent()
                .is_some_and(|d| d.components().any(|c| c.as_os_str() == "chunks"))
            {
                fs::remove_file(&p).expect("remove a chunk object");
                gone += 1;
            }
        }
    }
    assert!(gone > 0, "no chunk objects found under the store");
    let _agent = h.start_agent();
    h.ok(&["attach", "app:1", "--name", "app"]);
    let file = h.home().join("agent/files/app");
    let mut buf = vec![0u8; 4096];
    let err = fs::File::open(&file)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0))
        .expect_err("a read of a chunk the store lost");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = fs::read_to_string(h.path("agent.err")).expect("agent log");
    let line = log
        .lines()
        .find(|l| l.starts_with("lode agent: files:"))
        .unwrap_or_else(|| panic!("no line about the failed read in:\n{log}"));
    assert!(
        line.contains("at offset 0 of") && line.contains("files/app") && line.contains("chunk"),
        "{line}"
    );
}

/// `--trace`: every attach is a start, each stored chunk's first read by it is one
/// record with the tier that served it, a detach ends it, and a clean shutdown writes
/// the trailer with the count: the file `lode sim --trace` replays.
#[test]
fn a_read_trace_records_each_start_and_its_first_reads() {
    if !have_nbdcopy() {
        return;
    }
    let h = Home::new();
    let (_, exported) = h.import("app:1");
    let want = fs::read(&exported).expect("read export");
    let trace = h.path("w1.trace");
    let agent = h.start_agent_with(&[
        "--trace",
        trace.to_str().expect("path"),
        "--trace-worker",
        "w1",
        "--no-files",
    ]);
    for name in ["first", "second"] {
        h.ok(&["attach", "app:1", "--name", name]);
        assert!(h.nbdcopy(name) == want, "{name} differs");
        h.ok(&["detach", name]);
    }
    // SIGTERM: a clean shutdown ends the trace.
    let pid = i32::try_from(agent.child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid; no memory is shared.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut agent = agent;
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "agent did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }

    let text = fs::read_to_string(&trace).expect("read trace");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "lode-trace 1 worker w1");
    assert_eq!(lines[1], format!("image app:1 {}", want.len()));
    // 6 MiB in 512 KiB chunks, three of them all zero (1..2 MiB and the last half
    // MiB), which are never read from a tier.
    let stored = 9;
    // (start id, its reads as (chunk, tier), whether it ended)
    type Start = (String, Vec<(String, String)>, bool);
    let mut starts: Vec<Start> = Vec::new();
    let mut events = 0;
    let mut last_t = 0u128;
    for l in &lines[2..lines.len() - 1] {
        let w: Vec<&str> = l.split(' ').collect();
        let t: u128 = w[0].parse().expect("time");
        assert!(t >= last_t, "time goes back at {l}");
        last_t = t;
        events += 1;
        match w[1] {
            "start" => {
                assert_eq!(w[3], "app:1");
                starts.push((w[2].to_owned(), Vec::new(), false));
            }
            "read" => {
                let s = starts
                    .iter_mut()
                    .find(|s| s.0 == w[2])
                    .expect("read of a known start");
                assert!(!s.2, "read after end: {l}");
                assert_eq!(w[3].len(), 64, "chunk name: {l}");
                let bytes: u64 = w[4].parse().expect("bytes");
                assert!(bytes > 0 && bytes <= (1 << 20), "{l}");
                s.1.push((w[3].to_owned(), w[5].to_owned()));
            }
            "end" => {
                let s = starts
                    .iter_mut()
                    .find(|s| s.0 == w[2])
                    .expect("end of a known start");
                s.2 = true;
            }
            other => panic!("unexpected record {other}: {l}"),
        }
    }
    assert_eq!(lines[lines.len() - 1], format!("end {events}"));
    assert_eq!(starts.len(), 2, "{text}");
    for (id, reads, ended) in &starts {
        assert!(*ended, "start {id} has no end");
        let mut chunks: Vec<&String> = reads.iter().map(|r| &r.0).collect();
        chunks.sort();
        chunks.dedup();
        assert_eq!(chunks.len(), reads.len(), "a chunk twice in start {id}");
        assert_eq!(reads.len(), stored, "start {id}: {reads:?}");
    }
    // The first start fetched every chunk from the store; the second found them all on
    // this worker.
    assert!(
        starts[0].1.iter().all(|r| r.1 == "origin"),
        "{:?}",
        starts[0].1
    );
    assert!(
        starts[1]
            .1
            .iter()
            .all(|r| ["decrypted", "memory", "disk"].contains(&r.1.as_str())),
        "{:?}",
        starts[1].1
    );
}
