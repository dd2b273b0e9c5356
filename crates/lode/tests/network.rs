//! Faults on a real network: each test makes its own test network (`scripts/testnet.sh`,
//! docs/network.md), with the S3 origin on the origin host behind a link like S3's,
//! `lode cache-node`s on the six cache hosts behind links like an availability zone's,
//! and `lode agent` on a worker host. Then a cache node is partitioned or slowed in the
//! middle of a replay, the origin is slowed, fails a share of requests or never answers,
//! and every link loses packets: reads stay byte-exact, and fail only when the origin
//! never answers, in bounded time, naming the store and the chunk.
//!
//! Root only (network namespaces); under `LODE_REQUIRE_TOOLS` a missing tool fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lode_testkit::{NetOptions, S3Fs, TestNet};
use serde_json::Value;

const LODE: &str = env!("CARGO_BIN_EXE_lode");
const BUCKET: &str = "lode-net";
const CHUNK: u64 = 512 * 1024;
/// What a read asks for: one page of a chunk, so a read costs one chunk fetch.
const PAGE: usize = 4096;
const CACHE_PORT: u16 = 11211;

/// A child process on a test host; killed and reaped on drop (the network's `down`
/// would kill it too, but a test may want it gone sooner).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test network with the S3 origin serving on its origin host, and a `$LODE_HOME`
/// every host shares (the keyring, the state directories).
struct World {
    // Declared first: `down` runs before the S3 server and the files go.
    net: TestNet,
    s3: S3Fs,
    dir: tempfile::TempDir,
}

impl World {
    fn new(opts: &NetOptions) -> Option<World> {
        let net = TestNet::up(opts)?;
        let mut s3 = S3Fs::on(BUCKET, net.bind_tcp("origin", 0));
        s3.serve();
        let dir = tempfile::tempdir().expect("temp dir");
        Some(World { net, s3, dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn store(&self) -> String {
        format!("s3://{BUCKET}")
    }

    /// `lode ARGS` on `host`, against the S3 origin.
    fn lode(&self, host: &str, args: &[&str]) -> Command {
        let mut c = self.net.command(host, LODE);
        c.args(args)
            .env("LODE_HOME", self.path("home"))
            .env("LODE_STORE", self.store())
            .envs(self.s3.env());
        for var in [
            "LODE_KMS",
            "LODE_KMS_KEY",
            "LODE_AGENT_CONTROL",
            "LODE_PUT_ONLY",
        ] {
            c.env_remove(var);
        }
        c
    }

    fn ok(&self, host: &str, args: &[&str]) -> String {
        let out = self
            .lode(host, args)
            .stdin(Stdio::null())
            .output()
            .expect("run lode");
        assert!(
            out.status.success(),
            "lode {args:?} on {host} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// Imports `img` as tag `img` through worker1; returns its chunks' names.
    fn import(&self, img: &[u8]) -> Vec<String> {
        let raw = self.path("img.raw");
        fs::write(&raw, img).expect("write the image");
        self.ok(
            "worker1",
            &["import", raw.to_str().expect("path"), "--tag", "img", "-q"],
        );
        let inspect: Value =
            serde_json::from_str(&self.ok("worker1", &["--json", "inspect", "img"])).expect("JSON");
        inspect["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(|c| c.as_str().expect("name").to_owned())
            .collect()
    }

    /// `lode cache-node` on each cache host; their addresses.
    fn cache_nodes(&self) -> (Vec<Proc>, Vec<String>) {
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        for host in self.net.caches() {
            let addr = format!("{}:{CACHE_PORT}", self.net.addr(&host));
            let child = self
                .lode(
                    &host,
                    &["cache-node", "--listen", &addr, "--memory", "128MiB"],
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(self.path(&format!("{host}.err"))).expect("log"))
                .spawn()
                .expect("spawn lode cache-node");
            procs.push(Proc(child));
            addrs.push(addr);
        }
        for addr in &addrs {
            let started = Instant::now();
            while self
                .net
                .command("worker1", "bash")
                .args([
                    "-c",
                    &format!("exec 3<>/dev/tcp/{}", addr.replace(':', "/")),
                ])
                .stderr(Stdio::null())
                .status()
                .map_or(true, |s| !s.success())
            {
                assert!(started.elapsed() < Duration::from_secs(20), "{addr} silent");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (procs, addrs)
    }

    /// `lode agent` on `host` over a fresh state directory `name` (so empty local
    /// caches), with the AZ fleet `az`, `img` attached; returns it and its state dir.
    fn agent(&self, host: &str, name: &str, az: &[String]) -> (Proc, PathBuf) {
        let state = self.path(name);
        // Every read here is a demand read: these tests measure and break the AZ tier and
        // the origin, so no working set is fetched ahead and nothing is read ahead.
        let mut args = vec![
            "agent",
            "--no-files",
            "--no-prefetch",
            "--readahead-max-chunks",
            "0",
            "--state-dir",
            state.to_str().expect("path"),
        ];
        for a in az {
            args.extend(["--az-node", a]);
        }
        let child = self
            .lode(host, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.path(&format!("{name}.err"))).expect("log"))
            .spawn()
            .expect("spawn lode agent");
        let mut agent = Proc(child);
        let control = state.join("control.sock");
        let started = Instant::now();
        loop {
            let answered = self
                .lode(host, &["ls", "--control", control.to_str().expect("path")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if answered {
                break;
            }
            if let Some(st) = agent.0.try_wait().expect("wait") {
                panic!("lode agent exited ({st:?}):\n{}", self.log(name));
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "agent silent for 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.ok(
            host,
            &[
                "attach",
                "img",
                "--control",
                control.to_str().expect("path"),
            ],
        );
        (agent, state)
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.path(&format!("{name}.err"))).unwrap_or_default()
    }

    fn stats(&self, host: &str, state: &Path) -> Value {
        let control = state.join("control.sock");
        serde_json::from_str(&self.ok(
            host,
            &[
                "--json",
                "stats",
                "--control",
                control.to_str().expect("path"),
            ],
        ))
        .expect("JSON")
    }
}

/// SIGTERM and wait: the agent settles its background writes (to the AZ fleet) first.
fn stop(mut agent: Proc) {
    let pid = libc::pid_t::try_from(agent.0.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid, which is not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    while agent.0.try_wait().expect("wait").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tier_hits(v: &Value, name: &str) -> u64 {
    v["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .find(|t| t["name"] == name)
        .and_then(|t| t["hits"].as_u64())
        .unwrap_or_else(|| panic!("no tier {name} in {v}"))
}

fn nbd(state: &Path) -> lode_nbd::Client {
    lode_nbd::Client::connect_unix(&state.join("nbd.sock"), "img").expect("NBD connect")
}

/// Reads one page of chunk `c` and checks it against the image.
fn read_page(client: &mut lode_nbd::Client, img: &[u8], c: usize) -> std::io::Result<()> {
    // A page in the chunk's middle, not at its start, where a prefetch of the previous
    // chunk's neighbour would land.
    let offset = u64::try_from(c).expect("index") * CHUNK + CHUNK / 2;
    let mut buf = vec![0u8; PAGE];
    client.read_at(offset, &mut buf)?;
    let at = usize::try_from(offset).expect("offset");
    assert!(buf == img[at..at + PAGE], "wrong bytes in chunk {c}");
    Ok(())
}

/// A seeded shuffle of `0..n` (xorshift, Fisher-Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = usize::try_from(x % u64::try_from(i + 1).expect("n")).expect("index");
        order.swap(i, j);
    }
    order
}

/// The `pct`-th percentile (nearest rank) of `samples`.
fn percentile(samples: &[Duration], pct: usize) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s[((s.len() - 1) * pct + 50) / 100]
}

#[test]
fn a_cache_node_partitioned_or_slowed_mid_replay_costs_no_read_and_little_time() {
    let Some(w) = World::new(&NetOptions {
        workers: 1,
        ..NetOptions::default()
    }) else {
        return;
    };
    const CHUNKS: usize = 48;
    // Reads before the fault comes: the first ones of a pass also pay for connecting.
    const BEFORE: usize = 8;
    let img = lode_testkit::seeded_bytes(CHUNKS * 512 * 1024, 0x9e37_79b9_7f4a_7c15);
    let chunks = w.import(&img);
    assert_eq!(chunks.len(), CHUNKS);
    let (_nodes, az) = w.cache_nodes();

    // Warm the fleet: one read of every chunk from the origin; the agent writes each
    // chunk's stripes to the fleet behind the read and settles them when stopped.
    let (agent, state) = w.agent("worker1", "warm", &az);
    let mut c = nbd(&state);
    for i in 0..CHUNKS {
        read_page(&mut c, &img, i).expect("cold read");
    }
    drop(c);
    stop(agent);

    // Passes of the replay, each on a fresh agent (empty local caches), the healthy and
    // the faulted ones interleaved so that the machine's noise falls on both alike.
    let victim = "cache3";
    let faults: [(&str, &[&str]); 3] = [
        ("healthy", &[]),
        ("partitioned", &["partition", victim]),
        ("slowed to 50 ms", &["slow", victim, "50ms"]),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); faults.len()];
    let mut pass = 0;
    for round in 0..4 {
        for (f, (_, fault)) in faults.iter().enumerate() {
            pass += 1;
            let (agent, state) = w.agent("worker1", &format!("pass{pass}"), &az);
            let mut c = nbd(&state);
            for (n, &i) in shuffled(CHUNKS, 7 + round).iter().enumerate() {
                if n == BEFORE && !fault.is_empty() {
                    w.net.fault(fault);
                }
                let t = Instant::now();
                read_page(&mut c, &img, i).unwrap_or_else(|e| {
                    panic!(
                        "read of chunk {i} failed ({}): {e}\n{}",
                        faults[f].0,
                        w.log(&format!("pass{pass}"))
                    )
                });
                if n >= BEFORE {
                    samples[f].push(t.elapsed());
                }
            }
            drop(c);
            let v = w.stats("worker1", &state);
            assert_eq!(tier_hits(&v, "origin"), 0, "{}: {v}", faults[f].0);
            assert_eq!(tier_hits(&v, "az"), CHUNKS as u64, "{}: {v}", faults[f].0);
            stop(agent);
            w.net.fault(&["clear"]);
        }
    }
    let healthy = percentile(&samples[0], 99);
    for (f, (what, _)) in faults.iter().enumerate() {
        eprintln!(
            "AZ reads, {what}: {} reads, p50 {:?}, p99 {:?}, max {:?}",
            samples[f].len(),
            percentile(&samples[f], 50),
            percentile(&samples[f], 99),
            percentile(&samples[f], 100)
        );
    }
    for (f, (what, _)) in faults.iter().enumerate().skip(1) {
        let p99 = percentile(&samples[f], 99);
        assert!(
            p99 <= healthy * 2,
            "with {victim} {what}, p99 {p99:?} is over twice the healthy {healthy:?}"
        );
    }
}

/// Reads one page of each chunk in `chunks` at once, one NBD connection each; the time
/// the slowest took.
fn read_in_parallel(state: &Path, img: &[u8], chunks: &[usize]) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for &i in chunks {
            s.spawn(move || {
                let mut c = nbd(state);
                read_page(&mut c, img, i)
                    .unwrap_or_else(|e| panic!("read of chunk {i} failed: {e}"));
            });
        }
    });
    t.elapsed()
}

#[test]
fn a_slow_origin_and_one_failing_a_tenth_of_requests_slow_reads_but_fail_none() {
    let Some(w) = World::new(&NetOptions {
        workers: 1,
        ..NetOptions::default()
    }) else {
        return;
    };
    const CHUNKS: usize = 40;
    let img = lode_testkit::seeded_bytes(CHUNKS * 512 * 1024, 0x51ed_2701_aa55_0f0f);
    w.import(&img);

    // As made (20 ms each way), then slowed to 500 ms each way: 4 cold chunks each.
    let (agent, state) = w.agent("worker1", "normal", &[]);
    let normal = read_in_parallel(&state, &img, &[0, 1, 2, 3]);
    stop(agent);
    let (agent, state) = w.agent("worker1", "slow", &[]);
    w.net.fault(&["slow", "origin", "500ms"]);
    let slow = read_in_parallel(&state, &img, &[4, 5, 6, 7]);
    w.net.fault(&["clear"]);
    stop(agent);
    eprintln!("4 cold chunks at once: origin 20 ms each way {normal:?}, 500 ms each way {slow:?}");
    // A fetch is at least a round trip of 1 s on a connection made before the fault.
    assert!(
        slow >= Duration::from_secs(1),
        "{slow:?}: the fault did not take"
    );

    // A tenth of requests answered 503 SlowDown, then a tenth 500 InternalError: every
    // read still gets its bytes (the client retries), one chunk at a time.
    for (status, seed, range) in [(503, 11, 8..24), (500, 12, 24..CHUNKS)] {
        let name = format!("flaky{status}");
        let (agent, state) = w.agent("worker1", &name, &[]);
        let before = w.s3.failed_requests();
        w.s3.fail_requests(100_000, status, seed);
        let mut c = nbd(&state);
        let t = Instant::now();
        for i in range.clone() {
            read_page(&mut c, &img, i).unwrap_or_else(|e| {
                panic!(
                    "read of chunk {i} failed with {status}s: {e}\n{}",
                    w.log(&name)
                )
            });
        }
        let took = t.elapsed();
        w.s3.fail_requests(0, status, seed);
        let failed = w.s3.failed_requests() - before;
        eprintln!(
            "{} cold chunks with 10% answered {status}: {took:?}, {failed} requests failed",
            range.len()
        );
        assert!(failed > 0, "no request was failed: the fault did not take");
        let v = w.stats("worker1", &state);
        assert_eq!(tier_hits(&v, "origin"), range.len() as u64, "{v}");
        stop(agent);
    }
}

#[test]
fn an_origin_that_never_answers_fails_the_read_in_bounded_time_naming_store_and_chunk() {
    let Some(w) = World::new(&NetOptions {
        workers: 1,
        ..NetOptions::default()
    }) else {
        return;
    };
    const CHUNKS: usize = 4;
    const BOUND: Duration = Duration::from_secs(30);
    let img = lode_testkit::seeded_bytes(CHUNKS * 512 * 1024, 0x0bad_cafe_1234_5678);
    let chunks = w.import(&img);
    let (_agent, state) = w.agent("worker1", "agent", &[]);

    // Partitioned (after the attach, which read the manifest): nothing comes back.
    w.net.fault(&["partition", "origin"]);
    let mut c = nbd(&state);
    let t = Instant::now();
    let e = read_page(&mut c, &img, 1).expect_err("a read with the origin partitioned");
    let partitioned = t.elapsed();
    w.net.fault(&["clear"]);
    // Every request answered 500: the same, sooner.
    w.s3.fail_requests(1_000_000, 500, 3);
    let t = Instant::now();
    let e500 = read_page(&mut c, &img, 2).expect_err("a read with every request failing");
    let failing = t.elapsed();
    w.s3.fail_requests(0, 500, 3);
    eprintln!(
        "origin partitioned: failed after {partitioned:?} ({e}); every request 500: failed after {failing:?} ({e500})"
    );
    assert!(partitioned < BOUND, "{partitioned:?}");
    assert!(failing < BOUND, "{failing:?}");

    // The agent's log says which chunk, from which store.
    let log = w.log("agent");
    for chunk in [&chunks[1], &chunks[2]] {
        let line = log
            .lines()
            .find(|l| l.contains(chunk.as_str()))
            .unwrap_or_else(|| panic!("no log line names chunk {chunk}:\n{log}"));
        eprintln!("{line}");
        assert!(
            line.contains(&format!("store {}", w.store())),
            "the line does not name the store: {line}"
        );
    }
    // And once the origin answers again, so do reads.
    read_page(&mut c, &img, 3).expect("a read with the origin back");
}

#[test]
fn a_cold_read_over_links_losing_one_packet_in_a_hundred_is_exact() {
    let Some(w) = World::new(&NetOptions {
        workers: 1,
        ..NetOptions::default()
    }) else {
        return;
    };
    const CHUNKS: usize = 16;
    let img = lode_testkit::seeded_bytes(CHUNKS * 512 * 1024, 0x1055_1055_1055_1055);
    w.import(&img);
    let (_nodes, az) = w.cache_nodes();
    w.net.fault(&["loss", "all", "1%"]);
    let (agent, state) = w.agent("worker1", "lossy", &az);
    let mut c = nbd(&state);
    let mut got = vec![0u8; img.len()];
    let t = Instant::now();
    c.read_at(0, &mut got)
        .expect("the whole image over lossy links");
    eprintln!(
        "{} MiB cold over 1% loss: {:?}",
        img.len() >> 20,
        t.elapsed()
    );
    assert!(got == img, "wrong bytes over lossy links");
    drop(c);
    stop(agent);
    // A second worker reads it again over the same links, from the fleet this time.
    let (_agent, state) = w.agent("worker1", "lossy2", &az);
    let mut c = nbd(&state);
    let mut again = vec![0u8; img.len()];
    c.read_at(0, &mut again).expect("the whole image again");
    assert!(again == img, "wrong bytes from the fleet over lossy links");
    let v = w.stats("worker1", &state);
    eprintln!(
        "second read: az hits {}, origin hits {}",
        tier_hits(&v, "az"),
        tier_hits(&v, "origin")
    );
}

/// Runs `f` on a thread in `host`'s network namespace, with a tokio runtime whose
/// threads (made from that thread) are there too: every connection it makes leaves from
/// that host.
fn on_host<T: Send>(net: &TestNet, host: &str, f: impl AsyncFnOnce() -> T + Send) -> T {
    net.on_host(host, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

/// One memcached-protocol request on `s`, whose reply ends with `end`; the reply.
async fn mc(s: &mut tokio::net::TcpStream, req: &[u8], end: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(req).await.expect("send");
    let mut reply = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while !reply.ends_with(end) {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed mid-reply");
        reply.extend_from_slice(&buf[..n]);
    }
    reply
}

#[test]
#[ignore = "a measurement with no pass mark: scripts/bench.sh --sections network runs it (release build) and records its figures"]
fn measure_az_fetch_against_round_trip_and_plain_memcached_and_origin_fetch() {
    let Some(w) = World::new(&NetOptions {
        workers: 1,
        ..NetOptions::default()
    }) else {
        return;
    };
    const CHUNKS: usize = 16;
    const N: usize = 300;
    let img = lode_testkit::seeded_bytes(CHUNKS * 512 * 1024, 0x3141_5926_5358_9793);
    let chunks = w.import(&img);
    let (_nodes, az) = w.cache_nodes();

    // Origin: cold reads through agents without a fleet, one chunk at a time.
    let mut origin = Vec::new();
    for pass in 0..3 {
        let (agent, state) = w.agent("worker1", &format!("origin{pass}"), &[]);
        let mut c = nbd(&state);
        read_page(&mut c, &img, 0).expect("read");
        for i in 1..CHUNKS {
            let t = Instant::now();
            read_page(&mut c, &img, i).expect("read");
            origin.push(t.elapsed());
        }
        drop(c);
        stop(agent);
    }
    // Fill the fleet through an agent, as a worker would.
    let (agent, state) = w.agent("worker1", "fill", &az);
    let mut c = nbd(&state);
    for i in 0..CHUNKS {
        read_page(&mut c, &img, i).expect("read");
    }
    drop(c);
    stop(agent);
    // Warm AZ reads through agents (empty local caches): what a worker's read costs.
    let mut via_agent = Vec::new();
    for pass in 0..3 {
        let (agent, state) = w.agent("worker1", &format!("az{pass}"), &az);
        let mut c = nbd(&state);
        read_page(&mut c, &img, 0).expect("read");
        for i in 1..CHUNKS {
            let t = Instant::now();
            read_page(&mut c, &img, i).expect("read");
            via_agent.push(t.elapsed());
        }
        drop(c);
        stop(agent);
    }

    let names: Vec<lode_format::ChunkName> =
        chunks.iter().map(|c| c.parse().expect("name")).collect();
    let node = az[0].clone();
    let (rtt, plain_stripe, plain_chunk, client) = on_host(&w.net, "worker1", async || {
        let client = lode_az::AzClient::new(lode_az::AzConfig::new(az.clone())).expect("client");
        let mut s = tokio::net::TcpStream::connect(&node)
            .await
            .expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let key = lode_az::chunk_key(&names[0], 4, 2);
        let stripe = mc(&mut s, format!("get {key}\r\n").as_bytes(), b"END\r\n").await;
        assert!(
            stripe.len() > 100_000,
            "node {node} holds no stripe of chunk 0"
        );
        // One item of a whole chunk's size: a plain get of the same bytes.
        let mut set = b"set plain 0 0 524288\r\n".to_vec();
        set.extend_from_slice(&img[..524_288]);
        set.extend_from_slice(b"\r\n");
        mc(&mut s, &set, b"STORED\r\n").await;
        let (mut rtt, mut plain_stripe, mut plain_chunk, mut az_get) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..N {
            let t = Instant::now();
            mc(&mut s, b"version\r\n", b"\r\n").await;
            rtt.push(t.elapsed());
            let t = Instant::now();
            mc(&mut s, format!("get {key}\r\n").as_bytes(), b"END\r\n").await;
            plain_stripe.push(t.elapsed());
            let t = Instant::now();
            mc(&mut s, b"get plain\r\n", b"END\r\n").await;
            plain_chunk.push(t.elapsed());
            let t = Instant::now();
            let got = client.get(&names[i % CHUNKS]).await.expect("AZ get");
            az_get.push(t.elapsed());
            assert!(got.is_some(), "AZ miss for chunk {}", i % CHUNKS);
        }
        (rtt, plain_stripe, plain_chunk, az_get)
    });
    let p = |s: &[Duration]| {
        format!(
            "p50 {:.3} ms, p99 {:.3} ms",
            percentile(s, 50).as_secs_f64() * 1e3,
            percentile(s, 99).as_secs_f64() * 1e3
        )
    };
    eprintln!("worker1 -> {}:", az[0]);
    eprintln!("  round trip (memcached version):      {}", p(&rtt));
    eprintln!(
        "  plain get of one stripe (~128 KiB):  {}",
        p(&plain_stripe)
    );
    eprintln!("  plain get of 512 KiB:                {}", p(&plain_chunk));
    eprintln!("  AzClient::get of a chunk (k=4, m=2): {}", p(&client));
    eprintln!("  agent read, chunk from the AZ tier:  {}", p(&via_agent));
    eprintln!("  agent read, chunk from the origin:   {}", p(&origin));
}
