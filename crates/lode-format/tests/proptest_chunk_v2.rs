//! Property tests for the v2 chunk, where untrusted bytes enter through
//! [`ChunkHeader::parse`] (behind [`verify_header`]) and the segment checks:
//!
//! - arbitrary bytes never panic the header parser, never make it allocate more than the
//!   rows the bytes hold, and whatever it accepts re-encodes to the same bytes;
//! - a mutated header is refused, or (under its name) parses equal to the original;
//! - every plaintext round-trips seal → open, whole and one segment at a time, under
//!   either codec, and seals to the same object twice;
//! - every mutation of a sealed object is refused as corrupt;
//! - under codec 1, a compressed segment whose encoding is anything at all (sealed under
//!   the right key, so that only the decoder stands in the way) opens to its plaintext's
//!   length or is refused, never panicking or allocating more than the segment allows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use lode_format::segment::{KEY_LABEL, MAX_SEGMENTS};
use lode_format::{
    ChunkFormat, ChunkHeader, ChunkName, ChunkV2Error, Codec, ObjectError, ObjectFormat, RootSalt,
    SegmentIndex, SegmentSize, check_object, open_chunk_v2, open_segment, open_segment_into,
    open_segment_unverified, seal_chunk_v2, verify_header, verify_segment,
};
use lode_testkit::seeded_bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::{digest, hmac};

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting the bytes asked for on a thread while that thread
/// measures (proptest and the other tests run alongside, on other threads).
struct Counting;

fn note(bytes: usize) {
    let on = COUNTING.try_with(Cell::get).unwrap_or(false);
    if on {
        let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes)));
    }
}

// SAFETY: every call goes to the system allocator unchanged; counting touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`, and the caller's contract for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning what it returned and the bytes it asked the allocator for.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    ALLOCATED.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, ALLOCATED.with(Cell::get))
}

/// Parses `bytes`, checking the allocation bound and, when accepted, that the header
/// re-encodes to exactly the bytes it was read from.
fn parse_checked(bytes: &[u8]) -> Option<ChunkHeader> {
    let (parsed, allocated) = allocated_by(|| ChunkHeader::parse(bytes));
    // The rows are allocated only after the bytes were found to hold them all: never more
    // than twice the input, and never more than twice the largest header.
    let largest = ChunkHeader::len_for(MAX_SEGMENTS as usize);
    assert!(
        allocated <= 2 * bytes.len() && allocated <= 2 * largest,
        "{allocated} bytes allocated parsing {} bytes",
        bytes.len()
    );
    let h = parsed.ok()?;
    assert!(h.count() <= MAX_SEGMENTS);
    // The count is real: the rows of an accepted header were allocated and seen.
    assert!(
        allocated >= 36 * h.count() as usize,
        "{allocated} bytes counted"
    );
    assert_eq!(h.to_bytes(), &bytes[..h.header_len()]);
    assert_eq!(ChunkHeader::parse(&h.to_bytes()).unwrap(), h);
    Some(h)
}

/// A range of object or plaintext offsets as a range of slice indexes.
fn span(r: &std::ops::Range<u64>) -> std::ops::Range<usize> {
    usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap()
}

fn segment_size() -> impl Strategy<Value = SegmentSize> {
    (12u32..=18).prop_map(|k| SegmentSize::new(1u64 << k).unwrap())
}

/// The fixed part and rows of a header with valid sealed lengths and arbitrary hashes:
/// what a writer would produce, without sealing anything. Under codec 1 each segment is
/// raw or compressed to any size the header allows, as the seed picks.
fn valid_header() -> impl Strategy<Value = Vec<u8>> {
    (segment_size(), 1u32..=300_000, any::<u64>(), 0u8..=1).prop_map(|(s, len, seed, codec)| {
        let n = len.div_ceil(s.bytes());
        let mut b = Vec::new();
        b.extend_from_slice(b"LDC2\x02");
        b.extend_from_slice(&[codec, 0, 0]);
        b.extend_from_slice(&s.bytes().to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        let hashes = seeded_bytes(32 * n as usize, seed);
        let picks = seeded_bytes(4 * n as usize, !seed);
        for j in 0..n {
            let plain = (len - j * s.bytes()).min(s.bytes());
            let kibs = (plain - plain / 8) / 1024;
            let pick = u32::from_le_bytes(
                picks[4 * j as usize..4 * (j as usize + 1)]
                    .try_into()
                    .unwrap(),
            );
            let sealed = if codec == 1 && kibs > 0 && pick % 2 == 0 {
                16 + 1024 * (1 + pick / 2 % kibs)
            } else {
                plain + 16
            };
            b.extend_from_slice(&sealed.to_le_bytes());
            b.extend_from_slice(&hashes[32 * j as usize..32 * (j as usize + 1)]);
        }
        b
    })
}

/// Plaintexts that compress in places: runs of one byte, a short pattern repeated, and
/// noise, in pieces of any length.
fn compressible() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((0u8..3, 1usize..40_000, any::<u64>()), 1..12).prop_map(|parts| {
        let mut p = Vec::new();
        for (kind, len, seed) in parts {
            match kind {
                0 => p.resize(p.len() + len, seed.to_le_bytes()[0]),
                1 => {
                    let period = 1 + usize::try_from(seed % 200).unwrap();
                    let pattern = seeded_bytes(period, seed);
                    p.extend(pattern.iter().cycle().take(len));
                }
                _ => p.extend(seeded_bytes(len, seed)),
            }
        }
        p.truncate(300_000);
        p
    })
}

/// Seals one encoding per segment (the bytes that go under GCM, whatever they are) as a
/// codec-1 chunk of `plain`, from the format as docs/format.md states it rather than
/// through lode's sealer: the key `HMAC-SHA256(salt, "lode chunk v2" ‖ 1 ‖ u32 S ‖
/// SHA-256(plain))`, nonce `u64 j ‖ 4 zero bytes`, rows of sealed length and SHA-256.
/// Returns the name, the key and the object.
fn seal_encoded(
    salt: &[u8; 32],
    plain: &[u8],
    s: SegmentSize,
    encodings: &[Vec<u8>],
) -> (ChunkName, lode_format::ChunkKey, Vec<u8>) {
    let mut msg = KEY_LABEL.to_vec();
    msg.push(1);
    msg.extend_from_slice(&s.bytes().to_le_bytes());
    msg.extend_from_slice(digest::digest(&digest::SHA256, plain).as_ref());
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt), &msg);
    let key: [u8; 32] = tag.as_ref().try_into().unwrap();
    let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
    let n = u32::try_from(encodings.len()).unwrap();
    let mut header = b"LDC2\x02\x01\x00\x00".to_vec();
    header.extend_from_slice(&s.bytes().to_le_bytes());
    header.extend_from_slice(&u32::try_from(plain.len()).unwrap().to_le_bytes());
    header.extend_from_slice(&n.to_le_bytes());
    let mut body = Vec::new();
    for (j, e) in (0u64..).zip(encodings) {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&j.to_le_bytes());
        let mut sealed = e.clone();
        aead.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut sealed,
        )
        .unwrap();
        header.extend_from_slice(&u32::try_from(sealed.len()).unwrap().to_le_bytes());
        header.extend_from_slice(digest::digest(&digest::SHA256, &sealed).as_ref());
        body.extend_from_slice(&sealed);
    }
    let name = ChunkName::of(&header);
    header.extend_from_slice(&body);
    (name, lode_format::ChunkKey::from_bytes(key), header)
}

/// One segment's encoding: raw bytes of its length, arbitrary bytes of a compressed
/// length, or a compressed encoding that may lie in any way — in its length field, its
/// lz4 block (of other bytes, of another length), its padding (longer than it need be,
/// or not zero).
#[derive(Clone, Debug)]
enum Encoding {
    Raw(u64),
    Arbitrary {
        kibs: Index,
        seed: u64,
    },
    Compressed {
        /// A length field other than the block's.
        len: Option<u32>,
        /// A source of another length than the segment's.
        source_len: Option<usize>,
        seed: u64,
        /// Padding of this many KiB rather than the fewest that hold the block.
        kibs: Option<Index>,
        /// A byte changed after encoding.
        damage: Option<(Index, u8)>,
    },
}

fn encoding() -> impl Strategy<Value = Encoding> {
    let compressed = (
        proptest::option::weighted(0.2, any::<u32>()),
        proptest::option::weighted(0.2, 0usize..70_000),
        any::<u64>(),
        proptest::option::weighted(0.2, any::<Index>()),
        proptest::option::weighted(0.2, (any::<Index>(), 1u8..=255)),
    )
        .prop_map(
            |(len, source_len, seed, kibs, damage)| Encoding::Compressed {
                len,
                source_len,
                seed,
                kibs,
                damage,
            },
        );
    prop_oneof![
        1 => any::<u64>().prop_map(Encoding::Raw),
        1 => (any::<Index>(), any::<u64>()).prop_map(|(kibs, seed)| Encoding::Arbitrary { kibs, seed }),
        4 => compressed,
    ]
}

impl Encoding {
    /// The bytes to seal for a segment of `plain_len` bytes: always a length the header
    /// allows (raw when no compressed length is allowed).
    fn bytes(&self, plain_len: usize) -> Vec<u8> {
        let most = (plain_len - plain_len / 8) / 1024;
        match self {
            Encoding::Arbitrary { kibs, seed } if most > 0 => {
                seeded_bytes(1024 * (1 + kibs.index(most)), *seed)
            }
            Encoding::Compressed {
                len,
                source_len,
                seed,
                kibs,
                damage,
            } if most > 0 => {
                // A quarter noise, the rest a run: it compresses to within the limit.
                let source_len = source_len.unwrap_or(plain_len);
                let mut source = seeded_bytes(source_len / 4, *seed);
                source.resize(source_len, 0);
                let block = lz4_flex::block::compress(&source);
                let fewest = (4 + block.len()).div_ceil(1024).clamp(1, most);
                let padded = 1024 * kibs.map_or(fewest, |k| 1 + k.index(most));
                let mut e = len
                    .unwrap_or_else(|| u32::try_from(block.len()).unwrap())
                    .to_le_bytes()
                    .to_vec();
                e.extend_from_slice(&block);
                e.resize(padded, 0);
                if let Some((at, mask)) = damage {
                    e[at.index(padded)] ^= mask;
                }
                e
            }
            Encoding::Raw(seed)
            | Encoding::Arbitrary { seed, .. }
            | Encoding::Compressed { seed, .. } => seeded_bytes(plain_len, *seed),
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR the byte at a position with a non-zero mask.
    Flip(Index, u8),
    /// Insert a byte before a position (or at the end).
    Insert(Index, u8),
    /// Remove the byte at a position.
    Delete(Index),
    /// Keep a strict prefix.
    Truncate(Index),
    /// Overwrite a little-endian u32 at a position (a count, a length, a size).
    Word(Index, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<u32>()).prop_map(|(i, w)| Mutation::Word(i, w)),
    ]
}

impl Mutation {
    /// Applies the mutation to the first `within` bytes of non-empty `bytes` (or, for an
    /// insertion, at their end); the result always differs from `bytes`, except for a
    /// `Word` that writes the value already there.
    fn apply(&self, bytes: &[u8], within: usize) -> Vec<u8> {
        let mut b = bytes.to_vec();
        let len = within.min(b.len());
        match self {
            Mutation::Flip(i, mask) => b[i.index(len)] ^= mask,
            Mutation::Insert(i, v) => b.insert(i.index(len + 1), *v),
            Mutation::Delete(i) => {
                b.remove(i.index(len));
            }
            Mutation::Truncate(i) => b.truncate(i.index(len)),
            Mutation::Word(i, w) => {
                let at = i.index(len.saturating_sub(3).max(1)).min(b.len() - 1);
                for (k, byte) in w.to_le_bytes().into_iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + k) {
                        *slot = byte;
                    }
                }
            }
        }
        b
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Arbitrary bytes: no panic, bounded allocation, canonical when accepted.
    #[test]
    fn check_object_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        name in any::<[u8; 32]>(),
    ) {
        let name = ChunkName::from_bytes(name);
        prop_assert!(check_object(&name, &bytes).is_err());
        let mut v2 = b"LDC2".to_vec();
        v2.extend_from_slice(&bytes);
        prop_assert!(check_object(&name, &v2).is_err());
        prop_assert_eq!(check_object(&ChunkName::of(&bytes), &bytes), Ok(ObjectFormat::V1));
    }

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        parse_checked(&bytes);
        let _ = ChunkHeader::peek_len(&bytes);
    }

    /// Arbitrary bytes behind a valid magic and version, so the fuzzing reaches the
    /// sizes, the count and the rows.
    #[test]
    fn parse_never_panics_past_the_magic(
        codec in 0u8..=1,
        fixed in any::<[u8; 16]>(),
        tail in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut bytes = b"LDC2\x02".to_vec();
        bytes.extend_from_slice(&[codec, 0, 0]);
        bytes.extend_from_slice(&fixed[..12]);
        bytes.extend_from_slice(&tail);
        parse_checked(&bytes);
    }

    /// Codec 1 headers whose fixed part is sound and whose rows are anything: each row's
    /// sealed length is accepted exactly when it is raw or a padded compressed length
    /// that saves an eighth.
    #[test]
    fn codec_1_rows_are_accepted_by_the_rule_alone(
        s in (12u32..=15).prop_map(|k| SegmentSize::new(1u64 << k).unwrap()),
        len in 1u32..=70_000,
        lens in proptest::collection::vec(
            prop_oneof![any::<u32>(), (0u32..80).prop_map(|k| 16 + 1024 * k), 0u32..70_000],
            18,
        ),
    ) {
        let n = len.div_ceil(s.bytes());
        let mut b = b"LDC2\x02\x01\x00\x00".to_vec();
        b.extend_from_slice(&s.bytes().to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        let mut allowed = true;
        for j in 0..n {
            let plain = (len - j * s.bytes()).min(s.bytes());
            let sealed = lens[j as usize % lens.len()];
            let body = sealed.wrapping_sub(16);
            allowed &= sealed == plain + 16
                || (sealed > 16 && body.is_multiple_of(1024) && body <= plain - plain / 8);
            b.extend_from_slice(&sealed.to_le_bytes());
            b.extend_from_slice(&[j.to_le_bytes()[0]; 32]);
        }
        prop_assert_eq!(parse_checked(&b).is_some(), allowed);
    }

    /// A valid header with several mutations: refused, or accepted and canonical.
    #[test]
    fn mutated_headers_parse_canonically_or_not_at_all(
        header in valid_header(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        prop_assert!(parse_checked(&header).is_some());
        let mut bytes = header;
        for m in &mutations {
            if !bytes.is_empty() {
                bytes = m.apply(&bytes, bytes.len());
            }
        }
        parse_checked(&bytes);
    }

    /// Under its name, a mutated header is refused, or parses equal to the original
    /// (bytes appended after it change nothing).
    #[test]
    fn mutated_header_under_its_name_is_refused_or_equal(
        seed in any::<u64>(),
        len in 1usize..70_000,
        s in (12u32..=15).prop_map(|k| SegmentSize::new(1u64 << k).unwrap()),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let plain = seeded_bytes(len, seed);
        let c = seal_chunk_v2(&RootSalt::from_bytes([9; 32]), &plain, s, Codec::None).unwrap();
        let original = verify_header(&c.name, &c.object).unwrap();
        let mut header = c.object[..c.header_len].to_vec();
        for m in &mutations {
            if !header.is_empty() {
                header = m.apply(&header, header.len());
            }
        }
        match verify_header(&c.name, &header) {
            Err(e) => prop_assert!(e.to_string().contains("corrupt"), "{}", e),
            Ok(h) => prop_assert_eq!(h, original),
        }
    }

    /// Every plaintext round-trips, whole and segment by segment, and seals the same way
    /// twice.
    #[test]
    fn seal_open_round_trip(
        seed in any::<u64>(),
        len in 1usize..300_000,
        s in segment_size(),
        salt in any::<[u8; 32]>(),
    ) {
        let salt = RootSalt::from_bytes(salt);
        let plain = seeded_bytes(len, seed);
        let c = seal_chunk_v2(&salt, &plain, s, Codec::None).unwrap();
        prop_assert_eq!(&open_chunk_v2(&c.name, &c.key, &c.object).unwrap(), &plain);
        let again = seal_chunk_v2(&salt, &plain, s, Codec::None).unwrap();
        prop_assert_eq!(again.name, c.name);
        prop_assert_eq!(&again.object, &c.object);

        let h = verify_header(&c.name, &c.object[..c.header_len]).unwrap();
        h.check_layout(s, len as u64).unwrap();
        prop_assert_eq!(h.object_len(), c.object.len() as u64);
        let mut next = 0u64;
        for j in (0..h.count()).map(SegmentIndex) {
            let r = h.segment_range(j).unwrap();
            let p = h.segment_plain_range(j).unwrap();
            prop_assert_eq!(p.start, next);
            next = p.end;
            let sealed = &c.object[span(&r)];
            let want = &plain[span(&p)];
            prop_assert_eq!(open_segment(&h, &c.key, j, sealed).unwrap(), want);
        }
        prop_assert_eq!(next, len as u64);
    }

    /// Any flip, insertion, deletion or truncation of an object is refused as corrupt;
    /// a changed segment is refused by its hash, and by its tag when the hash is skipped.
    #[test]
    fn mutated_object_is_refused_as_corrupt(
        seed in any::<u64>(),
        len in 1usize..70_000,
        s in (12u32..=14).prop_map(|k| SegmentSize::new(1u64 << k).unwrap()),
        mutation in mutation(),
    ) {
        let plain = seeded_bytes(len, seed);
        let c = seal_chunk_v2(&RootSalt::from_bytes([3; 32]), &plain, s, Codec::None).unwrap();
        let bad = mutation.apply(&c.object, c.object.len());
        prop_assume!(bad != c.object);
        let err = open_chunk_v2(&c.name, &c.key, &bad).unwrap_err();
        prop_assert!(err.to_string().contains("corrupt"), "{:?}: {}", mutation, err);
        // The keyless check a store or cache makes refuses it too, in either format.
        let err = check_object(&c.name, &bad).unwrap_err();
        prop_assert!(err.to_string().contains("corrupt"), "{:?}: {}", mutation, err);
        // The same bytes renamed by their own header still do not open as the chunk.
        if let Some(name) = ChunkHeader::peek_len(&bad)
            .ok()
            .and_then(|n| bad.get(..n))
            .map(ChunkName::of)
            && name != c.name
        {
            prop_assert!(open_chunk_v2(&name, &c.key, &bad).is_err());
        }

        // A flip inside one segment: refused by the hash and by GCM.
        let h = verify_header(&c.name, &c.object).unwrap();
        let j = SegmentIndex(u32::try_from(seed % u64::from(h.count())).unwrap());
        let r = h.segment_range(j).unwrap();
        let mut sealed = c.object[span(&r)].to_vec();
        let at = usize::try_from(seed >> 32).unwrap() % sealed.len();
        sealed[at] ^= 0x20;
        prop_assert!(verify_segment(&h, j, &sealed).is_err());
        prop_assert!(open_segment_unverified(&h, &c.key, j, &mut sealed).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Under codec 1 every plaintext round-trips, whole, one segment at a time and into a
    /// caller's buffer, and seals to the same object twice; every row is raw or a
    /// compressed length the header allows, and the object is within the format's bound.
    #[test]
    fn lz4_seal_open_round_trip(
        plain in compressible(),
        s in (12u32..=16).prop_map(|k| SegmentSize::new(1u64 << k).unwrap()),
        salt in any::<[u8; 32]>(),
    ) {
        let salt = RootSalt::from_bytes(salt);
        let c = seal_chunk_v2(&salt, &plain, s, Codec::Lz4).unwrap();
        prop_assert_eq!(&open_chunk_v2(&c.name, &c.key, &c.object).unwrap(), &plain);
        let again = seal_chunk_v2(&salt, &plain, s, Codec::Lz4).unwrap();
        prop_assert_eq!(again.name, c.name);
        prop_assert_eq!(&again.object, &c.object);
        prop_assert_eq!(check_object(&c.name, &c.object), Ok(ObjectFormat::V2));
        let format = ChunkFormat::V2 { segment_size: s, codec: Codec::Lz4 };
        prop_assert!(c.object.len() as u64 <= format.object_len(plain.len()));
        prop_assert_eq!(&format.open_checked(&c.name, &c.key, c.object.clone()).unwrap(), &plain);

        let h = verify_header(&c.name, &c.object[..c.header_len]).unwrap();
        prop_assert_eq!(h.codec(), Codec::Lz4);
        for j in (0..h.count()).map(SegmentIndex) {
            let r = h.segment_range(j).unwrap();
            let want = &plain[span(&h.segment_plain_range(j).unwrap())];
            let sealed = &c.object[span(&r)];
            let body = sealed.len() - 16;
            prop_assert!(
                body == want.len()
                    || (body.is_multiple_of(1024) && body <= want.len() - want.len() / 8),
                "segment {} of {} bytes sealed as {}", j, want.len(), sealed.len()
            );
            prop_assert_eq!(h.segment_compressed(j), Some(body != want.len()));
            prop_assert_eq!(open_segment(&h, &c.key, j, sealed).unwrap(), want);
            let mut buf = sealed.to_vec();
            let mut out = vec![0; want.len()];
            open_segment_into(&h, &c.key, j, &mut buf, &mut out).unwrap();
            prop_assert_eq!(&out[..], want);
        }
    }

    /// Compressed segments with every kind of lie in them, sealed under the right key so
    /// that the hash and the tag pass: opening gives exactly the segment's plaintext
    /// length or a decode error naming the chunk and segment; it never panics, and it
    /// allocates no more than the sealed bytes, the plaintext and an error message.
    #[test]
    fn lz4_open_never_panics_on_any_encoding(
        len in 1usize..70_000,
        s in (12u32..=15).prop_map(|k| SegmentSize::new(1u64 << k).unwrap()),
        encodings in proptest::collection::vec(encoding(), 18),
    ) {
        let plain = seeded_bytes(len, 11);
        let segment = s.bytes_usize();
        let n = len.div_ceil(segment);
        let bytes: Vec<Vec<u8>> = (0..n)
            .map(|j| encodings[j].bytes((len - j * segment).min(segment)))
            .collect();
        let (name, key, object) = seal_encoded(&[6; 32], &plain, s, &bytes);
        let h = verify_header(&name, &object).unwrap();
        for j in (0..h.count()).map(SegmentIndex) {
            let sealed = &object[span(&h.segment_range(j).unwrap())];
            let want = h.segment_plain_len(j).unwrap() as usize;
            let (opened, allocated) = allocated_by(|| open_segment(&h, &key, j, sealed));
            prop_assert!(
                allocated <= sealed.len() + want + 1024,
                "{} bytes allocated opening {} sealed bytes of a {}-byte segment",
                allocated, sealed.len(), want
            );
            match opened {
                Ok(p) => prop_assert_eq!(p.len(), want),
                Err(ChunkV2Error::Decode { chunk, segment, .. }) => {
                    prop_assert_eq!(chunk, name);
                    prop_assert_eq!(segment, j);
                }
                Err(e) => prop_assert!(false, "segment {}: {}", j, e),
            }
            let mut buf = sealed.to_vec();
            let mut out = vec![0; want];
            let (into, allocated) =
                allocated_by(|| open_segment_into(&h, &key, j, &mut buf, &mut out));
            prop_assert!(allocated <= 1024, "{} bytes allocated decoding into a buffer", allocated);
            prop_assert_eq!(into.is_ok(), open_segment(&h, &key, j, sealed).is_ok());
        }
        let (whole, allocated) = allocated_by(|| open_chunk_v2(&name, &key, &object));
        let bound = len + 16 + 3 * (segment + 16) + 64 * n + 4096 + h.header_len();
        prop_assert!(allocated <= bound, "{} bytes allocated opening the object", allocated);
        let format = ChunkFormat::V2 { segment_size: s, codec: Codec::Lz4 };
        match (whole, format.open_checked(&name, &key, object.clone())) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(a.len(), len);
                prop_assert_eq!(a, b);
            }
            (Err(a), Err(ObjectError::V2(b))) => {
                prop_assert!(matches!(a, ChunkV2Error::Decode { .. }), "{}", a);
                prop_assert_eq!(a, b);
            }
            (a, b) => prop_assert!(false, "open_chunk_v2 {:?}, open_checked {:?}", a, b),
        }
        // Keyless, the object is sound: only a key holder can tell.
        prop_assert_eq!(check_object(&name, &object), Ok(ObjectFormat::V2));
    }
}

/// A renamed object whose header was changed is refused by GCM even though its name
/// checks: the rows are only hashes, the key and nonces still bind every segment.
#[test]
fn a_header_renamed_after_swapping_rows_does_not_open() {
    let s = SegmentSize::new(4096).unwrap();
    let plain = seeded_bytes(3 * 4096, 7);
    let c = seal_chunk_v2(&RootSalt::from_bytes([1; 32]), &plain, s, Codec::None).unwrap();
    let h = verify_header(&c.name, &c.object).unwrap();
    // Swap segments 0 and 1 and their rows, then name the result by its new header.
    let mut bad = c.object.clone();
    let (r0, r1) = (
        h.segment_range(SegmentIndex(0)).unwrap(),
        h.segment_range(SegmentIndex(1)).unwrap(),
    );
    let (r0, r1) = (span(&r0), span(&r1));
    let seg0 = c.object[r0.clone()].to_vec();
    bad.copy_within(r1.clone(), r0.start);
    bad[r1].copy_from_slice(&seg0);
    let rows = c.object[20..20 + 72].to_vec();
    bad[20..56].copy_from_slice(&rows[36..]);
    bad[56..92].copy_from_slice(&rows[..36]);
    let name = ChunkName::of(&bad[..c.header_len]);
    let err = open_chunk_v2(&name, &c.key, &bad).unwrap_err();
    assert!(
        err.to_string().contains("segment 0 does not decrypt"),
        "{err}"
    );
}
