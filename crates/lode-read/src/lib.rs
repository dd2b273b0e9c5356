//! The read path (docs/agent.md): an image as a block device that fetches only the
//! chunks read.
//!
//! Where this fits: docs/architecture.md, "The read path across the tiers".
//!
//! An attached image is an [`ImageDevice`]: a [`lode_blockdev::BlockDevice`] whose reads
//! consult the copy-on-write [`Overlay`] first, then fetch the segments they touch
//! through one worker-wide [`ChunkCache`]. The cache keeps decrypted segments in memory
//! and walks a list of [`ChunkTier`]s — [`MemoryTier`], [`DiskTier`], the AZ cache
//! ([`AzTier`]) — then the [`ChunkOrigin`] ([`StoreOrigin`], the store). What a tier
//! returns says, as a type, how far it is checked ([`Found`]); the cache checks the rest
//! (a v2 object's header first, then the segment the read waits for, then the others
//! before the object is kept), drops and counts what fails, and fills the tiers above
//! with [`Checked`] objects only. Concurrent misses for one chunk share one fetch.
//! Everything is counted in [`Metrics`].
//!
//! An attachment may also fetch ahead of demand ([`Prefetch`]): the chunks its image's
//! first start read (a recorded working set, in order), and the next chunks of a
//! sequential run (readahead), through worker-wide bounded [`Prefetcher`] permits that
//! keep out of demand fetches' way.
//!
//! An image is opened by tag or manifest id with [`open_image`] (or [`open_image_with`]
//! and a [`KeySource`]): its manifest fetched, checked against its id and parsed, and its
//! key table opened with the data key a KMS unwraps or a control service grants. A reader
//! of an expired root raises a read alarm ([`check_read`]).
//!
//! The `lode agent` daemon (`lode-agent`) presents each device over NBD and FUSE, and
//! `lode-snap` serves a memory snapshot's page faults from the same cache.

mod alarm;
mod az;
mod cache;
mod checked;
mod device;
mod error;
mod metrics;
mod overlay;
mod prefetch;
mod reference;
mod tier;
mod trace;
mod workset;

pub use alarm::{ReadAlarm, check_read, check_read_in, reader_name, unix_now};
pub use az::{AzTier, az_prometheus};
pub use cache::{CacheBuilder, ChunkCache};
pub use checked::{Checked, Found, HeaderChecked, LocalError, LocalObject};
pub use device::ImageDevice;
pub use error::{OpenError, ReadError};
pub use lode_evict::{PolicyKind, UnknownPolicy};
pub use metrics::{Histogram, LATENCY_BUCKETS_US, Metrics, MetricsSnapshot, TierSnapshot};
pub use overlay::{BLOCK_SIZE, Overlay};
pub use prefetch::{
    AheadKind, AheadSnapshot, DEFAULT_PREFETCH_CONCURRENCY, DEFAULT_READAHEAD_MAX_CHUNKS,
    DEFAULT_RECORD_MAX_CHUNKS, DEFAULT_RECORD_WINDOW, Prefetch, PrefetchConfig, PrefetchCounters,
    PrefetchSnapshot, Prefetcher,
};
pub use reference::{
    KeySource, KmsKeys, OpenedImage, open_image, open_image_with, resolve, unwrap_data_key,
};
pub use tier::{
    ChunkOrigin, ChunkRef, ChunkTier, DEFAULT_ORIGIN_CONCURRENCY, DiskTier, MemoryTier,
    OriginWatch, StoreOrigin,
};
pub use trace::{DEFAULT_TRACE_MAX_BYTES, Served, StartTrace, TRACE_VERSION, TraceWriter};
pub use workset::{
    StoredWorkSet, WorkSetStoreError, clear_working_set, load_working_set, mark_rerecord,
    stored_working_set,
};
