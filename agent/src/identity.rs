//! The device's identity on disk: its private key (generated here, mode 0600, never sent anywhere), the
//! certificate the controller signed and the controller's CA; the mTLS settings sessions connect with; and
//! renewal at two thirds of the certificate's lifetime.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use alki_shared::clock::UnixMs;
use alki_shared::proto;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

use crate::Config;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a renewal call may take.
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delay after a failed renewal (the certificate is still valid for a third of its life).
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// How often the renewal task looks for the certificate before the device has enrolled.
const NOT_ENROLLED_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "this device has no certificate in {0}; enroll it (alki-agent enroll --token-file FILE, or set controller.bootstrap_token_file)"
    )]
    NotEnrolled(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("the device key in {path} is unusable ({0}); remove the identity directory and enroll again", path = .1.display())]
    BadKey(rcgen::Error, PathBuf),
    #[error("the certificate in {0} cannot be read; remove the identity directory and enroll again")]
    BadCert(PathBuf),
    #[error("could not make a certificate signing request: {0}")]
    Csr(rcgen::Error),
    #[error("cannot connect to the controller at {url}: {source}")]
    Connect { url: String, source: tonic::transport::Error },
    #[error("the controller refused: {0}")]
    Refused(tonic::Status),
    #[error("the controller did not answer within {0:?}")]
    Timeout(Duration),
}

/// Files of the device identity.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    pub dir: PathBuf,
}

impl IdentityFiles {
    pub fn of(config: &Config) -> IdentityFiles {
        IdentityFiles { dir: config.identity_dir() }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("device.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("device.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn is_enrolled(&self) -> bool {
        self.cert().is_file() && self.key().is_file()
    }

    /// The device key, generated (P-256) and written with mode 0600 on first use.
    pub fn load_or_create_key(&self) -> Result<KeyPair, IdentityError> {
        let path = self.key();
        if let Ok(pem) = std::fs::read_to_string(&path) {
            return KeyPair::from_pem(&pem).map_err(|e| IdentityError::BadKey(e, path));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(IdentityError::Csr)?;
        std::fs::create_dir_all(&self.dir).map_err(|source| IdentityError::Write { path: self.dir.clone(), source })?;
        write_private(&path, key.serialize_pem().as_bytes())?;
        Ok(key)
    }

    /// Stores a signed certificate and the CA, each atomically (the key was written before the CSR was sent).
    pub fn store(&self, cert_pem: &str, ca_pem: &str) -> Result<(), IdentityError> {
        for (path, pem) in [(self.ca(), ca_pem), (self.cert(), cert_pem)] {
            alki_shared::fsutil::write_atomic(&path, pem.as_bytes())
                .map_err(|source| IdentityError::Write { path, source })?;
        }
        Ok(())
    }

    /// The certificate and key for mTLS.
    pub fn tls_identity(&self) -> Result<(String, String), IdentityError> {
        if !self.is_enrolled() {
            return Err(IdentityError::NotEnrolled(self.dir.clone()));
        }
        Ok((read(&self.cert())?, read(&self.key())?))
    }
}

/// The registry token the controller handed this device in its latest Welcome, shared by the session (which
/// sets it) and pulls (which send it to the registry it is for, and nowhere else).
#[derive(Clone, Debug, Default)]
pub struct DeviceRegistryToken(std::sync::Arc<std::sync::Mutex<Option<IssuedToken>>>);

#[derive(Clone, Debug)]
struct IssuedToken {
    token: String,
    expires: UnixMs,
    /// The `host:port` the controller named for it; empty from a controller that names none.
    registry: String,
}

impl DeviceRegistryToken {
    pub fn set(&self, token: String, expires_unix_ms: i64, registry: String) {
        let value = (!token.is_empty()).then_some(IssuedToken { token, expires: UnixMs(expires_unix_ms), registry });
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = value;
    }

    /// The token and the registry it is for (None: the embedded registry as configured), unless it expired.
    pub fn current(&self) -> Option<(String, Option<String>)> {
        let now = UnixMs::now();
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|t| t.expires > now)
            .map(|t| (t.token.clone(), (!t.registry.is_empty()).then(|| t.registry.clone())))
    }
}

/// A CSR for `key` naming `device_id` (the controller decides the final subject anyway).
pub fn csr(key: &KeyPair, device_id: &str) -> Result<String, IdentityError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, device_id);
    params.distinguished_name = dn;
    params.serialize_request(key).and_then(|csr| csr.pem()).map_err(IdentityError::Csr)
}

/// When a certificate should be renewed: two thirds into its validity.
pub fn renewal_time(cert_pem: &str) -> Option<SystemTime> {
    use x509_parser::prelude::*;
    let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let from = cert.validity().not_before.timestamp();
    let until = cert.validity().not_after.timestamp();
    let at = from + (until - from) * 2 / 3;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).ok()?))
}

/// The controller CA the agent trusts: `controller.ca_file`, else the one stored at enrollment.
pub fn controller_ca(config: &Config) -> Result<String, IdentityError> {
    match &config.controller.ca_file {
        Some(path) => read(path),
        None => read(&IdentityFiles::of(config).ca()),
    }
}

/// A channel to the controller: TLS trusting the controller CA, with the device certificate when `client`
/// is given; plain HTTP/2 when the config says `insecure_plaintext`.
pub async fn connect(config: &Config, client: Option<(String, String)>) -> Result<Channel, IdentityError> {
    let url = config.controller.url.clone();
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|source| IdentityError::Connect { url: url.clone(), source })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if !config.controller.insecure_plaintext {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(controller_ca(config)?));
        if let Some((cert, key)) = client {
            tls = tls.identity(TlsIdentity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls).map_err(|source| IdentityError::Connect { url: url.clone(), source })?;
    }
    endpoint.connect().await.map_err(|source| IdentityError::Connect { url, source })
}

/// Renews the certificate over mTLS with a CSR for the same key, and stores the new one.
pub async fn renew(config: &Config) -> Result<SystemTime, IdentityError> {
    let files = IdentityFiles::of(config);
    let key = files.load_or_create_key()?;
    let (cert, key_pem) = files.tls_identity()?;
    let device_id = config.device_id.clone().unwrap_or_default();
    let csr = csr(&key, &device_id)?;
    let channel = connect(config, Some((cert, key_pem))).await?;
    let mut client = proto::enrollment_service_client::EnrollmentServiceClient::new(channel);
    let response = tokio::time::timeout(RENEW_TIMEOUT, client.renew(proto::RenewRequest { csr_pem: csr }))
        .await
        .map_err(|_| IdentityError::Timeout(RENEW_TIMEOUT))?
        .map_err(IdentityError::Refused)?
        .into_inner();
    files.store(&response.certificate_pem, &response.ca_certificate_pem)?;
    let next = renewal_time(&response.certificate_pem).ok_or_else(|| IdentityError::BadCert(files.cert()))?;
    Ok(next)
}

/// Renews the certificate whenever two thirds of its life have passed, until `shutdown`. New sessions pick
/// up the new certificate; the open one keeps its connection.
pub async fn renew_loop(config: Config, mut shutdown: watch::Receiver<bool>) {
    let files = IdentityFiles::of(&config);
    loop {
        let due = std::fs::read_to_string(files.cert()).ok().and_then(|pem| renewal_time(&pem));
        let wait = match due {
            Some(at) => at.duration_since(SystemTime::now()).unwrap_or_default(),
            // Not enrolled yet (the session enrolls on first start) or unreadable: look again soon.
            None => NOT_ENROLLED_POLL,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        if due.is_none() {
            continue;
        }
        match renew(&config).await {
            Ok(next) => tracing::info!(next_renewal = ?next, "Renewed the device certificate."),
            Err(error) => {
                tracing::warn!(%error, "Could not renew the device certificate; retrying in a minute.");
                tokio::select! {
                    _ = tokio::time::sleep(RENEW_RETRY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Read { path: path.to_owned(), source })
}

/// Writes a private file atomically, created with mode 0600 so the key is never readable by others.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write { path: path.to_owned(), source };
    alki_shared::fsutil::write_atomic(path, bytes).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_private_and_kept_and_the_csr_carries_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = IdentityFiles { dir: dir.path().join("identity") };
        let key = files.load_or_create_key().expect("key");
        let again = files.load_or_create_key().expect("key");
        assert_eq!(key.public_key_raw(), again.public_key_raw(), "the key survives a restart");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(files.key()).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let csr = csr(&key, "pi-1").expect("csr");
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).expect("valid csr");
        use rcgen::PublicKeyData as _;
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());
        assert!(!files.is_enrolled());
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_validity() {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.not_before = rcgen::date_time_ymd(2030, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 31);
        let cert = params.self_signed(&key).expect("cert");
        let at = renewal_time(&cert.pem()).expect("time");
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000); // 2030-01-01
        assert_eq!(at.duration_since(start).expect("after"), Duration::from_secs(20 * 24 * 3600));
    }
}
