//! The local keyring: a JSON file of named 256-bit keys, mode 0600, created on first use.
//!
//! ```json
//! {"version": 1, "default": "default", "keys": {"default": "<64 hex digits>"}}
//! ```
//!
//! A wrapped secret is `0x01 ‖ nonce (12 random bytes) ‖ AES-256-GCM(key, nonce,
//! secret, AAD = "lode-keyring-v1:" ‖ key name) ‖ tag`: 61 bytes. The key name is bound in
//! the AAD, so a blob cannot be replayed as if made under another key. The file is
//! replaced atomically (write a temporary file, then rename or link), so a crash never
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

use crate::{Kms, KmsError};

const BLOB_VERSION: u8 = 1;
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

fn aad(key_id: &str) -> Vec<u8> {
    let mut a = b"lode-keyring-v1:".to_vec();
    a.extend_from_slice(key_id.as_bytes());
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

    async fn wrap(&self, key_id: &str, secret: &Secret32) -> Result<WrappedKey, KmsError> {
        let key = self.key(key_id)?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KmsError::Random)?;
        let mut buf = secret.expose().to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(key_id)),
                &mut buf,
            )
            .map_err(|_| KmsError::Random)?;
        let mut blob = Vec::with_capacity(BLOB_LEN);
        blob.push(BLOB_VERSION);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(tag.as_ref());
        Ok(WrappedKey {
            key_id: key_id.to_owned(),
            blob,
        })
    }

    async fn unwrap(&self, wrapped: &WrappedKey) -> Result<Secret32, KmsError> {
        let key = self.key(&wrapped.key_id)?;
        let fail = || KmsError::Unwrap {
            key_id: wrapped.key_id.clone(),
            kms: self.describe(),
        };
        let b = &wrapped.blob;
        if b.len() != BLOB_LEN || b[0] != BLOB_VERSION {
            return Err(fail());
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[1..1 + NONCE_LEN]);
        let mut buf = b[1 + NONCE_LEN..].to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&wrapped.key_id)),
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
        let w = k.wrap("default", &s).await.unwrap();
        let k2 = Keyring::open_or_create(path).unwrap();
        assert_eq!(k2.unwrap(&w).await.unwrap(), s);
    }

    #[tokio::test]
    async fn another_keyring_cannot_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keyring::open_or_create(dir.path().join("a")).unwrap();
        let b = Keyring::open_or_create(dir.path().join("b")).unwrap();
        let w = a
            .wrap("default", &Secret32::from_bytes([1; 32]))
            .await
            .unwrap();
        let err = b.unwrap(&w).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot unwrap with KMS key \"default\" of keyring {}: the wrapped key is \
                 corrupt or was made under another key",
                dir.path().join("b").display()
            )
        );
    }

    #[tokio::test]
    async fn tampered_blob_and_renamed_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::open_or_create(dir.path().join("k")).unwrap();
        k.create_key("other", false).unwrap();
        let w = k
            .wrap("default", &Secret32::from_bytes([1; 32]))
            .await
            .unwrap();
        for i in 0..w.blob.len() {
            let mut bad = w.clone();
            bad.blob[i] ^= 1;
            assert!(k.unwrap(&bad).await.is_err(), "flip at {i} accepted");
        }
        let mut moved = w.clone();
        moved.key_id = "other".into();
        assert!(matches!(
            k.unwrap(&moved).await,
            Err(KmsError::Unwrap { .. })
        ));
        moved.key_id = "nope".into();
        assert!(matches!(
            k.unwrap(&moved).await,
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
}
