//! A deterministic ext4 image writer, laid out for chunk deduplication.
//!
//! Where this fits: docs/architecture.md, "The flow of an image".
//!
//! lode's flattener (docs/flatten.md) merges an image's layers into
//! one tree and writes it with an [`Ext4Writer`]; the image is then cut into
//! chunks. The tree is a [`Tree`] (a map per directory, easy to edit) or,
//! for millions of names, the compact [`FlatTree`] the flattener builds; both
//! give the same bytes. The same input always gives the same bytes: no clock, no
//! random UUID or hash seed (both come from [`Options::seed`]), inode numbers
//! and directory order from the tree's sorted names.
//!
//! ```text
//! ┌─────────┬─────┬──────────┬──────────┬─────┬──────────────────────────────┐
//! │ SB+GDT  │free │ region 0 │ region 1 │ ... │ metadata: dirs, extent index,│
//! │ block 0…│     │ (layer 0)│ (layer 1)│     │ symlinks, xattrs, bitmaps,   │
//! │         │     │          │          │     │ inode tables                 │
//! └─────────┴─────┴──────────┴──────────┴─────┴──────────────────────────────┘
//!                 ^ every region and the metadata start on a chunk boundary
//! ```
//!
//! Each layer's regular files go into that layer's *data region*, one after
//! another, contiguous and block-aligned, so a region's bytes depend only
//! on the files appended to it: two images sharing a base layer share its
//! chunks. A file appended but never referenced from the tree (hidden by a
//! whiteout) keeps its bytes in the region, but its blocks are free in the
//! bitmap. All-zero blocks are left as holes.
//!
//! The filesystem: 4 KiB blocks, 256-byte inodes with nanosecond times,
//! features `ext_attr`, `sparse_super2` (no backup superblocks), `filetype`,
//! `extents`, `flex_bg`, `sparse_super`, `large_file`, `dir_nlink`,
//! `extra_isize`; no journal, no resize inode, no checksums, linear
//! directories. Root is inode 2, lost+found inode 11, the rest 12… in
//! depth-first name order.
//!
//! # Example
//!
//! ```
//! use lode_ext4::{Entry, Ext4Writer, Metadata, Options, Tree};
//!
//! let mut w = Ext4Writer::new(Vec::new(), Options { seed: [7; 16], ..Options::default() })?;
//! w.begin_region()?; // layer 0
//! let data = w.append_file(&mut &b"hello\n"[..], 6)?;
//!
//! let mut tree = Tree::new(Metadata::new(0o755, 0, 0));
//! tree.insert(b"etc", Entry::Dir(Metadata::new(0o755, 0, 0)))?;
//! tree.insert(b"etc/motd", Entry::File { meta: Metadata::new(0o644, 0, 0), data })?;
//! tree.insert(b"etc/greeting", Entry::Hardlink { target: b"etc/motd".to_vec() })?;
//!
//! let (image, summary) = w.finish(&tree)?;
//! assert_eq!(image.len() as u64, summary.image_size);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod dir;
mod extent;
mod flat;
pub mod layout;
mod tree;
mod writer;
mod xattr;

pub use flat::{FlatInode, FlatTree, InodeId, InodeKind, Meta, NameId};
pub use layout::{BLOCK_SIZE, BlockNo, InodeNo};
pub use tree::{BytePath, Entry, Metadata, NAME_MAX, SYMLINK_MAX, Timestamp, Tree, TreeError};
pub use writer::{Error, Ext4Writer, FileData, ImageSink, Options, Region, Summary};
pub use xattr::XattrError;
