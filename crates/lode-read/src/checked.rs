//! Trust as a type: chunk bytes that passed a check carry a type that only the check
//! builds, and a tier says what it returns with [`Found`].
//!
//! Every check the read path makes on a chunk object is a constructor in this module:
//!
//! | constructor | checks | gives |
//! |---|---|---|
//! | [`Checked::check`] | a whole object against its name: v1, SHA-256 of all of it; v2, its header, its length and every segment | [`Checked`] |
//! | [`HeaderChecked::check`] | a v2 object's header against its name, its layout against the manifest, its length | [`HeaderChecked`] |
//! | [`HeaderChecked::finish`] | the segments of a [`HeaderChecked`] not yet hashed | [`Checked`] |
//! | [`LocalObject::open`] | the header of a chunk file on this worker's disk against its name | [`LocalObject`] |
//!
//! A segment of a [`HeaderChecked`] object is hashed against its header row by
//! [`HeaderChecked::open_segment`] before it is decrypted. Bytes read from this worker's
//! own disk are not hashed: AES-GCM authenticates each segment under the chunk's key as
//! it is decrypted ([`LocalObject::open_segment`]), and one that fails is treated like
//! one that fails its name (docs/architecture.md, "Trust boundaries").
//!
//! Only [`Checked`] objects are kept by a tier ([`ChunkTier::put`](crate::ChunkTier::put)
//! takes nothing else), so no tier can be filled with bytes nobody checked.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use lode_format::{
    CheckedHeader, ChunkError, ChunkFormat, ChunkHeader, ChunkKey, ChunkV2Error, ObjectError,
    ObjectFormat, SegmentIndex, check_object, open_segment_unverified, verify_header,
    verify_object_v2, verify_segment,
};

use crate::ReadError;
use crate::error::io;
use crate::tier::ChunkRef;

/// What a tier found for a chunk, by how far it can be trusted.
#[derive(Debug)]
pub enum Found {
    /// A whole object checked against its name: by the tier (the worker's memory holds
    /// only checked objects).
    Checked(Checked),
    /// A v2 object whose header the tier checked against its name (the AZ client, which
    /// rebuilds the object from stripes and checks its header before it returns); each
    /// segment is hashed against the header before it is used or kept.
    HeaderChecked(HeaderChecked),
    /// A chunk file on this worker's own disk, written after a full check: AES-GCM
    /// authenticates each segment as it is decrypted.
    Local(LocalObject),
    /// Bytes nobody has checked: the cache checks them.
    Unchecked(Bytes),
}

fn object_error(tier: &'static str, chunk: &ChunkRef, e: ObjectError) -> ReadError {
    match e {
        ObjectError::V1(ChunkError::NameMismatch { got, .. }) => ReadError::Corrupt {
            tier,
            chunk: chunk.name,
            got,
        },
        e => ReadError::CorruptObject {
            tier,
            chunk: chunk.name,
            source: Box::new(e),
        },
    }
}

fn v2_error(tier: &'static str, chunk: &ChunkRef, e: ChunkV2Error) -> ReadError {
    match e {
        // Bytes that are not this chunk's header at all: as for a v1 object, say what they
        // hash to.
        ChunkV2Error::HeaderMismatch { got, .. } => ReadError::Corrupt {
            tier,
            chunk: chunk.name,
            got,
        },
        e => object_error(tier, chunk, ObjectError::V2(e)),
    }
}

fn wrong_format(tier: &'static str, chunk: &ChunkRef, found: ObjectFormat) -> ReadError {
    object_error(
        tier,
        chunk,
        ObjectError::WrongFormat {
            chunk: chunk.name,
            found,
            expected: ObjectFormat::of(chunk.format),
        },
    )
}

/// The plaintext of one segment, after its length is checked against the manifest.
fn checked_plain(chunk: &ChunkRef, j: SegmentIndex, plain: Vec<u8>) -> Result<Bytes, ReadError> {
    let want = chunk.segment_plain_len(j);
    if plain.len() != want {
        return Err(ReadError::SegmentLength {
            chunk: chunk.name,
            segment: j,
            expected: want,
            got: plain.len(),
        });
    }
    Ok(Bytes::from(plain))
}

fn decrypt_error(chunk: &ChunkRef, source: impl Into<ObjectError>) -> ReadError {
    ReadError::Decrypt {
        index: chunk.index,
        source: source.into(),
    }
}

/// Opens segment `j` of a v2 object whose header is checked, without hashing it.
fn open_v2_segment(
    header: &CheckedHeader,
    chunk: &ChunkRef,
    key: &ChunkKey,
    j: SegmentIndex,
    sealed: &[u8],
) -> Result<Bytes, ReadError> {
    let mut buf = sealed.to_vec();
    let plain = open_in(header, key, j, &mut buf).map_err(|e| decrypt_error(chunk, e))?;
    checked_plain(chunk, j, plain)
}

/// Decrypts (and decodes) segment `j` held in `buf`, giving its plaintext: `buf` itself,
/// cut to length, for a segment stored as it is; a new buffer for a compressed one.
fn open_in(
    header: &CheckedHeader,
    key: &ChunkKey,
    j: SegmentIndex,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, ChunkV2Error> {
    let raw_len = match open_segment_unverified(header, key, j, buf)? {
        Cow::Borrowed(p) => p.len(),
        Cow::Owned(plain) => return Ok(plain),
    };
    buf.truncate(raw_len);
    Ok(std::mem::take(buf))
}

fn segment_bytes<'a>(
    header: &CheckedHeader,
    object: &'a [u8],
    j: SegmentIndex,
) -> Result<&'a [u8], ChunkV2Error> {
    let range = header.segment_range(j).ok_or(ChunkV2Error::NoSegment {
        chunk: *header.name(),
        segment: j,
        count: header.count(),
    })?;
    let usize_of = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    object
        .get(usize_of(range.start)..usize_of(range.end))
        .ok_or(ChunkV2Error::ObjectLength {
            chunk: *header.name(),
            len: object.len(),
            want: header.object_len(),
        })
}

/// A whole chunk object that hashes to its name (v1), or whose header, length and every
/// segment check against its name (v2), in the format its manifest gives. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Checked {
    bytes: Bytes,
    header: Option<CheckedHeader>,
}

impl Checked {
    /// Checks a whole object against `chunk`'s name and format (and, for v2, the layout
    /// its manifest gives); `tier` is named in the error.
    pub fn check(tier: &'static str, chunk: &ChunkRef, bytes: Bytes) -> Result<Self, ReadError> {
        match chunk.format {
            ChunkFormat::V1 => match check_object(&chunk.name, &bytes) {
                Ok(ObjectFormat::V1) => Ok(Checked {
                    bytes,
                    header: None,
                }),
                Ok(found) => Err(wrong_format(tier, chunk, found)),
                Err(e) => Err(object_error(tier, chunk, e)),
            },
            ChunkFormat::V2 { .. } => {
                let header = verify_object_v2(&chunk.name, &bytes)
                    .and_then(|h| check_layout(h, chunk))
                    .map_err(|e| match check_object(&chunk.name, &bytes) {
                        // A sound v1 object where the manifest names v2 chunks.
                        Ok(found) => wrong_format(tier, chunk, found),
                        Err(_) => v2_error(tier, chunk, e),
                    })?;
                Ok(Checked {
                    bytes,
                    header: Some(header),
                })
            }
        }
    }

    /// The object's bytes, as stored.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Decrypts segment `j` (for a v1 object, segment 0 is the whole chunk) with no hash:
    /// the object was checked; AES-GCM authenticates it again as it opens.
    pub fn open_segment(
        &self,
        chunk: &ChunkRef,
        key: &ChunkKey,
        j: SegmentIndex,
    ) -> Result<Bytes, ReadError> {
        match &self.header {
            None => {
                let plain = ChunkFormat::V1
                    .open_checked(&chunk.name, key, self.bytes.to_vec())
                    .map_err(|e| decrypt_error(chunk, e))?;
                checked_plain(chunk, j, plain)
            }
            Some(h) => {
                let sealed =
                    segment_bytes(h, &self.bytes, j).map_err(|e| decrypt_error(chunk, e))?;
                open_v2_segment(h, chunk, key, j, sealed)
            }
        }
    }
}

/// Checks that a v2 header describes the chunk the manifest names: its length, segment
/// size and codec.
fn check_layout(h: CheckedHeader, chunk: &ChunkRef) -> Result<CheckedHeader, ChunkV2Error> {
    if let Some(s) = chunk.format.segment_size() {
        h.check_layout(s, u64::from(chunk.plain_len))?;
    }
    if let Some(c) = chunk.format.codec() {
        h.check_codec(c)?;
    }
    Ok(h)
}

/// A v2 object whose header checks against its name and agrees with the manifest, and
/// whose length is the header's; its segments are hashed one by one as they are used.
#[derive(Clone, Debug)]
pub struct HeaderChecked {
    bytes: Bytes,
    header: CheckedHeader,
}

impl HeaderChecked {
    /// Checks the header at the front of `bytes` against `chunk`'s name, its layout
    /// against the manifest, and the object's length against the header.
    pub fn check(tier: &'static str, chunk: &ChunkRef, bytes: Bytes) -> Result<Self, ReadError> {
        let fail = |e| match check_object(&chunk.name, &bytes) {
            Ok(found) if found != ObjectFormat::of(chunk.format) => {
                wrong_format(tier, chunk, found)
            }
            _ => v2_error(tier, chunk, e),
        };
        let header = verify_header(&chunk.name, &bytes)
            .and_then(|h| check_layout(h, chunk))
            .map_err(fail)?;
        if bytes.len() as u64 != header.object_len() {
            return Err(v2_error(
                tier,
                chunk,
                ChunkV2Error::ObjectLength {
                    chunk: chunk.name,
                    len: bytes.len(),
                    want: header.object_len(),
                },
            ));
        }
        Ok(HeaderChecked { bytes, header })
    }

    /// The object's bytes, as fetched.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Hashes segment `j` against the header (`tier` is named when it fails), then
    /// decrypts it.
    pub fn open_segment(
        &self,
        tier: &'static str,
        chunk: &ChunkRef,
        key: &ChunkKey,
        j: SegmentIndex,
    ) -> Result<Bytes, ReadError> {
        let sealed = segment_bytes(&self.header, &self.bytes, j)
            .and_then(|s| verify_segment(&self.header, j, s).map(|()| s))
            .map_err(|e| v2_error(tier, chunk, e))?;
        open_v2_segment(&self.header, chunk, key, j, sealed)
    }

    /// Hashes every segment against the header: the whole object checked, ready to keep.
    pub fn finish(self, tier: &'static str, chunk: &ChunkRef) -> Result<Checked, ReadError> {
        let header = verify_object_v2(&chunk.name, &self.bytes)
            .and_then(|h| check_layout(h, chunk))
            .map_err(|e| v2_error(tier, chunk, e))?;
        Ok(Checked {
            bytes: self.bytes,
            header: Some(header),
        })
    }
}

/// A chunk file on this worker's disk, open: each segment is read alone (`pread`) and
/// authenticated by AES-GCM as it is decrypted. Its v2 header is hashed against the
/// chunk's name when it is opened (a few hundred bytes), so the rows that place each
/// segment are the chunk's own. The file handle stays readable if the file is evicted
/// meanwhile.
#[derive(Clone, Debug)]
pub struct LocalObject {
    file: Arc<File>,
    path: PathBuf,
    header: Option<CheckedHeader>,
}

/// Opening or reading a local chunk file: an I/O error, or a copy that is not the chunk
/// (rotted, truncated, another chunk's): the cache drops the latter and asks the next
/// tier.
#[derive(Debug)]
pub enum LocalError {
    /// The file could not be read.
    Io(ReadError),
    /// The file is not (any longer) the chunk.
    Rotted(ReadError),
}

impl LocalObject {
    /// Opens `path`, the chunk file of `chunk` on this worker's disk, reading and checking
    /// a v2 header.
    pub fn open(
        tier: &'static str,
        chunk: &ChunkRef,
        file: File,
        path: PathBuf,
    ) -> Result<Self, LocalError> {
        let header = match chunk.format {
            ChunkFormat::V1 => None,
            ChunkFormat::V2 { .. } => {
                let count = chunk.segment_count();
                let mut buf = vec![0u8; ChunkHeader::len_for(count)];
                file.read_exact_at(&mut buf, 0)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => {
                            LocalError::Rotted(ReadError::Rotted {
                                tier,
                                chunk: chunk.name,
                                segment: SegmentIndex(0),
                                reason: format!("{} is shorter than its header", path.display()),
                            })
                        }
                        _ => LocalError::Io(io("read cached chunk", &path)(e)),
                    })?;
                let h = verify_header(&chunk.name, &buf)
                    .and_then(|h| check_layout(h, chunk))
                    .map_err(|e| LocalError::Rotted(v2_error(tier, chunk, e)))?;
                Some(h)
            }
        };
        Ok(LocalObject {
            file: Arc::new(file),
            path,
            header,
        })
    }

    /// Reads segment `j` (a v1 chunk: the whole file) and decrypts it, which
    /// authenticates it.
    pub fn open_segment(
        &self,
        tier: &'static str,
        chunk: &ChunkRef,
        key: &ChunkKey,
        j: SegmentIndex,
    ) -> Result<Bytes, LocalError> {
        let rotted = |reason: String| {
            LocalError::Rotted(ReadError::Rotted {
                tier,
                chunk: chunk.name,
                segment: j,
                reason,
            })
        };
        let (start, len) = match &self.header {
            None => (0, chunk.max_bytes),
            Some(h) => {
                let r = h
                    .segment_range(j)
                    .ok_or_else(|| rotted(format!("its header lists no segment {j}")))?;
                (r.start, r.end - r.start)
            }
        };
        let len = usize::try_from(len).map_err(|_| rotted(format!("segment {j} too large")))?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, start)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    rotted(format!("{} ends before it", self.path.display()))
                }
                _ => LocalError::Io(io("read cached chunk", &self.path)(e)),
            })?;
        let opened = match &self.header {
            None => ChunkFormat::V1
                .open_checked(&chunk.name, key, buf)
                .map_err(|e| decrypt_error(chunk, e))
                .and_then(|p| checked_plain(chunk, j, p)),
            Some(h) => open_in(h, key, j, &mut buf)
                .map_err(|e| decrypt_error(chunk, e))
                .and_then(|p| checked_plain(chunk, j, p)),
        };
        // Bytes of this worker's own that do not open have rotted: another copy may do.
        opened.map_err(|e| rotted(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use lode_format::{ChunkIndex, Codec, ManifestId, RootId, RootSalt, SegmentSize};

    use super::*;

    const PLAIN: usize = 200 * 1024;

    fn v2(segment: u32) -> ChunkFormat {
        ChunkFormat::V2 {
            segment_size: SegmentSize::new(u64::from(segment)).unwrap(),
            codec: Codec::None,
        }
    }

    fn lz4(segment: u32) -> ChunkFormat {
        ChunkFormat::V2 {
            segment_size: SegmentSize::new(u64::from(segment)).unwrap(),
            codec: Codec::Lz4,
        }
    }

    fn plaintext() -> Vec<u8> {
        (0..PLAIN)
            .map(|i| u8::try_from((i * 7 % 251) ^ ((i >> 12) & 0xff)).unwrap_or(0))
            .collect()
    }

    /// A sealed chunk and the reference a manifest in `format` would give for it.
    fn sealed(format: ChunkFormat) -> (ChunkRef, ChunkKey, Bytes) {
        let s = format
            .seal(&RootSalt::from_bytes([7; 32]), plaintext())
            .unwrap();
        let chunk = ChunkRef {
            root: RootId(1),
            manifest: ManifestId::from_bytes([1; 32]),
            index: ChunkIndex(3),
            name: s.name,
            format,
            plain_len: u32::try_from(PLAIN).unwrap(),
            max_bytes: format.object_len(PLAIN),
        };
        (chunk, s.key, Bytes::from(s.ciphertext))
    }

    fn segment_plain(chunk: &ChunkRef, j: u32) -> Vec<u8> {
        let seg = chunk.segment_len() as usize;
        let start = j as usize * seg;
        plaintext()[start..(start + seg).min(PLAIN)].to_vec()
    }

    #[test]
    fn every_segment_opens_right_from_each_kind_of_check() {
        for format in [ChunkFormat::V1, v2(32768), v2(4096), lz4(16384), lz4(4096)] {
            let (chunk, key, bytes) = sealed(format);
            let whole = Checked::check("t", &chunk, bytes.clone()).unwrap();
            for j in 0..u32::try_from(chunk.segment_count()).unwrap() {
                let got = whole.open_segment(&chunk, &key, SegmentIndex(j)).unwrap();
                assert_eq!(got, segment_plain(&chunk, j), "{format:?} {j}");
            }
            if format == ChunkFormat::V1 {
                continue;
            }
            let part = HeaderChecked::check("t", &chunk, bytes.clone()).unwrap();
            let j = u32::try_from(chunk.segment_count() - 1).unwrap();
            let got = part
                .open_segment("t", &chunk, &key, SegmentIndex(j))
                .unwrap();
            assert_eq!(got, segment_plain(&chunk, j));
            part.finish("t", &chunk).unwrap();
        }
    }

    #[test]
    fn a_segment_that_fails_its_hash_is_named_and_the_others_still_open() {
        let (chunk, key, bytes) = sealed(v2(32768));
        let mut b = bytes.to_vec();
        let last = b.len() - 5;
        b[last] ^= 1;
        let part = HeaderChecked::check("az", &chunk, Bytes::from(b.clone())).unwrap();
        let err = part
            .open_segment("az", &chunk, &key, SegmentIndex(6))
            .unwrap_err();
        assert!(err.is_integrity(), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("segment 6") && msg.contains("tier az"),
            "{msg}"
        );
        assert!(msg.contains(&chunk.name.to_string()), "{msg}");
        let ok = part
            .open_segment("az", &chunk, &key, SegmentIndex(0))
            .unwrap();
        assert_eq!(ok, segment_plain(&chunk, 0));
        assert!(part.finish("az", &chunk).unwrap_err().is_integrity());
        assert!(Checked::check("az", &chunk, Bytes::from(b)).is_err());
    }

    #[test]
    fn truncated_grown_and_mislaid_objects_are_refused_naming_the_chunk() {
        let (chunk, _, bytes) = sealed(v2(32768));
        let name = chunk.name.to_string();
        let short = bytes.slice(..bytes.len() - 1);
        let mut grown = bytes.to_vec();
        grown.push(0);
        for (what, b) in [("truncated", short), ("grown", Bytes::from(grown))] {
            let e = HeaderChecked::check("origin", &chunk, b.clone()).unwrap_err();
            assert!(
                e.is_integrity() && e.to_string().contains(&name),
                "{what}: {e}"
            );
            let e = Checked::check("origin", &chunk, b).unwrap_err();
            assert!(
                e.is_integrity() && e.to_string().contains(&name),
                "{what}: {e}"
            );
        }
        // Only the header, no segments.
        let len = ChunkHeader::len_for(chunk.segment_count());
        let e = HeaderChecked::check("origin", &chunk, bytes.slice(..len)).unwrap_err();
        assert!(e.is_integrity(), "{e}");
        // Not even a header.
        let e = HeaderChecked::check("origin", &chunk, bytes.slice(..7)).unwrap_err();
        assert!(e.is_integrity(), "{e}");
    }

    #[test]
    fn a_header_that_checks_but_disagrees_with_the_manifest_is_refused() {
        // Sealed in 16 KiB segments; the manifest says 32 KiB.
        let (mut chunk, _, bytes) = sealed(v2(16384));
        chunk.format = v2(32768);
        for e in [
            HeaderChecked::check("az", &chunk, bytes.clone()).unwrap_err(),
            Checked::check("az", &chunk, bytes.clone()).unwrap_err(),
        ] {
            assert!(e.is_integrity(), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(&chunk.name.to_string()), "{msg}");
        }
        // A plaintext length the manifest does not give.
        let (mut chunk, _, bytes) = sealed(v2(32768));
        chunk.plain_len -= 1;
        assert!(HeaderChecked::check("az", &chunk, bytes).is_err());
    }

    #[test]
    fn a_header_of_another_codec_is_refused() {
        let (mut chunk, _, bytes) = sealed(lz4(16384));
        chunk.format = v2(16384);
        let e = HeaderChecked::check("az", &chunk, bytes).unwrap_err();
        assert!(e.is_integrity(), "{e:?}");
        assert!(e.to_string().contains("codec lz4"), "{e}");
    }

    #[test]
    fn an_object_in_the_other_format_is_refused_as_such() {
        let (v1, _, v1_bytes) = sealed(ChunkFormat::V1);
        let (v2c, _, v2_bytes) = sealed(v2(32768));
        let as_v2 = ChunkRef {
            format: v2c.format,
            ..v1
        };
        let e = HeaderChecked::check("az", &as_v2, v1_bytes).unwrap_err();
        assert!(e.to_string().contains("is a v1 object"), "{e}");
        let as_v1 = ChunkRef {
            format: ChunkFormat::V1,
            max_bytes: v1.max_bytes,
            ..v2c
        };
        let e = Checked::check("az", &as_v1, v2_bytes).unwrap_err();
        assert!(e.to_string().contains("is a v2 object"), "{e}");
    }

    fn local(
        chunk: &ChunkRef,
        bytes: &[u8],
    ) -> (tempfile::TempDir, Result<LocalObject, LocalError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        let file = File::open(&path).unwrap();
        let o = LocalObject::open("disk", chunk, file, path);
        (dir, o)
    }

    #[test]
    fn a_local_copy_is_read_by_segment_and_rot_is_named() {
        for format in [ChunkFormat::V1, v2(32768), lz4(16384)] {
            let (chunk, key, bytes) = sealed(format);
            let (_d, o) = local(&chunk, &bytes);
            let o = o.unwrap();
            let last = u32::try_from(chunk.segment_count() - 1).unwrap();
            let got = o
                .open_segment("disk", &chunk, &key, SegmentIndex(last))
                .unwrap();
            assert_eq!(got, segment_plain(&chunk, last));

            // A flipped byte in the last segment: that segment fails GCM, named.
            let mut b = bytes.to_vec();
            let at = b.len() - 3;
            b[at] ^= 0x80;
            let (_d, o) = local(&chunk, &b);
            let o = o.unwrap();
            match o.open_segment("disk", &chunk, &key, SegmentIndex(last)) {
                Err(LocalError::Rotted(e)) => {
                    assert!(e.is_integrity());
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("segment {last}")), "{msg}");
                }
                other => panic!("{format:?}: {other:?}"),
            }
            if format != ChunkFormat::V1 {
                assert!(
                    o.open_segment("disk", &chunk, &key, SegmentIndex(0))
                        .is_ok()
                );
            }
            // Truncated: the segment past the end is rot, not an I/O error.
            let (_d, o) = local(&chunk, &bytes[..bytes.len() - 100]);
            match o.and_then(|o| o.open_segment("disk", &chunk, &key, SegmentIndex(last))) {
                Err(LocalError::Rotted(_)) => {}
                other => panic!("{format:?}: {other:?}"),
            }
        }
        // A v2 file whose header was changed does not open at all.
        let (chunk, _, bytes) = sealed(v2(32768));
        let mut b = bytes.to_vec();
        b[30] ^= 1;
        assert!(matches!(local(&chunk, &b).1, Err(LocalError::Rotted(_))));
        assert!(matches!(
            local(&chunk, &b[..10]).1,
            Err(LocalError::Rotted(_))
        ));
    }
}
