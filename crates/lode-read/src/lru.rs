//! A byte-bounded LRU map, the eviction policy of every local tier.
//!
//! Plain LRU: a recency tick per entry and a `BTreeMap` from tick to key, so a touch
//! and an eviction are O(log n). Scan resistance (LRU-K) is kept for the AZ cache
//! nodes, which many workers share; a worker's own cache serves one worker's images,
//! where recency is a fair guess.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// A map that holds at most `capacity` bytes of values, evicting the least recently
/// used entries first. Each entry's size is given at insert.
#[derive(Debug)]
pub struct Lru<K, V> {
    capacity: u64,
    used: u64,
    tick: u64,
    entries: HashMap<K, (V, u64, u64)>,
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    /// An empty map bounded to `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The bound in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The value under `key`, marking it most recently used.
    pub fn get(&mut self, key: &K) -> Option<V> {
        let tick = self.next_tick();
        let (value, _, t) = self.entries.get_mut(key)?;
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, key.clone());
        Some(value.clone())
    }

    /// Whether `key` is held (without touching it).
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Inserts `value` of `size` bytes, replacing any value under `key`, and returns what
    /// was evicted to make room. A value larger than the whole bound is not kept: it is
    /// returned as evicted.
    pub fn insert(&mut self, key: K, value: V, size: u64) -> Vec<(K, V)> {
        let mut evicted = Vec::new();
        if let Some(old) = self.remove(&key) {
            evicted.push((key.clone(), old));
        }
        if size > self.capacity {
            evicted.push((key, value));
            return evicted;
        }
        while self.used + size > self.capacity {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some((v, s, _)) = self.entries.remove(&victim) {
                self.used -= s;
                evicted.push((victim, v));
            }
        }
        let tick = self.next_tick();
        self.order.insert(tick, key.clone());
        self.entries.insert(key, (value, size, tick));
        self.used += size;
        evicted
    }

    /// Removes and returns the value under `key`.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (v, s, t) = self.entries.remove(key)?;
        self.order.remove(&t);
        self.used -= s;
        Some(v)
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn evicts_least_recently_used_first() {
        let mut l = Lru::new(30);
        assert!(l.insert(1, 'a', 10).is_empty());
        assert!(l.insert(2, 'b', 10).is_empty());
        assert!(l.insert(3, 'c', 10).is_empty());
        assert_eq!(l.get(&1), Some('a'));
        assert_eq!(l.insert(4, 'd', 10), vec![(2, 'b')]);
        assert_eq!(l.used(), 30);
        assert_eq!(l.insert(5, 'e', 31), vec![(5, 'e')]);
        assert_eq!(l.len(), 3);
        assert_eq!(l.remove(&1), Some('a'));
        assert_eq!(l.used(), 20);
    }

    proptest! {
        #[test]
        fn never_exceeds_its_bound(ops in proptest::collection::vec((0u8..16, 0u64..40, any::<bool>()), 0..200)) {
            let mut l = Lru::new(100);
            for (k, size, get) in ops {
                if get {
                    l.get(&k);
                } else {
                    l.insert(k, size, size);
                }
                prop_assert!(l.used() <= l.capacity());
                let sum: u64 = l.entries.values().map(|(_, s, _)| *s).sum();
                prop_assert_eq!(sum, l.used());
                prop_assert_eq!(l.order.len(), l.entries.len());
            }
        }
    }
}
