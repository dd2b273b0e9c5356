//! Ciphertext tiers: one small trait, so the AZ cache slots in between the worker's own
//! tiers and the origin (docs/agent.md), and the origin behind them all.
//!
//! A tier says what it returns with [`Found`]: an object it checked, a v2 object whose
//! header it checked, a file on this worker's disk, or bytes nobody checked; the
//! [`ChunkCache`](crate::ChunkCache) matches on that and checks what is left to check
//! (docs/architecture.md, "Trust boundaries"). A tier keeps only [`Checked`] objects.
//! The origin is not a tier: it is never filled ([`ChunkOrigin`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use lode_format::{ChunkFormat, ChunkIndex, ChunkName, ManifestId, RootId, SegmentIndex};
use lode_store::{Store, StoreError};

use crate::ReadError;
use crate::checked::{Checked, Found, LocalError, LocalObject};
use crate::error::{blocking, io};
use lode_evict::{Cache, PolicyKind};

/// A chunk as the tiers know it: its name, the store root it lives under, the manifest
/// that asked for it and where in that image it sits (the origin needs the root, and
/// names both in a read alarm; local tiers key by name alone, as a name fixes the bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// The root.
    pub root: RootId,
    /// The manifest the chunk is read for (one of those that name it).
    pub manifest: ManifestId,
    /// The chunk's index in that image (named when it does not open).
    pub index: ChunkIndex,
    /// The chunk's name (SHA-256 of its v1 ciphertext, or of its v2 header).
    pub name: ChunkName,
    /// The format its object is sealed in, from the manifest.
    pub format: ChunkFormat,
    /// Its plaintext length, from the manifest's chunk and device sizes.
    pub plain_len: u32,
    /// The most its object can be in that format (its plaintext length plus the seal's
    /// tags and header): the origin refuses a larger object before reading it.
    pub max_bytes: u64,
}

impl ChunkRef {
    /// The plaintext bytes of each segment but a short last one: the segment size for
    /// v2, the whole chunk for v1 (one segment).
    pub fn segment_len(&self) -> u32 {
        match self.format.segment_size() {
            Some(s) => s.bytes().min(self.plain_len.max(1)),
            None => self.plain_len,
        }
    }

    /// How many segments the chunk has (1 for v1).
    pub fn segment_count(&self) -> usize {
        let (plain, seg) = (self.plain_len as usize, self.segment_len().max(1) as usize);
        plain.div_ceil(seg).max(1)
    }

    /// The plaintext length of segment `j` (0 past the last).
    pub fn segment_plain_len(&self, j: SegmentIndex) -> usize {
        let seg = self.segment_len() as usize;
        let start = (j.0 as usize).saturating_mul(seg);
        (self.plain_len as usize).saturating_sub(start).min(seg)
    }
}

/// One place ciphertext chunks can come from, above the origin.
#[async_trait]
pub trait ChunkTier: Send + Sync + std::fmt::Debug + 'static {
    /// A short name for metrics and messages (`memory`, `disk`, `az`).
    fn name(&self) -> &'static str;

    /// What this tier holds of `chunk`, or `None` when it holds nothing. `segment` is the
    /// one the read waits for: a tier may return just what reads it (a local file) or the
    /// whole object.
    async fn get(
        &self,
        chunk: &ChunkRef,
        segment: SegmentIndex,
    ) -> Result<Option<Found>, ReadError>;

    /// Keeps a copy of a checked chunk. Best effort: a tier that cannot keep it (full,
    /// read-only, failing disk) just does not.
    async fn put(&self, chunk: &ChunkRef, object: &Checked);

    /// Forgets a chunk (after it failed its check).
    async fn remove(&self, chunk: &ChunkRef) {
        let _ = chunk;
    }

    /// Bytes held and the bound, for tiers that keep a byte count.
    fn usage(&self) -> Option<(u64, u64)> {
        None
    }

    /// Drops everything held in memory (the disk keeps its own).
    fn drop_memory(&self) {}

    /// Whether the tier holds `chunk` now, without reading it or touching its recency
    /// (a tier that cannot tell cheaply says `false`).
    fn contains(&self, chunk: &ChunkRef) -> bool {
        let _ = chunk;
        false
    }

    /// Whether the tier is off this worker (the AZ cache): a prefetch counts what it
    /// brings from such a tier or the origin, not what was already on the worker.
    fn remote(&self) -> bool {
        false
    }
}

/// Where a chunk comes from when no tier holds it: never filled, asked last.
#[async_trait]
pub trait ChunkOrigin: Send + Sync + std::fmt::Debug + 'static {
    /// The chunk's object as fetched, unchecked (the cache checks it), or `None` when the
    /// origin does not hold it.
    async fn fetch(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError>;

    /// Whether a fetch started now would wait for a slot: prefetch holds back while it
    /// is, so demand fetches never queue behind it.
    fn busy(&self) -> bool {
        false
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the LRU consistent (every method restores
    // its invariants before it can panic), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checked chunk objects in worker memory, byte-bounded, evicted by a [`PolicyKind`]:
/// only [`Checked`] objects go in, so what comes out is [`Found::Checked`].
#[derive(Debug)]
pub struct MemoryTier {
    lru: Mutex<Cache<ChunkName, Checked>>,
}

impl MemoryTier {
    /// A tier holding at most `capacity` bytes, under the default policy.
    pub fn new(capacity: u64) -> Self {
        Self::with_policy(capacity, PolicyKind::default())
    }

    /// A tier holding at most `capacity` bytes, evicting by `policy`.
    pub fn with_policy(capacity: u64, policy: PolicyKind) -> Self {
        Self {
            lru: Mutex::new(Cache::new(policy, capacity)),
        }
    }
}

#[async_trait]
impl ChunkTier for MemoryTier {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn get(
        &self,
        chunk: &ChunkRef,
        _segment: SegmentIndex,
    ) -> Result<Option<Found>, ReadError> {
        Ok(lock(&self.lru).get(&chunk.name).map(Found::Checked))
    }

    async fn put(&self, chunk: &ChunkRef, object: &Checked) {
        let len = object.bytes().len() as u64;
        lock(&self.lru).insert(chunk.name, object.clone(), len);
    }

    async fn remove(&self, chunk: &ChunkRef) {
        lock(&self.lru).remove(&chunk.name);
    }

    fn contains(&self, chunk: &ChunkRef) -> bool {
        lock(&self.lru).contains(&chunk.name)
    }

    fn usage(&self) -> Option<(u64, u64)> {
        let l = lock(&self.lru);
        Some((l.used(), l.capacity()))
    }

    fn drop_memory(&self) {
        lock(&self.lru).clear();
    }
}

/// Checked chunk objects on local disk: one file per chunk, named by the chunk's hex name, in one
/// directory; written to a temporary name and renamed, so a crash never leaves a
/// half-written file under a chunk's name (and a rotted one is caught by the name
/// check). Byte-bounded, evicted by a [`PolicyKind`] over an in-memory index; files found
/// in the directory at open are indexed in no particular order.
#[derive(Debug)]
pub struct DiskTier {
    dir: PathBuf,
    index: Arc<Mutex<Cache<ChunkName, ()>>>,
    tmp_seq: AtomicU64,
}

impl DiskTier {
    /// Opens (creating) a cache directory bounded to `capacity` bytes, indexing the
    /// chunk files already there and removing leftover temporary files; the default
    /// policy.
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> Result<Self, ReadError> {
        Self::open_with_policy(dir, capacity, PolicyKind::default())
    }

    /// [`open`](Self::open), evicting by `policy`.
    pub fn open_with_policy(
        dir: impl Into<PathBuf>,
        capacity: u64,
        policy: PolicyKind,
    ) -> Result<Self, ReadError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io("create cache directory", &dir))?;
        let mut lru = Cache::new(policy, capacity);
        let mut stale = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io("list cache directory", &dir))? {
            let entry = entry.map_err(io("list cache directory", &dir))?;
            let path = entry.path();
            let name = entry.file_name();
            match name.to_str().and_then(|n| n.parse::<ChunkName>().ok()) {
                Some(chunk) => {
                    let len = entry.metadata().map_err(io("stat", &path))?.len();
                    stale.extend(
                        lru.insert(chunk, (), len)
                            .into_iter()
                            .map(|(c, ())| dir.join(c.to_hex())),
                    );
                }
                None if name.to_string_lossy().starts_with(".tmp-") => stale.push(path),
                None => {}
            }
        }
        for p in stale {
            let _ = fs::remove_file(p);
        }
        Ok(Self {
            dir,
            index: Arc::new(Mutex::new(lru)),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// The file a chunk lives in.
    pub fn path_of(&self, name: &ChunkName) -> PathBuf {
        self.dir.join(name.to_hex())
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[async_trait]
impl ChunkTier for DiskTier {
    fn name(&self) -> &'static str {
        "disk"
    }

    async fn get(
        &self,
        chunk: &ChunkRef,
        _segment: SegmentIndex,
    ) -> Result<Option<Found>, ReadError> {
        if lock(&self.index).get(&chunk.name).is_none() {
            return Ok(None);
        }
        let path = self.path_of(&chunk.name);
        let index = Arc::clone(&self.index);
        let chunk = *chunk;
        blocking(move || {
            let file = match fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    lock(&index).remove(&chunk.name);
                    return Ok(None);
                }
                Err(e) => return Err(io("open cached chunk", &path)(e)),
            };
            match LocalObject::open("disk", &chunk, file, path) {
                Ok(o) => Ok(Some(Found::Local(o))),
                Err(LocalError::Io(e) | LocalError::Rotted(e)) => Err(e),
            }
        })
        .await
    }

    async fn put(&self, chunk: &ChunkRef, object: &Checked) {
        let ciphertext = object.bytes().clone();
        let path = self.path_of(&chunk.name);
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}-{seq}",
            chunk.name.to_hex(),
            std::process::id()
        ));
        let index = Arc::clone(&self.index);
        let dir = self.dir.clone();
        let name = chunk.name;
        let _ = blocking(move || {
            let write = || -> std::io::Result<()> {
                let mut f = fs::File::create(&tmp)?;
                f.write_all(&ciphertext)?;
                fs::rename(&tmp, &path)
            };
            if let Err(e) = write() {
                let _ = fs::remove_file(&tmp);
                return Err(io("write cached chunk", &path)(e));
            }
            // Index only after the rename, so a get never finds a name without a file;
            // delete the victims' files after releasing the lock. A chunk put again evicts
            // its own older entry, whose file the rename just replaced: that file stays.
            let evicted = lock(&index).insert(name, (), ciphertext.len() as u64);
            for (victim, ()) in evicted
                .into_iter()
                .filter(|(v, ())| *v != name || !lock(&index).contains(&name))
            {
                let _ = fs::remove_file(dir.join(victim.to_hex()));
            }
            Ok(())
        })
        .await;
    }

    async fn remove(&self, chunk: &ChunkRef) {
        lock(&self.index).remove(&chunk.name);
        let path = self.path_of(&chunk.name);
        let _ = blocking(move || {
            let _ = fs::remove_file(path);
            Ok(())
        })
        .await;
    }

    fn usage(&self) -> Option<(u64, u64)> {
        let l = lock(&self.index);
        Some((l.used(), l.capacity()))
    }

    fn contains(&self, chunk: &ChunkRef) -> bool {
        lock(&self.index).contains(&chunk.name)
    }
}

/// Told of every chunk the [`StoreOrigin`] fetches, or tries to: the agent raises read
/// alarms from these (docs/gc.md). Called on the read's own task, after the fetch, so it
/// must not wait; whatever it does with the store runs in a task of its own.
pub trait OriginWatch: Send + Sync + std::fmt::Debug + 'static {
    /// A chunk of `manifest` was just fetched (or tried) from `root` in the origin store.
    fn fetched(self: Arc<Self>, root: RootId, manifest: ManifestId);
}

/// The origin store. It fetches objects unchecked ([`Store::get_chunk_unchecked`]): the
/// cache checks a v2 object's header and the segment a read waits for first, the rest
/// before it keeps the object; a v1 object whole. A corrupt chunk there is a
/// [`ReadError::Corrupt`] or [`ReadError::CorruptObject`] that, as the origin is last,
/// the read returns: a wrong byte is never served. At most
/// [`concurrency`](Self::with_concurrency) fetches run at once, so an empty cache in
/// front of it does not flood the store; the rest queue. In the agent, every fetch is
/// also reported to its [`OriginWatch`], which raises a read alarm when the chunk's root
/// has expired (docs/gc.md); the fetch itself never waits on that.
#[derive(Debug)]
pub struct StoreOrigin {
    store: Store,
    permits: tokio::sync::Semaphore,
    watch: Option<Arc<dyn OriginWatch>>,
}

/// Concurrent origin fetches allowed by default.
pub const DEFAULT_ORIGIN_CONCURRENCY: usize = 64;

impl StoreOrigin {
    /// The origin over `store`, with [`DEFAULT_ORIGIN_CONCURRENCY`].
    pub fn new(store: Store) -> Self {
        Self::with_concurrency(store, DEFAULT_ORIGIN_CONCURRENCY)
    }

    /// The origin over `store`, fetching at most `n` chunks at once (at least 1).
    pub fn with_concurrency(store: Store, n: usize) -> Self {
        Self {
            store,
            permits: tokio::sync::Semaphore::new(n.max(1)),
            watch: None,
        }
    }

    /// Reports every fetch to `watch`, for read alarms.
    pub fn watched(mut self, watch: Arc<dyn OriginWatch>) -> Self {
        self.watch = Some(watch);
        self
    }
}

#[async_trait]
impl ChunkOrigin for StoreOrigin {
    fn busy(&self) -> bool {
        self.permits.available_permits() == 0
    }

    async fn fetch(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError> {
        let fetched = {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|e| ReadError::Task(e.to_string()))?;
            self.store
                .get_chunk_unchecked(chunk.root, &chunk.name, chunk.max_bytes)
                .await
        };
        // Whatever the fetch found: a read of a deleted root, which fails, is an alarm too.
        if let Some(w) = &self.watch {
            Arc::clone(w).fetched(chunk.root, chunk.manifest);
        }
        match fetched {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(source) => Err(ReadError::Store {
                chunk: chunk.name,
                source: Box::new(source),
            }),
        }
    }
}
