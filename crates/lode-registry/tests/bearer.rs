//! The bearer-token flow against a real `docker-registry` configured with `auth: token:`,
//! and a token server written here: it checks basic credentials and signs ES256 JWTs with a
//! key whose self-signed certificate (made by openssl) is the registry's root bundle.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::{FakeServer, Registry, Reply, blob, build_layout, skopeo_copy};
use lode_registry::{Error, PullOptions, RegistryAuth, pull_to_layout};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::json;

const SERVICE: &str = "lode-test-registry";
const ISSUER: &str = "lode-test-issuer";
const USER: &str = "bob";
const PASS: &str = "builder";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Key (PKCS#8 DER) and certificate (DER), with `cert.pem` written for the registry.
fn make_key(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "key.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-x509",
            "-key",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=lode-test-token",
        ],
    );
    openssl(
        dir,
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.p8",
        ],
    );
    openssl(
        dir,
        &[
            "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der",
        ],
    );
    (
        std::fs::read(dir.join("key.p8")).unwrap(),
        std::fs::read(dir.join("cert.der")).unwrap(),
    )
}

/// Parses `scope=repository:NAME:a,b` parameters out of a query string.
fn scopes(query: &str) -> Vec<serde_json::Value> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("scope="))
        .filter_map(|s| {
            let s = s.replace("%3A", ":").replace("%3a", ":").replace("%2F", "/").replace("%2f", "/").replace("%2C", ",").replace("%2c", ",");
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect()
}

fn token_server(key: EcdsaKeyPair, cert_der: Vec<u8>) -> FakeServer {
    let key = Arc::new(key);
    let want = format!("Basic {}", STANDARD.encode(format!("{USER}:{PASS}")));
    FakeServer::start(move |req| {
        if req.header("authorization") != Some(want.as_str()) {
            return Reply::new(401, r#"{"details":"bad credentials"}"#);
        }
        let query = req.target.split_once('?').map_or("", |(_, q)| q);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&cert_der)]});
        let claims = json!({
            "iss": ISSUER, "sub": USER, "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now - 10,
            "jti": format!("{now}-{}", query.len()),
            "access": scopes(query),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = key
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .unwrap();
        let jwt = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Reply::new(200, json!({"token": jwt, "expires_in": 300}).to_string())
            .header("Content-Type", "application/json")
    })
}

#[tokio::test]
async fn bearer_token_flow() {
    if lode_testkit::tool_from("openssl", "openssl").is_none() || common::registry_bin().is_none() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (pkcs8, cert_der) = make_key(keys.path());
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &pkcs8,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let tokens = token_server(key, cert_der);
    let auth_yaml = format!(
        "  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    \
         rootcertbundle: {}\n",
        tokens.addr,
        keys.path().join("cert.pem").display()
    );
    let Some(registry) = Registry::start(Some(&auth_yaml)) else {
        return;
    };

    let src = tempfile::tempdir().unwrap();
    let image = build_layout(src.path(), "v1");
    skopeo_copy(
        &["--dest-creds", &format!("{USER}:{PASS}")],
        &format!("oci:{}:v1", src.path().display()),
        &format!("docker://{}/test/img:v1", registry.addr),
    );

    let reference = format!("docker://{}/test/img:v1", registry.addr);
    let opts = PullOptions::default();
    let good = RegistryAuth::Basic {
        username: USER.into(),
        password: PASS.into(),
    };
    let out = tempfile::tempdir().unwrap();
    let p = pull_to_layout(&reference, &good, &opts, out.path(), &|_| {})
        .await
        .unwrap();
    assert_eq!(p.manifest.digest.as_str(), image.manifest_digest);
    for d in &image.layer_digests {
        assert_eq!(blob(out.path(), d), blob(src.path(), d));
    }
    common::check_blobs(out.path());

    // Wrong password: the token endpoint refuses, and the error says so and with what.
    let wrong = RegistryAuth::Basic {
        username: USER.into(),
        password: "nope".into(),
    };
    let denied = tempfile::tempdir().unwrap();
    let err = pull_to_layout(&reference, &wrong, &opts, denied.path(), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "registry {} refused access to repository test/img (token endpoint) with basic \
             credentials for user \"bob\"",
            registry.addr
        )),
        "{err}"
    );

    // A bogus bearer token handed in directly: the registry itself says 401.
    let bogus = RegistryAuth::Bearer {
        token: "not.a.token".into(),
    };
    let err = pull_to_layout(&reference, &bogus, &opts, denied.path(), &|_| {})
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "registry {} refused access to repository test/img (401 Unauthorized) with a \
             bearer token",
            registry.addr
        )),
        "{err}"
    );
    assert!(!denied.path().join("index.json").exists());
}
