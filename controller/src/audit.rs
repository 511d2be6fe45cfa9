//! The gate every gRPC call and HTTP request passes before any handler: authenticate by the tables in
//! [`crate::auth`], rate-limit per token and per peer address ([`crate::limits`]), and record each
//! state-changing call in the audit log (who, what, target, when, result) before its response leaves.
//!
//! Only callers who proved who they are write entries: a call refused before that (no or a bad credential,
//! over a rate, or an unauthenticated Enroll or Renew its handler refused) is counted in
//! [`RefusedCalls`] and logged at most once per [`REFUSAL_LOG_EVERY`], so nobody can flood the log or
//! push genuine history out of its retention. Every stored field is capped and its control characters
//! escaped ([`alki_shared::text::printable`]).
//!
//! This is the one gRPC auth check: an admitted token's [`Principal`] rides in the request's extensions,
//! and handlers read it (`api::principal`) instead of checking a role again; a handler that finds none
//! refuses, so a service mounted without this layer fails closed. A method or route nobody listed is
//! refused rather than open.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use alki_shared::clock::SharedClock;
use alki_shared::proto;
use alki_shared::text::printable;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use http::StatusCode;
use http_body_util::BodyExt as _;
use tokio::sync::{mpsc, oneshot};

use crate::auth::{Access, AuthError, Authenticator, Policy, Principal};
use crate::console::session::{SessionRefusal, Sessions};
use crate::limits::{RateLimiter, RetryAfter};
use crate::store::Store;
use crate::store::audit::{AuditRetention, audit_key};

/// Entries waiting to be written; callers wait (bounded) when the writer falls behind.
const AUDIT_QUEUE: usize = 1024;
/// Entries written in one transaction at most.
const AUDIT_BATCH: usize = 256;
/// Longest target, actor and peer kept in an entry (characters); longer ones are cut.
const MAX_FIELD: usize = 256;
/// Longest action, role and result kept (characters).
const MAX_SHORT_FIELD: usize = 128;
/// At most one log line per this long tells of refused calls (with how many there were since the last).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// A state-changing call to record; [`Auditor::record`] stamps its id and time.
#[derive(Clone, Debug, Default)]
pub struct Event {
    pub actor: String,
    pub role: String,
    pub protocol: &'static str,
    pub action: String,
    pub target: String,
    pub result: String,
    pub peer: String,
}

type Pending = (Event, oneshot::Sender<()>);

/// Writes audit entries in batches on a blocking thread. Cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Pending>,
}

impl Auditor {
    /// Starts the writer; it ends when the last `Auditor` clone is dropped.
    pub fn start(store: Store, retention: AuditRetention, clock: SharedClock) -> Auditor {
        let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
        tokio::spawn(write_loop(store, retention, clock, rx));
        Auditor { tx }
    }

    /// Records `event` and returns once it is committed (or the write failed, which is logged): a caller
    /// that sees its response can read its entry back.
    pub async fn record(&self, event: Event) {
        let (done, committed) = oneshot::channel();
        if self.tx.send((event, done)).await.is_err() {
            tracing::error!("The audit writer has stopped; an audit entry was lost.");
            return;
        }
        let _ = committed.await;
    }
}

async fn write_loop(store: Store, retention: AuditRetention, clock: SharedClock, mut rx: mpsc::Receiver<Pending>) {
    let seq = AtomicU64::new(0);
    let mut batch = Vec::with_capacity(AUDIT_BATCH);
    while rx.recv_many(&mut batch, AUDIT_BATCH).await > 0 {
        let now = clock.now();
        let (entries, waiters): (Vec<proto::AuditEntry>, Vec<oneshot::Sender<()>>) = batch
            .drain(..)
            .map(|(e, done)| {
                let id = audit_key(now, seq.fetch_add(1, Ordering::Relaxed));
                let entry = proto::AuditEntry {
                    id,
                    unix_ms: now.as_millis(),
                    actor: printable(&e.actor, MAX_FIELD),
                    role: printable(&e.role, MAX_SHORT_FIELD),
                    protocol: e.protocol.to_owned(),
                    action: printable(&e.action, MAX_SHORT_FIELD),
                    target: printable(&e.target, MAX_FIELD),
                    result: printable(&e.result, MAX_SHORT_FIELD),
                    peer: printable(&e.peer, MAX_FIELD),
                };
                (entry, done)
            })
            .unzip();
        let store = store.clone();
        let count = entries.len();
        let written = tokio::task::spawn_blocking(move || store.append_audit(&entries, retention, now)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, count, "Could not write audit entries; they are lost."),
            Err(error) => tracing::error!(%error, count, "The audit write task failed; entries are lost."),
        }
        for done in waiters {
            let _ = done.send(());
        }
    }
}

/// Why a call was counted instead of recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalReason {
    /// The caller did not prove who it is (no, a bad or a revoked credential; or an Enroll or Renew that its
    /// handler refused).
    Unauthenticated,
    /// Over its token's or its peer address's rate.
    RateLimited,
}

impl RefusalReason {
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::Unauthenticated => "unauthenticated",
            RefusalReason::RateLimited => "rate_limited",
        }
    }
}

/// Calls refused before their caller was established, counted per method and reason (the methods are the
/// authorization table's gRPC paths and `http`, so the map stays small), with a sampled log line.
#[derive(Default)]
pub struct RefusedCalls {
    inner: Mutex<RefusedInner>,
}

#[derive(Default)]
struct RefusedInner {
    counts: BTreeMap<(String, RefusalReason), u64>,
    last_log: Option<Instant>,
    since_log: u64,
}

impl RefusedCalls {
    /// Counts one refused call; logs it (with the count since the last line) unless a line was written
    /// within [`REFUSAL_LOG_EVERY`].
    pub fn count(&self, method: &str, reason: RefusalReason, peer: &str, detail: &str) {
        let since_log = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            *inner.counts.entry((method.to_owned(), reason)).or_default() += 1;
            inner.since_log += 1;
            let now = Instant::now();
            if inner.last_log.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY) {
                return;
            }
            inner.last_log = Some(now);
            std::mem::take(&mut inner.since_log)
        };
        tracing::warn!(
            method,
            reason = reason.label(),
            peer = %printable(peer, 64),
            detail = %printable(detail, 200),
            refused_since_last_line = since_log,
            "Refused calls from unestablished or too fast callers (one line per 10 s; counted in alki_calls_refused_total)."
        );
    }

    /// (method, reason, count) for every pair seen.
    pub fn snapshot(&self) -> Vec<(String, &'static str, u64)> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.counts.iter().map(|((method, reason), n)| (method.clone(), reason.label(), *n)).collect()
    }
}

/// What the gate needs; shared by the gRPC layer and the HTTP middleware.
#[derive(Clone)]
pub struct Gate {
    pub auth: Authenticator,
    pub auditor: Auditor,
    pub token_limiter: Arc<RateLimiter>,
    pub refused: Arc<RefusedCalls>,
    /// Web console logins: an HTTP request without an Authorization header may present one's cookie.
    pub sessions: Arc<Sessions>,
}

/// What a caller presented.
enum Credential {
    /// The `Authorization` header, if any.
    Header(Option<String>),
    /// A console session's token (its hash).
    Session(String),
}

/// The console session an HTTP request was admitted by, for the handlers that read it (`/ui/session`,
/// `/ui/logout`, event streams that end when it does).
#[derive(Clone, Debug)]
pub struct ConsoleSession {
    pub id: String,
    pub session: crate::console::session::Session,
}

/// The outcome of checking a caller against a policy.
enum Admission {
    /// May proceed; `actor` and `role` name it for the audit log and the rate limiter, and `principal` is
    /// the token's holder when the access needed one (the handler reads it).
    Allowed {
        actor: String,
        role: String,
        principal: Option<Principal>,
    },
    Refused(Refusal),
}

enum Refusal {
    Auth(AuthError),
    Session(SessionRefusal),
    RateLimited(String, RetryAfter),
    Internal(String),
}

impl Gate {
    /// Authenticates (on a blocking thread: the token lookup reads the store) and rate-limits.
    async fn admit(&self, policy: Policy, credential: Credential, peer: &str) -> Admission {
        let principal = match policy.access {
            Access::Public => {
                return Admission::Allowed { actor: "anonymous".into(), role: String::new(), principal: None };
            }
            // The handler checks the certificate or the bootstrap token; the limit here is per peer address,
            // so a guesser cannot try tokens quickly nor a flood of Renew calls crowd others out. (The agent
            // handler also limits each device's session opens and messages: many devices may share one
            // address behind NAT, which this limit's burst allows for.)
            Access::Device | Access::BootstrapToken | Access::Login => {
                let key = format!("peer:{}", peer.rsplit_once(':').map_or(peer, |(ip, _)| ip));
                if let Err(wait) = self.token_limiter.check(&key, Instant::now()) {
                    return Admission::Refused(Refusal::RateLimited(key, wait));
                }
                let actor = match policy.access {
                    Access::Device => "device",
                    Access::Login => "login",
                    _ => "bootstrap",
                };
                return Admission::Allowed { actor: actor.into(), role: String::new(), principal: None };
            }
            Access::Token(action) => {
                let auth = self.auth.clone();
                let check = move || match credential {
                    Credential::Header(header) => auth.authorize(header.as_deref(), action),
                    Credential::Session(token_hash) => auth.authorize_hash(&token_hash, action),
                };
                match tokio::task::spawn_blocking(check).await {
                    Ok(Ok(principal)) => principal,
                    Ok(Err(error)) => return Admission::Refused(Refusal::Auth(error)),
                    Err(error) => return Admission::Refused(Refusal::Internal(error.to_string())),
                }
            }
        };
        let actor = principal.actor();
        if let Err(wait) = self.token_limiter.check(&actor, Instant::now()) {
            return Admission::Refused(Refusal::RateLimited(actor, wait));
        }
        let role = format!("{:?}", principal.role).to_lowercase();
        Admission::Allowed { actor, role, principal: Some(principal) }
    }
}

// ---------------------------------------------------------------------------------------------------------
// gRPC

/// The tower layer tonic's server runs every call through.
#[derive(Clone)]
pub struct GrpcGateLayer {
    gate: Gate,
    max_message: usize,
}

impl GrpcGateLayer {
    /// `max_message` bounds how much of a state-changing call's request is read to name its target.
    pub fn new(gate: Gate, max_message: usize) -> GrpcGateLayer {
        GrpcGateLayer { gate, max_message }
    }
}

impl<S> tower::Layer<S> for GrpcGateLayer {
    type Service = GrpcGate<S>;
    fn layer(&self, inner: S) -> GrpcGate<S> {
        GrpcGate { inner, gate: self.gate.clone(), max_message: self.max_message }
    }
}

#[derive(Clone)]
pub struct GrpcGate<S> {
    inner: S,
    gate: Gate,
    max_message: usize,
}

type GrpcRequest = http::Request<tonic::body::Body>;
type GrpcResponse = http::Response<tonic::body::Body>;

impl<S> tower::Service<GrpcRequest> for GrpcGate<S>
where
    S: tower::Service<GrpcRequest, Response = GrpcResponse> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<GrpcResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: GrpcRequest) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        let max_message = self.max_message;
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let Some(policy) = crate::auth::grpc_policy(&path) else {
                return Ok(status_response(tonic::Status::permission_denied(format!(
                    "{path} is not in the controller's authorization table (auth::grpc_policy), so nobody may call it"
                ))));
            };
            let peer = grpc_peer(&request);
            let authorization =
                request.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let credential = Credential::Header(authorization);
            let (actor, role, established) = match gate.admit(policy, credential, &peer).await {
                Admission::Allowed { actor, role, principal } => {
                    let established = principal.is_some();
                    // The handler reads who was admitted from here (`api::principal`).
                    if let Some(principal) = principal {
                        request.extensions_mut().insert(principal);
                    }
                    (actor, role, established)
                }
                Admission::Refused(refusal) => {
                    let known = refused_actor(&refusal);
                    let reason = refusal_reason(&refusal);
                    let status = refusal_status(refusal);
                    match (known, reason) {
                        (Some((actor, role)), _) if policy.mutates => {
                            let result = code_name(status.code());
                            record(&gate, &actor, &role, &path, String::new(), &result, peer).await;
                        }
                        (_, Some(reason)) => gate.refused.count(&path, reason, &peer, status.message()),
                        _ => {}
                    }
                    return Ok(status_response(status));
                }
            };
            if !policy.mutates {
                return inner.call(request).await;
            }
            // Read the (small, bounded) unary request to name its target, then hand it on unchanged.
            let (parts, body) = request.into_parts();
            let limited = http_body_util::Limited::new(body, max_message.saturating_add(5));
            let bytes = match limited.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let status = if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                        tonic::Status::resource_exhausted(format!(
                            "the request is larger than the controller's limit of {max_message} bytes"
                        ))
                    } else {
                        tonic::Status::cancelled(format!("the request did not arrive whole: {error}"))
                    };
                    let result = code_name(status.code());
                    if established {
                        record(&gate, &actor, &role, &path, String::new(), &result, peer).await;
                    } else {
                        gate.refused.count(&path, RefusalReason::Unauthenticated, &peer, &result);
                    }
                    return Ok(status_response(status));
                }
            };
            let target = grpc_target(&path, &bytes);
            let request = http::Request::from_parts(parts, tonic::body::Body::new(http_body_util::Full::new(bytes)));
            let response = inner.call(request).await?;
            let result = grpc_result(&response);
            if !established && result != "ok" {
                // An Enroll or Renew its handler refused: the caller never proved who it is.
                gate.refused.count(&path, RefusalReason::Unauthenticated, &peer, &result);
            } else {
                record(&gate, &actor, &role, &path, target, &result, peer).await;
            }
            Ok(response)
        })
    }
}

async fn record(gate: &Gate, actor: &str, role: &str, action: &str, target: String, result: &str, peer: String) {
    let event = Event {
        actor: actor.to_owned(),
        role: role.to_owned(),
        protocol: "grpc",
        action: action.to_owned(),
        target,
        result: result.to_owned(),
        peer,
    };
    gate.auditor.record(event).await;
}

/// A refused caller the log should name: one that authenticated but lacked the role. Unauthenticated noise
/// and calls over a rate are counted instead ([`refusal_reason`]): recording them would let anyone fill
/// the log.
fn refused_actor(refusal: &Refusal) -> Option<(String, String)> {
    match refusal {
        Refusal::Auth(AuthError::Forbidden { name, role, .. }) => {
            Some((format!("token:{name}"), format!("{role:?}").to_lowercase()))
        }
        _ => None,
    }
}

/// How a refusal is counted in [`RefusedCalls`] (a failed credential check is logged where it fails).
fn refusal_reason(refusal: &Refusal) -> Option<RefusalReason> {
    match refusal {
        Refusal::Auth(AuthError::Missing | AuthError::Invalid | AuthError::Revoked { .. }) => {
            Some(RefusalReason::Unauthenticated)
        }
        Refusal::Session(_) => Some(RefusalReason::Unauthenticated),
        Refusal::RateLimited(..) => Some(RefusalReason::RateLimited),
        _ => None,
    }
}

fn status_response(status: tonic::Status) -> GrpcResponse {
    status.into_http()
}

fn refusal_status(refusal: Refusal) -> tonic::Status {
    match refusal {
        Refusal::Auth(error) => crate::api::auth_status(error),
        // gRPC never reads cookies; a console session cannot be the reason.
        Refusal::Session(error) => tonic::Status::unauthenticated(error.to_string()),
        Refusal::RateLimited(who, RetryAfter(wait)) => tonic::Status::resource_exhausted(format!(
            "{who} is over its request rate; retry in {} ms",
            wait.as_millis().max(1)
        )),
        Refusal::Internal(error) => crate::api::internal(error),
    }
}

fn grpc_peer(request: &GrpcRequest) -> String {
    request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// A unary call's result: errors come back trailers-only with `grpc-status` in the headers; a response
/// without it carries a message and ends OK.
fn grpc_result(response: &GrpcResponse) -> String {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
        .unwrap_or(tonic::Code::Ok);
    code_name(code)
}

fn code_name(code: tonic::Code) -> String {
    if code == tonic::Code::Ok {
        return "ok".into();
    }
    // `Code`'s Debug is CamelCase ("PermissionDenied"); the audit log uses the wire names.
    let camel = format!("{code:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// What a state-changing call acts on, read from its request (one gRPC frame: a compression flag and a
/// length, 5 bytes, then the message, which only `alki_shared::proto` decodes).
fn grpc_target(path: &str, frame: &[u8]) -> String {
    let Some(message) = frame.get(5..) else { return String::new() };
    if frame.first() != Some(&0) {
        return String::new(); // Compressed: the target stays unnamed rather than decompressed here.
    }
    proto::audit_target(path, message)
}

// ---------------------------------------------------------------------------------------------------------
// HTTP

/// axum middleware (`axum::middleware::from_fn_with_state(gate, audit::http_gate)`) around every route.
/// A request without an `Authorization` header to a route that needs a token may present a console
/// session's cookie instead (and, to change anything, the session's CSRF token).
pub async fn http_gate(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let policy = crate::auth::http_policy(&method, &path);
    let registry = path == "/v2" || path.starts_with("/v2/");
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::listen::PeerAddr>>()
        .map(|c| c.0.0.to_string())
        .unwrap_or_default();
    let authorization =
        request.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let console = match console_session(&gate, policy, authorization.is_some(), &method, request.headers()) {
        Ok(console) => console,
        Err(refusal) => {
            if let Some(reason) = refusal_reason(&refusal) {
                gate.refused.count("http", reason, &peer, method.as_str());
            }
            return http_refusal(refusal, registry);
        }
    };
    let credential = match &console {
        Some(c) => Credential::Session(c.session.token_hash.clone()),
        None => Credential::Header(authorization),
    };
    let (actor, role) = match gate.admit(policy, credential, &peer).await {
        Admission::Allowed { actor, role, principal } => {
            // Handlers read who was admitted from here, as gRPC handlers do.
            if let Some(principal) = principal {
                request.extensions_mut().insert(principal);
            }
            if let Some(console) = console {
                request.extensions_mut().insert(console);
            }
            (actor, role)
        }
        Admission::Refused(refusal) => {
            match (refused_actor(&refusal), refusal_reason(&refusal)) {
                (Some((actor, role)), _) if policy.mutates => {
                    let (action, target) = http_action(&method, &path);
                    let result = "http_403".to_owned();
                    let event = Event { actor, role, protocol: "http", action, target, result, peer };
                    gate.auditor.record(event).await;
                }
                (_, Some(reason)) => gate.refused.count("http", reason, &peer, method.as_str()),
                _ => {}
            }
            return http_refusal(refusal, registry);
        }
    };
    let response = next.run(request).await;
    if policy.mutates {
        let (action, target) = http_action(&method, &path);
        let status = response.status();
        let result = if status.is_success() { "ok".to_owned() } else { format!("http_{}", status.as_u16()) };
        let event = Event { actor, role, protocol: "http", action, target, result, peer };
        gate.auditor.record(event).await;
    }
    response
}

/// The console session a request presents by cookie, where it stands in for a token: on a route that needs
/// one, without an `Authorization` header (which wins). A change must carry the session's CSRF token.
fn console_session(
    gate: &Gate,
    policy: Policy,
    has_authorization: bool,
    method: &http::Method,
    headers: &http::HeaderMap,
) -> Result<Option<ConsoleSession>, Refusal> {
    let needs_token = matches!(policy.access, Access::Token(_));
    let Some(id) = crate::console::session::cookie_session(headers).filter(|_| needs_token && !has_authorization)
    else {
        return Ok(None);
    };
    let session = gate.sessions.get(&id).map_err(Refusal::Session)?;
    crate::console::session::check_csrf(&session, method, headers).map_err(Refusal::Session)?;
    Ok(Some(ConsoleSession { id, session }))
}

/// `("PUT /v2/{name}/manifests/{reference}", "acme/qwen:latest")`: the route's shape and what it names.
fn http_action(method: &http::Method, path: &str) -> (String, String) {
    if let Some(rest) = path.strip_prefix("/v2/") {
        for (marker, template, sep) in [
            ("/manifests/", "/v2/{name}/manifests/{reference}", ":"),
            ("/blobs/uploads/", "/v2/{name}/blobs/uploads/{id}", " upload "),
            ("/blobs/", "/v2/{name}/blobs/{digest}", "@"),
        ] {
            if let Some((name, tail)) = rest.rsplit_once(marker) {
                return (format!("{method} {template}"), format!("{name}{sep}{tail}"));
            }
        }
    }
    (format!("{method} {path}"), String::new())
}

fn http_refusal(refusal: Refusal, registry: bool) -> Response {
    let (status, code, message, headers): (StatusCode, &str, String, Vec<(&str, String)>) = match refusal {
        Refusal::Auth(error @ (AuthError::Missing | AuthError::Invalid | AuthError::Revoked { .. })) => (
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            error.to_string(),
            vec![("www-authenticate", "Basic realm=\"alki\"".to_owned())],
        ),
        Refusal::Auth(error @ AuthError::Forbidden { .. }) => {
            (StatusCode::FORBIDDEN, "DENIED", error.to_string(), vec![])
        }
        Refusal::Session(error @ SessionRefusal::Ended) => {
            (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", error.to_string(), vec![])
        }
        Refusal::Session(error @ SessionRefusal::Csrf) => (StatusCode::FORBIDDEN, "DENIED", error.to_string(), vec![]),
        Refusal::Auth(AuthError::Store(error)) => {
            tracing::error!(%error, "Could not check credentials.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "could not check credentials; see the controller's log".into(),
                vec![],
            )
        }
        Refusal::RateLimited(who, RetryAfter(wait)) => (
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            format!("{who} is over its request rate; retry in {} ms", wait.as_millis().max(1)),
            vec![("retry-after", wait.as_secs().max(1).to_string())],
        ),
        Refusal::Internal(error) => {
            tracing::error!(%error, "Credential check failed.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "could not check credentials; see the controller's log".into(),
                vec![],
            )
        }
    };
    // Only registry clients are asked for Basic credentials: a browser would answer a `WWW-Authenticate:
    // Basic` on the console's API calls with its own password dialog, stalling the console's fetch.
    let headers: Vec<(&str, String)> =
        headers.into_iter().filter(|(name, _)| registry || *name != "www-authenticate").collect();
    // Registry clients read the distribution spec's error body; everything else gets `{"error": ...}`.
    let body = if registry {
        serde_json::json!({"errors": [{"code": code, "message": message}]})
    } else {
        serde_json::json!({"error": message, "code": code})
    };
    let mut response = (status, [(http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    for (name, value) in headers {
        if let Ok(value) = http::HeaderValue::try_from(value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_use_their_wire_names() {
        assert_eq!(code_name(tonic::Code::Ok), "ok");
        assert_eq!(code_name(tonic::Code::PermissionDenied), "PERMISSION_DENIED");
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
    }

    #[test]
    fn registry_paths_name_their_route_and_target() {
        let (action, target) = http_action(&http::Method::PUT, "/v2/acme/qwen/manifests/latest");
        assert_eq!((action.as_str(), target.as_str()), ("PUT /v2/{name}/manifests/{reference}", "acme/qwen:latest"));
        let (action, target) = http_action(&http::Method::DELETE, "/v2/a/blobs/sha256:ab");
        assert_eq!((action.as_str(), target.as_str()), ("DELETE /v2/{name}/blobs/{digest}", "a@sha256:ab"));
        assert_eq!(http_action(&http::Method::POST, "/api/v1/registry/gc").0, "POST /api/v1/registry/gc");
    }
}
