//! The guest kernel and its modules: Debian's cloud kernel by default
//! (`/boot/vmlinuz-VERSION-cloud-amd64` and `/lib/modules/VERSION`), and which of its
//! modules the initramfs must load, in order, to reach a virtio disk holding ext4.
//!
//! Which modules a kernel needs is read from its own `modules.dep` and `modules.builtin`
//! (what is built in is not loaded); a module's dependencies load before it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The Debian package of the default kernel.
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// A kernel that could not be found or used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No kernel image where lode looked.
    #[error(
        "no guest kernel: nothing matches {pattern}; install {KERNEL_PACKAGE} (apt-get install {KERNEL_PACKAGE}) or give --kernel FILE"
    )]
    NoKernel {
        /// What was searched.
        pattern: String,
    },
    /// The kernel file given does not exist.
    #[error("kernel {}: {source}", path.display())]
    Kernel {
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        source: std::io::Error,
    },
    /// The kernel's name does not say its version, so its modules cannot be found.
    #[error("kernel {}: its name is not vmlinuz-VERSION, so lode cannot tell where its modules are; give --modules DIR", path.display())]
    NoVersion {
        /// The file.
        path: PathBuf,
    },
    /// The modules directory is missing or has no modules.dep.
    #[error("modules of kernel {version}: {} has no modules.dep; install the modules of that kernel ({KERNEL_PACKAGE} ships them) or give --modules DIR", dir.display())]
    NoModules {
        /// The kernel version.
        version: String,
        /// The directory.
        dir: PathBuf,
    },
    /// A module the guest needs is neither built in nor in modules.dep.
    #[error("module {module} is neither built into kernel {version} nor listed in {}/modules.dep", dir.display())]
    MissingModule {
        /// The module.
        module: String,
        /// The kernel version.
        version: String,
        /// The modules directory.
        dir: PathBuf,
    },
    /// modules.dep lists a dependency loop.
    #[error("{}/modules.dep: module {module} depends on itself", dir.display())]
    Cycle {
        /// The module.
        module: String,
        /// The modules directory.
        dir: PathBuf,
    },
    /// Reading a file of the modules directory failed.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A guest kernel with its modules directory.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The kernel image (bzImage).
    pub image: PathBuf,
    /// Its version, as `uname -r` will say.
    pub version: String,
    /// `/lib/modules/VERSION` or what --modules named.
    pub modules: PathBuf,
}

/// A module to load: its name and its file (`.ko`, maybe compressed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The name (`virtio_blk`).
    pub name: String,
    /// The file.
    pub path: PathBuf,
}

/// The kernel at `kernel`, or the newest `/boot/vmlinuz-*-cloud-amd64`; its modules in
/// `modules`, or `/lib/modules/VERSION`.
pub fn find(kernel: Option<&Path>, modules: Option<&Path>) -> Result<Kernel, KernelError> {
    find_in(
        Path::new("/boot"),
        Path::new("/lib/modules"),
        kernel,
        modules,
    )
}

fn find_in(
    boot: &Path,
    lib_modules: &Path,
    kernel: Option<&Path>,
    modules: Option<&Path>,
) -> Result<Kernel, KernelError> {
    let image = match kernel {
        Some(k) => {
            std::fs::metadata(k).map_err(|source| KernelError::Kernel {
                path: k.to_path_buf(),
                source,
            })?;
            k.to_path_buf()
        }
        None => newest_cloud_kernel(boot)?,
    };
    let from_name = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    let (version, dir) = match (modules, from_name) {
        (Some(m), v) => (
            v.or_else(|| m.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default(),
            m.to_path_buf(),
        ),
        (None, Some(v)) => (v.clone(), lib_modules.join(&v)),
        (None, None) => return Err(KernelError::NoVersion { path: image }),
    };
    if !dir.join("modules.dep").is_file() {
        return Err(KernelError::NoModules { version, dir });
    }
    Ok(Kernel {
        image,
        version,
        modules: dir,
    })
}

fn newest_cloud_kernel(boot: &Path) -> Result<PathBuf, KernelError> {
    let pattern = format!("{}/vmlinuz-*-cloud-amd64", boot.display());
    let mut found: Vec<String> = std::fs::read_dir(boot)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        .collect();
    found.sort_by_key(|n| version_key(n));
    found
        .pop()
        .map(|n| boot.join(n))
        .ok_or(KernelError::NoKernel { pattern })
}

/// Orders versions by their numbers: 6.1.0-10 after 6.1.0-9.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A module's name from its path in modules.dep: the file name without `.ko` and any
/// compression suffix, with `-` as `_` (as the kernel names modules).
pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|s| file.strip_suffix(s))?;
    (!stem.is_empty()).then(|| stem.replace('-', "_"))
}

/// modules.dep as a map from module name to (its file, the names of its dependencies).
/// Lines that do not parse are skipped.
pub fn parse_modules_dep(text: &str) -> HashMap<String, (String, Vec<String>)> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let Some(name) = module_name(path.trim()) else {
            continue;
        };
        let deps = deps.split_whitespace().filter_map(module_name).collect();
        map.entry(name).or_insert((path.trim().to_string(), deps));
    }
    map
}

/// The names of the modules built into the kernel (modules.builtin: one path a line).
pub fn parse_modules_builtin(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| module_name(l.trim())).collect()
}

impl Kernel {
    fn read(&self, file: &str) -> Result<String, KernelError> {
        let path = self.modules.join(file);
        std::fs::read_to_string(&path).map_err(|source| KernelError::Read { path, source })
    }

    /// The modules to load for `wanted`, dependencies first, each once; modules built
    /// into the kernel are left out.
    pub fn modules_for(&self, wanted: &[&str]) -> Result<Vec<Module>, KernelError> {
        let dep = parse_modules_dep(&self.read("modules.dep")?);
        // A kernel without modules.builtin has nothing built in that lode needs to know of.
        let builtin = match self.read("modules.builtin") {
            Ok(t) => parse_modules_builtin(&t),
            Err(_) => Vec::new(),
        };
        let mut order = Vec::new();
        for w in wanted {
            self.visit(w, &dep, &builtin, &mut Vec::new(), &mut order)?;
        }
        Ok(order
            .into_iter()
            .map(|name| {
                let path = self.modules.join(&dep[&name].0);
                Module { name, path }
            })
            .collect())
    }

    fn visit(
        &self,
        name: &str,
        dep: &HashMap<String, (String, Vec<String>)>,
        builtin: &[String],
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), KernelError> {
        if order.iter().any(|m| m == name) || builtin.iter().any(|m| m == name) {
            return Ok(());
        }
        if stack.iter().any(|m| m == name) {
            return Err(KernelError::Cycle {
                module: name.to_string(),
                dir: self.modules.clone(),
            });
        }
        let Some((_, deps)) = dep.get(name) else {
            return Err(KernelError::MissingModule {
                module: name.to_string(),
                version: self.version.clone(),
                dir: self.modules.clone(),
            });
        };
        stack.push(name.to_string());
        for d in deps {
            self.visit(d, dep, builtin, stack, order)?;
        }
        stack.pop();
        order.push(name.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEP: &str = "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko\n\
        kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\n\
        kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
        kernel/drivers/virtio/virtio_ring.ko:\n\
        kernel/drivers/virtio/virtio_pci_legacy_dev.ko:\n\
        kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n\
        kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
        kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
        kernel/a.ko.xz: kernel/b-c.ko.zst\nkernel/b-c.ko.zst: kernel/a.ko.xz\n";

    fn kernel(builtin: &str) -> (tempfile::TempDir, Kernel) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), DEP).unwrap();
        std::fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        let k = Kernel {
            image: dir.path().join("vmlinuz"),
            version: "6.1.0-test".into(),
            modules: dir.path().to_path_buf(),
        };
        (dir, k)
    }

    fn names(m: &[Module]) -> Vec<&str> {
        m.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_load_first_and_builtins_not_at_all() {
        let (_d, k) = kernel("kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n");
        let m = k
            .modules_for(&["virtio_pci", "virtio_blk", "ext4"])
            .unwrap();
        assert_eq!(
            names(&m),
            [
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        assert_eq!(
            m[5].path,
            k.modules.join("kernel/drivers/block/virtio_blk.ko")
        );
        let (_d, k) = kernel("");
        let m = k.modules_for(&["ext4"]).unwrap();
        assert_eq!(names(&m), ["jbd2", "mbcache", "ext4"]);
    }

    #[test]
    fn missing_and_looping_modules_are_named() {
        let (_d, k) = kernel("");
        let e = k.modules_for(&["virtio_mmio"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "module virtio_mmio is neither built into kernel 6.1.0-test nor listed in {}/modules.dep",
                k.modules.display()
            )
        );
        let e = k.modules_for(&["a"]).unwrap_err();
        assert!(e.to_string().ends_with("module a depends on itself"), "{e}");
    }

    #[test]
    fn kernels_are_found_by_version_and_named_when_missing() {
        let boot = tempfile::tempdir().unwrap();
        let lib = tempfile::tempdir().unwrap();
        let e = find_in(boot.path(), lib.path(), None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "no guest kernel: nothing matches {}/vmlinuz-*-cloud-amd64; install linux-image-cloud-amd64 (apt-get install linux-image-cloud-amd64) or give --kernel FILE",
                boot.path().display()
            )
        );
        for v in [
            "6.1.0-9-cloud-amd64",
            "6.1.0-10-cloud-amd64",
            "5.10.0-30-cloud-amd64",
        ] {
            std::fs::write(boot.path().join(format!("vmlinuz-{v}")), "").unwrap();
        }
        let e = find_in(boot.path(), lib.path(), None, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("modules of kernel 6.1.0-10-cloud-amd64: "),
            "{e}"
        );
        let m = lib.path().join("6.1.0-10-cloud-amd64");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("modules.dep"), "").unwrap();
        let k = find_in(boot.path(), lib.path(), None, None).unwrap();
        assert_eq!(k.version, "6.1.0-10-cloud-amd64");
        assert_eq!(k.modules, m);
        let e = find_in(
            boot.path(),
            lib.path(),
            Some(Path::new("/nonexistent/bzImage")),
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("kernel /nonexistent/bzImage: "),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn any_text_parses_without_panic(text in "\\PC{0,300}") {
            let _ = parse_modules_dep(&text);
            let _ = parse_modules_builtin(&text);
        }

        #[test]
        fn written_lines_read_back(mods in proptest::collection::vec("[a-z][a-z0-9_-]{0,10}", 1..10)) {
            let mut text = String::new();
            for (i, m) in mods.iter().enumerate() {
                let deps: Vec<String> = mods[..i].iter().map(|d| format!("kernel/{d}.ko")).collect();
                text.push_str(&format!("kernel/{m}.ko: {}\n", deps.join(" ")));
            }
            let map = parse_modules_dep(&text);
            let first = mods[0].replace('-', "_");
            prop_assert!(map.contains_key(&first));
            prop_assert!(map.len() <= mods.len());
        }
    }
}
