//! Naming an image: a tag, or a manifest id (64 hex digits, which wins over a tag of the
//! same spelling), resolved to a parsed manifest and, when asked, its key table: what a
//! reader does before an [`ImageDevice`](crate::ImageDevice) can read the image.

use lode_format::{DataKey, KeyTable, Manifest, ManifestId, RootId};
use lode_kms::{Context, Kms};
use lode_store::Store;

use crate::OpenError;

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
pub async fn resolve(store: &Store, reference: &str) -> Result<ManifestId, OpenError> {
    if let Ok(id) = reference.parse::<ManifestId>() {
        return Ok(id);
    }
    Ok(store.get_tag(reference).await?)
}

/// Where the data key that opens a manifest's key table comes from: the KMS itself, for a
/// process that may unwrap (a single host, the control service), or a grant from the
/// control service, for a worker that holds no KMS credentials.
#[async_trait::async_trait]
pub trait KeySource: Send + Sync + std::fmt::Debug {
    /// The data key of manifest `id`, found under `root`.
    async fn data_key(
        &self,
        id: &ManifestId,
        root: RootId,
        manifest: &Manifest,
    ) -> Result<DataKey, OpenError>;
}

/// A [`KeySource`] that unwraps with a KMS.
#[derive(Debug, Clone)]
pub struct KmsKeys(pub std::sync::Arc<dyn Kms>);

#[async_trait::async_trait]
impl KeySource for KmsKeys {
    async fn data_key(
        &self,
        id: &ManifestId,
        root: RootId,
        manifest: &Manifest,
    ) -> Result<DataKey, OpenError> {
        unwrap_data_key(self.0.as_ref(), id, root, manifest).await
    }
}

/// Unwraps manifest `id`'s data key with `kms`: the one place a manifest's wrapped key
/// meets a KMS.
pub async fn unwrap_data_key(
    kms: &dyn Kms,
    id: &ManifestId,
    root: RootId,
    manifest: &Manifest,
) -> Result<DataKey, OpenError> {
    let context = Context::manifest(root, &manifest.binding());
    kms.unwrap(manifest.wrapped_key(), &context)
        .await
        .map_err(|source| match source {
            // The key id is part of the manifest: a name the KMS lacks means a
            // damaged manifest or one made under another KMS.
            lode_kms::KmsError::UnknownKey { key_id, kms } => OpenError::Invalid(format!(
                "manifest {id} names KMS key {key_id:?}, which {kms} lacks: the \
                 manifest is corrupt or was made under another key"
            )),
            source => OpenError::ManifestKey { id: *id, source },
        })
}

/// Fetches and parses the manifest `reference` names; with a KMS, also unwraps its data
/// key and authenticates the whole manifest.
pub async fn open_image(
    store: &Store,
    kms: Option<&dyn Kms>,
    reference: &str,
) -> Result<OpenedImage, OpenError> {
    let mut opened = open_image_with(store, None, reference).await?;
    if let Some(kms) = kms {
        let data_key = unwrap_data_key(kms, &opened.id, opened.root, &opened.manifest).await?;
        opened.keys = Some(open_keys(&opened, &data_key)?);
    }
    Ok(opened)
}

/// [`open_image`] with the data key from any [`KeySource`].
pub async fn open_image_with(
    store: &Store,
    keys: Option<&dyn KeySource>,
    reference: &str,
) -> Result<OpenedImage, OpenError> {
    let id = resolve(store, reference).await?;
    let (root, bytes) = store.find_manifest(&id).await?;
    let manifest = Manifest::parse(&bytes).map_err(|source| OpenError::Manifest { id, source })?;
    let mut opened = OpenedImage {
        id,
        root,
        manifest,
        keys: None,
    };
    if let Some(keys) = keys {
        let data_key = keys.data_key(&id, root, &opened.manifest).await?;
        opened.keys = Some(open_keys(&opened, &data_key)?);
    }
    Ok(opened)
}

fn open_keys(opened: &OpenedImage, data_key: &DataKey) -> Result<KeyTable, OpenError> {
    opened
        .manifest
        .open_keys(data_key)
        .map_err(|source| OpenError::Manifest {
            id: opened.id,
            source,
        })
}
