//! The control plane, measured with real `lode` processes built in release: one `lode
//! control serve` on 127.0.0.1 with mutual TLS and the only keyring, two worker agents
//! under it, a plain agent with the keyring beside them, and a local directory store.
//!
//! 1. Start latency: a start through the service (`/v1/start` from an admin client:
//!    placement, the attach order, the worker's key grant and its attach), timed around
//!    the call, against a direct attach of the same image on the plain agent (`POST
//!    /attach` on its Unix socket), timed the same way. The two kinds alternate, in
//!    alternating order, so machine noise hits both; every start and attach is followed
//!    by an untimed detach. The images are warm: each was started and attached before.
//! 2. Assignment throughput: N clients, each starting its own image and detaching it in
//!    a loop, (a) through the real agents, (b) against a second service whose workers,
//!    played in this process, acknowledge every attach order at once without attaching
//!    (with and without first asking for the start's key).
//!
//! `cargo bench -p lode --bench control_start [-- --quick] [-- --json PATH]`. The full
//! run writes docs/evaluation/control.json; `--quick` (20 starts, 1 s per level) writes
//! nothing unless `--json` names a file.

#[path = "common/control_fleet.rs"]
mod control_fleet;
#[path = "../tests/common/harness.rs"]
mod harness;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use control_fleet::{ControlFleet, Options, ServiceOnly, start};
use lode_control::api::Placed;
use serde_json::json;

/// Concurrent clients for the throughput runs; each needs an image of its own.
const CLIENTS: [usize; 3] = [1, 4, 16];
/// Images the latency run cycles through.
const LATENCY_IMAGES: usize = 4;

struct Args {
    starts: usize,
    secs: f64,
    quick: bool,
    json: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        starts: 1000,
        secs: 8.0,
        quick: false,
        json: Some(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/evaluation/control.json"),
        ),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                a.quick = true;
                a.starts = 20;
                a.secs = 1.0;
                a.json = None;
            }
            "--starts" => a.starts = it.next().context("--starts N")?.parse()?,
            "--secs" => a.secs = it.next().context("--secs S")?.parse()?,
            "--json" => a.json = Some(it.next().context("--json PATH")?.into()),
            // What `cargo bench` passes, and filters: nothing to select here.
            _ => {}
        }
    }
    if a.starts == 0 || a.secs <= 0.0 {
        bail!("--starts and --secs must be positive");
    }
    Ok(a)
}

/// Percentiles and mean of a set of durations, in microseconds.
#[derive(Clone, Copy, Debug)]
struct Summary {
    n: usize,
    p50: f64,
    p99: f64,
    mean: f64,
    min: f64,
    max: f64,
}

fn summarize(samples: &[Duration]) -> Summary {
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let n = us.len();
    // Nearest rank: the smallest sample with at least p% of the samples at or below it.
    let rank = |percent: usize| us[(percent * n).div_ceil(100).clamp(1, n) - 1];
    Summary {
        n,
        p50: rank(50),
        p99: rank(99),
        mean: us.iter().sum::<f64>() / n as f64,
        min: us[0],
        max: us[n - 1],
    }
}

fn summary_json(s: &Summary) -> serde_json::Value {
    json!({
        "n": s.n,
        "p50_us": s.p50.round(),
        "p99_us": s.p99.round(),
        "mean_us": s.mean.round(),
        "min_us": s.min.round(),
        "max_us": s.max.round(),
    })
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

/// A throughput run's outcome.
struct Rate {
    clients: usize,
    starts: usize,
    secs: f64,
    latency: Option<Summary>,
    errors: usize,
    first_error: Option<String>,
}

impl Rate {
    fn per_sec(&self) -> f64 {
        self.starts as f64 / self.secs
    }
}

/// `clients` tasks, each running `cycle(its index)` (one start and its detach, answering
/// the start's latency) until `secs` have passed; the wall time runs until the last task
/// finished its last cycle.
async fn drive<F, Fut>(clients: usize, secs: f64, cycle: F) -> Rate
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Duration>> + Send,
{
    let began = Instant::now();
    let deadline = began + Duration::from_secs_f64(secs);
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (cycle, errors) = (cycle.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                match cycle(c).await {
                    Ok(d) => latencies.push(d),
                    Err(e) => errors.lock().expect("errors").push(format!("{e:#}")),
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("a client task panicked"));
    }
    let secs = began.elapsed().as_secs_f64();
    let errors = errors.lock().expect("errors").clone();
    Rate {
        clients,
        starts: all.len(),
        secs,
        latency: (!all.is_empty()).then(|| summarize(&all)),
        errors: errors.len(),
        first_error: errors.first().cloned(),
    }
}

fn rate_json(path: &str, r: &Rate) -> serde_json::Value {
    json!({
        "path": path,
        "clients": r.clients,
        "starts": r.starts,
        "secs": (r.secs * 1000.0).round() / 1000.0,
        "starts_per_sec": (r.per_sec() * 10.0).round() / 10.0,
        "start_latency": r.latency.as_ref().map(summary_json),
        "errors": r.errors,
        "first_error": r.first_error,
    })
}

fn shell(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One start through the service (timed) and its detach on the worker (not timed).
async fn control_cycle(
    fleet: &Arc<ControlFleet>,
    admin: &lode_control::rpc::Client,
    image: &str,
) -> Result<(Duration, Placed)> {
    let began = Instant::now();
    let reply = start(admin, image).await?;
    let took = began.elapsed();
    let placed = reply.placed;
    let f = fleet.clone();
    tokio::task::spawn_blocking(move || f.detach_start(&reply)).await??;
    Ok((took, placed))
}

/// One direct attach on the plain agent (timed) and its detach (not timed).
fn direct_cycle(fleet: &ControlFleet, image: &str, name: &str) -> Result<Duration> {
    let began = Instant::now();
    fleet.attach_direct(image, name)?;
    let took = began.elapsed();
    fleet.detach_direct(name)?;
    Ok(took)
}

/// One start on the service-only fleet (timed) and its release by the worker (not timed).
async fn ack_cycle(so: &ServiceOnly, image: &str) -> Result<Duration> {
    let began = Instant::now();
    let reply = start(&so.admin, image).await?;
    let took = began.elapsed();
    so.release(&reply).await?;
    Ok(took)
}

fn main() -> Result<()> {
    let a = args()?;
    let load_before = load_average();
    let clock = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let options = Options {
        images: CLIENTS[CLIENTS.len() - 1],
        chunks: 4,
        workers: 2,
        capacity: 64,
    };
    eprintln!(
        "control_start: setting up ({} images, {} workers){}",
        options.images,
        options.workers,
        if a.quick { ", quick" } else { "" }
    );
    let fleet = Arc::new(ControlFleet::new(&options, &rt)?);
    let admin = fleet.admin()?;
    let setup_secs = clock.elapsed().as_secs_f64();

    // Warm every image on its worker and on the plain agent: two of each, not recorded.
    for round in 0..2 {
        for (i, img) in fleet.images.iter().enumerate() {
            rt.block_on(control_cycle(&fleet, &admin, &img.tag))?;
            direct_cycle(&fleet, &img.tag, &format!("warm-{round}-{i}"))?;
        }
    }

    // Placement learns what is warm from heartbeats: wait for one from every worker.
    std::thread::sleep(lode_agent::worker::HEARTBEAT_INTERVAL + Duration::from_millis(500));

    // 1. Latency, the two kinds interleaved, in alternating order.
    eprintln!("control_start: {} starts of each kind", a.starts);
    let mut via_control = Vec::with_capacity(a.starts);
    let mut direct = Vec::with_capacity(a.starts);
    let mut warm_placements = 0;
    for i in 0..a.starts {
        let img = &fleet.images[i % LATENCY_IMAGES.min(fleet.images.len())].tag;
        let mut control = || -> Result<()> {
            let (took, placed) = rt.block_on(control_cycle(&fleet, &admin, img))?;
            via_control.push(took);
            warm_placements += usize::from(placed == Placed::Warm);
            Ok(())
        };
        if i % 2 == 0 {
            control()?;
            direct.push(direct_cycle(&fleet, img, &format!("d-{i}"))?);
        } else {
            direct.push(direct_cycle(&fleet, img, &format!("d-{i}"))?);
            control()?;
        }
    }
    let c = summarize(&via_control);
    let d = summarize(&direct);

    // 2a. The whole path through the real agents.
    let mut full = Vec::new();
    for &n in &CLIENTS {
        eprintln!("control_start: full path, {n} client(s), {} s", a.secs);
        let (f, admin) = (fleet.clone(), admin.clone());
        full.push(rt.block_on(drive(n, a.secs, move |client| {
            let (f, admin) = (f.clone(), admin.clone());
            async move {
                let image = f.images[client].tag.clone();
                Ok(control_cycle(&f, &admin, &image).await?.0)
            }
        })));
    }

    // 2b. The service alone: a second service, its workers only acknowledging orders.
    let so = Arc::new(fleet.service_only(&rt, options.workers)?);
    let mut service_only = Vec::new();
    for ask_keys in [false, true] {
        so.ask_keys(ask_keys);
        for img in &so.images {
            rt.block_on(ack_cycle(&so, &img.tag))?;
        }
        for &n in &CLIENTS {
            eprintln!(
                "control_start: service only ({}), {n} client(s), {} s",
                if ask_keys { "key asked" } else { "no key" },
                a.secs
            );
            let so2 = so.clone();
            let rate = rt.block_on(drive(n, a.secs, move |client| {
                let so = so2.clone();
                async move {
                    let image = so.images[client].tag.clone();
                    ack_cycle(&so, &image).await
                }
            }));
            service_only.push((ask_keys, rate));
        }
    }
    let total_secs = clock.elapsed().as_secs_f64();
    let load_after = load_average();

    // The table.
    let image_mib = options.chunks as f64 * 0.5;
    println!();
    println!(
        "control plane on this host: 1 lode control serve (mTLS, 127.0.0.1), {} worker agents, \
         1 plain agent; {} images of {image_mib} MiB in a local directory store",
        options.workers, options.images
    );
    println!();
    println!(
        "1. start latency, {} of each kind, interleaved, warm caches ({} of {} placed warm)",
        a.starts, warm_placements, a.starts
    );
    println!("  {:<44} {:>10} {:>10} {:>10}", "", "p50", "p99", "mean");
    println!(
        "  {:<44} {:>10} {:>10} {:>10}",
        "via the control service (/v1/start)",
        ms(c.p50),
        ms(c.p99),
        ms(c.mean)
    );
    println!(
        "  {:<44} {:>10} {:>10} {:>10}",
        "direct attach (POST /attach, Unix socket)",
        ms(d.p50),
        ms(d.p99),
        ms(d.mean)
    );
    println!(
        "  {:<44} {:>10} {:>10} {:>10}",
        "added by the control plane",
        ms(c.p50 - d.p50),
        ms(c.p99 - d.p99),
        ms(c.mean - d.mean)
    );
    println!(
        "  {:<44} {:>9.2}x {:>9.2}x {:>9.2}x",
        "ratio",
        c.p50 / d.p50,
        c.p99 / d.p99,
        c.mean / d.mean
    );
    println!();
    println!(
        "2. assignment throughput, each client starting its own image then detaching it, {} s per row",
        a.secs
    );
    println!(
        "  {:<58} {:>7} {:>9} {:>10} {:>10} {:>6}",
        "path", "clients", "starts/s", "start p50", "start p99", "errors"
    );
    let row = |what: &str, r: &Rate| {
        let (p50, p99) = r
            .latency
            .map(|l| (ms(l.p50), ms(l.p99)))
            .unwrap_or_else(|| ("-".into(), "-".into()));
        println!(
            "  {:<58} {:>7} {:>9.1} {:>10} {:>10} {:>6}",
            what,
            r.clients,
            r.per_sec(),
            p50,
            p99,
            r.errors
        );
        if let Some(e) = &r.first_error {
            println!("    first error: {e}");
        }
    };
    const FULL: &str = "whole path, real agents (start + detach)";
    const ACK: &str = "service only, orders acknowledged without attaching";
    const ACK_KEY: &str = "service only, acknowledged after the key grant";
    for r in &full {
        row(FULL, r);
    }
    for (ask_keys, r) in &service_only {
        row(if *ask_keys { ACK_KEY } else { ACK }, r);
    }
    println!();
    println!(
        "setup {setup_secs:.1} s, whole run {total_secs:.1} s; load average {load_before} before, {load_after} after"
    );

    let errors: usize = full.iter().map(|r| r.errors).sum::<usize>()
        + service_only.iter().map(|(_, r)| r.errors).sum::<usize>();
    if let Some(path) = &a.json {
        let commit = shell("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = !shell("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        let doc = json!({
            "measured": shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            "commit": commit,
            "local_changes": dirty,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "command": "cargo bench -p lode --bench control_start",
            "setup": {
                "images": options.images,
                "image_mib": image_mib,
                "workers": options.workers,
                "worker_capacity": options.capacity,
                "store": "local directory",
                "transport": "mTLS over 127.0.0.1, one request per connection",
                "setup_secs": (setup_secs * 10.0).round() / 10.0,
                "run_secs": (total_secs * 10.0).round() / 10.0,
            },
            "latency": {
                "starts_each": a.starts,
                "images": LATENCY_IMAGES,
                "placed_warm": warm_placements,
                "via_control": summary_json(&c),
                "direct": summary_json(&d),
                "added_p50_us": (c.p50 - d.p50).round(),
                "added_p99_us": (c.p99 - d.p99).round(),
                "added_mean_us": (c.mean - d.mean).round(),
                "ratio_p50": (c.p50 / d.p50 * 100.0).round() / 100.0,
                "ratio_p99": (c.p99 / d.p99 * 100.0).round() / 100.0,
                "ratio_mean": (c.mean / d.mean * 100.0).round() / 100.0,
            },
            "throughput": full.iter().map(|r| rate_json(FULL, r))
                .chain(service_only.iter().map(|(k, r)| rate_json(if *k { ACK_KEY } else { ACK }, r)))
                .collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("control_start: wrote {}", path.display());
    }
    if errors > 0 {
        bail!("{errors} start(s) failed during the throughput runs (see the table)");
    }
    Ok(())
}
