//! `--kms aws:KEY` through the real `lode` binary, against AWS KMS as spoken by a real
//! moto server on 127.0.0.1 (the AWS settings are given to the child process only):
//! import, flatten and export round-trip with no keyring file made; a manifest whose
//! wrapped key was swapped for another manifest's is refused by the KMS, naming the
//! manifest and the key; an unreachable KMS is an error naming its endpoint and the key.

#[path = "common/aws.rs"]
mod aws;
#[path = "common/harness.rs"]
mod harness;

use std::fs;
use std::path::Path;

use aws::{AwsLode, create_key};
use harness::{Home, random_image};
use lode_format::Manifest;
use lode_testkit::Moto;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn manifest_file(home: &Home, id: &str) -> std::path::PathBuf {
    home.home().join("store/roots/1/manifests").join(id)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

#[test]
fn images_made_and_read_under_aws_kms() {
    let Some(moto) = Moto::start() else {
        return;
    };
    let home = Home::new();
    let lode = AwsLode {
        home: &home,
        endpoint: moto.endpoint(),
        key: create_key(&moto.endpoint()),
    };

    // A raw image: import, export, byte for byte; the manifest names the key's ARN.
    let bytes = random_image(5, 11);
    let src = home.path("a.img");
    fs::write(&src, &bytes).unwrap();
    let a = lode.json(&["import", s(&src), "--tag", "a"]);
    let a_id = a["id"].as_str().unwrap().to_owned();
    let out = home.path("a.out");
    lode.ok(&["export", "a", s(&out)]);
    assert!(
        fs::read(&out).unwrap() == bytes,
        "export differs from import"
    );
    assert_eq!(
        lode.json(&["inspect", "a"])["kms_key_id"],
        lode.key.as_str()
    );
    assert!(
        !home.home().join("keyring.json").exists(),
        "no keyring is made when the KMS is AWS KMS"
    );

    // A flattened OCI image, the same way.
    let layout = home.path("sample-oci");
    lode_oci::sample::write_sample_family(&layout).unwrap();
    let kept = home.path("app1.ext4");
    let src = format!("oci:{}:app1", layout.display());
    lode.ok(&["flatten", &src, "--tag", "app1", "--keep-image", s(&kept)]);
    let out = home.path("app1.out");
    lode.ok(&["export", "app1", s(&out)]);
    assert!(fs::read(&out).unwrap() == fs::read(&kept).unwrap());
    lode.ok(&["verify", "app1"]);

    // Manifest b with a's wrapped key spliced in, stored under the id its bytes hash to
    // (as a forger would): AWS KMS refuses the key under b's context, and the error
    // names the manifest and the key.
    let src = home.path("b.img");
    fs::write(&src, random_image(3, 12)).unwrap();
    let b_id = lode.json(&["import", s(&src), "--tag", "b"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let a_bytes = fs::read(manifest_file(&home, &a_id)).unwrap();
    let b_bytes = fs::read(manifest_file(&home, &b_id)).unwrap();
    let (a_m, b_m) = (
        Manifest::parse(&a_bytes).unwrap(),
        Manifest::parse(&b_bytes).unwrap(),
    );
    let field = |m: &Manifest| 2 + m.wrapped_key().key_id.len() + 4 + m.wrapped_key().blob.len();
    let table = b_m.stored_chunks() * 32 + 16;
    let key_id_at = b_bytes.len() - table - field(&b_m);
    let a_key_at = a_bytes.len() - (a_m.stored_chunks() * 32 + 16) - field(&a_m);
    let mut forged = b_bytes[..key_id_at].to_vec();
    forged.extend_from_slice(&a_bytes[a_key_at..a_key_at + field(&a_m)]);
    forged.extend_from_slice(&b_bytes[b_bytes.len() - table..]);
    let forged_m = Manifest::parse(&forged).unwrap();
    assert_eq!(forged_m.wrapped_key(), a_m.wrapped_key());
    let forged_id = sha256_hex(&forged);
    fs::write(manifest_file(&home, &forged_id), &forged).unwrap();
    let out = home.path("forged.out");
    let err = lode.fails(&["export", &forged_id, s(&out)]);
    assert!(
        err.contains(&format!(
            "manifest {forged_id}: cannot unwrap with KMS key {:?} of AWS KMS at {} \
             (region us-east-1): the wrapped key does not unwrap under this key and context",
            lode.key, lode.endpoint
        )),
        "{err}"
    );
    assert!(!out.exists());
    // The genuine manifests still export.
    lode.ok(&["export", &b_id, s(&out)]);
}

#[test]
fn an_unreachable_aws_kms_is_named_with_the_key() {
    let home = Home::new();
    // A port that was just free and has no listener: every connect is refused.
    let port = lode_testkit::free_port();
    let lode = AwsLode {
        home: &home,
        endpoint: format!("http://127.0.0.1:{port}"),
        key: "alias/lode-images".into(),
    };
    let src = home.path("a.img");
    fs::write(&src, random_image(2, 1)).unwrap();
    let err = lode.fails(&["import", s(&src), "--tag", "a"]);
    assert!(
        err.contains(&format!(
            "AWS KMS at http://127.0.0.1:{port} (region us-east-1) is unreachable for KMS \
             key \"alias/lode-images\": "
        )),
        "{err}"
    );
    assert!(err.contains("Connection refused"), "{err}");
}
