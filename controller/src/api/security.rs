//! `SecurityService`: bootstrap tokens for enrollment (admin) and decommissioning devices (operator).

use std::collections::BTreeMap;

use alki_shared::ids::DeviceId;
use alki_shared::proto::{self, security_service_server::SecurityService};
use rand::RngCore as _;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::store::identity::{EnrollTokenRecord, TOKEN_ID_LEN};

const SECRET_PREFIX: &str = "alkienroll_";
/// Longest a bootstrap token may live: they are for provisioning, not standing credentials.
const MAX_TOKEN_LIFETIME_SECS: u64 = 366 * 24 * 3600;
const MAX_USES: u32 = 100_000;
const MAX_LABELS: usize = 64;

pub struct SecurityApi {
    pub app: App,
}

fn to_proto(r: EnrollTokenRecord) -> proto::EnrollToken {
    proto::EnrollToken {
        id: r.id,
        labels: r.labels.into_iter().collect(),
        uses_allowed: r.uses_allowed,
        uses: r.uses,
        expires_unix_ms: r.expires_unix_ms,
        created_unix_ms: r.created_unix_ms,
        revoked: r.revoked,
    }
}

/// Label keys and values as the agent's config accepts them.
fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Status> {
    if labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(Status::invalid_argument(format!(
                "label key {k:?}: use 1 to 63 characters from a-z, A-Z, 0-9, '.', '_', '-' and '/'"
            )));
        }
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "label {k:?}: use at most 255 printable characters for the value"
            )));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl SecurityService for SecurityApi {
    async fn create_enroll_token(
        &self,
        request: Request<proto::CreateEnrollTokenRequest>,
    ) -> Result<Response<proto::CreateEnrollTokenResponse>, Status> {
        let who = super::principal(&request)?;
        let req = request.into_inner();
        if req.uses == 0 || req.uses > MAX_USES {
            return Err(Status::invalid_argument(format!("uses is {}; allow 1 to {MAX_USES} enrollments", req.uses)));
        }
        if req.expires_in_seconds == 0 || req.expires_in_seconds > MAX_TOKEN_LIFETIME_SECS {
            return Err(Status::invalid_argument(format!(
                "expires_in_seconds is {}; use 1 s to 366 days",
                req.expires_in_seconds
            )));
        }
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        check_labels(&labels)?;
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("{SECRET_PREFIX}{}", hex::encode(bytes));
        let hash = super::enroll::hash_secret(&secret);
        let now = self.app.clock.now().as_millis();
        let record = EnrollTokenRecord {
            id: hash[..TOKEN_ID_LEN].to_owned(),
            labels,
            uses_allowed: req.uses,
            uses: 0,
            expires_unix_ms: now.saturating_add((req.expires_in_seconds as i64).saturating_mul(1000)),
            created_unix_ms: now,
            revoked: false,
        };
        let stored = record.clone();
        super::with_store(&self.app.store, move |store| store.put_enroll_token(&hash, &stored)).await?;
        tracing::info!(token = %record.id, by = %who.name, uses = record.uses_allowed, "Created a bootstrap token.");
        Ok(Response::new(proto::CreateEnrollTokenResponse { secret, token: Some(to_proto(record)) }))
    }

    async fn list_enroll_tokens(
        &self,
        request: Request<proto::ListEnrollTokensRequest>,
    ) -> Result<Response<proto::ListEnrollTokensResponse>, Status> {
        super::principal(&request)?;
        let mut tokens = super::with_store(&self.app.store, |store| store.enroll_tokens()).await?;
        tokens.sort_by_key(|t| t.created_unix_ms);
        Ok(Response::new(proto::ListEnrollTokensResponse { tokens: tokens.into_iter().map(to_proto).collect() }))
    }

    async fn revoke_enroll_token(
        &self,
        request: Request<proto::RevokeEnrollTokenRequest>,
    ) -> Result<Response<proto::RevokeEnrollTokenResponse>, Status> {
        let who = super::principal(&request)?;
        let id = request.into_inner().id;
        let revoking = id.clone();
        match super::with_store(&self.app.store, move |store| store.revoke_enroll_token(&revoking)).await? {
            Some(token) => {
                tracing::info!(token = %id, by = %who.name, "Revoked a bootstrap token.");
                Ok(Response::new(proto::RevokeEnrollTokenResponse { token: Some(to_proto(token)) }))
            }
            None => Err(Status::not_found(format!("no bootstrap token {id:?}; see alkictl enroll token list"))),
        }
    }

    async fn decommission_device(
        &self,
        request: Request<proto::DecommissionDeviceRequest>,
    ) -> Result<Response<proto::DecommissionDeviceResponse>, Status> {
        let who = super::principal(&request)?;
        let requested = request.into_inner().device_id;
        let never_enrolled = || {
            Status::not_found(format!(
                "device {requested:?} never enrolled; see alkictl devices list for enrolled devices"
            ))
        };
        // An id that does not parse was never enrolled (enrollment refuses it).
        let device_id = DeviceId::new(requested.clone()).map_err(|_| never_enrolled())?;
        let now = self.app.clock.now().as_millis();
        let decommissioning = device_id.clone();
        let identity =
            super::with_store(&self.app.store, move |store| store.decommission(decommissioning.as_str(), now)).await?;
        let Some(identity) = identity else { return Err(never_enrolled()) };
        // After the store says so, so a reconnect racing with this is refused at its session start.
        let session_closed = self.app.fleet.hub.close(device_id.as_str());
        tracing::info!(%device_id, by = %who.name, session_closed, "Decommissioned a device.");
        self.app.fleet.changed.notify_one();
        Ok(Response::new(proto::DecommissionDeviceResponse {
            device_id: device_id.to_string(),
            decommissioned_unix_ms: identity.decommissioned_unix_ms.unwrap_or(now),
            session_closed,
        }))
    }
}
