//! The `lode agent` daemon: one worker-wide [`ChunkCache`], an NBD server, and a table of
//! attachments persisted in a state directory and re-attached on start.
//!
//! State directory layout: `attachments.json` (the table, written temp + rename),
//! `cache/` (the disk tier), `overlays/<hex of name>.overlay` (+ `.bitmap`), and by
//! default `files/`, the FUSE mount holding one file per attachment.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lode_control::api::{AttachOrder, AttachReply};
use lode_format::{ImageWorkSet, WorkSetKey};
use lode_fuse::{FuseMount, MountOptions};
use lode_kms::Kms;
use lode_nbd::{Export, Exports, Server};
use lode_read::{
    AzTier, ChunkCache, DiskTier, ImageDevice, MemoryTier, Overlay, Prefetch, PrefetchConfig,
    PrefetchCounters, Prefetcher, StoreOrigin,
};
use lode_store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::AgentError;
use crate::alarm::RootWatch;
use crate::error::io;
use crate::worker::{Grants, MAX_WARM};

/// Longest attachment name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Where the agent keeps things and how big its caches are.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The state directory (attachment table, disk cache, overlays).
    pub state_dir: PathBuf,
    /// The NBD Unix socket.
    pub nbd_unix: PathBuf,
    /// An NBD TCP listener, if any.
    pub nbd_tcp: Option<SocketAddr>,
    /// What one NBD client may hold, and how many there may be.
    pub nbd_limits: NbdLimits,
    /// Ciphertext bytes kept in memory.
    pub cache_memory: u64,
    /// Ciphertext bytes kept on disk.
    pub cache_disk: u64,
    /// Decrypted bytes kept in memory.
    pub decrypted: u64,
    /// How the decrypted, memory and disk tiers evict.
    pub cache_policy: lode_read::PolicyKind,
    /// Where the FUSE filesystem of attachment files is mounted, if anywhere.
    pub files: Option<PathBuf>,
    /// The AZ cache fleet, if any (between the disk cache and the origin).
    pub az: Option<lode_az::AzConfig>,
    /// Chunks fetched from the origin at once, at most.
    pub origin_concurrency: usize,
    /// Working-set prefetch, readahead and recording.
    pub prefetch: PrefetchConfig,
    /// A read trace to record (`lode sim` replays it), if any.
    pub trace: Option<TraceConfig>,
}

/// Where and as whom the agent records its read trace: every attach, and each chunk's
/// first read by it with the tier that served it (docs/scale.md, "Traces").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceConfig {
    /// The file, created (or truncated) at start.
    pub path: PathBuf,
    /// The worker's name in the trace's header.
    pub worker: String,
    /// The file's bound: past it the trace ends and later events are dropped.
    pub max_bytes: u64,
}

impl AgentConfig {
    /// Defaults under `state_dir`: sockets `nbd.sock`, files in `files/`, 256 MiB
    /// decrypted, 512 MiB memory, 10 GiB disk, the default eviction policy, no TCP.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        Self {
            nbd_unix: state_dir.join("nbd.sock"),
            files: Some(state_dir.join("files")),
            az: None,
            origin_concurrency: lode_read::DEFAULT_ORIGIN_CONCURRENCY,
            prefetch: PrefetchConfig::default(),
            trace: None,
            state_dir,
            nbd_tcp: None,
            nbd_limits: NbdLimits::default(),
            cache_memory: 512 << 20,
            cache_disk: 10 << 30,
            decrypted: 256 << 20,
            cache_policy: lode_read::PolicyKind::default(),
        }
    }
}

/// Bounds on NBD clients (the `[nbd]` section of the config file), checked when the
/// server is built. A client that never reads its replies holds at most
/// `max_buffered_bytes`; all clients together at most `max_connections` times that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdLimits {
    /// Connections open at once over both listeners, handshakes included; one more
    /// is closed before the greeting and logged.
    pub max_connections: usize,
    /// Connections open at once from one peer (an IP address over TCP, a user id over
    /// the Unix socket); `None`: only `max_connections`.
    pub max_connections_per_peer: Option<usize>,
    /// Payload bytes one connection may hold: replies its client has not read yet and
    /// write data being served. Past it the server stops reading that connection's
    /// requests until the client reads. Also its maximum block size.
    pub max_buffered_bytes: u64,
    /// Requests one connection may have in flight.
    pub max_in_flight: usize,
    /// From connecting to choosing an export.
    pub handshake_timeout: Duration,
}

impl Default for NbdLimits {
    /// 64 connections, 4 MiB and 64 requests each, 10 s to finish the handshake.
    fn default() -> Self {
        Self {
            max_connections: lode_nbd::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: None,
            max_buffered_bytes: lode_nbd::DEFAULT_MAX_BUFFERED_BYTES as u64,
            max_in_flight: lode_nbd::DEFAULT_MAX_IN_FLIGHT,
            handshake_timeout: lode_nbd::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Lines of one kind of failure (NBD connections, NBD requests, FUSE file calls) logged
/// a second, at most; the rest are counted in the metrics and summed up in the next line
/// logged.
const LOG_LINES_PER_SECOND: u32 = 10;

/// The agent's NBD server over `exports`, bounded by `limits`; a connection it refuses
/// or that ends in an error is logged to stderr with the peer, and so is a request the
/// device failed, with the whole error (a read the origin could not serve names the
/// chunk and the store), at most [`LOG_LINES_PER_SECOND`] lines a second each, so
/// a flood of bad connections or failing reads is not a flood of log. A limit out of
/// range is refused with its `[nbd]` key named.
pub fn nbd_server(exports: Exports, limits: &NbdLimits) -> Result<Server, AgentError> {
    let budget = LogBudget::new(LOG_LINES_PER_SECOND, Duration::from_secs(1));
    let request_budget = LogBudget::new(LOG_LINES_PER_SECOND, Duration::from_secs(1));
    let mut builder = Server::builder(exports).on_request_error(move |command, e| {
        let Some(held_back) = request_budget.take(std::time::Instant::now()) else {
            return;
        };
        let what = match command {
            lode_nbd::proto::Command::Read { offset, length } => {
                format!("read of {length} bytes at {offset}")
            }
            other => format!("{other:?}"),
        };
        eprintln!(
            "{}",
            failure_line(format!("lode agent: nbd {what} failed"), e, held_back)
        );
    });
    if let Some(n) = limits.max_connections_per_peer {
        builder = builder.max_connections_per_peer(n);
    }
    builder
        .max_connections(limits.max_connections)
        .max_buffered_bytes(usize::try_from(limits.max_buffered_bytes).unwrap_or(usize::MAX))
        .max_in_flight(limits.max_in_flight)
        .handshake_timeout(limits.handshake_timeout)
        .on_connection_error(move |peer, e| {
            let Some(held_back) = budget.take(std::time::Instant::now()) else {
                return;
            };
            let mut line = format!("lode agent: nbd connection from {peer}: {e}");
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                line.push_str(&format!(": {s}"));
                source = s.source();
            }
            if held_back > 0 {
                line.push_str(&format!(
                    " ({held_back} more connection errors not logged before this one)"
                ));
            }
            eprintln!("{line}");
        })
        .build()
        .map_err(|e| {
            let message = match e {
                lode_nbd::ConfigError::HandshakeTimeout => {
                    "handshake_timeout_ms must be positive".to_owned()
                }
                other => other.to_string(),
            };
            AgentError::Config(format!("[nbd] {message}"))
        })
}

/// At most `per_window` log lines a window; the lines held back are counted and the
/// count is given to the next line that goes out.
struct LogBudget {
    per_window: u32,
    window: Duration,
    state: std::sync::Mutex<LogWindow>,
}

#[derive(Default)]
struct LogWindow {
    start: Option<std::time::Instant>,
    logged: u32,
    held_back: u64,
}

impl LogBudget {
    fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: std::sync::Mutex::new(LogWindow::default()),
        }
    }

    /// `Some(lines held back since the last one logged)` if a line may be logged at
    /// `now`, else `None` (and the line is counted as held back).
    fn take(&self, now: std::time::Instant) -> Option<u64> {
        let mut w = lock(&self.state);
        if w.start.is_none_or(|s| now.duration_since(s) >= self.window) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < self.per_window {
            w.logged += 1;
            Some(std::mem::take(&mut w.held_back))
        } else {
            w.held_back += 1;
            None
        }
    }
}

/// One attached image, as persisted and as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The attachment's (and NBD export's) name.
    pub name: String,
    /// The manifest id.
    pub id: String,
    /// What the user asked for (a tag or an id).
    pub image: String,
    /// The device size in bytes.
    pub size: u64,
    /// Whether writes are accepted (into the overlay).
    pub writable: bool,
    /// The overlay file, when writable.
    pub overlay: Option<PathBuf>,
    /// The attachment's file in the agent's FUSE mount, if it has one.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// What the image runs (from its OCI config), for `lode run`.
    #[serde(default)]
    pub config: RunConfig,
    /// The start whose attach order made it, on a worker of a control service: its keys
    /// are granted for this start, so a restarted agent asks again with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
}

/// The OCI config fields an image carries, as `lode run` needs them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    /// The entrypoint argv.
    pub entrypoint: Vec<String>,
    /// The default arguments.
    pub cmd: Vec<String>,
    /// `KEY=value` strings.
    pub env: Vec<String>,
    /// The working directory, or empty.
    pub working_dir: String,
    /// `user[:group]`, or empty.
    pub user: String,
}

struct Live {
    att: Attachment,
    dev: Arc<ImageDevice>,
    /// The working-set prefetch under way, stopped at detach.
    prefetching: Option<tokio::task::AbortHandle>,
}

/// Where the agent's image keys come from.
#[derive(Clone, Debug)]
pub enum Keys {
    /// A KMS this agent may use itself (a single host).
    Kms(Arc<dyn Kms>),
    /// Grants from a control service, one start at a time (a worker of a fleet).
    Grants(Arc<Grants>),
}

/// The running agent.
pub struct Agent {
    store: Store,
    keys: Keys,
    warm: std::sync::Mutex<VecDeque<String>>,
    cache: Arc<ChunkCache>,
    exports: Exports,
    server: Server,
    config: AgentConfig,
    nbd_tcp: Option<SocketAddr>,
    files: std::sync::Mutex<Option<FuseMount>>,
    az: Option<Arc<AzTier>>,
    watch: Arc<RootWatch>,
    table: Mutex<BTreeMap<String, Live>>,
    prefetcher: Arc<Prefetcher>,
    /// Each image's prefetch figures, by manifest id, kept after it is detached.
    prefetch_counters: std::sync::Mutex<BTreeMap<String, Arc<PrefetchCounters>>>,
    /// Whether the agent said once that it does not record working sets.
    said_no_record: std::sync::atomic::AtomicBool,
    /// The read trace being recorded, if any.
    trace: Option<Arc<lode_read::TraceWriter>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("state_dir", &self.config.state_dir)
            .finish_non_exhaustive()
    }
}

fn table_path(state_dir: &Path) -> PathBuf {
    state_dir.join("attachments.json")
}

fn hex_name(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn check_name(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AgentError::Request(format!(
            "invalid attachment name {name:?}: 1-{MAX_NAME_LEN} of A-Z a-z 0-9 . _ : - @"
        )))
    }
}

impl Agent {
    /// Builds the cache, starts the NBD listeners and re-attaches what the state directory
    /// lists (an attachment that fails to come back is reported on stderr and dropped).
    pub async fn start(
        config: AgentConfig,
        store: Store,
        kms: Arc<dyn Kms>,
    ) -> Result<Arc<Agent>, AgentError> {
        Self::start_with(config, store, Keys::Kms(kms)).await
    }

    /// [`Agent::start`] with image keys from `keys`: under a control service, only as
    /// grants (the agent then holds no KMS at all).
    pub async fn start_with(
        config: AgentConfig,
        store: Store,
        keys: Keys,
    ) -> Result<Arc<Agent>, AgentError> {
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir.join("overlays"))
            .map_err(io("creating", dir.join("overlays")))?;
        let watch = Arc::new(RootWatch::new(
            store.clone(),
            lode_read::reader_name("lode agent"),
        ));
        watch.spawn_attached_checks();
        let (cache, az) = build_tiers(&config, store.clone(), Some(watch.clone()))?;
        let exports = Exports::new();
        let server = nbd_server(exports.clone(), &config.nbd_limits)?;
        remove_stale_socket(&config.nbd_unix)?;
        server
            .listen_unix(&config.nbd_unix)
            .map_err(|e| AgentError::Listen(e.to_string()))?;
        let nbd_tcp = match config.nbd_tcp {
            Some(a) => Some(
                server
                    .listen_tcp(a)
                    .await
                    .map_err(|e| AgentError::Listen(e.to_string()))?,
            ),
            None => None,
        };
        // Prefetch takes at most half the origin's slots, so demand fetches always have
        // the other half.
        let mut prefetch = config.prefetch.clone();
        prefetch.concurrency = prefetch
            .concurrency
            .min((config.origin_concurrency / 2).max(1));
        let prefetcher = Prefetcher::new(prefetch)?;
        let files = match &config.files {
            Some(dir) => Some(mount_files(dir)?),
            None => None,
        };
        let trace = match &config.trace {
            Some(t) => Some(
                lode_read::TraceWriter::create(&t.path, &t.worker, t.max_bytes)
                    .map_err(io("creating the read trace", t.path.clone()))?,
            ),
            None => None,
        };
        let agent = Arc::new(Agent {
            trace,
            prefetcher,
            prefetch_counters: std::sync::Mutex::new(BTreeMap::new()),
            said_no_record: std::sync::atomic::AtomicBool::new(false),
            store,
            keys,
            warm: std::sync::Mutex::new(VecDeque::new()),
            cache,
            exports,
            server,
            nbd_tcp,
            files: std::sync::Mutex::new(files),
            az,
            watch,
            table: Mutex::new(BTreeMap::new()),
            config,
        });
        let saved = agent.load_table()?;
        {
            let mut table = agent.table.lock().await;
            for att in saved {
                match agent
                    .open(
                        &att.id,
                        &att.name,
                        att.writable,
                        att.start.as_deref(),
                        false,
                    )
                    .await
                {
                    Ok(mut live) => {
                        live.att.image = att.image.clone();
                        agent.touch_warm(&live.att.id);
                        table.insert(att.name.clone(), live);
                    }
                    Err(e) => eprintln!("lode agent: could not re-attach {}: {e}", att.name),
                }
            }
            agent.save_table(&table)?;
        }
        Ok(agent)
    }

    /// The NBD TCP address actually bound, if any.
    pub fn nbd_tcp(&self) -> Option<SocketAddr> {
        self.nbd_tcp
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The worker-wide cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The AZ cache client's counters, when the agent has a fleet.
    pub fn az_metrics(&self) -> Option<lode_az::AzMetrics> {
        self.az.as_ref().map(|a| a.metrics())
    }

    /// The NBD server's counters.
    pub fn nbd_stats(&self) -> lode_nbd::ServerStats {
        self.server.stats()
    }

    /// The metrics snapshot as JSON, with the local tiers' eviction policy under
    /// `cache_policy`, the NBD server's counters under `nbd`, the AZ client's under
    /// `az`, and the reads that raised a read alarm, per root, under `root_alarm_reads`.
    pub fn stats_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.cache.snapshot()).expect("metrics serialise");
        v["cache_policy"] = self.config.cache_policy.name().into();
        v["nbd"] = crate::stats::nbd_json(&self.nbd_stats(), &self.config.nbd_limits);
        v["root_alarm_reads"] = self
            .watch
            .reads()
            .into_iter()
            .map(|(root, n)| (root.to_string(), serde_json::Value::from(n)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        if let Some(m) = self.az_metrics() {
            v["az"] = serde_json::to_value(m).expect("metrics serialise");
        }
        if let Some(g) = self.grants() {
            v["key_grants"] = g.granted().into();
            v["key_refusals"] = g.refused().into();
        }
        v["prefetch"] = self
            .prefetch_snapshots()
            .into_iter()
            .map(|(id, s)| (id, serde_json::to_value(s).expect("metrics serialise")))
            .collect::<serde_json::Map<_, _>>()
            .into();
        v
    }

    /// Each image's prefetch figures, by manifest id (hex), for images attached since
    /// the agent started.
    pub fn prefetch_snapshots(&self) -> BTreeMap<String, lode_read::PrefetchSnapshot> {
        lock(&self.prefetch_counters)
            .iter()
            .map(|(id, c)| (id.clone(), c.snapshot()))
            .collect()
    }

    fn counters_of(&self, id: &lode_format::ManifestId) -> Arc<PrefetchCounters> {
        Arc::clone(
            lock(&self.prefetch_counters)
                .entry(id.to_hex())
                .or_default(),
        )
    }

    /// The image's stored working set, if it has one that opens; one that does not is
    /// ignored with a warning (it only steers prefetch).
    async fn stored_working_set(&self, dev: &ImageDevice, name: &str) -> Option<ImageWorkSet> {
        let id = dev.id();
        let loaded = lode_read::load_working_set(
            &self.store,
            dev.root(),
            &id,
            dev.chunk_count(),
            dev.keys(),
        )
        .await;
        match loaded {
            Ok(None) => None,
            Ok(Some(Ok(ws))) => Some(ws),
            Ok(Some(Err(e))) => {
                eprintln!(
                    "lode agent: {name}: ignoring the working set stored for {id}: {e} (it is recorded again)"
                );
                None
            }
            Err(e) => {
                eprintln!(
                    "lode agent: {name}: reading the working set of {id}: {e} (attaching without prefetch)"
                );
                None
            }
        }
    }

    /// An attachment's prefetch: records when the attach is a start (`fresh`), the image
    /// has no working set (or one marked to re-record) and this agent may write to the
    /// store; the working set to
    /// fetch ahead, if any and if prefetch is on.
    async fn prefetch_for(
        &self,
        dev: &ImageDevice,
        name: &str,
        fresh: bool,
    ) -> (Arc<Prefetch>, Option<ImageWorkSet>) {
        let stored = self.stored_working_set(dev, name).await;
        let wanted = fresh && stored.as_ref().is_none_or(|w| w.rerecord);
        // A worker of a control service holds keys only as grants and never writes
        // to the store: the record is left to an agent with its own KMS.
        let may_write = matches!(self.keys, Keys::Kms(_));
        if wanted
            && !may_write
            && !self
                .said_no_record
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!(
                "lode agent: not recording working sets: a worker of a control service does not write to the store"
            );
        }
        let p = Prefetch::new(
            Arc::clone(&self.prefetcher),
            self.counters_of(&dev.id()),
            wanted && may_write,
        );
        let ws = stored.filter(|w| self.config.prefetch.working_set && !w.chunks.is_empty());
        (p, ws)
    }

    /// Starts an attachment's working-set prefetch and the task that stores its
    /// recording when it ends; the prefetch's handle, to stop it at detach.
    fn start_prefetch(
        &self,
        dev: &Arc<ImageDevice>,
        ws: Option<ImageWorkSet>,
    ) -> Option<tokio::task::AbortHandle> {
        let p = Arc::clone(dev.prefetch_state()?);
        if p.recording() {
            let (p, dev, store) = (Arc::clone(&p), Arc::clone(dev), self.store.clone());
            tokio::spawn(async move {
                if let Some(ws) = p.recorded().await {
                    store_working_set(&store, &dev, &ws, p.counters()).await;
                }
            });
        }
        let ws = ws?;
        let dev = Arc::clone(dev);
        Some(tokio::spawn(async move { p.run_working_set(&dev, &ws.chunks).await }).abort_handle())
    }

    /// Ends an attachment's prefetch: stops fetching ahead, counts what was never read as
    /// wasted, and stores a recording still under way.
    async fn end_prefetch(&self, live: &Live) {
        if let Some(h) = &live.prefetching {
            h.abort();
        }
        let Some(p) = live.dev.prefetch_state() else {
            return;
        };
        p.close();
        if let Some(ws) = p.take_recording() {
            store_working_set(&self.store, &live.dev, &ws, p.counters()).await;
        }
    }

    /// The metrics in Prometheus text, AZ counters and read alarms included.
    pub fn prometheus(&self) -> String {
        let mut text = self.cache.snapshot().to_prometheus();
        text.push_str(&crate::stats::nbd_prometheus(
            &self.nbd_stats(),
            &self.config.nbd_limits,
        ));
        text.push_str(&crate::stats::root_alarms_prometheus(&self.watch.reads()));
        text.push_str(&crate::stats::prefetch_prometheus(
            &self.prefetch_snapshots(),
        ));
        if let Some(m) = self.az_metrics() {
            text.push_str(&lode_read::az_prometheus(&m));
        }
        if let Some(g) = self.grants() {
            text.push_str(&g.prometheus());
        }
        text
    }

    fn load_table(&self) -> Result<Vec<Attachment>, AgentError> {
        let path = table_path(&self.config.state_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| AgentError::Config(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io("reading", path)(e)),
        }
    }

    fn save_table(&self, table: &BTreeMap<String, Live>) -> Result<(), AgentError> {
        let list: Vec<&Attachment> = table.values().map(|l| &l.att).collect();
        let bytes = serde_json::to_vec_pretty(&list).expect("attachments serialise");
        let path = table_path(&self.config.state_dir);
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
            f.write_all(&bytes).map_err(io("writing", &tmp))?;
            f.sync_all().map_err(io("syncing", &tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io("renaming into place", &path))
    }

    fn overlay_path(&self, name: &str) -> PathBuf {
        self.config
            .state_dir
            .join("overlays")
            .join(format!("{}.overlay", hex_name(name)))
    }

    /// Opens `image` as attachment `name`; `fresh` when it is a new attach (a start),
    /// not one the agent brings back after a restart, which is no start to record.
    async fn open(
        &self,
        image: &str,
        name: &str,
        writable: bool,
        start: Option<&str>,
        fresh: bool,
    ) -> Result<Live, AgentError> {
        let opened = match (&self.keys, start) {
            (Keys::Kms(kms), _) => {
                let keys = lode_read::KmsKeys(kms.clone());
                lode_read::open_image_with(&self.store, Some(&keys), image).await
            }
            (Keys::Grants(grants), Some(start)) => {
                lode_read::open_image_with(&self.store, Some(&grants.for_start(start)), image).await
            }
            (Keys::Grants(grants), None) => {
                return Err(AgentError::Request(format!(
                    "worker {} attaches images only by order of its control service \
                     (it holds no image keys of its own)",
                    grants.config().worker
                )));
            }
        }
        .map_err(|e| AgentError::Image {
            image: image.to_string(),
            source: Box::new(e),
        })?;
        // The manifest was just read from its root: a read like any other.
        self.watch.opened(opened.root, opened.id, name).await;
        let id = opened.id.to_string();
        let c = &opened.manifest.header().config;
        let config = RunConfig {
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
        };
        let mut dev = ImageDevice::new(self.cache.clone(), opened)?;
        if let Some(t) = &self.trace {
            let (size, chunks) = (lode_blockdev::BlockDevice::size(&dev), dev.chunk_count());
            dev = dev.with_trace(t.start(image, size, chunks));
        }
        let (prefetch, ws) = self.prefetch_for(&dev, name, fresh).await;
        dev = dev.with_prefetch(prefetch);
        let size = lode_blockdev::BlockDevice::size(&dev);
        let overlay = if writable {
            let p = self.overlay_path(name);
            dev = dev.with_overlay(Overlay::open(&p, size)?)?;
            Some(p)
        } else {
            None
        };
        let dev = Arc::new(dev);
        self.exports
            .add(
                name,
                Export::new(dev.clone() as Arc<dyn lode_blockdev::BlockDevice>)
                    .with_description(&id),
            )
            .map_err(|e| AgentError::Request(e.to_string()))?;
        let file = match self.add_file(name, &dev, writable) {
            Ok(f) => f,
            Err(e) => {
                self.exports.remove(name);
                return Err(e);
            }
        };
        self.watch.attached(dev.id(), name);
        let prefetching = self.start_prefetch(&dev, ws);
        Ok(Live {
            prefetching,
            att: Attachment {
                name: name.to_string(),
                id,
                image: image.to_string(),
                size,
                writable,
                overlay,
                file,
                config,
                start: start.map(str::to_string),
            },
            dev,
        })
    }

    fn add_file(
        &self,
        name: &str,
        dev: &Arc<ImageDevice>,
        writable: bool,
    ) -> Result<Option<PathBuf>, AgentError> {
        let files = lock(&self.files);
        let Some(m) = files.as_ref() else {
            return Ok(None);
        };
        m.add(
            name,
            dev.clone() as Arc<dyn lode_blockdev::BlockDevice>,
            writable,
        )
        .map_err(|e| AgentError::Request(e.to_string()))?;
        Ok(Some(m.path(name)))
    }

    fn remove_file(&self, name: &str) {
        if let Some(m) = lock(&self.files).as_ref() {
            let _ = m.remove(name);
        }
    }

    /// Attaches `image` (a tag or a manifest id) as `name` (default: `image`).
    pub async fn attach(
        &self,
        image: &str,
        name: Option<&str>,
        writable: bool,
    ) -> Result<Attachment, AgentError> {
        self.attach_as(image, name, writable, None).await
    }

    async fn attach_as(
        &self,
        image: &str,
        name: Option<&str>,
        writable: bool,
        start: Option<&str>,
    ) -> Result<Attachment, AgentError> {
        let name = name.unwrap_or(image);
        check_name(name)?;
        let mut table = self.table.lock().await;
        if let Some(start) = start
            && let Some(other) = table
                .values()
                .find(|l| l.att.start.as_deref() == Some(start))
        {
            return Err(AgentError::Conflict(format!(
                "start {start} is already attached here, as {:?}: the order was replayed",
                other.att.name
            )));
        }
        if table.contains_key(name) {
            return Err(AgentError::Conflict(format!(
                "an attachment named {name:?} already exists"
            )));
        }
        if let Keys::Grants(g) = &self.keys
            && table.len() >= g.config().capacity as usize
        {
            return Err(AgentError::Conflict(format!(
                "worker {} is full: {} of {} images attached",
                g.config().worker,
                table.len(),
                g.config().capacity
            )));
        }
        let live = self.open(image, name, writable, start, true).await?;
        self.touch_warm(&live.att.id);
        let att = live.att.clone();
        table.insert(name.to_string(), live);
        if let Err(e) = self.save_table(&table) {
            if let Some(live) = table.remove(name) {
                self.watch.detached(live.dev.id(), name);
            }
            self.exports.remove(name);
            self.remove_file(name);
            return Err(e);
        }
        Ok(att)
    }

    /// Detaches `name`; its overlay is deleted unless `keep_overlay`.
    pub async fn detach(&self, name: &str, keep_overlay: bool) -> Result<Attachment, AgentError> {
        let mut table = self.table.lock().await;
        let Some(live) = table.remove(name) else {
            return Err(AgentError::NotAttached(name.to_string()));
        };
        self.exports.remove(name);
        self.remove_file(name);
        self.watch.detached(live.dev.id(), name);
        self.end_prefetch(&live).await;
        self.save_table(&table)?;
        drop(table);
        self.touch_warm(&live.att.id);
        if let (Keys::Grants(g), Some(start)) = (&self.keys, &live.att.start)
            && let Err(e) = g.release(&live.att.id, start).await
        {
            eprintln!(
                "lode agent: telling the control service that start {start} (manifest {}) was released: {e}",
                live.att.id
            );
        }
        if let Some(ov) = live.dev.overlay() {
            if keep_overlay {
                ov.flush().await?;
            } else {
                let p = ov.path().to_path_buf();
                for f in [p.clone(), PathBuf::from(format!("{}.bitmap", p.display()))] {
                    match std::fs::remove_file(&f) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io("removing", f)(e)),
                    }
                }
            }
        }
        Ok(live.att)
    }

    /// Carries out an attach order from the control service: attaches exactly the
    /// manifest ordered, read-only, under the name ordered, keyed by the order's start.
    /// Refused: a malformed manifest or start id, a lease already over, a start already
    /// attached (a replayed order), a full worker, or an agent with no control service.
    pub async fn attach_order(&self, order: &AttachOrder) -> Result<AttachReply, AgentError> {
        if !matches!(self.keys, Keys::Grants(_)) {
            return Err(AgentError::Request(
                "this agent runs without a control service and takes no attach orders".into(),
            ));
        }
        let manifest: lode_format::ManifestId = order.manifest.parse().map_err(|_| {
            AgentError::Request(format!(
                "manifest id {:?} is malformed: 64 hex digits expected",
                order.manifest.chars().take(80).collect::<String>()
            ))
        })?;
        crate::worker::check_start(&order.start)?;
        let now = crate::worker::unix_now_ms();
        if order.lease_expires_unix_ms <= now {
            return Err(AgentError::Request(format!(
                "the lease of start {} ended at {} ms, before the order arrived ({now} ms)",
                order.start, order.lease_expires_unix_ms
            )));
        }
        let att = self
            .attach_as(
                &manifest.to_string(),
                Some(&order.name),
                false,
                Some(&order.start),
            )
            .await?;
        Ok(AttachReply {
            nbd_export: Some(att.name.clone()),
            file: att.file.map(|f| f.display().to_string()),
            name: att.name,
        })
    }

    /// What a heartbeat carries: the manifests attached now, and the warm list — those
    /// attached now or lately, newest first, at most [`MAX_WARM`].
    pub async fn heartbeat_lists(&self) -> (Vec<String>, Vec<String>) {
        let mut attached: Vec<String> = self
            .table
            .lock()
            .await
            .values()
            .map(|l| l.att.id.clone())
            .collect();
        attached.sort();
        attached.dedup();
        let warm = lock(&self.warm).iter().cloned().collect();
        (attached, warm)
    }

    fn touch_warm(&self, id: &str) {
        let mut warm = lock(&self.warm);
        warm.retain(|w| w != id);
        warm.push_front(id.to_string());
        warm.truncate(MAX_WARM);
    }

    /// The control-service link, on a worker of one.
    pub fn grants(&self) -> Option<&Arc<Grants>> {
        match &self.keys {
            Keys::Grants(g) => Some(g),
            Keys::Kms(_) => None,
        }
    }

    /// The attachments, by name.
    pub async fn list(&self) -> Vec<Attachment> {
        self.table
            .lock()
            .await
            .values()
            .map(|l| l.att.clone())
            .collect()
    }

    /// Stops the NBD server, unmounts the FUSE files (lazily, if a loop device still
    /// holds one) and flushes every overlay.
    pub async fn shutdown(&self) {
        self.server.shutdown().await;
        let files = lock(&self.files).take();
        if let Some(m) = files {
            let r = tokio::task::spawn_blocking(move || m.unmount()).await;
            if let Ok(Err(e)) = r {
                eprintln!(
                    "lode agent: {e} (detached lazily; loop devices on it still work until released)"
                );
            }
        }
        for live in self.table.lock().await.values() {
            self.end_prefetch(live).await;
            if let Some(ov) = live.dev.overlay()
                && let Err(e) = ov.flush().await
            {
                eprintln!("lode agent: flushing {}: {e}", live.att.name);
            }
        }
        self.cache.settle().await;
        if let Some(t) = &self.trace {
            t.finish();
        }
        let _ = std::fs::remove_file(&self.config.nbd_unix);
    }
}

/// Seals `ws` for `dev`'s image and stores it beside the manifest, replacing any
/// earlier record; a start that read nothing stores nothing. A failure is reported and
/// only loses the record.
async fn store_working_set(
    store: &Store,
    dev: &ImageDevice,
    ws: &ImageWorkSet,
    counters: &PrefetchCounters,
) {
    if ws.chunks.is_empty() {
        return;
    }
    let id = dev.id();
    let sealed = ws.seal(&id, dev.chunk_count(), &WorkSetKey::new(dev.keys()));
    match store.put_working_set(dev.root(), &id, sealed.into()).await {
        Ok(()) => counters.record_stored(ws.chunks.len()),
        Err(e) => eprintln!("lode agent: storing the working set of {id}: {e}"),
    }
}

/// The worker's chunk cache as `config` describes it: decrypted memory over ciphertext
/// memory, disk (in `STATE_DIR/cache`), the AZ fleet when configured, and the origin
/// `store`. Returns the AZ tier too, for its metrics. (The agent's own cache also
/// raises read alarms on its origin reads.)
pub fn build_cache(
    config: &AgentConfig,
    store: Store,
) -> Result<(Arc<ChunkCache>, Option<Arc<AzTier>>), AgentError> {
    build_tiers(config, store, None)
}

/// [`build_cache`], its origin tier reporting to `watch` when given.
fn build_tiers(
    config: &AgentConfig,
    store: Store,
    watch: Option<Arc<RootWatch>>,
) -> Result<(Arc<ChunkCache>, Option<Arc<AzTier>>), AgentError> {
    let az = match &config.az {
        Some(c) => Some(Arc::new(AzTier::new(c.clone())?)),
        None => None,
    };
    let mut cache = ChunkCache::builder()
        .decrypted_bytes(config.decrypted)
        .decrypted_policy(config.cache_policy)
        .tier(Arc::new(MemoryTier::with_policy(
            config.cache_memory,
            config.cache_policy,
        )))
        .tier(Arc::new(DiskTier::open_with_policy(
            config.state_dir.join("cache"),
            config.cache_disk,
            config.cache_policy,
        )?));
    if let Some(az) = &az {
        cache = cache.tier(az.clone());
    }
    let mut origin = StoreOrigin::with_concurrency(store, config.origin_concurrency);
    if let Some(w) = watch {
        origin = origin.watched(w);
    }
    let cache = cache.origin(Arc::new(origin)).build()?;
    Ok((cache, az))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Mounts the FUSE filesystem of attachment files on `dir`, first clearing a mount
/// left there by an agent that died (its files answer ENOTCONN).
fn mount_files(dir: &Path) -> Result<FuseMount, AgentError> {
    if let Err(e) = std::fs::metadata(dir)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| AgentError::Config(format!("{} has a NUL byte", dir.display())))?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(io("clearing the dead FUSE mount at", dir)(
                std::io::Error::last_os_error(),
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // A read of a FUSE file that fails (the loop device's, a VMM's) is logged like a
    // failed NBD request: the file, the offset and every cause (the chunk, the store).
    let budget = LogBudget::new(LOG_LINES_PER_SECOND, Duration::from_secs(1));
    let options = MountOptions::new(tokio::runtime::Handle::current())
        .allow_other(root)
        .on_error(move |e| {
            if let Some(held_back) = budget.take(std::time::Instant::now()) {
                eprintln!(
                    "{}",
                    failure_line("lode agent: files".to_owned(), e, held_back)
                );
            }
        });
    FuseMount::mount(dir, options).map_err(|e| AgentError::Listen(e.to_string()))
}

/// `what`, then `e` and each of its causes that the ones above do not already print,
/// then how many failures the log budget held back before this one.
fn failure_line(what: String, e: &dyn std::error::Error, held_back: u64) -> String {
    let mut line = format!("{what}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        // Most layers already print the one below them: say each cause once.
        let cause = s.to_string();
        if !line.contains(&cause) {
            line.push_str(&format!(": {cause}"));
        }
        source = s.source();
    }
    if held_back > 0 {
        line.push_str(&format!(
            " ({held_back} more failures not logged before this one)"
        ));
    }
    line
}

/// Removes a Unix socket left by an agent that died; refuses if one still answers.
pub(crate) fn remove_stale_socket(path: &Path) -> Result<(), AgentError> {
    if !path.exists() {
        return Ok(());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::Listen(format!(
            "{} is in use (is another agent running?)",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(io("removing stale socket", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_limits_out_of_range_name_their_key() {
        let refused = |set: fn(&mut NbdLimits)| {
            let mut limits = NbdLimits::default();
            set(&mut limits);
            nbd_server(Exports::new(), &limits).unwrap_err().to_string()
        };
        assert_eq!(
            refused(|l| l.max_connections = 0),
            "invalid configuration: [nbd] max_connections must be between 1 and 1048576, got 0"
        );
        assert_eq!(
            refused(|l| l.max_buffered_bytes = 4096),
            "invalid configuration: [nbd] max_buffered_bytes must be between 65536 and 1073741824, got 4096"
        );
        assert_eq!(
            refused(|l| l.max_connections_per_peer = Some(0)),
            "invalid configuration: [nbd] max_connections_per_peer must be between 1 and 1048576, got 0"
        );
        assert_eq!(
            refused(|l| l.max_in_flight = 5000),
            "invalid configuration: [nbd] max_in_flight must be between 1 and 4096, got 5000"
        );
        assert_eq!(
            refused(|l| l.handshake_timeout = Duration::ZERO),
            "invalid configuration: [nbd] handshake_timeout_ms must be positive"
        );
        assert!(nbd_server(Exports::new(), &NbdLimits::default()).is_ok());
    }

    #[test]
    fn a_flood_of_connection_errors_is_logged_a_few_lines_a_second() {
        let budget = LogBudget::new(3, Duration::from_secs(1));
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let first: Vec<_> = (0..10).map(|i| budget.take(at(i))).collect();
        assert_eq!(first[..3], [Some(0); 3]);
        assert_eq!(first[3..], [None; 7]);
        // The next window's first line says how many were held back.
        assert_eq!(budget.take(at(1000)), Some(7));
        assert_eq!(budget.take(at(1001)), Some(0));
    }
}
