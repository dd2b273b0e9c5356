//! Snapshot burst capacity: how many clones of one memory snapshot a fleet can restore at
//! once within a first-answer goal, predicted from lode-snap's burst bench.
//!
//! The bench restores N clones of one snapshot through one handler at once and prints one
//! JSON line per (mode, N): the clones' first-answer and all-answers times, the burst's
//! time, the handler's peak memory and the chunks it fetched from the origin. [`parse`]
//! reads those lines, [`Model::fit`] turns one mode's rows into curves of each figure
//! over the clones per handler, [`Model::capacity`] finds the largest clones per worker
//! that meets a goal and a memory bound, and [`Model::spread`] places a burst of N
//! sessions on a fleet. docs/scale.md ("Snapshot bursts") gives the model and its limits.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;

/// The largest measured file read (the bench prints a few KiB).
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// The largest clones per worker the capacity search considers.
pub const MAX_CLONES_PER_WORKER: u32 = 1 << 20;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, thiserror::Error)]
pub enum BurstError {
    #[error("reading {file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {bytes} bytes, more than the {MAX_FILE_BYTES} a measured file may have")]
    TooLarge { file: String, bytes: u64 },
    #[error("{file}:{line}: not a JSON object: {why}")]
    Json {
        file: String,
        line: usize,
        why: String,
    },
    #[error("{file}:{line}: field {field:?}: {why}")]
    Field {
        file: String,
        line: usize,
        field: &'static str,
        why: String,
    },
    #[error(
        "{file}: no burst rows (JSON lines with \"bench\":\"burst\", as `cargo bench -p lode-snap --bench burst` prints)"
    )]
    NoRows { file: String },
    #[error("{file}: no {mode} rows")]
    NoRowsForMode { file: String, mode: Mode },
    #[error(
        "{file}: {mode} rows measure only {clones} clone(s) per handler; the model needs at least two clone counts to say how the figures grow (e.g. BURSTS=1,8,32)"
    )]
    OneCount {
        file: String,
        mode: Mode,
        clones: u32,
    },
    #[error(
        "{mode}: the goal {goal} is not met even by one clone per worker (predicted {at_one_ms:.1} ms)"
    )]
    GoalUnreachable {
        mode: Mode,
        goal: Goal,
        at_one_ms: f64,
    },
    #[error(
        "{mode}: --max-handler-memory {bound_mib:.1} MiB is below the handler's memory at one clone ({at_one_mib:.1} MiB)"
    )]
    MemoryTooSmall {
        mode: Mode,
        bound_mib: f64,
        at_one_mib: f64,
    },
}

/// Where a burst's chunks come from: the origin (a fresh cache) or the local disk tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Cold,
    Warm,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Cold => "cold",
            Mode::Warm => "warm",
        })
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cold" => Ok(Mode::Cold),
            "warm" => Ok(Mode::Warm),
            other => Err(format!("{other:?} is not a mode (cold or warm)")),
        }
    }
}

/// One measured row: a burst of `clones` restores through one handler.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The line of the file it came from (1-based).
    pub line: usize,
    pub mode: Mode,
    pub clones: u32,
    pub first_p50_ms: f64,
    pub first_p99_ms: f64,
    pub all_p50_ms: f64,
    pub all_p99_ms: f64,
    pub burst_ms: f64,
    /// Chunk fetches from the origin during the burst.
    pub origin_fetches: f64,
    pub rss_peak_mib: f64,
    pub snapshot_bytes: u64,
    pub chunk_bytes: u64,
    pub nonzero_chunks: u64,
}

/// Reads a measured file: see [`parse`].
pub fn load(path: &Path) -> Result<Vec<Row>, BurstError> {
    let file = path.display().to_string();
    let io = |source| BurstError::Io {
        file: file.clone(),
        source,
    };
    let bytes = std::fs::metadata(path).map_err(io)?.len();
    if bytes > MAX_FILE_BYTES {
        return Err(BurstError::TooLarge { file, bytes });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    parse(&text, &file)
}

/// The burst rows of the bench's output. A line whose first non-blank character is `{`
/// must be a JSON object; one with `"bench":"burst"` is a row and must carry every field
/// the model uses. Other lines (the bench's table, blank lines, other benches' rows) are
/// ignored. `file` names the input in errors.
pub fn parse(text: &str, file: &str) -> Result<Vec<Row>, BurstError> {
    let mut rows: Vec<Row> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if !t.starts_with('{') {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(t).map_err(|e| BurstError::Json {
            file: file.into(),
            line,
            why: e.to_string(),
        })?;
        let Some(obj) = v.as_object() else {
            return Err(BurstError::Json {
                file: file.into(),
                line,
                why: "not an object".into(),
            });
        };
        if obj.get("bench").and_then(|b| b.as_str()) != Some("burst") {
            continue;
        }
        let row = row_of(obj, file, line)?;
        if let Some(first) = rows.first() {
            for (field, a, b) in [
                ("snapshot_bytes", first.snapshot_bytes, row.snapshot_bytes),
                ("chunk_bytes", first.chunk_bytes, row.chunk_bytes),
                ("nonzero_chunks", first.nonzero_chunks, row.nonzero_chunks),
            ] {
                if a != b {
                    return Err(BurstError::Field {
                        file: file.into(),
                        line,
                        field,
                        why: format!(
                            "{b}, but line {} has {a}: rows of different snapshots",
                            first.line
                        ),
                    });
                }
            }
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(BurstError::NoRows { file: file.into() });
    }
    Ok(rows)
}

fn row_of(
    obj: &serde_json::Map<String, serde_json::Value>,
    file: &str,
    line: usize,
) -> Result<Row, BurstError> {
    let bad = |field: &'static str, why: String| BurstError::Field {
        file: file.into(),
        line,
        field,
        why,
    };
    let get = |field: &'static str| obj.get(field).ok_or_else(|| bad(field, "missing".into()));
    let num = |field: &'static str| -> Result<f64, BurstError> {
        let x = get(field)?
            .as_f64()
            .ok_or_else(|| bad(field, "not a number".into()))?;
        if x.is_finite() && x >= 0.0 {
            Ok(x)
        } else {
            Err(bad(field, format!("{x} is not a time, count or size")))
        }
    };
    let int = |field: &'static str| -> Result<u64, BurstError> {
        get(field)?
            .as_u64()
            .ok_or_else(|| bad(field, "not a whole number".into()))
    };
    let mode = get("mode")?
        .as_str()
        .ok_or_else(|| bad("mode", "not a string".into()))?
        .parse()
        .map_err(|e| bad("mode", e))?;
    let clones = int("clones")?;
    let clones = u32::try_from(clones)
        .ok()
        .filter(|c| (1..=MAX_CLONES_PER_WORKER).contains(c))
        .ok_or_else(|| {
            bad(
                "clones",
                format!("{clones}: not in 1..={MAX_CLONES_PER_WORKER}"),
            )
        })?;
    let chunk_bytes = int("chunk_bytes")?;
    if chunk_bytes == 0 {
        return Err(bad("chunk_bytes", "0".into()));
    }
    Ok(Row {
        line,
        mode,
        clones,
        first_p50_ms: num("first_answer_ms_p50")?,
        first_p99_ms: num("first_answer_ms_p99")?,
        all_p50_ms: num("all_answers_ms_p50")?,
        all_p99_ms: num("all_answers_ms_p99")?,
        burst_ms: num("burst_ms")?,
        origin_fetches: num("origin_fetches")?,
        rss_peak_mib: num("handler_rss_peak_mib")?,
        snapshot_bytes: int("snapshot_bytes")?,
        chunk_bytes,
        nonzero_chunks: int("nonzero_chunks")?,
    })
}

/// A figure as a function of the clones per handler: piecewise-linear through the
/// measured points, flat below the smallest, extended beyond the largest along the last
/// segment. Each point's value is raised to the largest at any smaller count, so the
/// curve never falls as clones are added.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// (clones, value), clones strictly increasing, values non-decreasing; two or more.
    points: Vec<(f64, f64)>,
}

impl Curve {
    /// `points`: (clones, value), clones strictly increasing, two or more. Returns the
    /// curve and the clone counts whose value was raised.
    fn new(points: &[(u32, f64)]) -> (Self, Vec<u32>) {
        let mut raised = Vec::new();
        let mut top = f64::NEG_INFINITY;
        let points = points
            .iter()
            .map(|&(n, v)| {
                if v < top {
                    raised.push(n);
                } else {
                    top = v;
                }
                (f64::from(n), top)
            })
            .collect();
        (Curve { points }, raised)
    }

    /// The value at `clones`.
    pub fn at(&self, clones: f64) -> f64 {
        let p = &self.points;
        let (n0, v0) = p[0];
        if clones <= n0 {
            return v0;
        }
        let i = p
            .windows(2)
            .position(|w| clones <= w[1].0)
            .unwrap_or(p.len() - 2);
        let ((a, va), (b, vb)) = (p[i], p[i + 1]);
        if clones == b {
            // A measured count gives back its value exactly, without rounding.
            return vb;
        }
        va + (vb - va) * (clones - a) / (b - a)
    }

    /// The growth per clone beyond the largest measured count.
    pub fn slope_beyond(&self) -> f64 {
        let [.., (a, va), (b, vb)] = self.points[..] else {
            return 0.0;
        };
        (vb - va) / (b - a)
    }
}

/// What one handler does with `clones` clones in one burst, as the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    pub clones: u32,
    pub first_answer_ms_p50: f64,
    pub first_answer_ms_p99: f64,
    pub all_answers_ms_p50: f64,
    pub all_answers_ms_p99: f64,
    pub burst_ms: f64,
    pub handler_rss_mib: f64,
    /// Chunks fetched from the origin by this handler in the burst.
    pub origin_chunks: f64,
}

/// One mode's rows as curves over the clones per handler.
#[derive(Debug, Clone)]
pub struct Model {
    pub mode: Mode,
    /// The measured clone counts, increasing.
    pub measured: Vec<u32>,
    /// (clones, figure) of measured points raised to a smaller count's value.
    pub raised: Vec<(u32, &'static str)>,
    pub snapshot_bytes: u64,
    pub chunk_bytes: u64,
    pub nonzero_chunks: u64,
    first_p50: Curve,
    first_p99: Curve,
    all_p50: Curve,
    all_p99: Curve,
    burst: Curve,
    rss: Curve,
    origin: Curve,
}

/// A first-answer goal: a percentile of the clones' first-answer times, at most `ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Goal {
    pub percentile: u8,
    pub ms: f64,
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}={}ms", self.percentile, self.ms)
    }
}

impl FromStr for Goal {
    type Err = String;
    /// `p50=200ms`, `p99=0.3s`, `p99=300000us`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a goal (p50= or p99= a time, e.g. p99=300ms)");
        let (p, t) = s.trim().split_once('=').ok_or_else(bad)?;
        let percentile = match p.trim() {
            "p50" => 50,
            "p99" => 99,
            _ => return Err(bad()),
        };
        let t = t.trim();
        let (num, scale) = if let Some(x) = t.strip_suffix("ms") {
            (x, 1.0)
        } else if let Some(x) = t.strip_suffix("us") {
            (x, 1e-3)
        } else if let Some(x) = t.strip_suffix('s') {
            (x, 1e3)
        } else {
            return Err(bad());
        };
        let ms = num.trim().parse::<f64>().map_err(|_| bad())? * scale;
        if !(ms.is_finite() && ms > 0.0) {
            return Err(format!("{s:?}: the time must be positive"));
        }
        Ok(Goal { percentile, ms })
    }
}

/// What bounds the clones per worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    Goal,
    Memory,
    /// Neither bound within [`MAX_CLONES_PER_WORKER`].
    SearchCap,
}

/// The largest clones per worker within the goal and the memory bound.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Capacity {
    pub clones_per_worker: u32,
    pub limited_by: Limit,
    /// Beyond the largest measured count: the curves' extension, not a measurement.
    pub extrapolated: bool,
    pub at: Prediction,
}

/// A burst of `sessions` clones spread evenly over the fewest workers that hold it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub sessions: u64,
    /// Workers the burst lands on: ceil(sessions / capacity), at most the fleet.
    pub workers: u64,
    /// Whether the fleet holds the burst within the goal.
    pub fits: bool,
    /// At the busiest worker: ceil(sessions / workers) clones.
    pub at: Prediction,
    /// Chunk requests to the origin for the burst (every worker touched fetches its own).
    pub origin_requests: f64,
    /// Their bytes, at a full chunk each.
    pub origin_bytes: f64,
    /// The bound if every worker fetched every non-zero chunk once.
    pub origin_bytes_max: f64,
}

impl Model {
    /// Fits `mode`'s rows. Rows of the same clone count are averaged.
    pub fn fit(rows: &[Row], mode: Mode, file: &str) -> Result<Self, BurstError> {
        let mut mine: Vec<&Row> = rows.iter().filter(|r| r.mode == mode).collect();
        let Some(first) = mine.first() else {
            return Err(BurstError::NoRowsForMode {
                file: file.into(),
                mode,
            });
        };
        let (snapshot_bytes, chunk_bytes, nonzero_chunks) = (
            first.snapshot_bytes,
            first.chunk_bytes,
            first.nonzero_chunks,
        );
        mine.sort_by_key(|r| r.clones);
        let mut groups: Vec<Vec<&Row>> = Vec::new();
        for r in mine {
            match groups.last_mut() {
                Some(g) if g[0].clones == r.clones => g.push(r),
                _ => groups.push(vec![r]),
            }
        }
        if let [only] = &groups[..] {
            return Err(BurstError::OneCount {
                file: file.into(),
                mode,
                clones: only[0].clones,
            });
        }
        let measured: Vec<u32> = groups.iter().map(|g| g[0].clones).collect();
        let mut raised = Vec::new();
        let mut curve = |name: &'static str, f: fn(&Row) -> f64| {
            let points: Vec<(u32, f64)> = groups
                .iter()
                .map(|g| {
                    let sum: f64 = g.iter().map(|r| f(r)).sum();
                    (
                        g[0].clones,
                        sum / f64::from(u32::try_from(g.len()).unwrap_or(u32::MAX)),
                    )
                })
                .collect();
            let (c, up) = Curve::new(&points);
            raised.extend(up.into_iter().map(|n| (n, name)));
            c
        };
        let first_p50 = curve("first_answer_ms_p50", |r| r.first_p50_ms);
        let first_p99 = curve("first_answer_ms_p99", |r| r.first_p99_ms);
        let all_p50 = curve("all_answers_ms_p50", |r| r.all_p50_ms);
        let all_p99 = curve("all_answers_ms_p99", |r| r.all_p99_ms);
        let burst = curve("burst_ms", |r| r.burst_ms);
        let rss = curve("handler_rss_peak_mib", |r| r.rss_peak_mib);
        let origin = curve("origin_fetches", |r| r.origin_fetches);
        raised.sort_unstable();
        Ok(Model {
            mode,
            measured,
            raised,
            snapshot_bytes,
            chunk_bytes,
            nonzero_chunks,
            first_p50,
            first_p99,
            all_p50,
            all_p99,
            burst,
            rss,
            origin,
        })
    }

    /// The handler's memory per added clone beyond the largest measured count, MiB.
    pub fn rss_mib_per_clone(&self) -> f64 {
        self.rss.slope_beyond()
    }

    /// The model's figures for one handler serving `clones` at once.
    pub fn predict(&self, clones: u32) -> Prediction {
        let n = f64::from(clones);
        // A handler fetches each chunk once at most, whatever its clones touch.
        #[allow(clippy::cast_precision_loss)]
        let most = self.nonzero_chunks as f64;
        Prediction {
            clones,
            first_answer_ms_p50: self.first_p50.at(n),
            first_answer_ms_p99: self.first_p99.at(n),
            all_answers_ms_p50: self.all_p50.at(n),
            all_answers_ms_p99: self.all_p99.at(n),
            burst_ms: self.burst.at(n),
            handler_rss_mib: self.rss.at(n),
            origin_chunks: self.origin.at(n).min(most),
        }
    }

    fn goal_ms(p: &Prediction, goal: Goal) -> f64 {
        if goal.percentile == 50 {
            p.first_answer_ms_p50
        } else {
            p.first_answer_ms_p99
        }
    }

    /// The largest clones per worker whose predicted first answer meets `goal` and whose
    /// handler memory is at most `max_rss_bytes`.
    pub fn capacity(&self, goal: Goal, max_rss_bytes: Option<u64>) -> Result<Capacity, BurstError> {
        #[allow(clippy::cast_precision_loss)]
        let bound_mib = max_rss_bytes.map(|b| b as f64 / MIB);
        let meets_goal = |n| Self::goal_ms(&self.predict(n), goal) <= goal.ms;
        let fits_memory = |n| bound_mib.is_none_or(|b| self.predict(n).handler_rss_mib <= b);
        let one = self.predict(1);
        if !meets_goal(1) {
            return Err(BurstError::GoalUnreachable {
                mode: self.mode,
                goal,
                at_one_ms: Self::goal_ms(&one, goal),
            });
        }
        if let Some(b) = bound_mib
            && !fits_memory(1)
        {
            return Err(BurstError::MemoryTooSmall {
                mode: self.mode,
                bound_mib: b,
                at_one_mib: one.handler_rss_mib,
            });
        }
        // Every curve is non-decreasing, so the clone counts that pass form a prefix.
        let ok = |n| meets_goal(n) && fits_memory(n);
        let (mut lo, mut hi) = (1u32, MAX_CLONES_PER_WORKER);
        let limited_by = if ok(hi) {
            lo = hi;
            Limit::SearchCap
        } else {
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if ok(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            if meets_goal(hi) {
                Limit::Memory
            } else {
                Limit::Goal
            }
        };
        Ok(Capacity {
            clones_per_worker: lo,
            limited_by,
            extrapolated: self.measured.last().is_some_and(|&m| lo > m),
            at: self.predict(lo),
        })
    }

    /// A burst of `sessions` on a fleet of `workers`, each holding `cap` clones at most.
    pub fn spread(&self, cap: &Capacity, workers: u64, sessions: u64) -> Spread {
        let per = u64::from(cap.clones_per_worker.max(1));
        let needed = sessions.div_ceil(per).max(1);
        let used = needed.min(workers.max(1));
        let busiest = sessions.div_ceil(used).max(1);
        let at = self.predict(u32::try_from(busiest).unwrap_or(u32::MAX));
        #[allow(clippy::cast_precision_loss)]
        let (used_f, chunk, most) = (
            used as f64,
            self.chunk_bytes as f64,
            self.nonzero_chunks as f64,
        );
        // Workers below the busiest hold one clone fewer at most; each fetches what a
        // handler of its count fetches, bounded by the busiest's.
        let requests = at.origin_chunks * used_f;
        Spread {
            sessions,
            workers: used,
            fits: needed <= workers,
            at,
            origin_requests: requests,
            origin_bytes: requests * chunk,
            origin_bytes_max: if self.mode == Mode::Cold {
                most * chunk * used_f
            } else {
                0.0
            },
        }
    }
}

/// `--sessions`: `N`, a list `A,B,C`, or a range `A..B` (ten steps) or `A..B/STEP`;
/// at most 1000 values.
pub fn parse_sessions(s: &str) -> Result<Vec<u64>, String> {
    const MAX: usize = 1000;
    let num = |t: &str| -> Result<u64, String> {
        let n: u64 = t
            .trim()
            .parse()
            .map_err(|_| format!("{t:?} is not a number of sessions"))?;
        if n == 0 {
            return Err("a burst has at least one session".into());
        }
        Ok(n)
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        if let Some((a, rest)) = part.split_once("..") {
            let (b, step) = match rest.split_once('/') {
                Some((b, st)) => (num(b)?, Some(num(st)?)),
                None => (num(rest)?, None),
            };
            let a = num(a)?;
            if b < a {
                return Err(format!("{part:?}: the range ends before it starts"));
            }
            let step = step.unwrap_or_else(|| (b - a).div_ceil(10).max(1));
            let mut n = a;
            while n <= b && out.len() <= MAX {
                out.push(n);
                n = match n.checked_add(step) {
                    Some(x) => x,
                    None => break,
                };
            }
            if out.last() != Some(&b) && out.len() <= MAX {
                out.push(b);
            }
        } else {
            out.push(num(part)?);
        }
        if out.len() > MAX {
            return Err(format!("{s:?}: more than {MAX} session counts"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(mode: Mode, clones: u32, p99: f64) -> Row {
        Row {
            line: 0,
            mode,
            clones,
            first_p50_ms: p99 / 2.0,
            first_p99_ms: p99,
            all_p50_ms: p99 * 2.0,
            all_p99_ms: p99 * 3.0,
            burst_ms: p99 * 4.0,
            origin_fetches: if mode == Mode::Cold { 40.0 } else { 0.0 },
            rss_peak_mib: 100.0 + f64::from(clones),
            snapshot_bytes: 64 << 20,
            chunk_bytes: 512 << 10,
            nonzero_chunks: 50,
        }
    }

    fn line(mode: &str, clones: u32, p99: f64) -> String {
        serde_json::json!({
            "bench": "burst", "mode": mode, "clones": clones,
            "first_answer_ms_p50": p99 / 2.0, "first_answer_ms_p99": p99,
            "all_answers_ms_p50": p99, "all_answers_ms_p99": p99,
            "burst_ms": p99, "origin_fetches": 3, "handler_rss_peak_mib": 10.5,
            "snapshot_bytes": 1 << 20, "chunk_bytes": 1 << 19, "nonzero_chunks": 2,
        })
        .to_string()
    }

    #[test]
    fn curve_interpolates_extends_and_never_falls() {
        let (c, raised) = Curve::new(&[(1, 10.0), (5, 30.0), (9, 20.0), (13, 40.0)]);
        assert_eq!(raised, vec![9]);
        assert_eq!(c.at(0.0), 10.0);
        assert_eq!(c.at(1.0), 10.0);
        assert_eq!(c.at(3.0), 20.0);
        assert_eq!(c.at(5.0), 30.0);
        assert_eq!(c.at(9.0), 30.0);
        assert_eq!(c.at(11.0), 35.0);
        assert_eq!(c.at(13.0), 40.0);
        // Beyond: the last segment's 2.5 per clone.
        assert_eq!(c.slope_beyond(), 2.5);
        assert_eq!(c.at(17.0), 50.0);
        let mut last = f64::NEG_INFINITY;
        for n in 0..100 {
            let v = c.at(f64::from(n));
            assert!(v >= last, "falls at {n}: {v} < {last}");
            last = v;
        }
    }

    #[test]
    fn fit_reproduces_measured_rows_and_averages_repeats() {
        let rows = vec![
            row(Mode::Cold, 1, 20.0),
            row(Mode::Cold, 8, 50.0),
            row(Mode::Cold, 8, 70.0),
            row(Mode::Cold, 32, 200.0),
            row(Mode::Warm, 1, 5.0),
            row(Mode::Warm, 32, 37.0),
        ];
        let m = Model::fit(&rows, Mode::Cold, "f").unwrap();
        assert_eq!(m.measured, vec![1, 8, 32]);
        assert!(m.raised.is_empty());
        for r in [&rows[0], &rows[3]] {
            let p = m.predict(r.clones);
            assert_eq!(p.first_answer_ms_p50, r.first_p50_ms);
            assert_eq!(p.first_answer_ms_p99, r.first_p99_ms);
            assert_eq!(p.all_answers_ms_p50, r.all_p50_ms);
            assert_eq!(p.all_answers_ms_p99, r.all_p99_ms);
            assert_eq!(p.burst_ms, r.burst_ms);
            assert_eq!(p.handler_rss_mib, r.rss_peak_mib);
            assert_eq!(p.origin_chunks, r.origin_fetches);
        }
        assert_eq!(m.predict(8).first_answer_ms_p99, 60.0);
        assert_eq!(m.rss_mib_per_clone(), 1.0);
        let w = Model::fit(&rows, Mode::Warm, "f").unwrap();
        // (37 - 5) / 31 = 32/31 ms per clone beyond 32.
        assert!((w.predict(63).first_answer_ms_p99 - 69.0).abs() < 1e-9);
        assert_eq!(w.predict(63).origin_chunks, 0.0);
    }

    #[test]
    fn capacity_by_goal_and_by_memory() {
        // p99 = 10 ms at 1 clone, +10 ms a clone: 10 n. Memory 100 + n MiB.
        let rows = vec![row(Mode::Cold, 1, 10.0), row(Mode::Cold, 11, 110.0)];
        let m = Model::fit(&rows, Mode::Cold, "f").unwrap();
        let goal: Goal = "p99=300ms".parse().unwrap();
        let c = m.capacity(goal, None).unwrap();
        assert_eq!(c.clones_per_worker, 30);
        assert_eq!(c.limited_by, Limit::Goal);
        assert!(c.extrapolated);
        assert_eq!(c.at.first_answer_ms_p99, 300.0);
        // p50 is half: 5 n <= 300 → 60.
        let c50 = m.capacity("p50=0.3s".parse().unwrap(), None).unwrap();
        assert_eq!(c50.clones_per_worker, 60);
        // 120 MiB of handler memory: 100 + n <= 120 → 20, before the goal's 30.
        let cm = m.capacity(goal, Some(120 << 20)).unwrap();
        assert_eq!((cm.clones_per_worker, cm.limited_by), (20, Limit::Memory));
        assert!(matches!(
            m.capacity("p99=9ms".parse().unwrap(), None),
            Err(BurstError::GoalUnreachable { .. })
        ));
        assert!(matches!(
            m.capacity(goal, Some(100 << 20)),
            Err(BurstError::MemoryTooSmall { .. })
        ));
        // Flat figures bind nowhere: the search cap says so.
        let flat = vec![row(Mode::Warm, 1, 10.0), row(Mode::Warm, 2, 10.0)];
        let f = Model::fit(&flat, Mode::Warm, "f").unwrap();
        let cf = f.capacity(goal, None).unwrap();
        assert_eq!(
            (cf.clones_per_worker, cf.limited_by),
            (MAX_CLONES_PER_WORKER, Limit::SearchCap)
        );
    }

    #[test]
    fn spread_over_the_fleet() {
        let rows = vec![row(Mode::Cold, 1, 10.0), row(Mode::Cold, 11, 110.0)];
        let m = Model::fit(&rows, Mode::Cold, "f").unwrap();
        let cap = m.capacity("p99=300ms".parse().unwrap(), None).unwrap();
        // 1000 sessions at 30 a worker: 34 workers, 30 on the busiest (ceil(1000/34)).
        let s = m.spread(&cap, 100, 1000);
        assert_eq!((s.workers, s.fits, s.at.clones), (34, true, 30));
        assert_eq!(s.origin_requests, 40.0 * 34.0);
        assert_eq!(s.origin_bytes, 40.0 * 34.0 * 524_288.0);
        assert_eq!(s.origin_bytes_max, 50.0 * 34.0 * 524_288.0);
        // More than the fleet holds: every worker, over the goal.
        let s = m.spread(&cap, 10, 1000);
        assert_eq!((s.workers, s.fits, s.at.clones), (10, false, 100));
        assert!(s.at.first_answer_ms_p99 > 300.0);
    }

    #[test]
    fn parse_rows_and_errors() {
        let text = format!(
            "setup\n| table |\n\n{}\n{{\"bench\":\"restore\"}}\n{}\n",
            line("cold", 1, 10.0),
            line("warm", 8, 20.0)
        );
        let rows = parse(&text, "m.json").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].line, rows[0].mode, rows[0].clones),
            (4, Mode::Cold, 1)
        );
        assert_eq!((rows[1].line, rows[1].first_p99_ms), (6, 20.0));

        let e = parse("| only a table |\n", "m.json").unwrap_err();
        assert!(e.to_string().starts_with("m.json: no burst rows"), "{e}");
        let e = parse(
            &format!("{}\n{{\"bench\": ", line("cold", 1, 1.0)),
            "m.json",
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("m.json:2: not a JSON object"),
            "{e}"
        );
        let missing = line("cold", 1, 1.0).replace("\"burst_ms\"", "\"other\"");
        let e = parse(&missing, "m.json").unwrap_err();
        assert_eq!(e.to_string(), "m.json:1: field \"burst_ms\": missing");
        let neg = line("cold", 1, -1.0);
        let e = parse(&neg, "m.json").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("m.json:1: field \"first_answer_ms_p50\""),
            "{e}"
        );
        let zero = line("cold", 0, 1.0);
        let e = parse(&zero, "m.json").unwrap_err();
        assert!(
            e.to_string().starts_with("m.json:1: field \"clones\""),
            "{e}"
        );
        let mixed = format!(
            "{}\n{}",
            line("cold", 1, 1.0),
            line("cold", 2, 1.0).replace("\"nonzero_chunks\":2", "\"nonzero_chunks\":3")
        );
        let e = parse(&mixed, "m.json").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("m.json:2: field \"nonzero_chunks\""),
            "{e}"
        );

        let one = parse(&line("cold", 4, 1.0), "m.json").unwrap();
        let e = Model::fit(&one, Mode::Cold, "m.json").unwrap_err();
        assert!(e.to_string().contains("only 4 clone(s)"), "{e}");
        let e = Model::fit(&one, Mode::Warm, "m.json").unwrap_err();
        assert_eq!(e.to_string(), "m.json: no warm rows");
    }

    #[test]
    fn goals_and_sessions() {
        assert_eq!("p99=300ms".parse::<Goal>().unwrap().ms, 300.0);
        assert_eq!("p50=1.5s".parse::<Goal>().unwrap().ms, 1500.0);
        assert_eq!("p99=500us".parse::<Goal>().unwrap().ms, 0.5);
        for bad in [
            "p90=1ms", "p99=300", "p99=-1ms", "p99=0ms", "300ms", "p99=xms",
        ] {
            assert!(bad.parse::<Goal>().is_err(), "{bad}");
        }
        assert_eq!(parse_sessions("5").unwrap(), vec![5]);
        assert_eq!(parse_sessions("5,7").unwrap(), vec![5, 7]);
        assert_eq!(parse_sessions("10..30/10").unwrap(), vec![10, 20, 30]);
        assert_eq!(parse_sessions("10..25/10").unwrap(), vec![10, 20, 25]);
        assert_eq!(
            parse_sessions("0..100").unwrap_err(),
            "a burst has at least one session"
        );
        let sweep = parse_sessions("1..100").unwrap();
        assert_eq!((sweep.len(), sweep[1], sweep[10]), (11, 11, 100));
        assert!(parse_sessions("1..100000/1").is_err());
        assert!(parse_sessions("9..3").is_err());
        assert!(parse_sessions("x").is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(lines in proptest::collection::vec(
            prop_oneof![
                ".{0,80}",
                "\\{.{0,80}",
                "\\{\"bench\":\"burst\".{0,80}",
                (1u32..100).prop_map(|n| line("warm", n, 1.0)),
            ],
            0..8,
        )) {
            if let Ok(rows) = parse(&lines.join("\n"), "p") {
                prop_assert!(!rows.is_empty());
                let _ = Model::fit(&rows, Mode::Warm, "p");
            }
        }

        #[test]
        fn parse_never_panics_on_rows_with_odd_fields(
            clones in any::<i64>(),
            p99 in any::<f64>(),
            field in "[a-z_]{1,24}",
            value in prop_oneof![
                Just("null".to_string()),
                any::<f64>().prop_map(|x| x.to_string()),
                any::<i64>().prop_map(|x| x.to_string()),
                "\"[a-z]{0,6}\"",
                Just("[1,2]".to_string()),
            ],
        ) {
            let mut v: serde_json::Value = serde_json::from_str(&line("cold", 1, 1.0)).unwrap();
            v["clones"] = serde_json::json!(clones);
            v["first_answer_ms_p99"] = serde_json::json!(p99);
            let text = v.to_string().replacen(&format!("\"{field}\":"), &format!("\"{field}\":{value},\"x\":"), 1);
            if let Ok(rows) = parse(&text, "p") {
                let _ = Model::fit(&rows, Mode::Cold, "p");
            }
        }

        #[test]
        fn sessions_never_panic(s in ".{0,40}") {
            let _ = parse_sessions(&s);
        }

        #[test]
        fn predictions_are_monotone(
            pts in proptest::collection::btree_map(1u32..500, 0.0f64..1e4, 2..6),
            a in 0u32..5000,
            b in 0u32..5000,
        ) {
            let rows: Vec<Row> = pts.iter().map(|(&n, &v)| row(Mode::Warm, n, v)).collect();
            let m = Model::fit(&rows, Mode::Warm, "p").unwrap();
            let (lo, hi) = (a.min(b), a.max(b));
            let (pl, ph) = (m.predict(lo), m.predict(hi));
            prop_assert!(pl.first_answer_ms_p99 <= ph.first_answer_ms_p99);
            prop_assert!(pl.first_answer_ms_p50 <= ph.first_answer_ms_p50);
            prop_assert!(pl.burst_ms <= ph.burst_ms);
            prop_assert!(pl.handler_rss_mib <= ph.handler_rss_mib);
        }

        #[test]
        fn monotone_rows_are_given_back(
            counts in proptest::collection::btree_set(1u32..500, 2..6),
            values in proptest::collection::vec(0.0f64..1e4, 6),
        ) {
            let mut values = values;
            values.sort_by(f64::total_cmp);
            let rows: Vec<Row> = counts
                .iter()
                .zip(&values)
                .map(|(&n, &v)| row(Mode::Cold, n, v))
                .collect();
            let m = Model::fit(&rows, Mode::Cold, "p").unwrap();
            prop_assert!(m.raised.is_empty());
            for r in &rows {
                let p = m.predict(r.clones);
                prop_assert_eq!(p.first_answer_ms_p99, r.first_p99_ms);
                prop_assert_eq!(p.first_answer_ms_p50, r.first_p50_ms);
                prop_assert_eq!(p.burst_ms, r.burst_ms);
                prop_assert_eq!(p.handler_rss_mib, r.rss_peak_mib);
            }
        }
    }
}
