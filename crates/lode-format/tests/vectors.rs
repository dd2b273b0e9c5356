//! Checks chunk sealing (v1 and v2) and the manifest layout (versions 1 and 2) against
//! `vectors.json`, which
//! `gen_vectors.py` computes with Python's hashlib, hmac and `cryptography` from
//! docs/format.md and the layout drawn in `src/manifest.rs` — a second, independent reading
//! of the format. A mismatch here means one of the two departs from the documents; find
//! out which before touching the vectors.

use std::collections::BTreeMap;

use lode_format::chunk::{derive_key, open_chunk, seal_chunk};
use lode_format::{
    ChunkEntry, ChunkFormat, ChunkIndex, ChunkKey, ChunkName, ChunkSize, Codec, DataKey,
    ImageConfig, ImageDigest, Manifest, ManifestHeader, ManifestId, RootId, RootSalt, SegmentIndex,
    SegmentSize, WrappedKey, open_chunk_v2, open_segment, seal_chunk_v2, verify_header,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    salts: BTreeMap<String, String>,
    plaintexts: Vec<Plaintext>,
    chunks: Vec<ChunkVector>,
    manifest: ManifestVector,
    chunks_v2: Vec<ChunkV2Vector>,
    manifest_v2: ManifestVector,
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

fn check_manifest(m: &ManifestVector, chunk_format: ChunkFormat) {
    assert_eq!(
        m.segment_size,
        chunk_format.segment_size().map(SegmentSize::bytes)
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
