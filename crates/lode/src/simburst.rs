//! `lode sim-burst`: a fleet's snapshot burst capacity, predicted by lode-sim's burst
//! model from lode-snap's burst bench. The model lives in lode-sim (`burst`);
//! docs/scale.md ("Snapshot bursts") describes it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lode_sim::burst::{self, Goal, Limit, Mode, Model};
use serde_json::json;

use crate::output::{human_bytes, print_json};

#[derive(Debug, Args)]
pub struct SimBurstArgs {
    /// The burst bench's output (`cargo bench -p lode-snap --bench burst`): its JSON
    /// lines with "bench":"burst" are the measured rows; other lines are ignored.
    #[arg(long, value_name = "FILE")]
    pub measured: PathBuf,

    /// Workers in the fleet, each running one snapshot handler.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), value_name = "W")]
    pub workers: u64,

    /// Clones wanted at once across the fleet: N, a list A,B,C, or a range A..B (about
    /// ten steps) or A..B/STEP. [default: the fleet's capacity]
    #[arg(long, value_parser = parse_sessions, value_name = "N")]
    pub sessions: Option<Sessions>,

    /// The first-answer goal per clone: p50= or p99= a time (ms, s or us).
    #[arg(long, default_value = "p99=300ms", value_name = "pXX=TIME")]
    pub goal: Goal,

    /// The rows to model: cold (chunks from the origin) or warm (from the local disk).
    /// [default: every mode in the file]
    #[arg(long, value_name = "MODE")]
    pub mode: Option<Mode>,

    /// The most memory a worker's handler may use (peak RSS), e.g. 2GiB.
    #[arg(long, value_parser = lode_agent::config::parse_size, value_name = "SIZE")]
    pub max_handler_memory: Option<u64>,
}

/// `--sessions`' counts (a newtype, so clap takes the list as one value).
#[derive(Debug, Clone)]
pub struct Sessions(Vec<u64>);

fn parse_sessions(s: &str) -> Result<Sessions, String> {
    burst::parse_sessions(s).map(Sessions)
}

pub fn run(json_out: bool, a: &SimBurstArgs) -> Result<()> {
    let file = a.measured.display().to_string();
    let rows = burst::load(&a.measured)?;
    let modes: Vec<Mode> = match a.mode {
        Some(m) => vec![m],
        None => {
            let mut m: Vec<Mode> = rows.iter().map(|r| r.mode).collect();
            m.sort_unstable();
            m.dedup();
            m
        }
    };
    let mut out = Vec::new();
    for mode in modes {
        let model = Model::fit(&rows, mode, &file)?;
        let cap = model.capacity(a.goal, a.max_handler_memory)?;
        let fleet = a.workers.saturating_mul(u64::from(cap.clones_per_worker));
        let sessions = a
            .sessions
            .as_ref()
            .map_or_else(|| vec![fleet], |s| s.0.clone());
        let spreads: Vec<_> = sessions
            .iter()
            .map(|&n| model.spread(&cap, a.workers, n))
            .collect();
        out.push((model, cap, fleet, spreads));
    }

    if json_out {
        let modes: Vec<_> = out
            .iter()
            .map(|(m, cap, fleet, spreads)| {
                json!({
                    "mode": m.mode,
                    "measured_clones": m.measured,
                    "raised": m.raised.iter().map(|(n, f)| json!({"clones": n, "field": f})).collect::<Vec<_>>(),
                    "snapshot_bytes": m.snapshot_bytes,
                    "chunk_bytes": m.chunk_bytes,
                    "nonzero_chunks": m.nonzero_chunks,
                    "handler_rss_mib_per_clone": m.rss_mib_per_clone(),
                    "capacity": cap,
                    "fleet_capacity": fleet,
                    "bursts": spreads,
                })
            })
            .collect();
        return print_json(&json!({
            "measured": file,
            "workers": a.workers,
            "goal": a.goal,
            "max_handler_memory_bytes": a.max_handler_memory,
            "modes": modes,
        }));
    }

    let goal_name = format!("p{} first answer ≤ {} ms", a.goal.percentile, a.goal.ms);
    println!(
        "Snapshot bursts on {} workers (one handler each), goal {goal_name}{}; measured in {file}",
        a.workers,
        a.max_handler_memory
            .map(|b| format!(", handler memory ≤ {}", human_bytes(b)))
            .unwrap_or_default()
    );
    for (m, cap, fleet, spreads) in &out {
        let counts: Vec<String> = m.measured.iter().map(u32::to_string).collect();
        println!();
        println!(
            "{}: {} snapshot, {} of its {} KiB chunks non-zero; measured at {} clones per handler",
            m.mode,
            human_bytes(m.snapshot_bytes),
            m.nonzero_chunks,
            m.chunk_bytes >> 10,
            counts.join(", ")
        );
        for (n, field) in &m.raised {
            println!(
                "  note: {field} at {n} clones is below a smaller burst's; the model keeps the larger"
            );
        }
        let by = match cap.limited_by {
            Limit::Goal => "the goal".to_string(),
            Limit::Memory => "handler memory".to_string(),
            Limit::SearchCap => format!(
                "nothing up to {} (the measured figures barely grow)",
                burst::MAX_CLONES_PER_WORKER
            ),
        };
        let p = &cap.at;
        println!(
            "  per worker: {} clones, bound by {by}{} (first answer p50 {:.1} ms, p99 {:.1} ms)",
            cap.clones_per_worker,
            if cap.extrapolated {
                ", extrapolated beyond the largest measured burst"
            } else {
                ""
            },
            p.first_answer_ms_p50,
            p.first_answer_ms_p99,
        );
        println!(
            "  handler memory: {:.1} MiB at {} clones ({:+.3} MiB a clone beyond the largest measured)",
            p.handler_rss_mib,
            cap.clones_per_worker,
            m.rss_mib_per_clone()
        );
        println!("  fleet burst capacity: {fleet} clones at once");
        println!();
        println!(
            "  | sessions | workers | clones/worker | first answer p50 / p99 ms | all answers p99 ms | burst ms | origin requests | origin bytes (at most) | within goal |"
        );
        println!("  |---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for s in spreads {
            println!(
                "  | {} | {} | {} | {:.1} / {:.1} | {:.1} | {:.0} | {:.0} | {} ({}) | {} |",
                s.sessions,
                s.workers,
                s.at.clones,
                s.at.first_answer_ms_p50,
                s.at.first_answer_ms_p99,
                s.at.all_answers_ms_p99,
                s.at.burst_ms,
                s.origin_requests,
                human_bytes(lode_sim_u64(s.origin_bytes)),
                human_bytes(lode_sim_u64(s.origin_bytes_max)),
                if s.fits {
                    "yes"
                } else {
                    "no: more than the fleet"
                },
            );
        }
    }
    Ok(())
}

/// A non-negative byte count computed in f64, as a whole number for printing.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn lode_sim_u64(x: f64) -> u64 {
    x.round() as u64
}
