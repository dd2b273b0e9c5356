//! The one error type of this crate: every variant names the registry and repository, and,
//! where one is at fault, the manifest or blob digest.

use std::fmt;
use std::path::PathBuf;

/// Which credentials a refused request carried, so a 401/403 says what was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKind {
    /// No credentials.
    Anonymous,
    /// HTTP basic (or basic credentials sent to a token endpoint) as this user.
    Basic {
        /// The user name sent; the password is never shown.
        username: String,
    },
    /// A caller-supplied bearer token.
    Bearer,
}

impl fmt::Display for AuthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthKind::Anonymous => f.write_str("anonymous access"),
            AuthKind::Basic { username } => write!(f, "basic credentials for user {username:?}"),
            AuthKind::Bearer => f.write_str("a bearer token"),
        }
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reference string is not `[docker://|http://]HOST[:PORT]/REPO[:TAG][@sha256:HEX]`.
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Plain HTTP was asked for a registry that is neither loopback nor listed as insecure.
    #[error(
        "refusing plain HTTP to registry {registry}: it is not a loopback host and not listed \
         in the insecure registries"
    )]
    PlainHttpRefused {
        /// `host[:port]` of the registry.
        registry: String,
    },

    /// No connection could be made (refused, timed out, DNS, TLS handshake).
    #[error("registry {registry} unreachable: {detail}")]
    Unreachable {
        /// `host[:port]` of the registry.
        registry: String,
        /// The transport error with its causes.
        detail: String,
    },

    /// The registry (or its token endpoint) refused the credentials tried.
    #[error(
        "registry {registry} refused access to repository {repository} ({status}) with {auth}: \
         {detail}"
    )]
    Unauthorized {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// `401 Unauthorized`, `403 Forbidden` or `token endpoint`.
        status: String,
        /// The credentials that were tried.
        auth: AuthKind,
        /// The registry's own words.
        detail: String,
    },

    /// The tag or digest names no manifest in the repository.
    #[error("manifest {reference} unknown to registry {registry} in repository {repository}")]
    ManifestUnknown {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The tag or digest asked for.
        reference: String,
    },

    /// A blob the manifest lists is not in the repository.
    #[error("blob {digest} unknown to registry {registry} in repository {repository}")]
    BlobUnknown {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The missing blob.
        digest: String,
    },

    /// Bytes served for a digest hash to something else. Nothing is stored under `expected`.
    #[error(
        "digest mismatch from registry {registry} in repository {repository}: expected \
         {expected}, received bytes hash to {actual}"
    )]
    DigestMismatch {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The digest the descriptor (or the reference) promised.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },

    /// A blob or manifest is larger than its descriptor says, or than the configured cap.
    #[error(
        "blob {digest} from registry {registry} in repository {repository} is too large: \
         {size} bytes, limit {limit}"
    )]
    Oversized {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The blob or manifest.
        digest: String,
        /// Bytes seen or declared (at least this many).
        size: u64,
        /// The cap that was crossed.
        limit: u64,
    },

    /// The manifest lists more layers than the cap; refused before any blob is fetched.
    #[error(
        "manifest {digest} from registry {registry} in repository {repository} lists {count} \
         layers, over the cap of {limit}; nothing was downloaded"
    )]
    TooManyLayers {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The manifest's digest.
        digest: String,
        /// Layers it lists.
        count: usize,
        /// The cap.
        limit: usize,
    },

    /// The config and layers together declare more bytes than the cap; refused before any
    /// blob is fetched.
    #[error(
        "manifest {digest} from registry {registry} in repository {repository} declares \
         {declared} bytes of config and layers, over the cap of {limit}; nothing was downloaded"
    )]
    ImageTooLarge {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The manifest's digest.
        digest: String,
        /// The sum of the declared sizes (saturating).
        declared: u64,
        /// The cap.
        limit: u64,
    },

    /// A blob arrived more slowly than the minimum average rate over one window.
    #[error(
        "blob {digest} from registry {registry} in repository {repository} is too slow: \
         {window_bytes} bytes in the last {window_secs} s ({rate} bytes/s), under the minimum \
         of {min_rate} bytes/s; {received} of {size} bytes received"
    )]
    TooSlow {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The blob.
        digest: String,
        /// Bytes of the blob received in all.
        received: u64,
        /// The blob's declared size.
        size: u64,
        /// Bytes received in the window that fell short.
        window_bytes: u64,
        /// The window's length in seconds.
        window_secs: u64,
        /// The window's average rate, bytes per second.
        rate: u64,
        /// The minimum rate, bytes per second.
        min_rate: u64,
    },

    /// A request read whole (the token dance, a manifest) did not finish by its deadline.
    #[error(
        "registry {registry}, repository {repository}: {what} did not complete within \
         {deadline_secs} s"
    )]
    TimedOut {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// What was being fetched.
        what: String,
        /// The deadline in seconds.
        deadline_secs: u64,
    },

    /// The image index has no manifest for the wanted platform.
    #[error(
        "image index {digest} in registry {registry} repository {repository} has no manifest \
         for platform {platform} (it has: {available})"
    )]
    NoSuchPlatform {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The index's digest.
        digest: String,
        /// The platform asked for.
        platform: String,
        /// The platforms the index lists.
        available: String,
    },

    /// A manifest that is not valid JSON, of an unsupported kind, or breaks the spec.
    #[error(
        "malformed manifest {digest} from registry {registry} in repository {repository}: {reason}"
    )]
    BadManifest {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The manifest's digest (or the reference it was fetched by).
        digest: String,
        /// What is wrong.
        reason: String,
    },

    /// Any other registry or protocol failure.
    #[error("registry {registry}, repository {repository}, {what}: {detail}")]
    Registry {
        /// `host[:port]` of the registry.
        registry: String,
        /// The repository pulled.
        repository: String,
        /// The manifest or blob being fetched.
        what: String,
        /// The failure with its causes.
        detail: String,
    },

    /// Reading or writing the layout directory failed.
    #[error("OCI layout {path}: {source}")]
    Layout {
        /// The file or directory at fault.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// `err` and its chain of causes on one line, so a transport error says "Connection refused"
/// and not only "error sending request".
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
