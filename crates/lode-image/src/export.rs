//! Rebuilding an image file from its manifest, byte for byte.
//!
//! Every chunk is checked against its name (the store does that) and authenticated by
//! its GCM tag before a byte of it is written. The output is written to a temporary file
//! beside the destination and renamed into place only when complete, so a failed export
//! never leaves a half-written image under the name asked for. Zero chunks are left as
//! holes. A block device as destination is written in place.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use lode_format::ChunkIndex;
use lode_store::Store;
use serde::Serialize;

use crate::error::io;
use crate::{CONCURRENCY, ImageError, OpenedImage, Progress};

/// What an export did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExportStats {
    /// The image's size in bytes.
    pub device_size: u64,
    /// Chunks fetched from the store.
    pub fetched_chunks: u64,
    /// Ciphertext bytes fetched.
    pub fetched_bytes: u64,
    /// Zero chunks, left as holes.
    pub zero_chunks: u64,
}

/// Writes the image `img` to `out`. `img` must have been opened with a KMS.
pub async fn export(
    store: &Store,
    img: &OpenedImage,
    out: &Path,
    progress: Arc<dyn Progress>,
) -> Result<ExportStats, ImageError> {
    let keys = img.keys.as_ref().ok_or_else(|| {
        ImageError::Invalid("export needs the manifest's key table (open it with a KMS)".into())
    })?;
    let header = img.manifest.header();
    let device_size = header.device_size;
    progress.set_total(device_size);

    let in_place = std::fs::metadata(out)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let target: PathBuf = if in_place {
        out.to_owned()
    } else {
        let name = out
            .file_name()
            .ok_or_else(|| ImageError::Invalid(format!("{} is not a file name", out.display())))?;
        let mut tmp = name.to_owned();
        tmp.push(format!(".lode-tmp-{}", std::process::id()));
        out.with_file_name(tmp)
    };
    let file = if in_place {
        OpenOptions::new().write(true).open(&target)
    } else {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&target)
    }
    .map_err(io("create", &target))?;
    let result = write_chunks(store, img, keys, file, &target, progress).await;
    let result = result.and_then(|(file, stats)| {
        if !in_place {
            file.set_len(device_size).map_err(io("resize", &target))?;
        }
        file.sync_all().map_err(io("sync", &target))?;
        if !in_place {
            std::fs::rename(&target, out).map_err(io("rename into place", out))?;
        }
        Ok(stats)
    });
    if result.is_err() && !in_place {
        let _ = std::fs::remove_file(&target);
    }
    result
}

async fn write_chunks(
    store: &Store,
    img: &OpenedImage,
    keys: &lode_format::KeyTable,
    file: File,
    target: &Path,
    progress: Arc<dyn Progress>,
) -> Result<(File, ExportStats), ImageError> {
    let header = img.manifest.header();
    let (cs, device_size) = (header.chunk_size, header.device_size);
    let format = header.chunk_format;
    let file = Arc::new(file);
    let mut stats = ExportStats {
        device_size,
        ..Default::default()
    };
    let jobs = img
        .manifest
        .chunks()
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            let index = ChunkIndex(i as u64);
            match entry.name() {
                None => {
                    stats.zero_chunks += 1;
                    progress.advance(cs.len_of(index, device_size) as u64);
                    None
                }
                Some(name) => Some((index, *name)),
            }
        });
    let jobs: Vec<_> = jobs.collect();
    let fetched: Vec<u64> = futures::stream::iter(jobs)
        .map(|(index, name)| {
            let file = Arc::clone(&file);
            let target = target.to_owned();
            let progress = Arc::clone(&progress);
            let id = img.id;
            let key = keys
                .get(index)
                .cloned()
                .ok_or(ImageError::MissingKey { id, index });
            async move {
                let key = key?;
                let expected = cs.len_of(index, device_size);
                let ciphertext = store
                    .get_chunk(img.root, &name, format.object_len(expected))
                    .await?;
                let size = ciphertext.len() as u64;
                let offset = cs.offset_of(index).0;
                tokio::task::spawn_blocking(move || {
                    let plain = crate::open_chunk_checked(
                        format,
                        id,
                        index,
                        &name,
                        &key,
                        &ciphertext,
                        expected,
                    )?;
                    file.write_all_at(&plain, offset)
                        .map_err(io("write", &target))?;
                    progress.advance(expected as u64);
                    Ok::<_, ImageError>(size)
                })
                .await
                .map_err(|e| ImageError::Task(e.to_string()))?
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    stats.fetched_chunks = fetched.len() as u64;
    stats.fetched_bytes = fetched.iter().sum();
    let file = Arc::try_unwrap(file)
        .map_err(|_| ImageError::Task("export file still shared after all writes".into()))?;
    Ok((file, stats))
}
