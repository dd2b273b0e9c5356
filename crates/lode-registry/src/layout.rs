//! The OCI image layout being written: `oci-layout`, `index.json`, `blobs/sha256/HEX`.
//!
//! A blob reaches its digest name only whole and verified: it is streamed into a temporary
//! file under `blobs/` (named `.lode-partial-*`, never a digest), hashed on the way, synced,
//! and renamed into `blobs/sha256/` only when its size and sha256 match the descriptor. A
//! failed or interrupted pull therefore leaves at most a partial file that no reader of the
//! layout will take for a blob, and that is deleted when the write is dropped.
//!
//! A pull killed outright cannot delete its partial file, so each one is held under an
//! exclusive `flock` while it is written: the next pull into the layout deletes every
//! partial file whose lock nobody holds ([`Layout::create`]). `index.json` is rewritten
//! under a lock too, so concurrent pulls into one layout never lose each other's entries.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::error::Error;
use crate::manifest::{Descriptor, Digest};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Layout {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Creates (or opens) the layout at `root`.
    pub(crate) fn create(root: &Path) -> Result<Self, Error> {
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let marker = root.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let layout = Layout {
            root: root.to_owned(),
        };
        layout.reclaim_partials()?;
        Ok(layout)
    }

    /// Deletes the partial files of pulls that died: those whose lock nobody holds. Returns
    /// how many were deleted.
    pub(crate) fn reclaim_partials(&self) -> Result<usize, Error> {
        let mut reclaimed = 0;
        for dir in [self.root.clone(), self.root.join("blobs")] {
            let entries = std::fs::read_dir(&dir).map_err(io_err(&dir))?;
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                if !entry
                    .file_name()
                    .as_encoded_bytes()
                    .starts_with(PARTIAL.as_bytes())
                {
                    continue;
                }
                if remove_if_unlocked(&entry.path()).map_err(io_err(&entry.path()))? {
                    reclaimed += 1;
                }
            }
        }
        Ok(reclaimed)
    }

    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// True when the blob is already present with the right size and hash.
    pub(crate) async fn has_blob(&self, desc: &Descriptor) -> Result<bool, Error> {
        let path = self.blob_path(&desc.digest);
        let want = desc.clone();
        let check = move || -> std::io::Result<bool> {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            };
            if file.metadata()?.len() != want.size {
                return Ok(false);
            }
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
            }
            Ok(Digest::from_sha256(ctx.finish().as_ref()) == want.digest)
        };
        let path = self.blob_path(&desc.digest);
        tokio::task::spawn_blocking(check)
            .await
            .map_err(|e| Error::Layout {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(io_err(&path))
    }

    /// Stores bytes already held in memory (a manifest) under their digest.
    pub(crate) fn put_small(&self, digest: &Digest, bytes: &[u8]) -> Result<(), Error> {
        debug_assert_eq!(&Digest::of(bytes), digest);
        write_atomic(&self.blob_path(digest), bytes)
    }

    /// Starts streaming a blob. Nothing appears under its digest until [`BlobWrite::finish`].
    pub(crate) fn start_blob(&self) -> Result<BlobWrite, Error> {
        let dir = self.root.join("blobs");
        let temp = locked_temp(&dir)?;
        let file = temp.as_file().try_clone().map_err(io_err(temp.path()))?;
        Ok(BlobWrite {
            temp,
            file: tokio::fs::File::from_std(file),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            written: 0,
        })
    }

    /// Points `tag` at `manifest` in `index.json`, replacing an earlier entry with that tag and
    /// keeping every other entry.
    pub(crate) fn set_tag(&self, tag: &str, manifest: &Descriptor) -> Result<(), Error> {
        let path = self.root.join("index.json");
        // Read, change and replace under one lock: two pulls interleaving here would each
        // write an index without the other's entry.
        let lock_path = self.root.join(".lode-index.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        let mut index = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Value>(&bytes).map_err(|e| Error::Layout {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                json!({"schemaVersion": 2, "mediaType": crate::manifest::OCI_INDEX, "manifests": []})
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let not_index = || Error::Layout {
            path: path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "index.json has no manifests array",
            ),
        };
        let manifests = index
            .get_mut("manifests")
            .and_then(Value::as_array_mut)
            .ok_or_else(not_index)?;
        manifests.retain(|m| {
            m.pointer("/annotations/org.opencontainers.image.ref.name") != Some(&Value::from(tag))
        });
        manifests.push(json!({
            "mediaType": manifest.media_type,
            "digest": manifest.digest.as_str(),
            "size": manifest.size,
            "annotations": { REF_NAME: tag },
        }));
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| Error::Layout {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&path, &bytes)
    }
}

/// A blob being streamed into the layout.
pub(crate) struct BlobWrite {
    temp: tempfile::NamedTempFile,
    file: tokio::fs::File,
    hash: ring::digest::Context,
    written: u64,
}

impl std::fmt::Debug for BlobWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWrite")
            .field("temp", &self.temp.path())
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl BlobWrite {
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> Result<(), Error> {
        self.hash.update(chunk);
        self.written = self.written.saturating_add(chunk.len() as u64);
        self.file
            .write_all(chunk)
            .await
            .map_err(io_err(self.temp.path()))
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// The digest of what was written so far.
    pub(crate) fn digest(&self) -> Digest {
        Digest::from_sha256(self.hash.clone().finish().as_ref())
    }

    /// Renames the blob to `blobs/sha256/HEX` if it hashes to `digest`; returns the actual
    /// digest otherwise (and the temporary file is removed).
    pub(crate) async fn finish(
        mut self,
        layout: &Layout,
        digest: &Digest,
    ) -> Result<Result<(), Digest>, Error> {
        let actual = self.digest();
        if &actual != digest {
            return Ok(Err(actual));
        }
        self.file.flush().await.map_err(io_err(self.temp.path()))?;
        self.file
            .sync_all()
            .await
            .map_err(io_err(self.temp.path()))?;
        let target = layout.blob_path(digest);
        self.temp
            .persist(&target)
            .map_err(|e| io_err(&target)(e.error))?;
        Ok(Ok(()))
    }
}

/// The name prefix of files being written; never a digest, so never taken for a blob.
const PARTIAL: &str = ".lode-partial-";

/// A new partial file in `dir`, created and then locked. A pull reclaiming partial files
/// may take the lock in the instant between the two and delete the file; then the name no
/// longer leads to our file, and we start over with a new one.
fn locked_temp(dir: &Path) -> Result<tempfile::NamedTempFile, Error> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let temp = tempfile::Builder::new()
            .prefix(PARTIAL)
            .tempfile_in(dir)
            .map_err(io_err(dir))?;
        temp.as_file().lock().map_err(io_err(temp.path()))?;
        let ours = temp.as_file().metadata().map_err(io_err(temp.path()))?;
        match std::fs::symlink_metadata(temp.path()) {
            Ok(named) if named.ino() == ours.ino() && named.dev() == ours.dev() => return Ok(temp),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(temp.path())(e)),
        }
    }
}

/// Deletes `path` if it is a regular file whose lock nobody holds; true if it did.
fn remove_if_unlocked(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(false);
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    // Delete only the file we hold locked, not one created under the name since.
    match std::fs::symlink_metadata(path) {
        Ok(named) if named.ino() == meta.ino() && named.dev() == meta.dev() => {
            match std::fs::remove_file(path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `path` whole or not at all: temporary file beside it, fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = locked_temp(dir)?;
    temp.write_all(bytes).map_err(io_err(path))?;
    temp.as_file().sync_all().map_err(io_err(path))?;
    temp.persist(path).map_err(|e| io_err(path)(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: "x".into(),
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
        }
    }

    #[tokio::test]
    async fn verified_blob_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        let good = desc(b"hello");
        assert!(!layout.has_blob(&good).await.unwrap());

        let mut w = layout.start_blob().unwrap();
        w.write(b"hellO").await.unwrap();
        let actual = w.finish(&layout, &good.digest).await.unwrap().unwrap_err();
        assert_eq!(actual, Digest::of(b"hellO"));
        assert!(!layout.blob_path(&good.digest).exists());
        // The partial file is gone too.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("sha256")]);

        let mut w = layout.start_blob().unwrap();
        w.write(b"hel").await.unwrap();
        w.write(b"lo").await.unwrap();
        w.finish(&layout, &good.digest).await.unwrap().unwrap();
        assert!(layout.has_blob(&good).await.unwrap());

        // A corrupted copy on disk does not count as present.
        std::fs::write(layout.blob_path(&good.digest), b"jello").unwrap();
        assert!(!layout.has_blob(&good).await.unwrap());
    }

    #[tokio::test]
    async fn partial_files_of_dead_pulls_are_reclaimed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        // A pull in progress: its partial file is locked.
        let mut live = layout.start_blob().unwrap();
        live.write(b"half a blob").await.unwrap();
        // A pull that was killed: same naming, nobody holds the lock.
        let dead = dir.path().join("blobs").join(".lode-partial-dead");
        std::fs::write(&dead, b"left behind").unwrap();
        let dead_index = dir.path().join(".lode-partial-index");
        std::fs::write(&dead_index, b"{").unwrap();
        let blob = dir.path().join("blobs/sha256").join("a".repeat(64));
        std::fs::write(&blob, b"not a partial").unwrap();

        // Opening the layout again, as the next pull does, reclaims the dead ones only.
        let again = Layout::create(dir.path()).unwrap();
        assert!(!dead.exists() && !dead_index.exists());
        assert!(live.temp.path().exists() && blob.exists());
        assert_eq!(again.reclaim_partials().unwrap(), 0);

        // The live pull finishes normally.
        live.write(b"!").await.unwrap();
        let digest = Digest::of(b"half a blob!");
        live.finish(&again, &digest).await.unwrap().unwrap();
        assert!(again.blob_path(&digest).exists());
    }

    #[test]
    fn tags_replace_and_accumulate() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::create(dir.path()).unwrap();
        layout.set_tag("a", &desc(b"1")).unwrap();
        layout.set_tag("b", &desc(b"2")).unwrap();
        layout.set_tag("a", &desc(b"3")).unwrap();
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let m = index["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["annotations"][REF_NAME], "b");
        assert_eq!(m[1]["annotations"][REF_NAME], "a");
        assert_eq!(m[1]["digest"], Digest::of(b"3").as_str());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("oci-layout")).unwrap(),
            r#"{"imageLayoutVersion":"1.0.0"}"#
        );
    }
}
