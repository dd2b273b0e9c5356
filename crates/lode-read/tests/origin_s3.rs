//! The origin over a real S3-protocol server (s3s-fs in this process, lode-testkit's
//! `S3Fs`), reached through a proxy that counts the TCP connections the client opens:
//! fetches reuse the HTTP client's connections, one after another and at once. lode finds
//! the server through the AWS environment variables, which are process-global, so this
//! binary holds a single test that sets them before it starts any other thread.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{CHUNK, image_bytes};
use lode_blockdev::BlockDevice;
use lode_image::{NoProgress, PublishOptions, Publisher};
use lode_kms::{Keyring, Kms};
use lode_read::{CacheBuilder, ImageDevice, MemoryTier, StoreOrigin};
use lode_store::Store;
use lode_testkit::{S3Fs, set_aws_env};

const BUCKET: &str = "lode-read-test";
/// The stored chunks of `image_bytes` with distinct contents (5 is 0 again; 3, 7 zero).
const DISTINCT: [u64; 6] = [0, 1, 2, 4, 6, 8];

#[test]
fn origin_fetches_reuse_connections() {
    let mut s3 = S3Fs::bind(BUCKET);
    let server = s3.endpoint().trim_start_matches("http://").to_owned();
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    proxy.set_nonblocking(true).unwrap();
    let mut env = s3.env();
    env[0].1 = format!("http://{}", proxy.local_addr().unwrap());
    // SAFETY: this is the only test in this binary, and neither the server's runtime nor
    // ours has started yet, so no other thread of ours exists to read the environment
    // while it changes.
    unsafe { set_aws_env(env) };
    s3.serve();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let proxy = tokio::net::TcpListener::from_std(proxy).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = proxy.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let server = server.clone();
                tokio::spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut s).await;
                });
            }
        });

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("s3://{BUCKET}/p")).unwrap();
        let kms = Keyring::open_or_create(dir.path().join("keyring")).unwrap();
        let path = dir.path().join("image.raw");
        let image = image_bytes();
        std::fs::write(&path, &image).unwrap();
        let published = Publisher::new(&store, &kms, kms.default_key_id())
            .publish_file(&path, &PublishOptions::default(), Arc::new(NoProgress))
            .await
            .unwrap();
        let id = published.id.to_hex();
        // A store of its own, so the publisher's pooled connections are not counted as
        // reused ones.
        let store = Store::open(&format!("s3://{BUCKET}/p")).unwrap();
        let device = || async {
            let origin = Arc::new(StoreOrigin::new(store.clone()));
            let cache = CacheBuilder::new()
                .tier(Arc::new(MemoryTier::new(64 << 20)))
                .origin(origin)
                .build()
                .unwrap();
            let opened = lode_read::open_image(&store, Some(&kms), &id)
                .await
                .unwrap();
            (
                Arc::new(ImageDevice::new(Arc::clone(&cache), opened).unwrap()),
                cache,
            )
        };
        let check = |i: u64, got: &[u8]| {
            let o = usize::try_from(i * CHUNK).unwrap();
            assert!(got == &image[o..o + got.len()], "chunk {i} differs");
        };

        // One miss after another: six fetches, at most one new connection.
        let (dev, cache) = device().await;
        let before = accepted.load(Ordering::SeqCst);
        for i in DISTINCT {
            let mut buf = vec![0u8; 4096];
            dev.read_at(i * CHUNK, &mut buf).await.unwrap();
            check(i, &buf);
        }
        let serial = accepted.load(Ordering::SeqCst) - before;
        let origin = cache.snapshot().tier("origin").unwrap().hits;
        assert_eq!(origin, 6);
        assert!(
            serial <= 1,
            "{serial} connections for 6 fetches one after another"
        );
        eprintln!("6 fetches one after another: {serial} new connections");

        // All at once, twice, each on a fresh cache: the second round finds the first
        // round's connections open.
        for round in 0..2 {
            let (dev, cache) = device().await;
            let before = accepted.load(Ordering::SeqCst);
            let reads = DISTINCT.map(|i| {
                let dev = Arc::clone(&dev);
                async move {
                    let mut buf = vec![0u8; 4096];
                    dev.read_at(i * CHUNK, &mut buf).await.unwrap();
                    (i, buf)
                }
            });
            for (i, buf) in futures::future::join_all(reads).await {
                check(i, &buf);
            }
            let opened = accepted.load(Ordering::SeqCst) - before;
            assert_eq!(cache.snapshot().tier("origin").unwrap().hits, 6);
            assert!(
                opened <= 6,
                "round {round}: {opened} connections for 6 fetches"
            );
            eprintln!("6 fetches at once, round {round}: {opened} new connections");
            if round == 1 {
                assert!(opened <= 1, "the second round opened {opened} connections");
            }
        }
    });
    rt.shutdown_background();
}
