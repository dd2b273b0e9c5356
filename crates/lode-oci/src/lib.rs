//! lode's flattener: OCI images into deterministic, dedup-friendly ext4
//! images.
//!
//! Where this fits: docs/architecture.md, "The flow of an image".
//!
//! This is the first step of lode's flow (docs/flatten.md): an image (an OCI layout
//! directory or a docker-archive tarball, through the [`Source`] trait; a registry
//! image is first pulled into a layout by lode-registry) is read layer by layer, every blob checked
//! against its digest and every layer against its diff_id, the layers
//! merged with OCI semantics (whiteouts, opaque directories, hardlinks
//! across layers), and the result written by [`lode_ext4`] with one data
//! region per layer, so images that share a base layer share its chunks.
//!
//! ```no_run
//! use lode_oci::{flatten, FlattenOptions, ImageSource};
//!
//! let source: ImageSource = "oci:/images/app:latest".parse()?;
//! let out = std::fs::File::create("/tmp/app.ext4")?;
//! let done = flatten(&source, out, &FlattenOptions::default(), &|p| eprintln!("{p:?}"))?;
//! println!("{} -> {} bytes", done.image_digest, done.summary.image_size);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Untrusted bytes enter in [`tar`] (tar headers) and [`spec`] (JSON); both
//! cap what they hold. Every cap is in [`Limits`].

pub mod digest;
pub mod flatten;
pub mod merge;
pub mod sample;
pub mod source;
pub mod spec;
pub mod tar;

pub use digest::Digest;
pub use flatten::{
    Error, FlattenOptions, Flattened, LayerError, LayerInfo, Limits, Progress, flatten,
    flatten_source,
};
pub use merge::{MergeError, MergeLimits};
pub use source::{
    DockerArchive, ImageSource, LayerRef, OciLayout, Resolved, Source, SourceError, SourceLimits,
};
pub use spec::{Compression, ImageConfigFields, Platform};
pub use tar::{TarError, TarLimits};
