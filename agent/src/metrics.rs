//! Serving metrics: llama-server's `/metrics` read by the agent (its only scraper; rates come from the
//! `_total` counters, never from the gauges each scrape resets), the Telemetry message built at each
//! interval from those and the front proxy's counters, the agent's own counters (activations, pulled bytes,
//! the last benchmark, quality evaluations), and the agent's Prometheus `/metrics` endpoint.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::proto;
use tokio::sync::watch;

use crate::runtime::admission::{FrontCounters, Refusal};
use crate::runtime::proxy::{HistogramSnapshot, LATENCY_BUCKETS_MS};
use crate::runtime::{HttpClient, Proxy};
use crate::state::Snapshot;
use crate::stats::median;

/// Bound on one scrape of llama-server's `/metrics`.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------------------
// llama-server's /metrics (pure)

/// The counters and gauges of llama-server's `/metrics` the agent uses.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LlamaCounters {
    pub prompt_tokens: f64,
    pub prompt_seconds: f64,
    pub predicted_tokens: f64,
    pub predicted_seconds: f64,
    pub requests_processing: f64,
    pub requests_deferred: f64,
}

/// Reads llama-server's Prometheus text; unknown metrics, comments and labels are ignored.
pub fn parse_llama_metrics(text: &str) -> LlamaCounters {
    let mut c = LlamaCounters::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else { continue };
        let name = name.split('{').next().unwrap_or(name);
        let Ok(value) = value.parse::<f64>() else { continue };
        let slot = match name {
            "llamacpp:prompt_tokens_total" => &mut c.prompt_tokens,
            "llamacpp:prompt_seconds_total" => &mut c.prompt_seconds,
            "llamacpp:tokens_predicted_total" => &mut c.predicted_tokens,
            "llamacpp:tokens_predicted_seconds_total" => &mut c.predicted_seconds,
            "llamacpp:requests_processing" => &mut c.requests_processing,
            "llamacpp:requests_deferred" => &mut c.requests_deferred,
            _ => continue,
        };
        *slot = value;
    }
    c
}

/// Prompt and generation speed between two readings of the same instance: tokens over the seconds llama-server
/// spent on them (what a benchmark measures too, so telemetry and benchmarks compare). 0 when no tokens
/// were processed in between or the counters went back (a new process).
pub fn speeds(earlier: &LlamaCounters, now: &LlamaCounters) -> (f64, f64) {
    let speed = |tokens: f64, seconds: f64| if tokens > 0.0 && seconds > 0.0 { tokens / seconds } else { 0.0 };
    (
        speed(now.prompt_tokens - earlier.prompt_tokens, now.prompt_seconds - earlier.prompt_seconds),
        speed(now.predicted_tokens - earlier.predicted_tokens, now.predicted_seconds - earlier.predicted_seconds),
    )
}

/// A proxy histogram in the proto's cumulative-bucket form.
pub fn histogram_buckets(h: &HistogramSnapshot) -> Vec<proto::HistogramBucket> {
    h.cumulative
        .iter()
        .enumerate()
        .map(|(i, count)| match LATENCY_BUCKETS_MS.get(i) {
            Some(le) => proto::HistogramBucket { le_ms: *le, inf: false, count: *count },
            None => proto::HistogramBucket { le_ms: 0.0, inf: true, count: *count },
        })
        .collect()
}

/// Scrapes llama-server's `/metrics` at `addr`.
pub async fn scrape_llama(http: &HttpClient, addr: SocketAddr) -> Result<LlamaCounters, String> {
    match crate::runtime::instance::request(http, addr, "GET", "/metrics", None, SCRAPE_TIMEOUT).await? {
        (200, body) => Ok(parse_llama_metrics(&String::from_utf8_lossy(&body))),
        (code, _) => Err(format!("/metrics answered {code}; llama-server must run with --metrics")),
    }
}

// ---------------------------------------------------------------------------------------------------------
// The agent's own counters

/// How an activation ended, for `alki_agent_activations_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationOutcome {
    Active,
    Failed,
    /// The new model failed within its watch window and the previous one serves again.
    RolledBack,
}

impl ActivationOutcome {
    const ALL: [ActivationOutcome; 3] =
        [ActivationOutcome::Active, ActivationOutcome::Failed, ActivationOutcome::RolledBack];

    fn label(self) -> &'static str {
        match self {
            ActivationOutcome::Active => "active",
            ActivationOutcome::Failed => "failed",
            ActivationOutcome::RolledBack => "rolled_back",
        }
    }
}

/// Counters and the latest readings shared by the device loop, the session, the benchmark task and the
/// `/metrics` endpoint.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    activations: [AtomicU64; 3],
    pull_bytes: AtomicU64,
    /// Prestage commands answered: ready, failed.
    prestages: [AtomicU64; 2],
    /// Bundles staged in the content store now.
    staged: AtomicU64,
    telemetry_sent: AtomicU64,
    last_benchmark: Mutex<Option<proto::BenchmarkResult>>,
    /// The last telemetry built (speeds, temperature, throttling), for the gauges.
    last_telemetry: Mutex<Option<proto::Telemetry>>,
    /// Reports kept while the controller is unreachable, and dropped past their bound, by kind.
    reports_buffered: [AtomicU64; crate::outbox::KINDS],
    reports_dropped: [AtomicU64; crate::outbox::KINDS],
    /// Quality evaluations reported, by where they ran ([`EvalPlace`]) and outcome ([`EVAL_OUTCOMES`]), and
    /// how long they took.
    evaluations: [[AtomicU64; EVAL_OUTCOMES.len()]; EvalPlace::ALL.len()],
    eval_seconds: Mutex<DurationHistogram>,
    /// Stop-then-start gaps: how long the front proxy held requests with no model to send them to.
    swap_gaps: Mutex<DurationHistogram>,
    /// Baseline logits computed by a llama-perplexity run, and reused from the cache.
    base_logits: [AtomicU64; 2],
    /// Bytes of cached baseline logits in the content store.
    base_logits_bytes: AtomicU64,
    /// Diagnostics bytes sent (uncompressed) by source ([`DIAGNOSTIC_SOURCES`]), and answers running now.
    diagnostic_bytes: [AtomicU64; DIAGNOSTIC_SOURCES.len()],
    diagnostics_active: AtomicU64,
    /// Content-store blobs hashed again by the scrub or a reverify: checked, found corrupt, removed.
    scrub: [AtomicU64; 3],
}

/// Where diagnostics bytes come from, for `alki_agent_diagnostic_bytes_total{source}`.
pub const DIAGNOSTIC_SOURCES: [&str; 3] = ["agent", "runtime", "bundle"];

/// How an evaluation ended, for `alki_agent_evaluations_total{outcome}`: measured, or the kinds of
/// "could not run" (`alki_shared::eval::wire`'s names).
pub const EVAL_OUTCOMES: [&str; 6] =
    ["measured", "does_not_fit", "suite_too_large_for_budget", "out_of_time", "tool_missing", "failed"];

/// Where an evaluation ran, for `alki_agent_evaluations_total{place}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalPlace {
    /// Beside the serving model (or refused before it ran anywhere).
    Beside,
    /// In a stop-then-start swap's gap, with the old model stopped.
    Gap,
}

impl EvalPlace {
    const ALL: [EvalPlace; 2] = [EvalPlace::Beside, EvalPlace::Gap];

    pub fn label(self) -> &'static str {
        match self {
            EvalPlace::Beside => "beside",
            EvalPlace::Gap => "gap",
        }
    }
}

/// Upper bounds (seconds) of the evaluation duration histogram: a tiny suite takes seconds, a large model
/// on a small board up to the longest time budget (an hour).
pub const EVAL_SECONDS_BUCKETS: [f64; 9] = [5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
/// Upper bounds (seconds) of the swap gap histogram: a small model loads in a second or two, a large one from
/// a slow disk in minutes, and an evaluation in the gap adds up to its budget.
pub const GAP_SECONDS_BUCKETS: [f64; 9] = [1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// A cumulative histogram of durations in seconds over the bounds it is observed with (the last count is
/// +Inf).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DurationHistogram {
    /// Cumulative counts per bound, then +Inf; empty until the first observation.
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl DurationHistogram {
    pub fn observe(&mut self, bounds: &[f64], seconds: f64) {
        self.counts.resize(bounds.len() + 1, 0);
        let bucket = bounds.iter().position(|le| seconds <= *le).unwrap_or(bounds.len());
        for count in &mut self.counts[bucket..] {
            *count += 1;
        }
        self.sum += seconds;
    }

    /// The histogram's lines (after the family name) over `bounds`.
    fn lines(&self, bounds: &[f64]) -> Vec<String> {
        let count = |i: usize| self.counts.get(i).copied().unwrap_or(0);
        let mut lines: Vec<String> = bounds
            .iter()
            .map(|le| le.to_string())
            .chain(std::iter::once("+Inf".to_owned()))
            .enumerate()
            .map(|(i, le)| format!("_bucket{{le=\"{le}\"}} {}", count(i)))
            .collect();
        lines.push(format!("_sum {}", self.sum));
        lines.push(format!("_count {}", count(bounds.len())));
        lines
    }
}

impl AgentMetrics {
    /// Diagnostics bytes (uncompressed) sent from `source`.
    pub fn diagnostic_bytes(&self, source: &str, bytes: u64) {
        if let Some(i) = DIAGNOSTIC_SOURCES.iter().position(|s| *s == source) {
            self.diagnostic_bytes[i].fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// A diagnostics answer started (+1) or ended (-1).
    pub fn diagnostics_running(&self, started: bool) {
        if started {
            self.diagnostics_active.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self.diagnostics_active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Diagnostics answers running now.
    pub fn diagnostics_active(&self) -> u64 {
        self.diagnostics_active.load(Ordering::Relaxed)
    }

    /// Blobs the scrub or a reverify hashed, found corrupt and removed.
    pub fn scrubbed(&self, checked: u64, corrupt: u64, removed: u64) {
        for (counter, n) in self.scrub.iter().zip([checked, corrupt, removed]) {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn activation(&self, outcome: ActivationOutcome) {
        let index = ActivationOutcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.activations[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn activations(&self, outcome: ActivationOutcome) -> u64 {
        let index = ActivationOutcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.activations[index].load(Ordering::Relaxed)
    }

    /// Bytes a pull fetched from a registry (not those already stored).
    pub fn pulled(&self, bytes: u64) {
        self.pull_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A Prestage command answered, ready or failed.
    pub fn prestaged(&self, ready: bool) {
        self.prestages[usize::from(!ready)].fetch_add(1, Ordering::Relaxed);
    }

    /// How many bundles are staged now.
    pub fn set_staged(&self, count: usize) {
        self.staged.store(count as u64, Ordering::Relaxed);
    }

    /// The outbox changed: how many reports it keeps and has dropped, by kind.
    pub fn outbox(&self, outbox: &crate::outbox::Outbox) {
        for kind in crate::outbox::ReportKind::ALL {
            self.reports_buffered[kind as usize].store(outbox.held(kind) as u64, Ordering::Relaxed);
            self.reports_dropped[kind as usize].store(outbox.dropped_total(kind), Ordering::Relaxed);
        }
    }

    pub fn set_last_benchmark(&self, result: proto::BenchmarkResult) {
        *self.last_benchmark.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
    }

    pub fn last_benchmark(&self) -> Option<proto::BenchmarkResult> {
        self.last_benchmark.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// An evaluation that ran at `place` was reported: `outcome` is one of [`EVAL_OUTCOMES`] (others count as
    /// failed).
    pub fn evaluated(&self, outcome: &str, place: EvalPlace, seconds: f64) {
        let index = EVAL_OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(EVAL_OUTCOMES.len() - 1);
        self.evaluations[place as usize][index].fetch_add(1, Ordering::Relaxed);
        self.eval_seconds.lock().unwrap_or_else(PoisonError::into_inner).observe(&EVAL_SECONDS_BUCKETS, seconds);
    }

    /// Evaluations reported with `outcome` since the agent started, wherever they ran.
    pub fn evaluations(&self, outcome: &str) -> u64 {
        EvalPlace::ALL.iter().map(|place| self.evaluations_at(outcome, *place)).sum()
    }

    /// Evaluations that ran at `place` and were reported with `outcome` since the agent started.
    pub fn evaluations_at(&self, outcome: &str, place: EvalPlace) -> u64 {
        EVAL_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.evaluations[place as usize][i].load(Ordering::Relaxed))
    }

    /// A stop-then-start swap held requests for `gap` with no model to send them to.
    pub fn swap_gap(&self, gap: Duration) {
        self.swap_gaps.lock().unwrap_or_else(PoisonError::into_inner).observe(&GAP_SECONDS_BUCKETS, gap.as_secs_f64());
    }

    /// Baseline logits were computed (`reused` false) or taken from the cache.
    pub fn base_logits(&self, reused: bool) {
        self.base_logits[usize::from(reused)].fetch_add(1, Ordering::Relaxed);
    }

    /// (computed, reused) baseline logits since the agent started.
    pub fn base_logits_runs(&self) -> (u64, u64) {
        (self.base_logits[0].load(Ordering::Relaxed), self.base_logits[1].load(Ordering::Relaxed))
    }

    pub fn set_base_logits_bytes(&self, bytes: u64) {
        self.base_logits_bytes.store(bytes, Ordering::Relaxed);
    }

    fn set_last_telemetry(&self, t: &proto::Telemetry) {
        self.telemetry_sent.fetch_add(1, Ordering::Relaxed);
        *self.last_telemetry.lock().unwrap_or_else(PoisonError::into_inner) = Some(t.clone());
    }
}

// ---------------------------------------------------------------------------------------------------------
// Telemetry

/// Builds Telemetry at each interval, remembering the previous llama-server reading and throttle sample.
#[derive(Debug)]
pub struct TelemetryCollector {
    http: HttpClient,
    /// The platform files' root (`/`; a fixture tree in tests).
    root: PathBuf,
    previous: Option<(SocketAddr, LlamaCounters)>,
    throttle: Option<crate::inventory::ThrottleSample>,
}

impl TelemetryCollector {
    pub fn new(http: HttpClient) -> TelemetryCollector {
        TelemetryCollector { http, root: PathBuf::from("/"), previous: None, throttle: None }
    }

    /// The Telemetry message for the interval that ends now.
    pub async fn collect(
        &mut self,
        proxy: &Proxy,
        snapshot: &Snapshot,
        metrics: &AgentMetrics,
        interval: Duration,
    ) -> proto::Telemetry {
        let root = self.root.clone();
        let node = tokio::task::spawn_blocking(move || {
            (
                crate::inventory::memory_available(),
                crate::inventory::read_temperatures(&root),
                crate::inventory::read_throttle(&root),
            )
        })
        .await;
        let (memory, temperatures, throttle) = node.unwrap_or_default();
        let throttled = self.throttle.map(|before| throttle.throttled_since(&before)).unwrap_or(throttle.now);
        self.throttle = Some(throttle);
        let mut t = proto::Telemetry {
            at_unix_ms: UnixMs::now().as_millis(),
            memory_available_bytes: memory,
            max_temperature_celsius: crate::inventory::max_temperature(&temperatures).unwrap_or_default(),
            throttled,
            interval_seconds: u32::try_from(interval.as_secs()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        if let Some(upstream) = proxy.current() {
            let stats = proxy.stats().filter(|s| s.bundle_digest == upstream.bundle_digest());
            if let Some(stats) = stats {
                t.requests_total = stats.requests_total;
                t.request_errors_total = stats.request_errors_total;
                t.latency_buckets = histogram_buckets(&stats.latency);
                t.latency_sum_ms = stats.latency.sum_ms;
            }
            t.bundle_digest = upstream.bundle_digest().to_owned();
            if snapshot.running.as_ref().is_some_and(|r| r.digest == t.bundle_digest) {
                t.variant_digest = snapshot.variant_digest.clone();
            }
            t.ttft_ms = median(&proxy.take_ttft_samples(upstream.bundle_digest())).unwrap_or_default();
            match scrape_llama(&self.http, upstream.addr()).await {
                Ok(now) => {
                    t.prompt_tokens_total = now.prompt_tokens as u64;
                    t.generated_tokens_total = now.predicted_tokens as u64;
                    let earlier = match self.previous {
                        Some((addr, earlier)) if addr == upstream.addr() => earlier,
                        // A new instance: its counters started at zero.
                        _ => LlamaCounters::default(),
                    };
                    (t.prompt_tokens_per_second, t.generation_tokens_per_second) = speeds(&earlier, &now);
                    self.previous = Some((upstream.addr(), now));
                }
                Err(e) => tracing::debug!(error = %e, "Cannot read llama-server's metrics."),
            }
        }
        metrics.set_last_telemetry(&t);
        t
    }
}

// ---------------------------------------------------------------------------------------------------------
// Prometheus endpoint

/// What the `/metrics` endpoint reads.
#[derive(Clone)]
pub struct MetricsState {
    pub proxy: Arc<Proxy>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub metrics: Arc<AgentMetrics>,
    pub http: HttpClient,
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text being written: metric families with their HELP and TYPE lines.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    /// One family: each line is the metric's labels (or a space) and value.
    fn family(&mut self, name: &str, kind: &str, help: &str, lines: Vec<String>) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for line in lines {
            let _ = writeln!(self.out, "{name}{line}");
        }
    }

    /// A family with one unlabelled value.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help, vec![format!(" {value}")]);
    }

    fn histogram(&mut self, name: &str, help: &str, bundle: &str, h: &HistogramSnapshot) {
        let out = &mut self.out;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, count) in h.cumulative.iter().enumerate() {
            let le =
                LATENCY_BUCKETS_MS.get(i).map(|ms| format!("{}", ms / 1000.0)).unwrap_or_else(|| "+Inf".to_owned());
            let _ = writeln!(out, "{name}_bucket{{bundle=\"{bundle}\",le=\"{le}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_sum{{bundle=\"{bundle}\"}} {}", h.sum_ms / 1000.0);
        let _ = writeln!(out, "{name}_count{{bundle=\"{bundle}\"}} {}", h.count());
    }
}

/// The Prometheus text exposition of the agent's metrics. `llama`: llama-server's counters read now.
pub fn render(state: &MetricsState, llama: Option<LlamaCounters>) -> String {
    let mut out = Exposition::default();
    let all = state.proxy.all_stats();
    proxy_families(&mut out, &state.proxy, &all);
    agent_families(&mut out, &state.metrics);
    let serving = state.proxy.current();
    bundle_info(&mut out, &state.snapshot.borrow(), serving.as_deref());
    if let (Some(c), Some(upstream)) = (llama, &serving) {
        llama_families(&mut out, &escape(upstream.bundle_digest()), c);
    }
    let last = state.metrics.last_telemetry.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if let Some(t) = last {
        telemetry_families(&mut out, &t);
    }
    if let Some(b) = state.metrics.last_benchmark() {
        benchmark_families(&mut out, &b);
    }
    for s in &all {
        let help = "Request latency through the front proxy, to the end of the response.";
        out.histogram("alki_agent_request_duration_seconds", help, &escape(&s.bundle_digest), &s.latency);
    }
    for s in &all {
        let help = "Time to the first bytes of streamed responses through the front proxy.";
        out.histogram("alki_agent_time_to_first_token_seconds", help, &escape(&s.bundle_digest), &s.ttft);
    }
    out.out
}

/// The front proxy's counters, per bundle.
fn proxy_families(out: &mut Exposition, proxy: &Proxy, all: &[crate::runtime::ProxyStats]) {
    out.family(
        "alki_agent_requests_total",
        "counter",
        "Requests forwarded by the front proxy, per bundle.",
        all.iter().map(|s| format!("{{bundle=\"{}\"}} {}", escape(&s.bundle_digest), s.requests_total)).collect(),
    );
    out.family(
        "alki_agent_request_errors_total",
        "counter",
        "Forwarded requests that failed (5xx, upstream unreachable or timed out), per bundle.",
        all.iter().map(|s| format!("{{bundle=\"{}\"}} {}", escape(&s.bundle_digest), s.request_errors_total)).collect(),
    );
    out.single(
        "alki_agent_requests_unserved_total",
        "counter",
        "Requests answered 503 because no model was served.",
        proxy.unserved_total(),
    );
    out.single(
        "alki_agent_requests_in_flight",
        "gauge",
        "Requests in flight to the serving llama-server.",
        proxy.in_flight(),
    );
    front_families(out, proxy.front_counters());
}

/// The front port's connections and refusals.
fn front_families(out: &mut Exposition, front: &FrontCounters) {
    out.single(
        "alki_agent_front_connections",
        "gauge",
        "Client connections open on the front port.",
        front.open.load(Ordering::Relaxed),
    );
    out.single(
        "alki_agent_front_connections_evicted_total",
        "counter",
        "Idle client connections closed to make room at runtime.max_connections.",
        front.evicted.load(Ordering::Relaxed),
    );
    out.family(
        "alki_agent_front_refused_total",
        "counter",
        "Requests and connections the front port refused, by reason (path, auth, rate, body_too_large, connections).",
        Refusal::ALL.iter().map(|r| format!("{{reason=\"{}\"}} {}", r.label(), front.refused(*r))).collect(),
    );
}

/// Remote diagnostics and the content store's scrub.
fn diagnostics_families(out: &mut Exposition, m: &AgentMetrics) {
    out.family(
        "alki_agent_diagnostic_bytes_total",
        "counter",
        "Diagnostics bytes (uncompressed) sent to the controller, by source (agent, runtime logs; support bundle).",
        DIAGNOSTIC_SOURCES
            .iter()
            .zip(&m.diagnostic_bytes)
            .map(|(s, n)| format!("{{source=\"{s}\"}} {}", n.load(Ordering::Relaxed)))
            .collect(),
    );
    out.single(
        "alki_agent_diagnostics_active",
        "gauge",
        "Diagnostics answers (logs, support bundles) being sent now.",
        m.diagnostics_active(),
    );
    out.family(
        "alki_agent_store_scrub_blobs_total",
        "counter",
        "Content-store blobs hashed again by the scrub or a reverify, by result (checked, corrupt, removed).",
        ["checked", "corrupt", "removed"]
            .iter()
            .zip(&m.scrub)
            .map(|(r, n)| format!("{{result=\"{r}\"}} {}", n.load(Ordering::Relaxed)))
            .collect(),
    );
}

/// The agent's own counters: activations, pulls, staging, telemetry, the outbox.
fn agent_families(out: &mut Exposition, m: &AgentMetrics) {
    diagnostics_families(out, m);
    out.family(
        "alki_agent_activations_total",
        "counter",
        "Activations of desired states, by outcome.",
        ActivationOutcome::ALL.iter().map(|o| format!("{{outcome=\"{}\"}} {}", o.label(), m.activations(*o))).collect(),
    );
    out.single(
        "alki_agent_pull_bytes_total",
        "counter",
        "Bytes fetched from registries by bundle pulls.",
        m.pull_bytes.load(Ordering::Relaxed),
    );
    out.family(
        "alki_agent_prestages_total",
        "counter",
        "Prestage commands answered (bundles downloaded and verified ahead of activation), by outcome.",
        ["ready", "failed"]
            .iter()
            .zip(&m.prestages)
            .map(|(outcome, n)| format!("{{outcome=\"{outcome}\"}} {}", n.load(Ordering::Relaxed)))
            .collect(),
    );
    out.single(
        "alki_agent_staged_bundles",
        "gauge",
        "Bundles staged in the content store, pinned until activated or superseded.",
        m.staged.load(Ordering::Relaxed),
    );
    out.single(
        "alki_agent_telemetry_reports_total",
        "counter",
        "Telemetry messages built for the controller.",
        m.telemetry_sent.load(Ordering::Relaxed),
    );
    let by_kind = |values: &[AtomicU64; crate::outbox::KINDS]| {
        crate::outbox::ReportKind::ALL
            .iter()
            .map(|k| format!("{{kind=\"{}\"}} {}", k.label(), values[*k as usize].load(Ordering::Relaxed)))
            .collect()
    };
    out.family(
        "alki_agent_reports_buffered",
        "gauge",
        "Reports kept for the controller while it is unreachable, by kind.",
        by_kind(&m.reports_buffered),
    );
    out.family(
        "alki_agent_reports_dropped_total",
        "counter",
        "Reports dropped (oldest first) because the controller stayed unreachable past their bound, by kind.",
        by_kind(&m.reports_dropped),
    );
    let gaps = m.swap_gaps.lock().unwrap_or_else(PoisonError::into_inner).clone();
    out.family(
        "alki_agent_swap_gap_seconds",
        "histogram",
        "Stop-then-start swaps (and their rollbacks): how long requests were held with no model to serve them, \
         an evaluation in the gap included.",
        gaps.lines(&GAP_SECONDS_BUCKETS),
    );
    eval_families(out, m);
}

/// Quality evaluations: outcomes, durations, the baseline-logits cache.
fn eval_families(out: &mut Exposition, m: &AgentMetrics) {
    let by_place_and_outcome = EvalPlace::ALL
        .iter()
        .flat_map(|place| EVAL_OUTCOMES.iter().map(move |outcome| (*place, *outcome)))
        .map(|(place, outcome)| {
            let n = m.evaluations_at(outcome, place);
            format!("{{outcome=\"{outcome}\",place=\"{}\"}} {n}", place.label())
        })
        .collect();
    out.family(
        "alki_agent_evaluations_total",
        "counter",
        "Quality evaluations reported, by outcome (measured, or why the device could not run it) and where they \
         ran (beside the serving model, or in a stop-then-start swap's gap).",
        by_place_and_outcome,
    );
    let h = m.eval_seconds.lock().unwrap_or_else(PoisonError::into_inner).clone();
    out.family(
        "alki_agent_evaluation_duration_seconds",
        "histogram",
        "Wall-clock time of quality evaluations, suite and candidate acquired.",
        h.lines(&EVAL_SECONDS_BUCKETS),
    );
    let (computed, reused) = m.base_logits_runs();
    out.family(
        "alki_agent_eval_base_logits_total",
        "counter",
        "Baseline logits for KL divergence: computed by a llama-perplexity run, or reused from the cache.",
        vec![format!("{{result=\"computed\"}} {computed}"), format!("{{result=\"reused\"}} {reused}")],
    );
    out.single(
        "alki_agent_eval_base_logits_bytes",
        "gauge",
        "Bytes of cached baseline logits in the content store (per baseline variant and suite; evicted like blobs).",
        m.base_logits_bytes.load(Ordering::Relaxed),
    );
}

/// The bundle served now (value 1), named as the device loop knows it when it agrees with the proxy.
fn bundle_info(out: &mut Exposition, snapshot: &Snapshot, serving: Option<&crate::runtime::Upstream>) {
    let info = match (&snapshot.running, serving) {
        (Some(r), Some(_)) => vec![format!(
            "{{bundle=\"{}\",repository=\"{}\",tag=\"{}\",variant=\"{}\"}} 1",
            escape(&r.digest),
            escape(&r.repository),
            escape(&r.tag),
            escape(&snapshot.variant_digest)
        )],
        (None, Some(u)) => {
            vec![format!("{{bundle=\"{}\",repository=\"\",tag=\"\",variant=\"\"}} 1", escape(u.bundle_digest()))]
        }
        _ => Vec::new(),
    };
    out.family("alki_agent_bundle_info", "gauge", "The bundle served now (value 1).", info);
}

/// The serving llama-server's own counters, read now.
fn llama_families(out: &mut Exposition, bundle: &str, c: LlamaCounters) {
    let line = |v: f64| vec![format!("{{bundle=\"{bundle}\"}} {v}")];
    out.family(
        "alki_agent_prompt_tokens_total",
        "counter",
        "Prompt tokens processed by the serving llama-server since it started.",
        line(c.prompt_tokens),
    );
    out.family(
        "alki_agent_prompt_seconds_total",
        "counter",
        "Seconds the serving llama-server spent processing prompts.",
        line(c.prompt_seconds),
    );
    out.family(
        "alki_agent_generated_tokens_total",
        "counter",
        "Tokens generated by the serving llama-server since it started.",
        line(c.predicted_tokens),
    );
    out.family(
        "alki_agent_generation_seconds_total",
        "counter",
        "Seconds the serving llama-server spent generating.",
        line(c.predicted_seconds),
    );
    out.family(
        "alki_agent_llama_requests_processing",
        "gauge",
        "Requests llama-server is processing.",
        line(c.requests_processing),
    );
    out.family(
        "alki_agent_llama_requests_deferred",
        "gauge",
        "Requests llama-server has deferred (all slots busy).",
        line(c.requests_deferred),
    );
}

/// Gauges from the last telemetry built.
fn telemetry_families(out: &mut Exposition, t: &proto::Telemetry) {
    let bundle = escape(&t.bundle_digest);
    out.family(
        "alki_agent_generation_tokens_per_second",
        "gauge",
        "Generation speed over the last telemetry interval (0 when idle).",
        vec![format!("{{bundle=\"{bundle}\"}} {}", t.generation_tokens_per_second)],
    );
    out.family(
        "alki_agent_prompt_tokens_per_second",
        "gauge",
        "Prompt processing speed over the last telemetry interval (0 when idle).",
        vec![format!("{{bundle=\"{bundle}\"}} {}", t.prompt_tokens_per_second)],
    );
    out.single(
        "alki_agent_memory_available_bytes",
        "gauge",
        "Memory available at the last telemetry interval.",
        t.memory_available_bytes,
    );
    out.single(
        "alki_agent_temperature_max_celsius",
        "gauge",
        "The hottest sensor at the last telemetry interval.",
        t.max_temperature_celsius,
    );
    out.single(
        "alki_agent_throttled",
        "gauge",
        "1 when the CPU throttled during the last telemetry interval.",
        u8::from(t.throttled),
    );
}

/// Gauges from the last local benchmark.
fn benchmark_families(out: &mut Exposition, b: &proto::BenchmarkResult) {
    let labels = format!(
        "{{bundle=\"{}\",variant=\"{}\",prompt_set=\"{}\"}}",
        escape(b.bundle.as_ref().map(|r| r.digest.as_str()).unwrap_or_default()),
        escape(&b.variant_digest),
        escape(&b.prompt_set)
    );
    let median = |s: &Option<proto::Stat>| s.as_ref().map(|s| s.median).unwrap_or_default();
    out.family(
        "alki_agent_benchmark_generation_tokens_per_second",
        "gauge",
        "Median generation speed of the last local benchmark.",
        vec![format!("{labels} {}", median(&b.generation_tokens_per_second))],
    );
    out.family(
        "alki_agent_benchmark_prompt_tokens_per_second",
        "gauge",
        "Median prompt processing speed of the last local benchmark.",
        vec![format!("{labels} {}", median(&b.prompt_tokens_per_second))],
    );
    out.family(
        "alki_agent_benchmark_ttft_seconds",
        "gauge",
        "Median time to first token of the last local benchmark.",
        vec![format!("{labels} {}", median(&b.ttft_ms) / 1000.0)],
    );
    out.family(
        "alki_agent_benchmark_peak_rss_bytes",
        "gauge",
        "Peak resident memory of llama-server during the last local benchmark.",
        vec![format!("{labels} {}", b.peak_rss_bytes)],
    );
}

async fn metrics_handler(axum::extract::State(state): axum::extract::State<MetricsState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let llama = match state.proxy.current() {
        Some(u) => scrape_llama(&state.http, u.addr()).await.ok(),
        None => None,
    };
    let body = render(&state, llama);
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(listener: tokio::net::TcpListener, state: MetricsState, mut shutdown: watch::Receiver<bool>) {
    let router = axum::Router::new().route("/metrics", axum::routing::get(metrics_handler)).with_state(state);
    let graceful = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(graceful).await {
        tracing::error!(error = %e, "The metrics server failed.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What llama-server (build 11434) answers on `/metrics` with `--metrics`.
    const LLAMA_METRICS: &str = "\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1532
# HELP llamacpp:prompt_seconds_total Prompt process time
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 0.766
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 4096
# HELP llamacpp:tokens_predicted_seconds_total Predict process time
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 2.048
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 4128
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode counter
llamacpp:n_busy_slots_per_decode 1
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s.
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 2000
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 2000
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
";

    #[test]
    fn llama_metrics_are_parsed() {
        let c = parse_llama_metrics(LLAMA_METRICS);
        assert_eq!(c.prompt_tokens, 1532.0);
        assert_eq!(c.prompt_seconds, 0.766);
        assert_eq!(c.predicted_tokens, 4096.0);
        assert_eq!(c.predicted_seconds, 2.048);
        assert_eq!(c.requests_processing, 1.0);
        assert_eq!(parse_llama_metrics("garbage\nllamacpp:prompt_tokens_total x\n"), LlamaCounters::default());
        assert_eq!(parse_llama_metrics("llamacpp:prompt_tokens_total{slot=\"0\"} 5").prompt_tokens, 5.0);
    }

    #[test]
    fn speeds_come_from_counter_deltas() {
        let earlier = parse_llama_metrics(LLAMA_METRICS);
        let now = LlamaCounters {
            prompt_tokens: earlier.prompt_tokens + 100.0,
            prompt_seconds: earlier.prompt_seconds + 0.5,
            predicted_tokens: earlier.predicted_tokens + 64.0,
            predicted_seconds: earlier.predicted_seconds + 2.0,
            ..earlier
        };
        assert_eq!(speeds(&earlier, &now), (200.0, 32.0));
        assert_eq!(speeds(&now, &now), (0.0, 0.0), "idle: no speed");
        assert_eq!(speeds(&now, &LlamaCounters::default()), (0.0, 0.0), "a restarted process is not negative speed");
    }

    #[test]
    fn evaluations_are_counted_by_outcome_with_their_durations() {
        let m = AgentMetrics::default();
        m.evaluated("measured", EvalPlace::Beside, 12.0);
        m.evaluated("measured", EvalPlace::Gap, 12.0);
        m.evaluated("does_not_fit", EvalPlace::Beside, 0.5);
        m.evaluated("something new", EvalPlace::Gap, 4000.0);
        m.base_logits(false);
        m.base_logits(true);
        m.base_logits(true);
        m.set_base_logits_bytes(64_528_276);
        let mut out = Exposition::default();
        eval_families(&mut out, &m);
        let text = out.out;
        for line in [
            "alki_agent_evaluations_total{outcome=\"measured\",place=\"beside\"} 1",
            "alki_agent_evaluations_total{outcome=\"measured\",place=\"gap\"} 1",
            "alki_agent_evaluations_total{outcome=\"does_not_fit\",place=\"beside\"} 1",
            "alki_agent_evaluations_total{outcome=\"does_not_fit\",place=\"gap\"} 0",
            "alki_agent_evaluations_total{outcome=\"failed\",place=\"gap\"} 1",
            "alki_agent_evaluation_duration_seconds_bucket{le=\"5\"} 1",
            "alki_agent_evaluation_duration_seconds_bucket{le=\"15\"} 3",
            "alki_agent_evaluation_duration_seconds_bucket{le=\"3600\"} 3",
            "alki_agent_evaluation_duration_seconds_bucket{le=\"+Inf\"} 4",
            "alki_agent_evaluation_duration_seconds_count 4",
            "alki_agent_eval_base_logits_total{result=\"computed\"} 1",
            "alki_agent_eval_base_logits_total{result=\"reused\"} 2",
            "alki_agent_eval_base_logits_bytes 64528276",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert_eq!((m.evaluations("measured"), m.evaluations_at("measured", EvalPlace::Gap)), (2, 1));
    }

    #[test]
    fn swap_gaps_are_a_histogram_from_the_first_scrape() {
        let m = AgentMetrics::default();
        let mut out = Exposition::default();
        agent_families(&mut out, &m);
        assert!(out.out.lines().any(|l| l == "alki_agent_swap_gap_seconds_count 0"), "{}", out.out);
        m.swap_gap(Duration::from_millis(1500));
        m.swap_gap(Duration::from_secs(150));
        let mut out = Exposition::default();
        agent_families(&mut out, &m);
        for line in [
            "# TYPE alki_agent_swap_gap_seconds histogram",
            "alki_agent_swap_gap_seconds_bucket{le=\"1\"} 0",
            "alki_agent_swap_gap_seconds_bucket{le=\"2\"} 1",
            "alki_agent_swap_gap_seconds_bucket{le=\"120\"} 1",
            "alki_agent_swap_gap_seconds_bucket{le=\"300\"} 2",
            "alki_agent_swap_gap_seconds_bucket{le=\"+Inf\"} 2",
            "alki_agent_swap_gap_seconds_sum 151.5",
            "alki_agent_swap_gap_seconds_count 2",
        ] {
            assert!(out.out.lines().any(|l| l == line), "{line} in\n{}", out.out);
        }
    }

    #[test]
    fn histogram_buckets_end_with_inf() {
        let h = HistogramSnapshot { cumulative: vec![1; LATENCY_BUCKETS_MS.len() + 1], sum_ms: 3.0 };
        let buckets = histogram_buckets(&h);
        assert_eq!(buckets.len(), LATENCY_BUCKETS_MS.len() + 1);
        assert_eq!(buckets[0].le_ms, LATENCY_BUCKETS_MS[0]);
        assert!(buckets.last().is_some_and(|b| b.inf && b.le_ms == 0.0));
    }
}
