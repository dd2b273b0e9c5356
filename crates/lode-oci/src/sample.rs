//! A deterministic sample image family, for demos, benchmarks and tests.
//!
//! [`write_sample_family`] writes one OCI image layout holding two images,
//! tagged `app1` and `app2`, that share a base layer:
//!
//! - **base** (~24 MiB of tar): a small but realistic root — `/bin` and
//!   `/lib` as symlinks into `/usr` (usr-merge), `/etc` with `os-release`,
//!   `passwd`, `group`, `/usr/bin/busybox-ish` with a symlink `sh` and a
//!   hardlink `vi-ish` to it, a setuid `su-ish` (4755), `ping-ish` with a
//!   `security.capability` xattr (PAX header), `/dev/null` (char 1,3), a
//!   fifo `/run/initctl`, `/tmp` and `/var/tmp` (1777), and seventeen
//!   incompressible "libraries" under `/usr/lib` (300 KiB .. 4.5 MiB each),
//!   so the base region spans dozens of 512 KiB chunks;
//! - **app1** (~4 MiB): `/app` (a script, a `.py`, a native lib, a model),
//!   `/etc/app.conf`, and a whiteout of `/usr/lib/libxml2.so.2`;
//! - **app2** (~6 MiB): different `/app` files, an opaque
//!   `/usr/share/misc` (`.wh..wh..opq`) with a new file in it, and
//!   `/app/busybox`, a hardlink to the base layer's `/usr/bin/busybox-ish`.
//!
//! Both configs set entrypoint, cmd, env, working dir (`/app`) and user
//! (`1000:1000`). Everything is a function of fixed seeds: fixed mtimes and
//! owners, entries sorted by path, gzip at a fixed level with no mtime or
//! name in its header, so every call writes the same bytes (for a given
//! build: another deflate backend may compress differently).

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde_json::json;

use crate::digest::Digest;
use crate::spec::{OCI_INDEX, OCI_MANIFEST, REF_NAME};

/// Writing the sample layout failed.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SampleError {
    let what = what.into();
    move |source| SampleError::Io { what, source }
}

/// Seed every pseudo-random byte derives from (with the file's path).
const SEED: u64 = 0x6c6f_6465_5341_4d50; // "lodeSAMP"

/// mtimes of the base and app layers (2024-01-01, 2024-03-01, 2024-03-02).
const T_BASE: u64 = 1_704_067_200;
const T_APP1: u64 = 1_709_251_200;
const T_APP2: u64 = 1_709_337_600;

const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// The tags [`write_sample_family`] writes, in index order.
pub const SAMPLE_TAGS: [&str; 2] = ["app1", "app2"];

/// Writes the sample OCI image layout (see the module docs) at `dir`,
/// creating it if needed; files of the same names are overwritten, others
/// left alone. Returns the tags (`app1`, `app2`).
pub fn write_sample_family(dir: &Path) -> Result<Vec<String>, SampleError> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(io_err(format!("creating {}", blobs.display())))?;
    let write_blob = |bytes: &[u8]| -> Result<(Digest, u64), SampleError> {
        let d = Digest::of(bytes);
        let path = blobs.join(d.hex());
        fs::write(&path, bytes).map_err(io_err(format!("writing {}", path.display())))?;
        Ok((d, bytes.len() as u64))
    };

    let base = Layer::compress(&base_layer())?;
    let apps = [
        (app1_layer(), app_config("app1", &["app1.py"])),
        (
            app2_layer(),
            app_config("app2", &["app2.py", "--port", "8080"]),
        ),
    ];
    let (base_digest, base_size) = write_blob(&base.blob)?;

    let mut manifests = Vec::new();
    for (tag, (entries, runtime)) in SAMPLE_TAGS.iter().zip(apps) {
        let app = Layer::compress(&entries)?;
        let (app_digest, app_size) = write_blob(&app.blob)?;
        let config = json!({
            "created": "2024-03-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": runtime,
            "rootfs": {
                "type": "layers",
                "diff_ids": [base.diff_id.to_string(), app.diff_id.to_string()],
            },
            "history": [
                {"created": "2024-01-01T00:00:00Z", "created_by": "lode sample: base root"},
                {"created": "2024-03-01T00:00:00Z", "created_by": format!("lode sample: {tag}")},
            ],
        });
        let (config_digest, config_size) = write_blob(&serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest.to_string(), "size": config_size},
            "layers": [
                {"mediaType": LAYER_GZIP, "digest": base_digest.to_string(), "size": base_size},
                {"mediaType": LAYER_GZIP, "digest": app_digest.to_string(), "size": app_size},
            ],
        });
        let (manifest_digest, manifest_size) = write_blob(&serde_json::to_vec(&manifest)?)?;
        manifests.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest.to_string(),
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {REF_NAME: tag},
        }));
    }

    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let layout = dir.join("oci-layout");
    fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(io_err(format!("writing {}", layout.display())))?;
    let index_path = dir.join("index.json");
    fs::write(&index_path, serde_json::to_vec(&index)?)
        .map_err(io_err(format!("writing {}", index_path.display())))?;
    Ok(SAMPLE_TAGS.iter().map(|t| (*t).to_string()).collect())
}

/// The runtime part of an app image's config.
fn app_config(name: &str, cmd: &[&str]) -> serde_json::Value {
    json!({
        "User": "1000:1000",
        "Env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            format!("APP_NAME={name}"),
            "LANG=C.UTF-8",
        ],
        "Entrypoint": ["/app/run"],
        "Cmd": cmd,
        "WorkingDir": "/app",
        "Labels": {"org.opencontainers.image.title": name},
    })
}

/// `len` incompressible bytes, a function of [`SEED`] and `name` only
/// (xorshift64*, seeded through FNV-1a of the name).
fn noise(name: &str, len: usize) -> Vec<u8> {
    let mut s = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) ^ SEED;
    if s == 0 {
        s = SEED;
    }
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}

/// Text of roughly `len` bytes made of numbered lines (compressible, as
/// source code is).
fn text(name: &str, len: usize) -> Vec<u8> {
    let mut out = format!("# {name}: generated by lode's sample family\n").into_bytes();
    let mut i = 0u32;
    while out.len() < len {
        let line = format!(
            "def handler_{i}(request):\n    return respond(request, code={i}, path=\"/v1/items/{i}\")\n\n"
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out
}

enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(&'static str),
    Hardlink(&'static str),
    Char(u32, u32),
    Fifo,
}

struct Entry {
    path: String,
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(&'static str, Vec<u8>)>,
}

/// Collects a layer's entries with one owner and mtime.
struct Entries {
    list: Vec<Entry>,
    uid: u64,
    gid: u64,
    mtime: u64,
}

impl Entries {
    fn new(mtime: u64) -> Self {
        Self {
            list: Vec::new(),
            uid: 0,
            gid: 0,
            mtime,
        }
    }
    fn owner(&mut self, uid: u64, gid: u64) -> &mut Self {
        (self.uid, self.gid) = (uid, gid);
        self
    }
    fn add(&mut self, path: &str, kind: Kind, mode: u32) -> &mut Self {
        self.list.push(Entry {
            path: path.to_string(),
            kind,
            mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            xattrs: Vec::new(),
        });
        self
    }
    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.add(path, Kind::Dir, mode)
    }
    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> &mut Self {
        self.add(path, Kind::File(data), mode)
    }
    fn xattr(&mut self, key: &'static str, value: Vec<u8>) -> &mut Self {
        if let Some(e) = self.list.last_mut() {
            e.xattrs.push((key, value));
        }
        self
    }
    /// `.wh.NAME` for `path`.
    fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, 0o644, Vec::new())
    }
}

/// The shared base layer.
fn base_layer() -> Vec<Entry> {
    let mut e = Entries::new(T_BASE);
    e.add("bin", Kind::Symlink("usr/bin"), 0o777)
        .add("lib", Kind::Symlink("usr/lib"), 0o777)
        .dir("dev", 0o755)
        .add("dev/null", Kind::Char(1, 3), 0o666)
        .dir("etc", 0o755)
        .file(
            "etc/os-release",
            0o644,
            b"NAME=\"Lode Sample Linux\"\nID=lode-sample\nVERSION_ID=1.0\n\
              PRETTY_NAME=\"Lode Sample Linux 1.0\"\nHOME_URL=\"https://example.invalid/\"\n"
                .to_vec(),
        )
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\n\
              daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
              nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
              app:x:1000:1000:app:/app:/bin/sh\n"
                .to_vec(),
        )
        .file(
            "etc/group",
            0o644,
            b"root:x:0:\ndaemon:x:1:\ntty:x:5:\ndisk:x:6:\nnogroup:x:65534:\napp:x:1000:\n"
                .to_vec(),
        )
        .file("etc/hostname", 0o644, b"sample\n".to_vec())
        .dir("root", 0o700)
        .dir("run", 0o755)
        .add("run/initctl", Kind::Fifo, 0o600)
        .dir("tmp", 0o1777)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file(
            "usr/bin/busybox-ish",
            0o755,
            noise("usr/bin/busybox-ish", 1_123_457),
        )
        .file("usr/bin/ping-ish", 0o755, noise("usr/bin/ping-ish", 81_233))
        .xattr("SCHILY.xattr.security.capability", cap_net_raw())
        .add("usr/bin/sh", Kind::Symlink("busybox-ish"), 0o777)
        .file("usr/bin/su-ish", 0o4755, noise("usr/bin/su-ish", 61_447))
        .add(
            "usr/bin/vi-ish",
            Kind::Hardlink("usr/bin/busybox-ish"),
            0o755,
        )
        .dir("usr/lib", 0o755);
    for (name, size) in LIBS {
        let path = format!("usr/lib/{name}");
        let data = noise(&path, size);
        e.file(&path, 0o755, data);
    }
    e.dir("usr/share", 0o755)
        .dir("usr/share/misc", 0o755)
        .file("usr/share/misc/magic", 0o644, text("magic", 40_000))
        .file("usr/share/misc/pci.ids", 0o644, text("pci.ids", 60_000))
        .dir("var", 0o755)
        .dir("var/log", 0o755)
        .dir("var/tmp", 0o1777);
    e.list
}

/// Base libraries: name and size (about 23.5 MB together).
const LIBS: [(&str, usize); 17] = [
    ("libc.so.6", 2_104_321),
    ("libcrypto.so.3", 4_712_093),
    ("libcurl.so.4", 702_117),
    ("libffi.so.8", 318_771),
    ("libgcc_s.so.1", 401_203),
    ("libicuuc.so.74", 2_087_555),
    ("liblzma.so.5", 352_009),
    ("libm.so.6", 907_331),
    ("libncursesw.so.6", 463_861),
    ("libpython3.12.so.1.0", 3_611_427),
    ("libreadline.so.8", 377_589),
    ("libsqlite3.so.0", 1_498_201),
    ("libssl.so.3", 699_037),
    ("libstdc++.so.6", 2_413_649),
    ("libxml2.so.2", 1_802_245),
    ("libz.so.1", 301_117),
    ("libzstd.so.1", 797_063),
];

/// A v2 `security.capability` value: cap_net_raw (13), permitted and
/// effective.
fn cap_net_raw() -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&0x0200_0001_u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 13).to_le_bytes()); // permitted, low word
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, low word
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted, high word
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, high word
    v
}

fn run_script(name: &str) -> Vec<u8> {
    format!("#!/bin/sh\nset -e\ncd /app\nexec python3 \"$@\" # {name}\n").into_bytes()
}

/// app1: /app files, /etc/app.conf, a whiteout of a base library.
fn app1_layer() -> Vec<Entry> {
    let mut e = Entries::new(T_APP1);
    e.dir("etc", 0o755)
        .file(
            "etc/app.conf",
            0o644,
            b"[server]\nlisten = 0.0.0.0:8000\nworkers = 4\n[log]\nlevel = info\n".to_vec(),
        )
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .whiteout("usr/lib/libxml2.so.2")
        .owner(1000, 1000)
        .dir("app", 0o755)
        .file("app/app1.py", 0o644, text("app1.py", 150_000))
        .dir("app/data", 0o755)
        .file(
            "app/data/model1.bin",
            0o644,
            noise("app/data/model1.bin", 2_621_447),
        )
        .dir("app/lib", 0o755)
        .file(
            "app/lib/app1_native.so",
            0o755,
            noise("app/lib/app1_native.so", 1_409_317),
        )
        .file("app/run", 0o755, run_script("app1"));
    e.list
}

/// app2: other /app files, an opaque /usr/share/misc, a hardlink to a base
/// file.
fn app2_layer() -> Vec<Entry> {
    let mut e = Entries::new(T_APP2);
    e.dir("usr", 0o755)
        .dir("usr/share", 0o755)
        .dir("usr/share/misc", 0o755)
        .file("usr/share/misc/.wh..wh..opq", 0o644, Vec::new())
        .file("usr/share/misc/app2.ids", 0o644, text("app2.ids", 20_000))
        .add("app/busybox", Kind::Hardlink("usr/bin/busybox-ish"), 0o755)
        .owner(1000, 1000)
        .dir("app", 0o755)
        .file("app/app2.py", 0o644, text("app2.py", 220_000))
        .dir("app/data", 0o755)
        .file(
            "app/data/model2.bin",
            0o644,
            noise("app/data/model2.bin", 4_194_319),
        )
        .file(
            "app/data/vocab.txt",
            0o644,
            noise("app/data/vocab.txt", 524_309),
        )
        .dir("app/lib", 0o755)
        .file(
            "app/lib/app2_native.so",
            0o755,
            noise("app/lib/app2_native.so", 1_310_741),
        )
        .file("app/run", 0o755, run_script("app2"));
    e.list
}

/// A layer as stored: the gzip blob and the uncompressed tar's digest.
struct Layer {
    blob: Vec<u8>,
    diff_id: Digest,
}

impl Layer {
    fn compress(entries: &[Entry]) -> Result<Self, SampleError> {
        let tar = write_tar(entries).map_err(io_err("writing a layer tar"))?;
        let diff_id = Digest::of(&tar);
        // GzEncoder writes mtime 0, no name and OS "unknown" in the header.
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(tar.len() + tar.len() / 64 + 1024),
            flate2::Compression::new(1),
        );
        gz.write_all(&tar).map_err(io_err("gzipping a layer"))?;
        let blob = gz.finish().map_err(io_err("gzipping a layer"))?;
        Ok(Self { blob, diff_id })
    }
}

/// The layer's tar, entries sorted by path (a stable sort: a hardlink's
/// target must sort before it, which the names above ensure).
fn write_tar(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let total: usize = entries
        .iter()
        .map(|e| match &e.kind {
            Kind::File(d) => d.len() + 1024,
            _ => 1024,
        })
        .sum();
    let mut b = ::tar::Builder::new(Vec::with_capacity(total + 4096));
    for e in sorted {
        if !e.xattrs.is_empty() {
            b.append_pax_extensions(e.xattrs.iter().map(|(k, v)| (*k, v.as_slice())))?;
        }
        let mut h = ::tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(0);
        let (user, group) = if e.uid == 0 {
            ("root", "root")
        } else {
            ("app", "app")
        };
        h.set_username(user)?;
        h.set_groupname(group)?;
        match &e.kind {
            Kind::Dir => {
                h.set_entry_type(::tar::EntryType::Directory);
                b.append_data(&mut h, format!("{}/", e.path), io::empty())?;
            }
            Kind::File(data) => {
                h.set_entry_type(::tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, &e.path, data.as_slice())?;
            }
            Kind::Symlink(target) => {
                h.set_entry_type(::tar::EntryType::Symlink);
                b.append_link(&mut h, &e.path, target)?;
            }
            Kind::Hardlink(target) => {
                h.set_entry_type(::tar::EntryType::Link);
                b.append_link(&mut h, &e.path, target)?;
            }
            Kind::Char(major, minor) => {
                h.set_entry_type(::tar::EntryType::Char);
                h.set_device_major(*major)?;
                h.set_device_minor(*minor)?;
                b.append_data(&mut h, &e.path, io::empty())?;
            }
            Kind::Fifo => {
                h.set_entry_type(::tar::EntryType::Fifo);
                b.append_data(&mut h, &e.path, io::empty())?;
            }
        }
    }
    b.into_inner()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::{FlattenOptions, Flattened, ImageSource};

    fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_path_buf();
                    out.insert(rel, fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    fn flatten_tag(dir: &Path, tag: &str, out: &Path) -> Flattened {
        let source: ImageSource = format!("oci:{}:{tag}", dir.display()).parse().unwrap();
        let f = fs::File::create(out).unwrap();
        crate::flatten(&source, f, &FlattenOptions::default(), &|_| {}).unwrap()
    }

    #[test]
    fn same_bytes_every_call() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        assert_eq!(write_sample_family(&a).unwrap(), ["app1", "app2"]);
        assert_eq!(write_sample_family(&b).unwrap(), ["app1", "app2"]);
        let (fa, fb) = (files(&a), files(&b));
        // oci-layout, index.json, 1 base + 2 app layers, 2 configs, 2 manifests.
        assert_eq!(fa.len(), 9, "{:?}", fa.keys().collect::<Vec<_>>());
        assert!(fa == fb, "two calls wrote different bytes");
        // Every blob is named by its digest.
        for (p, bytes) in &fa {
            if p.starts_with("blobs") {
                let name = p.file_name().unwrap().to_str().unwrap();
                assert_eq!(Digest::of(bytes).hex(), name);
            }
        }
        // Writing again over an existing layout changes nothing.
        write_sample_family(&a).unwrap();
        assert!(files(&a) == fb);
    }

    #[test]
    fn flattens_and_shares_the_base_region() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layout");
        write_sample_family(&dir).unwrap();
        let (ia, ib) = (tmp.path().join("app1.ext4"), tmp.path().join("app2.ext4"));
        let a = flatten_tag(&dir, "app1", &ia);
        let b = flatten_tag(&dir, "app2", &ib);
        lode_testkit::e2fsck_clean(&ia);
        lode_testkit::e2fsck_clean(&ib);

        for (f, name) in [(&a, "app1"), (&b, "app2")] {
            assert_eq!(f.layers.len(), 2);
            assert_eq!(f.config.entrypoint, ["/app/run"]);
            assert_eq!(f.config.working_dir, "/app");
            assert_eq!(f.config.user, "1000:1000");
            assert!(f.config.env.contains(&format!("APP_NAME={name}")));
        }
        assert_eq!(a.config.cmd, ["app1.py"]);
        assert_eq!(b.config.cmd, ["app2.py", "--port", "8080"]);

        let (bytes_a, bytes_b) = (fs::read(&ia).unwrap(), fs::read(&ib).unwrap());
        let region = |bytes: &[u8], f: &Flattened| {
            let r = f.layers[0].region.byte_range();
            bytes[usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap()].to_vec()
        };
        let (ra, rb) = (region(&bytes_a, &a), region(&bytes_b, &b));
        assert_eq!(a.layers[0].region, b.layers[0].region);
        assert_eq!(a.layers[0].diff_id, b.layers[0].diff_id);
        assert!(ra == rb, "the base region differs between app1 and app2");
        let chunk = FlattenOptions::default().chunk_size;
        let chunks = ra.len() as u64 / chunk;
        assert!(chunks >= 40, "base region is only {chunks} chunks");
        assert_ne!(a.layers[1].region.byte_range(), 0..0);
        eprintln!(
            "app1: image {} bytes, base region {} bytes ({chunks} chunks of {chunk}), \
             app region {} bytes; app2: image {} bytes, app region {} bytes",
            a.summary.image_size,
            ra.len(),
            a.layers[1].region.byte_range().end - a.layers[1].region.byte_range().start,
            b.summary.image_size,
            b.layers[1].region.byte_range().end - b.layers[1].region.byte_range().start,
        );
    }
}
