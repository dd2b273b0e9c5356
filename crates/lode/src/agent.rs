//! `lode agent` and the commands that talk to it over its control socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use lode_agent::control;
use serde_json::{Value, json};

use crate::Env;
use crate::cli::{AgentArgs, AttachArgs, CacheArgs, ControlArg, DetachArgs, WorkerArgs};
use crate::output::{human_bytes, print_json};

fn agent_dir(home: &Path) -> PathBuf {
    home.join("agent")
}

pub(crate) fn control_path(home: &Path, arg: &ControlArg) -> PathBuf {
    arg.control
        .clone()
        .unwrap_or_else(|| agent_dir(home).join("control.sock"))
}

/// Runs the daemon until SIGINT or SIGTERM.
/// The worker configuration the cache flags and a config file describe, with flags
/// winning; also the environment with the file's store and KMS where no flag named them.
pub(crate) fn worker_config(
    env: &Env,
    a: &CacheArgs,
    file: &lode_agent::config::ConfigFile,
    default_state_dir: PathBuf,
) -> (lode_agent::AgentConfig, Env) {
    let state_dir = a
        .state_dir
        .clone()
        .or(file.state_dir.clone())
        .unwrap_or(default_state_dir);
    let mut config = lode_agent::AgentConfig::new(&state_dir);
    let c = &file.cache;
    config.decrypted = a
        .cache_decrypted
        .or(c.decrypted)
        .unwrap_or(config.decrypted);
    config.cache_memory = a.cache_memory.or(c.memory).unwrap_or(config.cache_memory);
    config.cache_disk = a.cache_disk.or(c.disk).unwrap_or(config.cache_disk);
    config.cache_policy = a.cache_policy.or(c.policy).unwrap_or(config.cache_policy);
    let mut az = file.az.clone().unwrap_or_default();
    if !a.az_nodes.is_empty() {
        az.nodes = a.az_nodes.clone();
    }
    az.k = a.az_k.or(az.k);
    az.m = a.az_m.or(az.m);
    if !az.nodes.is_empty() {
        config.az = Some(az.to_config());
    }
    if let Some(n) = a.origin_concurrency.or(file.origin.concurrency) {
        config.origin_concurrency = n;
    }
    let mut env = env.clone();
    if let (false, Some(s)) = (env.store_given, file.store.clone()) {
        env.store_spec = s;
    }
    if let (false, Some(k)) = (env.kms_given, file.kms.clone()) {
        env.kms_spec = k;
    }
    (config, env)
}

pub async fn run(env: &Env, home: &Path, a: AgentArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let file = match &a.config {
        Some(p) => lode_agent::config::ConfigFile::read(p)?,
        None => lode_agent::config::ConfigFile::default(),
    };
    let (mut config, env) = worker_config(env, &a.cache, &file, agent_dir(home));
    let state_dir = config.state_dir.clone();
    file.nbd.apply(&mut config.nbd_limits);
    file.prefetch.apply(&mut config.prefetch);
    let p = &a.prefetch;
    if let Some(n) = p.prefetch_concurrency {
        config.prefetch.concurrency = n;
    }
    if p.no_prefetch {
        config.prefetch.working_set = false;
    }
    if let Some(n) = p.readahead_max_chunks {
        config.prefetch.readahead_max_chunks = n;
    }
    if let Some(ms) = p.prefetch_record_window_ms {
        config.prefetch.record_window = std::time::Duration::from_millis(ms);
    }
    if let Some(p) = a.nbd_unix.or(file.nbd.unix) {
        config.nbd_unix = p;
    }
    config.nbd_tcp = a.nbd_tcp.or(file.nbd.tcp);
    if a.no_files {
        config.files = None;
    } else if let Some(d) = a.files.or(file.files) {
        config.files = (!d.as_os_str().is_empty()).then_some(d);
    }
    let metrics = a.metrics.or(file.metrics.listen);
    let control = a
        .control
        .clone()
        .or(file.control)
        .unwrap_or_else(|| state_dir.join("control.sock"));
    let store = env.store()?;
    let worker = match worker_settings(&a.worker, file.worker.as_ref())? {
        Some(w) => {
            if env.kms_given || file.kms.is_some() {
                bail!(
                    "a worker of a control service holds no KMS or keyring: it gets each \
                     image's key as a grant; drop --kms/LODE_KMS and the config file's `kms`"
                );
            }
            Some(start_worker(w).await?)
        }
        None => None,
    };
    if let Some(path) = &a.trace.trace {
        let name = match (&a.trace.trace_worker, &worker) {
            (Some(n), _) => n.clone(),
            (None, Some(w)) => w.grants.config().worker.clone(),
            (None, None) => host_name(),
        };
        config.trace = Some(lode_agent::TraceConfig {
            path: path.clone(),
            worker: name,
            max_bytes: a
                .trace
                .trace_max_bytes
                .unwrap_or(lode_agent::DEFAULT_TRACE_MAX_BYTES),
        });
    }
    let keys = match &worker {
        Some(w) => lode_agent::Keys::Grants(w.grants.clone()),
        None => lode_agent::Keys::Kms(Arc::from(env.kms_existing()?)),
    };
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let agent = lode_agent::Agent::start_with(config, store, keys)
        .await
        .context("starting the agent")?;
    let task =
        control::serve_control(agent.clone(), &control).context("starting the control API")?;
    let worker_tasks = worker.map(|w| {
        let orders = lode_control::rpc::serve(
            w.listener,
            Arc::new(lode_agent::worker::Orders(agent.clone())),
        );
        let beats =
            lode_agent::worker::spawn_heartbeats(agent.clone(), w.grants.clone(), w.registered);
        (w.grants, w.bound, orders, beats)
    });
    let metrics_task = match metrics {
        Some(addr) => Some(control::serve_metrics(agent.clone(), addr).await?),
        None => None,
    };
    let n = agent.list().await.len();
    if !env.quiet {
        let tcp = agent
            .nbd_tcp()
            .map(|a| format!(" and tcp {a}"))
            .unwrap_or_default();
        let files = agent
            .config()
            .files
            .as_ref()
            .map(|d| format!("; files in {}", d.display()))
            .unwrap_or_default();
        let metrics = metrics_task
            .as_ref()
            .map(|(a, _)| format!("; metrics on http://{a}/metrics"))
            .unwrap_or_default();
        let worker = worker_tasks
            .as_ref()
            .map(|(g, bound, _, _)| {
                format!(
                    "; worker {} taking orders on {bound} (registered as {})",
                    g.config().worker,
                    g.config().address
                )
            })
            .unwrap_or_default();
        println!(
            "lode agent: nbd on unix {}{tcp}; control on {}{files}{metrics}{worker}; state in {}; {n} attachment(s) restored",
            agent.config().nbd_unix.display(),
            control.display(),
            state_dir.display()
        );
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    task.abort();
    if let Some((_, t)) = metrics_task {
        t.abort();
    }
    if let Some((_, _, orders, beats)) = worker_tasks {
        orders.abort();
        beats.abort();
    }
    let _ = std::fs::remove_file(&control);
    agent.shutdown().await;
    if !env.quiet {
        println!("lode agent: stopped");
    }
    Ok(())
}

/// What `[worker]` and the worker flags say, flags winning; `None` when neither names a
/// control service.
struct WorkerSettings {
    control: String,
    credentials: PathBuf,
    id: String,
    listen: std::net::SocketAddr,
    advertise: Option<String>,
    capacity: u32,
}

fn worker_settings(
    a: &WorkerArgs,
    file: Option<&lode_agent::config::WorkerSection>,
) -> Result<Option<WorkerSettings>> {
    let file = file.cloned().unwrap_or_default();
    let Some(control) = a.control_endpoint.clone().or(file.control) else {
        if a.credentials.is_some() || a.worker_id.is_some() || a.orders_listen.is_some() {
            bail!("--credentials, --worker-id and --orders-listen need --control-endpoint");
        }
        return Ok(None);
    };
    let credentials = a
        .credentials
        .clone()
        .or(file.credentials)
        .context("a worker needs --credentials DIR (or [worker] credentials)")?;
    let id = a
        .worker_id
        .clone()
        .or(file.id)
        .context("a worker needs --worker-id ID (or [worker] id)")?;
    lode_agent::worker::check_worker_id(&id)?;
    Ok(Some(WorkerSettings {
        control,
        credentials,
        id,
        listen: a
            .orders_listen
            .or(file.listen)
            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        advertise: a.orders_advertise.clone().or(file.advertise),
        capacity: a.capacity.or(file.capacity).unwrap_or(16),
    }))
}

/// A worker's link to its control service, its order listener bound, and whether its
/// first registration went through.
struct Worker {
    grants: Arc<lode_agent::worker::Grants>,
    listener: lode_control::rpc::Listener,
    bound: std::net::SocketAddr,
    registered: bool,
}

/// Loads the worker's credentials, binds its order listener and registers it (a
/// control service that does not answer yet is retried by the heartbeats).
async fn start_worker(w: WorkerSettings) -> Result<Worker> {
    use lode_control::api::{Identity, Role};
    let who = Identity {
        role: Role::Worker,
        id: w.id.clone(),
    };
    let creds = Arc::new(
        lode_control::pki::Credentials::load(&w.credentials, &who)
            .with_context(|| format!("loading worker {}'s credentials", w.id))?,
    );
    let endpoint: lode_control::rpc::Endpoint = w
        .control
        .parse()
        .with_context(|| format!("control endpoint {:?}", w.control))?;
    let listener = lode_control::rpc::Listener::tls(&w.listen.to_string(), creds.clone())
        .await
        .with_context(|| format!("taking attach orders on {}", w.listen))?;
    let bound = listener
        .local_addr()
        .context("the order listener has no address")?;
    let address = match w.advertise {
        Some(a) => a,
        None if bound.ip().is_unspecified() => bail!(
            "orders are taken on {bound}, which the control service cannot dial: give \
             --orders-advertise HOST:PORT"
        ),
        None => bound.to_string(),
    };
    let client = lode_control::rpc::Client::new(endpoint, creds)
        .with_context(|| format!("a client of the control service at {}", w.control))?;
    let grants = Arc::new(lode_agent::worker::Grants::new(
        Arc::new(lode_agent::worker::RpcControl(client)),
        lode_agent::worker::WorkerConfig {
            worker: w.id,
            address,
            capacity: w.capacity,
        },
    )?);
    let registered = match grants.register().await {
        Ok(()) => true,
        Err(e) => {
            eprintln!("lode agent: registering with the control service: {e} (retrying)");
            false
        }
    };
    Ok(Worker {
        grants,
        listener,
        bound,
        registered,
    })
}

pub(crate) fn call(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    Ok(lode_run::call(sock, method, path, body)?)
}

pub fn attach(env: &Env, home: &Path, a: AttachArgs) -> Result<()> {
    let sock = control_path(home, &a.control);
    let v = call(
        &sock,
        "POST",
        "/attach",
        Some(&json!({"image": a.image, "name": a.name, "writable": a.rw})),
    )?;
    if env.cli_json {
        print_json(&v)?;
    } else {
        println!(
            "attached {} as {} ({}, {}): nbd+unix:///{}?socket={}",
            v["id"].as_str().unwrap_or_default(),
            v["name"].as_str().unwrap_or_default(),
            human_bytes(v["size"].as_u64().unwrap_or_default()),
            if v["writable"].as_bool() == Some(true) {
                "writable"
            } else {
                "read-only"
            },
            v["nbd_export"].as_str().unwrap_or_default(),
            v["nbd_unix"].as_str().unwrap_or_default(),
        );
    }
    Ok(())
}

pub fn detach(env: &Env, home: &Path, a: DetachArgs) -> Result<()> {
    let sock = control_path(home, &a.control);
    let v = call(
        &sock,
        "POST",
        "/detach",
        Some(&json!({"name": a.name, "keep_overlay": a.keep_overlay})),
    )?;
    if env.cli_json {
        print_json(&v)?;
    } else if !env.quiet {
        println!("detached {}", a.name);
    }
    Ok(())
}

pub fn ls(env: &Env, home: &Path, a: ControlArg) -> Result<()> {
    let v = call(&control_path(home, &a), "GET", "/ls", None)?;
    if env.cli_json {
        print_json(&v)?;
    } else {
        for att in v.as_array().into_iter().flatten() {
            println!(
                "{}  {}  {}  {}  {}",
                att["name"].as_str().unwrap_or_default(),
                att["id"].as_str().unwrap_or_default(),
                human_bytes(att["size"].as_u64().unwrap_or_default()),
                if att["writable"].as_bool() == Some(true) {
                    "rw"
                } else {
                    "ro"
                },
                att["image"].as_str().unwrap_or_default(),
            );
        }
    }
    Ok(())
}

/// The bucket bound under which `pct`% of the counts fall (µs), from a snapshot's histogram.
fn percentile(bounds: &Value, counts: &Value, pct: u64) -> Option<String> {
    let bounds: Vec<u64> = bounds
        .as_array()?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let counts: Vec<u64> = counts
        .as_array()?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (total * pct).div_ceil(100);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return Some(match bounds.get(i) {
                Some(b) => format!("≤{b} µs"),
                None => format!(">{} µs", bounds.last().copied().unwrap_or(0)),
            });
        }
    }
    None
}

pub fn stats(env: &Env, home: &Path, a: ControlArg) -> Result<()> {
    let v = call(&control_path(home, &a), "GET", "/stats", None)?;
    if env.cli_json {
        return print_json(&v);
    }
    println!(
        "reads      {} ({}), {} failed, {} zero-chunk reads, {} joined fetches",
        v["reads"],
        human_bytes(v["read_bytes"].as_u64().unwrap_or_default()),
        v["read_errors"],
        v["zero_chunk_reads"],
        v["joined_fetches"]
    );
    if let Some(p) = percentile(&v["read_latency_buckets_us"], &v["read_latency_counts"], 50) {
        let p99 = percentile(&v["read_latency_buckets_us"], &v["read_latency_counts"], 99)
            .unwrap_or_default();
        println!("latency    p50 {p}, p99 {p99}");
    }
    print_tiers(&v, "");
    if let Some(p) = v["cache_policy"].as_str() {
        println!("eviction   {p} (decrypted, memory and disk)");
    }
    if v["nbd"].is_object() {
        let nbd = &v["nbd"];
        let n = |k: &str| nbd[k].as_u64().unwrap_or_default();
        println!(
            "nbd        {} connections open (limit {}), {} refused, {} ended by an error; {} held for unread replies (peak {}, limit {} a connection)",
            n("connections_open"),
            n("max_connections"),
            n("connections_refused"),
            n("connection_errors"),
            human_bytes(n("buffered_bytes")),
            human_bytes(n("peak_buffered_bytes")),
            human_bytes(n("max_buffered_bytes")),
        );
    }
    if v["az"].is_object() {
        print_az(&v["az"], "");
    }
    print_prefetch(&v["prefetch"]);
    Ok(())
}

/// Each image's prefetch figures: what its working set and readahead fetched ahead,
/// and how much of it reads used, wasted, or have not reached yet.
fn print_prefetch(images: &Value) {
    let Some(images) = images.as_object().filter(|m| !m.is_empty()) else {
        return;
    };
    println!(
        "{:<10} {:<12} {:<12} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "prefetch", "image", "kind", "chunks", "bytes", "used", "wasted", "pending"
    );
    for (id, s) in images {
        for kind in ["working_set", "readahead"] {
            let k = &s[kind];
            let n = |f: &str| k[f].as_u64().unwrap_or_default();
            println!(
                "{:<10} {:<12} {:<12} {:>7} {:>10} {:>10} {:>10} {:>10}",
                "",
                id.get(..12).unwrap_or(id),
                kind,
                n("chunks"),
                human_bytes(n("bytes")),
                human_bytes(n("used_bytes")),
                human_bytes(n("wasted_bytes")),
                human_bytes(n("pending_bytes")),
            );
        }
        let recorded = s["records_stored"].as_u64().unwrap_or_default();
        if recorded > 0 {
            println!(
                "{:<10} {:<12} recorded {} chunks in {} record(s)",
                "",
                id.get(..12).unwrap_or(id),
                s["recorded_chunks"].as_u64().unwrap_or_default(),
                recorded
            );
        }
    }
}

/// The AZ client's figures: the tier's totals, then one line per node.
pub(crate) fn print_az(az: &Value, indent: &str) {
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or_default();
    println!(
        "{indent}az cache: {} gets, {} hits, {} misses, {} rebuilt from parity, {} failed the name check; {} puts ({} incomplete), {} read repairs",
        n(az, "gets"),
        n(az, "hits"),
        n(az, "misses"),
        n(az, "rebuilds"),
        n(az, "integrity_failures"),
        n(az, "puts"),
        n(az, "incomplete_puts"),
        n(az, "repairs")
    );
    println!(
        "{indent}az reads: {} stripe requests, {} hedged (delay {} µs), {} after a failure or miss",
        n(az, "stripe_requests"),
        n(az, "hedges"),
        n(az, "hedge_delay_us"),
        n(az, "fallbacks")
    );
    println!(
        "{indent}{:<22} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "node", "up", "hits", "misses", "timeouts", "errors", "corrupt", "stores"
    );
    for node in az["nodes"].as_array().into_iter().flatten() {
        println!(
            "{indent}{:<22} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            node["node"].as_str().unwrap_or_default(),
            if node["up"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            n(node, "hits"),
            n(node, "misses"),
            n(node, "timeouts"),
            n(node, "errors"),
            n(node, "integrity_failures"),
            n(node, "stores")
        );
    }
}

/// The per-tier table of a metrics snapshot (as JSON): hits, misses, hit rate, bytes,
/// integrity failures, latency p50 and p99.
pub(crate) fn print_tiers(v: &Value, indent: &str) {
    println!(
        "{indent}{:<10} {:>8} {:>8} {:>7} {:>10} {:>8} {:>10} {:>10}",
        "tier", "hits", "misses", "hit%", "bytes", "corrupt", "p50", "p99"
    );
    for t in v["tiers"].as_array().into_iter().flatten() {
        let hits = t["hits"].as_u64().unwrap_or_default();
        let misses = t["misses"].as_u64().unwrap_or_default();
        let rate = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 * 100.0 / (hits + misses) as f64
        };
        let p = |q| {
            percentile(&t["latency_buckets_us"], &t["latency_counts"], q)
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{indent}{:<10} {:>8} {:>8} {:>6.1}% {:>10} {:>8} {:>10} {:>10}",
            t["name"].as_str().unwrap_or_default(),
            hits,
            misses,
            rate,
            human_bytes(t["bytes"].as_u64().unwrap_or_default()),
            t["integrity_failures"].as_u64().unwrap_or_default(),
            p(50),
            p(99)
        );
    }
}

/// This machine's name (the kernel's), or `worker` when it has none.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}
