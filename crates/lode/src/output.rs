//! Printing: progress bars on a terminal, human sizes, JSON.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lode_image::Progress;
use serde::Serialize;

/// A progress bar on stderr, drawn only on a terminal and never with --json or --quiet.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(what: &str, hidden: bool) -> Bar {
        let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if hidden {
            pb.set_draw_target(ProgressDrawTarget::hidden());
        }
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        pb.set_message(what.to_owned());
        pb.enable_steady_tick(Duration::from_millis(200));
        Bar(pb)
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn set_total(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

/// Flattening's news lines, and a progress bar per phase (pulling, flattening,
/// publishing).
pub struct News {
    bar: std::sync::Mutex<Arc<Bar>>,
    hidden: bool,
    quiet: bool,
}

impl News {
    /// `hidden`: no bars; `quiet`: no news lines either.
    pub fn new(hidden: bool, quiet: bool) -> News {
        News {
            bar: std::sync::Mutex::new(Arc::new(Bar::new("", true))),
            hidden,
            quiet,
        }
    }

    fn current(&self) -> Arc<Bar> {
        self.bar.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn finish(&self) {
        self.current().finish();
    }
}

impl lode_image::FlattenProgress for News {
    fn note(&self, line: String) {
        if !self.quiet {
            self.current().0.suspend(|| eprintln!("  {line}"));
        }
    }
    fn bytes(&self, phase: &str) -> Arc<dyn Progress> {
        let mut bar = self.bar.lock().unwrap_or_else(|p| p.into_inner());
        bar.finish();
        *bar = Arc::new(Bar::new(phase, self.hidden));
        bar.clone()
    }
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn print_json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
