//! W-TinyLFU (Einziger, Friedman, Manes, "TinyLFU: A Highly Efficient Cache Admission
//! Policy", ACM TOS 2017; the windowed form is Caffeine's).
//!
//! A new key enters a small **window** LRU (1% of the capacity), so a burst of fresh
//! keys is kept for a short while. A key pushed out of the window is a candidate for
//! the **main** space, a segmented LRU: **probation** (20% of main) where keys enter, and
//! **protected** (80%) where a key read again in probation moves (protected's least
//! recently used falls back to probation). When main has no room, the candidate is
//! admitted only if a frequency sketch estimates it was read more often than main's
//! victim (probation's least recently used, else protected's); otherwise the candidate
//! itself leaves, so a stream of one-off keys cannot flush keys read often.
//!
//! The sketch is a count-min sketch of 4-bit counters, four per key in one table, that
//! counts every read ([`Policy::touch`], hit or miss); after ten reads per counter word
//! every counter is halved, so old popularity fades. Its table grows (and restarts) as
//! the number of keys held grows. Sizes are bytes: a candidate larger than main is not
//! admitted, and it evicts main's victims one at a time, each compared with it, until
//! it fits. Every operation is O(1) amortised (the halving touches the table once per
//! ten reads per word).

use std::collections::HashMap;

use crate::hash::KeyHash;
use std::fmt;
use std::hash::{BuildHasher, Hash};

use crate::Policy;
use crate::list::{Linked, List, NIL, Slab};

/// The frequency sketch's hash seed.
const SKETCH_SEED: u64 = 0x2545_f491_4f6c_dd1d;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    Window,
    Probation,
    Protected,
}

#[derive(Debug)]
struct Node<K> {
    key: K,
    size: u64,
    prev: u32,
    next: u32,
    segment: Segment,
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

/// A count-min sketch of 4-bit counters packed sixteen to a word.
#[derive(Debug)]
struct Sketch {
    table: Vec<u64>,
    /// Counters in the table, less one (a power of two less one).
    mask: u64,
    additions: u64,
    sample: u64,
}

const SEEDS: [u64; 4] = [
    0x97cb_3127_6c7b_6f55,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x85eb_ca77_c2b2_ae63,
];

impl Sketch {
    fn new(words: usize) -> Self {
        let words = words.max(16).next_power_of_two();
        let counters = u64::try_from(words).expect("a usize fits in u64") * 16;
        Self {
            table: vec![0; words],
            mask: counters - 1,
            additions: 0,
            sample: counters / 16 * 10,
        }
    }

    fn words(&self) -> usize {
        self.table.len()
    }

    fn slot(&self, hash: u64, row: usize) -> (usize, u32) {
        let h = (hash ^ SEEDS[row]).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let counter = (h >> 17) & self.mask;
        let word = usize::try_from(counter >> 4).expect("below the table's length");
        let shift = u32::try_from((counter & 15) * 4).expect("below 64");
        (word, shift)
    }

    fn estimate(&self, hash: u64) -> u8 {
        (0..4)
            .map(|row| {
                let (w, s) = self.slot(hash, row);
                u8::try_from((self.table[w] >> s) & 15).expect("four bits")
            })
            .min()
            .unwrap_or(0)
    }

    fn increment(&mut self, hash: u64) {
        let mut added = false;
        for row in 0..4 {
            let (w, s) = self.slot(hash, row);
            if (self.table[w] >> s) & 15 < 15 {
                self.table[w] += 1 << s;
                added = true;
            }
        }
        if added {
            self.additions += 1;
            if self.additions >= self.sample {
                for w in &mut self.table {
                    *w = (*w >> 1) & 0x7777_7777_7777_7777;
                }
                self.additions /= 2;
            }
        }
    }
}

/// A window LRU, a segmented LRU main and a frequency sketch that admits into main.
pub struct WTinyLfu<K> {
    capacity: u64,
    window_share: u64,
    main_share: u64,
    protected_share: u64,
    index: HashMap<K, u32, KeyHash>,
    slab: Slab<Node<K>>,
    window: List,
    probation: List,
    protected: List,
    sketch: Sketch,
    hasher: KeyHash,
}

impl<K> fmt::Debug for WTinyLfu<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WTinyLfu")
            .field("capacity", &self.capacity)
            .field("window", &(self.window.len(), self.window.bytes()))
            .field("probation", &(self.probation.len(), self.probation.bytes()))
            .field("protected", &(self.protected.len(), self.protected.bytes()))
            .field("sketch_words", &self.sketch.words())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> WTinyLfu<K> {
    /// An empty cache bounded to `capacity`: a 1% window, main 20% probation and 80%
    /// protected.
    pub fn new(capacity: u64) -> Self {
        let window_share = capacity / 100;
        let main_share = capacity - window_share;
        Self {
            capacity,
            window_share,
            main_share,
            protected_share: main_share / 5 * 4,
            index: HashMap::with_hasher(KeyHash::new()),
            slab: Slab::new(),
            window: List::default(),
            probation: List::default(),
            protected: List::default(),
            sketch: Sketch::new(16),
            // A fixed seed: the sketch counts, and so admits, the same way in every
            // process, so a simulation repeats.
            hasher: KeyHash::with_seed(SKETCH_SEED),
        }
    }

    fn list(&mut self, s: Segment) -> &mut List {
        match s {
            Segment::Window => &mut self.window,
            Segment::Probation => &mut self.probation,
            Segment::Protected => &mut self.protected,
        }
    }

    fn unlink(&mut self, i: u32) {
        let s = self.slab[i].segment;
        let mut list = *self.list(s);
        list.unlink(self.slab.nodes(), i);
        *self.list(s) = list;
    }

    fn push(&mut self, s: Segment, i: u32) {
        self.slab[i].segment = s;
        let mut list = *self.list(s);
        list.push_front(self.slab.nodes(), i);
        *self.list(s) = list;
    }

    /// Forgets node `i`, returning its key.
    fn take(&mut self, i: u32) -> K {
        self.unlink(i);
        self.slab.release(i);
        let key = self.slab[i].key.clone();
        self.index.remove(&key);
        key
    }

    fn frequency(&self, i: u32) -> u8 {
        self.sketch
            .estimate(self.hasher.hash_one(&self.slab[i].key))
    }

    /// Moves the window's oldest key `c` (already unlinked) into main, if the sketch
    /// favours it over the keys it would push out.
    fn admit(&mut self, c: u32, evicted: &mut Vec<K>) {
        let size = self.slab[c].size;
        if size > self.main_share {
            // Bypasses: nothing of main is worth less than all of it.
            self.slab.release(c);
            let key = self.slab[c].key.clone();
            self.index.remove(&key);
            evicted.push(key);
            return;
        }
        let freq = self.frequency(c);
        while self.probation.bytes() + self.protected.bytes() + size > self.main_share {
            let victim = self
                .probation
                .back()
                .or(self.protected.back())
                .expect("main holds more than the room it lacks");
            if freq > self.frequency(victim) {
                evicted.push(self.take(victim));
            } else {
                self.slab.release(c);
                let key = self.slab[c].key.clone();
                self.index.remove(&key);
                evicted.push(key);
                return;
            }
        }
        self.push(Segment::Probation, c);
    }
}

impl<K: Hash + Eq + Clone + Send + fmt::Debug> Policy<K> for WTinyLfu<K> {
    fn touch(&mut self, key: &K) -> bool {
        self.sketch.increment(self.hasher.hash_one(key));
        let Some(&i) = self.index.get(key) else {
            return false;
        };
        match self.slab[i].segment {
            Segment::Window | Segment::Protected => {
                let s = self.slab[i].segment;
                self.unlink(i);
                self.push(s, i);
            }
            Segment::Probation => {
                self.unlink(i);
                self.push(Segment::Protected, i);
                while self.protected.bytes() > self.protected_share {
                    let Some(t) = self.protected.back() else {
                        break;
                    };
                    self.unlink(t);
                    self.push(Segment::Probation, t);
                }
            }
        }
        true
    }

    fn contains(&self, key: &K) -> bool {
        self.index.contains_key(key)
    }

    fn insert(&mut self, key: K, size: u64, evicted: &mut Vec<K>) {
        if let Some(&i) = self.index.get(&key) {
            // Replaced: it enters again (the sketch keeps its reads).
            self.take(i);
        }
        if size > self.capacity {
            evicted.push(key);
            return;
        }
        let i = self.slab.alloc(Node {
            key: key.clone(),
            size,
            prev: NIL,
            next: NIL,
            segment: Segment::Window,
        });
        self.push(Segment::Window, i);
        self.index.insert(key, i);
        while self.window.bytes() > self.window_share {
            let Some(c) = self.window.back() else { break };
            self.unlink(c);
            self.admit(c, evicted);
        }
        if self.index.len() > self.sketch.words() {
            self.sketch = Sketch::new(self.index.len() * 2);
        }
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
        self.window = List::default();
        self.probation = List::default();
        self.protected = List::default();
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn used(&self) -> u64 {
        self.window.bytes() + self.probation.bytes() + self.protected.bytes()
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cold_key_is_not_admitted_over_a_hot_one() {
        // 100 bytes: a 1-byte window, 99 bytes of main.
        let mut c = WTinyLfu::new(100);
        let mut ev = Vec::new();
        for k in 0..99 {
            c.touch(&k);
            c.insert(k, 1, &mut ev);
        }
        for _ in 0..5 {
            for k in 0..99 {
                assert!(c.touch(&k));
            }
        }
        c.touch(&1000);
        c.insert(1000, 1, &mut ev);
        assert!(ev.is_empty(), "the window and main still had room");
        for k in 1001..1100 {
            c.touch(&k);
            c.insert(k, 1, &mut ev);
        }
        // Each cold key, read once, lost to main's victims, read six times.
        assert_eq!(ev.len(), 99);
        assert!(ev.iter().all(|&k| k >= 1000), "{ev:?}");
        assert!((0..99).all(|k| c.contains(&k)));
    }

    #[test]
    fn a_key_read_more_often_displaces_main_victims() {
        let mut c = WTinyLfu::new(100);
        let mut ev = Vec::new();
        for k in 0..100 {
            c.touch(&k);
            c.insert(k, 1, &mut ev);
        }
        assert!(ev.is_empty());
        for _ in 0..4 {
            c.touch(&500);
        }
        c.insert(500, 1, &mut ev);
        // 500 sits in the window; the window's previous key (99) faced main's victim.
        c.touch(&501);
        c.insert(501, 1, &mut ev);
        assert!(c.contains(&500), "{ev:?}");
        assert_eq!(ev.len(), 2);
        assert!(!ev.contains(&500));
    }

    #[test]
    fn the_sketch_counts_and_fades() {
        let mut s = Sketch::new(16);
        for _ in 0..20 {
            s.increment(7);
        }
        assert_eq!(s.estimate(7), 15, "counters saturate at 15");
        assert!(s.estimate(8) <= 15);
        for h in 100..(100 + s.sample) {
            s.increment(h.wrapping_mul(0x2545_f491_4f6c_dd1d));
        }
        assert!(s.estimate(7) < 15, "halved: {}", s.estimate(7));
    }
}
