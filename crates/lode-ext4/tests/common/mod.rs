//! Shared harness for the system tests: describe a tree as a [`Spec`], build
//! its image, check it with `e2fsck -fn`, read it back through a read-only
//! kernel mount and through `ext4-view`, and compare with the spec.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use lode_ext4::{Entry, Ext4Writer, FileData, Metadata, Options, Summary, Timestamp, Tree};
use lode_testkit::{LoopMount, e2fsck_clean};

/// What one path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
    Hardlink(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct Item {
    pub path: Vec<u8>,
    pub kind: Kind,
    pub meta: Metadata,
    /// The layer whose region holds a file's bytes.
    pub layer: usize,
    /// Appended to its region but left out of the tree, as when an upper
    /// layer's whiteout hides it.
    pub hidden: bool,
}

/// A tree to build: items in insertion order (parents first).
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub root: Metadata,
    pub items: Vec<Item>,
    pub layers: usize,
}

impl Spec {
    pub fn new(layers: usize) -> Self {
        Self {
            root: Metadata::new(0o755, 0, 0).with_times(Timestamp::new(1_700_000_000, 5)),
            layers,
            ..Self::default()
        }
    }

    pub fn add(&mut self, path: &str, kind: Kind, meta: Metadata) -> &mut Self {
        self.add_in(0, path, kind, meta)
    }

    pub fn add_in(&mut self, layer: usize, path: &str, kind: Kind, meta: Metadata) -> &mut Self {
        self.items.push(Item {
            path: path.as_bytes().to_vec(),
            kind,
            meta,
            layer,
            hidden: false,
        });
        self
    }

    /// Hides the file at `path` (a whiteout): its bytes stay in its region.
    pub fn hide(&mut self, path: &str) -> &mut Self {
        for it in &mut self.items {
            if it.path == path.as_bytes() {
                it.hidden = true;
            }
        }
        self
    }
}

pub fn meta(mode: u32, uid: u32, gid: u32) -> Metadata {
    Metadata::new(mode, uid, gid).with_times(Timestamp::new(1_600_000_000, 123_456_789))
}

/// Builds `spec` into `out` and returns the summary.
pub fn build(spec: &Spec, opts: Options, out: &Path) -> Summary {
    let file = File::create(out).expect("create image");
    let mut w = Ext4Writer::new(file, opts).expect("writer");
    let mut data: HashMap<Vec<u8>, FileData> = HashMap::new();
    for layer in 0..spec.layers {
        w.begin_region().expect("region");
        for it in spec.items.iter().filter(|i| i.layer == layer) {
            if let Kind::File(c) = &it.kind {
                let d = w.append_file(&mut &c[..], c.len() as u64).expect("append");
                data.insert(it.path.clone(), d);
            }
        }
    }
    let tree = tree_of(spec, &data);
    let (_, summary) = w.finish(&tree).expect("finish");
    summary
}

pub fn tree_of(spec: &Spec, data: &HashMap<Vec<u8>, FileData>) -> Tree {
    let mut tree = Tree::new(spec.root.clone());
    for it in spec.items.iter().filter(|i| !i.hidden) {
        let m = it.meta.clone();
        let e = match &it.kind {
            Kind::File(_) => Entry::File {
                meta: m,
                data: data[&it.path].clone(),
            },
            Kind::Dir => Entry::Dir(m),
            Kind::Symlink(t) => Entry::Symlink {
                meta: m,
                target: t.clone(),
            },
            Kind::Char(major, minor) => Entry::CharDev {
                meta: m,
                major: *major,
                minor: *minor,
            },
            Kind::Block(major, minor) => Entry::BlockDev {
                meta: m,
                major: *major,
                minor: *minor,
            },
            Kind::Fifo => Entry::Fifo(m),
            Kind::Socket => Entry::Socket(m),
            Kind::Hardlink(t) => Entry::Hardlink { target: t.clone() },
        };
        tree.insert(&it.path, e).expect("insert");
    }
    tree
}

/// Final contents of the spec: later items replace earlier ones at a path.
fn final_items(spec: &Spec) -> BTreeMap<Vec<u8>, Item> {
    let mut m = BTreeMap::new();
    for it in spec.items.iter().filter(|i| !i.hidden) {
        m.insert(it.path.clone(), it.clone());
    }
    m
}

fn resolve(items: &BTreeMap<Vec<u8>, Item>, path: &[u8]) -> Vec<u8> {
    let mut p = path.to_vec();
    while let Kind::Hardlink(t) = &items[&p].kind {
        p = t.strip_prefix(b"/").unwrap_or(t).to_vec();
    }
    p
}

fn major(dev: u64) -> u32 {
    u32::try_from(((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)).unwrap()
}

fn minor(dev: u64) -> u32 {
    u32::try_from((dev & 0xff) | ((dev >> 12) & !0xff)).unwrap()
}

/// Where the spec's `path` (relative, as bytes) is in the mounted image.
pub fn in_mount(m: &LoopMount, path: &[u8]) -> PathBuf {
    m.path().join(OsStr::from_bytes(path))
}

/// Compares every path of `spec` with the mounted image.
pub fn verify_mount(spec: &Spec, m: &LoopMount) {
    let items = final_items(spec);
    let mut links: HashMap<Vec<u8>, u64> = HashMap::new();
    for p in items.keys() {
        if !matches!(items[p].kind, Kind::Dir) {
            *links.entry(resolve(&items, p)).or_default() += 1;
        }
    }
    let root = std::fs::symlink_metadata(m.path()).unwrap();
    check_meta(b"/", &root, &spec.root);
    for (path, it) in &items {
        let fs_path = in_mount(m, path);
        let st = std::fs::symlink_metadata(&fs_path)
            .unwrap_or_else(|e| panic!("{}: {e}", fs_path.display()));
        let owner = resolve(&items, path);
        let it = if matches!(it.kind, Kind::Hardlink(_)) {
            &items[&owner]
        } else {
            it
        };
        let ft = st.file_type();
        let what = String::from_utf8_lossy(path).to_string();
        match &it.kind {
            Kind::File(c) => {
                assert!(ft.is_file(), "{what}: not a file");
                assert_eq!(&std::fs::read(&fs_path).unwrap(), c, "{what}: contents");
                assert_eq!(st.nlink(), links[&owner], "{what}: nlink");
                let target = std::fs::symlink_metadata(in_mount(m, &owner)).unwrap();
                assert_eq!(st.ino(), target.ino(), "{what}: hardlink identity");
            }
            Kind::Dir => {
                assert!(ft.is_dir(), "{what}: not a dir");
                let mut names: Vec<Vec<u8>> = std::fs::read_dir(&fs_path)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                    .collect();
                names.sort();
                let prefix = [path.as_slice(), b"/"].concat();
                let want: Vec<Vec<u8>> = items
                    .keys()
                    .filter(|k| k.starts_with(&prefix) && !k[prefix.len()..].contains(&b'/'))
                    .map(|k| k[prefix.len()..].to_vec())
                    .collect();
                assert_eq!(names, want, "{what}: listing");
            }
            Kind::Symlink(t) => {
                assert!(ft.is_symlink(), "{what}: not a symlink");
                let got = std::fs::read_link(&fs_path).unwrap();
                assert_eq!(got.as_os_str().as_bytes(), t.as_slice(), "{what}: target");
                assert_eq!(st.len(), t.len() as u64);
            }
            Kind::Char(ma, mi) => {
                assert!(ft.is_char_device(), "{what}: not a char device");
                assert_eq!((major(st.rdev()), minor(st.rdev())), (*ma, *mi), "{what}");
            }
            Kind::Block(ma, mi) => {
                assert!(ft.is_block_device(), "{what}: not a block device");
                assert_eq!((major(st.rdev()), minor(st.rdev())), (*ma, *mi), "{what}");
            }
            Kind::Fifo => assert!(ft.is_fifo(), "{what}: not a fifo"),
            Kind::Socket => assert!(ft.is_socket(), "{what}: not a socket"),
            Kind::Hardlink(_) => unreachable!(),
        }
        check_meta(path, &st, &it.meta);
        if !ft.is_symlink() {
            let mut got: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for name in xattr::list(&fs_path).unwrap() {
                let v = xattr::get(&fs_path, &name).unwrap().unwrap_or_default();
                got.insert(name.as_bytes().to_vec(), v);
            }
            assert_eq!(got, it.meta.xattrs, "{what}: xattrs");
        }
    }
    // Nothing extra at the root but lost+found.
    let mut names: Vec<Vec<u8>> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    names.sort();
    let mut want: Vec<Vec<u8>> = items
        .keys()
        .filter(|k| !k.contains(&b'/'))
        .cloned()
        .collect();
    if !want.iter().any(|n| n == b"lost+found") {
        want.push(b"lost+found".to_vec());
    }
    want.sort();
    assert_eq!(names, want, "root listing");
}

fn check_meta(path: &[u8], st: &std::fs::Metadata, m: &Metadata) {
    let what = String::from_utf8_lossy(path);
    assert_eq!(st.mode() & 0o7777, m.mode, "{what}: mode");
    assert_eq!((st.uid(), st.gid()), (m.uid, m.gid), "{what}: owner");
    assert_eq!(
        (st.mtime(), st.mtime_nsec()),
        (m.mtime.secs, i64::from(m.mtime.nanos)),
        "{what}: mtime"
    );
    assert_eq!(
        (st.ctime(), st.ctime_nsec()),
        (m.ctime.secs, i64::from(m.ctime.nanos)),
        "{what}: ctime"
    );
    assert_eq!(
        (st.atime(), st.atime_nsec()),
        (m.atime.secs, i64::from(m.atime.nanos)),
        "{what}: atime"
    );
}

/// Compares `spec` with what ext4-view reads from the image.
pub fn verify_view(spec: &Spec, image: &Path) {
    let fs = ext4_view::Ext4::load_from_path(image).expect("ext4-view load");
    let items = final_items(spec);
    for (path, it) in &items {
        let p = format!(
            "/{}",
            String::from_utf8(path.clone()).expect("utf-8 test paths")
        );
        let owner = resolve(&items, path);
        let it = if matches!(it.kind, Kind::Hardlink(_)) {
            &items[&owner]
        } else {
            it
        };
        let md = fs
            .symlink_metadata(p.as_str())
            .unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(u32::from(md.mode()), it.meta.mode, "{p}: mode");
        assert_eq!(
            (md.uid(), md.gid()),
            (it.meta.uid, it.meta.gid),
            "{p}: owner"
        );
        use ext4_view::FileType as F;
        match &it.kind {
            Kind::File(c) => {
                assert_eq!(md.file_type(), F::Regular, "{p}");
                assert_eq!(&fs.read(p.as_str()).unwrap(), c, "{p}: contents");
            }
            Kind::Dir => assert_eq!(md.file_type(), F::Directory, "{p}"),
            Kind::Symlink(t) => {
                assert_eq!(md.file_type(), F::Symlink, "{p}");
                let got = fs.read_link(p.as_str()).unwrap();
                assert_eq!(got.as_ref(), t.as_slice(), "{p}: target");
            }
            Kind::Char(..) => assert_eq!(md.file_type(), F::CharacterDevice, "{p}"),
            Kind::Block(..) => assert_eq!(md.file_type(), F::BlockDevice, "{p}"),
            Kind::Fifo => assert_eq!(md.file_type(), F::Fifo, "{p}"),
            Kind::Socket => assert_eq!(md.file_type(), F::Socket, "{p}"),
            Kind::Hardlink(_) => unreachable!(),
        }
    }
}

/// e2fsck, then mount and compare, then ext4-view.
pub fn check_all(spec: &Spec, image: &Path) {
    e2fsck_clean(image);
    if let Some(m) = LoopMount::new(image) {
        verify_mount(spec, &m);
    }
    verify_view(spec, image);
}
