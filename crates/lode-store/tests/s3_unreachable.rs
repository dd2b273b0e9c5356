//! An S3 endpoint nobody listens on: every operation fails within lode's retry budget
//! with an error naming the store and the object. The endpoint comes from the
//! process-global environment, so this binary holds a single test that sets it before it
//! starts any other thread.

use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_format::{ChunkName, RootId};
use lode_store::{Store, StoreError};

const MAX_CHUNK: u64 = 1 << 20;

const LABEL: &str = "s3://lode-test/pre/fix";
const BUDGET: Duration = Duration::from_secs(30);

#[test]
fn unreachable_endpoint_fails_naming_store_and_object() {
    // SAFETY: this is the only test in this binary and no runtime has started yet, so no
    // other thread of ours exists to read the environment while it changes.
    unsafe {
        lode_testkit::set_aws_env([
            // Port 1 (tcpmux) is closed: connections are refused at once.
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_ACCESS_KEY_ID", "lode-test-access"),
            ("AWS_SECRET_ACCESS_KEY", "lode-test-secret"),
            ("AWS_REGION", "us-east-1"),
        ]);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Opening does no I/O: the fault shows at the first operation.
        let store = Store::open(LABEL).unwrap();
        assert_eq!(store.label(), LABEL);
        let data = Bytes::from_static(b"going nowhere");
        let name = ChunkName::of(&data);
        let hex = name.to_hex();
        let key = format!("pre/fix/roots/1/chunks/{}/{hex}", &hex[..2]);

        let t = Instant::now();
        let e = store
            .get_chunk(RootId(1), &name, MAX_CHUNK)
            .await
            .unwrap_err();
        let took = t.elapsed();
        eprintln!("get from an unreachable endpoint failed after {took:?}: {e}");
        assert!(took < BUDGET, "{took:?}");
        assert!(matches!(e, StoreError::Backend { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("store {LABEL}: get {key} failed: ")),
            "{msg}"
        );

        let t = Instant::now();
        let e = store.put_chunk(RootId(1), &name, data).await.unwrap_err();
        let took = t.elapsed();
        eprintln!("put to an unreachable endpoint failed after {took:?}: {e}");
        assert!(took < BUDGET, "{took:?}");
        assert!(matches!(e, StoreError::Backend { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("store {LABEL}: ")), "{msg}");
        assert!(msg.contains(&key), "{msg}");

        let t = Instant::now();
        let e = store.list_tags().await.unwrap_err();
        assert!(t.elapsed() < BUDGET);
        assert!(matches!(e, StoreError::Backend { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("store {LABEL}: list pre/fix/tags failed: ")),
            "{e}"
        );

        let e = store
            .set_tag("app", &lode_format::ManifestId::of(b"m"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("pre/fix/tags/app"), "{e}");
    });
    rt.shutdown_background();
}
