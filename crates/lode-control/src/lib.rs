//! The assignment service (`lode control`): the control plane of a lode fleet.
//!
//! Where this fits: docs/architecture.md, "The control plane and the KMS".
//!
//! Workers register and heartbeat; a start is placed on a worker (one that has the image
//! warm first, else by consistent hashing with bounded load), recorded as an assignment
//! with a lease, and sent to that worker; the service alone asks the KMS to unwrap image
//! keys, and grants a manifest's data key only to the worker that manifest is assigned to
//! while its lease lasts.

pub mod api;
mod failpoint;
pub mod pki;
pub mod placement;
pub mod rpc;
pub mod service;
pub mod state;

use std::path::PathBuf;

/// What went wrong in the control plane, outside a call (see [`rpc::RpcError`]).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate or key could not be made, read or used.
    #[error("{0}")]
    Pki(String),
}
