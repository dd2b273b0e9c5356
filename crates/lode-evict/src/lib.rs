//! Eviction policies over keys with sizes, for byte-bounded caches.
//!
//! A [`Policy`] decides which keys a cache keeps; it holds keys and their sizes only, so
//! the same code ranks a worker's local tiers (through [`Cache`], which keeps the values
//! beside it) and the fleet simulator's millions of simulated caches (keys alone).
//! [`PolicyKind`] names a policy as configuration does; [`PolicyKind::build`] makes one.

mod lru;

use std::fmt;
use std::hash::Hash;
use std::str::FromStr;

pub use lru::Lru;

/// The keys an eviction policy ranks and sizes, and the order it evicts them in.
///
/// Sizes are bytes (or any unit the caller chooses, the same for every key and for the
/// capacity). A key larger than the whole capacity is never held.
pub trait Policy<K>: Send + fmt::Debug {
    /// Records a read of `key` and says whether it is held (a hit).
    fn touch(&mut self, key: &K) -> bool;

    /// Whether `key` is held, without recording a read.
    fn contains(&self, key: &K) -> bool;

    /// Admits `key` of `size`, replacing any entry under it, and pushes onto `evicted`
    /// every key that left to make room (the key itself when it was not admitted).
    fn insert(&mut self, key: K, size: u64, evicted: &mut Vec<K>);

    /// Drops `key`; says whether it was held.
    fn remove(&mut self, key: &K) -> bool;

    /// Drops everything.
    fn clear(&mut self);

    /// The bound.
    fn capacity(&self) -> u64;

    /// The sum of the sizes held.
    fn used(&self) -> u64;

    /// Keys held.
    fn len(&self) -> usize;

    /// Whether nothing is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A policy by name, as configuration and the command line give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
}

impl PolicyKind {
    /// Every policy, for studies that compare them.
    pub const ALL: &'static [PolicyKind] = &[PolicyKind::Lru];

    /// An empty policy of this kind bounded to `capacity`.
    pub fn build<K: Hash + Eq + Clone + Send + fmt::Debug + 'static>(
        self,
        capacity: u64,
    ) -> Box<dyn Policy<K>> {
        match self {
            PolicyKind::Lru => Box::new(Lru::new(capacity)),
        }
    }

    /// The name configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy {given:?}: expected one of {expected}")]
pub struct UnknownPolicy {
    /// What was given.
    pub given: String,
    /// The names accepted.
    pub expected: String,
}

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownPolicy {
                given: s.to_owned(),
                expected: PolicyKind::ALL
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}
