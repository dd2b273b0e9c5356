//! lode's on-disk and on-wire formats: the convergent chunk encryption, the manifest,
//! and the ids and unit newtypes every other crate speaks in.
//!
//! This crate does no I/O and holds no async code (the crate table in README.md): it turns bytes
//! into bytes and checks them. The store, the KMS and the read path build on it.
//!
//! - [`chunk`]: `digest = SHA-256(plaintext)`, `key = HMAC-SHA256(root_salt, digest)`,
//!   `ciphertext = AES-256-GCM(key, zero nonce, plaintext)`, `name = SHA-256(ciphertext)`.
//! - [`segment`]: chunk format v2, the same chunk cut into segments that can each be
//!   checked and decrypted alone, stored raw or (codec 1) lz4-compressed;
//!   `name = SHA-256(header)`, the header listing every segment's SHA-256.
//! - [`manifest`]: the versioned binary record naming an image's chunks, with its key
//!   table encrypted under a data key and the whole record authenticated. Version 1
//!   names v1 chunks, version 2 v2 chunks of a given segment size and codec.
//! - [`record`]: the sealed envelope of the records kept beside a manifest, and their list;
//! - [`workset`]: an image's working-set record (the chunks a start read, in order),
//!   sealed under a key derived from its key table.
//! - [`ids`]: chunk names, manifest ids, root ids, chunk indexes, chunk and segment sizes.

pub mod chunk;
pub mod ids;
pub mod manifest;
pub mod object;
pub mod record;
pub mod segment;
pub mod workset;

pub use chunk::{ChunkError, SealedChunk, open_chunk, seal_chunk, seal_chunk_in_place};
pub use ids::{
    ByteOffset, ChunkIndex, ChunkKey, ChunkName, ChunkSize, DataKey, ImageDigest, ManifestId,
    RootId, RootSalt, Secret32, SegmentIndex, SegmentSize,
};
pub use manifest::{
    ChunkEntry, ChunkFormat, ImageConfig, KeyTable, Manifest, ManifestError, ManifestHeader,
    WrappedKey, binding_of,
};
pub use object::{ObjectError, ObjectFormat, check_object};
pub use record::RecordSealKey;
pub use segment::{
    CheckedHeader, ChunkHeader, ChunkV2Error, Codec, DecodeError, HeaderError, SealedChunkV2,
    open_chunk_v2, open_segment, open_segment_in_place, open_segment_into, open_segment_unverified,
    seal_chunk_v2, verify_header, verify_object_v2, verify_segment,
};
pub use workset::{ImageWorkSet, WorkSetError, WorkSetKey};
