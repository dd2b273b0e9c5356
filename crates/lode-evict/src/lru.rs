//! Least recently used: a doubly linked list threaded through a slab, so a touch, an
//! insert and an eviction are O(1).

use std::collections::HashMap;

use crate::hash::KeyHash;
use std::fmt;
use std::hash::Hash;

use crate::Policy;

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Node<K> {
    key: K,
    size: u64,
    prev: u32,
    next: u32,
}

/// Least recently used first out.
pub struct Lru<K> {
    capacity: u64,
    used: u64,
    index: HashMap<K, u32, KeyHash>,
    nodes: Vec<Node<K>>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next victim.
    tail: u32,
}

impl<K> fmt::Debug for Lru<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lru")
            .field("capacity", &self.capacity)
            .field("used", &self.used)
            .field("len", &self.index.len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> Lru<K> {
    /// An empty LRU bounded to `capacity`.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            used: 0,
            index: HashMap::with_hasher(KeyHash::new()),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    fn node(&self, i: u32) -> &Node<K> {
        &self.nodes[i as usize]
    }

    fn node_mut(&mut self, i: u32) -> &mut Node<K> {
        &mut self.nodes[i as usize]
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = self.node(i);
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.node_mut(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.node_mut(next).prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        let head = self.head;
        {
            let n = self.node_mut(i);
            n.prev = NIL;
            n.next = head;
        }
        if head == NIL {
            self.tail = i;
        } else {
            self.node_mut(head).prev = i;
        }
        self.head = i;
    }

    fn take(&mut self, i: u32) -> K {
        self.unlink(i);
        self.free.push(i);
        let size = self.node(i).size;
        self.used -= size;
        self.node(i).key.clone()
    }
}

impl<K: Hash + Eq + Clone + Send + fmt::Debug> Policy<K> for Lru<K> {
    fn touch(&mut self, key: &K) -> bool {
        let Some(&i) = self.index.get(key) else {
            return false;
        };
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
        true
    }

    fn contains(&self, key: &K) -> bool {
        self.index.contains_key(key)
    }

    fn insert(&mut self, key: K, size: u64, evicted: &mut Vec<K>) {
        self.remove(&key);
        if size > self.capacity {
            evicted.push(key);
            return;
        }
        while self.used + size > self.capacity && self.tail != NIL {
            let victim = self.take(self.tail);
            self.index.remove(&victim);
            evicted.push(victim);
        }
        let node = Node {
            key: key.clone(),
            size,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1).expect("fewer than 2^32 entries")
            }
        };
        self.push_front(i);
        self.index.insert(key, i);
        self.used += size;
    }

    fn remove(&mut self, key: &K) -> bool {
        match self.index.remove(key) {
            Some(i) => {
                self.take(i);
                true
            }
            None => false,
        }
    }

    fn clear(&mut self) {
        self.index.clear();
        self.nodes.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
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

    #[test]
    fn evicts_least_recently_used_first() {
        let mut l = Lru::new(30);
        let mut ev = Vec::new();
        l.insert(1, 10, &mut ev);
        l.insert(2, 10, &mut ev);
        l.insert(3, 10, &mut ev);
        assert!(ev.is_empty());
        assert!(l.touch(&1));
        l.insert(4, 10, &mut ev);
        assert_eq!(ev, vec![2]);
        assert_eq!(l.used(), 30);
        ev.clear();
        l.insert(5, 31, &mut ev);
        assert_eq!(ev, vec![5]);
        assert_eq!(l.len(), 3);
        assert!(l.remove(&1));
        assert_eq!(l.used(), 20);
        assert!(!l.touch(&1));
    }
}
