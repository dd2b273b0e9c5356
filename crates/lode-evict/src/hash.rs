//! The policies' index hasher: a keyed multiply-rotate hash, several times faster than
//! std's SipHash on the small keys policies index (a `u32` in the simulator, a 32-byte
//! chunk name on a worker).
//!
//! Keys are chunk names, SHA-256 outputs no one chooses, or the simulator's own numbers;
//! the seed is drawn per process from std's `RandomState`, so a hostile image cannot aim
//! its chunks at one bucket without knowing it.

use std::hash::{BuildHasher, Hasher};

/// Builds [`KeyHasher`]s sharing one per-process seed.
#[derive(Clone, Copy, Debug)]
pub struct KeyHash {
    seed: u64,
}

impl KeyHash {
    /// A builder with this process's seed.
    pub fn new() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let seed = *SEED.get_or_init(|| std::hash::RandomState::new().hash_one(0x5eed_u64) | 1);
        Self { seed }
    }
}

impl KeyHash {
    /// A builder with a fixed seed: the same hashes in every process, for decisions
    /// that must repeat from run to run (a frequency sketch's counts).
    pub const fn with_seed(seed: u64) -> Self {
        Self { seed: seed | 1 }
    }
}

impl Default for KeyHash {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildHasher for KeyHash {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.seed)
    }
}

/// One hash in progress.
#[derive(Debug)]
pub struct KeyHasher(u64);

const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

impl KeyHasher {
    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(MUL).rotate_left(29);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.word(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u32(&mut self, i: u32) {
        self.word(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.word(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.word(i as u64);
    }

    fn finish(&self) -> u64 {
        // MurmurHash3's finaliser: every output bit depends on every input bit, so the
        // bucket (low bits) and the control byte (high bits) both see the whole key.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn distinct_small_keys_spread_over_buckets() {
        let h = KeyHash::new();
        let low: HashSet<u64> = (0u32..4096).map(|k| h.hash_one(k) & 4095).collect();
        // 4096 keys into 4096 buckets: about 63% distinct for a random function.
        assert!(low.len() > 2400, "{}", low.len());
        assert_ne!(h.hash_one([1u8; 32]), h.hash_one([2u8; 32]));
        assert_eq!(
            h.hash_one(7u32),
            KeyHash::new().hash_one(7u32),
            "one seed a process"
        );
    }
}
