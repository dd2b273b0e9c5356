//! The worker-wide chunk cache: decrypted chunks in memory over a chain of ciphertext
//! [`ChunkTier`]s, with single-flight misses (docs/agent.md).
//!
//! ```text
//!  plaintext(chunk, key)
//!     │ decrypted LRU hit ───────────────────────────────────────────► bytes
//!     │ fetch in flight for this name? join it (counted: joined_fetches)
//!     ▼ else start one:
//!  tiers[0] memory ─► tiers[1] disk ─► … ─► tiers[n] origin      (first that has it)
//!     remote tier's bytes: SHA-256 == name? no → drop from that tier, count, next
//!     local disk's bytes: authenticated by the GCM tag as they decrypt (one hop, no
//!       hash: the disk is the worker's own); a failed tag → drop, count, next
//!     found at tier i: fill trusted tiers above i now, the others in the background
//!     decrypt (GCM) + length check → decrypted LRU → every waiter
//! ```
//!
//! A chunk's name fixes its ciphertext, and so its plaintext, so both caches key by name
//! alone and are shared by every attached image.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use lode_format::{
    ChunkError, ChunkIndex, ChunkKey, ChunkName, ObjectError, ObjectFormat, check_object,
};
use tokio::task::JoinHandle;

use crate::error::blocking;
use crate::metrics::Metrics;
use crate::tier::{ChunkRef, ChunkTier};
use crate::{Lru, MetricsSnapshot, ReadError};

/// What opening a chunk needs: its place in the image, its key, its plaintext length.
#[derive(Clone)]
struct Open {
    index: ChunkIndex,
    key: ChunkKey,
    expected_len: usize,
}

/// Checks a tier's copy of `chunk` (its name, when `check_name`) and, with `open`,
/// decrypts it (which authenticates it) and checks the plaintext length.
fn check_and_open(
    tier: &'static str,
    chunk: ChunkRef,
    bytes: &Bytes,
    check_name: bool,
    open: Option<Open>,
) -> Result<Option<Bytes>, ReadError> {
    if check_name {
        let expected = ObjectFormat::of(chunk.format);
        let fault = match check_object(&chunk.name, bytes) {
            Ok(found) if found == expected => None,
            Ok(found) => Some(ObjectError::WrongFormat {
                chunk: chunk.name,
                found,
                expected,
            }),
            Err(ObjectError::V1(ChunkError::NameMismatch { got, .. })) => {
                return Err(ReadError::Corrupt {
                    tier,
                    chunk: chunk.name,
                    got,
                });
            }
            Err(e) => Some(e),
        };
        if let Some(e) = fault {
            return Err(ReadError::CorruptObject {
                tier,
                chunk: chunk.name,
                source: Box::new(e),
            });
        }
    }
    let Some(o) = open else {
        return Ok(None);
    };
    let plain = chunk
        .format
        .open_checked(&chunk.name, &o.key, bytes.to_vec())
        .map_err(|source| ReadError::Decrypt {
            index: o.index,
            source,
        })?;
    if plain.len() != o.expected_len {
        return Err(ReadError::ChunkLength {
            chunk: chunk.name,
            index: o.index,
            expected: o.expected_len,
            got: plain.len(),
        });
    }
    Ok(Some(Bytes::from(plain)))
}

type SharedFetch = Shared<BoxFuture<'static, Result<Bytes, Arc<ReadError>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves its map consistent before anything can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configures a [`ChunkCache`]; checked at [`build`](Self::build).
#[derive(Debug, Default)]
pub struct CacheBuilder {
    decrypted_bytes: u64,
    tiers: Vec<Arc<dyn ChunkTier>>,
}

impl CacheBuilder {
    /// A builder with no tiers and a 256 MiB decrypted-chunk bound.
    pub fn new() -> Self {
        Self {
            decrypted_bytes: 256 << 20,
            tiers: Vec::new(),
        }
    }

    /// Bounds the decrypted chunks kept in memory (0 keeps none).
    pub fn decrypted_bytes(mut self, bytes: u64) -> Self {
        self.decrypted_bytes = bytes;
        self
    }

    /// Appends a ciphertext tier; tiers are asked in the order added, origin last.
    pub fn tier(mut self, tier: Arc<dyn ChunkTier>) -> Self {
        self.tiers.push(tier);
        self
    }

    /// Checks the configuration and builds the cache.
    pub fn build(self) -> Result<Arc<ChunkCache>, ReadError> {
        if self.tiers.is_empty() {
            return Err(ReadError::Config(
                "a chunk cache needs at least one tier (the origin)".into(),
            ));
        }
        let mut names: Vec<&'static str> = self.tiers.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        if let Some(w) = names
            .windows(2)
            .find(|w| w[0] == w[1] || w[0] == "decrypted")
        {
            return Err(ReadError::Config(format!("two tiers are named {:?}", w[0])));
        }
        let names: Vec<&'static str> = self.tiers.iter().map(|t| t.name()).collect();
        Ok(Arc::new(ChunkCache {
            decrypted: Mutex::new(Lru::new(self.decrypted_bytes)),
            metrics: Metrics::new(&names),
            tiers: self.tiers,
            inflight: Mutex::new(HashMap::new()),
            fills: Mutex::new(Vec::new()),
        }))
    }
}

/// Decrypted chunks in memory over a chain of ciphertext tiers; one per worker, shared
/// by every attached image.
#[derive(Debug)]
pub struct ChunkCache {
    decrypted: Mutex<Lru<ChunkName, Bytes>>,
    tiers: Vec<Arc<dyn ChunkTier>>,
    inflight: Mutex<HashMap<ChunkName, SharedFetch>>,
    fills: Mutex<Vec<JoinHandle<()>>>,
    metrics: Metrics,
}

impl ChunkCache {
    /// A builder.
    pub fn builder() -> CacheBuilder {
        CacheBuilder::new()
    }

    /// The decrypted chunk `chunk`, which is chunk `index` of an image and must open
    /// under `key` to exactly `expected_len` bytes.
    pub async fn plaintext(
        self: &Arc<Self>,
        chunk: ChunkRef,
        index: ChunkIndex,
        key: &ChunkKey,
        expected_len: usize,
    ) -> Result<Bytes, Arc<ReadError>> {
        let started = Instant::now();
        if let Some(b) = lock(&self.decrypted).get(&chunk.name) {
            self.metrics.decrypted.hit(b.len(), started.elapsed());
            return Ok(b);
        }
        let fetch = {
            let mut inflight = lock(&self.inflight);
            if let Some(f) = inflight.get(&chunk.name) {
                self.metrics.joined();
                f.clone()
            } else if let Some(b) = lock(&self.decrypted).get(&chunk.name) {
                // A fetch finished between the first look and taking the lock.
                self.metrics.decrypted.hit(b.len(), started.elapsed());
                return Ok(b);
            } else {
                self.metrics.decrypted.miss(started.elapsed());
                let this = Arc::clone(self);
                let key = key.clone();
                let f = async move {
                    let r = this.fetch_and_open(chunk, index, key, expected_len).await;
                    let r = r.map_err(Arc::new);
                    if let Ok(b) = &r {
                        let len = b.len() as u64;
                        lock(&this.decrypted).insert(chunk.name, b.clone(), len);
                    }
                    lock(&this.inflight).remove(&chunk.name);
                    r
                }
                .boxed()
                .shared();
                inflight.insert(chunk.name, f.clone());
                f
            }
        };
        fetch.await
    }

    async fn fetch_and_open(
        self: &Arc<Self>,
        chunk: ChunkRef,
        index: ChunkIndex,
        key: ChunkKey,
        expected_len: usize,
    ) -> Result<Bytes, ReadError> {
        let open = Open {
            index,
            key,
            expected_len,
        };
        match self.fetch(chunk, Some(open)).await? {
            (_, Some(plain)) => Ok(plain),
            (_, None) => unreachable!("fetch with an opener returns plaintext"),
        }
    }

    /// A chunk's ciphertext from the first tier that holds a copy that checks out,
    /// filling the tiers above it.
    pub async fn ciphertext(self: &Arc<Self>, chunk: ChunkRef) -> Result<Bytes, ReadError> {
        Ok(self.fetch(chunk, None).await?.0)
    }

    /// Walks the tiers for `chunk`. Bytes from a tier that is neither
    /// [`trusted`](ChunkTier::trusted) nor [`local`](ChunkTier::local) are checked against
    /// the chunk's name; a local tier's bytes, when `open` is given, are authenticated by
    /// AES-GCM as they are decrypted instead (in the same blocking hop). A copy that fails
    /// either check is dropped from its tier, counted, and the next tier is asked. With
    /// `open`, returns the plaintext too.
    async fn fetch(
        self: &Arc<Self>,
        chunk: ChunkRef,
        open: Option<Open>,
    ) -> Result<(Bytes, Option<Bytes>), ReadError> {
        let mut last_err = None;
        for (i, tier) in self.tiers.iter().enumerate() {
            let m = &self.metrics.tiers[i];
            let started = Instant::now();
            match tier.get(&chunk).await {
                Ok(None) => m.miss(started.elapsed()),
                Ok(Some(bytes)) => {
                    let authenticated_later = tier.local() && open.is_some();
                    let check_name =
                        !(tier.trusted() || tier.verifies_names() || authenticated_later);
                    let b = bytes.clone();
                    let (o, name) = (open.clone(), tier.name());
                    let checked =
                        blocking(move || Ok(check_and_open(name, chunk, &b, check_name, o)))
                            .await?;
                    match checked {
                        Ok(plain) => {
                            m.hit(bytes.len(), started.elapsed());
                            self.fill(i, chunk, &bytes).await;
                            return Ok((bytes, plain));
                        }
                        Err(e @ (ReadError::Corrupt { .. } | ReadError::CorruptObject { .. })) => {
                            m.integrity_failure();
                            tier.remove(&chunk).await;
                            last_err = Some(e);
                        }
                        Err(ReadError::Decrypt { .. }) if tier.local() => {
                            // Local bytes that do not authenticate have rotted.
                            m.integrity_failure();
                            tier.remove(&chunk).await;
                            last_err = Some(ReadError::Corrupt {
                                tier: tier.name(),
                                chunk: chunk.name,
                                got: ChunkName::of(&bytes),
                            });
                        }
                        // The name checked out (or the tier is trusted) but the bytes do not
                        // open under the manifest's key: no other copy can do better.
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => {
                    if matches!(
                        e,
                        ReadError::Corrupt { .. } | ReadError::CorruptObject { .. }
                    ) {
                        m.integrity_failure();
                    } else {
                        m.error();
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ReadError::NotFound {
            chunk: chunk.name,
            tried: self
                .tiers
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", "),
        }))
    }

    /// Copies checked bytes into the tiers above `found_at`: memory at once (cheap, and
    /// it lets the next miss find them), slower tiers in the background so the read
    /// returns first.
    async fn fill(&self, found_at: usize, chunk: ChunkRef, bytes: &Bytes) {
        for tier in self.tiers[..found_at].iter().filter(|t| t.fillable()) {
            if tier.trusted() {
                tier.put(&chunk, bytes.clone()).await;
            } else {
                let tier = Arc::clone(tier);
                let bytes = bytes.clone();
                let h = tokio::spawn(async move { tier.put(&chunk, bytes).await });
                let mut fills = lock(&self.fills);
                fills.retain(|h| !h.is_finished());
                fills.push(h);
            }
        }
    }

    /// Waits for background fills started so far (tests; a clean shutdown).
    pub async fn settle(&self) {
        let fills = std::mem::take(&mut *lock(&self.fills));
        for h in fills {
            let _ = h.await;
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

    /// The ciphertext tiers, in lookup order.
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
