//! Where the time of a `lode mount` or `lode run` goes, step by step: what `lode run
//! --timings` prints and `--json` reports, so the fixed cost of a start can be compared
//! with a chroot of an unpacked tree (docs/run.md, "The cost of a start").

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// One step of a run, in the order a run takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// The control request that attaches the image (one round trip to the agent).
    Attach,
    /// Opening the attachment's FUSE file (the agent's lookup and open).
    File,
    /// Configuring a free loop device over the file.
    Loop,
    /// mount(2) of the image's ext4.
    Mount,
    /// Opening the image's root and reading the user from its /etc/passwd and /etc/group.
    User,
    /// The runtime: mounts it makes, the command from its start to its exit, and the
    /// runtime's own teardown.
    Runtime,
    /// Unmounting the image.
    Unmount,
    /// Releasing the loop device (and waiting until the kernel lets go of the file).
    LoopRelease,
    /// The control request that detaches the image and drops its overlay.
    Detach,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 9] = [
        Step::Attach,
        Step::File,
        Step::Loop,
        Step::Mount,
        Step::User,
        Step::Runtime,
        Step::Unmount,
        Step::LoopRelease,
        Step::Detach,
    ];

    /// The step's name, as printed and as the JSON key (without `_ms`).
    pub fn name(self) -> &'static str {
        match self {
            Step::Attach => "attach",
            Step::File => "fuse_file",
            Step::Loop => "loop_setup",
            Step::Mount => "mount",
            Step::User => "user_lookup",
            Step::Runtime => "runtime",
            Step::Unmount => "unmount",
            Step::LoopRelease => "loop_release",
            Step::Detach => "detach",
        }
    }
}

/// The time each step took, and the whole from the first step's start (or whatever
/// earlier instant [`Timings::starting_at`] was given) to the last step's end.
#[derive(Debug, Clone)]
pub struct Timings {
    started: Instant,
    steps: Vec<(Step, Duration)>,
    ended: Option<Instant>,
}

impl Default for Timings {
    fn default() -> Self {
        Timings::starting_at(Instant::now())
    }
}

impl Timings {
    /// Timings whose total counts from `started`.
    pub fn starting_at(started: Instant) -> Timings {
        Timings {
            started,
            steps: Vec::new(),
            ended: None,
        }
    }

    /// Runs `f` as `step` and records how long it took (also when it fails).
    pub fn time<T>(&mut self, step: Step, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        self.add(step, t0.elapsed());
        out
    }

    /// Adds `d` to `step` (a step taken twice counts both).
    pub fn add(&mut self, step: Step, d: Duration) {
        match self.steps.iter_mut().find(|(s, _)| *s == step) {
            Some((_, total)) => *total += d,
            None => self.steps.push((step, d)),
        }
        self.ended = Some(Instant::now());
    }

    /// The time `step` took, if it was taken.
    pub fn get(&self, step: Step) -> Option<Duration> {
        self.steps.iter().find(|(s, _)| *s == step).map(|(_, d)| *d)
    }

    /// From the start to the end of the last step recorded.
    pub fn total(&self) -> Duration {
        self.ended
            .map(|e| e.duration_since(self.started))
            .unwrap_or_default()
    }

    /// The total less the steps: argument parsing, temporary directories, the runtime's
    /// choice, anything between the steps.
    pub fn other(&self) -> Duration {
        let steps: Duration = self.steps.iter().map(|(_, d)| *d).sum();
        self.total().saturating_sub(steps)
    }

    /// `{"attach_ms": 0.41, ..., "other_ms": 0.2, "total_ms": 9.8}`: the steps taken, in
    /// order, in milliseconds.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for step in Step::ALL {
            if let Some(d) = self.get(step) {
                m.insert(format!("{}_ms", step.name()), json!(ms(d)));
            }
        }
        m.insert("other_ms".into(), json!(ms(self.other())));
        m.insert("total_ms".into(), json!(ms(self.total())));
        Value::Object(m)
    }

    /// One line per step taken, then `other` and `total`, for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, d: Duration| {
            out.push_str(&format!("{name:<14}{:>9.3} ms\n", ms(d)));
        };
        for step in Step::ALL {
            if let Some(d) = self.get(step) {
                line(step.name(), d);
            }
        }
        line("other", self.other());
        line("total", self.total());
        out
    }
}

/// Milliseconds, to the microsecond (a command may run for days: no cap).
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_add_up_and_the_rest_is_other() {
        let t0 = Instant::now();
        let mut t = Timings::starting_at(t0);
        t.add(Step::Attach, Duration::from_micros(400));
        t.add(Step::Mount, Duration::from_micros(1500));
        t.add(Step::Mount, Duration::from_micros(500));
        assert_eq!(t.get(Step::Mount), Some(Duration::from_millis(2)));
        assert_eq!(t.get(Step::Loop), None);
        // The steps were recorded, not slept: the total is the wall time since t0,
        // however small, and `other` never goes below zero.
        assert!(t.total() <= t0.elapsed());
        assert_eq!(
            t.other(),
            t.total().saturating_sub(Duration::from_micros(2400))
        );
        let v = t.to_json();
        assert_eq!(v["attach_ms"], 0.4);
        assert_eq!(v["mount_ms"], 2.0);
        assert!(v.get("loop_setup_ms").is_none());
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["attach_ms", "mount_ms", "other_ms", "total_ms"]);
        let text = t.render();
        let first: Vec<&str> = text
            .lines()
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(first, ["attach", "mount", "other", "total"]);
        assert!(text.starts_with("attach            0.400 ms\n"), "{text}");
        // A long-running command's time is not capped.
        assert_eq!(ms(Duration::from_secs(3 * 86_400)), 259_200_000.0);
        assert_eq!(ms(Duration::from_nanos(1_499)), 0.001);
    }

    #[test]
    fn time_records_the_step_it_ran() {
        let mut t = Timings::default();
        let v = t.time(Step::User, || {
            std::thread::sleep(Duration::from_millis(2));
            7
        });
        assert_eq!(v, 7);
        let d = t.get(Step::User).expect("recorded");
        assert!(d >= Duration::from_millis(2), "{d:?}");
        assert!(t.total() >= d);
    }
}
