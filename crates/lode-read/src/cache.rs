//! The worker-wide chunk cache: decrypted segments in memory over a chain of ciphertext
//! [`ChunkTier`]s and the [`ChunkOrigin`], with single-flight misses (docs/agent.md).
//!
//! ```text
//!  segment(chunk, key, j)
//!     │ decrypted LRU hit (name, j) ─────────────────────────────────────► bytes
//!     │ fetch of this chunk in flight? join it (counted: joined_fetches)
//!     ▼ else start one:
//!  tiers[0] memory ─► tiers[1] disk ─► tiers[2] az ─► origin       (first that has it)
//!     Found::Checked        whole object, checked: open segment j (GCM only)
//!     Found::Local          own disk: pread segment j, GCM authenticates it as it opens
//!     Found::HeaderChecked  v2 header checked by the tier: hash segment j, open, answer;
//!                           in the background hash the rest, then keep it above
//!     Found::Unchecked / origin: v1 checked whole; v2 header first, as above
//!     a copy that fails any check → dropped from its tier, counted, next tier
//!  plaintext of segment j → decrypted LRU → the reader
//! ```
//!
//! A chunk's name fixes its ciphertext, and so its plaintext, so both caches key by name
//! (and segment) alone and are shared by every attached image. A v1 chunk is one segment.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lode_format::{ChunkFormat, ChunkKey, ChunkName, SegmentIndex};
use tokio::task::JoinHandle;

use crate::checked::{Checked, Found, HeaderChecked, LocalError, LocalObject};
use crate::device::segment_index;
use crate::error::blocking;
use crate::metrics::Metrics;
use crate::tier::{ChunkOrigin, ChunkRef, ChunkTier};
use crate::trace::{DECRYPTED, Served};
use crate::{MetricsSnapshot, ReadError};
use lode_evict::{Cache, PolicyKind};

/// Where a fetch found a chunk, and how far it is checked.
#[derive(Debug)]
enum Source {
    /// A whole checked object.
    Checked(Checked),
    /// A v2 object whose header checked: each segment is hashed before it is used.
    Partial(HeaderChecked),
    /// A file on this worker's disk.
    Local(LocalObject),
}

/// A fetch's answer: the source, the tier it came from (`tiers.len()` for the origin) and
/// the fetch's number (its entry in the in-flight map).
#[derive(Debug)]
struct Fetched {
    at: usize,
    source: Source,
    id: u64,
}

type SharedFetch = Shared<BoxFuture<'static, Result<Arc<Fetched>, Arc<ReadError>>>>;

/// Opening a segment from a fetched source failed.
enum OpenFailure {
    /// The copy at tier `at` is not the chunk: drop it and fetch again.
    Copy(ReadError),
    /// No other copy can do better (the chunk does not open under the manifest's key).
    Fatal(ReadError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves its map consistent before anything can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configures a [`ChunkCache`]; checked at [`build`](Self::build).
#[derive(Debug, Default)]
pub struct CacheBuilder {
    decrypted_bytes: u64,
    decrypted_policy: PolicyKind,
    tiers: Vec<Arc<dyn ChunkTier>>,
    origin: Option<Arc<dyn ChunkOrigin>>,
}

impl CacheBuilder {
    /// A builder with no tiers and a 256 MiB decrypted-segment bound.
    pub fn new() -> Self {
        Self {
            decrypted_bytes: 256 << 20,
            decrypted_policy: PolicyKind::default(),
            tiers: Vec::new(),
            origin: None,
        }
    }

    /// Bounds the decrypted segments kept in memory (0 keeps none).
    pub fn decrypted_bytes(mut self, bytes: u64) -> Self {
        self.decrypted_bytes = bytes;
        self
    }

    /// Evicts decrypted segments by `policy` (the default: [`PolicyKind::default`]).
    pub fn decrypted_policy(mut self, policy: PolicyKind) -> Self {
        self.decrypted_policy = policy;
        self
    }

    /// Appends a ciphertext tier; tiers are asked in the order added, the origin after
    /// them. The first tier is filled before a fetch completes (it should be memory);
    /// the others in the background.
    pub fn tier(mut self, tier: Arc<dyn ChunkTier>) -> Self {
        self.tiers.push(tier);
        self
    }

    /// Sets the origin, asked when no tier holds a chunk.
    pub fn origin(mut self, origin: Arc<dyn ChunkOrigin>) -> Self {
        self.origin = Some(origin);
        self
    }

    /// Checks the configuration and builds the cache.
    pub fn build(self) -> Result<Arc<ChunkCache>, ReadError> {
        let origin = self
            .origin
            .ok_or_else(|| ReadError::Config("a chunk cache needs an origin (the store)".into()))?;
        let mut names: Vec<&'static str> = self.tiers.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ReadError::Config(format!("two tiers are named {:?}", w[0])));
        }
        if let Some(n) = names.iter().find(|n| ["decrypted", "origin"].contains(n)) {
            return Err(ReadError::Config(format!("a tier may not be named {n:?}")));
        }
        let mut names: Vec<&'static str> = self.tiers.iter().map(|t| t.name()).collect();
        names.push("origin");
        Ok(Arc::new(ChunkCache {
            decrypted: Mutex::new(Cache::new(self.decrypted_policy, self.decrypted_bytes)),
            metrics: Metrics::new(&names),
            tiers: self.tiers,
            origin,
            inflight: Mutex::new(HashMap::new()),
            next_fetch: AtomicU64::new(0),
            fills: Mutex::new(Vec::new()),
        }))
    }
}

/// Decrypted segments in memory over a chain of ciphertext tiers and the origin; one per
/// worker, shared by every attached image.
#[derive(Debug)]
pub struct ChunkCache {
    decrypted: Mutex<Cache<(ChunkName, u32), Bytes>>,
    tiers: Vec<Arc<dyn ChunkTier>>,
    origin: Arc<dyn ChunkOrigin>,
    inflight: Mutex<HashMap<ChunkName, (u64, SharedFetch)>>,
    next_fetch: AtomicU64,
    fills: Mutex<Vec<JoinHandle<()>>>,
    metrics: Metrics,
}

impl ChunkCache {
    /// A builder.
    pub fn builder() -> CacheBuilder {
        CacheBuilder::new()
    }

    /// The plaintext of segment `j` of `chunk` (for a v1 chunk, segment 0 is all of it),
    /// decrypted with `key` and checked to be exactly as long as the manifest says.
    pub async fn segment(
        self: &Arc<Self>,
        chunk: ChunkRef,
        key: &ChunkKey,
        j: SegmentIndex,
    ) -> Result<Bytes, ReadError> {
        self.segment_served(chunk, key, j).await.map(|(b, _)| b)
    }

    /// As [`segment`](Self::segment), and where the segment came from: `decrypted`, or
    /// the tier its chunk's fetch found the chunk in (a fetch this read joined counts
    /// as where that fetch found it).
    pub async fn segment_served(
        self: &Arc<Self>,
        chunk: ChunkRef,
        key: &ChunkKey,
        j: SegmentIndex,
    ) -> Result<(Bytes, Served), ReadError> {
        let started = Instant::now();
        if let Some(b) = lock(&self.decrypted).get(&(chunk.name, j.0)) {
            self.metrics.decrypted.hit(b.len(), started.elapsed());
            return Ok((b, DECRYPTED));
        }
        self.metrics.decrypted.miss(started.elapsed());
        // Each failed copy is dropped from its tier before the next try, so this ends:
        // at worst every tier, then the origin, whose failure is returned.
        let mut last = None;
        for _ in 0..=self.tiers.len() + 1 {
            let fetched = self.fetch(chunk, j).await.map_err(shared)?;
            let (f, k) = (Arc::clone(&fetched), key.clone());
            let name = self.tier_name(fetched.at);
            let opened = blocking(move || Ok(open_from(&f, name, &chunk, &k, j))).await?;
            match opened {
                Ok(plain) => {
                    if let Source::Local(_) = fetched.source {
                        // A local file counts as a hit once its segment authenticated.
                        self.metrics.tiers[fetched.at].hit(plain.len(), started.elapsed());
                    }
                    let len = plain.len() as u64;
                    lock(&self.decrypted).insert((chunk.name, j.0), plain.clone(), len);
                    let served = Served {
                        tier: self.tier_name(fetched.at),
                        object_bytes: held_bytes(&fetched.source).map(|b| b as u64),
                    };
                    return Ok((plain, served));
                }
                Err(OpenFailure::Fatal(e)) => return Err(e),
                Err(OpenFailure::Copy(e)) => {
                    self.forget(&chunk, &fetched).await;
                    if fetched.at == self.tiers.len() {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ReadError::Task("a read found no copy to try".into())))
    }

    /// Segments already decrypted in memory, looked up under one lock (a read that spans
    /// many segments pays one lock, not one each): the bytes of each key found, `None`
    /// for the others, which the caller reads with [`segment`](Self::segment).
    pub fn decrypted_hits(&self, keys: &[(ChunkName, SegmentIndex)]) -> Vec<Option<Bytes>> {
        let started = Instant::now();
        let found: Vec<Option<Bytes>> = {
            let mut d = lock(&self.decrypted);
            keys.iter().map(|(n, j)| d.get(&(*n, j.0))).collect()
        };
        let took = started.elapsed();
        for b in found.iter().flatten() {
            self.metrics.decrypted.hit(b.len(), took);
        }
        found
    }

    /// The whole decrypted chunk: every segment, in order.
    pub async fn chunk(
        self: &Arc<Self>,
        chunk: ChunkRef,
        key: &ChunkKey,
    ) -> Result<Bytes, ReadError> {
        let segments = futures::future::try_join_all(
            (0..chunk.segment_count()).map(|j| self.segment(chunk, key, segment_index(j as u64))),
        )
        .await?;
        if let [one] = segments.as_slice() {
            return Ok(one.clone());
        }
        Ok(Bytes::from(segments.concat()))
    }

    /// Brings `chunk`'s object into the worker's tiers ahead of a read (prefetch), as a
    /// demand miss would, without decrypting it: whether it came from off the worker (the
    /// AZ cache or the origin). A chunk already being fetched is left to that fetch
    /// (`false`); one found in memory or on disk is not fetched again (`false`).
    pub async fn prefetch(self: &Arc<Self>, chunk: ChunkRef) -> Result<bool, ReadError> {
        self.prefetch_served(chunk)
            .await
            .map(|s| s.is_some_and(|(remote, _)| remote))
    }

    /// As [`prefetch`](Self::prefetch): `None` when the chunk was left to a fetch in
    /// flight, else whether it came from off the worker and where it was found.
    pub async fn prefetch_served(
        self: &Arc<Self>,
        chunk: ChunkRef,
    ) -> Result<Option<(bool, Served)>, ReadError> {
        if lock(&self.inflight).contains_key(&chunk.name) {
            return Ok(None);
        }
        let fetched = self.fetch(chunk, SegmentIndex(0)).await.map_err(shared)?;
        let remote = self.tiers.get(fetched.at).is_none_or(|t| t.remote());
        let served = Served {
            tier: self.tier_name(fetched.at),
            object_bytes: held_bytes(&fetched.source).map(|b| b as u64),
        };
        Ok(Some((remote, served)))
    }

    /// Whether `chunk` is on this worker now (in flight, or held by a tier that is not
    /// remote): what a prefetch brought is still there to be used.
    pub fn holds_locally(&self, chunk: &ChunkRef) -> bool {
        lock(&self.inflight).contains_key(&chunk.name)
            || self.tiers.iter().any(|t| !t.remote() && t.contains(chunk))
    }

    /// Whether the origin is at its fetch limit: prefetch waits while it is.
    pub fn origin_busy(&self) -> bool {
        self.origin.busy()
    }

    fn tier_name(&self, at: usize) -> &'static str {
        self.tiers.get(at).map_or("origin", |t| t.name())
    }

    /// Drops a copy that failed its check from tier `at`, and the fetch that found it.
    /// A partly checked object stays in flight until it is checked whole, and both a
    /// reader and the background check may find it bad: whichever ends the fetch counts
    /// it.
    async fn forget(&self, chunk: &ChunkRef, fetched: &Fetched) {
        let ended = self.end_fetch(&chunk.name, fetched.id);
        if matches!(fetched.source, Source::Partial(_)) && !ended {
            return;
        }
        let at = fetched.at;
        self.metrics.tiers[at].integrity_failure();
        if let Some(t) = self.tiers.get(at) {
            t.remove(chunk).await;
        }
    }

    /// The fetch of `chunk` in flight, or a new one; `j` is the segment the starter
    /// waits for (a local tier reads just that).
    async fn fetch(
        self: &Arc<Self>,
        chunk: ChunkRef,
        j: SegmentIndex,
    ) -> Result<Arc<Fetched>, Arc<ReadError>> {
        let f = {
            let mut inflight = lock(&self.inflight);
            if let Some((_, f)) = inflight.get(&chunk.name) {
                self.metrics.joined();
                f.clone()
            } else {
                let this = Arc::clone(self);
                let id = self.next_fetch.fetch_add(1, Ordering::Relaxed);
                let f = async move {
                    let r = this.walk(chunk, j).await;
                    let r = r.map(|(at, source)| Arc::new(Fetched { at, source, id }));
                    let r = r.map_err(Arc::new);
                    match &r {
                        Ok(f) if matches!(f.source, Source::Partial(_)) => {
                            // Joiners keep using this object until it is checked whole
                            // and kept; the finisher then forgets the fetch.
                            this.finish(chunk, Arc::clone(f));
                        }
                        _ => {
                            this.end_fetch(&chunk.name, id);
                        }
                    }
                    r
                }
                .boxed()
                .shared();
                inflight.insert(chunk.name, (id, f.clone()));
                f
            }
        };
        f.await
    }

    /// Walks the tiers, then the origin, for `chunk`.
    async fn walk(
        self: &Arc<Self>,
        chunk: ChunkRef,
        j: SegmentIndex,
    ) -> Result<(usize, Source), ReadError> {
        let mut last_err = None;
        for (at, tier) in self.tiers.iter().enumerate() {
            let m = &self.metrics.tiers[at];
            let started = Instant::now();
            let found = match tier.get(&chunk, j).await {
                Ok(None) => {
                    m.miss(started.elapsed());
                    continue;
                }
                Ok(Some(found)) => found,
                Err(e) => {
                    if e.is_integrity() {
                        m.integrity_failure();
                        tier.remove(&chunk).await;
                    } else {
                        m.error();
                    }
                    last_err = Some(e);
                    continue;
                }
            };
            let checked = match found {
                Found::Checked(o) => Ok(Source::Checked(o)),
                Found::HeaderChecked(o) => Ok(Source::Partial(o)),
                Found::Local(o) => Ok(Source::Local(o)),
                Found::Unchecked(b) => check_unchecked(tier.name(), chunk, b).await,
            };
            match checked {
                Ok(source) => {
                    if let Some(bytes) = held_bytes(&source) {
                        // A local tier serves the segment asked for from what it holds;
                        // a remote one moves the whole object.
                        let bytes = if tier.remote() {
                            bytes
                        } else {
                            chunk.segment_plain_len(j)
                        };
                        m.hit(bytes, started.elapsed());
                    }
                    return Ok(self.found(at, chunk, source).await);
                }
                Err(e) => {
                    m.integrity_failure();
                    tier.remove(&chunk).await;
                    last_err = Some(e);
                }
            }
        }
        let at = self.tiers.len();
        let m = &self.metrics.tiers[at];
        let started = Instant::now();
        match self.origin.fetch(&chunk).await {
            Ok(Some(b)) => match check_unchecked("origin", chunk, b).await {
                Ok(source) => {
                    if let Some(bytes) = held_bytes(&source) {
                        m.hit(bytes, started.elapsed());
                    }
                    Ok(self.found(at, chunk, source).await)
                }
                Err(e) => {
                    m.integrity_failure();
                    Err(e)
                }
            },
            Ok(None) => {
                m.miss(started.elapsed());
                Err(last_err.unwrap_or_else(|| ReadError::NotFound {
                    chunk: chunk.name,
                    tried: self
                        .tiers
                        .iter()
                        .map(|t| t.name())
                        .chain(["origin"])
                        .collect::<Vec<_>>()
                        .join(", "),
                }))
            }
            Err(e) => {
                if e.is_integrity() {
                    m.integrity_failure();
                } else {
                    m.error();
                }
                Err(e)
            }
        }
    }

    /// A source found at `at`: a whole checked object is kept in the tiers above now.
    async fn found(&self, at: usize, chunk: ChunkRef, source: Source) -> (usize, Source) {
        if let Source::Checked(o) = &source {
            self.fill(at, chunk, o).await;
        }
        (at, source)
    }

    /// Ends fetch `id` of `name` (a newer fetch of the same chunk is left alone); whether
    /// it was still in flight.
    fn end_fetch(&self, name: &ChunkName, id: u64) -> bool {
        let mut inflight = lock(&self.inflight);
        if inflight.get(name).is_some_and(|(i, _)| *i == id) {
            inflight.remove(name);
            true
        } else {
            false
        }
    }

    /// Hashes the rest of a partly checked object in the background, keeps it in the
    /// tiers above where it was found, and ends the fetch. A segment that fails drops the
    /// copy from its tier.
    fn finish(self: &Arc<Self>, chunk: ChunkRef, fetched: Arc<Fetched>) {
        let this = Arc::clone(self);
        let h = tokio::spawn(async move {
            let Source::Partial(o) = &fetched.source else {
                return;
            };
            let (o, name) = (o.clone(), this.tier_name(fetched.at));
            let whole = tokio::task::spawn_blocking(move || o.finish(name, &chunk)).await;
            match whole {
                Ok(Ok(checked)) => {
                    this.fill(fetched.at, chunk, &checked).await;
                    this.end_fetch(&chunk.name, fetched.id);
                }
                Ok(Err(_)) | Err(_) => this.forget(&chunk, &fetched).await,
            }
        });
        let mut fills = lock(&self.fills);
        fills.retain(|h| !h.is_finished());
        fills.push(h);
    }

    /// Copies a checked object into the tiers above `found_at`: the first at once (it
    /// is memory, and lets the next miss find it), the others in the background so the
    /// read returns first.
    async fn fill(&self, found_at: usize, chunk: ChunkRef, object: &Checked) {
        for (i, tier) in self.tiers[..found_at.min(self.tiers.len())]
            .iter()
            .enumerate()
        {
            if i == 0 {
                tier.put(&chunk, object).await;
            } else {
                let tier = Arc::clone(tier);
                let object = object.clone();
                let h = tokio::spawn(async move { tier.put(&chunk, &object).await });
                let mut fills = lock(&self.fills);
                fills.retain(|h| !h.is_finished());
                fills.push(h);
            }
        }
    }

    /// Waits for background fills and checks started so far (tests; a clean shutdown).
    pub async fn settle(&self) {
        loop {
            let fills = std::mem::take(&mut *lock(&self.fills));
            if fills.is_empty() {
                return;
            }
            for h in fills {
                let _ = h.await;
            }
        }
    }

    /// Forgets every chunk held in memory (decrypted and ciphertext); disk tiers keep
    /// theirs. For tests and for measuring the disk tier cold-memory.
    pub fn drop_memory(&self) {
        lock(&self.decrypted).clear();
        for t in &self.tiers {
            t.drop_memory();
        }
    }

    /// The ciphertext tiers, in lookup order (the origin is not one).
    pub fn tiers(&self) -> &[Arc<dyn ChunkTier>] {
        &self.tiers
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Every counter, with each tier's current usage.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut s = self.metrics.snapshot();
        {
            let d = lock(&self.decrypted);
            s.tiers[0].used_bytes = Some(d.used());
            s.tiers[0].capacity_bytes = Some(d.capacity());
        }
        for (snap, tier) in s.tiers[1..].iter_mut().zip(&self.tiers) {
            if let Some((used, cap)) = tier.usage() {
                snap.used_bytes = Some(used);
                snap.capacity_bytes = Some(cap);
            }
        }
        s
    }
}

/// The error a reader gets from a fetch it may share with others: the error itself when
/// it is the only holder, else [`ReadError::Shared`], which keeps its type.
fn shared(e: Arc<ReadError>) -> ReadError {
    match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(e) => ReadError::Shared(e),
    }
}

/// The bytes a hit counts: the object's. A local file counts when its segment opens.
fn held_bytes(source: &Source) -> Option<usize> {
    match source {
        Source::Checked(o) => Some(o.bytes().len()),
        Source::Partial(o) => Some(o.bytes().len()),
        Source::Local(_) => None,
    }
}

/// Checks bytes nobody checked: a v1 object whole, a v2 object's header (its segments
/// are hashed as they are used).
async fn check_unchecked(
    tier: &'static str,
    chunk: ChunkRef,
    bytes: Bytes,
) -> Result<Source, ReadError> {
    blocking(move || {
        Ok(match chunk.format {
            ChunkFormat::V1 => Checked::check(tier, &chunk, bytes).map(Source::Checked),
            ChunkFormat::V2 { .. } => {
                HeaderChecked::check(tier, &chunk, bytes).map(Source::Partial)
            }
        })
    })
    .await?
}

/// Opens segment `j` from a fetched source (blocking: hashing, reading, decrypting).
fn open_from(
    fetched: &Fetched,
    tier: &'static str,
    chunk: &ChunkRef,
    key: &ChunkKey,
    j: SegmentIndex,
) -> Result<Bytes, OpenFailure> {
    match &fetched.source {
        // Checked whole: a failure to open is the manifest's key, not the copy.
        Source::Checked(o) => o.open_segment(chunk, key, j).map_err(OpenFailure::Fatal),
        Source::Partial(o) => o.open_segment(tier, chunk, key, j).map_err(|e| {
            if e.is_integrity() {
                OpenFailure::Copy(e)
            } else {
                OpenFailure::Fatal(e)
            }
        }),
        // The worker's own copy: whatever fails (a rotted segment, a failing disk), the
        // next tier may hold a good one.
        Source::Local(o) => o.open_segment(tier, chunk, key, j).map_err(|e| match e {
            LocalError::Io(e) | LocalError::Rotted(e) => OpenFailure::Copy(e),
        }),
    }
}
