//! Erasure coding throughput for 512 KiB chunks (the ciphertext of a default chunk,
//! 524 304 bytes with its GCM tag), in GB/s of chunk bytes.
//!
//! ```text
//! cargo bench -p lode-az --bench erasure                   # 1 s per figure
//! LODE_BENCH_SECS=3 cargo bench -p lode-az --bench erasure
//! ```
//!
//! For each code: the Reed-Solomon library alone (`reed-solomon-erasure`, SIMD), then
//! lode's stripe path around it — `Codec::encode` (copy into stripes, parity, headers
//! and CRC32C), `Stripe::parse` of k stripes (the checksum check), `Codec::decode` with
//! all data stripes present (a concatenation) and with m data stripes missing (the worst
//! case: m data shards rebuilt from parity) — and the SHA-256 name check every read
//! does, for scale.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_az::stripe::{Codec, Stripe, shard_len};
use lode_format::ChunkName;
use reed_solomon_erasure::galois_8::ReedSolomon;

const CHUNK: usize = 512 * 1024 + 16;

fn secs() -> Duration {
    let s = std::env::var("LODE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    Duration::from_secs_f64(s)
}

/// Runs `f` repeatedly for about `time`; GB/s of `bytes` per call.
fn rate(time: Duration, bytes: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < time {
        f();
        n += 1;
    }
    (n as f64 * bytes as f64) / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let time = secs();
    let chunk = lode_testkit::seeded_bytes(CHUNK, 1);
    let name = ChunkName::of(&chunk);
    println!("erasure coding of a {CHUNK}-byte chunk, GB/s of chunk bytes, {time:?} per figure");
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "code", "rs encode", "rs decode", "encode", "check", "decode", "decode -m"
    );
    for (k, m) in [(4, 2), (4, 1), (8, 3)] {
        let shard = shard_len(CHUNK, k);
        let rs = ReedSolomon::new(k, m).unwrap();
        let mut shards: Vec<Vec<u8>> = (0..k + m).map(|_| vec![0u8; shard]).collect();
        for (s, piece) in shards.iter_mut().zip(chunk.chunks(shard)) {
            s[..piece.len()].copy_from_slice(piece);
        }
        let rs_encode = rate(time, CHUNK, || {
            rs.encode(black_box(&mut shards)).unwrap();
        });
        // Reconstruct m data shards from k - m data and m parity shards.
        let rs_decode = rate(time, CHUNK, || {
            let mut present: Vec<(&mut [u8], bool)> = shards
                .iter_mut()
                .enumerate()
                .map(|(i, s)| (&mut s[..], i >= m))
                .collect();
            rs.reconstruct_data(black_box(&mut present)).unwrap();
        });

        let codec = Codec::new(k, m).unwrap();
        let encode = rate(time, CHUNK, || {
            black_box(codec.encode(&name, black_box(&chunk)).unwrap());
        });
        let stripes: Vec<Bytes> = codec.encode(&name, &chunk).unwrap();
        let check = rate(time, CHUNK, || {
            for s in &stripes[..k] {
                black_box(Stripe::parse(black_box(s.clone())).unwrap());
            }
        });
        let parsed: Vec<Stripe> = stripes
            .iter()
            .map(|s| Stripe::parse(s.clone()).unwrap())
            .collect();
        let all_data: Vec<&Stripe> = parsed[..k].iter().collect();
        let decode = rate(time, CHUNK, || {
            black_box(codec.decode(black_box(&all_data)).unwrap());
        });
        let without: Vec<&Stripe> = parsed[m..m + k].iter().collect();
        assert_eq!(codec.decode(&without).unwrap(), chunk);
        let decode_missing = rate(time, CHUNK, || {
            black_box(codec.decode(black_box(&without)).unwrap());
        });
        println!(
            "{:<10} {rs_encode:>10.2} {rs_decode:>10.2} {encode:>10.2} {check:>10.2} \
             {decode:>10.2} {decode_missing:>12.2}",
            format!("k={k} m={m}")
        );
    }
    let sha = rate(time, CHUNK, || {
        black_box(ChunkName::of(black_box(&chunk)));
    });
    println!("SHA-256 name check of the chunk: {sha:.2} GB/s");
}
