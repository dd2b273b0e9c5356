//! Deleting and pinning through the real `lode` binary, on a local store and on S3 (an
//! s3s-fs server in this process, checking SigV4): what is live is what a tag names or a
//! pin holds; `rm --manifest` refuses a live manifest naming what holds it; `store stats`
//! counts each root's live and dead bytes, each chunk once; a pin object lode did not
//! write blocks deletion without being quoted.

#[path = "common/harness.rs"]
mod harness;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use harness::Home;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use serde_json::Value;

const CHUNK: usize = 512 * 1024;
/// A stored chunk: its plaintext and the seal's 16-byte tag.
const SEALED: u64 = CHUNK as u64 + 16;
const BUCKET: &str = "lode-gc";
const ACCESS_KEY: &str = "lode-gc-access";
const SECRET_KEY: &str = "lode-gc-secret";
const SECRET: &str = "root:$6$hostsalt$thisisthehostpasswordhash:19000:0:99999:7:::";

/// A scratch home and the store the binary is pointed at.
struct Target {
    h: Home,
    /// The value of LODE_STORE.
    store: String,
    /// Where the store's objects are files, to damage them behind lode's back.
    objects: PathBuf,
    env: Vec<(&'static str, String)>,
    /// Keeps the S3 server's runtime (and the server) alive.
    _server: Option<tokio::runtime::Runtime>,
    _fs: Option<tempfile::TempDir>,
}

impl Target {
    fn local() -> Target {
        let h = Home::new();
        let objects = h.path("store");
        Target {
            store: objects.to_str().unwrap().to_owned(),
            h,
            objects,
            env: Vec::new(),
            _server: None,
            _fs: None,
        }
    }

    fn s3() -> Target {
        let fs_root = tempfile::tempdir().unwrap();
        let bucket = fs_root.path().join(BUCKET);
        fs::create_dir(&bucket).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let root = fs_root.path().to_owned();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let fs = s3s_fs::FileSystem::new(root).unwrap();
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            let service = b.build();
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Target {
            h: Home::new(),
            store: format!("s3://{BUCKET}/gc"),
            objects: bucket.join("gc"),
            env: vec![
                ("AWS_ENDPOINT_URL", endpoint),
                ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
                ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
                ("AWS_REGION", "us-east-1".to_owned()),
            ],
            _server: Some(rt),
            _fs: Some(fs_root),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.h.cmd(args);
        cmd.env("LODE_STORE", &self.store);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run lode");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "lode {args:?} panicked:\n{err}");
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lode {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with exit status 1; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "lode {args:?}: {out:?}");
        String::from_utf8(out.stderr).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    fn import(&self, file: &Path, tag: &str) -> String {
        self.json(&["import", file.to_str().unwrap(), "--tag", tag])["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Root 1's figures from `store stats --json`.
    fn root1(&self) -> Value {
        let st = self.json(&["store", "stats"]);
        let roots = st["per_root"].as_array().unwrap();
        assert_eq!(roots.len(), 1, "{st}");
        assert_eq!(roots[0]["live_bytes"], st["live_bytes"]);
        assert_eq!(roots[0]["dead_bytes"], st["dead_bytes"]);
        roots[0].clone()
    }
}

/// `chunks` chunks of bytes that neither repeat nor compress.
fn random(chunks: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = vec![0u8; chunks * CHUNK];
    for b in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    v
}

fn figures(root: &Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| root[k].as_u64().unwrap_or_else(|| panic!("{k} in {root}"));
    (
        n("live_manifests"),
        n("manifests"),
        n("live_bytes"),
        n("dead_bytes"),
    )
}

/// The whole life of two images sharing chunks: tag, pin, untag, unpin, remove; live and
/// dead bytes after each step; the survivor still exports byte for byte.
fn remove_and_pin(t: &Target) {
    let label = &t.store;
    // a: chunks A0 A1 A2 A1 (a repeat within the image); b: A0 A1 B0 B1.
    let a0 = random(3, 1);
    let mut a = a0.clone();
    a.extend_from_slice(&a0[CHUNK..2 * CHUNK]);
    let mut b = a0[..2 * CHUNK].to_vec();
    b.extend(random(2, 2));
    let (fa, fb) = (t.h.path("a.img"), t.h.path("b.img"));
    fs::write(&fa, &a).unwrap();
    fs::write(&fb, &b).unwrap();
    let ida = t.import(&fa, "a:1");
    let idb = t.import(&fb, "b:1");
    // A second tag on the same manifest (an import of the same file would make another
    // manifest: each gets its own data key).
    fs::write(t.objects.join("tags/a2"), format!("{ida}\n")).unwrap();
    // 5 distinct chunks, all live; a repeat and a shared chunk count once.
    assert_eq!(figures(&t.root1()), (2, 2, 5 * SEALED, 0));

    assert_eq!(t.ok(&["pin", "b:1"]), format!("pinned {idb}\n"));
    assert_eq!(t.ok(&["pin", &idb]), format!("{idb} was pinned already\n"));
    assert_eq!(
        t.ok(&["rm", "b:1"]),
        format!("untagged b:1 (manifest {idb})\n")
    );
    assert_eq!(
        t.fails(&["rm", "--manifest", &idb]),
        format!(
            "lode: error: manifest {idb} is live: a pin holds it (remove them first: lode rm \
             TAG, lode unpin ID)\n"
        )
    );
    // Pinned and untagged: still live.
    assert_eq!(figures(&t.root1()), (2, 2, 5 * SEALED, 0));

    assert_eq!(t.ok(&["unpin", &idb]), format!("unpinned {idb}\n"));
    assert_eq!(
        t.fails(&["unpin", &idb]),
        format!("lode: error: pin {idb} is not in store {label}\n")
    );
    // b's own two chunks are dead; the two it shares with a are not.
    assert_eq!(figures(&t.root1()), (1, 2, 3 * SEALED, 2 * SEALED));

    assert_eq!(
        t.ok(&["rm", "--manifest", &idb]),
        format!("removed manifest {idb} from root 1; its chunks go when the root is collected\n")
    );
    assert_eq!(
        t.fails(&["rm", "--manifest", &idb]),
        format!("lode: error: manifest {idb} is not in store {label}\n")
    );
    assert_eq!(
        t.fails(&["pin", &idb]),
        format!("lode: error: manifest {idb} is not in store {label}\n")
    );
    // Removing a manifest frees no chunk: that is the collector's work.
    assert_eq!(figures(&t.root1()), (1, 1, 3 * SEALED, 2 * SEALED));

    // The survivor is whole.
    let out = t.h.path("a.out");
    t.ok(&["export", "a:1", out.to_str().unwrap()]);
    assert!(fs::read(&out).unwrap() == a, "a:1 exported other bytes");

    assert_eq!(
        t.fails(&["rm", "--manifest", &ida]),
        format!(
            "lode: error: manifest {ida} is live: tags \"a2\", \"a:1\" name it (remove them \
             first: lode rm TAG, lode unpin ID)\n"
        )
    );
    assert_eq!(
        t.fails(&["rm", "--manifest", "a:1"]),
        "lode: error: --manifest takes a manifest id (64 hex digits), not \"a:1\"; to remove \
         a tag, leave out --manifest\n"
    );
    // An id removes every tag naming it.
    assert_eq!(
        t.ok(&["rm", &ida]),
        format!("untagged a2 (manifest {ida})\nuntagged a:1 (manifest {ida})\n")
    );
    assert_eq!(
        t.fails(&["rm", &ida]),
        format!(
            "lode: error: no tag names manifest {ida} in store {label}; to remove the manifest \
             itself: lode rm --manifest {ida}\n"
        )
    );
    assert_eq!(
        t.fails(&["rm", "a:1"]),
        format!("lode: error: tag \"a:1\" is not in store {label}\n")
    );
    assert_eq!(figures(&t.root1()), (0, 1, 0, 5 * SEALED));
    assert_eq!(
        t.json(&["rm", "--manifest", &ida]),
        serde_json::json!({"id": ida, "roots": [1]})
    );
    assert_eq!(figures(&t.root1()), (0, 0, 0, 5 * SEALED));
}

/// A pin object lode did not write (another manifest's id, or anything at all) pins
/// nothing lode can prove, so it blocks every `rm --manifest` until it is repaired; it is
/// named by `store fsck` and never quoted.
fn unreadable_pins_block_deletion(t: &Target) {
    let f = t.h.path("c.img");
    fs::write(&f, random(1, 3)).unwrap();
    let id = t.import(&f, "c:1");
    t.ok(&["rm", "c:1"]);
    let other = "ab".repeat(32);
    let pin = t.objects.join("pins").join(&other);
    fs::create_dir_all(pin.parent().unwrap()).unwrap();
    fs::write(&pin, SECRET).unwrap();

    let err = t.fails(&["rm", "--manifest", &id]);
    assert!(!err.contains("hostpassword"), "{err}");
    let object = if t.store.starts_with("s3://") {
        format!("gc/pins/{other}")
    } else {
        format!("pins/{other}")
    };
    assert_eq!(
        err,
        format!(
            "lode: error: manifest {id} cannot be proven dead: 1 tag or pin object(s) cannot \
             be read ({object} in store {} is corrupt: it does not hold a manifest id (64 \
             lowercase hex digits and a newline)); repair or remove them first (lode store \
             fsck names them)\n",
            t.store
        )
    );
    let out = t.run(&["store", "stats"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "warning: 1 tag or pin object(s) cannot be read: dead bytes may include live ones"
        ),
        "{err}"
    );
    let out = t.run(&["store", "fsck"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hostpassword"), "{text}");
    assert!(
        text.contains(&format!("FAULT  {object} in store {} is corrupt", t.store)),
        "{text}"
    );
    // A pin that holds another manifest's id than its name pins neither.
    fs::write(&pin, format!("{id}\n")).unwrap();
    let err = t.fails(&["rm", "--manifest", &id]);
    assert!(
        err.contains("it holds another manifest's id than the one it is named by"),
        "{err}"
    );
    fs::remove_file(&pin).unwrap();
    t.ok(&["rm", "--manifest", &id]);
}

#[test]
fn rm_pin_and_stats_on_a_local_store() {
    let t = Target::local();
    remove_and_pin(&t);
    unreadable_pins_block_deletion(&t);
}

#[test]
fn rm_pin_and_stats_on_s3() {
    let t = Target::s3();
    remove_and_pin(&t);
    unreadable_pins_block_deletion(&t);
}
