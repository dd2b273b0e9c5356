//! The stores the gc system tests run the real `lode` binary against: a local directory,
//! or S3 served by s3s-fs in the test's process (checking SigV4) — both keep objects as
//! files, so a test can damage one behind lode's back — with failpoint gates to pause a
//! lode process at an exact step.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use lode_testkit::S3Fs;
use serde_json::Value;

use crate::harness::Home;

pub const CHUNK: usize = 512 * 1024;
/// A stored chunk: its plaintext and the seal's 16-byte tag.
/// A full chunk's stored object: v2 with lz4, its plaintext (random: no segment
/// compresses) in 32 segments of 16 KiB, a 16-byte tag on each, and a 1,172-byte header
/// (20 bytes, then 36 per segment).
pub const SEALED: u64 = CHUNK as u64 + 16 * 32 + 20 + 36 * 32;
const BUCKET: &str = "lode-gc";

/// A scratch home and the store the binary is pointed at.
pub struct Target {
    pub h: Home,
    /// The value of LODE_STORE.
    pub store: String,
    /// Where the store's objects are files, to damage them behind lode's back.
    pub objects: PathBuf,
    pub env: Vec<(&'static str, String)>,
    /// Keeps the S3 server (and its files) alive.
    _server: Option<S3Fs>,
}

impl Target {
    pub fn local() -> Target {
        let h = Home::new();
        let objects = h.path("store");
        Target {
            store: objects.to_str().unwrap().to_owned(),
            h,
            objects,
            env: Vec::new(),
            _server: None,
        }
    }

    pub fn s3() -> Target {
        let server = S3Fs::start(BUCKET);
        Target {
            h: Home::new(),
            store: format!("s3://{BUCKET}/gc"),
            objects: server.bucket_dir().join("gc"),
            env: server.env().to_vec(),
            _server: Some(server),
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.h.cmd(args);
        cmd.env("LODE_STORE", &self.store);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run lode");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "lode {args:?} panicked:\n{err}");
        out
    }

    /// Starts lode in the background, its output piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        let mut cmd = self.h.cmd(args);
        cmd.env("LODE_STORE", &self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn lode")
    }

    /// Starts lode in the background, paused at the failpoint `point` until `go` is
    /// written into `gate`.
    pub fn spawn_paused(&self, args: &[&str], point: &str, gate: &Path) -> Child {
        let mut cmd = self.h.cmd(args);
        cmd.env("LODE_STORE", &self.store)
            .env("LODE_FAILPOINT", point)
            .env("LODE_FAILPOINT_GATE", gate)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn lode")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lode {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with exit status 1; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "lode {args:?}: {out:?}");
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    pub fn import(&self, file: &Path, tag: &str) -> String {
        self.json(&["import", file.to_str().unwrap(), "--tag", tag])["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Root 1's figures from `store stats --json`.
    pub fn root1(&self) -> Value {
        let st = self.json(&["store", "stats"]);
        let roots = st["per_root"].as_array().unwrap();
        assert_eq!(roots.len(), 1, "{st}");
        assert_eq!(roots[0]["live_bytes"], st["live_bytes"]);
        assert_eq!(roots[0]["dead_bytes"], st["dead_bytes"]);
        roots[0].clone()
    }
}

/// Waits until `n` processes have reached the failpoint `point` (marks in `gate`).
pub fn wait_for_marks(gate: &Path, point: &str, n: usize) {
    let prefix = format!("{}.", point.replace(':', "-"));
    let started = Instant::now();
    loop {
        let got = fs::read_dir(gate)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&prefix)
            })
            .count();
        if got >= n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{got} of {n} processes reached {point}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn new_gate(t: &Target, name: &str) -> PathBuf {
    let gate = t.h.path(name);
    fs::create_dir(&gate).unwrap();
    gate
}

pub fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn stored_names(t: &Target, image: &str) -> Vec<String> {
    t.json(&["inspect", image])["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect()
}

pub fn root_states(t: &Target) -> Vec<(u64, String)> {
    t.json(&["root", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["root"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

pub fn exports_as(t: &Target, image: &str, want: &[u8]) {
    let out = t.h.path("export.out");
    let _ = fs::remove_file(&out);
    t.ok(&["export", image, out.to_str().unwrap()]);
    assert!(
        fs::read(&out).unwrap() == want,
        "{image} exported other bytes"
    );
}

pub fn chunk_file(t: &Target, root: u64, name: &str) -> PathBuf {
    t.objects
        .join(format!("roots/{root}/chunks/{}/{name}", &name[..2]))
}
