//! Extent trees: mapping a file's logical blocks to image blocks.
//!
//! Up to four extents live in the inode's `i_block`. Beyond that the tree is
//! built bottom-up, packing each node full: leaf blocks of 340 extents, then
//! index blocks of 340 entries, until at most four entries remain for the
//! root in the inode.
//!
//! ```text
//! i_block: header(depth=2) idx idx
//!                           │    └──────────────┐
//!              index block: header(depth=1) idx … idx
//!                                            │
//!                            leaf block: header(depth=0) ext ext … ext
//! ```
//!
//! Tree blocks are taken from the caller's allocator in a fixed order
//! (leaves first, then each level up), so the layout is deterministic.

use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32};

use crate::layout::{
    BLOCK_SIZE, BlockNo, EXTENT_MAGIC, EXTENTS_IN_INODE, EXTENTS_PER_BLOCK, Extent, ExtentHeader,
    ExtentIndex, MAX_EXTENT_LEN,
};

/// A run of blocks: `len` blocks from logical `logical` at image block `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub logical: u32,
    pub start: BlockNo,
    pub len: u32,
}

/// An extent tree ready to write.
#[derive(Debug)]
pub(crate) struct Tree {
    /// The inode's `i_block`.
    pub root: [u8; 60],
    /// Tree blocks (leaves and indexes) and their contents.
    pub blocks: Vec<(BlockNo, Vec<u8>)>,
}

fn header(entries: usize, max: u16, depth: u16) -> ExtentHeader {
    ExtentHeader {
        magic: U16::new(EXTENT_MAGIC),
        entries: U16::new(u16::try_from(entries).expect("node entries fit u16")),
        max: U16::new(max),
        depth: U16::new(depth),
        generation: U32::new(0),
    }
}

fn lo_hi(b: BlockNo) -> (u32, u16) {
    // Block numbers are checked against 2^32 before layout, so the high
    // half is always zero for this (non-64bit) image.
    let lo = u32::try_from(b.0 & 0xFFFF_FFFF).expect("masked");
    let hi = u16::try_from(b.0 >> 32).expect("block numbers below 2^48");
    (lo, hi)
}

/// One node entry: either a leaf extent or an index entry, already encoded.
struct Item {
    first_logical: u32,
    bytes: [u8; 12],
}

fn node(items: &[Item], max: u16, depth: u16, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    out[..12].copy_from_slice(header(items.len(), max, depth).as_bytes());
    for (i, it) in items.iter().enumerate() {
        out[12 + 12 * i..24 + 12 * i].copy_from_slice(&it.bytes);
    }
    out
}

/// Builds the extent tree for `runs` (sorted, non-overlapping), splitting
/// runs longer than one extent can hold. `alloc` hands out tree blocks.
pub(crate) fn build(runs: &[Run], mut alloc: impl FnMut() -> BlockNo) -> Tree {
    let mut items = Vec::new();
    for r in runs {
        let mut done = 0;
        while done < r.len {
            let len = (r.len - done).min(MAX_EXTENT_LEN);
            let (lo, hi) = lo_hi(BlockNo(r.start.0 + u64::from(done)));
            let e = Extent {
                block: U32::new(r.logical + done),
                len: U16::new(u16::try_from(len).expect("at most 32768")),
                start_hi: U16::new(hi),
                start_lo: U32::new(lo),
            };
            items.push(Item {
                first_logical: r.logical + done,
                bytes: e.as_bytes().try_into().expect("12 bytes"),
            });
            done += len;
        }
    }

    let block_size = usize::try_from(BLOCK_SIZE).expect("4096 fits usize");
    let mut blocks = Vec::new();
    let mut depth = 0u16;
    while items.len() > usize::from(EXTENTS_IN_INODE) {
        let mut upper = Vec::new();
        for group in items.chunks(usize::from(EXTENTS_PER_BLOCK)) {
            let at = alloc();
            blocks.push((at, node(group, EXTENTS_PER_BLOCK, depth, block_size)));
            let (lo, hi) = lo_hi(at);
            let idx = ExtentIndex {
                block: U32::new(group[0].first_logical),
                leaf_lo: U32::new(lo),
                leaf_hi: U16::new(hi),
                unused: U16::new(0),
            };
            upper.push(Item {
                first_logical: group[0].first_logical,
                bytes: idx.as_bytes().try_into().expect("12 bytes"),
            });
        }
        items = upper;
        depth += 1;
    }
    let root = node(&items, EXTENTS_IN_INODE, depth, 60)
        .try_into()
        .expect("60 bytes");
    Tree { root, blocks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(start: u64) -> impl FnMut() -> BlockNo {
        let mut next = start;
        move || {
            next += 1;
            BlockNo(next - 1)
        }
    }

    #[test]
    fn few_extents_stay_in_inode() {
        let t = build(
            &[Run {
                logical: 0,
                start: BlockNo(100),
                len: 70000,
            }],
            counter(1000),
        );
        assert!(t.blocks.is_empty());
        // 70000 blocks = 32768 + 32768 + 4464: three extents, depth 0.
        assert_eq!(&t.root[2..4], &3u16.to_le_bytes());
        assert_eq!(&t.root[6..8], &0u16.to_le_bytes());
    }

    #[test]
    fn many_extents_need_index_levels() {
        let runs: Vec<Run> = (0..2000)
            .map(|i| Run {
                logical: i * 2,
                start: BlockNo(u64::from(i) * 2 + 50),
                len: 1,
            })
            .collect();
        let t = build(&runs, counter(1000));
        // 2000 extents → 6 leaves → 1 index block → root with 1 entry, depth 2.
        assert_eq!(t.blocks.len(), 7);
        assert_eq!(&t.root[2..4], &1u16.to_le_bytes());
        assert_eq!(&t.root[6..8], &2u16.to_le_bytes());
        assert_eq!(t.blocks[6].0, BlockNo(1006));
    }
}
