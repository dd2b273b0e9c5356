//! Sizing the tiers: for each (worker memory, worker disk, the AZ fleet's memory) the size
//! the five-minute rule gives at the prices given, the size a start latency goal needs
//! (found by simulator runs), their max, and what the simulator predicts at that size.
//! docs/scale.md gives the rule as used here.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::calibration::Calibration;
use crate::engine::{self, Config, Report, SimError, TierSpec};
use crate::workload::{Workload, WorkloadError};

const GIB: f64 = (1u64 << 30) as f64;

/// Prices, each positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    /// Memory (worker and AZ node), per GiB-hour.
    pub memory_gib_hour: f64,
    /// Flash (worker disk), per GiB-hour.
    pub flash_gib_hour: f64,
    /// Origin requests, per 1000.
    pub origin_per_1000_requests: f64,
    /// Origin transfer, per GiB.
    pub origin_per_gib: f64,
}

/// A start latency percentile goal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Goal {
    /// 50, 90 or 99.
    pub percentile: u8,
    /// The bound, ms.
    pub ms: f64,
}

impl Goal {
    /// Parses `p50=200ms`, `p99=1s`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("--latency-goal {s:?}: expected p50=, p90= or p99= a time such as 200ms or 1s")
        };
        let (p, t) = s.split_once('=').ok_or_else(bad)?;
        let percentile = match p {
            "p50" => 50,
            "p90" => 90,
            "p99" => 99,
            _ => return Err(bad()),
        };
        let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
            (n, 1.0)
        } else if let Some(n) = t.strip_suffix('s') {
            (n, 1000.0)
        } else {
            return Err(bad());
        };
        let v: f64 = num.parse().map_err(|_| bad())?;
        if !(v.is_finite() && v > 0.0) {
            return Err(bad());
        }
        Ok(Goal {
            percentile,
            ms: v * scale,
        })
    }

    fn met(&self, r: &Report) -> bool {
        let l = &r.start_latency;
        let got = match self.percentile {
            50 => l.p50_ms,
            90 => l.p90_ms,
            _ => l.p99_ms,
        };
        got <= self.ms
    }
}

/// Advice for one tier.
#[derive(Debug, Clone, Serialize)]
pub struct TierAdvice {
    /// `memory`/`disk` (a worker's local tiers, by name) or `az`.
    pub tier: String,
    /// Per worker (local tiers) or for the whole fleet (az).
    pub scope: &'static str,
    /// The break-even interval: refetch cost over holding cost per second.
    pub break_even_s: f64,
    /// The working set over that interval (the rule's size), bytes.
    pub rule_bytes: u64,
    /// The smallest size meeting the latency goal, bytes (None: no goal, or not met
    /// even at the largest size tried).
    pub goal_bytes: Option<u64>,
    /// Whether a goal was given and no size up to the largest tried met it.
    pub goal_unreachable: bool,
    /// The size advised: the larger of the two.
    pub bytes: u64,
    /// Read shares the simulator predicts at that size (the other tiers as given).
    pub shares: Vec<(String, f64)>,
    /// Start latency p50/p90/p99 (ms) predicted at that size.
    pub latency_ms: [f64; 3],
    /// Cost per hour predicted at that size.
    pub cost_per_hour: f64,
}

/// A request that cannot be advised on.
#[derive(Debug, thiserror::Error)]
pub enum AdviseError {
    /// A price that is not positive.
    #[error("{flag} {value}: a price must be a positive number")]
    Price {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: f64,
    },
    /// The workload.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// A simulation.
    #[error(transparent)]
    Sim(#[from] SimError),
}

impl Prices {
    /// Checks every price is positive and finite.
    pub fn check(&self) -> Result<(), AdviseError> {
        for (flag, value) in [
            ("--memory-price", self.memory_gib_hour),
            ("--flash-price", self.flash_gib_hour),
            ("--origin-request-price", self.origin_per_1000_requests),
            ("--origin-gib-price", self.origin_per_gib),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(AdviseError::Price { flag, value });
            }
        }
        Ok(())
    }
}

/// The break-even interval (s) of holding a chunk of `bytes` at `hold_gib_hour` against
/// fetching it again from the origin.
pub fn break_even_s(p: &Prices, bytes: f64, hold_gib_hour: f64) -> f64 {
    let refetch = p.origin_per_1000_requests / 1000.0 + bytes / GIB * p.origin_per_gib;
    let hold_per_s = bytes / GIB * hold_gib_hour / 3600.0;
    refetch / hold_per_s
}

/// The mean distinct bytes referenced within a window of `window_s`: per worker (the
/// mean over every worker and every window, idle ones included) or over the whole fleet.
/// Windows are consecutive (tumbling); a window longer than the run is the whole run.
pub fn working_set(w: &mut Workload, window_s: f64, per_worker: bool) -> f64 {
    let window_us = engine::window_us(window_s, w.duration_s);
    let windows = (w.duration_s * 1e6 / window_us as f64).ceil().max(1.0);
    let groups = if per_worker {
        f64::from(w.workers)
    } else {
        1.0
    };
    // Per group: the window it is in and the chunks seen in it.
    let mut seen: HashMap<u32, (u64, HashMap<u32, ()>)> = HashMap::new();
    let mut total = 0u128;
    let mut until = 0u64;
    let mut starts = Vec::new();
    loop {
        until += 10_000_000;
        starts.clear();
        let more = w.next_batch(until, &mut starts);
        for s in &starts {
            let g = if per_worker { s.worker } else { 0 };
            let win = s.t_us / window_us;
            let entry = seen.entry(g).or_insert_with(|| (win, HashMap::new()));
            if entry.0 != win {
                entry.0 = win;
                entry.1.clear();
            }
            for &c in &w.catalog.lists[usize::try_from(s.list).unwrap_or(0)] {
                if entry.1.insert(c, ()).is_none() {
                    total += u128::from(w.catalog.chunk_bytes[usize::try_from(c).unwrap_or(0)]);
                }
            }
        }
        if !more {
            break;
        }
    }
    u64::try_from(total).unwrap_or(u64::MAX) as f64 / (groups * windows)
}

/// What one tier of the fleet is, for sizing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Which {
    Local(usize),
    Az,
}

fn with_size(base: &Config, which: Which, bytes: u64) -> Config {
    let mut c = base.clone();
    match which {
        Which::Local(i) => c.tiers[i].capacity = bytes,
        Which::Az => {
            c.node_capacity = if c.nodes == 0 {
                0
            } else {
                bytes.div_ceil(u64::from(c.nodes))
            };
        }
    }
    c
}

/// The cost per hour of `config` serving report `r` over `workers`.
pub fn cost_per_hour(p: &Prices, c: &Config, r: &Report) -> f64 {
    let hours = r.simulated_s / 3600.0;
    let local: f64 = c
        .tiers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let price = if i == 0 {
                p.memory_gib_hour
            } else {
                p.flash_gib_hour
            };
            t.capacity as f64 / GIB * price * f64::from(r.workers)
        })
        .sum();
    let az = c.node_capacity as f64 * f64::from(c.nodes) / GIB * p.memory_gib_hour;
    let origin = r.origin.requests as f64 / 1000.0 * p.origin_per_1000_requests
        + r.origin.bytes as f64 / GIB * p.origin_per_gib;
    local + az + origin / hours.max(1e-9)
}

/// The price of holding a byte in a tier, per GiB-hour: the first local tier is memory,
/// the others flash; the AZ fleet is memory holding (k + m) / k bytes per byte.
fn hold_price(p: &Prices, c: &Config, which: Which) -> f64 {
    match which {
        Which::Local(0) => p.memory_gib_hour,
        Which::Local(_) => p.flash_gib_hour,
        Which::Az => p.memory_gib_hour * f64::from(c.k + c.m) / f64::from(c.k.max(1)),
    }
}

/// Advice for every local tier of `base` and its AZ fleet.
pub fn advise(
    base: &Config,
    cal: &Calibration,
    make: &dyn Fn() -> Result<Workload, WorkloadError>,
    prices: &Prices,
    goal: Option<Goal>,
    max_memory: u64,
) -> Result<Vec<TierAdvice>, AdviseError> {
    prices.check()?;
    let sim = |c: &Config| -> Result<Report, AdviseError> {
        let mut w = make()?;
        Ok(engine::run(
            c,
            cal,
            &mut w,
            max_memory,
            Duration::from_secs(u64::MAX >> 2),
            &mut |_| {},
        )?)
    };
    let probe = make()?;
    let mean_chunk = probe.catalog.mean_chunk_bytes() as f64;
    // No tier needs more than every chunk the workload can read: past that, a bigger
    // tier changes nothing, and the search can stop.
    let all_bytes = probe
        .catalog
        .chunk_bytes
        .iter()
        .map(|&b| b as f64)
        .sum::<f64>()
        + probe.new_chunks * mean_chunk;
    let all_bytes = crate::f2u(all_bytes * f64::from(base.k + base.m) / f64::from(base.k.max(1)));
    let mut which: Vec<(Which, String)> = base
        .tiers
        .iter()
        .enumerate()
        .map(|(i, t): (usize, &TierSpec)| (Which::Local(i), t.name.clone()))
        .collect();
    if base.nodes > 0 {
        which.push((Which::Az, "az".to_owned()));
    }
    let mut out = Vec::new();
    for (tier, name) in which {
        let hold = hold_price(prices, base, tier);
        let t = break_even_s(prices, mean_chunk, hold);
        let per_worker = matches!(tier, Which::Local(_));
        let mut ws = working_set(&mut make()?, t, per_worker);
        if tier == Which::Az {
            ws *= f64::from(base.k + base.m) / f64::from(base.k.max(1));
        }
        let rule_bytes = crate::f2u(ws.ceil());
        let (goal_bytes, unreachable) = match goal {
            None => (None, false),
            Some(g) => {
                let meets = |bytes: u64| -> Result<bool, AdviseError> {
                    Ok(g.met(&sim(&with_size(base, tier, bytes))?))
                };
                search(&meets, per_worker, all_bytes)?
            }
        };
        let bytes = rule_bytes.max(goal_bytes.unwrap_or(0));
        let c = with_size(base, tier, bytes);
        let r = sim(&c)?;
        out.push(TierAdvice {
            tier: name,
            scope: if per_worker { "per worker" } else { "fleet" },
            break_even_s: t,
            rule_bytes,
            goal_bytes,
            goal_unreachable: unreachable,
            bytes,
            shares: r.tiers.iter().map(|t| (t.name.clone(), t.share)).collect(),
            latency_ms: [
                r.start_latency.p50_ms,
                r.start_latency.p90_ms,
                r.start_latency.p99_ms,
            ],
            cost_per_hour: cost_per_hour(prices, &c, &r),
        });
    }
    Ok(out)
}

/// The smallest size meeting `meets`: 0 if it does, else doubling from a small size up to
/// a bound (1 TiB per worker, 64 TiB for the fleet, or twice every byte the workload
/// reads if less), then bisection down to 1/16 of the interval. (None, true) when the
/// bound does not meet it either.
fn search(
    meets: &dyn Fn(u64) -> Result<bool, AdviseError>,
    per_worker: bool,
    all_bytes: u64,
) -> Result<(Option<u64>, bool), AdviseError> {
    if meets(0)? {
        return Ok((Some(0), false));
    }
    let (mut hi, bound) = if per_worker {
        (1u64 << 20, 1u64 << 40)
    } else {
        (64u64 << 20, 1u64 << 46)
    };
    let bound = bound.min(all_bytes.saturating_mul(2).max(hi));
    let mut lo = 0;
    while !meets(hi)? {
        lo = hi;
        hi *= 2;
        if hi > bound {
            return Ok((None, true));
        }
    }
    let tolerance = (hi - lo) / 16;
    while hi - lo > tolerance.max(1 << 20) {
        let mid = lo + (hi - lo) / 2;
        if meets(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok((Some(hi), false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Placement, SyntheticSpec};
    use lode_evict::PolicyKind;

    fn prices() -> Prices {
        Prices {
            memory_gib_hour: 0.005,
            flash_gib_hour: 0.0001,
            origin_per_1000_requests: 0.0004,
            origin_per_gib: 0.01,
        }
    }

    fn make() -> Result<Workload, WorkloadError> {
        make_for(600.0)
    }

    fn make_short() -> Result<Workload, WorkloadError> {
        make_for(120.0)
    }

    fn make_for(duration_s: f64) -> Result<Workload, WorkloadError> {
        Workload::synthetic(
            SyntheticSpec {
                functions: 20,
                zipf: 1.1,
                seed: 3,
                rate: 20.0,
                duration_s,
                workers: 4,
                placement: Placement::Random,
                burst_every_s: None,
                burst_images: 0,
            },
            &Calibration::built_in(),
        )
    }

    fn config() -> Config {
        Config {
            tiers: vec![
                TierSpec {
                    name: "memory".into(),
                    capacity: 32 << 20,
                    policy: PolicyKind::Lru,
                },
                TierSpec {
                    name: "disk".into(),
                    capacity: 96 << 20,
                    policy: PolicyKind::Lru,
                },
            ],
            nodes: 6,
            node_capacity: 256 << 20,
            node_policy: PolicyKind::Lru,
            placement: lode_az::PlacementKind::Rendezvous,
            epsilon: 0.25,
            k: 4,
            m: 2,
            read_repair: true,
            threads: 1,
            seed: 1,
        }
    }

    #[test]
    fn a_dearer_tier_gets_a_shorter_interval_and_no_bigger_size() {
        let cal = Calibration::built_in();
        let cheap = advise(&config(), &cal, &make, &prices(), None, u64::MAX).unwrap();
        let mut p = prices();
        p.memory_gib_hour *= 100.0;
        let dear = advise(&config(), &cal, &make, &p, None, u64::MAX).unwrap();
        assert_eq!(cheap[0].tier, "memory");
        assert!((cheap[0].break_even_s / dear[0].break_even_s - 100.0).abs() < 1e-6);
        assert!(dear[0].rule_bytes <= cheap[0].rule_bytes);
        assert!(
            dear[0].rule_bytes < cheap[0].rule_bytes,
            "{} vs {}",
            dear[0].rule_bytes,
            cheap[0].rule_bytes
        );
        // The flash tier's price did not change, nor its size.
        assert_eq!(dear[1].rule_bytes, cheap[1].rule_bytes);
        // A dearer origin lengthens every interval.
        let mut p = prices();
        p.origin_per_gib *= 10.0;
        let o = advise(&config(), &cal, &make, &p, None, u64::MAX).unwrap();
        for (a, b) in o.iter().zip(&cheap) {
            assert!(a.break_even_s > b.break_even_s && a.rule_bytes >= b.rule_bytes);
        }
    }

    #[test]
    fn the_working_set_grows_with_the_window() {
        let mut prev = 0.0;
        for t in [1.0, 10.0, 100.0, 1000.0] {
            let ws = working_set(&mut make().unwrap(), t, true);
            assert!(ws >= prev, "{t}: {ws} < {prev}");
            prev = ws;
        }
        let fleet = working_set(&mut make().unwrap(), 1000.0, false);
        assert!(fleet >= prev);
    }

    #[test]
    fn a_latency_goal_is_met_at_the_size_found() {
        let cal = Calibration::built_in();
        let goal = Goal::parse("p90=160ms").unwrap();
        let mut c = config();
        c.tiers.truncate(1);
        c.nodes = 0;
        let a = advise(&c, &cal, &make_short, &prices(), Some(goal), u64::MAX).unwrap();
        assert_eq!(a.len(), 1);
        let mem = &a[0];
        assert!(!mem.goal_unreachable);
        let size = mem.goal_bytes.unwrap();
        assert!(size > 0);
        assert!(mem.latency_ms[1] <= 160.0, "{:?}", mem.latency_ms);
        // Half that size misses the goal (the search's tolerance is 1/16 or 1 MiB).
        let mut half = c.clone();
        half.tiers[0].capacity = size / 2;
        let mut w = make_short().unwrap();
        let r = engine::run(
            &half,
            &cal,
            &mut w,
            u64::MAX,
            Duration::from_secs(3600),
            &mut |_| {},
        )
        .unwrap();
        assert!(r.start_latency.p90_ms > 160.0, "{}", r.start_latency.p90_ms);
        // An unreachable goal says so.
        let a = advise(
            &c,
            &cal,
            &make_short,
            &prices(),
            Some(Goal::parse("p50=10ms").unwrap()),
            u64::MAX,
        )
        .unwrap();
        assert!(a[0].goal_unreachable && a[0].goal_bytes.is_none());
    }

    #[test]
    fn bad_prices_and_goals_are_errors_naming_the_flag() {
        let cal = Calibration::built_in();
        for (i, flag) in [
            "--memory-price",
            "--flash-price",
            "--origin-request-price",
            "--origin-gib-price",
        ]
        .into_iter()
        .enumerate()
        {
            for v in [0.0, -1.0, f64::NAN] {
                let mut p = prices();
                match i {
                    0 => p.memory_gib_hour = v,
                    1 => p.flash_gib_hour = v,
                    2 => p.origin_per_1000_requests = v,
                    _ => p.origin_per_gib = v,
                }
                let e = advise(&config(), &cal, &make, &p, None, u64::MAX)
                    .unwrap_err()
                    .to_string();
                assert!(e.starts_with(&format!("{flag} ")), "{e}");
            }
        }
        assert_eq!(
            Goal::parse("p99=1s").unwrap(),
            Goal {
                percentile: 99,
                ms: 1000.0
            }
        );
        assert_eq!(
            Goal::parse("p50=200ms").unwrap(),
            Goal {
                percentile: 50,
                ms: 200.0
            }
        );
        for bad in ["p95=1s", "p50=-1s", "p50", "p50=1h", "p50=0ms"] {
            assert!(
                Goal::parse(bad).unwrap_err().contains("--latency-goal"),
                "{bad}"
            );
        }
    }
}
