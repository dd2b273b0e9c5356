//! Hostile and broken clients: each gets an error line or a closed connection, never a
//! panic in the node or an allocation it did not bound, and a well-behaved client on
//! another connection is served throughout. One test, run in sequence, so the memory
//! figures are this test's alone.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Client, NODE_THREAD, TestNode, rss_bytes};
use lode_testkit::seeded_bytes;

/// Counts panics on the node's threads (the node runs in this process).
fn count_node_panics() -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(NODE_THREAD) {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        previous(info);
    }));
    count
}

/// The well-behaved client still gets its own data back.
fn still_serving(good: &mut Client, round: usize) {
    let key = format!("good{round}");
    let data = seeded_bytes(5000, round as u64 + 1);
    assert_eq!(good.set(&key, &data), "STORED", "round {round}");
    assert_eq!(good.get(&key).unwrap(), data, "round {round}");
}

/// Sends `bytes` on a fresh connection and returns what came back before the server
/// closed it or went quiet for half a second.
fn answer_to(addr: std::net::SocketAddr, bytes: &[u8]) -> (bool, Vec<String>) {
    let mut c = Client::connect(addr);
    let _ = c.try_send(bytes);
    c.set_read_timeout(Duration::from_millis(500));
    c.closed_after()
}

#[test]
fn node_survives_malformed_traffic() {
    let panics = count_node_panics();
    let node = TestNode::start();
    let addr = node.addr;
    let mut good = node.client();
    let mut round = 0;
    let mut check = |good: &mut Client| {
        round += 1;
        still_serving(good, round);
    };
    check(&mut good);

    // Announced lengths past any limit: refused and discarded as they stream, never
    // buffered. 8 MiB of a 2 GiB announcement go in; memory stays flat.
    let rss_before = rss_bytes();
    {
        let mut c = Client::connect(addr);
        c.send(b"set big 0 0 2147483645\r\n");
        assert_eq!(c.line(), "SERVER_ERROR object too large for cache");
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..128 {
            c.send(&chunk);
        }
    }
    check(&mut good);
    let (closed, lines) = answer_to(addr, b"set k 0 0 99999999999999999999\r\n");
    assert_eq!(
        lines,
        ["CLIENT_ERROR bad command line format"],
        "closed {closed}"
    );
    let (_, lines) = answer_to(addr, b"set k 0 0 4294967296\r\n");
    assert_eq!(lines, ["CLIENT_ERROR bad command line format"]);
    check(&mut good);

    // Bad commands of every shape.
    for bad in [
        &b"\x00\x01\x02\r\n"[..],
        b"\xff\xfe get k\r\n",
        b"get \x00\r\n",
        b"set\r\n",
        b"cas k 0 0 1 18446744073709551616\r\n",
        b"incr k 99999999999999999999999\r\n",
        b"touch k 99999999999\r\n",
        b"flush_all 99999999999999\r\n",
        b"\r\n\r\n\r\n",
    ] {
        let (_, lines) = answer_to(addr, bad);
        assert!(!lines.is_empty(), "no answer to {bad:?}");
        for line in &lines {
            assert!(
                line == "ERROR"
                    || line.starts_with("CLIENT_ERROR ")
                    || line.starts_with("SERVER_ERROR "),
                "answer {line:?} to {bad:?}"
            );
        }
    }
    check(&mut good);

    // A value shorter than announced, then the client goes; a client gone mid-value.
    for request in [
        &b"set short 0 0 100\r\nonly this\r\n"[..],
        b"set half 0 0 1048576\r\nxxxx",
    ] {
        let mut c = Client::connect(addr);
        c.send(request);
        c.finish_sending();
        let (closed, lines) = c.closed_after();
        assert!(closed && lines.is_empty(), "{lines:?}");
    }
    assert_eq!(good.get("short"), None);
    assert_eq!(good.get("half"), None);
    check(&mut good);

    // Endless lines without a newline, for each line bound.
    for prefix in [&b"set "[..], b"get "] {
        let mut c = Client::connect(addr);
        c.send(prefix);
        let chunk = vec![b'k'; 8192];
        let mut sent = 0;
        while sent < 1 << 20 && c.try_send(&chunk) {
            sent += chunk.len();
        }
        let (closed, lines) = c.closed_after();
        assert!(closed, "endless {prefix:?} line left open");
        assert!(lines.len() <= 1 && lines.iter().all(|l| l == "CLIENT_ERROR line too long"));
    }
    check(&mut good);

    // A huge key count on one get: within the line bound it is answered, past it the
    // connection is closed.
    let mut line = b"get".to_vec();
    while line.len() < 60_000 {
        line.extend_from_slice(b" a");
    }
    line.extend_from_slice(b"\r\n");
    let (_, lines) = answer_to(addr, &line);
    assert_eq!(lines, ["END"]);
    let mut line = b"get".to_vec();
    for i in 0..100_000 {
        line.extend_from_slice(format!(" k{i}").as_bytes());
    }
    line.extend_from_slice(b"\r\n");
    let (closed, lines) = answer_to(addr, &line);
    assert!(closed && lines.len() <= 1, "{lines:?}");
    check(&mut good);

    // A get whose answer is huge (the same 1 MiB value 15 000 times: 15 GiB) from a
    // client that never reads: the node stops at the socket's pace instead of
    // building the answer in memory.
    good.set("mib", &seeded_bytes(1 << 20, 5));
    {
        let mut c = Client::connect(addr);
        let mut line = b"get".to_vec();
        for _ in 0..15_000 {
            line.extend_from_slice(b" mib");
        }
        line.extend_from_slice(b"\r\n");
        c.send(&line);
        std::thread::sleep(Duration::from_millis(500));
    }
    check(&mut good);
    let rss_after = rss_bytes();
    assert!(
        rss_after < rss_before + (64 << 20),
        "memory grew from {} MiB to {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );

    // Random garbage, with protocol words mixed in, from many clients at once.
    let garbage: Vec<_> = (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                let words: [&[u8]; 12] = [
                    b"get ",
                    b"set ",
                    b"gets ",
                    b"cas ",
                    b"incr ",
                    b"noreply",
                    b"\r\n",
                    b" 0 ",
                    b" 4294967295 ",
                    b" -1 ",
                    b"\n",
                    b"k",
                ];
                for conn in 0..25u64 {
                    let noise = seeded_bytes(4096, t * 1000 + conn + 1);
                    let mut bytes = Vec::new();
                    for (i, b) in noise.iter().enumerate() {
                        if b % 4 == 0 {
                            bytes.extend_from_slice(words[usize::from(*b) % words.len()]);
                        } else {
                            bytes.push(noise[(i * 7) % noise.len()]);
                        }
                    }
                    let mut c = Client::connect(addr);
                    let _ = c.try_send(&bytes);
                    c.finish_sending();
                    c.set_read_timeout(Duration::from_secs(5));
                    // Read whatever comes until the node closes.
                    let (closed, _) = c.closed_after();
                    assert!(closed, "garbage connection left open after end of input");
                }
            })
        })
        .collect();
    for _ in 0..5 {
        check(&mut good);
    }
    for t in garbage {
        t.join().unwrap();
    }
    check(&mut good);

    // Every broken connection is gone: only the good client is left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.stats().curr_connections > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(node.stats().curr_connections, 1);
    assert_eq!(panics.load(Ordering::SeqCst), 0, "the node panicked");
}
