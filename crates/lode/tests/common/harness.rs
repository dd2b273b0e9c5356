//! The harness the `lode` system tests share: a scratch `$LODE_HOME` per test, the real
//! binary run as a child process, and guards that kill agents and clear the FUSE mounts
//! they leave, so a failing test leaks nothing.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Home {
    pub dir: tempfile::TempDir,
}

/// The agent child process; killed (SIGKILL) and reaped on drop, and the FUSE mount of
/// attachment files it leaves behind (dead, answering ENOTCONN) detached lazily.
pub struct AgentProc {
    pub child: Child,
    /// Its FUSE mount of attachment files, to clear on drop; None once `kill_hard` ran.
    pub files: Option<PathBuf>,
}

impl AgentProc {
    /// `kill -9`, leaving the dead FUSE mount behind as a crash would, for the next agent
    /// on the same state directory to clear; the guard returned clears it if none did.
    #[must_use = "dropping the guard clears the dead mount at once"]
    pub fn kill_hard(mut self) -> DeadMount {
        let _ = self.child.kill();
        let _ = self.child.wait();
        DeadMount(self.files.take())
    }
}

/// A killed agent's FUSE mount; detached lazily on drop if it is still there and dead
/// (ENOTCONN), not if a new agent has mounted over it.
pub struct DeadMount(pub Option<PathBuf>);

impl Drop for DeadMount {
    fn drop(&mut self) {
        if let Some(files) = &self.0
            && fs::metadata(files).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN)
        {
            let _ = Command::new("umount").arg("-l").arg(files).status();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(files) = self.files.take()
            && is_mounted(&files)
        {
            let _ = Command::new("umount").arg("-l").arg(&files).status();
        }
    }
}

/// Any other child process (a client, nbdfuse): killed and reaped on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// Waits at most `limit` for the child to exit; None if it is still running.
    pub fn wait_for(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait().expect("wait") {
                return Some(st);
            }
            if started.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Home {
    pub fn new() -> Home {
        Home {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn control(&self) -> PathBuf {
        self.home().join("agent/control.sock")
    }

    pub fn nbd_sock(&self) -> PathBuf {
        self.home().join("agent/nbd.sock")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lode"));
        cmd.args(args).env("LODE_HOME", self.home());
        for var in [
            "LODE_STORE",
            "LODE_KMS",
            "LODE_KMS_KEY",
            "LODE_AGENT_CONTROL",
            "LODE_PUT_ONLY",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().expect("run lode");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "lode {args:?} panicked:\n{err}");
        out
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lode {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 stdout")
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "lode {args:?} succeeded");
        String::from_utf8(out.stderr).expect("UTF-8 stderr")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    /// Starts `lode agent` and waits until `lode ls` answers.
    pub fn start_agent(&self) -> AgentProc {
        self.start_agent_with(&["--cache-memory", "1048576"])
    }

    /// Starts `lode agent ARGS` on the default state directory and waits until `lode ls`
    /// answers.
    pub fn start_agent_with(&self, args: &[&str]) -> AgentProc {
        self.spawn_agent(args, &self.home().join("agent"))
    }

    /// Starts `lode agent ARGS` whose state directory is `state` and waits until `lode ls`
    /// answers on `state/control.sock`.
    pub fn spawn_agent(&self, args: &[&str], state: &Path) -> AgentProc {
        let mut a = vec!["agent"];
        a.extend_from_slice(args);
        let child = self
            .cmd(&a)
            .stdin(Stdio::null())
            .stdout(fs::File::create(self.path("agent.out")).expect("log"))
            .stderr(fs::File::create(self.path("agent.err")).expect("log"))
            .spawn()
            .expect("spawn lode agent");
        let mut agent = AgentProc {
            child,
            files: Some(state.join("files")),
        };
        let control = state.join("control.sock");
        let started = Instant::now();
        loop {
            if self
                .run(&["ls", "--control", control.to_str().expect("path")])
                .status
                .success()
            {
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
}

pub use lode_testkit::is_mounted;

impl Home {
    /// A busybox image built with umoci and flattened as tag `bb`: busybox-static with
    /// `applets` linked in /bin, users root and app (1000:1001, home /work, which app
    /// owns), `files` (paths relative to the root) written in, and the config env
    /// GREETING, working dir /work, user app, cmd `cat /etc/group`.
    pub fn busybox_image(&self, applets: &[&str], files: &[(&str, &[u8])]) {
        let layout = self.path("layout");
        let bundle = self.path("bundle");
        let image = format!("{}:t", layout.display());
        let umoci = |args: &[&str]| {
            let out = Command::new("umoci").args(args).output().expect("umoci");
            assert!(
                out.status.success(),
                "umoci {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        umoci(&["init", "--layout", layout.to_str().expect("path")]);
        umoci(&["new", "--image", &image]);
        umoci(&["unpack", "--image", &image, bundle.to_str().expect("path")]);
        let root = bundle.join("rootfs");
        for d in ["bin", "etc", "work", "proc", "dev", "sys", "tmp"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
        for applet in applets {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("ln");
        }
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/work:/bin/sh\n",
        )
        .expect("passwd");
        fs::write(root.join("etc/group"), "root:x:0:\napp:x:1001:\n").expect("group");
        for (path, bytes) in files {
            fs::write(root.join(path), bytes).expect("write a file into the image");
        }
        // The working dir is writable by the image's user.
        let chown = Command::new("chown")
            .arg("1000:1001")
            .arg(root.join("work"))
            .status()
            .expect("chown");
        assert!(chown.success(), "chown of /work failed");
        umoci(&["repack", "--image", &image, bundle.to_str().expect("path")]);
        umoci(&[
            "config",
            "--image",
            &image,
            "--config.env",
            "GREETING=hello from the image",
            "--config.workingdir",
            "/work",
            "--config.user",
            "app",
            "--config.cmd",
            "/bin/cat",
            "--config.cmd",
            "/etc/group",
        ]);
        self.ok(&["flatten", &format!("oci:{image}"), "--tag", "bb", "-q"]);
    }
}

/// `chunks` 512 KiB chunks of bytes that neither repeat nor compress, the same for
/// the same `seed`.
pub fn random_image(chunks: usize, seed: u64) -> Vec<u8> {
    lode_testkit::seeded_bytes(chunks * 512 * 1024, seed)
}

/// Whether `tool ARGS` runs and exits 0; if not, says the test is skipped and why.
pub fn have(tool: &str, args: &[&str], package: &str) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        lode_testkit::skip(&format!("{tool} ({package}) is not installed"));
    }
    ok
}

/// Whether nbdcopy (libnbd-bin) runs; if not, says the test is skipped.
pub fn have_nbdcopy() -> bool {
    have("nbdcopy", &["--version"], "libnbd-bin")
}
