//! `lode flatten`: an OCI image (layout directory, docker-archive, registry) into a
//! deterministic ext4 image (`lode-oci`, `lode-ext4`), then published as chunks and a
//! manifest carrying the image's config. The ext4 image is written to a scratch file
//! first and published only when flattening succeeded, so a failed flatten publishes no
//! manifest and no tag.
//!
//! The scratch file is removed when the flatten ends, however it ends, except when the
//! process is killed outright. For that case each flatten holds an exclusive `flock` on its
//! scratch file for as long as it lives, and every flatten starts by deleting the scratch
//! files whose lock nobody holds ([`reclaim_scratch`]): those of flattens that died.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use lode_format::{ChunkSize, ImageConfig, ImageDigest};
use lode_oci::{FlattenOptions, ImageSource};
use serde::Serialize;

use crate::{ImageError, Progress, PublishOptions, Published, Publisher};

/// What to flatten and where to work.
#[derive(Clone, Debug)]
pub struct FlattenRequest {
    /// `oci:DIR[:TAG]`, `docker-archive:FILE` or `docker://HOST/REPO[:TAG|@DIGEST]`.
    pub source: String,
    /// A tag for the new manifest.
    pub tag: Option<String>,
    /// The chunk size, which is also the alignment of each layer's data region.
    pub chunk_size: ChunkSize,
    /// A directory for the scratch ext4 image (removed afterwards).
    pub work_dir: PathBuf,
    /// Keep the ext4 image here as well (for inspection, mounting, benchmarks).
    pub keep_image: Option<PathBuf>,
    /// Where registry images are pulled to (an OCI layout reused across pulls, so a
    /// blob already here is not fetched again).
    pub registry_cache: PathBuf,
    /// Credentials for `docker://` sources.
    pub registry_auth: lode_registry::RegistryAuth,
    /// How to pull `docker://` sources (rate bounds, caps). Its layer and config caps are
    /// lowered to the flattener's own, so an image the flattener would refuse is refused
    /// before it is downloaded.
    pub pull: lode_registry::PullOptions,
}

/// What flattening and publishing did.
#[derive(Debug, Serialize)]
pub struct FlattenReport {
    /// The published manifest.
    #[serde(skip)]
    pub published: Published,
    /// The OCI manifest digest (docker-archive: the config digest).
    pub image_digest: ImageDigest,
    /// Each layer and the byte range of its data region in the ext4 image.
    pub layers: Vec<LayerReport>,
    /// Size of the ext4 image.
    pub image_size: u64,
    /// Seconds spent flattening (reading layers, writing ext4).
    pub flatten_seconds: f64,
    /// Seconds spent chunking, sealing and uploading.
    pub publish_seconds: f64,
}

/// One layer of a flattened image.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// The layer blob's digest, when the source names one.
    pub digest: Option<String>,
    /// SHA-256 of the uncompressed tar.
    pub diff_id: String,
    /// First byte of the layer's data region (chunk-aligned).
    pub region_start: u64,
    /// One past the last byte of the region.
    pub region_end: u64,
    /// Regular files whose contents the region holds.
    pub files: u64,
    /// Size of the uncompressed tar.
    pub uncompressed_bytes: u64,
}

/// Phases reported to the caller's progress display.
pub trait FlattenProgress: Send + Sync {
    /// A line of news ("layer 2/5 …").
    fn note(&self, line: String);
    /// Byte progress for a new phase ("pulling", "flattening", "publishing"); the
    /// previous phase is over.
    fn bytes(&self, phase: &str) -> Arc<dyn Progress>;
}

/// Flattens `req.source` and publishes the result.
pub async fn flatten_and_publish(
    publisher: &Publisher<'_>,
    req: &FlattenRequest,
    progress: Arc<dyn FlattenProgress>,
) -> Result<FlattenReport, ImageError> {
    let source_ref = if req.source.starts_with("docker://") {
        pull(req, progress.as_ref()).await?
    } else {
        req.source.clone()
    };
    let source: ImageSource = source_ref
        .parse()
        .map_err(|e: lode_oci::SourceError| ImageError::Invalid(e.to_string()))?;
    std::fs::create_dir_all(&req.work_dir).map_err(crate::error::io("create", &req.work_dir))?;
    let reclaimed = reclaim_scratch(&req.work_dir)?;
    if reclaimed.files > 0 {
        progress.note(format!(
            "removed {} scratch files ({} bytes) left in {} by flattens that died",
            reclaimed.files,
            reclaimed.bytes,
            req.work_dir.display()
        ));
    }
    let scratch = locked_scratch(&req.work_dir)?;
    let out = scratch
        .as_file()
        .try_clone()
        .map_err(crate::error::io("open", scratch.path()))?;
    let opts = FlattenOptions {
        chunk_size: req.chunk_size.bytes_u64(),
        ..Default::default()
    };
    let started = Instant::now();
    let p = Arc::clone(&progress);
    let flattened = tokio::task::spawn_blocking(move || {
        let state = FlattenState {
            bar: p.bytes("flattening"),
            total: AtomicU64::new(0),
            last: AtomicU64::new(0),
        };
        lode_oci::flatten(&source, out, &opts, &|ev| note(p.as_ref(), &state, ev))
    })
    .await
    .map_err(|e| ImageError::Task(e.to_string()))?
    .map_err(|source| ImageError::Flatten {
        image: req.source.clone(),
        source: Box::new(source),
    })?;
    let flatten_seconds = started.elapsed().as_secs_f64();

    if let Some(keep) = &req.keep_image {
        std::fs::copy(scratch.path(), keep).map_err(crate::error::io("copy the image to", keep))?;
    }
    let c = &flattened.config;
    let opts = PublishOptions {
        chunk_size: req.chunk_size,
        config: ImageConfig {
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
        },
        image_digest: Some(ImageDigest::from_bytes(flattened.image_digest.0)),
        tag: req.tag.clone(),
        chunk_format: None,
    };
    progress.note(format!(
        "publishing {} ext4 image ({} layers)",
        flattened.summary.image_size,
        flattened.layers.len()
    ));
    let started = Instant::now();
    let published = publisher
        .publish_file(scratch.path(), &opts, progress.bytes("publishing"))
        .await?;
    let layers = flattened
        .layers
        .iter()
        .map(|l| LayerReport {
            digest: l.layer.digest.map(|d| format!("sha256:{}", d.hex())),
            diff_id: format!("sha256:{}", l.diff_id.hex()),
            region_start: l.region.byte_range().start,
            region_end: l.region.byte_range().end,
            files: l.files,
            uncompressed_bytes: l.uncompressed_bytes,
        })
        .collect();
    Ok(FlattenReport {
        image_digest: ImageDigest::from_bytes(flattened.image_digest.0),
        layers,
        image_size: flattened.summary.image_size,
        published,
        flatten_seconds,
        publish_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Pulls a registry image into the layout cache; returns the `oci:DIR:TAG` to flatten.
async fn pull(req: &FlattenRequest, progress: &dyn FlattenProgress) -> Result<String, ImageError> {
    std::fs::create_dir_all(&req.registry_cache)
        .map_err(crate::error::io("create", &req.registry_cache))?;
    progress.note(format!("pulling {}", req.source));
    let bytes = progress.bytes("pulling");
    let limits = lode_oci::Limits::default();
    let opts = lode_registry::PullOptions {
        max_layers: req.pull.max_layers.min(limits.max_layers),
        max_config_bytes: req
            .pull
            .max_config_bytes
            .min(limits.source.max_config_bytes),
        ..req.pull.clone()
    };
    let pulled = lode_registry::pull_to_layout(
        &req.source,
        &req.registry_auth,
        &opts,
        &req.registry_cache,
        &move |n| bytes.advance(n),
    )
    .await
    .map_err(|source| ImageError::Pull {
        image: req.source.clone(),
        source: Box::new(source),
    })?;
    progress.note(format!(
        "pulled {} ({} layers, {} bytes fetched)",
        pulled.manifest.digest,
        pulled.layers.len(),
        pulled.bytes_fetched
    ));
    // By digest, not by the layout's tag: another pull of a same-named tag may move the tag
    // before this flatten reads it; the digest is this pull's image and no other.
    Ok(format!(
        "oci:{}:@{}",
        req.registry_cache.display(),
        pulled.manifest.digest
    ))
}

/// Prefix and suffix of scratch image names, which [`reclaim_scratch`] looks for.
const SCRATCH_PREFIX: &str = "flatten-";
const SCRATCH_SUFFIX: &str = ".ext4";

/// A new scratch file in `dir`, created and then locked for the life of the flatten. A
/// concurrent [`reclaim_scratch`] may take the lock in the instant between the two and
/// delete the file; then the name no longer leads to our file and we start over.
fn locked_scratch(dir: &Path) -> Result<tempfile::NamedTempFile, ImageError> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let scratch = tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .suffix(SCRATCH_SUFFIX)
            .tempfile_in(dir)
            .map_err(crate::error::io("create a scratch file in", dir))?;
        scratch
            .as_file()
            .lock()
            .map_err(crate::error::io("lock", scratch.path()))?;
        let ours = scratch
            .as_file()
            .metadata()
            .map_err(crate::error::io("stat", scratch.path()))?;
        match std::fs::symlink_metadata(scratch.path()) {
            Ok(named) if named.ino() == ours.ino() && named.dev() == ours.dev() => {
                return Ok(scratch);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::error::io("stat", scratch.path())(e)),
        }
    }
}

/// What [`reclaim_scratch`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Reclaimed {
    /// Scratch files deleted.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Deletes the scratch images in `dir` left by flattens that died (killed, or the machine
/// lost power): every `flatten-*.ext4` whose lock no running flatten holds. A running
/// flatten's scratch file is never touched. Missing `dir` is nothing to reclaim.
pub fn reclaim_scratch(dir: &Path) -> Result<Reclaimed, ImageError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut done = Reclaimed::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(crate::error::io("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(crate::error::io("list", dir))?;
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        if !name.starts_with(SCRATCH_PREFIX.as_bytes())
            || !name.ends_with(SCRATCH_SUFFIX.as_bytes())
        {
            continue;
        }
        let path = entry.path();
        // O_NOFOLLOW and O_NONBLOCK: whatever sits under the name, opening it neither follows
        // a link out of the directory nor waits on a FIFO.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => continue,
            Err(e) => return Err(crate::error::io("open", &path)(e)),
        };
        let meta = file.metadata().map_err(crate::error::io("stat", &path))?;
        if !meta.is_file() {
            continue;
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(crate::error::io("lock", &path)(e));
            }
        }
        // Delete only the file we hold locked, not one created under the name since.
        match std::fs::symlink_metadata(&path) {
            Ok(named) if named.ino() == meta.ino() && named.dev() == meta.dev() => {}
            _ => continue,
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                done.files += 1;
                done.bytes += meta.blocks() * 512;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::error::io("remove", &path)(e)),
        }
    }
    Ok(done)
}

/// The flatten phase's bar: its total grows by each layer's blob size as the layer
/// starts (sizes are known only then), and it advances by compressed bytes read.
struct FlattenState {
    bar: Arc<dyn Progress>,
    total: AtomicU64,
    last: AtomicU64,
}

fn note(p: &dyn FlattenProgress, st: &FlattenState, ev: lode_oci::Progress) {
    use lode_oci::Progress as P;
    match ev {
        P::Resolved {
            image_digest,
            layers,
        } => p.note(format!("image {} with {layers} layers", image_digest.hex())),
        P::LayerStarted {
            index, count, size, ..
        } => {
            let total = st.total.fetch_add(size.unwrap_or(0), Ordering::Relaxed);
            st.bar.set_total(total + size.unwrap_or(0));
            st.last.store(0, Ordering::Relaxed);
            p.note(format!("layer {}/{count}", index + 1));
        }
        P::LayerBytes { compressed, .. } => {
            let before = st.last.swap(compressed, Ordering::Relaxed);
            st.bar.advance(compressed.saturating_sub(before));
        }
        P::LayerDone { .. } | P::Finishing => {}
    }
}

/// The default scratch directory: `$LODE_HOME/tmp`, beside the store, so the scratch image
/// is on a disk with room for images.
pub fn default_work_dir(home: &Path) -> PathBuf {
    home.join("tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reclaim_takes_only_unlocked_scratch_files() {
        let dir = tempfile::tempdir().unwrap();
        // A running flatten's scratch file: locked, and kept.
        let live = locked_scratch(dir.path()).unwrap();
        std::fs::write(live.path(), vec![1u8; 8192]).unwrap();
        // A dead flatten's: same naming, nobody holds its lock.
        let dead = dir.path().join("flatten-dead.ext4");
        std::fs::write(&dead, vec![2u8; 8192]).unwrap();
        // Not ours: other names, a directory and a FIFO under a scratch name.
        let other = dir.path().join("notes.txt");
        std::fs::write(&other, b"keep").unwrap();
        std::fs::create_dir(dir.path().join("flatten-dir.ext4")).unwrap();
        let fifo = dir.path().join("flatten-fifo.ext4");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());

        let done = reclaim_scratch(dir.path()).unwrap();
        assert_eq!(done.files, 1);
        assert!(done.bytes >= 8192, "{done:?}");
        assert!(!dead.exists());
        assert!(live.path().exists() && other.exists() && fifo.exists());
        assert!(dir.path().join("flatten-dir.ext4").is_dir());

        // Once its flatten ends (here: the handle is forgotten, as a killed process's
        // would be, and its descriptor closed), the live file is reclaimed in turn.
        let (file, path) = live.keep().unwrap();
        drop(file);
        assert_eq!(reclaim_scratch(dir.path()).unwrap().files, 1);
        assert!(!path.exists());
        assert_eq!(
            reclaim_scratch(&dir.path().join("missing")).unwrap(),
            Reclaimed::default()
        );
    }
}
