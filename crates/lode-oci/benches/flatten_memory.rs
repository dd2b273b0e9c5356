//! Peak memory and time of flattening one very large layer: ENTRIES tar entries
//! (directories, small and empty files, symlinks, hardlinks, with names shaped like a
//! Python site-packages tree) in one uncompressed layer of an OCI layout, flattened by
//! [`lode_oci::flatten`] into an image file.
//!
//! ```text
//! TMPDIR=/var/tmp cargo bench -p lode-oci --bench flatten_memory
//! ENTRIES=4000000 TMPDIR=/var/tmp cargo bench -p lode-oci --bench flatten_memory
//! ```
//!
//! The layer is generated first, streamed to disk; then the process's peak RSS is
//! reset (`/proc/self/clear_refs`, 5) so the figure printed is the flatten's own:
//! VmHWM after it, and that less the RSS before it, per entry. Everything lives in
//! one temporary directory under TMPDIR (about 1.5 KiB of disk per entry), deleted
//! at the end; keep it off tmpfs, whose pages would share the machine's memory
//! with the flatten being measured. The image's digest is printed last, so
//! runs of two builds can be checked for identical bytes.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use lode_oci::{FlattenOptions, ImageSource};

const T0: u64 = 1_700_000_000;

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(T0);
    h.set_size(size);
    h
}

/// Writes a layer of exactly `entries` entries to `out`.
fn write_layer(out: &Path, entries: u64) -> io::Result<()> {
    let file = BufWriter::with_capacity(1 << 20, fs::File::create(out)?);
    let mut b = tar::Builder::new(file);
    b.mode(tar::HeaderMode::Complete);
    let mut left = entries;
    let dir = |b: &mut tar::Builder<_>, path: &str, left: &mut u64| -> io::Result<()> {
        if *left > 0 {
            *left -= 1;
            b.append_data(
                &mut header(tar::EntryType::Directory, 0o755, 0),
                path,
                io::empty(),
            )?;
        }
        Ok(())
    };
    for p in [
        "usr",
        "usr/lib",
        "usr/lib/python3.12",
        "usr/lib/python3.12/site-packages",
    ] {
        dir(&mut b, p, &mut left)?;
    }
    let body: Vec<u8> = (0..400u32)
        .map(|i| b"abcdefghij\n"[(i % 11) as usize])
        .collect();
    let mut pkg = 0u32;
    while left > 0 {
        let pdir = format!("usr/lib/python3.12/site-packages/package_{pkg:05}");
        dir(&mut b, &pdir, &mut left)?;
        for m in 0..8 {
            let mdir = format!("{pdir}/submodule_{m:02}");
            dir(&mut b, &mdir, &mut left)?;
            for f in 0..60u32 {
                if left == 0 {
                    break;
                }
                left -= 1;
                let path = format!("{mdir}/module_file_{f:04}.py");
                match f % 20 {
                    // A hardlink to the file before it.
                    7 => {
                        let target = format!("{mdir}/module_file_{:04}.py", f - 1);
                        let mut h = header(tar::EntryType::Link, 0o644, 0);
                        b.append_link(&mut h, &path, &target)?;
                    }
                    13 | 17 => {
                        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                        b.append_link(&mut h, &path, "../submodule_00/module_file_0000.py")?;
                    }
                    n if n % 3 == 0 => {
                        let len = 64 + (f * 37 + pkg) as usize % 300;
                        let mut h = header(tar::EntryType::Regular, 0o644, len as u64);
                        b.append_data(&mut h, &path, &body[..len])?;
                    }
                    _ => {
                        let mut h = header(tar::EntryType::Regular, 0o644, 0);
                        b.append_data(&mut h, &path, io::empty())?;
                    }
                }
            }
        }
        pkg += 1;
    }
    b.into_inner()?.flush()
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(ctx.finish())))
}

/// Puts `blob` (an uncompressed layer) in a one-image OCI layout tagged `t`.
fn write_layout(dir: &Path, blob: &Path) -> io::Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> io::Result<String> {
        let d = format!(
            "sha256:{}",
            hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
        );
        fs::write(blobs.join(&d[7..]), bytes)?;
        Ok(d)
    };
    let layer = sha256_file(blob)?;
    let size = fs::metadata(blob)?.len();
    fs::rename(blob, blobs.join(&layer[7..]))?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    }))?;
    let cd = put(&config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": size}],
    }))?;
    let md = put(&manifest)?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "t"},
        }],
    }))?;
    fs::write(dir.join("index.json"), index)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
}

/// A `kB` field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .expect("a number of kB");
    kb * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn main() {
    let entries: u64 = std::env::var("ENTRIES")
        .ok()
        .map_or(1_000_000, |v| v.parse().expect("ENTRIES: a number"));
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let layout = tmp.path().join("layout");
    let blob = tmp.path().join("layer.tar");

    let t = Instant::now();
    write_layer(&blob, entries).expect("writing the layer");
    let tar_bytes = fs::metadata(&blob).expect("layer written").len();
    write_layout(&layout, &blob).expect("writing the layout");
    println!(
        "layer: {entries} entries, {:.1} MiB of tar, generated in {:.1} s",
        mib(tar_bytes),
        t.elapsed().as_secs_f64()
    );

    fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS");
    let before = status_bytes("VmRSS:");
    let source: ImageSource = format!("oci:{}:t", layout.display())
        .parse()
        .expect("an image reference");
    let out = fs::File::create(tmp.path().join("image.ext4")).expect("creating the image file");
    let t = Instant::now();
    let done = lode_oci::flatten(&source, out, &FlattenOptions::default(), &|_| {})
        .expect("flattening the layer");
    let elapsed = t.elapsed().as_secs_f64();
    let peak = status_bytes("VmHWM:");
    println!(
        "flatten: {elapsed:.1} s, peak RSS {:.1} MiB ({:.1} MiB before), {:.0} bytes per entry; image {:.1} MiB, {} inodes",
        mib(peak),
        mib(before),
        peak.saturating_sub(before) as f64 / entries as f64,
        mib(done.summary.image_size),
        done.summary.used_inodes,
    );
    // Two builds flatten the same layer into the same bytes, or one of
    // them changed the format.
    let digest = sha256_file(&tmp.path().join("image.ext4")).expect("hashing the image");
    println!("image {digest}");
}
