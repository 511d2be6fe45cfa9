//! The controller's front doors: gRPC for agents and operators, HTTP for the registry, the dashboards and
//! probes. Handlers are thin: they read who called, convert, and call into the domain modules (`fleet`,
//! `rollout`, `bundles`, `insight`, `registry`) with what the application context (`app`) holds.

pub mod admin;
pub mod agent;
pub mod dashboard;
pub mod diagnostics;
pub mod enroll;
pub mod events;
pub mod fleet;
pub mod http;
pub mod insight;
pub mod security;

use crate::auth::{AuthError, Principal};

/// The caller the gate admitted for this call, authenticated by `auth::grpc_policy` (the one gRPC auth
/// check: handlers name no action of their own). A call that did not pass the gate carries none and is
/// refused, so a service mounted without it fails closed.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    request.extensions().get::<Principal>().cloned().ok_or_else(|| {
        tracing::error!("A gRPC call reached its handler without passing the gate; refusing it.");
        tonic::Status::unauthenticated("the call was not authenticated by the controller's gate")
    })
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
        TokenError::BadName(_) | TokenError::Scope(_) => tonic::Status::invalid_argument(error.to_string()),
        TokenError::NotFound(_) => tonic::Status::not_found(error.to_string()),
        TokenError::Ambiguous(..) => tonic::Status::failed_precondition(error.to_string()),
        TokenError::Store(e) => internal(e),
    }
}

/// An eval suite that cannot be used, answered with whose fault it is.
pub fn suite_status(error: crate::suites::SuiteError) -> tonic::Status {
    use crate::suites::SuiteError;
    match error {
        e @ SuiteError::BadReference(_) => tonic::Status::invalid_argument(e.to_string()),
        e @ SuiteError::NotFound(_) => tonic::Status::not_found(e.to_string()),
        e @ SuiteError::NotASuite { .. } => tonic::Status::failed_precondition(e.to_string()),
        e @ SuiteError::External(_) => tonic::Status::unavailable(e.to_string()),
        e @ SuiteError::Registry(..) => internal(e),
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

/// Runs other blocking work (file reads, several store calls) off the async workers.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, tonic::Status> {
    tokio::task::spawn_blocking(work).await.map_err(internal)
}
