//! Roots (DESIGN.md, "Garbage collection"): the store is divided into roots, each with its
//! own salt; new manifests go to the one active root. The salt is kept wrapped by the KMS,
//! so a reader of the store alone cannot confirm a guessed plaintext.
//!
//! `roots/<root>/ROOT` holds:
//! ```json
//! {"version": 1, "root": 1, "state": "active",
//!  "salt": {"key_id": "default", "blob": "<hex of the KMS's wrapped salt>"}}
//! ```

use lode_format::{RootId, WrappedKey};
use serde::{Deserialize, Serialize};

/// Where a root is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootState {
    /// New manifests and chunks go here.
    Active,
    /// Read-only; live manifests are being copied forward.
    Retired,
    /// Reads still work but raise an alarm; deletion halts on any read.
    Expired,
}

/// The state object of one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootRecord {
    /// Which root.
    pub root: RootId,
    /// Its state.
    pub state: RootState,
    /// Its salt, wrapped by the KMS.
    pub salt: WrappedKey,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RootFile {
    pub version: u32,
    pub root: RootId,
    pub state: RootState,
    pub salt: SaltFile,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SaltFile {
    pub key_id: String,
    pub blob: String,
}

impl RootRecord {
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let f = RootFile {
            version: 1,
            root: self.root,
            state: self.state,
            salt: SaltFile {
                key_id: self.salt.key_id.clone(),
                blob: hex::encode(&self.salt.blob),
            },
        };
        let mut v = serde_json::to_vec_pretty(&f).expect("serialising plain data");
        v.push(b'\n');
        v
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<RootRecord, String> {
        if bytes.len() > 64 * 1024 {
            return Err(format!(
                "{} bytes is too large for a root record",
                bytes.len()
            ));
        }
        let f: RootFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if f.version != 1 {
            return Err(format!("unknown version {}", f.version));
        }
        let blob = hex::decode(&f.salt.blob).map_err(|e| format!("salt blob: {e}"))?;
        Ok(RootRecord {
            root: f.root,
            state: f.state,
            salt: WrappedKey {
                key_id: f.salt.key_id,
                blob,
            },
        })
    }
}
