//! The read path by segment (chunk format v2), beside what it replaced and a yardstick,
//! measured in one run:
//!
//! 1. **Disk tier, memory cold, 4 KiB random reads.** A 64 MiB image (seeded bytes with
//!    zero blocks and a few zero chunks) published twice into a local directory store,
//!    three times: as v2 (the default: lz4 in 16 KiB segments), as v2 sealed as is in
//!    32 KiB segments (codec 0: the cost lz4 adds is the difference) and as v1 (each chunk
//!    one AES-GCM message).
//!    Each has a cache of memory → disk → origin, read whole once and settled so every
//!    stored chunk has a file in the disk tier. Then, in rounds, each side reads 4 KiB at
//!    one random 4 KiB-aligned offset of every stored chunk, in a random order, one read
//!    at a time (`ImageDevice::read_at`, QD1), after `drop_memory()`: every read is served
//!    by the disk tier, which the tier counters must show (the run fails otherwise). The
//!    chunk files stay in the OS page cache, so this is the tier's own cost (open the
//!    file, check a v2 header, `pread` a segment or a whole v1 chunk, AES-GCM), not the
//!    disk's. The yardstick is `pread` of 4 KiB from a plain file holding the same image,
//!    as nbdkit's file plugin does, at the same offsets. The four sides take turns
//!    within each round.
//! 2. **AZ: time until the segment a read needs is usable.** Six memcached processes
//!    (`-m 256 -I 2m`) on loopback as the fleet, k = 4, m = 2, an [`AzTier`] holding v2
//!    chunks of the same image. A sample is `AzTier::get` of a chunk and
//!    [`HeaderChecked::open_segment`] of a random segment (what the cache does before it
//!    answers), beside one plain memcached GET of the same object stored whole under
//!    another key on one of those processes (the same client, `lode_az::memcache`), and
//!    `AzTier::get` followed by [`HeaderChecked::finish`] (the whole-object check, for
//!    contrast). The three take turns; the first is also split into the tier's get and
//!    `open_segment` (hash and decrypt one segment).
//!
//! ```text
//! cargo bench -p lode-read --bench segment
//! BENCH_JSON=segment.json cargo bench -p lode-read --bench segment
//! ```
//!
//! Prints a markdown table per part; with `BENCH_JSON` set, also writes the figures there
//! as JSON. Without memcached installed, part 2 is skipped with a reason.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_az::AzConfig;
use lode_az::memcache::Connection;
use lode_blockdev::BlockDevice;
use lode_format::{ChunkFormat, ChunkKey, Codec, SegmentIndex, SegmentSize};
use lode_image::{NoProgress, PublishOptions, Publisher};
use lode_kms::{Keyring, Kms};
use lode_read::{
    AzTier, CacheBuilder, Checked, ChunkCache, ChunkOrigin, ChunkRef, ChunkTier, DiskTier, Found,
    HeaderChecked, ImageDevice, MemoryTier, MetricsSnapshot, StoreOrigin,
};
use lode_store::Store;
use lode_testkit::{Memcached, fill_seeded};
use serde_json::{Value, json};

const CHUNK: u64 = 512 * 1024;
const IMAGE: u64 = 64 << 20;
const BLOCK: u64 = 4096;
/// Rounds of the disk part: each reads every stored chunk once per side.
const ROUNDS: usize = 20;
const MIN_DISK_READS: usize = 2000;
/// Chunks put into the AZ fleet, and samples of each kind.
const AZ_CHUNKS: usize = 32;
const AZ_SAMPLES: usize = 1200;
const AZ_WARMUP: usize = 64;

/// xorshift64: a fixed sequence, so every run reads the same offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = usize::try_from(self.below(i as u64 + 1)).expect("an index");
            v.swap(i, j);
        }
    }
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("fits in memory")
}

/// The image: seeded bytes per 4 KiB block, with about one block in five all zero (free
/// space) and every 32nd chunk all zero (not stored).
fn image_bytes() -> Vec<u8> {
    let mut v = vec![0u8; usize_of(IMAGE)];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for (b, block) in v.chunks_mut(usize_of(BLOCK)).enumerate() {
        let chunk = b as u64 * BLOCK / CHUNK;
        let zero = chunk % 32 == 7 || rng.below(5) == 0;
        if !zero {
            fill_seeded(block, b as u64 + 1);
        }
    }
    v
}

/// Latencies of one kind, sorted.
struct Lat(Vec<Duration>);

impl Lat {
    fn sorted(mut v: Vec<Duration>) -> Lat {
        v.sort();
        Lat(v)
    }

    /// Nearest rank of `per_mille`/1000, in µs.
    fn q(&self, per_mille: usize) -> f64 {
        let last = self.0.len() - 1;
        self.0[((last * per_mille + 500) / 1000).min(last)].as_secs_f64() * 1e6
    }

    fn mean(&self) -> f64 {
        self.0.iter().map(Duration::as_secs_f64).sum::<f64>() / self.0.len() as f64 * 1e6
    }

    fn json(&self) -> Value {
        json!({
            "samples": self.0.len(),
            "p50_us": self.q(500),
            "p99_us": self.q(990),
            "mean_us": self.mean(),
        })
    }
}

fn hits(s: &MetricsSnapshot, tier: &str) -> u64 {
    s.tier(tier)
        .unwrap_or_else(|| panic!("the cache has no {tier} tier"))
        .hits
}

/// One published copy of the image with its own cache of memory → disk → origin.
struct Side {
    label: &'static str,
    cache: Arc<ChunkCache>,
    device: ImageDevice,
    lat: Vec<Duration>,
    disk_hits: u64,
}

async fn publish(
    store: &Store,
    kms: &Keyring,
    image: &Path,
    format: Option<ChunkFormat>,
) -> String {
    let published = Publisher::new(store, kms, kms.default_key_id())
        .publish_file(
            image,
            &PublishOptions {
                chunk_format: format,
                ..PublishOptions::default()
            },
            Arc::new(NoProgress),
        )
        .await
        .expect("publish the image");
    published.id.to_hex()
}

async fn side(
    label: &'static str,
    store: &Store,
    kms: &Keyring,
    id: &str,
    cache_dir: &Path,
) -> Side {
    let cache = CacheBuilder::new()
        .decrypted_bytes(256 << 20)
        .tier(Arc::new(MemoryTier::new(256 << 20)))
        .tier(Arc::new(
            DiskTier::open(cache_dir, 1 << 30).expect("open the disk tier"),
        ))
        .origin(Arc::new(StoreOrigin::new(store.clone())))
        .build()
        .expect("build the cache");
    let opened = lode_read::open_image(store, Some(kms), id)
        .await
        .expect("open the image");
    let device = ImageDevice::new(Arc::clone(&cache), opened).expect("a device");
    Side {
        label,
        cache,
        device,
        lat: Vec::new(),
        disk_hits: 0,
    }
}

/// Reads every chunk once through the cache and waits until the disk tier holds a file
/// for each.
async fn warm(side: &Side, stored: &[u64], cache_dir: &Path) {
    for &i in stored {
        side.device.chunk(i).await.expect("read a chunk");
    }
    side.cache.settle().await;
    let files = std::fs::read_dir(cache_dir)
        .expect("list the disk tier")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))
        })
        .count();
    assert_eq!(
        files,
        stored.len(),
        "{}: chunk files in the disk tier after reading every stored chunk",
        side.label
    );
}

/// One batch: memory dropped, then 4 KiB at each offset, one at a time. Every read must
/// be a disk-tier hit.
async fn cache_batch(side: &mut Side, offsets: &[u64], image: &[u8]) {
    side.cache.drop_memory();
    let before = side.cache.snapshot();
    let mut buf = vec![0u8; usize_of(BLOCK)];
    for &off in offsets {
        let t = Instant::now();
        side.device
            .read_at(off, &mut buf)
            .await
            .expect("read 4 KiB");
        side.lat.push(t.elapsed());
        assert!(
            buf[..] == image[usize_of(off)..usize_of(off + BLOCK)],
            "{}: wrong bytes at {off}",
            side.label
        );
    }
    let after = side.cache.snapshot();
    let delta = |tier| hits(&after, tier) - hits(&before, tier);
    let n = offsets.len() as u64;
    assert_eq!(
        (
            delta("disk"),
            delta("memory"),
            delta("origin"),
            delta("decrypted")
        ),
        (n, 0, 0, 0),
        "{}: {n} reads must be {n} disk-tier hits and nothing else (disk, memory, origin, \
         decrypted)",
        side.label
    );
    side.disk_hits += n;
}

fn pread_batch(file: &File, offsets: &[u64], image: &[u8], lat: &mut Vec<Duration>) {
    let mut buf = vec![0u8; usize_of(BLOCK)];
    for &off in offsets {
        let t = Instant::now();
        file.read_exact_at(&mut buf, off).expect("pread 4 KiB");
        lat.push(t.elapsed());
        assert!(buf[..] == image[usize_of(off)..usize_of(off + BLOCK)]);
    }
}

struct DiskPart {
    v2: Lat,
    raw: Lat,
    v1: Lat,
    pread: Lat,
    v2_hits: u64,
    raw_hits: u64,
    v1_hits: u64,
    stored: usize,
}

async fn disk_part(dir: &Path, image: &[u8]) -> (DiskPart, Store, Keyring, String) {
    let image_path = dir.join("image.raw");
    std::fs::write(&image_path, image).expect("write the image file");
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir).expect("create the store");
    let store = Store::open(store_dir.to_str().expect("a UTF-8 path")).expect("open the store");
    let kms = Keyring::open_or_create(dir.join("keyring")).expect("a keyring");
    let v2_id = publish(&store, &kms, &image_path, None).await;
    let v1_id = publish(&store, &kms, &image_path, Some(ChunkFormat::V1)).await;
    let raw_format = ChunkFormat::V2 {
        segment_size: SegmentSize::DEFAULT,
        codec: Codec::None,
    };
    let raw_id = publish(&store, &kms, &image_path, Some(raw_format)).await;
    let (v2_cache, v1_cache) = (dir.join("cache-v2"), dir.join("cache-v1"));
    let raw_cache = dir.join("cache-raw");
    let mut v2 = side("v2", &store, &kms, &v2_id, &v2_cache).await;
    let mut v1 = side("v1", &store, &kms, &v1_id, &v1_cache).await;
    let mut raw = side("raw", &store, &kms, &raw_id, &raw_cache).await;
    assert!(
        matches!(v2.device.chunk_ref(0), Ok(Some((c, _))) if matches!(c.format, ChunkFormat::V2 { .. })),
        "the default format is not v2"
    );
    let chunks = IMAGE / CHUNK;
    let stored: Vec<u64> = (0..chunks)
        .filter(|&i| !v2.device.is_zero_chunk(i))
        .collect();
    warm(&v2, &stored, &v2_cache).await;
    warm(&v1, &stored, &v1_cache).await;
    warm(&raw, &stored, &raw_cache).await;

    let file = File::open(&image_path).expect("open the image file");
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    let mut pread = Vec::new();
    for round in 0..ROUNDS {
        let mut order = stored.clone();
        rng.shuffle(&mut order);
        let offsets: Vec<u64> = order
            .iter()
            .map(|&i| i * CHUNK + rng.below(CHUNK / BLOCK) * BLOCK)
            .collect();
        for turn in 0..4 {
            match (round + turn) % 4 {
                0 => cache_batch(&mut v2, &offsets, image).await,
                1 => cache_batch(&mut v1, &offsets, image).await,
                2 => cache_batch(&mut raw, &offsets, image).await,
                _ => pread_batch(&file, &offsets, image, &mut pread),
            }
        }
    }
    let part = DiskPart {
        v2_hits: v2.disk_hits,
        v1_hits: v1.disk_hits,
        raw_hits: raw.disk_hits,
        raw: Lat::sorted(raw.lat),
        v2: Lat::sorted(v2.lat),
        v1: Lat::sorted(v1.lat),
        pread: Lat::sorted(pread),
        stored: stored.len(),
    };
    assert!(part.v2.0.len() >= MIN_DISK_READS, "too few reads");
    (part, store, kms, v2_id)
}

struct AzPart {
    segment: Lat,
    /// The part of `segment` after the tier returned: hash and decrypt one segment.
    open: Lat,
    whole: Lat,
    get: Lat,
    object_bytes: usize,
}

/// A v2 chunk in the fleet: where it is, its key, its object and its plaintext.
struct AzChunk {
    chunk: ChunkRef,
    key: ChunkKey,
    object: Bytes,
    plain_at: u64,
}

async fn header_checked(tier: &AzTier, c: &AzChunk, j: SegmentIndex) -> HeaderChecked {
    match tier.get(&c.chunk, j).await {
        Ok(Some(Found::HeaderChecked(h))) => h,
        other => panic!("the AZ tier gave {other:?} for {}", c.chunk.name),
    }
}

async fn az_part(
    fleet: &[Memcached],
    store: &Store,
    kms: &Keyring,
    id: &str,
    image: &[u8],
) -> AzPart {
    let opened = lode_read::open_image(store, Some(kms), id)
        .await
        .expect("open the image");
    // A device only to resolve chunk references and keys; its cache is never read.
    let cache = CacheBuilder::new()
        .origin(Arc::new(StoreOrigin::new(store.clone())))
        .build()
        .expect("build a cache");
    let device = ImageDevice::new(cache, opened).expect("a device");
    let origin = StoreOrigin::new(store.clone());

    let mut cfg = AzConfig::new(fleet.iter().map(|m| m.addr().to_string()));
    (cfg.k, cfg.m) = (4, 2);
    cfg.node_timeout = Duration::from_millis(500);
    let tier = AzTier::new(cfg).expect("an AZ tier");
    let mut plain = Connection::connect(&fleet[0].addr().to_string(), 1 << 20)
        .await
        .expect("connect to memcached");

    let mut chunks = Vec::new();
    for i in (0..IMAGE / CHUNK).filter(|&i| !device.is_zero_chunk(i)) {
        if chunks.len() == AZ_CHUNKS {
            break;
        }
        let (chunk, key) = device
            .chunk_ref(i)
            .expect("a chunk reference")
            .expect("a stored chunk");
        let object = origin
            .fetch(&chunk)
            .await
            .expect("fetch from the store")
            .expect("the store holds the chunk");
        let checked = Checked::check("origin", &chunk, object.clone()).expect("a sound chunk");
        tier.put(&chunk, &checked).await;
        assert!(
            plain
                .set(&format!("plain:{}", chunk.name), 0, &object)
                .await
                .expect("set the plain copy"),
            "memcached did not store the plain copy"
        );
        chunks.push(AzChunk {
            chunk,
            key: key.clone(),
            object,
            plain_at: i * CHUNK,
        });
    }
    let object_bytes = chunks[0].object.len();

    let mut rng = Rng(0xa2_5e67_0000_0042);
    let (mut segment, mut open, mut whole, mut get) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in 0..AZ_WARMUP + AZ_SAMPLES {
        let c = &chunks[usize_of(rng.below(chunks.len() as u64))];
        let j = SegmentIndex(
            u32::try_from(rng.below(c.chunk.segment_count() as u64)).expect("a segment"),
        );
        let keep = s >= AZ_WARMUP;
        for turn in 0..3 {
            match (s + turn) % 3 {
                0 => {
                    let t = Instant::now();
                    let h = header_checked(&tier, c, j).await;
                    let fetched = t.elapsed();
                    let got = h
                        .open_segment("az", &c.chunk, &c.key, j)
                        .expect("open the segment");
                    let d = t.elapsed();
                    let seg = u64::from(c.chunk.segment_len());
                    let at = usize_of(c.plain_at + u64::from(j.0) * seg);
                    assert!(got[..] == image[at..at + got.len()], "wrong plaintext");
                    if keep {
                        segment.push(d);
                        open.push(d - fetched);
                    }
                }
                1 => {
                    let t = Instant::now();
                    let h = header_checked(&tier, c, j).await;
                    let checked = h.finish("az", &c.chunk).expect("the whole object checks");
                    let d = t.elapsed();
                    assert_eq!(checked.bytes().len(), c.object.len());
                    if keep {
                        whole.push(d);
                    }
                }
                _ => {
                    let t = Instant::now();
                    let got = plain
                        .get(&format!("plain:{}", c.chunk.name))
                        .await
                        .expect("a plain get");
                    let d = t.elapsed();
                    assert_eq!(got.as_deref(), Some(&c.object[..]), "the plain copy");
                    if keep {
                        get.push(d);
                    }
                }
            }
        }
    }
    let m = tier.metrics();
    assert_eq!(
        (m.misses, m.integrity_failures),
        (0, 0),
        "the AZ client missed or found a bad chunk"
    );
    AzPart {
        segment: Lat::sorted(segment),
        open: Lat::sorted(open),
        whole: Lat::sorted(whole),
        get: Lat::sorted(get),
        object_bytes,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = image_bytes();
    let mut report = json!({});
    rt.block_on(async {
        let (disk, store, kms, v2_id) = disk_part(dir.path(), &image).await;
        println!(
            "\n4 KiB random reads at QD1, disk tier, memory dropped before each batch \
             ({} stored chunks of {} MiB; chunk files in the OS page cache)\n",
            disk.stored,
            IMAGE >> 20
        );
        println!("| side | reads | disk-tier hits | p50 µs | p99 µs | mean µs | p50 / pread |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let base = disk.pread.q(500);
        for (what, lat, hits) in [
            (
                "lode v2, lz4, 16 KiB segments (the default)",
                &disk.v2,
                Some(disk.v2_hits),
            ),
            (
                "lode v2, as is, 32 KiB segments",
                &disk.raw,
                Some(disk.raw_hits),
            ),
            ("lode v1 (whole chunk)", &disk.v1, Some(disk.v1_hits)),
            ("pread of a plain file", &disk.pread, None),
        ] {
            println!(
                "| {what} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1}x |",
                lat.0.len(),
                hits.map_or("–".to_string(), |h| h.to_string()),
                lat.q(500),
                lat.q(990),
                lat.mean(),
                lat.q(500) / base
            );
        }
        println!(
            "\nv1 p50 / v2 p50: {:.1}x; lz4 adds {:.1} µs at p50 to a 32 KiB segment sealed as \
             is; target v2 p50 <= 50 µs: {}",
            disk.v1.q(500) / disk.v2.q(500),
            disk.v2.q(500) - disk.raw.q(500),
            if disk.v2.q(500) <= 50.0 {
                "met"
            } else {
                "not met"
            }
        );
        report["disk"] = json!({
            "image_bytes": IMAGE,
            "stored_chunks": disk.stored,
            "v2": disk.v2.json(),
            "v2_disk_hits": disk.v2_hits,
            "v2_raw_32k": disk.raw.json(),
            "v2_raw_32k_disk_hits": disk.raw_hits,
            "v1": disk.v1.json(),
            "v1_disk_hits": disk.v1_hits,
            "pread": disk.pread.json(),
        });

        let Some(fleet) = (0..6)
            .map(|_| Memcached::start(256))
            .collect::<Option<Vec<_>>>()
        else {
            return;
        };
        let az = az_part(&fleet, &store, &kms, &v2_id, &image).await;
        let ratio = az.segment.q(500) / az.get.q(500);
        println!(
            "\nAZ tier k=4 m=2 over six memcached on loopback: a {}-byte v2 object, QD1\n",
            az.object_bytes
        );
        println!("| what | samples | p50 µs | p99 µs | mean µs | p50 / plain get |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (what, lat) in [
            ("AzTier get + open_segment (one segment)", &az.segment),
            ("of which open_segment (hash + decrypt)", &az.open),
            ("AzTier get + finish (whole object checked)", &az.whole),
            ("plain memcached GET of the object", &az.get),
        ] {
            println!(
                "| {what} | {} | {:.1} | {:.1} | {:.1} | {:.2}x |",
                lat.0.len(),
                lat.q(500),
                lat.q(990),
                lat.mean(),
                lat.q(500) / az.get.q(500)
            );
        }
        println!(
            "\np50(az segment) / p50(get): {ratio:.2}x; target <= 1.5x: {}",
            if ratio <= 1.5 { "met" } else { "not met" }
        );
        report["az"] = json!({
            "k": 4,
            "m": 2,
            "object_bytes": az.object_bytes,
            "segment": az.segment.json(),
            "open_segment": az.open.json(),
            "whole": az.whole.json(),
            "plain_get": az.get.json(),
            "ratio_p50_segment_to_get": ratio,
        });
    });
    if let Ok(path) = std::env::var("BENCH_JSON") {
        let text = serde_json::to_string_pretty(&report).expect("JSON of plain values");
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("write {path}: {e}"));
        println!("\nwrote {path}");
    }
}
