//! Naming an image: a tag, or a manifest id (64 hex digits, which wins over a tag of the
//! same spelling), resolved to a parsed manifest and, when asked, its key table.

use lode_format::{KeyTable, Manifest, ManifestId, RootId};
use lode_kms::Kms;
use lode_store::Store;

use crate::ImageError;

/// A manifest fetched from the store, checked against its id and parsed.
#[derive(Debug)]
pub struct OpenedImage {
    /// The manifest's id.
    pub id: ManifestId,
    /// The root it was found under.
    pub root: RootId,
    /// The manifest.
    pub manifest: Manifest,
    /// Its key table, when it was opened with a KMS.
    pub keys: Option<KeyTable>,
}

/// Resolves `reference` (a tag or a manifest id) to a manifest id.
pub async fn resolve(store: &Store, reference: &str) -> Result<ManifestId, ImageError> {
    if let Ok(id) = reference.parse::<ManifestId>() {
        return Ok(id);
    }
    Ok(store.get_tag(reference).await?)
}

/// Fetches and parses the manifest `reference` names; with a KMS, also unwraps its data
/// key and authenticates the whole manifest.
pub async fn open_image(
    store: &Store,
    kms: Option<&dyn Kms>,
    reference: &str,
) -> Result<OpenedImage, ImageError> {
    let id = resolve(store, reference).await?;
    let (root, bytes) = store.find_manifest(&id).await?;
    let manifest = Manifest::parse(&bytes).map_err(|source| ImageError::Manifest { id, source })?;
    let keys = match kms {
        None => None,
        Some(kms) => {
            let data_key = kms.unwrap(manifest.wrapped_key()).await.map_err(|source| {
                match source {
                    // The key id is part of the manifest: a name the KMS lacks means a
                    // damaged manifest or one made under another KMS.
                    lode_kms::KmsError::UnknownKey { key_id, kms } => ImageError::Invalid(format!(
                        "manifest {id} names KMS key {key_id:?}, which {kms} lacks: the \
                         manifest is corrupt or was made under another key"
                    )),
                    source => ImageError::ManifestKey { id, source },
                }
            })?;
            Some(
                manifest
                    .open_keys(&data_key)
                    .map_err(|source| ImageError::Manifest { id, source })?,
            )
        }
    };
    Ok(OpenedImage {
        id,
        root,
        manifest,
        keys,
    })
}
