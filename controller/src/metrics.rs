//! Prometheus metrics in the text exposition format: fleet gauges computed at scrape time (devices by
//! state, phase and class; rollout progress and per-class A/B ratios, quality and error rates; serving
//! speed per class and bundle) and counters (registry traffic, which [`count_registry`] keeps here;
//! telemetry and evaluation ingestion; the report writer). [`render`] is pure: it renders the [`Scrape`] it is handed, which the application context
//! gathers from the store, the sessions and the counters' owners.
//!
//! [`NAMES`] lists every metric this module can export: the Grafana dashboard's test checks its queries
//! against a real scrape, and a unit test checks the scrape names nothing outside this list.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alki_shared::proto::{self, Phase, RolloutState};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::BodyExt as _;

use crate::facts::{hardware_class, is_active};
use crate::insight::evaluations::{COULD_NOT_RUN_KINDS, EvalCounts};
use crate::insight::stats::median;

/// Every metric name exported, with its type and help.
pub const NAMES: &[(&str, &str, &str)] = &[
    ("alki_devices", "gauge", "Devices by connection state, phase and hardware class."),
    ("alki_devices_connected", "gauge", "Devices with an open agent session."),
    (
        "alki_sessions_waiting_hello",
        "gauge",
        "Agent sessions whose certificate was accepted and that wait for their Hello (at most 30 s each).",
    ),
    ("alki_rollouts", "gauge", "Rollouts by state."),
    ("alki_events_last_id", "gauge", "The newest event id in the fleet's event log (its rate is events per second)."),
    ("alki_webhook_deliveries_total", "counter", "Events webhooks' receivers took (2xx)."),
    ("alki_webhook_delivery_failures_total", "counter", "Webhook delivery attempts that failed (retried)."),
    (
        "alki_webhook_events_given_up_total",
        "counter",
        "Events a webhook never got: retried past the give-up age, or pruned first.",
    ),
    (
        "alki_webhook_delivery_latency_ms_sum",
        "counter",
        "Milliseconds from each delivered event to its receiver's 2xx, summed.",
    ),
    ("alki_webhook_pending_events", "gauge", "Events a webhook has not delivered yet (counted up to 10,000)."),
    ("alki_console_sessions", "gauge", "Web console logins in progress (at most 10,000)."),
    ("alki_console_logins_total", "counter", "Web console logins that opened a session."),
    (
        "alki_console_logins_refused_total",
        "counter",
        "Web console logins refused (a bad, revoked or wrong-role token).",
    ),
    ("alki_rollout_step", "gauge", "Current step (1-based) of an active or recent rollout."),
    ("alki_rollout_steps", "gauge", "Number of steps of a rollout."),
    ("alki_rollout_percent", "gauge", "Percentage of selected devices the current step moves to B."),
    (
        "alki_rollout_devices",
        "gauge",
        "Devices of a rollout by hardware class and outcome (selected, active, failed, pending).",
    ),
    (
        "alki_rollout_class_ratio",
        "gauge",
        "B/A ratio per hardware class as the gates see it (metric: tokens_per_second, ttft).",
    ),
    ("alki_rollout_class_samples", "gauge", "Devices measured per hardware class and cohort behind the ratios."),
    (
        "alki_rollout_class_quality",
        "gauge",
        "Quality of B against A per hardware class and candidate bundle, worst across devices (metric: kld, \
         top1_agreement, perplexity_ratio, golden_pass).",
    ),
    (
        "alki_rollout_class_evaluations",
        "gauge",
        "Candidate devices per hardware class whose evaluation measured the suite or could not run it (result).",
    ),
    (
        "alki_rollout_class_error_rate",
        "gauge",
        "Serving error rate (errors / requests at the front port) per hardware class and cohort (A, B).",
    ),
    (
        "alki_rollout_class_p95_latency_ms",
        "gauge",
        "p95 request latency at the front port in milliseconds per hardware class and cohort (A, B), from the \
         devices' pooled proxy histograms.",
    ),
    (
        "alki_rollout_prestage_devices",
        "gauge",
        "Devices of a rollout by hardware class and pre-staging state (pending: to be sent, sent, ready, failed).",
    ),
    (
        "alki_rollout_prestage_attempts",
        "gauge",
        "Prestage commands sent for a rollout per hardware class, retries after failures included.",
    ),
    (
        "alki_class_generation_tokens_per_second",
        "gauge",
        "Median generation tokens/s of the newest telemetry, per class and bundle.",
    ),
    ("alki_class_ttft_ms", "gauge", "Median time to first token (ms) of the newest telemetry, per class and bundle."),
    ("alki_class_serving_devices", "gauge", "Devices reporting telemetry, per class and bundle."),
    ("alki_registry_requests_total", "counter", "Registry (/v2/) requests by method."),
    ("alki_registry_bytes_total", "counter", "Registry (/v2/) body bytes by direction (in: uploads, out: downloads)."),
    ("alki_telemetry_reports_total", "counter", "Telemetry reports ingested."),
    ("alki_benchmark_results_total", "counter", "Benchmark results ingested."),
    (
        "alki_evaluations_received_total",
        "counter",
        "Quality evaluation reports received, by result (measured, could_not_run, refused: did not parse).",
    ),
    ("alki_evaluations_could_not_run_total", "counter", "Evaluations devices could not run, by kind."),
    (
        "alki_telemetry_rollups_dropped_total",
        "counter",
        "Telemetry reports not rolled up because the accumulator was full.",
    ),
    ("alki_telemetry_rollup_flushes_total", "counter", "Rollup flushes written to the store."),
    ("alki_commands_queued_total", "counter", "Commands queued for offline devices (delivered at their next Hello)."),
    (
        "alki_commands_expired_total",
        "counter",
        "Queued commands dropped because they expired before their device returned.",
    ),
    ("alki_commands_delivered_from_queue_total", "counter", "Queued commands delivered when their device returned."),
    (
        "alki_diagnostic_bytes_relayed_total",
        "counter",
        "Diagnostics bytes (logs and support bundles, compressed as they travel) relayed from devices to operators.",
    ),
    ("alki_diagnostics_in_flight", "gauge", "Diagnostics answers and device commands waiting for their device."),
    ("alki_agent_reports_queued", "gauge", "Agent reports (status, heartbeats, telemetry) waiting to be written."),
    ("alki_agent_reports_written_total", "counter", "Agent reports written to the store."),
    (
        "alki_agent_report_commits_total",
        "counter",
        "Store transactions the report writer committed (reports per commit: the group commit at work).",
    ),
    (
        "alki_calls_refused_total",
        "counter",
        "Calls refused before their caller was established (reason: unauthenticated) or over a token's or peer \
         address's rate (rate_limited), by gRPC method (http for the HTTP side); counted, not audited.",
    ),
];

/// Finished rollouts kept in the gauges besides the active ones (the newest first).
const RECENT_FINISHED: usize = 10;

const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OTHER"];

/// Counters of the HTTP side.
#[derive(Default)]
pub struct HttpCounters {
    registry_requests: [AtomicU64; 7],
    registry_bytes_in: Arc<AtomicU64>,
    registry_bytes_out: Arc<AtomicU64>,
}

impl HttpCounters {
    /// Their values now.
    pub fn registry(&self) -> RegistryTraffic {
        RegistryTraffic {
            requests: std::array::from_fn(|i| self.registry_requests[i].load(Ordering::Relaxed)),
            bytes_in: self.registry_bytes_in.load(Ordering::Relaxed),
            bytes_out: self.registry_bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// Registry traffic so far: requests by method (in the order of `METHODS`) and body bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RegistryTraffic {
    pub requests: [u64; 7],
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Counter values at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub registry: RegistryTraffic,
    pub telemetry_reports: u64,
    pub benchmark_results: u64,
    pub rollups_dropped: u64,
    pub rollup_flushes: u64,
    pub reports_queued: u64,
    pub reports_written: u64,
    pub report_commits: u64,
    pub evaluations: EvalCounts,
    /// (method, reason, count) of calls the gate refused without an audit entry.
    pub refused_calls: Vec<(String, &'static str, u64)>,
    pub sessions_waiting_hello: u64,
    pub console_sessions: u64,
    pub console_logins: u64,
    pub console_logins_refused: u64,
    /// The offline command queue: queued, expired, delivered; and diagnostics relayed.
    pub commands_queued: u64,
    pub commands_expired: u64,
    pub commands_delivered: u64,
    pub diagnostic_bytes: u64,
    pub diagnostics_in_flight: u64,
    pub events: EventCounts,
}

/// The event log and its webhook deliveries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventCounts {
    pub last_id: u64,
    pub delivered: u64,
    pub failed_attempts: u64,
    pub given_up: u64,
    pub latency_ms_sum: u64,
    /// (webhook id, pending events).
    pub pending: Vec<(String, u64)>,
}

/// What one scrape renders.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// Every device record, with `connected` filled from the live sessions.
    pub devices: Vec<proto::Device>,
    pub rollouts: Vec<proto::Rollout>,
    pub counters: Counters,
}

/// Counts registry requests and the bytes of their bodies as they stream (uploads and downloads alike).
pub async fn count_registry(State(counters): State<Arc<HttpCounters>>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/v2/") {
        return next.run(request).await;
    }
    let method = METHODS.iter().position(|m| *m == request.method().as_str()).unwrap_or(METHODS.len() - 1);
    counters.registry_requests[method].fetch_add(1, Ordering::Relaxed);
    let bytes_in = counters.registry_bytes_in.clone();
    let request = request.map(|body| {
        axum::body::Body::new(body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        }))
    });
    let response = next.run(request).await;
    let bytes_out = counters.registry_bytes_out.clone();
    response.map(|body| {
        axum::body::Body::new(body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        }))
    })
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Accumulates samples per metric so each metric's HELP and TYPE are written once.
#[derive(Default)]
struct Exposition {
    samples: BTreeMap<&'static str, Vec<String>>,
}

impl Exposition {
    fn add(&mut self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
        self.samples.entry(name).or_default().push(format!("{name}{labels} {value}"));
    }

    fn render(self) -> String {
        let mut out = String::new();
        for (name, kind, help) in NAMES {
            let Some(samples) = self.samples.get(name) else { continue };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in samples {
                let _ = writeln!(out, "{s}");
            }
        }
        out
    }
}

fn phase_label(phase: i32) -> &'static str {
    Phase::try_from(phase).unwrap_or(Phase::Unspecified).label()
}

/// Newest telemetry of the devices of one (class, bundle): tokens/s values, TTFT values, devices.
type Serving = (Vec<f64>, Vec<f64>, u64);

/// Pre-staging states as labels, in the order of [`Prestaging::devices`].
const PRESTAGE_STATES: [&str; 4] = ["pending", "sent", "ready", "failed"];

/// Pre-staging of one (rollout, class): devices by state, and commands sent.
#[derive(Default)]
struct Prestaging {
    devices: [u64; 4],
    attempts: u64,
}

fn prestage_index(state: i32) -> usize {
    match proto::PrestageState::try_from(state).unwrap_or_default() {
        // Not sent yet, or to be sent again (its session ended before an answer).
        proto::PrestageState::Unspecified => 0,
        proto::PrestageState::Sent => 1,
        proto::PrestageState::Ready => 2,
        proto::PrestageState::Failed => 3,
    }
}

/// Renders every metric of `scrape`.
pub fn render(scrape: &Scrape) -> String {
    let mut e = Exposition::default();
    device_metrics(&mut e, &scrape.devices);
    rollout_metrics(&mut e, &scrape.rollouts);
    counter_metrics(&mut e, &scrape.counters);
    e.render()
}

/// Devices per class: how many there are by state and phase, what they serve, and their pre-staging.
#[derive(Default)]
struct DeviceTally {
    by_state: BTreeMap<(&'static str, &'static str, String), u64>,
    serving: BTreeMap<(String, String), Serving>,
    prestaging: BTreeMap<(String, String), Prestaging>,
    connected: u64,
}

impl DeviceTally {
    fn add(&mut self, d: &proto::Device) {
        let state = if d.decommissioned {
            "decommissioned"
        } else if d.connected {
            self.connected += 1;
            "connected"
        } else {
            "disconnected"
        };
        let class = hardware_class(d);
        *self.by_state.entry((state, phase_label(d.phase), class.clone())).or_default() += 1;
        if let Some(p) = d.prestage.as_ref().filter(|p| !p.rollout_id.is_empty()) {
            let entry = self.prestaging.entry((p.rollout_id.clone(), class.clone())).or_default();
            entry.devices[prestage_index(p.state)] += 1;
            entry.attempts += u64::from(p.attempts);
        }
        if let Some(t) = d.latest_telemetry.as_ref().filter(|t| !t.bundle_digest.is_empty() && d.connected) {
            let entry = self.serving.entry((class, t.bundle_digest.clone())).or_default();
            if t.generation_tokens_per_second > 0.0 {
                entry.0.push(t.generation_tokens_per_second);
            }
            if t.ttft_ms > 0.0 {
                entry.1.push(t.ttft_ms);
            }
            entry.2 += 1;
        }
    }
}

fn device_metrics(e: &mut Exposition, devices: &[proto::Device]) {
    let mut tally = DeviceTally::default();
    for d in devices {
        tally.add(d);
    }
    e.add("alki_devices_connected", &[], tally.connected as f64);
    for ((state, phase, class), n) in &tally.by_state {
        e.add("alki_devices", &[("state", state), ("phase", phase), ("class", class)], *n as f64);
    }
    for ((class, bundle), (tps, ttft, n)) in &tally.serving {
        let labels = [("class", class.as_str()), ("bundle", bundle.as_str())];
        if let Some(m) = median(tps) {
            e.add("alki_class_generation_tokens_per_second", &labels, m);
        }
        if let Some(m) = median(ttft) {
            e.add("alki_class_ttft_ms", &labels, m);
        }
        e.add("alki_class_serving_devices", &labels, *n as f64);
    }
    for ((rollout, class), p) in &tally.prestaging {
        for (state, n) in PRESTAGE_STATES.iter().zip(p.devices) {
            let labels = [("rollout_id", rollout.as_str()), ("class", class.as_str()), ("state", state)];
            e.add("alki_rollout_prestage_devices", &labels, n as f64);
        }
        let labels = [("rollout_id", rollout.as_str()), ("class", class.as_str())];
        e.add("alki_rollout_prestage_attempts", &labels, p.attempts as f64);
    }
}

/// Rollouts by state, and the progress of the active ones and of the most recently finished.
fn rollout_metrics(e: &mut Exposition, rollouts: &[proto::Rollout]) {
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for r in rollouts {
        *by_state.entry(RolloutState::try_from(r.state).unwrap_or_default().label()).or_default() += 1;
    }
    for (state, n) in &by_state {
        e.add("alki_rollouts", &[("state", state)], *n as f64);
    }
    let mut newest_first: Vec<&proto::Rollout> = rollouts.iter().collect();
    newest_first.sort_by_key(|r| std::cmp::Reverse(r.updated_unix_ms));
    let (active, finished): (Vec<&proto::Rollout>, Vec<&proto::Rollout>) =
        newest_first.into_iter().partition(|r| is_active(RolloutState::try_from(r.state).unwrap_or_default()));
    for r in active.into_iter().chain(finished.into_iter().take(RECENT_FINISHED)) {
        one_rollout_metrics(e, r);
    }
}

fn counter_metrics(e: &mut Exposition, c: &Counters) {
    for (method, n) in METHODS.iter().zip(c.registry.requests) {
        e.add("alki_registry_requests_total", &[("method", method)], n as f64);
    }
    e.add("alki_registry_bytes_total", &[("direction", "in")], c.registry.bytes_in as f64);
    e.add("alki_registry_bytes_total", &[("direction", "out")], c.registry.bytes_out as f64);
    e.add("alki_telemetry_reports_total", &[], c.telemetry_reports as f64);
    e.add("alki_benchmark_results_total", &[], c.benchmark_results as f64);
    e.add("alki_telemetry_rollups_dropped_total", &[], c.rollups_dropped as f64);
    e.add("alki_telemetry_rollup_flushes_total", &[], c.rollup_flushes as f64);
    e.add("alki_agent_reports_queued", &[], c.reports_queued as f64);
    e.add("alki_agent_reports_written_total", &[], c.reports_written as f64);
    e.add("alki_agent_report_commits_total", &[], c.report_commits as f64);
    e.add("alki_sessions_waiting_hello", &[], c.sessions_waiting_hello as f64);
    e.add("alki_console_sessions", &[], c.console_sessions as f64);
    e.add("alki_console_logins_total", &[], c.console_logins as f64);
    e.add("alki_console_logins_refused_total", &[], c.console_logins_refused as f64);
    let ev = &c.events;
    e.add("alki_events_last_id", &[], ev.last_id as f64);
    e.add("alki_webhook_deliveries_total", &[], ev.delivered as f64);
    e.add("alki_webhook_delivery_failures_total", &[], ev.failed_attempts as f64);
    e.add("alki_webhook_events_given_up_total", &[], ev.given_up as f64);
    e.add("alki_webhook_delivery_latency_ms_sum", &[], ev.latency_ms_sum as f64);
    for (webhook, pending) in &ev.pending {
        e.add("alki_webhook_pending_events", &[("webhook", webhook)], *pending as f64);
    }
    e.add("alki_commands_queued_total", &[], c.commands_queued as f64);
    e.add("alki_commands_expired_total", &[], c.commands_expired as f64);
    e.add("alki_commands_delivered_from_queue_total", &[], c.commands_delivered as f64);
    e.add("alki_diagnostic_bytes_relayed_total", &[], c.diagnostic_bytes as f64);
    e.add("alki_diagnostics_in_flight", &[], c.diagnostics_in_flight as f64);
    for (method, reason, n) in &c.refused_calls {
        e.add("alki_calls_refused_total", &[("method", method), ("reason", reason)], *n as f64);
    }
    let ev = &c.evaluations;
    let could_not_run: u64 = ev.could_not_run.iter().sum();
    for (result, n) in [("measured", ev.measured), ("could_not_run", could_not_run), ("refused", ev.refused)] {
        e.add("alki_evaluations_received_total", &[("result", result)], n as f64);
    }
    for (kind, n) in COULD_NOT_RUN_KINDS.iter().zip(ev.could_not_run) {
        e.add("alki_evaluations_could_not_run_total", &[("kind", kind)], n as f64);
    }
}

fn one_rollout_metrics(e: &mut Exposition, r: &proto::Rollout) {
    let id = r.id.as_str();
    let steps = r.spec.as_ref().map(|s| s.steps.len()).unwrap_or(0);
    let percent = r.spec.as_ref().and_then(|s| s.steps.get(r.current_step as usize)).map(|s| s.percent).unwrap_or(0);
    e.add("alki_rollout_step", &[("rollout_id", id)], f64::from(r.current_step + 1));
    e.add("alki_rollout_steps", &[("rollout_id", id)], steps as f64);
    e.add("alki_rollout_percent", &[("rollout_id", id)], f64::from(percent));
    for c in &r.classes {
        let n = c.counts.unwrap_or_default();
        for (outcome, v) in [
            ("selected", n.selected),
            ("candidate", n.candidate),
            ("active", n.active),
            ("failed", n.failed),
            ("pending", n.pending),
        ] {
            e.add(
                "alki_rollout_devices",
                &[("rollout_id", id), ("class", &c.class), ("outcome", outcome)],
                f64::from(v),
            );
        }
        if c.tokens_per_second_ratio > 0.0 {
            e.add(
                "alki_rollout_class_ratio",
                &[("rollout_id", id), ("class", &c.class), ("metric", "tokens_per_second")],
                c.tokens_per_second_ratio,
            );
        }
        if c.ttft_ratio > 0.0 {
            e.add(
                "alki_rollout_class_ratio",
                &[("rollout_id", id), ("class", &c.class), ("metric", "ttft")],
                c.ttft_ratio,
            );
        }
        e.add(
            "alki_rollout_class_samples",
            &[("rollout_id", id), ("class", &c.class), ("cohort", "A")],
            f64::from(c.a_samples),
        );
        e.add(
            "alki_rollout_class_samples",
            &[("rollout_id", id), ("class", &c.class), ("cohort", "B")],
            f64::from(c.b_samples),
        );
        if let Some(q) = &c.quality {
            class_quality_metrics(e, r, &c.class, q);
        }
        if c.a_error_rate > 0.0 || c.b_error_rate > 0.0 {
            for (cohort, rate) in [("A", c.a_error_rate), ("B", c.b_error_rate)] {
                let labels = [("rollout_id", id), ("class", c.class.as_str()), ("cohort", cohort)];
                e.add("alki_rollout_class_error_rate", &labels, rate);
            }
        }
        for (cohort, ms) in [("A", c.a_p95_latency_ms), ("B", c.b_p95_latency_ms)] {
            if ms > 0.0 {
                let labels = [("rollout_id", id), ("class", c.class.as_str()), ("cohort", cohort)];
                e.add("alki_rollout_class_p95_latency_ms", &labels, ms);
            }
        }
    }
}

/// A class's quality (worst values) and how many devices measured or could not run the suite.
fn class_quality_metrics(e: &mut Exposition, r: &proto::Rollout, class: &str, q: &proto::ClassQuality) {
    let bundle = r.candidate.as_ref().map(|b| b.digest.as_str()).unwrap_or_default();
    let values = [
        ("kld", q.max_kld),
        ("top1_agreement", q.min_top1_agreement),
        ("perplexity_ratio", q.max_perplexity_ratio),
        ("golden_pass", q.min_golden_pass),
    ];
    for (metric, value) in values {
        if let Some(v) = value {
            let labels = [("rollout_id", r.id.as_str()), ("class", class), ("bundle", bundle), ("metric", metric)];
            e.add("alki_rollout_class_quality", &labels, v);
        }
    }
    for (result, n) in [("measured", q.measured), ("could_not_run", q.could_not_run)] {
        let labels = [("rollout_id", r.id.as_str()), ("class", class), ("result", result)];
        e.add("alki_rollout_class_evaluations", &labels, f64::from(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Keyed;
    use alki_shared::ids::DeviceId;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("device id")
    }

    fn scrape(store: &crate::store::Store) -> Scrape {
        Scrape {
            devices: store.devices().expect("devices").into_iter().map(Keyed::into_record).collect(),
            rollouts: store.rollouts().expect("rollouts").into_iter().map(Keyed::into_record).collect(),
            counters: Counters::default(),
        }
    }

    #[test]
    fn a_scrape_names_only_listed_metrics_and_counts_the_fleet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(dir.path()).expect("open");
        for (device, class) in [("d1", "pi5-8g"), ("d2", "pi5-8g"), ("d3", "x86-avx2")] {
            store
                .update_device(&id(device), |d| {
                    d.labels.insert("class".into(), class.into());
                    d.phase = Phase::Active as i32;
                })
                .expect("device");
        }
        let rollout = proto::Rollout {
            id: "ro-1".into(),
            state: RolloutState::Progressing as i32,
            candidate: Some(proto::BundleRef { digest: "sha256:bb".into(), ..Default::default() }),
            classes: vec![proto::ClassStatus {
                class: "pi5-8g".into(),
                tokens_per_second_ratio: 0.7,
                quality: Some(proto::ClassQuality {
                    measured: 3,
                    could_not_run: 1,
                    max_kld: Some(0.25),
                    min_golden_pass: Some(0.5),
                    ..Default::default()
                }),
                b_error_rate: 0.02,
                a_error_rate: 0.001,
                b_p95_latency_ms: 840.0,
                a_p95_latency_ms: 400.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        store.put_rollout(&Keyed::new(rollout).expect("rollout id")).expect("rollout");
        let mut scraped = scrape(&store);
        scraped.counters.evaluations = EvalCounts { measured: 5, could_not_run: [2, 0, 1, 0, 0], refused: 1 };
        let text = render(&scraped);
        for expected in [
            r#"alki_rollout_class_quality{rollout_id="ro-1",class="pi5-8g",bundle="sha256:bb",metric="kld"} 0.25"#,
            r#"alki_rollout_class_quality{rollout_id="ro-1",class="pi5-8g",bundle="sha256:bb",metric="golden_pass"} 0.5"#,
            r#"alki_rollout_class_evaluations{rollout_id="ro-1",class="pi5-8g",result="could_not_run"} 1"#,
            r#"alki_rollout_class_error_rate{rollout_id="ro-1",class="pi5-8g",cohort="B"} 0.02"#,
            r#"alki_rollout_class_p95_latency_ms{rollout_id="ro-1",class="pi5-8g",cohort="B"} 840"#,
            r#"alki_rollout_class_p95_latency_ms{rollout_id="ro-1",class="pi5-8g",cohort="A"} 400"#,
            r#"alki_evaluations_received_total{result="could_not_run"} 3"#,
            r#"alki_evaluations_received_total{result="refused"} 1"#,
            r#"alki_evaluations_could_not_run_total{kind="does_not_fit"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == expected), "missing {expected}:\n{text}");
        }
        assert!(!text.contains("metric=\"top1_agreement\""), "an unmeasured value is not exported");
        assert!(text.contains("alki_devices{state=\"disconnected\",phase=\"active\",class=\"pi5-8g\"} 2"), "{text}");
        assert!(text.contains(
            "alki_rollout_class_ratio{rollout_id=\"ro-1\",class=\"pi5-8g\",metric=\"tokens_per_second\"} 0.7"
        ));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(NAMES.iter().any(|(n, _, _)| *n == name), "{name} is exported but not listed");
        }
    }

    #[test]
    fn pre_staging_is_counted_per_rollout_class_and_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(dir.path()).expect("open");
        let devices = [
            ("d1", "pi5-8g", "ro-1", proto::PrestageState::Ready, 1),
            ("d2", "pi5-8g", "ro-1", proto::PrestageState::Ready, 1),
            ("d3", "pi5-8g", "ro-1", proto::PrestageState::Failed, 3),
            ("d4", "x86-avx2", "ro-1", proto::PrestageState::Sent, 1),
            ("d5", "x86-avx2", "ro-1", proto::PrestageState::Unspecified, 2),
            ("d6", "pi5-8g", "ro-2", proto::PrestageState::Sent, 1),
        ];
        for (device, class, rollout, state, attempts) in devices {
            store
                .update_device(&id(device), |d| {
                    d.labels.insert("class".into(), class.into());
                    d.prestage = Some(proto::DevicePrestage {
                        rollout_id: rollout.into(),
                        state: state as i32,
                        attempts,
                        ..Default::default()
                    });
                })
                .expect("device");
        }
        // A device never told to pre-stage counts nowhere.
        store.update_device(&id("d7"), |d| d.phase = Phase::Active as i32).expect("device");
        let text = render(&scrape(&store));
        for expected in [
            r#"alki_rollout_prestage_devices{rollout_id="ro-1",class="pi5-8g",state="ready"} 2"#,
            r#"alki_rollout_prestage_devices{rollout_id="ro-1",class="pi5-8g",state="failed"} 1"#,
            r#"alki_rollout_prestage_devices{rollout_id="ro-1",class="pi5-8g",state="sent"} 0"#,
            r#"alki_rollout_prestage_devices{rollout_id="ro-1",class="x86-avx2",state="sent"} 1"#,
            r#"alki_rollout_prestage_devices{rollout_id="ro-1",class="x86-avx2",state="pending"} 1"#,
            r#"alki_rollout_prestage_devices{rollout_id="ro-2",class="pi5-8g",state="sent"} 1"#,
            r#"alki_rollout_prestage_attempts{rollout_id="ro-1",class="pi5-8g"} 5"#,
            r#"alki_rollout_prestage_attempts{rollout_id="ro-1",class="x86-avx2"} 3"#,
            "# TYPE alki_rollout_prestage_devices gauge",
        ] {
            assert!(text.lines().any(|l| l == expected), "missing {expected}:\n{text}");
        }
        let samples = text.lines().filter(|l| l.starts_with("alki_rollout_prestage_devices{")).count();
        assert_eq!(samples, 3 * PRESTAGE_STATES.len(), "one series per state for each (rollout, class)");
    }
}
