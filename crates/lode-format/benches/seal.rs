//! Sealing a 512 KiB chunk (hash, derive, encrypt, name), as v1, as v2 in 32 KiB segments
//! (codec 0) and as v2 in 16 KiB lz4-compressed segments (codec 1, the measured choice),
//! against the sum of the same `ring` primitives run alone. The goal: sealing without
//! compression reaches at least 90% of the throughput the primitives allow, in either
//! format; with compression, the figures show what lz4 adds.
//! Opening shows what v2 is for: a read of a few KiB pays for one segment and the header,
//! not for the whole chunk.
//!
//! Two chunks: `noise`, bytes that do not compress (what lz4 costs when it saves
//! nothing, every segment then stored raw), and `text`, this crate's own source repeated
//! (every 16 KiB segment compresses, to about half). Each v2 layout's object size is
//! printed as it is set up. Run: `cargo bench -p lode-format --bench seal`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use lode_format::chunk::{open_chunk, seal_chunk, seal_chunk_in_place};
use lode_format::{
    Codec, RootSalt, SealedChunkV2, SegmentIndex, SegmentSize, open_chunk_v2, open_segment,
    seal_chunk_v2, verify_header,
};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::{digest, hmac};

const CHUNK: usize = 512 * 1024;

/// Bytes that do not compress.
fn noise() -> Vec<u8> {
    lode_testkit::seeded_bytes(CHUNK, 13)
}

/// Rust source, repeated to a chunk: text that lz4 compresses by about half.
fn text() -> Vec<u8> {
    let src = [
        include_str!("../src/segment.rs"),
        include_str!("../src/manifest.rs"),
        include_str!("../src/ids.rs"),
        include_str!("../src/object.rs"),
        include_str!("../src/chunk.rs"),
    ]
    .concat();
    src.bytes().cycle().take(CHUNK).collect()
}

/// The primitives alone, on a buffer that is reused: SHA-256 of the plaintext, one HMAC,
/// AES-256-GCM in place, SHA-256 of the ciphertext. No allocation, no copies.
fn primitives(buf: &mut [u8], salt: &hmac::Key) {
    let d = digest::digest(&digest::SHA256, buf);
    let k = hmac::sign(salt, d.as_ref());
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k.as_ref()[..32]).unwrap());
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key([0; 12]), Aad::empty(), buf)
        .unwrap();
    black_box(&tag);
    black_box(digest::digest(&digest::SHA256, buf));
}

/// The v2 layouts measured: (label, segment size, codec).
fn layouts() -> [(&'static str, SegmentSize, Codec); 2] {
    [
        ("none_32KiB", SegmentSize::DEFAULT, Codec::None),
        ("lz4_16KiB", SegmentSize::LZ4, Codec::Lz4),
    ]
}

fn bench(c: &mut Criterion) {
    let salt = RootSalt::from_bytes([7; 32]);
    let hkey = hmac::Key::new(hmac::HMAC_SHA256, salt.expose());
    let chunks = [("noise", noise()), ("text", text())];
    let src = &chunks[0].1;

    let mut g = c.benchmark_group("seal_512KiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("ring_primitives_alone", |b| {
        let mut buf = src.clone();
        b.iter(|| primitives(&mut buf, &hkey))
    });
    // lode's seal takes an owned buffer (the import path reads each chunk into a fresh
    // one); refilling that buffer from the source is part of the measured cost.
    g.bench_function("v1_noise", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut buf = Vec::with_capacity(CHUNK + 16);
                buf.extend_from_slice(src);
                let t = Instant::now();
                black_box(seal_chunk_in_place(&salt, buf));
                total += t.elapsed();
            }
            total
        })
    });
    // v2 copies the plaintext (or its compressed form) into the object (its header comes
    // first and a tag follows each segment), so that copy is part of the measured cost.
    for (label, plain) in &chunks {
        for (layout, s, codec) in layouts() {
            g.bench_function(format!("v2_{layout}_{label}"), |b| {
                b.iter(|| black_box(seal_chunk_v2(&salt, black_box(plain), s, codec).unwrap()))
            });
        }
    }
    g.finish();

    let v1 = seal_chunk(&salt, src);
    let mut g = c.benchmark_group("open_512KiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("v1_noise", |b| {
        b.iter(|| black_box(open_chunk(&v1.name, &v1.key, &v1.ciphertext).unwrap()))
    });
    for (label, plain) in &chunks {
        for (layout, s, codec) in layouts() {
            let v2 = seal_chunk_v2(&salt, plain, s, codec).unwrap();
            eprintln!(
                "v2 {layout} {label}: a {CHUNK}-byte chunk is a {}-byte object",
                v2.object.len()
            );
            g.bench_function(format!("v2_{layout}_{label}"), |b| {
                b.iter(|| black_box(open_chunk_v2(&v2.name, &v2.key, &v2.object).unwrap()))
            });
        }
    }
    g.finish();

    // One read inside the chunk: check the header against the name, then check, open and
    // (codec 1) decompress the one segment holding the bytes. Throughput counts the
    // segment's plaintext.
    let mut g = c.benchmark_group("open_one_segment");
    for (label, plain) in &chunks {
        for (layout, s, codec) in layouts() {
            let v2 = seal_chunk_v2(&salt, plain, s, codec).unwrap();
            one_segment(&mut g, &format!("v2_{layout}_{label}"), &v2, s);
        }
    }
    g.finish();
}

/// Benchmarks checking the header and opening segment 5 of `v2`.
fn one_segment(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    v2: &SealedChunkV2,
    s: SegmentSize,
) {
    g.throughput(Throughput::Bytes(s.bytes_u64()));
    let j = SegmentIndex(5);
    let range = verify_header(&v2.name, &v2.object)
        .unwrap()
        .segment_range(j)
        .unwrap();
    let range = usize::try_from(range.start).unwrap()..usize::try_from(range.end).unwrap();
    g.bench_function(id, |b| {
        b.iter(|| {
            let h = verify_header(&v2.name, &v2.object[..v2.header_len]).unwrap();
            black_box(open_segment(&h, &v2.key, j, &v2.object[range.clone()]).unwrap())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
