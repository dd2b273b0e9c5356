//! System test of working-set prefetch: the first attach of an image records what it
//! read; an attach on a fresh agent with empty caches fetches that set ahead of demand;
//! `lode inspect` shows the record and `lode prefetch clear` removes it.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/harness.rs"]
mod harness;
use harness::*;

const CHUNK: u64 = 512 * 1024;
/// The chunks the "start" reads, in this order, and where in each.
const READS: [(u64, u64); 4] = [(5, 100), (2, 70_000), (9, 4096), (2, 8)];

fn control_of(state: &Path) -> String {
    state.join("control.sock").display().to_string()
}

/// Reads what [`READS`] says from the attachment's file; checks it against `img`.
fn start_reads(file: &Path, img: &[u8]) {
    let f = fs::File::open(file).expect("open the attachment's file");
    for (chunk, at) in READS {
        let offset = chunk * CHUNK + at;
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, offset).expect("read");
        let o = usize::try_from(offset).expect("offset");
        assert!(buf == img[o..o + 4096], "bytes at {offset} differ");
    }
}

fn prefetch_of<'a>(stats: &'a Value, id: &str) -> &'a Value {
    &stats["prefetch"][id]
}

fn origin_hits(stats: &Value) -> u64 {
    stats["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["name"] == "origin")
        .expect("origin tier")["hits"]
        .as_u64()
        .expect("hits")
}

#[test]
fn the_first_start_records_and_a_later_one_prefetches() {
    let h = Home::new();
    let mut img = random_image(12, 0x5eed);
    img[usize::try_from(7 * CHUNK).expect("fits")..usize::try_from(8 * CHUNK).expect("fits")]
        .fill(0);
    let raw = h.path("img.raw");
    fs::write(&raw, &img).expect("write image");
    let v = h.json(&["import", raw.to_str().expect("path"), "--tag", "app:1"]);
    let id = v["id"].as_str().expect("id").to_string();
    let inspect = h.json(&["inspect", "app:1"]);
    assert!(inspect["working_set"].is_null(), "{inspect}");

    // First start: no record, so the attach records (until detach, here).
    let first = h.path("first");
    let s1 = first.to_str().expect("path");
    let agent = h.spawn_agent(
        &["--state-dir", s1, "--prefetch-record-window-ms", "600000"],
        &first,
    );
    let c1 = control_of(&first);
    let a = h.json(&["attach", "app:1", "--name", "app", "--control", &c1]);
    let file = PathBuf::from(a["file"].as_str().expect("file"));
    start_reads(&file, &img);
    h.ok(&["detach", "app", "--control", &c1]);
    let stats = h.json(&["stats", "--control", &c1]);
    let p = prefetch_of(&stats, &id);
    assert_eq!(p["records_stored"], 1, "{stats}");
    assert_eq!(p["recorded_chunks"], 3, "{stats}");
    assert_eq!(
        p["working_set"]["chunks"], 0,
        "nothing to prefetch yet: {stats}"
    );
    drop(agent);
    let inspect = h.json(&["inspect", "app:1"]);
    assert_eq!(inspect["working_set"]["entries"], 3, "{inspect}");

    // A later start on another worker, caches empty: the three chunks come ahead.
    let second = h.path("second");
    let s2 = second.to_str().expect("path");
    let _agent = h.spawn_agent(&["--state-dir", s2], &second);
    let c2 = control_of(&second);
    let a = h.json(&["attach", &id, "--name", "app", "--control", &c2]);
    let file = PathBuf::from(a["file"].as_str().expect("file"));
    let t = Instant::now();
    loop {
        let stats = h.json(&["stats", "--control", &c2]);
        if prefetch_of(&stats, &id)["working_set"]["chunks"] == 3 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{stats}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start_reads(&file, &img);
    let stats = h.json(&["stats", "--control", &c2]);
    let ws = &prefetch_of(&stats, &id)["working_set"];
    assert_eq!(ws["bytes"], 3 * CHUNK, "{stats}");
    assert_eq!(ws["used_bytes"], 3 * CHUNK, "{stats}");
    assert_eq!(ws["pending_bytes"], 0, "{stats}");
    assert_eq!(
        origin_hits(&stats),
        3,
        "the reads fetched more from the origin than the working set: {stats}"
    );
    assert_eq!(
        prefetch_of(&stats, &id)["records_stored"],
        0,
        "a start with a record does not record: {stats}"
    );
    let text = h.ok(&["stats", "--control", &c2]);
    assert!(
        text.lines()
            .any(|l| l.contains("working_set") && l.contains("1.5 MiB")),
        "{text}"
    );
    h.ok(&["detach", "app", "--control", &c2]);

    // `lode prefetch record` marks it for re-recording; `clear` removes it.
    let out = h.ok(&["prefetch", "record", "app:1"]);
    assert!(
        out.contains("records its working set again (3 chunks"),
        "{out}"
    );
    assert_eq!(h.json(&["inspect", "app:1"])["working_set"]["entries"], 3);
    let out = h.ok(&["prefetch", "clear", "app:1"]);
    assert!(out.contains("working set removed"), "{out}");
    let inspect = h.json(&["inspect", "app:1"]);
    assert!(inspect["working_set"].is_null(), "{inspect}");
    let out = h.ok(&["prefetch", "clear", "app:1"]);
    assert!(out.contains("had no working set"), "{out}");
}

#[test]
fn a_record_that_does_not_open_is_ignored_and_replaced() {
    let h = Home::new();
    let img = random_image(4, 0xbad);
    let raw = h.path("img.raw");
    fs::write(&raw, &img).expect("write image");
    let v = h.json(&["import", raw.to_str().expect("path"), "--tag", "app:1"]);
    let id = v["id"].as_str().expect("id").to_string();
    // A record of the right size that is not sealed under this image's keys.
    let ws_dir = h.home().join("store/roots/1/worksets");
    fs::create_dir_all(&ws_dir).expect("mkdir");
    fs::write(ws_dir.join(&id), vec![7u8; 12 + 32 + 8 + 16]).expect("write record");
    assert_eq!(h.json(&["inspect", "app:1"])["working_set"]["entries"], 1);

    let state = h.path("state");
    let s = state.to_str().expect("path");
    let _agent = h.spawn_agent(&["--state-dir", s], &state);
    let c = control_of(&state);
    let a = h.json(&["attach", "app:1", "--name", "app", "--control", &c]);
    let file = PathBuf::from(a["file"].as_str().expect("file"));
    let f = fs::File::open(&file).expect("open");
    let mut buf = vec![0u8; 100];
    f.read_exact_at(&mut buf, CHUNK + 5).expect("read");
    assert!(buf[..] == img[usize::try_from(CHUNK).expect("fits") + 5..][..100]);
    h.ok(&["detach", "app", "--control", &c]);
    let log = fs::read_to_string(h.path("agent.err")).expect("log");
    assert!(
        log.contains("ignoring the working set stored for")
            && log.contains("does not authenticate"),
        "{log}"
    );
    // The start recorded anew, replacing it.
    assert_eq!(h.json(&["inspect", "app:1"])["working_set"]["entries"], 1);
    let stats = h.json(&["stats", "--control", &c]);
    assert_eq!(prefetch_of(&stats, &id)["records_stored"], 1, "{stats}");
}
