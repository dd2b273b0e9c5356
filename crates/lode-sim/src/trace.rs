//! The lode-trace v1 format: what one worker recorded of its starts and their chunk reads.
//! Read here (one function, every rule checked, every error naming the file and line) and
//! written here (so a parsed trace writes back to the same records). docs/scale.md gives
//! the grammar.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// The longest line allowed, without its newline.
pub const MAX_LINE: usize = 1024;
/// The largest chunk a read may record.
pub const MAX_READ_BYTES: u32 = 16 << 20;
const MAX_WORKER: usize = 128;
const MAX_IMAGE: usize = 256;

/// Where an agent found a chunk, as the trace records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// The decrypted-segment cache.
    Decrypted,
    /// The local memory tier.
    Memory,
    /// The local disk tier.
    Disk,
    /// The AZ cache fleet.
    Az,
    /// The origin store.
    Origin,
    /// It joined a fetch already in flight for another start.
    Joined,
}

impl Tier {
    /// Every tier, in the order of the read path.
    pub const ALL: [Tier; 6] = [
        Tier::Decrypted,
        Tier::Memory,
        Tier::Disk,
        Tier::Az,
        Tier::Origin,
        Tier::Joined,
    ];

    /// Its name in a trace.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Decrypted => "decrypted",
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Az => "az",
            Tier::Origin => "origin",
            Tier::Joined => "joined",
        }
    }
}

/// One record of a trace, after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `image IMAGE SIZE`.
    Image {
        /// The image's tag or manifest id.
        name: String,
        /// Its size in bytes.
        size: u64,
    },
    /// `T start S IMAGE`.
    Start {
        /// µs since the Unix epoch.
        t_us: u64,
        /// The start's id, unique in the file.
        id: u64,
        /// The image started.
        image: String,
    },
    /// `T read S CHUNK BYTES TIER LAT`.
    Read {
        /// µs since the Unix epoch.
        t_us: u64,
        /// The start that read.
        id: u64,
        /// The chunk's name.
        chunk: [u8; 32],
        /// The stored object's size.
        bytes: u32,
        /// Where the agent found it.
        tier: Tier,
        /// How long the read took, µs.
        latency_us: u64,
    },
    /// `T end S`.
    End {
        /// µs since the Unix epoch.
        t_us: u64,
        /// The start that ended.
        id: u64,
    },
}

/// One worker's trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// The worker's name from the header.
    pub worker: String,
    /// The records in file order.
    pub events: Vec<Event>,
}

/// What is wrong with a trace line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The first line is not a lode-trace header.
    #[error("not a lode-trace header (expected `lode-trace 1 worker NAME`)")]
    Header,
    /// A header of another version.
    #[error("lode-trace version {0}, this lode reads version 1")]
    Version(String),
    /// A line over the bound.
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not UTF-8.
    #[error("not UTF-8")]
    NotUtf8,
    /// A record that does not parse.
    #[error("bad record: {0}")]
    Syntax(String),
    /// A start of an image never declared.
    #[error("unknown image {0:?} (no `image` line declares it before its start)")]
    UnknownImage(String),
    /// An image declared twice with different sizes.
    #[error("image {image:?} declared again with size {now} (was {was})")]
    ImageResized {
        /// The image.
        image: String,
        /// Its first size.
        was: u64,
        /// The other.
        now: u64,
    },
    /// A time earlier than the line before's.
    #[error("out of order: time {t} is before {prev} on an earlier line")]
    OutOfOrder {
        /// This line's time.
        t: u64,
        /// The largest time before.
        prev: u64,
    },
    /// A start id used before.
    #[error("start id {0} reused")]
    StartReused(u64),
    /// A read or end of a start not live.
    #[error("start {0} never began or already ended")]
    NotLive(u64),
    /// A chunk read twice by one start.
    #[error("start {id} reads chunk {chunk} a second time")]
    ReadTwice {
        /// The start.
        id: u64,
        /// The chunk's name.
        chunk: String,
    },
    /// The `end N` count disagrees.
    #[error("end says {said} records, the file has {counted}")]
    Count {
        /// What the line says.
        said: u64,
        /// Records counted.
        counted: u64,
    },
    /// Something after `end N`.
    #[error("a record after the end line")]
    AfterEnd,
}

/// A trace that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line at fault.
    #[error("{file}:{line}: {error}")]
    Line {
        /// The file.
        file: String,
        /// 1-based.
        line: u64,
        /// What.
        error: LineError,
    },
    /// No `end N` line.
    #[error("{file}:{line}: truncated: no `end` record after the last line read (line {line})")]
    Truncated {
        /// The file.
        file: String,
        /// The last line read.
        line: u64,
    },
}

fn syntax(what: &str) -> LineError {
    LineError::Syntax(what.to_owned())
}

fn number<T: std::str::FromStr>(s: Option<&str>, what: &str) -> Result<T, LineError> {
    let s = s.ok_or_else(|| syntax(&format!("missing {what}")))?;
    // Digits only: no sign, no spaces, no leading `+`.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax(&format!("{what} {s:?} is not a number")));
    }
    s.parse()
        .map_err(|_| syntax(&format!("{what} {s:?} is out of range")))
}

fn name_field(s: Option<&str>, what: &str, max: usize) -> Result<String, LineError> {
    let s = s.ok_or_else(|| syntax(&format!("missing {what}")))?;
    if s.is_empty() || s.len() > max {
        return Err(syntax(&format!("{what} must be 1..={max} bytes")));
    }
    Ok(s.to_owned())
}

fn chunk_field(s: Option<&str>) -> Result<[u8; 32], LineError> {
    let s = s.ok_or_else(|| syntax("missing chunk"))?;
    let b = s.as_bytes();
    if b.len() != 64 || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(syntax(&format!(
            "chunk {s:?} is not 64 lowercase hex digits"
        )));
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hex = |c: u8| {
            if c.is_ascii_digit() {
                c - b'0'
            } else {
                c - b'a' + 10
            }
        };
        out[i] = hex(pair[0]) << 4 | hex(pair[1]);
    }
    Ok(out)
}

fn tier_field(s: Option<&str>) -> Result<Tier, LineError> {
    let s = s.ok_or_else(|| syntax("missing tier"))?;
    Tier::ALL
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| syntax(&format!("unknown tier {s:?}")))
}

fn no_more<'a>(mut f: impl Iterator<Item = &'a str>) -> Result<(), LineError> {
    match f.next() {
        None => Ok(()),
        Some(x) => Err(syntax(&format!("unexpected field {x:?}"))),
    }
}

/// Hex of a chunk name.
pub fn chunk_hex(chunk: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in chunk {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The state of a trace being checked.
#[derive(Default)]
struct Checker {
    worker: Option<String>,
    images: HashMap<String, u64>,
    used_ids: HashSet<u64>,
    live: HashMap<u64, HashSet<[u8; 32]>>,
    last_t: u64,
    records: u64,
    ended: bool,
    events: Vec<Event>,
}

impl Checker {
    fn line(&mut self, text: &str) -> Result<(), LineError> {
        let Some(worker) = &self.worker else {
            let mut f = text.split(' ');
            if f.next() != Some("lode-trace") {
                return Err(LineError::Header);
            }
            match f.next() {
                Some("1") => {}
                Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                    return Err(LineError::Version(v.to_owned()));
                }
                _ => return Err(LineError::Header),
            }
            if f.next() != Some("worker") {
                return Err(LineError::Header);
            }
            let name = name_field(f.next(), "worker name", MAX_WORKER)?;
            no_more(f)?;
            self.worker = Some(name);
            return Ok(());
        };
        let _ = worker;
        if text.is_empty() || text.starts_with('#') {
            return Ok(());
        }
        if self.ended {
            return Err(LineError::AfterEnd);
        }
        let mut f = text.split(' ');
        let first = f.next().unwrap_or("");
        match first {
            "image" => {
                let name = name_field(f.next(), "image", MAX_IMAGE)?;
                let size: u64 = number(f.next(), "image size")?;
                no_more(f)?;
                match self.images.get(&name) {
                    Some(&was) if was != size => {
                        return Err(LineError::ImageResized {
                            image: name,
                            was,
                            now: size,
                        });
                    }
                    Some(_) => {}
                    None => {
                        self.images.insert(name.clone(), size);
                    }
                }
                self.events.push(Event::Image { name, size });
                Ok(())
            }
            "end" => {
                let said: u64 = number(f.next(), "record count")?;
                no_more(f)?;
                if said != self.records {
                    return Err(LineError::Count {
                        said,
                        counted: self.records,
                    });
                }
                self.ended = true;
                Ok(())
            }
            t => {
                let t_us: u64 = number(Some(t), "time")?;
                if t_us < self.last_t {
                    return Err(LineError::OutOfOrder {
                        t: t_us,
                        prev: self.last_t,
                    });
                }
                let kind = f.next().ok_or_else(|| syntax("missing record kind"))?;
                let id: u64 = number(f.next(), "start id")?;
                let event = match kind {
                    "start" => {
                        let image = name_field(f.next(), "image", MAX_IMAGE)?;
                        no_more(f)?;
                        if !self.images.contains_key(&image) {
                            return Err(LineError::UnknownImage(image));
                        }
                        if !self.used_ids.insert(id) {
                            return Err(LineError::StartReused(id));
                        }
                        self.live.insert(id, HashSet::new());
                        Event::Start { t_us, id, image }
                    }
                    "read" => {
                        let chunk = chunk_field(f.next())?;
                        let bytes: u32 = number(f.next(), "bytes")?;
                        if bytes == 0 || bytes > MAX_READ_BYTES {
                            return Err(syntax(&format!(
                                "bytes {bytes} is not in 1..={MAX_READ_BYTES}"
                            )));
                        }
                        let tier = tier_field(f.next())?;
                        let latency_us: u64 = number(f.next(), "latency")?;
                        no_more(f)?;
                        let read = self.live.get_mut(&id).ok_or(LineError::NotLive(id))?;
                        if !read.insert(chunk) {
                            return Err(LineError::ReadTwice {
                                id,
                                chunk: chunk_hex(&chunk),
                            });
                        }
                        Event::Read {
                            t_us,
                            id,
                            chunk,
                            bytes,
                            tier,
                            latency_us,
                        }
                    }
                    "end" => {
                        no_more(f)?;
                        if self.live.remove(&id).is_none() {
                            return Err(LineError::NotLive(id));
                        }
                        Event::End { t_us, id }
                    }
                    other => return Err(syntax(&format!("unknown record kind {other:?}"))),
                };
                self.last_t = t_us;
                self.records += 1;
                self.events.push(event);
                Ok(())
            }
        }
    }
}

/// Reads and checks one trace from `input`; `file` names it in errors.
pub fn parse(input: impl Read, file: &str) -> Result<Trace, TraceError> {
    let mut reader = BufReader::new(input);
    let mut c = Checker::default();
    let mut buf = Vec::with_capacity(MAX_LINE + 2);
    let mut line = 0u64;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|source| TraceError::Io {
                file: file.to_owned(),
                source,
            })?;
        if n == 0 {
            break;
        }
        line += 1;
        let at = |error| TraceError::Line {
            file: file.to_owned(),
            line,
            error,
        };
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        if buf.len() > MAX_LINE {
            return Err(at(LineError::TooLong));
        }
        let text = std::str::from_utf8(&buf).map_err(|_| at(LineError::NotUtf8))?;
        c.line(text).map_err(at)?;
    }
    if c.worker.is_none() {
        return Err(TraceError::Line {
            file: file.to_owned(),
            line: line.max(1),
            error: LineError::Header,
        });
    }
    if !c.ended {
        return Err(TraceError::Truncated {
            file: file.to_owned(),
            line,
        });
    }
    Ok(Trace {
        worker: c.worker.unwrap_or_default(),
        events: c.events,
    })
}

/// Reads and checks the trace file at `path`.
pub fn load(path: &Path) -> Result<Trace, TraceError> {
    let file = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| TraceError::Io {
        file: file.clone(),
        source,
    })?;
    parse(f, &file)
}

/// Writes `trace` in the lode-trace v1 format.
pub fn write(trace: &Trace) -> String {
    let mut s = format!("lode-trace 1 worker {}\n", trace.worker);
    let mut records = 0u64;
    for e in &trace.events {
        let _ = match e {
            Event::Image { name, size } => writeln!(s, "image {name} {size}"),
            Event::Start { t_us, id, image } => {
                records += 1;
                writeln!(s, "{t_us} start {id} {image}")
            }
            Event::Read {
                t_us,
                id,
                chunk,
                bytes,
                tier,
                latency_us,
            } => {
                records += 1;
                writeln!(
                    s,
                    "{t_us} read {id} {} {bytes} {} {latency_us}",
                    chunk_hex(chunk),
                    tier.name()
                )
            }
            Event::End { t_us, id } => {
                records += 1;
                writeln!(s, "{t_us} end {id}")
            }
        };
    }
    let _ = writeln!(s, "end {records}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C1: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn err(text: &str) -> String {
        parse(text.as_bytes(), "w.trace").unwrap_err().to_string()
    }

    #[test]
    fn reads_a_trace() {
        let t = parse(
            format!(
                "lode-trace 1 worker w1\n# a comment\n\nimage py 100\n10 start 1 py\n11 read 1 {C1} 5 origin 900\n12 end 1\nend 3\n"
            )
            .as_bytes(),
            "w.trace",
        )
        .unwrap();
        assert_eq!(t.worker, "w1");
        assert_eq!(t.events.len(), 4);
        assert_eq!(parse(write(&t).as_bytes(), "again").unwrap(), t);
    }

    #[test]
    fn every_rule_is_an_error_naming_file_and_line() {
        let head = "lode-trace 1 worker w\nimage py 100\n";
        let cases: Vec<(String, &str)> = vec![
            (
                "lode-trace 2 worker w\nend 0\n".into(),
                "w.trace:1: lode-trace version 2",
            ),
            ("hello\n".into(), "w.trace:1: not a lode-trace header"),
            ("".into(), "w.trace:1: not a lode-trace header"),
            (
                format!("{head}5 start 1 go\nend 1\n"),
                "w.trace:3: unknown image \"go\"",
            ),
            (
                format!("{head}image py 200\nend 0\n"),
                "w.trace:3: image \"py\" declared again",
            ),
            (
                format!("{head}5 start 1 py\n4 end 1\nend 2\n"),
                "w.trace:4: out of order",
            ),
            (
                format!("{head}5 start 1 py\n5 end 1\n6 start 1 py\nend 3\n"),
                "w.trace:5: start id 1 reused",
            ),
            (
                format!("{head}5 read 9 {C1} 5 az 1\nend 1\n"),
                "w.trace:3: start 9 never began",
            ),
            (
                format!("{head}5 start 1 py\n5 read 1 {C1} 5 az 1\n6 read 1 {C1} 5 az 1\nend 3\n"),
                "w.trace:5: start 1 reads chunk 1111",
            ),
            (
                format!("{head}5 start 1 py\n5 read 1 {C1} 0 az 1\nend 2\n"),
                "w.trace:4: bad record: bytes 0",
            ),
            (
                format!("{head}5 start 1 py\n5 read 1 {C1} 5 cloud 1\nend 2\n"),
                "w.trace:4: bad record: unknown tier",
            ),
            (
                format!("{head}5 start 1 py\n5 read 1 ABC 5 az 1\nend 2\n"),
                "w.trace:4: bad record: chunk",
            ),
            (
                format!("{head}5 start 1 py\nend 7\n"),
                "w.trace:4: end says 7 records, the file has 1",
            ),
            (
                format!("{head}end 0\n5 start 1 py\n"),
                "w.trace:4: a record after the end line",
            ),
            (format!("{head}5 start 1 py\n"), "w.trace:3: truncated"),
            (
                format!("{head}-5 start 1 py\nend 1\n"),
                "w.trace:3: bad record: time \"-5\"",
            ),
            (
                format!("{head}{}\nend 0\n", "#".repeat(1025)),
                "w.trace:3: line longer than 1024",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
    }

    fn arb_trace() -> impl Strategy<Value = Trace> {
        let op = (
            0u8..5,
            0u64..3,
            0usize..4,
            1u32..=MAX_READ_BYTES,
            0usize..6,
            0u64..1_000_000,
        );
        ("[a-z0-9.-]{1,20}", proptest::collection::vec(op, 0..60)).prop_map(|(worker, ops)| {
            let images = ["py", "node", "gcc:1", "x"];
            let mut events = vec![];
            let mut declared = HashSet::new();
            let mut live: Vec<(u64, HashSet<[u8; 32]>)> = vec![];
            let (mut t, mut next_id) = (1_700_000_000_000_000u64, 0u64);
            for (kind, dt, pick, bytes, tier, lat) in ops {
                t += dt;
                match kind {
                    0 => {
                        let name = images[pick].to_owned();
                        declared.insert(name.clone());
                        events.push(Event::Image {
                            size: name.len() as u64 * 1000,
                            name,
                        });
                    }
                    1 if declared.contains(images[pick]) => {
                        next_id += 7;
                        live.push((next_id, HashSet::new()));
                        events.push(Event::Start {
                            t_us: t,
                            id: next_id,
                            image: images[pick].to_owned(),
                        });
                    }
                    2 | 3 if !live.is_empty() => {
                        let i = pick % live.len();
                        let chunk = [u8::try_from(lat % 251).unwrap(); 32];
                        if live[i].1.insert(chunk) {
                            events.push(Event::Read {
                                t_us: t,
                                id: live[i].0,
                                chunk,
                                bytes,
                                tier: Tier::ALL[tier],
                                latency_us: lat,
                            });
                        }
                    }
                    4 if !live.is_empty() => {
                        let (id, _) = live.remove(pick % live.len());
                        events.push(Event::End { t_us: t, id });
                    }
                    _ => {}
                }
            }
            Trace { worker, events }
        })
    }

    proptest! {
        #[test]
        fn written_traces_round_trip(t in arb_trace()) {
            let text = write(&t);
            prop_assert_eq!(parse(text.as_bytes(), "f").unwrap(), t);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse(&b[..], "f");
        }

        #[test]
        fn mutated_traces_never_panic(t in arb_trace(), at in 0usize..4000, junk in "[ -~\n]{0,6}") {
            let mut text = write(&t);
            let at = at.min(text.len());
            text.insert_str(at, &junk);
            let _ = parse(text.as_bytes(), "f");
        }
    }
}
