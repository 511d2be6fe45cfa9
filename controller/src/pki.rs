//! The controller's certificate authority: its key and certificate (generated on first start or supplied),
//! the listeners' server certificate, device certificates signed from CSRs, reading a device's identity back
//! from a verified client certificate, and the short-lived registry tokens devices pull with.
//!
//! Pure functions of their inputs apart from [`Pki::load_or_create`] (files) and the random serials and keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alki_shared::ids::DeviceId;
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::Sha256;

/// Longest a device certificate may be valid for.
pub const MAX_DEVICE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the listeners' own certificate (re-issued at every start) is valid for.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Largest CSR accepted, so a hostile device cannot make the controller parse megabytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
const REGISTRY_TOKEN_PREFIX: &str = "alkidev_";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{what} {path} is not usable: {source}; give a PEM file")]
    BadPem { what: &'static str, path: PathBuf, source: rcgen::Error },
    #[error("the certificate signing request is not valid: {0}; send a PKCS#10 CSR in PEM, signed by the device key")]
    BadCsr(String),
    #[error("could not sign a certificate: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("the client certificate is not a device certificate of this controller: {0}")]
    NotADevice(String),
}

/// Where the operator's own CA or server certificate come from (flags); generated when absent.
#[derive(Clone, Debug, Default)]
pub struct PkiConfig {
    /// CA certificate and key (PEM). When absent, `<data_dir>/pki/ca.{crt,key}` is used, created on first start.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// The listeners' certificate and key (PEM). When absent, one is issued by the CA at every start.
    pub server: Option<(PathBuf, PathBuf)>,
    /// Names (DNS or IP) in the issued server certificate.
    pub server_names: Vec<String>,
    /// Validity of device certificates; renewed by agents at two thirds of it.
    pub device_cert_validity: Duration,
}

impl PkiConfig {
    /// localhost, 127.0.0.1, ::1 and this host's name: what a single-machine setup connects to.
    pub fn default_server_names() -> Vec<String> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let host = host.trim();
            if !host.is_empty() && !names.iter().any(|n| n == host) {
                names.push(host.to_owned());
            }
        }
        names
    }
}

/// A PEM certificate and private key.
#[derive(Clone)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKey").finish_non_exhaustive()
    }
}

/// A signed device certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCert {
    pub pem: String,
    /// Hex of the serial number: the store remembers the current one per device.
    pub serial: String,
    pub not_after_unix_ms: i64,
}

/// Who a verified client certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerDevice {
    pub device_id: DeviceId,
    pub serial: String,
}

/// The CA, the listeners' identity and the registry-token key. Cheap to clone.
#[derive(Clone)]
pub struct Pki {
    inner: Arc<Inner>,
}

struct Inner {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    server: CertKey,
    token_key: [u8; 32],
    device_validity: Duration,
}

impl Pki {
    /// Loads the CA from the flags or `<data_dir>/pki` (creating it there on first start, key mode 0600), and
    /// issues or loads the listeners' certificate.
    pub fn load_or_create(data_dir: &Path, config: &PkiConfig) -> Result<Pki, PkiError> {
        let dir = data_dir.join("pki");
        let (ca_cert, ca_key) = match &config.ca {
            Some((cert, key)) => (cert.clone(), key.clone()),
            None => (dir.join("ca.crt"), dir.join("ca.key")),
        };
        if config.ca.is_none() && !ca_cert.exists() {
            let (cert_pem, key_pem) = generate_ca()?;
            std::fs::create_dir_all(&dir).map_err(|source| PkiError::Write { path: dir.clone(), source })?;
            write_secret(&ca_key, key_pem.as_bytes())?;
            alki_shared::fsutil::write_atomic(&ca_cert, cert_pem.as_bytes())
                .map_err(|source| PkiError::Write { path: ca_cert.clone(), source })?;
            tracing::info!(cert = %ca_cert.display(), "First start: created the controller CA.");
        }
        let ca_pem = read(&ca_cert, "the CA certificate")?;
        let key_pem = read(&ca_key, "the CA key")?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::BadPem {
            what: "the CA key",
            path: ca_key.clone(),
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|source| PkiError::BadPem {
            what: "the CA certificate",
            path: ca_cert.clone(),
            source,
        })?;
        let server = match &config.server {
            Some((cert, key)) => {
                CertKey { cert_pem: read(cert, "the server certificate")?, key_pem: read(key, "the server key")? }
            }
            None => issue_server(&issuer, &config.server_names)?,
        };
        let token_key = load_or_create_token_key(&dir)?;
        let device_validity = config.device_cert_validity.clamp(Duration::from_secs(1), MAX_DEVICE_CERT_VALIDITY);
        Ok(Pki { inner: Arc::new(Inner { ca_pem, issuer, server, token_key, device_validity }) })
    }

    /// The CA certificate (PEM) clients trust the controller with.
    pub fn ca_pem(&self) -> &str {
        &self.inner.ca_pem
    }

    /// The listeners' certificate and key.
    pub fn server(&self) -> &CertKey {
        &self.inner.server
    }

    pub fn device_validity(&self) -> Duration {
        self.inner.device_validity
    }

    /// Signs `csr_pem` for `device_id`. Only the CSR's key is taken: subject, names and usages are the
    /// controller's (a device cannot ask for a CA certificate or another device's name).
    pub fn sign_device(&self, csr_pem: &str, device_id: &str, now_unix_ms: i64) -> Result<DeviceCert, PkiError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(PkiError::BadCsr(format!("it is {} bytes, more than {MAX_CSR_BYTES}", csr_pem.len())));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        dn.push(DnType::OrganizationalUnitName, "alki-device");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let validity = self.inner.device_validity;
        // Backdated a little for devices whose clock runs behind, never by more than a tenth of the validity.
        let backdate = (validity / 10).min(Duration::from_secs(300));
        let now = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(now_unix_ms);
        params.not_before = now - backdate;
        params.not_after = now + validity;
        let csr = CertificateSigningRequestParams { params, public_key: csr.public_key };
        let cert = csr.signed_by(&self.inner.issuer)?;
        let not_after_unix_ms = now_unix_ms.saturating_add(i64::try_from(validity.as_millis()).unwrap_or(i64::MAX));
        Ok(DeviceCert { pem: cert.pem(), serial: hex::encode(serial), not_after_unix_ms })
    }

    /// A registry bearer token for `device_id` valid until `expires_unix_ms`: HMAC-signed, so checking one
    /// needs no store write (thousands of sessions each get one).
    pub fn registry_token(&self, device_id: &str, expires_unix_ms: i64) -> String {
        let payload = format!("{device_id}.{expires_unix_ms}");
        format!("{REGISTRY_TOKEN_PREFIX}{payload}.{}", hex::encode(self.mac(&payload)))
    }

    /// The device a registry token was issued to, when it is genuine and not expired at `now_unix_ms`.
    pub fn verify_registry_token(&self, token: &str, now_unix_ms: i64) -> Option<DeviceId> {
        let rest = token.strip_prefix(REGISTRY_TOKEN_PREFIX)?;
        let (payload, mac_hex) = rest.rsplit_once('.')?;
        let (device_id, expires) = payload.rsplit_once('.')?;
        let expires: i64 = expires.parse().ok()?;
        let mac = hex::decode(mac_hex).ok()?;
        let mut check = Hmac::<Sha256>::new_from_slice(&self.inner.token_key).ok()?;
        check.update(payload.as_bytes());
        // Constant-time comparison.
        check.verify_slice(&mac).ok()?;
        // Tokens are issued to enrolled (valid) ids only: one that does not parse is no token of ours.
        (expires > now_unix_ms).then(|| DeviceId::new(device_id).ok()).flatten()
    }

    fn mac(&self, payload: &str) -> Vec<u8> {
        // HMAC accepts keys of any length: this cannot fail.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.inner.token_key).unwrap_or_else(|_| unreachable!());
        mac.update(payload.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

/// The device a client certificate names. The certificate was verified against the CA by TLS; this only
/// reads it and checks it is a device certificate (not, say, a CA-issued server certificate).
pub fn peer_device(cert_der: &[u8]) -> Result<PeerDevice, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| PkiError::NotADevice(e.to_string()))?;
    let subject = cert.subject();
    let is_device = subject.iter_organizational_unit().any(|ou| ou.as_str().is_ok_and(|s| s == "alki-device"));
    if !is_device {
        return Err(PkiError::NotADevice("it is not marked as a device certificate".into()));
    }
    let device_id = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::NotADevice("it names no device".into()))?;
    let device_id =
        DeviceId::new(device_id).map_err(|e| PkiError::NotADevice(format!("it names no valid device: {e}")))?;
    Ok(PeerDevice { device_id, serial: hex::encode(cert.raw_serial()) })
}

fn generate_ca() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Alki Fleet controller CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(300);
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn issue_server(issuer: &Issuer<'static, KeyPair>, names: &[String]) -> Result<CertKey, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let names = if names.is_empty() { PkiConfig::default_server_names() } else { names.to_vec() };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].clone());
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(300);
    params.not_after = now + SERVER_CERT_VALIDITY;
    let cert = params.signed_by(&key, issuer)?;
    Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    rand::rng().fill_bytes(&mut serial);
    // Positive and without a leading zero byte, so the DER integer keeps all 16 bytes.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

fn load_or_create_token_key(dir: &Path) -> Result<[u8; 32], PkiError> {
    let path = dir.join("registry-token.key");
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(key) = <[u8; 32]>::try_from(hex::decode(bytes.trim_ascii()).unwrap_or_default().as_slice())
    {
        return Ok(key);
    }
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_owned(), source })?;
    write_secret(&path, hex::encode(key).as_bytes())?;
    Ok(key)
}

/// Writes a secret atomically with mode 0600 from the start.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    alki_shared::fsutil::write_atomic(path, bytes)
        .map_err(|source| PkiError::Write { path: path.to_owned(), source })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| PkiError::Write { path: path.to_owned(), source })?;
    }
    Ok(())
}

fn read(path: &Path, what: &'static str) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read { what, path: path.to_owned(), source })
}

/// Installs ring as the process's rustls crypto provider (two providers are compiled in through
/// dependencies, and rustls refuses to guess). Idempotent.
pub fn install_crypto_provider() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki(dir: &Path) -> Pki {
        let config = PkiConfig { device_cert_validity: Duration::from_secs(3600), ..Default::default() };
        Pki::load_or_create(dir, &config).expect("pki")
    }

    fn csr() -> (KeyPair, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        // What a hostile device might ask for: a CA certificate for someone else.
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "someone-else");
        let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
        (key, csr)
    }

    #[test]
    fn the_ca_is_created_once_with_a_private_key_file_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = pki(dir.path());
        let second = pki(dir.path());
        assert_eq!(first.ca_pem(), second.ca_pem(), "the CA survives a restart");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("pki/ca.key")).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn device_certificates_carry_the_controllers_choice_of_name_and_usage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = pki(dir.path());
        let (_key, csr) = csr();
        let cert = pki.sign_device(&csr, "pi-7", 1_700_000_000_000).expect("sign");
        let der = rustls_pemfile_der(&cert.pem);
        let peer = peer_device(&der).expect("device");
        let pi7 = DeviceId::new("pi-7").expect("id");
        assert_eq!(peer, PeerDevice { device_id: pi7, serial: cert.serial.clone() });
        use x509_parser::prelude::*;
        let (_, parsed) = X509Certificate::from_der(&der).expect("parse");
        assert!(!parsed.is_ca(), "a CSR asking for a CA certificate gets a leaf");
        assert_eq!(parsed.validity().not_after.timestamp() * 1000, cert.not_after_unix_ms);
        // The server certificate is not a device certificate.
        let server = rustls_pemfile_der(&pki.server().cert_pem);
        assert!(peer_device(&server).is_err());
        assert!(matches!(pki.sign_device("not a csr", "pi-7", 0), Err(PkiError::BadCsr(_))));
    }

    #[test]
    fn registry_tokens_are_bound_to_device_and_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = pki(dir.path());
        let token = pki.registry_token("pi-1", 2_000);
        assert_eq!(pki.verify_registry_token(&token, 1_000).as_ref().map(DeviceId::as_str), Some("pi-1"));
        assert_eq!(pki.verify_registry_token(&token, 2_000), None, "expired");
        let forged = token.replace("pi-1.2000", "pi-2.2000");
        assert_eq!(pki.verify_registry_token(&forged, 1_000), None, "another device's name breaks the MAC");
        let other =
            Pki::load_or_create(tempfile::tempdir().expect("tempdir").path(), &PkiConfig::default()).expect("pki");
        assert_eq!(other.verify_registry_token(&token, 1_000), None, "another controller's key");
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject as _};
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem").to_vec()
    }
}
