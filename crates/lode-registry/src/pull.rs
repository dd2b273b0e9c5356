//! The pull itself: authenticate, resolve the manifest (through an index if need be), stream
//! the blobs into the layout, and only then name the image in `index.json`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{Client, RegistryOperation};

use crate::error::{AuthKind, Error, chain};
use crate::layout::Layout;
use crate::manifest::{self, Descriptor, Digest, MAX_MANIFEST_BYTES, Manifest, Platform};
use crate::reference::ImageRef;

/// Credentials for the registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum RegistryAuth {
    /// No credentials; a bearer-token registry is still asked for an anonymous token.
    #[default]
    Anonymous,
    /// HTTP basic credentials, sent to the registry itself or, for a bearer-token registry,
    /// to its token endpoint in exchange for a token.
    Basic {
        /// User name.
        username: String,
        /// Password or access token used as a password.
        password: String,
    },
    /// A token already obtained, sent as `Authorization: Bearer`.
    Bearer {
        /// The token.
        token: String,
    },
}

impl fmt::Debug for RegistryAuth {
    // Never print a secret, even in a debug log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryAuth::Anonymous => f.write_str("Anonymous"),
            RegistryAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            RegistryAuth::Bearer { .. } => f
                .debug_struct("Bearer")
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

impl RegistryAuth {
    /// Reads `LODE_REGISTRY_TOKEN` (bearer), else `LODE_REGISTRY_USER` with
    /// `LODE_REGISTRY_PASSWORD` (basic), else anonymous.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        if let Some(token) = var("LODE_REGISTRY_TOKEN").filter(|t| !t.is_empty()) {
            return RegistryAuth::Bearer { token };
        }
        match var("LODE_REGISTRY_USER").filter(|u| !u.is_empty()) {
            Some(username) => RegistryAuth::Basic {
                username,
                password: var("LODE_REGISTRY_PASSWORD").unwrap_or_default(),
            },
            None => RegistryAuth::Anonymous,
        }
    }

    fn kind(&self) -> AuthKind {
        match self {
            RegistryAuth::Anonymous => AuthKind::Anonymous,
            RegistryAuth::Basic { username, .. } => AuthKind::Basic {
                username: username.clone(),
            },
            RegistryAuth::Bearer { .. } => AuthKind::Bearer,
        }
    }

    fn to_oci(&self) -> OciAuth {
        match self {
            RegistryAuth::Anonymous => OciAuth::Anonymous,
            RegistryAuth::Basic { username, password } => {
                OciAuth::Basic(username.clone(), password.clone())
            }
            RegistryAuth::Bearer { token } => OciAuth::Bearer(token.clone()),
        }
    }
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Speak plain HTTP to loopback registries (`localhost`, 127.0.0.0/8, `[::1]`), whose
    /// traffic never leaves the machine. Default: true.
    pub insecure_loopback_http: bool,
    /// Further registries (`host[:port]`, exactly as in the reference) to speak plain HTTP
    /// to. An `http://` reference to any other non-loopback registry is refused.
    pub insecure_registries: Vec<String>,
    /// The platform to take from an image index. Default: linux/amd64.
    pub platform: Platform,
    /// Largest blob (config or layer) accepted, in bytes. Default: 32 GiB.
    pub max_blob_bytes: u64,
    /// The `org.opencontainers.image.ref.name` to give the image in the layout. Default:
    /// `REGISTRY/REPOSITORY:TAG`, or `REGISTRY/REPOSITORY@DIGEST` when pulled by digest, so
    /// that same-named tags of different repositories never share an entry.
    pub tag: Option<String>,
    /// How long to wait for a TCP (and TLS) connection. Default: 10 s.
    pub connect_timeout: Duration,
    /// How long one read may stall. Default: 60 s.
    pub read_timeout: Duration,
    /// Most layers accepted in a manifest, checked before any blob is fetched. Default: 256,
    /// the flattener's own cap.
    pub max_layers: usize,
    /// Largest config blob accepted. Default: 16 MiB, the flattener's own cap.
    pub max_config_bytes: u64,
    /// Most bytes the config and layers may declare together, checked before any blob is
    /// fetched. Default: 64 GiB.
    pub max_image_bytes: u64,
    /// The slowest average a blob download may keep over any [`PullOptions::rate_window`], in
    /// bytes per second; 0 turns the check off. Default: 64 KiB/s. A blob of N bytes then
    /// takes at most about N / `min_rate` plus one window, whatever the registry does.
    pub min_rate: u64,
    /// The window over which [`PullOptions::min_rate`] is averaged. It also bounds the
    /// requests read whole (authentication, manifests): each must finish within one window
    /// plus the manifest cap at `min_rate`. Default: 60 s.
    pub rate_window: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_loopback_http: true,
            insecure_registries: Vec::new(),
            platform: Platform::default(),
            max_blob_bytes: 32 << 30,
            tag: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            max_layers: 256,
            max_config_bytes: 16 << 20,
            max_image_bytes: 64 << 30,
            min_rate: 64 << 10,
            rate_window: Duration::from_secs(60),
        }
    }
}

/// A blob of the pulled image, as the layout now holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its sha256 digest (file `blobs/sha256/HEX`).
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type as the manifest gives it (OCI or Docker).
    pub media_type: String,
}

/// What [`pull_to_layout`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The `org.opencontainers.image.ref.name` of the image in `index.json`, for people and
    /// other tools. A later pull of the same tag may move it: to read exactly the image this
    /// pull fetched, go by [`Pulled::manifest`]'s digest (`oci:DIR:@sha256:HEX`).
    pub tag_in_layout: String,
    /// The image manifest (single platform), stored byte for byte.
    pub manifest: BlobInfo,
    /// The image index or manifest list the platform was chosen from, if any (not stored).
    pub index_digest: Option<Digest>,
    /// The image config blob.
    pub config: BlobInfo,
    /// The layers, base first.
    pub layers: Vec<BlobInfo>,
    /// Bytes downloaded; blobs already in the layout are not counted.
    pub bytes_fetched: u64,
}

/// Who a failure is about, to build errors that name registry, repository and credentials.
struct Ctx {
    registry: String,
    repository: String,
    auth: AuthKind,
}

impl Ctx {
    fn unauthorized(&self, status: &str, detail: String) -> Error {
        Error::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            status: status.to_owned(),
            auth: self.auth.clone(),
            detail,
        }
    }

    fn oversized(&self, digest: &str, size: u64, limit: u64) -> Error {
        Error::Oversized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            digest: digest.to_owned(),
            size,
            limit,
        }
    }

    fn bad_manifest(&self, digest: &str, reason: String) -> Error {
        Error::BadManifest {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            digest: digest.to_owned(),
            reason,
        }
    }

    /// Runs `request`, a request read whole, and gives up when `deadline` passes.
    async fn within<T>(
        &self,
        deadline: Option<Duration>,
        what: &str,
        request: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let Some(deadline) = deadline else {
            return request.await;
        };
        tokio::time::timeout(deadline, request)
            .await
            .map_err(|_| Error::TimedOut {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                what: what.to_owned(),
                deadline_secs: deadline.as_secs(),
            })?
    }

    fn mismatch(&self, expected: &str, actual: &str) -> Error {
        Error::DigestMismatch {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        }
    }

    /// Turns an `oci-client` error met while fetching `target` (a tag or digest; `blob` says
    /// whether it is a blob) into one of ours.
    fn classify(&self, err: OciDistributionError, target: &str, blob: bool) -> Error {
        let unknown = || {
            if blob {
                Error::BlobUnknown {
                    registry: self.registry.clone(),
                    repository: self.repository.clone(),
                    digest: target.to_owned(),
                }
            } else {
                Error::ManifestUnknown {
                    registry: self.registry.clone(),
                    repository: self.repository.clone(),
                    reference: target.to_owned(),
                }
            }
        };
        match &err {
            OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
                return Error::Unreachable {
                    registry: self.registry.clone(),
                    detail: chain(e),
                };
            }
            OciDistributionError::UnauthorizedError { url } => {
                return self.unauthorized("401 Unauthorized", format!("GET {url}"));
            }
            OciDistributionError::AuthenticationFailure(reason) => {
                return self.unauthorized("token endpoint", reason.trim().to_owned());
            }
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { expected, actual },
            ) => return self.mismatch(expected, actual),
            OciDistributionError::RegistryError { envelope, .. } => {
                for e in &envelope.errors {
                    match e.code {
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown => return unknown(),
                        OciErrorCode::Unauthorized => {
                            return self.unauthorized("401 Unauthorized", e.message.clone());
                        }
                        OciErrorCode::Denied => {
                            return self.unauthorized("403 Forbidden", e.message.clone());
                        }
                        _ => {}
                    }
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 => return self.unauthorized("401 Unauthorized", message.trim().to_owned()),
                403 => return self.unauthorized("403 Forbidden", message.trim().to_owned()),
                404 => return unknown(),
                _ => {}
            },
            _ => {}
        }
        Error::Registry {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            what: if blob {
                format!("blob {target}")
            } else {
                format!("manifest {target}")
            },
            detail: chain(&err),
        }
    }
}

/// Checks a user-chosen layout tag against the OCI `ref.name` grammar's character set.
fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'+' | b'@'))
        && tag.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "layout tag {tag:?} must be 1-128 characters of [A-Za-z0-9._+@-], starting \
             alphanumeric"
        ))
    }
}

/// Pulls `reference` (`docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`, the same without
/// `docker://`, or `http://…` to insist on plain HTTP) into the OCI image layout at
/// `layout_dir`, creating it if need be and adding to it if it exists.
///
/// Every blob is checked against its descriptor's size and sha256 while it streams, and
/// appears under its digest name only when it matches; blobs already in the layout are
/// verified and kept. `index.json` is written last, so a failed pull never names an image
/// whose blobs are missing. `progress` is called with the number of bytes each received
/// chunk adds (and with a blob's size when it was already present).
pub async fn pull_to_layout(
    reference: &str,
    auth: &RegistryAuth,
    opts: &PullOptions,
    layout_dir: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Pulled, Error> {
    let image = ImageRef::parse(reference)?;
    if let Some(tag) = &opts.tag {
        check_tag(tag).map_err(|reason| Error::BadReference {
            reference: reference.to_owned(),
            reason,
        })?;
    }
    let plain_http =
        image.use_plain_http(opts.insecure_loopback_http, &opts.insecure_registries)?;
    let ctx = Ctx {
        registry: image.registry().to_owned(),
        repository: image.repository().to_owned(),
        auth: auth.kind(),
    };
    let config = ClientConfig {
        protocol: if plain_http {
            ClientProtocol::HttpsExcept(vec![ctx.registry.clone()])
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(opts.connect_timeout),
        read_timeout: Some(opts.read_timeout),
        ..ClientConfig::default()
    };
    let client = Client::try_from(config).map_err(|e| Error::Registry {
        registry: ctx.registry.clone(),
        repository: ctx.repository.clone(),
        what: "client setup".to_owned(),
        detail: chain(&e),
    })?;
    let oci_auth = auth.to_oci();

    let deadline = whole_request_deadline(opts);

    // Authenticate up front: `oci-client` would otherwise swallow a token-endpoint refusal
    // and fall back to an anonymous request, hiding which credentials were refused.
    let token = ctx
        .within(deadline, "authentication", async {
            client
                .auth(&image.inner, &oci_auth, RegistryOperation::Pull)
                .await
                .map_err(|e| ctx.classify(e, &image.target(), false))
        })
        .await?;
    let http = Http::new(&ctx, &image, plain_http, opts, auth, token)?;

    // The tag is resolved to a digest exactly once, here: everything after (the platform's
    // manifest, config, layers, the layout entry and what the caller flattens) follows the
    // digest of these bytes, so a tag moved or shared meanwhile cannot mix two images.
    let target = image.target();
    let (body, index_digest) = {
        let body = ctx
            .within(
                deadline,
                &format!("manifest {target}"),
                http.fetch_manifest(&ctx, &image, &target),
            )
            .await?;
        match manifest::parse(&body, None).map_err(|r| ctx.bad_manifest(&target, r))? {
            Manifest::Image { .. } => (body, None),
            Manifest::Index { entries } => {
                let index_digest = Digest::of(&body);
                let chosen = Manifest::select(&entries, &opts.platform).map_err(|available| {
                    Error::NoSuchPlatform {
                        registry: ctx.registry.clone(),
                        repository: ctx.repository.clone(),
                        digest: index_digest.to_string(),
                        platform: opts.platform.to_string(),
                        available,
                    }
                })?;
                if chosen.size > MAX_MANIFEST_BYTES as u64 {
                    return Err(ctx.oversized(
                        chosen.digest.as_str(),
                        chosen.size,
                        MAX_MANIFEST_BYTES as u64,
                    ));
                }
                let child = image.inner.clone_with_digest(chosen.digest.to_string());
                let child = ImageRef {
                    inner: child,
                    plain_http_requested: image.plain_http_requested,
                };
                let body = ctx
                    .within(
                        deadline,
                        &format!("manifest {}", chosen.digest),
                        http.fetch_manifest(&ctx, &child, chosen.digest.as_str()),
                    )
                    .await?;
                if body.len() as u64 != chosen.size {
                    return Err(ctx.bad_manifest(
                        chosen.digest.as_str(),
                        format!(
                            "{} bytes served, the index says {}",
                            body.len(),
                            chosen.size
                        ),
                    ));
                }
                (body, Some(index_digest))
            }
        }
    };
    let manifest_digest = Digest::of(&body);
    let Manifest::Image {
        media_type,
        config,
        layers,
    } = manifest::parse(&body, None).map_err(|r| ctx.bad_manifest(manifest_digest.as_str(), r))?
    else {
        return Err(ctx.bad_manifest(
            manifest_digest.as_str(),
            "an image index where an image manifest was expected".to_owned(),
        ));
    };

    check_sizes(&ctx, opts, &manifest_digest, &config, &layers)?;

    let layout = Layout::create(layout_dir)?;
    let mut bytes_fetched = 0u64;
    for desc in std::iter::once(&config).chain(&layers) {
        bytes_fetched += fetch_blob(&http, &ctx, &layout, desc, opts, progress).await?;
    }
    let manifest_desc = Descriptor {
        media_type: media_type.clone(),
        digest: manifest_digest.clone(),
        size: body.len() as u64,
    };
    layout.put_small(&manifest_digest, &body)?;
    let tag_in_layout = match (&opts.tag, image.inner.digest()) {
        (Some(tag), _) => tag.clone(),
        (None, Some(digest)) => format!("{}/{}@{digest}", ctx.registry, ctx.repository),
        (None, None) => format!("{}/{}:{target}", ctx.registry, ctx.repository),
    };
    layout.set_tag(&tag_in_layout, &manifest_desc)?;

    let info = |d: &Descriptor| BlobInfo {
        digest: d.digest.clone(),
        size: d.size,
        media_type: d.media_type.clone(),
    };
    Ok(Pulled {
        tag_in_layout,
        manifest: info(&manifest_desc),
        index_digest,
        config: info(&config),
        layers: layers.iter().map(info).collect(),
        bytes_fetched,
    })
}

/// How long a request read whole (authentication, a manifest) may take: one rate window plus
/// the manifest cap at the minimum rate. `None` when the rate check is off.
fn whole_request_deadline(opts: &PullOptions) -> Option<Duration> {
    let secs = (MAX_MANIFEST_BYTES as u64).checked_div(opts.min_rate)?;
    Some(opts.rate_window.saturating_add(Duration::from_secs(secs)))
}

/// Refuses an image whose manifest promises more than the caps, before a single blob is
/// fetched: too many layers, a config or layer over its cap, or too many bytes in all.
fn check_sizes(
    ctx: &Ctx,
    opts: &PullOptions,
    manifest: &Digest,
    config: &Descriptor,
    layers: &[Descriptor],
) -> Result<(), Error> {
    if layers.len() > opts.max_layers {
        return Err(Error::TooManyLayers {
            registry: ctx.registry.clone(),
            repository: ctx.repository.clone(),
            digest: manifest.to_string(),
            count: layers.len(),
            limit: opts.max_layers,
        });
    }
    if config.size > opts.max_config_bytes {
        return Err(ctx.oversized(config.digest.as_str(), config.size, opts.max_config_bytes));
    }
    let mut declared = config.size;
    for layer in layers {
        if layer.size > opts.max_blob_bytes {
            return Err(ctx.oversized(layer.digest.as_str(), layer.size, opts.max_blob_bytes));
        }
        declared = declared.saturating_add(layer.size);
    }
    if declared > opts.max_image_bytes {
        return Err(Error::ImageTooLarge {
            registry: ctx.registry.clone(),
            repository: ctx.repository.clone(),
            digest: manifest.to_string(),
            declared,
            limit: opts.max_image_bytes,
        });
    }
    Ok(())
}

/// Manifest and blob requests. `oci-client` reads a manifest response, or the body of an
/// error response, whole, however large, before its caller can look at it; so after its
/// authentication step these requests are made here, with the same connection settings
/// and the credentials it settled on, and every body is read under a cap.
struct Http {
    http: reqwest::Client,
    /// `SCHEME://HOST[:PORT]/v2/REPOSITORY/`.
    base: String,
    credential: Credential,
}

/// Most bytes of an error response kept for the message.
const MAX_ERROR_BODY: usize = 4096;

/// What a manifest request carries: the bearer token the authentication step obtained, or
/// the caller's basic credentials, or nothing.
enum Credential {
    None,
    Bearer(String),
    Basic(String, String),
}

impl Http {
    fn new(
        ctx: &Ctx,
        image: &ImageRef,
        plain_http: bool,
        opts: &PullOptions,
        auth: &RegistryAuth,
        token: Option<String>,
    ) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .build()
            .map_err(|e| Error::Registry {
                registry: ctx.registry.clone(),
                repository: ctx.repository.clone(),
                what: "client setup".to_owned(),
                detail: chain(&e),
            })?;
        let credential = match (token, auth) {
            (Some(token), _) => Credential::Bearer(token),
            (None, RegistryAuth::Bearer { token }) => Credential::Bearer(token.clone()),
            (None, RegistryAuth::Basic { username, password }) => {
                Credential::Basic(username.clone(), password.clone())
            }
            (None, RegistryAuth::Anonymous) => Credential::None,
        };
        Ok(Http {
            http,
            base: format!(
                "{}://{}/v2/{}/",
                if plain_http { "http" } else { "https" },
                image.registry(),
                image.repository()
            ),
            credential,
        })
    }

    /// GETs `path` (under `/v2/REPOSITORY/`), `what` being a manifest (`blob` false) or blob
    /// named `target`, and returns the response if it is a success; a failure status is
    /// turned into an error with at most [`MAX_ERROR_BODY`] bytes of the registry's words.
    async fn get(
        &self,
        ctx: &Ctx,
        path: &str,
        target: &str,
        blob: bool,
    ) -> Result<reqwest::Response, Error> {
        let what = || {
            if blob {
                format!("blob {target}")
            } else {
                format!("manifest {target}")
            }
        };
        let mut request = self.http.get(format!("{}{path}", self.base));
        if !blob {
            request = request.header(reqwest::header::ACCEPT, manifest::ACCEPTED.join(", "));
        }
        request = match &self.credential {
            Credential::None => request,
            Credential::Bearer(token) => request.bearer_auth(token),
            Credential::Basic(user, password) => request.basic_auth(user, Some(password)),
        };
        let mut response = request
            .send()
            .await
            .map_err(|e| transport_error(ctx, &what(), e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let mut detail = Vec::new();
        while detail.len() < MAX_ERROR_BODY {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_ERROR_BODY - detail.len();
                    detail.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let detail = String::from_utf8_lossy(&detail).trim().to_owned();
        Err(match status.as_u16() {
            401 => ctx.unauthorized("401 Unauthorized", detail),
            403 => ctx.unauthorized("403 Forbidden", detail),
            404 if blob => Error::BlobUnknown {
                registry: ctx.registry.clone(),
                repository: ctx.repository.clone(),
                digest: target.to_owned(),
            },
            404 => Error::ManifestUnknown {
                registry: ctx.registry.clone(),
                repository: ctx.repository.clone(),
                reference: target.to_owned(),
            },
            _ => Error::Registry {
                registry: ctx.registry.clone(),
                repository: ctx.repository.clone(),
                what: what(),
                detail: format!("HTTP {status}: {detail}"),
            },
        })
    }

    /// Fetches a manifest body by tag or digest (`target`), capped in size before and while
    /// it is read and, when fetched by digest, checked against it.
    async fn fetch_manifest(
        &self,
        ctx: &Ctx,
        image: &ImageRef,
        target: &str,
    ) -> Result<Vec<u8>, Error> {
        let cap = MAX_MANIFEST_BYTES as u64;
        let what = format!("manifest {target}");
        let mut response = self
            .get(ctx, &format!("manifests/{target}"), target, false)
            .await?;
        if let Some(length) = response.content_length()
            && length > cap
        {
            return Err(ctx.oversized(target, length, cap));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(ctx, &what, e))?
        {
            let total = (body.len() as u64).saturating_add(chunk.len() as u64);
            if total > cap {
                return Err(ctx.oversized(target, total, cap));
            }
            body.extend_from_slice(&chunk);
        }
        if let Some(expected) = image.inner.digest() {
            let actual = Digest::of(&body);
            if actual.as_str() != expected {
                return Err(ctx.mismatch(expected, actual.as_str()));
            }
        }
        Ok(body)
    }
}

/// A failure to send a request or read a response: unreachable for connection failures and
/// timeouts, else a registry error about `what`.
fn transport_error(ctx: &Ctx, what: &str, e: reqwest::Error) -> Error {
    if e.is_connect() || e.is_timeout() {
        Error::Unreachable {
            registry: ctx.registry.clone(),
            detail: chain(&e),
        }
    } else {
        Error::Registry {
            registry: ctx.registry.clone(),
            repository: ctx.repository.clone(),
            what: what.to_owned(),
            detail: chain(&e),
        }
    }
}

/// The minimum-throughput check of one blob download: time is cut into windows of
/// `rate_window`, and each must bring at least `min_rate * rate_window` bytes. A registry
/// that drips, or sends a burst and then stalls, fails at the end of the first short window
/// instead of holding the pull for as long as it likes.
struct RateWindow {
    min_bytes: u64,
    window: Duration,
    start: tokio::time::Instant,
    start_bytes: u64,
}

/// A window that fell short: the bytes it brought and its average rate.
struct ShortWindow {
    bytes: u64,
    rate: u64,
}

impl RateWindow {
    fn new(opts: &PullOptions) -> Self {
        let window_ms = u64::try_from(opts.rate_window.as_millis()).unwrap_or(u64::MAX);
        RateWindow {
            min_bytes: opts.min_rate.saturating_mul(window_ms) / 1000,
            window: opts.rate_window,
            start: tokio::time::Instant::now(),
            start_bytes: 0,
        }
    }

    /// When the current window ends, or `None` when the check is off.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        (self.min_bytes > 0 && !self.window.is_zero()).then(|| self.start + self.window)
    }

    /// Closes the current window if it is over: an error if it brought too few bytes, else
    /// a new window starts now with `received` bytes behind it.
    fn check(&mut self, received: u64) -> Result<(), ShortWindow> {
        let Some(end) = self.deadline() else {
            return Ok(());
        };
        let now = tokio::time::Instant::now();
        if now < end {
            return Ok(());
        }
        let bytes = received.saturating_sub(self.start_bytes);
        if bytes < self.min_bytes {
            let elapsed_ms = u64::try_from(now.duration_since(self.start).as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            return Err(ShortWindow {
                bytes,
                rate: bytes.saturating_mul(1000) / elapsed_ms,
            });
        }
        self.start = now;
        self.start_bytes = received;
        Ok(())
    }
}

/// Streams one blob into the layout unless a verified copy is there. Returns the bytes
/// downloaded.
async fn fetch_blob(
    http: &Http,
    ctx: &Ctx,
    layout: &Layout,
    desc: &Descriptor,
    opts: &PullOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, Error> {
    let digest = desc.digest.as_str();
    if layout.has_blob(desc).await? {
        progress(desc.size);
        return Ok(0);
    }
    let what = format!("blob {digest}");
    // Until the response headers are in, the request is bounded like any read-whole one.
    let mut response = ctx
        .within(
            whole_request_deadline(opts),
            &what,
            http.get(ctx, &format!("blobs/{digest}"), digest, true),
        )
        .await?;
    if let Some(length) = response.content_length()
        && length > desc.size
    {
        return Err(ctx.oversized(digest, length, desc.size));
    }
    let mut write = layout.start_blob()?;
    let mut rate = RateWindow::new(opts);
    loop {
        let next = match rate.deadline() {
            Some(at) => tokio::time::timeout_at(at, response.chunk()).await.ok(),
            None => Some(response.chunk().await),
        };
        match next {
            // The window ended with nothing new; it is judged below.
            None => {}
            Some(Ok(None)) => break,
            Some(Ok(Some(bytes))) => {
                let len = bytes.len() as u64;
                let total = write.written().saturating_add(len);
                if total > desc.size {
                    return Err(ctx.oversized(digest, total, desc.size));
                }
                write.write(&bytes).await?;
                progress(len);
            }
            Some(Err(e)) => return Err(transport_error(ctx, &what, e)),
        }
        if let Err(short) = rate.check(write.written()) {
            return Err(Error::TooSlow {
                registry: ctx.registry.clone(),
                repository: ctx.repository.clone(),
                digest: digest.to_owned(),
                received: write.written(),
                size: desc.size,
                window_bytes: short.bytes,
                window_secs: opts.rate_window.as_secs(),
                rate: short.rate,
                min_rate: opts.min_rate,
            });
        }
    }
    let written = write.written();
    if written != desc.size {
        let actual = write.digest();
        return Err(if actual == desc.digest {
            ctx.bad_manifest(
                digest,
                format!("descriptor size {} but blob has {written} bytes", desc.size),
            )
        } else {
            ctx.mismatch(digest, actual.as_str())
        });
    }
    match write.finish(layout, &desc.digest).await? {
        Ok(()) => Ok(written),
        Err(actual) => Err(ctx.mismatch(digest, actual.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_from_vars() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(RegistryAuth::from_vars(vars(&[])), RegistryAuth::Anonymous);
        assert_eq!(
            RegistryAuth::from_vars(vars(&[
                ("LODE_REGISTRY_USER", "u"),
                ("LODE_REGISTRY_PASSWORD", "p")
            ])),
            RegistryAuth::Basic {
                username: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(
            RegistryAuth::from_vars(vars(&[
                ("LODE_REGISTRY_USER", "u"),
                ("LODE_REGISTRY_TOKEN", "t")
            ])),
            RegistryAuth::Bearer { token: "t".into() }
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let basic = RegistryAuth::Basic {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{basic:?}");
        assert!(
            shown.contains("alice") && !shown.contains("hunter2"),
            "{shown}"
        );
        let bearer = RegistryAuth::Bearer {
            token: "s3cret".into(),
        };
        assert!(!format!("{bearer:?}").contains("s3cret"));
    }

    #[test]
    fn layout_tags() {
        assert!(check_tag("v1.2-rc_3").is_ok());
        assert!(check_tag("").is_err());
        assert!(check_tag("a/b").is_err());
        assert!(check_tag("-x").is_err());
        assert!(check_tag("a:b").is_err());
    }
}
