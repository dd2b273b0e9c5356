//! An ext4 image made by mkfs.ext4 checks clean, mounts read-only through a loop device,
//! and is let go; a damaged one does not check clean; a mount left behind is cleared.

use std::path::{Path, PathBuf};
use std::process::Command;

use lode_testkit::{
    LoopMount, MountGuard, e2fsck_clean, is_mounted, root_or_skip, seeded_bytes, tool_from,
};

/// An 8 MiB ext4 image at `dir/img` holding `dir/file` with `data`; `None` after a skip
/// when mkfs.ext4 is missing.
fn image(dir: &Path, data: &[u8]) -> Option<PathBuf> {
    let mkfs = tool_from("mkfs.ext4", "e2fsprogs")?;
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("dir")).unwrap();
    std::fs::write(tree.join("dir/file"), data).unwrap();
    let image = dir.join("img");
    let out = Command::new(mkfs)
        .args(["-q", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("8M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    Some(image)
}

#[test]
fn an_ext4_image_mounts_read_only_and_is_released() {
    let work = tempfile::tempdir().unwrap();
    let data = seeded_bytes(100_000, 5);
    let Some(image) = image(work.path(), &data) else {
        return;
    };
    assert!(e2fsck_clean(&image));

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

#[test]
fn a_damaged_image_does_not_check_clean() {
    let work = tempfile::tempdir().unwrap();
    let Some(image) = image(work.path(), b"") else {
        return;
    };
    // The superblock's free-blocks count (at 1024 + 12), now wrong.
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[1024 + 12] ^= 0x55;
    std::fs::write(&image, &bytes).unwrap();
    let err = std::panic::catch_unwind(|| e2fsck_clean(&image)).unwrap_err();
    let msg = err.downcast_ref::<String>().expect("a formatted panic");
    assert!(
        msg.starts_with(&format!("e2fsck -fn {}", image.display())),
        "{msg}"
    );
}

#[test]
fn a_mount_guard_clears_a_mount_left_behind() {
    let work = tempfile::tempdir().unwrap();
    let Some(image) = image(work.path(), b"left") else {
        return;
    };
    if !root_or_skip("mount needs root") {
        return;
    }
    let dir = work.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    // The way a program under test might mount it: loop device made and cleared by mount.
    let st = Command::new("mount")
        .args(["-o", "ro,loop"])
        .arg(&image)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let guard = MountGuard(dir.clone());
    assert!(is_mounted(&dir));
    drop(guard);
    assert!(!is_mounted(&dir));
    // Nothing mounted: dropping it does nothing.
    drop(MountGuard(dir.clone()));
}
