//! The front proxy: one stable port for clients, forwarding every request (streaming both ways) to the
//! current llama-server, switched atomically; counts requests, errors and in-flight requests per upstream.
//! During a gap with no upstream (a stop-then-start swap, a rollback) the proxy *holds*: requests wait,
//! bounded in time and number, for the next upstream, and get 503 with `Retry-After` if it does not come.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How long an upstream may take to start answering a request. Non-streaming completions answer only
/// when generation ends, so this is generous; streaming responses are not bounded once they start.
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(600);
/// What `Retry-After` says while no model is served.
const RETRY_AFTER_SECS: &str = "5";
/// Requests that may wait at once for an upstream during a gap; more get 503 at once.
pub const MAX_GAP_WAITERS: usize = 1024;

/// The HTTP client used towards llama-server instances (loopback, HTTP/1.1, pooled).
pub type HttpClient = Client<HttpConnector, Body>;

pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector)
}

/// Requests and errors seen for one bundle since the agent started.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of the counters of the bundle being served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyStats {
    pub bundle_digest: String,
    pub requests_total: u64,
    pub request_errors_total: u64,
}

/// One llama-server instance the proxy can forward to.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    bundle_digest: String,
    in_flight: AtomicUsize,
    counters: Arc<Counters>,
}

impl Upstream {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn bundle_digest(&self) -> &str {
        &self.bundle_digest
    }

    /// Requests forwarded to this upstream whose response has not finished yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// Held for the whole life of a proxied request, response body included.
struct InFlight(Arc<Upstream>);

impl InFlight {
    fn enter(upstream: &Arc<Upstream>) -> InFlight {
        upstream.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(upstream.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The front proxy's shared state.
#[derive(Debug)]
pub struct Proxy {
    current: RwLock<Option<Arc<Upstream>>>,
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    unserved: AtomicU64,
    client: HttpClient,
    /// While set, requests that find no upstream wait up to this long for one.
    hold: Mutex<Option<Duration>>,
    /// Bumped on every switch and release, to wake waiting requests.
    changed: watch::Sender<u64>,
    waiters: Semaphore,
    /// Requests that waited for an upstream during a gap and then got one.
    waited: AtomicU64,
}

impl Proxy {
    pub fn new(client: HttpClient) -> Arc<Proxy> {
        Arc::new(Proxy {
            current: RwLock::new(None),
            counters: Mutex::new(HashMap::new()),
            unserved: AtomicU64::new(0),
            client,
            hold: Mutex::new(None),
            changed: watch::Sender::new(0),
            waiters: Semaphore::new(MAX_GAP_WAITERS),
            waited: AtomicU64::new(0),
        })
    }

    /// From now on, requests that find no upstream wait up to `wait` for one (see [`Proxy::release`]).
    pub fn hold(&self, wait: Duration) {
        *self.hold.lock().unwrap_or_else(PoisonError::into_inner) = Some(wait);
    }

    /// Ends a hold: requests still waiting get 503 with `Retry-After` unless an upstream is set.
    pub fn release(&self) {
        *self.hold.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn hold_wait(&self) -> Option<Duration> {
        *self.hold.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests that waited during a gap and were then forwarded.
    pub fn waited_total(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }

    /// Waits (bounded by the hold's wait and [`MAX_GAP_WAITERS`]) for an upstream while the proxy holds.
    async fn wait_for_upstream(&self) -> Option<InFlight> {
        let wait = self.hold_wait()?;
        let _permit = self.waiters.try_acquire().ok()?;
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            changed.borrow_and_update();
            if let Some(guard) = self.enter() {
                self.waited.fetch_add(1, Ordering::Relaxed);
                return Some(guard);
            }
            // The hold ended without an upstream: answer 503 now.
            self.hold_wait()?;
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// The axum router serving every path by forwarding it.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new().fallback(forward).with_state(self.clone())
    }

    /// An upstream for an instance serving `bundle_digest`, sharing that bundle's counters.
    pub fn upstream(&self, addr: SocketAddr, bundle_digest: &str) -> Arc<Upstream> {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(bundle_digest.to_owned())
            .or_default()
            .clone();
        Arc::new(Upstream { addr, bundle_digest: bundle_digest.to_owned(), in_flight: AtomicUsize::new(0), counters })
    }

    /// Switches every new request to `next` at once and returns the previous upstream. Requests already
    /// forwarded keep their upstream (and count in its in-flight number) until they finish.
    pub fn switch(&self, next: Option<Arc<Upstream>>) -> Option<Arc<Upstream>> {
        let previous = {
            let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *current, next)
        };
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        previous
    }

    pub fn current(&self) -> Option<Arc<Upstream>> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Takes the current upstream and counts the request in flight in one step, so that a switch can never
    /// miss a request that already chose the old upstream.
    fn enter(&self) -> Option<InFlight> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).as_ref().map(InFlight::enter)
    }

    /// Counters of the bundle served now.
    pub fn stats(&self) -> Option<ProxyStats> {
        self.current().map(|u| ProxyStats {
            bundle_digest: u.bundle_digest.clone(),
            requests_total: u.counters.requests.load(Ordering::Relaxed),
            request_errors_total: u.counters.errors.load(Ordering::Relaxed),
        })
    }

    /// Requests answered 503 because no model was served.
    pub fn unserved_total(&self) -> u64 {
        self.unserved.load(Ordering::Relaxed)
    }
}

/// Connection-level headers that must not be forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": status.as_u16(), "message": message, "type": kind}});
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    }
    response
}

async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let guard = match proxy.enter() {
        Some(guard) => guard,
        None => match proxy.wait_for_upstream().await {
            Some(guard) => guard,
            None => {
                proxy.unserved.fetch_add(1, Ordering::Relaxed);
                let message = if proxy.hold_wait().is_some() {
                    "the model on this device is being swapped; retry after the Retry-After delay"
                } else {
                    "no model is active on this device yet"
                };
                return error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
            }
        },
    };
    let upstream = guard.0.clone();
    upstream.counters.requests.fetch_add(1, Ordering::Relaxed);
    let count_error = || upstream.counters.errors.fetch_add(1, Ordering::Relaxed);

    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let Ok(uri) = format!("http://{}{}", upstream.addr, path).parse::<Uri>() else {
        count_error();
        return error_response(StatusCode::BAD_REQUEST, "invalid_request_error", "the request path is not valid");
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(&upstream.addr.to_string()) {
        parts.headers.insert(header::HOST, host);
    }
    let outbound = http::Request::from_parts(parts, body);

    match tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, proxy.client.request(outbound)).await {
        Ok(Ok(response)) => {
            if response.status().is_server_error() {
                count_error();
            }
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // The in-flight guard lives as long as the response body streams to the client.
            let stream = body.into_data_stream().map(move |chunk| {
                let _in_flight = &guard;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(stream))
        }
        Ok(Err(error)) => {
            count_error();
            tracing::warn!(upstream = %upstream.addr, %error, "Forwarding a request to llama-server failed.");
            error_response(StatusCode::BAD_GATEWAY, "upstream_error", "the model server did not answer; retry")
        }
        Err(_) => {
            count_error();
            error_response(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "the model server took too long to answer")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[tokio::test]
    async fn switching_returns_the_old_upstream_and_counters_follow_the_bundle() {
        let proxy = Proxy::new(http_client());
        let a = proxy.upstream("127.0.0.1:1".parse().expect("addr"), "sha256:a");
        assert!(proxy.switch(Some(a.clone())).is_none());
        let guard = proxy.enter().expect("upstream set");
        assert_eq!(a.in_flight(), 1);
        let b = proxy.upstream("127.0.0.1:2".parse().expect("addr"), "sha256:b");
        let old = proxy.switch(Some(b)).expect("old upstream");
        assert_eq!(old.addr(), a.addr());
        assert_eq!(old.in_flight(), 1, "a request that chose A stays counted after the switch");
        drop(guard);
        assert_eq!(a.in_flight(), 0);
        a.counters.requests.fetch_add(3, Ordering::Relaxed);
        let a_again = proxy.upstream("127.0.0.1:3".parse().expect("addr"), "sha256:a");
        assert_eq!(a_again.counters.requests.load(Ordering::Relaxed), 3, "counters belong to the bundle");
        assert_eq!(proxy.stats().map(|s| s.bundle_digest), Some("sha256:b".to_owned()));
    }
}
