//! Shared helpers: a lode node on its own runtime and a small blocking text-protocol
//! client. The real memcached, tool lookup and seeded bytes come from lode-testkit.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use lode_cache_node::{Node, NodeConfig, NodeHandle, Stats};

/// How long a client waits for an answer before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The name of the test node's runtime threads, so a panic hook can tell the node's
/// panics from the test's.
pub const NODE_THREAD: &str = "lode-test-node";

/// A lode node on a private two-thread runtime, so tests can drive it with blocking
/// clients and external tools.
pub struct TestNode {
    pub addr: SocketAddr,
    handle: Option<NodeHandle>,
    rt: tokio::runtime::Runtime,
}

impl TestNode {
    /// A memory-only node with the default limits on a free port.
    pub fn start() -> Self {
        Self::start_with(NodeConfig::default())
    }

    /// A node with `config`, listening on a free port of 127.0.0.1.
    pub fn start_with(config: NodeConfig) -> Self {
        Self::try_start(config).expect("node starts")
    }

    pub fn try_start(config: NodeConfig) -> Result<Self, lode_cache_node::Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(NODE_THREAD)
            .enable_all()
            .build()
            .unwrap();
        let config = NodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..config
        };
        let handle = rt.block_on(Node::start(config))?;
        Ok(TestNode {
            addr: handle.local_addr(),
            handle: Some(handle),
            rt,
        })
    }

    pub fn stats(&self) -> Stats {
        self.handle.as_ref().unwrap().stats()
    }

    /// Waits for queued flash writes and deletes.
    pub fn settle(&self) {
        self.rt.block_on(self.handle.as_ref().unwrap().settle());
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Stops the node the orderly way (what a restart test needs).
    pub fn shutdown(mut self) {
        let handle = self.handle.take().unwrap();
        self.rt.block_on(handle.shutdown()).unwrap();
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.rt.block_on(handle.shutdown());
        }
    }
}

/// One item of a `get` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub key: String,
    pub flags: u32,
    pub data: Vec<u8>,
    pub cas: Option<u64>,
}

/// A blocking memcached text-protocol client that checks framing strictly.
pub struct Client {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends what it can; false if the server closed the connection meanwhile.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// The next line, without its `\r\n` (which must be there).
    pub fn line(&mut self) -> String {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line).expect("read line");
        assert!(
            line.ends_with(b"\r\n"),
            "answer line not ended by \\r\\n: {:?}",
            String::from_utf8_lossy(&line)
        );
        line.truncate(line.len() - 2);
        String::from_utf8(line).expect("answer line is text")
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.reader.read_exact(&mut buf).expect("read data");
        buf
    }

    /// Sends one request and returns the one-line answer.
    pub fn call(&mut self, request: &str) -> String {
        self.send(request.as_bytes());
        self.line()
    }

    pub fn store(&mut self, cmd: &str, key: &str, flags: u32, exptime: i64, data: &[u8]) -> String {
        let mut req = format!("{cmd} {key} {flags} {exptime} {}\r\n", data.len()).into_bytes();
        req.extend_from_slice(data);
        req.extend_from_slice(b"\r\n");
        self.send(&req);
        self.line()
    }

    pub fn set(&mut self, key: &str, data: &[u8]) -> String {
        self.store("set", key, 0, 0, data)
    }

    /// Reads `VALUE` items up to `END`.
    pub fn values(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let line = self.line();
            if line == "END" {
                return out;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            assert!(
                parts[0] == "VALUE" && (parts.len() == 4 || parts.len() == 5),
                "unexpected answer line {line:?}"
            );
            let len: usize = parts[3].parse().unwrap();
            let data = self.read_exact(len);
            assert_eq!(self.read_exact(2), b"\r\n", "value not ended by \\r\\n");
            out.push(Value {
                key: parts[1].to_string(),
                flags: parts[2].parse().unwrap(),
                data,
                cas: parts.get(4).map(|c| c.parse().unwrap()),
            });
        }
    }

    pub fn get_multi(&mut self, cmd: &str, keys: &[&str]) -> Vec<Value> {
        self.send(format!("{cmd} {}\r\n", keys.join(" ")).as_bytes());
        self.values()
    }

    pub fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        let mut values = self.get_multi("get", &[key]);
        assert!(values.len() <= 1);
        values.pop().map(|v| v.data)
    }

    pub fn gets(&mut self, key: &str) -> Option<Value> {
        let mut values = self.get_multi("gets", &[key]);
        assert!(values.len() <= 1);
        values.pop()
    }

    pub fn stats(&mut self) -> HashMap<String, String> {
        self.send(b"stats\r\n");
        let mut stats = HashMap::new();
        loop {
            let line = self.line();
            if line == "END" {
                return stats;
            }
            let mut parts = line.splitn(3, ' ');
            assert_eq!(parts.next(), Some("STAT"), "bad stats line {line:?}");
            let name = parts.next().unwrap().to_string();
            stats.insert(name, parts.next().unwrap_or("").to_string());
        }
    }

    pub fn stat(&mut self, name: &str) -> u64 {
        let stats = self.stats();
        stats
            .get(name)
            .unwrap_or_else(|| panic!("no stat {name}"))
            .parse()
            .unwrap_or_else(|_| panic!("stat {name} is not a number"))
    }

    /// True when the server has closed the connection: reads give end of file (after
    /// any lines it sent first, which are returned).
    pub fn closed_after(&mut self) -> (bool, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return (true, lines),
                Ok(_) => lines.push(String::from_utf8_lossy(&line).trim_end().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (true, lines),
                Err(_) => return (false, lines),
            }
        }
    }

    /// After a request whose answer may be `END` or a closed connection: `(false,
    /// ["END"])` for the answer, or `(true, lines before the close)`.
    pub fn closed_after_or_answer(&mut self) -> (bool, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return (true, lines),
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    let done = text == "END";
                    lines.push(text);
                    if done {
                        return (false, lines);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (true, lines),
                Err(e) => panic!("no answer and no close: {e}"),
            }
        }
    }

    /// Closes the sending side only.
    pub fn finish_sending(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
    }
}

/// Resident memory of this process (where the test node runs), in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}
