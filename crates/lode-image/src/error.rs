use std::path::PathBuf;

use lode_format::{ChunkIndex, ManifestError, ManifestId};
use lode_kms::KmsError;
use lode_store::StoreError;
use thiserror::Error;

/// An image operation failed. Each variant names the file, manifest or chunk at fault.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The KMS failed or refused.
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// A local file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A manifest could not be built, parsed or opened.
    #[error("manifest {id}: {source}")]
    Manifest {
        /// The manifest's id (or the id its bytes hash to).
        id: ManifestId,
        /// What is wrong.
        source: ManifestError,
    },
    /// A manifest's data key could not be unwrapped.
    #[error("manifest {id}: {source}")]
    ManifestKey {
        /// The manifest.
        id: ManifestId,
        /// What the KMS said.
        source: KmsError,
    },
    /// A manifest's data key was not granted by the control service (or the grant was
    /// malformed).
    #[error("manifest {id}: {reason}")]
    KeyGrant {
        /// The manifest.
        id: ManifestId,
        /// Who refused what, and why.
        reason: String,
    },
    /// A manifest could not be built.
    #[error(transparent)]
    Build(ManifestError),
    /// A chunk failed its checks.
    #[error("chunk {index} of manifest {id}: {source}")]
    Chunk {
        /// The manifest being read.
        id: ManifestId,
        /// The chunk's index in it.
        index: ChunkIndex,
        /// What is wrong.
        source: lode_format::ObjectError,
    },
    /// A chunk decrypted to the wrong number of bytes.
    #[error(
        "chunk {index} of manifest {id} decrypted to {got} bytes, the manifest says {expected}"
    )]
    ChunkLength {
        /// The manifest being read.
        id: ManifestId,
        /// The chunk's index in it.
        index: ChunkIndex,
        /// What the manifest implies.
        expected: usize,
        /// What decryption gave.
        got: usize,
    },
    /// A manifest that lists a chunk it has no key for (only a corrupt key table can).
    #[error("manifest {id} has no key for chunk {index}")]
    MissingKey {
        /// The manifest.
        id: ManifestId,
        /// The chunk.
        index: ChunkIndex,
    },
    /// A manifest is live, or cannot be proven dead.
    #[error(transparent)]
    Live(#[from] crate::live::LiveError),
    /// Copying a manifest forward failed; nothing was deleted.
    #[error("copying manifest {id} of root {root} forward: {source}")]
    Forward {
        /// The retired root.
        root: lode_format::RootId,
        /// The manifest.
        id: ManifestId,
        /// What went wrong, naming the chunk where one is at fault.
        source: Box<ImageError>,
    },
    /// A worker task died (a bug, reported rather than hidden).
    #[error("internal task failed: {0}")]
    Task(String),
    /// The OCI image could not be flattened.
    #[error("flattening {image}: {source}")]
    Flatten {
        /// The source as the user named it.
        image: String,
        /// What went wrong, naming the layer and entry.
        source: Box<lode_oci::Error>,
    },
    /// A registry image could not be pulled.
    #[error("pulling {image}: {source}")]
    Pull {
        /// The reference as the user named it.
        image: String,
        /// What the registry or the layout said.
        source: Box<lode_registry::Error>,
    },
    /// An option a caller gave is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl From<lode_read::OpenError> for ImageError {
    /// Each way opening an image fails becomes the variant of the same name and message
    /// here, so an `ImageError` reads and matches alike whatever step failed.
    fn from(e: lode_read::OpenError) -> Self {
        use lode_read::OpenError;
        match e {
            OpenError::Store(e) => ImageError::Store(e),
            OpenError::Manifest { id, source } => ImageError::Manifest { id, source },
            OpenError::ManifestKey { id, source } => ImageError::ManifestKey { id, source },
            OpenError::KeyGrant { id, reason } => ImageError::KeyGrant { id, reason },
            OpenError::Invalid(message) => ImageError::Invalid(message),
        }
    }
}

pub(crate) fn io(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_owned();
    move |source| ImageError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use lode_format::ManifestError;
    use lode_read::OpenError;

    use super::*;

    #[test]
    fn an_open_error_becomes_the_image_error_of_the_same_name_and_message() {
        let id = ManifestId::from_bytes([7; 32]);
        let store = || StoreError::NotFound {
            store: "file:///s".into(),
            what: "tag",
            key: "\"app\"".into(),
        };
        let manifest = || ManifestError::TooLarge { len: 9, max: 8 };
        type IsSame = fn(&ImageError) -> bool;
        let cases: [(OpenError, IsSame); 5] = [
            (OpenError::Store(store()), |e| {
                matches!(e, ImageError::Store(_))
            }),
            (
                OpenError::Manifest {
                    id,
                    source: manifest(),
                },
                |e| matches!(e, ImageError::Manifest { .. }),
            ),
            (
                OpenError::ManifestKey {
                    id,
                    source: KmsError::Random,
                },
                |e| matches!(e, ImageError::ManifestKey { .. }),
            ),
            (
                OpenError::KeyGrant {
                    id,
                    reason: "refused".into(),
                },
                |e| matches!(e, ImageError::KeyGrant { .. }),
            ),
            (OpenError::Invalid("names a key".into()), |e| {
                matches!(e, ImageError::Invalid(_))
            }),
        ];
        for (open, is_same) in cases {
            let message = open.to_string();
            let image = ImageError::from(open);
            assert!(is_same(&image), "{image:?}");
            assert_eq!(image.to_string(), message);
        }
        assert_eq!(
            ImageError::from(OpenError::Store(store())).to_string(),
            "tag \"app\" is not in store file:///s"
        );
        assert_eq!(
            ImageError::from(OpenError::KeyGrant {
                id,
                reason: "refused".into()
            })
            .to_string(),
            format!("manifest {id}: refused")
        );
    }
}
