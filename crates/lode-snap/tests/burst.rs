//! Bursts of restores of one snapshot through one handler, in one process: clones
//! restored at once, each its own copy of the memory, sharing the handler's cache. Every
//! clone is compared with the snapshot byte for byte, carries its own generation id,
//! and the origin gives each chunk once for the whole burst.
// lode-snap builds for 64-bit targets only; offsets here are small test sizes.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use cache::{CacheConfig, CountingOrigin};
use lode_format::ChunkSize;
use lode_image::{NoProgress, PublishOptions, Publisher};
use lode_kms::{Keyring, Kms};
use lode_snap::mapping::PAGE_SIZE;
use lode_snap::{Prefetch, RecordPolicy, ServeOptions, SessionReport, Snapshot, client, workload};
use lode_store::Store;

#[path = "common/cache.rs"]
mod cache;

const SIZE: u64 = 16 << 20;
const CHUNK: u64 = 64 * 1024;
const CLONES: usize = 8;
const GENERATION: u64 = workload::GENERATION_OFFSET;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    kms: Keyring,
    memory: Vec<u8>,
    rt: tokio::runtime::Runtime,
}

/// A 16 MiB index image (about half of it zero), 64 KiB chunks, tagged `snap`.
fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store").to_str().unwrap()).unwrap();
    let kms = Keyring::open_or_create(dir.path().join("keyring")).unwrap();
    let memory = workload::build(SIZE, 25_000).unwrap();
    let path = dir.path().join("mem.snap");
    std::fs::write(&path, &memory).unwrap();
    let opts = PublishOptions {
        chunk_size: ChunkSize::new(CHUNK).unwrap(),
        tag: Some("snap".into()),
        ..Default::default()
    };
    rt.block_on(
        Publisher::new(&store, &kms, kms.default_key_id()).publish_file(
            &path,
            &opts,
            Arc::new(NoProgress),
        ),
    )
    .unwrap();
    Fixture {
        dir,
        store,
        kms,
        memory,
        rt,
    }
}

/// A handler over a fresh cache (empty tiers) whose origin counts its fetches.
struct Handler {
    socket: PathBuf,
    snapshot: Arc<Snapshot>,
    origin: Arc<CountingOrigin>,
    reports: Arc<Mutex<Vec<SessionReport>>>,
    task: tokio::task::JoinHandle<()>,
    rt: tokio::runtime::Handle,
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.rt.block_on(&mut self.task);
    }
}

fn handler(fx: &Fixture, name: &str, opts: ServeOptions) -> Handler {
    let state = fx.dir.path().join(name);
    std::fs::create_dir_all(&state).unwrap();
    let socket = state.join("uffd.sock");
    let origin = CountingOrigin::new(&fx.store);
    let reports: Arc<Mutex<Vec<SessionReport>>> = Arc::default();
    let sink = reports.clone();
    let (task, snapshot) = fx.rt.block_on(async {
        let cache = CacheConfig::new(&state).build_with_origin(origin.clone());
        let snapshot = Arc::new(
            Snapshot::open(&fx.store, &fx.kms as &dyn Kms, cache, "snap")
                .await
                .unwrap(),
        );
        let listener = lode_snap::handler::bind(&socket).unwrap();
        let served = snapshot.clone();
        let task = tokio::spawn(async move {
            let _ = lode_snap::serve(
                listener,
                served,
                opts,
                Arc::new(move |r| sink.lock().unwrap().push(r)),
            )
            .await;
        });
        (task, snapshot)
    });
    Handler {
        socket,
        snapshot,
        origin,
        reports,
        task,
        rt: fx.rt.handle().clone(),
    }
}

impl Handler {
    /// Waits until `n` restores have reported, and returns their reports.
    fn reports(&self, n: usize) -> Vec<SessionReport> {
        for _ in 0..3000 {
            let r = self.reports.lock().unwrap();
            if r.len() >= n {
                return r.clone();
            }
            drop(r);
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{n} restores never reported");
    }
}

fn opts() -> ServeOptions {
    ServeOptions {
        generation_id_offset: Some(GENERATION),
        ..Default::default()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What one clone saw: the id the handler announced, and the id in its memory.
struct Clone {
    announced: String,
    in_memory: String,
}

/// `CLONES` restores at once: each runs index queries (its own seed, so the clones fault
/// in different orders), then compares every page with the snapshot, its own generation
/// id at its offset. All stay restored until every clone has checked its memory, so the
/// handler serves them all at the same time.
fn burst(fx: &Fixture, h: &Handler) -> Vec<Clone> {
    let start = Arc::new(Barrier::new(CLONES));
    let done = Arc::new(Barrier::new(CLONES));
    let memory = Arc::new(fx.memory.clone());
    let threads: Vec<_> = (0..CLONES)
        .map(|i| {
            let (socket, start, done, memory) = (
                h.socket.clone(),
                start.clone(),
                done.clone(),
                memory.clone(),
            );
            std::thread::spawn(move || {
                start.wait();
                let r = client::restore(&socket, SIZE, 1 + i % 3).unwrap();
                let q = workload::query(r.memory.bytes(), 1 + i as u64, 300)
                    .unwrap_or_else(|e| panic!("clone {i}: {e}"));
                assert_eq!(q.answered, 300);
                let announced = r.generation_id.clone().expect("an announced id");
                let got = r.memory.bytes();
                let g = GENERATION as usize;
                assert_eq!(q.generation_id, hex(&got[g..g + 16]));
                let mut want = memory[..].to_vec();
                want[g..g + 16].copy_from_slice(&got[g..g + 16]);
                let differ = got
                    .chunks(PAGE_SIZE as usize)
                    .zip(want.chunks(PAGE_SIZE as usize))
                    .position(|(a, b)| a != b);
                assert_eq!(
                    differ, None,
                    "clone {i}: page {differ:?} differs from the snapshot"
                );
                done.wait();
                Clone {
                    announced,
                    in_memory: q.generation_id,
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Every clone has its own id, in memory and announced alike, and no id repeats
/// across `seen` (earlier bursts).
fn check_ids(clones: &[Clone], reports: &[SessionReport], seen: &mut HashSet<String>) {
    for c in clones {
        assert_eq!(
            c.announced, c.in_memory,
            "the id in memory is the announced one"
        );
        assert!(
            seen.insert(c.announced.clone()),
            "id {} repeats",
            c.announced
        );
    }
    let reported: HashSet<_> = reports.iter().map(|r| r.generation_id.clone()).collect();
    assert_eq!(
        reported.len(),
        reports.len(),
        "the handler reported an id twice"
    );
}

#[test]
fn a_burst_of_clones_shares_one_fetch_of_each_chunk_and_each_gets_its_own_id() {
    let fx = fixture();
    let h = handler(&fx, "cold", opts());
    let mut seen = HashSet::new();

    // First burst: no working set yet, every chunk from the origin.
    let clones = burst(&fx, &h);
    let reports = h.reports(CLONES);
    for r in &reports {
        assert_eq!(r.error, None, "{r:?}");
    }
    check_ids(&clones, &reports, &mut seen);
    let (fetches, distinct, most) = h.origin.counts();
    assert!(distinct > 50, "the burst fetched only {distinct} chunks");
    assert_eq!(
        most, 1,
        "a chunk came from the origin {most} times in one burst ({fetches} fetches of \
         {distinct} chunks)"
    );
    let stats = h.snapshot.burst_stats();
    assert_eq!(
        stats.peak_sessions, CLONES,
        "the restores were served at once"
    );
    assert_eq!(stats.sessions, 0);
    assert!(
        stats.joined_segment_fetches > 0,
        "no clone joined another's fetch: {stats:?}"
    );
    // Record-once: of a burst of first restores, one stores the working set.
    assert_eq!(reports.iter().filter(|r| r.recorded).count(), 1);

    // The handler stays up: a second burst prefetches the working set (read once), and
    // nothing comes from the origin twice.
    let clones = burst(&fx, &h);
    let reports = h.reports(2 * CLONES);
    let second = &reports[CLONES..];
    for r in second {
        assert_eq!(r.error, None, "{r:?}");
        assert!(
            r.working_set_pages > 0 && r.prefetched_segments > 0,
            "{r:?}"
        );
        assert!(!r.recorded);
    }
    check_ids(&clones, second, &mut seen);
    assert_eq!(h.origin.counts().2, 1, "a chunk came from the origin twice");

    // A fresh worker, with the working set stored: a cold burst whose prefetches, one per
    // clone, share their fetches: each chunk once from the origin.
    let h2 = handler(&fx, "cold-prefetch", opts());
    let clones = burst(&fx, &h2);
    let reports = h2.reports(CLONES);
    for r in &reports {
        assert_eq!(r.error, None, "{r:?}");
        assert!(r.prefetched_segments > 0, "{r:?}");
    }
    check_ids(&clones, &reports, &mut seen);
    let (fetches, distinct, most) = h2.origin.counts();
    assert_eq!(
        most, 1,
        "a chunk came from the origin {most} times ({fetches} fetches of {distinct} chunks)"
    );
    let stats = h2.snapshot.burst_stats();
    let prefetched: u64 = reports.iter().map(|r| r.prefetched_segments).sum();
    assert!(
        stats.segment_fetches < prefetched,
        "the clones' prefetches were not shared: {stats:?}, {prefetched} segments prefetched"
    );
}

#[test]
fn restores_past_the_limit_are_refused_by_name_and_the_handler_goes_on() {
    let fx = fixture();
    let h = handler(
        &fx,
        "capped",
        ServeOptions {
            prefetch: Prefetch::None,
            record: RecordPolicy::Never,
            max_sessions: 2,
            ..opts()
        },
    );
    let a = client::restore(&h.socket, SIZE, 1).unwrap();
    let b = client::restore(&h.socket, SIZE, 1).unwrap();
    let err = client::restore(&h.socket, SIZE, 1).unwrap_err().to_string();
    assert_eq!(
        err,
        "refused the VMM's handshake: the handler refused: refused the VMM's handshake: the \
         handler is serving 2 restores, its limit (--max-sessions); retry when one ends, or \
         start another handler"
    );
    let refused = h.reports(1);
    assert!(refused[0].refused && refused[0].generation_id.is_empty());
    assert_eq!(h.snapshot.burst_stats().refused_sessions, 1);

    // The restores being served are unharmed, and a slot freed is taken again.
    // (Page 0 holds each restore's own generation id.)
    assert!(a.memory.bytes()[8192..12288] == fx.memory[8192..12288]);
    drop(a);
    h.reports(2);
    let c = client::restore(&h.socket, SIZE, 1).unwrap();
    let q = workload::query(c.memory.bytes(), 7, 100).unwrap();
    assert_eq!(q.generation_id, c.generation_id.clone().unwrap());
    assert!(b.memory.bytes()[4096..8192] == fx.memory[4096..8192]);
}
