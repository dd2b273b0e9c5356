//! One suite of memcached text-protocol checks, run against lode's node and against a
//! real memcached 1.6 (`memcached -l 127.0.0.1 -p PORT -U 0 -I 2m -m 64`, started per
//! test and killed after). A check that passes against memcached and fails against
//! lode is a lode bug; the reverse is a bug in the check.
//!
//! Where the two legitimately differ the check is lode-only, at the end of the file,
//! with the reason: lode refuses keys with control characters and flags past 32 bits
//! (memcached stores or truncates them), writes `decr` results unpadded (memcached pads
//! a shrinking number with spaces), bounds `get` lines (memcached does not), puts its
//! item limit on the value (memcached's `-I` includes its item header), and reports
//! per-tier stats memcached does not have.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, TestNode};
use lode_testkit::{Memcached, seeded_bytes};

macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        mod lode {
            $(
                #[test]
                fn $check() {
                    let node = super::TestNode::start();
                    super::checks::$check(node.addr);
                }
            )*
        }
        mod memcached {
            $(
                #[test]
                fn $check() {
                    let Some(server) = super::Memcached::start(64) else { return };
                    super::checks::$check(server.addr());
                }
            )*
        }
    };
}

suite!(
    version_ignores_arguments,
    set_get_binary_values_and_flags,
    get_many_keys_in_order,
    gets_returns_cas_uniques,
    cas_command,
    add_and_replace,
    append_and_prepend_keep_flags,
    delete_forms,
    touch_and_gat,
    incr_and_decr,
    noreply_is_silent,
    relative_exptime_expires,
    negative_and_absolute_exptime,
    flush_all_now_and_delayed,
    unknown_commands_are_error,
    malformed_arguments_are_client_error,
    value_longer_than_announced_is_bad_data_chunk,
    too_large_value_is_refused_and_swallowed,
    one_mib_value_round_trips,
    pipelined_requests_answer_in_order,
    largest_key_works,
    quit_closes,
    verbosity_is_accepted,
    stats_has_standard_fields_that_count,
    endless_line_closes_only_that_connection,
    huge_get_is_answered_or_refused,
    client_gone_mid_value_stores_nothing,
);

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

mod checks {
    use super::*;

    pub fn version_ignores_arguments(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        let v = c.call("version\r\n");
        assert!(v.starts_with("VERSION 1.6"), "{v}");
        assert!(c.call("version foo bar\r\n").starts_with("VERSION "));
        assert!(c.call("version noreply\r\n").starts_with("VERSION "));
    }

    pub fn set_get_binary_values_and_flags(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        let mut data = seeded_bytes(70_000, 1);
        // Protocol bytes inside a value mean nothing.
        data[10..17].copy_from_slice(b"\r\nEND\r\n");
        data[100] = 0;
        assert_eq!(c.store("set", "bin", u32::MAX, 0, &data), "STORED");
        let got = c.get_multi("get", &["bin"]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].flags, u32::MAX);
        assert_eq!(got[0].data, data);
        assert_eq!(got[0].cas, None);
        assert_eq!(c.store("set", "empty", 7, 0, b""), "STORED");
        let got = c.get_multi("get", &["empty"]);
        assert_eq!((got[0].flags, got[0].data.len()), (7, 0));
        // Overwrite.
        assert_eq!(c.set("bin", b"short"), "STORED");
        assert_eq!(c.get("bin").unwrap(), b"short");
        assert_eq!(c.get("missing"), None);
        // Keys may hold any printable byte, UTF-8 included.
        assert_eq!(c.set("caf\u{e9}:\u{1F980}", b"x"), "STORED");
        assert_eq!(c.get("caf\u{e9}:\u{1F980}").unwrap(), b"x");
    }

    pub fn get_many_keys_in_order(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        let keys: Vec<String> = (0..200).map(|i| format!("many:{i}")).collect();
        for (i, key) in keys.iter().enumerate() {
            if i % 3 != 0 {
                assert_eq!(c.set(key, key.as_bytes()), "STORED");
            }
        }
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let got = c.get_multi("get", &refs);
        let expected: Vec<&str> = refs
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, k)| *k)
            .collect();
        let got_keys: Vec<&str> = got.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(got_keys, expected);
        for v in &got {
            assert_eq!(v.data, v.key.as_bytes());
        }
        // The same key twice is answered twice; extra spaces are nothing.
        c.send(b"get many:1  many:1 \r\n");
        assert_eq!(c.values().len(), 2);
    }

    pub fn gets_returns_cas_uniques(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        c.set("a", b"1");
        c.set("b", b"2");
        let got = c.get_multi("gets", &["a", "b", "nope"]);
        assert_eq!(got.len(), 2);
        let (a, b) = (got[0].cas.unwrap(), got[1].cas.unwrap());
        assert_ne!(a, b);
        assert_eq!(
            c.gets("a").unwrap().cas,
            Some(a),
            "a read changes no unique"
        );
        c.set("a", b"1");
        assert_ne!(
            c.gets("a").unwrap().cas,
            Some(a),
            "a write changes the unique"
        );
    }

    pub fn cas_command(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        assert_eq!(c.call("cas nope 0 0 1 5\r\nx\r\n"), "NOT_FOUND");
        c.set("k", b"v1");
        let unique = c.gets("k").unwrap().cas.unwrap();
        assert_eq!(c.call(&format!("cas k 3 0 2 {unique}\r\nv2\r\n")), "STORED");
        assert_eq!(c.call(&format!("cas k 3 0 2 {unique}\r\nv3\r\n")), "EXISTS");
        let v = c.gets("k").unwrap();
        assert_eq!((v.flags, v.data.as_slice()), (3, b"v2".as_slice()));
        c.send(format!("cas k 0 0 2 {} noreply\r\nv4\r\n", v.cas.unwrap()).as_bytes());
        assert_eq!(c.get("k").unwrap(), b"v4");
    }

    pub fn add_and_replace(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        assert_eq!(c.store("replace", "k", 0, 0, b"x"), "NOT_STORED");
        assert_eq!(c.get("k"), None);
        assert_eq!(c.store("add", "k", 1, 0, b"first"), "STORED");
        assert_eq!(c.store("add", "k", 2, 0, b"second"), "NOT_STORED");
        assert_eq!(c.get("k").unwrap(), b"first");
        assert_eq!(c.store("replace", "k", 9, 0, b"third"), "STORED");
        let v = c.get_multi("get", &["k"]);
        assert_eq!((v[0].flags, v[0].data.as_slice()), (9, b"third".as_slice()));
    }

    pub fn append_and_prepend_keep_flags(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        assert_eq!(c.store("append", "k", 0, 0, b"x"), "NOT_STORED");
        assert_eq!(c.store("prepend", "k", 0, 0, b"x"), "NOT_STORED");
        assert_eq!(c.store("set", "k", 5, 0, b"mid"), "STORED");
        assert_eq!(c.store("append", "k", 9, 0, b">>"), "STORED");
        assert_eq!(c.store("prepend", "k", 9, 0, b"<<"), "STORED");
        let v = c.get_multi("get", &["k"]);
        assert_eq!(
            (v[0].flags, v[0].data.as_slice()),
            (5, b"<<mid>>".as_slice())
        );
    }

    pub fn delete_forms(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        c.set("k", b"v");
        assert_eq!(c.call("delete k\r\n"), "DELETED");
        assert_eq!(c.call("delete k\r\n"), "NOT_FOUND");
        c.set("k", b"v");
        assert_eq!(c.call("delete k 0\r\n"), "DELETED");
        assert_eq!(
            c.call("delete k 5\r\n"),
            "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]"
        );
        assert_eq!(c.call("delete\r\n"), "ERROR");
        assert_eq!(c.call("delete a b c d e\r\n"), "ERROR");
        c.set("k", b"v");
        c.send(b"delete k 0 noreply\r\n");
        assert_eq!(c.get("k"), None);
    }

    pub fn touch_and_gat(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        assert_eq!(c.call("touch nope 10\r\n"), "NOT_FOUND");
        c.store("set", "k", 4, 0, b"v");
        assert_eq!(c.call("touch k 100\r\n"), "TOUCHED");
        assert_eq!(
            c.call("touch k abc\r\n"),
            "CLIENT_ERROR invalid exptime argument"
        );
        assert_eq!(c.call("touch k\r\n"), "ERROR");
        c.send(b"gat 100 k nope\r\n");
        let v = c.values();
        assert_eq!(v.len(), 1);
        assert_eq!(
            (v[0].flags, v[0].data.as_slice(), v[0].cas),
            (4, b"v".as_slice(), None)
        );
        c.send(b"gats 100 k\r\n");
        let unique = c.values()[0].cas.expect("gats gives a unique");
        assert_eq!(c.gets("k").unwrap().cas, Some(unique));
        assert_eq!(c.call("gat\r\n"), "ERROR");
        assert_eq!(
            c.call("gat x k\r\n"),
            "CLIENT_ERROR invalid exptime argument"
        );
        // Touching into the past expires the item.
        assert_eq!(c.call("touch k -1\r\n"), "TOUCHED");
        assert_eq!(c.get("k"), None);
        c.set("g", b"v");
        c.send(b"gat -1 g\r\n");
        assert_eq!(c.values().len(), 1, "gat answers with the value it expires");
        assert_eq!(c.get("g"), None);
    }

    pub fn incr_and_decr(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        assert_eq!(c.call("incr nope 1\r\n"), "NOT_FOUND");
        assert_eq!(c.call("decr nope 1\r\n"), "NOT_FOUND");
        c.set("n", b"10");
        assert_eq!(c.call("incr n 5\r\n"), "15");
        assert_eq!(c.call("incr n 00001\r\n"), "16");
        assert_eq!(c.get("n").unwrap(), b"16");
        assert_eq!(c.call("incr n 100\r\n"), "116");
        assert_eq!(c.get("n").unwrap(), b"116");
        assert_eq!(c.call("decr n 16\r\n"), "100");
        assert_eq!(c.call("decr n 1000\r\n"), "0", "decr stops at 0");
        c.set("max", u64::MAX.to_string().as_bytes());
        assert_eq!(c.call("incr max 2\r\n"), "1", "incr wraps at 2^64");
        c.set("pad", b" 5 ");
        assert_eq!(
            c.call("incr pad 1\r\n"),
            "6",
            "surrounding spaces are allowed"
        );
        for bad in [&b"abc"[..], b"-11", b"", b"123456789012345678901", b"12a"] {
            c.set("bad", bad);
            assert_eq!(
                c.call("incr bad 1\r\n"),
                "CLIENT_ERROR cannot increment or decrement non-numeric value",
                "value {:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            c.call("incr n abc\r\n"),
            "CLIENT_ERROR invalid numeric delta argument"
        );
        assert_eq!(
            c.call("incr n -1\r\n"),
            "CLIENT_ERROR invalid numeric delta argument"
        );
        assert_eq!(
            c.call("incr n 18446744073709551616\r\n"),
            "CLIENT_ERROR invalid numeric delta argument"
        );
        assert_eq!(c.call("incr n\r\n"), "ERROR");
        c.store("set", "f", 12, 0, b"1");
        c.call("incr f 1\r\n");
        assert_eq!(
            c.get_multi("get", &["f"])[0].flags,
            12,
            "flags survive incr"
        );
    }

    pub fn noreply_is_silent(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        c.send(b"set a 0 0 1 noreply\r\n1\r\n");
        c.send(b"add a 0 0 1 noreply\r\n2\r\n");
        c.send(b"add b 0 0 1 noreply\r\n2\r\n");
        c.send(b"replace b 0 0 1 noreply\r\n3\r\n");
        c.send(b"replace nope 0 0 1 noreply\r\n3\r\n");
        c.send(b"append a 0 0 1 noreply\r\n4\r\n");
        c.send(b"prepend a 0 0 1 noreply\r\n5\r\n");
        c.send(b"cas a 0 0 1 1 noreply\r\n6\r\n");
        c.send(b"incr b 1 noreply\r\n");
        c.send(b"decr b 1 noreply\r\n");
        c.send(b"touch b 100 noreply\r\n");
        c.send(b"delete nope noreply\r\n");
        c.send(b"verbosity 1 noreply\r\n");
        // Errors on a noreply line stay silent too.
        c.send(b"set k 0 0 abc noreply\r\n");
        c.send(b"incr b abc noreply\r\n");
        assert!(
            c.call("version\r\n").starts_with("VERSION "),
            "nothing answered before"
        );
        assert_eq!(c.get("a").unwrap(), b"514");
        assert_eq!(c.get("b").unwrap(), b"3");
        c.send(b"flush_all noreply\r\n");
        assert_eq!(c.get("a"), None);
    }

    pub fn relative_exptime_expires(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        assert_eq!(c.store("set", "short", 0, 1, b"v"), "STORED");
        assert_eq!(c.store("set", "long", 0, 100, b"v"), "STORED");
        assert_eq!(c.get("short").unwrap(), b"v");
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(c.get("short"), None);
        assert_eq!(c.get("long").unwrap(), b"v");
        assert_eq!(c.store("add", "short", 0, 0, b"again"), "STORED");
    }

    pub fn negative_and_absolute_exptime(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        c.set("k", b"old");
        assert_eq!(c.store("set", "k", 0, -1, b"v"), "STORED");
        assert_eq!(
            c.get("k"),
            None,
            "negative: expired at once, old value gone too"
        );
        assert_eq!(c.call("delete k\r\n"), "NOT_FOUND");
        assert_eq!(c.store("add", "k", 0, 0, b"v"), "STORED");
        let now = unix_now();
        assert_eq!(c.store("set", "future", 0, now + 100, b"v"), "STORED");
        assert_eq!(c.get("future").unwrap(), b"v");
        assert_eq!(c.store("set", "past", 0, now - 100, b"v"), "STORED");
        assert_eq!(c.get("past"), None);
        // 30 days is still relative; one second more is an absolute time in 1970.
        assert_eq!(c.store("set", "month", 0, 2_592_000, b"v"), "STORED");
        assert_eq!(c.get("month").unwrap(), b"v");
        assert_eq!(c.store("set", "epoch", 0, 2_592_001, b"v"), "STORED");
        assert_eq!(c.get("epoch"), None);
    }

    pub fn flush_all_now_and_delayed(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        c.set("a", b"1");
        assert_eq!(c.call("flush_all\r\n"), "OK");
        assert_eq!(c.get("a"), None);
        assert_eq!(c.call("flush_all 0\r\n"), "OK");
        assert_eq!(
            c.call("flush_all abc\r\n"),
            "CLIENT_ERROR invalid exptime argument"
        );
        c.set("b", b"2");
        assert_eq!(c.call("flush_all 2\r\n"), "OK");
        assert_eq!(c.get("b").unwrap(), b"2", "a delayed flush waits");
        std::thread::sleep(Duration::from_millis(3100));
        assert_eq!(c.get("b"), None);
        c.set("c", b"3");
        assert_eq!(c.get("c").unwrap(), b"3", "items after the flush stay");
    }

    pub fn unknown_commands_are_error(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        for bad in [
            "bogus",
            "",
            "   ",
            "GET k",
            "get",
            "gets",
            "set k 0 0",
            "set k 0 0 1 2 3 4",
            "cas k 0 0 1",
            "touch k",
            "stats bogus",
            "stats noreply",
            "verbosity",
            "verbosity a b c",
        ] {
            assert_eq!(c.call(&format!("{bad}\r\n")), "ERROR", "request {bad:?}");
        }
        // A bare \n ends a line too.
        c.send(b"bogus\n");
        assert_eq!(c.line(), "ERROR");
        assert_eq!(c.call("get k\n"), "END");
    }

    pub fn malformed_arguments_are_client_error(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        let bad_format = "CLIENT_ERROR bad command line format";
        let long = "k".repeat(251);
        assert_eq!(c.call(&format!("get {long}\r\n")), bad_format);
        assert_eq!(c.call(&format!("get ok {long} ok\r\n")), bad_format);
        // The data block of a refused set is then read as a command.
        assert_eq!(c.call(&format!("set {long} 0 0 1\r\n")), bad_format);
        assert_eq!(c.call("x\r\n"), "ERROR");
        for bad in [
            "set k 0 0 -1",
            "set k 0 0 abc",
            "set k -1 0 1",
            "set k abc 0 1",
            "set k 0 abc 1",
            "set k 0 0 2147483648",
            "cas k 0 0 1 abc",
            "append k 0 0 abc",
        ] {
            assert_eq!(c.call(&format!("{bad}\r\n")), bad_format, "request {bad:?}");
        }
        assert_eq!(c.get("k"), None);
    }

    pub fn value_longer_than_announced_is_bad_data_chunk(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        // Five bytes announced, six sent: the block is the announced length plus two,
        // and "X\r" is not "\r\n". The "\n" left over is an empty line.
        c.send(b"set k 0 0 5\r\nhelloX\r\nget k\r\n");
        assert_eq!(c.line(), "CLIENT_ERROR bad data chunk");
        assert_eq!(c.line(), "ERROR");
        assert_eq!(c.line(), "END");
        // A block ended by a bare \n is not ended right either: the block is "x\ng",
        // and "et k" is then read as a command.
        c.send(b"set k 0 0 1\nx\nget k\n");
        assert_eq!(c.line(), "CLIENT_ERROR bad data chunk");
        assert_eq!(c.line(), "ERROR");
        assert_eq!(c.get("k"), None);
    }

    pub fn too_large_value_is_refused_and_swallowed(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        c.set("k", b"old");
        let big = vec![b'x'; 3_000_000];
        assert_eq!(
            c.store("set", "k", 0, 0, &big),
            "SERVER_ERROR object too large for cache"
        );
        // The refused data was read and dropped, not parsed; a refused set also drops
        // the old value.
        assert_eq!(c.get("k"), None);
        c.set("other", b"v");
        assert_eq!(
            c.store("add", "other", 0, 0, &big),
            "SERVER_ERROR object too large for cache"
        );
        assert_eq!(
            c.get("other").unwrap(),
            b"v",
            "only set drops the old value"
        );
    }

    pub fn one_mib_value_round_trips(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        let data = seeded_bytes(1 << 20, 7);
        assert_eq!(c.set("mib", &data), "STORED");
        assert_eq!(c.get("mib").unwrap(), data);
    }

    pub fn pipelined_requests_answer_in_order(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        let mut batch = Vec::new();
        for i in 0..100usize {
            batch.extend_from_slice(format!("set p{i} {i} 0 {}\r\n", i * 10).as_bytes());
            let byte = b'a' + u8::try_from(i % 26).unwrap();
            batch.extend_from_slice(&vec![byte; i * 10]);
            batch.extend_from_slice(b"\r\n");
            batch.extend_from_slice(format!("get p{i} p{}\r\n", i + 1000).as_bytes());
            batch.extend_from_slice(b"bogus\r\n");
        }
        batch.extend_from_slice(b"version\r\n");
        c.send(&batch);
        for i in 0..100usize {
            assert_eq!(c.line(), "STORED");
            let v = c.values();
            assert_eq!(v.len(), 1);
            assert_eq!(v[0].flags, u32::try_from(i).unwrap());
            assert_eq!(v[0].data.len(), i * 10);
            assert_eq!(c.line(), "ERROR");
        }
        assert!(c.line().starts_with("VERSION "));
    }

    pub fn largest_key_works(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        let key = "k".repeat(250);
        assert_eq!(c.set(&key, b"v"), "STORED");
        assert_eq!(c.get(&key).unwrap(), b"v");
        assert_eq!(c.call(&format!("delete {key}\r\n")), "DELETED");
    }

    pub fn quit_closes(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        c.set("k", b"v");
        c.send(b"get k\r\nquit\r\nget k\r\n");
        assert_eq!(c.values().len(), 1);
        let (closed, after) = c.closed_after();
        assert!(
            closed && after.is_empty(),
            "quit answers nothing more: {after:?}"
        );
    }

    pub fn verbosity_is_accepted(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        assert_eq!(c.call("verbosity 1\r\n"), "OK");
        assert_eq!(c.call("verbosity 0\r\n"), "OK");
        c.send(b"verbosity noreply\r\n");
        assert!(c.call("version\r\n").starts_with("VERSION "));
    }

    pub fn stats_has_standard_fields_that_count(addr: SocketAddr) {
        let mut c = Client::connect(addr);
        let before = c.stats();
        for field in [
            "pid",
            "uptime",
            "time",
            "version",
            "curr_connections",
            "total_connections",
            "cmd_get",
            "cmd_set",
            "cmd_flush",
            "cmd_touch",
            "get_hits",
            "get_misses",
            "get_expired",
            "delete_hits",
            "delete_misses",
            "incr_hits",
            "incr_misses",
            "decr_hits",
            "decr_misses",
            "cas_hits",
            "cas_misses",
            "cas_badval",
            "touch_hits",
            "touch_misses",
            "bytes_read",
            "bytes_written",
            "limit_maxbytes",
            "bytes",
            "curr_items",
            "total_items",
            "evictions",
            "reclaimed",
            "max_connections",
            "pointer_size",
        ] {
            assert!(before.contains_key(field), "stats lacks {field}");
        }
        assert!(before["pid"].parse::<u32>().is_ok());
        let n = |s: &std::collections::HashMap<String, String>, k: &str| -> u64 {
            s[k].parse().unwrap()
        };
        c.set("s1", b"12345");
        c.set("s2", b"x");
        c.get_multi("get", &["s1", "s2", "nope"]);
        c.call("delete s2\r\n");
        c.call("delete s2\r\n");
        let after = c.stats();
        assert_eq!(n(&after, "cmd_set") - n(&before, "cmd_set"), 2);
        assert_eq!(n(&after, "cmd_get") - n(&before, "cmd_get"), 3);
        assert_eq!(n(&after, "get_hits") - n(&before, "get_hits"), 2);
        assert_eq!(n(&after, "get_misses") - n(&before, "get_misses"), 1);
        assert_eq!(n(&after, "delete_hits") - n(&before, "delete_hits"), 1);
        assert_eq!(n(&after, "delete_misses") - n(&before, "delete_misses"), 1);
        assert_eq!(n(&after, "curr_items"), 1);
        assert_eq!(n(&after, "total_items") - n(&before, "total_items"), 2);
        assert!(n(&after, "bytes") > 5);
        assert!(n(&after, "curr_connections") >= 1);
        assert_eq!(c.call("stats reset\r\n"), "RESET");
        assert_eq!(n(&c.stats(), "get_hits"), 0);
    }

    pub fn endless_line_closes_only_that_connection(addr: SocketAddr) {
        let mut good = Client::connect(addr);
        good.set("k", b"v");
        let mut bad = Client::connect(addr);
        // 100 KiB with no newline, sent in pieces: the server gives up on the line.
        let junk = vec![b'z'; 4096];
        for _ in 0..25 {
            if !bad.try_send(&junk) {
                break;
            }
        }
        let (closed, lines) = bad.closed_after();
        assert!(closed, "connection left open after an endless line");
        assert!(lines.len() <= 1, "at most one error line: {lines:?}");
        assert_eq!(good.get("k").unwrap(), b"v");
    }

    pub fn huge_get_is_answered_or_refused(addr: SocketAddr) {
        let mut good = Client::connect(addr);
        good.set("k", b"v");
        let mut bad = Client::connect(addr);
        let mut line = b"get".to_vec();
        for i in 0..40_000 {
            line.extend_from_slice(format!(" nokey{i}").as_bytes());
        }
        line.extend_from_slice(b"\r\n");
        let sent = bad.try_send(&line);
        let (closed, lines) = bad.closed_after_or_answer();
        // memcached answers END (no limit on get lines); lode refuses the line and
        // closes. Either way nothing else, and other clients go on.
        assert!(
            (lines == ["END"] && !closed) || (closed && lines.len() <= 1) || !sent,
            "closed {closed}, lines {lines:?}"
        );
        assert_eq!(good.get("k").unwrap(), b"v");
    }

    pub fn client_gone_mid_value_stores_nothing(addr: SocketAddr) {
        let mut good = Client::connect(addr);
        {
            let mut gone = Client::connect(addr);
            gone.send(b"set half 0 0 100000\r\n");
            gone.send(&vec![b'x'; 1000]);
            // Also a value shorter than announced, then gone.
            let mut short = Client::connect(addr);
            short.send(b"set short 0 0 10\r\nabc\r\n");
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(good.get("half"), None);
        assert_eq!(good.get("short"), None);
        good.set("after", b"v");
        assert_eq!(good.get("after").unwrap(), b"v");
    }
}

// ---- lode only -------------------------------------------------------------------

mod lode_only {
    use super::*;
    use lode_cache_node::NodeConfig;

    /// memcached stores keys with control characters (it checks only the length); lode
    /// refuses them, as the memcached protocol's key grammar asks.
    #[test]
    fn control_characters_in_keys_are_refused() {
        let node = TestNode::start();
        let mut c = node.client();
        for key in ["a\x01b", "tab\there", "del\x7f"] {
            assert_eq!(
                c.call(&format!("set {key} 0 0 1\r\n")),
                "CLIENT_ERROR bad command line format"
            );
            assert_eq!(c.call("x\r\n"), "ERROR");
            assert_eq!(
                c.call(&format!("get {key}\r\n")),
                "CLIENT_ERROR bad command line format"
            );
        }
    }

    /// memcached truncates flags past 2³²−1 (`set k 99999999999 ...` is STORED with
    /// other flags); lode refuses the line.
    #[test]
    fn flags_past_32_bits_are_refused() {
        let node = TestNode::start();
        let mut c = node.client();
        assert_eq!(
            c.call("set k 4294967296 0 1\r\n"),
            "CLIENT_ERROR bad command line format"
        );
    }

    /// memcached keeps a shrinking number's length and pads it with spaces ("10" decr 1
    /// reads back as "9 "); lode stores the digits alone.
    #[test]
    fn decr_results_are_not_padded() {
        let node = TestNode::start();
        let mut c = node.client();
        c.set("n", b"10");
        assert_eq!(c.call("decr n 1\r\n"), "9");
        assert_eq!(c.get("n").unwrap(), b"9");
    }

    /// lode's limit is on the value: exactly `item_size_limit` bytes are stored, one
    /// more is refused. (memcached's `-I` counts its item header and key as well, so
    /// its boundary is not at a round value size.)
    #[test]
    fn item_size_limit_is_exact_and_configurable() {
        for limit in [1 << 20, 2 << 20] {
            let node = TestNode::start_with(NodeConfig {
                item_size_limit: limit,
                memory_bytes: Some(16 << 20),
                ..NodeConfig::default()
            });
            let mut c = node.client();
            let data = seeded_bytes(limit, 3);
            assert_eq!(c.set("at", &data), "STORED");
            assert_eq!(c.get("at").unwrap(), data);
            let over = seeded_bytes(limit + 1, 4);
            assert_eq!(
                c.set("over", &over),
                "SERVER_ERROR object too large for cache"
            );
            assert_eq!(c.get("over"), None);
            assert_eq!(node.stats().store_too_large, 1);
            assert_eq!(c.stat("item_size_max"), limit as u64);
        }
    }

    /// memcached reads `get` lines of any length; lode reads up to 64 KiB
    /// (`MAX_RETRIEVAL_LINE`) and closes past it, so one client cannot make the node
    /// buffer without bound.
    #[test]
    fn get_lines_are_bounded() {
        let node = TestNode::start();
        let mut c = node.client();
        let mut line = b"get".to_vec();
        while line.len() < lode_cache_node::protocol::MAX_RETRIEVAL_LINE - 20 {
            line.extend_from_slice(b" k");
        }
        line.extend_from_slice(b"\r\n");
        c.send(&line);
        assert_eq!(c.line(), "END", "just under the bound is served");
        let mut long = line.clone();
        long.truncate(long.len() - 2);
        long.extend_from_slice(&b" k".repeat(20));
        long.extend_from_slice(b"\r\n");
        let _ = c.try_send(&long);
        let (closed, lines) = c.closed_after();
        assert!(closed);
        assert_eq!(lines, ["CLIENT_ERROR line too long"]);
    }

    /// lode's own stats: each tier's figures and the policy (memcached has no tiers).
    #[test]
    fn stats_report_tiers() {
        let node = TestNode::start();
        let mut c = node.client();
        c.set("k", b"v");
        c.get("k");
        c.get("nope");
        let stats = c.stats();
        for tier in ["memory", "flash"] {
            for name in [
                "hits",
                "misses",
                "items",
                "bytes",
                "limit_maxbytes",
                "evictions",
                "demotions",
                "promotions",
            ] {
                assert!(
                    stats.contains_key(&format!("{tier}_{name}")),
                    "{tier}_{name}"
                );
            }
        }
        assert_eq!(stats["lode_policy"], "lru-2");
        assert_eq!(stats["memory_hits"], "1");
        assert_eq!(stats["memory_misses"], "1");
        assert_eq!(stats["memory_items"], "1");
        assert_eq!(stats["flash_limit_maxbytes"], "0");
        assert_eq!(stats["limit_maxbytes"], (64u64 << 20).to_string());
        let snapshot = node.stats();
        assert_eq!(snapshot.memory.hits, 1);
        assert_eq!(snapshot.curr_items, 1);
        assert_eq!(snapshot.get_misses, 1);
    }

    /// Past `max_connections` a client is told so and closed, as memcached does past
    /// `-c` (memcached's own floor on `-c` makes this slow to show there).
    #[test]
    fn connections_past_the_limit_are_refused() {
        let node = TestNode::start_with(NodeConfig {
            max_connections: 2,
            ..NodeConfig::default()
        });
        let mut a = node.client();
        let mut b = node.client();
        assert!(a.call("version\r\n").starts_with("VERSION"));
        assert!(b.call("version\r\n").starts_with("VERSION"));
        let mut c = node.client();
        let (closed, lines) = c.closed_after();
        assert!(closed);
        assert_eq!(lines, ["ERROR Too many open connections"]);
        drop(a);
        std::thread::sleep(Duration::from_millis(200));
        let mut d = node.client();
        assert!(d.call("version\r\n").starts_with("VERSION"));
        assert_eq!(node.stats().rejected_connections, 1);
    }
}
