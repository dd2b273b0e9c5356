//! `lode mount` and `lode umount`: an attachment's FUSE file on a loop device and its
//! ext4 mounted on a directory, `nosuid,nodev` unless asked otherwise (an image is
//! untrusted: a setuid-root binary or a device node in it must not give a host user root
//! or the host's disks). A [`Mounted`] undoes whatever part of itself exists when dropped,
//! so an error or a signal at any step leaves nothing behind.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::control::{ControlError, call};
use crate::loopdev::{self, LoopDevice};
use crate::plumbing::{self, PlumbingError};
use crate::signals::{self, SignalGuard};
use crate::timings::{Step, Timings};

/// A mount or an unmount that failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point is missing or unusable.
    #[error("mount point {}: {source}", dir.display())]
    MountPoint {
        /// The directory given.
        dir: PathBuf,
        /// Why it cannot be used.
        source: std::io::Error,
    },
    /// The mount point is not a directory.
    #[error("mount point {} is not a directory", dir.display())]
    NotDirectory {
        /// The path given.
        dir: PathBuf,
    },
    /// Something is mounted there already.
    #[error("{} already has {source_name} mounted on it", dir.display())]
    Busy {
        /// The mount point.
        dir: PathBuf,
        /// What is mounted there.
        source_name: String,
    },
    /// Nothing is mounted where an unmount was asked.
    #[error("nothing is mounted on {}", dir.display())]
    NotMounted {
        /// The directory.
        dir: PathBuf,
    },
    /// What is mounted there is not an image of lode's.
    #[error("{} has {source_name} ({fstype}) mounted on it, not a lode image", dir.display())]
    NotLode {
        /// The directory.
        dir: PathBuf,
        /// What is mounted there.
        source_name: String,
        /// Its file system type.
        fstype: String,
    },
    /// The agent serves no files to put a loop device on.
    #[error("the agent runs without a FUSE mount (--no-files), so there is no file to mount")]
    NoFiles,
    /// The agent refused or could not be reached.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A loop device, mount or sysfs step failed.
    #[error("{context}: {source}")]
    Plumbing {
        /// The step.
        context: String,
        /// What failed.
        source: PlumbingError,
    },
    /// A signal arrived before the mount was complete; what existed was undone.
    #[error("interrupted by {}; the image was unmounted and detached", signals::name(*.signal))]
    Interrupted {
        /// The signal.
        signal: libc::c_int,
    },
}

/// What to mount and how.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// A tag or a manifest id.
    pub image: String,
    /// Accept writes, into an overlay in the agent's state directory.
    pub writable: bool,
    /// The attachment's name; by default `mnt-` and a hash of the mount point.
    pub name: Option<String>,
    /// The loop device's readahead, KiB.
    pub readahead_kb: Option<u32>,
    /// Honour setuid bits, file capabilities and device nodes of the image. Unsafe for an
    /// image you do not trust: any user who can reach the mount gets what the image's
    /// setuid binaries and device nodes give.
    pub allow_setuid_and_devices: bool,
    /// The writes are dropped with the mount (`lode run`'s overlay), so the file system
    /// is mounted without write barriers: nothing written needs to survive a crash.
    pub throwaway: bool,
}

/// A mounted image: attachment, loop device, ext4 mount. Dropping it unmounts, releases
/// the loop device and detaches (reporting failures on stderr); [`Mounted::keep`] leaves
/// it in place for `lode mount` (the mount then holds the loop device, which the kernel
/// releases when it is unmounted).
#[derive(Debug)]
pub struct Mounted {
    socket: PathBuf,
    dir: PathBuf,
    name: String,
    attached: bool,
    loopdev: Option<LoopDevice>,
    mounted: bool,
    attachment: Value,
    kept: bool,
    timings: Timings,
}

/// What [`Mounted::release`] did: the failures (every one, not only the first) and the
/// time each step took, the mount's own steps included.
#[derive(Debug)]
pub struct Released {
    /// The failures, newest step first.
    pub errors: Vec<String>,
    /// Every step of the mount and of its release.
    pub timings: Timings,
}

impl Mounted {
    /// The directory the image is mounted on (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loop device.
    pub fn loopdev(&self) -> &str {
        self.loopdev
            .as_ref()
            .map(LoopDevice::path)
            .unwrap_or_default()
    }

    /// The steps taken so far and their times.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// For a caller timing steps of its own (the user lookup, the runtime) among these.
    pub fn timings_mut(&mut self) -> &mut Timings {
        &mut self.timings
    }

    /// The attachment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The agent's answer to the attach (id, file, size, config, ...).
    pub fn attachment(&self) -> &Value {
        &self.attachment
    }

    /// Leaves the mount in place (for `lode umount` to undo).
    pub fn keep(mut self) {
        self.kept = true;
    }

    /// Unmounts, releases the loop device and detaches, newest first; every failure is
    /// returned, not only the first.
    pub fn release(mut self) -> Released {
        let errors = self.undo();
        Released {
            errors,
            timings: self.timings.clone(),
        }
    }

    fn undo(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let dir = self.dir.clone();
        if std::mem::take(&mut self.mounted)
            && let Err(e) = self
                .timings
                .time(Step::Unmount, || plumbing::unmount(&dir, 0))
        {
            // A process the command left behind (chroot has no pid namespace) holds the
            // image: detach it from the tree now; the kernel lets go of it, and of the
            // loop device, when that process ends.
            let lazily = plumbing::unmount(&self.dir, libc::MNT_DETACH);
            errors.push(match lazily {
                Ok(()) => format!("{e}; detached lazily, released when its last user exits"),
                Err(_) => e.to_string(),
            });
        }
        if let Some(l) = self.loopdev.take() {
            let path = l.path().to_string();
            if let Err(e) = self
                .timings
                .time(Step::LoopRelease, || loopdev::release(Some(l), &path))
            {
                errors.push(e.to_string());
            }
        }
        if std::mem::take(&mut self.attached) {
            let name = &self.name;
            let (socket, timings) = (&self.socket, &mut self.timings);
            let detached = timings.time(Step::Detach, || {
                call(
                    socket,
                    "POST",
                    "/detach",
                    Some(&json!({"name": name, "keep_overlay": false})),
                )
            });
            if let Err(e) = detached {
                errors.push(format!("detaching {name}: {e}"));
            }
        }
        errors
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.kept {
            for e in self.undo() {
                eprintln!("lode: {e}");
            }
        }
    }
}

/// The default attachment name for a mount on `dir`: stable, so a second `lode mount`
/// on the same directory is refused by name.
fn mount_name(dir: &Path) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, dir.as_os_str().as_encoded_bytes());
    format!("mnt-{}", crate::hex8(d.as_ref()))
}

fn plumbing(context: String) -> impl FnOnce(PlumbingError) -> MountError {
    move |source| MountError::Plumbing { context, source }
}

/// Attaches `opts.image` through the agent at `socket`, puts its file on a loop device
/// and mounts it on `dir`. A signal noted by `signals` between steps undoes the steps
/// done and returns [`MountError::Interrupted`].
pub fn mount(
    socket: &Path,
    dir: &Path,
    opts: &MountOptions,
    signals: &SignalGuard,
) -> Result<Mounted, MountError> {
    mount_timed(socket, dir, opts, signals, Timings::default())
}

/// [`mount`], its steps recorded in `timings` (which [`Mounted::timings`] then holds).
pub fn mount_timed(
    socket: &Path,
    dir: &Path,
    opts: &MountOptions,
    signals: &SignalGuard,
    mut timings: Timings,
) -> Result<Mounted, MountError> {
    let interrupted = |m: Mounted| match signals.pending() {
        Some(signal) => {
            drop(m);
            Err(MountError::Interrupted { signal })
        }
        None => Ok(m),
    };
    let dir = dir
        .canonicalize()
        .map_err(|source| MountError::MountPoint {
            dir: dir.to_path_buf(),
            source,
        })?;
    if !dir.is_dir() {
        return Err(MountError::NotDirectory { dir });
    }
    if let Some((source_name, _)) =
        plumbing::mounted_on(&dir).map_err(plumbing("reading the mount table".into()))?
    {
        return Err(MountError::Busy { dir, source_name });
    }
    if let Some(signal) = signals.pending() {
        return Err(MountError::Interrupted { signal });
    }
    let name = opts.name.clone().unwrap_or_else(|| mount_name(&dir));
    let attachment = timings.time(Step::Attach, || {
        call(
            socket,
            "POST",
            "/attach",
            Some(&json!({"image": opts.image, "name": name, "writable": opts.writable})),
        )
    })?;
    let m = Mounted {
        socket: socket.to_path_buf(),
        dir,
        name,
        attached: true,
        loopdev: None,
        mounted: false,
        attachment,
        kept: false,
        timings,
    };
    let mut m = interrupted(m)?;
    let Some(file) = m.attachment["file"].as_str().map(PathBuf::from) else {
        return Err(MountError::NoFiles);
    };
    let backing = m
        .timings
        .time(Step::File, || loopdev::open_backing(&file, opts.writable))
        .map_err(plumbing("opening the attachment's file".into()))?;
    m.loopdev = Some(
        m.timings
            .time(Step::Loop, || {
                loopdev::attach(&backing, &file, opts.writable)
            })
            .map_err(plumbing(format!(
                "setting up a loop device on {}",
                file.display()
            )))?,
    );
    // The loop device holds the file now.
    drop(backing);
    let mut m = interrupted(m)?;
    if let Some(kb) = opts.readahead_kb {
        plumbing::set_readahead(m.loopdev(), kb)
            .map_err(plumbing("setting the readahead".into()))?;
    }
    let mut flags = libc::MS_NOATIME;
    if !opts.writable {
        flags |= libc::MS_RDONLY;
    }
    if !opts.allow_setuid_and_devices {
        flags |= libc::MS_NOSUID | libc::MS_NODEV;
    }
    // Write barriers make ext4 flush the device's cache at each journal commit, and a
    // flush of the loop device is an fsync of the FUSE file: the agent then syncs the
    // overlay to its disk. For writes that are thrown away that buys nothing.
    let data = (opts.writable && opts.throwaway).then_some("nobarrier");
    let (dev, target) = (m.loopdev().to_string(), m.dir.clone());
    m.timings
        .time(Step::Mount, || {
            plumbing::mount(&dev, &target, "ext4", flags, data)
        })
        .map_err(plumbing(format!(
            "mounting {} on {}",
            opts.image,
            m.dir.display()
        )))?;
    m.mounted = true;
    interrupted(m)
}

/// What `lode umount` undid.
#[derive(Debug)]
pub struct Unmounted {
    /// The mount point.
    pub dir: PathBuf,
    /// The loop device released.
    pub loopdev: String,
    /// The attachment detached; None when the loop device was not backed by a file of
    /// this agent's.
    pub name: Option<String>,
}

/// Unmounts what `lode mount` mounted on `dir`, releases its loop device and detaches the
/// attachment behind it (keeping a writable one's overlay when `keep_overlay`).
pub fn umount(socket: &Path, dir: &Path, keep_overlay: bool) -> Result<Unmounted, MountError> {
    let dir = dir
        .canonicalize()
        .map_err(|source| MountError::MountPoint {
            dir: dir.to_path_buf(),
            source,
        })?;
    let Some((source_name, fstype)) =
        plumbing::mounted_on(&dir).map_err(plumbing("reading the mount table".into()))?
    else {
        return Err(MountError::NotMounted { dir });
    };
    let dev = source_name.trim_start_matches("/dev/");
    if !dev.starts_with("loop") || fstype != "ext4" {
        return Err(MountError::NotLode {
            dir,
            source_name,
            fstype,
        });
    }
    let backing = plumbing::loop_backing_file(&source_name).map_err(plumbing(format!(
        "reading the backing file of {source_name}"
    )))?;
    let ls = call(socket, "GET", "/ls", None)?;
    let name = ls
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["file"].as_str() == Some(backing.as_str()))
        .and_then(|a| a["name"].as_str())
        .map(str::to_string);
    plumbing::unmount(&dir, 0).map_err(plumbing("unmounting".into()))?;
    loopdev::release(None, &source_name).map_err(plumbing(format!("releasing {source_name}")))?;
    if let Some(n) = &name {
        call(
            socket,
            "POST",
            "/detach",
            Some(&json!({"name": n, "keep_overlay": keep_overlay})),
        )?;
    }
    Ok(Unmounted {
        dir,
        loopdev: source_name,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_per_directory() {
        let a = mount_name(Path::new("/mnt/a"));
        assert_eq!(a, mount_name(Path::new("/mnt/a")));
        assert_ne!(a, mount_name(Path::new("/mnt/b")));
        assert!(a.starts_with("mnt-") && a.len() == 4 + 16, "{a}");
    }

    #[test]
    fn mount_points_are_checked_before_the_agent_is_asked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _lock = crate::signals::test_lock();
        let signals = SignalGuard::install();
        let opts = MountOptions {
            image: "x".into(),
            writable: false,
            name: None,
            readahead_kb: None,
            allow_setuid_and_devices: false,
            throwaway: false,
        };
        let sock = dir.path().join("control.sock");
        let missing = dir.path().join("missing");
        let e = mount(&sock, &missing, &opts, &signals).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("mount point {}: ", missing.display())),
            "{e}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "").expect("write");
        let e = mount(&sock, &file, &opts, &signals).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("mount point {} is not a directory", file.display())
        );
        let e = umount(&sock, dir.path(), false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "nothing is mounted on {}",
                dir.path().canonicalize().unwrap().display()
            )
        );
    }
}
