//! The service's state, kept in the store under `control/` so that it survives a restart
//! and replicas over one store share it: `control/workers/<id>` (where a worker takes
//! orders, its capacity, what it has attached and warm, its last heartbeat) and
//! `control/assignments/<manifest>/<worker>` (the start, its lease, when it was made).
//! Nothing here is cached: every decision reads the records it rests on.

use bytes::Bytes;
use lode_format::ManifestId;
use lode_store::{ObjectVersion, Store, StoreError};
use serde::{Deserialize, Serialize};

/// A registered worker, as its last register or heartbeat left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Its id.
    pub worker: String,
    /// Where it takes attach orders.
    pub address: String,
    /// How many images it may have attached at once.
    pub capacity: u32,
    /// Manifest ids attached at its last heartbeat.
    pub attached: Vec<String>,
    /// Manifest ids its cache holds, newest first.
    pub warm: Vec<String>,
    /// Its last register or heartbeat (Unix milliseconds).
    pub heartbeat_unix_ms: u64,
}

/// A start placed on a worker: while its lease lasts, the worker may have the manifest's
/// data key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// The manifest (64 hex digits).
    pub manifest: String,
    /// The worker.
    pub worker: String,
    /// The start's id.
    pub start: String,
    /// The image as the user named it.
    pub image: String,
    /// The attachment's name on the worker.
    pub name: String,
    /// When the lease ends unless renewed (Unix milliseconds).
    pub lease_expires_unix_ms: u64,
    /// When the assignment was made (Unix milliseconds).
    pub created_unix_ms: u64,
}

impl AssignmentRecord {
    /// Whether the lease still holds at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms < self.lease_expires_unix_ms
    }
}

/// The records, in one store.
#[derive(Clone, Debug)]
pub struct State {
    store: Store,
}

fn worker_key(worker: &str) -> String {
    format!("workers/{worker}")
}

fn assignment_key(manifest: &ManifestId, worker: &str) -> String {
    format!("assignments/{}/{worker}", manifest.to_hex())
}

fn corrupt(key: &str, e: serde_json::Error) -> StoreError {
    StoreError::CorruptObject {
        store: String::from("control"),
        object: format!("control/{key}"),
        reason: e.to_string(),
    }
}

impl State {
    /// The state in `store`.
    pub fn new(store: Store) -> State {
        State { store }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes a worker's record.
    pub async fn put_worker(&self, record: &WorkerRecord) -> Result<(), StoreError> {
        let body = serde_json::to_vec(record).map_err(|e| corrupt(&record.worker, e))?;
        self.store
            .put_control(&worker_key(&record.worker), Bytes::from(body))
            .await
    }

    /// A worker's record, if it registered.
    pub async fn worker(&self, worker: &str) -> Result<Option<WorkerRecord>, StoreError> {
        let key = worker_key(worker);
        match self.store.get_control(&key).await? {
            None => Ok(None),
            Some((bytes, _)) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
        }
    }

    /// Every registered worker, by id. A damaged record is an error naming it.
    pub async fn workers(&self) -> Result<Vec<WorkerRecord>, StoreError> {
        let mut out = Vec::new();
        for key in self.store.list_control("workers").await? {
            if let Some((bytes, _)) = self.store.get_control(&key).await? {
                out.push(serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))?);
            }
        }
        Ok(out)
    }

    /// Records an assignment, replacing an earlier one of the same manifest to the same
    /// worker.
    pub async fn put_assignment(
        &self,
        manifest: &ManifestId,
        record: &AssignmentRecord,
    ) -> Result<(), StoreError> {
        let key = assignment_key(manifest, &record.worker);
        let body = serde_json::to_vec(record).map_err(|e| corrupt(&key, e))?;
        self.store.put_control(&key, Bytes::from(body)).await
    }

    /// The assignment of `manifest` to `worker` and its version, read from the store now.
    pub async fn assignment(
        &self,
        manifest: &ManifestId,
        worker: &str,
    ) -> Result<Option<(AssignmentRecord, ObjectVersion)>, StoreError> {
        let key = assignment_key(manifest, worker);
        match self.store.get_control(&key).await? {
            None => Ok(None),
            Some((bytes, version)) => {
                let record: AssignmentRecord =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))?;
                Ok(Some((record, version)))
            }
        }
    }

    /// Replaces an assignment only if it is unchanged since `read` (a release or a new
    /// start in between wins).
    pub async fn update_assignment(
        &self,
        manifest: &ManifestId,
        record: &AssignmentRecord,
        read: &ObjectVersion,
    ) -> Result<(), StoreError> {
        let key = assignment_key(manifest, &record.worker);
        let body = serde_json::to_vec(record).map_err(|e| corrupt(&key, e))?;
        self.store
            .update_control(&key, Bytes::from(body), read)
            .await
    }

    /// Deletes the assignment of `manifest` to `worker`.
    pub async fn delete_assignment(
        &self,
        manifest: &ManifestId,
        worker: &str,
    ) -> Result<(), StoreError> {
        self.store
            .delete_control(&assignment_key(manifest, worker))
            .await
    }

    /// Every assignment, of one manifest or of all.
    pub async fn assignments(
        &self,
        manifest: Option<&ManifestId>,
    ) -> Result<Vec<AssignmentRecord>, StoreError> {
        let prefix = match manifest {
            Some(id) => format!("assignments/{}", id.to_hex()),
            None => "assignments".to_owned(),
        };
        let mut out = Vec::new();
        for key in self.store.list_control(&prefix).await? {
            if let Some((bytes, _)) = self.store.get_control(&key).await? {
                out.push(serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))?);
            }
        }
        Ok(out)
    }
}
