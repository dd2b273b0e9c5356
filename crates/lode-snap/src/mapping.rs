//! The guest-memory mappings a VMM sends with the userfaultfd, as Firecracker's UFFD
//! handshake writes them (docs/snapshotting/handling-page-faults-on-snapshot-resume.md):
//!
//! ```text
//! [{"base_host_virt_addr": 140..., "size": 134217728, "offset": 0, "page_size": 4096,
//!   "page_size_kib": 4096}, ...]
//! ```
//!
//! `offset` is where the region starts in the snapshot's memory file. Unknown fields
//! (`page_size_kib`, deprecated, holds the same byte count) are ignored. The JSON comes
//! from another process, so [`parse_mappings`] is its one parser: bounded, checked
//! arithmetic, and every region must lie inside the snapshot and apart from the others.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The page size lode serves.
pub const PAGE_SIZE: u64 = 4096;
/// The longest handshake message accepted.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The most regions in one handshake (Firecracker sends one per guest memory region).
pub const MAX_REGIONS: usize = 256;
/// The highest user-space address on x86-64 with 5-level paging (2^57).
const USER_ADDRESS_LIMIT: u64 = 1 << 57;

/// One guest memory region: `size` bytes at `base` in the VMM's address space, backed by
/// the snapshot's bytes from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Where the region starts in the VMM's address space.
    #[serde(rename = "base_host_virt_addr")]
    pub base: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where its bytes start in the snapshot.
    pub offset: u64,
    /// The page size backing it.
    pub page_size: u64,
}

impl Mapping {
    /// One past the region's last address.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Whether `addr` lies in the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }

    /// The snapshot offset of `addr`, which must lie in the region.
    pub fn snapshot_offset(&self, addr: u64) -> u64 {
        self.offset + (addr - self.base)
    }
}

/// A handshake that lode refuses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MappingError {
    /// Not JSON of the expected shape.
    #[error("guest memory mappings are not valid JSON: {0}")]
    Json(String),
    /// Too long.
    #[error("guest memory mappings: the message is {len} bytes, over the {max}-byte limit")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No regions, or too many.
    #[error("guest memory mappings: {count} regions (1 to {max} expected)")]
    Count {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// One region is wrong on its own.
    #[error("guest memory region {index} ({region}): {what}")]
    Region {
        /// Its position in the array.
        index: usize,
        /// The region as sent.
        region: String,
        /// What is wrong.
        what: String,
    },
    /// Two regions share addresses or snapshot bytes.
    #[error("guest memory regions {a} and {b} overlap in {space}")]
    Overlap {
        /// One region.
        a: usize,
        /// The other.
        b: usize,
        /// "host addresses" or "snapshot offsets".
        space: &'static str,
    },
}

fn describe(m: &Mapping) -> String {
    format!(
        "base {:#x}, size {}, offset {}, page size {}",
        m.base, m.size, m.offset, m.page_size
    )
}

/// Parses and checks the regions a VMM sent for a snapshot of `snapshot_size` bytes.
/// Regions come back sorted by address.
pub fn parse_mappings(json: &[u8], snapshot_size: u64) -> Result<Vec<Mapping>, MappingError> {
    if json.len() > MAX_MESSAGE_BYTES {
        return Err(MappingError::TooLong {
            len: json.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let regions: Vec<Mapping> =
        serde_json::from_slice(json).map_err(|e| MappingError::Json(e.to_string()))?;
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(MappingError::Count {
            count: regions.len(),
            max: MAX_REGIONS,
        });
    }
    for (index, m) in regions.iter().enumerate() {
        let bad = |what: String| MappingError::Region {
            index,
            region: describe(m),
            what,
        };
        if m.page_size != PAGE_SIZE {
            return Err(bad(format!(
                "page size {} is not served: lode installs {PAGE_SIZE}-byte pages only \
                 (hugetlbfs-backed guest memory is not supported)",
                m.page_size
            )));
        }
        if m.size == 0 {
            return Err(bad("size is zero".into()));
        }
        if m.base % PAGE_SIZE != 0 || m.size % PAGE_SIZE != 0 || m.offset % PAGE_SIZE != 0 {
            return Err(bad(format!(
                "base, size and offset must be multiples of the {PAGE_SIZE}-byte page"
            )));
        }
        match m.base.checked_add(m.size) {
            Some(end) if end <= USER_ADDRESS_LIMIT => {}
            _ => {
                return Err(bad(
                    "the region runs past the end of the address space".into()
                ));
            }
        }
        match m.offset.checked_add(m.size) {
            Some(end) if end <= snapshot_size => {}
            _ => {
                return Err(bad(format!(
                    "the region runs past the end of the {snapshot_size}-byte snapshot"
                )));
            }
        }
    }
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| regions[i].base);
    for w in order.windows(2) {
        let (a, b) = (&regions[w[0]], &regions[w[1]]);
        if a.end() > b.base {
            return Err(overlap(w[0], w[1], "host addresses"));
        }
    }
    let mut by_offset: Vec<usize> = (0..regions.len()).collect();
    by_offset.sort_by_key(|&i| regions[i].offset);
    for w in by_offset.windows(2) {
        let (a, b) = (&regions[w[0]], &regions[w[1]]);
        if a.offset + a.size > b.offset {
            return Err(overlap(w[0], w[1], "snapshot offsets"));
        }
    }
    Ok(order.into_iter().map(|i| regions[i]).collect())
}

fn overlap(a: usize, b: usize, space: &'static str) -> MappingError {
    MappingError::Overlap {
        a: a.min(b),
        b: a.max(b),
        space,
    }
}

/// The region holding `addr` in `sorted` (as [`parse_mappings`] returns them).
pub fn find(sorted: &[Mapping], addr: u64) -> Option<&Mapping> {
    let i = sorted.partition_point(|m| m.base <= addr);
    let m = sorted.get(i.checked_sub(1)?)?;
    m.contains(addr).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SNAP: u64 = 1 << 30;

    fn json(regions: &[(u64, u64, u64)]) -> Vec<u8> {
        let v: Vec<_> = regions
            .iter()
            .map(|&(base, size, offset)| {
                serde_json::json!({"base_host_virt_addr": base, "size": size, "offset": offset,
                    "page_size": 4096, "page_size_kib": 4096})
            })
            .collect();
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn firecracker_handshake_parses() {
        let m = parse_mappings(
            &json(&[
                (0x7f00_0020_0000, 1 << 20, 1 << 20),
                (0x7f00_0000_0000, 1 << 20, 0),
            ]),
            SNAP,
        )
        .unwrap();
        assert_eq!(m[0].base, 0x7f00_0000_0000);
        assert_eq!(m[1].offset, 1 << 20);
        assert_eq!(find(&m, 0x7f00_0000_0fff).unwrap().offset, 0);
        assert_eq!(find(&m, 0x7f00_0020_0001).unwrap().offset, 1 << 20);
        assert!(find(&m, 0x7f00_0010_0000).is_none());
        assert!(find(&m, 0x1000).is_none());
        assert!(find(&m, u64::MAX).is_none());
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = |j: &[u8]| parse_mappings(j, SNAP).unwrap_err().to_string();
        assert!(e(b"{not json").starts_with("guest memory mappings are not valid JSON"));
        assert_eq!(
            e(b"[]"),
            "guest memory mappings: 0 regions (1 to 256 expected)"
        );
        assert!(e(br#"[{"base_host_virt_addr": 4096, "size": 4096}]"#).contains("missing field"));
        assert_eq!(
            e(&json(&[(4096, 8192, 0), (8192, 4096, 1 << 20)])),
            "guest memory regions 0 and 1 overlap in host addresses"
        );
        assert_eq!(
            e(&json(&[(4096, 8192, 0), (1 << 20, 4096, 4096)])),
            "guest memory regions 0 and 1 overlap in snapshot offsets"
        );
        assert_eq!(
            e(&json(&[(4096, SNAP, 4096)])),
            "guest memory region 0 (base 0x1000, size 1073741824, offset 4096, page size \
             4096): the region runs past the end of the 1073741824-byte snapshot"
        );
        assert!(e(&json(&[(u64::MAX - 4095, 8192, 0)])).contains("past the end of the address"));
        assert!(e(&json(&[(4097, 4096, 0)])).contains("multiples of the 4096-byte page"));
        assert!(e(&json(&[(4096, 0, 0)])).contains("size is zero"));
        let huge = br#"[{"base_host_virt_addr": 2097152, "size": 2097152, "offset": 0, "page_size": 2097152}]"#;
        assert!(e(huge).contains("hugetlbfs-backed guest memory is not supported"));
        assert!(e(&vec![b' '; MAX_MESSAGE_BYTES + 1]).contains("over the 65536-byte limit"));
        assert!(
            e(br#"[{"base_host_virt_addr": -1, "size": 4096, "offset": 0, "page_size": 4096}]"#)
                .contains("not valid JSON")
        );
    }

    proptest! {
        #[test]
        fn accepted_regions_are_inside_and_apart(
            regions in proptest::collection::vec((0u64..64, 0u64..8, 0u64..64), 1..6),
            snapshot_pages in 1u64..80,
        ) {
            let r: Vec<_> = regions.iter().map(|&(b, s, o)| (b * PAGE_SIZE, s * PAGE_SIZE, o * PAGE_SIZE)).collect();
            if let Ok(m) = parse_mappings(&json(&r), snapshot_pages * PAGE_SIZE) {
                for w in m.windows(2) {
                    prop_assert!(w[0].end() <= w[1].base);
                }
                for x in &m {
                    prop_assert!(x.size > 0 && x.offset + x.size <= snapshot_pages * PAGE_SIZE);
                    for y in &m {
                        if x != y {
                            prop_assert!(x.offset + x.size <= y.offset || y.offset + y.size <= x.offset);
                        }
                    }
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_mappings(&bytes, SNAP);
        }
    }
}
