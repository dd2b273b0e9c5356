//! Sealing a 512 KiB chunk (hash, derive, encrypt, name), as v1 and as v2 in 32 KiB
//! segments, against the sum of the same `ring` primitives run alone. The goal: sealing
//! reaches at least 90% of the throughput the primitives allow, in either format.
//! Opening shows what v2 is for: a read of a few KiB pays for one 32 KiB segment and the
//! header, not for the whole chunk.
//! Run: `cargo bench -p lode-format --bench seal`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lode_format::chunk::{open_chunk, seal_chunk, seal_chunk_in_place};
use lode_format::{
    RootSalt, SegmentIndex, SegmentSize, open_chunk_v2, open_segment, seal_chunk_v2, verify_header,
};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::{digest, hmac};

const CHUNK: usize = 512 * 1024;

fn chunk() -> Vec<u8> {
    (0..CHUNK)
        .map(|i| (i.wrapping_mul(2654435761) >> 13).to_le_bytes()[0])
        .collect()
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

fn bench(c: &mut Criterion) {
    let salt = RootSalt::from_bytes([7; 32]);
    let hkey = hmac::Key::new(hmac::HMAC_SHA256, salt.expose());
    let src = chunk();
    let mut g = c.benchmark_group("seal_512KiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("ring_primitives_alone", |b| {
        let mut buf = src.clone();
        b.iter(|| primitives(&mut buf, &hkey))
    });
    // lode's seal takes an owned buffer (the import path reads each chunk into a fresh
    // one); refilling that buffer from the source is part of the measured cost.
    g.bench_function("lode_seal_chunk_in_place", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut buf = Vec::with_capacity(CHUNK + 16);
                buf.extend_from_slice(&src);
                let t = Instant::now();
                black_box(seal_chunk_in_place(&salt, buf));
                total += t.elapsed();
            }
            total
        })
    });
    // v2 copies the plaintext into the object (its header comes first and a tag follows
    // each segment), so that copy is part of the measured cost.
    let s = SegmentSize::DEFAULT;
    g.bench_function("lode_seal_chunk_v2_32KiB_segments", |b| {
        b.iter(|| black_box(seal_chunk_v2(&salt, black_box(&src), s).unwrap()))
    });
    g.finish();

    let v1 = seal_chunk(&salt, &src);
    let v2 = seal_chunk_v2(&salt, &src, s).unwrap();
    let mut g = c.benchmark_group("open_512KiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("v1_whole_chunk", |b| {
        b.iter(|| black_box(open_chunk(&v1.name, &v1.key, &v1.ciphertext).unwrap()))
    });
    g.bench_function("v2_whole_chunk", |b| {
        b.iter(|| black_box(open_chunk_v2(&v2.name, &v2.key, &v2.object).unwrap()))
    });
    // One read inside the chunk: check the header against the name, then check and open
    // the one segment holding the bytes. Throughput counts the segment's plaintext.
    g.throughput(Throughput::Bytes(s.bytes_u64()));
    let j = SegmentIndex(5);
    let range = verify_header(&v2.name, &v2.object)
        .unwrap()
        .segment_range(j)
        .unwrap();
    let range = usize::try_from(range.start).unwrap()..usize::try_from(range.end).unwrap();
    g.bench_function("v2_header_and_one_segment", |b| {
        b.iter(|| {
            let h = verify_header(&v2.name, &v2.object[..v2.header_len]).unwrap();
            black_box(open_segment(&h, &v2.key, j, &v2.object[range.clone()]).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
