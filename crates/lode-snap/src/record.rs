//! The working-set record (REAP, ASPLOS'21): which pages a restore faulted, in order,
//! stored beside the snapshot so the next restore can install them ahead of demand.
//!
//! ```text
//! stored object: nonce (12) ‖ AES-256-GCM(record) ‖ tag (16)
//!   key   = SHA-256("lode working set v1" ‖ every chunk key of the snapshot)
//!   AAD   = the snapshot's manifest id
//! record (integers little-endian):
//!  0   8      magic "LODEWSET"
//!  8   2      version (1)
//! 10   2      reserved (0)
//! 12   4      page size (4096)
//! 16   8      snapshot size in bytes
//! 24   8      page count N (at most MAX_PAGES)
//! 32   8 × N  page numbers in fault order, each below size / page size, no repeats
//! ```
//!
//! The record says what a restore touched, which is as private as the memory, so it is
//! encrypted like everything else in the store; a record that fails to open or parse is
//! ignored with a warning (it only steers prefetch; every chunk is still verified).

use lode_format::record::{OVERHEAD, RecordSealKey, distinct_entries};
use lode_format::{KeyTable, ManifestId};
use thiserror::Error;

use crate::mapping::PAGE_SIZE;

const MAGIC: [u8; 8] = *b"LODEWSET";
const VERSION: u16 = 1;
const HEADER: usize = 32;
/// The most pages a record holds (64 GiB of 4 KiB pages).
pub const MAX_PAGES: u64 = 16 << 20;
const KEY_LABEL: &[u8] = b"lode working set v1";

/// A record could not be opened or parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// It does not decrypt under this snapshot's keys.
    #[error("working-set record does not authenticate under the snapshot's keys")]
    Unauthentic,
    /// The decrypted bytes are not a record.
    #[error("working-set record is corrupt: {0}")]
    Corrupt(String),
    /// The record is for a snapshot of another size.
    #[error("working-set record is for a {found}-byte snapshot, not {expected} bytes")]
    WrongSnapshot {
        /// Size in the record.
        found: u64,
        /// The snapshot's size.
        expected: u64,
    },
}

/// Pages in fault order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// Page numbers (snapshot offset / page size), first fault first.
    pub pages: Vec<u64>,
}

/// The key that seals a snapshot's working-set records, derived from its key table.
#[derive(Debug)]
pub struct RecordKey(RecordSealKey);

impl RecordKey {
    /// The record key of the snapshot whose chunk keys are `keys`.
    pub fn new(keys: &KeyTable) -> Self {
        Self(RecordSealKey::new(keys, KEY_LABEL))
    }
}

/// The most bytes a sealed record of a `snapshot_size`-byte snapshot may be (one entry
/// per page, at most [`MAX_PAGES`]): the bound on reading one back from a store.
pub fn max_sealed_len(snapshot_size: u64) -> u64 {
    let pages = (snapshot_size / PAGE_SIZE).min(MAX_PAGES);
    (OVERHEAD + HEADER) as u64 + 8 * pages
}

impl WorkingSet {
    /// The record's bytes, sealed for snapshot `id` under its key table.
    pub fn seal(&self, id: &ManifestId, snapshot_size: u64, key: &RecordKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + 8 * self.pages.len() + OVERHEAD);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&4096u32.to_le_bytes());
        b.extend_from_slice(&snapshot_size.to_le_bytes());
        b.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        key.0.seal(id, b)
    }

    /// Opens and parses a stored record of snapshot `id` (`snapshot_size` bytes).
    pub fn open(
        sealed: &[u8],
        id: &ManifestId,
        snapshot_size: u64,
        key: &RecordKey,
    ) -> Result<WorkingSet, RecordError> {
        let plain = key.0.open(id, sealed).ok_or(RecordError::Unauthentic)?;
        Self::parse(&plain, snapshot_size)
    }

    /// Parses a decrypted record: the one place its bytes are read.
    pub fn parse(b: &[u8], snapshot_size: u64) -> Result<WorkingSet, RecordError> {
        let bad = |what: &str| RecordError::Corrupt(what.to_owned());
        let head = b
            .get(..HEADER)
            .ok_or_else(|| bad("shorter than its header"))?;
        let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
        let u32_at =
            |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let u64_at = |s: &[u8], i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&s[i..i + 8]);
            u64::from_le_bytes(x)
        };
        if head[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        if u16_at(8) != VERSION || u16_at(10) != 0 {
            return Err(bad("unknown version"));
        }
        if u64::from(u32_at(12)) != PAGE_SIZE {
            return Err(bad("page size is not 4096"));
        }
        let size = u64_at(head, 16);
        if size != snapshot_size {
            return Err(RecordError::WrongSnapshot {
                found: size,
                expected: snapshot_size,
            });
        }
        let count = u64_at(head, 24);
        if count > MAX_PAGES {
            return Err(bad("more pages than a record may hold"));
        }
        let rest = &b[HEADER..];
        if rest.len() as u64 != count * 8 {
            return Err(bad("page list length does not match its count"));
        }
        let pages = distinct_entries(rest, snapshot_size.div_ceil(PAGE_SIZE), "page", "snapshot")
            .map_err(RecordError::Corrupt)?;
        Ok(WorkingSet { pages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lode_format::{
        ChunkEntry, ChunkKey, ChunkName, DataKey, ImageConfig, Manifest, ManifestHeader,
    };
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn keys(seed: u8) -> (ManifestId, RecordKey) {
        let header = ManifestHeader {
            root: lode_format::RootId(1),
            chunk_size: lode_format::ChunkSize::default(),
            chunk_format: lode_format::ChunkFormat::V1,
            device_size: 1 << 20,
            image_digest: lode_format::ImageDigest::from_bytes([0; 32]),
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
            lode_format::WrappedKey {
                key_id: "k".into(),
                blob: vec![1],
            },
        )
        .unwrap();
        let t = m.open_keys(&data_key).unwrap();
        (m.id(), RecordKey::new(&t))
    }

    #[test]
    fn seal_open_round_trip_and_refusals() {
        let (id, k) = keys(1);
        let ws = WorkingSet {
            pages: vec![7, 0, 255, 3],
        };
        let sealed = ws.seal(&id, 1 << 20, &k);
        assert_eq!(WorkingSet::open(&sealed, &id, 1 << 20, &k).unwrap(), ws);
        let (other_id, other_keys) = keys(2);
        assert_eq!(
            WorkingSet::open(&sealed, &other_id, 1 << 20, &k),
            Err(RecordError::Unauthentic)
        );
        assert_eq!(
            WorkingSet::open(&sealed, &id, 1 << 20, &other_keys),
            Err(RecordError::Unauthentic)
        );
        for i in 0..sealed.len() {
            let mut s = sealed.clone();
            s[i] ^= 1;
            assert!(
                WorkingSet::open(&s, &id, 1 << 20, &k).is_err(),
                "flip at {i}"
            );
        }
        assert_eq!(
            WorkingSet::open(&sealed, &id, 2 << 20, &k)
                .unwrap_err()
                .to_string(),
            "working-set record is for a 1048576-byte snapshot, not 2097152 bytes"
        );
        assert!(WorkingSet::open(&sealed[..5], &id, 1 << 20, &k).is_err());
    }

    fn plain(size: u64, count: u64, pages: &[u64]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&4096u32.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        for p in pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        b
    }

    #[test]
    fn parse_refusals_name_the_problem() {
        let e = |b: &[u8]| WorkingSet::parse(b, 8192).unwrap_err().to_string();
        assert_eq!(
            e(&plain(8192, 1, &[2])),
            "working-set record is corrupt: page 2 is past the end of the snapshot"
        );
        assert_eq!(
            e(&plain(8192, 2, &[1, 1])),
            "working-set record is corrupt: page 1 is listed twice"
        );
        assert!(e(&plain(8192, 3, &[1])).contains("does not match its count"));
        assert!(e(&plain(8192, u64::MAX, &[])).contains("more pages than"));
        assert!(e(b"LODEWSE").contains("shorter than its header"));
        assert_eq!(
            WorkingSet::parse(&plain(8192, 2, &[1, 0]), 8192)
                .unwrap()
                .pages,
            vec![1, 0]
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = WorkingSet::parse(&b, 1 << 20);
        }

        #[test]
        fn accepted_pages_are_in_range_and_distinct(pages in proptest::collection::vec(0u64..300, 0..40)) {
            if let Ok(ws) = WorkingSet::parse(&plain(256 * 4096, pages.len() as u64, &pages), 256 * 4096) {
                let set: HashSet<_> = ws.pages.iter().collect();
                prop_assert_eq!(set.len(), ws.pages.len());
                prop_assert!(ws.pages.iter().all(|&p| p < 256));
            }
        }
    }
}
