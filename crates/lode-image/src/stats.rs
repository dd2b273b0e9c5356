//! Store-wide accounting: what is stored against what the images would take without
//! deduplication. Reads only chunk listings and manifests' clear chunk tables — no keys,
//! the way garbage collection reads them.

use std::collections::HashSet;

use lode_format::{ChunkName, Manifest};
use lode_store::Store;
use serde::Serialize;

use crate::ImageError;

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
}

/// Counts what `store` holds.
pub async fn store_stats(store: &Store) -> Result<StoreStats, ImageError> {
    let mut st = StoreStats {
        store: store.label().to_owned(),
        ..Default::default()
    };
    let tags = store.list_tags().await?;
    st.tags = tags.tags.len() as u64;
    st.bad_tags = tags.bad.iter().map(|b| b.error.to_string()).collect();
    for root in store.roots().await? {
        st.roots += 1;
        let chunks = store.list_chunks(root.root).await?;
        st.chunks += chunks.len() as u64;
        st.stored_bytes += chunks.iter().map(|(_, s)| s).sum::<u64>();
        let present: HashSet<ChunkName> = chunks.into_iter().map(|(n, _)| n).collect();
        let mut named = HashSet::new();
        for id in store.list_manifests(root.root).await? {
            let bytes = store.get_manifest(root.root, &id).await?;
            let m =
                Manifest::parse(&bytes).map_err(|source| ImageError::Manifest { id, source })?;
            st.manifests += 1;
            st.logical_bytes += m.stored_plain_bytes();
            st.device_bytes += m.header().device_size;
            named.extend(m.chunks().iter().filter_map(|c| c.name().copied()));
        }
        st.missing_chunks += named.difference(&present).count() as u64;
    }
    st.dedup_ratio = if st.stored_bytes == 0 {
        0.0
    } else {
        st.logical_bytes as f64 / st.stored_bytes as f64
    };
    Ok(st)
}
