//! `AdminService`: operator tokens (list, revoke) and the audit log, for admins.

use alki_shared::clock::UnixMs;
use alki_shared::proto::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::store::audit::AuditQuery;

/// Entries a ListAudit answers when the request names no limit, and at most.
const DEFAULT_AUDIT_LIMIT: usize = 1000;
const MAX_AUDIT_LIMIT: usize = 10_000;

pub struct AdminApi {
    pub app: App,
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_tokens(
        &self,
        request: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        super::principal(&request)?;
        let tokens = self.app.auth.list_tokens().map_err(super::internal)?;
        Ok(Response::new(proto::ListTokensResponse { tokens: tokens.iter().map(|t| t.to_proto()).collect() }))
    }

    async fn revoke_token(
        &self,
        request: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        let principal = super::principal(&request)?;
        let wanted = request.into_inner().token;
        let auth = self.app.auth.clone();
        let revoked = super::blocking(move || auth.revoke_token(&wanted)).await?.map_err(super::token_status)?;
        tracing::info!(token = %revoked.record.name, id = %revoked.id, by = %principal.name, "Token revoked.");
        Ok(Response::new(proto::RevokeTokenResponse { token: Some(revoked.to_proto()) }))
    }

    async fn list_audit(
        &self,
        request: Request<proto::ListAuditRequest>,
    ) -> Result<Response<proto::ListAuditResponse>, Status> {
        super::principal(&request)?;
        let req = request.into_inner();
        let limit = match usize::try_from(req.limit).unwrap_or(usize::MAX) {
            0 => DEFAULT_AUDIT_LIMIT,
            n => n.min(MAX_AUDIT_LIMIT),
        };
        let query = AuditQuery { since: UnixMs(req.since_unix_ms), actor: req.actor, limit };
        let entries = super::with_store(&self.app.store, move |store| store.audit(&query)).await?;
        Ok(Response::new(proto::ListAuditResponse { entries }))
    }
}
