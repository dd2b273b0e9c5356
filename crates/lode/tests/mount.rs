//! System tests of `lode mount`, `lode umount` and `lode run` against a real agent, real
//! loop devices and real ext4 mounts. The image is built with umoci (a busybox root with
//! an image config that sets env, working dir and user), flattened by lode, and run
//! through chroot and through crun. Needs root, /dev/fuse, loop devices, umoci,
//! busybox-static and crun (scripts/test.sh installs them).

use std::fs;
use std::path::Path;
use std::process::Command;

use lode_testkit::MountGuard;
use serde_json::Value;

#[path = "common/harness.rs"]
mod harness;
use harness::{Home, is_mounted};

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(dir.to_str().expect("path")))
        .map(str::to_string)
        .collect()
}

trait MountHome {
    fn ls(&self) -> Vec<String>;
    fn data_image(&self) -> Vec<u8>;
}

impl MountHome for Home {
    fn ls(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ok(&["--json", "ls"])).expect("JSON");
        v.as_array()
            .expect("array")
            .iter()
            .map(|a| a["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// The harness's busybox image with a data file at /work/data.bin, whose bytes it
    /// returns.
    fn data_image(&self) -> Vec<u8> {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1])
            .collect();
        self.busybox_image(
            &["sh", "id", "cat", "ls", "echo", "pwd"],
            &[("work/data.bin", &data)],
        );
        data
    }
}

fn root_with_loop_and_fuse() -> bool {
    let root = lode_testkit::is_root();
    assert!(
        root && Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists(),
        "these tests need root, /dev/fuse and loop devices (CI runs as root)"
    );
    true
}

#[test]
fn mount_reads_back_rw_goes_to_the_overlay_and_umount_cleans_up() {
    assert!(root_with_loop_and_fuse());
    let h = Home::new();
    let data = h.data_image();
    let original = h.path("original.img");
    h.ok(&["export", "bb", original.to_str().expect("path")]);
    let _agent = h.start_agent();
    let mnt = h.path("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let _guard = MountGuard(mnt.clone());
    let m = mnt.to_str().expect("path");

    // Read-only: files read back, writes refused.
    let out = h.ok(&["mount", "bb", m]);
    assert!(out.contains("read-only via /dev/loop"), "{out}");
    assert!(is_mounted(&mnt));
    assert_eq!(fs::read(mnt.join("work/data.bin")).expect("read"), data);
    assert_eq!(
        fs::read(mnt.join("bin/busybox")).expect("read"),
        fs::read("/bin/busybox").expect("read")
    );
    let err = fs::write(mnt.join("work/new"), b"x").expect_err("read-only mount");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(h.ls().len(), 1);
    let err = h.fails(&["mount", "bb", m]);
    assert!(err.contains("already has /dev/loop"), "{err}");
    h.ok(&["umount", m]);
    assert!(!is_mounted(&mnt));
    assert!(h.ls().is_empty(), "umount detaches");
    assert!(
        loops_under(&h.home()).is_empty(),
        "umount releases the loop device"
    );

    // Read-write into an overlay, kept across umount with --keep-overlay.
    h.ok(&["mount", "bb", m, "--rw", "--name", "scratch"]);
    fs::write(mnt.join("work/new"), b"written through lode").expect("write");
    fs::write(mnt.join("work/data.bin"), b"replaced").expect("overwrite");
    h.ok(&["umount", m, "--keep-overlay"]);
    h.ok(&["mount", "bb", m, "--rw", "--name", "scratch"]);
    assert_eq!(
        fs::read(mnt.join("work/new")).expect("kept"),
        b"written through lode"
    );
    assert_eq!(
        fs::read(mnt.join("work/data.bin")).expect("kept"),
        b"replaced"
    );
    h.ok(&["umount", m]);
    // Without --keep-overlay the writes are gone.
    h.ok(&["mount", "bb", m, "--rw", "--name", "scratch"]);
    assert!(!mnt.join("work/new").exists());
    assert_eq!(fs::read(mnt.join("work/data.bin")).expect("read"), data);
    h.ok(&["umount", m]);

    // The store never changed: the image exports byte for byte as before and verifies.
    let after = h.path("after.img");
    h.ok(&["export", "bb", after.to_str().expect("path")]);
    assert!(fs::read(&after).expect("read") == fs::read(&original).expect("read"));
    h.ok(&["verify", "bb"]);
    // e2fsck agrees the image is clean.
    let st = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&after)
        .output()
        .expect("e2fsck");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
}

#[test]
fn run_uses_the_image_config_in_chroot_and_crun() {
    assert!(root_with_loop_and_fuse());
    let h = Home::new();
    h.data_image();
    let _agent = h.start_agent();
    let script = "echo \"$GREETING\"; pwd; id -u; id -g; echo scratch > /work/out && cat /work/out";
    for runtime in ["chroot", "crun"] {
        let out = h.ok(&["run", "bb", "--runtime", runtime, "--", "sh", "-c", script]);
        assert_eq!(
            out, "hello from the image\n/work\n1000\n1001\nscratch\n",
            "{runtime}"
        );
        // The image's own entrypoint/cmd when no command is given.
        let out = h.ok(&["run", "bb", "--runtime", runtime]);
        assert_eq!(out, "root:x:0:\napp:x:1001:\n", "{runtime}");
        // The command's status is lode's; flags override the config.
        let o = h.run(&[
            "run",
            "bb",
            "--runtime",
            runtime,
            "-u",
            "0",
            "-e",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "echo $GREETING $(id -u); exit 7",
        ]);
        assert_eq!(o.status.code(), Some(7), "{runtime}");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "hi 0\n", "{runtime}");
    }
    // crun gives the command its own pid namespace.
    let out = h.ok(&[
        "run",
        "bb",
        "--runtime",
        "crun",
        "--",
        "sh",
        "-c",
        "echo $$",
    ]);
    assert_eq!(out, "1\n");
    // --json reports the status and every step's time after the command's own output;
    // --timings prints the same steps on stderr.
    for runtime in ["chroot", "crun"] {
        let o = h.run(&[
            "--json",
            "run",
            "bb",
            "--runtime",
            runtime,
            "--timings",
            "--",
            "sh",
            "-c",
            "exit 3",
        ]);
        assert_eq!(o.status.code(), Some(3), "{runtime}");
        let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON object on stdout");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["runtime"], runtime);
        let t = &v["timings"];
        let steps = [
            "attach",
            "fuse_file",
            "loop_setup",
            "mount",
            "user_lookup",
            "runtime",
            "unmount",
            "loop_release",
            "detach",
        ];
        let mut sum = 0.0;
        for step in steps {
            let ms = t[format!("{step}_ms")].as_f64().unwrap_or(-1.0);
            assert!(ms >= 0.0, "{runtime}: {step} missing from {t}");
            sum += ms;
        }
        let total = t["total_ms"].as_f64().expect("total");
        assert!(
            sum <= total + 0.01 && total > 0.0,
            "{runtime}: {sum} > {total}"
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        for step in steps.iter().chain(&["other", "total"]) {
            assert!(
                stderr
                    .lines()
                    .any(|l| l.starts_with(step) && l.ends_with(" ms")),
                "{runtime}: no {step} line in {stderr}"
            );
        }
    }
    // Nothing is left behind: no attachment, no loop device on the agent's files.
    assert!(h.ls().is_empty(), "{:?}", h.ls());
    assert!(loops_under(&h.home()).is_empty());
    // The overlay was dropped: a new run does not see the last one's file.
    let o = h.run(&["run", "bb", "--runtime", "chroot", "--", "cat", "/work/out"]);
    assert!(!o.status.success());
}

#[test]
fn mistakes_are_named_and_leave_nothing_behind() {
    assert!(root_with_loop_and_fuse());
    let h = Home::new();
    h.data_image();
    let mnt = h.path("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let err = h.fails(&["mount", "bb", mnt.to_str().expect("path")]);
    assert!(err.contains("control.sock"), "no agent: {err}");
    let _agent = h.start_agent();
    let missing = h.path("missing");
    let err = h.fails(&["mount", "bb", missing.to_str().expect("path")]);
    assert!(
        err.contains("mount point") && err.contains("missing"),
        "{err}"
    );
    let empty = h.path("empty");
    fs::create_dir(&empty).expect("mkdir");
    let err = h.fails(&["umount", empty.to_str().expect("path")]);
    assert!(err.contains("nothing is mounted on"), "{err}");
    let err = h.fails(&["mount", "no-such-tag", empty.to_str().expect("path")]);
    assert!(err.contains("no-such-tag"), "{err}");
    let err = h.fails(&["run", "bb", "-u", "nobody", "--", "true"]);
    assert!(
        err.contains("nobody") && err.contains("/etc/passwd"),
        "{err}"
    );
    let err = h.fails(&["run", "bb", "-e", "NOEQUALS", "--", "true"]);
    assert!(err.contains("NOEQUALS"), "{err}");
    assert!(h.ls().is_empty(), "{:?}", h.ls());
    assert!(loops_under(&h.home()).is_empty());
}

#[test]
fn a_mount_that_fails_after_the_loop_device_releases_it_and_detaches() {
    assert!(root_with_loop_and_fuse());
    let h = Home::new();
    // Not ext4: the attach and the loop device succeed, the mount(2) fails.
    let junk = h.path("junk.img");
    fs::write(&junk, harness::random_image(2, 7)).expect("write");
    h.ok(&[
        "import",
        junk.to_str().expect("path"),
        "--tag",
        "junk",
        "-q",
    ]);
    let _agent = h.start_agent();
    let mnt = h.path("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let _guard = MountGuard(mnt.clone());
    let err = h.fails(&["mount", "junk", mnt.to_str().expect("path")]);
    assert!(err.contains("mounting junk on"), "{err}");
    assert!(!is_mounted(&mnt));
    for runtime in ["chroot", "crun"] {
        let err = h.fails(&["run", "junk", "--runtime", runtime, "--", "true"]);
        assert!(err.contains("mounting junk on"), "{runtime}: {err}");
    }
    assert!(h.ls().is_empty(), "{:?}", h.ls());
    assert!(
        loops_under(&h.home()).is_empty(),
        "{:?}",
        loops_under(&h.home())
    );
    // The loop devices were released, not only marked: a later mount finds one.
    h.data_image();
    let out = h.ok(&["run", "bb", "--runtime", "chroot", "--", "echo", "ok"]);
    assert_eq!(out, "ok\n");
}

#[test]
fn sigterm_reaches_the_command_and_lode_still_cleans_up() {
    use std::io::{BufRead, BufReader};
    assert!(root_with_loop_and_fuse());
    let h = Home::new();
    h.data_image();
    let _agent = h.start_agent();
    for runtime in ["chroot", "crun"] {
        let mut child = h
            .cmd(&[
                "run",
                "bb",
                "--runtime",
                runtime,
                "--",
                "sh",
                "-c",
                "trap 'echo got TERM; exit 42' TERM; echo started; while true; do sleep 0.1; done",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn lode run");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("read");
        assert_eq!(line, "started\n", "{runtime}");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).expect("read");
        let status = child.wait().expect("wait");
        assert_eq!(rest, "got TERM\n", "{runtime}");
        assert_eq!(status.code(), Some(42), "{runtime}");
        assert!(h.ls().is_empty(), "{runtime}: {:?}", h.ls());
        assert!(loops_under(&h.home()).is_empty(), "{runtime}");
    }
}
