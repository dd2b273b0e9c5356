//! `lode demo`: lode's main job on its embedded defaults, end to end, with no outside
//! services. It builds a sample OCI image layout (two images over one shared base layer),
//! flattens and publishes both, exports one and compares it with the flattened image,
//! verifies it, imports two raw disk images that share most of their bytes, and prints
//! what the store holds and what deduplicated.

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
    let kms = lode_kms::open(&env.kms_spec)?;
    let key_id = env.kms_key.clone().unwrap_or_else(|| kms.default_key_id());
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let publisher = Publisher::new(&store, kms.as_ref(), key_id);
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

    // Part two: a raw disk image and a new version of it, imported as they are.
    let chunks = args.size_mib * 2;
    let (base, v2) = (work.path().join("base.img"), work.path().join("v2.img"));
    say(
        env,
        format!(
            "5. importing raw disk images: {} MiB, and a v2 that rewrites a tenth and adds 4 MiB",
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

    say(env, "6. the store".into());
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
    say(
        env,
        "  next: `lode inspect demo/app2`, `lode store stats`, `lode flatten oci:DIR:TAG`".into(),
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
        }))?;
    }
    Ok(())
}
