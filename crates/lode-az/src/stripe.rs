//! Stripes: a chunk's ciphertext cut into `k` equal data shards (the last padded with
//! zeros), plus `m` Reed-Solomon parity shards, each stored on its own cache node behind
//! a small header that lets a reader check a stripe before decoding with it.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "LDAZ"
//!      4     1  format version (1)
//!      5     1  k, data stripes (1..)
//!      6     1  m, parity stripes
//!      7     1  this stripe's index: 0..k are data, k..k+m parity
//!      8    32  the chunk's name (SHA-256 of its whole ciphertext)
//!     40     4  the chunk's length in bytes, little-endian u32
//!     44     4  CRC32C of bytes 0..44 and the payload, little-endian u32
//!     48     …  payload: the shard, ceil(length / k) bytes (at least 1)
//! ```
//!
//! The header lets a reader reject, before decoding, a stripe of another chunk (the name),
//! of another code (k, m), one truncated or grown (the payload length follows from the
//! chunk length and k), and one corrupted in storage or on the wire (the CRC). A CRC is
//! no defence against a node that lies on purpose; the SHA-256 name check of the rebuilt
//! chunk is, and [`Codec::rebuild`] searches other stripe combinations when it fails.
//!
//! Reed-Solomon coding is `reed-solomon-erasure` over GF(2^8) (its SIMD kernels); with
//! `m = 0` there is no code at all, and `k = 1, m = 0` stores one whole copy.

use bytes::Bytes;
use lode_format::ChunkName;
use reed_solomon_erasure::galois_8::ReedSolomon;
use thiserror::Error;

/// The first four bytes of every stripe.
pub const MAGIC: [u8; 4] = *b"LDAZ";
/// The stripe format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 48;
/// The most stripes a chunk can have: the index is one byte.
pub const MAX_STRIPES: usize = 255;
/// How many stripe combinations [`Codec::rebuild`] tries before giving up: all of them
/// for k = 4, m = 2 (15), a bounded amount of CPU for wide codes.
pub const MAX_COMBINATIONS: usize = 64;

const CRC_AT: usize = 44;
const _: () = assert!(CRC_AT + 4 == HEADER_LEN);

/// The bytes of one data shard of a `chunk_len`-byte chunk cut into `k` shards.
pub fn shard_len(chunk_len: usize, k: usize) -> usize {
    chunk_len.div_ceil(k.max(1)).max(1)
}

/// A stripe's header, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StripeHeader {
    /// The chunk this stripe belongs to.
    pub name: ChunkName,
    /// Data stripes of the code.
    pub k: u8,
    /// Parity stripes of the code.
    pub m: u8,
    /// This stripe's index.
    pub index: u8,
    /// The chunk's length.
    pub chunk_len: u32,
}

impl StripeHeader {
    /// The payload length this header implies.
    pub fn shard_len(&self) -> usize {
        // A u32 always fits a usize on the 64-bit targets lode builds for; saturating
        // keeps a 32-bit build from wrapping (it would then reject the stripe's length).
        shard_len(
            usize::try_from(self.chunk_len).unwrap_or(usize::MAX),
            usize::from(self.k),
        )
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `stripe`, checksumming
    /// the payload that follows.
    fn write(&self, stripe: &mut [u8]) {
        let (head, payload) = stripe.split_at_mut(HEADER_LEN);
        head[0..4].copy_from_slice(&MAGIC);
        head[4] = VERSION;
        head[5] = self.k;
        head[6] = self.m;
        head[7] = self.index;
        head[8..40].copy_from_slice(self.name.as_bytes());
        head[40..44].copy_from_slice(&self.chunk_len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head[..CRC_AT]), payload);
        head[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Why a stripe was rejected.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StripeError {
    /// Too short to hold a header.
    #[error("stripe of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    Short {
        /// Its length.
        len: usize,
    },
    /// Not a stripe at all.
    #[error("not a stripe: magic {0:02x?}")]
    Magic([u8; 4]),
    /// A format this build does not read.
    #[error("stripe format version {0}; this build reads version {VERSION}")]
    Version(u8),
    /// k, m and index that cannot be.
    #[error("stripe header has k = {k}, m = {m}, index = {index}: impossible")]
    Geometry {
        /// k as read.
        k: u8,
        /// m as read.
        m: u8,
        /// index as read.
        index: u8,
    },
    /// A payload of the wrong length for the chunk length and k.
    #[error("stripe payload is {got} bytes; a {chunk_len}-byte chunk in {k} shards needs {want}")]
    Length {
        /// The chunk length in the header.
        chunk_len: u32,
        /// k in the header.
        k: u8,
        /// The payload length that implies.
        want: usize,
        /// The payload length found.
        got: usize,
    },
    /// The checksum does not match.
    #[error("stripe checksum {got:08x} does not match its contents ({want:08x})")]
    Checksum {
        /// The CRC computed.
        want: u32,
        /// The CRC stored.
        got: u32,
    },
    /// A valid stripe of another chunk.
    #[error("stripe belongs to chunk {got}, not {want}")]
    WrongChunk {
        /// The chunk asked for.
        want: ChunkName,
        /// The chunk in the header.
        got: ChunkName,
    },
    /// A valid stripe of another code.
    #[error("stripe is coded k = {got_k}, m = {got_m}; expected k = {k}, m = {m}")]
    WrongCode {
        /// k expected.
        k: usize,
        /// m expected.
        m: usize,
        /// k found.
        got_k: u8,
        /// m found.
        got_m: u8,
    },
}

/// A stripe whose header and checksum were checked. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stripe {
    header: StripeHeader,
    bytes: Bytes,
}

impl Stripe {
    /// Parses and checks a stripe as it came from a node: the only parser of stripe
    /// bytes. Allocates nothing and never panics, whatever `bytes` holds.
    pub fn parse(bytes: Bytes) -> Result<Stripe, StripeError> {
        let Some(head) = bytes.get(..HEADER_LEN) else {
            return Err(StripeError::Short { len: bytes.len() });
        };
        let field = |at: usize| -> [u8; 4] {
            let mut f = [0u8; 4];
            f.copy_from_slice(&head[at..at + 4]);
            f
        };
        if field(0) != MAGIC {
            return Err(StripeError::Magic(field(0)));
        }
        if head[4] != VERSION {
            return Err(StripeError::Version(head[4]));
        }
        let (k, m, index) = (head[5], head[6], head[7]);
        let total = usize::from(k) + usize::from(m);
        if k == 0 || usize::from(index) >= total || total > MAX_STRIPES {
            return Err(StripeError::Geometry { k, m, index });
        }
        let mut name = [0u8; 32];
        name.copy_from_slice(&head[8..40]);
        let header = StripeHeader {
            name: ChunkName::from_bytes(name),
            k,
            m,
            index,
            chunk_len: u32::from_le_bytes(field(40)),
        };
        let payload = &bytes[HEADER_LEN..];
        let want = header.shard_len();
        if payload.len() != want {
            return Err(StripeError::Length {
                chunk_len: header.chunk_len,
                k,
                want,
                got: payload.len(),
            });
        }
        let stored = u32::from_le_bytes(field(CRC_AT));
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head[..CRC_AT]), payload);
        if crc != stored {
            return Err(StripeError::Checksum {
                want: crc,
                got: stored,
            });
        }
        Ok(Stripe { header, bytes })
    }

    /// Checks that this stripe belongs to chunk `name` coded with `k` and `m`.
    pub fn check(&self, name: &ChunkName, k: usize, m: usize) -> Result<(), StripeError> {
        let h = &self.header;
        if h.name != *name {
            return Err(StripeError::WrongChunk {
                want: *name,
                got: h.name,
            });
        }
        if usize::from(h.k) != k || usize::from(h.m) != m {
            return Err(StripeError::WrongCode {
                k,
                m,
                got_k: h.k,
                got_m: h.m,
            });
        }
        Ok(())
    }

    /// The header.
    pub fn header(&self) -> &StripeHeader {
        &self.header
    }

    /// This stripe's index.
    pub fn index(&self) -> usize {
        usize::from(self.header.index)
    }

    /// The shard after the header.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole stripe, header included, as stored.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// Encoding or decoding failed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// k and m the code cannot have.
    #[error("cannot code k = {k}, m = {m}: k must be at least 1 and k + m at most {MAX_STRIPES}")]
    Geometry {
        /// k asked for.
        k: usize,
        /// m asked for.
        m: usize,
    },
    /// A chunk too long for the header's length field.
    #[error("a chunk of {0} bytes is too long to stripe (the limit is 4 GiB - 1)")]
    ChunkTooLong(usize),
    /// Decode was not given exactly k stripes of one chunk with distinct indices.
    #[error("cannot decode: {0}")]
    Stripes(&'static str),
    /// The Reed-Solomon library refused.
    #[error("Reed-Solomon: {0}")]
    ReedSolomon(String),
}

/// A rebuilt chunk and which of the candidate stripes were found wrong on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rebuilt {
    /// The chunk, which matched its name.
    pub chunk: Vec<u8>,
    /// Positions (in the candidates given) of the stripes used.
    pub used: Vec<usize>,
    /// Whether any parity stripe was used, that is, whether it took decoding.
    pub from_parity: bool,
    /// Positions of candidates that disagree with the rebuilt chunk (looked for only
    /// when some combination failed its check).
    pub bad: Vec<usize>,
}

/// A Reed-Solomon code with `k` data and `m` parity stripes, and the stripe framing.
#[derive(Debug)]
pub struct Codec {
    k: usize,
    m: usize,
    rs: Option<ReedSolomon>,
}

impl Codec {
    /// A code with `k ≥ 1` data and `m ≥ 0` parity stripes, `k + m ≤ 255`.
    pub fn new(k: usize, m: usize) -> Result<Self, CodecError> {
        let geometry = CodecError::Geometry { k, m };
        if k == 0 || k.checked_add(m).is_none_or(|t| t > MAX_STRIPES) {
            return Err(geometry);
        }
        let rs = match m {
            0 => None,
            _ => Some(ReedSolomon::new(k, m).map_err(|e| CodecError::ReedSolomon(e.to_string()))?),
        };
        Ok(Self { k, m, rs })
    }

    /// Data stripes.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Parity stripes.
    pub fn m(&self) -> usize {
        self.m
    }

    /// All stripes of a chunk.
    pub fn total(&self) -> usize {
        self.k + self.m
    }

    /// The length of each stripe (header and payload) for a chunk of `chunk_len` bytes.
    pub fn stripe_len(&self, chunk_len: usize) -> usize {
        HEADER_LEN.saturating_add(shard_len(chunk_len, self.k))
    }

    /// Cuts `chunk` (named `name`) into its `k + m` stripes, in index order.
    pub fn encode(&self, name: &ChunkName, chunk: &[u8]) -> Result<Vec<Bytes>, CodecError> {
        let chunk_len =
            u32::try_from(chunk.len()).map_err(|_| CodecError::ChunkTooLong(chunk.len()))?;
        let shard = shard_len(chunk.len(), self.k);
        let len = HEADER_LEN + shard;
        // One buffer for all stripes, handed out as slices: one allocation per chunk
        // rather than k + m (which also keeps glibc from trimming and refaulting the
        // heap top on every put).
        let mut all = vec![0u8; len * self.total()];
        for (stripe, piece) in all.chunks_mut(len).zip(chunk.chunks(shard)) {
            stripe[HEADER_LEN..HEADER_LEN + piece.len()].copy_from_slice(piece);
        }
        if let Some(rs) = &self.rs {
            let mut shards: Vec<&mut [u8]> =
                all.chunks_mut(len).map(|s| &mut s[HEADER_LEN..]).collect();
            rs.encode(&mut shards)
                .map_err(|e| CodecError::ReedSolomon(e.to_string()))?;
        }
        for (index, stripe) in all.chunks_mut(len).enumerate() {
            let header = StripeHeader {
                name: *name,
                // k + m <= 255, checked in new().
                k: u8::try_from(self.k).unwrap_or(u8::MAX),
                m: u8::try_from(self.m).unwrap_or(u8::MAX),
                index: u8::try_from(index).unwrap_or(u8::MAX),
                chunk_len,
            };
            header.write(stripe);
        }
        let all = Bytes::from(all);
        Ok((0..self.total())
            .map(|i| all.slice(i * len..(i + 1) * len))
            .collect())
    }

    /// Rebuilds the chunk from exactly `k` checked stripes of one chunk with distinct
    /// indices. Does not check the result against the name: see [`Codec::rebuild`].
    pub fn decode(&self, stripes: &[&Stripe]) -> Result<Vec<u8>, CodecError> {
        let (k, m) = (self.k, self.m);
        let Some(first) = stripes.first() else {
            return Err(CodecError::Stripes("no stripes"));
        };
        if stripes.len() != k {
            return Err(CodecError::Stripes("need exactly k stripes"));
        }
        let h0 = first.header;
        let mut present = [false; MAX_STRIPES];
        for s in stripes {
            let h = s.header;
            if usize::from(h.k) != k || usize::from(h.m) != m {
                return Err(CodecError::Stripes("a stripe of another code"));
            }
            if h.name != h0.name || h.chunk_len != h0.chunk_len {
                return Err(CodecError::Stripes("stripes of different chunks"));
            }
            // index < k + m <= 255, checked by Stripe::parse.
            let seen = &mut present[s.index()];
            if *seen {
                return Err(CodecError::Stripes("two stripes with one index"));
            }
            *seen = true;
        }
        let shard = h0.shard_len();
        let chunk_len = usize::try_from(h0.chunk_len).unwrap_or(usize::MAX);
        let mut out = vec![0u8; k * shard];
        for s in stripes.iter().filter(|s| s.index() < k) {
            let at = s.index() * shard;
            out[at..at + shard].copy_from_slice(s.payload());
        }
        if present[..k].iter().any(|p| !p) {
            let rs = self
                .rs
                .as_ref()
                .ok_or(CodecError::Stripes("a data stripe is missing and m = 0"))?;
            let mut parity = vec![0u8; m * shard];
            for s in stripes.iter().filter(|s| s.index() >= k) {
                let at = (s.index() - k) * shard;
                parity[at..at + shard].copy_from_slice(s.payload());
            }
            let mut shards: Vec<(&mut [u8], bool)> = out
                .chunks_mut(shard)
                .chain(parity.chunks_mut(shard))
                .zip(present.iter().copied())
                .collect();
            rs.reconstruct_data(&mut shards)
                .map_err(|e| CodecError::ReedSolomon(e.to_string()))?;
        }
        out.truncate(chunk_len);
        Ok(out)
    }

    /// Rebuilds chunk `name` from `candidates` (checked stripes of it, any number, in
    /// arrival order): tries combinations of `k` with distinct indices, first to last
    /// (the first is the first `k` distinct to arrive), and returns the first whose
    /// result is the object named `name` in either chunk format
    /// ([`lode_format::check_object`]), and how many name checks failed before it. `None` when
    /// no combination (of at most [`MAX_COMBINATIONS`]) checks out. When a check failed
    /// or `find_bad` is set, [`Rebuilt::bad`] lists the candidates that disagree with
    /// the chunk.
    pub fn rebuild(
        &self,
        name: &ChunkName,
        candidates: &[Stripe],
        find_bad: bool,
    ) -> (Option<Rebuilt>, usize) {
        self.rebuild_accepting(name, candidates, find_bad, &|name, chunk| {
            lode_format::check_object(name, chunk).is_ok()
        })
    }

    /// As [`rebuild`](Self::rebuild), but a combination's result is taken when `accept`
    /// says so: a reader that checks the rest itself may accept a v2 object whose header
    /// checks against its name, and hash its segments as it uses them.
    pub fn rebuild_accepting(
        &self,
        name: &ChunkName,
        candidates: &[Stripe],
        find_bad: bool,
        accept: &(dyn Fn(&ChunkName, &[u8]) -> bool + Sync),
    ) -> (Option<Rebuilt>, usize) {
        let mut failed = 0usize;
        let mut tried = 0usize;
        let mut found = None;
        for_each_combination(candidates, self.k, &mut |combo| {
            tried += 1;
            if tried > MAX_COMBINATIONS {
                return false;
            }
            let stripes: Vec<&Stripe> = combo.iter().map(|&i| &candidates[i]).collect();
            match self.decode(&stripes) {
                Ok(chunk) if accept(name, &chunk) => {
                    found = Some((chunk, combo.to_vec()));
                    false
                }
                _ => {
                    failed += 1;
                    true
                }
            }
        });
        let Some((chunk, used)) = found else {
            return (None, failed);
        };
        let from_parity = used.iter().any(|&i| candidates[i].index() >= self.k);
        // Which candidates disagree: re-encode and compare. Only when a name check failed
        // or the caller asks, so the encode's cost is rare.
        let looked_bad = find_bad || failed > 0;
        let bad = match looked_bad.then(|| self.encode(name, &chunk)) {
            None | Some(Err(_)) => Vec::new(),
            Some(Ok(truth)) => candidates
                .iter()
                .enumerate()
                .filter(|(_, s)| truth.get(s.index()) != Some(s.bytes()))
                .map(|(i, _)| i)
                .collect(),
        };
        let rebuilt = Rebuilt {
            chunk,
            used,
            from_parity,
            bad,
        };
        (Some(rebuilt), failed)
    }
}

/// Calls `f` with every combination of `k` candidates whose indices are distinct and
/// whose chunk lengths agree, in lexicographic order of positions, until `f` says stop.
fn for_each_combination(candidates: &[Stripe], k: usize, f: &mut dyn FnMut(&[usize]) -> bool) {
    fn go(
        c: &[Stripe],
        k: usize,
        start: usize,
        combo: &mut Vec<usize>,
        f: &mut dyn FnMut(&[usize]) -> bool,
    ) -> bool {
        if combo.len() == k {
            return f(combo);
        }
        for i in start..c.len() {
            let fits = combo.iter().all(|&j| {
                c[j].index() != c[i].index() && c[j].header.chunk_len == c[i].header.chunk_len
            });
            if fits {
                combo.push(i);
                let go_on = go(c, k, i + 1, combo, f);
                combo.pop();
                if !go_on {
                    return false;
                }
            }
        }
        true
    }
    go(candidates, k, 0, &mut Vec::with_capacity(k), f);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunk(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| {
                let b = i.to_le_bytes();
                b[0].wrapping_mul(31).wrapping_add(seed) ^ b[1]
            })
            .collect()
    }

    fn parse_all(stripes: &[Bytes]) -> Vec<Stripe> {
        stripes
            .iter()
            .map(|b| Stripe::parse(b.clone()).unwrap())
            .collect()
    }

    #[test]
    fn header_layout_is_as_documented() {
        let data = chunk(1000, 1);
        let name = ChunkName::of(&data);
        let stripes = Codec::new(4, 2).unwrap().encode(&name, &data).unwrap();
        assert_eq!(stripes.len(), 6);
        let s = &stripes[5];
        assert_eq!(s.len(), HEADER_LEN + 250);
        assert_eq!(&s[0..4], b"LDAZ");
        assert_eq!(s[4..8], [1, 4, 2, 5]);
        assert_eq!(&s[8..40], name.as_bytes());
        assert_eq!(s[40..44], 1000u32.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&s[..44]), &s[48..]);
        assert_eq!(s[44..48], crc.to_le_bytes());
        // Data stripes hold the chunk in order, the last one padded.
        assert_eq!(&stripes[0][48..], &data[..250]);
        assert_eq!(&stripes[3][48..], &data[750..]);
    }

    /// A v2 object (named by its header) rebuilds from any k stripes, and a stripe set
    /// with a changed segment does not pass as it.
    #[test]
    fn rebuilds_a_v2_object_by_its_name() {
        let sealed = lode_format::seal_chunk_v2(
            &lode_format::RootSalt::from_bytes([4; 32]),
            &chunk(50_000, 9),
            lode_format::SegmentSize::new(4096).unwrap(),
            lode_format::Codec::None,
        )
        .unwrap();
        let codec = Codec::new(4, 2).unwrap();
        let stripes = parse_all(&codec.encode(&sealed.name, &sealed.object).unwrap());
        let (rebuilt, failed) = codec.rebuild(&sealed.name, &stripes[2..], false);
        assert_eq!(rebuilt.unwrap().chunk, sealed.object);
        assert_eq!(failed, 0);

        let mut bad = sealed.object.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let bad_stripes = parse_all(&codec.encode(&sealed.name, &bad).unwrap());
        let (rebuilt, failed) = codec.rebuild(&sealed.name, &bad_stripes[..4], false);
        assert!(rebuilt.is_none());
        assert_eq!(failed, 1);
    }

    #[test]
    fn rejects_damaged_stripes() {
        let data = chunk(4096, 2);
        let name = ChunkName::of(&data);
        let good = Codec::new(4, 2).unwrap().encode(&name, &data).unwrap()[1].clone();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.to_vec();
            f(&mut b);
            Stripe::parse(Bytes::from(b)).unwrap_err()
        };
        assert_eq!(with(&|b| b.truncate(10)), StripeError::Short { len: 10 });
        assert_eq!(with(&|b| b[0] = b'X'), StripeError::Magic(*b"XDAZ"));
        assert_eq!(with(&|b| b[4] = 2), StripeError::Version(2));
        assert_eq!(
            with(&|b| b[5] = 0),
            StripeError::Geometry {
                k: 0,
                m: 2,
                index: 1
            }
        );
        assert_eq!(
            with(&|b| b[7] = 6),
            StripeError::Geometry {
                k: 4,
                m: 2,
                index: 6
            }
        );
        assert_eq!(
            with(&|b| {
                b.pop();
            }),
            StripeError::Length {
                chunk_len: 4096,
                k: 4,
                want: 1024,
                got: 1023
            }
        );
        assert!(matches!(
            with(&|b| b[100] ^= 1),
            StripeError::Checksum { .. }
        ));
        assert!(matches!(
            with(&|b| b[20] ^= 1),
            StripeError::Checksum { .. }
        ));
        let s = Stripe::parse(good).unwrap();
        s.check(&name, 4, 2).unwrap();
        let other = ChunkName::of(b"other");
        assert_eq!(
            s.check(&other, 4, 2).unwrap_err().to_string(),
            format!("stripe belongs to chunk {name}, not {other}")
        );
        assert_eq!(
            s.check(&name, 4, 1).unwrap_err().to_string(),
            "stripe is coded k = 4, m = 2; expected k = 4, m = 1"
        );
    }

    #[test]
    fn geometry_limits() {
        assert!(Codec::new(0, 2).is_err());
        assert!(Codec::new(1, 0).is_ok());
        assert!(Codec::new(200, 55).is_ok());
        assert_eq!(
            Codec::new(200, 56).unwrap_err().to_string(),
            "cannot code k = 200, m = 56: k must be at least 1 and k + m at most 255"
        );
        assert!(Codec::new(usize::MAX, 1).is_err());
    }

    #[test]
    fn rebuild_finds_the_combination_without_a_forged_stripe() {
        let data = chunk(10_000, 3);
        let name = ChunkName::of(&data);
        let codec = Codec::new(4, 2).unwrap();
        let stripes = codec.encode(&name, &data).unwrap();
        // Stripe 1 replaced by a forgery with a valid header and checksum.
        let mut forged = stripes[1].to_vec();
        forged[HEADER_LEN + 7] ^= 0x55;
        let head = StripeHeader {
            name,
            k: 4,
            m: 2,
            index: 1,
            chunk_len: 10_000,
        };
        head.write(&mut forged);
        let mut cands = parse_all(&stripes);
        cands[1] = Stripe::parse(Bytes::from(forged)).unwrap();
        // The first combination (0,1,2,3) includes the forgery.
        let (r, failed) = codec.rebuild(&name, &cands, false);
        let r = r.unwrap();
        assert_eq!(r.chunk, data);
        assert!(failed >= 1);
        assert_eq!(r.bad, vec![1]);
        assert!(r.from_parity);
        assert!(!r.used.contains(&1));
        // With only four candidates, one forged, nothing checks out.
        let (r, failed) = codec.rebuild(&name, &cands[..4], false);
        assert!(r.is_none());
        assert_eq!(failed, 1);
    }

    #[test]
    fn decode_refuses_bad_sets() {
        let data = chunk(777, 4);
        let name = ChunkName::of(&data);
        let codec = Codec::new(2, 1).unwrap();
        let s = parse_all(&codec.encode(&name, &data).unwrap());
        assert!(codec.decode(&[&s[0]]).is_err());
        assert!(codec.decode(&[&s[0], &s[0]]).is_err());
        let other = parse_all(&codec.encode(&ChunkName::of(b"x"), b"xyz").unwrap());
        assert!(codec.decode(&[&s[0], &other[1]]).is_err());
        assert_eq!(codec.decode(&[&s[2], &s[0]]).unwrap(), data);
        let whole = Codec::new(1, 0).unwrap();
        let one = parse_all(&whole.encode(&name, &data).unwrap());
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].payload(), &data[..]);
        assert_eq!(whole.decode(&[&one[0]]).unwrap(), data);
    }

    #[test]
    fn empty_chunk_round_trips() {
        let name = ChunkName::of(b"");
        let codec = Codec::new(4, 2).unwrap();
        let s = parse_all(&codec.encode(&name, b"").unwrap());
        assert_eq!(s[0].payload().len(), 1);
        let refs: Vec<&Stripe> = s[2..].iter().collect();
        assert_eq!(codec.decode(&refs).unwrap(), b"");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn parser_never_panics_and_rejects_garbage(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            real_header in any::<bool>(),
            k in 0u8..8,
            m in 0u8..8,
            index in 0u8..16,
            chunk_len in 0u32..2000,
        ) {
            // Garbage, or garbage behind a plausible header (magic, version, geometry,
            // a length that may match the payload): rejected either way, since the
            // checksum cannot match but by a 2^-32 chance.
            let mut b = bytes;
            if real_header && b.len() >= HEADER_LEN {
                b[0..4].copy_from_slice(&MAGIC);
                b[4] = VERSION;
                b[5..8].copy_from_slice(&[k, m, index]);
                b[40..44].copy_from_slice(&chunk_len.to_le_bytes());
            }
            prop_assert!(Stripe::parse(Bytes::from(b)).is_err());
        }

        #[test]
        fn parser_rejects_any_single_byte_change(
            len in 0usize..3000,
            k in 1usize..6,
            m in 0usize..4,
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let data = chunk(len, 9);
            let name = ChunkName::of(&data);
            let stripes = Codec::new(k, m).unwrap().encode(&name, &data).unwrap();
            let mut b = stripes[0].to_vec();
            let i = at.index(b.len());
            b[i] ^= flip;
            prop_assert!(Stripe::parse(Bytes::from(b)).is_err());
        }

        #[test]
        fn round_trip_with_any_m_stripes_erased(
            len in 0usize..20_000,
            k in 1usize..9,
            m in 0usize..5,
            seed: u8,
            erase in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
            order in any::<prop::sample::Index>(),
        ) {
            let data = chunk(len, seed);
            let name = ChunkName::of(&data);
            let codec = Codec::new(k, m).unwrap();
            let stripes = codec.encode(&name, &data).unwrap();
            prop_assert_eq!(stripes.len(), k + m);
            let mut kept: Vec<Stripe> = parse_all(&stripes);
            for e in erase.iter().take(m) {
                kept.remove(e.index(kept.len()));
            }
            // Any k of the survivors, in any order, rebuild the chunk.
            let rot = order.index(kept.len());
            kept.rotate_left(rot);
            let refs: Vec<&Stripe> = kept.iter().take(k).collect();
            prop_assert_eq!(codec.decode(&refs).unwrap(), data.clone());
            let (r, failed) = codec.rebuild(&name, &kept, false);
            prop_assert_eq!(failed, 0);
            prop_assert_eq!(r.unwrap().chunk, data);
        }
    }
}
