//! Counters, kept as relaxed atomics on the hot path and copied out by
//! [`AzClient::metrics`](crate::AzClient::metrics).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A monotonic counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, n: usize) {
        self.0
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the client has seen overall.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AzMetrics {
    /// Calls to `get`.
    pub gets: u64,
    /// Gets that returned the chunk (checked against its name).
    pub hits: u64,
    /// Gets that returned `None`: too few stripes, nodes down or slow, or no stripe
    /// combination that checks out.
    pub misses: u64,
    /// Hits that needed a parity stripe, that is, decoding.
    pub rebuilds: u64,
    /// Gets in which a rebuilt chunk failed its name check (it was not returned; another
    /// combination of stripes then passed, a hit, or none did, a miss).
    pub integrity_failures: u64,
    /// Calls to `put`.
    pub puts: u64,
    /// Puts that stored fewer than `k + m` stripes.
    pub incomplete_puts: u64,
    /// Stripes written back by read repair.
    pub repairs: u64,
    /// Stripe requests sent by gets.
    pub stripe_requests: u64,
    /// Bytes of stripes (headers included) nodes returned to gets.
    pub stripe_bytes: u64,
    /// Stripe requests sent because others had not answered in time: past the hedge
    /// delay (`hedge = "p95"`), or past half the node timeout (any mode).
    pub hedges: u64,
    /// Stripe requests sent because others failed, missed, returned an invalid or
    /// repeated stripe, or (after a failed name check) to hear from every node.
    pub fallbacks: u64,
    /// Reads (`hedge = "p95"`) that asked a parity stripe's node before a data stripe's
    /// because the latter's recent p95 was over three times the median node's.
    pub slow_skips: u64,
    /// The hedge delay in force, µs (`hedge = "p95"`, once half the nodes have a p95; 0
    /// otherwise).
    pub hedge_delay_us: u64,
    /// Per node, in configuration order.
    pub nodes: Vec<NodeMetrics>,
}

/// What the client has seen of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeMetrics {
    /// The node's address as configured.
    pub node: String,
    /// Whether requests go to it (false from `down_after` consecutive failures until a
    /// probe succeeds).
    pub up: bool,
    /// Stripes it returned that passed their header and checksum checks.
    pub hits: u64,
    /// Gets it answered with no value.
    pub misses: u64,
    /// Requests (gets, sets, deletes, probes) that took longer than `node_timeout`.
    pub timeouts: u64,
    /// Requests that failed otherwise: refused or broken connections, malformed
    /// replies, error replies.
    pub errors: u64,
    /// Values it returned that were not a valid stripe of the chunk asked for, and
    /// stripes found wrong when a rebuilt chunk failed its name check.
    pub integrity_failures: u64,
    /// Stripes it stored.
    pub stores: u64,
    /// Times it was marked down.
    pub marked_down: u64,
}

#[derive(Debug, Default)]
pub(crate) struct NodeCounters {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) timeouts: Counter,
    pub(crate) errors: Counter,
    pub(crate) integrity_failures: Counter,
    pub(crate) stores: Counter,
    pub(crate) marked_down: Counter,
}

#[derive(Debug, Default)]
pub(crate) struct ClientCounters {
    pub(crate) gets: Counter,
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) rebuilds: Counter,
    pub(crate) integrity_failures: Counter,
    pub(crate) puts: Counter,
    pub(crate) incomplete_puts: Counter,
    pub(crate) repairs: Counter,
    pub(crate) stripe_requests: Counter,
    pub(crate) stripe_bytes: Counter,
    pub(crate) hedges: Counter,
    pub(crate) fallbacks: Counter,
    pub(crate) slow_skips: Counter,
}
