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

/// A fake registry serving `test/img:v1` as `manifest`; blob requests are counted and
/// answered by `blob`.
fn counting_registry(
    manifest: Vec<u8>,
    blob: impl Fn(&str) -> Reply + Send + 'static,
) -> (FakeServer, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let blob_requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = blob_requests.clone();
    let server = FakeServer::start(move |req| {
        let path = req.target.split('?').next().unwrap_or_default();
        if path == "/v2/" {
            return Reply::new(200, "{}");
        }
        if path.starts_with("/v2/test/img/manifests/") {
            return Reply::new(200, manifest.clone()).header("Content-Type", OCI_MANIFEST);
        }
        if let Some(d) = path.strip_prefix("/v2/test/img/blobs/") {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return blob(d);
        }
        Reply::new(404, r#"{"errors":[{"code":"NOT_FOUND","message":"no"}]}"#)
    });
    (server, blob_requests)
}

fn image_manifest(config_size: u64, layers: &[(String, u64)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(b"config"), "size": config_size},
        "layers": layers.iter().map(|(d, size)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": size,
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

async fn pull_fails(server: &FakeServer, opts: &PullOptions, out: &std::path::Path) -> Error {
    pull_to_layout(
        &format!("docker://{}/test/img:v1", server.addr),
        &RegistryAuth::Anonymous,
        opts,
        out,
        &|_| {},
    )
    .await
    .unwrap_err()
}

#[tokio::test]
async fn thousand_layers_are_refused_before_any_blob_is_fetched() {
    let layers: Vec<(String, u64)> = (0..1000u32)
        .map(|i| (digest(&i.to_le_bytes()), 100))
        .collect();
    let manifest = image_manifest(6, &layers);
    let manifest_digest = digest(&manifest);
    let (server, blob_requests) = counting_registry(manifest, |_| Reply::new(200, vec![0u8; 100]));
    let out = tempfile::tempdir().unwrap();
    let err = pull_fails(&server, &PullOptions::default(), out.path()).await;
    assert_eq!(
        err.to_string(),
        format!(
            "manifest {manifest_digest} from registry {} in repository test/img lists 1000 \
             layers, over the cap of 256; nothing was downloaded",
            server.addr
        )
    );
    assert_eq!(blob_requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Not even the layout was created.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn huge_declared_sizes_are_refused_before_any_blob_is_fetched() {
    let out = tempfile::tempdir().unwrap();
    // One layer declaring 2^60 bytes: over the per-blob cap.
    let huge = digest(b"huge");
    let (server, blob_requests) =
        counting_registry(image_manifest(6, &[(huge.clone(), 1 << 60)]), |_| {
            Reply::new(200, vec![0u8; 100])
        });
    let err = pull_fails(&server, &PullOptions::default(), out.path()).await;
    assert_eq!(
        err.to_string(),
        format!(
            "blob {huge} from registry {} in repository test/img is too large: {} bytes, \
             limit {}",
            server.addr,
            1u64 << 60,
            32u64 << 30
        )
    );
    assert_eq!(blob_requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(server);

    // Three layers each under the per-blob cap, over the image cap together.
    let layers: Vec<(String, u64)> = (0..3u8).map(|i| (digest(&[i]), 30 << 30)).collect();
    let manifest = image_manifest(6, &layers);
    let manifest_digest = digest(&manifest);
    let (server, blob_requests) = counting_registry(manifest, |_| Reply::new(200, vec![0; 9]));
    let err = pull_fails(&server, &PullOptions::default(), out.path()).await;
    assert_eq!(
        err.to_string(),
        format!(
            "manifest {manifest_digest} from registry {} in repository test/img declares {} \
             bytes of config and layers, over the cap of {}; nothing was downloaded",
            server.addr,
            (90u64 << 30) + 6,
            64u64 << 30
        )
    );
    assert_eq!(blob_requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(server);

    // A config over its cap.
    let (server, blob_requests) = counting_registry(image_manifest(17 << 20, &[]), |_| {
        Reply::new(200, vec![0u8; 9])
    });
    let err = pull_fails(&server, &PullOptions::default(), out.path()).await;
    assert!(
        err.to_string().starts_with(&format!(
            "blob {} from registry {} in repository test/img is too large: {} bytes, limit {}",
            digest(b"config"),
            server.addr,
            17u64 << 20,
            16u64 << 20
        )),
        "{err}"
    );
    assert_eq!(blob_requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_dripping_blob_fails_within_the_rate_window_naming_it() {
    // The layer comes one byte every 200 ms (5 bytes/s); the bound asks 100 bytes/s over
    // 1 s windows, so the first window ends the pull instead of the drip holding it.
    let (server, _, layer_digest) =
        lying_registry(|layer| Reply::new(200, layer.to_vec()).drip(Duration::from_millis(200)));
    let out = tempfile::tempdir().unwrap();
    let opts = PullOptions {
        min_rate: 100,
        rate_window: Duration::from_secs(1),
        ..PullOptions::default()
    };
    let err = pull_fails(&server, &opts, out.path()).await;
    let Error::TooSlow {
        digest,
        received,
        window_bytes,
        rate,
        size,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(digest, &layer_digest);
    assert!(*received < *size, "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "blob {layer_digest} from registry {} in repository test/img is too slow: \
             {window_bytes} bytes in the last 1 s ({rate} bytes/s), under the minimum of 100 \
             bytes/s; {received} of {size} bytes received",
            server.addr
        )
    );
    only_verified_blobs(out.path(), &layer_digest);
}

#[tokio::test]
async fn a_dripping_manifest_fails_by_its_deadline() {
    let manifest = image_manifest(6, &[]);
    let server = FakeServer::start(move |req| {
        let path = req.target.split('?').next().unwrap_or_default();
        if path == "/v2/" {
            return Reply::new(200, "{}");
        }
        Reply::new(200, manifest.clone())
            .header("Content-Type", OCI_MANIFEST)
            .drip(Duration::from_millis(100))
    });
    let out = tempfile::tempdir().unwrap();
    // Deadline: one 1 s window plus 4 MiB at 4 MiB/s.
    let opts = PullOptions {
        min_rate: 4 << 20,
        rate_window: Duration::from_secs(1),
        ..PullOptions::default()
    };
    let err = pull_fails(&server, &opts, out.path()).await;
    assert_eq!(
        err.to_string(),
        format!(
            "registry {}, repository test/img: manifest v1 did not complete within 2 s",
            server.addr
        )
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

fn index_of(child: &str, size: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                       "digest": child, "size": size,
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    }))
    .unwrap()
}

/// Indexes that lead to indexes: one whose entry is "itself" (a registry answering the
/// child's digest with the index again: content addressing makes a true loop impossible)
/// and one leading to a second, honest index.
#[tokio::test]
async fn an_index_leading_to_itself_or_another_index_is_refused() {
    let inner = index_of(&format!("sha256:{}", "2".repeat(64)), 10);
    let inner_digest = digest(&inner);
    let top = index_of(&inner_digest, inner.len());
    let self_child = format!("sha256:{}", "1".repeat(64));
    let looping = index_of(&self_child, 10);
    let looping_digest = digest(&looping);
    let blob_requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = blob_requests.clone();
    let inner_path = format!("/v2/test/img/manifests/{inner_digest}");
    let server = FakeServer::start(move |req| {
        let path = req.target.split('?').next().unwrap_or_default();
        if path.contains("/blobs/") {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let reply = |body: &Vec<u8>| {
            Reply::new(200, body.clone())
                .header("Content-Type", "application/vnd.oci.image.index.v1+json")
        };
        match path {
            "/v2/" => Reply::new(200, "{}"),
            "/v2/test/img/manifests/nested" => reply(&top),
            p if p == inner_path => reply(&inner),
            _ => reply(&looping),
        }
    });
    let out = tempfile::tempdir().unwrap();
    let pull = |tag: &'static str| {
        let reference = format!("docker://{}/test/img:{tag}", server.addr);
        let out = out.path().to_owned();
        async move {
            pull_to_layout(
                &reference,
                &RegistryAuth::Anonymous,
                &PullOptions::default(),
                &out,
                &|_| {},
            )
            .await
            .unwrap_err()
        }
    };
    assert_eq!(
        pull("self").await.to_string(),
        format!(
            "digest mismatch from registry {} in repository test/img: expected {self_child}, \
             received bytes hash to {looping_digest}",
            server.addr
        )
    );
    assert_eq!(
        pull("nested").await.to_string(),
        format!(
            "malformed manifest {inner_digest} from registry {} in repository test/img: an \
             image index where an image manifest was expected",
            server.addr
        )
    );
    assert_eq!(blob_requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

/// A manifest over the 4 MiB cap is refused, whether its size is declared up front or only
/// found while reading; nothing more than the cap is read into memory.
#[tokio::test]
async fn an_oversized_manifest_is_refused_while_it_is_read() {
    // Valid JSON all the way, so only the size can refuse it.
    let mut huge = br#"{"schemaVersion":2,"annotations":{"x":""#.to_vec();
    huge.resize(5 << 20, b'a');
    huge.extend_from_slice(br#""}}"#);
    let cap = 4u64 << 20;
    for declared in [true, false] {
        let body = huge.clone();
        let server = FakeServer::start(move |req| {
            let path = req.target.split('?').next().unwrap_or_default();
            if path == "/v2/" {
                return Reply::new(200, "{}");
            }
            assert!(!path.contains("/blobs/"), "a blob was requested");
            let reply = Reply::new(200, body.clone()).header("Content-Type", OCI_MANIFEST);
            if declared {
                reply
            } else {
                reply.without_length()
            }
        });
        let out = tempfile::tempdir().unwrap();
        let err = pull_fails(&server, &PullOptions::default(), out.path()).await;
        let Error::Oversized {
            digest,
            size,
            limit,
            ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!((digest.as_str(), *limit), ("v1", cap), "{err}");
        assert!(*size > cap, "{err}");
        if declared {
            assert_eq!(*size, huge.len() as u64);
        }
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }
}

/// An error response with a huge body is reported with a few KiB of it, not read whole.
#[tokio::test]
async fn a_huge_error_body_is_cut_short() {
    let layer = digest(b"layer");
    let (server, _) = counting_registry(image_manifest(6, &[(layer.clone(), 5)]), |d| {
        if d == digest(b"config") {
            Reply::new(200, b"config".to_vec())
        } else {
            Reply::new(500, vec![b'e'; 8 << 20])
        }
    });
    let out = tempfile::tempdir().unwrap();
    let err = pull_fails(&server, &PullOptions::default(), out.path()).await;
    let msg = err.to_string();
    let head = format!(
        "registry {}, repository test/img, blob {layer}: HTTP 500 Internal Server Error: eee",
        server.addr
    );
    assert!(msg.starts_with(&head), "{}", &msg[..msg.len().min(300)]);
    assert!(
        msg.len() < head.len() + 4096,
        "{} bytes of message",
        msg.len()
    );
}
