//! The dashboards' HTTP API: the FleetService and InsightService data as JSON under `/api/v1/`, its
//! OpenAPI document at `/api/v1/openapi.json`, and Prometheus metrics at `/metrics`. Every route needs a
//! token of role viewer (or above), checked by the same `auth::Authenticator` as gRPC. Thin: handlers
//! authenticate, parse the query, and call `fleet`, `bundles`, `insight::queries` and `metrics`.
//!
//! JSON bodies are the wire contract's messages as serde writes them (enums as their numbers, as in the
//! proto), so a dashboard reads exactly what a gRPC client would.

use std::collections::HashMap;

use alki_shared::eval::quality::QualityGates;
use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto;
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::app::App;
use crate::auth::{Action, AuthError};
use crate::insight::queries::{self, QueryError};
use crate::store::events::EventQuery;
use crate::store::{BenchmarkFilter, EvaluationFilter, Keyed};

/// Every route this module serves (axum path syntax), in the order the OpenAPI document lists them.
pub const ROUTES: &[&str] = &[
    "/api/v1/devices",
    "/api/v1/devices/{id}",
    "/api/v1/rollouts",
    "/api/v1/rollouts/{id}",
    "/api/v1/bundles",
    "/api/v1/compare",
    "/api/v1/benchmarks",
    "/api/v1/evaluations",
    "/api/v1/recommend",
    "/api/v1/events",
    "/api/v1/events/stream",
    "/api/v1/openapi.json",
    "/metrics",
];

#[derive(Clone)]
pub struct DashboardState {
    pub app: App,
}

pub fn router(state: DashboardState) -> Router {
    Router::new()
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/rollouts", get(rollouts))
        .route("/api/v1/rollouts/{id}", get(rollout))
        .route("/api/v1/bundles", get(bundles))
        .route("/api/v1/compare", get(compare))
        .route("/api/v1/benchmarks", get(benchmarks))
        .route("/api/v1/evaluations", get(evaluations))
        .route("/api/v1/recommend", get(recommend))
        .route("/api/v1/events", get(events))
        .route("/api/v1/events/stream", get(events_stream))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// An error as JSON: `{"error": "..."}` with a status that says whose fault it is.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl ApiError {
    fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "Dashboard request failed inside the controller.");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the controller failed to handle the request; its log says why".into(),
        )
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        match e {
            QueryError::RolloutNotFound(_) | QueryError::DeviceNotFound(_) => {
                ApiError(StatusCode::NOT_FOUND, e.to_string())
            }
            QueryError::NoTargets | QueryError::Recommend(_) => ApiError(StatusCode::BAD_REQUEST, e.to_string()),
            QueryError::Store(e) => ApiError::internal(e),
        }
    }
}

fn authorize(state: &DashboardState, headers: &HeaderMap) -> Result<(), ApiError> {
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.app.auth.authorize(header, Action::ReadFleet) {
        Ok(_) => Ok(()),
        Err(e @ (AuthError::Missing | AuthError::Invalid)) => Err(ApiError(StatusCode::UNAUTHORIZED, e.to_string())),
        Err(e @ AuthError::Forbidden { .. }) => Err(ApiError(StatusCode::FORBIDDEN, e.to_string())),
        Err(AuthError::Store(e)) => Err(ApiError::internal(e)),
        #[allow(unreachable_patterns)]
        Err(e) => Err(ApiError(StatusCode::FORBIDDEN, e.to_string())),
    }
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)?
}

/// `selector=k=v,k2=v2` → labels.
fn parse_selector(s: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in s.unwrap_or_default().split(',').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_owned(), v.to_owned());
            }
            _ => return Err(ApiError(StatusCode::BAD_REQUEST, format!("selector {pair:?} is not key=value"))),
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesQuery {
    selector: Option<String>,
}

async fn devices(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<DevicesQuery>,
) -> Result<Json<proto::ListDevicesResponse>, ApiError> {
    authorize(&state, &headers)?;
    let selector = parse_selector(q.selector.as_deref())?;
    let fleet = state.app.fleet.clone();
    let devices = blocking(move || fleet.devices(&selector).map_err(ApiError::internal)).await?;
    Ok(Json(proto::ListDevicesResponse { devices }))
}

async fn device(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<proto::Device>, ApiError> {
    authorize(&state, &headers)?;
    let fleet = state.app.fleet.clone();
    let found = blocking(move || {
        let not_found = || ApiError(StatusCode::NOT_FOUND, format!("device {id:?} is not known to this controller"));
        // An id that does not parse names no device.
        let Ok(device_id) = DeviceId::new(id.clone()) else { return Err(not_found()) };
        fleet.device(&device_id).map_err(ApiError::internal)?.ok_or_else(not_found)
    })
    .await?;
    Ok(Json(found))
}

async fn rollouts(
    State(state): State<DashboardState>,
    headers: HeaderMap,
) -> Result<Json<proto::ListRolloutsResponse>, ApiError> {
    authorize(&state, &headers)?;
    let fleet = state.app.fleet.clone();
    let rollouts = blocking(move || fleet.store.rollouts().map_err(ApiError::internal)).await?;
    let rollouts = rollouts.into_iter().map(Keyed::into_record).collect();
    Ok(Json(proto::ListRolloutsResponse { rollouts }))
}

async fn rollout(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<proto::Rollout>, ApiError> {
    authorize(&state, &headers)?;
    let fleet = state.app.fleet.clone();
    let found = blocking(move || {
        let not_found = || ApiError(StatusCode::NOT_FOUND, format!("rollout {id:?} does not exist"));
        // An id that does not parse names no rollout.
        let Ok(rollout_id) = RolloutId::new(id.clone()) else { return Err(not_found()) };
        fleet.store.rollout(&rollout_id).map_err(ApiError::internal)?.ok_or_else(not_found)
    })
    .await?;
    Ok(Json(found))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BundlesQuery {
    repository: Option<String>,
}

async fn bundles(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<BundlesQuery>,
) -> Result<Json<proto::ListBundlesResponse>, ApiError> {
    authorize(&state, &headers)?;
    let app = state.app.clone();
    let bundles = blocking(move || {
        let repository = q.repository.as_deref().filter(|r| !r.is_empty());
        let (sources, store) = (&app.sources, &app.store);
        crate::bundles::list(&sources.registry, store, &sources.trusted_keys, repository).map_err(ApiError::internal)
    })
    .await?;
    Ok(Json(proto::ListBundlesResponse { bundles }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareQuery {
    rollout: Option<String>,
}

async fn compare(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<CompareQuery>,
) -> Result<Json<proto::Comparison>, ApiError> {
    authorize(&state, &headers)?;
    let Some(id) = q.rollout.filter(|r| !r.is_empty()) else {
        return Err(ApiError(StatusCode::BAD_REQUEST, "name the rollout: /api/v1/compare?rollout=ID".into()));
    };
    // An id that does not parse names no rollout.
    let id = RolloutId::new(id.clone()).map_err(|_| ApiError::from(QueryError::RolloutNotFound(id)))?;
    let fleet = state.app.fleet.clone();
    Ok(Json(blocking(move || Ok(queries::comparison(&fleet, &id)?)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchmarksQuery {
    device: Option<String>,
    bundle: Option<String>,
    class: Option<String>,
    limit: Option<u32>,
}

async fn benchmarks(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<BenchmarksQuery>,
) -> Result<Json<proto::ListBenchmarksResponse>, ApiError> {
    authorize(&state, &headers)?;
    let filter = BenchmarkFilter {
        device_id: q.device.unwrap_or_default(),
        bundle_digest: q.bundle.unwrap_or_default(),
        class: q.class.unwrap_or_default(),
    };
    let fleet = state.app.fleet.clone();
    let results = blocking(move || Ok(queries::benchmarks(&fleet, &filter, q.limit.unwrap_or(0))?)).await?;
    Ok(Json(proto::ListBenchmarksResponse { results }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluationsQuery {
    device: Option<String>,
    bundle: Option<String>,
    suite: Option<String>,
    class: Option<String>,
    rollout: Option<String>,
    limit: Option<u32>,
}

async fn evaluations(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<EvaluationsQuery>,
) -> Result<Json<proto::ListEvaluationsResponse>, ApiError> {
    authorize(&state, &headers)?;
    let filter = EvaluationFilter {
        device_id: q.device.unwrap_or_default(),
        bundle_digest: q.bundle.unwrap_or_default(),
        suite_digest: q.suite.unwrap_or_default(),
        class: q.class.unwrap_or_default(),
        rollout_id: q.rollout.unwrap_or_default(),
    };
    let fleet = state.app.fleet.clone();
    let evaluations = blocking(move || Ok(queries::evaluations(&fleet, &filter, q.limit.unwrap_or(0))?)).await?;
    Ok(Json(proto::ListEvaluationsResponse { evaluations }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecommendQuery {
    /// Bundle (index) digest.
    bundle: Option<String>,
    min_quantization: Option<String>,
    /// The quality floor (replaces min_quantization), measured with the eval suite of this digest.
    suite: Option<String>,
    max_kld: Option<f64>,
    min_top1_agreement: Option<f64>,
    max_perplexity_ratio: Option<f64>,
    min_golden_pass: Option<f64>,
}

async fn recommend(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<RecommendQuery>,
) -> Result<Json<proto::Recommendation>, ApiError> {
    authorize(&state, &headers)?;
    let Some(digest) = q.bundle.filter(|b| b.starts_with("sha256:")) else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "name the bundle by digest: /api/v1/recommend?bundle=sha256:...".into(),
        ));
    };
    let gates = QualityGates {
        max_kld: q.max_kld,
        min_top1_agreement: q.min_top1_agreement,
        max_perplexity_ratio: q.max_perplexity_ratio,
        min_golden_pass: q.min_golden_pass,
    };
    let floor = match (gates.is_empty(), q.suite.filter(|s| s.starts_with("sha256:"))) {
        (true, _) => None,
        (false, Some(suite)) => Some((gates, suite)),
        (false, None) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "a quality floor is measured with an eval suite: add suite=sha256:... (its digest)".into(),
            ));
        }
    };
    let fleet = state.app.fleet.clone();
    let min = q.min_quantization.unwrap_or_default();
    let d = digest.clone();
    let classes = blocking(move || {
        let floor = floor.as_ref().map(|(gates, suite)| (*gates, suite.as_str()));
        Ok(queries::recommendation(&fleet, &d, &min, floor)?)
    })
    .await?;
    let bundle = proto::BundleRef { digest, ..Default::default() };
    Ok(Json(proto::Recommendation { bundle: Some(bundle), classes }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<u64>,
    rollout: Option<String>,
    device: Option<String>,
    /// Comma-separated type prefixes.
    types: Option<String>,
    limit: Option<usize>,
}

impl EventsQuery {
    /// The store query; a `Last-Event-ID` header (an EventSource reconnecting) wins over `after`.
    fn into_query(self, headers: &HeaderMap) -> Result<EventQuery, ApiError> {
        let last_event_id = match headers.get("last-event-id") {
            None => None,
            Some(v) => Some(v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).ok_or_else(|| {
                ApiError(StatusCode::BAD_REQUEST, "Last-Event-ID must be an event id (a number)".into())
            })?),
        };
        Ok(EventQuery {
            after: last_event_id.or(self.after).unwrap_or(0),
            rollout_id: self.rollout.unwrap_or_default(),
            device_id: self.device.unwrap_or_default(),
            types: self.types.unwrap_or_default().split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect(),
            limit: self.limit.unwrap_or(0),
        })
    }
}

async fn events(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Json<proto::ListEventsResponse>, ApiError> {
    authorize(&state, &headers)?;
    let query = q.into_query(&headers)?;
    let store = state.app.store.clone();
    Ok(Json(blocking(move || crate::events::list::list(&store, query).map_err(ApiError::internal)).await?))
}

/// The event log as Server-Sent Events: what matches after `after` (or `Last-Event-ID`), then each new
/// event as it is committed, each with its id so a reconnecting EventSource resumes where it was.
async fn events_stream(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    authorize(&state, &headers)?;
    let query = q.into_query(&headers)?;
    let permit = state.app.watchers.admit().map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let events = crate::events::watch::follow(state.app.store.clone(), query, permit.stop.clone());
    let stream = async_stream::stream! {
        let _permit = permit;
        let mut events = std::pin::pin!(events);
        while let Some(event) = futures::StreamExt::next(&mut events).await {
            match event {
                Ok(event) => {
                    let data = serde_json::to_string(&event).unwrap_or_default();
                    yield Ok(SseEvent::default().id(event.id.to_string()).event(event.r#type.clone()).data(data));
                }
                Err(error) => {
                    tracing::error!(%error, "Could not read the event log for a stream; ending it.");
                    return;
                }
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15))))
}

async fn openapi(State(state): State<DashboardState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response())
}

async fn metrics(State(state): State<DashboardState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let app = state.app.clone();
    let text = blocking(move || app.scrape().map(|s| crate::metrics::render(&s)).map_err(ApiError::internal)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// The OpenAPI 3.1 document of this API (hand-written; `tests/dashboard.rs` checks its paths against
/// [`ROUTES`] and calls each one on a real controller).
pub const OPENAPI: &str = include_str!("openapi.json");
