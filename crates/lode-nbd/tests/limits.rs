//! Clients that attack with resources rather than bytes: one that sends reads and
//! never takes the replies, more connections than the limit, and handshakes that never
//! finish. Each is bounded (by the connection's byte budget, `max_connections`,
//! `handshake_timeout`) and the server goes on serving everyone else. Real sockets,
//! hostile clients written here from the protocol document.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Raw, TestServer, header, mem};
use lode_nbd::{Export, Exports, ServerStats};
use lode_testkit::seeded_bytes;

const FIXED_NO_ZEROES: u32 = 0b11;
const EINVAL: u32 = 22;
const SIZE: usize = 8 << 20;
const BUDGET: usize = 1 << 20;
const BUDGET_U32: u32 = 1 << 20;
const READ: u32 = 64 << 10;

type Log = Arc<Mutex<Vec<String>>>;

/// A server with one 8 MiB export, "disk", configured by `configure`; every
/// connection error is rendered into the returned log as `peer: error`.
fn server(
    configure: impl FnOnce(lode_nbd::ServerBuilder) -> lode_nbd::ServerBuilder,
) -> (TestServer, Vec<u8>, Log) {
    let data = seeded_bytes(SIZE, 21);
    let exports = Exports::new();
    exports.add("disk", Export::new(mem(data.clone()))).unwrap();
    let log = Log::default();
    let srv = TestServer::start_with(exports, {
        let log = log.clone();
        move |b| {
            configure(b).on_connection_error(move |peer, e| {
                log.lock().unwrap().push(format!("{peer}: {e}"));
            })
        }
    });
    (srv, data, log)
}

/// Polls the server's counters until `done` holds; panics with them after 30 s (a
/// deadline for a hang, not a speed requirement).
fn wait_for(srv: &TestServer, what: &str, done: impl Fn(&ServerStats) -> bool) -> ServerStats {
    let start = Instant::now();
    loop {
        let stats = srv.server.stats();
        if done(&stats) {
            return stats;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited 30 s for {what}: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A healthy read through a fresh connection returns the right bytes.
fn still_serving(srv: &TestServer, data: &[u8]) {
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    c.go("disk");
    c.request(0, 0, 7, 8192, 4096);
    assert_eq!(c.simple_reply(), (0, 7));
    assert_eq!(c.read_exact(4096), data[8192..12288]);
}

/// A connection in transmission that has sent `n` reads of `READ` bytes (handles
/// 0..n) and reads nothing back.
fn non_reader(srv: &TestServer, n: u64) -> Raw {
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    c.go("disk");
    let mut requests = Vec::new();
    for i in 0..n {
        let offset = (i * u64::from(READ)) % SIZE as u64;
        requests.extend_from_slice(&header(0, 0, i, offset, READ));
    }
    // 28 bytes a request: all of them fit in the socket buffers, so this returns
    // although the server stops reading.
    c.s.write_all(&requests).unwrap();
    c
}

#[test]
fn a_client_that_never_reads_replies_holds_at_most_its_budget() {
    let (srv, data, log) = server(|b| b.max_buffered_bytes(BUDGET));
    // 400 reads of 64 KiB: 25 MiB of replies, far more than the socket buffers hold,
    // from each of three connections.
    const N: u64 = 400;
    let mut clients: Vec<Raw> = (0..3).map(|_| non_reader(&srv, N)).collect();

    // Each connection fills its budget exactly (16 replies of 64 KiB waiting) and
    // stops there: the server stops reading its requests.
    let budgets = 3 * BUDGET as u64;
    let stalled = wait_for(&srv, "every budget to fill", |s| {
        s.buffered_bytes == budgets
    });
    assert_eq!(stalled.peak_buffered_bytes, budgets, "{stalled:?}");
    assert!(stalled.requests < 3 * N, "{stalled:?}");
    // Others are served meanwhile, and the bound holds while they are.
    still_serving(&srv, &data);
    // (Its one 4 KiB read is the only thing the peak may add.)
    let stats = srv.server.stats();
    assert!(stats.peak_buffered_bytes <= budgets + 4096, "{stats:?}");

    // Backpressure, not an error: once a client reads, every reply arrives, right.
    let mut c = clients.remove(0);
    for _ in 0..N {
        let (errno, handle) = c.simple_reply();
        assert_eq!(errno, 0, "handle {handle}");
        let offset = usize::try_from(handle * u64::from(READ)).unwrap() % SIZE;
        assert_eq!(
            c.read_exact(READ as usize),
            data[offset..offset + READ as usize]
        );
    }
    wait_for(&srv, "the reader's share to come back", |s| {
        s.buffered_bytes == 2 * BUDGET as u64
    });

    // Shutdown does not wait for the two that still never read.
    let server = srv.server.clone();
    let done = srv
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), server.shutdown()).await });
    assert!(done.is_ok(), "shutdown waited on clients that do not read");
    assert_eq!(srv.server.stats().buffered_bytes, 0);
    assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());
}

#[test]
fn requests_over_the_advertised_maximum_block_size_are_refused() {
    let (srv, data, _) = server(|b| b.max_buffered_bytes(BUDGET));
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    // NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE: the budget is the maximum.
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&3u16.to_be_bytes());
    c.send_option(7, &go);
    let mut block_sizes = None;
    loop {
        let (_, reply, info) = c.read_option_reply();
        if reply == 1 {
            break;
        }
        if reply == 3 && info[..2] == [0, 3] {
            let be = |at: usize| u32::from_be_bytes(info[at..at + 4].try_into().unwrap());
            block_sizes = Some((be(2), be(6), be(10)));
        }
    }
    assert_eq!(block_sizes, Some((1, 4096, BUDGET_U32)));

    // A read one byte over: EINVAL, nothing allocated, the connection goes on.
    c.request(0, 0, 1, 0, BUDGET_U32 + 1);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    // A write over it (but under 32 MiB): EINVAL, its payload read and thrown away.
    c.request(0, 1, 2, 0, 2 * BUDGET_U32);
    c.s.write_all(&vec![0xEE; 2 * BUDGET]).unwrap();
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    // The stream is still in step and the device untouched.
    c.request(0, 0, 3, 0, BUDGET_U32);
    assert_eq!(c.simple_reply(), (0, 3));
    assert_eq!(c.read_exact(BUDGET), data[..BUDGET]);
}

/// True if the server closed `s` without sending a byte (EOF or reset before the
/// read timeout).
fn closed_unread(s: &mut impl Read) -> bool {
    match s.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(n) => panic!("a refused connection got {n} bytes"),
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

#[test]
fn connections_over_the_limit_are_refused_until_one_closes() {
    let (srv, data, log) = server(|b| b.max_connections(2));
    // One in transmission and one still in the handshake: both count.
    let mut first = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    first.go("disk");
    let second = Raw::connect(srv.addr, FIXED_NO_ZEROES);

    // The third, over TCP and over the Unix socket, is closed before the greeting.
    let mut third = TcpStream::connect(srv.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = third.local_addr().unwrap();
    assert!(closed_unread(&mut third));
    let mut unix = UnixStream::connect(&srv.socket).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(closed_unread(&mut unix));
    let stats = wait_for(&srv, "two refusals", |s| s.connections_refused == 2);
    assert_eq!(stats.connections_active, 2, "{stats:?}");
    assert_eq!(stats.connections_accepted, 2, "{stats:?}");
    {
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(
            log[0],
            format!("tcp {port}: refused: 2 connections are open, the max_connections limit")
        );
        let uid = std::fs::metadata("/proc/self").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid()
        });
        assert_eq!(
            log[1],
            format!(
                "unix socket pid {} uid {}: refused: 2 connections are open, the max_connections limit",
                std::process::id(),
                uid.unwrap()
            )
        );
    }
    // The admitted ones work throughout.
    first.request(0, 0, 1, 4096, 512);
    assert_eq!(first.simple_reply(), (0, 1));
    assert_eq!(first.read_exact(512), data[4096..4608]);

    // One leaves; its slot is free for the next client.
    drop(second);
    wait_for(&srv, "the second connection to close", |s| {
        s.connections_active == 1
    });
    still_serving(&srv, &data);
    assert_eq!(srv.server.stats().connections_refused, 2);
}

#[test]
fn one_peer_cannot_take_every_connection() {
    let (srv, data, log) = server(|b| b.max_connections(8).max_connections_per_peer(2));
    // Two from 127.0.0.1 fill its share; a third from it is closed unread...
    let first = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    let _second = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    let mut third = TcpStream::connect(srv.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let port = third.local_addr().unwrap();
    assert!(closed_unread(&mut third));
    assert_eq!(
        log.lock().unwrap().as_slice(),
        [format!(
            "tcp {port}: refused: 2 connections from this peer are open, the max_connections_per_peer limit"
        )]
    );
    // ...while another peer (this user, over the Unix socket) still gets in.
    let mut unix = UnixStream::connect(&srv.socket).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    unix.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let stats = wait_for(&srv, "three admitted", |s| s.connections_active == 3);
    assert_eq!(stats.connections_refused, 1, "{stats:?}");

    // When one of the two leaves, the peer may connect again.
    drop(first);
    wait_for(&srv, "the first to close", |s| s.connections_active == 2);
    still_serving(&srv, &data);
}

#[test]
fn silent_and_dribbling_handshakes_are_dropped_after_the_timeout() {
    let timeout = Duration::from_millis(500);
    let (srv, data, log) = server(|b| b.handshake_timeout(timeout));

    // Connects and sends nothing, not even its flags.
    let mut silent = TcpStream::connect(srv.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Sends its flags and half an option header, then nothing.
    let mut stalled = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    stalled
        .s
        .write_all(&common::IHAVEOPT.to_be_bytes())
        .unwrap();
    stalled
        .s
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Dribbles a valid handshake a byte at a time, each byte well inside the timeout,
    // the whole far outside it.
    let dribbler = {
        let addr = srv.addr;
        std::thread::spawn(move || {
            let mut c = Raw::connect(addr, FIXED_NO_ZEROES);
            let mut go = common::IHAVEOPT.to_be_bytes().to_vec();
            go.extend_from_slice(&7u32.to_be_bytes());
            go.extend_from_slice(&10u32.to_be_bytes());
            go.extend_from_slice(&4u32.to_be_bytes());
            go.extend_from_slice(b"disk\0\0");
            let mut sent = 0;
            for b in go {
                if c.s.write_all(&[b]).is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            c.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            (sent, c.closed())
        })
    };

    // The greeting, then the close.
    let mut greeting = [0u8; 18];
    silent.read_exact(&mut greeting).unwrap();
    assert!(closed_unread(&mut silent));
    assert!(stalled.closed());
    let (sent, closed) = dribbler.join().unwrap();
    assert!(closed);
    assert!(sent < 26, "the dribbled handshake was accepted");

    let stats = wait_for(&srv, "three timeouts", |s| s.connection_errors == 3);
    assert_eq!(stats.connections_active, 0, "{stats:?}");
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 3, "{log:?}");
    for line in &log {
        assert!(
            line.starts_with("tcp 127.0.0.1:")
                && line.ends_with(": handshake not finished within 500ms"),
            "{line}"
        );
    }
    still_serving(&srv, &data);
}
