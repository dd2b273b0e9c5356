//! Files over 4 GiB and sparse files (GNU tar's old, PAX 0.1 and PAX 1.0
//! formats), checked by a kernel mount.

mod common;

use std::fs;
use std::io::{Read, Write};

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::*;
use lode_oci::Digest;
use lode_testkit::{LoopMount, e2fsck_clean};

fn digest_file(path: &Path) -> Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(ctx.finish()))
        .parse()
        .unwrap()
}

/// Adds an uncompressed layer blob already on disk to a one-image layout.
fn layout_with_blob(dir: &Path, blob: &Path) -> OciLayout {
    let l = OciLayout::new(dir);
    let d = digest_file(blob);
    let size = fs::metadata(blob).unwrap().len();
    fs::rename(blob, l.dir.join("blobs/sha256").join(d.hex())).unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [d.to_string()]},
    }))
    .unwrap();
    let cd = l.blob(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": [{"mediaType": Comp::None.media_type(), "digest": d.to_string(), "size": size}],
    }))
    .unwrap();
    let md = l.blob(&manifest);
    let mut l = l;
    l.push_index(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md.to_string(), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "t"},
    }));
    l
}

/// Hashes what is read through it.
struct Tee<R> {
    inner: R,
    ctx: ring::digest::Context,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }
}

#[test]
fn file_over_4_gib() {
    let tmp = tempfile::tempdir().unwrap();
    let size: u64 = (4 << 30) + 4096 + 3;
    // The layer: one header, zeros ending in "END" past 4 GiB, padding,
    // end blocks; zstd keeps the blob small and fast to read.
    let mut h = tar::Header::new_gnu();
    h.set_path("huge").unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(T0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let pad = size.div_ceil(512) * 512 - size + 1024;
    let stream = h
        .as_bytes()
        .chain(std::io::repeat(0).take(size - 3))
        .chain(&b"END"[..])
        .chain(std::io::repeat(0).take(pad));
    let mut tee = Tee {
        inner: stream,
        ctx: ring::digest::Context::new(&ring::digest::SHA256),
    };
    let blob = zstd::stream::encode_all(&mut tee, 1).unwrap();
    let diff_id: Digest = format!("sha256:{}", hex::encode(tee.ctx.finish()))
        .parse()
        .unwrap();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    l.image_raw(
        "t",
        &[RawLayer {
            blob,
            media_type: Comp::Zstd.media_type().into(),
            diff_id,
        }],
    );

    let img = tmp.path().join("img");
    let mut o = opts();
    // Zeros compress far beyond the default bomb guard.
    o.limits.max_expansion_ratio = u64::MAX;
    let f = fs::File::create(&img).unwrap();
    let done = lode_oci::flatten(&l.source("t"), f, &o, &|_| {}).unwrap();
    assert_eq!(done.layers[0].files, 1);
    e2fsck_clean(&img);
    if let Some(m) = LoopMount::new(&img) {
        let f = fs::File::open(m.path().join("huge")).unwrap();
        assert_eq!(f.metadata().unwrap().len(), size);
        let mut tail = [0u8; 6];
        f.read_exact_at(&mut tail, size - 6).unwrap();
        assert_eq!(&tail, b"\0\0\0END");
        assert!(f.metadata().unwrap().blocks() <= 8, "the zeros are holes");
    }
}

#[test]
fn gnu_tar_sparse_formats() {
    let Some(tar) = lode_testkit::tool("tar") else {
        return;
    };
    if !Command::new(&tar)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("GNU tar"))
    {
        lode_testkit::skip("sparse: tar is not GNU tar");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let file = src.join("sparse");
    let f = fs::File::create(&file).unwrap();
    f.set_len(20 << 20).unwrap();
    f.write_all_at(b"abc", 4096 * 3 + 7).unwrap();
    f.write_all_at(&vec![0x5a; 100_000], 10 << 20).unwrap();
    f.write_all_at(b"tail", (20 << 20) - 4).unwrap();
    drop(f);
    let want = fs::read(&file).unwrap();
    for (i, args) in [
        &["--format=gnu"][..],
        &["--format=posix", "--sparse-version=0.1"],
        &["--format=posix", "--sparse-version=1.0"],
    ]
    .iter()
    .enumerate()
    {
        let blob = tmp.path().join(format!("layer{i}.tar"));
        let st = Command::new(&tar)
            .arg("--sparse")
            .args(*args)
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&blob)
            .arg("sparse")
            .status()
            .unwrap();
        assert!(st.success());
        let l = layout_with_blob(&tmp.path().join(format!("layout{i}")), &blob);
        let img = tmp.path().join(format!("img{i}"));
        flatten_to(&l.source("t"), &img).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        e2fsck_clean(&img);
        if let Some(m) = LoopMount::new(&img) {
            let got = fs::read(m.path().join("sparse")).unwrap();
            assert!(got == want, "{args:?}: content differs");
        }
    }
    let _ = std::io::stdout().flush();
}
