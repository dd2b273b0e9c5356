//! A worker's chunk cache as `lode snapshot serve` builds it from the agent's cache
//! settings (their defaults unless changed): decrypted chunks over ciphertext in memory,
//! on disk under `STATE_DIR/cache`, the AZ fleet when given, and the origin store.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use lode_read::{ChunkCache, DiskTier, MemoryTier, StoreOrigin};
use lode_store::Store;

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
        cache
            .origin(Arc::new(StoreOrigin::new(store.clone())))
            .build()
            .expect("build the chunk cache")
    }
}
