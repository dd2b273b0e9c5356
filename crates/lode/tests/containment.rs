//! System tests of what `lode run` and `lode mount` contain, with hostile images built
//! for real (a tree made with the kernel's own mknod, mkfifo and symlinks, packed by
//! `mkfs.ext4 -d` and imported) and run through the real binary, a real agent, real loop
//! devices and ext4 mounts, crun and chroot. Each attack was reproduced against lode
//! before it was fixed; here it must be refused, bounded, or do nothing, and leave no
//! mount, loop device or attachment behind. Needs root, /dev/fuse, loop devices,
//! e2fsprogs, busybox-static, crun and util-linux's setpriv (scripts/test.sh installs them).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lode_testkit::MountGuard;
use serde_json::Value;

#[path = "common/harness.rs"]
mod harness;
use harness::{ChildGuard, Home, is_mounted};

fn root_with_tools() {
    let root = lode_testkit::is_root();
    assert!(
        root && Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists(),
        "these tests need root, /dev/fuse and loop devices (CI runs as root)"
    );
    for (tool, package) in [
        ("mkfs.ext4", "e2fsprogs"),
        ("crun", "crun"),
        ("setpriv", "util-linux"),
        ("losetup", "util-linux"),
    ] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing: apt-get install {package}"
        );
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: apt-get install busybox-static"
    );
}

fn mknod(path: &Path, mode: libc::mode_t, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: `c` is a NUL-terminated path; mknod(2) has no memory preconditions.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A loop device over a file of the host holding a secret: the host disk an attacker
/// wants to read.
struct HostDisk {
    dev: String,
    major: u32,
    minor: u32,
}

const SECRET: &str = "HOST-DISK-SECRET-7c1f";

impl HostDisk {
    fn new(h: &Home) -> HostDisk {
        let file = h.path("host-disk.img");
        let mut bytes = SECRET.as_bytes().to_vec();
        bytes.resize(1 << 20, 0);
        fs::write(&file, bytes).expect("write");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let rdev = fs::metadata(&dev).expect("stat").rdev();
        HostDisk {
            dev,
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        }
    }
}

impl Drop for HostDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

trait HostileHome {
    fn image(&self, tag: &str, edit: impl FnOnce(&Path));
    fn names(&self) -> Vec<String>;
    fn run_bounded(&self, args: &[&str]) -> Output;
    fn assert_clean(&self, what: &str);
    fn tmp(&self) -> PathBuf;
}

impl HostileHome for Home {
    /// A busybox root (passwd, group, /proc, /dev, /tmp), changed by `edit`, packed by
    /// mkfs.ext4 and imported as `tag`.
    fn image(&self, tag: &str, edit: impl FnOnce(&Path)) {
        let tree = self.path(&format!("tree-{tag}"));
        for d in ["bin", "etc", "proc", "dev", "tmp", "work"] {
            fs::create_dir_all(tree.join(d)).expect("mkdir");
        }
        fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("chmod");
        fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("busybox-static");
        for applet in [
            "sh", "id", "cat", "ls", "echo", "true", "mknod", "sleep", "head", "stat",
        ] {
            symlink("busybox", tree.join("bin").join(applet)).expect("ln");
        }
        fs::write(
            tree.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/work:/bin/sh\n",
        )
        .expect("passwd");
        fs::write(tree.join("etc/group"), "root:x:0:\napp:x:1001:\n").expect("group");
        edit(&tree);
        let img = self.path(&format!("{tag}.ext4"));
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(&tree)
            .arg(&img)
            .arg("16M")
            .output()
            .expect("mkfs.ext4");
        assert!(
            out.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ok(&["import", img.to_str().expect("path"), "--tag", tag, "-q"]);
    }

    fn names(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ok(&["--json", "ls"])).expect("JSON");
        v.as_array()
            .expect("array")
            .iter()
            .map(|a| a["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// `lode ARGS` with TMPDIR in the test's directory, killed (and the test failed) if
    /// it has not ended in 120 s: a hang is a bug here.
    fn run_bounded(&self, args: &[&str]) -> Output {
        let tmp = self.tmp();
        fs::create_dir_all(&tmp).expect("mkdir");
        let mut child = self
            .cmd(args)
            .env("TMPDIR", &tmp)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lode");
        let pipe = |mut r: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out = pipe(Box::new(child.stdout.take().expect("stdout")));
        let err = pipe(Box::new(child.stderr.take().expect("stderr")));
        let mut child = ChildGuard(child);
        let status = child.wait_for(Duration::from_secs(120));
        assert!(status.is_some(), "lode {args:?} hung");
        let o = Output {
            status: status.expect("status"),
            stdout: out.join().expect("stdout"),
            stderr: err.join().expect("stderr"),
        };
        assert!(
            !stderr(&o).contains("panicked"),
            "lode {args:?} panicked:\n{}",
            stderr(&o)
        );
        o
    }

    /// No attachment, no loop device on the agent's files, nothing mounted under the
    /// TMPDIR lode runs with.
    fn assert_clean(&self, what: &str) {
        assert!(
            self.names().is_empty(),
            "{what}: attachments {:?}",
            self.names()
        );
        let out = Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
            .output()
            .expect("losetup");
        let home = self.home();
        let loops: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(home.to_str().expect("path")))
            .map(str::to_string)
            .collect();
        assert!(loops.is_empty(), "{what}: loop devices {loops:?}");
        let tmp = self.tmp();
        let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let left: Vec<&str> = info
            .lines()
            .filter(|l| l.contains(tmp.to_str().expect("path")))
            .collect();
        assert!(left.is_empty(), "{what}: mounts {left:?}");
    }

    fn tmp(&self) -> PathBuf {
        self.path("tmp")
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn last_line(o: &Output) -> String {
    stderr(o)
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn users_are_looked_up_inside_the_image_only() {
    root_with_tools();
    let h = Home::new();
    assert!(
        fs::metadata("/etc/shadow").is_ok(),
        "the attack reads the host's /etc/shadow"
    );
    // (tag, the passwd edit, the error it must give)
    type Edit = fn(&Path);
    let cases: [(&str, Edit, &str); 6] = [
        (
            "shadow",
            |t| {
                fs::remove_file(t.join("etc/passwd")).expect("rm");
                symlink("/etc/shadow", t.join("etc/passwd")).expect("ln");
            },
            "looking up user \"root\": /etc/passwd in the image is a symlink to /etc/shadow, \
             which is not in the image",
        ),
        (
            "etcloop",
            |t| {
                fs::remove_dir_all(t.join("etc")).expect("rm");
                symlink("/etc", t.join("etc")).expect("ln");
            },
            "looking up user \"root\": /etc/passwd in the image: Too many levels of symbolic \
             links (os error 40)",
        ),
        (
            "zero",
            |t| {
                fs::remove_file(t.join("etc/passwd")).expect("rm");
                symlink("/dev/zero", t.join("etc/passwd")).expect("ln");
            },
            "looking up user \"root\": /etc/passwd in the image is a symlink to /dev/zero, \
             which is not in the image",
        ),
        (
            "zeronode",
            |t| {
                // The image's own /dev/zero, a real device node: not read either.
                mknod(&t.join("dev/zero"), libc::S_IFCHR | 0o666, 1, 5);
                fs::remove_file(t.join("etc/passwd")).expect("rm");
                symlink("/dev/zero", t.join("etc/passwd")).expect("ln");
            },
            "looking up user \"root\": /etc/passwd in the image is a character device, not a \
             regular file",
        ),
        (
            "fifo",
            |t| {
                fs::remove_file(t.join("etc/passwd")).expect("rm");
                let c = std::ffi::CString::new(t.join("etc/passwd").as_os_str().as_encoded_bytes())
                    .expect("path");
                // SAFETY: a NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            },
            "looking up user \"root\": /etc/passwd in the image is a FIFO, not a regular file",
        ),
        (
            "big",
            |t| {
                let mut text = "#\n".repeat(600_000);
                text.push_str("root:x:0:0::/:/bin/sh\n");
                fs::write(t.join("etc/passwd"), text).expect("write");
            },
            "looking up user \"root\": /etc/passwd in the image is larger than 1048576 bytes \
             (1200022 bytes)",
        ),
    ];
    for (tag, edit, _) in &cases {
        h.image(tag, *edit);
    }
    let _agent = h.start_agent();
    for (tag, _, want) in &cases {
        for runtime in ["chroot", "crun"] {
            let o = h.run_bounded(&["run", tag, "--runtime", runtime, "-u", "root", "--", "id"]);
            assert!(!o.status.success(), "{tag} {runtime}: {}", stdout(&o));
            assert_eq!(
                last_line(&o),
                format!("lode: error: {want}"),
                "{tag} {runtime}"
            );
            assert!(stdout(&o).is_empty(), "{tag} {runtime}: {}", stdout(&o));
            h.assert_clean(&format!("{tag} {runtime}"));
        }
        // A numeric user and group read no file: the image still runs (a command that
        // reads /etc/passwd itself, like busybox's id, would read its own /dev/zero).
        let o = h.run_bounded(&[
            "run",
            tag,
            "--runtime",
            "chroot",
            "-u",
            "0:0",
            "--",
            "echo",
            "ran",
        ]);
        assert_eq!(stdout(&o), "ran\n", "{tag}: {}", stderr(&o));
    }
}

#[test]
fn symlinks_in_the_image_resolve_inside_it() {
    root_with_tools();
    let h = Home::new();
    // The image's own /etc/shadow, reached by an absolute and by a ../ symlink: the
    // uid comes from the image, as it would for a process chrooted into it.
    h.image("inroot", |t| {
        fs::write(t.join("etc/shadow"), "root:x:4242:4343::/:/bin/sh\n").expect("write");
        fs::remove_file(t.join("etc/passwd")).expect("rm");
        symlink("/etc/shadow", t.join("etc/passwd")).expect("ln");
        fs::write(t.join("etc/gshadow"), "wheel:x:77:\n").expect("write");
        fs::remove_file(t.join("etc/group")).expect("rm");
        symlink("../../../../../../../etc/gshadow", t.join("etc/group")).expect("ln");
    });
    let _agent = h.start_agent();
    for runtime in ["chroot", "crun"] {
        let o = h.run_bounded(&[
            "run",
            "inroot",
            "--runtime",
            runtime,
            "-u",
            "root:wheel",
            "--",
            "sh",
            "-c",
            "echo $(id -u) $(id -g)",
        ]);
        assert_eq!(stdout(&o), "4242 77\n", "{runtime}: {}", stderr(&o));
        h.assert_clean(runtime);
    }
    // A group name missing from the image's (symlinked) group file is named.
    let o = h.run_bounded(&["run", "inroot", "-u", "root:staff", "--", "true"]);
    assert_eq!(
        last_line(&o),
        "lode: error: group \"staff\" is not in the image's /etc/group"
    );
    h.assert_clean("missing group");
}

#[test]
fn proc_and_dev_symlinked_to_the_host_are_not_mounted_over() {
    root_with_tools();
    let h = Home::new();
    let host = h.path("host-dir");
    fs::create_dir(&host).expect("mkdir");
    fs::write(host.join("marker"), "the host's").expect("write");
    let target = host.to_str().expect("path").to_string();
    for (tag, link) in [("procln", "proc"), ("devln", "dev")] {
        let target = target.clone();
        h.image(tag, move |t| {
            fs::remove_dir(t.join(link)).expect("rmdir");
            symlink(&target, t.join(link)).expect("ln");
        });
    }
    // A /proc that is a file, and a /dev/pts that is a symlink to the host, under a real
    // /dev: the private /dev is a fresh tmpfs, so the image's /dev/pts is never used.
    h.image("procfile", |t| {
        fs::remove_dir(t.join("proc")).expect("rmdir");
        fs::write(t.join("proc"), "").expect("write");
    });
    h.image("ptsln", |t| {
        symlink(&target, t.join("dev/pts")).expect("ln");
    });
    let _agent = h.start_agent();
    let untouched = |what: &str| {
        assert!(
            !is_mounted(&host),
            "{what}: lode mounted over the host directory"
        );
        let entries: Vec<_> = fs::read_dir(&host)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(entries, ["marker"], "{what}");
        assert_eq!(
            fs::read_to_string(host.join("marker")).expect("read"),
            "the host's"
        );
    };
    for (tag, name) in [("procln", "/proc"), ("devln", "/dev")] {
        let o = h.run_bounded(&["run", tag, "--runtime", "chroot", "-u", "0", "--", "true"]);
        assert_eq!(
            last_line(&o),
            format!(
                "lode: error: {name} in the image is a symlink to {target}; lode mounts nothing through a symlink"
            ),
            "{tag}"
        );
        untouched(tag);
        h.assert_clean(tag);
        // crun resolves its mount targets inside the root itself: whatever it makes of
        // the symlink, the host directory stays as it was.
        let o = h.run_bounded(&["run", tag, "--runtime", "crun", "-u", "0", "--", "true"]);
        eprintln!("crun on {tag}: {:?} {}", o.status, stderr(&o));
        untouched(&format!("{tag} crun"));
        h.assert_clean(&format!("{tag} crun"));
    }
    let o = h.run_bounded(&["run", "procfile", "--runtime", "chroot", "--", "true"]);
    assert_eq!(
        last_line(&o),
        "lode: error: /proc in the image is a regular file, not a directory"
    );
    h.assert_clean("procfile");
    for runtime in ["chroot", "crun"] {
        let o = h.run_bounded(&[
            "run",
            "ptsln",
            "--runtime",
            runtime,
            "-u",
            "0",
            "--",
            "sh",
            "-c",
            "ls /dev; ls /dev/pts",
        ]);
        assert!(o.status.success(), "{runtime}: {}", stderr(&o));
        untouched(&format!("ptsln {runtime}"));
        h.assert_clean(&format!("ptsln {runtime}"));
    }
}

#[test]
fn the_private_dev_holds_only_the_safe_nodes() {
    root_with_tools();
    let h = Home::new();
    h.image("plain", |_| {});
    let _agent = h.start_agent();
    for runtime in ["chroot", "crun"] {
        let o = h.run_bounded(&[
            "run",
            "plain",
            "--runtime",
            runtime,
            "-u",
            "0",
            "--",
            "sh",
            "-c",
            "for f in /dev/*; do [ -b $f ] && echo block $f; done; \
             echo x > /dev/null && head -c 4 /dev/zero > /dev/null; \
             ls /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty /dev/ptmx; \
             grep ' / / ' /proc/self/mountinfo",
        ]);
        assert!(o.status.success(), "{runtime}: {}", stderr(&o));
        let out = stdout(&o);
        let root = out.lines().last().unwrap_or_default();
        assert!(
            root.contains(" / / rw,nosuid,nodev,"),
            "{runtime}: the image is not nosuid,nodev inside: {root}"
        );
        assert!(
            !out.contains("block"),
            "{runtime}: block devices in /dev: {out}"
        );
        for node in ["null", "zero", "full", "random", "urandom", "tty", "ptmx"] {
            assert!(out.contains(&format!("/dev/{node}")), "{runtime}: {out}");
        }
        h.assert_clean(runtime);
    }
    // /proc in the chroot is read-only: the host's sysctls cannot be written (the value
    // is written back unchanged, should the write ever get through).
    let o = h.run_bounded(&[
        "run",
        "plain",
        "--runtime",
        "chroot",
        "-u",
        "0",
        "--",
        "sh",
        "-c",
        "v=$(cat /proc/sys/kernel/domainname); echo \"$v\" > /proc/sys/kernel/domainname",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
    h.assert_clean("sysctl");
}

#[test]
fn device_nodes_from_the_image_or_made_inside_do_not_read_the_host() {
    root_with_tools();
    let h = Home::new();
    let disk = HostDisk::new(&h);
    let (major, minor) = (disk.major, disk.minor);
    h.image("devnode", move |t| {
        mknod(&t.join("hostdisk"), libc::S_IFBLK | 0o666, major, minor);
        mknod(&t.join("dev/hostdisk"), libc::S_IFBLK | 0o666, major, minor);
    });
    let _agent = h.start_agent();

    // lode mount: the node is there but does not open, even for root.
    let mnt = h.path("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let _guard = MountGuard(mnt.clone());
    let m = mnt.to_str().expect("path");
    h.ok(&["mount", "devnode", m]);
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = info.lines().find(|l| l.contains(m)).expect("mounted");
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    let err = fs::read(mnt.join("hostdisk")).expect_err("nodev");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    h.ok(&["umount", m]);
    // The flag honours it: proof that the node is the host disk.
    let out = h.ok(&["mount", "devnode", m, "--allow-setuid-and-devices"]);
    assert!(out.contains("setuid and device nodes honoured"), "{out}");
    let bytes = fs::read(mnt.join("hostdisk")).expect("read with the flag");
    assert!(bytes.starts_with(SECRET.as_bytes()));
    h.ok(&["umount", m]);

    let attempts = format!(
        "cat /hostdisk; cat /dev/hostdisk; \
         mknod /tmp/d b {major} {minor} && cat /tmp/d; \
         mknod /dev/d b {major} {minor} && cat /dev/d; \
         mknod /d b {major} {minor} && cat /d; \
         echo done"
    );
    for runtime in ["chroot", "crun"] {
        let o = h.run_bounded(&[
            "run",
            "devnode",
            "--runtime",
            runtime,
            "-u",
            "0",
            "--",
            "sh",
            "-c",
            &attempts,
        ]);
        let (out, err) = (stdout(&o), stderr(&o));
        assert!(!out.contains(SECRET), "{runtime} read the host disk: {out}");
        assert!(out.ends_with("done\n"), "{runtime}: {out} {err}");
        assert!(
            err.contains("cat: can't open '/hostdisk': Permission denied"),
            "{runtime}: {err}"
        );
        assert!(
            err.matches("mknod: /").count() == 3 && err.contains("Operation not permitted"),
            "{runtime}: every mknod is refused: {err}"
        );
        h.assert_clean(runtime);
    }
    drop(disk);
}

#[test]
fn setuid_binaries_of_a_mounted_image_do_not_run_as_root() {
    root_with_tools();
    let h = Home::new();
    // GNU id prints the effective uid: 0 if the setuid bit took effect.
    h.image("suid", |t| {
        fs::copy("/usr/bin/id", t.join("bin/suid-id")).expect("copy id");
        fs::set_permissions(t.join("bin/suid-id"), fs::Permissions::from_mode(0o4755))
            .expect("chmod");
    });
    let _agent = h.start_agent();
    // The mount point must be reachable by the unprivileged user.
    fs::set_permissions(h.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let mnt = h.path("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let _guard = MountGuard(mnt.clone());
    let m = mnt.to_str().expect("path");
    let as_nobody = || {
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(mnt.join("bin/suid-id"))
            .arg("-u")
            .output()
            .expect("setpriv");
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    for rw in [false, true] {
        let mut args = vec!["mount", "suid", m];
        if rw {
            args.push("--rw");
        }
        h.ok(&args);
        assert_eq!(
            as_nobody(),
            "65534\n",
            "rw {rw}: the setuid bit took effect"
        );
        h.ok(&["umount", m]);
    }
    // With the flag the same binary runs as root: the image really is hostile.
    h.ok(&["mount", "suid", m, "--allow-setuid-and-devices"]);
    assert_eq!(as_nobody(), "0\n");
    h.ok(&["umount", m]);
    h.assert_clean("suid");
}

/// Waits until `pid` has a handler for SIGTERM (lode installs its handlers first thing
/// in `run`), so that a signal sent now is one lode handles.
fn wait_for_handler(pid: u32) {
    for _ in 0..6000 {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if caught & (1 << (libc::SIGTERM - 1)) != 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("lode never installed its SIGTERM handler");
}

#[test]
fn a_signal_while_the_agent_is_slow_leaves_nothing_behind() {
    root_with_tools();
    let h = Home::new();
    h.image("plain", |_| {});
    let agent = h.start_agent();
    let agent_pid = agent.child.id() as libc::pid_t;
    let mnt = h.path("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let _guard = MountGuard(mnt.clone());
    let run = ["run", "plain", "--runtime", "chroot", "--", "true"];
    let mount = ["mount", "plain", mnt.to_str().expect("path")];
    for (sig, args, said) in [
        (
            libc::SIGTERM,
            &run[..],
            "before the command started; the image was unmounted and detached",
        ),
        (
            libc::SIGINT,
            &run[..],
            "before the command started; the image was unmounted and detached",
        ),
        (
            libc::SIGHUP,
            &run[..],
            "before the command started; the image was unmounted and detached",
        ),
        (
            libc::SIGTERM,
            &mount[..],
            "interrupted by SIGTERM; the image was unmounted and detached",
        ),
    ] {
        // A stopped agent holds lode in its attach request: the slow point.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(agent_pid, libc::SIGSTOP) };
        let tmp = h.tmp();
        fs::create_dir_all(&tmp).expect("mkdir");
        let mut child = ChildGuard(
            h.cmd(args)
                .env("TMPDIR", &tmp)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        );
        wait_for_handler(child.0.id());
        // SAFETY: kill(2) on our own children.
        unsafe {
            libc::kill(child.0.id() as libc::pid_t, sig);
            libc::kill(agent_pid, libc::SIGCONT);
        }
        let status = child
            .wait_for(Duration::from_secs(120))
            .expect("lode ended");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.0.stderr.take().expect("stderr"), &mut err)
            .expect("read");
        assert_eq!(status.code(), Some(128 + sig), "signal {sig}: {err}");
        assert!(err.contains(said), "signal {sig}: {err}");
        assert!(!is_mounted(&mnt));
        h.assert_clean(&format!("signal {sig} {args:?}"));
    }
}

#[test]
fn sigterm_at_any_point_of_a_run_leaves_nothing_behind() {
    root_with_tools();
    let h = Home::new();
    h.image("plain", |_| {});
    let _agent = h.start_agent();
    for runtime in ["chroot", "crun"] {
        // How long a whole run takes here, to spread the signals over it.
        let started = std::time::Instant::now();
        let o = h.run_bounded(&["run", "plain", "--runtime", runtime, "--", "true"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let whole = started.elapsed();
        let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
        for i in 0..12u32 {
            let tmp = h.tmp();
            let mut child = ChildGuard(
                h.cmd(&["run", "plain", "--runtime", runtime, "--", "sleep", "1"])
                    .env("TMPDIR", &tmp)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn"),
            );
            wait_for_handler(child.0.id());
            std::thread::sleep(whole * i / 10);
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
            let status = child
                .wait_for(Duration::from_secs(120))
                .expect("lode ended");
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.0.stderr.take().expect("stderr"), &mut err)
                .expect("read");
            assert!(!err.contains("panicked"), "{err}");
            let outcome = if err.contains("before the command started") {
                "before the command".to_string()
            } else {
                format!("exit {:?}", status.code())
            };
            *outcomes.entry(outcome).or_default() += 1;
            h.assert_clean(&format!("{runtime} after {i}/10 of a run: {err}"));
        }
        eprintln!("{runtime}: {outcomes:?}");
    }
}

#[test]
fn a_process_left_behind_by_chroot_does_not_keep_the_mount_in_the_tree() {
    root_with_tools();
    let h = Home::new();
    h.image("plain", |_| {});
    let _agent = h.start_agent();
    // chroot has no pid namespace: the background sleep outlives the command and holds
    // the image (its cwd) and the private /dev (its /dev/null) busy.
    let o = h.run_bounded(&[
        "run",
        "plain",
        "--runtime",
        "chroot",
        "--",
        "sh",
        "-c",
        "sleep 3 </dev/null >/dev/null 2>&1 &",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("detached lazily"), "{}", stderr(&o));
    assert!(h.names().is_empty(), "{:?}", h.names());
    let tmp = h.tmp();
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !info.contains(tmp.to_str().expect("path")),
        "mounts left in the tree:\n{info}"
    );
    // When the sleep ends the kernel lets go of the loop device too.
    let home = h.home();
    let mut loops = String::new();
    for _ in 0..300 {
        let out = Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
            .output()
            .expect("losetup");
        loops = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(home.to_str().expect("path")))
            .collect();
        if loops.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(loops.is_empty(), "{loops}");
}
