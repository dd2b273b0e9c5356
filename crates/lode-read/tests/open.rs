//! Opening an image by tag or manifest id, with and without its keys, and the errors a
//! reader sees when it cannot: each names the tag, manifest or key at fault.

mod common;

use std::sync::Arc;

use common::Fixture;
use lode_format::ManifestId;
use lode_kms::{Keyring, Kms, KmsError};
use lode_read::{ImageDevice, KmsKeys, OpenError, open_image, open_image_with, resolve};
use lode_store::StoreError;

#[tokio::test]
async fn a_tag_and_an_id_open_the_same_manifest_and_keys() {
    let fx = Fixture::new().await;
    let id: ManifestId = fx.id.parse().unwrap();
    fx.store.set_tag("app", &id).await.unwrap();
    assert_eq!(resolve(&fx.store, "app").await.unwrap(), id);
    assert_eq!(resolve(&fx.store, &fx.id).await.unwrap(), id);

    let by_tag = open_image(&fx.store, Some(&fx.kms), "app").await.unwrap();
    let keys = KmsKeys(Arc::new(
        Keyring::open_or_create(fx.dir.path().join("keyring")).unwrap(),
    ));
    let by_id = open_image_with(&fx.store, Some(&keys), &fx.id)
        .await
        .unwrap();
    assert_eq!((by_tag.id, by_tag.root), (by_id.id, by_id.root));
    assert_eq!(by_tag.manifest.header(), by_id.manifest.header());
    assert!(by_tag.keys.is_some() && by_id.keys.is_some());
    let (cache, _) = fx.cache(1 << 20, 1 << 20, 1 << 20);
    let dev = ImageDevice::new(cache, by_id).unwrap();
    assert_eq!(dev.size(), fx.image.len() as u64);
}

#[tokio::test]
async fn an_unknown_tag_names_the_tag_and_the_store() {
    let fx = Fixture::new().await;
    let err = open_image(&fx.store, Some(&fx.kms), "nope")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Store(StoreError::NotFound { what: "tag", .. })
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("tag \"nope\" is not in store {}", fx.store.label())
    );
}

#[tokio::test]
async fn without_a_kms_there_are_no_keys_and_no_device() {
    let fx = Fixture::new().await;
    let opened = open_image(&fx.store, None, &fx.id).await.unwrap();
    assert!(opened.keys.is_none());
    let (cache, _) = fx.cache(1 << 20, 1 << 20, 1 << 20);
    let err = ImageDevice::new(cache, opened).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "image {} was opened without its key table (open it with a KMS)",
            fx.id
        )
    );
}

#[tokio::test]
async fn a_kms_that_cannot_unwrap_the_key_names_the_manifest() {
    let fx = Fixture::new().await;
    // Another keyring: a key of the same name, other bytes.
    let other = Keyring::open_or_create(fx.dir.path().join("other-keyring")).unwrap();
    assert_eq!(other.default_key_id(), fx.kms.default_key_id());
    let err = open_image(&fx.store, Some(&other as &dyn Kms), &fx.id)
        .await
        .unwrap_err();
    let OpenError::ManifestKey { id, source } = &err else {
        panic!("not a key error: {err:?}")
    };
    assert_eq!(id.to_hex(), fx.id);
    assert!(matches!(source, KmsError::Unwrap { .. }), "{source:?}");
    assert_eq!(err.to_string(), format!("manifest {}: {source}", fx.id));
}

#[tokio::test]
async fn a_read_of_a_live_root_raises_no_alarm() {
    let fx = Fixture::new().await;
    let opened = open_image(&fx.store, None, &fx.id).await.unwrap();
    let reader = lode_read::reader_name("test");
    assert!(
        reader.starts_with("test on ")
            && reader.ends_with(&format!("(pid {})", std::process::id()))
    );
    let alarm = lode_read::check_read(&fx.store, opened.root, &opened.id, &reader)
        .await
        .unwrap();
    assert_eq!(alarm, None);
}
