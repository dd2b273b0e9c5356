//! Store-wide accounting: what is stored against what the images would take without
//! deduplication. Reads only chunk listings and manifests' clear chunk tables — no keys,
//! the way garbage collection reads them.

use std::collections::{HashMap, HashSet};

use lode_format::{ChunkName, Manifest, RootId};
use lode_store::{RootState, Store};
use serde::Serialize;

use crate::{ImageError, Liveness};

/// What a store holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StoreStats {
    /// Where the store is.
    pub store: String,
    /// Roots in the store.
    pub roots: u64,
    /// Manifests across all roots.
    pub manifests: u64,
    /// Tags.
    pub tags: u64,
    /// Tags that could not be read, each with why (see `lode store fsck`).
    pub bad_tags: Vec<String>,
    /// Chunk objects across all roots.
    pub chunks: u64,
    /// Bytes of chunk objects (ciphertext, with 16-byte tags).
    pub stored_bytes: u64,
    /// Plaintext bytes of every manifest's non-zero chunks, repeats counted: what the
    /// images would store with no deduplication and zero elision only.
    pub logical_bytes: u64,
    /// The sum of every image's device size.
    pub device_bytes: u64,
    /// Chunks that some manifest names but the store lacks (should be 0).
    pub missing_chunks: u64,
    /// `logical_bytes / stored_bytes`.
    pub dedup_ratio: f64,
    /// Bytes of chunk objects some live manifest of their root names (see [`Liveness`]).
    pub live_bytes: u64,
    /// Bytes of chunk objects no live manifest of their root names: what collecting every
    /// root would reclaim.
    pub dead_bytes: u64,
    /// Tag and pin objects that could not be read: while any exist, dead bytes may
    /// count live ones.
    pub unreadable_holders: Vec<String>,
    /// The same figures per root.
    pub per_root: Vec<RootStats>,
    /// Roots whose ROOT record could not be read, each with why; their objects are not
    /// counted (`lode store fsck` names them too).
    pub unreadable_roots: Vec<String>,
}

/// What one root holds, live and dead.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RootStats {
    /// The root.
    pub root: RootId,
    /// Its state.
    pub state: RootState,
    /// Manifests in it.
    pub manifests: u64,
    /// Of those, live ones.
    pub live_manifests: u64,
    /// Chunk objects in it.
    pub chunks: u64,
    /// Their bytes.
    pub stored_bytes: u64,
    /// Bytes of chunks a live manifest of this root names, each chunk counted once.
    pub live_bytes: u64,
    /// `stored_bytes - live_bytes`.
    pub dead_bytes: u64,
}

/// Counts what `store` holds, and how much of it is live.
pub async fn store_stats(store: &Store) -> Result<StoreStats, ImageError> {
    let mut st = StoreStats {
        store: store.label().to_owned(),
        ..Default::default()
    };
    let tags = store.list_tags().await?;
    st.tags = tags.tags.len() as u64;
    st.bad_tags = tags.bad.iter().map(|b| b.error.to_string()).collect();
    let live = Liveness::load(store).await?;
    st.unreadable_holders = live.unreadable().to_vec();
    for (id, read) in store.root_records().await? {
        let root = match read {
            Ok((rec, _)) => rec,
            Err(e) => {
                st.unreadable_roots.push(format!("root {id}: {e}"));
                continue;
            }
        };
        st.roots += 1;
        let chunks = store.list_chunks(root.root).await?;
        let mut rs = RootStats {
            root: root.root,
            state: root.state,
            manifests: 0,
            live_manifests: 0,
            chunks: chunks.len() as u64,
            stored_bytes: chunks.iter().map(|(_, s)| s).sum::<u64>(),
            live_bytes: 0,
            dead_bytes: 0,
        };
        let present: HashMap<ChunkName, u64> = chunks.into_iter().collect();
        let mut named = HashSet::new();
        let mut named_live = HashSet::new();
        for id in store.list_manifests(root.root).await? {
            let bytes = store.get_manifest(root.root, &id).await?;
            let m =
                Manifest::parse(&bytes).map_err(|source| ImageError::Manifest { id, source })?;
            rs.manifests += 1;
            st.logical_bytes += m.stored_plain_bytes();
            st.device_bytes += m.header().device_size;
            let names = m.chunks().iter().filter_map(|c| c.name().copied());
            if live.is_live(&id) {
                rs.live_manifests += 1;
                named_live.extend(names.clone());
            }
            named.extend(names);
        }
        rs.live_bytes = named_live.iter().filter_map(|n| present.get(n)).sum();
        rs.dead_bytes = rs.stored_bytes - rs.live_bytes;
        st.missing_chunks += named.iter().filter(|n| !present.contains_key(n)).count() as u64;
        st.manifests += rs.manifests;
        st.chunks += rs.chunks;
        st.stored_bytes += rs.stored_bytes;
        st.live_bytes += rs.live_bytes;
        st.dead_bytes += rs.dead_bytes;
        st.per_root.push(rs);
    }
    st.dedup_ratio = if st.stored_bytes == 0 {
        0.0
    } else {
        st.logical_bytes as f64 / st.stored_bytes as f64
    };
    Ok(st)
}
