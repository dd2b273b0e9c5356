//! The NBD server: listeners, the fixed-newstyle handshake and the transmission phase.
//!
//! A connection is admitted only while fewer than `max_connections` are open (counting
//! those still in the handshake), and, when `max_connections_per_peer` is set, fewer
//! than that from its peer (IP address, or Unix user id); one over a limit is closed at
//! once, before the greeting, holding nothing. The handshake must finish within
//! `handshake_timeout`, however slowly its bytes arrive.
//!
//! Each admitted connection runs one reader task. It reads a request header, has
//! [`proto::parse_request`] check it, takes a slot and a share of the connection's
//! byte budget, reads a WRITE's payload, and spawns the request. Requests run
//! concurrently and reply as they finish, in any order; the client matches replies by
//! handle. Replies are written whole under one lock, so they never interleave.
//!
//! The budget is what bounds a client that sends requests but never reads its replies:
//! a READ's share is held until its reply is on the wire, so once replies worth
//! `max_buffered_bytes` are waiting for the client, the reader stops reading requests
//! from it (backpressure, not an error) until the client takes some. One connection
//! thus holds at most `max_buffered_bytes` of payload (plus a reply header per
//! request, at most `max_in_flight` of them), and the server at most
//! `max_connections` times that. The largest request accepted, advertised as the
//! maximum block size, is the budget itself (capped at [`proto::MAX_PAYLOAD`]).
//!
//! A device error, or a device that panics, becomes an error reply for that request;
//! only a protocol violation that leaves the stream out of step (bad magic, an
//! oversized WRITE payload) or an I/O error closes the connection, and nothing a client
//! sends stops the server.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::exports::{Export, Exports};
use crate::proto::{
    self, ClientOption, Command, Errno, ExportLimits, Handle, InfoRequest, OptionHeaderError,
    RequestError,
};
use lode_blockdev::{BlockDevice, DeviceError};

/// Builds a [`Server`]; [`build`](Self::build) checks the settings.
pub struct ServerBuilder {
    exports: Exports,
    max_connections: usize,
    max_connections_per_peer: Option<usize>,
    max_in_flight: usize,
    max_buffered_bytes: usize,
    handshake_timeout: Duration,
    on_error: Option<ErrorHook>,
    on_request_error: Option<RequestErrorHook>,
}

type ErrorHook = Arc<dyn Fn(&Peer, &ConnectionError) + Send + Sync>;
type RequestErrorHook = Arc<dyn Fn(&Command, &DeviceError) + Send + Sync>;

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("exports", &self.exports)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_buffered_bytes", &self.max_buffered_bytes)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Default for [`ServerBuilder::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Upper bound for `max_connections`.
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;
/// Default for [`ServerBuilder::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Upper bound for `max_in_flight`.
pub const MAX_IN_FLIGHT_LIMIT: usize = 4096;
/// Default for [`ServerBuilder::max_buffered_bytes`]: 32 reads of 128 KiB in flight.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 4 << 20;
/// Lower bound for `max_buffered_bytes` (and so for the maximum block size).
pub const MIN_BUFFERED_BYTES: usize = 64 << 10;
/// Upper bound for `max_buffered_bytes`.
pub const MAX_BUFFERED_BYTES_LIMIT: usize = 1 << 30;
/// Default for [`ServerBuilder::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A setting given to [`ServerBuilder`] is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("max_connections must be between 1 and {MAX_CONNECTIONS_LIMIT}, got {0}")]
    MaxConnections(usize),
    #[error("max_connections_per_peer must be between 1 and {MAX_CONNECTIONS_LIMIT}, got {0}")]
    MaxConnectionsPerPeer(usize),
    #[error("max_in_flight must be between 1 and {MAX_IN_FLIGHT_LIMIT}, got {0}")]
    MaxInFlight(usize),
    #[error(
        "max_buffered_bytes must be between {MIN_BUFFERED_BYTES} and {MAX_BUFFERED_BYTES_LIMIT}, got {0}"
    )]
    MaxBufferedBytes(usize),
    #[error("handshake_timeout must be positive")]
    HandshakeTimeout,
}

impl ServerBuilder {
    /// Connections open at once, handshakes included (default
    /// [`DEFAULT_MAX_CONNECTIONS`]); one more is closed before the greeting.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Connections open at once from one peer: one IP address over TCP, one user id
    /// over a Unix socket (default: no limit but `max_connections`). One more from
    /// that peer is closed before the greeting.
    pub fn max_connections_per_peer(mut self, n: usize) -> Self {
        self.max_connections_per_peer = Some(n);
        self
    }

    /// Requests one connection runs at once (default [`DEFAULT_MAX_IN_FLIGHT`]).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// Payload bytes (WRITE data being served, READ replies not yet taken by the
    /// client) one connection may hold at once (default
    /// [`DEFAULT_MAX_BUFFERED_BYTES`]). Also the largest request accepted, up to
    /// [`proto::MAX_PAYLOAD`].
    pub fn max_buffered_bytes(mut self, n: usize) -> Self {
        self.max_buffered_bytes = n;
        self
    }

    /// How long a client may take from connecting to choosing an export (default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Called with every error that ends or refuses a connection, and who was on the
    /// other end (for the embedder's log).
    pub fn on_connection_error(
        mut self,
        hook: impl Fn(&Peer, &ConnectionError) + Send + Sync + 'static,
    ) -> Self {
        self.on_error = Some(Arc::new(hook));
        self
    }

    /// Called with every request the device failed (a read whose chunk could not be
    /// fetched, say) and its error, which the client gets only as an errno (or, with
    /// structured replies, as a message it may not show): for the embedder's log.
    pub fn on_request_error(
        mut self,
        hook: impl Fn(&Command, &DeviceError) + Send + Sync + 'static,
    ) -> Self {
        self.on_request_error = Some(Arc::new(hook));
        self
    }

    pub fn build(self) -> Result<Server, ConfigError> {
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS_LIMIT {
            return Err(ConfigError::MaxConnections(self.max_connections));
        }
        if let Some(n) = self.max_connections_per_peer
            && (n == 0 || n > MAX_CONNECTIONS_LIMIT)
        {
            return Err(ConfigError::MaxConnectionsPerPeer(n));
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT_LIMIT {
            return Err(ConfigError::MaxInFlight(self.max_in_flight));
        }
        if !(MIN_BUFFERED_BYTES..=MAX_BUFFERED_BYTES_LIMIT).contains(&self.max_buffered_bytes) {
            return Err(ConfigError::MaxBufferedBytes(self.max_buffered_bytes));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::HandshakeTimeout);
        }
        let max_payload = u32::try_from(self.max_buffered_bytes)
            .unwrap_or(u32::MAX)
            .min(proto::MAX_PAYLOAD);
        let (tx, rx) = mpsc::channel(1);
        Ok(Server {
            inner: Arc::new(Inner {
                exports: self.exports,
                connections: Arc::new(Semaphore::new(self.max_connections)),
                max_connections: self.max_connections,
                // A per-peer limit at or over the total limits nothing.
                max_per_peer: self
                    .max_connections_per_peer
                    .filter(|n| *n < self.max_connections),
                per_peer: std::sync::Mutex::new(HashMap::new()),
                max_in_flight: self.max_in_flight,
                max_buffered_bytes: self.max_buffered_bytes,
                max_payload,
                handshake_timeout: self.handshake_timeout,
                on_error: self.on_error,
                on_request_error: self.on_request_error,
                shutdown: watch::channel(false).0,
                tracker_tx: std::sync::Mutex::new(Some(tx)),
                tracker_rx: Mutex::new(rx),
                stats: Stats::default(),
            }),
        })
    }
}

/// Something went wrong while binding a listener.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on TCP {addr}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on Unix socket {path}")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("server is shutting down")]
    ShuttingDown,
}

/// Who is on the other end of a connection, as log lines name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A Unix socket client, with its process and user ids when the kernel gave them.
    Unix {
        pid: Option<i32>,
        uid: Option<u32>,
    },
    /// A stream handed to [`Server::serve_connection`].
    Stream,
}

/// What the per-peer limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    Ip(IpAddr),
    Uid(u32),
}

impl Peer {
    fn key(&self) -> Option<PeerKey> {
        match self {
            Peer::Tcp(addr) => Some(PeerKey::Ip(addr.ip())),
            Peer::Unix { uid: Some(uid), .. } => Some(PeerKey::Uid(*uid)),
            Peer::Unix { uid: None, .. } | Peer::Stream => None,
        }
    }
}

/// A connection's place under the connection limits, given back when it is dropped.
struct Admission {
    _slot: OwnedSemaphorePermit,
    /// Counted against this peer's limit.
    peer: Option<PeerKey>,
    server: Arc<Inner>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some(key) = self.peer else { return };
        let mut counts = self
            .server
            .per_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "tcp {addr}"),
            Peer::Unix { pid, uid } => {
                f.write_str("unix socket")?;
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                if let Some(uid) = uid {
                    write!(f, " uid {uid}")?;
                }
                Ok(())
            }
            Peer::Stream => f.write_str("stream"),
        }
    }
}

/// Why a connection ended other than by the client's choice, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("refused: {limit} connections are open, the max_connections limit")]
    TooManyConnections { limit: usize },
    #[error(
        "refused: {limit} connections from this peer are open, the max_connections_per_peer limit"
    )]
    TooManyFromPeer { limit: usize },
    #[error("connection I/O failed")]
    Io(#[from] io::Error),
    #[error("client sent unknown handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option header")]
    OptionHeader(#[from] OptionHeaderError),
    #[error("client without fixed newstyle sent option {0}, which only fixed newstyle allows")]
    NotFixedNewstyle(u32),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME with invalid data")]
    BadExportName(#[source] proto::OptionDataError),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("bad request")]
    Request(#[source] RequestError),
    #[error("server is shutting down")]
    ShuttingDown,
}

/// Counters since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections admitted (not counting refused ones).
    pub connections_accepted: u64,
    pub connections_active: u64,
    /// Connections closed at once for `max_connections`.
    pub connections_refused: u64,
    /// Payload bytes held for all connections now (WRITE data being served, READ
    /// replies not yet written): at most `max_buffered_bytes` per connection.
    pub buffered_bytes: u64,
    /// The most `buffered_bytes` has been since the server started.
    pub peak_buffered_bytes: u64,
    /// Connections ended by a [`ConnectionError`].
    pub connection_errors: u64,
    pub requests: u64,
    /// Requests answered with an error (refused by the parser or failed by the device).
    pub request_errors: u64,
    /// Device calls that panicked (answered EIO).
    pub device_panics: u64,
}

#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    closed: AtomicU64,
    refused: AtomicU64,
    buffered: AtomicU64,
    peak_buffered: AtomicU64,
    errors: AtomicU64,
    requests: AtomicU64,
    request_errors: AtomicU64,
    panics: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    exports: Exports,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    max_connections: usize,
    /// `None` when there is no per-peer limit (or it is not below the total).
    max_per_peer: Option<usize>,
    /// Open connections per peer, when there is a per-peer limit.
    per_peer: std::sync::Mutex<HashMap<PeerKey, usize>>,
    max_in_flight: usize,
    max_buffered_bytes: usize,
    /// The maximum block size advertised and enforced.
    max_payload: u32,
    handshake_timeout: Duration,
    on_error: Option<ErrorHook>,
    on_request_error: Option<RequestErrorHook>,
    shutdown: watch::Sender<bool>,
    // Every connection and accept loop holds a clone of this sender; shutdown drops
    // the original and waits for the receiver to see the channel close.
    tracker_tx: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    tracker_rx: Mutex<mpsc::Receiver<()>>,
    stats: Stats,
}

/// An NBD server. Cheap to clone; clones are the same server.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.inner.exports)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Resolves when shutdown has been requested.
async fn shutdown_requested(mut rx: watch::Receiver<bool>) {
    // An error means the server was dropped, which is a shutdown too.
    let _ = rx.wait_for(|stop| *stop).await;
}

impl Server {
    /// A builder serving `exports` (which may change while the server runs).
    pub fn builder(exports: Exports) -> ServerBuilder {
        ServerBuilder {
            exports,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            on_error: None,
            on_request_error: None,
        }
    }

    pub fn exports(&self) -> &Exports {
        &self.inner.exports
    }

    pub fn stats(&self) -> ServerStats {
        let s = &self.inner.stats;
        let accepted = s.accepted.load(Ordering::Relaxed);
        ServerStats {
            connections_accepted: accepted,
            connections_active: accepted.saturating_sub(s.closed.load(Ordering::Relaxed)),
            connections_refused: s.refused.load(Ordering::Relaxed),
            buffered_bytes: s.buffered.load(Ordering::Relaxed),
            peak_buffered_bytes: s.peak_buffered.load(Ordering::Relaxed),
            connection_errors: s.errors.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            request_errors: s.request_errors.load(Ordering::Relaxed),
            device_panics: s.panics.load(Ordering::Relaxed),
        }
    }

    fn token(&self) -> Option<mpsc::Sender<()>> {
        self.inner
            .tracker_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Binds `addr` and serves it in the background; returns the bound address (useful
    /// with port 0).
    pub async fn listen_tcp(&self, addr: SocketAddr) -> Result<SocketAddr, ServerError> {
        let bind_err = |source| ServerError::BindTcp { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        self.serve_tcp(listener)?;
        Ok(local)
    }

    /// Binds a Unix socket at `path` and serves it in the background. The caller owns
    /// the path: an existing file makes this fail, and it is left behind at shutdown.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> Result<(), ServerError> {
        let path = path.as_ref();
        let listener = UnixListener::bind(path).map_err(|source| ServerError::BindUnix {
            path: path.to_path_buf(),
            source,
        })?;
        self.serve_unix(listener)
    }

    /// Serves connections from a bound TCP listener in the background.
    pub fn serve_tcp(&self, listener: TcpListener) -> Result<(), ServerError> {
        let token = self.token().ok_or(ServerError::ShuttingDown)?;
        let server = self.clone();
        tokio::spawn(async move {
            let _token = token;
            let stop = shutdown_requested(server.inner.shutdown.subscribe());
            tokio::pin!(stop);
            loop {
                let accepted = tokio::select! {
                    _ = &mut stop => break,
                    r = listener.accept() => r,
                };
                match accepted {
                    Ok((stream, addr)) => {
                        let peer = Peer::Tcp(addr);
                        let Ok(permit) = server.admit(&peer) else {
                            continue;
                        };
                        // Replies are written whole; Nagle would only add latency.
                        let _ = stream.set_nodelay(true);
                        server.spawn_connection(stream, peer, permit);
                    }
                    Err(_) => accept_failed().await,
                }
            }
        });
        Ok(())
    }

    /// Serves connections from a bound Unix listener in the background.
    pub fn serve_unix(&self, listener: UnixListener) -> Result<(), ServerError> {
        let token = self.token().ok_or(ServerError::ShuttingDown)?;
        let server = self.clone();
        tokio::spawn(async move {
            let _token = token;
            let stop = shutdown_requested(server.inner.shutdown.subscribe());
            tokio::pin!(stop);
            loop {
                let accepted = tokio::select! {
                    _ = &mut stop => break,
                    r = listener.accept() => r,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let cred = stream.peer_cred().ok();
                        let peer = Peer::Unix {
                            pid: cred.and_then(|c| c.pid()),
                            uid: cred.map(|c| c.uid()),
                        };
                        let Ok(permit) = server.admit(&peer) else {
                            continue;
                        };
                        server.spawn_connection(stream, peer, permit);
                    }
                    Err(_) => accept_failed().await,
                }
            }
        });
        Ok(())
    }

    /// A place for `peer` under the connection limits, or the error refusing it
    /// (counted and passed to the hook). A refused stream is dropped, and so closed,
    /// before a byte is read from or written to it.
    fn admit(&self, peer: &Peer) -> Result<Admission, ConnectionError> {
        let refuse = |e: ConnectionError| {
            bump(&self.inner.stats.refused);
            if let Some(hook) = &self.inner.on_error {
                hook(peer, &e);
            }
            Err(e)
        };
        let Ok(slot) = Arc::clone(&self.inner.connections).try_acquire_owned() else {
            return refuse(ConnectionError::TooManyConnections {
                limit: self.inner.max_connections,
            });
        };
        let counted = self.inner.max_per_peer.zip(peer.key());
        if let Some((limit, key)) = counted {
            let mut counts = self
                .inner
                .per_peer
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = counts.entry(key).or_insert(0);
            if *n >= limit {
                drop(counts);
                return refuse(ConnectionError::TooManyFromPeer { limit });
            }
            *n += 1;
        }
        Ok(Admission {
            _slot: slot,
            peer: counted.map(|(_, key)| key),
            server: Arc::clone(&self.inner),
        })
    }

    fn spawn_connection<S>(&self, stream: S, peer: Peer, permit: Admission)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let server = self.clone();
        tokio::spawn(async move {
            // Errors were counted and passed to the hook inside.
            let _ = server.serve_admitted(stream, peer, permit).await;
        });
    }

    /// Runs the protocol on one connected stream until the client leaves, the
    /// connection fails, or the server shuts down. The stream counts against
    /// `max_connections` like any other; over it, this returns
    /// [`ConnectionError::TooManyConnections`] at once.
    pub async fn serve_connection<S>(&self, stream: S) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        if self.token().is_none() {
            return Err(ConnectionError::ShuttingDown);
        }
        let permit = self.admit(&Peer::Stream)?;
        self.serve_admitted(stream, Peer::Stream, permit).await
    }

    async fn serve_admitted<S>(
        &self,
        stream: S,
        peer: Peer,
        permit: Admission,
    ) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(token) = self.token() else {
            return Err(ConnectionError::ShuttingDown);
        };
        let stats = &self.inner.stats;
        bump(&stats.accepted);
        let result = self.connection(stream).await;
        // The slot is free before the connection counts as closed, so whoever sees
        // the count drop can connect again.
        drop(permit);
        bump(&stats.closed);
        drop(token);
        if let Err(e) = &result {
            bump(&stats.errors);
            if let Some(hook) = &self.inner.on_error {
                hook(&peer, e);
            }
        }
        result
    }

    async fn connection<S>(&self, stream: S) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut stream = BufReader::with_capacity(64 * 1024, stream);
        let timeout = self.inner.handshake_timeout;
        let handshake = tokio::time::timeout(timeout, self.handshake(&mut stream));
        let chosen = tokio::select! {
            _ = shutdown_requested(self.inner.shutdown.subscribe()) => return Ok(()),
            r = handshake => r.map_err(|_| ConnectionError::HandshakeTimeout(timeout))??,
        };
        let Some((export, structured)) = chosen else {
            return Ok(());
        };
        self.transmission(stream, export, structured).await
    }

    /// Stops accepting, lets every connection finish the requests it has started,
    /// and returns when all connections are closed. Requests not yet read are not
    /// served. A device call that never returns holds this up; wrap it in a timeout
    /// if that matters.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        self.inner
            .tracker_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut rx = self.inner.tracker_rx.lock().await;
        while rx.recv().await.is_some() {}
    }

    // -----------------------------------------------------------------------------
    // Handshake.

    /// Runs the option haggling. Returns the export and whether structured replies
    /// were negotiated, or `None` if the client aborted.
    async fn handshake<S>(&self, stream: &mut S) -> Result<Option<(Export, bool)>, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        hello
            .extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        stream.write_all(&hello).await?;
        stream.flush().await?;

        let client_flags = stream.read_u32().await?;
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(ConnectionError::ClientFlags(client_flags));
        }
        let fixed = client_flags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        let mut structured = false;

        loop {
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            stream.read_exact(&mut header).await?;
            let header = proto::parse_option_header(&header)?;
            // Bounded by parse_option_header (64 KiB).
            let mut data = vec![0u8; header.length as usize];
            stream.read_exact(&mut data).await?;
            let option = header.option;
            if !fixed && option != proto::OPT_EXPORT_NAME {
                // Without fixed newstyle there is no way to refuse an option but to
                // hang up.
                return Err(ConnectionError::NotFixedNewstyle(option));
            }
            let parsed = match proto::parse_option(option, &data) {
                Ok(p) => p,
                Err(e) if option == proto::OPT_EXPORT_NAME => {
                    return Err(ConnectionError::BadExportName(e));
                }
                Err(e) => {
                    let msg = e.to_string();
                    let reply = proto::option_reply(option, proto::REP_ERR_INVALID, msg.as_bytes());
                    stream.write_all(&reply).await?;
                    stream.flush().await?;
                    continue;
                }
            };
            let mut out = Vec::new();
            match parsed {
                ClientOption::ExportName(name) => {
                    let Some((_, export)) = self.resolve(&name) else {
                        return Err(ConnectionError::UnknownExport(name));
                    };
                    let device = export.device();
                    out.extend_from_slice(&device.size().to_be_bytes());
                    out.extend_from_slice(
                        &transmission_flags(device.as_ref(), structured).to_be_bytes(),
                    );
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                    return Ok(Some((export, structured)));
                }
                ClientOption::Abort => {
                    // The client may already have gone; the ACK is a courtesy.
                    let ack = proto::option_reply(option, proto::REP_ACK, &[]);
                    let _ = stream.write_all(&ack).await;
                    let _ = stream.flush().await;
                    return Ok(None);
                }
                ClientOption::List => {
                    for (name, description) in self.inner.exports.list() {
                        let mut d = Vec::with_capacity(4 + name.len());
                        d.extend_from_slice(&len_u32(name.len()).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        if let Some(desc) = description {
                            d.extend_from_slice(desc.as_bytes());
                        }
                        out.extend(proto::option_reply(option, proto::REP_SERVER, &d));
                    }
                    out.extend(proto::option_reply(option, proto::REP_ACK, &[]));
                }
                ClientOption::Info(req) => {
                    self.info_replies(option, &req, structured, &mut out);
                }
                ClientOption::Go(req) => {
                    if let Some(export) = self.info_replies(option, &req, structured, &mut out) {
                        stream.write_all(&out).await?;
                        stream.flush().await?;
                        return Ok(Some((export, structured)));
                    }
                }
                ClientOption::StructuredReply => {
                    structured = true;
                    out.extend(proto::option_reply(option, proto::REP_ACK, &[]));
                }
                ClientOption::Unsupported(code) => {
                    let msg = format!("option {code} is not supported");
                    out.extend(proto::option_reply(
                        option,
                        proto::REP_ERR_UNSUP,
                        msg.as_bytes(),
                    ));
                }
            }
            stream.write_all(&out).await?;
            stream.flush().await?;
        }
    }

    fn resolve(&self, name: &str) -> Option<(String, Export)> {
        self.inner.exports.resolve(name)
    }

    /// Appends the replies to NBD_OPT_INFO or NBD_OPT_GO to `out`; returns the export
    /// if there is one.
    fn info_replies(
        &self,
        option: u32,
        req: &InfoRequest,
        structured: bool,
        out: &mut Vec<u8>,
    ) -> Option<Export> {
        let Some((name, export)) = self.resolve(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            out.extend(proto::option_reply(
                option,
                proto::REP_ERR_UNKNOWN,
                msg.as_bytes(),
            ));
            return None;
        };
        let device = export.device();
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&device.size().to_be_bytes());
        info.extend_from_slice(&transmission_flags(device.as_ref(), structured).to_be_bytes());
        out.extend(proto::option_reply(option, proto::REP_INFO, &info));

        // Sent whether or not asked for: the minimum of 1 constrains nothing, and
        // clients that did not ask may ignore it.
        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&proto::MIN_BLOCK.to_be_bytes());
        info.extend_from_slice(&proto::PREFERRED_BLOCK.to_be_bytes());
        info.extend_from_slice(&self.inner.max_payload.to_be_bytes());
        out.extend(proto::option_reply(option, proto::REP_INFO, &info));

        if req.requests.contains(&proto::INFO_NAME) {
            let mut info = proto::INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(name.as_bytes());
            out.extend(proto::option_reply(option, proto::REP_INFO, &info));
        }
        if let Some(desc) = export
            .description()
            .filter(|_| req.requests.contains(&proto::INFO_DESCRIPTION))
        {
            let mut info = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(desc.as_bytes());
            out.extend(proto::option_reply(option, proto::REP_INFO, &info));
        }
        out.extend(proto::option_reply(option, proto::REP_ACK, &[]));
        Some(export)
    }

    // -----------------------------------------------------------------------------
    // Transmission.

    async fn transmission<S>(
        &self,
        stream: BufReader<S>,
        export: Export,
        structured: bool,
    ) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut reader, writer) = tokio::io::split(stream);
        let device = Arc::clone(export.device());
        let conn = Arc::new(Conn {
            writer: Mutex::new(writer),
            device: Arc::clone(&device),
            structured,
            slots: Arc::new(Semaphore::new(self.inner.max_in_flight)),
            bytes: Arc::new(Semaphore::new(self.inner.max_buffered_bytes)),
            write_failed: Notify::new(),
            server: Arc::clone(&self.inner),
        });
        let limits = ExportLimits {
            size: device.size(),
            read_only: device.read_only(),
            structured_replies: structured,
            max_payload: self.inner.max_payload,
        };
        let stop = shutdown_requested(self.inner.shutdown.subscribe());
        tokio::pin!(stop);

        let result = loop {
            let next = tokio::select! {
                biased;
                _ = &mut stop => break Ok(()),
                _ = conn.write_failed.notified() => break Ok(()),
                r = next_request(&mut reader, &limits, &conn) => r,
            };
            match next {
                Ok(Next::Eof | Next::Disconnect) => break Ok(()),
                Ok(Next::Job(job)) => {
                    bump(&self.inner.stats.requests);
                    // A request the device answers at once (a cached read) is answered
                    // here, saving a task spawn and the wake-up of an idle worker it can
                    // cause; one that has to wait goes on in its own task, so the next
                    // request is read at once and replies still go out of order.
                    let mut run = Box::pin(Arc::clone(&conn).run(job));
                    if futures::poll!(&mut run).is_pending() {
                        tokio::spawn(run);
                    }
                }
                Err(e) => break Err(e),
            }
        };

        // The protocol asks that requests already received are answered before the
        // connection closes; wait for every slot to come back.
        let all = u32::try_from(self.inner.max_in_flight).unwrap_or(u32::MAX);
        let _ = conn.slots.acquire_many(all).await;
        let mut writer = conn.writer.lock().await;
        let _ = writer.shutdown().await;
        result
    }
}

async fn accept_failed() {
    // Out of file descriptors or a connection reset before accept: back off briefly
    // rather than spin, and keep listening.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The transmission flags advertised for a device.
fn transmission_flags(device: &dyn BlockDevice, structured: bool) -> u16 {
    let mut flags = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_CACHE;
    if structured {
        // A read is always answered in one chunk, so "don't fragment" costs nothing.
        flags |= proto::TFLAG_SEND_DF;
    }
    if device.read_only() {
        flags |= proto::TFLAG_READ_ONLY;
    } else {
        flags |= proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES;
    }
    if device.can_multi_conn() {
        flags |= proto::TFLAG_CAN_MULTI_CONN;
    }
    flags
}

/// One connection's shared state in transmission.
struct Conn<W> {
    writer: Mutex<W>,
    device: Arc<dyn BlockDevice>,
    structured: bool,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    write_failed: Notify,
    server: Arc<Inner>,
}

/// A request ready to run, holding its share of the connection's limits.
struct Job {
    handle: Handle,
    work: Work,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<Buffered>,
}

/// A share of a connection's byte budget, counted in the server's `buffered_bytes`
/// while held.
struct Buffered {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    server: Arc<Inner>,
}

impl Buffered {
    async fn acquire(budget: &Arc<Semaphore>, bytes: u32, server: &Arc<Inner>) -> io::Result<Self> {
        let permit = Arc::clone(budget)
            .acquire_many_owned(bytes)
            .await
            .map_err(|_| io::Error::other("semaphore closed"))?;
        let bytes = u64::from(bytes);
        let stats = &server.stats;
        let now = stats.buffered.fetch_add(bytes, Ordering::Relaxed) + bytes;
        stats.peak_buffered.fetch_max(now, Ordering::Relaxed);
        Ok(Self {
            _permit: permit,
            bytes,
            server: Arc::clone(server),
        })
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.server
            .stats
            .buffered
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

enum Work {
    Command(Command, Vec<u8>),
    Refuse(Errno, String),
}

enum Next {
    Eof,
    Disconnect,
    Job(Job),
}

/// Reads a request header, returning `false` on a clean end of stream before it.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8; proto::REQUEST_HEADER_LEN],
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

/// Reads and checks the next request, with its payload.
async fn next_request<R, W>(
    reader: &mut R,
    limits: &ExportLimits,
    conn: &Conn<W>,
) -> Result<Next, ConnectionError>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; proto::REQUEST_HEADER_LEN];
    if !read_header(reader, &mut header).await? {
        return Ok(Next::Eof);
    }
    // The slot is taken before anything else so a client pipelining past the limit
    // is simply not read from until a request finishes.
    let slot = Arc::clone(&conn.slots)
        .acquire_owned()
        .await
        .map_err(|_| io::Error::other("semaphore closed"))?;
    let req = match proto::parse_request(&header, limits) {
        Ok(req) => req,
        Err(RequestError::Rejected {
            handle,
            errno,
            discard,
            reason,
        }) => {
            let mut payload = (&mut *reader).take(u64::from(discard));
            tokio::io::copy(&mut payload, &mut tokio::io::sink()).await?;
            return Ok(Next::Job(Job {
                handle,
                work: Work::Refuse(errno, reason.to_string()),
                _slot: slot,
                _bytes: None,
            }));
        }
        Err(e) => return Err(ConnectionError::Request(e)),
    };
    let buffered = match req.command {
        Command::Disconnect => return Ok(Next::Disconnect),
        Command::Read { length, .. } | Command::Write { length, .. } => length,
        _ => 0,
    };
    let bytes = if buffered > 0 {
        // The parser caps buffered at max_payload <= max_buffered_bytes, so this
        // completes once enough earlier replies are on the wire. Until then nothing
        // more is read from this client: that is the backpressure.
        Some(Buffered::acquire(&conn.bytes, buffered, &conn.server).await?)
    } else {
        None
    };
    let mut data = Vec::new();
    if let Command::Write { length, .. } = req.command {
        data = vec![0u8; length as usize];
        reader.read_exact(&mut data).await?;
    }
    let (handle, command) = (req.handle, req.command);
    Ok(Next::Job(Job {
        handle,
        work: Work::Command(command, data),
        _slot: slot,
        _bytes: bytes,
    }))
}

impl<W: AsyncWrite + Send + Unpin + 'static> Conn<W> {
    async fn run(self: Arc<Self>, job: Job) {
        let reply = match job.work {
            Work::Refuse(errno, msg) => {
                bump(&self.server.stats.request_errors);
                self.error_reply(job.handle, errno, &msg)
            }
            Work::Command(command, data) => {
                let run = std::panic::AssertUnwindSafe(self.execute(job.handle, command, data));
                match run.catch_unwind().await {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(e)) => {
                        bump(&self.server.stats.request_errors);
                        if let Some(hook) = &self.server.on_request_error {
                            hook(&command, &e);
                        }
                        self.error_reply(job.handle, Errno::from(&e), &e.to_string())
                    }
                    Err(_) => {
                        bump(&self.server.stats.request_errors);
                        bump(&self.server.stats.panics);
                        self.error_reply(job.handle, Errno::EIO, "device panicked")
                    }
                }
            }
        };
        // A reply the client is not reading waits here, holding the request's share
        // of the budget, for as long as the client likes; but not past a shutdown,
        // which would otherwise wait for it forever.
        let send = async {
            let mut writer = self.writer.lock().await;
            match writer.write_all(&reply).await {
                Ok(()) => writer.flush().await,
                Err(e) => Err(e),
            }
        };
        let sent = tokio::select! {
            biased;
            r = send => r,
            _ = shutdown_requested(self.server.shutdown.subscribe()) => {
                Err(io::Error::other("server shutting down with the reply unsent"))
            }
        };
        if sent.is_err() {
            self.write_failed.notify_one();
        }
        // The job's permits are released here, after the reply is on the wire.
        drop(job._slot);
    }

    async fn execute(
        &self,
        handle: Handle,
        command: Command,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, DeviceError> {
        let device = &self.device;
        match command {
            Command::Read { offset, length } => {
                let header = if self.structured {
                    proto::STRUCTURED_HEADER_LEN + 8
                } else {
                    proto::SIMPLE_REPLY_LEN
                };
                let mut buf = vec![0u8; header + length as usize];
                device.read_at(offset, &mut buf[header..]).await?;
                if self.structured {
                    proto::put_structured_header(
                        &mut buf,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        handle,
                        length + 8,
                    );
                    buf[proto::STRUCTURED_HEADER_LEN..header]
                        .copy_from_slice(&offset.to_be_bytes());
                } else {
                    proto::put_simple_reply(&mut buf, handle, Errno(0));
                }
                return Ok(buf);
            }
            Command::Write { offset, fua, .. } => {
                device.write_at(offset, &data).await?;
                if fua {
                    device.flush().await?;
                }
            }
            Command::Flush => device.flush().await?,
            Command::Trim {
                offset,
                length,
                fua,
            } => {
                device.trim(offset, u64::from(length)).await?;
                if fua {
                    device.flush().await?;
                }
            }
            Command::WriteZeroes {
                offset,
                length,
                fua,
            } => {
                device.write_zeroes(offset, u64::from(length)).await?;
                if fua {
                    device.flush().await?;
                }
            }
            Command::Cache { offset, length } => device.prefetch(offset, u64::from(length)).await?,
            // Handled by the reader; never spawned.
            Command::Disconnect => {}
        }
        Ok(self.ok_reply(handle))
    }

    fn ok_reply(&self, handle: Handle) -> Vec<u8> {
        if self.structured {
            let mut out = vec![0u8; proto::STRUCTURED_HEADER_LEN];
            proto::put_structured_header(
                &mut out,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                handle,
                0,
            );
            out
        } else {
            let mut out = vec![0u8; proto::SIMPLE_REPLY_LEN];
            proto::put_simple_reply(&mut out, handle, Errno(0));
            out
        }
    }

    fn error_reply(&self, handle: Handle, errno: Errno, message: &str) -> Vec<u8> {
        if self.structured {
            proto::structured_error(handle, errno, message)
        } else {
            let mut out = vec![0u8; proto::SIMPLE_REPLY_LEN];
            proto::put_simple_reply(&mut out, handle, errno);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    #[test]
    fn builder_names_the_bad_setting() {
        let err = Server::builder(Exports::new())
            .max_in_flight(0)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "max_in_flight must be between 1 and 4096, got 0"
        );
        let err = Server::builder(Exports::new())
            .max_buffered_bytes(1024)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "max_buffered_bytes must be between 65536 and 1073741824, got 1024"
        );
        let err = Server::builder(Exports::new())
            .max_connections(0)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "max_connections must be between 1 and 1048576, got 0"
        );
        let err = Server::builder(Exports::new())
            .max_connections_per_peer(0)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "max_connections_per_peer must be between 1 and 1048576, got 0"
        );
        let err = Server::builder(Exports::new())
            .handshake_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(err.to_string(), "handshake_timeout must be positive");
    }

    async fn greet<S: AsyncRead + AsyncWrite + Unpin>(c: &mut S) {
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        c.write_all(&3u32.to_be_bytes()).await.unwrap();
    }

    /// serve_connection over an in-memory pipe: EXPORT_NAME, a write, a read, DISC.
    #[tokio::test]
    async fn serves_any_stream() {
        let exports = Exports::new();
        let dev = Arc::new(MemDevice::new(8192));
        exports.add("d", Export::new(dev.clone())).unwrap();
        let server = Server::builder(exports).build().unwrap();
        let (mut client, stream) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn({
            let server = server.clone();
            async move { server.serve_connection(stream).await }
        });
        greet(&mut client).await;
        let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&proto::OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.push(b'd');
        client.write_all(&opt).await.unwrap();
        let mut reply = [0u8; 10];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 8192);

        let req = |kind: u16, handle: u64, offset: u64, len: u32| {
            let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&handle.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b
        };
        let mut w = req(proto::CMD_WRITE, 1, 100, 5);
        w.extend_from_slice(b"hello");
        client.write_all(&w).await.unwrap();
        let mut r = [0u8; 16];
        client.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[4..8], &[0; 4]);
        client
            .write_all(&req(proto::CMD_READ, 2, 99, 7))
            .await
            .unwrap();
        let mut r = [0u8; 16 + 7];
        client.read_exact(&mut r).await.unwrap();
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 2);
        assert_eq!(&r[16..], b"\0hello\0");
        client
            .write_all(&req(proto::CMD_DISC, 3, 0, 0))
            .await
            .unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(&dev.contents()[100..105], b"hello");
    }

    #[tokio::test]
    async fn the_error_hook_hears_why_a_connection_ended() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let server = Server::builder(Exports::new())
            .on_connection_error({
                let seen = seen.clone();
                move |peer, e| {
                    seen.lock()
                        .unwrap()
                        .push(format!("{peer}: {e}: {}", e.source_text()))
                }
            })
            .build()
            .unwrap();
        let (mut client, stream) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn({
            let server = server.clone();
            async move { server.serve_connection(stream).await }
        });
        greet(&mut client).await;
        client.write_all(&[0u8; 16]).await.unwrap();
        assert!(task.await.unwrap().is_err());
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            [
                "stream: bad option header: option header has magic 0x0000000000000000, expected IHAVEOPT"
            ]
        );
        assert_eq!(server.stats().connection_errors, 1);
        server.shutdown().await;
        let (_, stream) = tokio::io::duplex(64);
        assert!(matches!(
            server.serve_connection(stream).await,
            Err(ConnectionError::ShuttingDown)
        ));
    }

    trait SourceText {
        fn source_text(&self) -> String;
    }

    impl SourceText for ConnectionError {
        fn source_text(&self) -> String {
            std::error::Error::source(self).map_or_else(String::new, |s| s.to_string())
        }
    }
}
