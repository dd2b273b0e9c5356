//! Every eviction policy wired into the worker's local tiers: a cache whose decrypted
//! segments, memory tier or disk tier evict by it reads the image right and serves the
//! second read from that tier, not the origin.

mod common;

use std::sync::Arc;

use common::{Fixture, distinct_stored};
use lode_blockdev::BlockDevice;
use lode_read::{
    CacheBuilder, ChunkCache, ChunkTier, DiskTier, MemoryTier, PolicyKind, StoreOrigin,
};

/// A ciphertext tier under test.
type Tier = Arc<dyn ChunkTier>;

/// Reads the whole image through `cache`, checking its bytes, and returns the snapshot.
async fn read_all(fx: &Fixture, cache: &Arc<ChunkCache>) -> lode_read::MetricsSnapshot {
    let dev = fx.device(cache).await;
    let mut buf = vec![0u8; fx.image.len()];
    dev.read_at(0, &mut buf).await.unwrap();
    assert!(buf == fx.image, "read wrong bytes");
    cache.settle().await;
    cache.snapshot()
}

fn cache(fx: &Fixture, decrypted: u64, policy: PolicyKind, tier: Option<Tier>) -> Arc<ChunkCache> {
    let mut b = CacheBuilder::new()
        .decrypted_bytes(decrypted)
        .decrypted_policy(policy);
    if let Some(t) = tier {
        b = b.tier(t);
    }
    b.origin(Arc::new(StoreOrigin::new(fx.store.clone())))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_serves_hits_from_every_local_tier() {
    let fx = Fixture::new().await;
    let stored = distinct_stored(0..10);
    for &policy in PolicyKind::ALL {
        let disk_dir = tempfile::tempdir().unwrap();
        let tiers: [(&str, u64, Option<Tier>); 3] = [
            ("decrypted", 64 << 20, None),
            (
                "memory",
                0,
                Some(Arc::new(MemoryTier::with_policy(64 << 20, policy))),
            ),
            (
                "disk",
                0,
                Some(Arc::new(
                    DiskTier::open_with_policy(disk_dir.path(), 64 << 20, policy).unwrap(),
                )),
            ),
        ];
        for (name, decrypted, tier) in tiers {
            let cache = cache(&fx, decrypted, policy, tier);
            let first = read_all(&fx, &cache).await;
            // Without a ciphertext tier, segments of one chunk read apart fetch it
            // again: at least once each.
            let fetched = first.tier("origin").unwrap().hits;
            assert!(fetched >= stored, "{policy} {name}: {fetched} fetches");
            let second = read_all(&fx, &cache).await;
            assert_eq!(
                second.tier("origin").unwrap().hits,
                fetched,
                "{policy} {name}: the second read fetched again"
            );
            let (t1, t2) = (first.tier(name).unwrap(), second.tier(name).unwrap());
            assert!(t2.hits > t1.hits, "{policy} {name}: {t1:?} then {t2:?}");
        }
    }
}
