//! The test network itself (`scripts/testnet.sh` through `TestNet`): hosts reach each
//! other over links with the delays asked for, and every fault does what it says and
//! goes away with `fault clear`. Root only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lode_testkit::{NetOptions, TestNet};

/// Serves one-byte echoes on `host`, port chosen by the kernel; its address.
fn echo(net: &TestNet, host: &str) -> SocketAddr {
    let listener = net.bind_tcp(host, 0);
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
            });
        }
    });
    addr
}

/// The median of `n` one-byte round trips from `host` to `to`, or the connect error.
fn rtt(net: &TestNet, host: &str, to: SocketAddr, n: usize) -> std::io::Result<Duration> {
    net.on_host(host, || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            times.push(t.elapsed());
        }
        times.sort();
        Ok(times[n / 2])
    })
}

#[test]
fn links_have_their_delays_and_faults_come_and_go() {
    let Some(net) = TestNet::up(&NetOptions {
        workers: 2,
        args: ["--origin-delay", "10ms", "--origin-jitter", "0"]
            .map(String::from)
            .to_vec(),
    }) else {
        return;
    };
    assert_eq!(net.addr("origin").octets()[3], 1);
    assert_eq!(net.addr("cache3").octets()[3], 13);
    assert_eq!(net.addr("worker2").octets()[3], 102);
    let cache = echo(&net, "cache3");
    let origin = echo(&net, "origin");

    // Two passes of 200 µs each way at least; no more than a loaded machine adds.
    let az = rtt(&net, "worker1", cache, 50).expect("worker1 to cache3");
    assert!(
        az >= Duration::from_micros(400) && az < Duration::from_millis(20),
        "{az:?}\n{}",
        net.status()
    );
    let s3 = rtt(&net, "worker2", origin, 10).expect("worker2 to the origin");
    assert!(
        s3 >= Duration::from_millis(20) && s3 < Duration::from_millis(60),
        "{s3:?}"
    );

    net.fault(&["slow", "cache3", "50ms"]);
    let slow = rtt(&net, "worker1", cache, 5).expect("worker1 to a slow cache3");
    assert!(slow >= Duration::from_millis(100), "{slow:?}");

    net.fault(&["partition", "cache3"]);
    let cut = rtt(&net, "worker1", cache, 1);
    assert!(cut.is_err(), "cache3 answered through a partition: {cut:?}");
    // Only cache3's link is cut.
    rtt(&net, "worker1", origin, 1).expect("the origin through cache3's partition");

    net.fault(&["clear", "cache3"]);
    let back = rtt(&net, "worker1", cache, 50).expect("cache3 after clear");
    assert!(back < Duration::from_millis(20), "{back:?}");
}

#[test]
fn down_leaves_no_namespace_behind() {
    let prefix = {
        let Some(net) = TestNet::up(&NetOptions {
            workers: 1,
            args: Vec::new(),
        }) else {
            return;
        };
        assert!(
            std::path::Path::new("/run/netns")
                .join(net.netns("worker1"))
                .exists()
        );
        net.prefix().to_owned()
    };
    let left: Vec<_> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}
