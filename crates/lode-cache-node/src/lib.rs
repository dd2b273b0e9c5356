//! An AZ cache node: the memcached text protocol over a memory tier and a flash tier.
//!
//! Where this fits: docs/architecture.md, "The read path across the tiers".
//!
//! In lode's read path (docs/agent.md) a worker that
//! misses its local cache asks the AZ cache: each 512 KiB chunk is erasure-coded into
//! stripes (about 128 KiB for k = 4) kept on k + m nodes, and any k rebuild it. This
//! crate is such a node. It speaks the memcached text protocol, so plain memcached
//! servers can stand in for it and memcached clients can talk to it, and it adds what
//! the paper's nodes have: a bounded memory tier for hot items over a bounded flash
//! tier of files on local disk, with LRU-K eviction so a scan of one-off reads does not
//! flush the hot set. Items evicted from memory are demoted to flash rather than
//! dropped; a flash hit promotes the item back.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lode_cache_node::Error> {
//! use lode_cache_node::{Node, NodeConfig};
//!
//! let node = Node::start(NodeConfig {
//!     listen: "127.0.0.1:0".parse().unwrap(),
//!     flash_dir: Some("/var/cache/lode-node".into()),
//!     flash_bytes: 90 << 30,
//!     ..NodeConfig::default()
//! })
//! .await?;
//! println!("memcached protocol on {}", node.local_addr());
//! // ... later
//! let stats = node.stats();
//! println!("memory hits {}, flash hits {}", stats.memory.hits, stats.flash.hits);
//! node.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Untrusted bytes are parsed in one module, [`protocol`]; the crate README lists the
//! protocol coverage, the limits and what a restart keeps.

mod config;
mod error;
mod flash;
mod lruk;
pub mod protocol;
mod server;
mod stats;
mod store;

pub use config::{
    DEFAULT_FLASH_BYTES, DEFAULT_ITEM_SIZE_LIMIT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MEMORY_ONLY_BYTES, DEFAULT_MEMORY_SHARE, DEFAULT_PORT, MAX_ITEM_SIZE_LIMIT, MAX_K,
    MIN_ITEM_SIZE_LIMIT, NodeConfig, Policy, TierSizes,
};
pub use error::{Error, Result};
pub use server::{Node, NodeHandle, VERSION};
pub use stats::{Stats, TierStats};
