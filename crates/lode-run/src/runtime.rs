//! The two ways `lode run` runs a command in a mounted image, and what each contains.
//!
//! - **crun** (the default when it is on PATH): a generated OCI bundle with pid, ipc,
//!   uts and mount namespaces, a private /dev holding only the usual safe devices, the
//!   default capability set of runc and podman minus what lode cannot enforce (no
//!   `CAP_MKNOD`: crun runs with `--cgroup-manager=disabled`, so no devices cgroup stops
//!   a node made inside; no `CAP_NET_RAW` nor `CAP_NET_BIND_SERVICE`: the network is the
//!   host's), and no new privileges.
//! - **chroot**: chroot(2) with a read-only /proc and a private /dev tmpfs of the same
//!   safe devices, mounted onto directories reached without following any symlink of the
//!   image, and a smaller capability set (no `CAP_SYS_CHROOT`, which escapes a chroot
//!   without a mount namespace; no `CAP_KILL`, the pids being the host's). It is not a
//!   container: docs/run.md says what it leaves shared.
//!
//! Either way the image itself is mounted `nosuid,nodev` by [`crate::mount`], so neither
//! a device node of the image nor one made in it opens a host device.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use serde_json::json;

use crate::image::{ImageError, ImageRoot};
use crate::plumbing::{self, PlumbingError};
use crate::signals::SignalGuard;

/// A runtime step that failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A directory lode mounts onto was refused.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A mount inside the image failed.
    #[error("{context}: {source}")]
    Plumbing {
        /// The step.
        context: String,
        /// What failed.
        source: PlumbingError,
    },
    /// A device node could not be made in the private /dev.
    #[error("making /dev/{name} in the image: {source}")]
    Device {
        /// The node's name.
        name: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The command (or crun) did not start.
    #[error("starting {what}: {source}")]
    Spawn {
        /// What was started.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The OCI bundle could not be written.
    #[error("writing the OCI bundle {}: {source}", path.display())]
    Bundle {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A tool lode needs is not on PATH.
    #[error("{tool} is not on PATH (apt-get install {package})")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// An argument, variable or directory held a NUL byte.
    #[error("{what} holds a NUL byte")]
    Nul {
        /// Which one.
        what: String,
    },
}

/// What to run and how, from the image config and the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// The command and its arguments.
    pub args: Vec<String>,
    /// KEY=VALUE pairs.
    pub env: Vec<String>,
    /// The working directory inside the image.
    pub cwd: String,
    /// The uid.
    pub uid: u32,
    /// The gid.
    pub gid: u32,
}

/// Linux capability numbers (linux/capability.h) of the sets lode grants.
mod cap {
    pub const CHOWN: u32 = 0;
    pub const DAC_OVERRIDE: u32 = 1;
    pub const FOWNER: u32 = 3;
    pub const FSETID: u32 = 4;
    pub const KILL: u32 = 5;
    pub const SETGID: u32 = 6;
    pub const SETUID: u32 = 7;
    pub const SETPCAP: u32 = 8;
    pub const SYS_CHROOT: u32 = 18;
    pub const SETFCAP: u32 = 31;
}

/// The capabilities a command keeps under crun: podman's default set without
/// `CAP_NET_BIND_SERVICE` (the network namespace is the host's).
const CRUN_CAPS: [(u32, &str); 10] = [
    (cap::CHOWN, "CAP_CHOWN"),
    (cap::DAC_OVERRIDE, "CAP_DAC_OVERRIDE"),
    (cap::FOWNER, "CAP_FOWNER"),
    (cap::FSETID, "CAP_FSETID"),
    (cap::KILL, "CAP_KILL"),
    (cap::SETFCAP, "CAP_SETFCAP"),
    (cap::SETGID, "CAP_SETGID"),
    (cap::SETPCAP, "CAP_SETPCAP"),
    (cap::SETUID, "CAP_SETUID"),
    (cap::SYS_CHROOT, "CAP_SYS_CHROOT"),
];

/// The capabilities a command keeps under chroot: crun's without `CAP_SYS_CHROOT` (a
/// second chroot escapes the first when there is no mount namespace) and `CAP_KILL`
/// (the pids are the host's).
const CHROOT_CAPS: [u32; 8] = [
    cap::CHOWN,
    cap::DAC_OVERRIDE,
    cap::FOWNER,
    cap::FSETID,
    cap::SETFCAP,
    cap::SETGID,
    cap::SETPCAP,
    cap::SETUID,
];

/// The device nodes of a private /dev (name, major, minor): what runc and podman give
/// every container. /dev/ptmx and /dev/pts come from a devpts instance of its own.
const SAFE_DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn plumbing(context: impl Into<String>) -> impl FnOnce(PlumbingError) -> RuntimeError {
    let context = context.into();
    move |source| RuntimeError::Plumbing { context, source }
}

/// `/proc/self/fd/N`: mounting onto it mounts onto the directory the descriptor holds,
/// wherever a symlink of the image might point now.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn cstr(what: &str, s: &[u8]) -> Result<CString, RuntimeError> {
    CString::new(s).map_err(|_| RuntimeError::Nul {
        what: what.to_string(),
    })
}

/// The mounts made inside the image for a chroot, unmounted (newest first) on drop.
struct ChrootMounts {
    dir: PathBuf,
    made: Vec<&'static str>,
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        for m in self.made.drain(..).rev() {
            let path = self.dir.join(m);
            // The mount points cannot have moved: a mount point cannot be renamed or
            // removed, and the command had no CAP_SYS_ADMIN to unmount one. A process the
            // command left behind may still hold one busy, so detach lazily then.
            if plumbing::unmount(&path, 0).is_err()
                && let Err(e) = plumbing::unmount(&path, libc::MNT_DETACH)
            {
                eprintln!("lode: {e}");
            }
        }
    }
}

/// Mounts /proc (read-only) and a private /dev into the image for a chroot; a directory
/// the image lacks is left alone, one that is a symlink is refused.
fn chroot_mounts(root: &ImageRoot, dir: &Path) -> Result<ChrootMounts, RuntimeError> {
    let mut mounts = ChrootMounts {
        dir: dir.to_path_buf(),
        made: Vec::new(),
    };
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if let Some(fd) = root.mount_point("/proc")? {
        plumbing::mount(
            "proc",
            &fd_path(&fd),
            "proc",
            nosuid | libc::MS_RDONLY,
            None,
        )
        .map_err(plumbing("mounting /proc in the image"))?;
        mounts.made.push("proc");
    }
    if let Some(fd) = root.mount_point("/dev")? {
        plumbing::mount(
            "tmpfs",
            &fd_path(&fd),
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("mode=0755,size=1024k,nr_inodes=256"),
        )
        .map_err(plumbing("mounting a private /dev in the image"))?;
        mounts.made.push("dev");
        let dev = root.dir("/dev")?;
        populate_dev(&dev)?;
        let pts = root.dir("/dev/pts")?;
        plumbing::mount(
            "devpts",
            &fd_path(&pts),
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
        .map_err(plumbing("mounting /dev/pts in the image"))?;
        mounts.made.push("dev/pts");
    }
    Ok(mounts)
}

/// Fills a fresh /dev tmpfs: the safe nodes, pts and shm, and the usual symlinks.
fn populate_dev(dev: &OwnedFd) -> Result<(), RuntimeError> {
    let at = dev.as_raw_fd();
    let check = |name: &'static str, r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(RuntimeError::Device {
                name,
                source: std::io::Error::last_os_error(),
            })
        }
    };
    for (name, major, minor) in SAFE_DEVICES {
        let c = cstr(name, name.as_bytes())?;
        // SAFETY: `c` is a NUL-terminated name that outlives the calls; `at` is open.
        unsafe {
            check(
                name,
                libc::mknodat(
                    at,
                    c.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(major, minor),
                ),
            )?;
            // The umask took bits off the mode mknod set.
            check(name, libc::fchmodat(at, c.as_ptr(), 0o666, 0))?;
        }
    }
    for (name, mode) in [("pts", 0o755), ("shm", 0o1777)] {
        let c = cstr(name, name.as_bytes())?;
        // SAFETY: as above.
        unsafe {
            check(name, libc::mkdirat(at, c.as_ptr(), mode))?;
            check(name, libc::fchmodat(at, c.as_ptr(), mode, 0))?;
        }
    }
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let (n, t) = (cstr(name, name.as_bytes())?, cstr(name, target.as_bytes())?);
        // SAFETY: both are NUL-terminated strings that outlive the call.
        check(name, unsafe { libc::symlinkat(t.as_ptr(), at, n.as_ptr()) })?;
    }
    Ok(())
}

/// The capability header and data of capget(2)/capset(2), version 3 (two data words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// prctl(2)'s arguments are unsigned longs read from full registers: a bare `0` passed
/// through its C variadic signature would be an int with undefined upper bits.
const NO: libc::c_ulong = 0;
const YES: libc::c_ulong = 1;

/// In the child before exec: keeps only `keep` in the bounding set and clears the
/// inheritable and ambient sets, so that exec as uid 0 grants `keep` at most.
///
/// # Safety
/// Only async-signal-safe calls: for use between fork and exec.
unsafe fn limit_capabilities(keep: &[u32]) -> std::io::Result<()> {
    for c in 0..64u32 {
        if keep.contains(&c) {
            continue;
        }
        // SAFETY: prctl(2) with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(c), NO, NO, NO) } != 0 {
            let e = std::io::Error::last_os_error();
            // Past the kernel's last capability.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and two data words, as version 3 asks; both outlive the calls.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for d in &mut data {
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let clear_all = libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_CLEAR_ALL).unwrap_or(NO);
        if libc::prctl(libc::PR_CAP_AMBIENT, clear_all, NO, NO, NO) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The first `program` on PATH.
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn command(p: &Process) -> Command {
    let mut cmd = Command::new(&p.args[0]);
    cmd.args(&p.args[1..]).env_clear();
    for e in &p.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd
}

/// Spawns `cmd` and waits for it, passing SIGTERM and SIGHUP on to it meanwhile.
fn wait_forwarding(
    cmd: &mut Command,
    what: &str,
    signals: &SignalGuard,
) -> Result<ExitStatus, RuntimeError> {
    let spawn = |source| RuntimeError::Spawn {
        what: what.to_string(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn)?;
    signals.child_started(child.id());
    let status = child.wait();
    signals.child_ended();
    status.map_err(spawn)
}

/// Runs `p` chrooted into the image mounted on `dir`, with a read-only /proc and a
/// private /dev mounted for it.
pub fn run_chroot(
    root: &ImageRoot,
    dir: &Path,
    p: &Process,
    signals: &SignalGuard,
) -> Result<ExitStatus, RuntimeError> {
    let mounts = chroot_mounts(root, dir)?;
    let root_fd = root.fd().as_raw_fd();
    let cwd = cstr("the working directory", p.cwd.as_bytes())?;
    let (uid, gid) = (p.uid, p.gid);
    let mut cmd = command(p);
    // SAFETY: between fork and exec the closure only makes async-signal-safe system
    // calls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(libc::fchdir(root_fd))?;
            check(libc::chroot(c".".as_ptr()))?;
            check(libc::chdir(cwd.as_ptr()))?;
            limit_capabilities(&CHROOT_CAPS)?;
            let groups = [gid];
            check(libc::setgroups(1, groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, YES, NO, NO, NO))?;
            Ok(())
        });
    }
    let status = wait_forwarding(
        &mut cmd,
        &format!("{:?} in the image (chroot)", p.args[0]),
        signals,
    );
    drop(mounts);
    status
}

/// The host programs of the hook that keeps the container's root `nosuid,nodev`.
#[derive(Debug, Clone)]
pub struct RemountHook {
    /// A POSIX shell, which reads the container state crun writes to every hook's stdin
    /// (crun fails the hook when a program exits before taking it all).
    pub sh: PathBuf,
    /// mount(8).
    pub mount: PathBuf,
}

impl RemountHook {
    /// Both programs from PATH.
    pub fn find() -> Result<RemountHook, RuntimeError> {
        let find =
            |tool, package| find_program(tool).ok_or(RuntimeError::MissingTool { tool, package });
        Ok(RemountHook {
            sh: find("sh", "dash")?,
            mount: find("mount", "util-linux")?,
        })
    }
}

/// The OCI runtime configuration lode gives crun for `p` in the image at `root`.
/// `remount` is given when the image is to stay `nosuid,nodev` inside the container:
/// crun bind-mounts the root onto itself and remounts the bind with no flags, which
/// drops both, so a createContainer hook (run in the container's mount namespace once
/// crun's own mounts are made, before pivot_root) puts them back.
pub fn crun_config(root: &Path, p: &Process, remount: Option<&RemountHook>) -> serde_json::Value {
    let caps: Vec<&str> = CRUN_CAPS.iter().map(|(_, n)| *n).collect();
    // The allow-list of runc and podman, for a host where crun manages cgroups; with
    // `--cgroup-manager=disabled` it is not enforced, and containment comes from nodev
    // mounts and the missing CAP_MKNOD.
    let char_dev = |major: u32, minor: u32| json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"});
    let mut devices = vec![json!({"allow": false, "access": "rwm"})];
    devices.extend(SAFE_DEVICES.iter().map(|(_, ma, mi)| char_dev(*ma, *mi)));
    // /dev/console, /dev/ptmx, and any pseudo-terminal (major 136, no minor: all).
    devices.extend([char_dev(5, 1), char_dev(5, 2)]);
    devices.push(json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}));
    let hooks = match remount {
        Some(hook) => json!({"createContainer": [{
            "path": hook.sh,
            "args": [
                "sh", "-c",
                "while read -r _; do :; done; exec \"$0\" -o remount,bind,nosuid,nodev \"$1\"",
                hook.mount, root
            ],
        }]}),
        None => json!({}),
    };
    json!({
        "ociVersion": "1.0.2",
        "hooks": hooks,
        "process": {
            "terminal": false,
            "user": {"uid": p.uid, "gid": p.gid},
            "args": p.args,
            "env": p.env,
            "cwd": p.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true
        },
        "root": {"path": root, "readonly": false},
        "hostname": "lode",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "noexec", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "resources": {"devices": devices},
            "rootfsPropagation": "private",
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap"
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Runs `p` with crun in a generated bundle whose root is the image mounted on `dir`;
/// `id` names the container.
pub fn run_crun(
    dir: &Path,
    p: &Process,
    id: &str,
    contain: bool,
    signals: &SignalGuard,
) -> Result<ExitStatus, RuntimeError> {
    let remount = if contain {
        Some(RemountHook::find()?)
    } else {
        None
    };
    let bundle = tempfile::Builder::new()
        .prefix("lode-bundle-")
        .tempdir()
        .map_err(|source| RuntimeError::Bundle {
            path: std::env::temp_dir(),
            source,
        })?;
    let path = bundle.path().join("config.json");
    let config =
        serde_json::to_vec_pretty(&crun_config(dir, p, remount.as_ref())).unwrap_or_default();
    std::fs::write(&path, config).map_err(|source| RuntimeError::Bundle {
        path: path.clone(),
        source,
    })?;
    let state = bundle.path().join("state");
    let mut cmd = Command::new("crun");
    cmd.arg("--root")
        .arg(&state)
        .args(["--cgroup-manager=disabled", "run", "--bundle"])
        .arg(bundle.path())
        .arg(id);
    // crun refuses hosts with cgroup v1 and v2 both holding controllers ("hybrid mode")
    // even when told not to manage cgroups. lode run sets no resource limits, so crun
    // runs in a mount namespace of its own where /sys/fs/cgroup is an empty tmpfs.
    let (slash, none, cgroup, tmpfs) = (c"/", c"none", c"/sys/fs/cgroup", c"tmpfs");
    // SAFETY: between fork and exec the closure only makes async-signal-safe system
    // calls on static strings.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    none.as_ptr(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // No /sys/fs/cgroup at all is fine too.
            libc::mount(
                none.as_ptr(),
                cgroup.as_ptr(),
                tmpfs.as_ptr(),
                0,
                std::ptr::null(),
            );
            Ok(())
        });
    }
    wait_forwarding(&mut cmd, "crun", signals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process() -> Process {
        Process {
            args: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn crun_gets_no_mknod_and_no_host_devices() {
        let hook = RemountHook {
            sh: "/bin/sh".into(),
            mount: "/bin/mount".into(),
        };
        let c = crun_config(Path::new("/mnt/x"), &process(), Some(&hook));
        let caps: Vec<&str> = c["process"]["capabilities"]["bounding"]
            .as_array()
            .expect("caps")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for refused in ["CAP_MKNOD", "CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_SYS_RAWIO"] {
            assert!(!caps.contains(&refused), "{refused} in {caps:?}");
        }
        assert_eq!(c["process"]["noNewPrivileges"], true);
        let mounts = c["mounts"].as_array().expect("mounts");
        let dev = mounts
            .iter()
            .find(|m| m["destination"] == "/dev")
            .expect("/dev");
        assert_eq!(dev["type"], "tmpfs", "a private /dev, not the host's");
        assert!(
            !mounts.iter().any(|m| m["type"] == "bind"),
            "no host path is bound in"
        );
        let devices = c["linux"]["resources"]["devices"]
            .as_array()
            .expect("devices");
        assert_eq!(devices[0], json!({"allow": false, "access": "rwm"}));
        assert!(
            devices.iter().skip(1).all(|d| d["type"] == "c"),
            "no block device allowed"
        );
        let remount = &c["hooks"]["createContainer"][0];
        assert_eq!(remount["path"], "/bin/sh");
        assert_eq!(remount["args"][3], "/bin/mount");
        assert_eq!(remount["args"][4], "/mnt/x");
        let script = remount["args"][2].as_str().expect("script");
        assert!(
            script.ends_with("-o remount,bind,nosuid,nodev \"$1\""),
            "{script}"
        );
        let c = crun_config(Path::new("/mnt/x"), &process(), None);
        assert_eq!(
            c["hooks"],
            json!({}),
            "--allow-setuid-and-devices: no remount"
        );
    }

    /// Root is needed to mount; where the test script ran as root, nothing skips.
    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            lode_testkit::skip("mounting needs root");
        }
        root
    }

    #[test]
    fn chroot_mounts_land_inside_the_image_and_go_away() {
        if !root() {
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let host = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("proc")).expect("mkdir");
        std::os::unix::fs::symlink(host.path(), dir.path().join("dev")).expect("ln");
        let root = ImageRoot::open(dir.path()).expect("open");
        // A /dev symlinked out is refused, and the /proc mounted before it is undone.
        let e = chroot_mounts(&root, dir.path()).err().expect("refused");
        assert_eq!(
            e.to_string(),
            format!(
                "/dev in the image is a symlink to {}; lode mounts nothing through a symlink",
                host.path().display()
            )
        );
        let mounted = |p: &Path| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .expect("mountinfo")
                .lines()
                .find(|l| l.split(' ').nth(4) == p.to_str())
                .map(str::to_string)
        };
        assert_eq!(mounted(&dir.path().join("proc")), None);
        std::fs::remove_file(dir.path().join("dev")).expect("rm");
        std::fs::create_dir(dir.path().join("dev")).expect("mkdir");
        let mounts = chroot_mounts(&root, dir.path()).expect("mounts");
        let proc = mounted(&dir.path().join("proc")).expect("/proc mounted");
        assert!(proc.contains(" ro,nosuid,nodev,noexec"), "{proc}");
        let dev = mounted(&dir.path().join("dev")).expect("/dev mounted");
        assert!(dev.contains(" - tmpfs "), "{dev}");
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let null = std::fs::metadata(dir.path().join("dev/null")).expect("null");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), libc::makedev(1, 3));
        assert_eq!(null.permissions().mode() & 0o777, 0o666);
        let names: std::collections::BTreeSet<String> = std::fs::read_dir(dir.path().join("dev"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        let want = [
            "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
            "tty", "urandom", "zero",
        ];
        assert_eq!(names, want.iter().map(|s| s.to_string()).collect());
        drop(mounts);
        assert_eq!(mounted(&dir.path().join("proc")), None);
        assert_eq!(mounted(&dir.path().join("dev")), None);
        assert_eq!(mounted(&dir.path().join("dev/pts")), None);
    }

    #[test]
    fn chroot_keeps_fewer_capabilities_than_crun() {
        let crun: Vec<u32> = CRUN_CAPS.iter().map(|(c, _)| *c).collect();
        assert!(CHROOT_CAPS.iter().all(|c| crun.contains(c)));
        assert!(!CHROOT_CAPS.contains(&cap::SYS_CHROOT));
        assert!(!CHROOT_CAPS.contains(&cap::KILL));
    }
}
