//! Traffic no well-behaved client sends: bad magic, unknown options and commands,
//! lengths past the end, huge lengths, clients that vanish mid-request, random bytes.
//! Each gets the protocol's error or a closed connection, and the server goes on
//! serving everyone else.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{FAIL_AT, Faulty, PANIC_AT, Raw, TestServer, header, mem};
use lode_nbd::{Export, Exports, MemDevice};
use lode_testkit::seeded_bytes;

const FIXED_NO_ZEROES: u32 = 0b11;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const SIZE: usize = 1 << 20;

fn server() -> (TestServer, Vec<u8>) {
    let data = seeded_bytes(SIZE, 11);
    let exports = Exports::new();
    exports.add("disk", Export::new(mem(data.clone()))).unwrap();
    let ro = MemDevice::from_vec(data.clone()).into_read_only();
    exports.add("ro", Export::new(Arc::new(ro))).unwrap();
    let faulty = Faulty {
        inner: MemDevice::from_vec(data.clone()),
    };
    exports
        .add("faulty", Export::new(Arc::new(faulty)))
        .unwrap();
    exports
        .add("scratch", Export::new(mem(vec![0; SIZE])))
        .unwrap();
    (TestServer::start(exports), data)
}

/// A connection in transmission with `name`, simple replies.
fn open(srv: &TestServer, name: &str) -> Raw {
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    let (size, _) = c.go(name);
    assert_eq!(size, SIZE as u64);
    c
}

/// A healthy read through a fresh connection returns the right bytes.
fn still_serving(srv: &TestServer, data: &[u8]) {
    let mut c = open(srv, "disk");
    c.request(0, 0, 99, 4096, 512);
    assert_eq!(c.simple_reply(), (0, 99));
    assert_eq!(c.read_exact(512), data[4096..4608]);
}

#[test]
fn handshake_garbage_closes_only_that_connection() {
    let (srv, data) = server();

    // Unknown client flags.
    let mut c = Raw::connect(srv.addr, 1 << 7);
    assert!(c.closed());

    // Bad option magic.
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    c.s.write_all(&[0xAB; 16]).unwrap();
    assert!(c.closed());

    // Option data over the 64 KiB cap: closed without reading it.
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    let mut h = common::IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&7u32.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).unwrap();
    assert!(c.closed());

    // Unknown option → NBD_REP_ERR_UNSUP; malformed INFO → ERR_INVALID; unknown
    // export → ERR_UNKNOWN; then GO still works on the same connection.
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    c.send_option(0x4242, b"whatever");
    let (opt, reply, msg) = c.read_option_reply();
    assert_eq!((opt, reply), (0x4242, 0x8000_0001));
    assert_eq!(
        String::from_utf8_lossy(&msg),
        "option 16962 is not supported"
    );
    c.send_option(6, &[0, 0, 0, 200, b'x']);
    let (_, reply, msg) = c.read_option_reply();
    assert_eq!(reply, 0x8000_0003);
    assert!(
        String::from_utf8_lossy(&msg).contains("export name"),
        "{msg:?}"
    );
    c.send_option(3, b"x"); // LIST takes no data
    assert_eq!(c.read_option_reply().1, 0x8000_0003);
    let mut info = 7u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"missing\0\0");
    c.send_option(6, &info);
    let (_, reply, msg) = c.read_option_reply();
    assert_eq!(reply, 0x8000_0006);
    assert_eq!(String::from_utf8_lossy(&msg), "no export named \"missing\"");
    c.send_option(8, b""); // structured replies: ACK
    assert_eq!(c.read_option_reply().1, 1);
    c.go("disk");

    // NBD_OPT_EXPORT_NAME for an unknown export: the protocol's only answer is to hang up.
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    c.send_option(1, b"nope");
    assert!(c.closed());

    // A non-fixed-newstyle client (old nbd-client) with EXPORT_NAME, zero padding on.
    let mut c = Raw::connect(srv.addr, 0);
    c.send_option(1, b"disk");
    let reply = c.read_exact(8 + 2 + 124);
    assert_eq!(
        u64::from_be_bytes(reply[..8].try_into().unwrap()),
        SIZE as u64
    );
    assert!(reply[10..].iter().all(|&b| b == 0));
    c.request(0, 0, 5, 0, 16);
    assert_eq!(c.simple_reply(), (0, 5));
    assert_eq!(c.read_exact(16), data[..16]);
    // ...and a non-fixed client sending another option is cut off.
    let mut c = Raw::connect(srv.addr, 0);
    c.send_option(3, b"");
    assert!(c.closed());

    // ABORT gets an ACK and a close.
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    c.send_option(2, b"");
    assert_eq!(c.read_option_reply().1, 1);
    assert!(c.closed());

    still_serving(&srv, &data);
}

#[test]
fn request_errors_get_errno_and_the_connection_goes_on() {
    let (srv, data) = server();
    let mut c = open(&srv, "disk");

    // Unknown command, unknown flag, zero length.
    c.request(0, 42, 1, 0, 0);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    c.request(1 << 12, 0, 2, 0, 4096);
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    c.request(0, 0, 3, 0, 0);
    assert_eq!(c.simple_reply(), (EINVAL, 3));
    // Read past the end, and with offset + length overflowing.
    c.request(0, 0, 4, SIZE as u64 - 1, 2);
    assert_eq!(c.simple_reply(), (EINVAL, 4));
    c.request(0, 0, 5, u64::MAX - 10, 4096);
    assert_eq!(c.simple_reply(), (EINVAL, 5));
    // A 4 GiB read: refused without allocating or sending anything else.
    c.request(0, 0, 6, 0, u32::MAX);
    assert_eq!(c.simple_reply(), (EINVAL, 6));
    // Write past the end: ENOSPC, and its payload is skipped, not parsed as requests.
    c.request(0, 1, 7, SIZE as u64 - 4, 4096);
    c.s.write_all(&[0x25; 4096]).unwrap();
    assert_eq!(c.simple_reply(), (ENOSPC, 7));
    // Write zeroes past the end.
    c.request(0, 6, 8, SIZE as u64, 1);
    assert_eq!(c.simple_reply(), (ENOSPC, 8));
    // Still in step: a good read.
    c.request(0, 0, 9, 100, 100);
    assert_eq!(c.simple_reply(), (0, 9));
    assert_eq!(c.read_exact(100), data[100..200]);

    // Read-only export: EPERM for write (payload skipped), trim and zeroes.
    let mut r = open(&srv, "ro");
    r.request(0, 1, 10, 0, 512);
    r.s.write_all(&[0; 512]).unwrap();
    assert_eq!(r.simple_reply(), (EPERM, 10));
    r.request(0, 4, 11, 0, 512);
    assert_eq!(r.simple_reply(), (EPERM, 11));
    r.request(0, 6, 12, 0, 512);
    assert_eq!(r.simple_reply(), (EPERM, 12));
    r.request(0, 3, 13, 0, 0);
    assert_eq!(r.simple_reply(), (0, 13));

    // Device failure → EIO; device panic → EIO; the connection survives both.
    let mut f = open(&srv, "faulty");
    f.request(0, 0, 14, FAIL_AT, 4096);
    assert_eq!(f.simple_reply(), (EIO, 14));
    f.request(0, 0, 15, PANIC_AT, 4096);
    assert_eq!(f.simple_reply(), (EIO, 15));
    f.request(0, 0, 16, 0, 8);
    assert_eq!(f.simple_reply(), (0, 16));
    assert_eq!(f.read_exact(8), data[..8]);
    // Disconnect cleanly.
    f.request(0, 2, 17, 0, 0);
    assert!(f.closed());
    let mut srv = srv;
    assert_eq!(srv.server.stats().device_panics, 1);
    srv.expected_panics = 1;
}

#[test]
fn structured_errors_carry_the_reason() {
    let (srv, _) = server();
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    c.send_option(8, b"");
    assert_eq!(c.read_option_reply().1, 1);
    c.go("faulty");
    c.request(0, 0, 77, FAIL_AT, 4096);
    let h = c.read_exact(20);
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x668e_33ef);
    assert_eq!(u16::from_be_bytes([h[4], h[5]]), 1, "DONE flag");
    assert_eq!(
        u16::from_be_bytes([h[6], h[7]]),
        0x8001,
        "NBD_REPLY_TYPE_ERROR"
    );
    assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 77);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let payload = c.read_exact(len);
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EIO);
    let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    assert_eq!(
        String::from_utf8_lossy(&payload[6..6 + msg_len]),
        "chunk 0123abcd failed verification"
    );

    // A read past the end says where.
    c.request(0, 0, 78, SIZE as u64, 1);
    let h = c.read_exact(20);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let payload = c.read_exact(len);
    assert_eq!(
        String::from_utf8_lossy(&payload[6..]),
        "READ of 1 bytes at offset 1048576 runs past the end of the 1048576-byte export"
    );
}

#[test]
fn stream_breaking_requests_close_the_connection() {
    let (srv, data) = server();

    // Bad request magic.
    let mut c = open(&srv, "disk");
    c.s.write_all(&[0x11; 28]).unwrap();
    assert!(c.closed());

    // A WRITE whose payload is over 32 MiB cannot be skipped safely: closed, unread.
    let mut c = open(&srv, "disk");
    c.request(0, 1, 1, 0, (32 << 20) + 1);
    assert!(c.closed());

    // A client that vanishes mid-header, mid-payload, and with requests in flight.
    let mut c = open(&srv, "disk");
    c.s.write_all(&header(0, 1, 2, 0, 4096)[..13]).unwrap();
    drop(c);
    let mut c = open(&srv, "disk");
    c.request(0, 1, 3, 0, 4096);
    c.s.write_all(&[1; 1000]).unwrap();
    drop(c);
    let mut c = open(&srv, "disk");
    for i in 0..32 {
        c.request(0, 0, i, i * 4096, 4096);
    }
    drop(c);

    // The half-written WRITE never reached the device.
    let mut c = open(&srv, "disk");
    c.request(0, 0, 4, 0, 4096);
    assert_eq!(c.simple_reply(), (0, 4));
    assert_eq!(c.read_exact(4096), data[..4096]);
    still_serving(&srv, &data);
}

#[test]
fn pipelined_requests_past_the_in_flight_limit_all_complete() {
    let exports = Exports::new();
    let data = seeded_bytes(SIZE, 5);
    exports.add("disk", Export::new(mem(data.clone()))).unwrap();
    let srv = TestServer::start_with(exports, |b| b.max_in_flight(4));
    let mut c = open(&srv, "disk");
    // 200 reads and writes sent without reading a reply.
    let writer = {
        let mut s = c.s.try_clone().unwrap();
        std::thread::spawn(move || {
            for i in 0..200u64 {
                if i % 2 == 0 {
                    s.write_all(&header(0, 0, i, (i % 128) * 4096, 4096))
                        .unwrap();
                } else {
                    s.write_all(&header(0, 1, i, (128 + i % 128) * 4096, 64))
                        .unwrap();
                    s.write_all(&[i.to_le_bytes()[0]; 64]).unwrap();
                }
            }
        })
    };
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let (errno, handle) = c.simple_reply();
        assert_eq!(errno, 0);
        if handle % 2 == 0 {
            let off = usize::try_from(handle % 128).unwrap() * 4096;
            assert_eq!(c.read_exact(4096), data[off..off + 4096], "handle {handle}");
        }
        assert!(seen.insert(handle), "handle {handle} answered twice");
    }
    writer.join().unwrap();
}

#[test]
fn shutdown_answers_requests_in_flight() {
    let exports = Exports::new();
    let slow = common::SlowFirstBlock {
        inner: MemDevice::from_vec(seeded_bytes(SIZE, 9)),
        delay: Duration::from_millis(300),
    };
    exports.add("slow", Export::new(Arc::new(slow))).unwrap();
    let srv = TestServer::start(exports);
    let mut c = Raw::connect(srv.addr, FIXED_NO_ZEROES);
    c.go("slow");
    c.request(0, 0, 1, 0, 4096);
    std::thread::sleep(Duration::from_millis(50));
    let server = srv.server.clone();
    srv.block_on(async { server.shutdown().await });
    assert_eq!(c.simple_reply(), (0, 1));
    assert_eq!(c.read_exact(4096), seeded_bytes(SIZE, 9)[..4096]);
    assert!(c.closed());
    assert!(
        TcpStream::connect(srv.addr).is_err() || {
            // The listener is gone; a racing connect may still be accepted by the kernel
            // backlog but is never served.
            let mut s = TcpStream::connect(srv.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_))
        }
    );
}

/// Random bytes at a live server, before and after a valid handshake, while a healthy
/// client keeps reading and checking data.
#[test]
fn random_bytes_never_stop_the_server() {
    let (srv, data) = server();
    let addr = srv.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let healthy = {
        let stop = stop.clone();
        let data = data.clone();
        std::thread::spawn(move || {
            let mut c = Raw::connect(addr, FIXED_NO_ZEROES);
            c.go("disk");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (n * 7919 % 250) * 4096;
                c.request(0, 0, n, off, 4096);
                assert_eq!(c.simple_reply(), (0, n));
                let off = usize::try_from(off).unwrap();
                assert_eq!(c.read_exact(4096), data[off..off + 4096]);
                n += 1;
            }
            n
        })
    };

    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..1000 {
        let len = (next() % 2048) as usize;
        let mut junk = seeded_bytes(len, next());
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        match round % 3 {
            // Garbage straight after the greeting.
            0 => {}
            // A valid handshake, then garbage requests that start with the right magic.
            1 | 2 => {
                let mut c = Raw { s };
                c.s.write_all(&FIXED_NO_ZEROES.to_be_bytes()).unwrap();
                if round % 3 == 2 {
                    c.send_option(8, b"");
                    c.read_option_reply();
                }
                c.go(if next() % 2 == 0 { "scratch" } else { "ro" });
                for chunk in junk.chunks_mut(28) {
                    if chunk.len() >= 8 && next() % 4 != 0 {
                        chunk[..4].copy_from_slice(&common::REQUEST_MAGIC.to_be_bytes());
                        // Mostly known command types, so the checks past magic run.
                        chunk[6] = 0;
                        chunk[7] %= 9;
                        if chunk[7] == 1 && chunk.len() == 28 {
                            // Keep WRITE payloads small enough to be read and skipped.
                            chunk[24] = 0;
                            chunk[25] = 0;
                        }
                    }
                }
                s = c.s;
            }
            _ => unreachable!(),
        }
        let _ = s.write_all(&junk);
        // End of stream mid-request for the server; it answers what it can and closes.
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 65536];
        while let Ok(n) = s.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads = healthy.join().unwrap();
    assert!(reads > 10, "healthy client made only {reads} reads");
    still_serving(&srv, &data);
    let stats = srv.server.stats();
    assert_eq!(stats.device_panics, 0);
    assert!(stats.connections_accepted >= 1000);
    // The junk reached the request parser, not just the handshake.
    assert!(stats.request_errors > 200, "{stats:?}");
}

#[test]
fn failed_requests_reach_the_hook_with_their_command_and_error() {
    let data = seeded_bytes(SIZE, 12);
    let exports = Exports::new();
    let faulty = Faulty {
        inner: MemDevice::from_vec(data.clone()),
    };
    exports
        .add("faulty", Export::new(Arc::new(faulty)))
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hooked = Arc::clone(&seen);
    let srv = TestServer::start_with(exports, move |b| {
        b.on_request_error(move |command, e| {
            hooked.lock().unwrap().push(format!("{command:?}: {e}"));
        })
    });
    let mut c = open(&srv, "faulty");
    c.request(0, 0, 5, FAIL_AT, 4096);
    assert_eq!(c.simple_reply(), (EIO, 5));
    // A request that succeeds is not reported.
    c.request(0, 0, 6, 0, 8);
    assert_eq!(c.simple_reply(), (0, 6));
    assert_eq!(c.read_exact(8), data[..8]);
    assert_eq!(
        *seen.lock().unwrap(),
        [format!(
            "Read {{ offset: {FAIL_AT}, length: 4096 }}: chunk 0123abcd failed verification"
        )]
    );
}
