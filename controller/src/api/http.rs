//! The HTTP side: the OCI registry under `/v2/`, and the unauthenticated probes `/healthz` and `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

use crate::auth::Authenticator;
use crate::registry::{self, Registry};

pub fn router(registry: Arc<Registry>, auth: Authenticator) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .merge(registry::router(registry, auth))
}
