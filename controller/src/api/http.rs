//! The HTTP side: the OCI registry under `/v2/`, and the unauthenticated probes `/healthz` and `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

use crate::auth::Authenticator;
use crate::fleet::registry_view::RegistryView;
use crate::registry::{self, Registry};
use crate::store::Store;

pub fn router(registry: Arc<Registry>, auth: Authenticator, store: Store) -> Router {
    let view = Arc::new(RegistryView::new(store, registry.clone()));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .merge(registry::router(registry, auth, view))
}
