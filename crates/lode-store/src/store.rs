//! [`Store`]: chunks, manifests, tags and roots over any `object_store` backend.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use lode_format::{ChunkName, ManifestId, RootId};
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use thiserror::Error;

use crate::location::StoreLocation;
use crate::root::{RootRecord, RootState};

/// The longest tag lode accepts, counted once encoded as an object name (each `/` and
/// other reserved byte becomes `%XX`): a tag is one file name on a local store (255 bytes
/// at most, and object_store stages it under a longer temporary name first), so the cap
/// leaves room for both.
pub const MAX_TAG_BYTES: usize = 160;
/// The largest tag or root object lode reads.
const MAX_SMALL_OBJECT: u64 = 64 * 1024;

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
    /// A tag name lode cannot store.
    #[error("tag {tag:?} is invalid: {reason}")]
    BadTag {
        /// The tag.
        tag: String,
        /// Why.
        reason: &'static str,
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
    /// An object by that name was already there; nothing was uploaded.
    AlreadyPresent,
}

/// A lode store: cheap to clone, safe to share between tasks.
#[derive(Clone, Debug)]
pub struct Store {
    os: Arc<dyn ObjectStore>,
    prefix: Path,
    label: String,
}

impl Store {
    /// Opens the store a user named (see [`StoreLocation`]).
    pub fn open(spec: &str) -> Result<Store, StoreError> {
        let loc = StoreLocation::parse(spec)?;
        let (os, prefix) = loc.connect()?;
        Ok(Store {
            os,
            prefix,
            label: loc.to_string(),
        })
    }

    /// Wraps any object store (tests, embedders).
    pub fn from_object_store(os: Arc<dyn ObjectStore>, prefix: Path, label: String) -> Store {
        Store { os, prefix, label }
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
        self.path([
            "roots".into(),
            PathPart::from(root.to_string()),
            "manifests".into(),
            PathPart::from(id.to_hex()),
        ])
    }

    fn working_set_path(&self, root: RootId, id: &ManifestId) -> Path {
        self.path([
            "roots".into(),
            PathPart::from(root.to_string()),
            "worksets".into(),
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

    fn tag_path(&self, tag: &str) -> Result<Path, StoreError> {
        check_tag(tag)?;
        Ok(self.path(["tags".into(), PathPart::from(tag.to_owned())]))
    }

    fn backend(&self, op: &'static str, object: &Path, source: object_store::Error) -> StoreError {
        StoreError::Backend {
            store: self.label.clone(),
            op,
            object: object.to_string(),
            source: Box::new(source),
        }
    }

    async fn exists(&self, path: &Path) -> Result<bool, StoreError> {
        match self.os.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.backend("head", path, e)),
        }
    }

    /// Creates `path` with `bytes` unless it exists; never overwrites a good object.
    async fn create(&self, path: &Path, bytes: Bytes) -> Result<PutOutcome, StoreError> {
        if self.exists(path).await? {
            return Ok(PutOutcome::AlreadyPresent);
        }
        self.put_create(path, bytes).await
    }

    /// Like [`Store::create`] for a content-addressed object (chunk, manifest), whose
    /// right size is known: an object of another size under the name is damage (a write
    /// torn by a crash on a store without fsync, a truncated copy), so it is replaced
    /// rather than trusted forever. Same-size damage is still caught by every read, which
    /// checks the bytes against the name.
    async fn create_addressed(&self, path: &Path, bytes: Bytes) -> Result<PutOutcome, StoreError> {
        match self.os.head(path).await {
            Ok(meta) if meta.size == bytes.len() as u64 => return Ok(PutOutcome::AlreadyPresent),
            Ok(_) => self
                .os
                .delete(path)
                .await
                .map_err(|e| self.backend("delete damaged", path, e))?,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.backend("head", path, e)),
        }
        self.put_create(path, bytes).await
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

    async fn read(
        &self,
        path: &Path,
        what: &'static str,
        key: String,
    ) -> Result<Bytes, StoreError> {
        let got = match self.os.get(path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound {
                    store: self.label.clone(),
                    what,
                    key,
                });
            }
            Err(e) => return Err(self.backend("get", path, e)),
        };
        got.bytes().await.map_err(|e| self.backend("get", path, e))
    }

    /// Stores a chunk's ciphertext under its name, checking that the bytes hash to it.
    pub async fn put_chunk(
        &self,
        root: RootId,
        name: &ChunkName,
        ciphertext: Bytes,
    ) -> Result<PutOutcome, StoreError> {
        let got = ChunkName::of(&ciphertext);
        if &got != name {
            return Err(StoreError::PutMismatch {
                store: self.label.clone(),
                expected: *name,
                got,
            });
        }
        self.create_addressed(&self.chunk_path(root, name), ciphertext)
            .await
    }

    /// Fetches a chunk's ciphertext and checks it against its name.
    pub async fn get_chunk(&self, root: RootId, name: &ChunkName) -> Result<Bytes, StoreError> {
        let bytes = self
            .read(&self.chunk_path(root, name), "chunk", name.to_hex())
            .await?;
        let got = ChunkName::of(&bytes);
        if &got != name {
            return Err(StoreError::CorruptChunk {
                store: self.label.clone(),
                name: *name,
                got,
            });
        }
        Ok(bytes)
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

    /// Stores manifest bytes under their id; returns the id.
    pub async fn put_manifest(
        &self,
        root: RootId,
        bytes: Bytes,
    ) -> Result<(ManifestId, PutOutcome), StoreError> {
        let id = ManifestId::of(&bytes);
        let outcome = self
            .create_addressed(&self.manifest_path(root, &id), bytes)
            .await?;
        Ok((id, outcome))
    }

    /// Fetches a manifest from a root and checks it against its id.
    pub async fn get_manifest(&self, root: RootId, id: &ManifestId) -> Result<Bytes, StoreError> {
        let bytes = self
            .read(&self.manifest_path(root, id), "manifest", id.to_hex())
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

    /// Finds a manifest in whichever root holds it, newest root first.
    pub async fn find_manifest(&self, id: &ManifestId) -> Result<(RootId, Bytes), StoreError> {
        let mut roots = self.roots().await?;
        roots.sort_by_key(|r| std::cmp::Reverse(r.root));
        for r in roots {
            match self.get_manifest(r.root, id).await {
                Ok(b) => return Ok((r.root, b)),
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::NotFound {
            store: self.label.clone(),
            what: "manifest",
            key: id.to_hex(),
        })
    }

    /// Stores the working-set record of the snapshot `id` (sealed by the caller; see
    /// lode-snap), replacing any earlier one. It lives in the manifest's root, so it goes
    /// when that root is retired.
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

    /// The working-set record of the snapshot `id`, if one was stored.
    pub async fn get_working_set(
        &self,
        root: RootId,
        id: &ManifestId,
    ) -> Result<Option<Bytes>, StoreError> {
        match self
            .read(&self.working_set_path(root, id), "working set", id.to_hex())
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
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

    /// The manifest a tag points at.
    pub async fn get_tag(&self, tag: &str) -> Result<ManifestId, StoreError> {
        let path = self.tag_path(tag)?;
        let bytes = self.read(&path, "tag", format!("{tag:?}")).await?;
        if bytes.len() as u64 > MAX_SMALL_OBJECT {
            return Err(StoreError::CorruptObject {
                store: self.label.clone(),
                object: path.to_string(),
                reason: format!("{} bytes is too large for a tag", bytes.len()),
            });
        }
        let text = std::str::from_utf8(&bytes).unwrap_or("");
        text.trim_end_matches('\n')
            .parse()
            .map_err(
                |e: lode_format::ids::ParseIdError| StoreError::CorruptObject {
                    store: self.label.clone(),
                    object: path.to_string(),
                    reason: e.to_string(),
                },
            )
    }

    /// Every tag and the manifest it points at, sorted by tag.
    pub async fn list_tags(&self) -> Result<Vec<(String, ManifestId)>, StoreError> {
        let prefix = self.path(["tags".into()]);
        let metas: Vec<_> = self
            .os
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.backend("list", &prefix, e))?;
        let mut out = Vec::new();
        for m in metas {
            let Some(part) = m.location.parts().next_back() else {
                continue;
            };
            let tag = percent_decode(part.as_ref());
            out.push((tag.clone(), self.get_tag(&tag).await?));
        }
        out.sort();
        Ok(out)
    }

    /// Every root with its state, sorted by id.
    pub async fn roots(&self) -> Result<Vec<RootRecord>, StoreError> {
        let prefix = self.path(["roots".into()]);
        let listed = self
            .os
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| self.backend("list", &prefix, e))?;
        let mut out = Vec::new();
        for p in listed.common_prefixes {
            let Some(id) = p
                .parts()
                .next_back()
                .and_then(|part| part.as_ref().parse::<u32>().ok())
            else {
                continue;
            };
            match self.get_root(RootId(id)).await {
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

    /// One root's record.
    pub async fn get_root(&self, root: RootId) -> Result<RootRecord, StoreError> {
        let path = self.root_path(root);
        let meta = match self.os.head(&path).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound {
                    store: self.label.clone(),
                    what: "root",
                    key: root.to_string(),
                });
            }
            Err(e) => return Err(self.backend("head", &path, e)),
        };
        let corrupt = |reason: String| StoreError::CorruptObject {
            store: self.label.clone(),
            object: path.to_string(),
            reason,
        };
        if meta.size > MAX_SMALL_OBJECT {
            return Err(corrupt(format!("{} bytes is too large", meta.size)));
        }
        let bytes = self.read(&path, "root", root.to_string()).await?;
        let rec = RootRecord::from_json(&bytes).map_err(corrupt)?;
        if rec.root != root {
            return Err(corrupt(format!("it says it is root {}", rec.root)));
        }
        Ok(rec)
    }

    /// The active root, if the store has one. More than one active root is corruption.
    pub async fn active_root(&self) -> Result<Option<RootRecord>, StoreError> {
        let mut active = self
            .roots()
            .await?
            .into_iter()
            .filter(|r| r.state == RootState::Active);
        let first = active.next();
        if let (Some(a), Some(b)) = (&first, active.next()) {
            return Err(StoreError::CorruptObject {
                store: self.label.clone(),
                object: self.path(["roots".into()]).to_string(),
                reason: format!("roots {} and {} are both active", a.root, b.root),
            });
        }
        Ok(first)
    }

    /// Creates a root record; `AlreadyPresent` if that root exists (another process won).
    pub async fn create_root(&self, rec: &RootRecord) -> Result<PutOutcome, StoreError> {
        self.create(&self.root_path(rec.root), Bytes::from(rec.to_json()))
            .await
    }
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
    fn percent_decoding_reverses_path_encoding() {
        for tag in ["a/b:c", "100%", "x%2", "we~ird[]{}", "ünï"] {
            let part = PathPart::from(tag.to_owned());
            assert_eq!(percent_decode(part.as_ref()), tag, "{tag}");
        }
    }
}
