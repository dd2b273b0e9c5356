//! The flattener: an image from a [`Source`] into one deterministic ext4
//! image (docs/flatten.md).
//!
//! ```text
//! source ─ layer blob ─► sha256 (blob digest, size) ─► gzip/zstd/none ─► sha256 (diff_id)
//!                                                                   │ caps: total size, ratio
//!                                                                   ▼
//!                         Ext4Writer region i ◄─ file contents ◄─ TarReader ─► Merger (tree)
//! after the last layer:   Merger::into_flat ─► Ext4Writer::finish_flat ─► image + Summary
//! ```
//!
//! Each layer gets its own data region, and its regular files are appended
//! to it in the layer's tar order, so a region's bytes depend on that layer
//! alone (files a later layer hides keep their bytes there). The ext4 UUID
//! and hash seed come from the layers' diff_ids: the filesystem is a
//! function of the layer contents only, the same from any source.
//!
//! On error the output holds a partial image and must not be used.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

use lode_ext4::{Ext4Writer, ImageSink, Options, Region, Summary};

use crate::digest::{Digest, Hasher, HashingReader, limit_of};
use crate::merge::{ApplyError, MergeError, MergeLimits, Merger};
use crate::source::{ImageSource, LayerRef, Source, SourceError, SourceLimits};
use crate::spec::{Compression, Config, ImageConfigFields, Platform};
use crate::tar::{EntryKind, Stream, TarError, TarLimits, TarReader};

/// Caps that keep a hostile image from exhausting the flattener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most layers in one image.
    pub max_layers: usize,
    /// Most uncompressed tar bytes, all layers together.
    pub max_uncompressed_bytes: u64,
    /// Most uncompressed bytes per compressed byte of a layer, once the
    /// layer is past `expansion_slack` bytes (a decompression bomb guard;
    /// gzip cannot pass ~1032).
    pub max_expansion_ratio: u64,
    /// Uncompressed bytes of a layer before the ratio applies.
    pub expansion_slack: u64,
    /// Most data extents (runs of non-zero blocks) of regular files, all
    /// layers together: each is held until the image is written.
    pub max_extents: u64,
    /// Most bytes of regular-file data, all layers together, counting the holes of
    /// sparse files: the writer scans every logical byte, so this bounds the time a
    /// small tar of huge sparse files can take.
    pub max_file_bytes: u64,
    pub tar: TarLimits,
    pub merge: MergeLimits,
    pub source: SourceLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_layers: 256,
            max_uncompressed_bytes: 64 << 30,
            max_expansion_ratio: 2048,
            expansion_slack: 256 << 20,
            max_extents: 1 << 25,
            max_file_bytes: 64 << 30,
            tar: TarLimits::default(),
            merge: MergeLimits::default(),
            source: SourceLimits::default(),
        }
    }
}

/// How to flatten.
#[derive(Debug, Clone)]
pub struct FlattenOptions {
    /// Region alignment: lode's chunk size (a power of two, 4 KiB..128 MiB).
    pub chunk_size: u64,
    /// The platform picked from an image index.
    pub platform: Platform,
    pub limits: Limits,
}

impl Default for FlattenOptions {
    fn default() -> Self {
        Self {
            chunk_size: 512 * 1024,
            platform: Platform::linux_amd64(),
            limits: Limits::default(),
        }
    }
}

/// What the flattener is doing, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The image was found.
    Resolved { image_digest: Digest, layers: usize },
    /// Layer `index` (0-based) of `count` starts; `size` is its blob size.
    LayerStarted {
        index: usize,
        count: usize,
        layer: String,
        size: Option<u64>,
    },
    /// Bytes of the current layer read so far (sent every few MiB).
    LayerBytes {
        index: usize,
        compressed: u64,
        uncompressed: u64,
    },
    /// Layer `index` is merged.
    LayerDone {
        index: usize,
        entries: u64,
        uncompressed: u64,
    },
    /// All layers are read; the metadata region is being written.
    Finishing,
}

/// One layer as flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub layer: LayerRef,
    pub diff_id: Digest,
    pub compression: Compression,
    /// The layer's data region in the image.
    pub region: Region,
    /// Tar entries (headers of files, dirs, links, whiteouts…).
    pub entries: u64,
    /// Regular files appended to the region.
    pub files: u64,
    /// Size of the uncompressed tar.
    pub uncompressed_bytes: u64,
}

/// The result of [`flatten`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flattened {
    /// SHA-256 of the image manifest (docker-archive: of the config).
    pub image_digest: Digest,
    pub config_digest: Digest,
    pub config: ImageConfigFields,
    pub summary: Summary,
    pub layers: Vec<LayerInfo>,
}

/// Errors from flattening, each naming the part of the image at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{source_ref}: {source}")]
    Source {
        source_ref: String,
        source: SourceError,
    },
    #[error("config {digest}: content has digest {got}")]
    ConfigDigest { digest: Digest, got: Digest },
    #[error("config {digest}: {detail}")]
    Config { digest: Digest, detail: String },
    #[error("the image has {count} layers, more than the cap of {cap}")]
    TooManyLayers { count: usize, cap: usize },
    #[error("the config lists {diff_ids} diff_ids but the manifest has {layers} layers")]
    LayerCount { diff_ids: usize, layers: usize },
    #[error("layer {index} ({layer}): {source}")]
    Layer {
        index: usize,
        layer: String,
        source: Box<LayerError>,
    },
    #[error("layer {index} ({layer}), entry \"{path}\" (at byte {offset}): {source}")]
    Entry {
        index: usize,
        layer: String,
        path: String,
        offset: u64,
        source: MergeError,
    },
    #[error("building the merged tree: {0}")]
    Tree(#[source] MergeError),
    #[error("writing the ext4 image: {0}")]
    Ext4(#[from] lode_ext4::Error),
}

/// What went wrong inside one layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("blob content has digest {got}, not the digest that names it")]
    Digest { got: Digest },
    #[error("blob is {got} bytes, but its descriptor says {expected}")]
    Size { expected: u64, got: u64 },
    #[error("uncompressed tar has digest {got}, but the config's diff_id is {expected}")]
    DiffId { expected: Digest, got: Digest },
    #[error("media type {0:?} is not a layer type lode reads")]
    MediaType(String),
    #[error("media type {media_type:?} says {declared}, but the blob is {found}")]
    CompressionMismatch {
        media_type: String,
        declared: Compression,
        found: Compression,
    },
    #[error("opening the blob: {0}")]
    Open(#[source] SourceError),
    #[error("reading the blob: {0}")]
    Read(#[source] io::Error),
    #[error("{compression} stream is corrupt or truncated: {source}")]
    Decompress {
        compression: Compression,
        source: io::Error,
    },
    #[error("tar: {0}")]
    Tar(#[source] TarError),
    #[error("the image's uncompressed layers pass the cap of {cap} bytes")]
    TooLarge { cap: u64 },
    #[error(
        "expands more than {ratio}x ({compressed} compressed bytes gave {uncompressed}): a decompression bomb?"
    )]
    Expansion {
        ratio: u64,
        compressed: u64,
        uncompressed: u64,
    },
    #[error("entry \"{path}\": file data extents pass the image's cap of {cap}")]
    TooManyExtents { path: String, cap: u64 },
    #[error(
        "entry \"{path}\": its {size} bytes of file data (holes included) pass the image's cap of {cap}"
    )]
    TooMuchFileData { path: String, size: u64, cap: u64 },
    #[error("storing entry \"{path}\": {source}")]
    Write {
        path: String,
        source: lode_ext4::Error,
    },
}

/// Flattens the image `source` names into `out`.
pub fn flatten(
    source: &ImageSource,
    out: std::fs::File,
    opts: &FlattenOptions,
    progress: &dyn Fn(Progress),
) -> Result<Flattened, Error> {
    let mut src = source.open().map_err(|e| Error::Source {
        source_ref: source.to_string(),
        source: e,
    })?;
    flatten_source(src.as_mut(), out, opts, progress).map(|(_, f)| f)
}

/// The ext4 seed: from the diff_ids, so the filesystem depends on the
/// layer contents only.
fn seed(diff_ids: &[Digest]) -> [u8; 16] {
    let mut h = Hasher::new();
    h.update(b"lode-oci ext4 seed v1\n");
    for d in diff_ids {
        h.update(&d.0);
    }
    let d = h.finish();
    let mut s = [0u8; 16];
    s.copy_from_slice(&d.0[..16]);
    s
}

/// Flattens from any [`Source`] into any sink; returns the sink.
pub fn flatten_source<S: ImageSink>(
    source: &mut dyn Source,
    sink: S,
    opts: &FlattenOptions,
    progress: &dyn Fn(Progress),
) -> Result<(S, Flattened), Error> {
    let limits = &opts.limits;
    let resolved = source
        .resolve(&opts.platform, &limits.source)
        .map_err(|e| Error::Source {
            source_ref: source.describe(),
            source: e,
        })?;
    let got = Digest::of(&resolved.config);
    if got != resolved.config_digest {
        return Err(Error::ConfigDigest {
            digest: resolved.config_digest,
            got,
        });
    }
    let config: Config = serde_json::from_slice(&resolved.config).map_err(|e| Error::Config {
        digest: resolved.config_digest,
        detail: format!("invalid JSON: {e}"),
    })?;
    if config.rootfs.kind != "layers" {
        return Err(Error::Config {
            digest: resolved.config_digest,
            detail: format!("rootfs type {:?}, expected \"layers\"", config.rootfs.kind),
        });
    }
    let count = resolved.layers.len();
    if count > limits.max_layers {
        return Err(Error::TooManyLayers {
            count,
            cap: limits.max_layers,
        });
    }
    if config.rootfs.diff_ids.len() != count {
        return Err(Error::LayerCount {
            diff_ids: config.rootfs.diff_ids.len(),
            layers: count,
        });
    }
    progress(Progress::Resolved {
        image_digest: resolved.image_digest,
        layers: count,
    });

    let mut writer = Ext4Writer::new(
        sink,
        Options {
            chunk_size: opts.chunk_size,
            seed: seed(&config.rootfs.diff_ids),
            ..Options::default()
        },
    )?;
    let mut merger = Merger::new(limits.merge.clone());
    let mut budget = limits.max_uncompressed_bytes;
    let mut extents = 0;
    let mut file_bytes = 0;
    let mut infos = Vec::with_capacity(count);
    for (index, (layer, diff_id)) in resolved
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .enumerate()
    {
        progress(Progress::LayerStarted {
            index,
            count,
            layer: layer.to_string(),
            size: layer.size,
        });
        writer.begin_region()?;
        merger.begin_layer();
        let mut ctx = LayerCtx {
            index,
            layer,
            diff_id: *diff_id,
            limits,
            budget: &mut budget,
            extents: &mut extents,
            file_bytes: &mut file_bytes,
            progress,
        };
        let info = ctx.run(source, &mut writer, &mut merger)?;
        progress(Progress::LayerDone {
            index,
            entries: info.entries,
            uncompressed: info.uncompressed_bytes,
        });
        infos.push(info);
    }

    progress(Progress::Finishing);
    let tree = merger.into_flat().map_err(Error::Tree)?;
    let (sink, summary) = writer.finish_flat(&tree)?;
    for (info, region) in infos.iter_mut().zip(&summary.regions) {
        info.region = *region;
    }
    Ok((
        sink,
        Flattened {
            image_digest: resolved.image_digest,
            config_digest: resolved.config_digest,
            config: config.fields(),
            summary,
            layers: infos,
        },
    ))
}

/// Counts the compressed bytes read, for the expansion check.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Why the uncompressed stream stopped, carried inside an `io::Error`.
#[derive(Debug, thiserror::Error)]
enum StreamStop {
    #[error("decompressing: {0}")]
    Decode(io::Error),
    #[error("size cap")]
    TooLarge { cap: u64 },
    #[error("expansion cap")]
    Expansion {
        ratio: u64,
        compressed: u64,
        uncompressed: u64,
    },
}

/// The uncompressed tar stream: hashes it (diff_id) and enforces the size
/// and expansion caps.
struct Uncompressed<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
    /// Bytes this layer may have: what the image-wide cap has left.
    budget: u64,
    /// The image-wide cap, for the message.
    cap: u64,
    compressed: Rc<Cell<u64>>,
    ratio: u64,
    slack: u64,
    decoding: bool,
}

impl<R: Read> Read for Uncompressed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            // Passing the blob's own size limit, or plain I/O below a
            // decoder, is reported as it is; a decoder's complaint is tagged.
            Err(e) if self.decoding && limit_of(&e).is_none() => {
                return Err(io::Error::other(StreamStop::Decode(e)));
            }
            Err(e) => return Err(e),
        };
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.budget {
            return Err(io::Error::other(StreamStop::TooLarge { cap: self.cap }));
        }
        let compressed = self.compressed.get();
        if self.count > self.slack
            && self.count
                > compressed
                    .saturating_mul(self.ratio)
                    .saturating_add(self.slack)
        {
            return Err(io::Error::other(StreamStop::Expansion {
                ratio: self.ratio,
                compressed,
                uncompressed: self.count,
            }));
        }
        Ok(n)
    }
}

struct LayerCtx<'a> {
    index: usize,
    layer: &'a LayerRef,
    diff_id: Digest,
    limits: &'a Limits,
    /// Uncompressed bytes the image may still have.
    budget: &'a mut u64,
    /// File data extents held so far.
    extents: &'a mut u64,
    /// Regular-file bytes (holes included) taken so far.
    file_bytes: &'a mut u64,
    progress: &'a dyn Fn(Progress),
}

/// Why reading a layer stopped: a layer-level problem or a refused entry.
enum Stop {
    Layer(LayerError),
    Entry {
        path: Vec<u8>,
        offset: u64,
        source: MergeError,
    },
}

impl From<LayerError> for Stop {
    fn from(e: LayerError) -> Self {
        Self::Layer(e)
    }
}

/// Turns an I/O error from the layer stream into what it means.
fn classify(e: io::Error, compression: Compression, cap_ref: &LayerRef) -> LayerError {
    if let Some(limit) = limit_of(&e) {
        return LayerError::Size {
            expected: cap_ref.size.unwrap_or(limit),
            got: limit.saturating_add(1),
        };
    }
    if e.get_ref().is_some_and(|i| i.is::<StreamStop>()) {
        let stop = e
            .into_inner()
            .and_then(|i| i.downcast::<StreamStop>().ok())
            .expect("checked above");
        return match *stop {
            StreamStop::Decode(source) => LayerError::Decompress {
                compression,
                source,
            },
            StreamStop::TooLarge { cap } => LayerError::TooLarge { cap },
            StreamStop::Expansion {
                ratio,
                compressed,
                uncompressed,
            } => LayerError::Expansion {
                ratio,
                compressed,
                uncompressed,
            },
        };
    }
    LayerError::Read(e)
}

fn classify_tar(e: TarError, compression: Compression, layer: &LayerRef) -> LayerError {
    match e {
        TarError::Io { source, offset } => {
            let is_ours = limit_of(&source).is_some()
                || source.get_ref().is_some_and(|i| i.is::<StreamStop>());
            if is_ours {
                classify(source, compression, layer)
            } else {
                LayerError::Tar(TarError::Io { source, offset })
            }
        }
        other => LayerError::Tar(other),
    }
}

const PROGRESS_EVERY: u64 = 8 << 20;

impl LayerCtx<'_> {
    fn err(&self, source: LayerError) -> Error {
        Error::Layer {
            index: self.index,
            layer: self.layer.to_string(),
            source: Box::new(source),
        }
    }

    fn run<S: ImageSink>(
        &mut self,
        source: &mut dyn Source,
        writer: &mut Ext4Writer<S>,
        merger: &mut Merger<lode_ext4::FileData>,
    ) -> Result<LayerInfo, Error> {
        let declared = Compression::of_media_type(&self.layer.media_type)
            .map_err(|_| self.err(LayerError::MediaType(self.layer.media_type.clone())))?;
        let raw = source
            .open_layer(self.layer)
            .map_err(|e| self.err(LayerError::Open(e)))?;
        let compressed = Rc::new(Cell::new(0));
        let cap = self.layer.size.unwrap_or(u64::MAX);
        let mut blob = BufReader::with_capacity(
            256 << 10,
            HashingReader::new(
                Counting {
                    inner: raw,
                    count: compressed.clone(),
                },
                cap,
            ),
        );

        let result = self.read_tar(&mut blob, declared, compressed, writer, merger);

        // Read what is left of the blob, so its digest can be checked even
        // when the tar failed: a wrong blob is reported as that, not as
        // whatever garbage it decoded to.
        let drained = io::copy(&mut blob, &mut io::sink());
        let (digest, size) = blob.into_inner().finish();
        if let Some(expected) = self.layer.digest
            && digest != expected
        {
            return Err(self.err(LayerError::Digest { got: digest }));
        }
        if let Err(e) = drained {
            return Err(self.err(classify(e, Compression::None, self.layer)));
        }
        if let Some(expected) = self.layer.size
            && size != expected
        {
            return Err(self.err(LayerError::Size {
                expected,
                got: size,
            }));
        }
        let (mut info, diff_id) = match result {
            Ok(v) => v,
            Err(Stop::Layer(e)) => return Err(self.err(e)),
            Err(Stop::Entry {
                path,
                offset,
                source,
            }) => {
                return Err(Error::Entry {
                    index: self.index,
                    layer: self.layer.to_string(),
                    path: path.escape_ascii().to_string(),
                    offset,
                    source,
                });
            }
        };
        if diff_id != self.diff_id {
            return Err(self.err(LayerError::DiffId {
                expected: self.diff_id,
                got: diff_id,
            }));
        }
        *self.budget -= info.uncompressed_bytes;
        info.layer = self.layer.clone();
        Ok(info)
    }

    fn read_tar<B: BufRead, S: ImageSink>(
        &mut self,
        blob: &mut B,
        declared: Option<Compression>,
        compressed: Rc<Cell<u64>>,
        writer: &mut Ext4Writer<S>,
        merger: &mut Merger<lode_ext4::FileData>,
    ) -> Result<(LayerInfo, Digest), Stop> {
        let head = blob
            .fill_buf()
            .map_err(|e| classify(e, Compression::None, self.layer))?;
        let found = Compression::of_magic(head);
        if let Some(declared) = declared
            && declared != found
        {
            return Err(LayerError::CompressionMismatch {
                media_type: self.layer.media_type.clone(),
                declared,
                found,
            }
            .into());
        }
        let decoder: Box<dyn Read + '_> = match found {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(blob)
                    .map_err(|e| classify(e, found, self.layer))?,
            ),
        };
        let stream = Uncompressed {
            inner: decoder,
            hasher: Hasher::new(),
            count: 0,
            budget: *self.budget,
            cap: self.limits.max_uncompressed_bytes,
            compressed: compressed.clone(),
            ratio: self.limits.max_expansion_ratio,
            slack: self.limits.expansion_slack,
            decoding: found != Compression::None,
        };
        let mut tar = TarReader::new(Stream(stream), self.limits.tar.clone());
        let tar_err = |e: TarError| Stop::Layer(classify_tar(e, found, self.layer));
        let (mut entries, mut files) = (0u64, 0u64);
        let mut next_report = PROGRESS_EVERY;
        while let Some(e) = tar.next_entry().map_err(tar_err)? {
            entries += 1;
            if e.kind == EntryKind::Regular {
                *self.file_bytes = self.file_bytes.saturating_add(e.size);
                if *self.file_bytes > self.limits.max_file_bytes {
                    return Err(Stop::Layer(LayerError::TooMuchFileData {
                        path: e.path.escape_ascii().to_string(),
                        size: e.size,
                        cap: self.limits.max_file_bytes,
                    }));
                }
            }
            let mut runs = 0;
            let applied = merger.apply(&e, || {
                files += 1;
                let data = writer.append_file(&mut tar.content(), e.size)?;
                runs = data.extents();
                Ok(data)
            });
            match applied {
                Ok(()) => {
                    *self.extents += runs as u64;
                    if *self.extents > self.limits.max_extents {
                        return Err(Stop::Layer(LayerError::TooManyExtents {
                            path: e.path.escape_ascii().to_string(),
                            cap: self.limits.max_extents,
                        }));
                    }
                }
                Err(ApplyError::Merge(source)) => {
                    return Err(Stop::Entry {
                        path: e.path,
                        offset: e.offset,
                        source,
                    });
                }
                Err(ApplyError::Data(w)) => {
                    return Err(match tar.take_error() {
                        Some(te) => tar_err(te),
                        None => Stop::Layer(LayerError::Write {
                            path: e.path.escape_ascii().to_string(),
                            source: w,
                        }),
                    });
                }
            }
            if tar.position() >= next_report {
                next_report = tar.position() + PROGRESS_EVERY;
                (self.progress)(Progress::LayerBytes {
                    index: self.index,
                    compressed: compressed.get(),
                    uncompressed: tar.position(),
                });
            }
        }
        // The end-of-archive blocks and any padding after them count for
        // the diff_id.
        io::copy(tar.inner_mut(), &mut io::sink())
            .map_err(|e| Stop::Layer(classify(e, found, self.layer)))?;
        let Stream(stream) = tar.into_inner();
        let diff_id = stream.hasher.finish();
        let info = LayerInfo {
            layer: self.layer.clone(),
            diff_id,
            compression: found,
            region: Region {
                start: lode_ext4::BlockNo(0),
                end: lode_ext4::BlockNo(0),
            },
            entries,
            files,
            uncompressed_bytes: stream.count,
        };
        Ok((info, diff_id))
    }
}
