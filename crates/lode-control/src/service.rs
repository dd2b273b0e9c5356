//! The routes of `lode control serve`: workers register and heartbeat, admins ask for
//! starts, workers ask for the keys of their assignments and release them.
//!
//! Every decision reads the store at the moment it is made: a key grant re-reads the
//! assignment it rests on, so a replica never grants from what it remembers, and two
//! replicas over one store grant exactly what the records allow. The service is the only
//! process that asks the KMS to unwrap; every grant and refusal is logged on one line and
//! counted for `/metrics`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lode_format::{Manifest, ManifestId};
use lode_kms::Kms;
use serde::de::DeserializeOwned;

use crate::api::{
    AttachOrder, AttachReply, Heartbeat, HeartbeatReply, Identity, KeyGrant, KeyRequest, Register,
    Release, Role, StartReply, StartRequest,
};
use crate::pki::Credentials;
use crate::placement::{self, Load, Ring};
use crate::rpc::{Client, Endpoint, Handler, Reply};
use crate::state::{AddStartError, StartLease, State, WorkerRecord};

/// How the service behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long an assignment lasts unless a heartbeat renews it.
    pub lease: Duration,
    /// How often workers heartbeat; a worker is alive while its last heartbeat is within
    /// three of these.
    pub heartbeat_interval: Duration,
    /// How long one KMS unwrap may take before the grant fails.
    pub kms_timeout: Duration,
    /// Placement's load bound (see [`placement::place`]).
    pub epsilon: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            kms_timeout: Duration::from_secs(10),
            epsilon: 0.25,
        }
    }
}

/// The most manifests a heartbeat may list in each of `attached` and `warm`.
pub const MAX_HEARTBEAT_LIST: usize = 4096;

/// The assignment service.
pub struct Service {
    state: State,
    kms: Arc<dyn Kms>,
    creds: Arc<Credentials>,
    config: Config,
    metrics: Mutex<BTreeMap<String, u64>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("state", &self.state)
            .field("kms", &self.kms.describe())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A refusal: its status, the reason's short label (for the metric) and the message.
struct Refusal {
    status: u16,
    reason: &'static str,
    message: String,
}

fn refuse(status: u16, reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason,
        message: message.into(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn parse<T: DeserializeOwned>(peer: &Identity, path: &str, body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        refuse(
            400,
            "malformed",
            format!("{path} from {}: malformed body: {e}", peer.id),
        )
    })
}

fn manifest_id(text: &str) -> Result<ManifestId, Refusal> {
    text.parse::<ManifestId>().map_err(|_| {
        refuse(
            400,
            "malformed",
            format!("{text:?} is not a manifest id (64 hex digits)"),
        )
    })
}

fn store_failed(e: lode_store::StoreError) -> Refusal {
    refuse(503, "store", format!("the store failed: {e}"))
}

impl Service {
    /// A service over `state`, unwrapping with `kms`, sending attach orders as `creds`.
    pub fn new(state: State, kms: Arc<dyn Kms>, creds: Arc<Credentials>, config: Config) -> Self {
        Service {
            state,
            kms,
            creds,
            config,
            metrics: Mutex::new(BTreeMap::new()),
        }
    }

    fn count(&self, metric: String) {
        if let Ok(mut metrics) = self.metrics.lock() {
            *metrics.entry(metric).or_default() += 1;
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::from(
            "# TYPE lode_control_grants_total counter\n\
             # TYPE lode_control_refusals_total counter\n\
             # TYPE lode_control_starts_total counter\n",
        );
        if let Ok(metrics) = self.metrics.lock() {
            if !metrics.contains_key("lode_control_grants_total") {
                text.push_str("lode_control_grants_total 0\n");
            }
            for (name, value) in metrics.iter() {
                text.push_str(&format!("{name} {value}\n"));
            }
        }
        text
    }

    fn require(&self, peer: &Identity, role: Role, path: &str) -> Result<(), Refusal> {
        if peer.role == role {
            return Ok(());
        }
        Err(refuse(
            403,
            "role",
            format!(
                "{path}: {}/{} may not call this route (it is for the {} role)",
                crate::pki::role_name(peer.role),
                peer.id,
                crate::pki::role_name(role)
            ),
        ))
    }

    fn same_worker(peer: &Identity, stated: &str, path: &str) -> Result<(), Refusal> {
        if peer.id == stated {
            return Ok(());
        }
        Err(refuse(
            403,
            "impersonation",
            format!(
                "{path}: worker {} asked as worker {stated:?}; a worker speaks only for itself",
                peer.id
            ),
        ))
    }

    async fn register(&self, peer: &Identity, body: &[u8]) -> Result<Reply, Refusal> {
        let path = "/v1/workers/register";
        self.require(peer, Role::Worker, path)?;
        let register: Register = parse(peer, path, body)?;
        Self::same_worker(peer, &register.worker, path)?;
        if register.address.is_empty() || register.address.len() > 256 {
            return Err(refuse(
                400,
                "malformed",
                format!("{path}: worker {}: address must be 1 to 256 bytes", peer.id),
            ));
        }
        let record = WorkerRecord {
            worker: peer.id.clone(),
            address: register.address,
            capacity: register.capacity,
            attached: Vec::new(),
            warm: Vec::new(),
            heartbeat_unix_ms: now_ms(),
        };
        self.state.put_worker(&record).await.map_err(store_failed)?;
        eprintln!(
            "lode control: worker {} registered at {} (capacity {})",
            record.worker, record.address, record.capacity
        );
        Ok(Reply::json(&record))
    }

    async fn heartbeat(&self, peer: &Identity, body: &[u8]) -> Result<Reply, Refusal> {
        let path = "/v1/workers/heartbeat";
        self.require(peer, Role::Worker, path)?;
        let beat: Heartbeat = parse(peer, path, body)?;
        Self::same_worker(peer, &beat.worker, path)?;
        if beat.attached.len() > MAX_HEARTBEAT_LIST || beat.warm.len() > MAX_HEARTBEAT_LIST {
            return Err(refuse(
                400,
                "malformed",
                format!(
                    "{path}: worker {}: more than {MAX_HEARTBEAT_LIST} manifests listed",
                    peer.id
                ),
            ));
        }
        let attached = beat
            .attached
            .iter()
            .map(|m| manifest_id(m))
            .collect::<Result<Vec<_>, _>>()?;
        for m in &beat.warm {
            manifest_id(m)?;
        }
        let Some(mut record) = self.state.worker(&peer.id).await.map_err(store_failed)? else {
            return Err(refuse(
                404,
                "unregistered",
                format!("{path}: worker {} has not registered", peer.id),
            ));
        };
        let now = now_ms();
        record.attached = beat.attached.clone();
        record.warm = beat.warm.clone();
        record.heartbeat_unix_ms = now;
        self.state.put_worker(&record).await.map_err(store_failed)?;
        let until = now.saturating_add(ms(self.config.lease));
        let mut renewed = Vec::new();
        for id in attached {
            // Every live start of the manifest on this worker is renewed; an ended lease
            // stays ended: its key may already have been refused, and a late heartbeat
            // must not bring a grant back.
            let n = self
                .state
                .renew(&id, &peer.id, now, until)
                .await
                .map_err(store_failed)?;
            if n > 0 {
                renewed.push(id.to_hex());
            }
        }
        Ok(Reply::json(&HeartbeatReply {
            renewed,
            lease_expires_unix_ms: until,
        }))
    }

    async fn start(&self, peer: &Identity, body: &[u8]) -> Result<Reply, Refusal> {
        let path = "/v1/start";
        if let Err(mut refusal) = self.require(peer, Role::Admin, path) {
            if let Ok(request) = serde_json::from_slice::<StartRequest>(body) {
                refusal.message = format!(
                    "start of {:?} refused to {}/{}: {}",
                    clip(&request.image),
                    crate::pki::role_name(peer.role),
                    peer.id,
                    refusal.message
                );
            }
            return Err(refusal);
        }
        let request: StartRequest = parse(peer, path, body)?;
        let id = lode_read::resolve(self.state.store(), &request.image)
            .await
            .map_err(|e| {
                refuse(
                    404,
                    "unknown-image",
                    format!("start of {:?} for {}: {e}", request.image, peer.id),
                )
            })?;
        self.state.store().find_manifest(&id).await.map_err(|e| {
            refuse(
                404,
                "unknown-image",
                format!("start of {:?} for {}: {e}", request.image, peer.id),
            )
        })?;
        let now = now_ms();
        let mut workers = self.state.workers().await.map_err(store_failed)?;
        workers.sort_by(|a, b| a.worker.cmp(&b.worker));
        let assignments = self.state.assignments(None).await.map_err(store_failed)?;
        let alive_within = ms(self.config.heartbeat_interval).saturating_mul(3);
        let hex = id.to_hex();
        let loads: Vec<Load> = workers
            .iter()
            .map(|w| Load {
                capacity: w.capacity,
                load: u32::try_from(
                    assignments
                        .iter()
                        .filter(|a| a.worker == w.worker)
                        .map(|a| a.live(now))
                        .sum::<usize>(),
                )
                .unwrap_or(u32::MAX),
                warm: w.warm.contains(&hex) || w.attached.contains(&hex),
                alive: now.saturating_sub(w.heartbeat_unix_ms) <= alive_within,
            })
            .collect();
        let ring = Ring::new(workers.iter().map(|w| w.worker.clone()));
        let Some(placed) = placement::place(&ring, id.as_bytes(), &loads, self.config.epsilon)
        else {
            self.count("lode_control_starts_total{placed=\"none\"}".to_owned());
            return Err(refuse(
                503,
                "no-worker",
                format!(
                    "start of {:?} (manifest {hex}) for {}: no live worker has room",
                    request.image, peer.id
                ),
            ));
        };
        let Some(worker) = workers.get(placed.worker) else {
            return Err(refuse(500, "placement", "placement chose no known worker"));
        };
        let start = random_hex16()
            .ok_or_else(|| refuse(500, "random", "the system random source failed"))?;
        let name = format!("s-{}", &start[..12]);
        let lease_end = now.saturating_add(ms(self.config.lease));
        let lease = StartLease {
            start: start.clone(),
            image: request.image.clone(),
            name: name.clone(),
            lease_expires_unix_ms: lease_end,
            created_unix_ms: now,
        };
        let bound = usize::try_from(worker.capacity).unwrap_or(usize::MAX);
        match self
            .state
            .add_start(&id, &worker.worker, lease, bound)
            .await
        {
            Ok(()) => {}
            Err(AddStartError::Store(e)) => return Err(store_failed(e)),
            Err(AddStartError::Full(n)) => {
                self.count("lode_control_starts_total{placed=\"none\"}".to_owned());
                return Err(refuse(
                    503,
                    "no-worker",
                    format!(
                        "start of {:?} (manifest {hex}) for {}: worker {} already runs {n} \
                         start(s) of it, its limit",
                        request.image, peer.id, worker.worker
                    ),
                ));
            }
        }
        crate::failpoint::pause("control:after-assign").await;

        let order = AttachOrder {
            start: start.clone(),
            image: request.image.clone(),
            manifest: hex.clone(),
            name: name.clone(),
            lease_expires_unix_ms: lease_end,
        };
        let attached: Result<AttachReply, String> = match worker_endpoint(&worker.address) {
            Ok(endpoint) => match Client::new(endpoint, self.creds.clone()) {
                Ok(client) => client
                    .call("/v1/attach", &order)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e),
        };
        let attached = match attached {
            Ok(reply) => reply,
            Err(e) => {
                // The order did not land: the assignment must not outlive it.
                let _ = self.state.remove_start(&id, &worker.worker, &start).await;
                self.count("lode_control_starts_total{placed=\"failed\"}".to_owned());
                return Err(refuse(
                    502,
                    "attach-failed",
                    format!(
                        "start {start} of {:?} on worker {}: the attach order failed: {e}",
                        request.image, worker.worker
                    ),
                ));
            }
        };
        let how = match placed.how {
            crate::api::Placed::Warm => "warm",
            crate::api::Placed::Hashed => "hashed",
        };
        self.count(format!("lode_control_starts_total{{placed=\"{how}\"}}"));
        eprintln!(
            "lode control: start {start} of {:?} (manifest {hex}) placed on worker {} ({how}) for {}",
            request.image, worker.worker, peer.id
        );
        Ok(Reply::json(&StartReply {
            start,
            worker: worker.worker.clone(),
            manifest: hex,
            name: attached.name,
            placed: placed.how,
            lease_expires_unix_ms: lease_end,
            nbd_export: attached.nbd_export,
            file: attached.file,
        }))
    }

    async fn keys(&self, peer: &Identity, request: &KeyRequest) -> Result<KeyGrant, Refusal> {
        let id = manifest_id(&request.manifest)?;
        // Read now, from the store: a replica never grants from memory.
        let assignment = self
            .state
            .assignment(&id, &peer.id)
            .await
            .map_err(store_failed)?;
        let now = now_ms();
        let record = assignment.map(|(record, _)| record);
        let live = record.as_ref().map_or(0, |r| r.live(now));
        let Some(lease) = record.as_ref().and_then(|r| r.start(&request.start)) else {
            if live > 0 {
                return Err(refuse(
                    403,
                    "wrong-start",
                    format!(
                        "start {} is not among this worker's {live} live start(s) of it",
                        request.start
                    ),
                ));
            }
            let others = self
                .state
                .assignments(Some(&id))
                .await
                .map_err(store_failed)?;
            let holders: Vec<&str> = others
                .iter()
                .filter(|a| a.live(now) > 0)
                .map(|a| a.worker.as_str())
                .collect();
            let message = if holders.is_empty() {
                "it is assigned to no worker".to_owned()
            } else {
                format!("it is assigned to worker {}", holders.join(", "))
            };
            return Err(refuse(403, "not-assigned", message));
        };
        if !lease.live(now) {
            return Err(refuse(
                403,
                "lease-expired",
                format!(
                    "start {}'s lease ended {} ms ago",
                    request.start,
                    now - lease.lease_expires_unix_ms
                ),
            ));
        }
        let lease_expires_unix_ms = lease.lease_expires_unix_ms;
        let (root, bytes) = self
            .state
            .store()
            .find_manifest(&id)
            .await
            .map_err(|e| refuse(404, "no-manifest", e.to_string()))?;
        let manifest =
            Manifest::parse(&bytes).map_err(|e| refuse(500, "bad-manifest", e.to_string()))?;
        let key_id = manifest.wrapped_key().key_id.clone();
        let unwrapped = tokio::time::timeout(
            self.config.kms_timeout,
            lode_read::unwrap_data_key(self.kms.as_ref(), &id, root, &manifest),
        )
        .await;
        let data_key = match unwrapped {
            Ok(Ok(key)) => key,
            Ok(Err(e)) => {
                return Err(refuse(
                    502,
                    "kms",
                    format!(
                        "KMS {} could not unwrap key {key_id:?}: {e}",
                        self.kms.describe()
                    ),
                ));
            }
            Err(_) => {
                return Err(refuse(
                    504,
                    "kms",
                    format!(
                        "KMS {} did not answer an unwrap with key {key_id:?} within {:?}",
                        self.kms.describe(),
                        self.config.kms_timeout
                    ),
                ));
            }
        };
        Ok(KeyGrant {
            manifest: id.to_hex(),
            data_key: hex::encode(data_key.expose()),
            lease_expires_unix_ms,
        })
    }

    async fn grant(&self, peer: &Identity, body: &[u8]) -> Result<Reply, Refusal> {
        let path = "/v1/keys";
        if let Err(mut refusal) = self.require(peer, Role::Worker, path) {
            if let Ok(request) = serde_json::from_slice::<KeyRequest>(body) {
                refusal.message = format!(
                    "key of manifest {:?} refused to {}/{}: {}",
                    clip(&request.manifest),
                    crate::pki::role_name(peer.role),
                    peer.id,
                    refusal.message
                );
            }
            return Err(refusal);
        }
        let request: KeyRequest = parse(peer, path, body)?;
        let outcome = match Self::same_worker(peer, &request.worker, path) {
            Ok(()) => self.keys(peer, &request).await,
            Err(refusal) => Err(refusal),
        };
        match outcome {
            Ok(grant) => {
                self.count("lode_control_grants_total".to_owned());
                eprintln!(
                    "lode control: granted worker {} the key of manifest {} (start {})",
                    peer.id, request.manifest, request.start
                );
                Ok(Reply::json(&grant))
            }
            Err(mut refusal) => {
                refusal.message = format!(
                    "key of manifest {} refused to worker {} (start {}): {}",
                    request.manifest, peer.id, request.start, refusal.message
                );
                Err(refusal)
            }
        }
    }

    async fn release(&self, peer: &Identity, body: &[u8]) -> Result<Reply, Refusal> {
        let path = "/v1/release";
        self.require(peer, Role::Worker, path)?;
        let release: Release = parse(peer, path, body)?;
        Self::same_worker(peer, &release.worker, path)?;
        let id = manifest_id(&release.manifest)?;
        let released = self
            .state
            .remove_start(&id, &peer.id, &release.start)
            .await
            .map_err(store_failed)?;
        if released {
            eprintln!(
                "lode control: worker {} released manifest {} (start {})",
                peer.id, release.manifest, release.start
            );
        }
        // Not there: already released, or its lease ended and a later start dropped it.
        Ok(Reply::json(&serde_json::json!({ "released": released })))
    }

    async fn read_state(&self, peer: &Identity, path: &str) -> Result<Reply, Refusal> {
        if peer.role == Role::Worker {
            return Err(refuse(
                403,
                "role",
                format!("{path}: worker {} may not read the fleet's state", peer.id),
            ));
        }
        if path == "/v1/workers" {
            let workers = self.state.workers().await.map_err(store_failed)?;
            Ok(Reply::json(&workers))
        } else {
            let assignments = self.state.assignments(None).await.map_err(store_failed)?;
            Ok(Reply::json(&assignments))
        }
    }
}

/// The endpoint of a worker's address: `host:port` (TLS), `https://host:port` or
/// `unix:/path`.
fn worker_endpoint(address: &str) -> Result<Endpoint, String> {
    if address.starts_with("https://") || address.starts_with("unix:") {
        address.parse::<Endpoint>().map_err(|e| e.to_string())
    } else {
        format!("https://{address}")
            .parse::<Endpoint>()
            .map_err(|e| e.to_string())
    }
}

/// At most the first 100 characters of `text`, which a caller chose: enough to name it in a
/// refusal, not enough to flood the log.
fn clip(text: &str) -> String {
    text.chars().take(100).collect()
}

fn random_hex16() -> Option<String> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
    Some(hex::encode(bytes))
}

#[async_trait::async_trait]
impl Handler for Service {
    async fn handle(&self, peer: Identity, path: &str, body: Bytes) -> Reply {
        let outcome = match path {
            "/v1/workers/register" => self.register(&peer, &body).await,
            "/v1/workers/heartbeat" => self.heartbeat(&peer, &body).await,
            "/v1/start" => self.start(&peer, &body).await,
            "/v1/keys" => self.grant(&peer, &body).await,
            "/v1/release" => self.release(&peer, &body).await,
            "/v1/workers" | "/v1/assignments" => self.read_state(&peer, path).await,
            "/metrics" => Ok(Reply {
                status: 200,
                body: self.metrics_text().into_bytes(),
            }),
            _ => Err(refuse(404, "no-route", format!("no route {path}"))),
        };
        match outcome {
            Ok(reply) => reply,
            Err(refusal) => {
                if path == "/v1/keys" || refusal.status == 403 || refusal.status == 401 {
                    self.count(format!(
                        "lode_control_refusals_total{{reason=\"{}\"}}",
                        refusal.reason
                    ));
                }
                eprintln!(
                    "lode control: refused {path} to {}/{}: {}",
                    crate::pki::role_name(peer.role),
                    peer.id,
                    refusal.message
                );
                Reply::error(refusal.status, refusal.message)
            }
        }
    }
}
