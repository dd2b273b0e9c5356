//! Inputs: docker-archive (hand-written and skopeo-written), image indexes
//! with several platforms, tag resolution.

mod common;

use std::fs;
use std::process::Command;

use common::*;
use lode_oci::ImageSource;
use lode_testkit::{LoopMount, e2fsck_clean};
use serde_json::json;

fn two_layers() -> Vec<Vec<u8>> {
    let mut a = Layer::new();
    a.dir("etc", 0o755)
        .file("etc/hostname", b"box\n")
        .file("etc/gone", b"x")
        .hardlink("etc/hn", "etc/hostname");
    let mut b = Layer::new();
    b.whiteout("etc/gone").file("hello", b"hello\n");
    vec![a.finish(), b.finish()]
}

#[test]
fn docker_archive_matches_oci_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let archive = tmp.path().join("image.tar");
    docker_archive(&archive, "example/app:1", &layers);
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    l.image(
        "1",
        &layers
            .iter()
            .map(|t| (t.clone(), Comp::Gzip))
            .collect::<Vec<_>>(),
    );

    let from_archive = tmp.path().join("archive.ext4");
    let src: ImageSource = format!("docker-archive:{}", archive.display())
        .parse()
        .unwrap();
    let a = flatten_to(&src, &from_archive).unwrap();
    e2fsck_clean(&from_archive);
    // By tag, with docker.io's implied prefix.
    let tagged: ImageSource = format!(
        "docker-archive:{}:docker.io/example/app:1",
        archive.display()
    )
    .parse()
    .unwrap();
    flatten_to(&tagged, &tmp.path().join("t.ext4")).unwrap();
    let from_layout = tmp.path().join("layout.ext4");
    let o = flatten_to(&l.source("1"), &from_layout).unwrap();
    assert_eq!(a.config, o.config);
    // docker-archive has no manifest: its digest is the image ID (config).
    assert_eq!(a.image_digest, a.config_digest);
    assert!(fs::read(&from_archive).unwrap() == fs::read(&from_layout).unwrap());

    let missing: ImageSource = format!("docker-archive:{}:other:2", archive.display())
        .parse()
        .unwrap();
    let err = flatten_to(&missing, &tmp.path().join("x.ext4")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no image tagged \"other:2\" (tags: example/app:1)",
            missing
        )
    );
}

#[test]
fn skopeo_docker_archive() {
    let Some(skopeo) = lode_testkit::tool_from("skopeo", "skopeo") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let layers = two_layers();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    l.image(
        "1",
        &layers
            .iter()
            .map(|t| (t.clone(), Comp::Gzip))
            .collect::<Vec<_>>(),
    );
    let archive = tmp.path().join("skopeo.tar");
    let out = Command::new(&skopeo)
        .args(["--insecure-policy", "copy"])
        .arg(format!("oci:{}:1", l.dir.display()))
        .arg(format!(
            "docker-archive:{}:example/app:1",
            archive.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ia, ib) = (tmp.path().join("a.ext4"), tmp.path().join("b.ext4"));
    let src: ImageSource = format!("docker-archive:{}", archive.display())
        .parse()
        .unwrap();
    flatten_to(&src, &ia).unwrap();
    flatten_to(&l.source("1"), &ib).unwrap();
    assert!(fs::read(&ia).unwrap() == fs::read(&ib).unwrap());
}

#[test]
fn index_picks_linux_amd64_and_tags_resolve() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    let mut amd = Layer::new();
    amd.file("arch", b"amd64");
    let mut arm = Layer::new();
    arm.file("arch", b"arm64");
    let mut d_amd = l.manifest(&[(amd.finish(), Comp::Gzip)]);
    d_amd["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut d_arm = l.manifest(&[(arm.finish(), Comp::Gzip)]);
    d_arm["platform"] = json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [d_arm, d_amd],
    }))
    .unwrap();
    let id = l.blob(&index);
    l.push_index(json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": id.to_string(), "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }));
    let img = tmp.path().join("m.ext4");
    let done = flatten_to(&l.source("multi"), &img).unwrap();
    assert_eq!(
        done.image_digest.to_string(),
        d_amd["digest"].as_str().unwrap()
    );
    if let Some(m) = LoopMount::new(&img) {
        assert_eq!(fs::read(m.path().join("arch")).unwrap(), b"amd64");
    }

    // Only tag: no tag needed. An unknown tag names the known ones.
    let untagged: ImageSource = format!("oci:{}", l.dir.display()).parse().unwrap();
    flatten_to(&untagged, &img).unwrap();
    let err = flatten_to(&l.source("nope"), &img).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no image tagged \"nope\" (tags: multi)",
            l.source("nope")
        )
    );

    // No platform match.
    let mut o = opts();
    o.platform = lode_oci::Platform {
        architecture: "s390x".into(),
        os: "linux".into(),
        variant: None,
    };
    let f = fs::File::create(&img).unwrap();
    let err = lode_oci::flatten(&l.source("multi"), f, &o, &|_| {}).unwrap_err();
    assert!(
        err.to_string().ends_with(&format!(
            "no image for linux/s390x in index {id} (has: linux/arm64/v8, linux/amd64)"
        )),
        "{err}"
    );
}

#[test]
fn progress_reports_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = OciLayout::new(&tmp.path().join("layout"));
    l.image(
        "1",
        &two_layers()
            .into_iter()
            .map(|t| (t, Comp::None))
            .collect::<Vec<_>>(),
    );
    let seen = std::cell::RefCell::new(Vec::new());
    let f = fs::File::create(tmp.path().join("p.ext4")).unwrap();
    lode_oci::flatten(&l.source("1"), f, &opts(), &|p| seen.borrow_mut().push(p)).unwrap();
    let seen = seen.into_inner();
    assert!(matches!(
        seen[0],
        lode_oci::Progress::Resolved { layers: 2, .. }
    ));
    assert!(matches!(seen.last(), Some(lode_oci::Progress::Finishing)));
    let done = seen
        .iter()
        .filter(|p| matches!(p, lode_oci::Progress::LayerDone { .. }))
        .count();
    assert_eq!(done, 2);
}
