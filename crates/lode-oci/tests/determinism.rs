//! Determinism and dedup: the same image flattened in different
//! environments gives the same bytes, and images sharing a base layer
//! share that layer's region byte for byte.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use lode_testkit::{LoopMount, e2fsck_clean};

const CHILD: &str = "LODE_OCI_TEST_CHILD_OUT";

fn layout(dir: &Path) -> OciLayout {
    let mut base = Layer::new();
    base.dir("etc", 0o755)
        .file("etc/os-release", b"ID=test\n")
        .file(
            "etc/big",
            &(0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
        )
        .dir("usr/share/doc", 0o755)
        .file("usr/share/doc/readme", &vec![b'r'; 50_000])
        .file("usr/share/doc/license", &vec![b'l'; 70_000])
        .symlink("usr/share/doc/link", "readme");
    let base = base.finish();
    let mut app1 = Layer::new();
    app1.dir("app", 0o755).file("app/one", &vec![1u8; 90_000]);
    let mut app2 = Layer::new();
    app2.dir("app", 0o755)
        .file("app/two", &vec![2u8; 10_000])
        .whiteout("usr/share/doc/license")
        .opaque("etc");
    let mut l = OciLayout::new(dir);
    l.image(
        "a",
        &[(base.clone(), Comp::Gzip), (app1.finish(), Comp::Gzip)],
    );
    l.image("b", &[(base, Comp::Gzip), (app2.finish(), Comp::Zstd)]);
    l
}

/// Runs in a child process (see `same_bytes_in_any_environment`).
#[test]
fn child_flatten() {
    let Ok(out) = std::env::var(CHILD) else {
        return;
    };
    // A relative reference: the child runs in another directory.
    let source = "oci:layout:a".parse().unwrap();
    flatten_to(&source, Path::new(&out)).unwrap();
}

#[test]
fn same_bytes_in_any_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(&tmp.path().join("layout"));
    let first = tmp.path().join("first.ext4");
    let done = flatten_to(&l.source("a"), &first).unwrap();

    let exe = std::env::current_exe().unwrap();
    let second = tmp.path().join("second.ext4");
    let st = Command::new("sh")
        .arg("-c")
        .arg("umask 077; exec \"$0\" child_flatten --exact --test-threads=1")
        .arg(&exe)
        .current_dir(tmp.path())
        .env(CHILD, &second)
        .env("TZ", "Pacific/Kiritimati")
        .env("LC_ALL", "C")
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        fs::read(&first).unwrap() == fs::read(&second).unwrap(),
        "images differ"
    );
    assert_eq!(
        done.summary.image_size,
        fs::metadata(&second).unwrap().len()
    );
    e2fsck_clean(&first);
}

#[test]
fn base_layer_region_is_shared() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(&tmp.path().join("layout"));
    let (ia, ib) = (tmp.path().join("a.ext4"), tmp.path().join("b.ext4"));
    let a = flatten_to(&l.source("a"), &ia).unwrap();
    let b = flatten_to(&l.source("b"), &ib).unwrap();
    e2fsck_clean(&ia);
    e2fsck_clean(&ib);
    let (bytes_a, bytes_b) = (fs::read(&ia).unwrap(), fs::read(&ib).unwrap());
    let region = |bytes: &[u8], f: &lode_oci::Flattened, i: usize| {
        let r = f.layers[i].region.byte_range();
        bytes[usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap()].to_vec()
    };
    let (ra, rb) = (region(&bytes_a, &a, 0), region(&bytes_b, &b, 0));
    assert!(ra.len() >= 400_000, "region 0 is {} bytes", ra.len());
    assert!(
        ra == rb,
        "the base layer's region differs between the images"
    );
    assert_eq!(a.layers[0].region, b.layers[0].region);
    assert_eq!(a.layers[0].diff_id, b.layers[0].diff_id);

    // Chunk by chunk: every chunk of the base region is in both images.
    let chunk = usize::try_from(opts().chunk_size).unwrap();
    let chunks = |bytes: &[u8]| -> std::collections::HashSet<Vec<u8>> {
        bytes.chunks(chunk).map(<[u8]>::to_vec).collect()
    };
    let (ca, cb) = (chunks(&bytes_a), chunks(&bytes_b));
    for c in ra.chunks(chunk) {
        assert!(ca.contains(c) && cb.contains(c));
    }

    if let Some(m) = LoopMount::new(&ib) {
        let items = scan(m.path());
        assert!(!items.contains_key("usr/share/doc/license"));
        assert!(!items.contains_key("etc/os-release"));
        assert_eq!(items["usr/share/doc/readme"].content, vec![b'r'; 50_000]);
    }
}

/// A layer pair that reaches every part of the writer's metadata region:
/// multi-block directories, shared xattr blocks past the kernel's refcount
/// limit, in-inode xattrs, long and short symlinks, old- and new-style
/// device numbers, hardlink groups that lose their first name, a file
/// whose holes need an extent index block, an explicit lost+found, a deep
/// path, and a second layer of whiteouts, an opaque directory and
/// replacements.
fn rich_layers() -> (Vec<u8>, Vec<u8>) {
    let mut base = Layer::new();
    base.dir("etc", 0o755)
        .file_full("etc/shadow", b"root:*:1::::::\n", 0o640, 0, 42)
        .dir("lost+found", 0o700)
        .file("lost+found/stray", b"kept\n")
        .dir("big", 0o755);
    for i in 0..3000u32 {
        let name = format!("big/entry-with-a-longish-name-{i:05}");
        if i % 7 == 0 {
            base.file(&name, format!("contents of {i}\n").as_bytes());
        } else {
            base.file(&name, b"");
        }
    }
    base.dir("x", 0o755);
    let shared = vec![0x5au8; 2000];
    for i in 0..1100u32 {
        base.pax(&[("SCHILY.xattr.user.shared", &shared[..])])
            .fifo(&format!("x/fifo{i:04}"));
    }
    base.pax(&[(
        "SCHILY.xattr.security.capability",
        &[
            1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ][..],
    )])
    .file_full("x/ping", b"\x7fELF", 0o4755, 0, 0);
    base.symlink("x/short", "ping")
        .symlink("x/long", &"../".repeat(60))
        .device("x/null", tar::EntryType::Char, 1, 3)
        .device("x/wide", tar::EntryType::Block, 300, 70_000)
        .dir("h", 0o755)
        .file("h/a", b"linked\n")
        .hardlink("h/b", "h/a")
        .hardlink("h/c", "h/b");
    let mut holes = Vec::new();
    for i in 0..200u32 {
        let fill = if i % 2 == 0 {
            0
        } else {
            u8::try_from(i % 251).unwrap()
        };
        holes.extend(std::iter::repeat_n(fill, 4096));
    }
    base.file("x/holes", &holes);
    let mut deep = String::from("deep");
    for i in 0..40 {
        deep.push_str(&format!("/level{i}"));
    }
    base.file(&format!("{deep}/leaf"), b"deep\n");
    base.file("replaced-by-dir", b"f")
        .dir("replaced-by-file", 0o755);
    let base = base.finish();

    let mut top = Layer::new();
    top.whiteout("h/a")
        .hardlink("h/d", "h/c")
        .dir("etc", 0o700)
        .opaque("big")
        .file("big/new", b"new\n")
        .dir("replaced-by-dir", 0o711)
        .file("replaced-by-dir/inside", b"i")
        .file("replaced-by-file", b"now a file")
        .whiteout("x/fifo0003");
    (base, top.finish())
}

/// The images of the sample family and of [`rich_layers`], pinned byte for
/// byte: lode's images dedupe across versions only while the same tree
/// always gives the same bytes, so a change here is a format change.
#[test]
fn image_bytes_are_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, top) = rich_layers();
    let mut l = OciLayout::new(&tmp.path().join("rich"));
    l.image("one", &[(base.clone(), Comp::None)]);
    l.image("two", &[(base, Comp::None), (top, Comp::Gzip)]);
    let sample = tmp.path().join("sample");
    lode_oci::sample::write_sample_family(&sample).unwrap();
    let mut got = Vec::new();
    for (name, source) in [
        ("rich one", l.source("one")),
        ("rich two", l.source("two")),
        (
            "sample app1",
            format!("oci:{}:app1", sample.display()).parse().unwrap(),
        ),
        (
            "sample app2",
            format!("oci:{}:app2", sample.display()).parse().unwrap(),
        ),
    ] {
        let out = tmp.path().join("image.ext4");
        flatten_to(&source, &out).unwrap();
        got.push((name, digest(&fs::read(&out).unwrap()).to_string()));
    }
    let want = [
        (
            "rich one",
            "sha256:695335dd5220dea019bda9d3fdbe818c352b579e0e70d68dab721f88b0ee5b01",
        ),
        (
            "rich two",
            "sha256:207f1d396ca1a25c6281492e9f5789b952424868f229c4e86b8850cc3384923f",
        ),
        (
            "sample app1",
            "sha256:d9fc6ca3730805fb89439cf25b2c9b19ad466da51f8bb20049a3b9b819c3dd2e",
        ),
        (
            "sample app2",
            "sha256:977e614611162e128fc42efe7479042b8f3b80cc61073af89e07a96eebc5df84",
        ),
    ];
    let want: Vec<(&str, String)> = want.iter().map(|(n, d)| (*n, d.to_string())).collect();
    assert_eq!(got, want);
}
