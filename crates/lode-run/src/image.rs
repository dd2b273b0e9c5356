//! Reading a mounted image from inside it. An image is untrusted: any path in it may be a
//! symlink to the host's files (`/etc/passwd -> /etc/shadow`), to a device or a FIFO, or
//! absurdly large. Every lookup here resolves with openat2(2) and `RESOLVE_IN_ROOT` on the
//! image's root, so absolute symlinks and `..` stay inside the image, as they would for a
//! process chrooted into it; files are opened `O_PATH` first and read only when they are
//! regular and under a size cap; directories that lode mounts onto (`/proc`, `/dev`) must
//! be real directories of the image reached without any symlink.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The most bytes lode reads from a file of an image (its /etc/passwd, /etc/group).
pub const MAX_IMAGE_FILE: u64 = 1 << 20;

/// A lookup in an image that was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image's root directory could not be opened.
    #[error("opening the image root {}: {source}", root.display())]
    Root {
        /// The mount point.
        root: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A path is a symlink whose target the image does not have.
    #[error("{path} in the image is a symlink to {target}, which is not in the image")]
    Dangling {
        /// The path in the image.
        path: String,
        /// Where the symlink points.
        target: String,
    },
    /// A path is, or goes through, a symlink where lode needs a real directory.
    #[error("{path} in the image {}; lode mounts nothing through a symlink", link_story(.target))]
    Symlink {
        /// The path in the image.
        path: String,
        /// Where the symlink points, when the last component is the symlink.
        target: Option<String>,
    },
    /// A file to read is not a regular file.
    #[error("{path} in the image is {kind}, not a regular file")]
    NotRegular {
        /// The path in the image.
        path: String,
        /// What it is ("a FIFO", "a character device", ...).
        kind: &'static str,
    },
    /// A directory to mount onto is not a directory.
    #[error("{path} in the image is {kind}, not a directory")]
    NotDirectory {
        /// The path in the image.
        path: String,
        /// What it is.
        kind: &'static str,
    },
    /// A file is over the cap.
    #[error("{path} in the image is larger than {cap} bytes ({size} bytes)")]
    TooLarge {
        /// The path in the image.
        path: String,
        /// Its size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// Anything else the kernel said about a path (a symlink loop, EIO, ...).
    #[error("{path} in the image: {source}")]
    Io {
        /// The path in the image.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A mounted image's root, held open so that every lookup starts from it.
#[derive(Debug)]
pub struct ImageRoot {
    fd: OwnedFd,
}

/// openat2(2)'s `struct open_how` (libc's cannot be built outside libc).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const _: () = assert!(std::mem::size_of::<OpenHow>() == 24);

const NO_ESCAPE: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;

impl ImageRoot {
    /// Opens the directory an image is mounted on.
    pub fn open(root: &Path) -> Result<ImageRoot, ImageError> {
        let fail = |source| ImageError::Root {
            root: root.to_path_buf(),
            source,
        };
        let c = CString::new(root.as_os_str().as_bytes())
            .map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        // SAFETY: open(2) just returned this descriptor, which nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ImageRoot { fd })
    }

    /// The root's descriptor (`O_PATH`), for `fchdir` before a chroot.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// openat2(2) of `path` below the root.
    fn openat2(&self, path: &str, flags: libc::c_int, resolve: u64) -> std::io::Result<OwnedFd> {
        let c = CString::new(path).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let how = OpenHow {
            flags: u64::try_from(flags | libc::O_CLOEXEC).unwrap_or_default(),
            mode: 0,
            resolve,
        };
        // SAFETY: `c` and `how` outlive the call; the size passed is `how`'s.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::c_int::try_from(fd).map_err(|_| std::io::ErrorKind::InvalidData)?;
        // SAFETY: openat2(2) just returned this descriptor, which nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The target of `path` if its last component is a symlink (resolved in the image).
    fn link_target(&self, path: &str) -> Option<String> {
        let fd = self
            .openat2(path, libc::O_PATH | libc::O_NOFOLLOW, NO_ESCAPE)
            .ok()?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` is writable for its length; "" with an O_PATH symlink descriptor
        // reads that symlink.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    /// The bytes of the regular file `path` of the image (at most `cap` of them), or
    /// None when the image has nothing at that path. Symlinks are followed inside the
    /// image only; anything but a regular file is refused without being opened for
    /// reading, so a FIFO cannot hang the caller nor a device be read.
    pub fn read_file(&self, path: &str, cap: u64) -> Result<Option<Vec<u8>>, ImageError> {
        let io = |source| ImageError::Io {
            path: path.to_string(),
            source,
        };
        let fd = match self.openat2(path, libc::O_PATH, NO_ESCAPE) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return match self.link_target(path) {
                    Some(target) => Err(ImageError::Dangling {
                        path: path.to_string(),
                        target,
                    }),
                    None => Ok(None),
                };
            }
            // A component that is not a directory: nothing at that path.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let st = fstat(&fd).map_err(io)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(ImageError::NotRegular {
                path: path.to_string(),
                kind: kind(st.st_mode),
            });
        }
        let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
        if size > cap {
            return Err(ImageError::TooLarge {
                path: path.to_string(),
                size,
                cap,
            });
        }
        // Reopen the checked file itself for reading, not the path again.
        let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&proc_path)
            .map_err(io)?;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.take(cap.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if read > cap {
            return Err(ImageError::TooLarge {
                path: path.to_string(),
                size: read,
                cap,
            });
        }
        Ok(Some(bytes))
    }

    /// A directory of the image to mount onto: reached from the root without following
    /// any symlink and without crossing a mount, so a mount made through the returned
    /// descriptor (`/proc/self/fd/N`) lands inside the image. None when the image has
    /// nothing at `path`.
    pub fn mount_point(&self, path: &str) -> Result<Option<OwnedFd>, ImageError> {
        let flags = libc::O_PATH | libc::O_NOFOLLOW;
        let resolve = NO_ESCAPE | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_XDEV;
        match self.openat2(path, flags, resolve) {
            Ok(fd) => {
                let st = fstat(&fd).map_err(|source| ImageError::Io {
                    path: path.to_string(),
                    source,
                })?;
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFDIR => Ok(Some(fd)),
                    libc::S_IFLNK => Err(ImageError::Symlink {
                        path: path.to_string(),
                        target: self.link_target(path),
                    }),
                    m => Err(ImageError::NotDirectory {
                        path: path.to_string(),
                        kind: kind(m),
                    }),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            // RESOLVE_NO_SYMLINKS met a symlink on the way.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(ImageError::Symlink {
                path: path.to_string(),
                target: self.link_target(path),
            }),
            Err(source) => Err(ImageError::Io {
                path: path.to_string(),
                source,
            }),
        }
    }

    /// A directory of the image (a mount point lode made), opened without following
    /// symlinks, for creating entries in it.
    pub fn dir(&self, path: &str) -> Result<OwnedFd, ImageError> {
        self.openat2(
            path,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            NO_ESCAPE | libc::RESOLVE_NO_SYMLINKS,
        )
        .map_err(|source| ImageError::Io {
            path: path.to_string(),
            source,
        })
    }
}

fn link_story(target: &Option<String>) -> String {
    match target {
        Some(t) => format!("is a symlink to {t}"),
        None => "has a symlink on the way".to_string(),
    }
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable and `fd` is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// "a FIFO", "a block device", ... for a file mode.
fn kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symlink",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "a file of unknown type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn image() -> (tempfile::TempDir, ImageRoot) {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
        let root = ImageRoot::open(dir.path()).expect("open");
        (dir, root)
    }

    #[test]
    fn files_read_back_and_absent_ones_are_none() {
        let (dir, root) = image();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").expect("write");
        assert_eq!(
            root.read_file("/etc/passwd", MAX_IMAGE_FILE).expect("read"),
            Some(b"root:x:0:0::/:/bin/sh\n".to_vec())
        );
        assert_eq!(
            root.read_file("/etc/group", MAX_IMAGE_FILE).expect("read"),
            None
        );
        // A path through a regular file is simply absent.
        assert_eq!(
            root.read_file("/etc/passwd/x", MAX_IMAGE_FILE)
                .expect("read"),
            None
        );
    }

    #[test]
    fn absolute_and_dotdot_symlinks_stay_in_the_image() {
        let (dir, root) = image();
        let etc = dir.path().join("etc");
        std::fs::write(etc.join("shadow"), "the image's own shadow").expect("write");
        symlink("/etc/shadow", etc.join("passwd")).expect("ln");
        symlink("../../../../../../etc/shadow", etc.join("group")).expect("ln");
        assert_eq!(
            root.read_file("/etc/passwd", MAX_IMAGE_FILE).expect("read"),
            Some(b"the image's own shadow".to_vec())
        );
        assert_eq!(
            root.read_file("etc/group", MAX_IMAGE_FILE).expect("read"),
            Some(b"the image's own shadow".to_vec())
        );
        std::fs::remove_file(etc.join("shadow")).expect("rm");
        let e = root.read_file("/etc/passwd", MAX_IMAGE_FILE).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/passwd in the image is a symlink to /etc/shadow, which is not in the image"
        );
    }

    #[test]
    fn loops_fifos_devices_and_big_files_are_refused_with_their_name() {
        let (dir, root) = image();
        let etc = dir.path().join("etc");
        symlink("/etc/loop", etc.join("loop")).expect("ln");
        let e = root.read_file("/etc/loop", MAX_IMAGE_FILE).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/loop in the image: Too many levels of symbolic links"),
            "{e}"
        );
        let fifo = CString::new(etc.join("fifo").as_os_str().as_bytes()).expect("path");
        // SAFETY: `fifo` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert_eq!(
            root.read_file("/etc/fifo", MAX_IMAGE_FILE)
                .unwrap_err()
                .to_string(),
            "/etc/fifo in the image is a FIFO, not a regular file"
        );
        // A symlink to the host's /dev/zero resolves to the image's /dev/zero: absent.
        symlink("/dev/zero", etc.join("zero")).expect("ln");
        assert_eq!(
            root.read_file("/etc/zero", MAX_IMAGE_FILE)
                .unwrap_err()
                .to_string(),
            "/etc/zero in the image is a symlink to /dev/zero, which is not in the image"
        );
        assert_eq!(
            root.read_file("/etc", MAX_IMAGE_FILE)
                .unwrap_err()
                .to_string(),
            "/etc in the image is a directory, not a regular file"
        );
        std::fs::write(etc.join("big"), vec![b'x'; 101]).expect("write");
        assert_eq!(
            root.read_file("/etc/big", 100).unwrap_err().to_string(),
            "/etc/big in the image is larger than 100 bytes (101 bytes)"
        );
        assert_eq!(
            root.read_file("/etc/big", 101)
                .expect("read")
                .map(|b| b.len()),
            Some(101)
        );
    }

    #[test]
    fn mount_points_must_be_real_directories() {
        let (dir, root) = image();
        let host = tempfile::tempdir().expect("temp dir");
        symlink(host.path(), dir.path().join("proc")).expect("ln");
        std::fs::create_dir(dir.path().join("dev")).expect("mkdir");
        std::fs::write(dir.path().join("sys"), "").expect("write");
        symlink("/dev", dir.path().join("etc/dev")).expect("ln");
        let e = root.mount_point("/proc").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "/proc in the image is a symlink to {}; lode mounts nothing through a symlink",
                host.path().display()
            )
        );
        // A symlink on the way is refused too, not only the last component.
        let e = root.mount_point("/etc/dev/pts").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/dev/pts in the image has a symlink on the way; lode mounts nothing through a symlink"
        );
        assert!(root.mount_point("/dev").expect("dir").is_some());
        assert!(root.mount_point("/nothing").expect("absent").is_none());
        assert_eq!(
            root.mount_point("/sys").unwrap_err().to_string(),
            "/sys in the image is a regular file, not a directory"
        );
    }
}
