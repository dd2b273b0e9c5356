//! The worker agent's read path (docs/agent.md).
//!
//! Where this fits: docs/architecture.md, "The read path across the tiers".
//!
//! An attached image is an [`ImageDevice`]: a [`lode_blockdev::BlockDevice`] whose reads
//! consult the copy-on-write [`Overlay`] first, then fetch whole chunks through one
//! worker-wide [`ChunkCache`]. The cache keeps decrypted chunks in memory and walks a
//! list of [`ChunkTier`]s for ciphertext — [`MemoryTier`], [`DiskTier`], then
//! [`OriginTier`] (the store) — checking every chunk that comes from outside the
//! worker's memory against its name, dropping and counting what fails, and filling the
//! tiers above on the way back. Concurrent misses for one chunk share one fetch.
//! Everything is counted in [`Metrics`].
//!
//! [`Agent`] is the `lode agent` daemon (attachments, NBD server, a FUSE mount with one
//! file per attachment, state directory), [`control`] its HTTP control API and metrics
//! endpoint, and [`config`] its TOML configuration file.

mod alarm;
mod az;
mod cache;
pub mod config;
pub mod control;
mod daemon;
mod device;
mod error;
mod lru;
mod metrics;
mod overlay;
mod tier;
pub mod worker;

pub use alarm::{ALARM_LOG_INTERVAL, ATTACHED_CHECK_INTERVAL, ROOT_STATE_TTL};
pub use az::AzTier;
pub use cache::{CacheBuilder, ChunkCache};
pub use daemon::{
    Agent, AgentConfig, Attachment, Keys, MAX_NAME_LEN, NbdLimits, RunConfig, build_cache,
    nbd_server,
};
pub use device::ImageDevice;
pub use error::AgentError;
pub use lru::Lru;
pub use metrics::{
    Histogram, LATENCY_BUCKETS_US, Metrics, MetricsSnapshot, TierSnapshot, nbd_json, nbd_prometheus,
};
pub use overlay::{BLOCK_SIZE, Overlay};
pub use tier::{ChunkRef, ChunkTier, DEFAULT_ORIGIN_CONCURRENCY, DiskTier, MemoryTier, OriginTier};
