//! A workload to run on restored memory: an in-memory key-value index (an open-addressing
//! hash table over a heap of values), built before the snapshot and queried after it, as
//! a function would keep a warmed-up index or interpreter heap in its snapshot.
//!
//! ```text
//! page 0   header: magic "LODEIDX1", keys, slots, table offset, heap offset, heap length
//!          byte 64..80: the generation id slot (zero in the snapshot; the handler writes
//!          each restore's id there with --generation-id-offset 64)
//! page 1…  table: `slots` × (key + 1: u64, value offset: u64), linear probing
//! then     heap: values, each u32 length + bytes
//! rest     zero (free memory)
//! ```
//!
//! Every value is a pure function of its key, so a query checks each answer byte for
//! byte: a wrong page shows up as a wrong answer, not as a silent pass.

use std::time::{Duration, Instant};

use crate::usize_of;

const MAGIC: [u8; 8] = *b"LODEIDX1";
/// Where the generation id lives in the header page.
pub const GENERATION_OFFSET: u64 = 64;
const TABLE_AT: u64 = 4096;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The i-th key of an index.
pub fn key(i: u64) -> u64 {
    mix(i ^ 0x5eed)
}

/// The value stored under `key`.
pub fn value(key: u64) -> Vec<u8> {
    let len = 64 + (mix(key) % 449) as usize;
    let mut v = Vec::with_capacity(len + 8);
    let mut s = key;
    while v.len() < len {
        s = mix(s);
        v.extend_from_slice(&s.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn get_u64(m: &[u8], at: u64) -> Result<u64, String> {
    let at = usize::try_from(at).map_err(|_| format!("offset {at} out of range"))?;
    let b = m
        .get(at..at + 8)
        .ok_or_else(|| format!("offset {at} is past the end of memory"))?;
    Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
}

/// Builds the memory image of an index of `keys` keys in `size` bytes.
pub fn build(size: u64, keys: u64) -> Result<Vec<u8>, String> {
    let slots = (keys * 2).next_power_of_two().max(16);
    let heap_at = TABLE_AT + slots * 16;
    let mut m = vec![0u8; usize::try_from(size).map_err(|_| "size too large".to_string())?];
    let mut heap = heap_at;
    for i in 0..keys {
        let k = key(i);
        let v = value(k);
        let need = 4 + v.len() as u64;
        if heap + need > size {
            return Err(format!(
                "{keys} keys do not fit in {size} bytes (ran out at key {i}); give more memory"
            ));
        }
        let at = usize_of(heap);
        m[at..at + 4].copy_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
        m[at + 4..at + 4 + v.len()].copy_from_slice(&v);
        let mut slot = mix(k) & (slots - 1);
        loop {
            let s = usize_of(TABLE_AT + slot * 16);
            if m[s..s + 8] == [0; 8] {
                m[s..s + 8].copy_from_slice(&(k.wrapping_add(1)).to_le_bytes());
                m[s + 8..s + 16].copy_from_slice(&heap.to_le_bytes());
                break;
            }
            slot = (slot + 1) & (slots - 1);
        }
        heap += need;
    }
    m[..8].copy_from_slice(&MAGIC);
    for (i, v) in [keys, slots, TABLE_AT, heap_at, heap - heap_at]
        .into_iter()
        .enumerate()
    {
        m[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    Ok(m)
}

/// What a run of queries found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueryReport {
    /// Queries answered (all checked).
    pub answered: u64,
    /// Time to the first answer.
    pub first_answer: Duration,
    /// Time to the last.
    pub total: Duration,
    /// The generation id found in the header.
    pub generation_id: String,
}

/// Looks up `count` keys chosen by `seed` in the index in `m`, checking every answer.
pub fn query(m: &[u8], seed: u64, count: u64) -> Result<QueryReport, String> {
    let started = Instant::now();
    if m.get(..8) != Some(&MAGIC[..]) {
        return Err("memory does not hold a lode index (bad magic in page 0)".into());
    }
    let keys = get_u64(m, 8)?;
    let slots = get_u64(m, 16)?;
    let table = get_u64(m, 24)?;
    if keys == 0 || !slots.is_power_of_two() {
        return Err(format!(
            "index header is corrupt: {keys} keys, {slots} slots"
        ));
    }
    let generation_id = m[usize_of(GENERATION_OFFSET)..usize_of(GENERATION_OFFSET) + 16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut first_answer = None;
    let mut pick = seed;
    for q in 0..count {
        pick = mix(pick);
        let k = key(pick % keys);
        let mut slot = mix(k) & (slots - 1);
        let mut probes = 0;
        let at = loop {
            let s = table + slot * 16;
            let stored = get_u64(m, s)?;
            if stored == k.wrapping_add(1) {
                break get_u64(m, s + 8)?;
            }
            probes += 1;
            if stored == 0 || probes > slots {
                return Err(format!("query {q}: key {k:#x} is missing from the index"));
            }
            slot = (slot + 1) & (slots - 1);
        };
        let at = usize::try_from(at).map_err(|_| format!("query {q}: bad value offset"))?;
        let len = m
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as usize)
            .ok_or_else(|| format!("query {q}: value offset {at} is out of range"))?;
        let got = m
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| format!("query {q}: value at {at} runs out of memory"))?;
        let want = value(k);
        if got != want.as_slice() {
            let i = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            return Err(format!(
                "query {q}: key {k:#x}: the value read differs from the one stored at byte {i} \
                 (memory offset {})",
                at + 4 + i
            ));
        }
        first_answer.get_or_insert_with(|| started.elapsed());
    }
    Ok(QueryReport {
        answered: count,
        first_answer: first_answer.unwrap_or_default(),
        total: started.elapsed(),
        generation_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_index_answers_and_a_flipped_byte_is_caught() {
        let mut m = build(4 << 20, 5000).unwrap();
        let r = query(&m, 7, 2000).unwrap();
        assert_eq!(r.answered, 2000);
        assert_eq!(r.generation_id, "0".repeat(32));
        // Corrupt one value byte that query 0 will read.
        let k = key(mix(7) % 5000);
        let mut slot = mix(k) & 16383;
        let at = loop {
            let s = usize_of(TABLE_AT + slot * 16);
            if get_u64(&m, s as u64).unwrap() == k + 1 {
                break usize_of(get_u64(&m, s as u64 + 8).unwrap());
            }
            slot = (slot + 1) & 16383;
        };
        m[at + 10] ^= 0xff;
        let e = query(&m, 7, 1).unwrap_err();
        assert!(e.contains("differs from the one stored at byte 6"), "{e}");
        assert!(build(1 << 16, 5000).unwrap_err().contains("do not fit"));
        assert!(
            query(&vec![0u8; 8192], 1, 1)
                .unwrap_err()
                .contains("bad magic")
        );
    }
}
