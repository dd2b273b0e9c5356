//! The encryption context: string pairs naming what a wrapped secret protects. A KMS
//! binds every wrapped secret to its context (the keyring in its AEAD's associated data,
//! AWS KMS as its `EncryptionContext`), and unwrapping under any other context fails.

use std::collections::BTreeMap;
use std::fmt;

use lode_format::RootId;

/// What a wrapped secret protects: an ordered map of string pairs.
///
/// Its canonical form, the bytes a keyring binds, is every pair in key order as
/// `u32 LE byte length ‖ UTF-8 key ‖ u32 LE byte length ‖ UTF-8 value`.
#[derive(Clone, PartialEq, Eq)]
pub struct Context {
    pairs: BTreeMap<String, String>,
}

impl Context {
    /// The context of a manifest's data key: its root and its binding (the SHA-256 of the
    /// manifest's header, config and chunk table).
    pub fn manifest(root: RootId, binding: &[u8; 32]) -> Context {
        Context::of([
            ("lode:purpose", "manifest".to_owned()),
            ("lode:root", root.0.to_string()),
            ("lode:manifest", hex::encode(binding)),
        ])
    }

    /// The context of a root's salt.
    pub fn root_salt(root: RootId) -> Context {
        Context::of([
            ("lode:purpose", "root-salt".to_owned()),
            ("lode:root", root.0.to_string()),
        ])
    }

    fn of<const N: usize>(pairs: [(&str, String); N]) -> Context {
        Context {
            pairs: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    /// The pairs, in key order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The canonical byte form (see [`Context`]).
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.pairs {
            for s in [k, v] {
                // Both strings come from the constructors above: a few dozen bytes.
                let len = u32::try_from(s.len()).expect("context strings are short");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
        out
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.pairs()).finish()
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, v) in self.pairs() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_and_salt_contexts_name_what_they_protect() {
        let m = Context::manifest(RootId(7), &[0xab; 32]);
        assert_eq!(
            m.to_string(),
            format!(
                "lode:manifest={}, lode:purpose=manifest, lode:root=7",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            Context::root_salt(RootId(7)).to_string(),
            "lode:purpose=root-salt, lode:root=7"
        );
        assert_ne!(Context::root_salt(RootId(7)), Context::root_salt(RootId(8)));
    }

    #[test]
    fn canonical_form_is_length_prefixed_pairs_in_key_order() {
        let c = Context::root_salt(RootId(12));
        let mut want = Vec::new();
        for s in ["lode:purpose", "root-salt", "lode:root", "12"] {
            want.extend_from_slice(&u32::try_from(s.len()).unwrap().to_le_bytes());
            want.extend_from_slice(s.as_bytes());
        }
        assert_eq!(c.canonical(), want);
        assert_ne!(
            Context::manifest(RootId(1), &[0; 32]).canonical(),
            Context::manifest(RootId(1), &[1; 32]).canonical()
        );
    }
}
