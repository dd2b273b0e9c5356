//! The agent's side of garbage collection, through the real `lode` binary and a running
//! `lode agent` on a local directory store: an attachment made before a rotation keeps
//! reading its old root after the collector expired it — correct bytes, and each read
//! raises the read alarm (the store's marker, which halts the root's deletion; a counter
//! on the metrics endpoint; one line in the agent's log); a new attach by tag resolves
//! the tag again and gets the manifest it was moved to. Reads are compared with
//! `nbdcopy` (libnbd-bin); the tests skip with a reason without it.

#[path = "common/harness.rs"]
mod harness;

use std::fs;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Home, have_nbdcopy, random_image};
use serde_json::Value;

/// How long a test waits for the agent to notice a root's new state: its cache of root
/// states (lode_agent::ROOT_STATE_TTL, 10 s) and a margin for busy machines.
const NOTICE_DEADLINE: Duration = Duration::from_secs(60);

/// `nbdcopy` of the agent's export `name`; its bytes.
fn read_export(h: &Home, name: &str) -> Vec<u8> {
    let out = h.path("nbd.out");
    let _ = fs::remove_file(&out);
    let uri = format!("nbd+unix:///{name}?socket={}", h.nbd_sock().display());
    let st = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&out)
        .status()
        .expect("run nbdcopy");
    assert!(st.success(), "nbdcopy {uri} failed: {st:?}");
    fs::read(&out).expect("read nbdcopy output")
}

/// The agent's Prometheus text, from `GET /metrics` on its control socket.
fn metrics(h: &Home) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(h.control()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of `lode_root_alarm_reads_total{root="ROOT"}`, if the agent reports it.
fn alarm_reads(h: &Home, root: u32) -> Option<u64> {
    let m = metrics(h);
    assert!(
        m.lines()
            .any(|l| l == "# TYPE lode_root_alarm_reads_total counter"),
        "{m}"
    );
    let prefix = format!("lode_root_alarm_reads_total{{root=\"{root}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().expect("a count"))
}

fn agent_log(h: &Home) -> String {
    fs::read_to_string(h.path("agent.err")).expect("agent log")
}

/// The agent's log lines raising an alarm on `root` for `manifest`.
fn alarm_lines(h: &Home, root: u32, manifest: &str) -> Vec<String> {
    agent_log(h)
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "ALARM: root {root} is expired but was read: manifest {manifest} by lode agent on "
            ))
        })
        .map(str::to_owned)
        .collect()
}

/// `root` as `lode --json root ls` lists it.
fn root_ls(h: &Home, root: u32) -> Value {
    let ls = h.json(&["root", "ls"]);
    ls.as_array()
        .expect("an array")
        .iter()
        .find(|r| r["root"] == root)
        .unwrap_or_else(|| panic!("no root {root} in {ls}"))
        .clone()
}

/// `root`'s step in a `lode --json gc` report.
fn gc_step(report: &Value, root: u32) -> Value {
    report["roots"]
        .as_array()
        .expect("roots")
        .iter()
        .find(|r| r["root"] == root)
        .unwrap_or_else(|| panic!("no root {root} in {report}"))
        .clone()
}

fn import(h: &Home, img: &[u8], tag: &str) -> String {
    let file = h.path("img.raw");
    fs::write(&file, img).expect("write image");
    h.json(&["import", file.to_str().expect("path"), "--tag", tag])["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

/// An attachment made before `root rotate` + `gc` keeps reading root 1 after it expired:
/// right bytes, an alarm (marker, counter, one log line) that halts the deletion until an
/// operator clears it; then the root is deleted, and an attach by tag gets the image's
/// new manifest.
#[test]
fn an_attachment_reading_an_expired_root_halts_its_deletion() {
    if !have_nbdcopy() {
        return;
    }
    let h = Home::new();
    let img = random_image(4, 21);
    let old = import(&h, &img, "app:1");
    // No cache keeps a chunk, so every read reaches the store.
    let _agent = h.start_agent_with(&[
        "--cache-memory",
        "0",
        "--cache-disk",
        "0",
        "--cache-decrypted",
        "0",
    ]);
    let a = h.json(&["attach", "app:1", "--name", "app"]);
    assert_eq!(a["id"], old.as_str());
    assert!(read_export(&h, "app") == img, "the export differs");
    assert_eq!(alarm_reads(&h, 1), None, "an active root raised an alarm");

    h.ok(&["root", "rotate"]);
    let report = h.json(&["gc", "--grace", "1h"]);
    let step = gc_step(&report, 1);
    assert_eq!(step["after"], "expired", "{report}");
    assert_eq!(step["copied"], 1, "{report}");
    assert_eq!(step["deleted_objects"], 0, "{report}");

    // The attachment still reads root 1. Once the agent's view of the root is fresh
    // again, its reads raise the alarm; every read returns the image meanwhile.
    let started = Instant::now();
    while alarm_lines(&h, 1, &old).is_empty() {
        assert!(
            started.elapsed() < NOTICE_DEADLINE,
            "no alarm in the agent's log:\n{}",
            agent_log(&h)
        );
        assert!(
            read_export(&h, "app") == img,
            "the export differs after expiry"
        );
    }
    // More reads: still the image, and no more log lines for this manifest this minute.
    assert!(
        read_export(&h, "app") == img,
        "the export differs after the alarm"
    );
    let lines = alarm_lines(&h, 1, &old);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(", attachment app;") && lines[0].contains("lode root clear-alarm 1"),
        "{}",
        lines[0]
    );
    let reads = alarm_reads(&h, 1).expect("the alarm counter of root 1");
    assert!(reads > 0);
    assert_eq!(alarm_reads(&h, 2), None, "the active root raised an alarm");

    let r1 = root_ls(&h, 1);
    let alarms = r1["alarms"].as_array().expect("alarms");
    assert_eq!(alarms.len(), 1, "{r1}");
    assert_eq!(alarms[0]["manifest"], old.as_str(), "{r1}");
    let reader = alarms[0]["reader"].as_str().expect("reader");
    assert!(
        reader.starts_with("lode agent on ") && reader.ends_with(", attachment app"),
        "{reader}"
    );

    // The alarm halts the deletion however short the grace period.
    let report = h.json(&["gc", "--grace", "0s"]);
    let step = gc_step(&report, 1);
    assert_eq!(step["after"], "expired", "{report}");
    assert_eq!(step["deleted_objects"], 0, "{report}");
    assert_eq!(report["reclaimed_bytes"], 0, "{report}");
    let waiting = step["waiting"].as_str().expect("waiting");
    assert!(waiting.starts_with("halted: 1 read alarm(s)"), "{waiting}");
    assert_eq!(step["alarms"][0]["manifest"], old.as_str(), "{report}");
    assert!(read_export(&h, "app") == img, "the export differs after gc");

    // The operator finds the reader, detaches it and clears the alarm: the root goes.
    h.ok(&["detach", "app"]);
    h.ok(&["root", "clear-alarm", "1"]);
    let report = h.json(&["gc", "--grace", "0s"]);
    let step = gc_step(&report, 1);
    assert_eq!(step["after"], "deleted", "{report}");
    assert!(
        step["deleted_objects"].as_u64().expect("count") > 0,
        "{report}"
    );
    assert_eq!(root_ls(&h, 1)["state"], "deleted");

    // A new attach by tag resolves it again: the manifest it was moved to, same bytes.
    let a = h.json(&["attach", "app:1", "--name", "app"]);
    let new = a["id"].as_str().expect("id");
    assert_ne!(new, old, "the attach reused the old manifest");
    assert!(
        read_export(&h, "app") == img,
        "the re-attached export differs"
    );
    assert_eq!(alarm_reads(&h, 2), None, "the active root raised an alarm");
}

/// An attach resolves its tag each time: after copy-forward moves the tag, a new attach
/// gets the new manifest while the old attachment keeps its own; an attach of the old
/// id once its root expired raises the alarm before it returns.
#[test]
fn attach_resolves_the_tag_each_time_and_an_expired_id_alarms_at_attach() {
    if !have_nbdcopy() {
        return;
    }
    let h = Home::new();
    let img = random_image(3, 22);
    let old = import(&h, &img, "app:1");
    let _agent = h.start_agent();
    assert_eq!(
        h.json(&["attach", "app:1", "--name", "before"])["id"],
        old.as_str()
    );

    h.ok(&["root", "rotate"]);
    h.ok(&["root", "copy-forward", "1"]);
    let a = h.json(&["attach", "app:1", "--name", "after"]);
    let new = a["id"].as_str().expect("id").to_owned();
    assert_ne!(new, old, "the attach did not resolve the moved tag");
    assert!(
        read_export(&h, "after") == img,
        "the new manifest's export differs"
    );
    assert!(
        read_export(&h, "before") == img,
        "the old attachment differs"
    );
    let ls = h.json(&["ls"]);
    let id_of = |name: &str| {
        ls.as_array()
            .expect("ls")
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {ls}"))["id"]
            .clone()
    };
    assert_eq!(id_of("before"), old.as_str(), "{ls}");
    assert_eq!(id_of("after"), new.as_str(), "{ls}");
    // A retired root is read without alarm.
    assert_eq!(root_ls(&h, 1)["alarms"], serde_json::json!([]));
    assert_eq!(alarm_reads(&h, 1), None);

    assert_eq!(
        gc_step(&h.json(&["gc", "--grace", "1h"]), 1)["after"],
        "expired"
    );
    h.ok(&["attach", &old, "--name", "old"]);
    let r1 = root_ls(&h, 1);
    assert_eq!(r1["alarms"][0]["manifest"], old.as_str(), "{r1}");
    assert!(
        r1["alarms"][0]["reader"]
            .as_str()
            .is_some_and(|r| r.ends_with(", attachment old")),
        "{r1}"
    );
    assert!(alarm_reads(&h, 1).is_some_and(|n| n > 0));
    assert_eq!(alarm_lines(&h, 1, &old).len(), 1, "{}", agent_log(&h));
    assert!(
        read_export(&h, "old") == img,
        "the expired root's export differs"
    );
}
