//! Property: any small tree builds into an e2fsck-clean image that reads
//! back the same (ext4-view, and a kernel mount when running as root).

mod common;

use common::{Kind, Spec, build, verify_mount, verify_view};
use lode_ext4::{Metadata, Options, Timestamp};
use lode_testkit::{LoopMount, e2fsck_clean};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Op {
    parent: usize,
    name: String,
    kind: u8,
    layer: usize,
    mode: u32,
    uid: u32,
    time: (i64, u32),
    body: Vec<u8>,
    zeros: usize,
    xattr: Option<Vec<u8>>,
}

fn op() -> impl Strategy<Value = Op> {
    (
        any::<usize>(),
        "[a-z]{1,12}",
        0u8..7,
        0usize..2,
        0u32..0o7777,
        prop_oneof![Just(0u32), 1u32..70_000, Just(u32::MAX - 1)],
        (-(1i64 << 31)..(1i64 << 33), 0u32..1_000_000_000),
        proptest::collection::vec(any::<u8>(), 0..600),
        0usize..4,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
    )
        .prop_map(
            |(parent, name, kind, layer, mode, uid, time, body, zeros, xattr)| Op {
                parent,
                name,
                kind,
                layer,
                mode,
                uid,
                time,
                body,
                zeros,
                xattr,
            },
        )
}

fn spec_of(ops: &[Op]) -> Spec {
    let mut spec = Spec::new(2);
    let mut dirs: Vec<String> = vec![String::new()];
    let mut files: Vec<String> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        let parent = &dirs[o.parent % dirs.len()];
        let path = if parent.is_empty() {
            format!("{}{i}", o.name)
        } else {
            format!("{parent}/{}{i}", o.name)
        };
        let mut meta =
            Metadata::new(o.mode, o.uid, o.uid / 2).with_times(Timestamp::new(o.time.0, o.time.1));
        if let Some(v) = &o.xattr {
            meta = meta.with_xattr(format!("user.{}", o.name).as_bytes(), v);
        }
        let kind = match o.kind {
            0 | 1 => {
                dirs.push(path.clone());
                Kind::Dir
            }
            2 | 3 => {
                // Zero blocks between data, to exercise holes.
                let mut body = o.body.clone();
                body.splice(0..0, vec![0u8; o.zeros * 4096]);
                body.extend(vec![0u8; o.zeros * 4096]);
                body.extend_from_slice(&o.body);
                files.push(path.clone());
                Kind::File(body)
            }
            4 if !o.body.is_empty() => {
                let len = o.body.len().min(200);
                let target: Vec<u8> = o.body[..len].iter().map(|b| b'a' + b % 26).collect();
                Kind::Symlink(target)
            }
            5 if !files.is_empty() => {
                let t = files[o.parent % files.len()].clone();
                spec.add_in(o.layer.max(1), &path, Kind::Hardlink(t.into_bytes()), meta);
                continue;
            }
            6 => Kind::Char(o.uid % 4096, o.mode),
            _ => Kind::Fifo,
        };
        if !matches!(kind, Kind::Dir | Kind::File(_)) {
            // The kernel hides user.* xattrs of special files and symlinks.
            meta.xattrs.clear();
        }
        if matches!(kind, Kind::Symlink(_)) {
            meta.mode = 0o777;
        }
        spec.add_in(o.layer, &path, kind, meta);
    }
    spec
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(ops in proptest::collection::vec(op(), 0..40), seed in any::<[u8; 16]>()) {
        let spec = spec_of(&ops);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("random.img");
        build(&spec, Options { seed, ..Options::default() }, &img);
        e2fsck_clean(&img);
        verify_view(&spec, &img);
        if let Some(m) = LoopMount::new(&img) {
            verify_mount(&spec, &m);
        }
    }
}
