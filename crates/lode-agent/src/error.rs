//! What can go wrong in the daemon: a control request it refuses, an image it cannot
//! open, a listener it cannot set up, its state directory, and the read path below it
//! ([`ReadError`], passed through unchanged). Every variant names the attachment, image
//! or path it is about; the control API sends the message back with an HTTP status.

use std::path::PathBuf;

use lode_read::{OpenError, ReadError};
use thiserror::Error;

/// An agent failure.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The read path failed (a cache tier, the overlay, a device).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A file of the agent's (the state directory, the config file, a socket) could not
    /// be used.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A control request was invalid.
    #[error("{0}")]
    Request(String),
    /// The request conflicts with the agent's state (a name already attached).
    #[error("{0}")]
    Conflict(String),
    /// No attachment has that name.
    #[error("no attachment named {0:?}")]
    NotAttached(String),
    /// The image could not be opened.
    #[error("opening image {image:?}: {source}")]
    Image {
        /// What was asked for.
        image: String,
        /// Why it failed.
        source: Box<OpenError>,
    },
    /// Nothing answers on the control socket.
    #[error("no agent listening on {}: start `lode agent`", .0.display())]
    NoAgent(PathBuf),
    /// A listener could not be set up.
    #[error("listening: {0}")]
    Listen(String),
}

/// Wraps an I/O error with what was done to which path.
pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> AgentError {
    let path = path.into();
    move |source| AgentError::Io { op, path, source }
}
