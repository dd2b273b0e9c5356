//! Extended attributes: encoding into the inode's spare bytes and, when they
//! do not fit there, into one xattr block.
//!
//! ```text
//! in-inode (96 bytes at inode offset 0xA0)     xattr block (4096 bytes)
//! ┌────────────┐                               ┌──────────────────────────┐
//! │ magic      │ 4                             │ header (magic, refcount, │ 32
//! ├────────────┤ ← value offsets count from    │ blocks=1, hash)          │
//! │ entry 0    │   here                        ├──────────────────────────┤ ← offsets
//! │ entry 1 …  │ 16 + name (pad 4)             │ entries …, 4 zero bytes  │   from block
//! │ 0u32       │ end of entries                │          free            │   start
//! │   free     │                               │ … values (pad 4)         │
//! │ values …   │ packed at the end             └──────────────────────────┘
//! └────────────┘
//! ```
//!
//! Entries are sorted by (name index, name length, name), the order the
//! kernel's block lookup relies on. Attributes are placed greedily in that
//! order: each goes in the inode if it still fits, otherwise in the block.
//! Identical blocks are shared by the writer with a reference count.

use std::collections::BTreeMap;

use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32};

use crate::layout::{
    BLOCK_BYTES, INODE_BYTES, INODE_XATTR_OFFSET, XATTR_MAGIC, XattrBlockHeader, XattrEntry,
};

/// Errors from encoding one inode's xattrs.
#[derive(Debug, thiserror::Error)]
pub enum XattrError {
    #[error(
        "xattr {name:?}: ext4 has no namespace for this name (use user., trusted., security. or system.)"
    )]
    Namespace { name: String },
    #[error("xattr {name:?}: name is longer than 255 bytes after its prefix")]
    NameTooLong { name: String },
    #[error("xattr {name:?}: not a valid POSIX ACL in the VFS xattr format")]
    BadAcl { name: String },
    #[error(
        "xattrs do not fit: {name:?} needs {need} bytes but only {free} are left in the inode and its one 4 KiB xattr block"
    )]
    TooLarge {
        name: String,
        need: usize,
        free: usize,
    },
}

/// Bytes available for in-inode xattrs after the magic.
const IN_INODE_SPACE: usize = INODE_BYTES - INODE_XATTR_OFFSET - 4;
const BLOCK_HEADER: usize = size_of::<XattrBlockHeader>();
const ENTRY: usize = size_of::<XattrEntry>();

fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Name prefixes by ext4 name index; exact ACL names come first so they win
/// over `system.`.
const PREFIXES: &[(&[u8], u8, bool)] = &[
    (b"system.posix_acl_access", 2, true),
    (b"system.posix_acl_default", 3, true),
    (b"user.", 1, false),
    (b"trusted.", 4, false),
    (b"security.", 6, false),
    (b"system.richacl", 8, true),
    (b"system.", 7, false),
];

/// One attribute ready to encode.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Attr {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Attr {
    fn sort_key(&self) -> (u8, usize, &[u8]) {
        (self.index, self.name.len(), &self.name)
    }
    fn entry_size(&self) -> usize {
        ENTRY + pad4(self.name.len())
    }
    fn value_size(&self) -> usize {
        pad4(self.value.len())
    }
    fn hash(&self) -> u32 {
        let mut hash: u32 = 0;
        for &c in &self.name {
            hash = (hash << 5) ^ (hash >> 27) ^ u32::from(c);
        }
        let mut padded = self.value.clone();
        padded.resize(pad4(padded.len()), 0);
        for w in padded.chunks_exact(4) {
            let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            hash = (hash << 16) ^ (hash >> 16) ^ w;
        }
        hash
    }
}

fn display(name: &[u8]) -> String {
    name.escape_ascii().to_string()
}

/// Converts a `system.posix_acl_*` value from the VFS format (version 2,
/// 8-byte entries) to ext4's (version 1, 4-byte entries for the owner, group,
/// mask and other entries, 8 bytes for named users and groups).
fn acl_to_disk(name: &[u8], value: &[u8]) -> Result<Vec<u8>, XattrError> {
    let bad = || XattrError::BadAcl {
        name: display(name),
    };
    let (head, rest) = value.split_at_checked(4).ok_or_else(bad)?;
    if head != 2u32.to_le_bytes() || rest.len() % 8 != 0 {
        return Err(bad());
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in rest.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        match tag {
            // ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER
            0x01 | 0x04 | 0x10 | 0x20 => out.extend_from_slice(&e[..4]),
            // ACL_USER, ACL_GROUP
            0x02 | 0x08 => out.extend_from_slice(e),
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

fn parse(name: &[u8], value: &[u8]) -> Result<Attr, XattrError> {
    for &(prefix, index, exact) in PREFIXES {
        let suffix = if exact {
            (name == prefix).then_some(&b""[..])
        } else {
            name.strip_prefix(prefix).filter(|s| !s.is_empty())
        };
        let Some(suffix) = suffix else { continue };
        if suffix.len() > 255 {
            return Err(XattrError::NameTooLong {
                name: display(name),
            });
        }
        let value = if index == 2 || index == 3 {
            acl_to_disk(name, value)?
        } else {
            value.to_vec()
        };
        return Ok(Attr {
            index,
            name: suffix.to_vec(),
            value,
        });
    }
    Err(XattrError::Namespace {
        name: display(name),
    })
}

/// Writes entries and values into `area`; value offsets are relative to
/// `base` (the start of the entries in the inode, the block start for blocks).
fn write_entries(area: &mut [u8], entries_at: usize, base: usize, attrs: &[Attr]) {
    let mut e = entries_at;
    let mut v = area.len();
    for a in attrs {
        v -= a.value_size();
        area[v..v + a.value.len()].copy_from_slice(&a.value);
        let entry = XattrEntry {
            name_len: u8::try_from(a.name.len()).expect("name length checked in parse"),
            name_index: a.index,
            value_offs: U16::new(
                u16::try_from(if a.value.is_empty() { 0 } else { v - base })
                    .expect("offset within a block"),
            ),
            value_inum: U32::new(0),
            value_size: U32::new(u32::try_from(a.value.len()).expect("value within a block")),
            hash: U32::new(a.hash()),
        };
        area[e..e + ENTRY].copy_from_slice(entry.as_bytes());
        area[e + ENTRY..e + ENTRY + a.name.len()].copy_from_slice(&a.name);
        e += a.entry_size();
    }
    // The four zero bytes ending the entry list are already zero.
}

/// An inode's xattrs, encoded.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// The inode's xattr area (magic included), all zeros if none fit there.
    pub in_inode: [u8; INODE_BYTES - INODE_XATTR_OFFSET],
    /// A full xattr block with refcount 0, if some attributes did not fit in
    /// the inode. The writer sets the refcount.
    pub block: Option<Vec<u8>>,
}

/// Encodes `xattrs` (full names to values) for one inode.
pub(crate) fn encode(xattrs: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<Encoded, XattrError> {
    let mut attrs = xattrs
        .iter()
        .map(|(n, v)| parse(n, v))
        .collect::<Result<Vec<_>, _>>()?;
    attrs.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));

    let mut inode = Vec::new();
    let mut block = Vec::new();
    // The entry list ends with 4 zero bytes in both places.
    let mut inode_used = 4;
    let mut block_used = BLOCK_HEADER + 4;
    let block_size = BLOCK_BYTES;
    for a in attrs {
        let need = a.entry_size() + a.value_size();
        if inode_used + need <= IN_INODE_SPACE {
            inode_used += need;
            inode.push(a);
        } else if block_used + need <= block_size {
            block_used += need;
            block.push(a);
        } else {
            return Err(XattrError::TooLarge {
                name: display(
                    &[
                        PREFIXES
                            .iter()
                            .find(|p| p.1 == a.index)
                            .map_or(&b""[..], |p| p.0),
                        &a.name,
                    ]
                    .concat(),
                ),
                need,
                free: (IN_INODE_SPACE - inode_used) + (block_size - block_used),
            });
        }
    }

    let mut out = Encoded {
        in_inode: [0; INODE_BYTES - INODE_XATTR_OFFSET],
        block: None,
    };
    if !inode.is_empty() {
        out.in_inode[..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        write_entries(&mut out.in_inode, 4, 4, &inode);
    }
    if !block.is_empty() {
        let mut b = vec![0u8; block_size];
        write_entries(&mut b, BLOCK_HEADER, 0, &block);
        let mut hash: u32 = 0;
        for a in &block {
            hash = (hash << 16) ^ (hash >> 16) ^ a.hash();
        }
        let header = XattrBlockHeader {
            magic: U32::new(XATTR_MAGIC),
            refcount: U32::new(0),
            blocks: U32::new(1),
            hash: U32::new(hash),
            checksum: U32::new(0),
            reserved: [U32::new(0); 3],
        };
        b[..BLOCK_HEADER].copy_from_slice(header.as_bytes());
        out.block = Some(b);
    }
    Ok(out)
}

/// Byte offset of the reference count (u32 LE) in an xattr block.
pub(crate) const REFCOUNT_AT: u64 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(items: &[(&[u8], &[u8])]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        items
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn small_xattrs_stay_in_inode() {
        let e = encode(&map(&[(b"security.capability", &[1; 20])])).unwrap();
        assert!(e.block.is_none());
        assert_eq!(&e.in_inode[..4], &XATTR_MAGIC.to_le_bytes());
        assert_eq!(e.in_inode[4], 10); // name_len of "capability"
        assert_eq!(e.in_inode[5], 6); // security index
    }

    #[test]
    fn big_xattrs_spill_to_block() {
        let e = encode(&map(&[(b"user.big", &[7; 1000]), (b"user.a", b"x")])).unwrap();
        let block = e.block.unwrap();
        assert_eq!(&block[..4], &XATTR_MAGIC.to_le_bytes());
        assert_eq!(e.in_inode[5], 1);
    }

    #[test]
    fn errors_name_the_attribute() {
        let err = encode(&map(&[(b"user.huge", &[0; 5000])])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "xattrs do not fit: \"user.huge\" needs 5020 bytes but only 4148 are left in the inode and its one 4 KiB xattr block"
        );
        let err = encode(&map(&[(b"foo.bar", b"")])).unwrap_err();
        assert!(matches!(err, XattrError::Namespace { .. }));
        let err = encode(&map(&[(b"system.posix_acl_access", b"junk")])).unwrap_err();
        assert!(matches!(err, XattrError::BadAcl { .. }));
    }

    #[test]
    fn acl_converted_to_disk_format() {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x20, 4, u32::MAX),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        let disk = acl_to_disk(b"system.posix_acl_access", &v).unwrap();
        assert_eq!(disk.len(), 4 + 4 + 8 + 4 + 4);
        assert_eq!(&disk[..4], &1u32.to_le_bytes());
    }

    #[test]
    fn hash_matches_kernel_algorithm() {
        // name "a" then one value word 0x00000062 ("b"): (0x61 << 16) ^ 0x62
        let a = Attr {
            index: 1,
            name: b"a".to_vec(),
            value: b"b".to_vec(),
        };
        assert_eq!(a.hash(), (0x61 << 16) ^ 0x62);
    }
}
