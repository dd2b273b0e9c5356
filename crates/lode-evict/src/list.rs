//! Doubly linked lists threaded through one slab of nodes, so several queues (a policy's
//! segments, its ghost) share one allocation and a key moves between them in O(1)
//! without allocating.

/// No node.
pub(crate) const NIL: u32 = u32::MAX;

/// A node of some list: its links and its size.
pub(crate) trait Linked {
    fn prev(&self) -> u32;
    fn next(&self) -> u32;
    fn set_links(&mut self, prev: u32, next: u32);
    fn size(&self) -> u64;
}

/// Nodes by index; freed indices are reused.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    nodes: Vec<T>,
    free: Vec<u32>,
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Self {
        Self {
            nodes: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Stores `node`, returning its index.
    pub(crate) fn alloc(&mut self, node: T) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1).expect("fewer than 2^32 entries")
            }
        }
    }

    /// Marks `i` free; its node stays until reused.
    pub(crate) fn release(&mut self, i: u32) {
        self.free.push(i);
    }

    pub(crate) fn clear(&mut self) {
        self.nodes.clear();
        self.free.clear();
    }

    pub(crate) fn nodes(&mut self) -> &mut [T] {
        &mut self.nodes
    }
}

impl<T> std::ops::Index<u32> for Slab<T> {
    type Output = T;
    fn index(&self, i: u32) -> &T {
        &self.nodes[i as usize]
    }
}

impl<T> std::ops::IndexMut<u32> for Slab<T> {
    fn index_mut(&mut self, i: u32) -> &mut T {
        &mut self.nodes[i as usize]
    }
}

/// One list: its ends, its length and the sum of its nodes' sizes. The front is the
/// newest end, the back the next to leave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct List {
    head: u32,
    tail: u32,
    len: usize,
    bytes: u64,
}

impl Default for List {
    fn default() -> Self {
        Self {
            head: NIL,
            tail: NIL,
            len: 0,
            bytes: 0,
        }
    }
}

impl List {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The node at the back (the oldest), if any.
    pub(crate) fn back(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }

    pub(crate) fn push_front<T: Linked>(&mut self, nodes: &mut [T], i: u32) {
        let head = self.head;
        nodes[i as usize].set_links(NIL, head);
        if head == NIL {
            self.tail = i;
        } else {
            let h = &mut nodes[head as usize];
            let next = h.next();
            h.set_links(i, next);
        }
        self.head = i;
        self.len += 1;
        self.bytes += nodes[i as usize].size();
    }

    /// Takes node `i`, which must be on this list, off it.
    pub(crate) fn unlink<T: Linked>(&mut self, nodes: &mut [T], i: u32) {
        let (prev, next) = (nodes[i as usize].prev(), nodes[i as usize].next());
        if prev == NIL {
            self.head = next;
        } else {
            let p = &mut nodes[prev as usize];
            let pp = p.prev();
            p.set_links(pp, next);
        }
        if next == NIL {
            self.tail = prev;
        } else {
            let n = &mut nodes[next as usize];
            let nn = n.next();
            n.set_links(prev, nn);
        }
        nodes[i as usize].set_links(NIL, NIL);
        self.len -= 1;
        self.bytes -= nodes[i as usize].size();
    }

    /// Changes the recorded size of node `i` (on this list) from `old` to its current.
    pub(crate) fn resized(&mut self, old: u64, new: u64) {
        self.bytes = self.bytes - old + new;
    }
}
