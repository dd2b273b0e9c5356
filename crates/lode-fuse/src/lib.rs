//! A FUSE filesystem presenting block devices as regular files.
//!
//! Where this fits: docs/architecture.md, "The flow of an image".
//!
//! The worker agent presents each attached image two ways (docs/agent.md): as an NBD export (`lode-nbd`) and as a file in the agent's FUSE mount, which
//! is what Firecracker and the kernel loop device take. This crate is the FUSE half: a
//! flat directory holding one regular file per [`BlockDevice`](lode_blockdev::BlockDevice), whose bytes are the
//! device's bytes, added and removed at runtime as images attach and detach.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use lode_fuse::{FuseMount, MountOptions};
//! use lode_nbd::MemDevice;
//!
//! let runtime = tokio::runtime::Runtime::new()?;
//! let mount = FuseMount::mount("/run/lode/files", MountOptions::new(runtime.handle().clone()))?;
//! mount.add("scratch", Arc::new(MemDevice::new(64 << 20)), true)?;
//! // losetup --find --show /run/lode/files/scratch
//! mount.remove("scratch")?;
//! mount.unmount()?;
//! # Ok(()) }
//! ```
//!
//! The kernel sends FUSE requests to a small pool of threads; each read, write or
//! fsync is handed to the tokio runtime as a task that answers the kernel when the
//! device call finishes, so a slow device never holds a FUSE thread. A device call that
//! fails, panics or outlasts [`MountOptions::op_timeout`] answers `EIO` — never partial
//! or stale bytes — and is counted in [`FuseStats`] and passed to the error hook.

mod fs;
mod mount;

pub use fs::{CacheMode, FuseStats};
pub use mount::{FuseError, FuseMount, MountOptions, Op};
