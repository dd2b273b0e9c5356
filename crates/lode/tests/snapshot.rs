//! `lode snapshot` end to end, with real processes: `demo-image`, `import`, `info`,
//! `serve` (the page-fault handler) and `restore` (playing Firecracker's part), and what
//! happens to a restore when its handler is killed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "common/harness.rs"]
mod harness;
use harness::*;

const SIZE: &str = "32MiB";

fn wait_for_socket(path: &Path) {
    let started = Instant::now();
    // Not a probe connection: each connection is a restore (and --once ends after one).
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} never came up",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Imports a demo index image as `idx`; returns the memory file's path.
fn imported(h: &Home) -> std::path::PathBuf {
    let mem = h.path("idx.mem");
    let out = h.ok(&[
        "snapshot",
        "demo-image",
        mem.to_str().unwrap(),
        "--size",
        SIZE,
    ]);
    assert!(out.contains("generation id slot is at offset 64"), "{out}");
    let v = h.json(&["snapshot", "import", mem.to_str().unwrap(), "--tag", "idx"]);
    assert_eq!(v["stats"]["device_size"], 32 << 20);
    assert_eq!(v["stats"]["chunks"], 512, "64 KiB chunks by default");
    assert!(v["stats"]["zero_chunks"].as_u64().unwrap() > 100, "{v}");
    mem
}

/// `lode --json snapshot restore` of 500 index queries, with `extra` flags.
fn index_restore(h: &Home, sock: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "snapshot",
        "restore",
        "--socket",
        sock,
        "--size",
        SIZE,
        "--queries",
        "500",
    ];
    args.extend_from_slice(extra);
    h.json(&args)
}

fn serve(h: &Home, extra: &[&str]) -> ChildGuard {
    let sock = h.path("uffd.sock");
    let mut args = vec![
        "snapshot",
        "serve",
        "idx",
        "--socket",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let child = h
        .cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    ChildGuard(child)
}

#[test]
fn snapshot_import_serve_restore_and_info() {
    let h = Home::new();
    let mem = imported(&h);
    let sock = h.path("uffd.sock");
    let s = sock.to_str().unwrap();
    assert!(
        h.ok(&["snapshot", "info", "idx"])
            .contains("working set  none recorded")
    );

    let mut server = serve(&h, &["--generation-id-offset", "64"]);
    let a = index_restore(&h, s, &[]);
    assert_eq!(a["answered"], 500);
    assert_eq!(a["memory_generation_id"], a["generation_id"], "{a}");
    let b = index_restore(&h, s, &["--regions", "2"]);
    assert_ne!(
        a["generation_id"], b["generation_id"],
        "each restore gets a fresh id"
    );
    assert_eq!(b["memory_generation_id"], b["generation_id"]);
    let out = h.ok(&[
        "snapshot",
        "restore",
        "--socket",
        s,
        "--size",
        SIZE,
        "--regions",
        "3",
        "--workload",
        "verify",
        "--against",
        mem.to_str().unwrap(),
        "--remove",
        "1MiB:256KiB",
        "--remove",
        "30MiB:1MiB",
        "--generation-id-offset",
        "64",
    ]);
    assert!(
        out.contains("verify: 8192 pages compared, 0 differ (2 removed ranges read as zero)"),
        "{out}"
    );

    // A wrong expectation must be caught: verify against another file.
    let other = h.path("other.mem");
    let mut bytes = std::fs::read(&mem).unwrap();
    bytes[5 << 20] ^= 1;
    std::fs::write(&other, bytes).unwrap();
    let err = h.fails(&[
        "snapshot",
        "restore",
        "--socket",
        s,
        "--size",
        SIZE,
        "--workload",
        "verify",
        "--against",
        other.to_str().unwrap(),
        "--generation-id-offset",
        "64",
    ]);
    assert!(
        err.contains("differs from the snapshot in 1 pages"),
        "{err}"
    );

    // SIGTERM stops the handler cleanly and removes its socket.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    let st = server
        .wait_for(Duration::from_secs(10))
        .expect("serve stops on SIGTERM");
    assert!(st.success());
    let mut stdout = String::new();
    std::io::Read::read_to_string(server.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert_eq!(stdout.matches("\nrestore ").count(), 4, "{stdout}");
    assert!(stdout.contains("working set recorded"), "{stdout}");
    assert!(!sock.exists());
    let info = h.ok(&["snapshot", "info", "idx"]);
    assert!(info.contains("chunks       512 of 64.0 KiB"), "{info}");
    assert!(
        info.contains("working set  ") && !info.contains("none recorded"),
        "{info}"
    );

    // The next restore installs the recorded working set ahead of demand.
    let mut server = serve(&h, &["--once"]);
    index_restore(&h, s, &[]);
    assert!(
        server
            .wait_for(Duration::from_secs(10))
            .expect("--once exits")
            .success()
    );
    let mut stdout = String::new();
    std::io::Read::read_to_string(server.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let prefetched: u64 = stdout
        .split(" prefetched")
        .next()
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no prefetch figure in {stdout}"));
    assert!(prefetched > 0, "{stdout}");
}

#[test]
fn snapshot_mistakes_are_named() {
    let h = Home::new();
    let mem = imported(&h);
    let missing = h.path("nobody.sock");
    let err = h.fails(&[
        "snapshot",
        "restore",
        "--socket",
        missing.to_str().unwrap(),
        "--size",
        SIZE,
    ]);
    assert!(
        err.contains("connecting to the page-fault handler at") && err.contains("nobody.sock"),
        "{err}"
    );
    let err = h.fails(&[
        "snapshot",
        "restore",
        "--socket",
        "x",
        "--size",
        SIZE,
        "--workload",
        "verify",
    ]);
    assert!(
        err.contains("--workload verify needs --against FILE"),
        "{err}"
    );
    let err = h.fails(&[
        "snapshot", "restore", "--socket", "x", "--size", SIZE, "--remove", "100:4096",
    ]);
    assert!(err.contains("must be whole 4096-byte pages"), "{err}");
    let err = h.fails(&[
        "snapshot",
        "restore",
        "--socket",
        "x",
        "--size",
        "16MiB",
        "--workload",
        "verify",
        "--against",
        mem.to_str().unwrap(),
    ]);
    assert!(
        err.contains("is 33554432 bytes but --size is 16777216"),
        "{err}"
    );
    let err = h.fails(&[
        "snapshot",
        "serve",
        "nope",
        "--socket",
        h.path("s").to_str().unwrap(),
    ]);
    assert!(
        err.contains("opening snapshot nope") && err.contains("tag"),
        "{err}"
    );
    let err = h.fails(&[
        "snapshot",
        "serve",
        "idx",
        "--socket",
        h.path("s").to_str().unwrap(),
        "--generation-id-offset",
        "8",
    ]);
    assert!(err.contains("must be 16-aligned"), "{err}");
    std::fs::write(h.path("file"), b"x").unwrap();
    let err = h.fails(&[
        "snapshot",
        "serve",
        "idx",
        "--socket",
        h.path("file").to_str().unwrap(),
    ]);
    assert!(err.contains("exists and is not a socket"), "{err}");
    let _server = serve(&h, &[]);
    let err = h.fails(&[
        "snapshot",
        "serve",
        "idx",
        "--socket",
        h.path("uffd.sock").to_str().unwrap(),
    ]);
    assert!(err.contains("is in use by another handler"), "{err}");
    // A restore larger than the snapshot is refused by the handler, by name.
    let err = h.fails(&[
        "snapshot",
        "restore",
        "--socket",
        h.path("uffd.sock").to_str().unwrap(),
        "--size",
        "64MiB",
    ]);
    assert!(
        err.contains("the handler refused")
            && err.contains("past the end of the 33554432-byte snapshot"),
        "{err}"
    );
}

/// Starts a restore that waits before touching memory, then kills the handler under it.
fn restore_then_kill_handler(h: &Home, extra: &[&str]) -> ChildGuard {
    let mut server = serve(h, &[]);
    let sock = h.path("uffd.sock");
    let mem = h.path("idx.mem");
    let mut args = vec![
        "snapshot",
        "restore",
        "--socket",
        sock.to_str().unwrap(),
        "--size",
        SIZE,
        "--workload",
        "verify",
        "--against",
        mem.to_str().unwrap(),
        "--wait",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut client = ChildGuard(
        h.cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(client.0.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("restored 32.0 MiB"), "{first}");
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    client
}

#[test]
fn a_restore_whose_handler_dies_stops_with_a_clear_error() {
    let h = Home::new();
    imported(&h);
    let mut client = restore_then_kill_handler(&h, &[]);
    let st = client
        .wait_for(Duration::from_secs(20))
        .expect("the restore should stop");
    assert_eq!(st.code(), Some(3));
    let mut err = String::new();
    std::io::Read::read_to_string(client.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("the page-fault handler closed its socket (it died or was stopped)"),
        "{err}"
    );
    assert!(
        !err.contains("differ"),
        "no page may have been served wrong: {err}"
    );
}

#[test]
fn without_a_watch_a_fault_after_the_handler_dies_blocks_in_the_kernel() {
    let h = Home::new();
    imported(&h);
    let mut client = restore_then_kill_handler(&h, &["--no-watch"]);
    // After its --wait the client reads memory and faults; nobody serves the fault.
    assert!(
        client.wait_for(Duration::from_secs(4)).is_none(),
        "the client should hang"
    );
    let tasks = format!("/proc/{}/task", client.0.id());
    let wchans: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("wchan")).ok())
        .collect();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", client.0.id())).unwrap();
    // wchan names the wait where the kernel exposes it; otherwise the task just sleeps.
    assert!(
        wchans.iter().any(|w| w.contains("handle_userfault")) || wchans.iter().all(|w| w == "0"),
        "expected a thread waiting in handle_userfault: {wchans:?} ({stat})"
    );
    assert!(
        wchans.iter().any(|w| w.contains("handle_userfault")),
        "{wchans:?}"
    );
}
