//! The NBD wire format, and the only place untrusted client bytes are interpreted.
//!
//! Two parsers take bytes from the network: [`parse_option_header`] with
//! [`parse_option`] during the handshake, and [`parse_request`] during transmission.
//! Both use checked arithmetic and hard caps, never allocate from a client-supplied
//! length themselves, and return a typed error that says what was wrong; the server
//! turns that error into the protocol's reply or closes the connection.
//!
//! ```text
//! option header (client → server, 16 bytes, big-endian)
//!   0  u64 magic "IHAVEOPT"   8  u32 option   12  u32 data length   16  data…
//!
//! request header (client → server, 28 bytes, big-endian)
//!   0  u32 magic 0x25609513   4  u16 flags   6  u16 type   8  u64 handle
//!  16  u64 offset            24  u32 length  28  payload (WRITE only)…
//! ```
//!
//! Reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::fmt;

/// "NBDMAGIC", the first eight bytes a server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the server's second magic and the magic of every option header.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;

// Option replies.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub(crate) const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

// Information types for NBD_OPT_INFO and NBD_OPT_GO.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_DESCRIPTION: u16 = 2;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(crate) const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TFLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub(crate) const TFLAG_SEND_DF: u16 = 1 << 7;
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub(crate) const TFLAG_SEND_CACHE: u16 = 1 << 10;

// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_CACHE: u16 = 5;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;

// Structured reply chunks.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// Bytes in an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes in a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes in a simple reply header.
pub(crate) const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes in a structured reply chunk header.
pub(crate) const STRUCTURED_HEADER_LEN: usize = 20;

/// Largest option payload the server reads. Real clients send a name (at most 4096
/// bytes) and a few info requests; anything longer closes the connection rather than
/// being buffered.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Longest export name the protocol allows.
pub const MAX_NAME_LEN: usize = 4096;
/// Largest READ or WRITE payload the protocol code accepts, whatever the server's
/// settings: a WRITE over this is not even skipped, it closes the connection. A
/// server advertises (and enforces) its own maximum block size, at most this.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Smallest block size advertised: any alignment is accepted.
pub const MIN_BLOCK: u32 = 1;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;

/// An error number sent to the client in a reply, as the protocol defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const EIO: Errno = Errno(5);
    pub const ENOMEM: Errno = Errno(12);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const EOVERFLOW: Errno = Errno(75);
    pub const ENOTSUP: Errno = Errno(95);
    pub const ESHUTDOWN: Errno = Errno(108);
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Errno::EPERM => "EPERM",
            Errno::EIO => "EIO",
            Errno::ENOMEM => "ENOMEM",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::ENOTSUP => "ENOTSUP",
            Errno::ESHUTDOWN => "ESHUTDOWN",
            Errno(other) => return write!(f, "errno {other}"),
        };
        f.write_str(name)
    }
}

/// The client's opaque request identifier, echoed in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle(pub u64);

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

// ---------------------------------------------------------------------------------
// Handshake options.

/// A checked option header: the option code and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    /// At most [`MAX_OPTION_DATA`].
    pub length: u32,
}

/// Why an option header was refused. Either way the connection is closed: a bad magic
/// means the stream is out of step, and a too-long payload cannot be skipped cheaply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionHeaderError {
    #[error("option header has magic {0:#018x}, expected IHAVEOPT")]
    BadMagic(u64),
    #[error("option {option} carries {length} bytes of data, more than the {max} allowed")]
    TooLong { option: u32, length: u32, max: u32 },
}

/// Parses the 16-byte header in front of every option.
pub fn parse_option_header(
    bytes: &[u8; OPTION_HEADER_LEN],
) -> Result<OptionHeader, OptionHeaderError> {
    let magic = be_u64(bytes, 0);
    if magic != IHAVEOPT {
        return Err(OptionHeaderError::BadMagic(magic));
    }
    let option = be_u32(bytes, 8);
    let length = be_u32(bytes, 12);
    if length > MAX_OPTION_DATA {
        return Err(OptionHeaderError::TooLong {
            option,
            length,
            max: MAX_OPTION_DATA,
        });
    }
    Ok(OptionHeader { option, length })
}

/// What the client asked for in NBD_OPT_INFO or NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Information types requested, in the client's order (unknown ones included; the
    /// server ignores what it does not know, as the protocol asks).
    pub requests: Vec<u16>,
}

/// A parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    /// An option this server does not implement; answered with NBD_REP_ERR_UNSUP.
    Unsupported(u32),
}

/// Why an option's data was refused; answered with NBD_REP_ERR_INVALID and this
/// message, and the handshake goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    #[error("option {option} takes no data but carries {length} bytes")]
    UnexpectedData { option: u32, length: usize },
    #[error("option {option} data is {length} bytes, too short for its fields")]
    Truncated { option: u32, length: usize },
    #[error("option {option} declares {declared} bytes of {field} but {available} remain")]
    FieldOverrun {
        option: u32,
        field: &'static str,
        declared: u64,
        available: usize,
    },
    #[error("export name is {length} bytes, longer than the {max} allowed")]
    NameTooLong { length: usize, max: usize },
    #[error("export name is not UTF-8")]
    NameNotUtf8,
}

fn parse_name(bytes: &[u8]) -> Result<String, OptionDataError> {
    if bytes.len() > MAX_NAME_LEN {
        return Err(OptionDataError::NameTooLong {
            length: bytes.len(),
            max: MAX_NAME_LEN,
        });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionDataError::NameNotUtf8)
}

fn parse_info_request(option: u32, data: &[u8]) -> Result<InfoRequest, OptionDataError> {
    let truncated = || OptionDataError::Truncated {
        option,
        length: data.len(),
    };
    let name_len = data.get(..4).map(|b| be_u32(b, 0)).ok_or_else(truncated)?;
    let rest = &data[4..];
    let name_len_usize = usize::try_from(name_len).unwrap_or(usize::MAX);
    // The name is followed by a two-byte count, so it can use at most len - 2 bytes.
    if name_len_usize > rest.len().saturating_sub(2) {
        return Err(OptionDataError::FieldOverrun {
            option,
            field: "export name",
            declared: u64::from(name_len),
            available: rest.len(),
        });
    }
    let (name, rest) = rest.split_at(name_len_usize);
    let name = parse_name(name)?;
    let count = usize::from(be_u16(rest, 0));
    let rest = &rest[2..];
    let need = count.checked_mul(2).ok_or_else(truncated)?;
    if need != rest.len() {
        return Err(OptionDataError::FieldOverrun {
            option,
            field: "information requests",
            declared: u64::try_from(need).unwrap_or(u64::MAX),
            available: rest.len(),
        });
    }
    let requests = rest.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
    Ok(InfoRequest { name, requests })
}

/// Parses an option's data (already bounded by [`parse_option_header`]).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionDataError> {
    let no_data = |parsed: ClientOption| {
        if data.is_empty() {
            Ok(parsed)
        } else {
            Err(OptionDataError::UnexpectedData {
                option,
                length: data.len(),
            })
        }
    };
    match option {
        OPT_EXPORT_NAME => parse_name(data).map(ClientOption::ExportName),
        // Any data on ABORT is ignored: the client is leaving either way.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_INFO => parse_info_request(option, data).map(ClientOption::Info),
        OPT_GO => parse_info_request(option, data).map(ClientOption::Go),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

// ---------------------------------------------------------------------------------
// Transmission requests.

/// What the parser needs to know about the export a connection is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    pub size: u64,
    pub read_only: bool,
    pub structured_replies: bool,
    /// The maximum block size advertised to the client: the largest READ, WRITE or
    /// CACHE accepted (at most [`MAX_PAYLOAD`]; values above it are treated as it).
    pub max_payload: u32,
}

/// A command, checked against the export: every range lies inside it, every payload
/// is at most [`ExportLimits::max_payload`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    /// `length` payload bytes follow the header.
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    Disconnect,
}

/// A checked request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub handle: Handle,
    pub command: Command,
}

/// Why a request is refused with an error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("unknown command type {0}")]
    UnknownCommand(u16),
    #[error("command flags {flags:#06x} not allowed on {command}")]
    BadFlags { command: &'static str, flags: u16 },
    #[error("{command} of zero bytes")]
    ZeroLength { command: &'static str },
    #[error("{command} of {length} bytes exceeds the {max}-byte maximum block size")]
    TooLong {
        command: &'static str,
        length: u32,
        max: u32,
    },
    #[error(
        "{command} of {length} bytes at offset {offset} runs past the end of the {size}-byte export"
    )]
    PastEnd {
        command: &'static str,
        offset: u64,
        length: u32,
        size: u64,
    },
    #[error("{command} on a read-only export")]
    ReadOnly { command: &'static str },
}

/// A request the parser could not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The stream is out of step; the connection must close.
    #[error("request has magic {0:#010x}, expected {REQUEST_MAGIC:#010x}")]
    BadMagic(u32),
    /// A WRITE whose payload is larger than the server will buffer. The payload cannot
    /// be skipped without reading up to 4 GiB, so the connection closes.
    #[error("write of {length} bytes exceeds the {max}-byte maximum block size")]
    WriteTooLarge {
        handle: Handle,
        length: u32,
        max: u32,
    },
    /// Answer `errno` to `handle`, after discarding `discard` payload bytes (a refused
    /// WRITE's data is still on the wire).
    #[error("{reason}")]
    Rejected {
        handle: Handle,
        errno: Errno,
        discard: u32,
        reason: Rejection,
    },
}

/// Parses and checks a 28-byte request header against the export.
///
/// Checks, in order: the magic; a WRITE over [`MAX_PAYLOAD`] (fatal); the command
/// type; the flags; the length (zero, or over `limits.max_payload` for a READ, WRITE
/// or CACHE: EINVAL, a WRITE's payload then discarded); the range
/// (`offset + length` with checked arithmetic against the size: ENOSPC for WRITE and
/// WRITE_ZEROES, EINVAL otherwise, as nbdkit does); and writes to a read-only export
/// (EPERM).
pub fn parse_request(
    bytes: &[u8; REQUEST_HEADER_LEN],
    limits: &ExportLimits,
) -> Result<Request, RequestError> {
    let magic = be_u32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(RequestError::BadMagic(magic));
    }
    let flags = be_u16(bytes, 4);
    let kind = be_u16(bytes, 6);
    let handle = Handle(be_u64(bytes, 8));
    let offset = be_u64(bytes, 16);
    let length = be_u32(bytes, 24);

    // Only WRITE carries a payload (this server never negotiates extended headers).
    let discard = if kind == CMD_WRITE {
        if length > MAX_PAYLOAD {
            return Err(RequestError::WriteTooLarge {
                handle,
                length,
                max: MAX_PAYLOAD,
            });
        }
        length
    } else {
        0
    };
    let reject = |errno: Errno, reason: Rejection| RequestError::Rejected {
        handle,
        errno,
        discard,
        reason,
    };

    let (command, allowed_flags, has_range, writes) = match kind {
        CMD_READ => {
            let df = if limits.structured_replies {
                CMD_FLAG_DF
            } else {
                0
            };
            ("READ", CMD_FLAG_FUA | df, true, false)
        }
        CMD_WRITE => ("WRITE", CMD_FLAG_FUA, true, true),
        CMD_DISC => ("DISC", CMD_FLAG_FUA, false, false),
        CMD_FLUSH => ("FLUSH", CMD_FLAG_FUA, false, false),
        CMD_TRIM => ("TRIM", CMD_FLAG_FUA, true, true),
        CMD_CACHE => ("CACHE", CMD_FLAG_FUA, true, false),
        CMD_WRITE_ZEROES => ("WRITE_ZEROES", CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, true, true),
        other => return Err(reject(Errno::EINVAL, Rejection::UnknownCommand(other))),
    };
    if flags & !allowed_flags != 0 {
        return Err(reject(
            Errno::EINVAL,
            Rejection::BadFlags { command, flags },
        ));
    }
    let fua = flags & CMD_FLAG_FUA != 0;

    if has_range {
        if length == 0 {
            return Err(reject(Errno::EINVAL, Rejection::ZeroLength { command }));
        }
        let max = limits.max_payload.min(MAX_PAYLOAD);
        if matches!(kind, CMD_READ | CMD_WRITE | CMD_CACHE) && length > max {
            return Err(reject(
                Errno::EINVAL,
                Rejection::TooLong {
                    command,
                    length,
                    max,
                },
            ));
        }
        let in_range = offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= limits.size);
        if !in_range {
            let errno = if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                Errno::ENOSPC
            } else {
                Errno::EINVAL
            };
            return Err(reject(
                errno,
                Rejection::PastEnd {
                    command,
                    offset,
                    length,
                    size: limits.size,
                },
            ));
        }
    }
    if writes && limits.read_only {
        return Err(reject(Errno::EPERM, Rejection::ReadOnly { command }));
    }

    let command = match kind {
        CMD_READ => Command::Read { offset, length },
        CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        CMD_CACHE => Command::Cache { offset, length },
        _ => Command::WriteZeroes {
            offset,
            length,
            fua,
        },
    };
    Ok(Request { handle, command })
}

// ---------------------------------------------------------------------------------
// Server → client encodings.

/// Encodes an option reply header followed by `data`.
pub(crate) fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Every reply this server builds is far below 4 GiB (names are capped at 4096).
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes a simple reply header into `out[..16]`.
pub(crate) fn put_simple_reply(out: &mut [u8], handle: Handle, errno: Errno) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.0.to_be_bytes());
    out[8..16].copy_from_slice(&handle.0.to_be_bytes());
}

/// Writes a structured reply chunk header into `out[..20]`.
pub(crate) fn put_structured_header(
    out: &mut [u8],
    flags: u16,
    kind: u16,
    handle: Handle,
    length: u32,
) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.0.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
}

/// A structured NBD_REPLY_TYPE_ERROR chunk (final) carrying a human-readable message.
pub(crate) fn structured_error(handle: Handle, errno: Errno, message: &str) -> Vec<u8> {
    // The message length field is 16 bits; keep well under it and on a char boundary.
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    let msg_len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let payload_len = 6 + u32::from(msg_len);
    let mut out = vec![0u8; STRUCTURED_HEADER_LEN];
    put_structured_header(
        &mut out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        payload_len,
    );
    out.extend_from_slice(&errno.0.to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(flags: u16, kind: u16, handle: u64, offset: u64, length: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&handle.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&length.to_be_bytes());
        b
    }

    const RW: ExportLimits = ExportLimits {
        size: 1 << 20,
        read_only: false,
        structured_replies: false,
        max_payload: MAX_PAYLOAD,
    };
    const RO: ExportLimits = ExportLimits {
        read_only: true,
        ..RW
    };

    fn errno_of(r: Result<Request, RequestError>) -> (Errno, u32) {
        match r {
            Err(RequestError::Rejected { errno, discard, .. }) => (errno, discard),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn accepts_well_formed_requests() {
        let r = parse_request(&header(0, CMD_READ, 7, 4096, 4096), &RW).unwrap();
        assert_eq!(r.handle, Handle(7));
        assert_eq!(
            r.command,
            Command::Read {
                offset: 4096,
                length: 4096
            }
        );
        let r = parse_request(&header(CMD_FLAG_FUA, CMD_WRITE, 1, 0, 1 << 20), &RW).unwrap();
        assert_eq!(
            r.command,
            Command::Write {
                offset: 0,
                length: 1 << 20,
                fua: true
            }
        );
        let r = parse_request(&header(0, CMD_DISC, 1, 0, 0), &RO).unwrap();
        assert_eq!(r.command, Command::Disconnect);
    }

    #[test]
    fn refuses_with_the_protocols_errors() {
        // Past the end: EINVAL for reads, ENOSPC for writes (and the payload is discarded).
        assert_eq!(
            errno_of(parse_request(&header(0, CMD_READ, 1, 1 << 20, 1), &RW)),
            (Errno::EINVAL, 0)
        );
        assert_eq!(
            errno_of(parse_request(
                &header(0, CMD_WRITE, 1, (1 << 20) - 1, 2),
                &RW
            )),
            (Errno::ENOSPC, 2)
        );
        // offset + length overflows u64.
        assert_eq!(
            errno_of(parse_request(&header(0, CMD_READ, 1, u64::MAX, 2), &RW)),
            (Errno::EINVAL, 0)
        );
        // Huge read: refused, nothing to discard, no allocation.
        let big = ExportLimits {
            size: u64::MAX,
            ..RW
        };
        assert_eq!(
            errno_of(parse_request(&header(0, CMD_READ, 1, 0, u32::MAX), &big)),
            (Errno::EINVAL, 0)
        );
        assert_eq!(
            errno_of(parse_request(&header(0, CMD_WRITE, 1, 0, 512), &RO)),
            (Errno::EPERM, 512)
        );
        assert_eq!(
            errno_of(parse_request(&header(0, 99, 1, 0, 0), &RW)),
            (Errno::EINVAL, 0)
        );
        assert_eq!(
            errno_of(parse_request(&header(1 << 9, CMD_READ, 1, 0, 1), &RW)),
            (Errno::EINVAL, 0)
        );
        assert_eq!(
            errno_of(parse_request(&header(0, CMD_READ, 1, 0, 0), &RW)),
            (Errno::EINVAL, 0)
        );
        assert!(matches!(
            parse_request(&header(0, CMD_WRITE, 1, 0, MAX_PAYLOAD + 1), &RW),
            Err(RequestError::WriteTooLarge { .. })
        ));
        // Over the server's own maximum block size: EINVAL, a WRITE's payload skipped.
        let small = ExportLimits {
            max_payload: 4096,
            ..RW
        };
        assert!(parse_request(&header(0, CMD_READ, 1, 0, 4096), &small).is_ok());
        assert_eq!(
            errno_of(parse_request(&header(0, CMD_READ, 1, 0, 4097), &small)),
            (Errno::EINVAL, 0)
        );
        assert_eq!(
            errno_of(parse_request(&header(0, CMD_WRITE, 1, 0, 8192), &small)),
            (Errno::EINVAL, 8192)
        );
        assert_eq!(
            parse_request(&header(0, CMD_CACHE, 1, 0, 8192), &small)
                .unwrap_err()
                .to_string(),
            "CACHE of 8192 bytes exceeds the 4096-byte maximum block size"
        );
        assert!(matches!(
            parse_request(&[0u8; 28], &RW),
            Err(RequestError::BadMagic(0))
        ));
    }

    #[test]
    fn rejection_messages_say_what_and_where() {
        let err = parse_request(&header(0, CMD_WRITE, 1, 1 << 20, 4096), &RW).unwrap_err();
        assert_eq!(
            err.to_string(),
            "WRITE of 4096 bytes at offset 1048576 runs past the end of the 1048576-byte export"
        );
    }

    fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&u16::try_from(requests.len()).unwrap().to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn parses_options() {
        let d = info_data(b"disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_option(OPT_GO, &d).unwrap(),
            ClientOption::Go(InfoRequest {
                name: "disk".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"").unwrap(),
            ClientOption::ExportName(String::new())
        );
        assert_eq!(
            parse_option(1234, b"xyz").unwrap(),
            ClientOption::Unsupported(1234)
        );
        assert!(parse_option(OPT_LIST, b"x").is_err());
        // Name length pointing past the data.
        let mut bad = info_data(b"disk", &[]);
        bad[3] = 200;
        assert!(matches!(
            parse_option(OPT_INFO, &bad),
            Err(OptionDataError::FieldOverrun { .. })
        ));
        // Count disagreeing with the data.
        let mut bad = info_data(b"disk", &[1]);
        bad.push(0);
        assert!(parse_option(OPT_INFO, &bad).is_err());

        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..16].copy_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&h),
            Err(OptionHeaderError::TooLong { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn request_parser_never_panics_and_keeps_its_promises(
            bytes in proptest::array::uniform28(any::<u8>()),
            size in any::<u64>(),
            read_only in any::<bool>(),
            structured_replies in any::<bool>(),
            force_magic in any::<bool>(),
            max_payload in prop_oneof![Just(MAX_PAYLOAD), 1..=MAX_PAYLOAD, any::<u32>()],
        ) {
            let mut bytes = bytes;
            if force_magic {
                bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            let limits = ExportLimits { size, read_only, structured_replies, max_payload };
            match parse_request(&bytes, &limits) {
                Ok(req) => {
                    let (offset, length) = match req.command {
                        Command::Read { offset, length }
                        | Command::Cache { offset, length } => (offset, length),
                        Command::Write { offset, length, .. }
                        | Command::Trim { offset, length, .. }
                        | Command::WriteZeroes { offset, length, .. } => {
                            prop_assert!(!read_only);
                            (offset, length)
                        }
                        Command::Flush | Command::Disconnect => (0, 0),
                    };
                    prop_assert!(offset + u64::from(length) <= size || length == 0);
                    if matches!(
                        req.command,
                        Command::Read { .. } | Command::Write { .. } | Command::Cache { .. }
                    ) {
                        prop_assert!((1..=max_payload.min(MAX_PAYLOAD)).contains(&length));
                    }
                }
                Err(RequestError::Rejected { discard, .. }) => {
                    prop_assert!(discard <= MAX_PAYLOAD);
                }
                Err(RequestError::BadMagic(m)) => prop_assert_ne!(m, REQUEST_MAGIC),
                Err(RequestError::WriteTooLarge { length, .. }) => {
                    prop_assert!(length > MAX_PAYLOAD)
                }
            }
        }

        #[test]
        fn option_parsers_never_panic(
            header in proptest::array::uniform16(any::<u8>()),
            option in 0u32..16,
            data in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            if let Ok(h) = parse_option_header(&header) {
                prop_assert!(h.length <= MAX_OPTION_DATA);
            }
            if let Ok(ClientOption::Info(req) | ClientOption::Go(req)) = parse_option(option, &data) {
                prop_assert!(req.name.len() + 2 * req.requests.len() + 6 == data.len());
            }
        }

        #[test]
        fn info_requests_round_trip(
            name in "[a-z0-9/._-]{0,64}",
            requests in proptest::collection::vec(any::<u16>(), 0..20),
        ) {
            let d = info_data(name.as_bytes(), &requests);
            prop_assert_eq!(
                parse_option(OPT_INFO, &d).unwrap(),
                ClientOption::Info(InfoRequest { name, requests })
            );
        }
    }
}
