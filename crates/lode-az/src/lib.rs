//! lode's AZ cache client (docs/agent.md, the AZ tier).
//!
//! Where this fits: docs/architecture.md, "The read path across the tiers".
//!
//! Between a worker's local cache and the origin store sits a fleet of cache nodes in
//! the worker's availability zone, speaking the memcached text protocol (plain memcached
//! works). A chunk's ciphertext is cut into `k` data stripes and `m` Reed-Solomon parity
//! stripes, stored on `k + m` distinct nodes picked by rendezvous hashing (or bounded
//! loads over it); any `k` stripes rebuild it. A read asks the `k` data stripes' nodes
//! and hedges: it asks the next node when one fails or misses, or is slower than the
//! p95 of recent stripe latencies, so one slow or dead node costs a read little.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lode_az::AzError> {
//! use bytes::Bytes;
//! use lode_az::{AzClient, AzConfig};
//! use lode_format::ChunkName;
//!
//! let az = AzClient::new(AzConfig::new([
//!     "10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211",
//!     "10.0.0.4:11211", "10.0.0.5:11211", "10.0.0.6:11211",
//! ]))?;
//! let ciphertext = Bytes::from_static(b"a chunk's ciphertext");
//! let name = ChunkName::of(&ciphertext);
//! az.put(&name, ciphertext.clone()).await?;               // after an origin fetch
//! assert_eq!(az.get(&name).await?, Some(ciphertext));     // checked against its name
//! println!("{:?}", az.metrics());
//! # Ok(()) }
//! ```
//!
//! Modules: [`placement`] (rendezvous hashing and bounded loads), [`stripe`] (the stripe format and the
//! Reed-Solomon code), [`proto`] and [`memcache`] (the memcached protocol, the only
//! parser of node bytes), and the client itself. The crate does not depend on the
//! agent; an adapter there implements the agent's tier trait over [`AzClient`].

mod client;
mod config;
mod error;
mod latency;
pub mod memcache;
mod metrics;
mod node;
pub mod placement;
pub mod proto;
pub mod stripe;

pub use client::{Accept, AzClient, chunk_key};
pub use config::{AzConfig, Hedge};
pub use error::AzError;
pub use metrics::{AzMetrics, NodeMetrics};
pub use placement::{Placement, PlacementKind};
