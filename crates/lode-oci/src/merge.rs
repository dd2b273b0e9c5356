//! Layer merge: applies tar entries, layer by layer, to one file tree with
//! the OCI image-spec semantics, then hands the result to lode-ext4.
//!
//! The merge keeps its own tree rather than editing a [`lode_ext4::Tree`]
//! directly, because a hardlink is an inode shared by several names: when
//! a later layer removes or replaces one name, the others must keep the
//! inode (overlayfs and every unpacker behave so). Here a leaf names an
//! inode in a table; [`Merger::into_tree`] gives each inode to the first of
//! its names in depth-first name order and makes the others
//! [`lode_ext4::Entry::Hardlink`]s to it.
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

use std::collections::BTreeMap;

use lode_ext4::{BytePath, Entry, Metadata, NAME_MAX, SYMLINK_MAX, Timestamp, Tree, TreeError};

use crate::tar::{EntryKind, TarEntry};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Caps on what the merged tree may grow to.
#[derive(Debug, Clone)]
pub struct MergeLimits {
    /// Longest entry path or link target, in bytes.
    pub max_path_bytes: usize,
    /// Most entries applied, across all layers.
    pub max_entries: u64,
    /// Most bytes of names, link targets and xattrs held, across all layers.
    pub max_metadata_bytes: u64,
}

impl Default for MergeLimits {
    fn default() -> Self {
        Self {
            max_path_bytes: 4096,
            max_entries: 4_000_000,
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

/// What a non-directory inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeafKind<D> {
    File(D),
    Symlink(Vec<u8>),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
struct Inode<D> {
    meta: Metadata,
    kind: LeafKind<D>,
}

#[derive(Debug, Clone)]
struct DirNode {
    meta: Metadata,
    /// The last layer that created, replaced or passed through this
    /// directory (0: none yet).
    touched: u32,
    children: BTreeMap<Vec<u8>, Node>,
}

#[derive(Debug, Clone)]
enum Node {
    Dir(DirNode),
    Leaf { ino: usize, touched: u32 },
}

/// Metadata of directories no entry describes.
pub fn implicit_dir_meta() -> Metadata {
    Metadata::new(0o755, 0, 0)
}

/// What one path of the merged tree is, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed<'a, D> {
    Dir(&'a Metadata),
    /// A non-directory; `ino` tells hardlinked names apart.
    Leaf {
        ino: usize,
        meta: &'a Metadata,
        kind: &'a LeafKind<D>,
    },
}

/// The merged tree under construction; see the module docs.
#[derive(Debug, Clone)]
pub struct Merger<D> {
    root: DirNode,
    inodes: Vec<Inode<D>>,
    layer: u32,
    limits: MergeLimits,
    entries: u64,
    metadata_bytes: u64,
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
fn entry_meta(e: &TarEntry) -> Metadata {
    let mtime = clamp(e.mtime);
    Metadata {
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
        atime: e.atime.map_or(mtime, clamp),
        mtime,
        ctime: e.ctime.map_or(mtime, clamp),
        xattrs: e.xattrs.clone(),
    }
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

impl<D: Clone> Merger<D> {
    pub fn new(limits: MergeLimits) -> Self {
        Self {
            root: DirNode {
                meta: implicit_dir_meta(),
                touched: 0,
                children: BTreeMap::new(),
            },
            inodes: Vec::new(),
            layer: 0,
            limits,
            entries: 0,
            metadata_bytes: 0,
        }
    }

    /// Starts the next layer; whiteouts apply to what came before it.
    pub fn begin_layer(&mut self) {
        self.layer += 1;
    }

    /// Applies one entry of the current layer. `data` is called once, for a
    /// regular file that will be placed, after every check has passed; it
    /// stores the file's contents and returns their handle.
    pub fn apply<X>(
        &mut self,
        e: &TarEntry,
        data: impl FnOnce() -> Result<D, X>,
    ) -> Result<(), ApplyError<X>> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(MergeError::TooManyEntries {
                cap: self.limits.max_entries,
            }
            .into());
        }
        let xattr_bytes: usize = e.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.metadata_bytes += (e.path.len() + e.link.len() + xattr_bytes) as u64;
        if self.metadata_bytes > self.limits.max_metadata_bytes {
            return Err(MergeError::MetadataTooLarge {
                cap: self.limits.max_metadata_bytes,
            }
            .into());
        }
        let parts = normalize(&e.path, self.limits.max_path_bytes)?;
        let Some((name, parents)) = parts.split_last() else {
            if e.kind != EntryKind::Dir {
                return Err(MergeError::RootNotDir.into());
            }
            check_xattrs(e)?;
            self.root.meta = entry_meta(e);
            self.root.touched = self.layer;
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
                Some(Ok(LeafKind::Symlink(e.link.clone())))
            }
            EntryKind::CharDev | EntryKind::BlockDev => {
                let (major, minor) = (e.dev_major, e.dev_minor);
                if major >= 1 << 12 || minor >= 1 << 20 {
                    return Err(MergeError::BadDevice { major, minor }.into());
                }
                Some(Ok(if e.kind == EntryKind::CharDev {
                    LeafKind::CharDev(major, minor)
                } else {
                    LeafKind::BlockDev(major, minor)
                }))
            }
            EntryKind::Fifo => Some(Ok(LeafKind::Fifo)),
            EntryKind::Regular => None,
        };
        let Self { root, inodes, .. } = self;
        let dir = make_parents(root, inodes, parents, layer)?;
        let node = match (e.kind, leaf) {
            (EntryKind::Dir, _) => match dir.children.remove(name) {
                Some(Node::Dir(old)) => Node::Dir(DirNode {
                    meta,
                    touched: layer,
                    children: old.children,
                }),
                _ => Node::Dir(DirNode {
                    meta,
                    touched: layer,
                    children: BTreeMap::new(),
                }),
            },
            (_, Some(Err(ino))) => Node::Leaf {
                ino,
                touched: layer,
            },
            (_, Some(Ok(kind))) => {
                inodes.push(Inode { meta, kind });
                Node::Leaf {
                    ino: inodes.len() - 1,
                    touched: layer,
                }
            }
            (_, None) => {
                let d = data().map_err(ApplyError::Data)?;
                inodes.push(Inode {
                    meta,
                    kind: LeafKind::File(d),
                });
                Node::Leaf {
                    ino: inodes.len() - 1,
                    touched: layer,
                }
            }
        };
        dir.children.insert(name.clone(), node);
        Ok(())
    }

    /// The inode a hardlink target names.
    fn resolve_link(&self, link: &[u8]) -> Result<usize, MergeError> {
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
        let dir = match find_dir(&self.root, &self.inodes, parents).map_err(wrap)? {
            Some(d) => d,
            None => return Err(missing()),
        };
        match dir.children.get(name) {
            Some(Node::Leaf { ino, .. }) => Ok(*ino),
            Some(Node::Dir(_)) => Err(MergeError::HardlinkToDir {
                target: show(&parts),
            }),
            None => Err(missing()),
        }
    }

    fn whiteout(&mut self, parents: &[Vec<u8>], name: &[u8]) -> Result<(), MergeError> {
        let layer = self.layer;
        let Self { root, inodes, .. } = self;
        let Some(dir) = find_dir_mut(root, inodes, parents)? else {
            return Ok(());
        };
        if let Some(node) = dir.children.get_mut(name)
            && !prune(node, layer)
        {
            dir.children.remove(name);
        }
        Ok(())
    }

    fn opaque(&mut self, dir: &[Vec<u8>]) -> Result<(), MergeError> {
        let layer = self.layer;
        let Self { root, inodes, .. } = self;
        if let Some(d) = find_dir_mut(root, inodes, dir)? {
            d.children.retain(|_, n| prune(n, layer));
        }
        Ok(())
    }

    /// Calls `f` for every path below the root in depth-first name order
    /// (parents before children).
    pub fn for_each(&self, mut f: impl FnMut(&[u8], Listed<'_, D>)) {
        fn walk<D>(
            dir: &DirNode,
            inodes: &[Inode<D>],
            path: &mut Vec<u8>,
            f: &mut impl FnMut(&[u8], Listed<'_, D>),
        ) {
            for (name, node) in &dir.children {
                let len = path.len();
                if len > 0 {
                    path.push(b'/');
                }
                path.extend_from_slice(name);
                match node {
                    Node::Dir(d) => {
                        f(path, Listed::Dir(&d.meta));
                        walk(d, inodes, path, f);
                    }
                    Node::Leaf { ino, .. } => {
                        let i = &inodes[*ino];
                        f(
                            path,
                            Listed::Leaf {
                                ino: *ino,
                                meta: &i.meta,
                                kind: &i.kind,
                            },
                        );
                    }
                }
                path.truncate(len);
            }
        }
        walk(&self.root, &self.inodes, &mut Vec::new(), &mut f);
    }

    /// The root directory's metadata.
    pub fn root_meta(&self) -> &Metadata {
        &self.root.meta
    }
}

impl Merger<lode_ext4::FileData> {
    /// Builds the image tree: each inode goes to its first name in
    /// depth-first name order, its other names become hardlinks to it.
    pub fn into_tree(self) -> Result<Tree, MergeError> {
        let mut tree = Tree::new(implicit_dir_meta());
        tree.set_root(self.root.meta.clone())?;
        let mut first: Vec<Option<Vec<u8>>> = vec![None; self.inodes.len()];
        let mut result = Ok(());
        self.for_each(|path, item| {
            if result.is_err() {
                return;
            }
            let entry = match item {
                Listed::Dir(meta) => Entry::Dir(meta.clone()),
                Listed::Leaf { ino, meta, kind } => match &first[ino] {
                    Some(target) => Entry::Hardlink {
                        target: target.clone(),
                    },
                    None => {
                        first[ino] = Some(path.to_vec());
                        let meta = meta.clone();
                        match kind {
                            LeafKind::File(data) => Entry::File {
                                meta,
                                data: data.clone(),
                            },
                            LeafKind::Symlink(t) => Entry::Symlink {
                                meta,
                                target: t.clone(),
                            },
                            LeafKind::CharDev(major, minor) => Entry::CharDev {
                                meta,
                                major: *major,
                                minor: *minor,
                            },
                            LeafKind::BlockDev(major, minor) => Entry::BlockDev {
                                meta,
                                major: *major,
                                minor: *minor,
                            },
                            LeafKind::Fifo => Entry::Fifo(meta),
                        }
                    }
                },
            };
            result = tree.insert(path, entry);
        });
        result?;
        Ok(tree)
    }
}

/// Removes what lower layers put at `node`, keeping what the current layer
/// touched; returns whether `node` itself stays.
fn prune(node: &mut Node, layer: u32) -> bool {
    match node {
        Node::Leaf { touched, .. } => *touched == layer,
        Node::Dir(d) if d.touched == layer => {
            d.children.retain(|_, n| prune(n, layer));
            true
        }
        Node::Dir(_) => false,
    }
}

fn leaf_refusal<D>(inodes: &[Inode<D>], ino: usize, parent: &[Vec<u8>]) -> MergeError {
    if matches!(inodes[ino].kind, LeafKind::Symlink(_)) {
        MergeError::ThroughSymlink {
            parent: show(parent),
        }
    } else {
        MergeError::ParentNotDir {
            parent: show(parent),
        }
    }
}

/// The directory at `parts`, creating missing ones as implicit directories
/// and marking each as touched by `layer`.
fn make_parents<'a, D>(
    root: &'a mut DirNode,
    inodes: &[Inode<D>],
    parts: &[Vec<u8>],
    layer: u32,
) -> Result<&'a mut DirNode, MergeError> {
    let mut dir = root;
    for (i, p) in parts.iter().enumerate() {
        let node = dir.children.entry(p.clone()).or_insert_with(|| {
            Node::Dir(DirNode {
                meta: implicit_dir_meta(),
                touched: layer,
                children: BTreeMap::new(),
            })
        });
        dir = match node {
            Node::Dir(d) => {
                d.touched = layer;
                d
            }
            Node::Leaf { ino, .. } => return Err(leaf_refusal(inodes, *ino, &parts[..=i])),
        };
    }
    Ok(dir)
}

/// The directory at `parts` for a whiteout: `None` if a component is
/// missing or a non-directory (nothing to remove), an error if it is a
/// symlink.
fn find_dir_mut<'a, D>(
    root: &'a mut DirNode,
    inodes: &[Inode<D>],
    parts: &[Vec<u8>],
) -> Result<Option<&'a mut DirNode>, MergeError> {
    let mut dir = root;
    for (i, p) in parts.iter().enumerate() {
        dir = match dir.children.get_mut(p) {
            Some(Node::Dir(d)) => d,
            Some(Node::Leaf { ino, .. }) => {
                return match leaf_refusal(inodes, *ino, &parts[..=i]) {
                    e @ MergeError::ThroughSymlink { .. } => Err(e),
                    _ => Ok(None),
                };
            }
            None => return Ok(None),
        };
    }
    Ok(Some(dir))
}

/// Like [`find_dir_mut`], read-only.
fn find_dir<'a, D>(
    root: &'a DirNode,
    inodes: &[Inode<D>],
    parts: &[Vec<u8>],
) -> Result<Option<&'a DirNode>, MergeError> {
    let mut dir = root;
    for (i, p) in parts.iter().enumerate() {
        dir = match dir.children.get(p) {
            Some(Node::Dir(d)) => d,
            Some(Node::Leaf { ino, .. }) => {
                return match leaf_refusal(inodes, *ino, &parts[..=i]) {
                    e @ MergeError::ThroughSymlink { .. } => Err(e),
                    _ => Ok(None),
                };
            }
            None => return Ok(None),
        };
    }
    Ok(Some(dir))
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
                Listed::Dir(meta) => format!("dir {:o}", meta.mode),
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
