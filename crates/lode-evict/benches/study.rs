//! Hit rate and speed of every eviction policy at the same capacity, on two synthetic
//! streams of sized keys:
//!
//! 1. **zipf**: 100,000 keys read with Zipf(s = 1.1) popularity, each key a fixed size of
//!    16 KiB × 2^u, u uniform in 0..=5 (a segment up to a whole chunk), popularity and
//!    size independent.
//! 2. **zipf+cron**: the same, and every 10,000 reads a burst of 2,000 keys never seen
//!    before, each read once (one-off images that cron jobs start once), sized alike.
//!
//! A read that misses inserts the key (as the local tiers do after a fetch). Each stream
//! is 4,000,000 Zipf reads; the first 1,000,000 warm the cache and are not counted. The
//! hit rates (by request and by byte) count the Zipf reads only, so the two streams
//! compare: the burst keys always miss. Capacities are 1%, 5% and 20% of the distinct
//! bytes of the Zipf keys. Speed is Zipf reads (with their inserts) per second, one
//! thread: every read (Zipf and burst) with its insert on a miss, per second.
//!
//! ```text
//! cargo bench -p lode-evict --bench study
//! ```

use std::time::Instant;

use lode_evict::PolicyKind;

const KEYS: u32 = 100_000;
const ZIPF_S: f64 = 1.1;
const READS: u64 = 4_000_000;
const WARMUP: u64 = 1_000_000;
const BURST_EVERY: u64 = 10_000;
const BURST_KEYS: u32 = 2_000;
const SEED: u64 = 0x5eed_1e55_c0ff_ee00;

/// xorshift64*: deterministic and fast enough not to weigh on the policies' figures.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1), 24 bits of it (enough for 100,000 ranks).
    fn unit(&mut self) -> f64 {
        let bits = f64::from(u32::try_from(self.next() >> 40).expect("24 bits"));
        bits / f64::from(1u32 << 24)
    }
}

fn size_of(key: u32) -> u64 {
    let h = u64::from(key)
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (16 << 10) << ((h >> 40) % 6)
}

/// The keys of a Zipf stream, by rank: a cumulative distribution to search.
struct Zipf {
    cdf: Vec<f64>,
    /// Key of each rank (a shuffle, so key ids say nothing of popularity).
    keys: Vec<u32>,
}

impl Zipf {
    fn new(rng: &mut Rng) -> Self {
        let mut cdf = Vec::with_capacity(KEYS as usize);
        let mut sum = 0.0;
        for r in 1..=KEYS {
            sum += 1.0 / f64::from(r).powf(ZIPF_S);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        let mut keys: Vec<u32> = (0..KEYS).collect();
        for i in (1..keys.len()).rev() {
            let j = usize::try_from(rng.next() % (i as u64 + 1)).expect("an index");
            keys.swap(i, j);
        }
        Self { cdf, keys }
    }

    fn sample(&self, rng: &mut Rng) -> u32 {
        let u = rng.unit();
        let rank = self
            .cdf
            .partition_point(|&c| c < u)
            .min(self.keys.len() - 1);
        self.keys[rank]
    }
}

struct Outcome {
    hit_rate: f64,
    byte_hit_rate: f64,
    ops_per_sec: f64,
}

/// Plays one stream (pre-drawn `reads`) against `kind` at `capacity`.
fn play(kind: PolicyKind, capacity: u64, reads: &[u32], bursts: bool) -> Outcome {
    let mut p = kind.build::<u32>(capacity);
    let mut evicted = Vec::with_capacity(64);
    let (mut hits, mut counted, mut hit_bytes, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut one_off = KEYS;
    let mut ops = 0u64;
    let started = Instant::now();
    for (n, &key) in (0u64..).zip(reads) {
        if bursts && n % BURST_EVERY == BURST_EVERY - 1 {
            for _ in 0..BURST_KEYS {
                if !p.touch(&one_off) {
                    evicted.clear();
                    p.insert(one_off, size_of(one_off), &mut evicted);
                }
                one_off += 1;
            }
            ops += u64::from(BURST_KEYS);
        }
        let size = size_of(key);
        let hit = p.touch(&key);
        if !hit {
            evicted.clear();
            p.insert(key, size, &mut evicted);
        }
        if n >= WARMUP {
            counted += 1;
            bytes += size;
            if hit {
                hits += 1;
                hit_bytes += size;
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    Outcome {
        hit_rate: hits as f64 / counted as f64,
        byte_hit_rate: hit_bytes as f64 / bytes as f64,
        ops_per_sec: (ops + reads.len() as u64) as f64 / took,
    }
}

fn main() {
    let mut rng = Rng(SEED);
    let zipf = Zipf::new(&mut rng);
    let reads: Vec<u32> = (0..READS).map(|_| zipf.sample(&mut rng)).collect();
    let distinct: u64 = (0..KEYS).map(size_of).sum();
    println!(
        "{KEYS} keys, Zipf s={ZIPF_S}, {READS} reads ({WARMUP} warm-up), {} MiB distinct; \
         cron bursts: {BURST_KEYS} one-off keys every {BURST_EVERY} reads",
        distinct >> 20
    );
    println!(
        "{:<10} {:>5} {:>11} {:>11} {:>11} {:>11} {:>12} {:>12}",
        "policy",
        "cap",
        "zipf hit%",
        "zipf byte%",
        "cron hit%",
        "cron byte%",
        "zipf Mops/s",
        "cron Mops/s"
    );
    for pct in [1u64, 5, 20] {
        let capacity = distinct * pct / 100;
        for &kind in PolicyKind::ALL {
            let plain = play(kind, capacity, &reads, false);
            let cron = play(kind, capacity, &reads, true);
            println!(
                "{:<10} {:>4}% {:>11.2} {:>11.2} {:>11.2} {:>11.2} {:>12.2} {:>12.2}",
                kind.name(),
                pct,
                100.0 * plain.hit_rate,
                100.0 * plain.byte_hit_rate,
                100.0 * cron.hit_rate,
                100.0 * cron.byte_hit_rate,
                plain.ops_per_sec / 1e6,
                cron.ops_per_sec / 1e6,
            );
        }
    }
}
