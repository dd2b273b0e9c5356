//! The kernel plumbing under `lode mount` and `lode run`: mount(2) and umount2(2) called
//! directly (so the flags are exactly the ones asked for), sysfs, and the mount table.
//! Loop devices are [`crate::loopdev`]'s.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A plumbing step that failed.
#[derive(Debug, thiserror::Error)]
pub enum PlumbingError {
    /// A loop device step failed.
    #[error("{op} {device}: {error}")]
    Loop {
        /// What was being done.
        op: &'static str,
        /// The device (or /dev/loop-control).
        device: String,
        /// The kernel's answer.
        error: std::io::Error,
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
    /// A loop device kept its backing file after it was released.
    #[error(
        "{loopdev} is still in use 5 s after its release; it will detach when its last user closes it"
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
