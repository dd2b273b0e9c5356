//! The AZ cache tier (docs/agent.md): a thin [`ChunkTier`] over
//! [`lode_az::AzClient`], which places each chunk's erasure-coded stripes on the fleet by
//! rendezvous hashing and rebuilds from the first `k` to arrive. A v1 chunk is checked
//! whole before it is returned; a v2 chunk as soon as its header checks against its name
//! ([`Found::HeaderChecked`]), so the read can hash and open the one segment it waits
//! for without hashing the other 480 KiB first. A node that is slow, down or wrong makes a
//! miss, never an error, so the cache goes on to the origin; after an origin fetch the
//! cache writes the chunk here in the background.

use async_trait::async_trait;
use lode_az::{Accept, AzClient, AzConfig, AzMetrics};
use lode_format::{ChunkFormat, SegmentIndex, verify_header};

use crate::ReadError;
use crate::checked::{Checked, Found, HeaderChecked};
use crate::tier::{ChunkRef, ChunkTier};

/// The AZ cache fleet as a tier.
#[derive(Debug)]
pub struct AzTier {
    client: AzClient,
}

impl AzTier {
    /// A tier over the fleet `config` describes; a bad config is named.
    pub fn new(config: AzConfig) -> Result<Self, ReadError> {
        let client = AzClient::new(config).map_err(|e| ReadError::Config(e.to_string()))?;
        Ok(Self { client })
    }

    /// The client's counters, per node and overall.
    pub fn metrics(&self) -> AzMetrics {
        self.client.metrics()
    }
}

#[async_trait]
impl ChunkTier for AzTier {
    fn name(&self) -> &'static str {
        "az"
    }

    fn remote(&self) -> bool {
        true
    }

    async fn get(
        &self,
        chunk: &ChunkRef,
        _segment: SegmentIndex,
    ) -> Result<Option<Found>, ReadError> {
        let tier_error = |e: lode_az::AzError| ReadError::Tier {
            tier: "az",
            message: e.to_string(),
        };
        match chunk.format {
            // A v1 object can only be checked whole; the client does it.
            ChunkFormat::V1 => {
                let got = self
                    .client
                    .get_accepting(&chunk.name, Accept::full())
                    .await
                    .map_err(tier_error)?;
                got.map(|b| Checked::check("az", chunk, b).map(Found::Checked))
                    .transpose()
            }
            // A v2 object is taken once its header checks; the cache hashes each segment
            // before it uses or keeps it.
            ChunkFormat::V2 { .. } => {
                let accept = Accept::partial(|name, bytes| {
                    verify_header(name, bytes).is_ok_and(|h| bytes.len() as u64 == h.object_len())
                });
                let got = self
                    .client
                    .get_accepting(&chunk.name, accept)
                    .await
                    .map_err(tier_error)?;
                got.map(|b| HeaderChecked::check("az", chunk, b).map(Found::HeaderChecked))
                    .transpose()
            }
        }
    }

    async fn put(&self, chunk: &ChunkRef, object: &Checked) {
        // Best effort: a put that reaches fewer nodes shows in the client's metrics.
        let _ = self.client.put(&chunk.name, object.bytes().clone()).await;
    }

    async fn remove(&self, chunk: &ChunkRef) {
        self.client.remove(&chunk.name).await;
    }
}

/// The AZ client's counters in the Prometheus text format: per node (`node` label) and
/// for the tier as a whole.
pub fn az_prometheus(m: &AzMetrics) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let totals: [(&str, &str, u64); 12] = [
        ("gets", "Chunk lookups in the AZ cache.", m.gets),
        (
            "hits",
            "Lookups answered with a chunk that checked out.",
            m.hits,
        ),
        ("misses", "Lookups that went on to the origin.", m.misses),
        ("rebuilds", "Hits that needed parity stripes.", m.rebuilds),
        (
            "integrity_failures",
            "Rebuilt chunks that failed their name check.",
            m.integrity_failures,
        ),
        ("puts", "Chunks written to the AZ cache.", m.puts),
        (
            "incomplete_puts",
            "Writes that stored fewer than k+m stripes.",
            m.incomplete_puts,
        ),
        ("repairs", "Stripes written back by read repair.", m.repairs),
        (
            "stripe_requests",
            "Stripe requests sent by lookups.",
            m.stripe_requests,
        ),
        (
            "stripe_bytes",
            "Stripe bytes nodes returned to lookups.",
            m.stripe_bytes,
        ),
        (
            "hedges",
            "Stripe requests sent because others were late.",
            m.hedges,
        ),
        (
            "fallbacks",
            "Stripe requests sent because others failed or missed.",
            m.fallbacks,
        ),
    ];
    for (name, help, v) in totals {
        let _ = writeln!(out, "# HELP lode_az_{name}_total {help}");
        let _ = writeln!(out, "# TYPE lode_az_{name}_total counter");
        let _ = writeln!(out, "lode_az_{name}_total {v}");
    }
    type Field = fn(&lode_az::NodeMetrics) -> u64;
    let per_node: [(&str, &str, Field); 6] = [
        ("hits", "Valid stripes a node returned.", |n| n.hits),
        (
            "misses",
            "Stripe gets a node answered with no value.",
            |n| n.misses,
        ),
        ("timeouts", "Requests to a node that timed out.", |n| {
            n.timeouts
        }),
        ("errors", "Requests to a node that failed otherwise.", |n| {
            n.errors
        }),
        (
            "integrity_failures",
            "Invalid or wrong stripes from a node.",
            |n| n.integrity_failures,
        ),
        ("stores", "Stripes a node stored.", |n| n.stores),
    ];
    for (name, help, f) in per_node {
        let _ = writeln!(out, "# HELP lode_az_node_{name}_total {help}");
        let _ = writeln!(out, "# TYPE lode_az_node_{name}_total counter");
        for n in &m.nodes {
            let _ = writeln!(
                out,
                "lode_az_node_{name}_total{{node=\"{}\"}} {}",
                n.node,
                f(n)
            );
        }
    }
    let _ = writeln!(out, "# HELP lode_az_node_up Whether requests go to a node.");
    let _ = writeln!(out, "# TYPE lode_az_node_up gauge");
    for n in &m.nodes {
        let _ = writeln!(
            out,
            "lode_az_node_up{{node=\"{}\"}} {}",
            n.node,
            u8::from(n.up)
        );
    }
    out
}
