//! Placement: how fast `place` answers with 100 workers, and how often a start lands on a
//! worker whose cache already holds the image under the Zipf workload of the evaluation's
//! section 4 (48 functions, s = 1.1, ranks shuffled, 3 agents, 480 starts), lode's
//! placement beside plain consistent hashing (the warm flags off) and uniform random
//! placement, on the same request sequence. Prints markdown tables and writes
//! docs/evaluation/placement.json. Run: `cargo bench -p lode-control --bench placement`.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lode_control::api::Placed;
use lode_control::placement::{Load, POINTS_PER_WORKER, Ring, place};
use serde_json::{Value, json};

const EPSILON: f64 = 0.25;

/// splitmix64: a small seeded generator, so every run draws the same sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: usize) -> usize {
        let pick = self.unit() * n as f64;
        #[allow(clippy::cast_possible_truncation, reason = "below n, a usize")]
        let pick = pick as usize;
        pick.min(n - 1)
    }
}

fn worker_ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("worker-{i:03}.lode.internal"))
        .collect()
}

fn image_id(i: u64) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("image-{i}").as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn ns_per(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e9 / n as f64
}

/// Places starts for about a second; returns (placements/s, ns per placement). The image
/// is warm on `warm_on` workers, which ones varying by image; the loads of each variant
/// are made before the clock starts, so only `place` is timed.
fn throughput(ring: &Ring, images: &[[u8; 32]], loads: &[Load], warm_on: usize) -> (f64, f64) {
    let n = loads.len();
    let variants: Vec<Vec<Load>> = (0..n)
        .map(|v| {
            let mut l = loads.to_vec();
            for (w, l) in l.iter_mut().enumerate() {
                l.warm = (w + n - v) % n < warm_on;
            }
            l
        })
        .collect();
    let mut done = 0u64;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        for (i, img) in images.iter().enumerate() {
            black_box(place(ring, black_box(img), &variants[i % n], EPSILON));
        }
        done += images.len() as u64;
    }
    let spent = t.elapsed();
    (done as f64 / spent.as_secs_f64(), ns_per(spent, done))
}

/// The evaluation's Zipf popularity: weight 1/rank^s over `images` functions whose ranks
/// are shuffled, so the most popular function is a random one.
struct Zipf {
    cdf: Vec<f64>,
    function_of_rank: Vec<usize>,
}

impl Zipf {
    fn new(images: usize, s: f64, rng: &mut Rng) -> Zipf {
        let mut cdf = Vec::with_capacity(images);
        let mut sum = 0.0;
        for rank in 1..=images {
            sum += 1.0 / (rank as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        let mut function_of_rank: Vec<usize> = (0..images).collect();
        for i in (1..images).rev() {
            function_of_rank.swap(i, rng.below(i + 1));
        }
        Zipf {
            cdf,
            function_of_rank,
        }
    }

    fn draw(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        let rank = self
            .cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1);
        self.function_of_rank[rank]
    }
}

/// A worker's cache of whole images, least recently used first out.
struct Lru {
    held: Vec<usize>,
    capacity: usize,
}

impl Lru {
    fn holds(&self, image: usize) -> bool {
        self.held.contains(&image)
    }

    fn touch(&mut self, image: usize) {
        if let Some(at) = self.held.iter().position(|&i| i == image) {
            self.held.remove(at);
        } else if self.held.len() == self.capacity {
            self.held.remove(0);
        }
        self.held.push(image);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// `place` with each worker's warm flag from its cache.
    Lode,
    /// `place` with every warm flag off: consistent hashing with bounded load alone.
    HashOnly,
    /// A worker with room, uniformly at random.
    Random,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Lode => "lode",
            Policy::HashOnly => "hash only",
            Policy::Random => "random",
        }
    }
}

struct Scenario {
    name: &'static str,
    workers: usize,
    images: usize,
    zipf_s: f64,
    starts: usize,
    cache: usize,
    /// How many later arrivals a start stays attached for; 0: it ends before the next.
    hold: usize,
    /// Starts a worker may have attached at once.
    capacity: u32,
    seeds: u64,
}

struct Outcome {
    hits: usize,
    warm_placements: usize,
    busiest: u32,
}

fn simulate(sc: &Scenario, seed: u64, policy: Policy) -> Outcome {
    let mut rng = Rng(seed);
    let zipf = Zipf::new(sc.images, sc.zipf_s, &mut rng);
    let requests: Vec<usize> = (0..sc.starts).map(|_| zipf.draw(&mut rng)).collect();
    let ids: Vec<[u8; 32]> = (0..sc.images as u64).map(image_id).collect();
    let ring = Ring::new(worker_ids(sc.workers));
    let mut pick = Rng(seed ^ 0x5eed_0f7a_11d0_d0d0);
    let mut caches: Vec<Lru> = (0..sc.workers)
        .map(|_| Lru {
            held: Vec::with_capacity(sc.cache),
            capacity: sc.cache,
        })
        .collect();
    let mut loads = vec![
        Load {
            capacity: sc.capacity,
            load: 0,
            warm: false,
            alive: true,
        };
        sc.workers
    ];
    let mut running: Vec<usize> = Vec::with_capacity(sc.starts);
    let mut out = Outcome {
        hits: 0,
        warm_placements: 0,
        busiest: 0,
    };
    for (t, &image) in requests.iter().enumerate() {
        if sc.hold > 0 && t >= sc.hold {
            loads[running[t - sc.hold]].load -= 1;
        }
        let worker = match policy {
            Policy::Lode | Policy::HashOnly => {
                for (l, c) in loads.iter_mut().zip(&caches) {
                    l.warm = policy == Policy::Lode && c.holds(image);
                }
                let p = place(&ring, &ids[image], &loads, EPSILON).expect("a worker has room");
                if p.how == Placed::Warm {
                    out.warm_placements += 1;
                }
                p.worker
            }
            Policy::Random => {
                let room: Vec<usize> = (0..sc.workers)
                    .filter(|&w| loads[w].load < loads[w].capacity)
                    .collect();
                room[pick.below(room.len())]
            }
        };
        if caches[worker].holds(image) {
            out.hits += 1;
        }
        caches[worker].touch(image);
        if sc.hold > 0 {
            loads[worker].load += 1;
            out.busiest = out.busiest.max(loads[worker].load);
        }
        running.push(worker);
    }
    out
}

fn main() {
    let started = Instant::now();

    // (1) Throughput with 100 workers.
    let ids = worker_ids(100);
    let t = Instant::now();
    let ring = Ring::new(ids.clone());
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let images: Vec<[u8; 32]> = (0..4096).map(image_id).collect();
    let mut rng = Rng(7);
    let loads: Vec<Load> = (0..100)
        .map(|_| {
            let load = u32::try_from(rng.below(16)).expect("below 16");
            Load {
                capacity: 32,
                load,
                warm: false,
                alive: rng.unit() >= 0.05,
            }
        })
        .collect();
    let cases = [
        ("no worker warm (hashed)", 0usize),
        ("warm on 3 workers", 3),
    ];
    println!(
        "## place() with 100 workers, {POINTS_PER_WORKER} points each (ring built in {build_ms:.1} ms)\n"
    );
    println!("| case | placements/s | ns/placement |\n|---|---|---|");
    let mut speed = Vec::new();
    for (name, warm_on) in cases {
        let (per_s, ns) = throughput(&ring, &images, &loads, warm_on);
        println!("| {name} | {per_s:.0} | {ns:.0} |");
        speed.push(json!({"case": name, "placements_per_s": per_s, "ns_per_placement": ns}));
    }

    // (2) Where starts land under the evaluation's workload.
    let section4 = |name, starts, cache, hold, seeds| Scenario {
        name,
        workers: 3,
        images: 48,
        zipf_s: 1.1,
        starts,
        cache,
        hold,
        capacity: 4,
        seeds,
    };
    let scenarios = [
        section4("section 4, one start at a time", 480, 2, 0, 20),
        section4("section 4, one start at a time", 480, 4, 0, 20),
        section4("section 4, one start at a time", 480, 8, 0, 20),
        section4("section 4, one start at a time", 480, 16, 0, 20),
        section4("section 4, 6 running at once", 480, 4, 6, 20),
        section4(
            "section 4, one start at a time, 48000 starts",
            48_000,
            4,
            0,
            5,
        ),
        section4(
            "section 4, 6 running at once, 48000 starts",
            48_000,
            4,
            6,
            5,
        ),
        Scenario {
            name: "20 workers, 1000 images, 40 running at once",
            workers: 20,
            images: 1000,
            zipf_s: 1.1,
            starts: 100_000,
            cache: 20,
            hold: 40,
            capacity: 4,
            seeds: 5,
        },
    ];
    println!(
        "\n## Share of starts on a worker whose cache held the image (mean over seeds, min-max)\n"
    );
    println!(
        "| scenario | W | images | C | starts | seeds | lode | hash only | random | lode: warm picks | lode: busiest |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for sc in &scenarios {
        let mut cells = Vec::new();
        let mut per_policy = serde_json::Map::new();
        let (mut warm, mut busiest) = (0usize, 0u32);
        for policy in [Policy::Lode, Policy::HashOnly, Policy::Random] {
            let shares: Vec<f64> = (0..sc.seeds)
                .map(|k| {
                    let o = simulate(sc, 7 + k, policy);
                    if policy == Policy::Lode {
                        warm += o.warm_placements;
                        busiest = busiest.max(o.busiest);
                    }
                    o.hits as f64 / sc.starts as f64
                })
                .collect();
            let mean = shares.iter().sum::<f64>() / shares.len() as f64;
            let min = shares.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = shares.iter().cloned().fold(0.0, f64::max);
            cells.push(format!(
                "**{:.1}%** ({:.1}-{:.1})",
                mean * 100.0,
                min * 100.0,
                max * 100.0
            ));
            per_policy.insert(
                policy.name().to_string(),
                json!({"mean": mean, "min": min, "max": max, "per_seed": shares}),
            );
        }
        let warm_share = warm as f64 / (sc.starts as f64 * sc.seeds as f64);
        let busiest_cell = if sc.hold > 0 {
            busiest.to_string()
        } else {
            "-".to_string()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% | {} |",
            sc.name,
            sc.workers,
            sc.images,
            sc.cache,
            sc.starts,
            sc.seeds,
            cells[0],
            cells[1],
            cells[2],
            warm_share * 100.0,
            busiest_cell
        );
        rows.push(json!({
            "scenario": sc.name,
            "workers": sc.workers,
            "images": sc.images,
            "zipf_s": sc.zipf_s,
            "starts": sc.starts,
            "cache_images": sc.cache,
            "hold_arrivals": sc.hold,
            "capacity": sc.capacity,
            "seeds": (7..7 + sc.seeds).collect::<Vec<u64>>(),
            "hit_share": Value::Object(per_policy),
            "lode_warm_placements": warm_share,
            "lode_busiest_load": if sc.hold > 0 { Some(busiest) } else { None },
        }));
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("\n{elapsed:.1} s");

    let report = json!({
        "command": "cargo bench -p lode-control --bench placement",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "epsilon": EPSILON,
        "points_per_worker": POINTS_PER_WORKER,
        "ring_build_ms_100_workers": build_ms,
        "throughput_100_workers": speed,
        "hit_share": rows,
        "seconds": elapsed,
    });
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/evaluation/placement.json"
    );
    let text = serde_json::to_string_pretty(&report).expect("JSON of plain values");
    std::fs::write(path, text + "\n").unwrap_or_else(|e| panic!("writing {path}: {e}"));
    println!("wrote {path}");
}
