//! Which nodes hold a chunk's stripes: rendezvous (highest random weight) hashing.
//!
//! Every node gets a score for every chunk, a hash of the node's identity and the
//! chunk's name; a chunk's `k + m` stripes live on the `k + m` nodes with the highest
//! scores, stripe `i` on the node ranked `i` when it is written. Nothing is shared or
//! stored: every worker with the same node list computes the same places.
//!
//! Adding or removing a node only moves what must move. A node's scores do not depend on
//! the other nodes, so removing one changes the set of a chunk only if the node was in
//! it, and then only by that node (the next-ranked node takes its place); adding one
//! changes a set only where the new node outranks a member, replacing the lowest one.
//! Because a stripe's key is the chunk's (its index lives in its header, `stripe.rs`),
//! every stripe on a node that stays in a chunk's set stays readable where it is.
//!
//! A node's identity is its address string exactly as configured (`host:port`), so every
//! worker must list a node the same way.

use lode_format::ChunkName;

/// The placement function over a fixed list of nodes.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    ids: Vec<u64>,
}

/// A node's 64-bit identity: the first 8 bytes of the SHA-256 of its address.
fn node_id(node: &str) -> u64 {
    let h = ChunkName::of(node.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// MurmurHash3's 64-bit finaliser: a bijection whose every output bit depends on every
/// input bit. The chunk side is already uniform (a SHA-256), the node side too; the
/// finaliser decorrelates the scores of one node across chunks and of one chunk across
/// nodes.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

fn chunk_key(name: &ChunkName) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&name.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

impl Rendezvous {
    /// Placement over `nodes`, identified by their address strings.
    pub fn new<S: AsRef<str>>(nodes: &[S]) -> Self {
        Self {
            ids: nodes.iter().map(|n| node_id(n.as_ref())).collect(),
        }
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Node `node`'s score for chunk `name`.
    fn score(&self, node: usize, c: u64) -> (u64, u64) {
        // The id breaks ties (nodes with equal scores), so the order never depends on
        // the order of the node list.
        (fmix64(self.ids[node] ^ c), self.ids[node])
    }

    /// The `count` nodes (positions in the node list) that hold chunk `name`'s stripes,
    /// best first: stripe `i` is written to the `i`-th. Fewer when there are fewer nodes.
    pub fn place(&self, name: &ChunkName, count: usize) -> Vec<usize> {
        let c = chunk_key(name);
        let mut all: Vec<usize> = (0..self.ids.len()).collect();
        all.sort_unstable_by_key(|&n| std::cmp::Reverse(self.score(n, c)));
        all.truncate(count);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:11211")).collect()
    }

    fn chunks(n: usize) -> Vec<ChunkName> {
        (0..n).map(|i| ChunkName::of(&i.to_le_bytes())).collect()
    }

    fn addrs(list: &[String], placed: &[usize]) -> Vec<String> {
        placed.iter().map(|&i| list[i].clone()).collect()
    }

    #[test]
    fn places_on_distinct_nodes_deterministically() {
        let list = nodes(9);
        let r = Rendezvous::new(&list);
        for c in chunks(500) {
            let p = r.place(&c, 6);
            assert_eq!(p.len(), 6);
            assert_eq!(p.iter().collect::<HashSet<_>>().len(), 6);
            assert_eq!(Rendezvous::new(&list).place(&c, 6), p);
        }
        assert_eq!(r.place(&chunks(1)[0], 20).len(), 9);
    }

    #[test]
    fn order_of_the_node_list_does_not_matter() {
        let list = nodes(8);
        let mut shuffled = list.clone();
        shuffled.reverse();
        shuffled.swap(1, 5);
        let (a, b) = (Rendezvous::new(&list), Rendezvous::new(&shuffled));
        for c in chunks(300) {
            assert_eq!(
                addrs(&list, &a.place(&c, 6)),
                addrs(&shuffled, &b.place(&c, 6))
            );
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_stripes() {
        let list = nodes(10);
        let r = Rendezvous::new(&list);
        for gone in [0, 4, 9] {
            let fewer: Vec<String> = list
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, n)| n.clone())
                .collect();
            let r2 = Rendezvous::new(&fewer);
            let mut moved = 0;
            let cs = chunks(2000);
            for c in &cs {
                let before: HashSet<String> = addrs(&list, &r.place(c, 6)).into_iter().collect();
                let after: HashSet<String> = addrs(&fewer, &r2.place(c, 6)).into_iter().collect();
                let lost: HashSet<_> = before.difference(&after).collect();
                let gained: HashSet<_> = after.difference(&before).collect();
                if before.contains(&list[gone]) {
                    // Exactly the removed node left; exactly one node came in.
                    assert_eq!(lost.into_iter().collect::<Vec<_>>(), vec![&list[gone]]);
                    assert_eq!(gained.len(), 1);
                    moved += 1;
                } else {
                    assert!(lost.is_empty() && gained.is_empty());
                }
            }
            // A node is in about 6 of 10 sets.
            assert!(
                (900..1500).contains(&moved),
                "{moved} of {} moved",
                cs.len()
            );
        }
    }

    #[test]
    fn adding_a_node_displaces_at_most_one_per_chunk() {
        let list = nodes(8);
        let mut more = list.clone();
        more.push("10.0.1.1:11211".into());
        let (a, b) = (Rendezvous::new(&list), Rendezvous::new(&more));
        let mut joined = 0;
        for c in chunks(2000) {
            let before: HashSet<String> = addrs(&list, &a.place(&c, 6)).into_iter().collect();
            let after: HashSet<String> = addrs(&more, &b.place(&c, 6)).into_iter().collect();
            let gained: Vec<_> = after.difference(&before).collect();
            assert!(before.difference(&after).count() <= 1);
            match gained.as_slice() {
                [] => {}
                [g] => {
                    assert_eq!(**g, more[8]);
                    joined += 1;
                }
                _ => panic!("{gained:?}"),
            }
        }
        // The new node joins about 6 of 9 sets.
        assert!((1100..1600).contains(&joined), "{joined}");
    }

    #[test]
    fn spreads_stripes_evenly() {
        let list = nodes(12);
        let r = Rendezvous::new(&list);
        let mut per_node = [0usize; 12];
        let mut first = [0usize; 12];
        let n = 6000;
        for c in chunks(n) {
            let p = r.place(&c, 6);
            first[p[0]] += 1;
            for i in p {
                per_node[i] += 1;
            }
        }
        // Each node expects n * 6 / 12 = 3000 stripes and n / 12 = 500 first places.
        for (i, (&s, &f)) in per_node.iter().zip(&first).enumerate() {
            assert!((2700..3300).contains(&s), "node {i}: {s} stripes");
            assert!((400..600).contains(&f), "node {i}: {f} first places");
        }
    }
}
