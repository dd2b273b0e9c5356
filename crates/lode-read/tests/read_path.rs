//! The read path against a real published image: NBD clients, fetch counts, integrity,
//! single-flight, overlay writes, eviction.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::{CHUNK, Fixture, distinct_stored, run, run_ok, tool};
use lode_blockdev::BlockDevice;
use lode_nbd::{Errno, Export, Exports, Server};
use lode_read::{ChunkOrigin, ChunkRef, MemoryTier, Overlay, ReadError, StoreOrigin};

struct Served {
    server: Server,
    addr: std::net::SocketAddr,
    sock: std::path::PathBuf,
}

async fn serve(fx: &Fixture, name: &str, dev: Arc<dyn BlockDevice>) -> Served {
    let exports = Exports::new();
    exports.add(name, Export::new(dev)).unwrap();
    let server = Server::builder(exports).build().unwrap();
    let addr = server
        .listen_tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let sock = fx.dir.path().join(format!("{name}.sock"));
    server.listen_unix(&sock).unwrap();
    Served { server, addr, sock }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_clients_read_the_image_byte_for_byte() {
    let fx = Fixture::new().await;
    let (cache, _) = fx.cache(64 << 20, 64 << 20, 64 << 20);
    let dev = Arc::new(fx.device(&cache).await);
    let srv = serve(&fx, "img", dev).await;
    let tcp = format!("nbd://{}/img", srv.addr);
    let unix = format!("nbd+unix:///img?socket={}", srv.sock.display());

    if let Some(nbdinfo) = tool("nbdinfo") {
        let mut c = Command::new(nbdinfo);
        c.args(["--size", &tcp]);
        let out = run_ok(c).await;
        let size: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(size, fx.image.len() as u64);
    }
    if let Some(nbdcopy) = tool("nbdcopy") {
        let copy = fx.dir.path().join("copy.raw");
        let mut c = Command::new(nbdcopy);
        c.arg(&unix).arg(&copy);
        run_ok(c).await;
        let got = std::fs::read(&copy).unwrap();
        assert!(
            got == fx.image,
            "nbdcopy of the export differs from the image"
        );
    }
    if let Some(qemu_img) = tool("qemu-img") {
        let mut c = Command::new(&qemu_img);
        c.args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&fx.image_path)
            .arg(format!("nbd:127.0.0.1:{}:exportname=img", srv.addr.port()));
        run_ok(c).await;
    }
    let s = cache.snapshot();
    assert_eq!(s.tier("origin").unwrap().hits, distinct_stored(0..10));
    assert_eq!(s.read_errors, 0);
    srv.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_chunks_read_are_fetched_and_rereads_hit_the_tiers() {
    let fx = Fixture::new().await;
    let (cache, _) = fx.cache(64 << 20, 64 << 20, 64 << 20);
    let dev = fx.device(&cache).await;
    // 4 KiB in chunk 0, 8 KiB across chunks 1|2, a read inside zero chunk 3, 4 KiB in
    // chunk 5 (the same bytes as chunk 1), and the short tail of chunk 9.
    let reads: [(u64, usize); 5] = [
        (4096, 4096),
        (2 * CHUNK - 4096, 8192),
        (3 * CHUNK + 100, 5000),
        (5 * CHUNK + 8192, 4096),
        (9 * CHUNK + 1000, 11 * 1024),
    ];
    let touched: Vec<u64> = reads
        .iter()
        .flat_map(|(o, l)| dev.chunks_touched(*o, *l as u64))
        .collect();
    for (o, l) in reads {
        let mut buf = vec![0xAA; l];
        dev.read_at(o, &mut buf).await.unwrap();
        let o = usize::try_from(o).unwrap();
        assert!(buf == fx.image[o..o + l], "read at {o} differs");
    }
    let s = cache.snapshot();
    let origin = s.tier("origin").unwrap();
    assert_eq!(origin.hits, distinct_stored(touched.clone()));
    assert_eq!(origin.hits, 4, "chunks 0, 1, 2, 9 (5 is 1 again)");
    assert_eq!(s.zero_chunk_reads, 1);
    assert!(origin.bytes < 5 * CHUNK, "{origin:?}");

    // Again: all from decrypted memory.
    for (o, l) in reads {
        let mut buf = vec![0; l];
        dev.read_at(o, &mut buf).await.unwrap();
    }
    let s2 = cache.snapshot();
    assert_eq!(s2.tier("origin").unwrap().hits, 4);
    assert!(s2.tier("decrypted").unwrap().hits >= s.tier("decrypted").unwrap().hits + 5);

    // Memory cold: the disk tier answers, nothing goes to the origin.
    cache.settle().await;
    cache.drop_memory();
    let mut buf = vec![0; 4096];
    dev.read_at(4096, &mut buf).await.unwrap();
    assert!(buf == fx.image[4096..8192]);
    let s3 = cache.snapshot();
    assert_eq!(s3.tier("origin").unwrap().hits, 4);
    assert_eq!(s3.tier("disk").unwrap().hits, 1);
    assert_eq!(
        s3.tier("memory").unwrap().misses,
        s2.tier("memory").unwrap().misses + 1
    );
    let json: serde_json::Value = serde_json::from_str(&s3.to_json()).unwrap();
    assert_eq!(json["tiers"][3]["name"], "origin");
    assert!(
        s3.to_prometheus()
            .contains("lode_tier_hits_total{tier=\"disk\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotted_disk_cache_chunk_is_dropped_and_refetched() {
    let fx = Fixture::new().await;
    let (cache, cache_dir) = fx.cache(64 << 20, 64 << 20, 64 << 20);
    let dev = fx.device(&cache).await;
    let mut buf = vec![0; 4096];
    dev.read_at(CHUNK + 4096, &mut buf).await.unwrap();
    cache.settle().await;
    cache.drop_memory();

    let files: Vec<_> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[4096 + 17] ^= 0x01;
    std::fs::write(&files[0], &bytes).unwrap();

    let mut buf = vec![0; 4096];
    dev.read_at(CHUNK + 4096, &mut buf).await.unwrap();
    let at = usize::try_from(CHUNK).unwrap() + 4096;
    assert!(buf == fx.image[at..at + 4096]);
    let s = cache.snapshot();
    assert_eq!(s.tier("disk").unwrap().integrity_failures, 1);
    assert_eq!(s.tier("disk").unwrap().hits, 0);
    assert_eq!(s.tier("origin").unwrap().hits, 2);
    // The refetched chunk went back to disk, correct this time.
    cache.settle().await;
    let again = std::fs::read(&files[0]).unwrap();
    let name: lode_format::ChunkName = files[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    lode_format::check_object(&name, &again).unwrap();
}

/// An image published in chunk format v1, as every image before v2 was, still reads byte
/// for byte through every tier, and so does the same image in v2; the two share no chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_images_read_byte_for_byte_through_every_tier() {
    let v2 = lode_format::ChunkFormat::V2 {
        segment_size: lode_format::SegmentSize::DEFAULT,
        codec: lode_format::Codec::None,
    };
    for format in [lode_format::ChunkFormat::V1, v2] {
        let fx = Fixture::with_format(Some(format)).await;
        let (cache, _) = fx.cache(64 << 20, 64 << 20, 64 << 20);
        let dev = fx.device(&cache).await;
        let mut all = vec![0u8; fx.image.len()];
        // From the origin, then from memory, then from disk alone.
        for round in 0..3 {
            if round == 2 {
                cache.settle().await;
                cache.drop_memory();
            }
            all.fill(0xAA);
            dev.read_at(0, &mut all).await.unwrap();
            assert!(all == fx.image, "{format:?}, round {round}: wrong bytes");
        }
        let s = cache.snapshot();
        assert_eq!(
            s.tier("origin").unwrap().hits,
            distinct_stored(0..10),
            "{format:?}"
        );
        // From disk, each segment is read and opened alone: a hit a segment.
        let mut names = std::collections::HashSet::new();
        let segments: usize = (0..10)
            .filter_map(|i| dev.chunk_ref(i).unwrap())
            .filter(|(c, _)| names.insert(c.name))
            .map(|(c, _)| c.segment_count())
            .sum();
        assert_eq!(s.tier("disk").unwrap().hits, segments as u64, "{format:?}");
        assert_eq!(s.tier("disk").unwrap().integrity_failures, 0);
        assert_eq!(s.read_errors, 0, "{format:?}");
        let opened = lode_read::open_image(&fx.store, Some(&fx.kms), &fx.id)
            .await
            .unwrap();
        assert_eq!(opened.manifest.header().chunk_format, format);
    }
}

/// A v2 object at the origin with one changed segment: the read fails naming the chunk,
/// the segment and the tier, and never returns a wrong byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_segment_changed_at_the_origin_is_named() {
    let fx = Fixture::with_format(Some(lode_format::ChunkFormat::V2 {
        segment_size: lode_format::SegmentSize::DEFAULT,
        codec: lode_format::Codec::None,
    }))
    .await;
    let (cache, _) = fx.cache(64 << 20, 64 << 20, 64 << 20);
    let dev = fx.device(&cache).await;
    for f in fx.store_chunk_files() {
        let mut b = std::fs::read(&f).unwrap();
        let at = b.len() - 100;
        b[at] ^= 0x04;
        std::fs::write(&f, &b).unwrap();
    }
    // Segment 15 of chunk 0: the read fails naming the chunk, the segment and the tier.
    let mut buf = vec![0; 4096];
    let err = dev.read_at(15 * 32768, &mut buf).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("segment 15 is corrupt") && msg.contains("from tier origin"),
        "{msg}"
    );
    assert!(buf.iter().all(|b| *b == 0));
    assert_eq!(
        cache.snapshot().tier("origin").unwrap().integrity_failures,
        1
    );
    // Segment 0 of the same object checks against the header, so it is served, right;
    // the rest is hashed in the background, fails, and nothing is kept.
    dev.read_at(0, &mut buf).await.unwrap();
    assert!(buf == fx.image[..4096]);
    cache.settle().await;
    let s = cache.snapshot();
    assert_eq!(s.tier("origin").unwrap().integrity_failures, 2);
    assert_eq!(s.tier("memory").unwrap().used_bytes, Some(0));
    assert_eq!(s.tier("disk").unwrap().used_bytes, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_origin_chunk_is_an_error_never_wrong_bytes() {
    let fx = Fixture::new().await;
    let (cache, _) = fx.cache(64 << 20, 64 << 20, 64 << 20);
    let dev = Arc::new(fx.device(&cache).await);
    // Corrupt every stored chunk's first byte of ciphertext.
    for f in fx.store_chunk_files() {
        let mut b = std::fs::read(&f).unwrap();
        b[0] ^= 0xFF;
        std::fs::write(&f, &b).unwrap();
    }
    let mut buf = vec![0; 4096];
    let err = dev.read_at(0, &mut buf).await.unwrap_err();
    assert_eq!(Errno::from(&err), Errno::EIO);
    let msg = err.to_string();
    assert!(
        msg.contains("is corrupt") && msg.contains("from tier origin"),
        "{msg}"
    );
    let s = cache.snapshot();
    assert_eq!(s.tier("origin").unwrap().integrity_failures, 1);
    assert_eq!(s.read_errors, 1);
    // A zero chunk still reads (no fetch); a stored one fails again rather than serving
    // anything cached from the failed attempt.
    dev.read_at(3 * CHUNK, &mut buf).await.unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    assert!(dev.read_at(CHUNK, &mut buf).await.is_err());

    // Through NBD: the client gets EIO.
    if let Some(nbdcopy) = tool("nbdcopy") {
        let srv = serve(&fx, "bad", dev.clone()).await;
        let mut c = Command::new(nbdcopy);
        c.arg(format!("nbd://{}/bad", srv.addr))
            .arg(fx.dir.path().join("out.raw"));
        let out = run(c).await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("Input/output error") || stderr.contains("EIO"),
            "{stderr}"
        );
        srv.server.shutdown().await;
    }
}

/// Every chunk object replaced by a 4 GiB sparse file: each origin fetch is refused by
/// size before it is read (the chunk's sealed length in its format is the bound: 512 KiB
/// plus a 596-byte v2 header and a 16-byte tag on each of 16 segments), so
/// concurrent reads of every chunk neither allocate nor serve anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_origin_chunks_are_refused_unread() {
    let fx = Fixture::new().await;
    let (cache, _) = fx.cache(64 << 20, 64 << 20, 64 << 20);
    let dev = Arc::new(fx.device(&cache).await);
    for f in fx.store_chunk_files() {
        std::fs::File::create(&f).unwrap().set_len(4 << 30).unwrap();
    }
    let reads = (0..3u64).map(|i| {
        let dev = dev.clone();
        async move {
            let mut buf = vec![0; 4096];
            dev.read_at(i * CHUNK, &mut buf).await
        }
    });
    for r in futures::future::join_all(reads).await {
        let msg = r.unwrap_err().to_string();
        let most = lode_image::new_chunk_format(lode_format::ChunkSize::DEFAULT)
            .object_len(usize::try_from(CHUNK).unwrap());
        assert!(
            msg.contains(&format!(
                "is 4294967296 bytes, more than the {most} a chunk may be"
            )),
            "{msg}"
        );
    }
}

/// The origin, slowed down so that concurrent misses overlap.
#[derive(Debug)]
struct SlowCounting {
    inner: StoreOrigin,
    gets: AtomicU64,
}

#[async_trait]
impl ChunkOrigin for SlowCounting {
    async fn fetch(&self, chunk: &ChunkRef) -> Result<Option<Bytes>, ReadError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.inner.fetch(chunk).await
    }
}

/// Eight readers of one corrupt chunk share one fetch, and every one of them gets the
/// fetch's error with its type (an integrity failure at the origin), not a string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_a_shared_failed_fetch_each_get_its_typed_error() {
    let fx = Fixture::new().await;
    for f in fx.store_chunk_files() {
        let mut b = std::fs::read(&f).unwrap();
        b[0] ^= 0xFF;
        std::fs::write(&f, &b).unwrap();
    }
    let origin = Arc::new(SlowCounting {
        inner: StoreOrigin::new(fx.store.clone()),
        gets: AtomicU64::new(0),
    });
    let cache = fx.cache_with(vec![Arc::new(MemoryTier::new(64 << 20))], origin.clone());
    let dev = Arc::new(fx.device(&cache).await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let dev = Arc::clone(&dev);
            tokio::spawn(async move { dev.chunk(2).await })
        })
        .collect();
    let mut shared = 0;
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        shared += usize::from(matches!(err, ReadError::Shared(_)));
        assert!(
            matches!(
                err.root(),
                ReadError::CorruptObject { tier: "origin", .. }
                    | ReadError::Corrupt { tier: "origin", .. }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("from tier origin"), "{err}");
    }
    assert_eq!(
        origin.gets.load(Ordering::SeqCst),
        1,
        "the fetch was not shared"
    );
    assert!(shared >= 7, "only {shared} readers saw the shared error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_misses_share_one_fetch() {
    let fx = Fixture::new().await;
    let origin = Arc::new(SlowCounting {
        inner: StoreOrigin::new(fx.store.clone()),
        gets: AtomicU64::new(0),
    });
    let cache = fx.cache_with(vec![Arc::new(MemoryTier::new(64 << 20))], origin.clone());
    let dev = Arc::new(fx.device(&cache).await);
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let dev = Arc::clone(&dev);
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                dev.read_at(2 * CHUNK + i * 4096, &mut buf)
                    .await
                    .map(|()| buf)
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let buf = t.await.unwrap().unwrap();
        let at = usize::try_from(2 * CHUNK).unwrap() + i * 4096;
        assert!(buf == fx.image[at..at + 4096]);
    }
    let s = cache.snapshot();
    assert_eq!(origin.gets.load(Ordering::SeqCst), 1);
    assert_eq!(s.tier("origin").unwrap().hits, 1);
    assert_eq!(s.joined_fetches, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_writes_read_back_and_never_touch_the_store() {
    let fx = Fixture::new().await;
    let before = fx.store_digest();
    let (cache, _) = fx.cache(64 << 20, 64 << 20, 64 << 20);
    let size = fx.image.len() as u64;
    let overlay = Overlay::open(fx.dir.path().join("overlay"), size).unwrap();
    let dev = Arc::new(fx.device(&cache).await.with_overlay(overlay).unwrap());
    let mut expect = fx.image.clone();

    // Device level: an unaligned write across a chunk boundary, then zero and trim.
    let at = CHUNK - 1000;
    dev.write_at(at, &[0x5A; 3000]).await.unwrap();
    let a = usize::try_from(at).unwrap();
    expect[a..a + 3000].fill(0x5A);
    dev.write_zeroes(4 * CHUNK + 512, 10_000).await.unwrap();
    let z = usize::try_from(4 * CHUNK + 512).unwrap();
    expect[z..z + 10_000].fill(0);
    dev.trim(6 * CHUNK, 8192).await.unwrap();
    let t = usize::try_from(6 * CHUNK).unwrap();
    expect[t..t + 8192].fill(0);
    dev.flush().await.unwrap();
    let mut all = vec![0; fx.image.len()];
    dev.read_at(0, &mut all).await.unwrap();
    assert!(
        all == expect,
        "device reads differ from the expected overlay view"
    );

    // Through NBD with nbdsh: pwrite, zero, trim, flush, read back.
    if let (Some(nbdsh), Some(path)) = (tool("nbdsh"), common::nbd_python_path()) {
        let srv = serve(&fx, "rw", dev.clone()).await;
        let script = r#"
import os
h.pwrite(b"\xab" * 5000, 7 * 524288 - 100)
h.zero(4096, 8 * 524288)
h.trim(4096, 9 * 524288)
h.flush()
assert h.pread(5000, 7 * 524288 - 100) == b"\xab" * 5000
assert h.pread(4096, 8 * 524288) == bytes(4096)
assert h.pread(4096, 9 * 524288) == bytes(4096)
"#;
        let mut c = Command::new(nbdsh);
        c.arg("-u")
            .arg(format!("nbd+unix:///rw?socket={}", srv.sock.display()))
            .arg("-c")
            .arg(script)
            .env("PATH", path);
        run_ok(c).await;
        let p = usize::try_from(7 * CHUNK - 100).unwrap();
        expect[p..p + 5000].fill(0xAB);
        let z = usize::try_from(8 * CHUNK).unwrap();
        expect[z..z + 4096].fill(0);
        let t = usize::try_from(9 * CHUNK).unwrap();
        expect[t..t + 4096].fill(0);
        if let Some(nbdcopy) = tool("nbdcopy") {
            let copy = fx.dir.path().join("rw.raw");
            let mut c = Command::new(nbdcopy);
            c.arg(format!("nbd://{}/rw", srv.addr)).arg(&copy);
            run_ok(c).await;
            assert!(
                std::fs::read(&copy).unwrap() == expect,
                "nbdcopy of the overlay view differs"
            );
        }
        srv.server.shutdown().await;
    }
    assert_eq!(fx.store_digest(), before, "the store changed");

    // A read-only device refuses writes.
    let ro = fx.device(&cache).await;
    assert!(ro.read_only());
    assert_eq!(
        Errno::from(&ro.write_at(0, &[1]).await.unwrap_err()),
        Errno::EPERM
    );
    // The overlay survives a reopen (bitmap persisted on flush).
    let dev = Arc::try_unwrap(dev).unwrap();
    drop(dev);
    let overlay = Overlay::open(fx.dir.path().join("overlay"), size).unwrap();
    let dev = fx.device(&cache).await.with_overlay(overlay).unwrap();
    let mut all = vec![0; fx.image.len()];
    dev.read_at(0, &mut all).await.unwrap();
    assert!(all == expect, "the reopened overlay differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_caches_stay_within_their_bounds_and_reads_stay_right() {
    let fx = Fixture::new().await;
    // Room for about two chunks in each tier, and two segments decrypted.
    let bound = 2 * CHUNK + 64;
    let (cache, cache_dir) = fx.cache(2 * 32768 + 64, bound, bound);
    let dev = fx.device(&cache).await;
    for round in 0..2 {
        for c in (0..10u64).rev().chain(0..10) {
            let len = dev.chunks_touched(c * CHUNK, 1).end; // 1 past c
            assert_eq!(len, c + 1);
            let off = c * CHUNK + 4096;
            let n = usize::try_from((fx.image.len() as u64 - off).min(8192)).unwrap();
            let mut buf = vec![0; n];
            dev.read_at(off, &mut buf).await.unwrap();
            let o = usize::try_from(off).unwrap();
            assert!(buf == fx.image[o..o + n], "round {round} chunk {c}");
            cache.settle().await;
            let on_disk: u64 = std::fs::read_dir(&cache_dir)
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum();
            assert!(on_disk <= bound, "disk cache holds {on_disk} > {bound}");
            for t in cache.snapshot().tiers {
                if let (Some(u), Some(cap)) = (t.used_bytes, t.capacity_bytes) {
                    assert!(u <= cap, "{} holds {u} > {cap}", t.name);
                }
            }
        }
    }
    let s = cache.snapshot();
    assert!(
        s.tier("origin").unwrap().hits > 7,
        "evictions forced refetches: {s:?}"
    );
}
