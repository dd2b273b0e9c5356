//! Bursts of restores through one `lode snapshot serve`, with real processes: eight
//! `lode snapshot restore --workload verify` clones at once, each compared with the
//! snapshot byte for byte with its own generation id, the origin asked for each chunk
//! once, the handler up for the next burst; and the session cap's refusal.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[path = "common/harness.rs"]
mod harness;
use harness::*;

const SIZE: &str = "16MiB";
const CLONES: usize = 8;

fn wait_for_socket(path: &Path) {
    let started = Instant::now();
    // Not a probe connection: each connection is a restore.
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} never came up",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Imports a 16 MiB demo index as `idx`; returns the memory file and its stored chunks.
fn imported(h: &Home) -> (std::path::PathBuf, u64) {
    let mem = h.path("idx.mem");
    h.ok(&[
        "snapshot",
        "demo-image",
        mem.to_str().unwrap(),
        "--size",
        SIZE,
    ]);
    let v = h.json(&["snapshot", "import", mem.to_str().unwrap(), "--tag", "idx"]);
    let stored =
        v["stats"]["chunks"].as_u64().unwrap() - v["stats"]["zero_chunks"].as_u64().unwrap();
    assert!(stored > 50, "{v}");
    (mem, stored)
}

/// `lode --json snapshot serve idx` with `extra` flags; its reports, one JSON object a
/// line, come through the returned channel.
fn serve(h: &Home, extra: &[&str]) -> (ChildGuard, mpsc::Receiver<serde_json::Value>) {
    let sock = h.path("uffd.sock");
    let mut args = vec![
        "--json",
        "snapshot",
        "serve",
        "idx",
        "--socket",
        sock.to_str().unwrap(),
        "--generation-id-offset",
        "64",
    ];
    args.extend_from_slice(extra);
    let mut child = h
        .cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // One (pretty-printed) JSON object a restore.
        let values = serde_json::Deserializer::from_reader(stdout).into_iter();
        for v in values.map_while(Result::ok) {
            let _ = tx.send(v);
        }
    });
    wait_for_socket(&sock);
    (ChildGuard(child), rx)
}

fn restore(h: &Home, args: &[&str]) -> Child {
    let sock = h.path("uffd.sock");
    let mut a = vec![
        "--json",
        "snapshot",
        "restore",
        "--socket",
        sock.to_str().unwrap(),
        "--size",
        SIZE,
    ];
    a.extend_from_slice(args);
    h.cmd(&a)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `CLONES` verifying restores at once; returns the generation ids they were given.
fn burst(h: &Home, mem: &Path) -> Vec<String> {
    let clones: Vec<Child> = (0..CLONES)
        .map(|i| {
            let regions = (1 + i % 3).to_string();
            restore(
                h,
                &[
                    "--regions",
                    &regions,
                    "--workload",
                    "verify",
                    "--against",
                    mem.to_str().unwrap(),
                    "--generation-id-offset",
                    "64",
                ],
            )
        })
        .collect();
    clones
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "a clone failed: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(v["pages"], 4096, "{v}");
            assert_eq!(v["mismatches"], 0, "{v}");
            v["generation_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn reports(rx: &mpsc::Receiver<serde_json::Value>, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(60))
                .expect("a restore's report")
        })
        .collect()
}

#[test]
fn one_handler_serves_a_burst_of_clones_each_its_own_and_fetches_each_chunk_once() {
    let h = Home::new();
    let (mem, stored) = imported(&h);
    let (mut server, rx) = serve(&h, &[]);
    let mut ids = std::collections::HashSet::new();

    for round in 0..2 {
        let got = burst(&h, &mem);
        let reps = reports(&rx, CLONES);
        for (id, r) in got.iter().zip(&reps) {
            assert!(r["error"].is_null(), "{r}");
            assert_eq!(id.len(), 32);
            assert!(ids.insert(id.clone()), "generation id {id} given twice");
        }
        let reported: std::collections::HashSet<_> =
            reps.iter().map(|r| r["generation_id"].clone()).collect();
        assert_eq!(reported.len(), CLONES);
        // Every clone read every page, so every stored chunk was needed: at most one
        // fetch each means exactly one, for both bursts together.
        let last = reps.last().unwrap();
        assert_eq!(
            last["handler"]["origin_fetches"], stored,
            "round {round}: {last}"
        );
        let peak = reps
            .iter()
            .map(|r| r["handler"]["peak_sessions"].as_u64().unwrap())
            .max()
            .unwrap();
        assert!(peak > 1, "the clones were not served at once: {last}");
        if round == 1 {
            // The first burst recorded the working set (once); this one prefetched it.
            assert!(
                reps.iter()
                    .all(|r| r["prefetched_segments"].as_u64() > Some(0))
            );
        } else {
            assert_eq!(reps.iter().filter(|r| r["recorded"] == true).count(), 1);
        }
    }

    // Clones that exit right after the handshake, while their prefetch is still
    // installing: the handler finds their address spaces gone, which ends those restores
    // as a closed socket does, not as a failure.
    let quick: Vec<Child> = (0..CLONES)
        .map(|_| restore(&h, &["--workload", "none"]))
        .collect();
    for c in quick {
        assert!(c.wait_with_output().unwrap().status.success());
    }
    for r in reports(&rx, CLONES) {
        assert!(r["error"].is_null(), "{r}");
    }
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "the handler stopped"
    );
}

#[test]
fn restores_past_max_sessions_are_refused_with_the_reason() {
    let h = Home::new();
    imported(&h);
    let (_server, rx) = serve(&h, &["--max-sessions", "2"]);
    let held: Vec<ChildGuard> = (0..2)
        .map(|_| {
            let mut c = restore(&h, &["--workload", "none", "--hold", "30"]);
            // Its report comes once it is restored (before the hold): it holds a slot
            // from then on.
            let mut values = serde_json::Deserializer::from_reader(c.stdout.as_mut().unwrap())
                .into_iter::<serde_json::Value>();
            let v = values.next().unwrap().unwrap();
            assert!(v["generation_id"].is_string(), "{v}");
            ChildGuard(c)
        })
        .collect();
    let third = restore(&h, &["--workload", "none"])
        .wait_with_output()
        .unwrap();
    assert!(!third.status.success());
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(
        err.contains(
            "the handler is serving 2 restores, its limit (--max-sessions); retry when one \
             ends, or start another handler"
        ),
        "{err}"
    );
    let r = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(r["refused"], true, "{r}");
    assert_eq!(r["handler"]["refused_sessions"], 1, "{r}");

    // A slot freed is taken again.
    drop(held);
    let next = restore(&h, &["--queries", "50"])
        .wait_with_output()
        .unwrap();
    assert!(
        next.status.success(),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );
}
