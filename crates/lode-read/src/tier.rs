//! Ciphertext tiers: one small trait, so the AZ cache slots in between the local cache
//! and the origin (docs/agent.md).
//!
//! A tier only stores and returns bytes; checking them is the job of the
//! [`ChunkCache`](crate::ChunkCache): it hashes whatever a remote tier returns, and lets
//! AES-GCM authenticate what the worker's own disk returns (a disk can rot; a failed tag
//! is caught like a failed name).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use lode_format::{ChunkFormat, ChunkName, ManifestId, ObjectError, RootId};
use lode_store::{Store, StoreError};

use crate::error::{blocking, io};
use crate::{Lru, ReadError};

/// A chunk as the tiers know it: its name, the store root it lives under and the
/// manifest that asked for it (the origin needs the root, and names both in a read
/// alarm; local tiers key by name alone, as a name fixes the bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// The root.
    pub root: RootId,
    /// The manifest the chunk is read for (one of those that name it).
    pub manifest: ManifestId,
    /// The chunk's name (SHA-256 of its v1 ciphertext, or of its v2 header).
    pub name: ChunkName,
    /// The format its object is sealed in, from the manifest.
    pub format: ChunkFormat,
    /// The length its object has in that format (its plaintext length plus the seal's
    /// tags and header): the origin refuses a larger object before reading it.
    pub max_bytes: u64,
}

/// One place ciphertext chunks can come from.
#[async_trait]
pub trait ChunkTier: Send + Sync + std::fmt::Debug + 'static {
    /// A short name for metrics and messages (`memory`, `disk`, `origin`).
    fn name(&self) -> &'static str;

    /// The chunk's ciphertext, or `None` when this tier does not hold it. The bytes may
    /// be wrong; the caller checks them unless the tier is [`trusted`](Self::trusted).
    async fn get(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError>;

    /// Keeps a copy of a chunk whose bytes were checked. Best effort: a tier that cannot
    /// keep it (full, read-only, failing disk) just does not.
    async fn put(&self, chunk: &ChunkRef, ciphertext: Bytes);

    /// Forgets a chunk (after it failed its check).
    async fn remove(&self, chunk: &ChunkRef) {
        let _ = chunk;
    }

    /// Whether what this tier returns needs no check: true only for the worker's own
    /// memory, which holds only bytes that were checked on the way in.
    fn trusted(&self) -> bool {
        false
    }

    /// Whether this tier holds only bytes this worker wrote after checking them (its
    /// own disk). Such bytes are not hashed again when they are about to be decrypted:
    /// AES-GCM's tag authenticates them under the manifest's key, and a copy that fails
    /// it is treated like one that fails its name. Bytes from other machines (the AZ
    /// cache, the origin) are always checked against the name, because a convergent key
    /// is known to anyone who knows the plaintext, so only the name pins the ciphertext.
    fn local(&self) -> bool {
        false
    }

    /// Whether the tier itself returns only bytes that hash to the chunk's name (the
    /// origin store and the AZ client check every chunk they return), so the cache need
    /// not hash them again.
    fn verifies_names(&self) -> bool {
        false
    }

    /// Whether chunks found further down should be copied here.
    fn fillable(&self) -> bool {
        true
    }

    /// Bytes held and the bound, for tiers that keep a byte count.
    fn usage(&self) -> Option<(u64, u64)> {
        None
    }

    /// Drops everything held in memory (the disk and the origin keep theirs).
    fn drop_memory(&self) {}
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the LRU consistent (every method restores
    // its invariants before it can panic), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ciphertext in worker memory, byte-bounded LRU. Trusted: only checked bytes go in.
#[derive(Debug)]
pub struct MemoryTier {
    lru: Mutex<Lru<ChunkName, Bytes>>,
}

impl MemoryTier {
    /// A tier holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self {
            lru: Mutex::new(Lru::new(capacity)),
        }
    }
}

#[async_trait]
impl ChunkTier for MemoryTier {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError> {
        Ok(lock(&self.lru).get(&chunk.name))
    }

    async fn put(&self, chunk: &ChunkRef, ciphertext: Bytes) {
        let len = ciphertext.len() as u64;
        lock(&self.lru).insert(chunk.name, ciphertext, len);
    }

    async fn remove(&self, chunk: &ChunkRef) {
        lock(&self.lru).remove(&chunk.name);
    }

    fn trusted(&self) -> bool {
        true
    }

    fn usage(&self) -> Option<(u64, u64)> {
        let l = lock(&self.lru);
        Some((l.used(), l.capacity()))
    }

    fn drop_memory(&self) {
        lock(&self.lru).clear();
    }
}

/// Ciphertext on local disk: one file per chunk, named by the chunk's hex name, in one
/// directory; written to a temporary name and renamed, so a crash never leaves a
/// half-written file under a chunk's name (and a rotted one is caught by the name
/// check). Byte-bounded LRU over an in-memory index; files found in the directory at
/// open are indexed in no particular order.
#[derive(Debug)]
pub struct DiskTier {
    dir: PathBuf,
    index: Arc<Mutex<Lru<ChunkName, ()>>>,
    tmp_seq: AtomicU64,
}

impl DiskTier {
    /// Opens (creating) a cache directory bounded to `capacity` bytes, indexing the
    /// chunk files already there and removing leftover temporary files.
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> Result<Self, ReadError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io("create cache directory", &dir))?;
        let mut lru = Lru::new(capacity);
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

    fn local(&self) -> bool {
        true
    }

    async fn get(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError> {
        if lock(&self.index).get(&chunk.name).is_none() {
            return Ok(None);
        }
        let path = self.path_of(&chunk.name);
        let index = Arc::clone(&self.index);
        let name = chunk.name;
        blocking(move || match fs::read(&path) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                lock(&index).remove(&name);
                Ok(None)
            }
            Err(e) => Err(io("read cached chunk", &path)(e)),
        })
        .await
    }

    async fn put(&self, chunk: &ChunkRef, ciphertext: Bytes) {
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
            // delete the victims' files after releasing the lock.
            let evicted = lock(&index).insert(name, (), ciphertext.len() as u64);
            for (victim, ()) in evicted {
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
}

/// Told of every chunk the [`OriginTier`] fetches, or tries to: the agent raises read
/// alarms from these (docs/gc.md). Called on the read's own task, after the fetch, so it
/// must not wait; whatever it does with the store runs in a task of its own.
pub trait OriginWatch: Send + Sync + std::fmt::Debug + 'static {
    /// A chunk of `manifest` was just fetched (or tried) from `root` in the origin store.
    fn fetched(self: Arc<Self>, root: RootId, manifest: ManifestId);
}

/// The origin store. [`Store::get_chunk`] already checks names; a corrupt chunk there
/// is an [`ReadError::Corrupt`], which the cache counts and, as this is the last tier,
/// returns as an error: a wrong byte is never served. At most
/// [`concurrency`](Self::with_concurrency) fetches run at once, so an empty cache in
/// front of it does not flood the store; the rest queue. In the agent, every fetch is
/// also reported to its [`OriginWatch`], which raises a read alarm when the chunk's root
/// has expired (docs/gc.md); the fetch itself never waits on that.
#[derive(Debug)]
pub struct OriginTier {
    store: Store,
    permits: tokio::sync::Semaphore,
    watch: Option<Arc<dyn OriginWatch>>,
}

/// Concurrent origin fetches allowed by default.
pub const DEFAULT_ORIGIN_CONCURRENCY: usize = 64;

impl OriginTier {
    /// The origin tier over `store`, with [`DEFAULT_ORIGIN_CONCURRENCY`].
    pub fn new(store: Store) -> Self {
        Self::with_concurrency(store, DEFAULT_ORIGIN_CONCURRENCY)
    }

    /// The origin tier over `store`, fetching at most `n` chunks at once (at least 1).
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
impl ChunkTier for OriginTier {
    fn name(&self) -> &'static str {
        "origin"
    }

    async fn get(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError> {
        let fetched = {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|e| ReadError::Task(e.to_string()))?;
            self.store
                .get_chunk(chunk.root, &chunk.name, chunk.max_bytes)
                .await
        };
        // Whatever the fetch found: a read of a deleted root, which fails, is an alarm too.
        if let Some(w) = &self.watch {
            Arc::clone(w).fetched(chunk.root, chunk.manifest);
        }
        match fetched {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(StoreError::CorruptChunk { name, got, .. }) => Err(ReadError::Corrupt {
                tier: "origin",
                chunk: name,
                got,
            }),
            Err(StoreError::CorruptChunkObject { name, reason, .. }) => {
                Err(ReadError::CorruptObject {
                    tier: "origin",
                    chunk: name,
                    source: Box::new(ObjectError::V2(*reason)),
                })
            }
            Err(source) => Err(ReadError::Store {
                chunk: chunk.name,
                source: Box::new(source),
            }),
        }
    }

    async fn put(&self, _chunk: &ChunkRef, _ciphertext: Bytes) {}

    fn verifies_names(&self) -> bool {
        true
    }

    fn fillable(&self) -> bool {
        false
    }
}
