//! What a node counts, as a Rust snapshot ([`Stats`]) and as memcached's `stats`
//! lines. The standard names keep memcached's meaning where lode has the same thing
//! (`curr_items`, `bytes` and `limit_maxbytes` cover both tiers); lode's own figures
//! are prefixed `memory_` and `flash_` per tier.

use std::fmt::Write as _;

use crate::store::{StoreSnapshot, TierSnapshot};

/// One tier's figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TierStats {
    /// Lookups answered by this tier.
    pub hits: u64,
    /// Lookups that reached this tier and did not find the item here (for memory: every
    /// lookup not answered from memory; for flash: lookups of keys held nowhere).
    pub misses: u64,
    /// Items held.
    pub items: u64,
    /// Bytes held (keys, values and per-item overhead in memory; record headers, keys
    /// and values on flash).
    pub bytes: u64,
    /// The tier's budget in bytes.
    pub limit_bytes: u64,
    /// Items dropped from this tier for space and lost to the node (memory: only when
    /// they could not be demoted; flash: always).
    pub evictions: u64,
    /// Items moved from memory to flash (the same count in both tiers).
    pub demotions: u64,
    /// Items moved from flash to memory (the same count in both tiers).
    pub promotions: u64,
}

impl TierStats {
    fn from_snapshot(t: &TierSnapshot) -> Self {
        TierStats {
            hits: t.counters.hits,
            misses: t.counters.misses,
            items: t.items,
            bytes: t.bytes,
            limit_bytes: t.limit,
            evictions: t.counters.evictions,
            demotions: t.counters.demotions,
            promotions: t.counters.promotions,
        }
    }
}

/// A node's figures at one moment, as [`NodeHandle::stats`](crate::NodeHandle::stats)
/// returns them and the `stats` command prints them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    /// The node's process id.
    pub pid: u32,
    /// Seconds since the node started.
    pub uptime: u64,
    /// Unix time now.
    pub time: u64,
    /// The version string `version` answers.
    pub version: String,
    /// The eviction policy, as [`Policy`](crate::Policy) prints it.
    pub policy: String,
    /// `max_connections` from the config.
    pub max_connections: u64,
    /// Connections open now.
    pub curr_connections: u64,
    /// Connections accepted since start.
    pub total_connections: u64,
    /// Connections refused for `max_connections`.
    pub rejected_connections: u64,
    /// Keys looked up by `get`, `gets`, `gat`, `gats`.
    pub cmd_get: u64,
    /// Storage commands.
    pub cmd_set: u64,
    /// `flush_all` commands.
    pub cmd_flush: u64,
    /// `touch`, `gat` and `gats` keys.
    pub cmd_touch: u64,
    /// Keys found.
    pub get_hits: u64,
    /// Keys not found.
    pub get_misses: u64,
    /// Keys found expired (and counted in `get_misses`).
    pub get_expired: u64,
    /// `delete` of a present key.
    pub delete_hits: u64,
    /// `delete` of an absent key.
    pub delete_misses: u64,
    /// `incr` of a present key.
    pub incr_hits: u64,
    /// `incr` of an absent key.
    pub incr_misses: u64,
    /// `decr` of a present key.
    pub decr_hits: u64,
    /// `decr` of an absent key.
    pub decr_misses: u64,
    /// `cas` that stored.
    pub cas_hits: u64,
    /// `cas` of an absent key.
    pub cas_misses: u64,
    /// `cas` with a stale unique.
    pub cas_badval: u64,
    /// `touch` of a present key.
    pub touch_hits: u64,
    /// `touch` of an absent key.
    pub touch_misses: u64,
    /// Storage commands refused for the item size limit.
    pub store_too_large: u64,
    /// Bytes read from clients.
    pub bytes_read: u64,
    /// Bytes written to clients.
    pub bytes_written: u64,
    /// Bytes the node may hold: memory plus flash.
    pub limit_maxbytes: u64,
    /// The item size limit.
    pub item_size_max: u64,
    /// Items held, both tiers.
    pub curr_items: u64,
    /// Items stored since start.
    pub total_items: u64,
    /// Bytes held, both tiers.
    pub bytes: u64,
    /// Items lost to the node for space (memory drops plus flash evictions).
    pub evictions: u64,
    /// Expired items whose space was taken back.
    pub reclaimed: u64,
    /// The memory tier.
    pub memory: TierStats,
    /// The flash tier (all zero without `flash_dir`).
    pub flash: TierStats,
    /// Bytes demoted but not yet written to flash.
    pub flash_pending_bytes: u64,
    /// Memory victims dropped rather than demoted because flash held only
    /// better-ranked items (demoting would have evicted something hotter).
    pub demotions_skipped: u64,
    /// Flash writes that failed (the item is dropped).
    pub flash_write_errors: u64,
    /// Flash reads that failed with an I/O error (the item is dropped).
    pub flash_read_errors: u64,
    /// Flash records that failed their checksums or vanished (the item is dropped; a
    /// wrong byte is never served).
    pub flash_corrupt: u64,
    /// Items found on flash at start.
    pub flash_restored: u64,
    /// The last flash read or write failure, with the record it was about.
    pub flash_last_error: Option<String>,
}

/// Connection-level figures the server counts.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ConnCounters {
    pub(crate) curr_connections: u64,
    pub(crate) total_connections: u64,
    pub(crate) rejected_connections: u64,
    pub(crate) bytes_read: u64,
    pub(crate) bytes_written: u64,
    pub(crate) store_too_large: u64,
}

/// The node-wide facts a snapshot needs besides the counters.
#[derive(Debug, Clone)]
pub(crate) struct NodeFacts {
    pub(crate) uptime: u64,
    pub(crate) time: u64,
    pub(crate) version: String,
    pub(crate) policy: String,
    pub(crate) max_connections: u64,
    pub(crate) item_size_max: u64,
}

impl Stats {
    pub(crate) fn assemble(facts: NodeFacts, conn: ConnCounters, store: &StoreSnapshot) -> Self {
        let c = &store.counters;
        let memory = TierStats::from_snapshot(&store.memory);
        let flash = TierStats::from_snapshot(&store.flash);
        Stats {
            pid: std::process::id(),
            uptime: facts.uptime,
            time: facts.time,
            version: facts.version,
            policy: facts.policy,
            max_connections: facts.max_connections,
            curr_connections: conn.curr_connections,
            total_connections: conn.total_connections,
            rejected_connections: conn.rejected_connections,
            cmd_get: c.cmd_get,
            cmd_set: c.cmd_set,
            cmd_flush: c.cmd_flush,
            cmd_touch: c.cmd_touch,
            get_hits: c.get_hits,
            get_misses: c.get_misses,
            get_expired: c.get_expired,
            delete_hits: c.delete_hits,
            delete_misses: c.delete_misses,
            incr_hits: c.incr_hits,
            incr_misses: c.incr_misses,
            decr_hits: c.decr_hits,
            decr_misses: c.decr_misses,
            cas_hits: c.cas_hits,
            cas_misses: c.cas_misses,
            cas_badval: c.cas_badval,
            touch_hits: c.touch_hits,
            touch_misses: c.touch_misses,
            store_too_large: conn.store_too_large,
            bytes_read: conn.bytes_read,
            bytes_written: conn.bytes_written,
            limit_maxbytes: memory.limit_bytes + flash.limit_bytes,
            item_size_max: facts.item_size_max,
            curr_items: memory.items + flash.items,
            total_items: c.total_items,
            bytes: memory.bytes + flash.bytes,
            evictions: c.evictions,
            reclaimed: c.reclaimed,
            memory,
            flash,
            flash_pending_bytes: store.flash_pending_bytes,
            demotions_skipped: c.demotions_skipped,
            flash_write_errors: c.flash_write_errors,
            flash_read_errors: c.flash_read_errors,
            flash_corrupt: c.flash_corrupt,
            flash_restored: store.flash_restored,
            flash_last_error: store.flash_last_error.clone(),
        }
    }

    /// The `(name, value)` pairs of the `stats` command, in order.
    pub fn lines(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::with_capacity(80);
        let mut put = |name: &str, value: String| out.push((name.to_string(), value));
        put("pid", self.pid.to_string());
        put("uptime", self.uptime.to_string());
        put("time", self.time.to_string());
        put("version", self.version.clone());
        put("pointer_size", (usize::BITS).to_string());
        put("max_connections", self.max_connections.to_string());
        put("curr_connections", self.curr_connections.to_string());
        put("total_connections", self.total_connections.to_string());
        put(
            "rejected_connections",
            self.rejected_connections.to_string(),
        );
        for (name, v) in [
            ("cmd_get", self.cmd_get),
            ("cmd_set", self.cmd_set),
            ("cmd_flush", self.cmd_flush),
            ("cmd_touch", self.cmd_touch),
            ("get_hits", self.get_hits),
            ("get_misses", self.get_misses),
            ("get_expired", self.get_expired),
            ("delete_misses", self.delete_misses),
            ("delete_hits", self.delete_hits),
            ("incr_misses", self.incr_misses),
            ("incr_hits", self.incr_hits),
            ("decr_misses", self.decr_misses),
            ("decr_hits", self.decr_hits),
            ("cas_misses", self.cas_misses),
            ("cas_hits", self.cas_hits),
            ("cas_badval", self.cas_badval),
            ("touch_hits", self.touch_hits),
            ("touch_misses", self.touch_misses),
            ("store_too_large", self.store_too_large),
            ("bytes_read", self.bytes_read),
            ("bytes_written", self.bytes_written),
            ("limit_maxbytes", self.limit_maxbytes),
            ("item_size_max", self.item_size_max),
            ("bytes", self.bytes),
            ("curr_items", self.curr_items),
            ("total_items", self.total_items),
            ("evictions", self.evictions),
            ("reclaimed", self.reclaimed),
        ] {
            put(name, v.to_string());
        }
        put("lode_policy", self.policy.clone());
        for (tier, t) in [("memory", &self.memory), ("flash", &self.flash)] {
            for (name, v) in [
                ("hits", t.hits),
                ("misses", t.misses),
                ("items", t.items),
                ("bytes", t.bytes),
                ("limit_maxbytes", t.limit_bytes),
                ("evictions", t.evictions),
                ("demotions", t.demotions),
                ("promotions", t.promotions),
            ] {
                put(&format!("{tier}_{name}"), v.to_string());
            }
        }
        for (name, v) in [
            ("flash_pending_bytes", self.flash_pending_bytes),
            ("flash_demotions_skipped", self.demotions_skipped),
            ("flash_write_errors", self.flash_write_errors),
            ("flash_read_errors", self.flash_read_errors),
            ("flash_corrupt", self.flash_corrupt),
            ("flash_restored", self.flash_restored),
        ] {
            put(name, v.to_string());
        }
        out
    }

    /// The `stats` answer: `STAT name value` lines and `END`.
    pub(crate) fn render(&self) -> String {
        let mut text = String::with_capacity(4096);
        for (name, value) in self.lines() {
            let _ = write!(text, "STAT {name} {value}\r\n");
        }
        text.push_str("END\r\n");
        text
    }
}
