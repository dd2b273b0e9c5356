//! `lode demo`: lode's main job on its embedded defaults, end to end, with no outside
//! services. It builds a sample OCI image layout (two images over one shared base layer),
//! flattens and publishes both, exports one and compares it with the flattened image,
//! verifies it, starts a worker agent in-process and reads one image's start-up files
//! lazily over NBD (printing the share of the image fetched and each tier's latency),
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

    // Part three: a raw disk image and a new version of it, imported as they are.
    let chunks = args.size_mib * 2;
    let (base, v2) = (work.path().join("base.img"), work.path().join("v2.img"));
    say(
        env,
        format!(
            "6. importing raw disk images: {} MiB, and a v2 that rewrites a tenth and adds 4 MiB",
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

    say(env, "8. the store".into());
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
            "lazy_start": lazy, "snapshot": snapshot, "gc": collected,
        }))?;
    }
    Ok(())
}

/// Step 9: delete one image, rotate the root and collect the old one, printing the bytes
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
        "9. deleting demo/raw-base, rotating the root and collecting the old one".into(),
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

/// Part three: a memory snapshot restored lazily through userfaultfd, twice.
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
        "7. a memory snapshot: 64 MiB of process memory holding a key-value index is \
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
