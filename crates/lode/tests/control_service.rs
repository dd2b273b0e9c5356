//! The assignment service through the real `lode` binary (`lode control serve`, `lode
//! start`), with workers played by this test: each has its own certificate, answers
//! attach orders over mutual TLS, and calls the service with the real rpc client.

#[path = "common/harness.rs"]
mod harness;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::{ChildGuard, Home, random_image};
use lode_control::api::{
    AttachOrder, AttachReply, Heartbeat, Identity, KeyGrant, KeyRequest, Register, Release, Role,
};
use lode_control::pki::Credentials;
use lode_control::rpc::{self, Client, Endpoint, Handler, Listener, Reply, RpcError};

/// A worker that records the attach orders it gets and answers them.
struct Orders(Mutex<Vec<AttachOrder>>);

#[async_trait::async_trait]
impl Handler for Orders {
    async fn handle(&self, peer: Identity, path: &str, body: Bytes) -> Reply {
        if path != "/v1/attach" || peer.role != Role::Control {
            return Reply::error(403, format!("{path} from {peer:?}"));
        }
        let order: AttachOrder = match serde_json::from_slice(&body) {
            Ok(o) => o,
            Err(e) => return Reply::error(400, e.to_string()),
        };
        let reply = AttachReply {
            name: order.name.clone(),
            nbd_export: Some(order.name.clone()),
            file: None,
        };
        self.0.lock().unwrap().push(order);
        Reply::json(&reply)
    }
}

struct Worker {
    id: String,
    client: Client,
    orders: Arc<Orders>,
    address: String,
    _server: tokio::task::JoinHandle<()>,
}

impl Worker {
    async fn new(creds_dir: &Path, id: &str, control: &Endpoint) -> Worker {
        let who = Identity {
            role: Role::Worker,
            id: id.to_owned(),
        };
        let creds = Arc::new(Credentials::load(creds_dir, &who).unwrap());
        let listener = Listener::tls("127.0.0.1:0", creds.clone()).await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let orders = Arc::new(Orders(Mutex::new(Vec::new())));
        let server = rpc::serve(listener, orders.clone());
        Worker {
            id: id.to_owned(),
            client: Client::new(control.clone(), creds).unwrap(),
            orders,
            address,
            _server: server,
        }
    }

    fn at(&self, control: &Endpoint, creds_dir: &Path) -> Client {
        let who = Identity {
            role: Role::Worker,
            id: self.id.clone(),
        };
        Client::new(
            control.clone(),
            Arc::new(Credentials::load(creds_dir, &who).unwrap()),
        )
        .unwrap()
    }

    async fn register(&self) {
        let _: serde_json::Value = self
            .client
            .call(
                "/v1/workers/register",
                &Register {
                    worker: self.id.clone(),
                    address: self.address.clone(),
                    capacity: 8,
                },
            )
            .await
            .unwrap();
    }

    async fn heartbeat(&self, attached: &[&str], warm: &[&str]) {
        let _: serde_json::Value = self
            .client
            .call(
                "/v1/workers/heartbeat",
                &Heartbeat {
                    worker: self.id.clone(),
                    attached: attached.iter().map(|s| s.to_string()).collect(),
                    warm: warm.iter().map(|s| s.to_string()).collect(),
                },
            )
            .await
            .unwrap();
    }

    async fn keys_via(
        &self,
        client: &Client,
        manifest: &str,
        start: &str,
    ) -> Result<KeyGrant, RpcError> {
        client
            .call(
                "/v1/keys",
                &KeyRequest {
                    worker: self.id.clone(),
                    manifest: manifest.to_owned(),
                    start: start.to_owned(),
                },
            )
            .await
    }

    async fn keys(&self, manifest: &str, start: &str) -> Result<KeyGrant, RpcError> {
        self.keys_via(&self.client, manifest, start).await
    }
}

/// A home with two images, a CA, workers w1 and w2, and admin ops.
fn fleet() -> (Home, String, String) {
    let h = Home::new();
    for (i, tag) in ["app:1", "db:1"].iter().enumerate() {
        let file = h.path(&format!("img{i}"));
        std::fs::write(&file, random_image(3, i as u64 + 7)).unwrap();
        h.ok(&["import", file.to_str().unwrap(), "--tag", tag]);
    }
    let ca = h.path("ca");
    let ca = ca.to_str().unwrap();
    h.ok(&["control", "init", "--dir", ca, "--host", "127.0.0.1"]);
    for w in ["w1", "w2"] {
        h.ok(&[
            "control",
            "issue",
            "--dir",
            ca,
            "--worker",
            w,
            "--host",
            "127.0.0.1",
        ]);
    }
    h.ok(&["control", "issue", "--dir", ca, "--admin", "ops"]);
    h.ok(&[
        "control",
        "issue",
        "--dir",
        ca,
        "--control",
        "b",
        "--host",
        "127.0.0.1",
    ]);
    let app = h.json(&["inspect", "app:1"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let db = h.json(&["inspect", "db:1"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (h, app, db)
}

/// Starts `lode control serve` with `args` and returns it and the endpoint it printed.
fn serve(h: &Home, args: &[&str], envs: &[(&str, &Path)]) -> (ChildGuard, Endpoint) {
    let ca = h.path("ca");
    let mut all = vec!["control", "serve", "--creds", ca.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut cmd = h.cmd(&all);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let at = line
        .trim()
        .strip_prefix("lode control: listening on ")
        .unwrap_or_else(|| panic!("serve printed {line:?}"))
        .to_owned();
    (ChildGuard(child), at.parse().unwrap())
}

fn start(h: &Home, control: &Endpoint, image: &str) -> serde_json::Value {
    let ca = h.path("ca");
    h.json(&[
        "start",
        image,
        "--control",
        &control.to_string(),
        "--creds",
        ca.to_str().unwrap(),
        "--as",
        "ops",
    ])
}

/// Polls `f` until it is true, for at most `limit`.
async fn eventually<F: AsyncFnMut() -> bool>(limit: Duration, mut f: F) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_go_warm_and_keys_go_only_to_the_assigned_worker() {
    let (h, app, db) = fleet();
    let ca: PathBuf = h.path("ca");
    let (_a, control) = serve(&h, &["--listen", "127.0.0.1:0"], &[]);
    let w1 = Worker::new(&ca, "w1", &control).await;
    let w2 = Worker::new(&ca, "w2", &control).await;
    w1.register().await;
    w2.register().await;
    w1.heartbeat(&[], &[]).await;
    w2.heartbeat(&[], &[&app]).await;

    // The start goes to the worker that has the image warm, which got the order.
    let reply = start(&h, &control, "app:1");
    assert_eq!(reply["worker"], "w2", "{reply}");
    assert_eq!(reply["placed"], "warm", "{reply}");
    assert_eq!(reply["manifest"], app.as_str());
    let start_id = reply["start"].as_str().unwrap().to_owned();
    let orders = w2.orders.0.lock().unwrap().clone();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].start, start_id);
    assert_eq!(orders[0].manifest, app);

    // The assigned worker gets the key; the other is refused, told who has it.
    let grant = w2.keys(&app, &start_id).await.unwrap();
    assert_eq!(grant.manifest, app);
    assert_eq!(grant.data_key.len(), 64);
    let err = w1.keys(&app, &start_id).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RpcError::Refused { status: 403, .. }),
        "{text}"
    );
    assert!(
        text.contains("assigned to worker w2") && text.contains("worker w1"),
        "{text}"
    );

    // A body that lies about who asks is refused, whatever it names.
    let lie = w1
        .client
        .call::<_, KeyGrant>(
            "/v1/keys",
            &KeyRequest {
                worker: "w2".to_owned(),
                manifest: app.clone(),
                start: start_id.clone(),
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        lie.contains("403") && lie.contains("asked as worker \"w2\""),
        "{lie}"
    );

    // A wrong start, and an image never started, are refused too.
    assert!(w2.keys(&app, &"0".repeat(32)).await.is_err());
    assert!(w2.keys(&db, &start_id).await.is_err());

    // A second replica over the same store grants from the store, not from memory;
    // after a release through the first, it refuses.
    let (_b, control_b) = serve(&h, &["--listen", "127.0.0.1:0", "--name", "b"], &[]);
    let via_b = w2.at(&control_b, &ca);
    w2.keys_via(&via_b, &app, &start_id).await.unwrap();
    let _: serde_json::Value = w2
        .client
        .call(
            "/v1/release",
            &Release {
                worker: "w2".to_owned(),
                manifest: app.clone(),
                start: start_id.clone(),
            },
        )
        .await
        .unwrap();
    let after = w2.keys_via(&via_b, &app, &start_id).await.unwrap_err();
    assert!(
        after.to_string().contains("assigned to no worker"),
        "{after}"
    );

    // A worker may not start images; an admin may read the state.
    let err = w1
        .client
        .call::<_, serde_json::Value>("/v1/start", &serde_json::json!({"image": "app:1"}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::Refused { status: 403, .. }),
        "{err}"
    );
    let status = h.json(&[
        "control",
        "status",
        "--control",
        &control.to_string(),
        "--creds",
        ca.to_str().unwrap(),
        "--as",
        "ops",
    ]);
    assert_eq!(status["workers"].as_array().unwrap().len(), 2, "{status}");

    let (code, metrics) = w1.client.exchange("/metrics", Vec::new()).await.unwrap();
    assert_eq!(code, 200);
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(metrics.contains("lode_control_grants_total 1"), "{metrics}");
    assert!(
        metrics.contains("lode_control_refusals_total{reason=\"not-assigned\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_control_starts_total{placed=\"warm\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_runs_out_unless_heartbeats_renew_it() {
    let (h, app, _db) = fleet();
    let ca: PathBuf = h.path("ca");
    let (_a, control) = serve(&h, &["--listen", "127.0.0.1:0", "--lease", "2s"], &[]);
    let w1 = Worker::new(&ca, "w1", &control).await;
    w1.register().await;
    w1.heartbeat(&[], &[]).await;
    let reply = start(&h, &control, "app:1");
    let start_id = reply["start"].as_str().unwrap().to_owned();
    w1.keys(&app, &start_id).await.unwrap();
    // No heartbeat names it attached: the lease ends and the key is refused.
    let expired = eventually(Duration::from_secs(20), async || {
        match w1.keys(&app, &start_id).await {
            Err(e) => e.to_string().contains("lease ended"),
            Ok(_) => false,
        }
    })
    .await;
    assert!(expired, "the lease never ran out");
    // A late heartbeat does not bring it back.
    w1.heartbeat(&[&app], &[&app]).await;
    assert!(w1.keys(&app, &start_id).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_assigning_and_ordering_grants_nothing_by_accident() {
    let (h, app, _db) = fleet();
    let ca: PathBuf = h.path("ca");
    let gate = h.path("gate");
    std::fs::create_dir(&gate).unwrap();
    let socket = h.path("control.sock");
    let (mut service, control) = serve(
        &h,
        &["--socket", socket.to_str().unwrap(), "--lease", "2s"],
        &[
            ("LODE_FAILPOINT", Path::new("control:after-assign")),
            ("LODE_FAILPOINT_GATE", &gate),
        ],
    );
    let w1 = Worker::new(&ca, "w1", &control).await;
    w1.register().await;
    w1.heartbeat(&[], &[]).await;

    // The start pauses after recording the assignment; the service is killed there.
    let ca_s = ca.to_str().unwrap().to_owned();
    let mut starter = ChildGuard(
        h.cmd(&[
            "start",
            "app:1",
            "--control",
            &control.to_string(),
            "--creds",
            &ca_s,
            "--as",
            "ops",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let paused = eventually(Duration::from_secs(30), async || {
        std::fs::read_dir(&gate).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("control-after-assign.")
        })
    })
    .await;
    assert!(paused, "the service never reached control:after-assign");
    let _ = service.0.kill();
    let _ = service.0.wait();
    assert!(!starter.wait_for(Duration::from_secs(30)).unwrap().success());
    assert!(w1.orders.0.lock().unwrap().is_empty(), "an order was sent");

    // Restarted over the same store: the assignment is there, its lease runs out, and
    // no key is granted for a start whose order never went out.
    let (_again, control) = serve(
        &h,
        &["--socket", socket.to_str().unwrap(), "--lease", "2s"],
        &[],
    );
    let w1 = Worker::new(&ca, "w1", &control).await;
    let status = h.json(&[
        "control",
        "status",
        "--control",
        &control.to_string(),
        "--creds",
        &ca_s,
        "--as",
        "ops",
    ]);
    let assignments = status["assignments"].as_array().unwrap();
    assert_eq!(assignments.len(), 1, "{status}");
    let start_id = assignments[0]["start"].as_str().unwrap().to_owned();
    let expired = eventually(Duration::from_secs(20), async || {
        match w1.keys(&app, &start_id).await {
            Err(e) => e.to_string().contains("lease ended"),
            Ok(_) => false,
        }
    })
    .await;
    assert!(expired, "the interrupted start's lease never ran out");
    w1.heartbeat(&[], &[]).await;
    assert!(w1.keys(&app, &start_id).await.is_err());

    // The Unix socket serves a start on a single host.
    let reply = start(&h, &control, "app:1");
    assert_eq!(reply["worker"], "w1", "{reply}");
    let new_start = reply["start"].as_str().unwrap();
    w1.keys(&app, new_start).await.unwrap();
}
