//! Fetching ahead of demand against a real published image: the working set in order,
//! bounded, out of demand's way; readahead; the used and wasted accounting; recording;
//! and independent demand misses overlapping at a slow origin.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use common::{CHUNK, Fixture};
use lode_blockdev::BlockDevice;
use lode_format::ChunkIndex;
use lode_read::{
    ChunkCache, ChunkOrigin, ChunkRef, ImageDevice, MemoryTier, Prefetch, PrefetchConfig,
    PrefetchCounters, Prefetcher, ReadError, StoreOrigin,
};

/// The origin with a delay per fetch (a round trip), logging the order of fetches and
/// the most in flight at once; `hold` makes it say it is busy.
#[derive(Debug)]
struct Slow {
    inner: StoreOrigin,
    delay: Duration,
    order: Mutex<Vec<u64>>,
    now: AtomicUsize,
    peak: AtomicUsize,
    hold: AtomicBool,
}

impl Slow {
    fn new(fx: &Fixture, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: StoreOrigin::new(fx.store.clone()),
            delay,
            order: Mutex::new(Vec::new()),
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            hold: AtomicBool::new(false),
        })
    }

    fn order(&self) -> Vec<u64> {
        self.order.lock().unwrap().clone()
    }
}

#[async_trait]
impl ChunkOrigin for Slow {
    fn busy(&self) -> bool {
        self.hold.load(Ordering::SeqCst) || self.inner.busy()
    }

    async fn fetch(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError> {
        self.order.lock().unwrap().push(chunk.index.0);
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let r = self.inner.fetch(chunk).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

struct Setup {
    fx: Fixture,
    origin: Arc<Slow>,
    cache: Arc<ChunkCache>,
    dev: Arc<ImageDevice>,
    p: Arc<Prefetch>,
}

async fn setup(delay_ms: u64, config: PrefetchConfig, record: bool) -> Setup {
    let fx = Fixture::new().await;
    let origin = Slow::new(&fx, Duration::from_millis(delay_ms));
    let cache = fx.cache_with(vec![Arc::new(MemoryTier::new(64 << 20))], origin.clone());
    let p = Prefetch::new(
        Prefetcher::new(config).unwrap(),
        Arc::new(PrefetchCounters::default()),
        record,
    );
    let dev = Arc::new(fx.device(&cache).await.with_prefetch(Arc::clone(&p)));
    Setup {
        fx,
        origin,
        cache,
        dev,
        p,
    }
}

fn config(concurrency: usize) -> PrefetchConfig {
    PrefetchConfig {
        concurrency,
        ..PrefetchConfig::default()
    }
}

fn chunks(c: &[u64]) -> Vec<ChunkIndex> {
    c.iter().map(|i| ChunkIndex(*i)).collect()
}

/// Waits until `n` working-set chunks were fetched ahead (or fails after 10 s).
async fn until_prefetched(p: &Prefetch, n: u64) {
    let t = Instant::now();
    while p.counters().snapshot().working_set.chunks < n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{:?}",
            p.counters().snapshot()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn read(dev: &ImageDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    dev.read_at(offset, &mut buf).await.unwrap();
    buf
}

fn slice(fx: &Fixture, offset: u64, len: usize) -> &[u8] {
    let o = usize::try_from(offset).unwrap();
    &fx.image[o..o + len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_working_set_is_fetched_in_order_skipping_zero_and_duplicate_chunks() {
    let s = setup(5, config(1), false).await;
    // 3 and 7 are zero chunks; 0 holds what 5 holds, so fetching 5 already brought it.
    s.p.run_working_set(&s.dev, &chunks(&[8, 3, 2, 6, 1, 7, 5, 0]))
        .await;
    until_prefetched(&s.p, 5).await;
    s.cache.settle().await;
    assert_eq!(s.origin.order(), vec![8, 2, 6, 1, 5]);
    let ws = s.p.counters().snapshot().working_set;
    assert_eq!((ws.chunks, ws.bytes, ws.errors), (5, 5 * CHUNK, 0));
    assert_eq!(ws.pending_bytes, 5 * CHUNK);
    // Every chunk is now local: reads fetch nothing more, and read the right bytes.
    for i in [8u64, 2, 6, 1, 5, 0] {
        assert_eq!(
            read(&s.dev, i * CHUNK, 4096).await,
            slice(&s.fx, i * CHUNK, 4096)
        );
    }
    assert_eq!(s.origin.order().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_runs_at_most_its_concurrency_at_once() {
    let s = setup(60, config(2), false).await;
    s.p.run_working_set(&s.dev, &chunks(&[0, 1, 2, 4, 6, 8]))
        .await;
    until_prefetched(&s.p, 6).await;
    assert_eq!(s.origin.peak.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demand_read_does_not_wait_behind_the_working_set() {
    let delay = 150;
    let s = setup(delay, config(1), false).await;
    let (p, dev) = (Arc::clone(&s.p), Arc::clone(&s.dev));
    let ws = tokio::spawn(async move {
        p.run_working_set(&dev, &chunks(&[0, 1, 2, 4, 6, 8])).await;
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Chunk 8 is last in the set: behind five prefetches of 150 ms each it would take
    // 900 ms; as a demand read it takes one round trip.
    let t = Instant::now();
    assert_eq!(
        read(&s.dev, 8 * CHUNK, 4096).await,
        slice(&s.fx, 8 * CHUNK, 4096)
    );
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(3 * delay),
        "the demand read took {took:?}"
    );
    ws.await.unwrap();
    until_prefetched(&s.p, 5).await;
    // It was read before the prefetch reached it, so the prefetch skipped it.
    assert_eq!(
        s.origin.order().iter().filter(|i| **i == 8).count(),
        1,
        "{:?}",
        s.origin.order()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_holds_back_while_the_origin_is_busy() {
    let s = setup(1, config(1), false).await;
    s.origin.hold.store(true, Ordering::SeqCst);
    let (p, dev) = (Arc::clone(&s.p), Arc::clone(&s.dev));
    let ws = tokio::spawn(async move {
        p.run_working_set(&dev, &chunks(&[0, 1, 2])).await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.origin.order().is_empty(), "{:?}", s.origin.order());
    // A demand read goes on regardless.
    assert_eq!(
        read(&s.dev, 4 * CHUNK, 100).await,
        slice(&s.fx, 4 * CHUNK, 100)
    );
    assert_eq!(s.origin.order(), vec![4]);
    s.origin.hold.store(false, Ordering::SeqCst);
    ws.await.unwrap();
    until_prefetched(&s.p, 3).await;
    assert_eq!(s.origin.order(), vec![4, 0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_and_wasted_bytes_are_counted() {
    let s = setup(1, config(4), false).await;
    s.p.run_working_set(&s.dev, &chunks(&[0, 1, 2])).await;
    until_prefetched(&s.p, 3).await;
    // Two of the three are read (one twice: counted once), the third never.
    for (o, l) in [(10, 5000), (CHUNK + 7, 100), (20, 4096)] {
        assert_eq!(read(&s.dev, o, l).await, slice(&s.fx, o, l));
    }
    let ws = s.p.counters().snapshot().working_set;
    assert_eq!(
        (ws.used_bytes, ws.wasted_bytes, ws.pending_bytes),
        (2 * CHUNK, 0, CHUNK)
    );
    s.p.close();
    let ws = s.p.counters().snapshot().working_set;
    assert_eq!(
        (ws.used_bytes, ws.wasted_bytes, ws.pending_bytes),
        (2 * CHUNK, CHUNK, 0)
    );
    // After the attachment ends nothing more is fetched ahead.
    s.p.run_working_set(&s.dev, &chunks(&[4, 6])).await;
    let mut order = s.origin.order();
    order.sort_unstable();
    assert_eq!(order, vec![0, 1, 2]);
}

/// A chunk fetched ahead and evicted before a read came is wasted, not used: the read
/// fetched it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_evicted_before_its_read_is_wasted() {
    let s = setup(1, config(4), false).await;
    s.p.run_working_set(&s.dev, &chunks(&[0, 1])).await;
    until_prefetched(&s.p, 2).await;
    s.cache.settle().await;
    s.cache.drop_memory();
    read(&s.dev, 100, 100).await;
    let ws = s.p.counters().snapshot().working_set;
    assert_eq!(
        (ws.used_bytes, ws.wasted_bytes, ws.pending_bytes),
        (0, CHUNK, CHUNK)
    );
    assert_eq!(s.origin.order().iter().filter(|i| **i == 0).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_fetch_the_next_chunks_ahead() {
    let s = setup(20, config(4), false).await;
    let step = 128u64 << 10;
    // Read chunks 0 to 2 sequentially, 128 KiB at a time.
    for k in 0..(3 * CHUNK / step) {
        let o = k * step;
        assert_eq!(read(&s.dev, o, 131072).await, slice(&s.fx, o, 131072));
    }
    // Those the reader has not reached yet may still be on their way.
    let t = Instant::now();
    while s.p.counters().snapshot().readahead.chunks < 3 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ra = s.p.counters().snapshot().readahead;
    // Chunk 1 was asked for 256 KiB ahead of the reader, which may reach it first (then
    // the read fetches it and readahead counts nothing); chunk 2 came ahead of the reader,
    // and so did 4 and 6 beyond it (3 is zero, 5 is chunk 0 again, already here).
    assert!(ra.chunks >= 3, "{ra:?}");
    assert!(ra.used_bytes >= CHUNK, "{ra:?}");
    assert!(ra.pending_bytes >= 2 * CHUNK, "{ra:?}");
    assert_eq!(ra.errors, 0);
    let order = s.origin.order();
    assert!(order.contains(&4) && order.contains(&6), "{order:?}");
    assert!(!order.contains(&3), "a zero chunk was fetched: {order:?}");
    // Random reads start nothing.
    let s = setup(1, config(4), false).await;
    for i in [8u64, 0, 6, 2] {
        read(&s.dev, i * CHUNK + 5000, 4096).await;
    }
    assert_eq!(s.p.counters().snapshot().readahead.chunks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_touches_are_recorded_until_the_cap() {
    let s = setup(1, config(4), true).await;
    assert!(s.p.recording());
    for i in [2u64, 0, 2, 3, 8] {
        read(&s.dev, i * CHUNK, 512).await;
    }
    // Chunk 3 is zero (nothing to fetch), and 2 is listed once.
    let rec = s.p.take_recording().unwrap();
    assert_eq!(rec.chunks, chunks(&[2, 0, 8]));
    assert!(!s.p.recording());
    assert!(s.p.take_recording().is_none());

    let s = setup(
        1,
        PrefetchConfig {
            record_max_chunks: 2,
            ..config(4)
        },
        true,
    )
    .await;
    let p = Arc::clone(&s.p);
    let done = tokio::spawn(async move { p.recorded().await });
    for i in [6u64, 1, 4] {
        read(&s.dev, i * CHUNK, 512).await;
    }
    // The cap ends the recording at once, long before its 10 s window.
    let rec = tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(rec.chunks, chunks(&[6, 1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_ends_with_its_window() {
    let s = setup(
        1,
        PrefetchConfig {
            record_window: Duration::from_millis(200),
            ..config(4)
        },
        true,
    )
    .await;
    read(&s.dev, 0, 512).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    read(&s.dev, CHUNK, 512).await;
    let rec = tokio::time::timeout(Duration::from_secs(5), s.p.recorded())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.chunks, chunks(&[0]));
}

/// Independent misses of one start overlap: N chunks read at once from an origin 100 ms
/// away take about one round trip, not N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_demand_misses_overlap_at_the_origin() {
    let delay = 100;
    let s = setup(delay, config(4), false).await;
    let stored = [0u64, 1, 2, 4, 6, 8];
    let t = Instant::now();
    let reads = stored.iter().map(|&i| {
        let dev = Arc::clone(&s.dev);
        async move { (i, read(&dev, i * CHUNK + 4096, 8192).await) }
    });
    for (i, got) in futures::future::join_all(reads).await {
        assert_eq!(got, slice(&s.fx, i * CHUNK + 4096, 8192));
    }
    let took = t.elapsed();
    assert_eq!(s.origin.peak.load(Ordering::SeqCst), stored.len());
    assert!(
        took < Duration::from_millis(3 * delay),
        "{} misses took {took:?}",
        stored.len()
    );
    // One read spanning them all overlaps its chunks too.
    let s = setup(delay, config(4), false).await;
    let t = Instant::now();
    let len = usize::try_from(9 * CHUNK).unwrap();
    assert_eq!(read(&s.dev, 0, len).await, slice(&s.fx, 0, len));
    let took = t.elapsed();
    assert!(took < Duration::from_millis(3 * delay), "took {took:?}");
}
