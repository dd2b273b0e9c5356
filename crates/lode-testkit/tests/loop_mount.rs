//! An ext4 image made by mkfs.ext4 mounts read-only through a loop device, and is let go.

use std::process::Command;

use lode_testkit::{LoopMount, is_mounted, seeded_bytes, tool_from};

#[test]
fn an_ext4_image_mounts_read_only_and_is_released() {
    let Some(mkfs) = tool_from("mkfs.ext4", "e2fsprogs") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("dir")).unwrap();
    let data = seeded_bytes(100_000, 5);
    std::fs::write(tree.join("dir/file"), &data).unwrap();
    let image = work.path().join("img");
    let out = Command::new(mkfs)
        .args(["-q", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("8M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let Some(m) = LoopMount::new(&image) else {
        return;
    };
    assert!(is_mounted(m.path()));
    assert!(m.device().starts_with("/dev/loop"), "{}", m.device());
    assert_eq!(std::fs::read(m.path().join("dir/file")).unwrap(), data);
    let err = std::fs::write(m.path().join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "EROFS: {err}");
    let root = m.path().to_path_buf();
    m.release();
    assert!(!is_mounted(&root));

    // At a directory of the caller's, made when missing; dropping it lets go too.
    let dir = work.path().join("a/b");
    let m = LoopMount::at(&image, &dir).expect("mounted once already");
    assert_eq!(m.path(), dir);
    assert_eq!(std::fs::read(dir.join("dir/file")).unwrap(), data);
    drop(m);
    assert!(!is_mounted(&dir));
}
