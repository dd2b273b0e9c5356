//! The `lode agent` daemon (docs/agent.md).
//!
//! Where this fits: docs/architecture.md, "The flow of an image" (serve) and "The
//! control plane".
//!
//! [`Agent`] holds one worker-wide [`ChunkCache`] (the read path, `lode-read`) and a
//! table of attachments, each an image opened by tag or manifest id and presented as a
//! block device two ways: an NBD export and a file in the agent's FUSE mount. The table
//! lives in a state directory and is re-attached on start. [`control`] is its HTTP
//! control API and metrics endpoint, [`config`] its TOML configuration file, [`worker`]
//! its side of a control service (attach orders, key grants, heartbeats), and read
//! alarms are raised from what the origin tier fetches.

mod alarm;
pub mod config;
pub mod control;
mod daemon;
mod error;
mod stats;
pub mod worker;

pub use alarm::{ALARM_LOG_INTERVAL, ATTACHED_CHECK_INTERVAL, ROOT_STATE_TTL};
pub use daemon::{
    Agent, AgentConfig, Attachment, Keys, MAX_NAME_LEN, NbdLimits, RunConfig, TraceConfig,
    build_cache, nbd_server,
};
pub use error::AgentError;
pub use lode_read::{
    AzTier, ChunkCache, DEFAULT_TRACE_MAX_BYTES, ReadError, StoredWorkSet, clear_working_set,
    mark_rerecord, stored_working_set,
};
pub use stats::{nbd_json, nbd_prometheus};
