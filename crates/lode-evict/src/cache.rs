//! A byte-bounded map: values kept beside a [`Policy`] that decides which keys stay.

use std::collections::HashMap;

use crate::hash::KeyHash;
use std::fmt;
use std::hash::Hash;

use crate::{Policy, PolicyKind};

/// A map that holds at most `capacity` bytes of values, evicting as its policy says.
/// Each entry's size is given at insert.
pub struct Cache<K, V> {
    kind: PolicyKind,
    policy: Box<dyn Policy<K>>,
    values: HashMap<K, V, KeyHash>,
    evicted: Vec<K>,
}

impl<K, V> fmt::Debug for Cache<K, V>
where
    K: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("kind", &self.kind)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + fmt::Debug + 'static,
    V: Clone,
{
    /// An empty map under policy `kind`, bounded to `capacity` bytes.
    pub fn new(kind: PolicyKind, capacity: u64) -> Self {
        Self {
            kind,
            policy: kind.build(capacity),
            values: HashMap::with_hasher(KeyHash::new()),
            evicted: Vec::new(),
        }
    }

    /// The policy it evicts by.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// The bound in bytes.
    pub fn capacity(&self) -> u64 {
        self.policy.capacity()
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.policy.used()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The value under `key`, recording a read of it (hit or miss: some policies count
    /// misses too).
    pub fn get(&mut self, key: &K) -> Option<V> {
        if self.policy.touch(key) {
            self.values.get(key).cloned()
        } else {
            None
        }
    }

    /// Whether `key` is held (without recording a read).
    pub fn contains(&self, key: &K) -> bool {
        self.values.contains_key(key)
    }

    /// Inserts `value` of `size` bytes, replacing any value under `key` (returned as
    /// evicted), and returns what was evicted to make room. A value the policy does not
    /// keep (larger than the whole bound, or not admitted) is returned as evicted.
    pub fn insert(&mut self, key: K, value: V, size: u64) -> Vec<(K, V)> {
        let mut out = Vec::new();
        if let Some(old) = self.values.insert(key.clone(), value) {
            out.push((key.clone(), old));
        }
        self.policy.insert(key, size, &mut self.evicted);
        for k in self.evicted.drain(..) {
            if let Some(v) = self.values.remove(&k) {
                out.push((k, v));
            }
        }
        out
    }

    /// Removes and returns the value under `key`.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.policy.remove(key);
        self.values.remove(key)
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.policy.clear();
        self.values.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_by_its_policy_and_returns_values() {
        let mut c = Cache::new(PolicyKind::Lru, 30);
        assert!(c.insert(1, 'a', 10).is_empty());
        assert!(c.insert(2, 'b', 10).is_empty());
        assert!(c.insert(3, 'c', 10).is_empty());
        assert_eq!(c.get(&1), Some('a'));
        assert_eq!(c.insert(4, 'd', 10), vec![(2, 'b')]);
        assert_eq!(c.used(), 30);
        assert_eq!(c.insert(5, 'e', 31), vec![(5, 'e')]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.insert(4, 'D', 10), vec![(4, 'd')], "the replaced value");
        assert_eq!(c.get(&4), Some('D'));
        assert_eq!(c.remove(&1), Some('a'));
        assert_eq!(c.used(), 20);
        assert_eq!(c.kind(), PolicyKind::Lru);
    }
}
