//! Chunk format v2: a chunk's plaintext cut into segments that can each be checked and
//! decrypted alone (docs/format.md, "Chunk v2").
//!
//! A v1 chunk is one AES-GCM message named by the SHA-256 of all of it, so a 4 KiB read
//! pays for hashing and decrypting 512 KiB. A v2 chunk keeps the chunk as the unit of
//! dedup, naming and storage, but seals each segment (16 KiB with lz4, new images' default;
//! 32 KiB stored as it is) separately and
//! names the chunk by a small header that lists the segments' hashes:
//!
//! ```text
//!   plaintext P (1 ..= 64 MiB), segment size S, codec c (0 = none, 1 = lz4)
//!     digest    = SHA-256(P)
//!     key       = HMAC-SHA256(root_salt, "lode chunk v2" ‖ u8 c ‖ u32 S ‖ digest)
//!     segment j = P[j·S .. min((j+1)·S, len P)]         j in 0..n, n = ceil(len P / S)
//!     encoded_j = segment j                              codec 0, or codec 1 kept raw
//!               | u32 m ‖ lz4_block(segment j) ‖ zeros   codec 1 compressed: m bytes of
//!                                                        lz4, padded to a multiple of
//!                                                        1024, used only when that is at
//!                                                        most L − L/8 (L = len segment j)
//!     sealed_j  = AES-256-GCM(key, nonce = u64 j ‖ 4 zero bytes, no AAD, encoded_j) ‖ tag
//!     object    = header ‖ sealed_0 ‖ … ‖ sealed_{n-1}
//!     name      = SHA-256(header)
//!
//!   header (integers little-endian)
//!     offset  size  field
//!     0       4     magic "LDC2"
//!     4       1     version (2)
//!     5       1     codec c (0 or 1)
//!     6       2     reserved (0)
//!     8       4     segment size S
//!     12      4     plaintext length
//!     16      4     segment count n (= ceil(plaintext length / S))
//!     20      36·n  per segment: u32 length of sealed_j ‖ SHA-256(sealed_j)
//! ```
//!
//! A row's sealed length says how its segment is encoded: `L + 16` is raw (the only form
//! codec 0 has); under codec 1, `16 + 1024·k` with `1024·k ≤ L − L/8` is compressed. No
//! length is both, so no flag is needed, and [`ChunkHeader::parse`] refuses any other.
//!
//! A reader that wants one segment fetches the header (its length follows from the
//! manifest: [`ChunkHeader::len_for`]), checks it against the name with
//! [`verify_header`] — no key needed, so any tier can — then fetches
//! [`ChunkHeader::segment_range`] and opens it with [`open_segment`] (or
//! [`open_segment_into`], to decode straight into the caller's buffer).
//!
//! The key binds the format, codec and segment size as well as the plaintext. Without
//! that, the same plaintext sealed as v1 (nonce 0 over the whole chunk) and as v2 (nonce 0
//! over its first segment), or as v2 under two segment sizes or codecs, would put two
//! different messages under one (key, nonce) pair, which GCM forbids. Convergence is
//! kept: the same plaintext, root, codec and segment size always give the same object and
//! name — for codec 1 because the compressor is deterministic and its version pinned.
//!
//! Checked headers travel as [`CheckedHeader`], which only [`verify_header`] builds, so a
//! segment cannot be checked against a header that was never checked against its name.

use std::borrow::Cow;
use std::ops::{Deref, Range};

use ring::aead::{Aad, LessSafeKey, NONCE_LEN, Nonce};
use ring::{digest, hmac};
use serde::Serialize;
use thiserror::Error;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::chunk::{TAG_LEN, aead_key};
use crate::ids::{ChunkKey, ChunkName, InvalidSegmentSize, RootSalt, SegmentIndex, SegmentSize};

/// The first four bytes of every v2 chunk.
pub const MAGIC: [u8; 4] = *b"LDC2";
/// The chunk format version this module writes and reads.
pub const VERSION: u8 = 2;
/// The largest plaintext a v2 chunk holds: the largest chunk size.
pub const MAX_PLAIN_LEN: u32 = crate::ids::ChunkSize::MAX;
/// The most segments a header can list: the largest chunk in the smallest segments.
pub const MAX_SEGMENTS: u32 = MAX_PLAIN_LEN / SegmentSize::MIN;
/// The label that opens the key derivation's message, so v2 keys never equal v1 keys.
pub const KEY_LABEL: &[u8; 13] = b"lode chunk v2";

/// How segments are encoded before sealing: the codec byte of a header (and of the key
/// derivation), and the codec a version 2 manifest records for all its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Codec {
    /// Byte 0: every segment stored as it is.
    None,
    /// Byte 1: each segment compressed with lz4's block format when that saves at least
    /// an eighth of it, padded to a multiple of [`LZ4_PAD`]; else stored as it is.
    Lz4,
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
        })
    }
}

impl Codec {
    /// The byte that stands for this codec in headers, manifests and key derivation.
    pub const fn byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
        }
    }

    /// The codec a byte stands for, if any.
    pub const fn from_byte(b: u8) -> Option<Codec> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// Checks a header row's sealed length against what this codec can give a segment of
    /// `plain_len` bytes: raw (`plain_len + 16`), or under lz4 a compressed body of a
    /// positive multiple of [`LZ4_PAD`] no longer than `plain_len − plain_len/8`.
    fn check_sealed_len(
        self,
        segment: SegmentIndex,
        plain_len: u32,
        sealed_len: u32,
    ) -> Result<(), HeaderError> {
        if sealed_len == raw_sealed_len(plain_len) {
            return Ok(());
        }
        match self {
            Codec::None => Err(HeaderError::SealedLen {
                segment,
                len: sealed_len,
                plain_len,
                want: raw_sealed_len(plain_len),
            }),
            Codec::Lz4 => {
                let body = sealed_len.wrapping_sub(TAG_LEN_U32);
                let fits = sealed_len > TAG_LEN_U32
                    && body.is_multiple_of(LZ4_PAD)
                    && body <= lz4_limit(plain_len);
                if fits {
                    Ok(())
                } else {
                    Err(HeaderError::CompressedLen {
                        segment,
                        len: sealed_len,
                        plain_len,
                    })
                }
            }
        }
    }
}

/// Compressed segments are padded with zeros to a multiple of this many bytes, so that a
/// segment's stored size reveals its compressibility only in steps of 1 KiB (a 16 KiB
/// segment has 15 possible lengths: raw, or 1 to 14 KiB) — docs/format.md §8.
pub const LZ4_PAD: u32 = 1024;
/// The bytes of the compressed length that opens a compressed segment's encoding.
const LEN_PREFIX: usize = 4;

/// The sealed length of a segment of `plain_len` bytes stored raw: the only length under
/// codec 0, and the largest under any codec.
fn raw_sealed_len(plain_len: u32) -> u32 {
    // plain_len <= MAX_PLAIN_LEN, far below u32::MAX - 16.
    plain_len.saturating_add(TAG_LEN_U32)
}

/// The longest compressed encoding (length, lz4 bytes and padding) that codec 1 keeps for
/// a segment of `plain_len` bytes: it must save at least an eighth.
const fn lz4_limit(plain_len: u32) -> u32 {
    plain_len - plain_len / 8
}

/// What a header row's sealed length may be under codec 1, for an error message.
fn lz4_rule(plain_len: u32) -> String {
    let raw = raw_sealed_len(plain_len);
    let most = lz4_limit(plain_len) / LZ4_PAD;
    if most == 0 {
        format!(
            "its {plain_len}-byte plaintext seals raw to {raw} bytes and is too short to compress"
        )
    } else {
        format!(
            "its {plain_len}-byte plaintext seals raw to {raw} bytes, or compressed to 16 + \
             {LZ4_PAD}·k bytes for k in 1..={most}"
        )
    }
}

const TAG_LEN_U32: u32 = 16;
const _: () = assert!(TAG_LEN_U32 as usize == TAG_LEN);

/// The fixed part of a header, as stored.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawFixed {
    magic: [u8; 4],
    version: u8,
    codec: u8,
    reserved: U16,
    segment_size: U32,
    plain_len: U32,
    count: U32,
}

/// One segment's row in a header, as stored.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRow {
    sealed_len: U32,
    sha256: [u8; 32],
}

const FIXED_LEN: usize = size_of::<RawFixed>();
const ROW_LEN: usize = size_of::<RawRow>();
const _: () = assert!(FIXED_LEN == 20);
const _: () = assert!(ROW_LEN == 36);

/// What is wrong with a header's bytes (wrapped, with the chunk's name, in
/// [`ChunkV2Error::Header`]).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    #[error("{len} bytes is shorter than the {need}-byte header")]
    Truncated {
        /// The bytes given.
        len: usize,
        /// The bytes the header needs (its fixed part, or all of it).
        need: usize,
    },
    /// Not a v2 chunk.
    #[error("bad magic {} (not a v2 chunk)", hex::encode(.found))]
    Magic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A chunk format this lode does not read.
    #[error("chunk format version {found}, this lode reads {VERSION}")]
    Version {
        /// The version byte.
        found: u8,
    },
    /// A codec this lode does not know.
    #[error("unknown codec {found}")]
    Codec {
        /// The codec byte.
        found: u8,
    },
    /// The reserved field is not zero.
    #[error("reserved field is {found:#06x}, not 0")]
    Reserved {
        /// Its value.
        found: u16,
    },
    /// The segment size is not one lode supports.
    #[error(transparent)]
    SegmentSize(#[from] InvalidSegmentSize),
    /// The plaintext length is 0 or over the largest chunk.
    #[error("plaintext length {len} is not 1 to {MAX_PLAIN_LEN} bytes")]
    PlainLen {
        /// The length recorded.
        len: u32,
    },
    /// The segment count does not follow from the plaintext length and segment size.
    #[error(
        "segment count {count} does not cover {plain_len} bytes in {segment_size}-byte \
         segments (want {want})"
    )]
    Count {
        /// The count recorded.
        count: u32,
        /// The plaintext length recorded.
        plain_len: u32,
        /// The segment size recorded.
        segment_size: SegmentSize,
        /// The count they imply.
        want: u64,
    },
    /// A segment's sealed length is not what its plaintext length and the codec give.
    #[error(
        "segment {segment} is listed as {len} sealed bytes, its {plain_len}-byte plaintext \
         seals to {want}"
    )]
    SealedLen {
        /// The segment at fault.
        segment: SegmentIndex,
        /// The length recorded.
        len: u32,
        /// The segment's plaintext length.
        plain_len: u32,
        /// The sealed length it must have.
        want: u32,
    },
    /// Under codec 1, a segment's sealed length is neither its raw length nor a padded
    /// compressed length that saves at least an eighth.
    #[error("segment {segment} is listed as {len} sealed bytes: {}", lz4_rule(*.plain_len))]
    CompressedLen {
        /// The segment at fault.
        segment: SegmentIndex,
        /// The length recorded.
        len: u32,
        /// The segment's plaintext length.
        plain_len: u32,
    },
}

/// What is wrong with a compressed segment that decrypted (wrapped, with the chunk and
/// segment, in [`ChunkV2Error::Decode`]). Its bytes passed the header's hash and the GCM
/// tag, so only a faulty writer holding the key makes one; it is refused all the same.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Too short to hold the compressed length.
    #[error("its {len} bytes hold no compressed length")]
    Short {
        /// The decrypted bytes.
        len: usize,
    },
    /// The compressed length at the front claims more bytes than follow it.
    #[error("its compressed length {len} overruns the {room} bytes after it")]
    CompressedLen {
        /// The length recorded.
        len: u32,
        /// The bytes after the length.
        room: usize,
    },
    /// The encoding is longer than its compressed bytes padded to the next multiple of
    /// [`LZ4_PAD`].
    #[error("{encoded} bytes is more than {len} compressed bytes padded to a multiple of 1024")]
    Padded {
        /// The compressed length recorded.
        len: u32,
        /// The encoding's length (the sealed length less the tag).
        encoded: usize,
    },
    /// A padding byte is not zero.
    #[error("padding byte {offset} is {value:#04x}, not 0")]
    Padding {
        /// Its offset in the decrypted segment.
        offset: usize,
        /// Its value.
        value: u8,
    },
    /// The lz4 block is corrupt, or would decode to more than the segment's plaintext
    /// length.
    #[error("its lz4 block does not decode into {want} bytes: {reason}")]
    Lz4 {
        /// What lz4 reported.
        reason: String,
        /// The segment's plaintext length, the most the block may decode to.
        want: u32,
    },
    /// The lz4 block decodes to fewer bytes than the segment holds.
    #[error("its lz4 block decodes to {got} bytes, the segment holds {want}")]
    PlainLen {
        /// The bytes decoded.
        got: usize,
        /// The segment's plaintext length.
        want: u32,
    },
}

/// A v2 chunk failed a check, or could not be sealed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChunkV2Error {
    /// The header's bytes are not a valid header.
    #[error("chunk {chunk} is corrupt: its header is bad: {source}")]
    Header {
        /// The chunk at fault.
        chunk: ChunkName,
        /// What is wrong.
        source: HeaderError,
    },
    /// The header does not hash to the name it was fetched under.
    #[error("chunk {expected} is corrupt: its header hashes to {got}")]
    HeaderMismatch {
        /// The name the chunk was asked for by.
        expected: ChunkName,
        /// SHA-256 of the header that arrived.
        got: ChunkName,
    },
    /// The object is not as long as its header says.
    #[error("chunk {chunk} is corrupt: the object is {len} bytes, its header describes {want}")]
    ObjectLength {
        /// The chunk at fault.
        chunk: ChunkName,
        /// The object's length.
        len: usize,
        /// The length the header describes.
        want: u64,
    },
    /// A segment index past the chunk's last segment.
    #[error("chunk {chunk} has {count} segments, there is no segment {segment}")]
    NoSegment {
        /// The chunk asked about.
        chunk: ChunkName,
        /// The index asked for.
        segment: SegmentIndex,
        /// How many segments the chunk has.
        count: u32,
    },
    /// A sealed segment is not as long as the header says.
    #[error("chunk {chunk} segment {segment} is corrupt: {len} bytes, its header says {want}")]
    SegmentLength {
        /// The chunk at fault.
        chunk: ChunkName,
        /// The segment at fault.
        segment: SegmentIndex,
        /// Its length.
        len: usize,
        /// The length the header gives.
        want: u32,
    },
    /// A sealed segment does not hash to its row in the header.
    #[error(
        "chunk {chunk} segment {segment} is corrupt: its bytes hash to {}, not to its \
         header's row",
        hex::encode(.got)
    )]
    SegmentMismatch {
        /// The chunk at fault.
        chunk: ChunkName,
        /// The segment at fault.
        segment: SegmentIndex,
        /// SHA-256 of the bytes that arrived.
        got: [u8; 32],
    },
    /// A segment's GCM tag did not verify under the key from the manifest.
    #[error(
        "chunk {chunk} segment {segment} does not decrypt under the key the manifest holds \
         for it (wrong key table or tampered chunk)"
    )]
    Decrypt {
        /// The chunk at fault.
        chunk: ChunkName,
        /// The segment at fault.
        segment: SegmentIndex,
    },
    /// A header that checks, but describes another layout than the manifest expects.
    #[error(
        "chunk {chunk} disagrees with the manifest: its header holds {plain_len} bytes in \
         {count} segments of {segment_size}, the manifest expects {want_plain_len} bytes in \
         {want_count} segments of {want_segment_size}"
    )]
    Layout {
        /// The chunk at fault.
        chunk: ChunkName,
        /// The plaintext length its header records.
        plain_len: u32,
        /// The segment size its header records.
        segment_size: SegmentSize,
        /// The segment count its header records.
        count: u32,
        /// The plaintext length the manifest gives for it.
        want_plain_len: u64,
        /// The manifest's segment size.
        want_segment_size: SegmentSize,
        /// The segment count those imply.
        want_count: u64,
    },
    /// A header that checks against its name records another codec than the manifest
    /// that names the chunk.
    #[error("chunk {chunk} is sealed with codec {found}, but its manifest names codec {want}")]
    WrongCodec {
        /// The chunk at fault.
        chunk: ChunkName,
        /// The codec its header records.
        found: Codec,
        /// The manifest's codec.
        want: Codec,
    },
    /// A compressed segment decrypted, but its encoding does not decode to its plaintext.
    #[error("chunk {chunk} segment {segment} is corrupt: it decrypts, but {source}")]
    Decode {
        /// The chunk at fault.
        chunk: ChunkName,
        /// The segment at fault.
        segment: SegmentIndex,
        /// What is wrong with the encoding.
        source: DecodeError,
    },
    /// The buffer given for a segment's plaintext is not as long as the segment.
    #[error(
        "chunk {chunk} segment {segment} holds {want} plaintext bytes, the buffer given for \
         it is {len}"
    )]
    OutputLength {
        /// The chunk asked about.
        chunk: ChunkName,
        /// The segment asked for.
        segment: SegmentIndex,
        /// The buffer's length.
        len: usize,
        /// The segment's plaintext length.
        want: u32,
    },
    /// A plaintext that cannot be a v2 chunk.
    #[error("cannot seal a {len}-byte chunk: a v2 chunk holds 1 to {MAX_PLAIN_LEN} bytes")]
    SealLength {
        /// The plaintext's length.
        len: usize,
    },
}

impl ChunkV2Error {
    /// What is wrong, without naming the chunk: for a message that names it already
    /// (`chunk 3 (NAME) is corrupt: segment 7 hashes to …`).
    pub fn fault(&self) -> String {
        match self {
            ChunkV2Error::Header { source, .. } => format!("its header is bad: {source}"),
            ChunkV2Error::HeaderMismatch { got, .. } => format!("its header hashes to {got}"),
            ChunkV2Error::ObjectLength { len, want, .. } => {
                format!("the object is {len} bytes, its header describes {want}")
            }
            ChunkV2Error::NoSegment { segment, count, .. } => {
                format!("it has {count} segments, there is no segment {segment}")
            }
            ChunkV2Error::SegmentLength {
                segment, len, want, ..
            } => format!("segment {segment} is {len} bytes, its header says {want}"),
            ChunkV2Error::SegmentMismatch { segment, got, .. } => format!(
                "segment {segment} hashes to {}, not to its header's row",
                hex::encode(got)
            ),
            ChunkV2Error::Decrypt { segment, .. } => format!(
                "segment {segment} does not decrypt under the key the manifest holds for it"
            ),
            ChunkV2Error::Decode {
                segment, source, ..
            } => format!("segment {segment} decrypts, but {source}"),
            ChunkV2Error::Layout { .. }
            | ChunkV2Error::WrongCodec { .. }
            | ChunkV2Error::OutputLength { .. }
            | ChunkV2Error::SealLength { .. } => self.to_string(),
        }
    }
}

/// One segment's row, with its place in the object worked out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    /// Where `sealed_j` starts in the object.
    start: u64,
    sealed_len: u32,
    sha256: [u8; 32],
}

/// A parsed v2 chunk header: the segment layout and each segment's hash.
///
/// [`ChunkHeader::parse`] checks structure only; [`verify_header`] also checks the bytes
/// against the chunk's name and gives a [`CheckedHeader`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    codec: Codec,
    segment_size: SegmentSize,
    plain_len: u32,
    rows: Vec<Row>,
}

/// The fixed part of a header, checked.
struct Fixed {
    codec: Codec,
    segment_size: SegmentSize,
    plain_len: u32,
    count: u32,
}

/// Reads and checks the fixed part at the start of `bytes`, bounding the segment count
/// before anything is allocated for the rows.
fn parse_fixed(bytes: &[u8]) -> Result<Fixed, HeaderError> {
    let (raw, _) = RawFixed::ref_from_prefix(bytes).map_err(|_| HeaderError::Truncated {
        len: bytes.len(),
        need: FIXED_LEN,
    })?;
    if raw.magic != MAGIC {
        return Err(HeaderError::Magic { found: raw.magic });
    }
    if raw.version != VERSION {
        return Err(HeaderError::Version { found: raw.version });
    }
    let codec = Codec::from_byte(raw.codec).ok_or(HeaderError::Codec { found: raw.codec })?;
    if raw.reserved.get() != 0 {
        return Err(HeaderError::Reserved {
            found: raw.reserved.get(),
        });
    }
    let segment_size = SegmentSize::new(u64::from(raw.segment_size.get()))?;
    let plain_len = raw.plain_len.get();
    if plain_len == 0 || plain_len > MAX_PLAIN_LEN {
        return Err(HeaderError::PlainLen { len: plain_len });
    }
    let count = raw.count.get();
    // With 1 <= plain_len <= 64 MiB and S >= 4 KiB this bounds count by MAX_SEGMENTS.
    let want = segment_size.count_for(u64::from(plain_len));
    if u64::from(count) != want {
        return Err(HeaderError::Count {
            count,
            plain_len,
            segment_size,
            want,
        });
    }
    Ok(Fixed {
        codec,
        segment_size,
        plain_len,
        count,
    })
}

/// The plaintext length of segment `j` of a `plain_len`-byte chunk in segments of `s`;
/// 0 past the end.
fn plain_len_of(s: SegmentSize, plain_len: u32, j: u32) -> u32 {
    let start = u64::from(j) * s.bytes_u64();
    let len = u64::from(plain_len)
        .saturating_sub(start)
        .min(s.bytes_u64());
    // len <= S, a u32.
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl ChunkHeader {
    /// The length of a header's fixed part: enough to learn the segment count.
    pub const fn fixed_len() -> usize {
        FIXED_LEN
    }

    /// The length of a header listing `count` segments: `20 + 36 × count`.
    pub const fn len_for(count: usize) -> usize {
        FIXED_LEN.saturating_add(ROW_LEN.saturating_mul(count))
    }

    /// The whole header's length, from the first [`ChunkHeader::fixed_len`] bytes of an
    /// object: a reader without a manifest fetches those, then the rest.
    pub fn peek_len(bytes: &[u8]) -> Result<usize, HeaderError> {
        let f = parse_fixed(bytes)?;
        Ok(Self::len_for(u32_usize(f.count)))
    }

    /// Parses the header at the start of `bytes` (which may go on into the segments).
    /// The only parser of header bytes: it reads the fixed part, checks the segment count
    /// against the plaintext length (so it is at most [`MAX_SEGMENTS`]) and that the
    /// bytes hold every row before allocating, then checks each row's sealed length: raw
    /// for codec 0; raw or a padded compressed length that saves an eighth for codec 1.
    pub fn parse(bytes: &[u8]) -> Result<ChunkHeader, HeaderError> {
        let f = parse_fixed(bytes)?;
        let len = Self::len_for(u32_usize(f.count));
        let truncated = HeaderError::Truncated {
            len: bytes.len(),
            need: len,
        };
        let raw_rows = bytes
            .get(FIXED_LEN..len)
            .and_then(|b| <[RawRow]>::ref_from_bytes(b).ok())
            .ok_or(truncated)?;
        let mut rows = Vec::with_capacity(raw_rows.len());
        let mut start = len as u64;
        for (j, raw) in (0u32..).zip(raw_rows) {
            let plain_len = plain_len_of(f.segment_size, f.plain_len, j);
            let sealed_len = raw.sealed_len.get();
            f.codec
                .check_sealed_len(SegmentIndex(j), plain_len, sealed_len)?;
            rows.push(Row {
                start,
                sealed_len,
                sha256: raw.sha256,
            });
            start += u64::from(sealed_len);
        }
        Ok(ChunkHeader {
            codec: f.codec,
            segment_size: f.segment_size,
            plain_len: f.plain_len,
            rows,
        })
    }

    /// The header's bytes, exactly as [`ChunkHeader::parse`] read them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.header_len()];
        self.write(&mut b);
        b
    }

    /// Writes the header into `out`, which is exactly [`ChunkHeader::header_len`] bytes.
    fn write(&self, out: &mut [u8]) {
        let (fixed, rows) = out.split_at_mut(FIXED_LEN);
        let raw = RawFixed {
            magic: MAGIC,
            version: VERSION,
            codec: self.codec.byte(),
            reserved: U16::new(0),
            segment_size: U32::new(self.segment_size.bytes()),
            plain_len: U32::new(self.plain_len),
            count: U32::new(self.count()),
        };
        fixed.copy_from_slice(raw.as_bytes());
        for (row, out) in self.rows.iter().zip(rows.chunks_exact_mut(ROW_LEN)) {
            let raw = RawRow {
                sealed_len: U32::new(row.sealed_len),
                sha256: row.sha256,
            };
            out.copy_from_slice(raw.as_bytes());
        }
    }

    /// The header's length in bytes.
    pub fn header_len(&self) -> usize {
        Self::len_for(self.rows.len())
    }

    /// The whole object's length: the header and every sealed segment.
    pub fn object_len(&self) -> u64 {
        self.rows.last().map_or(self.header_len() as u64, |r| {
            r.start + u64::from(r.sealed_len)
        })
    }

    /// How segments are encoded.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The segment size.
    pub fn segment_size(&self) -> SegmentSize {
        self.segment_size
    }

    /// The chunk's plaintext length.
    pub fn plain_len(&self) -> u32 {
        self.plain_len
    }

    /// How many segments the chunk has.
    pub fn count(&self) -> u32 {
        // The parser bounds the rows by MAX_SEGMENTS, a u32.
        u32::try_from(self.rows.len()).unwrap_or(u32::MAX)
    }

    fn row(&self, j: SegmentIndex) -> Option<&Row> {
        self.rows.get(usize::try_from(j.0).ok()?)
    }

    /// The byte range of `sealed_j` in the object, or `None` past the last segment.
    pub fn segment_range(&self, j: SegmentIndex) -> Option<Range<u64>> {
        self.row(j)
            .map(|r| r.start..r.start + u64::from(r.sealed_len))
    }

    /// The plaintext length of segment `j`: the segment size, except for a short last
    /// segment; `None` past the last segment.
    pub fn segment_plain_len(&self, j: SegmentIndex) -> Option<u32> {
        self.row(j)
            .map(|_| plain_len_of(self.segment_size, self.plain_len, j.0))
    }

    /// Whether segment `j` is stored compressed: under codec 1, when its sealed length is
    /// not its raw one. `None` past the last segment.
    pub fn segment_compressed(&self, j: SegmentIndex) -> Option<bool> {
        let row = self.row(j)?;
        let plain_len = plain_len_of(self.segment_size, self.plain_len, j.0);
        Some(row.sealed_len != raw_sealed_len(plain_len))
    }

    /// The bytes of the chunk's plaintext that segment `j` holds.
    pub fn segment_plain_range(&self, j: SegmentIndex) -> Option<Range<u64>> {
        let len = self.segment_plain_len(j)?;
        let start = u64::from(j.0) * self.segment_size.bytes_u64();
        Some(start..start + u64::from(len))
    }

    /// The segment holding byte `offset` of the chunk's plaintext.
    pub fn segment_at(&self, offset: u64) -> Option<SegmentIndex> {
        if offset >= u64::from(self.plain_len) {
            return None;
        }
        u32::try_from(offset / self.segment_size.bytes_u64())
            .ok()
            .map(SegmentIndex)
    }
}

fn u32_usize(n: u32) -> usize {
    // A u32 fits usize on every target lode builds for; saturating keeps a 16-bit one from
    // wrapping (it would then refuse the lengths).
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A header whose bytes hash to the chunk's name: built only by [`verify_header`] (and
/// by sealing), so segment checks can only run against a checked header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedHeader {
    name: ChunkName,
    header: ChunkHeader,
}

impl CheckedHeader {
    /// The chunk's name.
    pub fn name(&self) -> &ChunkName {
        &self.name
    }

    /// The header.
    pub fn header(&self) -> &ChunkHeader {
        &self.header
    }

    /// Checks that the header describes the chunk the manifest expects: `plain_len` bytes
    /// (the chunk's length from the manifest's chunk and device sizes) in segments of the
    /// manifest's `segment_size`. A writer's bug could otherwise give a header that
    /// checks against its name but disagrees with the manifest that names it.
    pub fn check_layout(
        &self,
        segment_size: SegmentSize,
        plain_len: u64,
    ) -> Result<(), ChunkV2Error> {
        let h = &self.header;
        if h.segment_size == segment_size && u64::from(h.plain_len) == plain_len {
            return Ok(());
        }
        Err(ChunkV2Error::Layout {
            chunk: self.name,
            plain_len: h.plain_len,
            segment_size: h.segment_size,
            count: h.count(),
            want_plain_len: plain_len,
            want_segment_size: segment_size,
            want_count: segment_size.count_for(plain_len),
        })
    }

    /// Checks that the header's codec is the manifest's `want`.
    pub fn check_codec(&self, want: Codec) -> Result<(), ChunkV2Error> {
        if self.header.codec == want {
            return Ok(());
        }
        Err(ChunkV2Error::WrongCodec {
            chunk: self.name,
            found: self.header.codec,
            want,
        })
    }

    /// The row of segment `j`, or the error that names it.
    fn row(&self, j: SegmentIndex) -> Result<&Row, ChunkV2Error> {
        self.header.row(j).ok_or(ChunkV2Error::NoSegment {
            chunk: self.name,
            segment: j,
            count: self.header.count(),
        })
    }

    fn check_len(&self, j: SegmentIndex, row: &Row, sealed: &[u8]) -> Result<(), ChunkV2Error> {
        if sealed.len() as u64 == u64::from(row.sealed_len) {
            Ok(())
        } else {
            Err(ChunkV2Error::SegmentLength {
                chunk: self.name,
                segment: j,
                len: sealed.len(),
                want: row.sealed_len,
            })
        }
    }

    /// The plaintext length of segment `j`, or the error that names it.
    fn plain_len_checked(&self, j: SegmentIndex) -> Result<usize, ChunkV2Error> {
        self.row(j)?;
        Ok(u32_usize(plain_len_of(
            self.header.segment_size,
            self.header.plain_len,
            j.0,
        )))
    }

    /// Decodes segment `j`'s decrypted bytes into `out` (its plaintext length).
    fn decode(&self, j: SegmentIndex, opened: &[u8], out: &mut [u8]) -> Result<(), ChunkV2Error> {
        decode_into(opened, out).map_err(|source| ChunkV2Error::Decode {
            chunk: self.name,
            segment: j,
            source,
        })
    }

    fn check_hash(&self, j: SegmentIndex, row: &Row, sealed: &[u8]) -> Result<(), ChunkV2Error> {
        let got = sha256(sealed);
        if got == row.sha256 {
            Ok(())
        } else {
            Err(ChunkV2Error::SegmentMismatch {
                chunk: self.name,
                segment: j,
                got,
            })
        }
    }
}

impl Deref for CheckedHeader {
    type Target = ChunkHeader;
    fn deref(&self) -> &ChunkHeader {
        &self.header
    }
}

/// A v2 chunk after sealing: its name, its key (for the manifest's key table) and its
/// object (for the store).
#[derive(Debug)]
pub struct SealedChunkV2 {
    /// SHA-256 of the plaintext (an input to key derivation).
    pub digest: [u8; 32],
    /// SHA-256 of the header, the object's first `header_len` bytes.
    pub name: ChunkName,
    /// The key every segment is sealed under.
    pub key: ChunkKey,
    /// The header followed by the sealed segments.
    pub object: Vec<u8>,
    /// The header's length.
    pub header_len: usize,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// `HMAC-SHA256(root_salt, "lode chunk v2" ‖ u8 codec ‖ u32 LE segment size ‖ digest)`.
fn derive_key(salt: &RootSalt, codec: Codec, s: SegmentSize, digest: &[u8; 32]) -> ChunkKey {
    let mut h = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, salt.expose()));
    h.update(KEY_LABEL);
    h.update(&[codec.byte()]);
    h.update(&s.bytes().to_le_bytes());
    h.update(digest);
    let mut key = [0u8; 32];
    key.copy_from_slice(h.sign().as_ref());
    ChunkKey::from_bytes(key)
}

/// The nonce of segment `j`: `u64 LE j ‖ 4 zero bytes`. The key is unique to one
/// plaintext, codec and segment size, so each (key, nonce) pair seals exactly one segment.
fn nonce(j: SegmentIndex) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&u64::from(j.0).to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Encodes segments for sealing under one codec, reusing one buffer for the compressor.
struct Encoder {
    codec: Codec,
    /// lz4's output for one segment; room for the worst case of a whole segment.
    scratch: Vec<u8>,
}

impl Encoder {
    fn new(codec: Codec, s: SegmentSize) -> Encoder {
        let scratch = match codec {
            Codec::None => Vec::new(),
            Codec::Lz4 => vec![0; lz4_flex::block::get_maximum_output_size(s.bytes_usize())],
        };
        Encoder { codec, scratch }
    }

    /// Appends `segment`'s encoding to `out`: the segment itself, or under codec 1 its
    /// compressed length, lz4 block and zero padding when that saves at least an eighth.
    fn encode(&mut self, segment: &[u8], out: &mut Vec<u8>) {
        match self.compressed(segment) {
            Some((len, padded)) => {
                let start = out.len();
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&self.scratch[..u32_usize(len)]);
                out.resize(start + padded, 0);
            }
            None => out.extend_from_slice(segment),
        }
    }

    /// Compresses `segment` into the scratch buffer; its compressed length and padded
    /// encoding length when the encoding is to be kept, `None` to store it raw.
    fn compressed(&mut self, segment: &[u8]) -> Option<(u32, usize)> {
        if self.codec != Codec::Lz4 {
            return None;
        }
        let plain_len = u32::try_from(segment.len()).ok()?;
        // The scratch holds lz4's worst case for a whole segment, so this cannot fail;
        // were it to, storing the segment raw is still a valid encoding.
        let n = lz4_flex::block::compress_into(segment, &mut self.scratch).ok()?;
        let padded = (LEN_PREFIX + n).next_multiple_of(u32_usize(LZ4_PAD));
        if padded > u32_usize(lz4_limit(plain_len)) {
            return None;
        }
        Some((u32::try_from(n).ok()?, padded))
    }
}

/// Decodes a segment's decrypted bytes into `out`, exactly the segment's plaintext
/// length: a copy when they are raw (as long as `out`), else the compressed encoding.
/// Writes nothing past `out` and allocates nothing, whatever the bytes say.
fn decode_into(opened: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    if opened.len() == out.len() {
        out.copy_from_slice(opened);
        return Ok(());
    }
    let want = u32::try_from(out.len()).unwrap_or(u32::MAX);
    let (len, rest) = opened
        .split_first_chunk::<LEN_PREFIX>()
        .ok_or(DecodeError::Short { len: opened.len() })?;
    let len = u32::from_le_bytes(*len);
    let (compressed, padding) =
        rest.split_at_checked(u32_usize(len))
            .ok_or(DecodeError::CompressedLen {
                len,
                room: rest.len(),
            })?;
    // The header allows only multiples of 1 KiB; the smallest that holds the compressed
    // bytes is the one a writer makes, so each plaintext has one encoding.
    if (LEN_PREFIX + compressed.len()).next_multiple_of(u32_usize(LZ4_PAD)) != opened.len() {
        return Err(DecodeError::Padded {
            len,
            encoded: opened.len(),
        });
    }
    if let Some(i) = padding.iter().position(|&b| b != 0) {
        return Err(DecodeError::Padding {
            offset: LEN_PREFIX + compressed.len() + i,
            value: padding[i],
        });
    }
    let got = lz4_flex::block::decompress_into(compressed, out).map_err(|e| DecodeError::Lz4 {
        reason: e.to_string(),
        want,
    })?;
    if got != out.len() {
        return Err(DecodeError::PlainLen { got, want });
    }
    Ok(())
}

/// Seals `plaintext` as a v2 chunk in segments of `segment_size`, each encoded by
/// `codec`: [`Codec::None`] seals every segment as it is; [`Codec::Lz4`] compresses each
/// and keeps the compressed form only when, padded, it saves at least an eighth.
///
/// The plaintext must be 1 to 64 MiB; as for v1, the caller leaves out all-zero chunks,
/// which are never sealed.
pub fn seal_chunk_v2(
    salt: &RootSalt,
    plaintext: &[u8],
    segment_size: SegmentSize,
    codec: Codec,
) -> Result<SealedChunkV2, ChunkV2Error> {
    let plain_len = u32::try_from(plaintext.len())
        .ok()
        .filter(|&n| (1..=MAX_PLAIN_LEN).contains(&n))
        .ok_or(ChunkV2Error::SealLength {
            len: plaintext.len(),
        })?;
    let count = u32_usize(plain_len.div_ceil(segment_size.bytes()));
    let header_len = ChunkHeader::len_for(count);
    let digest = sha256(plaintext);
    let key = derive_key(salt, codec, segment_size, &digest);
    let aead = aead_key(&key);
    let mut encoder = Encoder::new(codec, segment_size);

    // The most the object can be: every segment raw.
    let mut object = Vec::with_capacity(header_len + plaintext.len() + count * TAG_LEN);
    object.resize(header_len, 0);
    let mut rows = Vec::with_capacity(count);
    for (j, segment) in (0u32..).zip(plaintext.chunks(segment_size.bytes_usize())) {
        let start = object.len();
        encoder.encode(segment, &mut object);
        let tag = aead
            .seal_in_place_separate_tag(nonce(SegmentIndex(j)), Aad::empty(), &mut object[start..])
            // ring fails only for inputs over ~64 GiB; segments are at most 64 MiB.
            .expect("segment within AES-GCM's length limit");
        object.extend_from_slice(tag.as_ref());
        let sealed = &object[start..];
        rows.push(Row {
            start: start as u64,
            sealed_len: u32::try_from(sealed.len())
                .expect("a sealed segment is at most its plaintext and a tag, under 4 GiB"),
            sha256: sha256(sealed),
        });
    }
    let header = ChunkHeader {
        codec,
        segment_size,
        plain_len,
        rows,
    };
    header.write(&mut object[..header_len]);
    Ok(SealedChunkV2 {
        digest,
        name: ChunkName::of(&object[..header_len]),
        key,
        object,
        header_len,
    })
}

/// Checks the header at the start of `bytes` (the header alone, or the object or any
/// prefix of it holding the header) against the chunk's `name`, then parses it. Needs no
/// key: any store, cache or peer can check a header.
pub fn verify_header(name: &ChunkName, bytes: &[u8]) -> Result<CheckedHeader, ChunkV2Error> {
    let bad = |source| ChunkV2Error::Header {
        chunk: *name,
        source,
    };
    // The fixed part gives the header's length; the hash is checked before the rows are
    // read, so bytes that are not this chunk's header are refused by their hash.
    let len = ChunkHeader::peek_len(bytes).map_err(bad)?;
    let header_bytes = bytes.get(..len).ok_or(bad(HeaderError::Truncated {
        len: bytes.len(),
        need: len,
    }))?;
    let got = ChunkName::of(header_bytes);
    if &got != name {
        return Err(ChunkV2Error::HeaderMismatch {
            expected: *name,
            got,
        });
    }
    let header = ChunkHeader::parse(header_bytes).map_err(bad)?;
    Ok(CheckedHeader {
        name: *name,
        header,
    })
}

/// Checks that `sealed` is segment `j` of the chunk: its length and its SHA-256 are the
/// header's row `j`. Needs no key.
pub fn verify_segment(
    header: &CheckedHeader,
    j: SegmentIndex,
    sealed: &[u8],
) -> Result<(), ChunkV2Error> {
    let row = header.row(j)?;
    header.check_len(j, row, sealed)?;
    header.check_hash(j, row, sealed)
}

/// Checks segment `j` against the header, then decrypts and decodes it with the chunk's
/// `key` into a new buffer of its plaintext length. Allocates the sealed length and, for
/// a compressed segment, the plaintext length; nothing that the bytes choose.
pub fn open_segment(
    header: &CheckedHeader,
    key: &ChunkKey,
    j: SegmentIndex,
    sealed: &[u8],
) -> Result<Vec<u8>, ChunkV2Error> {
    verify_segment(header, j, sealed)?;
    let mut buf = sealed.to_vec();
    let opened = match open_segment_unverified(header, key, j, &mut buf)? {
        Cow::Borrowed(plain) => plain.len(),
        Cow::Owned(plain) => return Ok(plain),
    };
    buf.truncate(opened);
    Ok(buf)
}

/// Checks segment `j` against the header, then decrypts it in place. A raw segment (every
/// segment under codec 0) is decoded where it lies: the plaintext is the front of
/// `sealed`, borrowed. A compressed one (codec 1) decodes to more bytes than `sealed`
/// holds, so its plaintext comes back in a new buffer of its length, owned; to decode
/// into a buffer of the caller's instead, see [`open_segment_into`].
pub fn open_segment_in_place<'a>(
    header: &CheckedHeader,
    key: &ChunkKey,
    j: SegmentIndex,
    sealed: &'a mut [u8],
) -> Result<Cow<'a, [u8]>, ChunkV2Error> {
    verify_segment(header, j, sealed)?;
    open_segment_unverified(header, key, j, sealed)
}

/// Checks segment `j` against the header, then decrypts it in place in `sealed` (left
/// holding no plaintext a caller should use) and decodes it into `out`, which must be
/// exactly the segment's plaintext length ([`ChunkHeader::segment_plain_len`]). Allocates
/// nothing: for a reader that fills its own chunk buffer, under either codec.
pub fn open_segment_into(
    header: &CheckedHeader,
    key: &ChunkKey,
    j: SegmentIndex,
    sealed: &mut [u8],
    out: &mut [u8],
) -> Result<(), ChunkV2Error> {
    verify_segment(header, j, sealed)?;
    open_unverified_into(header, &aead_key(key), j, sealed, out)
}

/// Decrypts segment `j` in place without checking its hash, then decodes it as
/// [`open_segment_in_place`] does: for bytes a worker read back from its own disk, which
/// were checked when they arrived. GCM alone authenticates them: the key is unique to the
/// chunk's plaintext (and codec and segment size) and the nonce is the segment's index,
/// so bytes of any other chunk, or of another segment of this one, or altered, fail the
/// tag. GCM does not stop a holder of the key from forging a segment, which is why bytes
/// from outside the worker go through [`open_segment`].
pub fn open_segment_unverified<'a>(
    header: &CheckedHeader,
    key: &ChunkKey,
    j: SegmentIndex,
    sealed: &'a mut [u8],
) -> Result<Cow<'a, [u8]>, ChunkV2Error> {
    let plain_len = header.plain_len_checked(j)?;
    let opened = decrypt(header, &aead_key(key), j, sealed)?;
    if opened.len() == plain_len {
        return Ok(Cow::Borrowed(opened));
    }
    let mut out = vec![0; plain_len];
    header.decode(j, opened, &mut out)?;
    Ok(Cow::Owned(out))
}

/// [`open_segment_into`] without the hash check, under a key already expanded.
pub(crate) fn open_unverified_into(
    header: &CheckedHeader,
    aead: &LessSafeKey,
    j: SegmentIndex,
    sealed: &mut [u8],
    out: &mut [u8],
) -> Result<(), ChunkV2Error> {
    let plain_len = header.plain_len_checked(j)?;
    if out.len() != plain_len {
        return Err(ChunkV2Error::OutputLength {
            chunk: header.name,
            segment: j,
            len: out.len(),
            want: u32::try_from(plain_len).unwrap_or(u32::MAX),
        });
    }
    let opened = decrypt(header, aead, j, sealed)?;
    header.decode(j, opened, out)
}

/// Checks `sealed`'s length against row `j` and decrypts it in place; returns the
/// encoding, the front of `sealed`.
fn decrypt<'a>(
    header: &CheckedHeader,
    aead: &LessSafeKey,
    j: SegmentIndex,
    sealed: &'a mut [u8],
) -> Result<&'a mut [u8], ChunkV2Error> {
    let row = header.row(j)?;
    header.check_len(j, row, sealed)?;
    aead.open_in_place(nonce(j), Aad::empty(), sealed)
        .map_err(|_| ChunkV2Error::Decrypt {
            chunk: header.name,
            segment: j,
        })
}

/// Checks a whole v2 object against `name` with no key: its header, its length, and every
/// segment against its row. What a store or cache does before keeping an object.
pub fn verify_object_v2(name: &ChunkName, object: &[u8]) -> Result<CheckedHeader, ChunkV2Error> {
    let header = verify_header(name, object)?;
    let wrong_length = || ChunkV2Error::ObjectLength {
        chunk: *name,
        len: object.len(),
        want: header.object_len(),
    };
    if object.len() as u64 != header.object_len() {
        return Err(wrong_length());
    }
    for (j, row) in (0u32..).map(SegmentIndex).zip(&header.header.rows) {
        let start = usize::try_from(row.start).map_err(|_| wrong_length())?;
        let end = start
            .checked_add(u32_usize(row.sealed_len))
            .ok_or_else(wrong_length)?;
        let sealed = object.get(start..end).ok_or_else(wrong_length)?;
        header.check_hash(j, row, sealed)?;
    }
    Ok(header)
}

/// Checks a whole v2 object against `name` (header, length, every segment) and decrypts
/// and decodes it with `key`. Allocates the plaintext (and a tag) and, under codec 1, one
/// segment's sealed length besides.
pub fn open_chunk_v2(
    name: &ChunkName,
    key: &ChunkKey,
    object: &[u8],
) -> Result<Vec<u8>, ChunkV2Error> {
    let header = verify_header(name, object)?;
    if object.len() as u64 != header.object_len() {
        return Err(ChunkV2Error::ObjectLength {
            chunk: *name,
            len: object.len(),
            want: header.object_len(),
        });
    }
    let aead = aead_key(key);
    let mut out = Vec::with_capacity(u32_usize(header.plain_len) + TAG_LEN);
    let mut scratch = Vec::new();
    for (j, row) in (0u32..).map(SegmentIndex).zip(&header.rows) {
        // The length check above keeps every row's range inside the object.
        let range = usize::try_from(row.start).unwrap_or(usize::MAX)
            ..usize::try_from(row.start + u64::from(row.sealed_len)).unwrap_or(usize::MAX);
        let sealed = object.get(range).ok_or(ChunkV2Error::ObjectLength {
            chunk: *name,
            len: object.len(),
            want: header.object_len(),
        })?;
        header.check_hash(j, row, sealed)?;
        let start = out.len();
        let segment_len = plain_len_of(header.segment_size, header.plain_len, j.0);
        let plain_len = u32_usize(segment_len);
        if row.sealed_len == raw_sealed_len(segment_len) {
            // Raw: decrypted where it lands, its tag then cut off.
            out.extend_from_slice(sealed);
            decrypt(&header, &aead, j, &mut out[start..])?;
            out.truncate(start + plain_len);
        } else {
            scratch.clear();
            scratch.extend_from_slice(sealed);
            let opened = decrypt(&header, &aead, j, &mut scratch)?;
            out.resize(start + plain_len, 0);
            header.decode(j, opened, &mut out[start..])?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::seal_chunk;
    use crate::manifest::ChunkFormat;

    const S4K: u32 = 4096;
    const S32K: u32 = 32768;

    fn salt() -> RootSalt {
        RootSalt::from_bytes([0x11; 32])
    }

    /// A range of object or plaintext offsets as a range of slice indexes.
    fn span(r: &Range<u64>) -> Range<usize> {
        usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap()
    }

    fn seg(bytes: u32) -> SegmentSize {
        SegmentSize::new(u64::from(bytes)).unwrap()
    }

    /// Bytes that differ from segment to segment, so a swapped segment would show.
    fn plain(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11).to_le_bytes()[0] | 1)
            .collect()
    }

    fn seal(len: usize, s: u32) -> (Vec<u8>, SealedChunkV2) {
        let p = plain(len);
        let sealed = seal_chunk_v2(&salt(), &p, seg(s), Codec::None).unwrap();
        (p, sealed)
    }

    /// Rewrites a header field and renames the chunk, so the check reaches the parser.
    fn renamed(object: &[u8], header_len: usize) -> ChunkName {
        ChunkName::of(&object[..header_len])
    }

    #[test]
    fn seal_then_open_at_every_boundary() {
        for s in [S4K, S32K] {
            let su = s as usize;
            for len in [
                1,
                su - 1,
                su,
                su + 1,
                3 * su + 123,
                512 * 1024,
                512 * 1024 - 5,
            ] {
                let (p, c) = seal(len, s);
                let n = len.div_ceil(su);
                assert_eq!(c.header_len, 20 + 36 * n, "len {len} S {s}");
                assert_eq!(c.object.len(), c.header_len + len + 16 * n);
                assert_eq!(c.name, ChunkName::of(&c.object[..c.header_len]));
                assert_eq!(c.digest, sha256(&p));
                assert_eq!(open_chunk_v2(&c.name, &c.key, &c.object).unwrap(), p);

                let h = verify_header(&c.name, &c.object).unwrap();
                assert_eq!(h.count() as usize, n);
                assert_eq!(h.plain_len() as usize, len);
                assert_eq!(h.segment_size(), seg(s));
                assert_eq!(h.codec(), Codec::None);
                assert_eq!(h.header_len(), c.header_len);
                assert_eq!(h.object_len(), c.object.len() as u64);
                assert_eq!(h.to_bytes(), &c.object[..c.header_len]);
                h.check_layout(seg(s), len as u64).unwrap();
                // The header alone checks as well as the whole object.
                assert_eq!(
                    verify_header(&c.name, &c.object[..c.header_len]).unwrap(),
                    h
                );

                for j in (0..h.count()).map(SegmentIndex) {
                    let r = h.segment_range(j).unwrap();
                    let sealed = &c.object[span(&r)];
                    let pr = h.segment_plain_range(j).unwrap();
                    let want = &p[span(&pr)];
                    assert_eq!(want.len(), h.segment_plain_len(j).unwrap() as usize);
                    assert_eq!(h.segment_at(pr.start), Some(j));
                    assert_eq!(h.segment_at(pr.end - 1), Some(j));
                    verify_segment(&h, j, sealed).unwrap();
                    assert_eq!(open_segment(&h, &c.key, j, sealed).unwrap(), want);
                    let mut buf = sealed.to_vec();
                    assert_eq!(
                        open_segment_in_place(&h, &c.key, j, &mut buf).unwrap(),
                        want
                    );
                    let mut buf = sealed.to_vec();
                    assert_eq!(
                        open_segment_unverified(&h, &c.key, j, &mut buf).unwrap(),
                        want
                    );
                }
                let last = h.count() - 1;
                let short = len % su;
                assert_eq!(
                    h.segment_plain_len(SegmentIndex(last)).unwrap() as usize,
                    if short == 0 { su } else { short }
                );
                assert_eq!(h.segment_range(SegmentIndex(h.count())), None);
                assert_eq!(h.segment_plain_len(SegmentIndex(h.count())), None);
                assert_eq!(h.segment_at(len as u64), None);
            }
        }
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let (p, c) = seal(S4K as usize + 10, S4K);
        let o = &c.object;
        assert_eq!(&o[..4], b"LDC2");
        assert_eq!(o[4], 2);
        assert_eq!(o[5], 0);
        assert_eq!(&o[6..8], &[0, 0]);
        assert_eq!(&o[8..12], &4096u32.to_le_bytes());
        assert_eq!(&o[12..16], &4106u32.to_le_bytes());
        assert_eq!(&o[16..20], &2u32.to_le_bytes());
        assert_eq!(&o[20..24], &4112u32.to_le_bytes());
        assert_eq!(&o[56..60], &26u32.to_le_bytes());
        let seg0 = &o[92..92 + 4112];
        let seg1 = &o[92 + 4112..];
        assert_eq!(&o[24..56], &sha256(seg0));
        assert_eq!(&o[60..92], &sha256(seg1));
        // The key and nonces, derived by hand.
        let mut msg = b"lode chunk v2".to_vec();
        msg.push(0);
        msg.extend_from_slice(&4096u32.to_le_bytes());
        msg.extend_from_slice(&sha256(&p));
        let k = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt().expose()), &msg);
        assert_eq!(c.key.expose()[..], *k.as_ref());
        let mut n1 = [0u8; 12];
        n1[0] = 1;
        let mut buf = seg1.to_vec();
        let plain = aead_key(&c.key)
            .open_in_place(Nonce::assume_unique_for_key(n1), Aad::empty(), &mut buf)
            .unwrap();
        assert_eq!(plain, &p[4096..]);
    }

    #[test]
    fn convergent_and_bound_to_salt_segment_size_and_format() {
        let p = plain(100_000);
        let a = seal_chunk_v2(&salt(), &p, seg(S32K), Codec::None).unwrap();
        let b = seal_chunk_v2(&salt(), &p, seg(S32K), Codec::None).unwrap();
        assert_eq!(a.name, b.name);
        assert_eq!(a.object, b.object);
        assert_eq!(a.key, b.key);
        let other_salt = seal_chunk_v2(
            &RootSalt::from_bytes([0x22; 32]),
            &p,
            seg(S32K),
            Codec::None,
        )
        .unwrap();
        assert_ne!(a.name, other_salt.name);
        assert_ne!(a.key, other_salt.key);
        let other_s = seal_chunk_v2(&salt(), &p, seg(S4K), Codec::None).unwrap();
        assert_ne!(a.name, other_s.name);
        assert_ne!(a.key, other_s.key);
        // Another segment size gives another key, so the first segments (both under
        // nonce 0) are not the same message under one key and nonce.
        assert_ne!(
            a.object[a.header_len..a.header_len + 16],
            other_s.object[other_s.header_len..other_s.header_len + 16]
        );
        let v1 = seal_chunk(&salt(), &p);
        assert_ne!(v1.key, a.key);
        assert_ne!(v1.name, a.name);
        assert_eq!(v1.digest, a.digest);
    }

    #[test]
    fn lengths_that_cannot_be_sealed() {
        let err = seal_chunk_v2(&salt(), &[], seg(S4K), Codec::None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot seal a 0-byte chunk: a v2 chunk holds 1 to 67108864 bytes"
        );
        let big = vec![0u8; (64 << 20) + 1];
        assert_eq!(
            seal_chunk_v2(&salt(), &big, seg(S4K), Codec::None).unwrap_err(),
            ChunkV2Error::SealLength { len: big.len() }
        );
    }

    #[test]
    fn a_wrong_length_object_is_refused_by_name() {
        let (_, c) = seal(3 * S4K as usize + 7, S4K);
        let mut longer = c.object.clone();
        longer.push(0);
        let err = open_chunk_v2(&c.name, &c.key, &longer).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "chunk {} is corrupt: the object is {} bytes, its header describes {}",
                c.name,
                longer.len(),
                c.object.len()
            )
        );
        let shorter = &c.object[..c.object.len() - 1];
        assert!(matches!(
            open_chunk_v2(&c.name, &c.key, shorter),
            Err(ChunkV2Error::ObjectLength { .. })
        ));
        // Cut inside the header: the header itself is truncated.
        for cut in [0, 19, 20, c.header_len - 1] {
            let err = open_chunk_v2(&c.name, &c.key, &c.object[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    ChunkV2Error::Header {
                        source: HeaderError::Truncated { .. },
                        ..
                    }
                ),
                "cut at {cut}: {err}"
            );
        }
        let err = verify_header(&c.name, &c.object[..c.header_len - 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "chunk {} is corrupt: its header is bad: {} bytes is shorter than the {}-byte \
                 header",
                c.name,
                c.header_len - 1,
                c.header_len
            )
        );
    }

    #[test]
    fn a_header_that_fails_its_hash_is_refused() {
        let (_, c) = seal(2 * S4K as usize, S4K);
        for i in [20, 24, 55, c.header_len - 1] {
            let mut bad = c.object.clone();
            bad[i] ^= 1;
            let err = open_chunk_v2(&c.name, &c.key, &bad).unwrap_err();
            let got = ChunkName::of(&bad[..c.header_len]);
            assert_eq!(
                err,
                ChunkV2Error::HeaderMismatch {
                    expected: c.name,
                    got
                }
            );
            assert_eq!(
                err.to_string(),
                format!("chunk {} is corrupt: its header hashes to {got}", c.name)
            );
        }
    }

    /// Each structural fault, with the chunk renamed after the change so that only the
    /// parser stands in the way.
    #[test]
    fn each_bad_field_is_named() {
        let (_, c) = seal(S4K as usize + 1, S4K);
        let h = c.header_len;
        let cases: Vec<(usize, Vec<u8>, HeaderError, &str)> = vec![
            (
                0,
                b"LDC1".to_vec(),
                HeaderError::Magic { found: *b"LDC1" },
                "bad magic 4c444331 (not a v2 chunk)",
            ),
            (
                4,
                vec![3],
                HeaderError::Version { found: 3 },
                "chunk format version 3, this lode reads 2",
            ),
            (
                5,
                vec![2],
                HeaderError::Codec { found: 2 },
                "unknown codec 2",
            ),
            (
                6,
                vec![0, 1],
                HeaderError::Reserved { found: 0x100 },
                "reserved field is 0x0100, not 0",
            ),
            (
                8,
                12288u32.to_le_bytes().to_vec(),
                HeaderError::SegmentSize(InvalidSegmentSize(12288)),
                "segment size 12288 is not a power of two between 4096 and 67108864 bytes",
            ),
            (
                8,
                8192u32.to_le_bytes().to_vec(),
                HeaderError::Count {
                    count: 2,
                    plain_len: 4097,
                    segment_size: seg(8192),
                    want: 1,
                },
                "segment count 2 does not cover 4097 bytes in 8192-byte segments (want 1)",
            ),
            (
                12,
                0u32.to_le_bytes().to_vec(),
                HeaderError::PlainLen { len: 0 },
                "plaintext length 0 is not 1 to 67108864 bytes",
            ),
            (
                12,
                ((64u32 << 20) + 1).to_le_bytes().to_vec(),
                HeaderError::PlainLen {
                    len: (64 << 20) + 1,
                },
                "plaintext length 67108865 is not 1 to 67108864 bytes",
            ),
            (
                16,
                3u32.to_le_bytes().to_vec(),
                HeaderError::Count {
                    count: 3,
                    plain_len: 4097,
                    segment_size: seg(4096),
                    want: 2,
                },
                "segment count 3 does not cover 4097 bytes in 4096-byte segments (want 2)",
            ),
            (
                56,
                18u32.to_le_bytes().to_vec(),
                HeaderError::SealedLen {
                    segment: SegmentIndex(1),
                    len: 18,
                    plain_len: 1,
                    want: 17,
                },
                "segment 1 is listed as 18 sealed bytes, its 1-byte plaintext seals to 17",
            ),
        ];
        for (at, bytes, want, message) in cases {
            let mut bad = c.object.clone();
            bad[at..at + bytes.len()].copy_from_slice(&bytes);
            assert_eq!(ChunkHeader::parse(&bad).unwrap_err(), want, "{message}");
            assert_eq!(want.to_string(), message);
            let name = renamed(&bad, h);
            let err = verify_header(&name, &bad).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("chunk {name} is corrupt: its header is bad: {message}")
            );
            assert!(open_chunk_v2(&name, &c.key, &bad).is_err());
        }
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        // 64 MiB in 4 KiB segments: the most rows a header can have, claimed by 20 bytes.
        let mut fixed = Vec::new();
        fixed.extend_from_slice(b"LDC2\x02\x00\x00\x00");
        fixed.extend_from_slice(&4096u32.to_le_bytes());
        fixed.extend_from_slice(&(64u32 << 20).to_le_bytes());
        fixed.extend_from_slice(&16384u32.to_le_bytes());
        assert_eq!(ChunkHeader::peek_len(&fixed).unwrap(), 20 + 36 * 16384);
        assert_eq!(
            ChunkHeader::parse(&fixed).unwrap_err(),
            HeaderError::Truncated {
                len: 20,
                need: 20 + 36 * 16384
            }
        );
        // One more row than the length allows is a count error, whatever follows.
        fixed[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ChunkHeader::peek_len(&fixed),
            Err(HeaderError::Count { want: 16384, .. })
        ));
        assert_eq!(MAX_SEGMENTS, 16384);
    }

    #[test]
    fn a_bad_segment_is_named_by_hash_and_by_tag() {
        let (_, c) = seal(3 * S4K as usize, S4K);
        let h = verify_header(&c.name, &c.object).unwrap();
        let j = SegmentIndex(1);
        let r = h.segment_range(j).unwrap();
        let mut bad = c.object.clone();
        bad[span(&r).start + 7] ^= 0x80;
        let sealed = &bad[span(&r)];
        let err = open_chunk_v2(&c.name, &c.key, &bad).unwrap_err();
        assert_eq!(
            err,
            ChunkV2Error::SegmentMismatch {
                chunk: c.name,
                segment: j,
                got: sha256(sealed)
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "chunk {} segment 1 is corrupt: its bytes hash to {}, not to its header's row",
                c.name,
                hex::encode(sha256(sealed))
            )
        );
        assert_eq!(verify_segment(&h, j, sealed).unwrap_err(), err);
        assert_eq!(open_segment(&h, &c.key, j, sealed).unwrap_err(), err);
        // Past the hash (bytes from the worker's own disk), the tag still refuses them.
        let mut buf = sealed.to_vec();
        let err = open_segment_unverified(&h, &c.key, j, &mut buf).unwrap_err();
        assert_eq!(
            err,
            ChunkV2Error::Decrypt {
                chunk: c.name,
                segment: j
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "chunk {} segment 1 does not decrypt under the key the manifest holds for it \
                 (wrong key table or tampered chunk)",
                c.name
            )
        );
    }

    #[test]
    fn gcm_alone_refuses_another_position_another_chunk_and_a_wrong_key() {
        let (_, c) = seal(3 * S4K as usize, S4K);
        let h = verify_header(&c.name, &c.object).unwrap();
        let at = |j: u32| {
            let r = h.segment_range(SegmentIndex(j)).unwrap();
            c.object[span(&r)].to_vec()
        };
        // Segment 0's bytes offered as segment 2: same length, other nonce.
        let mut buf = at(0);
        assert_eq!(
            open_segment_unverified(&h, &c.key, SegmentIndex(2), &mut buf).unwrap_err(),
            ChunkV2Error::Decrypt {
                chunk: c.name,
                segment: SegmentIndex(2)
            }
        );
        // The same position of another chunk: other key.
        let other = seal_chunk_v2(&salt(), &[7u8; 3 * 4096], seg(S4K), Codec::None).unwrap();
        let mut buf = other.object[other.header_len..other.header_len + 4112].to_vec();
        assert!(matches!(
            open_segment_unverified(&h, &c.key, SegmentIndex(0), &mut buf),
            Err(ChunkV2Error::Decrypt { .. })
        ));
        // A wrong key, through the checked path.
        let err = open_chunk_v2(&c.name, &ChunkKey::from_bytes([0; 32]), &c.object).unwrap_err();
        assert_eq!(
            err,
            ChunkV2Error::Decrypt {
                chunk: c.name,
                segment: SegmentIndex(0)
            }
        );
    }

    #[test]
    fn segment_lengths_and_indexes_are_checked() {
        let (_, c) = seal(S4K as usize + 100, S4K);
        let h = verify_header(&c.name, &c.object).unwrap();
        let r = h.segment_range(SegmentIndex(1)).unwrap();
        let sealed = &c.object[span(&r)];
        let err = verify_segment(&h, SegmentIndex(1), &sealed[1..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "chunk {} segment 1 is corrupt: 115 bytes, its header says 116",
                c.name
            )
        );
        let mut buf = sealed[..100].to_vec();
        assert!(matches!(
            open_segment_unverified(&h, &c.key, SegmentIndex(1), &mut buf),
            Err(ChunkV2Error::SegmentLength { .. })
        ));
        let err = open_segment(&h, &c.key, SegmentIndex(2), sealed).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("chunk {} has 2 segments, there is no segment 2", c.name)
        );
    }

    #[test]
    fn a_header_that_disagrees_with_the_manifest_is_named() {
        let (_, c) = seal(100_000, S32K);
        let h = verify_header(&c.name, &c.object).unwrap();
        h.check_layout(seg(S32K), 100_000).unwrap();
        let err = h.check_layout(seg(S4K), 100_000).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "chunk {} disagrees with the manifest: its header holds 100000 bytes in 4 \
                 segments of 32768, the manifest expects 100000 bytes in 25 segments of 4096",
                c.name
            )
        );
        assert!(matches!(
            h.check_layout(seg(S32K), 524_288),
            Err(ChunkV2Error::Layout { want_count: 16, .. })
        ));
    }

    // ---- codec 1: lz4, padded ------------------------------------------------------

    const S16K: u32 = 16384;

    /// Text that lz4 compresses well.
    fn text(len: usize) -> Vec<u8> {
        b"lode chunk v2, codec 1: a segment of text that compresses. "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    /// Bytes that do not compress: SHA-256 in counter mode.
    fn noise(len: usize, seed: u8) -> Vec<u8> {
        (0u32..)
            .flat_map(|i| {
                let mut block = vec![seed];
                block.extend_from_slice(&i.to_le_bytes());
                sha256(&block)
            })
            .take(len)
            .collect()
    }

    fn seal_lz4(p: &[u8], s: u32) -> SealedChunkV2 {
        seal_chunk_v2(&salt(), p, seg(s), Codec::Lz4).unwrap()
    }

    /// Opens every segment of `c` in every way there is and checks each against `p`;
    /// returns which segments are compressed.
    fn open_every_way(p: &[u8], c: &SealedChunkV2) -> Vec<bool> {
        assert_eq!(open_chunk_v2(&c.name, &c.key, &c.object).unwrap(), p);
        let h = verify_object_v2(&c.name, &c.object).unwrap();
        assert_eq!(h.object_len(), c.object.len() as u64);
        let mut compressed = Vec::new();
        for j in (0..h.count()).map(SegmentIndex) {
            let sealed = &c.object[span(&h.segment_range(j).unwrap())];
            let want = &p[span(&h.segment_plain_range(j).unwrap())];
            let is_compressed = h.segment_compressed(j).unwrap();
            compressed.push(is_compressed);
            assert_eq!(open_segment(&h, &c.key, j, sealed).unwrap(), want);
            let mut buf = sealed.to_vec();
            let got = open_segment_in_place(&h, &c.key, j, &mut buf).unwrap();
            assert_eq!(got, want);
            // In place when raw; a buffer of its own when compressed.
            assert_eq!(matches!(got, Cow::Owned(_)), is_compressed, "segment {j}");
            let mut buf = sealed.to_vec();
            assert_eq!(
                open_segment_unverified(&h, &c.key, j, &mut buf).unwrap(),
                want
            );
            let mut buf = sealed.to_vec();
            let mut out = vec![0xee; want.len()];
            open_segment_into(&h, &c.key, j, &mut buf, &mut out).unwrap();
            assert_eq!(out, want);
        }
        compressed
    }

    #[test]
    fn lz4_round_trips_text_noise_mixed_and_short_last_segments() {
        // Text: every segment compressed, a short last one too when it is long enough.
        let p = text(3 * S16K as usize + 5000);
        let c = seal_lz4(&p, S16K);
        assert_eq!(open_every_way(&p, &c), [true, true, true, true]);
        assert_eq!(c.object.len(), c.header_len + 4 * (1024 + 16));
        // Noise: every segment raw, the object exactly the codec-0 layout's length.
        let p = noise(2 * S16K as usize + 100, 1);
        let c = seal_lz4(&p, S16K);
        assert_eq!(open_every_way(&p, &c), [false, false, false]);
        assert_eq!(
            c.object.len() as u64,
            ChunkFormat::RECOMMENDED.object_len(p.len())
        );
        // Mixed, in 4 KiB segments: text, noise, half of each (3 KiB, within the 3584
        // bytes allowed), and a last segment too short to compress (900 − 900/8 = 788
        // bytes, less than one KiB of padding).
        let mut p = text(4096);
        p.extend(noise(4096, 2));
        p.extend(text(2048));
        p.extend(noise(2048, 3));
        p.extend(text(900));
        let c = seal_lz4(&p, S4K);
        assert_eq!(open_every_way(&p, &c), [true, false, true, false]);
        let h = verify_header(&c.name, &c.object).unwrap();
        assert_eq!(h.codec(), Codec::Lz4);
        assert_eq!(c.object[5], 1);
        let sealed: Vec<u32> = h.rows.iter().map(|r| r.sealed_len).collect();
        assert_eq!(sealed, [1024 + 16, 4096 + 16, 3072 + 16, 900 + 16]);
        // The whole-object paths of lode-format's callers.
        let format = ChunkFormat::V2 {
            segment_size: seg(S4K),
            codec: Codec::Lz4,
        };
        assert_eq!(format.open(&c.name, &c.key, c.object.clone()).unwrap(), p);
        assert_eq!(
            format
                .open_checked(&c.name, &c.key, c.object.clone())
                .unwrap(),
            p
        );
        // A one-byte chunk.
        let c = seal_lz4(b"x", S4K);
        assert_eq!(open_every_way(b"x", &c), [false]);
    }

    #[test]
    fn lz4_is_convergent_and_bound_to_its_codec() {
        let p = text(100_000);
        let a = seal_lz4(&p, S16K);
        let b = seal_lz4(&p, S16K);
        assert_eq!((a.name, &a.object, &a.key), (b.name, &b.object, &b.key));
        let none = seal_chunk_v2(&salt(), &p, seg(S16K), Codec::None).unwrap();
        assert_eq!(none.digest, a.digest);
        assert_ne!(none.key, a.key);
        assert_ne!(none.name, a.name);
        // Noise seals raw under either codec, but the key still differs, so the two
        // objects never share a (key, nonce) pair.
        let p = noise(5000, 4);
        let (a, none) = (
            seal_lz4(&p, S4K),
            seal_chunk_v2(&salt(), &p, seg(S4K), Codec::None).unwrap(),
        );
        assert_eq!(a.object.len(), none.object.len());
        assert_ne!(a.object[a.header_len..], none.object[none.header_len..]);
    }

    /// A segment of `k` noise bytes then zeros: lz4 keeps the noise as it is and the zeros
    /// as one match, so its compressed length grows with `k` a byte at a time.
    fn noise_then_zeros(k: usize, len: usize) -> Vec<u8> {
        let mut p = noise(k, 5);
        p.resize(len, 0);
        p
    }

    fn padded_len(p: &[u8]) -> usize {
        (4 + lz4_flex::block::compress(p).len()).next_multiple_of(1024)
    }

    #[test]
    fn an_eighth_saved_is_kept_less_is_stored_raw() {
        let l = S16K as usize;
        // The most the encoding may be: 16384 − 2048 = 14336 bytes, 14 KiB.
        assert_eq!(lz4_limit(S16K), 14336);
        let at = (12_000..l)
            .filter(|&k| padded_len(&noise_then_zeros(k, l)) == 14336)
            .max()
            .unwrap();
        let over = noise_then_zeros(at + 1, l);
        assert_eq!(padded_len(&over), 15360);

        let p = noise_then_zeros(at, l);
        let c = seal_lz4(&p, S16K);
        assert_eq!(open_every_way(&p, &c), [true]);
        let h = verify_header(&c.name, &c.object).unwrap();
        assert_eq!(h.rows[0].sealed_len, 14336 + 16);

        let c = seal_lz4(&over, S16K);
        assert_eq!(open_every_way(&over, &c), [false]);
        let h = verify_header(&c.name, &c.object).unwrap();
        assert_eq!(h.rows[0].sealed_len, 16384 + 16);
    }

    #[test]
    fn a_compressed_encoding_is_its_length_its_block_and_zeros_to_a_kib() {
        let p = text(S16K as usize);
        let c = seal_lz4(&p, S16K);
        let h = verify_header(&c.name, &c.object).unwrap();
        let mut buf = c.object[span(&h.segment_range(SegmentIndex(0)).unwrap())].to_vec();
        let opened = decrypt(&h, &aead_key(&c.key), SegmentIndex(0), &mut buf).unwrap();
        let block = lz4_flex::block::compress(&p);
        let n = block.len();
        assert_eq!(opened.len(), 1024);
        assert_eq!(opened[..4], u32::try_from(n).unwrap().to_le_bytes());
        assert_eq!(opened[4..4 + n], block);
        assert!(opened[4 + n..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_header_with_a_bad_compressed_length_is_refused() {
        let (p, c) = (
            text(S4K as usize + 900),
            seal_lz4(&text(S4K as usize + 900), S4K),
        );
        assert_eq!(open_every_way(&p, &c), [true, false]);
        let h = c.header_len;
        let cases: Vec<(usize, u32, &str)> = vec![
            (
                20,
                1000 + 16,
                "segment 0 is listed as 1016 sealed bytes: its 4096-byte plaintext seals raw \
                 to 4112 bytes, or compressed to 16 + 1024·k bytes for k in 1..=3",
            ),
            (
                20,
                5120 + 16,
                "segment 0 is listed as 5136 sealed bytes: its 4096-byte plaintext seals raw \
                 to 4112 bytes, or compressed to 16 + 1024·k bytes for k in 1..=3",
            ),
            (
                20,
                16,
                "segment 0 is listed as 16 sealed bytes: its 4096-byte plaintext seals raw \
                 to 4112 bytes, or compressed to 16 + 1024·k bytes for k in 1..=3",
            ),
            (
                20,
                0,
                "segment 0 is listed as 0 sealed bytes: its 4096-byte plaintext seals raw \
                 to 4112 bytes, or compressed to 16 + 1024·k bytes for k in 1..=3",
            ),
            (
                56,
                1024 + 16,
                "segment 1 is listed as 1040 sealed bytes: its 900-byte plaintext seals raw \
                 to 916 bytes and is too short to compress",
            ),
        ];
        for (at, len, message) in cases {
            let mut bad = c.object.clone();
            bad[at..at + 4].copy_from_slice(&len.to_le_bytes());
            let err = ChunkHeader::parse(&bad).unwrap_err();
            assert!(matches!(err, HeaderError::CompressedLen { .. }), "{err:?}");
            assert_eq!(err.to_string(), message);
            let name = renamed(&bad, h);
            assert_eq!(
                verify_header(&name, &bad).unwrap_err().to_string(),
                format!("chunk {name} is corrupt: its header is bad: {message}")
            );
        }
        // 3 KiB is the most a 4 KiB segment's encoding may be (4096 − 512 = 3584).
        let mut ok = c.object[..h].to_vec();
        ok[20..24].copy_from_slice(&(3072u32 + 16).to_le_bytes());
        assert!(ChunkHeader::parse(&ok).is_ok());
        // Under codec 0 the rule stays exact.
        ok[5] = 0;
        assert_eq!(
            ChunkHeader::parse(&ok).unwrap_err(),
            HeaderError::SealedLen {
                segment: SegmentIndex(0),
                len: 3088,
                plain_len: 4096,
                want: 4112
            }
        );
    }

    /// Seals one encoding per segment, whatever its bytes, as a codec-1 chunk of `p` under
    /// the key lode derives for it: the encodings no lode writer makes, for the reader's
    /// checks to refuse.
    fn seal_encoded(p: &[u8], s: u32, encodings: &[Vec<u8>]) -> SealedChunkV2 {
        let s = seg(s);
        let digest = sha256(p);
        let key = derive_key(&salt(), Codec::Lz4, s, &digest);
        let aead = aead_key(&key);
        let header_len = ChunkHeader::len_for(encodings.len());
        let mut object = vec![0; header_len];
        let mut rows = Vec::new();
        for (j, e) in (0u32..).zip(encodings) {
            let start = object.len();
            object.extend_from_slice(e);
            let tag = aead
                .seal_in_place_separate_tag(
                    nonce(SegmentIndex(j)),
                    Aad::empty(),
                    &mut object[start..],
                )
                .unwrap();
            object.extend_from_slice(tag.as_ref());
            rows.push(Row {
                start: start as u64,
                sealed_len: u32::try_from(object.len() - start).unwrap(),
                sha256: sha256(&object[start..]),
            });
        }
        let header = ChunkHeader {
            codec: Codec::Lz4,
            segment_size: s,
            plain_len: u32::try_from(p.len()).unwrap(),
            rows,
        };
        header.write(&mut object[..header_len]);
        SealedChunkV2 {
            digest,
            name: ChunkName::of(&object[..header_len]),
            key,
            object,
            header_len,
        }
    }

    /// `u32 LE len ‖ body`, zero-padded to `padded` bytes.
    fn encoding(len: u32, body: &[u8], padded: usize) -> Vec<u8> {
        let mut e = len.to_le_bytes().to_vec();
        e.extend_from_slice(body);
        e.resize(padded, 0);
        e
    }

    #[test]
    fn a_compressed_segment_that_lies_is_refused_by_name() {
        let p = text(S16K as usize);
        let block = lz4_flex::block::compress(&p);
        let n = u32::try_from(block.len()).unwrap();
        assert!(4 + block.len() < 1024);
        let mut nonzero = encoding(n, &block, 1024);
        nonzero[4 + block.len() + 3] = 0x5a;
        let mut garbage = block.clone();
        garbage.iter_mut().for_each(|b| *b = 0xff);
        let short = lz4_flex::block::compress(&p[..8000]);
        let long = lz4_flex::block::compress(&text(20_000));
        let cases: Vec<(Vec<u8>, DecodeError, String)> = vec![
            (
                encoding(5000, &block, 1024),
                DecodeError::CompressedLen {
                    len: 5000,
                    room: 1020,
                },
                "its compressed length 5000 overruns the 1020 bytes after it".into(),
            ),
            (
                encoding(u32::MAX, &block, 1024),
                DecodeError::CompressedLen {
                    len: u32::MAX,
                    room: 1020,
                },
                "its compressed length 4294967295 overruns the 1020 bytes after it".into(),
            ),
            (
                nonzero,
                DecodeError::Padding {
                    offset: 4 + block.len() + 3,
                    value: 0x5a,
                },
                format!("padding byte {} is 0x5a, not 0", 4 + block.len() + 3),
            ),
            (
                // The length says less than the block: its tail is read as padding.
                encoding(n - 2, &block, 1024),
                DecodeError::Padding {
                    offset: 4 + block.len() - 2,
                    value: block[block.len() - 2],
                },
                format!(
                    "padding byte {} is {:#04x}, not 0",
                    4 + block.len() - 2,
                    block[block.len() - 2]
                ),
            ),
            (
                encoding(n, &block, 2048),
                DecodeError::Padded {
                    len: n,
                    encoded: 2048,
                },
                format!(
                    "2048 bytes is more than {n} compressed bytes padded to a multiple of 1024"
                ),
            ),
            (
                encoding(n, &garbage, 1024),
                DecodeError::Lz4 {
                    reason: lz4_flex::block::decompress_into(&garbage, &mut vec![0; 16384])
                        .unwrap_err()
                        .to_string(),
                    want: 16384,
                },
                String::new(),
            ),
            (
                encoding(u32::try_from(short.len()).unwrap(), &short, 1024),
                DecodeError::PlainLen {
                    got: 8000,
                    want: 16384,
                },
                "its lz4 block decodes to 8000 bytes, the segment holds 16384".into(),
            ),
            (
                encoding(u32::try_from(long.len()).unwrap(), &long, 1024),
                DecodeError::Lz4 {
                    reason: lz4_flex::block::decompress_into(&long, &mut vec![0; 16384])
                        .unwrap_err()
                        .to_string(),
                    want: 16384,
                },
                String::new(),
            ),
        ];
        let format = ChunkFormat::V2 {
            segment_size: seg(S16K),
            codec: Codec::Lz4,
        };
        for (e, want, message) in cases {
            let c = seal_encoded(&p, S16K, &[e]);
            let h = verify_header(&c.name, &c.object).unwrap();
            let j = SegmentIndex(0);
            let sealed = &c.object[span(&h.segment_range(j).unwrap())];
            let err = ChunkV2Error::Decode {
                chunk: c.name,
                segment: j,
                source: want,
            };
            if let ChunkV2Error::Decode {
                source: DecodeError::Lz4 { reason, .. },
                ..
            } = &err
            {
                assert_eq!(
                    err.to_string(),
                    format!(
                        "chunk {} segment 0 is corrupt: it decrypts, but its lz4 block does \
                         not decode into 16384 bytes: {reason}",
                        c.name
                    )
                );
            } else {
                assert_eq!(
                    err.to_string(),
                    format!(
                        "chunk {} segment 0 is corrupt: it decrypts, but {message}",
                        c.name
                    )
                );
            }
            assert!(err.fault().starts_with("segment 0 decrypts, but "), "{err}");
            // The keyless checks pass: only the key shows what is inside.
            verify_object_v2(&c.name, &c.object).unwrap();
            assert_eq!(open_segment(&h, &c.key, j, sealed).unwrap_err(), err);
            let mut buf = sealed.to_vec();
            assert_eq!(
                open_segment_in_place(&h, &c.key, j, &mut buf).unwrap_err(),
                err
            );
            let mut buf = sealed.to_vec();
            let mut out = vec![0; 16384];
            assert_eq!(
                open_segment_into(&h, &c.key, j, &mut buf, &mut out).unwrap_err(),
                err
            );
            assert_eq!(open_chunk_v2(&c.name, &c.key, &c.object).unwrap_err(), err);
            assert_eq!(
                format.open(&c.name, &c.key, c.object.clone()).unwrap_err(),
                crate::object::ObjectError::V2(err)
            );
        }
        // The honest encoding, sealed the same way, opens.
        let c = seal_encoded(&p, S16K, &[encoding(n, &block, 1024)]);
        assert_eq!(open_chunk_v2(&c.name, &c.key, &c.object).unwrap(), p);
        assert_eq!(c.object, seal_lz4(&p, S16K).object);
    }

    #[test]
    fn open_segment_into_wants_a_buffer_of_the_segment() {
        let p = text(S4K as usize + 100);
        let c = seal_lz4(&p, S4K);
        let h = verify_header(&c.name, &c.object).unwrap();
        let j = SegmentIndex(1);
        let mut sealed = c.object[span(&h.segment_range(j).unwrap())].to_vec();
        let err = open_segment_into(&h, &c.key, j, &mut sealed, &mut [0; 4096]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "chunk {} segment 1 holds 100 plaintext bytes, the buffer given for it is 4096",
                c.name
            )
        );
        let err =
            open_segment_into(&h, &c.key, SegmentIndex(2), &mut sealed, &mut [0; 100]).unwrap_err();
        assert!(matches!(err, ChunkV2Error::NoSegment { .. }), "{err}");
    }
}
