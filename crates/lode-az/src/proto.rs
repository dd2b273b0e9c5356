//! The memcached text protocol, as far as the AZ client speaks it: `get`, `set`,
//! `delete` and `version`. This module is the only place bytes from a cache node are
//! parsed. Those bytes are untrusted: every length is checked against a cap
//! before anything is allocated or sliced, nothing here panics on any input (proptested
//! below), and a reply that does not fit the protocol exactly is an error, after which
//! the caller drops the connection rather than guess where the next reply starts.
//!
//! Replies the client expects:
//!
//! ```text
//! get <key>\r\n           → VALUE <key> <flags> <bytes> [<cas>]\r\n <data>\r\n END\r\n
//!                         → END\r\n
//! set <key> <flags> <exptime> <bytes>\r\n <data>\r\n
//!                         → STORED\r\n | NOT_STORED\r\n
//! delete <key>\r\n        → DELETED\r\n | NOT_FOUND\r\n
//! version\r\n             → VERSION <text>\r\n
//! any command             → ERROR\r\n | CLIENT_ERROR <text>\r\n | SERVER_ERROR <text>\r\n
//! ```
//!
//! The parsers are incremental: given the bytes received so far they either finish a
//! reply (saying how many bytes it used) or say how many bytes they need at least.

use std::fmt;
use std::ops::Range;

use thiserror::Error;

/// The longest key memcached accepts.
pub const MAX_KEY_LEN: usize = 250;

/// The longest reply line accepted, terminator included. A `VALUE` line with a 250-byte
/// key and every number at its widest is under 320 bytes; error lines carry a short text.
pub const MAX_LINE: usize = 1024;

/// How much of a server's text an error message repeats.
const SHOW_MAX: usize = 80;

/// What a parser made of the bytes so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse<T> {
    /// The reply is not complete: at least this many bytes (in total) are needed.
    Need(usize),
    /// A complete reply, which used the first `usize` bytes.
    Done(T, usize),
}

/// Which of memcached's three error replies a server sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// `ERROR`: the server did not know the command.
    Error,
    /// `CLIENT_ERROR`: the server says the request was malformed.
    Client,
    /// `SERVER_ERROR`: the server could not do it (out of memory, value too large).
    Server,
}

/// An error reply from a server, with its text (lossily decoded, shortened).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    /// Which error reply.
    pub kind: ErrorKind,
    /// The text after the keyword (empty for `ERROR`).
    pub message: String,
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.kind {
            ErrorKind::Error => "ERROR",
            ErrorKind::Client => "CLIENT_ERROR",
            ErrorKind::Server => "SERVER_ERROR",
        };
        if self.message.is_empty() {
            f.write_str(word)
        } else {
            write!(f, "{word} {}", self.message)
        }
    }
}

/// The reply to a `get` of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GetReply {
    /// The value: its flags and where its bytes lie in the buffer.
    Hit {
        /// The item's client flags.
        flags: u32,
        /// The value's bytes, as a range of the parsed buffer.
        data: Range<usize>,
    },
    /// `END` alone: the server does not hold the key.
    Miss,
    /// An error reply.
    Error(ErrorReply),
}

/// A one-line reply (to `set`, `delete`, `version`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineReply {
    /// `STORED`
    Stored,
    /// `NOT_STORED`
    NotStored,
    /// `EXISTS`
    Exists,
    /// `NOT_FOUND`
    NotFound,
    /// `DELETED`
    Deleted,
    /// `END`
    End,
    /// `VERSION <text>`
    Version(String),
    /// An error reply.
    Error(ErrorReply),
}

/// A reply that breaks the protocol. The connection it came on is out of step and must
/// be closed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// No line terminator within [`MAX_LINE`] bytes.
    #[error("reply line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A line ended in LF without CR, or held a CR before its end.
    #[error("reply line {0:?} is not terminated by CRLF")]
    BadLineEnd(String),
    /// A line that is no reply this client knows.
    #[error("unknown reply {0:?}")]
    Unknown(String),
    /// A `VALUE` line that does not parse.
    #[error("malformed VALUE line {0:?}")]
    BadValueLine(String),
    /// A `VALUE` for a key other than the one asked for.
    #[error("VALUE for key {got:?}, asked for {want:?}")]
    WrongKey {
        /// The key asked for.
        want: String,
        /// The key in the reply.
        got: String,
    },
    /// A value longer than the client accepts.
    #[error("VALUE of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// The length the server announced.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A value not followed by CRLF.
    #[error("VALUE data not followed by CRLF")]
    BadDataEnd,
    /// Something other than `END` after a value.
    #[error("expected END after the value, got {0:?}")]
    MissingEnd(String),
}

/// A server's bytes for an error message: lossy UTF-8, control characters escaped by
/// `{:?}` at the use site, at most [`SHOW_MAX`] characters.
fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(SHOW_MAX)
        .collect()
}

/// The first line of `buf`, without its CRLF, and the bytes it used with the CRLF.
fn take_line(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtoError> {
    let window = &buf[..buf.len().min(MAX_LINE)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Err(ProtoError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    let line = match lf.checked_sub(1) {
        Some(cr) if window[cr] == b'\r' => &window[..cr],
        _ => return Err(ProtoError::BadLineEnd(show(&window[..lf]))),
    };
    if line.contains(&b'\r') {
        return Err(ProtoError::BadLineEnd(show(line)));
    }
    Ok(Some((line, lf + 1)))
}

/// Parses an error reply line, if it is one.
fn error_line(line: &[u8]) -> Option<ErrorReply> {
    let (kind, rest) = if line == b"ERROR" {
        (ErrorKind::Error, &b""[..])
    } else if let Some(rest) = line.strip_prefix(b"CLIENT_ERROR") {
        (ErrorKind::Client, rest)
    } else if let Some(rest) = line.strip_prefix(b"SERVER_ERROR") {
        (ErrorKind::Server, rest)
    } else {
        return None;
    };
    // The keyword must stand alone or be followed by a space and the text.
    let message = match rest {
        [] => String::new(),
        [b' ', text @ ..] => show(text),
        _ => return None,
    };
    Some(ErrorReply { kind, message })
}

/// An unsigned decimal with no sign, no spaces and at most 20 digits, or `None`.
fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Parses the reply to `get <key>`, accepting a value of at most `max_value` bytes.
pub fn parse_get_reply(
    buf: &[u8],
    key: &[u8],
    max_value: usize,
) -> Result<Parse<GetReply>, ProtoError> {
    let Some((line, used)) = take_line(buf)? else {
        return Ok(Parse::Need(buf.len().saturating_add(1)));
    };
    if line == b"END" {
        return Ok(Parse::Done(GetReply::Miss, used));
    }
    if let Some(e) = error_line(line) {
        return Ok(Parse::Done(GetReply::Error(e), used));
    }
    let Some(rest) = line.strip_prefix(b"VALUE ") else {
        return Err(ProtoError::Unknown(show(line)));
    };
    let bad = || ProtoError::BadValueLine(show(line));
    let mut fields = rest.split(|&b| b == b' ');
    let (Some(got_key), Some(flags), Some(len)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(bad());
    };
    // An optional CAS unique, then nothing.
    if let Some(cas) = fields.next() {
        decimal(cas).ok_or_else(bad)?;
    }
    if fields.next().is_some() {
        return Err(bad());
    }
    if got_key != key {
        return Err(ProtoError::WrongKey {
            want: show(key),
            got: show(got_key),
        });
    }
    let flags = decimal(flags)
        .and_then(|f| u32::try_from(f).ok())
        .ok_or_else(bad)?;
    let len = decimal(len).ok_or_else(bad)?;
    let too_large = ProtoError::TooLarge {
        len,
        max: max_value,
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= max_value)
        .ok_or(too_large)?;
    // used + len + 2 cannot overflow: used <= MAX_LINE and len <= max_value, a usize that
    // the caller has also allocated; checked all the same.
    let Some(data_end) = used.checked_add(len) else {
        return Err(bad());
    };
    let Some(end_line) = data_end.checked_add(2) else {
        return Err(bad());
    };
    if buf.len() < end_line {
        // The data, its CRLF and "END\r\n".
        return Ok(Parse::Need(end_line.saturating_add(5)));
    }
    if &buf[data_end..end_line] != b"\r\n" {
        return Err(ProtoError::BadDataEnd);
    }
    let Some((tail, tail_used)) = take_line(&buf[end_line..])? else {
        return Ok(Parse::Need(buf.len().saturating_add(1)));
    };
    if tail != b"END" {
        return Err(ProtoError::MissingEnd(show(tail)));
    }
    let reply = GetReply::Hit {
        flags,
        data: used..data_end,
    };
    Ok(Parse::Done(reply, end_line + tail_used))
}

/// Parses a one-line reply.
pub fn parse_line_reply(buf: &[u8]) -> Result<Parse<LineReply>, ProtoError> {
    let Some((line, used)) = take_line(buf)? else {
        return Ok(Parse::Need(buf.len().saturating_add(1)));
    };
    let reply = match line {
        b"STORED" => LineReply::Stored,
        b"NOT_STORED" => LineReply::NotStored,
        b"EXISTS" => LineReply::Exists,
        b"NOT_FOUND" => LineReply::NotFound,
        b"DELETED" => LineReply::Deleted,
        b"END" => LineReply::End,
        _ => {
            if let Some(v) = line.strip_prefix(b"VERSION ") {
                LineReply::Version(show(v))
            } else if let Some(e) = error_line(line) {
                LineReply::Error(e)
            } else {
                return Err(ProtoError::Unknown(show(line)));
            }
        }
    };
    Ok(Parse::Done(reply, used))
}

/// A key memcached accepts: 1 to [`MAX_KEY_LEN`] bytes of printable ASCII, no spaces.
pub fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn parses_a_hit_and_a_miss() {
        let buf = b"VALUE k 7 5 99\r\nhello\r\nEND\r\n";
        let r = parse_get_reply(buf, b"k", MAX).unwrap();
        assert_eq!(
            r,
            Parse::Done(
                GetReply::Hit {
                    flags: 7,
                    data: 16..21
                },
                buf.len()
            )
        );
        assert_eq!(
            parse_get_reply(b"END\r\n", b"k", MAX).unwrap(),
            Parse::Done(GetReply::Miss, 5)
        );
        let r = parse_get_reply(b"SERVER_ERROR out of memory\r\n", b"k", MAX).unwrap();
        assert_eq!(
            r,
            Parse::Done(
                GetReply::Error(ErrorReply {
                    kind: ErrorKind::Server,
                    message: "out of memory".into()
                }),
                28
            )
        );
    }

    #[test]
    fn asks_for_the_whole_value_before_reading_it() {
        let buf = b"VALUE k 0 100\r\nab";
        assert_eq!(
            parse_get_reply(buf, b"k", MAX).unwrap(),
            Parse::Need(15 + 100 + 2 + 5)
        );
        assert_eq!(parse_get_reply(b"VALU", b"k", MAX).unwrap(), Parse::Need(5));
    }

    #[test]
    fn rejects_what_breaks_the_protocol() {
        let cases: &[(&[u8], ProtoError)] = &[
            (
                b"VALUE k 0 2000000\r\n",
                ProtoError::TooLarge {
                    len: 2_000_000,
                    max: MAX,
                },
            ),
            (
                b"VALUE k 0 99999999999999999999999\r\n",
                ProtoError::BadValueLine("VALUE k 0 99999999999999999999999".into()),
            ),
            (
                b"VALUE other 0 1\r\nx\r\nEND\r\n",
                ProtoError::WrongKey {
                    want: "k".into(),
                    got: "other".into(),
                },
            ),
            (b"VALUE k 0 1\r\nxyEND\r\n", ProtoError::BadDataEnd),
            (
                b"VALUE k 0 1\r\nx\r\nVALUE k 0 1\r\n",
                ProtoError::MissingEnd("VALUE k 0 1".into()),
            ),
            (
                b"VALUE k -1 1\r\n",
                ProtoError::BadValueLine("VALUE k -1 1".into()),
            ),
            (
                b"VALUE k 4294967296 1\r\n",
                ProtoError::BadValueLine("VALUE k 4294967296 1".into()),
            ),
            (
                b"VALUE k 0 1 2 3\r\n",
                ProtoError::BadValueLine("VALUE k 0 1 2 3".into()),
            ),
            (
                b"VALUE k  0 1\r\n",
                ProtoError::BadValueLine("VALUE k  0 1".into()),
            ),
            (b"END\n", ProtoError::BadLineEnd("END".into())),
            (b"EN\rD\r\n", ProtoError::BadLineEnd("EN\rD".into())),
            (b"STORED\r\n", ProtoError::Unknown("STORED".into())),
            (b"ERRORX\r\n", ProtoError::Unknown("ERRORX".into())),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_get_reply(input, b"k", MAX).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = vec![b'x'; MAX_LINE];
        assert_eq!(
            parse_get_reply(&long, b"k", MAX),
            Err(ProtoError::LineTooLong)
        );
        assert_eq!(
            ProtoError::TooLarge { len: 5, max: 4 }.to_string(),
            "VALUE of 5 bytes is over the 4-byte limit"
        );
    }

    #[test]
    fn parses_line_replies() {
        let ok: &[(&[u8], LineReply)] = &[
            (b"STORED\r\n", LineReply::Stored),
            (b"NOT_STORED\r\n", LineReply::NotStored),
            (b"DELETED\r\n", LineReply::Deleted),
            (b"NOT_FOUND\r\n", LineReply::NotFound),
            (b"VERSION 1.6.18\r\n", LineReply::Version("1.6.18".into())),
            (
                b"ERROR\r\n",
                LineReply::Error(ErrorReply {
                    kind: ErrorKind::Error,
                    message: String::new(),
                }),
            ),
            (
                b"CLIENT_ERROR bad data chunk\r\n",
                LineReply::Error(ErrorReply {
                    kind: ErrorKind::Client,
                    message: "bad data chunk".into(),
                }),
            ),
        ];
        for (input, want) in ok {
            assert_eq!(
                parse_line_reply(input).unwrap(),
                Parse::Done(want.clone(), input.len())
            );
        }
        assert_eq!(parse_line_reply(b"STOR").unwrap(), Parse::Need(5));
        assert_eq!(
            parse_line_reply(b"HELLO\r\n"),
            Err(ProtoError::Unknown("HELLO".into()))
        );
    }

    #[test]
    fn keys() {
        assert!(valid_key("lode-az:v1:k4m2:00ff"));
        assert!(valid_key(&"a".repeat(MAX_KEY_LEN)));
        assert!(!valid_key(&"a".repeat(MAX_KEY_LEN + 1)));
        assert!(!valid_key(""));
        assert!(!valid_key("a b"));
        assert!(!valid_key("a\r\n"));
        assert!(!valid_key("é"));
    }

    fn check_get_result(buf: &[u8], max: usize, r: &Result<Parse<GetReply>, ProtoError>) {
        match r {
            Ok(Parse::Need(n)) => assert!(*n > buf.len()),
            Ok(Parse::Done(reply, used)) => {
                assert!(*used <= buf.len());
                if let GetReply::Hit { data, .. } = reply {
                    assert!(data.end <= *used && data.len() <= max);
                }
            }
            Err(_) => {}
        }
    }

    proptest! {
        #[test]
        fn get_parser_never_panics_on_garbage(
            buf in proptest::collection::vec(any::<u8>(), 0..2048),
            max in 0usize..4096,
        ) {
            let r = parse_get_reply(&buf, b"k", max);
            check_get_result(&buf, max, &r);
        }

        #[test]
        fn get_parser_never_panics_on_near_misses(
            flags in "[0-9]{0,12}|-1|x",
            len in "[0-9]{0,22}",
            cas in proptest::option::of("[0-9]{0,22}"),
            data in proptest::collection::vec(any::<u8>(), 0..300),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
            max in 0usize..300,
        ) {
            let mut buf = format!("VALUE k {flags} {len}").into_bytes();
            if let Some(c) = cas {
                buf.extend_from_slice(format!(" {c}").as_bytes());
            }
            buf.extend_from_slice(b"\r\n");
            buf.extend_from_slice(&data);
            buf.extend_from_slice(&tail);
            let r = parse_get_reply(&buf, b"k", max);
            check_get_result(&buf, max, &r);
        }

        #[test]
        fn a_hit_parses_the_same_however_it_is_split(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            flags: u32,
            cas in proptest::option::of(any::<u64>()),
            cut in 0usize..700,
        ) {
            let mut buf = format!("VALUE key {flags} {}", data.len()).into_bytes();
            if let Some(c) = cas {
                buf.extend_from_slice(format!(" {c}").as_bytes());
            }
            buf.extend_from_slice(b"\r\n");
            buf.extend_from_slice(&data);
            buf.extend_from_slice(b"\r\nEND\r\n");
            let whole = parse_get_reply(&buf, b"key", 600).unwrap();
            let Parse::Done(GetReply::Hit { flags: f, data: range }, used) = whole else {
                panic!("not a hit: {whole:?}");
            };
            prop_assert_eq!(f, flags);
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(&buf[range], &data[..]);
            // Every prefix asks for more, and never for more than the whole.
            let cut = cut.min(buf.len() - 1);
            match parse_get_reply(&buf[..cut], b"key", 600).unwrap() {
                Parse::Need(n) => prop_assert!(n > cut && n <= buf.len()),
                other => prop_assert!(false, "prefix of {} parsed as {:?}", cut, other),
            }
        }

        #[test]
        fn line_parser_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..2048)) {
            match parse_line_reply(&buf) {
                Ok(Parse::Need(n)) => prop_assert!(n > buf.len()),
                Ok(Parse::Done(_, used)) => prop_assert!(used <= buf.len() && used <= MAX_LINE),
                Err(_) => {}
            }
        }
    }
}
