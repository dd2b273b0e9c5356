//! What can go wrong on the read path. Every variant names the chunk, offset, path or
//! manifest it is about. [`ReadError`] is a failed read, which
//! [`ImageDevice`](crate::ImageDevice) hands to its presentation (NBD, FUSE) as the
//! device's own failure, answered EIO with this message; [`OpenError`] is an image that
//! could not be opened (or a root that could not be checked for a read alarm).

use std::path::PathBuf;
use std::sync::Arc;

use lode_format::{ChunkIndex, ChunkName, ManifestError, ManifestId, ObjectError, SegmentIndex};
use lode_kms::KmsError;
use lode_store::StoreError;
use thiserror::Error;

/// Opening an image failed: its tag, its manifest, or its keys. `lode-image`'s
/// `ImageError` takes each variant as its own of the same name.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The store failed or refused (no such tag, no such manifest, a corrupt one).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The manifest could not be parsed, or its key table not opened.
    #[error("manifest {id}: {source}")]
    Manifest {
        /// The manifest's id.
        id: ManifestId,
        /// What is wrong.
        source: ManifestError,
    },
    /// The manifest's data key could not be unwrapped.
    #[error("manifest {id}: {source}")]
    ManifestKey {
        /// The manifest.
        id: ManifestId,
        /// What the KMS said.
        source: KmsError,
    },
    /// The manifest's data key was not granted by the control service (or the grant was
    /// malformed).
    #[error("manifest {id}: {reason}")]
    KeyGrant {
        /// The manifest.
        id: ManifestId,
        /// Who refused what, and why.
        reason: String,
    },
    /// The manifest names something it cannot (a KMS key the KMS lacks).
    #[error("{0}")]
    Invalid(String),
}

/// A read-path failure.
#[derive(Debug, Error)]
pub enum ReadError {
    /// No tier, the origin included, holds the chunk.
    #[error("chunk {chunk} is in no tier (tried {tried})")]
    NotFound {
        /// The chunk.
        chunk: ChunkName,
        /// The tiers asked, in order.
        tried: String,
    },
    /// A tier returned bytes that do not hash to the chunk's name.
    #[error("chunk {chunk} from tier {tier} is corrupt: its bytes hash to {got}")]
    Corrupt {
        /// The tier at fault.
        tier: &'static str,
        /// The chunk asked for.
        chunk: ChunkName,
        /// SHA-256 of what arrived.
        got: ChunkName,
    },
    /// A tier returned bytes that are not the chunk's object in the manifest's format: a
    /// v2 object with a bad segment or length, or a sound object of the other format.
    #[error("{source} (from tier {tier})")]
    CorruptObject {
        /// The tier at fault.
        tier: &'static str,
        /// The chunk asked for.
        chunk: ChunkName,
        /// What is wrong, naming the segment where one is at fault.
        source: Box<ObjectError>,
    },
    /// The origin store failed.
    #[error("fetching chunk {chunk} from the origin: {source}")]
    Store {
        /// The chunk.
        chunk: ChunkName,
        /// What the store said (boxed: it is large, and rare).
        source: Box<StoreError>,
    },
    /// The chunk's name checked out but it did not decrypt under the manifest's key.
    #[error("opening chunk {index} of the image: {source}")]
    Decrypt {
        /// The chunk's index in the image.
        index: ChunkIndex,
        /// What failed.
        source: ObjectError,
    },
    /// The chunk decrypted to the wrong length for its place in the image.
    #[error("chunk {chunk} (index {index}) is {got} bytes of plaintext, expected {expected}")]
    ChunkLength {
        /// The chunk.
        chunk: ChunkName,
        /// Its index.
        index: ChunkIndex,
        /// Bytes expected there.
        expected: usize,
        /// Bytes it held.
        got: usize,
    },
    /// A segment decrypted to the wrong length for its place in the chunk.
    #[error("chunk {chunk} segment {segment} is {got} bytes of plaintext, expected {expected}")]
    SegmentLength {
        /// The chunk.
        chunk: ChunkName,
        /// The segment (0 for a v1 chunk, which is one segment).
        segment: SegmentIndex,
        /// Bytes expected there.
        expected: usize,
        /// Bytes it held.
        got: usize,
    },
    /// A copy on this worker's own disk is not (any longer) the chunk: it is short, its
    /// header does not hash to the name, or a segment fails AES-GCM. It is dropped and the
    /// next tier asked.
    #[error("chunk {chunk} on tier {tier} has rotted at segment {segment}: {reason}")]
    Rotted {
        /// The tier.
        tier: &'static str,
        /// The chunk.
        chunk: ChunkName,
        /// The segment being read.
        segment: SegmentIndex,
        /// What failed.
        reason: String,
    },
    /// The key table has no key for a stored chunk.
    #[error("the key table has no key for stored chunk {index}")]
    MissingKey {
        /// The chunk's index.
        index: ChunkIndex,
    },
    /// The image was opened without its key table.
    #[error("image {0} was opened without its key table (open it with a KMS)")]
    NoKeys(lode_format::ManifestId),
    /// A local file (disk cache, overlay) could not be used.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A tier failed in a way that is not a plain miss (the message names the chunk).
    #[error("tier {tier}: {message}")]
    Tier {
        /// The tier.
        tier: &'static str,
        /// What it said.
        message: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
    /// The error of a fetch that several readers shared: each of them gets the same
    /// error, with its type ([`ReadError::root`] looks through this wrapper).
    #[error(transparent)]
    Shared(Arc<ReadError>),
}

impl ReadError {
    /// Whether this says a copy was not the chunk (a failed name, header, segment or
    /// tag): counted as an integrity failure, the copy dropped.
    pub fn is_integrity(&self) -> bool {
        matches!(
            self.root(),
            ReadError::Corrupt { .. } | ReadError::CorruptObject { .. } | ReadError::Rotted { .. }
        )
    }

    /// The error itself: the shared error a [`ReadError::Shared`] holds, or `self`.
    pub fn root(&self) -> &ReadError {
        match self {
            ReadError::Shared(e) => e.root(),
            e => e,
        }
    }
}

/// Wraps an I/O error with what was done to which path.
pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> ReadError {
    let path = path.into();
    move |source| ReadError::Io { op, path, source }
}

/// Runs blocking work (hashing, decryption, file I/O) without stalling the runtime.
///
/// On a multi-threaded runtime the work runs right here, in `block_in_place`: tokio
/// hands this worker's other tasks to another thread, and the read that waits for the
/// work pays no wake-up of a pool thread (on an idle VM each such hop cost tens of µs,
/// several per disk-cache hit). Elsewhere it goes to the blocking pool. A panic in `f`
/// becomes [`ReadError::Task`] either way.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReadError> + Send + 'static,
) -> Result<T, ReadError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi =
        Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
            .map_err(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                ReadError::Task(format!("panicked: {msg}"))
            })?
    } else {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ReadError::Task(e.to_string()))?
    }
}
