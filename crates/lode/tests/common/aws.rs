//! AWS KMS for the tests: a key made in a moto server, and `lode` run with the AWS SDK
//! pointed at that server (or at a closed port) and at nothing else.

#![allow(dead_code)]

use std::process::Command;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kms::config::{Credentials, SharedCredentialsProvider};
use serde_json::Value;

use crate::harness::Home;

/// Makes a symmetric key in the KMS at `endpoint`; returns its ARN.
pub fn create_key(endpoint: &str) -> String {
    let config = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "lode-test",
            "lode-test-secret",
            None,
            None,
            "test",
        )))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let out = aws_sdk_kms::Client::new(&config)
            .create_key()
            .send()
            .await
            .expect("CreateKey");
        out.key_metadata().unwrap().arn().unwrap().to_owned()
    })
}

/// Points `cmd`'s AWS SDK at `endpoint` with test credentials, and at nothing else: no
/// profile, config file or instance metadata of the machine running the tests.
pub fn aws_env(cmd: &mut Command, home: &Home, endpoint: &str) {
    cmd.env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "lode-test")
        .env("AWS_SECRET_ACCESS_KEY", "lode-test-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", home.path("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            home.path("no-aws-credentials"),
        )
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL_KMS");
}

/// `lode --kms aws:KEY ARGS`, with the AWS settings for `endpoint` on the child only.
pub struct AwsLode<'a> {
    pub home: &'a Home,
    pub endpoint: String,
    pub key: String,
}

impl AwsLode<'_> {
    pub fn cmd(&self, args: &[&str]) -> Command {
        let spec = format!("aws:{}", self.key);
        let mut all = vec!["--kms", spec.as_str()];
        all.extend_from_slice(args);
        let mut cmd = self.home.cmd(&all);
        aws_env(&mut cmd, self.home, &self.endpoint);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.cmd(args).output().expect("run lode");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains("panicked"),
            "lode {args:?} panicked:\n{stderr}"
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(args);
        assert!(ok, "lode {args:?} failed:\n{stdout}\n{stderr}");
        stdout
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let (ok, _, stderr) = self.run(args);
        assert!(!ok, "lode {args:?} succeeded");
        stderr
    }
}
