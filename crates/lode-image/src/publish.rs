//! Publishing an image file: chunk, drop zeros, seal, put what the store lacks, write the
//! manifest under the active root, and optionally point a tag at it.
//!
//! Chunks are read with positioned reads and sealed on the blocking pool, up to
//! [`CONCURRENCY`](crate::CONCURRENCY) at once, and uploaded as they are sealed; results
//! are consumed in index order, so memory stays bounded and the manifest is built in one
//! pass. A name already seen in this image, or already in the store, is not uploaded.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use lode_format::chunk::is_zero;
use lode_format::{
    ChunkEntry, ChunkFormat, ChunkIndex, ChunkKey, ChunkName, ChunkSize, ImageConfig, ImageDigest,
    Manifest, ManifestHeader, ManifestId, RootId, RootSalt, Secret32,
};
use lode_kms::{Context, Kms};
use lode_store::{PutOutcome, RootRecord, RootState, Store};
use serde::Serialize;

use crate::error::io;
use crate::{CONCURRENCY, ImageError, Progress, failpoint};

/// What to publish and how.
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    /// The chunk size; 512 KiB by default.
    pub chunk_size: ChunkSize,
    /// What the image runs (empty for raw images).
    pub config: ImageConfig,
    /// The digest of the source the image came from. When `None`, lode uses SHA-256 over
    /// the SHA-256 of each chunk's plaintext, in order: a digest of the image's bytes that
    /// costs nothing extra, since sealing hashes every chunk anyway.
    pub image_digest: Option<ImageDigest>,
    /// A tag to point at the new manifest.
    pub tag: Option<String>,
    /// The chunk format to seal in. [default: [`crate::new_chunk_format`] of the chunk
    /// size]
    pub chunk_format: Option<ChunkFormat>,
}

/// What publishing did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PublishStats {
    /// The image's size in bytes.
    pub device_size: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// All-zero chunks, not stored.
    pub zero_chunks: u64,
    /// Chunks whose content appeared earlier in the same image.
    pub repeated_chunks: u64,
    /// Chunks the store already held (from other images).
    pub present_chunks: u64,
    /// Chunks uploaded.
    pub uploaded_chunks: u64,
    /// Of those, chunks whose object in the store was damaged and was replaced.
    pub repaired_chunks: u64,
    /// Ciphertext bytes uploaded.
    pub uploaded_bytes: u64,
    /// Plaintext bytes of the non-zero chunks.
    pub stored_plain_bytes: u64,
}

impl PublishStats {
    /// The share of the image's non-zero bytes that needed no upload, 0.0 to 1.0.
    pub fn dedup_share(&self) -> f64 {
        let nonzero = self.chunks - self.zero_chunks;
        if nonzero == 0 {
            return 1.0;
        }
        1.0 - self.uploaded_chunks as f64 / nonzero as f64
    }
}

/// The result of publishing.
#[derive(Debug)]
pub struct Published {
    /// The manifest's id.
    pub id: ManifestId,
    /// The root it lives under.
    pub root: RootId,
    /// The manifest.
    pub manifest: Manifest,
    /// What was done.
    pub stats: PublishStats,
}

/// Publishes images into a store, wrapping keys with a KMS.
#[derive(Debug)]
pub struct Publisher<'a> {
    store: &'a Store,
    kms: &'a dyn Kms,
    key_id: String,
}

enum Sealed {
    Zero {
        digest: [u8; 32],
    },
    Chunk {
        digest: [u8; 32],
        name: ChunkName,
        key: ChunkKey,
        uploaded: Option<u64>,
        repaired: bool,
    },
    Repeat {
        digest: [u8; 32],
        name: ChunkName,
        key: ChunkKey,
    },
}

impl<'a> Publisher<'a> {
    /// A publisher that wraps new data keys (and a new root's salt) under `key_id`.
    pub fn new(store: &'a Store, kms: &'a dyn Kms, key_id: String) -> Publisher<'a> {
        Publisher { store, kms, key_id }
    }

    /// The active root and its salt, creating root 1 in an empty store.
    ///
    /// Each round judges one listing of the roots: reading "is there an active root" and
    /// "is there any root" from two listings let a racing first publisher's root appear
    /// between them and be mistaken for a store with no active root. Root 1 is created
    /// with the store's atomic create, so of racing first publishers exactly one stores
    /// its record and every one of them then reads that record back and uses it.
    pub async fn active_root(&self) -> Result<(RootId, RootSalt), ImageError> {
        // A rotation retires the active root before it makes the next one, so a
        // publisher may find none for a moment: it waits up to 5 s for the next.
        let mut waits = 0;
        for _ in 0..3 {
            let roots = loop {
                let roots = self.store.roots().await?;
                let rotating = self.store.active_among(&roots)?.is_none() && !roots.is_empty();
                if !rotating || waits == 50 {
                    break roots;
                }
                waits += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            if let Some(rec) = self.store.active_among(&roots)? {
                let salt = self
                    .kms
                    .unwrap(&rec.salt, &Context::root_salt(rec.root))
                    .await?;
                return Ok((rec.root, salt));
            }
            if let Some(last) = roots.last() {
                return Err(ImageError::Invalid(format!(
                    "store {} has {} root(s) but none is active (root {} is {}): a root \
                     rotation stopped part-way; run `lode root rotate` to finish it",
                    self.store.label(),
                    roots.len(),
                    last.root,
                    last.state
                )));
            }
            let salt = Secret32::random().map_err(|_| lode_kms::KmsError::Random)?;
            let rec = RootRecord {
                root: RootId(1),
                state: RootState::Active,
                salt: self
                    .kms
                    .wrap(&self.key_id, &salt, &Context::root_salt(RootId(1)))
                    .await?,
                since: None,
            };
            // Whether we won or another publisher did, read the root back and use what
            // the store holds. On a backend whose create-if-absent is not atomic, two
            // racing publishers may both "win" and the last write stays; even then
            // nothing breaks (keys live in each manifest), only dedup between the two
            // racers' first images is lost.
            self.store.create_root(&rec).await?;
        }
        Err(ImageError::Invalid(format!(
            "store {}: the active root changed repeatedly while starting; try again",
            self.store.label()
        )))
    }

    /// Publishes the image in `path`.
    pub async fn publish_file(
        &self,
        path: &Path,
        opts: &PublishOptions,
        progress: Arc<dyn Progress>,
    ) -> Result<Published, ImageError> {
        let file = File::open(path).map_err(io("open", path))?;
        let meta = file.metadata().map_err(io("stat", path))?;
        let device_size = if meta.file_type().is_file() {
            meta.len()
        } else if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            block_device_size(&file).map_err(io("size", path))?
        } else {
            return Err(ImageError::Invalid(format!(
                "{} is not a regular file or a block device",
                path.display()
            )));
        };
        let file = Arc::new(file);
        // A rotation that retires the root while the image is being published sends it
        // round again under the new root (new salt, new chunk names): nothing new is left
        // only in a retired root, whose chunks copy-forward may already have passed.
        for _ in 0..3 {
            let (root, salt) = self.active_root().await?;
            if let Some(p) = self
                .publish_under(path, &file, device_size, root, salt, opts, &progress)
                .await?
            {
                return Ok(p);
            }
        }
        Err(ImageError::Invalid(format!(
            "store {}: the active root was rotated three times while {} was being published; \
             try again",
            self.store.label(),
            path.display()
        )))
    }

    /// One attempt at publishing under `root`; `None` if the root was retired before the
    /// manifest was tagged.
    #[allow(clippy::too_many_arguments)]
    async fn publish_under(
        &self,
        path: &Path,
        file: &Arc<File>,
        device_size: u64,
        root: RootId,
        salt: RootSalt,
        opts: &PublishOptions,
        progress: &Arc<dyn Progress>,
    ) -> Result<Option<Published>, ImageError> {
        let cs = opts.chunk_size;
        let format = opts
            .chunk_format
            .unwrap_or_else(|| crate::new_chunk_format(cs));
        if let Some(s) = format.segment_size()
            && s.bytes() > cs.bytes()
        {
            return Err(ImageError::Invalid(format!(
                "segment size {} is larger than the chunk size {}",
                s.bytes(),
                cs.bytes()
            )));
        }
        let count = cs.chunks_for(device_size);
        progress.set_total(device_size);

        let salt = Arc::new(salt);
        let seen: Arc<Mutex<HashSet<ChunkName>>> = Arc::default();
        let zero_full = digest_of_zeros(cs.bytes_usize());

        let mut results = futures::stream::iter(0..count)
            .map(|i| {
                let file = Arc::clone(file);
                let salt = Arc::clone(&salt);
                let seen = Arc::clone(&seen);
                let store = self.store.clone();
                let path = path.to_owned();
                async move {
                    let index = ChunkIndex(i);
                    let len = cs.len_of(index, device_size);
                    let offset = cs.offset_of(index).0;
                    let sealed = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len];
                        file.read_exact_at(&mut buf, offset)
                            .map_err(io("read", &path))?;
                        if is_zero(&buf) {
                            let digest = if len == cs.bytes_usize() {
                                zero_full
                            } else {
                                digest_of_zeros(len)
                            };
                            return Ok::<_, ImageError>(Err(digest));
                        }
                        format
                            .seal(&salt, buf)
                            .map(Ok)
                            .map_err(|e| ImageError::Invalid(e.to_string()))
                    })
                    .await
                    .map_err(|e| ImageError::Task(e.to_string()))??;
                    // Err carries the digest of an all-zero chunk, which is not sealed.
                    let s = match sealed {
                        Err(digest) => return Ok::<_, ImageError>((len, Sealed::Zero { digest })),
                        Ok(s) => s,
                    };
                    let first = seen
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(s.name);
                    if !first {
                        return Ok((
                            len,
                            Sealed::Repeat {
                                digest: s.digest,
                                name: s.name,
                                key: s.key,
                            },
                        ));
                    }
                    let size = s.ciphertext.len() as u64;
                    let outcome = store
                        .put_chunk(root, &s.name, Bytes::from(s.ciphertext))
                        .await?;
                    let uploaded = (outcome != PutOutcome::AlreadyPresent).then_some(size);
                    Ok((
                        len,
                        Sealed::Chunk {
                            digest: s.digest,
                            name: s.name,
                            key: s.key,
                            uploaded,
                            repaired: outcome == PutOutcome::Repaired,
                        },
                    ))
                }
            })
            .buffered(CONCURRENCY);

        let mut stats = PublishStats {
            device_size,
            chunks: count,
            ..Default::default()
        };
        let mut entries = Vec::with_capacity(usize::try_from(count.min(1 << 20)).unwrap_or(0));
        let mut keys = Vec::new();
        let mut image_hash = ring::digest::Context::new(&ring::digest::SHA256);
        while let Some(r) = results.next().await {
            let (len, sealed) = r?;
            progress.advance(len as u64);
            match sealed {
                Sealed::Zero { digest } => {
                    image_hash.update(&digest);
                    stats.zero_chunks += 1;
                    entries.push(ChunkEntry::Zero);
                }
                Sealed::Repeat { digest, name, key } => {
                    image_hash.update(&digest);
                    stats.repeated_chunks += 1;
                    stats.stored_plain_bytes += len as u64;
                    entries.push(ChunkEntry::Stored(name));
                    keys.push(key);
                }
                Sealed::Chunk {
                    digest,
                    name,
                    key,
                    uploaded,
                    repaired,
                } => {
                    image_hash.update(&digest);
                    stats.repaired_chunks += u64::from(repaired);
                    stats.stored_plain_bytes += len as u64;
                    match uploaded {
                        Some(bytes) => {
                            stats.uploaded_chunks += 1;
                            stats.uploaded_bytes += bytes;
                        }
                        None => stats.present_chunks += 1,
                    }
                    entries.push(ChunkEntry::Stored(name));
                    keys.push(key);
                }
            }
        }
        drop(results);

        let image_digest = opts.image_digest.unwrap_or_else(|| {
            let mut d = [0u8; 32];
            d.copy_from_slice(image_hash.finish().as_ref());
            ImageDigest::from_bytes(d)
        });
        let header = ManifestHeader {
            root,
            chunk_size: cs,
            chunk_format: format,
            device_size,
            image_digest,
            config: opts.config.clone(),
        };
        let binding = lode_format::binding_of(&header, &entries).map_err(ImageError::Build)?;
        let (data_key, wrapped) = self
            .kms
            .generate_data_key(&self.key_id, &Context::manifest(root, &binding))
            .await?;
        let manifest = Manifest::seal(header, entries, &keys, &data_key, wrapped)
            .map_err(ImageError::Build)?;
        failpoint::pause("publish:before-manifest").await;
        let (id, _) = self
            .store
            .put_manifest(root, Bytes::copy_from_slice(manifest.bytes()))
            .await?;
        // Checked after the manifest is written: a rotation after this check leaves a
        // tagged manifest in the retired root, which is live there and copied forward.
        if self.store.get_root(root).await?.state != RootState::Active {
            return Ok(None);
        }
        if let Some(tag) = &opts.tag {
            self.store.set_tag(tag, &id).await?;
        }
        Ok(Some(Published {
            id,
            root,
            manifest,
            stats,
        }))
    }
}

fn digest_of_zeros(len: usize) -> [u8; 32] {
    let mut d = [0u8; 32];
    d.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &vec![0u8; len]).as_ref());
    d
}

/// The size of a block device (or anything seekable that is not a regular file).
fn block_device_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}
