//! A manifest rendered for people and scripts (`lode inspect`): everything but keys.

use lode_format::{
    ChunkName, ChunkSize, ImageConfig, ImageDigest, Manifest, ManifestId, RootId, SegmentSize,
};
use serde::Serialize;

/// The JSON form of a manifest. The key table and the wrapped data key are never shown;
/// only the id of the KMS key that wrapped it.
#[derive(Clone, Debug, Serialize)]
pub struct ManifestView {
    /// The manifest's id.
    pub id: ManifestId,
    /// Its size in bytes.
    pub manifest_bytes: usize,
    /// The format version: 1 for v1 chunks, 2 for v2 (segmented) chunks.
    pub format_version: u16,
    /// The root it lives under.
    pub root: RootId,
    /// Chunk size in bytes.
    pub chunk_size: ChunkSize,
    /// Segment size in bytes of v2 chunks; absent for version 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_size: Option<SegmentSize>,
    /// Image size in bytes.
    pub device_size: u64,
    /// SHA-256 of the source.
    pub image_digest: ImageDigest,
    /// What the image runs.
    pub config: ImageConfig,
    /// The KMS key that wrapped the data key.
    pub kms_key_id: String,
    /// Chunks in the image.
    pub chunk_count: usize,
    /// All-zero chunks.
    pub zero_chunks: usize,
    /// Distinct stored chunks.
    pub distinct_chunks: usize,
    /// The chunk table: a name per index, `null` for zero chunks.
    pub chunks: Vec<Option<ChunkName>>,
}

impl ManifestView {
    /// Renders `m`.
    pub fn new(m: &Manifest) -> ManifestView {
        let h = m.header();
        let chunks: Vec<Option<ChunkName>> = m.chunks().iter().map(|c| c.name().copied()).collect();
        let distinct: std::collections::HashSet<_> = chunks.iter().flatten().collect();
        ManifestView {
            id: m.id(),
            manifest_bytes: m.bytes().len(),
            format_version: h.chunk_format.version(),
            root: h.root,
            chunk_size: h.chunk_size,
            segment_size: h.chunk_format.segment_size(),
            device_size: h.device_size,
            image_digest: h.image_digest,
            config: h.config.clone(),
            kms_key_id: m.wrapped_key().key_id.clone(),
            chunk_count: chunks.len(),
            zero_chunks: chunks.iter().filter(|c| c.is_none()).count(),
            distinct_chunks: distinct.len(),
            chunks,
        }
    }
}
