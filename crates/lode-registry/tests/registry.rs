//! Pulls from a real Debian `docker-registry` on 127.0.0.1, with images pushed by skopeo.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::{Registry, SourceImage, blob, build_layout, check_blobs, read_json, skopeo_copy};
use lode_registry::{Error, Platform, PullOptions, RegistryAuth, pull_to_layout};

const HTPASSWD_USER: &str = "alice";
const HTPASSWD_PASS: &str = "wonderland";

async fn pull(
    reference: &str,
    auth: &RegistryAuth,
    opts: &PullOptions,
    dir: &std::path::Path,
) -> Result<lode_registry::Pulled, Error> {
    pull_to_layout(reference, auth, opts, dir, &|_| {}).await
}

/// Source layout plus a registry it was pushed to under `test/img:v1` (OCI manifest),
/// `test/img:docker` (converted to Docker schema2 by skopeo) and `test/img:multi` (index).
fn pushed(registry: &Registry, creds: Option<&str>) -> (tempfile::TempDir, SourceImage) {
    let src = tempfile::tempdir().unwrap();
    let image = build_layout(src.path(), "v1");
    let mut extra = Vec::new();
    if let Some(c) = creds {
        extra.extend(["--dest-creds", c]);
    }
    let oci = |tag: &str| format!("oci:{}:{tag}", src.path().display());
    let dest = |tag: &str| format!("docker://{}/test/img:{tag}", registry.addr);
    skopeo_copy(&extra, &oci("v1"), &dest("v1"));
    if creds.is_none() {
        let mut v2s2 = extra.clone();
        v2s2.extend(["--format", "v2s2"]);
        skopeo_copy(&v2s2, &oci("v1"), &dest("docker"));
        let mut all = extra.clone();
        all.extend(["--multi-arch", "all"]);
        skopeo_copy(&all, &oci("multi"), &dest("multi"));
    }
    (src, image)
}

fn tag_entries(layout: &std::path::Path) -> Vec<(String, String, String)> {
    let index = read_json(&layout.join("index.json"));
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                m["digest"].as_str().unwrap().to_owned(),
                m["mediaType"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn pulls_tag_digest_docker_and_index() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let (src, image) = pushed(&registry, None);
    let auth = RegistryAuth::Anonymous;
    let opts = PullOptions::default();

    // By tag, OCI manifest: the layout names the tag and holds the very same bytes.
    let out = tempfile::tempdir().unwrap();
    let seen = AtomicU64::new(0);
    let reference = format!("docker://{}/test/img:v1", registry.addr);
    let pulled = pull_to_layout(&reference, &auth, &opts, out.path(), &|n| {
        seen.fetch_add(n, Ordering::Relaxed);
    })
    .await
    .unwrap();
    // Named with registry and repository, so another repository's `v1` is another entry.
    let v1 = format!("{}/test/img:v1", registry.addr);
    assert_eq!(pulled.tag_in_layout, v1);
    assert_eq!(pulled.manifest.digest.as_str(), image.manifest_digest);
    assert_eq!(pulled.config.digest.as_str(), image.config_digest);
    let layers: Vec<&str> = pulled.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, image.layer_digests);
    assert_eq!(
        tag_entries(out.path()),
        vec![(
            v1.clone(),
            image.manifest_digest.clone(),
            "application/vnd.oci.image.manifest.v1+json".to_owned()
        )]
    );
    assert_eq!(check_blobs(out.path()), 4, "manifest, config, two layers");
    for d in image
        .layer_digests
        .iter()
        .chain([&image.config_digest, &image.manifest_digest])
    {
        assert_eq!(blob(out.path(), d), blob(src.path(), d), "blob {d}");
    }
    let total: u64 = pulled.config.size + pulled.layers.iter().map(|l| l.size).sum::<u64>();
    assert_eq!(pulled.bytes_fetched, total);
    assert_eq!(seen.load(Ordering::Relaxed), total);
    assert_eq!(
        std::fs::read_to_string(out.path().join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );

    // Again into the same layout: every blob is already there and verified.
    let again = pull(&reference, &auth, &opts, out.path()).await.unwrap();
    assert_eq!(again.bytes_fetched, 0);
    assert_eq!(again.manifest, pulled.manifest);

    // A plain HOST/REPO@DIGEST reference: same image, named by repository and digest.
    let by_digest = tempfile::tempdir().unwrap();
    let reference = format!("{}/test/img@{}", registry.addr, image.manifest_digest);
    let p = pull(&reference, &auth, &opts, by_digest.path())
        .await
        .unwrap();
    let named = format!("{}/test/img@{}", registry.addr, image.manifest_digest);
    assert_eq!(p.tag_in_layout, named);
    assert_eq!(tag_entries(by_digest.path())[0].0, named);
    assert_eq!(check_blobs(by_digest.path()), 4);

    // Docker schema2 (skopeo converted it): manifest kept byte for byte under its real
    // digest, media types as the registry serves them, layer bytes unchanged.
    let docker = tempfile::tempdir().unwrap();
    let reference = format!("docker://{}/test/img:docker", registry.addr);
    let p = pull(&reference, &auth, &opts, docker.path()).await.unwrap();
    assert_eq!(
        p.manifest.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let manifest = blob(docker.path(), p.manifest.digest.as_str());
    assert_eq!(common::digest(&manifest), p.manifest.digest.as_str());
    assert_eq!(
        p.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    for (pulled_layer, src_digest) in p.layers.iter().zip(&image.layer_digests) {
        assert_eq!(pulled_layer.digest.as_str(), src_digest);
        assert_eq!(
            blob(docker.path(), src_digest),
            blob(src.path(), src_digest)
        );
    }
    assert_eq!(check_blobs(docker.path()), 4);

    // An image index: linux/amd64 by default, the arm64 manifest when asked.
    let multi = tempfile::tempdir().unwrap();
    let reference = format!("docker://{}/test/img:multi", registry.addr);
    let p = pull(&reference, &auth, &opts, multi.path()).await.unwrap();
    assert_eq!(p.manifest.digest.as_str(), image.manifest_digest);
    assert_eq!(
        p.index_digest.as_ref().map(|d| d.as_str()),
        Some(image.index_digest.as_str())
    );
    let arm = PullOptions {
        platform: Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: None,
        },
        tag: Some("multi-arm64".into()),
        ..PullOptions::default()
    };
    let p = pull(&reference, &auth, &arm, multi.path()).await.unwrap();
    assert_eq!(p.manifest.digest.as_str(), image.arm64_manifest_digest);
    assert_eq!(p.layers.len(), 1);
    let tags: Vec<String> = tag_entries(multi.path()).into_iter().map(|t| t.0).collect();
    assert_eq!(
        tags,
        [
            format!("{}/test/img:multi", registry.addr),
            "multi-arm64".into()
        ]
    );
    check_blobs(multi.path());
    let s390 = PullOptions {
        platform: Platform {
            os: "linux".into(),
            architecture: "s390x".into(),
            variant: None,
        },
        ..PullOptions::default()
    };
    let err = pull(&reference, &auth, &s390, multi.path())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "image index {} in registry {} repository test/img has no manifest for platform \
             linux/s390x (it has: linux/arm64/v8, linux/amd64)",
            image.index_digest, registry.addr
        )
    );

    // Unknown tag and unknown repository.
    let none = tempfile::tempdir().unwrap();
    let err = pull(
        &format!("docker://{}/test/img:nope", registry.addr),
        &auth,
        &opts,
        none.path(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "manifest nope unknown to registry {} in repository test/img",
            registry.addr
        )
    );
    let err = pull(
        &format!("docker://{}/no/such:v1", registry.addr),
        &auth,
        &opts,
        none.path(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::ManifestUnknown { .. }), "{err}");
    assert!(!none.path().join("index.json").exists());

    // The blob cap refuses before downloading anything.
    let capped = PullOptions {
        max_blob_bytes: 300,
        ..PullOptions::default()
    };
    let small = tempfile::tempdir().unwrap();
    let err = pull(
        &format!("docker://{}/test/img:v1", registry.addr),
        &auth,
        &capped,
        small.path(),
    )
    .await
    .unwrap_err();
    let Error::Oversized { digest, limit, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*limit, 300);
    assert_eq!(digest, &image.layer_digests[0]);
    assert!(!small.path().join("index.json").exists());
}

#[tokio::test]
async fn basic_auth_htpasswd() {
    let Some(htpasswd_bin) = lode_testkit::tool_from("htpasswd", "apache2-utils") else {
        return;
    };
    let htpasswd_dir = tempfile::tempdir().unwrap();
    let htpasswd = htpasswd_dir.path().join("htpasswd");
    let status = std::process::Command::new(htpasswd_bin)
        .args(["-Bbc"])
        .arg(&htpasswd)
        .args([HTPASSWD_USER, HTPASSWD_PASS])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let auth_yaml = format!(
        "  htpasswd:\n    realm: lode-test\n    path: {}\n",
        htpasswd.display()
    );
    let Some(registry) = Registry::start(Some(&auth_yaml)) else {
        return;
    };
    let (src, image) = pushed(&registry, Some(&format!("{HTPASSWD_USER}:{HTPASSWD_PASS}")));
    let reference = format!("docker://{}/test/img:v1", registry.addr);
    let opts = PullOptions::default();

    let good = RegistryAuth::Basic {
        username: HTPASSWD_USER.into(),
        password: HTPASSWD_PASS.into(),
    };
    let out = tempfile::tempdir().unwrap();
    let p = pull(&reference, &good, &opts, out.path()).await.unwrap();
    assert_eq!(p.manifest.digest.as_str(), image.manifest_digest);
    for d in &image.layer_digests {
        assert_eq!(blob(out.path(), d), blob(src.path(), d));
    }

    let wrong = RegistryAuth::Basic {
        username: HTPASSWD_USER.into(),
        password: "not-it".into(),
    };
    let denied = tempfile::tempdir().unwrap();
    let err = pull(&reference, &wrong, &opts, denied.path())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "registry {} refused access to repository test/img (401 Unauthorized) with basic \
             credentials for user \"alice\"",
            registry.addr
        )),
        "{msg}"
    );
    assert!(!msg.contains("not-it"), "password leaked: {msg}");

    let err = pull(&reference, &RegistryAuth::Anonymous, &opts, denied.path())
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "registry {} refused access to repository test/img (401 Unauthorized) with \
             anonymous access",
            registry.addr
        )),
        "{err}"
    );
    assert!(!denied.path().join("index.json").exists());
}

/// Two repositories with a tag of the same name and different images, pulled concurrently
/// into one layout again and again: each pull gets its own repository's image, the layout
/// names both, and nothing half-written is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_tag_in_two_repositories_never_crosses() {
    let Some(registry) = Registry::start(None) else {
        return;
    };
    let mut want = Vec::new();
    let sources: Vec<tempfile::TempDir> = ["team-a", "team-b"]
        .iter()
        .map(|team| {
            let src = tempfile::tempdir().unwrap();
            let image =
                common::build_layout_with(src.path(), "latest", format!("{team}\n").as_bytes());
            skopeo_copy(
                &[],
                &format!("oci:{}:latest", src.path().display()),
                &format!("docker://{}/{team}/app:latest", registry.addr),
            );
            want.push(image.manifest_digest);
            src
        })
        .collect();
    assert_ne!(want[0], want[1]);
    let out = tempfile::tempdir().unwrap();
    for _round in 0..8 {
        let pulls = ["team-a", "team-b"].map(|team| {
            let reference = format!("docker://{}/{team}/app:latest", registry.addr);
            let dir = out.path().to_owned();
            tokio::spawn(async move {
                pull_to_layout(
                    &reference,
                    &RegistryAuth::Anonymous,
                    &PullOptions::default(),
                    &dir,
                    &|_| {},
                )
                .await
            })
        });
        let [a, b] = pulls;
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_eq!(a.manifest.digest.as_str(), want[0]);
        assert_eq!(b.manifest.digest.as_str(), want[1]);
        assert_ne!(a.config.digest, b.config.digest);
    }
    let mut entries = tag_entries(out.path());
    entries.sort();
    let names: Vec<(String, String)> = entries.into_iter().map(|(n, d, _)| (n, d)).collect();
    assert_eq!(
        names,
        vec![
            (
                format!("{}/team-a/app:latest", registry.addr),
                want[0].clone()
            ),
            (
                format!("{}/team-b/app:latest", registry.addr),
                want[1].clone()
            ),
        ]
    );
    check_blobs(out.path());
    drop(sources);
}
