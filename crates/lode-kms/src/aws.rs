//! AWS KMS behind the [`Kms`] trait: `--kms aws:KEY_ID_OR_ARN`.
//!
//! Data keys come from `GenerateDataKey` (AES_256) and root salts are wrapped with
//! `Encrypt`; both send the [`Context`] as the `EncryptionContext`, and `Decrypt` sends it
//! back with the key id, so AWS KMS itself refuses a wrapped key used for anything but
//! what it was made for — and a key policy or grant can name the manifests and roots a
//! principal may unwrap. The wrapped form stored in manifests and root records is the
//! `CiphertextBlob` AWS KMS returns, under the key ARN it reports.
//!
//! Region, endpoint and credentials come from the usual AWS environment (`AWS_REGION`,
//! `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, instance roles). The client is
//! built on first use, so [`crate::open`] stays synchronous. Every call is bounded: a
//! connect timeout, a per-attempt timeout, at most three attempts and an overall
//! timeout, so an unreachable KMS is an error naming it and the key, never a hang.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_kms::Client;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use lode_format::{DataKey, Secret32, WrappedKey};
use tokio::sync::OnceCell;
use zeroize::Zeroize;

use crate::{Context, Kms, KmsError};

/// How long a TCP (and TLS) connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one attempt of a call may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);
/// How many attempts a call makes before it fails.
const MAX_ATTEMPTS: u32 = 3;
/// How long a call may take in all, retries and backoff included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the configuration comes from.
#[derive(Debug)]
enum Source {
    /// The AWS environment, read on first use.
    Env,
    /// Given by the caller.
    Given(Box<SdkConfig>),
}

/// An AWS KMS key (or any KMS that speaks its protocol).
pub struct AwsKms {
    key_id: String,
    source: Source,
    label: String,
    client: OnceCell<Client>,
}

impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("key_id", &self.key_id)
            .field("kms", &self.label)
            .finish()
    }
}

impl AwsKms {
    /// AWS KMS key `key_id` (a key id, ARN or alias), configured from the AWS
    /// environment when first used.
    pub fn from_env(key_id: &str) -> Result<AwsKms, KmsError> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        let region = var(&["AWS_REGION", "AWS_DEFAULT_REGION"]);
        let endpoint = var(&["AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"]);
        AwsKms::new(key_id, Source::Env, region.as_deref(), endpoint.as_deref())
    }

    /// AWS KMS key `key_id` under an explicit SDK configuration (its region, endpoint
    /// and credentials). The timeouts and retry bound of [`AwsKms`] still apply.
    pub fn with_config(key_id: &str, config: SdkConfig) -> Result<AwsKms, KmsError> {
        let region = config.region().map(|r| r.to_string());
        let endpoint = config.endpoint_url().map(str::to_owned);
        AwsKms::new(
            key_id,
            Source::Given(Box::new(config)),
            region.as_deref(),
            endpoint.as_deref(),
        )
    }

    fn new(
        key_id: &str,
        source: Source,
        region: Option<&str>,
        endpoint: Option<&str>,
    ) -> Result<AwsKms, KmsError> {
        if key_id.is_empty() || key_id.len() > lode_format::manifest::MAX_KEY_ID_BYTES {
            return Err(KmsError::Unsupported {
                spec: format!("aws:{key_id}"),
                reason: format!(
                    "an AWS KMS key id, ARN or alias of 1 to {} bytes is needed after aws:",
                    lode_format::manifest::MAX_KEY_ID_BYTES
                ),
            });
        }
        let label = match (endpoint, region) {
            (Some(e), Some(r)) => format!("AWS KMS at {e} (region {r})"),
            (Some(e), None) => format!("AWS KMS at {e}"),
            (None, Some(r)) => format!("AWS KMS in {r}"),
            (None, None) => "AWS KMS".to_owned(),
        };
        Ok(AwsKms {
            key_id: key_id.to_owned(),
            source,
            label,
            client: OnceCell::new(),
        })
    }

    async fn client(&self, key_id: &str) -> Result<&Client, KmsError> {
        self.client
            .get_or_try_init(|| async {
                let config = match &self.source {
                    Source::Given(c) => SdkConfig::clone(c),
                    Source::Env => {
                        let load = aws_config::defaults(BehaviorVersion::latest())
                            .http_client(http_client())
                            .load();
                        tokio::time::timeout(OPERATION_TIMEOUT, load)
                            .await
                            .map_err(|_| KmsError::Unreachable {
                                kms: self.describe(),
                                key_id: key_id.to_owned(),
                                reason: format!(
                                    "the AWS configuration (region, credentials) did not \
                                     load within {} s",
                                    OPERATION_TIMEOUT.as_secs()
                                ),
                            })?
                    }
                };
                if config.region().is_none() {
                    return Err(KmsError::Unsupported {
                        spec: format!("aws:{}", self.key_id),
                        reason: "no AWS region: set AWS_REGION (or a profile's region)".into(),
                    });
                }
                let conf = aws_sdk_kms::config::Builder::from(&config)
                    .http_client(http_client())
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(CONNECT_TIMEOUT)
                            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                            .operation_timeout(OPERATION_TIMEOUT)
                            .build(),
                    )
                    .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
                    .build();
                Ok(Client::from_conf(conf))
            })
            .await
    }

    /// What a failed call means, naming this KMS and the key. `context` is the one an
    /// unwrap was asked under.
    fn error<E, R: fmt::Debug + 'static>(
        &self,
        err: SdkError<E, R>,
        key_id: &str,
        context: Option<&Context>,
    ) -> KmsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let kms = self.describe();
        let key_id = key_id.to_owned();
        if let SdkError::ServiceError(e) = &err {
            let code = e.err().code().unwrap_or("an unnamed error");
            let message = e.err().message().unwrap_or("no message");
            return match (code, context) {
                ("InvalidCiphertextException" | "IncorrectKeyException", Some(context)) => {
                    KmsError::Unwrap {
                        key_id,
                        kms,
                        context: context.clone(),
                    }
                }
                ("NotFoundException", _) => KmsError::UnknownKey { key_id, kms },
                // Still failing after the retries: the service is not answering usefully.
                (
                    "KMSInternalException" | "DependencyTimeoutException" | "ThrottlingException",
                    _,
                ) => KmsError::Unreachable {
                    kms,
                    key_id,
                    reason: format!("{code}: {message}"),
                },
                _ => KmsError::Denied {
                    kms,
                    key_id,
                    reason: format!("{code}: {message}"),
                },
            };
        }
        let reason = match &err {
            SdkError::TimeoutError(_) => format!(
                "no answer within {} s (tried up to {MAX_ATTEMPTS} times)",
                OPERATION_TIMEOUT.as_secs()
            ),
            _ => format!("{} (tried up to {MAX_ATTEMPTS} times)", chain(&err)),
        };
        match err {
            // The request was never made: no credentials, or a bad configuration.
            SdkError::ConstructionFailure(_) => KmsError::Denied {
                kms,
                key_id,
                reason,
            },
            _ => KmsError::Unreachable {
                kms,
                key_id,
                reason,
            },
        }
    }

    fn secret(&self, key_id: &str, plain: Option<Blob>) -> Result<Secret32, KmsError> {
        let mut bytes = plain.map(Blob::into_inner).unwrap_or_default();
        let out = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KmsError::Denied {
            kms: self.describe(),
            key_id: key_id.to_owned(),
            reason: format!(
                "the KMS answered with a {}-byte plaintext where 32 bytes were wrapped",
                bytes.len()
            ),
        });
        bytes.zeroize();
        out.map(Secret32::from_bytes)
    }

    fn wrapped(
        &self,
        asked: &str,
        key_id: Option<String>,
        blob: Option<Blob>,
    ) -> Result<WrappedKey, KmsError> {
        let blob = blob.map(Blob::into_inner).unwrap_or_default();
        let key_id = key_id.unwrap_or_else(|| asked.to_owned());
        let max = lode_format::manifest::MAX_WRAPPED_KEY_BYTES;
        if blob.is_empty() || blob.len() > max {
            return Err(KmsError::Denied {
                kms: self.describe(),
                key_id,
                reason: format!(
                    "the KMS answered with a {}-byte ciphertext (lode keeps 1 to {max})",
                    blob.len()
                ),
            });
        }
        Ok(WrappedKey { key_id, blob })
    }
}

/// The HTTP client: hyper with rustls on ring (not aws-lc, which needs cmake to build).
fn http_client() -> aws_sdk_kms::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

#[async_trait]
impl Kms for AwsKms {
    fn describe(&self) -> String {
        self.label.clone()
    }

    fn default_key_id(&self) -> String {
        self.key_id.clone()
    }

    async fn wrap(
        &self,
        key_id: &str,
        secret: &Secret32,
        context: &Context,
    ) -> Result<WrappedKey, KmsError> {
        let out = self
            .client(key_id)
            .await?
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(secret.expose().to_vec()))
            .set_encryption_context(Some(pairs(context)))
            .send()
            .await
            .map_err(|e| self.error(e, key_id, None))?;
        self.wrapped(key_id, out.key_id, out.ciphertext_blob)
    }

    async fn unwrap(&self, wrapped: &WrappedKey, context: &Context) -> Result<Secret32, KmsError> {
        let key_id = &wrapped.key_id;
        let out = self
            .client(key_id)
            .await?
            .decrypt()
            .key_id(key_id)
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .set_encryption_context(Some(pairs(context)))
            .send()
            .await
            .map_err(|e| self.error(e, key_id, Some(context)))?;
        self.secret(key_id, out.plaintext)
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        context: &Context,
    ) -> Result<(DataKey, WrappedKey), KmsError> {
        let out = self
            .client(key_id)
            .await?
            .generate_data_key()
            .key_id(key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(pairs(context)))
            .send()
            .await
            .map_err(|e| self.error(e, key_id, None))?;
        let key = self.secret(key_id, out.plaintext)?;
        let wrapped = self.wrapped(key_id, out.key_id, out.ciphertext_blob)?;
        Ok((key, wrapped))
    }
}

/// An error and its causes, outermost first: "dispatch failure: io error: … refused".
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = e.source();
    }
    out
}

fn pairs(context: &Context) -> std::collections::HashMap<String, String> {
    context
        .pairs()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
