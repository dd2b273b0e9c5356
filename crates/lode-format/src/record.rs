//! The envelope of the records lode keeps beside a manifest in the store — an image's
//! working set ([`crate::workset`]) and a snapshot's (lode-snap) — and the one list both
//! hold:
//!
//! ```text
//! stored object: nonce (12, random) ‖ AES-256-GCM(record) ‖ tag (16)
//!   key = SHA-256(label ‖ every chunk key of the manifest)   (KeyTable::derive)
//!   AAD = the manifest id
//! ```
//!
//! Each kind of record has its own label, so one never opens as another, and only holders
//! of the manifest's key table can derive its key: a record says what a start read,
//! which is as private as the image.

use std::collections::HashSet;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{KeyTable, ManifestId};

/// Bytes the envelope adds to a record: its nonce and its tag.
pub const OVERHEAD: usize = NONCE_LEN + 16;

/// The key that seals one kind of record of one manifest.
pub struct RecordSealKey(LessSafeKey);

impl std::fmt::Debug for RecordSealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordSealKey(..)")
    }
}

impl RecordSealKey {
    /// The key of records labelled `label` of the manifest whose chunk keys are `keys`.
    pub fn new(keys: &KeyTable, label: &[u8]) -> Self {
        let secret = keys.derive(label);
        // A 32-byte key is always valid for AES-256-GCM.
        let Ok(key) = UnboundKey::new(&AES_256_GCM, secret.expose()) else {
            unreachable!("AES-256-GCM takes 32-byte keys")
        };
        Self(LessSafeKey::new(key))
    }

    /// `record` sealed for manifest `id`, under a fresh random nonce.
    pub fn seal(&self, id: &ManifestId, mut record: Vec<u8>) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        // SystemRandom only fails when the OS has no randomness at all.
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the operating system's random source failed");
        let Ok(()) = self.0.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id.as_bytes()),
            &mut record,
        ) else {
            unreachable!("sealing fails only for inputs over 64 GiB")
        };
        let mut out = Vec::with_capacity(NONCE_LEN + record.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&record);
        out
    }

    /// The record inside `sealed`, if it authenticates as one of manifest `id` under this
    /// key; `None` for anything else (another manifest's, another kind's, damaged, short).
    pub fn open(&self, id: &ManifestId, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let len = self
            .0
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut body)
            .ok()?
            .len();
        body.truncate(len);
        Some(body)
    }
}

/// A record's list: `list` as little-endian u64s, each below `limit` and none twice, in
/// order. The error names the first entry at fault (`unit` is what an entry counts:
/// "chunk", "page") and the `whole` it lies past the end of.
pub fn distinct_entries(
    list: &[u8],
    limit: u64,
    unit: &str,
    whole: &str,
) -> Result<Vec<u64>, String> {
    if !list.len().is_multiple_of(8) {
        return Err(format!("{unit} list is not a whole number of entries"));
    }
    let mut seen = HashSet::with_capacity(list.len() / 8);
    let mut out = Vec::with_capacity(list.len() / 8);
    for e in list.chunks_exact(8) {
        let mut x = [0u8; 8];
        x.copy_from_slice(e);
        let v = u64::from_le_bytes(x);
        if v >= limit {
            return Err(format!("{unit} {v} is past the end of the {whole}"));
        }
        if !seen.insert(v) {
            return Err(format!("{unit} {v} is listed twice"));
        }
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn entries_below_the_limit_and_distinct_or_a_named_error() {
        let list = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            distinct_entries(&list(&[3, 1, 2]), 4, "chunk", "image"),
            Ok(vec![3, 1, 2])
        );
        assert_eq!(
            distinct_entries(&list(&[1, 4]), 4, "chunk", "image"),
            Err("chunk 4 is past the end of the image".to_owned())
        );
        assert_eq!(
            distinct_entries(&list(&[2, 2]), 4, "page", "snapshot"),
            Err("page 2 is listed twice".to_owned())
        );
        assert!(distinct_entries(&[0; 7], 4, "chunk", "image").is_err());
    }

    proptest! {
        #[test]
        fn any_list_parses_or_errs(b in proptest::collection::vec(any::<u8>(), 0..256), limit in 0u64..64) {
            if let Ok(v) = distinct_entries(&b, limit, "chunk", "image") {
                prop_assert_eq!(v.len() * 8, b.len());
                prop_assert!(v.iter().all(|&x| x < limit));
            }
        }
    }
}
