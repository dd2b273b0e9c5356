//! The AZ cache client: tier 4 of the read path (docs/agent.md).
//!
//! **Read.** The chunk's `k + m` nodes come from the placement (`placement.rs`), in
//! stripe order: the `k` data stripes' nodes first. With `hedge = "p95"` (the default)
//! and `"off"`, a read asks only the first `k` nodes that are up, so a healthy read
//! moves one chunk's bytes and decodes nothing (a concatenation). It asks the next node
//! in order whenever a request fails, misses, brings an invalid stripe or one whose
//! index it already has; with `"p95"` also whenever a request has not answered within
//! the hedge delay (the p95 of recent stripe latencies, `latency.rs`), and it asks a
//! node that has lately been far slower than the rest after the others; until that
//! delay is known (a fresh client), it asks all `k + m` at once. Every mode asks
//! all nodes left once half the node timeout has passed, and a read ends at the node
//! timeout. `"all"` asks all `k + m` at once. Each request runs in its own task with
//! its own timeout; each reply is checked as it arrives (stripe header, checksum, chunk
//! name, code). As soon as `k` checked stripes with distinct indices are in, they are
//! decoded and the result is hashed: the chunk is returned only if it matches its name.
//! Requests still out are not waited for: they finish in the background (so their
//! connections stay pooled and their counters and latencies stay true). A read gives up
//! as soon as too few nodes are left to reach `k`. If the name check fails, the read
//! asks every node left, waits for every reply and tries other combinations of
//! stripes; stripes that disagree with the chunk that checks out are counted against
//! their nodes. No combination that checks out is a miss.
//!
//! **Read repair.** After a hit, nodes that answered with no stripe, an invalid one or
//! a wrong one get the right stripe written back, in the background (bounded: when too
//! many repairs are running, one is skipped rather than queued).
//!
//! **Write.** `put` encodes the chunk and writes stripe `i` to the node ranked `i`,
//! all at once; a node that is down is skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_format::ChunkName;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::config::{AzConfig, Hedge};
use crate::error::AzError;
use crate::latency::Latencies;
use crate::metrics::{AzMetrics, ClientCounters};
use crate::node::{Failure, Node};
use crate::placement::Placement;
use crate::stripe::{Codec, MAX_STRIPES, Rebuilt, Stripe};

/// Background read repairs allowed at once; past that a repair is skipped (the next
/// read of the chunk tries again).
const MAX_REPAIRS_IN_FLIGHT: usize = 16;

type CheckFn = dyn Fn(&ChunkName, &[u8]) -> bool + Send + Sync;

/// When the client takes a rebuilt object as the chunk: [`Accept::full`] (what
/// [`AzClient::get`] uses) checks all of it against the name, in either chunk format; a
/// reader that checks the rest itself passes a cheaper check, such as a v2 header's.
#[derive(Clone)]
pub struct Accept {
    check: Arc<CheckFn>,
    full: bool,
}

impl Accept {
    /// The whole object checks against its name ([`lode_format::check_object`]).
    pub fn full() -> Accept {
        Accept {
            check: Arc::new(|name, bytes| lode_format::check_object(name, bytes).is_ok()),
            full: true,
        }
    }

    /// A partial check: the caller checks the rest before it uses or keeps any of it.
    pub fn partial(check: impl Fn(&ChunkName, &[u8]) -> bool + Send + Sync + 'static) -> Accept {
        Accept {
            check: Arc::new(check),
            full: false,
        }
    }

    fn is_full(&self) -> bool {
        self.full
    }
}

impl std::fmt::Debug for Accept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.full {
            "Accept::full"
        } else {
            "Accept::partial"
        })
    }
}

/// The memcached key all stripes of a chunk are stored under, on each of its nodes.
///
/// It holds the chunk's name and the code, not the stripe's index: a node holds one
/// stripe of a chunk, and the index is in the stripe's header. So when the node list
/// changes, every stripe left on a node that is still among the chunk's nodes stays
/// readable under the same key (see `placement.rs`), and codes never share keys.
pub fn chunk_key(name: &ChunkName, k: usize, m: usize) -> String {
    format!("lode-az1:k{k}m{m}:{name}")
}

/// A client for a fleet of memcached-protocol AZ cache nodes. Cheap to clone; every
/// clone shares the connections, health and counters.
#[derive(Clone, Debug)]
pub struct AzClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: Arc<AzConfig>,
    codec: Arc<Codec>,
    placement: Placement,
    nodes: Vec<Arc<Node>>,
    latencies: Latencies,
    counters: ClientCounters,
    repairs: Semaphore,
}

/// What a node answered to a read.
#[derive(Debug)]
enum Answer {
    /// A stripe that passed its checks.
    Stripe(Stripe),
    /// No value.
    Miss,
    /// A value that is not a valid stripe of this chunk and code.
    Invalid,
    /// No answer in time, or a failed request.
    Failed,
}

/// The state of one read: what came back from whom.
#[derive(Debug)]
struct Gather {
    k: usize,
    /// Per rank: `None` while asked and not answered, or not asked (down).
    answers: Vec<Option<Answer>>,
    /// Checked stripes in arrival order, with the rank of the node each came from.
    candidates: Vec<Stripe>,
    ranks: Vec<usize>,
    have: [bool; MAX_STRIPES],
    distinct: usize,
}

impl Gather {
    fn new(k: usize, total: usize) -> Self {
        Self {
            k,
            answers: (0..total).map(|_| None).collect(),
            candidates: Vec::new(),
            ranks: Vec::new(),
            have: [false; MAX_STRIPES],
            distinct: 0,
        }
    }

    fn add(&mut self, rank: usize, answer: Answer) {
        if let Answer::Stripe(s) = &answer {
            let seen = &mut self.have[s.index()];
            if !*seen {
                *seen = true;
                self.distinct += 1;
            }
            self.candidates.push(s.clone());
            self.ranks.push(rank);
        }
        if let Some(slot) = self.answers.get_mut(rank) {
            *slot = Some(answer);
        }
    }

    fn enough(&self) -> bool {
        self.distinct >= self.k
    }
}

/// One request of a read that has not answered yet.
#[derive(Debug)]
struct Flight {
    rank: usize,
    since: Instant,
    /// Still counted on to bring a stripe: false once another node was asked in its
    /// place because it was slow (its answer is still taken if it comes).
    live: bool,
}

/// Sends a read's stripe requests, in placement order (the data stripes' nodes first),
/// and keeps track of those out.
struct Asker<'a> {
    inner: Arc<Inner>,
    placed: &'a [usize],
    key: Arc<str>,
    name: ChunkName,
    tx: mpsc::UnboundedSender<(usize, Answer)>,
    /// The ranks in the order they are asked.
    order: Vec<usize>,
    /// The next position in `order`.
    next: usize,
    /// Requests sent and not answered.
    pending: usize,
    flights: Vec<Flight>,
}

impl Asker<'_> {
    /// Asks the next node in order that is up; whether there was one.
    fn next(&mut self) -> bool {
        self.next_as(true)
    }

    /// As `next`; a request that is not `live` is not counted on (a probe of a slow
    /// node: its answer is taken if it comes first).
    fn next_as(&mut self, live: bool) -> bool {
        while let Some(&rank) = self.order.get(self.next) {
            self.next += 1;
            let n = self.placed[rank];
            let node = &self.inner.nodes[n];
            if !node.available() {
                continue;
            }
            let (inner, key, tx, name) = (
                Arc::clone(&self.inner),
                Arc::clone(&self.key),
                self.tx.clone(),
                self.name,
            );
            self.inner.counters.stripe_requests.inc();
            tokio::spawn(async move {
                let answer = fetch(&inner, n, &key, &name).await;
                // The read may be over already; the answer still counted on the node.
                let _ = tx.send((rank, answer));
            });
            self.pending += 1;
            self.flights.push(Flight {
                rank,
                since: Instant::now(),
                live,
            });
            return true;
        }
        false
    }

    /// Requests out that are still counted on.
    fn live(&self) -> usize {
        self.flights.iter().filter(|f| f.live).count()
    }

    /// When the oldest request still counted on was sent.
    fn first_live_since(&self) -> Option<Instant> {
        self.flights
            .iter()
            .filter(|f| f.live)
            .map(|f| f.since)
            .min()
    }

    /// The requests still counted on that were sent `delay` or more before `now`.
    fn overdue(&self, now: Instant, delay: Duration) -> Vec<usize> {
        (0..self.flights.len())
            .filter(|&i| self.flights[i].live && self.flights[i].since + delay <= now)
            .collect()
    }

    /// The node of `rank` answered.
    fn answered(&mut self, rank: usize) {
        if let Some(i) = self.flights.iter().position(|f| f.rank == rank) {
            self.flights.swap_remove(i);
            self.pending -= 1;
        }
    }
}

impl AzClient {
    /// A client for `config`, which is checked here: an error names the bad field.
    /// Connects lazily; needs a tokio runtime only when used.
    pub fn new(config: AzConfig) -> Result<Self, AzError> {
        config.validate()?;
        let codec = Codec::new(config.k, config.m).map_err(|e| AzError::Config {
            key: "k".into(),
            message: e.to_string(),
        })?;
        let cfg = Arc::new(config);
        let nodes = cfg
            .nodes
            .iter()
            .map(|a| Arc::new(Node::new(a.clone(), Arc::clone(&cfg))))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                placement: Placement::new(cfg.placement, &cfg.nodes, codec.total(), cfg.epsilon),
                latencies: Latencies::new(cfg.nodes.len(), cfg.node_timeout),
                codec: Arc::new(codec),
                nodes,
                counters: ClientCounters::default(),
                repairs: Semaphore::new(MAX_REPAIRS_IN_FLIGHT),
                cfg,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &AzConfig {
        &self.inner.cfg
    }

    /// The nodes that hold chunk `name`'s stripes, in the order stripes are written
    /// (stripe `i` to the `i`-th).
    pub fn placement(&self, name: &ChunkName) -> Vec<&str> {
        self.inner
            .placement
            .place(name, self.inner.codec.total())
            .into_iter()
            .map(|i| self.inner.nodes[i].addr.as_str())
            .collect()
    }

    /// The key chunk `name`'s stripes are stored under.
    pub fn key(&self, name: &ChunkName) -> String {
        chunk_key(name, self.inner.codec.k(), self.inner.codec.m())
    }

    /// Chunk `name`'s ciphertext, rebuilt from the first `k` valid stripes to arrive and
    /// checked against its name, or `None` (a miss: the caller goes on to the origin).
    /// Takes at most about `node_timeout` plus the decode; nodes marked down cost
    /// nothing. Never returns bytes that do not hash to `name`.
    pub async fn get(&self, name: &ChunkName) -> Result<Option<Bytes>, AzError> {
        self.get_accepting(name, Accept::full()).await
    }

    /// As [`get`](Self::get), but the rebuilt object is taken when `accept` says so (see
    /// [`Accept`]). Read repair writes stripes back only after the whole object checks
    /// against its name, in the background.
    pub async fn get_accepting(
        &self,
        name: &ChunkName,
        accept: Accept,
    ) -> Result<Option<Bytes>, AzError> {
        let inner = &self.inner;
        inner.counters.gets.inc();
        let (k, m) = (inner.codec.k(), inner.codec.m());
        let placed = inner.placement.place(name, k + m);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hedge = inner.cfg.hedge;
        let delay = match hedge {
            Hedge::P95 => inner.latencies.delay(),
            Hedge::Off | Hedge::All => None,
        };
        let mut order: Vec<usize> = (0..placed.len()).collect();
        let mut probes = 0;
        if delay.is_some() {
            // Nodes slow lately go after the others (the data stripes' nodes stay first
            // among the rest). One such read in PROBE_EVERY also asks them at once, not
            // counted on, so their latencies stay measured and a recovered node is seen.
            let (fast, slow): (Vec<usize>, Vec<usize>) = order
                .iter()
                .partition(|&&rank| !inner.latencies.is_slow(placed[rank]));
            if !slow.is_empty() && fast.len() >= k {
                if slow.iter().any(|&r| r < k) {
                    inner.counters.slow_skips.inc();
                }
                order = fast[..k].to_vec();
                if inner.latencies.probe_due() {
                    probes = slow.len();
                    order.extend(&slow);
                    order.extend(&fast[k..]);
                } else {
                    order.extend(&fast[k..]);
                    order.extend(&slow);
                }
            }
        }
        let mut ask = Asker {
            inner: Arc::clone(inner),
            placed: &placed,
            key: Arc::from(chunk_key(name, k, m)),
            name: *name,
            tx,
            order,
            next: 0,
            pending: 0,
            flights: Vec::with_capacity(k + m),
        };
        let start = Instant::now();
        // A p95 read with no delay yet (a fresh client) asks everyone, as `all` does.
        if hedge == Hedge::All || (hedge == Hedge::P95 && delay.is_none()) {
            while ask.next() {}
        } else {
            while ask.live() < k && ask.next() {}
            for _ in 0..probes {
                ask.next_as(false);
            }
        }
        let escalate_at = start + inner.cfg.node_timeout / 2;
        let give_up_at = start + inner.cfg.node_timeout;

        let mut g = Gather::new(k, k + m);
        // Wait for k distinct stripes, or until they cannot come.
        while !g.enough() {
            // Keep enough requests that may yet bring a new stripe.
            while g.distinct + ask.live() < k && ask.next() {
                inner.counters.fallbacks.inc();
            }
            if g.distinct + ask.pending < k {
                break;
            }
            let hedge_at = delay.and_then(|d| ask.first_live_since().map(|t| t + d));
            let escalated = Instant::now() >= escalate_at;
            let wake = match hedge_at {
                Some(h) if !escalated => h.min(escalate_at),
                _ if !escalated => escalate_at,
                _ => give_up_at,
            };
            tokio::select! {
                got = rx.recv() => {
                    let Some((rank, answer)) = got else {
                        break;
                    };
                    ask.answered(rank);
                    g.add(rank, answer);
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if now >= give_up_at {
                        break;
                    }
                    if now >= escalate_at {
                        // Half the time is gone: ask everyone left.
                        while ask.next() {
                            inner.counters.hedges.inc();
                        }
                    } else if let Some(d) = delay {
                        // One more node for each request slower than the delay.
                        for late in ask.overdue(now, d) {
                            ask.flights[late].live = false;
                            inner.latencies.late(placed[ask.flights[late].rank]);
                            if ask.next() {
                                inner.counters.hedges.inc();
                            }
                        }
                    }
                }
            }
        }
        if !g.enough() {
            inner.counters.misses.inc();
            return Ok(None);
        }
        let (mut found, mut failed) = self.rebuild(name, &g.candidates, false, &accept).await?;
        if found.is_none() {
            // A stripe that passed its own checks is wrong. Hear from every node, then
            // try the combinations the newcomers make possible.
            let before = g.candidates.len();
            while ask.next() {
                inner.counters.fallbacks.inc();
            }
            while ask.pending > 0 {
                let Some((rank, answer)) = rx.recv().await else {
                    break;
                };
                ask.answered(rank);
                g.add(rank, answer);
            }
            if g.candidates.len() > before {
                let (again, f) = self.rebuild(name, &g.candidates, true, &accept).await?;
                (found, failed) = (again, failed + f);
            }
        }
        if failed > 0 {
            inner.counters.integrity_failures.inc();
        }
        let Some(rebuilt) = found else {
            inner.counters.misses.inc();
            return Ok(None);
        };
        inner.counters.hits.inc();
        if rebuilt.from_parity {
            inner.counters.rebuilds.inc();
        }
        for &bad in &rebuilt.bad {
            let rank = g.ranks[bad];
            inner.nodes[placed[rank]].counters.integrity_failures.inc();
        }
        let chunk = Bytes::from(rebuilt.chunk);
        let something_to_fix = !rebuilt.bad.is_empty()
            || g.answers
                .iter()
                .any(|a| matches!(a, Some(Answer::Miss | Answer::Invalid)));
        // Replies still out may also call for repair; hear them in the background.
        let pending = ask.pending;
        drop(ask);
        if inner.cfg.read_repair && (pending > 0 || something_to_fix) {
            let bad_ranks: Vec<usize> = rebuilt.bad.iter().map(|&i| g.ranks[i]).collect();
            let this = Arc::clone(inner);
            let (name, chunk) = (*name, chunk.clone());
            let partial = !accept.is_full();
            tokio::spawn(async move {
                // Never write back stripes of an object only partly checked.
                if partial {
                    let c = chunk.clone();
                    let whole = tokio::task::spawn_blocking(move || {
                        lode_format::check_object(&name, &c).is_ok()
                    });
                    if !matches!(whole.await, Ok(true)) {
                        return;
                    }
                }
                this.repair(name, chunk, placed, g, bad_ranks, rx, pending)
                    .await;
            });
        }
        Ok(Some(chunk))
    }

    /// Decodes and checks without stalling the runtime: on a multi-threaded runtime in
    /// place (`block_in_place`: the read that waits for it pays no wake-up of a pool
    /// thread, which costs tens of µs on an idle VM), elsewhere on the blocking pool.
    async fn rebuild(
        &self,
        name: &ChunkName,
        candidates: &[Stripe],
        find_bad: bool,
        accept: &Accept,
    ) -> Result<(Option<Rebuilt>, usize), AzError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let codec = &self.inner.codec;
        let multi =
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        if multi {
            return Ok(tokio::task::block_in_place(|| {
                codec.rebuild_accepting(name, candidates, find_bad, &*accept.check)
            }));
        }
        let codec = Arc::clone(codec);
        let (name, cands, accept) = (*name, candidates.to_vec(), accept.clone());
        tokio::task::spawn_blocking(move || {
            codec.rebuild_accepting(&name, &cands, find_bad, &*accept.check)
        })
        .await
        .map_err(|e| AzError::Task {
            chunk: name,
            what: "rebuild",
            message: e.to_string(),
        })
    }

    /// Stores chunk `name` (whose bytes the caller has checked): encodes it and writes
    /// its `k + m` stripes to their nodes at once, skipping nodes marked down. An
    /// [`AzError::Incomplete`] says how many stripes were stored (with at least `k`,
    /// the chunk is readable).
    pub async fn put(&self, name: &ChunkName, ciphertext: Bytes) -> Result<(), AzError> {
        let inner = &self.inner;
        inner.counters.puts.inc();
        let codec = &inner.codec;
        let stripe_len = codec.stripe_len(ciphertext.len());
        if stripe_len > inner.cfg.max_value {
            inner.counters.incomplete_puts.inc();
            return Err(AzError::TooLarge {
                chunk: *name,
                len: ciphertext.len(),
                stripe_len,
                max_value: inner.cfg.max_value,
            });
        }
        let stripes = self.encode(name, ciphertext).await?;
        let placed = inner.placement.place(name, codec.total());
        let key: Arc<str> = Arc::from(self.key(name));
        let total = stripes.len();
        let mut writes = JoinSet::new();
        let mut reason = None;
        for (&n, stripe) in placed.iter().zip(stripes) {
            let node = &inner.nodes[n];
            if !node.available() {
                reason.get_or_insert_with(|| format!("node {} is down", node.addr));
                continue;
            }
            let (node, key) = (Arc::clone(node), Arc::clone(&key));
            writes.spawn(async move { store(&node, &key, &stripe).await });
        }
        let mut stored = 0;
        while let Some(r) = writes.join_next().await {
            match r {
                Ok(Ok(())) => stored += 1,
                Ok(Err(why)) => {
                    reason.get_or_insert(why);
                }
                Err(e) => {
                    reason.get_or_insert_with(|| e.to_string());
                }
            }
        }
        if stored == total {
            return Ok(());
        }
        inner.counters.incomplete_puts.inc();
        Err(AzError::Incomplete {
            chunk: *name,
            stored,
            total,
            reason: reason.unwrap_or_default(),
        })
    }

    async fn encode(&self, name: &ChunkName, ciphertext: Bytes) -> Result<Vec<Bytes>, AzError> {
        let codec = Arc::clone(&self.inner.codec);
        let name = *name;
        tokio::task::spawn_blocking(move || codec.encode(&name, &ciphertext))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|message| AzError::Task {
                chunk: name,
                what: "encode",
                message,
            })
    }

    /// Deletes chunk `name`'s stripes from its nodes (best effort: nodes marked down
    /// are skipped, failures ignored). For a chunk found wrong after the fact.
    pub async fn remove(&self, name: &ChunkName) {
        let inner = &self.inner;
        let key: Arc<str> = Arc::from(self.key(name));
        let mut deletes = JoinSet::new();
        for n in inner.placement.place(name, inner.codec.total()) {
            let node = &inner.nodes[n];
            if node.available() {
                let (node, key) = (Arc::clone(node), Arc::clone(&key));
                deletes.spawn(async move { node.delete(&key).await });
            }
        }
        while deletes.join_next().await.is_some() {}
    }

    /// The counters, overall and per node.
    pub fn metrics(&self) -> AzMetrics {
        let c = &self.inner.counters;
        AzMetrics {
            gets: c.gets.get(),
            hits: c.hits.get(),
            misses: c.misses.get(),
            rebuilds: c.rebuilds.get(),
            integrity_failures: c.integrity_failures.get(),
            puts: c.puts.get(),
            incomplete_puts: c.incomplete_puts.get(),
            repairs: c.repairs.get(),
            stripe_requests: c.stripe_requests.get(),
            stripe_bytes: c.stripe_bytes.get(),
            hedges: c.hedges.get(),
            fallbacks: c.fallbacks.get(),
            slow_skips: c.slow_skips.get(),
            hedge_delay_us: match (self.inner.cfg.hedge, self.inner.latencies.delay()) {
                (Hedge::P95, Some(d)) => u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
                _ => 0,
            },
            nodes: self.inner.nodes.iter().map(|n| n.metrics()).collect(),
        }
    }
}

/// One node's answer to a read of one chunk, counted on the node.
async fn fetch(inner: &Inner, n: usize, key: &str, name: &ChunkName) -> Answer {
    let (node, k, m) = (&inner.nodes[n], inner.codec.k(), inner.codec.m());
    let start = Instant::now();
    let got = node.get(key).await;
    if got.is_ok() {
        inner.latencies.record(n, start.elapsed());
    }
    if let Ok(Some(value)) = &got {
        inner.counters.stripe_bytes.add(value.len());
    }
    match got {
        Ok(Some(value)) => match Stripe::parse(value).and_then(|s| s.check(name, k, m).map(|()| s))
        {
            Ok(s) => {
                node.counters.hits.inc();
                Answer::Stripe(s)
            }
            Err(_) => {
                node.counters.integrity_failures.inc();
                Answer::Invalid
            }
        },
        Ok(None) => {
            node.counters.misses.inc();
            Answer::Miss
        }
        // Counted by call().
        Err(_) => Answer::Failed,
    }
}

/// Writes one stripe to one node; the error is for the caller's message.
async fn store(node: &Node, key: &str, stripe: &Bytes) -> Result<(), String> {
    match node.set(key, stripe).await {
        Ok(true) => {
            node.counters.stores.inc();
            Ok(())
        }
        Ok(false) => Err(format!("node {} answered NOT_STORED", node.addr)),
        Err(Failure::Timeout) => Err(format!("node {} timed out", node.addr)),
        Err(Failure::Error(e)) => Err(format!("node {}: {e}", node.addr)),
    }
}

impl Inner {
    /// Read repair: hears the rest of a read's answers, then writes the right stripe to
    /// every node that answered without one or with a wrong one.
    #[allow(clippy::too_many_arguments)]
    async fn repair(
        self: Arc<Self>,
        name: ChunkName,
        chunk: Bytes,
        placed: Vec<usize>,
        mut g: Gather,
        bad_ranks: Vec<usize>,
        mut rx: mpsc::UnboundedReceiver<(usize, Answer)>,
        mut pending: usize,
    ) {
        while pending > 0 {
            let Some((rank, answer)) = rx.recv().await else {
                break;
            };
            pending -= 1;
            g.add(rank, answer);
        }
        let total = self.codec.total();
        // Indices known to be held (right, as far as anyone checked), and indices that
        // nodes which did not answer were last given (their rank): leave both alone.
        let mut taken = [false; MAX_STRIPES];
        for (s, rank) in g.candidates.iter().zip(&g.ranks) {
            if !bad_ranks.contains(rank) {
                taken[s.index()] = true;
            }
        }
        let mut targets = Vec::new();
        for (rank, answer) in g.answers.iter().enumerate() {
            match answer {
                Some(Answer::Miss | Answer::Invalid) => targets.push(rank),
                Some(Answer::Stripe(_)) if bad_ranks.contains(&rank) => targets.push(rank),
                Some(Answer::Stripe(_)) => {}
                None | Some(Answer::Failed) => taken[rank] = true,
            }
        }
        if targets.is_empty() {
            return;
        }
        let Ok(_permit) = self.repairs.try_acquire() else {
            return;
        };
        let mut plan = Vec::new();
        for rank in targets {
            // A node gets the stripe a fresh put would give it, if no one holds it;
            // otherwise any stripe no one holds.
            let index = if !taken[rank] {
                Some(rank)
            } else {
                (0..total).find(|&i| !taken[i])
            };
            if let Some(i) = index {
                taken[i] = true;
                plan.push((rank, i));
            }
        }
        if plan.is_empty() {
            return;
        }
        let codec = Arc::clone(&self.codec);
        let Ok(Ok(stripes)) =
            tokio::task::spawn_blocking(move || codec.encode(&name, &chunk)).await
        else {
            return;
        };
        let key = chunk_key(&name, self.codec.k(), self.codec.m());
        for (rank, index) in plan {
            let node = &self.nodes[placed[rank]];
            if store(node, &key, &stripes[index]).await.is_ok() {
                self.counters.repairs.inc();
            }
        }
    }
}
