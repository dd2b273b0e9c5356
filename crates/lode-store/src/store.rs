//! [`Store`]: chunks, manifests, tags and roots over any `object_store` backend.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use lode_format::{ChunkName, ManifestId, ObjectError, RootId, check_object};
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use thiserror::Error;

use crate::alarm::Alarm;
use crate::local::{LocalDir, Refused, StagingFile};
use crate::location::StoreLocation;
use crate::root::{RootRecord, RootState};

mod control;
pub use control::{MAX_CONTROL_LIST, MAX_CONTROL_OBJECT, check_control_key};

/// The longest tag lode accepts, counted once encoded as an object name (each `/` and
/// other reserved byte becomes `%XX`): a tag is one file name on a local store (255 bytes
/// at most, and object_store stages it under a longer temporary name first), so the cap
/// leaves room for both.
pub const MAX_TAG_BYTES: usize = 160;
/// The largest tag object lode reads: a tag holds 64 hex digits and a newline.
pub const MAX_TAG_OBJECT: u64 = 1024;
/// The largest pin object lode reads: a pin holds its manifest's 64 hex digits and a
/// newline.
pub const MAX_PIN_OBJECT: u64 = 1024;
/// The largest root record lode reads.
pub const MAX_ROOT_OBJECT: u64 = 64 * 1024;
/// The largest manifest object lode reads (the manifest format's own cap).
pub const MAX_MANIFEST_OBJECT: u64 = lode_format::manifest::MAX_MANIFEST_BYTES as u64;

/// A store operation failed. Each variant names the store and the object at fault.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store location could not be parsed or opened.
    #[error("store location {spec:?} is invalid: {reason}")]
    BadLocation {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object does not exist.
    #[error("{what} {key} is not in store {store}")]
    NotFound {
        /// The store.
        store: String,
        /// "chunk", "manifest", "tag", …
        what: &'static str,
        /// The name, id or tag.
        key: String,
    },
    /// A chunk's bytes do not hash to its name.
    #[error("chunk {name} in store {store} is corrupt: its bytes hash to {got}")]
    CorruptChunk {
        /// The store.
        store: String,
        /// The chunk.
        name: ChunkName,
        /// SHA-256 of what was read.
        got: ChunkName,
    },
    /// Bytes that hold a chunk's v2 header but are not its whole, sound object (a wrong
    /// length, a segment that does not hash to its row).
    #[error("chunk {name} in store {store} is corrupt: {}", reason.fault())]
    CorruptChunkObject {
        /// The store.
        store: String,
        /// The chunk.
        name: ChunkName,
        /// What is wrong, naming the segment where one is at fault.
        reason: Box<lode_format::ChunkV2Error>,
    },
    /// A put of bytes that hold a chunk's v2 header but are not its whole, sound object.
    #[error("refusing to put chunk {name} into store {store}: {}", reason.fault())]
    PutBadObject {
        /// The store.
        store: String,
        /// The name given.
        name: ChunkName,
        /// What is wrong with the bytes.
        reason: Box<lode_format::ChunkV2Error>,
    },
    /// A manifest's bytes do not hash to its id.
    #[error("manifest {id} in store {store} is corrupt: its bytes hash to {got}")]
    CorruptManifest {
        /// The store.
        store: String,
        /// The manifest.
        id: ManifestId,
        /// SHA-256 of what was read.
        got: ManifestId,
    },
    /// A tag or root object is not what lode writes.
    #[error("{object} in store {store} is corrupt: {reason}")]
    CorruptObject {
        /// The store.
        store: String,
        /// The object's key.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// An object larger than its kind may be, refused before any of it was read.
    #[error(
        "{what} {object} in store {store} is {size} bytes, more than the {max} a {what} may be"
    )]
    TooLarge {
        /// The store.
        store: String,
        /// "chunk", "manifest", "tag", …
        what: &'static str,
        /// The object's key.
        object: String,
        /// The size the backend reported.
        size: u64,
        /// The most lode reads for this kind.
        max: u64,
    },
    /// An object whose body did not match the size its metadata promised.
    #[error(
        "{what} {object} in store {store} changed while read: {size} bytes promised, {got} sent"
    )]
    SizeChanged {
        /// The store.
        store: String,
        /// "chunk", "manifest", "tag", …
        what: &'static str,
        /// The object's key.
        object: String,
        /// The size the backend reported.
        size: u64,
        /// What arrived (counting stops at the first byte too many).
        got: u64,
    },
    /// An object lode will not read: a symbolic link, a FIFO, a device (local stores).
    #[error("{what} {object} in store {store} is refused: {reason}")]
    Unreadable {
        /// The store.
        store: String,
        /// "chunk", "manifest", "tag", …
        what: &'static str,
        /// The object's key.
        object: String,
        /// What it is.
        reason: &'static str,
    },
    /// A put whose bytes do not match the name it was asked under.
    #[error("refusing to put chunk {expected} into store {store}: the bytes hash to {got}")]
    PutMismatch {
        /// The store.
        store: String,
        /// The name given.
        expected: ChunkName,
        /// SHA-256 of the bytes given.
        got: ChunkName,
    },
    /// A conditional write lost: the object changed (or went) since it was read, so
    /// another process advanced it first.
    #[error("{object} in store {store} changed since it was read: another process wrote it first")]
    Conflict {
        /// The store.
        store: String,
        /// The object's key.
        object: String,
    },
    /// A manifest that is gone from its root, copied forward under another id.
    #[error(
        "manifest {id} is no longer in store {store}: it was copied forward from root {root} \
         as manifest {to}; use that id (tags were moved to it)"
    )]
    Forwarded {
        /// The store.
        store: String,
        /// The id asked for.
        id: ManifestId,
        /// The root it was in.
        root: RootId,
        /// The id it was copied forward as.
        to: ManifestId,
    },
    /// A tag name lode cannot store.
    #[error("tag {tag:?} is invalid: {reason}")]
    BadTag {
        /// The tag.
        tag: String,
        /// Why.
        reason: &'static str,
    },
    /// A control record key lode cannot store.
    #[error("control key {key:?} is invalid: {reason}")]
    BadControlKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// A local store's staging files could not be listed or removed.
    #[error("store {store}: staging file {key:?}: {source}")]
    Staging {
        /// The store.
        store: String,
        /// The staging file (empty when listing failed).
        key: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A read of a chunk or manifest asked of a store working put-only ([`Store::put_only`]):
    /// refused before any request is made, so a put-only process provably reads no image
    /// bytes.
    #[error(
        "store {store} is working put-only (a flattener's credentials): reading {what} {key} \
         is not allowed"
    )]
    PutOnly {
        /// The store.
        store: String,
        /// "chunk", "manifest".
        what: &'static str,
        /// The name or id asked for.
        key: String,
    },
    /// The backend failed (network, permissions, disk).
    #[error("store {store}: {op} {object} failed: {source}")]
    Backend {
        /// The store.
        store: String,
        /// "get", "put", "list", …
        op: &'static str,
        /// The object key or prefix.
        object: String,
        /// What the backend said.
        source: Box<object_store::Error>,
    },
}

/// Whether a put stored new bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was new and is now stored.
    Stored,
    /// An object by that name was already there and held the right bytes; nothing was
    /// uploaded.
    AlreadyPresent,
    /// An object by that name was there but damaged (wrong size or bytes that do not hash
    /// to its name); it was removed and the good bytes stored.
    Repaired,
}

/// The alarms of one root (see [`Store::list_alarms`]).
#[derive(Debug, Default)]
pub struct AlarmList {
    /// Alarms that parsed.
    pub alarms: Vec<Alarm>,
    /// Alarm objects that did not: their key and why.
    pub bad: Vec<(String, String)>,
}

impl AlarmList {
    /// How many alarm objects there are, readable or not.
    pub fn len(&self) -> usize {
        self.alarms.len() + self.bad.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What an object under `roots/<root>/` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootObjectKind {
    /// The ROOT record.
    Record,
    /// A chunk.
    Chunk,
    /// A manifest.
    Manifest,
    /// A snapshot working set.
    WorkingSet,
    /// A forwarding record.
    Forward,
    /// A read alarm.
    Alarm,
    /// Anything else (lode writes nothing else there).
    Other,
}

impl RootObjectKind {
    /// Whether a deleted root keeps objects of this kind: its record (so the id is never
    /// used again and readers learn the root is gone) and its forwarding records (so a
    /// reader holding an old manifest id is still told where it went).
    pub fn kept_after_deletion(self) -> bool {
        matches!(self, RootObjectKind::Record | RootObjectKind::Forward)
    }
}

/// One object under a root.
#[derive(Clone, Debug)]
pub struct RootObject {
    /// Its key in the backend.
    pub key: Path,
    /// What it is.
    pub kind: RootObjectKind,
    /// Its size in bytes.
    pub size: u64,
}

/// A lode store: cheap to clone, safe to share between tasks.
#[derive(Clone, Debug)]
pub struct Store {
    os: Arc<dyn ObjectStore>,
    prefix: Path,
    label: String,
    /// The directory backend, when the store is one (for its staging files).
    local: Option<LocalDir>,
    /// Whether chunks and manifests are only ever created, never read (see
    /// [`Store::put_only`]).
    put_only: bool,
}

impl Store {
    /// Opens the store a user named (see [`StoreLocation`]).
    pub fn open(spec: &str) -> Result<Store, StoreError> {
        let loc = StoreLocation::parse(spec)?;
        let (os, prefix, local) = loc.connect()?;
        Ok(Store {
            os,
            prefix,
            label: loc.to_string(),
            local,
            put_only: false,
        })
    }

    /// Wraps any object store (tests, embedders).
    pub fn from_object_store(os: Arc<dyn ObjectStore>, prefix: Path, label: String) -> Store {
        Store {
            os,
            prefix,
            label,
            local: None,
            put_only: false,
        }
    }

    /// The same store, working put-only: what a flattener does with credentials that may
    /// put chunks, manifests and tags but read no object's bytes. A chunk or manifest is
    /// created by a conditional put that refuses an existing name (S3's `If-None-Match:
    /// *`, a local directory's atomic create), and a name already there counts as present
    /// (deduplicated); no chunk or manifest is ever fetched or probed (GET or HEAD), and a
    /// read of one is refused with [`StoreError::PutOnly`] before any request is made.
    ///
    /// What is given up: the read-back that replaces a damaged object already under the
    /// name (see [`Store::put_chunk`]). Readers still detect damage (names are hashes, and
    /// the AEAD tag fails), and `lode verify --repair`, with read credentials, removes a
    /// damaged chunk so that the next publish uploads it again.
    pub fn put_only(mut self) -> Store {
        self.put_only = true;
        self
    }

    /// Whether the store works put-only ([`Store::put_only`]).
    pub fn is_put_only(&self) -> bool {
        self.put_only
    }

    /// Refuses, when working put-only, a read (GET or HEAD) of an object under a root's
    /// `chunks/` or `manifests/`: the one check every read of the store passes through.
    fn readable(&self, path: &Path, key: impl FnOnce() -> String) -> Result<(), StoreError> {
        if !self.put_only {
            return Ok(());
        }
        let depth = self.prefix.parts().count();
        let mut parts = path.parts().skip(depth);
        let under_root = parts.next().is_some_and(|p| p.as_ref() == "roots");
        let kind = parts.nth(1);
        let what = match kind.as_ref().map(|p| p.as_ref()) {
            Some("chunks") if under_root => "chunk",
            Some("manifests") if under_root => "manifest",
            _ => return Ok(()),
        };
        Err(StoreError::PutOnly {
            store: self.label.clone(),
            what,
            key: key(),
        })
    }

    /// Where the store is, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn path<'a>(&'a self, parts: impl IntoIterator<Item = PathPart<'a>>) -> Path {
        self.prefix.parts().chain(parts).collect()
    }

    fn chunk_path(&self, root: RootId, name: &ChunkName) -> Path {
        let hex = name.to_hex();
        self.path([
            "roots".into(),
            PathPart::from(root.to_string()),
            "chunks".into(),
            PathPart::from(hex[..2].to_owned()),
            PathPart::from(hex),
        ])
    }

    fn manifest_path(&self, root: RootId, id: &ManifestId) -> Path {
        self.per_manifest(root, "manifests", id)
    }

    fn working_set_path(&self, root: RootId, id: &ManifestId) -> Path {
        self.per_manifest(root, "worksets", id)
    }

    /// `roots/<root>/<dir>/<manifest id>`: the objects kept per manifest of a root.
    fn per_manifest(&self, root: RootId, dir: &'static str, id: &ManifestId) -> Path {
        self.path([
            "roots".into(),
            PathPart::from(root.to_string()),
            dir.into(),
            PathPart::from(id.to_hex()),
        ])
    }

    fn root_path(&self, root: RootId) -> Path {
        self.path([
            "roots".into(),
            PathPart::from(root.to_string()),
            "ROOT".into(),
        ])
    }

    fn pin_path(&self, id: &ManifestId) -> Path {
        self.path(["pins".into(), PathPart::from(id.to_hex())])
    }

    fn forward_path(&self, root: RootId, id: &ManifestId) -> Path {
        self.per_manifest(root, "forwards", id)
    }

    fn alarm_path(&self, root: RootId, id: &ManifestId) -> Path {
        self.per_manifest(root, "alarms", id)
    }

    fn tag_path(&self, tag: &str) -> Result<Path, StoreError> {
        check_tag(tag)?;
        Ok(self.path(["tags".into(), PathPart::from(tag.to_owned())]))
    }

    fn backend(&self, op: &'static str, object: &Path, source: object_store::Error) -> StoreError {
        if let object_store::Error::Generic { source: inner, .. } = &source
            && let Some(refused) = inner.downcast_ref::<Refused>()
        {
            return StoreError::Unreadable {
                store: self.label.clone(),
                what: "object",
                object: object.to_string(),
                reason: refused.what,
            };
        }
        StoreError::Backend {
            store: self.label.clone(),
            op,
            object: object.to_string(),
            source: Box::new(source),
        }
    }

    async fn exists(&self, path: &Path) -> Result<bool, StoreError> {
        self.readable(path, || path.to_string())?;
        match self.os.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.backend("head", path, e)),
        }
    }

    /// Creates a content-addressed object (chunk, manifest, pin, forward), whose bytes are
    /// known exactly, unless a good one is there. An object already under the name is read
    /// back (bounded by the right size) and compared: its size alone proves nothing, as a
    /// flipped bit or a tail of zeros keeps the size. Damage — other bytes, another size,
    /// a link or special file — is removed and the good bytes stored
    /// ([`PutOutcome::Repaired`]), so a republish heals the store instead of naming the
    /// damage again. Working put-only, the create alone decides: an object already under
    /// the name is taken as present, unread.
    async fn create_addressed(
        &self,
        path: &Path,
        bytes: Bytes,
        what: &'static str,
    ) -> Result<PutOutcome, StoreError> {
        if self.put_only {
            return self.put_create(path, bytes).await;
        }
        let damaged = match self
            .read(path, what, path.to_string(), bytes.len() as u64)
            .await
        {
            Ok(existing) if existing == bytes => return Ok(PutOutcome::AlreadyPresent),
            Ok(_) => true,
            Err(StoreError::NotFound { .. }) => false,
            Err(
                StoreError::TooLarge { .. }
                | StoreError::SizeChanged { .. }
                | StoreError::Unreadable { .. },
            ) => true,
            Err(e) => return Err(e),
        };
        if damaged {
            match self.os.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend("delete damaged", path, e)),
            }
        }
        match self.put_create(path, bytes).await? {
            PutOutcome::Stored if damaged => Ok(PutOutcome::Repaired),
            outcome => Ok(outcome),
        }
    }

    async fn put_create(&self, path: &Path, bytes: Bytes) -> Result<PutOutcome, StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .os
            .put_opts(path, PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(_) => Ok(PutOutcome::Stored),
            // Someone stored the same name meanwhile: the same bytes, by construction.
            Err(object_store::Error::AlreadyExists { .. }) => Ok(PutOutcome::AlreadyPresent),
            Err(e) => Err(self.backend("put", path, e)),
        }
    }

    /// Reads an object of at most `max` bytes. The size the backend reports is checked
    /// before any byte is read, and the body is counted as it arrives, stopping at the
    /// first byte beyond that size: an oversized or growing object costs no allocation
    /// beyond `max`. `key` names the object in a not-found message.
    async fn read(
        &self,
        path: &Path,
        what: &'static str,
        key: String,
        max: u64,
    ) -> Result<Bytes, StoreError> {
        Ok(self.read_versioned(path, what, key, max).await?.0)
    }

    /// [`Store::read`], with the version (e-tag) of what was read, for a conditional
    /// write that must find the object unchanged.
    async fn read_versioned(
        &self,
        path: &Path,
        what: &'static str,
        key: String,
        max: u64,
    ) -> Result<(Bytes, UpdateVersion), StoreError> {
        self.readable(path, || key.clone())?;
        let got = match self.os.get(path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound {
                    store: self.label.clone(),
                    what,
                    key,
                });
            }
            Err(e) => return Err(self.read_error(what, path, e)),
        };
        let size = got.meta.size;
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        if size > max {
            return Err(StoreError::TooLarge {
                store: self.label.clone(),
                what,
                object: path.to_string(),
                size,
                max,
            });
        }
        let changed = |got: u64| StoreError::SizeChanged {
            store: self.label.clone(),
            what,
            object: path.to_string(),
            size,
            got,
        };
        // `size` is at most `max`, which callers keep to what one object of the kind may be.
        let mut buf = BytesMut::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut body = got.into_stream();
        while let Some(piece) = body
            .try_next()
            .await
            .map_err(|e| self.read_error(what, path, e))?
        {
            let total = (buf.len() + piece.len()) as u64;
            if total > size {
                return Err(changed(total));
            }
            buf.extend_from_slice(&piece);
        }
        if buf.len() as u64 != size {
            return Err(changed(buf.len() as u64));
        }
        Ok((buf.freeze(), version))
    }

    fn read_error(&self, what: &'static str, path: &Path, e: object_store::Error) -> StoreError {
        match self.backend("get", path, e) {
            StoreError::Unreadable {
                store,
                object,
                reason,
                ..
            } => StoreError::Unreadable {
                store,
                what,
                object,
                reason,
            },
            other => other,
        }
    }

    /// Stores a chunk's object under its name, checking that the bytes are that object in
    /// either format (`lode_format::check_object`: v1 bytes hash to the name, a v2
    /// header hashes to it and lists every segment's hash). An
    /// object already there is checked too, and replaced if damaged (not when working
    /// put-only: see [`Store::put_only`]).
    pub async fn put_chunk(
        &self,
        root: RootId,
        name: &ChunkName,
        ciphertext: Bytes,
    ) -> Result<PutOutcome, StoreError> {
        match check_object(name, &ciphertext) {
            Ok(_) => {}
            Err(ObjectError::V2(reason)) => {
                return Err(StoreError::PutBadObject {
                    store: self.label.clone(),
                    name: *name,
                    reason: Box::new(reason),
                });
            }
            Err(_) => {
                return Err(StoreError::PutMismatch {
                    store: self.label.clone(),
                    expected: *name,
                    got: ChunkName::of(&ciphertext),
                });
            }
        }
        self.create_addressed(&self.chunk_path(root, name), ciphertext, "chunk")
            .await
    }

    /// Fetches a chunk's object and checks it against its name, in either format. `max_bytes` is the
    /// most the chunk may be (its plaintext length plus the seal's overhead): a larger
    /// object is refused before it is read.
    pub async fn get_chunk(
        &self,
        root: RootId,
        name: &ChunkName,
        max_bytes: u64,
    ) -> Result<Bytes, StoreError> {
        let bytes = self.get_chunk_unchecked(root, name, max_bytes).await?;
        match check_object(name, &bytes) {
            Ok(_) => Ok(bytes),
            Err(ObjectError::V2(reason)) => Err(StoreError::CorruptChunkObject {
                store: self.label.clone(),
                name: *name,
                reason: Box::new(reason),
            }),
            Err(_) => Err(StoreError::CorruptChunk {
                store: self.label.clone(),
                name: *name,
                got: ChunkName::of(&bytes),
            }),
        }
    }

    /// Fetches a chunk's object without checking it against its name, for a reader that
    /// checks it itself, piece by piece (the read path checks a v2 object's header and
    /// the segment a read waits for first). `max_bytes` bounds it as in
    /// [`get_chunk`](Self::get_chunk). Everyone else calls `get_chunk`.
    pub async fn get_chunk_unchecked(
        &self,
        root: RootId,
        name: &ChunkName,
        max_bytes: u64,
    ) -> Result<Bytes, StoreError> {
        self.read(
            &self.chunk_path(root, name),
            "chunk",
            name.to_hex(),
            max_bytes,
        )
        .await
    }

    /// Removes a chunk object if it is damaged (does not hash to its name, is larger than
    /// `max_bytes`, or is not a regular file), so that the next publish of an image that
    /// holds the chunk uploads it again. Re-reads it first: a chunk repaired meanwhile by
    /// a publisher is left alone. Returns whether it removed anything.
    pub async fn remove_damaged_chunk(
        &self,
        root: RootId,
        name: &ChunkName,
        max_bytes: u64,
    ) -> Result<bool, StoreError> {
        match self.get_chunk(root, name, max_bytes).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(false),
            Err(
                StoreError::CorruptChunk { .. }
                | StoreError::CorruptChunkObject { .. }
                | StoreError::TooLarge { .. }
                | StoreError::SizeChanged { .. }
                | StoreError::Unreadable { .. },
            ) => {
                let path = self.chunk_path(root, name);
                match self.os.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
                    Err(e) => Err(self.backend("delete damaged", &path, e)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Whether a chunk is stored (without reading it).
    pub async fn has_chunk(&self, root: RootId, name: &ChunkName) -> Result<bool, StoreError> {
        self.exists(&self.chunk_path(root, name)).await
    }

    /// Every chunk of a root, with its stored size.
    pub async fn list_chunks(&self, root: RootId) -> Result<Vec<(ChunkName, u64)>, StoreError> {
        self.list_named(root, "chunks", "chunk").await
    }

    /// Lists `roots/<root>/<dir>/`, parsing each object's file name as an id: anything
    /// else under a content-addressed prefix is corruption, named.
    async fn list_named<T: std::str::FromStr<Err = lode_format::ids::ParseIdError>>(
        &self,
        root: RootId,
        dir: &'static str,
        what: &'static str,
    ) -> Result<Vec<(T, u64)>, StoreError> {
        let prefix = self.path(["roots".into(), PathPart::from(root.to_string()), dir.into()]);
        let metas: Vec<_> = self
            .os
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.backend("list", &prefix, e))?;
        metas
            .into_iter()
            .map(|m| {
                let id = m
                    .location
                    .filename()
                    .unwrap_or_default()
                    .parse::<T>()
                    .map_err(|e| StoreError::CorruptObject {
                        store: self.label.clone(),
                        object: m.location.to_string(),
                        reason: format!("not a {what}: {e}"),
                    })?;
                Ok((id, m.size))
            })
            .collect()
    }

    /// Stores manifest bytes under their id; returns the id. An object already there is
    /// checked, and replaced if damaged (not when working put-only).
    pub async fn put_manifest(
        &self,
        root: RootId,
        bytes: Bytes,
    ) -> Result<(ManifestId, PutOutcome), StoreError> {
        let id = ManifestId::of(&bytes);
        let outcome = self
            .create_addressed(&self.manifest_path(root, &id), bytes, "manifest")
            .await?;
        Ok((id, outcome))
    }

    /// Fetches a manifest from a root and checks it against its id. At most
    /// [`MAX_MANIFEST_OBJECT`] bytes are read.
    pub async fn get_manifest(&self, root: RootId, id: &ManifestId) -> Result<Bytes, StoreError> {
        let bytes = self
            .read(
                &self.manifest_path(root, id),
                "manifest",
                id.to_hex(),
                MAX_MANIFEST_OBJECT,
            )
            .await?;
        let got = ManifestId::of(&bytes);
        if &got != id {
            return Err(StoreError::CorruptManifest {
                store: self.label.clone(),
                id: *id,
                got,
            });
        }
        Ok(bytes)
    }

    /// Finds a manifest in whichever root holds it, newest root first. One that is in
    /// no root but was copied forward is [`StoreError::Forwarded`], naming its new id.
    pub async fn find_manifest(&self, id: &ManifestId) -> Result<(RootId, Bytes), StoreError> {
        let mut roots = self.roots().await?;
        roots.sort_by_key(|r| std::cmp::Reverse(r.root));
        for r in &roots {
            match self.get_manifest(r.root, id).await {
                Ok(b) => return Ok((r.root, b)),
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        for r in &roots {
            if let Some(to) = self.get_forward(r.root, id).await? {
                return Err(StoreError::Forwarded {
                    store: self.label.clone(),
                    id: *id,
                    root: r.root,
                    to,
                });
            }
        }
        Err(StoreError::NotFound {
            store: self.label.clone(),
            what: "manifest",
            key: id.to_hex(),
        })
    }

    /// Stores the working-set record of the snapshot or image `id` (sealed by the
    /// caller; see lode-snap and lode-format's `workset`), replacing any earlier one. It
    /// lives in the manifest's root, so it goes when that root is retired.
    pub async fn put_working_set(
        &self,
        root: RootId,
        id: &ManifestId,
        bytes: Bytes,
    ) -> Result<(), StoreError> {
        let path = self.working_set_path(root, id);
        self.os
            .put(&path, PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| self.backend("put", &path, e))?;
        Ok(())
    }

    /// The working-set record of the snapshot `id`, if one was stored; one larger than
    /// `max_bytes` (what the snapshot's size allows) is refused unread.
    pub async fn get_working_set(
        &self,
        root: RootId,
        id: &ManifestId,
        max_bytes: u64,
    ) -> Result<Option<Bytes>, StoreError> {
        match self
            .read(
                &self.working_set_path(root, id),
                "working set",
                id.to_hex(),
                max_bytes,
            )
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the working-set record stored beside manifest `id` in `root`; whether
    /// there was one. Removing one that is not there is not an error.
    pub async fn remove_working_set(
        &self,
        root: RootId,
        id: &ManifestId,
    ) -> Result<bool, StoreError> {
        let path = self.working_set_path(root, id);
        match self.os.head(&path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(self.backend("head", &path, e)),
        }
        match self.os.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(self.backend("delete", &path, e)),
        }
    }

    /// Every manifest id in a root.
    pub async fn list_manifests(&self, root: RootId) -> Result<Vec<ManifestId>, StoreError> {
        let named = self.list_named(root, "manifests", "manifest").await?;
        Ok(named.into_iter().map(|(id, _)| id).collect())
    }

    /// Points `tag` at a manifest, replacing what it pointed at (tags are mutable).
    pub async fn set_tag(&self, tag: &str, id: &ManifestId) -> Result<(), StoreError> {
        let path = self.tag_path(tag)?;
        let body = Bytes::from(format!("{}\n", id.to_hex()));
        self.os
            .put(&path, PutPayload::from_bytes(body))
            .await
            .map_err(|e| self.backend("put", &path, e))?;
        Ok(())
    }

    /// The manifest a tag points at. The tag object is read only if it is at most
    /// [`MAX_TAG_OBJECT`] bytes, and a malformed one is described, never echoed (its
    /// bytes may be anything, a host file's among them).
    pub async fn get_tag(&self, tag: &str) -> Result<ManifestId, StoreError> {
        let path = self.tag_path(tag)?;
        let bytes = self
            .read(&path, "tag", format!("{tag:?}"), MAX_TAG_OBJECT)
            .await?;
        parse_tag_body(&bytes).map_err(|reason| StoreError::CorruptObject {
            store: self.label.clone(),
            object: path.to_string(),
            reason: reason.to_owned(),
        })
    }

    /// The manifest a tag points at and the version of the tag object, for
    /// [`Store::update_tag`].
    pub async fn get_tag_versioned(
        &self,
        tag: &str,
    ) -> Result<(ManifestId, ObjectVersion), StoreError> {
        let path = self.tag_path(tag)?;
        let (bytes, version) = self
            .read_versioned(&path, "tag", format!("{tag:?}"), MAX_TAG_OBJECT)
            .await?;
        let id = parse_tag_body(&bytes).map_err(|reason| StoreError::CorruptObject {
            store: self.label.clone(),
            object: path.to_string(),
            reason: reason.to_owned(),
        })?;
        Ok((id, ObjectVersion(version)))
    }

    /// Points `tag` at `id` only if the tag object is still the version `read`
    /// (compare-and-swap); [`StoreError::Conflict`] if it changed.
    pub async fn update_tag(
        &self,
        tag: &str,
        id: &ManifestId,
        read: &ObjectVersion,
    ) -> Result<(), StoreError> {
        let path = self.tag_path(tag)?;
        self.put_if_unchanged(&path, Bytes::from(format!("{}\n", id.to_hex())), read)
            .await
    }

    /// Records that manifest `id` of `root` was copied forward as `to`, so that a
    /// reader holding `id` can be told where it went. Re-recording is harmless.
    pub async fn put_forward(
        &self,
        root: RootId,
        id: &ManifestId,
        to: &ManifestId,
    ) -> Result<(), StoreError> {
        let body = Bytes::from(format!("{}\n", to.to_hex()));
        self.create_addressed(&self.forward_path(root, id), body, "forward")
            .await?;
        Ok(())
    }

    /// Where manifest `id` of `root` was copied forward to, if it was (at most
    /// [`MAX_TAG_OBJECT`] bytes are read; a malformed record is named, never quoted).
    pub async fn get_forward(
        &self,
        root: RootId,
        id: &ManifestId,
    ) -> Result<Option<ManifestId>, StoreError> {
        let path = self.forward_path(root, id);
        let bytes = match self
            .read(&path, "forward", id.to_hex(), MAX_TAG_OBJECT)
            .await
        {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        parse_tag_body(&bytes)
            .map(Some)
            .map_err(|reason| StoreError::CorruptObject {
                store: self.label.clone(),
                object: path.to_string(),
                reason: reason.to_owned(),
            })
    }

    /// Removes `tag`; returns the manifest it pointed at. A tag that is not there is
    /// [`StoreError::NotFound`]; one that cannot be read (malformed, oversized) is removed
    /// all the same, as removing it is what its owner asked.
    pub async fn remove_tag(&self, tag: &str) -> Result<Option<ManifestId>, StoreError> {
        let path = self.tag_path(tag)?;
        let named = match self.get_tag(tag).await {
            Ok(id) => Some(id),
            Err(e @ StoreError::NotFound { .. }) => return Err(e),
            Err(_) => None,
        };
        self.delete(&path, "tag", format!("{tag:?}")).await?;
        Ok(named)
    }

    /// Deletes one object; [`StoreError::NotFound`] if it was not there.
    async fn delete(&self, path: &Path, what: &'static str, key: String) -> Result<(), StoreError> {
        // object_store's local backend and S3 both treat deleting a missing object as
        // success, so its presence is checked first: the answer tells the user whether
        // the name they gave meant anything.
        if !self.exists(path).await? {
            return Err(StoreError::NotFound {
                store: self.label.clone(),
                what,
                key,
            });
        }
        match self.os.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("delete", path, e)),
        }
    }

    /// Pins a manifest, so it stays live without a tag. `AlreadyPresent` if it was
    /// pinned already (a damaged pin object is replaced).
    pub async fn put_pin(&self, id: &ManifestId) -> Result<PutOutcome, StoreError> {
        let body = Bytes::from(format!("{}\n", id.to_hex()));
        self.create_addressed(&self.pin_path(id), body, "pin").await
    }

    /// Whether a readable pin holds `id`. A pin object that is not what lode writes is
    /// an error naming it (it pins nothing lode can prove).
    pub async fn has_pin(&self, id: &ManifestId) -> Result<bool, StoreError> {
        let path = self.pin_path(id);
        let bytes = match self.read(&path, "pin", id.to_hex(), MAX_PIN_OBJECT).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        parse_pin_body(&id.to_hex(), &bytes)
            .map(|_| true)
            .map_err(|reason| StoreError::CorruptObject {
                store: self.label.clone(),
                object: path.to_string(),
                reason: reason.to_owned(),
            })
    }

    /// Removes the pin of `id`; [`StoreError::NotFound`] if there was none.
    pub async fn remove_pin(&self, id: &ManifestId) -> Result<(), StoreError> {
        self.delete(&self.pin_path(id), "pin", id.to_hex()).await
    }

    /// Every pinned manifest, sorted. A pin object that cannot be read or parsed is set
    /// aside with its error, named by its object key (never its bytes).
    pub async fn list_pins(&self) -> Result<PinList, StoreError> {
        let prefix = self.path(["pins".into()]);
        let metas: Vec<_> = self
            .os
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.backend("list", &prefix, e))?;
        let mut out = PinList::default();
        for m in metas {
            let name = m.location.filename().unwrap_or_default().to_owned();
            let read = self
                .read(&m.location, "pin", name.clone(), MAX_PIN_OBJECT)
                .await
                .and_then(|bytes| {
                    parse_pin_body(&name, &bytes).map_err(|reason| StoreError::CorruptObject {
                        store: self.label.clone(),
                        object: m.location.to_string(),
                        reason: reason.to_owned(),
                    })
                });
            match read {
                Ok(id) => out.pins.push(id),
                Err(error) => out.bad.push(BadPin {
                    object: m.location.to_string(),
                    error,
                }),
            }
        }
        out.pins.sort();
        out.bad.sort_by(|a, b| a.object.cmp(&b.object));
        Ok(out)
    }

    /// Removes a manifest from `root` (and the snapshot working set stored beside it).
    /// Whether it may go is the caller's judgement (lode-image's liveness); the store
    /// only deletes. [`StoreError::NotFound`] if the root does not hold it.
    pub async fn remove_manifest(&self, root: RootId, id: &ManifestId) -> Result<(), StoreError> {
        self.delete(&self.manifest_path(root, id), "manifest", id.to_hex())
            .await?;
        let ws = self.working_set_path(root, id);
        match self.os.delete(&ws).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("delete", &ws, e)),
        }
    }

    /// Every tag and the manifest it points at, sorted by tag. A tag that cannot be read
    /// (malformed, oversized, a link) is set aside with its error rather than failing the
    /// listing; only a failure to list at all is an error.
    pub async fn list_tags(&self) -> Result<TagList, StoreError> {
        let prefix = self.path(["tags".into()]);
        let metas: Vec<_> = self
            .os
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.backend("list", &prefix, e))?;
        let mut out = TagList::default();
        for m in metas {
            let Some(part) = m.location.parts().next_back() else {
                continue;
            };
            let tag = percent_decode(part.as_ref());
            match self.get_tag(&tag).await {
                Ok(id) => out.tags.push((tag, id)),
                Err(error) => out.bad.push(BadTag { tag, error }),
            }
        }
        out.tags.sort();
        out.bad.sort_by(|a, b| a.tag.cmp(&b.tag));
        Ok(out)
    }

    /// The ids of every `roots/<n>/` prefix, sorted, whether or not it holds a ROOT
    /// object (a consistency check reads each record on its own).
    pub async fn root_ids(&self) -> Result<Vec<RootId>, StoreError> {
        let prefix = self.path(["roots".into()]);
        let listed = self
            .os
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| self.backend("list", &prefix, e))?;
        let mut ids: Vec<RootId> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.parts().next_back()?.as_ref().parse::<u32>().ok())
            .map(RootId)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every root with its state, sorted by id.
    pub async fn roots(&self) -> Result<Vec<RootRecord>, StoreError> {
        let mut out = Vec::new();
        for id in self.root_ids().await? {
            match self.get_root(id).await {
                Ok(r) => out.push(r),
                // A root directory without its ROOT object is one whose creation has not
                // finished (or a stray prefix): it holds nothing lode wrote.
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|r| r.root);
        Ok(out)
    }

    /// One root's record (at most [`MAX_ROOT_OBJECT`] bytes are read).
    pub async fn get_root(&self, root: RootId) -> Result<RootRecord, StoreError> {
        Ok(self.get_root_versioned(root).await?.0)
    }

    /// One root's record and the version it was read at, for [`Store::update_root`].
    pub async fn get_root_versioned(
        &self,
        root: RootId,
    ) -> Result<(RootRecord, ObjectVersion), StoreError> {
        let path = self.root_path(root);
        let corrupt = |reason: String| StoreError::CorruptObject {
            store: self.label.clone(),
            object: path.to_string(),
            reason,
        };
        let (bytes, version) = self
            .read_versioned(&path, "root", root.to_string(), MAX_ROOT_OBJECT)
            .await?;
        let rec = RootRecord::from_json(&bytes).map_err(corrupt)?;
        if rec.root != root {
            return Err(corrupt(format!("it says it is root {}", rec.root)));
        }
        Ok((rec, ObjectVersion(version)))
    }

    /// Replaces a root record only if it is still the version `read` (a conditional
    /// write: S3's `If-Match`, a local store's e-tag checked under a directory lock), so
    /// of processes advancing a root from one state, exactly one succeeds; the others get
    /// [`StoreError::Conflict`]. Where the backend cannot write conditionally the write
    /// is refused, never done unconditionally.
    pub async fn update_root(
        &self,
        rec: &RootRecord,
        read: &ObjectVersion,
    ) -> Result<(), StoreError> {
        self.put_if_unchanged(&self.root_path(rec.root), Bytes::from(rec.to_json()), read)
            .await
    }

    async fn put_if_unchanged(
        &self,
        path: &Path,
        bytes: Bytes,
        read: &ObjectVersion,
    ) -> Result<(), StoreError> {
        let opts = PutOptions {
            mode: PutMode::Update(read.0.clone()),
            ..Default::default()
        };
        match self
            .os
            .put_opts(path, PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => Err(StoreError::Conflict {
                store: self.label.clone(),
                object: path.to_string(),
            }),
            Err(e) => Err(self.backend("conditional put", path, e)),
        }
    }
    /// The active root, if the store has one. More than one active root is corruption.
    /// A record that cannot be read is an error unless a readable root above it is
    /// active: roots are made in order, each after the one below was retired, so a root
    /// below the active one is not active, and its damaged record (a fault of that root,
    /// which the collector reports) stops neither publishers nor copy-forward.
    pub async fn active_root(&self) -> Result<Option<RootRecord>, StoreError> {
        let mut readable = Vec::new();
        let mut highest_unreadable = None;
        for id in self.root_ids().await? {
            match self.get_root(id).await {
                Ok(r) => readable.push(r),
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => highest_unreadable = Some((id, e)),
            }
        }
        let active = self.active_among(&readable).map(|a| a.cloned());
        match (highest_unreadable, active) {
            (None, active) => active,
            (Some((id, _)), Ok(Some(a))) if id < a.root => Ok(Some(a)),
            (Some((_, e)), _) => Err(e),
        }
    }

    /// The active root among `roots` (one listing, so that a caller deciding what to do
    /// next judges a single view of the store). More than one active root is corruption.
    pub fn active_among<'r>(
        &self,
        roots: &'r [RootRecord],
    ) -> Result<Option<&'r RootRecord>, StoreError> {
        let mut active = roots.iter().filter(|r| r.state == RootState::Active);
        let first = active.next();
        if let (Some(a), Some(b)) = (first, active.next()) {
            return Err(StoreError::CorruptObject {
                store: self.label.clone(),
                object: self.path(["roots".into()]).to_string(),
                reason: format!("roots {} and {} are both active", a.root, b.root),
            });
        }
        Ok(first)
    }

    /// Creates a root record; `AlreadyPresent` if that root exists (another process won).
    /// The create is atomic where the backend's conditional put is (a local directory,
    /// S3): of racing creators exactly one stores its record.
    pub async fn create_root(&self, rec: &RootRecord) -> Result<PutOutcome, StoreError> {
        self.put_create(&self.root_path(rec.root), Bytes::from(rec.to_json()))
            .await
    }

    /// Every root id with its record, or the error reading it (a corrupt record is one
    /// root's problem: a collector reports it and goes on with the others). A root
    /// directory without a ROOT object is left out, as in [`Store::roots`].
    pub async fn root_records(
        &self,
    ) -> Result<Vec<(RootId, Result<(RootRecord, ObjectVersion), StoreError>)>, StoreError> {
        let mut out = Vec::new();
        for id in self.root_ids().await? {
            match self.get_root_versioned(id).await {
                Err(StoreError::NotFound { .. }) => continue,
                r => out.push((id, r)),
            }
        }
        Ok(out)
    }

    /// Records that `alarm.manifest` of `root` was read after the root expired. The
    /// first alarm per manifest is kept (an atomic create; later ones find it there), so
    /// the alarms of a root are bounded by its manifests.
    pub async fn put_alarm(&self, root: RootId, alarm: &Alarm) -> Result<PutOutcome, StoreError> {
        self.put_create(
            &self.alarm_path(root, &alarm.manifest),
            Bytes::from(alarm.to_json()),
        )
        .await
    }

    /// The alarms raised on `root`, sorted by manifest. An alarm object that cannot be
    /// read or parsed is still an alarm (it halts deletion): it comes back as its object
    /// key and the reason, never its bytes.
    pub async fn list_alarms(&self, root: RootId) -> Result<AlarmList, StoreError> {
        let metas = self.list_alarm_objects(root).await?;
        let mut out = AlarmList::default();
        for m in metas {
            let name = m.location.filename().unwrap_or_default().to_owned();
            let read = self
                .read(&m.location, "alarm", name, MAX_TAG_OBJECT)
                .await
                .and_then(|bytes| {
                    Alarm::from_json(&bytes).map_err(|reason| StoreError::CorruptObject {
                        store: self.label.clone(),
                        object: m.location.to_string(),
                        reason: reason.to_owned(),
                    })
                });
            match read {
                Ok(a) => out.alarms.push(a),
                Err(error) => out.bad.push((m.location.to_string(), error.to_string())),
            }
        }
        out.alarms.sort_by_key(|a| a.manifest);
        out.bad.sort();
        Ok(out)
    }

    async fn list_alarm_objects(
        &self,
        root: RootId,
    ) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let prefix = self.path([
            "roots".into(),
            PathPart::from(root.to_string()),
            "alarms".into(),
        ]);
        self.os
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.backend("list", &prefix, e))
    }

    /// Removes every alarm object of `root`; returns how many there were.
    pub async fn clear_alarms(&self, root: RootId) -> Result<usize, StoreError> {
        let metas = self.list_alarm_objects(root).await?;
        for m in &metas {
            match self.os.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.backend("delete", &m.location, e)),
            }
        }
        Ok(metas.len())
    }

    /// Every object under `root`, with what it is and its size: what deleting the root
    /// removes, and what it keeps ([`RootObjectKind::kept_after_deletion`]).
    pub async fn root_contents(&self, root: RootId) -> Result<Vec<RootObject>, StoreError> {
        let prefix = self.path(["roots".into(), PathPart::from(root.to_string())]);
        let metas: Vec<_> = self
            .os
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.backend("list", &prefix, e))?;
        let depth = prefix.parts().count();
        let mut out: Vec<RootObject> = metas
            .into_iter()
            .map(|m| {
                let kind = match m.location.parts().nth(depth).as_ref().map(|p| p.as_ref()) {
                    Some("ROOT") => RootObjectKind::Record,
                    Some("chunks") => RootObjectKind::Chunk,
                    Some("manifests") => RootObjectKind::Manifest,
                    Some("worksets") => RootObjectKind::WorkingSet,
                    Some("forwards") => RootObjectKind::Forward,
                    Some("alarms") => RootObjectKind::Alarm,
                    _ => RootObjectKind::Other,
                };
                RootObject {
                    key: m.location,
                    kind,
                    size: m.size,
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes one object [`Store::root_contents`] listed. Deleting one already gone is
    /// not an error (a collector resuming after a crash meets those).
    pub async fn delete_root_object(&self, obj: &RootObject) -> Result<(), StoreError> {
        match self.os.delete(&obj.key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("delete", &obj.key, e)),
        }
    }

    /// Staging files a killed writer left in a local store (`<object>#<n>`, which no
    /// listing shows), with their age; none for other backends, whose puts are single
    /// requests that either store an object or not.
    pub async fn staging_files(&self) -> Result<Vec<StagingFile>, StoreError> {
        let Some(local) = self.local.clone() else {
            return Ok(Vec::new());
        };
        let label = self.label.clone();
        tokio::task::spawn_blocking(move || local.staging_files())
            .await
            .map_err(|e| StoreError::Staging {
                store: label.clone(),
                key: String::new(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| StoreError::Staging {
                store: self.label.clone(),
                key: String::new(),
                source,
            })
    }

    /// Removes one staging file found by [`Store::staging_files`].
    pub async fn remove_staging(&self, key: &str) -> Result<(), StoreError> {
        let Some(local) = self.local.clone() else {
            return Ok(());
        };
        let owned = key.to_owned();
        tokio::task::spawn_blocking(move || local.remove_staging(&owned))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| StoreError::Staging {
                store: self.label.clone(),
                key: key.to_owned(),
                source,
            })
    }
}

/// The version of an object as read (a root record, a tag): what a conditional update
/// ([`Store::update_root`], [`Store::update_tag`]) requires to find.
#[derive(Clone, Debug)]
pub struct ObjectVersion(UpdateVersion);

/// What [`Store::list_tags`] found.
#[derive(Debug, Default)]
pub struct TagList {
    /// Readable tags and the manifests they name, sorted by tag.
    pub tags: Vec<(String, ManifestId)>,
    /// Tags that could not be read, sorted by tag.
    pub bad: Vec<BadTag>,
}

/// A tag that could not be read, and why.
#[derive(Debug)]
pub struct BadTag {
    /// The tag.
    pub tag: String,
    /// Why (the message names the object, never its bytes).
    pub error: StoreError,
}

/// What [`Store::list_pins`] found.
#[derive(Debug, Default)]
pub struct PinList {
    /// Pinned manifests, sorted.
    pub pins: Vec<ManifestId>,
    /// Pin objects that could not be read, sorted by object.
    pub bad: Vec<BadPin>,
}

/// A pin object that could not be read, and why.
#[derive(Debug)]
pub struct BadPin {
    /// The object's key.
    pub object: String,
    /// Why (the message names the object, never its bytes).
    pub error: StoreError,
}

/// Parses the pin object named `name` (the last part of its key): its name must be a
/// manifest id and its body that id in lowercase hex and an optional newline, so a pin
/// copied or renamed by hand pins nothing. The reason for a refusal never repeats the
/// bytes or the name.
pub fn parse_pin_body(name: &str, bytes: &[u8]) -> Result<ManifestId, &'static str> {
    let named: ManifestId = match name.parse() {
        Ok(id) if name.bytes().all(|b| !b.is_ascii_uppercase()) => id,
        _ => return Err("its name is not a manifest id (64 lowercase hex digits)"),
    };
    let held = parse_tag_body(bytes)
        .map_err(|_| "it does not hold a manifest id (64 lowercase hex digits and a newline)")?;
    if held != named {
        return Err("it holds another manifest's id than the one it is named by");
    }
    Ok(named)
}

/// Parses a tag object: 64 lowercase hex digits, then an optional newline. The reason for
/// a refusal describes the bytes without repeating them.
pub fn parse_tag_body(bytes: &[u8]) -> Result<ManifestId, &'static str> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if body.len() != 64 {
        return Err("it does not hold a manifest id (64 hex digits and a newline)");
    }
    if !body.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("it holds something other than 64 lowercase hex digits");
    }
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("it holds something other than 64 lowercase hex digits")
}

fn check_tag(tag: &str) -> Result<(), StoreError> {
    let bad = |reason| StoreError::BadTag {
        tag: tag.chars().take(300).collect(),
        reason,
    };
    if tag.is_empty() {
        return Err(bad("it is empty"));
    }
    if PathPart::from(tag).as_ref().len() > MAX_TAG_BYTES {
        return Err(bad(
            "it is longer than 160 bytes once encoded ('/' counts 3)",
        ));
    }
    if tag.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("it contains whitespace or control characters"));
    }
    if tag == "." || tag == ".." {
        return Err(bad("'.' and '..' are not tags"));
    }
    Ok(())
}

/// Reverses object_store's percent-encoding of a path part.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            // Two hex digits make at most 0xff.
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked_and_named() {
        assert!(check_tag("docker.io/library/python:3.12").is_ok());
        let e = check_tag("a b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tag \"a b\" is invalid: it contains whitespace or control characters"
        );
        assert!(check_tag("").is_err());
        assert!(check_tag(&"x".repeat(160)).is_ok());
        assert!(check_tag(&"x".repeat(161)).is_err());
        assert!(check_tag(&"a/".repeat(40)).is_ok());
        assert!(check_tag(&"a/".repeat(41)).is_err());
        assert!(check_tag("..").is_err());
    }

    #[test]
    fn tag_bodies() {
        let id = ManifestId::of(b"m");
        assert_eq!(parse_tag_body(format!("{id}\n").as_bytes()), Ok(id));
        assert_eq!(parse_tag_body(id.to_hex().as_bytes()), Ok(id));
        assert!(parse_tag_body(format!("{id}\n\n").as_bytes()).is_err());
        assert!(parse_tag_body(id.to_hex().to_uppercase().as_bytes()).is_err());
        assert!(parse_tag_body(b"").is_err());
    }

    proptest::proptest! {
        /// Any bytes: an id exactly when they are one in lowercase hex (and a newline),
        /// else a refusal that never contains the input.
        #[test]
        fn tag_parser_accepts_only_ids_and_never_echoes(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            id in proptest::prelude::any::<[u8; 32]>(),
            newline in proptest::prelude::any::<bool>(),
        ) {
            match parse_tag_body(&raw) {
                Ok(got) => {
                    let body = raw.strip_suffix(b"\n").unwrap_or(&raw);
                    let hex = got.to_hex();
                    proptest::prop_assert_eq!(hex.as_bytes(), body);
                }
                Err(reason) => {
                    let text = String::from_utf8_lossy(&raw);
                    proptest::prop_assert!(text.len() < 4 || !reason.contains(text.as_ref()));
                }
            }
            let id = ManifestId::from_bytes(id);
            let body = if newline { format!("{id}\n") } else { id.to_hex() };
            proptest::prop_assert_eq!(parse_tag_body(body.as_bytes()), Ok(id));
        }
    }

    #[tokio::test]
    async fn a_working_set_is_put_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let (root, id) = (RootId(1), ManifestId::of(b"m"));
        assert!(!store.remove_working_set(root, &id).await.unwrap());
        store
            .put_working_set(root, &id, Bytes::from_static(b"sealed"))
            .await
            .unwrap();
        let got = store.get_working_set(root, &id, 100).await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"sealed"[..]));
        assert!(store.remove_working_set(root, &id).await.unwrap());
        assert_eq!(store.get_working_set(root, &id, 100).await.unwrap(), None);
    }

    #[test]
    fn pin_bodies() {
        let id = ManifestId::of(b"m");
        let name = id.to_hex();
        assert_eq!(parse_pin_body(&name, format!("{id}\n").as_bytes()), Ok(id));
        assert_eq!(parse_pin_body(&name, name.as_bytes()), Ok(id));
        assert_eq!(
            parse_pin_body(&name, format!("{}\n", ManifestId::of(b"n")).as_bytes()),
            Err("it holds another manifest's id than the one it is named by")
        );
        assert_eq!(
            parse_pin_body(&name.to_uppercase(), name.as_bytes()),
            Err("its name is not a manifest id (64 lowercase hex digits)")
        );
        assert_eq!(
            parse_pin_body(&name, b"hunter2"),
            Err("it does not hold a manifest id (64 lowercase hex digits and a newline)")
        );
    }

    proptest::proptest! {
        /// Any name and bytes: an id exactly when the name is one and the body holds it,
        /// else a refusal that repeats neither.
        #[test]
        fn pin_parser_accepts_only_its_own_id_and_never_echoes(
            name in ".{0,80}",
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            id in proptest::prelude::any::<[u8; 32]>(),
        ) {
            match parse_pin_body(&name, &raw) {
                Ok(got) => {
                    proptest::prop_assert_eq!(got.to_hex(), name.clone());
                    proptest::prop_assert_eq!(parse_tag_body(&raw), Ok(got));
                }
                Err(reason) => {
                    let text = String::from_utf8_lossy(&raw);
                    proptest::prop_assert!(text.len() < 4 || !reason.contains(text.as_ref()));
                    proptest::prop_assert!(name.len() < 4 || !reason.contains(&name));
                }
            }
            let id = ManifestId::from_bytes(id);
            let hex = id.to_hex();
            proptest::prop_assert_eq!(parse_pin_body(&hex, format!("{hex}\n").as_bytes()), Ok(id));
        }
    }

    /// Working put-only, chunks and manifests are created or found present, never read:
    /// an object already under the name counts as present even when damaged (the
    /// read-back repair is what is given up), and a read of one is refused by name
    /// before any request.
    #[tokio::test]
    async fn put_only_creates_and_never_reads_chunks_or_manifests() {
        let mem = Arc::new(object_store::memory::InMemory::new());
        let open = || Store::from_object_store(mem.clone(), Path::from("p"), "memory:".into());
        let store = open().put_only();
        assert!(store.is_put_only() && !open().is_put_only());
        let root = RootId(1);
        let bytes = Bytes::from_static(b"a sealed chunk");
        let name = ChunkName::of(&bytes);
        let put = |b: Bytes| {
            let store = store.clone();
            async move { store.put_chunk(root, &name, b).await.unwrap() }
        };
        assert_eq!(put(bytes.clone()).await, PutOutcome::Stored);
        assert_eq!(put(bytes.clone()).await, PutOutcome::AlreadyPresent);

        let path = store.chunk_path(root, &name);
        mem.put(&path, PutPayload::from_static(b"damaged"))
            .await
            .unwrap();
        assert_eq!(put(bytes.clone()).await, PutOutcome::AlreadyPresent);
        let held = mem.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&held[..], b"damaged");

        let refused = |what: &str, key: String| {
            format!(
                "store memory: is working put-only (a flattener's credentials): reading \
                 {what} {key} is not allowed"
            )
        };
        let e = store.get_chunk(root, &name, 1024).await.unwrap_err();
        assert_eq!(e.to_string(), refused("chunk", name.to_hex()));
        assert!(matches!(
            store.has_chunk(root, &name).await,
            Err(StoreError::PutOnly { what: "chunk", .. })
        ));

        let manifest = Bytes::from_static(b"a manifest");
        let (id, outcome) = store.put_manifest(root, manifest.clone()).await.unwrap();
        assert_eq!(outcome, PutOutcome::Stored);
        let (_, again) = store.put_manifest(root, manifest).await.unwrap();
        assert_eq!(again, PutOutcome::AlreadyPresent);
        let e = store.get_manifest(root, &id).await.unwrap_err();
        assert_eq!(e.to_string(), refused("manifest", id.to_hex()));

        // Tags and root records are not image bytes: a put-only store still reads them.
        store.set_tag("t", &id).await.unwrap();
        assert_eq!(store.get_tag("t").await.unwrap(), id);
        // With reads allowed, the same store repairs the damaged chunk.
        assert_eq!(
            open().put_chunk(root, &name, bytes).await.unwrap(),
            PutOutcome::Repaired
        );
    }

    #[test]
    fn percent_decoding_reverses_path_encoding() {
        for tag in ["a/b:c", "100%", "x%2", "we~ird[]{}", "ünï"] {
            let part = PathPart::from(tag.to_owned());
            assert_eq!(percent_decode(part.as_ref()), tag, "{tag}");
        }
    }
}
