//! Should a v2 segment be compressed before it is sealed? Stored bytes and read cost of
//! the candidate codecs, on real images.
//!
//! Each image given is cut into 512 KiB chunks as lode cuts it; all-zero chunks are
//! dropped and identical chunks kept once across all the images (one store root: what
//! lode stores). Each distinct chunk is cut into segments (32 KiB unless `--segment`),
//! and each segment is stored raw or compressed by a codec, kept raw when compression
//! saves less than 1/8 of it (the rule a format would pin). Stored bytes count every
//! segment's bytes plus its 16-byte GCM tag plus the chunk's v2 header, the same for
//! every codec. The read cost is the time to decompress one segment, p50 and p99 over a
//! fixed sample of the compressed segments, beside the time to open (AES-256-GCM) a
//! 32 KiB segment, which every disk-tier read already pays.
//!
//! `--pad BYTES` rounds every compressed segment up to a multiple of BYTES before the
//! 1/8 rule, to see what hiding exact lengths costs.
//!
//! `cargo bench -p lode-format --bench compress -- IMAGE... [--segment BYTES] [--pad BYTES]
//! [--gzip-bytes N] [--json PATH]`; `scripts/bench-compress.sh` builds the image family,
//! flattens and exports it, and runs this with the family's gzip layer bytes.

use std::collections::HashSet;
use std::fs::File;
use std::hint::black_box;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use lode_format::{
    RootSalt, SegmentIndex, SegmentSize, open_segment, seal_chunk_v2, verify_header,
};
use ring::digest;

const CHUNK: usize = 512 * 1024;
const TAG: u64 = 16;
/// Segments timed per codec (every n-th compressed segment, n fixed by the count).
const SAMPLE: usize = 4000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Codec {
    None,
    Lz4,
    Zstd(i32),
}

impl Codec {
    fn name(self) -> String {
        match self {
            Codec::None => "none".into(),
            Codec::Lz4 => "lz4 (block)".into(),
            Codec::Zstd(l) => format!("zstd level {l}"),
        }
    }

    fn compress(self, seg: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => seg.to_vec(),
            Codec::Lz4 => lz4_flex::compress(seg),
            Codec::Zstd(l) => zstd::bulk::compress(seg, l).expect("zstd compress"),
        }
    }

    fn decompress(self, packed: &[u8], len: usize) -> Vec<u8> {
        match self {
            Codec::None => packed.to_vec(),
            Codec::Lz4 => lz4_flex::decompress(packed, len).expect("lz4 decompress"),
            Codec::Zstd(_) => zstd::bulk::decompress(packed, len).expect("zstd decompress"),
        }
    }
}

struct Args {
    images: Vec<PathBuf>,
    segment: usize,
    pad: usize,
    gzip_bytes: Option<u64>,
    json: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        images: Vec::new(),
        segment: 32 * 1024,
        pad: 1,
        gzip_bytes: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--segment" => {
                a.segment = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--segment BYTES")
            }
            "--pad" => {
                a.pad = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&p| p > 0)
                    .expect("--pad BYTES")
            }
            "--gzip-bytes" => a.gzip_bytes = it.next().and_then(|v| v.parse().ok()),
            "--json" => a.json = it.next().map(PathBuf::from),
            "--bench" => {}
            other if other.starts_with("--") => {}
            path => a.images.push(PathBuf::from(path)),
        }
    }
    a
}

/// The distinct non-zero chunks of every image, in order of first appearance.
fn distinct_chunks(images: &[PathBuf]) -> (Vec<Vec<u8>>, u64) {
    let mut seen = HashSet::new();
    let mut chunks = Vec::new();
    let mut raw_bytes = 0u64;
    for path in images {
        let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0;
            while n < CHUNK {
                match f.read(&mut buf[n..]).expect("read") {
                    0 => break,
                    k => n += k,
                }
            }
            if n == 0 {
                break;
            }
            buf.truncate(n);
            raw_bytes += n as u64;
            if buf.iter().all(|&b| b == 0) {
                continue;
            }
            let d: [u8; 32] = digest::digest(&digest::SHA256, &buf)
                .as_ref()
                .try_into()
                .expect("32 bytes");
            if seen.insert(d) {
                chunks.push(buf);
            }
        }
    }
    (chunks, raw_bytes)
}

struct Row {
    codec: Codec,
    stored: u64,
    compressed_segments: usize,
    segments: usize,
    p50_ns: u64,
    p99_ns: u64,
}

fn quantile(sorted: &[u64], percent: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(percent * sorted.len())
        .div_ceil(100)
        .clamp(1, sorted.len())
        - 1]
}

fn measure(codec: Codec, chunks: &[Vec<u8>], segment: usize, pad: usize) -> Row {
    let mut stored = 0u64;
    let mut segments = 0usize;
    let mut packed_kept: Vec<(Vec<u8>, usize)> = Vec::new();
    let mut compressed_segments = 0usize;
    for c in chunks {
        let n = c.len().div_ceil(segment);
        stored += 20 + 36 * n as u64;
        for seg in c.chunks(segment) {
            segments += 1;
            let packed = codec.compress(seg);
            // Padded up to a multiple of `pad`, so lengths say less about the content.
            let padded = packed.len().div_ceil(pad) * pad;
            let keep = codec != Codec::None && padded <= seg.len() - seg.len() / 8;
            if keep {
                compressed_segments += 1;
                stored += padded as u64 + TAG;
                packed_kept.push((packed, seg.len()));
            } else {
                stored += seg.len() as u64 + TAG;
            }
        }
    }
    // Time decompression on a fixed spread of the kept segments.
    let step = (packed_kept.len() / SAMPLE).max(1);
    let mut times: Vec<u64> = packed_kept
        .iter()
        .step_by(step)
        .map(|(p, len)| {
            let t = Instant::now();
            black_box(codec.decompress(black_box(p), *len));
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
        .collect();
    times.sort_unstable();
    Row {
        codec,
        stored,
        compressed_segments,
        segments,
        p50_ns: quantile(&times, 50),
        p99_ns: quantile(&times, 99),
    }
}

/// p50 and p99 of opening (name check of the segment, AES-256-GCM) one segment of a sealed
/// chunk, over the first chunks of the set.
fn open_cost(chunks: &[Vec<u8>], segment: usize) -> (u64, u64) {
    let salt = RootSalt::from_bytes([7; 32]);
    let size =
        SegmentSize::new(u64::try_from(segment).expect("segment size")).expect("segment size");
    let mut times = Vec::new();
    for c in chunks.iter().take(SAMPLE) {
        let sealed = seal_chunk_v2(&salt, c, size, lode_format::Codec::None).expect("seal");
        let header =
            verify_header(&sealed.name, &sealed.object[..sealed.header_len]).expect("header");
        let range = header
            .header()
            .segment_range(SegmentIndex(0))
            .expect("segment 0");
        let bytes = &sealed.object
            [usize::try_from(range.start).unwrap()..usize::try_from(range.end).unwrap()];
        let t = Instant::now();
        black_box(
            open_segment(&header, &sealed.key, SegmentIndex(0), black_box(bytes)).expect("open"),
        );
        times.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    times.sort_unstable();
    (quantile(&times, 50), quantile(&times, 99))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn main() {
    let a = args();
    if a.images.is_empty() {
        eprintln!(
            "compress: no images given. Usage: cargo bench -p lode-format --bench compress -- IMAGE... \
             (scripts/bench-compress.sh runs it on the image family)"
        );
        return;
    }
    let t0 = Instant::now();
    let (chunks, raw) = distinct_chunks(&a.images);
    eprintln!(
        "compress: {} images, {} raw, {} distinct non-zero chunks ({:.1} s)",
        a.images.len(),
        mib(raw),
        chunks.len(),
        t0.elapsed().as_secs_f64()
    );
    let (open50, open99) = open_cost(&chunks, a.segment);
    let codecs = [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3)];
    let rows: Vec<Row> = codecs
        .iter()
        .map(|&c| {
            eprintln!("compress: {}", c.name());
            measure(c, &chunks, a.segment, a.pad)
        })
        .collect();
    let base = rows[0].stored;
    println!();
    println!(
        "{} segments of {} KiB (compressed ones padded to {} B) in {} distinct chunks; opening one segment (GCM): p50 {:.1} µs, p99 {:.1} µs",
        rows[0].segments,
        a.segment / 1024,
        a.pad,
        chunks.len(),
        open50 as f64 / 1000.0,
        open99 as f64 / 1000.0
    );
    if let Some(g) = a.gzip_bytes {
        println!("the images' gzip layers: {}", mib(g));
    }
    println!(
        "{:<14} {:>12} {:>9} {:>11} {:>12} {:>12} {:>10}",
        "codec", "stored", "saved", "compressed", "decomp p50", "decomp p99", "vs gzip"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let saved = 1.0 - r.stored as f64 / base as f64;
        let vs_gzip = a
            .gzip_bytes
            .map(|g| format!("{:.2}x", r.stored as f64 / g as f64))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:>12} {:>8.1}% {:>10.1}% {:>9.1} µs {:>9.1} µs {:>10}",
            r.codec.name(),
            mib(r.stored),
            saved * 100.0,
            r.compressed_segments as f64 * 100.0 / r.segments as f64,
            r.p50_ns as f64 / 1000.0,
            r.p99_ns as f64 / 1000.0,
            vs_gzip
        );
        json_rows.push(serde_json::json!({
            "codec": r.codec.name(),
            "stored_bytes": r.stored,
            "saved": (saved * 10000.0).round() / 10000.0,
            "segments": r.segments,
            "compressed_segments": r.compressed_segments,
            "decompress_p50_ns": r.p50_ns,
            "decompress_p99_ns": r.p99_ns,
        }));
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "command": "scripts/bench-compress.sh",
            "images": a.images.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>(),
            "raw_bytes": raw,
            "distinct_chunks": chunks.len(),
            "segment_bytes": a.segment,
            "pad_bytes": a.pad,
            "gzip_layer_bytes": a.gzip_bytes,
            "open_segment_p50_ns": open50,
            "open_segment_p99_ns": open99,
            "codecs": json_rows,
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&doc).expect("json") + "\n",
        )
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("compress: wrote {}", path.display());
    }
}
