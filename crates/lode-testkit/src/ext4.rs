//! The reference check of an ext4 image: e2fsprogs' own `e2fsck`.

use std::path::Path;
use std::process::Command;

use crate::tool_from;

/// Runs `e2fsck -fn` on `image` and panics with its output unless it exits 0 and says
/// nothing but its version, its pass headers and its summary: no note either, such as
/// "extent tree could be narrower". `false` after [`skip`](crate::skip) when e2fsck is
/// not installed.
#[track_caller]
pub fn e2fsck_clean(image: &Path) -> bool {
    let Some(e2fsck) = tool_from("e2fsck", "e2fsprogs") else {
        return false;
    };
    let out = Command::new(e2fsck)
        .arg("-fn")
        .arg(image)
        .output()
        .expect("e2fsck runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "e2fsck -fn {} failed ({}):\n{text}",
        image.display(),
        out.status
    );
    for line in text.lines() {
        let expected = line.starts_with("Pass ")
            || line.starts_with("e2fsck ")
            || line.contains(" files (")
            || line.trim().is_empty();
        assert!(
            expected,
            "e2fsck -fn {}: unexpected output {line:?}\n{text}",
            image.display()
        );
    }
    true
}
