//! Memory snapshots restored on demand (docs/snapshots.md).
//!
//! Where this fits: docs/architecture.md, "Memory snapshots".
//!
//! A snapshot is a memory file published like any image (same chunks, same keys, same
//! store); [`handler`] serves a VMM's page faults on it through userfaultfd from the
//! worker's tiers, speaking Firecracker's UFFD handshake; [`record`] keeps the pages a
//! restore touched so the next one can install them first (REAP); [`client`] plays the
//! VMM's part for tests and demos, and [`workload`] is something real to run on the
//! restored memory.
//!
//! ```text
//!  VMM (Firecracker, or lode snapshot restore)        lode snapshot serve
//!   mmap guest memory, userfaultfd, register ──uffd+JSON──► parse mappings, check them
//!   guest touches a missing page ──fault event──────────► page → segment → ChunkCache
//!                                                          (memory, disk, AZ, origin)
//!   thread resumes ◄──UFFDIO_COPY (the segment) / ZEROPAGE── one fetch per segment
//!   socket closes ──────────────────────────────────────► store the working set
//! ```

pub mod client;
pub mod handler;
pub mod mapping;
pub mod record;
pub mod socket;
pub mod uffd;
pub mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

// userfaultfd exists on 64-bit Linux only, and offsets into guest memory are u64
// throughout; `usize_of` relies on this.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("lode-snap needs a 64-bit target");

/// A memory offset or length as an index. Lossless: the crate builds for 64-bit targets
/// only (above).
#[allow(clippy::cast_possible_truncation)]
pub const fn usize_of(x: u64) -> usize {
    x as usize
}

use lode_format::{ChunkSize, ManifestId};
use lode_kms::Kms;
use lode_read::{ChunkCache, ImageDevice, OpenError, ReadError};
use lode_store::{Store, StoreError};
use thiserror::Error;

pub use handler::{BurstStats, Prefetch, RecordPolicy, ServeOptions, SessionReport, serve};
pub use mapping::{Mapping, MappingError};
pub use record::{RecordError, RecordKey, WorkingSet};

/// How long a working-set record read from the store serves the restores that start
/// after it before it is read again.
pub const RECORD_REUSE: Duration = Duration::from_secs(10);

/// The chunk size `lode snapshot import` uses unless told otherwise: memory is read in
/// scattered pages, so a smaller fetch unit than a disk's 512 KiB wastes less (see
/// docs/snapshots.md for the measurement behind this choice).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// A snapshot operation failed.
#[derive(Debug, Error)]
pub enum SnapError {
    /// Opening the snapshot's manifest or keys failed.
    #[error(transparent)]
    Image(#[from] OpenError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading a chunk failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The handshake was refused.
    #[error("refused the VMM's handshake: {0}")]
    Handshake(String),
    /// The guest's mappings were refused.
    #[error("refused the VMM's handshake: {0}")]
    Mapping(#[from] MappingError),
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    /// The snapshot's working-set record does not open or parse.
    #[error("snapshot {id}: {source}")]
    Record {
        /// The snapshot.
        id: ManifestId,
        /// What is wrong with the record.
        source: RecordError,
    },
    /// A fault lode cannot serve.
    #[error("page fault at {address:#x} lies outside every guest memory region")]
    FaultOutside {
        /// The faulting address.
        address: u64,
    },
    /// The guest did something lode does not follow.
    #[error("{0}")]
    Unsupported(String),
    /// Every restore slot of the handler is taken.
    #[error(
        "refused the VMM's handshake: the handler is serving {limit} restores, its limit \
         (--max-sessions); retry when one ends, or start another handler"
    )]
    Busy {
        /// The handler's limit on restores at once.
        limit: usize,
    },
    /// A chunk could not be read, so its pages cannot be served.
    #[error("cannot serve snapshot offset {offset}: chunk {index}: {reason}")]
    Chunk {
        /// The chunk.
        index: u64,
        /// The snapshot offset that needed it.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// Socket or file I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// An opened snapshot: its manifest and keys, read through a worker's chunk cache, and
/// what the restores served from it at once share (the working-set record, read once,
/// and the fetches of segments in flight: see [`handler`]).
#[derive(Debug)]
pub struct Snapshot {
    device: ImageDevice,
    record_key: RecordKey,
    store: Store,
    shared: handler::SharedState,
}

impl Snapshot {
    /// Opens `reference` (a tag or manifest id) from `store`, unwrapping its keys with
    /// `kms`, to be read through `cache`.
    pub async fn open(
        store: &Store,
        kms: &dyn Kms,
        cache: Arc<ChunkCache>,
        reference: &str,
    ) -> Result<Snapshot, SnapError> {
        let image = lode_read::open_image(store, Some(kms), reference).await?;
        let device = ImageDevice::new(cache, image)?;
        let record_key = RecordKey::new(device.keys());
        Ok(Snapshot {
            device,
            record_key,
            store: store.clone(),
            shared: handler::SharedState::default(),
        })
    }

    /// The manifest id.
    pub fn id(&self) -> ManifestId {
        self.device.id()
    }

    /// The memory size in bytes.
    pub fn size(&self) -> u64 {
        self.device.size()
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> ChunkSize {
        self.device.chunk_size()
    }

    /// The chunk reader.
    pub fn device(&self) -> &ImageDevice {
        &self.device
    }

    /// The stored working-set record, if any. A record that does not open or parse is
    /// reported as an error; callers may choose to go on without it.
    pub async fn working_set(&self) -> Result<Option<WorkingSet>, SnapError> {
        let Some(bytes) = self
            .store
            .get_working_set(
                self.device.root(),
                &self.id(),
                record::max_sealed_len(self.size()),
            )
            .await?
        else {
            return Ok(None);
        };
        WorkingSet::open(&bytes, &self.id(), self.size(), &self.record_key)
            .map(Some)
            .map_err(|source| SnapError::Record {
                id: self.id(),
                source,
            })
    }

    /// Stores `ws` as the snapshot's working-set record, replacing any earlier one; the
    /// restores that start from now on prefetch it.
    pub async fn store_working_set(&self, ws: &WorkingSet) -> Result<(), SnapError> {
        let sealed = ws.seal(&self.id(), self.size(), &self.record_key);
        self.store
            .put_working_set(self.device.root(), &self.id(), sealed.into())
            .await?;
        *self.shared.working_set.lock().await = Some((Instant::now(), Some(Arc::new(ws.clone()))));
        Ok(())
    }

    /// The working-set record for a restore: read from the store and opened once for
    /// all the restores that start within [`RECORD_REUSE`] of the read (a burst's wait for
    /// the first one's read rather than each reading it), then read again, so a record
    /// another worker stores is seen. A record that does not open is reported to the
    /// restore that read it and treated as absent by the others.
    pub async fn working_set_for_restore(&self) -> Result<Option<Arc<WorkingSet>>, SnapError> {
        let mut held = self.shared.working_set.lock().await;
        if let Some((at, ws)) = &*held
            && at.elapsed() < RECORD_REUSE
        {
            return Ok(ws.clone());
        }
        let read = self.working_set().await;
        let ws = read.as_ref().ok().cloned().flatten().map(Arc::new);
        *held = Some((Instant::now(), ws.clone()));
        read.map(|_| ws)
    }

    /// What the restores of this snapshot shared so far.
    pub fn burst_stats(&self) -> BurstStats {
        self.shared.stats()
    }
}
