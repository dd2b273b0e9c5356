//! What a node is told at start: where to listen, how big each tier is, the item size
//! limit and the eviction policy. Checked once, in [`NodeConfig::tiers`], which
//! [`Node::start`](crate::Node::start) calls; a bad value is named in the error.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The memcached port.
pub const DEFAULT_PORT: u16 = 11211;
/// The default item (value) size limit: 1 MiB, as memcached's `-I` default.
pub const DEFAULT_ITEM_SIZE_LIMIT: usize = 1 << 20;
/// The smallest item size limit accepted (memcached's `-I` floor).
pub const MIN_ITEM_SIZE_LIMIT: usize = 1 << 10;
/// The largest item size limit accepted (memcached's `-I` ceiling).
pub const MAX_ITEM_SIZE_LIMIT: usize = 1 << 30;
/// The memory tier of a node without flash, unless `memory_bytes` says otherwise
/// (memcached's `-m` default).
pub const DEFAULT_MEMORY_ONLY_BYTES: u64 = 64 << 20;
/// The default flash tier size: 9 GiB, so with the default share the node holds 10 GiB.
pub const DEFAULT_FLASH_BYTES: u64 = 9 << 30;
/// The memory tier's default share of a node's capacity (memory + flash).
pub const DEFAULT_MEMORY_SHARE: f64 = 0.1;
/// memcached's `-c` default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The largest K accepted for [`Policy::LruK`].
pub const MAX_K: u8 = 8;

/// How a tier picks the item to evict (from memory: to demote to flash; from flash: to
/// drop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Least recently used: every read or write makes an item the newest.
    Lru,
    /// LRU-K (O'Neil, O'Neil and Weikum, SIGMOD'93): evict the item whose K-th most
    /// recent read is oldest; items read fewer than K times go first, oldest first.
    /// A one-pass scan reads each of its keys once, so it evicts only its own kind.
    LruK(u8),
}

impl Default for Policy {
    fn default() -> Self {
        Policy::LruK(2)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Lru => f.write_str("lru"),
            Policy::LruK(k) => write!(f, "lru-{k}"),
        }
    }
}

impl FromStr for Policy {
    type Err = Error;

    /// `lru`, `lru-k` (K = 2) or `lru-N` for N in 1..=8.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Config {
            field: "policy",
            reason: format!(
                "unknown policy {s:?}; expected lru, lru-k or lru-N (N in 1..={MAX_K})"
            ),
        };
        match s {
            "lru" => Ok(Policy::Lru),
            "lru-k" => Ok(Policy::LruK(2)),
            _ => {
                let k: u8 = s
                    .strip_prefix("lru-")
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                let policy = Policy::LruK(k);
                check_policy(policy)?;
                Ok(policy)
            }
        }
    }
}

/// Everything a node is configured with. Start from [`NodeConfig::default`] and set
/// what differs; [`Node::start`](crate::Node::start) checks it.
///
/// ```
/// use lode_cache_node::{NodeConfig, Policy};
/// let config = NodeConfig {
///     listen: "127.0.0.1:0".parse().unwrap(),
///     flash_dir: Some("/var/cache/lode-node".into()),
///     flash_bytes: 90 << 30,
///     ..NodeConfig::default()
/// };
/// // A tenth of the 100 GiB capacity is memory.
/// assert_eq!(config.tiers().unwrap().memory_bytes, 10 << 30);
/// assert_eq!(config.policy, Policy::LruK(2));
/// ```
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to listen on; port 0 picks a free port (see
    /// [`NodeHandle::local_addr`](crate::NodeHandle::local_addr)). Default
    /// `127.0.0.1:11211`.
    pub listen: SocketAddr,
    /// Bytes of the memory tier (keys, values and per-item overhead). `None` derives it:
    /// `memory_share` of the capacity with flash, [`DEFAULT_MEMORY_ONLY_BYTES`] without.
    pub memory_bytes: Option<u64>,
    /// Directory of the flash tier (created if missing; one file per item). `None` runs
    /// the node on memory alone, like memcached.
    pub flash_dir: Option<PathBuf>,
    /// Bytes of the flash tier (record headers, keys and values). Ignored without
    /// `flash_dir`.
    pub flash_bytes: u64,
    /// The largest value accepted, in bytes; larger ones get `SERVER_ERROR object too
    /// large for cache`. Default 1 MiB, from 1 KiB to 1 GiB.
    pub item_size_limit: usize,
    /// The memory tier's share of the node's capacity when `memory_bytes` is `None` and
    /// there is flash: memory = share × (memory + flash). Default 0.1.
    pub memory_share: f64,
    /// Eviction policy of both tiers. Default LRU-2.
    pub policy: Policy,
    /// Connections served at once; more are told `ERROR Too many open connections` and
    /// closed, as memcached does. Default 1024.
    pub max_connections: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT)),
            memory_bytes: None,
            flash_dir: None,
            flash_bytes: DEFAULT_FLASH_BYTES,
            item_size_limit: DEFAULT_ITEM_SIZE_LIMIT,
            memory_share: DEFAULT_MEMORY_SHARE,
            policy: Policy::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The tier sizes a configuration resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierSizes {
    /// Bytes of the memory tier.
    pub memory_bytes: u64,
    /// Bytes of the flash tier; 0 without `flash_dir`.
    pub flash_bytes: u64,
}

/// Bytes an item costs beyond its key and value: the index entry, its rank in the
/// eviction order and allocator slack. An estimate, like memcached's item header.
pub(crate) const ITEM_OVERHEAD: u64 = 96;

impl NodeConfig {
    /// Checks every field and resolves the tier sizes; the error names the first field
    /// at fault.
    pub fn tiers(&self) -> Result<TierSizes> {
        let share = self.memory_share;
        if !(share.is_finite() && share > 0.0 && share < 1.0) {
            return Err(Error::Config {
                field: "memory_share",
                reason: format!("must be greater than 0 and less than 1, got {share}"),
            });
        }
        if !(MIN_ITEM_SIZE_LIMIT..=MAX_ITEM_SIZE_LIMIT).contains(&self.item_size_limit) {
            return Err(Error::Config {
                field: "item_size_limit",
                reason: format!(
                    "must be from {MIN_ITEM_SIZE_LIMIT} to {MAX_ITEM_SIZE_LIMIT} bytes, got {}",
                    self.item_size_limit
                ),
            });
        }
        check_policy(self.policy)?;
        if self.max_connections == 0 {
            return Err(Error::Config {
                field: "max_connections",
                reason: "must be at least 1".into(),
            });
        }
        // The largest item must fit in each tier on its own.
        let largest = item_cost(crate::protocol::MAX_KEY_LEN, self.item_size_limit);
        let flash_bytes = if self.flash_dir.is_some() {
            if self.flash_bytes < largest {
                return Err(Error::Config {
                    field: "flash_bytes",
                    reason: format!(
                        "must hold at least one item of item_size_limit ({largest} bytes), got {}",
                        self.flash_bytes
                    ),
                });
            }
            self.flash_bytes
        } else {
            0
        };
        let memory_bytes = match (self.memory_bytes, self.flash_dir.is_some()) {
            (Some(bytes), _) => bytes,
            (None, false) => DEFAULT_MEMORY_ONLY_BYTES,
            (None, true) => share_of(flash_bytes, share),
        };
        if memory_bytes < largest {
            return Err(Error::Config {
                field: "memory_bytes",
                reason: format!(
                    "must hold at least one item of item_size_limit ({largest} bytes), got \
                     {memory_bytes}{}",
                    if self.memory_bytes.is_none() {
                        " (derived from memory_share)"
                    } else {
                        ""
                    }
                ),
            });
        }
        Ok(TierSizes {
            memory_bytes,
            flash_bytes,
        })
    }
}

fn check_policy(policy: Policy) -> Result<()> {
    match policy {
        Policy::LruK(k) if !(1..=MAX_K).contains(&k) => Err(Error::Config {
            field: "policy",
            reason: format!("LRU-K needs K from 1 to {MAX_K}, got {k}"),
        }),
        _ => Ok(()),
    }
}

/// Memory bytes that make `share` of the capacity when flash holds `flash_bytes`.
fn share_of(flash_bytes: u64, share: f64) -> u64 {
    let bytes = (flash_bytes as f64 * share / (1.0 - share)).round();
    // In range by the check: 0 < share < 1 keeps it finite and non-negative; a value
    // past u64::MAX saturates, which `as` does for floats.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bytes = bytes as u64;
    bytes
}

/// What an item costs in a tier's budget.
pub(crate) fn item_cost(key_len: usize, value_len: usize) -> u64 {
    (key_len as u64)
        .saturating_add(value_len as u64)
        .saturating_add(ITEM_OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_memory_only_node_with_memcached_sizes() {
        let tiers = NodeConfig::default().tiers().unwrap();
        assert_eq!(tiers.memory_bytes, 64 << 20);
        assert_eq!(tiers.flash_bytes, 0);
        assert_eq!(NodeConfig::default().item_size_limit, 1 << 20);
    }

    #[test]
    fn memory_is_a_tenth_of_capacity_with_flash() {
        let config = NodeConfig {
            flash_dir: Some("/nonexistent".into()),
            ..NodeConfig::default()
        };
        let tiers = config.tiers().unwrap();
        assert_eq!(tiers.flash_bytes, 9 << 30);
        assert_eq!(tiers.memory_bytes, 1 << 30);
    }

    #[test]
    fn errors_name_the_field() {
        let bad = NodeConfig {
            memory_share: 1.5,
            ..NodeConfig::default()
        };
        assert_eq!(
            bad.tiers().unwrap_err().to_string(),
            "cache node config: memory_share: must be greater than 0 and less than 1, got 1.5"
        );
        let bad = NodeConfig {
            item_size_limit: 10,
            ..NodeConfig::default()
        };
        assert_eq!(
            bad.tiers().unwrap_err().to_string(),
            "cache node config: item_size_limit: must be from 1024 to 1073741824 bytes, got 10"
        );
        let bad = NodeConfig {
            memory_bytes: Some(1000),
            ..NodeConfig::default()
        };
        assert!(
            bad.tiers()
                .unwrap_err()
                .to_string()
                .starts_with("cache node config: memory_bytes: must hold at least one item")
        );
        let bad = NodeConfig {
            flash_dir: Some("/x".into()),
            flash_bytes: 5,
            ..NodeConfig::default()
        };
        assert!(
            bad.tiers()
                .unwrap_err()
                .to_string()
                .starts_with("cache node config: flash_bytes:")
        );
        let bad = NodeConfig {
            policy: Policy::LruK(0),
            ..NodeConfig::default()
        };
        assert_eq!(
            bad.tiers().unwrap_err().to_string(),
            "cache node config: policy: LRU-K needs K from 1 to 8, got 0"
        );
    }

    #[test]
    fn policies_parse_and_print() {
        assert_eq!("lru".parse::<Policy>().unwrap(), Policy::Lru);
        assert_eq!("lru-k".parse::<Policy>().unwrap(), Policy::LruK(2));
        assert_eq!("lru-3".parse::<Policy>().unwrap(), Policy::LruK(3));
        assert_eq!(Policy::LruK(2).to_string(), "lru-2");
        assert!("lru-9".parse::<Policy>().is_err());
        assert!(
            "fifo"
                .parse::<Policy>()
                .unwrap_err()
                .to_string()
                .contains("unknown policy \"fifo\"")
        );
    }
}
