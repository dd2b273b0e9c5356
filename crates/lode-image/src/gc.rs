//! The collector (docs/gc.md): `gc` takes every root as far along its life as is safe —
//! a retired root's live manifests copied forward and the root expired; an expired root,
//! after a grace period in which no read raised an alarm and with nothing in it live,
//! deleted — and says what it did and what each root waits for.
//!
//! Every state change is a conditional write of the root's record, so two collectors
//! cannot both take one step; the write that moves a root to `deleting` is the point of
//! no return, and every step before and after it can be interrupted and run again. A
//! root that cannot move (a corrupt record, a manifest or chunk that fails its checks, a
//! KMS that refuses an old key, an alarm) stops with the reason, deletes nothing, and
//! leaves the other roots moving.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use lode_format::{ManifestId, RootId};
use lode_kms::Kms;
use lode_store::{Alarm, ObjectVersion, RootRecord, RootState, Store, StoreError};
use serde::Serialize;

use crate::unix_now;
use crate::{CONCURRENCY, ImageError, Liveness, copy_forward_with, failpoint};

/// How a collection runs.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// How long an expired root waits, with no alarm, before it is deleted.
    pub grace: Duration,
    /// Only say what would be done.
    pub dry_run: bool,
    /// The KMS key new manifests' data keys are made under (copy-forward).
    pub key_id: String,
    /// Only this root; `None` for every root.
    pub only: Option<RootId>,
}

/// The grace period when none is given: long enough that a worker still reading an
/// expired root (an attachment made before the rotation) raises its alarm first.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// What the collector did with one root.
#[derive(Clone, Debug, Serialize)]
pub struct RootStep {
    /// The root.
    pub root: RootId,
    /// Its state when the collector came to it (`None`: its record could not be read).
    pub before: Option<RootState>,
    /// Its state when the collector left it.
    pub after: Option<RootState>,
    /// What was done (with `--dry-run`: what would be), in order.
    pub did: Vec<String>,
    /// What the root waits for before its next step, if anything.
    pub waiting: Option<String>,
    /// Alarms that halt its deletion.
    pub alarms: Vec<Alarm>,
    /// Alarm objects that could not be read (they halt deletion all the same).
    pub bad_alarms: Vec<String>,
    /// Why the root could not move, naming the root, manifest or chunk.
    pub error: Option<String>,
    /// Manifests copied forward.
    pub copied: u64,
    /// Objects deleted.
    pub deleted_objects: u64,
    /// Their bytes.
    pub reclaimed_bytes: u64,
}

/// What a collection did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Whether it only said what it would do.
    pub dry_run: bool,
    /// Each root, by id.
    pub roots: Vec<RootStep>,
    /// Bytes deleted, over all roots.
    pub reclaimed_bytes: u64,
}

impl GcReport {
    /// Whether every root moved or waits for a reason that is not a fault.
    pub fn ok(&self) -> bool {
        self.roots.iter().all(|r| r.error.is_none())
    }
}

/// Takes every root of `store` as far as is safe (see the module's documentation).
/// Only a store that cannot be listed is an error; a root that cannot move is reported in
/// its [`RootStep`].
pub async fn gc(store: &Store, kms: &dyn Kms, opts: &GcOptions) -> Result<GcReport, ImageError> {
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    for (root, first) in store.root_records().await? {
        if opts.only.is_some_and(|only| only != root) {
            continue;
        }
        let mut step = RootStep {
            root,
            before: first.as_ref().ok().map(|(r, _)| r.state),
            after: None,
            did: Vec::new(),
            waiting: None,
            alarms: Vec::new(),
            bad_alarms: Vec::new(),
            error: None,
            copied: 0,
            deleted_objects: 0,
            reclaimed_bytes: 0,
        };
        if let Err(e) = advance(store, kms, opts, root, first, &mut step).await {
            step.error = Some(format!("root {root}: {e}"));
        }
        report.reclaimed_bytes += step.reclaimed_bytes;
        report.roots.push(step);
    }
    Ok(report)
}

/// The most steps one root takes in one run: retired → expired → deleting → deleted,
/// with room for a conflict or two with another collector.
const MAX_STEPS: usize = 8;

async fn advance(
    store: &Store,
    kms: &dyn Kms,
    opts: &GcOptions,
    root: RootId,
    first: Result<(RootRecord, ObjectVersion), StoreError>,
    step: &mut RootStep,
) -> Result<(), ImageError> {
    let mut read = Some(first);
    for _ in 0..MAX_STEPS {
        let (rec, version) = match read.take() {
            Some(r) => r?,
            None => store.get_root_versioned(root).await?,
        };
        step.after = Some(rec.state);
        let go_on = match rec.state {
            RootState::Active => {
                step.waiting =
                    Some("active: new images go here (`lode root rotate` retires it)".to_owned());
                false
            }
            RootState::Deleted => {
                sweep_deleted(store, opts, root, step).await?;
                false
            }
            RootState::Retired => retire_step(store, kms, opts, &rec, &version, step).await?,
            RootState::Expired => expired_step(store, opts, &rec, &version, step).await?,
            RootState::Deleting => delete_step(store, opts, &rec, &version, step).await?,
        };
        if !go_on {
            return Ok(());
        }
    }
    Ok(())
}

/// The store's liveness, and the manifests of `root` that are live with what holds each.
/// A tag or pin that cannot be read is an error: nothing can be proven dead.
async fn live_in(
    store: &Store,
    root: RootId,
) -> Result<(Liveness, Vec<(ManifestId, crate::Holders)>), ImageError> {
    let live = Liveness::load(store).await?;
    if let Some(first) = live.unreadable().first() {
        return Err(ImageError::Invalid(format!(
            "cannot tell what is live ({first}); nothing was deleted: repair or remove it \
             first (lode store fsck names every such object)"
        )));
    }
    let mut ids = store.list_manifests(root).await?;
    ids.sort();
    let held = ids
        .into_iter()
        .map(|id| (id, live.holders(&id)))
        .filter(|(_, h)| h.any())
        .collect();
    Ok((live, held))
}

/// Writes `rec` over the version read; false (and a note) if another process changed
/// the record first, so the caller reads it again.
async fn advance_record(
    store: &Store,
    rec: &RootRecord,
    version: &ObjectVersion,
    step: &mut RootStep,
) -> Result<bool, ImageError> {
    failpoint::pause("gc:before-advance").await;
    match store.update_root(rec, version).await {
        Ok(()) => Ok(true),
        Err(StoreError::Conflict { .. }) => {
            step.did.push(format!(
                "root {} was changed by another process meanwhile; read it again",
                rec.root
            ));
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// A retired root: copy its live manifests forward, then expire it. True to go on.
async fn retire_step(
    store: &Store,
    kms: &dyn Kms,
    opts: &GcOptions,
    rec: &RootRecord,
    version: &ObjectVersion,
    step: &mut RootStep,
) -> Result<bool, ImageError> {
    let root = rec.root;
    let (liveness, live) = live_in(store, root).await?;
    if opts.dry_run {
        if !live.is_empty() {
            step.did.push(format!(
                "would copy {} live manifest(s) forward into the active root",
                live.len()
            ));
        }
        step.did
            .push("would expire it (its grace period starts then)".to_owned());
        return Ok(false);
    }
    if !live.is_empty() {
        let r = copy_forward_with(store, kms, &opts.key_id, root, &liveness).await?;
        step.copied += r.moved.len() as u64;
        step.did.push(format!(
            "copied {} manifest(s) forward into root {} ({} chunks, {} bytes sealed again)",
            r.moved.len(),
            r.to,
            r.chunks,
            r.bytes
        ));
        let (_, still) = live_in(store, root).await?;
        if let Some((id, holders)) = still.first() {
            step.waiting = Some(format!(
                "{} manifest(s) are still live after copy-forward (manifest {id}: {holders}; \
                 a tag moved to it meanwhile); the next `lode gc` copies them",
                still.len()
            ));
            return Ok(false);
        }
    }
    let expired = RootRecord {
        state: RootState::Expired,
        since: Some(unix_now()),
        ..rec.clone()
    };
    if advance_record(store, &expired, version, step).await? {
        step.did.push(format!(
            "expired it: reads still work but raise an alarm; deleted after {} with none",
            show_duration(opts.grace)
        ));
        failpoint::pause("gc:after-expire").await;
    }
    Ok(true)
}

/// An expired root: delete it once the grace period has passed with no alarm and nothing
/// in it is live. True to go on.
async fn expired_step(
    store: &Store,
    opts: &GcOptions,
    rec: &RootRecord,
    version: &ObjectVersion,
    step: &mut RootStep,
) -> Result<bool, ImageError> {
    let root = rec.root;
    let alarms = store.list_alarms(root).await?;
    if !alarms.is_empty() {
        step.waiting = Some(format!(
            "halted: {} read alarm(s) ({}); find the reader, then `lode root clear-alarm {root}`",
            alarms.len(),
            alarms
                .alarms
                .first()
                .map(ToString::to_string)
                .or_else(|| alarms.bad.first().map(|(k, e)| format!("{k}: {e}")))
                .unwrap_or_default()
        ));
        step.alarms = alarms.alarms;
        step.bad_alarms = alarms
            .bad
            .into_iter()
            .map(|(k, e)| format!("{k}: {e}"))
            .collect();
        return Ok(false);
    }
    let now = unix_now();
    let Some(since) = rec.since else {
        // An expired record without its time (written by hand, or by an older lode):
        // the grace period starts now.
        if !opts.dry_run {
            let timed = RootRecord {
                since: Some(now),
                ..rec.clone()
            };
            if advance_record(store, &timed, version, step).await? {
                step.did
                    .push("its expiry had no time; the grace period starts now".to_owned());
            }
        }
        step.waiting = Some(format!(
            "grace period: {} from now",
            show_duration(opts.grace)
        ));
        return Ok(false);
    };
    let ends = since.saturating_add(opts.grace.as_secs());
    if now < ends {
        step.waiting = Some(format!(
            "grace period: deletion in {} (at unix time {ends}) if no read raises an alarm",
            show_duration(Duration::from_secs(ends - now))
        ));
        return Ok(false);
    }
    let (_, live) = live_in(store, root).await?;
    if let Some((id, holders)) = live.first() {
        return Err(ImageError::Invalid(format!(
            "manifest {id} of expired root {root} is live ({holders}): nothing was deleted; \
             run `lode root copy-forward {root}`, then `lode gc`"
        )));
    }
    if opts.dry_run {
        let (n, bytes) = deletable(store, root).await?;
        step.did
            .push(format!("would delete {n} object(s), {bytes} bytes"));
        return Ok(false);
    }
    let deleting = RootRecord {
        state: RootState::Deleting,
        since: Some(now),
        ..rec.clone()
    };
    if advance_record(store, &deleting, version, step).await? {
        step.did.push("began deleting it".to_owned());
        failpoint::pause("gc:after-deleting").await;
    }
    Ok(true)
}

/// The objects deleting `root` removes.
async fn deletable_objects(
    store: &Store,
    root: RootId,
) -> Result<Vec<lode_store::RootObject>, ImageError> {
    Ok(store
        .root_contents(root)
        .await?
        .into_iter()
        .filter(|o| !o.kind.kept_after_deletion())
        .collect())
}

/// How many objects deleting `root` removes, and their bytes.
async fn deletable(store: &Store, root: RootId) -> Result<(u64, u64), ImageError> {
    let objs = deletable_objects(store, root).await?;
    Ok((objs.len() as u64, objs.iter().map(|o| o.size).sum()))
}

/// A root being deleted: delete every object but its record and forwarding records,
/// then mark it deleted. True to go on.
async fn delete_step(
    store: &Store,
    opts: &GcOptions,
    rec: &RootRecord,
    version: &ObjectVersion,
    step: &mut RootStep,
) -> Result<bool, ImageError> {
    let root = rec.root;
    if opts.dry_run {
        let (n, bytes) = deletable(store, root).await?;
        step.did.push(format!(
            "would finish deleting it: {n} object(s), {bytes} bytes"
        ));
        return Ok(false);
    }
    let objs = deletable_objects(store, root).await?;
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut rest = objs.into_iter();
    if let Some(first) = rest.next() {
        store.delete_root_object(&first).await?;
        (n, bytes) = (1, first.size);
        failpoint::pause("gc:mid-delete").await;
    }
    let (more, more_bytes) = delete_all(store, rest.collect()).await?;
    n += more;
    bytes += more_bytes;
    step.deleted_objects += n;
    step.reclaimed_bytes += bytes;
    let deleted = RootRecord {
        state: RootState::Deleted,
        ..rec.clone()
    };
    if advance_record(store, &deleted, version, step).await? {
        step.did.push(format!(
            "deleted it: {n} object(s), {bytes} bytes (its record and forwarding records stay)"
        ));
    }
    Ok(true)
}

/// A deleted root should hold nothing but its record and forwarding records; a publish
/// that began under the root before it was retired, and uploaded after it was deleted,
/// leaves objects there (it then starts over under the active root). They are deleted.
async fn sweep_deleted(
    store: &Store,
    opts: &GcOptions,
    root: RootId,
    step: &mut RootStep,
) -> Result<(), ImageError> {
    let objs = deletable_objects(store, root).await?;
    if objs.is_empty() {
        return Ok(());
    }
    if opts.dry_run {
        step.did.push(format!(
            "would delete {} stray object(s), {} bytes, written after the root was deleted",
            objs.len(),
            objs.iter().map(|o| o.size).sum::<u64>()
        ));
        return Ok(());
    }
    let (n, bytes) = delete_all(store, objs).await?;
    step.deleted_objects += n;
    step.reclaimed_bytes += bytes;
    step.did.push(format!(
        "deleted {n} stray object(s), {bytes} bytes, written after the root was deleted (a \
         publish that raced the rotation; it started over under the active root)"
    ));
    Ok(())
}

/// Deletes `objs`, 16 at a time; returns how many and their bytes.
async fn delete_all(
    store: &Store,
    objs: Vec<lode_store::RootObject>,
) -> Result<(u64, u64), ImageError> {
    let sizes: Vec<u64> = futures::stream::iter(objs)
        .map(|o| async move { store.delete_root_object(&o).await.map(|()| o.size) })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok((sizes.len() as u64, sizes.iter().sum()))
}

/// A duration as a person reads it: `90s`, `15m`, `36h`, `7d`.
pub fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s >= 86_400 && s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s >= 3_600 && s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        _ if s >= 60 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// Parses a duration as `lode gc --grace` takes it: a whole number with a unit, `s`,
/// `m`, `h` or `d` (`90s`, `15m`, `24h`, `7d`), or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (a number with s, m, h or d: 24h)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit (use s, m, h or d, as in 90s, 15m, 24h, 7d)"
            ));
        }
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("24h").unwrap(), DEFAULT_GRACE);
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "h", "1w", "1.5h", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(show_duration(DEFAULT_GRACE), "1d");
        assert_eq!(show_duration(Duration::from_secs(90)), "90s");
    }

    proptest! {
        #[test]
        fn parse_duration_never_panics(s in ".{0,30}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn shown_durations_parse_back(secs in 0u64..10_000_000) {
            let d = Duration::from_secs(secs);
            prop_assert_eq!(parse_duration(&show_duration(d)).unwrap(), d);
        }
    }
}
