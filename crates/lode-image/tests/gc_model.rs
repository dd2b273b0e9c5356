//! A model-based test of deleting, rotating and collecting (docs/gc.md): random sequences
//! of publish, untag, pin, unpin, rotate, collect and copy-forward run against a real
//! local directory store through the library, some of them "crashing" part-way, and after
//! every step every image the model says must be kept is exported and compared byte for
//! byte.
//!
//! A crash runs one operation over a view of the same directory whose backend dies after
//! a chosen number of writes: the write it dies at either reaches the store or not (a
//! process killed before its request was sent, or after it was applied but before the
//! answer came back), and every later call, read or write, fails. The operation's error is
//! ignored and the sequence goes on with the healthy store, as a restarted process would.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use lode_format::{ChunkSize, ManifestId, RootId};
use lode_image::{GcOptions, GcReport, NoProgress, PublishOptions, Publisher};
use lode_kms::{Keyring, Kms};
use lode_store::local::LocalDir;
use lode_store::{RootObjectKind, RootState, Store, StoreError};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};
use proptest::prelude::*;

const KEY: &str = "default";
const CHUNK: usize = 4096;
const TAGS: u8 = 4;
/// A grace period no run of this test outlives: collection copies forward and expires,
/// and deletes nothing.
const LONG_GRACE: Duration = Duration::from_secs(365 * 24 * 3600);

// ---------------------------------------------------------------------------------------
// The crashing backend.

/// What happens to one write.
enum Fate {
    /// It is sent and answered.
    Go,
    /// It reaches the store, then the process dies before the answer.
    LandThenDie,
    /// The process is dead (or dies now, before sending it).
    Dead,
}

/// When the process dies, shared by the backend and the delete streams it hands out.
#[derive(Debug)]
struct Death {
    /// Writes that are answered before it.
    after: usize,
    /// Whether the write it dies at reaches the store.
    lands: bool,
    writes: AtomicUsize,
    dead: AtomicBool,
}

impl Death {
    fn write(&self) -> Fate {
        if self.dead.load(Ordering::SeqCst) {
            return Fate::Dead;
        }
        if self.writes.fetch_add(1, Ordering::SeqCst) < self.after {
            return Fate::Go;
        }
        // Of writes racing past the limit, the first decides how the process dies.
        if self.dead.swap(true, Ordering::SeqCst) || !self.lands {
            Fate::Dead
        } else {
            Fate::LandThenDie
        }
    }

    fn alive(&self) -> object_store::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(died());
        }
        Ok(())
    }
}

fn died() -> object_store::Error {
    object_store::Error::Generic {
        store: "crashing",
        source: "the process died".into(),
    }
}

/// An object store that forwards to `inner` until the process dies (see [`Death`]).
#[derive(Debug)]
struct Crashing {
    inner: Arc<dyn ObjectStore>,
    death: Arc<Death>,
}

impl Crashing {
    fn new(inner: Arc<dyn ObjectStore>, after: usize, lands: bool) -> Crashing {
        Crashing {
            inner,
            death: Arc::new(Death {
                after,
                lands,
                writes: AtomicUsize::new(0),
                dead: AtomicBool::new(false),
            }),
        }
    }
}

impl fmt::Display for Crashing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Crashing({}, after {} writes)",
            self.inner, self.death.after
        )
    }
}

#[async_trait]
impl ObjectStore for Crashing {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match self.death.write() {
            Fate::Go => self.inner.put_opts(location, payload, opts).await,
            Fate::LandThenDie => {
                let _ = self.inner.put_opts(location, payload, opts).await;
                Err(died())
            }
            Fate::Dead => Err(died()),
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        match self.death.write() {
            Fate::Go => self.inner.put_multipart_opts(location, opts).await,
            Fate::LandThenDie | Fate::Dead => Err(died()),
        }
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.death.alive()?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        // Each object is one write, so a collector can die between two deletes.
        let inner = Arc::clone(&self.inner);
        let death = Arc::clone(&self.death);
        locations
            .then(move |l| {
                let inner = Arc::clone(&inner);
                let death = Arc::clone(&death);
                async move {
                    let l = l?;
                    match death.write() {
                        Fate::Go => inner.delete(&l).await.map(|()| l),
                        Fate::LandThenDie => {
                            let _ = inner.delete(&l).await;
                            Err(died())
                        }
                        Fate::Dead => Err(died()),
                    }
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        match self.death.alive() {
            Ok(()) => self.inner.list(prefix),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.death.alive()?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        match self.death.write() {
            Fate::Go => self.inner.copy_opts(from, to, options).await,
            Fate::LandThenDie => {
                let _ = self.inner.copy_opts(from, to, options).await;
                Err(died())
            }
            Fate::Dead => Err(died()),
        }
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        match self.death.write() {
            Fate::Go => self.inner.rename_opts(from, to, options).await,
            Fate::LandThenDie => {
                let _ = self.inner.rename_opts(from, to, options).await;
                Err(died())
            }
            Fate::Dead => Err(died()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Operations.

/// An image: each chunk's content by seed (0: all zeros; one seed, one content, so images
/// share chunks), the last chunk `short` bytes shorter.
#[derive(Clone, Debug)]
struct Image {
    chunks: Vec<u8>,
    short: u16,
}

impl Image {
    fn bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.chunks.iter().flat_map(|&s| chunk_bytes(s)).collect();
        out.truncate(out.len() - usize::from(self.short));
        out
    }
}

fn chunk_bytes(seed: u8) -> Vec<u8> {
    if seed == 0 {
        return vec![0; CHUNK];
    }
    lode_testkit::seeded_bytes(CHUNK, u64::from(seed))
}

#[derive(Clone, Debug)]
enum Op {
    /// Publish `image` under tag `app:<tag>`.
    Publish {
        tag: u8,
        image: Image,
    },
    /// Remove tag `app:<tag>`.
    Untag {
        tag: u8,
    },
    /// Pin the manifest tag `app:<tag>` names.
    Pin {
        tag: u8,
    },
    /// Remove one of the model's pins (`pin` modulo their number).
    Unpin {
        pin: u8,
    },
    Rotate,
    /// Collect with no grace period: retired roots go all the way to deleted.
    Gc,
    /// Collect with a grace period no run outlives: copies forward and expires only.
    GcLongGrace,
    /// Copy forward one of the retired or expired roots (`root` modulo their number).
    CopyForward {
        root: u8,
    },
}

#[derive(Clone, Debug)]
enum Step {
    Run(Op),
    /// Run `op` in a process that dies at its write number `after_writes`.
    Crash {
        op: Op,
        after_writes: u8,
        lands: bool,
    },
}

fn image() -> impl Strategy<Value = Image> {
    (proptest::collection::vec(0u8..5, 1..=4), 0u16..4096)
        .prop_map(|(chunks, short)| Image { chunks, short })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..TAGS, image()).prop_map(|(tag, image)| Op::Publish { tag, image }),
        2 => (0..TAGS).prop_map(|tag| Op::Untag { tag }),
        3 => (0..TAGS).prop_map(|tag| Op::Pin { tag }),
        1 => any::<u8>().prop_map(|pin| Op::Unpin { pin }),
        2 => Just(Op::Rotate),
        2 => Just(Op::Gc),
        1 => Just(Op::GcLongGrace),
        1 => any::<u8>().prop_map(|root| Op::CopyForward { root }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => op().prop_map(Step::Run),
        1 => (op(), after_writes(), any::<bool>()).prop_map(|(op, after_writes, lands)| Step::Crash {
            op,
            after_writes,
            lands
        }),
    ]
}

/// Most operations write a handful of objects; a collection that copies forward and
/// deletes writes a few dozen.
fn after_writes() -> impl Strategy<Value = u8> {
    prop_oneof![3 => 0u8..4, 2 => 4u8..12, 1 => 12u8..40]
}

fn tag_name(tag: u8) -> String {
    format!("app:{tag}")
}

// ---------------------------------------------------------------------------------------
// The store, the model, and the checks.

type Res<T> = Result<T, Box<dyn std::error::Error>>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

struct World {
    /// The store's directory.
    dir: PathBuf,
    /// Where images are written to publish and exported to compare.
    work: PathBuf,
    store: Store,
    kms: Keyring,
    /// Each tag and the bytes it must export.
    tags: BTreeMap<String, Vec<u8>>,
    /// Each pinned manifest (as last seen: copy-forward moves pins) and its bytes.
    pins: BTreeMap<ManifestId, Vec<u8>>,
}

fn gc_opts(grace: Duration) -> GcOptions {
    GcOptions {
        grace,
        dry_run: false,
        key_id: KEY.to_owned(),
        only: None,
    }
}

fn first_error(report: &GcReport) -> String {
    report
        .roots
        .iter()
        .filter_map(|r| r.error.as_deref())
        .collect::<Vec<_>>()
        .join("; ")
}

async fn publish(store: &Store, kms: &dyn Kms, work: &FsPath, tag: &str, bytes: &[u8]) -> Res<()> {
    let path = work.join("image");
    std::fs::write(&path, bytes)?;
    let opts = PublishOptions {
        chunk_size: ChunkSize::new(CHUNK as u64)?,
        tag: Some(tag.to_owned()),
        ..PublishOptions::default()
    };
    Publisher::new(store, kms, KEY.to_owned())
        .publish_file(&path, &opts, Arc::new(NoProgress))
        .await?;
    Ok(())
}

/// Pins the manifest `tag` names, as `lode pin TAG` does.
async fn pin(store: &Store, tag: &str) -> Res<ManifestId> {
    let id = lode_image::resolve(store, tag).await?;
    lode_image::pin(store, &id).await?;
    Ok(id)
}

/// The retired and expired roots: what copy-forward takes.
async fn forwardable(store: &Store) -> Res<Vec<RootId>> {
    Ok(store
        .roots()
        .await?
        .into_iter()
        .filter(|r| matches!(r.state, RootState::Retired | RootState::Expired))
        .map(|r| r.root)
        .collect())
}

async fn states(store: &Store) -> Res<Vec<(RootId, RootState)>> {
    Ok(store
        .roots()
        .await?
        .into_iter()
        .map(|r| (r.root, r.state))
        .collect())
}

impl World {
    fn new(tmp: &FsPath) -> Res<World> {
        let dir = tmp.join("store");
        let work = tmp.join("work");
        std::fs::create_dir_all(&work)?;
        Ok(World {
            store: Store::open(dir.to_str().ok_or("temporary directory not UTF-8")?)?,
            kms: Keyring::open_or_create(tmp.join("keyring"))?,
            dir,
            work,
            tags: BTreeMap::new(),
            pins: BTreeMap::new(),
        })
    }

    /// Exports `reference` and returns its bytes. A live image is never read from a root
    /// past retirement: that read would raise an alarm and halt the root's deletion.
    async fn read(&self, reference: &str) -> Res<Vec<u8>> {
        let img = lode_image::open_image(&self.store, Some(&self.kms), reference)
            .await
            .map_err(|e| format!("{reference} cannot be read: {e}"))?;
        let state = self.store.get_root(img.root).await?.state;
        ensure!(
            matches!(state, RootState::Active | RootState::Retired),
            "{reference} (manifest {}) is read from root {}, which is {state}",
            img.id,
            img.root
        );
        let out = self.work.join("export");
        lode_image::export(&self.store, &img, &out, Arc::new(NoProgress))
            .await
            .map_err(|e| format!("{reference} (manifest {}) cannot be exported: {e}", img.id))?;
        Ok(std::fs::read(&out)?)
    }

    /// The manifest that holds the pin first put on `id`: `id` itself, or where
    /// copy-forward moved it, following the forwarding records.
    async fn held_pin(&self, id: ManifestId) -> Res<ManifestId> {
        let roots = self.store.root_ids().await?;
        let mut at = id;
        for _ in 0..=roots.len() {
            if self.store.has_pin(&at).await? {
                return Ok(at);
            }
            let mut next = None;
            for r in &roots {
                if let Some(to) = self.store.get_forward(*r, &at).await? {
                    next = Some(to);
                    break;
                }
            }
            match next {
                Some(to) => at = to,
                None => {
                    return Err(format!(
                        "the pin on manifest {id} is lost: no pin holds {at}, and it was not \
                         copied forward"
                    )
                    .into());
                }
            }
        }
        Err(format!("the forwarding records from manifest {id} go round in a circle").into())
    }

    /// Every tag of the model, and no other, exports its bytes; every pin holds its
    /// image (moved along its forwarding records) and exports its bytes.
    async fn check(&mut self) -> Res<()> {
        let listed = self.store.list_tags().await?;
        ensure!(listed.bad.is_empty(), "unreadable tags: {:?}", listed.bad);
        let found: BTreeSet<&String> = listed.tags.iter().map(|(t, _)| t).collect();
        let expected: BTreeSet<&String> = self.tags.keys().collect();
        ensure!(
            found == expected,
            "the store has tags {found:?}, the model {expected:?}"
        );
        for (tag, bytes) in &self.tags {
            let got = self.read(tag).await?;
            ensure!(
                got == *bytes,
                "tag {tag} exports {} bytes that differ from the {} published",
                got.len(),
                bytes.len()
            );
        }
        let mut pins = BTreeMap::new();
        for (id, bytes) in &self.pins {
            let at = self.held_pin(*id).await?;
            let got = self.read(&at.to_hex()).await?;
            ensure!(
                got == *bytes,
                "pinned manifest {at} (first pinned as {id}) exports other bytes than it \
                 was published with"
            );
            pins.insert(at, bytes.clone());
        }
        self.pins = pins;
        Ok(())
    }

    /// Runs `op` in a healthy process: every operation the model allows succeeds.
    async fn run(&mut self, op: &Op) -> Res<()> {
        let kms: &dyn Kms = &self.kms;
        match op {
            Op::Publish { tag, image } => {
                let (tag, bytes) = (tag_name(*tag), image.bytes());
                publish(&self.store, kms, &self.work, &tag, &bytes).await?;
                self.tags.insert(tag, bytes);
            }
            Op::Untag { tag } => {
                let tag = tag_name(*tag);
                let r = lode_image::untag(&self.store, &tag).await;
                if self.tags.remove(&tag).is_some() {
                    let removed = r?;
                    ensure!(
                        removed.len() == 1 && removed[0].tag == tag,
                        "untag {tag} removed {removed:?}"
                    );
                } else {
                    ensure!(
                        matches!(
                            r,
                            Err(lode_image::ImageError::Store(StoreError::NotFound { .. }))
                        ),
                        "untag of {tag}, which is not there: {r:?}"
                    );
                }
            }
            Op::Pin { tag } => {
                let tag = tag_name(*tag);
                if let Some(bytes) = self.tags.get(&tag).cloned() {
                    let id = pin(&self.store, &tag).await?;
                    self.pins.insert(id, bytes);
                }
            }
            Op::Unpin { pin } => {
                if let Some(id) = self.pins.keys().nth(self.nth_pin(*pin)).copied() {
                    self.store.remove_pin(&id).await?;
                    self.pins.remove(&id);
                }
            }
            Op::Rotate => {
                let empty = self.store.roots().await?.is_empty();
                let r = lode_image::rotate(&self.store, kms, KEY).await;
                if empty {
                    ensure!(r.is_err(), "rotating a store with no root: {r:?}");
                } else {
                    let r = r?;
                    ensure!(r.retired.is_some(), "rotation retired nothing: {r:?}");
                }
            }
            Op::Gc => {
                let report = lode_image::gc(&self.store, kms, &gc_opts(Duration::ZERO)).await?;
                ensure!(report.ok(), "gc failed: {}", first_error(&report));
                let after = states(&self.store).await?;
                ensure!(
                    after
                        .iter()
                        .all(|(_, s)| matches!(s, RootState::Active | RootState::Deleted)),
                    "gc with no grace left roots {after:?}: {report:?}"
                );
            }
            Op::GcLongGrace => {
                let deleting = states(&self.store)
                    .await?
                    .iter()
                    .any(|(_, s)| *s == RootState::Deleting);
                let report = lode_image::gc(&self.store, kms, &gc_opts(LONG_GRACE)).await?;
                ensure!(report.ok(), "gc failed: {}", first_error(&report));
                // Only a deletion a crashed collector began is finished.
                ensure!(
                    deleting || report.reclaimed_bytes == 0,
                    "gc with a long grace deleted {} bytes: {report:?}",
                    report.reclaimed_bytes
                );
                let after = states(&self.store).await?;
                ensure!(
                    after
                        .iter()
                        .all(|(_, s)| !matches!(s, RootState::Retired | RootState::Deleting)),
                    "gc with a long grace left roots {after:?}: {report:?}"
                );
            }
            Op::CopyForward { root } => {
                let roots = forwardable(&self.store).await?;
                if !roots.is_empty() {
                    let from = roots[usize::from(*root) % roots.len()];
                    lode_image::copy_forward(&self.store, kms, KEY, from).await?;
                }
            }
        }
        Ok(())
    }

    fn nth_pin(&self, pin: u8) -> usize {
        usize::from(pin) % self.pins.len().max(1)
    }

    /// Runs `op` in a process that dies at its write number `after`, then learns from
    /// the store which of the outcomes the model allows happened.
    async fn crash(&mut self, op: &Op, after: u8, lands: bool) -> Res<()> {
        let os: Arc<dyn ObjectStore> = Arc::new(Crashing::new(
            Arc::new(LocalDir::new(&self.dir)?),
            usize::from(after),
            lands,
        ));
        let dying = Store::from_object_store(os, Path::default(), self.store.label().to_owned());
        let kms: &dyn Kms = &self.kms;
        match op {
            Op::Publish { tag, image } => {
                let (tag, bytes) = (tag_name(*tag), image.bytes());
                let _ = publish(&dying, kms, &self.work, &tag, &bytes).await;
                match self.store.get_tag(&tag).await {
                    Ok(_) => {
                        let got = self.read(&tag).await?;
                        ensure!(
                            got == bytes || Some(&got) == self.tags.get(&tag),
                            "after a crashed publish, tag {tag} exports neither the old nor \
                             the new image"
                        );
                        self.tags.insert(tag, got);
                    }
                    Err(StoreError::NotFound { .. }) => ensure!(
                        !self.tags.contains_key(&tag),
                        "a crashed publish removed tag {tag}"
                    ),
                    Err(e) => return Err(e.into()),
                }
            }
            Op::Untag { tag } => {
                let tag = tag_name(*tag);
                let _ = lode_image::untag(&dying, &tag).await;
                match self.store.get_tag(&tag).await {
                    Ok(_) => ensure!(
                        self.tags.contains_key(&tag),
                        "a crashed untag made tag {tag}"
                    ),
                    Err(StoreError::NotFound { .. }) => {
                        self.tags.remove(&tag);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Op::Pin { tag } => {
                let tag = tag_name(*tag);
                if let Some(bytes) = self.tags.get(&tag).cloned() {
                    let id = lode_image::resolve(&self.store, &tag).await?;
                    let _ = pin(&dying, &tag).await;
                    if self.store.has_pin(&id).await? {
                        self.pins.insert(id, bytes);
                    }
                }
            }
            Op::Unpin { pin } => {
                if let Some(id) = self.pins.keys().nth(self.nth_pin(*pin)).copied() {
                    let _ = dying.remove_pin(&id).await;
                    if !self.store.has_pin(&id).await? {
                        self.pins.remove(&id);
                    }
                }
            }
            Op::Rotate => {
                let _ = lode_image::rotate(&dying, kms, KEY).await;
            }
            Op::Gc => {
                let _ = lode_image::gc(&dying, kms, &gc_opts(Duration::ZERO)).await;
            }
            Op::GcLongGrace => {
                let _ = lode_image::gc(&dying, kms, &gc_opts(LONG_GRACE)).await;
            }
            Op::CopyForward { root } => {
                let roots = forwardable(&self.store).await?;
                if !roots.is_empty() {
                    let from = roots[usize::from(*root) % roots.len()];
                    let _ = lode_image::copy_forward(&dying, kms, KEY, from).await;
                }
            }
        }
        // A rotation that died between retiring the active root and making the next
        // leaves none active; the operator finishes it, as lode's error tells them to.
        let roots = self.store.roots().await?;
        if !roots.is_empty() && self.store.active_among(&roots)?.is_none() {
            let r = lode_image::rotate(&self.store, kms, KEY).await?;
            ensure!(
                r.finished.is_some(),
                "rotate did not finish the interrupted rotation: {r:?}"
            );
        }
        Ok(())
    }

    /// A clean collection after a rotation leaves one root, the active one, holding
    /// every image; the deleted roots keep only their records and forwarding records.
    async fn finish(&mut self) -> Res<()> {
        if self.store.roots().await?.is_empty() {
            ensure!(
                self.tags.is_empty() && self.pins.is_empty(),
                "the model keeps images in a store with no root"
            );
            return Ok(());
        }
        lode_image::rotate(&self.store, &self.kms, KEY).await?;
        let report = lode_image::gc(&self.store, &self.kms, &gc_opts(Duration::ZERO)).await?;
        ensure!(report.ok(), "final gc failed: {}", first_error(&report));
        let after = states(&self.store).await?;
        let kept: Vec<_> = after
            .iter()
            .filter(|(_, s)| *s != RootState::Deleted)
            .collect();
        ensure!(
            kept.len() == 1 && kept[0].1 == RootState::Active,
            "after the final collection the roots are {after:?}"
        );
        for (root, state) in &after {
            if *state != RootState::Deleted {
                continue;
            }
            let left: Vec<_> = self
                .store
                .root_contents(*root)
                .await?
                .into_iter()
                .filter(|o| !o.kind.kept_after_deletion())
                .map(|o| o.key.to_string())
                .collect();
            ensure!(left.is_empty(), "deleted root {root} still holds {left:?}");
            ensure!(
                self.store
                    .root_contents(*root)
                    .await?
                    .iter()
                    .any(|o| o.kind == RootObjectKind::Record),
                "deleted root {root} lost its record"
            );
        }
        self.check().await
    }
}

async fn run(steps: &[Step]) -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let mut world = World::new(tmp.path())?;
    for (i, step) in steps.iter().enumerate() {
        let done = match step {
            Step::Run(op) => world.run(op).await,
            Step::Crash {
                op,
                after_writes,
                lands,
            } => world.crash(op, *after_writes, *lands).await,
        };
        let checked = match done {
            Ok(()) => world.check().await,
            Err(e) => Err(e),
        };
        checked.map_err(|e| format!("step {i}, {step:?}: {e}"))?;
    }
    world
        .finish()
        .await
        .map_err(|e| format!("after the last step: {e}"))?;
    Ok(())
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(24);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_live_image_survives_deleting_rotating_and_collecting(
        steps in proptest::collection::vec(step(), 1..25)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        if let Err(e) = rt.block_on(run(&steps)) {
            return Err(TestCaseError::fail(e.to_string()));
        }
    }
}

/// A pin can make nothing of an expired root live again: a manifest copied forward is
/// refused naming its new id, a dead one is refused outright, and gc then deletes the root.
#[tokio::test]
async fn pins_on_an_expired_root_are_refused() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let store = Store::open(tmp.path().join("store").to_str().ok_or("path")?)?;
    let kms = Keyring::open_or_create(tmp.path().join("keyring"))?;
    publish(&store, &kms, tmp.path(), "kept", &[1; CHUNK * 2]).await?;
    publish(&store, &kms, tmp.path(), "dropped", &[2; CHUNK]).await?;
    let kept = lode_image::resolve(&store, "kept").await?;
    let dropped = lode_image::resolve(&store, "dropped").await?;
    lode_image::untag(&store, "dropped").await?;
    lode_image::rotate(&store, &kms, KEY).await?;
    let r = lode_image::gc(&store, &kms, &gc_opts(LONG_GRACE)).await?;
    assert!(r.ok(), "{}", first_error(&r));
    let moved = lode_image::resolve(&store, "kept").await?;
    assert_ne!(moved, kept);
    let e = lode_image::pin(&store, &kept)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("copied forward as manifest {moved}")),
        "{e}"
    );
    let e = lode_image::pin(&store, &dropped)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("which is expired"), "{e}");
    assert!(store.list_pins().await?.pins.is_empty());
    lode_image::pin(&store, &moved).await?;
    let r = lode_image::gc(&store, &kms, &gc_opts(Duration::ZERO)).await?;
    assert!(r.ok(), "{}", first_error(&r));
    assert_eq!(
        states(&store).await?,
        [
            (RootId(1), RootState::Deleted),
            (RootId(2), RootState::Active)
        ]
    );
    Ok(())
}
