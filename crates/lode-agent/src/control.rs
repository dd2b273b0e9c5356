//! The agent's control API: HTTP/1.1 with JSON bodies on a Unix socket, one request per
//! connection, hand-written with strict caps (the socket is mode 0600, but its bytes are
//! still parsed as untrusted).
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /attach` | `{"image": "tag|id", "name"?: str, "writable"?: bool}` | the attachment + `nbd_export` |
//! | `POST /detach` | `{"name": str, "keep_overlay"?: bool}` | the attachment removed |
//! | `GET /ls` | — | the attachments |
//! | `GET /stats` | — | the metrics snapshot |
//! | `GET /metrics` | — | Prometheus text |
//!
//! Errors are `{"error": "message"}` with 400 (malformed), 404 (unknown path or name),
//! 405, 409 (name taken), 413 (too large) or 500.
//!
//! [`serve_metrics`] serves only `GET /metrics` on a TCP address, for Prometheus.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use crate::AgentError;
use crate::daemon::{Agent, remove_stale_socket};
use crate::error::io;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest response a client reads.
pub const MAX_RESPONSE: usize = 64 << 20;
/// Time allowed to send a whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a whole exchange, the reply included: a client that stops reading
/// its reply holds its connection no longer than this.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most connections one listener serves at once. One more is answered 503 and closed,
/// so idle or slow clients (the metrics port is open to the network) hold at most this
/// many tasks and `MAX_HEAD + MAX_BODY` bytes each.
pub const MAX_CONNECTIONS: usize = 64;

/// Binds the control socket at `path` (mode 0600) and serves it until the task is aborted.
pub fn serve_control(
    agent: Arc<Agent>,
    path: &Path,
) -> Result<tokio::task::JoinHandle<()>, AgentError> {
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(io("binding", path))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("setting the mode of", path))?;
    }
    let listener = Arc::new(listener);
    Ok(accept_loop(agent, "control", Scope::Control, move || {
        let l = Arc::clone(&listener);
        async move { l.accept().await.map(|(s, _)| s) }
    }))
}

/// Accepts connections from `accept` and serves each in its own task, as `scope`
/// allows; an accept error is reported and retried after a pause.
fn accept_loop<S, F, Fut>(
    agent: Arc<Agent>,
    what: &'static str,
    scope: Scope,
    mut accept: F,
) -> tokio::task::JoinHandle<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            match accept().await {
                Ok(mut stream) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        // Told why, briefly; a client that does not read is not waited for.
                        tokio::spawn(async move {
                            let busy = error(
                                503,
                                format!("{MAX_CONNECTIONS} {what} connections are open"),
                            );
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                send(&mut stream, &busy),
                            )
                            .await;
                        });
                        continue;
                    };
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(EXCHANGE_TIMEOUT, handle(agent, stream, scope))
                                .await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    eprintln!("lode agent: {what} accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Serves `GET /metrics` (Prometheus text) on `addr` until the task is aborted; returns
/// the address bound (port 0 picks one).
pub async fn serve_metrics(
    agent: Arc<Agent>,
    addr: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), AgentError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| AgentError::Listen(format!("metrics on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| AgentError::Listen(format!("metrics on {addr}: {e}")))?;
    let listener = Arc::new(listener);
    let task = accept_loop(agent, "metrics", Scope::Metrics, move || {
        let l = Arc::clone(&listener);
        async move { l.accept().await.map(|(s, _)| s) }
    });
    Ok((bound, task))
}

/// Which requests a listener answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Everything (the 0600 Unix socket).
    Control,
    /// `GET /metrics` only (a TCP port anyone on the network may reach).
    Metrics,
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

fn json(status: u16, v: &impl serde::Serialize) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        body: serde_json::to_vec(v).expect("JSON"),
    }
}

fn error(status: u16, msg: impl std::fmt::Display) -> Reply {
    json(status, &serde_json::json!({"error": msg.to_string()}))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    agent: Arc<Agent>,
    mut stream: S,
    scope: Scope,
) -> std::io::Result<()> {
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Err(_) => error(400, "request not received in time"),
        Ok(Err(r)) => r,
        Ok(Ok(req)) if scope == Scope::Metrics && req.path != "/metrics" => error(
            404,
            format!("no such endpoint {} (only /metrics here)", req.path),
        ),
        Ok(Ok(req)) => route(&agent, req).await,
    };
    send(&mut stream, &reply).await
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, reply: &Reply) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&reply.body).await?;
    stream.shutdown().await
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path.
    pub path: String,
    /// The body.
    pub body: Vec<u8>,
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, Reply> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(error(413, format!("request head over {MAX_HEAD} bytes")));
        }
        let n = stream.read(&mut chunk).await.map_err(|e| error(400, e))?;
        if n == 0 {
            return Err(error(
                400,
                "connection closed before the request head ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_HEAD {
        return Err(error(413, format!("request head over {MAX_HEAD} bytes")));
    }
    let (method, path, len) = parse_head(&buf[..head_end]).map_err(|m| error(400, m))?;
    if len > MAX_BODY {
        return Err(error(413, format!("request body over {MAX_BODY} bytes")));
    }
    let mut body = buf[head_end + 4..].to_vec();
    if body.len() > len {
        return Err(error(400, "more bytes than Content-Length"));
    }
    while body.len() < len {
        let n = stream
            .read(&mut chunk[..(len - body.len()).min(4096)])
            .await
            .map_err(|e| error(400, e))?;
        if n == 0 {
            return Err(error(400, "connection closed before the body ended"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Request { method, path, body })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a request head (without the blank line): method, path, Content-Length.
pub fn parse_head(head: &[u8]) -> Result<(String, String, usize), String> {
    let head = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {line:?}"));
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(format!("unsupported version {version:?}"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("malformed method {method:?}"));
    }
    if !path.starts_with('/') {
        return Err(format!("malformed path {path:?}"));
    }
    let mut len = None;
    for h in lines {
        let Some((k, v)) = h.split_once(':') else {
            return Err(format!("malformed header {h:?}"));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            if len.is_some() {
                return Err("repeated Content-Length".into());
            }
            if v.is_empty() || v.len() > 12 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("malformed Content-Length {v:?}"));
            }
            len = Some(v.parse::<usize>().map_err(|e| e.to_string())?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding is not supported".into());
        }
    }
    Ok((method.to_string(), path.to_string(), len.unwrap_or(0)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachReq {
    image: String,
    name: Option<String>,
    #[serde(default)]
    writable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetachReq {
    name: String,
    #[serde(default)]
    keep_overlay: bool,
}

fn agent_error(e: AgentError) -> Reply {
    let status = match &e {
        AgentError::Request(_) => 400,
        AgentError::Conflict(_) => 409,
        AgentError::NotAttached(_) | AgentError::Image { .. } => 404,
        _ => 500,
    };
    error(status, e)
}

async fn route(agent: &Agent, req: Request) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/attach") => {
            let r: AttachReq = match serde_json::from_slice(&req.body) {
                Ok(r) => r,
                Err(e) => return error(400, format!("attach body: {e}")),
            };
            match agent.attach(&r.image, r.name.as_deref(), r.writable).await {
                Ok(a) => {
                    let mut v = serde_json::to_value(&a).expect("JSON");
                    v["nbd_export"] = serde_json::Value::String(a.name.clone());
                    v["nbd_unix"] = serde_json::json!(agent.config().nbd_unix);
                    json(200, &v)
                }
                Err(e) => agent_error(e),
            }
        }
        ("POST", "/detach") => {
            let r: DetachReq = match serde_json::from_slice(&req.body) {
                Ok(r) => r,
                Err(e) => return error(400, format!("detach body: {e}")),
            };
            match agent.detach(&r.name, r.keep_overlay).await {
                Ok(a) => json(200, &a),
                Err(e) => agent_error(e),
            }
        }
        ("GET", "/ls") => json(200, &agent.list().await),
        ("GET", "/stats") => json(200, &agent.stats_json()),
        ("GET", "/metrics") => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: agent.prometheus().into_bytes(),
        },
        (_, "/attach" | "/detach" | "/ls" | "/stats" | "/metrics") => {
            error(405, format!("{} not allowed on {}", req.method, req.path))
        }
        _ => error(404, format!("no such endpoint {}", req.path)),
    }
}

/// A response from the agent.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON, or the agent's error message as an error.
    pub fn json(self) -> Result<serde_json::Value, AgentError> {
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .map_err(|e| AgentError::Request(format!("agent answered with bad JSON: {e}")))?;
        if self.status == 200 {
            Ok(v)
        } else {
            let msg = v["error"].as_str().unwrap_or("no message").to_string();
            Err(AgentError::Request(format!("agent: {msg}")))
        }
    }
}

/// Sends one request to the agent at `socket` (blocking; for the CLI).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Response, AgentError> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|_| AgentError::NoAgent(PathBuf::from(socket)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lode\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(io("writing to", socket))?;
    let mut out = Vec::new();
    s.take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(io("reading from", socket))?;
    let bad = || {
        AgentError::Request(format!(
            "malformed answer from the agent at {}",
            socket.display()
        ))
    };
    let end = find(&out, b"\r\n\r\n").ok_or_else(bad)?;
    let head = std::str::from_utf8(&out[..end]).map_err(|_| bad())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(bad)?;
    Ok(Response {
        status,
        body: out[end + 4..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_head;

    #[test]
    fn heads() {
        assert_eq!(
            parse_head(b"POST /attach HTTP/1.1\r\nContent-Length: 12\r\nHost: x").unwrap(),
            ("POST".into(), "/attach".into(), 12)
        );
        assert_eq!(parse_head(b"GET /ls HTTP/1.0").unwrap().2, 0);
        for bad in [
            &b"GET /ls"[..],
            b"GET /ls HTTP/2",
            b"get /ls HTTP/1.1",
            b"GET ls HTTP/1.1",
            b"GET /ls HTTP/1.1 x",
            b"GET /ls HTTP/1.1\r\nContent-Length: -1",
            b"GET /ls HTTP/1.1\r\nContent-Length: 99999999999999999",
            b"GET /ls HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1",
            b"GET /ls HTTP/1.1\r\nTransfer-Encoding: chunked",
            b"GET /ls HTTP/1.1\r\nnocolon",
            b"\xff\xfe",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
