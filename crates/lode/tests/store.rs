//! The store as hostile input, through the real `lode` binary on a local store: damaged
//! chunks repaired by `verify --repair` and by a republish, a killed import's staging
//! files reclaimed by `store fsck`, concurrent first imports, bad tags among good ones,
//! and 4 GiB sparse objects refused without the memory to hold them.

#[path = "common/harness.rs"]
mod harness;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use harness::{Home, random_image};
use serde_json::Value;

const HOST_SECRET: &str = "root:$6$hostsalt$thisisthehostpasswordhash:19000:0:99999:7:::\n";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn store_dir(h: &Home) -> PathBuf {
    h.home().join("store")
}

fn chunk_file(h: &Home, name: &str) -> PathBuf {
    store_dir(h).join(format!("roots/1/chunks/{}/{name}", &name[..2]))
}

fn chunk_names(h: &Home, image: &str) -> Vec<String> {
    let v = h.json(&["inspect", image]);
    v["chunks"]
        .as_array()
        .expect("inspect lists chunks")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect()
}

fn import(h: &Home, file: &Path, tag: &str) -> Value {
    h.json(&["import", s(file), "--tag", tag])
}

fn code(h: &Home, args: &[&str]) -> (Option<i32>, String, String) {
    let out = h.run(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn staging_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(staging_files(&p));
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('#'))
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            out.push(p);
        }
    }
    out
}

/// A flipped bit and a zero tail keep a chunk's size. `verify` names both; `--repair`
/// removes them and a re-import uploads them again; and a republish alone, without
/// verify, finds and replaces such damage itself.
#[test]
fn damaged_chunks_are_repaired_by_verify_and_by_republish() {
    let h = Home::new();
    let src = h.path("img.raw");
    fs::write(&src, random_image(6, 1)).unwrap();
    import(&h, &src, "app:1");
    let names = chunk_names(&h, "app:1");
    assert_eq!(names.len(), 6);
    let damage = |h: &Home| {
        let mut b = fs::read(chunk_file(h, &names[1])).unwrap();
        b[777] ^= 0x04;
        fs::write(chunk_file(h, &names[1]), b).unwrap();
        let mut b = fs::read(chunk_file(h, &names[3])).unwrap();
        let len = b.len();
        b[len / 2..].fill(0);
        fs::write(chunk_file(h, &names[3]), b).unwrap();
    };

    damage(&h);
    let (c, out, _) = code(&h, &["verify", "app:1"]);
    assert_eq!(c, Some(2), "{out}");
    assert!(
        out.contains(&format!("chunk 1 ({}) is corrupt", names[1])),
        "{out}"
    );
    assert!(
        out.contains(&format!("chunk 3 ({}) is corrupt", names[3])),
        "{out}"
    );

    let (c, out, _) = code(&h, &["verify", "--repair", "app:1"]);
    assert_eq!(c, Some(2), "{out}");
    for n in [&names[1], &names[3]] {
        assert!(out.contains(&format!("REMOVED chunk {n}")), "{out}");
        assert!(!chunk_file(&h, n).exists());
    }
    let again = import(&h, &src, "app:1");
    assert_eq!(again["stats"]["uploaded_chunks"], 2, "{again}");
    assert!(h.ok(&["verify", "app:1"]).starts_with("ok"));

    // A republish alone repairs: the existing objects are read back, not trusted by size.
    damage(&h);
    let again = import(&h, &src, "app:1");
    assert_eq!(again["stats"]["repaired_chunks"], 2, "{again}");
    assert_eq!(again["stats"]["uploaded_chunks"], 2, "{again}");
    assert_eq!(again["stats"]["present_chunks"], 4, "{again}");
    assert!(h.ok(&["verify", "app:1"]).starts_with("ok"));
}

/// `kill -9` of a real import while it uploads leaves staging files (`<name>#<n>`);
/// `lode store fsck` lists them, leaves young ones by default, removes them with
/// `--older-than 0`, and the next import and verify succeed.
#[test]
fn killed_import_leaves_staging_that_fsck_reclaims() {
    let h = Home::new();
    h.ok(&["kms", "list"]);
    let src = h.path("big.raw");
    fs::write(&src, random_image(192, 2)).unwrap();
    let dir = store_dir(&h);
    let mut caught = Vec::new();
    for _attempt in 0..30 {
        let mut child = h
            .cmd(&["--quiet", "import", s(&src), "--tag", "big"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if !staging_files(&dir).is_empty() {
                // Child::kill sends SIGKILL: the `kill -9` of the attack.
                child.kill().unwrap();
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
        }
        let _ = child.kill();
        child.wait().unwrap();
        caught = staging_files(&dir);
        if !caught.is_empty() {
            break;
        }
    }
    assert!(!caught.is_empty(), "no import was caught mid-upload");

    // Listings never show them; the default safe age leaves them (a writer may be live).
    h.ok(&["store", "stats"]);
    let report = h.json(&["store", "fsck"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["report"]["staging_young"], caught.len(), "{report}");
    assert_eq!(staging_files(&dir), caught);

    // A dry run names them and fails; a real run removes them.
    let (c, out, _) = code(&h, &["store", "fsck", "--dry-run", "--older-than", "0"]);
    assert_eq!(c, Some(2), "{out}");
    for f in &caught {
        let key = f.strip_prefix(&dir).unwrap().to_str().unwrap().to_owned();
        assert!(out.contains(&format!("staging file {key} (")), "{out}");
    }
    assert_eq!(staging_files(&dir), caught);
    let (c, out, _) = code(&h, &["store", "fsck", "--older-than", "0"]);
    assert_eq!(c, Some(0), "{out}");
    assert!(out.contains(": removed"), "{out}");
    assert!(staging_files(&dir).is_empty());
    let report = h.json(&["store", "fsck", "--older-than", "0"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["report"]["faults"],
        serde_json::json!([]),
        "{report}"
    );

    import(&h, &src, "big");
    assert!(h.ok(&["verify", "big"]).starts_with("ok"));
    assert!(staging_files(&dir).is_empty());
}

/// Several `lode import` processes into one empty store at once: every one succeeds,
/// and they share the single root one of them created.
#[test]
fn concurrent_first_imports_all_succeed() {
    for round in 0..3u64 {
        let h = Home::new();
        // The keyring is made once up front: this is about the store's first root.
        h.ok(&["kms", "list"]);
        let n = 6u64;
        let files: Vec<PathBuf> = (0..n)
            .map(|i| {
                let p = h.path(&format!("img{i}.raw"));
                fs::write(&p, random_image(2, 100 * round + i + 1)).unwrap();
                p
            })
            .collect();
        let children: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                h.cmd(&["--quiet", "import", s(f), "--tag", &format!("img:{i}")])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (i, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}, import {i} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let roots: Vec<_> = fs::read_dir(store_dir(&h).join("roots"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(roots, ["1"]);
        for i in 0..n {
            assert!(h.ok(&["verify", &format!("img:{i}")]).starts_with("ok"));
        }
    }
}

/// A malformed tag, a FIFO and a link to a host file among good tags: each is named on
/// stderr with why, the good ones are still listed and counted, no host byte is echoed,
/// and fsck reports each by name.
#[test]
fn bad_tags_are_named_and_the_rest_listed() {
    let h = Home::new();
    let src = h.path("img.raw");
    fs::write(&src, random_image(1, 3)).unwrap();
    let id = import(&h, &src, "good:1")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id2 = import(&h, &src, "good:2")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = h.path("shadow");
    fs::write(&secret, HOST_SECRET).unwrap();
    let tags = store_dir(&h).join("tags");
    fs::write(tags.join("malformed"), HOST_SECRET).unwrap();
    std::os::unix::fs::symlink(&secret, tags.join("linked")).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(tags.join("pipe"))
        .status()
        .unwrap();
    assert!(st.success());

    let (c, out, err) = code(&h, &["store", "tags"]);
    assert_eq!(c, Some(0), "{err}");
    assert_eq!(out, format!("{id}  good:1\n{id2}  good:2\n"));
    assert!(err.contains("skipping tag \"malformed\""), "{err}");
    assert!(err.contains("does not hold a manifest id"), "{err}");
    assert!(err.contains("skipping tag \"linked\""), "{err}");
    assert!(err.contains("a symbolic link"), "{err}");
    assert!(err.contains("skipping tag \"pipe\""), "{err}");
    assert!(err.contains("a FIFO, not a regular file"), "{err}");
    assert!(!err.contains("hostpassword") && !out.contains("hostpassword"));

    let listed = h.json(&["store", "tags"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let (c, out, err) = code(&h, &["--json", "store", "stats"]);
    assert_eq!(c, Some(0), "{err}");
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["tags"], 2);
    assert_eq!(st["bad_tags"].as_array().unwrap().len(), 3, "{st}");
    assert!(!err.contains("hostpassword") && !out.contains("hostpassword"));

    for image in ["malformed", "linked", "pipe"] {
        let err = h.fails(&["verify", image]);
        assert!(err.contains(&format!("tags/{image}")), "{err}");
        assert!(!err.contains("hostpassword"), "{err}");
    }

    let (c, out, _) = code(&h, &["store", "fsck"]);
    assert_eq!(c, Some(2), "{out}");
    for image in ["malformed", "linked", "pipe"] {
        assert!(
            out.contains(&format!("FAULT  tags/{image} "))
                || out.contains(&format!("tags/{image} in store")),
            "{out}"
        );
    }
    assert!(!out.contains("hostpassword"));

    // A root record that quotes a secret, and a stray object among the chunks: named,
    // not echoed.
    let root2 = store_dir(&h).join("roots/2");
    fs::create_dir_all(root2.join("chunks/zz")).unwrap();
    fs::write(
        root2.join("ROOT"),
        format!(r#"{{"version": 1, "root": 2, "state": "{HOST_SECRET}"}}"#),
    )
    .unwrap();
    fs::write(root2.join("chunks/zz/stray"), b"x").unwrap();
    let (c, out, _) = code(&h, &["store", "fsck"]);
    assert_eq!(c, Some(2), "{out}");
    assert!(
        out.contains("FAULT  root 2: roots/2/ROOT in store") && out.contains("not a root record"),
        "{out}"
    );
    assert!(
        out.contains("FAULT  root 2: roots/2/chunks/zz/stray in store"),
        "{out}"
    );
    assert!(!out.contains("hostpassword"), "{out}");
}

/// 4 GiB sparse objects: a chunk is reported damaged with both sizes and removed by
/// `--repair`; a manifest and a tag are refused by size. No process holds anything
/// near 4 GiB (the largest resident set of the children is checked).
#[test]
fn four_gib_sparse_objects_are_refused_without_reading() {
    let h = Home::new();
    let src = h.path("img.raw");
    fs::write(&src, random_image(2, 4)).unwrap();
    let id = import(&h, &src, "app")["id"].as_str().unwrap().to_owned();
    let names = chunk_names(&h, "app");
    fs::File::create(chunk_file(&h, &names[0]))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();

    let (c, out, _) = code(&h, &["verify", "app"]);
    assert_eq!(c, Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "chunk 0 ({}) is damaged: chunk roots/1/chunks/{}/{} in store {} is 4294967296 \
             bytes, more than the {} a chunk may be",
            names[0],
            &names[0][..2],
            names[0],
            store_dir(&h).display(),
            lode_image::new_chunk_format(lode_format::ChunkSize::DEFAULT).object_len(512 * 1024)
        )),
        "{out}"
    );
    let (c, out, _) = code(&h, &["verify", "--repair", "app"]);
    assert_eq!(c, Some(2), "{out}");
    assert!(!chunk_file(&h, &names[0]).exists());
    import(&h, &src, "app");
    assert!(h.ok(&["verify", "app"]).starts_with("ok"));

    let manifest = store_dir(&h).join(format!("roots/1/manifests/{id}"));
    fs::remove_file(&manifest).unwrap();
    fs::File::create(&manifest)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let err = h.fails(&["verify", &id]);
    assert!(
        err.contains("is 4294967296 bytes, more than the 67108864 a manifest may be"),
        "{err}"
    );
    let big_tag = store_dir(&h).join("tags/huge");
    fs::File::create(&big_tag)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let err = h.fails(&["verify", "huge"]);
    assert!(
        err.contains("is 4294967296 bytes, more than the 1024 a tag may be"),
        "{err}"
    );

    // fsck names both, by object, with the sizes.
    let (c, out, _) = code(&h, &["store", "fsck"]);
    assert_eq!(c, Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "FAULT  manifest {id} in root 1: manifest roots/1/manifests/{id} in store"
        )),
        "{out}"
    );
    assert!(out.contains("FAULT  tag tags/huge in store"), "{out}");

    // The children's largest resident set: far below the objects' size.
    // SAFETY: getrusage fills the struct it is given and touches nothing else.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut u), 0);
        u
    };
    let max_rss_kib = usage.ru_maxrss;
    eprintln!("largest resident set of a lode child: {max_rss_kib} KiB");
    assert!(max_rss_kib < 1 << 20, "a child held {max_rss_kib} KiB");
}
