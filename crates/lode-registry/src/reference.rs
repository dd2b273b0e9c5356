//! Image references: `docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`, the same without the
//! scheme, and `http://…` to ask for plain HTTP explicitly. The grammar itself (and the
//! docker.io defaults such as `library/`) is `oci-spec`'s; this module adds the scheme and
//! the decision whether plain HTTP may be spoken.

use std::net::IpAddr;

use oci_client::Reference;

use crate::error::Error;

/// A parsed reference and whether the caller explicitly asked for plain HTTP.
#[derive(Debug, Clone)]
pub(crate) struct ImageRef {
    pub(crate) inner: Reference,
    pub(crate) plain_http_requested: bool,
}

impl ImageRef {
    pub(crate) fn parse(reference: &str) -> Result<Self, Error> {
        let bad = |reason: String| Error::BadReference {
            reference: reference.to_owned(),
            reason,
        };
        let (rest, plain_http_requested) = if let Some(rest) = reference.strip_prefix("docker://") {
            (rest, false)
        } else if let Some(rest) = reference.strip_prefix("http://") {
            (rest, true)
        } else if reference.contains("://") {
            return Err(bad(
                "only docker:// and http:// schemes are understood".to_owned()
            ));
        } else {
            (reference, false)
        };
        if rest.is_empty() {
            return Err(bad("empty reference".to_owned()));
        }
        let inner: Reference = rest.parse().map_err(|e| bad(format!("{e}")))?;
        if let Some(digest) = inner.digest() {
            crate::manifest::Digest::parse(digest).map_err(bad)?;
        }
        Ok(ImageRef {
            inner,
            plain_http_requested,
        })
    }

    /// `host[:port]` to connect to (docker.io resolved to its index host).
    pub(crate) fn registry(&self) -> &str {
        self.inner.resolve_registry()
    }

    pub(crate) fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag or digest this reference names, as a registry would print it.
    pub(crate) fn target(&self) -> String {
        match (self.inner.tag(), self.inner.digest()) {
            (_, Some(digest)) => digest.to_owned(),
            (Some(tag), None) => tag.to_owned(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// Whether to speak plain HTTP to this registry, or refuse.
    pub(crate) fn use_plain_http(
        &self,
        insecure_loopback_http: bool,
        insecure_registries: &[String],
    ) -> Result<bool, Error> {
        let registry = self.registry();
        if insecure_loopback_http && is_loopback_registry(registry) {
            return Ok(true);
        }
        if insecure_registries.iter().any(|r| r == registry) {
            return Ok(true);
        }
        if self.plain_http_requested {
            return Err(Error::PlainHttpRefused {
                registry: registry.to_owned(),
            });
        }
        Ok(false)
    }
}

/// True when `registry` (`host[:port]`) is `localhost`, an address in 127.0.0.0/8, or `[::1]`:
/// traffic that never leaves the machine, so plain HTTP exposes nothing.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        match rest.split_once(']') {
            Some((host, _)) => host,
            None => return false,
        }
    } else {
        registry.split(':').next().unwrap_or(registry)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let r = ImageRef::parse("docker://127.0.0.1:5000/test/img:v1").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "test/img");
        assert_eq!(r.target(), "v1");
        assert!(!r.plain_http_requested);

        let r = ImageRef::parse("localhost:5000/img").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.target(), "latest");

        let digest = format!("sha256:{}", "ab".repeat(32));
        let r = ImageRef::parse(&format!("docker://127.0.0.1:5000/a/b@{digest}")).unwrap();
        assert_eq!(r.target(), digest);

        let r = ImageRef::parse("debian:12").unwrap();
        assert_eq!(r.repository(), "library/debian");

        let r = ImageRef::parse("http://10.1.2.3:5000/a:b").unwrap();
        assert!(r.plain_http_requested);
    }

    #[test]
    fn bad_references() {
        for bad in [
            "",
            "docker://",
            "ftp://host/repo:tag",
            "docker://HOST/Repo:tag",
            "docker://h/r@sha256:1234",
        ] {
            let err = ImageRef::parse(bad).unwrap_err();
            assert!(
                matches!(err, Error::BadReference { .. }),
                "{bad:?} gave {err}"
            );
        }
    }

    #[test]
    fn loopback() {
        for yes in [
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.1.2.3:80",
            "localhost",
            "LOCALHOST:5000",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback_registry(yes), "{yes}");
        }
        for no in [
            "10.0.0.1:5000",
            "example.com",
            "localhost.example.com:5000",
            "[::2]:5000",
            "128.0.0.1",
            "[::1",
        ] {
            assert!(!is_loopback_registry(no), "{no}");
        }
    }

    #[test]
    fn plain_http_policy() {
        let remote = ImageRef::parse("http://10.1.2.3:5000/a:b").unwrap();
        let err = remote.use_plain_http(true, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "refusing plain HTTP to registry 10.1.2.3:5000: it is not a loopback host and not \
             listed in the insecure registries"
        );
        assert!(
            remote
                .use_plain_http(true, &["10.1.2.3:5000".to_owned()])
                .unwrap()
        );
        let remote_tls = ImageRef::parse("docker://10.1.2.3:5000/a:b").unwrap();
        assert!(!remote_tls.use_plain_http(true, &[]).unwrap());
        let local = ImageRef::parse("docker://127.0.0.1:5000/a:b").unwrap();
        assert!(local.use_plain_http(true, &[]).unwrap());
        assert!(!local.use_plain_http(false, &[]).unwrap());
        let local_http = ImageRef::parse("http://127.0.0.1:5000/a:b").unwrap();
        assert!(local_http.use_plain_http(false, &[]).is_err());
    }
}
