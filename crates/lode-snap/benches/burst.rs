//! Bursts of restores of one memory snapshot through one handler: N clones (each its own
//! process, its own copy-on-write memory, its own generation id) restored at once, as a
//! platform starts many isolated sessions from one snapshot, every clone running the
//! index queries on its memory. One handler serves them all from one chunk cache.
//!
//! ```text
//! CARGO_TARGET_DIR=target-bench cargo bench -p lode-snap --bench burst
//! BURSTS=1,8 SNAP_MIB=32 QUERIES=300 cargo bench -p lode-snap --bench burst   # quick
//! ```
//!
//! The handler runs in this process (a two-thread Tokio runtime); each clone is this
//! binary again, started as a client: it maps the guest memory, waits for the go, then
//! connects, runs the queries (its own seed, so clones fault in different orders) and
//! prints what it saw. All clones get the go at once. The working set was recorded by
//! one restore before the bursts, so every clone prefetches it (the handler's default).
//!
//! ```text
//! cold   a fresh cache (empty memory and disk): every chunk from the origin (a local
//!        directory store: lode's own cost of a chunk, no network)
//! warm   a fresh cache over a state dir whose disk tier holds every chunk: every chunk
//!        from local disk, the origin never asked
//! ```
//!
//! Each row is checked before it is printed: every clone answered every query, saw its
//! announced generation id in its memory, and no two clones (in the whole run) had the
//! same id; cold bursts fetched each chunk once from the origin, warm ones never. A
//! failed check stops the bench.
//!
//! Knobs (environment): BURSTS (1,8,32,64), MODES (cold,warm), SNAP_MIB (64), KEYS (half
//! the memory, as `lode snapshot demo-image`), QUERIES (1000). Clones need SNAP_MIB each
//! at most (64 clones of 64 MiB: 4 GiB). Handler memory is the process's peak RSS
//! (VmHWM, reset before each burst with /proc/self/clear_refs), which holds the chunk
//! cache (sized to hold the snapshot twice over: decrypted and ciphertext) and the
//! sessions; the clones' memory is theirs.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache::{CacheConfig, CountingOrigin};
use lode_format::ChunkSize;
use lode_image::{NoProgress, PublishOptions, Publisher};
use lode_kms::{Keyring, Kms};
use lode_read::MetricsSnapshot;
use lode_snap::handler::bind;
use lode_snap::{Prefetch, RecordPolicy, ServeOptions, SessionReport, Snapshot, client, workload};
use lode_store::Store;
use serde_json::json;

#[path = "../tests/common/cache.rs"]
mod cache;

/// Set in a clone's environment: the handler's socket.
const CLIENT: &str = "LODE_BURST_CLIENT";
/// The recording restore's query seed; clone i uses SEED + 1 + i.
const SEED: u64 = 0x5eed_f00d;
const TAG: &str = "burst";
const MIB: f64 = 1024.0 * 1024.0;
const TIERS: [&str; 4] = ["decrypted", "memory", "disk", "origin"];

fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

fn list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A clone: waits for the go on stdin, restores, queries, prints one JSON line.
fn clone_main(socket: &str) {
    let size = knob("LODE_BURST_SIZE", 0);
    let seed = knob("LODE_BURST_SEED", 1);
    let queries = knob("LODE_BURST_QUERIES", 1);
    let mut go = [0u8; 1];
    if std::io::stdin().read_exact(&mut go).is_err() {
        std::process::exit(2);
    }
    let t0 = Instant::now();
    let out = (|| -> Result<serde_json::Value, String> {
        let r = client::restore(Path::new(socket), size, 1).map_err(|e| e.to_string())?;
        let handshake = t0.elapsed();
        let q = workload::query(r.memory.bytes(), seed, queries)?;
        Ok(json!({
            "announced": r.generation_id,
            "in_memory": q.generation_id,
            "answered": q.answered,
            "handshake_ms": ms(handshake),
            "first_ms": ms(handshake + q.first_answer),
            "all_ms": ms(handshake + q.total),
        }))
    })();
    match out {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", json!({ "error": e }));
            std::process::exit(1);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `pct` percentile (nearest rank) of `v`.
fn pct(v: &[f64], pct: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (pct * v.len()).div_ceil(100).clamp(1, v.len());
    v[rank - 1]
}

/// A line of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Returns freed heap to the system and resets the peak RSS to the current RSS, so the
/// next VmHWM is this burst's.
fn reset_peak_rss() -> u64 {
    // SAFETY: malloc_trim only releases free heap pages; it touches no live allocation.
    unsafe { libc::malloc_trim(0) };
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM (/proc/self/clear_refs)");
    status_bytes("VmRSS")
}

struct Bench {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    store: Store,
    kms: Keyring,
    size: u64,
    fresh: u32,
}

/// A handler over a new cache on `state`.
struct Handler {
    socket: PathBuf,
    snapshot: Arc<Snapshot>,
    cache: Arc<lode_read::ChunkCache>,
    origin: Arc<CountingOrigin>,
    reports: Arc<Mutex<Vec<SessionReport>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Bench {
    fn fresh_dir(&mut self) -> PathBuf {
        self.fresh += 1;
        self.dir.path().join(format!("state-{}", self.fresh))
    }

    fn handler(&self, state: &Path, opts: ServeOptions) -> Handler {
        std::fs::create_dir_all(state).expect("create the state dir");
        let mut cfg = CacheConfig::new(state);
        // Every tier holds the whole snapshot: nothing is evicted within a burst.
        cfg.decrypted = self.size;
        cfg.cache_memory = self.size;
        cfg.cache_disk = 2 * self.size;
        let origin = CountingOrigin::new(&self.store);
        let socket = state.join("uffd.sock");
        let reports: Arc<Mutex<Vec<SessionReport>>> = Arc::default();
        let sink = reports.clone();
        self.rt.block_on(async {
            let cache = cfg.build_with_origin(origin.clone());
            let snapshot = Arc::new(
                Snapshot::open(&self.store, &self.kms as &dyn Kms, cache.clone(), TAG)
                    .await
                    .expect("open the snapshot"),
            );
            let listener = bind(&socket).expect("bind the handler socket");
            let served = snapshot.clone();
            let task = tokio::spawn(async move {
                let on_report = Arc::new(move |r| sink.lock().unwrap().push(r));
                if let Err(e) = lode_snap::serve(listener, served, opts, on_report).await {
                    eprintln!("handler stopped: {e}");
                }
            });
            Handler {
                socket,
                snapshot,
                cache,
                origin,
                reports,
                task,
            }
        })
    }

    fn stop(&self, h: Handler) {
        self.rt.block_on(async {
            h.cache.settle().await;
            h.task.abort();
            let _ = h.task.await;
        });
    }

    /// Waits for `n` session reports.
    fn reports(&self, h: &Handler, n: usize) -> Vec<SessionReport> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = h.reports.lock().unwrap();
            if r.len() >= n {
                return r.clone();
            }
            drop(r);
            assert!(Instant::now() < deadline, "{n} sessions never reported");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// What one clone printed.
struct CloneResult {
    announced: String,
    in_memory: String,
    handshake_ms: f64,
    first_ms: f64,
    all_ms: f64,
}

fn spawn_clone(socket: &Path, size: u64, seed: u64, queries: u64) -> Child {
    Command::new(std::env::current_exe().expect("this bench's path"))
        .env(CLIENT, socket)
        .env("LODE_BURST_SIZE", size.to_string())
        .env("LODE_BURST_SEED", seed.to_string())
        .env("LODE_BURST_QUERIES", queries.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a clone")
}

fn finish_clone(i: usize, mut c: Child, queries: u64) -> CloneResult {
    let mut out = String::new();
    c.stdout
        .take()
        .expect("clone stdout")
        .read_to_string(&mut out)
        .expect("read a clone's output");
    let st = c.wait().expect("wait for a clone");
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("clone {i} printed {out:?}: {e}"));
    assert!(st.success(), "clone {i} failed: {v}");
    assert_eq!(v["answered"], queries, "clone {i}: {v}");
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    CloneResult {
        announced: s("announced"),
        in_memory: s("in_memory"),
        handshake_ms: f("handshake_ms"),
        first_ms: f("first_ms"),
        all_ms: f("all_ms"),
    }
}

fn hits(before: &MetricsSnapshot, after: &MetricsSnapshot, tier: &str) -> (u64, u64) {
    let get = |m: &MetricsSnapshot| {
        m.tier(tier)
            .map_or((0, 0), |t| (t.hits, t.hit_latency_sum_us))
    };
    let ((h0, s0), (h1, s1)) = (get(before), get(after));
    (h1 - h0, s1 - s0)
}

fn main() {
    if let Ok(socket) = std::env::var(CLIENT) {
        clone_main(&socket);
        return;
    }
    let snap_mib = knob("SNAP_MIB", 64);
    let size = snap_mib << 20;
    let keys = knob("KEYS", (size / 2 / 330).max(1));
    let queries = knob("QUERIES", 1000);
    let bursts: Vec<usize> = list("BURSTS", "1,8,32,64")
        .iter()
        .map(|n| n.parse().expect("BURSTS: whole numbers"))
        .collect();
    let modes = list("MODES", "cold,warm");
    for m in &modes {
        assert!(m == "cold" || m == "warm", "MODES: cold or warm, not {m:?}");
    }
    let started = Instant::now();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("handler runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path().join("store").to_str().expect("utf-8 path")).expect("store");
    let kms = Keyring::open_or_create(dir.path().join("keyring")).expect("keyring");
    let image = workload::build(size, keys).expect("build the index image");
    let path = dir.path().join("mem.snap");
    std::fs::write(&path, &image).expect("write the image");
    drop(image);
    let chunk = u64::from(lode_snap::DEFAULT_CHUNK_SIZE);
    let opts = PublishOptions {
        chunk_size: ChunkSize::new(chunk).expect("chunk size"),
        tag: Some(TAG.into()),
        ..Default::default()
    };
    rt.block_on(
        Publisher::new(&store, &kms, kms.default_key_id()).publish_file(
            &path,
            &opts,
            Arc::new(NoProgress),
        ),
    )
    .expect("publish");
    let _ = std::fs::remove_file(&path);
    let mut b = Bench {
        rt,
        dir,
        store,
        kms,
        size,
        fresh: 0,
    };

    // The working set, recorded by one restore (REAP's record phase).
    let state = b.fresh_dir();
    let h = b.handler(
        &state,
        ServeOptions {
            prefetch: Prefetch::None,
            record: RecordPolicy::Always,
            ..Default::default()
        },
    );
    {
        let r = client::restore(&h.socket, size, 1).expect("the recording restore");
        workload::query(r.memory.bytes(), SEED, queries).expect("the recording queries");
    }
    let rec = b.reports(&h, 1).remove(0);
    assert!(rec.recorded, "the recording restore stored no working set");
    b.stop(h);

    // A worker whose disk tier then holds every chunk, for the warm bursts.
    let warm = b.dir.path().join("warm");
    let h = b.handler(&warm, ServeOptions::default());
    let chunks = size.div_ceil(chunk);
    let nonzero = (0..chunks)
        .filter(|i| !h.snapshot.device().is_zero_chunk(*i))
        .count() as u64;
    b.rt.block_on(async {
        for i in 0..chunks {
            h.snapshot
                .device()
                .chunk(i)
                .await
                .unwrap_or_else(|e| panic!("chunk {i}: {e}"));
        }
    });
    assert_eq!(h.origin.counts().1, nonzero);
    b.stop(h);
    eprintln!(
        "setup: {snap_mib} MiB index of {keys} keys, {nonzero} of {chunks} chunks stored, \
         working set {} pages; {:.1} s",
        rec.faults - rec.zero_faults,
        started.elapsed().as_secs_f64()
    );

    let mut all_ids: HashSet<String> = HashSet::new();
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for mode in &modes {
        for &n in &bursts {
            let state = if mode == "cold" {
                b.fresh_dir()
            } else {
                warm.clone()
            };
            let h = b.handler(
                &state,
                ServeOptions {
                    prefetch: Prefetch::Recorded,
                    record: RecordPolicy::Never,
                    generation_id_offset: Some(workload::GENERATION_OFFSET),
                    max_sessions: n.max(lode_snap::handler::DEFAULT_MAX_SESSIONS),
                    ..Default::default()
                },
            );
            let clones: Vec<Child> = (0..n)
                .map(|i| spawn_clone(&h.socket, size, SEED + 1 + i as u64, queries))
                .collect();
            let rss_before = reset_peak_rss();
            let before = h.cache.snapshot();
            let go = Instant::now();
            let clones: Vec<Child> = clones
                .into_iter()
                .map(|mut c| {
                    let mut stdin = c.stdin.take().expect("clone stdin");
                    stdin.write_all(b"g").expect("send the go");
                    c
                })
                .collect();
            let results: Vec<CloneResult> = clones
                .into_iter()
                .enumerate()
                .map(|(i, c)| finish_clone(i, c, queries))
                .collect();
            let burst_ms = ms(go.elapsed());
            let reports = b.reports(&h, n);
            b.rt.block_on(h.cache.settle());
            let after = h.cache.snapshot();
            let rss_peak = status_bytes("VmHWM");
            let stats = h.snapshot.burst_stats();
            let (fetches, distinct, most) = h.origin.counts();

            // The checks.
            for (i, c) in results.iter().enumerate() {
                assert_eq!(
                    c.announced, c.in_memory,
                    "clone {i}: the id in memory is not the one announced"
                );
                assert!(
                    c.announced.len() == 32 && all_ids.insert(c.announced.clone()),
                    "clone {i}'s generation id {:?} is not fresh",
                    c.announced
                );
            }
            for r in &reports {
                assert!(r.error.is_none(), "a session failed: {:?}", r.error);
            }
            let reported: HashSet<&str> =
                reports.iter().map(|r| r.generation_id.as_str()).collect();
            assert_eq!(reported.len(), n, "the handler reported an id twice");
            match mode.as_str() {
                "cold" => assert!(
                    most == 1 && distinct > 0 && distinct <= nonzero,
                    "cold burst of {n}: {fetches} origin fetches of {distinct} chunks, one \
                     fetched {most} times"
                ),
                _ => assert_eq!(fetches, 0, "warm burst of {n} reached the origin"),
            }

            let f = |g: fn(&CloneResult) -> f64| results.iter().map(g).collect::<Vec<_>>();
            let (first, all, hs) = (f(|c| c.first_ms), f(|c| c.all_ms), f(|c| c.handshake_ms));
            let faults: Vec<f64> = reports
                .iter()
                .flat_map(|r| r.fault_us.iter().map(|u| f64::from(*u)))
                .collect();
            let per =
                |g: fn(&SessionReport) -> u64| reports.iter().map(g).sum::<u64>() as f64 / n as f64;
            let mut tier_hits = serde_json::Map::new();
            let mut tier_us = serde_json::Map::new();
            for t in TIERS {
                let (hit, us) = hits(&before, &after, t);
                tier_hits.insert(t.into(), json!(hit));
                let mean = (hit > 0).then(|| us as f64 / hit as f64);
                tier_us.insert(t.into(), json!(mean));
            }
            let misses = |m: &MetricsSnapshot| m.tier("decrypted").map_or(0, |t| t.misses);
            let decrypted = misses(&after) - misses(&before);
            let row = json!({
                "bench": "burst",
                "mode": mode,
                "clones": n,
                "snapshot_bytes": size,
                "chunk_bytes": chunk,
                "segment_bytes": reports.first().map_or(0, |r| r.segment_bytes),
                "snapshot_chunks": chunks,
                "nonzero_chunks": nonzero,
                "queries": queries,
                "working_set_pages": reports.first().map_or(0, |r| r.working_set_pages),
                "handshake_ms_p50": pct(&hs, 50),
                "handshake_ms_p99": pct(&hs, 99),
                "first_answer_ms_p50": pct(&first, 50),
                "first_answer_ms_p99": pct(&first, 99),
                "all_answers_ms_p50": pct(&all, 50),
                "all_answers_ms_p99": pct(&all, 99),
                "burst_ms": burst_ms,
                "origin_fetches": fetches,
                "origin_distinct_chunks": distinct,
                "origin_max_fetches_per_chunk": most,
                "tier_hits": tier_hits,
                "tier_hit_us_mean": tier_us,
                "segments_decrypted": decrypted,
                "segment_fetches": stats.segment_fetches,
                "joined_segment_fetches": stats.joined_segment_fetches,
                "peak_sessions": stats.peak_sessions,
                "fault_us_p50": pct(&faults, 50),
                "fault_us_p99": pct(&faults, 99),
                "faults_per_restore": per(|r| r.faults),
                "zero_faults_per_restore": per(|r| r.zero_faults),
                "demand_segments_per_restore": per(|r| r.demand_segments),
                "prefetched_segments_per_restore": per(|r| r.prefetched_segments),
                "demand_chunks_per_restore": per(|r| r.demand_chunks),
                "prefetched_chunks_per_restore": per(|r| r.prefetched_chunks),
                "pages_copied_per_restore": per(|r| r.pages_copied),
                "handler_rss_before_mib": rss_before as f64 / MIB,
                "handler_rss_peak_mib": rss_peak as f64 / MIB,
                "distinct_generation_ids": reported.len(),
            });
            eprintln!(
                "  {mode:<4} x{n:<3} first p50 {:>7.1} ms p99 {:>7.1} ms  all p50 {:>7.1} ms \
                 p99 {:>7.1} ms  origin {fetches:>5}  peak RSS {:>6.1} MiB",
                pct(&first, 50),
                pct(&first, 99),
                pct(&all, 50),
                pct(&all, 99),
                rss_peak as f64 / MIB
            );
            rows.push(row);
            b.stop(h);
        }
    }

    println!();
    println!(
        "lode-snap burst bench: {snap_mib} MiB snapshot ({nonzero} of {chunks} {} KiB chunks \
         stored), index of {keys} keys, {queries} queries a clone (own seed), working set \
         prefetched ({} pages); one handler, clones as processes; {:.0} s in all",
        chunk >> 10,
        rec.faults - rec.zero_faults,
        started.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "| mode | clones | first answer p50 / p99 ms | all answers p50 / p99 ms | burst ms | \
         origin fetches (chunks) | disk hits | memory hits | segments decrypted | segment \
         fetches / joined | fault p50 / p99 µs | handler peak RSS MiB (before) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let num = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let hit = |t: &str| r["tier_hits"][t].as_u64().unwrap_or(0);
        println!(
            "| {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.0} | {} ({}) | {} | {} | {} | {} / {} \
             | {:.0} / {:.0} | {:.0} ({:.0}) |",
            r["mode"].as_str().unwrap_or("?"),
            r["clones"],
            num("first_answer_ms_p50"),
            num("first_answer_ms_p99"),
            num("all_answers_ms_p50"),
            num("all_answers_ms_p99"),
            num("burst_ms"),
            r["origin_fetches"],
            r["origin_distinct_chunks"],
            hit("disk"),
            hit("memory"),
            r["segments_decrypted"],
            r["segment_fetches"],
            r["joined_segment_fetches"],
            num("fault_us_p50"),
            num("fault_us_p99"),
            num("handler_rss_peak_mib"),
            num("handler_rss_before_mib"),
        );
    }
    println!();
    for r in &rows {
        println!("{r}");
    }
}
