//! Pauses at named points, for tests that stop the service at an exact step. Off unless
//! `LODE_FAILPOINT` names the point (a comma-separated list) and `LODE_FAILPOINT_GATE`
//! names a directory: the process then writes `<point>.<pid>` into the directory and waits
//! until a file `go` appears there (at most two minutes, so a forgotten gate cannot hang a
//! process for ever). The same mechanism as the image crate's, so one test harness drives
//! both.

use std::time::{Duration, Instant};

/// Waits at `point` if the environment asks for it.
pub(crate) async fn pause(point: &str) {
    let Ok(points) = std::env::var("LODE_FAILPOINT") else {
        return;
    };
    if !points.split(',').any(|p| p == point) {
        return;
    }
    let Some(gate) = std::env::var_os("LODE_FAILPOINT_GATE") else {
        return;
    };
    let gate = std::path::PathBuf::from(gate);
    let mark = gate.join(format!(
        "{}.{}",
        point.replace(':', "-"),
        std::process::id()
    ));
    // A gate that cannot be written is the test's fault; the pause still holds.
    let _ = std::fs::write(&mark, b"");
    let started = Instant::now();
    while !gate.join("go").exists() && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
