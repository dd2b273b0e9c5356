//! The real memcached starts, answers, pauses, resumes and dies.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use lode_testkit::Memcached;

/// `request`'s one-line answer, or `None` if none came within `timeout`.
fn ask(m: &Memcached, request: &str, timeout: Duration) -> Option<String> {
    let mut s = TcpStream::connect(m.addr()).ok()?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    Some(line)
}

#[test]
fn memcached_stores_pauses_resumes_and_is_killed() {
    let Some(mut m) = Memcached::start(16) else {
        return;
    };
    let long = Duration::from_secs(10);
    // An item over memcached's default 1 MiB limit: -I 2m is in force.
    let value = vec![b'x'; 1_500_000];
    let mut s = TcpStream::connect(m.addr()).unwrap();
    write!(s, "set big 0 0 {}\r\n", value.len()).unwrap();
    s.write_all(&value).unwrap();
    s.write_all(b"\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(line, "STORED\r\n");

    m.pause();
    assert_eq!(ask(&m, "version\r\n", Duration::from_millis(300)), None);
    m.resume();
    let version = ask(&m, "version\r\n", long).expect("an answer after SIGCONT");
    assert!(version.starts_with("VERSION "), "{version:?}");

    let addr = m.addr();
    m.kill();
    assert!(TcpStream::connect(addr).is_err(), "{addr} still accepts");
}

#[test]
fn two_servers_get_two_ports() {
    let (Some(a), Some(b)) = (Memcached::start(8), Memcached::start(8)) else {
        return;
    };
    assert_ne!(a.addr(), b.addr());
}
