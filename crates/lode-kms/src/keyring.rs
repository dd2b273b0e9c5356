//! The local keyring: a JSON file of named 256-bit keys, mode 0600, created on first use.
//!
//! ```json
//! {"version": 1, "default": "default", "keys": {"default": "<64 hex digits>"}}
//! ```
//!
//! A wrapped secret is `0x02 ‖ nonce (12 random bytes) ‖ AES-256-GCM(key, nonce,
//! secret, AAD = "lode-keyring-v2:" ‖ key name ‖ 0x00 ‖ canonical context) ‖ tag`: 61
//! bytes. The key name and the encryption context are bound in the AAD, so a blob cannot
//! be replayed as if made under another key or for another manifest or root. (The zero
//! byte ends the key name, which never holds one.) Blobs of version 1, made before
//! contexts, have AAD `"lode-keyring-v1:" ‖ key name`; they still unwrap, whatever the
//! context, so stores made then keep working; new blobs are always version 2. The file
//! is replaced atomically (write a temporary file, then rename or link), so a crash never
//! leaves half a keyring behind.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use lode_format::{Secret32, WrappedKey};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::{Context, Kms, KmsError};

/// The blob version written: the AAD binds the key name and the context.
const BLOB_V2: u8 = 2;
/// The blob version before contexts: the AAD binds the key name only.
const BLOB_V1: u8 = 1;
const BLOB_LEN: usize = 1 + NONCE_LEN + 32 + 16;
const DEFAULT_KEY: &str = "default";

#[derive(Serialize, Deserialize)]
struct KeyringFile {
    version: u32,
    default: String,
    keys: BTreeMap<String, String>,
}

/// A keyring file of named keys.
#[derive(Debug)]
pub struct Keyring {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    default: String,
    keys: BTreeMap<String, Secret32>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("default", &self.default)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Keyring {
    /// Opens the keyring at `path`, creating it with one random key named `default` if
    /// it does not exist.
    pub fn open_or_create(path: PathBuf) -> Result<Keyring, KmsError> {
        match fs::symlink_metadata(&path) {
            Ok(_) => Self::open(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Secret32::random().map_err(|_| KmsError::Random)?;
                let mut keys = BTreeMap::new();
                keys.insert(DEFAULT_KEY.to_owned(), key);
                let state = State {
                    default: DEFAULT_KEY.to_owned(),
                    keys,
                };
                match write_new(&path, &state) {
                    Ok(()) => Ok(Keyring {
                        path,
                        state: Mutex::new(state),
                    }),
                    // Another process created it first: use theirs.
                    Err(KmsError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        Self::open(path)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(source) => Err(KmsError::Io { path, source }),
        }
    }

    /// Opens an existing keyring.
    pub fn open(path: PathBuf) -> Result<Keyring, KmsError> {
        let io = |source| KmsError::Io {
            path: path.clone(),
            source,
        };
        let meta = fs::metadata(&path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KmsError::Exposed { path, mode });
        }
        let text = fs::read(&path).map_err(io)?;
        let corrupt = |reason: String| KmsError::Corrupt {
            path: path.clone(),
            reason,
        };
        let file: KeyringFile =
            serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if file.version != 1 {
            return Err(corrupt(format!("unknown version {}", file.version)));
        }
        let mut keys = BTreeMap::new();
        for (name, hex_key) in file.keys {
            if !valid_name(&name) {
                return Err(corrupt(format!("invalid key name {name:?}")));
            }
            let mut k = [0u8; 32];
            hex::decode_to_slice(&hex_key, &mut k)
                .map_err(|_| corrupt(format!("key {name:?} is not 64 hex digits")))?;
            keys.insert(name, Secret32::from_bytes(k));
        }
        if !keys.contains_key(&file.default) {
            return Err(corrupt(format!(
                "default key {:?} is not in the file",
                file.default
            )));
        }
        Ok(Keyring {
            path,
            state: Mutex::new(State {
                default: file.default,
                keys,
            }),
        })
    }

    /// The keyring file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of the keys, sorted.
    pub fn key_names(&self) -> Vec<String> {
        self.lock().keys.keys().cloned().collect()
    }

    /// Adds a new random key named `name`, and makes it the default if asked.
    pub fn create_key(&self, name: &str, make_default: bool) -> Result<(), KmsError> {
        if !valid_name(name) {
            return Err(KmsError::BadKeyName {
                key_id: name.to_owned(),
            });
        }
        let mut st = self.lock();
        if st.keys.contains_key(name) {
            return Err(KmsError::KeyExists {
                key_id: name.to_owned(),
                kms: self.describe(),
            });
        }
        let key = Secret32::random().map_err(|_| KmsError::Random)?;
        st.keys.insert(name.to_owned(), key);
        let old_default = st.default.clone();
        if make_default {
            st.default = name.to_owned();
        }
        if let Err(e) = replace(&self.path, &st) {
            st.keys.remove(name);
            st.default = old_default;
            return Err(e);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, key_id: &str) -> Result<LessSafeKey, KmsError> {
        let st = self.lock();
        let k = st.keys.get(key_id).ok_or_else(|| KmsError::UnknownKey {
            key_id: key_id.to_owned(),
            kms: self.describe(),
        })?;
        Ok(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, k.expose()).expect("32-byte key"),
        ))
    }
}

/// The associated data of a blob of `version`; version 1 ignores the context.
fn aad(version: u8, key_id: &str, context: &Context) -> Vec<u8> {
    if version == BLOB_V1 {
        let mut a = b"lode-keyring-v1:".to_vec();
        a.extend_from_slice(key_id.as_bytes());
        return a;
    }
    let mut a = b"lode-keyring-v2:".to_vec();
    a.extend_from_slice(key_id.as_bytes());
    a.push(0);
    a.extend_from_slice(&context.canonical());
    a
}

#[async_trait]
impl Kms for Keyring {
    fn describe(&self) -> String {
        format!("keyring {}", self.path.display())
    }

    fn default_key_id(&self) -> String {
        self.lock().default.clone()
    }

    async fn wrap(
        &self,
        key_id: &str,
        secret: &Secret32,
        context: &Context,
    ) -> Result<WrappedKey, KmsError> {
        let key = self.key(key_id)?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KmsError::Random)?;
        let mut buf = secret.expose().to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(BLOB_V2, key_id, context)),
                &mut buf,
            )
            .map_err(|_| KmsError::Random)?;
        let mut blob = Vec::with_capacity(BLOB_LEN);
        blob.push(BLOB_V2);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(tag.as_ref());
        Ok(WrappedKey {
            key_id: key_id.to_owned(),
            blob,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedKey, context: &Context) -> Result<Secret32, KmsError> {
        let key = self.key(&wrapped.key_id)?;
        let fail = || KmsError::Unwrap {
            key_id: wrapped.key_id.clone(),
            kms: self.describe(),
            context: context.clone(),
        };
        let b = &wrapped.blob;
        if b.len() != BLOB_LEN || !matches!(b[0], BLOB_V1 | BLOB_V2) {
            return Err(fail());
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[1..1 + NONCE_LEN]);
        let mut buf = b[1 + NONCE_LEN..].to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(b[0], &wrapped.key_id, context)),
                &mut buf,
            )
            .map_err(|_| fail())?;
        let mut out = [0u8; 32];
        out.copy_from_slice(plain);
        buf.iter_mut().for_each(|x| *x = 0);
        Ok(Secret32::from_bytes(out))
    }
}

fn serialize(path: &Path, st: &State) -> Result<Vec<u8>, KmsError> {
    let file = KeyringFile {
        version: 1,
        default: st.default.clone(),
        keys: st
            .keys
            .iter()
            .map(|(n, k)| (n.clone(), hex::encode(k.expose())))
            .collect(),
    };
    let mut text = serde_json::to_vec_pretty(&file).map_err(|e| KmsError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    text.push(b'\n');
    Ok(text)
}

/// Writes `st` to a fresh temporary file beside `path` (mode 0600 from the start).
fn write_temp(path: &Path, st: &State) -> Result<PathBuf, KmsError> {
    let io = |source| KmsError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("lode-tmp-{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&serialize(path, st)?)
        .and_then(|()| f.sync_all())
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io(e)
        })?;
    Ok(tmp)
}

/// Creates the keyring; fails with `AlreadyExists` if another process made it first.
fn write_new(path: &Path, st: &State) -> Result<(), KmsError> {
    let tmp = write_temp(path, st)?;
    let r = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    r.map_err(|source| KmsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Replaces the keyring atomically.
fn replace(path: &Path, st: &State) -> Result<(), KmsError> {
    let tmp = write_temp(path, st)?;
    fs::rename(&tmp, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        KmsError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lode_format::RootId;

    fn ctx() -> Context {
        Context::manifest(RootId(1), &[7; 32])
    }

    #[tokio::test]
    async fn created_on_first_use_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/keyring.json");
        let k = Keyring::open_or_create(path.clone()).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(k.key_names(), vec!["default".to_string()]);
        // Reopening gives the same key: a secret wrapped before unwraps after.
        let s = Secret32::from_bytes([5; 32]);
        let w = k.wrap("default", &s, &ctx()).await.unwrap();
        let k2 = Keyring::open_or_create(path).unwrap();
        assert_eq!(k2.unwrap(&w, &ctx()).await.unwrap(), s);
    }

    #[tokio::test]
    async fn another_keyring_cannot_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keyring::open_or_create(dir.path().join("a")).unwrap();
        let b = Keyring::open_or_create(dir.path().join("b")).unwrap();
        let w = a
            .wrap("default", &Secret32::from_bytes([1; 32]), &ctx())
            .await
            .unwrap();
        let err = b.unwrap(&w, &ctx()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot unwrap with KMS key \"default\" of keyring {}: the wrapped key does \
                 not unwrap under this key and context (lode:manifest={}, \
                 lode:purpose=manifest, lode:root=1); it is corrupt, or was made under \
                 another key or for something else",
                dir.path().join("b").display(),
                "07".repeat(32)
            )
        );
    }

    #[tokio::test]
    async fn tampered_blob_and_renamed_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::open_or_create(dir.path().join("k")).unwrap();
        k.create_key("other", false).unwrap();
        let w = k
            .wrap("default", &Secret32::from_bytes([1; 32]), &ctx())
            .await
            .unwrap();
        for i in 0..w.blob.len() {
            let mut bad = w.clone();
            bad.blob[i] ^= 1;
            assert!(
                k.unwrap(&bad, &ctx()).await.is_err(),
                "flip at {i} accepted"
            );
        }
        let mut moved = w.clone();
        moved.key_id = "other".into();
        assert!(matches!(
            k.unwrap(&moved, &ctx()).await,
            Err(KmsError::Unwrap { .. })
        ));
        moved.key_id = "nope".into();
        assert!(matches!(
            k.unwrap(&moved, &ctx()).await,
            Err(KmsError::UnknownKey { .. })
        ));
    }

    #[test]
    fn exposed_and_corrupt_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        Keyring::open_or_create(path.clone()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keyring::open(path.clone()).unwrap_err();
        assert!(err.to_string().contains("has mode 644"), "{err}");
        fs::write(&path, b"{not json").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = Keyring::open(path.clone()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("keyring {} is corrupt", path.display())),
            "{err}"
        );
    }

    #[test]
    fn key_names_are_checked_and_unique() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::open_or_create(dir.path().join("k")).unwrap();
        assert!(matches!(
            k.create_key("a/b", false),
            Err(KmsError::BadKeyName { .. })
        ));
        k.create_key("tenant-a", false).unwrap();
        assert!(matches!(
            k.create_key("tenant-a", false),
            Err(KmsError::KeyExists { .. })
        ));
        let again = Keyring::open(dir.path().join("k")).unwrap();
        assert_eq!(again.key_names(), vec!["default", "tenant-a"]);
    }

    #[tokio::test]
    async fn a_blob_unwraps_only_under_its_context() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::open_or_create(dir.path().join("k")).unwrap();
        let s = Secret32::from_bytes([4; 32]);
        let a = Context::manifest(RootId(1), &[1; 32]);
        let w = k.wrap("default", &s, &a).await.unwrap();
        assert_eq!(w.blob[0], 2);
        assert_eq!(w.blob.len(), BLOB_LEN);
        assert_eq!(k.unwrap(&w, &a).await.unwrap(), s);
        for other in [
            Context::manifest(RootId(1), &[2; 32]),
            Context::manifest(RootId(2), &[1; 32]),
            Context::root_salt(RootId(1)),
        ] {
            let err = k.unwrap(&w, &other).await.unwrap_err();
            assert!(
                err.to_string().contains(&format!(
                    "does not unwrap under this key and context ({other})"
                )),
                "{err}"
            );
        }
    }

    /// A version-1 blob, made before contexts, as the keyring then made it: it unwraps
    /// under any context, so stores made then keep working.
    #[tokio::test]
    async fn version_1_blobs_still_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = [0x11u8; 32];
        let file = format!(
            "{{\"version\": 1, \"default\": \"default\", \"keys\": {{\"default\": \"{}\"}}}}",
            hex::encode(key)
        );
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(file.as_bytes())
            .unwrap();
        let k = Keyring::open(path).unwrap();

        let nonce = [0x22u8; NONCE_LEN];
        let mut buf = [0x33u8; 32].to_vec();
        let tag = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap())
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(b"lode-keyring-v1:default"),
                &mut buf,
            )
            .unwrap();
        let mut blob = vec![1u8];
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(tag.as_ref());
        let v1 = WrappedKey {
            key_id: "default".into(),
            blob,
        };
        for c in [ctx(), Context::root_salt(RootId(9))] {
            assert_eq!(
                k.unwrap(&v1, &c).await.unwrap(),
                Secret32::from_bytes([0x33; 32])
            );
        }
        // The version byte is bound too: the same bytes as version 2 do not open.
        let mut as_v2 = v1.clone();
        as_v2.blob[0] = 2;
        assert!(matches!(
            k.unwrap(&as_v2, &ctx()).await,
            Err(KmsError::Unwrap { .. })
        ));
        let mut v3 = v1;
        v3.blob[0] = 3;
        assert!(k.unwrap(&v3, &ctx()).await.is_err());
    }
}
