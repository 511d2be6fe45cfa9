//! `EnrollmentService`: devices trade a bootstrap token and a CSR for their certificate, and renew it over
//! mTLS. Also where a session's device identity is read from its client certificate.

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto::{self, enrollment_service_server::EnrollmentService};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::facts::effective_labels;
use crate::pki::PeerDevice;
use crate::store::Store;
use crate::store::identity::{DeviceIdentity, IdentityError, Issued};

pub struct EnrollApi {
    pub app: App,
}

/// The device identity the session's client certificate proves, checked against the store (current
/// serial, not decommissioned). `Ok(None)`: the connection carried no client certificate.
pub fn peer_identity<T>(store: &Store, request: &Request<T>) -> Result<Option<DeviceIdentity>, Status> {
    let Some(certs) = request.peer_certs() else { return Ok(None) };
    let Some(leaf) = certs.first() else { return Ok(None) };
    let PeerDevice { device_id, serial } =
        crate::pki::peer_device(leaf).map_err(|e| Status::permission_denied(e.to_string()))?;
    store.check_device_certificate(&device_id, &serial).map(Some).map_err(identity_status)
}

pub fn identity_status(error: IdentityError) -> Status {
    match error {
        IdentityError::UnknownToken => Status::unauthenticated(error.to_string()),
        IdentityError::TokenExpired(_)
        | IdentityError::TokenUsedUp(_)
        | IdentityError::TokenRevoked(_)
        | IdentityError::TokenForAnotherDevice { .. }
        | IdentityError::Decommissioned(_)
        | IdentityError::NotEnrolled(_)
        | IdentityError::StaleCertificate(_) => Status::permission_denied(error.to_string()),
        IdentityError::DeviceClaimed(_) => Status::already_exists(error.to_string()),
        IdentityError::Sign(_) => Status::invalid_argument(error.to_string()),
        IdentityError::Store(e) => super::internal(e),
    }
}

#[tonic::async_trait]
impl EnrollmentService for EnrollApi {
    async fn enroll(&self, request: Request<proto::EnrollRequest>) -> Result<Response<proto::EnrollResponse>, Status> {
        let req = request.into_inner();
        let device_id = DeviceId::new(req.device_id.clone())
            .map_err(|e| Status::invalid_argument(format!("device id {:?}: {e}", req.device_id)))?;
        crate::limits::check_labels("enrollment labels", req.labels.iter())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.bootstrap_token.trim().is_empty() {
            return Err(Status::unauthenticated("no bootstrap token; ask an admin (alkictl enroll token create)"));
        }
        let now = self.app.clock.now();
        let pki = self.app.pki.clone();
        let store = self.app.store.clone();
        let (hash, csr, id) =
            (crate::enrollment::hash_secret(&req.bootstrap_token), req.csr_pem.clone(), device_id.clone());
        // Signing and the fsynced commit are blocking work.
        let result = tokio::task::spawn_blocking(move || {
            store.enroll(&hash, &id, now, |_token| {
                let cert = pki.sign_device(&csr, id.as_str(), now.as_millis()).map_err(|e| e.to_string())?;
                Ok((Issued { serial: cert.serial.clone(), not_after_unix_ms: UnixMs(cert.not_after_unix_ms) }, cert))
            })
        })
        .await
        .map_err(super::internal)?;
        let (identity, cert) = match result {
            Ok(ok) => ok,
            Err(error) => {
                tracing::warn!(%device_id, %error, "Refused an enrollment.");
                return Err(identity_status(error));
            }
        };
        // What the device asks for is kept as reported labels; it is selected by its token's (and operators').
        let (reported, inventory, id) = (req.labels, req.inventory, device_id.clone());
        let (token_labels, trust) = (identity.labels.clone(), self.app.label_trust.clone());
        let labels = super::with_store(&self.app.store, move |store| {
            store.update_device(&id, |d| {
                d.reported_labels = reported;
                d.inventory = inventory;
                d.labels = effective_labels(d, &token_labels, &trust, false);
                d.labels.clone()
            })
        })
        .await?;
        tracing::info!(%device_id, token = %identity.token_id, serial = %cert.serial, "Enrolled a device.");
        self.app.fleet.changed.notify_one();
        Ok(Response::new(proto::EnrollResponse {
            device_id: device_id.to_string(),
            certificate_pem: cert.pem,
            ca_certificate_pem: self.app.pki.ca_pem().to_owned(),
            expires_unix_ms: cert.not_after_unix_ms,
            labels,
        }))
    }

    async fn renew(&self, request: Request<proto::RenewRequest>) -> Result<Response<proto::RenewResponse>, Status> {
        let Some(certs) = request.peer_certs() else {
            return Err(Status::unauthenticated("renewal needs the device's current certificate (mTLS)"));
        };
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let peer = crate::pki::peer_device(leaf).map_err(|e| Status::permission_denied(e.to_string()))?;
        let csr = request.into_inner().csr_pem;
        let (pki, store, now) = (self.app.pki.clone(), self.app.store.clone(), self.app.clock.now().as_millis());
        let id = peer.device_id.clone();
        let result = tokio::task::spawn_blocking(move || {
            store.renew(&id, &peer.serial, || {
                let cert = pki.sign_device(&csr, id.as_str(), now).map_err(|e| e.to_string())?;
                Ok((Issued { serial: cert.serial.clone(), not_after_unix_ms: UnixMs(cert.not_after_unix_ms) }, cert))
            })
        })
        .await
        .map_err(super::internal)?;
        let (_, cert) = result.map_err(|error| {
            tracing::warn!(device_id = %peer.device_id, %error, "Refused a certificate renewal.");
            identity_status(error)
        })?;
        tracing::info!(device_id = %peer.device_id, serial = %cert.serial, "Renewed a device certificate.");
        Ok(Response::new(proto::RenewResponse {
            certificate_pem: cert.pem,
            ca_certificate_pem: self.app.pki.ca_pem().to_owned(),
            expires_unix_ms: cert.not_after_unix_ms,
        }))
    }
}
