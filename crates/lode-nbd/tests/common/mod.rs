//! Shared helpers: a server on its own runtime, tool lookup, test devices and a tiny
//! raw-protocol client for malformed traffic.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lode_blockdev::{BlockDevice, DeviceError};
use lode_nbd::{Exports, MemDevice, Server};

/// A server on a private two-thread runtime, listening on TCP and a Unix socket, so
/// tests can drive it with blocking clients and external tools.
pub struct TestServer {
    pub server: Server,
    pub addr: SocketAddr,
    pub socket: PathBuf,
    /// Device panics the test injected on purpose; any other count fails the test.
    pub expected_panics: u64,
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl TestServer {
    pub fn start(exports: Exports) -> Self {
        Self::start_with(exports, |b| b)
    }

    pub fn start_with(
        exports: Exports,
        configure: impl FnOnce(lode_nbd::ServerBuilder) -> lode_nbd::ServerBuilder,
    ) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = configure(Server::builder(exports)).build().unwrap();
        let addr = rt.block_on(async {
            server.listen_unix(&socket).unwrap();
            server
                .listen_tcp("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap()
        });
        Self {
            server,
            addr,
            socket,
            expected_panics: 0,
            _dir: dir,
            rt,
        }
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.addr, name)
    }

    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{}?socket={}", name, self.socket.display())
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let server = self.server.clone();
        let done = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await
        });
        if done.is_err() && !std::thread::panicking() {
            panic!("server did not shut down within 10 s");
        }
        if !std::thread::panicking() {
            let panics = self.server.stats().device_panics;
            assert_eq!(panics, self.expected_panics, "unexpected device panics");
        }
    }
}

#[allow(unused_imports)] // not every test file uses it
pub use lode_testkit::tool;

/// Runs a command to completion with a time limit, capturing output.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{shown} ran longer than {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let out = run(cmd, limit);
    assert!(
        out.status.success(),
        "{shown} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A memory device whose reads at offset 0 take `delay`, so a read of block 0 sent
/// first finishes after reads sent later.
#[derive(Debug)]
pub struct SlowFirstBlock {
    pub inner: MemDevice,
    pub delay: Duration,
}

#[async_trait]
impl BlockDevice for SlowFirstBlock {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        if offset == 0 {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.read_at(offset, buf).await
    }
}

/// A device that fails or panics on chosen offsets.
#[derive(Debug)]
pub struct Faulty {
    pub inner: MemDevice,
}

pub const FAIL_AT: u64 = 4096;
pub const PANIC_AT: u64 = 8192;

#[async_trait]
impl BlockDevice for Faulty {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        match offset {
            FAIL_AT => Err(DeviceError::Other(
                "chunk 0123abcd failed verification".into(),
            )),
            PANIC_AT => panic!("injected device panic"),
            _ => self.inner.read_at(offset, buf).await,
        }
    }
}

pub fn mem(data: Vec<u8>) -> Arc<MemDevice> {
    Arc::new(MemDevice::from_vec(data))
}

// ---------------------------------------------------------------------------------
// A raw client, written from the protocol document, for traffic no real client sends.

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;

pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    /// Connects and reads the server greeting; sends `client_flags`.
    pub fn connect(addr: SocketAddr, client_flags: u32) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut raw = Raw { s };
        let mut greet = [0u8; 18];
        raw.s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(greet[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        assert_eq!(u16::from_be_bytes([greet[16], greet[17]]), 0b11);
        raw.s.write_all(&client_flags.to_be_bytes()).unwrap();
        raw
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        (option, reply, data)
    }

    /// NBD_OPT_GO for `name`; returns (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let mut d = u32::try_from(name.len()).unwrap().to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(7, &d);
        let mut export = None;
        loop {
            let (opt, reply, data) = self.read_option_reply();
            assert_eq!(opt, 7);
            match reply {
                1 => break,
                3 if data[..2] == [0, 0] => {
                    export = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes([data[10], data[11]]),
                    ))
                }
                3 => {}
                other => panic!("GO {name:?} failed with reply {other:#x}"),
            }
        }
        export.expect("no NBD_INFO_EXPORT")
    }

    pub fn request(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) {
        self.s
            .write_all(&header(flags, kind, handle, offset, len))
            .unwrap();
    }

    /// Reads a simple reply header: (errno, handle).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// True if the server closed the connection (EOF or reset) within the read
    /// timeout, discarding anything it sent first.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    );
                }
            }
        }
    }
}

pub fn header(flags: u16, kind: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
