//! Where a store is: parsed once from what the user typed, with the fault named.
//!
//! - a plain path (`/var/lib/lode/store`, `./store`) or `file:///path`: a local directory,
//!   created if missing (see [`crate::local`]: fsynced writes, no links followed);
//! - `s3://bucket[/prefix]`: S3 or an S3-compatible service. Endpoint, region and
//!   credentials come from the usual AWS environment variables (`AWS_ENDPOINT_URL`,
//!   `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`);
//!   plain `http://` endpoints are allowed (a loopback test server, a private gateway);
//!   every put carries an `x-amz-checksum-sha256` the service must check, so a service
//!   that does not support SHA-256 checksums is not a lode store;
//! - `memory:`: a new, empty in-memory store that lives as long as the `Store` and its
//!   clones (tests).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::local::LocalDir;
use crate::store::StoreError;

/// A connected backend: the object store, the key prefix, and the local directory
/// backend again when it is one.
pub(crate) type Connected = (Arc<dyn ObjectStore>, Path, Option<LocalDir>);

/// A parsed store location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// A directory on this machine.
    Local(PathBuf),
    /// A bucket and key prefix in S3 or an S3-compatible service.
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix, without leading or trailing `/`.
        prefix: String,
    },
    /// Process memory.
    Memory,
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Local(p) => write!(f, "{}", p.display()),
            StoreLocation::S3 { bucket, prefix } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            StoreLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreLocation::Memory => f.write_str("memory:"),
        }
    }
}

impl StoreLocation {
    /// Parses a store location as a user types it.
    pub fn parse(spec: &str) -> Result<StoreLocation, StoreError> {
        let bad = |reason: &str| StoreError::BadLocation {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        if spec.is_empty() {
            return Err(bad("it is empty"));
        }
        if spec == "memory:" {
            return Ok(StoreLocation::Memory);
        }
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket(bucket) {
                return Err(bad(
                    "the bucket name must be 3 to 63 of a-z 0-9 . - (s3://bucket/prefix)",
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..")
                || prefix.contains("//")
                || prefix.chars().any(|c| c.is_control())
            {
                return Err(bad(
                    "the key prefix has an empty, '.', '..' or control segment",
                ));
            }
            return Ok(StoreLocation::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if let Some(path) = spec.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file:// URL needs an absolute path (file:///dir)"));
            }
            return Ok(StoreLocation::Local(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = spec.split_once("://") {
            return Err(bad(&format!(
                "unknown scheme {scheme:?}: use a directory path, file:///dir or s3://bucket/prefix"
            )));
        }
        Ok(StoreLocation::Local(PathBuf::from(spec)))
    }

    /// Connects to the location: creates a local directory, builds an S3 client.
    /// The local backend is returned a second time, typed, for its staging files.
    pub(crate) fn connect(&self) -> Result<Connected, StoreError> {
        match self {
            StoreLocation::Memory => Ok((Arc::new(InMemory::new()), Path::default(), None)),
            StoreLocation::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::BadLocation {
                    spec: dir.display().to_string(),
                    reason: format!("cannot create the directory: {e}"),
                })?;
                let fs = LocalDir::new(dir).map_err(|e| StoreError::BadLocation {
                    spec: dir.display().to_string(),
                    reason: e.to_string(),
                })?;
                Ok((Arc::new(fs.clone()), Path::default(), Some(fs)))
            }
            StoreLocation::S3 { bucket, prefix } => {
                // from_env reads AWS_REGION, AWS_DEFAULT_REGION, credentials and the
                // endpoint; the region defaults to us-east-1.
                let b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .unwrap_or_default();
                // Timeouts and retries, chosen for a store on the read path of running
                // workloads (docs/network.md):
                // - S3 answers a GET in tens of ms, 175 ms at p99.9, and sometimes
                //   refuses with 503 SlowDown or fails with 500: those are retried, up to
                //   10 times with jittered backoff from 100 ms to 2 s, so a share of
                //   failed requests only slows a read down.
                // - A dead endpoint must fail the read in bounded time, with the store
                //   and the chunk named, not hang a guest's I/O: no new attempt starts
                //   after 10 s (`retry_timeout`); a connect gives up after 2 s; and a
                //   connection that stalls (no byte for 5 s, the read timeout) is given
                //   up and retried, so a partition costs about 10 s plus one attempt.
                // - The overall per-attempt timeout stays generous (60 s): a slow link
                //   that keeps delivering bytes is not a fault, only a stalled one is.
                let retry = RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(2),
                        base: 2.0,
                    },
                    max_retries: 10,
                    retry_timeout: Duration::from_secs(10),
                };
                let client = ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_read_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60))
                    .with_allow_http(endpoint.starts_with("http://"));
                // Every put carries the SHA-256 of its body, which S3 checks before it
                // stores anything: bytes damaged on the way are refused, not stored.
                let s3 = b
                    .with_checksum_algorithm(Checksum::SHA256)
                    .with_retry(retry)
                    .with_client_options(client)
                    .build()
                    .map_err(|e| StoreError::BadLocation {
                        spec: self.to_string(),
                        reason: e.to_string(),
                    })?;
                let prefix = if prefix.is_empty() {
                    Path::default()
                } else {
                    Path::parse(prefix).map_err(|e| StoreError::BadLocation {
                        spec: self.to_string(),
                        reason: e.to_string(),
                    })?
                };
                Ok((Arc::new(s3), prefix, None))
            }
        }
    }
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_users_type() {
        assert_eq!(
            StoreLocation::parse("/var/lib/lode").unwrap(),
            StoreLocation::Local("/var/lib/lode".into())
        );
        assert_eq!(
            StoreLocation::parse("file:///srv/x").unwrap(),
            StoreLocation::Local("/srv/x".into())
        );
        assert_eq!(
            StoreLocation::parse("s3://my-bucket/a/b/").unwrap(),
            StoreLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            StoreLocation::parse("memory:").unwrap(),
            StoreLocation::Memory
        );
        assert_eq!(
            StoreLocation::parse("s3://b12").unwrap().to_string(),
            "s3://b12"
        );
    }

    #[test]
    fn bad_locations_are_named() {
        let e = StoreLocation::parse("gs://bucket").unwrap_err();
        assert_eq!(
            e.to_string(),
            "store location \"gs://bucket\" is invalid: unknown scheme \"gs\": use a \
             directory path, file:///dir or s3://bucket/prefix"
        );
        let e = StoreLocation::parse("s3://Bad_Bucket/x").unwrap_err();
        assert!(e.to_string().contains("bucket name"), "{e}");
        let e = StoreLocation::parse("s3://bucket/a/../b").unwrap_err();
        assert!(e.to_string().contains("'..'"), "{e}");
        assert!(StoreLocation::parse("file://relative").is_err());
        assert!(StoreLocation::parse("").is_err());
    }
}
