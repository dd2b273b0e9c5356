//! The exports a server offers: name → device, changed at runtime as the agent attaches
//! and detaches images.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::proto::MAX_NAME_LEN;
use lode_blockdev::BlockDevice;

/// One exported device, with an optional description shown by `nbdinfo`.
#[derive(Clone)]
pub struct Export {
    device: Arc<dyn BlockDevice>,
    description: Option<String>,
}

impl Export {
    pub fn new(device: Arc<dyn BlockDevice>) -> Self {
        Self {
            device,
            description: None,
        }
    }

    /// Sets the description (NBD_INFO_DESCRIPTION and the NBD_OPT_LIST entry).
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("size", &self.device.size())
            .field("read_only", &self.device.read_only())
            .field("description", &self.description)
            .finish()
    }
}

/// An export could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("export name is {length} bytes, longer than the protocol's {max}")]
    NameTooLong { length: usize, max: usize },
    #[error("export {0:?} already exists")]
    Exists(String),
    #[error("description of export {name:?} is {length} bytes, longer than {max}")]
    DescriptionTooLong {
        name: String,
        length: usize,
        max: usize,
    },
}

#[derive(Debug, Default)]
struct Table {
    exports: BTreeMap<String, Export>,
    default: Option<String>,
}

/// The server's export table. Cheap to clone; clones share the table.
///
/// A connection resolves its export once, during the handshake, and keeps that
/// device until it disconnects: removing an export refuses new connections to it but
/// does not cut existing ones.
#[derive(Debug, Clone, Default)]
pub struct Exports {
    table: Arc<RwLock<Table>>,
}

impl Exports {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // A panic while holding the lock cannot leave the map half-updated (every
        // update is one insert or remove), so a poisoned lock is still usable.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an export under `name`; fails if the name is taken or too long.
    pub fn add(&self, name: impl Into<String>, export: Export) -> Result<(), ExportError> {
        let name = name.into();
        if name.len() > MAX_NAME_LEN {
            return Err(ExportError::NameTooLong {
                length: name.len(),
                max: MAX_NAME_LEN,
            });
        }
        if let Some(d) = export.description().filter(|d| d.len() > MAX_NAME_LEN) {
            return Err(ExportError::DescriptionTooLong {
                length: d.len(),
                name,
                max: MAX_NAME_LEN,
            });
        }
        let mut table = self.write();
        if table.exports.contains_key(&name) {
            return Err(ExportError::Exists(name));
        }
        table.exports.insert(name, export);
        Ok(())
    }

    /// Removes an export; returns it if it was there.
    pub fn remove(&self, name: &str) -> Option<Export> {
        self.write().exports.remove(name)
    }

    /// Makes the empty name (what `nbd://host` and old clients ask for) resolve to
    /// `name`, or to nothing with `None`. An export actually named `""` wins.
    pub fn set_default(&self, name: Option<String>) {
        self.write().default = name;
    }

    /// The export a client asking for `name` gets.
    pub fn get(&self, name: &str) -> Option<Export> {
        self.resolve(name).map(|(_, e)| e)
    }

    /// The export a client asking for `name` gets, with its canonical name.
    pub(crate) fn resolve(&self, name: &str) -> Option<(String, Export)> {
        let table = self.read();
        if let Some(e) = table.exports.get(name) {
            return Some((name.to_owned(), e.clone()));
        }
        if name.is_empty() {
            let default = table.default.as_deref()?;
            let e = table.exports.get(default)?;
            return Some((default.to_owned(), e.clone()));
        }
        None
    }

    /// Names and descriptions of every export, sorted by name.
    pub fn list(&self) -> Vec<(String, Option<String>)> {
        self.read()
            .exports
            .iter()
            .map(|(n, e)| (n.clone(), e.description.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.read().exports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    #[test]
    fn add_remove_default() {
        let exports = Exports::new();
        let dev = Arc::new(MemDevice::new(512));
        exports
            .add("a", Export::new(dev.clone()).with_description("first"))
            .unwrap();
        exports.add("b", Export::new(dev.clone())).unwrap();
        assert_eq!(
            exports
                .add("a", Export::new(dev.clone()))
                .unwrap_err()
                .to_string(),
            "export \"a\" already exists"
        );
        assert!(exports.get("").is_none());
        exports.set_default(Some("b".into()));
        assert!(exports.get("").is_some());
        assert_eq!(
            exports.list(),
            vec![("a".into(), Some("first".into())), ("b".into(), None)]
        );
        assert!(exports.remove("b").is_some());
        assert!(exports.get("").is_none());
        assert!(matches!(
            exports.add("x".repeat(4097), Export::new(dev)),
            Err(ExportError::NameTooLong { length: 4097, .. })
        ));
    }
}
