//! A worker's read trace: every start (attach) and the first read of each chunk by it,
//! with the tier that served it, in the `lode-trace 1` text format that `lode sim`
//! replays (docs/scale.md, "Traces").
//!
//! ```text
//! lode-trace 1 worker NAME
//! image IMAGE SIZE                               before its first start
//! T start S IMAGE                                T: µs since the Unix epoch
//! T read S CHUNK BYTES TIER LATENCY_US           a chunk's first read by start S
//! T end S                                        its detach
//! end N                                          N: the start/read/end records
//! ```
//!
//! A chunk counts once per start, whether a demand read or the start's prefetch needed
//! it first, with the tier its fetch found it in (`decrypted` when its segment was
//! already decrypted in memory). Lines are written under one lock with the time read
//! inside it, so a file's times never go back. The file is bounded: past its byte limit
//! the trace ends (trailer written) and later events are dropped.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lode_format::ChunkName;

/// The trace format's version, the header's second word.
pub const TRACE_VERSION: u32 = 1;

/// The default bound on a trace file.
pub const DEFAULT_TRACE_MAX_BYTES: u64 = 1 << 30;

/// The object sizes remembered to report a decrypted hit's size, at most.
const MAX_SIZES: usize = 1 << 20;

/// Where a chunk came from for a start, and its stored object's size when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// `decrypted`, or the name of the tier (`memory`, `disk`, `az`, `origin`).
    pub tier: &'static str,
    /// The stored object's bytes (what a fetch of it moves), when the source knows.
    pub object_bytes: Option<u64>,
}

/// A segment found decrypted in memory.
pub(crate) const DECRYPTED: Served = Served {
    tier: "decrypted",
    object_bytes: None,
};

#[derive(Debug)]
struct State {
    out: BufWriter<File>,
    written: u64,
    events: u64,
    images: HashSet<String>,
    sizes: HashMap<ChunkName, u64>,
    next_start: u64,
    ended: bool,
}

/// One worker's trace file, shared by its attachments.
#[derive(Debug)]
pub struct TraceWriter {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every critical section leaves the state consistent before it can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros()
}

/// A token fit for the trace: no whitespace (a tag never has any; anything else is
/// replaced so the line still parses).
fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .take(256)
        .collect();
    if t.is_empty() { "-".into() } else { t }
}

impl TraceWriter {
    /// Creates (truncates) `path` and writes the header for worker `worker`.
    pub fn create(path: &Path, worker: &str, max_bytes: u64) -> io::Result<Arc<Self>> {
        let file = File::create(path)?;
        let mut out = BufWriter::new(file);
        let header = format!(
            "lode-trace {TRACE_VERSION} worker {}\n",
            token(&worker.chars().take(128).collect::<String>())
        );
        out.write_all(header.as_bytes())?;
        out.flush()?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            max_bytes,
            state: Mutex::new(State {
                out,
                written: header.len() as u64,
                events: 0,
                images: HashSet::new(),
                sizes: HashMap::new(),
                next_start: 0,
                ended: false,
            }),
        }))
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `line` (an event when `event`), ending the trace first if it would pass
    /// the bound. Write errors end the trace: it is a measurement, never worth failing a
    /// read for.
    fn write(&self, st: &mut State, line: &str, event: bool) {
        if st.ended {
            return;
        }
        // Room for the trailer is kept.
        if st.written + line.len() as u64 + 32 > self.max_bytes {
            self.end_locked(st);
            return;
        }
        if st.out.write_all(line.as_bytes()).is_err() {
            st.ended = true;
            return;
        }
        st.written += line.len() as u64;
        if event {
            st.events += 1;
        }
    }

    fn end_locked(&self, st: &mut State) {
        if st.ended {
            return;
        }
        st.ended = true;
        let _ = writeln!(st.out, "end {}", st.events);
        let _ = st.out.flush();
    }

    /// Records a start of `image` (`size` bytes); its reads and its end go through the
    /// returned [`StartTrace`], whose drop writes the end.
    pub fn start(self: &Arc<Self>, image: &str, size: u64, chunks: u64) -> StartTrace {
        let image = token(image);
        let mut st = lock(&self.state);
        let id = st.next_start;
        st.next_start += 1;
        if !st.images.contains(&image) {
            self.write(&mut st, &format!("image {image} {size}\n"), false);
            st.images.insert(image.clone());
        }
        let line = format!("{} start {id} {image}\n", now_us());
        self.write(&mut st, &line, true);
        StartTrace {
            writer: Arc::clone(self),
            id,
            seen: Mutex::new(vec![
                0u64;
                usize::try_from(chunks.div_ceil(64)).unwrap_or(0)
            ]),
        }
    }

    /// Ends the trace: writes the trailer and flushes. Later events are dropped.
    pub fn finish(&self) {
        let mut st = lock(&self.state);
        self.end_locked(&mut st);
    }

    /// Flushes what is written so far (the trailer comes with [`finish`](Self::finish)).
    pub fn flush(&self) {
        let mut st = lock(&self.state);
        let _ = st.out.flush();
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One start's part of the trace.
#[derive(Debug)]
pub struct StartTrace {
    writer: Arc<TraceWriter>,
    id: u64,
    /// Chunk indexes already recorded, a bit each.
    seen: Mutex<Vec<u64>>,
}

impl StartTrace {
    /// Whether chunk `index` is recorded yet; marks it.
    fn first(&self, index: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let Some(word) = usize::try_from(index / 64)
            .ok()
            .and_then(|w| seen.get_mut(w))
        else {
            return false;
        };
        let bit = 1u64 << (index % 64);
        let first = *word & bit == 0;
        *word |= bit;
        first
    }

    /// Records the read of chunk `index` (`name`), served as `served` in `took`, if it
    /// is this start's first. `max_bytes` is the object's size bound, used when the
    /// source does not know its size and no earlier record gave it.
    pub fn read(
        &self,
        index: u64,
        name: &ChunkName,
        max_bytes: u64,
        served: Served,
        took: Duration,
    ) {
        if !self.first(index) {
            return;
        }
        let w = &self.writer;
        let mut st = lock(&w.state);
        let bytes = match served.object_bytes {
            Some(b) => {
                if st.sizes.len() >= MAX_SIZES {
                    st.sizes.clear();
                }
                st.sizes.insert(*name, b);
                b
            }
            None => st.sizes.get(name).copied().unwrap_or(max_bytes),
        };
        let line = format!(
            "{} read {} {name} {bytes} {} {}\n",
            now_us(),
            self.id,
            served.tier,
            took.as_micros()
        );
        w.write(&mut st, &line, true);
    }
}

impl Drop for StartTrace {
    fn drop(&mut self) {
        let w = &self.writer;
        let mut st = lock(&w.state);
        let line = format!("{} end {}\n", now_us(), self.id);
        w.write(&mut st, &line, true);
        let _ = st.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: u8) -> ChunkName {
        ChunkName::of(&[i])
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn records_each_chunk_once_per_start_and_ends_with_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.trace");
        let w = TraceWriter::create(&path, "worker one", DEFAULT_TRACE_MAX_BYTES).unwrap();
        let memory = Served {
            tier: "memory",
            object_bytes: Some(1000),
        };
        let decrypted = Served {
            tier: "decrypted",
            object_bytes: None,
        };
        {
            let s = w.start("fn00-python", 4096, 3);
            s.read(0, &name(0), 9999, memory, Duration::from_micros(7));
            s.read(0, &name(0), 9999, memory, Duration::from_micros(7));
            let t = w.start("fn00-python", 4096, 3);
            t.read(0, &name(0), 9999, decrypted, Duration::from_micros(1));
            t.read(2, &name(2), 9999, decrypted, Duration::from_micros(1));
            // An index past the image is ignored, not a panic.
            t.read(99, &name(9), 9999, decrypted, Duration::from_micros(1));
        }
        w.finish();
        let l = lines(&path);
        assert_eq!(l[0], "lode-trace 1 worker worker_one");
        assert_eq!(l[1], "image fn00-python 4096");
        let words: Vec<Vec<&str>> = l[2..l.len() - 1]
            .iter()
            .map(|s| s.split(' ').collect())
            .collect();
        let kinds: Vec<&str> = words.iter().map(|w| w[1]).collect();
        assert_eq!(
            kinds,
            ["start", "read", "start", "read", "read", "end", "end"]
        );
        // The decrypted hit of a chunk seen before reports that chunk's size; an unknown
        // one its bound.
        assert_eq!(words[3][4], "1000");
        assert_eq!(words[4][4], "9999");
        assert_eq!(l.last().unwrap(), "end 7");
        let times: Vec<u128> = words[..7].iter().map(|w| w[0].parse().unwrap()).collect();
        assert!(times.windows(2).all(|p| p[0] <= p[1]));
    }

    #[test]
    fn a_full_trace_ends_itself_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.trace");
        let w = TraceWriter::create(&path, "w", 400).unwrap();
        let s = w.start("img", 1 << 20, 64);
        let served = Served {
            tier: "origin",
            object_bytes: Some(5),
        };
        for i in 0..64 {
            s.read(
                i,
                &name(u8::try_from(i).unwrap()),
                5,
                served,
                Duration::ZERO,
            );
        }
        drop(s);
        let l = lines(&path);
        assert!(std::fs::metadata(&path).unwrap().len() <= 400);
        let last = l.last().unwrap();
        let n: usize = last.strip_prefix("end ").unwrap().parse().unwrap();
        assert_eq!(n, l.len() - 3, "the count is of the events before it");
    }
}
