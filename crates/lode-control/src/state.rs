//! The service's state, kept in the store under `control/` so that it survives a restart
//! and replicas over one store share it: `control/workers/<id>` (where a worker takes
//! orders, its capacity, what it has attached and warm, its last heartbeat) and
//! `control/assignments/<manifest>/<worker>` (the live starts of that manifest there, each
//! with its lease).
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

/// One start of a manifest on a worker: while its lease lasts, the worker may have the
/// manifest's data key for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartLease {
    /// The start's id.
    pub start: String,
    /// The image as the user named it.
    pub image: String,
    /// The attachment's name on the worker.
    pub name: String,
    /// When the lease ends unless renewed (Unix milliseconds).
    pub lease_expires_unix_ms: u64,
    /// When the start was placed (Unix milliseconds).
    pub created_unix_ms: u64,
}

impl StartLease {
    /// Whether the lease still holds at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms < self.lease_expires_unix_ms
    }
}

/// A manifest assigned to a worker: the starts of it placed there, each with its own
/// lease. A worker may run one image several times; each start keeps its key until it
/// is released or its lease ends, whatever later starts of the same image do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// The manifest (64 hex digits).
    pub manifest: String,
    /// The worker.
    pub worker: String,
    /// Its starts, oldest first.
    pub starts: Vec<StartLease>,
}

impl AssignmentRecord {
    /// The start `start`, if it is one of this record's.
    pub fn start(&self, start: &str) -> Option<&StartLease> {
        self.starts.iter().find(|s| s.start == start)
    }

    /// How many of its starts' leases hold at `now_ms`.
    pub fn live(&self, now_ms: u64) -> usize {
        self.starts.iter().filter(|s| s.live(now_ms)).count()
    }
}

/// The most starts of one manifest one worker holds at once, whatever its capacity says
/// (a record must fit the store's limit on control objects).
pub const MAX_STARTS_PER_ASSIGNMENT: usize = 32;

/// How often a read-modify-write of an assignment is retried when another writer got in
/// between, before the store is reported busy.
const UPDATE_ATTEMPTS: usize = 16;

/// Why a start could not be added to an assignment.
#[derive(Debug)]
pub enum AddStartError {
    /// The worker already runs this many live starts of the manifest.
    Full(usize),
    /// The store failed.
    Store(StoreError),
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

    /// Applies `change` to the assignment of `manifest` to `worker` (an empty one if there
    /// is none) and writes it back only if nobody wrote it in between, retrying on a lost
    /// race. `change` answers what to return, or `None` to leave the record as it is.
    async fn modify<T>(
        &self,
        manifest: &ManifestId,
        worker: &str,
        mut change: impl FnMut(&mut AssignmentRecord) -> Option<T>,
        unchanged: T,
    ) -> Result<T, StoreError> {
        let key = assignment_key(manifest, worker);
        for _ in 0..UPDATE_ATTEMPTS {
            let found = self.assignment(manifest, worker).await?;
            let (mut record, version) = match found {
                Some((record, version)) => (record, Some(version)),
                None => (
                    AssignmentRecord {
                        manifest: manifest.to_hex(),
                        worker: worker.to_owned(),
                        starts: Vec::new(),
                    },
                    None,
                ),
            };
            let Some(answer) = change(&mut record) else {
                return Ok(unchanged);
            };
            let body = Bytes::from(serde_json::to_vec(&record).map_err(|e| corrupt(&key, e))?);
            let written = match &version {
                Some(version) => self.store.update_control(&key, body, version).await,
                None => match self.store.create_control(&key, body).await? {
                    lode_store::PutOutcome::Stored => Ok(()),
                    // Another writer created it first: read it again.
                    _ => continue,
                },
            };
            match written {
                Ok(()) => return Ok(answer),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            store: String::from("control"),
            object: format!("control/{key}"),
        })
    }

    /// Adds `lease` to the starts of `manifest` on `worker`, dropping starts whose leases
    /// ended; refused when `bound` live starts are there already.
    pub async fn add_start(
        &self,
        manifest: &ManifestId,
        worker: &str,
        lease: StartLease,
        bound: usize,
    ) -> Result<(), AddStartError> {
        let bound = bound.min(MAX_STARTS_PER_ASSIGNMENT);
        let now = lease.created_unix_ms;
        let mut full = None;
        self.modify(
            manifest,
            worker,
            |record| {
                record.starts.retain(|s| s.live(now));
                if record.starts.len() >= bound {
                    full = Some(record.starts.len());
                    return None;
                }
                full = None;
                record.starts.push(lease.clone());
                Some(())
            },
            (),
        )
        .await
        .map_err(AddStartError::Store)?;
        match full {
            Some(n) => Err(AddStartError::Full(n)),
            None => Ok(()),
        }
    }

    /// Removes start `start` of `manifest` from `worker`; whether it was there.
    pub async fn remove_start(
        &self,
        manifest: &ManifestId,
        worker: &str,
        start: &str,
    ) -> Result<bool, StoreError> {
        self.modify(
            manifest,
            worker,
            |record| {
                let before = record.starts.len();
                record.starts.retain(|s| s.start != start);
                (record.starts.len() != before).then_some(true)
            },
            false,
        )
        .await
    }

    /// Extends to `until` the leases of the starts of `manifest` on `worker` that still
    /// hold at `now`; how many were renewed. An ended lease stays ended.
    pub async fn renew(
        &self,
        manifest: &ManifestId,
        worker: &str,
        now: u64,
        until: u64,
    ) -> Result<usize, StoreError> {
        self.modify(
            manifest,
            worker,
            |record| {
                let mut renewed = 0;
                for s in record.starts.iter_mut().filter(|s| s.live(now)) {
                    s.lease_expires_unix_ms = s.lease_expires_unix_ms.max(until);
                    renewed += 1;
                }
                (renewed > 0).then_some(renewed)
            },
            0,
        )
        .await
    }

    /// Every assignment that holds a start, of one manifest or of all.
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
                let record: AssignmentRecord =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))?;
                if !record.starts.is_empty() {
                    out.push(record);
                }
            }
        }
        Ok(out)
    }
}
