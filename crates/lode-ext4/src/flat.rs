//! The compact tree the writer lays out: what [`crate::Ext4Writer::finish_flat`]
//! takes, and what [`crate::Ext4Writer::finish`] turns a [`crate::Tree`] into.
//!
//! A flattened image may hold millions of names, so the tree is three flat
//! vectors rather than a map per directory: inode records (packed metadata
//! and kind), name records (an offset into one byte arena, the inode, the
//! parent) and the name bytes. A directory's children are one contiguous,
//! name-sorted run of name records, so the writer needs no per-directory
//! map and no paths: a path is only rebuilt, from the parent links, for an
//! error message.
//!
//! ```text
//! names:  "binetclsmotd…"            (one arena, no separators)
//! nodes:  0 root ─┬─ 1 "bin"  → inode 1 (Dir, children 3..4)
//!                 └─ 2 "etc"  → inode 2 (Dir, children 4..6)
//!                    3 "ls"   → inode 3 (File)
//!                    4 "motd" → inode 4 (File)
//!                    5 "m2"   → inode 4, link: a further name (hardlink)
//! inodes: [Dir, Dir, Dir, File, File]   (shared by hardlinked names)
//! ```
//!
//! The first name of an inode that is not marked as a link owns it (takes
//! its inode number where the depth-first numbering meets it); names marked
//! as links share it, as [`crate::Entry::Hardlink`] does.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::tree::{BytePath, Metadata, NAME_MAX, SYMLINK_MAX, Timestamp, TreeError};
use crate::writer::FileData;

/// Marks "none" in the `u32` links between records.
pub(crate) const NONE: u32 = u32::MAX;

/// An inode's metadata, packed: 56 bytes, against 88 for [`Metadata`] and
/// its map's allocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// atime, mtime, ctime.
    secs: [i64; 3],
    nanos: [u32; 3],
    uid: u32,
    gid: u32,
    mode: u32,
    /// Xattrs serialised in name order as (u32 LE length, bytes) pairs of
    /// name and value; `None` when there are none (most inodes), so a
    /// thin pointer.
    #[allow(clippy::box_collection)]
    xattrs: Option<Box<Vec<u8>>>,
}

impl From<&Metadata> for Meta {
    fn from(m: &Metadata) -> Self {
        let xattrs = (!m.xattrs.is_empty()).then(|| {
            let mut out = Vec::new();
            for (name, value) in &m.xattrs {
                for part in [name, value] {
                    let len = u32::try_from(part.len()).expect("xattr parts are below 4 GiB");
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(part);
                }
            }
            Box::new(out)
        });
        Self {
            secs: [m.atime.secs, m.mtime.secs, m.ctime.secs],
            nanos: [m.atime.nanos, m.mtime.nanos, m.ctime.nanos],
            uid: m.uid,
            gid: m.gid,
            mode: m.mode,
            xattrs,
        }
    }
}

impl Meta {
    /// Permission bits (`0o7777` at most).
    pub fn mode(&self) -> u32 {
        self.mode
    }
    pub fn uid(&self) -> u32 {
        self.uid
    }
    pub fn gid(&self) -> u32 {
        self.gid
    }
    pub fn atime(&self) -> Timestamp {
        Timestamp::new(self.secs[0], self.nanos[0])
    }
    pub fn mtime(&self) -> Timestamp {
        Timestamp::new(self.secs[1], self.nanos[1])
    }
    pub fn ctime(&self) -> Timestamp {
        Timestamp::new(self.secs[2], self.nanos[2])
    }
    /// Whether the inode has xattrs.
    pub fn has_xattrs(&self) -> bool {
        self.xattrs.is_some()
    }
    /// The xattrs by full name.
    pub fn xattrs(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut out = BTreeMap::new();
        let Some(mut rest) = self.xattrs.as_deref().map(Vec::as_slice) else {
            return out;
        };
        fn take<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
            let (len, tail) = rest.split_at(4);
            let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
            let (part, tail) = tail.split_at(len);
            *rest = tail;
            part
        }
        while !rest.is_empty() {
            let name = take(&mut rest).to_vec();
            let value = take(&mut rest).to_vec();
            out.insert(name, value);
        }
        out
    }
    /// The unpacked form.
    pub fn metadata(&self) -> Metadata {
        Metadata {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            atime: self.atime(),
            mtime: self.mtime(),
            ctime: self.ctime(),
            xattrs: self.xattrs(),
        }
    }

    fn check(&self, path: impl Fn() -> BytePath) -> Result<(), TreeError> {
        if self.mode > 0o7777 {
            return Err(TreeError::BadMode {
                path: path(),
                mode: self.mode,
            });
        }
        for t in [self.atime(), self.mtime(), self.ctime()] {
            if !t.is_valid() {
                return Err(TreeError::BadTime {
                    path: path(),
                    secs: t.secs,
                    nanos: t.nanos,
                });
            }
        }
        Ok(())
    }
}

/// What an inode is; `D` is a regular file's contents ([`FileData`] for the
/// writer, anything in tests of a caller's own tree logic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeKind<D = FileData> {
    Dir,
    File(D),
    Symlink(Box<[u8]>),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
    Socket,
}

/// One inode: metadata and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatInode<D = FileData> {
    pub meta: Meta,
    pub kind: InodeKind<D>,
}

impl FlatInode {
    fn check(&self, path: impl Fn() -> BytePath) -> Result<(), TreeError> {
        match &self.kind {
            InodeKind::Symlink(target) if target.is_empty() || target.len() > SYMLINK_MAX => {
                return Err(TreeError::BadSymlink {
                    path: path(),
                    len: target.len(),
                });
            }
            InodeKind::CharDev(major, minor) | InodeKind::BlockDev(major, minor)
                if *major >= 1 << 12 || *minor >= 1 << 20 =>
            {
                return Err(TreeError::BadDevice {
                    path: path(),
                    major: *major,
                    minor: *minor,
                });
            }
            _ => {}
        }
        self.meta.check(path)
    }
}

/// A name record of a [`FlatTree`]: its index ([`FlatTree::ROOT`] is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NameId(pub u32);

/// An inode of a [`FlatTree`]: its index in the inode vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeId(pub u32);

/// The root's name record, as the writer indexes it.
pub(crate) const ROOT_NAME: u32 = 0;

/// One name in the tree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Name {
    /// Offset of the name bytes in the arena.
    at: u32,
    len: u8,
    /// A further name of an inode another name owns.
    pub link: bool,
    pub inode: u32,
    pub parent: u32,
    /// A directory's children: `first..first + count` (`first` is `NONE`
    /// until they are added).
    first: u32,
    count: u32,
}

/// The tree the writer lays out; see the module docs.
#[derive(Debug, Clone)]
pub struct FlatTree {
    names: Vec<u8>,
    nodes: Vec<Name>,
    inodes: Vec<FlatInode>,
}

fn u32_of(n: usize, path: impl Fn() -> BytePath) -> Result<u32, TreeError> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n != NONE)
        .ok_or_else(|| TreeError::TooLarge { path: path() })
}

impl FlatTree {
    /// A tree of the inodes `inodes` whose root directory is `inodes[root]`;
    /// name the others with [`FlatTree::add_children`].
    pub fn new(inodes: Vec<FlatInode>, root: InodeId) -> Result<Self, TreeError> {
        let root = root.0;
        let root_path = || BytePath(Vec::new());
        u32_of(inodes.len(), root_path)?;
        match inodes.get(root as usize) {
            Some(i) if i.kind == InodeKind::Dir => i.check(root_path)?,
            _ => return Err(TreeError::Root { path: root_path() }),
        }
        Ok(Self {
            names: Vec::new(),
            nodes: vec![Name {
                at: 0,
                len: 0,
                link: false,
                inode: root,
                parent: 0,
                first: NONE,
                count: 0,
            }],
            inodes,
        })
    }

    /// The root's name record.
    pub const ROOT: NameId = NameId(ROOT_NAME);

    /// Makes room for `names` more names of `bytes` bytes in all.
    pub fn reserve(&mut self, names: usize, bytes: usize) {
        self.nodes.reserve_exact(names);
        self.names.reserve_exact(bytes);
    }

    /// Gives the directory named `dir` its children, in strictly increasing
    /// name order, as (name, inode) pairs; returns the first child's name
    /// record (the others follow it). Each directory gets its children once.
    pub fn add_children<'a>(
        &mut self,
        dir: NameId,
        children: impl IntoIterator<Item = (&'a [u8], InodeId)>,
    ) -> Result<NameId, TreeError> {
        let dir = dir.0;
        let d = self.nodes[dir as usize];
        if self.inodes[d.inode as usize].kind != InodeKind::Dir || d.first != NONE {
            return Err(TreeError::ParentNotDir {
                path: self.path_at(dir),
            });
        }
        let first = u32_of(self.nodes.len(), || self.path_at(dir))?;
        let mut last: Option<Range<usize>> = None;
        for (name, InodeId(inode)) in children {
            let full = || {
                let mut p = self.path_at(dir).0;
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                BytePath(p)
            };
            if name.is_empty()
                || name == b"."
                || name == b".."
                || name.contains(&0)
                || name.contains(&b'/')
            {
                return Err(TreeError::InvalidPath { path: full() });
            }
            if name.len() > NAME_MAX {
                return Err(TreeError::NameTooLong {
                    path: full(),
                    len: name.len(),
                });
            }
            if last
                .as_ref()
                .is_some_and(|r| self.names[r.clone()] >= *name)
            {
                return Err(TreeError::Unsorted { path: full() });
            }
            let is_dir = match self.inodes.get(inode as usize) {
                Some(i) => i.kind == InodeKind::Dir,
                None => return Err(TreeError::NoInode { path: full() }),
            };
            if dir == ROOT_NAME && name == b"lost+found" && !is_dir {
                return Err(TreeError::LostFound { path: full() });
            }
            let at = u32_of(self.names.len() + name.len(), full)? as usize - name.len();
            u32_of(self.nodes.len() + 1, full)?;
            self.names.extend_from_slice(name);
            self.nodes.push(Name {
                at: u32::try_from(at).expect("checked above"),
                len: u8::try_from(name.len()).expect("checked against NAME_MAX"),
                link: false,
                inode,
                parent: dir,
                first: NONE,
                count: 0,
            });
            last = Some(at..at + name.len());
        }
        let count = u32::try_from(self.nodes.len()).expect("checked per name") - first;
        let d = &mut self.nodes[dir as usize];
        d.first = first;
        d.count = count;
        Ok(NameId(first))
    }

    /// Makes the name record `node` a further name of `inode` (a hardlink):
    /// it shares the inode another name owns.
    pub fn set_link(&mut self, node: NameId, inode: InodeId) {
        let n = &mut self.nodes[node.0 as usize];
        n.link = true;
        n.inode = inode.0;
    }

    /// The inode the name record `node` names.
    pub fn inode_of(&self, node: NameId) -> InodeId {
        InodeId(self.nodes[node.0 as usize].inode)
    }

    /// Whether the name record `node` names a directory.
    pub fn is_dir(&self, node: NameId) -> bool {
        self.is_dir_at(node.0)
    }

    pub(crate) fn is_dir_at(&self, node: u32) -> bool {
        self.inodes[self.nodes[node as usize].inode as usize].kind == InodeKind::Dir
    }

    /// How many name records there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether only the root is named.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    pub(crate) fn node(&self, node: u32) -> &Name {
        &self.nodes[node as usize]
    }

    pub(crate) fn inode(&self, inode: u32) -> &FlatInode {
        &self.inodes[inode as usize]
    }

    pub(crate) fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    pub(crate) fn name(&self, node: u32) -> &[u8] {
        let n = &self.nodes[node as usize];
        &self.names[n.at as usize..n.at as usize + usize::from(n.len)]
    }

    /// The children of directory `dir` (empty for anything else).
    pub(crate) fn children(&self, dir: u32) -> Range<u32> {
        let n = &self.nodes[dir as usize];
        if n.first == NONE {
            0..0
        } else {
            n.first..n.first + n.count
        }
    }

    /// The child of `dir` called `name`.
    pub(crate) fn child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let range = self.children(dir);
        let (start, end) = (range.start as usize, range.end as usize);
        let i = self.nodes[start..end]
            .binary_search_by(|n| {
                self.names[n.at as usize..n.at as usize + usize::from(n.len)].cmp(name)
            })
            .ok()?;
        Some(range.start + u32::try_from(i).expect("below the node count"))
    }

    /// The path of `node`, rebuilt from its parents (for messages).
    pub fn path(&self, node: NameId) -> BytePath {
        self.path_at(node.0)
    }

    pub(crate) fn path_at(&self, node: u32) -> BytePath {
        let mut parts = Vec::new();
        let mut n = node;
        while n != ROOT_NAME {
            parts.push(self.name(n));
            n = self.nodes[n as usize].parent;
        }
        parts.reverse();
        BytePath(parts.join(&b'/'))
    }

    /// Checks the inode a name owns.
    pub(crate) fn check_owner(&self, node: u32) -> Result<(), TreeError> {
        self.inode(self.node(node).inode)
            .check(|| self.path_at(node))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{Ext4Writer, Options};

    fn dir() -> FlatInode {
        FlatInode {
            meta: Meta::from(&Metadata::new(0o755, 0, 0)),
            kind: InodeKind::Dir,
        }
    }

    fn fifo() -> FlatInode {
        FlatInode {
            meta: Meta::from(&Metadata::new(0o644, 0, 0)),
            kind: InodeKind::Fifo,
        }
    }

    fn finish(t: &FlatTree) -> Result<Vec<u8>, crate::Error> {
        let w = Ext4Writer::new(Vec::new(), Options::default()).unwrap();
        w.finish_flat(t).map(|(img, _)| img)
    }

    #[test]
    fn children_must_be_sorted_named_and_exist() {
        let mut t = FlatTree::new(vec![dir(), dir(), fifo()], InodeId(0)).unwrap();
        let err = t
            .add_children(
                FlatTree::ROOT,
                [(&b"b"[..], InodeId(1)), (b"a", InodeId(2))],
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/a: names are not in strictly increasing byte order"
        );
        let mut t = FlatTree::new(vec![dir(), dir(), fifo()], InodeId(0)).unwrap();
        let err = t
            .add_children(FlatTree::ROOT, [(&b"a/b"[..], InodeId(1))])
            .unwrap_err();
        assert!(matches!(err, TreeError::InvalidPath { .. }), "{err}");
        let err = t
            .add_children(FlatTree::ROOT, [(&b"x"[..], InodeId(9))])
            .unwrap_err();
        assert_eq!(err.to_string(), "/x: names an inode the tree does not have");
        let err = t
            .add_children(FlatTree::ROOT, [(&b"lost+found"[..], InodeId(2))])
            .unwrap_err();
        assert!(matches!(err, TreeError::LostFound { .. }), "{err}");
        assert!(matches!(
            FlatTree::new(vec![fifo()], InodeId(0)),
            Err(TreeError::Root { .. })
        ));
    }

    #[test]
    fn an_inode_has_one_owner_and_links_name_it_again() {
        let mut t = FlatTree::new(vec![dir(), dir(), fifo()], InodeId(0)).unwrap();
        let first = t
            .add_children(
                FlatTree::ROOT,
                [
                    (&b"a"[..], InodeId(2)),
                    (b"b", InodeId(2)),
                    (b"d", InodeId(1)),
                ],
            )
            .unwrap();
        let err = finish(&t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/b: its inode is already named; mark further names as links"
        );
        let (b, d) = (NameId(first.0 + 1), NameId(first.0 + 2));
        t.set_link(b, InodeId(2));
        assert_eq!(t.path(b).to_string(), "/b");
        let img = finish(&t).unwrap();
        let fs = ext4_view::Ext4::load(Box::new(img)).unwrap();
        assert_eq!(fs.metadata("/b").unwrap().mode(), 0o644);
        t.set_link(d, InodeId(1));
        assert_eq!(
            finish(&t).unwrap_err().to_string(),
            "/d: hardlink target /d is a directory"
        );
    }

    proptest! {
        /// Packing metadata loses nothing.
        #[test]
        fn meta_round_trips(
            mode in 0u32..0o10000,
            uid in any::<u32>(),
            gid in any::<u32>(),
            secs in proptest::array::uniform3(any::<i64>()),
            nanos in proptest::array::uniform3(0u32..1_000_000_000),
            xattrs in proptest::collection::btree_map(
                proptest::collection::vec(any::<u8>(), 1..20),
                proptest::collection::vec(any::<u8>(), 0..40),
                0..4,
            ),
        ) {
            let m = Metadata {
                mode,
                uid,
                gid,
                atime: Timestamp::new(secs[0], nanos[0]),
                mtime: Timestamp::new(secs[1], nanos[1]),
                ctime: Timestamp::new(secs[2], nanos[2]),
                xattrs,
            };
            prop_assert_eq!(Meta::from(&m).metadata(), m);
        }
    }
}
