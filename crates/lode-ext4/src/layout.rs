//! On-disk ext4 structures, as typed `#[repr(C)]` structs of little-endian fields.
//!
//! Every struct here is exactly the bytes ext4 stores: fields are
//! [`zerocopy`] little-endian integers (alignment 1, so `repr(C)` adds no
//! padding) and each struct's size is checked at compile time. The writer fills
//! them and serialises them with `as_bytes()`; nothing here does I/O.
//!
//! The image this crate writes (4 KiB blocks, no backups, no journal):
//!
//! ```text
//!  block 0            1 .. 1+gdt          .. data_start      data_start (chunk aligned)
//! ┌──────────────────┬───────────────────┬───────────────┬──────────────────────────────┐
//! │ 1 KiB pad │ SB   │ group descriptors │ free (zeros)  │ region 0 │ region 1 │ ...     │
//! └──────────────────┴───────────────────┴───────────────┴──────────────────────────────┘
//!        ... region n-1 │ metadata region (chunk aligned start)                        │
//!                       │ dir blocks, extent index blocks, symlink blocks, xattr blocks│
//!                       │ block bitmaps[G] │ inode bitmaps[G] │ inode tables[G]        │
//! ```
//!
//! Inode (256 bytes, `extra_isize` = 32):
//!
//! ```text
//!  0x00 ┌──────────────────────────────────────────────┐
//!       │ mode uid size atime ctime mtime dtime gid     │
//!       │ links blocks flags osd1                       │
//!  0x28 │ i_block[60]: extent root / symlink / rdev     │
//!  0x64 │ generation file_acl size_hi faddr osd2[12]    │
//!  0x80 │ extra_isize csum_hi {c,m,a}time_extra crtime  │
//!       │ crtime_extra version_hi projid                │
//!  0xA0 │ in-inode xattrs: magic, entries ↓ … values ↑  │
//! 0x100 └──────────────────────────────────────────────┘
//! ```
//!
//! Extent tree node (in `i_block`, or a whole block for index/leaf blocks):
//!
//! ```text
//! ┌────────────────────┬──────────────┬──────────────┬─────┐
//! │ header (12 bytes)  │ entry 0 (12) │ entry 1 (12) │ ... │
//! │ magic n max depth  │ leaf: lblk len start_hi start_lo   │
//! │                    │ index: lblk leaf_lo leaf_hi         │
//! └────────────────────┴──────────────┴──────────────┴─────┘
//! ```

use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of every block in the image, in bytes.
pub const BLOCK_BYTES: usize = 4096;
/// [`BLOCK_BYTES`] as the type of image offsets.
pub const BLOCK_SIZE: u64 = BLOCK_BYTES as u64;
/// Blocks (and inode-bitmap bits) per block group: one bitmap block's worth.
pub const BLOCKS_PER_GROUP: u64 = 8 * BLOCK_SIZE;
/// Bytes per inode.
pub const INODE_BYTES: usize = 256;
/// [`INODE_BYTES`] as the type of image offsets.
pub const INODE_SIZE: u64 = INODE_BYTES as u64;
/// Inodes in one inode-table block.
pub const INODES_PER_BLOCK: u64 = BLOCK_SIZE / INODE_SIZE;
/// Bytes of a group descriptor (no `64bit` feature).
pub const GROUP_DESC_SIZE: u64 = 32;
/// `i_extra_isize`: covers the fields up to `i_projid`.
pub const EXTRA_ISIZE: u16 = 32;
/// Offset of the in-inode xattr area (after the 128-byte base and extra fields).
pub const INODE_XATTR_OFFSET: usize = 128 + EXTRA_ISIZE as usize;
/// Longest run one extent can map (initialised extents).
pub const MAX_EXTENT_LEN: u32 = 32768;
/// Extent entries in the inode's `i_block`.
pub const EXTENTS_IN_INODE: u16 = 4;
/// Extent entries in one tree block: (4096 - 12) / 12.
pub const EXTENTS_PER_BLOCK: u16 = 340;
/// Kernel limit on a link count (`EXT4_LINK_MAX`).
pub const LINK_MAX: u32 = 65000;

pub const SUPER_MAGIC: u16 = 0xEF53;
pub const EXTENT_MAGIC: u16 = 0xF30A;
pub const XATTR_MAGIC: u32 = 0xEA02_0000;

pub const ROOT_INO: u32 = 2;
pub const LOST_FOUND_INO: u32 = 11;
pub const FIRST_INO: u32 = 11;

// Feature flags we set.
pub const COMPAT_EXT_ATTR: u32 = 0x0008;
pub const COMPAT_SPARSE_SUPER2: u32 = 0x0200;
pub const INCOMPAT_FILETYPE: u32 = 0x0002;
pub const INCOMPAT_EXTENTS: u32 = 0x0040;
pub const INCOMPAT_FLEX_BG: u32 = 0x0200;
pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
pub const RO_COMPAT_LARGE_FILE: u32 = 0x0002;
pub const RO_COMPAT_DIR_NLINK: u32 = 0x0020;
pub const RO_COMPAT_EXTRA_ISIZE: u32 = 0x0040;

/// `i_flags`: the inode's `i_block` holds an extent tree.
pub const EXTENTS_FL: u32 = 0x0008_0000;

// File type bits of `i_mode`.
pub const S_IFIFO: u16 = 0o010000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFSOCK: u16 = 0o140000;

// Directory entry file types (`filetype` feature).
pub const FT_REG: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHR: u8 = 3;
pub const FT_BLK: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

/// A block number in the image (block 0 holds the superblock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BlockNo(pub u64);

impl BlockNo {
    /// Byte offset of the block's first byte in the image.
    pub fn offset(self) -> u64 {
        self.0 * BLOCK_SIZE
    }
}

impl fmt::Display for BlockNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// An inode number (1-based; 2 is the root directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeNo(pub u32);

impl fmt::Display for InodeNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inode {}", self.0)
    }
}

/// The superblock, stored at byte 1024 of block 0.
#[derive(Debug, Clone, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SuperBlock {
    pub inodes_count: U32,
    pub blocks_count_lo: U32,
    pub r_blocks_count_lo: U32,
    pub free_blocks_count_lo: U32,
    pub free_inodes_count: U32,
    pub first_data_block: U32,
    pub log_block_size: U32,
    pub log_cluster_size: U32,
    pub blocks_per_group: U32,
    pub clusters_per_group: U32,
    pub inodes_per_group: U32,
    pub mtime: U32,
    pub wtime: U32,
    pub mnt_count: U16,
    pub max_mnt_count: U16,
    pub magic: U16,
    pub state: U16,
    pub errors: U16,
    pub minor_rev_level: U16,
    pub lastcheck: U32,
    pub checkinterval: U32,
    pub creator_os: U32,
    pub rev_level: U32,
    pub def_resuid: U16,
    pub def_resgid: U16,
    pub first_ino: U32,
    pub inode_size: U16,
    pub block_group_nr: U16,
    pub feature_compat: U32,
    pub feature_incompat: U32,
    pub feature_ro_compat: U32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub last_mounted: [u8; 64],
    pub algorithm_usage_bitmap: U32,
    pub prealloc_blocks: u8,
    pub prealloc_dir_blocks: u8,
    pub reserved_gdt_blocks: U16,
    pub journal_uuid: [u8; 16],
    pub journal_inum: U32,
    pub journal_dev: U32,
    pub last_orphan: U32,
    pub hash_seed: [U32; 4],
    pub def_hash_version: u8,
    pub jnl_backup_type: u8,
    pub desc_size: U16,
    pub default_mount_opts: U32,
    pub first_meta_bg: U32,
    pub mkfs_time: U32,
    pub jnl_blocks: [U32; 17],
    pub blocks_count_hi: U32,
    pub r_blocks_count_hi: U32,
    pub free_blocks_count_hi: U32,
    pub min_extra_isize: U16,
    pub want_extra_isize: U16,
    pub flags: U32,
    pub raid_stride: U16,
    pub mmp_update_interval: U16,
    pub mmp_block: U64,
    pub raid_stripe_width: U32,
    pub log_groups_per_flex: u8,
    pub checksum_type: u8,
    pub encryption_level: u8,
    pub reserved_pad: u8,
    pub kbytes_written: U64,
    /// Snapshot fields, error records, mount options, quota inodes, overhead.
    pub snapshot_errors_quota: [u8; 0x24C - 0x180],
    /// `sparse_super2`: the groups holding backups (0 = none).
    pub backup_bgs: [U32; 2],
    /// Encryption, lost+found hint, checksum seed.
    pub encrypt_lpf_seed: [u8; 0x274 - 0x254],
    pub wtime_hi: u8,
    pub mtime_hi: u8,
    pub mkfs_time_hi: u8,
    pub lastcheck_hi: u8,
    /// Error time highs, encoding, orphan file, reserved, checksum.
    pub tail: [u8; 0x400 - 0x278],
}
const _: () = assert!(size_of::<SuperBlock>() == 1024);

/// A 32-byte block group descriptor (no `64bit` feature).
#[derive(Debug, Clone, Default, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct GroupDesc {
    pub block_bitmap: U32,
    pub inode_bitmap: U32,
    pub inode_table: U32,
    pub free_blocks_count: U16,
    pub free_inodes_count: U16,
    pub used_dirs_count: U16,
    pub flags: U16,
    pub exclude_bitmap: U32,
    pub block_bitmap_csum: U16,
    pub inode_bitmap_csum: U16,
    pub itable_unused: U16,
    pub checksum: U16,
}
const _: () = assert!(size_of::<GroupDesc>() as u64 == GROUP_DESC_SIZE);

/// A 256-byte inode with 32 bytes of extra fields and 96 bytes of in-inode xattrs.
#[derive(Debug, Clone, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Inode {
    pub mode: U16,
    pub uid_lo: U16,
    pub size_lo: U32,
    pub atime: U32,
    pub ctime: U32,
    pub mtime: U32,
    pub dtime: U32,
    pub gid_lo: U16,
    pub links_count: U16,
    pub blocks_lo: U32,
    pub flags: U32,
    pub osd1: U32,
    pub block: [u8; 60],
    pub generation: U32,
    pub file_acl_lo: U32,
    pub size_hi: U32,
    pub obso_faddr: U32,
    pub blocks_hi: U16,
    pub file_acl_hi: U16,
    pub uid_hi: U16,
    pub gid_hi: U16,
    pub checksum_lo: U16,
    pub osd2_reserved: U16,
    pub extra_isize: U16,
    pub checksum_hi: U16,
    pub ctime_extra: U32,
    pub mtime_extra: U32,
    pub atime_extra: U32,
    pub crtime: U32,
    pub crtime_extra: U32,
    pub version_hi: U32,
    pub projid: U32,
    pub xattrs: [u8; INODE_BYTES - INODE_XATTR_OFFSET],
}
const _: () = assert!(size_of::<Inode>() as u64 == INODE_SIZE);
const _: () = assert!(std::mem::offset_of!(Inode, block) == 0x28);
const _: () = assert!(std::mem::offset_of!(Inode, extra_isize) == 0x80);
const _: () = assert!(std::mem::offset_of!(Inode, xattrs) == INODE_XATTR_OFFSET);

/// Header of every extent-tree node.
#[derive(Debug, Clone, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ExtentHeader {
    pub magic: U16,
    pub entries: U16,
    pub max: U16,
    pub depth: U16,
    pub generation: U32,
}
const _: () = assert!(size_of::<ExtentHeader>() == 12);

/// A leaf entry: `len` blocks from logical `block` map to physical `start`.
#[derive(Debug, Clone, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Extent {
    pub block: U32,
    pub len: U16,
    pub start_hi: U16,
    pub start_lo: U32,
}
const _: () = assert!(size_of::<Extent>() == 12);

/// An index entry: the subtree at block `leaf` covers logical blocks from `block`.
#[derive(Debug, Clone, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ExtentIndex {
    pub block: U32,
    pub leaf_lo: U32,
    pub leaf_hi: U16,
    pub unused: U16,
}
const _: () = assert!(size_of::<ExtentIndex>() == 12);

/// The fixed part of a directory entry; the name follows, padded to 4 bytes.
#[derive(Debug, Clone, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DirEntryHeader {
    pub inode: U32,
    pub rec_len: U16,
    pub name_len: u8,
    pub file_type: u8,
}
const _: () = assert!(size_of::<DirEntryHeader>() == 8);

/// Header of an xattr block.
#[derive(Debug, Clone, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct XattrBlockHeader {
    pub magic: U32,
    pub refcount: U32,
    pub blocks: U32,
    pub hash: U32,
    pub checksum: U32,
    pub reserved: [U32; 3],
}
const _: () = assert!(size_of::<XattrBlockHeader>() == 32);

/// The fixed part of an xattr entry; the name (without its prefix) follows,
/// padded to 4 bytes.
#[derive(Debug, Clone, IntoBytes, FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct XattrEntry {
    pub name_len: u8,
    pub name_index: u8,
    pub value_offs: U16,
    pub value_inum: U32,
    pub value_size: U32,
    pub hash: U32,
}
const _: () = assert!(size_of::<XattrEntry>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_field_offsets_match_ext4() {
        assert_eq!(std::mem::offset_of!(SuperBlock, magic), 0x38);
        assert_eq!(std::mem::offset_of!(SuperBlock, uuid), 0x68);
        assert_eq!(std::mem::offset_of!(SuperBlock, hash_seed), 0xEC);
        assert_eq!(std::mem::offset_of!(SuperBlock, jnl_blocks), 0x10C);
        assert_eq!(std::mem::offset_of!(SuperBlock, min_extra_isize), 0x15C);
        assert_eq!(std::mem::offset_of!(SuperBlock, kbytes_written), 0x178);
        assert_eq!(std::mem::offset_of!(SuperBlock, backup_bgs), 0x24C);
        assert_eq!(std::mem::offset_of!(SuperBlock, wtime_hi), 0x274);
    }

    #[test]
    fn block_offsets() {
        assert_eq!(BlockNo(3).offset(), 12288);
        assert_eq!(BlockNo(3).to_string(), "block 3");
        assert_eq!(InodeNo(12).to_string(), "inode 12");
    }
}
