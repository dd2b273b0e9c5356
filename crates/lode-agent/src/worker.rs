//! The worker side of the control plane (docs/agent.md, "Under a control service").
//!
//! A worker run by `lode control` holds no KMS credentials and no keyring: it registers
//! with the control service, heartbeats what it has attached and what its cache holds
//! warm, takes attach orders from control replicas only, and gets each image's data key
//! as a grant for the start an order named ([`Grants`], a [`lode_read::KeySource`] per
//! start). The control service grants a key only while that start's lease lasts, so a
//! restarted worker asks again for the keys of what it had attached, and the lease
//! decides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lode_control::api::{
    AttachOrder, Heartbeat, HeartbeatReply, Identity, KeyGrant, KeyRequest, Register, Release, Role,
};
use lode_format::{DataKey, Manifest, ManifestId, RootId};
use lode_read::{KeySource, OpenError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Agent, AgentError};

/// How often a worker heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// Most manifest ids a heartbeat's warm list carries.
pub const MAX_WARM: usize = 256;
/// Longest worker id: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub const MAX_WORKER_ID: usize = 64;

/// Who this worker is to its control service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Its id (its certificate's).
    pub worker: String,
    /// The address registered: where control replicas send attach orders (`host:port`).
    pub address: String,
    /// How many images it may have attached at once.
    pub capacity: u32,
}

/// Milliseconds since the epoch, now: the clock leases are read by.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Checks a worker id: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn check_worker_id(id: &str) -> Result<(), AgentError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_WORKER_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AgentError::Config(format!(
            "worker id {id:?} is invalid: use 1 to {MAX_WORKER_ID} of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// Checks a start id as an attach order carries it: 32 lowercase hex digits.
pub fn check_start(start: &str) -> Result<(), AgentError> {
    if start.len() == 32
        && start
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(AgentError::Request(format!(
            "start id {:?} is malformed: 32 lowercase hex digits expected",
            start.chars().take(80).collect::<String>()
        )))
    }
}

/// Parses a granted data key: exactly 64 hex digits.
pub fn parse_data_key(text: &str) -> Result<DataKey, String> {
    let mut bytes = [0u8; 32];
    if text.len() != 64 {
        return Err(format!(
            "a data key is 64 hex digits, this one has {} characters",
            text.len()
        ));
    }
    hex::decode_to_slice(text, &mut bytes)
        .map_err(|e| format!("a data key is 64 hex digits: {e}"))?;
    Ok(DataKey::from_bytes(bytes))
}

/// Why a call to the control service failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The control service answered, and refused.
    Refused {
        /// The HTTP status.
        status: u16,
        /// Its message.
        error: String,
    },
    /// It could not be reached, or its answer could not be read.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused { status, error } => write!(f, "refused ({status}): {error}"),
            CallError::Failed(e) => f.write_str(e),
        }
    }
}

/// The one call a worker makes to its control service: a JSON body to a path, a JSON
/// answer back (mTLS under the worker's identity).
#[async_trait::async_trait]
pub trait ControlCalls: Send + Sync + std::fmt::Debug + 'static {
    /// POSTs `body` to `path` and returns the answer's JSON.
    async fn call(&self, path: &str, body: Vec<u8>) -> Result<Vec<u8>, CallError>;
}

/// [`ControlCalls`] over the control plane's mTLS client.
#[derive(Debug)]
pub struct RpcControl(pub lode_control::rpc::Client);

#[async_trait::async_trait]
impl ControlCalls for RpcControl {
    async fn call(&self, path: &str, body: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let (status, reply) = self
            .0
            .exchange(path, body)
            .await
            .map_err(|e| CallError::Failed(e.to_string()))?;
        if (200..300).contains(&status) {
            return Ok(reply.to_vec());
        }
        let error = serde_json::from_slice::<lode_control::api::ErrorReply>(&reply)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&reply).chars().take(500).collect());
        Err(CallError::Refused { status, error })
    }
}

/// The worker's order endpoint: [`order`] behind [`lode_control::rpc::serve`].
#[derive(Debug)]
pub struct Orders(pub Arc<Agent>);

#[async_trait::async_trait]
impl lode_control::rpc::Handler for Orders {
    async fn handle(
        &self,
        peer: Identity,
        path: &str,
        body: bytes::Bytes,
    ) -> lode_control::rpc::Reply {
        let (status, body) = order(&self.0, &peer, path, &body).await;
        lode_control::rpc::Reply { status, body }
    }
}

/// The worker's link to its control service: registration, heartbeats, releases and key
/// grants, with the grants received and refused counted.
#[derive(Debug)]
pub struct Grants {
    control: Arc<dyn ControlCalls>,
    config: WorkerConfig,
    granted: AtomicU64,
    refused: AtomicU64,
}

impl Grants {
    /// A link over `control` for the worker `config` describes.
    pub fn new(control: Arc<dyn ControlCalls>, config: WorkerConfig) -> Result<Self, AgentError> {
        check_worker_id(&config.worker)?;
        if config.capacity == 0 {
            return Err(AgentError::Config(
                "a worker's capacity must be at least 1".into(),
            ));
        }
        Ok(Self {
            control,
            config,
            granted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Who this worker is.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Grants received.
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// Grants the control service refused.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    async fn call<Q: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
    ) -> Result<A, CallError> {
        let body = serde_json::to_vec(body).expect("JSON serialises");
        let answer = self.control.call(path, body).await?;
        serde_json::from_slice(&answer)
            .map_err(|e| CallError::Failed(format!("the control service's answer to {path}: {e}")))
    }

    /// Registers this worker.
    pub async fn register(&self) -> Result<(), CallError> {
        let r = Register {
            worker: self.config.worker.clone(),
            address: self.config.address.clone(),
            capacity: self.config.capacity,
        };
        let _: serde_json::Value = self.call("/v1/workers/register", &r).await?;
        Ok(())
    }

    /// Sends one heartbeat.
    pub async fn heartbeat(
        &self,
        attached: Vec<String>,
        warm: Vec<String>,
    ) -> Result<HeartbeatReply, CallError> {
        let h = Heartbeat {
            worker: self.config.worker.clone(),
            attached,
            warm,
        };
        self.call("/v1/workers/heartbeat", &h).await
    }

    /// Tells the control service this worker detached `manifest` of `start`.
    pub async fn release(&self, manifest: &str, start: &str) -> Result<(), CallError> {
        let r = Release {
            worker: self.config.worker.clone(),
            manifest: manifest.to_string(),
            start: start.to_string(),
        };
        let _: serde_json::Value = self.call("/v1/release", &r).await?;
        Ok(())
    }

    /// The data key of manifest `id`, granted for `start`.
    pub async fn key(&self, id: &ManifestId, start: &str) -> Result<DataKey, OpenError> {
        let worker = &self.config.worker;
        let req = KeyRequest {
            worker: worker.clone(),
            manifest: id.to_string(),
            start: start.to_string(),
        };
        let grant: KeyGrant = match self.call("/v1/keys", &req).await {
            Ok(g) => g,
            Err(CallError::Refused { status, error }) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(OpenError::KeyGrant {
                    id: *id,
                    reason: format!(
                        "the control service refused worker {worker} the key for start \
                         {start} ({status}): {error}"
                    ),
                });
            }
            Err(CallError::Failed(e)) => {
                return Err(OpenError::KeyGrant {
                    id: *id,
                    reason: format!("worker {worker} asking for the key for start {start}: {e}"),
                });
            }
        };
        let bad = |why: String| OpenError::KeyGrant {
            id: *id,
            reason: format!("the control service's grant for start {start}: {why}"),
        };
        if grant.manifest != id.to_string() {
            return Err(bad(format!("it names manifest {:?}", grant.manifest)));
        }
        let key = parse_data_key(&grant.data_key).map_err(bad)?;
        self.granted.fetch_add(1, Ordering::Relaxed);
        Ok(key)
    }

    /// A [`KeySource`] granting keys for `start`.
    pub fn for_start(&self, start: &str) -> StartKeys<'_> {
        StartKeys {
            grants: self,
            start: start.to_string(),
        }
    }

    /// The metrics in Prometheus text.
    pub fn prometheus(&self) -> String {
        format!(
            "# HELP lode_agent_key_grants_total Image keys the control service granted this worker.\n\
             # TYPE lode_agent_key_grants_total counter\n\
             lode_agent_key_grants_total {}\n\
             # HELP lode_agent_key_refusals_total Image keys the control service refused this worker.\n\
             # TYPE lode_agent_key_refusals_total counter\n\
             lode_agent_key_refusals_total {}\n",
            self.granted(),
            self.refused()
        )
    }
}

/// The data keys of one start, as grants.
#[derive(Debug)]
pub struct StartKeys<'a> {
    grants: &'a Grants,
    start: String,
}

#[async_trait::async_trait]
impl KeySource for StartKeys<'_> {
    async fn data_key(
        &self,
        id: &ManifestId,
        _root: RootId,
        _manifest: &Manifest,
    ) -> Result<DataKey, OpenError> {
        self.grants.key(id, &self.start).await
    }
}

/// Heartbeats every [`HEARTBEAT_INTERVAL`] until the task is aborted, registering
/// first unless `registered`; a failed registration is retried at the next beat, and a heartbeat the control
/// service refuses (it lost this worker, say) registers again. Failures are logged, one
/// line per change of state.
pub fn spawn_heartbeats(
    agent: Arc<Agent>,
    grants: Arc<Grants>,
    registered: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut registered = registered;
        let mut last_error: Option<String> = None;
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = if registered {
                let (attached, warm) = agent.heartbeat_lists().await;
                match grants.heartbeat(attached, warm).await {
                    Ok(_) => Ok(()),
                    Err(e @ CallError::Refused { .. }) => {
                        registered = false;
                        Err(format!("heartbeat: {e}; registering again"))
                    }
                    Err(e) => Err(format!("heartbeat: {e}")),
                }
            } else {
                match grants.register().await {
                    Ok(()) => {
                        registered = true;
                        eprintln!(
                            "lode agent: registered as worker {} at {} with the control service",
                            grants.config.worker, grants.config.address
                        );
                        Ok(())
                    }
                    Err(e) => Err(format!("registering: {e}")),
                }
            };
            match result {
                Ok(()) => last_error = None,
                Err(e) => {
                    if last_error.as_deref() != Some(&e) {
                        eprintln!("lode agent: control service: {e}");
                    }
                    last_error = Some(e);
                }
            }
        }
    })
}

/// An order from a control replica: `POST /v1/attach` with an [`AttachOrder`] body.
/// Answers the status and the JSON body; only [`Role::Control`] callers are obeyed.
pub async fn order(agent: &Agent, peer: &Identity, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let error = |status: u16, msg: String| {
        let body = serde_json::to_vec(&lode_control::api::ErrorReply { error: msg })
            .expect("JSON serialises");
        (status, body)
    };
    if peer.role != Role::Control {
        return error(
            403,
            format!(
                "{:?} {:?} may not send orders to a worker: only a control service may",
                peer.role, peer.id
            ),
        );
    }
    if path != "/v1/attach" {
        return error(404, format!("no such endpoint {path} (only /v1/attach)"));
    }
    let order: AttachOrder = match serde_json::from_slice(body) {
        Ok(o) => o,
        Err(e) => return error(400, format!("attach order from {}: {e}", peer.id)),
    };
    match agent.attach_order(&order).await {
        Ok(reply) => (200, serde_json::to_vec(&reply).expect("JSON serialises")),
        Err(e) => {
            let status = match &e {
                AgentError::Request(_) => 400,
                AgentError::Conflict(_) => 409,
                AgentError::Image { .. } => 502,
                _ => 500,
            };
            error(status, format!("attach order from {}: {e}", peer.id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_worker_id("worker-1.a_b").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65), "é"] {
            let e = check_worker_id(bad).unwrap_err().to_string();
            assert!(e.contains("worker id") && e.contains("invalid"), "{e}");
        }
        assert!(check_start("0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
        ] {
            let e = check_start(bad).unwrap_err().to_string();
            assert!(e.contains("start id") && e.contains("malformed"), "{e}");
        }
    }

    #[test]
    fn data_keys_parse() {
        let k = parse_data_key(&"ab".repeat(32)).unwrap();
        assert_eq!(k.expose(), &[0xab; 32]);
        assert!(parse_data_key("ab").unwrap_err().contains("2 characters"));
        assert!(
            parse_data_key(&"zz".repeat(32))
                .unwrap_err()
                .contains("64 hex digits")
        );
    }

    proptest! {
        #[test]
        fn data_key_parser_never_panics(s in ".{0,80}") {
            if let Ok(k) = parse_data_key(&s) {
                prop_assert_eq!(hex::encode(k.expose()), s.to_ascii_lowercase());
            }
        }

        #[test]
        fn data_keys_round_trip(bytes in proptest::array::uniform32(any::<u8>())) {
            let k = parse_data_key(&hex::encode(bytes)).unwrap();
            prop_assert_eq!(k.expose(), &bytes);
        }

        #[test]
        fn start_and_worker_checks_never_panic(s in "\\PC{0,80}") {
            let _ = check_start(&s);
            let _ = check_worker_id(&s);
        }
    }
}
