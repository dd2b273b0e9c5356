//! Property tests for the two places untrusted bytes enter this crate:
//! [`Manifest::parse`] (with [`Manifest::open_keys`]) and [`open_chunk`].
//!
//! - arbitrary bytes never panic the parser, and whatever it accepts re-parses equal;
//! - every valid manifest round-trips seal → parse → open_keys;
//! - every mutation of a valid manifest or a sealed chunk is refused as corrupt.

use lode_format::chunk::{open_chunk, open_unverified, seal_chunk};
use lode_format::{
    ChunkEntry, ChunkFormat, ChunkIndex, ChunkKey, ChunkName, ChunkSize, Codec, DataKey,
    ImageConfig, ImageDigest, Manifest, ManifestHeader, RootId, RootSalt, SegmentSize, WrappedKey,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Everything `Manifest::seal` takes, with the keys as raw bytes (secrets are not `Debug`).
#[derive(Clone, Debug)]
struct Input {
    header: ManifestHeader,
    chunks: Vec<ChunkEntry>,
    keys: Vec<[u8; 32]>,
    data_key: [u8; 32],
    wrapped: WrappedKey,
}

impl Input {
    fn seal(&self) -> Manifest {
        let keys: Vec<ChunkKey> = self.keys.iter().map(|k| ChunkKey::from_bytes(*k)).collect();
        Manifest::seal(
            self.header.clone(),
            self.chunks.clone(),
            &keys,
            &DataKey::from_bytes(self.data_key),
            self.wrapped.clone(),
        )
        .expect("a valid input seals")
    }
}

/// A string of up to `max` chars, any Unicode scalar but controls, plus a few fixed
/// multi-byte ones so that non-ASCII shows up often.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!("\\PC{{0,{max}}}")).unwrap(),
        proptest::collection::vec(
            prop_oneof![Just("é"), Just("日本"), Just("🦀"), Just("=")],
            0..4
        )
        .prop_map(|v| v.concat()),
    ]
}

fn config() -> impl Strategy<Value = ImageConfig> {
    let list = || proptest::collection::vec(text(16), 0..4);
    (list(), list(), list(), text(24), text(12)).prop_map(
        |(entrypoint, cmd, env, working_dir, user)| ImageConfig {
            entrypoint,
            cmd,
            env,
            working_dir,
            user,
        },
    )
}

/// A chunk name that is not all zeros (all zeros means "zero chunk" in the table).
fn stored_name() -> impl Strategy<Value = ChunkName> {
    any::<[u8; 32]>().prop_map(|mut n| {
        if n == [0; 32] {
            n[31] = 1;
        }
        ChunkName::from_bytes(n)
    })
}

fn input() -> impl Strategy<Value = Input> {
    let header = (
        any::<u32>(),
        12u32..=26,
        0u64..=24,
        any::<u64>(),
        any::<[u8; 32]>(),
        config(),
        // None: version 1; Some(k, lz4): version 2 with segments 2^k times smaller than
        // chunks, compressed or not.
        proptest::option::of((0u32..=14, any::<bool>())),
    );
    header
        .prop_flat_map(|(root, shift, count, tail, digest, config, segments)| {
            let chunk_size = ChunkSize::new(1u64 << shift).unwrap();
            let chunk_format = match segments {
                None => ChunkFormat::V1,
                Some((k, lz4)) => ChunkFormat::V2 {
                    segment_size: SegmentSize::new(1u64 << shift.saturating_sub(k).max(12))
                        .unwrap(),
                    codec: if lz4 { Codec::Lz4 } else { Codec::None },
                },
            };
            let cs = chunk_size.bytes_u64();
            // Any device size that needs exactly `count` chunks: the last may be short.
            let device_size = if count == 0 {
                0
            } else {
                (count - 1) * cs + 1 + tail % cs
            };
            let header = ManifestHeader {
                root: RootId(root),
                chunk_size,
                chunk_format,
                device_size,
                image_digest: ImageDigest::from_bytes(digest),
                config,
            };
            let entry = prop_oneof![
                1 => Just(ChunkEntry::Zero),
                2 => stored_name().prop_map(ChunkEntry::Stored),
            ];
            (
                Just(header),
                proptest::collection::vec(entry, usize::try_from(count).unwrap()),
            )
        })
        .prop_flat_map(|(header, chunks)| {
            let stored = chunks.iter().filter(|c| c.name().is_some()).count();
            (
                Just(header),
                Just(chunks),
                proptest::collection::vec(any::<[u8; 32]>(), stored),
                any::<[u8; 32]>(),
                proptest::string::string_regex("\\PC{1,60}").unwrap(),
                proptest::collection::vec(any::<u8>(), 1..300),
            )
        })
        .prop_map(|(header, chunks, keys, data_key, key_id, blob)| Input {
            header,
            chunks,
            keys,
            data_key,
            wrapped: WrappedKey { key_id, blob },
        })
}

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR the byte at a position with a non-zero mask.
    Flip(Index, u8),
    /// Insert a byte before a position (or at the end).
    Insert(Index, u8),
    /// Remove the byte at a position.
    Delete(Index),
    /// Keep a strict prefix.
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

impl Mutation {
    /// Applies the mutation to non-empty `bytes`; the result always differs from them.
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        let len = b.len();
        match self {
            Mutation::Flip(i, mask) => b[i.index(len)] ^= mask,
            Mutation::Insert(i, v) => b.insert(i.index(len + 1), *v),
            Mutation::Delete(i) => {
                b.remove(i.index(len));
            }
            Mutation::Truncate(i) => b.truncate(i.index(len)),
        }
        b
    }
}

fn assert_same(a: &Manifest, b: &Manifest) {
    assert_eq!(a.header(), b.header());
    assert_eq!(a.chunks(), b.chunks());
    assert_eq!(a.wrapped_key(), b.wrapped_key());
    assert_eq!(a.bytes(), b.bytes());
    assert_eq!(a.id(), b.id());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// (a) Arbitrary bytes: no panic; anything accepted re-parses to the same manifest.
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        if let Ok(m) = Manifest::parse(&bytes) {
            assert_same(&m, &Manifest::parse(m.bytes()).unwrap());
        }
    }

    /// (a) Arbitrary bytes behind a valid fixed header, so the fuzzing reaches the config,
    /// the tables and the key fields rather than stopping at the magic.
    #[test]
    fn parse_never_panics_past_the_header(
        input in input(),
        tail in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let m = input.seal();
        let mut bytes = m.bytes()[..76].to_vec();
        bytes.extend_from_slice(&tail);
        if let Ok(p) = Manifest::parse(&bytes) {
            assert_same(&p, &Manifest::parse(p.bytes()).unwrap());
        }
    }

    /// (a) Valid manifests with several mutations, so the parser also accepts some inputs
    /// (flips in a table or the wrapped key) and the re-parse check runs.
    #[test]
    fn parse_never_panics_near_a_manifest(
        input in input(),
        mutations in proptest::collection::vec(mutation(), 1..8),
    ) {
        let mut bytes = input.seal().bytes().to_vec();
        for m in &mutations {
            if !bytes.is_empty() {
                bytes = m.apply(&bytes);
            }
        }
        if let Ok(p) = Manifest::parse(&bytes) {
            assert_same(&p, &Manifest::parse(p.bytes()).unwrap());
        }
    }

    /// (b) Every valid manifest round-trips seal → parse → open_keys.
    #[test]
    fn seal_parse_open_round_trip(input in input()) {
        let m = input.seal();
        let p = Manifest::parse(m.bytes()).unwrap();
        assert_same(&m, &p);
        prop_assert_eq!(p.header(), &input.header);
        prop_assert_eq!(p.chunks(), &input.chunks[..]);
        prop_assert_eq!(p.wrapped_key(), &input.wrapped);
        prop_assert_eq!(
            p.binding(),
            lode_format::binding_of(&input.header, &input.chunks).unwrap()
        );
        let table = p.open_keys(&DataKey::from_bytes(input.data_key)).unwrap();
        let mut keys = input.keys.iter();
        for (i, c) in input.chunks.iter().enumerate() {
            let got = table.get(ChunkIndex(i as u64)).map(|k| *k.expose());
            match c {
                ChunkEntry::Zero => prop_assert_eq!(got, None),
                ChunkEntry::Stored(_) => prop_assert_eq!(got.as_ref(), keys.next()),
            }
        }
        prop_assert!(keys.next().is_none());
        prop_assert!(table.get(ChunkIndex(input.chunks.len() as u64)).is_none());
    }

    /// (c) Any flip, insertion, deletion or truncation is refused, as corrupt, by the
    /// parser or by the key table's tag.
    #[test]
    fn mutated_manifest_is_refused_as_corrupt(input in input(), mutation in mutation()) {
        let m = input.seal();
        let bad = mutation.apply(m.bytes());
        let err = match Manifest::parse(&bad) {
            Err(e) => e,
            Ok(p) => match p.open_keys(&DataKey::from_bytes(input.data_key)) {
                Err(e) => e,
                Ok(_) => panic!("{mutation:?} accepted"),
            },
        };
        prop_assert!(err.to_string().contains("corrupt"), "{:?}: {}", mutation, err);
    }

    /// (d) Any mutation of a sealed chunk is refused as corrupt by its name, and still
    /// refused by its tag when the name check is skipped or the name recomputed.
    #[test]
    fn mutated_chunk_is_refused_as_corrupt(
        salt in any::<[u8; 32]>(),
        plain in proptest::collection::vec(any::<u8>(), 1..2048),
        mutation in mutation(),
    ) {
        let s = seal_chunk(&RootSalt::from_bytes(salt), &plain);
        prop_assert_eq!(open_chunk(&s.name, &s.key, &s.ciphertext).unwrap(), plain);
        let bad = mutation.apply(&s.ciphertext);
        let err = open_chunk(&s.name, &s.key, &bad).unwrap_err();
        prop_assert!(err.to_string().contains("corrupt"), "{:?}: {}", mutation, err);
        prop_assert!(open_unverified(&s.name, &s.key, bad.clone()).is_err());
        prop_assert!(open_chunk(&ChunkName::of(&bad), &s.key, &bad).is_err());
    }
}

/// The largest KMS key id and wrapped key the layout allows round-trip; one byte more is
/// refused when building.
#[test]
fn key_field_limits() {
    let header = ManifestHeader {
        root: RootId(1),
        chunk_size: ChunkSize::DEFAULT,
        chunk_format: ChunkFormat::V1,
        device_size: 1,
        image_digest: ImageDigest::of(b"limits"),
        config: ImageConfig::default(),
    };
    let chunks = vec![ChunkEntry::Stored(ChunkName::of(b"c"))];
    let keys = [ChunkKey::from_bytes([5; 32])];
    let dk = DataKey::from_bytes([6; 32]);
    // 64 four-byte chars: 256 bytes of UTF-8.
    let widest = WrappedKey {
        key_id: "🦀".repeat(64),
        blob: vec![0xab; 4096],
    };
    let m = Manifest::seal(header.clone(), chunks.clone(), &keys, &dk, widest.clone()).unwrap();
    let p = Manifest::parse(m.bytes()).unwrap();
    assert_eq!(p.wrapped_key(), &widest);
    p.open_keys(&dk).unwrap();

    let long_id = WrappedKey {
        key_id: "k".repeat(257),
        ..widest.clone()
    };
    let err = Manifest::seal(header.clone(), chunks.clone(), &keys, &dk, long_id).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot build manifest: KMS key id must be 1 to 256 bytes, got 257"
    );
    let long_blob = WrappedKey {
        blob: vec![0; 4097],
        ..widest
    };
    let err = Manifest::seal(header, chunks, &keys, &dk, long_blob).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot build manifest: wrapped data key must be 1 to 4096 bytes, got 4097"
    );
}
