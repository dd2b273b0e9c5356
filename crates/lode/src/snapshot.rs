//! `lode snapshot`: import, serve (the page-fault handler), restore (the VMM's part),
//! demo-image, info.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lode_snap::{
    Prefetch, RecordPolicy, ServeOptions, SessionReport, Snapshot, usize_of, workload,
};
use serde_json::json;

use crate::Env;
use crate::cli::{
    PrefetchArg, RecordArg, SnapshotCommand, SnapshotDemoArgs, SnapshotRestoreArgs,
    SnapshotServeArgs, WorkloadArg,
};
use crate::output::{human_bytes, print_json};

/// Exit status when the handler goes away under a restore.
const HANDLER_GONE: u8 = 3;

pub async fn run(env: &Env, home: &Path, c: SnapshotCommand) -> Result<std::process::ExitCode> {
    match c {
        SnapshotCommand::Import(a) => {
            crate::import(
                env,
                &a.file,
                a.tag.as_deref(),
                a.chunk_size,
                a.put_only.put_only,
            )
            .await?
        }
        SnapshotCommand::Serve(a) => serve(env, home, a).await?,
        SnapshotCommand::Restore(a) => {
            // Blocking work on guest memory; keep it off the async workers.
            let env = env.clone();
            return tokio::task::spawn_blocking(move || restore(&env, a))
                .await
                .context("restore thread")?;
        }
        SnapshotCommand::DemoImage(a) => demo_image(env, a)?,
        SnapshotCommand::Info(a) => info(env, &a.image).await?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve(env: &Env, home: &Path, a: SnapshotServeArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let file = match &a.config {
        Some(p) => lode_agent::config::ConfigFile::read(p)?,
        None => lode_agent::config::ConfigFile::default(),
    };
    let (config, env) = crate::agent::worker_config(env, &a.cache, &file, home.join("snap"));
    let store = env.store()?;
    let kms = env.kms_existing()?;
    let (cache, _az) =
        lode_agent::build_cache(&config, store.clone()).context("building the chunk cache")?;
    let snapshot = Snapshot::open(&store, kms.as_ref(), cache, &a.snapshot)
        .await
        .with_context(|| format!("opening snapshot {}", a.snapshot))?;
    let opts = ServeOptions {
        prefetch: match a.prefetch {
            PrefetchArg::Recorded => Prefetch::Recorded,
            PrefetchArg::None => Prefetch::None,
            PrefetchArg::All => Prefetch::All,
        },
        record: match a.record {
            RecordArg::Auto => RecordPolicy::Auto,
            RecordArg::Always => RecordPolicy::Always,
            RecordArg::Never => RecordPolicy::Never,
        },
        prefetch_concurrency: a.prefetch_concurrency.max(1),
        generation_id_offset: a.generation_id_offset,
        max_sessions: a.max_sessions.max(1),
        ..Default::default()
    };
    opts.check(snapshot.size())?;
    let listener = lode_snap::handler::bind(&a.socket)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SessionReport>();
    let on_report = Arc::new(move |r: SessionReport| {
        let _ = tx.send(r);
    });
    if !env.quiet && !env.cli_json {
        let ws = match snapshot.working_set().await {
            Ok(Some(ws)) => format!("working set of {} pages recorded", ws.pages.len()),
            Ok(None) => "no working set recorded yet".into(),
            Err(e) => format!("working-set record unusable ({e})"),
        };
        println!(
            "lode snapshot serve: {} ({}, {} chunks of {}; {ws}) on {}",
            snapshot.id(),
            human_bytes(snapshot.size()),
            snapshot.size().div_ceil(snapshot.chunk_size().bytes_u64()),
            human_bytes(snapshot.chunk_size().bytes_u64()),
            a.socket.display()
        );
    }
    let snapshot = Arc::new(snapshot);
    let server = tokio::spawn(lode_snap::serve(
        listener,
        snapshot.clone(),
        opts,
        on_report,
    ));
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut failed = false;
    loop {
        tokio::select! {
            Some(r) = rx.recv() => {
                failed |= r.error.is_some() && !r.refused;
                print_report(&env, &r, &snapshot)?;
                // A refused connection is not the one restore --once waits for.
                if a.once && !r.refused { break; }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    server.abort();
    let _ = std::fs::remove_file(&a.socket);
    // Sessions that ended as the signal came (or are ending) still report: the channel
    // closes once the last session's sender is gone; a restore still running is given
    // two seconds.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Some(r) = rx.recv().await {
            failed |= r.error.is_some() && !r.refused;
            let _ = print_report(&env, &r, &snapshot);
        }
    })
    .await;
    if a.once && failed {
        bail!("the restore failed (see above)");
    }
    Ok(())
}

fn print_report(env: &Env, r: &SessionReport, snapshot: &Snapshot) -> Result<()> {
    let p50 = r.fault_percentile(50);
    let p99 = r.fault_percentile(99);
    if env.cli_json {
        let mut v = serde_json::to_value(SessionReport {
            fault_us: Vec::new(),
            ..r.clone()
        })?;
        v["fault_p50_us"] = json!(p50);
        v["fault_p99_us"] = json!(p99);
        // The handler's totals since it started, shared by every restore: what a burst
        // fetched from the origin, and how much the restores shared.
        let mut handler = serde_json::to_value(snapshot.burst_stats())?;
        let cache = snapshot.device().cache().snapshot();
        handler["origin_fetches"] = json!(cache.tier("origin").map_or(0, |t| t.hits));
        v["handler"] = handler;
        return print_json(&v);
    }
    if r.refused {
        eprintln!(
            "lode snapshot serve: refused a restore: {}",
            r.error.as_deref().unwrap_or("no slot")
        );
        return Ok(());
    }
    let us = |x: Option<u32>| x.map(|x| format!("{x} µs")).unwrap_or_else(|| "-".into());
    println!(
        "restore {}: {} regions, {} faults ({} zero), {} chunks on demand, {} prefetched \
         (working set {} pages), {} pages copied, {} zeroed, {} removed; fault p50 {} p99 {}; \
         {:.3} s{}",
        r.generation_id,
        r.regions,
        r.faults,
        r.zero_faults,
        r.demand_chunks,
        r.prefetched_chunks,
        r.working_set_pages,
        r.pages_copied,
        r.pages_zeroed,
        r.pages_removed,
        us(p50),
        us(p99),
        r.seconds,
        if r.recorded {
            "; working set recorded"
        } else {
            ""
        }
    );
    if let Some(e) = &r.error {
        eprintln!(
            "lode snapshot serve: restore {} failed: {e}",
            r.generation_id
        );
    }
    Ok(())
}

fn parse_range(s: &str, size: u64) -> Result<(u64, u64)> {
    let (o, l) = s
        .split_once(':')
        .with_context(|| format!("--remove {s:?}: expected OFFSET:LEN"))?;
    let parse = |x: &str| {
        lode_agent::config::parse_size(x).map_err(|e| anyhow::anyhow!("--remove {s:?}: {e}"))
    };
    let (o, l) = (parse(o)?, parse(l)?);
    if o % 4096 != 0 || l % 4096 != 0 || o.checked_add(l).is_none_or(|e| e > size) {
        bail!("--remove {s:?}: must be whole 4096-byte pages inside the {size}-byte memory");
    }
    Ok((o, l))
}

fn restore(env: &Env, a: SnapshotRestoreArgs) -> Result<std::process::ExitCode> {
    let removes: Vec<(u64, u64)> = a
        .remove
        .iter()
        .map(|r| parse_range(r, a.size))
        .collect::<Result<_>>()?;
    let against = match (a.workload, &a.against) {
        (WorkloadArg::Verify, None) => bail!("--workload verify needs --against FILE"),
        (WorkloadArg::Verify, Some(p)) => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let len = f.metadata()?.len();
            if len != a.size {
                bail!("{} is {len} bytes but --size is {}", p.display(), a.size);
            }
            Some(f)
        }
        _ => None,
    };
    let started = Instant::now();
    let r = lode_snap::client::restore(&a.socket, a.size, a.regions)?;
    let handshake = started.elapsed();
    if !a.no_watch {
        let quiet = env.quiet;
        r.watch(move |why| {
            if !quiet {
                eprintln!(
                    "lode snapshot restore: {why}; stopping (a fault cannot be served any more)"
                );
            }
            std::process::exit(i32::from(HANDLER_GONE));
        })?;
    }
    if !env.quiet && !env.cli_json {
        println!(
            "restored {} in {} region(s) from {} in {:.1} ms; generation id {}",
            human_bytes(a.size),
            r.mappings.len(),
            a.socket.display(),
            handshake.as_secs_f64() * 1e3,
            r.generation_id.as_deref().unwrap_or("(none announced)")
        );
    }
    if a.wait > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(a.wait));
    }
    let mem = r.memory.bytes();
    let result = match a.workload {
        WorkloadArg::None => json!({"workload": "none"}),
        WorkloadArg::Index => {
            let q = workload::query(mem, a.seed, a.queries)
                .map_err(|e| anyhow::anyhow!("index workload: {e}"))?;
            let since_restore = started.elapsed();
            if !env.cli_json {
                println!(
                    "index: {} answers checked; first answer {:.2} ms after the workload started \
                     ({:.2} ms after connecting), all in {:.2} ms; generation id in memory {}",
                    q.answered,
                    q.first_answer.as_secs_f64() * 1e3,
                    (handshake + q.first_answer).as_secs_f64() * 1e3,
                    q.total.as_secs_f64() * 1e3,
                    q.generation_id
                );
            }
            json!({"workload": "index", "answered": q.answered,
                "first_answer_ms": q.first_answer.as_secs_f64() * 1e3,
                "total_ms": q.total.as_secs_f64() * 1e3,
                "since_connect_ms": since_restore.as_secs_f64() * 1e3,
                "memory_generation_id": q.generation_id})
        }
        WorkloadArg::Verify => {
            let f = against.context("verify needs --against")?;
            let (pages, mismatches) = verify(&r, &f, &removes, a.generation_id_offset)?;
            if !env.cli_json {
                println!(
                    "verify: {pages} pages compared, {mismatches} differ ({} removed ranges read as zero)",
                    removes.len()
                );
            }
            if mismatches > 0 {
                bail!("restored memory differs from the snapshot in {mismatches} pages");
            }
            json!({"workload": "verify", "pages": pages, "mismatches": mismatches})
        }
    };
    if env.cli_json {
        let mut v = result;
        v["generation_id"] = json!(r.generation_id);
        v["handshake_ms"] = json!(handshake.as_secs_f64() * 1e3);
        print_json(&v)?;
    }
    if a.hold > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(a.hold));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Compares every page with the snapshot file; removed ranges must read zero (they are
/// read first, then dropped, then read again), and the generation id, when its offset is
/// given, must be the announced one.
fn verify(
    r: &lode_snap::client::Restore,
    f: &std::fs::File,
    removes: &[(u64, u64)],
    generation_offset: Option<u64>,
) -> Result<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let mem = r.memory.bytes();
    for &(o, l) in removes {
        // Fault the range in, then drop it the way a balloon does.
        let _ = mem[usize_of(o)..usize_of(o + l)]
            .iter()
            .step_by(4096)
            .fold(0u8, |a, b| a ^ b);
        r.memory.remove(o, l)?;
    }
    let expected_id = match (generation_offset, &r.generation_id) {
        (Some(off), Some(id)) => Some((off, hex_bytes(id)?)),
        (Some(_), None) => bail!("the handler announced no generation id"),
        _ => None,
    };
    let mut want = vec![0u8; 1 << 20];
    let (mut pages, mut bad) = (0u64, 0u64);
    let mut at = 0u64;
    while at < r.memory.len() {
        let n = want.len().min(usize_of(r.memory.len() - at));
        f.read_exact_at(&mut want[..n], at)
            .context("reading the snapshot file")?;
        for &(o, l) in removes {
            let (s, e) = (o.max(at), (o + l).min(at + n as u64));
            if s < e {
                want[usize_of(s - at)..usize_of(e - at)].fill(0);
            }
        }
        if let Some((off, id)) = &expected_id
            && *off >= at
            && off + 16 <= at + n as u64
        {
            let i = usize_of(off - at);
            want[i..i + 16].copy_from_slice(id);
        }
        let got = &mem[usize_of(at)..usize_of(at) + n];
        for (p, (g, w)) in got.chunks(4096).zip(want[..n].chunks(4096)).enumerate() {
            pages += 1;
            if g != w {
                bad += 1;
                if bad <= 5 {
                    eprintln!("page at offset {} differs", at + p as u64 * 4096);
                }
            }
        }
        at += n as u64;
    }
    Ok((pages, bad))
}

fn hex_bytes(s: &str) -> Result<[u8; 16]> {
    let bad = || anyhow::anyhow!("generation id {s:?} is not 32 hex digits");
    if s.len() != 32 || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn demo_image(env: &Env, a: SnapshotDemoArgs) -> Result<()> {
    // About 300 bytes per key with its table slots: fill roughly half the memory.
    let keys = a.keys.unwrap_or((a.size / 2 / 330).max(1));
    let started = Instant::now();
    let m = workload::build(a.size, keys).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tmp = a.file.with_extension("partial");
    std::fs::write(&tmp, &m).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.file).with_context(|| format!("renaming to {}", a.file.display()))?;
    if env.cli_json {
        print_json(&json!({"file": a.file, "size": a.size, "keys": keys,
            "generation_id_offset": workload::GENERATION_OFFSET}))?;
    } else if !env.quiet {
        println!(
            "{}: {} of memory holding an index of {keys} keys (built in {:.1} s); its \
             generation id slot is at offset {}",
            a.file.display(),
            human_bytes(a.size),
            started.elapsed().as_secs_f64(),
            workload::GENERATION_OFFSET
        );
    }
    Ok(())
}

async fn info(env: &Env, reference: &str) -> Result<()> {
    let store = env.store()?;
    let kms = env.kms_existing()?;
    let dir = tempfile_dir()?;
    let config = lode_agent::AgentConfig::new(dir.path());
    let (cache, _) = lode_agent::build_cache(&config, store.clone())?;
    let s = Snapshot::open(&store, kms.as_ref(), cache, reference)
        .await
        .with_context(|| format!("opening snapshot {reference}"))?;
    let chunks = s.size().div_ceil(s.chunk_size().bytes_u64());
    let zero = (0..chunks).filter(|&i| s.device().is_zero_chunk(i)).count();
    let ws = s.working_set().await;
    let ws_pages = ws
        .as_ref()
        .ok()
        .and_then(|w| w.as_ref())
        .map(|w| w.pages.len());
    if env.cli_json {
        return print_json(&json!({"id": s.id(), "size": s.size(),
            "chunk_size": s.chunk_size().bytes_u64(), "chunks": chunks, "zero_chunks": zero,
            "working_set_pages": ws_pages}));
    }
    println!("snapshot     {}", s.id());
    println!("memory       {}", human_bytes(s.size()));
    println!(
        "chunks       {chunks} of {} ({zero} all-zero, not stored)",
        human_bytes(s.chunk_size().bytes_u64())
    );
    match ws {
        Ok(Some(w)) => println!(
            "working set  {} pages ({})",
            w.pages.len(),
            human_bytes(w.pages.len() as u64 * 4096)
        ),
        Ok(None) => println!("working set  none recorded"),
        Err(e) => println!("working set  unusable: {e}"),
    }
    Ok(())
}

/// A scratch directory for a cache nobody keeps.
fn tempfile_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().context("creating a scratch directory")
}
