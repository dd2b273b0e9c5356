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

/// Flattening's news lines and byte progress.
pub struct News {
    bar: Arc<Bar>,
    quiet: bool,
}

impl News {
    pub fn new(bar: Arc<Bar>, quiet: bool) -> News {
        News { bar, quiet }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}

impl lode_image::FlattenProgress for News {
    fn note(&self, line: String) {
        if !self.quiet {
            self.bar.0.suspend(|| eprintln!("  {line}"));
        }
    }
    fn bytes(&self) -> Arc<dyn Progress> {
        self.bar.clone()
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
