//! Where images come from: the [`Source`] trait and its two local
//! implementations, an OCI image layout directory and a docker-archive
//! tarball.
//!
//! A source only finds bytes: the manifest's digest, the config JSON and
//! each layer blob as a reader. [`crate::flatten`] checks the config's
//! digest, every layer blob's digest while it streams, and every layer's
//! `diff_id`, so a new source (a registry) gets those checks for free.
//!
//! ```text
//! oci:DIR[:TAG]          index.json ─tag→ [index ─platform→] manifest ─→ config, layers
//! oci:DIR:@sha256:HEX    the manifest (or index) blob HEX, without reading index.json
//! docker-archive:FILE    manifest.json ─RepoTags→ Config, Layers (entries of the tar)
//! ```
//!
//! Every file is opened so that a hostile layout or archive cannot block the reader or send
//! it outside: a layout's files are resolved beneath the layout directory (a symlink may
//! point within it, never out of it) as an `O_PATH` handle, which opens no FIFO or device,
//! and are opened for reading only once they are known to be regular files
//! ([`open_in_layout`]). A docker-archive must itself be a regular file, and only its
//! regular-file entries are read.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::digest::Digest;
use crate::spec::{self, ArchiveImage, Descriptor, Index, Manifest, Platform};
use crate::tar::{EntryKind, Seekable, TarError, TarLimits, TarReader};

/// Caps on the JSON documents a source reads into memory.
#[derive(Debug, Clone)]
pub struct SourceLimits {
    /// Largest index, manifest or docker-archive `manifest.json`.
    pub max_manifest_bytes: u64,
    /// Largest image config.
    pub max_config_bytes: u64,
    /// Deepest nesting of indexes.
    pub max_index_depth: usize,
    /// Most entries in a docker-archive's outer tar.
    pub max_archive_entries: u64,
}

impl Default for SourceLimits {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 4 << 20,
            max_config_bytes: 16 << 20,
            max_index_depth: 4,
            max_archive_entries: 100_000,
        }
    }
}

/// Errors from finding an image's parts.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad image reference {reference:?}: {why}")]
    BadReference { reference: String, why: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not an OCI image layout (no oci-layout file)")]
    NotLayout { path: PathBuf },
    #[error("{path}: is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: resolves outside the image layout {layout}")]
    OutsideLayout { path: PathBuf, layout: PathBuf },
    #[error("{archive}: entry {name:?} is a {kind}, not a regular file")]
    EntryNotRegular {
        archive: PathBuf,
        name: String,
        kind: &'static str,
    },
    #[error("{what} {name}: {size} bytes, more than the cap of {cap}")]
    TooLarge {
        what: &'static str,
        name: String,
        size: u64,
        cap: u64,
    },
    #[error("{what} {name}: invalid JSON: {source}")]
    Json {
        what: &'static str,
        name: String,
        source: serde_json::Error,
    },
    #[error("{what} {expected}: content has digest {got}")]
    DigestMismatch {
        what: &'static str,
        expected: Digest,
        got: Digest,
    },
    #[error("blob {digest}: {got} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error("no image tagged {tag:?} (tags: {available})")]
    TagNotFound { tag: String, available: String },
    #[error("{count} images and no tag given; name one of: {available}")]
    Ambiguous { count: usize, available: String },
    #[error("no image for {platform} in index {index} (has: {available})")]
    NoPlatform {
        platform: String,
        index: String,
        available: String,
    },
    #[error("{what} {digest}: unsupported media type {media_type:?}")]
    MediaType {
        what: &'static str,
        digest: Digest,
        media_type: String,
    },
    #[error("image indexes nested deeper than {max}")]
    TooDeep { max: usize },
    #[error("{archive}: no entry {name:?}")]
    MissingEntry { archive: PathBuf, name: String },
    #[error("{archive}: {source}")]
    Tar { archive: PathBuf, source: TarError },
    #[error("{archive}: config {name:?} has digest {got}, but its name says otherwise")]
    ConfigName {
        archive: PathBuf,
        name: String,
        got: Digest,
    },
}

/// One layer blob as a source stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    /// The blob's digest, when the source knows it (a docker-archive made
    /// by an older `docker save` names layers by path only; their diff_id
    /// still checks them).
    pub digest: Option<Digest>,
    /// Media type; empty when the source does not say.
    pub media_type: String,
    /// The blob's size, when known.
    pub size: Option<u64>,
    /// Where the source finds it (a path in an archive, a digest).
    pub locator: String,
}

impl fmt::Display for LayerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.digest {
            Some(d) => write!(f, "{d}"),
            None => f.write_str(&self.locator),
        }
    }
}

/// What a source resolved a reference to.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The image's identity: SHA-256 of the manifest bytes (for a
    /// docker-archive, which has no manifest, of the config: the image ID).
    pub image_digest: Digest,
    /// The config JSON, not yet checked against `config_digest`.
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub layers: Vec<LayerRef>,
}

/// Where an image comes from: a few methods a backend provides.
pub trait Source {
    /// The reference, for messages.
    fn describe(&self) -> String;
    /// Finds the image: manifest digest, config bytes, layer blobs.
    fn resolve(
        &mut self,
        platform: &Platform,
        limits: &SourceLimits,
    ) -> Result<Resolved, SourceError>;
    /// Opens a layer blob (as stored: maybe compressed).
    fn open_layer(&mut self, layer: &LayerRef) -> Result<Box<dyn Read + '_>, SourceError>;
}

/// A source named by a string, as the CLI takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// `oci:DIR[:TAG]`
    OciLayout { dir: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE[:REF]` (`REF` a repo tag or `@N`, the N-th image)
    DockerArchive { path: PathBuf, tag: Option<String> },
}

impl FromStr for ImageSource {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, SourceError> {
        let bad = |why: &str| SourceError::BadReference {
            reference: s.to_string(),
            why: why.to_string(),
        };
        let split = |rest: &str| -> Result<(PathBuf, Option<String>), SourceError> {
            // Like skopeo: the path ends at the first colon.
            let (path, tag) = match rest.split_once(':') {
                Some((p, t)) => (p, Some(t.to_string()).filter(|t| !t.is_empty())),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            Ok((PathBuf::from(path), tag))
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split(rest)?;
            Ok(Self::OciLayout { dir, tag })
        } else if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, tag) = split(rest)?;
            Ok(Self::DockerArchive { path, tag })
        } else if s.starts_with("docker://") {
            Err(bad("registry sources are not supported by this build"))
        } else {
            Err(bad("expected oci:DIR[:TAG] or docker-archive:FILE[:REF]"))
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, path, tag) = match self {
            Self::OciLayout { dir, tag } => ("oci", dir, tag),
            Self::DockerArchive { path, tag } => ("docker-archive", path, tag),
        };
        write!(f, "{scheme}:{}", path.display())?;
        if let Some(t) = tag {
            write!(f, ":{t}")?;
        }
        Ok(())
    }
}

impl ImageSource {
    /// Opens the source.
    pub fn open(&self) -> Result<Box<dyn Source>, SourceError> {
        Ok(match self {
            Self::OciLayout { dir, tag } => Box::new(OciLayout::open(dir, tag.clone())?),
            Self::DockerArchive { path, tag } => Box::new(DockerArchive::open(path, tag.clone())?),
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a file type is called in errors.
fn kind_name(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "regular file"
    }
}

/// Opens an `O_PATH` handle (`handle`, for `path`) for reading if it is a regular file. An
/// `O_PATH` handle performs no open of the object itself, so a FIFO or device behind it was
/// never opened; the reopen goes through `/proc/self/fd`, which names the very inode
/// checked, whatever happened to the path meanwhile.
fn reopen_regular(handle: File, path: &Path) -> Result<File, SourceError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let meta = handle.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(SourceError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_name(meta.file_type()),
        });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(io_err(path))
}

/// Opens a file the user named (a docker-archive) for reading, refusing anything but a
/// regular file (following symlinks, which the user may well have made) without blocking.
fn open_regular(path: &Path) -> Result<File, SourceError> {
    use std::os::unix::fs::OpenOptionsExt;
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path))?;
    reopen_regular(handle, path)
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive, so it cannot be built here).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const _: () = assert!(std::mem::size_of::<OpenHow>() == 24);

/// Opens `rel`, a relative path inside the layout directory `root`, for reading. It must
/// resolve beneath `root` (symlinks included) and be a regular file; see the module doc.
fn open_in_layout(root: &Path, rel: &str) -> Result<File, SourceError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join(rel);
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)
        .map_err(io_err(root))?;
    let c_rel = std::ffi::CString::new(Path::new(rel).as_os_str().as_bytes()).map_err(|_| {
        SourceError::Io {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in the name"),
        }
    })?;
    let how = OpenHow {
        flags: u64::try_from(libc::O_PATH | libc::O_CLOEXEC).unwrap_or(0),
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `dir` is an open descriptor for the call's whole duration, `c_rel` is a
    // NUL-terminated string and `how` a valid `open_how` whose size is passed with it; the
    // kernel reads them and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_rel.as_ptr(),
            &raw const how,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            // No openat2 (a kernel before 5.6, or a seccomp filter that hides it).
            Some(libc::ENOSYS) | Some(libc::EPERM) => return open_in_layout_no_symlinks(root, rel),
            // RESOLVE_BENEATH refuses `..` above the root, absolute symlinks and symlinks
            // that lead out.
            Some(libc::EXDEV) | Some(libc::ELOOP) => SourceError::OutsideLayout {
                path,
                layout: root.to_path_buf(),
            },
            _ => SourceError::Io { path, source: err },
        });
    }
    let fd = i32::try_from(fd).map_err(|_| SourceError::Io {
        path: path.clone(),
        source: io::Error::other("openat2 returned an out-of-range descriptor"),
    })?;
    // SAFETY: `fd` was just returned by openat2 and is owned by nothing else.
    let handle = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    reopen_regular(handle, &path)
}

/// [`open_in_layout`] without openat2: every component of `rel` must be a plain directory
/// or, last, a regular file; any symlink on the way is refused, even one that stays inside
/// (the walk cannot tell without resolving it).
fn open_in_layout_no_symlinks(root: &Path, rel: &str) -> Result<File, SourceError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut path = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        if *part == ".." || *part == "." {
            return Err(SourceError::OutsideLayout {
                path: root.join(rel),
                layout: root.to_path_buf(),
            });
        }
        path.push(part);
        if i + 1 < parts.len() {
            let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
            if !meta.is_dir() {
                return Err(SourceError::NotRegular {
                    path,
                    kind: kind_name(meta.file_type()),
                });
            }
        }
    }
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err(&path))?;
    reopen_regular(handle, &path)
}

/// Reads at most `cap` bytes of `r`; more is an error naming `what`.
fn read_capped(
    r: &mut dyn Read,
    cap: u64,
    what: &'static str,
    name: &str,
    path: &Path,
) -> Result<Vec<u8>, SourceError> {
    let mut buf = Vec::new();
    r.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > cap {
        return Err(SourceError::TooLarge {
            what,
            name: name.to_string(),
            size: buf.len() as u64,
            cap,
        });
    }
    Ok(buf)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
    name: &str,
) -> Result<T, SourceError> {
    serde_json::from_slice(bytes).map_err(|source| SourceError::Json {
        what,
        name: name.to_string(),
        source,
    })
}

fn list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn show_platform(p: &Option<Platform>) -> String {
    match p {
        Some(p) => match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        },
        None => "no platform".into(),
    }
}

/// An OCI image layout directory.
#[derive(Debug)]
pub struct OciLayout {
    dir: PathBuf,
    tag: Option<String>,
}

impl OciLayout {
    pub fn open(dir: &Path, tag: Option<String>) -> Result<Self, SourceError> {
        match open_in_layout(dir, "oci-layout") {
            Ok(_) => {}
            Err(SourceError::Io { source, .. })
                if matches!(
                    source.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(SourceError::NotLayout {
                    path: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(e),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            tag,
        })
    }

    fn blob_rel(d: &Digest) -> String {
        format!("blobs/sha256/{}", d.hex())
    }

    /// Reads a small blob whole, checking its digest.
    fn read_blob_unsized(
        &self,
        digest: Digest,
        cap: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, SourceError> {
        let rel = Self::blob_rel(&digest);
        let mut f = open_in_layout(&self.dir, &rel)?;
        let bytes = read_capped(&mut f, cap, what, &digest.to_string(), &self.dir.join(&rel))?;
        let got = Digest::of(&bytes);
        if got != digest {
            return Err(SourceError::DigestMismatch {
                what,
                expected: digest,
                got,
            });
        }
        Ok(bytes)
    }

    /// Reads a small blob whole, checking its size and digest.
    fn read_blob(
        &self,
        d: &Descriptor,
        cap: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, SourceError> {
        if d.size > cap {
            return Err(SourceError::TooLarge {
                what,
                name: d.digest.to_string(),
                size: d.size,
                cap,
            });
        }
        let bytes = self.read_blob_unsized(d.digest, cap, what)?;
        if bytes.len() as u64 != d.size {
            return Err(SourceError::SizeMismatch {
                digest: d.digest,
                expected: d.size,
                got: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// The `index.json` entry the tag names (or the only one, or the one for `platform`).
    fn tagged(
        &self,
        platform: &Platform,
        limits: &SourceLimits,
    ) -> Result<Descriptor, SourceError> {
        let index_path = self.dir.join("index.json");
        let mut f = open_in_layout(&self.dir, "index.json")?;
        let bytes = read_capped(
            &mut f,
            limits.max_manifest_bytes,
            "index",
            "index.json",
            &index_path,
        )?;
        let index: Index = parse_json(&bytes, "index", "index.json")?;
        let tags = || {
            list(
                index
                    .manifests
                    .iter()
                    .filter_map(|d| d.annotations.get(spec::REF_NAME).cloned()),
            )
        };
        let mut candidates: Vec<Descriptor> = match &self.tag {
            Some(tag) => index
                .manifests
                .iter()
                .filter(|d| d.annotations.get(spec::REF_NAME) == Some(tag))
                .cloned()
                .collect(),
            None => index.manifests.clone(),
        };
        if candidates.is_empty() {
            return Err(match &self.tag {
                Some(tag) => SourceError::TagNotFound {
                    tag: tag.clone(),
                    available: tags(),
                },
                None => SourceError::Ambiguous {
                    count: 0,
                    available: "none".into(),
                },
            });
        }
        if candidates.len() > 1 {
            // Several entries (one per platform, or several tags): keep the
            // ones for our platform.
            let count = candidates.len();
            candidates.retain(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)));
            if candidates.is_empty() {
                return Err(if self.tag.is_none() {
                    SourceError::Ambiguous {
                        count,
                        available: tags(),
                    }
                } else {
                    SourceError::NoPlatform {
                        platform: show_platform(&Some(platform.clone())),
                        index: "index.json".into(),
                        available: list(index.manifests.iter().map(|d| show_platform(&d.platform))),
                    }
                });
            }
        }
        Ok(candidates.swap_remove(0))
    }
}

/// Whether a descriptor (or the document it names) is an index.
fn is_index(d: &Descriptor, bytes: &[u8]) -> bool {
    match d.media_type.as_str() {
        spec::OCI_INDEX | spec::DOCKER_MANIFEST_LIST => true,
        spec::OCI_MANIFEST | spec::DOCKER_MANIFEST => false,
        _ => {
            #[derive(serde::Deserialize)]
            struct Probe {
                manifests: Option<serde_json::Value>,
            }
            serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.manifests.is_some())
        }
    }
}

impl Source for OciLayout {
    fn describe(&self) -> String {
        ImageSource::OciLayout {
            dir: self.dir.clone(),
            tag: self.tag.clone(),
        }
        .to_string()
    }

    fn resolve(
        &mut self,
        platform: &Platform,
        limits: &SourceLimits,
    ) -> Result<Resolved, SourceError> {
        let (mut desc, mut bytes) = match self.tag.as_deref().and_then(|t| t.strip_prefix('@')) {
            Some(digest) => {
                let digest: Digest = digest.parse().map_err(|_| SourceError::BadReference {
                    reference: self.describe(),
                    why: format!("{digest:?} is not a sha256:HEX digest"),
                })?;
                let bytes =
                    self.read_blob_unsized(digest, limits.max_manifest_bytes, "manifest")?;
                let desc = Descriptor {
                    media_type: String::new(),
                    digest,
                    size: bytes.len() as u64,
                    platform: None,
                    annotations: Default::default(),
                };
                (desc, bytes)
            }
            None => {
                let desc = self.tagged(platform, limits)?;
                let bytes = self.read_blob(&desc, limits.max_manifest_bytes, "manifest")?;
                (desc, bytes)
            }
        };
        let mut depth = 0;
        let manifest_bytes = loop {
            if !is_index(&desc, &bytes) {
                break bytes;
            }
            depth += 1;
            if depth > limits.max_index_depth {
                return Err(SourceError::TooDeep {
                    max: limits.max_index_depth,
                });
            }
            let inner: Index = parse_json(&bytes, "index", &desc.digest.to_string())?;
            let Some(next) = inner
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
            else {
                return Err(SourceError::NoPlatform {
                    platform: show_platform(&Some(platform.clone())),
                    index: desc.digest.to_string(),
                    available: list(inner.manifests.iter().map(|d| show_platform(&d.platform))),
                });
            };
            desc = next.clone();
            bytes = self.read_blob(&desc, limits.max_manifest_bytes, "manifest")?;
        };
        let manifest: Manifest = parse_json(&manifest_bytes, "manifest", &desc.digest.to_string())?;
        if let Some(mt) = &manifest.media_type
            && mt != spec::OCI_MANIFEST
            && mt != spec::DOCKER_MANIFEST
        {
            return Err(SourceError::MediaType {
                what: "manifest",
                digest: desc.digest,
                media_type: mt.clone(),
            });
        }
        let config = self.read_blob(&manifest.config, limits.max_config_bytes, "config")?;
        Ok(Resolved {
            image_digest: desc.digest,
            config,
            config_digest: manifest.config.digest,
            layers: manifest
                .layers
                .iter()
                .map(|l| LayerRef {
                    digest: Some(l.digest),
                    media_type: l.media_type.clone(),
                    size: Some(l.size),
                    locator: format!("blobs/sha256/{}", l.digest.hex()),
                })
                .collect(),
        })
    }

    fn open_layer(&mut self, layer: &LayerRef) -> Result<Box<dyn Read + '_>, SourceError> {
        Ok(Box::new(open_in_layout(&self.dir, &layer.locator)?))
    }
}

/// A `docker save` (or `skopeo copy … docker-archive:`) tarball.
#[derive(Debug)]
pub struct DockerArchive {
    path: PathBuf,
    tag: Option<String>,
    file: File,
    /// Regular files: name → (data offset, size).
    files: HashMap<String, (u64, u64)>,
    /// Symlinks (older `docker save` links identical layers): name → target.
    links: HashMap<String, String>,
    /// Every other entry (directories, devices, FIFOs, sparse files): name → what it is, so
    /// that naming one as the manifest, config or a layer gets a precise refusal.
    others: HashMap<String, &'static str>,
}

/// Joins `target` to the directory of `name`, lexically.
fn join_rel(name: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        let mut p: Vec<&str> = name.split('/').collect();
        p.pop();
        p
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn clean_name(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    join_rel("", &s)
}

impl DockerArchive {
    pub fn open(path: &Path, tag: Option<String>) -> Result<Self, SourceError> {
        let file = open_regular(path)?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let limits = SourceLimits::default();
        let mut tar = TarReader::new(
            Seekable {
                inner: file.try_clone().map_err(io_err(path))?,
                pos: 0,
                len,
            },
            TarLimits {
                max_headers: limits.max_archive_entries,
                ..TarLimits::default()
            },
        );
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        let mut others = HashMap::new();
        let tar_err = |source| SourceError::Tar {
            archive: path.to_path_buf(),
            source,
        };
        while let Some(e) = tar.next_entry().map_err(tar_err)? {
            let name = clean_name(&e.path);
            match e.kind {
                EntryKind::Regular if e.sparse.is_none() => {
                    files.insert(name, (tar.position(), e.size));
                }
                EntryKind::Symlink => {
                    links.insert(
                        name.clone(),
                        join_rel(&name, &String::from_utf8_lossy(&e.link)),
                    );
                }
                EntryKind::Hardlink => {
                    links.insert(name, clean_name(&e.link));
                }
                kind => {
                    let what = match kind {
                        EntryKind::Regular => "sparse file",
                        EntryKind::Dir => "directory",
                        EntryKind::Fifo => "FIFO",
                        EntryKind::CharDev => "character device",
                        EntryKind::BlockDev => "block device",
                        EntryKind::Hardlink | EntryKind::Symlink => "link",
                    };
                    others.insert(name, what);
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            tag,
            file,
            files,
            links,
            others,
        })
    }

    /// Finds an entry, following links.
    fn entry(&self, name: &str) -> Result<(u64, u64), SourceError> {
        let mut n = clean_name(name.as_bytes());
        for _ in 0..8 {
            if let Some(&e) = self.files.get(&n) {
                return Ok(e);
            }
            if let Some(&kind) = self.others.get(&n) {
                return Err(SourceError::EntryNotRegular {
                    archive: self.path.clone(),
                    name: name.to_string(),
                    kind,
                });
            }
            match self.links.get(&n) {
                Some(t) => n = t.clone(),
                None => break,
            }
        }
        Err(SourceError::MissingEntry {
            archive: self.path.clone(),
            name: name.to_string(),
        })
    }

    fn section(&self, name: &str) -> Result<(Section<'_>, u64), SourceError> {
        let (offset, size) = self.entry(name)?;
        Ok((
            Section {
                file: &self.file,
                pos: offset,
                end: offset + size,
            },
            size,
        ))
    }

    fn read_entry(&self, name: &str, cap: u64, what: &'static str) -> Result<Vec<u8>, SourceError> {
        let (mut s, size) = self.section(name)?;
        if size > cap {
            return Err(SourceError::TooLarge {
                what,
                name: name.to_string(),
                size,
                cap,
            });
        }
        read_capped(&mut s, cap, what, name, &self.path)
    }
}

/// Strips the default registry and namespace a docker reference may carry.
fn short_ref(r: &str) -> &str {
    let r = r.strip_prefix("docker.io/").unwrap_or(r);
    r.strip_prefix("library/").unwrap_or(r)
}

/// The hex digest a docker-archive file name carries, if any
/// (`blobs/sha256/<hex>`, `<hex>.json`, `<hex>/layer.tar` is not one).
fn digest_in_name(name: &str) -> Option<Digest> {
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json"))?;
    format!("sha256:{hex}").parse().ok()
}

impl Source for DockerArchive {
    fn describe(&self) -> String {
        ImageSource::DockerArchive {
            path: self.path.clone(),
            tag: self.tag.clone(),
        }
        .to_string()
    }

    fn resolve(
        &mut self,
        _platform: &Platform,
        limits: &SourceLimits,
    ) -> Result<Resolved, SourceError> {
        let bytes = self.read_entry("manifest.json", limits.max_manifest_bytes, "manifest")?;
        let images: Vec<ArchiveImage> = parse_json(&bytes, "manifest", "manifest.json")?;
        let tags = || {
            list(
                images
                    .iter()
                    .flat_map(|i| i.repo_tags.clone().unwrap_or_default()),
            )
        };
        let image = match &self.tag {
            Some(t) if t.starts_with('@') => t[1..]
                .parse::<usize>()
                .ok()
                .and_then(|i| images.get(i))
                .ok_or_else(|| SourceError::TagNotFound {
                    tag: t.clone(),
                    available: format!("@0..@{}", images.len().saturating_sub(1)),
                })?,
            Some(t) => images
                .iter()
                .find(|i| {
                    i.repo_tags
                        .iter()
                        .flatten()
                        .any(|rt| short_ref(rt) == short_ref(t))
                })
                .ok_or_else(|| SourceError::TagNotFound {
                    tag: t.clone(),
                    available: tags(),
                })?,
            None if images.len() == 1 => &images[0],
            None => {
                return Err(SourceError::Ambiguous {
                    count: images.len(),
                    available: tags(),
                });
            }
        };
        let config = self.read_entry(&image.config, limits.max_config_bytes, "config")?;
        let config_digest = Digest::of(&config);
        if let Some(named) = digest_in_name(&image.config)
            && named != config_digest
        {
            return Err(SourceError::ConfigName {
                archive: self.path.clone(),
                name: image.config.clone(),
                got: config_digest,
            });
        }
        let mut layers = Vec::new();
        for l in &image.layers {
            let (_, size) = self.entry(l)?;
            layers.push(LayerRef {
                digest: digest_in_name(l),
                media_type: String::new(),
                size: Some(size),
                locator: l.clone(),
            });
        }
        Ok(Resolved {
            image_digest: config_digest,
            config,
            config_digest,
            layers,
        })
    }

    fn open_layer(&mut self, layer: &LayerRef) -> Result<Box<dyn Read + '_>, SourceError> {
        let (s, _) = self.section(&layer.locator)?;
        Ok(Box::new(s))
    }
}

/// A byte range of a file, read with positioned reads.
#[derive(Debug)]
struct Section<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!(
            "oci:/a/b:latest".parse::<ImageSource>().unwrap(),
            ImageSource::OciLayout {
                dir: "/a/b".into(),
                tag: Some("latest".into())
            }
        );
        assert_eq!(
            "oci:dir".parse::<ImageSource>().unwrap(),
            ImageSource::OciLayout {
                dir: "dir".into(),
                tag: None
            }
        );
        assert_eq!(
            "docker-archive:x.tar:busybox:1"
                .parse::<ImageSource>()
                .unwrap(),
            ImageSource::DockerArchive {
                path: "x.tar".into(),
                tag: Some("busybox:1".into())
            }
        );
        assert_eq!(
            "docker://r/x"
                .parse::<ImageSource>()
                .unwrap_err()
                .to_string(),
            "bad image reference \"docker://r/x\": registry sources are not supported by this build"
        );
        assert!("oci:".parse::<ImageSource>().is_err());
        assert!("dir".parse::<ImageSource>().is_err());
    }

    /// Runs `f` on another thread and fails the test if it has not returned in 20 s: the
    /// bug these tests guard against is a read that blocks forever.
    fn must_return<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("blocked on a non-regular file")
    }

    fn run(cmd: &str, args: &[&str]) {
        let st = std::process::Command::new(cmd).args(args).status().unwrap();
        assert!(st.success(), "{cmd} {args:?}");
    }

    /// A sample layout, the blob path of `app1`'s manifest and of its top layer.
    fn sample() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        crate::sample::write_sample_family(dir.path()).unwrap();
        let mut src = OciLayout::open(dir.path(), Some("app1".into())).unwrap();
        let r = src
            .resolve(&Platform::linux_amd64(), &SourceLimits::default())
            .unwrap();
        let manifest = dir.path().join(OciLayout::blob_rel(&r.image_digest));
        let layer = dir.path().join(&r.layers.last().unwrap().locator);
        (dir, manifest, layer)
    }

    /// Resolves `app1` and opens every layer, on a watchdog; the first error.
    fn read_app1(dir: &Path) -> Result<(), SourceError> {
        let dir = dir.to_owned();
        must_return(move || {
            let mut src = ImageSource::OciLayout {
                dir,
                tag: Some("app1".into()),
            }
            .open()?;
            let r = src.resolve(&Platform::linux_amd64(), &SourceLimits::default())?;
            for l in &r.layers {
                let mut reader = src.open_layer(l)?;
                std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
            }
            Ok(())
        })
    }

    #[test]
    fn non_regular_layout_files_are_refused_without_blocking() {
        for (name, make) in [
            (
                "FIFO",
                &(|p: &Path| run("mkfifo", &[p.to_str().unwrap()])) as &dyn Fn(&Path),
            ),
            ("character device", &|p: &Path| {
                run("mknod", &[p.to_str().unwrap(), "c", "1", "3"])
            }),
            ("directory", &|p: &Path| fs::create_dir(p).unwrap()),
            ("socket", &|p: &Path| {
                std::mem::forget(std::os::unix::net::UnixListener::bind(p).unwrap());
            }),
        ] {
            // A layer blob, the manifest blob and index.json, each in turn.
            let (dir, manifest, layer) = sample();
            for target in [layer, manifest, dir.path().join("index.json")] {
                fs::remove_file(&target).unwrap();
                make(&target);
                let err = read_app1(dir.path()).unwrap_err();
                assert_eq!(
                    err.to_string(),
                    format!("{}: is a {name}, not a regular file", target.display())
                );
                fs::remove_dir(&target)
                    .or_else(|_| fs::remove_file(&target))
                    .unwrap();
                // Put the layout back for the next target.
                crate::sample::write_sample_family(dir.path()).unwrap();
            }
        }
    }

    use std::fs;

    #[test]
    fn symlinks_may_stay_in_the_layout_but_not_leave_it() {
        let (dir, _, layer) = sample();
        // Inside: a blob that links to a copy elsewhere in the layout is read.
        let keep = dir.path().join("shared");
        fs::create_dir(&keep).unwrap();
        fs::rename(&layer, keep.join("layer")).unwrap();
        std::os::unix::fs::symlink("../../shared/layer", &layer).unwrap();
        read_app1(dir.path()).unwrap();

        // Out: to a file outside, absolute or relative, or a directory of the path.
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        fs::copy(keep.join("layer"), &secret).unwrap();
        for target in [
            secret.display().to_string(),
            format!("../../../{}", secret.display()),
        ] {
            fs::remove_file(&layer).unwrap();
            std::os::unix::fs::symlink(&target, &layer).unwrap();
            assert_eq!(
                read_app1(dir.path()).unwrap_err().to_string(),
                format!(
                    "{}: resolves outside the image layout {}",
                    layer.display(),
                    dir.path().display()
                )
            );
        }
        let blobs = dir.path().join("blobs");
        fs::rename(&blobs, outside.path().join("blobs")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("blobs"), &blobs).unwrap();
        let err = read_app1(dir.path()).unwrap_err().to_string();
        assert!(
            err.ends_with(&format!(
                "resolves outside the image layout {}",
                dir.path().display()
            )),
            "{err}"
        );
    }

    #[test]
    fn the_fallback_without_openat2_refuses_the_same_files() {
        let (dir, manifest, layer) = sample();
        let rel = |p: &Path| {
            p.strip_prefix(dir.path())
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        open_in_layout_no_symlinks(dir.path(), &rel(&layer)).unwrap();
        fs::remove_file(&manifest).unwrap();
        run("mkfifo", &[manifest.to_str().unwrap()]);
        let (root, m) = (dir.path().to_owned(), rel(&manifest));
        let err = must_return(move || open_in_layout_no_symlinks(&root, &m).map(|_| ()));
        assert_eq!(
            err.unwrap_err().to_string(),
            format!("{}: is a FIFO, not a regular file", manifest.display())
        );
        fs::remove_file(&layer).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &layer).unwrap();
        assert_eq!(
            open_in_layout_no_symlinks(dir.path(), &rel(&layer))
                .unwrap_err()
                .to_string(),
            format!("{}: is a symlink, not a regular file", layer.display())
        );
        assert!(matches!(
            open_in_layout_no_symlinks(dir.path(), "blobs/../../x"),
            Err(SourceError::OutsideLayout { .. })
        ));
    }

    #[test]
    fn a_layout_read_by_digest_needs_no_index() {
        let (dir, manifest, _) = sample();
        let hex = manifest.file_name().unwrap().to_str().unwrap().to_owned();
        fs::write(dir.path().join("index.json"), b"not json").unwrap();
        let reference = format!("oci:{}:@sha256:{hex}", dir.path().display());
        let source: ImageSource = reference.parse().unwrap();
        assert_eq!(source.to_string(), reference);
        let r = source
            .open()
            .unwrap()
            .resolve(&Platform::linux_amd64(), &SourceLimits::default())
            .unwrap();
        assert_eq!(r.image_digest.hex(), hex);
        let bad = format!("oci:{}:@sha256:xyz", dir.path().display());
        let err = bad
            .parse::<ImageSource>()
            .unwrap()
            .open()
            .unwrap()
            .resolve(&Platform::linux_amd64(), &SourceLimits::default())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("bad image reference {bad:?}: \"sha256:xyz\" is not a sha256:HEX digest")
        );
    }

    #[test]
    fn docker_archives_and_their_entries_must_be_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("archive.tar");
        run("mkfifo", &[fifo.to_str().unwrap()]);
        let path = fifo.clone();
        let err = must_return(move || DockerArchive::open(&path, None).map(|_| ()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("{}: is a FIFO, not a regular file", fifo.display())
        );

        // manifest.json as a FIFO entry, a layer as a directory entry.
        let tar_path = dir.path().join("bad.tar");
        let mut b = ::tar::Builder::new(fs::File::create(&tar_path).unwrap());
        let mut h = ::tar::Header::new_ustar();
        h.set_entry_type(::tar::EntryType::Fifo);
        h.set_size(0);
        b.append_data(&mut h, "manifest.json", &[][..]).unwrap();
        b.into_inner().unwrap();
        let mut a = DockerArchive::open(&tar_path, None).unwrap();
        let err = a
            .resolve(&Platform::linux_amd64(), &SourceLimits::default())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: entry \"manifest.json\" is a FIFO, not a regular file",
                tar_path.display()
            )
        );
    }

    proptest::proptest! {
        #[test]
        fn source_references_parse_without_panic_and_round_trip(s in "\\PC{0,40}") {
            if let Ok(src) = s.parse::<ImageSource>() {
                let again: ImageSource = src.to_string().parse().unwrap();
                proptest::prop_assert_eq!(again, src);
            }
        }

        #[test]
        fn layout_references_keep_their_tag(
            dir in "[a-z/._-]{1,20}",
            tag in "(@sha256:[0-9a-f]{64}|[A-Za-z0-9._:/@-]{0,30})",
        ) {
            let src: ImageSource = format!("oci:{dir}:{tag}").parse().unwrap();
            let want = ImageSource::OciLayout {
                dir: dir.into(),
                tag: Some(tag).filter(|t| !t.is_empty()),
            };
            proptest::prop_assert_eq!(src, want);
        }
    }

    #[test]
    fn archive_names() {
        assert_eq!(join_rel("a/layer.tar", "../b/layer.tar"), "b/layer.tar");
        assert_eq!(clean_name(b"./manifest.json"), "manifest.json");
        assert_eq!(short_ref("docker.io/library/busybox:1"), "busybox:1");
        assert!(digest_in_name("abc/layer.tar").is_none());
        let hex = "a".repeat(64);
        assert!(digest_in_name(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_in_name(&format!("{hex}.json")).is_some());
    }
}
