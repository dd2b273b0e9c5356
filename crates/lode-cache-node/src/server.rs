//! The node: a TCP listener, one task per connection speaking the memcached text
//! protocol over the [`Store`], and the flash writer thread.
//!
//! A connection reads into one buffer, answers every complete request in it
//! (pipelining), and writes the answers with one vectored write before it waits for
//! more input. Values go to the socket as the store's own `Bytes`, uncopied. A data
//! block is read straight into a buffer of its announced size (bounded by the item size
//! limit; a larger announcement is answered `SERVER_ERROR object too large for cache`
//! and the block is discarded as it streams in, never buffered). A request line is
//! bounded by [`MAX_LINE`](crate::protocol::MAX_LINE) or
//! [`MAX_RETRIEVAL_LINE`](crate::protocol::MAX_RETRIEVAL_LINE); past that the node
//! answers `CLIENT_ERROR line too long` and closes the connection. So one connection
//! holds at most a line, one value and its pending answers; misbehaving clients lose
//! their own connection, never the node. When the flash writer falls behind, a
//! connection whose request demoted items waits for it before reading the next one.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{NodeConfig, Policy};
use crate::error::{Error, Result};
use crate::flash::{FlashDir, ReadError};
use crate::protocol::{self, Command, Frame, StoreKind};
use crate::stats::{ConnCounters, NodeFacts, Stats};
use crate::store::{Item, Lookup, Store, StoreOutcome, StoreRequest, UpdateOutcome, run_writer};

/// What `version` answers: the memcached protocol level lode implements, then lode's
/// own version. Clients such as libmemcached gate behaviour on the leading `1.6`.
pub const VERSION: &str = concat!("1.6.0-lode-", env!("CARGO_PKG_VERSION"));

/// How long shutdown waits for connections to finish the request they are on.
const DRAIN: Duration = Duration::from_secs(2);
/// Input is read in chunks of this size.
const READ_CHUNK: usize = 16 * 1024;
/// Answers are written out once this many bytes are pending, even mid-request.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Values smaller than this are copied into the answer buffer; larger ones are sent
/// from the store's own buffer.
const COPY_BELOW: usize = 2048;
/// How long, and for how many bytes, a connection closed for a protocol error keeps
/// reading what the client still sends.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;
/// Attempts to read an item from flash while it keeps changing underneath.
const FLASH_RETRIES: usize = 8;

/// Starts cache nodes.
#[derive(Debug)]
pub struct Node;

/// A running node. Dropping it stops the node without waiting; [`shutdown`] waits.
///
/// [`shutdown`]: NodeHandle::shutdown
#[derive(Debug)]
pub struct NodeHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    accept: Option<tokio::task::JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct ConnAtomics {
    curr: AtomicU64,
    total: AtomicU64,
    rejected: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    too_large: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    store: Arc<Store>,
    started: Instant,
    policy: Policy,
    max_connections: u64,
    conns: ConnAtomics,
}

impl Shared {
    fn stats(&self) -> Stats {
        let c = &self.conns;
        let conn = ConnCounters {
            curr_connections: c.curr.load(Ordering::Relaxed),
            total_connections: c.total.load(Ordering::Relaxed),
            rejected_connections: c.rejected.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            store_too_large: c.too_large.load(Ordering::Relaxed),
        };
        let facts = NodeFacts {
            uptime: self.started.elapsed().as_secs(),
            time: unix_now(),
            version: VERSION.to_string(),
            policy: self.policy.to_string(),
            max_connections: self.max_connections,
            item_size_max: self.store.item_limit() as u64,
        };
        Stats::assemble(facts, conn, &self.store.snapshot())
    }

    fn reset_stats(&self) {
        self.store.reset_counters();
        let c = &self.conns;
        for counter in [&c.rejected, &c.bytes_read, &c.bytes_written, &c.too_large] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Node {
    /// Checks `config`, binds its address, opens and indexes the flash directory (if
    /// any) and serves until [`NodeHandle::shutdown`]. Must be called within a Tokio
    /// runtime, which then runs the node's tasks.
    pub async fn start(config: NodeConfig) -> Result<NodeHandle> {
        let tiers = config.tiers()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let limit = config.item_size_limit;
        let now = unix_now();
        let (store, writer) = match config.flash_dir.clone() {
            None => (
                Arc::new(Store::new(tiers, config.policy, limit, None, now)),
                None,
            ),
            Some(dir) => {
                let (flash, found) = tokio::task::spawn_blocking(move || {
                    let flash = FlashDir::open(&dir)?;
                    let (found, _report) = flash.scan(limit)?;
                    Ok::<_, Error>((flash, found))
                })
                .await
                .map_err(|e| Error::Writer(format!("flash scan task failed: {e}")))??;
                let flash = Arc::new(flash);
                let (jobs, queue) = mpsc::channel();
                let store = Arc::new(Store::new(
                    tiers,
                    config.policy,
                    limit,
                    Some((flash.clone(), found, jobs)),
                    now,
                ));
                let weak = Arc::downgrade(&store);
                let writer = std::thread::Builder::new()
                    .name("lode-flash-writer".into())
                    .spawn(move || run_writer(flash, queue, weak))
                    .map_err(|e| Error::Writer(format!("cannot start: {e}")))?;
                (store, Some(writer))
            }
        };
        let shared = Arc::new(Shared {
            store,
            started: Instant::now(),
            policy: config.policy,
            max_connections: config.max_connections as u64,
            conns: ConnAtomics::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), stopped));
        Ok(NodeHandle {
            addr,
            shared,
            stop,
            accept: Some(accept),
            writer,
        })
    }
}

impl NodeHandle {
    /// The address the node listens on (with the port chosen when the config said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's figures now.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Waits until every flash write and delete queued so far is on disk (or has
    /// failed). Demotions are written in the background; tests and orderly shutdowns
    /// use this to know where items are.
    pub async fn settle(&self) {
        if let Some(done) = self.shared.store.barrier() {
            let _ = done.await;
        }
    }

    /// Stops accepting, lets connections finish the request they are on (for up to two
    /// seconds, then closes them), writes out queued flash work and stops the writer.
    /// What is on flash then is what the next start with the same `flash_dir` finds.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        self.settle().await;
        self.shared.store.stop_writer();
        if let Some(writer) = self.writer.take() {
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| Error::Writer(format!("join task failed: {e}")))?
                .map_err(|_| Error::Writer("panicked".into()))?;
        }
        Ok(())
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if self.writer.is_some() {
            self.shared.store.stop_writer();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        while conns.try_join_next().is_some() {}
        match accepted {
            Ok((stream, _)) => {
                if shared.conns.curr.load(Ordering::Relaxed) >= shared.max_connections {
                    shared.conns.rejected.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(reject(stream));
                    continue;
                }
                shared.conns.curr.fetch_add(1, Ordering::Relaxed);
                shared.conns.total.fetch_add(1, Ordering::Relaxed);
                conns.spawn(serve(stream, shared.clone(), stopped.clone()));
            }
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        conns.shutdown().await;
    }
}

/// What memcached tells a client past `-c`.
async fn reject(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(b"ERROR Too many open connections\r\n"),
    )
    .await;
}

async fn serve(stream: TcpStream, shared: Arc<Shared>, stopped: watch::Receiver<bool>) {
    struct Leave<'a>(&'a Shared);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.conns.curr.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _leave = Leave(&shared);
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        stream,
        shared: &shared,
        stopped,
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        scanned: 0,
        out: Out::default(),
    };
    // An I/O error ends this connection only.
    let _ = conn.run().await;
}

/// Pending answers: small text accumulates in `text`; values are queued as they are.
#[derive(Default)]
struct Out {
    chunks: VecDeque<Bytes>,
    text: BytesMut,
    len: usize,
}

impl Out {
    fn text(&mut self, b: &[u8]) {
        self.text.extend_from_slice(b);
        self.len += b.len();
    }

    fn number(&mut self, n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = n;
        loop {
            at -= 1;
            digits[at] = b'0' + u8::try_from(n % 10).expect("a decimal digit");
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.text(&digits[at..]);
    }

    fn bytes(&mut self, b: Bytes) {
        if b.len() < COPY_BELOW {
            self.text(&b);
        } else {
            self.seal();
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    fn value(&mut self, key: &[u8], item: Item, with_cas: bool) {
        self.text(b"VALUE ");
        self.text(key);
        self.text(b" ");
        self.number(u64::from(item.flags));
        self.text(b" ");
        self.number(item.value.len() as u64);
        if with_cas {
            self.text(b" ");
            self.number(item.cas);
        }
        self.text(b"\r\n");
        self.bytes(item.value);
        self.text(b"\r\n");
    }

    fn seal(&mut self) {
        if !self.text.is_empty() {
            self.chunks.push_back(self.text.split().freeze());
        }
    }

    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let front = self
                .chunks
                .front_mut()
                .expect("advance within pending bytes");
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// A data block as read.
enum Data {
    Value(Bytes),
    /// Not followed by `\r\n`.
    BadChunk,
    /// The client went away (or the node is stopping) before the block was complete.
    Closed,
}

enum Flow {
    Go,
    Close,
}

struct Conn<'a> {
    stream: TcpStream,
    shared: &'a Shared,
    stopped: watch::Receiver<bool>,
    rbuf: BytesMut,
    /// Bytes of `rbuf` already searched for a newline.
    scanned: usize,
    out: Out,
}

impl Conn<'_> {
    async fn run(&mut self) -> io::Result<()> {
        loop {
            match protocol::frame(&self.rbuf, self.scanned) {
                Frame::Line { body, consumed } => {
                    self.scanned = 0;
                    let line = self.rbuf.split_to(consumed).freeze();
                    if let Flow::Close = self.dispatch(&line[..body]).await? {
                        return self.flush().await;
                    }
                    if self.shared.store.writer_behind() {
                        self.flush().await?;
                        let store = self.shared.store.clone();
                        tokio::select! {
                            _ = self.stopped.wait_for(|s| *s) => return Ok(()),
                            _ = store.wait_for_writer() => {}
                        }
                    }
                    if self.out.len >= OUT_HIGH_WATER {
                        self.flush().await?;
                    }
                }
                Frame::Incomplete { scanned } => {
                    self.scanned = scanned;
                    self.flush().await?;
                    if !self.fill().await? {
                        return Ok(());
                    }
                }
                Frame::TooLong => {
                    self.out.text(b"CLIENT_ERROR line too long\r\n");
                    self.flush().await?;
                    self.linger().await;
                    return Ok(());
                }
            }
        }
    }

    /// Closes the sending side and discards input for a moment, so the client reads
    /// the error line before the close (closing with unread input would reset the
    /// connection and could lose the line).
    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let mut scratch = [0u8; 4096];
        let _ = tokio::time::timeout(LINGER, async {
            let mut left = LINGER_BYTES;
            while left > 0 {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// Reads more input; false at end of input or shutdown.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        let n = tokio::select! {
            biased;
            _ = self.stopped.wait_for(|s| *s) => return Ok(false),
            n = self.stream.read_buf(&mut self.rbuf) => n?,
        };
        self.shared
            .conns
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n > 0)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.out.seal();
        while !self.out.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let count = self.out.chunks.len().min(slices.len());
            for (slot, chunk) in slices.iter_mut().zip(self.out.chunks.iter()) {
                *slot = IoSlice::new(chunk);
            }
            let written = tokio::select! {
                biased;
                _ = self.stopped.wait_for(|s| *s) => {
                    return Err(io::Error::other("node shutting down"));
                }
                written = self.stream.write_vectored(&slices[..count]) => written?,
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.out.advance(written);
            self.shared
                .conns
                .bytes_written
                .fetch_add(written as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads a data block of `len` bytes and its `\r\n`, straight into a buffer of its
    /// own when it is not already buffered.
    async fn read_data(&mut self, len: usize) -> io::Result<Data> {
        let need = len + 2;
        if self.rbuf.len() >= need {
            let value = Bytes::copy_from_slice(&self.rbuf[..len]);
            let terminated = &self.rbuf[len..need] == b"\r\n";
            self.rbuf.advance(need);
            return Ok(if terminated {
                Data::Value(value)
            } else {
                Data::BadChunk
            });
        }
        self.flush().await?;
        let mut buf = BytesMut::with_capacity(need);
        buf.extend_from_slice(&self.rbuf);
        self.rbuf.clear();
        while buf.len() < need {
            let want = need - buf.len();
            let mut room = (&mut buf).limit(want);
            let n = tokio::select! {
                biased;
                _ = self.stopped.wait_for(|s| *s) => return Ok(Data::Closed),
                n = self.stream.read_buf(&mut room) => n?,
            };
            if n == 0 {
                return Ok(Data::Closed);
            }
            self.shared
                .conns
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        let terminated = &buf[len..] == b"\r\n";
        buf.truncate(len);
        Ok(if terminated {
            Data::Value(buf.freeze())
        } else {
            Data::BadChunk
        })
    }

    /// Discards `n` bytes of input without keeping them; false if the input ended.
    async fn swallow(&mut self, n: usize) -> io::Result<bool> {
        let buffered = n.min(self.rbuf.len());
        self.rbuf.advance(buffered);
        let mut left = n - buffered;
        if left == 0 {
            return Ok(true);
        }
        self.flush().await?;
        let mut scratch = vec![0u8; left.min(64 * 1024)];
        while left > 0 {
            let want = left.min(scratch.len());
            let got = tokio::select! {
                biased;
                _ = self.stopped.wait_for(|s| *s) => return Ok(false),
                got = self.stream.read(&mut scratch[..want]) => got?,
            };
            if got == 0 {
                return Ok(false);
            }
            self.shared
                .conns
                .bytes_read
                .fetch_add(got as u64, Ordering::Relaxed);
            left -= got;
        }
        Ok(true)
    }

    fn reply(&mut self, noreply: bool, line: &[u8]) {
        if !noreply {
            self.out.text(line);
        }
    }

    async fn dispatch(&mut self, line: &[u8]) -> io::Result<Flow> {
        let cmd = match protocol::parse(line) {
            Ok(cmd) => cmd,
            Err(e) => {
                if let Some(answer) = e.response() {
                    self.out.text(&answer);
                }
                return Ok(Flow::Go);
            }
        };
        let now = unix_now();
        let store = self.shared.store.clone();
        match cmd {
            Command::Get { keys, with_cas } => {
                for key in keys {
                    if let Some(item) = self.lookup(key, now, false).await {
                        self.out.value(key, item, with_cas);
                    }
                    if self.out.len >= OUT_HIGH_WATER {
                        self.flush().await?;
                    }
                }
                self.out.text(b"END\r\n");
            }
            Command::Gat {
                exptime,
                keys,
                with_cas,
            } => {
                for key in keys {
                    if let Some(item) = self.lookup(key, now, true).await {
                        let touched = self
                            .update(key, now, |s, first| s.touch(key, exptime, now, first))
                            .await;
                        if touched == Some(UpdateOutcome::Touched) {
                            self.out.value(key, item, with_cas);
                        }
                    }
                    if self.out.len >= OUT_HIGH_WATER {
                        self.flush().await?;
                    }
                }
                self.out.text(b"END\r\n");
            }
            Command::Store {
                kind,
                key,
                flags,
                exptime,
                len,
                noreply,
            } => return self.store(kind, key, flags, exptime, len, noreply).await,
            Command::Delete { key, noreply } => {
                let answer: &[u8] = if store.delete(key, now) {
                    b"DELETED\r\n"
                } else {
                    b"NOT_FOUND\r\n"
                };
                self.reply(noreply, answer);
            }
            Command::Touch {
                key,
                exptime,
                noreply,
            } => {
                let outcome = self
                    .update(key, now, |s, first| s.touch(key, exptime, now, first))
                    .await;
                let answer: &[u8] = match outcome {
                    Some(UpdateOutcome::Touched) => b"TOUCHED\r\n",
                    Some(_) => b"NOT_FOUND\r\n",
                    None => FLASH_BUSY,
                };
                self.reply(noreply, answer);
            }
            Command::Arith {
                incr,
                key,
                delta,
                noreply,
            } => {
                let outcome = self
                    .update(key, now, |s, _| s.arith(key, incr, delta, now))
                    .await;
                if !noreply {
                    match outcome {
                        Some(UpdateOutcome::Number(n)) => {
                            self.out.number(n);
                            self.out.text(b"\r\n");
                        }
                        Some(UpdateOutcome::NonNumeric) => self.out.text(
                            b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
                        ),
                        Some(_) => self.out.text(b"NOT_FOUND\r\n"),
                        None => self.out.text(FLASH_BUSY),
                    }
                }
            }
            Command::Stats { reset: false } => {
                let text = self.shared.stats().render();
                self.out.text(text.as_bytes());
            }
            Command::Stats { reset: true } => {
                self.shared.reset_stats();
                self.out.text(b"RESET\r\n");
            }
            Command::FlushAll { delay, noreply } => {
                store.flush_all(delay, now);
                self.reply(noreply, b"OK\r\n");
            }
            Command::Version => {
                self.out.text(b"VERSION ");
                self.out.text(VERSION.as_bytes());
                self.out.text(b"\r\n");
            }
            Command::Quit => return Ok(Flow::Close),
            Command::Verbosity { noreply } => self.reply(noreply, b"OK\r\n"),
        }
        Ok(Flow::Go)
    }

    async fn store(
        &mut self,
        kind: StoreKind,
        key: &[u8],
        flags: u32,
        exptime: i64,
        len: usize,
        noreply: bool,
    ) -> io::Result<Flow> {
        let store = self.shared.store.clone();
        if len > store.item_limit() {
            self.shared.conns.too_large.fetch_add(1, Ordering::Relaxed);
            self.reply(noreply, b"SERVER_ERROR object too large for cache\r\n");
            if kind == StoreKind::Set {
                store.forget(key);
            }
            let kept_up = self.swallow(len + 2).await?;
            return Ok(if kept_up { Flow::Go } else { Flow::Close });
        }
        let value = match self.read_data(len).await? {
            Data::Value(value) => value,
            Data::BadChunk => {
                self.reply(noreply, b"CLIENT_ERROR bad data chunk\r\n");
                return Ok(Flow::Go);
            }
            Data::Closed => return Ok(Flow::Close),
        };
        let now = unix_now();
        let request = StoreRequest {
            kind,
            key,
            flags,
            exptime,
            data: value,
        };
        let mut first = true;
        let mut outcome = None;
        for _ in 0..FLASH_RETRIES {
            match store.store(&request, now, first) {
                StoreOutcome::OnFlash(file) => {
                    let read = self.read_flash(key, file).await;
                    store.load(key, file, read, now);
                }
                done => {
                    outcome = Some(done);
                    break;
                }
            }
            first = false;
        }
        let answer: &[u8] = match outcome {
            Some(StoreOutcome::Stored) => b"STORED\r\n",
            Some(StoreOutcome::NotStored) => b"NOT_STORED\r\n",
            Some(StoreOutcome::Exists) => b"EXISTS\r\n",
            Some(StoreOutcome::NotFound) => b"NOT_FOUND\r\n",
            Some(StoreOutcome::TooLarge) => b"SERVER_ERROR object too large for cache\r\n",
            Some(StoreOutcome::OnFlash(_)) | None => FLASH_BUSY,
        };
        self.reply(noreply, answer);
        Ok(Flow::Go)
    }

    async fn read_flash(&self, key: &[u8], file: u64) -> Result<Bytes, ReadError> {
        let store = &self.shared.store;
        let Some(dir) = store.flash_dir().cloned() else {
            return Err(ReadError::Missing);
        };
        let key = key.to_vec();
        let limit = store.item_limit();
        match tokio::task::spawn_blocking(move || dir.read(file, &key, limit)).await {
            Ok(read) => read,
            Err(e) => Err(ReadError::Io(io::Error::other(e.to_string()))),
        }
    }

    /// A get of one key, through flash if need be; `promote` forces a flash item into
    /// memory (for `gat`, which changes it next).
    async fn lookup(&self, key: &[u8], now: u64, promote: bool) -> Option<Item> {
        let store = &self.shared.store;
        let mut first = true;
        for _ in 0..FLASH_RETRIES {
            let file = match store.lookup(key, now, first) {
                Lookup::Hit(item) => return Some(item),
                Lookup::Miss => return None,
                Lookup::OnFlash(file) => file,
                Lookup::Retry => {
                    first = false;
                    continue;
                }
            };
            let read = self.read_flash(key, file).await;
            match store.finish_read(key, file, read, promote, now) {
                Lookup::Hit(item) => return Some(item),
                Lookup::Miss => return None,
                Lookup::OnFlash(_) | Lookup::Retry => first = false,
            }
        }
        None
    }

    /// Runs a change that needs the item in memory, loading it from flash first when it
    /// is there. `None` if the item kept changing under the loads.
    async fn update(
        &self,
        key: &[u8],
        now: u64,
        mut change: impl FnMut(&Store, bool) -> UpdateOutcome,
    ) -> Option<UpdateOutcome> {
        let store = &self.shared.store;
        let mut first = true;
        for _ in 0..FLASH_RETRIES {
            match change(store, first) {
                UpdateOutcome::OnFlash(file) => {
                    let read = self.read_flash(key, file).await;
                    store.load(key, file, read, now);
                }
                done => return Some(done),
            }
            first = false;
        }
        None
    }
}

/// The answer when an item kept moving between tiers while a command waited on it.
const FLASH_BUSY: &[u8] = b"SERVER_ERROR item busy, try again\r\n";
