//! System tests of `lode agent` and the commands that talk to it: each test has its own
//! `$LODE_HOME`, runs the real binary as a child process (killed by a Drop guard), and
//! reads attached images with `nbdcopy` (libnbd), a client no one here wrote. The tests
//! skip with a printed reason only when `nbdcopy` is absent.

use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Home {
    dir: tempfile::TempDir,
}

/// The agent child process; killed (SIGKILL) and reaped on drop.
struct AgentProc {
    child: Child,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn control(&self) -> PathBuf {
        self.home().join("agent/control.sock")
    }

    fn nbd_sock(&self) -> PathBuf {
        self.home().join("agent/nbd.sock")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lode"));
        cmd.args(args).env("LODE_HOME", self.home());
        for var in [
            "LODE_STORE",
            "LODE_KMS",
            "LODE_KMS_KEY",
            "LODE_AGENT_CONTROL",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().expect("run lode");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "lode {args:?} panicked:\n{err}");
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lode {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 stdout")
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "lode {args:?} succeeded");
        String::from_utf8(out.stderr).expect("UTF-8 stderr")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    /// Starts `lode agent` and waits until `lode ls` answers.
    fn start_agent(&self) -> AgentProc {
        let child = self
            .cmd(&["agent", "--cache-memory", "1048576"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(self.path("agent.out")).expect("log"))
            .stderr(fs::File::create(self.path("agent.err")).expect("log"))
            .spawn()
            .expect("spawn lode agent");
        let mut agent = AgentProc { child };
        let started = Instant::now();
        loop {
            if self.run(&["ls"]).status.success() {
                return agent;
            }
            if let Some(st) = agent.child.try_wait().expect("wait") {
                panic!(
                    "lode agent exited ({st:?}):\n{}",
                    fs::read_to_string(self.path("agent.err")).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "agent did not answer in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A 6 MiB raw image of pseudo-random bytes with zero stretches, imported as `tag`.
    fn import(&self, tag: &str) -> (String, PathBuf) {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut img = vec![0u8; 6 << 20];
        for (i, b) in img.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !(1 << 20..2 << 20).contains(&i) && i < (5 << 20) + 1234 {
                *b = x.to_le_bytes()[0];
            }
        }
        let raw = self.path("img.raw");
        fs::write(&raw, &img).expect("write image");
        let v = self.json(&["import", raw.to_str().expect("path"), "--tag", tag]);
        let id = v["id"].as_str().expect("id").to_string();
        let exported = self.path("exported.img");
        self.ok(&["export", tag, exported.to_str().expect("path")]);
        assert_eq!(fs::read(&exported).expect("read"), img);
        (id, exported)
    }

    /// `nbdcopy` of export `name` into a file; its bytes.
    fn nbdcopy(&self, name: &str) -> Vec<u8> {
        let out = self.path("nbd.out");
        let _ = fs::remove_file(&out);
        let uri = format!("nbd+unix:///{name}?socket={}", self.nbd_sock().display());
        let st = Command::new("nbdcopy")
            .arg(&uri)
            .arg(&out)
            .status()
            .expect("run nbdcopy");
        assert!(st.success(), "nbdcopy {uri} failed: {st:?}");
        fs::read(&out).expect("read nbdcopy output")
    }
}

fn have_nbdcopy() -> bool {
    let ok = Command::new("nbdcopy")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: nbdcopy (libnbd-bin) is not installed");
    }
    ok
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

    // A second attachment of the same image, and the errors.
    h.ok(&["attach", &id, "--name", "byid", "--rw"]);
    let err = h.fails(&["attach", "nope"]);
    assert!(err.contains("nope"), "{err}");
    let err = h.fails(&["attach", "app:1", "--name", "app"]);
    assert!(err.contains("already exists"), "{err}");

    // kill -9 and restart: the attachments come back and read the same.
    drop(agent);
    let err = h.fails(&["ls"]);
    assert!(err.contains("no agent listening on"), "{err}");
    let _agent = h.start_agent();
    assert_eq!(names(&h.json(&["ls"])), ["app", "byid"]);
    assert!(h.nbdcopy("app") == want, "nbdcopy differs after restart");
    assert!(h.nbdcopy("byid") == want, "writable attachment differs");

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
