//! The one place tar bytes enter: a streaming tar reader with size caps.
//!
//! Layers reach the flattener as tar streams (docs/flatten.md). This
//! reader turns them into [`TarEntry`] headers and the entries' contents,
//! reading each byte once. It understands what image builders write:
//! ustar (with the `prefix` field), GNU (long names `L`/`K`, old sparse
//! files `S`, atime/ctime), PAX extended headers (`path`, `linkpath`,
//! `size`, `uid`, `gid`, high-resolution times, `SCHILY.xattr.*`, GNU sparse
//! formats 0.1 and 1.0) and base-256 numbers. Global PAX headers (`g`) are
//! read and ignored, as Go's `archive/tar` (and so Docker, containerd and
//! umoci) does.
//!
//! ```text
//! ┌────────────┬─────────┬────────────┬───────────┬─────┬──────────┐
//! │ [x|L|K hdr]│ its data│ entry hdr  │ data, pad │ ... │ 2 × zero │
//! │ 512 bytes  │ ≤ cap   │ 512 bytes  │ to 512    │     │  blocks  │
//! └────────────┴─────────┴────────────┴───────────┴─────┴──────────┘
//! ```
//!
//! Everything read into memory is capped by [`TarLimits`]: extended headers
//! and long names, sparse maps, the number of headers. Numbers are parsed
//! with checked arithmetic. A stream that ends inside a header or an entry's
//! data is [`TarError::Truncated`]; one that ends cleanly on a header
//! boundary without the end-of-archive blocks is accepted, like Go's reader.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom};

use lode_ext4::Timestamp;

const BLOCK: usize = 512;
const BLOCK_U64: u64 = 512;

/// Caps on what one archive may make the reader hold in memory.
#[derive(Debug, Clone)]
pub struct TarLimits {
    /// Largest PAX extended header or GNU long name/link, in bytes.
    pub max_extended_header: u64,
    /// Most segments in one sparse file's map.
    pub max_sparse_segments: usize,
    /// Most headers (entries and extended headers) in one archive.
    pub max_headers: u64,
}

impl Default for TarLimits {
    fn default() -> Self {
        Self {
            max_extended_header: 1 << 20,
            max_sparse_segments: 1 << 16,
            max_headers: 4_000_000,
        }
    }
}

/// Errors from reading a tar stream. Offsets are bytes into the
/// (uncompressed) archive.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("archive truncated at byte {offset} (inside {what})")]
    Truncated { offset: u64, what: &'static str },
    #[error("reading the archive at byte {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error("header at byte {offset}: bad checksum (not a tar archive, or corrupt)")]
    Checksum { offset: u64 },
    #[error("header at byte {offset}: invalid {field} field {value:?}")]
    BadField {
        offset: u64,
        field: &'static str,
        value: String,
    },
    #[error("header at byte {offset}: {what} of {size} bytes exceeds the cap of {cap} bytes")]
    TooLarge {
        offset: u64,
        what: &'static str,
        size: u64,
        cap: u64,
    },
    #[error("header at byte {offset}: bad PAX extended header: {detail}")]
    BadPax { offset: u64, detail: String },
    #[error("header at byte {offset}: unsupported entry type {typeflag:?}")]
    Unsupported { offset: u64, typeflag: char },
    #[error("header at byte {offset}: bad sparse map: {detail}")]
    BadSparse { offset: u64, detail: String },
    #[error("more than {max} headers in one archive")]
    TooManyHeaders { max: u64 },
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Regular,
    Hardlink,
    Symlink,
    CharDev,
    BlockDev,
    Dir,
    Fifo,
}

/// One entry's header, with its extended headers applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// The name as stored (not normalised).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub atime: Option<Timestamp>,
    pub ctime: Option<Timestamp>,
    /// Hardlink or symlink target as stored.
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Logical size of a regular file (the real size of a sparse file).
    pub size: u64,
    /// Extended attributes from `SCHILY.xattr.*` records.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Data segments (offset, length) of a sparse file.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Byte offset of the entry's own header in the archive.
    pub offset: u64,
}

/// A source of archive bytes that can skip cheaply where it can seek.
pub trait TarInput: Read {
    /// Skips `n` bytes; returns how many were skipped (fewer at the end).
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        io::copy(&mut Read::take(self, n), &mut io::sink())
    }
}

/// A non-seekable stream (a decompressor's output): skipping reads.
#[derive(Debug)]
pub struct Stream<R>(pub R);

impl<R: Read> Read for Stream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read> TarInput for Stream<R> {}

/// A seekable file of known length: skipping seeks.
#[derive(Debug)]
pub struct Seekable<F> {
    pub inner: F,
    pub pos: u64,
    pub len: u64,
}

impl<F: Read> Read for Seekable<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<F: Read + Seek> TarInput for Seekable<F> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let n = n.min(self.len.saturating_sub(self.pos));
        self.inner.seek(SeekFrom::Current(
            i64::try_from(n).map_err(io::Error::other)?,
        ))?;
        self.pos += n;
        Ok(n)
    }
}

/// Reads entries from a tar stream; see the module docs.
#[derive(Debug)]
pub struct TarReader<R> {
    inner: R,
    limits: TarLimits,
    /// Bytes of the archive consumed so far.
    pos: u64,
    /// Stored data bytes of the current entry not yet read.
    data_left: u64,
    /// Padding after the current entry's data.
    pad_left: u64,
    /// The current entry's sparse map and read position, when sparse.
    sparse: Option<SparseState>,
    headers: u64,
    ended: bool,
    /// The error behind the last failed content read.
    error: Option<TarError>,
}

#[derive(Debug)]
struct SparseState {
    map: Vec<(u64, u64)>,
    size: u64,
    /// Logical position in the file.
    lpos: u64,
    /// Index of the first segment not yet wholly read.
    seg: usize,
}

/// Extended-header values waiting for the entry they describe.
#[derive(Debug, Default)]
struct Pending {
    pax: BTreeMap<Vec<u8>, Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Parses a numeric header field: octal text, or base-256 (two's
/// complement) when the high bit of the first byte is set.
fn parse_numeric(field: &[u8]) -> Option<i64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let inv = if field[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &c) in field.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 != 0 {
                return None;
            }
            x = (x << 8) | u64::from(c);
        }
        if x >> 63 != 0 {
            return None;
        }
        let x = x.cast_signed();
        return Some(if inv == 0xff { !x } else { x });
    }
    let text = cstr(field);
    let text = text
        .iter()
        .position(|&b| b != b' ')
        .map_or(&text[..0], |s| &text[s..]);
    let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
    let digits = &text[..end];
    if text[end..].iter().any(|&b| b != b' ') {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(v)
}

fn show(field: &[u8]) -> String {
    cstr(field).escape_ascii().to_string()
}

/// Parses a PAX time: `[-]seconds[.fraction]`.
fn parse_pax_time(v: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(d - b'0') * 10u32.pow(8 - u32::try_from(i).ok()?);
    }
    Some(if !neg {
        Timestamp::new(secs, nanos)
    } else if nanos == 0 {
        Timestamp::new(-secs, 0)
    } else {
        Timestamp::new(-secs - 1, 1_000_000_000 - nanos)
    })
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Parses PAX records: `"<len> <key>=<value>\n"` where `<len>` counts the
/// whole record.
fn parse_pax(mut data: &[u8], into: &mut BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), String> {
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("record without a length")?;
        let len = parse_decimal(&data[..sp])
            .and_then(|l| usize::try_from(l).ok())
            .ok_or("record with a bad length")?;
        if len <= sp + 1 || len > data.len() {
            return Err(format!("record length {len} out of range"));
        }
        let (record, rest) = data.split_at(len);
        data = rest;
        let body = record[sp + 1..]
            .strip_suffix(b"\n")
            .ok_or("record not ended by a newline")?;
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("record without `=`")?;
        into.insert(body[..eq].to_vec(), body[eq + 1..].to_vec());
    }
    Ok(())
}

/// Validates a sparse map against the file's real size and stored bytes.
fn check_sparse(map: &[(u64, u64)], size: u64, stored: u64) -> Result<(), String> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in map {
        if off < end {
            return Err(format!("segment at {off} overlaps or is out of order"));
        }
        end = off
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| format!("segment {off}+{len} beyond the size {size}"))?;
        total = total.checked_add(len).ok_or("segments overflow")?;
    }
    if total != stored {
        return Err(format!(
            "segments hold {total} bytes but the entry stores {stored}"
        ));
    }
    Ok(())
}

impl<R: TarInput> TarReader<R> {
    pub fn new(inner: R, limits: TarLimits) -> Self {
        Self {
            inner,
            limits,
            pos: 0,
            data_left: 0,
            pad_left: 0,
            sparse: None,
            headers: 0,
            ended: false,
            error: None,
        }
    }

    /// Bytes of the archive consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The reader underneath; call after [`Self::next_entry`] returned
    /// `None` to read what follows the archive.
    pub fn inner_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The reader underneath, at the end of the archive.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The tar error behind a failed read of [`Self::content`], if the
    /// failure came from the archive rather than the consumer.
    pub fn take_error(&mut self) -> Option<TarError> {
        self.error.take()
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), TarError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(TarError::Truncated {
                        offset: self.pos,
                        what,
                    });
                }
                Ok(n) => {
                    filled += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarError::Io {
                        offset: self.pos,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), TarError> {
        let got = self.inner.skip(n).map_err(|source| TarError::Io {
            offset: self.pos,
            source,
        })?;
        self.pos += got;
        if got < n {
            return Err(TarError::Truncated {
                offset: self.pos,
                what,
            });
        }
        Ok(())
    }

    /// Reads a block, or `None` on a clean end of stream.
    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut block = [0u8; BLOCK];
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => {
                    return Err(TarError::Truncated {
                        offset: self.pos,
                        what: "a header",
                    });
                }
                Ok(n) => {
                    filled += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarError::Io {
                        offset: self.pos,
                        source,
                    });
                }
            }
        }
        Ok(Some(block))
    }

    /// Reads the data of an extended header (size-capped) and its padding.
    fn read_ext(
        &mut self,
        size: u64,
        offset: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, TarError> {
        let cap = self.limits.max_extended_header;
        if size > cap {
            return Err(TarError::TooLarge {
                offset,
                what,
                size,
                cap,
            });
        }
        let len = usize::try_from(size).map_err(|_| TarError::TooLarge {
            offset,
            what,
            size,
            cap,
        })?;
        let mut data = vec![0u8; len];
        self.read_exact(&mut data, what)?;
        self.skip(pad(size), what)?;
        Ok(data)
    }

    /// Skips the rest of the current entry.
    fn finish_entry(&mut self) -> Result<(), TarError> {
        let n = self.data_left + self.pad_left;
        self.data_left = 0;
        self.pad_left = 0;
        self.sparse = None;
        self.skip(n, "an entry's data")
    }

    /// The next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        if self.ended {
            return Ok(None);
        }
        self.finish_entry()?;
        let mut pending = Pending::default();
        loop {
            let offset = self.pos;
            let Some(block) = self.read_block()? else {
                self.ended = true;
                return Ok(None);
            };
            if block.iter().all(|&b| b == 0) {
                // End of archive. A second zero block normally follows; what
                // is left is read by the caller (it counts for the digest).
                self.ended = true;
                return Ok(None);
            }
            self.headers += 1;
            if self.headers > self.limits.max_headers {
                return Err(TarError::TooManyHeaders {
                    max: self.limits.max_headers,
                });
            }
            check_checksum(&block, offset)?;
            let typeflag = block[156];
            let size_field = &block[124..136];
            let size = parse_numeric(size_field)
                .and_then(|s| u64::try_from(s).ok())
                .ok_or_else(|| TarError::BadField {
                    offset,
                    field: "size",
                    value: show(size_field),
                })?;
            match typeflag {
                b'x' => {
                    let data = self.read_ext(size, offset, "PAX extended header")?;
                    parse_pax(&data, &mut pending.pax)
                        .map_err(|detail| TarError::BadPax { offset, detail })?;
                }
                b'g' => {
                    // Global headers are ignored, as Go's archive/tar does.
                    self.read_ext(size, offset, "PAX global header")?;
                }
                b'L' => {
                    let data = self.read_ext(size, offset, "GNU long name")?;
                    pending.long_name = Some(cstr(&data).to_vec());
                }
                b'K' => {
                    let data = self.read_ext(size, offset, "GNU long link name")?;
                    pending.long_link = Some(cstr(&data).to_vec());
                }
                b'V' => {
                    // A volume label names the archive, not a file.
                    self.skip(size.saturating_add(pad(size)), "a label")?;
                    pending = Pending::default();
                }
                _ => return self.entry(&block, offset, size, pending).map(Some),
            }
        }
    }

    fn entry(
        &mut self,
        block: &[u8; BLOCK],
        offset: u64,
        stored: u64,
        pending: Pending,
    ) -> Result<TarEntry, TarError> {
        let bad = |field: &'static str, value: &[u8]| TarError::BadField {
            offset,
            field,
            value: show(value),
        };
        let magic = &block[257..265];
        let ustar = &magic[..6] == b"ustar\0";
        let gnu = magic == b"ustar  \0";
        let typeflag = block[156];
        let pax = &pending.pax;

        let mut path = if let Some(p) = pax.get(&b"path"[..]).filter(|p| !p.is_empty()) {
            p.clone()
        } else if let Some(p) = pending.long_name {
            p
        } else {
            let name = cstr(&block[0..100]);
            let prefix = cstr(&block[345..500]);
            if ustar && !prefix.is_empty() {
                [prefix, b"/", name].concat()
            } else {
                name.to_vec()
            }
        };
        let link = if let Some(l) = pax.get(&b"linkpath"[..]).filter(|l| !l.is_empty()) {
            l.clone()
        } else if let Some(l) = pending.long_link {
            l
        } else {
            cstr(&block[157..257]).to_vec()
        };

        let num = |field: &'static str, range: std::ops::Range<usize>| {
            parse_numeric(&block[range.clone()]).ok_or_else(|| bad(field, &block[range]))
        };
        let id = |field: &'static str, key: &[u8], range: std::ops::Range<usize>| {
            let v = match pax.get(key) {
                Some(v) => parse_decimal(v)
                    .and_then(|v| i64::try_from(v).ok())
                    .ok_or_else(|| bad(field, v))?,
                None => num(field, range.clone())?,
            };
            u32::try_from(v).map_err(|_| bad(field, &block[range]))
        };
        let mode_raw = num("mode", 100..108)?;
        let mode = u32::try_from(mode_raw & 0o7777).expect("masked to 12 bits");
        let uid = id("uid", b"uid", 108..116)?;
        let gid = id("gid", b"gid", 116..124)?;
        let pax_time = |key: &[u8]| -> Result<Option<Timestamp>, TarError> {
            pax.get(key)
                .map(|v| parse_pax_time(v).ok_or_else(|| bad("PAX time", v)))
                .transpose()
        };
        let mtime = match pax_time(b"mtime")? {
            Some(t) => t,
            None => Timestamp::new(num("mtime", 136..148)?, 0),
        };
        let gnu_time = |range: std::ops::Range<usize>| -> Result<Option<Timestamp>, TarError> {
            if !gnu || block[range.clone()].iter().all(|&b| b == 0) {
                return Ok(None);
            }
            Ok(Some(Timestamp::new(num("GNU time", range)?, 0)))
        };
        let atime = match pax_time(b"atime")? {
            Some(t) => Some(t),
            None => gnu_time(345..357)?,
        };
        let ctime = match pax_time(b"ctime")? {
            Some(t) => Some(t),
            None => gnu_time(357..369)?,
        };
        let dev = |field: &'static str, range: std::ops::Range<usize>| -> Result<u32, TarError> {
            if block[range.clone()].iter().all(|&b| b == 0) {
                return Ok(0);
            }
            u32::try_from(num(field, range.clone())?).map_err(|_| bad(field, &block[range]))
        };
        let (dev_major, dev_minor) = if ustar || gnu {
            (dev("devmajor", 329..337)?, dev("devminor", 337..345)?)
        } else {
            (0, 0)
        };
        let stored = match pax.get(&b"size"[..]) {
            Some(v) => parse_decimal(v).ok_or_else(|| bad("PAX size", v))?,
            None => stored,
        };

        let mut xattrs = BTreeMap::new();
        for (k, v) in pax {
            if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                xattrs.insert(name.to_vec(), v.clone());
            }
        }

        let kind = match typeflag {
            b'0' | b'7' | b'S' => EntryKind::Regular,
            0 if path.ends_with(b"/") => EntryKind::Dir,
            0 => EntryKind::Regular,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::CharDev,
            b'4' => EntryKind::BlockDev,
            b'5' | b'D' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            other => {
                return Err(TarError::Unsupported {
                    offset,
                    typeflag: char::from(other),
                });
            }
        };

        self.data_left = stored;
        self.pad_left = pad(stored);
        let mut size = if kind == EntryKind::Regular {
            stored
        } else {
            0
        };
        let mut sparse = None;
        if kind == EntryKind::Regular {
            let bad_sparse = |detail: String| TarError::BadSparse { offset, detail };
            if typeflag == b'S' {
                if !gnu {
                    return Err(bad_sparse("type S outside a GNU header".into()));
                }
                let real = num("GNU real size", 483..495)?;
                size = u64::try_from(real).map_err(|_| bad("GNU real size", &block[483..495]))?;
                let mut map = Vec::new();
                let mut extended =
                    self.old_gnu_segments(&block[386..482], offset, &mut map)? && block[482] != 0;
                while extended {
                    let ext = self.read_block()?.ok_or(TarError::Truncated {
                        offset: self.pos,
                        what: "a sparse header",
                    })?;
                    extended =
                        self.old_gnu_segments(&ext[..504], offset, &mut map)? && ext[504] != 0;
                }
                sparse = Some(map);
            } else if pax.get(&b"GNU.sparse.major"[..]).map(Vec::as_slice) == Some(b"1")
                && pax.get(&b"GNU.sparse.minor"[..]).map(Vec::as_slice) == Some(b"0")
            {
                size = pax
                    .get(&b"GNU.sparse.realsize"[..])
                    .and_then(|v| parse_decimal(v))
                    .ok_or_else(|| bad_sparse("GNU.sparse.realsize missing".into()))?;
                sparse = Some(self.pax_sparse_map(offset)?);
            } else if let Some(m) = pax.get(&b"GNU.sparse.map"[..]) {
                size = pax
                    .get(&b"GNU.sparse.size"[..])
                    .and_then(|v| parse_decimal(v))
                    .ok_or_else(|| bad_sparse("GNU.sparse.size missing".into()))?;
                let nums: Option<Vec<u64>> = m.split(|&b| b == b',').map(parse_decimal).collect();
                let nums =
                    nums.ok_or_else(|| bad_sparse("GNU.sparse.map is not numbers".into()))?;
                if nums.len() % 2 != 0 || nums.len() / 2 > self.limits.max_sparse_segments {
                    return Err(bad_sparse(format!(
                        "{} numbers in GNU.sparse.map",
                        nums.len()
                    )));
                }
                sparse = Some(nums.chunks(2).map(|c| (c[0], c[1])).collect());
            } else if pax.contains_key(&b"GNU.sparse.offset"[..]) {
                return Err(bad_sparse("GNU sparse format 0.0 is not supported".into()));
            }
            if let Some(map) = &sparse {
                check_sparse(map, size, self.data_left).map_err(bad_sparse)?;
                if let Some(name) = pax.get(&b"GNU.sparse.name"[..]) {
                    path = name.clone();
                }
                self.sparse = Some(SparseState {
                    map: map.clone(),
                    size,
                    lpos: 0,
                    seg: 0,
                });
            }
        }

        Ok(TarEntry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            atime,
            ctime,
            link,
            dev_major,
            dev_minor,
            size,
            xattrs,
            sparse,
            offset,
        })
    }

    /// Appends the segments of an old GNU sparse map area (24-byte entries)
    /// to `map`; returns false if the area ended early (no more entries).
    fn old_gnu_segments(
        &self,
        area: &[u8],
        offset: u64,
        map: &mut Vec<(u64, u64)>,
    ) -> Result<bool, TarError> {
        for e in area.chunks_exact(24) {
            if e[0] == 0 {
                return Ok(false);
            }
            let field = |r: std::ops::Range<usize>| {
                parse_numeric(&e[r.clone()])
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| TarError::BadSparse {
                        offset,
                        detail: format!("bad number {:?}", show(&e[r])),
                    })
            };
            map.push((field(0..12)?, field(12..24)?));
            if map.len() > self.limits.max_sparse_segments {
                return Err(TarError::BadSparse {
                    offset,
                    detail: format!("more than {} segments", self.limits.max_sparse_segments),
                });
            }
        }
        Ok(true)
    }

    /// Reads the map that starts the data of a PAX 1.0 sparse file: decimal
    /// numbers, one per line (count, then offset/length pairs), padded to a
    /// block. The map's blocks are taken off the entry's stored data.
    fn pax_sparse_map(&mut self, offset: u64) -> Result<Vec<(u64, u64)>, TarError> {
        let bad = |detail: String| TarError::BadSparse { offset, detail };
        let cap = self.limits.max_extended_header;
        let mut text: Vec<u8> = Vec::new();
        let mut numbers: Vec<u64> = Vec::new();
        let mut want: Option<usize> = None;
        loop {
            if let Some(w) = want
                && numbers.len() == 1 + 2 * w
            {
                break;
            }
            if self.data_left < BLOCK_U64 {
                return Err(bad("map runs past the entry's data".into()));
            }
            if text.len() as u64 >= cap {
                return Err(bad(format!("map longer than {cap} bytes")));
            }
            let mut block = [0u8; BLOCK];
            self.read_exact(&mut block, "a sparse map")?;
            self.data_left -= BLOCK_U64;
            text.extend_from_slice(&block);
            // Parse the complete lines seen so far.
            numbers.clear();
            want = None;
            for line in text.split(|&b| b == b'\n') {
                if numbers.len() == 1 + 2 * want.unwrap_or(usize::MAX / 4) {
                    break;
                }
                // The last piece may be a partial line; only complete lines
                // (followed by '\n') are taken, checked below by position.
                let Some(n) = parse_decimal(line) else { break };
                numbers.push(n);
                if numbers.len() == 1 {
                    let w = usize::try_from(n)
                        .ok()
                        .filter(|&w| w <= self.limits.max_sparse_segments)
                        .ok_or_else(|| bad(format!("{n} segments")))?;
                    want = Some(w);
                }
            }
            // A number at the very end of the text may be cut by the block
            // boundary; drop it unless a newline follows it.
            if !text.ends_with(b"\n")
                && let Some(last_nl) = text.iter().rposition(|&b| b == b'\n')
            {
                let complete = text[..=last_nl].split(|&b| b == b'\n').count() - 1;
                numbers.truncate(complete);
            }
        }
        Ok(numbers[1..].chunks(2).map(|c| (c[0], c[1])).collect())
    }

    /// Reads the current entry's contents: `size` bytes, with a sparse
    /// file's holes as zeros.
    pub fn content(&mut self) -> Content<'_, R> {
        Content { tar: self }
    }

    /// Reads stored data of the current entry.
    fn read_stored(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.data_left).map_or(buf.len(), |l| l.min(buf.len()));
        if want == 0 {
            return Ok(0);
        }
        match self.inner.read(&mut buf[..want]) {
            Ok(0) => {
                self.error = Some(TarError::Truncated {
                    offset: self.pos,
                    what: "an entry's data",
                });
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar truncated",
                ))
            }
            Ok(n) => {
                self.pos += n as u64;
                self.data_left -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => {
                let kind = e.kind();
                self.error = Some(TarError::Io {
                    offset: self.pos,
                    source: e,
                });
                Err(io::Error::new(kind, "reading the layer failed"))
            }
        }
    }
}

/// Padding after `size` bytes of data.
fn pad(size: u64) -> u64 {
    (BLOCK_U64 - size % BLOCK_U64) % BLOCK_U64
}

fn check_checksum(block: &[u8; BLOCK], offset: u64) -> Result<(), TarError> {
    let stored = parse_numeric(&block[148..156]).ok_or(TarError::Checksum { offset })?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += i64::from(b);
        signed += i64::from(b.cast_signed());
    }
    if stored != unsigned && stored != signed {
        return Err(TarError::Checksum { offset });
    }
    Ok(())
}

/// The contents of the current entry; see [`TarReader::content`].
#[derive(Debug)]
pub struct Content<'a, R> {
    tar: &'a mut TarReader<R>,
}

impl<R: TarInput> Read for Content<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(mut s) = self.tar.sparse.take() else {
            return self.tar.read_stored(buf);
        };
        let result = (|| {
            if s.lpos >= s.size || buf.is_empty() {
                return Ok(0);
            }
            // Skip segments already read past.
            while s.seg < s.map.len() && s.map[s.seg].0 + s.map[s.seg].1 <= s.lpos {
                s.seg += 1;
            }
            let (n, hole) = match s.map.get(s.seg) {
                Some(&(off, _)) if s.lpos < off => (off - s.lpos, true),
                Some(&(off, len)) => (off + len - s.lpos, false),
                None => (s.size - s.lpos, true),
            };
            let n = usize::try_from(n).map_or(buf.len(), |n| n.min(buf.len()));
            let got = if hole {
                buf[..n].fill(0);
                n
            } else {
                self.tar.read_stored(&mut buf[..n])?
            };
            s.lpos += got as u64;
            Ok(got)
        })();
        self.tar.sparse = Some(s);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reader(bytes: &[u8]) -> TarReader<Stream<&[u8]>> {
        TarReader::new(Stream(bytes), TarLimits::default())
    }

    fn all(bytes: &[u8]) -> Result<Vec<(TarEntry, Vec<u8>)>, TarError> {
        let mut r = reader(bytes);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            let mut data = Vec::new();
            if r.content().read_to_end(&mut data).is_err() {
                return Err(r.take_error().expect("a tar error"));
            }
            out.push((e, data));
        }
        Ok(out)
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"  644 \0"), Some(0o644));
        assert_eq!(parse_numeric(b"\0\0\0"), Some(0));
        assert_eq!(parse_numeric(b"0008\0"), None);
        assert_eq!(parse_numeric(b"12 3"), None);
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
            Some(1 << 32)
        );
        assert_eq!(parse_numeric(&[0xff; 12]), Some(-1));
        assert_eq!(
            parse_numeric(&[
                0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0
            ]),
            None
        );
    }

    #[test]
    fn pax_times_and_records() {
        assert_eq!(parse_pax_time(b"1.5"), Some(Timestamp::new(1, 500_000_000)));
        assert_eq!(
            parse_pax_time(b"-1.25"),
            Some(Timestamp::new(-2, 750_000_000))
        );
        assert_eq!(parse_pax_time(b"7"), Some(Timestamp::new(7, 0)));
        assert_eq!(
            parse_pax_time(b"7.1234567891"),
            Some(Timestamp::new(7, 123_456_789))
        );
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b"."), None);

        let mut m = BTreeMap::new();
        parse_pax(b"11 path=ab\n21 SCHILY.xattr.a=\0\n\n", &mut m).unwrap();
        assert_eq!(m[&b"path"[..]], b"ab");
        assert_eq!(m[&b"SCHILY.xattr.a"[..]], b"\0\n");
        for bad in [
            &b"99 path=ab\n"[..],
            b"5 path=ab\n",
            b"x path\n",
            b"10 pathab\n",
        ] {
            assert!(parse_pax(bad, &mut BTreeMap::new()).is_err());
        }
    }

    #[test]
    fn reads_what_the_tar_crate_writes() {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/file", "d".repeat(200));
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o4755);
        h.set_uid(7);
        h.set_gid(8);
        h.set_mtime(1_600_000_000);
        h.set_size(3);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "s", "target").unwrap();
        b.append_pax_extensions([("SCHILY.xattr.user.x", &b"v"[..]), ("mtime", b"5.5")])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Char);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_size(0);
        b.append_data(&mut h, "dev/null", &b""[..]).unwrap();
        let bytes = b.into_inner().unwrap();

        let got = all(&bytes).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0.path, long.as_bytes());
        assert_eq!(got[0].0.mode, 0o4755);
        assert_eq!((got[0].0.uid, got[0].0.gid), (7, 8));
        assert_eq!(got[0].0.mtime, Timestamp::new(1_600_000_000, 0));
        assert_eq!(got[0].1, b"abc");
        assert_eq!(got[1].0.kind, EntryKind::Symlink);
        assert_eq!(got[1].0.link, b"target");
        assert_eq!(got[2].0.kind, EntryKind::CharDev);
        assert_eq!((got[2].0.dev_major, got[2].0.dev_minor), (1, 3));
        assert_eq!(got[2].0.xattrs[&b"user.x"[..]], b"v");
        assert_eq!(got[2].0.mtime, Timestamp::new(5, 500_000_000));
    }

    #[test]
    fn old_gnu_sparse() {
        // A 20000-byte file with data at 4096..4100 and 12288..12290.
        let mut block = [0u8; 512];
        block[..6].copy_from_slice(b"sparse");
        block[100..108].copy_from_slice(b"0000644\0");
        block[108..116].copy_from_slice(b"0000000\0");
        block[116..124].copy_from_slice(b"0000000\0");
        block[124..136].copy_from_slice(b"00000000006\0");
        block[136..148].copy_from_slice(b"00000000000\0");
        block[156] = b'S';
        block[257..265].copy_from_slice(b"ustar  \0");
        block[386..398].copy_from_slice(b"00000010000\0");
        block[398..410].copy_from_slice(b"00000000004\0");
        block[410..422].copy_from_slice(b"00000030000\0");
        block[422..434].copy_from_slice(b"00000000002\0");
        block[483..495].copy_from_slice(b"00000047040\0");
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum::<u32>() + 8 * u32::from(b' ');
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut bytes = block.to_vec();
        let mut data = [0u8; 512];
        data[..6].copy_from_slice(b"abcdxy");
        bytes.extend_from_slice(&data);
        bytes.extend_from_slice(&[0; 1024]);

        let got = all(&bytes).unwrap();
        assert_eq!(got[0].0.size, 20000);
        assert_eq!(got[0].0.sparse, Some(vec![(4096, 4), (12288, 2)]));
        let mut want = vec![0u8; 20000];
        want[4096..4100].copy_from_slice(b"abcd");
        want[12288..12290].copy_from_slice(b"xy");
        assert_eq!(got[0].1, want);
    }

    #[test]
    fn refuses_bad_archives() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(1000);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", &[7u8; 1000][..]).unwrap();
        let bytes = b.into_inner().unwrap();

        let err = all(&bytes[..700]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "archive truncated at byte 700 (inside an entry's data)"
        );
        let err = all(&bytes[..100]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "archive truncated at byte 100 (inside a header)"
        );
        let mut corrupt = bytes.clone();
        corrupt[10] = b'!';
        assert_eq!(
            all(&corrupt).unwrap_err().to_string(),
            "header at byte 0: bad checksum (not a tar archive, or corrupt)"
        );

        // A PAX header over the cap is refused before it is read.
        let mut r = TarReader::new(
            Stream(&bytes[..]),
            TarLimits {
                max_headers: 0,
                ..TarLimits::default()
            },
        );
        assert_eq!(
            r.next_entry().unwrap_err().to_string(),
            "more than 0 headers in one archive"
        );
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("comment", &vec![b'x'; 2 << 20][..])])
            .unwrap();
        let bytes = b.into_inner().unwrap();
        assert_eq!(
            all(&bytes).unwrap_err().to_string(),
            "header at byte 0: PAX extended header of 2097169 bytes exceeds the cap of 1048576 bytes"
        );
    }

    proptest! {
        /// Any bytes: an error or entries, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = all(&bytes);
        }

        /// A valid header with random fields mutated: never a panic.
        #[test]
        fn mutated_headers_never_panic(
            at in proptest::collection::vec((0usize..1536, any::<u8>()), 1..8)
        ) {
            let mut b = tar::Builder::new(Vec::new());
            b.append_pax_extensions([("path", &b"p/q"[..])]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(5);
            b.append_data(&mut h, "x", &b"hello"[..]).unwrap();
            let mut bytes = b.into_inner().unwrap();
            for (i, v) in at {
                bytes[i] = v;
            }
            let _ = all(&bytes);
        }
    }
}
