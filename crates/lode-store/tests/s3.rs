//! The conformance suite against a real S3-protocol server: s3s-fs, in this process on
//! 127.0.0.1 (lode-testkit's `S3Fs`), checking SigV4 signatures. lode finds the server through the AWS environment
//! variables, which are process-global, so this binary holds a single test that sets them
//! before it starts any other thread.

mod common;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::{DirBackdoor, MAX_CHUNK, conformance};
use lode_format::{ChunkName, RootId};
use lode_store::{PutOutcome, Store, StoreError};
use lode_testkit::{S3_ACCESS_KEY, S3_REGION, S3Fs, set_aws_env};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};

const BUCKET: &str = "lode-test";

#[test]
fn s3s_fs_backend() {
    let mut s3 = S3Fs::bind(BUCKET);
    let endpoint = s3.endpoint().to_owned();

    // SAFETY: this is the only test in this binary, and neither the server's runtime nor
    // ours has started yet, so no other thread of ours exists to read the environment
    // while it changes.
    unsafe { set_aws_env(s3.env()) };
    s3.serve();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let store = Store::open(&format!("s3://{BUCKET}/some/prefix")).unwrap();
        assert_eq!(store.label(), "s3://lode-test/some/prefix");
        let raw = DirBackdoor {
            dir: s3.bucket_dir().join("some/prefix"),
            // s3s-fs checks If-None-Match and then writes: two racing creates can both win.
            atomic_create: false,
        };
        conformance(&store, "some/prefix/", Some(&raw)).await;
        eprintln!("s3s-fs conformance: {:?}", started.elapsed());

        prefixes_are_separate_stores().await;
        if_none_match_is_honoured(&endpoint).await;
        racing_creates(&store).await;
        racing_first_roots().await;
        checksums_are_sent_and_checked(&endpoint).await;
        bad_credentials_fail_naming_store_and_object(&endpoint).await;
    });
    rt.shutdown_background();
}

/// A store under one prefix sees nothing of another's, nor of the bucket's top.
async fn prefixes_are_separate_stores() {
    for spec in [
        "s3://lode-test/other/prefix",
        "s3://lode-test",
        "s3://lode-test/some",
    ] {
        let s = Store::open(spec).unwrap();
        assert_eq!(s.roots().await.unwrap(), vec![], "{spec}");
        assert_eq!(s.list_tags().await.unwrap().tags, vec![], "{spec}");
        assert_eq!(s.list_chunks(RootId(1)).await.unwrap(), vec![], "{spec}");
    }
}

fn raw_client() -> Arc<dyn ObjectStore> {
    // The same configuration lode builds from the environment.
    Arc::new(
        AmazonS3Builder::from_env()
            .with_bucket_name(BUCKET)
            .with_allow_http(true)
            .build()
            .unwrap(),
    )
}

/// lode's never-overwrite rests on PutMode::Create (If-None-Match: *): s3s-fs answers an
/// existing key with 412, which object_store reports as AlreadyExists.
async fn if_none_match_is_honoured(endpoint: &str) {
    let os = raw_client();
    let p = Path::from("probe/if-none-match");
    os.put_opts(
        &p,
        PutPayload::from_static(b"first"),
        PutMode::Create.into(),
    )
    .await
    .unwrap();
    let e = os
        .put_opts(
            &p,
            PutPayload::from_static(b"second"),
            PutMode::Create.into(),
        )
        .await
        .unwrap_err();
    eprintln!("s3s-fs, second PutMode::Create at {endpoint}: {e:?}");
    assert!(
        matches!(e, object_store::Error::AlreadyExists { .. }),
        "{e:?}"
    );
    let got = os.get(&p).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, "first");
}

/// How s3s-fs behaves under racing creates of one key (reported, not required: it checks
/// If-None-Match and then writes, so more than one racer can store).
async fn racing_creates(store: &Store) {
    let os = raw_client();
    let p = Path::from("probe/race");
    let puts = (0..16).map(|i| {
        let os = os.clone();
        let p = p.clone();
        async move {
            os.put_opts(
                &p,
                PutPayload::from(vec![i; 64 * 1024]),
                PutMode::Create.into(),
            )
            .await
        }
    });
    let results = futures::future::join_all(puts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e, object_store::Error::AlreadyExists { .. }),
                "{e:?}"
            );
        }
    }
    eprintln!("s3s-fs: {won} of 16 racing PutMode::Create calls succeeded");

    let data = Bytes::from(vec![42u8; 256 * 1024]);
    let name = ChunkName::of(&data);
    let puts = (0..16).map(|_| store.put_chunk(RootId(20), &name, data.clone()));
    let outcomes: Vec<PutOutcome> = futures::future::join_all(puts)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let stored = outcomes
        .iter()
        .filter(|o| **o == PutOutcome::Stored)
        .count();
    eprintln!("s3s-fs: {stored} of 16 racing put_chunk calls reported Stored");
    assert!(stored >= 1);
    assert_eq!(
        store.get_chunk(RootId(20), &name, MAX_CHUNK).await.unwrap(),
        data
    );
}

/// The server checks signatures, and lode names the store and object when it refuses.
async fn bad_credentials_fail_naming_store_and_object(endpoint: &str) {
    let os = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(BUCKET)
        .with_region(S3_REGION)
        .with_access_key_id(S3_ACCESS_KEY)
        .with_secret_access_key("not-the-secret")
        .with_allow_http(true)
        .build()
        .unwrap();
    let label = "s3://lode-test/some/prefix".to_owned();
    let store = Store::from_object_store(Arc::new(os), Path::from("some/prefix"), label.clone());
    let data = Bytes::from_static(b"layout chunk");
    let name = ChunkName::of(&data);
    let hex = name.to_hex();
    let key = format!("some/prefix/roots/1/chunks/{}/{hex}", &hex[..2]);
    let e = store
        .get_chunk(RootId(1), &name, MAX_CHUNK)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Backend { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("store {label}: get {key} failed: ")),
        "{msg}"
    );
    let e = store.put_chunk(RootId(1), &name, data).await.unwrap_err();
    assert!(matches!(e, StoreError::Backend { .. }), "{e:?}");
    assert!(e.to_string().contains(&key), "{e}");
}

/// Publishers racing to create the first root of an empty store, each with its own
/// client, as separate `lode import` processes would: each creates, then reads the roots
/// back in one listing and takes the active one. All succeed and all end up on the same
/// record (s3s-fs's create is not atomic, so more than one may report `Stored`; the last
/// write stays and every reader after it sees that one).
async fn racing_first_roots() {
    use lode_format::WrappedKey;
    use lode_store::{RootRecord, RootState};
    let racers = (0..8u8).map(|i| async move {
        let s = Store::open("s3://lode-test/first-root-race").unwrap();
        let rec = RootRecord {
            root: RootId(1),
            state: RootState::Active,
            salt: WrappedKey {
                key_id: "k".into(),
                blob: vec![i; 8],
            },
            since: None,
        };
        let outcome = s.create_root(&rec).await.unwrap();
        let roots = s.roots().await.unwrap();
        let active = s.active_among(&roots).unwrap().cloned();
        (outcome, active.expect("an active root after a create"))
    });
    let results = futures::future::join_all(racers).await;
    let stored = results
        .iter()
        .filter(|(o, _)| *o == PutOutcome::Stored)
        .count();
    eprintln!("s3s-fs: {stored} of 8 racing first-root creates reported Stored");
    assert!(stored >= 1);
    let s = Store::open("s3://lode-test/first-root-race").unwrap();
    let final_root = s.active_root().await.unwrap().unwrap();
    assert_eq!(s.roots().await.unwrap(), vec![final_root.clone()]);
}

/// lode's S3 client sends `x-amz-checksum-sha256` with every put, and the server checks
/// it: a body altered on the way (by a proxy flipping one byte, with the payload left out
/// of the signature so that only the checksum can catch it) is refused.
async fn checksums_are_sent_and_checked(endpoint: &str) {
    use object_store::aws::Checksum;
    let upstream = endpoint.trim_start_matches("http://").to_owned();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    tokio::spawn(flipping_proxy(proxy, upstream));
    let client = |url: &str| {
        AmazonS3Builder::from_env()
            .with_endpoint(url)
            .with_bucket_name(BUCKET)
            .with_allow_http(true)
            .with_unsigned_payload(true)
            .with_checksum_algorithm(Checksum::SHA256)
            .build()
            .unwrap()
    };
    let body = format!("before {MARKER} after");

    // Straight to the server: the checksum matches and the put succeeds.
    let direct = client(endpoint);
    let p = Path::from("probe/checksum-ok");
    direct
        .put(&p, PutPayload::from(body.clone().into_bytes()))
        .await
        .unwrap();

    // Through the proxy: one byte differs, so the checksum does not match.
    let via = client(&proxy_url);
    let p = Path::from("probe/checksum-bad");
    let e = via
        .put(&p, PutPayload::from(body.into_bytes()))
        .await
        .unwrap_err();
    eprintln!("s3s-fs, put with a body that does not match its checksum: {e}");
    assert!(e.to_string().contains("BadDigest"), "{e}");
}

/// What the proxy looks for in a request body, to flip one byte of.
const MARKER: &str = "flip-one-byte-of-this-marker";

async fn flipping_proxy(listener: tokio::net::TcpListener, upstream: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(at) = buf[..n]
                    .windows(MARKER.len())
                    .position(|w| w == MARKER.as_bytes())
                {
                    buf[at] ^= 0x20;
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
    }
}
