//! Ids and units. A chunk name, a manifest id and an image digest are all 32 bytes of
//! SHA-256, and a chunk index, a byte offset and a chunk size are all integers; each is
//! its own type so that one cannot be passed where another is meant.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A string that should have been a 64-digit lowercase hex SHA-256 was not.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{what} {input:?} is not 64 hex digits")]
pub struct ParseIdError {
    what: &'static str,
    input: String,
}

fn parse_hex32(what: &'static str, s: &str) -> Result<[u8; 32], ParseIdError> {
    let mut out = [0u8; 32];
    if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
        return Err(ParseIdError {
            what,
            input: s.chars().take(80).collect(),
        });
    }
    Ok(out)
}

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw SHA-256 bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw 32 bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// SHA-256 of `data`.
            pub fn of(data: &[u8]) -> Self {
                let d = ring::digest::digest(&ring::digest::SHA256, data);
                let mut out = [0u8; 32];
                out.copy_from_slice(d.as_ref());
                Self(out)
            }

            /// Lowercase hex, 64 digits.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32($what, s).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hash_id!(
    /// A chunk's name: SHA-256 of its ciphertext. Anyone holding the ciphertext can check it.
    ChunkName,
    "chunk name"
);
hash_id!(
    /// A manifest's id: SHA-256 of the manifest's bytes.
    ManifestId,
    "manifest id"
);
hash_id!(
    /// SHA-256 of the source an image was made from (a raw file, an OCI manifest).
    ImageDigest,
    "image digest"
);

/// 32 secret bytes, wiped on drop and never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret32([u8; 32]);

impl Secret32 {
    /// Wraps secret bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The secret bytes.
    pub const fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Fresh random bytes from the operating system.
    pub fn random() -> Result<Self, ring::error::Unspecified> {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut b)?;
        Ok(Self(b))
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32(<redacted>)")
    }
}

/// The AES-256-GCM key of one chunk: `HMAC-SHA256(root_salt, SHA-256(plaintext))`.
pub type ChunkKey = Secret32;
/// The per-root salt that keys are derived under.
pub type RootSalt = Secret32;
/// The random per-manifest key that encrypts a manifest's key table.
pub type DataKey = Secret32;

/// A root of the store (docs/gc.md): every chunk and manifest lives
/// under exactly one root, and each root has its own salt.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RootId(pub u32);

impl fmt::Display for RootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for RootId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(RootId)
    }
}

/// The position of a chunk in an image: byte offset / chunk size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChunkIndex(pub u64);

impl fmt::Display for ChunkIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A byte offset into an image.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteOffset(pub u64);

impl fmt::Display for ByteOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A chunk size: a power of two from 4 KiB to 64 MiB. 512 KiB by default, as in Lambda.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ChunkSize(u32);

/// A chunk size outside what lode supports.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("chunk size {0} is not a power of two between 4096 and 67108864 bytes")]
pub struct InvalidChunkSize(pub u64);

impl ChunkSize {
    /// 512 KiB, the chunk size Lambda uses and lode's default.
    pub const DEFAULT: ChunkSize = ChunkSize(512 * 1024);
    /// The smallest allowed chunk size (one page).
    pub const MIN: u32 = 4096;
    /// The largest allowed chunk size.
    pub const MAX: u32 = 64 * 1024 * 1024;

    /// Checks that `bytes` is a supported chunk size.
    pub fn new(bytes: u64) -> Result<Self, InvalidChunkSize> {
        match u32::try_from(bytes) {
            Ok(b) if b.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&b) => Ok(Self(b)),
            _ => Err(InvalidChunkSize(bytes)),
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u32 {
        self.0
    }

    /// The size in bytes, as a `u64` for offset arithmetic.
    pub const fn bytes_u64(self) -> u64 {
        self.0 as u64
    }

    /// The size in bytes, as a `usize` for buffers.
    pub const fn bytes_usize(self) -> usize {
        self.0 as usize
    }

    /// How many chunks cover a device of `device_size` bytes (the last may be short).
    pub const fn chunks_for(self, device_size: u64) -> u64 {
        device_size.div_ceil(self.0 as u64)
    }

    /// The chunk holding byte `offset`.
    pub const fn index_of(self, offset: ByteOffset) -> ChunkIndex {
        ChunkIndex(offset.0 / self.0 as u64)
    }

    /// The byte offset where chunk `index` starts.
    pub const fn offset_of(self, index: ChunkIndex) -> ByteOffset {
        // Saturating: an index past any real device maps past its end, never wraps.
        ByteOffset(index.0.saturating_mul(self.0 as u64))
    }

    /// The plaintext length of chunk `index` in a device of `device_size` bytes: the chunk
    /// size, except for a short last chunk (and 0 past the end).
    pub fn len_of(self, index: ChunkIndex, device_size: u64) -> usize {
        let start = self.offset_of(index).0;
        let len = device_size.saturating_sub(start).min(self.bytes_u64());
        // len <= chunk size, which is a u32.
        usize::try_from(len).unwrap_or(usize::MAX)
    }
}

impl Default for ChunkSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for ChunkSize {
    type Error = InvalidChunkSize;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Self::new(u64::from(v))
    }
}

impl From<ChunkSize> for u32 {
    fn from(c: ChunkSize) -> u32 {
        c.0
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The size of a v2 chunk's segments (docs/format.md, "Chunk v2"): a power of two from
/// 4 KiB to 64 MiB, and at most the chunk size of the manifest that uses it. 32 KiB by
/// default.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct SegmentSize(u32);

/// A segment size outside what lode supports.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("segment size {0} is not a power of two between 4096 and 67108864 bytes")]
pub struct InvalidSegmentSize(pub u64);

impl SegmentSize {
    /// 32 KiB, the default for codec 0 (stored as it is): a 512 KiB chunk in 16
    /// segments. New images use [`SegmentSize::LZ4`] with codec 1.
    pub const DEFAULT: SegmentSize = SegmentSize(32 * 1024);
    /// 16 KiB, the segment size measured best for lz4-compressed chunks (docs/format.md
    /// §8): a 512 KiB chunk in 32 segments.
    pub const LZ4: SegmentSize = SegmentSize(16 * 1024);
    /// The smallest allowed segment size (one page).
    pub const MIN: u32 = 4096;
    /// The largest allowed segment size (the largest chunk).
    pub const MAX: u32 = ChunkSize::MAX;

    /// Checks that `bytes` is a supported segment size.
    pub fn new(bytes: u64) -> Result<Self, InvalidSegmentSize> {
        match u32::try_from(bytes) {
            Ok(b) if b.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&b) => Ok(Self(b)),
            _ => Err(InvalidSegmentSize(bytes)),
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u32 {
        self.0
    }

    /// The size in bytes, as a `u64` for offset arithmetic.
    pub const fn bytes_u64(self) -> u64 {
        self.0 as u64
    }

    /// The size in bytes, as a `usize` for buffers.
    pub const fn bytes_usize(self) -> usize {
        self.0 as usize
    }

    /// How many segments hold `plain_len` bytes (the last may be short).
    pub const fn count_for(self, plain_len: u64) -> u64 {
        plain_len.div_ceil(self.0 as u64)
    }

    /// Whether segments of this size fit chunks of `chunk_size` (a segment is never
    /// larger than its chunk).
    pub const fn fits(self, chunk_size: ChunkSize) -> bool {
        self.0 <= chunk_size.bytes()
    }
}

impl Default for SegmentSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for SegmentSize {
    type Error = InvalidSegmentSize;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Self::new(u64::from(v))
    }
}

impl From<SegmentSize> for u32 {
    fn from(s: SegmentSize) -> u32 {
        s.0
    }
}

impl fmt::Display for SegmentSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The position of a segment in a v2 chunk: offset in the chunk / segment size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SegmentIndex(pub u32);

impl fmt::Display for SegmentIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex() {
        let n = ChunkName::of(b"abc");
        assert_eq!(
            n.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(n.to_hex().parse::<ChunkName>().unwrap(), n);
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<ChunkName>(&json).unwrap(), n);
    }

    #[test]
    fn bad_ids_are_named_in_the_error() {
        let e = "xyz".parse::<ManifestId>().unwrap_err();
        assert_eq!(e.to_string(), "manifest id \"xyz\" is not 64 hex digits");
    }

    #[test]
    fn chunk_size_bounds() {
        assert!(ChunkSize::new(4096).is_ok());
        assert!(ChunkSize::new(512 * 1024).is_ok());
        assert!(ChunkSize::new(64 << 20).is_ok());
        assert_eq!(ChunkSize::new(1000), Err(InvalidChunkSize(1000)));
        assert!(ChunkSize::new(2048).is_err());
        assert!(ChunkSize::new(128 << 20).is_err());
        assert!(ChunkSize::new(u64::MAX).is_err());
        assert_eq!(
            InvalidChunkSize(3).to_string(),
            "chunk size 3 is not a power of two between 4096 and 67108864 bytes"
        );
    }

    #[test]
    fn chunk_arithmetic() {
        let c = ChunkSize::new(4096).unwrap();
        assert_eq!(c.chunks_for(0), 0);
        assert_eq!(c.chunks_for(1), 1);
        assert_eq!(c.chunks_for(4096), 1);
        assert_eq!(c.chunks_for(4097), 2);
        assert_eq!(c.index_of(ByteOffset(8191)), ChunkIndex(1));
        assert_eq!(c.offset_of(ChunkIndex(3)), ByteOffset(12288));
        assert_eq!(c.len_of(ChunkIndex(1), 4097), 1);
        assert_eq!(c.len_of(ChunkIndex(0), 4097), 4096);
        assert_eq!(c.len_of(ChunkIndex(5), 4097), 0);
    }

    #[test]
    fn segment_size_bounds() {
        assert_eq!(SegmentSize::default().bytes(), 32768);
        assert!(SegmentSize::new(4096).is_ok());
        assert!(SegmentSize::new(64 << 20).is_ok());
        assert_eq!(SegmentSize::new(2048), Err(InvalidSegmentSize(2048)));
        assert!(SegmentSize::new(12288).is_err());
        assert!(SegmentSize::new(128 << 20).is_err());
        assert!(SegmentSize::new(u64::MAX).is_err());
        assert_eq!(
            InvalidSegmentSize(5).to_string(),
            "segment size 5 is not a power of two between 4096 and 67108864 bytes"
        );
        let s = SegmentSize::new(32768).unwrap();
        assert!(s.fits(ChunkSize::DEFAULT));
        assert!(s.fits(ChunkSize::new(32768).unwrap()));
        assert!(!s.fits(ChunkSize::new(16384).unwrap()));
        assert_eq!(s.count_for(0), 0);
        assert_eq!(s.count_for(1), 1);
        assert_eq!(s.count_for(32768), 1);
        assert_eq!(s.count_for(32769), 2);
        assert_eq!(s.count_for(512 * 1024), 16);
        assert_eq!(serde_json::to_string(&s).unwrap(), "32768");
        assert!(serde_json::from_str::<SegmentSize>("1000").is_err());
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret32::from_bytes([7; 32]);
        assert_eq!(format!("{s:?}"), "Secret32(<redacted>)");
    }
}
