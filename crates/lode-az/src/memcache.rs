//! An async memcached text-protocol connection over a tokio `TcpStream`: `get`, `set`,
//! `delete`, `version`, one request at a time. The AZ client keeps a small pool of these
//! per node (`node.rs`); tests use them directly to reach behind the client's back.
//!
//! Every reply goes through [`crate::proto`]; the read buffer never grows past one
//! reply's bound (a line of [`MAX_LINE`](crate::proto::MAX_LINE) bytes, or a value of at
//! most `max_value` bytes with its framing), and bytes left over after a reply mean the
//! stream is out of step, which is an error: the connection must then be dropped.

use std::io::{self, IoSlice};

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proto::{self, ErrorReply, GetReply, LineReply, Parse, ProtoError};

/// How much to ask the socket for at a time when a reply's length is not yet known.
const READ_CHUNK: usize = 16 * 1024;

/// What went wrong talking to one memcached server.
#[derive(Debug, Error)]
pub enum McError {
    /// The TCP connection could not be made.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address as given.
        addr: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection before finishing a reply.
    #[error("connection closed by the server")]
    Closed,
    /// The reply broke the protocol.
    #[error("malformed reply: {0}")]
    Protocol(#[from] ProtoError),
    /// The server answered with an error reply.
    #[error("server replied {0}")]
    Server(ErrorReply),
    /// The server answered with a reply that does not fit the command.
    #[error("unexpected reply {reply:?} to {command}")]
    Unexpected {
        /// The command sent.
        command: &'static str,
        /// What came back.
        reply: String,
    },
    /// Bytes arrived that no request asked for.
    #[error("{0} bytes arrived after a complete reply")]
    Trailing(usize),
    /// A key memcached would refuse.
    #[error("invalid key {0:?}: keys are 1 to 250 printable ASCII bytes without spaces")]
    InvalidKey(String),
    /// A value over the connection's limit.
    #[error("a value of {len} bytes is over the {max}-byte limit")]
    ValueTooLarge {
        /// The value's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl McError {
    /// Whether the connection may simply have gone stale while idle (the server
    /// restarted or closed it): worth one retry on a fresh connection.
    pub fn is_stale_connection(&self) -> bool {
        match self {
            McError::Closed => true,
            McError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }

    /// Whether the server answered at all: an error reply shows a live server, unlike a
    /// failed connection or a broken reply.
    pub fn server_answered(&self) -> bool {
        matches!(self, McError::Server(_))
    }
}

/// One connection to a memcached server.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    buf: BytesMut,
    max_value: usize,
}

impl Connection {
    /// Connects to `addr` (`host:port`), accepting values of at most `max_value` bytes.
    pub async fn connect(addr: &str, max_value: usize) -> Result<Self, McError> {
        let connect_err = |source| McError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let stream = TcpStream::connect(addr).await.map_err(connect_err)?;
        // Requests are written whole; Nagle would only hold back their last segment.
        stream.set_nodelay(true).map_err(connect_err)?;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_value,
        })
    }

    /// `get`: the value under `key`, or `None`.
    pub async fn get(&mut self, key: &str) -> Result<Option<Bytes>, McError> {
        check_key(key)?;
        self.send(&[b"get ", key.as_bytes(), b"\r\n"]).await?;
        let max = self.max_value;
        let (reply, used) = self
            .read_reply(|buf| proto::parse_get_reply(buf, key.as_bytes(), max))
            .await?;
        self.check_trailing(used)?;
        match reply {
            GetReply::Hit { data, .. } => {
                let frame = self.buf.split_to(used).freeze();
                Ok(Some(frame.slice(data)))
            }
            GetReply::Miss => {
                self.buf.clear();
                Ok(None)
            }
            GetReply::Error(e) => Err(McError::Server(e)),
        }
    }

    /// `set` with no expiry: stores `value` under `key`. `Ok(false)` for `NOT_STORED`.
    pub async fn set(&mut self, key: &str, flags: u32, value: &[u8]) -> Result<bool, McError> {
        check_key(key)?;
        if value.len() > self.max_value {
            return Err(McError::ValueTooLarge {
                len: value.len(),
                max: self.max_value,
            });
        }
        let head = format!("set {key} {flags} 0 {}\r\n", value.len());
        self.send(&[head.as_bytes(), value, b"\r\n"]).await?;
        match self.line_reply().await? {
            LineReply::Stored => Ok(true),
            LineReply::NotStored => Ok(false),
            other => Err(unexpected("set", other)),
        }
    }

    /// `delete`: `Ok(false)` when the key was not there.
    pub async fn delete(&mut self, key: &str) -> Result<bool, McError> {
        check_key(key)?;
        self.send(&[b"delete ", key.as_bytes(), b"\r\n"]).await?;
        match self.line_reply().await? {
            LineReply::Deleted => Ok(true),
            LineReply::NotFound => Ok(false),
            other => Err(unexpected("delete", other)),
        }
    }

    /// `version`: the server's version text.
    pub async fn version(&mut self) -> Result<String, McError> {
        self.send(&[b"version\r\n"]).await?;
        match self.line_reply().await? {
            LineReply::Version(v) => Ok(v),
            other => Err(unexpected("version", other)),
        }
    }

    async fn line_reply(&mut self) -> Result<LineReply, McError> {
        let (reply, used) = self.read_reply(proto::parse_line_reply).await?;
        self.check_trailing(used)?;
        self.buf.clear();
        match reply {
            LineReply::Error(e) => Err(McError::Server(e)),
            r => Ok(r),
        }
    }

    /// Reads until `parse` finishes a reply; the buffer only grows to what the parser
    /// asks for, which its caps bound.
    async fn read_reply<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Result<Parse<T>, ProtoError>,
    ) -> Result<(T, usize), McError> {
        loop {
            match parse(&self.buf)? {
                Parse::Done(reply, used) => return Ok((reply, used)),
                Parse::Need(n) => {
                    let want = n.saturating_sub(self.buf.len()).max(READ_CHUNK.min(n));
                    self.buf.reserve(want);
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(McError::Closed);
                    }
                }
            }
        }
    }

    fn check_trailing(&self, used: usize) -> Result<(), McError> {
        match self.buf.len().saturating_sub(used) {
            0 => Ok(()),
            extra => Err(McError::Trailing(extra)),
        }
    }

    async fn send(&mut self, parts: &[&[u8]]) -> Result<(), McError> {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = self.stream.write_vectored(rest).await?;
            if n == 0 {
                return Err(McError::Io(io::ErrorKind::WriteZero.into()));
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }
}

fn check_key(key: &str) -> Result<(), McError> {
    if proto::valid_key(key) {
        Ok(())
    } else {
        Err(McError::InvalidKey(key.chars().take(80).collect()))
    }
}

fn unexpected(command: &'static str, reply: LineReply) -> McError {
    McError::Unexpected {
        command,
        reply: format!("{reply:?}"),
    }
}
