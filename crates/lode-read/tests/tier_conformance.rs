//! One conformance suite for every ciphertext tier: the checks are written once against
//! a small [`Harness`] (the tier, and a way to damage its stored copy from outside) and
//! run against the memory tier, the disk tier, and the AZ tier over six lode cache nodes
//! and over six real memcached processes (k = 4, m = 2), each for v1 and v2 objects.
//!
//! What a tier must do: miss a chunk it was never given; give back what it was given,
//! as the `Found` variant that states its trust contract (memory: `Checked`, disk:
//! `Local`, AZ: `HeaderChecked` for v2 and `Checked` for v1), every segment opening to
//! the right plaintext; forget on `remove`; never let a damaged copy open to wrong bytes;
//! keep its byte bound; and, for `drop_memory`, forget only what lives in memory. Then
//! one end-to-end read per stack (tier → origin) through `ChunkCache`: right bytes, a
//! second read served by the tier, and a damaged copy refused and replaced.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lode_az::memcache::Connection;
use lode_az::stripe::{Codec, shard_len};
use lode_az::{AzClient, AzConfig};
use lode_cache_node::{Node, NodeConfig, NodeHandle};
use lode_format::{
    ChunkFormat, ChunkHeader, ChunkIndex, ChunkKey, ManifestId, RootId, RootSalt, SegmentIndex,
    SegmentSize,
};
use lode_read::{
    AzTier, CacheBuilder, Checked, ChunkRef, ChunkTier, DiskTier, Found, LocalError, MemoryTier,
    ReadError, StoreOrigin,
};
use lode_store::Store;
use lode_testkit::{Memcached, seeded_bytes, which};

/// The code the AZ fleets use.
const K: usize = 4;
const M: usize = 2;

/// Plaintext bytes of every sample chunk: three full 32 KiB segments and a short one in
/// v2, so the last segment's length is checked too.
const PLAIN_LEN: usize = 3 * 32 * 1024 + 5000;

fn formats() -> [ChunkFormat; 3] {
    [
        ChunkFormat::V1,
        ChunkFormat::V2 {
            segment_size: SegmentSize::DEFAULT,
            codec: lode_format::Codec::None,
        },
        ChunkFormat::RECOMMENDED,
    ]
}

fn label(format: ChunkFormat) -> &'static str {
    match format {
        ChunkFormat::V1 => "v1",
        ChunkFormat::V2 {
            codec: lode_format::Codec::None,
            ..
        } => "v2",
        ChunkFormat::V2 { .. } => "v2-lz4",
    }
}

/// A sealed chunk, and how the tiers know it.
struct Sample {
    chunk: ChunkRef,
    key: ChunkKey,
    plain: Vec<u8>,
    object: Bytes,
    checked: Checked,
}

impl Sample {
    /// A chunk of seeded bytes sealed in `format`; distinct seeds give distinct chunks.
    /// Every other 16 KiB is text, so lz4 compresses those segments and stores the rest
    /// raw: both kinds of segment are checked.
    fn new(format: ChunkFormat, seed: u64) -> Sample {
        let mut plain = seeded_bytes(PLAIN_LEN, seed);
        let text = b"the quick brown lode jumps over the lazy chunk; ";
        for (i, b) in plain.iter_mut().enumerate() {
            if (i / 16384) % 2 == 0 {
                *b = text[i % text.len()];
            }
        }
        let sealed = format
            .seal(&RootSalt::from_bytes([0x5a; 32]), plain.clone())
            .unwrap();
        let chunk = ChunkRef {
            root: RootId(1),
            manifest: ManifestId::from_bytes([7; 32]),
            index: ChunkIndex(seed),
            name: sealed.name,
            format,
            plain_len: u32::try_from(PLAIN_LEN).unwrap(),
            max_bytes: format.object_len(PLAIN_LEN),
        };
        let object = Bytes::from(sealed.ciphertext);
        assert!(object.len() as u64 <= chunk.max_bytes);
        let checked = Checked::check("test", &chunk, object.clone()).unwrap();
        Sample {
            chunk,
            key: sealed.key,
            plain,
            object,
            checked,
        }
    }

    fn segments(&self) -> Vec<SegmentIndex> {
        (0..u32::try_from(self.chunk.segment_count()).unwrap())
            .map(SegmentIndex)
            .collect()
    }

    fn last_segment(&self) -> SegmentIndex {
        *self.segments().last().unwrap()
    }

    /// The plaintext of segment `j`.
    fn plain_of(&self, j: SegmentIndex) -> &[u8] {
        let seg = usize::try_from(self.chunk.segment_len()).unwrap();
        let start = usize::try_from(j.0).unwrap() * seg;
        &self.plain[start..(start + seg).min(self.plain.len())]
    }

    /// Where segment `j` lies in the object (a v1 object is one segment).
    fn sealed_range(&self, j: SegmentIndex) -> Range<usize> {
        match self.chunk.format {
            ChunkFormat::V1 => 0..self.object.len(),
            ChunkFormat::V2 { .. } => {
                let r = ChunkHeader::parse(&self.object)
                    .unwrap()
                    .segment_range(j)
                    .unwrap();
                usize::try_from(r.start).unwrap()..usize::try_from(r.end).unwrap()
            }
        }
    }

    /// The segments whose sealed bytes meet `bytes` of the object: every one when the
    /// bytes reach into the v2 header, which places and names them all.
    fn segments_meeting(&self, bytes: Range<usize>) -> Vec<SegmentIndex> {
        let header = self.sealed_range(SegmentIndex(0)).start;
        self.segments()
            .into_iter()
            .filter(|j| {
                let r = self.sealed_range(*j);
                bytes.start < header || (bytes.start < r.end && r.start < bytes.end)
            })
            .collect()
    }

    /// The object with byte `at` flipped.
    fn flipped(&self, at: usize) -> Vec<u8> {
        let mut v = self.object.to_vec();
        v[at] ^= 0x40;
        v
    }
}

/// How the suite damages the stored copy of a chunk.
#[derive(Clone, Debug)]
enum Damage {
    /// Byte `at` of the object flipped, in every copy the tier keeps.
    Flip { at: usize },
    /// The object cut to its first `len` bytes, in every copy the tier keeps.
    Truncate { len: usize },
    /// `nodes` of the chunk's stripes overwritten with bytes that are no stripe (AZ).
    GarbageStripes { nodes: usize },
    /// The one stripe holding byte `at` replaced by a well-formed stripe (right name,
    /// header and CRC) of the object with that byte flipped: a node that lies (AZ).
    LyingStripe { at: usize },
}

/// What a damaged tier may answer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    /// No right copy exists: these segments must not open; the others must open right
    /// if the tier returns anything.
    Bad(Vec<SegmentIndex>),
    /// A right copy can still be rebuilt: the tier must serve it, every segment right.
    Served,
    /// The tier must miss.
    Miss,
    /// A right copy exists, but the tier may return the lie as long as it does not open
    /// to wrong bytes.
    NoWrongBytes,
}

/// Which `Found` a tier returns: its trust contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trust {
    Checked,
    HeaderChecked,
    Local,
    Unchecked,
}

fn trust(found: &Found) -> Trust {
    match found {
        Found::Checked(_) => Trust::Checked,
        Found::HeaderChecked(_) => Trust::HeaderChecked,
        Found::Local(_) => Trust::Local,
        Found::Unchecked(_) => Trust::Unchecked,
    }
}

/// Opens segment `j` from what a tier found, as the cache would.
fn open(
    tier: &'static str,
    found: &Found,
    s: &Sample,
    j: SegmentIndex,
) -> Result<Bytes, ReadError> {
    match found {
        Found::Checked(o) => o.open_segment(&s.chunk, &s.key, j),
        Found::HeaderChecked(o) => o.open_segment(tier, &s.chunk, &s.key, j),
        Found::Local(o) => o
            .open_segment(tier, &s.chunk, &s.key, j)
            .map_err(|e| match e {
                LocalError::Rotted(e) | LocalError::Io(e) => e,
            }),
        Found::Unchecked(b) => {
            Checked::check(tier, &s.chunk, b.clone())?.open_segment(&s.chunk, &s.key, j)
        }
    }
}

/// A tier under test, and what the suite needs to reach behind it.
#[async_trait]
trait Harness: Send + Sync {
    /// The tier.
    fn tier(&self) -> Arc<dyn ChunkTier>;

    /// The `Found` it returns for a chunk in `format`.
    fn contract(&self, format: ChunkFormat) -> Trust;

    /// A new tier of the same kind bounded to `capacity` bytes, or `None` when its bound
    /// is not the worker's to set (the AZ fleet's nodes keep their own).
    fn bounded(&self, capacity: u64) -> Option<Arc<dyn ChunkTier>>;

    /// Whether `drop_memory` forgets what the tier holds.
    fn forgets_on_drop_memory(&self) -> bool;

    /// Damages the tier's stored copy of `s`; `false` when the copy cannot be reached
    /// from outside the tier, or the tier has no such part (stripes on a local disk).
    async fn damage(&self, s: &Sample, how: &Damage) -> bool;

    /// Damages only this kind of tier can suffer, with what it must answer after each.
    fn own_damages(&self, s: &Sample) -> Vec<(Damage, Expect)>;
}

/// Damages every tier can suffer in its stored bytes, with what must follow.
fn common_damages(s: &Sample) -> Vec<(Damage, Expect)> {
    let len = s.object.len();
    let last = s.last_segment();
    let mid = |j| {
        let r = s.sealed_range(j);
        r.start + (r.end - r.start) / 2
    };
    let mut out = vec![
        // In a segment's ciphertext.
        (
            Damage::Flip { at: mid(last) },
            s.segments_meeting(mid(last)..mid(last) + 1),
        ),
        // In the last GCM tag.
        (Damage::Flip { at: len - 1 }, vec![last]),
        // Cut inside the last segment.
        (Damage::Truncate { len: len - 5 }, vec![last]),
    ];
    if let ChunkFormat::V2 { .. } = s.chunk.format {
        let one = SegmentIndex(1);
        out.push((Damage::Flip { at: mid(one) }, vec![one]));
        // In the header's segment rows: the name no longer checks.
        out.push((Damage::Flip { at: 40 }, s.segments()));
        // Cut inside the header.
        out.push((Damage::Truncate { len: 20 }, s.segments()));
    }
    out.into_iter()
        .map(|(d, bad)| (d, Expect::Bad(bad)))
        .collect()
}

/// Seeds: one range per check and format, so no check sees another's chunks.
fn seed(check: u64, format: ChunkFormat, i: u64) -> u64 {
    let f = match format {
        ChunkFormat::V1 => 0,
        ChunkFormat::V2 { .. } => 1,
    };
    check * 10_000 + f * 1000 + i + 1
}

/// Every check, for v1 and v2 objects.
async fn conformance(h: &dyn Harness) {
    for format in formats() {
        never_put_is_a_miss(h, format).await;
        put_then_get_opens_every_segment(h, format).await;
        put_again_keeps(h, format).await;
        remove_forgets(h, format).await;
        damage_never_opens_wrong(h, format).await;
        usage_stays_bounded(h, format).await;
        drop_memory(h, format).await;
    }
}

/// Check 1: A chunk never put is a miss, whichever segment is asked for.
async fn never_put_is_a_miss(h: &dyn Harness, format: ChunkFormat) {
    let tier = h.tier();
    let s = Sample::new(format, seed(1, format, 0));
    for j in [SegmentIndex(0), s.last_segment()] {
        let got = tier.get(&s.chunk, j).await;
        assert!(
            matches!(got, Ok(None)),
            "{} {}: get of a chunk never put gave {got:?}",
            tier.name(),
            label(format)
        );
    }
}

/// Asserts `found` is the tier's contract and every segment opens to its plaintext.
fn assert_whole(h: &dyn Harness, tier: &'static str, s: &Sample, found: &Found, what: &str) {
    let format = label(s.chunk.format);
    assert_eq!(
        trust(found),
        h.contract(s.chunk.format),
        "{tier} {format}: {what}: wrong Found variant"
    );
    for j in s.segments() {
        let got = open(tier, found, s, j)
            .unwrap_or_else(|e| panic!("{tier} {format}: {what}: segment {j} does not open: {e}"));
        assert!(
            got == s.plain_of(j),
            "{tier} {format}: {what}: segment {j} opened to wrong bytes"
        );
    }
}

/// Check 2: What was put comes back, as the tier's contract says, every segment right.
async fn put_then_get_opens_every_segment(h: &dyn Harness, format: ChunkFormat) {
    let tier = h.tier();
    let s = Sample::new(format, seed(2, format, 0));
    tier.put(&s.chunk, &s.checked).await;
    for j in s.segments() {
        let found = tier
            .get(&s.chunk, j)
            .await
            .unwrap_or_else(|e| panic!("{} {}: get: {e}", tier.name(), label(format)))
            .unwrap_or_else(|| panic!("{} {}: a chunk put is missing", tier.name(), label(format)));
        assert_whole(h, tier.name(), &s, &found, &format!("get for segment {j}"));
    }
}

/// Check 2b: Putting a chunk the tier already holds keeps it (two fetches of one chunk may
/// both fill a tier).
async fn put_again_keeps(h: &dyn Harness, format: ChunkFormat) {
    let tier = h.tier();
    let s = Sample::new(format, seed(8, format, 0));
    tier.put(&s.chunk, &s.checked).await;
    let before = tier.usage();
    tier.put(&s.chunk, &s.checked).await;
    assert_eq!(
        tier.usage(),
        before,
        "{}: a second put changed the usage",
        tier.name()
    );
    let found = tier
        .get(&s.chunk, SegmentIndex(0))
        .await
        .unwrap_or_else(|e| panic!("{} {}: get: {e}", tier.name(), label(format)))
        .unwrap_or_else(|| {
            panic!(
                "{} {}: a chunk put twice is missing",
                tier.name(),
                label(format)
            )
        });
    assert_whole(h, tier.name(), &s, &found, "after a second put");
}

/// Check 3: A chunk removed is a miss. A local tier says it holds a chunk put and not
/// one removed (prefetch's accounting asks); a remote one never claims to.
async fn remove_forgets(h: &dyn Harness, format: ChunkFormat) {
    let tier = h.tier();
    let s = Sample::new(format, seed(3, format, 0));
    assert!(
        !tier.contains(&s.chunk),
        "{}: holds a chunk never put",
        tier.name()
    );
    tier.put(&s.chunk, &s.checked).await;
    assert_eq!(
        tier.contains(&s.chunk),
        !tier.remote(),
        "{} {}: contains after put",
        tier.name(),
        label(format)
    );
    let before = tier.get(&s.chunk, SegmentIndex(0)).await.unwrap();
    assert!(
        before.is_some(),
        "{} {}: a chunk put is missing",
        tier.name(),
        label(format)
    );
    tier.remove(&s.chunk).await;
    assert!(
        !tier.contains(&s.chunk),
        "{}: holds a chunk removed",
        tier.name()
    );
    let after = tier.get(&s.chunk, SegmentIndex(0)).await;
    assert!(
        matches!(after, Ok(None)),
        "{} {}: get after remove gave {after:?}",
        tier.name(),
        label(format)
    );
}

/// Check 4: A damaged copy never opens to wrong bytes; undamaged segments still open right.
async fn damage_never_opens_wrong(h: &dyn Harness, format: ChunkFormat) {
    let tier = h.tier();
    let name = tier.name();
    let probe = Sample::new(format, seed(4, format, 0));
    let cases: Vec<(Damage, Expect)> = common_damages(&probe)
        .into_iter()
        .chain(h.own_damages(&probe))
        .collect();
    for (i, (how, expect)) in cases.into_iter().enumerate() {
        // A chunk of its own per case: nothing from an earlier case (a read repair still
        // under way) can reach it.
        let s = Sample::new(format, seed(4, format, u64::try_from(i).unwrap() + 1));
        tier.put(&s.chunk, &s.checked).await;
        if !h.damage(&s, &how).await {
            continue;
        }
        let what = format!("{name} {}: after {how:?}", label(format));
        // Ask for the segment a read of the damage would wait for.
        let asked = match &expect {
            Expect::Bad(bad) => bad.first().copied().unwrap_or(SegmentIndex(0)),
            _ => SegmentIndex(0),
        };
        let found = match tier.get(&s.chunk, asked).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                assert_ne!(
                    expect,
                    Expect::Served,
                    "{what}: a right copy exists, yet a miss"
                );
                continue;
            }
            Err(e) => {
                assert!(
                    e.is_integrity(),
                    "{what}: get failed, not as an integrity failure: {e}"
                );
                assert!(
                    !matches!(expect, Expect::Served | Expect::Miss),
                    "{what}: expected {expect:?}, got {e}"
                );
                continue;
            }
        };
        assert_ne!(
            expect,
            Expect::Miss,
            "{what}: expected a miss, got {:?}",
            trust(&found)
        );
        assert_eq!(
            trust(&found),
            h.contract(format),
            "{what}: wrong Found variant"
        );
        for j in s.segments() {
            let bad = matches!(&expect, Expect::Bad(bad) if bad.contains(&j));
            match open(name, &found, &s, j) {
                Ok(plain) => {
                    assert!(
                        plain == s.plain_of(j),
                        "{what}: segment {j} opened to WRONG BYTES"
                    );
                    assert!(
                        !bad,
                        "{what}: segment {j} opened though no right copy exists"
                    );
                }
                Err(e) => {
                    assert!(
                        e.is_integrity(),
                        "{what}: segment {j} failed, not as an integrity failure: {e}"
                    );
                    assert!(
                        bad || expect == Expect::NoWrongBytes,
                        "{what}: undamaged segment {j} does not open: {e}"
                    );
                }
            }
        }
    }
}

/// Check 5: Usage stays within the bound after more than the bound is put; the newest chunk
/// is still held and the oldest is gone.
async fn usage_stays_bounded(h: &dyn Harness, format: ChunkFormat) {
    let capacity = 3 * format.object_len(PLAIN_LEN) + 100;
    let tiny = u64::try_from(PLAIN_LEN / 2).unwrap();
    let Some(tier) = h.bounded(capacity) else {
        let tier = h.tier();
        if let Some((used, bound)) = tier.usage() {
            assert!(
                used <= bound,
                "{}: uses {used} of {bound} bytes",
                tier.name()
            );
        }
        return;
    };
    let name = tier.name();
    let samples: Vec<Sample> = (0..7)
        .map(|i| Sample::new(format, seed(5, format, i)))
        .collect();
    for s in &samples {
        tier.put(&s.chunk, &s.checked).await;
        let (used, bound) = tier.usage().expect("a bounded tier reports its usage");
        assert_eq!(bound, capacity, "{name}: the bound it was given");
        assert!(
            used <= bound,
            "{name} {}: uses {used} of {bound} bytes",
            label(format)
        );
    }
    let newest = samples.last().unwrap();
    let found = tier.get(&newest.chunk, SegmentIndex(0)).await.unwrap();
    let found = found.unwrap_or_else(|| panic!("{name}: the chunk put last is gone"));
    assert_whole(h, name, newest, &found, "newest after eviction");
    let oldest = tier.get(&samples[0].chunk, SegmentIndex(0)).await.unwrap();
    assert!(oldest.is_none(), "{name}: 7 chunks held in room for 3");

    // A chunk larger than the whole bound is not kept at all.
    let small = h.bounded(tiny).unwrap();
    let s = &samples[0];
    small.put(&s.chunk, &s.checked).await;
    assert_eq!(
        small.usage(),
        Some((0, tiny)),
        "{name}: kept a chunk over its bound"
    );
    let got = small.get(&s.chunk, SegmentIndex(0)).await.unwrap();
    assert!(got.is_none(), "{name}: serves a chunk over its bound");
}

/// Check 6: `drop_memory`: a memory tier forgets, the others keep.
async fn drop_memory(h: &dyn Harness, format: ChunkFormat) {
    let tier = h.tier();
    let s = Sample::new(format, seed(6, format, 0));
    tier.put(&s.chunk, &s.checked).await;
    tier.drop_memory();
    let got = tier.get(&s.chunk, SegmentIndex(0)).await.unwrap();
    if h.forgets_on_drop_memory() {
        assert!(
            got.is_none(),
            "{}: still holds a chunk after drop_memory",
            tier.name()
        );
    } else {
        let found = got.unwrap_or_else(|| panic!("{}: drop_memory lost a chunk", tier.name()));
        assert_whole(h, tier.name(), &s, &found, "after drop_memory");
    }
}

/// The tier in front of a real origin (a local store), through `ChunkCache` with no
/// decrypted segments kept, so every read reaches the tiers: the first read comes from
/// the origin, the second from the tier; a copy damaged in the tier is refused, read
/// from the origin, and replaced.
async fn through_cache(h: &dyn Harness) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    for format in formats() {
        let tier = h.tier();
        let name = tier.name();
        let what = |step: &str| format!("{name}→origin {}: {step}", label(format));
        let s = Sample::new(format, seed(7, format, 0));
        store
            .put_chunk(s.chunk.root, &s.chunk.name, s.object.clone())
            .await
            .unwrap();
        let cache = CacheBuilder::new()
            .decrypted_bytes(0)
            .tier(Arc::clone(&tier))
            .origin(Arc::new(StoreOrigin::new(store.clone())))
            .build()
            .unwrap();
        let read_all = |step: &'static str| {
            let (cache, s) = (Arc::clone(&cache), &s);
            async move {
                for j in s.segments() {
                    let got = cache
                        .segment(s.chunk, &s.key, j)
                        .await
                        .unwrap_or_else(|e| panic!("{step}: segment {j}: {e}"));
                    assert!(got == s.plain_of(j), "{step}: segment {j} read wrong bytes");
                }
                cache.settle().await;
                cache.snapshot()
            }
        };

        let first = read_all("first read").await;
        let origin = first.tier("origin").unwrap().hits;
        assert_eq!(origin, 1, "{}", what("the origin fetched the chunk once"));

        let second = read_all("second read").await;
        let (t1, t2) = (first.tier(name).unwrap(), second.tier(name).unwrap());
        assert!(
            t2.hits > t1.hits,
            "{}: {t1:?} then {t2:?}",
            what("served by the tier")
        );
        assert_eq!(
            second.tier("origin").unwrap().hits,
            1,
            "{}",
            what("second read")
        );

        let bad = s.sealed_range(s.last_segment());
        if !h.damage(&s, &Damage::Flip { at: bad.start + 3 }).await {
            continue;
        }
        let third = read_all("read of a damaged copy").await;
        let (t3, o3) = (third.tier(name).unwrap(), third.tier("origin").unwrap());
        assert_eq!(
            o3.hits,
            2,
            "{}",
            what("the damaged copy is read again from the origin")
        );
        assert!(
            t3.integrity_failures + t3.misses > t2.integrity_failures + t2.misses,
            "{}: {t2:?} then {t3:?}",
            what("the damaged copy is refused")
        );

        let fourth = read_all("read after the copy was replaced").await;
        let t4 = fourth.tier(name).unwrap();
        assert!(
            t4.hits > t3.hits,
            "{}: {t3:?} then {t4:?}",
            what("replaced in the tier")
        );
        assert_eq!(
            fourth.tier("origin").unwrap().hits,
            2,
            "{}",
            what("no third fetch")
        );
        assert_eq!(fourth.read_errors, 0);
    }
}

// ---- (a) memory ----------------------------------------------------------------

struct MemoryHarness {
    tier: Arc<MemoryTier>,
}

impl MemoryHarness {
    fn new() -> Self {
        Self {
            tier: Arc::new(MemoryTier::new(64 << 20)),
        }
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    fn tier(&self) -> Arc<dyn ChunkTier> {
        self.tier.clone()
    }

    fn contract(&self, _: ChunkFormat) -> Trust {
        Trust::Checked
    }

    fn bounded(&self, capacity: u64) -> Option<Arc<dyn ChunkTier>> {
        Some(Arc::new(MemoryTier::new(capacity)))
    }

    fn forgets_on_drop_memory(&self) -> bool {
        true
    }

    async fn damage(&self, _: &Sample, _: &Damage) -> bool {
        // The memory tier holds `Checked` objects in this process's memory, and nothing
        // outside the tier can reach them to write: there is no stored copy to damage.
        false
    }

    fn own_damages(&self, _: &Sample) -> Vec<(Damage, Expect)> {
        Vec::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_tier_conforms() {
    conformance(&MemoryHarness::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_tier_serves_a_cache() {
    through_cache(&MemoryHarness::new()).await;
}

// ---- (b) disk ------------------------------------------------------------------

struct DiskHarness {
    dir: tempfile::TempDir,
    tier: Arc<DiskTier>,
    /// Bounded tiers made so far, each in a directory of its own.
    bounded: AtomicU64,
}

impl DiskHarness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tier = Arc::new(DiskTier::open(dir.path().join("main"), 64 << 20).unwrap());
        Self {
            dir,
            tier,
            bounded: AtomicU64::new(0),
        }
    }
}

/// Bytes of the chunk files in `dir`.
fn bytes_in(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[async_trait]
impl Harness for DiskHarness {
    fn tier(&self) -> Arc<dyn ChunkTier> {
        self.tier.clone()
    }

    fn contract(&self, _: ChunkFormat) -> Trust {
        Trust::Local
    }

    fn bounded(&self, capacity: u64) -> Option<Arc<dyn ChunkTier>> {
        let n = self.bounded.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.path().join(format!("bounded-{n}"));
        Some(Arc::new(BoundedDisk {
            tier: DiskTier::open(&dir, capacity).unwrap(),
        }))
    }

    fn forgets_on_drop_memory(&self) -> bool {
        false
    }

    async fn damage(&self, s: &Sample, how: &Damage) -> bool {
        let path = self.tier.path_of(&s.chunk.name);
        match how {
            Damage::Flip { at } => std::fs::write(&path, s.flipped(*at)).unwrap(),
            Damage::Truncate { len } => std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(u64::try_from(*len).unwrap())
                .unwrap(),
            Damage::GarbageStripes { .. } | Damage::LyingStripe { .. } => return false,
        }
        true
    }

    fn own_damages(&self, _: &Sample) -> Vec<(Damage, Expect)> {
        Vec::new()
    }
}

/// A disk tier whose usage is also held to the bytes its directory really holds.
#[derive(Debug)]
struct BoundedDisk {
    tier: DiskTier,
}

#[async_trait]
impl ChunkTier for BoundedDisk {
    fn name(&self) -> &'static str {
        self.tier.name()
    }

    async fn get(&self, chunk: &ChunkRef, j: SegmentIndex) -> Result<Option<Found>, ReadError> {
        self.tier.get(chunk, j).await
    }

    async fn put(&self, chunk: &ChunkRef, object: &Checked) {
        self.tier.put(chunk, object).await;
    }

    async fn remove(&self, chunk: &ChunkRef) {
        self.tier.remove(chunk).await;
    }

    fn usage(&self) -> Option<(u64, u64)> {
        let (used, bound) = self.tier.usage()?;
        let on_disk = bytes_in(self.tier.dir());
        assert_eq!(
            on_disk, used,
            "disk: the index counts {used} bytes, the files hold {on_disk}"
        );
        Some((used, bound))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_tier_conforms() {
    conformance(&DiskHarness::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_tier_serves_a_cache() {
    through_cache(&DiskHarness::new()).await;
}

// ---- (c), (d) AZ -----------------------------------------------------------------

/// The AZ tier over a fleet of six memcached-protocol nodes, and a raw client to reach
/// the stripes behind it.
struct AzHarness {
    config: AzConfig,
    /// Tells where each chunk's stripes live and under which key (placement is a pure
    /// function of the node list, so it agrees with the tier's own client).
    placement: AzClient,
    tier: Arc<AzTier>,
    /// The nodes, stopped when the harness is dropped.
    _fleet: Fleet,
}

#[allow(dead_code)] // held only to be dropped
enum Fleet {
    Lode(Vec<NodeHandle>),
    Memcached(Vec<Memcached>),
}

impl AzHarness {
    fn new(addrs: Vec<String>, fleet: Fleet) -> Self {
        let mut config = AzConfig::new(addrs);
        (config.k, config.m) = (K, M);
        // Two shared cores and other work: a slow answer must not look like a lost node.
        config.node_timeout = Duration::from_secs(5);
        let placement = AzClient::new(config.clone()).unwrap();
        let tier = Arc::new(AzTier::new(config.clone()).unwrap());
        Self {
            config,
            placement,
            tier,
            _fleet: fleet,
        }
    }

    /// Six lode cache nodes in this process, memory only, on loopback.
    async fn lode() -> Self {
        let mut nodes = Vec::new();
        for _ in 0..K + M {
            let node = Node::start(NodeConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..NodeConfig::default()
            })
            .await
            .unwrap();
            nodes.push(node);
        }
        let addrs = nodes.iter().map(|n| n.local_addr().to_string()).collect();
        Self::new(addrs, Fleet::Lode(nodes))
    }

    /// Six memcached processes, or `None` after a skip where memcached is not installed.
    /// Under CI a missing memcached fails the test instead.
    fn memcached() -> Option<Self> {
        assert!(
            std::env::var_os("CI").is_none() || which("memcached").is_some(),
            "memcached is not installed, but CI is set: the AZ tier over memcached must run"
        );
        let fleet: Vec<Memcached> = (0..K + M)
            .map(|_| Memcached::start(64))
            .collect::<Option<_>>()?;
        let addrs = fleet.iter().map(|m| m.addr().to_string()).collect();
        Some(Self::new(addrs, Fleet::Memcached(fleet)))
    }

    /// Writes `value` as the stripe of rank `rank` (stripe `rank` goes to the `rank`-th
    /// placed node), straight through the memcached protocol.
    async fn set_stripe(&self, s: &Sample, rank: usize, value: &[u8]) {
        let node = self.placement.placement(&s.chunk.name)[rank].to_owned();
        let key = self.placement.key(&s.chunk.name);
        let mut conn = Connection::connect(&node, self.config.max_value)
            .await
            .unwrap();
        assert!(
            conn.set(&key, 0, value).await.unwrap(),
            "{node} did not store {key}"
        );
    }

    /// Stores `object` as chunk `s`'s stripes: a fleet that holds it consistently.
    async fn set_object(&self, s: &Sample, object: &[u8]) {
        let stripes = Codec::new(K, M)
            .unwrap()
            .encode(&s.chunk.name, object)
            .unwrap();
        for (rank, stripe) in stripes.iter().enumerate() {
            self.set_stripe(s, rank, stripe).await;
        }
    }
}

#[async_trait]
impl Harness for AzHarness {
    fn tier(&self) -> Arc<dyn ChunkTier> {
        self.tier.clone()
    }

    fn contract(&self, format: ChunkFormat) -> Trust {
        match format {
            ChunkFormat::V1 => Trust::Checked,
            ChunkFormat::V2 { .. } => Trust::HeaderChecked,
        }
    }

    fn bounded(&self, _: u64) -> Option<Arc<dyn ChunkTier>> {
        None
    }

    fn forgets_on_drop_memory(&self) -> bool {
        false
    }

    async fn damage(&self, s: &Sample, how: &Damage) -> bool {
        match how {
            Damage::Flip { at } => self.set_object(s, &s.flipped(*at)).await,
            Damage::Truncate { len } => self.set_object(s, &s.object[..*len]).await,
            Damage::GarbageStripes { nodes } => {
                for rank in 0..*nodes {
                    self.set_stripe(s, rank, b"not a stripe at all").await;
                }
            }
            Damage::LyingStripe { at } => {
                let stripes = Codec::new(K, M)
                    .unwrap()
                    .encode(&s.chunk.name, &s.flipped(*at))
                    .unwrap();
                let rank = at / shard_len(s.object.len(), K);
                self.set_stripe(s, rank, &stripes[rank]).await;
            }
        }
        true
    }

    fn own_damages(&self, s: &Sample) -> Vec<(Damage, Expect)> {
        let at = s.sealed_range(s.last_segment()).start + 3;
        vec![
            // Up to m stripes lost: the code rebuilds the chunk.
            (Damage::GarbageStripes { nodes: 1 }, Expect::Served),
            (Damage::GarbageStripes { nodes: M }, Expect::Served),
            // More than m: fewer than k valid stripes, a miss.
            (Damage::GarbageStripes { nodes: M + 1 }, Expect::Miss),
            // A stripe that passes its own CRC but lies: a v1 object is checked whole,
            // and the other combinations rebuild it; a v2 object may be taken on its
            // header, so the lie may come back, but must not open.
            (
                Damage::LyingStripe { at },
                match s.chunk.format {
                    ChunkFormat::V1 => Expect::Served,
                    ChunkFormat::V2 { .. } => Expect::NoWrongBytes,
                },
            ),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_tier_over_lode_nodes_conforms() {
    conformance(&AzHarness::lode().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_tier_over_lode_nodes_serves_a_cache() {
    through_cache(&AzHarness::lode().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_tier_over_memcached_conforms() {
    let Some(h) = AzHarness::memcached() else {
        return;
    };
    conformance(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_tier_over_memcached_serves_a_cache() {
    let Some(h) = AzHarness::memcached() else {
        return;
    };
    through_cache(&h).await;
}
