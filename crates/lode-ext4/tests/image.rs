//! System tests: images checked by e2fsck, a kernel mount and ext4-view.

mod common;

use common::{Kind, Spec, build, check_all, meta};
use lode_ext4::{Metadata, Options, Timestamp};

fn opts() -> Options {
    Options {
        seed: *b"lode-ext4-tests!",
        time: 1_700_000_000,
        ..Options::default()
    }
}

/// A VFS-format POSIX ACL: user::rw-, user:1000:r--, group::r--, mask::r--, other::---.
fn acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Every inode kind, in two layers, with the corner cases that matter.
pub fn every_kind() -> Spec {
    let mut s = Spec::new(2);
    let cap = vec![
        1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    s.add("bin", Kind::Dir, meta(0o755, 0, 0))
        .add(
            "bin/ping",
            Kind::File(b"\x7fELF ping".to_vec()),
            meta(0o4755, 0, 0).with_xattr(b"security.capability", &cap),
        )
        .add("bin/empty", Kind::File(Vec::new()), meta(0o644, 0, 0))
        .add(
            "bin/sh",
            Kind::Symlink(b"busybox".to_vec()),
            meta(0o777, 0, 0),
        )
        .add(
            "bin/long",
            // ext4-view rejects components over 255 bytes, so use several.
            Kind::Symlink(b"../some-directory/".repeat(20)),
            meta(0o777, 70000, 70001),
        )
        .add(
            "bin/exactly60",
            Kind::Symlink(vec![b'y'; 60]),
            meta(0o777, 0, 0),
        )
        .add("bin/59", Kind::Symlink(vec![b'z'; 59]), meta(0o777, 0, 0))
        .add("dev", Kind::Dir, meta(0o755, 0, 0))
        .add("dev/null", Kind::Char(1, 3), meta(0o666, 0, 0))
        .add("dev/big", Kind::Char(300, 70000), meta(0o600, 0, 0))
        .add("dev/sda", Kind::Block(8, 0), meta(0o660, 0, 6))
        .add("dev/fifo", Kind::Fifo, meta(0o644, 0, 0))
        .add("dev/sock", Kind::Socket, meta(0o755, 0, 0))
        .add("tmp", Kind::Dir, meta(0o1777, 0, 0))
        .add("etc", Kind::Dir, meta(0o2755, 4_000_000_000, 4_000_000_001))
        .add(
            "etc/passwd",
            Kind::File(b"root:x:0:0::/root:/bin/sh\n".to_vec()),
            meta(0o644, 0, 0)
                .with_xattr(b"user.a", b"1")
                .with_xattr(b"trusted.overlay.opaque", b"y")
                .with_xattr(b"user.big", &[0xAB; 1500])
                .with_xattr(b"system.posix_acl_access", &acl()),
        )
        .add(
            "etc/shadow",
            Kind::File(b"root:*:1::::::\n".to_vec()),
            meta(0o640, 0, 42).with_xattr(b"user.big", &[0xAB; 1500]),
        )
        .add(
            "etc/old",
            Kind::File(b"from 1960".to_vec()),
            Metadata::new(0o644, 1, 1).with_times(Timestamp::new(-300_000_000, 999_999_999)),
        )
        .add(
            "etc/future",
            Kind::File(b"from 2200".to_vec()),
            Metadata::new(0o644, 1, 1).with_times(Timestamp::new(7_258_118_400, 1)),
        )
        .add(
            "sparse",
            Kind::File({
                let mut v = vec![0u8; 5 * 4096 + 100];
                v[4096 * 2] = 1;
                v[5 * 4096 + 99] = 9;
                v
            }),
            meta(0o600, 0, 0),
        )
        .add("zeros", Kind::File(vec![0u8; 3 * 4096]), meta(0o600, 0, 0))
        .add_in(1, "usr", Kind::Dir, meta(0o755, 0, 0))
        .add_in(
            1,
            "usr/data",
            Kind::File(vec![7u8; 70_000]),
            meta(0o644, 0, 0),
        )
        // A hardlink in the upper layer to a lower-layer file.
        .add_in(
            1,
            "usr/ping2",
            Kind::Hardlink(b"bin/ping".to_vec()),
            meta(0, 0, 0),
        )
        .add_in(
            1,
            "usr/ping3",
            Kind::Hardlink(b"/usr/ping2".to_vec()),
            meta(0, 0, 0),
        )
        .add_in(
            1,
            "usr/weird name\u{e9}",
            Kind::File(b"x".to_vec()),
            meta(0o400, 0, 0),
        );
    s.add(
        "bin/hidden",
        Kind::File(vec![3u8; 10_000]),
        meta(0o644, 0, 0),
    )
    .add_in(
        1,
        "usr/hidden",
        Kind::File(vec![4u8; 5_000]),
        meta(0o644, 0, 0),
    )
    .hide("bin/hidden")
    .hide("usr/hidden");
    s
}

#[test]
fn every_inode_kind_is_clean_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("kinds.img");
    let spec = every_kind();
    let summary = build(&spec, opts(), &img);
    assert_eq!(summary.regions.len(), 2);
    check_all(&spec, &img);
}

#[test]
fn empty_tree_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.img");
    let spec = Spec::new(0);
    let summary = build(&spec, Options::default(), &img);
    assert_eq!(summary.groups, 1);
    check_all(&spec, &img);
    let Some(dumpe2fs) = lode_testkit::tool_from("dumpe2fs", "e2fsprogs") else {
        return;
    };
    let out = std::process::Command::new(dumpe2fs)
        .arg(&img)
        .output()
        .expect("run dumpe2fs");
    let text = String::from_utf8_lossy(&out.stdout);
    let features = text
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap();
    assert_eq!(
        features.split_whitespace().skip(2).collect::<Vec<_>>(),
        [
            "ext_attr",
            "sparse_super2",
            "filetype",
            "extent",
            "flex_bg",
            "sparse_super",
            "large_file",
            "dir_nlink",
            "extra_isize"
        ]
    );
    assert!(!text.contains("Backup superblock"), "{text}");
    assert!(!text.contains("Reserved GDT blocks"), "{text}");
}

#[test]
fn deep_tree() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("deep.img");
    let mut spec = Spec::new(1);
    let mut path = String::new();
    for i in 0..300 {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(&format!("d{i}"));
        spec.add(&path, Kind::Dir, meta(0o755, i, i));
        spec.add(
            &format!("{path}/f"),
            Kind::File(format!("depth {i}").into_bytes()),
            meta(0o644, 0, 0),
        );
    }
    build(&spec, opts(), &img);
    check_all(&spec, &img);
}

/// FNV-1a, to pin an image's bytes in a test.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The same tree gives the same bytes in every version: lode's images
/// dedupe across versions only so, and a change here is a format change.
#[test]
fn image_bytes_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let mut got = Vec::new();
    for (name, spec) in [("every kind", every_kind()), ("empty", Spec::new(0))] {
        let img = dir.path().join("pinned.img");
        build(&spec, opts(), &img);
        got.push((name, format!("{:016x}", fnv(&std::fs::read(&img).unwrap()))));
    }
    let want = [
        ("every kind", "98aab3d967b953d7"),
        ("empty", "3461596b8ecccd73"),
    ];
    let want: Vec<(&str, String)> = want.iter().map(|(n, h)| (*n, h.to_string())).collect();
    assert_eq!(got, want);
}
