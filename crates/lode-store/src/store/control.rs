//! The control plane's records: small JSON objects under `control/` that the assignment
//! service keeps in the store, so they survive a restart and every replica over one
//! store sees the same ones. Keys are `/`-separated segments of `A-Z a-z 0-9 . _ -`
//! (1 to 64 bytes each, at most four, not `.` or `..`); reads are capped at
//! [`MAX_CONTROL_OBJECT`] bytes; writes are plain, create-if-absent, or
//! update-if-unchanged (a conditional write, refused where the backend cannot do one).

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::{ObjectVersion, PutOutcome, Store, StoreError};

/// The largest control record lode reads.
pub const MAX_CONTROL_OBJECT: u64 = 16 * 1024;
/// The most records one listing returns; more is an error rather than an unbounded list.
pub const MAX_CONTROL_LIST: usize = 100_000;

impl Store {
    fn control_path(&self, key: &str) -> Result<Path, StoreError> {
        check_control_key(key)?;
        Ok(self.path(
            std::iter::once(PathPart::from("control"))
                .chain(key.split('/').map(|s| PathPart::from(s.to_owned()))),
        ))
    }

    /// The record at `control/<key>` and its version, or `None` if there is none.
    pub async fn get_control(
        &self,
        key: &str,
    ) -> Result<Option<(Bytes, ObjectVersion)>, StoreError> {
        let path = self.control_path(key)?;
        match self
            .read_versioned(&path, "control record", key.to_owned(), MAX_CONTROL_OBJECT)
            .await
        {
            Ok((bytes, version)) => Ok(Some((bytes, ObjectVersion(version)))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates `control/<key>` unless something is there: [`PutOutcome::Stored`], or
    /// [`PutOutcome::AlreadyPresent`] (whatever it holds) without writing.
    pub async fn create_control(&self, key: &str, bytes: Bytes) -> Result<PutOutcome, StoreError> {
        let path = self.control_path(key)?;
        check_size(self, &path, &bytes)?;
        self.put_create(&path, bytes).await
    }

    /// Replaces `control/<key>` only if it is still the version `read`;
    /// [`StoreError::Conflict`] if it changed or is gone.
    pub async fn update_control(
        &self,
        key: &str,
        bytes: Bytes,
        read: &ObjectVersion,
    ) -> Result<(), StoreError> {
        let path = self.control_path(key)?;
        check_size(self, &path, &bytes)?;
        self.put_if_unchanged(&path, bytes, read).await
    }

    /// Writes `control/<key>`, replacing whatever is there.
    pub async fn put_control(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.control_path(key)?;
        check_size(self, &path, &bytes)?;
        let opts = PutOptions {
            mode: PutMode::Overwrite,
            ..Default::default()
        };
        self.os
            .put_opts(&path, PutPayload::from_bytes(bytes), opts)
            .await
            .map_err(|e| self.backend("put", &path, e))?;
        Ok(())
    }

    /// The keys under `control/<prefix>/`, relative to `control/`, sorted. Names that are
    /// not valid keys (put there by something else) are skipped.
    pub async fn list_control(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let path = self.control_path(prefix)?;
        let mut stream = self.os.list(Some(&path));
        let mut keys = Vec::new();
        while let Some(meta) = stream
            .try_next()
            .await
            .map_err(|e| self.backend("list", &path, e))?
        {
            let parts: Vec<String> = meta
                .location
                .prefix_match(&self.path([PathPart::from("control")]))
                .map(|rest| rest.map(|p| p.as_ref().to_owned()).collect())
                .unwrap_or_default();
            let key = parts.join("/");
            if check_control_key(&key).is_err() {
                continue;
            }
            if keys.len() == MAX_CONTROL_LIST {
                return Err(StoreError::BadControlKey {
                    key: prefix.to_owned(),
                    reason: "more than 100000 records under it",
                });
            }
            keys.push(key);
        }
        keys.sort();
        Ok(keys)
    }

    /// Deletes `control/<key>`; deleting what is not there is not an error.
    pub async fn delete_control(&self, key: &str) -> Result<(), StoreError> {
        let path = self.control_path(key)?;
        match self.os.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("delete", &path, e)),
        }
    }
}

fn check_size(store: &Store, path: &Path, bytes: &Bytes) -> Result<(), StoreError> {
    let size = bytes.len() as u64;
    if size > MAX_CONTROL_OBJECT {
        return Err(StoreError::TooLarge {
            store: store.label.clone(),
            what: "control record",
            object: path.to_string(),
            size,
            max: MAX_CONTROL_OBJECT,
        });
    }
    Ok(())
}

/// Checks a control key: 1 to 4 segments of 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, none
/// `.` or `..`.
pub fn check_control_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| StoreError::BadControlKey {
        key: key.chars().take(300).collect(),
        reason,
    };
    let segments: Vec<&str> = key.split('/').collect();
    if segments.len() > 4 {
        return Err(bad("it has more than four segments"));
    }
    for segment in segments {
        if segment.is_empty() || segment.len() > 64 {
            return Err(bad("each segment must be 1 to 64 bytes"));
        }
        if segment == "." || segment == ".." {
            return Err(bad("'.' and '..' are not segments"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad("segments use only A-Z a-z 0-9 . _ -"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_are_created_updated_listed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        assert!(store.get_control("workers/w1").await.unwrap().is_none());
        let first = Bytes::from_static(b"{\"a\":1}");
        assert_eq!(
            store
                .create_control("workers/w1", first.clone())
                .await
                .unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(
            store
                .create_control("workers/w1", Bytes::from_static(b"x"))
                .await
                .unwrap(),
            PutOutcome::AlreadyPresent
        );
        let (bytes, version) = store.get_control("workers/w1").await.unwrap().unwrap();
        assert_eq!(bytes, first);
        store
            .update_control("workers/w1", Bytes::from_static(b"2"), &version)
            .await
            .unwrap();
        let err = store
            .update_control("workers/w1", Bytes::from_static(b"3"), &version)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        store
            .put_control("assignments/m/w1", Bytes::from_static(b"a"))
            .await
            .unwrap();
        store
            .put_control("assignments/m/w2", Bytes::from_static(b"b"))
            .await
            .unwrap();
        assert_eq!(
            store.list_control("assignments").await.unwrap(),
            vec!["assignments/m/w1", "assignments/m/w2"]
        );
        assert_eq!(
            store.list_control("workers").await.unwrap(),
            vec!["workers/w1"]
        );
        store.delete_control("assignments/m/w1").await.unwrap();
        store.delete_control("assignments/m/w1").await.unwrap();
        assert_eq!(
            store.list_control("assignments/m").await.unwrap(),
            vec!["assignments/m/w2"]
        );
        let big = Bytes::from(vec![b'x'; 20_000]);
        assert!(matches!(
            store.put_control("workers/w9", big).await.unwrap_err(),
            StoreError::TooLarge { .. }
        ));
    }

    #[test]
    fn bad_keys_are_refused() {
        for key in ["", "a//b", "../x", "a/./b", "a b", "a/b/c/d/e", "é"] {
            let err = check_control_key(key).unwrap_err().to_string();
            assert!(err.contains("control key"), "{key}: {err}");
        }
        check_control_key("assignments/0123/w-1.x_y").unwrap();
    }

    proptest::proptest! {
        #[test]
        fn valid_keys_are_exactly_the_safe_ones(key in "\\PC{0,100}") {
            if check_control_key(&key).is_ok() {
                proptest::prop_assert!(key.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
                proptest::prop_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)));
            }
        }
    }
}
