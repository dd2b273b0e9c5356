//! The control plane end to end, with real processes only: `lode control serve` with the
//! keyring, two `lode agent` workers on 127.0.0.1 with certificates made by `lode control
//! init` and `lode control issue`, starts asked for with `lode start`, and a local
//! directory store. The agents get no keyring and no KMS environment; every image key
//! they use arrives from the service as a grant over mutual TLS.

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_control::api::{AttachOrder, AttachReply, ErrorReply, Identity, Role};
use lode_control::pki;
use lode_control::rpc::{Client, Endpoint};
use lode_control::state::{AssignmentRecord, WorkerRecord};
use serde_json::Value;

#[path = "common/harness.rs"]
mod harness;
use harness::*;

fn now_ms() -> u64 {
    lode_agent::worker::unix_now_ms()
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
    control_url: String,
    service: ChildGuard,
    service_err: PathBuf,
    /// The admin `ops`, to read the service's state.
    admin: Client,
}

/// The lease the service gives: long enough for a killed agent to come back within it,
/// short enough to wait out.
const LEASE: &str = "8s";

impl Fleet {
    /// A fleet whose store holds `images` (tag, bytes), imported with the service's
    /// keyring; their manifest ids.
    fn new(images: &[(&str, &[u8])]) -> (Fleet, Vec<String>) {
        let h = Home::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let pki_dir = h.path("pki");
        let dir = pki_dir.to_str().expect("path");
        h.ok(&["control", "init", "--dir", dir, "--host", "127.0.0.1"]);
        for w in ["worker-a", "worker-b"] {
            h.ok(&[
                "control",
                "issue",
                "--dir",
                dir,
                "--worker",
                w,
                "--host",
                "127.0.0.1",
            ]);
        }
        h.ok(&["control", "issue", "--dir", dir, "--admin", "ops"]);
        // The keyring is made by the first import and given only to the service.
        let keyring = h.path("control-keyring.json");
        let ids = images
            .iter()
            .map(|(tag, img)| import(&h, &keyring, tag, img))
            .collect();
        let service_err = h.path("control.err");
        let mut child = h
            .cmd(&[
                "--kms",
                keyring.to_str().expect("path"),
                "control",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--creds",
                dir,
                "--lease",
                LEASE,
                "--heartbeat-interval",
                "2s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&service_err).expect("log"))
            .spawn()
            .expect("spawn lode control serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        let service = ChildGuard(child);
        let control_url = line
            .trim()
            .strip_prefix("lode control: listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "serve printed {line:?}:\n{}",
                    fs::read_to_string(&service_err).unwrap_or_default()
                )
            })
            .to_owned();
        let ops = Identity {
            role: Role::Admin,
            id: "ops".into(),
        };
        let admin = Client::new(
            control_url.parse().expect("endpoint"),
            Arc::new(pki::Credentials::load(&pki_dir, &ops).expect("admin credentials")),
        )
        .expect("client");
        let fleet = Fleet {
            h,
            rt,
            pki: pki_dir,
            control_url,
            service,
            service_err,
            admin,
        };
        (fleet, ids)
    }

    fn keyring(&self) -> String {
        self.h.path("control-keyring.json").display().to_string()
    }

    fn store(&self) -> String {
        self.h.home().join("store").display().to_string()
    }

    /// `lode start IMAGE` as admin ops.
    fn start(&self, image: &str) -> Value {
        self.h.json(&[
            "start",
            image,
            "--control",
            &self.control_url,
            "--creds",
            self.pki.to_str().expect("path"),
            "--as",
            "ops",
        ])
    }

    fn workers(&self) -> Vec<WorkerRecord> {
        self.rt
            .block_on(self.admin.call("/v1/workers", &()))
            .expect("the service's workers")
    }

    fn assignments(&self) -> Vec<AssignmentRecord> {
        self.rt
            .block_on(self.admin.call("/v1/assignments", &()))
            .expect("the service's assignments")
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

    /// Starts worker `id` and waits until it says where it takes orders and the service
    /// has it registered there.
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
            self.workers()
                .iter()
                .any(|w| w.worker == id && w.address == orders)
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "waited 30 s for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `order` to `worker` as `as_whom` (the service's own certificate, as a
    /// replica replaying it would, unless another is given).
    fn send(
        &self,
        worker: &Worker,
        order: &AttachOrder,
        as_whom: Option<Identity>,
    ) -> Result<AttachReply, (u16, String)> {
        let who = as_whom.unwrap_or_else(pki::control_identity);
        let creds = Arc::new(pki::Credentials::load(&self.pki, &who).expect("credentials"));
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

    fn stats(&self, w: &Worker) -> Value {
        self.h.json(&["stats", "--control", &w.control()])
    }

    /// The names attached on `w`.
    fn names(&self, w: &Worker) -> Vec<String> {
        self.h
            .json(&["ls", "--control", &w.control()])
            .as_array()
            .expect("array")
            .iter()
            .map(|a| a["name"].as_str().expect("name").to_string())
            .collect()
    }

    /// The service's `/metrics`.
    fn metrics(&self) -> String {
        let (status, body) = self
            .rt
            .block_on(self.admin.exchange("/metrics", Vec::new()))
            .expect("metrics");
        assert_eq!(status, 200);
        String::from_utf8(body.to_vec()).expect("text")
    }
}

/// `img` imported as `tag` with `keyring`; its manifest id.
fn import(h: &Home, keyring: &std::path::Path, tag: &str, img: &[u8]) -> String {
    let raw = h.path(&format!("{tag}.raw").replace(':', "_"));
    fs::write(&raw, img).expect("write image");
    let v = h.json(&[
        "import",
        raw.to_str().expect("path"),
        "--tag",
        tag,
        "--kms",
        keyring.to_str().expect("path"),
    ]);
    v["id"].as_str().expect("id").to_string()
}

/// The attach order the service sent for a start, rebuilt from `lode start`'s answer.
fn order_of(reply: &Value, image: &str) -> AttachOrder {
    AttachOrder {
        start: reply["start"].as_str().expect("start").into(),
        image: image.into(),
        manifest: reply["manifest"].as_str().expect("manifest").into(),
        name: reply["name"].as_str().expect("name").into(),
        lease_expires_unix_ms: reply["lease_expires_unix_ms"].as_u64().expect("lease"),
    }
}

/// The agent's environment: none of the variables that name a KMS or cloud credentials,
/// and no keyring in its directories.
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
    let app = harness::random_image(6, 11);
    let other = harness::random_image(3, 12);
    let (mut fleet, ids) = Fleet::new(&[("app:1", &app), ("other:1", &other)]);
    let (m_app, m_other) = (ids[0].clone(), ids[1].clone());

    // A worker refuses a KMS of its own.
    let (mut cmd, _, _) = fleet.agent_cmd("worker-a", &["--kms", &fleet.keyring()]);
    let out = cmd.output().expect("run lode agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a worker ran with --kms");
    assert!(err.contains("holds no KMS or keyring"), "{err}");

    let mut workers = [
        Some(fleet.start_worker("worker-a")),
        Some(fleet.start_worker("worker-b")),
    ];

    // A start is placed by hashing (neither worker has the image), attached there, and
    // reads back through the FUSE file and the NBD export.
    let first = fleet.start("app:1");
    assert_eq!(first["placed"], "hashed", "{first}");
    assert_eq!(first["manifest"], m_app.as_str());
    let (x, y) = if first["worker"] == "worker-a" {
        (0, 1)
    } else {
        (1, 0)
    };
    let first_order = order_of(&first, "app:1");
    let file = PathBuf::from(first["file"].as_str().expect("a FUSE file"));
    {
        let a = workers[x].as_ref().expect("X");
        assert_eq!(first["worker"], a.id.as_str());
        assert!(
            fs::read(&file).expect("read the FUSE file") == app,
            "image differs"
        );
        if have_nbdcopy() {
            let out = fleet.h.path("nbd.out");
            let uri = format!(
                "nbd+unix:///{}?socket={}",
                first["nbd_export"].as_str().expect("export"),
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
        assert_eq!(ls[0]["start"], first_order.start.as_str(), "{ls}");
        assert_eq!(ls[0]["id"], m_app.as_str());
    }
    let x_id = workers[x].as_ref().expect("X").id.clone();
    let y_id = workers[y].as_ref().expect("Y").id.clone();

    // X's heartbeat lists the image attached and warm; the next start of it goes to X,
    // warm, and both starts keep their keys.
    fleet.wait_for("X's heartbeat to list the image", || {
        fleet.workers().iter().any(|w| {
            w.worker == x_id && w.attached == vec![m_app.clone()] && w.warm.first() == Some(&m_app)
        })
    });
    let second = fleet.start("app:1");
    assert_eq!(second["worker"], x_id.as_str(), "{second}");
    assert_eq!(second["placed"], "warm", "{second}");
    let second_order = order_of(&second, "app:1");
    let on_x = fleet.assignments();
    assert_eq!(on_x.len(), 1, "{on_x:?}");
    assert_eq!(on_x[0].starts.len(), 2, "{on_x:?}");

    {
        let a = workers[x].as_ref().expect("X");
        let b = workers[y].as_ref().expect("Y");
        // The same order again is refused, naming the start.
        let (status, e) = fleet.send(a, &first_order, None).unwrap_err();
        assert_eq!(status, 409, "{e}");
        assert!(
            e.contains(&first_order.start) && e.contains("replayed"),
            "{e}"
        );

        // Only a control service may order: a worker's certificate is refused.
        let as_y = Identity {
            role: Role::Worker,
            id: y_id.clone(),
        };
        let (status, e) = fleet.send(a, &second_order, Some(as_y)).unwrap_err();
        assert_eq!(status, 403, "{e}");

        // Y given X's start asks the service for the key and is refused, naming Y and
        // the manifest; it attaches nothing.
        let stolen = AttachOrder {
            name: "stolen".into(),
            ..first_order.clone()
        };
        let (status, e) = fleet.send(b, &stolen, None).unwrap_err();
        assert_eq!(status, 502, "{e}");
        assert!(
            e.contains(&format!("refused to worker {y_id}"))
                && e.contains(&m_app)
                && e.contains(&format!("assigned to worker {x_id}")),
            "{e}"
        );
        assert!(
            fleet.names(b).is_empty(),
            "Y attached what it has no key for"
        );
        let sb = fleet.stats(b);
        assert_eq!(sb["key_grants"], 0, "{sb}");
        assert_eq!(sb["key_refusals"], 1, "{sb}");
        let metrics =
            lode_agent::control::request(&b.state.join("control.sock"), "GET", "/metrics", None)
                .expect("metrics");
        let text = String::from_utf8(metrics.body).expect("text");
        assert!(text.contains("\nlode_agent_key_grants_total 0\n"), "{text}");
        assert!(
            text.contains("\nlode_agent_key_refusals_total 1\n"),
            "{text}"
        );

        // An order whose lease already ended is refused by the worker itself.
        let late = AttachOrder {
            start: format!("{:032x}", 0xfeed_u128),
            image: "other:1".into(),
            manifest: m_other.clone(),
            name: "late".into(),
            lease_expires_unix_ms: now_ms() - 1,
        };
        let (status, e) = fleet.send(b, &late, None).unwrap_err();
        assert_eq!(status, 400, "{e}");
        assert!(e.contains("lease") && e.contains(&late.start), "{e}");

        // Detaching the second start tells the service, which drops only that start.
        fleet
            .h
            .ok(&["detach", &second_order.name, "--control", &a.control()]);
    }
    let left = fleet.assignments();
    let starts: Vec<&str> = left
        .iter()
        .flat_map(|r| r.starts.iter().map(|s| s.start.as_str()))
        .collect();
    assert_eq!(starts, [first_order.start.as_str()], "{left:?}");

    // A restarted X asks again for the first start's key, which it still has, and gets
    // it: the second start did not displace it.
    let dead = workers[x].take().expect("X").proc.kill_hard();
    workers[x] = Some(fleet.start_worker(&x_id));
    drop(dead);
    {
        let a = workers[x].as_ref().expect("X");
        assert_eq!(fleet.names(a), vec![first_order.name.clone()]);
        assert!(fs::read(&file).expect("read after restart") == app);
        let text = fs::read_to_string(&a.out).unwrap_or_default();
        assert!(text.contains("1 attachment(s) restored"), "{text}");
        assert_eq!(fleet.stats(a)["key_grants"], 1);
    }

    // A start of another image reads back; its worker is killed, the lease runs out
    // with no heartbeat to renew it, and the restarted worker asking again with the
    // start it kept is refused.
    let short = fleet.start("other:1");
    let short_order = order_of(&short, "other:1");
    assert!(
        fs::read(short["file"].as_str().expect("file")).expect("read") == other,
        "image differs"
    );
    let w = if short["worker"] == x_id.as_str() {
        x
    } else {
        y
    };
    let w_id = workers[w].as_ref().expect("W").id.clone();
    let dead = workers[w].take().expect("W").proc.kill_hard();
    let lease_end = fleet
        .assignments()
        .iter()
        .flat_map(|r| r.starts.iter())
        .find(|s| s.start == short_order.start)
        .expect("the short start is recorded")
        .lease_expires_unix_ms;
    fleet.wait_for("the short start's lease to end", || now_ms() > lease_end);
    workers[w] = Some(fleet.start_worker(&w_id));
    drop(dead);
    {
        let b = workers[w].as_ref().expect("W");
        assert!(
            !fleet.names(b).contains(&short_order.name),
            "the worker re-attached after its lease ended"
        );
        let err = fs::read_to_string(&b.err).unwrap_or_default();
        assert!(
            err.contains(&format!("could not re-attach {}", short_order.name))
                && err.contains(&format!("start {}'s lease ended", short_order.start)),
            "{err}"
        );
        assert!(fleet.stats(b)["key_refusals"].as_u64() >= Some(1));
    }

    // The service granted exactly the four keys above (first, second, first again after
    // the restart, the short start) and logged the refusals.
    let metrics = fleet.metrics();
    assert!(
        metrics.contains("\nlode_control_grants_total 4\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_control_refusals_total{reason=\"not-assigned\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_control_refusals_total{reason=\"lease-expired\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lode_control_starts_total{placed=\"warm\"} 1"),
        "{metrics}"
    );
    let log = fs::read_to_string(&fleet.service_err).unwrap_or_default();
    assert!(
        log.contains(&format!(
            "granted worker {x_id} the key of manifest {m_app} (start {})",
            first_order.start
        )),
        "{log}"
    );

    for w in workers.iter().flatten() {
        assert_no_kms_environment(w);
    }
    // The keyring is the service's alone.
    assert!(fs::metadata(fleet.keyring()).is_ok(), "no keyring at all");
    let _ = fleet.service.0.kill();
}
