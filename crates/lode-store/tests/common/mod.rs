//! The one conformance suite: every backend a [`Store`] runs on must pass
//! [`conformance`]. Each test binary supplies a store and, where it can reach the backend's
//! storage directly, a [`Backdoor`] to tamper with objects behind lode's back and to see the
//! object layout as the backend holds it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::future::join_all;
use lode_format::{
    ChunkName, ManifestId, RootId, RootSalt, SegmentSize, WrappedKey, seal_chunk_v2,
};
use lode_store::{PutOutcome, RootRecord, RootState, Store, StoreError};

/// The bound the suite reads chunks with: above every chunk it stores.
pub const MAX_CHUNK: u64 = 1 << 20;

/// What a malformed object planted behind lode's back holds; no message may repeat it.
const PLANTED_SECRET: &str = "root:$6$saltsalt$hunter2hashedpassword:19000:0:99999:7:::";

/// SHA-256("abc"), FIPS 180-2 appendix B.1: names are SHA-256, not some other hash.
const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

/// The tag whose encoded object name the layout check pins down.
const DOCKER_TAG: &str = "docker.io/library/python:3.12";
const DOCKER_TAG_KEY: &str = "tags/docker.io%2Flibrary%2Fpython:3.12";

/// Tags that exercise the encoding of object names: '/', ':', '@', '%', unicode.
const AWKWARD_TAGS: &[&str] = &[
    DOCKER_TAG,
    "x%41",
    "ünï@sha256",
    "registry:5000/a/b@sha256:0123",
    "100%",
    "%2F",
    "a//b",
    "...",
    "we~ird[]{}^|`#?*<>\"\\",
];

/// A root whose directory holds stray objects lode did not write (listings must name them).
const STRAY_ROOT: u32 = 11;

/// Direct access to the backend's storage, bypassing lode.
pub trait Backdoor {
    /// Writes `bytes` at `key` (relative to the store's prefix), replacing what is there.
    fn overwrite(&self, key: &str, bytes: &[u8]);
    /// Something that changes whenever the object at `key` is rewritten; `None` if absent.
    fn stamp(&self, key: &str) -> Option<String>;
    /// Every object the backend holds under the store's prefix, relative to it.
    fn keys(&self) -> BTreeSet<String>;
    /// Whether racing creates of one name store it exactly once (the backend's create is
    /// atomic rather than check-then-write).
    fn atomic_create(&self) -> bool;
}

/// A backend whose objects are files under a directory (a local store, s3s-fs's bucket).
#[derive(Debug)]
pub struct DirBackdoor {
    /// Where the object with key `k` is the file `dir/k`.
    pub dir: PathBuf,
    /// See [`Backdoor::atomic_create`].
    pub atomic_create: bool,
}

impl Backdoor for DirBackdoor {
    fn overwrite(&self, key: &str, bytes: &[u8]) {
        let path = self.dir.join(key);
        std::fs::create_dir_all(path.parent().expect("a key has a parent")).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }

    fn stamp(&self, key: &str) -> Option<String> {
        let m = std::fs::metadata(self.dir.join(key)).ok()?;
        Some(format!(
            "dev {} ino {} mtime {}.{:09} ctime {}.{:09} size {}",
            m.dev(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.size()
        ))
    }

    fn keys(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        walk(&self.dir, &self.dir, &mut out);
        out
    }

    fn atomic_create(&self) -> bool {
        self.atomic_create
    }
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let e = e.unwrap();
        let path = e.path();
        if e.file_type().unwrap().is_dir() {
            walk(base, &path, out);
        } else {
            let rel = path.strip_prefix(base).unwrap();
            out.insert(rel.to_str().expect("object names are UTF-8").to_owned());
        }
    }
}

/// Runs the whole suite against a fresh, empty store.
///
/// `prefix` is the key prefix the store writes under, as it appears in messages
/// (`""` or `"some/prefix/"`). Checks that need `raw` are skipped without it.
pub async fn conformance(store: &Store, prefix: &str, raw: Option<&dyn Backdoor>) {
    let t = Suite {
        store,
        prefix,
        raw,
        label: store.label().to_owned(),
    };
    t.fresh_store_is_empty().await;
    t.layout().await;
    t.roots().await;
    t.chunks().await;
    t.v2_chunks().await;
    t.empty_chunk().await;
    t.chunk_listing().await;
    t.manifests().await;
    t.tags().await;
    t.pins_and_removals().await;
    t.racing_puts().await;
    t.readers_never_see_partial_chunks().await;
    t.stray_objects_are_named().await;
    t.only_final_names();
    t.conditional_root_updates().await;
    // Last: a corrupt ROOT makes roots() fail from here on.
    t.corrupt_roots().await;
}

struct Suite<'a> {
    store: &'a Store,
    prefix: &'a str,
    raw: Option<&'a dyn Backdoor>,
    label: String,
}

fn root(id: u32, state: RootState, key_id: &str, blob: &[u8]) -> RootRecord {
    RootRecord {
        root: RootId(id),
        state,
        salt: WrappedKey {
            key_id: key_id.to_owned(),
            blob: blob.to_vec(),
        },
        since: None,
    }
}

/// Deterministic bytes that do not compress or repeat.
fn bytes_for(seed: u64, len: usize) -> Bytes {
    Bytes::from(lode_testkit::seeded_bytes(len, seed))
}

fn chunk_key(root: u32, name: &ChunkName) -> String {
    let hex = name.to_hex();
    format!("roots/{root}/chunks/{}/{hex}", &hex[..2])
}

fn manifest_key(root: u32, id: &ManifestId) -> String {
    format!("roots/{root}/manifests/{}", id.to_hex())
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

#[track_caller]
fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

impl Suite<'_> {
    async fn fresh_store_is_empty(&self) {
        let s = self.store;
        assert_eq!(s.roots().await.unwrap(), vec![]);
        assert_eq!(s.active_root().await.unwrap(), None);
        assert_eq!(s.list_tags().await.unwrap().tags, vec![]);
        assert_eq!(s.list_chunks(RootId(1)).await.unwrap(), vec![]);
        assert_eq!(s.list_manifests(RootId(1)).await.unwrap(), vec![]);
        let id = ManifestId::of(b"nowhere");
        let e = s.find_manifest(&id).await.unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("manifest {id} is not in store {}", self.label)
        );
        if let Some(raw) = self.raw {
            assert_eq!(raw.keys(), BTreeSet::new());
        }
    }

    /// One of each object, and exactly these keys in the backend.
    async fn layout(&self) {
        let s = self.store;
        let rec = root(1, RootState::Active, "default", &[0, 1, 2, 0xff, 0]);
        assert_eq!(s.create_root(&rec).await.unwrap(), PutOutcome::Stored);
        let chunk = Bytes::from_static(b"layout chunk");
        let name = ChunkName::of(&chunk);
        assert_eq!(
            s.put_chunk(RootId(1), &name, chunk).await.unwrap(),
            PutOutcome::Stored
        );
        let (id, outcome) = s
            .put_manifest(RootId(1), Bytes::from_static(b"layout manifest"))
            .await
            .unwrap();
        assert_eq!(outcome, PutOutcome::Stored);
        s.set_tag(DOCKER_TAG, &id).await.unwrap();

        if let Some(raw) = self.raw {
            let want: BTreeSet<String> = [
                "roots/1/ROOT".to_owned(),
                chunk_key(1, &name),
                manifest_key(1, &id),
                DOCKER_TAG_KEY.to_owned(),
            ]
            .into();
            assert_eq!(raw.keys(), want);
        }
    }

    async fn roots(&self) {
        let s = self.store;
        let r1 = root(1, RootState::Active, "default", &[0, 1, 2, 0xff, 0]);
        assert_eq!(s.get_root(RootId(1)).await.unwrap(), r1);
        assert_eq!(s.roots().await.unwrap(), vec![r1.clone()]);
        assert_eq!(s.active_root().await.unwrap(), Some(r1.clone()));

        // Creating an existing root never overwrites it, whatever the new record says.
        let stamp = self.raw.map(|r| r.stamp("roots/1/ROOT"));
        assert_eq!(
            s.create_root(&r1).await.unwrap(),
            PutOutcome::AlreadyPresent
        );
        let rival = root(1, RootState::Retired, "other-kms-key", b"rival");
        assert_eq!(
            s.create_root(&rival).await.unwrap(),
            PutOutcome::AlreadyPresent
        );
        assert_eq!(s.get_root(RootId(1)).await.unwrap(), r1);
        if let Some(raw) = self.raw {
            assert_eq!(Some(raw.stamp("roots/1/ROOT")), stamp);
        }

        let e = s.get_root(RootId(7)).await.unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("root 7 is not in store {}", self.label)
        );

        let r2 = root(2, RootState::Retired, "default", b"");
        assert_eq!(s.create_root(&r2).await.unwrap(), PutOutcome::Stored);
        let r10 = root(10, RootState::Expired, "k10", &[10; 40]);
        assert_eq!(s.create_root(&r10).await.unwrap(), PutOutcome::Stored);
        // Sorted by number, not by key ("roots/10" lists before "roots/2").
        assert_eq!(
            s.roots().await.unwrap(),
            vec![r1.clone(), r2.clone(), r10.clone()]
        );
        assert_eq!(s.active_root().await.unwrap(), Some(r1.clone()));

        let r3 = root(3, RootState::Active, "default", b"three");
        assert_eq!(s.create_root(&r3).await.unwrap(), PutOutcome::Stored);
        assert_eq!(s.roots().await.unwrap(), vec![r1, r2, r3, r10]);
        let e = s.active_root().await.unwrap_err();
        assert!(matches!(e, StoreError::CorruptObject { .. }), "{e:?}");
        assert_mentions(
            &e.to_string(),
            &["roots 1 and 3 are both active", &self.label],
        );
    }

    async fn chunks(&self) {
        let s = self.store;
        let r = RootId(1);
        assert_eq!(ChunkName::of(b"abc").to_hex(), SHA256_ABC);

        let data = bytes_for(1, 100_000);
        let name = ChunkName::of(&data);
        assert!(!s.has_chunk(r, &name).await.unwrap());
        let e = s.get_chunk(r, &name, MAX_CHUNK).await.unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("chunk {name} is not in store {}", self.label)
        );

        assert_eq!(
            s.put_chunk(r, &name, data.clone()).await.unwrap(),
            PutOutcome::Stored
        );
        assert!(s.has_chunk(r, &name).await.unwrap());
        assert_eq!(s.get_chunk(r, &name, MAX_CHUNK).await.unwrap(), data);
        // Roots are separate namespaces.
        assert!(!s.has_chunk(RootId(2), &name).await.unwrap());

        // A second put of the same name uploads nothing and rewrites nothing.
        let key = chunk_key(1, &name);
        let before = self
            .raw
            .map(|raw| raw.stamp(&key).expect("the chunk is stored"));
        assert_eq!(
            s.put_chunk(r, &name, data.clone()).await.unwrap(),
            PutOutcome::AlreadyPresent
        );
        if let Some(raw) = self.raw {
            assert_eq!(raw.stamp(&key), before, "the second put rewrote {key}");
        }
        assert_eq!(s.get_chunk(r, &name, MAX_CHUNK).await.unwrap(), data);
        assert_eq!(
            s.put_chunk(RootId(2), &name, data.clone()).await.unwrap(),
            PutOutcome::Stored
        );

        // Bytes that do not hash to the name are refused, and nothing is stored.
        let claimed = ChunkName::of(b"what the caller said");
        let e = s.put_chunk(r, &claimed, data.clone()).await.unwrap_err();
        match &e {
            StoreError::PutMismatch { expected, got, .. } => {
                assert_eq!(expected, &claimed);
                assert_eq!(got, &name);
            }
            other => panic!("expected PutMismatch, got {other:?}"),
        }
        assert_eq!(
            e.to_string(),
            format!(
                "refusing to put chunk {claimed} into store {}: the bytes hash to {name}",
                self.label
            )
        );
        assert!(!s.has_chunk(r, &claimed).await.unwrap());
        assert!(matches!(
            s.get_chunk(r, &claimed, MAX_CHUNK).await,
            Err(StoreError::NotFound { .. })
        ));
        if let Some(raw) = self.raw {
            assert_eq!(raw.stamp(&chunk_key(1, &claimed)), None);
        }

        // Bytes altered behind lode's back are caught on the way out.
        let Some(raw) = self.raw else { return };
        let victim = bytes_for(2, 4096);
        let vname = ChunkName::of(&victim);
        s.put_chunk(r, &vname, victim).await.unwrap();
        let tampered = b"tampered with on disk";
        raw.overwrite(&chunk_key(1, &vname), tampered);
        let got_name = ChunkName::of(tampered);
        let e = s.get_chunk(r, &vname, MAX_CHUNK).await.unwrap_err();
        match &e {
            StoreError::CorruptChunk { name, got, .. } => {
                assert_eq!(name, &vname);
                assert_eq!(got, &got_name);
            }
            other => panic!("expected CorruptChunk, got {other:?}"),
        }
        assert_eq!(
            e.to_string(),
            format!(
                "chunk {vname} in store {} is corrupt: its bytes hash to {got_name}",
                self.label
            )
        );
        // A put of the good bytes replaces damage of another size (a torn write)...
        assert_eq!(
            s.put_chunk(r, &vname, bytes_for(2, 4096)).await.unwrap(),
            PutOutcome::Repaired
        );
        assert_eq!(
            s.get_chunk(r, &vname, MAX_CHUNK).await.unwrap(),
            bytes_for(2, 4096)
        );
        // ...a good object is never rewritten...
        let stamp = raw.stamp(&chunk_key(1, &vname));
        assert_eq!(
            s.put_chunk(r, &vname, bytes_for(2, 4096)).await.unwrap(),
            PutOutcome::AlreadyPresent
        );
        assert_eq!(raw.stamp(&chunk_key(1, &vname)), stamp);
        // ...and damage that keeps the size (a flipped bit, a torn write whose tail reads
        // as zeros) is found by reading the object back, and replaced.
        let mut flipped = bytes_for(2, 4096).to_vec();
        flipped[100] ^= 0x10;
        let mut zero_tail = bytes_for(2, 4096).to_vec();
        zero_tail[1000..].fill(0);
        for damage in [flipped, zero_tail] {
            raw.overwrite(&chunk_key(1, &vname), &damage);
            assert!(matches!(
                s.get_chunk(r, &vname, MAX_CHUNK).await,
                Err(StoreError::CorruptChunk { .. })
            ));
            assert_eq!(
                s.put_chunk(r, &vname, bytes_for(2, 4096)).await.unwrap(),
                PutOutcome::Repaired
            );
            assert_eq!(
                s.get_chunk(r, &vname, MAX_CHUNK).await.unwrap(),
                bytes_for(2, 4096)
            );
        }

        // Damage found by a reader is removed on request, and only damage is.
        assert!(!s.remove_damaged_chunk(r, &vname, MAX_CHUNK).await.unwrap());
        assert!(s.has_chunk(r, &vname).await.unwrap());
        let mut flipped = bytes_for(2, 4096).to_vec();
        flipped[4095] ^= 1;
        raw.overwrite(&chunk_key(1, &vname), &flipped);
        assert!(s.remove_damaged_chunk(r, &vname, MAX_CHUNK).await.unwrap());
        assert!(!s.has_chunk(r, &vname).await.unwrap());
        assert!(!s.remove_damaged_chunk(r, &vname, MAX_CHUNK).await.unwrap());
        assert_eq!(
            s.put_chunk(r, &vname, bytes_for(2, 4096)).await.unwrap(),
            PutOutcome::Stored
        );

        // A chunk object larger than the chunk can be is refused before it is read, with
        // both sizes named; a republish replaces it.
        raw.overwrite(&chunk_key(1, &vname), &vec![7u8; 5000]);
        let e = s.get_chunk(r, &vname, 4096 + 16).await.unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "chunk {}{} in store {} is 5000 bytes, more than the 4112 a chunk may be",
                self.prefix,
                chunk_key(1, &vname),
                self.label
            )
        );
        assert_eq!(
            s.put_chunk(r, &vname, bytes_for(2, 4096)).await.unwrap(),
            PutOutcome::Repaired
        );
        assert_eq!(
            s.get_chunk(r, &vname, 4096 + 16).await.unwrap(),
            bytes_for(2, 4096)
        );
    }

    /// A v2 object (a header naming every sealed segment) is stored and read back like a
    /// v1 one; a bare header, a short object and a changed segment are refused, naming
    /// the chunk and the segment, and damage is removed on request.
    async fn v2_chunks(&self) {
        let s = self.store;
        let r = RootId(1);
        let sealed = seal_chunk_v2(
            &RootSalt::from_bytes([5; 32]),
            &bytes_for(40, 20_000),
            SegmentSize::new(4096).unwrap(),
            lode_format::Codec::None,
        )
        .unwrap();
        let (name, object) = (sealed.name, Bytes::from(sealed.object));
        let max = object.len() as u64;

        let header = object.slice(..sealed.header_len);
        let e = s.put_chunk(r, &name, header).await.unwrap_err();
        assert!(matches!(e, StoreError::PutBadObject { .. }), "{e:?}");
        assert_mentions(
            &e.to_string(),
            &[&name.to_string(), "refusing to put chunk", "bytes"],
        );
        let e = s
            .put_chunk(r, &name, object.slice(..object.len() - 1))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::PutBadObject { .. }), "{e:?}");
        assert!(!s.has_chunk(r, &name).await.unwrap());

        assert_eq!(
            s.put_chunk(r, &name, object.clone()).await.unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(s.get_chunk(r, &name, max).await.unwrap(), object);
        assert_eq!(
            s.put_chunk(r, &name, object.clone()).await.unwrap(),
            PutOutcome::AlreadyPresent
        );

        let Some(raw) = self.raw else { return };
        let mut damaged = object.to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        raw.overwrite(&chunk_key(1, &name), &damaged);
        let e = s.get_chunk(r, &name, max).await.unwrap_err();
        assert!(matches!(e, StoreError::CorruptChunkObject { .. }), "{e:?}");
        assert_mentions(
            &e.to_string(),
            &[&name.to_string(), &self.label, "is corrupt", "segment 4"],
        );
        assert!(s.remove_damaged_chunk(r, &name, max).await.unwrap());
        assert_eq!(
            s.put_chunk(r, &name, object.clone()).await.unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(s.get_chunk(r, &name, max).await.unwrap(), object);
    }

    async fn empty_chunk(&self) {
        let s = self.store;
        let name = ChunkName::of(b"");
        assert_eq!(
            s.put_chunk(RootId(3), &name, Bytes::new()).await.unwrap(),
            PutOutcome::Stored
        );
        assert!(s.has_chunk(RootId(3), &name).await.unwrap());
        assert_eq!(
            s.get_chunk(RootId(3), &name, MAX_CHUNK).await.unwrap(),
            Bytes::new()
        );
        assert_eq!(s.list_chunks(RootId(3)).await.unwrap(), vec![(name, 0)]);
    }

    async fn chunk_listing(&self) {
        let s = self.store;
        let r = RootId(5);
        let chunks: Vec<Bytes> = (0..50u64)
            .map(|i| bytes_for(100 + i, 1 + 997 * usize::try_from(i).unwrap()))
            .collect();
        let puts = chunks
            .iter()
            .map(|c| async move { s.put_chunk(r, &ChunkName::of(c), c.clone()).await });
        for outcome in join_all(puts).await {
            assert_eq!(outcome.unwrap(), PutOutcome::Stored);
        }
        let want: BTreeMap<ChunkName, u64> = chunks
            .iter()
            .map(|c| (ChunkName::of(c), u64::try_from(c.len()).unwrap()))
            .collect();
        let listed = s.list_chunks(r).await.unwrap();
        assert_eq!(listed.len(), 50, "a chunk was listed twice");
        let got: BTreeMap<ChunkName, u64> = listed.into_iter().collect();
        assert_eq!(got, want);
        assert_eq!(s.list_chunks(RootId(6)).await.unwrap(), vec![]);
        for c in &chunks[..5] {
            assert_eq!(
                &s.get_chunk(r, &ChunkName::of(c), MAX_CHUNK).await.unwrap(),
                c
            );
        }
    }

    async fn manifests(&self) {
        let s = self.store;
        let (abc, outcome) = s
            .put_manifest(RootId(1), Bytes::from_static(b"abc"))
            .await
            .unwrap();
        assert_eq!(abc.to_hex(), SHA256_ABC);
        assert_eq!(outcome, PutOutcome::Stored);
        let stamp = self.raw.map(|raw| raw.stamp(&manifest_key(1, &abc)));
        assert_eq!(
            s.put_manifest(RootId(1), Bytes::from_static(b"abc"))
                .await
                .unwrap(),
            (abc, PutOutcome::AlreadyPresent)
        );
        if let Some(raw) = self.raw {
            assert_eq!(Some(raw.stamp(&manifest_key(1, &abc))), stamp);
        }
        assert_eq!(s.get_manifest(RootId(1), &abc).await.unwrap(), "abc");
        let e = s.get_manifest(RootId(2), &abc).await.unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("manifest {abc} is not in store {}", self.label)
        );

        // find_manifest looks in every root, newest first.
        let old = Bytes::from_static(b"only in root 1");
        let both = Bytes::from_static(b"in roots 1 and 2");
        let newest = Bytes::from_static(b"only in root 10");
        let (old_id, _) = s.put_manifest(RootId(1), old.clone()).await.unwrap();
        let (both_id, _) = s.put_manifest(RootId(1), both.clone()).await.unwrap();
        assert_eq!(
            s.put_manifest(RootId(2), both.clone()).await.unwrap(),
            (both_id, PutOutcome::Stored)
        );
        let (new_id, _) = s.put_manifest(RootId(10), newest.clone()).await.unwrap();
        assert_eq!(
            s.find_manifest(&old_id).await.unwrap(),
            (RootId(1), old.clone())
        );
        assert_eq!(
            s.find_manifest(&both_id).await.unwrap(),
            (RootId(2), both.clone())
        );
        assert_eq!(
            s.find_manifest(&new_id).await.unwrap(),
            (RootId(10), newest)
        );
        // A manifest under a root without a ROOT object is not found by find_manifest.
        let (orphan, _) = s
            .put_manifest(RootId(4), Bytes::from_static(b"root 4 has no ROOT"))
            .await
            .unwrap();
        let e = s.find_manifest(&orphan).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("manifest {orphan} is not in store {}", self.label)
        );

        let layout_id = ManifestId::of(b"layout manifest");
        let listed: BTreeSet<ManifestId> = s
            .list_manifests(RootId(1))
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(listed, [layout_id, abc, old_id, both_id].into());
        assert_eq!(s.list_manifests(RootId(2)).await.unwrap(), vec![both_id]);

        let Some(raw) = self.raw else { return };
        let bad = Bytes::from_static(b"soon to be corrupt");
        let (bad_id, _) = s.put_manifest(RootId(2), bad).await.unwrap();
        let tampered = b"{\"tampered\": true}";
        raw.overwrite(&manifest_key(2, &bad_id), tampered);
        let got = ManifestId::of(tampered);
        let e = s.get_manifest(RootId(2), &bad_id).await.unwrap_err();
        match &e {
            StoreError::CorruptManifest { id, got: g, .. } => {
                assert_eq!(id, &bad_id);
                assert_eq!(g, &got);
            }
            other => panic!("expected CorruptManifest, got {other:?}"),
        }
        assert_eq!(
            e.to_string(),
            format!(
                "manifest {bad_id} in store {} is corrupt: its bytes hash to {got}",
                self.label
            )
        );
        // find_manifest reports the corruption rather than looking past it.
        let e = s.find_manifest(&bad_id).await.unwrap_err();
        assert!(matches!(e, StoreError::CorruptManifest { .. }), "{e:?}");
    }

    async fn tags(&self) {
        let s = self.store;
        let e = s.get_tag("nope:1").await.unwrap_err();
        assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("tag \"nope:1\" is not in store {}", self.label)
        );

        let m1 = ManifestId::of(b"m1");
        let m2 = ManifestId::of(b"m2");
        s.set_tag("app", &m1).await.unwrap();
        assert_eq!(s.get_tag("app").await.unwrap(), m1);
        s.set_tag("app", &m2).await.unwrap();
        assert_eq!(s.get_tag("app").await.unwrap(), m2);

        let mut want = vec![("app".to_owned(), m2)];
        for (i, tag) in AWKWARD_TAGS.iter().enumerate() {
            let id = ManifestId::of(format!("manifest for tag {i}").as_bytes());
            s.set_tag(tag, &id).await.unwrap();
            assert_eq!(s.get_tag(tag).await.unwrap(), id, "tag {tag:?}");
            want.push(((*tag).to_owned(), id));
        }
        want.sort();
        assert_eq!(s.list_tags().await.unwrap().tags, want);

        let long = "x".repeat(257);
        let invalid = [
            "",
            "a b",
            "tab\there",
            "new\nline",
            "nul\0",
            ".",
            "..",
            &long,
        ];
        for tag in invalid {
            let e = s.set_tag(tag, &m1).await.unwrap_err();
            assert!(matches!(e, StoreError::BadTag { .. }), "{tag:?}: {e:?}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("tag {tag:?} is invalid: ")),
                "message {msg:?} does not name tag {tag:?}"
            );
            let e = s.get_tag(tag).await.unwrap_err();
            assert!(matches!(e, StoreError::BadTag { .. }), "{tag:?}: {e:?}");
        }
        assert_eq!(
            s.list_tags().await.unwrap().tags,
            want,
            "a bad tag was stored"
        );
        // The limit counts encoded bytes: 27 ü are 162 once percent-encoded.
        assert!(s.set_tag(&"ü".repeat(27), &m1).await.is_err());
        // A long tag, short enough to fit in one file name wherever the backend keeps the
        // key in one (a local directory; s3s-fs names a side file after the whole key).
        let long_ok = format!(
            "{}:{}",
            "registry.example.com/team/".repeat(2),
            "v".repeat(60)
        );
        s.set_tag(&long_ok, &m1).await.unwrap();
        assert_eq!(s.get_tag(&long_ok).await.unwrap(), m1);
        want.push((long_ok, m1));
        want.sort();
        assert_eq!(s.list_tags().await.unwrap().tags, want);

        let Some(raw) = self.raw else { return };
        raw.overwrite("tags/app", PLANTED_SECRET.as_bytes());
        let e = s.get_tag("app").await.unwrap_err();
        assert!(matches!(e, StoreError::CorruptObject { .. }), "{e:?}");
        let object = format!("{}tags/app", self.prefix);
        assert_eq!(
            e.to_string(),
            format!(
                "{object} in store {} is corrupt: it does not hold a manifest id \
                 (64 hex digits and a newline)",
                self.label
            )
        );
        // One bad tag is named, with why, and every other tag is still listed.
        let listed = s.list_tags().await.unwrap();
        let others: Vec<_> = want.iter().filter(|(t, _)| t != "app").cloned().collect();
        assert_eq!(listed.tags, others);
        assert_eq!(listed.bad.len(), 1);
        assert_eq!(listed.bad[0].tag, "app");
        assert_eq!(listed.bad[0].error.to_string(), e.to_string());
        // 64 characters, but not lowercase hex: still not echoed.
        raw.overwrite("tags/app", "Z".repeat(64).as_bytes());
        let e = s.get_tag("app").await.unwrap_err();
        assert!(!e.to_string().contains("ZZZZ"), "{e}");
        // An oversized tag is refused unread.
        raw.overwrite("tags/app", &vec![b'a'; 5000]);
        let e = s.get_tag("app").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "tag {object} in store {} is 5000 bytes, more than the 1024 a tag may be",
                self.label
            )
        );
        assert_eq!(s.list_tags().await.unwrap().tags, others);
        // Tags are mutable: setting it again repairs it.
        s.set_tag("app", &m2).await.unwrap();
        assert_eq!(s.get_tag("app").await.unwrap(), m2);
        assert!(s.list_tags().await.unwrap().bad.is_empty());
    }

    /// Many puts of one name at once: all succeed, the bytes are right, and on a backend
    /// with an atomic create exactly one of them stored.
    async fn racing_puts(&self) {
        let s = self.store;
        let data = bytes_for(7, 256 * 1024);
        let name = ChunkName::of(&data);
        let puts = (0..8).map(|_| s.put_chunk(RootId(1), &name, data.clone()));
        let outcomes: Vec<PutOutcome> = join_all(puts)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let stored = outcomes
            .iter()
            .filter(|o| **o == PutOutcome::Stored)
            .count();
        assert!(stored >= 1, "{outcomes:?}");
        if self.raw.is_none_or(|r| r.atomic_create()) {
            assert_eq!(stored, 1, "{outcomes:?}");
        }
        assert_eq!(
            s.get_chunk(RootId(1), &name, MAX_CHUNK).await.unwrap(),
            data
        );

        let (id, _) = s.put_manifest(RootId(1), bytes_for(8, 1000)).await.unwrap();
        let creates = (0..8).map(|_| s.put_manifest(RootId(1), bytes_for(8, 1000)));
        for r in join_all(creates).await {
            assert_eq!(r.unwrap(), (id, PutOutcome::AlreadyPresent));
        }
    }

    /// While chunks are being written, a reader sees each one either absent or whole.
    async fn readers_never_see_partial_chunks(&self) {
        let s = self.store;
        let r = RootId(8);
        let chunks: Vec<Bytes> = (0..6).map(|i| bytes_for(200 + i, 512 * 1024)).collect();
        let names: Vec<ChunkName> = chunks.iter().map(|c| ChunkName::of(c)).collect();
        let done = std::sync::atomic::AtomicBool::new(false);
        let writers = async {
            let puts = chunks
                .iter()
                .zip(&names)
                .map(|(c, n)| s.put_chunk(r, n, c.clone()));
            for o in join_all(puts).await {
                assert_eq!(o.unwrap(), PutOutcome::Stored);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        };
        let reader = async {
            let mut seen = 0usize;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                for (c, n) in chunks.iter().zip(&names) {
                    match s.get_chunk(r, n, MAX_CHUNK).await {
                        Ok(b) => {
                            assert_eq!(&b, c);
                            seen += 1;
                        }
                        Err(StoreError::NotFound { .. }) => {}
                        Err(e) => panic!("a reader saw a half-written chunk: {e}"),
                    }
                }
                if finished {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        };
        let ((), seen) = tokio::join!(writers, reader);
        assert!(seen >= chunks.len());
    }

    /// Objects lode did not write are named when a listing meets them.
    async fn stray_objects_are_named(&self) {
        let Some(raw) = self.raw else { return };
        let s = self.store;
        raw.overwrite(
            &format!("roots/{STRAY_ROOT}/manifests/not-a-manifest"),
            b"x",
        );
        let e = s.list_manifests(RootId(STRAY_ROOT)).await.unwrap_err();
        assert!(matches!(e, StoreError::CorruptObject { .. }), "{e:?}");
        assert_mentions(
            &e.to_string(),
            &[
                &format!("{}roots/{STRAY_ROOT}/manifests/not-a-manifest", self.prefix),
                &self.label,
            ],
        );
        raw.overwrite(&format!("roots/{STRAY_ROOT}/chunks/zz/not-a-chunk"), b"x");
        let e = s.list_chunks(RootId(STRAY_ROOT)).await.unwrap_err();
        assert!(matches!(e, StoreError::CorruptObject { .. }), "{e:?}");
        assert_mentions(
            &e.to_string(),
            &[
                &format!("{}roots/{STRAY_ROOT}/chunks/zz/not-a-chunk", self.prefix),
                &self.label,
            ],
        );
        // A root directory without a ROOT object is not a root.
        assert_eq!(
            s.get_root(RootId(STRAY_ROOT))
                .await
                .unwrap_err()
                .to_string(),
            format!("root {STRAY_ROOT} is not in store {}", self.label)
        );
        assert!(
            s.roots()
                .await
                .unwrap()
                .iter()
                .all(|r| r.root != RootId(STRAY_ROOT))
        );
    }

    /// After everything above (many concurrent puts among it), the backend holds only
    /// objects under their final names: no temporary or half-written files.
    /// Pins are put, listed, checked and removed; tags and manifests are removed; each
    /// removal of what is not there says so, naming it; a pin object lode did not write
    /// is named, never quoted.
    async fn pins_and_removals(&self) {
        let s = self.store;
        let m = ManifestId::of(b"pinned manifest");
        assert!(!s.has_pin(&m).await.unwrap());
        assert_eq!(s.put_pin(&m).await.unwrap(), PutOutcome::Stored);
        assert_eq!(s.put_pin(&m).await.unwrap(), PutOutcome::AlreadyPresent);
        assert!(s.has_pin(&m).await.unwrap());
        assert_eq!(s.list_pins().await.unwrap().pins, vec![m]);
        s.remove_pin(&m).await.unwrap();
        assert!(!s.has_pin(&m).await.unwrap());
        let e = s.remove_pin(&m).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("pin {m} is not in store {}", self.label)
        );

        s.set_tag("rm-me:1", &m).await.unwrap();
        assert_eq!(s.remove_tag("rm-me:1").await.unwrap(), Some(m));
        let e = s.remove_tag("rm-me:1").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("tag \"rm-me:1\" is not in store {}", self.label)
        );

        let (id, _) = s
            .put_manifest(RootId(7), Bytes::from_static(b"a manifest to remove"))
            .await
            .unwrap();
        s.remove_manifest(RootId(7), &id).await.unwrap();
        assert!(s.list_manifests(RootId(7)).await.unwrap().is_empty());
        let e = s.remove_manifest(RootId(7), &id).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("manifest {id} is not in store {}", self.label)
        );

        let Some(raw) = self.raw else { return };
        // A pin whose body names another manifest, and one holding a secret.
        let other = ManifestId::of(b"other");
        let a = ManifestId::of(b"pin a");
        let b = ManifestId::of(b"pin b");
        raw.overwrite(&format!("pins/{a}"), format!("{other}\n").as_bytes());
        raw.overwrite(&format!("pins/{b}"), b"hunter2 hunter2 hunter2");
        s.put_pin(&m).await.unwrap();
        let pins = s.list_pins().await.unwrap();
        assert_eq!(pins.pins, vec![m]);
        let bad: Vec<String> = pins.bad.iter().map(|b| b.error.to_string()).collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        for msg in &bad {
            assert!(!msg.contains("hunter2"), "{msg}");
        }
        assert!(
            bad.contains(&format!(
                "{}pins/{a} in store {} is corrupt: it holds another manifest's id than the \
                 one it is named by",
                self.prefix, self.label
            )),
            "{bad:?}"
        );
        let e = s.has_pin(&b).await.unwrap_err();
        assert!(e.to_string().contains(&format!("pins/{b}")), "{e}");
        // Re-pinning replaces a damaged pin object with a good one.
        assert_eq!(s.put_pin(&a).await.unwrap(), PutOutcome::Repaired);
        assert!(s.has_pin(&a).await.unwrap());
        for id in [a, b, m] {
            s.remove_pin(&id).await.unwrap();
        }
        assert!(s.list_pins().await.unwrap().bad.is_empty());
        // only_final_names wants a pin among the keys it checks.
        s.put_pin(&m).await.unwrap();
    }

    fn only_final_names(&self) {
        let Some(raw) = self.raw else { return };
        let keys = raw.keys();
        assert!(keys.len() > 80, "{keys:?}");
        for key in &keys {
            let parts: Vec<&str> = key.split('/').collect();
            let ok = match parts.as_slice() {
                ["roots", r, "ROOT"] => r.parse::<u32>().is_ok(),
                ["roots", r, "chunks", hh, name] => {
                    r.parse::<u32>().is_ok() && is_hex64(name) && name[..2] == **hh
                }
                ["roots", r, "manifests", id] => r.parse::<u32>().is_ok() && is_hex64(id),
                ["tags", t] => !t.is_empty(),
                ["pins", id] => is_hex64(id),
                _ => false,
            };
            let stray = key.starts_with(&format!("roots/{STRAY_ROOT}/"));
            assert!(ok || stray, "unexpected object {key:?} in {keys:#?}");
        }
        // Every chunk put above is there under its final name.
        for i in 0..50u64 {
            let c = bytes_for(100 + i, 1 + 997 * usize::try_from(i).unwrap());
            assert!(keys.contains(&chunk_key(5, &ChunkName::of(&c))));
        }
    }

    /// A root record advances only from the version read: a second update from the same
    /// version is a conflict naming the object, and of racing updates from one version
    /// exactly one wins where the backend's conditional write is atomic (s3s-fs checks
    /// and then writes: there at least one wins and the record is whole).
    async fn conditional_root_updates(&self) {
        let s = self.store;
        let id = 21;
        s.create_root(&root(id, RootState::Active, "k", b"salt"))
            .await
            .unwrap();
        let (rec, v1) = s.get_root_versioned(RootId(id)).await.unwrap();
        assert_eq!(rec.state, RootState::Active);
        let retired = root(id, RootState::Retired, "k", b"salt");
        s.update_root(&retired, &v1).await.unwrap();
        assert_eq!(s.get_root(RootId(id)).await.unwrap(), retired);
        let e = s.update_root(&rec, &v1).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}roots/{id}/ROOT in store {} changed since it was read: another process \
                 wrote it first",
                self.prefix, self.label
            )
        );
        assert_eq!(s.get_root(RootId(id)).await.unwrap(), retired);

        let (_, v2) = s.get_root_versioned(RootId(id)).await.unwrap();
        let racers = (0..8u8).map(|i| {
            let s = s.clone();
            let v = v2.clone();
            async move {
                let rec = root(id, RootState::Expired, "k", &[i; 8]);
                s.update_root(&rec, &v).await.map(|()| rec)
            }
        });
        let results = futures::future::join_all(racers).await;
        let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
            }
        }
        let atomic = self.raw.is_none_or(|r| r.atomic_create());
        if atomic {
            assert_eq!(won.len(), 1, "{results:?}");
        } else {
            assert!(!won.is_empty(), "{results:?}");
        }
        let now = s.get_root(RootId(id)).await.unwrap();
        assert!(
            won.contains(&&now),
            "{now:?} is none of the winners' records"
        );
    }

    async fn corrupt_roots(&self) {
        let Some(raw) = self.raw else { return };
        let s = self.store;
        raw.overwrite("roots/12/ROOT", b"{\"version\": 1, \"root\": ");
        let object = format!("{}roots/12/ROOT", self.prefix);
        let e = s.get_root(RootId(12)).await.unwrap_err();
        assert!(matches!(e, StoreError::CorruptObject { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("{object} in store {} is corrupt: ", self.label)),
            "{e}"
        );
        let e = s.roots().await.unwrap_err();
        assert_mentions(&e.to_string(), &[&object]);
        let e = s.active_root().await.unwrap_err();
        assert_mentions(&e.to_string(), &[&object]);

        // Well-formed, but filed under the wrong root.
        raw.overwrite(
            "roots/13/ROOT",
            br#"{"version": 1, "root": 14, "state": "active",
                "salt": {"key_id": "k", "blob": "00"}}"#,
        );
        let e = s.get_root(RootId(13)).await.unwrap_err();
        assert_mentions(
            &e.to_string(),
            &[
                &format!("{}roots/13/ROOT", self.prefix),
                "it says it is root 14",
            ],
        );
        // An unknown state or field is refused, not guessed at.
        raw.overwrite(
            "roots/15/ROOT",
            br#"{"version": 1, "root": 15, "state": "sleeping",
                "salt": {"key_id": "k", "blob": "00"}}"#,
        );
        let e = s.get_root(RootId(15)).await.unwrap_err();
        assert!(matches!(e, StoreError::CorruptObject { .. }), "{e:?}");
        assert!(!e.to_string().contains("sleeping"), "{e}");
        // A record that quotes a secret is described, not repeated.
        raw.overwrite(
            "roots/16/ROOT",
            format!(r#"{{"version": 1, "root": 16, "state": "{PLANTED_SECRET}"}}"#).as_bytes(),
        );
        let e = s.get_root(RootId(16)).await.unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "{}roots/16/ROOT in store {} is corrupt: not a root record: a field is \
                 missing, unknown or of the wrong type or value (line 1, column 95)",
                self.prefix, self.label
            )
        );
        // An oversized record is refused unread.
        raw.overwrite("roots/17/ROOT", &vec![b' '; 70_000]);
        let e = s.get_root(RootId(17)).await.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::TooLarge {
                    size: 70_000,
                    max: 65_536,
                    ..
                }
            ),
            "{e:?}"
        );
        // Root 1 is still readable on its own.
        assert_eq!(
            s.get_root(RootId(1)).await.unwrap().state,
            RootState::Active
        );
    }
}
