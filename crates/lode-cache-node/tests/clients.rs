//! Clients lode did not write, from libmemcached-tools: `memccp`/`memccat` copy files
//! through the node (text protocol), `memcexist`/`memcrm` check and remove them, and
//! `memccapable -a` runs libmemcached's ASCII-protocol conformance tests.
//!
//! Excluded: `memccapable`'s binary-protocol tests (`binary noop`, `binary set`, ...,
//! 27 in all, the ones `-b` selects). lode speaks the text protocol only, so that
//! a fleet of plain memcached servers also works as the AZ tier; the binary protocol is
//! deprecated upstream.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::TestNode;
use lode_cache_node::NodeConfig;
use lode_testkit::seeded_bytes;

fn tool(name: &str) -> Option<std::path::PathBuf> {
    lode_testkit::tool_from(name, "libmemcached-tools")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("tool runs")
}

fn servers(node: &TestNode) -> String {
    format!("--servers={}", node.addr)
}

#[test]
fn memccp_and_memccat_round_trip_files() {
    let (Some(memccp), Some(memccat), Some(memcexist), Some(memcrm)) = (
        tool("memccp"),
        tool("memccat"),
        tool("memcexist"),
        tool("memcrm"),
    ) else {
        return;
    };
    let node = TestNode::start_with(NodeConfig {
        memory_bytes: Some(32 << 20),
        ..NodeConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut binary = seeded_bytes(200_000, 11);
    binary[0..4].copy_from_slice(b"\r\n\0\n");
    let files: [(&str, Vec<u8>); 4] = [
        ("text.txt", b"hello from memccp\nsecond line\n".to_vec()),
        ("binary.bin", binary),
        ("at-limit.bin", seeded_bytes(1 << 20, 12)),
        ("empty", Vec::new()),
    ];
    for (name, data) in &files {
        let path = dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        let out = run(Command::new(&memccp)
            .arg(servers(&node))
            .arg("--flags=42")
            .arg(&path));
        assert!(out.status.success(), "memccp {name}: {out:?}");
    }
    for (name, data) in &files {
        let copy = dir.path().join(format!("{name}.copy"));
        let out = run(Command::new(&memccat)
            .arg(servers(&node))
            .arg(format!("--file={}", copy.display()))
            .arg(name));
        assert!(out.status.success(), "memccat {name}: {out:?}");
        assert!(
            std::fs::read(&copy).unwrap() == *data,
            "{name} came back different"
        );
    }
    // The flags went through too.
    let out = run(Command::new(&memccat)
        .arg(servers(&node))
        .arg("-F")
        .arg("text.txt"));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("42\n"),
        "{out:?}"
    );

    // One byte past the limit is refused, and memccp says so.
    let over = dir.path().join("over-limit.bin");
    std::fs::write(&over, seeded_bytes((1 << 20) + 1, 13)).unwrap();
    let out = run(Command::new(&memccp).arg(servers(&node)).arg(&over));
    assert!(
        !out.status.success(),
        "memccp of an over-limit file succeeded: {out:?}"
    );
    let out = run(Command::new(&memcexist)
        .arg(servers(&node))
        .arg("over-limit.bin"));
    assert!(!out.status.success());

    let out = run(Command::new(&memcexist)
        .arg(servers(&node))
        .arg("binary.bin"));
    assert!(out.status.success(), "{out:?}");
    let out = run(Command::new(&memcrm).arg(servers(&node)).arg("binary.bin"));
    assert!(out.status.success(), "{out:?}");
    let out = run(Command::new(&memcexist)
        .arg(servers(&node))
        .arg("binary.bin"));
    assert!(!out.status.success(), "binary.bin still there after memcrm");
    let out = run(Command::new(&memccat).arg(servers(&node)).arg("binary.bin"));
    assert!(!out.status.success());

    // Four files stored by memccp and three `add`s with a past expiry, which is how
    // libmemcached asks whether a key exists (STORED: it did not); the over-limit set
    // is counted apart, as in memcached.
    let stats = node.stats();
    assert_eq!((stats.cmd_set, stats.total_items), (7, 4), "{stats:?}");
    assert_eq!(stats.store_too_large, 1);
}

/// Runs `memccapable -a` and returns its per-test lines.
fn memccapable(bin: &Path, node: &TestNode) -> Vec<String> {
    let out = run(Command::new(bin).args([
        "-h",
        "127.0.0.1",
        "-p",
        &node.addr.port().to_string(),
        "-t",
        "10",
        "-a",
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "memccapable failed:\n{text}");
    assert!(text.contains("All tests passed"), "{text}");
    text.lines()
        .filter(|l| l.starts_with("ascii "))
        .map(str::to_string)
        .collect()
}

#[test]
fn memccapable_ascii_tests_pass() {
    let Some(bin) = tool("memccapable") else {
        return;
    };
    let node = TestNode::start();
    let lines = memccapable(&bin, &node);
    // Every ASCII test ran and passed; none skipped.
    assert_eq!(lines.len(), 27, "{lines:#?}");
    for line in &lines {
        assert!(line.ends_with("[pass]"), "{line}");
    }
    for name in [
        "ascii cas",
        "ascii mget",
        "ascii incr noreply",
        "ascii flush",
        "ascii stat",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")
                    == format!("{name} [pass]")),
            "{name} missing"
        );
    }
}

#[test]
fn memccapable_passes_on_a_node_with_flash() {
    let Some(bin) = tool("memccapable") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_with(NodeConfig {
        memory_bytes: Some(4000),
        item_size_limit: 1024,
        flash_dir: Some(dir.path().to_path_buf()),
        flash_bytes: 1 << 20,
        ..NodeConfig::default()
    });
    let lines = memccapable(&bin, &node);
    assert!(lines.iter().all(|l| l.ends_with("[pass]")), "{lines:#?}");
}
