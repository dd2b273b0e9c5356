//! Faults a real registry does not commit: a tiny HTTP server on 127.0.0.1 that lies about
//! blobs and manifests, an unreachable port, and a plain-HTTP request to a remote host.

mod common;

use std::time::{Duration, Instant};

use common::{FakeServer, Reply, digest};
use lode_registry::{Error, PullOptions, RegistryAuth, pull_to_layout};
use serde_json::json;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry serving `test/img:v1` whose layer blob is answered by `layer_reply`.
fn lying_registry(
    layer_reply: impl Fn(&[u8]) -> Reply + Send + 'static,
) -> (FakeServer, String, String) {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let layer = common::layer(&[("f", b"the real layer")]).gz;
    let config_digest = digest(&config);
    let layer_digest = digest(&layer);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = digest(&manifest);
    let (cd, ld, md) = (
        config_digest.clone(),
        layer_digest.clone(),
        manifest_digest.clone(),
    );
    let server = FakeServer::start(move |req| {
        let path = req.target.split('?').next().unwrap_or_default();
        if path == "/v2/" {
            return Reply::new(200, "{}");
        }
        // Any tag or digest gets the one manifest, as a lying registry would answer.
        if path.starts_with("/v2/test/img/manifests/") {
            return Reply::new(200, manifest.clone())
                .header("Content-Type", OCI_MANIFEST)
                .header("Docker-Content-Digest", &md);
        }
        if path == format!("/v2/test/img/blobs/{cd}") {
            return Reply::new(200, config.clone());
        }
        if path == format!("/v2/test/img/blobs/{ld}") {
            return layer_reply(&layer);
        }
        Reply::new(404, r#"{"errors":[{"code":"NOT_FOUND","message":"no"}]}"#)
    });
    (server, manifest_digest, layer_digest)
}

fn only_verified_blobs(layout: &std::path::Path, absent: &str) {
    common::check_blobs(layout);
    assert!(
        !layout
            .join("blobs/sha256")
            .join(absent.trim_start_matches("sha256:"))
            .exists(),
        "{absent} stored"
    );
    assert!(!layout.join("index.json").exists());
}

#[tokio::test]
async fn layer_with_wrong_bytes_is_a_digest_mismatch() {
    let (server, _, layer_digest) = lying_registry(|layer| {
        let mut bad = layer.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        Reply::new(200, bad)
    });
    let out = tempfile::tempdir().unwrap();
    let reference = format!("docker://{}/test/img:v1", server.addr);
    let err = pull_to_layout(
        &reference,
        &RegistryAuth::Anonymous,
        &PullOptions::default(),
        out.path(),
        &|_| {},
    )
    .await
    .unwrap_err();
    let Error::DigestMismatch {
        expected, actual, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(expected, &layer_digest);
    assert_eq!(
        err.to_string(),
        format!(
            "digest mismatch from registry {} in repository test/img: expected {layer_digest}, \
             received bytes hash to {actual}",
            server.addr
        )
    );
    only_verified_blobs(out.path(), &layer_digest);
}

#[tokio::test]
async fn layer_longer_than_its_descriptor_is_refused() {
    let (server, _, layer_digest) = lying_registry(|layer| {
        let mut long = layer.to_vec();
        long.extend_from_slice(&[0; 4096]);
        Reply::new(200, long)
    });
    let out = tempfile::tempdir().unwrap();
    let reference = format!("docker://{}/test/img:v1", server.addr);
    let err = pull_to_layout(
        &reference,
        &RegistryAuth::Anonymous,
        &PullOptions::default(),
        out.path(),
        &|_| {},
    )
    .await
    .unwrap_err();
    let Error::Oversized { digest, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(digest, &layer_digest);
    only_verified_blobs(out.path(), &layer_digest);
}

#[tokio::test]
async fn manifest_not_matching_the_asked_digest_is_refused() {
    let (server, _, _) = lying_registry(|layer| Reply::new(200, layer.to_vec()));
    let out = tempfile::tempdir().unwrap();
    let asked = format!("sha256:{}", "0".repeat(64));
    let reference = format!("docker://{}/test/img@{asked}", server.addr);
    let err = pull_to_layout(
        &reference,
        &RegistryAuth::Anonymous,
        &PullOptions::default(),
        out.path(),
        &|_| {},
    )
    .await
    .unwrap_err();
    let Error::DigestMismatch { expected, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(expected, &asked);
    assert!(!out.path().join("index.json").exists());
}

#[tokio::test]
async fn honest_fake_registry_pulls() {
    // The same fake with honest blobs succeeds: the failures above are the lies, not the fake.
    let (server, manifest_digest, layer_digest) =
        lying_registry(|layer| Reply::new(200, layer.to_vec()));
    let out = tempfile::tempdir().unwrap();
    let p = pull_to_layout(
        &format!("{}/test/img:v1", server.addr),
        &RegistryAuth::Anonymous,
        &PullOptions::default(),
        out.path(),
        &|_| {},
    )
    .await
    .unwrap();
    assert_eq!(p.manifest.digest.as_str(), manifest_digest);
    assert_eq!(p.layers[0].digest.as_str(), layer_digest);
    assert_eq!(common::check_blobs(out.path()), 3);
}

#[tokio::test]
async fn unreachable_registry_fails_fast() {
    let out = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = pull_to_layout(
        "docker://127.0.0.1:1/test/img:v1",
        &RegistryAuth::Anonymous,
        &PullOptions::default(),
        out.path(),
        &|_| {},
    )
    .await
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    let msg = err.to_string();
    assert!(
        msg.starts_with("registry 127.0.0.1:1 unreachable: "),
        "{msg}"
    );
    assert!(msg.contains("onnection refused"), "{msg}");
    assert!(!out.path().join("index.json").exists());
}

#[tokio::test]
async fn plain_http_to_a_remote_host_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let err = pull_to_layout(
        "http://registry.example.com:5000/test/img:v1",
        &RegistryAuth::Anonymous,
        &PullOptions::default(),
        out.path(),
        &|_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "refusing plain HTTP to registry registry.example.com:5000: it is not a loopback host \
         and not listed in the insecure registries"
    );
    // Nothing was created: the refusal comes before any I/O.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn loopback_https_only_when_plain_http_is_off() {
    // With plain HTTP off, a loopback registry is spoken to over TLS, which the fake (plain
    // HTTP) cannot answer: the pull fails instead of silently downgrading.
    let (server, _, _) = lying_registry(|layer| Reply::new(200, layer.to_vec()));
    let out = tempfile::tempdir().unwrap();
    let opts = PullOptions {
        insecure_loopback_http: false,
        connect_timeout: Duration::from_secs(3),
        read_timeout: Duration::from_secs(3),
        ..PullOptions::default()
    };
    let err = pull_to_layout(
        &format!("docker://{}/test/img:v1", server.addr),
        &RegistryAuth::Anonymous,
        &opts,
        out.path(),
        &|_| {},
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("registry {} unreachable", server.addr)),
        "{err}"
    );
}
