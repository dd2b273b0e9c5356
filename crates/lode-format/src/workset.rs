//! An image's working-set record: which chunks the first start of an image read, in the
//! order it first touched them, kept beside the manifest in the store so later starts on
//! any worker can fetch them ahead of demand (docs/agent.md, "Prefetch").
//!
//! ```text
//! stored object: nonce (12) ‖ AES-256-GCM(record) ‖ tag (16)
//!   key   = SHA-256("lode image working set v1" ‖ every chunk key of the image)
//!   AAD   = the image's manifest id
//! record (integers little-endian):
//!  0   8      magic "LODEIMWS"
//!  8   2      version (1)
//! 10   2      flags: bit 0 = record again at the next start; the other bits 0
//! 12   4      reserved (0)
//! 16   8      the image's chunk count (its manifest's chunk table length)
//! 24   8      entry count N (at most MAX_ENTRIES and at most the chunk count)
//! 32   8 × N  chunk indexes in first-touch order, each below the chunk count, no repeats
//! ```
//!
//! The envelope is [`crate::record`]'s. The unit is the chunk, not the segment: a chunk is what the AZ cache and the origin
//! hand out (a v2 object is fetched whole and its segments checked one by one), so a
//! finer record would fetch the same objects. The record says what a start read, which
//! is as private as the image, so it is sealed under a key only holders of the image's
//! key table can derive (a snapshot's record, lode-snap, uses another label, so neither
//! opens as the other). A record that fails to open or parse only loses its prefetch:
//! callers ignore it with a warning, and every chunk is still checked by its name.

use thiserror::Error;

use crate::record::{OVERHEAD, RecordSealKey, distinct_entries};
use crate::{ChunkIndex, KeyTable, ManifestId};

const MAGIC: [u8; 8] = *b"LODEIMWS";
const VERSION: u16 = 1;
const HEADER: usize = 32;
/// The most chunks a record lists (512 GiB of 512 KiB chunks).
pub const MAX_ENTRIES: u64 = 1 << 20;
const KEY_LABEL: &[u8] = b"lode image working set v1";
const FLAG_RERECORD: u16 = 1;

/// A record could not be opened or parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WorkSetError {
    /// It does not decrypt under this image's keys (another image's, or damaged).
    #[error("image working-set record does not authenticate under the image's keys")]
    Unauthentic,
    /// The decrypted bytes are not a record.
    #[error("image working-set record is corrupt: {0}")]
    Corrupt(String),
    /// The record is for an image with another chunk count.
    #[error("image working-set record is for an image of {found} chunks, not {expected}")]
    WrongImage {
        /// The chunk count in the record.
        found: u64,
        /// The image's chunk count.
        expected: u64,
    },
}

/// The chunks one start read, first touch first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageWorkSet {
    /// Chunk indexes in the order they were first read.
    pub chunks: Vec<ChunkIndex>,
    /// Whether the next start should record again and replace this record (set by
    /// `lode prefetch record`); it still prefetches what is listed.
    pub rerecord: bool,
}

/// The key that seals an image's working-set records, derived from its key table.
#[derive(Debug)]
pub struct WorkSetKey(RecordSealKey);

impl WorkSetKey {
    /// The record key of the image whose chunk keys are `keys`.
    pub fn new(keys: &KeyTable) -> Self {
        Self(RecordSealKey::new(keys, KEY_LABEL))
    }
}

/// The most bytes a sealed record of an image of `chunk_count` chunks may be: the bound
/// on reading one back from a store.
pub fn max_sealed_len(chunk_count: u64) -> u64 {
    (OVERHEAD + HEADER) as u64 + 8 * chunk_count.min(MAX_ENTRIES)
}

/// How many chunks a sealed record of `sealed_len` bytes lists, read from its length
/// alone (which the encryption does not hide): what `lode inspect` shows without keys.
/// `None` when the length is not one a record can have.
pub fn entries_in_sealed_len(sealed_len: u64) -> Option<u64> {
    let body = sealed_len.checked_sub((OVERHEAD + HEADER) as u64)?;
    (body % 8 == 0).then_some(body / 8)
}

impl ImageWorkSet {
    /// The record's bytes, sealed for image `id` of `chunk_count` chunks under `key`.
    /// Entries past [`MAX_ENTRIES`] are dropped (the start's first chunks are kept).
    pub fn seal(&self, id: &ManifestId, chunk_count: u64, key: &WorkSetKey) -> Vec<u8> {
        let most = usize::try_from(MAX_ENTRIES).unwrap_or(usize::MAX);
        let chunks = &self.chunks[..self.chunks.len().min(most)];
        let mut b = Vec::with_capacity(HEADER + 8 * chunks.len() + OVERHEAD);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.rerecord { FLAG_RERECORD } else { 0 };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&chunk_count.to_le_bytes());
        b.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
        for c in chunks {
            b.extend_from_slice(&c.0.to_le_bytes());
        }
        key.0.seal(id, b)
    }

    /// Opens and parses a stored record of image `id` (`chunk_count` chunks).
    pub fn open(
        sealed: &[u8],
        id: &ManifestId,
        chunk_count: u64,
        key: &WorkSetKey,
    ) -> Result<ImageWorkSet, WorkSetError> {
        let plain = key.0.open(id, sealed).ok_or(WorkSetError::Unauthentic)?;
        Self::parse(&plain, chunk_count)
    }

    /// Parses a decrypted record: the one place its bytes are read.
    pub fn parse(b: &[u8], chunk_count: u64) -> Result<ImageWorkSet, WorkSetError> {
        let bad = |what: &str| WorkSetError::Corrupt(what.to_owned());
        let head = b
            .get(..HEADER)
            .ok_or_else(|| bad("shorter than its header"))?;
        let u64_at = |s: &[u8], i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&s[i..i + 8]);
            u64::from_le_bytes(x)
        };
        if head[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        if u16::from_le_bytes([head[8], head[9]]) != VERSION {
            return Err(bad("unknown version"));
        }
        let flags = u16::from_le_bytes([head[10], head[11]]);
        if flags & !FLAG_RERECORD != 0 {
            return Err(bad("unknown flags"));
        }
        if head[12..16] != [0; 4] {
            return Err(bad("reserved bytes are not zero"));
        }
        let count_in_record = u64_at(head, 16);
        if count_in_record != chunk_count {
            return Err(WorkSetError::WrongImage {
                found: count_in_record,
                expected: chunk_count,
            });
        }
        let n = u64_at(head, 24);
        if n > MAX_ENTRIES || n > chunk_count {
            return Err(bad(
                "more entries than the image has chunks or a record may hold",
            ));
        }
        let rest = &b[HEADER..];
        if rest.len() as u64 != n * 8 {
            return Err(bad("entry list length does not match its count"));
        }
        let chunks = distinct_entries(rest, chunk_count, "chunk", "image")
            .map_err(WorkSetError::Corrupt)?
            .into_iter()
            .map(ChunkIndex)
            .collect();
        Ok(ImageWorkSet {
            chunks,
            rerecord: flags & FLAG_RERECORD != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ChunkEntry, ChunkFormat, ChunkKey, ChunkName, ChunkSize, DataKey, ImageConfig, ImageDigest,
        Manifest, ManifestHeader, RootId, WrappedKey,
    };
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn keys(seed: u8) -> (ManifestId, WorkSetKey, KeyTable) {
        let header = ManifestHeader {
            root: RootId(1),
            chunk_size: ChunkSize::default(),
            chunk_format: ChunkFormat::V1,
            device_size: 1 << 20,
            image_digest: ImageDigest::from_bytes([0; 32]),
            config: ImageConfig::default(),
        };
        let chunks = vec![
            ChunkEntry::Stored(ChunkName::from_bytes([seed; 32])),
            ChunkEntry::Zero,
        ];
        let data_key = DataKey::random().unwrap();
        let m = Manifest::seal(
            header,
            chunks,
            &[ChunkKey::from_bytes([seed; 32])],
            &data_key,
            WrappedKey {
                key_id: "k".into(),
                blob: vec![1],
            },
        )
        .unwrap();
        let t = m.open_keys(&data_key).unwrap();
        (m.id(), WorkSetKey::new(&t), t)
    }

    fn ws(chunks: &[u64], rerecord: bool) -> ImageWorkSet {
        ImageWorkSet {
            chunks: chunks.iter().map(|c| ChunkIndex(*c)).collect(),
            rerecord,
        }
    }

    #[test]
    fn seal_open_round_trip_and_refusals() {
        let (id, k, _) = keys(1);
        for w in [ws(&[7, 0, 255, 3], false), ws(&[], true), ws(&[1], true)] {
            let sealed = w.seal(&id, 300, &k);
            assert_eq!(ImageWorkSet::open(&sealed, &id, 300, &k).unwrap(), w);
            assert_eq!(
                entries_in_sealed_len(sealed.len() as u64),
                Some(w.chunks.len() as u64)
            );
            assert!(sealed.len() as u64 <= max_sealed_len(300));
        }
        let w = ws(&[7, 0, 255, 3], false);
        let sealed = w.seal(&id, 300, &k);
        let (other_id, other_key, _) = keys(2);
        assert_eq!(
            ImageWorkSet::open(&sealed, &other_id, 300, &k),
            Err(WorkSetError::Unauthentic)
        );
        assert_eq!(
            ImageWorkSet::open(&sealed, &id, 300, &other_key),
            Err(WorkSetError::Unauthentic)
        );
        for i in 0..sealed.len() {
            let mut s = sealed.clone();
            s[i] ^= 1;
            assert!(ImageWorkSet::open(&s, &id, 300, &k).is_err(), "flip at {i}");
        }
        assert_eq!(
            ImageWorkSet::open(&sealed, &id, 301, &k)
                .unwrap_err()
                .to_string(),
            "image working-set record is for an image of 300 chunks, not 301"
        );
        assert!(ImageWorkSet::open(&sealed[..5], &id, 300, &k).is_err());
        assert_eq!(entries_in_sealed_len(10), None);
    }

    #[test]
    fn a_snapshot_key_does_not_open_an_image_record() {
        let (id, k, table) = keys(3);
        // The label lode-snap seals snapshot records with.
        let snap = RecordSealKey::new(&table, b"lode working set v1");
        let sealed = ws(&[1], false).seal(&id, 4, &k);
        assert_eq!(
            ImageWorkSet::open(&sealed, &id, 4, &WorkSetKey(snap)),
            Err(WorkSetError::Unauthentic)
        );
    }

    fn plain(chunk_count: u64, n: u64, flags: u16, chunks: &[u64]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&chunk_count.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        for c in chunks {
            b.extend_from_slice(&c.to_le_bytes());
        }
        b
    }

    #[test]
    fn parse_refusals_name_the_problem() {
        let e = |b: &[u8]| ImageWorkSet::parse(b, 4).unwrap_err().to_string();
        assert_eq!(
            e(&plain(4, 1, 0, &[4])),
            "image working-set record is corrupt: chunk 4 is past the end of the image"
        );
        assert_eq!(
            e(&plain(4, 2, 0, &[1, 1])),
            "image working-set record is corrupt: chunk 1 is listed twice"
        );
        assert!(e(&plain(4, 3, 0, &[1])).contains("does not match its count"));
        assert!(e(&plain(4, 5, 0, &[0, 1, 2, 3, 0])).contains("more entries than"));
        assert!(e(&plain(4, u64::MAX, 0, &[])).contains("more entries than"));
        assert!(e(&plain(4, 0, 2, &[])).contains("unknown flags"));
        assert!(e(b"LODEIMW").contains("shorter than its header"));
        let mut reserved = plain(4, 0, 0, &[]);
        reserved[13] = 1;
        assert!(e(&reserved).contains("reserved bytes"));
        assert_eq!(
            ImageWorkSet::parse(&plain(4, 2, 1, &[3, 0]), 4).unwrap(),
            ws(&[3, 0], true)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ImageWorkSet::parse(&b, 1 << 20);
        }

        #[test]
        fn accepted_entries_are_in_range_and_distinct(
            chunks in proptest::collection::vec(0u64..300, 0..40),
            flags in 0u16..4,
        ) {
            let b = plain(256, chunks.len() as u64, flags, &chunks);
            if let Ok(w) = ImageWorkSet::parse(&b, 256) {
                let set: HashSet<_> = w.chunks.iter().collect();
                prop_assert_eq!(set.len(), w.chunks.len());
                prop_assert!(w.chunks.iter().all(|c| c.0 < 256));
                prop_assert_eq!(w.chunks.len(), chunks.len());
            }
        }

        #[test]
        fn what_is_sealed_opens_unchanged(
            set in proptest::collection::btree_set(0u64..1000, 0..50),
            rerecord in any::<bool>(),
        ) {
            let (id, k, _) = keys(9);
            let w = ImageWorkSet {
                chunks: set.into_iter().rev().map(ChunkIndex).collect(),
                rerecord,
            };
            prop_assert_eq!(ImageWorkSet::open(&w.seal(&id, 1000, &k), &id, 1000, &k).unwrap(), w);
        }
    }
}
