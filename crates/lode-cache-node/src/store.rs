//! The items of a node and its two tiers.
//!
//! One index maps each key to its entry; an entry lives in memory, on flash, or in
//! between ("demoting": evicted from memory, its flash write queued, still readable
//! from RAM until the write lands). Each tier has a byte budget and a [`RankIndex`];
//! when memory is over budget its lowest-ranked item is demoted to flash (or dropped,
//! when flash is off, full of better-ranked items, or behind on writes), and when flash
//! is over budget its lowest-ranked item is deleted. A flash hit promotes the item to
//! memory when it outranks memory's next victim — under LRU-K a key read once does not,
//! so a scan never displaces the hot set; under LRU every hit does.
//!
//! All of this is behind one mutex held for map and tree updates only: values are
//! reference-counted [`Bytes`], so a hit hands out a handle and the copy to the socket
//! happens outside the lock. Flash I/O never happens under the lock either: reads run
//! on the blocking pool and come back through [`Store::finish_read`]; writes and deletes
//! are queued, in the order the index changed, to one writer thread ([`run_writer`]),
//! which is what keeps a delete from overtaking the write of the same file.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;

use bytes::{Bytes, BytesMut};

use crate::config::{Policy, TierSizes, item_cost};
use crate::flash::{FlashDir, Indexed, Meta, ReadError};
use crate::lruk::{History, RankIndex};
use crate::protocol::{REALTIME_MAXDELTA, StoreKind};

/// A value handed to a client.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) flags: u32,
    pub(crate) cas: u64,
    pub(crate) value: Bytes,
}

/// The answer to a lookup.
#[derive(Debug)]
pub(crate) enum Lookup {
    Hit(Item),
    Miss,
    /// The value is in flash file `.0`: read it and call [`Store::finish_read`].
    OnFlash(u64),
    /// The item changed while its file was read: look it up again.
    Retry,
}

/// A storage command with its data.
#[derive(Debug)]
pub(crate) struct StoreRequest<'a> {
    pub(crate) kind: StoreKind,
    pub(crate) key: &'a [u8],
    pub(crate) flags: u32,
    pub(crate) exptime: i64,
    pub(crate) data: Bytes,
}

/// The answer to a storage command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StoreOutcome {
    Stored,
    NotStored,
    Exists,
    NotFound,
    /// `append`/`prepend` would pass the item size limit.
    TooLarge,
    /// The old value is needed and is on flash: [`Store::load`] it and try again.
    OnFlash(u64),
}

/// The answer to `touch`, `incr` and `decr`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UpdateOutcome {
    Touched,
    Number(u64),
    NotFound,
    NonNumeric,
    OnFlash(u64),
}

/// Work for the flash writer thread, in index order.
#[derive(Debug)]
pub(crate) enum Job {
    Write {
        file: u64,
        key: Bytes,
        meta: Meta,
        value: Bytes,
    },
    Delete(u64),
    PurgeBelow(u64),
    Barrier(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// Demoted bytes not yet on disk. Past `limit` a connection that caused more waits for
/// the writer before it reads its next request: demotion applies backpressure rather
/// than dropping items or growing RAM without bound.
#[derive(Debug)]
struct Backlog {
    bytes: AtomicU64,
    limit: u64,
    drained: Notify,
}

impl Backlog {
    /// `cost` bytes left the backlog (written, or no longer to be written).
    fn written(&self, cost: u64) {
        self.bytes.fetch_sub(cost, Ordering::Relaxed);
        self.drained.notify_waiters();
    }
}

/// Per-tier counters; see [`crate::TierStats`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TierCounters {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) evictions: u64,
    pub(crate) demotions: u64,
    pub(crate) promotions: u64,
}

/// Node-wide counters, named as memcached's `stats` (see [`crate::Stats`]).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) cmd_get: u64,
    pub(crate) cmd_set: u64,
    pub(crate) cmd_flush: u64,
    pub(crate) cmd_touch: u64,
    pub(crate) get_hits: u64,
    pub(crate) get_misses: u64,
    pub(crate) get_expired: u64,
    pub(crate) delete_hits: u64,
    pub(crate) delete_misses: u64,
    pub(crate) incr_hits: u64,
    pub(crate) incr_misses: u64,
    pub(crate) decr_hits: u64,
    pub(crate) decr_misses: u64,
    pub(crate) cas_hits: u64,
    pub(crate) cas_misses: u64,
    pub(crate) cas_badval: u64,
    pub(crate) touch_hits: u64,
    pub(crate) touch_misses: u64,
    pub(crate) total_items: u64,
    pub(crate) evictions: u64,
    pub(crate) reclaimed: u64,
    pub(crate) flash_write_errors: u64,
    pub(crate) flash_read_errors: u64,
    pub(crate) flash_corrupt: u64,
    pub(crate) demotions_skipped: u64,
}

/// A tier's state as [`Store::snapshot`] reports it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TierSnapshot {
    pub(crate) items: u64,
    pub(crate) bytes: u64,
    pub(crate) limit: u64,
    pub(crate) counters: TierCounters,
}

/// Everything the store counts.
#[derive(Debug, Default, Clone)]
pub(crate) struct StoreSnapshot {
    pub(crate) counters: Counters,
    pub(crate) memory: TierSnapshot,
    pub(crate) flash: TierSnapshot,
    pub(crate) flash_pending_bytes: u64,
    pub(crate) flash_restored: u64,
    pub(crate) flash_last_error: Option<String>,
}

#[derive(Debug)]
enum Loc {
    Memory(Bytes),
    Demoting { value: Bytes, file: u64 },
    Flash { file: u64 },
}

#[derive(Debug)]
struct Entry {
    key: Bytes,
    meta: Meta,
    len: usize,
    hist: History,
    loc: Loc,
}

impl Entry {
    fn cost(&self) -> u64 {
        item_cost(self.key.len(), self.len)
    }

    fn on_flash(&self) -> bool {
        !matches!(self.loc, Loc::Memory(_))
    }

    fn expired(&self, now: u64) -> bool {
        expired(self.meta.expiry, now)
    }
}

fn expired(expiry: u64, now: u64) -> bool {
    expiry != 0 && expiry <= now
}

/// memcached's expiration rules: 0 never expires, up to 30 days is relative to now,
/// beyond that an absolute Unix time, negative is already expired. `None`: expired.
pub(crate) fn expiry(exptime: i64, now: u64) -> Option<u64> {
    let t = u64::try_from(exptime).ok()?;
    if t == 0 {
        Some(0)
    } else if exptime > REALTIME_MAXDELTA {
        (t > now).then_some(t)
    } else {
        Some(now.saturating_add(t))
    }
}

#[derive(Debug, Default)]
struct Tier {
    index: RankIndex,
    items: u64,
    bytes: u64,
    limit: u64,
    counters: TierCounters,
}

impl Tier {
    fn snapshot(&self) -> TierSnapshot {
        TierSnapshot {
            items: self.items,
            bytes: self.bytes,
            limit: self.limit,
            counters: self.counters,
        }
    }
}

enum Liveness {
    Missing,
    Expired,
    Live,
}

#[derive(Debug)]
struct Inner {
    map: HashMap<Bytes, Entry>,
    memory: Tier,
    flash: Tier,
    policy: Policy,
    tick: u64,
    cas: u64,
    next_file: u64,
    /// A delayed `flush_all`: everything goes at this Unix time.
    flush_at: Option<u64>,
    /// Bytes of items demoted but not yet on disk (still held in RAM).
    backlog: Arc<Backlog>,
    counters: Counters,
    restored: u64,
    last_error: Option<String>,
    jobs: Option<Sender<Job>>,
}

/// The items of a node.
#[derive(Debug)]
pub(crate) struct Store {
    inner: Mutex<Inner>,
    backlog: Arc<Backlog>,
    flash: Option<Arc<FlashDir>>,
    item_limit: usize,
}

impl Store {
    /// A store over `tiers`; with flash, `restored` are the records found on disk
    /// (oldest first) and `jobs` feeds the writer thread.
    pub(crate) fn new(
        tiers: TierSizes,
        policy: Policy,
        item_limit: usize,
        flash: Option<(Arc<FlashDir>, Vec<Indexed>, Sender<Job>)>,
        now: u64,
    ) -> Store {
        let item_limit_cost = item_cost(crate::protocol::MAX_KEY_LEN, item_limit);
        let mut inner = Inner {
            map: HashMap::new(),
            memory: Tier {
                limit: tiers.memory_bytes,
                ..Tier::default()
            },
            flash: Tier {
                limit: tiers.flash_bytes,
                ..Tier::default()
            },
            policy,
            tick: 0,
            cas: 0,
            next_file: 1,
            flush_at: None,
            // A quarter of memory rides in the writer's queue before writers wait.
            backlog: Arc::new(Backlog {
                bytes: AtomicU64::new(0),
                limit: (tiers.memory_bytes / 4).max(item_limit_cost),
                drained: Notify::new(),
            }),
            counters: Counters::default(),
            restored: 0,
            last_error: None,
            jobs: None,
        };
        let dir = flash.map(|(dir, restored, jobs)| {
            inner.jobs = Some(jobs);
            inner.restore(restored, now);
            dir
        });
        Store {
            backlog: inner.backlog.clone(),
            inner: Mutex::new(inner),
            flash: dir,
            item_limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock leaves the index as consistent as the last completed
        // update; serving on beats taking the node down.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits while the flash writer is behind by more than the backlog limit.
    pub(crate) async fn wait_for_writer(&self) {
        loop {
            let drained = self.backlog.drained.notified();
            if self.backlog.bytes.load(Ordering::Relaxed) <= self.backlog.limit {
                return;
            }
            drained.await;
        }
    }

    /// Whether [`Store::wait_for_writer`] would wait.
    pub(crate) fn writer_behind(&self) -> bool {
        self.backlog.bytes.load(Ordering::Relaxed) > self.backlog.limit
    }

    pub(crate) fn flash_dir(&self) -> Option<&Arc<FlashDir>> {
        self.flash.as_ref()
    }

    pub(crate) fn item_limit(&self) -> usize {
        self.item_limit
    }

    /// Looks up `key` for a get. `first` is false when retrying after [`Lookup::Retry`],
    /// so the request is counted once.
    pub(crate) fn lookup(&self, key: &[u8], now: u64, first: bool) -> Lookup {
        let mut g = self.lock();
        let g = &mut *g;
        g.maybe_flush(now);
        if first {
            g.counters.cmd_get += 1;
        }
        match g.liveness(key, now) {
            Liveness::Live => {}
            other => {
                if matches!(other, Liveness::Expired) {
                    g.counters.get_expired += 1;
                }
                g.counters.get_misses += 1;
                g.memory.counters.misses += 1;
                if g.jobs.is_some() {
                    g.flash.counters.misses += 1;
                }
                return Lookup::Miss;
            }
        }
        let entry = g.map.get(key).expect("live entry");
        match &entry.loc {
            Loc::Memory(value) => {
                let value = value.clone();
                g.memory.counters.hits += 1;
                g.counters.get_hits += 1;
                Lookup::Hit(g.read_hit(key, value))
            }
            Loc::Demoting { value, .. } => {
                let value = value.clone();
                if first {
                    g.memory.counters.misses += 1;
                }
                g.flash.counters.hits += 1;
                g.counters.get_hits += 1;
                let item = g.read_hit(key, value.clone());
                g.promote(key, value, false, now);
                Lookup::Hit(item)
            }
            Loc::Flash { file } => {
                let file = *file;
                if first {
                    g.memory.counters.misses += 1;
                }
                Lookup::OnFlash(file)
            }
        }
    }

    /// Completes a get whose value was read from flash `file`. `promote` forces the
    /// item into memory (a `gat`, which must then change it).
    pub(crate) fn finish_read(
        &self,
        key: &[u8],
        file: u64,
        read: Result<Bytes, ReadError>,
        promote: bool,
        now: u64,
    ) -> Lookup {
        let mut g = self.lock();
        let g = &mut *g;
        if !g.holds_file(key, file) {
            return Lookup::Retry;
        }
        match read {
            Ok(value) => {
                g.flash.counters.hits += 1;
                g.counters.get_hits += 1;
                let item = g.read_hit(key, value.clone());
                g.promote(key, value, promote, now);
                Lookup::Hit(item)
            }
            Err(e) => {
                g.read_failed(key, file, &e);
                g.flash.counters.misses += 1;
                g.counters.get_misses += 1;
                Lookup::Miss
            }
        }
    }

    /// Moves an item read from flash `file` into memory so it can be changed (append,
    /// prepend, incr, decr, touch); the caller then retries the change.
    pub(crate) fn load(&self, key: &[u8], file: u64, read: Result<Bytes, ReadError>, now: u64) {
        let mut g = self.lock();
        if !g.holds_file(key, file) {
            return;
        }
        match read {
            Ok(value) => g.promote(key, value, true, now),
            Err(e) => g.read_failed(key, file, &e),
        }
    }

    /// `set`, `add`, `replace`, `append`, `prepend` and `cas`. `first` as in
    /// [`Store::lookup`].
    pub(crate) fn store(&self, request: &StoreRequest<'_>, now: u64, first: bool) -> StoreOutcome {
        let StoreRequest {
            kind,
            key,
            flags,
            exptime,
            ref data,
        } = *request;
        let data = data.clone();
        let mut g = self.lock();
        let g = &mut *g;
        g.maybe_flush(now);
        if first {
            g.counters.cmd_set += 1;
        }
        let live = matches!(g.liveness(key, now), Liveness::Live);
        let existing = if live { g.map.get(key) } else { None };
        let (meta_flags, expiry, value) = match kind {
            StoreKind::Set => (flags, expiry(exptime, now), data),
            StoreKind::Add if live => return StoreOutcome::NotStored,
            StoreKind::Replace if !live => return StoreOutcome::NotStored,
            StoreKind::Add | StoreKind::Replace => (flags, expiry(exptime, now), data),
            StoreKind::Cas(unique) => match existing {
                None => {
                    g.counters.cas_misses += 1;
                    return StoreOutcome::NotFound;
                }
                Some(e) if e.meta.cas != unique => {
                    g.counters.cas_badval += 1;
                    return StoreOutcome::Exists;
                }
                Some(_) => {
                    g.counters.cas_hits += 1;
                    (flags, expiry(exptime, now), data)
                }
            },
            StoreKind::Append | StoreKind::Prepend => {
                let Some(e) = existing else {
                    return StoreOutcome::NotStored;
                };
                let old = match &e.loc {
                    Loc::Memory(v) | Loc::Demoting { value: v, .. } => v,
                    Loc::Flash { file } => return StoreOutcome::OnFlash(*file),
                };
                if old.len().saturating_add(data.len()) > self.item_limit {
                    return StoreOutcome::TooLarge;
                }
                let mut joined = BytesMut::with_capacity(old.len() + data.len());
                if kind == StoreKind::Append {
                    joined.extend_from_slice(old);
                    joined.extend_from_slice(&data);
                } else {
                    joined.extend_from_slice(&data);
                    joined.extend_from_slice(old);
                }
                // The item keeps its own flags and expiration, as in memcached.
                (e.meta.flags, Some(e.meta.expiry), joined.freeze())
            }
        };
        g.put(key, meta_flags, expiry, value, now);
        StoreOutcome::Stored
    }

    /// Drops `key` after a too-large `set`, as memcached does, so a failed update never
    /// leaves the old value readable.
    pub(crate) fn forget(&self, key: &[u8]) {
        self.lock().remove(key);
    }

    pub(crate) fn delete(&self, key: &[u8], now: u64) -> bool {
        let mut g = self.lock();
        g.maybe_flush(now);
        let live = matches!(g.liveness(key, now), Liveness::Live);
        if live {
            g.remove(key);
            g.counters.delete_hits += 1;
        } else {
            g.counters.delete_misses += 1;
        }
        live
    }

    /// `touch` (and the touch half of `gat`). Items on flash must be loaded first: a
    /// record on disk is never changed in place.
    pub(crate) fn touch(&self, key: &[u8], exptime: i64, now: u64, first: bool) -> UpdateOutcome {
        let mut g = self.lock();
        let g = &mut *g;
        g.maybe_flush(now);
        if first {
            g.counters.cmd_touch += 1;
        }
        if !matches!(g.liveness(key, now), Liveness::Live) {
            g.counters.touch_misses += 1;
            return UpdateOutcome::NotFound;
        }
        if let Some(file) = g.needs_load(key, now) {
            return UpdateOutcome::OnFlash(file);
        }
        g.counters.touch_hits += 1;
        match expiry(exptime, now) {
            None => {
                g.remove(key);
            }
            Some(at) => {
                if let Some(e) = g.map.get_mut(key) {
                    e.meta.expiry = at;
                }
            }
        }
        UpdateOutcome::Touched
    }

    /// `incr` and `decr`: the value must be a decimal number below 2⁶⁴; `incr` wraps,
    /// `decr` stops at 0. The new value is written without padding (memcached pads a
    /// shrinking number with spaces to keep its length).
    pub(crate) fn arith(&self, key: &[u8], incr: bool, delta: u64, now: u64) -> UpdateOutcome {
        let mut g = self.lock();
        let g = &mut *g;
        g.maybe_flush(now);
        let live = matches!(g.liveness(key, now), Liveness::Live);
        if !live {
            if incr {
                g.counters.incr_misses += 1;
            } else {
                g.counters.decr_misses += 1;
            }
            return UpdateOutcome::NotFound;
        }
        if let Some(file) = g.needs_load(key, now) {
            return UpdateOutcome::OnFlash(file);
        }
        let e = g.map.get(key).expect("live entry");
        let Loc::Memory(value) = &e.loc else {
            debug_assert!(false, "needs_load leaves the item in memory");
            return UpdateOutcome::NotFound;
        };
        let Some(number) = parse_number(value) else {
            return UpdateOutcome::NonNumeric;
        };
        let result = if incr {
            number.wrapping_add(delta)
        } else {
            number.saturating_sub(delta)
        };
        if incr {
            g.counters.incr_hits += 1;
        } else {
            g.counters.decr_hits += 1;
        }
        let (flags, at) = (e.meta.flags, e.meta.expiry);
        g.put(key, flags, Some(at), Bytes::from(result.to_string()), now);
        UpdateOutcome::Number(result)
    }

    /// `flush_all`: now, or at `delay` (memcached's expiration rules).
    pub(crate) fn flush_all(&self, delay: Option<i64>, now: u64) {
        let mut g = self.lock();
        g.counters.cmd_flush += 1;
        let at = match delay {
            Some(d) if d > 0 => expiry(d, now),
            _ => None,
        };
        match at {
            Some(at) => g.flush_at = Some(at),
            None => {
                g.flush_at = None;
                g.flush_now();
            }
        }
    }

    /// A flash write finished.
    pub(crate) fn write_done(&self, key: &Bytes, file: u64, result: io::Result<()>) {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(e) = g.map.get_mut(key) else {
            return;
        };
        if !matches!(e.loc, Loc::Demoting { file: f, .. } if f == file) {
            // Replaced, deleted or promoted meanwhile; a delete of the file is queued.
            return;
        }
        match result {
            Ok(()) => {
                e.loc = Loc::Flash { file };
                let cost = e.cost();
                g.backlog.written(cost);
            }
            Err(e) => {
                g.last_error = Some(format!("flash record {file:016x}: write failed: {e}"));
                g.counters.flash_write_errors += 1;
                g.counters.evictions += 1;
                g.flash.counters.evictions += 1;
                g.remove(key);
            }
        }
    }

    /// Queues a barrier: the receiver resolves once every flash job queued before it
    /// is done. `None` without flash.
    pub(crate) fn barrier(&self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let g = self.lock();
        let jobs = g.jobs.as_ref()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        jobs.send(Job::Barrier(tx)).ok()?;
        Some(rx)
    }

    /// Tells the writer thread to stop after the jobs queued so far.
    pub(crate) fn stop_writer(&self) {
        if let Some(jobs) = self.lock().jobs.take() {
            let _ = jobs.send(Job::Stop);
        }
    }

    pub(crate) fn snapshot(&self) -> StoreSnapshot {
        let g = self.lock();
        StoreSnapshot {
            counters: g.counters,
            memory: g.memory.snapshot(),
            flash: g.flash.snapshot(),
            flash_pending_bytes: g.backlog.bytes.load(Ordering::Relaxed),
            flash_restored: g.restored,
            flash_last_error: g.last_error.clone(),
        }
    }

    /// `stats reset`: counters to zero; items and bytes stay.
    pub(crate) fn reset_counters(&self) {
        let mut g = self.lock();
        let total_items = g.counters.total_items;
        g.counters = Counters {
            total_items,
            ..Counters::default()
        };
        g.memory.counters = TierCounters::default();
        g.flash.counters = TierCounters::default();
    }
}

/// A decimal number as `incr`/`decr` take it: surrounding whitespace allowed.
fn parse_number(value: &[u8]) -> Option<u64> {
    let text = value.trim_ascii();
    if text.is_empty() || text.len() > 20 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

impl Inner {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn next_cas(&mut self) -> u64 {
        self.cas += 1;
        self.cas
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // The writer only stops at shutdown, after which nothing is queued that
            // matters: its files are found and checked at the next start.
            let _ = jobs.send(job);
        }
    }

    fn maybe_flush(&mut self, now: u64) {
        if self.flush_at.is_some_and(|at| now >= at) {
            self.flush_at = None;
            self.flush_now();
        }
    }

    fn flush_now(&mut self) {
        self.map.clear();
        for tier in [&mut self.memory, &mut self.flash] {
            tier.index.clear();
            tier.items = 0;
            tier.bytes = 0;
        }
        self.backlog.bytes.store(0, Ordering::Relaxed);
        self.backlog.drained.notify_waiters();
        self.send(Job::PurgeBelow(self.next_file));
    }

    fn liveness(&mut self, key: &[u8], now: u64) -> Liveness {
        match self.map.get(key) {
            None => Liveness::Missing,
            Some(e) if e.expired(now) => {
                self.remove(key);
                self.counters.reclaimed += 1;
                Liveness::Expired
            }
            Some(_) => Liveness::Live,
        }
    }

    fn holds_file(&self, key: &[u8], file: u64) -> bool {
        self.map
            .get(key)
            .is_some_and(|e| matches!(e.loc, Loc::Flash { file: f } if f == file))
    }

    /// Records a read hit and returns the item.
    fn read_hit(&mut self, key: &[u8], value: Bytes) -> Item {
        let tick = self.next_tick();
        let policy = self.policy;
        let e = self.map.get_mut(key).expect("hit on a present key");
        let before = e.hist.rank(policy);
        e.hist.read(tick);
        let after = e.hist.rank(policy);
        let tier = if e.on_flash() {
            &mut self.flash
        } else {
            &mut self.memory
        };
        tier.index.remove(before);
        tier.index.insert(after, e.key.clone());
        Item {
            flags: e.meta.flags,
            cas: e.meta.cas,
            value,
        }
    }

    fn read_failed(&mut self, key: &[u8], file: u64, e: &ReadError) {
        self.last_error = Some(format!("flash record {file:016x}: {e}"));
        match e {
            ReadError::Io(_) => self.counters.flash_read_errors += 1,
            ReadError::Missing | ReadError::Corrupt(_) => self.counters.flash_corrupt += 1,
        }
        self.remove(key);
    }

    /// If the item must be loaded from flash before it can change, its file. An item
    /// still demoting is pulled back into memory here, from its RAM copy.
    fn needs_load(&mut self, key: &[u8], now: u64) -> Option<u64> {
        match &self.map.get(key)?.loc {
            Loc::Memory(_) => None,
            Loc::Flash { file } => Some(*file),
            Loc::Demoting { value, .. } => {
                let value = value.clone();
                self.promote(key, value, true, now);
                None
            }
        }
    }

    /// Moves an item on flash (or demoting) into memory, unless `force` is false and it
    /// ranks below memory's next victim while memory is full.
    fn promote(&mut self, key: &[u8], value: Bytes, force: bool, now: u64) {
        let policy = self.policy;
        let Some(e) = self.map.get(key) else { return };
        if !e.on_flash() {
            return;
        }
        let cost = e.cost();
        let rank = e.hist.rank(policy);
        let full = self.memory.bytes.saturating_add(cost) > self.memory.limit;
        if !force
            && full
            && self
                .memory
                .index
                .victim()
                .is_some_and(|(victim, _)| rank < victim)
        {
            return;
        }
        let e = self.map.get_mut(key).expect("checked above");
        let old = std::mem::replace(&mut e.loc, Loc::Memory(value));
        let file = match old {
            Loc::Demoting { file, .. } => {
                self.backlog.written(cost);
                file
            }
            Loc::Flash { file } => file,
            Loc::Memory(_) => unreachable!("on_flash checked"),
        };
        let key = e.key.clone();
        self.flash.index.remove(rank);
        self.flash.items -= 1;
        self.flash.bytes -= cost;
        self.memory.index.insert(rank, key.clone());
        self.memory.items += 1;
        self.memory.bytes += cost;
        self.memory.counters.promotions += 1;
        self.flash.counters.promotions += 1;
        self.send(Job::Delete(file));
        // The promoted item itself is not a candidate: it came in to be read or changed.
        self.enforce_memory(now, Some(&key));
    }

    /// Stores a new value for `key` in memory, replacing any old one and keeping its
    /// read history; `expiry` `None` (already expired) removes the key instead.
    fn put(&mut self, key: &[u8], flags: u32, expiry: Option<u64>, value: Bytes, now: u64) {
        let old = self.remove(key);
        let Some(expiry) = expiry.filter(|&at| !expired(at, now)) else {
            return;
        };
        let tick = self.next_tick();
        let mut hist = old.map_or_else(|| History::new(tick), |e| e.hist);
        hist.write(tick);
        let key = Bytes::copy_from_slice(key);
        let meta = Meta {
            flags,
            expiry,
            cas: self.next_cas(),
        };
        let entry = Entry {
            key: key.clone(),
            meta,
            len: value.len(),
            hist,
            loc: Loc::Memory(value),
        };
        self.memory
            .index
            .insert(entry.hist.rank(self.policy), key.clone());
        self.memory.items += 1;
        self.memory.bytes += entry.cost();
        self.map.insert(key, entry);
        self.counters.total_items += 1;
        self.enforce_memory(now, None);
    }

    /// Takes `key` out of the index and its tier; its flash file, if any, is queued for
    /// deletion.
    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.map.remove(key)?;
        let cost = e.cost();
        let rank = e.hist.rank(self.policy);
        let tier = if e.on_flash() {
            &mut self.flash
        } else {
            &mut self.memory
        };
        tier.index.remove(rank);
        tier.items -= 1;
        tier.bytes -= cost;
        match e.loc {
            Loc::Memory(_) => {}
            Loc::Demoting { file, .. } => {
                self.backlog.written(cost);
                self.send(Job::Delete(file));
            }
            Loc::Flash { file } => self.send(Job::Delete(file)),
        }
        Some(e)
    }

    /// Demotes (or drops) memory's lowest-ranked items, `protect` aside, until memory is
    /// within budget.
    fn enforce_memory(&mut self, now: u64, protect: Option<&Bytes>) {
        while self.memory.bytes > self.memory.limit {
            let Some((rank, key)) = self.memory.index.victim_except(protect) else {
                break;
            };
            let key = key.clone();
            let e = self.map.get(&key).expect("indexed key is present");
            let cost = e.cost();
            if e.expired(now) {
                self.remove(&key);
                self.counters.reclaimed += 1;
                continue;
            }
            let flash_on = self.jobs.is_some();
            let flash_would_evict_better = self.flash.bytes.saturating_add(cost) > self.flash.limit
                && self
                    .flash
                    .index
                    .victim()
                    .is_none_or(|(best, _)| rank < best);
            let demote = flash_on && cost <= self.flash.limit && !flash_would_evict_better;
            if !demote {
                if flash_on && cost <= self.flash.limit {
                    self.counters.demotions_skipped += 1;
                }
                self.remove(&key);
                self.memory.counters.evictions += 1;
                self.counters.evictions += 1;
                continue;
            }
            let file = self.next_file;
            self.next_file += 1;
            let e = self.map.get_mut(&key).expect("indexed key is present");
            let Loc::Memory(value) = std::mem::replace(&mut e.loc, Loc::Flash { file }) else {
                unreachable!("memory index holds memory items");
            };
            e.loc = Loc::Demoting {
                value: value.clone(),
                file,
            };
            let meta = e.meta;
            self.memory.index.remove(rank);
            self.memory.items -= 1;
            self.memory.bytes -= cost;
            self.flash.index.insert(rank, key.clone());
            self.flash.items += 1;
            self.flash.bytes += cost;
            self.backlog.bytes.fetch_add(cost, Ordering::Relaxed);
            self.memory.counters.demotions += 1;
            self.flash.counters.demotions += 1;
            self.send(Job::Write {
                file,
                key,
                meta,
                value,
            });
            self.enforce_flash(now);
        }
    }

    /// Deletes flash's lowest-ranked items until flash is within budget.
    fn enforce_flash(&mut self, now: u64) {
        while self.flash.bytes > self.flash.limit {
            let Some((_, key)) = self.flash.index.victim() else {
                break;
            };
            let key = key.clone();
            let e = self.remove(&key).expect("indexed key is present");
            if e.expired(now) {
                self.counters.reclaimed += 1;
            } else {
                self.flash.counters.evictions += 1;
                self.counters.evictions += 1;
            }
        }
    }

    /// Indexes records found on disk at start, oldest first.
    fn restore(&mut self, found: Vec<Indexed>, now: u64) {
        for item in found {
            self.next_file = self.next_file.max(item.file + 1);
            self.cas = self.cas.max(item.meta.cas);
            if expired(item.meta.expiry, now) {
                self.send(Job::Delete(item.file));
                continue;
            }
            let tick = self.next_tick();
            let entry = Entry {
                key: item.key.clone(),
                meta: item.meta,
                len: item.value_len,
                hist: History::new(tick),
                loc: Loc::Flash { file: item.file },
            };
            self.flash
                .index
                .insert(entry.hist.rank(self.policy), item.key.clone());
            self.flash.items += 1;
            self.flash.bytes += entry.cost();
            self.map.insert(item.key, entry);
            self.restored += 1;
        }
        // A smaller flash_bytes than last time: the oldest go.
        self.enforce_flash(now);
    }
}

/// The flash writer thread: applies jobs in order until told to stop.
pub(crate) fn run_writer(dir: Arc<FlashDir>, jobs: Receiver<Job>, store: Weak<Store>) {
    for job in jobs {
        match job {
            Job::Write {
                file,
                key,
                meta,
                value,
            } => {
                let result = dir.write(file, &key, meta, &value);
                if let Some(store) = store.upgrade() {
                    store.write_done(&key, file, result);
                }
            }
            Job::Delete(file) => dir.delete(file),
            Job::PurgeBelow(file) => dir.purge_below(file),
            Job::Barrier(done) => {
                let _ = done.send(());
            }
            Job::Stop => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn memory_store(memory_bytes: u64, policy: Policy) -> Store {
        Store::new(
            TierSizes {
                memory_bytes,
                flash_bytes: 0,
            },
            policy,
            1 << 20,
            None,
            NOW,
        )
    }

    fn value(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    fn get(store: &Store, key: &str) -> Option<Bytes> {
        match store.lookup(key.as_bytes(), NOW, true) {
            Lookup::Hit(item) => Some(item.value),
            Lookup::Miss => None,
            other => panic!("memory-only store answered {other:?}"),
        }
    }

    fn set(store: &Store, key: &str, v: Bytes) -> StoreOutcome {
        let request = StoreRequest {
            kind: StoreKind::Set,
            key: key.as_bytes(),
            flags: 0,
            exptime: 0,
            data: v,
        };
        store.store(&request, NOW, true)
    }

    #[test]
    fn expiry_follows_memcached() {
        assert_eq!(expiry(0, NOW), Some(0));
        assert_eq!(expiry(10, NOW), Some(NOW + 10));
        assert_eq!(expiry(REALTIME_MAXDELTA, NOW), Some(NOW + 2_592_000));
        assert_eq!(expiry(REALTIME_MAXDELTA + 1, NOW), None);
        assert_eq!(expiry(-1, NOW), None);
        let future = i64::try_from(NOW + 100).unwrap();
        assert_eq!(expiry(future, NOW), Some(NOW + 100));
        assert_eq!(expiry(future - 100, NOW), None);
    }

    #[test]
    fn memory_budget_is_kept_by_eviction_without_flash() {
        let store = memory_store(10 * item_cost(3, 1000), Policy::LruK(2));
        for i in 0..30 {
            assert_eq!(
                set(&store, &format!("k{i:02}"), value(1000)),
                StoreOutcome::Stored
            );
        }
        let s = store.snapshot();
        assert_eq!(s.memory.items, 10);
        assert!(s.memory.bytes <= s.memory.limit);
        assert_eq!(s.counters.evictions, 20);
        assert_eq!(s.memory.counters.demotions, 0);
        // The newest ten are there.
        assert!(get(&store, "k29").is_some());
        assert!(get(&store, "k19").is_none());
    }

    #[test]
    fn storage_commands_follow_memcached() {
        let store = memory_store(1 << 20, Policy::LruK(2));
        let k = b"k".as_slice();
        let run = |kind, data: &'static [u8]| {
            let request = StoreRequest {
                kind,
                key: k,
                flags: 3,
                exptime: 0,
                data: Bytes::from_static(data),
            };
            store.store(&request, NOW, true)
        };
        assert_eq!(run(StoreKind::Replace, b"x"), StoreOutcome::NotStored);
        assert_eq!(run(StoreKind::Append, b"x"), StoreOutcome::NotStored);
        assert_eq!(run(StoreKind::Add, b"b"), StoreOutcome::Stored);
        assert_eq!(run(StoreKind::Add, b"x"), StoreOutcome::NotStored);
        assert_eq!(run(StoreKind::Append, b"c"), StoreOutcome::Stored);
        assert_eq!(run(StoreKind::Prepend, b"a"), StoreOutcome::Stored);
        let Lookup::Hit(item) = store.lookup(k, NOW, true) else {
            panic!()
        };
        assert_eq!(item.value, "abc");
        assert_eq!(
            run(StoreKind::Cas(item.cas + 1), b"z"),
            StoreOutcome::Exists
        );
        assert_eq!(run(StoreKind::Cas(item.cas), b"z"), StoreOutcome::Stored);
        assert_eq!(run(StoreKind::Cas(item.cas), b"z"), StoreOutcome::Exists);
        assert!(store.delete(k, NOW));
        assert_eq!(run(StoreKind::Cas(1), b"z"), StoreOutcome::NotFound);
        assert!(!store.delete(k, NOW));
        let c = store.snapshot().counters;
        assert_eq!((c.cas_hits, c.cas_badval, c.cas_misses), (1, 2, 1));
        assert_eq!((c.delete_hits, c.delete_misses), (1, 1));
    }

    #[test]
    fn arithmetic_and_touch() {
        let store = memory_store(1 << 20, Policy::LruK(2));
        set(&store, "n", Bytes::from_static(b" 10 "));
        assert_eq!(store.arith(b"n", true, 5, NOW), UpdateOutcome::Number(15));
        assert_eq!(store.arith(b"n", false, 100, NOW), UpdateOutcome::Number(0));
        assert_eq!(
            store.arith(b"n", false, u64::MAX, NOW),
            UpdateOutcome::Number(0)
        );
        set(&store, "m", Bytes::from(u64::MAX.to_string()));
        assert_eq!(store.arith(b"m", true, 2, NOW), UpdateOutcome::Number(1));
        set(&store, "s", Bytes::from_static(b"12a"));
        assert_eq!(store.arith(b"s", true, 1, NOW), UpdateOutcome::NonNumeric);
        set(&store, "big", Bytes::from_static(b"123456789012345678901"));
        assert_eq!(store.arith(b"big", true, 1, NOW), UpdateOutcome::NonNumeric);
        assert_eq!(store.arith(b"none", true, 1, NOW), UpdateOutcome::NotFound);
        assert_eq!(store.touch(b"n", 100, NOW, true), UpdateOutcome::Touched);
        assert!(matches!(store.lookup(b"n", NOW + 99, true), Lookup::Hit(_)));
        assert!(matches!(store.lookup(b"n", NOW + 100, true), Lookup::Miss));
        assert_eq!(store.touch(b"n", 100, NOW, true), UpdateOutcome::NotFound);
        assert_eq!(store.touch(b"m", -1, NOW, true), UpdateOutcome::Touched);
        assert!(matches!(store.lookup(b"m", NOW, true), Lookup::Miss));
    }

    #[test]
    fn flush_all_now_and_later() {
        let store = memory_store(1 << 20, Policy::LruK(2));
        set(&store, "a", value(10));
        store.flush_all(Some(10), NOW);
        assert!(get(&store, "a").is_some());
        set(&store, "b", value(10));
        assert!(matches!(store.lookup(b"a", NOW + 10, true), Lookup::Miss));
        assert!(matches!(store.lookup(b"b", NOW + 10, true), Lookup::Miss));
        set(&store, "c", value(10));
        store.flush_all(None, NOW);
        assert!(get(&store, "c").is_none());
        assert_eq!(store.snapshot().memory.items, 0);
        assert_eq!(store.snapshot().memory.bytes, 0);
    }

    #[test]
    fn lru_k_memory_tier_resists_a_scan_and_lru_does_not() {
        for (policy, hot_survive) in [(Policy::LruK(2), true), (Policy::Lru, false)] {
            let store = memory_store(6 * item_cost(3, 1000), policy);
            for hot in ["h1", "h2", "h3"] {
                set(&store, hot, value(1000));
                get(&store, hot);
                get(&store, hot);
            }
            for i in 0..50 {
                let key = format!("s{i:02}");
                set(&store, &key, value(1000));
                get(&store, &key);
            }
            for hot in ["h1", "h2", "h3"] {
                assert_eq!(get(&store, hot).is_some(), hot_survive, "{policy} {hot}");
            }
        }
    }

    #[test]
    fn tiers_move_items_and_keep_their_budgets() {
        let dir = tempfile::tempdir().unwrap();
        let flash = Arc::new(FlashDir::open(dir.path()).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let cost = item_cost(3, 1000);
        let store = Arc::new(Store::new(
            TierSizes {
                memory_bytes: 4 * cost,
                flash_bytes: 8 * cost,
            },
            Policy::LruK(2),
            1 << 20,
            Some((flash.clone(), Vec::new(), tx)),
            NOW,
        ));
        let writer = {
            let weak = Arc::downgrade(&store);
            std::thread::spawn(move || run_writer(flash, rx, weak))
        };
        for i in 0..20 {
            set(&store, &format!("k{i:02}"), value(1000));
        }
        let s = store.snapshot();
        assert_eq!(s.memory.items, 4);
        assert_eq!(s.flash.items, 8);
        assert_eq!(s.memory.counters.demotions, 16);
        assert_eq!(s.flash.counters.evictions, 8);
        assert!(s.flash.bytes <= s.flash.limit && s.memory.bytes <= s.memory.limit);
        // Wait for the writes, then read an item back from flash.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(store.barrier().unwrap()).unwrap();
        assert_eq!(store.snapshot().flash_pending_bytes, 0);
        let Lookup::OnFlash(file) = store.lookup(b"k10", NOW, true) else {
            panic!("k10 should be on flash");
        };
        let read = store.flash_dir().unwrap().read(file, b"k10", 1 << 20);
        let Lookup::Hit(item) = store.finish_read(b"k10", file, read, false, NOW) else {
            panic!("k10 should read back");
        };
        assert_eq!(item.value, value(1000));
        let s = store.snapshot();
        assert_eq!(s.flash.counters.hits, 1);
        // Read once, it outranks memory's never-read items and is promoted.
        assert_eq!(s.memory.counters.promotions, 1);
        assert_eq!(s.memory.items + s.flash.items, 12);
        store.stop_writer();
        writer.join().unwrap();
    }
}
