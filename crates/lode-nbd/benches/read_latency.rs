//! 4 KiB random-read latency through lode-nbd with a MemDevice, beside `nbdkit memory`
//! serving the same bytes, measured by the same client (fio's nbd engine).
//!
//! ```text
//! cargo bench -p lode-nbd --bench read_latency            # 3 s per run
//! LODE_BENCH_SECS=10 cargo bench -p lode-nbd --bench read_latency
//! ```
//!
//! Both servers hold a 64 MiB image of the same pseudo-random bytes, written through
//! NBD with nbdcopy before measuring. Every run is 4 KiB `randread` for a fixed time;
//! fio reports completion-latency percentiles and IOPS. Runs alternate between the
//! servers so drift on the machine affects both.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lode_nbd::{Export, Exports, MemDevice, Server};

const SIZE: usize = 64 << 20;

struct Nbdkit(Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nbdkit(args: &[&str]) -> Nbdkit {
    let child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent"])
        .args(args)
        .args(["memory", &SIZE.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    Nbdkit(child)
}

fn wait_ready(uri: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let ok = Command::new("nbdinfo")
            .args(["--size", uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{uri} did not come up");
}

fn fill(uri: &str, image: &Path) {
    let ok = Command::new("nbdcopy")
        .arg(image)
        .arg(uri)
        .status()
        .expect("run nbdcopy")
        .success();
    assert!(ok, "nbdcopy into {uri} failed");
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    iops: f64,
}

fn fio(uri: &str, iodepth: u32, secs: u64) -> Sample {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=4k",
            &format!("--size={SIZE}"),
            &format!("--iodepth={iodepth}"),
            "--time_based",
            &format!("--runtime={secs}"),
            "--ramp_time=1",
            "--output-format=json",
        ])
        .stderr(Stdio::null())
        .output()
        .expect("run fio");
    assert!(out.status.success(), "fio failed on {uri}");
    let start = out.stdout.iter().position(|&b| b == b'{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout[start..]).expect("fio JSON");
    let read = &v["jobs"][0]["read"];
    let pct = |p: &str| read["clat_ns"]["percentile"][p].as_f64().unwrap() / 1000.0;
    Sample {
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        iops: read["iops"].as_f64().unwrap(),
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for tool in ["fio", "nbdkit", "nbdcopy", "nbdinfo"] {
        if lode_testkit::tool(tool).is_none() {
            return;
        }
    }
    let secs: u64 = std::env::var("LODE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    std::fs::write(&image, lode_testkit::seeded_bytes(SIZE, 1)).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let exports = Exports::new();
    exports
        .add("mem", Export::new(Arc::new(MemDevice::new(SIZE))))
        .unwrap();
    let server = Server::builder(exports).build().unwrap();
    let lode_sock = dir.path().join("lode.sock");
    let lode_addr: SocketAddr = rt.block_on(async {
        server.listen_unix(&lode_sock).unwrap();
        server
            .listen_tcp("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    });
    let kit_port = lode_testkit::free_port();
    let kit_sock = dir.path().join("nbdkit.sock");
    let _kit_tcp = start_nbdkit(&["-i", "127.0.0.1", "-p", &kit_port.to_string()]);
    let _kit_unix = start_nbdkit(&["-U", kit_sock.to_str().unwrap()]);

    let targets = [
        (
            "tcp",
            format!("nbd://{lode_addr}/mem"),
            format!("nbd://127.0.0.1:{kit_port}/"),
        ),
        (
            "unix",
            format!("nbd+unix:///mem?socket={}", lode_sock.display()),
            format!("nbd+unix:///?socket={}", kit_sock.display()),
        ),
    ];
    for (_, lode, kit) in &targets {
        wait_ready(lode);
        wait_ready(kit);
    }
    // The two nbdkit instances are separate memories; fill all three.
    fill(&targets[0].1, &image);
    fill(&targets[0].2, &image);
    fill(&targets[1].2, &image);

    println!(
        "4 KiB randread, fio nbd engine, {secs} s per run, 64 MiB image, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<5} {:>3} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>6} {:>6} {:>6}",
        "link",
        "qd",
        "lode p50",
        "p99",
        "IOPS",
        "kit p50",
        "p99",
        "IOPS",
        "p50 ×",
        "p99 ×",
        "IOPS ×"
    );
    for (link, lode, kit) in &targets {
        for qd in [1, 16] {
            // Alternate and keep the better of two runs each, to damp noise.
            let mut l = Vec::new();
            let mut k = Vec::new();
            for _ in 0..2 {
                l.push(fio(lode, qd, secs));
                k.push(fio(kit, qd, secs));
            }
            let best = |v: &[Sample]| {
                *v.iter()
                    .min_by(|a, b| a.p50_us.total_cmp(&b.p50_us))
                    .unwrap()
            };
            let (l, k) = (best(&l), best(&k));
            println!(
                "{:<5} {:>3} | {:>7.1}µs {:>7.1}µs {:>9.0} | {:>7.1}µs {:>7.1}µs {:>9.0} | {:>6.2} {:>6.2} {:>6.2}",
                link,
                qd,
                l.p50_us,
                l.p99_us,
                l.iops,
                k.p50_us,
                k.p99_us,
                k.iops,
                l.p50_us / k.p50_us,
                l.p99_us / k.p99_us,
                l.iops / k.iops
            );
        }
    }
    println!("× = lode / nbdkit (latency: lower is better; IOPS: higher is better)");
    rt.block_on(server.shutdown());
}
