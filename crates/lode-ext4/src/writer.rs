//! The image writer: data regions while layers stream in, then the metadata
//! region, group descriptors and superblock in [`Ext4Writer::finish`].
//!
//! ```text
//! new()            begin_region() append_file()…  begin_region() …   finish(&tree)
//!   │                  │                              │                  │
//!   ▼                  ▼                              ▼                  ▼
//! [SB+GDT │ free ][ region 0: f0 f1 f2 … ][ region 1: … ][ metadata region ]
//!  block 0         chunk-aligned            chunk-aligned  chunk-aligned
//! ```
//!
//! A file's blocks are the next blocks of the open region, in append order,
//! so a region's bytes depend only on the files appended to it. All-zero
//! blocks are not written and are left out of the file's extents (holes);
//! they still occupy their place in the region so that offsets do not shift.
//!
//! `finish` numbers inodes depth-first over the tree (root 2, lost+found
//! 11, then 12… in name order), allocates directory, extent-index, symlink
//! and xattr blocks from the start of the metadata region in inode order,
//! then places the bitmaps and inode tables after them. The number of block
//! groups is the smallest that covers both the blocks and the inodes.
//! `finish` works on a [`FlatTree`] (a [`Tree`] is converted first): it
//! holds a few integers per inode, never a path or a whole inode table, so
//! millions of inodes fit in little memory (crates/lode-ext4/README.md).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read};

use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32};

use crate::dir::{self, DirEntry};
use crate::extent::{self, Run};
use crate::flat::{FlatInode, FlatTree, InodeId, InodeKind, Meta, NONE, NameId, ROOT_NAME};
use crate::layout::*;
use crate::tree::{BytePath, Entry, Metadata, Node, Timestamp, Tree, TreeError};
use crate::xattr::{self, XattrError};

/// Largest block count of an image without the `64bit` feature.
const MAX_BLOCKS: u64 = 1 << 32;
/// Group descriptor blocks reserved after the superblock at least; the first
/// region starts at the first chunk boundary after them.
const MIN_GDT_BLOCKS: u64 = 16;
/// Readers of shared xattr blocks the kernel allows (`EXT4_XATTR_REFCOUNT_MAX`).
const XATTR_REFCOUNT_MAX: u32 = 1024;
/// Bytes read from a file per write.
const IO_BUF: usize = 1 << 20;
const ZERO_BLOCK: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];

/// Errors from writing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "chunk size {chunk_size} must be a power of two from 4 KiB to 128 MiB (one block group)"
    )]
    BadChunkSize { chunk_size: u64 },
    #[error("writing the image at byte {offset}: {source}")]
    Write { offset: u64, source: io::Error },
    #[error("reading file #{file} at byte {offset}: {source}")]
    Read {
        file: u64,
        offset: u64,
        source: io::Error,
    },
    #[error("file #{file} ended after {got} bytes; {expected} were promised")]
    ShortRead { file: u64, expected: u64, got: u64 },
    #[error("append_file called before begin_region")]
    NoRegion,
    #[error("image needs {blocks} blocks; without 64bit ext4 holds at most 2^32")]
    TooLarge { blocks: u64 },
    #[error(
        "image needs {groups} block groups; the descriptor table before the first region holds {max}"
    )]
    TooManyGroups { groups: u64, max: u64 },
    #[error("image needs {inodes} inodes; ext4 holds at most 2^32 - 1")]
    TooManyInodes { inodes: u64 },
    #[error("{path}: hardlink target {target} does not exist")]
    HardlinkMissing { path: BytePath, target: BytePath },
    #[error("{path}: hardlink target {target} is a directory")]
    HardlinkToDir { path: BytePath, target: BytePath },
    #[error("{path}: hardlink chain through {target} does not end (a cycle?)")]
    HardlinkLoop { path: BytePath, target: BytePath },
    #[error("{path}: {links} links exceed ext4's limit of {LINK_MAX}")]
    TooManyLinks { path: BytePath, links: u32 },
    #[error("{path}: its file data is already used by {first}; use Entry::Hardlink to share it")]
    DataReused { path: BytePath, first: BytePath },
    #[error("{path}: its file data (at {start}) was not appended by this writer")]
    ForeignData { path: BytePath, start: BlockNo },
    #[error("{path}: {source}")]
    Xattr { path: BytePath, source: XattrError },
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// Where the image goes. Bytes never written must read back as zeros:
/// [`Ext4Writer::new`] truncates the sink to zero length first.
pub trait ImageSink {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

impl ImageSink for File {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// An in-memory image, for tests and small trees.
impl ImageSink for Vec<u8> {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + buf.len();
        if self.len() < end {
            self.resize(end, 0);
        }
        self[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.resize(usize::try_from(len).map_err(io::Error::other)?, 0);
        Ok(())
    }
}

impl<T: ImageSink + ?Sized> ImageSink for &mut T {
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
}

/// Options of an image. Checked by [`Ext4Writer::new`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Alignment of every region, in bytes (a power of two, 4 KiB..=128 MiB).
    pub chunk_size: u64,
    /// Source of the filesystem UUID and directory hash seed.
    pub seed: [u8; 16],
    /// Seconds since the epoch stored as the superblock's mkfs/write/check
    /// time, and as lost+found's times when the tree has none.
    pub time: u64,
    /// Leave all-zero blocks of files as holes.
    pub sparse: bool,
    /// Volume label (NUL-padded).
    pub label: [u8; 16],
}

impl Default for Options {
    fn default() -> Self {
        Self {
            chunk_size: 512 * 1024,
            seed: [0; 16],
            time: 0,
            sparse: true,
            label: [0; 16],
        }
    }
}

/// A file's contents inside the image, returned by
/// [`Ext4Writer::append_file`] and referenced from an [`Entry::File`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    id: u64,
    start: BlockNo,
    len: u64,
    /// Non-hole runs as (first logical block, block count).
    runs: Box<[(u32, u32)]>,
}

impl FileData {
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// First block of the file's place in its region.
    pub fn start(&self) -> BlockNo {
        self.start
    }
    /// Runs of data blocks between holes (each one extent).
    pub fn extents(&self) -> usize {
        self.runs.len()
    }
    /// Blocks holding data (the file's size in blocks less its holes).
    pub fn allocated_blocks(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.1)).sum()
    }
    fn blocks(&self) -> u64 {
        self.len.div_ceil(BLOCK_SIZE)
    }
}

/// A data region: blocks `start..end`, both chunk-aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: BlockNo,
    pub end: BlockNo,
}

impl Region {
    /// Byte range of the region in the image.
    pub fn byte_range(&self) -> std::ops::Range<u64> {
        self.start.offset()..self.end.offset()
    }
}

/// What [`Ext4Writer::finish`] built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Image size in bytes (the sink's final length).
    pub image_size: u64,
    pub blocks_count: u64,
    pub free_blocks: u64,
    pub groups: u64,
    pub inodes_count: u64,
    /// Highest inode number in use.
    pub used_inodes: u32,
    /// The data regions in order.
    pub regions: Vec<Region>,
    /// First block of the metadata region.
    pub metadata_start: BlockNo,
}

/// Writes one ext4 image. See the crate docs for the flow.
#[derive(Debug)]
pub struct Ext4Writer<S: ImageSink> {
    sink: S,
    opts: Options,
    chunk_blocks: u64,
    /// First block after the superblock/GDT area.
    data_start: u64,
    next_block: u64,
    region_starts: Vec<u64>,
    next_file: u64,
    buf: Vec<u8>,
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn lo32(v: u64) -> u32 {
    u32::try_from(v & 0xFFFF_FFFF).expect("masked to 32 bits")
}

fn lo16(v: u32) -> u16 {
    u16::try_from(v & 0xFFFF).expect("masked to 16 bits")
}

/// Splits a timestamp into ext4's 32-bit seconds and the extra field
/// (two epoch bits, then nanoseconds << 2).
fn encode_time(t: Timestamp) -> (u32, u32) {
    let lo = lo32(t.secs.cast_unsigned());
    let lo_signed = i64::from(lo.cast_signed());
    let epoch = lo32((((t.secs - lo_signed) >> 32) & 3).cast_unsigned());
    (lo, epoch | (t.nanos << 2))
}

/// splitmix64, to derive the hash seed from the caller's seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<S: ImageSink> Ext4Writer<S> {
    /// Starts an image in `sink` (truncated to zero length first).
    pub fn new(mut sink: S, opts: Options) -> Result<Self, Error> {
        let cs = opts.chunk_size;
        if !cs.is_power_of_two() || !(BLOCK_SIZE..=BLOCKS_PER_GROUP * BLOCK_SIZE).contains(&cs) {
            return Err(Error::BadChunkSize { chunk_size: cs });
        }
        sink.set_len(0)
            .map_err(|source| Error::Write { offset: 0, source })?;
        let chunk_blocks = cs / BLOCK_SIZE;
        let data_start = round_up(1 + MIN_GDT_BLOCKS, chunk_blocks);
        Ok(Self {
            sink,
            opts,
            chunk_blocks,
            data_start,
            next_block: data_start,
            region_starts: Vec::new(),
            next_file: 0,
            buf: vec![0; IO_BUF],
        })
    }

    /// Starts the next layer's data region at the next chunk boundary.
    pub fn begin_region(&mut self) -> Result<Region, Error> {
        self.next_block = round_up(self.next_block, self.chunk_blocks);
        self.region_starts.push(self.next_block);
        Ok(Region {
            start: BlockNo(self.next_block),
            end: BlockNo(self.next_block),
        })
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.sink
            .write_all_at(buf, offset)
            .map_err(|source| Error::Write { offset, source })
    }

    /// Streams `len` bytes from `reader` into the open region as one
    /// contiguous, block-aligned file. All-zero blocks become holes when
    /// [`Options::sparse`] is set.
    pub fn append_file(&mut self, reader: &mut impl Read, len: u64) -> Result<FileData, Error> {
        if self.region_starts.is_empty() {
            return Err(Error::NoRegion);
        }
        let id = self.next_file;
        self.next_file += 1;
        let start = self.next_block;
        let end = start + len.div_ceil(BLOCK_SIZE);
        if end > MAX_BLOCKS {
            return Err(Error::TooLarge { blocks: end });
        }
        let bs = usize::try_from(BLOCK_SIZE).expect("4096 fits usize");
        let mut buf = std::mem::take(&mut self.buf);
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let mut done = 0u64;
        let result = (|| {
            while done < len {
                let want = usize::try_from((len - done).min(IO_BUF as u64)).expect("<= IO_BUF");
                let mut filled = 0;
                while filled < want {
                    match reader.read(&mut buf[filled..want]) {
                        Ok(0) => {
                            return Err(Error::ShortRead {
                                file: id,
                                expected: len,
                                got: done + filled as u64,
                            });
                        }
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(source) => {
                            return Err(Error::Read {
                                file: id,
                                offset: done + filled as u64,
                                source,
                            });
                        }
                    }
                }
                let nb = want.div_ceil(bs);
                buf[want..nb * bs].fill(0);
                let first = done / BLOCK_SIZE;
                let hole = |i: usize, buf: &[u8]| {
                    self.opts.sparse && buf[i * bs..(i + 1) * bs] == ZERO_BLOCK[..]
                };
                let mut i = 0;
                while i < nb {
                    if hole(i, &buf) {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < nb && !hole(j, &buf) {
                        j += 1;
                    }
                    let offset = (start + first + i as u64) * BLOCK_SIZE;
                    self.sink
                        .write_all_at(&buf[i * bs..j * bs], offset)
                        .map_err(|source| Error::Write { offset, source })?;
                    let logical = u32::try_from(first + i as u64).expect("below 2^32 blocks");
                    let count = u32::try_from(j - i).expect("at most IO_BUF blocks");
                    match runs.last_mut() {
                        Some(last) if last.0 + last.1 == logical => last.1 += count,
                        _ => runs.push((logical, count)),
                    }
                    i = j;
                }
                done += want as u64;
            }
            Ok(())
        })();
        self.buf = buf;
        if let Err(e) = result {
            // Leave the region as if the file had never been started, so its
            // bytes still depend only on the files appended successfully.
            for (l, n) in runs {
                let offset = (start + u64::from(l)) * BLOCK_SIZE;
                for b in 0..u64::from(n) {
                    self.write(&ZERO_BLOCK, offset + b * BLOCK_SIZE)?;
                }
            }
            return Err(e);
        }
        self.next_block = end;
        Ok(FileData {
            id,
            start: BlockNo(start),
            len,
            runs: runs.into_boxed_slice(),
        })
    }

    /// Writes the metadata region, group descriptors and superblock for
    /// `tree`, sizes the sink, and returns the sink with a summary.
    pub fn finish(self, tree: &Tree) -> Result<(S, Summary), Error> {
        let flat = flat_of(tree)?;
        self.finish_flat(&flat)
    }

    /// [`Ext4Writer::finish`] for a [`FlatTree`], the compact form a caller
    /// with millions of names builds directly. The same tree gives the same
    /// bytes either way.
    ///
    /// The metadata region is laid out twice: a first pass only counts its
    /// blocks (which fixes where the inode tables go), the second writes the
    /// blocks and the inodes as it goes, so no inode is held.
    pub fn finish_flat(mut self, tree: &FlatTree) -> Result<(S, Summary), Error> {
        let meta_start = round_up(self.next_block, self.chunk_blocks);
        let mut regions = Vec::new();
        for (i, &s) in self.region_starts.iter().enumerate() {
            let end = self.region_starts.get(i + 1).copied().unwrap_or(meta_start);
            regions.push(Region {
                start: BlockNo(s),
                end: BlockNo(end),
            });
        }

        // lost+found (inode 11), made here when the tree has none.
        let lf_default = FlatInode {
            meta: Meta::from(&Metadata::new(0o700, 0, 0).with_times(Timestamp::new(
                i64::try_from(self.opts.time).map_or(0, |t| t.min(Timestamp::MAX_SECS)),
                0,
            ))),
            kind: InodeKind::Dir,
        };
        let plan = Plan::new(tree, &lf_default)?;
        let fixed_end = self.lay_out(&plan, meta_start, None)?;

        // Size the groups: enough for the blocks and for the inodes.
        let max_ino = plan.node_of_ino.len() as u64 - 1;
        let mut groups = 1u64;
        let (ipg, table_blocks, blocks_count) = loop {
            let ipg = round_up(max_ino.div_ceil(groups), INODES_PER_BLOCK).max(INODES_PER_BLOCK);
            if ipg > BLOCKS_PER_GROUP {
                groups = max_ino.div_ceil(BLOCKS_PER_GROUP);
                continue;
            }
            let table_blocks = ipg / INODES_PER_BLOCK;
            let end = fixed_end + 2 * groups + groups * table_blocks;
            let need = end.div_ceil(BLOCKS_PER_GROUP);
            if need > groups {
                groups = need;
                continue;
            }
            // More groups than blocks need (inode-bound): pad to whole groups.
            let blocks_count = if need == groups {
                end
            } else {
                groups * BLOCKS_PER_GROUP
            };
            break (ipg, table_blocks, blocks_count);
        };
        if blocks_count > MAX_BLOCKS - 1 {
            return Err(Error::TooLarge {
                blocks: blocks_count,
            });
        }
        let inodes_count = ipg * groups;
        if inodes_count > u64::from(u32::MAX) {
            return Err(Error::TooManyInodes {
                inodes: inodes_count,
            });
        }
        let gdt_blocks = (groups * GROUP_DESC_SIZE).div_ceil(BLOCK_SIZE);
        let max_groups = (self.data_start - 1) * (BLOCK_SIZE / GROUP_DESC_SIZE);
        if groups > max_groups {
            return Err(Error::TooManyGroups {
                groups,
                max: max_groups,
            });
        }
        let bb_start = fixed_end;
        let ib_start = bb_start + groups;
        let it_start = ib_start + groups;
        let meta_end = it_start + groups * table_blocks;

        let bpg = usize::try_from(BLOCKS_PER_GROUP).expect("fits usize");
        let groups_us = usize::try_from(groups).expect("fits usize");
        let mut tables = Tables {
            bbm: vec![0u8; groups_us * bpg / 8],
            ipg,
            it_start,
            table_blocks,
            group: 0,
            first: 0,
            window: vec![0u8; usize::try_from(TABLE_WINDOW).expect("small") * INODE_BYTES],
            dirty: false,
            used_dirs: vec![0; groups_us],
        };
        let end = self.lay_out(&plan, meta_start, Some(&mut tables))?;
        debug_assert_eq!(end, fixed_end, "both passes place the same blocks");
        tables.flush(&mut self)?;
        let Tables {
            mut bbm, used_dirs, ..
        } = tables;

        // Block bitmaps: file runs were marked as they were laid out.
        for (s, n) in [(0, 1 + gdt_blocks), (meta_start, meta_end - meta_start)] {
            for b in s..s + n {
                set_bit(&mut bbm, b);
            }
        }
        for b in blocks_count..groups * BLOCKS_PER_GROUP {
            set_bit(&mut bbm, b);
        }
        // Inode bitmaps: 1..=max_ino in use, padding past ipg set.
        let mut ibm = vec![0u8; groups_us * bpg / 8];
        for i in 0..max_ino {
            let (g, idx) = (i / ipg, i % ipg);
            set_bit(&mut ibm, g * BLOCKS_PER_GROUP + idx);
        }
        for g in 0..groups {
            for idx in ipg..BLOCKS_PER_GROUP {
                set_bit(&mut ibm, g * BLOCKS_PER_GROUP + idx);
            }
        }
        self.write(&bbm, bb_start * BLOCK_SIZE)?;
        self.write(&ibm, ib_start * BLOCK_SIZE)?;

        // Group descriptors.
        let mut gdt = Vec::with_capacity(usize::try_from(gdt_blocks * BLOCK_SIZE).expect("small"));
        let mut free_blocks_total = 0u64;
        let mut free_inodes_total = 0u64;
        for g in 0..groups {
            let used_inodes = max_ino.saturating_sub(g * ipg).min(ipg);
            let gbits = &bbm[usize::try_from(g).expect("fits") * bpg / 8..][..bpg / 8];
            let used_blocks: u64 = gbits.iter().map(|b| u64::from(b.count_ones())).sum();
            let free_blocks = BLOCKS_PER_GROUP - used_blocks;
            let free_inodes = ipg - used_inodes;
            free_blocks_total += free_blocks;
            free_inodes_total += free_inodes;
            let used_dirs = used_dirs[usize::try_from(g).expect("fits")];
            let desc = GroupDesc {
                block_bitmap: U32::new(lo32(bb_start + g)),
                inode_bitmap: U32::new(lo32(ib_start + g)),
                inode_table: U32::new(lo32(it_start + g * table_blocks)),
                free_blocks_count: U16::new(u16::try_from(free_blocks).expect("<= 32768")),
                free_inodes_count: U16::new(u16::try_from(free_inodes).expect("<= 32768")),
                used_dirs_count: U16::new(u16::try_from(used_dirs).expect("<= 32768")),
                ..GroupDesc::default()
            };
            gdt.extend_from_slice(desc.as_bytes());
        }
        self.write(&gdt, BLOCK_SIZE)?;

        let sb = superblock(
            &self.opts,
            &SbCounts {
                blocks_count,
                free_blocks: free_blocks_total,
                inodes_count,
                free_inodes: free_inodes_total,
                ipg,
            },
        );
        self.write(sb.as_bytes(), 1024)?;
        let image_size = blocks_count * BLOCK_SIZE;
        self.sink
            .set_len(image_size)
            .map_err(|source| Error::Write {
                offset: image_size,
                source,
            })?;
        let summary = Summary {
            image_size,
            blocks_count,
            free_blocks: free_blocks_total,
            groups,
            inodes_count,
            used_inodes: u32::try_from(max_ino).expect("checked"),
            regions,
            metadata_start: BlockNo(meta_start),
        };
        Ok((self.sink, summary))
    }

    /// Places every inode's metadata blocks (directory, extent index,
    /// symlink, xattr) from `meta_start` on, in inode order; returns the
    /// block after the last. With `tables` it also writes those blocks and
    /// the inodes; without, it only counts (and checks what can fail).
    fn lay_out<'t>(
        &mut self,
        plan: &Plan<'t>,
        meta_start: u64,
        mut tables: Option<&mut Tables>,
    ) -> Result<u64, Error> {
        let mut cursor = meta_start;
        let mut xshare = XattrShare::default();
        let mut data_seen = DataSeen::new(self.next_file);
        for (ino, &node) in plan.node_of_ino.iter().enumerate() {
            if node == NONE {
                continue;
            }
            let ino32 = u32::try_from(ino).expect("inode numbers are u32");
            let path = || plan.path(node);
            let (rec, parent, nlink) = plan.describe(node);
            let mut inode = new_inode(&rec.meta, nlink);
            let mut blocks = 0u64;
            let (kind, size, runs): (u16, u64, Vec<Run>) = match &rec.kind {
                InodeKind::Dir => {
                    let bytes = dir::build(ino32, parent, &plan.dir_entries(node));
                    let n = bytes.len() as u64 / BLOCK_SIZE;
                    if tables.is_some() {
                        self.write(&bytes, cursor * BLOCK_SIZE)?;
                    }
                    let run = Run {
                        logical: 0,
                        start: BlockNo(cursor),
                        len: u32::try_from(n).expect("directory below 2^32 blocks"),
                    };
                    cursor += n;
                    (S_IFDIR, bytes.len() as u64, vec![run])
                }
                InodeKind::File(data) => {
                    if data.start.0 + data.blocks() > self.next_block {
                        return Err(Error::ForeignData {
                            path: path(),
                            start: data.start,
                        });
                    }
                    if tables.is_none() && data.len > 0 && !data_seen.insert(data.id) {
                        return Err(Error::DataReused {
                            path: path(),
                            first: plan.first_user(data.id),
                        });
                    }
                    let runs: Vec<Run> = data
                        .runs
                        .iter()
                        .map(|&(l, n)| Run {
                            logical: l,
                            start: BlockNo(data.start.0 + u64::from(l)),
                            len: n,
                        })
                        .collect();
                    if let Some(t) = tables.as_deref_mut() {
                        for r in &runs {
                            for b in r.start.0..r.start.0 + u64::from(r.len) {
                                set_bit(&mut t.bbm, b);
                            }
                        }
                    }
                    (S_IFREG, data.len, runs)
                }
                InodeKind::Symlink(target) if target.len() < 60 => {
                    inode.block[..target.len()].copy_from_slice(target);
                    (S_IFLNK, target.len() as u64, Vec::new())
                }
                InodeKind::Symlink(target) => {
                    if tables.is_some() {
                        let mut b = target.to_vec();
                        b.resize(BLOCK_BYTES, 0);
                        self.write(&b, cursor * BLOCK_SIZE)?;
                    }
                    let run = Run {
                        logical: 0,
                        start: BlockNo(cursor),
                        len: 1,
                    };
                    cursor += 1;
                    (S_IFLNK, target.len() as u64, vec![run])
                }
                InodeKind::CharDev(major, minor) | InodeKind::BlockDev(major, minor) => {
                    let (major, minor) = (*major, *minor);
                    if major < 256 && minor < 256 {
                        let old = (major << 8) | minor;
                        inode.block[..4].copy_from_slice(&old.to_le_bytes());
                    } else {
                        let new = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                        inode.block[4..8].copy_from_slice(&new.to_le_bytes());
                    }
                    let t = if matches!(rec.kind, InodeKind::CharDev(..)) {
                        S_IFCHR
                    } else {
                        S_IFBLK
                    };
                    (t, 0, Vec::new())
                }
                InodeKind::Fifo => (S_IFIFO, 0, Vec::new()),
                InodeKind::Socket => (S_IFSOCK, 0, Vec::new()),
            };
            let uses_extents = kind == S_IFDIR || kind == S_IFREG || !runs.is_empty();
            if uses_extents {
                let mut alloc = || {
                    cursor += 1;
                    BlockNo(cursor - 1)
                };
                let tree = extent::build(&runs, &mut alloc);
                if tables.is_some() {
                    for (at, bytes) in &tree.blocks {
                        self.write(bytes, at.offset())?;
                    }
                }
                inode.block = tree.root;
                inode.flags = U32::new(EXTENTS_FL);
                blocks += tree.blocks.len() as u64;
                blocks += runs.iter().map(|r| u64::from(r.len)).sum::<u64>();
            }
            inode.mode =
                U16::new(kind | u16::try_from(rec.meta.mode()).expect("checked <= 0o7777"));
            inode.size_lo = U32::new(lo32(size));
            inode.size_hi = U32::new(lo32(size >> 32));

            if rec.meta.has_xattrs() {
                let enc = xattr::encode(&rec.meta.xattrs()).map_err(|source| Error::Xattr {
                    path: path(),
                    source,
                })?;
                inode.xattrs = enc.in_inode;
                if let Some(block) = enc.block {
                    let (at, new) = xshare.place(&block, &rec.meta, &mut cursor);
                    if new && tables.is_some() {
                        self.write(&block, at * BLOCK_SIZE)?;
                    }
                    inode.file_acl_lo = U32::new(lo32(at));
                    blocks += 1;
                }
            }
            let sectors = blocks * (BLOCK_SIZE / 512);
            if sectors >= 1 << 32 {
                // Needs huge_file; far beyond the images lode builds.
                return Err(Error::TooLarge { blocks });
            }
            inode.blocks_lo = U32::new(lo32(sectors));
            if let Some(t) = tables.as_deref_mut() {
                t.put(self, ino as u64, &inode, kind == S_IFDIR)?;
            }
        }
        if tables.is_some() {
            for b in &xshare.blocks {
                self.write(
                    &b.refs.to_le_bytes(),
                    b.at * BLOCK_SIZE + xattr::REFCOUNT_AT,
                )?;
            }
        }
        Ok(cursor)
    }
}

fn set_bit(bm: &mut [u8], bit: u64) {
    let bit = usize::try_from(bit).expect("bitmap index fits usize");
    bm[bit / 8] |= 1 << (bit % 8);
}

/// Inodes of a table written at once in the second layout pass.
const TABLE_WINDOW: u64 = 1024;

/// The second layout pass's output: the block bitmap, and a window of an
/// inode table filled in inode order, written when the next inode falls
/// outside it. Table bytes no inode reaches are never written: the sink
/// reads them back as zeros.
struct Tables {
    bbm: Vec<u8>,
    ipg: u64,
    it_start: u64,
    table_blocks: u64,
    /// The window: group, first index in its table, and the bytes.
    group: u64,
    first: u64,
    window: Vec<u8>,
    dirty: bool,
    /// Directories per group, for the group descriptors.
    used_dirs: Vec<u64>,
}

impl Tables {
    fn flush<S: ImageSink>(&mut self, w: &mut Ext4Writer<S>) -> Result<(), Error> {
        if !self.dirty {
            return Ok(());
        }
        let count = TABLE_WINDOW.min(self.ipg - self.first);
        let bytes = usize::try_from(count).expect("small") * INODE_BYTES;
        let at = (self.it_start + self.group * self.table_blocks) * BLOCK_SIZE
            + self.first * INODE_BYTES as u64;
        w.write(&self.window[..bytes], at)?;
        self.window.fill(0);
        self.dirty = false;
        Ok(())
    }

    fn put<S: ImageSink>(
        &mut self,
        w: &mut Ext4Writer<S>,
        ino: u64,
        inode: &Inode,
        is_dir: bool,
    ) -> Result<(), Error> {
        let (g, idx) = ((ino - 1) / self.ipg, (ino - 1) % self.ipg);
        let first = idx - idx % TABLE_WINDOW;
        if (g, first) != (self.group, self.first) {
            self.flush(w)?;
            (self.group, self.first) = (g, first);
        }
        let at = usize::try_from(idx - first).expect("small") * INODE_BYTES;
        self.window[at..at + INODE_BYTES].copy_from_slice(inode.as_bytes());
        self.dirty = true;
        if is_dir {
            self.used_dirs[usize::try_from(g).expect("fits")] += 1;
        }
        Ok(())
    }
}

/// Shared xattr blocks: identical blocks are written once and referenced
/// by up to [`XATTR_REFCOUNT_MAX`] inodes. Blocks are found by a hash of
/// their bytes and confirmed by encoding the first user's xattrs again, so
/// only their place is held, not their 4 KiB.
#[derive(Default)]
struct XattrShare<'t> {
    by_hash: HashMap<u64, Vec<usize>>,
    blocks: Vec<XattrBlock<'t>>,
    state: RandomState,
}

struct XattrBlock<'t> {
    at: u64,
    refs: u32,
    /// Still taking references.
    open: bool,
    /// The xattrs of its first user, which encode to this block.
    source: &'t Meta,
}

impl<'t> XattrShare<'t> {
    /// The block to hold `block` for an inode with xattrs `meta`: a shared
    /// one, or a new one at `cursor` (then `true`).
    fn place(&mut self, block: &[u8], meta: &'t Meta, cursor: &mut u64) -> (u64, bool) {
        let hash = self.state.hash_one(block);
        let candidates = self.by_hash.entry(hash).or_default();
        let found = candidates.iter().copied().find(|&i| {
            let b = &self.blocks[i];
            b.open
                && xattr::encode(&b.source.xattrs())
                    .ok()
                    .and_then(|e| e.block)
                    .is_some_and(|other| other == block)
        });
        let (idx, new) = match found {
            Some(i) => (i, false),
            None => {
                self.blocks.push(XattrBlock {
                    at: *cursor,
                    refs: 0,
                    open: true,
                    source: meta,
                });
                *cursor += 1;
                candidates.push(self.blocks.len() - 1);
                (self.blocks.len() - 1, true)
            }
        };
        let b = &mut self.blocks[idx];
        b.refs += 1;
        if b.refs == XATTR_REFCOUNT_MAX {
            b.open = false;
        }
        (b.at, new)
    }
}

/// File contents already referenced, by [`FileData`] id.
struct DataSeen {
    bits: Vec<u64>,
    /// Ids past the writer's own (foreign data).
    others: HashSet<u64>,
}

impl DataSeen {
    fn new(files: u64) -> Self {
        Self {
            bits: vec![0; usize::try_from(files.div_ceil(64)).expect("fits usize")],
            others: HashSet::new(),
        }
    }

    /// Records `id`; false if it was there already.
    fn insert(&mut self, id: u64) -> bool {
        match self
            .bits
            .get_mut(usize::try_from(id / 64).unwrap_or(usize::MAX))
        {
            Some(word) => {
                let bit = 1 << (id % 64);
                let fresh = *word & bit == 0;
                *word |= bit;
                fresh
            }
            None => self.others.insert(id),
        }
    }
}

fn new_inode(meta: &Meta, nlink: u32) -> Inode {
    let (atime, atime_extra) = encode_time(meta.atime());
    let (mtime, mtime_extra) = encode_time(meta.mtime());
    let (ctime, ctime_extra) = encode_time(meta.ctime());
    let z16 = U16::new(0);
    let z32 = U32::new(0);
    Inode {
        mode: z16,
        uid_lo: U16::new(lo16(meta.uid())),
        size_lo: z32,
        atime: U32::new(atime),
        ctime: U32::new(ctime),
        mtime: U32::new(mtime),
        dtime: z32,
        gid_lo: U16::new(lo16(meta.gid())),
        links_count: U16::new(u16::try_from(nlink).expect("checked against LINK_MAX")),
        blocks_lo: z32,
        flags: z32,
        osd1: z32,
        block: [0; 60],
        generation: z32,
        file_acl_lo: z32,
        size_hi: z32,
        obso_faddr: z32,
        blocks_hi: z16,
        file_acl_hi: z16,
        uid_hi: U16::new(lo16(meta.uid() >> 16)),
        gid_hi: U16::new(lo16(meta.gid() >> 16)),
        checksum_lo: z16,
        osd2_reserved: z16,
        extra_isize: U16::new(EXTRA_ISIZE),
        checksum_hi: z16,
        ctime_extra: U32::new(ctime_extra),
        mtime_extra: U32::new(mtime_extra),
        atime_extra: U32::new(atime_extra),
        crtime: z32,
        crtime_extra: z32,
        version_hi: z32,
        projid: z32,
        xattrs: [0; INODE_BYTES - INODE_XATTR_OFFSET],
    }
}

struct SbCounts {
    blocks_count: u64,
    free_blocks: u64,
    inodes_count: u64,
    free_inodes: u64,
    ipg: u64,
}

fn superblock(opts: &Options, c: &SbCounts) -> SuperBlock {
    let mut uuid = opts.seed;
    // A version-4-shaped UUID, so tools print it as an ordinary random one.
    uuid[6] = (uuid[6] & 0x0F) | 0x40;
    uuid[8] = (uuid[8] & 0x3F) | 0x80;
    let a = u64::from_le_bytes(opts.seed[..8].try_into().expect("8 bytes"));
    let b = u64::from_le_bytes(opts.seed[8..].try_into().expect("8 bytes"));
    let (h0, h1) = (mix(a ^ mix(b)), mix(b ^ 0x6c6f_6465));
    let hash_seed = [
        U32::new(lo32(h0)),
        U32::new(lo32(h0 >> 32)),
        U32::new(lo32(h1)),
        U32::new(lo32(h1 >> 32)),
    ];
    let t = U32::new(lo32(opts.time));
    let t_hi = u8::try_from((opts.time >> 32) & 0xFF).expect("masked");
    let z16 = U16::new(0);
    let z32 = U32::new(0);
    SuperBlock {
        inodes_count: U32::new(lo32(c.inodes_count)),
        blocks_count_lo: U32::new(lo32(c.blocks_count)),
        r_blocks_count_lo: z32,
        free_blocks_count_lo: U32::new(lo32(c.free_blocks)),
        free_inodes_count: U32::new(lo32(c.free_inodes)),
        first_data_block: z32,
        log_block_size: U32::new(2),
        log_cluster_size: U32::new(2),
        blocks_per_group: U32::new(lo32(BLOCKS_PER_GROUP)),
        clusters_per_group: U32::new(lo32(BLOCKS_PER_GROUP)),
        inodes_per_group: U32::new(lo32(c.ipg)),
        mtime: z32,
        wtime: t,
        mnt_count: z16,
        max_mnt_count: U16::new(0xFFFF),
        magic: U16::new(SUPER_MAGIC),
        state: U16::new(1),
        errors: U16::new(1),
        minor_rev_level: z16,
        lastcheck: t,
        checkinterval: z32,
        creator_os: z32,
        rev_level: U32::new(1),
        def_resuid: z16,
        def_resgid: z16,
        first_ino: U32::new(FIRST_INO),
        inode_size: U16::new(u16::try_from(INODE_SIZE).expect("256")),
        block_group_nr: z16,
        feature_compat: U32::new(COMPAT_EXT_ATTR | COMPAT_SPARSE_SUPER2),
        feature_incompat: U32::new(INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG),
        feature_ro_compat: U32::new(
            RO_COMPAT_SPARSE_SUPER
                | RO_COMPAT_LARGE_FILE
                | RO_COMPAT_DIR_NLINK
                | RO_COMPAT_EXTRA_ISIZE,
        ),
        uuid,
        volume_name: opts.label,
        last_mounted: [0; 64],
        algorithm_usage_bitmap: z32,
        prealloc_blocks: 0,
        prealloc_dir_blocks: 0,
        reserved_gdt_blocks: z16,
        journal_uuid: [0; 16],
        journal_inum: z32,
        journal_dev: z32,
        last_orphan: z32,
        hash_seed,
        // half_md4, as mke2fs; only used if dir_index is ever turned on.
        def_hash_version: 1,
        jnl_backup_type: 0,
        desc_size: z16,
        default_mount_opts: z32,
        first_meta_bg: z32,
        mkfs_time: t,
        jnl_blocks: [z32; 17],
        blocks_count_hi: z32,
        r_blocks_count_hi: z32,
        free_blocks_count_hi: z32,
        min_extra_isize: U16::new(EXTRA_ISIZE),
        want_extra_isize: U16::new(EXTRA_ISIZE),
        // EXT2_FLAGS_UNSIGNED_HASH: fixed, not taken from the build host.
        flags: U32::new(2),
        raid_stride: z16,
        mmp_update_interval: z16,
        mmp_block: zerocopy::little_endian::U64::new(0),
        raid_stripe_width: z32,
        log_groups_per_flex: 4,
        checksum_type: 0,
        encryption_level: 0,
        reserved_pad: 0,
        kbytes_written: zerocopy::little_endian::U64::new(0),
        snapshot_errors_quota: [0; 0x24C - 0x180],
        backup_bgs: [z32; 2],
        encrypt_lpf_seed: [0; 0x274 - 0x254],
        wtime_hi: t_hi,
        mtime_hi: 0,
        mkfs_time_hi: t_hi,
        lastcheck_hi: t_hi,
        tail: [0; 0x400 - 0x278],
    }
}

/// Marks the lost+found the writer makes in [`Plan::node_of_ino`].
const LF: u32 = NONE - 1;

/// The tree resolved into inode numbers and link counts. Inodes are
/// numbered as a stack walk meets them: a directory's children all at once,
/// in name order, then each child directory's, depth first.
struct Plan<'t> {
    tree: &'t FlatTree,
    /// lost+found when the tree has none.
    lf: &'t FlatInode,
    lf_made: bool,
    /// By inode number: the name owning it ([`NONE`] for unused numbers,
    /// [`LF`] for the lost+found made here).
    node_of_ino: Vec<u32>,
    /// By tree inode: its number (0 while unnamed).
    ino_of_inode: Vec<u32>,
    /// By tree inode: how many names it has.
    links: Vec<u32>,
}

impl<'t> Plan<'t> {
    fn new(tree: &'t FlatTree, lf: &'t FlatInode) -> Result<Self, Error> {
        let count = tree.inode_count();
        let lf_node = tree.child(ROOT_NAME, b"lost+found");
        if let Some(n) = lf_node
            && tree.node(n).link
        {
            return Err(TreeError::LostFound {
                path: tree.path_at(n),
            }
            .into());
        }
        let mut plan = Self {
            tree,
            lf,
            lf_made: lf_node.is_none(),
            node_of_ino: vec![NONE; usize::try_from(FIRST_INO).expect("small") + 1],
            ino_of_inode: vec![0; count],
            links: vec![0; count],
        };
        plan.node_of_ino[ROOT_INO as usize] = ROOT_NAME;
        plan.ino_of_inode[tree.node(ROOT_NAME).inode as usize] = ROOT_INO;
        let mut stack = vec![ROOT_NAME];
        while let Some(d) = stack.pop() {
            if d == LF {
                continue;
            }
            let mut subdirs = Vec::new();
            for c in tree.children(d) {
                let n = tree.node(c);
                if n.link {
                    continue;
                }
                let is_dir = tree.inode(n.inode).kind == InodeKind::Dir;
                let ino = if is_dir && Some(c) == lf_node {
                    plan.node_of_ino[LOST_FOUND_INO as usize] = c;
                    LOST_FOUND_INO
                } else {
                    let next = plan.node_of_ino.len() as u64;
                    let ino =
                        u32::try_from(next).map_err(|_| Error::TooManyInodes { inodes: next })?;
                    plan.node_of_ino.push(c);
                    ino
                };
                tree.check_owner(c)?;
                let slot = &mut plan.ino_of_inode[n.inode as usize];
                if *slot != 0 {
                    return Err(TreeError::NamedTwice {
                        path: tree.path_at(c),
                    }
                    .into());
                }
                *slot = ino;
                if is_dir {
                    subdirs.push(c);
                }
            }
            if d == ROOT_NAME && plan.lf_made {
                plan.node_of_ino[LOST_FOUND_INO as usize] = LF;
                subdirs.push(LF);
            }
            // Reverse so the stack pops them in name order.
            stack.extend(subdirs.into_iter().rev());
        }

        for c in 1..u32::try_from(tree.len()).expect("node count is u32") {
            let n = tree.node(c);
            let is_dir = tree.inode(n.inode).kind == InodeKind::Dir;
            if n.link && is_dir {
                let owner = plan.ino_of_inode[n.inode as usize] as usize;
                return Err(Error::HardlinkToDir {
                    path: tree.path_at(c),
                    target: match plan.node_of_ino.get(owner) {
                        Some(&o) if owner != 0 => plan.path(o),
                        _ => tree.path_at(c),
                    },
                });
            }
            if n.link && plan.ino_of_inode[n.inode as usize] == 0 {
                return Err(Error::HardlinkMissing {
                    path: tree.path_at(c),
                    target: tree.path_at(c),
                });
            }
            if !is_dir {
                let l = &mut plan.links[n.inode as usize];
                *l = l.saturating_add(1);
            }
        }
        for &node in &plan.node_of_ino {
            if node == NONE || node == LF {
                continue;
            }
            let inode = tree.node(node).inode;
            let links = plan.links[inode as usize];
            if tree.inode(inode).kind != InodeKind::Dir && links > LINK_MAX {
                return Err(Error::TooManyLinks {
                    path: tree.path_at(node),
                    links,
                });
            }
        }
        Ok(plan)
    }

    fn path(&self, node: u32) -> BytePath {
        if node == LF {
            BytePath(b"lost+found".to_vec())
        } else {
            self.tree.path_at(node)
        }
    }

    /// The inode a name owns, its parent directory's number and its link
    /// count.
    fn describe(&self, node: u32) -> (&'t FlatInode, u32, u32) {
        if node == LF {
            return (self.lf, ROOT_INO, 2);
        }
        let tree = self.tree;
        let n = tree.node(node);
        let rec = tree.inode(n.inode);
        let parent = if node == ROOT_NAME {
            ROOT_INO
        } else {
            self.ino_of_inode[tree.node(n.parent).inode as usize]
        };
        let nlink = if rec.kind == InodeKind::Dir {
            let mut subdirs = tree
                .children(node)
                .filter(|&c| tree.is_dir_at(c))
                .fold(0u32, |n, _| n.saturating_add(1));
            if node == ROOT_NAME && self.lf_made {
                subdirs += 1;
            }
            let nlink = 2 + subdirs;
            // dir_nlink: a count past the limit is stored as 1.
            if nlink >= LINK_MAX { 1 } else { nlink }
        } else {
            self.links[n.inode as usize]
        };
        (rec, parent, nlink)
    }

    /// The entries of directory `node`, in name order.
    fn dir_entries(&self, node: u32) -> Vec<DirEntry<'t>> {
        if node == LF {
            return Vec::new();
        }
        let tree = self.tree;
        let mut entries: Vec<DirEntry<'t>> = tree
            .children(node)
            .map(|c| {
                let n = tree.node(c);
                DirEntry {
                    name: tree.name(c),
                    inode: self.ino_of_inode[n.inode as usize],
                    // A further name is stored as a regular file's entry,
                    // whatever the inode is: images have always been so.
                    file_type: if n.link {
                        FT_REG
                    } else {
                        file_type(&tree.inode(n.inode).kind)
                    },
                }
            })
            .collect();
        if node == ROOT_NAME && self.lf_made {
            entries.push(DirEntry {
                name: b"lost+found",
                inode: LOST_FOUND_INO,
                file_type: FT_DIR,
            });
            entries.sort_by(|a, b| a.name.cmp(b.name));
        }
        entries
    }

    /// The name owning the file contents `id` first, in inode order.
    fn first_user(&self, id: u64) -> BytePath {
        for &node in &self.node_of_ino {
            if node == NONE || node == LF {
                continue;
            }
            if let InodeKind::File(d) = &self.tree.inode(self.tree.node(node).inode).kind
                && d.id == id
            {
                return self.tree.path_at(node);
            }
        }
        unreachable!("a reused id has a first user")
    }
}

fn file_type(kind: &InodeKind) -> u8 {
    match kind {
        InodeKind::Dir => FT_DIR,
        InodeKind::File(_) => FT_REG,
        InodeKind::Symlink(_) => FT_SYMLINK,
        InodeKind::CharDev(..) => FT_CHR,
        InodeKind::BlockDev(..) => FT_BLK,
        InodeKind::Fifo => FT_FIFO,
        InodeKind::Socket => FT_SOCK,
    }
}

fn inode_of_entry(e: &Entry) -> FlatInode {
    let (meta, kind) = match e {
        Entry::Dir(meta) => (meta, InodeKind::Dir),
        Entry::File { meta, data } => (meta, InodeKind::File(data.clone())),
        Entry::Symlink { meta, target } => (meta, InodeKind::Symlink(target.clone().into())),
        Entry::CharDev { meta, major, minor } => (meta, InodeKind::CharDev(*major, *minor)),
        Entry::BlockDev { meta, major, minor } => (meta, InodeKind::BlockDev(*major, *minor)),
        Entry::Fifo(meta) => (meta, InodeKind::Fifo),
        Entry::Socket(meta) => (meta, InodeKind::Socket),
        Entry::Hardlink { .. } => unreachable!("a hardlink has no inode of its own"),
    };
    FlatInode {
        meta: Meta::from(meta),
        kind,
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

/// A [`Tree`] in the compact form: inodes and names breadth first, hardlinks
/// resolved by path.
fn flat_of(tree: &Tree) -> Result<FlatTree, Error> {
    let mut inodes = vec![FlatInode {
        meta: Meta::from(&tree.root.meta),
        kind: InodeKind::Dir,
    }];
    let mut queue = std::collections::VecDeque::from([&tree.root]);
    while let Some(dir) = queue.pop_front() {
        for node in dir.children.values() {
            match node {
                Node::Dir(d) => {
                    inodes.push(FlatInode {
                        meta: Meta::from(&d.meta),
                        kind: InodeKind::Dir,
                    });
                    queue.push_back(d);
                }
                Node::Leaf(Entry::Hardlink { .. }) => {}
                Node::Leaf(e) => inodes.push(inode_of_entry(e)),
            }
        }
    }
    let mut flat = FlatTree::new(inodes, InodeId(0))?;
    let mut next = 1u32;
    let mut links = Vec::new();
    let mut queue = std::collections::VecDeque::from([(&tree.root, FlatTree::ROOT, Vec::new())]);
    while let Some((dir, at, path)) = queue.pop_front() {
        let mut inodes = Vec::with_capacity(dir.children.len());
        for node in dir.children.values() {
            if let Node::Leaf(Entry::Hardlink { .. }) = node {
                // Resolved below, once every name is in place.
                inodes.push(InodeId(0));
            } else {
                inodes.push(InodeId(next));
                next += 1;
            }
        }
        let first = flat.add_children(at, dir.children.keys().map(Vec::as_slice).zip(inodes))?;
        for ((name, node), i) in dir.children.iter().zip((first.0..).map(NameId)) {
            match node {
                Node::Dir(d) => queue.push_back((d, i, join(&path, name))),
                Node::Leaf(Entry::Hardlink { target }) => {
                    links.push((i, join(&path, name), target));
                }
                Node::Leaf(_) => {}
            }
        }
    }
    for (node, path, target) in links {
        let canon = resolve_hardlink(tree, &path, target)?;
        let mut at = ROOT_NAME;
        if !canon.is_empty() {
            for part in canon.split(|b| *b == b'/') {
                at = flat.child(at, part).expect("resolved on the same tree");
            }
        }
        flat.set_link(node, flat.inode_of(NameId(at)));
    }
    Ok(flat)
}

/// Follows a hardlink (through further hardlinks) to the path of the entry
/// that owns the inode.
fn resolve_hardlink(tree: &Tree, path: &[u8], target: &[u8]) -> Result<Vec<u8>, Error> {
    let mut target = target.to_vec();
    for _ in 0..64 {
        let Some((canon, node)) = tree.lookup_path(&target) else {
            return Err(Error::HardlinkMissing {
                path: BytePath(path.to_vec()),
                target: BytePath(target.strip_prefix(b"/").unwrap_or(&target).to_vec()),
            });
        };
        match node {
            Node::Dir(_) => {
                return Err(Error::HardlinkToDir {
                    path: BytePath(path.to_vec()),
                    target: BytePath(canon),
                });
            }
            Node::Leaf(Entry::Hardlink { target: next }) => target = next.clone(),
            Node::Leaf(_) => return Ok(canon),
        }
    }
    Err(Error::HardlinkLoop {
        path: BytePath(path.to_vec()),
        target: BytePath(target),
    })
}

#[cfg(test)]
mod tests {
    use zerocopy::FromBytes;

    use super::*;
    use crate::tree::TreeError;

    fn m(mode: u32) -> Metadata {
        Metadata::new(mode, 1000, 100).with_times(Timestamp::new(1_234_567_890, 42))
    }

    fn view(img: Vec<u8>) -> ext4_view::Ext4 {
        ext4_view::Ext4::load(Box::new(img)).expect("ext4-view loads the image")
    }

    /// A minimal reader over our own structs: the inode number of `name`
    /// in directory `dir` (directories here have one extent, depth 0).
    fn ino_of(img: &[u8], dir: u32, name: &[u8]) -> Option<u32> {
        let bs = BLOCK_BYTES;
        let sb = SuperBlock::read_from_bytes(&img[1024..2048]).unwrap();
        let ipg = sb.inodes_per_group.get();
        let g = usize::try_from((dir - 1) / ipg).unwrap();
        let gd = GroupDesc::read_from_bytes(&img[bs + 32 * g..bs + 32 * g + 32]).unwrap();
        let at = usize::try_from(gd.inode_table.get()).unwrap() * bs
            + usize::try_from((dir - 1) % ipg).unwrap() * INODE_BYTES;
        let inode = Inode::read_from_bytes(&img[at..at + INODE_BYTES]).unwrap();
        let ext = Extent::read_from_bytes(&inode.block[12..24]).unwrap();
        let start = usize::try_from(ext.start_lo.get()).unwrap() * bs;
        let data = &img[start..start + usize::from(ext.len.get()) * bs];
        let mut off = 0;
        while off < data.len() {
            let h = DirEntryHeader::read_from_bytes(&data[off..off + 8]).unwrap();
            let n = &data[off + 8..off + 8 + usize::from(h.name_len)];
            if n == name {
                return Some(h.inode.get());
            }
            off += usize::from(h.rec_len.get());
        }
        None
    }

    #[test]
    fn reads_back_contents_modes_owners_and_links() {
        let mut w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
        w.begin_region().unwrap();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let a = w.append_file(&mut &body[..], body.len() as u64).unwrap();
        let b = w.append_file(&mut &b"tiny"[..], 4).unwrap();
        let mut t = Tree::new(m(0o755));
        t.insert(b"d", Entry::Dir(m(0o2750))).unwrap();
        t.insert(
            b"d/a",
            Entry::File {
                meta: m(0o4755),
                data: a,
            },
        )
        .unwrap();
        t.insert(
            b"/b",
            Entry::File {
                meta: Metadata::new(0o600, 70_000, 80_000),
                data: b,
            },
        )
        .unwrap();
        t.insert(
            b"d/link",
            Entry::Hardlink {
                target: b"/d/a".to_vec(),
            },
        )
        .unwrap();
        t.insert(
            b"s",
            Entry::Symlink {
                meta: m(0o777),
                target: b"d/a".to_vec(),
            },
        )
        .unwrap();
        let (img, summary) = w.finish(&t).unwrap();
        assert_eq!(img.len() as u64, summary.image_size);

        let d = ino_of(&img, 2, b"d").unwrap();
        assert_eq!(ino_of(&img, 2, b"lost+found"), Some(11));
        assert_eq!(
            ino_of(&img, d, b"a"),
            ino_of(&img, d, b"link"),
            "hardlink identity"
        );
        assert_eq!(
            ino_of(&img, 2, b"b"),
            Some(12),
            "depth-first, by name: b before d"
        );
        assert_eq!(d, 13);

        let fs = view(img);
        assert_eq!(fs.read("/d/a").unwrap(), body);
        assert_eq!(fs.read("/d/link").unwrap(), body);
        assert_eq!(fs.read("/b").unwrap(), b"tiny");
        let md = fs.metadata("/d/a").unwrap();
        assert_eq!((md.mode(), md.uid(), md.gid()), (0o4755, 1000, 100));
        let md = fs.metadata("/b").unwrap();
        assert_eq!((md.uid(), md.gid()), (70_000, 80_000));
        assert_eq!(fs.metadata("/d").unwrap().mode(), 0o2750);
        assert_eq!(fs.read_link("/s").unwrap().as_ref(), b"d/a");
        assert_eq!(fs.read("/s").unwrap(), body, "symlink resolves");
    }

    #[test]
    fn big_directory_reads_back() {
        let w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
        let mut t = Tree::new(m(0o755));
        for i in 0..5000 {
            t.insert(format!("n{i:05}").as_bytes(), Entry::Fifo(m(0o644)))
                .unwrap();
        }
        let (img, _) = w.finish(&t).unwrap();
        let fs = view(img);
        let names: Vec<String> = fs
            .read_dir("/")
            .unwrap()
            .map(|e| e.unwrap().file_name().as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names.len(), 5000 + 3);
        assert_eq!(names[..3], [".", "..", "lost+found"]);
        assert_eq!(names[3], "n00000");
        assert_eq!(names[5002], "n04999");
    }

    #[test]
    fn same_input_same_bytes_and_unreferenced_blocks_stay_free() {
        let build = |reference: bool| {
            let mut w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
            w.begin_region().unwrap();
            let a = w.append_file(&mut &[9u8; 10_000][..], 10_000).unwrap();
            let mut t = Tree::new(m(0o755));
            if reference {
                t.insert(
                    b"a",
                    Entry::File {
                        meta: m(0o644),
                        data: a,
                    },
                )
                .unwrap();
            }
            w.finish(&t).unwrap()
        };
        let (one, s1) = build(true);
        let (two, _) = build(true);
        assert!(one == two);
        let (hidden, s3) = build(false);
        assert_eq!(s3.free_blocks, s1.free_blocks + 3);
        // The data bytes are there all the same.
        let r = s3.regions[0].byte_range();
        let r = usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap();
        assert!(hidden[r.clone()] == one[r]);
    }

    #[test]
    fn zero_blocks_become_holes() {
        let mut w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
        w.begin_region().unwrap();
        let mut body = vec![0u8; 4096 * 4];
        body[4096] = 1;
        body.extend_from_slice(b"tail");
        let d = w.append_file(&mut &body[..], body.len() as u64).unwrap();
        assert_eq!(d.allocated_blocks(), 2);
        assert_eq!(*d.runs, [(1, 1), (4, 1)]);
        let mut t = Tree::new(m(0o755));
        t.insert(
            b"f",
            Entry::File {
                meta: m(0o644),
                data: d,
            },
        )
        .unwrap();
        let (img, _) = w.finish(&t).unwrap();
        assert_eq!(view(img).read("/f").unwrap(), body);
    }

    #[test]
    fn errors_name_what_and_where() {
        let err = Ext4Writer::new(
            Vec::new(),
            Options {
                chunk_size: 3000,
                ..Options::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "chunk size 3000 must be a power of two from 4 KiB to 128 MiB (one block group)"
        );
        let mut w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
        assert!(matches!(
            w.append_file(&mut &b""[..], 0),
            Err(Error::NoRegion)
        ));
        w.begin_region().unwrap();
        let err = w.append_file(&mut &b"abc"[..], 10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "file #0 ended after 3 bytes; 10 were promised"
        );
        let d = w.append_file(&mut &b"abc"[..], 3).unwrap();

        let finish_err = |t: &Tree| {
            let mut w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
            w.begin_region().unwrap();
            w.append_file(&mut &b"abc"[..], 10).unwrap_err();
            w.append_file(&mut &b"abc"[..], 3).unwrap();
            w.finish(t).unwrap_err().to_string()
        };
        let mut t = Tree::new(m(0o755));
        t.insert(
            b"x",
            Entry::File {
                meta: m(0o644),
                data: d.clone(),
            },
        )
        .unwrap();
        t.insert(
            b"y",
            Entry::File {
                meta: m(0o644),
                data: d.clone(),
            },
        )
        .unwrap();
        assert_eq!(
            finish_err(&t),
            "/y: its file data is already used by /x; use Entry::Hardlink to share it"
        );
        let mut t = Tree::new(m(0o755));
        t.insert(
            b"l",
            Entry::Hardlink {
                target: b"nope".to_vec(),
            },
        )
        .unwrap();
        assert_eq!(finish_err(&t), "/l: hardlink target /nope does not exist");
        t.insert(b"dir", Entry::Dir(m(0o755))).unwrap();
        t.insert(
            b"l",
            Entry::Hardlink {
                target: b"dir".to_vec(),
            },
        )
        .unwrap();
        assert_eq!(finish_err(&t), "/l: hardlink target /dir is a directory");
        t.insert(
            b"l",
            Entry::Hardlink {
                target: b"l".to_vec(),
            },
        )
        .unwrap();
        assert!(finish_err(&t).contains("does not end"));
        let mut t = Tree::new(m(0o755));
        let big = m(0o644).with_xattr(b"user.huge", &[1; 5000]);
        t.insert(b"dir", Entry::Dir(m(0o755))).unwrap();
        t.insert(b"dir/x", Entry::Fifo(big)).unwrap();
        assert!(finish_err(&t).starts_with("/dir/x: xattrs do not fit: \"user.huge\""));
        let mut t = Tree::new(m(0o755));
        t.insert(
            b"x",
            Entry::File {
                meta: m(0o644),
                data: d,
            },
        )
        .unwrap();
        let foreign = {
            let mut w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
            w.begin_region().unwrap();
            w.finish(&t).unwrap_err().to_string()
        };
        assert_eq!(
            foreign,
            "/x: its file data (at block 128) was not appended by this writer"
        );
        assert!(matches!(
            Tree::new(m(0o755)).insert(b"a/b", Entry::Fifo(m(0))),
            Err(TreeError::ParentMissing { .. })
        ));
    }

    #[test]
    fn shared_xattr_blocks_are_refcounted() {
        let w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
        let mut t = Tree::new(m(0o755));
        let meta = m(0o644).with_xattr(b"user.big", &[5; 2000]);
        for i in 0..3 {
            t.insert(format!("f{i}").as_bytes(), Entry::Fifo(meta.clone()))
                .unwrap();
        }
        let (img, summary) = w.finish(&t).unwrap();
        // root dir block, lost+found block, one shared xattr block.
        let x = usize::try_from(summary.metadata_start.0 + 2).unwrap() * 4096;
        assert_eq!(&img[x..x + 4], &XATTR_MAGIC.to_le_bytes());
        assert_eq!(&img[x + 4..x + 8], &3u32.to_le_bytes());
    }

    #[test]
    fn time_encoding_matches_kernel() {
        assert_eq!(encode_time(Timestamp::new(0, 0)), (0, 0));
        assert_eq!(encode_time(Timestamp::new(-1, 5)), (u32::MAX, 5 << 2));
        // 2038-01-19T03:14:08Z, one past i32::MAX: epoch bits 1.
        assert_eq!(encode_time(Timestamp::new(1 << 31, 0)), (1 << 31, 1));
        assert_eq!(encode_time(Timestamp::new(-(1 << 31), 0)), (1 << 31, 0));
    }
}
