//! The file tree an image is built from.
//!
//! A caller applies layers to one [`Tree`] (inserting entries, removing
//! whiteouts) and hands it to [`crate::Ext4Writer::finish`], which turns it
//! into a [`crate::FlatTree`] (lode-oci's merge builds that compact form
//! directly). Entries are kept sorted by name bytes, which fixes both the
//! directory order and the inode numbering in the image.
//!
//! ```text
//! Tree ── root Dir { meta, children: BTreeMap<name, Node> }
//!                     ├── "bin"  → Node::Dir(Dir { .. })
//!                     ├── "etc"  → Node::Dir(Dir { .. })
//!                     └── "init" → Node::Leaf(Entry::File { meta, data })
//! ```
//!
//! Paths are byte strings split on `/`; one leading `/` is allowed. Empty,
//! `.` and `..` components are rejected, and so is inserting below a parent
//! that is missing or not a directory: the caller creates parents first.

use std::collections::BTreeMap;
use std::fmt;

use crate::writer::FileData;

/// Longest name of a directory entry.
pub const NAME_MAX: usize = 255;
/// Longest symlink target (`PATH_MAX` less the NUL).
pub const SYMLINK_MAX: usize = 4095;

/// A path as given by the caller, shown with non-UTF-8 bytes escaped.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BytePath(pub Vec<u8>);

impl fmt::Display for BytePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0.escape_ascii())
    }
}

impl fmt::Debug for BytePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Errors from building a [`Tree`].
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: invalid path (empty, `.` or `..` component)")]
    InvalidPath { path: BytePath },
    #[error("{path}: the root directory can only be changed with Tree::set_root")]
    Root { path: BytePath },
    #[error("{path}: name is {len} bytes, longer than {NAME_MAX}")]
    NameTooLong { path: BytePath, len: usize },
    #[error("{path}: parent directory does not exist")]
    ParentMissing { path: BytePath },
    #[error("{path}: parent is not a directory")]
    ParentNotDir { path: BytePath },
    #[error("{path}: mode {mode:#o} has bits outside 0o7777 (the kind is given by the entry)")]
    BadMode { path: BytePath, mode: u32 },
    #[error("{path}: symlink target is {len} bytes; it must be 1..={SYMLINK_MAX}")]
    BadSymlink { path: BytePath, len: usize },
    #[error("{path}: device {major}:{minor} does not fit ext4's 12-bit major / 20-bit minor")]
    BadDevice {
        path: BytePath,
        major: u32,
        minor: u32,
    },
    #[error("{path}: timestamp {secs}.{nanos:09} is outside ext4's range (1901..2446)")]
    BadTime {
        path: BytePath,
        secs: i64,
        nanos: u32,
    },
    #[error("{path}: lost+found at the root must be a directory")]
    LostFound { path: BytePath },
    #[error("{path}: names are not in strictly increasing byte order")]
    Unsorted { path: BytePath },
    #[error("{path}: names an inode the tree does not have")]
    NoInode { path: BytePath },
    #[error("{path}: its inode is already named; mark further names as links")]
    NamedTwice { path: BytePath },
    #[error("{path}: the tree passes 2^32 - 1 names, inodes or name bytes")]
    TooLarge { path: BytePath },
}

/// A point in time: seconds since the Unix epoch and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// Earliest second ext4's 34-bit timestamps hold.
    pub const MIN_SECS: i64 = -(1 << 31);
    /// Latest second ext4's 34-bit timestamps hold.
    pub const MAX_SECS: i64 = (1 << 31) + 3 * (1 << 32) - 1;

    pub const fn new(secs: i64, nanos: u32) -> Self {
        Self { secs, nanos }
    }

    pub(crate) fn is_valid(self) -> bool {
        (Self::MIN_SECS..=Self::MAX_SECS).contains(&self.secs) && self.nanos < 1_000_000_000
    }
}

/// Ownership, permissions, times and xattrs of an inode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Permission bits including setuid/setgid/sticky (`0o7777` at most);
    /// the file type comes from the [`Entry`] kind.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// Extended attributes by full name (`user.foo`, `security.capability`,
    /// `trusted.*`, `system.posix_acl_access` in the VFS xattr format).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Metadata {
    /// Metadata with the given mode and owner, all times zero and no xattrs.
    pub fn new(mode: u32, uid: u32, gid: u32) -> Self {
        Self {
            mode,
            uid,
            gid,
            ..Self::default()
        }
    }

    /// Sets atime, mtime and ctime to `t`.
    pub fn with_times(mut self, t: Timestamp) -> Self {
        self.atime = t;
        self.mtime = t;
        self.ctime = t;
        self
    }

    /// Adds one xattr.
    pub fn with_xattr(mut self, name: &[u8], value: &[u8]) -> Self {
        self.xattrs.insert(name.to_vec(), value.to_vec());
        self
    }

    fn check(&self, path: &[u8]) -> Result<(), TreeError> {
        if self.mode > 0o7777 {
            return Err(TreeError::BadMode {
                path: BytePath(path.to_vec()),
                mode: self.mode,
            });
        }
        for t in [self.atime, self.mtime, self.ctime] {
            if !t.is_valid() {
                return Err(TreeError::BadTime {
                    path: BytePath(path.to_vec()),
                    secs: t.secs,
                    nanos: t.nanos,
                });
            }
        }
        Ok(())
    }
}

/// One thing to put at a path.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory; inserting it over an existing directory keeps the
    /// children and replaces the metadata.
    Dir(Metadata),
    /// A regular file whose contents were appended with
    /// [`crate::Ext4Writer::append_file`].
    File {
        meta: Metadata,
        data: FileData,
    },
    /// A symbolic link to `target` (1..=4095 bytes).
    Symlink {
        meta: Metadata,
        target: Vec<u8>,
    },
    /// Another name for the non-directory at `target` (a path in the same
    /// tree, resolved in [`crate::Ext4Writer::finish`]); it shares the
    /// target's inode and metadata.
    Hardlink {
        target: Vec<u8>,
    },
    CharDev {
        meta: Metadata,
        major: u32,
        minor: u32,
    },
    BlockDev {
        meta: Metadata,
        major: u32,
        minor: u32,
    },
    Fifo(Metadata),
    Socket(Metadata),
}

impl Entry {
    fn check(&self, path: &[u8]) -> Result<(), TreeError> {
        let bad = || BytePath(path.to_vec());
        match self {
            Entry::Dir(m) | Entry::File { meta: m, .. } | Entry::Fifo(m) | Entry::Socket(m) => {
                m.check(path)
            }
            Entry::Symlink { meta, target } => {
                if target.is_empty() || target.len() > SYMLINK_MAX {
                    return Err(TreeError::BadSymlink {
                        path: bad(),
                        len: target.len(),
                    });
                }
                meta.check(path)
            }
            Entry::CharDev { meta, major, minor } | Entry::BlockDev { meta, major, minor } => {
                if *major >= 1 << 12 || *minor >= 1 << 20 {
                    return Err(TreeError::BadDevice {
                        path: bad(),
                        major: *major,
                        minor: *minor,
                    });
                }
                meta.check(path)
            }
            Entry::Hardlink { target } => split(target).map(|_| ()),
        }
    }
}

/// A directory in the tree.
#[derive(Debug, Clone)]
pub(crate) struct Dir {
    pub meta: Metadata,
    pub children: BTreeMap<Vec<u8>, Node>,
}

/// A child of a directory.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Dir(Dir),
    /// Any entry but [`Entry::Dir`].
    Leaf(Entry),
}

/// The merged file tree of an image.
#[derive(Debug, Clone)]
pub struct Tree {
    pub(crate) root: Dir,
}

/// Splits a path into its components, checking each.
fn split(path: &[u8]) -> Result<Vec<&[u8]>, TreeError> {
    let rel = path.strip_prefix(b"/").unwrap_or(path);
    if rel.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
    for p in &parts {
        if p.is_empty() || *p == b"." || *p == b".." || p.contains(&0) {
            return Err(TreeError::InvalidPath {
                path: BytePath(rel.to_vec()),
            });
        }
        if p.len() > NAME_MAX {
            return Err(TreeError::NameTooLong {
                path: BytePath(rel.to_vec()),
                len: p.len(),
            });
        }
    }
    Ok(parts)
}

impl Tree {
    /// An empty tree whose root directory has `root` metadata.
    pub fn new(root: Metadata) -> Self {
        Self {
            root: Dir {
                meta: root,
                children: BTreeMap::new(),
            },
        }
    }

    /// Replaces the root directory's metadata.
    pub fn set_root(&mut self, meta: Metadata) -> Result<(), TreeError> {
        meta.check(b"")?;
        self.root.meta = meta;
        Ok(())
    }

    /// Puts `entry` at `path`, replacing what was there (a directory over a
    /// directory keeps its children). The parent must be a directory.
    pub fn insert(&mut self, path: &[u8], entry: Entry) -> Result<(), TreeError> {
        let parts = split(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(TreeError::Root {
                path: BytePath(path.to_vec()),
            });
        };
        entry.check(path.strip_prefix(b"/").unwrap_or(path))?;
        let full = || BytePath(parts.join(&b'/'));
        if parents.is_empty() && *name == b"lost+found" && !matches!(entry, Entry::Dir(_)) {
            return Err(TreeError::LostFound { path: full() });
        }
        let dir = self.dir_mut(parents).map_err(|not_dir| {
            if not_dir {
                TreeError::ParentNotDir { path: full() }
            } else {
                TreeError::ParentMissing { path: full() }
            }
        })?;
        let node = match entry {
            Entry::Dir(meta) => match dir.children.remove(*name) {
                Some(Node::Dir(old)) => Node::Dir(Dir {
                    meta,
                    children: old.children,
                }),
                _ => Node::Dir(Dir {
                    meta,
                    children: BTreeMap::new(),
                }),
            },
            other => Node::Leaf(other),
        };
        dir.children.insert(name.to_vec(), node);
        Ok(())
    }

    /// Removes `path` and everything below it; returns whether it existed.
    /// This is how the flattener applies a whiteout.
    pub fn remove(&mut self, path: &[u8]) -> Result<bool, TreeError> {
        let parts = split(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(TreeError::Root {
                path: BytePath(path.to_vec()),
            });
        };
        Ok(match self.dir_mut(parents) {
            Ok(dir) => dir.children.remove(*name).is_some(),
            Err(_) => false,
        })
    }

    /// Removes every child of the directory at `path` (an opaque whiteout);
    /// returns whether the directory existed.
    pub fn clear_dir(&mut self, path: &[u8]) -> Result<bool, TreeError> {
        let parts = split(path)?;
        Ok(match self.dir_mut(&parts) {
            Ok(dir) => {
                dir.children.clear();
                true
            }
            Err(_) => false,
        })
    }

    /// Whether something exists at `path`.
    pub fn contains(&self, path: &[u8]) -> bool {
        matches!(split(path), Ok(parts) if self.lookup(&parts).is_some())
    }

    /// The directory at `parts`; `Err(true)` if a component is not a
    /// directory, `Err(false)` if one is missing.
    fn dir_mut(&mut self, parts: &[&[u8]]) -> Result<&mut Dir, bool> {
        let mut dir = &mut self.root;
        for p in parts {
            dir = match dir.children.get_mut(*p) {
                Some(Node::Dir(d)) => d,
                Some(Node::Leaf(_)) => return Err(true),
                None => return Err(false),
            };
        }
        Ok(dir)
    }

    /// The node at `parts`, or `None` for the root or a missing path.
    pub(crate) fn lookup(&self, parts: &[&[u8]]) -> Option<&Node> {
        let (last, parents) = parts.split_last()?;
        let mut dir = &self.root;
        for p in parents {
            match dir.children.get(*p)? {
                Node::Dir(d) => dir = d,
                Node::Leaf(_) => return None,
            }
        }
        dir.children.get(*last)
    }

    /// Resolves a hardlink target path to the node it names.
    pub(crate) fn lookup_path(&self, path: &[u8]) -> Option<(Vec<u8>, &Node)> {
        let parts = split(path).ok()?;
        let node = self.lookup(&parts)?;
        Some((parts.join(&b'/'), node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata::new(0o755, 0, 0)
    }

    #[test]
    fn insert_requires_parent() {
        let mut t = Tree::new(meta());
        let err = t.insert(b"a/b", Entry::Fifo(meta())).unwrap_err();
        assert_eq!(err.to_string(), "/a/b: parent directory does not exist");
        t.insert(b"/a", Entry::Fifo(meta())).unwrap();
        let err = t.insert(b"a/b", Entry::Fifo(meta())).unwrap_err();
        assert_eq!(err.to_string(), "/a/b: parent is not a directory");
    }

    #[test]
    fn rejects_dot_components_and_long_names() {
        let mut t = Tree::new(meta());
        for bad in [&b"a/../b"[..], b"./a", b"a//b", b"a/", b"a\0b"] {
            let err = t.insert(bad, Entry::Fifo(meta())).unwrap_err();
            assert!(matches!(err, TreeError::InvalidPath { .. }), "{err}");
        }
        let long = vec![b'x'; 256];
        let err = t.insert(&long, Entry::Fifo(meta())).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("name is 256 bytes, longer than 255")
        );
        let err = t.insert(b"/", Entry::Fifo(meta())).unwrap_err();
        assert!(matches!(err, TreeError::Root { .. }));
    }

    #[test]
    fn dir_over_dir_keeps_children_and_remove_drops_subtree() {
        let mut t = Tree::new(meta());
        t.insert(b"d", Entry::Dir(meta())).unwrap();
        t.insert(b"d/f", Entry::Fifo(meta())).unwrap();
        t.insert(b"d", Entry::Dir(Metadata::new(0o700, 1, 1)))
            .unwrap();
        assert!(t.contains(b"d/f"));
        assert!(t.remove(b"d").unwrap());
        assert!(!t.contains(b"d/f"));
        assert!(!t.remove(b"d").unwrap());
    }

    #[test]
    fn checks_entry_fields() {
        let mut t = Tree::new(meta());
        let err = t
            .insert(
                b"s",
                Entry::Symlink {
                    meta: meta(),
                    target: Vec::new(),
                },
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/s: symlink target is 0 bytes; it must be 1..=4095"
        );
        let err = t
            .insert(
                b"c",
                Entry::CharDev {
                    meta: meta(),
                    major: 4096,
                    minor: 0,
                },
            )
            .unwrap_err();
        assert!(matches!(err, TreeError::BadDevice { .. }));
        let err = t
            .insert(b"f", Entry::Fifo(Metadata::new(0o10644, 0, 0)))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/f: mode 0o10644 has bits outside 0o7777 (the kind is given by the entry)"
        );
        let late = Metadata::new(0o644, 0, 0).with_times(Timestamp::new(1 << 40, 0));
        assert!(matches!(
            t.insert(b"f", Entry::Fifo(late)).unwrap_err(),
            TreeError::BadTime { .. }
        ));
        assert!(matches!(
            t.insert(b"lost+found", Entry::Fifo(meta())).unwrap_err(),
            TreeError::LostFound { .. }
        ));
    }
}
