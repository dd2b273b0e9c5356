//! The `lode` command: parses arguments, builds the pieces from the library crates, and
//! prints. No logic of its own lives here.
//!
//! Where this fits: docs/architecture.md, "The crates".

mod agent;
mod cli;
mod control;
mod demo;
mod mount;
mod output;
mod sim;
mod simburst;
mod snapshot;
mod vm;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use lode_image::{Progress, PublishOptions, Publisher};
use lode_kms::Kms;
use lode_store::Store;

use crate::cli::{Cli, Command, KmsCommand, PrefetchCommand, RootCommand, StoreCommand};
use crate::output::{Bar, human_bytes, print_json};

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Agent(_) | Command::CacheNode(_)) {
        // A command whose output goes to `head` should end quietly when the pipe closes,
        // as other Unix tools do, not panic in println!. The agent keeps Rust's default
        // (SIGPIPE ignored), so a client that hangs up never kills it.
        // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lode: error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// Keeps chunk-sized buffers (512 KiB) in malloc's heap instead of fresh mmaps.
///
/// glibc serves allocations of 128 KiB and up with mmap(2) by default, so every chunk
/// read, copied or decrypted landed on untouched pages, and each 4 KiB page faulted on
/// first touch: measured on the 2-core VM here, reading a cached 512 KiB file into a new
/// buffer took 286 µs and copying it 258 µs, against 104 µs and 21 µs once the heap
/// reuses freed buffers. That was most of a disk-cache hit's time. The caches above are
/// bounded in bytes, so what the heap keeps is bounded too.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The error and its causes on one line. lode's error types already print their cause
/// inline (so a library user sees the whole story too), so a cause whose text is already
/// in the line is not repeated.
fn render_error(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run(cli: Cli) -> Result<ExitCode> {
    // A calculation over a file: no store, no keys, no runtime.
    if let Command::SimBurst(a) = &cli.command {
        return simburst::run(cli.json, a).map(|()| ExitCode::SUCCESS);
    }
    // `lode run`, `mount` and `umount` are blocking from end to end: a start does not
    // wait for an async runtime's worker threads to be made and joined.
    if matches!(
        cli.command,
        Command::Run(_)
            | Command::Mount(_)
            | Command::Umount(_)
            | Command::Sim(_)
            | Command::Advise(_)
    ) {
        let (home, env) = env_of(&cli)?;
        return match cli.command {
            Command::Run(a) => mount::run(&env, &home, a),
            Command::Mount(a) => mount::mount(&env, &home, a),
            Command::Umount(a) => mount::umount(&env, &home, a).map(|()| ExitCode::SUCCESS),
            Command::Sim(a) => sim::run(env.cli_json, env.quiet, *a).map(|()| ExitCode::SUCCESS),
            Command::Advise(a) => {
                sim::advise(env.cli_json, env.quiet, *a).map(|()| ExitCode::SUCCESS)
            }
            command => with_runtime(Cli { command, ..cli }),
        };
    }
    with_runtime(cli)
}

fn with_runtime(cli: Cli) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(dispatch(cli))
}

/// The pieces every command may need, built from the global flags.
#[derive(Clone)]
struct Env {
    cli_json: bool,
    quiet: bool,
    store_spec: String,
    kms_spec: String,
    /// Whether --store or LODE_STORE named the store (a config file may name it otherwise).
    store_given: bool,
    /// Whether --kms or LODE_KMS named the key service.
    kms_given: bool,
    kms_key: Option<String>,
}

impl Env {
    fn store(&self) -> Result<Store> {
        Ok(Store::open(&self.store_spec)?)
    }

    /// The store for a publishing command: put-only when asked (see `--put-only`).
    fn publish_store(&self, put_only: bool) -> Result<Store> {
        let store = self.store()?;
        Ok(if put_only { store.put_only() } else { store })
    }

    /// The KMS for making images: a missing keyring is created.
    fn kms(&self) -> Result<Box<dyn Kms>> {
        Ok(lode_kms::open(&self.kms_spec)?)
    }

    /// The KMS for reading images: a missing keyring is an error.
    fn kms_existing(&self) -> Result<Box<dyn Kms>> {
        Ok(lode_kms::open_existing(&self.kms_spec)?)
    }

    fn progress(&self, what: &str) -> Arc<Bar> {
        Arc::new(Bar::new(what, self.quiet || self.cli_json))
    }
}

/// `$LODE_HOME` and the pieces built from the global flags.
fn env_of(cli: &Cli) -> Result<(std::path::PathBuf, Env)> {
    let home = cli::data_dir()?;
    let env = Env {
        cli_json: cli.json,
        quiet: cli.quiet,
        store_spec: cli
            .store
            .clone()
            .unwrap_or_else(|| home.join("store").display().to_string()),
        kms_spec: cli
            .kms
            .clone()
            .unwrap_or_else(|| home.join("keyring.json").display().to_string()),
        kms_key: cli.kms_key.clone(),
        store_given: cli.store.is_some(),
        kms_given: cli.kms.is_some(),
    };
    Ok((home, env))
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let (home, env) = env_of(&cli)?;
    match cli.command {
        Command::Import(a) => {
            let put_only = a.put_only.put_only;
            import(&env, &a.file, a.tag.as_deref(), a.chunk_size, put_only).await?
        }
        Command::Flatten(a) => {
            let store = env.publish_store(a.put_only.put_only)?;
            let kms = env.kms()?;
            let key_id = env.kms_key.clone().unwrap_or_else(|| kms.default_key_id());
            let publisher = Publisher::new(&store, kms.as_ref(), key_id);
            let req = lode_image::FlattenRequest {
                source: a.source.clone(),
                tag: a.tag.clone(),
                chunk_size: a.chunk_size,
                work_dir: a
                    .work_dir
                    .clone()
                    .unwrap_or_else(|| lode_image::default_work_dir(&home)),
                keep_image: a.keep_image.clone(),
                registry_cache: home.join("cache/registry"),
                registry_auth: lode_image::RegistryAuth::from_env(),
                pull: lode_image::PullOptions {
                    min_rate: a.pull_min_rate,
                    rate_window: std::time::Duration::from_secs(a.pull_rate_window),
                    ..Default::default()
                },
            };
            let news = Arc::new(output::News::new(
                env.quiet || env.cli_json,
                env.quiet || env.cli_json,
            ));
            let r = lode_image::flatten_and_publish(&publisher, &req, news.clone()).await?;
            news.finish();
            let s = &r.published.stats;
            if env.cli_json {
                print_json(&serde_json::json!({
                    "id": r.published.id, "tag": a.tag, "image_digest": r.image_digest,
                    "layers": r.layers, "image_size": r.image_size, "stats": s,
                    "dedup_share": s.dedup_share(), "flatten_seconds": r.flatten_seconds,
                    "publish_seconds": r.publish_seconds,
                    "config": r.published.manifest.header().config,
                }))?;
            } else {
                println!("manifest  {}", r.published.id);
                if let Some(t) = &a.tag {
                    println!("tag       {t}");
                }
                println!(
                    "source    {} ({} layers, digest {})",
                    a.source,
                    r.layers.len(),
                    r.image_digest
                );
                println!(
                    "image     {} ext4 in {} chunks",
                    human_bytes(r.image_size),
                    s.chunks
                );
                print_publish_stats(s);
                println!(
                    "time      {:.2} s flatten + {:.2} s publish",
                    r.flatten_seconds, r.publish_seconds
                );
            }
        }
        Command::Export(a) => {
            let store = env.store()?;
            let kms = env.kms_existing()?;
            let img = lode_image::open_image(&store, Some(kms.as_ref()), &a.image).await?;
            alarm_on_read(&store, &img, "lode export").await;
            let bar = env.progress("exporting");
            let st = lode_image::export(&store, &img, &a.out, bar.clone() as Arc<dyn Progress>)
                .await
                .with_context(|| format!("exporting {} to {}", a.image, a.out.display()))?;
            bar.finish();
            if env.cli_json {
                print_json(&serde_json::json!({"id": img.id, "out": a.out, "stats": st}))?;
            } else {
                println!(
                    "wrote {} ({}) to {}: {} chunks fetched, {} zero chunks left as holes",
                    img.id,
                    human_bytes(st.device_size),
                    a.out.display(),
                    st.fetched_chunks,
                    st.zero_chunks
                );
            }
        }
        Command::Inspect(a) => {
            let store = env.store()?;
            let img = lode_image::open_image(&store, None, &a.image).await?;
            let mut v = serde_json::to_value(lode_image::ManifestView::new(&img.manifest))?;
            // The working set is a hint beside the manifest: a store handle that may not
            // read it (the control service's role, say) still inspects the manifest, and
            // says what it could not read.
            match lode_agent::stored_working_set(&store, &img).await {
                Ok(ws) => v["working_set"] = serde_json::to_value(ws)?,
                Err(e) => {
                    let e = format!("reading the working set of {}: {e}", img.id);
                    if !env.quiet {
                        eprintln!("lode: warning: {e}");
                    }
                    v["working_set"] = serde_json::Value::Null;
                    v["working_set_error"] = e.into();
                }
            }
            print_json(&v)?;
        }
        Command::Prefetch(PrefetchCommand::Record(a)) => {
            let store = env.store()?;
            let kms = env.kms_existing()?;
            let img = lode_image::open_image(&store, Some(kms.as_ref()), &a.image).await?;
            let (ws, bad) = lode_agent::mark_rerecord(&store, &img).await?;
            if let Some(e) = bad {
                eprintln!(
                    "lode: the stored working set of {} did not open ({e}): replaced",
                    img.id
                );
            }
            if env.cli_json {
                print_json(
                    &serde_json::json!({"id": img.id, "rerecord": true, "chunks": ws.chunks.len()}),
                )?;
            } else {
                println!(
                    "{}: the next start records its working set again ({} chunks prefetched until then)",
                    img.id,
                    ws.chunks.len()
                );
            }
        }
        Command::Prefetch(PrefetchCommand::Clear(a)) => {
            let store = env.store()?;
            let img = lode_image::open_image(&store, None, &a.image).await?;
            let removed = lode_agent::clear_working_set(&store, &img).await?;
            if env.cli_json {
                print_json(&serde_json::json!({"id": img.id, "removed": removed}))?;
            } else if removed {
                println!("{}: working set removed", img.id);
            } else {
                println!("{}: had no working set", img.id);
            }
        }
        Command::Verify(a) => {
            let store = env.store()?;
            let kms = if a.no_decrypt {
                None
            } else {
                Some(env.kms_existing()?)
            };
            let img = lode_image::open_image(&store, kms.as_deref(), &a.image).await?;
            alarm_on_read(&store, &img, "lode verify").await;
            let bar = env.progress("verifying");
            let report =
                lode_image::verify_with(&store, &img, bar.clone() as Arc<dyn Progress>, a.repair)
                    .await?;
            bar.finish();
            if env.cli_json {
                print_json(&serde_json::json!({"ok": report.ok(), "report": report}))?;
            } else {
                for p in &report.problems {
                    println!("FAULT  {p}");
                }
                for c in &report.removed {
                    println!("REMOVED chunk {c}: import or publish the image again to restore it");
                }
                println!(
                    "{} {}: {} distinct chunks ({}) checked{}, {} fault(s)",
                    if report.ok() { "ok   " } else { "BAD  " },
                    img.id,
                    report.chunks_checked,
                    human_bytes(report.bytes_checked),
                    if report.decrypted {
                        " against their names and keys"
                    } else {
                        " against their names"
                    },
                    report.problems.len()
                );
            }
            if !report.ok() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Rm(a) => rm(&env, &a).await?,
        Command::Root(RootCommand::Ls) => {
            let store = env.store()?;
            let st = lode_image::store_stats(&store).await?;
            let mut alarms = Vec::new();
            for r in &st.per_root {
                alarms.push(store.list_alarms(r.root).await?);
            }
            if env.cli_json {
                for e in &st.unreadable_roots {
                    eprintln!("warning: root not listed: {e}");
                }
                let v: Vec<_> = st
                    .per_root
                    .iter()
                    .zip(&alarms)
                    .map(|(r, a)| {
                        let mut v = serde_json::to_value(r).expect("plain data");
                        v["alarms"] = serde_json::to_value(&a.alarms).expect("plain data");
                        v["unreadable_alarms"] = serde_json::json!(a.bad.len());
                        v
                    })
                    .collect();
                print_json(&v)?;
            } else {
                for e in &st.unreadable_roots {
                    println!("UNREADABLE {e}");
                }
                for (r, a) in st.per_root.iter().zip(&alarms) {
                    println!(
                        "root {} {:<8} {} stored, {} of {} manifests live, {} live, {} dead, {}",
                        r.root,
                        r.state,
                        human_bytes(r.stored_bytes),
                        r.live_manifests,
                        r.manifests,
                        human_bytes(r.live_bytes),
                        human_bytes(r.dead_bytes),
                        match a.len() {
                            0 => "no alarms".to_owned(),
                            n => format!("{n} ALARM(S)"),
                        }
                    );
                    for alarm in &a.alarms {
                        println!("  alarm: {alarm}");
                    }
                    for (key, why) in &a.bad {
                        println!("  alarm: {key} (unreadable: {why})");
                    }
                }
            }
        }
        Command::Root(RootCommand::ClearAlarm { root }) => {
            let store = env.store()?;
            let root = lode_format::RootId(root);
            let cleared = lode_image::clear_alarms(&store, root).await?;
            if env.cli_json {
                print_json(&cleared)?;
            } else {
                println!(
                    "cleared {} alarm(s) of root {root}; its grace period starts again now",
                    cleared.cleared
                );
            }
        }
        Command::Gc(a) => {
            let store = env.store()?;
            let kms = env.kms_existing()?;
            let key_id = env.kms_key.clone().unwrap_or_else(|| kms.default_key_id());
            let opts = lode_image::GcOptions {
                grace: a.grace,
                dry_run: a.dry_run,
                key_id,
                only: a.root.map(lode_format::RootId),
            };
            let report = lode_image::gc(&store, kms.as_ref(), &opts).await?;
            if env.cli_json {
                print_json(&report)?;
            } else {
                print_gc(&report);
            }
            if !report.ok() {
                for e in report.roots.iter().filter_map(|r| r.error.as_ref()) {
                    eprintln!("lode: error: {e}");
                }
                return Ok(ExitCode::from(2));
            }
        }
        Command::Root(RootCommand::CopyForward { root }) => {
            let store = env.store()?;
            let kms = env.kms_existing()?;
            let key = env.kms_key.clone().unwrap_or_else(|| kms.default_key_id());
            let r = lode_image::copy_forward(&store, kms.as_ref(), &key, lode_format::RootId(root))
                .await?;
            if env.cli_json {
                print_json(&r)?;
            } else {
                for m in &r.moved {
                    let mut holders: Vec<String> = m.tags.clone();
                    if m.pinned {
                        holders.push("pin".to_owned());
                    }
                    println!(
                        "{} -> {}{}{}",
                        m.from,
                        m.to,
                        if holders.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", holders.join(", "))
                        },
                        if m.resumed { " [resumed]" } else { "" }
                    );
                }
                println!(
                    "root {} -> root {}: {} live manifest(s) moved, {} dead left, {} chunks \
                     ({}) sealed again",
                    r.from,
                    r.to,
                    r.moved.len(),
                    r.dead,
                    r.chunks,
                    human_bytes(r.bytes)
                );
            }
        }
        Command::Root(RootCommand::Rotate) => {
            let store = env.store()?;
            let kms = env.kms_existing()?;
            let key = env.kms_key.clone().unwrap_or_else(|| kms.default_key_id());
            let r = lode_image::rotate(&store, kms.as_ref(), &key).await?;
            if env.cli_json {
                print_json(&r)?;
            } else {
                match (r.retired, r.finished) {
                    (Some(old), _) => println!("retired root {old}; root {} is active", r.active),
                    (None, Some(old)) => println!(
                        "finished the rotation from root {old}; root {} is active",
                        r.active
                    ),
                    (None, None) => println!("root {} is active", r.active),
                }
            }
        }
        Command::Pin(a) => {
            let store = env.store()?;
            let id = lode_image::resolve(&store, &a.image).await?;
            let outcome = lode_image::pin(&store, &id).await?;
            if env.cli_json {
                print_json(&serde_json::json!({"pinned": id}))?;
            } else if outcome == lode_store::PutOutcome::AlreadyPresent {
                println!("{id} was pinned already");
            } else {
                println!("pinned {id}");
            }
        }
        Command::Unpin(a) => {
            let store = env.store()?;
            let id = lode_image::resolve(&store, &a.image).await?;
            store.remove_pin(&id).await?;
            if env.cli_json {
                print_json(&serde_json::json!({"unpinned": id}))?;
            } else {
                println!("unpinned {id}");
            }
        }
        Command::Store(StoreCommand::Stats) => {
            let store = env.store()?;
            let st = lode_image::store_stats(&store).await?;
            for bad in &st.bad_tags {
                eprintln!("warning: tag not counted: {bad}");
            }
            for bad in &st.unreadable_roots {
                eprintln!("warning: root not counted: {bad}");
            }
            if !st.unreadable_holders.is_empty() {
                eprintln!(
                    "warning: {} tag or pin object(s) cannot be read: dead bytes may include \
                     live ones",
                    st.unreadable_holders.len()
                );
            }
            if env.cli_json {
                print_json(&st)?;
            } else {
                println!("store          {}", st.store);
                println!("roots          {}", st.roots);
                println!(
                    "images         {} manifests, {} tags",
                    st.manifests, st.tags
                );
                println!("chunks         {}", st.chunks);
                println!(
                    "stored bytes   {} ({})",
                    st.stored_bytes,
                    human_bytes(st.stored_bytes)
                );
                println!(
                    "logical bytes  {} ({}) in non-zero chunks; images total {}",
                    st.logical_bytes,
                    human_bytes(st.logical_bytes),
                    human_bytes(st.device_bytes)
                );
                println!("dedup ratio    {:.2}x", st.dedup_ratio);
                println!(
                    "live / dead    {} ({}) / {} ({})",
                    st.live_bytes,
                    human_bytes(st.live_bytes),
                    st.dead_bytes,
                    human_bytes(st.dead_bytes)
                );
                for r in &st.per_root {
                    println!(
                        "root {:<9} {}: {} of {} manifests live; {} chunks, {} bytes live, \
                         {} bytes dead",
                        r.root,
                        r.state,
                        r.live_manifests,
                        r.manifests,
                        r.chunks,
                        r.live_bytes,
                        r.dead_bytes
                    );
                }
                if st.missing_chunks > 0 {
                    println!(
                        "MISSING        {} chunks named by manifests",
                        st.missing_chunks
                    );
                }
            }
        }
        Command::Store(StoreCommand::Fsck(a)) => {
            let store = env.store()?;
            let opts = lode_image::FsckOptions {
                dry_run: a.dry_run,
                staging_min_age: std::time::Duration::from_secs(a.older_than),
            };
            let report = lode_image::fsck(&store, opts).await?;
            if env.cli_json {
                print_json(&serde_json::json!({"ok": report.ok(), "report": report}))?;
            } else {
                for f in &report.faults {
                    println!("FAULT  {f}");
                }
                println!(
                    "{} {}: {} tags, {} roots, {} manifests, {} chunks; {} staging file(s) \
                     removed, {} younger than {} s left",
                    if report.ok() { "ok   " } else { "BAD  " },
                    report.store,
                    report.tags_checked,
                    report.roots_checked,
                    report.manifests_checked,
                    report.chunks_listed,
                    report.staging_removed,
                    report.staging_young,
                    a.older_than
                );
            }
            if !report.ok() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Store(StoreCommand::Tags) => {
            let store = env.store()?;
            let listing = store.list_tags().await?;
            for bad in &listing.bad {
                eprintln!("warning: skipping tag {:?}: {}", bad.tag, bad.error);
            }
            let tags = listing.tags;
            if env.cli_json {
                let v: Vec<_> = tags
                    .iter()
                    .map(|(t, id)| serde_json::json!({"tag": t, "id": id}))
                    .collect();
                print_json(&v)?;
            } else {
                for (t, id) in tags {
                    println!("{id}  {t}");
                }
            }
        }
        Command::Kms(KmsCommand::List) => {
            let k = keyring(&env)?;
            if env.cli_json {
                print_json(&serde_json::json!({
                    "keyring": k.path(), "default": lode_kms::Kms::default_key_id(&k),
                    "keys": k.key_names(),
                }))?;
            } else {
                let default = lode_kms::Kms::default_key_id(&k);
                for name in k.key_names() {
                    let mark = if name == default { " (default)" } else { "" };
                    println!("{name}{mark}");
                }
            }
        }
        Command::Kms(KmsCommand::Create { name, default }) => {
            let k = keyring(&env)?;
            k.create_key(&name, default)?;
            if !env.quiet {
                println!("created key {name:?} in {}", k.path().display());
            }
        }
        Command::Demo(a) => demo::run(&env_for_demo(&env), a).await?,
        Command::Agent(a) => agent::run(&env, &home, *a).await?,
        Command::Control(c) => control::run(&env, c).await?,
        Command::Start(a) => control::start(&env, a).await?,
        Command::Attach(a) => agent::attach(&env, &home, a)?,
        Command::Detach(a) => agent::detach(&env, &home, a)?,
        Command::Ls(a) => agent::ls(&env, &home, a)?,
        Command::SimBurst(a) => simburst::run(env.cli_json, &a)?,
        Command::Stats(a) => agent::stats(&env, &home, a)?,
        Command::Mount(a) => return mount::mount(&env, &home, a),
        Command::Umount(a) => mount::umount(&env, &home, a)?,
        Command::Run(a) => return mount::run(&env, &home, a),
        Command::CacheNode(a) => cache_node(&env, a).await?,
        Command::Snapshot(c) => return snapshot::run(&env, &home, c).await,
        Command::Vm(cli::VmCommand::Run(a)) => return vm::run(&env, &home, a),
        Command::Sim(a) => sim::run(env.cli_json, env.quiet, *a)?,
        Command::Advise(a) => sim::advise(env.cli_json, env.quiet, *a)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The chunk and dedup lines that import and flatten both print.
/// `lode cache-node`: serves until SIGINT or SIGTERM, then prints what it did.
/// `lode import` and `lode snapshot import`: publish a raw file.
pub(crate) async fn import(
    env: &Env,
    file: &std::path::Path,
    tag: Option<&str>,
    chunk_size: lode_format::ChunkSize,
    put_only: bool,
) -> Result<()> {
    let store = env.publish_store(put_only)?;
    let kms = env.kms()?;
    let key_id = env.kms_key.clone().unwrap_or_else(|| kms.default_key_id());
    let opts = PublishOptions {
        chunk_size,
        tag: tag.map(str::to_owned),
        ..Default::default()
    };
    let bar = env.progress("importing");
    let started = std::time::Instant::now();
    let p = Publisher::new(&store, kms.as_ref(), key_id)
        .publish_file(file, &opts, bar.clone() as Arc<dyn Progress>)
        .await
        .with_context(|| format!("importing {}", file.display()))?;
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    let s = &p.stats;
    if env.cli_json {
        print_json(&serde_json::json!({
            "id": p.id, "root": p.root, "tag": tag, "stats": s,
            "dedup_share": s.dedup_share(), "seconds": secs,
        }))?;
    } else {
        println!("manifest  {}", p.id);
        if let Some(t) = tag {
            println!("tag       {t}");
        }
        println!(
            "image     {} in {} chunks of {}",
            human_bytes(s.device_size),
            s.chunks,
            human_bytes(p.manifest.header().chunk_size.bytes_u64())
        );
        print_publish_stats(s);
        println!(
            "time      {secs:.2} s ({:.0} MiB/s)",
            s.device_size as f64 / secs.max(1e-9) / 1048576.0
        );
    }
    Ok(())
}

async fn cache_node(env: &Env, a: cli::CacheNodeArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let config = lode_cache_node::NodeConfig {
        listen: a.listen,
        memory_bytes: a.memory,
        flash_dir: a.flash_dir.clone(),
        flash_bytes: a.flash_size,
        item_size_limit: usize::try_from(a.item_size_limit).unwrap_or(usize::MAX),
        policy: if a.policy == "lru" {
            lode_cache_node::Policy::Lru
        } else {
            lode_cache_node::Policy::LruK(2)
        },
        ..Default::default()
    };
    let tiers = config.tiers()?;
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let node = lode_cache_node::Node::start(config).await?;
    if !env.quiet {
        println!(
            "lode cache-node: memcached protocol on {}; memory {}, flash {}{}",
            node.local_addr(),
            human_bytes(tiers.memory_bytes),
            human_bytes(tiers.flash_bytes),
            a.flash_dir
                .as_ref()
                .map(|d| format!(" in {}", d.display()))
                .unwrap_or_default()
        );
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let s = node.stats();
    node.shutdown().await?;
    if !env.quiet {
        println!(
            "lode cache-node: stopped; {} gets ({} hits), {} sets, {} items in memory, {} on flash",
            s.cmd_get, s.get_hits, s.cmd_set, s.memory.items, s.flash.items
        );
    }
    Ok(())
}

/// Raises the read alarm if the image's root has expired (docs/gc.md); the read goes on.
async fn alarm_on_read(store: &lode_store::Store, img: &lode_image::OpenedImage, role: &str) {
    match lode_image::check_read(store, img.root, &img.id, &lode_image::reader_name(role)).await {
        Ok(None) => {}
        Ok(Some(alarm)) => eprintln!("lode: {alarm}"),
        Err(e) => eprintln!(
            "lode: warning: could not check the state of root {}: {e}",
            img.root
        ),
    }
}

fn print_gc(report: &lode_image::GcReport) {
    let show =
        |s: Option<lode_store::RootState>| s.map_or("unreadable".to_owned(), |s| s.to_string());
    for r in &report.roots {
        let moved = if r.before == r.after {
            show(r.after)
        } else {
            format!("{} -> {}", show(r.before), show(r.after))
        };
        println!("root {}: {moved}", r.root);
        for d in &r.did {
            println!("  {}{d}", if report.dry_run { "(dry run) " } else { "" });
        }
        if let Some(w) = &r.waiting {
            println!("  waits: {w}");
        }
        for a in &r.alarms {
            println!("  alarm: {a}");
        }
        for a in &r.bad_alarms {
            println!("  alarm: {a} (unreadable)");
        }
        if let Some(e) = &r.error {
            println!("  ERROR: {e}");
        }
    }
    println!(
        "{} {} reclaimed",
        if report.dry_run { "dry run:" } else { "gc:" },
        human_bytes(report.reclaimed_bytes)
    );
}

/// `lode rm`: a tag, every tag of a manifest, or a dead manifest.
async fn rm(env: &Env, a: &cli::RmArgs) -> Result<()> {
    let store = env.store()?;
    if a.manifest {
        let id: lode_format::ManifestId = a.image.parse().map_err(|_| {
            anyhow::anyhow!(
                "--manifest takes a manifest id (64 hex digits), not {:?}; to remove a tag, \
                 leave out --manifest",
                a.image.chars().take(200).collect::<String>()
            )
        })?;
        let removed = lode_image::remove_manifest(&store, &id).await?;
        if env.cli_json {
            print_json(&removed)?;
        } else {
            let roots: Vec<String> = removed.roots.iter().map(|r| r.to_string()).collect();
            println!(
                "removed manifest {id} from root {}; its chunks go when the root is collected",
                roots.join(", ")
            );
        }
        return Ok(());
    }
    let removed = lode_image::untag(&store, &a.image).await?;
    if env.cli_json {
        print_json(&serde_json::json!({"untagged": removed}))?;
    } else if removed.is_empty() {
        println!("removed unreadable tag {:?}", a.image);
    } else {
        for u in &removed {
            println!("untagged {} (manifest {})", u.tag, u.id);
        }
    }
    Ok(())
}

fn print_publish_stats(s: &lode_image::PublishStats) {
    println!(
        "chunks    {} zero (not stored), {} repeated within the image, \
         {} already in the store, {} uploaded ({})",
        s.zero_chunks,
        s.repeated_chunks,
        s.present_chunks,
        s.uploaded_chunks,
        human_bytes(s.uploaded_bytes)
    );
    println!(
        "dedup     {:.1}% of the non-zero chunks needed no upload",
        s.dedup_share() * 100.0
    );
    if s.repaired_chunks > 0 {
        println!(
            "repaired  {} damaged chunk object(s) in the store replaced",
            s.repaired_chunks
        );
    }
}

fn keyring(env: &Env) -> Result<lode_kms::Keyring> {
    if env.kms_spec.contains("://") || env.kms_spec.starts_with("aws:") {
        bail!(
            "`lode kms` manages a local keyring file; {:?} is not one",
            env.kms_spec
        );
    }
    Ok(lode_kms::Keyring::open_or_create(
        env.kms_spec.clone().into(),
    )?)
}

fn env_for_demo(env: &Env) -> demo::DemoEnv {
    demo::DemoEnv {
        store_spec: env.store_spec.clone(),
        kms_spec: env.kms_spec.clone(),
        kms_key: env.kms_key.clone(),
        json: env.cli_json,
        quiet: env.quiet,
    }
}
