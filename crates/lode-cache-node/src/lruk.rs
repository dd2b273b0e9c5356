//! Eviction order: each item's access history and the rank it gives the item in its
//! tier, and the per-tier index from rank to key.
//!
//! Time is a logical clock: one tick per access, so no two accesses share a tick and a
//! rank names one item. Under LRU-K the references are reads (get hits); a write makes
//! an item resident but is not a reference, so a scan that writes or reads each of its
//! keys once stays among the items "seen fewer than K times", which are evicted first
//! (oldest last access first). Items read K times or more are ranked by the tick of
//! their K-th most recent read: the oldest goes first. Under LRU every read and write
//! simply moves the item to the new end.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::config::{MAX_K, Policy};

/// An item's place in its tier's eviction order: the smallest is evicted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rank {
    /// 0 while read fewer than K times (and always under LRU), 1 after.
    class: u8,
    tick: u64,
}

/// The last accesses of one item.
#[derive(Debug, Clone)]
pub(crate) struct History {
    /// The last read or write.
    last_touch: u64,
    /// Reads so far, saturating at K (all that matters).
    reads: u8,
    /// The ticks of the last `MAX_K` reads, newest first.
    recent: [u64; MAX_K as usize],
}

impl History {
    /// A history whose only access is a write at `tick`.
    pub(crate) fn new(tick: u64) -> Self {
        History {
            last_touch: tick,
            reads: 0,
            recent: [0; MAX_K as usize],
        }
    }

    /// A read at `tick`.
    pub(crate) fn read(&mut self, tick: u64) {
        self.recent.copy_within(..MAX_K as usize - 1, 1);
        self.recent[0] = tick;
        self.reads = self.reads.saturating_add(1).min(MAX_K);
        self.last_touch = tick;
    }

    /// A write at `tick`.
    pub(crate) fn write(&mut self, tick: u64) {
        self.last_touch = tick;
    }

    /// The rank this history gives under `policy`.
    pub(crate) fn rank(&self, policy: Policy) -> Rank {
        match policy {
            Policy::Lru => Rank {
                class: 0,
                tick: self.last_touch,
            },
            Policy::LruK(k) if self.reads < k => Rank {
                class: 0,
                tick: self.last_touch,
            },
            Policy::LruK(k) => Rank {
                class: 1,
                tick: self.recent[usize::from(k) - 1],
            },
        }
    }
}

/// One tier's items by rank.
#[derive(Debug, Default)]
pub(crate) struct RankIndex {
    by_rank: BTreeMap<Rank, Bytes>,
}

impl RankIndex {
    pub(crate) fn insert(&mut self, rank: Rank, key: Bytes) {
        let previous = self.by_rank.insert(rank, key);
        debug_assert!(previous.is_none(), "two items share rank {rank:?}");
    }

    pub(crate) fn remove(&mut self, rank: Rank) {
        let removed = self.by_rank.remove(&rank);
        debug_assert!(removed.is_some(), "no item at rank {rank:?}");
    }

    /// The item to evict first.
    pub(crate) fn victim(&self) -> Option<(Rank, &Bytes)> {
        self.by_rank.first_key_value().map(|(r, k)| (*r, k))
    }

    /// The item to evict first other than `protect`.
    pub(crate) fn victim_except(&self, protect: Option<&Bytes>) -> Option<(Rank, &Bytes)> {
        self.by_rank
            .iter()
            .find(|(_, k)| Some(*k) != protect)
            .map(|(r, k)| (*r, k))
    }

    pub(crate) fn clear(&mut self) {
        self.by_rank.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_rank.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays accesses against a tier of `capacity` items under `policy`; returns the
    /// keys resident at the end. `Some(key)` reads (inserting on a miss), `None`
    /// separates nothing; reads and writes are both listed as (key, is_read).
    fn simulate(policy: Policy, capacity: usize, accesses: &[(&str, bool)]) -> Vec<String> {
        let mut tick = 0;
        let mut items: std::collections::HashMap<String, History> = Default::default();
        let mut index = RankIndex::default();
        for (key, is_read) in accesses {
            tick += 1;
            let kb = Bytes::copy_from_slice(key.as_bytes());
            match items.get_mut(*key) {
                Some(h) => {
                    index.remove(h.rank(policy));
                    if *is_read {
                        h.read(tick)
                    } else {
                        h.write(tick)
                    }
                    index.insert(h.rank(policy), kb);
                }
                None => {
                    let mut h = History::new(tick);
                    if *is_read {
                        h.read(tick);
                    }
                    index.insert(h.rank(policy), kb);
                    items.insert((*key).to_string(), h);
                }
            }
            while items.len() > capacity {
                let (rank, victim) = index.victim().unwrap();
                let victim = String::from_utf8(victim.to_vec()).unwrap();
                index.remove(rank);
                items.remove(&victim);
            }
        }
        assert_eq!(index.len(), items.len());
        let mut keys: Vec<String> = items.into_keys().collect();
        keys.sort();
        keys
    }

    fn hot_then_scan() -> Vec<(&'static str, bool)> {
        let mut accesses = Vec::new();
        for round in 0..3 {
            for key in ["h1", "h2", "h3"] {
                // Round 0 writes the hot keys; then they are read twice.
                accesses.push((key, round > 0));
            }
        }
        let scan: &'static [&'static str] = &["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"];
        for key in scan {
            accesses.push((key, false));
            accesses.push((key, true));
        }
        accesses
    }

    #[test]
    fn lru_k_keeps_the_hot_set_through_a_scan() {
        let resident = simulate(Policy::LruK(2), 4, &hot_then_scan());
        assert_eq!(resident, ["h1", "h2", "h3", "s8"]);
    }

    #[test]
    fn lru_loses_the_hot_set_to_a_scan() {
        let resident = simulate(Policy::Lru, 4, &hot_then_scan());
        assert_eq!(resident, ["s5", "s6", "s7", "s8"]);
    }

    #[test]
    fn lru_k_orders_by_kth_most_recent_read() {
        // a: reads at 2 and 5; b: reads at 3 and 4. LRU-2 ranks by the second most
        // recent read: a (2) before b (3), though a was read last.
        let mut a = History::new(1);
        let mut b = History::new(1);
        a.read(2);
        b.read(3);
        b.read(4);
        a.read(5);
        assert!(a.rank(Policy::LruK(2)) < b.rank(Policy::LruK(2)));
        assert!(a.rank(Policy::Lru) > b.rank(Policy::Lru));
        // Read once: below any item read twice, whatever the recency.
        let mut c = History::new(9);
        c.read(10);
        assert!(c.rank(Policy::LruK(2)) < a.rank(Policy::LruK(2)));
    }
}
