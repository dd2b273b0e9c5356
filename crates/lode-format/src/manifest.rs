//! The manifest: a versioned binary record that names an image's chunks (docs/format.md). It is parsed in exactly one place, [`Manifest::parse`], with a
//! size cap and checked arithmetic, because it arrives from a store that may be wrong.
//!
//! ```text
//! offset  size      field (integers little-endian)
//! 0       8         magic "LODEMNFT"
//! 8       2         format version: 1 (v1 chunks) or 2 (v2 chunks, src/segment.rs)
//! 10      2         version 1: flags (0; anything else is refused); version 2: the v2
//!                   chunks' codec in the low byte (offset 10: 0 none, 1 lz4), flags (0)
//!                   in the high byte (offset 11)
//! 12      4         root id
//! 16      4         chunk size in bytes (power of two, 4 KiB..64 MiB)
//! 20      4         version 1: reserved (0); version 2: the v2 chunks' segment size
//!                   (power of two, 4 KiB..chunk size)
//! 24      8         device size in bytes
//! 32      32        image digest (SHA-256 of the source the image was made from)
//! 64      8         chunk count N (must equal ceil(device size / chunk size))
//! 72      4         config length C (at most 1 MiB), then C bytes of config:
//!                     entrypoint: list, cmd: list, env: list, working dir: str, user: str
//!                     (list = u32 count + that many str; str = u32 length + UTF-8)
//! 76+C    32 × N    chunk table: the chunk's name, or 32 zero bytes for an all-zero chunk
//! …       2 + K     KMS key id: u16 length K (1..256) + UTF-8
//! …       4 + W     wrapped data key: u32 length W (1..4096) + the KMS's opaque blob
//! …       32 × S + 16  key table: the keys of the S stored chunks in index order,
//!                   AES-256-GCM under the data key, nonce 12 zero bytes, AAD = every
//!                   byte of the manifest before this field; the tag ends the manifest
//! ```
//!
//! The chunk table is in clear so garbage collection can read it without keys. The key
//! table's GCM tag covers every other byte as AAD, so the whole manifest is authenticated:
//! a flipped byte anywhere fails either the parser or [`Manifest::open_keys`]. The data
//! key is fresh for every manifest and encrypts exactly one key table, so the zero nonce
//! never repeats under a key. A manifest's id is the SHA-256 of its bytes.
//!
//! The version says how every chunk it names is sealed ([`ChunkFormat`]): a manifest
//! never mixes v1 and v2 chunks, and the segment size and codec are part of what the
//! binding and the key table's tag cover. The codec took the low byte of the flags field,
//! which version 2 manifests written before it hold as 0 (codec none): they read as
//! before, and a lode that knows no codec refuses a manifest that records one as unknown
//! flags, never misreading its chunks.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::Serialize;
use thiserror::Error;

use crate::chunk::TAG_LEN;
use crate::ids::{
    ChunkIndex, ChunkKey, ChunkName, ChunkSize, DataKey, ImageDigest, ManifestId, RootId,
    SegmentSize,
};
use crate::segment::Codec;

/// The first eight bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"LODEMNFT";
/// The format version of a manifest of v1 chunks.
pub const VERSION_1: u16 = 1;
/// The format version of a manifest of v2 (segmented) chunks.
pub const VERSION_2: u16 = 2;
/// The largest manifest lode will parse. A 16 GiB image at 512 KiB chunks is about
/// 2 MiB; 64 MiB allows half a terabyte.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;
/// The largest config section.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// The longest KMS key id.
pub const MAX_KEY_ID_BYTES: usize = 256;
/// The longest wrapped data key.
pub const MAX_WRAPPED_KEY_BYTES: usize = 4096;
const FIXED_HEADER: usize = 76;
const NAME_LEN: usize = 32;

/// A manifest could not be built, parsed or opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is corrupt: {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes do not form a manifest.
    #[error("manifest is corrupt: {what} at byte {offset}")]
    Corrupt {
        /// Where parsing stopped.
        offset: usize,
        /// What was wrong there.
        what: String,
    },
    /// Written by a newer lode.
    #[error(
        "manifest is corrupt or from another lode: format version {found}, this lode reads \
         {VERSION_1} and {VERSION_2}"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// The key table's tag did not verify under the data key.
    #[error(
        "manifest is corrupt or was made under another key: its key table does not \
         authenticate under the unwrapped data key"
    )]
    Unauthentic,
    /// The caller asked for a manifest that cannot be written.
    #[error("cannot build manifest: {0}")]
    Build(String),
}

fn corrupt(offset: usize, what: impl Into<String>) -> ManifestError {
    ManifestError::Corrupt {
        offset,
        what: what.into(),
    }
}

/// What an image runs: the OCI image config fields lode carries (empty for raw images).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImageConfig {
    /// The entrypoint argv.
    pub entrypoint: Vec<String>,
    /// The default arguments.
    pub cmd: Vec<String>,
    /// `KEY=value` strings.
    pub env: Vec<String>,
    /// The working directory, or empty.
    pub working_dir: String,
    /// `user[:group]`, or empty.
    pub user: String,
}

/// How the chunks a manifest names are sealed; the manifest's format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "version", rename_all = "lowercase")]
pub enum ChunkFormat {
    /// Version 1: each chunk one AES-256-GCM message, named by SHA-256 of it
    /// ([`crate::chunk`]).
    V1,
    /// Version 2: each chunk in segments of `segment_size`, each encoded by `codec`, named
    /// by SHA-256 of its header ([`crate::segment`]).
    V2 {
        /// The segment size of every chunk; at most the chunk size.
        segment_size: SegmentSize,
        /// How every chunk's segments are encoded.
        codec: Codec,
    },
}

impl ChunkFormat {
    /// The format measured best for new chunks (docs/format.md §8, "Compression,
    /// measured"): v2 in 16 KiB segments, each compressed with lz4 when that saves at
    /// least an eighth, padded to a multiple of 1 KiB. For chunks smaller than 16 KiB a
    /// writer takes segments of the chunk size. Which format new images are written in is
    /// lode-image's choice.
    pub const RECOMMENDED: ChunkFormat = ChunkFormat::V2 {
        segment_size: SegmentSize::LZ4,
        codec: Codec::Lz4,
    };

    /// The manifest format version that records this chunk format.
    pub const fn version(self) -> u16 {
        match self {
            ChunkFormat::V1 => VERSION_1,
            ChunkFormat::V2 { .. } => VERSION_2,
        }
    }

    /// The segment size of v2 chunks; `None` for v1.
    pub const fn segment_size(self) -> Option<SegmentSize> {
        match self {
            ChunkFormat::V1 => None,
            ChunkFormat::V2 { segment_size, .. } => Some(segment_size),
        }
    }

    /// The codec of v2 chunks; `None` for v1.
    pub const fn codec(self) -> Option<Codec> {
        match self {
            ChunkFormat::V1 => None,
            ChunkFormat::V2 { codec, .. } => Some(codec),
        }
    }

    /// What the manifest stores at offset 10: 0 for v1, the codec byte (flags 0 above it)
    /// for v2.
    const fn flags(self) -> u16 {
        match self {
            ChunkFormat::V1 => 0,
            ChunkFormat::V2 { codec, .. } => codec.byte() as u16,
        }
    }

    /// What the manifest stores at offset 20: 0 for v1, the segment size for v2.
    const fn field(self) -> u32 {
        match self {
            ChunkFormat::V1 => 0,
            ChunkFormat::V2 { segment_size, .. } => segment_size.bytes(),
        }
    }
}

/// The fields of a manifest other than its chunk and key tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ManifestHeader {
    /// The root this manifest and its chunks live under.
    pub root: RootId,
    /// The size of every chunk but a short last one.
    pub chunk_size: ChunkSize,
    /// How the chunks are sealed (and so the manifest's format version).
    pub chunk_format: ChunkFormat,
    /// The image's size in bytes.
    pub device_size: u64,
    /// SHA-256 of the source the image was made from.
    pub image_digest: ImageDigest,
    /// What the image runs.
    pub config: ImageConfig,
}

/// One row of the chunk table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkEntry {
    /// All zero bytes: not stored, read as zeros.
    Zero,
    /// Stored under this name.
    Stored(ChunkName),
}

impl ChunkEntry {
    /// The chunk's name, if it is stored.
    pub fn name(&self) -> Option<&ChunkName> {
        match self {
            ChunkEntry::Zero => None,
            ChunkEntry::Stored(n) => Some(n),
        }
    }
}

/// A data key wrapped by a KMS key; opaque to everything but that KMS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WrappedKey {
    /// The KMS key that wrapped it (a keyring key name, an AWS KMS key ARN, …).
    pub key_id: String,
    /// What the KMS returned.
    #[serde(skip)]
    pub blob: Vec<u8>,
}

/// The decrypted key table: each chunk's key, by chunk index (`None` for zero chunks).
#[derive(Debug)]
pub struct KeyTable {
    keys: Vec<Option<ChunkKey>>,
}

impl KeyTable {
    /// The key of chunk `index`, if that chunk is stored.
    pub fn get(&self, index: ChunkIndex) -> Option<&ChunkKey> {
        usize::try_from(index.0)
            .ok()
            .and_then(|i| self.keys.get(i))
            .and_then(Option::as_ref)
    }

    /// A secret only holders of this table can compute: SHA-256 over `label` and every
    /// key in index order. It seals data that travels with the image (a snapshot's
    /// working-set record) without another KMS call. A table with no keys (an all-zero
    /// image) gives a value anyone can compute; such an image has nothing to hide.
    pub fn derive(&self, label: &[u8]) -> crate::Secret32 {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        h.update(label);
        for k in self.keys.iter().flatten() {
            h.update(k.expose());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(h.finish().as_ref());
        crate::Secret32::from_bytes(out)
    }
}

/// A parsed (or freshly sealed) manifest. The key table stays encrypted until
/// [`Manifest::open_keys`] is given the data key.
#[derive(Clone, Debug)]
pub struct Manifest {
    header: ManifestHeader,
    chunks: Vec<ChunkEntry>,
    wrapped_key: WrappedKey,
    bytes: Vec<u8>,
    key_table_at: usize,
}

impl Manifest {
    /// Writes a manifest. `keys` holds the key of each stored chunk, in index order.
    ///
    /// `data_key` must be fresh (from [`DataKey::random`] or a KMS's generate-data-key):
    /// the key table is encrypted under it with a fixed nonce, so reusing a data key for
    /// two manifests would reuse a GCM key and nonce.
    pub fn seal(
        header: ManifestHeader,
        chunks: Vec<ChunkEntry>,
        keys: &[ChunkKey],
        data_key: &DataKey,
        wrapped_key: WrappedKey,
    ) -> Result<Manifest, ManifestError> {
        if let Some(s) = header.chunk_format.segment_size()
            && !s.fits(header.chunk_size)
        {
            return Err(ManifestError::Build(format!(
                "segment size {s} is larger than the {}-byte chunk size",
                header.chunk_size
            )));
        }
        let expected = header.chunk_size.chunks_for(header.device_size);
        if chunks.len() as u64 != expected {
            return Err(ManifestError::Build(format!(
                "{} chunk entries for a {}-byte device of {}-byte chunks (want {expected})",
                chunks.len(),
                header.device_size,
                header.chunk_size
            )));
        }
        let stored = chunks.iter().filter(|c| c.name().is_some()).count();
        if keys.len() != stored {
            return Err(ManifestError::Build(format!(
                "{} keys for {stored} stored chunks",
                keys.len()
            )));
        }
        if wrapped_key.key_id.is_empty() || wrapped_key.key_id.len() > MAX_KEY_ID_BYTES {
            return Err(ManifestError::Build(format!(
                "KMS key id must be 1 to {MAX_KEY_ID_BYTES} bytes, got {}",
                wrapped_key.key_id.len()
            )));
        }
        if wrapped_key.blob.is_empty() || wrapped_key.blob.len() > MAX_WRAPPED_KEY_BYTES {
            return Err(ManifestError::Build(format!(
                "wrapped data key must be 1 to {MAX_WRAPPED_KEY_BYTES} bytes, got {}",
                wrapped_key.blob.len()
            )));
        }
        let mut b = encode_body(&header, &chunks)?;
        let key_id_len = u16::try_from(wrapped_key.key_id.len())
            .map_err(|_| ManifestError::Build("KMS key id too long".into()))?;
        b.extend_from_slice(&key_id_len.to_le_bytes());
        b.extend_from_slice(wrapped_key.key_id.as_bytes());
        put_u32(&mut b, len_u32(wrapped_key.blob.len())?);
        b.extend_from_slice(&wrapped_key.blob);

        let key_table_at = b.len();
        let mut table = Vec::with_capacity(keys.len() * 32 + TAG_LEN);
        for k in keys {
            table.extend_from_slice(k.expose());
        }
        let tag = key_table_cipher(data_key)
            .seal_in_place_separate_tag(zero_nonce(), Aad::from(&b[..]), &mut table)
            .map_err(|_| ManifestError::Build("key table too large to encrypt".into()))?;
        b.extend_from_slice(&table);
        b.extend_from_slice(tag.as_ref());
        if b.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Build(format!(
                "manifest would be {} bytes, over the {MAX_MANIFEST_BYTES}-byte limit",
                b.len()
            )));
        }
        Ok(Manifest {
            header,
            chunks,
            wrapped_key,
            bytes: b,
            key_table_at,
        })
    }

    /// Parses manifest bytes from an untrusted source. Checks structure only: call
    /// [`Manifest::open_keys`] to authenticate the whole record.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                len: bytes.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        let mut r = Reader { bytes, at: 0 };
        if r.take(8, "magic")? != MAGIC {
            return Err(corrupt(0, "bad magic (not a lode manifest)"));
        }
        let version = r.u16("format version")?;
        if version != VERSION_1 && version != VERSION_2 {
            return Err(ManifestError::UnsupportedVersion { found: version });
        }
        let flags = r.u16("flags")?;
        // Version 2 keeps its chunks' codec in the low byte; every other bit is a flag,
        // and there are none yet.
        let codec_byte = if version == VERSION_2 {
            flags & 0xff
        } else {
            0
        };
        if flags != codec_byte {
            return Err(corrupt(
                10,
                format!("unknown flags {:#06x}", flags ^ codec_byte),
            ));
        }
        let codec = u8::try_from(codec_byte)
            .ok()
            .and_then(Codec::from_byte)
            .ok_or_else(|| corrupt(10, format!("unknown chunk codec {codec_byte}")))?;
        let root = RootId(r.u32("root id")?);
        let chunk_size = ChunkSize::new(u64::from(r.u32("chunk size")?))
            .map_err(|e| corrupt(16, e.to_string()))?;
        let chunk_format = if version == VERSION_1 {
            if r.u32("reserved")? != 0 {
                return Err(corrupt(20, "reserved field is not zero"));
            }
            ChunkFormat::V1
        } else {
            let segment_size = SegmentSize::new(u64::from(r.u32("segment size")?))
                .map_err(|e| corrupt(20, e.to_string()))?;
            if !segment_size.fits(chunk_size) {
                return Err(corrupt(
                    20,
                    format!(
                        "segment size {segment_size} is larger than the {chunk_size}-byte \
                         chunk size"
                    ),
                ));
            }
            ChunkFormat::V2 {
                segment_size,
                codec,
            }
        };
        let device_size = r.u64("device size")?;
        let image_digest = ImageDigest::from_bytes(r.array32("image digest")?);
        let count_at = r.at;
        let count = r.u64("chunk count")?;
        if count != chunk_size.chunks_for(device_size) {
            return Err(corrupt(
                count_at,
                format!(
                    "chunk count {count} does not cover a {device_size}-byte device \
                     of {chunk_size}-byte chunks"
                ),
            ));
        }
        let config_len = r.u32("config length")? as usize;
        if config_len > MAX_CONFIG_BYTES {
            return Err(corrupt(
                72,
                format!("config length {config_len} is over the {MAX_CONFIG_BYTES}-byte limit"),
            ));
        }
        let config_at = r.at;
        let mut c = Reader {
            bytes: r.take(config_len, "config")?,
            at: 0,
        };
        let config = parse_config(&mut c).map_err(|e| match e {
            ManifestError::Corrupt { offset, what } => corrupt(config_at + offset, what),
            other => other,
        })?;
        if c.at != config_len {
            return Err(corrupt(config_at + c.at, "trailing bytes in config"));
        }

        // The count was checked against the device size, but a hostile device size can
        // still ask for more rows than there are bytes: bound it by what is left first.
        let table_at = r.at;
        let count = usize::try_from(count)
            .ok()
            .filter(|&n| n <= r.remaining() / NAME_LEN)
            .ok_or_else(|| {
                corrupt(
                    table_at,
                    format!("chunk table of {count} rows overruns the manifest"),
                )
            })?;
        let mut chunks = Vec::with_capacity(count);
        let mut stored = 0usize;
        for _ in 0..count {
            let name = r.array32("chunk table")?;
            if name == [0u8; NAME_LEN] {
                chunks.push(ChunkEntry::Zero);
            } else {
                stored += 1;
                chunks.push(ChunkEntry::Stored(ChunkName::from_bytes(name)));
            }
        }
        let key_id_at = r.at;
        let key_id_len = usize::from(r.u16("KMS key id length")?);
        if key_id_len == 0 || key_id_len > MAX_KEY_ID_BYTES {
            return Err(corrupt(
                key_id_at,
                format!("KMS key id length {key_id_len}"),
            ));
        }
        let key_id = std::str::from_utf8(r.take(key_id_len, "KMS key id")?)
            .map_err(|_| corrupt(key_id_at + 2, "KMS key id is not UTF-8"))?
            .to_owned();
        let wrapped_at = r.at;
        let wrapped_len = r.u32("wrapped key length")? as usize;
        if wrapped_len == 0 || wrapped_len > MAX_WRAPPED_KEY_BYTES {
            return Err(corrupt(
                wrapped_at,
                format!("wrapped key length {wrapped_len}"),
            ));
        }
        let blob = r.take(wrapped_len, "wrapped key")?.to_vec();
        let key_table_at = r.at;
        let want = stored
            .checked_mul(32)
            .and_then(|n| n.checked_add(TAG_LEN))
            .ok_or_else(|| corrupt(key_table_at, "key table size overflows"))?;
        if r.remaining() != want {
            return Err(corrupt(
                key_table_at,
                format!(
                    "key table is {} bytes, {stored} stored chunks need {want}",
                    r.remaining()
                ),
            ));
        }
        Ok(Manifest {
            header: ManifestHeader {
                root,
                chunk_size,
                chunk_format,
                device_size,
                image_digest,
                config,
            },
            chunks,
            wrapped_key: WrappedKey { key_id, blob },
            bytes: bytes.to_vec(),
            key_table_at,
        })
    }

    /// Authenticates the whole manifest and decrypts its key table.
    pub fn open_keys(&self, data_key: &DataKey) -> Result<KeyTable, ManifestError> {
        let (aad, sealed) = self.bytes.split_at(self.key_table_at);
        let mut buf = sealed.to_vec();
        let plain = key_table_cipher(data_key)
            .open_in_place(zero_nonce(), Aad::from(aad), &mut buf)
            .map_err(|_| ManifestError::Unauthentic)?;
        let mut keys = plain.chunks_exact(32).map(|k| {
            let mut a = [0u8; 32];
            a.copy_from_slice(k);
            ChunkKey::from_bytes(a)
        });
        let table = self
            .chunks
            .iter()
            .map(|c| c.name().and_then(|_| keys.next()))
            .collect();
        buf.iter_mut().for_each(|b| *b = 0);
        Ok(KeyTable { keys: table })
    }

    /// SHA-256 of every byte before the KMS key id field (header, config and chunk
    /// table): what a wrapped data key is bound to, through the KMS's encryption context,
    /// so a wrapped key copied into another manifest does not unwrap there.
    pub fn binding(&self) -> [u8; 32] {
        // The key table starts after the key id (u16 length + bytes) and the wrapped key
        // (u32 length + bytes), both of which this manifest holds.
        let tail = 2 + self.wrapped_key.key_id.len() + 4 + self.wrapped_key.blob.len();
        sha256(&self.bytes[..self.key_table_at - tail])
    }

    /// The manifest's id: SHA-256 of its bytes.
    pub fn id(&self) -> ManifestId {
        ManifestId::of(&self.bytes)
    }

    /// The encoded manifest.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Everything but the tables.
    pub fn header(&self) -> &ManifestHeader {
        &self.header
    }

    /// The chunk table, by index.
    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.chunks
    }

    /// The wrapped data key and the KMS key that wrapped it.
    pub fn wrapped_key(&self) -> &WrappedKey {
        &self.wrapped_key
    }

    /// How many chunks are stored (not zero).
    pub fn stored_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.name().is_some()).count()
    }

    /// Plaintext bytes of the stored chunks: what the image would take without dedup.
    pub fn stored_plain_bytes(&self) -> u64 {
        let cs = self.header.chunk_size;
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.name().is_some())
            .map(|(i, _)| cs.len_of(ChunkIndex(i as u64), self.header.device_size) as u64)
            .sum()
    }
}

/// The manifest's bytes before the KMS key id: magic, header, config and chunk table —
/// what [`Manifest::binding`] hashes. [`Manifest::seal`] writes exactly these bytes first.
fn encode_body(header: &ManifestHeader, chunks: &[ChunkEntry]) -> Result<Vec<u8>, ManifestError> {
    let mut config = Vec::new();
    for list in [
        &header.config.entrypoint,
        &header.config.cmd,
        &header.config.env,
    ] {
        put_u32(&mut config, len_u32(list.len())?);
        for s in list {
            put_str(&mut config, s)?;
        }
    }
    put_str(&mut config, &header.config.working_dir)?;
    put_str(&mut config, &header.config.user)?;
    if config.len() > MAX_CONFIG_BYTES {
        return Err(ManifestError::Build(format!(
            "image config is {} bytes, over the {MAX_CONFIG_BYTES}-byte limit",
            config.len()
        )));
    }

    let mut b = Vec::with_capacity(FIXED_HEADER + config.len() + chunks.len() * 64 + 512);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&header.chunk_format.version().to_le_bytes());
    b.extend_from_slice(&header.chunk_format.flags().to_le_bytes());
    b.extend_from_slice(&header.root.0.to_le_bytes());
    b.extend_from_slice(&header.chunk_size.bytes().to_le_bytes());
    b.extend_from_slice(&header.chunk_format.field().to_le_bytes());
    b.extend_from_slice(&header.device_size.to_le_bytes());
    b.extend_from_slice(header.image_digest.as_bytes());
    b.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    put_u32(&mut b, len_u32(config.len())?);
    b.extend_from_slice(&config);
    for c in chunks {
        match c {
            ChunkEntry::Zero => b.extend_from_slice(&[0u8; NAME_LEN]),
            ChunkEntry::Stored(n) => {
                if n.as_bytes() == &[0u8; NAME_LEN] {
                    return Err(ManifestError::Build(
                        "a stored chunk cannot have the all-zero name".into(),
                    ));
                }
                b.extend_from_slice(n.as_bytes())
            }
        }
    }
    Ok(b)
}

/// The binding of the manifest that `header` and `chunks` will make, before it is sealed:
/// the same digest as [`Manifest::binding`] of the sealed manifest. A publisher asks the
/// KMS for a data key bound to it, then seals with that key.
pub fn binding_of(
    header: &ManifestHeader,
    chunks: &[ChunkEntry],
) -> Result<[u8; 32], ManifestError> {
    Ok(sha256(&encode_body(header, chunks)?))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

fn key_table_cipher(key: &DataKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose()).expect("32-byte AES-256 key"))
}

fn zero_nonce() -> Nonce {
    Nonce::assume_unique_for_key([0u8; NONCE_LEN])
}

fn len_u32(n: usize) -> Result<u32, ManifestError> {
    u32::try_from(n).map_err(|_| ManifestError::Build(format!("length {n} does not fit 32 bits")))
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_str(b: &mut Vec<u8>, s: &str) -> Result<(), ManifestError> {
    put_u32(b, len_u32(s.len())?);
    b.extend_from_slice(s.as_bytes());
    Ok(())
}

fn parse_config(c: &mut Reader<'_>) -> Result<ImageConfig, ManifestError> {
    let entrypoint = c.str_list("entrypoint")?;
    let cmd = c.str_list("cmd")?;
    let env = c.str_list("env")?;
    let working_dir = c.string("working dir")?;
    let user = c.string("user")?;
    Ok(ImageConfig {
        entrypoint,
        cmd,
        env,
        working_dir,
        user,
    })
}

/// A cursor over untrusted bytes: every read is bounds-checked and names its field.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], ManifestError> {
        if n > self.remaining() {
            return Err(corrupt(
                self.at,
                format!(
                    "truncated {field}: need {n} bytes, {} left",
                    self.remaining()
                ),
            ));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn array32(&mut self, field: &str) -> Result<[u8; 32], ManifestError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32, field)?);
        Ok(a)
    }

    fn u16(&mut self, field: &str) -> Result<u16, ManifestError> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2, field)?);
        Ok(u16::from_le_bytes(a))
    }

    fn u32(&mut self, field: &str) -> Result<u32, ManifestError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, field)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self, field: &str) -> Result<u64, ManifestError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, field)?);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, field: &str) -> Result<String, ManifestError> {
        let at = self.at;
        let len = self.u32(field)? as usize;
        let raw = self.take(len, field)?;
        String::from_utf8(raw.to_vec()).map_err(|_| corrupt(at, format!("{field} is not UTF-8")))
    }

    fn str_list(&mut self, field: &str) -> Result<Vec<String>, ManifestError> {
        let at = self.at;
        let count = self.u32(field)? as usize;
        // Every string costs at least its 4-byte length, which bounds the allocation.
        if count > self.remaining() / 4 {
            return Err(corrupt(at, format!("{field} claims {count} entries")));
        }
        (0..count).map(|_| self.string(field)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::seal_chunk;
    use crate::ids::RootSalt;

    pub(crate) fn sample() -> (Manifest, DataKey) {
        let salt = RootSalt::from_bytes([3; 32]);
        let a = seal_chunk(&salt, &[1u8; 4096]);
        let b = seal_chunk(&salt, &[2u8; 100]);
        let header = ManifestHeader {
            root: RootId(7),
            chunk_size: ChunkSize::new(4096).unwrap(),
            chunk_format: ChunkFormat::V1,
            device_size: 3 * 4096 + 100,
            image_digest: ImageDigest::of(b"source"),
            config: ImageConfig {
                entrypoint: vec!["/bin/sh".into(), "-c".into()],
                cmd: vec!["echo hi".into()],
                env: vec!["PATH=/usr/bin".into()],
                working_dir: "/".into(),
                user: "1000:1000".into(),
            },
        };
        let chunks = vec![
            ChunkEntry::Stored(a.name),
            ChunkEntry::Zero,
            ChunkEntry::Stored(a.name),
            ChunkEntry::Stored(b.name),
        ];
        let keys = [a.key.clone(), a.key.clone(), b.key.clone()];
        let dk = DataKey::from_bytes([9; 32]);
        let wrapped = WrappedKey {
            key_id: "default".into(),
            blob: vec![0xee; 60],
        };
        (
            Manifest::seal(header, chunks, &keys, &dk, wrapped).unwrap(),
            dk,
        )
    }

    #[test]
    fn seal_parse_open_round_trip() {
        let (m, dk) = sample();
        let p = Manifest::parse(m.bytes()).unwrap();
        assert_eq!(p.header(), m.header());
        assert_eq!(p.chunks(), m.chunks());
        assert_eq!(p.wrapped_key(), m.wrapped_key());
        assert_eq!(p.id(), m.id());
        let keys = p.open_keys(&dk).unwrap();
        assert!(keys.get(ChunkIndex(1)).is_none());
        assert_eq!(keys.get(ChunkIndex(0)), keys.get(ChunkIndex(2)));
        assert!(keys.get(ChunkIndex(3)).is_some());
        assert!(keys.get(ChunkIndex(4)).is_none());
        assert_eq!(p.stored_chunks(), 3);
        assert_eq!(p.stored_plain_bytes(), 2 * 4096 + 100);
    }

    #[test]
    fn binding_covers_the_body_and_not_the_wrapped_key() {
        let (m, dk) = sample();
        let p = Manifest::parse(m.bytes()).unwrap();
        let before = binding_of(m.header(), m.chunks()).unwrap();
        assert_eq!(m.binding(), before);
        assert_eq!(p.binding(), before);
        let key_id_at = m.bytes().len() - (2 + 7 + 4 + 60 + 3 * 32 + TAG_LEN);
        assert_eq!(before, sha256(&m.bytes()[..key_id_at]));
        // Another wrapped key leaves the binding alone; another chunk table changes it.
        let other = WrappedKey {
            key_id: "another-key".into(),
            blob: vec![1; 9],
        };
        let keys: Vec<ChunkKey> = (0..3).map(|_| ChunkKey::from_bytes([1; 32])).collect();
        let resealed =
            Manifest::seal(m.header().clone(), m.chunks().to_vec(), &keys, &dk, other).unwrap();
        assert_eq!(resealed.binding(), before);
        let mut chunks = m.chunks().to_vec();
        chunks.swap(0, 3);
        assert_ne!(binding_of(m.header(), &chunks).unwrap(), before);
        let header = ManifestHeader {
            root: RootId(8),
            ..m.header().clone()
        };
        assert_ne!(binding_of(&header, m.chunks()).unwrap(), before);
    }

    #[test]
    fn every_flipped_byte_is_refused_as_corrupt() {
        let (m, dk) = sample();
        for i in 0..m.bytes().len() {
            let mut bad = m.bytes().to_vec();
            bad[i] ^= 0x40;
            let err = match Manifest::parse(&bad) {
                Err(e) => e,
                Ok(p) => p
                    .open_keys(&dk)
                    .expect_err(&format!("flip at {i} accepted")),
            };
            assert!(err.to_string().contains("corrupt"), "byte {i}: {err}");
        }
    }

    #[test]
    fn wrong_data_key_is_refused() {
        let (m, _) = sample();
        let err = m.open_keys(&DataKey::from_bytes([1; 32])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "manifest is corrupt or was made under another key: its key table does not \
             authenticate under the unwrapped data key"
        );
    }

    #[test]
    fn truncation_is_refused_at_every_length() {
        let (m, _) = sample();
        for n in 0..m.bytes().len() {
            assert!(
                Manifest::parse(&m.bytes()[..n]).is_err(),
                "prefix of {n} parsed"
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        let (m, _) = sample();
        let err = Manifest::parse(&m.bytes()[..30]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "manifest is corrupt: truncated device size: need 8 bytes, 6 left at byte 24"
        );
        let mut bad = m.bytes().to_vec();
        bad[8] = 3;
        assert_eq!(
            Manifest::parse(&bad).unwrap_err().to_string(),
            "manifest is corrupt or from another lode: format version 3, this lode reads 1 and 2"
        );
        let mut bad = m.bytes().to_vec();
        bad[20] = 1;
        assert_eq!(
            Manifest::parse(&bad).unwrap_err().to_string(),
            "manifest is corrupt: reserved field is not zero at byte 20"
        );
        assert_eq!(
            Manifest::parse(b"not a manifest at all")
                .unwrap_err()
                .to_string(),
            "manifest is corrupt: bad magic (not a lode manifest) at byte 0"
        );
    }

    #[test]
    fn a_huge_chunk_count_does_not_allocate() {
        let (m, _) = sample();
        let mut bad = m.bytes().to_vec();
        // device size 2^62 at 4 KiB chunks: 2^50 rows claimed.
        bad[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        bad[64..72].copy_from_slice(&(1u64 << 50).to_le_bytes());
        let err = Manifest::parse(&bad).unwrap_err();
        assert!(err.to_string().contains("overruns the manifest"), "{err}");
    }

    #[test]
    fn build_errors() {
        let (m, dk) = sample();
        let err = Manifest::seal(
            m.header().clone(),
            m.chunks()[..2].to_vec(),
            &[],
            &dk,
            m.wrapped_key().clone(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot build manifest: 2 chunk entries")
        );
    }

    fn v2_header(segment_size: u64) -> ManifestHeader {
        v2_header_with(segment_size, Codec::None)
    }

    fn v2_header_with(segment_size: u64, codec: Codec) -> ManifestHeader {
        ManifestHeader {
            root: RootId(3),
            chunk_size: ChunkSize::new(65536).unwrap(),
            chunk_format: ChunkFormat::V2 {
                segment_size: SegmentSize::new(segment_size).unwrap(),
                codec,
            },
            device_size: 65536 + 10,
            image_digest: ImageDigest::of(b"v2"),
            config: ImageConfig::default(),
        }
    }

    fn seal_v2(header: ManifestHeader) -> Result<Manifest, ManifestError> {
        let chunks = vec![
            ChunkEntry::Stored(ChunkName::of(b"a")),
            ChunkEntry::Stored(ChunkName::of(b"b")),
        ];
        let keys = [ChunkKey::from_bytes([1; 32]), ChunkKey::from_bytes([2; 32])];
        let w = WrappedKey {
            key_id: "k".into(),
            blob: vec![1],
        };
        Manifest::seal(header, chunks, &keys, &DataKey::from_bytes([4; 32]), w)
    }

    #[test]
    fn version_2_records_the_segment_size() {
        let m = seal_v2(v2_header(32768)).unwrap();
        assert_eq!(&m.bytes()[8..10], &2u16.to_le_bytes());
        assert_eq!(&m.bytes()[20..24], &32768u32.to_le_bytes());
        let p = Manifest::parse(m.bytes()).unwrap();
        assert_eq!(p.header(), m.header());
        assert_eq!(
            p.header().chunk_format.segment_size(),
            SegmentSize::new(32768).ok()
        );
        assert_eq!(p.header().chunk_format.version(), 2);
        p.open_keys(&DataKey::from_bytes([4; 32])).unwrap();
        // A segment as large as the chunk is allowed.
        let whole = seal_v2(v2_header(65536)).unwrap();
        assert!(Manifest::parse(whole.bytes()).is_ok());
        // The binding covers the format: the same chunks as v1 bind differently.
        let v1 = ManifestHeader {
            chunk_format: ChunkFormat::V1,
            ..m.header().clone()
        };
        assert_ne!(binding_of(&v1, m.chunks()).unwrap(), m.binding());
        assert_ne!(
            binding_of(&v2_header(4096), m.chunks()).unwrap(),
            m.binding()
        );
    }

    #[test]
    fn version_2_segment_size_is_checked() {
        let m = seal_v2(v2_header(32768)).unwrap();
        let with = |v: u32| {
            let mut b = m.bytes().to_vec();
            b[20..24].copy_from_slice(&v.to_le_bytes());
            Manifest::parse(&b).unwrap_err().to_string()
        };
        assert_eq!(
            with(0),
            "manifest is corrupt: segment size 0 is not a power of two between 4096 and \
             67108864 bytes at byte 20"
        );
        assert_eq!(
            with(2048),
            "manifest is corrupt: segment size 2048 is not a power of two between 4096 and \
             67108864 bytes at byte 20"
        );
        assert_eq!(
            with(131072),
            "manifest is corrupt: segment size 131072 is larger than the 65536-byte chunk \
             size at byte 20"
        );
        // A v1 manifest relabelled as version 2 has segment size 0.
        let (v1, _) = sample();
        let mut b = v1.bytes().to_vec();
        b[8] = 2;
        assert!(
            Manifest::parse(&b)
                .unwrap_err()
                .to_string()
                .contains("segment size 0 is not")
        );
        let header = ManifestHeader {
            chunk_size: ChunkSize::new(16384).unwrap(),
            device_size: 16384 + 10,
            ..v2_header(32768)
        };
        assert_eq!(
            seal_v2(header).unwrap_err().to_string(),
            "cannot build manifest: segment size 32768 is larger than the 16384-byte chunk size"
        );
    }

    #[test]
    fn version_2_records_the_codec_at_offset_10() {
        let none = seal_v2(v2_header(32768)).unwrap();
        assert_eq!(&none.bytes()[10..12], &[0, 0]);
        let lz4 = seal_v2(v2_header_with(16384, Codec::Lz4)).unwrap();
        assert_eq!(&lz4.bytes()[8..12], &[2, 0, 1, 0]);
        assert_eq!(&lz4.bytes()[20..24], &16384u32.to_le_bytes());
        let p = Manifest::parse(lz4.bytes()).unwrap();
        assert_eq!(p.header(), lz4.header());
        assert_eq!(p.header().chunk_format.codec(), Some(Codec::Lz4));
        assert_eq!(
            p.header().chunk_format.segment_size(),
            SegmentSize::new(16384).ok()
        );
        p.open_keys(&DataKey::from_bytes([4; 32])).unwrap();
        // The codec is bound like the segment size.
        assert_ne!(
            binding_of(&v2_header_with(16384, Codec::None), lz4.chunks()).unwrap(),
            lz4.binding()
        );
        assert_eq!(ChunkFormat::V1.codec(), None);
        assert_eq!(
            ChunkFormat::RECOMMENDED,
            ChunkFormat::V2 {
                segment_size: SegmentSize::new(16384).unwrap(),
                codec: Codec::Lz4
            }
        );
    }

    #[test]
    fn an_unknown_codec_or_flag_is_refused() {
        let m = seal_v2(v2_header(32768)).unwrap();
        let with = |flags: [u8; 2]| {
            let mut b = m.bytes().to_vec();
            b[10..12].copy_from_slice(&flags);
            Manifest::parse(&b).unwrap_err().to_string()
        };
        assert_eq!(
            with([2, 0]),
            "manifest is corrupt: unknown chunk codec 2 at byte 10"
        );
        assert_eq!(
            with([1, 1]),
            "manifest is corrupt: unknown flags 0x0100 at byte 10"
        );
        // A version 1 manifest has no codec: its flags field stays all flags.
        let (v1, _) = sample();
        let mut b = v1.bytes().to_vec();
        b[10] = 1;
        assert_eq!(
            Manifest::parse(&b).unwrap_err().to_string(),
            "manifest is corrupt: unknown flags 0x0001 at byte 10"
        );
    }

    #[test]
    fn chunk_format_renders_as_json() {
        let v2 = ChunkFormat::V2 {
            segment_size: SegmentSize::DEFAULT,
            codec: Codec::None,
        };
        assert_eq!(
            serde_json::to_string(&v2).unwrap(),
            r#"{"version":"v2","segment_size":32768,"codec":"none"}"#
        );
        assert_eq!(
            serde_json::to_string(&ChunkFormat::RECOMMENDED).unwrap(),
            r#"{"version":"v2","segment_size":16384,"codec":"lz4"}"#
        );
        assert_eq!(
            serde_json::to_string(&ChunkFormat::V1).unwrap(),
            r#"{"version":"v1"}"#
        );
    }

    #[test]
    fn empty_device() {
        let header = ManifestHeader {
            root: RootId(1),
            chunk_size: ChunkSize::DEFAULT,
            chunk_format: ChunkFormat::V1,
            device_size: 0,
            image_digest: ImageDigest::of(b""),
            config: ImageConfig::default(),
        };
        let dk = DataKey::from_bytes([1; 32]);
        let w = WrappedKey {
            key_id: "k".into(),
            blob: vec![1],
        };
        let m = Manifest::seal(header, vec![], &[], &dk, w).unwrap();
        let p = Manifest::parse(m.bytes()).unwrap();
        assert!(p.chunks().is_empty());
        p.open_keys(&dk).unwrap();
    }
}
