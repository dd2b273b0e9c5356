//! Checks chunk sealing (v1 and v2) and the manifest layout (versions 1 and 2) against
//! `vectors.json`, which
//! `gen_vectors.py` computes with Python's hashlib, hmac and `cryptography` from
//! docs/format.md and the layout drawn in `src/manifest.rs` — a second, independent reading
//! of the format. A mismatch here means one of the two departs from the documents; find
//! out which before touching the vectors.
//!
//! Codec 1 (lz4) runs the other way: a chunk's bytes are what lz4_flex compresses them
//! to, which Python's lz4 (the C library) does not reproduce byte for byte. So the Rust
//! makes `vectors_lz4.json` (`LODE_WRITE_VECTORS=1 cargo test -p lode-format --test
//! vectors`; without it, the test checks that lode still seals exactly those bytes), and
//! `gen_vectors.py --check` checks them independently: it decrypts every segment,
//! decodes and decompresses it with Python's lz4 and compares it with the plaintext.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lode_format::chunk::{derive_key, open_chunk, seal_chunk};
use lode_format::{
    ChunkEntry, ChunkFormat, ChunkIndex, ChunkKey, ChunkName, ChunkSize, Codec, DataKey,
    ImageConfig, ImageDigest, Manifest, ManifestHeader, ManifestId, RootId, RootSalt, SegmentIndex,
    SegmentSize, WrappedKey, open_chunk_v2, open_segment, seal_chunk_v2, verify_header,
};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Vectors {
    salts: BTreeMap<String, String>,
    plaintexts: Vec<Plaintext>,
    chunks: Vec<ChunkVector>,
    manifest: ManifestVector,
    chunks_v2: Vec<ChunkV2Vector>,
    manifest_v2: ManifestVector,
    manifest_v2_lz4: ManifestVector,
}

#[derive(Deserialize)]
struct Plaintext {
    label: String,
    hex: Option<String>,
    generator: Option<Generator>,
}

/// `byte[i] = (((i * mul + add) mod 2^32) >> shift) & 0xff` for `i` in `0..len`.
#[derive(Deserialize)]
struct Generator {
    kind: String,
    len: usize,
    mul: u32,
    add: u32,
    shift: u32,
}

#[derive(Deserialize)]
struct ChunkVector {
    plaintext: String,
    salt: String,
    plaintext_len: usize,
    digest: String,
    key: String,
    ciphertext_len: usize,
    ciphertext: Option<String>,
    ciphertext_head: Option<String>,
    tag: Option<String>,
    ciphertext_sha256: String,
    name: String,
}

#[derive(Deserialize)]
struct ChunkV2Vector {
    plaintext: String,
    salt: String,
    segment_size: u32,
    plaintext_len: usize,
    digest: String,
    key: String,
    segment_count: u32,
    header: String,
    object_len: usize,
    object: Option<String>,
    object_sha256: String,
    name: String,
}

#[derive(Deserialize)]
struct ManifestVector {
    /// Present for a version 2 manifest.
    segment_size: Option<u32>,
    /// Present for a version 2 manifest of a codec other than 0.
    codec: Option<u8>,
    root: u32,
    chunk_size: u32,
    device_size: u64,
    image_digest: String,
    config: Config,
    chunks: Vec<Option<String>>,
    keys: Vec<String>,
    data_key: String,
    key_id: String,
    wrapped_key: String,
    key_table_offset: usize,
    bytes: String,
    id: String,
}

#[derive(Deserialize)]
struct Config {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: String,
    user: String,
}

fn vectors() -> Vectors {
    serde_json::from_str(include_str!("vectors.json")).expect("vectors.json parses")
}

/// A range of object or plaintext offsets as a range of slice indexes.
fn span(r: &std::ops::Range<u64>) -> std::ops::Range<usize> {
    usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex in vectors.json")
}

fn unhex32(s: &str) -> [u8; 32] {
    unhex(s).try_into().expect("32 bytes")
}

fn plaintext(p: &Plaintext) -> Vec<u8> {
    match (&p.hex, &p.generator) {
        (Some(h), None) => unhex(h),
        (None, Some(g)) => {
            assert_eq!(g.kind, "mul32", "unknown generator for {}", p.label);
            (0..g.len)
                .map(|i| {
                    let i = u32::try_from(i).expect("generated plaintexts are under 4 GiB");
                    let x = i.wrapping_mul(g.mul).wrapping_add(g.add) >> g.shift;
                    x.to_le_bytes()[0]
                })
                .collect()
        }
        _ => panic!(
            "plaintext {} needs exactly one of hex and generator",
            p.label
        ),
    }
}

#[test]
fn chunk_vectors_match() {
    let v = vectors();
    let plains: BTreeMap<&str, Vec<u8>> = v
        .plaintexts
        .iter()
        .map(|p| (p.label.as_str(), plaintext(p)))
        .collect();
    assert_eq!(v.chunks.len(), plains.len() * v.salts.len());
    for c in &v.chunks {
        let what = format!("{} under salt {}", c.plaintext, c.salt);
        let plain = &plains[c.plaintext.as_str()];
        let salt = RootSalt::from_bytes(unhex32(&v.salts[&c.salt]));
        assert_eq!(plain.len(), c.plaintext_len, "{what}: plaintext length");
        // The digest is checked alone first, so a generator mismatch is not reported as
        // a key derivation bug.
        assert_eq!(ImageDigest::of(plain).to_hex(), c.digest, "{what}: digest");

        let key = derive_key(&salt, plain);
        assert_eq!(hex::encode(key.expose()), c.key, "{what}: key");

        let sealed = seal_chunk(&salt, plain);
        assert_eq!(
            hex::encode(sealed.key.expose()),
            c.key,
            "{what}: sealed key"
        );
        let ct = &sealed.ciphertext;
        assert_eq!(ct.len(), c.ciphertext_len, "{what}: ciphertext length");
        if let Some(want) = &c.ciphertext {
            assert_eq!(&hex::encode(ct), want, "{what}: ciphertext");
        }
        if let Some(want) = &c.ciphertext_head {
            assert_eq!(&hex::encode(&ct[..32]), want, "{what}: ciphertext head");
        }
        if let Some(want) = &c.tag {
            assert_eq!(&hex::encode(&ct[ct.len() - 16..]), want, "{what}: tag");
        }
        assert_eq!(
            ChunkName::of(ct).to_hex(),
            c.ciphertext_sha256,
            "{what}: ciphertext SHA-256"
        );
        assert_eq!(sealed.name.to_hex(), c.name, "{what}: name");

        // Opening the Python's bytes (when inline) or our own (checked equal above).
        let ct = c.ciphertext.as_deref().map_or_else(|| ct.clone(), unhex);
        let name: ChunkName = c.name.parse().unwrap();
        let key = ChunkKey::from_bytes(unhex32(&c.key));
        assert_eq!(
            &open_chunk(&name, &key, &ct).expect("vector opens"),
            plain,
            "{what}: open"
        );
    }
}

#[test]
fn chunk_v2_vectors_match() {
    let v = vectors();
    let plains: BTreeMap<&str, Vec<u8>> = v
        .plaintexts
        .iter()
        .map(|p| (p.label.as_str(), plaintext(p)))
        .collect();
    assert!(v.chunks_v2.len() >= 8);
    for c in &v.chunks_v2 {
        let what = format!(
            "v2 {} under salt {} in {}-byte segments",
            c.plaintext, c.salt, c.segment_size
        );
        let plain = &plains[c.plaintext.as_str()];
        let salt = RootSalt::from_bytes(unhex32(&v.salts[&c.salt]));
        let s = SegmentSize::new(u64::from(c.segment_size)).unwrap();
        assert_eq!(plain.len(), c.plaintext_len, "{what}: plaintext length");

        let sealed = seal_chunk_v2(&salt, plain, s, Codec::None).unwrap();
        assert_eq!(hex::encode(sealed.digest), c.digest, "{what}: digest");
        assert_eq!(hex::encode(sealed.key.expose()), c.key, "{what}: key");
        let header = &sealed.object[..sealed.header_len];
        assert_eq!(hex::encode(header), c.header, "{what}: header");
        assert_eq!(sealed.object.len(), c.object_len, "{what}: object length");
        if let Some(want) = &c.object {
            assert_eq!(&hex::encode(&sealed.object), want, "{what}: object");
        }
        assert_eq!(
            ChunkName::of(&sealed.object).to_hex(),
            c.object_sha256,
            "{what}: object SHA-256"
        );
        assert_eq!(sealed.name.to_hex(), c.name, "{what}: name");

        // Reading the Python's header, and its object when inline (else our own, checked
        // equal above), one segment at a time and whole.
        let name: ChunkName = c.name.parse().unwrap();
        let key = ChunkKey::from_bytes(unhex32(&c.key));
        let object = c
            .object
            .as_deref()
            .map_or_else(|| sealed.object.clone(), unhex);
        let h = verify_header(&name, &unhex(&c.header)).expect("vector header checks");
        assert_eq!(h.count(), c.segment_count, "{what}: segment count");
        h.check_layout(s, plain.len() as u64).unwrap();
        for j in (0..h.count()).map(SegmentIndex) {
            let r = h.segment_range(j).unwrap();
            let p = h.segment_plain_range(j).unwrap();
            let got = open_segment(&h, &key, j, &object[span(&r)])
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(got, plain[span(&p)], "{what}: segment {j}");
        }
        assert_eq!(
            &open_chunk_v2(&name, &key, &object).expect("vector opens"),
            plain,
            "{what}: open"
        );
    }
}

#[test]
fn manifest_vector_matches() {
    check_manifest(&vectors().manifest, ChunkFormat::V1);
}

#[test]
fn manifest_v2_vector_matches() {
    let format = ChunkFormat::V2 {
        segment_size: SegmentSize::new(4096).unwrap(),
        codec: Codec::None,
    };
    check_manifest(&vectors().manifest_v2, format);
}

#[test]
fn manifest_v2_lz4_vector_matches() {
    let format = ChunkFormat::V2 {
        segment_size: SegmentSize::new(4096).unwrap(),
        codec: Codec::Lz4,
    };
    check_manifest(&vectors().manifest_v2_lz4, format);
}

fn check_manifest(m: &ManifestVector, chunk_format: ChunkFormat) {
    assert_eq!(
        m.segment_size,
        chunk_format.segment_size().map(SegmentSize::bytes)
    );
    assert_eq!(
        m.codec.unwrap_or(0),
        chunk_format.codec().map_or(0, Codec::byte)
    );
    let bytes = unhex(&m.bytes);
    let data_key = DataKey::from_bytes(unhex32(&m.data_key));
    let header = ManifestHeader {
        root: RootId(m.root),
        chunk_size: ChunkSize::new(u64::from(m.chunk_size)).unwrap(),
        chunk_format,
        device_size: m.device_size,
        image_digest: m.image_digest.parse().unwrap(),
        config: ImageConfig {
            entrypoint: m.config.entrypoint.clone(),
            cmd: m.config.cmd.clone(),
            env: m.config.env.clone(),
            working_dir: m.config.working_dir.clone(),
            user: m.config.user.clone(),
        },
    };
    let chunks: Vec<ChunkEntry> = m
        .chunks
        .iter()
        .map(|c| match c {
            None => ChunkEntry::Zero,
            Some(n) => ChunkEntry::Stored(n.parse().unwrap()),
        })
        .collect();
    let keys: Vec<ChunkKey> = m
        .keys
        .iter()
        .map(|k| ChunkKey::from_bytes(unhex32(k)))
        .collect();
    let wrapped = WrappedKey {
        key_id: m.key_id.clone(),
        blob: unhex(&m.wrapped_key),
    };

    // Reading the Python's bytes.
    let parsed = Manifest::parse(&bytes).expect("vector parses");
    assert_eq!(parsed.header(), &header);
    assert_eq!(parsed.chunks(), &chunks[..]);
    assert_eq!(parsed.wrapped_key(), &wrapped);
    assert_eq!(parsed.id(), m.id.parse::<ManifestId>().unwrap());
    let table = parsed
        .open_keys(&data_key)
        .expect("vector's key table opens");
    let mut stored_keys = keys.iter();
    for (i, c) in chunks.iter().enumerate() {
        let got = table.get(ChunkIndex(i as u64));
        match c {
            ChunkEntry::Zero => assert!(got.is_none(), "zero chunk {i} has a key"),
            ChunkEntry::Stored(_) => assert_eq!(got, stored_keys.next(), "key of chunk {i}"),
        }
    }
    assert!(stored_keys.next().is_none());

    // Writing the same inputs gives the same bytes.
    let sealed = Manifest::seal(header, chunks, &keys, &data_key, wrapped).unwrap();
    assert_eq!(hex::encode(sealed.bytes()), m.bytes, "sealed bytes");
    assert_eq!(sealed.id().to_hex(), m.id);
    assert_eq!(sealed.bytes().len() - m.key_table_offset, 3 * 32 + 16);
}

#[test]
fn manifest_v2_vector_chunks_are_the_v2_chunk_vectors() {
    let v = vectors();
    let find = |label: &str| {
        v.chunks_v2
            .iter()
            .find(|c| c.plaintext == label && c.salt == "counting" && c.segment_size == 4096)
            .unwrap()
    };
    let (a, b) = (find("four_kib"), find("short"));
    let m = &v.manifest_v2;
    let names: Vec<Option<&str>> = m.chunks.iter().map(Option::as_deref).collect();
    assert_eq!(
        names,
        [Some(a.name.as_str()), None, Some(&a.name), Some(&b.name)]
    );
    assert_eq!(m.keys, [a.key.as_str(), &a.key, &b.key]);
    // The same image as the version 1 vector but for the format and its chunks.
    assert_eq!(m.bytes.len(), v.manifest.bytes.len());
    assert_ne!(m.id, v.manifest.id);
}

#[test]
fn manifest_vector_chunks_are_the_chunk_vectors() {
    // The manifest names the "four_kib" and "short" chunks under the "counting" salt, so
    // the two halves of the vectors describe one consistent image.
    let v = vectors();
    let find = |label: &str| {
        v.chunks
            .iter()
            .find(|c| c.plaintext == label && c.salt == "counting")
            .unwrap()
    };
    let (a, b) = (find("four_kib"), find("short"));
    let names: Vec<Option<&str>> = v.manifest.chunks.iter().map(Option::as_deref).collect();
    assert_eq!(
        names,
        [Some(a.name.as_str()), None, Some(&a.name), Some(&b.name)]
    );
    assert_eq!(v.manifest.keys, [a.key.as_str(), &a.key, &b.key]);
}

#[test]
fn manifest_v2_lz4_vector_chunks_are_the_lz4_vectors() {
    let v = vectors();
    let stored = stored_lz4_vectors();
    let find = |label: &str| stored.chunks.iter().find(|c| c.label == label).unwrap();
    let (a, b) = (find("four_kib"), find("short"));
    assert_eq!((a.segment_size, b.segment_size), (4096, 4096));
    let m = &v.manifest_v2_lz4;
    let names: Vec<Option<&str>> = m.chunks.iter().map(Option::as_deref).collect();
    assert_eq!(
        names,
        [Some(a.name.as_str()), None, Some(&a.name), Some(&b.name)]
    );
    assert_eq!(m.keys, [a.key.as_str(), &a.key, &b.key]);
    // The version 2 manifest of the same image but for the codec byte and the chunks.
    let (lz4, none) = (unhex(&m.bytes), unhex(&v.manifest_v2.bytes));
    assert_eq!(lz4.len(), none.len());
    assert_eq!((lz4[10], none[10]), (1, 0));
}

// ---- codec 1: vectors made here, checked by gen_vectors.py --------------------------

/// `vectors_lz4.json`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Lz4Vectors {
    comment: String,
    salts: BTreeMap<String, String>,
    chunks: Vec<Lz4Vector>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Lz4Vector {
    label: String,
    /// What the case shows.
    about: String,
    salt: String,
    segment_size: u32,
    codec: u8,
    plaintext: Vec<Part>,
    plaintext_len: usize,
    digest: String,
    key: String,
    segment_count: u32,
    segments: Vec<Lz4Segment>,
    header: String,
    object_len: usize,
    object: String,
    name: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Lz4Segment {
    plain_len: u32,
    sealed_len: u32,
    compressed: bool,
}

/// A piece of a plaintext, concatenated in order.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Part {
    /// These bytes.
    Hex { hex: String },
    /// `text` repeated and cut to `len` bytes.
    Text { text: String, len: usize },
    /// `SHA-256(seed ‖ u32 LE 0) ‖ SHA-256(seed ‖ u32 LE 1) ‖ …` cut to `len` bytes:
    /// bytes that do not compress.
    Noise { seed: String, len: usize },
    /// `len` zero bytes.
    Zero { len: usize },
}

impl Part {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Part::Hex { hex } => unhex(hex),
            Part::Text { text, len } => text.bytes().cycle().take(*len).collect(),
            Part::Noise { seed, len } => (0u32..)
                .flat_map(|i| {
                    let mut block = seed.as_bytes().to_vec();
                    block.extend_from_slice(&i.to_le_bytes());
                    ChunkName::of(&block).as_bytes().to_vec()
                })
                .take(*len)
                .collect(),
            Part::Zero { len } => vec![0; *len],
        }
    }
}

fn bytes_of(parts: &[Part]) -> Vec<u8> {
    parts.iter().flat_map(Part::bytes).collect()
}

const TEXT: &str = "lode codec 1 test vector: text that lz4 compresses. ";

/// A `len`-byte segment of `k` noise bytes from `seed` then zeros, with `k` the largest
/// (or, with `smallest`, the smallest) for which lz4's encoding pads to `padded` bytes.
fn noise_then_zeros(seed: &str, len: usize, padded: usize, smallest: bool) -> Vec<Part> {
    let parts = |k: usize| {
        vec![
            Part::Noise {
                seed: seed.into(),
                len: k,
            },
            Part::Zero { len: len - k },
        ]
    };
    let noise = bytes_of(&parts(len));
    let pads_to = |k: usize| {
        let mut p = noise[..k].to_vec();
        p.resize(len, 0);
        (4 + lz4_flex::block::compress(&p).len()).next_multiple_of(1024)
    };
    let mut ks = (len / 2..len).filter(|&k| pads_to(k) == padded);
    let k = if smallest { ks.next() } else { ks.next_back() };
    parts(k.expect("a noise length that pads to the size asked for"))
}

/// The cases, each (label, what it shows, salt, segment size, plaintext).
fn lz4_cases() -> Vec<(&'static str, &'static str, &'static str, u32, Vec<Part>)> {
    let mut boundary = noise_then_zeros("boundary-0", 16384, 14336, false);
    boundary.extend(noise_then_zeros("boundary-1", 16384, 15360, true));
    vec![
        (
            "short",
            "12 bytes: too short to compress, stored raw",
            "counting",
            4096,
            vec![Part::Hex {
                hex: hex::encode(b"hello, lode\n"),
            }],
        ),
        (
            "four_kib",
            "the 4 KiB text of vectors.json in one compressed segment",
            "counting",
            4096,
            vec![Part::Text {
                text: "lode chunk vector, 4 KiB of text. ".into(),
                len: 4096,
            }],
        ),
        (
            "mixed",
            "text (compressed), noise (raw), half noise (compressed to 9 KiB), and a short \
             last segment of text (compressed)",
            "counting",
            16384,
            vec![
                Part::Text {
                    text: TEXT.into(),
                    len: 16384,
                },
                Part::Noise {
                    seed: "mixed-1".into(),
                    len: 16384,
                },
                Part::Noise {
                    seed: "mixed-2".into(),
                    len: 8192,
                },
                Part::Zero { len: 8192 },
                Part::Text {
                    text: "A short last segment, compressed as well. ".into(),
                    len: 5000,
                },
            ],
        ),
        (
            "boundary",
            "the 1/8 rule at its edge: a segment whose encoding pads to exactly 14336 bytes \
             (16384 - 16384/8) is compressed, one that pads to 15360 is stored raw",
            "hashed",
            16384,
            boundary,
        ),
        (
            "tail",
            "a 900-byte last segment of text: 900 - 900/8 = 788 bytes is less than 1 KiB of \
             padding, so it is stored raw",
            "counting",
            16384,
            vec![Part::Text {
                text: TEXT.into(),
                len: 16384 + 900,
            }],
        ),
    ]
}

/// The salts of vectors.json (read alone: vectors.json's lz4 manifest is built from
/// vectors_lz4.json, so it may not exist yet when that is made).
fn salts() -> BTreeMap<String, String> {
    #[derive(Deserialize)]
    struct Salts {
        salts: BTreeMap<String, String>,
    }
    let v: Salts = serde_json::from_str(include_str!("vectors.json")).expect("vectors.json parses");
    v.salts
}

/// Seals every case with lode.
fn lz4_vectors() -> Lz4Vectors {
    let salts = salts();
    let chunks = lz4_cases()
        .into_iter()
        .map(|(label, about, salt, s, parts)| {
            let plain = bytes_of(&parts);
            let segment_size = SegmentSize::new(u64::from(s)).unwrap();
            let root = RootSalt::from_bytes(unhex32(&salts[salt]));
            let c = seal_chunk_v2(&root, &plain, segment_size, Codec::Lz4).unwrap();
            let h = verify_header(&c.name, &c.object).unwrap();
            let segments = (0..h.count())
                .map(SegmentIndex)
                .map(|j| {
                    let r = h.segment_range(j).unwrap();
                    Lz4Segment {
                        plain_len: h.segment_plain_len(j).unwrap(),
                        sealed_len: u32::try_from(r.end - r.start).unwrap(),
                        compressed: h.segment_compressed(j).unwrap(),
                    }
                })
                .collect();
            Lz4Vector {
                label: label.into(),
                about: about.into(),
                salt: salt.into(),
                segment_size: s,
                codec: Codec::Lz4.byte(),
                plaintext: parts,
                plaintext_len: plain.len(),
                digest: hex::encode(c.digest),
                key: hex::encode(c.key.expose()),
                segment_count: h.count(),
                segments,
                header: hex::encode(&c.object[..c.header_len]),
                object_len: c.object.len(),
                object: hex::encode(&c.object),
                name: c.name.to_hex(),
            }
        })
        .collect();
    Lz4Vectors {
        comment: "Made by lode (LODE_WRITE_VECTORS=1 cargo test -p lode-format --test \
                  vectors) and checked independently by gen_vectors.py --check; do not edit \
                  by hand."
            .into(),
        salts,
        chunks,
    }
}

fn lz4_vectors_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors_lz4.json")
}

fn stored_lz4_vectors() -> Lz4Vectors {
    let text = std::fs::read_to_string(lz4_vectors_path()).expect("vectors_lz4.json reads");
    serde_json::from_str(&text).expect("vectors_lz4.json parses")
}

/// lode seals the codec-1 cases to exactly the stored bytes: the same lz4_flex output,
/// the same 1/8 choices, the same padding. A difference is a change of format (every
/// codec-1 chunk would get a new name), not a test to update lightly.
#[test]
fn lz4_vectors_are_what_lode_seals() {
    let made = serde_json::to_string_pretty(&lz4_vectors()).unwrap() + "\n";
    if std::env::var("LODE_WRITE_VECTORS").is_ok_and(|v| v == "1") {
        std::fs::write(lz4_vectors_path(), &made).expect("vectors_lz4.json writes");
        return;
    }
    let stored = std::fs::read_to_string(lz4_vectors_path()).expect("vectors_lz4.json reads");
    assert!(
        stored == made,
        "lode no longer seals the codec-1 vectors to the bytes in vectors_lz4.json: \
         lz4_flex's output or the codec changed, which renames every codec-1 chunk"
    );
}

/// The stored bytes open, segment by segment and whole, and each case shows what it says.
#[test]
fn lz4_vectors_open() {
    let v = stored_lz4_vectors();
    assert_eq!(v.chunks.len(), 5);
    for c in &v.chunks {
        let what = format!("lz4 vector {}", c.label);
        let plain = bytes_of(&c.plaintext);
        assert_eq!(plain.len(), c.plaintext_len, "{what}");
        let name: ChunkName = c.name.parse().unwrap();
        let key = ChunkKey::from_bytes(unhex32(&c.key));
        let object = unhex(&c.object);
        assert_eq!(object.len(), c.object_len, "{what}");
        let h = verify_header(&name, &object).expect("vector header checks");
        assert_eq!(hex::encode(h.to_bytes()), c.header, "{what}");
        assert_eq!(h.codec(), Codec::Lz4, "{what}");
        h.check_layout(
            SegmentSize::new(u64::from(c.segment_size)).unwrap(),
            plain.len() as u64,
        )
        .unwrap();
        for (j, row) in (0..h.count()).map(SegmentIndex).zip(&c.segments) {
            let r = h.segment_range(j).unwrap();
            assert_eq!(r.end - r.start, u64::from(row.sealed_len), "{what} {j}");
            assert_eq!(h.segment_compressed(j), Some(row.compressed), "{what} {j}");
            let got = open_segment(&h, &key, j, &object[span(&r)]).unwrap();
            assert_eq!(got, plain[span(&h.segment_plain_range(j).unwrap())]);
        }
        assert_eq!(
            open_chunk_v2(&name, &key, &object).unwrap(),
            plain,
            "{what}"
        );
        let compressed: Vec<bool> = c.segments.iter().map(|s| s.compressed).collect();
        let sealed: Vec<u32> = c.segments.iter().map(|s| s.sealed_len).collect();
        match c.label.as_str() {
            "short" => assert_eq!(sealed, [12 + 16]),
            "four_kib" => assert_eq!(sealed, [1024 + 16]),
            "mixed" => {
                assert_eq!(compressed, [true, false, true, true]);
                assert_eq!(sealed[2], 9 * 1024 + 16);
            }
            "boundary" => assert_eq!(sealed, [14336 + 16, 16384 + 16]),
            "tail" => assert_eq!(compressed, [true, false]),
            other => panic!("unknown case {other}"),
        }
    }
}

/// A `python3` that has the lz4 and cryptography modules: the first on `PATH`, else the
/// system's (Debian installs python3-lz4 for it alone). `None` after a skip.
fn python_with_lz4() -> Option<PathBuf> {
    let found = [
        lode_testkit::which("python3"),
        Some(PathBuf::from("/usr/bin/python3")),
    ]
    .into_iter()
    .flatten()
    .find(|python| {
        Command::new(python)
            .args([
                "-c",
                "import lz4.block, cryptography.hazmat.primitives.ciphers.aead",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        lode_testkit::skip(
            "no python3 with the lz4 and cryptography modules (apt-get install python3-lz4 \
             python3-cryptography)",
        );
    }
    found
}

/// gen_vectors.py, a reading of the format apart from this crate, checks the codec-1
/// vectors (decrypting, decoding and decompressing every segment with Python's lz4) and
/// that vectors.json is exactly what it generates.
#[test]
fn python_checks_the_vectors_independently() {
    let Some(python) = python_with_lz4() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gen_vectors.py");
    let out = Command::new(python)
        .arg(&script)
        .arg("--check")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "gen_vectors.py --check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
