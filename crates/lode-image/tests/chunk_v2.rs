//! Images whose chunks are format v2 (segments) through the library: published, read back
//! byte for byte, verified, and copied forward into the chunk format new chunks are
//! written in; a damaged segment is named by `verify` and refused by `export`, never
//! read as a wrong byte.

use std::path::Path;
use std::sync::Arc;

use lode_format::{ChunkFormat, ChunkSize, SegmentSize};
use lode_image::{NoProgress, PublishOptions, Publisher};
use lode_kms::Keyring;
use lode_store::Store;

const KEY: &str = "default";

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Bytes that differ from chunk to chunk and segment to segment, with a zero chunk.
fn image(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    v[65536..131072].fill(0);
    v
}

async fn export(store: &Store, kms: &Keyring, tag: &str, out: &Path) -> Res<Vec<u8>> {
    let img = lode_image::open_image(store, Some(kms), tag).await?;
    lode_image::export(store, &img, out, Arc::new(NoProgress)).await?;
    Ok(std::fs::read(out)?)
}

#[tokio::test]
async fn a_v2_image_reads_verifies_and_moves_forward() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("store");
    let store = Store::open(dir.to_str().ok_or("path")?)?;
    let kms = Keyring::open_or_create(tmp.path().join("keyring"))?;
    // 4.3 chunks of 64 KiB, in 4 KiB segments: a short last chunk and a short last segment.
    let bytes = image(4 * 65536 + 20_000);
    let file = tmp.path().join("image");
    std::fs::write(&file, &bytes)?;
    let format = ChunkFormat::V2 {
        segment_size: SegmentSize::new(4096)?,
        codec: lode_format::Codec::None,
    };
    let opts = PublishOptions {
        chunk_size: ChunkSize::new(65536)?,
        tag: Some("app:1".into()),
        chunk_format: Some(format),
        ..PublishOptions::default()
    };
    Publisher::new(&store, &kms, KEY.into())
        .publish_file(&file, &opts, Arc::new(NoProgress))
        .await?;

    let img = lode_image::open_image(&store, Some(&kms), "app:1").await?;
    assert_eq!(img.manifest.header().chunk_format, format);
    assert_eq!(
        export(&store, &kms, "app:1", &tmp.path().join("out")).await?,
        bytes
    );
    let report = lode_image::verify(&store, &img, Arc::new(NoProgress)).await?;
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.chunks_checked, 4);

    // A segment changed on disk: verify names the chunk and the segment, export refuses.
    let name = *img.manifest.chunks()[0].name().ok_or("chunk 0 is stored")?;
    let hex = name.to_hex();
    let object = dir.join(format!("roots/1/chunks/{}/{hex}", &hex[..2]));
    let good = std::fs::read(&object)?;
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&object, &bad)?;
    let report = lode_image::verify(&store, &img, Arc::new(NoProgress)).await?;
    let problems = format!("{:?}", report.problems);
    assert_eq!(report.problems.len(), 1, "{problems}");
    assert!(
        problems.contains(&hex) && problems.contains("segment 15"),
        "{problems}"
    );
    let err = export(&store, &kms, "app:1", &tmp.path().join("out2"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&hex) && err.contains("segment 15"), "{err}");
    std::fs::write(&object, &good)?;

    // Copy-forward reads the v2 chunks and writes the format new chunks are written in.
    lode_image::rotate(&store, &kms, KEY).await?;
    let report = lode_image::copy_forward(&store, &kms, KEY, lode_format::RootId(1)).await?;
    assert_eq!(report.moved.len(), 1, "{report:?}");
    let moved = lode_image::open_image(&store, Some(&kms), "app:1").await?;
    assert_eq!(moved.root, lode_format::RootId(2));
    assert_eq!(
        moved.manifest.header().chunk_format,
        lode_image::new_chunk_format(ChunkSize::new(65536)?)
    );
    assert_eq!(
        export(&store, &kms, "app:1", &tmp.path().join("out3")).await?,
        bytes
    );
    Ok(())
}

#[tokio::test]
async fn a_segment_larger_than_the_chunk_is_refused() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let store = Store::open(tmp.path().join("store").to_str().ok_or("path")?)?;
    let kms = Keyring::open_or_create(tmp.path().join("keyring"))?;
    let file = tmp.path().join("image");
    std::fs::write(&file, image(200_000))?;
    let opts = PublishOptions {
        chunk_size: ChunkSize::new(65536)?,
        chunk_format: Some(ChunkFormat::V2 {
            segment_size: SegmentSize::new(131072)?,
            codec: lode_format::Codec::None,
        }),
        ..PublishOptions::default()
    };
    let err = Publisher::new(&store, &kms, KEY.into())
        .publish_file(&file, &opts, Arc::new(NoProgress))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("segment size 131072") && err.contains("65536"),
        "{err}"
    );
    Ok(())
}
