//! Mounting, the file table's public face, options and errors.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use lode_blockdev::{BlockDevice, DeviceError};
use tokio::runtime::Handle;

use crate::fs::{CacheMode, Fs, FuseStats, Shared, SharedConfig};

/// The device call a [`FuseError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        })
    }
}

/// What went wrong, naming the mount point or the file (`mountpoint/name`) it is about.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("invalid option {option} for the FUSE mount at {mountpoint}: {reason}")]
    Config {
        mountpoint: PathBuf,
        option: &'static str,
        reason: String,
    },
    #[error("cannot mount FUSE at {mountpoint}")]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount FUSE at {mountpoint}")]
    Unmount {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid file name {name:?} in the FUSE mount at {mountpoint}: {reason}")]
    InvalidName {
        mountpoint: PathBuf,
        name: String,
        reason: &'static str,
    },
    #[error("{file} already exists")]
    Exists { file: PathBuf },
    #[error("{file} does not exist")]
    NotFound { file: PathBuf },
    #[error("{file} cannot be writable: its device is read-only")]
    DeviceReadOnly { file: PathBuf },
    #[error("{op} of {len} bytes at offset {offset} of {file} failed")]
    Device {
        file: PathBuf,
        op: Op,
        offset: u64,
        len: u64,
        #[source]
        source: DeviceError,
    },
    #[error("{op} of {len} bytes at offset {offset} of {file} panicked in the device")]
    Panicked {
        file: PathBuf,
        op: Op,
        offset: u64,
        len: u64,
    },
    #[error("{op} of {len} bytes at offset {offset} of {file} did not finish within {timeout:?}")]
    TimedOut {
        file: PathBuf,
        op: Op,
        offset: u64,
        len: u64,
        timeout: Duration,
    },
}

pub(crate) type ErrorHook = Arc<dyn Fn(&FuseError) + Send + Sync>;

/// Longest file name the kernel passes through FUSE.
const MAX_NAME_LEN: usize = 255;
/// fuser's receive buffer holds 16 MiB of payload; the kernel's default page limit
/// allows 1 MiB requests.
const MAX_MAX_READ: u32 = 16 << 20;

/// How to mount; checked by [`FuseMount::mount`].
#[derive(Clone)]
pub struct MountOptions {
    runtime: Handle,
    threads: usize,
    max_read: u32,
    cache: CacheMode,
    op_timeout: Duration,
    allow_other: bool,
    on_error: Option<ErrorHook>,
}

impl fmt::Debug for MountOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MountOptions")
            .field("threads", &self.threads)
            .field("max_read", &self.max_read)
            .field("cache", &self.cache)
            .field("op_timeout", &self.op_timeout)
            .field("allow_other", &self.allow_other)
            .field("on_error", &self.on_error.is_some())
            .finish_non_exhaustive()
    }
}

impl MountOptions {
    /// Defaults, with device calls run on `runtime` (which needs its time driver:
    /// `enable_all` or `enable_time`).
    pub fn new(runtime: Handle) -> Self {
        Self {
            runtime,
            threads: 2,
            max_read: 1 << 20,
            cache: CacheMode::Direct,
            op_timeout: Duration::from_secs(60),
            allow_other: false,
            on_error: None,
        }
    }

    /// FUSE threads reading requests from the kernel (default 2). They never wait for a
    /// device, so a few are enough.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Largest read or write the kernel sends in one request (default 1 MiB; at most
    /// 16 MiB, and the kernel's `fuse_max_pages_limit`, 1 MiB by default, also caps it).
    pub fn max_read(mut self, bytes: u32) -> Self {
        self.max_read = bytes;
        self
    }

    /// Page cache behaviour (default [`CacheMode::Direct`]; see there why).
    pub fn cache(mut self, cache: CacheMode) -> Self {
        self.cache = cache;
        self
    }

    /// How long one device call may take before the kernel gets `EIO` (default 60 s).
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Lets users other than the mounting one open the files (`allow_other`; needs root
    /// or `user_allow_other` in /etc/fuse.conf).
    pub fn allow_other(mut self, allow: bool) -> Self {
        self.allow_other = allow;
        self
    }

    /// Called for every failed device call (after counting it); without a hook the
    /// error goes to the `log` crate at warn level.
    pub fn on_error(mut self, hook: impl Fn(&FuseError) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(hook));
        self
    }

    fn check(&self, mountpoint: &Path) -> Result<(), FuseError> {
        let bad = |option, reason: String| FuseError::Config {
            mountpoint: mountpoint.to_path_buf(),
            option,
            reason,
        };
        if !(1..=64).contains(&self.threads) {
            return Err(bad("threads", format!("{} is not in 1..=64", self.threads)));
        }
        if !(4096..=MAX_MAX_READ).contains(&self.max_read) {
            return Err(bad(
                "max_read",
                format!("{} is not in 4096..={MAX_MAX_READ}", self.max_read),
            ));
        }
        if self.op_timeout.is_zero() {
            return Err(bad("op_timeout", "must be more than zero".to_owned()));
        }
        // tokio::time panics without a time driver; find out now rather than in the
        // first read.
        let _enter = self.runtime.enter();
        if std::panic::catch_unwind(|| tokio::time::sleep(Duration::ZERO)).is_err() {
            return Err(bad(
                "runtime",
                "the tokio runtime has no time driver (build it with enable_all)".to_owned(),
            ));
        }
        Ok(())
    }
}

/// A mounted filesystem of block-device files. Unmounted by [`unmount`](Self::unmount)
/// or on drop.
pub struct FuseMount {
    shared: Arc<Shared>,
    session: Option<BackgroundSession>,
}

impl fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FuseMount")
            .field("mountpoint", &self.shared.mountpoint)
            .field("files", &self.shared.names())
            .finish_non_exhaustive()
    }
}

impl FuseMount {
    /// Mounts an empty filesystem on the directory `mountpoint` and serves it from
    /// background threads. As root it calls mount(2) directly; otherwise it goes
    /// through `fusermount3` (package `fuse3`).
    pub fn mount(mountpoint: impl AsRef<Path>, options: MountOptions) -> Result<Self, FuseError> {
        let given = mountpoint.as_ref();
        options.check(given)?;
        let mount_err = |source| FuseError::Mount {
            mountpoint: given.to_path_buf(),
            source,
        };
        let mountpoint = given.canonicalize().map_err(mount_err)?;
        let shared = Arc::new(Shared::new(SharedConfig {
            mountpoint: mountpoint.clone(),
            runtime: options.runtime.clone(),
            op_timeout: options.op_timeout,
            max_read: options.max_read,
            cache: options.cache,
            on_error: options.on_error.clone(),
        }));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lode".to_owned()),
            MountOption::Subtype("lode".to_owned()),
            MountOption::NoExec,
            MountOption::NoAtime,
            MountOption::CUSTOM(format!("max_read={}", options.max_read)),
        ];
        if options.allow_other {
            config.acl = SessionACL::All;
        }
        config.n_threads = Some(options.threads);
        config.clone_fd = options.threads > 1;
        let fs = Fs {
            shared: Arc::clone(&shared),
        };
        let session = fuser::spawn_mount(fs, &mountpoint, &config).map_err(mount_err)?;
        Ok(Self {
            shared,
            session: Some(session),
        })
    }

    /// The mount point (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.shared.mountpoint
    }

    /// The path of the file `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.shared.file(name)
    }

    /// Adds the file `name` presenting `device`. A `writable` file needs a device
    /// that is not read-only; a file that is not writable refuses opens for writing
    /// with `EROFS`, whatever the device allows.
    pub fn add(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        writable: bool,
    ) -> Result<(), FuseError> {
        let invalid = |reason| FuseError::InvalidName {
            mountpoint: self.shared.mountpoint.clone(),
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("empty"));
        }
        if name == "." || name == ".." {
            return Err(invalid("reserved"));
        }
        if name.contains('/') || name.contains('\0') {
            return Err(invalid("contains '/' or NUL"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid("longer than 255 bytes"));
        }
        if writable && device.read_only() {
            return Err(FuseError::DeviceReadOnly {
                file: self.path(name),
            });
        }
        self.shared.add(name.to_owned(), device, writable)
    }

    /// Removes the file `name` and returns its device. Handles already open on it (a
    /// loop device, a running VM) keep working until closed, as with unlink(2).
    pub fn remove(&self, name: &str) -> Result<Arc<dyn BlockDevice>, FuseError> {
        self.shared.remove(name)
    }

    /// The files' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.shared.names()
    }

    /// Counters since the mount.
    pub fn stats(&self) -> FuseStats {
        self.shared.stats()
    }

    /// Unmounts and waits for the FUSE threads to end. Fails with `EBUSY` while a
    /// file is open (a loop device still attached); the mount is then detached lazily,
    /// leaving open files working until they close.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), FuseError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let mountpoint = &self.shared.mountpoint;
        session.umount_and_join().map_err(|source| {
            // fuser gave up the mount; let the kernel drop it when its users go.
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            FuseError::Unmount {
                mountpoint: mountpoint.clone(),
                source,
            }
        })
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_options_are_named_before_mounting() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let at = Path::new("/nonexistent/mnt");
        let err =
            FuseMount::mount(at, MountOptions::new(rt.handle().clone()).threads(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid option threads for the FUSE mount at /nonexistent/mnt: 0 is not in 1..=64"
        );
        let err =
            FuseMount::mount(at, MountOptions::new(rt.handle().clone()).max_read(512)).unwrap_err();
        assert!(
            matches!(
                err,
                FuseError::Config {
                    option: "max_read",
                    ..
                }
            ),
            "{err}"
        );

        let no_timer = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = FuseMount::mount(at, MountOptions::new(no_timer.handle().clone())).unwrap_err();
        assert!(
            matches!(
                err,
                FuseError::Config {
                    option: "runtime",
                    ..
                }
            ),
            "{err}"
        );

        let err = FuseMount::mount(at, MountOptions::new(rt.handle().clone())).unwrap_err();
        assert_eq!(err.to_string(), "cannot mount FUSE at /nonexistent/mnt");
    }
}
