//! S3-FIFO: three FIFO queues (Yang, Zhang, Qiu, Yue, Vinayak, "FIFO queues are all you
//! need for cache eviction", SOSP 2023).
//!
//! Most keys of a skewed stream are read once and never again; S3-FIFO sends them out
//! quickly through a small FIFO and keeps the rest in a large one, with no list moves on
//! a hit (a hit only bumps a 2-bit counter), so reads are cheap.
//!
//! - **small** (10% of the capacity): where a new key enters.
//! - **main** (the other 90%): keys read again while in small, and keys the ghost
//!   remembers.
//! - **ghost**: the keys (no values, held by no one) recently evicted from small, bounded to
//!   main's share of bytes, as the paper sizes it like main.
//!
//! A hit adds one to the key's frequency, saturating at 3. To make room: while small
//! holds at least its share (or main is empty), small's oldest key moves to main if it
//! was read since it entered (frequency ≥ 1; the paper's listing asks for more than one
//! read, its text for one: here an insert is not a read, so one hit after the miss that
//! inserted it is a re-reference), else it leaves into the ghost; main is FIFO with
//! reinsertion: its oldest key with a frequency above 0 goes back to the front with one
//! less, the first with 0 leaves. A new key the ghost remembers goes straight to main.
//! Sizes are bytes: eviction runs until the new key fits, and a key larger than small's
//! share goes to main directly. Every operation is O(1) amortised (a reinsertion spends
//! a frequency unit that a hit paid for).

use std::collections::HashMap;

use crate::hash::KeyHash;
use std::fmt;
use std::hash::Hash;

use crate::Policy;
use crate::list::{Linked, List, NIL, Slab};

/// Hits that make a key in small move to main rather than leave.
const MOVE_TO_MAIN: u8 = 1;
/// The most a frequency counts (2 bits).
const MAX_FREQ: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
    Ghost,
}

#[derive(Debug)]
struct Node<K> {
    key: K,
    size: u64,
    prev: u32,
    next: u32,
    freq: u8,
    queue: Queue,
}

impl<K> Linked for Node<K> {
    fn prev(&self) -> u32 {
        self.prev
    }
    fn next(&self) -> u32 {
        self.next
    }
    fn set_links(&mut self, prev: u32, next: u32) {
        self.prev = prev;
        self.next = next;
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// Small, main and ghost FIFO queues.
pub struct S3Fifo<K> {
    capacity: u64,
    small_share: u64,
    main_share: u64,
    index: HashMap<K, u32, KeyHash>,
    slab: Slab<Node<K>>,
    small: List,
    main: List,
    ghost: List,
}

impl<K> fmt::Debug for S3Fifo<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Fifo")
            .field("capacity", &self.capacity)
            .field("small", &(self.small.len(), self.small.bytes()))
            .field("main", &(self.main.len(), self.main.bytes()))
            .field("ghost", &self.ghost.len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> S3Fifo<K> {
    /// An empty cache bounded to `capacity`: 10% small, 90% main.
    pub fn new(capacity: u64) -> Self {
        let small_share = capacity / 10;
        Self {
            capacity,
            small_share,
            main_share: capacity - small_share,
            index: HashMap::with_hasher(KeyHash::new()),
            slab: Slab::new(),
            small: List::default(),
            main: List::default(),
            ghost: List::default(),
        }
    }

    fn list(&mut self, q: Queue) -> &mut List {
        match q {
            Queue::Small => &mut self.small,
            Queue::Main => &mut self.main,
            Queue::Ghost => &mut self.ghost,
        }
    }

    fn unlink(&mut self, i: u32) {
        let q = self.slab[i].queue;
        let mut list = *self.list(q);
        list.unlink(self.slab.nodes(), i);
        *self.list(q) = list;
    }

    fn push(&mut self, q: Queue, i: u32) {
        self.slab[i].queue = q;
        let mut list = *self.list(q);
        list.push_front(self.slab.nodes(), i);
        *self.list(q) = list;
    }

    /// Forgets node `i` entirely (held or ghost).
    fn drop_node(&mut self, i: u32) -> K {
        self.unlink(i);
        self.slab.release(i);
        let key = self.slab[i].key.clone();
        self.index.remove(&key);
        key
    }

    fn held(&self) -> usize {
        self.small.len() + self.main.len()
    }

    fn trim_ghost(&mut self) {
        // Bytes bound it as the paper does; the count bound keeps zero-sized keys from
        // growing it without end.
        while self.ghost.bytes() > self.main_share || self.ghost.len() > self.held().max(1) {
            let Some(t) = self.ghost.back() else { break };
            self.drop_node(t);
        }
    }

    /// Evicts from small; says whether a key left (rather than all moving to main).
    fn evict_small(&mut self, evicted: &mut Vec<K>) -> bool {
        while let Some(t) = self.small.back() {
            self.unlink(t);
            if self.slab[t].freq >= MOVE_TO_MAIN {
                self.push(Queue::Main, t);
                if self.main.bytes() > self.main_share {
                    self.evict_main(evicted);
                    return true;
                }
            } else {
                self.push(Queue::Ghost, t);
                evicted.push(self.slab[t].key.clone());
                self.trim_ghost();
                return true;
            }
        }
        false
    }

    fn evict_main(&mut self, evicted: &mut Vec<K>) {
        while let Some(t) = self.main.back() {
            if self.slab[t].freq > 0 {
                self.slab[t].freq -= 1;
                self.unlink(t);
                self.push(Queue::Main, t);
            } else {
                evicted.push(self.drop_node(t));
                return;
            }
        }
    }

    fn evict_one(&mut self, evicted: &mut Vec<K>) {
        if self.small.len() > 0
            && (self.small.bytes() >= self.small_share || self.main.len() == 0)
            && self.evict_small(evicted)
        {
            return;
        }
        self.evict_main(evicted);
    }

    fn make_room(&mut self, incoming: u64, evicted: &mut Vec<K>) {
        while self.small.bytes() + self.main.bytes() + incoming > self.capacity && self.held() > 0 {
            self.evict_one(evicted);
        }
    }
}

impl<K: Hash + Eq + Clone + Send + fmt::Debug> Policy<K> for S3Fifo<K> {
    fn touch(&mut self, key: &K) -> bool {
        match self.index.get(key) {
            Some(&i) if self.slab[i].queue != Queue::Ghost => {
                let n = &mut self.slab[i];
                n.freq = (n.freq + 1).min(MAX_FREQ);
                true
            }
            _ => false,
        }
    }

    fn contains(&self, key: &K) -> bool {
        self.index
            .get(key)
            .is_some_and(|&i| self.slab[i].queue != Queue::Ghost)
    }

    fn insert(&mut self, key: K, size: u64, evicted: &mut Vec<K>) {
        let mut remembered = false;
        if let Some(&i) = self.index.get(&key) {
            let q = self.slab[i].queue;
            if q == Queue::Ghost {
                self.drop_node(i);
                remembered = true;
            } else if size > self.capacity {
                evicted.push(self.drop_node(i));
                return;
            } else {
                // Replaced in place: it keeps its queue and frequency.
                let old = std::mem::replace(&mut self.slab[i].size, size);
                self.list(q).resized(old, size);
                self.make_room(0, evicted);
                return;
            }
        }
        if size > self.capacity {
            evicted.push(key);
            return;
        }
        self.make_room(size, evicted);
        let queue = if remembered || size > self.small_share {
            Queue::Main
        } else {
            Queue::Small
        };
        let i = self.slab.alloc(Node {
            key: key.clone(),
            size,
            prev: NIL,
            next: NIL,
            freq: 0,
            queue,
        });
        self.push(queue, i);
        self.index.insert(key, i);
    }

    fn remove(&mut self, key: &K) -> bool {
        match self.index.get(key) {
            Some(&i) if self.slab[i].queue != Queue::Ghost => {
                self.drop_node(i);
                true
            }
            _ => false,
        }
    }

    fn clear(&mut self) {
        self.index.clear();
        self.slab.clear();
        self.small = List::default();
        self.main = List::default();
        self.ghost = List::default();
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn used(&self) -> u64 {
        self.small.bytes() + self.main.bytes()
    }

    fn len(&self) -> usize {
        self.small.len() + self.main.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_read_once_leaves_small_before_a_key_read_again() {
        // 100 bytes: small's share is 10; an 85-byte key goes to main directly.
        let mut c = S3Fifo::new(100);
        let mut ev = Vec::new();
        c.insert(0, 85, &mut ev);
        c.insert(1, 5, &mut ev);
        c.insert(2, 5, &mut ev);
        assert!(c.touch(&1), "1 is re-referenced");
        c.insert(3, 5, &mut ev);
        assert!(ev.is_empty(), "nothing leaves before the cache is full");
        c.insert(4, 5, &mut ev);
        // 1 (older, read again) moved to main; 2 (read once) left into the ghost.
        assert_eq!(ev, vec![2]);
        assert!(c.contains(&1) && c.contains(&3) && c.contains(&4) && !c.contains(&2));
        assert_eq!(c.slab[c.index[&1]].queue, Queue::Main);
        assert_eq!(c.slab[c.index[&2]].queue, Queue::Ghost, "2 is remembered");
    }

    #[test]
    fn a_key_the_ghost_remembers_goes_to_main() {
        let mut c = S3Fifo::new(100);
        let mut ev = Vec::new();
        c.insert(0, 85, &mut ev);
        for k in 1..=4 {
            c.insert(k, 5, &mut ev);
        }
        assert_eq!(ev, vec![1]);
        assert!(!c.contains(&1) && !c.touch(&1), "a ghost is not held");
        c.insert(1, 5, &mut ev);
        assert_eq!(ev, vec![1, 2]);
        assert_eq!(c.slab[c.index[&1]].queue, Queue::Main);
        c.insert(5, 5, &mut ev);
        assert_eq!(
            c.slab[c.index[&5]].queue,
            Queue::Small,
            "a new key starts small"
        );
    }

    #[test]
    fn main_reinserts_keys_read_while_there() {
        // Capacity 20: small 2, main 18; 6-byte keys go to main directly.
        let mut c = S3Fifo::new(20);
        let mut ev = Vec::new();
        for k in 0..3 {
            c.insert(k, 6, &mut ev);
        }
        assert!(c.touch(&0));
        c.insert(3, 6, &mut ev);
        // 0 is the oldest but was read: it goes round again, 1 leaves.
        assert_eq!(ev, vec![1]);
        assert!(c.contains(&0));
    }
}
