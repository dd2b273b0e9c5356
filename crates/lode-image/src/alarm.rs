//! Clearing read alarms (docs/gc.md, `lode root clear-alarm`): a root's alarm markers
//! removed and, if it is expired, its grace period restarted. Raising an alarm is the
//! readers' side, on the read path (`lode_read::check_read`).

use lode_format::RootId;
use lode_store::{RootState, Store};

use crate::{ImageError, unix_now};

/// What [`clear_alarms`] did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cleared {
    /// The root.
    pub root: RootId,
    /// How many alarm objects were removed.
    pub cleared: usize,
    /// Whether the grace period restarted (the root is expired).
    pub grace_restarted: bool,
}

/// Removes the alarms of `root` and, if it is expired, starts its grace period again, so
/// that a reader still on it has the whole period to raise another alarm.
pub async fn clear_alarms(store: &Store, root: RootId) -> Result<Cleared, ImageError> {
    let (rec, version) = store.get_root_versioned(root).await?;
    if rec.state != RootState::Expired {
        let n = store.list_alarms(root).await?.len();
        if n == 0 {
            return Err(ImageError::Invalid(format!(
                "root {root} of store {} is {} and has no alarms to clear",
                store.label(),
                rec.state
            )));
        }
    }
    // The restart is written first: a collector that read the record before it cannot
    // advance the root once the record changed, and one that reads it after waits.
    let grace_restarted = rec.state == RootState::Expired;
    if grace_restarted {
        let restarted = lode_store::RootRecord {
            since: Some(unix_now()),
            ..rec
        };
        store
            .update_root(&restarted, &version)
            .await
            .map_err(|e| match e {
                lode_store::StoreError::Conflict { .. } => ImageError::Invalid(format!(
                    "root {root} was changed by another process while its alarms were being \
                     cleared; nothing was cleared: run `lode root clear-alarm {root}` again"
                )),
                e => e.into(),
            })?;
    }
    let cleared = store.clear_alarms(root).await?;
    Ok(Cleared {
        root,
        cleared,
        grace_restarted,
    })
}
