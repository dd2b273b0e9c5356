//! Convergent chunk encryption (docs/format.md).
//!
//! ```text
//!   plaintext (≤ chunk size bytes; all-zero chunks are never sealed)
//!       │ SHA-256
//!       ▼
//!   digest ── HMAC-SHA256(root_salt, digest) ──► key
//!       plaintext ── AES-256-GCM(key, nonce = 12 zero bytes, no AAD) ──► ciphertext ‖ tag
//!                                                                         │ SHA-256
//!                                                                         ▼
//!                                                                        name
//! ```
//!
//! The same plaintext under the same root salt always gives the same name, so a chunk is
//! stored once across all images and tenants while stores and caches hold only
//! ciphertext. A key encrypts exactly one plaintext, so the fixed nonce never repeats
//! under one key. The name is a hash of the ciphertext (not the GCM tag, which is not
//! collision-resistant for whoever holds the key), so anyone holding only the ciphertext
//! can check it.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::{digest, hmac};
use thiserror::Error;

use crate::ids::{ChunkKey, ChunkName, RootSalt};

/// Bytes the GCM tag adds to every sealed chunk.
pub const TAG_LEN: usize = 16;

/// A chunk failed a check.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChunkError {
    /// The bytes do not hash to the name they were fetched under.
    #[error("chunk {expected} is corrupt: its bytes hash to {got}")]
    NameMismatch {
        /// The name the chunk was asked for by.
        expected: ChunkName,
        /// SHA-256 of the bytes that arrived.
        got: ChunkName,
    },
    /// The GCM tag did not verify under the key from the manifest.
    #[error(
        "chunk {chunk} does not decrypt under the key the manifest holds for it \
         (wrong key table or tampered chunk)"
    )]
    Decrypt {
        /// The chunk at fault.
        chunk: ChunkName,
    },
    /// Shorter than a GCM tag.
    #[error("chunk {chunk} is {len} bytes, shorter than its 16-byte tag")]
    TooShort {
        /// The chunk at fault.
        chunk: ChunkName,
        /// Its length.
        len: usize,
    },
}

/// A chunk after sealing: its name, its key (for the manifest's key table) and its
/// ciphertext (for the store).
#[derive(Debug)]
pub struct SealedChunk {
    /// SHA-256 of the plaintext (the input to key derivation).
    pub digest: [u8; 32],
    /// SHA-256 of `ciphertext`.
    pub name: ChunkName,
    /// The key that decrypts `ciphertext`.
    pub key: ChunkKey,
    /// AES-256-GCM ciphertext with the tag appended.
    pub ciphertext: Vec<u8>,
}

/// `HMAC-SHA256(root_salt, SHA-256(plaintext))`.
pub fn derive_key(salt: &RootSalt, plaintext: &[u8]) -> ChunkKey {
    derive_key_and_digest(salt, plaintext).0
}

fn derive_key_and_digest(salt: &RootSalt, plaintext: &[u8]) -> (ChunkKey, [u8; 32]) {
    let mut d = [0u8; 32];
    d.copy_from_slice(digest::digest(&digest::SHA256, plaintext).as_ref());
    let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt.expose()), &d);
    let mut key = [0u8; 32];
    key.copy_from_slice(mac.as_ref());
    (ChunkKey::from_bytes(key), d)
}

pub(crate) fn aead_key(key: &ChunkKey) -> LessSafeKey {
    // A 32-byte key is always the right length for AES-256-GCM.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose()).expect("32-byte AES-256 key"))
}

fn zero_nonce() -> Nonce {
    Nonce::assume_unique_for_key([0u8; NONCE_LEN])
}

/// Seals a chunk, copying `plaintext`.
pub fn seal_chunk(salt: &RootSalt, plaintext: &[u8]) -> SealedChunk {
    let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buf.extend_from_slice(plaintext);
    seal_chunk_in_place(salt, buf)
}

/// Seals a chunk, encrypting `buf` in place and appending the tag: the import path reads
/// each chunk into a fresh buffer, so this spares a 512 KiB copy per chunk.
pub fn seal_chunk_in_place(salt: &RootSalt, mut buf: Vec<u8>) -> SealedChunk {
    let (key, digest) = derive_key_and_digest(salt, &buf);
    let tag = aead_key(&key)
        .seal_in_place_separate_tag(zero_nonce(), Aad::empty(), &mut buf)
        // ring fails only for inputs over ~64 GiB; chunks are at most 64 MiB.
        .expect("chunk within AES-GCM's length limit");
    buf.extend_from_slice(tag.as_ref());
    SealedChunk {
        digest,
        name: ChunkName::of(&buf),
        key,
        ciphertext: buf,
    }
}

/// Checks that `ciphertext` hashes to `name`.
pub fn verify_name(name: &ChunkName, ciphertext: &[u8]) -> Result<(), ChunkError> {
    let got = ChunkName::of(ciphertext);
    if &got == name {
        Ok(())
    } else {
        Err(ChunkError::NameMismatch {
            expected: *name,
            got,
        })
    }
}

/// Checks `ciphertext` against `name`, then decrypts it with `key`.
pub fn open_chunk(
    name: &ChunkName,
    key: &ChunkKey,
    ciphertext: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    verify_name(name, ciphertext)?;
    open_unverified(name, key, ciphertext.to_vec())
}

/// Decrypts a chunk whose name was already checked, in place.
pub fn open_unverified(
    name: &ChunkName,
    key: &ChunkKey,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, ChunkError> {
    if buf.len() < TAG_LEN {
        return Err(ChunkError::TooShort {
            chunk: *name,
            len: buf.len(),
        });
    }
    let plain_len = aead_key(key)
        .open_in_place(zero_nonce(), Aad::empty(), &mut buf)
        .map_err(|_| ChunkError::Decrypt { chunk: *name })?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

/// True when every byte is zero: such chunks are not stored (docs/format.md).
pub fn is_zero(buf: &[u8]) -> bool {
    // Compare in u64 words; the compiler vectorises this loop.
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64, and align_to keeps the slices within
        // `buf`; head and tail hold the unaligned ends.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && words.iter().fold(0u64, |acc, &w| acc | w) == 0
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn salt() -> RootSalt {
        RootSalt::from_bytes([0x11; 32])
    }

    #[test]
    fn seal_then_open() {
        let plain = vec![0xabu8; 4096];
        let s = seal_chunk(&salt(), &plain);
        assert_eq!(s.ciphertext.len(), plain.len() + TAG_LEN);
        assert_ne!(&s.ciphertext[..plain.len()], &plain[..]);
        assert_eq!(open_chunk(&s.name, &s.key, &s.ciphertext).unwrap(), plain);
    }

    #[test]
    fn convergent_under_one_salt_distinct_across_salts() {
        let plain = b"the same bytes".repeat(100);
        let a = seal_chunk(&salt(), &plain);
        let b = seal_chunk(&salt(), &plain);
        assert_eq!(a.name, b.name);
        let c = seal_chunk(&RootSalt::from_bytes([0x22; 32]), &plain);
        assert_ne!(a.name, c.name);
    }

    #[test]
    fn a_flipped_bit_is_refused_by_name_and_by_tag() {
        let s = seal_chunk(&salt(), &[5u8; 1000]);
        let mut bad = s.ciphertext.clone();
        bad[10] ^= 1;
        let err = open_chunk(&s.name, &s.key, &bad).unwrap_err();
        assert!(matches!(err, ChunkError::NameMismatch { .. }));
        assert!(
            err.to_string()
                .starts_with(&format!("chunk {} is corrupt", s.name))
        );
        // Past the name check (a caller that trusts its source), the tag still refuses it.
        let err = open_unverified(&s.name, &s.key, bad).unwrap_err();
        assert_eq!(err, ChunkError::Decrypt { chunk: s.name });
    }

    #[test]
    fn wrong_key_is_refused() {
        let s = seal_chunk(&salt(), &[5u8; 1000]);
        let err = open_chunk(&s.name, &ChunkKey::from_bytes([0; 32]), &s.ciphertext).unwrap_err();
        assert!(err.to_string().contains("does not decrypt"));
    }

    #[test]
    fn short_ciphertext_is_refused() {
        let name = ChunkName::of(b"x");
        let err = open_chunk(&name, &ChunkKey::from_bytes([0; 32]), b"x").unwrap_err();
        assert_eq!(
            err,
            ChunkError::TooShort {
                chunk: name,
                len: 1
            }
        );
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 524_288]));
        for pos in [0, 1, 7, 8, 4095, 524_287] {
            let mut v = vec![0u8; 524_288];
            v[pos] = 1;
            assert!(!is_zero(&v), "nonzero at {pos}");
            assert!(
                !is_zero(&v[pos..]),
                "nonzero at start of unaligned slice {pos}"
            );
        }
    }
}
