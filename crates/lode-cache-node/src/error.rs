//! The errors a node reports to whoever starts it. Each names the setting, address or
//! path at fault; what goes wrong on a client connection is answered on that connection
//! (`ERROR`, `CLIENT_ERROR`, `SERVER_ERROR`) and never surfaces here.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a node could not start (or stop cleanly).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A [`NodeConfig`](crate::NodeConfig) field is out of range.
    #[error("cache node config: {field}: {reason}")]
    Config {
        /// The field at fault, as named in `NodeConfig`.
        field: &'static str,
        /// What is wrong with it, with the value given.
        reason: String,
    },
    /// The listening socket could not be bound.
    #[error("cache node: cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The error from the operating system.
        source: std::io::Error,
    },
    /// The flash directory (or a file in it) could not be created, locked or read.
    #[error("cache node flash tier: {path}: {source}")]
    FlashIo {
        /// The file or directory at fault.
        path: PathBuf,
        /// The error from the operating system.
        source: std::io::Error,
    },
    /// The flash directory holds files but no marker, so it may belong to someone
    /// else; the node refuses to delete or index them.
    #[error(
        "cache node flash tier: {path} is not empty and has no {marker} file; refusing to \
         use a directory a cache node did not create (give an empty or new directory)"
    )]
    FlashDirForeign {
        /// The directory given as `flash_dir`.
        path: PathBuf,
        /// The marker file name that was looked for.
        marker: &'static str,
    },
    /// Another process holds the flash directory's lock.
    #[error("cache node flash tier: {path} is in use by another cache node")]
    FlashDirLocked {
        /// The directory given as `flash_dir`.
        path: PathBuf,
    },
    /// The marker names a flash format this build does not read.
    #[error("cache node flash tier: {path} holds format {found:?}, this node writes {expected:?}")]
    FlashFormat {
        /// The marker file.
        path: PathBuf,
        /// Its first line.
        found: String,
        /// The line this build writes.
        expected: &'static str,
    },
    /// The background flash writer thread could not be started or ended abnormally.
    #[error("cache node flash tier: writer thread: {0}")]
    Writer(String),
}

/// The result of starting or stopping a node.
pub type Result<T, E = Error> = std::result::Result<T, E>;
