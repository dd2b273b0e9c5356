//! A real memcached, for the tests that hold lode's cache node and AZ client to the
//! server they must interoperate with.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, is_root, tool_from};

/// How long memcached has to accept connections once started.
const STARTUP: Duration = Duration::from_secs(5);

/// Ports tried before giving up: another process may take a port found free before
/// memcached binds it.
const ATTEMPTS: usize = 5;

/// A memcached process on a free port of 127.0.0.1, with UDP off, killed when dropped.
#[derive(Debug)]
pub struct Memcached {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Memcached {
    /// `memcached -l 127.0.0.1 -p PORT -U 0 -I 2m -m MEMORY_MIB`: values up to 2 MiB in
    /// `memory_mib` MiB. `None` after [`skip`](crate::skip) when memcached is not
    /// installed.
    pub fn start(memory_mib: u32) -> Option<Memcached> {
        Self::start_with(&["-I", "2m", "-m", &memory_mib.to_string()])
    }

    /// `memcached -l 127.0.0.1 -p PORT -U 0 ARGS`, waiting until it accepts connections.
    /// `None` after [`skip`](crate::skip) when memcached is not installed; panics when it
    /// does not start.
    pub fn start_with(args: &[&str]) -> Option<Memcached> {
        let bin = tool_from("memcached", "memcached")?;
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if is_root() {
                // memcached refuses to run as root without a user to become.
                cmd.args(["-u", "nobody"]);
            }
            let mut child = cmd.spawn().expect("memcached runs");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + STARTUP;
            while Instant::now() < deadline {
                if TcpStream::connect(addr).is_ok() {
                    return Some(Memcached {
                        child: Some(child),
                        addr,
                    });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    // It exited: the port was taken meanwhile. Try another.
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("memcached {args:?} did not accept connections on any of {ATTEMPTS} ports");
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SIGSTOP: it keeps its connections open and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT, after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL, and reap it. Dropping it does the same.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("memcached was not killed")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
    }
}
