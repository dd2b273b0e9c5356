//! The local-directory backend: object_store's `LocalFileSystem` for writes, with fsync on,
//! and lode's own reads and listings that treat the directory as hostile.
//!
//! A store directory can be written by whoever else has access to it, so nothing in it is
//! trusted:
//! - reads open every path component with `O_NOFOLLOW` relative to the directory above
//!   it, so a symbolic link (a tag pointing at `/etc/shadow`, a `roots` link to `/`) is
//!   refused instead of followed, and the final open is `O_NONBLOCK`, so a FIFO or device
//!   is refused after `fstat` instead of blocking the reader forever;
//! - listings walk the tree without following links; a link or special file is listed
//!   (so the reader names it as a fault) but never descended into;
//! - writes go to `<name>#<n>` beside the object, are fsynced, and are published by
//!   rename (overwrite) or hard link (create, so racing creates store exactly once), and
//!   the directory is fsynced: a crash leaves the old object, the new one, or a staging
//!   file, never a torn object under its name. Staging files of a killed writer are not
//!   listed; [`LocalDir::staging_files`] finds them for `lode store fsck`.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    UpdateVersion,
};
use rustix::fs::{Mode, OFlags};
use thiserror::Error;

/// An object the local backend will not read, and why. It travels inside
/// `object_store::Error::Generic` so the store can name it.
#[derive(Debug, Error)]
#[error("{path} is {what}")]
pub struct Refused {
    /// The object's key.
    pub path: String,
    /// What it is instead of a regular file.
    pub what: &'static str,
}

/// A store directory on this machine.
#[derive(Debug, Clone)]
pub struct LocalDir {
    inner: Arc<LocalFileSystem>,
    root: PathBuf,
}

/// A file a killed writer left behind: `<object>#<n>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingFile {
    /// Its path relative to the store directory.
    pub key: String,
    /// Its size.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

impl LocalDir {
    /// Opens `dir` (which must exist) as a store.
    pub fn new(dir: &FsPath) -> object_store::Result<LocalDir> {
        let root = std::fs::canonicalize(dir).map_err(|e| generic(e.into()))?;
        let inner = LocalFileSystem::new_with_prefix(&root)?.with_fsync(true);
        Ok(LocalDir {
            inner: Arc::new(inner),
            root,
        })
    }

    /// Every staging file under the store directory, found without following links.
    pub fn staging_files(&self) -> io::Result<Vec<StagingFile>> {
        let mut out = Vec::new();
        walk(&self.root, "", &mut |key, meta| {
            if is_staging(key) {
                out.push(StagingFile {
                    key: key.to_owned(),
                    size: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        })?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes one staging file found by [`LocalDir::staging_files`].
    pub fn remove_staging(&self, key: &str) -> io::Result<()> {
        if !is_staging(key) || key.split('/').any(|p| p.is_empty() || p == "..") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{key} is not a staging file"),
            ));
        }
        let (dir, name) = key.rsplit_once('/').unwrap_or(("", key));
        let dir = open_dir_beneath(&self.root, dir)?;
        rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty())?;
        Ok(())
    }

    /// Fails if a directory on the way to `location` is a link: a write must not land
    /// outside the store. Components that do not exist yet are created by the write.
    fn check_parents(&self, location: &Path) -> object_store::Result<()> {
        let mut dir = self.root.clone();
        let parts: Vec<_> = location.parts().collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            dir.push(part.as_ref());
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refused(location, "behind a symbolic link"));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(generic(e.into())),
            }
        }
        Ok(())
    }

    /// A conditional overwrite, which object_store's `LocalFileSystem` lacks: the object
    /// is replaced only if its e-tag is still `expected`'s. Writers of one directory are
    /// serialised by an exclusive `flock` on the directory itself (no lock file appears
    /// in listings), the e-tag is checked under the lock, and the new bytes are published
    /// by the usual staging file and rename, which gives the object a new inode and so a
    /// new e-tag. Of racing updates from one version exactly one succeeds; the others get
    /// `Precondition`, as from S3's `If-Match`.
    async fn put_if_unchanged(
        &self,
        location: &Path,
        payload: PutPayload,
        expected: UpdateVersion,
    ) -> object_store::Result<PutResult> {
        let this = self.clone();
        let loc = location.clone();
        let lock = tokio::task::spawn_blocking(move || this.lock_and_check(&loc, &expected))
            .await
            .map_err(|e| generic(e.into()))??;
        let put = self
            .inner
            .put_opts(location, payload, PutOptions::default())
            .await;
        drop(lock);
        put
    }

    /// Locks the directory of `location` and checks the object's e-tag; the lock is held
    /// while the returned descriptor lives.
    fn lock_and_check(
        &self,
        location: &Path,
        expected: &UpdateVersion,
    ) -> object_store::Result<std::os::fd::OwnedFd> {
        let key = location.as_ref();
        let (dir, _) = key.rsplit_once('/').unwrap_or(("", key));
        let path_fd = open_dir_beneath(&self.root, dir).map_err(|e| generic(e.into()))?;
        let dir_fd = rustix::fs::openat(
            &path_fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| generic(e.into()))?;
        rustix::fs::flock(&dir_fd, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| generic(e.into()))?;
        let precondition = |why: String| object_store::Error::Precondition {
            path: key.to_owned(),
            source: why.into(),
        };
        let file = match open_beneath(&self.root, key) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(precondition("the object is gone".to_owned()));
            }
            Err(e) => return Err(generic(e.into())),
        };
        let meta = file.metadata().map_err(|e| generic(e.into()))?;
        let now = object_meta(location.clone(), &meta).e_tag;
        if expected.e_tag.is_none() || now != expected.e_tag {
            return Err(precondition(
                "the object changed since it was read".to_owned(),
            ));
        }
        Ok(dir_fd)
    }

    fn get_blocking(
        &self,
        location: &Path,
        options: &GetOptions,
    ) -> object_store::Result<GetResult> {
        let file = match open_beneath(&self.root, location.as_ref()) {
            Ok(f) => f,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) =>
            {
                return Err(not_found(location, e));
            }
            // O_NOFOLLOW met a link, on the way or at the end.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                return Err(refused(
                    location,
                    "a symbolic link (lode does not follow links in a store)",
                ));
            }
            Err(e) => return Err(generic(e.into())),
        };
        let meta = file.metadata().map_err(|e| generic(e.into()))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(not_found(
                location,
                io::Error::new(io::ErrorKind::NotFound, "is a directory"),
            ));
        }
        if !ft.is_file() {
            return Err(refused(location, special_kind(&ft)));
        }
        let object = object_meta(location.clone(), &meta);
        options.check_preconditions(&object)?;
        let range = match &options.range {
            Some(r) => r.as_range(object.size).map_err(|e| generic(Box::new(e)))?,
            None => 0..object.size,
        };
        let path = self.root.join(location.as_ref());
        Ok(GetResult {
            payload: GetResultPayload::File(file, path),
            attributes: Default::default(),
            range,
            meta: object,
            extensions: Default::default(),
        })
    }

    fn list_blocking(&self, prefix: Option<&Path>) -> object_store::Result<Vec<ObjectMeta>> {
        let base = prefix.map(|p| p.as_ref().to_owned()).unwrap_or_default();
        let Some(dir) = self.dir_beneath(&base)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut bad = None;
        walk(&dir, &base, &mut |key, meta| {
            if is_staging(key) {
                return;
            }
            match Path::parse(key) {
                Ok(p) => out.push(object_meta(p, meta)),
                Err(e) => bad = Some(e),
            }
        })
        .map_err(|e| generic(e.into()))?;
        if let Some(e) = bad {
            return Err(e.into());
        }
        Ok(out)
    }

    /// The directory for `key`, if it exists and no component of it is a link.
    fn dir_beneath(&self, key: &str) -> object_store::Result<Option<PathBuf>> {
        let mut dir = self.root.clone();
        for part in key.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(generic(e.into())),
            }
        }
        Ok(Some(dir))
    }
}

impl fmt::Display for LocalDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalDir({})", self.root.display())
    }
}

#[async_trait]
impl ObjectStore for LocalDir {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check_parents(location)?;
        if let PutMode::Update(expected) = &opts.mode {
            return self
                .put_if_unchanged(location, payload, expected.clone())
                .await;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check_parents(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let this = self.clone();
        let location = location.clone();
        tokio::task::spawn_blocking(move || this.get_blocking(&location, &options))
            .await
            .map_err(|e| generic(e.into()))?
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        // A delete through a linked directory would remove a file outside the store.
        let this = self.clone();
        let checked = locations.map(move |l| {
            let l = l?;
            this.check_parents(&l)?;
            Ok(l)
        });
        self.inner.delete_stream(checked.boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let this = self.clone();
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            tokio::task::spawn_blocking(move || this.list_blocking(prefix.as_ref()))
                .await
                .map_err(|e| generic(e.into()))?
        })
        .map(|r| match r {
            Ok(v) => futures::stream::iter(v.into_iter().map(Ok)).boxed(),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let this = self.clone();
        let prefix = prefix.cloned().unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let mut out = ListResult {
                common_prefixes: Vec::new(),
                objects: Vec::new(),
                extensions: Default::default(),
            };
            let Some(dir) = this.dir_beneath(prefix.as_ref())? else {
                return Ok(out);
            };
            for entry in std::fs::read_dir(&dir).map_err(|e| generic(e.into()))? {
                let entry = entry.map_err(|e| generic(e.into()))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if is_staging(&name) {
                    continue;
                }
                let meta = entry.metadata().map_err(|e| generic(e.into()))?;
                let key = prefix.clone().join(name.as_str());
                if meta.is_dir() {
                    out.common_prefixes.push(key);
                } else {
                    out.objects.push(object_meta(key, &meta));
                }
            }
            out.common_prefixes.sort();
            Ok(out)
        })
        .await
        .map_err(|e| generic(e.into()))?
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.check_parents(to)?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.check_parents(to)?;
        self.inner.rename_opts(from, to, options).await
    }
}

/// Whether a file name (or key) is object_store's staging name `<name>#<digits>`.
pub fn is_staging(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    matches!(name.rsplit_once('#'), Some((_, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Calls `f` with the key and `lstat` of every non-directory under `dir` (whose key is
/// `base`), descending into real directories only.
fn walk(dir: &FsPath, base: &str, f: &mut dyn FnMut(&str, &std::fs::Metadata)) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        // A name that is not UTF-8 was not written by lode and cannot be a key.
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let key = if base.is_empty() {
            name
        } else {
            format!("{}/{name}", base.trim_end_matches('/'))
        };
        // DirEntry::metadata does not follow links.
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            walk(&entry.path(), &key, f)?;
        } else {
            f(&key, &meta);
        }
    }
    Ok(())
}

/// Opens `key` under `root` without following any link and without blocking on a FIFO.
fn open_beneath(root: &FsPath, key: &str) -> io::Result<File> {
    let (dir, name) = key.rsplit_once('/').unwrap_or(("", key));
    let dir = open_dir_beneath(root, dir)?;
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// Opens the directory `key` under `root`, one component at a time, refusing links
/// (ELOOP) and answering ENOTDIR for a component that is some other file. Each component
/// is opened as an `O_PATH` handle of the entry itself, so its type is checked before
/// anything is resolved through it.
fn open_dir_beneath(root: &FsPath, key: &str) -> io::Result<std::os::fd::OwnedFd> {
    let mut dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for part in key.split('/').filter(|p| !p.is_empty()) {
        let next = rustix::fs::openat(
            &dir,
            part,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let kind = rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&next)?.st_mode);
        match kind {
            rustix::fs::FileType::Directory => dir = next,
            rustix::fs::FileType::Symlink => return Err(rustix::io::Errno::LOOP.into()),
            _ => return Err(rustix::io::Errno::NOTDIR.into()),
        }
    }
    Ok(dir)
}

fn special_kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO, not a regular file"
    } else if ft.is_socket() {
        "a socket, not a regular file"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device, not a regular file"
    } else if ft.is_symlink() {
        "a symbolic link (lode does not follow links in a store)"
    } else {
        "not a regular file"
    }
}

fn object_meta(location: Path, meta: &std::fs::Metadata) -> ObjectMeta {
    use std::os::unix::fs::MetadataExt;
    let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let micros = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    ObjectMeta {
        location,
        last_modified: modified.into(),
        size: meta.len(),
        // The scheme object_store's LocalFileSystem uses, so e-tags stay comparable.
        e_tag: Some(format!("\"{:x}-{micros:x}-{:x}\"", meta.ino(), meta.len())),
        version: None,
    }
}

fn generic(source: Box<dyn std::error::Error + Send + Sync>) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalDir",
        source,
    }
}

fn refused(location: &Path, what: &'static str) -> object_store::Error {
    generic(Box::new(Refused {
        path: location.to_string(),
        what,
    }))
}

fn not_found(location: &Path, source: io::Error) -> object_store::Error {
    object_store::Error::NotFound {
        path: location.to_string(),
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names() {
        assert!(is_staging("roots/1/chunks/ab/abcd#1"));
        assert!(is_staging("tags/x#12"));
        assert!(!is_staging("tags/x#"));
        assert!(!is_staging("tags/x#a1"));
        assert!(!is_staging("tags/x"));
        assert!(!is_staging("tags/a#1/b"));
    }
}
