//! Hostile and broken images: each refused with an error naming the layer
//! and the entry, never a panic.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use lode_oci::{Digest, FlattenOptions};
use lode_testkit::{LoopMount, e2fsck_clean};

/// Flattens a one-image layout of `layers`; returns the error text.
fn fail_with(layers: &[(Vec<u8>, Comp)], opts: FlattenOptions) -> (String, Vec<Digest>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    l.image("t", layers);
    let digests = layer_digests(&l.dir);
    let f = fs::File::create(tmp.path().join("img")).unwrap();
    let err = lode_oci::flatten(&l.source("t"), f, &opts, &|_| {}).unwrap_err();
    (err.to_string(), digests)
}

fn fail(layers: &[(Vec<u8>, Comp)]) -> (String, Vec<Digest>) {
    fail_with(layers, opts())
}

/// The layer digests of the only image in a layout.
fn layer_digests(dir: &Path) -> Vec<Digest> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let md: Digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(md.hex())).unwrap())
            .unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn one(l: &mut Layer) -> Vec<(Vec<u8>, Comp)> {
    vec![(l.finish(), Comp::Gzip)]
}

#[test]
fn path_traversal() {
    let (err, d) = fail(&one(Layer::new().raw(
        b"a/../../etc/passwd",
        tar::EntryType::Regular,
        b"",
        b"x",
    )));
    assert_eq!(
        err,
        format!(
            "layer 0 ({}), entry \"a/../../etc/passwd\" (at byte 0): path escapes the root with `..`",
            d[0]
        )
    );
}

#[test]
fn absolute_and_dot_names_are_normalised() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    let mut layer = Layer::new();
    layer
        .raw(b"/etc/", tar::EntryType::Directory, b"", b"")
        .raw(b"/etc/passwd", tar::EntryType::Regular, b"", b"abs")
        .raw(b"./etc/./group", tar::EntryType::Regular, b"", b"dot")
        // Duplicates: the last entry wins.
        .raw(b"etc/dup", tar::EntryType::Regular, b"", b"first")
        .raw(b"etc/dup", tar::EntryType::Regular, b"", b"second");
    l.image("t", &one(&mut layer));
    let img = tmp.path().join("img");
    flatten_to(&l.source("t"), &img).unwrap();
    e2fsck_clean(&img);
    if let Some(m) = LoopMount::new(&img) {
        let items = scan(m.path());
        assert_eq!(items["etc/passwd"].content, b"abs");
        assert_eq!(items["etc/group"].content, b"dot");
        assert_eq!(items["etc/dup"].content, b"second");
    }
}

#[test]
fn symlink_escape_through_a_parent() {
    let mut base = Layer::new();
    base.symlink("evil", "/etc");
    let mut upper = Layer::new();
    upper.file("evil/passwd", b"owned");
    let (err, d) = fail(&[(base.finish(), Comp::Gzip), (upper.finish(), Comp::Gzip)]);
    assert_eq!(
        err,
        format!(
            "layer 1 ({}), entry \"evil/passwd\" (at byte 0): /evil is a symlink; an entry may not pass through one",
            d[1]
        )
    );
}

#[test]
fn hardlinks_to_missing_or_escaping_targets() {
    let (err, d) = fail(&one(Layer::new().raw(
        b"hl",
        tar::EntryType::Link,
        b"nothere",
        b"",
    )));
    assert_eq!(
        err,
        format!(
            "layer 0 ({}), entry \"hl\" (at byte 0): hardlink target /nothere does not exist",
            d[0]
        )
    );
    let (err, _) = fail(&one(Layer::new().raw(
        b"hl",
        tar::EntryType::Link,
        b"../../etc/shadow",
        b"",
    )));
    assert!(
        err.ends_with("entry \"hl\" (at byte 0): hardlink target \"../../etc/shadow\": path escapes the root with `..`"),
        "{err}"
    );
    let mut l = Layer::new();
    l.symlink("s", "/etc");
    let (err, _) = fail(&one(l.raw(b"hl", tar::EntryType::Link, b"s/passwd", b"")));
    assert!(
        err.ends_with(
            "hardlink target \"s/passwd\": /s is a symlink; an entry may not pass through one"
        ),
        "{err}"
    );
}

#[test]
fn long_names() {
    let name = format!("{}/x", "n".repeat(256));
    let (err, d) = fail(&one(Layer::new()
        .pax(&[("path", name.as_bytes())])
        .file("short", b"")));
    assert_eq!(
        err,
        format!(
            "layer 0 ({}), entry \"{name}\" (at byte 1024): name component of 256 bytes is longer than 255",
            d[0]
        )
    );
}

fn big_layer() -> Vec<u8> {
    let mut l = Layer::new();
    for i in 0..20 {
        l.file(&format!("f{i}"), &vec![0u8; 100_000]);
    }
    l.finish()
}

#[test]
fn truncated_tar_and_gzip() {
    let tar = big_layer();
    let cut = tar[..250_000].to_vec();
    let tmp = tempfile::tempdir().unwrap();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    l.image_raw(
        "t",
        &[RawLayer {
            media_type: Comp::None.media_type().into(),
            diff_id: digest(&tar),
            blob: cut.clone(),
        }],
    );
    let f = fs::File::create(tmp.path().join("img")).unwrap();
    let err = lode_oci::flatten(&l.source("t"), f, &opts(), &|_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "layer 0 ({}): tar: archive truncated at byte 250000 (inside an entry's data)",
            digest(&cut)
        )
    );

    let gz = Comp::Gzip.compress(&tar);
    let cut = gz[..gz.len() / 2].to_vec();
    let mut l = OciLayout::new(&tmp.path().join("layout2"));
    l.image_raw(
        "t",
        &[RawLayer {
            media_type: Comp::Gzip.media_type().into(),
            diff_id: digest(&tar),
            blob: cut.clone(),
        }],
    );
    let f = fs::File::create(tmp.path().join("img")).unwrap();
    let err = lode_oci::flatten(&l.source("t"), f, &opts(), &|_| {}).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "layer 0 ({}): gzip stream is corrupt or truncated:",
            digest(&cut)
        )),
        "{text}"
    );
}

#[test]
fn digest_and_diff_id_mismatches() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    l.image("t", &[(big_layer(), Comp::Gzip)]);
    let d = layer_digests(&l.dir)[0];
    let path = l.dir.join("blobs/sha256").join(d.hex());
    let mut blob = fs::read(&path).unwrap();
    let mid = blob.len() / 2;
    blob[mid] ^= 0xff;
    fs::write(&path, &blob).unwrap();
    let err = flatten_to(&l.source("t"), &tmp.path().join("img")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "layer 0 ({d}): blob content has digest {}, not the digest that names it",
            digest(&blob)
        )
    );

    let tar = big_layer();
    let mut l = OciLayout::new(&tmp.path().join("layout2"));
    let wrong = digest(b"something else");
    l.image_raw(
        "t",
        &[RawLayer {
            blob: Comp::Zstd.compress(&tar),
            media_type: Comp::Zstd.media_type().into(),
            diff_id: wrong,
        }],
    );
    let d = layer_digests(&l.dir)[0];
    let err = flatten_to(&l.source("t"), &tmp.path().join("img")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "layer 0 ({d}): uncompressed tar has digest {}, but the config's diff_id is {wrong}",
            digest(&tar)
        )
    );

    // The media type says gzip, the bytes are zstd.
    let mut l = OciLayout::new(&tmp.path().join("layout3"));
    l.image_raw(
        "t",
        &[RawLayer {
            blob: Comp::Zstd.compress(&tar),
            media_type: Comp::Gzip.media_type().into(),
            diff_id: digest(&tar),
        }],
    );
    let err = flatten_to(&l.source("t"), &tmp.path().join("img")).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("media type \"application/vnd.oci.image.layer.v1.tar+gzip\" says gzip, but the blob is zstd"),
        "{err}"
    );
}

#[test]
fn corrupt_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    l.image("t", &[(big_layer(), Comp::Gzip)]);
    // Find the config (the blob that mentions diff_ids) and change it.
    for e in fs::read_dir(l.dir.join("blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        let b = fs::read(&p).unwrap();
        if b.windows(8).any(|w| w == b"diff_ids") {
            fs::write(&p, [&b[..], b" "].concat()).unwrap();
        }
    }
    let err = flatten_to(&l.source("t"), &tmp.path().join("img")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("{}: config sha256:", l.source("t"))),
        "{text}"
    );
    assert!(text.contains(": content has digest sha256:"), "{text}");
}

#[test]
fn caps() {
    let layers = vec![(big_layer(), Comp::Gzip), (big_layer(), Comp::Gzip)];
    let mut o = opts();
    o.limits.max_layers = 1;
    let (err, _) = fail_with(&layers, o);
    assert_eq!(err, "the image has 2 layers, more than the cap of 1");

    let mut o = opts();
    o.limits.merge.max_entries = 30;
    let (err, d) = fail_with(&layers, o);
    assert_eq!(
        err,
        format!(
            "layer 1 ({}), entry \"f10\" (at byte 1008640): more than 30 entries in the image",
            d[1]
        )
    );

    // A decompression bomb: the total size cap…
    let mut o = opts();
    o.limits.max_uncompressed_bytes = 3_000_000;
    let (err, d) = fail_with(&layers, o);
    assert_eq!(
        err,
        format!(
            "layer 1 ({}): the image's uncompressed layers pass the cap of 3000000 bytes",
            d[1]
        )
    );
    // …and the expansion ratio.
    let mut o = opts();
    o.limits.max_expansion_ratio = 10;
    o.limits.expansion_slack = 0;
    let (err, d) = fail_with(&layers, o);
    assert!(
        err.starts_with(&format!("layer 0 ({}): expands more than 10x (", d[0])),
        "{err}"
    );

    let mut o = opts();
    o.limits.tar.max_extended_header = 100;
    let (err, d) = fail_with(
        &one(Layer::new()
            .pax(&[("comment", &[b'c'; 200])])
            .file("x", b"")),
        o,
    );
    assert_eq!(
        err,
        format!(
            "layer 0 ({}): tar: header at byte 0: PAX extended header of 213 bytes exceeds the cap of 100 bytes",
            d[0]
        )
    );
}

/// One entry must not make the merge hold thousands of records: a deep
/// path is refused, and the directories a path implies count as entries.
#[test]
fn deep_paths_and_implied_directories_are_capped() {
    let deep = format!("{}f", "d/".repeat(300));
    let (err, d) = fail(&one(Layer::new().file(&deep, b"x")));
    assert_eq!(
        err,
        format!(
            "layer 0 ({}), entry \"{deep}\" (at byte 1536): path of 301 components is deeper than the cap of 256",
            d[0]
        )
    );

    let mut o = opts();
    o.limits.merge.max_entries = 10;
    let (err, d) = fail_with(&one(Layer::new().file("a/b/c/d/e/f/g/h/i/j/k", b"x")), o);
    assert_eq!(
        err,
        format!(
            "layer 0 ({}), entry \"a/b/c/d/e/f/g/h/i/j/k\" (at byte 0): more than 10 entries in the image",
            d[0]
        )
    );
}

/// Every data extent of every file is held until the image is written, so
/// a layer of files full of holes is capped in extents.
#[test]
fn file_extents_are_capped() {
    let mut holes = Vec::new();
    for i in 0..8u8 {
        holes.extend(std::iter::repeat_n(i % 2, 4096));
    }
    let mut o = opts();
    o.limits.max_extents = 5;
    let (err, d) = fail_with(&one(Layer::new().file("a", &holes).file("b", &holes)), o);
    assert_eq!(
        err,
        format!(
            "layer 0 ({}): entry \"b\": file data extents pass the image's cap of 5",
            d[0]
        )
    );
}

/// A PAX 1.0 sparse file of `realsize` logical bytes holding one 4 KiB segment: a few
/// KiB of tar that would make the writer scan `realsize` bytes of holes.
fn sparse(l: &mut Layer, name: &str, realsize: u64) {
    let real = realsize.to_string();
    l.pax(&[
        ("GNU.sparse.major", b"1"),
        ("GNU.sparse.minor", b"0"),
        ("GNU.sparse.name", name.as_bytes()),
        ("GNU.sparse.realsize", real.as_bytes()),
    ]);
    let mut data = b"1\n0\n4096\n".to_vec();
    data.resize(512, 0);
    data.extend(std::iter::repeat_n(7u8, 4096));
    l.file(name, &data);
}

#[test]
fn sparse_file_data_is_capped_before_it_is_scanned() {
    let mut layer = Layer::new();
    sparse(&mut layer, "huge", 1 << 40);
    let (err, d) = fail_with(&one(&mut layer), opts());
    assert_eq!(
        err,
        format!(
            "layer 0 ({}): entry \"huge\": its 1099511627776 bytes of file data (holes \
             included) pass the image's cap of 68719476736",
            d[0]
        )
    );

    // The cap is for the image, all files together.
    let mut layer = Layer::new();
    sparse(&mut layer, "a", 3 << 20);
    sparse(&mut layer, "b", 3 << 20);
    let mut o = opts();
    o.limits.max_file_bytes = 5 << 20;
    let (err, d) = fail_with(&one(&mut layer), o);
    assert_eq!(
        err,
        format!(
            "layer 0 ({}): entry \"b\": its 3145728 bytes of file data (holes included) pass \
             the image's cap of 5242880",
            d[0]
        )
    );
}
