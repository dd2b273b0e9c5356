//! The simulation: starts in time order, each reading its chunks through its worker's
//! local tiers, then the AZ fleet, then the origin.
//!
//! A worker's local tiers change only with that worker's own reads (whatever the AZ fleet
//! answers, a fetched chunk fills every local tier), so the local walks of different
//! workers are independent: they run on `threads` shards of the workers, one simulated
//! second at a time, and hand their misses, in start order, to one thread that owns the
//! shared AZ fleet and the origin and times the starts. That thread works on second `n`
//! while the shards walk second `n + 1`. Every draw comes from a generator owned by one
//! stage, so a report does not depend on the number of threads.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use lode_az::{Placement, PlacementKind};
use lode_evict::{Policy, PolicyKind};
use serde::Serialize;

use crate::calibration::Calibration;
use crate::hist::Histogram;
use crate::rng::Rng;
use crate::workload::{Catalog, Recorded, Start, Workload};

/// Bytes of a stripe's header (lode-az's stripe format).
pub const STRIPE_HEADER: u64 = 48;
const _: () = assert!(lode_az::stripe::HEADER_LEN == 48);

/// Memory one held key costs a policy, as the estimate counts it (an index entry, a node
/// in the eviction order, slack for growth).
pub const BYTES_PER_KEY: u64 = 96;

/// One local tier of every worker.
#[derive(Debug, Clone, PartialEq)]
pub struct TierSpec {
    /// Its name in reports.
    pub name: String,
    /// Bytes it holds.
    pub capacity: u64,
    /// Its eviction policy.
    pub policy: PolicyKind,
}

/// The fleet simulated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every worker's local tiers, fastest first.
    pub tiers: Vec<TierSpec>,
    /// AZ cache nodes (0: no AZ tier).
    pub nodes: u32,
    /// Bytes each node holds.
    pub node_capacity: u64,
    /// The nodes' eviction policy.
    pub node_policy: PolicyKind,
    /// How stripes are placed on the nodes.
    pub placement: PlacementKind,
    /// Bounded placement's ε.
    pub epsilon: f64,
    /// Data stripes of a chunk.
    pub k: u32,
    /// Parity stripes.
    pub m: u32,
    /// Whether an AZ hit writes back the stripes its nodes lacked (lode-az's read repair).
    pub read_repair: bool,
    /// Shards of the local walks (threads besides the AZ stage's).
    pub threads: usize,
    /// Seed of the latency draws.
    pub seed: u64,
}

/// The nodes' eviction policy: LRU-2, as `lode cache-node`'s default LRU-K.
pub fn default_node_policy() -> PolicyKind {
    PolicyKind::Lru2
}

/// Where the simulated fleet places a chunk's stripes: lode-az's own placement (either
/// kind) over node names, so the simulator places exactly as the AZ client does.
#[derive(Debug)]
struct StripePlacement(Placement);

impl StripePlacement {
    fn new(nodes: u32, kind: PlacementKind, epsilon: f64, slots: usize) -> Self {
        let names: Vec<String> = (0..nodes).map(|n| format!("node-{n}:11211")).collect();
        Self(Placement::new(kind, &names, slots, epsilon))
    }

    fn place(&self, names: Option<&[[u8; 32]]>, chunk: u32, count: usize) -> Vec<usize> {
        let name = Catalog::name_of(names, chunk);
        self.0
            .place_key(lode_az::placement::chunk_key(&name), count)
    }
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A parameter out of range.
    #[error("{0}")]
    Invalid(String),
    /// The estimated memory is over the limit.
    #[error(
        "the simulation would need about {need} MiB of memory, over the limit of {limit} MiB (--max-memory): fewer workers, smaller tiers or fewer nodes"
    )]
    TooBig {
        /// Estimated MiB.
        need: u64,
        /// The limit, MiB.
        limit: u64,
    },
}

/// Progress of a running simulation.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Simulated seconds done.
    pub simulated_s: f64,
    /// Simulated seconds in all.
    pub duration_s: f64,
    /// Starts done.
    pub starts: u64,
}

/// Reads served by one tier.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TierReport {
    /// The tier: a local tier's name, `az` or `origin`.
    pub name: String,
    /// Chunk reads it served.
    pub reads: u64,
    /// Their stored bytes.
    pub bytes: u64,
    /// Its share of all chunk reads.
    pub share: f64,
}

/// The origin's load.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OriginReport {
    /// Requests in all.
    pub requests: u64,
    /// Bytes in all.
    pub bytes: u64,
    /// Mean requests per simulated second.
    pub requests_per_s_mean: f64,
    /// The busiest second's requests.
    pub requests_per_s_peak: u64,
    /// Mean bytes per simulated second.
    pub bytes_per_s_mean: f64,
    /// The busiest second's bytes.
    pub bytes_per_s_peak: u64,
}

/// Start latencies (ms).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyReport {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

/// The AZ fleet's load.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AzReport {
    /// Nodes.
    pub nodes: u32,
    /// Stripe requests (gets) per node: mean.
    pub requests_mean: f64,
    /// The busiest node's.
    pub requests_max: u64,
    /// Busiest over mean (1 when balanced).
    pub imbalance: f64,
    /// Stripe writes (puts and repairs) in all.
    pub stripe_writes: u64,
    /// Bytes held at the end, all nodes.
    pub bytes_held: u64,
    /// Bytes held at the end, the fullest node.
    pub bytes_held_max: u64,
}

/// What a simulation predicts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// Workers.
    pub workers: u32,
    /// Starts simulated.
    pub starts: u64,
    /// Chunk reads simulated.
    pub reads: u64,
    /// Where the reads were served: each local tier, `az`, `origin`.
    pub tiers: Vec<TierReport>,
    /// What the traces recorded (traces only).
    pub recorded: Option<Recorded>,
    /// The origin's load.
    pub origin: OriginReport,
    /// Start latencies.
    pub start_latency: LatencyReport,
    /// The AZ fleet's load.
    pub az: AzReport,
    /// Simulated seconds.
    pub simulated_s: f64,
}

/// One worker's local tiers.
struct Worker {
    tiers: Vec<Box<dyn Policy<u32>>>,
}

/// A shard of the workers: those whose number is `shard` modulo the shard count.
struct Shard {
    workers: Vec<Worker>,
    hits: Vec<u64>,
    hit_bytes: Vec<u64>,
    evicted: Vec<u32>,
}

/// What a shard's walk of one batch left for the AZ stage.
#[derive(Default)]
struct ShardOut {
    /// Per start of this shard (in batch order): its misses' range in `misses`.
    ranges: Vec<(u32, u32)>,
    /// (chunk, bytes) of every miss.
    misses: Vec<(u32, u32)>,
}

struct Batch {
    starts: Vec<Start>,
    shards: Vec<ShardOut>,
}

impl Shard {
    fn walk(
        &mut self,
        shard: usize,
        shards: usize,
        batch: &[Start],
        catalog: &Catalog,
    ) -> ShardOut {
        let mut out = ShardOut::default();
        let mine: Vec<&Start> = batch
            .iter()
            .filter(|s| usize::try_from(s.worker).unwrap_or(0) % shards == shard)
            .collect();
        // One worker's starts one after the other (in their time order): its policies
        // stay in the CPU's caches, where walking the starts in time order would visit
        // another worker's every time.
        let mut order: Vec<usize> = (0..mine.len()).collect();
        order.sort_by_key(|&i| mine[i].worker);
        out.ranges = vec![(0, 0); mine.len()];
        for i in order {
            let s = mine[i];
            let begin = u32::try_from(out.misses.len()).unwrap_or(u32::MAX);
            let w = usize::try_from(s.worker).unwrap_or(0);
            let worker = &mut self.workers[w / shards];
            for &c in &catalog.lists[usize::try_from(s.list).unwrap_or(0)] {
                let bytes = catalog.chunk_bytes[usize::try_from(c).unwrap_or(0)];
                let mut found = worker.tiers.len();
                for (i, t) in worker.tiers.iter_mut().enumerate() {
                    if t.touch(&c) {
                        found = i;
                        break;
                    }
                }
                if found < worker.tiers.len() {
                    self.hits[found] += 1;
                    self.hit_bytes[found] += u64::from(bytes);
                } else {
                    out.misses.push((c, bytes));
                }
                // What is found is copied into every tier above where it was found.
                for t in &mut worker.tiers[..found] {
                    t.insert(c, u64::from(bytes), &mut self.evicted);
                    self.evicted.clear();
                }
            }
            out.ranges[i] = (begin, u32::try_from(out.misses.len()).unwrap_or(u32::MAX));
        }
        out
    }
}

/// The shared stage: the AZ fleet, the origin, the start clock.
struct Shared<'a> {
    cal: &'a Calibration,
    names: Option<std::sync::Arc<Vec<[u8; 32]>>>,
    nodes: Vec<Box<dyn Policy<u32>>>,
    node_gets: Vec<u64>,
    stripe_writes: u64,
    placement: StripePlacement,
    /// Placed nodes of each chunk, `per_chunk` per chunk; u16::MAX: not yet placed.
    placed: Vec<u16>,
    per_chunk: usize,
    k: usize,
    read_repair: bool,
    rng: Rng,
    lanes: Vec<u64>,
    latency: Histogram,
    az_hits: u64,
    az_bytes: u64,
    origin_requests: u64,
    origin_bytes: u64,
    second: u64,
    second_requests: u64,
    second_bytes: u64,
    peak_requests: u64,
    peak_bytes: u64,
    starts: u64,
    evicted: Vec<u32>,
}

impl Shared<'_> {
    fn placed_of(&mut self, c: u32) -> &[u16] {
        let i = usize::try_from(c).unwrap_or(0) * self.per_chunk;
        if self.placed.len() < i + self.per_chunk {
            self.placed.resize(i + self.per_chunk, u16::MAX);
        }
        if self.placed[i] == u16::MAX {
            let p =
                self.placement
                    .place(self.names.as_deref().map(Vec::as_slice), c, self.per_chunk);
            for (j, n) in p.into_iter().enumerate() {
                self.placed[i + j] = u16::try_from(n).unwrap_or(0);
            }
        }
        &self.placed[i..i + self.per_chunk]
    }

    fn tick(&mut self, t_us: u64) {
        let second = t_us / 1_000_000;
        if second != self.second {
            self.peak_requests = self.peak_requests.max(self.second_requests);
            self.peak_bytes = self.peak_bytes.max(self.second_bytes);
            self.second = second;
            self.second_requests = 0;
            self.second_bytes = 0;
        }
    }

    /// Fetches chunk `c` of `bytes` from the AZ fleet or the origin; returns its latency
    /// (µs) and whether the origin served it.
    fn fetch(&mut self, c: u32, bytes: u32) -> (u64, bool) {
        if self.per_chunk > 0 {
            let k = u64::try_from(self.k).unwrap_or(1).max(1);
            let stripe = u64::from(bytes).div_ceil(k) + STRIPE_HEADER;
            let mut placed = [0u16; 64];
            let n = self.per_chunk;
            placed[..n].copy_from_slice(self.placed_of(c));
            // As lode-az's client reads (its default, hedging past the p95, with no node
            // slow): the k data nodes first, then the next node in placement order for
            // each that misses, until k stripes are found or no node is left.
            let mut held = 0;
            let mut asked = 0;
            for &node in &placed[..n] {
                if held >= self.k {
                    break;
                }
                asked += 1;
                let node = usize::from(node);
                self.node_gets[node] += 1;
                if self.nodes[node].touch(&c) {
                    held += 1;
                }
            }
            if held >= self.k {
                if self.read_repair && held < asked {
                    // Read repair writes back to the nodes asked that missed.
                    for &node in &placed[..asked] {
                        let node = usize::from(node);
                        if !self.nodes[node].contains(&c) {
                            self.nodes[node].insert(c, stripe, &mut self.evicted);
                            self.evicted.clear();
                            self.stripe_writes += 1;
                        }
                    }
                }
                self.az_hits += 1;
                self.az_bytes += u64::from(bytes);
                return (self.cal.az.sample(&mut self.rng), false);
            }
            // The origin fetch writes all the chunk's stripes.
            for &node in &placed[..n] {
                self.nodes[usize::from(node)].insert(c, stripe, &mut self.evicted);
                self.evicted.clear();
                self.stripe_writes += 1;
            }
        }
        self.origin_requests += 1;
        self.origin_bytes += u64::from(bytes);
        self.second_requests += 1;
        self.second_bytes += u64::from(bytes);
        (self.cal.origin.sample(&mut self.rng), true)
    }

    fn batch(&mut self, b: &Batch) {
        let shards = b.shards.len();
        let mut cursor = vec![0usize; shards];
        for s in &b.starts {
            self.tick(s.t_us);
            let sh = usize::try_from(s.worker).unwrap_or(0) % shards;
            let out = &b.shards[sh];
            let (begin, end) = out.ranges[cursor[sh]];
            let (begin, end) = (
                usize::try_from(begin).unwrap_or(0),
                usize::try_from(end).unwrap_or(0),
            );
            cursor[sh] += 1;
            // The fetches over the lanes: each to the lane free first.
            self.lanes.iter_mut().for_each(|l| *l = 0);
            let (mut az_bytes, mut origin_bytes) = (0u64, 0u64);
            for &(c, bytes) in &out.misses[begin..end] {
                let (lat, origin) = self.fetch(c, bytes);
                if origin {
                    origin_bytes += u64::from(bytes);
                } else {
                    az_bytes += u64::from(bytes);
                }
                let lane = self.lanes.iter_mut().min().expect("at least one lane");
                *lane += lat;
            }
            let span = self.lanes.iter().copied().max().unwrap_or(0);
            let floor = crate::f2u(
                (az_bytes as f64 / self.cal.az_bandwidth
                    + origin_bytes as f64 / self.cal.origin_bandwidth)
                    * 1e6,
            );
            self.latency.record(s.warm_us + span.max(floor));
            self.starts += 1;
        }
    }
}

/// The simulated time a batch spans: enough for each worker to start a few images (the
/// shards walk one worker's starts of a batch together, for locality), 1 to 60 s.
fn batch_span_us(w: &Workload) -> u64 {
    let rate = w.expected_starts / w.duration_s;
    crate::f2u((8.0 * f64::from(w.workers) / rate.max(1e-9)).clamp(1.0, 60.0) * 1e6)
}

/// Estimated peak memory (bytes) of simulating `w` on `config`.
pub fn estimate_memory(config: &Config, w: &Workload) -> u64 {
    let mean = w.catalog.mean_chunk_bytes().max(1);
    // Synthetic bursts add chunks as they run: count those the run will make.
    let chunks = (w.catalog.chunk_bytes.len() as f64 + w.new_chunks).max(1.0);
    let keys = |capacity: u64, size: u64| (capacity / size.max(1)).min(crate::f2u(chunks));
    let local: u64 = config.tiers.iter().map(|t| keys(t.capacity, mean)).sum();
    let stripe = mean.div_ceil(u64::from(config.k.max(1))) + STRIPE_HEADER;
    let az = keys(config.node_capacity, stripe);
    let workers = u64::from(w.workers);
    let starts_per_batch =
        (w.expected_starts / w.duration_s * batch_span_us(w) as f64 / 1e6).ceil();
    local.saturating_mul(BYTES_PER_KEY).saturating_mul(workers)
        + workers * 256
        + u64::from(config.nodes).saturating_mul(az).saturating_mul(BYTES_PER_KEY)
        + crate::f2u(chunks * (4.0 + 2.0 * f64::from(config.k + config.m) + 4.0))
        // Four batches in flight (two queued, one in the AZ stage, one being walked):
        // each start and each read's miss record.
        + crate::f2u(starts_per_batch * (32.0 + w.reads_per_start * 8.0) * 4.0)
        + (64 << 20)
}

/// Runs `workload` on the fleet of `config`; `progress` hears how far it is (at most
/// every `every`). Refuses a run estimated above `max_memory` bytes.
pub fn run(
    config: &Config,
    cal: &Calibration,
    workload: &mut Workload,
    max_memory: u64,
    every: Duration,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, SimError> {
    if config
        .tiers
        .iter()
        .any(|t| t.name == "az" || t.name == "origin")
    {
        return Err(SimError::Invalid(
            "a local tier may not be named az or origin".into(),
        ));
    }
    if config.nodes > 0 && (config.k == 0 || config.k + config.m > 64) {
        return Err(SimError::Invalid(format!(
            "k = {} and m = {}: k must be at least 1 and k + m at most 64",
            config.k, config.m
        )));
    }
    if config.nodes >= u32::from(u16::MAX) {
        return Err(SimError::Invalid(format!(
            "{} nodes: at most 65534",
            config.nodes
        )));
    }
    let need = estimate_memory(config, workload);
    if need > max_memory {
        return Err(SimError::TooBig {
            need: need >> 20,
            limit: max_memory >> 20,
        });
    }
    let shards = config.threads.clamp(1, 64);
    let workers = usize::try_from(workload.workers).unwrap_or(0);
    let mut state: Vec<Shard> = (0..shards)
        .map(|s| Shard {
            workers: (s..workers)
                .step_by(shards)
                .map(|_| Worker {
                    tiers: config
                        .tiers
                        .iter()
                        .map(|t| t.policy.build(t.capacity))
                        .collect(),
                })
                .collect(),
            hits: vec![0; config.tiers.len()],
            hit_bytes: vec![0; config.tiers.len()],
            evicted: Vec::new(),
        })
        .collect();
    let per_chunk = if config.nodes == 0 {
        0
    } else {
        usize::try_from((config.k + config.m).min(config.nodes)).unwrap_or(0)
    };
    let mut shared = Shared {
        cal,
        names: workload.catalog.names.clone(),
        nodes: (0..config.nodes)
            .map(|_| config.node_policy.build(config.node_capacity))
            .collect(),
        node_gets: vec![0; usize::try_from(config.nodes).unwrap_or(0)],
        stripe_writes: 0,
        placement: StripePlacement::new(
            config.nodes,
            config.placement,
            config.epsilon,
            usize::try_from(config.k + config.m).unwrap_or(usize::MAX),
        ),
        placed: Vec::new(),
        per_chunk,
        k: usize::try_from(config.k).unwrap_or(1),
        read_repair: config.read_repair,
        rng: Rng::new(config.seed, 2),
        lanes: vec![0; usize::try_from(cal.lanes).unwrap_or(1)],
        latency: Histogram::default(),
        az_hits: 0,
        az_bytes: 0,
        origin_requests: 0,
        origin_bytes: 0,
        second: 0,
        second_requests: 0,
        second_bytes: 0,
        peak_requests: 0,
        peak_bytes: 0,
        starts: 0,
        evicted: Vec::new(),
    };

    let duration_s = workload.duration_s;
    let mut last_progress = Instant::now();
    let mut starts_sent = 0u64;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Batch>(2);
        let shared_stage = scope.spawn(move || {
            for b in rx {
                shared.batch(&b);
            }
            shared
        });
        let span_us = batch_span_us(workload);
        let mut until = 0u64;
        loop {
            until += span_us;
            let mut starts = Vec::new();
            let more = workload.next_batch(until, &mut starts);
            let catalog = &workload.catalog;
            let outs: Vec<ShardOut> = if shards == 1 {
                vec![state[0].walk(0, 1, &starts, catalog)]
            } else {
                std::thread::scope(|s| {
                    let handles: Vec<_> = state
                        .iter_mut()
                        .enumerate()
                        .map(|(i, sh)| {
                            let starts = &starts;
                            s.spawn(move || sh.walk(i, shards, starts, catalog))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("a shard's walk panicked"))
                        .collect()
                })
            };
            starts_sent += u64::try_from(starts.len()).unwrap_or(0);
            if tx
                .send(Batch {
                    starts,
                    shards: outs,
                })
                .is_err()
            {
                break;
            }
            if last_progress.elapsed() >= every {
                last_progress = Instant::now();
                progress(Progress {
                    simulated_s: (until as f64 / 1e6).min(duration_s),
                    duration_s,
                    starts: starts_sent,
                });
            }
            if !more {
                break;
            }
        }
        drop(tx);
        let mut shared = shared_stage.join().expect("the AZ stage panicked");
        shared.tick(u64::MAX);
        Ok(report(config, workload, &state, &shared))
    })
}

fn report(config: &Config, w: &Workload, shards: &[Shard], s: &Shared<'_>) -> Report {
    let mut tiers: Vec<TierReport> = config
        .tiers
        .iter()
        .enumerate()
        .map(|(i, t)| TierReport {
            name: t.name.clone(),
            reads: shards.iter().map(|s| s.hits[i]).sum(),
            bytes: shards.iter().map(|s| s.hit_bytes[i]).sum(),
            share: 0.0,
        })
        .collect();
    tiers.push(TierReport {
        name: "az".into(),
        reads: s.az_hits,
        bytes: s.az_bytes,
        share: 0.0,
    });
    tiers.push(TierReport {
        name: "origin".into(),
        reads: s.origin_requests,
        bytes: s.origin_bytes,
        share: 0.0,
    });
    let reads: u64 = tiers.iter().map(|t| t.reads).sum();
    for t in &mut tiers {
        t.share = if reads == 0 {
            0.0
        } else {
            t.reads as f64 / reads as f64
        };
    }
    let gets_total: u64 = s.node_gets.iter().sum();
    let nodes = u32::try_from(s.nodes.len()).unwrap_or(u32::MAX);
    let requests_mean = if nodes == 0 {
        0.0
    } else {
        gets_total as f64 / f64::from(nodes)
    };
    let requests_max = s.node_gets.iter().copied().max().unwrap_or(0);
    let ms = |us: u64| us as f64 / 1000.0;
    Report {
        workers: w.workers,
        starts: s.starts,
        reads,
        tiers,
        recorded: w.recorded.clone(),
        origin: OriginReport {
            requests: s.origin_requests,
            bytes: s.origin_bytes,
            requests_per_s_mean: s.origin_requests as f64 / w.duration_s,
            requests_per_s_peak: s.peak_requests,
            bytes_per_s_mean: s.origin_bytes as f64 / w.duration_s,
            bytes_per_s_peak: s.peak_bytes,
        },
        start_latency: LatencyReport {
            p50_ms: ms(s.latency.quantile(0.5)),
            p90_ms: ms(s.latency.quantile(0.9)),
            p99_ms: ms(s.latency.quantile(0.99)),
            mean_ms: s.latency.mean() / 1000.0,
        },
        az: AzReport {
            nodes,
            requests_mean,
            requests_max,
            imbalance: if requests_mean > 0.0 {
                requests_max as f64 / requests_mean
            } else {
                0.0
            },
            stripe_writes: s.stripe_writes,
            bytes_held: s.nodes.iter().map(|n| n.used()).sum(),
            bytes_held_max: s.nodes.iter().map(|n| n.used()).max().unwrap_or(0),
        },
        simulated_s: w.duration_s,
    }
}

/// A window of `window_s` in µs, at most the whole run of `duration_s` (and at least 1).
pub(crate) fn window_us(window_s: f64, duration_s: f64) -> u64 {
    crate::f2u((window_s.min(duration_s + 1.0) * 1e6).ceil()).max(1)
}

/// The process's peak resident memory (VmHWM), when the system tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Placement, SyntheticSpec};

    fn spec(seed: u64) -> SyntheticSpec {
        SyntheticSpec {
            functions: 20,
            zipf: 1.1,
            seed,
            rate: 40.0,
            duration_s: 30.0,
            workers: 8,
            placement: Placement::Random,
            burst_every_s: None,
            burst_images: 0,
        }
    }

    fn config(memory: u64, disk: u64, nodes: u32, threads: usize) -> Config {
        Config {
            tiers: vec![
                TierSpec {
                    name: "memory".into(),
                    capacity: memory,
                    policy: PolicyKind::Lru,
                },
                TierSpec {
                    name: "disk".into(),
                    capacity: disk,
                    policy: PolicyKind::Lru,
                },
            ],
            nodes,
            node_capacity: 64 << 20,
            node_policy: PolicyKind::Lru,
            placement: lode_az::PlacementKind::Rendezvous,
            epsilon: 0.25,
            k: 4,
            m: 2,
            read_repair: true,
            threads,
            seed: 1,
        }
    }

    fn sim(c: &Config, s: SyntheticSpec) -> Report {
        let cal = Calibration::built_in();
        let mut w = Workload::synthetic(s, &cal).unwrap();
        run(
            c,
            &cal,
            &mut w,
            u64::MAX,
            Duration::from_secs(3600),
            &mut |_| {},
        )
        .unwrap()
    }

    fn share(r: &Report, name: &str) -> f64 {
        r.tiers.iter().find(|t| t.name == name).unwrap().share
    }

    #[test]
    fn shares_sum_to_one_and_counts_add_up() {
        let r = sim(&config(32 << 20, 96 << 20, 6, 2), spec(3));
        assert!(r.starts > 1000, "{}", r.starts);
        let total: f64 = r.tiers.iter().map(|t| t.share).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert_eq!(r.tiers.iter().map(|t| t.reads).sum::<u64>(), r.reads);
        assert!(share(&r, "memory") > 0.0 && share(&r, "origin") > 0.0);
        assert!(r.start_latency.p50_ms >= 150.0);
        assert!(r.start_latency.p50_ms <= r.start_latency.p90_ms);
        assert!(r.start_latency.p90_ms <= r.start_latency.p99_ms);
        assert!(r.az.bytes_held > 0 && r.az.imbalance >= 1.0);
    }

    #[test]
    fn same_seed_same_report_whatever_the_threads() {
        let a = sim(&config(8 << 20, 32 << 20, 6, 1), spec(9));
        let b = sim(&config(8 << 20, 32 << 20, 6, 3), spec(9));
        assert_eq!(a, b);
        let c = sim(&config(8 << 20, 32 << 20, 6, 1), spec(10));
        assert_ne!(a, c);
    }

    #[test]
    fn a_bigger_local_cache_never_lowers_the_local_hit_rate_under_lru() {
        // One tier, so LRU's inclusion property holds for the tier as a whole.
        let mut prev = -1.0;
        for mib in [0u64, 4, 16, 64, 256] {
            let mut c = config(mib << 20, 0, 6, 2);
            c.tiers.truncate(1);
            let r = sim(&c, spec(4));
            let local = share(&r, "memory");
            assert!(local >= prev, "{mib} MiB: {local} < {prev}");
            prev = local;
        }
        assert!(prev > 0.5);
    }

    #[test]
    fn zero_local_capacity_sends_every_read_to_az_or_origin() {
        let r = sim(&config(0, 0, 6, 2), spec(5));
        assert_eq!(share(&r, "memory"), 0.0);
        assert_eq!(share(&r, "disk"), 0.0);
        assert!((share(&r, "az") + share(&r, "origin") - 1.0).abs() < 1e-9);
        assert!(share(&r, "az") > 0.5);
    }

    #[test]
    fn no_nodes_sends_every_miss_to_the_origin() {
        let r = sim(&config(8 << 20, 8 << 20, 0, 2), spec(6));
        assert_eq!(share(&r, "az"), 0.0);
        let local = share(&r, "memory") + share(&r, "disk");
        assert!((local + share(&r, "origin") - 1.0).abs() < 1e-9);
        assert_eq!(r.az.requests_max, 0);
    }

    #[test]
    fn bursts_of_one_off_images_add_starts_and_origin_fetches() {
        let mut s = spec(2);
        s.burst_every_s = Some(10.0);
        s.burst_images = 50;
        let with = sim(&config(32 << 20, 96 << 20, 6, 2), s.clone());
        let without = sim(&config(32 << 20, 96 << 20, 6, 2), spec(2));
        // Two bursts (at 10 s and 20 s) of 50 starts each.
        assert!(
            with.starts >= without.starts + 100 - 5,
            "{} vs {}",
            with.starts,
            without.starts
        );
        assert!(with.origin.requests > without.origin.requests);
    }

    #[test]
    fn sticky_placement_raises_local_hits() {
        let mut s = spec(8);
        s.workers = 32;
        let random = sim(&config(8 << 20, 16 << 20, 6, 2), s.clone());
        s.placement = Placement::Sticky(2);
        let sticky = sim(&config(8 << 20, 16 << 20, 6, 2), s);
        let local = |r: &Report| share(r, "memory") + share(r, "disk");
        assert!(
            local(&sticky) > local(&random),
            "{} vs {}",
            local(&sticky),
            local(&random)
        );
    }

    #[test]
    fn no_nodes_needs_no_valid_code() {
        let mut c = config(1 << 20, 0, 0, 1);
        c.k = 0;
        c.m = 0;
        let r = sim(&c, spec(1));
        assert_eq!(share(&r, "az"), 0.0);
        c.nodes = 3;
        let cal = Calibration::built_in();
        let mut w = Workload::synthetic(spec(1), &cal).unwrap();
        let e = run(
            &c,
            &cal,
            &mut w,
            u64::MAX,
            Duration::from_secs(9),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("k must be at least 1"), "{e}");
    }

    #[test]
    fn fewer_nodes_than_k_never_hit() {
        let mut c = config(0, 0, 3, 1);
        c.k = 4;
        let r = sim(&c, spec(1));
        assert_eq!(share(&r, "az"), 0.0);
        assert_eq!(share(&r, "origin"), 1.0);
        // Every origin fetch wrote a stripe to each of the three nodes.
        assert_eq!(r.az.stripe_writes, 3 * r.origin.requests);
    }

    #[test]
    fn memory_over_the_limit_is_refused() {
        let cal = Calibration::built_in();
        let mut s = spec(1);
        s.workers = 1_000_000;
        let mut w = Workload::synthetic(s, &cal).unwrap();
        let e = run(
            &config(1 << 30, 1 << 30, 6, 1),
            &cal,
            &mut w,
            8 << 30,
            Duration::from_secs(1),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("over the limit of 8192 MiB"), "{e}");
    }
}
