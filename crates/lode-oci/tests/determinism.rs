//! Determinism and dedup: the same image flattened in different
//! environments gives the same bytes, and images sharing a base layer
//! share that layer's region byte for byte.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

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
    e2fsck(&first);
}

#[test]
fn base_layer_region_is_shared() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(&tmp.path().join("layout"));
    let (ia, ib) = (tmp.path().join("a.ext4"), tmp.path().join("b.ext4"));
    let a = flatten_to(&l.source("a"), &ia).unwrap();
    let b = flatten_to(&l.source("b"), &ib).unwrap();
    e2fsck(&ia);
    e2fsck(&ib);
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

    if can_mount() {
        let m = Mount::new(&ib);
        let items = scan(m.path());
        assert!(!items.contains_key("usr/share/doc/license"));
        assert!(!items.contains_key("etc/os-release"));
        assert_eq!(items["usr/share/doc/readme"].content, vec![b'r'; 50_000]);
    }
}
