//! A worker's chunk cache as `lode snapshot serve` builds it from the agent's cache
//! settings (their defaults unless changed): decrypted chunks over ciphertext in memory,
//! on disk under `STATE_DIR/cache`, the AZ fleet when given, and the origin store.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lode_format::ChunkName;
use lode_read::{ChunkCache, ChunkOrigin, ChunkRef, DiskTier, MemoryTier, ReadError, StoreOrigin};
use lode_store::Store;

/// The store as origin, counting the fetches of each chunk (to check that a burst of
/// restores fetches each chunk once).
#[derive(Debug)]
pub struct CountingOrigin {
    inner: StoreOrigin,
    fetches: Mutex<HashMap<ChunkName, u64>>,
}

impl CountingOrigin {
    pub fn new(store: &Store) -> Arc<Self> {
        Arc::new(Self {
            inner: StoreOrigin::new(store.clone()),
            fetches: Mutex::default(),
        })
    }

    /// (fetches, distinct chunks fetched, most fetches of one chunk) so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        let f = self.fetches.lock().unwrap();
        (
            f.values().sum(),
            f.len() as u64,
            f.values().copied().max().unwrap_or(0),
        )
    }
}

#[async_trait::async_trait]
impl ChunkOrigin for CountingOrigin {
    async fn fetch(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError> {
        *self.fetches.lock().unwrap().entry(chunk.name).or_default() += 1;
        self.inner.fetch(chunk).await
    }

    fn busy(&self) -> bool {
        self.inner.busy()
    }
}

/// The tiers of one worker.
pub struct CacheConfig {
    /// The disk tier lives in `state_dir/cache`; tests put the handler's socket here too.
    pub state_dir: PathBuf,
    /// Decrypted bytes kept in memory.
    pub decrypted: u64,
    /// Ciphertext bytes kept in memory.
    pub cache_memory: u64,
    /// Ciphertext bytes kept on disk.
    pub cache_disk: u64,
    /// The AZ cache fleet, between the disk and the origin.
    pub az: Option<lode_az::AzConfig>,
}

impl CacheConfig {
    /// The agent's defaults under `state_dir`: 256 MiB decrypted, 512 MiB memory,
    /// 10 GiB disk, no AZ fleet.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            decrypted: 256 << 20,
            cache_memory: 512 << 20,
            cache_disk: 10 << 30,
            az: None,
        }
    }

    /// The cache over `store`.
    pub fn build(&self, store: &Store) -> Arc<ChunkCache> {
        self.build_with_origin(Arc::new(StoreOrigin::new(store.clone())))
    }

    /// The cache over `origin`.
    pub fn build_with_origin(&self, origin: Arc<dyn ChunkOrigin>) -> Arc<ChunkCache> {
        let mut cache = ChunkCache::builder()
            .decrypted_bytes(self.decrypted)
            .tier(Arc::new(MemoryTier::new(self.cache_memory)))
            .tier(Arc::new(
                DiskTier::open(self.state_dir.join("cache"), self.cache_disk)
                    .expect("open the disk tier"),
            ));
        if let Some(az) = &self.az {
            cache = cache.tier(Arc::new(
                lode_read::AzTier::new(az.clone()).expect("the AZ fleet's config"),
            ));
        }
        cache.origin(origin).build().expect("build the chunk cache")
    }
}
