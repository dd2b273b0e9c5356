//! Deleting and pinning through the real `lode` binary, on a local store and on S3 (an
//! s3s-fs server in this process, checking SigV4): what is live is what a tag names or a
//! pin holds; `rm --manifest` refuses a live manifest naming what holds it; `store stats`
//! counts each root's live and dead bytes, each chunk once; a pin object lode did not
//! write blocks deletion without being quoted.

#[path = "common/harness.rs"]
mod harness;

#[path = "common/target.rs"]
mod target;

use std::fs;
use std::path::Path;
use std::process::Child;

use harness::random_image;
use serde_json::Value;
use target::{
    CHUNK, SEALED, Target, chunk_file, exports_as, finish, new_gate, root_states, stored_names,
    wait_for_marks,
};

const SECRET: &str = "root:$6$hostsalt$thisisthehostpasswordhash:19000:0:99999:7:::";

fn figures(root: &Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| root[k].as_u64().unwrap_or_else(|| panic!("{k} in {root}"));
    (
        n("live_manifests"),
        n("manifests"),
        n("live_bytes"),
        n("dead_bytes"),
    )
}

/// The whole life of two images sharing chunks: tag, pin, untag, unpin, remove; live and
/// dead bytes after each step; the survivor still exports byte for byte.
fn remove_and_pin(t: &Target) {
    let label = &t.store;
    // a: chunks A0 A1 A2 A1 (a repeat within the image); b: A0 A1 B0 B1.
    let a0 = random_image(3, 1);
    let mut a = a0.clone();
    a.extend_from_slice(&a0[CHUNK..2 * CHUNK]);
    let mut b = a0[..2 * CHUNK].to_vec();
    b.extend(random_image(2, 2));
    let (fa, fb) = (t.h.path("a.img"), t.h.path("b.img"));
    fs::write(&fa, &a).unwrap();
    fs::write(&fb, &b).unwrap();
    let ida = t.import(&fa, "a:1");
    let idb = t.import(&fb, "b:1");
    // A second tag on the same manifest (an import of the same file would make another
    // manifest: each gets its own data key).
    fs::write(t.objects.join("tags/a2"), format!("{ida}\n")).unwrap();
    // 5 distinct chunks, all live; a repeat and a shared chunk count once.
    assert_eq!(figures(&t.root1()), (2, 2, 5 * SEALED, 0));

    assert_eq!(t.ok(&["pin", "b:1"]), format!("pinned {idb}\n"));
    assert_eq!(t.ok(&["pin", &idb]), format!("{idb} was pinned already\n"));
    assert_eq!(
        t.ok(&["rm", "b:1"]),
        format!("untagged b:1 (manifest {idb})\n")
    );
    assert_eq!(
        t.fails(&["rm", "--manifest", &idb]),
        format!(
            "lode: error: manifest {idb} is live: a pin holds it (remove them first: lode rm \
             TAG, lode unpin ID)\n"
        )
    );
    // Pinned and untagged: still live.
    assert_eq!(figures(&t.root1()), (2, 2, 5 * SEALED, 0));

    assert_eq!(t.ok(&["unpin", &idb]), format!("unpinned {idb}\n"));
    assert_eq!(
        t.fails(&["unpin", &idb]),
        format!("lode: error: pin {idb} is not in store {label}\n")
    );
    // b's own two chunks are dead; the two it shares with a are not.
    assert_eq!(figures(&t.root1()), (1, 2, 3 * SEALED, 2 * SEALED));

    assert_eq!(
        t.ok(&["rm", "--manifest", &idb]),
        format!("removed manifest {idb} from root 1; its chunks go when the root is collected\n")
    );
    assert_eq!(
        t.fails(&["rm", "--manifest", &idb]),
        format!("lode: error: manifest {idb} is not in store {label}\n")
    );
    assert_eq!(
        t.fails(&["pin", &idb]),
        format!("lode: error: manifest {idb} is not in store {label}\n")
    );
    // Removing a manifest frees no chunk: that is the collector's work.
    assert_eq!(figures(&t.root1()), (1, 1, 3 * SEALED, 2 * SEALED));

    // The survivor is whole.
    let out = t.h.path("a.out");
    t.ok(&["export", "a:1", out.to_str().unwrap()]);
    assert!(fs::read(&out).unwrap() == a, "a:1 exported other bytes");

    assert_eq!(
        t.fails(&["rm", "--manifest", &ida]),
        format!(
            "lode: error: manifest {ida} is live: tags \"a2\", \"a:1\" name it (remove them \
             first: lode rm TAG, lode unpin ID)\n"
        )
    );
    assert_eq!(
        t.fails(&["rm", "--manifest", "a:1"]),
        "lode: error: --manifest takes a manifest id (64 hex digits), not \"a:1\"; to remove \
         a tag, leave out --manifest\n"
    );
    // An id removes every tag naming it.
    assert_eq!(
        t.ok(&["rm", &ida]),
        format!("untagged a2 (manifest {ida})\nuntagged a:1 (manifest {ida})\n")
    );
    assert_eq!(
        t.fails(&["rm", &ida]),
        format!(
            "lode: error: no tag names manifest {ida} in store {label}; to remove the manifest \
             itself: lode rm --manifest {ida}\n"
        )
    );
    assert_eq!(
        t.fails(&["rm", "a:1"]),
        format!("lode: error: tag \"a:1\" is not in store {label}\n")
    );
    assert_eq!(figures(&t.root1()), (0, 1, 0, 5 * SEALED));
    assert_eq!(
        t.json(&["rm", "--manifest", &ida]),
        serde_json::json!({"id": ida, "roots": [1]})
    );
    assert_eq!(figures(&t.root1()), (0, 0, 0, 5 * SEALED));
}

/// A pin object lode did not write (another manifest's id, or anything at all) pins
/// nothing lode can prove, so it blocks every `rm --manifest` until it is repaired; it is
/// named by `store fsck` and never quoted.
fn unreadable_pins_block_deletion(t: &Target) {
    let f = t.h.path("c.img");
    fs::write(&f, random_image(1, 3)).unwrap();
    let id = t.import(&f, "c:1");
    t.ok(&["rm", "c:1"]);
    let other = "ab".repeat(32);
    let pin = t.objects.join("pins").join(&other);
    fs::create_dir_all(pin.parent().unwrap()).unwrap();
    fs::write(&pin, SECRET).unwrap();

    let err = t.fails(&["rm", "--manifest", &id]);
    assert!(!err.contains("hostpassword"), "{err}");
    let object = if t.store.starts_with("s3://") {
        format!("gc/pins/{other}")
    } else {
        format!("pins/{other}")
    };
    assert_eq!(
        err,
        format!(
            "lode: error: manifest {id} cannot be proven dead: 1 tag or pin object(s) cannot \
             be read ({object} in store {} is corrupt: it does not hold a manifest id (64 \
             lowercase hex digits and a newline)); repair or remove them first (lode store \
             fsck names them)\n",
            t.store
        )
    );
    let out = t.run(&["store", "stats"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "warning: 1 tag or pin object(s) cannot be read: dead bytes may include live ones"
        ),
        "{err}"
    );
    let out = t.run(&["store", "fsck"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hostpassword"), "{text}");
    assert!(
        text.contains(&format!("FAULT  {object} in store {} is corrupt", t.store)),
        "{text}"
    );
    // A pin that holds another manifest's id than its name pins neither.
    fs::write(&pin, format!("{id}\n")).unwrap();
    let err = t.fails(&["rm", "--manifest", &id]);
    assert!(
        err.contains("it holds another manifest's id than the one it is named by"),
        "{err}"
    );
    fs::remove_file(&pin).unwrap();
    t.ok(&["rm", "--manifest", &id]);
}

/// A rotation retires root 1 and makes root 2 active; the same plaintext published
/// again lands in root 2 under other chunk names (the blast radius of a salt ends at its
/// root); both images still export byte for byte; `root ls` shows both roots.
fn rotation_limits_blast_radius(t: &Target) {
    let home = t.h.home();
    assert_eq!(
        t.fails(&["root", "rotate"]),
        format!(
            "lode: error: keyring {}/keyring.json: no keyring here; it holds the keys of every \
             stored image: point --kms or LODE_KMS at the keyring the images were made with\n",
            home.display()
        )
    );
    t.ok(&["kms", "create", "spare"]);
    assert_eq!(
        t.fails(&["root", "rotate"]),
        format!(
            "lode: error: store {} has no root yet: nothing to rotate (the first import \
             makes root 1)\n",
            t.store
        )
    );
    let x = random_image(3, 7);
    let f = t.h.path("x.img");
    fs::write(&f, &x).unwrap();
    t.import(&f, "x:1");
    let before = stored_names(t, "x:1");
    assert_eq!(
        t.ok(&["root", "rotate"]),
        "retired root 1; root 2 is active\n"
    );
    assert_eq!(
        root_states(t),
        vec![(1, "retired".to_owned()), (2, "active".to_owned())]
    );
    let v = t.json(&["import", f.to_str().unwrap(), "--tag", "x:2"]);
    assert_eq!(v["root"], 2, "{v}");
    let after = stored_names(t, "x:2");
    assert_eq!(after.len(), 3);
    for n in &after {
        assert!(
            !before.contains(n),
            "chunk {n} has the same name in both roots"
        );
    }
    exports_as(t, "x:1", &x);
    exports_as(t, "x:2", &x);
    let ls = t.json(&["root", "ls"]);
    assert_eq!(ls[0]["live_manifests"], 1, "{ls}");
    assert_eq!(ls[1]["live_manifests"], 1, "{ls}");
    assert_eq!(ls[1]["live_bytes"], 3 * SEALED, "{ls}");
    assert_eq!(ls[1]["alarms"], serde_json::json!([]), "{ls}");
    let text = t.ok(&["root", "ls"]);
    assert!(
        text.contains("root 2 active   1.5 MiB stored, 1 of 1 manifests live"),
        "{text}"
    );
}

/// Racing rotations that all read the store before any writes (each paused at the same
/// point): one wins, the rest fail naming the race, and the store has exactly one new
/// active root. A rotation killed after retiring the active root leaves none active:
/// publishers wait, then name the fix; `lode root rotate` finishes it.
fn racing_and_interrupted_rotations(t: &Target, atomic: bool) {
    let before = root_states(t);
    let newest = before.last().unwrap().0;
    let gate = new_gate(t, "gate-race");
    let racers: Vec<Child> = (0..4)
        .map(|_| t.spawn_paused(&["root", "rotate"], "root-rotate:after-read", &gate))
        .collect();
    wait_for_marks(&gate, "root-rotate:after-read", 4);
    fs::write(gate.join("go"), b"").unwrap();
    let results: Vec<_> = racers.into_iter().map(finish).collect();
    let won = results.iter().filter(|r| r.0).count();
    for (ok, out, err) in &results {
        if *ok {
            assert_eq!(
                out,
                &format!("retired root {newest}; root {} is active\n", newest + 1)
            );
        } else {
            assert!(
                err.starts_with(&format!(
                    "lode: error: store {}: another rotation won (",
                    t.store
                )),
                "{err}"
            );
        }
    }
    if atomic {
        assert_eq!(won, 1, "{results:?}");
    } else {
        // s3s-fs checks a condition and then writes, so racers may both pass it; the
        // store still ends with one new root, as every racer read the same one.
        assert!(won >= 1, "{results:?}");
    }
    let mut want = before.clone();
    want.last_mut().unwrap().1 = "retired".to_owned();
    want.push((newest + 1, "active".to_owned()));
    assert_eq!(root_states(t), want);

    // Killed between retiring the active root and making the next.
    let gate = new_gate(t, "gate-kill");
    let mut victim = t.spawn_paused(&["root", "rotate"], "root-rotate:after-retire", &gate);
    wait_for_marks(&gate, "root-rotate:after-retire", 1);
    victim.kill().unwrap();
    victim.wait().unwrap();
    let f = t.h.path("y.img");
    let y = random_image(1, 9);
    fs::write(&f, &y).unwrap();
    let err = t.fails(&["import", f.to_str().unwrap(), "--tag", "y:1"]);
    let n = newest + 1;
    assert_eq!(
        err,
        format!(
            "lode: error: importing {}: store {} has {n} root(s) but none is active (root {n} \
             is retired): a root rotation stopped part-way; run `lode root rotate` to finish \
             it\n",
            f.display(),
            t.store
        )
    );
    assert_eq!(
        t.ok(&["root", "rotate"]),
        format!(
            "finished the rotation from root {n}; root {} is active\n",
            n + 1
        )
    );
    t.import(&f, "y:1");
    exports_as(t, "y:1", &y);
}

/// An import that began under a root retired before it wrote its manifest still lands:
/// it goes round again under the new root, and its tag names a manifest there.
fn import_racing_a_rotation(t: &Target) {
    let z = random_image(4, 11);
    let f = t.h.path("z.img");
    fs::write(&f, &z).unwrap();
    let gate = new_gate(t, "gate-import");
    let import = t.spawn_paused(
        &["--json", "import", f.to_str().unwrap(), "--tag", "z:1"],
        "publish:before-manifest",
        &gate,
    );
    wait_for_marks(&gate, "publish:before-manifest", 1);
    let active = root_states(t).last().unwrap().0;
    assert_eq!(
        t.ok(&["root", "rotate"]),
        format!("retired root {active}; root {} is active\n", active + 1)
    );
    fs::write(gate.join("go"), b"").unwrap();
    let (ok, out, err) = finish(import);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["root"], active + 1, "{v}");
    let ls = t.json(&["root", "ls"]);
    let new = ls.as_array().unwrap().last().unwrap();
    assert_eq!(new["root"], active + 1);
    assert_eq!(new["live_manifests"], 1, "{ls}");
    exports_as(t, "z:1", &z);
    t.ok(&["verify", "z:1"]);
}

#[test]
fn root_rotation_on_a_local_store() {
    let t = Target::local();
    rotation_limits_blast_radius(&t);
    racing_and_interrupted_rotations(&t, true);
    import_racing_a_rotation(&t);
}

#[test]
fn root_rotation_on_s3() {
    let t = Target::s3();
    rotation_limits_blast_radius(&t);
    racing_and_interrupted_rotations(&t, false);
    import_racing_a_rotation(&t);
}

fn inspect_root(t: &Target, image: &str) -> u64 {
    t.json(&["inspect", image])["root"].as_u64().unwrap()
}

/// Copy-forward killed (kill -9) at each step boundary and run again ends with every
/// live image in the active root under new chunk names, tags and pin moved, exporting
/// byte for byte; a reader holding an old id is told the new one; a chunk missing from
/// the retired root stops it naming root, manifest and chunk, moving and deleting
/// nothing.
fn copy_forward_survives_kills(t: &Target) {
    // p: three chunks and a zero chunk; q shares p's first chunk; r is dead.
    let mut p = random_image(3, 21);
    p.extend(vec![0u8; CHUNK]);
    let mut q = p[..CHUNK].to_vec();
    q.extend(random_image(1, 22));
    let r = random_image(1, 23);
    for (name, bytes) in [("p.img", &p), ("q.img", &q), ("r.img", &r)] {
        fs::write(t.h.path(name), bytes).unwrap();
    }
    let path = |n: &str| t.h.path(n).to_str().unwrap().to_owned();
    let pid = t.import(Path::new(&path("p.img")), "p:1");
    fs::write(t.objects.join("tags/p2"), format!("{pid}\n")).unwrap();
    let qid = t.import(Path::new(&path("q.img")), "q:1");
    t.ok(&["pin", &qid]);
    t.ok(&["rm", "q:1"]);
    let rid = t.import(Path::new(&path("r.img")), "r:1");
    t.ok(&["rm", "r:1"]);
    let old_names = stored_names(t, "p:1");
    assert_eq!(
        t.fails(&["root", "copy-forward", "1"]),
        format!(
            "lode: error: root 1 of store {} is active: only a retired or expired root is \
             copied forward (lode root rotate retires the active one)\n",
            t.store
        )
    );
    t.ok(&["root", "rotate"]);

    for point in [
        "copy-forward:after-manifest",
        "copy-forward:after-forward",
        "copy-forward:after-tag",
    ] {
        let gate = new_gate(t, &point.replace(':', "-"));
        let mut victim = t.spawn_paused(&["root", "copy-forward", "1"], point, &gate);
        wait_for_marks(&gate, point, 1);
        victim.kill().unwrap();
        victim.wait().unwrap();
        // Whatever step it died at, every tagged image still reads.
        exports_as(t, "p:1", &p);
        exports_as(t, "p2", &p);
    }
    let v = t.json(&["root", "copy-forward", "1"]);
    assert_eq!(v["from"], 1, "{v}");
    assert_eq!(v["to"], 2, "{v}");
    // The killed runs may have finished some manifests: the forwarding records say
    // where each went, and this run's report must agree with them.
    let forward = |old: &str| -> String {
        let body = fs::read_to_string(t.objects.join(format!("roots/1/forwards/{old}")))
            .unwrap_or_else(|e| panic!("no forwarding record for {old}: {e}"));
        body.trim_end().to_owned()
    };
    let (pnew, qnew) = (forward(&pid), forward(&qid));
    for m in v["moved"].as_array().unwrap() {
        let from = m["from"].as_str().unwrap();
        assert_eq!(m["to"].as_str().unwrap(), forward(from), "{v}");
        assert_ne!(from, rid, "{v}");
    }
    assert!(
        !t.objects.join(format!("roots/1/forwards/{rid}")).exists(),
        "the dead manifest was copied"
    );
    assert_ne!(pnew, pid);
    assert_ne!(qnew, qid);

    // Tags and the pin moved; the images are in root 2 under new names.
    let tags = t.ok(&["store", "tags"]);
    assert_eq!(tags, format!("{pnew}  p2\n{pnew}  p:1\n"));
    assert_eq!(inspect_root(t, "p:1"), 2);
    let new_names = stored_names(t, "p:1");
    assert_eq!(new_names.len(), 3);
    for n in &new_names {
        assert!(!old_names.contains(n), "chunk {n} kept its name");
    }
    exports_as(t, "p:1", &p);
    exports_as(t, &qnew, &q);
    t.ok(&["verify", "p:1"]);
    t.ok(&["verify", &qnew]);
    let ls = t.json(&["root", "ls"]);
    assert_eq!(ls[0]["live_manifests"], 0, "{ls}");
    assert_eq!(ls[0]["live_bytes"], 0, "{ls}");
    assert_eq!(
        t.fails(&["unpin", &qid]),
        format!("lode: error: pin {qid} is not in store {}\n", t.store)
    );
    assert_eq!(
        t.ok(&["pin", &qnew]),
        format!("{qnew} was pinned already\n")
    );

    // Forwarding records are objects fsck accepts.
    t.ok(&["store", "fsck"]);

    // Run again: nothing left to move.
    assert_eq!(
        t.ok(&["root", "copy-forward", "1"]),
        "root 1 -> root 2: 0 live manifest(s) moved, 3 dead left, 0 chunks (0 B) sealed again\n"
    );

    // Once the old manifest is gone (its root deleted), its id leads to the new one.
    fs::remove_file(t.objects.join(format!("roots/1/manifests/{pid}"))).unwrap();
    assert_eq!(
        t.fails(&["inspect", &pid]),
        format!(
            "lode: error: manifest {pid} is no longer in store {}: it was copied forward from \
             root 1 as manifest {pnew}; use that id (tags were moved to it)\n",
            t.store
        )
    );

    // A chunk missing from a retired root stops its copy-forward, naming it.
    let s_img = random_image(2, 24);
    fs::write(t.h.path("s.img"), &s_img).unwrap();
    let sid = t.import(Path::new(&path("s.img")), "s:1");
    let s_names = stored_names(t, "s:1");
    t.ok(&["root", "rotate"]);
    fs::remove_file(chunk_file(t, 2, &s_names[1])).unwrap();
    let err = t.fails(&["root", "copy-forward", "2"]);
    assert!(
        err.starts_with(&format!(
            "lode: error: copying manifest {sid} of root 2 forward: chunk {} is not in store {}",
            s_names[1], t.store
        )),
        "{err}"
    );
    // Nothing moved, nothing deleted.
    assert_eq!(
        t.ok(&["store", "tags"])
            .lines()
            .find(|l| l.ends_with("s:1")),
        Some(format!("{sid}  s:1").as_str())
    );
    assert!(chunk_file(t, 2, &s_names[0]).exists());
    exports_as(t, "p:1", &p);
}

#[test]
fn copy_forward_on_a_local_store() {
    let t = Target::local();
    copy_forward_survives_kills(&t);
}

#[test]
fn copy_forward_on_s3() {
    let t = Target::s3();
    copy_forward_survives_kills(&t);
}

#[test]
fn rm_pin_and_stats_on_a_local_store() {
    let t = Target::local();
    remove_and_pin(&t);
    unreadable_pins_block_deletion(&t);
}

#[test]
fn rm_pin_and_stats_on_s3() {
    let t = Target::s3();
    remove_and_pin(&t);
    unreadable_pins_block_deletion(&t);
}
