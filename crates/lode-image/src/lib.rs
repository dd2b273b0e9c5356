//! lode's image pipeline (docs/flatten.md, docs/format.md): an image file — a raw disk
//! image, a memory snapshot or the flattener's ext4 output — is cut into chunks, all-zero chunks are
//! dropped, the rest are sealed and put into the store if the store lacks them, and a
//! manifest naming them is written under the active root. The way back (export), the
//! integrity check (verify) and the store-wide accounting (stats) live here too, so the
//! `lode` binary only parses arguments and prints. Opening an image by tag or id is the
//! read path's (`lode-read`), re-exported here.
//!
//! Where this fits: docs/architecture.md, "The flow of an image" and "Garbage collection".

mod alarm;
mod error;
mod export;
mod failpoint;
mod flatten;
mod forward;
mod fsck;
mod gc;
mod inspect;
mod live;
mod publish;
mod roots;
mod stats;
mod verify;

pub use alarm::{Cleared, clear_alarms};
pub use error::ImageError;
pub use export::{ExportStats, export};
pub use flatten::{
    FlattenProgress, FlattenReport, FlattenRequest, Reclaimed, default_work_dir,
    flatten_and_publish, reclaim_scratch,
};
pub use forward::{ForwardReport, Moved, copy_forward, copy_forward_with};
pub use fsck::{DEFAULT_STAGING_MIN_AGE, Fault, FsckOptions, FsckReport, fsck};
pub use gc::{DEFAULT_GRACE, GcOptions, GcReport, RootStep, gc, parse_duration, show_duration};
pub use inspect::ManifestView;
pub use live::{
    Holders, LiveError, Liveness, RemovedManifest, Untagged, pin, remove_manifest, untag,
};
pub use lode_registry::{PullOptions, RegistryAuth};
pub use publish::{PublishOptions, PublishStats, Published, Publisher};
// Opening an image and raising a read alarm belong to the read path; they are re-exported
// for those who open images to export, verify or collect them (and the CLI).
pub use lode_read::{
    KeySource, KmsKeys, OpenError, OpenedImage, ReadAlarm, check_read, check_read_in, open_image,
    open_image_with, reader_name, resolve, unix_now, unwrap_data_key,
};
pub use roots::{Rotation, rotate};
pub use stats::{RootStats, StoreStats, store_stats};
pub use verify::{Problem, VerifyReport, verify, verify_with};

/// Reports progress of long work. Both calls may come from any thread.
pub trait Progress: Send + Sync {
    /// The total amount of work, in bytes.
    fn set_total(&self, bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
}

/// Progress that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// The chunk format new images, snapshots and copied-forward manifests of chunk size `cs`
/// are written in: v2 with codec 1 (lz4, compressed segments padded to 1 KiB) in segments
/// of 16 KiB, or of the chunk size if smaller ([`lode_format::ChunkFormat::RECOMMENDED`],
/// the measured choice: docs/format.md §8). v1 manifests and chunks, and v2 ones with
/// codec 0, stay readable everywhere; copy-forward rewrites them in this format.
pub fn new_chunk_format(cs: lode_format::ChunkSize) -> lode_format::ChunkFormat {
    let lode_format::ChunkFormat::V2 {
        segment_size,
        codec,
    } = lode_format::ChunkFormat::RECOMMENDED
    else {
        return lode_format::ChunkFormat::RECOMMENDED;
    };
    let segment_size =
        lode_format::SegmentSize::new(u64::from(segment_size.bytes().min(cs.bytes())))
            .unwrap_or(segment_size);
    lode_format::ChunkFormat::V2 {
        segment_size,
        codec,
    }
}

/// Opens chunk `index` of manifest `id` (its name checked, then decrypted) and checks it
/// has the `expected` plaintext length: what every reader of a whole chunk needs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn open_chunk_checked(
    format: lode_format::ChunkFormat,
    id: lode_format::ManifestId,
    index: lode_format::ChunkIndex,
    name: &lode_format::ChunkName,
    key: &lode_format::ChunkKey,
    ciphertext: &[u8],
    expected: usize,
) -> Result<Vec<u8>, ImageError> {
    let plain = format
        .open_checked(name, key, ciphertext.to_vec())
        .map_err(|source| ImageError::Chunk { id, index, source })?;
    if plain.len() != expected {
        return Err(ImageError::ChunkLength {
            id,
            index,
            expected,
            got: plain.len(),
        });
    }
    Ok(plain)
}

/// How many chunk operations run at once: enough to keep both the CPU (sealing) and a
/// remote store (round trips) busy, bounded so memory stays at a few MiB per 512 KiB chunk.
pub(crate) const CONCURRENCY: usize = 16;
