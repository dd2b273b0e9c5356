//! Loop devices by ioctl, without `losetup`: a free device from /dev/loop-control
//! (`LOOP_CTL_GET_FREE`) configured over an open file in one `LOOP_CONFIGURE` (file,
//! read-only flag and auto-clear together, Linux 5.8 and later), released with
//! `LOOP_CLR_FD`. Spawning `losetup` twice cost a `lode run` two fork-execs and a search
//! of PATH; this is two opens and two ioctls.
//!
//! Every device is set up with `LO_FLAGS_AUTOCLEAR`: the kernel releases it when its
//! last opener closes it. Until the image is mounted the only opener is the
//! [`LoopDevice`] itself, so a `lode` that dies between the two (a crash, SIGKILL)
//! leaves no loop device behind; once mounted, the mount holds the device, and
//! unmounting it, by `lode umount` or by hand, releases it.
//!
//! The kernel's structures (linux/loop.h):
//!
//! ```text
//! struct loop_config            304 bytes
//!   u32 fd                        0   the backing file
//!   u32 block_size                4   0: 512
//!   struct loop_info64 info       8
//!     u64 lo_device, lo_inode,   +0   read only
//!         lo_rdevice
//!     u64 lo_offset              +24
//!     u64 lo_sizelimit           +32  0: the whole file
//!     u32 lo_number              +40  read only
//!     u32 lo_encrypt_type        +44
//!     u32 lo_encrypt_key_size    +48
//!     u32 lo_flags               +52  LO_FLAGS_*
//!     u8  lo_file_name[64]       +56  what losetup shows
//!     u8  lo_crypt_name[64]      +120
//!     u8  lo_encrypt_key[32]     +184
//!     u64 lo_init[2]             +216
//!   u64 __reserved[8]           240
//! ```

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::plumbing::PlumbingError;

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);
const _: () = assert!(std::mem::offset_of!(LoopConfig, info) == 8);
const _: () = assert!(std::mem::offset_of!(LoopInfo64, lo_flags) == 52);
const _: () = assert!(std::mem::offset_of!(LoopInfo64, lo_file_name) == 56);

impl LoopConfig {
    /// A configuration over the open file `fd`, the whole of it, auto-clearing,
    /// read-only unless `writable`; `name` (its path) is what losetup shows.
    fn new(fd: u32, writable: bool, name: &Path) -> LoopConfig {
        let mut lo_file_name = [0u8; 64];
        let bytes = name.as_os_str().as_bytes();
        // The kernel keeps 63 bytes and a NUL; sysfs shows the full path regardless.
        let n = bytes.len().min(63);
        lo_file_name[..n].copy_from_slice(&bytes[..n]);
        let mut lo_flags = LO_FLAGS_AUTOCLEAR;
        if !writable {
            lo_flags |= LO_FLAGS_READ_ONLY;
        }
        LoopConfig {
            fd,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags,
                lo_file_name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        }
    }
}

/// How often to ask for another free device when the one found was taken by someone
/// else between `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE` (losetup retries the same way).
const CLAIM_TRIES: u32 = 16;

/// A loop device this process configured, and its open descriptor. Dropping it closes
/// the descriptor, which releases the device unless something (a mount) still holds it.
#[derive(Debug)]
pub(crate) struct LoopDevice {
    path: String,
    fd: OwnedFd,
}

impl LoopDevice {
    /// The device's path, `/dev/loopN`.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }
}

fn io_error(
    op: &'static str,
    device: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> PlumbingError {
    let device = device.into();
    move |error| PlumbingError::Loop { op, device, error }
}

fn ioctl(
    fd: &impl AsRawFd,
    request: libc::c_ulong,
    arg: libc::c_ulong,
) -> std::io::Result<libc::c_int> {
    // SAFETY: the requests used here take an integer argument (or none), which the
    // kernel does not dereference.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Opens `file` (the image, read-write when `writable`) for a loop device.
pub(crate) fn open_backing(file: &Path, writable: bool) -> Result<File, PlumbingError> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC)
        .open(file)
        .map_err(|source| PlumbingError::Kernel {
            path: file.to_path_buf(),
            source,
        })
}

/// Configures a free loop device over `backing` (opened by [`open_backing`] from
/// `name`), read-only unless `writable`, auto-clearing.
pub(crate) fn attach(
    backing: &File,
    name: &Path,
    writable: bool,
) -> Result<LoopDevice, PlumbingError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(io_error("opening", "/dev/loop-control"))?;
    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| PlumbingError::Loop {
        op: "configuring",
        device: "a loop device".into(),
        error: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let config = LoopConfig::new(fd, writable, name);
    let mut last = None;
    for _ in 0..CLAIM_TRIES {
        let n = ioctl(&control, LOOP_CTL_GET_FREE, 0).map_err(io_error(
            "finding a free device through",
            "/dev/loop-control",
        ))?;
        let path = format!("/dev/loop{n}");
        let dev = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_error("opening", path.clone()))?;
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is (its
        // layout checked above) and which outlives the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &raw const config) };
        if r == 0 {
            // Held read-only from here on: a mount of the device then finds no writer
            // besides itself (a kernel built without CONFIG_BLK_DEV_WRITE_MOUNTED refuses
            // to mount a device open for writing elsewhere). The new descriptor is opened
            // before the first is closed, so the device never has no opener.
            let fd = if writable {
                File::open(&path)
                    .map_err(io_error("opening", path.clone()))?
                    .into()
            } else {
                dev.into()
            };
            return Ok(LoopDevice { path, fd });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(PlumbingError::Loop {
                op: "configuring",
                device: path,
                error: e,
            });
        }
        last = Some((path, e));
    }
    let (device, error) = last.unwrap_or_else(|| {
        (
            "/dev/loop-control".into(),
            std::io::Error::from_raw_os_error(libc::EBUSY),
        )
    });
    Err(PlumbingError::Loop {
        op: "claiming (every free device was taken first)",
        device,
        error,
    })
}

/// Releases the loop device `dev` and waits until the kernel has let go of its backing
/// file. A device still open elsewhere (its last user closing, just after an unmount, or
/// a lazily detached mount) is only marked to auto-clear by `LOOP_CLR_FD`; detaching the
/// attachment under it then would leave a loop device on a vanished file, so wait (5 s at
/// most) for sysfs to show it released. A device already released is not an error.
pub(crate) fn release(dev: Option<LoopDevice>, path: &str) -> Result<(), PlumbingError> {
    let fd = match dev {
        Some(d) => Some(d.fd),
        None => match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => Some(f.into()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(io_error("opening", path)(e)),
        },
    };
    if let Some(fd) = &fd
        && let Err(e) = ioctl(fd, LOOP_CLR_FD, 0)
        // ENXIO: nothing is bound (auto-clear got there first).
        && e.raw_os_error() != Some(libc::ENXIO)
    {
        return Err(io_error("releasing", path)(e));
    }
    drop(fd);
    wait_released(path, Duration::from_secs(5))
}

/// Waits until sysfs shows `path` with no backing file, at most `limit`: at once when
/// it already is, then in steps of 1 ms.
fn wait_released(path: &str, limit: Duration) -> Result<(), PlumbingError> {
    let name = path.trim_start_matches("/dev/");
    let backing = PathBuf::from("/sys/block")
        .join(name)
        .join("loop/backing_file");
    let started = Instant::now();
    while backing.exists() {
        if started.elapsed() > limit {
            return Err(PlumbingError::LoopBusy {
                loopdev: path.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_sets_the_file_and_the_flags() {
        let c = LoopConfig::new(7, false, Path::new("/state/files/run-1"));
        assert_eq!(c.fd, 7);
        assert_eq!(c.info.lo_flags, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR);
        assert_eq!(&c.info.lo_file_name[..19], b"/state/files/run-1\0");
        let c = LoopConfig::new(7, true, Path::new("/x"));
        assert_eq!(c.info.lo_flags, LO_FLAGS_AUTOCLEAR);
        // A long path is cut to 63 bytes, NUL-terminated.
        let long = "/".repeat(100);
        let c = LoopConfig::new(7, true, Path::new(&long));
        assert!(c.info.lo_file_name[..63].iter().all(|b| *b == b'/'));
        assert_eq!(c.info.lo_file_name[63], 0);
    }

    fn sysfs(dev: &LoopDevice, file: &str) -> Option<String> {
        let name = dev.path().trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{name}/{file}"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    #[test]
    fn a_device_is_set_up_in_one_step_and_released_even_when_dropped() {
        if !lode_testkit::is_root() || !Path::new("/dev/loop-control").exists() {
            lode_testkit::skip("loop devices need root and /dev/loop-control");
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("image");
        std::fs::write(&file, vec![7u8; 1 << 20]).expect("write");
        let backing = open_backing(&file, false).expect("open");
        let dev = attach(&backing, &file, false).expect("loop device");
        drop(backing);
        assert!(dev.path().starts_with("/dev/loop"), "{}", dev.path());
        let want = file.display().to_string();
        assert_eq!(
            sysfs(&dev, "loop/backing_file").as_deref(),
            Some(want.as_str())
        );
        assert_eq!(sysfs(&dev, "ro").as_deref(), Some("1"));
        assert_eq!(sysfs(&dev, "loop/autoclear").as_deref(), Some("1"));
        let path = dev.path().to_string();
        release(Some(dev), &path).expect("release");
        let name = path.trim_start_matches("/dev/");
        assert!(!Path::new(&format!("/sys/block/{name}/loop")).exists());

        // Dropped without a release, as when lode dies between the set-up and the mount:
        // the kernel clears the device once its only opener is gone.
        let backing = open_backing(&file, true).expect("open");
        let dev = attach(&backing, &file, true).expect("loop device");
        drop(backing);
        assert_eq!(sysfs(&dev, "ro").as_deref(), Some("0"));
        let path = dev.path().to_string();
        drop(dev);
        wait_released(&path, Duration::from_secs(5)).expect("auto-cleared");
        // Released twice is not an error.
        release(None, &path).expect("already released");
    }

    #[test]
    fn a_missing_device_counts_as_released() {
        release(None, "/dev/loop-lode-test-none").expect("nothing to release");
    }
}
