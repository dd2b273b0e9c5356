//! A discrete-event simulator of a lode fleet: thousands of workers, each with its local
//! tiers (memory, disk), sharing an AZ cache fleet (erasure-coded stripes over nodes) and
//! an origin, driven by a synthetic Zipf workload or by recorded traces (lode-trace v1).
//!
//! It predicts what docs/architecture.md's read path would do at a scale no test bench
//! reaches: where chunk reads are served, the origin's load, the AZ nodes' balance, start
//! latency percentiles (from a calibration file of measured latencies). docs/scale.md
//! gives the model, its limits, the calibration and trace formats.

pub mod advise;
pub mod burst;
pub mod calibration;
pub mod engine;
mod hist;
mod rng;
pub mod trace;
pub mod workload;

pub use calibration::{Calibration, CalibrationError};
pub use engine::{
    Config, Progress, Report, SimError, TierSpec, estimate_memory, peak_rss_bytes, run,
};
pub use workload::{Placement, SyntheticSpec, Workload, WorkloadError};

/// `x` as a u64: saturating, NaN as 0. The simulator turns its f64 times and sizes to
/// integers through this one function.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn f2u(x: f64) -> u64 {
    x as u64
}
