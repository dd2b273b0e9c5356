//! `lode mount`, `lode umount` and `lode run`: an attachment's FUSE file on a loop device,
//! its ext4 mounted, and a command run inside it (chroot, or crun with a generated OCI
//! bundle). The kernel's own tools do the plumbing (`losetup`, `mount`, `umount`), so
//! what they say reaches the user as it is.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::Env;
use crate::agent::{call, control_path};
use crate::cli::{MountArgs, RunArgs, Runtime, UmountArgs};

/// Runs a plumbing command, returning its stdout; a failure carries its stderr.
fn tool(cmd: &mut Command) -> Result<String> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd
        .output()
        .with_context(|| format!("running `{shown}` (is util-linux installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The default attachment name for a mount on `dir`: stable, so a second `lode mount`
/// on the same directory is refused by name.
fn mount_name(dir: &Path) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, dir.as_os_str().as_encoded_bytes());
    format!("mnt-{}", hex8(d.as_ref()))
}

fn hex8(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// The mount table entry (device, fs type) mounted on `dir`, if any (the last one wins).
fn mounted_on(dir: &Path) -> Result<Option<(String, String)>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
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
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What `mount` set up, for undoing it.
struct Mounted {
    dir: PathBuf,
    loopdev: String,
    name: String,
    attachment: Value,
}

/// Detaches a loop device and waits until the kernel has let go of its backing file.
/// `losetup -d` on a device whose last user is still closing (just after `umount`) only
/// marks it for auto-clear and returns; detaching the attachment under it then would leave
/// a loop device on a vanished file, so wait (5 s at most) for sysfs to show it released.
fn release_loop(loopdev: &str) -> Result<()> {
    tool(Command::new("losetup").args(["-d", loopdev]))?;
    let name = loopdev.trim_start_matches("/dev/");
    let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
    let started = std::time::Instant::now();
    while backing.exists() {
        if started.elapsed() > std::time::Duration::from_secs(5) {
            anyhow::bail!(
                "{loopdev} is still in use 5 s after `losetup -d`; it will detach when its last user closes it"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

/// Undoes whatever part of a mount exists, newest first; reports every failure.
fn undo(sock: &Path, dir: Option<&Path>, loopdev: Option<&str>, name: &str, keep: bool) {
    if let Some(d) = dir
        && let Err(e) = tool(Command::new("umount").arg(d))
    {
        eprintln!("lode: {e:#}");
    }
    if let Some(l) = loopdev
        && let Err(e) = release_loop(l)
    {
        eprintln!("lode: {e:#}");
    }
    if let Err(e) = call(
        sock,
        "POST",
        "/detach",
        Some(&json!({"name": name, "keep_overlay": keep})),
    ) {
        eprintln!("lode: detaching {name}: {e:#}");
    }
}

fn set_readahead(loopdev: &str, kb: u32) -> Result<()> {
    let dev = loopdev.trim_start_matches("/dev/");
    let p = format!("/sys/block/{dev}/queue/read_ahead_kb");
    std::fs::write(&p, kb.to_string()).with_context(|| format!("writing {p}"))
}

fn do_mount(
    sock: &Path,
    image: &str,
    dir: &Path,
    rw: bool,
    name: Option<String>,
    readahead_kb: Option<u32>,
) -> Result<Mounted> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("mount point {}", dir.display()))?;
    if !dir.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    if let Some((src, _)) = mounted_on(&dir)? {
        bail!("{} already has {src} mounted on it", dir.display());
    }
    let name = name.unwrap_or_else(|| mount_name(&dir));
    let att = call(
        sock,
        "POST",
        "/attach",
        Some(&json!({"image": image, "name": name, "writable": rw})),
    )?;
    let Some(file) = att["file"].as_str().map(PathBuf::from) else {
        undo(sock, None, None, &name, false);
        bail!("the agent runs without a FUSE mount (--no-files), so there is no file to mount");
    };
    let mut losetup = Command::new("losetup");
    losetup.args(["--find", "--show"]);
    if !rw {
        losetup.arg("--read-only");
    }
    let loopdev = match tool(losetup.arg(&file)) {
        Ok(l) => l,
        Err(e) => {
            undo(sock, None, None, &name, false);
            return Err(e.context(format!("setting up a loop device on {}", file.display())));
        }
    };
    if let Some(kb) = readahead_kb
        && let Err(e) = set_readahead(&loopdev, kb)
    {
        undo(sock, None, Some(&loopdev), &name, false);
        return Err(e);
    }
    let opts = if rw { "rw" } else { "ro" };
    if let Err(e) = tool(
        Command::new("mount")
            .args(["-t", "ext4", "-o", opts, &loopdev])
            .arg(&dir),
    ) {
        undo(sock, None, Some(&loopdev), &name, false);
        return Err(e.context(format!("mounting {image} on {}", dir.display())));
    }
    Ok(Mounted {
        dir,
        loopdev,
        name,
        attachment: att,
    })
}

pub fn mount(env: &Env, home: &Path, a: MountArgs) -> Result<()> {
    let sock = control_path(home, &a.control);
    let m = do_mount(&sock, &a.image, &a.dir, a.rw, a.name, a.readahead_kb)?;
    if env.cli_json {
        let mut v = m.attachment.clone();
        v["mountpoint"] = json!(m.dir);
        v["loop_device"] = json!(m.loopdev);
        crate::output::print_json(&v)?;
    } else if !env.quiet {
        println!(
            "mounted {} ({}) on {}, {} via {} (attachment {})",
            a.image,
            m.attachment["id"].as_str().unwrap_or_default(),
            m.dir.display(),
            if a.rw {
                "read-write into an overlay"
            } else {
                "read-only"
            },
            m.loopdev,
            m.name
        );
    }
    Ok(())
}

/// The loop device mounted on `dir` and the attachment behind it.
fn find_mount(sock: &Path, dir: &Path) -> Result<(PathBuf, String, Option<String>)> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("mount point {}", dir.display()))?;
    let Some((source, fstype)) = mounted_on(&dir)? else {
        bail!("nothing is mounted on {}", dir.display());
    };
    let dev = source.trim_start_matches("/dev/");
    if !dev.starts_with("loop") || fstype != "ext4" {
        bail!(
            "{} has {source} ({fstype}) mounted on it, not a lode image",
            dir.display()
        );
    }
    let backing = std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file"))
        .with_context(|| format!("reading the backing file of {source}"))?;
    let backing = backing.trim().trim_end_matches(" (deleted)").to_string();
    let ls = call(sock, "GET", "/ls", None)?;
    let name = ls
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["file"].as_str() == Some(backing.as_str()))
        .and_then(|a| a["name"].as_str())
        .map(str::to_string);
    Ok((dir, source, name))
}

pub fn umount(env: &Env, home: &Path, a: UmountArgs) -> Result<()> {
    let sock = control_path(home, &a.control);
    let (dir, loopdev, name) = find_mount(&sock, &a.dir)?;
    tool(Command::new("umount").arg(&dir))?;
    release_loop(&loopdev)?;
    match &name {
        Some(n) => {
            call(
                &sock,
                "POST",
                "/detach",
                Some(&json!({"name": n, "keep_overlay": a.keep_overlay})),
            )?;
        }
        None => {
            eprintln!("lode: {loopdev} was not backed by a file of this agent; nothing detached")
        }
    }
    if !env.quiet && !env.cli_json {
        println!(
            "unmounted {}, released {loopdev}{}",
            dir.display(),
            name.map(|n| format!(", detached {n}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// The `(id, field 3)` of the entry of `file` (passwd or group format, inside the image)
/// whose name, or whose id when `by_id`, is `key`.
fn entry(root: &Path, file: &str, key: &str, by_id: bool) -> Option<(u32, Option<u32>)> {
    let text = std::fs::read_to_string(root.join(file)).ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let hit = if by_id { f.get(2) } else { f.first() };
        (hit == Some(&key)).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok())))?
    })
}

/// A uid and gid from an image's `user[:group]`, names looked up in its own files; a
/// numeric user without a group takes its passwd entry's group, or 0.
fn resolve_user(root: &Path, spec: &str) -> Result<(u32, u32)> {
    if spec.is_empty() {
        return Ok((0, 0));
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, mut gid) = match user.parse::<u32>() {
        Ok(u) => (
            u,
            entry(root, "etc/passwd", user, true)
                .and_then(|e| e.1)
                .unwrap_or(0),
        ),
        Err(_) => match entry(root, "etc/passwd", user, false) {
            Some((u, g)) => (u, g.unwrap_or(0)),
            None => bail!("user {user:?} is not in the image's /etc/passwd"),
        },
    };
    if let Some(g) = group {
        gid = match g.parse::<u32>() {
            Ok(g) => g,
            Err(_) => entry(root, "etc/group", g, false)
                .map(|e| e.0)
                .ok_or_else(|| anyhow!("group {g:?} is not in the image's /etc/group"))?,
        };
    }
    Ok((uid, gid))
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run and how, from the image config and the command line.
struct Process {
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    uid: u32,
    gid: u32,
}

fn process(root: &Path, config: &Value, a: &RunArgs) -> Result<Process> {
    let strings = |k: &str| -> Vec<String> {
        config[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let args = if a.command.is_empty() {
        let mut v = strings("entrypoint");
        v.extend(strings("cmd"));
        v
    } else {
        a.command.clone()
    };
    if args.is_empty() {
        bail!("the image has no entrypoint or cmd; give a command after --");
    }
    let mut env = strings("env");
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    for e in &a.env {
        if !e.contains('=') {
            bail!("--env {e:?} is not KEY=VALUE");
        }
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let cwd = config["working_dir"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("/")
        .to_string();
    let user = a
        .user
        .clone()
        .unwrap_or_else(|| config["user"].as_str().unwrap_or_default().to_string());
    let (uid, gid) = resolve_user(root, &user)?;
    Ok(Process {
        args,
        env,
        cwd,
        uid,
        gid,
    })
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Runs `p` chrooted into `root` with /proc and /dev mounted for it.
fn run_chroot(root: &Path, p: &Process) -> Result<std::process::ExitStatus> {
    use std::os::unix::process::CommandExt;
    let mut extra = Vec::new();
    for (target, args) in [
        ("proc", vec!["-t", "proc", "proc"]),
        ("dev", vec!["--bind", "/dev"]),
    ] {
        let t = root.join(target);
        if t.is_dir() && tool(Command::new("mount").args(&args).arg(&t)).is_ok() {
            extra.push(t);
        }
    }
    let root_c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())?;
    let cwd_c = std::ffi::CString::new(p.cwd.as_bytes())?;
    let (uid, gid) = (p.uid, p.gid);
    let mut cmd = Command::new(&p.args[0]);
    cmd.args(&p.args[1..]).env_clear();
    for e in &p.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
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
            check(libc::chroot(root_c.as_ptr()))?;
            check(libc::chdir(cwd_c.as_ptr()))?;
            let groups = [gid];
            check(libc::setgroups(1, groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            Ok(())
        });
    }
    let status = wait_forwarding(&mut cmd)
        .with_context(|| format!("starting {:?} in the image (chroot)", p.args[0]));
    for t in extra.iter().rev() {
        if tool(Command::new("umount").arg(t)).is_err() {
            let _ = tool(Command::new("umount").arg("-l").arg(t));
        }
    }
    status
}

/// Runs `p` with crun in a generated bundle whose root is `root`.
fn run_crun(root: &Path, p: &Process, id: &str) -> Result<std::process::ExitStatus> {
    let bundle = tempfile::Builder::new()
        .prefix("lode-bundle-")
        .tempdir()
        .context("creating a bundle directory")?;
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    let config = json!({
        "ociVersion": "1.0.2",
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
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    let path = bundle.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
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
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
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
    wait_forwarding(&mut cmd).context("starting crun")
}

/// The running command's pid, for the signal handler.
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

extern "C" fn ignore(_: libc::c_int) {}

/// Runs `cmd` to its end while lode stays alive to clean up: SIGTERM and SIGHUP sent to
/// lode are passed on to the command, and SIGINT (which a terminal sends to the command
/// too) is left to the command. Handlers, unlike ignored signals, reset to the default
/// in the command at exec.
fn wait_forwarding(cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    let install = |sig, handler: extern "C" fn(libc::c_int)| {
        // SAFETY: the handlers only read an atomic and call kill(2), both async-signal-safe.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) }
    };
    let old: Vec<(libc::c_int, libc::sighandler_t)> = [
        (libc::SIGTERM, forward as extern "C" fn(libc::c_int)),
        (libc::SIGHUP, forward),
        (libc::SIGINT, ignore),
    ]
    .into_iter()
    .map(|(sig, h)| (sig, install(sig, h)))
    .collect();
    let result = cmd.spawn().and_then(|mut child| {
        let pid = i32::try_from(child.id()).unwrap_or(0);
        CHILD.store(pid, std::sync::atomic::Ordering::SeqCst);
        let status = child.wait();
        CHILD.store(0, std::sync::atomic::Ordering::SeqCst);
        status
    });
    for (sig, h) in old {
        // SAFETY: restores the disposition signal(2) returned for this signal.
        unsafe { libc::signal(sig, h) };
    }
    result
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

pub fn run(env: &Env, home: &Path, a: RunArgs) -> Result<ExitCode> {
    let sock = control_path(home, &a.control);
    let dir = tempfile::Builder::new()
        .prefix("lode-run-")
        .tempdir()
        .context("creating a mount point")?;
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| anyhow!("no randomness for a run name"))?;
    let name = format!("run-{}", hex8(&nonce));
    let m = do_mount(
        &sock,
        &a.image,
        dir.path(),
        true,
        Some(name),
        a.readahead_kb,
    )?;
    let result = (|| {
        let p = process(&m.dir, &m.attachment["config"], &a)?;
        let runtime = match a.runtime {
            Runtime::Auto if have("crun") => Runtime::Crun,
            Runtime::Auto => Runtime::Chroot,
            r => r,
        };
        if !env.quiet && !env.cli_json {
            eprintln!(
                "lode: running {:?} in {} ({}, uid {} gid {}, cwd {})",
                p.args,
                a.image,
                match runtime {
                    Runtime::Crun => "crun",
                    _ => "chroot",
                },
                p.uid,
                p.gid,
                p.cwd
            );
        }
        match runtime {
            Runtime::Crun => run_crun(&m.dir, &p, &m.name),
            _ => run_chroot(&m.dir, &p),
        }
    })();
    undo(&sock, Some(&m.dir), Some(&m.loopdev), &m.name, false);
    Ok(exit_code(result?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn users_resolve_in_the_image() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let r = root.path();
        assert_eq!(resolve_user(r, "").unwrap(), (0, 0));
        assert_eq!(resolve_user(r, "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(r, "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(r, "4242").unwrap(), (4242, 0));
        assert_eq!(resolve_user(r, "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(r, "7:8").unwrap(), (7, 8));
        let e = resolve_user(r, "nobody").unwrap_err().to_string();
        assert!(e.contains("nobody") && e.contains("/etc/passwd"), "{e}");
        let e = resolve_user(r, "app:wheel").unwrap_err().to_string();
        assert!(e.contains("wheel") && e.contains("/etc/group"), "{e}");
    }
}
