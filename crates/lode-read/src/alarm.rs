//! Read alarms (docs/gc.md): a read of a root that has expired means something still
//! uses a root the collector is about to delete. The reader's read still succeeds; the
//! alarm is a marker in the store, which halts the root's deletion until an operator
//! clears it, and a line for the reader's log (the agent also counts it in its metrics).
//! This is the readers' side; clearing alarms is the collector's (`lode-image`).

use std::time::{SystemTime, UNIX_EPOCH};

use lode_format::{ManifestId, RootId};
use lode_store::{Alarm, RootState, Store};

use crate::OpenError;

/// A read of a root past its retirement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadAlarm {
    /// The root read.
    pub root: RootId,
    /// Its state at the read.
    pub state: RootState,
    /// The alarm (manifest, reader, time).
    pub alarm: Alarm,
    /// Whether this read left the store's marker (false when one for the manifest was
    /// already there, or the root is deleted and there is nothing left to halt).
    pub recorded: bool,
}

impl std::fmt::Display for ReadAlarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ALARM: root {} is {} but was read: manifest {} by {}; its deletion is halted \
             until an operator runs `lode root clear-alarm {}` (docs/gc.md)",
            self.root, self.state, self.alarm.manifest, self.alarm.reader, self.root
        )
    }
}

/// Seconds since the epoch, now: the clock of alarms and root expiry.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How a process names itself in an alarm: `<role> on <host> (pid <pid>)`.
pub fn reader_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown host".to_owned());
    format!("{role} on {host} (pid {})", std::process::id())
}

/// Checks the state of `root` before (or while) `reader` reads manifest `id` from it.
/// `Some` if the root is expired or further along: the marker is left in the store (the
/// first per manifest), and the caller logs the alarm and reads on. A root whose record
/// cannot be read is an error naming it.
pub async fn check_read(
    store: &Store,
    root: RootId,
    id: &ManifestId,
    reader: &str,
) -> Result<Option<ReadAlarm>, OpenError> {
    let rec = store.get_root(root).await?;
    check_read_in(store, root, rec.state, id, reader).await
}

/// [`check_read`] for a caller that already knows the root's state (an agent caches it).
pub async fn check_read_in(
    store: &Store,
    root: RootId,
    state: RootState,
    id: &ManifestId,
    reader: &str,
) -> Result<Option<ReadAlarm>, OpenError> {
    if !state.alarms_on_read() {
        return Ok(None);
    }
    let alarm = Alarm::new(*id, reader, unix_now());
    let recorded = if state == RootState::Deleted {
        false
    } else {
        matches!(
            store.put_alarm(root, &alarm).await?,
            lode_store::PutOutcome::Stored
        )
    };
    Ok(Some(ReadAlarm {
        root,
        state,
        alarm,
        recorded,
    }))
}
