//! The root life cycle (docs/gc.md): `rotate` retires the active root and makes a new
//! one with a fresh salt. Every state change is a conditional write — the retirement an
//! update that must find the active root's record as it was read, the new root an
//! atomic create — so of racing rotations from one state exactly one wins and the others
//! fail having changed nothing.

use lode_format::{RootId, Secret32};
use lode_kms::{Context, Kms};
use lode_store::{RootRecord, RootState, Store, StoreError};
use serde::Serialize;

use crate::{ImageError, failpoint};

/// What a rotation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rotation {
    /// The root it retired; `None` when it finished a rotation interrupted after the
    /// retirement (the retired root is then `finished`).
    pub retired: Option<RootId>,
    /// A rotation interrupted after retiring this root, now finished.
    pub finished: Option<RootId>,
    /// The new active root.
    pub active: RootId,
}

/// Retires the active root and makes the next one active with a fresh salt wrapped by
/// `kms` under `key_id`. With no active root because an earlier rotation stopped after
/// retiring the newest root, it makes the next root (finishing that rotation).
pub async fn rotate(store: &Store, kms: &dyn Kms, key_id: &str) -> Result<Rotation, ImageError> {
    let roots = store.roots().await?;
    let ids = store.root_ids().await?;
    let active = store.active_among(&roots)?.cloned();
    failpoint::pause("root-rotate:after-read").await;
    let Some(newest) = ids.last().copied() else {
        return Err(ImageError::Invalid(format!(
            "store {} has no root yet: nothing to rotate (the first import makes root 1)",
            store.label()
        )));
    };
    let next = RootId(newest.0.checked_add(1).ok_or_else(|| {
        ImageError::Invalid(format!("store {}: root ids are exhausted", store.label()))
    })?);
    let mut out = Rotation {
        retired: None,
        finished: None,
        active: next,
    };
    match active {
        Some(a) => {
            let (rec, version) = store.get_root_versioned(a.root).await?;
            if rec.state != RootState::Active {
                return Err(lost(store, a.root));
            }
            let retired = RootRecord {
                state: RootState::Retired,
                ..rec
            };
            store
                .update_root(&retired, &version)
                .await
                .map_err(|e| match e {
                    StoreError::Conflict { .. } => lost(store, a.root),
                    e => e.into(),
                })?;
            out.retired = Some(a.root);
        }
        None => match roots.last() {
            Some(r) if r.root == newest && r.state != RootState::Active => {
                out.finished = Some(newest);
            }
            _ => {
                return Err(ImageError::Invalid(format!(
                    "store {}: root {newest} has no ROOT record and no root is active; \
                     lode store fsck names what is there",
                    store.label()
                )));
            }
        },
    }
    failpoint::pause("root-rotate:after-retire").await;
    let salt = Secret32::random().map_err(|_| lode_kms::KmsError::Random)?;
    let rec = RootRecord {
        root: next,
        state: RootState::Active,
        salt: kms.wrap(key_id, &salt, &Context::root_salt(next)).await?,
        since: None,
    };
    match store.create_root(&rec).await? {
        lode_store::PutOutcome::Stored => Ok(out),
        _ => Err(ImageError::Invalid(format!(
            "store {}: another rotation won (another process made root {next} first)",
            store.label()
        ))),
    }
}

fn lost(store: &Store, root: RootId) -> ImageError {
    ImageError::Invalid(format!(
        "store {}: another rotation won (root {root} was changed by another process first); \
         nothing was changed by this one",
        store.label()
    ))
}
