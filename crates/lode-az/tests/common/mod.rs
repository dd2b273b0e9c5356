//! Real memcached nodes for the fleet tests and the fetch benchmark: each on 127.0.0.1
//! on a free port, `-U 0 -I 2m -m 64`, killed on drop.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_az::AzConfig;
use lode_format::ChunkName;

/// The memcached binary, if installed.
pub fn memcached_path() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/bin/memcached");
    if fixed.is_file() {
        return Some(fixed);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("memcached"))
        .find(|p| p.is_file())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One memcached process.
#[derive(Debug)]
pub struct Memcached {
    child: Option<Child>,
    pub addr: String,
}

impl Memcached {
    /// Starts memcached and waits until it accepts connections.
    pub fn start(bin: &PathBuf) -> Memcached {
        // A port found free can be taken before memcached binds it; try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(bin);
            cmd.args(["-l", "127.0.0.1", "-p", &port.to_string()])
                .args(["-U", "0", "-I", "2m", "-m", "64"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if running_as_root() {
                // memcached refuses to run as root without -u.
                cmd.args(["-u", "root"]);
            }
            let mut child = cmd.spawn().expect("start memcached");
            let addr = format!("127.0.0.1:{port}");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(&addr).is_ok() {
                    return Memcached {
                        child: Some(child),
                        addr,
                    };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("memcached did not start");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGSTOP: the process holds its connections and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` memcached nodes, or `None` (with the reason printed) when memcached is absent.
pub fn fleet(n: usize) -> Option<Vec<Memcached>> {
    let Some(bin) = memcached_path() else {
        eprintln!("skipped: memcached is not installed (apt-get install memcached)");
        return None;
    };
    Some((0..n).map(|_| Memcached::start(&bin)).collect())
}

/// A config over `fleet` with the default code and the given timeout.
pub fn config(fleet: &[Memcached], timeout: Duration) -> AzConfig {
    let mut c = AzConfig::new(fleet.iter().map(|m| m.addr.clone()));
    c.node_timeout = timeout;
    c
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn bytes(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// A chunk: (name, ciphertext).
pub fn chunk(seed: u64, len: usize) -> (ChunkName, Bytes) {
    let b = bytes(seed, len);
    (ChunkName::of(&b), b)
}

/// The quantile `per_mille`/1000 of sorted durations (nearest rank).
pub fn quantile(sorted: &[Duration], per_mille: usize) -> Duration {
    let Some(last) = sorted.len().checked_sub(1) else {
        return Duration::ZERO;
    };
    sorted[((last * per_mille + 500) / 1000).min(last)]
}

/// Polls `f` every 10 ms until it holds or `limit` passes; whether it held.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}
