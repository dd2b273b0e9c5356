//! An image's working-set record in the store (lode-format's `workset`): what `lode
//! inspect` shows of it without keys, and the `lode prefetch record` and `lode prefetch
//! clear` operations. The agent reads and writes the record at attach and detach
//! (docs/agent.md, "Prefetch and readahead").

use lode_format::workset::{entries_in_sealed_len, max_sealed_len};
use lode_format::{ImageWorkSet, ManifestId, WorkSetError, WorkSetKey};
use lode_store::{Store, StoreError};
use serde::Serialize;
use thiserror::Error;

use crate::OpenedImage;

/// A working-set operation failed.
#[derive(Debug, Error)]
pub enum WorkSetStoreError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing a record needs the image's key table.
    #[error("image {0} was opened without its key table (open it with a KMS)")]
    NoKeys(ManifestId),
}

/// What the store holds of an image's working set, as far as it shows without keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StoredWorkSet {
    /// Entries the record lists (chunks for an image, pages for a snapshot), from its
    /// length; `None` when the length is not one a record can have.
    pub entries: Option<u64>,
    /// The sealed record's bytes.
    pub bytes: u64,
}

fn chunk_count(image: &OpenedImage) -> u64 {
    image.manifest.chunks().len() as u64
}

/// The record stored beside `image`'s manifest, if any, described without opening it.
pub async fn stored_working_set(
    store: &Store,
    image: &OpenedImage,
) -> Result<Option<StoredWorkSet>, StoreError> {
    // A snapshot's record is bounded by its pages, which outnumber an image's chunks.
    let max = max_sealed_len(chunk_count(image))
        .max(max_sealed_len(image.manifest.header().device_size / 4096));
    Ok(store
        .get_working_set(image.root, &image.id, max)
        .await?
        .map(|b| StoredWorkSet {
            entries: entries_in_sealed_len(b.len() as u64),
            bytes: b.len() as u64,
        }))
}

/// The working set stored for image `id` (of `chunk_count` chunks, under root `root`),
/// opened with `keys`: `Ok(None)` when there is none, `Ok(Some(Err(_)))` when there is
/// one that does not open or parse (callers ignore it with a warning).
pub async fn load_working_set(
    store: &Store,
    root: lode_format::RootId,
    id: &ManifestId,
    chunk_count: u64,
    keys: &lode_format::KeyTable,
) -> Result<Option<Result<ImageWorkSet, WorkSetError>>, StoreError> {
    let Some(b) = store
        .get_working_set(root, id, max_sealed_len(chunk_count))
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(ImageWorkSet::open(
        &b,
        id,
        chunk_count,
        &WorkSetKey::new(keys),
    )))
}

/// Marks `image`'s working set to be recorded again at its next start (by an agent that
/// may write to the store), which then replaces it; until then the listed chunks are
/// still prefetched. With no record, or one that does not open, an empty record so
/// marked takes its place. Returns the record as stored and, if the old one did not
/// open, why.
pub async fn mark_rerecord(
    store: &Store,
    image: &OpenedImage,
) -> Result<(ImageWorkSet, Option<WorkSetError>), WorkSetStoreError> {
    let keys = image
        .keys
        .as_ref()
        .ok_or(WorkSetStoreError::NoKeys(image.id))?;
    let n = chunk_count(image);
    let (mut ws, bad) = match load_working_set(store, image.root, &image.id, n, keys).await? {
        Some(Ok(ws)) => (ws, None),
        Some(Err(e)) => (ImageWorkSet::default(), Some(e)),
        None => (ImageWorkSet::default(), None),
    };
    let key = WorkSetKey::new(keys);
    ws.rerecord = true;
    store
        .put_working_set(image.root, &image.id, ws.seal(&image.id, n, &key).into())
        .await?;
    Ok((ws, bad))
}

/// Removes `image`'s working set; whether there was one. The next start records anew.
pub async fn clear_working_set(store: &Store, image: &OpenedImage) -> Result<bool, StoreError> {
    store.remove_working_set(image.root, &image.id).await
}
