//! The calibration file: what the simulator takes from measurements of a real fleet
//! (per-tier read latencies, per-worker bandwidths, the prefetch's concurrency, warm start
//! times, the base images' read lists). JSON, `{"format": "lode-calibration",
//! "version": 1, ...}`; docs/scale.md describes every field. Parsed and checked here
//! only: every error names the file and, where it can, the line of the value at fault.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::rng::Rng;

/// The calibration `lode sim` uses when given none: the replay's measured latencies
/// (docs/evaluation/replay.json) and the sample family's read lists.
pub const BUILT_IN: &str = include_str!("default-calibration.json");

/// The only version this simulator reads.
pub const VERSION: u64 = 1;

const MAX_BUCKETS: usize = 256;
const MAX_LANES: u64 = 4096;
const MAX_CHUNK: u64 = 16 << 20;
const MAX_BASE_CHUNKS: u64 = 1 << 20;

/// A calibration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not JSON, or a field of the wrong type or unknown.
    #[error("{file}:{line}:{column}: {message}")]
    Json {
        /// The file.
        file: String,
        /// Line of the fault (1-based).
        line: usize,
        /// Column of the fault.
        column: usize,
        /// serde_json's account.
        message: String,
    },
    /// Another format, or another version of this one.
    #[error("{file}:{line}: {what}")]
    Format {
        /// The file.
        file: String,
        /// Line of the `format` or `version` key (1 when absent).
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// A value out of its range.
    #[error("{file}:{line}: {key}: {why}")]
    Invalid {
        /// The file.
        file: String,
        /// Line of the key (1 when it is missing).
        line: usize,
        /// The key, dotted (`bandwidth_bytes_per_s.az`).
        key: String,
        /// What is wrong.
        why: String,
    },
}

#[derive(Deserialize)]
struct Head {
    format: Option<String>,
    version: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[allow(dead_code)]
    format: String,
    #[allow(dead_code)]
    version: u64,
    chunk_size: u64,
    read_latency_buckets_us: Vec<u64>,
    hit_latency_counts: BTreeMap<String, Vec<u64>>,
    bandwidth_bytes_per_s: RawBandwidth,
    lanes: u64,
    warm_start_ms: RawWarm,
    #[serde(default)]
    bases: Option<Vec<RawBase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBandwidth {
    az: f64,
    origin: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWarm {
    default: f64,
    #[serde(default)]
    images: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    name: String,
    chunks: u64,
    bytes: u64,
}

/// A base image's read list: how many chunks a start reads and their stored bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Base {
    /// Its name (function images are named after it).
    pub name: String,
    /// Chunks read at a start.
    pub chunks: u32,
    /// Their stored bytes in all.
    pub bytes: u64,
}

/// A latency distribution: a histogram sampled by bucket, uniformly within a bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyDist {
    /// Upper bounds (µs) of the buckets; the last bucket is open.
    bounds: Vec<u64>,
    /// Cumulative counts, one per bucket (bounds.len() + 1).
    cumulative: Vec<u64>,
}

impl LatencyDist {
    /// A distribution that is always `us`.
    pub fn constant(us: u64) -> Self {
        Self {
            bounds: vec![us, us + 1],
            cumulative: vec![0, 1, 1],
        }
    }

    fn new(bounds: &[u64], counts: &[u64]) -> Option<Self> {
        let mut cumulative = Vec::with_capacity(counts.len());
        let mut total = 0u64;
        for &c in counts {
            total = total.checked_add(c)?;
            cumulative.push(total);
        }
        (total > 0).then(|| Self {
            bounds: bounds.to_vec(),
            cumulative,
        })
    }

    /// One latency in µs: a bucket drawn by its count, then a value uniform in it
    /// (from the bound below, 0 for the first; the open last bucket spans up to twice
    /// the last bound).
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let total = *self.cumulative.last().unwrap_or(&1);
        let r = rng.next_u64() % total;
        let b = self.cumulative.partition_point(|&c| c <= r);
        let last = *self.bounds.last().unwrap_or(&1);
        let lo = if b == 0 { 0 } else { self.bounds[b - 1] };
        let hi = self
            .bounds
            .get(b)
            .copied()
            .unwrap_or(last.saturating_mul(2));
        lo + crate::f2u(rng.next_f64() * (hi - lo) as f64)
    }

    /// The mean, from bucket midpoints.
    pub fn mean_us(&self) -> f64 {
        let mut prev = 0;
        let mut sum = 0.0;
        let last = *self.bounds.last().unwrap_or(&1);
        for (b, &c) in self.cumulative.iter().enumerate() {
            let lo = if b == 0 { 0 } else { self.bounds[b - 1] };
            let hi = self
                .bounds
                .get(b)
                .copied()
                .unwrap_or(last.saturating_mul(2));
            sum += (c - prev) as f64 * (lo + hi) as f64 / 2.0;
            prev = c;
        }
        sum / prev.max(1) as f64
    }
}

/// A checked calibration.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Where it came from (a path, or `<built-in>`).
    pub source: String,
    /// The chunk size (bytes): the unit of a function image's own data.
    pub chunk_size: u64,
    /// Read latency of an AZ hit.
    pub az: LatencyDist,
    /// Read latency of an origin fetch.
    pub origin: LatencyDist,
    /// Per-worker bandwidth from the AZ fleet, bytes/s.
    pub az_bandwidth: f64,
    /// Per-worker bandwidth from the origin, bytes/s.
    pub origin_bandwidth: f64,
    /// Fetches a start has in flight at once (1: strictly sequential demand reads).
    pub lanes: u32,
    /// Warm start time (µs) of an image not named in `warm_start_us`.
    pub default_warm_us: u64,
    /// Warm start time (µs) by image (or base) name.
    pub warm_start_us: BTreeMap<String, u64>,
    /// The base images' read lists, when the file gives them.
    pub bases: Option<Vec<Base>>,
}

/// The 1-based line of the value of the key path `path` in `text`: each key searched for
/// after the one before it. 1 when not found.
fn line_of(text: &str, path: &[&str]) -> usize {
    let mut at = 0;
    for key in path {
        let quoted = format!("\"{key}\"");
        match text[at..].find(&quoted) {
            Some(i) => at += i,
            None => break,
        }
    }
    text[..at].matches('\n').count() + 1
}

/// The key whose value is at `line`:`column` (1-based) of `text`: the last `"key":`
/// before it, on that line.
fn key_before(text: &str, line: usize, column: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let upto = l.get(..column.min(l.len()))?;
    let colon = upto.rfind("\":")?;
    let open = upto[..colon].rfind('"')?;
    Some(upto[open + 1..colon].to_owned())
}

impl Calibration {
    /// The built-in calibration.
    pub fn built_in() -> Self {
        Self::parse(BUILT_IN, "<built-in>").expect("the built-in calibration is valid")
    }

    /// Reads and checks the calibration file at `path`.
    pub fn load(path: &Path) -> Result<Self, CalibrationError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CalibrationError::Io {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// Parses and checks calibration `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, CalibrationError> {
        let json = |e: serde_json::Error| {
            let mut message = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            if let Some(m) = message.strip_suffix(&at) {
                message = m.to_owned();
            }
            if let Some(key) = key_before(text, e.line(), e.column()) {
                message = format!("{key}: {message}");
            }
            CalibrationError::Json {
                file: file.to_owned(),
                line: e.line(),
                column: e.column(),
                message,
            }
        };
        let head: Head = serde_json::from_str(text).map_err(json)?;
        let format_err = |key: &str, what: String| CalibrationError::Format {
            file: file.to_owned(),
            line: line_of(text, &[key]),
            what,
        };
        if head.format.as_deref() != Some("lode-calibration") {
            return Err(format_err(
                "format",
                format!(
                    "not a lode calibration file (format {:?}, expected \"lode-calibration\")",
                    head.format.unwrap_or_default()
                ),
            ));
        }
        match head.version.as_ref().and_then(serde_json::Value::as_u64) {
            Some(VERSION) => {}
            _ => {
                return Err(format_err(
                    "version",
                    format!(
                        "calibration version {}, this lode reads version {VERSION}",
                        head.version
                            .map_or_else(|| "missing".to_owned(), |v| v.to_string())
                    ),
                ));
            }
        }
        let raw: Raw = serde_json::from_str(text).map_err(json)?;
        let invalid = |path: &[&str], why: String| CalibrationError::Invalid {
            file: file.to_owned(),
            line: line_of(text, path),
            key: path.join("."),
            why,
        };

        if raw.chunk_size == 0 || raw.chunk_size > MAX_CHUNK {
            return Err(invalid(
                &["chunk_size"],
                format!("{} is not in 1..={MAX_CHUNK}", raw.chunk_size),
            ));
        }
        let bounds = &raw.read_latency_buckets_us;
        if bounds.is_empty() || bounds.len() > MAX_BUCKETS {
            return Err(invalid(
                &["read_latency_buckets_us"],
                format!("{} bounds, expected 1..={MAX_BUCKETS}", bounds.len()),
            ));
        }
        if bounds[0] == 0 || bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid(
                &["read_latency_buckets_us"],
                "bounds must be positive and strictly increasing".to_owned(),
            ));
        }
        let dist = |tier: &str| -> Result<Option<LatencyDist>, CalibrationError> {
            let Some(counts) = raw.hit_latency_counts.get(tier) else {
                return Ok(None);
            };
            if counts.len() != bounds.len() + 1 {
                return Err(invalid(
                    &["hit_latency_counts", tier],
                    format!(
                        "{} counts for {} bounds, expected {} (one per bucket and one above the last)",
                        counts.len(),
                        bounds.len(),
                        bounds.len() + 1
                    ),
                ));
            }
            LatencyDist::new(bounds, counts).map(Some).ok_or_else(|| {
                invalid(
                    &["hit_latency_counts", tier],
                    "no reads counted (or the counts overflow)".to_owned(),
                )
            })
        };
        for tier in raw.hit_latency_counts.keys() {
            if !["decrypted", "memory", "disk", "az", "origin"].contains(&tier.as_str()) {
                return Err(invalid(
                    &["hit_latency_counts", tier],
                    "unknown tier (expected decrypted, memory, disk, az, origin)".to_owned(),
                ));
            }
            dist(tier)?;
        }
        let need = |tier: &str, d: Option<LatencyDist>| {
            d.ok_or_else(|| invalid(&["hit_latency_counts"], format!("missing tier {tier:?}")))
        };
        let az = need("az", dist("az")?)?;
        let origin = need("origin", dist("origin")?)?;

        let positive = |path: &[&str], v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(invalid(path, format!("{v} is not a positive number")))
            }
        };
        let az_bandwidth = positive(
            &["bandwidth_bytes_per_s", "az"],
            raw.bandwidth_bytes_per_s.az,
        )?;
        let origin_bandwidth = positive(
            &["bandwidth_bytes_per_s", "origin"],
            raw.bandwidth_bytes_per_s.origin,
        )?;
        if raw.lanes == 0 || raw.lanes > MAX_LANES {
            return Err(invalid(
                &["lanes"],
                format!("{} is not in 1..={MAX_LANES}", raw.lanes),
            ));
        }
        let ms = |path: &[&str], v: f64| {
            if v.is_finite() && (0.0..=3_600_000.0).contains(&v) {
                Ok(crate::f2u(v * 1000.0))
            } else {
                Err(invalid(path, format!("{v} ms is not in 0..=3600000")))
            }
        };
        let default_warm_us = ms(&["warm_start_ms", "default"], raw.warm_start_ms.default)?;
        let mut warm_start_us = BTreeMap::new();
        for (name, &v) in &raw.warm_start_ms.images {
            warm_start_us.insert(name.clone(), ms(&["warm_start_ms", "images", name], v)?);
        }
        let bases = match raw.bases {
            None => None,
            Some(list) => {
                if list.is_empty() {
                    return Err(invalid(&["bases"], "an empty list".to_owned()));
                }
                let mut out = Vec::new();
                for b in list {
                    let at = |why: String| invalid(&["bases", &b.name], why);
                    if b.name.is_empty() {
                        return Err(invalid(&["bases"], "a base without a name".to_owned()));
                    }
                    if b.chunks == 0 || b.chunks > MAX_BASE_CHUNKS {
                        return Err(at(format!(
                            "chunks {} is not in 1..={MAX_BASE_CHUNKS}",
                            b.chunks
                        )));
                    }
                    if b.bytes < b.chunks || b.bytes > b.chunks * MAX_CHUNK {
                        return Err(at(format!(
                            "bytes {} is not 1..={MAX_CHUNK} per chunk for {} chunks",
                            b.bytes, b.chunks
                        )));
                    }
                    if out.iter().any(|o: &Base| o.name == b.name) {
                        return Err(at(format!("base {:?} listed twice", b.name)));
                    }
                    out.push(Base {
                        chunks: u32::try_from(b.chunks)
                            .map_err(|_| at("too many chunks".into()))?,
                        name: b.name,
                        bytes: b.bytes,
                    });
                }
                Some(out)
            }
        };
        Ok(Calibration {
            source: file.to_owned(),
            chunk_size: raw.chunk_size,
            az,
            origin,
            az_bandwidth,
            origin_bandwidth,
            lanes: u32::try_from(raw.lanes).unwrap_or(1),
            default_warm_us,
            warm_start_us,
            bases,
        })
    }

    /// Warm start time of `image` (µs): by its name, else by its base's, else the default.
    pub fn warm_us(&self, image: &str, base: Option<&str>) -> u64 {
        self.warm_start_us
            .get(image)
            .or_else(|| base.and_then(|b| self.warm_start_us.get(b)))
            .copied()
            .unwrap_or(self.default_warm_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn with(key: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(BUILT_IN).unwrap();
        let mut at = &mut v;
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            at = at.get_mut(*p).unwrap();
        }
        let last = parts[parts.len() - 1];
        if value == "DELETE" {
            at.as_object_mut().unwrap().remove(last);
        } else {
            at[last] = serde_json::from_str(value).unwrap();
        }
        serde_json::to_string_pretty(&v).unwrap()
    }

    fn err(text: &str) -> String {
        Calibration::parse(text, "cal.json")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn built_in_is_valid_and_samples_within_its_buckets() {
        let c = Calibration::built_in();
        assert_eq!(c.lanes, 16);
        assert_eq!(c.bases.as_ref().unwrap().len(), 5);
        let mut rng = crate::rng::Rng::new(3, 0);
        for _ in 0..10_000 {
            let az = c.az.sample(&mut rng);
            assert!((100..=15_000).contains(&az), "{az}");
        }
        assert!(c.origin.mean_us() > c.az.mean_us());
        assert_eq!(c.warm_us("x", None), 150_000);
        let d = LatencyDist::constant(700);
        assert!((0..50).all(|_| d.sample(&mut rng) == 700));
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let e = err(&BUILT_IN.replace("\"version\": 1", "\"version\": 2"));
        assert!(e.starts_with("cal.json:3: calibration version 2"), "{e}");
        let e = err(&BUILT_IN.replace("\"lode-calibration\"", "\"x\""));
        assert!(
            e.starts_with("cal.json:2: not a lode calibration file"),
            "{e}"
        );
        let text = with("bandwidth_bytes_per_s.az", "-5.0");
        let e = err(&text);
        let line = text.lines().position(|l| l.contains("\"az\": -5")).unwrap() + 1;
        assert_eq!(
            e,
            format!("cal.json:{line}: bandwidth_bytes_per_s.az: -5 is not a positive number")
        );
        let e = err(&BUILT_IN.replace("\"lanes\": 16", "\"lanes\": -1"));
        assert_eq!(
            e,
            "cal.json:13:13: lanes: invalid value: integer `-1`, expected u64"
        );
        let e = err(&with("lanes", "DELETE"));
        assert!(e.contains("missing field `lanes`"), "{e}");
        let e = err(&with("hit_latency_counts.origin", "DELETE"));
        assert!(e.contains("missing tier \"origin\""), "{e}");
        let e = err(&with("hit_latency_counts.az", "[1, 2]"));
        assert!(
            e.contains("hit_latency_counts.az: 2 counts for 32 bounds"),
            "{e}"
        );
        let e = err(&BUILT_IN.replace("\"default\": 150", "\"default\": 1e400"));
        assert!(e.starts_with("cal.json:14:"), "{e}");
        assert!(e.contains("number out of range"), "{e}");
        let e = err(&with("warm_start_ms.images", "{\"py\": -1}"));
        assert!(e.contains("warm_start_ms.images.py: -1 ms"), "{e}");
        let e = err(&with("read_latency_buckets_us", "[1, 1]"));
        assert!(e.contains("strictly increasing"), "{e}");
        let e = err("{\"format\": \"lode-calibration\",\n \"version\": 1,\n \"lanes\": 1,}");
        assert!(e.starts_with("cal.json:3:"), "{e}");
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,300}") {
            let _ = Calibration::parse(&s, "f");
        }

        #[test]
        fn mutated_files_never_panic(at in 0usize..2000, with in ".{0,8}") {
            let mut t = BUILT_IN.to_owned();
            let at = at.min(t.len());
            if t.is_char_boundary(at) {
                t.insert_str(at, &with);
            }
            let _ = Calibration::parse(&t, "f");
        }

        #[test]
        fn valid_values_round_trip(lanes in 1u64..=4096, az in 1.0f64..1e12, warm in 0.0f64..10_000.0) {
            let t = with("lanes", &lanes.to_string());
            let t = with_text(&t, "bandwidth_bytes_per_s.az", &format!("{az:?}"));
            let t = with_text(&t, "warm_start_ms.default", &format!("{warm:?}"));
            let c = Calibration::parse(&t, "f").unwrap();
            prop_assert_eq!(u64::from(c.lanes), lanes);
            prop_assert!((c.az_bandwidth - az).abs() <= az * 1e-12);
            prop_assert!(c.default_warm_us.abs_diff(crate::f2u(warm * 1000.0)) <= 1);
        }
    }

    fn with_text(text: &str, key: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut at = &mut v;
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            at = at.get_mut(*p).unwrap();
        }
        at[parts[parts.len() - 1]] = serde_json::from_str(value).unwrap();
        serde_json::to_string_pretty(&v).unwrap()
    }
}
