//! Latency of one 512 KiB chunk (524 304 bytes of ciphertext) fetched through the AZ
//! client from six memcached nodes on loopback, for k = 4 m = 2, k = 4 m = 1 and one
//! whole copy (k = 1 m = 0), beside the yardstick: the same bytes as one plain
//! memcached value read over one connection, with no stripes and no checks.
//!
//! ```text
//! cargo bench -p lode-az --bench fetch                   # 3 s per run
//! LODE_BENCH_SECS=10 cargo bench -p lode-az --bench fetch
//! ```
//!
//! Each run reads 64 chunks round-robin, first one read at a time (latency: p50, p99,
//! p99.9), then eight at a time (throughput). Every AZ read is rebuilt and checked
//! against its name (SHA-256), as the client always does; the plain get is not. Last,
//! k = 4 m = 2 again with one node stopped (SIGSTOP) for the whole run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_az::AzClient;
use lode_az::memcache::Connection;
use lode_format::ChunkName;
use tokio::task::JoinSet;

const CHUNK: usize = 512 * 1024 + 16;
const CHUNKS: usize = 64;
const CONCURRENCY: usize = 8;

fn secs() -> Duration {
    let s = std::env::var("LODE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(s)
}

struct Figures {
    lat: Vec<Duration>,
    reads_per_s: f64,
}

impl Figures {
    fn show(&self, what: &str) {
        let q = |pm| common::quantile(&self.lat, pm).as_secs_f64() * 1e6;
        println!(
            "{what:<28} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>10.2}",
            q(500),
            q(990),
            q(999),
            self.reads_per_s,
            self.reads_per_s * CHUNK as f64 / 1e9
        );
    }
}

/// Sequential reads for `time`, then `CONCURRENCY` readers for `time`.
async fn measure<F, Fut>(time: Duration, read: F) -> Figures
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    for i in 0..CHUNKS * 2 {
        read(i).await;
    }
    let mut lat = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < time {
        let t = Instant::now();
        read(i).await;
        lat.push(t.elapsed());
        i += 1;
    }
    lat.sort();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for r in 0..CONCURRENCY {
        let read = read.clone();
        tasks.spawn(async move {
            let mut n = 0usize;
            while start.elapsed() < time {
                read(r * 7919 + n).await;
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    Figures {
        lat,
        reads_per_s: total as f64 / start.elapsed().as_secs_f64(),
    }
}

fn main() {
    let Some(fleet) = common::fleet(6) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let time = secs();
    rt.block_on(async {
        let chunks: Arc<Vec<(ChunkName, Bytes)>> = Arc::new(
            (0..CHUNKS as u64)
                .map(|i| common::chunk(i, CHUNK))
                .collect(),
        );
        let codes = [(4, 2), (4, 1), (1, 0)];
        let mut clients = Vec::new();
        for (k, m) in codes {
            let mut cfg = common::config(&fleet, Duration::from_millis(200));
            (cfg.k, cfg.m) = (k, m);
            let az = AzClient::new(cfg).unwrap();
            for (name, data) in chunks.iter() {
                az.put(name, data.clone()).await.unwrap();
            }
            clients.push(az);
        }
        // The yardstick: each chunk as one plain value on node 0.
        {
            let mut c = Connection::connect(&fleet[0].addr().to_string(), 1 << 20)
                .await
                .unwrap();
            for (name, data) in chunks.iter() {
                c.set(&format!("plain:{name}"), 0, data).await.unwrap();
            }
        }
        println!(
            "one {CHUNK}-byte chunk from memcached on loopback ({time:?} per run; throughput \
             with {CONCURRENCY} readers)"
        );
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "", "p50 µs", "p99 µs", "p99.9 µs", "reads/s", "GB/s"
        );
        for (az, (k, m)) in clients.iter().zip(codes) {
            let (az, chunks) = (az.clone(), Arc::clone(&chunks));
            let figures = measure(time, move |i| {
                let (az, chunks) = (az.clone(), Arc::clone(&chunks));
                async move {
                    let (name, data) = &chunks[i % CHUNKS];
                    let got = az.get(name).await.unwrap();
                    assert_eq!(got.as_ref().map(Bytes::len), Some(data.len()));
                }
            })
            .await;
            figures.show(&format!("AZ client k={k} m={m}"));
        }
        let addr = fleet[0].addr().to_string();
        let pool = Arc::new(tokio::sync::Mutex::new(Vec::<Connection>::new()));
        let chunks2 = Arc::clone(&chunks);
        let figures = measure(time, move |i| {
            let (pool, chunks, addr) = (Arc::clone(&pool), Arc::clone(&chunks2), addr.clone());
            async move {
                let popped = pool.lock().await.pop();
                let mut c = match popped {
                    Some(c) => c,
                    None => Connection::connect(&addr, 1 << 20).await.unwrap(),
                };
                let (name, data) = &chunks[i % CHUNKS];
                let got = c.get(&format!("plain:{name}")).await.unwrap();
                assert_eq!(got.as_ref().map(Bytes::len), Some(data.len()));
                pool.lock().await.push(c);
            }
        })
        .await;
        figures.show("plain memcached get");

        // One node stopped (SIGSTOP) under k = 4, m = 2: reads finish with the other
        // five; after three timeouts (200 ms) the node is marked down and skipped.
        fleet[2].pause();
        let (az, chunks2) = (clients[0].clone(), Arc::clone(&chunks));
        let figures = measure(time, move |i| {
            let (az, chunks) = (az.clone(), Arc::clone(&chunks2));
            async move {
                let (name, data) = &chunks[i % CHUNKS];
                let got = az.get(name).await.unwrap();
                assert_eq!(got.as_ref().map(Bytes::len), Some(data.len()));
            }
        })
        .await;
        fleet[2].resume();
        figures.show("k=4 m=2, one node stopped");
        for az in &clients {
            let m = az.metrics();
            assert_eq!(m.misses, 0);
            assert_eq!(m.integrity_failures, 0);
        }
    });
}
