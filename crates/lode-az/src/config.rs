//! The AZ client's configuration, checked once in [`AzClient::new`](crate::AzClient::new):
//! a bad value fails there, naming the field.

use std::collections::HashSet;
use std::time::Duration;

use crate::error::AzError;
use crate::placement::PlacementKind;
use crate::proto::MAX_KEY_LEN;
use crate::stripe::{HEADER_LEN, MAX_STRIPES};

/// How the client reaches the AZ cache fleet and codes chunks for it.
#[derive(Clone, Debug, PartialEq)]
pub struct AzConfig {
    /// The cache nodes, `host:port` each. A node's address string is its identity for
    /// placement: every worker must list the same nodes the same way (in any order).
    pub nodes: Vec<String>,
    /// Data stripes per chunk: any `k` stripes rebuild it. Default 4.
    pub k: usize,
    /// Parity stripes per chunk: how many nodes may be lost or slow. Default 2.
    pub m: usize,
    /// The longest one request to one node may take, connecting and queueing for a
    /// connection included. Default 200 ms.
    pub node_timeout: Duration,
    /// Consecutive failures (timeouts, refused or broken connections, malformed
    /// replies) after which a node is marked down and skipped. Default 3.
    pub down_after: u32,
    /// How long a down node is skipped before a probe (`version`) checks whether it is
    /// back. Default 1 s.
    pub retry_down_after: Duration,
    /// The largest value read from or written to a node, stripe header included; must
    /// not exceed the nodes' item size limit (memcached `-I`, 1 MiB by default).
    /// Default 1 MiB.
    pub max_value: usize,
    /// Connections kept to each node, which is also how many requests may be in flight
    /// to it at once. Default 8.
    pub connections_per_node: usize,
    /// After a read that found stripes missing or bad on nodes that answered, write the
    /// right stripes back to those nodes (in the background). Default true.
    pub read_repair: bool,
    /// How chunks are placed on nodes: rendezvous hashing, or bounded loads over it
    /// (`placement.rs`). Every worker must use the same. Default rendezvous.
    pub placement: PlacementKind,
    /// Bounded placement's ε: no node holds more than `ceil((1 + ε) · mean)` stripe
    /// slots. From 0.01 to 10; every worker must use the same. Default 0.25.
    pub epsilon: f64,
    /// Which nodes a read asks, and when it asks more (`client.rs`). Default `p95`.
    pub hedge: Hedge,
}

/// Which nodes a read asks for stripes; `p95`, `off` or `all` in configuration files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hedge {
    /// The `k` nodes of the data stripes; one more node for each request that fails,
    /// misses, is invalid, or has not answered within the p95 of recent stripe
    /// latencies (all `k + m` at once until those are known).
    #[default]
    P95,
    /// The `k` nodes of the data stripes; one more node only for each request that
    /// fails, misses or is invalid.
    Off,
    /// All `k + m` nodes at once; done with the first `k` valid stripes.
    All,
}

impl Hedge {
    /// Its name in configuration: `p95`, `off` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            Hedge::P95 => "p95",
            Hedge::Off => "off",
            Hedge::All => "all",
        }
    }
}

impl std::fmt::Display for Hedge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Hedge {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "p95" => Ok(Hedge::P95),
            "off" => Ok(Hedge::Off),
            "all" => Ok(Hedge::All),
            _ => Err(format!(
                "unknown hedge {s:?}: expected \"p95\", \"off\" or \"all\""
            )),
        }
    }
}

impl Default for AzConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            k: 4,
            m: 2,
            node_timeout: Duration::from_millis(200),
            down_after: 3,
            retry_down_after: Duration::from_secs(1),
            max_value: 1 << 20,
            connections_per_node: 8,
            read_repair: true,
            placement: PlacementKind::Rendezvous,
            epsilon: 0.25,
            hedge: Hedge::P95,
        }
    }
}

impl AzConfig {
    /// The defaults, over `nodes`.
    pub fn new<I, S>(nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            nodes: nodes.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Checks every field; the first bad one is named in the error.
    pub fn validate(&self) -> Result<(), AzError> {
        let bad = |key: &str, message: String| {
            Err(AzError::Config {
                key: key.to_owned(),
                message,
            })
        };
        if self.nodes.is_empty() {
            return bad("nodes", "no cache nodes given".into());
        }
        let mut seen = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if let Err(why) = check_address(node) {
                return bad(&format!("nodes[{i}]"), format!("{node:?}: {why}"));
            }
            if !seen.insert(node.as_str()) {
                return bad(&format!("nodes[{i}]"), format!("{node:?} is listed twice"));
            }
        }
        if self.k == 0 {
            return bad("k", "must be at least 1 (got 0)".into());
        }
        let Some(total) = self.k.checked_add(self.m).filter(|t| *t <= MAX_STRIPES) else {
            return bad(
                "m",
                format!(
                    "k + m = {} + {} is over {MAX_STRIPES} stripes per chunk",
                    self.k, self.m
                ),
            );
        };
        if total > self.nodes.len() {
            return bad(
                "k",
                format!(
                    "k + m = {} + {} = {total} stripes need as many distinct nodes, but {} {} given",
                    self.k,
                    self.m,
                    self.nodes.len(),
                    if self.nodes.len() == 1 { "is" } else { "are" },
                ),
            );
        }
        if self.node_timeout.is_zero() {
            return bad("node_timeout", "must be more than zero".into());
        }
        if self.down_after == 0 {
            return bad("down_after", "must be at least 1 failure".into());
        }
        if self.retry_down_after.is_zero() {
            return bad("retry_down_after", "must be more than zero".into());
        }
        if self.max_value <= HEADER_LEN {
            return bad(
                "max_value",
                format!(
                    "{} bytes leaves no room after the {HEADER_LEN}-byte stripe header",
                    self.max_value
                ),
            );
        }
        if self.connections_per_node == 0 {
            return bad("connections_per_node", "must be at least 1".into());
        }
        if !(0.01..=10.0).contains(&self.epsilon) {
            return bad(
                "epsilon",
                format!("must be from 0.01 to 10 (got {})", self.epsilon),
            );
        }
        Ok(())
    }
}

/// `host:port`, with a non-empty host and a port from 1 to 65535, and nothing a
/// memcached key or a log line would choke on.
fn check_address(node: &str) -> Result<(), &'static str> {
    let Some((host, port)) = node.rsplit_once(':') else {
        return Err("not host:port");
    };
    if host.is_empty() || host == "[]" {
        return Err("no host");
    }
    if !node.bytes().all(|b| b.is_ascii_graphic()) || node.len() > MAX_KEY_LEN {
        return Err("not a printable address");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => Ok(()),
        _ => Err("the port is not a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(c: &AzConfig) -> String {
        c.validate().unwrap_err().to_string()
    }

    fn six() -> AzConfig {
        AzConfig::new((1..=6).map(|i| format!("127.0.0.1:{}", 11210 + i)))
    }

    #[test]
    fn defaults_are_valid() {
        six().validate().unwrap();
        let c = six();
        assert_eq!((c.k, c.m), (4, 2));
        assert_eq!(c.node_timeout, Duration::from_millis(200));
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            err(&AzConfig::default()),
            "AZ cache config `nodes`: no cache nodes given"
        );
        let mut c = six();
        c.k = 0;
        assert_eq!(err(&c), "AZ cache config `k`: must be at least 1 (got 0)");
        let mut c = six();
        c.m = 3;
        assert_eq!(
            err(&c),
            "AZ cache config `k`: k + m = 4 + 3 = 7 stripes need as many distinct nodes, \
             but 6 are given"
        );
        let mut c = six();
        c.m = usize::MAX;
        assert_eq!(
            err(&c),
            format!(
                "AZ cache config `m`: k + m = 4 + {} is over 255 stripes per chunk",
                usize::MAX
            )
        );
        let mut c = six();
        c.nodes[2] = "localhost".into();
        assert_eq!(
            err(&c),
            "AZ cache config `nodes[2]`: \"localhost\": not host:port"
        );
        let mut c = six();
        c.nodes[1] = "h:0".into();
        assert_eq!(
            err(&c),
            "AZ cache config `nodes[1]`: \"h:0\": the port is not a number from 1 to 65535"
        );
        let mut c = six();
        c.nodes[5] = c.nodes[0].clone();
        assert_eq!(
            err(&c),
            "AZ cache config `nodes[5]`: \"127.0.0.1:11211\" is listed twice"
        );
        let mut c = six();
        c.nodes[0] = "a b:1".into();
        assert!(err(&c).contains("not a printable address"));
        let mut c = six();
        c.node_timeout = Duration::ZERO;
        assert_eq!(
            err(&c),
            "AZ cache config `node_timeout`: must be more than zero"
        );
        let mut c = six();
        c.max_value = 48;
        assert_eq!(
            err(&c),
            "AZ cache config `max_value`: 48 bytes leaves no room after the 48-byte stripe header"
        );
        let mut c = six();
        c.connections_per_node = 0;
        assert!(err(&c).starts_with("AZ cache config `connections_per_node`"));
        let mut c = six();
        c.down_after = 0;
        assert!(err(&c).starts_with("AZ cache config `down_after`"));
        let mut c = six();
        c.epsilon = f64::NAN;
        assert_eq!(
            err(&c),
            "AZ cache config `epsilon`: must be from 0.01 to 10 (got NaN)"
        );
        c.epsilon = 0.0;
        assert!(err(&c).starts_with("AZ cache config `epsilon`"));
        assert_eq!("p95".parse::<Hedge>(), Ok(Hedge::P95));
        assert_eq!("all".parse::<Hedge>(), Ok(Hedge::All));
        assert_eq!(Hedge::Off.to_string().parse::<Hedge>(), Ok(Hedge::Off));
        assert_eq!(
            "fast".parse::<Hedge>(),
            Err("unknown hedge \"fast\": expected \"p95\", \"off\" or \"all\"".into())
        );
        let mut c = AzConfig::new(["[::1]:11211"]);
        (c.k, c.m) = (1, 0);
        c.validate().unwrap();
    }
}
