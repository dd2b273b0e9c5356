//! Determinism and the dedup property of the region layout.

mod common;

use common::{Kind, Spec, build, check_all, meta};
use lode_ext4::{Options, Summary};

fn opts() -> Options {
    Options {
        seed: [0x42; 16],
        ..Options::default()
    }
}

fn base_layer(s: &mut Spec) {
    s.add("usr", Kind::Dir, meta(0o755, 0, 0))
        .add("usr/lib", Kind::Dir, meta(0o755, 0, 0));
    for i in 0..40u8 {
        let len = 1000 * usize::from(i) * usize::from(i) + 17;
        let body: Vec<u8> = (0..len)
            .map(|j| u8::try_from(j % 256).unwrap() ^ i)
            .collect();
        s.add(
            &format!("usr/lib/lib{i}.so"),
            Kind::File(body),
            meta(0o644, 0, 0),
        );
    }
    s.add("usr/zero", Kind::File(vec![0; 600_000]), meta(0o644, 0, 0));
}

fn image(spec: &Spec, name: &str, dir: &std::path::Path) -> (Vec<u8>, Summary) {
    let img = dir.join(name);
    let summary = build(spec, opts(), &img);
    check_all(spec, &img);
    (std::fs::read(&img).unwrap(), summary)
}

#[test]
fn same_tree_gives_identical_bytes_from_any_working_dir() {
    let mut spec = Spec::new(2);
    base_layer(&mut spec);
    spec.add_in(
        1,
        "app",
        Kind::File(b"#!/bin/sh\n".to_vec()),
        meta(0o755, 0, 0),
    )
    .add_in(1, "link", Kind::Hardlink(b"app".to_vec()), meta(0, 0, 0));
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    std::env::set_current_dir(a_dir.path()).unwrap();
    let (a, _) = image(&spec, "a.img", a_dir.path());
    std::env::set_current_dir(b_dir.path()).unwrap();
    let (b, _) = image(&spec, "b.img", b_dir.path());
    assert!(a == b, "images differ");
    // The seed changes the UUID and nothing else of the layout.
    let img = b_dir.path().join("c.img");
    build(
        &spec,
        Options {
            seed: [1; 16],
            ..opts()
        },
        &img,
    );
    let c = std::fs::read(&img).unwrap();
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
}

#[test]
fn shared_base_layer_gives_identical_region_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut one = Spec::new(2);
    base_layer(&mut one);
    one.add_in(1, "app", Kind::File(vec![1; 50_000]), meta(0o755, 0, 0));

    // Same base; an upper layer that hides some base files (whiteouts: the
    // files stay appended but leave the tree) and replaces one.
    let mut two = Spec::new(2);
    base_layer(&mut two);
    two.hide("usr/lib/lib3.so")
        .hide("usr/lib/lib7.so")
        .hide("usr/lib/lib39.so");
    two.add_in(
        1,
        "other",
        Kind::File(vec![2; 3_000_000]),
        meta(0o600, 5, 5),
    )
    .add_in(
        1,
        "usr/lib/lib5.so",
        Kind::File(b"patched".to_vec()),
        meta(0o644, 0, 0),
    );

    let (a, sa) = image(&one, "one.img", dir.path());
    let (b, sb) = image(&two, "two.img", dir.path());
    assert_eq!(sa.regions[0], sb.regions[0], "same first region placement");
    let r = sa.regions[0].byte_range();
    let to = |x: u64| usize::try_from(x).unwrap();
    assert!(
        a[to(r.start)..to(r.end)] == b[to(r.start)..to(r.end)],
        "first-layer regions differ"
    );
    assert_eq!(r.start % (512 * 1024), 0);
    assert_eq!(r.end % (512 * 1024), 0);
    assert_ne!(a.len(), b.len());
}
