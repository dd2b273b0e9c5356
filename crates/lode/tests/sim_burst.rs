//! `lode sim-burst` end to end: the binary on a hand-made measured file, its figures
//! checked against the model worked by hand, and its errors on bad input.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

/// A row as lode-snap's burst bench prints it (with a few fields the model ignores).
#[allow(clippy::too_many_arguments)]
fn row(
    mode: &str,
    clones: u32,
    p50: f64,
    p99: f64,
    all99: f64,
    burst: f64,
    origin: u32,
    rss: f64,
) -> String {
    json!({
        "bench": "burst", "mode": mode, "clones": clones,
        "first_answer_ms_p50": p50, "first_answer_ms_p99": p99,
        "all_answers_ms_p50": all99 - 10.0, "all_answers_ms_p99": all99,
        "burst_ms": burst, "origin_fetches": origin, "origin_distinct_chunks": origin,
        "handler_rss_before_mib": 90.0, "handler_rss_peak_mib": rss,
        "snapshot_bytes": 64u64 << 20, "chunk_bytes": 512u64 << 10, "segment_bytes": 16384,
        "snapshot_chunks": 128, "nonzero_chunks": 100, "queries": 300,
        "tier_hits": {"origin": origin}, "tier_hit_us_mean": {"origin": null},
    })
    .to_string()
}

/// Cold: first-answer p99 30 ms at 1 clone, 130 at 11 (10 ms a clone); the handler
/// fetches 80 chunks at 1 clone, 90 at 11 (1 a clone, at most the 100 non-zero); its
/// memory 200 MiB + 1 MiB a clone. Warm: p99 10 ms + 5 ms a clone; 150 MiB + 1 MiB a
/// clone; no origin.
fn measured(dir: &Path) -> std::path::PathBuf {
    let text = [
        "setup: 64 MiB index".to_string(),
        "| mode | clones |".to_string(),
        row("cold", 1, 20.0, 30.0, 50.0, 60.0, 80, 200.0),
        row("cold", 11, 70.0, 130.0, 150.0, 160.0, 90, 210.0),
        row("warm", 1, 5.0, 10.0, 30.0, 40.0, 0, 150.0),
        row("warm", 11, 25.0, 60.0, 80.0, 90.0, 0, 160.0),
    ]
    .join("\n");
    let path = dir.join("burst.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

fn lode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lode"))
        .args(args)
        .env("LODE_HOME", "/nonexistent/lode-home")
        .output()
        .expect("run lode")
}

fn json_of(args: &[&str]) -> Value {
    let out = lode(args);
    assert!(
        out.status.success(),
        "lode {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn error_of(args: &[&str]) -> String {
    let out = lode(args);
    assert!(!out.status.success(), "lode {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn figures_match_the_model_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let file = measured(dir.path());
    let f = file.to_str().unwrap();
    let v = json_of(&[
        "sim-burst",
        "--measured",
        f,
        "--workers",
        "100",
        "--goal",
        "p99=300ms",
        "--sessions",
        "1000,5000",
        "--json",
    ]);
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);

    // Cold: 30 + 10 (n - 1) <= 300 → 28 clones a worker, 2800 for the fleet.
    let cold = &modes[0];
    assert_eq!(cold["mode"], "cold");
    assert_eq!(cold["capacity"]["clones_per_worker"], 28);
    assert_eq!(cold["capacity"]["limited_by"], "goal");
    assert_eq!(cold["capacity"]["extrapolated"], true);
    assert_eq!(cold["capacity"]["at"]["first_answer_ms_p99"], 300.0);
    assert_eq!(cold["capacity"]["at"]["first_answer_ms_p50"], 155.0); // 20 + 5 × 27
    assert_eq!(cold["capacity"]["at"]["handler_rss_mib"], 227.0);
    assert_eq!(cold["fleet_capacity"], 2800);
    assert_eq!(cold["handler_rss_mib_per_clone"], 1.0);
    // 1000 sessions: ceil(1000 / 28) = 36 workers, ceil(1000 / 36) = 28 on the busiest;
    // each fetches min(80 + 27, 100) = 100 chunks of 512 KiB.
    let b = &cold["bursts"][0];
    assert_eq!(b["sessions"], 1000);
    assert_eq!(b["workers"], 36);
    assert_eq!(b["fits"], true);
    assert_eq!(b["at"]["clones"], 28);
    assert_eq!(b["at"]["burst_ms"], 330.0); // 60 + 10 × 27
    assert_eq!(b["origin_requests"], 3600.0);
    assert_eq!(b["origin_bytes"], 3600.0 * 524_288.0);
    // 5000 sessions need 179 workers: on all 100, 50 each, over the goal.
    let b = &cold["bursts"][1];
    assert_eq!(
        (b["workers"].as_u64(), b["fits"].as_bool()),
        (Some(100), Some(false))
    );
    assert_eq!(b["at"]["clones"], 50);
    assert_eq!(b["at"]["first_answer_ms_p99"], 520.0);

    // Warm: 10 + 5 (n - 1) <= 300 → 59; never the origin.
    let warm = &modes[1];
    assert_eq!(warm["capacity"]["clones_per_worker"], 59);
    assert_eq!(warm["fleet_capacity"], 5900);
    let b = &warm["bursts"][1];
    assert_eq!(
        (b["workers"].as_u64(), b["at"]["clones"].as_u64()),
        (Some(85), Some(59))
    );
    assert_eq!(b["origin_requests"], 0.0);
    assert_eq!(b["origin_bytes_max"], 0.0);

    // Handler memory of 180 MiB: 150 + (n - 1) <= 180 → 31 warm clones a worker.
    let v = json_of(&[
        "sim-burst",
        "--measured",
        f,
        "--workers",
        "10",
        "--mode",
        "warm",
        "--max-handler-memory",
        "180MiB",
        "--json",
    ]);
    let warm = &v["modes"][0];
    assert_eq!(v["modes"].as_array().unwrap().len(), 1);
    assert_eq!(warm["capacity"]["clones_per_worker"], 31);
    assert_eq!(warm["capacity"]["limited_by"], "memory");
    // Without --sessions: one burst at the fleet's capacity.
    assert_eq!(warm["bursts"][0]["sessions"], 310);
    assert_eq!(warm["bursts"][0]["workers"], 10);

    // At each measured count the model gives back the measured row (p50 goal of 20 ms:
    // exactly the cold row at 1 clone).
    let v = json_of(&[
        "sim-burst",
        "--measured",
        f,
        "--workers",
        "1",
        "--mode",
        "cold",
        "--goal",
        "p50=70ms",
        "--sessions",
        "1,11",
        "--json",
    ]);
    let cold = &v["modes"][0];
    assert_eq!(cold["capacity"]["clones_per_worker"], 11);
    let at11 = &cold["bursts"][1]["at"];
    assert_eq!(at11["first_answer_ms_p99"], 130.0);
    assert_eq!(at11["all_answers_ms_p99"], 150.0);
    assert_eq!(at11["burst_ms"], 160.0);
    assert_eq!(at11["origin_chunks"], 90.0);
    assert_eq!(cold["bursts"][0]["at"]["first_answer_ms_p50"], 20.0);

    // The table names the figures.
    let out = lode(&[
        "sim-burst",
        "--measured",
        f,
        "--workers",
        "100",
        "--mode",
        "cold",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("per worker: 28 clones, bound by the goal"),
        "{text}"
    );
    assert!(
        text.contains("fleet burst capacity: 2800 clones at once"),
        "{text}"
    );
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = measured(dir.path());
    let g = good.to_str().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };

    let empty = write("empty.jsonl", "| mode | clones |\n");
    let e = error_of(&["sim-burst", "--measured", &empty, "--workers", "4"]);
    assert!(e.contains(&format!("{empty}: no burst rows")), "{e}");

    let broken = write(
        "broken.jsonl",
        &format!(
            "{}\n{{\"bench\":\"burst\",",
            row("cold", 1, 10.0, 20.0, 30.0, 40.0, 5, 60.0)
        ),
    );
    let e = error_of(&["sim-burst", "--measured", &broken, "--workers", "4"]);
    assert!(e.contains(&format!("{broken}:2: not a JSON object")), "{e}");

    let missing = write(
        "missing.jsonl",
        &row("cold", 1, 10.0, 20.0, 30.0, 40.0, 5, 60.0).replace("handler_rss_peak_mib", "rss"),
    );
    let e = error_of(&["sim-burst", "--measured", &missing, "--workers", "4"]);
    assert!(
        e.contains(&format!(
            "{missing}:1: field \"handler_rss_peak_mib\": missing"
        )),
        "{e}"
    );

    let e = error_of(&["sim-burst", "--measured", g, "--workers", "0"]);
    assert!(e.contains("--workers"), "{e}");

    let e = error_of(&[
        "sim-burst",
        "--measured",
        g,
        "--workers",
        "4",
        "--goal",
        "p99=25ms",
    ]);
    assert!(
        e.contains(
            "cold: the goal p99=25ms is not met even by one clone per worker (predicted 30.0 ms)"
        ),
        "{e}"
    );

    let e = error_of(&[
        "sim-burst",
        "--measured",
        g,
        "--workers",
        "4",
        "--goal",
        "p90=1s",
    ]);
    assert!(e.contains("--goal"), "{e}");

    let e = error_of(&[
        "sim-burst",
        "--measured",
        g,
        "--workers",
        "4",
        "--sessions",
        "0",
    ]);
    assert!(e.contains("--sessions"), "{e}");

    let e = error_of(&[
        "sim-burst",
        "--measured",
        g,
        "--workers",
        "4",
        "--max-handler-memory",
        "100MiB",
    ]);
    assert!(e.contains("--max-handler-memory 100.0 MiB is below"), "{e}");

    let e = error_of(&[
        "sim-burst",
        "--measured",
        "/nonexistent/b.jsonl",
        "--workers",
        "4",
    ]);
    assert!(e.contains("reading /nonexistent/b.jsonl"), "{e}");
}
