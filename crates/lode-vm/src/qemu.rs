//! The QEMU command line of a run, and the choice of accelerator.
//!
//! One vCPU by default, `-nodefaults` (no network, no VGA, no floppy), the serial port on
//! QEMU's stdout, `-no-reboot` so a guest that powers off or panics ends QEMU, and the
//! image as a virtio disk: either the agent's FUSE file of the attachment (as Lambda's
//! agent hands a block device to Firecracker) or its NBD export over the agent's Unix
//! socket, through QEMU's own NBD client.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The Debian package of QEMU.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// How QEMU executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's binary translator: slower, works anywhere.
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// KVM when it can run guests here, else TCG.
    ///
    /// The check is cheap and never starts a guest: /dev/kvm must open read-write and the
    /// CPU must show the virtualisation flag (`vmx` or `svm` in /proc/cpuinfo). A nested
    /// VM may expose /dev/kvm without the flag; QEMU then aborts or spins in KVM, so that
    /// case is TCG.
    pub fn probe() -> Accel {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let flag = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| cpu_has_virt(&c));
        if dev && flag { Accel::Kvm } else { Accel::Tcg }
    }
}

/// Whether a /proc/cpuinfo text lists `vmx` or `svm` among its flags.
pub fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The machine's root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    /// A file (the agent's FUSE file of an attachment).
    File {
        /// The file.
        path: PathBuf,
        /// Let the guest write (into the attachment's overlay).
        writable: bool,
    },
    /// An NBD export on a Unix socket.
    Nbd {
        /// The socket.
        socket: PathBuf,
        /// The export's name.
        export: String,
        /// Let the guest write.
        writable: bool,
    },
}

/// The host's TSC rate in kHz from a /proc/cpuinfo text (its first `cpu MHz` line).
pub fn cpu_khz(cpuinfo: &str) -> Option<u64> {
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split_once(':')?
        .1
        .trim();
    let (whole, frac) = mhz.split_once('.').unwrap_or((mhz, ""));
    let whole: u64 = whole.parse().ok()?;
    let frac = format!("{frac:0<3}");
    let frac: u64 = frac.get(..3)?.parse().ok()?;
    let khz = whole.checked_mul(1000)?.checked_add(frac)?;
    (khz > 0).then_some(khz)
}

/// Everything QEMU is started with.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The QEMU executable.
    pub qemu: PathBuf,
    /// `pc` or `microvm`.
    pub machine: String,
    /// How to execute the guest.
    pub accel: Accel,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initrd of this run.
    pub initrd: PathBuf,
    /// The root disk.
    pub disk: Disk,
    /// The host's TSC rate, kHz, handed to a microvm guest under TCG (see [`Machine::args`]).
    pub host_tsc_khz: Option<u64>,
}

/// The kernel command line: console on the first serial port, as little said on it as
/// the kernel allows, and a panic ends the machine at once (with `-no-reboot`).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 quiet loglevel=0 panic=-1 rdinit=/init";

/// A value inside a QEMU option list: commas doubled.
fn opt(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

impl Machine {
    /// Whether the disk sits on virtio-mmio (microvm) rather than PCI.
    pub fn mmio(&self) -> bool {
        self.machine == "microvm"
    }

    /// QEMU's arguments.
    pub fn args(&self) -> Vec<OsString> {
        let readonly = |w: bool| if w { "off" } else { "on" };
        let drive = match &self.disk {
            // No locking: the file is the agent's, and FUSE need not support OFD locks.
            Disk::File { path, writable } => format!(
                "if=none,id=root,format=raw,file.driver=file,file.filename={},file.locking=off,readonly={}",
                opt(path),
                readonly(*writable)
            ),
            Disk::Nbd {
                socket,
                export,
                writable,
            } => format!(
                "if=none,id=root,format=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={},readonly={}",
                opt(socket),
                export.replace(',', ",,"),
                readonly(*writable)
            ),
        };
        let device = if self.mmio() {
            "virtio-blk-device,drive=root"
        } else {
            "virtio-blk-pci,drive=root"
        };
        // A microvm has no HPET or ACPI PM timer, only the PIT, to calibrate the TSC
        // against; under TCG on a busy host that calibration fails now and then, and the
        // kernel then stalls before printing a line (seen here in about one boot in
        // ten). Under TCG the guest's TSC runs at the host's rate, so the kernel is told
        // it instead of measuring it.
        let mut cmdline = KERNEL_CMDLINE.to_string();
        if let (true, Accel::Tcg, Some(khz)) = (self.mmio(), self.accel, self.host_tsc_khz) {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        for s in [
            "-M",
            &self.machine,
            "-accel",
            self.accel.name(),
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.cpus.to_string(),
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-drive",
            &drive,
            "-device",
            device,
            "-append",
            &cmdline,
        ] {
            push(s);
        }
        a.push("-kernel".into());
        a.push(self.kernel.clone().into());
        a.push("-initrd".into());
        a.push(self.initrd.clone().into());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(disk: Disk) -> Machine {
        Machine {
            qemu: "qemu-system-x86_64".into(),
            machine: "pc".into(),
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 1,
            kernel: "/boot/vmlinuz".into(),
            initrd: "/tmp/initrd".into(),
            disk,
            host_tsc_khz: Some(2_596_120),
        }
    }

    #[test]
    fn the_command_line_names_the_disk() {
        let m = machine(Disk::File {
            path: "/state/files/a,b".into(),
            writable: false,
        });
        let a: Vec<String> = m
            .args()
            .iter()
            .map(|s| s.to_string_lossy().into())
            .collect();
        assert_eq!(
            a.join(" "),
            "-M pc -accel tcg -m 512 -smp 1 -nodefaults -nographic -no-reboot -serial stdio \
             -drive if=none,id=root,format=raw,file.driver=file,file.filename=/state/files/a,,b,file.locking=off,readonly=on \
             -device virtio-blk-pci,drive=root -append console=ttyS0 quiet loglevel=0 panic=-1 rdinit=/init \
             -kernel /boot/vmlinuz -initrd /tmp/initrd"
        );
        let mut m = machine(Disk::Nbd {
            socket: "/run/nbd.sock".into(),
            export: "vm-1".into(),
            writable: true,
        });
        m.machine = "microvm".into();
        let a: Vec<String> = m
            .args()
            .iter()
            .map(|s| s.to_string_lossy().into())
            .collect();
        assert!(a.contains(&"if=none,id=root,format=raw,file.driver=nbd,file.server.type=unix,file.server.path=/run/nbd.sock,file.export=vm-1,readonly=off".to_string()));
        assert!(a.contains(&"virtio-blk-device,drive=root".to_string()));
        assert!(
            a.contains(
                &"console=ttyS0 quiet loglevel=0 panic=-1 rdinit=/init tsc_early_khz=2596120"
                    .to_string()
            )
        );
    }

    #[test]
    fn the_virtualisation_flag_is_read_from_cpuinfo() {
        assert!(cpu_has_virt("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_virt("flags\t: svm\n"));
        assert!(!cpu_has_virt(
            "flags\t: fpu vme sse vmxx\nmodel name: vmx\n"
        ));
    }

    #[test]
    fn the_tsc_rate_is_read_from_cpuinfo() {
        assert_eq!(
            cpu_khz("processor: 0\ncpu MHz\t\t: 2596.120\n"),
            Some(2_596_120)
        );
        assert_eq!(cpu_khz("cpu MHz : 3000\n"), Some(3_000_000));
        assert_eq!(cpu_khz("cpu MHz : 1.5\n"), Some(1_500));
        assert_eq!(cpu_khz("cpu MHz : fast\n"), None);
        assert_eq!(cpu_khz("cpu MHz : 0.000\n"), None);
        assert_eq!(cpu_khz("no such line\n"), None);
    }

    proptest::proptest! {
        #[test]
        fn any_cpuinfo_parses(text in "\\PC{0,300}") {
            let _ = cpu_has_virt(&text);
            let _ = cpu_khz(&text);
        }

        #[test]
        fn the_flag_is_found_among_others(
            before in proptest::collection::vec("[a-z0-9_]{1,8}", 0..6),
            after in proptest::collection::vec("[a-z0-9_]{1,8}", 0..6),
        ) {
            let has = before.iter().chain(&after).any(|f| f == "vmx" || f == "svm");
            let line = |mid: &str| {
                format!("flags\t\t: {} {mid} {}\n", before.join(" "), after.join(" "))
            };
            proptest::prop_assert!(cpu_has_virt(&line("svm")));
            proptest::prop_assert_eq!(cpu_has_virt(&line("")), has);
        }
    }
}
