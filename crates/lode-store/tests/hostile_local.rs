//! A local store directory as an attacker leaves it: 4 GiB sparse objects, FIFOs, links
//! to host files and directories, staging files of a killed writer. Each must be refused
//! by name, without a big allocation, without blocking, and without a byte of a host file
//! in any message.
//!
//! The binary counts the largest single allocation (a global allocator that forwards to
//! the system one), so "refused before reading" is checked, not assumed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use lode_format::{ChunkName, ManifestId, RootId};
use lode_store::{MAX_MANIFEST_OBJECT, PutOutcome, Store, StoreError};

struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

const FOUR_GIB: u64 = 4 << 30;
const HOST_SECRET: &str = "root:$6$hostsalt$thisisthehostpasswordhash:19000:0:99999:7:::\n";

fn open(dir: &FsPath) -> Store {
    Store::open(dir.to_str().unwrap()).unwrap()
}

fn sparse(path: &FsPath, len: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
}

fn mkfifo(path: &FsPath) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(st.success());
}

fn chunk_rel(root: u32, name: &ChunkName) -> String {
    let hex = name.to_hex();
    format!("roots/{root}/chunks/{}/{hex}", &hex[..2])
}

fn root_json(root: u32) -> String {
    format!(
        r#"{{"version": 1, "root": {root}, "state": "active", "salt": {{"key_id": "k", "blob": "00"}}}}"#
    )
}

/// 4 GiB sparse objects of every kind are refused by size, naming both sizes, and no
/// allocation near their size happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_gib_objects_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let label = s.label().to_owned();
    let name = ChunkName::of(b"some chunk");
    let id = ManifestId::of(b"some manifest");
    sparse(&dir.path().join(chunk_rel(1, &name)), FOUR_GIB);
    sparse(
        &dir.path()
            .join(format!("roots/1/manifests/{}", id.to_hex())),
        FOUR_GIB,
    );
    sparse(&dir.path().join("tags/big"), FOUR_GIB);
    sparse(&dir.path().join("roots/2/ROOT"), FOUR_GIB);
    sparse(
        &dir.path().join(format!("roots/1/worksets/{}", id.to_hex())),
        FOUR_GIB,
    );
    let before = LARGEST.load(Ordering::Relaxed);

    let e = s
        .get_chunk(RootId(1), &name, 512 * 1024 + 16)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "chunk {} in store {label} is 4294967296 bytes, more than the 524304 a chunk may be",
            chunk_rel(1, &name)
        )
    );
    let e = s.get_manifest(RootId(1), &id).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "manifest roots/1/manifests/{id} in store {label} is 4294967296 bytes, more than \
             the {MAX_MANIFEST_OBJECT} a manifest may be"
        )
    );
    let e = s.get_tag("big").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "tag tags/big in store {label} is 4294967296 bytes, more than the 1024 a tag may be"
        )
    );
    let e = s.get_root(RootId(2)).await.unwrap_err();
    assert!(
        matches!(e, StoreError::TooLarge { size: FOUR_GIB, .. }),
        "{e:?}"
    );
    let e = s
        .get_working_set(RootId(1), &id, 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { .. }), "{e:?}");
    // The listing goes on past the oversized tag.
    let tags = s.list_tags().await.unwrap();
    assert_eq!(tags.bad.len(), 1);
    assert!(matches!(tags.bad[0].error, StoreError::TooLarge { .. }));

    // A republish of a good chunk over an oversized object replaces it.
    let good = Bytes::from_static(b"good chunk bytes");
    let gname = ChunkName::of(&good);
    sparse(&dir.path().join(chunk_rel(1, &gname)), FOUR_GIB);
    assert_eq!(
        s.put_chunk(RootId(1), &gname, good.clone()).await.unwrap(),
        PutOutcome::Repaired
    );
    assert_eq!(s.get_chunk(RootId(1), &gname, 100).await.unwrap(), good);

    let largest = LARGEST.load(Ordering::Relaxed);
    eprintln!("largest single allocation while refusing 4 GiB objects: {largest} bytes");
    assert!(
        largest < 64 << 20,
        "an allocation of {largest} bytes (before the reads: {before})"
    );
}

/// A FIFO (or other special file) as a tag, chunk, manifest or root record is refused
/// at once: opening it does not wait for a writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let label = s.label().to_owned();
    let name = ChunkName::of(b"fifo chunk");
    let id = ManifestId::of(b"fifo manifest");
    mkfifo(&dir.path().join("tags/pipe"));
    mkfifo(&dir.path().join(chunk_rel(1, &name)));
    mkfifo(
        &dir.path()
            .join(format!("roots/1/manifests/{}", id.to_hex())),
    );
    std::fs::write(dir.path().join("roots/1/ROOT"), root_json(1)).unwrap();
    mkfifo(&dir.path().join("roots/3/ROOT"));
    s.set_tag("fine", &id).await.unwrap();

    let e = s.get_tag("pipe").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("tag tags/pipe in store {label} is refused: a FIFO, not a regular file")
    );
    let e = s.get_chunk(RootId(1), &name, 1 << 20).await.unwrap_err();
    assert!(matches!(e, StoreError::Unreadable { .. }), "{e:?}");
    assert!(e.to_string().contains(&chunk_rel(1, &name)), "{e}");
    let e = s.get_manifest(RootId(1), &id).await.unwrap_err();
    assert!(matches!(e, StoreError::Unreadable { .. }), "{e:?}");
    let e = s.get_root(RootId(3)).await.unwrap_err();
    assert!(matches!(e, StoreError::Unreadable { .. }), "{e:?}");

    let tags = s.list_tags().await.unwrap();
    assert_eq!(tags.tags, vec![("fine".to_owned(), id)]);
    assert_eq!(tags.bad.len(), 1);
    assert_eq!(tags.bad[0].tag, "pipe");

    // A publish over a FIFO chunk replaces it with the chunk.
    let good = Bytes::from_static(b"fifo chunk");
    assert_eq!(
        s.put_chunk(RootId(1), &name, good.clone()).await.unwrap(),
        PutOutcome::Repaired
    );
    assert_eq!(s.get_chunk(RootId(1), &name, 100).await.unwrap(), good);
}

/// Links out of the store are never followed: not a tag linked to a host file, not a
/// directory linked elsewhere, for reads, listings or writes. No message carries a byte
/// of the host file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_out_of_the_store_are_refused_and_never_echoed() {
    let host = tempfile::tempdir().unwrap();
    let secret = host.path().join("shadow");
    std::fs::write(&secret, HOST_SECRET).unwrap();
    std::fs::create_dir(host.path().join("elsewhere")).unwrap();
    std::fs::write(host.path().join("elsewhere/ROOT"), root_json(5)).unwrap();
    std::fs::write(
        host.path().join("elsewhere/note"),
        "a file lode must not list",
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let label = s.label().to_owned();
    let id = ManifestId::of(b"m");
    s.set_tag("good:1", &id).await.unwrap();
    s.set_tag("good:2", &id).await.unwrap();
    std::os::unix::fs::symlink(&secret, dir.path().join("tags/evil")).unwrap();

    let e = s.get_tag("evil").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "tag tags/evil in store {label} is refused: a symbolic link (lode does not follow \
             links in a store)"
        )
    );
    let tags = s.list_tags().await.unwrap();
    assert_eq!(
        tags.tags,
        vec![("good:1".to_owned(), id), ("good:2".to_owned(), id)]
    );
    assert_eq!(tags.bad.len(), 1);
    let msg = format!("{} {:?}", tags.bad[0].error, tags.bad[0].error);
    assert!(
        !msg.contains("hostpassword") && !msg.contains("root:"),
        "{msg}"
    );

    // A root directory that is a link to a host directory is neither listed nor read.
    std::fs::create_dir_all(dir.path().join("roots")).unwrap();
    std::os::unix::fs::symlink(host.path().join("elsewhere"), dir.path().join("roots/5")).unwrap();
    assert_eq!(s.roots().await.unwrap(), vec![]);
    let e = s.get_root(RootId(5)).await.unwrap_err();
    assert!(matches!(e, StoreError::Unreadable { .. }), "{e:?}");
    assert_eq!(s.list_chunks(RootId(5)).await.unwrap(), vec![]);
    // Nor written through.
    let c = Bytes::from_static(b"would land outside");
    let e = s
        .put_chunk(RootId(5), &ChunkName::of(&c), c.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Unreadable { .. }), "{e:?}");
    assert_eq!(
        std::fs::read_dir(host.path().join("elsewhere"))
            .unwrap()
            .count(),
        2,
        "a write went through the link"
    );

    // A tags directory that is a link: nothing listed through it.
    let dir2 = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(host.path(), dir2.path().join("tags")).unwrap();
    let s2 = open(dir2.path());
    let tags = s2.list_tags().await.unwrap();
    assert!(tags.tags.is_empty() && tags.bad.is_empty(), "{tags:?}");
    let e = s2.get_tag("shadow").await.unwrap_err();
    assert!(!e.to_string().contains("hostpassword"), "{e}");
    assert!(matches!(e, StoreError::Unreadable { .. }), "{e:?}");
}

/// Staging files (`<object>#<n>`) are never listed as objects; the store finds them for
/// fsck with their age, and removes them one by one, refusing anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_files_are_found_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = Bytes::from_static(b"a chunk");
    let name = ChunkName::of(&c);
    s.put_chunk(RootId(1), &name, c.clone()).await.unwrap();
    let staged = format!("{}#1", chunk_rel(1, &name));
    std::fs::write(dir.path().join(&staged), b"half a ch").unwrap();
    std::fs::create_dir(dir.path().join("tags")).unwrap();
    std::fs::write(dir.path().join("tags/app#3"), b"0123").unwrap();

    assert_eq!(
        s.list_chunks(RootId(1)).await.unwrap(),
        vec![(name, c.len() as u64)]
    );
    assert!(s.list_tags().await.unwrap().bad.is_empty());
    let found = s.staging_files().await.unwrap();
    let keys: Vec<_> = found.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(keys, [staged.as_str(), "tags/app#3"]);
    assert_eq!(found[0].size, 9);

    let e = s.remove_staging(&chunk_rel(1, &name)).await.unwrap_err();
    assert!(e.to_string().contains("is not a staging file"), "{e}");
    let e = s.remove_staging("../../etc/passwd#1").await.unwrap_err();
    assert!(matches!(e, StoreError::Staging { .. }), "{e:?}");
    for f in &found {
        s.remove_staging(&f.key).await.unwrap();
    }
    assert!(s.staging_files().await.unwrap().is_empty());
    assert_eq!(s.get_chunk(RootId(1), &name, 100).await.unwrap(), c);
}
