//! The AZ cache tier end to end, with real processes: six `lode cache-node`s on
//! 127.0.0.1, `lode agent --az-node ...` (k = 4, m = 2) in front of a local store, and
//! `nbdcopy` reading the attached image. A second agent with empty local caches must be
//! served by the fleet; with a stripe overwritten through the memcached protocol, with two
//! nodes killed, and with every node gone, reads stay byte-exact.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/harness.rs"]
mod harness;
use harness::*;

/// A `lode cache-node` child on a free port; killed on drop.
struct CacheNode {
    child: Child,
    addr: String,
}

impl Drop for CacheNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CacheNode {
    fn start(h: &Home) -> CacheNode {
        let port = lode_testkit::free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = h
            .cmd(&["cache-node", "--listen", &addr, "--memory", "64MiB"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lode cache-node");
        let started = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "{addr} silent");
            std::thread::sleep(Duration::from_millis(20));
        }
        CacheNode { child, addr }
    }

    /// The raw value under `key`, if the node holds one.
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        write!(s, "get {key}\r\n").expect("send");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("reply");
        if line == "END\r\n" {
            return None;
        }
        let len: usize = line
            .split_whitespace()
            .nth(3)
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("bad reply {line:?}"));
        let mut v = vec![0u8; len + 2];
        r.read_exact(&mut v).expect("value");
        v.truncate(len);
        Some(v)
    }

    fn set(&self, key: &str, value: &[u8]) {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        write!(s, "set {key} 0 0 {}\r\n", value.len()).expect("send");
        s.write_all(value).expect("send");
        s.write_all(b"\r\n").expect("send");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("reply");
        assert_eq!(line, "STORED\r\n");
    }
}

fn stats(h: &Home, state: &Path) -> Value {
    let out = h.ok(&[
        "--json",
        "stats",
        "--control",
        state.join("control.sock").to_str().expect("path"),
    ]);
    serde_json::from_str(&out).expect("JSON")
}

fn tier(v: &Value, name: &str) -> Value {
    v["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no tier {name}"))
}

fn nbdcopy(state: &Path, out: &Path) -> Vec<u8> {
    let uri = format!(
        "nbd+unix:///img?socket={}",
        state.join("nbd.sock").display()
    );
    let st = Command::new("nbdcopy")
        .arg(&uri)
        .arg(out)
        .status()
        .expect("nbdcopy");
    assert!(st.success(), "nbdcopy {uri}: {st:?}");
    std::fs::read(out).expect("read copy")
}

#[test]
fn the_fleet_serves_a_second_worker_and_survives_lost_and_lying_nodes() {
    let h = Home::new();
    // 24 chunks of pseudo-random bytes (no zero chunks, so every chunk is fetched).
    let img = lode_testkit::seeded_bytes(12 << 20, 0x2545_f491_4f6c_dd1d);
    let raw = h.path("img.raw");
    std::fs::write(&raw, &img).expect("write");
    h.ok(&["import", raw.to_str().expect("path"), "--tag", "img", "-q"]);
    let inspect: Value = serde_json::from_str(&h.ok(&["--json", "inspect", "img"])).expect("JSON");
    let chunks: Vec<String> = inspect["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c.as_str().expect("name").to_string())
        .collect();
    assert_eq!(chunks.len(), 24);

    let mut nodes: Vec<Option<CacheNode>> = (0..6).map(|_| Some(CacheNode::start(&h))).collect();
    let mut args: Vec<String> = Vec::new();
    for n in nodes.iter().flatten() {
        args.push("--az-node".into());
        args.push(n.addr.clone());
    }
    let worker = |i: usize| {
        let state = h.path(&format!("worker-{i}"));
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend(["--no-files", "--state-dir", state.to_str().expect("path")]);
        let agent = h.spawn_agent(&a, &state);
        h.ok(&[
            "attach",
            "img",
            "--control",
            state.join("control.sock").to_str().expect("path"),
        ]);
        (agent, state)
    };

    // Worker 0: everything from the origin; the chunks go to the fleet behind the reads
    // (a clean stop waits for those background writes).
    let (agent, state) = worker(0);
    assert!(nbdcopy(&state, &h.path("copy0")) == img);
    stop(agent);
    for c in &chunks {
        let held = nodes
            .iter()
            .flatten()
            .filter(|n| n.get(&format!("lode-az1:k4m2:{c}")).is_some())
            .count();
        assert_eq!(
            held, 6,
            "chunk {c} has {held} of its 6 stripes in the fleet"
        );
    }

    // Worker 1, empty local caches: served by the fleet, not the origin.
    let (agent, state) = worker(1);
    assert!(nbdcopy(&state, &h.path("copy1")) == img);
    let v = stats(&h, &state);
    assert_eq!(tier(&v, "az")["hits"].as_u64(), Some(24), "{v}");
    assert_eq!(tier(&v, "origin")["hits"].as_u64(), Some(0), "{v}");
    stop(agent);

    // A lying node: one stripe of the first chunk overwritten with garbage of its size.
    // The read rebuilds from the other five, counts the liar, and serves right bytes.
    let key = format!("lode-az1:k4m2:{}", chunks[0]);
    // The node of data stripe 0 (byte 7 of a stripe is its index): a hedged read asks
    // the data stripes' nodes, so this one is read.
    let liar = nodes
        .iter()
        .flatten()
        .position(|n| n.get(&key).is_some_and(|s| s.get(7) == Some(&0)))
        .expect("a node holds data stripe 0 of chunk 0");
    let n = nodes[liar].as_ref().expect("node");
    let len = n.get(&key).expect("stripe").len();
    n.set(&key, &vec![0xA5; len]);
    let (agent, state) = worker(2);
    assert!(nbdcopy(&state, &h.path("copy2")) == img);
    let v = stats(&h, &state);
    assert_eq!(tier(&v, "az")["hits"].as_u64(), Some(24), "{v}");
    let liar_addr = nodes[liar].as_ref().expect("node").addr.clone();
    let liar_stats = v["az"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == liar_addr.as_str())
        .cloned()
        .expect("liar's metrics");
    assert!(
        liar_stats["integrity_failures"].as_u64() >= Some(1),
        "the overwritten stripe was not caught: {v}"
    );
    stop(agent);

    // Two nodes killed: any 4 of the remaining 4 stripes still rebuild every chunk.
    let mut killed = 0;
    for slot in nodes.iter_mut() {
        if killed < 2 {
            *slot = None;
            killed += 1;
        }
    }
    let (agent, state) = worker(3);
    assert!(nbdcopy(&state, &h.path("copy3")) == img);
    let v = stats(&h, &state);
    assert!(tier(&v, "az")["hits"].as_u64() >= Some(23), "{v}");
    stop(agent);

    // Every node gone: the origin serves, and the dead nodes cost little time.
    for slot in nodes.iter_mut() {
        *slot = None;
    }
    let (agent, state) = worker(4);
    let started = Instant::now();
    assert!(nbdcopy(&state, &h.path("copy4")) == img);
    assert!(started.elapsed() < Duration::from_secs(30));
    let v = stats(&h, &state);
    assert_eq!(tier(&v, "origin")["hits"].as_u64(), Some(24), "{v}");
    stop(agent);
    // The store was never written by any of this.
    h.ok(&["verify", "img"]);
}

/// SIGTERM and wait: the agent settles its background writes before it exits.
fn stop(mut agent: AgentProc) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGTERM) };
    let started = Instant::now();
    while agent.child.try_wait().expect("wait").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
