//! The conformance suite against the in-memory store and a local directory, and the
//! checks only those backends allow (the exact files on disk, reopening, bad locations).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use common::{Backdoor, DirBackdoor, MAX_CHUNK, conformance};
use lode_format::{ChunkName, RootId};
use lode_store::{PutOutcome, Store, StoreError};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// An `InMemory` store we keep a handle to.
#[derive(Debug)]
struct MemBackdoor {
    os: Arc<InMemory>,
    /// The store's prefix, empty or ending in '/'.
    prefix: String,
}

impl MemBackdoor {
    fn path(&self, key: &str) -> Path {
        Path::from(format!("{}{key}", self.prefix).as_str())
    }
}

impl Backdoor for MemBackdoor {
    fn overwrite(&self, key: &str, bytes: &[u8]) {
        let payload = PutPayload::from(bytes.to_vec());
        // InMemory completes without awaiting anything, so blocking here is harmless.
        futures::executor::block_on(self.os.put(&self.path(key), payload)).unwrap();
    }

    fn stamp(&self, key: &str) -> Option<String> {
        let meta = futures::executor::block_on(self.os.head(&self.path(key))).ok()?;
        // InMemory's e-tag counts puts: it changes on every rewrite.
        Some(format!("{:?} {}", meta.e_tag, meta.last_modified))
    }

    fn keys(&self) -> BTreeSet<String> {
        let prefix = Path::from(self.prefix.as_str());
        let listed: Vec<_> = futures::executor::block_on(futures::TryStreamExt::try_collect(
            self.os.list(Some(&prefix)),
        ))
        .unwrap();
        listed
            .into_iter()
            .map(|m| {
                let key = m.location.to_string();
                key.strip_prefix(&self.prefix)
                    .unwrap_or_else(|| panic!("{key} is outside the store's prefix"))
                    .to_owned()
            })
            .collect()
    }

    fn atomic_create(&self) -> bool {
        true
    }
}

fn dir_str(dir: &tempfile::TempDir) -> &str {
    dir.path().to_str().expect("temp dirs are UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_opened_by_name() {
    let store = Store::open("memory:").unwrap();
    assert_eq!(store.label(), "memory:");
    conformance(&store, "", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_with_backdoor() {
    let os = Arc::new(InMemory::new());
    let store = Store::from_object_store(os.clone(), Path::default(), "memory:".into());
    let raw = MemBackdoor {
        os,
        prefix: String::new(),
    };
    conformance(&store, "", Some(&raw)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_under_a_prefix() {
    let os = Arc::new(InMemory::new());
    // Something beside the prefix that the store must neither list nor touch.
    os.put(
        &Path::from("elsewhere/roots/1/ROOT"),
        PutPayload::from_static(b"{}"),
    )
    .await
    .unwrap();
    let store = Store::from_object_store(
        os.clone(),
        Path::from("team/lode"),
        "memory:team/lode".into(),
    );
    let raw = MemBackdoor {
        os: os.clone(),
        prefix: "team/lode/".into(),
    };
    conformance(&store, "team/lode/", Some(&raw)).await;
    let outside = os.get(&Path::from("elsewhere/roots/1/ROOT")).await.unwrap();
    assert_eq!(outside.bytes().await.unwrap(), "{}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir_str(&dir)).unwrap();
    assert_eq!(store.label(), dir_str(&dir));
    let raw = DirBackdoor {
        dir: dir.path().to_owned(),
        atomic_create: true,
    };
    conformance(&store, "", Some(&raw)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_directory_by_file_url_created_if_missing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not/yet/there");
    let store = Store::open(&format!("file://{}", root.display())).unwrap();
    assert!(root.is_dir());
    let raw = DirBackdoor {
        dir: root,
        atomic_create: true,
    };
    conformance(&store, "", Some(&raw)).await;
}

/// What one store process wrote, the next one reads.
#[tokio::test]
async fn local_store_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let data = Bytes::from_static(b"persisted");
    let name = ChunkName::of(&data);
    {
        let store = Store::open(dir_str(&dir)).unwrap();
        store
            .put_chunk(RootId(1), &name, data.clone())
            .await
            .unwrap();
    }
    let store = Store::open(dir_str(&dir)).unwrap();
    assert_eq!(
        store.get_chunk(RootId(1), &name, MAX_CHUNK).await.unwrap(),
        data
    );
    assert_eq!(
        store.put_chunk(RootId(1), &name, data).await.unwrap(),
        PutOutcome::AlreadyPresent
    );
}

/// Many concurrent puts into one directory leave only final names: no staging file
/// beside a chunk, nothing anywhere but the layout's objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_puts_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir_str(&dir)).unwrap();
    // Names chosen to fall in a few "<2 hex>" directories, so puts race in each.
    let mut chunks = Vec::new();
    let mut i = 0u32;
    while chunks.len() < 40 {
        let c = Bytes::from(format!("chunk {i} ").repeat(2000));
        if ChunkName::of(&c).to_hex().starts_with('a') {
            chunks.push(c);
        }
        i += 1;
    }
    let puts = chunks.iter().flat_map(|c| [c, c]).map(|c| {
        let store = &store;
        async move {
            store
                .put_chunk(RootId(1), &ChunkName::of(c), c.clone())
                .await
        }
    });
    let outcomes = futures::future::join_all(puts).await;
    let stored = outcomes
        .into_iter()
        .filter(|o| *o.as_ref().unwrap() == PutOutcome::Stored)
        .count();
    assert_eq!(stored, chunks.len(), "each name stored exactly once");

    let raw = DirBackdoor {
        dir: dir.path().to_owned(),
        atomic_create: true,
    };
    let want: BTreeSet<String> = chunks
        .iter()
        .map(|c| {
            let hex = ChunkName::of(c).to_hex();
            format!("roots/1/chunks/{}/{hex}", &hex[..2])
        })
        .collect();
    assert_eq!(raw.keys(), want);
    for c in &chunks {
        let hex = ChunkName::of(c).to_hex();
        let on_disk = std::fs::read(
            dir.path()
                .join(format!("roots/1/chunks/{}/{hex}", &hex[..2])),
        )
        .unwrap();
        assert_eq!(on_disk, c.as_ref());
    }
}

/// Every tag `set_tag` accepts can be stored. A tag is one file name on a local
/// directory (255 bytes at most), '/' grows to "%2F" in it, and object_store stages the
/// file under a longer name first: the longest tags lode accepts must still fit, and one
/// byte more is refused up front rather than failing in the backend.
#[tokio::test]
async fn local_store_holds_every_valid_tag() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir_str(&dir)).unwrap();
    let id = lode_format::ManifestId::of(b"m");
    for tag in ["y".repeat(160), "a/".repeat(40), "%".repeat(53)] {
        store.set_tag(&tag, &id).await.unwrap();
        assert_eq!(store.get_tag(&tag).await.unwrap(), id);
    }
    for tag in ["y".repeat(161), "a/".repeat(41), "%".repeat(54)] {
        let e = store.set_tag(&tag, &id).await.unwrap_err();
        assert!(matches!(e, StoreError::BadTag { .. }), "{tag}: {e}");
    }
}

#[test]
fn bad_locations_fail_at_open_naming_the_location() {
    for spec in [
        "gs://x",
        "s3://UPPER",
        "s3://UPPER/prefix",
        "s3://ab",
        "s3://bucket/a/../b",
    ] {
        let e = Store::open(spec).unwrap_err();
        assert!(matches!(e, StoreError::BadLocation { .. }), "{spec}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("store location {spec:?} is invalid: ")),
            "{msg}"
        );
    }
    assert!(
        Store::open("gs://x")
            .unwrap_err()
            .to_string()
            .contains("\"gs\"")
    );
    assert!(Store::open("").is_err());
    assert!(Store::open("file://relative/dir").is_err());

    // A directory that cannot be created: its parent is a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let spec = file.join("store");
    let e = Store::open(spec.to_str().unwrap()).unwrap_err();
    assert!(matches!(e, StoreError::BadLocation { .. }), "{e:?}");
    assert!(e.to_string().contains(spec.to_str().unwrap()), "{e}");
}
