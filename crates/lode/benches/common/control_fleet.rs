//! A control plane on this host, built from real `lode` processes, for benchmarks: a
//! local directory store holding a few imported images, a CA (`lode control init|issue`),
//! one `lode control serve` on 127.0.0.1 with mutual TLS and the only keyring, worker
//! agents (`lode agent --control-endpoint …`, no keyring and no KMS environment), and a
//! plain agent holding the keyring for direct attaches. [`ServiceOnly`] is the same
//! service over its own store with workers that answer attach orders without attaching.
//!
//! The including crate declares `harness` (tests/common/harness.rs) at its root beside
//! this module. Every process is killed, and every FUSE mount cleared, on drop.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use lode_control::api::{
    AttachOrder, AttachReply, Heartbeat, Identity, KeyGrant, KeyRequest, Register, Release, Role,
    StartReply, StartRequest,
};
use lode_control::pki::Credentials;
use lode_control::rpc::{self, Client, Endpoint, Handler, Listener, Reply};
use lode_control::state::WorkerRecord;

use crate::harness::{AgentProc, ChildGuard, Home, random_image};

/// How long a process may take to come up.
const STARTUP: Duration = Duration::from_secs(30);
/// The admin identity the fleet's clients call as.
pub const ADMIN: &str = "bench";

/// What to build.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many images to import.
    pub images: usize,
    /// Each image's size in 512 KiB chunks (random bytes: nothing deduplicates).
    pub chunks: usize,
    /// How many worker agents.
    pub workers: usize,
    /// Each worker's capacity (images attached at once).
    pub capacity: u32,
}

/// An imported image.
#[derive(Clone, Debug)]
pub struct Image {
    /// Its tag.
    pub tag: String,
    /// Its manifest id.
    pub manifest: String,
}

/// A running `lode control serve`.
pub struct Service {
    _child: ChildGuard,
    /// Where it listens (`https://127.0.0.1:PORT`).
    pub endpoint: Endpoint,
    /// Its stderr: one line per registration, start, grant and release.
    pub log: PathBuf,
}

/// A worker agent under the control service.
pub struct Worker {
    /// Its id (its certificate's).
    pub id: String,
    /// Its state directory (control socket, caches, FUSE mount).
    pub state: PathBuf,
    /// Where it takes attach orders.
    pub orders: String,
    /// Its stderr.
    pub log: PathBuf,
    _proc: AgentProc,
}

impl Worker {
    /// Its Unix control API.
    pub fn control_socket(&self) -> PathBuf {
        self.state.join("control.sock")
    }
}

/// A plain agent with the keyring: attaches directly, no control service.
pub struct DirectAgent {
    /// Its state directory.
    pub state: PathBuf,
    _proc: AgentProc,
}

impl DirectAgent {
    /// Its Unix control API.
    pub fn control_socket(&self) -> PathBuf {
        self.state.join("control.sock")
    }
}

/// The whole fleet.
pub struct ControlFleet {
    /// The service (fields drop in order: the processes go before their directories).
    pub service: Service,
    /// The worker agents.
    pub workers: Vec<Worker>,
    /// The plain agent.
    pub direct: DirectAgent,
    /// The scratch directory everything lives in (removed on drop, last).
    pub home: Home,
    /// The CA directory (`ca.key` stays here, with the control service).
    pub pki: PathBuf,
    /// The keyring, read only by `lode control serve`, `lode import` and the direct agent.
    pub keyring: PathBuf,
    /// The store.
    pub store: PathBuf,
    /// The images, in import order.
    pub images: Vec<Image>,
    /// The raw bytes' files the images were imported from.
    raws: Vec<PathBuf>,
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// Runs `lode ARGS` in `h`'s home and returns its stdout; fails naming the command.
fn lode(h: &Home, args: &[&str]) -> Result<String> {
    let out = h
        .cmd(args)
        .output()
        .with_context(|| format!("running lode {args:?}"))?;
    if !out.status.success() {
        bail!(
            "lode {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Imports each raw file into `store` as `img-<i>` with `keyring`; the images.
fn import(h: &Home, raws: &[PathBuf], store: &Path, keyring: &Path) -> Result<Vec<Image>> {
    let mut images = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        let tag = format!("img-{i}:1");
        let out = lode(
            h,
            &[
                "--json",
                "import",
                path_str(raw)?,
                "--tag",
                &tag,
                "--store",
                path_str(store)?,
                "--kms",
                path_str(keyring)?,
            ],
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("lode import printed {out:?}"))?;
        let manifest = v["id"]
            .as_str()
            .ok_or_else(|| anyhow!("lode import printed no id: {out}"))?
            .to_owned();
        images.push(Image { tag, manifest });
    }
    Ok(images)
}

/// Polls `done` every 20 ms until it answers, failing after `limit` with `what`.
fn poll<T>(what: &str, limit: Duration, mut done: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = done()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("waited {limit:?} for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `lode control serve` over `store` with `keyring` and waits for its address.
fn serve(h: &Home, pki: &Path, store: &Path, keyring: &Path, name: &str) -> Result<Service> {
    let out = h.path(&format!("control-{name}.out"));
    let log = h.path(&format!("control-{name}.err"));
    let child = h
        .cmd(&[
            "control",
            "serve",
            "--creds",
            path_str(pki)?,
            "--listen",
            "127.0.0.1:0",
            "--store",
            path_str(store)?,
            "--kms",
            path_str(keyring)?,
        ])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out)?)
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("spawning lode control serve")?;
    let mut child = ChildGuard(child);
    let at = poll("lode control serve to listen", STARTUP, || {
        let text = fs::read_to_string(&out).unwrap_or_default();
        if let Some(rest) = text.split("lode control: listening on ").nth(1)
            && let Some(line) = rest.split('\n').next()
            && text.contains('\n')
        {
            return Ok(Some(line.trim().to_owned()));
        }
        if let Some(st) = child.0.try_wait()? {
            bail!(
                "lode control serve exited ({st}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(None)
    })?;
    Ok(Service {
        _child: child,
        endpoint: at.parse()?,
        log,
    })
}

/// A credentials directory holding only what worker `id` needs: the CA certificate and
/// its own certificate and key.
fn worker_credentials(h: &Home, pki: &Path, id: &str) -> Result<PathBuf> {
    let dir = h.path(&format!("creds-{id}"));
    fs::create_dir_all(&dir)?;
    for f in [
        "ca.pem".to_owned(),
        format!("worker-{id}.pem"),
        format!("worker-{id}.key"),
    ] {
        fs::copy(pki.join(&f), dir.join(&f)).with_context(|| format!("copying {f}"))?;
    }
    Ok(dir)
}

/// Starts a worker agent: an empty environment but `PATH` and its own `$LODE_HOME`, so it
/// has no keyring and no KMS setting to fall back on.
fn start_worker(
    h: &Home,
    pki: &Path,
    control: &Endpoint,
    store: &Path,
    id: &str,
    capacity: u32,
) -> Result<Worker> {
    let home = h.path(&format!("home-{id}"));
    let state = h.path(&format!("state-{id}"));
    let creds = worker_credentials(h, pki, id)?;
    let out = h.path(&format!("{id}.out"));
    let log = h.path(&format!("{id}.err"));
    let child = Command::new(env!("CARGO_BIN_EXE_lode"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LODE_HOME", &home)
        .args(["agent", "--state-dir", path_str(&state)?])
        .args(["--store", path_str(store)?])
        .args(["--control-endpoint", &control.to_string()])
        .args(["--credentials", path_str(&creds)?])
        .args(["--worker-id", id, "--orders-listen", "127.0.0.1:0"])
        .args(["--capacity", &capacity.to_string()])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out)?)
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("spawning a worker agent")?;
    let mut proc = AgentProc {
        child,
        files: Some(state.join("files")),
    };
    let orders = poll(&format!("worker {id} to take orders"), STARTUP, || {
        let text = fs::read_to_string(&out).unwrap_or_default();
        if let Some(rest) = text.split("taking orders on ").nth(1)
            && let Some(addr) = rest.split(' ').next()
        {
            return Ok(Some(addr.to_owned()));
        }
        if let Some(st) = proc.child.try_wait()? {
            bail!(
                "worker {id} exited ({st}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(None)
    })?;
    Ok(Worker {
        id: id.to_owned(),
        state,
        orders,
        log,
        _proc: proc,
    })
}

/// Starts the plain agent with the keyring and waits until its control API answers.
fn start_direct(h: &Home, store: &Path, keyring: &Path) -> Result<DirectAgent> {
    let state = h.path("state-direct");
    let log = h.path("direct.err");
    let child = h
        .cmd(&[
            "agent",
            "--state-dir",
            path_str(&state)?,
            "--store",
            path_str(store)?,
            "--kms",
            path_str(keyring)?,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("spawning the plain agent")?;
    let mut proc = AgentProc {
        child,
        files: Some(state.join("files")),
    };
    let socket = state.join("control.sock");
    poll("the plain agent's control API", STARTUP, || {
        if lode_agent::control::request(&socket, "GET", "/ls", None).is_ok() {
            return Ok(Some(()));
        }
        if let Some(st) = proc.child.try_wait()? {
            bail!(
                "the plain agent exited ({st}): {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(None)
    })?;
    Ok(DirectAgent { state, _proc: proc })
}

/// `lode control init` and a certificate for each worker and for the admin.
fn init_pki(h: &Home, workers: &[String]) -> Result<PathBuf> {
    let pki = h.path("pki");
    let dir = path_str(&pki)?.to_owned();
    lode(
        h,
        &["control", "init", "--dir", &dir, "--host", "127.0.0.1"],
    )?;
    for w in workers {
        lode(
            h,
            &[
                "control",
                "issue",
                "--dir",
                &dir,
                "--worker",
                w,
                "--host",
                "127.0.0.1",
            ],
        )?;
    }
    lode(h, &["control", "issue", "--dir", &dir, "--admin", ADMIN])?;
    Ok(pki)
}

/// A client of `endpoint` calling as the admin.
pub fn admin_client(pki: &Path, endpoint: &Endpoint) -> Result<Client> {
    let who = Identity {
        role: Role::Admin,
        id: ADMIN.to_owned(),
    };
    let creds = Arc::new(Credentials::load(pki, &who)?);
    Ok(Client::new(endpoint.clone(), creds)?)
}

/// Waits until the service lists every worker in `ids` as registered.
pub async fn wait_registered(admin: &Client, ids: &[String]) -> Result<()> {
    let deadline = Instant::now() + STARTUP;
    loop {
        let workers: Vec<WorkerRecord> = admin.call("/v1/workers", &()).await?;
        if ids.iter().all(|id| workers.iter().any(|w| &w.worker == id)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("waited {STARTUP:?} for workers {ids:?} to register");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks `admin`'s service to start `image`; the reply once the worker has attached it.
pub async fn start(admin: &Client, image: &str) -> Result<StartReply> {
    admin
        .call(
            "/v1/start",
            &StartRequest {
                image: image.to_owned(),
            },
        )
        .await
        .with_context(|| format!("starting {image}"))
}

/// The error for a start placed on a worker this fleet did not start.
fn unknown_worker(reply: &StartReply) -> anyhow::Error {
    anyhow!(
        "start {} went to unknown worker {}",
        reply.start,
        reply.worker
    )
}

/// `POST path` with `body` on an agent's control socket; fails with the agent's message.
fn agent_call(socket: &Path, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
    Ok(lode_agent::control::request(socket, "POST", path, Some(body))?.json()?)
}

impl ControlFleet {
    /// Builds the fleet: images, CA, service, workers `worker-0…`, the plain agent; returns
    /// once every worker has registered (polled on `rt`).
    pub fn new(o: &Options, rt: &tokio::runtime::Runtime) -> Result<ControlFleet> {
        let home = Home::new();
        let store = home.path("store");
        let keyring = home.path("keyring.json");
        let raws = (0..o.images)
            .map(|i| {
                let raw = home.path(&format!("img-{i}.raw"));
                fs::write(&raw, random_image(o.chunks, 1000 + i as u64))?;
                Ok(raw)
            })
            .collect::<Result<Vec<_>>>()?;
        let images = import(&home, &raws, &store, &keyring)?;
        let ids: Vec<String> = (0..o.workers).map(|i| format!("worker-{i}")).collect();
        let pki = init_pki(&home, &ids)?;
        let service = serve(&home, &pki, &store, &keyring, "main")?;
        let workers = ids
            .iter()
            .map(|id| start_worker(&home, &pki, &service.endpoint, &store, id, o.capacity))
            .collect::<Result<Vec<_>>>()?;
        let direct = start_direct(&home, &store, &keyring)?;
        let admin = admin_client(&pki, &service.endpoint)?;
        rt.block_on(wait_registered(&admin, &ids))?;
        Ok(ControlFleet {
            home,
            pki,
            keyring,
            store,
            images,
            raws,
            service,
            workers,
            direct,
        })
    }

    /// An admin client of the service.
    pub fn admin(&self) -> Result<Client> {
        admin_client(&self.pki, &self.service.endpoint)
    }

    /// The worker ids.
    pub fn worker_ids(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.id.clone()).collect()
    }

    /// Detaches what `reply` started, on its worker (which releases the assignment).
    pub fn detach_start(&self, reply: &StartReply) -> Result<()> {
        let worker = self
            .workers
            .iter()
            .find(|w| w.id == reply.worker)
            .ok_or_else(|| unknown_worker(reply))?;
        agent_call(
            &worker.control_socket(),
            "/detach",
            &serde_json::json!({ "name": reply.name }),
        )
        .with_context(|| format!("detaching {} on {}", reply.name, reply.worker))?;
        Ok(())
    }

    /// Attaches `image` as `name` on the plain agent.
    pub fn attach_direct(&self, image: &str, name: &str) -> Result<()> {
        agent_call(
            &self.direct.control_socket(),
            "/attach",
            &serde_json::json!({ "image": image, "name": name }),
        )
        .with_context(|| format!("attaching {image} as {name} on the plain agent"))?;
        Ok(())
    }

    /// Detaches `name` on the plain agent.
    pub fn detach_direct(&self, name: &str) -> Result<()> {
        agent_call(
            &self.direct.control_socket(),
            "/detach",
            &serde_json::json!({ "name": name }),
        )
        .with_context(|| format!("detaching {name} on the plain agent"))?;
        Ok(())
    }

    /// A second service over its own store (the same images, imported again with the same
    /// keyring) whose `workers` answer attach orders without attaching; they run on `rt`.
    pub fn service_only(
        &self,
        rt: &tokio::runtime::Runtime,
        workers: usize,
    ) -> Result<ServiceOnly> {
        let store = self.home.path("store-service-only");
        let images = import(&self.home, &self.raws, &store, &self.keyring)?;
        let ids: Vec<String> = (0..workers).map(|i| format!("ack-{i}")).collect();
        for id in &ids {
            lode(
                &self.home,
                &[
                    "control",
                    "issue",
                    "--dir",
                    path_str(&self.pki)?,
                    "--worker",
                    id,
                    "--host",
                    "127.0.0.1",
                ],
            )?;
        }
        let service = serve(&self.home, &self.pki, &store, &self.keyring, "service-only")?;
        let admin = admin_client(&self.pki, &service.endpoint)?;
        let acks = rt.block_on(async {
            let mut acks = Vec::new();
            for id in &ids {
                acks.push(AckWorker::start(&self.pki, id, &service.endpoint).await?);
            }
            wait_registered(&admin, &ids).await?;
            anyhow::Ok(acks)
        })?;
        Ok(ServiceOnly {
            service,
            workers: acks,
            admin,
            images,
        })
    }
}

/// A worker played in this process: it registers, heartbeats every 2 s (as a worker
/// agent does) the manifests it was ordered to as warm, and answers every attach order at
/// once without attaching — after asking for the start's key when `ask_key` is set.
pub struct AckWorker {
    /// Its id.
    pub id: String,
    /// Its client of the service.
    pub client: Client,
    handler: Arc<AckHandler>,
    server: tokio::task::JoinHandle<()>,
    beats: tokio::task::JoinHandle<()>,
}

impl Drop for AckWorker {
    fn drop(&mut self) {
        self.server.abort();
        self.beats.abort();
    }
}

struct AckHandler {
    id: String,
    client: Client,
    ask_key: AtomicBool,
    warm: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Handler for AckHandler {
    async fn handle(&self, peer: Identity, path: &str, body: Bytes) -> Reply {
        if path != "/v1/attach" || peer.role != Role::Control {
            return Reply::error(403, format!("{path} from {peer:?}: only attach orders"));
        }
        let order: AttachOrder = match serde_json::from_slice(&body) {
            Ok(o) => o,
            Err(e) => return Reply::error(400, format!("attach order: {e}")),
        };
        if self.ask_key.load(Ordering::Relaxed) {
            let asked: Result<KeyGrant, _> = self
                .client
                .call(
                    "/v1/keys",
                    &KeyRequest {
                        worker: self.id.clone(),
                        manifest: order.manifest.clone(),
                        start: order.start.clone(),
                    },
                )
                .await;
            if let Err(e) = asked {
                return Reply::error(502, e.to_string());
            }
        }
        if let Ok(mut warm) = self.warm.lock()
            && !warm.contains(&order.manifest)
        {
            warm.insert(0, order.manifest.clone());
        }
        Reply::json(&AttachReply {
            name: order.name,
            nbd_export: None,
            file: None,
        })
    }
}

impl AckWorker {
    async fn start(pki: &Path, id: &str, control: &Endpoint) -> Result<AckWorker> {
        let who = Identity {
            role: Role::Worker,
            id: id.to_owned(),
        };
        let creds = Arc::new(Credentials::load(pki, &who)?);
        let listener = Listener::tls("127.0.0.1:0", creds.clone()).await?;
        let address = listener
            .local_addr()
            .ok_or_else(|| anyhow!("no address"))?
            .to_string();
        let client = Client::new(control.clone(), creds)?;
        let handler = Arc::new(AckHandler {
            id: id.to_owned(),
            client: client.clone(),
            ask_key: AtomicBool::new(false),
            warm: Mutex::new(Vec::new()),
        });
        let server = rpc::serve(listener, handler.clone());
        let _: serde_json::Value = client
            .call(
                "/v1/workers/register",
                &Register {
                    worker: id.to_owned(),
                    address,
                    capacity: 1024,
                },
            )
            .await?;
        let beats = {
            let (client, handler) = (client.clone(), handler.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lode_agent::worker::HEARTBEAT_INTERVAL).await;
                    let warm = handler.warm.lock().map(|w| w.clone()).unwrap_or_default();
                    let beat = Heartbeat {
                        worker: handler.id.clone(),
                        attached: Vec::new(),
                        warm,
                    };
                    if let Err(e) = client
                        .call::<_, serde_json::Value>("/v1/workers/heartbeat", &beat)
                        .await
                    {
                        eprintln!("control_start: heartbeat of {}: {e}", handler.id);
                    }
                }
            })
        };
        Ok(AckWorker {
            id: id.to_owned(),
            client,
            handler,
            server,
            beats,
        })
    }
}

/// A service whose workers only acknowledge orders.
pub struct ServiceOnly {
    /// The service (its own store).
    pub service: Service,
    /// The workers.
    pub workers: Vec<AckWorker>,
    /// An admin client of it.
    pub admin: Client,
    /// The images in its store.
    pub images: Vec<Image>,
}

impl ServiceOnly {
    /// Whether the workers ask for each start's key before acknowledging its order.
    pub fn ask_keys(&self, ask: bool) {
        for w in &self.workers {
            w.handler.ask_key.store(ask, Ordering::Relaxed);
        }
    }

    /// Releases what `reply` started, as its worker does when it detaches.
    pub async fn release(&self, reply: &StartReply) -> Result<()> {
        let worker = self
            .workers
            .iter()
            .find(|w| w.id == reply.worker)
            .ok_or_else(|| unknown_worker(reply))?;
        let _: serde_json::Value = worker
            .client
            .call(
                "/v1/release",
                &Release {
                    worker: worker.id.clone(),
                    manifest: reply.manifest.clone(),
                    start: reply.start.clone(),
                },
            )
            .await?;
        Ok(())
    }
}
