//! lode's on-disk and on-wire formats: the convergent chunk encryption, the manifest,
//! and the ids and unit newtypes every other crate speaks in.
//!
//! This crate does no I/O and holds no async code (the crate table in README.md): it turns bytes
//! into bytes and checks them. The store, the KMS and the read path build on it.
//!
//! - [`chunk`]: `digest = SHA-256(plaintext)`, `key = HMAC-SHA256(root_salt, digest)`,
//!   `ciphertext = AES-256-GCM(key, zero nonce, plaintext)`, `name = SHA-256(ciphertext)`.
//! - [`manifest`]: the versioned binary record naming an image's chunks, with its key
//!   table encrypted under a data key and the whole record authenticated.
//! - [`ids`]: chunk names, manifest ids, root ids, chunk indexes and sizes.

pub mod chunk;
pub mod ids;
pub mod manifest;

pub use chunk::{ChunkError, SealedChunk, open_chunk, seal_chunk, seal_chunk_in_place};
pub use ids::{
    ByteOffset, ChunkIndex, ChunkKey, ChunkName, ChunkSize, DataKey, ImageDigest, ManifestId,
    RootId, RootSalt, Secret32,
};
pub use manifest::{
    ChunkEntry, ImageConfig, KeyTable, Manifest, ManifestError, ManifestHeader, WrappedKey,
    binding_of,
};
