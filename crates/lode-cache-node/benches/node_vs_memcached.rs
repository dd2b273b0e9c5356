//! SET and GET of 128 KiB values (an erasure-coded stripe of a 512 KiB chunk, k = 4)
//! through lode's cache node and through memcached 1.6, by the same client at the same
//! concurrency, both servers on 127.0.0.1.
//!
//! ```text
//! cargo bench -p lode-cache-node --bench node_vs_memcached
//! LODE_BENCH_SECS=5 LODE_BENCH_ROUNDS=7 LODE_BENCH_CONNS=16 cargo bench -p lode-cache-node
//! ```
//!
//! Each round runs, per server, a SET phase then a GET phase of `LODE_BENCH_SECS`
//! seconds; 16 connections each cycle over 32 keys of their own (64 MiB in all, which
//! both servers hold in memory). Rounds alternate which server goes first, so drift on
//! the machine falls on both; the figures reported are medians over rounds. Every GET
//! answer is checked for length and content. memcached runs with its defaults
//! (`-t 4`) plus `-m 1024 -I 2m`; lode's node runs on a two-thread Tokio runtime in
//! this process with a 1 GiB memory tier over a flash tier in a temporary directory.
//! A last lode-only phase reads a working set four times its memory tier, so most
//! GETs come from flash.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_cache_node::{Node, NodeConfig, NodeHandle};
use lode_testkit::{Memcached, seeded_bytes};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const VALUE: usize = 128 * 1024;
const KEYS_PER_CONN: usize = 32;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn value_for(conn: usize, key: usize) -> Vec<u8> {
    seeded_bytes(VALUE, (conn * 131 + key) as u64)
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Set,
    Get,
}

struct Phase {
    ops: u64,
    secs: f64,
    latencies_us: Vec<u32>,
}

impl Phase {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    /// The latency at `per_mille`/1000 of the sorted samples.
    fn percentile(&self, per_mille: usize) -> u32 {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        l[(l.len() - 1) * per_mille / 1000]
    }
}

/// One connection's loop: SETs or GETs of its own keys until `until`.
async fn drive(
    addr: SocketAddr,
    conn: usize,
    op: Op,
    until: Instant,
    values: Arc<Vec<Vec<u8>>>,
) -> (u64, Vec<u32>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let keys: Vec<String> = (0..KEYS_PER_CONN)
        .map(|k| format!("bench:{conn}:{k}"))
        .collect();
    let sets: Vec<Vec<u8>> = keys
        .iter()
        .zip(values.iter())
        .map(|(k, v)| {
            let mut r = format!("set {k} 0 0 {}\r\n", v.len()).into_bytes();
            r.extend_from_slice(v);
            r.extend_from_slice(b"\r\n");
            r
        })
        .collect();
    let gets: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| format!("get {k}\r\n").into_bytes())
        .collect();
    let mut line = String::new();
    let mut body = vec![0u8; VALUE + 7];
    let mut latencies = Vec::with_capacity(100_000);
    let mut ops = 0u64;
    let mut i = 0;
    while Instant::now() < until {
        let k = i % KEYS_PER_CONN;
        i += 1;
        let start = Instant::now();
        match op {
            Op::Set => {
                wr.write_all(&sets[k]).await.unwrap();
                line.clear();
                rd.read_line(&mut line).await.unwrap();
                assert_eq!(line, "STORED\r\n");
            }
            Op::Get => {
                wr.write_all(&gets[k]).await.unwrap();
                line.clear();
                rd.read_line(&mut line).await.unwrap();
                assert!(
                    line.starts_with("VALUE ") && line.ends_with(&format!(" {VALUE}\r\n")),
                    "{line:?}"
                );
                rd.read_exact(&mut body).await.unwrap();
                assert!(
                    body[..VALUE] == values[k][..],
                    "wrong bytes for {}",
                    keys[k]
                );
                assert_eq!(&body[VALUE..], b"\r\nEND\r\n");
            }
        }
        let us = start.elapsed().as_micros();
        latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
        ops += 1;
    }
    (ops, latencies)
}

fn run_phase(
    client: &tokio::runtime::Runtime,
    addr: SocketAddr,
    op: Op,
    conns: usize,
    secs: u64,
    values: &[Arc<Vec<Vec<u8>>>],
) -> Phase {
    client.block_on(async {
        let start = Instant::now();
        let until = start + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..conns)
            .map(|c| tokio::spawn(drive(addr, c, op, until, values[c].clone())))
            .collect();
        let mut phase = Phase {
            ops: 0,
            secs: 0.0,
            latencies_us: Vec::new(),
        };
        for t in tasks {
            let (ops, lat) = t.await.unwrap();
            phase.ops += ops;
            phase.latencies_us.extend(lat);
        }
        phase.secs = start.elapsed().as_secs_f64();
        phase
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Node2 {
    rt: tokio::runtime::Runtime,
    handle: Option<NodeHandle>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node2 {
    fn start(memory_bytes: u64, flash_bytes: u64) -> Node2 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lode-node")
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let handle = rt
            .block_on(Node::start(NodeConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                memory_bytes: Some(memory_bytes),
                flash_dir: Some(dir.path().join("flash")),
                flash_bytes,
                ..NodeConfig::default()
            }))
            .unwrap();
        Node2 {
            addr: handle.local_addr(),
            handle: Some(handle),
            rt,
            _dir: dir,
        }
    }
}

impl Drop for Node2 {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.rt.block_on(h.shutdown());
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too, briefly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let secs = env_or("LODE_BENCH_SECS", if quick { 1 } else { 3 });
    let rounds = usize::try_from(env_or("LODE_BENCH_ROUNDS", if quick { 1 } else { 5 })).unwrap();
    let conns = usize::try_from(env_or("LODE_BENCH_CONNS", 16)).unwrap();
    let Some(memcached) = Memcached::start_with(&["-m", "1024", "-I", "2m"]) else {
        return;
    };
    let mc_addr = memcached.addr();
    let lode = Node2::start(1 << 30, 4 << 30);
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    let values: Vec<Arc<Vec<Vec<u8>>>> = (0..conns)
        .map(|c| Arc::new((0..KEYS_PER_CONN).map(|k| value_for(c, k)).collect()))
        .collect();
    println!(
        "128 KiB values, {conns} connections, {secs} s per phase, {rounds} rounds \
         (lode {} vs memcached 1.6 at {mc_addr})",
        lode_cache_node::VERSION
    );
    println!(
        "{:<6} {:<10} {:<4} {:>10} {:>10} {:>9} {:>9}",
        "round", "server", "op", "ops/s", "MiB/s", "p50 µs", "p99 µs"
    );
    // results[server][op] = per-round (throughput, p50, p99)
    let mut results = vec![vec![Vec::new(), Vec::new()]; 2];
    let servers = [("lode", lode.addr), ("memcached", mc_addr)];
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for s in order {
            let (name, addr) = servers[s];
            for (o, op) in [Op::Set, Op::Get].into_iter().enumerate() {
                let phase = run_phase(&client, addr, op, conns, secs, &values);
                let (tp, p50, p99) = (
                    phase.throughput(),
                    phase.percentile(500),
                    phase.percentile(990),
                );
                println!(
                    "{:<6} {:<10} {:<4} {:>10.0} {:>10.0} {:>9} {:>9}",
                    round + 1,
                    name,
                    if op == Op::Set { "SET" } else { "GET" },
                    tp,
                    tp * VALUE as f64 / f64::from(1 << 20),
                    p50,
                    p99
                );
                results[s][o].push((tp, f64::from(p50), f64::from(p99)));
            }
        }
    }
    println!("\nmedians over {rounds} rounds");
    println!(
        "{:<4} {:>12} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "op", "lode ops/s", "mc ops/s", "ratio", "lode p50", "mc p50", "lode p99", "mc p99"
    );
    for (o, name) in ["SET", "GET"].iter().enumerate() {
        let m = |s: usize, f: fn(&(f64, f64, f64)) -> f64| {
            median(results[s][o].iter().map(f).collect())
        };
        let (lt, mt) = (m(0, |r| r.0), m(1, |r| r.0));
        println!(
            "{:<4} {:>12.0} {:>12.0} {:>7.2} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
            name,
            lt,
            mt,
            lt / mt,
            m(0, |r| r.1),
            m(1, |r| r.1),
            m(0, |r| r.2),
            m(1, |r| r.2)
        );
    }
    let stats = lode.handle.as_ref().unwrap().stats();
    println!(
        "lode tiers: memory hits {} (items {}), flash hits {}, demotions {}",
        stats.memory.hits, stats.memory.items, stats.flash.hits, stats.memory.demotions
    );
    drop(lode);

    // Lode only: a working set four times the memory tier, so GETs mostly hit flash.
    let working = (conns * KEYS_PER_CONN * (VALUE + 200)) as u64;
    let small = Node2::start(working / 4, working * 2);
    run_phase(&client, small.addr, Op::Set, conns, secs, &values);
    small.rt.block_on(small.handle.as_ref().unwrap().settle());
    let before = small.handle.as_ref().unwrap().stats();
    let phase = run_phase(&client, small.addr, Op::Get, conns, secs, &values);
    let after = small.handle.as_ref().unwrap().stats();
    let lookups = (after.cmd_get - before.cmd_get).max(1);
    println!(
        "\nlode, memory tier a quarter of the working set: GET {:.0} ops/s, p50 {} µs, \
         p99 {} µs; {:.0}% of GETs from flash, {} promotions",
        phase.throughput(),
        phase.percentile(500),
        phase.percentile(990),
        100.0 * (after.flash.hits - before.flash.hits) as f64 / lookups as f64,
        after.memory.promotions - before.memory.promotions
    );
}
