//! Recent stripe-request latencies, per node, and the hedge delay drawn from them.
//!
//! Each node keeps its last [`WINDOW`] answered requests' latencies in a ring of atomics
//! (a record is one `fetch_add` and one store: no lock on the read path); every
//! [`EVERY`] records its p95 is recomputed from the ring and published. The hedge delay
//! is the median, over the nodes that have a p95, of their p95s, clamped to
//! [`MIN_DELAY`] … `node_timeout`. Until at least half the nodes have one there is no
//! delay, and a `p95` read asks every node at once (as `all` does): a fresh client
//! knows nothing of the fleet's latencies, and any fixed delay would be too long for
//! some fleets and too short for others (the windows fill within a few reads).
//!
//! The same windows say which nodes are slow lately: one whose p95 is over
//! [`SLOW_FACTOR`] times that median, or one that a read stopped waiting for (hedged
//! around) and that has not answered within the delay since. A `p95` read asks such a
//! node after the others (a parity stripe's node first); one such read in
//! [`PROBE_EVERY`] also asks it at once, without waiting for it, which keeps its window
//! current.
//!
//! Why per node and a median, not one p95 over every request: one persistently slow
//! node of six serves about a sixth of all stripe requests, more than the 5% a p95
//! ignores, so a single window's p95 would be the slow node's latency and hedging would
//! wait for it. The median of the nodes' p95s is a healthy node's p95 as long as fewer
//! than half the nodes are slow.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Latencies kept per node.
pub(crate) const WINDOW: usize = 64;
/// Records between recomputations of a node's p95 (and the fleet's delay).
pub(crate) const EVERY: usize = 16;
/// The shortest hedge delay: below it a hedge costs more than the wait it saves.
pub(crate) const MIN_DELAY: Duration = Duration::from_micros(250);
/// A node is slow lately when its p95 is over this many times the median node's. Three,
/// not two: on a busy host a healthy node's p95 strays to twice the median often
/// enough that reads would decode for nothing.
pub(crate) const SLOW_FACTOR: u64 = 3;
/// One read in this many of those that put a slow node last also asks it at once, not
/// counted on, so a slow node's latencies keep being measured and it is seen to
/// recover, at no wait to the read.
pub(crate) const PROBE_EVERY: u64 = 8;

/// One node's recent latencies, in microseconds.
#[derive(Debug)]
pub(crate) struct Window {
    samples: [AtomicU32; WINDOW],
    next: AtomicUsize,
    /// The last p95 computed, µs; 0 before the first.
    p95: AtomicU32,
    /// A read gave up waiting for this node (asked another in its place) since it last
    /// answered within the hedge delay.
    late: AtomicBool,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            samples: std::array::from_fn(|_| AtomicU32::new(0)),
            next: AtomicUsize::new(0),
            p95: AtomicU32::new(0),
            late: AtomicBool::new(false),
        }
    }
}

impl Window {
    /// Records one latency; whether this record republished the p95.
    pub(crate) fn record(&self, latency: Duration) -> bool {
        let us = u32::try_from(latency.as_micros())
            .unwrap_or(u32::MAX)
            .max(1);
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.samples[i % WINDOW].store(us, Ordering::Relaxed);
        // Past usize::MAX records the count wraps to a full window again.
        let n = i.checked_add(1).unwrap_or(WINDOW);
        if !n.is_multiple_of(EVERY) {
            return false;
        }
        let have = n.min(WINDOW);
        let mut v: Vec<u32> = self.samples[..have]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        let at = (have * 95).div_ceil(100) - 1;
        let (_, p95, _) = v.select_nth_unstable(at);
        self.p95.store(*p95, Ordering::Relaxed);
        true
    }

    /// The last p95 published, if any.
    pub(crate) fn p95(&self) -> Option<u32> {
        Some(self.p95.load(Ordering::Relaxed)).filter(|&p| p > 0)
    }
}

/// Every node's window and the delay drawn from them.
#[derive(Debug)]
pub(crate) struct Latencies {
    nodes: Vec<Window>,
    /// The median of the nodes' p95s, µs; 0 until half the nodes have one.
    median: AtomicU64,
    max: Duration,
    reads: AtomicU64,
}

impl Latencies {
    /// Windows for `nodes` nodes; delays at most `max` (the node timeout).
    pub(crate) fn new(nodes: usize, max: Duration) -> Self {
        Self {
            nodes: (0..nodes).map(|_| Window::default()).collect(),
            median: AtomicU64::new(0),
            max,
            reads: AtomicU64::new(0),
        }
    }

    /// Records an answered request to node `node`.
    pub(crate) fn record(&self, node: usize, latency: Duration) {
        let Some(w) = self.nodes.get(node) else {
            return;
        };
        if self.delay().is_some_and(|d| latency <= d) {
            w.late.store(false, Ordering::Relaxed);
        }
        if !w.record(latency) {
            return;
        }
        let mut p: Vec<u32> = self.nodes.iter().filter_map(Window::p95).collect();
        if p.len() * 2 < self.nodes.len() || p.is_empty() {
            return;
        }
        let mid = p.len() / 2;
        let (_, m, _) = p.select_nth_unstable(mid);
        self.median.store(u64::from(*m), Ordering::Relaxed);
    }

    /// Whether node `node`'s recent p95 is over [`SLOW_FACTOR`] times the median of the
    /// nodes' p95s.
    pub(crate) fn is_slow(&self, node: usize) -> bool {
        let Some(w) = self.nodes.get(node) else {
            return false;
        };
        let median = self.median.load(Ordering::Relaxed);
        w.late.load(Ordering::Relaxed)
            || (median > 0 && w.p95().is_some_and(|p| u64::from(p) > SLOW_FACTOR * median))
    }

    /// A read stopped waiting for node `node` and asked another: it counts as slow until
    /// it answers a request within the hedge delay. This reacts within one read, where
    /// the node's p95 needs [`EVERY`] answers, and a node that does not answer at all
    /// (partitioned) has none.
    pub(crate) fn late(&self, node: usize) {
        if let Some(w) = self.nodes.get(node) {
            w.late.store(true, Ordering::Relaxed);
        }
    }

    /// Whether this read, which puts a slow node last, should also probe it: one read in
    /// [`PROBE_EVERY`].
    pub(crate) fn probe_due(&self) -> bool {
        (self.reads.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(PROBE_EVERY)
    }

    /// The hedge delay now; `None` until half the nodes have a p95.
    pub(crate) fn delay(&self) -> Option<Duration> {
        let us = self.median.load(Ordering::Relaxed);
        (us > 0).then(|| Duration::from_micros(us).clamp(MIN_DELAY.min(self.max), self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn a_window_publishes_its_p95_every_few_records() {
        let w = Window::default();
        assert_eq!(w.p95(), None);
        for i in 1..EVERY as u64 {
            assert!(!w.record(Duration::from_micros(i * 100)));
        }
        assert!(w.record(Duration::from_micros(EVERY as u64 * 100)));
        // 16 samples 100..1600 µs: the 95th percentile (nearest rank 16) is 1600.
        assert_eq!(w.p95(), Some(1600));
        // The ring forgets: 64 records of 50 µs later, that is all it holds.
        for _ in 0..WINDOW {
            w.record(Duration::from_micros(50));
        }
        assert_eq!(w.p95(), Some(50));
    }

    #[test]
    fn one_slow_node_does_not_set_the_delay() {
        let l = Latencies::new(6, ms(200));
        assert_eq!(l.delay(), None);
        for _ in 0..WINDOW {
            for n in 0..6 {
                // Node 3 takes 40 ms; the others 2 to 3 ms.
                let t = if n == 3 {
                    ms(40)
                } else {
                    ms(2 + (n as u64 % 2))
                };
                l.record(n, t);
            }
        }
        assert_eq!(l.delay(), Some(ms(3)));
        assert!(l.is_slow(3));
        assert!((0..6).filter(|&n| n != 3).all(|n| !l.is_slow(n)));
        // Hedged around: slow until an answer within the delay.
        l.late(1);
        assert!(l.is_slow(1));
        l.record(1, ms(40));
        assert!(l.is_slow(1));
        l.record(1, ms(2));
        assert!(!l.is_slow(1));
        // One read in eight probes.
        let probes = (0..16).filter(|_| l.probe_due()).count();
        assert_eq!(probes, 2);
        // Clamped: to the floor, and to the node timeout.
        let fast = Latencies::new(2, ms(200));
        let slow = Latencies::new(2, ms(20));
        for _ in 0..EVERY {
            for n in 0..2 {
                fast.record(n, Duration::from_micros(80));
                slow.record(n, ms(90));
            }
        }
        assert_eq!(fast.delay(), Some(MIN_DELAY));
        assert_eq!(slow.delay(), Some(ms(20)));
    }

    #[test]
    fn no_delay_until_half_the_nodes_are_measured() {
        let l = Latencies::new(6, ms(200));
        for _ in 0..EVERY {
            l.record(0, ms(9));
            l.record(1, ms(9));
        }
        assert_eq!(l.delay(), None);
        for _ in 0..EVERY {
            l.record(2, ms(9));
        }
        assert_eq!(l.delay(), Some(ms(9)));
    }
}
