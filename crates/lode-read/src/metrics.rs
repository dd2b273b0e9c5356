//! Counters and latency histograms for the read path: per tier hits, misses, bytes,
//! integrity failures and errors, plus joined fetches and device-level reads. Plain
//! atomics, so recording never blocks a read; [`Metrics::snapshot`] copies them into a
//! serialisable struct and [`MetricsSnapshot::to_prometheus`] renders the text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds, in microseconds, of the latency histogram buckets (a last bucket
/// catches the rest): six per decade, fine enough to draw a latency CDF from.
pub const LATENCY_BUCKETS_US: [u64; 32] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1_000, 1_500, 2_000,
    3_000, 5_000, 7_000, 10_000, 15_000, 20_000, 30_000, 50_000, 70_000, 100_000, 250_000,
    1_000_000,
];

/// A fixed-bucket latency histogram.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // The first bound at or above `us`; past the last one, the overflow bucket.
        let i = LATENCY_BUCKETS_US.partition_point(|b| *b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn snapshot(&self) -> (Vec<u64>, u64) {
        (
            self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            self.sum_us.load(Relaxed),
        )
    }
}

/// The counters of one tier.
#[derive(Debug)]
pub struct TierCounters {
    name: &'static str,
    hits: AtomicU64,
    misses: AtomicU64,
    bytes: AtomicU64,
    integrity_failures: AtomicU64,
    errors: AtomicU64,
    hit_latency: Histogram,
    miss_latency: Histogram,
}

impl TierCounters {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            integrity_failures: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            hit_latency: Histogram::default(),
            miss_latency: Histogram::default(),
        }
    }

    pub(crate) fn hit(&self, bytes: usize, took: Duration) {
        self.hits.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes as u64, Relaxed);
        self.hit_latency.record(took);
    }

    pub(crate) fn miss(&self, took: Duration) {
        self.misses.fetch_add(1, Relaxed);
        self.miss_latency.record(took);
    }

    pub(crate) fn integrity_failure(&self) {
        self.integrity_failures.fetch_add(1, Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> TierSnapshot {
        // Every lookup's latency is the hits' and the misses' together.
        let (hit_buckets, hit_sum) = self.hit_latency.snapshot();
        let (miss_buckets, miss_sum) = self.miss_latency.snapshot();
        let buckets = hit_buckets
            .iter()
            .zip(&miss_buckets)
            .map(|(h, m)| h + m)
            .collect();
        let sum = hit_sum + miss_sum;
        TierSnapshot {
            name: self.name.to_owned(),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            integrity_failures: self.integrity_failures.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency_buckets_us: LATENCY_BUCKETS_US.to_vec(),
            latency_counts: buckets,
            latency_sum_us: sum,
            hit_latency_counts: hit_buckets,
            hit_latency_sum_us: hit_sum,
            used_bytes: None,
            capacity_bytes: None,
        }
    }
}

/// Every counter of one worker's read path.
#[derive(Debug)]
pub struct Metrics {
    /// Decrypted chunks in memory (tier 2 of the read path, docs/agent.md).
    pub(crate) decrypted: TierCounters,
    /// The ciphertext tiers, in lookup order.
    pub(crate) tiers: Vec<TierCounters>,
    joined_fetches: AtomicU64,
    zero_chunk_reads: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    read_errors: AtomicU64,
    overlay_read_blocks: AtomicU64,
    overlay_written_blocks: AtomicU64,
    read_latency: Histogram,
}

impl Metrics {
    pub(crate) fn new(tier_names: &[&'static str]) -> Self {
        Self {
            decrypted: TierCounters::new("decrypted"),
            tiers: tier_names.iter().map(|n| TierCounters::new(n)).collect(),
            joined_fetches: AtomicU64::new(0),
            zero_chunk_reads: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            overlay_read_blocks: AtomicU64::new(0),
            overlay_written_blocks: AtomicU64::new(0),
            read_latency: Histogram::default(),
        }
    }

    pub(crate) fn joined(&self) {
        self.joined_fetches.fetch_add(1, Relaxed);
    }

    pub(crate) fn zero_chunk(&self) {
        self.zero_chunk_reads.fetch_add(1, Relaxed);
    }

    pub(crate) fn read(&self, bytes: usize, took: Duration, ok: bool) {
        self.reads.fetch_add(1, Relaxed);
        if ok {
            self.read_bytes.fetch_add(bytes as u64, Relaxed);
        } else {
            self.read_errors.fetch_add(1, Relaxed);
        }
        self.read_latency.record(took);
    }

    pub(crate) fn overlay_read(&self, blocks: u64) {
        self.overlay_read_blocks.fetch_add(blocks, Relaxed);
    }

    pub(crate) fn overlay_written(&self, blocks: u64) {
        self.overlay_written_blocks.fetch_add(blocks, Relaxed);
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let (buckets, sum) = self.read_latency.snapshot();
        let mut tiers = vec![self.decrypted.snapshot()];
        tiers.extend(self.tiers.iter().map(TierCounters::snapshot));
        MetricsSnapshot {
            tiers,
            joined_fetches: self.joined_fetches.load(Relaxed),
            zero_chunk_reads: self.zero_chunk_reads.load(Relaxed),
            reads: self.reads.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            read_errors: self.read_errors.load(Relaxed),
            overlay_read_blocks: self.overlay_read_blocks.load(Relaxed),
            overlay_written_blocks: self.overlay_written_blocks.load(Relaxed),
            read_latency_buckets_us: LATENCY_BUCKETS_US.to_vec(),
            read_latency_counts: buckets,
            read_latency_sum_us: sum,
        }
    }
}

/// One tier's counters at a moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TierSnapshot {
    /// The tier: `decrypted`, `memory`, `disk`, `origin`, …
    pub name: String,
    /// Lookups it answered.
    pub hits: u64,
    /// Lookups it did not.
    pub misses: u64,
    /// Bytes it served (plaintext for `decrypted`, ciphertext otherwise).
    pub bytes: u64,
    /// Chunks it returned that failed their name check (dropped and fetched again).
    pub integrity_failures: u64,
    /// Lookups that failed otherwise.
    pub errors: u64,
    /// Histogram bucket upper bounds in µs.
    pub latency_buckets_us: Vec<u64>,
    /// Lookups per bucket (one more than the bounds: the last is "slower").
    pub latency_counts: Vec<u64>,
    /// Total lookup time in µs.
    pub latency_sum_us: u64,
    /// Lookups it answered, per bucket (the same bounds): its latency when it serves.
    pub hit_latency_counts: Vec<u64>,
    /// Total time of the lookups it answered, in µs.
    pub hit_latency_sum_us: u64,
    /// Bytes held now, where the tier knows.
    pub used_bytes: Option<u64>,
    /// Its bound in bytes, where it has one.
    pub capacity_bytes: Option<u64>,
}

impl TierSnapshot {
    /// The share of lookups this tier answered.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// Every counter at a moment; serialises to JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// `decrypted` first, then the ciphertext tiers in lookup order.
    pub tiers: Vec<TierSnapshot>,
    /// Chunk misses that joined a fetch already in flight instead of starting one.
    pub joined_fetches: u64,
    /// Chunk reads answered with zeros because the manifest says the chunk is zero.
    pub zero_chunk_reads: u64,
    /// Device reads.
    pub reads: u64,
    /// Bytes those reads returned.
    pub read_bytes: u64,
    /// Device reads that failed.
    pub read_errors: u64,
    /// 4 KiB blocks read from overlays.
    pub overlay_read_blocks: u64,
    /// 4 KiB blocks written to overlays.
    pub overlay_written_blocks: u64,
    /// Device read latency bucket bounds in µs.
    pub read_latency_buckets_us: Vec<u64>,
    /// Device reads per bucket.
    pub read_latency_counts: Vec<u64>,
    /// Total device read time in µs.
    pub read_latency_sum_us: u64,
}

impl MetricsSnapshot {
    /// The tier called `name`.
    pub fn tier(&self, name: &str) -> Option<&TierSnapshot> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// JSON, as `lode stats --json` will print it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in rows {
                let _ = writeln!(o, "{name}{labels} {v}");
            }
        };
        let per_tier = |f: fn(&TierSnapshot) -> u64| {
            self.tiers
                .iter()
                .map(|t| (format!("{{tier=\"{}\"}}", t.name), f(t)))
                .collect::<Vec<_>>()
        };
        counter(
            &mut o,
            "lode_tier_hits_total",
            "Chunk lookups a tier answered.",
            per_tier(|t| t.hits),
        );
        counter(
            &mut o,
            "lode_tier_misses_total",
            "Chunk lookups a tier did not answer.",
            per_tier(|t| t.misses),
        );
        counter(
            &mut o,
            "lode_tier_bytes_total",
            "Bytes a tier served.",
            per_tier(|t| t.bytes),
        );
        counter(
            &mut o,
            "lode_tier_integrity_failures_total",
            "Chunks from a tier that failed their name check.",
            per_tier(|t| t.integrity_failures),
        );
        counter(
            &mut o,
            "lode_tier_errors_total",
            "Tier lookups that failed.",
            per_tier(|t| t.errors),
        );
        let one = |v| vec![(String::new(), v)];
        counter(
            &mut o,
            "lode_joined_fetches_total",
            "Misses that joined a fetch in flight.",
            one(self.joined_fetches),
        );
        counter(
            &mut o,
            "lode_zero_chunk_reads_total",
            "Zero chunks served without a fetch.",
            one(self.zero_chunk_reads),
        );
        counter(&mut o, "lode_reads_total", "Device reads.", one(self.reads));
        counter(
            &mut o,
            "lode_read_bytes_total",
            "Bytes device reads returned.",
            one(self.read_bytes),
        );
        counter(
            &mut o,
            "lode_read_errors_total",
            "Device reads that failed.",
            one(self.read_errors),
        );
        let _ = writeln!(
            o,
            "# HELP lode_tier_latency_seconds Chunk lookup latency per tier.\n# TYPE lode_tier_latency_seconds histogram"
        );
        for t in &self.tiers {
            histogram(
                &mut o,
                "lode_tier_latency_seconds",
                &format!("tier=\"{}\",", t.name),
                &t.latency_buckets_us,
                &t.latency_counts,
                t.latency_sum_us,
            );
        }
        let _ = writeln!(
            o,
            "# HELP lode_read_latency_seconds Device read latency.\n# TYPE lode_read_latency_seconds histogram"
        );
        histogram(
            &mut o,
            "lode_read_latency_seconds",
            "",
            &self.read_latency_buckets_us,
            &self.read_latency_counts,
            self.read_latency_sum_us,
        );
        o
    }
}

fn histogram(
    o: &mut String,
    name: &str,
    labels: &str,
    bounds: &[u64],
    counts: &[u64],
    sum_us: u64,
) {
    let mut cum = 0;
    for (i, c) in counts.iter().enumerate() {
        cum += c;
        let le = bounds
            .get(i)
            .map_or_else(|| "+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
        let _ = writeln!(o, "{name}_bucket{{{labels}le=\"{le}\"}} {cum}");
    }
    let bare = labels.trim_end_matches(',');
    let l = if bare.is_empty() {
        String::new()
    } else {
        format!("{{{bare}}}")
    };
    let _ = writeln!(o, "{name}_sum{l} {}", sum_us as f64 / 1e6);
    let _ = writeln!(o, "{name}_count{l} {cum}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_serialises_and_renders() {
        let m = Metrics::new(&["memory", "origin"]);
        m.tiers[1].hit(100, Duration::from_micros(30));
        m.tiers[0].miss(Duration::from_micros(2));
        m.tiers[0].hit(100, Duration::from_micros(120));
        m.joined();
        let s = m.snapshot();
        assert_eq!(s.tier("origin").unwrap().hits, 1);
        let bucket = |us: u64| LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap();
        assert_eq!(bucket(30), 8);
        assert_eq!(s.tier("origin").unwrap().latency_counts[bucket(30)], 1);
        assert_eq!(s.tier("origin").unwrap().hit_latency_counts[bucket(30)], 1);
        let memory = s.tier("memory").unwrap();
        assert_eq!(memory.latency_counts[bucket(2)], 1);
        assert_eq!(memory.latency_counts[bucket(120)], 1);
        assert_eq!(
            memory.hit_latency_counts[bucket(2)],
            0,
            "misses are not hits"
        );
        assert_eq!(memory.hit_latency_counts[bucket(120)], 1);
        assert_eq!(memory.hit_latency_sum_us, 120);
        let json: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(json["joined_fetches"], 1);
        let p = s.to_prometheus();
        assert!(p.contains("lode_tier_hits_total{tier=\"origin\"} 1"), "{p}");
        assert!(
            p.contains("lode_tier_latency_seconds_bucket{tier=\"origin\",le=\"+Inf\"} 1"),
            "{p}"
        );
        assert!(p.contains("lode_joined_fetches_total 1"), "{p}");
    }
}
