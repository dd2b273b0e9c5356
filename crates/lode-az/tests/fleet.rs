//! The AZ client against a fleet of real memcached nodes (six, k = 4, m = 2, unless a
//! test says otherwise): nodes killed during a read storm, a node stopped (SIGSTOP),
//! stripes corrupted behind the client's back, every node down, a node coming back,
//! and a hostile node that answers with protocol garbage.
//!
//! `cargo test -p lode-az --test fleet -- --nocapture` shows the latencies measured.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lode_az::memcache::Connection;
use lode_az::stripe::Stripe;
use lode_az::{AzClient, AzError, AzMetrics, NodeMetrics};
use lode_format::ChunkName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use common::{Memcached, chunk, eventually, quantile};

/// A 512 KiB chunk's ciphertext: the plaintext plus the 16-byte GCM tag.
const CHUNK: usize = 512 * 1024 + 16;

fn node<'a>(m: &'a AzMetrics, addr: &str) -> &'a NodeMetrics {
    m.nodes.iter().find(|n| n.node == addr).expect("node")
}

fn position(fleet: &[Memcached], addr: &str) -> usize {
    fleet
        .iter()
        .position(|n| n.addr().to_string() == addr)
        .expect("in fleet")
}

async fn put_all(az: &AzClient, chunks: &[(ChunkName, Bytes)]) {
    for (name, data) in chunks {
        az.put(name, data.clone()).await.expect("put");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_for_each_code() {
    let Some(fleet) = common::fleet(6) else {
        return;
    };
    for (k, m) in [(4, 2), (4, 1), (1, 0), (3, 3)] {
        let mut cfg = common::config(&fleet, Duration::from_secs(2));
        (cfg.k, cfg.m) = (k, m);
        let az = AzClient::new(cfg).unwrap();
        let lens = [0, 1, 3, 4095, 524_288, CHUNK];
        for (i, len) in lens.into_iter().enumerate() {
            let (name, data) = chunk(1000 * k as u64 + i as u64, len);
            assert_eq!(az.get(&name).await.unwrap(), None, "k={k} m={m} len={len}");
            az.put(&name, data.clone()).await.unwrap();
            assert_eq!(
                az.get(&name).await.unwrap(),
                Some(data),
                "k={k} m={m} len={len}"
            );
        }
        let (last, _) = chunk(1000 * k as u64 + 5, CHUNK);
        az.remove(&last).await;
        assert_eq!(az.get(&last).await.unwrap(), None);

        let mt = az.metrics();
        assert_eq!((mt.gets, mt.hits, mt.misses), (13, 6, 7), "k={k} m={m}");
        assert_eq!(mt.integrity_failures, 0);
        // Parity stripes are among the first k to arrive as often as not, so reads
        // decode; with no parity they never do.
        assert!(mt.rebuilds <= 6 && (m > 0 || mt.rebuilds == 0), "{mt:?}");
        let stores: u64 = mt.nodes.iter().map(|n| n.stores).sum();
        assert_eq!(stores, 6 * (k + m) as u64);
        // Each node holds at most one stripe of a chunk.
        assert!(mt.nodes.iter().all(|n| n.stores <= 6));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_too_large_for_a_value_is_refused() {
    let Some(fleet) = common::fleet(6) else {
        return;
    };
    let az = AzClient::new(common::config(&fleet, Duration::from_secs(2))).unwrap();
    let (name, data) = chunk(7, 4 << 20);
    let e = az.put(&name, data).await.unwrap_err();
    assert!(matches!(e, AzError::TooLarge { .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "chunk {name} of 4194304 bytes cannot go to the AZ cache: its stripes would be \
             1048624 bytes, over max_value (1048576)"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_storm_survives_two_nodes_killed() {
    let Some(mut fleet) = common::fleet(6) else {
        return;
    };
    // Generous: with two nodes gone every read needs all four others, and this machine
    // is shared.
    let az = AzClient::new(common::config(&fleet, Duration::from_secs(2))).unwrap();
    let chunks: Arc<Vec<(ChunkName, Bytes)>> = Arc::new(
        (0..40usize)
            .map(|i| {
                let len = if i % 5 == 4 { 1000 + 37 * i } else { CHUNK };
                chunk(i as u64, len)
            })
            .collect(),
    );
    put_all(&az, &chunks).await;

    // Each reader reads at least `per_reader` chunks and goes on until it has read
    // `after_kill` more since the kill, so the kill lands mid-storm and is followed by
    // enough reads however the machine schedules them.
    let (readers, per_reader, after_kill) = (12usize, 40usize, 15usize);
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut storm = JoinSet::new();
    for r in 0..readers {
        let (az, chunks, killed) = (az.clone(), Arc::clone(&chunks), Arc::clone(&killed));
        storm.spawn(async move {
            let (mut wrong, mut since_kill) = (Vec::new(), 0);
            let mut j = 0;
            while j < per_reader || since_kill < after_kill {
                let was_killed = killed.load(std::sync::atomic::Ordering::SeqCst);
                let (name, data) = &chunks[(r * 7 + j * 13) % chunks.len()];
                match az.get(name).await {
                    Ok(Some(b)) if b == *data => {}
                    Ok(Some(b)) => wrong.push(format!("{name}: {} wrong bytes", b.len())),
                    other => wrong.push(format!("{name}: {other:?}")),
                }
                j += 1;
                since_kill += usize::from(was_killed);
            }
            (j, wrong)
        });
    }
    // Kill two nodes once the storm is under way.
    assert!(eventually(Duration::from_secs(60), || az.metrics().gets >= 120).await);
    let killed_at = az.metrics().gets;
    fleet[1].kill();
    fleet[4].kill();
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut reads, mut wrong) = (0, Vec::new());
    while let Some(r) = storm.join_next().await {
        let (n, w) = r.unwrap();
        reads += n;
        wrong.extend(w);
    }
    let m = az.metrics();
    println!(
        "storm: {} reads, two nodes killed after {killed_at}; hits {}, misses {}, rebuilds \
         from parity {}; killed nodes: {:?}, {:?}",
        m.gets, m.hits, m.misses, m.rebuilds, m.nodes[1], m.nodes[4]
    );
    assert!(
        wrong.is_empty(),
        "{} failed reads: {:?}",
        wrong.len(),
        wrong
    );
    assert_eq!(m.hits, reads as u64);
    assert!(reads >= readers * (per_reader.max(after_kill)));
    assert_eq!((m.misses, m.integrity_failures), (0, 0));
    assert!(
        m.rebuilds > 0,
        "no read needed parity after losing two nodes"
    );
    assert!(!m.nodes[1].up && !m.nodes[4].up);
    assert!(
        m.nodes
            .iter()
            .enumerate()
            .all(|(i, n)| n.up || i == 1 || i == 4)
    );
}

/// Sequential reads of `chunks`, each checked; their latencies, sorted.
async fn timed_reads(az: &AzClient, chunks: &[(ChunkName, Bytes)], n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let (name, data) = &chunks[i % chunks.len()];
        let t = Instant::now();
        let got = az.get(name).await.unwrap();
        lat.push(t.elapsed());
        assert_eq!(got.as_ref(), Some(data), "read {i}");
    }
    lat.sort();
    lat
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_does_not_slow_reads() {
    let Some(fleet) = common::fleet(6) else {
        return;
    };
    let timeout = Duration::from_secs(1);
    let az = AzClient::new(common::config(&fleet, timeout)).unwrap();
    let chunks: Vec<_> = (100..124u64).map(|i| chunk(i, CHUNK)).collect();
    put_all(&az, &chunks).await;
    timed_reads(&az, &chunks, chunks.len()).await;

    let all_up = timed_reads(&az, &chunks, 300).await;
    fleet[2].pause();
    let one_stopped = timed_reads(&az, &chunks, 300).await;
    // Requests to the stopped node time out in the background, a second after they
    // were sent, and it is marked down.
    let down = eventually(Duration::from_secs(3), || !az.metrics().nodes[2].up).await;
    fleet[2].resume();

    let show = |l: &[Duration]| {
        format!(
            "p50 {:?}, p99 {:?}, max {:?}",
            quantile(l, 500),
            quantile(l, 990),
            l[l.len() - 1]
        )
    };
    println!(
        "512 KiB reads, k=4 m=2, debug build: all nodes up: {}; one node SIGSTOPped: {}",
        show(&all_up),
        show(&one_stopped)
    );
    let m = az.metrics();
    assert!(down && m.nodes[2].timeouts >= 3, "{:?}", m.nodes[2]);
    assert_eq!(m.misses, 0);
    // A read never waits for the stopped node: waiting would take the node timeout.
    assert!(
        quantile(&one_stopped, 990) < timeout,
        "{}",
        show(&one_stopped)
    );
}

/// The stripe `bytes` with payload byte `at` changed and a checksum that matches.
fn forge(stripe: &[u8], at: usize) -> Vec<u8> {
    let mut b = stripe.to_vec();
    b[48 + at] ^= 0xff;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..44]), &b[48..]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_stripes_are_caught_rebuilt_around_and_repaired() {
    let Some(fleet) = common::fleet(6) else {
        return;
    };
    let az = AzClient::new(common::config(&fleet, Duration::from_secs(3))).unwrap();
    let (a, data_a) = chunk(201, CHUNK);
    let (b, _) = chunk(202, CHUNK);
    put_all(&az, &[(a, data_a.clone()), (b, chunk(202, CHUNK).1)]).await;
    let key_a = az.key(&a);
    let place: Vec<String> = az.placement(&a).into_iter().map(String::from).collect();
    let mut conns = Vec::new();
    for addr in &place {
        conns.push(Connection::connect(addr, 2 << 20).await.unwrap());
    }
    // The node holding stripe 0, a data stripe: reads without it need parity.
    let victim = place[0].clone();
    let truth = conns[0].get(&key_a).await.unwrap().unwrap();
    assert_eq!(Stripe::parse(truth.clone()).unwrap().index(), 0);

    // 1. Garbage in place of the stripe.
    conns[0]
        .set(&key_a, 0, &lode_testkit::seeded_bytes(1000, 9))
        .await
        .unwrap();
    assert_eq!(az.get(&a).await.unwrap(), Some(data_a.clone()));
    assert!(eventually(Duration::from_secs(5), || az.metrics().repairs == 1).await);
    let m = az.metrics();
    assert_eq!(node(&m, &victim).integrity_failures, 1);
    assert_eq!((m.hits, m.rebuilds, m.integrity_failures), (1, 1, 0));
    assert_eq!(conns[0].get(&key_a).await.unwrap(), Some(truth.clone()));

    // 2. A valid stripe of another chunk.
    let of_b = conns[0].get(&az.key(&b)).await.unwrap().unwrap();
    conns[0].set(&key_a, 0, &of_b).await.unwrap();
    assert_eq!(az.get(&a).await.unwrap(), Some(data_a.clone()));
    assert!(eventually(Duration::from_secs(5), || az.metrics().repairs == 2).await);
    let m = az.metrics();
    assert_eq!(node(&m, &victim).integrity_failures, 2);
    assert_eq!((m.hits, m.rebuilds, m.integrity_failures), (2, 2, 0));
    assert_eq!(conns[0].get(&key_a).await.unwrap(), Some(truth.clone()));

    // 3. A forgery: this chunk's header, a valid checksum, one payload byte wrong. Only
    //    the name check of the rebuilt chunk can catch it.
    conns[0].set(&key_a, 0, &forge(&truth, 1000)).await.unwrap();
    // 3a. With the two parity stripes gone, the forgery is one of the only k stripes:
    //     nothing checks out, so the read is a counted miss.
    let parity4 = conns[4].get(&key_a).await.unwrap().unwrap();
    assert!(conns[4].delete(&key_a).await.unwrap());
    assert!(conns[5].delete(&key_a).await.unwrap());
    assert_eq!(az.get(&a).await.unwrap(), None);
    let m = az.metrics();
    assert_eq!((m.misses, m.integrity_failures), (1, 1));
    // 3b. Parity stripe 4 back, on a node paused while the read starts, so it arrives
    //     after the first k: the read waits for it, tries the other combinations, and
    //     finds the forgery.
    conns[4].set(&key_a, 0, &parity4).await.unwrap();
    let slow = &fleet[position(&fleet, &place[4])];
    slow.pause();
    let read = tokio::spawn({
        let az = az.clone();
        async move { az.get(&a).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    slow.resume();
    assert_eq!(read.await.unwrap().unwrap(), Some(data_a.clone()));
    // The forged stripe (node 0) and the missing one (node 5) are written back.
    assert!(eventually(Duration::from_secs(5), || az.metrics().repairs == 4).await);
    let m = az.metrics();
    println!("after corruption: {m:?}");
    assert_eq!(node(&m, &victim).integrity_failures, 3);
    assert_eq!(
        (m.hits, m.misses, m.rebuilds, m.integrity_failures),
        (3, 1, 3, 2)
    );
    assert_eq!(conns[0].get(&key_a).await.unwrap(), Some(truth));
    assert!(conns[5].get(&key_a).await.unwrap().is_some());
    assert_eq!(az.get(&a).await.unwrap(), Some(data_a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_node_down_a_get_is_a_quick_miss() {
    let Some(mut fleet) = common::fleet(6) else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let mut cfg = common::config(&fleet, timeout);
    cfg.down_after = 2;
    cfg.retry_down_after = Duration::from_secs(60);
    let az = AzClient::new(cfg.clone()).unwrap();
    let (a, data) = chunk(300, CHUNK);
    az.put(&a, data).await.unwrap();

    // Every node hung: a get waits no longer than the node timeout.
    for n in &fleet {
        n.pause();
    }
    for i in 0..2 {
        let t = Instant::now();
        assert_eq!(az.get(&a).await.unwrap(), None);
        let took = t.elapsed();
        println!("all nodes stopped, get {i}: a miss in {took:?}");
        assert!(took < timeout + Duration::from_secs(1), "{took:?}");
    }
    // Then all are marked down, and a get is a miss at once, without any I/O.
    assert!(
        eventually(Duration::from_secs(2), || az
            .metrics()
            .nodes
            .iter()
            .all(|n| !n.up))
        .await
    );
    let t = Instant::now();
    assert_eq!(az.get(&a).await.unwrap(), None);
    let took = t.elapsed();
    println!("all nodes marked down: a miss in {took:?}");
    assert!(took < timeout, "{took:?}");

    // Every node dead (connections refused): a fresh client misses at once too.
    for n in &mut fleet {
        n.kill();
    }
    let az = AzClient::new(cfg).unwrap();
    let t = Instant::now();
    assert_eq!(az.get(&a).await.unwrap(), None);
    let took = t.elapsed();
    println!("all nodes killed: a miss in {took:?}");
    assert!(took < timeout, "{took:?}");
    assert!(az.put(&a, chunk(300, CHUNK).1).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_comes_back_is_used_after_the_probe_interval() {
    let Some(fleet) = common::fleet(6) else {
        return;
    };
    let timeout = Duration::from_millis(300);
    let retry = Duration::from_millis(1500);
    let mut cfg = common::config(&fleet, timeout);
    cfg.down_after = 2;
    cfg.retry_down_after = retry;
    let az = AzClient::new(cfg).unwrap();
    let chunks: Vec<_> = (400..408u64).map(|i| chunk(i, CHUNK)).collect();
    put_all(&az, &chunks).await;
    let x = fleet[3].addr().to_string();

    // Stopped: reads go on without it until it is marked down.
    fleet[3].pause();
    let start = Instant::now();
    let mut i = 0;
    let down_seen = loop {
        let (name, data) = &chunks[i % chunks.len()];
        assert_eq!(az.get(name).await.unwrap().as_ref(), Some(data));
        if !node(&az.metrics(), &x).up {
            break Instant::now();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never marked down"
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Let every request sent to it before that time out, then bring it back.
    tokio::time::sleep(timeout + Duration::from_millis(100)).await;
    fleet[3].resume();
    let before = node(&az.metrics(), &x).hits;
    // Within the retry interval it is skipped, though it is back.
    timed_reads(&az, &chunks, chunks.len()).await;
    assert!(
        down_seen.elapsed() < retry,
        "the test was too slow to check this"
    );
    let m = az.metrics();
    assert!(!node(&m, &x).up);
    assert_eq!(node(&m, &x).hits, before);

    // After it, a read starts a probe, the probe finds the node, and reads use it.
    tokio::time::sleep((down_seen + retry).saturating_duration_since(Instant::now())).await;
    let back = Instant::now();
    while !node(&az.metrics(), &x).up {
        assert!(back.elapsed() < Duration::from_secs(5), "never probed back");
        let (name, data) = &chunks[0];
        assert_eq!(az.get(name).await.unwrap().as_ref(), Some(data));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    timed_reads(&az, &chunks, chunks.len()).await;
    // Its answers to the last round of reads may still be on their way.
    assert!(
        eventually(Duration::from_secs(2), || node(&az.metrics(), &x).hits
            > before)
        .await
    );
    let m = az.metrics();
    println!("back: {:?}", node(&m, &x));
    assert_eq!(node(&m, &x).marked_down, 1);
    assert_eq!(m.misses, 0);
}

/// A cache node that lies: it accepts every `set` and answers each `get` with the next
/// of several protocol violations or non-stripes.
async fn hostile_node() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let turn = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let turn = Arc::clone(&turn);
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut rd = BufReader::new(rd);
                let mut line = String::new();
                loop {
                    line.clear();
                    if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words.as_slice() {
                        ["set", _, _, _, len] => {
                            let mut data = vec![0u8; len.parse::<usize>().unwrap() + 2];
                            if rd.read_exact(&mut data).await.is_err() {
                                return;
                            }
                            let _ = wr.write_all(b"STORED\r\n").await;
                        }
                        ["get", key] => {
                            let t = turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let reply: Vec<u8> = match t % 6 {
                                0 => format!("VALUE {key} 0 99999999999\r\n").into(),
                                1 => vec![b'x'; 4096],
                                2 => format!("VALUE {key} 0 10\r\n0123456789\r\nEND\r\n").into(),
                                3 => b"VALUE other 0 1\r\nx\r\nEND\r\n".to_vec(),
                                4 => format!("VALUE {key} 0 5\r\nab").into(),
                                _ => return,
                            };
                            if wr.write_all(&reply).await.is_err() {
                                return;
                            }
                            if t % 6 == 4 {
                                // A value cut short: the connection just stops.
                                tokio::time::sleep(Duration::from_secs(30)).await;
                            }
                        }
                        ["version"] => {
                            let _ = wr.write_all(b"VERSION hostile\r\n").await;
                        }
                        _ => {
                            let _ = wr.write_all(b"ERROR\r\n").await;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_node_cannot_break_reads() {
    let Some(fleet) = common::fleet(5) else {
        return;
    };
    let liar = hostile_node().await;
    let mut cfg = common::config(&fleet, Duration::from_millis(500));
    cfg.nodes.push(liar.clone());
    // Keep asking it, to see every kind of lie.
    cfg.down_after = 1000;
    let az = AzClient::new(cfg).unwrap();
    let chunks: Vec<_> = (500..506u64).map(|i| chunk(i, CHUNK)).collect();
    put_all(&az, &chunks).await;
    for _ in 0..3 {
        timed_reads(&az, &chunks, chunks.len()).await;
    }
    let m = az.metrics();
    let l = node(&m, &liar);
    println!("hostile node: {l:?}");
    assert_eq!((m.hits, m.misses), (18, 0));
    assert_eq!(l.hits, 0);
    assert!(l.errors >= 3, "{l:?}");
    assert!(l.integrity_failures >= 1, "{l:?}");
}
