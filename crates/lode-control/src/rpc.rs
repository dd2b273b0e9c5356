//! The control plane's transport: JSON bodies over HTTP/1.1, one request per connection
//! from the client's side.
//!
//! Over TCP it runs on TLS with client certificates: each side verifies the other against
//! the fleet's CA, and the server takes the caller's [`Identity`] from its certificate,
//! never from anything the caller writes. On a single host it runs on a Unix socket
//! (mode 0600, and the peer's uid must be the socket owner's): the caller states its
//! identity in the `lode-identity` header, trusted because only the owner can connect.
//!
//! Everything is bounded: 64 connections, 64 KiB request bodies, 1 MiB replies, a 10 s
//! handshake and a 60 s exchange.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::api::{ErrorReply, Identity};
use crate::pki::{self, Credentials};

/// At most this many connections are served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request body the server reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// The largest reply body the client reads.
pub const MAX_REPLY: usize = 1024 * 1024;
/// How long connecting and the TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection's exchange may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The header a caller on the Unix socket names itself in: `<role>/<id>`.
pub const IDENTITY_HEADER: &str = "lode-identity";

/// Where a service listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// TLS over TCP to `host:port`.
    Tls {
        /// `host:port`.
        addr: String,
    },
    /// A Unix socket on this host.
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = RpcError;

    /// Parses `https://host:port` or `unix:/path`.
    fn from_str(text: &str) -> Result<Endpoint, RpcError> {
        let bad = |why: &str| RpcError::Config(format!("endpoint {text:?}: {why}"));
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(bad("a Unix socket needs an absolute path (unix:/path)"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let Some(addr) = text.strip_prefix("https://") else {
            return Err(bad("use https://host:port or unix:/path"));
        };
        let addr = addr.strip_suffix('/').unwrap_or(addr);
        let (host, port) = split_host_port(addr).ok_or_else(|| bad("expected host:port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() || addr.contains('/') {
            return Err(bad("expected host:port"));
        }
        Ok(Endpoint::Tls {
            addr: addr.to_owned(),
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tls { addr } => write!(f, "https://{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `host` and `port` of `host:port` or `[v6]:port`.
fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        return Some((host, rest.strip_prefix(':')?));
    }
    let (host, port) = addr.rsplit_once(':')?;
    if host.contains(':') {
        return None;
    }
    Some((host, port))
}

/// What went wrong with a call or a listener.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The server answered with an error status.
    #[error("{endpoint} refused POST {path}: {status} {error}")]
    Refused {
        /// Where the call went.
        endpoint: String,
        /// The route.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The server's message.
        error: String,
    },
    /// The call did not complete: connecting, the TLS handshake, or the exchange failed or
    /// took too long.
    #[error("POST {path} to {endpoint} failed: {reason}")]
    Transport {
        /// Where the call went.
        endpoint: String,
        /// The route.
        path: String,
        /// Why.
        reason: String,
    },
    /// The reply was not the JSON the route answers.
    #[error("{endpoint} answered POST {path} with a malformed reply: {reason}")]
    Decode {
        /// Where the call went.
        endpoint: String,
        /// The route.
        path: String,
        /// Why.
        reason: String,
    },
    /// A listener could not be set up.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address or socket path.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Credentials or an endpoint could not be used.
    #[error("{0}")]
    Config(String),
}

/// A client of one endpoint, calling as the holder of `creds`.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    identity: Identity,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of `endpoint` that presents `creds` (on TLS) or states their identity (on
    /// a Unix socket).
    pub fn new(endpoint: Endpoint, creds: Arc<Credentials>) -> Result<Client, RpcError> {
        let tls = match &endpoint {
            Endpoint::Unix(_) => None,
            Endpoint::Tls { addr } => {
                let (host, _) = split_host_port(addr).ok_or_else(|| {
                    RpcError::Config(format!("endpoint {addr:?}: expected host:port"))
                })?;
                let name = ServerName::try_from(host.to_owned()).map_err(|e| {
                    RpcError::Config(format!("endpoint {addr:?}: bad host name: {e}"))
                })?;
                let config = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(tls_config)?
                    .with_root_certificates(roots(&creds)?)
                    .with_client_auth_cert(creds.chain().to_vec(), creds.key())
                    .map_err(tls_config)?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Client {
            endpoint,
            identity: creds.identity().clone(),
            tls,
        })
    }

    /// The endpoint this client calls.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// POSTs `body` as JSON to `path` and decodes the JSON answer. Connecting and the
    /// handshake are bounded by [`HANDSHAKE_TIMEOUT`], the exchange by
    /// [`EXCHANGE_TIMEOUT`], the reply by [`MAX_REPLY`].
    pub async fn call<Q: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
    ) -> Result<A, RpcError> {
        let body = serde_json::to_vec(body).map_err(|e| self.transport(path, e))?;
        let (status, reply) = self.exchange(path, body).await?;
        if !(200..300).contains(&status) {
            let error = serde_json::from_slice::<ErrorReply>(&reply)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&reply).into_owned());
            return Err(RpcError::Refused {
                endpoint: self.endpoint.to_string(),
                path: path.to_owned(),
                status,
                error,
            });
        }
        serde_json::from_slice(&reply).map_err(|e| RpcError::Decode {
            endpoint: self.endpoint.to_string(),
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Sends `body` to `path` and returns the status and the raw reply.
    pub async fn exchange(&self, path: &str, body: Vec<u8>) -> Result<(u16, Bytes), RpcError> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, "lode-control")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if matches!(self.endpoint, Endpoint::Unix(_)) {
            request = request.header(
                IDENTITY_HEADER,
                format!(
                    "{}/{}",
                    pki::role_name(self.identity.role),
                    self.identity.id
                ),
            );
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.transport(path, e))?;
        match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, UnixStream::connect(socket))
                    .await
                    .map_err(|_| self.transport(path, "connecting timed out"))?
                    .map_err(|e| self.transport(path, e))?;
                self.send(path, stream, request).await
            }
            Endpoint::Tls { addr } => {
                let Some((connector, name)) = &self.tls else {
                    return Err(self.transport(path, "no TLS configuration"));
                };
                let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                    let tcp = TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|e| format!("connecting: {e}"))?;
                    connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))
                })
                .await
                .map_err(|_| self.transport(path, "connecting and the TLS handshake timed out"))?
                .map_err(|e| self.transport(path, e))?;
                self.send(path, stream, request).await
            }
        }
    }

    async fn send<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        &self,
        path: &str,
        stream: S,
        request: Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), RpcError> {
        tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| self.transport(path, e))?;
            let driver = tokio::spawn(connection);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| self.transport(path, describe(&e)))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_REPLY)
                .collect()
                .await
                .map_err(|e| self.transport(path, format!("reading the reply: {e}")))?
                .to_bytes();
            driver.abort();
            Ok((status, body))
        })
        .await
        .map_err(|_| self.transport(path, "the exchange timed out"))?
    }

    fn transport(&self, path: &str, reason: impl std::fmt::Display) -> RpcError {
        RpcError::Transport {
            endpoint: self.endpoint.to_string(),
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// A hyper error with its causes, so a TLS alert behind a closed connection shows.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A route's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The body (JSON, or text for `/metrics`).
    pub body: Vec<u8>,
}

impl Reply {
    /// 200 with `value` as JSON.
    pub fn json<T: Serialize>(value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply { status: 200, body },
            Err(e) => Reply::error(500, format!("encoding the reply: {e}")),
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        let body = serde_json::to_vec(&ErrorReply {
            error: message.into(),
        })
        .unwrap_or_default();
        Reply { status, body }
    }
}

/// Answers requests; `peer` is who the transport says the caller is.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Answers a request to `path` with `body` (at most [`MAX_REQUEST`] bytes).
    async fn handle(&self, peer: Identity, path: &str, body: Bytes) -> Reply;
}

/// A bound listener, TLS or Unix.
pub struct Listener {
    inner: Inner,
}

enum Inner {
    Tls {
        tcp: TcpListener,
        acceptor: TlsAcceptor,
    },
    Unix {
        listener: UnixListener,
        owner: u32,
    },
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Listens for TLS on `addr`, presenting `creds` and requiring a client certificate
    /// signed by their CA.
    pub async fn tls(addr: &str, creds: Arc<Credentials>) -> Result<Listener, RpcError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&creds)?), provider())
                .build()
                .map_err(|e| RpcError::Config(format!("client verifier: {e}")))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(creds.chain().to_vec(), creds.key())
            .map_err(tls_config)?;
        let tcp = TcpListener::bind(addr).await.map_err(|e| RpcError::Bind {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Listener {
            inner: Inner::Tls {
                tcp,
                acceptor: TlsAcceptor::from(Arc::new(config)),
            },
        })
    }

    /// Listens on a Unix socket at `path`, mode 0600. A stale socket there is replaced.
    /// The socket is bound under a temporary name, restricted, then renamed into place, so
    /// no one else can connect in between.
    pub fn unix(path: &Path) -> Result<Listener, RpcError> {
        let bind = |reason: String| RpcError::Bind {
            addr: path.display().to_string(),
            reason,
        };
        let temporary = path.with_extension(format!("binding.{}", std::process::id()));
        let _ = std::fs::remove_file(&temporary);
        let listener = UnixListener::bind(&temporary).map_err(|e| bind(e.to_string()))?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| bind(e.to_string()))?;
        let owner = std::fs::metadata(&temporary)
            .map_err(|e| bind(e.to_string()))?
            .uid();
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
        {
            let _ = std::fs::remove_file(&temporary);
            return Err(bind("something other than a socket is there".to_owned()));
        }
        std::fs::rename(&temporary, path).map_err(|e| bind(e.to_string()))?;
        Ok(Listener {
            inner: Inner::Unix { listener, owner },
        })
    }

    /// The TCP address, for a TLS listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.inner {
            Inner::Tls { tcp, .. } => tcp.local_addr().ok(),
            Inner::Unix { .. } => None,
        }
    }
}

/// Serves `handler` on `listener` until the task is aborted.
pub fn serve(listener: Listener, handler: Arc<dyn Handler>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let handler = handler.clone();
            match &listener.inner {
                Inner::Tls { tcp, acceptor } => {
                    let Ok((stream, _)) = tcp.accept().await else {
                        // Out of descriptors or a connection reset before accept: the
                        // next accept may succeed; pause so a persistent error cannot spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        else {
                            return;
                        };
                        let peer = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(pki::identity_of);
                        let peer = match peer {
                            Some(Ok(identity)) => Peer::Certified(identity),
                            Some(Err(e)) => Peer::Invalid(e.to_string()),
                            None => Peer::Invalid("no client certificate".to_owned()),
                        };
                        connection(tls, peer, handler).await;
                    });
                }
                Inner::Unix { listener, owner } => {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let owner = *owner;
                    tokio::spawn(async move {
                        let _slot = slot;
                        let peer = match stream.peer_cred() {
                            Ok(cred) if cred.uid() == owner || cred.uid() == 0 => Peer::Stated,
                            Ok(cred) => Peer::Invalid(format!(
                                "uid {} does not own this socket (uid {owner})",
                                cred.uid()
                            )),
                            Err(e) => Peer::Invalid(format!("unknown peer: {e}")),
                        };
                        connection(stream, peer, handler).await;
                    });
                }
            }
        }
    })
}

/// Who is on the other end of a connection.
#[derive(Clone)]
enum Peer {
    /// Named by a verified certificate.
    Certified(Identity),
    /// On the owner-only Unix socket: the identity header says who.
    Stated,
    /// Not acceptable; every request is refused with this reason.
    Invalid(String),
}

async fn connection<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    stream: S,
    peer: Peer,
    handler: Arc<dyn Handler>,
) {
    let service = hyper::service::service_fn(move |request| {
        let handler = handler.clone();
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(request, peer, handler).await) }
    });
    let serving =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, serving).await;
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    peer: Peer,
    handler: Arc<dyn Handler>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let reply = match identify(&peer, &request) {
        Err(reason) => Reply::error(401, format!("{path}: {reason}")),
        Ok(identity) => {
            if request.method() != Method::POST && request.method() != Method::GET {
                Reply::error(405, format!("{path}: use POST"))
            } else {
                match Limited::new(request.into_body(), MAX_REQUEST)
                    .collect()
                    .await
                {
                    Ok(body) => handler.handle(identity, &path, body.to_bytes()).await,
                    Err(e) => Reply::error(
                        413,
                        format!("{path}: request body over {MAX_REQUEST} bytes or broken: {e}"),
                    ),
                }
            }
        }
    };
    let content_type = if path == "/metrics" && reply.status == 200 {
        "text/plain; version=0.0.4"
    } else {
        "application/json"
    };
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn identify<B>(peer: &Peer, request: &Request<B>) -> Result<Identity, String> {
    match peer {
        Peer::Certified(identity) => Ok(identity.clone()),
        Peer::Invalid(reason) => Err(reason.clone()),
        Peer::Stated => {
            let stated = request
                .headers()
                .get(IDENTITY_HEADER)
                .ok_or_else(|| format!("no {IDENTITY_HEADER} header on the Unix socket"))?
                .to_str()
                .map_err(|_| format!("{IDENTITY_HEADER} is not text"))?;
            parse_identity(stated)
                .ok_or_else(|| format!("{IDENTITY_HEADER} {stated:?} is not <role>/<id>"))
        }
    }
}

/// Parses `<role>/<id>`.
pub fn parse_identity(text: &str) -> Option<Identity> {
    let (role, id) = text.split_once('/')?;
    let role = pki::parse_role(role)?;
    pki::valid_id(id).then(|| Identity {
        role,
        id: id.to_owned(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(creds: &Credentials) -> Result<RootCertStore, RpcError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(creds.ca().clone())
        .map_err(|e| RpcError::Config(format!("the CA certificate: {e}")))?;
    Ok(roots)
}

fn tls_config(e: rustls::Error) -> RpcError {
    RpcError::Config(format!("TLS configuration: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "https://127.0.0.1:7000".parse::<Endpoint>().unwrap(),
            Endpoint::Tls {
                addr: "127.0.0.1:7000".to_owned()
            }
        );
        assert_eq!(
            "https://[::1]:7000".parse::<Endpoint>().unwrap(),
            Endpoint::Tls {
                addr: "[::1]:7000".to_owned()
            }
        );
        assert_eq!(
            "unix:/run/lode.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/lode.sock".into())
        );
        for bad in [
            "http://a:1",
            "https://a",
            "https://:1",
            "https://a:x",
            "https://a:1/x",
            "unix:rel",
            "",
        ] {
            let err = bad.parse::<Endpoint>().unwrap_err().to_string();
            assert!(err.contains("endpoint"), "{bad}: {err}");
        }
    }

    #[test]
    fn identities_parse() {
        assert_eq!(
            parse_identity("worker/w1"),
            Some(Identity {
                role: crate::api::Role::Worker,
                id: "w1".to_owned()
            })
        );
        assert_eq!(parse_identity("root/w1"), None);
        assert_eq!(parse_identity("worker/"), None);
        assert_eq!(parse_identity("worker/a/b"), None);
    }

    proptest::proptest! {
        #[test]
        fn endpoint_parsing_never_panics_and_round_trips(text in "\\PC{0,80}") {
            if let Ok(endpoint) = text.parse::<Endpoint>() {
                let again: Endpoint = endpoint.to_string().parse().unwrap();
                proptest::prop_assert_eq!(again, endpoint);
            }
        }

        #[test]
        fn identity_parsing_never_panics(text in "\\PC{0,80}") {
            let _ = parse_identity(&text);
        }
    }
}
