//! Checking that an image is whole: every chunk it names is in the store and hashes to
//! its name, and — with the key table — decrypts under its key to the right length.
//! Unlike export, verify does not stop at the first fault: it reports every one.
//!
//! With `repair`, a chunk object found damaged (bytes that do not hash to its name, an
//! object larger than the chunk can be, a link or special file) is removed, so that the
//! next publish or import of an image holding it uploads it again; the report lists what
//! was removed. A chunk that hashes to its name but does not decrypt is not the store's
//! damage (the manifest's key table is at fault) and is left alone.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use lode_format::{ChunkIndex, ChunkName, ManifestId};
use lode_store::{Store, StoreError};
use serde::Serialize;

use crate::{CONCURRENCY, ImageError, OpenedImage, Progress};

/// One fault found by [`verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// The chunk is not in the store.
    Missing {
        /// The first index that names it.
        index: ChunkIndex,
        /// The chunk.
        chunk: ChunkName,
    },
    /// The chunk's bytes do not hash to its name.
    Corrupt {
        /// The first index that names it.
        index: ChunkIndex,
        /// The chunk.
        chunk: ChunkName,
        /// What its bytes hash to.
        got: ChunkName,
    },
    /// The chunk's v2 header checks, but a segment or the object's length does not.
    /// Reported as `"kind": "corrupt"` too, with `detail` in place of `got`.
    #[serde(rename = "corrupt")]
    CorruptSegment {
        /// The first index that names it.
        index: ChunkIndex,
        /// The chunk.
        chunk: ChunkName,
        /// What is wrong, naming the segment.
        detail: String,
    },
    /// The chunk object cannot be what the manifest names: larger than the chunk can
    /// be, changed while read, not a regular file, or a v2 object with a bad segment.
    Damaged {
        /// The first index that names it.
        index: ChunkIndex,
        /// The chunk.
        chunk: ChunkName,
        /// What the store said.
        detail: String,
    },
    /// The chunk does not decrypt under its key, or to the wrong length.
    Undecryptable {
        /// The first index that names it.
        index: ChunkIndex,
        /// The chunk.
        chunk: ChunkName,
        /// What failed.
        detail: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Missing { index, chunk } => {
                write!(f, "chunk {index} ({chunk}) is missing from the store")
            }
            Problem::Corrupt { index, chunk, got } => {
                write!(
                    f,
                    "chunk {index} ({chunk}) is corrupt: its bytes hash to {got}"
                )
            }
            Problem::CorruptSegment {
                index,
                chunk,
                detail,
            } => write!(f, "chunk {index} ({chunk}) is corrupt: {detail}"),
            Problem::Damaged {
                index,
                chunk,
                detail,
            } => write!(f, "chunk {index} ({chunk}) is damaged: {detail}"),
            Problem::Undecryptable {
                index,
                chunk,
                detail,
            } => {
                write!(f, "chunk {index} ({chunk}) does not decrypt: {detail}")
            }
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The manifest checked.
    pub id: ManifestId,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Ciphertext bytes read.
    pub bytes_checked: u64,
    /// Whether chunks were also decrypted (the key table was available).
    pub decrypted: bool,
    /// Every fault, in index order.
    pub problems: Vec<Problem>,
    /// Damaged chunk objects removed from the store (with `repair`); publishing an
    /// image that holds them uploads them again.
    pub removed: Vec<ChunkName>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks every distinct chunk of `img`.
pub async fn verify(
    store: &Store,
    img: &OpenedImage,
    progress: Arc<dyn Progress>,
) -> Result<VerifyReport, ImageError> {
    verify_with(store, img, progress, false).await
}

/// Checks every distinct chunk of `img`; with `repair`, removes each damaged chunk object
/// (see the module doc).
pub async fn verify_with(
    store: &Store,
    img: &OpenedImage,
    progress: Arc<dyn Progress>,
    repair: bool,
) -> Result<VerifyReport, ImageError> {
    let header = img.manifest.header();
    let (cs, device_size) = (header.chunk_size, header.device_size);
    let format = header.chunk_format;
    let mut seen = HashSet::new();
    let jobs: Vec<(ChunkIndex, ChunkName)> = img
        .manifest
        .chunks()
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.name().map(|n| (ChunkIndex(i as u64), *n)))
        .filter(|(_, n)| seen.insert(*n))
        .collect();
    progress.set_total(
        jobs.iter()
            .map(|(i, _)| cs.len_of(*i, device_size) as u64)
            .sum(),
    );
    let mut results = futures::stream::iter(jobs)
        .map(|(index, chunk)| {
            let key = img.keys.as_ref().and_then(|k| k.get(index)).cloned();
            let has_keys = img.keys.is_some();
            let progress = Arc::clone(&progress);
            async move {
                let expected = cs.len_of(index, device_size);
                let max = format.object_len(expected);
                let damaged = |problem: Problem| async move {
                    let removed =
                        repair && store.remove_damaged_chunk(img.root, &chunk, max).await?;
                    Ok::<_, ImageError>((0, Some(problem), removed.then_some(chunk)))
                };
                let bytes = match store.get_chunk(img.root, &chunk, max).await {
                    Ok(b) => b,
                    Err(StoreError::NotFound { .. }) => {
                        return Ok((0, Some(Problem::Missing { index, chunk }), None));
                    }
                    Err(StoreError::CorruptChunk { got, .. }) => {
                        return damaged(Problem::Corrupt { index, chunk, got }).await;
                    }
                    Err(StoreError::CorruptChunkObject { reason, .. }) => {
                        let detail = reason.fault();
                        return damaged(Problem::CorruptSegment {
                            index,
                            chunk,
                            detail,
                        })
                        .await;
                    }
                    Err(
                        e @ (StoreError::TooLarge { .. }
                        | StoreError::SizeChanged { .. }
                        | StoreError::Unreadable { .. }),
                    ) => {
                        let detail = e.to_string();
                        return damaged(Problem::Damaged {
                            index,
                            chunk,
                            detail,
                        })
                        .await;
                    }
                    Err(e) => return Err(ImageError::Store(e)),
                };
                let size = bytes.len() as u64;
                let problem = match (has_keys, key) {
                    (false, _) => None,
                    (true, None) => Some(Problem::Undecryptable {
                        index,
                        chunk,
                        detail: "the key table has no key for it".into(),
                    }),
                    (true, Some(key)) => tokio::task::spawn_blocking(move || {
                        match format.open_checked(&chunk, &key, bytes.to_vec()) {
                            Err(e) => Some(Problem::Undecryptable {
                                index,
                                chunk,
                                detail: e.to_string(),
                            }),
                            Ok(p) if p.len() != expected => Some(Problem::Undecryptable {
                                index,
                                chunk,
                                detail: format!(
                                    "it decrypts to {} bytes, the manifest says {expected}",
                                    p.len()
                                ),
                            }),
                            Ok(_) => None,
                        }
                    })
                    .await
                    .map_err(|e| ImageError::Task(e.to_string()))?,
                };
                progress.advance(expected as u64);
                Ok::<_, ImageError>((size, problem, None))
            }
        })
        .buffered(CONCURRENCY);
    let mut report = VerifyReport {
        id: img.id,
        chunks_checked: 0,
        bytes_checked: 0,
        decrypted: img.keys.is_some(),
        problems: Vec::new(),
        removed: Vec::new(),
    };
    while let Some(r) = results.next().await {
        let (size, problem, removed) = r?;
        report.chunks_checked += 1;
        report.bytes_checked += size;
        report.problems.extend(problem);
        report.removed.extend(removed);
    }
    Ok(report)
}
