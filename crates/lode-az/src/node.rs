//! One cache node as the client sees it: a small connection pool, a per-request timeout,
//! and its health.
//!
//! Health: every request that times out or fails at the transport or protocol level
//! counts against the node; `down_after` such failures in a row mark it down, and from
//! then on requests skip it (a read treats its stripe as missing, costing nothing) until
//! `retry_down_after` has passed; the next request that wants it then starts a probe
//! (`version`) in the background, and the node is up again when the probe, or any
//! request, succeeds. An error reply (`SERVER_ERROR …`) is counted but shows a live
//! node, so it does not count towards down.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::config::AzConfig;
use crate::memcache::{Connection, McError};
use crate::metrics::{NodeCounters, NodeMetrics};

/// A request to a node.
#[derive(Clone, Copy, Debug)]
enum Request<'a> {
    Get(&'a str),
    Set(&'a str, &'a [u8]),
    Delete(&'a str),
    Version,
}

/// Its answer.
#[derive(Debug)]
enum Response {
    Value(Option<Bytes>),
    Done(bool),
    Version,
}

impl Request<'_> {
    async fn run(self, conn: &mut Connection) -> Result<Response, McError> {
        Ok(match self {
            Request::Get(key) => Response::Value(conn.get(key).await?),
            Request::Set(key, value) => Response::Done(conn.set(key, 0, value).await?),
            Request::Delete(key) => Response::Done(conn.delete(key).await?),
            Request::Version => {
                conn.version().await?;
                Response::Version
            }
        })
    }
}

/// `Request::run` answers each request with its own kind of response.
fn unreachable_reply<T>() -> Result<T, Failure> {
    Err(Failure::Error(McError::Unexpected {
        command: "request",
        reply: "a response of another kind".into(),
    }))
}

/// Why a request to a node failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// It took longer than `node_timeout`.
    Timeout,
    /// It failed.
    Error(McError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timed out"),
            Failure::Error(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Debug)]
struct Health {
    failures: u32,
    down: bool,
    next_probe: Instant,
    probing: bool,
}

/// A cache node.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) addr: String,
    cfg: Arc<AzConfig>,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
    health: Mutex<Health>,
    pub(crate) counters: NodeCounters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; a poisoned lock still holds a valid
    // value (a list of connections, a health record).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    pub(crate) fn new(addr: String, cfg: Arc<AzConfig>) -> Self {
        Self {
            addr,
            idle: Mutex::new(Vec::with_capacity(cfg.connections_per_node)),
            permits: Semaphore::new(cfg.connections_per_node),
            health: Mutex::new(Health {
                failures: 0,
                down: false,
                next_probe: Instant::now(),
                probing: false,
            }),
            counters: NodeCounters::default(),
            cfg,
        }
    }

    /// Whether requests should go to this node now. A down node whose retry interval
    /// has passed gets a probe started (in the background: the caller skips the node
    /// this time either way).
    pub(crate) fn available(self: &Arc<Self>) -> bool {
        let mut h = lock(&self.health);
        if !h.down {
            return true;
        }
        if !h.probing && Instant::now() >= h.next_probe {
            h.probing = true;
            tokio::spawn(Arc::clone(self).probe());
        }
        false
    }

    async fn probe(self: Arc<Self>) {
        let r = self.call(Request::Version).await;
        let mut h = lock(&self.health);
        h.probing = false;
        if r.is_err() {
            h.next_probe = Instant::now() + self.cfg.retry_down_after;
        }
    }

    /// `get`.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Bytes>, Failure> {
        match self.call(Request::Get(key)).await? {
            Response::Value(v) => Ok(v),
            _ => unreachable_reply(),
        }
    }

    /// `set`: `Ok(false)` for `NOT_STORED`.
    pub(crate) async fn set(&self, key: &str, value: &[u8]) -> Result<bool, Failure> {
        match self.call(Request::Set(key, value)).await? {
            Response::Done(stored) => Ok(stored),
            _ => unreachable_reply(),
        }
    }

    /// `delete`.
    pub(crate) async fn delete(&self, key: &str) -> Result<bool, Failure> {
        match self.call(Request::Delete(key)).await? {
            Response::Done(deleted) => Ok(deleted),
            _ => unreachable_reply(),
        }
    }

    /// Runs one request on a pooled connection within `node_timeout`, keeping the
    /// health and counters. A connection goes back to the pool only after a request
    /// succeeded on it; one that failed, timed out or was cancelled mid-request is
    /// closed, as its stream may be out of step.
    async fn call(&self, req: Request<'_>) -> Result<Response, Failure> {
        let attempt = async {
            let Ok(_permit) = self.permits.acquire().await else {
                return Err(McError::Closed);
            };
            let idle = lock(&self.idle).pop();
            let reused = idle.is_some();
            let mut conn = match idle {
                Some(c) => c,
                None => Connection::connect(&self.addr, self.cfg.max_value).await?,
            };
            let mut r = req.run(&mut conn).await;
            // A pooled connection the server has since closed (a restart, an idle
            // timeout) fails before any reply: once, on a fresh one.
            if reused && r.as_ref().is_err_and(McError::is_stale_connection) {
                conn = Connection::connect(&self.addr, self.cfg.max_value).await?;
                r = req.run(&mut conn).await;
            }
            if r.is_ok() {
                lock(&self.idle).push(conn);
            }
            r
        };
        let r = match tokio::time::timeout(self.cfg.node_timeout, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failure::Error(e)),
            Err(_) => Err(Failure::Timeout),
        };
        match &r {
            Ok(_) => self.alive(),
            Err(Failure::Error(e)) if e.server_answered() => {
                self.counters.errors.inc();
                self.alive();
            }
            Err(Failure::Error(_)) => {
                self.counters.errors.inc();
                self.failed();
            }
            Err(Failure::Timeout) => {
                self.counters.timeouts.inc();
                self.failed();
            }
        }
        r
    }

    fn alive(&self) {
        let mut h = lock(&self.health);
        h.failures = 0;
        h.down = false;
    }

    fn failed(&self) {
        let mut h = lock(&self.health);
        h.failures = h.failures.saturating_add(1);
        if !h.down && h.failures >= self.cfg.down_after {
            h.down = true;
            h.next_probe = Instant::now() + self.cfg.retry_down_after;
            drop(h);
            self.counters.marked_down.inc();
            // Its idle connections are likely dead too; the probe connects afresh.
            lock(&self.idle).clear();
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        !lock(&self.health).down
    }

    pub(crate) fn metrics(&self) -> NodeMetrics {
        let c = &self.counters;
        NodeMetrics {
            node: self.addr.clone(),
            up: self.is_up(),
            hits: c.hits.get(),
            misses: c.misses.get(),
            timeouts: c.timeouts.get(),
            errors: c.errors.get(),
            integrity_failures: c.integrity_failures.get(),
            stores: c.stores.get(),
            marked_down: c.marked_down.get(),
        }
    }
}
