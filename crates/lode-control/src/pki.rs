//! The fleet's certificate authority: one CA per deployment, and a certificate per caller
//! whose subject carries its [`Identity`] (the organizational unit is the role, the common
//! name the id). Keys are ECDSA P-256, generated here and written only with mode 0600.
//!
//! A credentials directory holds `ca.pem` (every holder), `ca.key` (only where certificates
//! are issued), and `<role>-<id>.pem` with `<role>-<id>.key` per identity.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ControlError;
use crate::api::{Identity, Role};

/// The identity `init` issues for the control service itself.
pub fn control_identity() -> Identity {
    Identity {
        role: Role::Control,
        id: "control".to_owned(),
    }
}

/// The spelling of a role in certificates and file names.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Control => "control",
        Role::Worker => "worker",
        Role::Admin => "admin",
    }
}

/// Parses a role's spelling.
pub fn parse_role(text: &str) -> Option<Role> {
    match text {
        "control" => Some(Role::Control),
        "worker" => Some(Role::Worker),
        "admin" => Some(Role::Admin),
        _ => None,
    }
}

/// Whether `id` is a valid caller id: 1 to 64 of `A-Z a-z 0-9 . _ -`, not `.` or `..`.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != ".."
}

/// Creates a CA in `dir` (`ca.pem`, `ca.key`) and the control service's certificate, valid
/// for `days` and naming `control_hosts` so the service can serve TLS under them. Refuses
/// to replace an existing CA.
pub fn init(dir: &Path, control_hosts: &[String], days: u32) -> Result<(), ControlError> {
    fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
    let ca_pem = dir.join("ca.pem");
    if ca_pem.exists() {
        return Err(ControlError::Pki(format!(
            "{} already holds a CA ({}); remove it first to start a new one",
            dir.display(),
            ca_pem.display()
        )));
    }
    let key = KeyPair::generate().map_err(rcgen_error("generating the CA key"))?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "lode control CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(serial()?);
    let (not_before, not_after) = validity(SystemTime::now(), days)?;
    params.not_before = not_before;
    params.not_after = not_after;
    let ca = params
        .self_signed(&key)
        .map_err(rcgen_error("signing the CA certificate"))?;
    write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
    write_public(&ca_pem, ca.pem().as_bytes())?;
    issue(dir, &control_identity(), control_hosts, days)
}

/// Issues `who` a certificate signed by `dir`'s CA, valid for `days` from now: writes
/// `dir/<role>-<id>.pem` and `.key` (0600). `hosts` become DNS or IP subject alternative
/// names so the holder can also serve TLS.
pub fn issue(dir: &Path, who: &Identity, hosts: &[String], days: u32) -> Result<(), ControlError> {
    let now = SystemTime::now();
    let end = now
        .checked_add(Duration::from_secs(u64::from(days) * 86_400))
        .ok_or_else(|| ControlError::Pki(format!("{days} days is past the end of time")))?;
    issue_valid(dir, who, hosts, now, end)
}

/// [`issue`] with an explicit validity window (a test issues expired certificates).
pub fn issue_valid(
    dir: &Path,
    who: &Identity,
    hosts: &[String],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), ControlError> {
    if !valid_id(&who.id) {
        return Err(ControlError::Pki(format!(
            "{:?} is not a valid id: use 1 to 64 of A-Z a-z 0-9 . _ -",
            who.id
        )));
    }
    let ca_key_path = dir.join("ca.key");
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_pem = read_text(&ca_key_path)?;
    let ca_pem = read_text(&ca_pem_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(rcgen_error("reading ca.key"))?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(rcgen_error("reading ca.pem"))?
        .self_signed(&ca_key)
        .map_err(rcgen_error("loading the CA"))?;

    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationalUnitName, role_name(who.role));
    name.push(DnType::CommonName, who.id.as_str());
    params.distinguished_name = name;
    params.subject_alt_names = hosts
        .iter()
        .map(|host| match host.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => host
                .as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| ControlError::Pki(format!("{host:?} is not a host name"))),
        })
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial()?);
    params.not_before = offset(not_before)?;
    params.not_after = offset(not_after)?;
    let key = KeyPair::generate().map_err(rcgen_error("generating a key"))?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(rcgen_error("signing the certificate"))?;
    let (pem, key_path) = paths(dir, who);
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&pem, cert.pem().as_bytes())?;
    Ok(())
}

/// A caller's credentials: the CA certificate it trusts, its own chain and key.
pub struct Credentials {
    identity: Identity,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads `who`'s credentials from `dir`: `ca.pem`, `<role>-<id>.pem` and `.key`. The
    /// certificate must name `who`.
    pub fn load(dir: &Path, who: &Identity) -> Result<Credentials, ControlError> {
        let ca_path = dir.join("ca.pem");
        let ca = CertificateDer::from_pem_file(&ca_path).map_err(|e| pem_error(&ca_path, e))?;
        let (pem, key_path) = paths(dir, who);
        let chain = CertificateDer::pem_file_iter(&pem)
            .map_err(|e| pem_error(&pem, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(&pem, e))?;
        let Some(leaf) = chain.first() else {
            return Err(ControlError::Pki(format!(
                "{} holds no certificate",
                pem.display()
            )));
        };
        let named = identity_of(leaf)?;
        if &named != who {
            return Err(ControlError::Pki(format!(
                "{} names {}/{}, not {}/{}",
                pem.display(),
                role_name(named.role),
                named.id,
                role_name(who.role),
                who.id
            )));
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem_error(&key_path, e))?;
        Ok(Credentials {
            identity: who.clone(),
            ca,
            chain,
            key,
        })
    }

    /// Whose credentials these are.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The CA certificate.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The holder's certificate chain, its own first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The holder's private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// The identity a certificate's subject names (organizational unit = role, common name =
/// id). The certificate comes from a peer: anything malformed is an error, never a panic.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, ControlError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| ControlError::Pki(format!("unreadable certificate: {e}")))?;
    let subject = parsed.subject();
    let one = |values: Vec<&str>, what: &str| -> Result<String, ControlError> {
        match values.as_slice() {
            [one] => Ok((*one).to_owned()),
            _ => Err(ControlError::Pki(format!(
                "certificate subject {subject} must name exactly one {what}"
            ))),
        }
    };
    let role = one(
        subject
            .iter_organizational_unit()
            .filter_map(|a| a.as_str().ok())
            .collect(),
        "role (OU)",
    )?;
    let id = one(
        subject
            .iter_common_name()
            .filter_map(|a| a.as_str().ok())
            .collect(),
        "id (CN)",
    )?;
    let role = parse_role(&role).ok_or_else(|| {
        ControlError::Pki(format!("certificate subject {subject} names no known role"))
    })?;
    if !valid_id(&id) {
        return Err(ControlError::Pki(format!(
            "certificate subject {subject} names an invalid id"
        )));
    }
    Ok(Identity { role, id })
}

fn paths(dir: &Path, who: &Identity) -> (PathBuf, PathBuf) {
    let stem = format!("{}-{}", role_name(who.role), who.id);
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    )
}

fn serial() -> Result<SerialNumber, ControlError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ControlError::Pki("the system random source failed".to_owned()))?;
    // A positive INTEGER: the top bit clear.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity(
    now: SystemTime,
    days: u32,
) -> Result<(time::OffsetDateTime, time::OffsetDateTime), ControlError> {
    let end = now
        .checked_add(Duration::from_secs(u64::from(days) * 86_400))
        .ok_or_else(|| ControlError::Pki(format!("{days} days is past the end of time")))?;
    Ok((offset(now)?, offset(end)?))
}

fn offset(at: SystemTime) -> Result<time::OffsetDateTime, ControlError> {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| ControlError::Pki("a date before 1970".to_owned()))?
        .as_secs();
    let secs = i64::try_from(secs).map_err(|_| ControlError::Pki("a date too far".to_owned()))?;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| ControlError::Pki(format!("a date out of range: {e}")))
}

fn rcgen_error(what: &'static str) -> impl Fn(rcgen::Error) -> ControlError {
    move |e| ControlError::Pki(format!("{what}: {e}"))
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> ControlError {
    ControlError::Pki(format!("reading {}: {e}", path.display()))
}

fn io(path: &Path, source: std::io::Error) -> ControlError {
    ControlError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_text(path: &Path) -> Result<String, ControlError> {
    fs::read_to_string(path).map_err(|source| io(path, source))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
    fs::write(path, bytes).map_err(|source| io(path, source))
}

/// Writes a key readable by its owner only: created with mode 0600, never widened first.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(io(path, source)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| io(path, source))?;
    file.write_all(bytes).map_err(|source| io(path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_the_identity_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["127.0.0.1".to_owned()], 1).unwrap();
        let worker = Identity {
            role: Role::Worker,
            id: "w-1".to_owned(),
        };
        issue(dir.path(), &worker, &["localhost".to_owned()], 1).unwrap();
        let creds = Credentials::load(dir.path(), &worker).unwrap();
        assert_eq!(creds.identity(), &worker);
        assert_eq!(identity_of(&creds.chain()[0]).unwrap(), worker);
        let control = Credentials::load(dir.path(), &control_identity()).unwrap();
        assert_eq!(control.identity().role, Role::Control);
        for key in ["ca.key", "worker-w-1.key", "control-control.key"] {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &fs::metadata(dir.path().join(key)).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let err = init(dir.path(), &[], 1).unwrap_err().to_string();
        assert!(err.contains("already holds a CA"), "{err}");
        let wrong = Identity {
            role: Role::Admin,
            id: "w-1".to_owned(),
        };
        assert!(Credentials::load(dir.path(), &wrong).is_err());
    }

    #[test]
    fn bad_ids_are_refused() {
        for id in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(id), "{id:?}");
        }
        assert!(valid_id("worker-01.a_b"));
    }

    proptest::proptest! {
        #[test]
        fn identity_of_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = identity_of(&CertificateDer::from(bytes));
        }
    }
}
