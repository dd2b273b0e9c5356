//! Copy-forward (docs/gc.md): every live manifest of a retired root is rebuilt in the
//! active root — each chunk fetched, checked against its name, decrypted with the old
//! manifest's key, sealed again under the active root's salt (new keys, new names) — and
//! its holders moved: tags by compare-and-swap, pins by pinning the new manifest before
//! unpinning the old. A forwarding record `roots/<old root>/forwards/<old id>` tells a
//! reader holding the old id where it went.
//!
//! Every step can be interrupted and the whole run repeated: a manifest with a
//! forwarding record is not copied again (only its holders are moved, which is
//! idempotent), a manifest whose holders have all moved is dead and skipped, and one
//! copied without a record yet is copied again (chunk names are convergent, so only a
//! dead duplicate manifest is left in the active root). Nothing is deleted.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use lode_format::{
    ChunkEntry, ChunkIndex, ChunkKey, Manifest, ManifestHeader, ManifestId, RootId, RootSalt,
};
use lode_kms::{Context, Kms};
use lode_store::{RootState, Store, StoreError};
use serde::Serialize;

use crate::{CONCURRENCY, ImageError, Liveness, failpoint};

/// One manifest copied forward.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Moved {
    /// Its id in the retired root.
    pub from: ManifestId,
    /// Its id in the active root.
    pub to: ManifestId,
    /// Tags moved to it.
    pub tags: Vec<String>,
    /// Whether its pin moved.
    pub pinned: bool,
    /// Whether an earlier, interrupted run had already copied it.
    pub resumed: bool,
}

/// What [`copy_forward`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForwardReport {
    /// The retired root.
    pub from: RootId,
    /// The active root.
    pub to: RootId,
    /// The manifests moved.
    pub moved: Vec<Moved>,
    /// Dead manifests left behind.
    pub dead: u64,
    /// Chunks sealed again and put into the active root (repeats counted).
    pub chunks: u64,
    /// Their plaintext bytes.
    pub bytes: u64,
}

/// Copies every live manifest of the retired root `from` into the active root.
pub async fn copy_forward(
    store: &Store,
    kms: &dyn Kms,
    key_id: &str,
    from: RootId,
) -> Result<ForwardReport, ImageError> {
    let live = Liveness::load(store).await?;
    copy_forward_with(store, kms, key_id, from, &live).await
}

/// [`copy_forward`] judging what is live by `live`, read by the caller (the collector,
/// which has read it already to decide whether anything needs copying).
pub async fn copy_forward_with(
    store: &Store,
    kms: &dyn Kms,
    key_id: &str,
    from: RootId,
    live: &Liveness,
) -> Result<ForwardReport, ImageError> {
    let old = store.get_root(from).await?;
    // An expired root is copied from too: a manifest found live there (a tag set by a
    // process that read the store before the rotation) must be moved before deletion.
    if !matches!(old.state, RootState::Retired | RootState::Expired) {
        return Err(ImageError::Invalid(format!(
            "root {from} of store {} is {}: only a retired or expired root is copied forward \
             (lode root rotate retires the active one)",
            store.label(),
            old.state
        )));
    }
    let active = store.active_root().await?.ok_or_else(|| {
        ImageError::Invalid(format!(
            "store {} has no active root to copy root {from} into; run `lode root rotate` to \
             finish the rotation",
            store.label()
        ))
    })?;
    let salt = kms
        .unwrap(&active.salt, &Context::root_salt(active.root))
        .await
        .map_err(|e| ImageError::Invalid(format!("root {}: its salt: {e}", active.root)))?;
    if let Some(first) = live.unreadable().first() {
        return Err(ImageError::Invalid(format!(
            "cannot tell what in root {from} is live: {first}; repair or remove it first"
        )));
    }
    let mut report = ForwardReport {
        from,
        to: active.root,
        moved: Vec::new(),
        dead: 0,
        chunks: 0,
        bytes: 0,
    };
    let mut ids = store.list_manifests(from).await?;
    ids.sort();
    for id in ids {
        let holders = live.holders(&id);
        if !holders.any() {
            report.dead += 1;
            continue;
        }
        let wrap = |source: ImageError| ImageError::Forward {
            root: from,
            id,
            source: Box::new(source),
        };
        let (to, resumed) = match store
            .get_forward(from, &id)
            .await
            .map_err(|e| wrap(e.into()))?
        {
            Some(to) => (to, true),
            None => {
                let to = copy_manifest(
                    store,
                    kms,
                    key_id,
                    from,
                    &id,
                    active.root,
                    &salt,
                    &mut report,
                )
                .await
                .map_err(wrap)?;
                failpoint::pause("copy-forward:after-manifest").await;
                store
                    .put_forward(from, &id, &to)
                    .await
                    .map_err(|e| wrap(e.into()))?;
                failpoint::pause("copy-forward:after-forward").await;
                (to, false)
            }
        };
        let mut moved = Moved {
            from: id,
            to,
            tags: Vec::new(),
            pinned: false,
            resumed,
        };
        for tag in &holders.tags {
            if move_tag(store, tag, &id, &to)
                .await
                .map_err(|e| wrap(e.into()))?
            {
                moved.tags.push(tag.clone());
            }
            failpoint::pause("copy-forward:after-tag").await;
        }
        if holders.pinned {
            store.put_pin(&to).await.map_err(|e| wrap(e.into()))?;
            match store.remove_pin(&id).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(wrap(e.into())),
            }
            moved.pinned = true;
        }
        report.moved.push(moved);
    }
    Ok(report)
}

/// Points `tag` from `old` to `new` by compare-and-swap; false if the tag names another
/// manifest now (re-pointed by someone else: theirs stands).
async fn move_tag(
    store: &Store,
    tag: &str,
    old: &ManifestId,
    new: &ManifestId,
) -> Result<bool, StoreError> {
    loop {
        let (now, version) = match store.get_tag_versioned(tag).await {
            Ok(v) => v,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if now != *old {
            return Ok(now == *new);
        }
        match store.update_tag(tag, new, &version).await {
            Ok(()) => return Ok(true),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Rebuilds manifest `id` of root `from` in root `to` under `salt`; returns the new id.
#[allow(clippy::too_many_arguments)]
async fn copy_manifest(
    store: &Store,
    kms: &dyn Kms,
    key_id: &str,
    from: RootId,
    id: &ManifestId,
    to: RootId,
    salt: &RootSalt,
    report: &mut ForwardReport,
) -> Result<ManifestId, ImageError> {
    let bytes = store.get_manifest(from, id).await?;
    let m = Manifest::parse(&bytes).map_err(|source| ImageError::Manifest { id: *id, source })?;
    let data_key = crate::unwrap_data_key(kms, id, from, &m).await?;
    let keys = m
        .open_keys(&data_key)
        .map_err(|source| ImageError::Manifest { id: *id, source })?;
    let header = m.header();
    let (cs, device_size) = (header.chunk_size, header.device_size);
    let (old_format, new_format) = (header.chunk_format, crate::new_chunk_format(cs));
    let salt = std::sync::Arc::new(salt.clone());
    let jobs: Vec<(ChunkIndex, lode_format::ChunkName, ChunkKey)> = m
        .chunks()
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let index = ChunkIndex(i as u64);
            e.name().map(|n| (index, *n, keys.get(index).cloned()))
        })
        .map(|(index, name, key)| {
            key.map(|k| (index, name, k))
                .ok_or(ImageError::MissingKey { id: *id, index })
        })
        .collect::<Result<_, _>>()?;
    let resealed: Vec<(ChunkIndex, lode_format::ChunkName, ChunkKey, usize)> =
        futures::stream::iter(jobs)
            .map(|(index, name, key)| {
                let salt = std::sync::Arc::clone(&salt);
                let id = *id;
                async move {
                    let expected = cs.len_of(index, device_size);
                    let ciphertext = store
                        .get_chunk(from, &name, old_format.object_len(expected))
                        .await?;
                    let sealed = tokio::task::spawn_blocking(move || {
                        let plain = crate::open_chunk_checked(
                            old_format,
                            id,
                            index,
                            &name,
                            &key,
                            &ciphertext,
                            expected,
                        )?;
                        new_format
                            .seal(&salt, plain)
                            .map_err(|e| ImageError::Invalid(e.to_string()))
                    })
                    .await
                    .map_err(|e| ImageError::Task(e.to_string()))??;
                    store
                        .put_chunk(to, &sealed.name, Bytes::from(sealed.ciphertext))
                        .await?;
                    Ok::<_, ImageError>((index, sealed.name, sealed.key, expected))
                }
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
    let mut entries = vec![ChunkEntry::Zero; m.chunks().len()];
    let mut new_keys = Vec::with_capacity(resealed.len());
    for (index, name, key, len) in resealed {
        let i = usize::try_from(index.0).map_err(|_| ImageError::Task("index".into()))?;
        entries[i] = ChunkEntry::Stored(name);
        new_keys.push(key);
        report.chunks += 1;
        report.bytes += len as u64;
    }
    // The chunks were resealed above in the format new chunks are written in, whatever
    // the old manifest held.
    let header = ManifestHeader {
        root: to,
        chunk_format: new_format,
        ..header.clone()
    };
    let binding = lode_format::binding_of(&header, &entries).map_err(ImageError::Build)?;
    let (data_key, wrapped) = kms
        .generate_data_key(key_id, &Context::manifest(to, &binding))
        .await?;
    let manifest = Manifest::seal(header, entries, &new_keys, &data_key, wrapped)
        .map_err(ImageError::Build)?;
    let (new, _) = store
        .put_manifest(to, Bytes::copy_from_slice(manifest.bytes()))
        .await?;
    Ok(new)
}
