//! Fetching ahead of demand (docs/agent.md, "Prefetch and readahead"): an image's
//! recorded working set, fetched in order when it is attached, and sequential readahead
//! on an attachment; the recording of the working set itself; and what both cost and
//! saved, per image.
//!
//! ```text
//!  attach ─► record stored? ─ yes ─► run_working_set: chunks in record order
//!                │ no (or marked to re-record)       │ one prefetch permit each (bounded)
//!                ▼                                   │ waits while the origin is full
//!  ImageDevice::read_at ─► Prefetch::on_read         ▼
//!     record first touches (until the window,    ChunkCache::prefetch: the object into
//!       the chunk cap or detach)                   the worker's tiers, not decrypted
//!     a prefetched chunk read: its bytes used
//!     sequential reads: readahead window ───────► the same permits
//!  detach: what was prefetched and never read is wasted
//! ```
//!
//! Demand reads never wait behind prefetch: prefetch takes its own permits
//! ([`PrefetchConfig::concurrency`], below the origin's limit), starts a fetch only while
//! the origin has a free slot, and a demand miss of a chunk being prefetched joins that
//! fetch instead of queueing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lode_format::{ChunkIndex, ImageWorkSet};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::{ChunkCache, ImageDevice};

/// Prefetch fetches in flight at once by default, over all attachments.
pub const DEFAULT_PREFETCH_CONCURRENCY: usize = 16;
/// How long after an attach its reads are recorded, by default.
pub const DEFAULT_RECORD_WINDOW: Duration = Duration::from_secs(10);
/// The most chunks one recording keeps, by default (2 GiB of 512 KiB chunks).
pub const DEFAULT_RECORD_MAX_CHUNKS: usize = 4096;
/// The largest readahead window, in chunks, by default (4 MiB of 512 KiB chunks).
pub const DEFAULT_READAHEAD_MAX_CHUNKS: u64 = 8;
/// Bytes read in one sequential run before readahead starts.
const READAHEAD_TRIGGER: u64 = 256 << 10;
/// How far a read may start from where the last one ended and still continue the run:
/// concurrent requests of one sequential reader arrive slightly out of order.
const READAHEAD_SLACK: u64 = 1 << 20;
/// How often a waiting prefetch looks again whether the origin has a free slot.
const BUSY_POLL: Duration = Duration::from_millis(2);

/// How prefetch, readahead and recording behave; checked once, in [`Prefetcher::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Prefetch and readahead fetches in flight at once, over all attachments (at least
    /// 1; keep it below the origin's limit so demand fetches keep slots of their own).
    pub concurrency: usize,
    /// Whether attaching fetches the image's recorded working set ahead of demand.
    pub working_set: bool,
    /// The largest readahead window, in chunks (0 turns readahead off).
    pub readahead_max_chunks: u64,
    /// How long after an attach its first touches are recorded.
    pub record_window: Duration,
    /// The most chunks one recording keeps; reaching it ends the recording.
    pub record_max_chunks: usize,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_PREFETCH_CONCURRENCY,
            working_set: true,
            readahead_max_chunks: DEFAULT_READAHEAD_MAX_CHUNKS,
            record_window: DEFAULT_RECORD_WINDOW,
            record_max_chunks: DEFAULT_RECORD_MAX_CHUNKS,
        }
    }
}

/// The worker's prefetch: its permits and configuration, shared by every attachment.
#[derive(Debug)]
pub struct Prefetcher {
    config: PrefetchConfig,
    permits: Arc<Semaphore>,
}

impl Prefetcher {
    /// The worker's prefetch as `config` says; a concurrency of 0 or a zero record
    /// window is refused, named.
    pub fn new(config: PrefetchConfig) -> Result<Arc<Self>, crate::ReadError> {
        if config.concurrency == 0 || config.concurrency > Semaphore::MAX_PERMITS {
            return Err(crate::ReadError::Config(format!(
                "prefetch concurrency must be at least 1, got {}",
                config.concurrency
            )));
        }
        if config.record_window.is_zero() {
            return Err(crate::ReadError::Config(
                "prefetch record window must be positive".into(),
            ));
        }
        Ok(Arc::new(Self {
            permits: Arc::new(Semaphore::new(config.concurrency)),
            config,
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &PrefetchConfig {
        &self.config
    }
}

/// Why a chunk was fetched ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AheadKind {
    /// It is in the image's recorded working set.
    WorkingSet,
    /// Sequential readahead.
    Readahead,
}

/// The counters of one kind of fetch ahead.
#[derive(Debug, Default)]
struct KindCounters {
    chunks: AtomicU64,
    bytes: AtomicU64,
    used_bytes: AtomicU64,
    wasted_bytes: AtomicU64,
    errors: AtomicU64,
}

/// One kind of fetch ahead, as counted: chunks and plaintext bytes brought from off the
/// worker, those a read then used, those wasted (evicted from the worker's tiers before
/// a read came, or never read while attached), those not read yet (pending), and
/// fetches that failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AheadSnapshot {
    /// Chunks fetched ahead from the AZ cache or the origin.
    pub chunks: u64,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Bytes of those chunks a read then touched.
    pub used_bytes: u64,
    /// Bytes of those evicted before a read came, or never read before the attachment
    /// ended.
    pub wasted_bytes: u64,
    /// Bytes not read yet, on attachments still open.
    pub pending_bytes: u64,
    /// Fetches ahead that failed (the read that needs the chunk fetches it again).
    pub errors: u64,
}

impl KindCounters {
    fn snapshot(&self) -> AheadSnapshot {
        let (bytes, used, wasted) = (
            self.bytes.load(Relaxed),
            self.used_bytes.load(Relaxed),
            self.wasted_bytes.load(Relaxed),
        );
        AheadSnapshot {
            chunks: self.chunks.load(Relaxed),
            bytes,
            used_bytes: used,
            wasted_bytes: wasted,
            pending_bytes: bytes.saturating_sub(used + wasted),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// One image's prefetch figures, over all its attachments on this worker; the agent
/// keeps one per manifest.
#[derive(Debug, Default)]
pub struct PrefetchCounters {
    working_set: KindCounters,
    readahead: KindCounters,
    recorded_chunks: AtomicU64,
    records_stored: AtomicU64,
}

/// [`PrefetchCounters`], copied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PrefetchSnapshot {
    /// The recorded working set fetched ahead.
    pub working_set: AheadSnapshot,
    /// Sequential readahead.
    pub readahead: AheadSnapshot,
    /// Chunks in the working-set records this worker stored for the image.
    pub recorded_chunks: u64,
    /// Working-set records this worker stored for the image.
    pub records_stored: u64,
}

impl PrefetchCounters {
    fn kind(&self, k: AheadKind) -> &KindCounters {
        match k {
            AheadKind::WorkingSet => &self.working_set,
            AheadKind::Readahead => &self.readahead,
        }
    }

    /// A stored record of `chunks` chunks (counted by whoever stores it).
    pub fn record_stored(&self, chunks: usize) {
        self.records_stored.fetch_add(1, Relaxed);
        self.recorded_chunks.fetch_add(chunks as u64, Relaxed);
    }

    /// Every counter.
    pub fn snapshot(&self) -> PrefetchSnapshot {
        PrefetchSnapshot {
            working_set: self.working_set.snapshot(),
            readahead: self.readahead.snapshot(),
            recorded_chunks: self.recorded_chunks.load(Relaxed),
            records_stored: self.records_stored.load(Relaxed),
        }
    }
}

/// The first touches of one attachment, until its window ends, it holds its cap, or the
/// attachment ends.
#[derive(Debug)]
struct Recording {
    until: Instant,
    max: usize,
    chunks: Vec<ChunkIndex>,
    seen: HashSet<u64>,
    full: bool,
}

/// Sequential-read detection and the readahead window of one attachment: a run of reads
/// each starting near where the last ended is a stream; once it has read
/// [`READAHEAD_TRIGGER`] bytes the next chunk is fetched ahead, and the window doubles
/// each time the reader moves into a new chunk, up to its maximum (as Linux's on-demand
/// readahead and mountpoint-s3's prefetcher grow theirs). A read elsewhere ends the run
/// and shrinks the window to nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Readahead {
    /// Where the run's reads have reached (the end of the furthest read).
    next: u64,
    /// Bytes the run has read.
    run: u64,
    /// The chunk the reader is in.
    chunk: u64,
    /// Chunks fetched ahead of the reader's chunk, now.
    window: u64,
    /// Chunks below this one were already asked for by this run.
    issued_to: u64,
}

impl Readahead {
    /// Takes a read of `len` bytes at `offset` (chunks of `chunk_size` bytes) and says
    /// which chunks to fetch ahead now (empty when none), the window at most `max`.
    pub(crate) fn on_read(
        &mut self,
        offset: u64,
        len: u64,
        chunk_size: u64,
        max: u64,
    ) -> std::ops::Range<u64> {
        if len == 0 || max == 0 || chunk_size == 0 {
            return 0..0;
        }
        let end = offset.saturating_add(len);
        let near = offset.abs_diff(self.next) <= READAHEAD_SLACK;
        if self.run == 0 || !near {
            *self = Self {
                next: end,
                run: len,
                chunk: (end - 1) / chunk_size,
                window: 0,
                issued_to: 0,
            };
            return 0..0;
        }
        self.run = self.run.saturating_add(len);
        self.next = self.next.max(end);
        let chunk = (self.next - 1) / chunk_size;
        if self.run < READAHEAD_TRIGGER {
            self.chunk = chunk;
            return 0..0;
        }
        if self.window == 0 {
            self.window = 1;
        } else if chunk > self.chunk {
            self.window = (self.window * 2).min(max);
        }
        self.chunk = chunk;
        let from = self.issued_to.max(chunk + 1);
        let to = chunk + 1 + self.window;
        if from >= to {
            return 0..0;
        }
        self.issued_to = to;
        from..to
    }
}

/// What one attachment fetched ahead and has not seen read yet, and what it read.
#[derive(Debug, Default)]
struct State {
    recording: Option<Recording>,
    /// Chunks fetched ahead from off the worker and not read yet: their bytes and kind.
    ahead: HashMap<u64, (u64, AheadKind)>,
    /// Chunks a prefetch was started for (never started twice).
    issued: HashSet<u64>,
    /// Chunks a read has touched.
    touched: HashSet<u64>,
    readahead: Readahead,
    /// The attachment ended: what is fetched from now on is wasted at once.
    closed: bool,
}

/// One attachment's prefetch: recording, readahead and the accounting of what was fetched
/// ahead. An [`ImageDevice`] given one with [`ImageDevice::with_prefetch`] reports every
/// read to it.
#[derive(Debug)]
pub struct Prefetch {
    prefetcher: Arc<Prefetcher>,
    counters: Arc<PrefetchCounters>,
    state: Mutex<State>,
    recorded: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent before it can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Prefetch {
    /// An attachment's prefetch under `prefetcher`, counting into `counters` (the
    /// image's); `record` starts a recording of its first touches now.
    pub fn new(
        prefetcher: Arc<Prefetcher>,
        counters: Arc<PrefetchCounters>,
        record: bool,
    ) -> Arc<Self> {
        let c = &prefetcher.config;
        let recording = record.then(|| Recording {
            until: Instant::now() + c.record_window,
            max: c.record_max_chunks.max(1),
            chunks: Vec::new(),
            seen: HashSet::new(),
            full: false,
        });
        Arc::new(Self {
            counters,
            state: Mutex::new(State {
                recording,
                ..State::default()
            }),
            recorded: Notify::new(),
            prefetcher,
        })
    }

    /// The image's counters.
    pub fn counters(&self) -> &Arc<PrefetchCounters> {
        &self.counters
    }

    /// Whether a recording is under way.
    pub fn recording(&self) -> bool {
        lock(&self.state).recording.is_some()
    }

    /// Waits until the recording is over (its window passed or its cap reached) and
    /// takes it; `None` when there is none or another caller took it (the attachment
    /// ended first).
    pub async fn recorded(&self) -> Option<ImageWorkSet> {
        let until = lock(&self.state).recording.as_ref()?.until;
        let _ = tokio::time::timeout_at(until.into(), self.recorded.notified()).await;
        self.take_recording()
    }

    /// Ends the recording now and takes what it holds (`None` when there is none).
    pub fn take_recording(&self) -> Option<ImageWorkSet> {
        let r = lock(&self.state).recording.take()?;
        // A caller waiting in `recorded` finds nothing left and returns now.
        self.recorded.notify_one();
        Some(ImageWorkSet {
            chunks: r.chunks,
            rerecord: false,
        })
    }

    /// A read of `len` bytes at `offset` of `dev`: records first touches, counts
    /// prefetched chunks it uses, and starts readahead when the reads are sequential.
    pub(crate) fn on_read(self: &Arc<Self>, dev: &ImageDevice, offset: u64, len: u64) {
        let touched = dev.chunks_touched(offset, len);
        let cs = dev.chunk_size().bytes_u64();
        let max = self.prefetcher.config.readahead_max_chunks;
        let mut start = Vec::new();
        {
            let mut st = lock(&self.state);
            let now = Instant::now();
            for i in touched {
                if !st.touched.insert(i) {
                    continue;
                }
                if let Some((bytes, kind)) = st.ahead.remove(&i) {
                    // Evicted before this read came: the read fetches it again.
                    let kept = dev
                        .chunk_ref(i)
                        .ok()
                        .flatten()
                        .is_some_and(|(c, _)| dev.cache().holds_locally(&c));
                    let c = self.counters.kind(kind);
                    if kept {
                        c.used_bytes.fetch_add(bytes, Relaxed);
                    } else {
                        c.wasted_bytes.fetch_add(bytes, Relaxed);
                    }
                }
                if let Some(r) = st.recording.as_mut()
                    && !r.full
                    && now < r.until
                    && !dev.is_zero_chunk(i)
                    && r.seen.insert(i)
                {
                    r.chunks.push(ChunkIndex(i));
                    if r.chunks.len() >= r.max {
                        r.full = true;
                        self.recorded.notify_one();
                    }
                }
            }
            for i in st.readahead.on_read(offset, len, cs, max) {
                if i >= dev.chunk_count() {
                    break;
                }
                if st.touched.contains(&i) || dev.is_zero_chunk(i) || !st.issued.insert(i) {
                    continue;
                }
                start.push(i);
            }
        }
        for i in start {
            if let Some(job) = Job::of(dev, i, AheadKind::Readahead) {
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    if let Some(permit) = this.permit(&job.cache).await {
                        job.run(&this, permit).await;
                    }
                });
            }
        }
    }

    /// Waits for a prefetch permit and for the origin to have a free slot; `None` when
    /// the attachment ended meanwhile.
    async fn permit(&self, cache: &ChunkCache) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.prefetcher.permits)
            .acquire_owned()
            .await
            .ok()?;
        loop {
            if lock(&self.state).closed {
                return None;
            }
            if !cache.origin_busy() {
                return Some(permit);
            }
            tokio::time::sleep(BUSY_POLL).await;
        }
    }

    /// Fetches `chunks` of `dev` ahead of demand, in order, each once a permit is free
    /// and the origin has a slot; chunks already read, already asked for or zero are
    /// skipped. Returns when every fetch has started (or the attachment ended).
    pub async fn run_working_set(self: &Arc<Self>, dev: &ImageDevice, chunks: &[ChunkIndex]) {
        for &ChunkIndex(i) in chunks {
            if i >= dev.chunk_count() {
                continue;
            }
            {
                let st = lock(&self.state);
                if st.closed {
                    return;
                }
                if st.touched.contains(&i) || st.issued.contains(&i) {
                    continue;
                }
            }
            let Some(job) = Job::of(dev, i, AheadKind::WorkingSet) else {
                continue;
            };
            let Some(permit) = self.permit(&job.cache).await else {
                return;
            };
            // Read or asked for while this waited for its permit.
            {
                let mut st = lock(&self.state);
                if st.touched.contains(&i) || !st.issued.insert(i) {
                    continue;
                }
            }
            let this = Arc::clone(self);
            tokio::spawn(async move { job.run(&this, permit).await });
        }
    }

    /// The attachment ended: nothing more is fetched ahead for it, and what was fetched
    /// and never read is wasted.
    pub fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        for (_, (bytes, kind)) in st.ahead.drain() {
            self.counters
                .kind(kind)
                .wasted_bytes
                .fetch_add(bytes, Relaxed);
        }
    }

    /// A fetch ahead ended: count what it brought from off the worker.
    fn fetched(&self, index: u64, bytes: u64, kind: AheadKind, remote: bool) {
        if !remote {
            return;
        }
        let c = self.counters.kind(kind);
        c.chunks.fetch_add(1, Relaxed);
        c.bytes.fetch_add(bytes, Relaxed);
        let mut st = lock(&self.state);
        if st.closed {
            c.wasted_bytes.fetch_add(bytes, Relaxed);
        } else if st.touched.contains(&index) {
            // Read while the fetch ran: the read joined it.
            c.used_bytes.fetch_add(bytes, Relaxed);
        } else {
            st.ahead.insert(index, (bytes, kind));
        }
    }
}

/// One chunk to fetch ahead.
struct Job {
    cache: Arc<ChunkCache>,
    chunk: crate::ChunkRef,
    index: u64,
    kind: AheadKind,
    trace: Option<Arc<crate::StartTrace>>,
}

impl Job {
    /// The fetch of chunk `i` of `dev`, or `None` for a zero chunk.
    fn of(dev: &ImageDevice, i: u64, kind: AheadKind) -> Option<Job> {
        let (chunk, _) = dev.chunk_ref(i).ok()??;
        Some(Job {
            cache: Arc::clone(dev.cache()),
            chunk,
            index: i,
            kind,
            trace: dev.trace().cloned(),
        })
    }

    /// Fetches the chunk, holding `permit` until it is in the tiers.
    async fn run(self, p: &Prefetch, permit: OwnedSemaphorePermit) {
        let started = std::time::Instant::now();
        let r = self.cache.prefetch_served(self.chunk).await;
        drop(permit);
        if let (Some(t), Ok(Some((_, served)))) = (&self.trace, &r) {
            let c = &self.chunk;
            t.read(self.index, &c.name, c.max_bytes, *served, started.elapsed());
        }
        match r.map(|s| s.is_some_and(|(remote, _)| remote)) {
            Ok(remote) => p.fetched(
                self.index,
                u64::from(self.chunk.plain_len),
                self.kind,
                remote,
            ),
            Err(_) => {
                p.counters.kind(self.kind).errors.fetch_add(1, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 512 << 10;

    /// Feeds reads of `len` bytes at each offset; what each asked to fetch ahead.
    fn feed(ra: &mut Readahead, reads: &[(u64, u64)], max: u64) -> Vec<Vec<u64>> {
        reads
            .iter()
            .map(|&(o, l)| ra.on_read(o, l, CS, max).collect())
            .collect()
    }

    #[test]
    fn sequential_reads_start_readahead_and_the_window_doubles() {
        let mut ra = Readahead::default();
        // 128 KiB reads from 0: the trigger is 256 KiB read in one run.
        let reads: Vec<(u64, u64)> = (0..24).map(|k| (k * (128 << 10), 128 << 10)).collect();
        let got = feed(&mut ra, &reads, 8);
        assert_eq!(got[0], Vec::<u64>::new(), "one read is no run");
        assert_eq!(got[1], vec![1], "256 KiB read: the next chunk");
        assert_eq!(
            got[2],
            Vec::<u64>::new(),
            "same chunk, window already issued"
        );
        // Read 4 enters chunk 1: window 2 → chunks 2 and 3.
        assert_eq!(got[4], vec![2, 3]);
        // Chunk 2: window 4 → up to chunk 6.
        assert_eq!(got[8], vec![4, 5, 6]);
        // Chunk 3: window 8 → up to chunk 11.
        assert_eq!(got[12], vec![7, 8, 9, 10, 11]);
        // Chunk 4: the window stays at its maximum, one more chunk.
        assert_eq!(got[16], vec![12]);
        let all: Vec<u64> = got.concat();
        let mut sorted = all.clone();
        sorted.dedup();
        assert_eq!(all, sorted, "no chunk asked for twice");
    }

    #[test]
    fn a_random_read_ends_the_run_and_small_reorderings_do_not() {
        let mut ra = Readahead::default();
        let k = 128u64 << 10;
        // Out of order by one request, as concurrent requests of one reader arrive.
        let got = feed(&mut ra, &[(0, k), (2 * k, k), (k, k), (3 * k, k)], 8);
        assert!(got.concat().contains(&1), "{got:?}");
        // A jump far away: a new run, nothing fetched ahead.
        let got = feed(&mut ra, &[(100 * CS, 4096)], 8);
        assert_eq!(got, vec![Vec::<u64>::new()]);
        assert_eq!(ra.window, 0);
        // Random 4 KiB reads never start readahead.
        let mut ra = Readahead::default();
        let reads: Vec<(u64, u64)> = (0..64).map(|i| ((i * 7919 % 97) * CS, 4096)).collect();
        assert!(feed(&mut ra, &reads, 8).concat().is_empty());
        // A window of 0 turns readahead off.
        let mut ra = Readahead::default();
        let reads: Vec<(u64, u64)> = (0..24).map(|i| (i * k, k)).collect();
        assert!(feed(&mut ra, &reads, 0).concat().is_empty());
    }

    #[test]
    fn a_bad_config_is_named() {
        let e = |c: PrefetchConfig| Prefetcher::new(c).unwrap_err().to_string();
        assert!(
            e(PrefetchConfig {
                concurrency: 0,
                ..PrefetchConfig::default()
            })
            .contains("prefetch concurrency must be at least 1, got 0")
        );
        assert!(
            e(PrefetchConfig {
                record_window: Duration::ZERO,
                ..PrefetchConfig::default()
            })
            .contains("record window must be positive")
        );
    }
}
