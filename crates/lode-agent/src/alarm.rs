//! Read alarms in the agent (docs/gc.md, "Alarms in the agent"). An attachment made
//! before a rotation keeps reading its old root; once the collector has expired that
//! root, every such read must still succeed, and must also halt the root's deletion and
//! tell someone.
//!
//! [`RootWatch`] sits behind the origin tier, as its [`OriginWatch`]: each chunk fetched
//! from the store, and each manifest opened at attach, is checked against its root's
//! state. A read of an expired (or deleting, or deleted) root leaves the store's alarm
//! marker through [`lode_read::check_read_in`], is counted per root for the metrics, and
//! is logged. The state is cached per root for [`ROOT_STATE_TTL`], so the root record is
//! read at most once per root per TTL (and once per attach), never per chunk; reads of a
//! root whose state is known need no request at all. The marker and the log line are left at most
//! once per root and manifest per [`ALARM_LOG_INTERVAL`]: the marker is one object per
//! manifest anyway, and a busy reader would otherwise write a log line per chunk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lode_format::{ManifestId, RootId};
use lode_read::{OriginWatch, ReadAlarm};
use lode_store::{Alarm, RootState, Store};

/// How long a root's state, once read, is trusted before the origin path reads it again.
/// A root expires at least a grace period (hours) after the reads that matter began, so
/// a view this stale delays an alarm by seconds, not past a deletion.
pub const ROOT_STATE_TTL: Duration = Duration::from_secs(10);

/// At most one marker write and one log line per root and manifest in this interval; at
/// most one warning per root in it when the root's record cannot be read.
pub const ALARM_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How often the root of every attached manifest is checked, whether or not its reads
/// reach the store: an attachment served wholly from the caches still holds its root, and
/// must raise the alarm before that root is deleted under it.
pub const ATTACHED_CHECK_INTERVAL: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section below leaves its map consistent before anything can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One root's state as last read.
#[derive(Clone, Copy, Debug)]
struct Cached {
    /// `None` until a read of the record has succeeded.
    state: Option<RootState>,
    /// When it was last read (or tried).
    at: Instant,
    /// Whether a read of the record is under way (others use the old state meanwhile).
    refreshing: bool,
}

/// What the state cache says about a root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookup {
    /// Use this state (`None`: not known, and someone is reading it).
    Known(Option<RootState>),
    /// Read the record now: this caller was chosen to.
    Refresh,
}

/// Each root's state, trusted for a TTL; one caller at a time refreshes a stale one.
#[derive(Debug)]
struct StateCache {
    ttl: Duration,
    roots: HashMap<RootId, Cached>,
}

impl StateCache {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            roots: HashMap::new(),
        }
    }

    fn lookup(&mut self, root: RootId, now: Instant) -> Lookup {
        match self.roots.get_mut(&root) {
            Some(c) if c.refreshing || now.duration_since(c.at) < self.ttl => {
                Lookup::Known(c.state)
            }
            Some(c) => {
                c.refreshing = true;
                Lookup::Refresh
            }
            None => {
                self.roots.insert(
                    root,
                    Cached {
                        state: None,
                        at: now,
                        refreshing: true,
                    },
                );
                Lookup::Refresh
            }
        }
    }

    /// Records a read of the record at `now`: its state, or `None` if the read failed (the
    /// old state is kept, and the record is tried again a TTL later).
    fn store(&mut self, root: RootId, state: Option<RootState>, now: Instant) {
        let c = self.roots.entry(root).or_insert(Cached {
            state: None,
            at: now,
            refreshing: false,
        });
        if state.is_some() {
            c.state = state;
        }
        c.at = now;
        c.refreshing = false;
    }
}

/// Lets something through once per key per interval.
#[derive(Debug)]
struct Gate<K> {
    interval: Duration,
    last: HashMap<K, Instant>,
}

impl<K: Eq + Hash> Gate<K> {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
        }
    }

    fn allow(&mut self, key: K, now: Instant) -> bool {
        match self.last.get(&key) {
            Some(t) if now.duration_since(*t) < self.interval => false,
            _ => {
                self.last.insert(key, now);
                true
            }
        }
    }
}

/// Watches the roots the agent reads from the origin and raises read alarms (see the
/// module's documentation).
#[derive(Debug)]
pub struct RootWatch {
    store: Store,
    /// `lode agent on HOST (pid N)`.
    reader: String,
    states: Mutex<StateCache>,
    /// The attachments of each manifest, to name them in an alarm.
    attached: Mutex<HashMap<ManifestId, BTreeSet<String>>>,
    /// The root each opened manifest was found under.
    roots: Mutex<HashMap<ManifestId, RootId>>,
    alarm_gate: Mutex<Gate<(RootId, ManifestId)>>,
    error_gate: Mutex<Gate<RootId>>,
    reads: Mutex<BTreeMap<RootId, u64>>,
}

impl RootWatch {
    /// A watch over `store`, naming this process as `reader` in alarms.
    pub fn new(store: Store, reader: String) -> Self {
        Self {
            store,
            reader,
            states: Mutex::new(StateCache::new(ROOT_STATE_TTL)),
            attached: Mutex::new(HashMap::new()),
            roots: Mutex::new(HashMap::new()),
            alarm_gate: Mutex::new(Gate::new(ALARM_LOG_INTERVAL)),
            error_gate: Mutex::new(Gate::new(ALARM_LOG_INTERVAL)),
            reads: Mutex::new(BTreeMap::new()),
        }
    }

    /// Notes that attachment `name` reads `manifest`, so alarms name it.
    pub fn attached(&self, manifest: ManifestId, name: &str) {
        lock(&self.attached)
            .entry(manifest)
            .or_default()
            .insert(name.to_owned());
    }

    /// Notes that attachment `name` no longer reads `manifest`.
    pub fn detached(&self, manifest: ManifestId, name: &str) {
        let mut a = lock(&self.attached);
        if let Some(names) = a.get_mut(&manifest) {
            names.remove(name);
            if names.is_empty() {
                a.remove(&manifest);
            }
        }
    }

    /// Reads of roots whose state raises an alarm, per root, since the agent started.
    pub fn reads(&self) -> BTreeMap<RootId, u64> {
        lock(&self.reads).clone()
    }

    /// A chunk of `manifest` was just fetched (or tried) from `root` in the origin store.
    /// Never waits on the store: a read of the root's record, when its cached state is
    /// stale, and the alarm's marker run in a task of their own.
    pub fn origin_read(self: &Arc<Self>, root: RootId, manifest: ManifestId) {
        let looked = lock(&self.states).lookup(root, Instant::now());
        let state = match looked {
            Lookup::Known(None) => return,
            Lookup::Known(Some(s)) if !s.alarms_on_read() => return,
            Lookup::Known(Some(s)) => Some(s),
            Lookup::Refresh => None,
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let state = match state {
                Some(s) => Some(s),
                None => this.refresh(root, &manifest).await,
            };
            if let Some(s) = state {
                this.raise(root, s, manifest, None).await;
            }
        });
    }

    /// Manifest `manifest` of `root` was opened for attachment `name`: the root's state
    /// is read afresh (an attach is rare, and should see the root as it is now) and an
    /// alarm raised before the attach returns if the root is expired or further along.
    pub async fn opened(&self, root: RootId, manifest: ManifestId, name: &str) {
        lock(&self.roots).insert(manifest, root);
        if let Some(s) = self.refresh(root, &manifest).await {
            self.raise(root, s, manifest, Some(name)).await;
        }
    }

    /// Checks the root of every attached manifest as if a chunk of it had been read from
    /// the store (see [`ATTACHED_CHECK_INTERVAL`]).
    pub fn check_attached(self: &Arc<Self>) {
        let held: Vec<(RootId, ManifestId)> = {
            let attached = lock(&self.attached);
            let roots = lock(&self.roots);
            attached
                .keys()
                .filter_map(|m| roots.get(m).map(|r| (*r, *m)))
                .collect()
        };
        for (root, manifest) in held {
            self.origin_read(root, manifest);
        }
    }

    /// Runs [`RootWatch::check_attached`] every [`ATTACHED_CHECK_INTERVAL`] for as long
    /// as the watch exists.
    pub fn spawn_attached_checks(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ATTACHED_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(watch) = weak.upgrade() else { return };
                watch.check_attached();
            }
        });
    }

    /// Reads the root's record into the cache; its state, or `None` (logged, at most once
    /// per root per interval) if it cannot be read.
    async fn refresh(&self, root: RootId, manifest: &ManifestId) -> Option<RootState> {
        let read = self.store.get_root(root).await;
        let state = read.as_ref().ok().map(|r| r.state);
        lock(&self.states).store(root, state, Instant::now());
        if let Err(e) = read
            && lock(&self.error_gate).allow(root, Instant::now())
        {
            eprintln!(
                "lode agent: warning: could not read the record of root {root} (reading \
                 manifest {manifest}) to check for read alarms: {e}; reads go on, and the \
                 record is tried again in {}s",
                ROOT_STATE_TTL.as_secs()
            );
        }
        state
    }

    /// Counts a read of `root` in `state` and, if it alarms and none was raised for this
    /// root and manifest in the last interval, leaves the marker and logs it.
    async fn raise(
        &self,
        root: RootId,
        state: RootState,
        manifest: ManifestId,
        name: Option<&str>,
    ) {
        if !state.alarms_on_read() {
            return;
        }
        if lock(&self.alarm_gate).allow((root, manifest), Instant::now()) {
            let reader = self.reader_of(manifest, name);
            let (alarm, failed) = match lode_read::check_read_in(
                &self.store,
                root,
                state,
                &manifest,
                &reader,
            )
            .await
            {
                Ok(Some(a)) => (a, None),
                // check_read_in only passes on states that do not alarm.
                Ok(None) => return,
                Err(e) => (
                    ReadAlarm {
                        root,
                        state,
                        alarm: Alarm::new(manifest, &reader, lode_read::unix_now()),
                        recorded: false,
                    },
                    Some(e),
                ),
            };
            // Counted before the line is written, so that whoever sees the line sees the
            // count (and the marker) too.
            *lock(&self.reads).entry(root).or_default() += 1;
            match failed {
                None => eprintln!("lode agent: {alarm}"),
                Some(e) => eprintln!(
                    "lode agent: {alarm} (but its marker could not be left in the store, so \
                     the deletion is not halted: {e}; tried again in {}s)",
                    ALARM_LOG_INTERVAL.as_secs()
                ),
            }
        } else {
            *lock(&self.reads).entry(root).or_default() += 1;
        }
    }

    /// This process and the attachments of `manifest` (or `name`, at attach).
    fn reader_of(&self, manifest: ManifestId, name: Option<&str>) -> String {
        let names: Vec<String> = match name {
            Some(n) => vec![n.to_owned()],
            None => lock(&self.attached)
                .get(&manifest)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
        };
        match names.as_slice() {
            [] => self.reader.clone(),
            [one] => format!("{}, attachment {one}", self.reader),
            many => format!("{}, attachments {}", self.reader, many.join(", ")),
        }
    }
}

impl OriginWatch for RootWatch {
    fn fetched(self: Arc<Self>, root: RootId, manifest: ManifestId) {
        self.origin_read(root, manifest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_state_is_read_once_per_ttl_by_one_caller() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut c = StateCache::new(Duration::from_secs(10));
        let r = RootId(1);
        assert_eq!(c.lookup(r, at(0)), Lookup::Refresh);
        // Others do not read it again while the first read is under way.
        assert_eq!(c.lookup(r, at(0)), Lookup::Known(None));
        c.store(r, Some(RootState::Active), at(1));
        assert_eq!(c.lookup(r, at(5)), Lookup::Known(Some(RootState::Active)));
        assert_eq!(c.lookup(r, at(10)), Lookup::Known(Some(RootState::Active)));
        assert_eq!(c.lookup(r, at(11)), Lookup::Refresh);
        assert_eq!(c.lookup(r, at(11)), Lookup::Known(Some(RootState::Active)));
        // A failed read keeps the old state and waits a TTL before trying again.
        c.store(r, None, at(12));
        assert_eq!(c.lookup(r, at(13)), Lookup::Known(Some(RootState::Active)));
        assert_eq!(c.lookup(r, at(22)), Lookup::Refresh);
        c.store(r, Some(RootState::Expired), at(22));
        assert_eq!(c.lookup(r, at(23)), Lookup::Known(Some(RootState::Expired)));
        // Roots are cached apart.
        assert_eq!(c.lookup(RootId(2), at(23)), Lookup::Refresh);
    }

    #[test]
    fn the_gate_lets_one_through_per_key_per_interval() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut g = Gate::new(Duration::from_secs(60));
        assert!(g.allow("a", at(0)));
        assert!(!g.allow("a", at(59)));
        assert!(g.allow("b", at(59)));
        assert!(g.allow("a", at(60)));
        assert!(!g.allow("a", at(61)));
    }

    async fn store_with_root(state: RootState) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let rec = lode_store::RootRecord {
            root: RootId(1),
            state,
            salt: lode_format::WrappedKey {
                key_id: "k".to_owned(),
                blob: vec![7; 40],
            },
            since: Some(1),
        };
        store.create_root(&rec).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn an_attach_of_an_expired_root_leaves_the_marker_and_counts() {
        let (_dir, store) = store_with_root(RootState::Expired).await;
        let watch = RootWatch::new(store.clone(), "lode agent on h (pid 1)".to_owned());
        let id = ManifestId::from_bytes([3; 32]);
        watch.opened(RootId(1), id, "app").await;
        watch.opened(RootId(1), id, "app").await;
        let alarms = store.list_alarms(RootId(1)).await.unwrap().alarms;
        assert_eq!(alarms.len(), 1, "{alarms:?}");
        assert_eq!(alarms[0].manifest, id);
        assert_eq!(alarms[0].reader, "lode agent on h (pid 1), attachment app");
        assert_eq!(watch.reads(), BTreeMap::from([(RootId(1), 2)]));
    }

    #[tokio::test]
    async fn an_attachment_served_from_cache_still_raises_the_alarm() {
        let (_dir, store) = store_with_root(RootState::Retired).await;
        let watch = Arc::new(RootWatch::new(store.clone(), "agent".to_owned()));
        let id = ManifestId::from_bytes([4; 32]);
        watch.opened(RootId(1), id, "app").await;
        watch.attached(id, "app");
        // The root expires while every read of the attachment hits the caches.
        let (rec, version) = store.get_root_versioned(RootId(1)).await.unwrap();
        let expired = lode_store::RootRecord {
            state: RootState::Expired,
            ..rec
        };
        store.update_root(&expired, &version).await.unwrap();
        lock(&watch.states).store(RootId(1), None, Instant::now() - 2 * ROOT_STATE_TTL);
        watch.check_attached();
        let deadline = Instant::now() + Duration::from_secs(30);
        let alarms = loop {
            let a = store.list_alarms(RootId(1)).await.unwrap().alarms;
            if !a.is_empty() || Instant::now() > deadline {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(alarms.len(), 1, "no alarm from the periodic check");
        assert_eq!(alarms[0].reader, "agent, attachment app");
        // A detached manifest is no longer checked.
        watch.detached(id, "app");
        store.clear_alarms(RootId(1)).await.unwrap();
        *lock(&watch.alarm_gate) = Gate::new(ALARM_LOG_INTERVAL);
        watch.check_attached();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(store.list_alarms(RootId(1)).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn reads_of_a_live_root_and_unreadable_records_raise_nothing() {
        let (_dir, store) = store_with_root(RootState::Retired).await;
        let watch = RootWatch::new(store.clone(), "r".to_owned());
        let id = ManifestId::from_bytes([3; 32]);
        watch.opened(RootId(1), id, "app").await;
        // Root 2 has no record: the read of it goes on, unalarmed.
        watch.opened(RootId(2), id, "app").await;
        assert!(watch.reads().is_empty());
        assert!(
            store
                .list_alarms(RootId(1))
                .await
                .unwrap()
                .alarms
                .is_empty()
        );
    }

    #[test]
    fn alarms_name_every_attachment_of_the_manifest() {
        let store = Store::open(tempfile::tempdir().unwrap().path().to_str().unwrap()).unwrap();
        let watch = RootWatch::new(store, "agent".to_owned());
        let (a, b) = (
            ManifestId::from_bytes([1; 32]),
            ManifestId::from_bytes([2; 32]),
        );
        assert_eq!(watch.reader_of(a, None), "agent");
        watch.attached(a, "x");
        watch.attached(a, "w");
        watch.attached(b, "y");
        assert_eq!(watch.reader_of(a, None), "agent, attachments w, x");
        watch.detached(a, "w");
        assert_eq!(watch.reader_of(a, None), "agent, attachment x");
        assert_eq!(watch.reader_of(b, Some("z")), "agent, attachment z");
    }
}
