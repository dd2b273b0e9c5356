//! The AZ client's errors. A node that is slow, down or wrong is not an error of the
//! client: a read it spoils is a miss (the caller goes on to the origin) and it shows in
//! the metrics. What is left are a bad configuration and writes that could not be done.

use lode_format::ChunkName;
use thiserror::Error;

/// An AZ client error.
#[derive(Debug, Error)]
pub enum AzError {
    /// A configuration field is invalid.
    #[error("AZ cache config `{key}`: {message}")]
    Config {
        /// The field (`k`, `nodes[2]`, …).
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A chunk whose stripes would not fit in a node's value.
    #[error(
        "chunk {chunk} of {len} bytes cannot go to the AZ cache: its stripes would be \
         {stripe_len} bytes, over max_value ({max_value})"
    )]
    TooLarge {
        /// The chunk.
        chunk: ChunkName,
        /// Its length.
        len: usize,
        /// One stripe's length.
        stripe_len: usize,
        /// The limit.
        max_value: usize,
    },
    /// A write reached fewer nodes than it was meant for.
    #[error("chunk {chunk}: stored {stored} of {total} stripes ({reason})")]
    Incomplete {
        /// The chunk.
        chunk: ChunkName,
        /// Stripes stored.
        stored: usize,
        /// Stripes meant to be stored.
        total: usize,
        /// Why the first missing one was not stored.
        reason: String,
    },
    /// Coding work failed to run (a panicked or cancelled blocking task).
    #[error("chunk {chunk}: {what} failed: {message}")]
    Task {
        /// The chunk.
        chunk: ChunkName,
        /// What was being done.
        what: &'static str,
        /// The failure.
        message: String,
    },
}
