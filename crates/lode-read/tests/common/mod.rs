//! A real image in a temporary local store, and helpers to build caches and devices.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use lode_image::{NoProgress, PublishOptions, Publisher};
use lode_kms::{Keyring, Kms};
use lode_read::{
    CacheBuilder, ChunkCache, ChunkOrigin, ChunkTier, DiskTier, ImageDevice, MemoryTier,
    StoreOrigin,
};
use lode_store::Store;

pub const CHUNK: u64 = 512 * 1024;

/// An image of 9 chunks and 12 KiB (the last one short): random chunks, chunk 3 and
/// chunk 7 all zero, chunk 5 a copy of chunk 0.
pub fn image_bytes() -> Vec<u8> {
    let len = usize::try_from(9 * CHUNK + 12 * 1024).unwrap();
    let mut v = vec![0u8; len];
    for (i, c) in v.chunks_mut(usize::try_from(CHUNK).unwrap()).enumerate() {
        let seed = match i {
            3 | 7 => continue,
            5 => 1,
            i => i as u64 + 1,
        };
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for b in c.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[3];
        }
    }
    v
}

/// Stored chunks of `image_bytes` that a range touches, by distinct name (chunk 5 is
/// chunk 0 again, chunks 3 and 7 are zero).
pub fn distinct_stored(chunks: impl IntoIterator<Item = u64>) -> u64 {
    let mut set: Vec<u64> = chunks
        .into_iter()
        .filter(|c| *c != 3 && *c != 7)
        .map(|c| if c == 5 { 0 } else { c })
        .collect();
    set.sort_unstable();
    set.dedup();
    set.len() as u64
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub store_dir: PathBuf,
    pub kms: Keyring,
    pub image: Vec<u8>,
    pub image_path: PathBuf,
    pub id: String,
}

impl Fixture {
    /// The image published in the chunk format new images get.
    pub async fn new() -> Fixture {
        Fixture::with_format(None).await
    }

    /// The image published in `format` (`None`: the default for new images).
    pub async fn with_format(format: Option<lode_format::ChunkFormat>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        std::fs::create_dir_all(&store_dir).unwrap();
        let store = Store::open(store_dir.to_str().unwrap()).unwrap();
        let kms = Keyring::open_or_create(dir.path().join("keyring")).unwrap();
        let image = image_bytes();
        let image_path = dir.path().join("image.raw");
        std::fs::write(&image_path, &image).unwrap();
        let publisher = Publisher::new(&store, &kms, kms.default_key_id());
        let published = publisher
            .publish_file(
                &image_path,
                &PublishOptions {
                    chunk_format: format,
                    ..PublishOptions::default()
                },
                Arc::new(NoProgress),
            )
            .await
            .unwrap();
        Fixture {
            id: published.id.to_hex(),
            dir,
            store,
            store_dir,
            kms,
            image,
            image_path,
        }
    }

    /// memory → disk → origin, with the given bounds.
    pub fn cache(&self, decrypted: u64, memory: u64, disk: u64) -> (Arc<ChunkCache>, PathBuf) {
        let cache_dir = self.dir.path().join("cache");
        let cache = CacheBuilder::new()
            .decrypted_bytes(decrypted)
            .tier(Arc::new(MemoryTier::new(memory)))
            .tier(Arc::new(DiskTier::open(&cache_dir, disk).unwrap()))
            .origin(Arc::new(StoreOrigin::new(self.store.clone())))
            .build()
            .unwrap();
        (cache, cache_dir)
    }

    /// A cache over custom tiers and origin.
    pub fn cache_with(
        &self,
        tiers: Vec<Arc<dyn ChunkTier>>,
        origin: Arc<dyn ChunkOrigin>,
    ) -> Arc<ChunkCache> {
        tiers
            .into_iter()
            .fold(CacheBuilder::new(), |b, t| b.tier(t))
            .origin(origin)
            .build()
            .unwrap()
    }

    pub async fn device(&self, cache: &Arc<ChunkCache>) -> ImageDevice {
        let opened = lode_read::open_image(&self.store, Some(&self.kms), &self.id)
            .await
            .unwrap();
        ImageDevice::new(Arc::clone(cache), opened).unwrap()
    }

    /// Every chunk file of the store.
    pub fn store_chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.store_dir, &mut out);
        out.retain(|p| p.components().any(|c| c.as_os_str() == "chunks"));
        out.sort();
        out
    }

    /// SHA-256 over every file's path and bytes in the store.
    pub fn store_digest(&self) -> String {
        let mut files = Vec::new();
        walk(&self.store_dir, &mut files);
        files.sort();
        let mut all = Vec::new();
        for f in files {
            all.extend_from_slice(f.to_string_lossy().as_bytes());
            all.extend_from_slice(&std::fs::read(&f).unwrap());
        }
        lode_format::ChunkName::of(&all).to_hex()
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[allow(unused_imports)] // not every test file uses it
pub use lode_testkit::tool;

/// Runs a command on the blocking pool (the NBD server shares the runtime).
pub async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

pub async fn run_ok(cmd: Command) -> Output {
    let desc = format!("{cmd:?}");
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "{desc} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A PATH under which python3 imports nbd (nbdsh needs the system Python).
pub fn nbd_python_path() -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = ["", "/usr/bin:"]
        .iter()
        .map(|prefix| format!("{prefix}{path}"))
        .find(|p| {
            Command::new("python3")
                .args(["-c", "import nbd"])
                .env("PATH", p)
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if found.is_none() {
        lode_testkit::skip("no python3 with the nbd module (python3-libnbd)");
    }
    found
}
