//! Kernel mounts a test makes and checks: an ext4 image through a loop device, and
//! whether a directory is a mount point.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{root_or_skip, skip, tool_from};

/// How long a detached loop device may keep its backing file: the kernel lets it go
/// once its last user has closed it.
const RELEASE: Duration = Duration::from_secs(5);

/// An ext4 image mounted read-only through a loop device of its own. Dropping it
/// unmounts (lazily if the mount is busy) and detaches the device.
#[derive(Debug)]
pub struct LoopMount {
    device: String,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl LoopMount {
    /// Mounts `image` on a new temporary directory. `None` after [`skip`] where this
    /// process cannot: not root, no loop devices, no `losetup` or `mount`.
    pub fn new(image: &Path) -> Option<LoopMount> {
        let temp = tempfile::tempdir().expect("a temporary mount point");
        let dir = temp.path().to_path_buf();
        Self::mount(image, dir, Some(temp))
    }

    /// Mounts `image` on `dir`, made first if missing; `None` as for
    /// [`new`](Self::new).
    pub fn at(image: &Path, dir: &Path) -> Option<LoopMount> {
        Self::mount(image, dir.to_path_buf(), None)
    }

    fn mount(image: &Path, dir: PathBuf, temp: Option<tempfile::TempDir>) -> Option<LoopMount> {
        if !root_or_skip("a loop mount needs root") {
            return None;
        }
        if !Path::new("/dev/loop-control").exists() {
            skip("a loop mount needs loop devices: /dev/loop-control is absent");
            return None;
        }
        let losetup = tool_from("losetup", "util-linux")?;
        let mount = tool_from("mount", "mount")?;
        let out = Command::new(losetup)
            .args(["--find", "--show", "--read-only"])
            .arg(image)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8(out.stdout)
            .expect("losetup prints a device path")
            .trim()
            .to_owned();
        // From here dropping it detaches the device, also when the mount fails.
        let lm = LoopMount {
            device,
            dir,
            _temp: temp,
        };
        std::fs::create_dir_all(&lm.dir).expect("make the mount point");
        let out = Command::new(mount)
            .args(["-t", "ext4", "-o", "ro"])
            .arg(&lm.device)
            .arg(&lm.dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mount {} ({}) on {}: {}",
            lm.device,
            image.display(),
            lm.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(lm)
    }

    /// The mounted root.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The loop device, `/dev/loopN`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Unmounts and detaches now, and asserts both happened: the directory is no longer
    /// a mount point, and within 5 s the device has let go of its file.
    pub fn release(self) {
        let (device, dir) = (self.device.clone(), self.dir.clone());
        drop(self);
        assert!(!is_mounted(&dir), "{} is still mounted", dir.display());
        let started = Instant::now();
        while bound(&device) {
            assert!(
                started.elapsed() < RELEASE,
                "{device} still has its file {RELEASE:?} after losetup -d"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let unmounted = Command::new("umount")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Lazily unmounts whatever is still mounted on a directory when dropped: the cleanup of a
/// test whose program under test mounts there, should the test fail before that program
/// unmounts.
#[derive(Debug)]
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Whether the loop device still has a backing file.
fn bound(device: &str) -> bool {
    let name = device.trim_start_matches("/dev/");
    Path::new("/sys/block")
        .join(name)
        .join("loop/backing_file")
        .exists()
}

/// Whether `path` is a mount point of this process's mount namespace (per
/// /proc/self/mountinfo). `path` must be absolute and without `..` or links, as the
/// kernel lists it.
pub fn is_mounted(path: &Path) -> bool {
    let Some(want) = path.to_str() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|point| unescape(point) == want)
}

/// A mountinfo field with its octal escapes (`\040` for a space, `\134` for `\`…)
/// decoded.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let mut rest = field.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let code = tail
            .get(..3)
            .filter(|d| b == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                rest = &tail[3..];
            }
            None => {
                out.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_and_proc_are_mounted_and_a_fresh_directory_is_not() {
        assert!(is_mounted(Path::new("/")));
        assert!(is_mounted(Path::new("/proc")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mounted(dir.path()));
    }

    /// How the kernel writes a path into mountinfo (`mangle_path` of `" \t\n\\"`).
    fn escape(path: &str) -> String {
        path.chars()
            .map(|c| match c {
                ' ' | '\t' | '\n' | '\\' => format!("\\{:03o}", u32::from(c)),
                c => c.to_string(),
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn what_the_kernel_escapes_decodes_back(path in r"[ -~\t\n\\é]{0,40}") {
            proptest::prop_assert_eq!(unescape(&escape(&path)), path);
        }

        #[test]
        fn any_field_decodes_without_panicking(field in proptest::collection::vec(
            proptest::prelude::any::<u8>(), 0..64)
        ) {
            let field = String::from_utf8_lossy(&field);
            let _ = unescape(&field);
        }
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y\011z\012"), "/x\\y\tz\n");
        // Not an escape: fewer than three octal digits, or not octal.
        assert_eq!(unescape(r"/a\04"), r"/a\04");
        assert_eq!(unescape(r"/a\089"), r"/a\089");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
