//! What is live, defined once: a manifest is live while a tag names it or a pin holds it.
//! Everything that deletes (`lode rm --manifest`, and garbage collection after it) and
//! everything that counts live and dead bytes asks [`Liveness`], never a rule of its own.
//!
//! A tag or pin object that cannot be read might name any manifest, so while one exists
//! nothing can be proven dead: [`Liveness::holders`] answers "unknown" and a deleter
//! must refuse.

use std::collections::{BTreeMap, BTreeSet};

use lode_format::{ManifestId, RootId};
use lode_store::{Store, StoreError};
use serde::Serialize;
use thiserror::Error;

use crate::ImageError;

/// The tags and pins of a store, read once.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    tags: BTreeMap<ManifestId, Vec<String>>,
    pins: BTreeSet<ManifestId>,
    /// Tag and pin objects that could not be read, each named with why.
    unreadable: Vec<String>,
}

/// What keeps one manifest live.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Holders {
    /// Tags naming it, sorted.
    pub tags: Vec<String>,
    /// Whether a pin holds it.
    pub pinned: bool,
}

impl Holders {
    /// Whether anything holds the manifest.
    pub fn any(&self) -> bool {
        self.pinned || !self.tags.is_empty()
    }
}

impl std::fmt::Display for Holders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        match self.tags.as_slice() {
            [] => {}
            [t] => parts.push(format!("tag {t:?} names it")),
            ts => parts.push(format!(
                "tags {} name it",
                ts.iter()
                    .map(|t| format!("{t:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
        if self.pinned {
            parts.push("a pin holds it".to_owned());
        }
        f.write_str(&parts.join(" and "))
    }
}

/// Why a manifest may not be removed.
#[derive(Debug, Error)]
pub enum LiveError {
    /// A tag or pin holds it.
    #[error("manifest {id} is live: {holders} (remove them first: lode rm TAG, lode unpin ID)")]
    Held {
        /// The manifest.
        id: ManifestId,
        /// What holds it.
        holders: Holders,
    },
    /// A tag or pin object could not be read, so the manifest cannot be proven dead.
    #[error(
        "manifest {id} cannot be proven dead: {} tag or pin object(s) cannot be read ({}); \
         repair or remove them first (lode store fsck names them)",
        unreadable.len(),
        unreadable.first().map(String::as_str).unwrap_or_default()
    )]
    Unknown {
        /// The manifest.
        id: ManifestId,
        /// Each unreadable object, with why.
        unreadable: Vec<String>,
    },
    /// `lode rm ID` was given a manifest that no tag names.
    #[error(
        "no tag names manifest {id} in store {store}; to remove the manifest itself: \
         lode rm --manifest {id}"
    )]
    NoTag {
        /// The manifest.
        id: ManifestId,
        /// The store's label.
        store: String,
    },
}

impl Liveness {
    /// Reads every tag and pin of `store`.
    pub async fn load(store: &Store) -> Result<Liveness, StoreError> {
        let mut live = Liveness::default();
        let tags = store.list_tags().await?;
        for (tag, id) in tags.tags {
            live.tags.entry(id).or_default().push(tag);
        }
        live.unreadable
            .extend(tags.bad.iter().map(|b| b.error.to_string()));
        let pins = store.list_pins().await?;
        live.pins.extend(pins.pins);
        live.unreadable
            .extend(pins.bad.iter().map(|b| b.error.to_string()));
        Ok(live)
    }

    /// What holds `id`. The one definition of live: a tag names it or a pin holds it.
    pub fn holders(&self, id: &ManifestId) -> Holders {
        Holders {
            tags: self.tags.get(id).cloned().unwrap_or_default(),
            pinned: self.pins.contains(id),
        }
    }

    /// Whether `id` is live.
    pub fn is_live(&self, id: &ManifestId) -> bool {
        self.holders(id).any()
    }

    /// Ok if `id` is provably dead (nothing holds it and every tag and pin was read).
    pub fn check_dead(&self, id: &ManifestId) -> Result<(), LiveError> {
        let holders = self.holders(id);
        if holders.any() {
            return Err(LiveError::Held { id: *id, holders });
        }
        if !self.unreadable.is_empty() {
            return Err(LiveError::Unknown {
                id: *id,
                unreadable: self.unreadable.clone(),
            });
        }
        Ok(())
    }

    /// Tag and pin objects that could not be read: while any exist, the dead bytes
    /// counted from this view may be live.
    pub fn unreadable(&self) -> &[String] {
        &self.unreadable
    }
}

/// A tag `lode rm` removed, and the manifest it named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Untagged {
    /// The tag.
    pub tag: String,
    /// The manifest it named.
    pub id: ManifestId,
}

/// Removes tag `image` or, when `image` is a manifest id, every tag that names that
/// manifest (a tag repointed meanwhile names another manifest now, and is left alone).
/// An empty answer means the tag existed but could not be read: it is removed all the same.
pub async fn untag(store: &Store, image: &str) -> Result<Vec<Untagged>, ImageError> {
    let Ok(id) = image.parse::<ManifestId>() else {
        return Ok(store
            .remove_tag(image)
            .await?
            .map(|id| Untagged {
                tag: image.to_owned(),
                id,
            })
            .into_iter()
            .collect());
    };
    let tags: Vec<String> = store
        .list_tags()
        .await?
        .tags
        .into_iter()
        .filter(|(_, t)| *t == id)
        .map(|(tag, _)| tag)
        .collect();
    if tags.is_empty() {
        return Err(LiveError::NoTag {
            id,
            store: store.label().to_owned(),
        }
        .into());
    }
    let mut out = Vec::new();
    for tag in tags {
        if store.get_tag(&tag).await? == id {
            store.remove_tag(&tag).await?;
            out.push(Untagged { tag, id });
        }
    }
    Ok(out)
}

/// What `lode rm --manifest` removed.
#[derive(Clone, Debug, Serialize)]
pub struct RemovedManifest {
    /// The manifest.
    pub id: ManifestId,
    /// The roots it was removed from.
    pub roots: Vec<RootId>,
}

/// Removes manifest `id` from every root that holds it, if it is dead. Its chunks stay:
/// they go when their root is collected. A tag or pin that appears while the manifest is
/// being removed (a publisher of the same image, racing) is seen by a second look after
/// the delete, which puts the manifest back.
pub async fn remove_manifest(
    store: &Store,
    id: &ManifestId,
) -> Result<RemovedManifest, ImageError> {
    Liveness::load(store).await?.check_dead(id)?;
    let mut removed = Vec::new();
    for root in store.roots().await? {
        let bytes = match store.get_manifest(root.root, id).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        store.remove_manifest(root.root, id).await?;
        removed.push((root.root, bytes));
    }
    if removed.is_empty() {
        return Err(StoreError::NotFound {
            store: store.label().to_owned(),
            what: "manifest",
            key: id.to_hex(),
        }
        .into());
    }
    if let Err(e) = Liveness::load(store).await?.check_dead(id) {
        for (root, bytes) in removed {
            store.put_manifest(root, bytes).await?;
        }
        return Err(e.into());
    }
    Ok(RemovedManifest {
        id: *id,
        roots: removed.into_iter().map(|(r, _)| r).collect(),
    })
}

/// Pins manifest `id`, so it stays live without a tag. Only a manifest the store holds
/// can be pinned (a pin on nothing would hide a typo), and only one in a root that may
/// still hold live manifests: a manifest copied forward is refused, naming the id it was
/// copied to, and one of an expired root (dead when the root expired, and due to be
/// deleted with it) is refused.
pub async fn pin(store: &Store, id: &ManifestId) -> Result<lode_store::PutOutcome, ImageError> {
    let (root, _) = store.find_manifest(id).await?;
    let state = store.get_root(root).await?.state;
    if !matches!(
        state,
        lode_store::RootState::Active | lode_store::RootState::Retired
    ) {
        return Err(match store.get_forward(root, id).await? {
            Some(to) => ImageError::Invalid(format!(
                "manifest {id} of root {root} ({state}) was copied forward as manifest {to}: \
                 pin that (lode pin {to})"
            )),
            None => ImageError::Invalid(format!(
                "manifest {id} is in root {root}, which is {state}: nothing held it when the \
                 root expired, and it goes with the root; import or flatten the image again \
                 to keep it"
            )),
        });
    }
    Ok(store.put_pin(id).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_and_unknown_are_named() {
        let id = ManifestId::of(b"m");
        let mut live = Liveness::default();
        assert!(live.check_dead(&id).is_ok());
        live.tags.insert(id, vec!["a:1".into(), "b:2".into()]);
        live.pins.insert(id);
        assert_eq!(
            live.check_dead(&id).unwrap_err().to_string(),
            format!(
                "manifest {id} is live: tags \"a:1\", \"b:2\" name it and a pin holds it \
                 (remove them first: lode rm TAG, lode unpin ID)"
            )
        );
        let other = ManifestId::of(b"n");
        assert!(!live.is_live(&other));
        live.unreadable.push("tag x is corrupt".into());
        assert_eq!(
            live.check_dead(&other).unwrap_err().to_string(),
            format!(
                "manifest {other} cannot be proven dead: 1 tag or pin object(s) cannot be \
                 read (tag x is corrupt); repair or remove them first (lode store fsck names \
                 them)"
            )
        );
    }
}
