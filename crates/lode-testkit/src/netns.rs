//! The test network of `scripts/testnet.sh` from a test: an origin host, six cache hosts
//! and worker hosts, each a network namespace behind a router with link delays and
//! faults (docs/network.md). [`TestNet::up`] makes one under a name prefix of its own,
//! so tests can run side by side; dropping it runs `down`, which also kills whatever
//! still runs in its namespaces.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// How to make the network: `testnet.sh up` flags beyond the worker count, such as
/// `["--origin-delay", "5ms"]`.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Worker hosts, `worker1` to `workerN`.
    pub workers: usize,
    /// More `up` flags, passed as they are.
    pub args: Vec<String>,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            workers: 3,
            args: Vec::new(),
        }
    }
}

/// A network made by `testnet.sh up`; `down` runs on drop.
#[derive(Debug)]
pub struct TestNet {
    prefix: String,
    subnet: String,
    /// `(host, namespace, address)` as `testnet.sh hosts` lists them.
    hosts: Vec<(String, String, Ipv4Addr)>,
}

/// Networks made by this process so far: part of each one's prefix.
static MADE: AtomicU32 = AtomicU32::new(0);

/// `scripts/testnet.sh` of this checkout.
pub fn testnet_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/testnet.sh")
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl TestNet {
    /// Makes a network, or returns `None` after [`skip`](crate::skip) said why it cannot
    /// (not root, or iproute2, iptables or python3 missing). Under `LODE_REQUIRE_TOOLS`
    /// those fail instead, and so does a failed `up` (a kernel without NFQUEUE, say).
    pub fn up(opts: &NetOptions) -> Option<TestNet> {
        if !crate::root_or_skip("the test network needs root (network namespaces)") {
            return None;
        }
        for (tool, package) in [
            ("ip", "iproute2"),
            ("tc", "iproute2"),
            ("iptables", "iptables"),
            ("python3", "python3"),
        ] {
            crate::tool_from(tool, package)?;
        }
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let prefix = format!("lt{pid}n{n}");
        // Each network is closed in namespaces of its own, so subnets could repeat;
        // distinct ones keep a reader of two networks' logs from mixing them up.
        let third = (pid.wrapping_mul(7).wrapping_add(n)) % 256;
        let subnet = format!("198.18.{third}.0/24");
        let mut net = TestNet {
            prefix,
            subnet,
            hosts: Vec::new(),
        };
        // From here on, drop runs `down`, also when `up` fails half way.
        let mut up = net.script();
        up.args(["up", "--workers", &opts.workers.to_string()])
            .args(&opts.args);
        check(&mut up);
        let listed = check(net.script().arg("hosts"));
        for line in listed.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [host, ns, addr] = f[..] else {
                panic!("testnet.sh hosts: bad line {line:?}");
            };
            let addr = addr
                .parse()
                .unwrap_or_else(|e| panic!("testnet.sh hosts: {addr:?}: {e}"));
            net.hosts.push((host.to_owned(), ns.to_owned(), addr));
        }
        Some(net)
    }

    fn script(&self) -> Command {
        let mut c = Command::new("bash");
        c.arg(testnet_script())
            .args(["--prefix", &self.prefix, "--subnet", &self.subnet]);
        c
    }

    /// The prefix of its namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn host(&self, host: &str) -> &(String, String, Ipv4Addr) {
        self.hosts
            .iter()
            .find(|h| h.0 == host)
            .unwrap_or_else(|| panic!("no host {host} in test network {}", self.prefix))
    }

    /// The address of `host` (`origin`, `cache1`…`cache6`, `worker1`…).
    pub fn addr(&self, host: &str) -> Ipv4Addr {
        self.host(host).2
    }

    /// The cache hosts' names.
    pub fn caches(&self) -> Vec<String> {
        (1..=6).map(|i| format!("cache{i}")).collect()
    }

    /// The namespace of `host`.
    pub fn netns(&self, host: &str) -> &str {
        &self.host(host).1
    }

    /// `ip netns exec NS program`: a command that runs `program` on `host`.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.netns(host)]).arg(program);
        c
    }

    /// Runs `f` on a thread that entered `host`'s network namespace, and returns what
    /// it returns: sockets it makes (and threads it starts) belong to that host.
    pub fn on_host<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/run/netns").join(self.netns(host));
        std::thread::scope(|s| {
            s.spawn(move || {
                let ns = std::fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                // SAFETY: setns(2) on an open namespace file; it changes only this
                // thread, which ends when `f` returns.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    r,
                    0,
                    "setns into {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A listening socket on `host`'s address and `port` (0: any free one), bound from
    /// inside the host's namespace: the socket stays there, wherever the test then
    /// serves it from.
    pub fn bind_tcp(&self, host: &str, port: u16) -> TcpListener {
        let addr = SocketAddrV4::new(self.addr(host), port);
        self.on_host(host, || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
        })
    }

    /// `testnet.sh fault ARGS`, such as `["partition", "cache3"]` or `["clear"]`.
    pub fn fault(&self, args: &[&str]) {
        check(self.script().arg("fault").args(args));
    }

    /// `testnet.sh status`: for a failing test's message.
    pub fn status(&self) -> String {
        String::from_utf8_lossy(&run(self.script().arg("status")).stdout).into_owned()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let out = run(self.script().arg("down"));
        if !out.status.success() {
            eprintln!(
                "testnet.sh down for {}: {}",
                self.prefix,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
