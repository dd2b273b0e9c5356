//! Real memcached nodes for the fleet tests and the fetch benchmark (lode-testkit's, each
//! on 127.0.0.1, `-U 0 -I 2m -m 64`, killed on drop), and chunks of seeded bytes.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_az::AzConfig;
use lode_format::ChunkName;
pub use lode_testkit::Memcached;

/// `n` memcached nodes of 64 MiB each, or `None` after `lode_testkit::skip` when
/// memcached is absent.
pub fn fleet(n: usize) -> Option<Vec<Memcached>> {
    (0..n).map(|_| Memcached::start(64)).collect()
}

/// A config over `fleet` with the default code and the given timeout.
pub fn config(fleet: &[Memcached], timeout: Duration) -> AzConfig {
    let mut c = AzConfig::new(fleet.iter().map(|m| m.addr().to_string()));
    c.node_timeout = timeout;
    c
}

/// A chunk: (name, ciphertext).
pub fn chunk(seed: u64, len: usize) -> (ChunkName, Bytes) {
    let b = Bytes::from(lode_testkit::seeded_bytes(len, seed));
    (ChunkName::of(&b), b)
}

/// The quantile `per_mille`/1000 of sorted durations (nearest rank).
pub fn quantile(sorted: &[Duration], per_mille: usize) -> Duration {
    let Some(last) = sorted.len().checked_sub(1) else {
        return Duration::ZERO;
    };
    sorted[((last * per_mille + 500) / 1000).min(last)]
}

/// Polls `f` every 10 ms until it holds or `limit` passes; whether it held.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}
