//! LRU-K (O'Neil, O'Neil, Weikum, "The LRU-K page replacement algorithm for database
//! disk buffering", SIGMOD 1993), K = 2 by default.
//!
//! A key's rank is its K-th most recent reference: a key read K times is judged by how
//! long ago it was read K times, so a scan that reads each of its keys once cannot push
//! out keys read over and over. References are reads of held keys ([`Policy::touch`]
//! hits); an insert makes a key held but is not a reference (as in lode's cache node).
//! Keys read fewer than K times go first, the one with the oldest last access (read or
//! insert) first: they sit in a recency list, O(1). Keys read K times or more wait in
//! a binary heap by the time of their K-th most recent read, oldest first: a read
//! moves a key's rank to the time of its previous (K-1)-th read, a point inside the
//! order, so this part costs O(log n) per read or eviction, not O(1). No history is
//! kept for evicted keys (the paper's retained information period is zero).

use std::collections::HashMap;

use crate::hash::KeyHash;
use std::fmt;
use std::hash::Hash;

use crate::Policy;
use crate::list::{Linked, List, NIL, Slab};

/// The largest K.
pub const MAX_K: u8 = 4;

#[derive(Debug)]
struct Node<K> {
    key: K,
    size: u64,
    prev: u32,
    next: u32,
    /// Position in the heap, or `NIL` while in the recency list.
    heap: u32,
    /// Reads so far, saturating at K.
    reads: u8,
    /// The ticks of the last reads, newest first.
    recent: [u64; MAX_K as usize],
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

/// Least recently used by the K-th most recent read.
pub struct LruK<K> {
    k: u8,
    capacity: u64,
    used: u64,
    tick: u64,
    index: HashMap<K, u32, KeyHash>,
    slab: Slab<Node<K>>,
    /// Keys read fewer than K times, last accessed at the front.
    young: List,
    /// Keys read K times, as a min-heap of node indices by their K-th most recent read.
    heap: Vec<u32>,
}

impl<K> fmt::Debug for LruK<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LruK")
            .field("k", &self.k)
            .field("capacity", &self.capacity)
            .field("used", &self.used)
            .field("young", &self.young.len())
            .field("old", &self.heap.len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> LruK<K> {
    /// An empty LRU-`k` bounded to `capacity`; `k` is clamped to 1..=[`MAX_K`].
    pub fn new(k: u8, capacity: u64) -> Self {
        Self {
            k: k.clamp(1, MAX_K),
            capacity,
            used: 0,
            tick: 0,
            index: HashMap::with_hasher(KeyHash::new()),
            slab: Slab::new(),
            young: List::default(),
            heap: Vec::new(),
        }
    }

    fn rank(&self, i: u32) -> u64 {
        self.slab[i].recent[usize::from(self.k) - 1]
    }

    fn place(&mut self, pos: usize) {
        let i = self.heap[pos];
        self.slab[i].heap = u32::try_from(pos).expect("fewer than 2^32 entries");
    }

    fn sift_up(&mut self, mut pos: usize) {
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if self.rank(self.heap[parent]) <= self.rank(self.heap[pos]) {
                break;
            }
            self.heap.swap(parent, pos);
            self.place(pos);
            pos = parent;
        }
        self.place(pos);
    }

    fn sift_down(&mut self, mut pos: usize) {
        loop {
            let (l, r) = (2 * pos + 1, 2 * pos + 2);
            let mut least = pos;
            for c in [l, r] {
                if c < self.heap.len() && self.rank(self.heap[c]) < self.rank(self.heap[least]) {
                    least = c;
                }
            }
            if least == pos {
                break;
            }
            self.heap.swap(least, pos);
            self.place(pos);
            pos = least;
        }
        self.place(pos);
    }

    fn heap_remove(&mut self, pos: usize) {
        let last = self.heap.len() - 1;
        self.heap.swap(pos, last);
        self.heap.pop();
        if pos < self.heap.len() {
            self.place(pos);
            self.sift_up(pos);
            let pos = self.slab[self.heap[pos]].heap as usize;
            self.sift_down(pos);
        }
    }

    /// Forgets node `i`, returning its key.
    fn take(&mut self, i: u32) -> K {
        let pos = self.slab[i].heap;
        if pos == NIL {
            self.young.unlink(self.slab.nodes(), i);
        } else {
            self.heap_remove(pos as usize);
            self.slab[i].heap = NIL;
        }
        self.used -= self.slab[i].size;
        self.slab.release(i);
        let key = self.slab[i].key.clone();
        self.index.remove(&key);
        key
    }

    fn make_room(&mut self, incoming: u64, evicted: &mut Vec<K>) {
        while self.used + incoming > self.capacity {
            let victim = match self.young.back() {
                Some(i) => i,
                None => match self.heap.first() {
                    Some(&i) => i,
                    None => break,
                },
            };
            evicted.push(self.take(victim));
        }
    }
}

impl<K: Hash + Eq + Clone + Send + fmt::Debug> Policy<K> for LruK<K> {
    fn touch(&mut self, key: &K) -> bool {
        let Some(&i) = self.index.get(key) else {
            return false;
        };
        self.tick += 1;
        let (k, tick) = (self.k, self.tick);
        let n = &mut self.slab[i];
        n.recent.copy_within(..MAX_K as usize - 1, 1);
        n.recent[0] = tick;
        n.reads = n.reads.saturating_add(1).min(k);
        if n.reads < k {
            self.young.unlink(self.slab.nodes(), i);
            self.young.push_front(self.slab.nodes(), i);
        } else if n.heap == NIL {
            self.young.unlink(self.slab.nodes(), i);
            self.heap.push(i);
            self.sift_up(self.heap.len() - 1);
        } else {
            // Its K-th most recent read only moves later.
            let pos = n.heap as usize;
            self.sift_down(pos);
        }
        true
    }

    fn contains(&self, key: &K) -> bool {
        self.index.contains_key(key)
    }

    fn insert(&mut self, key: K, size: u64, evicted: &mut Vec<K>) {
        self.tick += 1;
        if let Some(&i) = self.index.get(&key) {
            if size > self.capacity {
                evicted.push(self.take(i));
                return;
            }
            // Replaced in place: a write, not a read; its reads still count.
            let old = std::mem::replace(&mut self.slab[i].size, size);
            self.used = self.used - old + size;
            if self.slab[i].heap == NIL {
                self.young.resized(old, size);
                self.young.unlink(self.slab.nodes(), i);
                self.young.push_front(self.slab.nodes(), i);
            }
            self.make_room(0, evicted);
            return;
        }
        if size > self.capacity {
            evicted.push(key);
            return;
        }
        self.make_room(size, evicted);
        let i = self.slab.alloc(Node {
            key: key.clone(),
            size,
            prev: NIL,
            next: NIL,
            heap: NIL,
            reads: 0,
            recent: [0; MAX_K as usize],
        });
        self.young.push_front(self.slab.nodes(), i);
        self.index.insert(key, i);
        self.used += size;
    }

    fn remove(&mut self, key: &K) -> bool {
        match self.index.get(key) {
            Some(&i) => {
                self.take(i);
                true
            }
            None => false,
        }
    }

    fn clear(&mut self) {
        self.index.clear();
        self.slab.clear();
        self.young = List::default();
        self.heap.clear();
        self.used = 0;
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn used(&self) -> u64 {
        self.used
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `key`, inserting it (size 1) on a miss, as a cache does.
    fn read(c: &mut LruK<&'static str>, key: &'static str) {
        if !c.touch(&key) {
            c.insert(key, 1, &mut Vec::new());
        }
    }

    fn held(c: &LruK<&'static str>) -> Vec<&'static str> {
        let mut keys: Vec<_> = c.index.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn a_scan_read_once_does_not_evict_keys_read_twice() {
        let mut c = LruK::new(2, 4);
        for _ in 0..3 {
            for k in ["h1", "h2", "h3"] {
                read(&mut c, k);
            }
        }
        for k in ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"] {
            read(&mut c, k);
            read(&mut c, k);
        }
        // Each scan key was inserted then read once: fewer than two reads.
        assert_eq!(held(&c), ["h1", "h2", "h3", "s8"]);
    }

    #[test]
    fn plain_lru_would_lose_the_hot_set() {
        let mut c = crate::Lru::new(4);
        let mut touch = |k: &'static str| {
            if !c.touch(&k) {
                c.insert(k, 1, &mut Vec::new());
            }
        };
        for _ in 0..3 {
            for k in ["h1", "h2", "h3"] {
                touch(k);
            }
        }
        for k in ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"] {
            touch(k);
        }
        assert!(!c.contains(&"h1") && !c.contains(&"h2") && !c.contains(&"h3"));
    }

    #[test]
    fn keys_read_k_times_go_by_their_kth_most_recent_read() {
        let mut c = LruK::new(2, 2);
        let mut ev = Vec::new();
        c.insert("a", 1, &mut ev);
        c.insert("b", 1, &mut ev);
        // a: reads at 3 and 6; b: reads at 4 and 5. LRU-2 evicts a (3 < 4) though a
        // was read last.
        c.touch(&"a");
        c.touch(&"b");
        c.touch(&"b");
        c.touch(&"a");
        c.insert("c", 1, &mut ev);
        // c is young (no reads): the next insert evicts it before either old key.
        assert_eq!(ev, vec!["a"]);
        ev.clear();
        c.insert("d", 1, &mut ev);
        assert_eq!(ev, vec!["c"]);
    }
}
