//! The dashboards' HTTP API: the FleetService and InsightService data as JSON under `/api/v1/`, its
//! OpenAPI document at `/api/v1/openapi.json`, Prometheus metrics at `/metrics`, and the console's reads
//! (fleet summary, pages of devices, a rollout's devices, trends) and rollout verbs. The gate
//! (`audit::http_gate`, by `auth::http_policy`) admits every call before a handler runs: reads need a viewer
//! token or console session, changes an operator's. Thin: handlers parse the query and call `fleet`,
//! `bundles`, `insight`, `rollout::reconcile` and `metrics`.
//!
//! JSON bodies are the wire contract's messages as serde writes them (enums as their numbers, as in the
//! proto), so a dashboard reads exactly what a gRPC client would.

use std::collections::HashMap;
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::eval::quality::QualityGates;
use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde::Deserialize;

use crate::app::App;
use crate::audit::ConsoleSession;
use crate::auth::Principal;
use crate::fleet::listing::{self, DeviceFilter};
use crate::insight::queries::{self, QueryError};
use crate::insight::{self, trends::TrendFilter};
use crate::rollout::engine::Verb;
use crate::rollout::reconcile::{self, OperateError};
use crate::store::events::EventQuery;
use crate::store::{BenchmarkFilter, EvaluationFilter, Keyed};

/// Every route this module serves (axum path syntax), in the order the OpenAPI document lists them.
pub const ROUTES: &[&str] = &[
    "/api/v1/summary",
    "/api/v1/devices",
    "/api/v1/devices/{id}",
    "/api/v1/rollouts",
    "/api/v1/rollouts/{id}",
    "/api/v1/rollouts/{id}/devices",
    "/api/v1/rollouts/{id}/{verb}",
    "/api/v1/bundles",
    "/api/v1/compare",
    "/api/v1/benchmarks",
    "/api/v1/evaluations",
    "/api/v1/recommend",
    "/api/v1/trends",
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
        .route("/api/v1/summary", get(summary))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/rollouts", get(rollouts))
        .route("/api/v1/rollouts/{id}", get(rollout))
        .route("/api/v1/rollouts/{id}/devices", get(rollout_devices))
        .route("/api/v1/rollouts/{id}/{verb}", post(operate))
        .route("/api/v1/bundles", get(bundles))
        .route("/api/v1/compare", get(compare))
        .route("/api/v1/benchmarks", get(benchmarks))
        .route("/api/v1/evaluations", get(evaluations))
        .route("/api/v1/recommend", get(recommend))
        .route("/api/v1/trends", get(trends))
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
    class: Option<String>,
    phase: Option<i32>,
    /// A running bundle's digest, or `none`.
    bundle: Option<String>,
    connected: Option<bool>,
    /// A substring of the id or hostname.
    q: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// A page of the devices matching the filters, by id, with how many matched (`total`).
async fn devices(
    State(state): State<DashboardState>,
    Query(q): Query<DevicesQuery>,
) -> Result<Json<proto::ListDevicesResponse>, ApiError> {
    let filter = DeviceFilter {
        selector: parse_selector(q.selector.as_deref())?,
        class: q.class.unwrap_or_default(),
        phase: q.phase,
        bundle: q.bundle.unwrap_or_default(),
        connected: q.connected,
        search: q.q.unwrap_or_default(),
    };
    let fleet = state.app.fleet.clone();
    let all = blocking(move || fleet.devices(&HashMap::new()).map_err(ApiError::internal)).await?;
    let (devices, total) = listing::page(all, &filter, q.offset.unwrap_or(0), q.limit.unwrap_or(0));
    Ok(Json(proto::ListDevicesResponse { devices, total: u32::try_from(total).unwrap_or(u32::MAX) }))
}

/// The fleet at a glance: counts by class, phase and bundle, label values, active rollouts, and the newest
/// event's id (where a live view starts its event stream).
async fn summary(State(state): State<DashboardState>) -> Result<Json<listing::FleetSummary>, ApiError> {
    let app = state.app.clone();
    let summary = blocking(move || {
        let devices = app.fleet.devices(&HashMap::new()).map_err(ApiError::internal)?;
        let mut summary = listing::summarize(&devices);
        let rollouts = app.store.rollouts().map_err(ApiError::internal)?;
        summary.rollouts_active =
            u32::try_from(rollouts.iter().filter(|r| crate::facts::rollout_is_active(r.record())).count())
                .unwrap_or(u32::MAX);
        summary.newest_event_id = app.store.events(&EventQuery::default()).map_err(ApiError::internal)?.last;
        Ok(summary)
    })
    .await?;
    Ok(Json(summary))
}

async fn device(State(state): State<DashboardState>, Path(id): Path<String>) -> Result<Json<proto::Device>, ApiError> {
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

async fn rollouts(State(state): State<DashboardState>) -> Result<Json<proto::ListRolloutsResponse>, ApiError> {
    let fleet = state.app.fleet.clone();
    let rollouts = blocking(move || fleet.store.rollouts().map_err(ApiError::internal)).await?;
    let rollouts = rollouts.into_iter().map(Keyed::into_record).collect();
    Ok(Json(proto::ListRolloutsResponse { rollouts }))
}

async fn rollout(
    State(state): State<DashboardState>,
    Path(id): Path<String>,
) -> Result<Json<proto::Rollout>, ApiError> {
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

/// The devices a rollout moved to its candidate, with each one's outcome.
async fn rollout_devices(
    State(state): State<DashboardState>,
    Path(id): Path<String>,
) -> Result<Json<proto::ListRolloutDevicesResponse>, ApiError> {
    let fleet = state.app.fleet.clone();
    let devices = blocking(move || {
        let not_found = || ApiError(StatusCode::NOT_FOUND, format!("rollout {id:?} does not exist"));
        // An id that does not parse names no rollout.
        let Ok(rollout_id) = RolloutId::new(id.clone()) else { return Err(not_found()) };
        if fleet.store.rollout(&rollout_id).map_err(ApiError::internal)?.is_none() {
            return Err(not_found());
        }
        fleet.store.rollout_devices(&rollout_id).map_err(ApiError::internal)
    })
    .await?;
    Ok(Json(proto::ListRolloutDevicesResponse { devices: devices.into_iter().map(Keyed::into_record).collect() }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct VerbBody {
    reason: String,
}

/// `POST /api/v1/rollouts/{id}/{pause|resume|promote|abort|retry}` with an optional `{"reason": "..."}`:
/// the same verb `alkictl rollout pause` applies, for the operator the gate admitted.
async fn operate(
    State(state): State<DashboardState>,
    Extension(principal): Extension<Principal>,
    Path((id, verb)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<proto::Rollout>, ApiError> {
    let Some(verb) = Verb::from_label(&verb) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{verb:?} is no rollout verb: use pause, resume, promote, abort or retry"),
        ));
    };
    let body: VerbBody = if body.iter().all(u8::is_ascii_whitespace) {
        VerbBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("the body must be {{\"reason\": \"...\"}}: {e}")))?
    };
    let (rollouts, now) = (state.app.rollouts.clone(), state.app.clock.now());
    let operate = move || reconcile::operate_by(&rollouts, &id, verb, &body.reason, &principal.name, now);
    match tokio::task::spawn_blocking(operate).await.map_err(ApiError::internal)? {
        Ok(rollout) => Ok(Json(rollout)),
        Err(e @ OperateError::NotFound(_)) => Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
        Err(e @ OperateError::Verb(_)) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrendsQuery {
    since: Option<i64>,
    class: Option<String>,
    bundle: Option<String>,
}

/// Serving telemetry over time: 5-minute rollups per class, bundle and variant (24 hours unless `since`).
async fn trends(
    State(state): State<DashboardState>,
    Query(q): Query<TrendsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let now = state.app.clock.now().as_millis();
    let filter = TrendFilter {
        since_unix_ms: q.since.unwrap_or(now - 24 * 3600 * 1000),
        class: q.class.unwrap_or_default(),
        bundle: q.bundle.unwrap_or_default(),
    };
    let app = state.app.clone();
    let buckets = blocking(move || {
        let stored = app.store.rollups(UnixMs(filter.since_unix_ms)).map_err(ApiError::internal)?;
        Ok(insight::trends::trends(stored, app.ingest.pending_rollups(), &filter))
    })
    .await?;
    Ok(Json(serde_json::json!({ "buckets": buckets })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BundlesQuery {
    repository: Option<String>,
}

async fn bundles(
    State(state): State<DashboardState>,
    Query(q): Query<BundlesQuery>,
) -> Result<Json<proto::ListBundlesResponse>, ApiError> {
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
    Query(q): Query<CompareQuery>,
) -> Result<Json<proto::Comparison>, ApiError> {
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
    Query(q): Query<BenchmarksQuery>,
) -> Result<Json<proto::ListBenchmarksResponse>, ApiError> {
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
    Query(q): Query<EvaluationsQuery>,
) -> Result<Json<proto::ListEvaluationsResponse>, ApiError> {
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
    Query(q): Query<RecommendQuery>,
) -> Result<Json<proto::Recommendation>, ApiError> {
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
    /// `newest`: the latest events first (a history view); default `oldest`, on from `after`.
    order: Option<String>,
    /// The stream only: `false` leaves out each message's `event:` name, so an EventSource's one `message`
    /// listener gets every type, including types added later (the console reads it so).
    named: Option<bool>,
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
            newest_first: match self.order.as_deref() {
                None | Some("oldest") => false,
                Some("newest") => true,
                Some(other) => {
                    return Err(ApiError(StatusCode::BAD_REQUEST, format!("order {other:?}: use newest or oldest")));
                }
            },
        })
    }
}

async fn events(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Json<proto::ListEventsResponse>, ApiError> {
    let query = q.into_query(&headers)?;
    let store = state.app.store.clone();
    Ok(Json(blocking(move || crate::events::list::list(&store, query).map_err(ApiError::internal)).await?))
}

/// The event log as Server-Sent Events: what matches after `after` (or `Last-Event-ID`), then each new
/// event as it is committed, each with its id so a reconnecting EventSource resumes where it was.
/// A console's stream ends when its session does, so the console's reconnect meets the login.
async fn events_stream(
    State(state): State<DashboardState>,
    console: Option<Extension<ConsoleSession>>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    let named = q.named.unwrap_or(true);
    let query = q.into_query(&headers)?;
    let permit = state.app.watchers.admit().map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let events = crate::events::watch::follow(state.app.store.clone(), query, permit.stop.clone());
    let now = state.app.clock.now().as_millis();
    let session_left =
        console.map(|c| Duration::from_millis(u64::try_from(c.session.expires.as_millis() - now).unwrap_or(0)));
    let stream = async_stream::stream! {
        let _permit = permit;
        let mut events = std::pin::pin!(events);
        let mut session_ends = std::pin::pin!(async move {
            match session_left {
                Some(left) => tokio::time::sleep(left).await,
                None => std::future::pending().await,
            }
        });
        loop {
            let event = tokio::select! {
                event = futures::StreamExt::next(&mut events) => event,
                () = &mut session_ends => return,
            };
            let Some(event) = event else { return };
            match event {
                Ok(event) => {
                    let data = serde_json::to_string(&event).unwrap_or_default();
                    let message = SseEvent::default().id(event.id.to_string()).data(data);
                    yield Ok(if named { message.event(event.r#type.clone()) } else { message });
                }
                Err(error) => {
                    tracing::error!(%error, "Could not read the event log for a stream; ending it.");
                    return;
                }
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(state): State<DashboardState>) -> Result<Response, ApiError> {
    let app = state.app.clone();
    let text = blocking(move || app.scrape().map(|s| crate::metrics::render(&s)).map_err(ApiError::internal)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// The OpenAPI 3.1 document of this API (hand-written; `tests/dashboard.rs` checks its paths against
/// [`ROUTES`] and calls each one on a real controller).
pub const OPENAPI: &str = include_str!("openapi.json");
