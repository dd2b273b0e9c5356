//! Memory snapshot restore through lode's page-fault handler, tier by tier: how long a
//! fault takes to serve, how long a restore takes to answer queries lazily, with the
//! recorded working set prefetched (REAP), and eagerly (CRIU-style: every chunk first),
//! and which chunk size fetches least. The handler fetches and installs a segment at a
//! time (32 KiB, two a 64 KiB chunk, for the v2 chunks published here).
//!
//! ```text
//! CARGO_TARGET_DIR=target-bench cargo bench -p lode-snap --bench restore
//! RUNS=3 SNAP_MIB=128 KEYS=150000 QUERIES=1000 cargo bench -p lode-snap --bench restore
//! ```
//!
//! One process plays every part: the handler on a two-thread Tokio runtime, six AZ cache
//! nodes on a runtime of their own, and the VMM (lode's client) on the main thread, which
//! maps guest memory, hands its userfaultfd to the handler and runs the index workload on
//! it. The store is a local directory, so "origin" is lode's own cost of a chunk (read,
//! check, decrypt, install) without a network. Tier states, each checked against the
//! cache's per-tier hit counters (a run served by another tier stops the bench):
//!
//! ```text
//! origin   fresh state dir, no AZ fleet                    → every chunk from the store
//! az       fresh state dir, fleet filled by an earlier worker → every chunk from the fleet
//! disk     new cache over a state dir holding every chunk  → every chunk from local disk
//! memory   the disk worker again after an eager pass       → every chunk decrypted in memory
//! ```
//!
//! Knobs (environment): RUNS (5), SNAP_MIB (256), KEYS (300000), QUERIES (2000). The query
//! seed is fixed, so every restore touches the same pages and the recorded working set
//! is exactly the next restore's. Everything lives in one temporary directory (under
//! TMPDIR), about 1 GB of cache files a run, deleted at the end. On ext4 without a
//! journal a new inode skips every inode freed in the last minutes, so a second bench
//! started within ~5 minutes of the first one's clean-up pays kernel time on each cache
//! file it creates (origin and AZ restores fill the disk cache); wait, or set
//! TMPDIR=/dev/shm to take the filesystem out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache::CacheConfig;
use futures::StreamExt;
use lode_format::ChunkSize;
use lode_image::{NoProgress, PublishOptions, PublishStats, Publisher};
use lode_kms::{Keyring, Kms};
use lode_read::{ChunkCache, MetricsSnapshot};
use lode_snap::handler::bind;
use lode_snap::{Prefetch, RecordPolicy, ServeOptions, SessionReport, Snapshot, client, workload};
use lode_store::Store;

#[path = "../tests/common/cache.rs"]
mod cache;

/// The query seed: fixed, so the working set repeats from restore to restore.
const SEED: u64 = 0x5eed_f00d;
/// The chunk size of the tier and mode runs: the snapshot default.
const MAIN_CHUNK: u64 = lode_snap::DEFAULT_CHUNK_SIZE as u64;
/// The chunk sizes swept. 4 KiB (one page a chunk) is the reference: each page the
/// workload touches faults once and fetches itself alone, so its faults count the
/// touched pages.
const SWEEP: [u64; 5] = [4 << 10, 16 << 10, 64 << 10, 128 << 10, 512 << 10];
/// Chunks fetched at once by the eager restore (and by the handler's prefetch).
const EAGER_CONCURRENCY: usize = 16;
const PAGE: u64 = 4096;
const MIB: f64 = 1024.0 * 1024.0;

fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

fn tag(chunk: u64) -> String {
    format!("snap-{}k", chunk >> 10)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Memory,
    Disk,
    Az,
    Origin,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Az => "az",
            Tier::Origin => "origin",
        }
    }

    /// The cache tier whose hit counter must account for every chunk.
    fn served_by(self) -> &'static str {
        match self {
            Tier::Memory => "decrypted",
            Tier::Disk => "disk",
            Tier::Az => "az",
            Tier::Origin => "origin",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Lazy,
    Prefetch,
    Eager,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Lazy => "lazy",
            Mode::Prefetch => "lazy+prefetch",
            Mode::Eager => "eager",
        }
    }
}

/// Everything shared by the runs: the store holding the snapshot at every swept chunk
/// size, the AZ fleet, and the runtimes.
struct Bench {
    rt: tokio::runtime::Runtime,
    node_rt: tokio::runtime::Runtime,
    nodes: Vec<lode_cache_node::NodeHandle>,
    fleet: Vec<String>,
    dir: tempfile::TempDir,
    store: Store,
    kms: Keyring,
    size: u64,
    queries: u64,
    fresh: u32,
}

/// One handler (one set of serve options) on a worker's snapshot.
struct Served {
    socket: PathBuf,
    reports: Arc<Mutex<Vec<SessionReport>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A worker: a chunk cache over a state dir, the snapshot opened through it, and one
/// handler per way of serving.
struct Worker {
    cache: Arc<ChunkCache>,
    snapshot: Arc<Snapshot>,
    lazy: Served,
    prefetch: Served,
    record: Served,
}

/// What one restore did.
#[derive(Clone, Debug, Default)]
struct Sample {
    faults: u64,
    zero_faults: u64,
    /// Segments fetched on demand and prefetched (the handler's unit).
    demand: u64,
    prefetched: u64,
    /// Distinct chunks those segments came from.
    demand_chunks: u64,
    prefetched_chunks: u64,
    segment_bytes: u64,
    ws_pages: u64,
    p50: Option<u32>,
    p99: Option<u32>,
    first: Duration,
    all: Duration,
    /// Bytes the serving tier returned (ciphertext; plaintext for `decrypted`).
    tier_bytes: u64,
    tier_hits: u64,
}

impl Bench {
    fn fresh_dir(&mut self) -> PathBuf {
        self.fresh += 1;
        self.dir.path().join(format!("state-{}", self.fresh))
    }

    /// A worker over `state`, with the AZ fleet as a tier when `az`.
    fn worker(&self, state: &Path, az: bool, chunk: u64) -> Worker {
        let size = self.size;
        let mut cfg = CacheConfig::new(state);
        // Every tier holds the whole snapshot, so nothing is evicted mid-run.
        cfg.decrypted = size;
        cfg.cache_memory = size;
        cfg.cache_disk = 2 * size;
        cfg.az = az.then(|| lode_az::AzConfig {
            nodes: self.fleet.clone(),
            ..Default::default()
        });
        self.rt.block_on(async {
            std::fs::create_dir_all(state).expect("create the state dir");
            let cache = cfg.build(&self.store);
            let snapshot = Snapshot::open(
                &self.store,
                &self.kms as &dyn Kms,
                cache.clone(),
                &tag(chunk),
            )
            .await
            .expect("open the snapshot");
            let snapshot = Arc::new(snapshot);
            let serve = |name: &str, prefetch: Prefetch, record: RecordPolicy| {
                let socket = state.join(name);
                let listener = bind(&socket).expect("bind the handler socket");
                let reports: Arc<Mutex<Vec<SessionReport>>> = Arc::default();
                let sink = reports.clone();
                let opts = ServeOptions {
                    prefetch,
                    record,
                    prefetch_concurrency: EAGER_CONCURRENCY,
                    ..Default::default()
                };
                let snapshot = snapshot.clone();
                let task = tokio::spawn(async move {
                    let on_report = Arc::new(move |r: SessionReport| {
                        sink.lock().unwrap().push(r);
                    });
                    if let Err(e) = lode_snap::serve(listener, snapshot, opts, on_report).await {
                        eprintln!("handler stopped: {e}");
                    }
                });
                Served {
                    socket,
                    reports,
                    task,
                }
            };
            let lazy = serve("lazy.sock", Prefetch::None, RecordPolicy::Never);
            let prefetch = serve("prefetch.sock", Prefetch::Recorded, RecordPolicy::Never);
            let record = serve("record.sock", Prefetch::None, RecordPolicy::Always);
            Worker {
                cache,
                snapshot,
                lazy,
                prefetch,
                record,
            }
        })
    }

    /// Waits for the worker's background fills and stops its handlers. Its state dir
    /// stays until the bench ends: on ext4 without a journal (this VM's root) a new
    /// inode skips every recently freed one, so deleting a worker's ~1,500 cache files
    /// just before the next worker creates its own made every create scan the freed
    /// ones, and that kernel time (most of the bench's CPU, by `perf`) landed in the
    /// restores being measured.
    fn finish(&self, w: Worker) {
        self.rt.block_on(async {
            w.cache.settle().await;
            // Waiting for the cancelled tasks closes their listeners, so the next worker
            // on the same state dir can bind the same socket paths.
            for s in [w.lazy, w.prefetch, w.record] {
                s.task.abort();
                let _ = s.task.await;
            }
        });
    }

    /// One restore through `served`: the client maps guest memory, hands it to the
    /// handler and runs the queries on it; the report arrives when it lets go.
    fn restore(&self, served: &Served) -> (SessionReport, Duration, Duration) {
        let seen = served.reports.lock().unwrap().len();
        let t0 = Instant::now();
        let r = client::restore(&served.socket, self.size, 1).expect("restore");
        let handshake = t0.elapsed();
        let q = workload::query(r.memory.bytes(), SEED, self.queries)
            .expect("query the restored index");
        assert_eq!(q.answered, self.queries);
        drop(r);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(rep) = served.reports.lock().unwrap().get(seen) {
                if let Some(e) = &rep.error {
                    panic!("the restore ended with an error: {e}");
                }
                return (rep.clone(), handshake + q.first_answer, handshake + q.total);
            }
            assert!(Instant::now() < deadline, "no session report within 60 s");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// CRIU-style: every chunk fetched through the worker's tiers into anonymous memory,
    /// `EAGER_CONCURRENCY` at once (zero chunks cost nothing), then the queries.
    fn eager(&self, snapshot: &Arc<Snapshot>) -> (Duration, Duration) {
        let t0 = Instant::now();
        let memory = self.rt.block_on(async {
            let cs = snapshot.chunk_size().bytes_u64();
            let chunks = snapshot.size().div_ceil(cs);
            let mut memory = vec![0u8; usize::try_from(snapshot.size()).expect("size fits memory")];
            let mut fetched = futures::stream::iter(0..chunks)
                .map(|i| {
                    let s = snapshot.clone();
                    tokio::spawn(async move { (i, s.device().chunk(i).await) })
                })
                .buffer_unordered(EAGER_CONCURRENCY);
            while let Some(done) = fetched.next().await {
                let (i, r) = done.expect("fetch task");
                if let Some((_, bytes)) = r.unwrap_or_else(|e| panic!("chunk {i}: {e}")) {
                    let at = usize::try_from(i * cs).expect("offset fits memory");
                    memory[at..at + bytes.len()].copy_from_slice(&bytes);
                }
            }
            memory
        });
        let fetched = t0.elapsed();
        let q = workload::query(&memory, SEED, self.queries).expect("query the eager copy");
        assert_eq!(q.answered, self.queries);
        (fetched + q.first_answer, fetched + q.total)
    }

    /// One restore of `worker`'s snapshot in `mode`, checked to be served by `tier`.
    fn measure(&self, w: &Worker, tier: Tier, mode: Mode) -> Sample {
        let before = w.cache.snapshot();
        let mut s = Sample::default();
        let expected = match mode {
            Mode::Lazy | Mode::Prefetch => {
                let served = if mode == Mode::Lazy {
                    &w.lazy
                } else {
                    &w.prefetch
                };
                let (rep, first, all) = self.restore(served);
                s.faults = rep.faults;
                s.zero_faults = rep.zero_faults;
                s.demand = rep.demand_segments;
                s.prefetched = rep.prefetched_segments;
                s.demand_chunks = rep.demand_chunks;
                s.prefetched_chunks = rep.prefetched_chunks;
                s.segment_bytes = rep.segment_bytes;
                s.ws_pages = rep.working_set_pages;
                s.p50 = rep.fault_percentile(50);
                s.p99 = rep.fault_percentile(99);
                (s.first, s.all) = (first, all);
                // Each chunk comes whole from the origin or the AZ (once, the cache
                // joining its segments' fetches) and a segment at a time from disk or
                // decrypted memory, so the distinct chunks are the least the tier served.
                rep.demand_chunks.max(rep.prefetched_chunks)
            }
            Mode::Eager => {
                (s.first, s.all) = self.eager(&w.snapshot);
                stored_chunks(&w.snapshot)
            }
        };
        self.rt.block_on(w.cache.settle());
        let after = w.cache.snapshot();
        (s.tier_hits, s.tier_bytes) = check_tier(&before, &after, tier, mode, expected);
        s
    }
}

fn stored_chunks(snapshot: &Snapshot) -> u64 {
    let chunks = snapshot.size().div_ceil(snapshot.chunk_size().bytes_u64());
    (0..chunks)
        .filter(|i| !snapshot.device().is_zero_chunk(*i))
        .count() as u64
}

/// Hits and bytes of tier `name` between two snapshots.
fn delta(before: &MetricsSnapshot, after: &MetricsSnapshot, name: &str) -> (u64, u64) {
    let get = |m: &MetricsSnapshot| m.tier(name).map_or((0, 0), |t| (t.hits, t.bytes));
    let ((h0, b0), (h1, b1)) = (get(before), get(after));
    (h1 - h0, b1 - b0)
}

/// Checks that `tier` served at least `expected` hits and no other tier served any;
/// returns the serving tier's hits and bytes.
fn check_tier(
    before: &MetricsSnapshot,
    after: &MetricsSnapshot,
    tier: Tier,
    mode: Mode,
    expected: u64,
) -> (u64, u64) {
    let served_by = tier.served_by();
    let counts: Vec<(&str, u64)> = ["decrypted", "memory", "disk", "az", "origin"]
        .into_iter()
        .map(|n| (n, delta(before, after, n).0))
        .collect();
    // A segment faulted again after its install is fetched again and hits the decrypted
    // tier whatever tier is measured. A chunk from the origin or the AZ comes whole and is
    // kept in this worker's ciphertext memory, so its other segments, faulted later, come
    // from there; those workers start empty, so that copy is one this restore brought.
    // Every other ciphertext tier must be silent.
    let copied_here = |n: &str| n == "memory" && matches!(tier, Tier::Origin | Tier::Az);
    let wrong: Vec<_> = counts
        .iter()
        .filter(|(n, hits)| *n != served_by && *n != "decrypted" && !copied_here(n) && *hits > 0)
        .collect();
    let (hits, bytes) = delta(before, after, served_by);
    if !wrong.is_empty() || hits < expected {
        panic!(
            "{} {} restore was meant to be served by the {served_by} tier ({expected} hits) \
             but the cache's hit counters moved as {counts:?}",
            tier.label(),
            mode.label()
        );
    }
    (hits, bytes)
}

fn median_f(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Per-field medians over runs.
struct Med<'a>(&'a [Sample]);

impl Med<'_> {
    fn of(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        median_f(self.0.iter().map(f).collect())
    }
    fn of_opt(&self, f: impl Fn(&Sample) -> Option<u32>) -> f64 {
        median_f(self.0.iter().filter_map(|s| f(s).map(f64::from)).collect())
    }
    fn ms(&self, f: impl Fn(&Sample) -> Duration) -> f64 {
        self.of(|s| f(s).as_secs_f64() * 1000.0)
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

type Results = Vec<((Tier, Mode), Vec<Sample>)>;

fn push(results: &mut Results, key: (Tier, Mode), s: Sample) {
    eprintln!(
        "  {:<6} {:<13} faults {:>5}  demand {:>5}  prefetched {:>5}  first {:>8.1} ms  all {:>8.1} ms",
        key.0.label(),
        key.1.label(),
        s.faults,
        s.demand,
        s.prefetched,
        s.first.as_secs_f64() * 1000.0,
        s.all.as_secs_f64() * 1000.0
    );
    match results.iter_mut().find(|(k, _)| *k == key) {
        Some((_, v)) => v.push(s),
        None => results.push((key, vec![s])),
    }
}

fn samples(results: &Results, key: (Tier, Mode)) -> &[Sample] {
    results
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(&[], |(_, v)| v.as_slice())
}

fn main() {
    let runs = knob("RUNS", 5).max(1);
    let snap_mib = knob("SNAP_MIB", 256);
    let keys = knob("KEYS", 300_000);
    let queries = knob("QUERIES", 2000);
    let size = snap_mib << 20;
    let started = Instant::now();
    let load_before = loadavg();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("handler runtime");
    let node_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("az-node")
        .enable_all()
        .build()
        .expect("node runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path().join("store").to_str().expect("utf-8 path")).expect("store");
    let kms = Keyring::open_or_create(dir.path().join("keyring")).expect("keyring");

    // The memory image, published once per swept chunk size.
    let image = workload::build(size, keys).expect("build the index image");
    let path = dir.path().join("mem.snap");
    std::fs::write(&path, &image).expect("write the image");
    drop(image);
    let mut published: Vec<(u64, PublishStats)> = Vec::new();
    for chunk in SWEEP {
        let opts = PublishOptions {
            chunk_size: ChunkSize::new(chunk).expect("chunk size"),
            tag: Some(tag(chunk)),
            ..Default::default()
        };
        let p = rt
            .block_on(
                Publisher::new(&store, &kms, kms.default_key_id()).publish_file(
                    &path,
                    &opts,
                    Arc::new(NoProgress),
                ),
            )
            .expect("publish");
        published.push((chunk, p.stats));
    }
    let _ = std::fs::remove_file(&path);

    let nodes: Vec<_> = (0..6)
        .map(|_| {
            node_rt
                .block_on(lode_cache_node::Node::start(lode_cache_node::NodeConfig {
                    listen: "127.0.0.1:0".parse().expect("address"),
                    memory_bytes: Some(256 << 20),
                    ..Default::default()
                }))
                .expect("start an AZ cache node")
        })
        .collect();
    let fleet = nodes.iter().map(|n| n.local_addr().to_string()).collect();
    let mut b = Bench {
        rt,
        node_rt,
        nodes,
        fleet,
        dir,
        store,
        kms,
        size,
        queries,
        fresh: 0,
    };
    eprintln!(
        "setup (image, publishes, fleet): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The working set, recorded once from a lazy restore (REAP's record phase).
    let state = b.fresh_dir();
    let w = b.worker(&state, false, MAIN_CHUNK);
    let (rep, _, _) = b.restore(&w.record);
    assert!(rep.recorded, "the recording restore stored no working set");
    let recorded_pages = rep.faults - rep.zero_faults;
    b.finish(w);

    // A worker that fetches every chunk through the fleet: the fleet then holds them all
    // (for the az runs) and so does its disk cache (for the disk runs).
    let warm = b.dir.path().join("warm");
    let w = b.worker(&warm, true, MAIN_CHUNK);
    let before = w.cache.snapshot();
    b.eager(&w.snapshot);
    b.rt.block_on(w.cache.settle());
    let nonzero = stored_chunks(&w.snapshot);
    check_tier(
        &before,
        &w.cache.snapshot(),
        Tier::Origin,
        Mode::Eager,
        nonzero,
    );
    b.finish(w);
    eprintln!(
        "recorded and filled: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut results: Results = Vec::new();
    let mut sweep: Vec<(u64, Vec<Sample>)> = SWEEP.iter().map(|c| (*c, Vec::new())).collect();
    for run in 0..runs {
        eprintln!("run {}/{runs} (load {})", run + 1, loadavg());
        for tier in [Tier::Origin, Tier::Az, Tier::Disk] {
            for mode in [Mode::Lazy, Mode::Prefetch, Mode::Eager] {
                let w = match tier {
                    Tier::Disk => b.worker(&warm, false, MAIN_CHUNK),
                    _ => {
                        let state = b.fresh_dir();
                        b.worker(&state, tier == Tier::Az, MAIN_CHUNK)
                    }
                };
                let s = b.measure(&w, tier, mode);
                push(&mut results, (tier, mode), s);
                if (tier, mode) == (Tier::Disk, Mode::Eager) {
                    // Every chunk is decrypted in this worker's memory now.
                    for mode in [Mode::Lazy, Mode::Prefetch, Mode::Eager] {
                        let s = b.measure(&w, Tier::Memory, mode);
                        push(&mut results, (Tier::Memory, mode), s);
                    }
                }
                b.finish(w);
            }
        }
        for (chunk, v) in &mut sweep {
            let state = b.fresh_dir();
            let w = b.worker(&state, false, *chunk);
            let s = b.measure(&w, Tier::Origin, Mode::Lazy);
            eprintln!(
                "  sweep {:>3} KiB: faults {:>5}  demand {:>5}  all {:>8.1} ms",
                *chunk >> 10,
                s.faults,
                s.demand,
                s.all.as_secs_f64() * 1000.0
            );
            v.push(s);
            b.finish(w);
        }
    }

    for n in std::mem::take(&mut b.nodes) {
        let _ = b.node_rt.block_on(n.shutdown());
    }

    // The tables.
    println!();
    println!(
        "lode-snap restore bench: {snap_mib} MiB snapshot, index of {keys} keys, {queries} \
         queries (seed {SEED:#x}), {runs} runs, medians; {} KiB chunks unless swept; \
         {nonzero} non-zero chunks; recorded working set {recorded_pages} pages ({:.1} MiB); \
         load average {load_before} before, {} after; {:.0} s in all; work dir {}",
        MAIN_CHUNK >> 10,
        (recorded_pages * PAGE) as f64 / MIB,
        loadavg(),
        started.elapsed().as_secs_f64(),
        b.dir.path().display()
    );

    println!();
    println!("1. Fault service latency by tier (lazy: no prefetch, no record)");
    println!();
    println!(
        "| tier | served by | faults | zero faults | segments fetched | chunks | tier hits | p50 µs | p99 µs |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for tier in [Tier::Memory, Tier::Disk, Tier::Az, Tier::Origin] {
        let m = Med(samples(&results, (tier, Mode::Lazy)));
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            tier.label(),
            tier.served_by(),
            m.of(|s| s.faults as f64),
            m.of(|s| s.zero_faults as f64),
            m.of(|s| s.demand as f64),
            m.of(|s| s.demand_chunks as f64),
            m.of(|s| s.tier_hits as f64),
            m.of_opt(|s| s.p50),
            m.of_opt(|s| s.p99),
        );
    }

    println!();
    println!(
        "2. Restore to first answer and to all {queries} answers (ms from connecting to the \
         handler; eager: from the first chunk request)"
    );
    println!();
    println!(
        "| tier | mode | faults | demand segments | prefetched segments | tier MiB | first answer ms | all answered ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for tier in [Tier::Origin, Tier::Az, Tier::Disk, Tier::Memory] {
        for mode in [Mode::Lazy, Mode::Prefetch, Mode::Eager] {
            let m = Med(samples(&results, (tier, mode)));
            let handler = mode != Mode::Eager;
            let dash = |v: f64| {
                if handler {
                    format!("{v:.0}")
                } else {
                    "-".into()
                }
            };
            println!(
                "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                tier.label(),
                mode.label(),
                dash(m.of(|s| s.faults as f64)),
                dash(m.of(|s| s.demand as f64)),
                dash(m.of(|s| s.prefetched as f64)),
                m.of(|s| s.tier_bytes as f64) / MIB,
                m.ms(|s| s.first),
                m.ms(|s| s.all),
            );
        }
    }
    println!();
    println!(
        "| tier | lazy / eager (all answered) | prefetch / lazy (all answered) | lazy / prefetch speed-up | faults saved by prefetch |"
    );
    println!("|---|---:|---:|---:|---:|");
    for tier in [Tier::Origin, Tier::Az, Tier::Disk, Tier::Memory] {
        let all = |mode| Med(samples(&results, (tier, mode))).ms(|s| s.all);
        let faults = |mode| Med(samples(&results, (tier, mode))).of(|s| s.faults as f64);
        let (lazy, pre, eager) = (all(Mode::Lazy), all(Mode::Prefetch), all(Mode::Eager));
        println!(
            "| {} | {:.2} | {:.2} | {:.2}x | {:.1}% |",
            tier.label(),
            lazy / eager,
            pre / lazy,
            lazy / pre,
            100.0 * (1.0 - faults(Mode::Prefetch) / faults(Mode::Lazy)),
        );
    }
    println!("| REAP (ASPLOS '21), for comparison | - | - | 3.7x | 97% |");

    println!();
    println!("3. Chunk-size sweep: lazy restore from the origin, no prefetch");
    println!();
    let touched = Med(&sweep[0].1).of(|s| (s.faults - s.zero_faults) as f64);
    println!(
        "Pages the queries touch (faults with 4 KiB chunks, one page a chunk): {touched:.0} \
         ({:.1} MiB)",
        touched * PAGE as f64 / MIB
    );
    println!();
    println!(
        "| chunk | segment | stored chunks | stored MiB | faults | segments fetched | chunks fetched | fetched MiB | fetched / touched | fault p50 µs | fault p99 µs | all answered ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for ((chunk, v), (_, stats)) in sweep.iter().zip(&published) {
        let m = Med(v);
        let fetched = m.of(|s| s.tier_bytes as f64);
        let stored = stats.chunks - stats.zero_chunks - stats.repeated_chunks;
        println!(
            "| {} KiB | {:.0} KiB | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2}x | {:.0} | {:.0} | {:.1} |",
            chunk >> 10,
            m.of(|s| s.segment_bytes as f64) / 1024.0,
            stored,
            stats.uploaded_bytes as f64 / MIB,
            m.of(|s| s.faults as f64),
            m.of(|s| s.demand as f64),
            m.of(|s| s.demand_chunks as f64),
            fetched / MIB,
            fetched / (touched * PAGE as f64),
            m.of_opt(|s| s.p50),
            m.of_opt(|s| s.p99),
            m.ms(|s| s.all),
        );
    }
}
