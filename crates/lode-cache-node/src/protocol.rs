//! The memcached text protocol: the one place where bytes from clients are parsed.
//!
//! A request is a line ending in `\n` (a `\r` before it is dropped), split on spaces;
//! storage commands are followed by a data block of the announced length and `\r\n`,
//! which the connection reads itself (see `server.rs`). Two functions take untrusted
//! bytes: [`frame`] finds the end of a line in a bounded window, and [`parse`] turns one
//! line into a [`Command`] or the error line memcached 1.6 would answer — with the same
//! token counts, the same messages and the same `noreply` behaviour (an error on a
//! `noreply` line is not answered). Every number is parsed with a range check; nothing
//! here allocates more than the line it was given.
//!
//! Where lode is stricter than memcached it says so: keys with control characters are
//! refused (memcached stores them), flags above 2³²−1 are refused (memcached truncates
//! them) and so is a `+` sign on a number.

/// The longest key, as memcached.
pub const MAX_KEY_LEN: usize = 250;
/// The longest request line, `\r\n` included, other than the retrieval commands.
/// memcached closes the connection past 2048 bytes without a newline; so does lode.
pub const MAX_LINE: usize = 2048;
/// The longest `get`/`gets`/`gat`/`gats` line: room for 260 keys of the largest size,
/// or about a thousand 64-hex-digit chunk names. memcached has no limit here; lode bounds
/// what one connection may make it buffer.
pub const MAX_RETRIEVAL_LINE: usize = 64 * 1024;
/// The largest data length a storage command may announce before it is a format error
/// rather than "too large" (memcached: `INT_MAX - 2`).
pub const MAX_ANNOUNCED_LEN: usize = 2_147_483_645;
/// Relative expiration times go up to 30 days; larger ones are absolute Unix times.
pub const REALTIME_MAXDELTA: i64 = 60 * 60 * 24 * 30;

/// The five storage commands that take a data block, and `cas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Store unconditionally.
    Set,
    /// Store only if the key holds nothing.
    Add,
    /// Store only if the key holds an item.
    Replace,
    /// Add the data after an existing item's value.
    Append,
    /// Add the data before an existing item's value.
    Prepend,
    /// Store only if the item's CAS unique still equals the one given.
    Cas(u64),
}

/// One parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `get`/`gets <key>*`.
    Get {
        /// The keys, in order; at least one.
        keys: Vec<&'a [u8]>,
        /// `gets`: answer with CAS uniques.
        with_cas: bool,
    },
    /// `gat`/`gats <exptime> <key>*`: get and touch.
    Gat {
        /// The new expiration time, as sent.
        exptime: i64,
        /// The keys; memcached answers `END` to none, so may lode.
        keys: Vec<&'a [u8]>,
        /// `gats`: answer with CAS uniques.
        with_cas: bool,
    },
    /// `set|add|replace|append|prepend <key> <flags> <exptime> <bytes> [noreply]` and
    /// `cas <key> <flags> <exptime> <bytes> <unique> [noreply]`.
    Store {
        /// Which one.
        kind: StoreKind,
        /// The key.
        key: &'a [u8],
        /// Opaque client flags.
        flags: u32,
        /// Expiration time, as sent.
        exptime: i64,
        /// Length of the data block that follows (without its `\r\n`).
        len: usize,
        /// No answer wanted.
        noreply: bool,
    },
    /// `delete <key> [0] [noreply]`.
    Delete {
        /// The key.
        key: &'a [u8],
        /// No answer wanted.
        noreply: bool,
    },
    /// `touch <key> <exptime> [noreply]`.
    Touch {
        /// The key.
        key: &'a [u8],
        /// The new expiration time, as sent.
        exptime: i64,
        /// No answer wanted.
        noreply: bool,
    },
    /// `incr`/`decr <key> <delta> [noreply]`.
    Arith {
        /// `incr` (wraps at 2⁶⁴) rather than `decr` (stops at 0).
        incr: bool,
        /// The key.
        key: &'a [u8],
        /// The amount.
        delta: u64,
        /// No answer wanted.
        noreply: bool,
    },
    /// `stats` or `stats reset`.
    Stats {
        /// `stats reset`.
        reset: bool,
    },
    /// `flush_all [delay] [noreply]`.
    FlushAll {
        /// Seconds (or an absolute time) until the flush; none is now.
        delay: Option<i64>,
        /// No answer wanted.
        noreply: bool,
    },
    /// `version`.
    Version,
    /// `quit`.
    Quit,
    /// `verbosity <level> [noreply]`: accepted and ignored (lode logs nothing per
    /// request).
    Verbosity {
        /// No answer wanted.
        noreply: bool,
    },
}

/// A line memcached would answer with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// `ERROR`: an unknown command, or a known one with the wrong number of tokens.
    Unknown,
    /// `CLIENT_ERROR <msg>`.
    Client {
        /// The message after `CLIENT_ERROR `.
        msg: &'static str,
        /// The line ended in `noreply`, so no answer is sent (as memcached).
        noreply: bool,
    },
}

impl ParseError {
    /// The line to send, `\r\n` included, or `None` for a `noreply` request.
    pub fn response(&self) -> Option<Vec<u8>> {
        match self {
            ParseError::Unknown => Some(b"ERROR\r\n".to_vec()),
            ParseError::Client { noreply: true, .. } => None,
            ParseError::Client { msg, .. } => Some(format!("CLIENT_ERROR {msg}\r\n").into_bytes()),
        }
    }
}

/// memcached's message for a malformed line.
pub const BAD_FORMAT: &str = "bad command line format";
/// memcached's message for a malformed `delete`.
pub const BAD_DELETE: &str = "bad command line format.  Usage: delete <key> [noreply]";
/// memcached's message for a malformed expiration time outside storage commands.
pub const BAD_EXPTIME: &str = "invalid exptime argument";
/// memcached's message for a malformed `incr`/`decr` amount.
pub const BAD_DELTA: &str = "invalid numeric delta argument";

/// Where the next request line ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole line: `body` bytes of text, `consumed` bytes with its `\r\n` or `\n`.
    Line {
        /// Bytes before the line ending.
        body: usize,
        /// Bytes up to and including the `\n`.
        consumed: usize,
    },
    /// No newline in the first `scanned` bytes; pass that back once more bytes arrive
    /// so they are not searched again.
    Incomplete {
        /// Bytes already searched.
        scanned: usize,
    },
    /// The line is longer than allowed; memcached closes the connection, and so does
    /// lode (after `CLIENT_ERROR line too long`).
    TooLong,
}

/// Finds the first line in `buf`, having already searched `scanned` bytes of it.
pub fn frame(buf: &[u8], scanned: usize) -> Frame {
    let limit = line_limit(buf);
    let window = &buf[..buf.len().min(limit)];
    let from = scanned.min(window.len());
    match window[from..].iter().position(|&b| b == b'\n') {
        Some(at) => {
            let newline = from + at;
            let body = if newline > 0 && window[newline - 1] == b'\r' {
                newline - 1
            } else {
                newline
            };
            Frame::Line {
                body,
                consumed: newline + 1,
            }
        }
        None if buf.len() >= limit => Frame::TooLong,
        None => Frame::Incomplete {
            scanned: window.len(),
        },
    }
}

/// The longest line allowed for the command `buf` starts with.
fn line_limit(buf: &[u8]) -> usize {
    let start = buf.iter().position(|&b| b != b' ').unwrap_or(buf.len());
    let rest = &buf[start..];
    let retrieval = [&b"get "[..], b"gets ", b"gat ", b"gats "]
        .iter()
        .any(|prefix| rest.starts_with(prefix));
    if retrieval {
        MAX_RETRIEVAL_LINE
    } else {
        MAX_LINE
    }
}

/// The most tokens any non-retrieval command takes (`cas` with `noreply`); a line with
/// more is an unknown command, as in memcached.
const MAX_TOKENS: usize = 7;

/// Parses one request line (without its line ending).
pub fn parse(line: &[u8]) -> Result<Command<'_>, ParseError> {
    let mut tokens = line.split(|&b| b == b' ').filter(|t| !t.is_empty());
    let Some(name) = tokens.next() else {
        return Err(ParseError::Unknown);
    };
    match name {
        b"get" | b"gets" => {
            let keys = keys(tokens, false)?;
            if keys.is_empty() {
                return Err(ParseError::Unknown);
            }
            Ok(Command::Get {
                keys,
                with_cas: name == b"gets",
            })
        }
        b"gat" | b"gats" => {
            let exptime = tokens.next().ok_or(ParseError::Unknown)?;
            let exptime = parse_exptime(exptime).ok_or(ParseError::Client {
                msg: BAD_EXPTIME,
                noreply: false,
            })?;
            Ok(Command::Gat {
                exptime,
                keys: keys(tokens, false)?,
                with_cas: name == b"gats",
            })
        }
        _ => {
            let mut args: [&[u8]; MAX_TOKENS] = [&[]; MAX_TOKENS];
            let mut n = 0;
            for token in tokens {
                if n == MAX_TOKENS {
                    return Err(ParseError::Unknown);
                }
                args[n] = token;
                n += 1;
            }
            parse_fixed(name, &args[..n])
        }
    }
}

fn keys<'a>(
    tokens: impl Iterator<Item = &'a [u8]>,
    noreply: bool,
) -> Result<Vec<&'a [u8]>, ParseError> {
    let mut keys = Vec::new();
    for key in tokens {
        check_key(key, noreply)?;
        keys.push(key);
    }
    Ok(keys)
}

/// Commands with a fixed number of tokens; `args` excludes the command name.
fn parse_fixed<'a>(name: &[u8], args: &[&'a [u8]]) -> Result<Command<'a>, ParseError> {
    let noreply = args.last().is_some_and(|t| *t == b"noreply");
    let client = |msg| ParseError::Client { msg, noreply };
    let store_kind = match name {
        b"set" => Some(StoreKind::Set),
        b"add" => Some(StoreKind::Add),
        b"replace" => Some(StoreKind::Replace),
        b"append" => Some(StoreKind::Append),
        b"prepend" => Some(StoreKind::Prepend),
        b"cas" => Some(StoreKind::Cas(0)),
        _ => None,
    };
    if let Some(kind) = store_kind {
        let base = if kind == StoreKind::Cas(0) { 5 } else { 4 };
        if args.len() != base && args.len() != base + 1 {
            return Err(ParseError::Unknown);
        }
        let key = args[0];
        check_key(key, noreply)?;
        let flags = parse_u32(args[1]).ok_or(client(BAD_FORMAT))?;
        let exptime = parse_exptime(args[2]).ok_or(client(BAD_FORMAT))?;
        let len = parse_len(args[3]).ok_or(client(BAD_FORMAT))?;
        let kind = if base == 5 {
            StoreKind::Cas(parse_u64(args[4]).ok_or(client(BAD_FORMAT))?)
        } else {
            kind
        };
        if len > MAX_ANNOUNCED_LEN {
            return Err(client(BAD_FORMAT));
        }
        return Ok(Command::Store {
            kind,
            key,
            flags,
            exptime,
            len,
            noreply,
        });
    }
    match name {
        b"delete" => {
            // memcached accepts a legacy hold time of exactly 0.
            let valid = match args.len() {
                1 => true,
                2 => args[1] == b"0" || noreply,
                3 => args[1] == b"0" && noreply,
                _ => return Err(ParseError::Unknown),
            };
            if !valid {
                return Err(client(BAD_DELETE));
            }
            check_key(args[0], noreply)?;
            Ok(Command::Delete {
                key: args[0],
                noreply,
            })
        }
        b"touch" => {
            if args.len() != 2 && args.len() != 3 {
                return Err(ParseError::Unknown);
            }
            check_key(args[0], noreply)?;
            let exptime = parse_exptime(args[1]).ok_or(client(BAD_EXPTIME))?;
            Ok(Command::Touch {
                key: args[0],
                exptime,
                noreply,
            })
        }
        b"incr" | b"decr" => {
            if args.len() != 2 && args.len() != 3 {
                return Err(ParseError::Unknown);
            }
            check_key(args[0], noreply)?;
            let delta = parse_u64(args[1]).ok_or(client(BAD_DELTA))?;
            Ok(Command::Arith {
                incr: name == b"incr",
                key: args[0],
                delta,
                noreply,
            })
        }
        b"stats" => match args {
            [] => Ok(Command::Stats { reset: false }),
            [b"reset"] => Ok(Command::Stats { reset: true }),
            // Sub-statistics (items, slabs, settings, ...) describe memcached's slab
            // allocator; lode has none to report.
            _ => Err(ParseError::Unknown),
        },
        b"flush_all" => {
            if args.len() > 2 {
                return Err(ParseError::Unknown);
            }
            let delay = match args.first() {
                None => None,
                Some(&t) if t == b"noreply" && args.len() == 1 => None,
                Some(&t) => Some(parse_exptime(t).ok_or(client(BAD_EXPTIME))?),
            };
            Ok(Command::FlushAll { delay, noreply })
        }
        // memcached 1.6 ignores arguments to these two.
        b"version" => Ok(Command::Version),
        b"quit" => Ok(Command::Quit),
        b"verbosity" => {
            if args.is_empty() || args.len() > 2 {
                return Err(ParseError::Unknown);
            }
            Ok(Command::Verbosity { noreply })
        }
        _ => Err(ParseError::Unknown),
    }
}

/// Keys are at most 250 bytes with no control characters (spaces and newlines cannot
/// be in a token at all).
fn check_key(key: &[u8], noreply: bool) -> Result<(), ParseError> {
    if key.len() > MAX_KEY_LEN || key.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(ParseError::Client {
            msg: BAD_FORMAT,
            noreply,
        });
    }
    Ok(())
}

/// Whether `key` is one a client may send (used by tests and the key checks above).
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && !key.contains(&b' ') && check_key(key, false).is_ok()
}

fn parse_u64(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 20 || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    t.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn parse_u32(t: &[u8]) -> Option<u32> {
    parse_u64(t).and_then(|v| u32::try_from(v).ok())
}

/// Expiration times are 32-bit signed, as in memcached.
fn parse_exptime(t: &[u8]) -> Option<i64> {
    let (negative, digits) = match t.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let magnitude = i64::try_from(parse_u64(digits)?).ok()?;
    let value = if negative { -magnitude } else { magnitude };
    i32::try_from(value).is_ok().then_some(value)
}

/// Data lengths: memcached's signed 32-bit parse, so a negative or overflowing length
/// is a format error; the `MAX_ANNOUNCED_LEN` check follows in the caller.
fn parse_len(t: &[u8]) -> Option<usize> {
    let v = parse_u64(t)?;
    if v > i32::MAX as u64 {
        return None;
    }
    usize::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(line: &str) -> Result<Command<'_>, ParseError> {
        parse(line.as_bytes())
    }

    fn client(msg: &'static str) -> Result<Command<'static>, ParseError> {
        Err(ParseError::Client {
            msg,
            noreply: false,
        })
    }

    #[test]
    fn frames_lines_with_either_ending() {
        assert_eq!(
            frame(b"get a\r\nget b", 0),
            Frame::Line {
                body: 5,
                consumed: 7
            }
        );
        assert_eq!(
            frame(b"get a\nx", 0),
            Frame::Line {
                body: 5,
                consumed: 6
            }
        );
        assert_eq!(frame(b"get a", 0), Frame::Incomplete { scanned: 5 });
        assert_eq!(frame(b"", 0), Frame::Incomplete { scanned: 0 });
        assert_eq!(
            frame(b"\n", 0),
            Frame::Line {
                body: 0,
                consumed: 1
            }
        );
    }

    #[test]
    fn long_lines_are_refused_past_their_limit() {
        let long = vec![b'x'; MAX_LINE];
        assert_eq!(frame(&long, 0), Frame::TooLong);
        let mut ok = vec![b'x'; MAX_LINE - 1];
        ok.push(b'\n');
        assert!(matches!(frame(&ok, 0), Frame::Line { .. }));
        let mut get = b"get ".to_vec();
        get.resize(MAX_LINE * 4, b'k');
        assert_eq!(
            frame(&get, 0),
            Frame::Incomplete {
                scanned: MAX_LINE * 4
            }
        );
        get.resize(MAX_RETRIEVAL_LINE, b'k');
        assert_eq!(frame(&get, 0), Frame::TooLong);
    }

    #[test]
    fn storage_commands() {
        assert_eq!(
            p("set k 5 10 3"),
            Ok(Command::Store {
                kind: StoreKind::Set,
                key: b"k",
                flags: 5,
                exptime: 10,
                len: 3,
                noreply: false
            })
        );
        assert_eq!(
            p("cas k 0 -1 3 99 noreply"),
            Ok(Command::Store {
                kind: StoreKind::Cas(99),
                key: b"k",
                flags: 0,
                exptime: -1,
                len: 3,
                noreply: true
            })
        );
        // An unknown sixth token is ignored, as in memcached.
        assert!(matches!(
            p("set k 0 0 1 bogus"),
            Ok(Command::Store { noreply: false, .. })
        ));
        assert_eq!(p("set k 0 0"), Err(ParseError::Unknown));
        assert_eq!(p("set k 0 0 1 2 3 4"), Err(ParseError::Unknown));
        assert_eq!(p("cas k 0 0 1"), Err(ParseError::Unknown));
        assert_eq!(p("set k 0 0 -1"), client(BAD_FORMAT));
        assert_eq!(p("set k 0 0 abc"), client(BAD_FORMAT));
        assert_eq!(p("set k -1 0 1"), client(BAD_FORMAT));
        assert_eq!(p("set k 4294967296 0 1"), client(BAD_FORMAT));
        assert_eq!(p("set k 0 abc 1"), client(BAD_FORMAT));
        assert_eq!(p("set k 0 0 2147483648"), client(BAD_FORMAT));
        assert_eq!(p("set k 0 0 2147483646"), client(BAD_FORMAT));
        assert!(p("set k 0 0 2147483645").is_ok());
        assert_eq!(p("cas k 0 0 1 abc"), client(BAD_FORMAT));
        assert_eq!(
            p("set k 0 0 abc noreply"),
            Err(ParseError::Client {
                msg: BAD_FORMAT,
                noreply: true
            })
        );
    }

    #[test]
    fn keys_are_checked() {
        let long = format!("get {}", "a".repeat(251));
        assert_eq!(p(&long), client(BAD_FORMAT));
        let max = format!("get {}", "a".repeat(250));
        assert!(p(&max).is_ok());
        assert_eq!(p("get a\tb"), client(BAD_FORMAT));
        assert_eq!(p("set a\x01b 0 0 1"), client(BAD_FORMAT));
        assert_eq!(p("get ok a\x7f"), client(BAD_FORMAT));
        // Bytes past ASCII are allowed, as in memcached.
        assert!(parse("get caf\u{e9}".as_bytes()).is_ok());
    }

    #[test]
    fn retrieval_commands() {
        assert_eq!(
            p("get a  b c "),
            Ok(Command::Get {
                keys: vec![b"a", b"b", b"c"],
                with_cas: false
            })
        );
        assert_eq!(
            p(" gets a"),
            Ok(Command::Get {
                keys: vec![b"a"],
                with_cas: true
            })
        );
        assert_eq!(p("get"), Err(ParseError::Unknown));
        assert_eq!(p("gets "), Err(ParseError::Unknown));
        assert_eq!(p("gat"), Err(ParseError::Unknown));
        assert_eq!(
            p("gat 10"),
            Ok(Command::Gat {
                exptime: 10,
                keys: vec![],
                with_cas: false
            })
        );
        assert_eq!(p("gats x k"), client(BAD_EXPTIME));
        assert_eq!(p("GET k"), Err(ParseError::Unknown));
    }

    #[test]
    fn other_commands() {
        assert_eq!(
            p("delete k"),
            Ok(Command::Delete {
                key: b"k",
                noreply: false
            })
        );
        assert!(p("delete k 0").is_ok());
        assert!(p("delete k 0 noreply").is_ok());
        assert_eq!(
            p("delete k noreply"),
            Ok(Command::Delete {
                key: b"k",
                noreply: true
            })
        );
        assert_eq!(p("delete k 5"), client(BAD_DELETE));
        assert_eq!(p("delete k noreply 0"), client(BAD_DELETE));
        assert_eq!(p("delete"), Err(ParseError::Unknown));
        assert_eq!(p("delete a b c d e"), Err(ParseError::Unknown));
        assert_eq!(p("touch k"), Err(ParseError::Unknown));
        assert_eq!(p("touch k abc"), client(BAD_EXPTIME));
        assert_eq!(
            p("touch k -5 noreply"),
            Ok(Command::Touch {
                key: b"k",
                exptime: -5,
                noreply: true
            })
        );
        assert_eq!(p("incr k"), Err(ParseError::Unknown));
        assert_eq!(p("incr k -1"), client(BAD_DELTA));
        assert_eq!(p("incr k 18446744073709551616"), client(BAD_DELTA));
        assert_eq!(
            p("decr k 18446744073709551615"),
            Ok(Command::Arith {
                incr: false,
                key: b"k",
                delta: u64::MAX,
                noreply: false
            })
        );
        assert_eq!(p("stats"), Ok(Command::Stats { reset: false }));
        assert_eq!(p("stats reset"), Ok(Command::Stats { reset: true }));
        assert_eq!(p("stats noreply"), Err(ParseError::Unknown));
        assert_eq!(
            p("flush_all"),
            Ok(Command::FlushAll {
                delay: None,
                noreply: false
            })
        );
        assert_eq!(
            p("flush_all noreply"),
            Ok(Command::FlushAll {
                delay: None,
                noreply: true
            })
        );
        assert_eq!(
            p("flush_all 10 noreply"),
            Ok(Command::FlushAll {
                delay: Some(10),
                noreply: true
            })
        );
        assert_eq!(p("flush_all abc"), client(BAD_EXPTIME));
        assert_eq!(p("flush_all 1 2 3"), Err(ParseError::Unknown));
        assert_eq!(p("version foo bar"), Ok(Command::Version));
        assert_eq!(p("quit"), Ok(Command::Quit));
        assert_eq!(p("verbosity"), Err(ParseError::Unknown));
        assert_eq!(p("verbosity 1"), Ok(Command::Verbosity { noreply: false }));
        assert_eq!(
            p("verbosity noreply"),
            Ok(Command::Verbosity { noreply: true })
        );
        assert_eq!(p("verbosity a b c"), Err(ParseError::Unknown));
        assert_eq!(p(""), Err(ParseError::Unknown));
        assert_eq!(p("   "), Err(ParseError::Unknown));
        assert_eq!(p("bogus"), Err(ParseError::Unknown));
    }

    #[test]
    fn error_lines_are_memcacheds() {
        assert_eq!(ParseError::Unknown.response().unwrap(), b"ERROR\r\n");
        assert_eq!(
            ParseError::Client {
                msg: BAD_FORMAT,
                noreply: false
            }
            .response()
            .unwrap(),
            b"CLIENT_ERROR bad command line format\r\n"
        );
        assert_eq!(
            ParseError::Client {
                msg: BAD_FORMAT,
                noreply: true
            }
            .response(),
            None
        );
    }

    fn render(cmd: &Command<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        let key_list = |out: &mut Vec<u8>, keys: &[&[u8]]| {
            for k in keys {
                out.push(b' ');
                out.extend_from_slice(k);
            }
        };
        let nr = |noreply: bool| if noreply { " noreply" } else { "" };
        match cmd {
            Command::Get { keys, with_cas } => {
                out.extend_from_slice(if *with_cas { b"gets" } else { b"get" });
                key_list(&mut out, keys);
            }
            Command::Gat {
                exptime,
                keys,
                with_cas,
            } => {
                out.extend_from_slice(if *with_cas { b"gats" } else { b"gat" });
                out.extend_from_slice(format!(" {exptime}").as_bytes());
                key_list(&mut out, keys);
            }
            Command::Store {
                kind,
                key,
                flags,
                exptime,
                len,
                noreply,
            } => {
                let name = match kind {
                    StoreKind::Set => "set",
                    StoreKind::Add => "add",
                    StoreKind::Replace => "replace",
                    StoreKind::Append => "append",
                    StoreKind::Prepend => "prepend",
                    StoreKind::Cas(_) => "cas",
                };
                out.extend_from_slice(name.as_bytes());
                key_list(&mut out, &[key]);
                out.extend_from_slice(format!(" {flags} {exptime} {len}").as_bytes());
                if let StoreKind::Cas(unique) = kind {
                    out.extend_from_slice(format!(" {unique}").as_bytes());
                }
                out.extend_from_slice(nr(*noreply).as_bytes());
            }
            Command::Delete { key, noreply } => {
                out.extend_from_slice(b"delete");
                key_list(&mut out, &[key]);
                out.extend_from_slice(nr(*noreply).as_bytes());
            }
            Command::Touch {
                key,
                exptime,
                noreply,
            } => {
                out.extend_from_slice(b"touch");
                key_list(&mut out, &[key]);
                out.extend_from_slice(format!(" {exptime}{}", nr(*noreply)).as_bytes());
            }
            Command::Arith {
                incr,
                key,
                delta,
                noreply,
            } => {
                out.extend_from_slice(if *incr { b"incr" } else { b"decr" });
                key_list(&mut out, &[key]);
                out.extend_from_slice(format!(" {delta}{}", nr(*noreply)).as_bytes());
            }
            Command::Stats { reset } => {
                out.extend_from_slice(if *reset { b"stats reset" } else { b"stats" })
            }
            Command::FlushAll { delay, noreply } => {
                out.extend_from_slice(b"flush_all");
                if let Some(d) = delay {
                    out.extend_from_slice(format!(" {d}").as_bytes());
                }
                out.extend_from_slice(nr(*noreply).as_bytes());
            }
            Command::Version => out.extend_from_slice(b"version"),
            Command::Quit => out.extend_from_slice(b"quit"),
            Command::Verbosity { noreply } => {
                out.extend_from_slice(format!("verbosity 1{}", nr(*noreply)).as_bytes())
            }
        }
        out
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(prop_oneof![0x21u8..0x7f, 0x80u8..=0xff], 1..=MAX_KEY_LEN)
            .prop_filter("noreply is a keyword", |k| k != b"noreply")
    }

    fn exptime() -> impl Strategy<Value = i64> {
        i64::from(i32::MIN)..=i64::from(i32::MAX)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any bytes: framing and parsing return, never panic, and a frame never points
        /// past the buffer or past its limit.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000),
                                       scanned in 0usize..4000) {
            match frame(&bytes, scanned) {
                Frame::Line { body, consumed } => {
                    prop_assert!(body < consumed && consumed <= bytes.len());
                    prop_assert!(consumed <= MAX_RETRIEVAL_LINE);
                    let _ = parse(&bytes[..body]);
                }
                Frame::Incomplete { scanned } => prop_assert!(scanned <= bytes.len()),
                Frame::TooLong => prop_assert!(bytes.len() >= MAX_LINE),
            }
            let _ = parse(&bytes);
        }

        /// Lines made of protocol words in any order: parse never panics, and what it
        /// accepts has valid keys.
        #[test]
        fn shuffled_words_parse_safely(words in proptest::collection::vec(
            prop_oneof![
                Just("get".to_string()), Just("set".to_string()), Just("cas".to_string()),
                Just("delete".to_string()), Just("incr".to_string()), Just("touch".to_string()),
                Just("noreply".to_string()), Just("0".to_string()), Just("-1".to_string()),
                Just("4294967296".to_string()), Just("99999999999999999999".to_string()),
                "[a-z]{1,5}".prop_map(|s| s), any::<u32>().prop_map(|n| n.to_string()),
            ], 0..10)) {
            let line = words.join(" ");
            if let Ok(cmd) = parse(line.as_bytes()) {
                match cmd {
                    Command::Get { keys, .. } | Command::Gat { keys, .. } => {
                        for k in keys { prop_assert!(valid_key(k)); }
                    }
                    Command::Store { key, len, .. } => {
                        prop_assert!(valid_key(key));
                        prop_assert!(len <= MAX_ANNOUNCED_LEN);
                    }
                    _ => {}
                }
            }
        }

        /// Valid commands survive render → parse unchanged.
        #[test]
        fn valid_commands_round_trip(
            keys in proptest::collection::vec(key(), 1..8),
            flags in any::<u32>(), exp in exptime(), len in 0usize..=MAX_ANNOUNCED_LEN,
            unique in any::<u64>(), delta in any::<u64>(), noreply in any::<bool>(),
            which in 0usize..12,
        ) {
            let key = keys[0].as_slice();
            let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let kinds = [StoreKind::Set, StoreKind::Add, StoreKind::Replace,
                         StoreKind::Append, StoreKind::Prepend, StoreKind::Cas(unique)];
            let cmd = match which {
                0..=5 => Command::Store { kind: kinds[which], key, flags, exptime: exp, len, noreply },
                6 => Command::Get { keys: key_refs, with_cas: noreply },
                7 => Command::Gat { exptime: exp, keys: key_refs, with_cas: noreply },
                8 => Command::Delete { key, noreply },
                9 => Command::Touch { key, exptime: exp, noreply },
                10 => Command::Arith { incr: noreply, key, delta, noreply: false },
                _ => Command::FlushAll { delay: Some(exp), noreply },
            };
            let line = render(&cmd);
            prop_assert_eq!(parse(&line), Ok(cmd));
        }
    }
}
