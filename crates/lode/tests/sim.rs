//! `lode sim` end to end: the binary on a small synthetic workload, on hand-made traces
//! whose hit rates can be worked out by hand, and on every kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn lode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lode"))
        .args(args)
        .output()
        .expect("running lode")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "lode failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn reads(v: &Value, tier: &str) -> u64 {
    v["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == tier)
        .unwrap_or_else(|| panic!("no tier {tier} in {v}"))["reads"]
        .as_u64()
        .unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn chunk(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

#[test]
fn a_small_synthetic_run_gives_sane_hit_rates() {
    let out = lode(&[
        "sim",
        "--json",
        "--workers",
        "20",
        "--rate",
        "50",
        "--duration",
        "60s",
        "--seed",
        "3",
    ]);
    let v = json_of(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("using the built-in calibration"),
        "{stderr}"
    );
    let shares: f64 = v["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["share"].as_f64().unwrap())
        .sum();
    assert!((shares - 1.0).abs() < 1e-9, "{v}");
    let starts = v["starts"].as_u64().unwrap();
    // A Poisson process of 50/s over 60 s.
    assert!((2700..3300).contains(&starts), "{starts}");
    assert!(reads(&v, "memory") > 0 && reads(&v, "az") > 0 && reads(&v, "origin") > 0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    let l = &v["start_latency"];
    assert!(l["p50_ms"].as_f64().unwrap() <= l["p99_ms"].as_f64().unwrap());

    // The same seed gives the same report (wall time and memory aside).
    let again = json_of(&lode(&[
        "sim",
        "--json",
        "-q",
        "--workers",
        "20",
        "--rate",
        "50",
        "--duration",
        "60s",
        "--seed",
        "3",
    ]));
    assert_eq!(v["tiers"], again["tiers"]);
    assert_eq!(v["start_latency"], again["start_latency"]);

    // Text output names every tier.
    let text = lode(&[
        "sim",
        "-q",
        "--workers",
        "5",
        "--rate",
        "5",
        "--duration",
        "20s",
    ]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    for word in [
        "memory",
        "disk",
        "az",
        "origin",
        "start latency: p50",
        "peak RSS",
    ] {
        assert!(text.contains(word), "{word} missing from {text}");
    }
}

#[test]
fn hand_made_traces_give_the_hit_rates_worked_out_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (chunk('a'), chunk('b'), chunk('c'));
    // Worker w1: start 1 reads a and b (both new: the origin, which also fills the AZ
    // fleet and w1's tiers); start 2 reads a and b again (w1's memory) and c (the origin).
    let w1 = write(
        dir.path(),
        "w1.trace",
        &format!(
            "lode-trace 1 worker w1\nimage py 1000000\n\
             100 start 1 py\n110 read 1 {a} 1000 origin 9000\n120 read 1 {b} 2000 joined 8000\n130 end 1\n\
             200 start 2 py\n210 read 2 {a} 1000 decrypted 5\n220 read 2 {b} 2000 memory 7\n230 read 2 {c} 500 disk 90\n240 end 2\n\
             end 9\n"
        ),
    );
    // Worker w2, later: a is not in its own tiers but its stripes are in the AZ fleet.
    let w2 = write(
        dir.path(),
        "w2.trace",
        &format!(
            "lode-trace 1 worker w2\nimage py 1000000\n300 start 7 py\n310 read 7 {a} 1000 az 700\n320 end 7\nend 3\n"
        ),
    );
    let v = json_of(&lode(&[
        "sim",
        "--json",
        "-q",
        "--trace",
        w1.to_str().unwrap(),
        "--trace",
        w2.to_str().unwrap(),
    ]));
    assert_eq!(v["starts"], 3);
    assert_eq!(v["reads"], 6);
    assert_eq!(reads(&v, "memory"), 2);
    assert_eq!(reads(&v, "disk"), 0);
    assert_eq!(reads(&v, "az"), 1);
    assert_eq!(reads(&v, "origin"), 3);
    assert_eq!(v["origin"]["bytes"], 3500);
    let rec = &v["recorded"];
    assert_eq!(
        (
            &rec["memory"],
            &rec["disk"],
            &rec["az"],
            &rec["origin"],
            &rec["joined"]
        ),
        (&2.into(), &1.into(), &1.into(), &1.into(), &1.into())
    );

    // Without AZ nodes the fourth fetch goes to the origin too.
    let v = json_of(&lode(&[
        "sim",
        "--json",
        "-q",
        "--nodes",
        "0",
        "--trace",
        w1.to_str().unwrap(),
        "--trace",
        w2.to_str().unwrap(),
    ]));
    assert_eq!((reads(&v, "az"), reads(&v, "origin")), (0, 4));
}

#[test]
fn bad_input_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let a = chunk('a');
    let head = "lode-trace 1 worker w\nimage py 10\n";
    let cases = [
        (
            "version.trace",
            "lode-trace 2 worker w\nend 0\n".to_owned(),
            ":1: lode-trace version 2",
        ),
        (
            "order.trace",
            format!("{head}5 start 1 py\n4 end 1\nend 2\n"),
            ":4: out of order",
        ),
        (
            "unknown.trace",
            format!("{head}5 start 1 go\nend 1\n"),
            ":3: unknown image \"go\"",
        ),
        (
            "truncated.trace",
            format!("{head}5 start 1 py\n6 read 1 {a} 9 az 1\n"),
            ":4: truncated",
        ),
        (
            "twice.trace",
            format!("{head}5 start 1 py\n6 read 1 {a} 9 az 1\n7 read 1 {a} 9 az 1\nend 3\n"),
            ":5: start 1 reads chunk",
        ),
        (
            "count.trace",
            format!("{head}5 start 1 py\nend 2\n"),
            ":4: end says 2 records",
        ),
    ];
    for (name, text, want) in cases {
        let p = write(dir.path(), name, &text);
        let out = lode(&["sim", "-q", "--trace", p.to_str().unwrap()]);
        assert!(!out.status.success(), "{name} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        let at = format!("{}{want}", p.display());
        assert!(err.contains(&at), "{name}: want {at:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    let good = include_str!("../../lode-sim/tests/data/calibration.json");
    let cal_cases = [
        (
            "v2.json",
            good.replace("\"version\": 1", "\"version\": 2"),
            ":3: calibration version 2",
        ),
        (
            "neg.json",
            good.replace("\"az\": 1250000000", "\"az\": -1"),
            "bandwidth_bytes_per_s.az: -1 is not a positive number",
        ),
        (
            "missing.json",
            good.replace("\"lanes\": 16,", ""),
            "missing field `lanes`",
        ),
        (
            "nan.json",
            good.replace("\"lanes\": 16,", "\"lanes\": NaN,"),
            ":13:",
        ),
    ];
    for (name, text, want) in cal_cases {
        assert_ne!(text, good, "{name}: the replacement did not apply");
        let p = write(dir.path(), name, &text);
        let out = lode(&[
            "sim",
            "-q",
            "--duration",
            "2s",
            "--calibration",
            p.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{name} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&p.display().to_string()), "{name}: {err}");
        assert!(err.contains(want), "{name}: want {want:?} in {err}");
    }
    // The negative bandwidth is reported on its own line.
    let neg = write(
        dir.path(),
        "neg2.json",
        &good.replace("\"az\": 1250000000", "\"az\": -1"),
    );
    let line = good
        .lines()
        .position(|l| l.contains("\"az\": 1250000000"))
        .unwrap()
        + 1;
    let out = lode(&["sim", "-q", "--calibration", neg.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{}:{line}:", neg.display())));

    let out = lode(&[
        "sim",
        "-q",
        "--workers",
        "10000000",
        "--tier",
        "m:100GiB",
        "--duration",
        "1s",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-memory"));
}

#[test]
fn advise_prints_a_size_per_tier_and_refuses_bad_prices() {
    let prices = [
        "--memory-price",
        "0.005",
        "--flash-price",
        "0.0002",
        "--origin-request-price",
        "0.0004",
        "--origin-gib-price",
        "0.02",
    ];
    let mut args = vec![
        "advise",
        "--json",
        "-q",
        "--workers",
        "4",
        "--rate",
        "10",
        "--duration",
        "60s",
    ];
    args.extend(prices);
    let v = json_of(&lode(&args));
    let tiers = v["tiers"].as_array().unwrap();
    let names: Vec<&str> = tiers.iter().map(|t| t["tier"].as_str().unwrap()).collect();
    assert_eq!(names, ["memory", "disk", "az"]);
    for t in tiers {
        assert!(t["break_even_s"].as_f64().unwrap() > 0.0, "{t}");
        assert_eq!(t["bytes"], t["rule_bytes"], "{t}");
        assert!(t["cost_per_hour"].as_f64().unwrap() > 0.0, "{t}");
    }

    for (i, flag) in prices.iter().enumerate().step_by(2) {
        for bad in ["0", "-3"] {
            let mut args = vec!["advise", "-q", "--duration", "10s"];
            let mut p = prices.to_vec();
            p[i + 1] = bad;
            args.extend(p.iter().map(|s| s.to_owned()));
            let out = lode(&args);
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("{flag} {bad}: a price must be a positive number")),
                "{err}"
            );
        }
    }
}
