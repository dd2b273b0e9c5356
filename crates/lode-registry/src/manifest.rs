//! Manifests and image indexes as they come off the wire: the one place their untrusted
//! bytes are parsed. [`parse`] takes the raw body (already size-capped and digest-checked by
//! the caller) and returns typed descriptors with validated sha256 digests, so nothing
//! downstream handles a digest string that could name a path outside `blobs/sha256/`.
//!
//! OCI and Docker schema2 media types are both accepted; the bytes are stored unchanged, so
//! the digest the layout records is the digest the registry serves.

use std::fmt;

use serde::Deserialize;

/// Largest manifest or index accepted, in bytes. Real ones are a few KiB; a 4 MiB one is an
/// attack or a mistake.
pub(crate) const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most layers (or index entries) accepted in one manifest.
const MAX_ENTRIES: usize = 4096;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Every manifest kind this crate can pull, for the `Accept` header.
pub(crate) const ACCEPTED: &[&str] = &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

/// A sha256 content digest, `sha256:` and 64 lowercase hex digits. Its hex part is safe to
/// use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    /// Checks `s` is `sha256:` followed by 64 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(format!(
                "digest {s:?} is not sha256 (the only algorithm supported)"
            ));
        };
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!(
                "digest {s:?} is not 64 lowercase hex digits after sha256:"
            ));
        }
        Ok(Digest(s.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest::from_sha256(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    pub(crate) fn from_sha256(sum: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(sum)))
    }

    /// The hex part: the blob's file name under `blobs/sha256/`.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The whole digest, `sha256:…`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An operating system / architecture pair (and optional variant) to choose from an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`, …
    pub os: String,
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `v8`, `v7`, …; `None` matches any.
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".to_owned(),
            architecture: "amd64".to_owned(),
            variant: None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// A checked content descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub(crate) media_type: String,
    pub(crate) digest: Digest,
    pub(crate) size: u64,
}

/// A parsed manifest body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Manifest {
    /// A single-platform image manifest (OCI or Docker schema2).
    Image {
        media_type: String,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    /// An OCI image index or Docker manifest list.
    Index {
        entries: Vec<(Descriptor, Option<Platform>)>,
    },
}

impl Manifest {
    /// The index entry for `want`, or the platforms on offer.
    pub(crate) fn select(
        entries: &[(Descriptor, Option<Platform>)],
        want: &Platform,
    ) -> Result<Descriptor, String> {
        entries
            .iter()
            .find(|(_, p)| {
                p.as_ref().is_some_and(|p| {
                    p.os == want.os
                        && p.architecture == want.architecture
                        && (want.variant.is_none() || p.variant == want.variant)
                })
            })
            .map(|(d, _)| d.clone())
            .ok_or_else(|| {
                let list: Vec<String> = entries
                    .iter()
                    .map(|(_, p)| p.as_ref().map_or("(none)".to_owned(), Platform::to_string))
                    .collect();
                if list.is_empty() {
                    "nothing".to_owned()
                } else {
                    list.join(", ")
                }
            })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: i64,
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: i64,
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
}

fn descriptor(raw: RawDescriptor, default_media_type: &str) -> Result<Descriptor, String> {
    let digest = Digest::parse(&raw.digest)?;
    let size = u64::try_from(raw.size)
        .map_err(|_| format!("descriptor {digest} has negative size {}", raw.size))?;
    Ok(Descriptor {
        media_type: raw
            .media_type
            .unwrap_or_else(|| default_media_type.to_owned()),
        digest,
        size,
    })
}

/// Parses a manifest or index body. `content_type` is the media type the registry claimed,
/// used only when the body does not carry its own `mediaType` field.
pub(crate) fn parse(body: &[u8], content_type: Option<&str>) -> Result<Manifest, String> {
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_MANIFEST_BYTES}-byte cap",
            body.len()
        ));
    }
    let raw: RawManifest =
        serde_json::from_slice(body).map_err(|e| format!("not a manifest: {e}"))?;
    if raw.schema_version != 2 {
        return Err(format!(
            "schemaVersion {} is not supported (only 2)",
            raw.schema_version
        ));
    }
    let media_type = match (raw.media_type.as_deref(), content_type) {
        (Some(m), _) => m.to_owned(),
        (None, Some(c)) if ACCEPTED.contains(&c) => c.to_owned(),
        // OCI allows the field to be absent; the shape tells which kind it is.
        (None, _) if raw.manifests.is_some() => OCI_INDEX.to_owned(),
        (None, _) => OCI_MANIFEST.to_owned(),
    };
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw.config.ok_or("image manifest without config")?;
            let config = descriptor(config, "application/vnd.oci.image.config.v1+json")?;
            let layers = raw.layers.unwrap_or_default();
            if layers.len() > MAX_ENTRIES {
                return Err(format!(
                    "{} layers, over the cap of {MAX_ENTRIES}",
                    layers.len()
                ));
            }
            let layers = layers
                .into_iter()
                .map(|l| descriptor(l, "application/vnd.oci.image.layer.v1.tar+gzip"))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Manifest::Image {
                media_type,
                config,
                layers,
            })
        }
        OCI_INDEX | DOCKER_LIST => {
            let manifests = raw.manifests.ok_or("image index without manifests")?;
            if manifests.len() > MAX_ENTRIES {
                return Err(format!(
                    "{} index entries, over the cap of {MAX_ENTRIES}",
                    manifests.len()
                ));
            }
            let entries = manifests
                .into_iter()
                .map(|mut raw| {
                    let platform = raw.platform.take().map(|p| Platform {
                        os: p.os,
                        architecture: p.architecture,
                        variant: p.variant,
                    });
                    Ok((descriptor(raw, OCI_MANIFEST)?, platform))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Manifest::Index { entries })
        }
        other => Err(format!("unsupported manifest media type {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hexd(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn digests() {
        assert!(Digest::parse(&hexd('a')).is_ok());
        assert!(Digest::parse(&hexd('A')).is_err());
        assert!(Digest::parse("sha512:abcd").is_err());
        assert!(Digest::parse(&format!("sha256:../../{}", "a".repeat(58))).is_err());
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn docker_manifest() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":7,"digest":"{}"}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":32,"digest":"{}"}}]}}"#,
            hexd('1'),
            hexd('2')
        );
        let Manifest::Image { config, layers, .. } = parse(body.as_bytes(), None).unwrap() else {
            panic!("not an image")
        };
        assert_eq!(config.size, 7);
        assert_eq!(layers[0].digest.as_str(), hexd('2'));
    }

    #[test]
    fn index_select() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"size":1,"digest":"{}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"size":2,"digest":"{}","platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            hexd('1'),
            hexd('2')
        );
        let Manifest::Index { entries } = parse(body.as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        let d = Manifest::select(&entries, &Platform::default()).unwrap();
        assert_eq!(d.digest.as_str(), hexd('2'));
        let arm = Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(
            Manifest::select(&entries, &arm).unwrap().digest.as_str(),
            hexd('1')
        );
        let s390 = Platform {
            os: "linux".into(),
            architecture: "s390x".into(),
            variant: None,
        };
        assert_eq!(
            Manifest::select(&entries, &s390).unwrap_err(),
            "linux/arm64/v8, linux/amd64"
        );
    }

    #[test]
    fn rejects() {
        let cases: &[(&str, &str)] = &[
            ("{", "not a manifest"),
            (r#"{"schemaVersion":1}"#, "schemaVersion 1"),
            (
                r#"{"schemaVersion":2,"mediaType":"text/plain"}"#,
                "unsupported manifest media type",
            ),
            (r#"{"schemaVersion":2,"layers":[]}"#, "without config"),
            (
                r#"{"schemaVersion":2,"config":{"size":-1,"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111"}}"#,
                "negative size",
            ),
            (
                r#"{"schemaVersion":2,"config":{"size":1,"digest":"md5:00"}}"#,
                "not sha256",
            ),
        ];
        for (body, want) in cases {
            let err = parse(body.as_bytes(), None).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(parse(&huge, None).unwrap_err().contains("cap"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse(&body, None);
        }

        #[test]
        fn parse_survives_field_shapes(
            schema in -3i64..5,
            size in proptest::num::i64::ANY,
            digest in "(sha256:[0-9a-f]{64}|sha256:[0-9a-zA-Z./]{0,70}|[a-z0-9:]{0,20})",
            kind in 0usize..4,
        ) {
            let media = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST][kind];
            let body = serde_json::json!({
                "schemaVersion": schema, "mediaType": media,
                "config": {"digest": digest, "size": size},
                "layers": [{"digest": digest, "size": size}],
                "manifests": [{"digest": digest, "size": size}],
            });
            if let Ok(m) = parse(body.to_string().as_bytes(), None) {
                let ds: Vec<&Descriptor> = match &m {
                    Manifest::Image { config, layers, .. } => std::iter::once(config).chain(layers).collect(),
                    Manifest::Index { entries } => entries.iter().map(|(d, _)| d).collect(),
                };
                for d in ds {
                    proptest::prop_assert_eq!(d.digest.hex().len(), 64);
                    proptest::prop_assert!(!d.digest.hex().contains('/'));
                }
            }
        }
    }
}
