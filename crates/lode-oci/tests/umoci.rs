//! A multi-layer image with every kind of entry, flattened, checked by
//! `e2fsck -fn`, mounted read-only and compared file by file with
//! `umoci unpack` of the same OCI layout.

mod common;

use std::process::Command;

use common::*;
use lode_testkit::{LoopMount, e2fsck_clean};

/// The test image: three layers exercising the whole merge.
fn layers(second: Comp) -> Vec<(Vec<u8>, Comp)> {
    let cap = [
        1u8, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let long_dir = format!("deep/{}", "d".repeat(120));
    let long_file = format!("{long_dir}/{}", "f".repeat(150));
    let pax_name = format!("pax/{}", "p".repeat(200));

    let mut base = Layer::new();
    base.dir("./", 0o755)
        .dir("etc", 0o755)
        .pax(&[
            ("SCHILY.xattr.user.comment", b"accounts"),
            ("SCHILY.xattr.trusted.t", b"\x00\x01"),
        ])
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file_full("etc/shadow", b"root:*:1::::::\n", 0o640, 0, 42)
        .file("etc/motd", b"old motd\n")
        .symlink("etc/alt", "/etc/passwd")
        .dir("bin", 0o755)
        .file_full("bin/tool", b"\x7fELF tool", 0o4755, 0, 0)
        .file_full("bin/sgid", b"\x7fELF sgid", 0o2755, 0, 50)
        .pax(&[("SCHILY.xattr.security.capability", &cap[..])])
        .file_full("bin/ping", b"\x7fELF ping", 0o755, 0, 0)
        .hardlink("bin/tool-link", "bin/tool")
        .dir("tmp", 0o1777)
        // No entries for usr/ and usr/lib/: implicit parents.
        .file("usr/lib/libx.so", &vec![0xabu8; 70_000])
        .symlink("lib", "usr/lib")
        .dir("dev", 0o755)
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .device("dev/sda", tar::EntryType::Block, 8, 0)
        .fifo("dev/initctl")
        .dir("deep", 0o755)
        .dir(&long_dir, 0o711)
        .file(&long_file, b"GNU long name")
        .dir("pax", 0o755)
        .pax(&[
            ("path", pax_name.as_bytes()),
            ("mtime", b"1650000000.123456789"),
        ])
        .file("pax/short", b"PAX long name, high-resolution mtime")
        .file_full("big-ids", b"ids", 0o600, 100_000, 200_000)
        .dir("opt", 0o755)
        .dir("opt/old", 0o755)
        .file("opt/old/a", b"a")
        .file("opt/old/b", b"b")
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/x", b"x")
        .dir("var/cache/sub", 0o755)
        .file("var/cache/sub/y", b"y")
        .dir("share", 0o755)
        .file("share/data", b"shared data, linked from an upper layer\n")
        .file("empty", b"")
        .file("zeros", &vec![0u8; 3 * 4096 + 10]);

    let mut app = Layer::new();
    app.whiteout("opt/old")
        .dir("var/cache", 0o755)
        .file("var/cache/z", b"new z, before the opaque marker")
        .opaque("var/cache")
        .file("etc/motd", b"new motd\n")
        .dir("app", 0o700)
        .hardlink("app/data-link", "share/data")
        .dir("etc", 0o750)
        .whiteout("etc/shadow")
        .file("etc/alt", b"no longer a symlink")
        .file_full("app/run", b"#!/bin/sh\n", 0o755, 1000, 1000);

    let mut top = Layer::new();
    top.whiteout("share/data")
        .whiteout("does-not-exist")
        .symlink("opt", "/srv")
        .file("bin/tool", b"replaced tool: tool-link keeps the old inode");

    vec![
        (base.finish(), Comp::Gzip),
        (app.finish(), second),
        (top.finish(), Comp::None),
    ]
}

#[test]
fn matches_umoci_unpack() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = OciLayout::new(&tmp.path().join("layout"));
    layout.image("v1", &layers(Comp::Gzip));
    layout.image("zstd", &layers(Comp::Zstd));

    let img = tmp.path().join("image.ext4");
    let done = flatten_to(&layout.source("v1"), &img).unwrap();
    assert_eq!(done.layers.len(), 3);
    assert_eq!(done.config.entrypoint, ["/bin/app"]);
    assert_eq!(done.config.cmd, ["--serve"]);
    assert_eq!(done.config.env, ["PATH=/usr/bin:/bin", "MODE=test"]);
    assert_eq!(done.config.working_dir, "/srv");
    assert_eq!(done.config.user, "1000:1000");
    e2fsck_clean(&img);

    // The same layers zstd-compressed give the same filesystem, byte for
    // byte: the seed comes from the diff_ids.
    let img2 = tmp.path().join("zstd.ext4");
    let done2 = flatten_to(&layout.source("zstd"), &img2).unwrap();
    assert_ne!(done.image_digest, done2.image_digest);
    assert_eq!(std::fs::read(&img).unwrap(), std::fs::read(&img2).unwrap());

    let Some(mount) = LoopMount::new(&img) else {
        return;
    };
    let Some(umoci) = lode_testkit::tool_from("umoci", "umoci") else {
        return;
    };
    let bundle = tmp.path().join("bundle");
    let out = Command::new(umoci)
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:v1", layout.dir.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = scan(&bundle.join("rootfs"));
    let ours = scan(mount.path());

    // Spot checks of the merge, then the full comparison.
    assert!(!ours.contains_key("opt/old/a"));
    assert_eq!(ours["opt"].kind, "symlink");
    assert!(ours.contains_key("var/cache/z"));
    assert!(!ours.contains_key("var/cache/x"));
    assert!(!ours.contains_key("var/cache/sub"));
    assert_eq!(
        ours["app/data-link"].content,
        b"shared data, linked from an upper layer\n"
    );
    assert_eq!(ours["bin/tool-link"].content, b"\x7fELF tool");
    assert_eq!(
        ours["bin/tool"].content,
        b"replaced tool: tool-link keeps the old inode"
    );
    assert_eq!(ours["bin/ping"].xattrs["security.capability"].len(), 20);
    assert_eq!(ours["etc"].mode, 0o750);
    assert!(ours.contains_key("etc/passwd"));
    let pax_long = format!("pax/{}", "p".repeat(200));
    assert_eq!(ours[&pax_long].mtime, (1_650_000_000, 123_456_789));
    assert_eq!(ours["tmp"].mode, 0o1777);
    assert_eq!(ours["bin/tool-link"].mode, 0o4755);
    assert_eq!(
        (ours["big-ids"].uid, ours["big-ids"].gid),
        (100_000, 200_000)
    );
    compare(&ours, &theirs, &["usr", "usr/lib", ""]);
}
