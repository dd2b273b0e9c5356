//! Real NBD clients against the server: nbdinfo, nbdcopy, qemu-img, fio's nbd engine
//! and an nbdsh (libnbd Python) script. Each skips with a printed reason only when its
//! tool is not installed.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, manifest_dir, mem, run, run_ok, tool};
use lode_nbd::{Export, Exports, MemDevice};
use lode_testkit::seeded_bytes;

const LIMIT: Duration = Duration::from_secs(60);

fn json(out: &std::process::Output) -> serde_json::Value {
    // fio prints a line before its JSON.
    let start = out.stdout.iter().position(|&b| b == b'{').unwrap_or(0);
    serde_json::from_slice(&out.stdout[start..])
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn nbdinfo_lists_exports_with_sizes_and_block_sizes() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let exports = Exports::new();
    let ro = MemDevice::from_vec(seeded_bytes(1 << 20, 1)).into_read_only();
    exports
        .add(
            "alpha",
            Export::new(Arc::new(ro)).with_description("first disk"),
        )
        .unwrap();
    exports
        .add("beta", Export::new(mem(vec![0; (3 << 20) + 517])))
        .unwrap();
    let srv = TestServer::start(exports);

    let out = run_ok(
        Command::new(&nbdinfo).args(["--list", "--json", &format!("nbd://{}", srv.addr)]),
        LIMIT,
    );
    let v = json(&out);
    let list = v["exports"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    let alpha = &list[0];
    assert_eq!(alpha["export-name"], "alpha");
    assert_eq!(alpha["description"], "first disk");
    assert_eq!(alpha["export-size"], 1 << 20);
    assert_eq!(alpha["is_read_only"], true);
    assert_eq!(alpha["block_size_minimum"], 1);
    assert_eq!(alpha["block_size_preferred"], 4096);
    // The connection's byte budget is the largest request it takes.
    assert_eq!(
        alpha["block_size_maximum"],
        lode_nbd::DEFAULT_MAX_BUFFERED_BYTES
    );
    let beta = &list[1];
    assert_eq!(beta["export-name"], "beta");
    assert_eq!(beta["export-size"], (3 << 20) + 517);
    assert_eq!(beta["is_read_only"], false);
    assert_eq!(beta["can_fua"], true);
    assert_eq!(beta["can_trim"], true);
    assert_eq!(beta["can_zero"], true);
    assert_eq!(beta["can_multi_conn"], true);

    // The Unix socket listener, by nbd+unix URI.
    let out = run_ok(
        Command::new(&nbdinfo).args(["--json", &srv.unix_uri("beta")]),
        LIMIT,
    );
    assert_eq!(json(&out)["exports"][0]["export-size"], (3 << 20) + 517);
    let out = run_ok(
        Command::new(&nbdinfo).args(["--size", &srv.unix_uri("alpha")]),
        LIMIT,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");

    // An unknown export is refused, and the server keeps serving.
    let out = run(Command::new(&nbdinfo).arg(srv.uri("gamma")), LIMIT);
    assert!(!out.status.success());
    run_ok(Command::new(&nbdinfo).arg(srv.uri("alpha")), LIMIT);
}

#[test]
fn nbdcopy_and_qemu_img_agree_with_the_device() {
    let (Some(nbdcopy), Some(qemu_img)) = (tool("nbdcopy"), tool("qemu-img")) else {
        return;
    };
    let size = (24 << 20) + 4096 + 13; // odd tail
    let bytes = seeded_bytes(size, 7);
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.img");
    std::fs::write(&reference, &bytes).unwrap();

    let exports = Exports::new();
    let ro = MemDevice::from_vec(bytes.clone()).into_read_only();
    exports.add("image", Export::new(Arc::new(ro))).unwrap();
    let target = mem(vec![0; size]);
    exports.add("target", Export::new(target.clone())).unwrap();
    let srv = TestServer::start(exports);

    // Export → file, over TCP with several connections and requests in flight.
    let copy = dir.path().join("copy.img");
    run_ok(
        Command::new(&nbdcopy)
            .args(["--connections=4", "--requests=16", "--request-size=1048576"])
            .arg(srv.uri("image"))
            .arg(&copy),
        LIMIT,
    );
    assert!(
        std::fs::read(&copy).unwrap() == bytes,
        "nbdcopy output differs"
    );

    // File → writable export, over the Unix socket; then check the device itself.
    run_ok(
        Command::new(&nbdcopy)
            .arg("--flush")
            .arg(&reference)
            .arg(srv.unix_uri("target")),
        LIMIT,
    );
    assert!(
        target.contents() == bytes,
        "bytes written by nbdcopy differ"
    );

    // qemu-img, both URI spellings, against the reference file.
    let tcp = format!("nbd:127.0.0.1:{}:exportname=image", srv.addr.port());
    let out = run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw", &tcp])
            .arg(&reference),
        LIMIT,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
    run_ok(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw", &srv.unix_uri("target")])
            .arg(&reference),
        LIMIT,
    );
    // And it notices a difference.
    let mut changed = bytes.clone();
    changed[size / 2] ^= 1;
    std::fs::write(&reference, &changed).unwrap();
    let out = run(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw", &tcp])
            .arg(&reference),
        LIMIT,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare missed a flipped bit"
    );
}

#[test]
fn fio_nbd_engine_random_reads_verify() {
    let Some(fio) = tool("fio") else { return };
    let probe = run(Command::new(&fio).arg("--enghelp"), LIMIT);
    if !String::from_utf8_lossy(&probe.stdout).contains("nbd") {
        lode_testkit::skip("fio was built without the nbd engine");
        return;
    }
    let size = 16 << 20;
    let device = mem(vec![0; size]);
    let exports = Exports::new();
    exports.add("fio", Export::new(device.clone())).unwrap();
    let srv = TestServer::start(exports);
    let uri = srv.uri("fio");
    let common = [
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--name=lode".into(),
        format!("--size={size}"),
        "--bs=4k".into(),
        "--verify=crc32c".into(),
        "--iodepth=16".into(),
        "--randrepeat=1".into(),
        // fio would otherwise leave a verify-state file in the working directory.
        "--verify_state_save=0".into(),
    ];
    // Write a verifiable pattern through NBD...
    run_ok(
        Command::new(&fio)
            .args(&common)
            .args(["--rw=write", "--do_verify=0"]),
        LIMIT,
    );
    // ...then read it back at random with 16 requests in flight, checking every block.
    let out = run_ok(
        Command::new(&fio)
            .args(&common)
            .args(["--rw=randread", "--output-format=json"]),
        LIMIT,
    );
    let v = json(&out);
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= size as u64,
        "{job}"
    );

    // The check has teeth: corrupt one block in the device and fio must fail.
    srv.block_on(async {
        use lode_blockdev::BlockDevice;
        device.write_at(5 * 4096 + 100, b"corrupt").await.unwrap();
    });
    let out = run(
        Command::new(&fio)
            .args(&common)
            .args(["--rw=randread", "--verify_fatal=1"]),
        LIMIT,
    );
    assert!(
        !out.status.success(),
        "fio did not notice a corrupted block"
    );
}

#[test]
fn nbdsh_protocol_edges() {
    let Some(nbdsh) = tool("nbdsh") else { return };
    // nbdsh runs `python3 -m nbd`; the module is installed for the system Python, which
    // may not be the first python3 on PATH (pyenv).
    let Some(python_path) = lode_testkit::nbd_python_path() else {
        return;
    };

    let size = 40 << 20;
    let exports = Exports::new();
    exports.add("rw", Export::new(mem(vec![0; size]))).unwrap();
    let ro = MemDevice::from_vec(seeded_bytes(1 << 20, 3)).into_read_only();
    exports
        .add(
            "ro",
            Export::new(Arc::new(ro)).with_description("read-only pattern"),
        )
        .unwrap();
    let slow = common::SlowFirstBlock {
        inner: MemDevice::new(1 << 20),
        delay: Duration::from_millis(300),
    };
    exports.add("slow", Export::new(Arc::new(slow))).unwrap();
    exports.set_default(Some("ro".into()));
    let srv = TestServer::start(exports);

    let script = manifest_dir().join("tests/nbd_edges.py");
    let out = run_ok(
        Command::new(nbdsh)
            .arg("-n")
            .arg("-c")
            .arg(format!(
                "exec(open({:?}).read())",
                script.display().to_string()
            ))
            .env("PATH", python_path)
            .env("LODE_RW", srv.uri("rw"))
            .env("LODE_RO", srv.uri("ro"))
            .env("LODE_SLOW", srv.uri("slow"))
            .env("LODE_UNIX", srv.unix_uri("ro"))
            .env("LODE_RW_SIZE", size.to_string())
            .env(
                "LODE_MAX_BLOCK",
                lode_nbd::DEFAULT_MAX_BUFFERED_BYTES.to_string(),
            ),
        LIMIT,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
    let stats = srv.server.stats();
    assert_eq!(stats.connection_errors, 0, "{stats:?}");
}
