//! The initramfs lode boots the guest with, written by lode itself as cpio "newc":
//!
//! ```text
//! /bin/busybox          busybox-static, the init's only program
//! /init                 the init script (init.sh in this crate)
//! /lib/modules/NAME.ko  the kernel's virtio and ext4 modules that are not built in,
//!                       decompressed, in load order in /lode/base.sh
//! /lode/base.sh         LODE_MODULES
//! /lode/run.sh          appended as a second archive for each run: the token, the
//!                       command, its environment, working directory and user
//! ```
//!
//! The base archive depends only on the kernel's modules, busybox and the init, so it is
//! cached under lode's directory, named by a SHA-256 of all of them; each run writes the
//! base followed by its own small archive (the kernel unpacks concatenated archives in
//! turn) into one temporary file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::{CpioError, CpioWriter};
use crate::kernel::{Kernel, KernelError, Module};

/// The Debian package of the guest's busybox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

const INIT: &str = include_str!("init.sh");

/// Bumped when the layout of the archive changes, so cached archives are not reused.
const LAYOUT: &str = "lode-vm initramfs 1";

/// An initramfs that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// busybox is missing or not statically linked.
    #[error("busybox {}: {reason}; install {BUSYBOX_PACKAGE} (apt-get install {BUSYBOX_PACKAGE}) or give --busybox FILE", path.display())]
    Busybox {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The kernel's modules could not be resolved.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A module file could not be read or decompressed.
    #[error("module {name} ({}): {reason}", path.display())]
    Module {
        /// The module.
        name: String,
        /// Its file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A string for the guest holds a NUL byte, which no shell word can.
    #[error("{what} {value:?} holds a NUL byte")]
    Nul {
        /// What it is (an argument, an environment entry, ...).
        what: &'static str,
        /// The value.
        value: String,
    },
    /// Writing the archive failed.
    #[error(transparent)]
    Cpio(#[from] CpioError),
    /// Writing the cache or the run's file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The modules the guest loads to mount ext4 from a virtio disk on `machine`'s bus.
pub fn wanted_modules(mmio: bool) -> Vec<&'static str> {
    // Their dependencies (virtio_ring, virtio, the PCI transport's two halves) come
    // along from modules.dep.
    vec![
        if mmio { "virtio_mmio" } else { "virtio_pci" },
        "virtio_blk",
        "ext4",
    ]
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitramfsError {
    let path = path.to_path_buf();
    move |source| InitramfsError::Io { path, source }
}

/// A module's bytes, decompressed on the host if its file is compressed (busybox's insmod
/// takes plain ELF).
fn module_bytes(m: &Module) -> Result<Vec<u8>, InitramfsError> {
    let fail = |reason: String| InitramfsError::Module {
        name: m.name.clone(),
        path: m.path.clone(),
        reason,
    };
    let name = m.path.to_string_lossy();
    let tool = [(".ko.xz", "xz"), (".ko.zst", "zstd"), (".ko.gz", "gzip")]
        .into_iter()
        .find(|(s, _)| name.ends_with(s));
    let Some((_, tool)) = tool else {
        return std::fs::read(&m.path).map_err(|e| fail(e.to_string()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(&m.path)
        .output()
        .map_err(|e| fail(format!("running {tool} -dc to decompress it: {e}")))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{tool} -dc failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn read_busybox(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let fail = |reason: String| InitramfsError::Busybox {
        path: path.to_path_buf(),
        reason,
    };
    let b = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    if !b.starts_with(b"\x7fELF") {
        return Err(fail("not an ELF executable".into()));
    }
    // A dynamically linked executable names its interpreter; the initramfs has no libc.
    if b.windows(b"/ld-linux".len()).any(|w| w == b"/ld-linux") {
        return Err(fail("dynamically linked; the guest has no libc".into()));
    }
    Ok(b)
}

/// The cached base archive for `kernel`'s `modules` and `busybox`, built into
/// `cache_dir` when it is not there yet; returns its path.
pub fn base(
    cache_dir: &Path,
    kernel: &Kernel,
    modules: &[&str],
    busybox: &Path,
) -> Result<PathBuf, InitramfsError> {
    let mods = kernel.modules_for(modules)?;
    let busybox = read_busybox(busybox)?;
    let mut files = Vec::new();
    for m in &mods {
        files.push((m.name.clone(), module_bytes(m)?));
    }
    let base_sh = format!(
        "LODE_MODULES='{}'\n",
        mods.iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut key = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        LAYOUT.as_bytes(),
        kernel.version.as_bytes(),
        &busybox,
        INIT.as_bytes(),
        base_sh.as_bytes(),
    ] {
        key.update(&u64::try_from(part.len()).unwrap_or(u64::MAX).to_le_bytes());
        key.update(part);
    }
    for (name, b) in &files {
        key.update(name.as_bytes());
        key.update(&u64::try_from(b.len()).unwrap_or(u64::MAX).to_le_bytes());
        key.update(b);
    }
    let key: String = key
        .finish()
        .as_ref()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = cache_dir.join(format!("initramfs-{}-{key}.cpio", kernel.version));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let mut w = CpioWriter::new(Vec::new());
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "lib",
        "lib/modules",
        "lode",
        "newroot",
    ] {
        w.dir(d, 0o755)?;
    }
    w.file("bin/busybox", 0o755, &busybox)?;
    w.symlink("bin/sh", "busybox")?;
    w.file("init", 0o755, INIT.as_bytes())?;
    w.file("lode/base.sh", 0o644, base_sh.as_bytes())?;
    for (name, b) in &files {
        w.file(&format!("lib/modules/{name}.ko"), 0o644, b)?;
    }
    let bytes = w.finish()?;
    // Written whole under a temporary name, then renamed: a reader never sees half.
    let mut tmp = tempfile::NamedTempFile::new_in(cache_dir).map_err(io(cache_dir))?;
    tmp.write_all(&bytes).map_err(io(tmp.path()))?;
    tmp.persist(&path).map_err(|e| InitramfsError::Io {
        path: path.clone(),
        source: e.error,
    })?;
    Ok(path)
}

/// What the guest runs: the command, its environment, working directory and user.
#[derive(Debug, Clone, Default)]
pub struct GuestCommand {
    /// The program and its arguments (the program looked up in `path` when it has no `/`).
    pub args: Vec<String>,
    /// KEY=VALUE entries, the whole environment.
    pub env: Vec<String>,
    /// The working directory in the image.
    pub cwd: String,
    /// `user[:group]`, names resolved in the image's /etc/passwd and /etc/group; empty
    /// for root.
    pub user: String,
    /// Mount the image read-write.
    pub writable: bool,
}

/// `s` as one shell word.
fn quote(what: &'static str, s: &str) -> Result<String, InitramfsError> {
    if s.contains('\0') {
        return Err(InitramfsError::Nul {
            what,
            value: s.to_string(),
        });
    }
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

/// The PATH the guest looks the program up in: the environment's, or the usual one.
fn path_of(env: &[String]) -> &str {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

/// /lode/run.sh for `cmd` and the run's `token`.
pub fn run_script(cmd: &GuestCommand, token: &str) -> Result<String, InitramfsError> {
    let mut s = String::new();
    s.push_str(&format!("LODE_TOKEN={}\n", quote("token", token)?));
    let mount = if cmd.writable {
        "rw,noatime"
    } else {
        "ro,noatime"
    };
    s.push_str(&format!("LODE_MOUNT='{mount}'\n"));
    s.push_str(&format!(
        "LODE_PATH={}\n",
        quote("PATH", path_of(&cmd.env))?
    ));
    let cwd = if cmd.cwd.is_empty() { "/" } else { &cmd.cwd };
    s.push_str(&format!("LODE_CWD={}\n", quote("working directory", cwd)?));
    s.push_str(&format!("LODE_USER={}\n", quote("user", &cmd.user)?));
    s.push_str("set --");
    for a in &cmd.args {
        s.push(' ');
        s.push_str(&quote("argument", a)?);
    }
    s.push_str("\nlode_env() {\n\t/bin/busybox env -i");
    for e in &cmd.env {
        s.push(' ');
        s.push_str(&quote("environment entry", e)?);
    }
    s.push_str(" \"$@\"\n}\n");
    Ok(s)
}

/// The run's initrd: the base archive at `base` followed by an archive holding
/// /lode/run.sh, written to a temporary file in `dir` (removed when dropped).
pub fn for_run(
    dir: &Path,
    base: &Path,
    cmd: &GuestCommand,
    token: &str,
) -> Result<tempfile::NamedTempFile, InitramfsError> {
    let script = run_script(cmd, token)?;
    let mut w = CpioWriter::new(Vec::new());
    w.file("lode/run.sh", 0o644, script.as_bytes())?;
    let run = w.finish()?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix("initrd-")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    let mut src = std::fs::File::open(base).map_err(io(base))?;
    std::io::copy(&mut src, tmp.as_file_mut()).map_err(io(tmp.path()))?;
    tmp.write_all(&run).map_err(io(tmp.path()))?;
    tmp.flush().map_err(io(tmp.path()))?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_script_quotes_every_word() {
        let cmd = GuestCommand {
            args: vec!["sh".into(), "-c".into(), "echo 'hi' $HOME; exit 7".into()],
            env: vec!["PATH=/bin".into(), "A=it's".into()],
            cwd: String::new(),
            user: "app:staff".into(),
            writable: true,
        };
        let s = run_script(&cmd, "abc").unwrap();
        assert_eq!(
            s,
            "LODE_TOKEN='abc'\nLODE_MOUNT='rw,noatime'\nLODE_PATH='/bin'\nLODE_CWD='/'\n\
             LODE_USER='app:staff'\nset -- 'sh' '-c' 'echo '\\''hi'\\'' $HOME; exit 7'\n\
             lode_env() {\n\t/bin/busybox env -i 'PATH=/bin' 'A=it'\\''s' \"$@\"\n}\n"
        );
        let Some(sh) = ["/bin/sh", "/usr/bin/sh"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            return;
        };
        // The words come back as they were, through a real shell.
        let out = Command::new(sh)
            .arg("-c")
            .arg(format!("{s}\nprintf '%s|' \"$@\" \"$LODE_USER\""))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "sh|-c|echo 'hi' $HOME; exit 7|app:staff|"
        );
        let mut bad = cmd.clone();
        bad.args.push("a\0b".into());
        assert_eq!(
            run_script(&bad, "abc").unwrap_err().to_string(),
            "argument \"a\\0b\" holds a NUL byte"
        );
    }

    #[test]
    fn busybox_must_be_static() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("busybox");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        assert_eq!(
            read_busybox(&p).unwrap_err().to_string(),
            format!(
                "busybox {}: not an ELF executable; install busybox-static (apt-get install busybox-static) or give --busybox FILE",
                p.display()
            )
        );
        let e = read_busybox(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn the_base_is_cached_by_its_inputs() {
        let Ok(k) = crate::kernel::find(None, None) else {
            eprintln!("SKIPPED: no guest kernel installed");
            return;
        };
        if !Path::new("/bin/busybox").exists() {
            eprintln!("SKIPPED: busybox is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let a = base(
            dir.path(),
            &k,
            &wanted_modules(false),
            Path::new("/bin/busybox"),
        )
        .unwrap();
        let t = std::fs::metadata(&a).unwrap().modified().unwrap();
        let b = base(
            dir.path(),
            &k,
            &wanted_modules(false),
            Path::new("/bin/busybox"),
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::metadata(&b).unwrap().modified().unwrap(), t);
        let run = for_run(dir.path(), &a, &GuestCommand::default(), "t").unwrap();
        let len = std::fs::metadata(run.path()).unwrap().len();
        assert!(len > std::fs::metadata(&a).unwrap().len());
    }
}
