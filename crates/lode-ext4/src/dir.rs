//! Linear directory blocks.
//!
//! A directory is a run of 4 KiB blocks of variable-length entries; the last
//! entry of each block stretches (`rec_len`) to the block's end. `.` and `..`
//! come first, then the children in name-byte order. No hash index
//! (`dir_index` is off), which the kernel and e2fsck accept at any size.
//!
//! ```text
//! ┌─────────┬──────────┬───────────┬─────────────┬─────────────────────────┐
//! │ inode   │ rec_len  │ name_len  │ file_type   │ name … (padded to 4)    │
//! │ u32     │ u16      │ u8        │ u8          │                         │
//! └─────────┴──────────┴───────────┴─────────────┴─────────────────────────┘
//! ```

use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32};

use crate::layout::{BLOCK_SIZE, DirEntryHeader, FT_DIR};

/// One directory entry to write.
#[derive(Debug, Clone)]
pub(crate) struct DirEntry<'a> {
    pub name: &'a [u8],
    pub inode: u32,
    pub file_type: u8,
}

fn rec_len(name: &[u8]) -> usize {
    8 + name.len().div_ceil(4) * 4
}

/// Encodes a directory with `.` = `me`, `..` = `parent` and `entries`
/// (already sorted) into whole blocks.
pub(crate) fn build(me: u32, parent: u32, entries: &[DirEntry<'_>]) -> Vec<u8> {
    let block = usize::try_from(BLOCK_SIZE).expect("4096 fits usize");
    let dots = [
        DirEntry {
            name: b".",
            inode: me,
            file_type: FT_DIR,
        },
        DirEntry {
            name: b"..",
            inode: parent,
            file_type: FT_DIR,
        },
    ];
    let mut out: Vec<u8> = Vec::with_capacity(block);
    // Offset of the last entry written, so its rec_len can be stretched.
    let mut last: Option<usize> = None;
    let mut block_start = 0;
    for e in dots.iter().chain(entries) {
        let len = rec_len(e.name);
        if out.len() + len > block_start + block {
            // Close this block: stretch the previous entry to its end.
            let l = last.expect("a block always holds at least one entry");
            stretch(&mut out, l, block_start + block);
            out.resize(block_start + block, 0);
            block_start += block;
        }
        last = Some(out.len());
        let h = DirEntryHeader {
            inode: U32::new(e.inode),
            rec_len: U16::new(u16::try_from(len).expect("entries are < 264 bytes")),
            name_len: u8::try_from(e.name.len()).expect("names are <= 255 bytes"),
            file_type: e.file_type,
        };
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(e.name);
        out.resize(out.len() + (len - 8 - e.name.len()), 0);
    }
    let l = last.expect("`.` is always written");
    stretch(&mut out, l, block_start + block);
    out.resize(block_start + block, 0);
    out
}

fn stretch(out: &mut [u8], entry: usize, end: usize) {
    let len = u16::try_from(end - entry).expect("within one block");
    out[entry + 4..entry + 6].copy_from_slice(&len.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_dir_is_one_block() {
        let b = build(2, 2, &[]);
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[4..6], &12u16.to_le_bytes());
        assert_eq!(&b[12 + 4..12 + 6], &(4096u16 - 12).to_le_bytes());
    }

    #[test]
    fn entries_spill_into_more_blocks() {
        let names: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("file{i:06}").into_bytes())
            .collect();
        let entries: Vec<DirEntry<'_>> = names
            .iter()
            .map(|n| DirEntry {
                name: n,
                inode: 12,
                file_type: 1,
            })
            .collect();
        let b = build(2, 2, &entries);
        // 24 + 1000 * 20 bytes = 5 blocks.
        assert_eq!(b.len(), 5 * 4096);
        // Every block's entries chain exactly to its end.
        for blk in b.chunks(4096) {
            let mut off = 0;
            while off < 4096 {
                let rl = usize::from(u16::from_le_bytes([blk[off + 4], blk[off + 5]]));
                assert!(rl >= 12);
                off += rl;
            }
            assert_eq!(off, 4096);
        }
    }
}
