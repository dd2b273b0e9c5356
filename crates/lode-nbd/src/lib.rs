//! An NBD (Network Block Device) server over a small block-device trait.
//!
//! Where this fits: docs/architecture.md, "The flow of an image".
//!
//! The worker agent exports each attached image as a block device (docs/agent.md); this crate is the NBD half of that: fixed newstyle handshake,
//! pipelined requests answered out of order, TCP and Unix listeners. Whatever
//! implements [`BlockDevice`](lode_blockdev::BlockDevice) — the read path's lazily loaded
//! image, or [`MemDevice`] and [`FileDevice`] in tests — can be added to [`Exports`] and
//! served by a [`Server`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use lode_nbd::{Export, Exports, MemDevice, Server};
//!
//! let exports = Exports::new();
//! exports.add("scratch", Export::new(Arc::new(MemDevice::new(64 << 20))))?;
//! let server = Server::builder(exports).build()?;
//! let addr = server.listen_tcp("127.0.0.1:10809".parse()?).await?;
//! println!("nbdinfo nbd://{addr}/scratch");
//! // ... later
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Untrusted bytes are parsed in one module, [`proto`]; see its docs and the crate
//! README for the protocol coverage and limits.

mod client;
mod device;
mod exports;
pub mod proto;
mod server;

pub use client::Client;
pub use device::{FileDevice, MemDevice, OpenError};
pub use exports::{Export, ExportError, Exports};
pub use proto::Errno;
pub use server::{
    ConfigError, ConnectionError, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT, MAX_BUFFERED_BYTES_LIMIT,
    MAX_CONNECTIONS_LIMIT, MAX_IN_FLIGHT_LIMIT, MIN_BUFFERED_BYTES, Peer, Server, ServerBuilder,
    ServerError, ServerStats,
};
