//! `lode vm run` as a library: a QEMU machine whose root disk is an image the agent
//! serves, booted with an initramfs lode writes itself, running one command and reporting
//! its exit status over the serial console.
//!
//! - [`kernel`]: the guest kernel and the modules it needs, from its own modules.dep;
//! - [`cpio`] and [`initramfs`]: the initramfs (busybox, the modules, an init script),
//!   cached by its inputs, plus each run's command;
//! - [`qemu`]: the QEMU command line and the accelerator;
//! - [`protocol`]: the markers on the console and their parser;
//! - [`boot`]: QEMU run, watched, and never left behind.
//!
//! Where this fits: docs/vm.md, and docs/architecture.md, "The flow of an image".

pub mod boot;
pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod protocol;
pub mod qemu;

pub use boot::{BootError, Outcome};
pub use initramfs::{GuestCommand, InitramfsError};
pub use kernel::{Kernel, KernelError};
pub use protocol::Token;
pub use qemu::{Accel, Disk, Machine};
