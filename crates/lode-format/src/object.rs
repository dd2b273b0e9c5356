//! A stored chunk object, in whichever format it was sealed, checked against its name with
//! no key (docs/format.md §1 and §8).
//!
//! A v1 object is named by the SHA-256 of all its bytes; a v2 object by the SHA-256 of
//! its header, which lists the SHA-256 of every sealed segment. A store, a cache or a
//! peer that holds only a name and some bytes calls [`check_object`]: it finds which
//! format the bytes are in by checking them, not by trusting a field in them. No bytes
//! can pass as both: that would take a SHA-256 collision.

use thiserror::Error;

use std::ops::Range;

use crate::chunk::{
    ChunkError, SealedChunk, TAG_LEN, aead_key, open_unverified, seal_chunk_in_place, verify_name,
};
use crate::ids::{ChunkKey, ChunkName, RootSalt, SegmentIndex};
use crate::manifest::ChunkFormat;
use crate::segment::{
    ChunkHeader, ChunkV2Error, Codec, MAGIC, open_segment_unverified, open_unverified_into,
    seal_chunk_v2, verify_header, verify_object_v2,
};

/// The format a chunk object was found to be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectFormat {
    /// One AES-GCM message; the name is SHA-256 of all of it.
    V1,
    /// A header and sealed segments; the name is SHA-256 of the header.
    V2,
}

/// Bytes that are not the chunk object named.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ObjectError {
    /// A v1 object failed: the bytes hash elsewhere (neither format matches the name), or
    /// it does not open.
    #[error(transparent)]
    V1(#[from] ChunkError),
    /// The bytes hold this chunk's v2 header, but the object around it is wrong: its
    /// length, or a segment; or a v2 object failed to open.
    #[error(transparent)]
    V2(#[from] ChunkV2Error),
    /// The object is sound but in another format than the manifest says its chunks are.
    #[error("chunk {chunk} is a {found} object, but its manifest names {expected} chunks")]
    WrongFormat {
        /// The chunk at fault.
        chunk: ChunkName,
        /// The format the object is in.
        found: ObjectFormat,
        /// The format the manifest gives.
        expected: ObjectFormat,
    },
}

impl std::fmt::Display for ObjectFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectFormat::V1 => "v1",
            ObjectFormat::V2 => "v2",
        })
    }
}

impl ObjectFormat {
    /// The object format of a manifest's chunks.
    pub const fn of(format: ChunkFormat) -> ObjectFormat {
        match format {
            ChunkFormat::V1 => ObjectFormat::V1,
            ChunkFormat::V2 { .. } => ObjectFormat::V2,
        }
    }
}

impl ChunkFormat {
    /// The largest object a `plain_len`-byte chunk can seal to in this format (under a
    /// compressing codec, every segment raw; the real length is in the object's header,
    /// [`ChunkHeader::object_len`]): the bound on every chunk object read from a store or
    /// a cache.
    pub fn object_len(self, plain_len: usize) -> u64 {
        let plain = plain_len as u64;
        match self {
            ChunkFormat::V1 => plain + TAG_LEN as u64,
            ChunkFormat::V2 { segment_size, .. } => {
                let count = plain.div_ceil(segment_size.bytes_u64());
                ChunkHeader::len_for(usize::try_from(count).unwrap_or(usize::MAX)) as u64
                    + plain
                    + count * TAG_LEN as u64
            }
        }
    }

    /// Seals `plaintext` (1 byte to 64 MiB, not all zero) in this format; the object is
    /// the returned chunk's `ciphertext`.
    pub fn seal(self, salt: &RootSalt, plaintext: Vec<u8>) -> Result<SealedChunk, ChunkV2Error> {
        match self {
            ChunkFormat::V1 => Ok(seal_chunk_in_place(salt, plaintext)),
            ChunkFormat::V2 {
                segment_size,
                codec,
            } => {
                let s = seal_chunk_v2(salt, &plaintext, segment_size, codec)?;
                Ok(SealedChunk {
                    digest: s.digest,
                    name: s.name,
                    key: s.key,
                    ciphertext: s.object,
                })
            }
        }
    }

    /// Decrypts a whole object of this format whose name [`check_object`] (or an equal
    /// check) already passed, authenticating it by GCM as it opens, as
    /// [`open_unverified`] does for v1: a v2 object's header is checked again (it is a
    /// few hundred bytes), its segments are not hashed a second time.
    pub fn open_checked(
        self,
        name: &ChunkName,
        key: &ChunkKey,
        object: Vec<u8>,
    ) -> Result<Vec<u8>, ObjectError> {
        match self {
            ChunkFormat::V1 => Ok(open_unverified(name, key, object)?),
            ChunkFormat::V2 { .. } => Ok(open_v2_checked(name, key, object)?),
        }
    }

    /// Checks `object` against `name` in this format (a sound object of the other format
    /// is refused) and decrypts it.
    pub fn open(
        self,
        name: &ChunkName,
        key: &ChunkKey,
        object: Vec<u8>,
    ) -> Result<Vec<u8>, ObjectError> {
        let found = check_object(name, &object)?;
        let expected = ObjectFormat::of(self);
        if found != expected {
            return Err(ObjectError::WrongFormat {
                chunk: *name,
                found,
                expected,
            });
        }
        self.open_checked(name, key, object)
    }
}

/// Opens every segment of a v2 object in place. Raw segments (all of them under codec 0)
/// are packed to the front, so the object's buffer becomes the plaintext; compressed ones
/// decode into a new buffer of the plaintext's length.
fn open_v2_checked(
    name: &ChunkName,
    key: &ChunkKey,
    mut object: Vec<u8>,
) -> Result<Vec<u8>, ChunkV2Error> {
    let header = verify_header(name, &object)?;
    if object.len() as u64 != header.object_len() {
        return Err(ChunkV2Error::ObjectLength {
            chunk: *name,
            len: object.len(),
            want: header.object_len(),
        });
    }
    let object_len = object.len();
    let wrong_length = || ChunkV2Error::ObjectLength {
        chunk: *name,
        len: object_len,
        want: header.object_len(),
    };
    let no_segment = |j| ChunkV2Error::NoSegment {
        chunk: *name,
        segment: j,
        count: header.count(),
    };
    // The length check above keeps every range inside the object.
    let span = |r: Range<u64>| {
        usize::try_from(r.start).unwrap_or(usize::MAX)..usize::try_from(r.end).unwrap_or(usize::MAX)
    };
    let segments = (0..header.count()).map(SegmentIndex);
    if header.codec() == Codec::None {
        let mut out = 0usize;
        for j in segments {
            let range = span(header.segment_range(j).ok_or(no_segment(j))?);
            let start = range.start;
            let sealed = object.get_mut(range).ok_or_else(wrong_length)?;
            let plain_len = open_segment_unverified(&header, key, j, sealed)?.len();
            object.copy_within(start..start + plain_len, out);
            out += plain_len;
        }
        object.truncate(out);
        return Ok(object);
    }
    let aead = aead_key(key);
    let mut plain = vec![0u8; usize::try_from(header.plain_len()).unwrap_or(usize::MAX)];
    for j in segments {
        let range = span(header.segment_range(j).ok_or(no_segment(j))?);
        let sealed = object.get_mut(range).ok_or_else(wrong_length)?;
        let out = header
            .segment_plain_range(j)
            .map(span)
            .and_then(|r| plain.get_mut(r))
            .ok_or(no_segment(j))?;
        open_unverified_into(&header, &aead, j, sealed, out)?;
    }
    Ok(plain)
}

/// Checks `bytes` against `name` and says which format they are in: a v2 object whose
/// header hashes to `name`, is exactly as long as the header says and whose every segment
/// hashes to its row; else a v1 object that hashes to `name`.
///
/// Bytes that start with a header hashing to `name` are judged as v2 only. That refuses a
/// bare header, which would otherwise pass as a v1 object (it hashes to the name) and
/// could be stored in place of the whole object, never to be repaired. The cost is that a
/// v1 ciphertext that begins with a v2 header of its own whole self is refused: that
/// needs the magic and a segment count that fit by chance, about 2^-64.
pub fn check_object(name: &ChunkName, bytes: &[u8]) -> Result<ObjectFormat, ObjectError> {
    if holds_v2_header_of(name, bytes) {
        verify_object_v2(name, bytes)?;
        return Ok(ObjectFormat::V2);
    }
    verify_name(name, bytes)?;
    Ok(ObjectFormat::V1)
}

/// Whether `bytes` start with a header that hashes to `name`. Only the magic and the
/// segment count are read before the hash, so bytes that are not this chunk's header
/// (a v1 ciphertext that happens to start with the magic, say) are ruled out by the hash.
fn holds_v2_header_of(name: &ChunkName, bytes: &[u8]) -> bool {
    if !bytes.starts_with(&MAGIC) {
        return false;
    }
    ChunkHeader::peek_len(bytes)
        .ok()
        .and_then(|len| bytes.get(..len))
        .is_some_and(|header| &ChunkName::of(header) == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::seal_chunk;
    use crate::ids::{RootSalt, SegmentSize};
    use crate::segment::seal_chunk_v2;

    fn salt() -> RootSalt {
        RootSalt::from_bytes([0x33; 32])
    }

    fn plain() -> Vec<u8> {
        (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn each_format_is_found_by_its_name() {
        let v1 = seal_chunk(&salt(), &plain());
        assert_eq!(check_object(&v1.name, &v1.ciphertext), Ok(ObjectFormat::V1));
        let v2 = seal_chunk_v2(&salt(), &plain(), SegmentSize::DEFAULT, Codec::None).unwrap();
        assert_eq!(check_object(&v2.name, &v2.object), Ok(ObjectFormat::V2));
    }

    #[test]
    fn another_chunks_bytes_are_refused_in_either_format() {
        let v1 = seal_chunk(&salt(), &plain());
        let v2 = seal_chunk_v2(&salt(), &plain(), SegmentSize::DEFAULT, Codec::None).unwrap();
        assert!(matches!(
            check_object(&v1.name, &v2.object),
            Err(ObjectError::V1(ChunkError::NameMismatch { .. }))
        ));
        assert!(matches!(
            check_object(&v2.name, &v1.ciphertext),
            Err(ObjectError::V1(ChunkError::NameMismatch { .. }))
        ));
    }

    #[test]
    fn a_v2_object_with_a_bad_segment_or_length_names_the_fault() {
        let v2 = seal_chunk_v2(
            &salt(),
            &plain(),
            SegmentSize::new(4096).unwrap(),
            Codec::None,
        )
        .unwrap();
        let mut bad = v2.object.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let err = check_object(&v2.name, &bad).unwrap_err();
        assert!(
            matches!(err, ObjectError::V2(ChunkV2Error::SegmentMismatch { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("segment 24"), "{err}");
        let short = &v2.object[..v2.object.len() - 1];
        assert!(matches!(
            check_object(&v2.name, short),
            Err(ObjectError::V2(ChunkV2Error::ObjectLength { .. }))
        ));
        let mut long = v2.object.clone();
        long.push(0);
        assert!(matches!(
            check_object(&v2.name, &long),
            Err(ObjectError::V2(ChunkV2Error::ObjectLength { .. }))
        ));
    }

    #[test]
    fn every_format_seals_to_its_object_len_and_opens() {
        let v2 = ChunkFormat::V2 {
            segment_size: SegmentSize::new(4096).unwrap(),
            codec: Codec::None,
        };
        let lz4 = ChunkFormat::V2 {
            segment_size: SegmentSize::new(4096).unwrap(),
            codec: Codec::Lz4,
        };
        for format in [ChunkFormat::V1, v2, lz4, ChunkFormat::RECOMMENDED] {
            for len in [1usize, 4095, 4096, 4097, 100_000] {
                let p = plain()[..len].to_vec();
                let s = format.seal(&salt(), p.clone()).unwrap();
                // Exact without compression; a bound with it. This plaintext repeats
                // every 251 bytes, so every segment of 4 KiB or so compresses, and a
                // 1-byte one cannot.
                if format.codec() == Some(Codec::Lz4) {
                    let len_sealed = s.ciphertext.len() as u64;
                    if len == 1 {
                        assert_eq!(len_sealed, format.object_len(len));
                    } else {
                        assert!(len_sealed < format.object_len(len), "{format:?} {len}");
                    }
                } else {
                    assert_eq!(
                        s.ciphertext.len() as u64,
                        format.object_len(len),
                        "{format:?} {len}"
                    );
                }
                assert_eq!(
                    check_object(&s.name, &s.ciphertext),
                    Ok(ObjectFormat::of(format))
                );
                assert_eq!(
                    format.open(&s.name, &s.key, s.ciphertext.clone()).unwrap(),
                    p
                );
                assert_eq!(
                    format.open_checked(&s.name, &s.key, s.ciphertext).unwrap(),
                    p
                );
            }
        }
    }

    #[test]
    fn an_object_of_the_other_format_or_key_is_refused() {
        let v2 = ChunkFormat::V2 {
            segment_size: SegmentSize::DEFAULT,
            codec: Codec::None,
        };
        let a = v2.seal(&salt(), plain()).unwrap();
        let err = ChunkFormat::V1
            .open(&a.name, &a.key, a.ciphertext.clone())
            .unwrap_err();
        assert!(
            matches!(
                err,
                ObjectError::WrongFormat {
                    found: ObjectFormat::V2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&a.name.to_string()), "{err}");
        let b = v2.seal(&salt(), vec![9; 5000]).unwrap();
        let err = v2.open(&a.name, &b.key, a.ciphertext).unwrap_err();
        assert!(
            matches!(err, ObjectError::V2(ChunkV2Error::Decrypt { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_header_alone_is_not_an_object() {
        let v2 = seal_chunk_v2(&salt(), &plain(), SegmentSize::DEFAULT, Codec::None).unwrap();
        let header = &v2.object[..v2.header_len];
        assert!(matches!(
            check_object(&v2.name, header),
            Err(ObjectError::V2(ChunkV2Error::ObjectLength { .. }))
        ));
    }
}
