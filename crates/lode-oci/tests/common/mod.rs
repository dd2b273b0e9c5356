//! Shared harness for the system tests: write OCI layouts and
//! docker-archives by hand (tar crate, flate2, zstd), flatten them, check
//! the image with `e2fsck -fn`, mount it read-only and compare it file by
//! file with another unpacking (umoci's).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use lode_oci::{Digest, FlattenOptions, Flattened, ImageSource};
use serde_json::json;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

impl Comp {
    pub fn media_type(self) -> &'static str {
        match self {
            Comp::None => "application/vnd.oci.image.layer.v1.tar",
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Comp::None => tar.to_vec(),
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar).unwrap();
                e.finish().unwrap()
            }
            Comp::Zstd => zstd::stream::encode_all(tar, 3).unwrap(),
        }
    }
}

/// Builds one layer tar with the tar crate.
pub struct Layer {
    pub b: tar::Builder<Vec<u8>>,
}

pub const T0: u64 = 1_650_000_000;

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(T0);
    h.set_size(0);
    h
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        let mut b = tar::Builder::new(Vec::new());
        b.mode(tar::HeaderMode::Complete);
        Self { b }
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = header(tar::EntryType::Directory, mode, 0, 0);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.file_full(path, data, 0o644, 0, 0)
    }

    pub fn file_full(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Self {
        let mut h = header(tar::EntryType::Regular, mode, uid, gid);
        h.set_size(data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Link, 0o644, 0, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = header(kind, 0o660, 0, 6);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    pub fn fifo(&mut self, path: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Fifo, 0o600, 0, 0);
        self.b.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// PAX records for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.b
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, b"")
    }

    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    /// An entry with any name and link bytes (the tar crate refuses `..`).
    pub fn raw(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        data: &[u8],
    ) -> &mut Self {
        let mut h = header(kind, 0o644, 0, 0);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

/// A layer blob as stored, with the diff_id the config gives it.
pub struct RawLayer {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub diff_id: Digest,
}

/// Writes an OCI image layout.
pub struct OciLayout {
    pub dir: PathBuf,
    pub index: Vec<serde_json::Value>,
}

pub fn digest(bytes: &[u8]) -> Digest {
    Digest::of(bytes)
}

/// The runtime config every test image carries.
pub fn runtime_config() -> serde_json::Value {
    json!({
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--serve"],
        "Env": ["PATH=/usr/bin:/bin", "MODE=test"],
        "WorkingDir": "/srv",
        "User": "1000:1000"
    })
}

impl OciLayout {
    pub fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let me = Self {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        };
        me.write_index();
        me
    }

    pub fn blob(&self, bytes: &[u8]) -> Digest {
        let d = digest(bytes);
        fs::write(self.dir.join("blobs/sha256").join(d.hex()), bytes).unwrap();
        d
    }

    fn write_index(&self) {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": self.index,
        });
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    /// Writes layers, config and manifest; returns the manifest descriptor
    /// (not yet in index.json).
    pub fn manifest(&self, layers: &[(Vec<u8>, Comp)]) -> serde_json::Value {
        let raw: Vec<RawLayer> = layers
            .iter()
            .map(|(tar, comp)| RawLayer {
                blob: comp.compress(tar),
                media_type: comp.media_type().to_string(),
                diff_id: digest(tar),
            })
            .collect();
        self.manifest_raw(&raw)
    }

    /// Like [`Self::manifest`] with blobs, media types and diff_ids given.
    pub fn manifest_raw(&self, layers: &[RawLayer]) -> serde_json::Value {
        let mut diff_ids = Vec::new();
        let mut descs = Vec::new();
        for l in layers {
            diff_ids.push(l.diff_id.to_string());
            let d = self.blob(&l.blob);
            descs.push(
                json!({"mediaType": l.media_type, "digest": d.to_string(), "size": l.blob.len()}),
            );
        }
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": runtime_config(),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [],
        });
        let config = serde_json::to_vec(&config).unwrap();
        let cd = self.blob(&config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
            "layers": descs,
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let md = self.blob(&bytes);
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md.to_string(),
            "size": bytes.len(),
        })
    }

    /// Adds an image of raw layers tagged `tag`.
    pub fn image_raw(&mut self, tag: &str, layers: &[RawLayer]) -> Digest {
        let mut desc = self.manifest_raw(layers);
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let d: Digest = desc["digest"].as_str().unwrap().parse().unwrap();
        self.index.push(desc);
        self.write_index();
        d
    }

    /// Adds an image tagged `tag`; returns its manifest digest.
    pub fn image(&mut self, tag: &str, layers: &[(Vec<u8>, Comp)]) -> Digest {
        let mut desc = self.manifest(layers);
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let d: Digest = desc["digest"].as_str().unwrap().parse().unwrap();
        self.index.push(desc);
        self.write_index();
        d
    }

    /// Adds a raw descriptor to index.json.
    pub fn push_index(&mut self, desc: serde_json::Value) {
        self.index.push(desc);
        self.write_index();
    }

    pub fn source(&self, tag: &str) -> ImageSource {
        format!("oci:{}:{tag}", self.dir.display()).parse().unwrap()
    }
}

/// A docker-archive as `docker save` writes it: `<id>/layer.tar`,
/// `<config hex>.json`, `manifest.json`.
pub fn docker_archive(path: &Path, tag: &str, layers: &[Vec<u8>]) {
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut names = Vec::new();
    let diff_ids: Vec<String> = layers.iter().map(|l| digest(l).to_string()).collect();
    for (i, l) in layers.iter().enumerate() {
        let id = digest(format!("layer{i}").as_bytes()).hex();
        let name = format!("{id}/layer.tar");
        add(&mut b, &name, l);
        names.push(name);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": runtime_config(),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_name = format!("{}.json", digest(&config).hex());
    add(&mut b, &config_name, &config);
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name, "RepoTags": [tag], "Layers": names,
    }]))
    .unwrap();
    add(&mut b, "manifest.json", &manifest);
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

pub fn opts() -> FlattenOptions {
    FlattenOptions {
        chunk_size: 64 * 1024,
        ..FlattenOptions::default()
    }
}

pub fn flatten_to(source: &ImageSource, out: &Path) -> Result<Flattened, lode_oci::Error> {
    let f = fs::File::create(out).unwrap();
    lode_oci::flatten(source, f, &opts(), &|_| {})
}

/// What one path of an unpacked tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub content: Vec<u8>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub ino: u64,
}

/// Every path below `root` (relative), with what it is.
pub fn scan(root: &Path) -> BTreeMap<String, Item> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Item>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let (kind, content) = if ft.is_dir() {
                ("dir".to_string(), Vec::new())
            } else if ft.is_symlink() {
                (
                    "symlink".to_string(),
                    fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec(),
                )
            } else if ft.is_file() {
                ("file".to_string(), fs::read(&p).unwrap())
            } else if ft.is_char_device() {
                (format!("char {}", m.rdev()), Vec::new())
            } else if ft.is_block_device() {
                (format!("block {}", m.rdev()), Vec::new())
            } else if ft.is_fifo() {
                ("fifo".to_string(), Vec::new())
            } else {
                ("other".to_string(), Vec::new())
            };
            let mut xattrs = BTreeMap::new();
            if let Ok(names) = xattr::list(&p) {
                for n in names {
                    if let Ok(Some(v)) = xattr::get(&p, &n) {
                        xattrs.insert(n.to_string_lossy().into_owned(), v);
                    }
                }
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(
                rel,
                Item {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    content,
                    xattrs,
                    ino: m.ino(),
                },
            );
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// Paths grouped by inode, for comparing hardlink identity.
pub fn link_groups(items: &BTreeMap<String, Item>) -> BTreeSet<Vec<String>> {
    let mut by: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, i) in items {
        if i.kind != "dir" {
            by.entry(i.ino).or_default().push(p.clone());
        }
    }
    by.into_values().filter(|v| v.len() > 1).collect()
}

/// Compares two scans path by path; `no_mtime` lists paths whose mtime is
/// not compared (directories no entry describes).
pub fn compare(ours: &BTreeMap<String, Item>, theirs: &BTreeMap<String, Item>, no_mtime: &[&str]) {
    let a: BTreeSet<&String> = ours.keys().filter(|k| *k != "lost+found").collect();
    let b: BTreeSet<&String> = theirs.keys().collect();
    assert_eq!(a, b, "different paths");
    for p in a {
        let (x, y) = (&ours[p], &theirs[p]);
        assert_eq!(x.kind, y.kind, "{p}: type");
        assert_eq!(x.mode, y.mode, "{p}: mode");
        assert_eq!((x.uid, x.gid), (y.uid, y.gid), "{p}: owner");
        assert!(x.content == y.content, "{p}: content differs");
        assert_eq!(x.xattrs, y.xattrs, "{p}: xattrs");
        if !no_mtime.contains(&p.as_str()) {
            assert_eq!(x.mtime, y.mtime, "{p}: mtime");
        }
    }
    assert_eq!(link_groups(ours), link_groups(theirs), "hardlink groups");
}

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}
