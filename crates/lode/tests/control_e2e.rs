//! The control plane end to end, with real processes: two `lode agent` workers on
//! 127.0.0.1 with certificates from the control plane's PKI, a local directory store, and
//! a keyring that only the control side holds. The agents get no keyring and no KMS
//! environment; every image key they use arrives as a grant over mTLS.
//!
//! The control side here is the control plane's own mTLS server (`rpc::serve`) with a
//! small assignment table: it registers workers, records their heartbeats, places a start
//! on a worker that has the image warm (else the least loaded), sends the attach order,
//! and grants a manifest's key only to the worker it is assigned to while the lease lasts.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lode_control::api::{
    AttachOrder, AttachReply, ErrorReply, Heartbeat, HeartbeatReply, Identity, KeyGrant,
    KeyRequest, Register, Release, Role,
};
use lode_control::rpc::{Client, Endpoint, Handler, Listener, Reply};
use lode_control::{pki, rpc};
use serde_json::Value;

#[path = "common/harness.rs"]
mod harness;
use harness::*;

fn now_ms() -> u64 {
    lode_agent::worker::unix_now_ms()
}

#[derive(Clone, Debug)]
struct Assignment {
    worker: String,
    manifest: String,
    lease: u64,
}

#[derive(Default)]
struct State {
    /// Worker id → the address it registered.
    workers: BTreeMap<String, String>,
    /// Worker id → its last heartbeat.
    beats: BTreeMap<String, Heartbeat>,
    /// Start id → assignment.
    starts: BTreeMap<String, Assignment>,
    released: Vec<String>,
}

/// The control side: the assignment table and the keyring.
struct Control {
    kms: Arc<dyn lode_kms::Kms>,
    store: lode_store::Store,
    state: Mutex<State>,
}

impl Control {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    async fn grant(&self, peer: &Identity, req: KeyRequest) -> Reply {
        let refuse = |why: String| {
            Reply::error(
                403,
                format!(
                    "worker {} may not have the key of manifest {}: {why}",
                    peer.id, req.manifest
                ),
            )
        };
        let Some(a) = self.state().starts.get(&req.start).cloned() else {
            return refuse(format!("start {} is not assigned", req.start));
        };
        if a.worker != peer.id || a.manifest != req.manifest {
            return refuse(format!(
                "start {} is manifest {} on worker {}",
                req.start, a.manifest, a.worker
            ));
        }
        if a.lease <= now_ms() {
            return refuse(format!("the lease of start {} has expired", req.start));
        }
        let id: lode_format::ManifestId = req.manifest.parse().expect("a manifest id");
        let (root, bytes) = self.store.find_manifest(&id).await.expect("manifest");
        let manifest = lode_format::Manifest::parse(&bytes).expect("parse");
        let key = lode_image::unwrap_data_key(self.kms.as_ref(), &id, root, &manifest)
            .await
            .expect("unwrap");
        Reply::json(&KeyGrant {
            manifest: req.manifest,
            data_key: hex::encode(key.expose()),
            lease_expires_unix_ms: a.lease,
        })
    }
}

#[async_trait::async_trait]
impl Handler for Control {
    async fn handle(&self, peer: Identity, path: &str, body: bytes::Bytes) -> Reply {
        if peer.role != Role::Worker {
            return Reply::error(403, format!("{} is not a worker", peer.id));
        }
        let worker_is_caller = |w: &str| w == peer.id;
        match path {
            "/v1/workers/register" => {
                let r: Register = serde_json::from_slice(&body).expect("register");
                assert!(worker_is_caller(&r.worker));
                self.state().workers.insert(r.worker, r.address);
                Reply::json(&serde_json::json!({}))
            }
            "/v1/workers/heartbeat" => {
                let h: Heartbeat = serde_json::from_slice(&body).expect("heartbeat");
                assert!(worker_is_caller(&h.worker));
                if !self.state().workers.contains_key(&h.worker) {
                    return Reply::error(404, format!("worker {} is not registered", h.worker));
                }
                self.state().beats.insert(h.worker.clone(), h);
                Reply::json(&HeartbeatReply {
                    renewed: Vec::new(),
                    lease_expires_unix_ms: 0,
                })
            }
            "/v1/keys" => {
                let k: KeyRequest = serde_json::from_slice(&body).expect("key request");
                assert!(worker_is_caller(&k.worker));
                self.grant(&peer, k).await
            }
            "/v1/release" => {
                let r: Release = serde_json::from_slice(&body).expect("release");
                assert!(worker_is_caller(&r.worker));
                let mut s = self.state();
                s.starts.remove(&r.start);
                s.released.push(r.start);
                Reply::json(&serde_json::json!({}))
            }
            _ => Reply::error(404, format!("no route {path}")),
        }
    }
}

/// A worker agent process and where it lives.
struct Worker {
    id: String,
    state: PathBuf,
    home: PathBuf,
    proc: AgentProc,
    orders: String,
    out: PathBuf,
    err: PathBuf,
}

impl Worker {
    fn control(&self) -> String {
        self.state.join("control.sock").display().to_string()
    }
}

struct Fleet {
    h: Home,
    rt: tokio::runtime::Runtime,
    pki: PathBuf,
    control: Arc<Control>,
    control_url: String,
    orders_as_control: Arc<pki::Credentials>,
    _server: tokio::task::JoinHandle<()>,
}

impl Fleet {
    fn new() -> Fleet {
        let h = Home::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let pki_dir = h.path("pki");
        let hosts = vec!["127.0.0.1".to_string()];
        pki::init(&pki_dir, &hosts, 1).expect("pki init");
        for w in ["worker-a", "worker-b"] {
            let who = Identity {
                role: Role::Worker,
                id: w.into(),
            };
            pki::issue(&pki_dir, &who, &hosts, 1).expect("issue");
        }
        let creds = Arc::new(
            pki::Credentials::load(&pki_dir, &pki::control_identity()).expect("control creds"),
        );
        // The keyring exists only here, made by the import below.
        let keyring = h.path("control-keyring.json");
        let store = h.home().join("store");
        let kms: Arc<dyn lode_kms::Kms> =
            Arc::from(lode_kms::open(keyring.to_str().expect("path")).expect("keyring"));
        let control = Arc::new(Control {
            kms,
            store: lode_store::Store::open(store.to_str().expect("path")).expect("store"),
            state: Mutex::new(State::default()),
        });
        let (server, addr) = rt.block_on(async {
            let l = Listener::tls("127.0.0.1:0", creds.clone())
                .await
                .expect("control listener");
            let addr = l.local_addr().expect("addr");
            (rpc::serve(l, control.clone() as Arc<dyn Handler>), addr)
        });
        Fleet {
            h,
            rt,
            pki: pki_dir,
            control,
            control_url: format!("https://{addr}"),
            orders_as_control: creds,
            _server: server,
        }
    }

    fn keyring(&self) -> String {
        self.h.path("control-keyring.json").display().to_string()
    }

    fn store(&self) -> String {
        self.h.home().join("store").display().to_string()
    }

    /// `img` imported as `tag` with the control side's keyring; its manifest id.
    fn import(&self, tag: &str, img: &[u8]) -> String {
        let raw = self.h.path(&format!("{tag}.raw").replace(':', "_"));
        fs::write(&raw, img).expect("write image");
        let v = self.h.json(&[
            "import",
            raw.to_str().expect("path"),
            "--tag",
            tag,
            "--kms",
            &self.keyring(),
        ]);
        v["id"].as_str().expect("id").to_string()
    }

    /// A credentials directory holding only what worker `id` needs: the CA certificate
    /// and its own certificate and key.
    fn worker_credentials(&self, id: &str) -> PathBuf {
        let dir = self.h.path(&format!("creds-{id}"));
        fs::create_dir_all(&dir).expect("creds dir");
        for f in [
            "ca.pem".to_string(),
            format!("worker-{id}.pem"),
            format!("worker-{id}.key"),
        ] {
            fs::copy(self.pki.join(&f), dir.join(&f)).expect("copy credentials");
        }
        dir
    }

    /// The `lode agent` command of worker `id`: its own empty `$LODE_HOME`, no KMS or
    /// cloud credentials in its environment.
    fn agent_cmd(&self, id: &str, extra: &[&str]) -> (Command, PathBuf, PathBuf) {
        let home = self.h.path(&format!("home-{id}"));
        let state = self.h.path(&format!("state-{id}"));
        let creds = self.worker_credentials(id);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lode"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LODE_HOME", &home)
            .args(["agent", "--state-dir"])
            .arg(&state)
            .args(["--store", &self.store()])
            .args(["--control-endpoint", &self.control_url])
            .arg("--credentials")
            .arg(&creds)
            .args(["--worker-id", id, "--orders-listen", "127.0.0.1:0"])
            .args(["--cache-memory", "1048576"])
            .args(extra);
        (cmd, home, state)
    }

    /// Starts worker `id` and waits until it says where it takes orders and has
    /// registered.
    fn start_worker(&self, id: &str) -> Worker {
        let (mut cmd, home, state) = self.agent_cmd(id, &[]);
        let out = self.h.path(&format!("{id}.out"));
        let err = self.h.path(&format!("{id}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("log"))
            .stderr(fs::File::create(&err).expect("log"))
            .spawn()
            .expect("spawn lode agent");
        let mut proc = AgentProc {
            child,
            files: Some(state.join("files")),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let orders = loop {
            let text = fs::read_to_string(&out).unwrap_or_default();
            if let Some(rest) = text.split("taking orders on ").nth(1) {
                break rest.split(' ').next().expect("address").to_string();
            }
            if let Some(st) = proc.child.try_wait().expect("wait") {
                panic!(
                    "lode agent {id} exited ({st:?}):\n{}",
                    fs::read_to_string(&err).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent {id} did not start in 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.wait_for(&format!("worker {id} to register"), || {
            self.control.state().workers.get(id) == Some(&orders)
        });
        Worker {
            id: id.into(),
            state,
            home,
            proc,
            orders,
            out,
            err,
        }
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "waited 20 s for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `order` to `worker` as the control service (or as `as_whom`).
    fn send(
        &self,
        worker: &Worker,
        order: &AttachOrder,
        as_whom: Option<Arc<pki::Credentials>>,
    ) -> Result<AttachReply, (u16, String)> {
        let creds = as_whom.unwrap_or_else(|| self.orders_as_control.clone());
        let endpoint: Endpoint = format!("https://{}", worker.orders).parse().expect("url");
        let client = Client::new(endpoint, creds).expect("client");
        let body = serde_json::to_vec(order).expect("JSON");
        let (status, reply) = self
            .rt
            .block_on(client.exchange("/v1/attach", body))
            .expect("the order reached the worker");
        if status == 200 {
            Ok(serde_json::from_slice(&reply).expect("AttachReply"))
        } else {
            let e: ErrorReply = serde_json::from_slice(&reply).expect("ErrorReply");
            Err((status, e.error))
        }
    }

    /// Places a start of `manifest`: on a worker whose last heartbeat lists it warm,
    /// else on the one with the fewest starts; records the assignment and builds the
    /// order (not sent).
    fn place(&self, manifest: &str, workers: &[&Worker], lease_ms: u64) -> (usize, AttachOrder) {
        let s = self.control.state();
        let warm = workers.iter().position(|w| {
            s.beats
                .get(&w.id)
                .is_some_and(|b| b.warm.iter().any(|m| m == manifest))
        });
        let load = |w: &Worker| s.starts.values().filter(|a| a.worker == w.id).count();
        let i = warm.unwrap_or_else(|| {
            (0..workers.len())
                .min_by_key(|&i| load(workers[i]))
                .expect("a worker")
        });
        drop(s);
        let start = format!("{:032x}", rand_u128());
        let lease = now_ms() + lease_ms;
        self.control.state().starts.insert(
            start.clone(),
            Assignment {
                worker: workers[i].id.clone(),
                manifest: manifest.into(),
                lease,
            },
        );
        let order = AttachOrder {
            name: format!("s-{}", &start[..8]),
            start,
            image: manifest.into(),
            manifest: manifest.into(),
            lease_expires_unix_ms: lease,
        };
        (i, order)
    }

    fn stats(&self, w: &Worker) -> Value {
        self.h.json(&["stats", "--control", &w.control()])
    }
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("random");
    u128::from_le_bytes(b)
}

/// The agent's environment: none of the variables that name a KMS or cloud credentials.
fn assert_no_kms_environment(w: &Worker) {
    let environ = fs::read(format!("/proc/{}/environ", w.proc.child.id())).expect("environ");
    for var in environ.split(|&b| b == 0) {
        let var = String::from_utf8_lossy(var);
        assert!(
            !(var.starts_with("LODE_KMS") || var.starts_with("AWS_")),
            "worker {} has {var} in its environment",
            w.id
        );
    }
    for dir in [&w.home, &w.state] {
        assert!(
            !dir.join("keyring.json").exists(),
            "worker {} has a keyring in {}",
            w.id,
            dir.display()
        );
    }
}

#[test]
fn starts_run_on_workers_that_hold_only_grants() {
    let fleet = Fleet::new();
    let app = harness::random_image(6, 11);
    let other = harness::random_image(3, 12);
    let m_app = fleet.import("app:1", &app);
    let m_other = fleet.import("other:1", &other);

    // A worker refuses a KMS of its own.
    let (mut cmd, _, _) = fleet.agent_cmd("worker-a", &["--kms", &fleet.keyring()]);
    let out = cmd.output().expect("run lode agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a worker ran with --kms");
    assert!(err.contains("holds no KMS or keyring"), "{err}");

    let a = fleet.start_worker("worker-a");
    let b = fleet.start_worker("worker-b");
    let workers = [&a, &b];

    // A start is placed (neither has it warm: the least loaded, A), attached, and reads
    // back through the FUSE file and the NBD export.
    let (i, first) = fleet.place(&m_app, &workers, 60_000);
    assert_eq!(i, 0);
    let reply = fleet.send(&a, &first, None).expect("first start attached");
    assert_eq!(reply.name, first.name);
    let file = PathBuf::from(reply.file.expect("a FUSE file"));
    assert!(
        fs::read(&file).expect("read the FUSE file") == app,
        "image differs"
    );
    if have_nbdcopy() {
        let out = fleet.h.path("nbd.out");
        let uri = format!(
            "nbd+unix:///{}?socket={}",
            reply.nbd_export.expect("export"),
            a.state.join("nbd.sock").display()
        );
        let st = Command::new("nbdcopy")
            .arg(&uri)
            .arg(&out)
            .status()
            .expect("nbdcopy");
        assert!(st.success(), "nbdcopy {uri}");
        assert!(fs::read(&out).expect("read") == app, "NBD export differs");
    }
    let ls = fleet.h.json(&["ls", "--control", &a.control()]);
    assert_eq!(ls[0]["start"], first.start.as_str(), "{ls}");
    assert_eq!(ls[0]["id"], m_app.as_str());

    // A's heartbeat lists the image attached and warm; the next start of it goes to A
    // though B has nothing.
    fleet.wait_for("A's heartbeat to list the image", || {
        fleet
            .control
            .state()
            .beats
            .get("worker-a")
            .is_some_and(|h| h.attached == vec![m_app.clone()] && h.warm.first() == Some(&m_app))
    });
    let (i, second) = fleet.place(&m_app, &workers, 60_000);
    assert_eq!(i, 0, "the warm worker");
    fleet
        .send(&a, &second, None)
        .expect("second start attached");

    // The same order again is refused, naming the start.
    let (status, e) = fleet.send(&a, &first, None).unwrap_err();
    assert_eq!(status, 409, "{e}");
    assert!(e.contains(&first.start) && e.contains("replayed"), "{e}");

    // Only a control service may order: a worker's certificate is refused.
    let as_b = Arc::new(
        pki::Credentials::load(
            &fleet.pki,
            &Identity {
                role: Role::Worker,
                id: "worker-b".into(),
            },
        )
        .expect("B's credentials"),
    );
    let (status, e) = fleet.send(&a, &second, Some(as_b)).unwrap_err();
    assert_eq!(status, 403, "{e}");

    // B given A's start asks for the key and is refused, naming B and the manifest.
    let stolen = AttachOrder {
        name: "stolen".into(),
        ..first.clone()
    };
    let (status, e) = fleet.send(&b, &stolen, None).unwrap_err();
    assert_eq!(status, 502, "{e}");
    assert!(
        e.contains("worker worker-b may not have the key of manifest") && e.contains(&m_app),
        "{e}"
    );
    let names = |w: &Worker| -> Vec<String> {
        fleet
            .h
            .json(&["ls", "--control", &w.control()])
            .as_array()
            .expect("array")
            .iter()
            .map(|a| a["name"].as_str().expect("name").to_string())
            .collect()
    };
    assert!(names(&b).is_empty(), "B attached what it has no key for");

    // An order whose lease already ended is refused by the worker itself.
    let (_, mut late) = fleet.place(&m_other, &workers, 60_000);
    late.lease_expires_unix_ms = now_ms() - 1;
    let (status, e) = fleet.send(&b, &late, None).unwrap_err();
    assert_eq!(status, 400, "{e}");
    assert!(e.contains("lease") && e.contains(&late.start), "{e}");

    // A start on B with a short lease: attached while it lasts; once it has ended a
    // restarted B asks again for the key with the start it kept, and is refused.
    let (i, short) = fleet.place(&m_other, &workers, 3_000);
    assert_eq!(i, 1, "B is the least loaded");
    let reply = fleet.send(&b, &short, None).expect("short start attached");
    assert!(
        fs::read(reply.file.expect("file")).expect("read") == other,
        "image differs"
    );
    let sb = fleet.stats(&b);
    assert_eq!(sb["key_grants"], 1, "{sb}");
    assert_eq!(sb["key_refusals"], 1, "{sb}");
    let metrics =
        lode_agent::control::request(&b.state.join("control.sock"), "GET", "/metrics", None)
            .expect("metrics");
    let text = String::from_utf8(metrics.body).expect("text");
    assert!(text.contains("\nlode_agent_key_grants_total 1\n"), "{text}");
    assert!(
        text.contains("\nlode_agent_key_refusals_total 1\n"),
        "{text}"
    );
    fleet.wait_for("the short lease to end", || {
        now_ms() > short.lease_expires_unix_ms
    });
    let b_id = b.id.clone();
    let dead = b.proc.kill_hard();
    let b = fleet.start_worker(&b_id);
    drop(dead);
    assert!(names(&b).is_empty(), "B re-attached after its lease ended");
    let err = fs::read_to_string(&b.err).unwrap_or_default();
    assert!(
        err.contains(&format!("could not re-attach {}", short.name))
            && err.contains("lease of start")
            && err.contains(&short.start),
        "{err}"
    );
    assert_eq!(fleet.stats(&b)["key_refusals"], 1);

    // Detaching tells the control service, which ends the assignment.
    fleet
        .h
        .ok(&["detach", &second.name, "--control", &a.control()]);
    assert!(fleet.control.state().released.contains(&second.start));
    assert!(!fleet.control.state().starts.contains_key(&second.start));
    // A restarted A asks again for the start it still has, and gets it.
    let a_id = a.id.clone();
    let dead = a.proc.kill_hard();
    let a = fleet.start_worker(&a_id);
    drop(dead);
    assert_eq!(names(&a), vec![first.name.clone()]);
    assert!(fs::read(&file).expect("read after restart") == app);
    let text = fs::read_to_string(&a.out).unwrap_or_default();
    assert!(text.contains("1 attachment(s) restored"), "{text}");

    for w in [&a, &b] {
        assert_no_kms_environment(w);
    }
}
