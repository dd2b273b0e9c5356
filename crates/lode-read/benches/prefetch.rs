//! A cold start against a distant origin, demand-only beside working-set prefetch.
//!
//! The image and its working set come from a real store: flatten an image, start it once
//! through an agent so that its first start records its working set, then point this at
//! the store (the CLI's defaults shown):
//!
//! ```text
//! export LODE_HOME=/tmp/pf/home
//! lode flatten oci:/var/tmp/lode-family/family:python --tag python
//! lode agent & lode run python -- python3 -c 'import sys'; kill %1
//! BENCH_STORE=$LODE_HOME/store BENCH_KEYRING=$LODE_HOME/keyring.json BENCH_IMAGE=python \
//!   cargo bench -p lode-read --bench prefetch
//! ```
//!
//! Each run has a fresh cache (memory tier only) over the store behind an origin that
//! waits `BENCH_DELAY_MS` (default 20) before each fetch, as a store that far away would.
//! The start is replayed from the record: 4 KiB at the start of each recorded chunk, in
//! the recorded order, each read after the last (a start's reads mostly depend on the one
//! before: the loader maps the binary, then its libraries, then the interpreter imports
//! module after module). Modes:
//!
//! - **demand**: no prefetch: one origin round trip per chunk, one after another;
//! - **prefetch**: the working set fetched ahead as an attach does (in record order,
//!   `BENCH_PREFETCH` at once, default 16) while the same reads run;
//! - **concurrent demand**: every recorded chunk read at once, no prefetch: what
//!   overlapping independent misses costs (about one round trip).
//!
//! Prints one line per mode: the median of `BENCH_ROUNDS` (default 5) runs, in ms, and
//! the origin fetches of the last run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use lode_blockdev::BlockDevice;
use lode_format::ChunkIndex;
use lode_kms::Keyring;
use lode_read::{
    CacheBuilder, ChunkOrigin, ChunkRef, ImageDevice, MemoryTier, Prefetch, PrefetchConfig,
    PrefetchCounters, Prefetcher, ReadError, StoreOrigin,
};
use lode_store::Store;

#[derive(Debug)]
struct Distant {
    inner: StoreOrigin,
    delay: Duration,
    fetches: AtomicU64,
}

#[async_trait]
impl ChunkOrigin for Distant {
    fn busy(&self) -> bool {
        self.inner.busy()
    }

    async fn fetch(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.delay).await;
        self.inner.fetch(chunk).await
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Demand,
    Prefetch,
    ConcurrentDemand,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_u64(name: &str, default: u64) -> u64 {
    env(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

struct Bench {
    store: Store,
    kms: Keyring,
    image: String,
    delay: Duration,
    concurrency: usize,
}

impl Bench {
    /// One cold start in `mode`: its time and the origin fetches it made.
    async fn run(&self, mode: Mode, chunks: &[ChunkIndex]) -> (Duration, u64) {
        let origin = Arc::new(Distant {
            inner: StoreOrigin::new(self.store.clone()),
            delay: self.delay,
            fetches: AtomicU64::new(0),
        });
        let cache = CacheBuilder::new()
            .tier(Arc::new(MemoryTier::new(1 << 30)))
            .origin(origin.clone())
            .build()
            .expect("cache");
        let opened = lode_read::open_image(&self.store, Some(&self.kms), &self.image)
            .await
            .expect("open the image");
        let p = Prefetch::new(
            Prefetcher::new(PrefetchConfig {
                concurrency: self.concurrency,
                readahead_max_chunks: 0,
                ..PrefetchConfig::default()
            })
            .expect("prefetch config"),
            Arc::new(PrefetchCounters::default()),
            false,
        );
        let dev = Arc::new(
            ImageDevice::new(cache.clone(), opened)
                .expect("device")
                .with_prefetch(Arc::clone(&p)),
        );
        let started = Instant::now();
        if mode == Mode::Prefetch {
            let (p, dev, chunks) = (Arc::clone(&p), Arc::clone(&dev), chunks.to_vec());
            tokio::spawn(async move { p.run_working_set(&dev, &chunks).await });
        }
        let cs = dev.chunk_size().bytes_u64();
        if mode == Mode::ConcurrentDemand {
            let reads = chunks.iter().map(|c| {
                let dev = Arc::clone(&dev);
                async move {
                    let mut buf = vec![0u8; 4096];
                    dev.read_at(c.0 * cs, &mut buf).await.expect("read");
                }
            });
            futures::future::join_all(reads).await;
        } else {
            let mut buf = vec![0u8; 4096];
            for c in chunks {
                dev.read_at(c.0 * cs, &mut buf).await.expect("read");
            }
        }
        let took = started.elapsed();
        p.close();
        cache.settle().await;
        (took, origin.fetches.load(Ordering::Relaxed))
    }
}

fn main() {
    let (Some(store), Some(keyring), Some(image)) =
        (env("BENCH_STORE"), env("BENCH_KEYRING"), env("BENCH_IMAGE"))
    else {
        println!(
            "skipped: set BENCH_STORE, BENCH_KEYRING and BENCH_IMAGE (see the top of benches/prefetch.rs)"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bench = Bench {
            store: Store::open(&store).expect("open the store"),
            kms: Keyring::open_or_create(keyring.into()).expect("open the keyring"),
            image,
            delay: Duration::from_millis(env_u64("BENCH_DELAY_MS", 20)),
            concurrency: usize::try_from(env_u64("BENCH_PREFETCH", 16)).expect("fits"),
        };
        let opened = lode_read::open_image(&bench.store, Some(&bench.kms), &bench.image)
            .await
            .expect("open the image");
        let keys = opened.keys.as_ref().expect("keys");
        let n = opened.manifest.chunks().len() as u64;
        let ws = lode_read::load_working_set(&bench.store, opened.root, &opened.id, n, keys)
            .await
            .expect("read the working set")
            .expect("the image has no working set: start it once through an agent")
            .expect("the working set opens");
        println!(
            "image {} ({} chunks), working set {} chunks, origin {} ms away, prefetch {} at once",
            bench.image,
            n,
            ws.chunks.len(),
            bench.delay.as_millis(),
            bench.concurrency
        );
        let rounds = env_u64("BENCH_ROUNDS", 5);
        for mode in [Mode::Demand, Mode::Prefetch, Mode::ConcurrentDemand] {
            let mut times = Vec::new();
            let mut fetches = 0;
            for _ in 0..rounds {
                let (t, f) = bench.run(mode, &ws.chunks).await;
                times.push(t);
                fetches = f;
            }
            times.sort();
            let median = times[times.len() / 2];
            println!(
                "{:<18} median {:>8.1} ms (min {:>7.1}, max {:>7.1}), {} origin fetches",
                format!("{mode:?}"),
                median.as_secs_f64() * 1e3,
                times[0].as_secs_f64() * 1e3,
                times[times.len() - 1].as_secs_f64() * 1e3,
                fetches
            );
        }
    });
}
