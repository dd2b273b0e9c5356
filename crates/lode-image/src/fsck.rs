//! `lode store fsck`: a consistency check of a whole store that reads only what garbage
//! collection reads (listings, tags, root records, manifests' clear chunk tables), and
//! reclaims what a killed writer left behind.
//!
//! - Staging files (`<object>#<n>` in a local store, written before an object is
//!   published by rename or link) older than a safe age are removed; younger ones may
//!   belong to a writer still running and are left alone.
//! - Every tag, root record and manifest is read (bounded) and parsed; every object under
//!   a content-addressed prefix must be named like one. Each fault is reported by name.
//!
//! Chunk contents are not read here: `lode verify` checks an image's chunks, and with
//! `--repair` removes damaged ones.

use std::time::{Duration, SystemTime};

use lode_format::{Manifest, RootId};
use lode_store::Store;
use serde::Serialize;

use crate::ImageError;

/// How [`fsck`] runs.
#[derive(Clone, Copy, Debug)]
pub struct FsckOptions {
    /// Report staging files without removing them.
    pub dry_run: bool,
    /// Staging files younger than this are left alone: a writer may still be using them.
    pub staging_min_age: Duration,
}

impl Default for FsckOptions {
    fn default() -> Self {
        FsckOptions {
            dry_run: false,
            staging_min_age: DEFAULT_STAGING_MIN_AGE,
        }
    }
}

/// Staging files older than this belong to no running writer: a put writes one chunk
/// (at most 64 MiB) into it and publishes it at once.
pub const DEFAULT_STAGING_MIN_AGE: Duration = Duration::from_secs(3600);

/// One fault [`fsck`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// A staging file a writer left behind, old enough to be stale (removed unless
    /// `dry_run`).
    StagingFile {
        /// Its key in the store.
        object: String,
        /// Its size.
        bytes: u64,
        /// Seconds since it was last written.
        age_secs: u64,
        /// Whether fsck removed it.
        removed: bool,
    },
    /// A tag that cannot be read.
    Tag {
        /// The tag.
        tag: String,
        /// Why.
        detail: String,
    },
    /// A pin object that cannot be read or holds another manifest's id.
    Pin {
        /// Its key in the store.
        object: String,
        /// Why.
        detail: String,
    },
    /// A root record that cannot be read, or a root's listing holds stray objects.
    Root {
        /// The root.
        root: RootId,
        /// Why.
        detail: String,
    },
    /// A manifest that cannot be read or parsed.
    Manifest {
        /// The root it is under.
        root: RootId,
        /// Its id.
        id: lode_format::ManifestId,
        /// Why.
        detail: String,
    },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::StagingFile {
                object,
                bytes,
                age_secs,
                removed,
            } => write!(
                f,
                "staging file {object} ({bytes} bytes, {age_secs} s old) left by a killed \
                 writer{}",
                if *removed { ": removed" } else { "" }
            ),
            Fault::Tag { detail, .. } | Fault::Pin { detail, .. } => write!(f, "{detail}"),
            Fault::Root { root, detail } => write!(f, "root {root}: {detail}"),
            Fault::Manifest { root, id, detail } => {
                write!(f, "manifest {id} in root {root}: {detail}")
            }
        }
    }
}

/// What [`fsck`] found and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    /// Where the store is.
    pub store: String,
    /// Tags read.
    pub tags_checked: u64,
    /// Root records read.
    pub roots_checked: u64,
    /// Manifests read and parsed.
    pub manifests_checked: u64,
    /// Chunk objects listed.
    pub chunks_listed: u64,
    /// Staging files removed.
    pub staging_removed: u64,
    /// Staging files left because they are younger than the safe age.
    pub staging_young: u64,
    /// Every fault, staging files first.
    pub faults: Vec<Fault>,
}

impl FsckReport {
    /// True when nothing is wrong now: every fault found was a staging file, and it was
    /// removed.
    pub fn ok(&self) -> bool {
        self.faults
            .iter()
            .all(|f| matches!(f, Fault::StagingFile { removed: true, .. }))
    }
}

/// Checks `store` and reclaims stale staging files (see the module doc).
pub async fn fsck(store: &Store, opts: FsckOptions) -> Result<FsckReport, ImageError> {
    let mut report = FsckReport {
        store: store.label().to_owned(),
        ..Default::default()
    };
    let now = SystemTime::now();
    for s in store.staging_files().await? {
        let age = now.duration_since(s.modified).unwrap_or_default();
        if age < opts.staging_min_age {
            report.staging_young += 1;
            continue;
        }
        if !opts.dry_run {
            store.remove_staging(&s.key).await?;
            report.staging_removed += 1;
        }
        report.faults.push(Fault::StagingFile {
            object: s.key,
            bytes: s.size,
            age_secs: age.as_secs(),
            removed: !opts.dry_run,
        });
    }

    let tags = store.list_tags().await?;
    report.tags_checked = (tags.tags.len() + tags.bad.len()) as u64;
    for b in tags.bad {
        report.faults.push(Fault::Tag {
            tag: b.tag,
            detail: b.error.to_string(),
        });
    }

    let pins = store.list_pins().await?;
    for b in pins.bad {
        report.faults.push(Fault::Pin {
            object: b.object,
            detail: b.error.to_string(),
        });
    }

    for root in store.root_ids().await? {
        report.roots_checked += 1;
        let fault = |detail: String| Fault::Root { root, detail };
        let record = store.get_root(root).await;
        let chunks = match store.list_chunks(root).await {
            Ok(c) => c.len(),
            Err(e) => {
                report.faults.push(fault(e.to_string()));
                0
            }
        };
        report.chunks_listed += chunks as u64;
        let ids = match store.list_manifests(root).await {
            Ok(ids) => ids,
            Err(e) => {
                report.faults.push(fault(e.to_string()));
                Vec::new()
            }
        };
        match record {
            Ok(_) => {}
            // A directory with nothing in it is what a first import killed before its
            // ROOT was published leaves (with a staging file, removed above): no fault.
            Err(lode_store::StoreError::NotFound { .. }) if chunks == 0 && ids.is_empty() => {}
            Err(lode_store::StoreError::NotFound { .. }) => report.faults.push(fault(format!(
                "it holds {chunks} chunk(s) and {} manifest(s) but no ROOT record",
                ids.len()
            ))),
            Err(e) => report.faults.push(fault(e.to_string())),
        }
        for id in ids {
            report.manifests_checked += 1;
            let detail = match store.get_manifest(root, &id).await {
                Ok(bytes) => match Manifest::parse(&bytes) {
                    Ok(_) => continue,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            report.faults.push(Fault::Manifest { root, id, detail });
        }
    }
    Ok(report)
}
