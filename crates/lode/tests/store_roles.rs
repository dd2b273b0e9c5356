//! The store roles of docs/policies/, held by a server that enforces them: a real moto
//! server with IAM enforcement on, one IAM user per role whose policy is the shipped file,
//! and the real `lode` binary given each user's keys. The flattener publishes put-only
//! (twice: the second run uploads nothing) and can read no chunk or manifest; a worker
//! reads and verifies what it published but writes nothing; the collector rotates and
//! collects; the control service owns `control/` and reads manifests but no chunk;
//! credentials with no policy do nothing. Every denial is checked to be moto's
//! AccessDenied, and every role's allowed requests succeed, so no check passes because the
//! server refuses everything (or nothing).
//!
//! IAM is driven with boto3 (installed with moto), which costs no Rust build time; the S3
//! requests under test are lode's own, and the direct ones go through object_store, the
//! client lode's store is built on.

#[path = "common/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use harness::Home;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::Value;

const BUCKET: &str = "lode-roles";
const PREFIX: &str = "store";
const STORE: &str = "s3://lode-roles/store";
const ROLES: [&str; 5] = ["flattener", "worker", "collector", "control", "nobody"];

/// Makes the bucket, one IAM user per role with the shipped policy (BUCKET and PREFIX
/// filled in) and an access key each; prints the keys as JSON. Runs before enforcement.
///
/// moto authorises a multi-object delete (object_store's only delete on S3) as
/// `s3:DeleteObject` on the bucket ARN, where AWS checks it per object key; the two roles
/// that delete (collector, control) get that statement on top of their shipped policy,
/// so their per-key statements are what AWS would check and moto's bucket-level check
/// passes. The others get nothing extra: their deletes must fail.
const SETUP: &str = r#"
import json, sys
import boto3
endpoint, bucket, prefix, policies = sys.argv[1:5]
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          aws_access_key_id="setup", aws_secret_access_key="setup")
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
iam = boto3.client("iam", **kw)
keys = {}
for role in ["flattener", "worker", "collector", "control", "nobody"]:
    iam.create_user(UserName=role)
    docs = []
    if role != "nobody":
        with open(f"{policies}/{role}.json") as f:
            docs.append(f.read().replace("BUCKET", bucket).replace("PREFIX", prefix))
    if role in ("collector", "control"):
        docs.append(json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "s3:DeleteObject",
            "Resource": f"arn:aws:s3:::{bucket}"}]}))
    for i, doc in enumerate(docs):
        arn = iam.create_policy(PolicyName=f"lode-{role}-{i}", PolicyDocument=doc)["Policy"]["Arn"]
        iam.attach_user_policy(UserName=role, PolicyArn=arn)
    k = iam.create_access_key(UserName=role)["AccessKey"]
    keys[role] = [k["AccessKeyId"], k["SecretAccessKey"]]
print(json.dumps(keys))
"#;

struct Roles {
    h: Home,
    endpoint: String,
    keys: BTreeMap<String, (String, String)>,
}

/// What a denial by moto's IAM looks like in lode's error (object_store's rendering of a
/// 403 with `<Code>AccessDenied</Code>`), as opposed to a signature or network fault.
fn denied(stderr: &str) -> bool {
    stderr.contains("AccessDenied") && !stderr.contains("SignatureDoesNotMatch")
}

impl Roles {
    fn cmd(&self, role: &str, args: &[&str]) -> Command {
        let (id, secret) = &self.keys[role];
        let mut cmd = self.h.cmd(args);
        cmd.env("LODE_STORE", STORE)
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE");
        cmd
    }

    fn run(&self, role: &str, args: &[&str]) -> Output {
        let out = self.cmd(role, args).output().expect("run lode");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked"),
            "lode {args:?} as {role} panicked:\n{err}"
        );
        out
    }

    fn ok(&self, role: &str, args: &[&str]) -> String {
        let out = self.run(role, args);
        assert!(
            out.status.success(),
            "lode {args:?} as {role} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 stdout")
    }

    fn json(&self, role: &str, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(role, &a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    /// Runs lode as `role`, which must fail with moto's AccessDenied; returns stderr.
    fn denied(&self, role: &str, args: &[&str]) -> String {
        let out = self.run(role, args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "lode {args:?} as {role} succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            denied(&err),
            "lode {args:?} as {role}: not an AccessDenied:\n{err}"
        );
        assert!(
            err.contains(STORE),
            "lode {args:?} as {role}: store not named:\n{err}"
        );
        err
    }

    /// object_store's S3 client with `role`'s keys.
    fn s3(&self, role: &str) -> AmazonS3 {
        let (id, secret) = &self.keys[role];
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(BUCKET)
            .with_access_key_id(id)
            .with_secret_access_key(secret)
            .build()
            .expect("an S3 client")
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// A GET by `role`: its bytes, or the error's text.
fn get(r: &Roles, role: &str, key: &str) -> Result<Vec<u8>, String> {
    let s3 = r.s3(role);
    rt().block_on(async {
        let got = s3.get(&Key::from(key)).await.map_err(|e| e.to_string())?;
        Ok(got.bytes().await.map_err(|e| e.to_string())?.to_vec())
    })
}

/// A PUT by `role`: `Ok` or the error's text.
fn put(r: &Roles, role: &str, key: &str, body: &'static [u8]) -> Result<(), String> {
    let s3 = r.s3(role);
    rt().block_on(async {
        s3.put(&Key::from(key), PutPayload::from_static(body))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// A DELETE by `role`: `Ok` or the error's text.
fn delete(r: &Roles, role: &str, key: &str) -> Result<(), String> {
    let s3 = r.s3(role);
    rt().block_on(async { s3.delete(&Key::from(key)).await.map_err(|e| e.to_string()) })
}

/// The keys under `prefix`, listed by `role`.
fn list(r: &Roles, role: &str, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let s3 = r.s3(role);
    rt().block_on(async {
        s3.list(Some(&Key::from(prefix)))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .expect("list")
    })
}

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/policies")
}

#[test]
fn roles_hold_against_a_server_that_enforces_them() {
    let Some(moto) = lode_testkit::Moto::start() else {
        return;
    };
    let h = Home::new();
    let layout = h.path("layout");
    lode_oci::sample::write_sample_family(&layout).expect("the sample OCI layout");
    let setup = Command::new("python3")
        .args(["-c", SETUP, &moto.endpoint(), BUCKET, PREFIX])
        .arg(policies_dir())
        .output()
        .expect("run python3");
    assert!(
        setup.status.success(),
        "IAM setup failed:\n{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let parsed: BTreeMap<String, (String, String)> =
        serde_json::from_slice(&setup.stdout).expect("the keys as JSON");
    assert_eq!(parsed.len(), ROLES.len());
    let r = Roles {
        h,
        endpoint: moto.endpoint(),
        keys: parsed,
    };
    moto.enforce_iam();

    let source = format!("oci:{}:app1", layout.display());
    let kept = r.h.path("app1.ext4");
    let raw = r.h.path("raw.img");
    std::fs::write(&raw, harness::random_image(3, 7)).unwrap();
    let raw = raw.to_str().unwrap();

    // No policy, no access: not a listing, not a tag, not a put.
    r.denied("nobody", &["store", "tags"]);
    r.denied("nobody", &["import", raw, "--tag", "raw", "--put-only"]);

    // The flattener, put-only, into an empty store: it makes root 1 (a create) and
    // uploads; the second run (put-only from the environment) finds every chunk present
    // without reading one.
    let first = r.json(
        "flattener",
        &[
            "flatten",
            &source,
            "--tag",
            "app1",
            "--put-only",
            "--keep-image",
            kept.to_str().unwrap(),
        ],
    );
    let uploaded = first["stats"]["uploaded_chunks"].as_u64().unwrap();
    assert!(uploaded > 10, "{first}");
    let mut again = r.cmd(
        "flattener",
        &["--json", "flatten", &source, "--tag", "app1"],
    );
    let again = again.env("LODE_PUT_ONLY", "1").output().unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["stats"]["uploaded_chunks"], 0, "{again}");
    assert_eq!(again["stats"]["present_chunks"].as_u64(), Some(uploaded));
    let id = again["id"].as_str().unwrap().to_owned();
    let imported = r.json("flattener", &["import", raw, "--tag", "raw", "--put-only"]);
    assert_eq!(imported["stats"]["uploaded_chunks"], 3, "{imported}");

    // Without --put-only a publish reads an existing chunk back, which the flattener may
    // not: refused, naming the store and the chunk.
    let err = r.denied("flattener", &["import", raw, "--tag", "raw2"]);
    assert!(err.contains("get store/roots/1/chunks/"), "{err}");

    // The flattener's own GET of a chunk is refused, while the same keys read a root
    // record, which its policy allows: moto checks the resource, not only the key.
    let chunks = list(&r, "collector", "store/roots/1/chunks");
    assert_eq!(chunks.len() as u64, uploaded + 3);
    let e = get(&r, "flattener", &chunks[0]).unwrap_err();
    assert!(denied(&e), "{e}");
    assert!(get(&r, "flattener", "store/roots/1/ROOT").is_ok());
    let e = get(&r, "flattener", &format!("store/roots/1/manifests/{id}")).unwrap_err();
    assert!(denied(&e), "{e}");
    // ... and lode export with its keys fails naming the store and the object.
    let err = r.denied(
        "flattener",
        &["export", &id, r.h.path("x").to_str().unwrap()],
    );
    assert!(
        err.contains(&format!("get store/roots/1/manifests/{id}")),
        "{err}"
    );
    let err = r.denied(
        "flattener",
        &["export", "app1", r.h.path("x").to_str().unwrap()],
    );
    assert!(err.contains("get store/tags/app1"), "{err}");
    assert!(!r.h.path("x").exists());

    // A worker reads and verifies the image byte for byte, and writes nothing.
    let out = r.h.path("out.ext4");
    r.ok("worker", &["export", "app1", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&kept).unwrap());
    r.ok("worker", &["verify", "app1"]);
    let err = r.denied("worker", &["import", raw, "--tag", "w", "--put-only"]);
    assert!(err.contains("put store/roots/1/chunks/"), "{err}");
    r.denied("worker", &["rm", "app1"]);
    assert!(denied(
        &put(&r, "worker", "store/tags/app1", b"x").unwrap_err()
    ));
    assert!(denied(&delete(&r, "worker", &chunks[0]).unwrap_err()));
    assert_eq!(
        list(&r, "collector", "store/roots/1/chunks").len(),
        chunks.len()
    );

    // The control service owns control/, reads tags and manifests, and no chunk.
    put(&r, "control", "store/control/lease", b"worker-1").unwrap();
    assert_eq!(
        get(&r, "control", "store/control/lease").unwrap(),
        b"worker-1"
    );
    delete(&r, "control", "store/control/lease").unwrap();
    // The control role may not read working sets: inspect still shows the manifest and
    // says what it could not read.
    let seen = r.json("control", &["inspect", "app1"]);
    assert!(
        seen["device_size"].as_u64().is_some_and(|n| n > 0),
        "{seen}"
    );
    assert!(seen["working_set"].is_null(), "{seen}");
    assert!(
        seen["working_set_error"]
            .as_str()
            .is_some_and(|e| e.contains("reading the working set")),
        "{seen}"
    );
    assert!(denied(&get(&r, "control", &chunks[0]).unwrap_err()));
    assert!(denied(
        &put(&r, "control", "store/tags/app1", b"x").unwrap_err()
    ));
    assert!(denied(
        &put(&r, "worker", "store/control/lease", b"x").unwrap_err()
    ));

    // Only the collector collects: it rotates, copies app1 forward and deletes root 1,
    // after which the worker still reads app1 (from root 2).
    // (The flattener may create root 1 only, and on AWS only by a create; moto does not
    // evaluate that condition, so what is shown here is the resource: no other root.)
    assert!(denied(
        &put(&r, "flattener", "store/roots/2/ROOT", b"{}").unwrap_err()
    ));
    r.ok("collector", &["root", "rotate"]);
    r.denied("worker", &["gc", "--grace", "0s"]);
    r.denied("flattener", &["gc", "--grace", "0s"]);
    let report = r.json("collector", &["gc", "--grace", "0s"]);
    assert!(report["reclaimed_bytes"].as_u64().unwrap() > 0, "{report}");
    assert!(list(&r, "collector", "store/roots/1/chunks").is_empty());
    r.ok("worker", &["export", "app1", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&kept).unwrap());

    // The flattener publishes into root 2, which it did not create.
    let into2 = r.json("flattener", &["import", raw, "--tag", "raw", "--put-only"]);
    assert_eq!(into2["root"], 2, "{into2}");
}
