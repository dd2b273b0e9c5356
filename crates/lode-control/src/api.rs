//! The wire types of the control API: JSON bodies, every id spelled as text and parsed at
//! the edge. Manifest ids are 64 hex digits; worker ids use 1 to 64 of `A-Z a-z 0-9 . _ -`.

use serde::{Deserialize, Serialize};

/// Who a caller is, as its certificate (or, on a Unix socket, the socket's owner) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A control service replica: may send attach orders to workers.
    Control,
    /// A worker: registers, heartbeats, asks for the keys of its own assignments.
    Worker,
    /// An operator or a front end: may ask for starts and read the state.
    Admin,
}

/// A caller: its role and its id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// What it may do.
    pub role: Role,
    /// Its name (a worker id, a replica name, an operator).
    pub id: String,
}

/// `POST /v1/workers/register`, from a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The worker's id; must be the caller's.
    pub worker: String,
    /// Where the worker takes attach orders (`host:port`).
    pub address: String,
    /// How many images it may have attached at once.
    pub capacity: u32,
}

/// `POST /v1/workers/heartbeat`, from a worker, every few seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The worker's id; must be the caller's.
    pub worker: String,
    /// Manifest ids attached now.
    pub attached: Vec<String>,
    /// Manifest ids whose chunks its cache holds (attached now or lately), newest first.
    pub warm: Vec<String>,
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The manifests whose assignment leases were renewed.
    pub renewed: Vec<String>,
    /// When those leases now end (Unix milliseconds).
    pub lease_expires_unix_ms: u64,
}

/// How a start found its worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placed {
    /// The worker already had the image warm.
    Warm,
    /// By consistent hashing of the image over the workers, with bounded load.
    Hashed,
}

/// `POST /v1/start`, from an admin: run `image` somewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// A tag or a manifest id.
    pub image: String,
}

/// The answer to a start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartReply {
    /// The start's id (random, 32 hex digits).
    pub start: String,
    /// The worker it went to.
    pub worker: String,
    /// The manifest the image resolved to.
    pub manifest: String,
    /// The attachment's name on that worker.
    pub name: String,
    /// How the worker was chosen.
    pub placed: Placed,
    /// When the assignment's lease ends unless renewed (Unix milliseconds).
    pub lease_expires_unix_ms: u64,
    /// The worker's NBD export name, if it serves NBD.
    pub nbd_export: Option<String>,
    /// The image's file in the worker's FUSE mount, if it has one.
    pub file: Option<String>,
}

/// `POST /v1/attach`, from a control replica to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachOrder {
    /// The start this serves.
    pub start: String,
    /// The image as the user named it.
    pub image: String,
    /// The manifest it resolved to; the worker attaches exactly this one.
    pub manifest: String,
    /// The attachment's name.
    pub name: String,
    /// When the assignment's lease ends unless renewed (Unix milliseconds).
    pub lease_expires_unix_ms: u64,
}

/// A worker's answer to an attach order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachReply {
    /// The attachment's name.
    pub name: String,
    /// Its NBD export name, if the worker serves NBD.
    pub nbd_export: Option<String>,
    /// Its file in the worker's FUSE mount, if there is one.
    pub file: Option<String>,
}

/// `POST /v1/keys`, from a worker: the data key of a manifest assigned to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRequest {
    /// The worker's id; must be the caller's.
    pub worker: String,
    /// The manifest.
    pub manifest: String,
    /// The start the attach order named.
    pub start: String,
}

/// A granted data key: it opens exactly one manifest's key table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGrant {
    /// The manifest.
    pub manifest: String,
    /// Its data key, 64 hex digits.
    pub data_key: String,
    /// When the assignment's lease ends unless renewed (Unix milliseconds).
    pub lease_expires_unix_ms: u64,
}

/// `POST /v1/release`, from a worker that detached an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The worker's id; must be the caller's.
    pub worker: String,
    /// The manifest.
    pub manifest: String,
    /// The start the attach order named.
    pub start: String,
}

/// Every error answer: `{"error": "…"}`, naming who asked for what and why it was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The message.
    pub error: String,
}
