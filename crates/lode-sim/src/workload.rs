//! Workloads: what starts where and when, and what each start reads. A synthetic Zipf
//! workload over function images built on a few base images (like scripts/bench.py's
//! replay, with optional bursts of one-off images), or recorded traces merged by time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use lode_az::placement::Rendezvous;
use lode_format::ChunkName;

use crate::calibration::{Base, Calibration};
use crate::rng::{Rng, mix};
use crate::trace::{self, Event, Tier, TraceError};

/// One start: at `t_us` on worker `worker`, reading read list `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Simulated time, µs.
    pub t_us: u64,
    /// The worker.
    pub worker: u32,
    /// The read list (an index into [`Catalog::lists`]).
    pub list: u32,
    /// The image's warm start time, µs.
    pub warm_us: u64,
}

/// The chunks and read lists of a workload. Chunks are interned: a chunk is a `u32` with a
/// stored size; a chunk shared by several images is one chunk.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Stored bytes of each chunk.
    pub chunk_bytes: Vec<u32>,
    /// Read lists: the chunks a start reads, in order.
    pub lists: Vec<Vec<u32>>,
    /// Chunk names, for traces (synthetic chunks get names derived from their number).
    pub names: Option<Arc<Vec<[u8; 32]>>>,
}

impl Catalog {
    fn add_chunks(&mut self, n: u32, bytes_each: impl Fn(u32) -> u32) -> Vec<u32> {
        let first = u32::try_from(self.chunk_bytes.len()).expect("fewer than 2^32 chunks");
        (0..n)
            .map(|i| {
                self.chunk_bytes.push(bytes_each(i));
                first + i
            })
            .collect()
    }

    /// The name of chunk `c`: recorded, or derived from its number.
    pub fn name_of(names: Option<&[[u8; 32]]>, c: u32) -> ChunkName {
        if let Some(n) = names.and_then(|n| n.get(usize::try_from(c).unwrap_or(usize::MAX))) {
            return ChunkName::from_bytes(*n);
        }
        let mut b = [0u8; 32];
        for (i, part) in b.chunks_exact_mut(8).enumerate() {
            let word = mix(u64::from(c) ^ (u64::try_from(i).unwrap_or(0) << 40));
            part.copy_from_slice(&word.to_le_bytes());
        }
        ChunkName::from_bytes(b)
    }

    /// Mean stored bytes of a chunk (256 KiB when there are none yet).
    pub fn mean_chunk_bytes(&self) -> u64 {
        if self.chunk_bytes.is_empty() {
            return 256 << 10;
        }
        let sum: u64 = self.chunk_bytes.iter().map(|&b| u64::from(b)).sum();
        sum / u64::try_from(self.chunk_bytes.len()).unwrap_or(1)
    }
}

/// How starts are placed on workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Each start on a worker drawn uniformly (as the replay does).
    Random,
    /// Each image on this many workers chosen by rendezvous hashing on its name; a start
    /// on one of them drawn uniformly.
    Sticky(u32),
}

/// The synthetic workload's parameters.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    /// Function images.
    pub functions: u32,
    /// Zipf exponent of their popularity.
    pub zipf: f64,
    /// Seed of every draw.
    pub seed: u64,
    /// Starts per second (a Poisson process).
    pub rate: f64,
    /// Simulated seconds.
    pub duration_s: f64,
    /// Workers.
    pub workers: u32,
    /// Placement of starts on workers.
    pub placement: Placement,
    /// Seconds between bursts of one-off images (none when `None`).
    pub burst_every_s: Option<f64>,
    /// One-off images per burst, each started once.
    pub burst_images: u32,
}

/// The base images when the calibration names none: the sample family's (base, python,
/// pyweb, node, gcc) measured read lists (docs/EVALUATION.md, section 2).
pub fn default_bases() -> Vec<Base> {
    [
        ("base", 21, 4_613_734),
        ("python", 62, 16_043_212),
        ("pyweb", 104, 27_787_264),
        ("node", 141, 40_684_748),
        ("gcc", 117, 34_917_580),
    ]
    .into_iter()
    .map(|(name, chunks, bytes)| Base {
        name: name.to_owned(),
        chunks,
        bytes,
    })
    .collect()
}

/// Spreads `bytes` over `n` chunks as evenly as whole bytes allow.
fn spread(bytes: u64, n: u32) -> impl Fn(u32) -> u32 {
    let n64 = u64::from(n.max(1));
    let each = bytes / n64;
    let extra = bytes % n64;
    move |i| u32::try_from(each + u64::from(u64::from(i) < extra)).unwrap_or(u32::MAX)
}

struct Synthetic {
    spec: SyntheticSpec,
    rng: Rng,
    /// Cumulative popularity of the function images, by function.
    cumulative: Vec<f64>,
    /// Function `i`'s read list and warm start.
    functions: Vec<(u32, u64)>,
    bases: Vec<(Vec<u32>, u64, String)>,
    next_t_us: f64,
    next_burst_us: Option<f64>,
    bursts: u64,
    sticky: Option<(Rendezvous, HashMap<u32, Vec<u32>>)>,
    /// Names of images by read list, for sticky placement.
    list_names: Vec<String>,
    chunk_size: u64,
}

impl Synthetic {
    fn new(spec: SyntheticSpec, cal: &Calibration, catalog: &mut Catalog) -> Self {
        let mut rng = Rng::new(spec.seed, 1);
        let bases_spec = cal.bases.clone().unwrap_or_else(default_bases);
        let mut bases = Vec::new();
        for b in &bases_spec {
            let chunks = catalog.add_chunks(b.chunks, spread(b.bytes, b.chunks));
            bases.push((chunks, cal.warm_us(&b.name, None), b.name.clone()));
        }
        let mut list_names = Vec::new();
        let mut functions = Vec::new();
        for i in 0..spec.functions {
            let base = &bases
                [usize::try_from(rng.below(u32::try_from(bases.len()).unwrap_or(1))).unwrap_or(0)];
            // 128 KiB .. 8 MiB of its own data, log-uniform, in whole chunks of random
            // (incompressible) bytes.
            let data = crate::f2u(2f64.powf(17.0 + 6.0 * rng.next_f64()));
            let n = u32::try_from(data.div_ceil(cal.chunk_size)).unwrap_or(u32::MAX);
            let chunk = cal.chunk_size;
            let own = catalog.add_chunks(n, |j| {
                let rest = data - u64::from(j) * chunk;
                u32::try_from(rest.min(chunk)).unwrap_or(u32::MAX)
            });
            let name = format!("fn{i:02}-{}", base.2);
            let mut list = base.0.clone();
            list.extend(own);
            functions.push((
                u32::try_from(catalog.lists.len()).unwrap_or(u32::MAX),
                cal.warm_us(&name, Some(&base.2)),
            ));
            catalog.lists.push(list);
            list_names.push(name);
        }
        // Zipf popularity over a shuffled rank order (as the replay draws it).
        let mut rank: Vec<u32> = (0..spec.functions).collect();
        for i in (1..rank.len()).rev() {
            let j = usize::try_from(rng.below(u32::try_from(i + 1).unwrap_or(1))).unwrap_or(0);
            rank.swap(i, j);
        }
        let mut total = 0.0;
        let cumulative = rank
            .iter()
            .map(|&r| {
                total += 1.0 / f64::from(r + 1).powf(spec.zipf);
                total
            })
            .collect();
        let sticky = match spec.placement {
            Placement::Random => None,
            Placement::Sticky(_) => {
                let names: Vec<String> = (0..spec.workers).map(|w| format!("worker-{w}")).collect();
                Some((Rendezvous::new(&names), HashMap::new()))
            }
        };
        let mut s = Synthetic {
            next_t_us: 0.0,
            next_burst_us: spec.burst_every_s.map(|e| e * 1e6),
            spec,
            rng,
            cumulative,
            functions,
            bases,
            bursts: 0,
            sticky,
            list_names,
            chunk_size: cal.chunk_size,
        };
        s.advance_poisson();
        s
    }

    fn advance_poisson(&mut self) {
        let u = 1.0 - self.rng.next_f64();
        self.next_t_us += -u.ln() / self.spec.rate * 1e6;
    }

    fn worker_for(&mut self, list: u32) -> u32 {
        match (self.spec.placement, &mut self.sticky) {
            (Placement::Sticky(n), Some((r, cache))) => {
                let names = &self.list_names;
                let set = cache.entry(list).or_insert_with(|| {
                    let name = &names[usize::try_from(list).unwrap_or(0)];
                    r.place(
                        &ChunkName::of(name.as_bytes()),
                        usize::try_from(n).unwrap_or(1),
                    )
                    .into_iter()
                    .map(|w| u32::try_from(w).unwrap_or(0))
                    .collect()
                });
                let i = self.rng.below(u32::try_from(set.len()).unwrap_or(1));
                set[usize::try_from(i).unwrap_or(0)]
            }
            _ => self.rng.below(self.spec.workers),
        }
    }

    fn next_batch(&mut self, until_us: f64, catalog: &mut Catalog, out: &mut Vec<Start>) {
        let end_us = self.spec.duration_s * 1e6;
        let until_us = until_us.min(end_us);
        loop {
            let burst = self.next_burst_us.filter(|&b| b <= self.next_t_us);
            let t = burst.unwrap_or(self.next_t_us);
            if t >= until_us {
                return;
            }
            if let Some(b) = burst {
                self.burst(b, catalog, out);
                self.next_burst_us = self.spec.burst_every_s.map(|e| b + e * 1e6);
                continue;
            }
            let u = self.rng.next_f64() * self.cumulative.last().copied().unwrap_or(1.0);
            let f = self
                .cumulative
                .partition_point(|&c| c <= u)
                .min(self.functions.len() - 1);
            let (list, warm_us) = self.functions[f];
            let worker = self.worker_for(list);
            out.push(Start {
                t_us: crate::f2u(t),
                worker,
                list,
                warm_us,
            });
            self.advance_poisson();
        }
    }

    /// A burst: images started once each and never again, each reading its own chunks
    /// (as many as a base image drawn at random reads).
    fn burst(&mut self, t: f64, catalog: &mut Catalog, out: &mut Vec<Start>) {
        self.bursts += 1;
        for j in 0..self.spec.burst_images {
            let b = &self.bases[usize::try_from(
                self.rng.below(u32::try_from(self.bases.len()).unwrap_or(1)),
            )
            .unwrap_or(0)];
            let n = u32::try_from(b.0.len()).unwrap_or(0);
            let bytes: u64 =
                b.0.iter()
                    .map(|&c| u64::from(catalog.chunk_bytes[usize::try_from(c).unwrap_or(0)]))
                    .sum();
            let warm = b.1;
            let list = catalog.add_chunks(n, spread(bytes, n));
            let id = u32::try_from(catalog.lists.len()).expect("fewer than 2^32 images");
            catalog.lists.push(list);
            self.list_names.push(format!("burst{}-{j}", self.bursts));
            let worker = self.worker_for(id);
            out.push(Start {
                t_us: crate::f2u(t),
                worker,
                list: id,
                warm_us: warm,
            });
        }
        let _ = self.chunk_size;
    }
}

/// Reads counted by the tier a trace recorded.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Recorded {
    /// `decrypted` and `memory` reads.
    pub memory: u64,
    /// `disk` reads.
    pub disk: u64,
    /// `az` reads.
    pub az: u64,
    /// `origin` reads.
    pub origin: u64,
    /// `joined` reads (the tier of the fetch joined is unknown).
    pub joined: u64,
}

/// Recorded traces, merged by time.
#[derive(Debug)]
struct Traces {
    starts: Vec<Start>,
    next: usize,
}

/// A workload with its catalog.
pub struct Workload {
    /// The chunks and read lists (grows with bursts).
    pub catalog: Catalog,
    /// Workers.
    pub workers: u32,
    /// Simulated seconds: the synthetic duration, or the traces' span.
    pub duration_s: f64,
    /// What the traces recorded (traces only).
    pub recorded: Option<Recorded>,
    /// Starts in all (traces), or expected (synthetic).
    pub expected_starts: f64,
    /// Mean chunk reads per start.
    pub reads_per_start: f64,
    /// Chunks the run will add to the catalog (the bursts' one-off images).
    pub new_chunks: f64,
    source: Source,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("workers", &self.workers)
            .field("duration_s", &self.duration_s)
            .finish()
    }
}

enum Source {
    Synthetic(Box<Synthetic>),
    Traces(Traces),
}

/// A workload that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A trace at fault.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// A parameter out of range.
    #[error("{0}")]
    Invalid(String),
}

impl Workload {
    /// The synthetic workload of `spec`.
    pub fn synthetic(spec: SyntheticSpec, cal: &Calibration) -> Result<Self, WorkloadError> {
        let bad = |m: String| Err(WorkloadError::Invalid(m));
        if spec.functions == 0 {
            return bad("--functions must be at least 1".into());
        }
        if !(spec.zipf.is_finite() && spec.zipf >= 0.0) {
            return bad(format!("--zipf {} is not a number ≥ 0", spec.zipf));
        }
        if !(spec.rate.is_finite() && spec.rate > 0.0) {
            return bad(format!("--rate {} is not a positive number", spec.rate));
        }
        if !(spec.duration_s.is_finite() && spec.duration_s > 0.0) {
            return bad("--duration must be positive".into());
        }
        if spec.workers == 0 {
            return bad("--workers must be at least 1".into());
        }
        if let Placement::Sticky(0) = spec.placement {
            return bad("--sticky must be at least 1".into());
        }
        if let Some(e) = spec.burst_every_s
            && !(e.is_finite() && e > 0.0)
        {
            return bad("--burst-every must be positive".into());
        }
        let mut catalog = Catalog::default();
        let duration_s = spec.duration_s;
        let workers = spec.workers;
        let expected_starts = spec.rate * duration_s
            + spec.burst_every_s.map_or(0.0, |e| {
                (duration_s / e).floor() * f64::from(spec.burst_images)
            });
        let bursts = spec.burst_every_s.map_or(0.0, |e| {
            (duration_s / e).floor() * f64::from(spec.burst_images)
        });
        let syn = Synthetic::new(spec, cal, &mut catalog);
        let reads: usize = catalog.lists.iter().map(Vec::len).sum();
        let reads_per_start = reads as f64 / catalog.lists.len().max(1) as f64;
        let base_chunks: usize = syn.bases.iter().map(|b| b.0.len()).sum();
        let new_chunks = bursts * base_chunks as f64 / syn.bases.len().max(1) as f64;
        Ok(Workload {
            catalog,
            workers,
            duration_s,
            recorded: None,
            expected_starts,
            reads_per_start,
            new_chunks,
            source: Source::Synthetic(Box::new(syn)),
        })
    }

    /// The workload of the trace files `paths` (one per worker; a worker named in two
    /// files is one worker), merged by time; `speed` divides the time between starts.
    pub fn traces(paths: &[PathBuf], speed: f64, cal: &Calibration) -> Result<Self, WorkloadError> {
        if !(speed.is_finite() && speed > 0.0) {
            return Err(WorkloadError::Invalid(format!(
                "--speed {speed} is not a positive number"
            )));
        }
        let mut catalog = Catalog::default();
        let mut names: Vec<[u8; 32]> = Vec::new();
        let mut chunk_ids: HashMap<[u8; 32], u32> = HashMap::new();
        let mut workers: HashMap<String, u32> = HashMap::new();
        let mut recorded = Recorded::default();
        let mut starts = Vec::new();
        for path in paths {
            let t = trace::load(path)?;
            let next = u32::try_from(workers.len()).unwrap_or(u32::MAX);
            let worker = *workers.entry(t.worker.clone()).or_insert(next);
            // Open starts of this file: id → index into `starts`.
            let mut open: HashMap<u64, usize> = HashMap::new();
            for e in t.events {
                match e {
                    Event::Image { .. } => {}
                    Event::Start { t_us, id, image } => {
                        open.insert(id, starts.len());
                        let list = u32::try_from(catalog.lists.len()).unwrap_or(u32::MAX);
                        catalog.lists.push(Vec::new());
                        starts.push(Start {
                            t_us,
                            worker,
                            list,
                            warm_us: cal.warm_us(&image, None),
                        });
                    }
                    Event::Read {
                        id,
                        chunk,
                        bytes,
                        tier,
                        ..
                    } => {
                        let Some(&s) = open.get(&id) else { continue };
                        let c = *chunk_ids.entry(chunk).or_insert_with(|| {
                            names.push(chunk);
                            catalog.chunk_bytes.push(bytes);
                            u32::try_from(names.len() - 1).unwrap_or(u32::MAX)
                        });
                        let list = usize::try_from(starts[s].list).unwrap_or(0);
                        catalog.lists[list].push(c);
                        match tier {
                            Tier::Decrypted | Tier::Memory => recorded.memory += 1,
                            Tier::Disk => recorded.disk += 1,
                            Tier::Az => recorded.az += 1,
                            Tier::Origin => recorded.origin += 1,
                            Tier::Joined => recorded.joined += 1,
                        }
                    }
                    Event::End { id, .. } => {
                        open.remove(&id);
                    }
                }
            }
        }
        // Merge by time; equal times keep file order.
        starts.sort_by_key(|s| s.t_us);
        let t0 = starts.first().map_or(0, |s| s.t_us);
        for s in &mut starts {
            s.t_us = crate::f2u((s.t_us - t0) as f64 / speed);
        }
        let span_us = starts.last().map_or(0, |s| s.t_us);
        catalog.names = Some(Arc::new(names));
        let reads: usize = catalog.lists.iter().map(Vec::len).sum();
        Ok(Workload {
            reads_per_start: reads as f64 / starts.len().max(1) as f64,
            expected_starts: starts.len() as f64,
            new_chunks: 0.0,
            catalog,
            workers: u32::try_from(workers.len()).unwrap_or(u32::MAX).max(1),
            duration_s: (span_us as f64 / 1e6).max(1.0),
            recorded: Some(recorded),
            source: Source::Traces(Traces { starts, next: 0 }),
        })
    }

    /// Appends the starts before `until_us` to `out` (bursts may add read lists); false
    /// once no start is left.
    pub fn next_batch(&mut self, until_us: u64, out: &mut Vec<Start>) -> bool {
        match &mut self.source {
            Source::Synthetic(s) => {
                s.next_batch(until_us as f64, &mut self.catalog, out);
                (until_us as f64) < self.duration_s * 1e6
            }
            Source::Traces(t) => {
                while let Some(s) = t.starts.get(t.next) {
                    if s.t_us >= until_us {
                        break;
                    }
                    out.push(*s);
                    t.next += 1;
                }
                t.next < t.starts.len()
            }
        }
    }
}
