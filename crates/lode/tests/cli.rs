//! System tests of the `lode` binary: each runs the real executable with its own
//! `$LODE_HOME` in a temporary directory and checks what a user would see — exit codes,
//! the rendered error messages, the bytes of exported images and the files in the store.
//!
//! The ext4 round trip needs `mkfs.ext4` and `e2fsck` (e2fsprogs); it skips with a printed
//! reason only when they are absent.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lode_testkit::{fill_seeded, seeded_bytes, tool_from};
use serde_json::Value;

const CHUNK: usize = 512 * 1024;
/// What format v2 adds to a full 512 KiB chunk: 16 segments' tags and a 596-byte header.
/// What one run of `lode` did.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// A `lode` with its own data directory, and a scratch directory for images.
struct Lode {
    dir: tempfile::TempDir,
}

impl Lode {
    fn new() -> Lode {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir(dir.path().join("work")).expect("work dir");
        Lode { dir }
    }

    /// `$LODE_HOME`.
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// A path in the scratch directory (outside `$LODE_HOME`).
    fn work(&self, name: &str) -> PathBuf {
        self.dir.path().join("work").join(name)
    }

    fn keyring(&self) -> PathBuf {
        self.home().join("keyring.json")
    }

    fn root_dir(&self) -> PathBuf {
        self.home().join("store/roots/1")
    }

    fn chunk_file(&self, name: &str) -> PathBuf {
        self.root_dir().join("chunks").join(&name[..2]).join(name)
    }

    fn manifest_file(&self, id: &str) -> PathBuf {
        self.root_dir().join("manifests").join(id)
    }

    fn run(&self, args: &[&str]) -> Out {
        self.run_env(args, &[])
    }

    /// Runs `lode ARGS` with extra environment variables, failing the test if it takes
    /// more than a minute, dies by a signal or panics.
    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let (so, se) = (
            self.dir.path().join("stdout"),
            self.dir.path().join("stderr"),
        );
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lode"));
        cmd.args(args)
            .env("LODE_HOME", self.home())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&so).expect("stdout file"))
            .stderr(fs::File::create(&se).expect("stderr file"));
        for var in ["LODE_STORE", "LODE_KMS", "LODE_KMS_KEY"] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn lode");
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for lode") {
                break st;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("lode {args:?} ran for more than 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = Out {
            code: status.code(),
            stdout: fs::read_to_string(&so).expect("read stdout"),
            stderr: fs::read_to_string(&se).expect("read stderr"),
            elapsed: started.elapsed(),
        };
        assert!(
            out.code.is_some(),
            "lode {args:?} was killed by a signal: {status:?}\n{}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("panicked") && !out.stdout.contains("panicked"),
            "lode {args:?} panicked:\n{}",
            out.stderr
        );
        out
    }

    /// Runs `lode ARGS` and expects success.
    fn ok(&self, args: &[&str]) -> Out {
        let out = self.run(args);
        assert_eq!(
            out.code,
            Some(0),
            "lode {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
            out.stdout,
            out.stderr
        );
        out
    }

    /// Runs `lode ARGS` and expects failure with an error on stderr.
    fn fails(&self, args: &[&str]) -> Out {
        check_failed(args, self.run(args))
    }

    /// `lode --json import FILE --tag TAG [EXTRA]`, returning the JSON it printed.
    fn import(&self, file: &Path, tag: &str, extra: &[&str]) -> Value {
        let mut args = vec!["--json", "import", s(file), "--tag", tag];
        args.extend_from_slice(extra);
        self.ok(&args).json()
    }

    fn inspect(&self, image: &str) -> Value {
        self.ok(&["inspect", image]).json()
    }
}

fn check_failed(args: &[&str], out: Out) -> Out {
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "lode {args:?} should have failed but exited {:?}:\n{}",
        out.code,
        out.stdout
    );
    assert!(
        !out.stderr.trim().is_empty(),
        "lode {args:?} failed without a message"
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The generated image of test 1: 40 whole chunks and a 12345-byte tail (so its size is
/// not a multiple of the chunk size). Chunks 3, 4 and 17 are all zero; 10 and 20 repeat
/// chunk 2; chunk 25 is half zero; chunk 30 holds an unaligned copy of earlier bytes.
/// The length of the object a chunk of `plain` is stored as in the format new images use:
/// it depends on the plaintext (what compresses), not on the key, so any salt gives it.
fn stored_len(plain: &[u8]) -> u64 {
    let format = lode_image::new_chunk_format(lode_format::ChunkSize::DEFAULT);
    let sealed = format
        .seal(&lode_format::RootSalt::from_bytes([0; 32]), plain.to_vec())
        .unwrap();
    sealed.ciphertext.len() as u64
}

const GEN_ZERO: [usize; 3] = [3, 4, 17];
const GEN_REPEATS: [usize; 2] = [10, 20];
const GEN_CHUNKS: usize = 41;

fn generated_image(seed: u64) -> Vec<u8> {
    let size = 40 * CHUNK + 12345;
    let mut img = seeded_bytes(size, seed);
    for i in GEN_ZERO {
        img[i * CHUNK..(i + 1) * CHUNK].fill(0);
    }
    for i in GEN_REPEATS {
        img.copy_within(2 * CHUNK..3 * CHUNK, i * CHUNK);
    }
    img[25 * CHUNK..25 * CHUNK + CHUNK / 2].fill(0);
    img.copy_within(1000..301_000, 30 * CHUNK + 7);
    img
}

/// A small image of `n` distinct random chunks.
fn small_image(n: usize, seed: u64) -> Vec<u8> {
    seeded_bytes(n * CHUNK, seed)
}

/// The non-null chunk names of an `inspect` output, by index.
fn chunk_names(view: &Value) -> Vec<Option<String>> {
    view["chunks"]
        .as_array()
        .expect("chunks is an array")
        .iter()
        .map(|c| c.as_str().map(str::to_owned))
        .collect()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn dir_entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn u64_of(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

// 1. Round trips.

#[test]
fn generated_image_round_trips_byte_for_byte() {
    let lode = Lode::new();
    let src = lode.work("gen.img");
    let bytes = generated_image(1);
    assert_ne!(bytes.len() % CHUNK, 0);
    fs::write(&src, &bytes).unwrap();

    let first = lode.import(&src, "t", &[]);
    let id = first["id"].as_str().expect("id is a string").to_owned();
    assert_eq!(id.len(), 64, "id {id} is not 64 hex digits");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(first["tag"], "t");
    let st = &first["stats"];
    assert_eq!(u64_of(&st["chunks"], "chunks"), GEN_CHUNKS as u64);
    assert_eq!(
        u64_of(&st["zero_chunks"], "zero_chunks"),
        GEN_ZERO.len() as u64
    );
    assert_eq!(u64_of(&st["repeated_chunks"], "repeated"), 2);
    assert_eq!(
        u64_of(&st["device_size"], "device_size"),
        bytes.len() as u64
    );
    let distinct = (GEN_CHUNKS - GEN_ZERO.len() - GEN_REPEATS.len()) as u64;
    assert_eq!(u64_of(&st["uploaded_chunks"], "uploaded"), distinct);
    // Each distinct stored chunk is its object in format v2: a header, then each segment,
    // lz4-compressed where that saves an eighth, with a 16-byte GCM tag.
    let stored: u64 = bytes
        .chunks(CHUNK)
        .enumerate()
        .filter(|(i, _)| !GEN_ZERO.contains(i) && !GEN_REPEATS.contains(i))
        .map(|(_, c)| stored_len(c))
        .sum();
    assert_eq!(u64_of(&st["uploaded_bytes"], "uploaded_bytes"), stored);

    let out = lode.work("gen.out");
    lode.ok(&["export", "t", s(&out)]);
    assert!(
        fs::read(&out).unwrap() == bytes,
        "export differs from source"
    );
    // By manifest id too.
    let out2 = lode.work("gen-by-id.out");
    lode.ok(&["export", &id, s(&out2)]);
    assert!(fs::read(&out2).unwrap() == bytes, "export by id differs");

    // The same file again: everything is already stored.
    let again = lode.import(&src, "t-again", &[]);
    let st = &again["stats"];
    assert_eq!(u64_of(&st["uploaded_chunks"], "uploaded"), 0, "{again}");
    assert_eq!(u64_of(&st["uploaded_bytes"], "uploaded_bytes"), 0);
    assert_eq!(u64_of(&st["present_chunks"], "present"), distinct);

    // Another chunk size.
    let small = lode.import(&src, "t64", &["--chunk-size", "65536"]);
    let chunks64 = bytes.len().div_ceil(65536) as u64;
    assert_eq!(u64_of(&small["stats"]["chunks"], "chunks"), chunks64);
    assert_eq!(
        u64_of(&small["stats"]["zero_chunks"], "zero"),
        // The three zero chunks, and half of chunk 25.
        (GEN_ZERO.len() * 8 + 4) as u64
    );
    let view = lode.inspect("t64");
    assert_eq!(view["chunk_size"], 65536);
    let out64 = lode.work("gen64.out");
    lode.ok(&["export", "t64", s(&out64)]);
    assert!(fs::read(&out64).unwrap() == bytes, "64 KiB export differs");

    // A chunk size that is not a power of two is refused, naming it.
    let bad = lode.fails(&["import", s(&src), "--tag", "bad", "--chunk-size", "1000"]);
    assert!(
        bad.stderr.contains("1000") && bad.stderr.contains("chunk size"),
        "{}",
        bad.stderr
    );
    let bad = lode.fails(&["import", s(&src), "--chunk-size", "1024"]);
    assert!(
        bad.stderr
            .contains("chunk size 1024 is not a power of two between"),
        "{}",
        bad.stderr
    );
    lode.fails(&["inspect", "bad"]);
}

#[test]
fn ext4_image_round_trips_and_checks_clean() {
    let (Some(mkfs), Some(e2fsck)) = (
        tool_from("mkfs.ext4", "e2fsprogs"),
        tool_from("e2fsck", "e2fsprogs"),
    ) else {
        return;
    };
    let lode = Lode::new();
    let tree = lode.work("tree");
    fs::create_dir_all(tree.join("etc/app")).unwrap();
    fs::create_dir_all(tree.join("usr/bin")).unwrap();
    fs::write(tree.join("etc/hostname"), "lode\n").unwrap();
    fs::write(tree.join("etc/app/config.toml"), "[app]\nworkers = 4\n").unwrap();
    fs::write(tree.join("usr/bin/tool"), seeded_bytes(3 << 20, 7)).unwrap();
    // The same bytes twice: the second copy's blocks dedup.
    fs::write(tree.join("usr/bin/tool-copy"), seeded_bytes(3 << 20, 7)).unwrap();
    fs::write(tree.join("usr/bin/empty"), b"").unwrap();
    std::os::unix::fs::symlink("tool", tree.join("usr/bin/link")).unwrap();

    let img = lode.work("rootfs.ext4");
    let mk = Command::new(mkfs)
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("32M")
        .output()
        .expect("run mkfs.ext4");
    assert!(
        mk.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let bytes = fs::read(&img).unwrap();
    assert_eq!(bytes.len(), 32 << 20);

    let imported = lode.import(&img, "rootfs", &[]);
    let st = &imported["stats"];
    assert_eq!(u64_of(&st["chunks"], "chunks"), 64);
    assert!(
        u64_of(&st["zero_chunks"], "zero") > 0,
        "a mostly empty filesystem has zero chunks: {imported}"
    );
    assert!(imported["id"].is_string());

    let out = lode.work("rootfs.out");
    lode.ok(&["export", "rootfs", s(&out)]);
    assert!(fs::read(&out).unwrap() == bytes, "ext4 export differs");
    let fsck = Command::new(e2fsck)
        .arg("-fn")
        .arg(&out)
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the export: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    let again = lode.import(&img, "rootfs2", &[]);
    assert_eq!(u64_of(&again["stats"]["uploaded_chunks"], "uploaded"), 0);
}

#[test]
fn empty_and_zero_tailed_images_round_trip() {
    let lode = Lode::new();
    // Zero chunks at the end and a zero partial tail: the export must still have the
    // full length, not stop at the last stored chunk.
    let mut bytes = seeded_bytes(CHUNK + 1000, 10);
    bytes.resize(4 * CHUNK + 777, 0);
    let src = lode.work("tail.img");
    fs::write(&src, &bytes).unwrap();
    let j = lode.import(&src, "tail", &[]);
    assert_eq!(u64_of(&j["stats"]["chunks"], "chunks"), 5);
    assert_eq!(u64_of(&j["stats"]["zero_chunks"], "zero"), 3);
    let names = chunk_names(&lode.inspect("tail"));
    assert!(names[0].is_some() && names[1].is_some());
    assert!(names[2..].iter().all(Option::is_none), "{names:?}");
    let out = lode.work("tail.out");
    lode.ok(&["export", "tail", s(&out)]);
    assert!(
        fs::read(&out).unwrap() == bytes,
        "zero-tailed export differs"
    );

    let empty = lode.work("empty.img");
    fs::write(&empty, b"").unwrap();
    let j = lode.import(&empty, "empty", &[]);
    assert_eq!(u64_of(&j["stats"]["chunks"], "chunks"), 0);
    let out = lode.work("empty.out");
    fs::write(&out, b"old contents").unwrap();
    lode.ok(&["export", "empty", s(&out)]);
    assert_eq!(fs::read(&out).unwrap(), b"");
    lode.ok(&["verify", "empty"]);
}

#[test]
fn importing_a_directory_is_refused_naming_it() {
    let lode = Lode::new();
    let dir = lode.work("a-directory");
    fs::create_dir(&dir).unwrap();
    let o = lode.fails(&["import", s(&dir), "--tag", "d"]);
    assert!(o.stderr.contains(s(&dir)), "{}", o.stderr);
    lode.fails(&["inspect", "d"]);
}

// 2. inspect shows the manifest, never a key.

#[test]
fn inspect_prints_the_manifest_without_keys() {
    let lode = Lode::new();
    let src = lode.work("gen.img");
    let bytes = generated_image(2);
    fs::write(&src, &bytes).unwrap();
    let id = lode.import(&src, "t", &[])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let out = lode.ok(&["inspect", "t"]);
    let view = out.json();
    assert_eq!(view["id"], id.as_str());
    assert_eq!(view["chunk_size"], 524288);
    assert_eq!(
        u64_of(&view["device_size"], "device_size"),
        bytes.len() as u64
    );
    assert_eq!(view["kms_key_id"], "default");
    let names = chunk_names(&view);
    assert_eq!(names.len(), GEN_CHUNKS);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(n.is_none(), GEN_ZERO.contains(&i), "chunk {i}: {n:?}");
        if let Some(n) = n {
            assert_eq!(n.len(), 64);
        }
    }
    assert_eq!(names[10], names[2]);
    assert_eq!(names[20], names[2]);
    assert_ne!(names[1], names[2]);

    // No key material: no field but the KMS key's name mentions a key, no blob, no
    // wrapped key, and the keyring's secret appears nowhere.
    fn walk(v: &Value, path: &str) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let lk = k.to_ascii_lowercase();
                    assert!(
                        k == "kms_key_id"
                            || !(lk.contains("key")
                                || lk.contains("blob")
                                || lk.contains("wrap")
                                || lk.contains("secret")),
                        "inspect shows {path}.{k}"
                    );
                    walk(v, &format!("{path}.{k}"));
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, path)),
            _ => {}
        }
    }
    walk(&view, "");
    let keyring: Value = serde_json::from_slice(&fs::read(lode.keyring()).unwrap()).unwrap();
    let secret = keyring["keys"]["default"].as_str().expect("key hex");
    assert_eq!(secret.len(), 64);
    for text in [&out.stdout, &out.stderr] {
        assert!(!text.to_ascii_lowercase().contains(secret));
        assert!(
            !text
                .to_ascii_uppercase()
                .contains(&secret.to_ascii_uppercase())
        );
    }

    // By manifest id, the same view.
    let by_id = lode.ok(&["inspect", &id]);
    assert_eq!(by_id.json(), view);
}

// 3. verify, and what export does with a damaged store.

#[test]
fn verify_names_missing_and_corrupt_chunks_and_export_leaves_nothing() {
    let lode = Lode::new();
    let src = lode.work("small.img");
    fs::write(&src, small_image(6, 3)).unwrap();
    let id = lode.import(&src, "t", &[])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let good = lode.ok(&["verify", "t"]);
    assert!(good.stdout.starts_with("ok"), "{}", good.stdout);
    assert!(good.stdout.contains(&id), "{}", good.stdout);
    assert!(good.stdout.contains("6 distinct chunks"), "{}", good.stdout);
    let good = lode.ok(&["--json", "verify", "t"]).json();
    assert_eq!(good["ok"], true);

    // Names only, without a keyring: works, and does not create one.
    let moved = lode.work("keyring.json.away");
    fs::rename(lode.keyring(), &moved).unwrap();
    let names_only = lode.ok(&["verify", "--no-decrypt", "t"]);
    assert!(
        names_only.stdout.contains("against their names,"),
        "{}",
        names_only.stdout
    );
    assert!(
        !lode.keyring().exists(),
        "verify --no-decrypt made a keyring"
    );
    fs::rename(&moved, lode.keyring()).unwrap();

    let names = chunk_names(&lode.inspect("t"));
    let (missing, corrupt) = (names[1].clone().unwrap(), names[4].clone().unwrap());
    fs::remove_file(lode.chunk_file(&missing)).unwrap();
    let mut b = fs::read(lode.chunk_file(&corrupt)).unwrap();
    b[1000] ^= 0x40;
    fs::write(lode.chunk_file(&corrupt), b).unwrap();

    let st = lode.ok(&["--json", "store", "stats"]).json();
    assert_eq!(u64_of(&st["missing_chunks"], "missing"), 1, "{st}");

    let bad = lode.run(&["verify", "t"]);
    assert_eq!(bad.code, Some(2), "{}\n{}", bad.stdout, bad.stderr);
    assert!(
        bad.stdout
            .contains(&format!("chunk 1 ({missing}) is missing from the store")),
        "{}",
        bad.stdout
    );
    assert!(
        bad.stdout
            .contains(&format!("chunk 4 ({corrupt}) is corrupt")),
        "{}",
        bad.stdout
    );
    assert!(bad.stdout.contains("2 fault(s)"), "{}", bad.stdout);
    let bad = lode.run(&["--json", "verify", "t"]);
    assert_eq!(bad.code, Some(2));
    let report = bad.json();
    assert_eq!(report["ok"], false);
    let kinds: Vec<_> = report["report"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["kind"].as_str().unwrap(), p["chunk"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("missing", missing.as_str()), ("corrupt", corrupt.as_str())]
    );
    // Without decrypting, the same faults.
    let bad = lode.run(&["verify", "--no-decrypt", "t"]);
    assert_eq!(bad.code, Some(2));
    assert!(bad.stdout.contains(&missing) && bad.stdout.contains(&corrupt));

    // Export fails naming a chunk, and leaves nothing in the output directory.
    let outdir = lode.work("out");
    fs::create_dir(&outdir).unwrap();
    let out = outdir.join("image.raw");
    let failed = lode.fails(&["export", "t", s(&out)]);
    assert!(
        failed.stderr.contains(&missing) || failed.stderr.contains(&corrupt),
        "{}",
        failed.stderr
    );
    assert!(failed.stderr.contains(s(&out)), "{}", failed.stderr);
    assert_eq!(dir_entries(&outdir), Vec::<String>::new());

    // An existing file under OUT is left as it was.
    fs::write(&out, b"precious").unwrap();
    lode.fails(&["export", "t", s(&out)]);
    assert_eq!(fs::read(&out).unwrap(), b"precious");
    assert_eq!(dir_entries(&outdir), ["image.raw"]);

    // With only the corrupt chunk left, export names it and says corrupt.
    fs::remove_file(&out).unwrap();
    fs::write(
        lode.work("one.img"),
        &fs::read(&src).unwrap()[CHUNK..2 * CHUNK],
    )
    .unwrap();
    lode.import(&lode.work("one.img"), "restore", &[]);
    let failed = lode.fails(&["export", "t", s(&out)]);
    assert!(
        failed.stderr.contains(&format!("chunk {corrupt}")) && failed.stderr.contains("corrupt"),
        "{}",
        failed.stderr
    );
    assert_eq!(dir_entries(&outdir), Vec::<String>::new());
}

// 4. Tampered manifests and wrong keys.

#[test]
fn tampered_manifest_is_refused_naming_it() {
    let lode = Lode::new();
    let src = lode.work("small.img");
    let bytes = small_image(3, 4);
    fs::write(&src, &bytes).unwrap();
    let id = lode.import(&src, "t", &[])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = lode.manifest_file(&id);
    let original = fs::read(&path).unwrap();
    assert_eq!(sha256_hex(&original), id, "a manifest's id is its SHA-256");
    let out = lode.work("out.img");

    let check = |what: &str, args: &[&str], want_id: &str| {
        let o = lode.fails(args);
        assert!(
            o.stderr.contains("corrupt") && o.stderr.contains(want_id),
            "{what}: lode {args:?}: {}",
            o.stderr
        );
        assert!(!out.exists(), "{what}: export left {}", out.display());
    };

    // A flipped byte, and a truncation, under the manifest's own name.
    let mut flipped = original.clone();
    flipped[original.len() / 2] ^= 0x01;
    for (what, bad) in [
        ("flipped", flipped),
        ("truncated", original[..100].to_vec()),
    ] {
        fs::write(&path, &bad).unwrap();
        check(what, &["inspect", "t"], &id);
        check(what, &["inspect", &id], &id);
        check(what, &["export", "t", s(&out)], &id);
        check(what, &["verify", "t"], &id);
        check(what, &["verify", "--no-decrypt", "t"], &id);
    }
    fs::write(&path, &original).unwrap();

    // A flipped byte in each field, stored under the id its new bytes hash to (as a
    // forger would): the parser or the manifest's authentication refuses it.
    let config_len = u32::from_le_bytes(original[72..76].try_into().unwrap()) as usize;
    let table = 76 + config_len;
    let key_id_at = table + 32 * 3;
    let key_id_len = usize::from(u16::from_le_bytes(
        original[key_id_at..key_id_at + 2].try_into().unwrap(),
    ));
    assert_eq!(
        &original[key_id_at + 2..key_id_at + 2 + key_id_len],
        b"default"
    );
    let wrapped_at = key_id_at + 2 + key_id_len;
    let fields = [
        ("magic", 0),
        ("version", 8),
        ("flags", 10),
        ("root id", 12),
        ("chunk size", 18),
        ("reserved", 20),
        ("device size", 24),
        ("image digest", 40),
        ("chunk count", 64),
        ("config length", 72),
        ("config", 76),
        ("chunk table", table + 40),
        ("key id length", key_id_at),
        ("key id", key_id_at + 3),
        ("wrapped key length", wrapped_at),
        ("wrapped key", wrapped_at + 20),
        ("key table", wrapped_at + 4 + 61 + 10),
        ("key table tag", original.len() - 1),
    ];
    for (field, at) in fields {
        let mut bad = original.clone();
        bad[at] ^= 0x01;
        let bad_id = sha256_hex(&bad);
        fs::write(lode.manifest_file(&bad_id), &bad).unwrap();
        check(field, &["export", &bad_id, s(&out)], &bad_id);
        check(field, &["verify", &bad_id], &bad_id);
        fs::remove_file(lode.manifest_file(&bad_id)).unwrap();
    }

    // The original still exports.
    lode.ok(&["export", "t", s(&out)]);
    assert!(fs::read(&out).unwrap() == bytes);
    fs::remove_file(&out).unwrap();

    // Another keyring, given with --kms: the key is refused, naming the manifest.
    let other = lode.work("other-keyring.json");
    lode.ok(&["--kms", s(&other), "kms", "list"]);
    let o = lode.fails(&["--kms", s(&other), "export", "t", s(&out)]);
    assert!(
        o.stderr.contains(&format!("manifest {id}"))
            && o.stderr.contains("was made under another key"),
        "{}",
        o.stderr
    );
    assert!(!out.exists());

    // The keyring lost: reading commands say so, naming it, and do not make a new one
    // (which could never unwrap the stored images).
    fs::remove_file(lode.keyring()).unwrap();
    let keyring = lode.keyring().display().to_string();
    let o = lode.fails(&["export", "t", s(&out)]);
    assert!(
        o.stderr.contains(&keyring) && o.stderr.contains("no keyring here"),
        "{}",
        o.stderr
    );
    let o = lode.fails(&["verify", "t"]);
    assert!(o.stderr.contains(&keyring), "{}", o.stderr);
    assert!(!out.exists());
    assert!(!lode.keyring().exists());
    // Names can still be checked without keys.
    lode.ok(&["verify", "--no-decrypt", "t"]);
}

// 5. Store-wide figures.

#[test]
fn store_stats_count_what_is_on_disk() {
    let lode = Lode::new();
    let a = small_image(8, 5);
    let mut b = a.clone();
    // b: chunk 2 rewritten, chunk 5 zeroed, two chunks appended.
    fill_seeded(&mut b[2 * CHUNK..3 * CHUNK], 99);
    b[5 * CHUNK..6 * CHUNK].fill(0);
    b.extend(seeded_bytes(2 * CHUNK, 100));
    fs::write(lode.work("a.img"), &a).unwrap();
    fs::write(lode.work("b.img"), &b).unwrap();
    let ida = lode.import(&lode.work("a.img"), "app:1", &[])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ib = lode.import(&lode.work("b.img"), "app:2", &[]);
    assert_eq!(u64_of(&ib["stats"]["present_chunks"], "present"), 6, "{ib}");
    assert_eq!(u64_of(&ib["stats"]["uploaded_chunks"], "uploaded"), 3);
    let idb = ib["id"].as_str().unwrap().to_owned();

    let st = lode.ok(&["store", "stats", "--json"]).json();
    let chunk_files = files_under(&lode.root_dir().join("chunks"));
    let on_disk: u64 = chunk_files
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(u64_of(&st["chunks"], "chunks"), chunk_files.len() as u64);
    assert_eq!(u64_of(&st["chunks"], "chunks"), 11);
    assert_eq!(u64_of(&st["stored_bytes"], "stored_bytes"), on_disk);
    // a's eight chunks, b's rewritten chunk 2 and its two new ones.
    let distinct: u64 = a
        .chunks(CHUNK)
        .chain([&b[2 * CHUNK..3 * CHUNK]])
        .chain(b[8 * CHUNK..].chunks(CHUNK))
        .map(stored_len)
        .sum();
    assert_eq!(on_disk, distinct);
    assert_eq!(
        u64_of(&st["logical_bytes"], "logical_bytes"),
        ((8 + 9) * CHUNK) as u64
    );
    assert_eq!(
        u64_of(&st["device_bytes"], "device_bytes"),
        (a.len() + b.len()) as u64
    );
    assert_eq!(u64_of(&st["manifests"], "manifests"), 2);
    assert_eq!(u64_of(&st["tags"], "tags"), 2);
    assert_eq!(u64_of(&st["missing_chunks"], "missing"), 0);
    let ratio = st["dedup_ratio"].as_f64().unwrap();
    assert!(ratio > 1.0, "{st}");
    assert!((ratio - (17 * CHUNK) as f64 / on_disk as f64).abs() < 1e-9);

    let human = lode.ok(&["store", "stats"]);
    assert!(
        human.stdout.contains("chunks         11"),
        "{}",
        human.stdout
    );
    assert!(human.stdout.contains("dedup ratio"), "{}", human.stdout);

    let tags = lode.ok(&["store", "tags"]);
    assert!(
        tags.stdout.contains(&format!("{ida}  app:1")),
        "{}",
        tags.stdout
    );
    assert!(
        tags.stdout.contains(&format!("{idb}  app:2")),
        "{}",
        tags.stdout
    );
    let tags = lode.ok(&["--json", "store", "tags"]).json();
    assert_eq!(
        tags,
        serde_json::json!([{"tag": "app:1", "id": ida}, {"tag": "app:2", "id": idb}])
    );
}

// 6. Bad input.

#[test]
fn bad_input_is_named() {
    let lode = Lode::new();
    let src = lode.work("small.img");
    fs::write(&src, small_image(2, 6)).unwrap();

    for (url, why) in [
        ("gs://x", "unknown scheme \"gs\""),
        ("s3://UPPER", "bucket name"),
        ("s3://b", "bucket name"),
        ("file://relative/dir", "absolute path"),
    ] {
        for args in [
            vec!["--store", url, "import", s(&src), "--tag", "t"],
            vec!["--store", url, "store", "stats"],
        ] {
            let o = lode.fails(&args);
            assert!(
                o.stderr
                    .contains(&format!("store location \"{url}\" is invalid"))
                    && o.stderr.contains(why),
                "{args:?}: {}",
                o.stderr
            );
        }
    }

    let missing = lode.work("no-such.img");
    let o = lode.fails(&["import", s(&missing), "--tag", "t"]);
    assert!(
        o.stderr.contains(s(&missing)) && o.stderr.contains("No such file"),
        "{}",
        o.stderr
    );

    lode.import(&src, "t", &[]);
    for args in [
        vec!["inspect", "nope"],
        vec!["export", "nope", "/tmp/never-written-by-lode-tests"],
        vec!["verify", "nope"],
    ] {
        let o = lode.fails(&args);
        assert!(
            o.stderr.contains("tag \"nope\" is not in store"),
            "{args:?}: {}",
            o.stderr
        );
    }
    let unknown = "ab".repeat(32);
    let o = lode.fails(&["inspect", &unknown]);
    assert!(
        o.stderr.contains(&unknown) && o.stderr.contains("not in store"),
        "{}",
        o.stderr
    );
    let o = lode.fails(&["import", s(&src), "--tag", "two words"]);
    assert!(
        o.stderr.contains("tag \"two words\" is invalid"),
        "{}",
        o.stderr
    );

    // An S3 endpoint nobody listens on: a prompt error naming the store.
    let env = [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
        ("AWS_ACCESS_KEY_ID", "lode-test"),
        ("AWS_SECRET_ACCESS_KEY", "lode-test-secret"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    for args in [
        vec!["--store", "s3://bucket/p", "import", s(&src), "--tag", "t"],
        vec!["--store", "s3://bucket/p", "inspect", "t"],
        vec!["--store", "s3://bucket/p", "store", "stats"],
    ] {
        let o = check_failed(&args, lode.run_env(&args, &env));
        assert!(o.stderr.contains("s3://bucket/p"), "{args:?}: {}", o.stderr);
        assert!(
            o.elapsed < Duration::from_secs(40),
            "{args:?}: {:?}",
            o.elapsed
        );
    }
}

// 7. The keyring.

#[test]
fn keyring_is_private_and_keys_are_named() {
    let lode = Lode::new();
    let src = lode.work("small.img");
    let bytes = small_image(2, 8);
    fs::write(&src, &bytes).unwrap();
    assert!(!lode.keyring().exists());
    lode.import(&src, "before", &[]);
    let mode = fs::metadata(lode.keyring()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keyring mode {mode:o}");

    let o = lode.ok(&["kms", "create", "tenant-a", "--default"]);
    assert!(o.stdout.contains("tenant-a"), "{}", o.stdout);
    let mode = fs::metadata(lode.keyring()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keyring mode after create {mode:o}");
    lode.import(&src, "after", &[]);
    assert_eq!(lode.inspect("before")["kms_key_id"], "default");
    assert_eq!(lode.inspect("after")["kms_key_id"], "tenant-a");
    lode.import(&src, "chosen", &["--kms-key", "default"]);
    assert_eq!(lode.inspect("chosen")["kms_key_id"], "default");
    let o = lode.fails(&["import", s(&src), "--kms-key", "nobody"]);
    assert!(
        o.stderr.contains("KMS key \"nobody\" is not in keyring"),
        "{}",
        o.stderr
    );

    let list = lode.ok(&["kms", "list"]);
    assert_eq!(list.stdout, "default\ntenant-a (default)\n");
    let list = lode.ok(&["--json", "kms", "list"]).json();
    assert_eq!(list["default"], "tenant-a");
    assert_eq!(list["keys"], serde_json::json!(["default", "tenant-a"]));

    // Images under either key still export.
    for tag in ["before", "after"] {
        let out = lode.work(&format!("{tag}.out"));
        lode.ok(&["export", tag, s(&out)]);
        assert!(fs::read(&out).unwrap() == bytes, "{tag} export differs");
    }

    let o = lode.fails(&["kms", "create", "tenant-a"]);
    assert!(o.stderr.contains("already exists"), "{}", o.stderr);
    let o = lode.fails(&["kms", "create", "no spaces"]);
    assert!(
        o.stderr.contains("KMS key name \"no spaces\" is invalid"),
        "{}",
        o.stderr
    );

    // Readable by others: refused, with the fix in the message.
    fs::set_permissions(lode.keyring(), fs::Permissions::from_mode(0o644)).unwrap();
    let out = lode.work("refused.out");
    for args in [
        vec!["kms", "list"],
        vec!["import", s(&src), "--tag", "x"],
        vec!["export", "after", s(&out)],
    ] {
        let o = lode.fails(&args);
        assert!(
            o.stderr.contains(s(&lode.keyring()))
                && o.stderr.contains("mode 644")
                && o.stderr.contains("chmod 600"),
            "{args:?}: {}",
            o.stderr
        );
    }
    assert!(!out.exists());
}

// 8. The demo and the help.

#[test]
fn demo_runs_on_a_fresh_home() {
    let lode = Lode::new();
    let o = lode.ok(&["demo", "--size-mib", "8"]);
    assert!(o.stdout.contains("matches byte for byte"), "{}", o.stdout);
    assert!(o.stdout.contains("demo/app2"), "{}", o.stdout);
    assert!(o.stdout.contains("dedup ratio"), "{}", o.stdout);
    assert!(lode.keyring().exists());
    // Step 6: the second start goes to the worker that has the image warm, a file is
    // read through it, and the other worker is refused the image's key.
    for want in [
        "flattener (put-only): demo/app2",
        "the flattener reads nothing back: store",
        "placed: warm on worker-",
        "read /etc/app.conf",
        "refused (403): key of manifest",
        "it is assigned to worker worker-",
    ] {
        assert!(o.stdout.contains(want), "{want:?} missing: {}", o.stdout);
    }

    let other = Lode::new();
    let j = other.ok(&["demo", "--json", "--size-mib", "8"]).json();
    assert_eq!(j["export_matches_source"], true, "{j}");
    assert_eq!(j["verify"]["problems"], serde_json::json!([]));
    assert!(j["store"]["dedup_ratio"].as_f64().unwrap() > 1.0, "{j}");
    assert_eq!(j["imports"].as_array().unwrap().len(), 2);
    // The two flattened images share their base layer: app2 uploads less than app1.
    let flat = j["flattened"].as_array().unwrap();
    assert_eq!(flat.len(), 2, "{j}");
    assert!(
        u64_of(&flat[1]["stats"]["present_chunks"], "present") >= 40,
        "app2 reused too little of app1: {j}"
    );

    // Step 6, in figures: the put-only flattener still deduplicated app2's base layer;
    // both starts went to one worker, the second because it was warm; the other worker
    // was refused.
    let roles = &j["roles"];
    let flat = roles["flattened"].as_array().unwrap();
    assert!(
        u64_of(&flat[1]["stats"]["present_chunks"], "present") >= 40,
        "the put-only flattener deduplicated too little: {roles}"
    );
    assert!(
        roles["flattener_read_back"]
            .as_str()
            .unwrap()
            .contains("put-only"),
        "{roles}"
    );
    let starts = roles["starts"].as_array().unwrap();
    assert_eq!(starts.len(), 2, "{roles}");
    assert_eq!(starts[0]["placed"], "hashed", "{roles}");
    assert_eq!(starts[1]["placed"], "warm", "{roles}");
    assert_eq!(starts[0]["worker"], starts[1]["worker"], "{roles}");
    assert_ne!(starts[0]["start"], starts[1]["start"], "{roles}");
    assert!(u64_of(&roles["read"]["bytes"], "bytes read") > 0, "{roles}");
    let refusal = &roles["refusal"];
    assert_ne!(refusal["worker"], starts[1]["worker"], "{roles}");
    let message = refusal["message"].as_str().unwrap();
    assert!(
        message.starts_with("refused (403)")
            && message.contains(starts[1]["start"].as_str().unwrap())
            && message.contains(&format!(
                "it is assigned to worker {}",
                starts[1]["worker"].as_str().unwrap()
            )),
        "{roles}"
    );

    // Step 10: one image deleted, the root rotated and the old one collected; the store
    // shrank by exactly the dead bytes the old root held, and app2 still reads.
    let gc = &j["gc"];
    assert_eq!(gc["retired"], 1, "{j}");
    assert_eq!(gc["active"], 2, "{j}");
    let dead = u64_of(&gc["dead_bytes_before"], "dead");
    assert!(dead > 0, "{j}");
    assert_eq!(
        u64_of(&gc["stored_bytes_before"], "before") - u64_of(&gc["stored_bytes_after"], "after"),
        dead,
        "{j}"
    );
    assert!(
        u64_of(&gc["reclaimed_bytes"], "reclaimed") >= u64_of(&gc["stored_bytes_after"], "after"),
        "{j}"
    );
    assert!(o.stdout.contains("root 1 deleted"), "{}", o.stdout);
    let roots = other.ok(&["--json", "root", "ls"]).json();
    let states: Vec<&str> = roots
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["deleted", "active"], "{roots}");
    assert!(
        other
            .fails(&["export", "demo/raw-base", "/dev/null"])
            .stderr
            .contains("demo/raw-base")
    );

    let o = lode.fails(&["demo", "--size-mib", "0"]);
    assert!(o.stderr.contains("--size-mib"), "{}", o.stderr);
}

#[test]
fn help_mentions_the_store_and_the_flags() {
    let lode = Lode::new();
    let top = lode.ok(&["--help"]).stdout;
    for want in [
        "--store",
        "--kms",
        "s3://",
        "LODE_HOME",
        "import",
        "export",
        "verify",
    ] {
        assert!(top.contains(want), "lode --help lacks {want:?}:\n{top}");
    }
    let import = lode.ok(&["import", "--help"]).stdout;
    for want in [
        "--tag",
        "--chunk-size",
        "--store",
        "--kms",
        "--json",
        "s3://",
    ] {
        assert!(
            import.contains(want),
            "lode import --help lacks {want:?}:\n{import}"
        );
    }
    let o = lode.fails(&["import"]);
    assert!(o.stderr.contains("<FILE>"), "{}", o.stderr);
    // Help does not touch the data directory.
    assert!(!lode.home().exists());
}

#[test]
fn json_flag_works_after_the_subcommand_and_env_vars_are_read() {
    let lode = Lode::new();
    let src = lode.work("small.img");
    fs::write(&src, small_image(1, 9)).unwrap();
    let j = lode.ok(&["import", s(&src), "--json", "--tag", "t"]).json();
    assert_eq!(u64_of(&j["stats"]["chunks"], "chunks"), 1);
    // LODE_STORE and LODE_KMS stand in for the flags.
    let store = lode.work("elsewhere-store");
    let kms = lode.work("elsewhere-keyring.json");
    let args = ["--json", "import", s(&src), "--tag", "e"];
    let o = lode.run_env(&args, &[("LODE_STORE", s(&store)), ("LODE_KMS", s(&kms))]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(store.join("roots/1/ROOT").exists());
    assert!(kms.exists());
}

// 9. Flattening OCI images (the sample family lode-oci writes: app1 and app2 over one
// shared base layer).

fn sample_layout(lode: &Lode) -> PathBuf {
    let dir = lode.work("sample-oci");
    lode_oci::sample::write_sample_family(&dir).expect("write the sample OCI layout");
    dir
}

fn manifest_count(lode: &Lode) -> usize {
    fs::read_dir(lode.root_dir().join("manifests")).map_or(0, |d| d.count())
}

fn e2fsck_clean(image: &Path) {
    let Some(e2fsck) = tool_from("e2fsck", "e2fsprogs") else {
        return;
    };
    let o = Command::new(e2fsck)
        .args(["-fn", s(image)])
        .output()
        .expect("run e2fsck");
    assert!(
        o.status.success(),
        "e2fsck -fn {}:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn flatten_publishes_a_clean_ext4_image_with_its_config() {
    let lode = Lode::new();
    let layout = sample_layout(&lode);
    let kept = lode.work("app1.ext4");
    let src = format!("oci:{}:app1", layout.display());
    let j = lode
        .ok(&[
            "--json",
            "flatten",
            &src,
            "--tag",
            "a1",
            "--keep-image",
            s(&kept),
        ])
        .json();
    e2fsck_clean(&kept);
    assert_eq!(j["layers"].as_array().map(Vec::len), Some(2), "{j}");
    assert_eq!(
        u64_of(&j["image_size"], "image_size"),
        fs::metadata(&kept).unwrap().len()
    );
    // The manifest carries the image config, and exports to the flattened bytes.
    let m = lode.ok(&["inspect", "a1"]).json();
    assert_eq!(m["config"]["entrypoint"], serde_json::json!(["/app/run"]));
    assert_eq!(m["config"]["working_dir"], "/app");
    assert_eq!(m["config"]["user"], "1000:1000");
    let out = lode.work("a1.out");
    lode.ok(&["export", "a1", s(&out)]);
    assert!(fs::read(&out).unwrap() == fs::read(&kept).unwrap());
}

#[test]
fn flatten_is_deterministic_across_stores_and_dedups_the_base_layer() {
    let one = Lode::new();
    let layout = sample_layout(&one);
    let (k1, k2) = (one.work("one.ext4"), one.work("two.ext4"));
    let app1 = format!("oci:{}:app1", layout.display());
    one.ok(&["flatten", &app1, "--tag", "a1", "--keep-image", s(&k1)]);
    // Another store and keyring, another working directory, TZ and umask.
    let two = Lode::new();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lode"));
    cmd.args([
        "-q",
        "flatten",
        &app1,
        "--tag",
        "a1",
        "--keep-image",
        s(&k2),
    ])
    .env("LODE_HOME", two.home())
    .env("TZ", "Pacific/Chatham")
    .current_dir(two.work(""));
    let st = Command::new("sh")
        .args(["-c", "umask 077 && exec \"$@\"", "sh"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(cmd.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .current_dir(two.work(""))
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        fs::read(&k1).unwrap() == fs::read(&k2).unwrap(),
        "images differ"
    );
    // Into the same store twice: the same chunk table.
    one.ok(&["flatten", &app1, "--tag", "a1-again"]);
    let (t1, t2) = (
        one.ok(&["inspect", "a1"]).json(),
        one.ok(&["inspect", "a1-again"]).json(),
    );
    assert_eq!(t1["chunks"], t2["chunks"]);

    // app2 after app1: every chunk of the base layer's region is already stored.
    let app2 = format!("oci:{}:app2", layout.display());
    let j = one.ok(&["--json", "flatten", &app2, "--tag", "a2"]).json();
    let m2 = one.ok(&["inspect", "a2"]).json();
    let cs = u64_of(&m2["chunk_size"], "chunk_size");
    let base = &j["layers"][0];
    let index = |v: u64| usize::try_from(v).expect("chunk index fits usize");
    let (lo, hi) = (
        index(u64_of(&base["region_start"], "region_start") / cs),
        index(u64_of(&base["region_end"], "region_end").div_ceil(cs)),
    );
    let have: std::collections::HashSet<&Value> = t1["chunks"].as_array().unwrap().iter().collect();
    let region: Vec<&Value> = m2["chunks"].as_array().unwrap()[lo..hi]
        .iter()
        .filter(|c| !c.is_null())
        .collect();
    assert!(region.len() >= 40, "base region of {} chunks", region.len());
    let shared = region.iter().filter(|c| have.contains(*c)).count();
    assert!(
        shared * 100 >= region.len() * 95,
        "only {shared} of {} base-region chunks deduplicated",
        region.len()
    );
    assert!(index(u64_of(&j["stats"]["present_chunks"], "present")) >= shared);
}

#[test]
fn a_failed_flatten_publishes_nothing_and_names_the_layer() {
    let lode = Lode::new();
    let layout = sample_layout(&lode);
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let manifest: Value = serde_json::from_slice(
        &fs::read(
            layout
                .join("blobs/sha256")
                .join(&manifest_digest["sha256:".len()..]),
        )
        .unwrap(),
    )
    .unwrap();
    // Truncate the top layer's blob: its digest no longer matches and its gzip ends early.
    let layer = manifest["layers"][1]["digest"].as_str().unwrap().to_owned();
    let blob = layout.join("blobs/sha256").join(&layer["sha256:".len()..]);
    let bytes = fs::read(&blob).unwrap();
    fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
    let before = manifest_count(&lode);
    let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap();
    let o = lode.fails(&[
        "flatten",
        &format!("oci:{}:{tag}", layout.display()),
        "--tag",
        "bad",
    ]);
    assert!(
        o.stderr.contains(&layer["sha256:".len()..][..12]) || o.stderr.contains(&layer),
        "{}",
        o.stderr
    );
    assert_eq!(manifest_count(&lode), before, "a manifest was published");
    let tags = lode.ok(&["store", "tags"]).stdout;
    assert!(!tags.contains("bad"), "a tag was set: {tags}");
    // No scratch image left behind.
    let tmp = lode.home().join("tmp");
    assert_eq!(
        fs::read_dir(&tmp).map_or(0, |d| d.count()),
        0,
        "scratch files left in {}",
        tmp.display()
    );
}

/// The registry harness of lode-registry's own tests: a real `docker-registry` on
/// 127.0.0.1 and skopeo to push to it.
#[path = "../../lode-registry/tests/common/mod.rs"]
mod registry;

#[test]
fn flatten_pulls_from_a_registry_and_gets_the_same_image() {
    let Some(reg) = registry::Registry::start(None) else {
        return;
    };
    let lode = Lode::new();
    let layout = sample_layout(&lode);
    let oci = format!("oci:{}:app1", layout.display());
    let remote = format!("docker://{}/sample/app:app1", reg.addr);
    registry::skopeo_copy(&[], &oci, &remote);
    let (from_oci, from_registry) = (lode.work("oci.ext4"), lode.work("registry.ext4"));
    lode.ok(&["flatten", &oci, "--tag", "o", "--keep-image", s(&from_oci)]);
    let j = lode
        .ok(&[
            "--json",
            "flatten",
            &remote,
            "--tag",
            "r",
            "--keep-image",
            s(&from_registry),
        ])
        .json();
    // The same layers give the same ext4 bytes, whichever way they arrived.
    assert!(fs::read(&from_oci).unwrap() == fs::read(&from_registry).unwrap());
    assert_eq!(u64_of(&j["stats"]["uploaded_chunks"], "uploaded"), 0, "{j}");
    assert_eq!(j["config"]["entrypoint"], serde_json::json!(["/app/run"]));
    assert!(lode.home().join("cache/registry/index.json").exists());
    // A tag the registry lacks is named in the error, and nothing is published.
    let missing = format!("docker://{}/sample/app:nope", reg.addr);
    let o = lode.fails(&["flatten", &missing, "--tag", "n"]);
    assert!(
        o.stderr.contains("sample/app") && o.stderr.contains(&reg.addr),
        "{}",
        o.stderr
    );
    assert!(!lode.ok(&["store", "tags"]).stdout.contains(" n\n"));
}

/// `lode flatten ARGS` started in the background, with its output in `out`-named files.
fn spawn_lode(lode: &Lode, args: &[&str], out: &str) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lode"));
    cmd.args(args)
        .env("LODE_HOME", lode.home())
        .stdin(Stdio::null())
        .stdout(fs::File::create(lode.work(&format!("{out}.stdout"))).unwrap())
        .stderr(fs::File::create(lode.work(&format!("{out}.stderr"))).unwrap());
    for var in ["LODE_STORE", "LODE_KMS", "LODE_KMS_KEY"] {
        cmd.env_remove(var);
    }
    cmd.spawn().expect("spawn lode")
}

/// Two repositories hold a tag of the same name (`latest`) with different images; flattens
/// of both run at the same time against one `$LODE_HOME` (one pull cache), again and again.
/// Each flatten must publish its own repository's image, never the other's.
#[test]
fn concurrent_flattens_of_same_named_tags_never_cross() {
    let Some(reg) = registry::Registry::start(None) else {
        return;
    };
    let lode = Lode::new();
    let layout = sample_layout(&lode);
    let teams = [("team-a", "app1"), ("team-b", "app2")];
    let mut want = Vec::new();
    for (team, app) in teams {
        let oci = format!("oci:{}:{app}", layout.display());
        registry::skopeo_copy(
            &[],
            &oci,
            &format!("docker://{}/{team}/app:latest", reg.addr),
        );
        let keep = lode.work(&format!("{team}.ext4"));
        lode.ok(&["flatten", &oci, "--keep-image", s(&keep)]);
        want.push(fs::read(&keep).unwrap());
    }
    assert!(
        want[0] != want[1],
        "the two images must differ for the test to mean anything"
    );
    let rounds = 6;
    for round in 0..rounds {
        let children: Vec<_> = teams
            .iter()
            .map(|(team, _)| {
                let name = format!("{team}-{round}");
                let keep = lode.work(&format!("{name}.ext4"));
                let source = format!("docker://{}/{team}/app:latest", reg.addr);
                spawn_lode(
                    &lode,
                    &["flatten", &source, "--tag", &name, "--keep-image", s(&keep)],
                    &name,
                )
            })
            .collect();
        for ((team, _), mut child) in teams.iter().zip(children) {
            let name = format!("{team}-{round}");
            let status = child.wait().unwrap();
            let stderr = fs::read_to_string(lode.work(&format!("{name}.stderr"))).unwrap();
            assert!(status.success(), "flatten {name}: {status:?}\n{stderr}");
        }
        for (i, (team, _)) in teams.iter().enumerate() {
            let got = fs::read(lode.work(&format!("{team}-{round}.ext4"))).unwrap();
            assert!(
                got == want[i],
                "round {round}: {team} got the other repository's image"
            );
        }
    }
    // What the store publishes under each tag is that tag's own image too.
    for (i, (team, _)) in teams.iter().enumerate() {
        let out = lode.work(&format!("{team}-export.ext4"));
        lode.ok(&["export", &format!("{team}-{}", rounds - 1), s(&out)]);
        assert!(fs::read(&out).unwrap() == want[i], "export of {team}");
    }
}

/// A registry that drips a layer fails `lode flatten` within the rate window set by the
/// flags, naming the blob, and publishes nothing; the flags are in `--help`.
#[test]
fn a_dripping_registry_fails_flatten_by_the_rate_flags() {
    let lode = Lode::new();
    let help = lode.ok(&["flatten", "--help"]).stdout;
    for want in [
        "--pull-min-rate",
        "LODE_PULL_MIN_RATE",
        "--pull-rate-window",
        "64KiB",
    ] {
        assert!(
            help.contains(want),
            "lode flatten --help lacks {want:?}:\n{help}"
        );
    }
    let layer = registry::layer(&[("f", b"slow")]);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    }))
    .unwrap();
    let (config_digest, layer_digest) = (registry::digest(&config), registry::digest(&layer.gz));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer.gz.len()}],
    }))
    .unwrap();
    let (ld, gz) = (layer_digest.clone(), layer.gz.clone());
    let server = registry::FakeServer::start(move |req| {
        let path = req.target.split('?').next().unwrap_or_default();
        if path == "/v2/" {
            registry::Reply::new(200, "{}")
        } else if path.contains("/manifests/") {
            registry::Reply::new(200, manifest.clone())
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        } else if path.ends_with(&ld) {
            registry::Reply::new(200, gz.clone()).drip(Duration::from_millis(250))
        } else {
            registry::Reply::new(200, config.clone())
        }
    });
    let o = lode.fails(&[
        "flatten",
        &format!("docker://{}/slow/app:v1", server.addr),
        "--tag",
        "slow",
        "--pull-min-rate",
        "100",
        "--pull-rate-window",
        "1",
    ]);
    assert!(
        o.stderr.contains(&format!(
            "blob {layer_digest} from registry {} in repository slow/app is too slow: ",
            server.addr
        )) && o.stderr.contains("under the minimum of 100 bytes/s"),
        "{}",
        o.stderr
    );
    assert_eq!(manifest_count(&lode), 0);
}

/// A flatten killed with SIGKILL cannot remove its scratch image; the next flatten does,
/// because no process holds the dead one's lock.
#[test]
fn a_killed_flattens_scratch_image_is_reclaimed_by_the_next() {
    let lode = Lode::new();
    let big = lode.work("big-oci");
    // Incompressible contents, so that flattening takes long enough to be killed mid-way.
    let contents = seeded_bytes(48 << 20, 11);
    registry::build_layout_with(&big, "big", &contents);
    let tmp = lode.home().join("tmp");
    let scratch = || -> Vec<PathBuf> {
        fs::read_dir(&tmp).map_or(Vec::new(), |d| d.map(|e| e.unwrap().path()).collect())
    };
    let source = format!("oci:{}:big", big.display());
    let mut left = Vec::new();
    for attempt in 0..5 {
        let mut child = spawn_lode(
            &lode,
            &["flatten", &source, "--tag", "big"],
            &format!("killed-{attempt}"),
        );
        let started = Instant::now();
        loop {
            if !scratch().is_empty() {
                child.kill().unwrap();
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "flatten never started"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let status = child.wait().unwrap();
        left = scratch();
        if !left.is_empty() {
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(9),
                "{status:?}"
            );
            break;
        }
    }
    assert_eq!(left.len(), 1, "the killed flatten left {left:?}");
    let name = left[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with("flatten-") && name.ends_with(".ext4"),
        "{name}"
    );

    let sample = sample_layout(&lode);
    lode.ok(&[
        "flatten",
        &format!("oci:{}:app1", sample.display()),
        "--tag",
        "a",
    ]);
    assert!(
        !left[0].exists(),
        "{} survived the next flatten",
        left[0].display()
    );
    assert_eq!(scratch(), Vec::<PathBuf>::new());
}

#[test]
fn a_closed_stdout_ends_quietly_instead_of_panicking() {
    // `lode ... | head` closes the pipe early; the reader here is closed before lode
    // starts, so its first write meets EPIPE every time.
    let l = Lode::new();
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two-int array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] is the read end just created and owned by nobody else.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is the write end just created; the OwnedFd takes it over.
    let write_end =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let out = Command::new(env!("CARGO_BIN_EXE_lode"))
        .args(["kms", "list"])
        .env("LODE_HOME", l.home())
        .env("LODE_KMS", l.dir.path().join("keyring.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .expect("run lode");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
}
