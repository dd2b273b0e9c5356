//! The `Kms` conformance suite, run against the local keyring and against AWS KMS as
//! spoken by a real moto server on 127.0.0.1: a secret round-trips under its context and
//! no other; AWS KMS refuses a data key used for another manifest, names an unknown key,
//! and an unreachable endpoint is an error naming it and the key, not a hang.

use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kms::config::Credentials;
use lode_format::{RootId, Secret32};
use lode_kms::{AwsKms, Context, Keyring, Kms, KmsError};
use lode_testkit::Moto;

/// A guard against a hang, far beyond the KMS client's own bounds: a call that has not
/// returned by then is a failure, whatever it was doing.
const HANG: Duration = Duration::from_secs(180);

fn sdk_config(endpoint: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_kms::config::SharedCredentialsProvider::new(
            Credentials::new("lode-test", "lode-test-secret", None, None, "test"),
        ))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build()
}

/// Makes a symmetric key in moto's KMS; returns its ARN.
async fn create_key(config: &SdkConfig) -> String {
    let out = aws_sdk_kms::Client::new(config)
        .create_key()
        .description("lode test key")
        .send()
        .await
        .expect("CreateKey");
    out.key_metadata()
        .expect("key metadata")
        .arn()
        .expect("key ARN")
        .to_owned()
}

async fn moto_kms() -> Option<(Moto, AwsKms, String)> {
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap()?;
    let config = sdk_config(&moto.endpoint());
    let arn = create_key(&config).await;
    let kms = AwsKms::with_config(&arn, config).unwrap();
    Some((moto, kms, arn))
}

/// What every `Kms` must do.
async fn conformance(kms: &dyn Kms) {
    let key_id = kms.default_key_id();
    let a = Context::manifest(RootId(1), &[0xaa; 32]);
    let b = Context::manifest(RootId(1), &[0xbb; 32]);

    // A data key unwraps under its own context, and under no other.
    let (key, wrapped) = kms.generate_data_key(&key_id, &a).await.unwrap();
    assert_eq!(kms.unwrap(&wrapped, &a).await.unwrap(), key);
    for other in [
        b.clone(),
        Context::manifest(RootId(2), &[0xaa; 32]),
        Context::root_salt(RootId(1)),
    ] {
        let err = kms.unwrap(&wrapped, &other).await.unwrap_err();
        assert!(matches!(err, KmsError::Unwrap { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot unwrap with KMS key {:?} of {}: the wrapped key does not unwrap under \
                 this key and context ({other}); it is corrupt, or was made under another \
                 key or for something else",
                wrapped.key_id,
                kms.describe()
            )
        );
    }
    // Two data keys are different keys.
    let (key2, _) = kms.generate_data_key(&key_id, &a).await.unwrap();
    assert_ne!(key, key2);

    // An existing secret (a root salt) wraps and unwraps the same way.
    let salt = Secret32::from_bytes([0x5a; 32]);
    let ctx = Context::root_salt(RootId(3));
    let w = kms.wrap(&key_id, &salt, &ctx).await.unwrap();
    assert_eq!(kms.unwrap(&w, &ctx).await.unwrap(), salt);
    assert!(
        kms.unwrap(&w, &Context::root_salt(RootId(4)))
            .await
            .is_err()
    );

    // A damaged blob does not unwrap.
    let mut bad = w.clone();
    let last = bad.blob.len() - 1;
    bad.blob[last] ^= 1;
    assert!(kms.unwrap(&bad, &ctx).await.is_err());
}

#[tokio::test]
async fn the_keyring_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let k = Keyring::open_or_create(dir.path().join("keyring.json")).unwrap();
    conformance(&k).await;
}

#[tokio::test]
async fn aws_kms_conforms() {
    let Some((_moto, kms, arn)) = moto_kms().await else {
        return;
    };
    tokio::time::timeout(HANG, conformance(&kms))
        .await
        .expect("the KMS calls returned");
    // The wrapped key names the key by the ARN AWS KMS reports.
    let (_, wrapped) = kms
        .generate_data_key(&arn, &Context::root_salt(RootId(1)))
        .await
        .unwrap();
    assert_eq!(wrapped.key_id, arn);
    assert!(kms.describe().starts_with("AWS KMS at http://127.0.0.1:"));
}

#[tokio::test]
async fn an_unknown_aws_key_is_named() {
    let Some((_moto, kms, _)) = moto_kms().await else {
        return;
    };
    let missing = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000";
    let err = tokio::time::timeout(
        HANG,
        kms.generate_data_key(missing, &Context::root_salt(RootId(1))),
    )
    .await
    .expect("the KMS call returned")
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("KMS key {missing:?} is not in {}", kms.describe())
    );
}

#[tokio::test]
async fn an_unreachable_kms_is_named_with_the_key_and_does_not_hang() {
    // A port that was just free and has no listener: every connect is refused.
    let port = lode_testkit::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let kms = AwsKms::with_config("alias/lode", sdk_config(&endpoint)).unwrap();
    let err = tokio::time::timeout(
        HANG,
        kms.generate_data_key("alias/lode", &Context::root_salt(RootId(1))),
    )
    .await
    .expect("an unreachable KMS is an error, not a hang")
    .unwrap_err();
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "AWS KMS at {endpoint} (region us-east-1) is unreachable for KMS key \"alias/lode\": "
        )),
        "{msg}"
    );
    assert!(msg.contains("Connection refused"), "{msg}");
    assert!(msg.ends_with("(tried up to 3 times)"), "{msg}");
}

#[test]
fn aws_specs_open_and_bad_ones_are_named() {
    let kms = lode_kms::open("aws:alias/lode-images").unwrap();
    assert_eq!(kms.default_key_id(), "alias/lode-images");
    let err = lode_kms::open("aws:").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("KMS \"aws:\" is not supported: an AWS KMS key id"),
        "{err}"
    );
    // An AWS spec is never taken for a missing keyring file.
    assert!(lode_kms::open_existing("aws:alias/lode-images").is_ok());
    let err = lode_kms::open("gcp://x").unwrap_err();
    assert!(err.to_string().contains("aws:KEY_ID_OR_ARN"), "{err}");
}

#[tokio::test]
async fn a_kms_that_accepts_and_never_answers_times_out() {
    // The kernel completes the TCP handshake for a listener nobody accepts from, so
    // each request is sent and never answered: only the client's timeouts end it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let kms = AwsKms::with_config("alias/lode", sdk_config(&endpoint)).unwrap();
    let err = tokio::time::timeout(
        HANG,
        kms.unwrap(
            &lode_format::WrappedKey {
                key_id: "alias/lode".into(),
                blob: vec![1; 100],
            },
            &Context::root_salt(RootId(1)),
        ),
    )
    .await
    .expect("a silent KMS is an error, not a hang")
    .unwrap_err();
    assert!(matches!(err, KmsError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "AWS KMS at {endpoint} (region us-east-1) is unreachable for KMS key \"alias/lode\""
        )),
        "{err}"
    );
    drop(silent);
}
