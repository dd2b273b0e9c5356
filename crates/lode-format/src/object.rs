//! A stored chunk object, in whichever format it was sealed, checked against its name with
//! no key (docs/format.md §1 and §8).
//!
//! A v1 object is named by the SHA-256 of all its bytes; a v2 object by the SHA-256 of
//! its header, which lists the SHA-256 of every sealed segment. A store, a cache or a
//! peer that holds only a name and some bytes calls [`check_object`]: it finds which
//! format the bytes are in by checking them, not by trusting a field in them. No bytes
//! can pass as both: that would take a SHA-256 collision.

use thiserror::Error;

use crate::chunk::{ChunkError, verify_name};
use crate::ids::ChunkName;
use crate::segment::{ChunkHeader, ChunkV2Error, MAGIC, verify_object_v2};

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
    /// Neither format's name check passes (for a v1 object: the bytes hash elsewhere).
    #[error(transparent)]
    Name(#[from] ChunkError),
    /// The bytes hold this chunk's v2 header, but the object around it is wrong: its
    /// length, or a segment.
    #[error(transparent)]
    V2(#[from] ChunkV2Error),
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
        let v2 = seal_chunk_v2(&salt(), &plain(), SegmentSize::DEFAULT).unwrap();
        assert_eq!(check_object(&v2.name, &v2.object), Ok(ObjectFormat::V2));
    }

    #[test]
    fn another_chunks_bytes_are_refused_in_either_format() {
        let v1 = seal_chunk(&salt(), &plain());
        let v2 = seal_chunk_v2(&salt(), &plain(), SegmentSize::DEFAULT).unwrap();
        assert!(matches!(
            check_object(&v1.name, &v2.object),
            Err(ObjectError::Name(ChunkError::NameMismatch { .. }))
        ));
        assert!(matches!(
            check_object(&v2.name, &v1.ciphertext),
            Err(ObjectError::Name(ChunkError::NameMismatch { .. }))
        ));
    }

    #[test]
    fn a_v2_object_with_a_bad_segment_or_length_names_the_fault() {
        let v2 = seal_chunk_v2(&salt(), &plain(), SegmentSize::new(4096).unwrap()).unwrap();
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
    fn a_header_alone_is_not_an_object() {
        let v2 = seal_chunk_v2(&salt(), &plain(), SegmentSize::DEFAULT).unwrap();
        let header = &v2.object[..v2.header_len];
        assert!(matches!(
            check_object(&v2.name, header),
            Err(ObjectError::V2(ChunkV2Error::ObjectLength { .. }))
        ));
    }
}
