//! The two tiers through the protocol: demotion instead of dropping, promotion on a
//! flash hit, flash eviction, scan resistance of LRU-K against plain LRU, the protocol
//! on items that live on flash, what a restart keeps, and start-up errors.

mod common;

use std::path::{Path, PathBuf};

use common::{Client, TestNode};
use lode_cache_node::{Node, NodeConfig, Policy};
use lode_testkit::seeded_bytes;

/// Stripe-sized values, as the AZ tier holds (512 KiB chunk, k = 4).
const STRIPE: usize = 128 * 1024;
/// What one stripe with a short key costs a tier (see `ITEM_OVERHEAD`), rounded up.
const SLOT: u64 = STRIPE as u64 + 96 + 16;

fn tiered(dir: &Path, memory_slots: u64, flash_slots: u64, policy: Policy) -> NodeConfig {
    NodeConfig {
        memory_bytes: Some(memory_slots * SLOT),
        flash_dir: Some(dir.to_path_buf()),
        flash_bytes: flash_slots * SLOT,
        item_size_limit: 256 * 1024,
        policy,
        ..NodeConfig::default()
    }
}

fn stripe(i: u64) -> Vec<u8> {
    seeded_bytes(STRIPE, i + 1)
}

fn key(i: u64) -> String {
    format!("v{i:02}")
}

#[test]
fn memory_victims_are_demoted_and_flash_hits_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(tiered(dir.path(), 4, 16, Policy::LruK(2)));
    let mut c = node.client();
    for i in 0..12 {
        assert_eq!(
            c.store("set", &key(i), u32::try_from(i).unwrap(), 0, &stripe(i)),
            "STORED"
        );
    }
    let s = node.stats();
    assert_eq!((s.memory.items, s.flash.items, s.curr_items), (4, 8, 12));
    assert_eq!(s.memory.demotions, 8);
    assert_eq!(s.flash.demotions, 8);
    assert_eq!(s.evictions, 0, "demoted, not dropped");
    assert!(s.memory.bytes <= s.memory.limit_bytes);
    node.settle();
    assert_eq!(node.stats().flash_pending_bytes, 0);
    // Every item reads back byte for byte, from whichever tier holds it.
    for i in 0..12 {
        let got = c.get_multi("get", &[&key(i)]);
        assert_eq!(got.len(), 1, "{} lost", key(i));
        assert_eq!(got[0].flags, u32::try_from(i).unwrap());
        assert!(got[0].data == stripe(i), "{} corrupted", key(i));
    }
    let s = node.stats();
    assert!(s.flash.hits >= 8, "{s:?}");
    assert_eq!(
        s.memory.promotions, s.flash.hits,
        "each flash hit was promoted"
    );
    assert_eq!(s.flash.promotions, s.memory.promotions);
    assert_eq!(s.curr_items, 12);
    // The items read last are in memory now.
    let before = node.stats().memory.hits;
    for i in 8..12 {
        assert!(c.get(&key(i)).is_some());
    }
    assert_eq!(node.stats().memory.hits - before, 4);
    // And the stats command says the same as the snapshot.
    let stats = c.stats();
    let s = node.stats();
    assert_eq!(stats["flash_hits"], s.flash.hits.to_string());
    assert_eq!(stats["memory_promotions"], s.memory.promotions.to_string());
    assert_eq!(stats["flash_items"], s.flash.items.to_string());
}

#[test]
fn flash_evicts_past_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(tiered(dir.path(), 4, 16, Policy::LruK(2)));
    let mut c = node.client();
    for i in 0..30 {
        assert_eq!(c.set(&key(i), &stripe(i)), "STORED");
    }
    let s = node.stats();
    assert_eq!((s.memory.items, s.flash.items), (4, 16));
    assert_eq!(s.flash.evictions, 10);
    assert_eq!(s.evictions, 10);
    assert!(s.flash.bytes <= s.flash.limit_bytes);
    node.settle();
    for i in 0..10 {
        assert_eq!(c.get(&key(i)), None, "{} should be evicted", key(i));
    }
    for i in 10..30 {
        assert!(c.get(&key(i)).unwrap() == stripe(i));
    }
    // Evicted items' files are gone: 16 records on disk at most.
    node.settle();
    assert!(item_files(dir.path()).len() <= 16);
}

/// Reads the hot keys twice each, then runs a one-pass scan — first writing and reading
/// 40 new keys once each, then reading 20 old keys (on flash) once each — and reports
/// how many of three hot-key reads memory answered afterwards.
fn hot_set_memory_hits_after_scans(policy: Policy) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(tiered(dir.path(), 4, 128, policy));
    let mut c = node.client();
    for i in 0..20 {
        c.set(&format!("old{i}"), &stripe(100 + i));
    }
    let hot = ["hot0", "hot1", "hot2"];
    for (i, k) in hot.iter().enumerate() {
        c.set(k, &stripe(200 + i as u64));
        c.get(k).unwrap();
        c.get(k).unwrap();
    }
    for i in 0..40 {
        let k = format!("scan{i}");
        c.set(&k, &stripe(300 + i));
        assert!(c.get(&k).is_some());
    }
    for i in 0..20 {
        assert!(c.get(&format!("old{i}")).is_some());
    }
    let before = node.stats();
    for (i, k) in hot.iter().enumerate() {
        assert!(c.get(k).unwrap() == stripe(200 + i as u64));
    }
    let after = node.stats();
    (
        after.memory.hits - before.memory.hits,
        after.flash.hits - before.flash.hits,
    )
}

#[test]
fn lru_k_keeps_the_hot_set_through_a_scan_and_lru_does_not() {
    let (memory_hits, flash_hits) = hot_set_memory_hits_after_scans(Policy::LruK(2));
    assert_eq!(
        (memory_hits, flash_hits),
        (3, 0),
        "LRU-2: the hot set stays in memory"
    );
    let (memory_hits, flash_hits) = hot_set_memory_hits_after_scans(Policy::Lru);
    assert_eq!(
        (memory_hits, flash_hits),
        (0, 3),
        "LRU: the scan pushed the hot set to flash"
    );
}

/// Every command works on an item that sits on flash, not only `get`.
#[test]
fn commands_work_on_items_on_flash() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(NodeConfig {
        memory_bytes: Some(4000),
        flash_dir: Some(dir.path().to_path_buf()),
        flash_bytes: 1 << 20,
        item_size_limit: 1024,
        ..NodeConfig::default()
    });
    let mut c = node.client();
    let body = |i: u8| vec![b'a' + i; 900];
    assert_eq!(c.store("set", "n", 1, 0, b"100"), "STORED");
    for i in 0..9u8 {
        assert_eq!(
            c.store("set", &format!("f{i}"), u32::from(i), 0, &body(i)),
            "STORED"
        );
    }
    // Push everything above to flash.
    for i in 0..4 {
        c.set(&format!("filler{i}"), &[b'z'; 900]);
    }
    node.settle();
    assert!(node.stats().flash.items >= 10, "{:?}", node.stats());
    let on_flash_reads = node.stats().flash.hits;

    assert_eq!(c.call("incr n 5\r\n"), "105");
    let v = c.gets("f0").unwrap();
    assert_eq!((v.flags, v.data), (0, body(0)));
    assert_eq!(c.store("append", "f1", 0, 0, b"!"), "STORED");
    let mut appended = body(1);
    appended.push(b'!');
    assert_eq!(c.get("f1").unwrap(), appended);
    assert_eq!(c.store("prepend", "f2", 0, 0, b"^"), "STORED");
    assert_eq!(c.get("f2").unwrap()[..2], *b"^c");
    assert_eq!(c.call("touch f3 1000\r\n"), "TOUCHED");
    assert_eq!(c.get("f3").unwrap(), body(3));
    c.set("filler-a", &[b'y'; 900]);
    c.set("filler-b", &[b'y'; 900]);
    c.set("filler-c", &[b'y'; 900]);
    let unique = c.gets("f4").unwrap().cas.unwrap();
    assert_eq!(c.call(&format!("cas f4 9 0 1 {unique}\r\nX\r\n")), "STORED");
    assert_eq!(c.get("f4").unwrap(), b"X");
    assert_eq!(c.call("delete f5\r\n"), "DELETED");
    assert_eq!(c.get("f5"), None);
    assert_eq!(c.store("add", "f6", 0, 0, b"no"), "NOT_STORED");
    assert_eq!(c.store("replace", "f7", 0, 0, b"yes"), "STORED");
    assert_eq!(c.get("f7").unwrap(), b"yes");
    c.send(b"gat 1000 f8\r\n");
    assert_eq!(c.values()[0].data, body(8));
    assert!(node.stats().flash.hits > on_flash_reads);
    assert_eq!(node.stats().flash_corrupt, 0);
}

fn item_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(dir).unwrap().flatten() {
        if !shard.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "item") {
                files.push(f.path());
            }
        }
    }
    files.sort();
    files
}

/// The key a record holds (layout in `flash.rs`: key length at 44, key at 48).
fn record_key(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let len = usize::from(u16::from_le_bytes([bytes[44], bytes[45]]));
    String::from_utf8(bytes[48..48 + len].to_vec()).unwrap()
}

#[test]
fn restart_keeps_what_is_on_flash() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiered(dir.path(), 4, 16, Policy::LruK(2));
    let first = TestNode::start_with(config.clone());
    let mut c = first.client();
    // Expires in a second; oldest, so demoted first.
    assert_eq!(c.store("set", "brief", 0, 1, &stripe(99)), "STORED");
    for i in 0..10 {
        assert_eq!(
            c.store(
                "set",
                &key(i),
                100 + u32::try_from(i).unwrap(),
                0,
                &stripe(i)
            ),
            "STORED"
        );
    }
    let s = first.stats();
    assert_eq!((s.memory.items, s.flash.items), (4, 7));
    drop(c);
    first.shutdown();
    std::thread::sleep(std::time::Duration::from_millis(2100));

    let second = TestNode::start_with(config);
    let s = second.stats();
    // The newest four were in memory only; "brief" has expired.
    assert_eq!(s.flash_restored, 6, "{s:?}");
    assert_eq!((s.curr_items, s.memory.items, s.flash.items), (6, 0, 6));
    let mut c = second.client();
    assert_eq!(c.get("brief"), None);
    for i in 0..10 {
        let got = c.get_multi("gets", &[&key(i)]);
        if i < 6 {
            assert_eq!(got.len(), 1, "{} lost at restart", key(i));
            assert_eq!(got[0].flags, 100 + u32::try_from(i).unwrap());
            assert!(got[0].data == stripe(i));
        } else {
            assert!(got.is_empty(), "{} was only in memory", key(i));
        }
    }
    // New uniques never repeat the restored ones.
    let restored: Vec<u64> = (0..6)
        .map(|i| c.gets(&key(i)).unwrap().cas.unwrap())
        .collect();
    c.set("new", b"x");
    let fresh = c.gets("new").unwrap().cas.unwrap();
    assert!(
        restored.iter().all(|&u| fresh > u),
        "{fresh} vs {restored:?}"
    );
}

#[test]
fn restart_drops_torn_and_damaged_records() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiered(dir.path(), 4, 16, Policy::LruK(2));
    let first = TestNode::start_with(config.clone());
    let mut c = first.client();
    for i in 0..8 {
        c.set(&key(i), &stripe(i));
    }
    drop(c);
    first.shutdown();
    let files = item_files(dir.path());
    assert_eq!(files.len(), 4);
    let keys: Vec<String> = files.iter().map(|f| record_key(f)).collect();
    // A record cut short, as by a crash before its data reached the disk.
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(&files[0], &bytes[..bytes.len() / 2]).unwrap();
    // A flipped bit in a value: the header checks out, the value does not.
    let mut bytes = std::fs::read(&files[1]).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x20;
    std::fs::write(&files[1], &bytes).unwrap();
    // A write in progress, and garbage under a record's name.
    let tmp = dir.path().join("00").join("00000000000000ff.tmp");
    std::fs::write(&tmp, b"half").unwrap();
    let junk = dir.path().join("00").join("0000000000000f00.item");
    std::fs::write(&junk, seeded_bytes(5000, 9)).unwrap();

    let second = TestNode::start_with(config);
    assert_eq!(second.stats().flash_restored, 3);
    assert!(!tmp.exists() && !junk.exists() && !files[0].exists());
    let mut c = second.client();
    let index = |k: &str| keys.iter().position(|x| x == k);
    for i in 0..4 {
        let k = key(i);
        let got = c.get(&k);
        match index(&k) {
            Some(0) | Some(1) => assert!(got.is_none(), "damaged {k} must read as a miss"),
            _ => assert!(got.unwrap() == stripe(i), "{k} intact"),
        }
    }
    let s = second.stats();
    assert_eq!(s.flash_corrupt, 1, "the flipped bit was caught on read");
    assert!(
        s.flash_last_error
            .as_deref()
            .is_some_and(|e| e.contains("corrupt record: value checksum")),
        "{:?}",
        s.flash_last_error
    );
}

#[test]
fn start_errors_name_what_is_at_fault() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let first = Node::start(NodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            flash_dir: Some(dir.path().join("node")),
            flash_bytes: 16 << 20,
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let addr = first.local_addr();
        let err = Node::start(NodeConfig {
            listen: addr,
            ..NodeConfig::default()
        })
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cache node: cannot listen on {addr}: ")),
            "{err}"
        );
        let err = Node::start(NodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            flash_dir: Some(dir.path().join("node")),
            flash_bytes: 16 << 20,
            ..NodeConfig::default()
        })
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cache node flash tier: {} is in use by another cache node",
                dir.path().join("node").display()
            )
        );
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        let err = Node::start(NodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            flash_dir: Some(dir.path().to_path_buf()),
            flash_bytes: 16 << 20,
            ..NodeConfig::default()
        })
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("is not empty and has no LODE-CACHE-NODE file"),
            "{err}"
        );
        assert!(
            dir.path().join("notes.txt").exists(),
            "nothing of ours touched"
        );
        let err = Node::start(NodeConfig {
            memory_share: 0.0,
            ..NodeConfig::default()
        })
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cache node config: memory_share: must be greater than 0 and less than 1, got 0"
        );
        first.shutdown().await.unwrap();
    });
}

/// A client that pipelines many gets of flash items while others overwrite and delete
/// them: answers stay well-formed and every value read is one that was written.
#[test]
fn concurrent_changes_while_reading_from_flash() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(tiered(dir.path(), 3, 32, Policy::LruK(2)));
    let addr = node.addr;
    let mut seed = Client::connect(addr);
    for i in 0..16 {
        seed.set(&key(i), &stripe(i));
    }
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                for round in 0..20u64 {
                    let i = (round * 7 + w * 3) % 16;
                    if round % 5 == 0 {
                        c.call(&format!("delete {}\r\n", key(i)));
                    } else {
                        c.set(&key(i), &stripe(i));
                    }
                }
            })
        })
        .collect();
    let mut reader = Client::connect(addr);
    for _ in 0..10 {
        let keys: Vec<String> = (0..16).map(key).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        for v in reader.get_multi("get", &refs) {
            let i: u64 = v.key[1..].parse().unwrap();
            assert!(v.data == stripe(i), "{} read wrong bytes", v.key);
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(node.stats().flash_corrupt, 0);
}
