//! Deterministic pseudo-random bytes: the same for the same seed on every run and every
//! machine, so a failing test fails again, and bytes that neither repeat nor compress,
//! so a test of chunking, deduplication or compression cannot pass by accident.

/// `len` bytes from `seed`: xorshift64 (shifts 13, 7, 17) from the seed times the 64-bit
/// golden ratio with its low bit set, each step giving its state's eight little-endian
/// bytes. Not for anything that must be unpredictable.
pub fn seeded_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0; len];
    fill_seeded(&mut out, seed);
    out
}

/// Fills `buf` with the first `buf.len()` bytes of [`seeded_bytes`] for `seed`.
pub fn fill_seeded(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence is fixed: these were computed apart from this code, by a few lines of
    /// Python over the same recurrence.
    #[test]
    fn known_sequences() {
        for (seed, hex) in [
            (0, "41208240000000004114010c064100102926866e"),
            (7, "9a3200d42d753ff67fd40921dde9ceec17389f93"),
            (u64::MAX, "2c72f174ae771bdcc89b910d41100f7bff4a6b4d"),
        ] {
            let got: String = seeded_bytes(20, seed)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(got, hex, "seed {seed}");
        }
    }

    #[test]
    fn shorter_is_a_prefix_of_longer_and_fill_agrees() {
        let long = seeded_bytes(1000, 42);
        for len in [0, 1, 7, 8, 9, 999] {
            assert_eq!(seeded_bytes(len, 42), long[..len], "len {len}");
            let mut buf = vec![0xaa; len];
            fill_seeded(&mut buf, 42);
            assert_eq!(buf, long[..len], "len {len}");
        }
    }

    #[test]
    fn seeds_give_different_bytes() {
        let mut seen: Vec<Vec<u8>> = (0..256).map(|s| seeded_bytes(16, s)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn a_megabyte_repeats_no_eight_byte_word() {
        let bytes = seeded_bytes(1 << 20, 3);
        let mut words: Vec<&[u8]> = bytes.chunks(8).collect();
        words.sort_unstable();
        words.dedup();
        assert_eq!(words.len(), (1 << 20) / 8);
    }
}
