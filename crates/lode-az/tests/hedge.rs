//! Hedged stripe reads against six lode cache nodes in this process (k = 4, m = 2), each
//! behind lode-testkit's `DelayProxy` so that one can be slowed or cut off: a slow node
//! is read around, a dead one too, every byte checks, and the hedges are counted.
//!
//! The measurement (p50/p99 per mode with one node slowed, and bytes per read):
//! `cargo test --release -p lode-az --test hedge -- --ignored --nocapture hedging_figures`

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_az::memcache::Connection;
use lode_az::{AzClient, AzConfig, AzMetrics, Hedge};
use lode_cache_node::{Node, NodeConfig, NodeHandle};
use lode_format::ChunkName;
use lode_testkit::DelayProxy;

use common::{chunk, quantile};

/// A 512 KiB chunk's ciphertext: the plaintext plus the 16-byte GCM tag.
const CHUNK: usize = 512 * 1024 + 16;

/// Six nodes, each behind its own proxy (delay 0 until a test slows one).
struct Fleet {
    addrs: Vec<String>,
    proxies: Vec<Option<DelayProxy>>,
    _nodes: Vec<NodeHandle>,
}

impl Fleet {
    async fn start() -> Fleet {
        let (mut nodes, mut proxies) = (Vec::new(), Vec::new());
        for _ in 0..6 {
            let node = Node::start(NodeConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                memory_bytes: Some(256 << 20),
                ..NodeConfig::default()
            })
            .await
            .unwrap();
            let proxy = DelayProxy::start(node.local_addr(), Duration::ZERO)
                .await
                .unwrap();
            proxies.push(Some(proxy));
            nodes.push(node);
        }
        Fleet {
            addrs: proxies
                .iter()
                .map(|p| p.as_ref().expect("proxy").addr().to_string())
                .collect(),
            proxies,
            _nodes: nodes,
        }
    }

    fn addrs(&self) -> Vec<String> {
        self.addrs.clone()
    }

    fn config(&self, hedge: Hedge) -> AzConfig {
        let mut c = AzConfig::new(self.addrs());
        // Two shared cores: a slow answer must not look like a lost node.
        c.node_timeout = Duration::from_secs(2);
        c.hedge = hedge;
        c
    }

    fn slow(&self, i: usize, delay: Duration) {
        self.proxies[i].as_ref().expect("proxy").set_delay(delay);
    }

    /// Node `i` unreachable: its proxy stops, so connections are refused.
    fn kill(&mut self, i: usize) {
        self.proxies[i] = None;
    }
}

fn chunks(n: usize) -> Vec<(ChunkName, Bytes)> {
    (0..n).map(|i| chunk(7000 + i as u64, CHUNK)).collect()
}

async fn put_all(az: &AzClient, chunks: &[(ChunkName, Bytes)]) {
    for (name, data) in chunks {
        az.put(name, data.clone()).await.expect("put");
    }
}

/// `n` sequential reads over `chunks`, each checked byte for byte; latencies sorted.
async fn timed_reads(az: &AzClient, chunks: &[(ChunkName, Bytes)], n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let (name, data) = &chunks[i % chunks.len()];
        let t = Instant::now();
        let got = az.get(name).await.unwrap();
        lat.push(t.elapsed());
        assert_eq!(got.as_ref(), Some(data), "read {i}");
    }
    lat.sort();
    lat
}

fn delta(a: &AzMetrics, b: &AzMetrics) -> (u64, u64, u64, u64, u64) {
    (
        b.gets - a.gets,
        b.stripe_requests - a.stripe_requests,
        b.hedges - a.hedges,
        b.fallbacks - a.fallbacks,
        b.stripe_bytes - a.stripe_bytes,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_read_asks_only_the_data_stripes() {
    let fleet = Fleet::start().await;
    let az = AzClient::new(fleet.config(Hedge::Off)).unwrap();
    let cs = chunks(12);
    put_all(&az, &cs).await;
    let before = az.metrics();
    timed_reads(&az, &cs, 48).await;
    let m = az.metrics();
    let (gets, requests, hedges, fallbacks, bytes) = delta(&before, &m);
    assert_eq!((gets, requests, hedges, fallbacks), (48, 4 * 48, 0, 0));
    // Four stripes of a quarter chunk each (plus headers): one chunk's bytes, not 1.5.
    let stripe = 48 + CHUNK.div_ceil(4) as u64;
    assert_eq!(bytes, 48 * 4 * stripe);
    assert_eq!(m.rebuilds, 0, "a healthy read decoded: {m:?}");

    // `all` asks all six and decodes whenever a parity stripe is among the first four.
    let all = AzClient::new(fleet.config(Hedge::All)).unwrap();
    timed_reads(&all, &cs, 24).await;
    assert_eq!(all.metrics().stripe_requests, 6 * 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_is_hedged_around() {
    let fleet = Fleet::start().await;
    let az = AzClient::new(fleet.config(Hedge::P95)).unwrap();
    let cs = chunks(24);
    put_all(&az, &cs).await;
    // Fill the latency windows while every node is fast.
    timed_reads(&az, &cs, 96).await;
    let warm = az.metrics();
    assert!(warm.hedge_delay_us >= 250 && warm.hedge_delay_us < 200_000);

    let slow = Duration::from_millis(200);
    fleet.slow(0, slow);
    let lat = timed_reads(&az, &cs, 96).await;
    let m = az.metrics();
    let (_, requests, hedges, _, _) = delta(&warm, &m);
    let skips = m.slow_skips - warm.slow_skips;
    let (p50, p99) = (quantile(&lat, 500), quantile(&lat, 990));
    println!(
        "p95 hedging, node 0 slowed by {slow:?}: p50 {p50:?} p99 {p99:?}, {hedges} hedges, \
         {skips} reads that asked it last, {requests} stripe requests for 96 reads, hedge \
         delay {} µs",
        m.hedge_delay_us
    );
    // Node 0 holds a data stripe of about two thirds of the chunks: without hedging,
    // those reads would wait for it.
    assert!(p99 < slow / 2, "p99 {p99:?} with a node {slow:?} slow");
    // Hedged around once, then asked last (by seven reads in eight, the eighth hedging
    // around it again).
    assert!(hedges >= 1, "{hedges} hedges");
    assert!(
        hedges + skips >= 30,
        "{hedges} hedges, {skips} reads around it"
    );
    // The slow node stays up: slow is not dead.
    assert!(m.nodes[0].up);
    assert_eq!(m.misses, 0);

    // The same with hedging off: reads wait for the slow node.
    let off = AzClient::new(fleet.config(Hedge::Off)).unwrap();
    let lat = timed_reads(&off, &cs, 24).await;
    assert!(quantile(&lat, 990) >= slow, "{:?}", quantile(&lat, 990));
    assert_eq!(off.metrics().hedges, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_read_around_in_every_mode() {
    let mut fleet = Fleet::start().await;
    let cs = chunks(12);
    let modes = [Hedge::P95, Hedge::Off, Hedge::All];
    let clients: Vec<AzClient> = modes
        .iter()
        .map(|&h| AzClient::new(fleet.config(h)).unwrap())
        .collect();
    put_all(&clients[0], &cs).await;
    // Warm: a p95 client with no latencies yet asks every node.
    for az in &clients {
        timed_reads(az, &cs, 24).await;
    }
    fleet.kill(2);
    for (az, hedge) in clients.iter().zip(modes) {
        let before = az.metrics();
        timed_reads(az, &cs, 36).await;
        let m = az.metrics();
        assert_eq!((m.hits - before.hits, m.misses), (36, 0), "{hedge}: {m:?}");
        assert!(!m.nodes[2].up, "{hedge}: the dead node is marked down");
        if hedge == Hedge::Off {
            // The reads that asked the dead node asked another instead. (A p95 read may
            // have put it last already, if it was ever late.)
            assert!(m.fallbacks - before.fallbacks >= 3, "{hedge}: {m:?}");
        }
        assert!(m.rebuilds > before.rebuilds, "{hedge}: {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_chunk_is_a_miss_in_every_mode() {
    let fleet = Fleet::start().await;
    for hedge in [Hedge::P95, Hedge::Off, Hedge::All] {
        let az = AzClient::new(fleet.config(hedge)).unwrap();
        let (name, _) = chunk(1, CHUNK);
        assert_eq!(az.get(&name).await.unwrap(), None);
        let m = az.metrics();
        assert_eq!((m.gets, m.misses), (1, 1), "{hedge}");
    }
}

/// The healthy p50 of one stripe request (a 128 KiB value straight from a node).
async fn stripe_p50(fleet: &Fleet, az: &AzClient, cs: &[(ChunkName, Bytes)]) -> Duration {
    let mut lat = Vec::new();
    let addrs = fleet.addrs();
    let mut conns = Vec::new();
    for a in &addrs {
        conns.push(Connection::connect(a, 2 << 20).await.unwrap());
    }
    for i in 0..300 {
        let (name, _) = &cs[i % cs.len()];
        let node = az.placement(name)[i % 4].to_owned();
        let c = &mut conns[addrs.iter().position(|a| *a == node).unwrap()];
        let t = Instant::now();
        assert!(c.get(&az.key(name)).await.unwrap().is_some());
        lat.push(t.elapsed());
    }
    lat.sort();
    quantile(&lat, 500)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
async fn hedging_figures() {
    let fleet = Fleet::start().await;
    let cs = chunks(32);
    let loader = AzClient::new(fleet.config(Hedge::All)).unwrap();
    put_all(&loader, &cs).await;
    let p50 = stripe_p50(&fleet, &loader, &cs).await;
    let delay = (p50 * 10).max(Duration::from_millis(5));
    println!(
        "healthy stripe p50 {p50:?} (128 KiB, six lode cache nodes behind proxies on loopback); \
         slow node delay = max(10 x p50, 5 ms) = {delay:?}"
    );
    println!(
        "{:<7} {:<9} {:>9} {:>9} {:>9} {:>11} {:>12} {:>8} {:>8}",
        "hedge",
        "fleet",
        "p50 µs",
        "p99 µs",
        "mean µs",
        "req/read",
        "KiB/read",
        "hedges",
        "rebuilt"
    );
    // The three modes read in turn, one read each, so that whatever else the machine is
    // doing falls on all three alike.
    let modes = [Hedge::All, Hedge::Off, Hedge::P95];
    for slowed in [false, true] {
        fleet.slow(0, if slowed { delay } else { Duration::ZERO });
        let clients: Vec<AzClient> = modes
            .iter()
            .map(|&h| AzClient::new(fleet.config(h)).unwrap())
            .collect();
        // Warm the connections and the latency windows with the fleet as it is.
        for az in &clients {
            timed_reads(az, &cs, 64).await;
        }
        let before: Vec<AzMetrics> = clients.iter().map(AzClient::metrics).collect();
        let n = 600;
        let mut lat = vec![Vec::with_capacity(n); modes.len()];
        for i in 0..n {
            let (name, data) = &cs[i % cs.len()];
            for (c, az) in clients.iter().enumerate() {
                let t = Instant::now();
                let got = az.get(name).await.unwrap();
                lat[c].push(t.elapsed());
                assert_eq!(got.as_ref(), Some(data));
            }
        }
        for (c, az) in clients.iter().enumerate() {
            let lat = &mut lat[c];
            lat.sort();
            let m = az.metrics();
            let (gets, requests, hedges, _, bytes) = delta(&before[c], &m);
            let mean = lat.iter().sum::<Duration>() / u32::try_from(n).unwrap();
            println!(
                "{:<7} {:<9} {:>9} {:>9} {:>9} {:>11.2} {:>12.1} {:>8} {:>8} {:>8} {:>9}",
                modes[c].to_string(),
                if slowed { "one slow" } else { "healthy" },
                quantile(lat, 500).as_micros(),
                quantile(lat, 990).as_micros(),
                mean.as_micros(),
                requests as f64 / gets as f64,
                bytes as f64 / gets as f64 / 1024.0,
                hedges,
                m.rebuilds - before[c].rebuilds,
                m.slow_skips - before[c].slow_skips,
                m.hedge_delay_us,
            );
        }
    }
}
