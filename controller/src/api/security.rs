//! `SecurityService`: bootstrap tokens for enrollment (admin) and decommissioning devices (operator).

use std::collections::BTreeMap;

use alki_shared::ids::DeviceId;
use alki_shared::proto::{self, security_service_server::SecurityService};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::enrollment::{self, BootstrapToken};
use crate::store::identity::EnrollTokenRecord;

pub struct SecurityApi {
    pub app: App,
}

fn to_proto(r: EnrollTokenRecord) -> proto::EnrollToken {
    proto::EnrollToken {
        id: r.id,
        labels: r.labels.into_iter().collect(),
        uses_allowed: r.uses_allowed,
        uses: r.uses,
        expires_unix_ms: r.expires_unix_ms.as_millis(),
        created_unix_ms: r.created_unix_ms.as_millis(),
        revoked: r.revoked,
        device_id: r.device_id.map(|id| id.to_string()).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl SecurityService for SecurityApi {
    async fn create_enroll_token(
        &self,
        request: Request<proto::CreateEnrollTokenRequest>,
    ) -> Result<Response<proto::CreateEnrollTokenResponse>, Status> {
        let who = super::principal(&request)?;
        let req = request.into_inner();
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        let device_id = match req.device_id.as_str() {
            "" => None,
            id => Some(DeviceId::new(id).map_err(|e| Status::invalid_argument(format!("device id {id:?}: {e}")))?),
        };
        let now = self.app.clock.now();
        let minted = enrollment::mint_bootstrap_token(labels, req.uses, req.expires_in_seconds, now)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let BootstrapToken { secret, hash, mut record } = minted;
        record.device_id = device_id;
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
        let now = self.app.clock.now();
        let decommissioning = device_id.clone();
        let identity = super::with_store(&self.app.store, move |store| {
            let identity = store.decommission(&decommissioning, now)?;
            if identity.is_some() {
                // The device record says so too: rollouts stop selecting it and its numbers leave the gates.
                store.update_device(&decommissioning, |d| d.decommissioned = true)?;
            }
            Ok(identity)
        })
        .await?;
        let Some(identity) = identity else { return Err(never_enrolled()) };
        // After the store says so, so a reconnect racing with this is refused when it registers; sessions
        // still waiting for their Hello are closed too.
        let session_closed = self.app.fleet.hub.close(device_id.as_str());
        tracing::info!(%device_id, by = %who.name, session_closed, "Decommissioned a device.");
        self.app.fleet.changed.notify_one();
        Ok(Response::new(proto::DecommissionDeviceResponse {
            device_id: device_id.to_string(),
            decommissioned_unix_ms: identity.decommissioned_unix_ms.unwrap_or(now).as_millis(),
            session_closed,
        }))
    }
}
