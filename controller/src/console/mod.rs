//! The web console under `/ui/`: its embedded files (`assets`) and its login (`session`). Thin: the
//! console's data comes from the same JSON API under `/api/v1/` that dashboards read, which the gate
//! (`audit::http_gate`) admits by session cookie as well as by bearer token.

pub mod assets;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use crate::audit::{Auditor, ConsoleSession, Event};
use crate::auth::{Action, AuthError, Authenticator, Principal};
use session::Sessions;

/// Longest login body read (a token is 69 characters).
const MAX_LOGIN_BODY: usize = 4096;

#[derive(Clone)]
pub struct ConsoleState {
    pub auth: Authenticator,
    pub sessions: Arc<Sessions>,
    pub auditor: Auditor,
    /// The controller serves TLS, so the cookie is marked Secure.
    pub secure: bool,
}

pub fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(assets::index))
        .route("/ui/{*path}", get(assets::file))
        .route("/ui/session", get(whoami))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .with_state(state)
}

/// Who is logged in, as `/ui/session` and `/ui/login` answer.
#[derive(Serialize)]
struct SessionInfo {
    name: String,
    role: String,
    /// What the console sends in `x-alki-csrf` on every change ("" when called with a bearer token).
    csrf: String,
    expires_unix_ms: i64,
}

fn session_info(principal: &Principal, session: Option<&session::Session>) -> SessionInfo {
    SessionInfo {
        name: principal.name.clone(),
        role: format!("{:?}", principal.role).to_lowercase(),
        csrf: session.map(|s| s.csrf.clone()).unwrap_or_default(),
        expires_unix_ms: session.map_or(0, |s| s.expires.as_millis()),
    }
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = Json(serde_json::json!({ "error": message.into() }));
    assets::with_security_headers((status, body).into_response())
}

async fn whoami(Extension(principal): Extension<Principal>, console: Option<Extension<ConsoleSession>>) -> Response {
    let session = console.as_ref().map(|c| &c.session);
    assets::with_security_headers(Json(session_info(&principal, session)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    token: String,
}

/// Checks the token (any role that may read the fleet), opens a session and sets its cookie. Audited under
/// the token's name, and refusals under the peer's address.
async fn login(
    State(state): State<ConsoleState>,
    ConnectInfo(peer): ConnectInfo<crate::listen::PeerAddr>,
    body: Bytes,
) -> Response {
    let peer = peer.0.to_string();
    let request: LoginRequest = match (body.len() <= MAX_LOGIN_BODY).then(|| serde_json::from_slice(&body)) {
        Some(Ok(r)) => r,
        _ => return json_error(StatusCode::BAD_REQUEST, "send {\"token\": \"alki_...\"} as JSON"),
    };
    let auth = state.auth.clone();
    let token = request.token.trim().to_owned();
    let header = format!("Bearer {token}");
    let checked = tokio::task::spawn_blocking(move || auth.authorize(Some(&header), Action::ReadFleet)).await;
    let principal = match checked {
        Ok(Ok(p)) if !p.device => p,
        Ok(Ok(_)) => return refuse_login(&state, peer, StatusCode::FORBIDDEN, "a device's token cannot log in").await,
        Ok(Err(e @ AuthError::Forbidden { .. })) => {
            return refuse_login(&state, peer, StatusCode::FORBIDDEN, e.to_string()).await;
        }
        Ok(Err(AuthError::Store(e))) => {
            tracing::error!(error = %e, "Could not check a console login.");
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not check the token; see the controller's log",
            );
        }
        Ok(Err(e)) => return refuse_login(&state, peer, StatusCode::UNAUTHORIZED, e.to_string()).await,
        Err(e) => {
            tracing::error!(error = %e, "A console login check failed.");
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not check the token; see the controller's log",
            );
        }
    };
    let (id, session) = state.sessions.open(crate::auth::token_hash(&token));
    record_login(&state, &principal, peer, "ok").await;
    tracing::info!(name = %principal.name, "Console login.");
    let mut response = Json(session_info(&principal, Some(&session))).into_response();
    set_cookie(&mut response, &session::set_cookie(&id, state.sessions.ttl(), state.secure));
    assets::with_security_headers(response)
}

async fn refuse_login(state: &ConsoleState, peer: String, status: StatusCode, message: impl Into<String>) -> Response {
    state.sessions.logins_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let event = Event {
        actor: "anonymous".into(),
        protocol: "http",
        action: "POST /ui/login".into(),
        result: format!("http_{}", status.as_u16()),
        peer,
        ..Default::default()
    };
    state.auditor.record(event).await;
    json_error(status, message)
}

async fn record_login(state: &ConsoleState, principal: &Principal, peer: String, result: &str) {
    let event = Event {
        actor: principal.actor(),
        role: format!("{:?}", principal.role).to_lowercase(),
        protocol: "http",
        action: "POST /ui/login".into(),
        target: String::new(),
        result: result.into(),
        peer,
    };
    state.auditor.record(event).await;
}

/// Ends the session the cookie names (the gate checked its CSRF token) and removes the cookie.
async fn logout(State(state): State<ConsoleState>, console: Option<Extension<ConsoleSession>>) -> Response {
    if let Some(Extension(console)) = console {
        state.sessions.close(&console.id);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    set_cookie(&mut response, &session::clear_cookie(state.secure));
    assets::with_security_headers(response)
}

fn set_cookie(response: &mut Response, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}
