//! The front proxy: one stable port for clients, forwarding every request (streaming both ways) to the
//! current llama-server, switched atomically; counts requests, errors, in-flight requests, latency and time
//! to first token (streamed responses) per bundle.
//! During a gap with no upstream (a stop-then-start swap, a rollback) the proxy *holds*: requests wait,
//! bounded in time and number, for the next upstream, and get 503 with `Retry-After` if it does not come.
//! What reaches the proxy passed [`super::admission`] first.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use std::time::Instant;

use tokio::sync::{Semaphore, watch};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::admission::{Admission, AdmissionSettings, FrontCounters, Refusal, admit};
use super::answer::error_response;

/// How long an upstream may take to start answering a request. Non-streaming completions answer only
/// when generation ends, so this is generous; streaming responses are not bounded once they start.
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(600);
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

/// Upper bounds (milliseconds) of the latency and time-to-first-token histograms; a last +Inf bucket follows.
pub const LATENCY_BUCKETS_MS: [f64; 14] =
    [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 120000.0];
/// Time-to-first-token samples kept between two telemetry reports (the newest win).
const TTFT_SAMPLES: usize = 1024;

/// A Prometheus-style histogram over [`LATENCY_BUCKETS_MS`], lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    /// Sum of observations in microseconds (integer, so it can be atomic).
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let ms = elapsed.as_secs_f64() * 1000.0;
        let index = LATENCY_BUCKETS_MS.iter().position(|le| ms <= *le).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is +Inf, i.e. the total) and the sum in milliseconds.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        let mut running = 0u64;
        for b in &self.buckets {
            running = running.saturating_add(b.load(Ordering::Relaxed));
            cumulative.push(running);
        }
        HistogramSnapshot { cumulative, sum_ms: self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0 }
    }
}

/// A histogram read at one moment: cumulative counts aligned with [`LATENCY_BUCKETS_MS`] plus +Inf.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<u64>,
    pub sum_ms: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// What the proxy measured for one bundle since the agent started.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Request start to the end of the response body.
    latency: Histogram,
    /// Request start to the first body bytes of a streamed (`text/event-stream`) response.
    ttft: Histogram,
    /// TTFT samples (ms) since the last [`Proxy::take_ttft_samples`].
    ttft_recent: Mutex<VecDeque<f64>>,
}

impl Counters {
    fn record_ttft(&self, elapsed: Duration) {
        self.ttft.observe(elapsed);
        let mut recent = self.ttft_recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() >= TTFT_SAMPLES {
            recent.pop_front();
        }
        recent.push_back(elapsed.as_secs_f64() * 1000.0);
    }
}

/// A snapshot of one bundle's counters.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyStats {
    pub bundle_digest: String,
    pub requests_total: u64,
    pub request_errors_total: u64,
    pub latency: HistogramSnapshot,
    pub ttft: HistogramSnapshot,
}

/// Facts about the llama-server process behind an upstream, for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamInfo {
    pub pid: Option<u32>,
    /// Process start to `/health` answering 200.
    pub load_time: Option<Duration>,
}

/// One llama-server instance the proxy can forward to.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    bundle_digest: String,
    info: UpstreamInfo,
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

    pub fn info(&self) -> UpstreamInfo {
        self.info
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

/// The serving upstream, held as in flight (a swap drains it before stopping the instance) by work the
/// agent itself sends to it directly, such as a benchmark. Not counted in the serving counters.
pub struct Lease(InFlight);

impl Lease {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.0.0
    }
}

/// Measures one proxied request: its latency when dropped (the response body finished or the client left),
/// and the time to its first streamed bytes.
struct RequestTimer {
    counters: Arc<Counters>,
    started: Instant,
    streamed: bool,
    first_seen: bool,
}

impl RequestTimer {
    fn chunk(&mut self) {
        if self.streamed && !self.first_seen {
            self.first_seen = true;
            self.counters.record_ttft(self.started.elapsed());
        }
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.counters.latency.observe(self.started.elapsed());
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
    /// The controller assigned no model to this device: requests get a 503 saying so.
    unassigned: AtomicBool,
    /// The front port's connection and refusal counters.
    front: Arc<FrontCounters>,
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
            unassigned: AtomicBool::new(false),
            front: Arc::default(),
        })
    }

    /// Whether the controller assigned no model to this device (`serve_nothing`): requests then get 503 with
    /// an error saying so instead of "no model yet".
    pub fn set_unassigned(&self, unassigned: bool) {
        self.unassigned.store(unassigned, Ordering::SeqCst);
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

    /// The front port's router with the default admission (the inference API only, no key, no rate limit).
    pub fn router(self: &Arc<Self>) -> axum::Router {
        self.router_with(AdmissionSettings::default())
    }

    /// The front port's router: requests pass [`admit`] as `settings` say, then are forwarded.
    pub fn router_with(self: &Arc<Self>, settings: AdmissionSettings) -> axum::Router {
        let admission = Admission::new(settings, self.front.clone());
        axum::Router::new()
            .fallback(forward)
            .layer(axum::middleware::from_fn_with_state(admission, admit))
            .with_state(self.clone())
    }

    /// The front port's connection and refusal counters.
    pub fn front_counters(&self) -> &Arc<FrontCounters> {
        &self.front
    }

    /// An upstream for an instance serving `bundle_digest`, sharing that bundle's counters.
    pub fn upstream(&self, addr: SocketAddr, bundle_digest: &str) -> Arc<Upstream> {
        self.upstream_with(addr, bundle_digest, UpstreamInfo::default())
    }

    /// [`Proxy::upstream`] with what is known about the process behind it.
    pub fn upstream_with(&self, addr: SocketAddr, bundle_digest: &str, info: UpstreamInfo) -> Arc<Upstream> {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(bundle_digest.to_owned())
            .or_default()
            .clone();
        Arc::new(Upstream {
            addr,
            bundle_digest: bundle_digest.to_owned(),
            info,
            in_flight: AtomicUsize::new(0),
            counters,
        })
    }

    /// The serving upstream held in flight for the agent's own requests; None when nothing is served.
    pub fn lease(&self) -> Option<Lease> {
        self.enter().map(Lease)
    }

    /// A receiver that changes whenever the upstream is switched (or a hold ends).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
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
        self.current().map(|u| stats_of(&u.bundle_digest, &u.counters))
    }

    /// Counters of every bundle served since the agent started, by digest.
    pub fn all_stats(&self) -> Vec<ProxyStats> {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<ProxyStats> = counters.iter().map(|(d, c)| stats_of(d, c)).collect();
        all.sort_by(|a, b| a.bundle_digest.cmp(&b.bundle_digest));
        all
    }

    /// Time-to-first-token samples (ms) of `bundle_digest` since the last call, oldest first.
    pub fn take_ttft_samples(&self, bundle_digest: &str) -> Vec<f64> {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner).get(bundle_digest).cloned();
        match counters {
            Some(c) => c.ttft_recent.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect(),
            None => Vec::new(),
        }
    }

    /// Requests in flight to the serving upstream.
    pub fn in_flight(&self) -> usize {
        self.current().map(|u| u.in_flight()).unwrap_or(0)
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

fn stats_of(bundle_digest: &str, c: &Counters) -> ProxyStats {
    ProxyStats {
        bundle_digest: bundle_digest.to_owned(),
        requests_total: c.requests.load(Ordering::Relaxed),
        request_errors_total: c.errors.load(Ordering::Relaxed),
        latency: c.latency.snapshot(),
        ttft: c.ttft.snapshot(),
    }
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
                } else if proxy.unassigned.load(Ordering::SeqCst) {
                    "no model is assigned to this device"
                } else {
                    "no model is active on this device yet"
                };
                return error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
            }
        },
    };
    let upstream = guard.0.clone();
    upstream.counters.requests.fetch_add(1, Ordering::Relaxed);
    let mut timer = RequestTimer {
        counters: upstream.counters.clone(),
        started: Instant::now(),
        streamed: false,
        first_seen: false,
    };
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
            timer.streamed = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            // The in-flight guard and the timer live as long as the response body streams to the client.
            let stream = body.into_data_stream().map(move |chunk| {
                let _in_flight = &guard;
                if chunk.as_ref().is_ok_and(|c| !c.is_empty()) {
                    timer.chunk();
                }
                chunk
            });
            Response::from_parts(parts, Body::from_stream(stream))
        }
        Ok(Err(error)) if body_over_cap(&error) => {
            proxy.front.refuse(Refusal::BodyTooLarge);
            let message = "the request body is larger than this port accepts (runtime.max_body_mib)";
            error_response(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message)
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

/// Whether forwarding failed because the client's body passed the admission's cap (a chunked body without a
/// length, cut by `http_body_util::Limited`): the client's fault, not the model server's.
fn body_over_cap(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
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
        assert_eq!(proxy.all_stats().len(), 2);
    }

    #[test]
    fn histograms_are_cumulative_with_an_inf_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(40));
        h.observe(Duration::from_millis(40));
        h.observe(Duration::from_secs(600));
        let s = h.snapshot();
        assert_eq!(s.cumulative.len(), LATENCY_BUCKETS_MS.len() + 1);
        assert_eq!(s.cumulative[0], 1, "3 ms <= 5 ms");
        assert_eq!(s.cumulative[3], 3, "40 ms <= 50 ms, cumulative");
        assert_eq!(s.cumulative[LATENCY_BUCKETS_MS.len() - 1], 3, "600 s is beyond the last bound");
        assert_eq!(s.count(), 4);
        assert!((s.sum_ms - 600_083.0).abs() < 1e-6, "{}", s.sum_ms);
    }

    #[test]
    fn ttft_samples_are_bounded_and_drained() {
        let proxy = Proxy::new(http_client());
        let up = proxy.upstream("127.0.0.1:1".parse().expect("addr"), "sha256:a");
        for i in 0..(TTFT_SAMPLES + 10) {
            up.counters.record_ttft(Duration::from_millis(i as u64));
        }
        let samples = proxy.take_ttft_samples("sha256:a");
        assert_eq!(samples.len(), TTFT_SAMPLES);
        assert_eq!(samples[0], 10.0, "the oldest were dropped");
        assert!(proxy.take_ttft_samples("sha256:a").is_empty());
        assert_eq!(up.counters.ttft.snapshot().count(), (TTFT_SAMPLES + 10) as u64);
    }
}
