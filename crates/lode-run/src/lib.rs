//! `lode mount` and `lode run` as a library: an image attached through the agent's
//! control API, its FUSE file on a loop device, its ext4 mounted (`nosuid,nodev` unless
//! asked otherwise), and a command run inside it with crun or chroot. The image is
//! untrusted throughout: what lode reads from it (the user's passwd and group entries) is
//! read from inside it ([`image`]), what lode mounts into it (/proc, /dev) is mounted onto
//! directories reached without following its symlinks, and the command gets a private
//! /dev and no way to make device nodes. A SIGTERM, SIGINT or SIGHUP at any point leaves
//! no mount, loop device or attachment behind ([`signals`]). docs/run.md describes what
//! each runtime contains and what it does not.
//!
//! Where this fits: docs/architecture.md, "The flow of an image".

pub mod control;
pub mod image;
mod loopdev;
pub mod mount;
mod plumbing;
pub mod run;
pub mod runtime;
pub mod signals;
pub mod timings;
pub mod user;

pub use control::{ControlError, call};
pub use image::{ImageError, ImageRoot, MAX_IMAGE_FILE};
pub use mount::{
    MountError, MountOptions, Mounted, Released, Unmounted, mount, mount_timed, umount,
};
pub use plumbing::PlumbingError;
pub use run::{Plan, RunError, RunOptions, RunReport, Runtime, plan, run};
pub use runtime::{Process, RemountHook, RuntimeError};
pub use signals::SignalGuard;
pub use timings::{Step, Timings};
pub use user::{UserError, resolve_user};

/// The first eight bytes of `b` in hex.
fn hex8(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}
