//! System tests of `lode vm run`: a real agent, a real QEMU (TCG unless KVM works here)
//! and Debian's cloud kernel, booting a busybox image built with umoci and flattened by
//! lode. Needs root, /dev/fuse, qemu-system-x86, linux-image-cloud-amd64, busybox-static
//! and umoci (scripts/test.sh installs them). The tests boot one VM at a time: each boot
//! takes one core for a few seconds under TCG.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[path = "common/harness.rs"]
mod harness;
use harness::{ChildGuard, Home};

/// One VM at a time.
static VM: Mutex<()> = Mutex::new(());

/// The size of /work/big.bin in the test image.
const BIG: usize = 24 << 20;

/// Whether everything a VM test needs is here; under LODE_REQUIRE_TOOLS a missing piece
/// fails the test.
fn ready() -> bool {
    if !lode_testkit::is_root() || !Path::new("/dev/fuse").exists() {
        lode_testkit::skip("these tests need root and /dev/fuse (CI runs as root)");
        return false;
    }
    if lode_testkit::tool_from("qemu-system-x86_64", "qemu-system-x86").is_none()
        || lode_testkit::tool_from("umoci", "umoci").is_none()
    {
        return false;
    }
    if !Path::new("/bin/busybox").exists() {
        lode_testkit::skip("/bin/busybox is missing (busybox-static)");
        return false;
    }
    if let Err(e) = lode_vm::kernel::find(None, None) {
        lode_testkit::skip(&e.to_string());
        return false;
    }
    true
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    VM.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The harness's busybox image (config: env GREETING, working dir /work, user app, cmd
/// `cat /etc/group`), with BIG bytes that do not compress at /work/big.bin, flattened as
/// tag `bb`. Returns the SHA-256 of big.bin.
fn busybox_image(h: &Home) -> String {
    let big = lode_testkit::seeded_bytes(BIG, 7);
    h.busybox_image(
        &[
            "sh",
            "id",
            "cat",
            "echo",
            "pwd",
            "sleep",
            "head",
            "sha256sum",
        ],
        &[("work/big.bin", &big)],
    );
    sha256_hex(&big)
}

/// `lode vm run ARGS`: (status, stdout, stderr).
fn vm(h: &Home, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["vm", "run"];
    if !args.contains(&"--timeout") {
        a.extend(["--timeout", "120"]);
    }
    a.extend_from_slice(args);
    let out = h.run(&a);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn attachments(h: &Home) -> usize {
    let v = h.json(&["ls"]);
    v.as_array().map_or(0, Vec::len)
}

#[test]
fn a_command_runs_with_the_image_config_and_its_status_comes_back() {
    if !ready() {
        return;
    }
    let _vm = lock();
    let h = Home::new();
    busybox_image(&h);
    let _agent = h.start_agent();
    let script = "id; pwd; echo $GREETING; printf 'no newline'; exit 7";
    for via in ["file", "nbd"] {
        let (status, out, err) = vm(&h, &["--via", via, "bb", "--", "sh", "-c", script]);
        assert_eq!(status, 7, "--via {via}: {err}");
        assert_eq!(
            out, "uid=1000(app) gid=1001(app)\n/work\nhello from the image\nno newline",
            "--via {via}: {err}"
        );
    }
    // A microvm: the disk on virtio-mmio.
    let (status, out, err) = vm(
        &h,
        &["--machine", "microvm", "bb", "--", "sh", "-c", script],
    );
    assert_eq!(status, 7, "microvm: {err}");
    assert!(
        out.ends_with("hello from the image\nno newline"),
        "microvm: {out} {err}"
    );
    // The image's own cmd, another user, and the timings line.
    let (status, out, err) = vm(&h, &["--timings", "-u", "0:0", "bb"]);
    assert_eq!(
        (status, out.as_str()),
        (0, "root:x:0:\napp:x:1001:\n"),
        "{err}"
    );
    assert!(
        err.contains("first output") && err.contains(" image ("),
        "timings: {err}"
    );
    let (status, out, err) = vm(&h, &["-u", "app:root", "bb", "--", "id"]);
    assert_eq!(
        (status, out.as_str()),
        (0, "uid=1000(app) gid=0(root)\n"),
        "{err}"
    );
    assert_eq!(attachments(&h), 0, "every run detached");
}

#[test]
fn rw_writes_land_in_the_overlay_and_ro_refuses_them() {
    if !ready() {
        return;
    }
    let _vm = lock();
    let h = Home::new();
    busybox_image(&h);
    let _agent = h.start_agent();
    let (status, _, err) = vm(&h, &["bb", "--", "sh", "-c", "echo x > /work/f"]);
    assert_ne!(status, 0, "a read-only root took a write: {err}");
    let (status, out, err) = vm(
        &h,
        &[
            "--rw",
            "--keep",
            "--name",
            "w1",
            "bb",
            "--",
            "sh",
            "-c",
            "echo written in the guest > /work/new.txt && echo ok",
        ],
    );
    assert_eq!((status, out.as_str()), (0, "ok\n"), "{err}");
    let ls = h.json(&["ls"]);
    let att = &ls.as_array().expect("array")[0];
    assert_eq!(att["name"], "w1");
    let overlay = att["overlay"].as_str().expect("an overlay");
    assert!(
        fs::metadata(overlay).expect("overlay file").len() > 0,
        "the overlay holds the write"
    );
    // A second VM on the same attachment reads it back, through the NBD export.
    let (status, out, err) = vm(
        &h,
        &[
            "--attachment",
            "w1",
            "--via",
            "nbd",
            "--",
            "cat",
            "/work/new.txt",
        ],
    );
    assert_eq!(
        (status, out.as_str()),
        (0, "written in the guest\n"),
        "{err}"
    );
    h.ok(&["detach", "w1"]);
    // A fresh attachment of the image does not have it.
    let (status, _, _) = vm(&h, &["bb", "--", "cat", "/work/new.txt"]);
    assert_eq!(status, 1);
}

#[test]
fn bad_input_gets_a_clear_error_and_no_hang() {
    if !ready() {
        return;
    }
    let _vm = lock();
    let h = Home::new();
    busybox_image(&h);
    let garbage = h.path("garbage.img");
    fs::write(&garbage, lode_testkit::seeded_bytes(4 << 20, 3)).expect("write");
    h.ok(&[
        "import",
        garbage.to_str().expect("path"),
        "--tag",
        "garbage",
        "-q",
    ]);
    let _agent = h.start_agent();
    let (status, _, err) = vm(
        &h,
        &["--kernel", "/nonexistent/vmlinuz", "bb", "--", "true"],
    );
    assert_eq!(status, 1);
    assert!(
        err.contains("kernel /nonexistent/vmlinuz: No such file or directory"),
        "{err}"
    );
    let (status, _, err) = vm(&h, &["nosuch", "--", "true"]);
    assert_eq!(status, 1);
    assert!(err.contains("tag \"nosuch\" is not in store"), "{err}");
    let (status, _, err) = vm(&h, &["garbage", "--", "true"]);
    assert_eq!(status, 1);
    assert!(
        err.contains(
            "the guest could not run the command: mounting the image (/dev/vda) as ext4: mount: \
             mounting /dev/vda on /newroot failed"
        ),
        "{err}"
    );
    let (status, _, err) = vm(&h, &["bb", "--", "nosuchprogram"]);
    assert_eq!(status, 1);
    assert!(
        err.contains("nosuchprogram is not in the image's PATH"),
        "{err}"
    );
    let started = Instant::now();
    let (status, _, err) = vm(&h, &["--timeout", "4", "bb", "--", "sleep", "1000"]);
    assert_eq!(status, 1);
    assert!(
        err.contains("the VM ran longer than the timeout (4s) and was killed"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(attachments(&h), 0, "every run detached");
}

#[test]
fn sigterm_kills_the_vm_and_detaches() {
    if !ready() {
        return;
    }
    let _vm = lock();
    let h = Home::new();
    busybox_image(&h);
    let _agent = h.start_agent();
    let mut child = ChildGuard(
        h.cmd(&[
            "vm",
            "run",
            "--timeout",
            "120",
            "bb",
            "--",
            "sh",
            "-c",
            "echo go; sleep 1000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn"),
    );
    let mut stdout = child.0.stdout.take().expect("stdout");
    let mut buf = [0u8; 3];
    stdout.read_exact(&mut buf).expect("the command's output");
    assert_eq!(&buf, b"go\n");
    let pid = i32::try_from(child.0.id()).expect("pid");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait_for(Duration::from_secs(20)).expect("lode exits");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    assert!(
        err.contains("interrupted by SIGTERM; the VM was killed"),
        "{err}"
    );
    assert_eq!(attachments(&h), 0);
}

#[test]
fn a_guest_whose_agent_dies_gets_io_errors_never_wrong_data() {
    if !ready() {
        return;
    }
    let _vm = lock();
    let h = Home::new();
    let sum = busybox_image(&h);
    for via in ["file", "nbd"] {
        // A small memory cache: the file's chunks are fetched as the guest reads.
        let agent = h.start_agent();
        // The file's first bytes are read, so the kill lands in the middle of its data.
        let script = "head -c 1 /work/big.bin >/dev/null && echo go && sleep 2 && \
                      sha256sum /work/big.bin";
        let mut child = ChildGuard(
            h.cmd(&[
                "vm",
                "run",
                "--timeout",
                "120",
                "--via",
                via,
                "bb",
                "--",
                "sh",
                "-c",
                script,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
        );
        let mut stdout = child.0.stdout.take().expect("stdout");
        let mut buf = [0u8; 3];
        stdout.read_exact(&mut buf).expect("the command's output");
        assert_eq!(&buf, b"go\n", "--via {via}");
        let dead = agent.kill_hard();
        let status = child
            .wait_for(Duration::from_secs(120))
            .expect("lode exits");
        let mut out = String::new();
        stdout.read_to_string(&mut out).expect("read");
        let mut err = String::new();
        child
            .0
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read");
        assert!(
            !status.success(),
            "--via {via}: the read succeeded with the agent dead: {out} {err}"
        );
        for word in out.split_whitespace() {
            assert!(
                word.len() != 64 || word == sum,
                "--via {via}: a wrong checksum {word} (right: {sum})"
            );
        }
        assert!(
            out.contains("Input/output error"),
            "--via {via}: the guest saw no I/O error: {out} {err}"
        );
        drop(dead);
    }
}
