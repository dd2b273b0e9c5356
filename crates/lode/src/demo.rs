//! `lode demo`: lode's main job on its embedded defaults, end to end, with no outside
//! services. It builds a sample OCI image layout (two images over one shared base layer),
//! flattens and publishes both, exports one and compares it with the flattened image,
//! verifies it, starts a worker agent in-process and reads one image's start-up files
//! lazily over NBD (printing the share of the image fetched and each tier's latency),
//! shows who may do what (a put-only flattener, a control service that alone holds the
//! KMS, two workers that get an image's key only for a start assigned to them),
//! imports two raw disk images that share most of their bytes, and prints what the
//! store holds and what deduplicated.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use lode_image::{Progress, PublishOptions, PublishStats, Publisher};
use lode_store::Store;

use crate::cli::DemoArgs;
use crate::output::{Bar, human_bytes, print_json};

pub struct DemoEnv {
    pub store_spec: String,
    pub kms_spec: String,
    pub kms_key: Option<String>,
    pub json: bool,
    pub quiet: bool,
}

const CHUNK: usize = 512 * 1024;

/// Writes a generated image: pseudo-random chunks (incompressible, like real binaries),
/// every 7th chunk all zero (unused blocks), every 11th a copy of chunk 1 (a file that
/// appears twice). `variant` rewrites every 10th chunk and appends `extra` chunks, as a
/// new version of an image would.
fn generate(path: &Path, chunks: u64, variant: bool, extra: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut buf = vec![0u8; CHUNK];
    for i in 0..chunks + extra {
        let seed = if i % 7 == 3 {
            None
        } else if i % 11 == 5 {
            Some(1)
        } else if variant && (i % 10 == 9 || i >= chunks) {
            Some(1_000_000 + i)
        } else {
            Some(i)
        };
        match seed {
            None => buf.fill(0),
            Some(s) => fill_random(&mut buf, s),
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn say(env: &DemoEnv, line: String) {
    if !env.json {
        println!("{line}");
    }
}

fn import_line(s: &PublishStats, secs: f64) -> String {
    format!(
        "{} chunks: {} zero (not stored), {} repeats within the image, {} already \
         stored, {} uploaded ({}); {:.1}% deduplicated; {:.2} s",
        s.chunks,
        s.zero_chunks,
        s.repeated_chunks,
        s.present_chunks,
        s.uploaded_chunks,
        human_bytes(s.uploaded_bytes),
        s.dedup_share() * 100.0,
        secs
    )
}

pub async fn run(env: &DemoEnv, args: DemoArgs) -> Result<()> {
    ensure!(
        (1..=65536).contains(&args.size_mib),
        "--size-mib must be between 1 and 65536"
    );
    let store = Store::open(&env.store_spec)?;
    let kms: Arc<dyn lode_kms::Kms> = Arc::from(lode_kms::open(&env.kms_spec)?);
    let key_id = env.kms_key.clone().unwrap_or_else(|| kms.default_key_id());
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let publisher = Publisher::new(&store, kms.as_ref(), key_id.clone());
    say(
        env,
        format!(
            "lode demo — store {}, keyring {}",
            store.label(),
            env.kms_spec
        ),
    );

    // Part one: container images, flattened.
    let layout = work.path().join("sample-oci");
    say(
        env,
        "1. building a sample OCI image layout: app1 and app2, two layers each over one \
         shared base layer (whiteouts, an opaque dir, hardlinks, a setuid file, xattrs)"
            .into(),
    );
    lode_oci::sample::write_sample_family(&layout).context("writing the sample image")?;
    say(
        env,
        "2. flattening both into deterministic ext4 images and publishing them".into(),
    );
    let mut flattened = Vec::new();
    for app in lode_oci::sample::SAMPLE_TAGS {
        let keep = work.path().join(format!("{app}.ext4"));
        let req = lode_image::FlattenRequest {
            source: format!("oci:{}:{app}", layout.display()),
            tag: Some(format!("demo/{app}")),
            chunk_size: Default::default(),
            work_dir: work.path().join("tmp"),
            keep_image: Some(keep.clone()),
            registry_cache: work.path().join("registry"),
            registry_auth: lode_image::RegistryAuth::Anonymous,
            pull: Default::default(),
        };
        let news = Arc::new(crate::output::News::new(env.quiet || env.json, true));
        let r = lode_image::flatten_and_publish(&publisher, &req, news.clone()).await?;
        news.finish();
        let base = &r.layers[0];
        say(
            env,
            format!(
                "  demo/{app}: {} ext4, base layer region at {:.1}..{:.1} MiB; {}",
                human_bytes(r.image_size),
                base.region_start as f64 / 1048576.0,
                base.region_end as f64 / 1048576.0,
                import_line(&r.published.stats, r.flatten_seconds + r.publish_seconds)
            ),
        );
        flattened.push((app, keep, r));
    }

    say(
        env,
        "3. exporting demo/app2 from the store and comparing it with the flattened image".into(),
    );
    let (_, kept, _) = &flattened[1];
    let back = work.path().join("app2-exported.ext4");
    let img = lode_image::open_image(&store, Some(kms.as_ref()), "demo/app2").await?;
    let bar = Arc::new(Bar::new("exporting", env.quiet || env.json));
    let ex = lode_image::export(&store, &img, &back, bar.clone() as Arc<dyn Progress>).await?;
    bar.finish();
    let (want, got) = (sha256_file(kept)?, sha256_file(&back)?);
    ensure!(
        want == got,
        "exported image differs from the flattened one: sha256 {got}, flattened {want}"
    );
    say(
        env,
        format!(
            "  {} chunks fetched, checked and decrypted; sha256 {} matches byte for byte",
            ex.fetched_chunks,
            &got[..16]
        ),
    );
    say(
        env,
        "4. verifying demo/app2 (every chunk present, named right, decrypts)".into(),
    );
    let bar = Arc::new(Bar::new("verifying", env.quiet || env.json));
    let report = lode_image::verify(&store, &img, bar.clone() as Arc<dyn Progress>).await?;
    bar.finish();
    ensure!(report.ok(), "verify found faults: {:?}", report.problems);
    say(
        env,
        format!("  {} distinct chunks, no faults", report.chunks_checked),
    );

    // Part two: a lazy start through a worker agent.
    let lazy = lazy_start(env, &store, kms.clone(), work.path()).await?;

    // Part three: who may do what — a flattener, a control service and two workers.
    let who_may = roles(env, kms.clone(), &key_id, &layout, work.path()).await?;

    // Part four: a raw disk image and a new version of it, imported as they are.
    let chunks = args.size_mib * 2;
    let (base, v2) = (work.path().join("base.img"), work.path().join("v2.img"));
    say(
        env,
        format!(
            "7. importing raw disk images: {} MiB, and a v2 that rewrites a tenth and adds 4 MiB",
            args.size_mib
        ),
    );
    generate(&base, chunks, false, 0)?;
    generate(&v2, chunks, true, 8)?;
    let mut imports = Vec::new();
    for (path, tag) in [(&base, "demo/raw-base"), (&v2, "demo/raw-v2")] {
        let bar = Arc::new(Bar::new("importing", env.quiet || env.json));
        let t = Instant::now();
        let opts = PublishOptions {
            tag: Some(tag.to_owned()),
            ..Default::default()
        };
        let p = publisher
            .publish_file(path, &opts, bar.clone() as Arc<dyn Progress>)
            .await?;
        bar.finish();
        let secs = t.elapsed().as_secs_f64();
        say(env, format!("  {tag}: {}", import_line(&p.stats, secs)));
        imports.push(serde_json::json!({
            "tag": tag, "id": p.id, "stats": p.stats, "seconds": secs,
            "dedup_share": p.stats.dedup_share(),
        }));
    }

    let snapshot = snapshot_restore(env, &store, &publisher, kms.clone(), work.path()).await?;

    say(env, "9. the store".into());
    let st = lode_image::store_stats(&store).await?;
    say(
        env,
        format!(
            "  {} chunks, {} stored for {} of non-zero image bytes ({} of images): \
             dedup ratio {:.2}x",
            st.chunks,
            human_bytes(st.stored_bytes),
            human_bytes(st.logical_bytes),
            human_bytes(st.device_bytes),
            st.dedup_ratio
        ),
    );
    let collected = collect(env, &store, kms.as_ref(), &key_id, kept, work.path()).await?;
    say(
        env,
        "  next: `lode inspect demo/app2`, `lode store stats`, `lode root ls`, \
         `lode flatten oci:DIR:TAG`"
            .into(),
    );
    if env.json {
        let flat: Vec<_> = flattened
            .iter()
            .map(|(app, _, r)| {
                serde_json::json!({
                    "tag": format!("demo/{app}"), "id": r.published.id,
                    "image_size": r.image_size, "layers": r.layers,
                    "stats": r.published.stats, "dedup_share": r.published.stats.dedup_share(),
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "flattened": flat, "imports": imports, "export": ex,
            "export_matches_source": true, "verify": report, "store": st,
            "lazy_start": lazy, "roles": who_may, "snapshot": snapshot, "gc": collected,
        }))?;
    }
    Ok(())
}

/// Step 10: delete one image, rotate the root and collect the old one, printing the bytes
/// reclaimed; then read an image back from the new root. Rotation and collection act on
/// the whole store, so a store holding images other than the demo's is left alone.
async fn collect(
    env: &DemoEnv,
    store: &Store,
    kms: &dyn lode_kms::Kms,
    key_id: &str,
    app2_flat: &Path,
    work: &Path,
) -> Result<serde_json::Value> {
    say(
        env,
        "10. deleting demo/raw-base, rotating the root and collecting the old one".into(),
    );
    let tags = store.list_tags().await?;
    if let Some((other, _)) = tags.tags.iter().find(|(t, _)| !t.starts_with("demo/")) {
        say(
            env,
            format!(
                "  skipped: the store holds images other than the demo's ({other:?}), and a \
                 rotation acts on the whole store; run the demo with its own LODE_HOME to see it"
            ),
        );
        return Ok(serde_json::json!({"skipped": true}));
    }
    lode_image::untag(store, "demo/raw-base").await?;
    let before = lode_image::store_stats(store).await?;
    let rotation = lode_image::rotate(store, kms, key_id).await?;
    let retired = rotation
        .retired
        .context("the rotation retired no root (an earlier one had stopped part-way)")?;
    let dead = before
        .per_root
        .iter()
        .find(|r| r.root == retired)
        .map_or(0, |r| r.dead_bytes);
    say(
        env,
        format!(
            "  removed tag demo/raw-base; retired root {retired} ({} dead of {} stored); root {} \
             is active with a fresh salt",
            human_bytes(dead),
            human_bytes(before.stored_bytes),
            rotation.active
        ),
    );
    let opts = lode_image::GcOptions {
        grace: std::time::Duration::ZERO,
        dry_run: false,
        key_id: key_id.to_owned(),
        only: Some(retired),
    };
    let report = lode_image::gc(store, kms, &opts).await?;
    if let Some(e) = report.roots.iter().find_map(|r| r.error.as_ref()) {
        anyhow::bail!("collecting root {retired}: {e}");
    }
    let after = lode_image::store_stats(store).await?;
    let copied: u64 = report.roots.iter().map(|r| r.copied).sum();
    say(
        env,
        format!(
            "  gc (no grace period, for the demo): {copied} live manifest(s) copied forward into \
             root {}, root {retired} deleted ({} of objects); the store went from {} to {}: {} \
             freed, against {} dead before",
            rotation.active,
            human_bytes(report.reclaimed_bytes),
            human_bytes(before.stored_bytes),
            human_bytes(after.stored_bytes),
            human_bytes(before.stored_bytes.saturating_sub(after.stored_bytes)),
            human_bytes(dead)
        ),
    );
    let img = lode_image::open_image(store, Some(kms), "demo/app2").await?;
    let back = work.join("app2-after-gc.ext4");
    lode_image::export(store, &img, &back, Arc::new(lode_image::NoProgress)).await?;
    ensure!(
        sha256_file(&back)? == sha256_file(app2_flat)?,
        "demo/app2 read back from root {} differs from the flattened image",
        img.root
    );
    say(
        env,
        format!(
            "  demo/app2 now reads from root {} (new keys, new chunk names): same bytes",
            img.root
        ),
    );
    Ok(serde_json::json!({
        "retired": retired, "active": rotation.active, "dead_bytes_before": dead,
        "stored_bytes_before": before.stored_bytes, "stored_bytes_after": after.stored_bytes,
        "reclaimed_bytes": report.reclaimed_bytes, "copied_manifests": copied,
    }))
}

/// An NBD connection as ext4-view's reader.
struct NbdReader(lode_nbd::Client);

impl ext4_view::Ext4Read for NbdReader {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.0.read_at(start, dst)?)
    }
}

/// Reads the files under `dir` (recursively) and `extra`, returning (files, bytes).
fn read_tree(fs: &ext4_view::Ext4, dir: &str, extra: &[String]) -> Result<(u64, u64)> {
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut todo = vec![dir.to_string()];
    while let Some(d) = todo.pop() {
        for e in fs.read_dir(d.as_str())? {
            let e = e?;
            let name = e.file_name();
            let name = name.as_str().unwrap_or_default();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{}/{name}", d.trim_end_matches('/'));
            let t = e.file_type()?;
            if t.is_dir() {
                todo.push(path);
            } else if t.is_regular_file() {
                bytes += fs.read(path.as_str())?.len() as u64;
                files += 1;
            }
        }
    }
    for p in extra {
        if fs.exists(p.as_str()).unwrap_or(false) {
            bytes += fs.read(p.as_str())?.len() as u64;
            files += 1;
        }
    }
    Ok((files, bytes))
}

/// One worker's lazy start of demo/app1: an agent in this process with empty local
/// caches (sharing `fleet`, the AZ cache nodes), its start-up files read over NBD.
/// Returns what it read and the agent's metrics.
async fn one_start(
    store: &Store,
    kms: Arc<dyn lode_kms::Kms>,
    state: &Path,
    fleet: &[String],
) -> Result<serde_json::Value> {
    let mut config = lode_agent::AgentConfig::new(state);
    config.files = None;
    config.az = Some(lode_az::AzConfig::new(fleet.iter().cloned()));
    let agent = lode_agent::Agent::start(config, store.clone(), kms).await?;
    let att = agent.attach("demo/app1", Some("app1"), false).await?;
    let sock = agent.config().nbd_unix.clone();
    let started = Instant::now();
    let mut extra = att.config.entrypoint.clone();
    for c in &att.config.cmd {
        if c.starts_with('/') {
            extra.push(c.clone());
        } else {
            extra.push(format!("{}/{c}", att.config.working_dir));
        }
    }
    extra.push("/etc/passwd".into());
    let (files, bytes) = tokio::task::spawn_blocking(move || -> Result<(u64, u64)> {
        let client = lode_nbd::Client::connect_unix(&sock, "app1")?;
        let fs = ext4_view::Ext4::load(Box::new(NbdReader(client)))
            .context("reading the ext4 image over NBD")?;
        read_tree(&fs, "/app", &extra)
    })
    .await
    .context("the NBD reader")??;
    let secs = started.elapsed().as_secs_f64();
    // The chunks fetched from the origin go to the AZ cache in the background; let them
    // land before the next worker starts.
    agent.cache().settle().await;
    let v = agent.stats_json();
    let tier_bytes = |name: &str| {
        v["tiers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["name"] == name)
            .map(|t| t["bytes"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    let (origin, az) = (tier_bytes("origin"), tier_bytes("az"));
    agent.detach("app1", false).await?;
    agent.shutdown().await;
    Ok(serde_json::json!({
        "files": files, "bytes_read": bytes, "seconds": secs, "image_size": att.size,
        "fetched_bytes": origin, "fetched_share": origin as f64 / att.size as f64,
        "az_bytes": az, "metrics": v,
    }))
}

/// Starts a local AZ cache fleet (six lode cache nodes on 127.0.0.1), then two workers
/// one after the other, each with empty local caches: the first fetches from the store
/// (and fills the fleet), the second, like a worker in the same AZ, from the fleet.
async fn lazy_start(
    env: &DemoEnv,
    store: &Store,
    kms: Arc<dyn lode_kms::Kms>,
    work: &Path,
) -> Result<serde_json::Value> {
    say(
        env,
        "5. a lazy start: six AZ cache nodes (lode cache-node, memcached protocol) on \
         127.0.0.1, and a worker agent in this process with every local cache empty \
         attaches demo/app1 and serves it over NBD; its start-up files (entrypoint, cmd, \
         /app) are read over NBD through an ext4 reader (`lode run` mounts and runs \
         instead, as root). Then a second worker in the same AZ does the same."
            .into(),
    );
    let mut nodes = Vec::new();
    for _ in 0..6 {
        let node = lode_cache_node::Node::start(lode_cache_node::NodeConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            memory_bytes: Some(64 << 20),
            ..Default::default()
        })
        .await?;
        nodes.push(node);
    }
    let fleet: Vec<String> = nodes.iter().map(|n| n.local_addr().to_string()).collect();
    let mut runs = Vec::new();
    for (i, who) in [
        "worker 1, caches empty",
        "worker 2, same AZ, local caches empty",
    ]
    .into_iter()
    .enumerate()
    {
        let state = work.join(format!("agent-{i}"));
        let r = one_start(store, kms.clone(), &state, &fleet).await?;
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        say(
            env,
            format!(
                "  {who}: read {} files ({}) in {:.0} ms; fetched {} of the {} image ({:.1}%) \
                 from the store, {} from the AZ cache",
                n("files"),
                human_bytes(n("bytes_read")),
                r["seconds"].as_f64().unwrap_or(0.0) * 1000.0,
                human_bytes(n("fetched_bytes")),
                human_bytes(n("image_size")),
                r["fetched_share"].as_f64().unwrap_or(0.0) * 100.0,
                human_bytes(n("az_bytes")),
            ),
        );
        if !env.quiet && !env.json {
            crate::agent::print_tiers(&r["metrics"], "    ");
        }
        runs.push(r);
    }
    for node in nodes {
        node.shutdown().await?;
    }
    Ok(serde_json::json!({ "fleet": fleet, "workers": runs }))
}

/// Part five: a memory snapshot restored lazily through userfaultfd, twice.
async fn snapshot_restore(
    env: &DemoEnv,
    store: &Store,
    publisher: &Publisher<'_>,
    kms: Arc<dyn lode_kms::Kms>,
    work: &Path,
) -> Result<serde_json::Value> {
    const SIZE: u64 = 64 << 20;
    say(
        env,
        "8. a memory snapshot: 64 MiB of process memory holding a key-value index is \
         imported (64 KiB chunks), and a page-fault handler in this process (`lode snapshot \
         serve`, Firecracker's UFFD protocol) restores it into userfaultfd-registered memory \
         that a client (playing Firecracker) queries 1,000 times, checking every answer; \
         then again, with the pages the first restore touched installed ahead of demand"
            .into(),
    );
    let mem = lode_snap::workload::build(SIZE, 100_000).map_err(|e| anyhow::anyhow!(e))?;
    let path = work.join("index.mem");
    std::fs::write(&path, &mem).context("writing the snapshot")?;
    drop(mem);
    let opts = PublishOptions {
        chunk_size: lode_format::ChunkSize::new(u64::from(lode_snap::DEFAULT_CHUNK_SIZE))?,
        tag: Some("demo/snapshot".into()),
        ..Default::default()
    };
    let p = publisher
        .publish_file(&path, &opts, Arc::new(lode_image::NoProgress))
        .await?;
    let config = lode_agent::AgentConfig::new(work.join("snap"));
    let (cache, _) = lode_agent::build_cache(&config, store.clone())?;
    let snap = lode_snap::Snapshot::open(store, kms.as_ref(), cache, "demo/snapshot").await?;
    let socket = work.join("uffd.sock");
    let listener = lode_snap::handler::bind(&socket)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = lode_snap::ServeOptions {
        generation_id_offset: Some(lode_snap::workload::GENERATION_OFFSET),
        ..Default::default()
    };
    let server = tokio::spawn(lode_snap::serve(
        listener,
        Arc::new(snap),
        opts,
        Arc::new(move |r| {
            let _ = tx.send(r);
        }),
    ));
    let mut runs = Vec::new();
    for who in ["first restore", "second restore, working set prefetched"] {
        let sock = socket.clone();
        let q = tokio::task::spawn_blocking(move || -> Result<_> {
            let started = Instant::now();
            let r = lode_snap::client::restore(&sock, SIZE, 1)?;
            let q = lode_snap::workload::query(r.memory.bytes(), 1, 1000)
                .map_err(|e| anyhow::anyhow!("the restored index answered wrongly: {e}"))?;
            Ok((q, r.generation_id.clone(), started.elapsed()))
        })
        .await??;
        let (q, announced, elapsed) = q;
        let report = rx.recv().await.context("the handler reported nothing")?;
        if let Some(e) = &report.error {
            anyhow::bail!("the restore failed: {e}");
        }
        ensure!(
            announced.as_deref() == Some(q.generation_id.as_str()),
            "the generation id in memory is not the one announced"
        );
        say(
            env,
            format!(
                "  {who}: 1,000 answers checked in {:.0} ms (first after {:.1} ms); {} faults, \
                 {} chunks fetched on demand, {} prefetched; fault p50 {} µs; generation id \
                 {} (read from the restored memory)",
                elapsed.as_secs_f64() * 1e3,
                q.first_answer.as_secs_f64() * 1e3,
                report.faults,
                report.demand_chunks,
                report.prefetched_chunks,
                report.fault_percentile(50).unwrap_or(0),
                q.generation_id
            ),
        );
        runs.push(serde_json::json!({
            "who": who, "ms": elapsed.as_secs_f64() * 1e3, "faults": report.faults,
            "demand_chunks": report.demand_chunks, "prefetched_chunks": report.prefetched_chunks,
            "generation_id": q.generation_id, "working_set_recorded": report.recorded,
        }));
    }
    server.abort();
    say(
        env,
        "  next: `lode snapshot --help`, docs/snapshots.md (Firecracker's UFFD backend)".into(),
    );
    Ok(serde_json::json!({ "id": p.id, "stored": p.stats, "restores": runs }))
}

/// One worker of the multi-role step: an agent in this process that holds no KMS, its
/// link to the control service, and the task taking its attach orders.
struct RoleWorker {
    id: String,
    agent: Arc<lode_agent::Agent>,
    grants: Arc<lode_agent::worker::Grants>,
    client: lode_control::rpc::Client,
    orders: tokio::task::JoinHandle<()>,
}

/// Starts worker `id`: its order listener on 127.0.0.1 (mTLS under its certificate), its
/// agent keyed only by grants, and its registration with the control service.
async fn role_worker(
    id: &str,
    pki_dir: &Path,
    endpoint: &lode_control::rpc::Endpoint,
    store: &Store,
    state: &Path,
) -> Result<RoleWorker> {
    use lode_agent::worker::{Grants, Orders, RpcControl, WorkerConfig};
    use lode_control::api::{Identity, Role};
    let who = Identity {
        role: Role::Worker,
        id: id.to_owned(),
    };
    let creds = Arc::new(lode_control::pki::Credentials::load(pki_dir, &who)?);
    let listener = lode_control::rpc::Listener::tls("127.0.0.1:0", creds.clone()).await?;
    let bound = listener
        .local_addr()
        .context("the order listener has no address")?;
    let client = lode_control::rpc::Client::new(endpoint.clone(), creds)?;
    let grants = Arc::new(Grants::new(
        Arc::new(RpcControl(client.clone())),
        WorkerConfig {
            worker: id.to_owned(),
            address: bound.to_string(),
            capacity: 4,
        },
    )?);
    let mut config = lode_agent::AgentConfig::new(state);
    config.files = None;
    let agent = lode_agent::Agent::start_with(
        config,
        store.clone(),
        lode_agent::Keys::Grants(grants.clone()),
    )
    .await?;
    let orders = lode_control::rpc::serve(listener, Arc::new(Orders(agent.clone())));
    grants
        .register()
        .await
        .map_err(|e| anyhow::anyhow!("worker {id} registering with the control service: {e}"))?;
    Ok(RoleWorker {
        id: id.to_owned(),
        agent,
        grants,
        client,
        orders,
    })
}

/// Step 6: who may do what, every role in this process on 127.0.0.1 over a fresh store. A
/// flattener publishes with a put-only handle; a control service, the only holder of the
/// KMS, serves over mTLS with certificates from a fresh CA; two workers hold no KMS. An
/// admin starts demo/app1 twice (the second start goes to the worker that has it warm)
/// and a file is read through that worker; then the other worker asks for the image's
/// key and is refused.
async fn roles(
    env: &DemoEnv,
    kms: Arc<dyn lode_kms::Kms>,
    key_id: &str,
    layout: &Path,
    work: &Path,
) -> Result<serde_json::Value> {
    use lode_control::api::{Identity, Role};
    use lode_control::{pki, rpc, service, state};
    say(
        env,
        "6. who may do what, all in this process on 127.0.0.1 over a fresh store: a \
         flattener with put-only credentials publishes; a control service (mTLS, \
         certificates from a fresh CA) is the only holder of the KMS; two workers hold no \
         KMS and get an image's key only for a start assigned to them"
            .into(),
    );
    let dir = work.join("roles");
    let spec = dir.join("store");
    let store = Store::open(spec.to_str().context("the scratch path is not UTF-8")?)?;

    // The flattener: chunks and manifests by conditional create, never read back.
    let flattener = store.clone().put_only();
    let publisher = Publisher::new(&flattener, kms.as_ref(), key_id.to_owned());
    let (mut flattened, mut ids) = (Vec::new(), Vec::new());
    for app in lode_oci::sample::SAMPLE_TAGS {
        let req = lode_image::FlattenRequest {
            source: format!("oci:{}:{app}", layout.display()),
            tag: Some(format!("demo/{app}")),
            chunk_size: Default::default(),
            work_dir: dir.join("tmp"),
            keep_image: None,
            registry_cache: dir.join("registry"),
            registry_auth: lode_image::RegistryAuth::Anonymous,
            pull: Default::default(),
        };
        let news = Arc::new(crate::output::News::new(true, true));
        let r = lode_image::flatten_and_publish(&publisher, &req, news).await?;
        say(
            env,
            format!(
                "  flattener (put-only): demo/{app}: {}",
                import_line(&r.published.stats, r.flatten_seconds + r.publish_seconds)
            ),
        );
        flattened.push(serde_json::json!({
            "tag": format!("demo/{app}"), "id": r.published.id, "stats": r.published.stats,
        }));
        ids.push(r.published.id);
    }
    let app1 = ids.first().context("the flattener published nothing")?;
    let read_back = match flattener.find_manifest(app1).await {
        Ok(_) => anyhow::bail!("the flattener's put-only handle read a manifest back"),
        Err(e) => e.to_string(),
    };
    say(
        env,
        format!("  the flattener reads nothing back: {read_back}"),
    );

    // The CA, the control service's certificate, each worker's and an admin's.
    let pki_dir = dir.join("pki");
    let hosts = vec!["127.0.0.1".to_owned()];
    pki::init(&pki_dir, &hosts, 1)?;
    let worker_ids = ["worker-a", "worker-b"];
    for id in worker_ids {
        let who = Identity {
            role: Role::Worker,
            id: id.to_owned(),
        };
        pki::issue(&pki_dir, &who, &hosts, 1)?;
    }
    let admin = Identity {
        role: Role::Admin,
        id: "demo".to_owned(),
    };
    pki::issue(&pki_dir, &admin, &[], 1)?;

    let control_creds = Arc::new(pki::Credentials::load(&pki_dir, &pki::control_identity())?);
    let config = service::Config {
        // The demo's workers heartbeat when the demo says so, not on a timer: the warm
        // placement below rests on the heartbeat it sends, never on a race with a timer.
        heartbeat_interval: std::time::Duration::from_secs(60),
        ..service::Config::default()
    };
    let service = Arc::new(service::Service::new(
        state::State::new(store.clone()),
        kms,
        control_creds.clone(),
        config,
    ));
    let listener = rpc::Listener::tls("127.0.0.1:0", control_creds).await?;
    let at = listener
        .local_addr()
        .context("the control service has no address")?;
    let endpoint: rpc::Endpoint = format!("https://{at}").parse()?;
    let control = rpc::serve(listener, service);
    say(
        env,
        format!(
            "  a CA and certificates for control, {} and admin/demo in {}; the control \
             service listens on https://{at}",
            worker_ids.join(", "),
            pki_dir.display()
        ),
    );

    let mut workers = Vec::new();
    for id in worker_ids {
        let w = role_worker(id, &pki_dir, &endpoint, &store, &dir.join(id)).await?;
        workers.push(w);
    }
    say(
        env,
        format!(
            "  {} registered, each taking attach orders over mTLS and holding no KMS",
            worker_ids.join(" and ")
        ),
    );

    let mut outcome = starts(env, &endpoint, &pki_dir, &admin, &workers).await;
    for w in &workers {
        for att in w.agent.list().await {
            // A detach tells the control service the start is over. A failure here
            // matters only if the starts went well: otherwise theirs is the error to show.
            let detached = w.agent.detach(&att.name, false).await;
            if let (Ok(_), Err(e)) = (&outcome, detached) {
                outcome =
                    Err(anyhow::Error::new(e).context(format!("{} detaching {}", w.id, att.name)));
            }
        }
        w.agent.shutdown().await;
        w.orders.abort();
    }
    control.abort();
    let mut v = outcome?;
    v["flattened"] = serde_json::json!(flattened);
    v["flattener_read_back"] = serde_json::json!(read_back);
    Ok(v)
}

/// The admin's two starts of demo/app1, a read through the worker that has it, and the
/// other worker refused its key.
async fn starts(
    env: &DemoEnv,
    endpoint: &lode_control::rpc::Endpoint,
    pki_dir: &Path,
    admin: &lode_control::api::Identity,
    workers: &[RoleWorker],
) -> Result<serde_json::Value> {
    use lode_control::api::{KeyGrant, KeyRequest, Placed, StartReply, StartRequest};
    let creds = Arc::new(lode_control::pki::Credentials::load(pki_dir, admin)?);
    let admin = lode_control::rpc::Client::new(endpoint.clone(), creds)?;
    let request = StartRequest {
        image: "demo/app1".into(),
    };
    let placed = |p: Placed| match p {
        Placed::Warm => "warm",
        Placed::Hashed => "hashed",
    };

    let t = Instant::now();
    let first: StartReply = admin.call("/v1/start", &request).await?;
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    say(
        env,
        format!(
            "  admin starts demo/app1: placed: {} on {} (start {}); it attached the image \
             with the key the control service granted it; {first_ms:.0} ms",
            placed(first.placed),
            first.worker,
            first.start
        ),
    );
    for w in workers {
        let (attached, warm) = w.agent.heartbeat_lists().await;
        w.grants
            .heartbeat(attached, warm)
            .await
            .map_err(|e| anyhow::anyhow!("worker {} heartbeating: {e}", w.id))?;
    }
    say(
        env,
        format!(
            "  the workers heartbeat: {} has manifest {} warm",
            first.worker,
            &first.manifest[..16]
        ),
    );

    let t = Instant::now();
    let second: StartReply = admin.call("/v1/start", &request).await?;
    let second_ms = t.elapsed().as_secs_f64() * 1e3;
    say(
        env,
        format!(
            "  admin starts demo/app1 again: placed: {} on {} (start {}); {second_ms:.0} ms",
            placed(second.placed),
            second.worker,
            second.start
        ),
    );
    ensure!(
        second.placed == Placed::Warm && second.worker == first.worker,
        "the second start of demo/app1 went to {} ({}), not to {}, which had it warm",
        second.worker,
        placed(second.placed),
        first.worker
    );

    let owner = workers
        .iter()
        .find(|w| w.id == second.worker)
        .context("the start went to no worker of the demo")?;
    let sock = owner.agent.config().nbd_unix.clone();
    let export = second
        .nbd_export
        .clone()
        .context("the worker serves no NBD export for the start")?;
    let name = export.clone();
    let conf = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let client = lode_nbd::Client::connect_unix(&sock, &export)?;
        let fs = ext4_view::Ext4::load(Box::new(NbdReader(client)))
            .context("reading the ext4 image over NBD")?;
        Ok(fs.read("/etc/app.conf")?)
    })
    .await
    .context("the NBD reader")??;
    ensure!(
        conf.starts_with(b"[server]"),
        "/etc/app.conf read through {} is not the sample's",
        owner.id
    );
    let text = String::from_utf8_lossy(&conf);
    let first_line = text.lines().take(2).collect::<Vec<_>>().join(" ");
    say(
        env,
        format!(
            "  read /etc/app.conf ({} bytes) through {}'s NBD export {name}: {first_line:?} …",
            conf.len(),
            owner.id
        ),
    );

    let other = workers
        .iter()
        .find(|w| w.id != second.worker)
        .context("the demo has no second worker")?;
    let ask = KeyRequest {
        worker: other.id.clone(),
        manifest: second.manifest.clone(),
        start: second.start.clone(),
    };
    let refusal = match other.client.call::<_, KeyGrant>("/v1/keys", &ask).await {
        Ok(_) => anyhow::bail!(
            "{} was granted the key of an image assigned to {}",
            other.id,
            second.worker
        ),
        Err(lode_control::rpc::RpcError::Refused { status, error, .. }) => {
            format!("refused ({status}): {error}")
        }
        Err(e) => return Err(e.into()),
    };
    say(
        env,
        format!(
            "  {} asks for demo/app1's key with that start's id: {refusal}",
            other.id
        ),
    );
    Ok(serde_json::json!({
        "starts": [
            {"worker": first.worker, "placed": first.placed, "start": first.start, "ms": first_ms},
            {"worker": second.worker, "placed": second.placed, "start": second.start, "ms": second_ms},
        ],
        "read": {"worker": owner.id, "path": "/etc/app.conf", "bytes": conf.len()},
        "refusal": {"worker": other.id, "message": refusal},
    }))
}
