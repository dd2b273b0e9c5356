//! The kernel plumbing under `lode mount` and `lode run`: `losetup` for loop devices (so
//! what it says reaches the user as it is), mount(2) and umount2(2) called directly (so
//! the flags are exactly the ones asked for), and the mount table.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A plumbing step that failed.
#[derive(Debug, thiserror::Error)]
pub enum PlumbingError {
    /// A tool could not be started.
    #[error("running `{command}` (is util-linux installed?): {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// mount(2) refused.
    #[error("mounting {source_name} ({fstype}) on {}: {error}", target.display())]
    Mount {
        /// What was mounted (a device, or the file system's name).
        source_name: String,
        /// The file system type.
        fstype: String,
        /// Where.
        target: PathBuf,
        /// The kernel's answer.
        error: std::io::Error,
    },
    /// umount2(2) refused.
    #[error("unmounting {}: {error}", target.display())]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The kernel's answer.
        error: std::io::Error,
    },
    /// A loop device kept its backing file after `losetup -d`.
    #[error(
        "{loopdev} is still in use 5 s after `losetup -d`; it will detach when its last user closes it"
    )]
    LoopBusy {
        /// The loop device.
        loopdev: String,
    },
    /// A file of the kernel's (mountinfo, sysfs) could not be read or written.
    #[error("{}: {source}", path.display())]
    Kernel {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A path held a NUL byte.
    #[error("{} holds a NUL byte", path.display())]
    Nul {
        /// The path.
        path: PathBuf,
    },
}

/// Runs a plumbing command, returning its stdout; a failure carries its stderr.
pub(crate) fn tool(cmd: &mut Command) -> Result<String, PlumbingError> {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = match cmd.output() {
        Ok(out) => out,
        Err(source) => return Err(PlumbingError::Spawn { command, source }),
    };
    if !out.status.success() {
        return Err(PlumbingError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn cstring(path: &Path) -> Result<CString, PlumbingError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| PlumbingError::Nul {
        path: path.to_path_buf(),
    })
}

/// mount(2) of `source` (a device or a pseudo file system's name) on `target`.
pub(crate) fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), PlumbingError> {
    let fail = |error| PlumbingError::Mount {
        source_name: source.to_string(),
        fstype: fstype.to_string(),
        target: target.to_path_buf(),
        error,
    };
    let nul = |_| fail(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    let src = CString::new(source).map_err(nul)?;
    let ty = CString::new(fstype).map_err(nul)?;
    let data = data.map(CString::new).transpose().map_err(nul)?;
    let tgt = cstring(target)?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if r != 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// umount2(2) of `target`, never following a symlink in its last component.
pub(crate) fn unmount(target: &Path, flags: libc::c_int) -> Result<(), PlumbingError> {
    let t = cstring(target)?;
    // SAFETY: `t` is a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(t.as_ptr(), flags | libc::UMOUNT_NOFOLLOW) } != 0 {
        return Err(PlumbingError::Unmount {
            target: target.to_path_buf(),
            error: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Attaches `file` to a free loop device (read-only unless `writable`) and returns the
/// device's path.
pub(crate) fn attach_loop(file: &Path, writable: bool) -> Result<String, PlumbingError> {
    let mut losetup = Command::new("losetup");
    losetup.args(["--find", "--show"]);
    if !writable {
        losetup.arg("--read-only");
    }
    tool(losetup.arg(file))
}

/// Detaches a loop device and waits until the kernel has let go of its backing file.
/// `losetup -d` on a device whose last user is still closing (just after an unmount) only
/// marks it for auto-clear and returns; detaching the attachment under it then would leave
/// a loop device on a vanished file, so wait (5 s at most) for sysfs to show it released.
pub(crate) fn release_loop(loopdev: &str) -> Result<(), PlumbingError> {
    tool(Command::new("losetup").args(["-d", loopdev]))?;
    let name = loopdev.trim_start_matches("/dev/");
    let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
    let started = Instant::now();
    while backing.exists() {
        if started.elapsed() > Duration::from_secs(5) {
            return Err(PlumbingError::LoopBusy {
                loopdev: loopdev.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Sets a loop device's readahead.
pub(crate) fn set_readahead(loopdev: &str, kb: u32) -> Result<(), PlumbingError> {
    let dev = loopdev.trim_start_matches("/dev/");
    let path = PathBuf::from(format!("/sys/block/{dev}/queue/read_ahead_kb"));
    std::fs::write(&path, kb.to_string()).map_err(|source| PlumbingError::Kernel { path, source })
}

/// The file a loop device reads, per sysfs.
pub(crate) fn loop_backing_file(loopdev: &str) -> Result<String, PlumbingError> {
    let dev = loopdev.trim_start_matches("/dev/");
    let path = PathBuf::from(format!("/sys/block/{dev}/loop/backing_file"));
    let backing =
        std::fs::read_to_string(&path).map_err(|source| PlumbingError::Kernel { path, source })?;
    Ok(backing.trim().trim_end_matches(" (deleted)").to_string())
}

/// The mount table entry (device, fs type) mounted on `dir`, if any (the last one wins).
pub(crate) fn mounted_on(dir: &Path) -> Result<Option<(String, String)>, PlumbingError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let info =
        std::fs::read_to_string(&path).map_err(|source| PlumbingError::Kernel { path, source })?;
    let want = dir.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.get(4).map(|m| unescape(m)) == Some(want.to_string()) {
            let fstype = f.get(sep + 1).unwrap_or(&"").to_string();
            let source = f.get(sep + 2).unwrap_or(&"").to_string();
            found = Some((unescape(&source), fstype));
        }
    }
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0')
                .wrapping_mul(64)
                .wrapping_add((b[i + 2] - b'0') * 8)
                .wrapping_add(b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
        // Octal above 0o377 wraps rather than overflowing.
        assert_eq!(unescape(r"\777x"), "\u{fffd}x");
    }

    #[test]
    fn a_failed_tool_says_what_it_ran_and_what_it_said() {
        let e = tool(Command::new("sh").args(["-c", "echo nope >&2; exit 3"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`sh -c echo nope >&2; exit 3` failed (exit status: 3): nope"
        );
        let e = tool(&mut Command::new("/nonexistent/losetup")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("running `/nonexistent/losetup ` (is util-linux installed?)"),
            "{e}"
        );
    }

    #[test]
    fn a_refused_mount_names_source_type_and_target() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = mount("none", dir.path(), "no-such-fs", 0, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "mounting none (no-such-fs) on {}: ",
                dir.path().display()
            )),
            "{msg}"
        );
    }
}
