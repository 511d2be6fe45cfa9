//! The controller's front doors: gRPC for agents and operators, HTTP for the registry and probes.
//! Handlers are thin: they authenticate, convert, and call into `fleet`, `rollout` and `registry`.

pub mod admin;
pub mod agent;
pub mod dashboard;
pub mod enroll;
pub mod fleet;
pub mod http;
pub mod insight;
pub mod security;

use crate::auth::{Action, AuthError, Authenticator, Principal};

/// The one place gRPC calls are authenticated.
pub fn authorize<T>(
    auth: &Authenticator,
    request: &tonic::Request<T>,
    action: Action,
) -> Result<Principal, tonic::Status> {
    let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
    auth.authorize(header, action).map_err(auth_status)
}

pub fn auth_status(error: AuthError) -> tonic::Status {
    match error {
        AuthError::Missing | AuthError::Invalid | AuthError::Revoked { .. } => {
            tonic::Status::unauthenticated(error.to_string())
        }
        AuthError::Forbidden { .. } => tonic::Status::permission_denied(error.to_string()),
        AuthError::Store(e) => internal(e),
    }
}

pub fn token_status(error: crate::auth::TokenError) -> tonic::Status {
    use crate::auth::TokenError;
    match error {
        TokenError::BadName(_) => tonic::Status::invalid_argument(error.to_string()),
        TokenError::NotFound(_) => tonic::Status::not_found(error.to_string()),
        TokenError::Ambiguous(..) => tonic::Status::failed_precondition(error.to_string()),
        TokenError::Store(e) => internal(e),
    }
}

/// An internal failure: logged in full, answered without internals.
pub fn internal(error: impl std::fmt::Display) -> tonic::Status {
    tracing::error!(%error, "Request failed inside the controller.");
    tonic::Status::internal("the controller failed to handle the request; its log says why")
}

/// Runs store work on a blocking thread (a write waits for the disk), answering a store failure as internal.
pub async fn with_store<T: Send + 'static>(
    store: &crate::store::Store,
    work: impl FnOnce(&crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, tonic::Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || work(&store)).await.map_err(internal)?.map_err(internal)
}
