//! `lode sim`: arguments to lode-sim's simulator, its progress to stderr, its report to
//! stdout (text, or JSON with --json). The model lives in the lode-sim crate; docs/scale.md
//! describes it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use lode_evict::PolicyKind;
use lode_sim::advise::{Goal, Prices};
use lode_sim::engine::default_node_policy;
use lode_sim::{Calibration, Config, Placement, Report, SyntheticSpec, TierSpec, Workload};
use serde_json::json;

use crate::output::{human_bytes, print_json};

/// How starts are placed on workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlacementArg {
    /// Each start on a worker drawn at random (as scripts/bench.py's replay does).
    Random,
    /// Each image on --sticky-workers workers chosen by rendezvous hashing on its name.
    Sticky,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// A lode-trace v1 file (one per worker; repeat for several). Without it the
    /// workload is synthetic (--functions, --zipf, --rate, ...).
    #[arg(long, value_name = "FILE")]
    pub trace: Vec<PathBuf>,

    /// Divide a trace's times by this (2: twice as fast).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub speed: f64,

    /// Function images of the synthetic workload.
    #[arg(long, default_value_t = 48, value_name = "N")]
    pub functions: u32,

    /// Zipf exponent of the functions' popularity.
    #[arg(long, default_value_t = 1.1, value_name = "S")]
    pub zipf: f64,

    /// Seed of every random draw.
    #[arg(long, default_value_t = 7, value_name = "X")]
    pub seed: u64,

    /// Starts per second (a Poisson process).
    #[arg(long, default_value_t = 100.0, value_name = "STARTS_PER_S")]
    pub rate: f64,

    /// Simulated time (e.g. 90s, 10m, 1h).
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "TIME")]
    pub duration: Duration,

    /// Workers.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub workers: u32,

    /// Placement of starts on workers.
    #[arg(long, value_enum, default_value_t = PlacementArg::Random)]
    pub placement: PlacementArg,

    /// Workers per image under --placement sticky.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub sticky_workers: u32,

    /// A burst of one-off images this often (e.g. 5m): each started once, never again.
    #[arg(long, value_parser = parse_duration, value_name = "TIME")]
    pub burst_every: Option<Duration>,

    /// Images per burst.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub burst_images: u32,

    /// A worker's local tier, fastest first, as NAME:SIZE[:POLICY] (repeat for each;
    /// POLICY defaults to the agent's, s3-fifo).
    /// [default: memory:32MiB:s3-fifo disk:96MiB:s3-fifo, the replay's sizes with the
    /// agent's default policy]
    #[arg(long = "tier", value_name = "NAME:SIZE[:POLICY]", value_parser = parse_tier)]
    pub tiers: Vec<TierSpec>,

    /// AZ cache nodes (0: none).
    #[arg(long, default_value_t = 6, value_name = "N")]
    pub nodes: u32,

    /// Bytes each AZ node holds.
    #[arg(long, default_value = "1GiB", value_parser = lode_agent::config::parse_size, value_name = "SIZE")]
    pub node_memory: u64,

    /// The AZ nodes' eviction policy. [default: lru-2, as `lode cache-node`'s]
    #[arg(long, value_name = "POLICY")]
    pub node_policy: Option<PolicyKind>,

    /// How stripes are placed on the AZ nodes: `rendezvous` or `bounded` (consistent
    /// hashing with bounded loads, lode-az's).
    #[arg(long, default_value = "rendezvous", value_name = "KIND")]
    pub az_placement: lode_az::PlacementKind,

    /// Bounded placement's ε: no node holds more than (1+ε) of the mean stripe slots.
    #[arg(long, default_value_t = 0.25, value_name = "E")]
    pub epsilon: f64,

    /// Data stripes per chunk.
    #[arg(long, default_value_t = 4)]
    pub k: u32,

    /// Parity stripes per chunk.
    #[arg(long, default_value_t = 2)]
    pub m: u32,

    /// An AZ hit does not write back the stripes its nodes lacked.
    #[arg(long)]
    pub no_read_repair: bool,

    /// Calibration file (docs/scale.md). [default: built in, from the replay]
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,

    /// Threads walking the workers' local tiers (the AZ stage has one more).
    /// [default: the CPUs]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Refuse a run whose estimated memory is above this.
    #[arg(long, default_value = "8GiB", value_parser = lode_agent::config::parse_size, value_name = "SIZE")]
    pub max_memory: u64,
}

/// `90s`, `10m`, `1h`, `250ms`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a time such as 90s, 10m or 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!("{s:?} is not a positive time"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `NAME:SIZE[:POLICY]`.
pub fn parse_tier(s: &str) -> Result<TierSpec, String> {
    let mut parts = s.split(':');
    let name = parts.next().unwrap_or_default();
    if name.is_empty() || name == "az" || name == "origin" {
        return Err(format!(
            "{s:?}: a tier needs a name other than az and origin"
        ));
    }
    let size = parts
        .next()
        .ok_or_else(|| format!("{s:?}: expected NAME:SIZE[:POLICY]"))?;
    let capacity = lode_agent::config::parse_size(size)?;
    let policy = match parts.next() {
        // The agent's default, so a tier given as the agent's caches are is simulated as
        // the agent runs it.
        None => PolicyKind::default(),
        Some(p) => p.parse().map_err(|e| format!("{s:?}: {e}"))?,
    };
    if parts.next().is_some() {
        return Err(format!("{s:?}: expected NAME:SIZE[:POLICY]"));
    }
    Ok(TierSpec {
        name: name.to_owned(),
        capacity,
        policy,
    })
}

fn default_tiers() -> Vec<TierSpec> {
    vec![
        TierSpec {
            name: "memory".into(),
            capacity: 32 << 20,
            policy: PolicyKind::default(),
        },
        TierSpec {
            name: "disk".into(),
            capacity: 96 << 20,
            policy: PolicyKind::default(),
        },
    ]
}

/// `lode advise`: a workload (as `lode sim` takes it) and prices.
#[derive(Debug, Args)]
pub struct AdviseArgs {
    #[command(flatten)]
    pub sim: SimArgs,

    /// Price of memory (worker memory, AZ nodes), per GiB-hour.
    #[arg(long, value_name = "PRICE", allow_negative_numbers = true)]
    pub memory_price: f64,

    /// Price of flash (worker disk), per GiB-hour.
    #[arg(long, value_name = "PRICE", allow_negative_numbers = true)]
    pub flash_price: f64,

    /// Price of origin requests, per 1000.
    #[arg(long, value_name = "PRICE", allow_negative_numbers = true)]
    pub origin_request_price: f64,

    /// Price of origin transfer, per GiB.
    #[arg(long, value_name = "PRICE", allow_negative_numbers = true)]
    pub origin_gib_price: f64,

    /// A start latency goal: p50=, p90= or p99= a time (200ms, 1s).
    #[arg(long, value_parser = Goal::parse, value_name = "pN=TIME")]
    pub latency_goal: Option<Goal>,
}

fn calibration(a: &SimArgs, quiet: bool) -> Result<Calibration> {
    Ok(match &a.calibration {
        Some(p) => Calibration::load(p)?,
        None => {
            if !quiet {
                eprintln!(
                    "lode sim: no --calibration: using the built-in calibration (the replay's measured latencies, docs/scale.md)"
                );
            }
            Calibration::built_in()
        }
    })
}

fn workload(a: &SimArgs, cal: &Calibration) -> Result<Workload, lode_sim::WorkloadError> {
    if a.trace.is_empty() {
        Workload::synthetic(
            SyntheticSpec {
                functions: a.functions,
                zipf: a.zipf,
                seed: a.seed,
                rate: a.rate,
                duration_s: a.duration.as_secs_f64(),
                workers: a.workers,
                placement: match a.placement {
                    PlacementArg::Random => Placement::Random,
                    PlacementArg::Sticky => Placement::Sticky(a.sticky_workers),
                },
                burst_every_s: a.burst_every.map(|d| d.as_secs_f64()),
                burst_images: a.burst_images,
            },
            cal,
        )
    } else {
        Workload::traces(&a.trace, a.speed, cal)
    }
}

/// Refuses traces that could not be held under --max-memory: a parsed trace takes about
/// as much memory as its text.
fn check_trace_sizes(a: &SimArgs) -> Result<()> {
    let mut total = 0u64;
    for p in &a.trace {
        total += std::fs::metadata(p)
            .with_context(|| p.display().to_string())?
            .len();
    }
    if total > a.max_memory {
        bail!(
            "the traces hold {} of records, over --max-memory {}",
            human_bytes(total),
            human_bytes(a.max_memory)
        );
    }
    Ok(())
}

fn config(a: &SimArgs) -> Result<Config> {
    let mut tiers = if a.tiers.is_empty() {
        default_tiers()
    } else {
        a.tiers.clone()
    };
    for (i, t) in tiers.iter().enumerate() {
        if tiers[..i].iter().any(|o| o.name == t.name) {
            bail!("--tier {}: two tiers of one name", t.name);
        }
    }
    tiers.shrink_to_fit();
    Ok(Config {
        tiers,
        nodes: a.nodes,
        node_capacity: a.node_memory,
        node_policy: a.node_policy.unwrap_or_else(default_node_policy),
        placement: a.az_placement,
        epsilon: a.epsilon,
        k: a.k,
        m: a.m,
        read_repair: !a.no_read_repair,
        threads: a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        seed: a.seed,
    })
}

pub fn run(json_out: bool, quiet: bool, a: SimArgs) -> Result<()> {
    let cal = calibration(&a, quiet)?;
    check_trace_sizes(&a)?;
    let mut workload = workload(&a, &cal)?;
    let config = config(&a)?;
    let estimate = lode_sim::estimate_memory(&config, &workload);
    let started = Instant::now();
    let mut progress = |p: lode_sim::Progress| {
        if !quiet {
            eprintln!(
                "lode sim: {:.0} of {:.0} simulated s, {} starts, {:.0} s wall",
                p.simulated_s,
                p.duration_s,
                p.starts,
                started.elapsed().as_secs_f64()
            );
        }
    };
    let report = lode_sim::run(
        &config,
        &cal,
        &mut workload,
        a.max_memory,
        Duration::from_secs(5),
        &mut progress,
    )
    .context("lode sim")?;
    let wall = started.elapsed().as_secs_f64();
    let rss = lode_sim::peak_rss_bytes();
    if json_out {
        let mut v = serde_json::to_value(&report)?;
        v["wall_s"] = json!(wall);
        v["peak_rss_bytes"] = json!(rss);
        v["estimated_memory_bytes"] = json!(estimate);
        v["calibration"] = json!(cal.source);
        v["config"] = json!({
            "tiers": config.tiers.iter().map(|t| json!({"name": t.name, "capacity": t.capacity, "policy": t.policy.name()})).collect::<Vec<_>>(),
            "nodes": config.nodes, "node_capacity": config.node_capacity,
            "node_policy": config.node_policy.name(), "placement": config.placement.to_string(), "epsilon": config.epsilon, "k": config.k, "m": config.m,
            "threads": config.threads,
        });
        print_json(&v)?;
    } else {
        print_text(&report, &config, wall, rss, estimate);
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn print_text(r: &Report, c: &Config, wall: f64, rss: Option<u64>, estimate: u64) {
    println!(
        "{} starts, {} chunk reads on {} workers over {:.0} simulated s",
        r.starts, r.reads, r.workers, r.simulated_s
    );
    println!("reads served by:");
    for t in &r.tiers {
        println!(
            "  {:<10} {:>8}  {:>12} reads  {:>10}",
            t.name,
            pct(t.share),
            t.reads,
            human_bytes(t.bytes)
        );
    }
    if let Some(rec) = &r.recorded {
        let total = (rec.memory + rec.disk + rec.az + rec.origin + rec.joined).max(1) as f64;
        println!("recorded by the trace:");
        for (name, n) in [
            ("memory", rec.memory),
            ("disk", rec.disk),
            ("az", rec.az),
            ("origin", rec.origin),
            ("joined", rec.joined),
        ] {
            println!(
                "  {:<10} {:>8}  {:>12} reads",
                name,
                pct(n as f64 / total),
                n
            );
        }
    }
    let o = &r.origin;
    println!(
        "origin: {} requests ({:.1}/s mean, {}/s peak), {} ({}/s mean, {}/s peak)",
        o.requests,
        o.requests_per_s_mean,
        o.requests_per_s_peak,
        human_bytes(o.bytes),
        human_bytes(lode_sim_u64(o.bytes_per_s_mean)),
        human_bytes(o.bytes_per_s_peak)
    );
    let l = &r.start_latency;
    println!(
        "start latency: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms (mean {:.1} ms)",
        l.p50_ms, l.p90_ms, l.p99_ms, l.mean_ms
    );
    let az = &r.az;
    println!(
        "AZ fleet: {} nodes ({} each, {}, {} placement, k={} m={}): stripe requests per node mean {:.0}, max {}, imbalance {:.3}; {} stripe writes; holds {} (fullest node {})",
        az.nodes,
        human_bytes(c.node_capacity),
        c.node_policy,
        c.placement,
        c.k,
        c.m,
        az.requests_mean,
        az.requests_max,
        az.imbalance,
        az.stripe_writes,
        human_bytes(az.bytes_held),
        human_bytes(az.bytes_held_max)
    );
    println!(
        "wall time {:.1} s, peak RSS {} (estimated before the run: {})",
        wall,
        rss.map_or_else(|| "unknown".to_owned(), human_bytes),
        human_bytes(estimate)
    );
}

/// A non-negative mean as whole bytes.
fn lode_sim_u64(x: f64) -> u64 {
    format!("{x:.0}").parse().unwrap_or(0)
}

pub fn advise(json_out: bool, quiet: bool, a: AdviseArgs) -> Result<()> {
    let prices = Prices {
        memory_gib_hour: a.memory_price,
        flash_gib_hour: a.flash_price,
        origin_per_1000_requests: a.origin_request_price,
        origin_per_gib: a.origin_gib_price,
    };
    prices.check()?;
    let cal = calibration(&a.sim, quiet)?;
    check_trace_sizes(&a.sim)?;
    let config = config(&a.sim)?;
    let make = || workload(&a.sim, &cal);
    let advice = lode_sim::advise::advise(
        &config,
        &cal,
        &make,
        &prices,
        a.latency_goal,
        a.sim.max_memory,
    )
    .context("lode advise")?;
    if json_out {
        return print_json(
            &json!({ "tiers": advice, "goal": a.latency_goal.map(|g| format!("p{}={}ms", g.percentile, g.ms)) }),
        );
    }
    for t in &advice {
        let goal = match (t.goal_bytes, t.goal_unreachable) {
            (Some(b), _) => human_bytes(b),
            (None, true) => "not reachable".to_owned(),
            (None, false) => "no goal".to_owned(),
        };
        println!(
            "{} ({}): five-minute rule {} (break-even {:.0} s), latency goal {}, advised {}",
            t.tier,
            t.scope,
            human_bytes(t.rule_bytes),
            t.break_even_s,
            goal,
            human_bytes(t.bytes)
        );
        let shares: Vec<String> = t
            .shares
            .iter()
            .map(|(n, s)| format!("{n} {}", pct(*s)))
            .collect();
        println!(
            "  at that size: {}; start p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms; {:.4} per hour",
            shares.join(", "),
            t.latency_ms[0],
            t.latency_ms[1],
            t.latency_ms[2],
            t.cost_per_hour
        );
    }
    Ok(())
}
