//! The assignment service through the real `lode` binary (`lode control serve`, `lode
//! start`), with workers played by this test: each has its own certificate, answers
//! attach orders over mutual TLS, and calls the service with the real rpc client.

#[path = "common/aws.rs"]
mod aws;
#[path = "common/harness.rs"]
mod harness;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

    /// Releases `start` of `manifest`; whether the service still had it.
    async fn release(&self, manifest: &str, start: &str) -> bool {
        let reply: serde_json::Value = self
            .client
            .call(
                "/v1/release",
                &Release {
                    worker: self.id.clone(),
                    manifest: manifest.to_owned(),
                    start: start.to_owned(),
                },
            )
            .await
            .unwrap();
        reply["released"].as_bool().unwrap()
    }
}

/// The service's `lode_control_grants_total`, read from `/metrics` as `client`.
async fn grants_total(client: &Client) -> u64 {
    let (code, metrics) = client.exchange("/metrics", Vec::new()).await.unwrap();
    assert_eq!(code, 200);
    let text = String::from_utf8_lossy(&metrics).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("lode_control_grants_total "))
        .unwrap_or_else(|| panic!("no grant counter in {text}"))
        .parse()
        .unwrap()
}

/// A home with two images, a CA, workers w1, w2 and w3, and admin ops.
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
    for w in ["w1", "w2", "w3"] {
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

/// Starts `lode control serve` with `args` and `envs` and returns it and the endpoint it
/// printed.
fn serve(h: &Home, args: &[&str], envs: &[(&str, &Path)]) -> (ChildGuard, Endpoint) {
    serve_with(h, args, |cmd| {
        for (k, v) in envs {
            cmd.env(k, v);
        }
    })
}

/// [`serve`], with `setup` given the command before it runs.
fn serve_with(h: &Home, args: &[&str], setup: impl FnOnce(&mut Command)) -> (ChildGuard, Endpoint) {
    let ca = h.path("ca");
    let mut all = vec!["control", "serve", "--creds", ca.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut cmd = h.cmd(&all);
    setup(&mut cmd);
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
    let start_id = assignments[0]["starts"][0]["start"]
        .as_str()
        .unwrap()
        .to_owned();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_keeps_every_live_start_of_an_image() {
    let (h, app, _db) = fleet();
    let ca: PathBuf = h.path("ca");
    let (_a, control) = serve(&h, &["--listen", "127.0.0.1:0", "--lease", "3s"], &[]);
    let w1 = Worker::new(&ca, "w1", &control).await;
    w1.register().await;
    w1.heartbeat(&[], &[]).await;

    // Three starts of one image on the only worker: each keeps its own key.
    let starts: Vec<String> = (0..3)
        .map(|_| {
            let reply = start(&h, &control, "app:1");
            assert_eq!(reply["worker"], "w1", "{reply}");
            reply["start"].as_str().unwrap().to_owned()
        })
        .collect();
    for s in &starts {
        w1.keys(&app, s).await.unwrap();
    }
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
    let assignments = status["assignments"].as_array().unwrap();
    assert_eq!(assignments.len(), 1, "{status}");
    assert_eq!(
        assignments[0]["starts"].as_array().unwrap().len(),
        3,
        "{status}"
    );

    // Releasing the first removes only it.
    assert!(w1.release(&app, &starts[0]).await);
    assert!(!w1.release(&app, &starts[0]).await, "released twice");
    let gone = w1.keys(&app, &starts[0]).await.unwrap_err().to_string();
    assert!(
        gone.contains(&starts[0]) && gone.contains("not among"),
        "{gone}"
    );
    w1.keys(&app, &starts[1]).await.unwrap();
    w1.keys(&app, &starts[2]).await.unwrap();

    // Heartbeats naming the image attached renew every remaining start past the lease
    // they were given.
    let first_lease = assignments[0]["starts"][1]["lease_expires_unix_ms"]
        .as_u64()
        .unwrap();
    let renewed = eventually(Duration::from_secs(20), async || {
        w1.heartbeat(&[&app], &[&app]).await;
        lode_agent::worker::unix_now_ms() > first_lease + 500
    })
    .await;
    assert!(renewed, "the clock never passed the first lease");
    w1.keys(&app, &starts[1]).await.unwrap();
    w1.keys(&app, &starts[2]).await.unwrap();

    // Without heartbeats both run out together.
    let expired = eventually(Duration::from_secs(20), async || {
        w1.keys(&app, &starts[2]).await.is_err()
    })
    .await;
    assert!(expired, "the leases never ran out");
    let err = w1.keys(&app, &starts[1]).await.unwrap_err().to_string();
    assert!(
        err.contains("lease ended") && err.contains(&starts[1]),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_spreads_images_and_concentrates_each_one() {
    let (h, _app, _db) = fleet();
    let ca: PathBuf = h.path("ca");
    // Twelve small distinct images besides the fleet's two.
    let mut images = Vec::new();
    for i in 0..12u64 {
        let file = h.path(&format!("small{i}"));
        std::fs::write(&file, random_image(1, 100 + i)).unwrap();
        let tag = format!("small:{i}");
        h.ok(&["import", file.to_str().unwrap(), "--tag", &tag]);
        images.push(tag);
    }
    let (_a, control) = serve(&h, &["--listen", "127.0.0.1:0"], &[]);
    let mut workers = Vec::new();
    for id in ["w1", "w2", "w3"] {
        let w = Worker::new(&ca, id, &control).await;
        w.register().await;
        w.heartbeat(&[], &[]).await;
        workers.push(w);
    }
    let by_id = |id: &str| workers.iter().find(|w| w.id == id).unwrap();
    let ring = lode_control::placement::Ring::new(["w1", "w2", "w3"].map(String::from));
    let idle = [lode_control::placement::Load {
        capacity: 8,
        load: 0,
        warm: false,
        alive: true,
    }; 3];

    // Each start released before the next, so no load bends the hashing: every image
    // lands where the ring puts it, and the twelve use more than one worker.
    let mut used = std::collections::BTreeSet::new();
    for tag in &images {
        let reply = start(&h, &control, tag);
        let manifest = reply["manifest"].as_str().unwrap();
        let id: lode_format::ManifestId = manifest.parse().unwrap();
        let want = lode_control::placement::place(&ring, id.as_bytes(), &idle, 0.25).unwrap();
        let worker = reply["worker"].as_str().unwrap().to_owned();
        assert_eq!(worker, ring.workers()[want.worker], "{tag}: {reply}");
        assert_eq!(reply["placed"], "hashed", "{reply}");
        assert!(
            by_id(&worker)
                .release(manifest, reply["start"].as_str().unwrap())
                .await
        );
        used.insert(worker);
    }
    assert!(used.len() > 1, "twelve images all went to {used:?}");

    // Repeated starts of one image all go to one worker.
    let mut first = None;
    for _ in 0..5 {
        let reply = start(&h, &control, &images[0]);
        let worker = reply["worker"].as_str().unwrap().to_owned();
        assert_eq!(*first.get_or_insert(worker.clone()), worker, "{reply}");
        assert!(
            by_id(&worker)
                .release(
                    reply["manifest"].as_str().unwrap(),
                    reply["start"].as_str().unwrap()
                )
                .await
        );
    }
}

/// What a recording proxy saw: per connection, the client's bytes and whether it closed.
type Recorded = Arc<Mutex<Vec<(Vec<u8>, bool)>>>;

/// A TCP proxy on 127.0.0.1 to `upstream` that records what each client sends, one entry
/// per connection, marked done when the client closed its side.
async fn recording_proxy(upstream: std::net::SocketAddr) -> (std::net::SocketAddr, Recorded) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let seen: Recorded = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = record.clone();
            let slot = {
                let mut r = record.lock().unwrap();
                r.push((Vec::new(), false));
                r.len() - 1
            };
            tokio::spawn(async move {
                let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            record.lock().unwrap()[slot].0.extend_from_slice(&buf[..n]);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                record.lock().unwrap()[slot].1 = true;
                let _ = sw.shutdown().await;
                let _ = down.await;
            });
        }
    });
    (at, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_tls_bytes_get_no_grant() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (h, app, _db) = fleet();
    let ca: PathBuf = h.path("ca");
    let (_a, control) = serve(&h, &["--listen", "127.0.0.1:0"], &[]);
    let w1 = Worker::new(&ca, "w1", &control).await;
    w1.register().await;
    w1.heartbeat(&[], &[]).await;
    let reply = start(&h, &control, "app:1");
    let start_id = reply["start"].as_str().unwrap().to_owned();

    // The worker asks for the key through the proxy and is granted it.
    let upstream: std::net::SocketAddr = control
        .to_string()
        .strip_prefix("https://")
        .unwrap()
        .parse()
        .unwrap();
    let (proxy, seen) = recording_proxy(upstream).await;
    let via_proxy = w1.at(&format!("https://{proxy}").parse().unwrap(), &ca);
    let before = grants_total(&w1.client).await;
    let grant = w1.keys_via(&via_proxy, &app, &start_id).await.unwrap();
    assert_eq!(grant.manifest, app);
    assert_eq!(grants_total(&w1.client).await, before + 1);
    let done = eventually(Duration::from_secs(10), async || {
        seen.lock().unwrap().first().is_some_and(|c| c.1)
    })
    .await;
    assert!(done, "the proxied connection never closed");
    let recorded = seen.lock().unwrap()[0].0.clone();
    assert!(
        recorded.len() > 1000,
        "recorded only {} bytes",
        recorded.len()
    );
    assert_eq!(recorded[0], 0x16, "not a TLS handshake record");

    // The same bytes on a new connection: the server ends it, and grants nothing.
    let mut replay = tokio::net::TcpStream::connect(upstream).await.unwrap();
    // The server may close before it read everything; a failed write is an end too.
    let _ = replay.write_all(&recorded).await;
    let mut answer = Vec::new();
    let ended =
        tokio::time::timeout(Duration::from_secs(30), replay.read_to_end(&mut answer)).await;
    assert!(
        ended.is_ok(),
        "the server kept the replayed connection open"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(!text.contains("HTTP/1.1"), "a plain answer: {text}");
    assert!(!text.contains(&grant.data_key), "the key came back");
    assert_eq!(
        grants_total(&w1.client).await,
        before + 1,
        "the replay was granted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_service_keeps_workers_and_grants_by_the_records() {
    let (h, app, _db) = fleet();
    let ca: PathBuf = h.path("ca");
    let (mut first, control) = serve(&h, &["--listen", "127.0.0.1:0"], &[]);
    let w1 = Worker::new(&ca, "w1", &control).await;
    let w2 = Worker::new(&ca, "w2", &control).await;
    w1.register().await;
    w2.register().await;
    w1.heartbeat(&[], &[]).await;
    w2.heartbeat(&[], &[]).await;
    let reply = start(&h, &control, "app:1");
    let holder = reply["worker"].as_str().unwrap().to_owned();
    let start_id = reply["start"].as_str().unwrap().to_owned();
    let (owner, other) = if holder == "w1" {
        (&w1, &w2)
    } else {
        (&w2, &w1)
    };
    owner.keys(&app, &start_id).await.unwrap();

    let _ = first.0.kill();
    let _ = first.0.wait();
    let (_again, control) = serve(&h, &["--listen", "127.0.0.1:0"], &[]);
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
    let workers: Vec<&str> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker"].as_str().unwrap())
        .collect();
    assert_eq!(workers, ["w1", "w2"], "{status}");
    let assignments = status["assignments"].as_array().unwrap();
    assert_eq!(assignments.len(), 1, "{status}");
    assert_eq!(assignments[0]["worker"], holder.as_str(), "{status}");
    assert_eq!(assignments[0]["starts"][0]["start"], start_id.as_str());

    // The new process grants what the records say, to whom they say.
    let owner_now = owner.at(&control, &ca);
    let other_now = other.at(&control, &ca);
    let grant = owner.keys_via(&owner_now, &app, &start_id).await.unwrap();
    assert_eq!(grant.manifest, app);
    let err = other
        .keys_via(&other_now, &app, &start_id)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("assigned to worker {holder}"))
            && err.contains(&format!("worker {}", other.id)),
        "{err}"
    );
    // And a start of the same image goes where the hashing put the first.
    let again = start(&h, &control, "app:1");
    assert_eq!(again["worker"], holder.as_str(), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_asking_outside_its_role_is_refused_by_name() {
    let (h, app, _db) = fleet();
    let ca: PathBuf = h.path("ca");
    let (_a, control) = serve(&h, &["--listen", "127.0.0.1:0"], &[]);
    let w1 = Worker::new(&ca, "w1", &control).await;
    w1.register().await;
    w1.heartbeat(&[], &[]).await;
    let reply = start(&h, &control, "app:1");
    let start_id = reply["start"].as_str().unwrap().to_owned();
    let before = grants_total(&w1.client).await;

    // A worker's certificate asking for a start.
    let err = w1
        .client
        .call::<_, serde_json::Value>("/v1/start", &serde_json::json!({"image": "app:1"}))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RpcError::Refused { status: 403, .. }),
        "{text}"
    );
    assert!(
        text.contains("start of \"app:1\" refused to worker/w1") && text.contains("/v1/start"),
        "{text}"
    );

    // An admin's certificate asking for the key of a started image.
    let ops = Identity {
        role: Role::Admin,
        id: "ops".to_owned(),
    };
    let admin = Client::new(
        control.clone(),
        Arc::new(Credentials::load(&ca, &ops).unwrap()),
    )
    .unwrap();
    let err = admin
        .call::<_, KeyGrant>(
            "/v1/keys",
            &KeyRequest {
                worker: "w1".to_owned(),
                manifest: app.clone(),
                start: start_id.clone(),
            },
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RpcError::Refused { status: 403, .. }),
        "{text}"
    );
    assert!(
        text.contains(&format!("key of manifest \"{app}\" refused to admin/ops"))
            && text.contains("/v1/keys"),
        "{text}"
    );
    assert_eq!(grants_total(&w1.client).await, before, "a grant went out");
    // The worker itself still gets it.
    w1.keys(&app, &start_id).await.unwrap();
}

/// The service given AWS KMS that does not answer: the start is placed (it needs no key),
/// the worker's key request is refused in bounded time with an error naming the KMS and
/// the key, and nothing is granted. A second replica over the same store, whose KMS
/// answers, grants the same start: the records were right, only the KMS was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kms_is_named_and_grants_nothing() {
    let Some(moto) = lode_testkit::Moto::start() else {
        return;
    };
    let (h, _app, _db) = fleet();
    let ca: PathBuf = h.path("ca");
    // The SDK's own runtime, off this test's.
    let key = {
        let endpoint = moto.endpoint();
        std::thread::spawn(move || aws::create_key(&endpoint))
            .join()
            .unwrap()
    };
    let file = h.path("aws-img");
    std::fs::write(&file, random_image(2, 99)).unwrap();
    let lode = aws::AwsLode {
        home: &h,
        endpoint: moto.endpoint(),
        key: key.clone(),
    };
    // A store of its own: a store's root salt is wrapped by the one KMS it was made with.
    let store = h.path("aws-store");
    let store = store.to_str().unwrap();
    lode.ok(&[
        "--store",
        store,
        "import",
        file.to_str().unwrap(),
        "--tag",
        "aws:1",
    ]);
    let manifest = lode.json(&["--store", store, "inspect", "aws:1"])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A port that was just free and has no listener.
    let closed = lode_testkit::free_port();
    let closed = format!("http://127.0.0.1:{closed}");
    let spec = format!("aws:{key}");
    let serve_aws = |endpoint: &str, name: &str| {
        let args = [
            "--kms",
            &spec,
            "--store",
            store,
            "--name",
            name,
            "--listen",
            "127.0.0.1:0",
            "--kms-timeout",
            "20s",
        ];
        serve_with(&h, &args, |cmd| aws::aws_env(cmd, &h, endpoint))
    };

    let (_down, control) = serve_aws(&closed, "control");
    let w1 = Worker::new(&ca, "w1", &control).await;
    w1.register().await;
    w1.heartbeat(&[], &[]).await;
    let reply = start(&h, &control, "aws:1");
    assert_eq!(reply["worker"], "w1");
    let start_id = reply["start"].as_str().unwrap().to_owned();
    let err = w1.keys(&manifest, &start_id).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            RpcError::Refused {
                status: 502 | 504,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("AWS KMS at {closed}")) && text.contains(&key),
        "the refusal names neither the KMS nor the key: {text}"
    );
    assert_eq!(grants_total(&w1.client).await, 0, "a grant went out");

    // Replica b, same store, a KMS that answers: the same start is granted.
    let (_up, replica) = serve_aws(&moto.endpoint(), "b");
    let grant = w1
        .keys_via(&w1.at(&replica, &ca), &manifest, &start_id)
        .await
        .unwrap();
    assert_eq!(grant.manifest, manifest);
    assert_eq!(grant.data_key.len(), 64);
}
