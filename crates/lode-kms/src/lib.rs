//! Key management for lode (docs/format.md, docs/security.md).
//!
//! Where this fits: docs/architecture.md, "The control plane and the KMS".
//!
//! Every manifest's key table is encrypted under a fresh random data key, and that data
//! key is wrapped by a KMS key; so is each root's salt. [`Kms`] is the small trait a key
//! service implements: wrap and unwrap 32-byte secrets under a named key, each bound to
//! an encryption [`Context`] naming what it protects, so a wrapped secret moved to
//! another manifest (or used as a root salt) does not unwrap there. The embedded default
//! is [`Keyring`], a local file of named keys; AWS KMS ([`AwsKms`]) sits behind the same
//! trait. Whoever can unwrap can read images: a worker of the control service holds no
//! KMS, and is granted the data keys only of the images assigned to it.

mod aws;
mod context;
mod keyring;

use std::fmt;
use std::path::PathBuf;

use async_trait::async_trait;
use lode_format::{DataKey, Secret32, WrappedKey};
use thiserror::Error;

pub use aws::AwsKms;
pub use context::Context;
pub use keyring::Keyring;

/// A key service failed or refused.
#[derive(Debug, Error)]
pub enum KmsError {
    /// The keyring file could not be read or written.
    #[error("keyring {path}: {source}")]
    Io {
        /// The keyring file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The keyring file is not a keyring.
    #[error("keyring {path} is corrupt: {reason}")]
    Corrupt {
        /// The keyring file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The keyring file can be read by others.
    #[error("keyring {path} has mode {mode:o}: it must be readable by its owner only (chmod 600)")]
    Exposed {
        /// The keyring file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No key by that name.
    #[error("KMS key {key_id:?} is not in {kms}")]
    UnknownKey {
        /// The key asked for.
        key_id: String,
        /// Which KMS was asked.
        kms: String,
    },
    /// A key by that name already exists.
    #[error("KMS key {key_id:?} already exists in {kms}")]
    KeyExists {
        /// The key asked for.
        key_id: String,
        /// Which KMS was asked.
        kms: String,
    },
    /// A key name that cannot be used.
    #[error("KMS key name {key_id:?} is invalid: use 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadKeyName {
        /// The name given.
        key_id: String,
    },
    /// The wrapped secret did not open under the named key and context.
    #[error(
        "cannot unwrap with KMS key {key_id:?} of {kms}: the wrapped key does not unwrap \
         under this key and context ({context}); it is corrupt, or was made under another \
         key or for something else"
    )]
    Unwrap {
        /// The key named by the wrapped secret.
        key_id: String,
        /// Which KMS was asked.
        kms: String,
        /// The context it was asked under.
        context: Context,
    },
    /// The KMS could not be reached, or did not answer in time.
    #[error("{kms} is unreachable for KMS key {key_id:?}: {reason}")]
    Unreachable {
        /// Which KMS (its endpoint and region).
        kms: String,
        /// The key asked for.
        key_id: String,
        /// What went wrong, after the retries.
        reason: String,
    },
    /// The KMS refused: no credentials, no permission, or a disabled key.
    #[error("{kms} refused KMS key {key_id:?}: {reason}")]
    Denied {
        /// Which KMS (its endpoint and region).
        kms: String,
        /// The key asked for.
        key_id: String,
        /// What the KMS said.
        reason: String,
    },
    /// A KMS location that is not understood.
    #[error("KMS {spec:?} is not supported: {reason}")]
    Unsupported {
        /// What was given.
        spec: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The OS random source failed.
    #[error("the system random number generator failed")]
    Random,
}

/// A key service that wraps 32-byte secrets (data keys, root salts) under named keys.
#[async_trait]
pub trait Kms: Send + Sync + fmt::Debug {
    /// Where this KMS is, for messages (a keyring path, a KMS endpoint).
    fn describe(&self) -> String;

    /// The key that wraps new secrets when none is named.
    fn default_key_id(&self) -> String;

    /// Wraps `secret` under key `key_id`, bound to `context`.
    async fn wrap(
        &self,
        key_id: &str,
        secret: &Secret32,
        context: &Context,
    ) -> Result<WrappedKey, KmsError>;

    /// Unwraps a secret that [`Kms::wrap`] made under the same `context`; under any
    /// other context it fails.
    async fn unwrap(&self, wrapped: &WrappedKey, context: &Context) -> Result<Secret32, KmsError>;

    /// A fresh random data key and its wrapped form, bound to `context`.
    async fn generate_data_key(
        &self,
        key_id: &str,
        context: &Context,
    ) -> Result<(DataKey, WrappedKey), KmsError> {
        let key = Secret32::random().map_err(|_| KmsError::Random)?;
        let wrapped = self.wrap(key_id, &key, context).await?;
        Ok((key, wrapped))
    }
}

/// Opens the KMS a user named for reading existing images: like [`open`], but a keyring
/// file that does not exist is an error rather than a new, empty keyring — a fresh
/// keyring could never unwrap the images already stored.
pub fn open_existing(spec: &str) -> Result<Box<dyn Kms>, KmsError> {
    if is_keyring(spec) && !std::path::Path::new(spec).exists() {
        return Err(KmsError::Io {
            path: PathBuf::from(spec),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no keyring here; it holds the keys of every stored image: point --kms or \
                 LODE_KMS at the keyring the images were made with",
            ),
        });
    }
    open(spec)
}

/// Opens the KMS a user named: `aws:KEY_ID_OR_ARN` for AWS KMS (configured from the AWS
/// environment), or a keyring file path (created on first use). A keyring path that
/// starts with `aws:` is written `./aws:…`.
pub fn open(spec: &str) -> Result<Box<dyn Kms>, KmsError> {
    if let Some(key_id) = spec.strip_prefix("aws:") {
        return Ok(Box::new(AwsKms::from_env(key_id)?));
    }
    if let Some((scheme, _)) = spec.split_once("://") {
        return Err(KmsError::Unsupported {
            spec: spec.to_owned(),
            reason: format!(
                "{scheme}:// is not a KMS this build supports; give aws:KEY_ID_OR_ARN or a \
                 keyring file path"
            ),
        });
    }
    Ok(Box::new(Keyring::open_or_create(PathBuf::from(spec))?))
}

fn is_keyring(spec: &str) -> bool {
    !spec.starts_with("aws:") && !spec.contains("://")
}
