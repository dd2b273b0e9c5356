//! The FUSE files under real kernel clients: a loop device with an ext4 mount on it,
//! `cmp`, `dd`, and plain positional reads and writes.
//!
//! Each test skips with a printed reason only if FUSE is truly unavailable here (no
//! /dev/fuse, or neither root nor `fusermount3`); the ext4 test also needs `mkfs.ext4`,
//! `losetup` and `mount` (root). CI installs `fuse3` and `e2fsprogs`.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lode_blockdev::{BlockDevice, DeviceError};
use lode_fuse::{CacheMode, FuseError, FuseMount, MountOptions};
use lode_nbd::MemDevice;
use lode_testkit::{LoopMount, is_mounted, is_root, which};
use tempfile::TempDir;

/// Why FUSE cannot be mounted here, if it cannot.
fn fuse_missing() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is absent".to_owned());
    }
    if !is_root() && which("fusermount3").is_none() && which("fusermount").is_none() {
        return Some("not root and no fusermount3 (package fuse3)".to_owned());
    }
    None
}

macro_rules! require_fuse {
    () => {
        if let Some(why) = fuse_missing() {
            lode_testkit::skip(&format!("{why}"));
            return;
        }
    };
}

/// A runtime, a mount point and a mount; fields drop in order, FUSE before the dir.
struct Fixture {
    fuse: Option<FuseMount>,
    _dir: TempDir,
    _runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn new(configure: impl FnOnce(MountOptions) -> MountOptions) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let options = configure(MountOptions::new(runtime.handle().clone()));
        let fuse = FuseMount::mount(dir.path(), options).unwrap();
        Self {
            fuse: Some(fuse),
            _dir: dir,
            _runtime: runtime,
        }
    }

    fn fuse(&self) -> &FuseMount {
        self.fuse.as_ref().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(fuse) = self.fuse.take() {
            let _ = fuse.unmount();
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 7 + i / 251) % 256).unwrap())
        .collect()
}

/// A device that remembers the largest read it was asked for.
#[derive(Debug)]
struct Recording {
    inner: MemDevice,
    largest_read: AtomicU64,
}

#[async_trait]
impl BlockDevice for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.largest_read
            .fetch_max(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(offset, buf).await
    }
}

/// A device whose reads fail, or never finish.
#[derive(Debug)]
enum Broken {
    Fails,
    Hangs,
}

#[async_trait]
impl BlockDevice for Broken {
    fn size(&self) -> u64 {
        1 << 20
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        match self {
            Broken::Fails => Err(DeviceError::Io {
                offset,
                len: buf.len() as u64,
                source: std::io::Error::other("chunk failed verification"),
            }),
            Broken::Hangs => std::future::pending().await,
        }
    }
}

#[test]
fn ext4_image_mounts_through_a_loop_device_on_the_fuse_file() {
    require_fuse!();
    let Some(mkfs) = lode_testkit::tool_from("mkfs.ext4", "e2fsprogs") else {
        return;
    };
    if !lode_testkit::root_or_skip("loop devices and mount need root") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("etc/deep/er")).unwrap();
    let mut expected = Vec::new();
    for (name, len) in [
        ("etc/hostname", 6),
        ("etc/deep/er/big.bin", 3 << 20),
        ("empty", 0),
        ("odd.bin", 12_345),
    ] {
        let data = pattern(len);
        fs::write(src.join(name), &data).unwrap();
        expected.push((name, data));
    }
    let img = work.path().join("img");
    run(Command::new(mkfs)
        .args(["-q", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M"));
    let image = fs::read(&img).unwrap();

    let fx = Fixture::new(|o| o);
    fx.fuse()
        .add(
            "rootfs",
            Arc::new(MemDevice::from_vec(image.clone()).into_read_only()),
            false,
        )
        .unwrap();
    let file = fx.fuse().path("rootfs");
    assert_eq!(fs::metadata(&file).unwrap().len(), image.len() as u64);
    run(Command::new("cmp").arg(&file).arg(&img));
    assert!(fs::read(&file).unwrap() == image);

    let mnt = work.path().join("mnt");
    let Some(mounted) = LoopMount::at(&file, &mnt) else {
        return;
    };
    for (name, data) in &expected {
        assert!(
            fs::read(mounted.path().join(name)).unwrap() == *data,
            "{name} differs"
        );
    }
    // Unmounted, then the loop device detached and the file let go.
    mounted.release();
    let stats = fx.fuse().stats();
    assert!(stats.reads > 0 && stats.errors == 0, "{stats:?}");
    // With the loop device gone nothing holds the file: a clean unmount.
    let mut fx = fx;
    fx.fuse.take().unwrap().unmount().unwrap();
}

#[test]
fn reads_at_odd_offsets_large_reads_and_past_the_end() {
    require_fuse!();
    let fx = Fixture::new(|o| o);
    let size = (3 << 20) + 123;
    let data = pattern(size);
    let device = Arc::new(Recording {
        inner: MemDevice::from_vec(data.clone()),
        largest_read: AtomicU64::new(0),
    });
    fx.fuse().add("disk", device.clone(), false).unwrap();
    let f = File::open(fx.fuse().path("disk")).unwrap();

    for (offset, len) in [
        (0usize, 1usize),
        (1, 4095),
        (4095, 2),
        (12_345, 99_999),
        (size - 7, 7),
        (size - 7, 100),
        (777, 1 << 20),
    ] {
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, offset as u64).unwrap();
        let want = len.min(size - offset);
        assert_eq!(n, want, "read of {len} at {offset}");
        assert!(buf[..n] == data[offset..offset + n], "bytes at {offset}");
    }
    // Past the end: no bytes, no error.
    let mut buf = [0u8; 16];
    assert_eq!(f.read_at(&mut buf, size as u64).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, size as u64 + 4096).unwrap(), 0);
    // direct_io passes the 1 MiB read through in requests far beyond a page.
    let largest = device.largest_read.load(Ordering::Relaxed);
    assert!(largest >= 128 << 10, "largest device read was {largest}");
}

#[test]
fn writable_file_takes_writes_and_read_only_one_refuses_them() {
    require_fuse!();
    let fx = Fixture::new(|o| o);
    let rw = Arc::new(MemDevice::new(1 << 20));
    let ro = Arc::new(MemDevice::from_vec(pattern(1 << 20)));
    fx.fuse().add("rw", rw.clone(), true).unwrap();
    // The device could take writes; the file is read-only anyway.
    fx.fuse().add("ro", ro.clone(), false).unwrap();

    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::write(&src, pattern(10_000)).unwrap();
    let of = format!("of={}", fx.fuse().path("rw").display());
    run(Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(&of)
        .args(["bs=4096", "seek=3", "conv=notrunc,fsync", "status=none"]));
    let contents = rw.contents();
    assert!(contents[3 * 4096..3 * 4096 + 10_000] == pattern(10_000)[..]);
    assert!(contents[..3 * 4096].iter().all(|&b| b == 0));

    // Positional writes, one running past the end: short count, then ENOSPC.
    let f = OpenOptions::new()
        .write(true)
        .open(fx.fuse().path("rw"))
        .unwrap();
    f.write_all_at(b"hello", 5).unwrap();
    assert_eq!(f.write_at(b"tail!", (1 << 20) - 2).unwrap(), 2);
    let err = f.write_at(b"x", 1 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    f.sync_all().unwrap();
    // Sizes are fixed.
    assert_eq!(f.set_len(10).unwrap_err().raw_os_error(), Some(1));
    drop(f);
    assert_eq!(&rw.contents()[5..10], b"hello");
    assert_eq!(&rw.contents()[(1 << 20) - 2..], b"ta");
    assert!(fx.fuse().stats().flushes >= 1);

    let err = OpenOptions::new()
        .write(true)
        .open(fx.fuse().path("ro"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30), "{err}"); // EROFS
    let err = dd_err(&fx.fuse().path("ro"), &src);
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(ro.contents() == pattern(1 << 20));
    let meta = fs::metadata(fx.fuse().path("ro")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o444
    );

    // A read-only device cannot back a writable file.
    let err = fx
        .fuse()
        .add("bad", Arc::new(MemDevice::new(4096).into_read_only()), true)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} cannot be writable: its device is read-only",
            fx.fuse().path("bad").display()
        )
    );
}

fn dd_err(file: &Path, src: &Path) -> String {
    let out = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", file.display()))
        .args(["conv=notrunc", "status=none"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_failing_device_gives_eio_and_the_mount_keeps_serving() {
    require_fuse!();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let fx = Fixture::new(|o| {
        let seen = seen.clone();
        o.op_timeout(Duration::from_millis(300))
            .on_error(move |e: &FuseError| seen.lock().unwrap().push(e.to_string()))
    });
    fx.fuse()
        .add("bad", Arc::new(Broken::Fails), false)
        .unwrap();
    fx.fuse()
        .add("slow", Arc::new(Broken::Hangs), false)
        .unwrap();
    fx.fuse()
        .add("good", Arc::new(MemDevice::from_vec(pattern(8192))), false)
        .unwrap();

    let bad = File::open(fx.fuse().path("bad")).unwrap();
    let mut buf = [0u8; 4096];
    let err = bad.read_at(&mut buf, 8192).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}"); // EIO
    let started = Instant::now();
    let err = File::open(fx.fuse().path("slow"))
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    assert!(fs::read(fx.fuse().path("good")).unwrap() == pattern(8192));
    let stats = fx.fuse().stats();
    assert_eq!((stats.errors, stats.timeouts), (2, 1), "{stats:?}");
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[0],
        format!(
            "read of 4096 bytes at offset 8192 of {} failed",
            fx.fuse().path("bad").display()
        )
    );
    assert_eq!(
        seen[1],
        format!(
            "read of 4096 bytes at offset 0 of {} did not finish within 300ms",
            fx.fuse().path("slow").display()
        )
    );
}

/// A device 100 ms away: every read waits that long, and the most reads in flight at
/// once is kept.
#[derive(Debug, Default)]
struct Distant {
    now: AtomicU64,
    peak: AtomicU64,
}

#[async_trait]
impl BlockDevice for Distant {
    fn size(&self) -> u64 {
        16 << 20
    }

    fn read_only(&self) -> bool {
        true
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        buf.fill(u8::try_from(offset >> 20).unwrap_or(0xff));
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    async fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnly)
    }
}

/// Reads from many threads reach the device together (the FUSE threads hand each to the
/// runtime and go back for the next), so eight 100 ms reads take about 100 ms, not 800.
#[test]
fn concurrent_reads_of_one_file_are_served_concurrently() {
    require_fuse!();
    let fx = Fixture::new(|o| o);
    let dev = Arc::new(Distant::default());
    fx.fuse().add("far", dev.clone(), false).unwrap();
    let path = fx.fuse().path("far");
    let started = Instant::now();
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let path = &path;
            s.spawn(move || {
                let mut buf = [0u8; 4096];
                File::open(path)
                    .unwrap()
                    .read_exact_at(&mut buf, i << 20)
                    .unwrap();
                assert!(buf.iter().all(|b| u64::from(*b) == i));
            });
        }
    });
    let took = started.elapsed();
    assert!(
        dev.peak.load(Ordering::SeqCst) >= 4,
        "peak {}",
        dev.peak.load(Ordering::SeqCst)
    );
    assert!(took < Duration::from_millis(400), "8 reads took {took:?}");
}

#[test]
fn files_added_and_removed_at_runtime_show_in_the_directory() {
    require_fuse!();
    let fx = Fixture::new(|o| o);
    let root = fx.fuse().mountpoint().to_path_buf();
    let listing = || {
        let mut v: Vec<(String, u64)> = fs::read_dir(&root)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert!(listing().is_empty());
    fx.fuse()
        .add("a", Arc::new(MemDevice::new(4096)), true)
        .unwrap();
    fx.fuse()
        .add("b", Arc::new(MemDevice::new(12_288)), false)
        .unwrap();
    assert_eq!(
        listing(),
        [("a".to_owned(), 4096), ("b".to_owned(), 12_288)]
    );

    // An open handle outlives removal, like unlink(2).
    let mut held = OpenOptions::new().write(true).open(root.join("a")).unwrap();
    fx.fuse().remove("a").unwrap();
    assert_eq!(listing(), [("b".to_owned(), 12_288)]);
    assert_eq!(
        fs::metadata(root.join("a")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    held.write_all(b"still here").unwrap();
    drop(held);

    // Same name again: a new file.
    fx.fuse()
        .add("a", Arc::new(MemDevice::new(512)), false)
        .unwrap();
    assert_eq!(listing(), [("a".to_owned(), 512), ("b".to_owned(), 12_288)]);

    let err = fx
        .fuse()
        .add("b", Arc::new(MemDevice::new(1)), false)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{} already exists", root.join("b").display())
    );
    let Err(err) = fx.fuse().remove("zz") else {
        panic!("removed a file that was never added");
    };
    assert_eq!(
        err.to_string(),
        format!("{} does not exist", root.join("zz").display())
    );
    let err = fx
        .fuse()
        .add("x/y", Arc::new(MemDevice::new(1)), false)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "invalid file name \"x/y\" in the FUSE mount at {}: contains '/' or NUL",
            root.display()
        )
    );
    // The directory itself refuses new files.
    assert!(File::create(root.join("new")).is_err());
}

#[test]
fn unmount_of_a_busy_mount_fails_and_detaches_lazily() {
    require_fuse!();
    let mut fx = Fixture::new(|o| o.cache(CacheMode::KeepCache));
    fx.fuse()
        .add("img", Arc::new(MemDevice::from_vec(pattern(65_536))), false)
        .unwrap();
    let root = fx.fuse().mountpoint().to_path_buf();
    assert!(is_mounted(&root));
    // Through the page cache too, the bytes are right.
    assert!(fs::read(root.join("img")).unwrap() == pattern(65_536));
    // A process working inside the mount keeps it busy.
    let held = File::open(root.join("img")).unwrap();
    let err = fx.fuse.take().unwrap().unmount().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot unmount FUSE at {}", root.display())
    );
    assert!(!is_mounted(&root), "lazily detached");
    drop(held);
}
