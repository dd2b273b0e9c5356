//! Layer merge: applies tar entries, layer by layer, to one file tree with
//! the OCI image-spec semantics, then hands the result to lode-ext4.
//!
//! The merge keeps its own tree rather than editing a [`lode_ext4::Tree`]
//! directly, because a hardlink is an inode shared by several names: when
//! a later layer removes or replaces one name, the others must keep the
//! inode (overlayfs and every unpacker behave so). Here a name points to
//! an inode in a table; [`Merger::into_flat`] gives each inode to the first
//! of its names in depth-first name order and marks the others as further
//! names (hardlinks) of it, in lode-ext4's compact [`lode_ext4::FlatTree`].
//!
//! An image may hold millions of entries, so the tree is flat: name
//! records of 36 bytes in one vector, the name bytes in one arena, packed
//! inodes in another vector, and one hash index from (parent, name) to the
//! record; a directory's children are sorted only once, when the tree is
//! handed on. What it may grow to is capped by [`MergeLimits`].
//!
//! Rules, in the order an entry meets them:
//! - names are normalised by [`normalize`]: leading `/`, `./` and empty
//!   components dropped, `..` resolved lexically and refused where it
//!   would leave the root;
//! - a path may not pass through a symlink in the tree (refused), nor
//!   through a file (refused); missing parents are created as implicit
//!   directories (`0755`, root:root, times 0);
//! - `.wh.NAME` removes `NAME` as lower layers left it, `.wh..wh..opq`
//!   empties its directory of what lower layers put there; what this layer
//!   already added (and the directories leading to it) stays, whatever the
//!   tar order. Other `.wh..wh.*` names are aufs bookkeeping and ignored;
//! - a later entry for a path replaces what is there: a directory over a
//!   directory keeps its children and takes the new metadata; anything else
//!   drops the old subtree. Duplicates in one layer: the last wins;
//! - a hardlink names an existing non-directory (from this layer or a lower
//!   one), resolved when the entry is applied; its header's own metadata is
//!   ignored, as umoci does, since a hardlink has none of its own.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use lode_ext4::{
    BytePath, FileData, FlatInode, FlatTree, InodeId, InodeKind, Meta, Metadata, NAME_MAX, NameId,
    SYMLINK_MAX, Timestamp, TreeError,
};

use crate::tar::{EntryKind, TarEntry};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Caps on what the merged tree may grow to.
#[derive(Debug, Clone)]
pub struct MergeLimits {
    /// Longest entry path or link target, in bytes.
    pub max_path_bytes: usize,
    /// Most entries applied, across all layers, counting each directory
    /// an entry's path implies (a missing parent) as one more.
    pub max_entries: u64,
    /// Most components in an entry's path.
    pub max_depth: usize,
    /// Most bytes of names, link targets and xattrs held, across all layers.
    pub max_metadata_bytes: u64,
}

impl Default for MergeLimits {
    fn default() -> Self {
        Self {
            max_path_bytes: 4096,
            max_entries: 4_000_000,
            max_depth: 256,
            max_metadata_bytes: 1 << 30,
        }
    }
}

/// Why an entry was refused.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("path escapes the root with `..`")]
    Escapes,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("name component of {len} bytes is longer than {NAME_MAX}")]
    NameTooLong { len: usize },
    #[error("path of {len} bytes is longer than the cap of {cap}")]
    PathTooLong { len: usize, cap: usize },
    #[error("{parent} is a symlink; an entry may not pass through one")]
    ThroughSymlink { parent: BytePath },
    #[error("{parent} is not a directory")]
    ParentNotDir { parent: BytePath },
    #[error("the root directory can only be replaced by a directory")]
    RootNotDir,
    #[error("whiteout names no file (`.wh.` followed by {name:?})")]
    BadWhiteout { name: String },
    #[error("a whiteout name ({name:?}) is used as a directory")]
    WhiteoutAsDir { name: String },
    #[error("hardlink target {target:?}: {source}")]
    HardlinkTarget {
        target: String,
        source: Box<MergeError>,
    },
    #[error("hardlink target {target} does not exist")]
    HardlinkMissing { target: BytePath },
    #[error("hardlink target {target} is a directory")]
    HardlinkToDir { target: BytePath },
    #[error("symlink target of {len} bytes; it must be 1..={SYMLINK_MAX}")]
    BadSymlink { len: usize },
    #[error("device {major}:{minor} does not fit ext4's 12-bit major / 20-bit minor")]
    BadDevice { major: u32, minor: u32 },
    #[error(
        "xattr {name:?}: only user.*, trusted.*, security.* and system.posix_acl_* can be stored"
    )]
    XattrNamespace { name: String },
    #[error("more than {cap} entries in the image")]
    TooManyEntries { cap: u64 },
    #[error("path of {depth} components is deeper than the cap of {cap}")]
    TooDeep { depth: usize, cap: usize },
    #[error("names, link targets and xattrs exceed the cap of {cap} bytes")]
    MetadataTooLarge { cap: u64 },
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// Splits a tar name into normal components; see the module docs. An empty
/// result is the root.
pub fn normalize(raw: &[u8], max_path: usize) -> Result<Vec<Vec<u8>>, MergeError> {
    if raw.len() > max_path {
        return Err(MergeError::PathTooLong {
            len: raw.len(),
            cap: max_path,
        });
    }
    if raw.contains(&0) {
        return Err(MergeError::Nul);
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                out.pop().ok_or(MergeError::Escapes)?;
            }
            name if name.len() > NAME_MAX => {
                return Err(MergeError::NameTooLong { len: name.len() });
            }
            name => out.push(name.to_vec()),
        }
    }
    Ok(out)
}

fn show(parts: &[Vec<u8>]) -> BytePath {
    BytePath(parts.join(&b'/'))
}

/// "None" in the `u32` links between name records.
const NONE: u32 = u32::MAX;

/// One name in the merged tree: 36 bytes, its bytes in the name arena.
/// A directory's children are a doubly linked list (unordered; they are
/// sorted once, when the tree is handed on), found by name through the
/// index.
#[derive(Debug, Clone, Copy)]
struct Node {
    /// Offset of the name in the merger's name arena.
    at: u32,
    len: u8,
    /// The last layer that created, replaced or passed through this name
    /// (0: none yet).
    touched: u32,
    inode: u32,
    parent: u32,
    first: u32,
    next: u32,
    prev: u32,
    /// The next name whose (parent, name) hash is the same.
    chain: u32,
}

/// The index's keys are already keyed hashes; it uses them as they are.
#[derive(Debug, Default, Clone, Copy)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Metadata of directories no entry describes.
pub fn implicit_dir_meta() -> Metadata {
    Metadata::new(0o755, 0, 0)
}

/// What one path of the merged tree is, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed<'a, D> {
    Dir(&'a Meta),
    /// A non-directory; `ino` tells hardlinked names apart.
    Leaf {
        ino: usize,
        meta: &'a Meta,
        kind: &'a InodeKind<D>,
    },
}

/// The merged tree under construction; see the module docs. Names are
/// records in one vector with their bytes in one arena, and inodes (shared
/// by hardlinked names) in another vector, so an entry costs about 150
/// bytes plus its name, whatever the directory it is in.
#[derive(Debug, Clone)]
pub struct Merger<D> {
    names: Vec<u8>,
    /// Name records; 0 is the root. A removed name's record stays (the
    /// entry cap bounds them all).
    nodes: Vec<Node>,
    /// Keyed hash of (parent, name) to the first record with that hash.
    index: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    keys: RandomState,
    /// 0 is the root directory's.
    inodes: Vec<FlatInode<D>>,
    layer: u32,
    limits: MergeLimits,
    entries: u64,
    metadata_bytes: u64,
    /// Names in the tree now, and their bytes (to size the flat tree).
    live: usize,
    live_bytes: usize,
    /// Directories pruned in this layer: below them is only what this
    /// layer put there, so pruning them again changes nothing (and repeated
    /// opaque markers cost nothing).
    pruned: HashSet<u32>,
}

/// An error from [`Merger::apply`]: the entry's, or the data callback's.
#[derive(Debug)]
pub enum ApplyError<X> {
    Merge(MergeError),
    Data(X),
}

impl<X> From<MergeError> for ApplyError<X> {
    fn from(e: MergeError) -> Self {
        Self::Merge(e)
    }
}

fn clamp(t: Timestamp) -> Timestamp {
    if t.secs < Timestamp::MIN_SECS {
        Timestamp::new(Timestamp::MIN_SECS, 0)
    } else if t.secs > Timestamp::MAX_SECS {
        Timestamp::new(Timestamp::MAX_SECS, 999_999_999)
    } else {
        t
    }
}

/// The inode metadata a tar header describes. Times outside ext4's range
/// (1901..2446) are clamped to it.
fn entry_meta(e: &TarEntry) -> Meta {
    let mtime = clamp(e.mtime);
    Meta::from(&Metadata {
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
        atime: e.atime.map_or(mtime, clamp),
        mtime,
        ctime: e.ctime.map_or(mtime, clamp),
        xattrs: e.xattrs.clone(),
    })
}

fn check_xattrs(e: &TarEntry) -> Result<(), MergeError> {
    for name in e.xattrs.keys() {
        let ok = [&b"user."[..], b"trusted.", b"security."]
            .iter()
            .any(|p| name.starts_with(p) && name.len() > p.len())
            || name == b"system.posix_acl_access"
            || name == b"system.posix_acl_default";
        if !ok {
            return Err(MergeError::XattrNamespace {
                name: name.escape_ascii().to_string(),
            });
        }
    }
    Ok(())
}

fn dir_inode<D>(meta: Meta) -> FlatInode<D> {
    FlatInode {
        meta,
        kind: InodeKind::Dir,
    }
}

impl<D> Merger<D> {
    pub fn new(limits: MergeLimits) -> Self {
        Self {
            names: Vec::new(),
            nodes: vec![Node {
                at: 0,
                len: 0,
                touched: 0,
                inode: 0,
                parent: 0,
                first: NONE,
                next: NONE,
                prev: NONE,
                chain: NONE,
            }],
            index: HashMap::default(),
            keys: RandomState::new(),
            inodes: vec![dir_inode(Meta::from(&implicit_dir_meta()))],
            layer: 0,
            limits,
            entries: 0,
            metadata_bytes: 0,
            live: 0,
            live_bytes: 0,
            pruned: HashSet::new(),
        }
    }

    /// Starts the next layer; whiteouts apply to what came before it.
    pub fn begin_layer(&mut self) {
        self.layer += 1;
        self.pruned.clear();
    }

    /// Counts one entry applied or directory implied against the cap.
    fn count(&mut self) -> Result<(), MergeError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(MergeError::TooManyEntries {
                cap: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Applies one entry of the current layer. `data` is called once, for a
    /// regular file that will be placed, after every check has passed; it
    /// stores the file's contents and returns their handle.
    pub fn apply<X>(
        &mut self,
        e: &TarEntry,
        data: impl FnOnce() -> Result<D, X>,
    ) -> Result<(), ApplyError<X>> {
        self.count()?;
        let xattr_bytes: usize = e.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.metadata_bytes += (e.path.len() + e.link.len() + xattr_bytes) as u64;
        if self.metadata_bytes > self.limits.max_metadata_bytes {
            return Err(MergeError::MetadataTooLarge {
                cap: self.limits.max_metadata_bytes,
            }
            .into());
        }
        let parts = normalize(&e.path, self.limits.max_path_bytes)?;
        if parts.len() > self.limits.max_depth {
            return Err(MergeError::TooDeep {
                depth: parts.len(),
                cap: self.limits.max_depth,
            }
            .into());
        }
        let Some((name, parents)) = parts.split_last() else {
            if e.kind != EntryKind::Dir {
                return Err(MergeError::RootNotDir.into());
            }
            check_xattrs(e)?;
            self.inodes[0].meta = entry_meta(e);
            self.nodes[0].touched = self.layer;
            return Ok(());
        };
        if let Some(p) = parents.iter().find(|p| p.starts_with(WHITEOUT)) {
            return Err(MergeError::WhiteoutAsDir {
                name: p.escape_ascii().to_string(),
            }
            .into());
        }
        if let Some(target) = name.strip_prefix(WHITEOUT) {
            if name == OPAQUE {
                self.opaque(parents)?;
            } else if target.starts_with(WHITEOUT) {
                // aufs metadata (.wh..wh.plnk, .wh..wh.aufs): not a file.
            } else if target.is_empty() || target == b"." || target == b".." {
                return Err(MergeError::BadWhiteout {
                    name: target.escape_ascii().to_string(),
                }
                .into());
            } else {
                self.whiteout(parents, target)?;
            }
            return Ok(());
        }

        check_xattrs(e)?;
        let meta = entry_meta(e);
        let layer = self.layer;
        // Everything that can refuse the entry runs before `data`.
        let leaf = match e.kind {
            EntryKind::Dir => None,
            EntryKind::Hardlink => Some(Err(self.resolve_link(&e.link)?)),
            EntryKind::Symlink => {
                if e.link.is_empty() || e.link.len() > SYMLINK_MAX {
                    return Err(MergeError::BadSymlink { len: e.link.len() }.into());
                }
                Some(Ok(InodeKind::Symlink(e.link.clone().into_boxed_slice())))
            }
            EntryKind::CharDev | EntryKind::BlockDev => {
                let (major, minor) = (e.dev_major, e.dev_minor);
                if major >= 1 << 12 || minor >= 1 << 20 {
                    return Err(MergeError::BadDevice { major, minor }.into());
                }
                Some(Ok(if e.kind == EntryKind::CharDev {
                    InodeKind::CharDev(major, minor)
                } else {
                    InodeKind::BlockDev(major, minor)
                }))
            }
            EntryKind::Fifo => Some(Ok(InodeKind::Fifo)),
            EntryKind::Regular => None,
        };
        let dir = self.make_parents(parents)?;
        let old = self.child(dir, name);
        let inode = match (e.kind, leaf) {
            (EntryKind::Dir, _) => {
                if let Some(old) = old
                    && self.is_dir(old)
                {
                    // A directory over a directory keeps the children.
                    let n = &mut self.nodes[old as usize];
                    n.touched = layer;
                    self.inodes[n.inode as usize].meta = meta;
                    return Ok(());
                }
                self.push_inode(dir_inode(meta))?
            }
            (_, Some(Err(ino))) => ino,
            (_, Some(Ok(kind))) => self.push_inode(FlatInode { meta, kind })?,
            (_, None) => {
                let d = data().map_err(ApplyError::Data)?;
                self.push_inode(FlatInode {
                    meta,
                    kind: InodeKind::File(d),
                })?
            }
        };
        if let Some(old) = old {
            self.remove(old);
        }
        self.add_child(dir, name, inode)?;
        Ok(())
    }

    fn push_inode(&mut self, inode: FlatInode<D>) -> Result<u32, MergeError> {
        let i = u32::try_from(self.inodes.len())
            .ok()
            .filter(|&i| i != NONE)
            .ok_or(MergeError::TooManyEntries {
                cap: u64::from(NONE - 1),
            })?;
        self.inodes.push(inode);
        Ok(i)
    }

    fn name(&self, node: u32) -> &[u8] {
        let n = &self.nodes[node as usize];
        &self.names[n.at as usize..n.at as usize + usize::from(n.len)]
    }

    fn is_dir(&self, node: u32) -> bool {
        matches!(
            self.inodes[self.nodes[node as usize].inode as usize].kind,
            InodeKind::Dir
        )
    }

    fn key(&self, parent: u32, name: &[u8]) -> u64 {
        self.keys.hash_one((parent, name))
    }

    /// The child of directory `dir` called `name`.
    fn child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let mut c = *self.index.get(&self.key(dir, name))?;
        while c != NONE {
            let n = &self.nodes[c as usize];
            if n.parent == dir && self.name(c) == name {
                return Some(c);
            }
            c = n.chain;
        }
        None
    }

    /// The children of `dir`, in name order.
    fn sorted_children(&self, dir: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut c = self.nodes[dir as usize].first;
        while c != NONE {
            out.push(c);
            c = self.nodes[c as usize].next;
        }
        out.sort_unstable_by(|&a, &b| self.name(a).cmp(self.name(b)));
        out
    }

    /// Names `inode` `name` in directory `dir`, touched by this layer.
    fn add_child(&mut self, dir: u32, name: &[u8], inode: u32) -> Result<u32, MergeError> {
        let too_many = MergeError::TooManyEntries {
            cap: u64::from(NONE - 1),
        };
        let id = u32::try_from(self.nodes.len())
            .ok()
            .filter(|&i| i != NONE)
            .ok_or(too_many)?;
        let at = u32::try_from(self.names.len() + name.len()).map_err(|_| {
            MergeError::MetadataTooLarge {
                cap: u64::from(u32::MAX),
            }
        })? - u32::try_from(name.len()).expect("checked against NAME_MAX");
        self.names.extend_from_slice(name);
        self.live += 1;
        self.live_bytes += name.len();
        let key = self.key(dir, name);
        let chain = self.index.insert(key, id).unwrap_or(NONE);
        let next = self.nodes[dir as usize].first;
        if next != NONE {
            self.nodes[next as usize].prev = id;
        }
        self.nodes[dir as usize].first = id;
        self.nodes.push(Node {
            at,
            len: u8::try_from(name.len()).expect("checked against NAME_MAX"),
            touched: self.layer,
            inode,
            parent: dir,
            first: NONE,
            next,
            prev: NONE,
            chain,
        });
        Ok(id)
    }

    /// Removes `node` and everything below it.
    fn remove(&mut self, node: u32) {
        let n = self.nodes[node as usize];
        if n.prev == NONE {
            self.nodes[n.parent as usize].first = n.next;
        } else {
            self.nodes[n.prev as usize].next = n.next;
        }
        if n.next != NONE {
            self.nodes[n.next as usize].prev = n.prev;
        }
        let mut stack = vec![node];
        while let Some(x) = stack.pop() {
            self.unindex(x);
            self.live -= 1;
            self.live_bytes -= usize::from(self.nodes[x as usize].len);
            let mut c = self.nodes[x as usize].first;
            while c != NONE {
                stack.push(c);
                c = self.nodes[c as usize].next;
            }
        }
    }

    fn unindex(&mut self, node: u32) {
        let key = self.key(self.nodes[node as usize].parent, self.name(node));
        let chain = self.nodes[node as usize].chain;
        let head = self.index[&key];
        if head == node {
            if chain == NONE {
                self.index.remove(&key);
            } else {
                self.index.insert(key, chain);
            }
            return;
        }
        let mut c = head;
        while self.nodes[c as usize].chain != node {
            c = self.nodes[c as usize].chain;
        }
        self.nodes[c as usize].chain = chain;
    }

    /// The inode a hardlink target names.
    fn resolve_link(&self, link: &[u8]) -> Result<u32, MergeError> {
        let wrap = |source: MergeError| MergeError::HardlinkTarget {
            target: link.escape_ascii().to_string(),
            source: Box::new(source),
        };
        let parts = normalize(link, self.limits.max_path_bytes).map_err(wrap)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(MergeError::HardlinkToDir {
                target: BytePath(Vec::new()),
            });
        };
        let missing = || MergeError::HardlinkMissing {
            target: show(&parts),
        };
        let dir = match self.find_dir(parents).map_err(wrap)? {
            Some(d) => d,
            None => return Err(missing()),
        };
        match self.child(dir, name) {
            Some(c) if self.is_dir(c) => Err(MergeError::HardlinkToDir {
                target: show(&parts),
            }),
            Some(c) => Ok(self.nodes[c as usize].inode),
            None => Err(missing()),
        }
    }

    fn whiteout(&mut self, parents: &[Vec<u8>], name: &[u8]) -> Result<(), MergeError> {
        if let Some(dir) = self.find_dir(parents)?
            && let Some(c) = self.child(dir, name)
            && !self.prune(c)
        {
            self.remove(c);
        }
        Ok(())
    }

    fn opaque(&mut self, dir: &[Vec<u8>]) -> Result<(), MergeError> {
        if let Some(d) = self.find_dir(dir)?
            && self.pruned.insert(d)
        {
            for c in self.sorted_children(d) {
                if !self.prune(c) {
                    self.remove(c);
                }
            }
        }
        Ok(())
    }

    /// Removes what lower layers put below `node`, keeping what the current
    /// layer touched; returns whether `node` itself stays.
    fn prune(&mut self, node: u32) -> bool {
        let touched = self.nodes[node as usize].touched == self.layer;
        if !self.is_dir(node) || !touched || !self.pruned.insert(node) {
            return touched;
        }
        for c in self.sorted_children(node) {
            if !self.prune(c) {
                self.remove(c);
            }
        }
        true
    }

    fn leaf_refusal(&self, node: u32, parent: &[Vec<u8>]) -> MergeError {
        let inode = self.nodes[node as usize].inode as usize;
        if matches!(self.inodes[inode].kind, InodeKind::Symlink(_)) {
            MergeError::ThroughSymlink {
                parent: show(parent),
            }
        } else {
            MergeError::ParentNotDir {
                parent: show(parent),
            }
        }
    }

    /// The directory at `parts`, creating missing ones as implicit
    /// directories and marking each as touched by this layer.
    fn make_parents(&mut self, parts: &[Vec<u8>]) -> Result<u32, MergeError> {
        let mut dir = 0;
        for (i, p) in parts.iter().enumerate() {
            dir = match self.child(dir, p) {
                Some(c) if self.is_dir(c) => {
                    self.nodes[c as usize].touched = self.layer;
                    c
                }
                Some(c) => return Err(self.leaf_refusal(c, &parts[..=i])),
                None => {
                    self.count()?;
                    let inode = self.push_inode(dir_inode(Meta::from(&implicit_dir_meta())))?;
                    self.add_child(dir, p, inode)?
                }
            };
        }
        Ok(dir)
    }

    /// The directory at `parts` for a whiteout or a hardlink: `None` if a
    /// component is missing or a non-directory, an error if it is a
    /// symlink.
    fn find_dir(&self, parts: &[Vec<u8>]) -> Result<Option<u32>, MergeError> {
        let mut dir = 0;
        for (i, p) in parts.iter().enumerate() {
            dir = match self.child(dir, p) {
                Some(c) if self.is_dir(c) => c,
                Some(c) => {
                    return match self.leaf_refusal(c, &parts[..=i]) {
                        e @ MergeError::ThroughSymlink { .. } => Err(e),
                        _ => Ok(None),
                    };
                }
                None => return Ok(None),
            };
        }
        Ok(Some(dir))
    }

    /// Calls `f` for every path below the root in depth-first name order
    /// (parents before children).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], Listed<'_, D>)) {
        let mut path = Vec::new();
        let mut stack = vec![(self.sorted_children(0), 0usize, 0usize)];
        while let Some((kids, pos, len)) = stack.last_mut() {
            let Some(&c) = kids.get(*pos) else {
                path.truncate(*len);
                stack.pop();
                continue;
            };
            *pos += 1;
            let base = *len;
            path.truncate(base);
            if base > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(self.name(c));
            let ino = self.nodes[c as usize].inode as usize;
            let inode = &self.inodes[ino];
            if matches!(inode.kind, InodeKind::Dir) {
                f(&path, Listed::Dir(&inode.meta));
                let (kids, len) = (self.sorted_children(c), path.len());
                stack.push((kids, 0, len));
            } else {
                f(
                    &path,
                    Listed::Leaf {
                        ino,
                        meta: &inode.meta,
                        kind: &inode.kind,
                    },
                );
            }
        }
    }

    /// The root directory's metadata.
    pub fn root_meta(&self) -> &Meta {
        &self.inodes[0].meta
    }
}

impl Merger<FileData> {
    /// Hands the merged tree to the writer: each directory's children
    /// sorted by name, and each inode owned by its first name in
    /// depth-first name order, its other names marked as further names
    /// (hardlinks) of it.
    pub fn into_flat(self) -> Result<FlatTree, MergeError> {
        let Self {
            mut names,
            mut nodes,
            index,
            mut inodes,
            live,
            live_bytes,
            ..
        } = self;
        // Both trees are held at once here: give back the growth slack of
        // the vectors first (shrinking reallocates in place).
        drop(index);
        names.shrink_to_fit();
        nodes.shrink_to_fit();
        inodes.shrink_to_fit();
        let name = |c: u32| {
            let n = &nodes[c as usize];
            &names[n.at as usize..n.at as usize + usize::from(n.len)]
        };
        let sorted = |dir: u32| {
            let mut out = Vec::new();
            let mut c = nodes[dir as usize].first;
            while c != NONE {
                out.push(c);
                c = nodes[c as usize].next;
            }
            out.sort_unstable_by(|&a, &b| name(a).cmp(name(b)));
            out
        };
        let mut owned = vec![false; inodes.len()];
        owned[0] = true;
        let mut flat = FlatTree::new(inodes, InodeId(0))?;
        flat.reserve(live, live_bytes);
        let kids = sorted(0);
        let first = flat.add_children(
            FlatTree::ROOT,
            kids.iter()
                .map(|&c| (name(c), InodeId(nodes[c as usize].inode))),
        )?;
        let mut stack = vec![(kids, first, 0usize)];
        while let Some((kids, first, pos)) = stack.last_mut() {
            let Some(&c) = kids.get(*pos) else {
                stack.pop();
                continue;
            };
            let at = NameId(first.0 + u32::try_from(*pos).expect("below the node count"));
            *pos += 1;
            let inode = nodes[c as usize].inode;
            if std::mem::replace(&mut owned[inode as usize], true) {
                flat.set_link(at, InodeId(inode));
            }
            if flat.is_dir(at) {
                let kids = sorted(c);
                let first = flat.add_children(
                    at,
                    kids.iter()
                        .map(|&c| (name(c), InodeId(nodes[c as usize].inode))),
                )?;
                stack.push((kids, first, 0));
            }
        }
        Ok(flat)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    fn entry(path: &str, kind: EntryKind) -> TarEntry {
        TarEntry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: Timestamp::new(1, 0),
            atime: None,
            ctime: None,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            size: 0,
            xattrs: BTreeMap::new(),
            sparse: None,
            offset: 0,
        }
    }

    fn link(path: &str, kind: EntryKind, target: &str) -> TarEntry {
        TarEntry {
            link: target.as_bytes().to_vec(),
            ..entry(path, kind)
        }
    }

    fn add(m: &mut Merger<u32>, e: &TarEntry, content: u32) -> Result<(), MergeError> {
        m.apply(e, || Ok::<_, ()>(content)).map_err(|e| match e {
            ApplyError::Merge(e) => e,
            ApplyError::Data(()) => unreachable!(),
        })
    }

    /// path → (kind, canonical inode) for comparisons.
    fn listing(m: &Merger<u32>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut names: HashMap<usize, String> = HashMap::new();
        m.for_each(|path, item| {
            let p = String::from_utf8_lossy(path).into_owned();
            let desc = match item {
                Listed::Dir(meta) => format!("dir {:o}", meta.mode()),
                Listed::Leaf { ino, kind, .. } => {
                    let first = names.entry(ino).or_insert_with(|| p.clone()).clone();
                    format!("{kind:?} inode of {first}")
                }
            };
            out.push((p, desc));
        });
        out
    }

    fn paths(m: &Merger<u32>) -> Vec<String> {
        listing(m).into_iter().map(|(p, _)| p).collect()
    }

    #[test]
    fn normalizes_names() {
        let n = |s: &str| {
            normalize(s.as_bytes(), 4096).map(|v| {
                v.iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            })
        };
        assert_eq!(n("./a/b/").unwrap(), "a/b");
        assert_eq!(n("/a//./b").unwrap(), "a/b");
        assert_eq!(n("a/../b").unwrap(), "b");
        assert_eq!(n("./").unwrap(), "");
        assert_eq!(
            n("../a").unwrap_err().to_string(),
            "path escapes the root with `..`"
        );
        assert!(matches!(n("a/../../b"), Err(MergeError::Escapes)));
        assert_eq!(
            n(&"x".repeat(256)).unwrap_err().to_string(),
            "name component of 256 bytes is longer than 255"
        );
        assert!(matches!(
            normalize(&[b'a'; 10], 9),
            Err(MergeError::PathTooLong { len: 10, cap: 9 })
        ));
        assert!(matches!(normalize(b"a\0b", 10), Err(MergeError::Nul)));
    }

    #[test]
    fn whiteouts_keep_what_this_layer_added() {
        let mut m = Merger::new(MergeLimits::default());
        m.begin_layer();
        add(&mut m, &entry("d/", EntryKind::Dir), 0).unwrap();
        add(&mut m, &entry("d/old", EntryKind::Regular), 1).unwrap();
        add(&mut m, &entry("d/sub/x", EntryKind::Regular), 2).unwrap();
        add(&mut m, &entry("f", EntryKind::Regular), 3).unwrap();
        m.begin_layer();
        // The new entries come before the markers in tar order.
        add(&mut m, &entry("d/new", EntryKind::Regular), 4).unwrap();
        add(&mut m, &entry("d/sub/y", EntryKind::Regular), 5).unwrap();
        add(&mut m, &entry("d/.wh..wh..opq", EntryKind::Regular), 0).unwrap();
        add(&mut m, &entry("f", EntryKind::Regular), 6).unwrap();
        add(&mut m, &entry(".wh.f", EntryKind::Regular), 0).unwrap();
        add(&mut m, &entry(".wh.missing", EntryKind::Regular), 0).unwrap();
        add(&mut m, &entry("nodir/.wh.x", EntryKind::Regular), 0).unwrap();
        add(&mut m, &entry("d/.wh..wh.plnk", EntryKind::Regular), 0).unwrap();
        assert_eq!(paths(&m), ["d", "d/new", "d/sub", "d/sub/y", "f"]);
        m.begin_layer();
        add(&mut m, &entry(".wh.d", EntryKind::Regular), 0).unwrap();
        assert_eq!(paths(&m), ["f"]);
    }

    #[test]
    fn hardlinks_outlive_their_first_name() {
        let mut m = Merger::new(MergeLimits::default());
        m.begin_layer();
        add(&mut m, &entry("a", EntryKind::Regular), 1).unwrap();
        add(&mut m, &link("b", EntryKind::Hardlink, "./a"), 0).unwrap();
        m.begin_layer();
        add(&mut m, &link("c", EntryKind::Hardlink, "/b"), 0).unwrap();
        add(&mut m, &entry(".wh.a", EntryKind::Regular), 0).unwrap();
        add(&mut m, &entry("b", EntryKind::Regular), 2).unwrap();
        let l = listing(&m);
        assert_eq!(l[0], ("b".into(), "File(2) inode of b".into()));
        assert_eq!(l[1], ("c".into(), "File(1) inode of c".into()));
        let err = add(&mut m, &link("d", EntryKind::Hardlink, "a"), 0).unwrap_err();
        assert_eq!(err.to_string(), "hardlink target /a does not exist");
        add(&mut m, &entry("dir/", EntryKind::Dir), 0).unwrap();
        let err = add(&mut m, &link("d", EntryKind::Hardlink, "dir"), 0).unwrap_err();
        assert_eq!(err.to_string(), "hardlink target /dir is a directory");
        let err = add(&mut m, &link("d", EntryKind::Hardlink, "../etc/passwd"), 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hardlink target \"../etc/passwd\": path escapes the root with `..`"
        );
    }

    #[test]
    fn refuses_paths_through_symlinks_and_files() {
        let mut m = Merger::new(MergeLimits::default());
        m.begin_layer();
        add(&mut m, &link("lib", EntryKind::Symlink, "/usr/lib"), 0).unwrap();
        add(&mut m, &entry("f", EntryKind::Regular), 0).unwrap();
        let err = add(&mut m, &entry("lib/x", EntryKind::Regular), 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/lib is a symlink; an entry may not pass through one"
        );
        let err = add(&mut m, &entry("lib/.wh.x", EntryKind::Regular), 0).unwrap_err();
        assert!(matches!(err, MergeError::ThroughSymlink { .. }));
        let err = add(&mut m, &link("h", EntryKind::Hardlink, "lib/x"), 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hardlink target \"lib/x\": /lib is a symlink; an entry may not pass through one"
        );
        let err = add(&mut m, &entry("f/x", EntryKind::Regular), 0).unwrap_err();
        assert_eq!(err.to_string(), "/f is not a directory");
        let err = add(&mut m, &entry("./", EntryKind::Regular), 0).unwrap_err();
        assert!(matches!(err, MergeError::RootNotDir));
        let err = add(&mut m, &entry(".wh.a/b", EntryKind::Regular), 0).unwrap_err();
        assert!(matches!(err, MergeError::WhiteoutAsDir { .. }));
        let err = add(&mut m, &entry("x/.wh..", EntryKind::Regular), 0).unwrap_err();
        assert!(matches!(err, MergeError::BadWhiteout { .. }));
        let mut e = entry("x", EntryKind::Regular);
        e.xattrs.insert(b"system.foo".to_vec(), b"1".to_vec());
        assert!(matches!(
            add(&mut m, &e, 0).unwrap_err(),
            MergeError::XattrNamespace { .. }
        ));
    }

    #[test]
    fn caps_entries_and_metadata() {
        let mut m = Merger::new(MergeLimits {
            max_entries: 2,
            ..MergeLimits::default()
        });
        m.begin_layer();
        add(&mut m, &entry("a", EntryKind::Regular), 0).unwrap();
        add(&mut m, &entry("a", EntryKind::Regular), 0).unwrap();
        let err = add(&mut m, &entry("a", EntryKind::Regular), 0).unwrap_err();
        assert_eq!(err.to_string(), "more than 2 entries in the image");
        let mut m = Merger::new(MergeLimits {
            max_metadata_bytes: 3,
            ..MergeLimits::default()
        });
        m.begin_layer();
        let err = add(&mut m, &entry("abcd", EntryKind::Regular), 0).unwrap_err();
        assert!(matches!(err, MergeError::MetadataTooLarge { cap: 3 }));
    }

    // ---- a second, flat implementation of the same rules, as the model ----

    #[derive(Debug, Clone)]
    enum Op {
        Dir(String, u32),
        File(String, u32),
        Symlink(String),
        Link(String, String),
        Whiteout(String),
        Opaque(String),
    }

    #[derive(Debug, Clone, PartialEq)]
    enum MKind {
        Dir(u32),
        Leaf(String),
    }

    #[derive(Debug, Default)]
    struct Model {
        map: BTreeMap<String, (MKind, usize)>,
        upper: HashSet<String>,
        next: usize,
    }

    fn prefixes(p: &str) -> Vec<String> {
        let parts: Vec<&str> = p.split('/').collect();
        (1..parts.len()).map(|i| parts[..i].join("/")).collect()
    }

    fn is_sym(k: &MKind) -> bool {
        matches!(k, MKind::Leaf(s) if s.starts_with("Symlink"))
    }

    impl Model {
        fn under(&self, p: &str) -> Vec<String> {
            self.map
                .keys()
                .filter(|k| *k == p || k.starts_with(&format!("{p}/")))
                .cloned()
                .collect()
        }

        /// Walks `dirs` for a whiteout or hardlink: Err on a symlink,
        /// Ok(false) if missing or not a directory.
        fn walk(&self, dirs: &[String]) -> Result<bool, &'static str> {
            for q in dirs {
                match self.map.get(q) {
                    Some((MKind::Dir(_), _)) => {}
                    Some((k, _)) if is_sym(k) => return Err("symlink"),
                    _ => return Ok(false),
                }
            }
            Ok(true)
        }

        fn rm(&mut self, q: &str) {
            if !self.upper.contains(q) {
                for k in self.under(q) {
                    self.map.remove(&k);
                }
            } else if matches!(self.map.get(q), Some((MKind::Dir(_), _))) {
                let children: Vec<String> = self
                    .under(q)
                    .into_iter()
                    .filter(|k| k.len() > q.len() && !k[q.len() + 1..].contains('/'))
                    .collect();
                for c in children {
                    self.rm(&c);
                }
            }
        }

        fn apply(&mut self, op: &Op) -> Result<(), &'static str> {
            match op {
                Op::Whiteout(p) => {
                    if self.walk(&prefixes(p))? && self.map.contains_key(p) {
                        self.rm(p);
                    }
                    Ok(())
                }
                Op::Opaque(d) => {
                    let mut all = prefixes(d);
                    all.push(d.clone());
                    if self.walk(&all)? {
                        let children: Vec<String> = self
                            .under(d)
                            .into_iter()
                            .filter(|k| k.len() > d.len() && !k[d.len() + 1..].contains('/'))
                            .collect();
                        for c in children {
                            self.rm(&c);
                        }
                    }
                    Ok(())
                }
                _ => {
                    let (p, new) = match op {
                        Op::Dir(p, mode) => (p, Some(MKind::Dir(*mode))),
                        Op::File(p, c) => (p, Some(MKind::Leaf(format!("File({c})")))),
                        Op::Symlink(p) => (p, Some(MKind::Leaf("Symlink([116])".into()))),
                        Op::Link(p, _) => (p, None),
                        _ => unreachable!(),
                    };
                    let linked = if let Op::Link(_, t) = op {
                        if !self.walk(&prefixes(t))? {
                            return Err("missing");
                        }
                        match self.map.get(t) {
                            None => return Err("missing"),
                            Some((MKind::Dir(_), _)) => return Err("todir"),
                            Some((k, ino)) => Some((k.clone(), *ino)),
                        }
                    } else {
                        None
                    };
                    for q in prefixes(p) {
                        match self.map.get(&q) {
                            Some((MKind::Dir(_), _)) => {}
                            Some((k, _)) if is_sym(k) => return Err("symlink"),
                            Some(_) => return Err("notdir"),
                            None => {
                                self.map.insert(q.clone(), (MKind::Dir(0o755), usize::MAX));
                            }
                        }
                        self.upper.insert(q);
                    }
                    self.upper.insert(p.clone());
                    let (kind, ino) = match (new, linked) {
                        (Some(k), _) => {
                            self.next += 1;
                            (k, self.next)
                        }
                        (None, Some(l)) => l,
                        (None, None) => unreachable!(),
                    };
                    let dir_over_dir = matches!(
                        (&kind, self.map.get(p)),
                        (MKind::Dir(_), Some((MKind::Dir(_), _)))
                    );
                    if !dir_over_dir {
                        for k in self.under(p) {
                            self.map.remove(&k);
                        }
                    }
                    self.map.insert(p.clone(), (kind, ino));
                    Ok(())
                }
            }
        }

        fn listing(&self) -> Vec<(String, String)> {
            let mut names: HashMap<usize, String> = HashMap::new();
            self.map
                .iter()
                .map(|(p, (k, ino))| {
                    let desc = match k {
                        MKind::Dir(mode) => format!("dir {mode:o}"),
                        MKind::Leaf(s) => {
                            let first = names.entry(*ino).or_insert_with(|| p.clone()).clone();
                            format!("{s} inode of {first}")
                        }
                    };
                    (p.clone(), desc)
                })
                .collect()
        }
    }

    fn to_entry(op: &Op) -> TarEntry {
        match op {
            Op::Dir(p, mode) => TarEntry {
                mode: *mode,
                ..entry(p, EntryKind::Dir)
            },
            Op::File(p, _) => entry(p, EntryKind::Regular),
            Op::Symlink(p) => link(p, EntryKind::Symlink, "t"),
            Op::Link(p, t) => link(p, EntryKind::Hardlink, t),
            Op::Whiteout(p) => {
                let (dir, name) = p.rsplit_once('/').map_or(("", p.as_str()), |(d, n)| (d, n));
                entry(&format!("{dir}/.wh.{name}"), EntryKind::Regular)
            }
            Op::Opaque(d) => entry(&format!("{d}/.wh..wh..opq"), EntryKind::Regular),
        }
    }

    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof!["a", "b", "c"], 1..4).prop_map(|v| v.join("/"))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (path(), prop_oneof![Just(0o755u32), Just(0o700)]).prop_map(|(p, m)| Op::Dir(p, m)),
            4 => (path(), 0u32..100).prop_map(|(p, c)| Op::File(p, c)),
            1 => path().prop_map(Op::Symlink),
            2 => (path(), path()).prop_map(|(p, t)| Op::Link(p, t)),
            2 => path().prop_map(Op::Whiteout),
            1 => path().prop_map(Op::Opaque),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// The tree merge and the flat model agree on every sequence of
        /// layers: the same paths, kinds, contents and hardlink groups, or
        /// both refuse the same entry.
        #[test]
        fn merge_matches_flat_model(
            layers in proptest::collection::vec(proptest::collection::vec(op(), 0..10), 1..5)
        ) {
            let mut m = Merger::new(MergeLimits::default());
            let mut model = Model::default();
            'outer: for layer in &layers {
                m.begin_layer();
                model.upper.clear();
                for op in layer {
                    let content = if let Op::File(_, c) = op { *c } else { 0 };
                    let got = add(&mut m, &to_entry(op), content);
                    let want = model.apply(op);
                    prop_assert_eq!(got.is_err(), want.is_err(), "{:?}: {:?} vs {:?}", op, got, want);
                    if got.is_err() {
                        break 'outer;
                    }
                }
            }
            prop_assert_eq!(listing(&m), model.listing());
        }

        /// Normalised names have no empty, `.` or `..` components, and
        /// normalising again changes nothing.
        #[test]
        fn normalize_is_clean_and_idempotent(
            parts in proptest::collection::vec(
                prop_oneof![Just(""), Just("."), Just(".."), Just("a"), Just("b"), Just(".wh.x")],
                0..8,
            ),
            lead in prop_oneof![Just(""), Just("/"), Just("./"), Just("//")],
        ) {
            let raw = format!("{lead}{}", parts.join("/"));
            match normalize(raw.as_bytes(), 4096) {
                Ok(v) => {
                    prop_assert!(v.iter().all(|c| !c.is_empty() && c != b"." && c != b".."));
                    let again = normalize(&v.join(&b'/'), 4096).unwrap();
                    prop_assert_eq!(again, v);
                }
                Err(e) => {
                    prop_assert!(matches!(e, MergeError::Escapes));
                    let mut depth: i32 = 0;
                    let mut escaped = false;
                    for p in &parts {
                        match *p {
                            "" | "." => {}
                            ".." => { depth -= 1; escaped |= depth < 0; }
                            _ => depth += 1,
                        }
                    }
                    prop_assert!(escaped);
                }
            }
        }
    }
}
