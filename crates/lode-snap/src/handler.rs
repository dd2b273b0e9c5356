//! The page-fault handler: Firecracker's UFFD handshake on a Unix socket, then one event
//! loop per restore that serves faults from the worker's chunk cache.
//!
//! The handler's unit is the segment ([`lode_read::ImageDevice::segment_len`]): a v2
//! chunk's segments are fetched, checked and decrypted alone, so a fault waits for its
//! own segment only (a v1 chunk is one segment, so there the unit is the chunk).
//!
//! ```text
//! accept ─► recvmsg: JSON + SCM_RIGHTS uffd ─► parse_mappings (refuse: error line, close)
//!        ─► reply {"generation_id": …}, prefetch the recorded working set (background)
//! loop:  uffd readable ─► parse_event ─► PageFault: outside every region → refuse, end
//!                                         removed page → UFFDIO_ZEROPAGE
//!                                         zero chunk → ZEROPAGE over the chunk's pages
//!                                         else → join/start the segment's fetch, wait
//!                                       Remove/Unmap → those pages read zero from now on
//!        segment fetched ─► UFFDIO_COPY of every page of it in every region, skipping
//!                           removed pages; EEXIST: present, wake and skip; EAGAIN: the
//!                           address space is changing, retry after reading the events
//!        client socket closed ─► end; store the working set (first restore by default)
//! ```
//!
//! Restores of one snapshot run at once, each its own session (its own userfaultfd,
//! regions, generation id and installs), up to [`ServeOptions::max_sessions`]; a
//! connection past that is refused with [`SnapError::Busy`] after its handshake is read.
//! They share the worker's chunk cache and, through the [`Snapshot`], the working-set
//! record (read once) and the fetches of segments in flight: a segment that another
//! restore is fetching (a fault or its prefetch) is joined, not fetched and decrypted
//! again, so a burst of clones reads each segment once and installs it in each clone.
//!
//! One loop owns every install, so an install never races a remove it has not seen: the
//! kernel holds the madvise until its REMOVE event is read, and copies fail with EAGAIN
//! meanwhile. A fetch is polled once as its fault is read: a segment that is ready at once
//! (decrypted memory, or read in place from a local tier) is installed there and then;
//! one that waits (the origin, the AZ fleet) runs as a task of its own. Those run
//! concurrently and single-flight in the cache (which also joins the fetches of two
//! segments of one chunk); a segment is fetched once per restore and all its pages
//! installed together, so neighbouring pages in it do not fault. A zero
//! chunk costs no fetch at all, so a fault there zero-fills the whole chunk at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use lode_format::SegmentIndex;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};

use crate::mapping::{self, Mapping, PAGE_SIZE};
use crate::record::WorkingSet;
use crate::socket::recv_handshake;
use crate::uffd::{Event, Fill, MSG_SIZE, Uffd, parse_event};
use crate::{SnapError, Snapshot, usize_of};

/// A finished fetch: the unit (segment), its bytes (None: all zero) or why not, and
/// whether it was a prefetch.
type Fetched = (u64, Result<Option<Bytes>, String>, bool);

/// What to install ahead of demand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    /// The segments holding the stored working set's pages, in fault order (REAP).
    #[default]
    Recorded,
    /// Nothing: every page on demand.
    None,
    /// Every segment of every region, in order (eager, for comparison).
    All,
}

/// When to store the pages a restore faulted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordPolicy {
    /// When the snapshot has no record yet (REAP's record-once).
    #[default]
    Auto,
    /// After every restore, replacing the record.
    Always,
    /// Never.
    Never,
}

/// How restores are served.
#[derive(Clone, Debug, Serialize)]
pub struct ServeOptions {
    /// What to install ahead of demand.
    pub prefetch: Prefetch,
    /// When to store the working set.
    pub record: RecordPolicy,
    /// Segments prefetched at once.
    pub prefetch_concurrency: usize,
    /// Where in the snapshot (16 bytes, 16-aligned) each restore's generation id is
    /// written, so the restored code can read it there; `None` writes it nowhere.
    pub generation_id_offset: Option<u64>,
    /// How long to wait for the handshake after a client connects.
    pub handshake_timeout: Duration,
    /// Restores served at once; a connection past this is refused ([`SnapError::Busy`]).
    /// Each holds a few bits per page of the snapshot and a word per page it faults.
    pub max_sessions: usize,
}

/// The default of [`ServeOptions::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: usize = 128;

impl ServeOptions {
    /// Checks the options against a snapshot of `snapshot_size` bytes.
    pub fn check(&self, snapshot_size: u64) -> Result<(), SnapError> {
        match self.generation_id_offset {
            Some(off)
                if !off.is_multiple_of(16)
                    || off.checked_add(16).is_none_or(|e| e > snapshot_size) =>
            {
                Err(SnapError::Unsupported(format!(
                    "generation id offset {off} must be 16-aligned and inside the \
                     {snapshot_size}-byte snapshot"
                )))
            }
            _ => Ok(()),
        }
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            prefetch: Prefetch::Recorded,
            record: RecordPolicy::Auto,
            prefetch_concurrency: 16,
            generation_id_offset: None,
            handshake_timeout: Duration::from_secs(10),
            max_sessions: DEFAULT_MAX_SESSIONS,
        }
    }
}

/// What one restore did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionReport {
    /// This restore's generation id (hex).
    pub generation_id: String,
    /// Regions the VMM sent.
    pub regions: usize,
    /// Page-fault events read.
    pub faults: u64,
    /// Faults answered with a zero page (zero chunk or removed page).
    pub zero_faults: u64,
    /// The bytes of the snapshot each fetch brings: the segment size (v2), or the chunk
    /// size (v1, whose chunk is one segment).
    pub segment_bytes: u64,
    /// Segments fetched because of a fault (the unit of a fetch).
    pub demand_segments: u64,
    /// Segments installed ahead of demand (a zero chunk's count too: they cost no fetch).
    pub prefetched_segments: u64,
    /// Distinct chunks at least one of whose segments was fetched because of a fault.
    pub demand_chunks: u64,
    /// Distinct chunks at least one of whose segments was installed ahead of demand.
    pub prefetched_chunks: u64,
    /// Pages installed by copy.
    pub pages_copied: u64,
    /// Pages installed as zero pages.
    pub pages_zeroed: u64,
    /// Pages already present when installed (EEXIST).
    pub pages_present: u64,
    /// Installs retried after EAGAIN.
    pub retries: u64,
    /// Pages removed by the VMM (balloon).
    pub pages_removed: u64,
    /// Pages in the working-set record used for prefetch (0 when none).
    pub working_set_pages: u64,
    /// Whether this restore's faults were stored as the working set.
    pub recorded: bool,
    /// Microseconds from reading each fault to its page being installed, in fault order.
    pub fault_us: Vec<u32>,
    /// Seconds from the handshake to the end.
    pub seconds: f64,
    /// Why the restore ended abnormally, if it did.
    pub error: Option<String>,
    /// Whether it was refused because `max_sessions` restores were being served (no
    /// generation id, nothing installed).
    pub refused: bool,
}

impl SessionReport {
    /// The `pct` percentile (0 to 100) of fault service time in microseconds.
    pub fn fault_percentile(&self, pct: u32) -> Option<u32> {
        let mut v = self.fault_us.clone();
        v.sort_unstable();
        let last = v.len().checked_sub(1)?;
        let pct = usize::try_from(pct.min(100)).unwrap_or(100);
        v.get((last * pct).div_ceil(100)).copied()
    }
}

/// A segment's fetch that restores join: its plaintext (`None`: a zero chunk) or why not.
type Flight = futures::future::Shared<BoxFuture<'static, Result<Option<Bytes>, String>>>;

/// What the restores of one snapshot share, held by the [`Snapshot`].
#[derive(Default)]
pub(crate) struct SharedState {
    /// The working-set record as last read or stored, and when (inner `None`: there was
    /// none).
    pub(crate) working_set: tokio::sync::Mutex<Option<(Instant, Option<Arc<crate::WorkingSet>>)>>,
    /// Segment fetches in flight, by unit.
    flights: std::sync::Mutex<HashMap<u64, Flight>>,
    /// Set by the restore that stores the record under [`RecordPolicy::Auto`], so a burst
    /// of first restores stores it once.
    record_claimed: AtomicBool,
    started: AtomicU64,
    joined: AtomicU64,
    sessions: AtomicUsize,
    peak_sessions: AtomicUsize,
    refused: AtomicU64,
}

impl std::fmt::Debug for SharedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl SharedState {
    pub(crate) fn stats(&self) -> BurstStats {
        BurstStats {
            segment_fetches: self.started.load(Ordering::Relaxed),
            joined_segment_fetches: self.joined.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            peak_sessions: self.peak_sessions.load(Ordering::Relaxed),
            refused_sessions: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// What the restores of one snapshot shared, since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BurstStats {
    /// Segment fetches started through the chunk cache (a fault's or a prefetch's).
    pub segment_fetches: u64,
    /// Times a restore joined a fetch of a segment already in flight (another
    /// restore's, usually) instead of starting its own.
    pub joined_segment_fetches: u64,
    /// Restores being served now (past their handshake or in it).
    pub sessions: usize,
    /// The most restores served at once.
    pub peak_sessions: usize,
    /// Connections refused because `max_sessions` restores were being served.
    pub refused_sessions: u64,
}

/// Counts a session in [`SharedState`] while it lives.
struct SessionSlot(Arc<Snapshot>);

impl SessionSlot {
    fn new(snapshot: &Arc<Snapshot>) -> Self {
        let s = &snapshot.shared;
        let now = s.sessions.fetch_add(1, Ordering::AcqRel) + 1;
        s.peak_sessions.fetch_max(now, Ordering::AcqRel);
        Self(snapshot.clone())
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.shared.sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves restores of `snapshot` on `listener` until the task is dropped, at most
/// `opts.max_sessions` at once; each finished (or refused) restore is passed to
/// `on_report`.
pub async fn serve(
    listener: UnixListener,
    snapshot: Arc<Snapshot>,
    opts: ServeOptions,
    on_report: Arc<dyn Fn(SessionReport) + Send + Sync>,
) -> Result<(), SnapError> {
    let slots = Arc::new(Semaphore::new(opts.max_sessions.max(1)));
    // Refusals read a handshake too (up to the timeout each); as many at once as
    // sessions, so a flood of connections cannot hold threads and memory without bound.
    // Past that a connection is closed unanswered.
    let refusals = Arc::new(Semaphore::new(opts.max_sessions.max(1)));
    loop {
        let (stream, _) = listener.accept().await.map_err(|source| SnapError::Io {
            what: "accepting a VMM connection".into(),
            source,
        })?;
        let (snapshot, opts, on_report) = (snapshot.clone(), opts.clone(), on_report.clone());
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    on_report(session(stream, snapshot, opts).await);
                    drop(permit);
                });
            }
            Err(_) => {
                snapshot.shared.refused.fetch_add(1, Ordering::Relaxed);
                let Ok(permit) = refusals.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                tokio::spawn(async move {
                    on_report(refuse(stream, &opts).await);
                    drop(permit);
                });
            }
        }
    }
}

/// Refuses a restore past the limit: reads its handshake (so the VMM's send completes
/// and it reads the reason rather than a reset connection), answers with the reason,
/// and closes. The userfaultfd it sent is closed unused.
async fn refuse(stream: UnixStream, opts: &ServeOptions) -> SessionReport {
    let started = Instant::now();
    let busy = SnapError::Busy {
        limit: opts.max_sessions.max(1),
    };
    let mut report = SessionReport {
        error: Some(busy.to_string()),
        refused: true,
        ..Default::default()
    };
    if let Ok((std, _)) = handshake(stream, opts.handshake_timeout).await {
        let line = format!("{}\n", serde_json::json!({"error": busy.to_string()}));
        let _ = std::io::Write::write_all(&mut &std, line.as_bytes());
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// Binds `path` (replacing a stale socket file) for [`serve`].
pub fn bind(path: &Path) -> Result<UnixListener, SnapError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(SnapError::Unsupported(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SnapError::Unsupported(format!(
                "{} is in use by another handler",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| SnapError::Io {
        what: format!("binding {}", path.display()),
        source,
    })
}

/// One restore, from handshake to the client closing its socket.
pub async fn session(
    stream: UnixStream,
    snapshot: Arc<Snapshot>,
    opts: ServeOptions,
) -> SessionReport {
    let started = Instant::now();
    let _slot = SessionSlot::new(&snapshot);
    let mut report = SessionReport::default();
    let mut generation = [0u8; 16];
    // SystemRandom only fails when the OS has no randomness at all.
    let _ = SystemRandom::new().fill(&mut generation);
    report.generation_id = hex(&generation);
    let result = run_session(stream, &snapshot, &opts, generation, &mut report).await;
    if let Err(e) = result {
        report.error = Some(e.to_string());
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn handshake(
    stream: UnixStream,
    timeout: Duration,
) -> Result<(std::os::unix::net::UnixStream, crate::socket::Handshake), SnapError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| SnapError::Io { what, source }
    };
    let std = stream.into_std().map_err(io("taking the VMM connection"))?;
    std.set_nonblocking(false)
        .map_err(io("configuring the VMM connection"))?;
    std.set_read_timeout(Some(timeout))
        .map_err(io("configuring the VMM connection"))?;
    tokio::task::spawn_blocking(move || {
        let h = recv_handshake(&std);
        h.map(|h| (std, h))
    })
    .await
    .map_err(|e| SnapError::Handshake(format!("handshake task failed: {e}")))?
    .map_err(|source| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            SnapError::Handshake(format!("no handshake within {timeout:?} of connecting"))
        }
        _ => SnapError::Io {
            what: "reading the handshake".into(),
            source,
        },
    })
}

async fn run_session(
    stream: UnixStream,
    snapshot: &Arc<Snapshot>,
    opts: &ServeOptions,
    generation: [u8; 16],
    report: &mut SessionReport,
) -> Result<(), SnapError> {
    let (std, h) = handshake(stream, opts.handshake_timeout).await?;
    std.set_nonblocking(true).map_err(|source| SnapError::Io {
        what: "configuring the VMM connection".into(),
        source,
    })?;
    let mut stream = UnixStream::from_std(std).map_err(|source| SnapError::Io {
        what: "registering the VMM connection".into(),
        source,
    })?;
    let checked = check_handshake(h, snapshot.size());
    let (uffd, mappings) = match checked {
        Ok(v) => v,
        Err(e) => {
            let _ = stream
                .write_all(format!("{}\n", serde_json::json!({"error": e.to_string()})).as_bytes())
                .await;
            return Err(e);
        }
    };
    report.regions = mappings.len();
    let line = serde_json::json!({"generation_id": hex(&generation)});
    // Firecracker does not read this; lode's client does. A failed write is not fatal.
    let _ = stream.write_all(format!("{line}\n").as_bytes()).await;

    let working_set = if opts.prefetch == Prefetch::Recorded || opts.record == RecordPolicy::Auto {
        match snapshot.working_set_for_restore().await {
            Ok(ws) => ws,
            Err(e) => {
                eprintln!("lode snapshot serve: ignoring the working-set record: {e}");
                None
            }
        }
    } else {
        None
    };
    let mut s = Session::new(snapshot.clone(), uffd, mappings, opts, generation)?;
    report.segment_bytes = s.unit;
    let prefetch_order = match opts.prefetch {
        Prefetch::None => Vec::new(),
        Prefetch::Recorded => working_set
            .as_ref()
            .map(|ws| {
                report.working_set_pages = ws.pages.len() as u64;
                s.units_of_pages(&ws.pages)
            })
            .unwrap_or_default(),
        Prefetch::All => s.all_units(),
    };
    let result = s
        .run(
            &mut stream,
            prefetch_order,
            opts.prefetch_concurrency,
            report,
        )
        .await;
    let worth_storing = result.is_ok() && !s.recorded.is_empty();
    let claimed = &snapshot.shared.record_claimed;
    let store = match opts.record {
        RecordPolicy::Never => false,
        RecordPolicy::Always => worth_storing,
        // The first restore of a burst to end stores it; the others ran the same
        // snapshot without a record, and one record is all REAP keeps.
        RecordPolicy::Auto => {
            worth_storing
                && working_set.is_none()
                && claimed
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
        }
    };
    if store {
        let ws = WorkingSet {
            pages: std::mem::take(&mut s.recorded),
        };
        match snapshot.store_working_set(&ws).await {
            Ok(()) => report.recorded = true,
            Err(e) => {
                // Let a later restore try.
                claimed.store(false, Ordering::Release);
                eprintln!("lode snapshot serve: could not store the working set: {e}");
            }
        }
    }
    if let Err(e) = &result {
        let _ = stream
            .write_all(format!("{}\n", serde_json::json!({"error": e.to_string()})).as_bytes())
            .await;
    }
    result
}

/// Checks the handshake's descriptors and mappings.
fn check_handshake(
    h: crate::socket::Handshake,
    snapshot_size: u64,
) -> Result<(Uffd, Vec<Mapping>), SnapError> {
    if h.body.is_empty() && h.fds.is_empty() {
        return Err(SnapError::Handshake(
            "the VMM closed the connection before the handshake".into(),
        ));
    }
    if h.truncated {
        return Err(SnapError::Handshake(
            "the handshake carried more descriptors than one userfaultfd".into(),
        ));
    }
    let mut fds = h.fds;
    if fds.len() != 1 {
        return Err(SnapError::Handshake(format!(
            "the handshake carried {} file descriptors; it must carry exactly one, the \
             userfaultfd (sent with SCM_RIGHTS)",
            fds.len()
        )));
    }
    let mappings = mapping::parse_mappings(&h.body, snapshot_size)?;
    let fd = fds.remove(0);
    // A userfaultfd answers UFFDIO_WAKE on a registered or unregistered range alike;
    // any other descriptor refuses the ioctl, which catches a wrong fd up front.
    let uffd = Uffd::from_fd(fd);
    uffd.wake(mappings[0].base, PAGE_SIZE).map_err(|e| {
        SnapError::Handshake(format!("the descriptor sent is not a userfaultfd ({e})"))
    })?;
    Ok((uffd, mappings))
}

const IDLE: u8 = 0;
const FETCHING: u8 = 1;
const INSTALLED: u8 = 2;

/// An install waiting to be (re)tried: the units `units` (one fetched segment, or every
/// segment of a zero chunk), with their bytes (`None`: all zero).
struct Install {
    units: Range<u64>,
    data: Option<Bytes>,
}

/// Work put back after EAGAIN.
enum Retry {
    Install(Install),
    /// A removed page's zero fill; the time its fault was read, if it was a fault.
    ZeroPage(u64, Option<Instant>),
}

struct UffdFd(Uffd);
impl AsRawFd for UffdFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

struct Session {
    snapshot: Arc<Snapshot>,
    uffd: AsyncFd<UffdFd>,
    mappings: Vec<Mapping>,
    chunk_size: u64,
    /// The install unit: the segment length (a power of two that divides the chunk size).
    unit: u64,
    /// Per unit: IDLE, FETCHING or INSTALLED.
    state: Arc<Vec<AtomicU8>>,
    /// Pages (snapshot page numbers) that read as zero from now on.
    removed: Vec<u64>,
    /// Pages already recorded.
    seen: Vec<u64>,
    recorded: Vec<u64>,
    /// Chunks counted in `demand_chunks` and in `prefetched_chunks`.
    demand_chunks: Vec<u64>,
    prefetched_chunks: Vec<u64>,
    /// Faults waiting on a unit: (page address, when read).
    waiting: HashMap<u64, Vec<(u64, Instant)>>,
    retry: VecDeque<Retry>,
    generation: Option<(u64, [u8; 16])>,
}

fn bit(v: &[u64], i: u64) -> bool {
    v.get(usize_of(i / 64))
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}
fn set_bit(v: &mut [u64], i: u64) -> bool {
    match v.get_mut(usize_of(i / 64)) {
        Some(w) => {
            let was = *w & (1 << (i % 64)) != 0;
            *w |= 1 << (i % 64);
            !was
        }
        None => false,
    }
}
fn bitset(bits: u64) -> Vec<u64> {
    vec![0; usize_of(bits.div_ceil(64))]
}

enum Step {
    Event(Result<(), SnapError>),
    Fetched(u64, Result<Option<Bytes>, String>, bool),
    ClientGone,
    Retry,
}

impl Session {
    fn new(
        snapshot: Arc<Snapshot>,
        uffd: Uffd,
        mappings: Vec<Mapping>,
        opts: &ServeOptions,
        generation: [u8; 16],
    ) -> Result<Session, SnapError> {
        let chunk_size = snapshot.chunk_size().bytes_u64();
        // Both are powers of two at least a page long, so the unit divides the chunk and
        // every unit is whole pages of one chunk.
        let unit = snapshot.device().segment_len();
        let units = snapshot.size().div_ceil(unit);
        let chunks = snapshot.size().div_ceil(chunk_size);
        let pages = snapshot.size().div_ceil(PAGE_SIZE);
        opts.check(snapshot.size())?;
        let generation = opts.generation_id_offset.map(|off| (off, generation));
        // SAFETY: `UffdFd` owns its descriptor (an `OwnedFd` inside `Uffd`), closes it
        // only when dropped, and always returns the same one.
        let uffd = unsafe { AsyncFd::register_with_interest(UffdFd(uffd), Interest::READABLE) }
            .map_err(|e| SnapError::Io {
                what: "registering the userfaultfd".into(),
                source: std::io::Error::from(e),
            })?;
        Ok(Session {
            snapshot,
            uffd,
            mappings,
            chunk_size,
            unit,
            state: Arc::new((0..units).map(|_| AtomicU8::new(IDLE)).collect()),
            removed: bitset(pages),
            seen: bitset(pages),
            recorded: Vec::new(),
            demand_chunks: bitset(chunks),
            prefetched_chunks: bitset(chunks),
            waiting: HashMap::new(),
            retry: VecDeque::new(),
            generation,
        })
    }

    /// The snapshot bytes of `units`: `[start, end)`, the last unit cut at the end of
    /// the snapshot.
    fn span(&self, units: &Range<u64>) -> (u64, u64) {
        (
            units.start * self.unit,
            (units.end * self.unit).min(self.snapshot.size()),
        )
    }

    /// Every unit of `chunk`.
    fn units_of_chunk(&self, chunk: u64) -> Range<u64> {
        let per_chunk = self.chunk_size / self.unit;
        let last = self.snapshot.size().div_ceil(self.unit);
        (chunk * per_chunk).min(last)..((chunk + 1) * per_chunk).min(last)
    }

    /// The units holding `pages`, first appearance first, limited to mapped memory.
    fn units_of_pages(&self, pages: &[u64]) -> Vec<u64> {
        let mut seen = HashSet::new();
        pages
            .iter()
            .map(|p| p * PAGE_SIZE)
            .filter(|off| {
                self.mappings
                    .iter()
                    .any(|m| *off >= m.offset && *off - m.offset < m.size)
            })
            .map(|off| off / self.unit)
            .filter(|u| seen.insert(*u))
            .collect()
    }

    /// Every unit that overlaps a region, in snapshot order.
    fn all_units(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .mappings
            .iter()
            .flat_map(|m| m.offset / self.unit..(m.offset + m.size).div_ceil(self.unit))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    async fn run(
        &mut self,
        stream: &mut UnixStream,
        prefetch: Vec<u64>,
        concurrency: usize,
        report: &mut SessionReport,
    ) -> Result<(), SnapError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Fetched>();
        let prefetcher = self.spawn_prefetch(prefetch, concurrency.max(1), tx.clone());
        let mut buf = [0u8; 64 * MSG_SIZE];
        let mut sink = [0u8; 256];
        let result = loop {
            let step = tokio::select! {
                biased;
                r = self.uffd.readable() => {
                    match r {
                        Ok(mut guard) => {
                            guard.clear_ready();
                            Step::Event(self.drain_events(&mut buf, &tx, report))
                        }
                        Err(source) => Step::Event(Err(SnapError::Io { what: "polling the userfaultfd".into(), source })),
                    }
                }
                Some((unit, r, pre)) = rx.recv() => Step::Fetched(unit, r, pre),
                r = stream.read(&mut sink) => match r {
                    Ok(0) | Err(_) => Step::ClientGone,
                    Ok(_) => continue,
                },
                _ = tokio::time::sleep(Duration::from_millis(1)), if !self.retry.is_empty() => Step::Retry,
            };
            let r = match step {
                Step::Event(r) => r,
                Step::Fetched(unit, Ok(data), prefetched) => {
                    if prefetched {
                        report.prefetched_segments += 1;
                        let chunk = unit * self.unit / self.chunk_size;
                        if set_bit(&mut self.prefetched_chunks, chunk) {
                            report.prefetched_chunks += 1;
                        }
                    }
                    self.install(
                        Install {
                            units: unit..unit + 1,
                            data,
                        },
                        report,
                    )
                }
                Step::Fetched(unit, Err(reason), _) => Err(SnapError::Chunk {
                    index: unit * self.unit / self.chunk_size,
                    offset: unit * self.unit,
                    reason,
                }),
                Step::ClientGone => break Ok(()),
                Step::Retry => {
                    let pending: Vec<Retry> = self.retry.drain(..).collect();
                    pending.into_iter().try_for_each(|r| {
                        report.retries += 1;
                        match r {
                            Retry::Install(i) => self.install(i, report),
                            Retry::ZeroPage(page, read_at) => self.zero_page(page, read_at, report),
                        }
                    })
                }
            };
            match r {
                Ok(()) => {}
                // The VMM exited before its socket's close was read (or with installs
                // still queued): the restore ended as if it had closed the socket.
                Err(SnapError::Uffd(crate::uffd::UffdError::AddressSpaceGone { .. })) => {
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        prefetcher.abort();
        result
    }

    fn spawn_prefetch(
        &self,
        order: Vec<u64>,
        concurrency: usize,
        tx: mpsc::UnboundedSender<Fetched>,
    ) -> tokio::task::JoinHandle<()> {
        let snapshot = self.snapshot.clone();
        let state = self.state.clone();
        let unit = self.unit;
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(concurrency));
            for u in order {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let Some(s) = state.get(usize_of(u)) else {
                    continue;
                };
                if s.compare_exchange(IDLE, FETCHING, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                let (flight, tx) = (fetch_shared(&snapshot, u, unit), tx.clone());
                tokio::spawn(async move {
                    let r = flight.await;
                    let _ = tx.send((u, r, true));
                    drop(permit);
                });
            }
        })
    }

    fn drain_events(
        &mut self,
        buf: &mut [u8],
        tx: &mpsc::UnboundedSender<Fetched>,
        report: &mut SessionReport,
    ) -> Result<(), SnapError> {
        loop {
            let n = self.uffd.get_ref().0.read_events(buf)?;
            if n == 0 {
                return Ok(());
            }
            for msg in buf[..n].chunks(MSG_SIZE) {
                match parse_event(msg)? {
                    Event::PageFault { address, .. } => self.fault(address, tx, report)?,
                    Event::Remove { start, end } | Event::Unmap { start, end } => {
                        self.remove(start, end, report)
                    }
                    Event::Remap { from, to, len } => {
                        return Err(SnapError::Unsupported(format!(
                            "guest memory moved ({len} bytes from {from:#x} to {to:#x}, \
                             mremap), which lode does not follow"
                        )));
                    }
                    Event::Fork => {}
                }
            }
        }
    }

    fn remove(&mut self, start: u64, end: u64, report: &mut SessionReport) {
        for m in &self.mappings {
            let (s, e) = (start.max(m.base), end.min(m.end()));
            let mut a = s.next_multiple_of(PAGE_SIZE);
            while a + PAGE_SIZE <= e {
                if set_bit(&mut self.removed, m.snapshot_offset(a) / PAGE_SIZE) {
                    report.pages_removed += 1;
                }
                a += PAGE_SIZE;
            }
        }
    }

    fn fault(
        &mut self,
        address: u64,
        tx: &mpsc::UnboundedSender<Fetched>,
        report: &mut SessionReport,
    ) -> Result<(), SnapError> {
        let read_at = Instant::now();
        report.faults += 1;
        let m =
            *mapping::find(&self.mappings, address).ok_or(SnapError::FaultOutside { address })?;
        let page = address & !(PAGE_SIZE - 1);
        let offset = m.snapshot_offset(page);
        let page_no = offset / PAGE_SIZE;
        if set_bit(&mut self.seen, page_no) {
            self.recorded.push(page_no);
        }
        let chunk = offset / self.chunk_size;
        if bit(&self.removed, page_no) {
            report.zero_faults += 1;
            return self.zero_page(page, Some(read_at), report);
        }
        if self.snapshot.device().is_zero_chunk(chunk) && !self.holds_generation(chunk) {
            report.zero_faults += 1;
            // The whole zero chunk at once: it costs no fetch, and the ioctl wakes the
            // faulting thread.
            let units = self.units_of_chunk(chunk);
            self.install(Install { units, data: None }, report)?;
            report.fault_us.push(micros(read_at));
            return Ok(());
        }
        let unit = offset / self.unit;
        self.waiting.entry(unit).or_default().push((page, read_at));
        let previous = self.state[usize_of(unit)].swap(FETCHING, Ordering::AcqRel);
        if previous != FETCHING {
            // Idle, or installed and faulted again (a fault read after its page was
            // installed, or a page the install skipped): fetch (a cache hit) and install.
            if previous == IDLE {
                report.demand_segments += 1;
                if set_bit(&mut self.demand_chunks, chunk) {
                    report.demand_chunks += 1;
                }
            }
            let mut fetching = fetch_shared(&self.snapshot, unit, self.unit);
            // Polled once here: a segment in decrypted memory, or one a local tier reads
            // in place, is ready at once and installed now, without a task and a channel
            // between. One that has to wait (the origin, the AZ fleet) goes on as a task
            // of its own, which polls it again with a waker that counts.
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            match Pin::new(&mut fetching).poll(&mut cx) {
                Poll::Ready(Ok(data)) => {
                    let units = unit..unit + 1;
                    self.install(Install { units, data }, report)?;
                }
                Poll::Ready(Err(reason)) => {
                    return Err(SnapError::Chunk {
                        index: chunk,
                        offset: unit * self.unit,
                        reason,
                    });
                }
                Poll::Pending => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send((unit, fetching.await, false));
                    });
                }
            }
        }
        Ok(())
    }

    fn holds_generation(&self, chunk: u64) -> bool {
        self.generation
            .is_some_and(|(off, _)| off / self.chunk_size == chunk)
    }

    /// Zero-fills one removed page, tolerating presence; `read_at` is when its fault was
    /// read, if a fault asked for it (its service time is counted once the page is in).
    fn zero_page(
        &mut self,
        page: u64,
        read_at: Option<Instant>,
        report: &mut SessionReport,
    ) -> Result<(), SnapError> {
        let uffd = &self.uffd.get_ref().0;
        match uffd.zeropage(page, PAGE_SIZE)? {
            Fill::Done | Fill::Partial { .. } => report.pages_zeroed += 1,
            Fill::Exists => {
                report.pages_present += 1;
                uffd.wake(page, PAGE_SIZE)?;
            }
            Fill::Again => {
                // This page alone, retried with the next batch of events.
                self.retry.push_back(Retry::ZeroPage(page, read_at));
                return Ok(());
            }
            Fill::Gone => {}
        }
        if let Some(t) = read_at {
            report.fault_us.push(micros(t));
        }
        Ok(())
    }

    /// Installs every page of `job.units` in every region, then answers the faults
    /// waiting on them.
    fn install(&mut self, job: Install, report: &mut SessionReport) -> Result<(), SnapError> {
        let (c0, c1) = self.span(&job.units);
        let mut data = job.data.clone();
        if let Some((off, id)) = self.generation
            && (c0..c1).contains(&off)
        {
            // The id is 16 bytes at a 16-aligned offset, so it lies inside one unit.
            let mut v = match &data {
                Some(d) => d.to_vec(),
                None => vec![0u8; usize_of(c1 - c0)],
            };
            let (at, len) = (usize_of(off - c0), v.len());
            let Some(slot) = v.get_mut(at..at + 16) else {
                return Err(SnapError::Chunk {
                    index: off / self.chunk_size,
                    offset: off,
                    reason: format!(
                        "the segment at offset {c0} holds {len} bytes, short of the \
                         generation id"
                    ),
                });
            };
            slot.copy_from_slice(&id);
            data = Some(Bytes::from(v));
        }
        let uffd = &self.uffd.get_ref().0;
        for m in &self.mappings {
            let (s, e) = (c0.max(m.offset), c1.min(m.offset + m.size));
            if s >= e {
                continue;
            }
            let mut off = s;
            while off < e {
                // A run of pages that are not removed.
                if bit(&self.removed, off / PAGE_SIZE) {
                    off += PAGE_SIZE;
                    continue;
                }
                let mut run_end = off + PAGE_SIZE;
                while run_end < e && !bit(&self.removed, run_end / PAGE_SIZE) {
                    run_end += PAGE_SIZE;
                }
                let dst = m.base + (off - m.offset);
                let fill = match &data {
                    Some(d) => {
                        let from = usize_of(off - c0);
                        let to = usize_of(run_end - c0);
                        // A short last unit ends inside a page only if the snapshot size
                        // is not page-aligned; regions are, so this slice is whole pages.
                        let src = d.get(from..to).ok_or_else(|| SnapError::Chunk {
                            index: c0 / self.chunk_size,
                            offset: off,
                            reason: format!(
                                "the segment at offset {c0} holds {} bytes, the region \
                                 needs {to}",
                                d.len()
                            ),
                        })?;
                        uffd.copy(dst, src)?
                    }
                    None => uffd.zeropage(dst, run_end - off)?,
                };
                let pages = |bytes: u64| bytes / PAGE_SIZE;
                match fill {
                    Fill::Done => {
                        count(report, data.is_some(), pages(run_end - off));
                        off = run_end;
                    }
                    Fill::Partial { done } => {
                        count(report, data.is_some(), pages(done));
                        off += done;
                    }
                    Fill::Exists => {
                        report.pages_present += 1;
                        uffd.wake(dst, PAGE_SIZE)?;
                        off += PAGE_SIZE;
                    }
                    Fill::Again => {
                        self.retry.push_back(Retry::Install(job));
                        return Ok(());
                    }
                    Fill::Gone => off += PAGE_SIZE,
                }
            }
        }
        for unit in job.units {
            if let Some(s) = self.state.get(usize_of(unit)) {
                s.store(INSTALLED, Ordering::Release);
            }
            for (page, read_at) in self.waiting.remove(&unit).unwrap_or_default() {
                let offset = mapping::find(&self.mappings, page).map(|m| m.snapshot_offset(page));
                if offset.is_some_and(|o| bit(&self.removed, o / PAGE_SIZE)) {
                    // Removed while its fault waited: it reads zero.
                    self.zero_page(page, Some(read_at), report)?;
                } else {
                    report.fault_us.push(micros(read_at));
                }
            }
        }
        Ok(())
    }
}

fn count(report: &mut SessionReport, copied: bool, pages: u64) {
    if copied {
        report.pages_copied += pages;
    } else {
        report.pages_zeroed += pages;
    }
}

fn micros(since: Instant) -> u32 {
    u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX)
}

/// The fetch of unit `unit` (units of `len` bytes) that restores of `snapshot` share: the
/// one in flight, joined, or a new one. The cache joins fetches of one chunk from its
/// tiers; this joins the reads of one segment, so a burst of restores faulting the same
/// segment decrypts it once, not once each.
fn fetch_shared(snapshot: &Arc<Snapshot>, unit: u64, len: u64) -> Flight {
    let shared = &snapshot.shared;
    let mut flights = shared
        .flights
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(f) = flights.get(&unit) {
        shared.joined.fetch_add(1, Ordering::Relaxed);
        return f.clone();
    }
    shared.started.fetch_add(1, Ordering::Relaxed);
    let snap = snapshot.clone();
    let flight = async move {
        let r = fetch(&snap, unit, len).await;
        // Only this fetch removes its entry, and no other fetch of the unit starts
        // while it is there, so the entry is this one.
        snap.shared
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&unit);
        r
    }
    .boxed()
    .shared();
    flights.insert(unit, flight.clone());
    flight
}

/// The plaintext of unit `unit` (units of `len` bytes): segment `j` of its chunk, or
/// `None` when the chunk is all zero.
async fn fetch(snapshot: &Snapshot, unit: u64, len: u64) -> Result<Option<Bytes>, String> {
    let offset = unit * len;
    let chunk_size = snapshot.chunk_size().bytes_u64();
    let j = u32::try_from(offset % chunk_size / len)
        .map_err(|_| format!("segment of offset {offset} is out of range"))?;
    snapshot
        .device()
        .segment(offset / chunk_size, SegmentIndex(j))
        .await
        .map_err(|e| e.to_string())
}
