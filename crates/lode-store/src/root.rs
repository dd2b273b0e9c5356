//! Roots (docs/gc.md): the store is divided into roots, each with its
//! own salt; new manifests go to the one active root. The salt is kept wrapped by the KMS,
//! so a reader of the store alone cannot confirm a guessed plaintext.
//!
//! `roots/<root>/ROOT` holds:
//! ```json
//! {"version": 1, "root": 1, "state": "active",
//!  "salt": {"key_id": "default", "blob": "<hex of the KMS's wrapped salt>"}}
//! ```
//!
//! An expired or deleting root's record also has `"since": <unix seconds>`, when it
//! entered that state (the grace period before deletion counts from it).

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
    /// A collector has begun deleting the root's objects; reads may fail.
    Deleting,
    /// Every object of the root is gone but this record and its forwarding records.
    Deleted,
}

impl RootState {
    /// Whether a read of this root raises an alarm (the root is past the point where
    /// anything should still read it).
    pub fn alarms_on_read(self) -> bool {
        matches!(
            self,
            RootState::Expired | RootState::Deleting | RootState::Deleted
        )
    }
}

impl std::fmt::Display for RootState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            RootState::Active => "active",
            RootState::Retired => "retired",
            RootState::Expired => "expired",
            RootState::Deleting => "deleting",
            RootState::Deleted => "deleted",
        })
    }
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
    /// When it entered its state (unix seconds), where that matters: set on expiry,
    /// and again when an operator clears an alarm (the grace period restarts).
    pub since: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RootFile {
    pub version: u32,
    pub root: RootId,
    pub state: RootState,
    pub salt: SaltFile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
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
            since: self.since,
        };
        let mut v = serde_json::to_vec_pretty(&f).expect("serialising plain data");
        v.push(b'\n');
        v
    }

    /// Parses a root record. A refusal says what is wrong and where (line and column),
    /// never what the bytes are: they come from the store and may be anything.
    pub fn from_json(bytes: &[u8]) -> Result<RootRecord, String> {
        if bytes.len() > 64 * 1024 {
            return Err(format!(
                "{} bytes is too large for a root record",
                bytes.len()
            ));
        }
        let f: RootFile = serde_json::from_slice(bytes).map_err(describe)?;
        if f.version != 1 {
            return Err(format!("unknown version {}", f.version));
        }
        let blob = hex::decode(&f.salt.blob).map_err(|_| "the salt blob is not hex".to_owned())?;
        Ok(RootRecord {
            root: f.root,
            state: f.state,
            salt: WrappedKey {
                key_id: f.salt.key_id,
                blob,
            },
            since: f.since,
        })
    }
}

/// What is wrong with a record that did not parse, without serde_json's message, which
/// quotes the offending value.
fn describe(e: serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "it could not be read",
        Category::Syntax => "it is not JSON",
        Category::Eof => "it ends early",
        Category::Data => "a field is missing, unknown or of the wrong type or value",
    };
    format!(
        "not a root record: {what} (line {}, column {})",
        e.line(),
        e.column()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "$6$rounds=5000$hunter2hash";

    #[test]
    fn refusals_do_not_quote_the_record() {
        for bad in [
            SECRET.to_owned(),
            format!(
                r#"{{"version": 1, "root": 1, "state": "{SECRET}", "salt": {{"key_id": "k", "blob": "00"}}}}"#
            ),
            format!(
                r#"{{"version": 1, "root": "{SECRET}", "state": "active", "salt": {{"key_id": "k", "blob": "00"}}}}"#
            ),
            format!(
                r#"{{"version": 1, "root": 1, "state": "active", "salt": {{"key_id": "k", "blob": "{SECRET}"}}}}"#
            ),
            format!(r#"{{"{SECRET}": 1}}"#),
        ] {
            let e = RootRecord::from_json(bad.as_bytes()).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = RootRecord::from_json(
            br#"{"version": 1, "root": 1, "state": "sleeping",
            "salt": {"key_id": "k", "blob": "00"}}"#,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "not a root record: a field is missing, unknown or of the wrong type or value \
             (line 1, column 45)"
        );
    }

    proptest! {
        /// Any bytes: a record or a refusal, never a panic, and never an echo of a
        /// marker planted anywhere in the input.
        #[test]
        fn parser_never_echoes(prefix in ".{0,40}", suffix in ".{0,40}", raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let planted = format!("{prefix}hunter2{suffix}");
            for input in [planted.as_bytes(), &raw[..]] {
                if let Err(e) = RootRecord::from_json(input) {
                    prop_assert!(!e.contains("hunter2"));
                }
            }
            let json = format!(r#"{{"version": 1, "root": 3, "state": "{prefix}hunter2", "salt": {{"key_id": "{suffix}", "blob": "zz"}}}}"#);
            if let Err(e) = RootRecord::from_json(json.as_bytes()) {
                prop_assert!(!e.contains("hunter2"));
            }
        }

        #[test]
        fn records_round_trip(root in any::<u32>(), state in 0..5u8, key_id in "[a-z0-9._-]{0,20}", blob in proptest::collection::vec(any::<u8>(), 0..64), since in proptest::option::of(any::<u64>())) {
            let rec = RootRecord {
                root: RootId(root),
                state: [RootState::Active, RootState::Retired, RootState::Expired, RootState::Deleting, RootState::Deleted][usize::from(state)],
                salt: WrappedKey { key_id, blob },
                since,
            };
            prop_assert_eq!(RootRecord::from_json(&rec.to_json()).unwrap(), rec);
        }
    }
}
