//! The one gRPC session to the controller: Hello, heartbeats, statuses and telemetry up; Welcome and desired
//! states down; reconnecting with jittered exponential backoff, and meanwhile keeping every report (statuses,
//! telemetry, benchmarks, prestage answers, evaluations) in the bounded [`crate::outbox::Outbox`], replayed
//! after the Hello.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto::{self, agent_message, controller_message};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::bench::{Jobs, command_job};
use crate::metrics::{AgentMetrics, TelemetryCollector};
use crate::outbox::{Outbox, Pushed, Report, ReportKind};
use crate::runtime::Proxy;
use crate::state::Snapshot;

/// Messages waiting to go up one session; a full queue means the session is stuck.
const OUTBOUND_CAPACITY: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
pub const TELEMETRY_INTERVAL: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the reconnect backoff.
const SESSION_LASTED: Duration = Duration::from_secs(30);

/// Everything one session loop needs; built by [`crate::run`].
pub struct SessionContext {
    pub device_id: DeviceId,
    pub url: String,
    pub token_file: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// The labels the controller selects this device by (from the Welcome): its enrollment token's and
    /// operators', and of `labels` only the keys the controller lets devices own.
    pub selected_by: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    pub proxy: Arc<Proxy>,
    pub snapshot: watch::Receiver<Snapshot>,
    /// The newest desired state received; the device loop converges to it.
    pub desired: watch::Sender<Option<proto::DesiredState>>,
    pub statuses: mpsc::Receiver<proto::Status>,
    /// Reloaded configs: a change of labels starts a new session (a new Hello carries them).
    pub config: Option<watch::Receiver<crate::reload::ConfigState>>,
    /// Telemetry building, benchmark commands and reports.
    pub telemetry: SessionTelemetry,
    /// The config at start: how to reach the controller (mTLS with the device identity, or the insecure
    /// token mode) and how to enroll.
    pub settings: crate::Config,
    /// Where the registry token from each Welcome goes, for pulls from the embedded registry.
    pub registry_token: crate::identity::DeviceRegistryToken,
    /// Prestage commands, their reports, and the staged bundles Hello lists.
    pub staging: crate::stage::SessionStaging,
    /// Remote diagnostics and the operators' device commands.
    pub(crate) operations: Operations,
}

/// What the operators' commands reach: diagnostics (logs, support bundles), the device loop (restart the
/// runtime) and the content store's scrubber (reverify).
pub(crate) struct Operations {
    pub diagnostics: crate::diagnostics::Diagnostics,
    pub device: mpsc::Sender<crate::device::DeviceRequest>,
    pub scrubber: crate::scrub::Scrubber,
}

/// What the session needs for telemetry and commands; built by [`crate::Agent::run`].
pub struct SessionTelemetry {
    pub collector: TelemetryCollector,
    pub metrics: Arc<AgentMetrics>,
    /// The benchmark queue, for controller commands; None when benchmarks are off.
    pub bench: Option<Jobs>,
    /// Benchmark reports to send up.
    pub reports: mpsc::Receiver<proto::BenchmarkReport>,
    /// The evaluation queue, for Evaluate commands.
    pub evals: crate::eval::Jobs,
    /// Evaluation reports to send up.
    pub eval_reports: mpsc::Receiver<proto::EvalReport>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot read the agent token from {path}: {source}; create it with a token of role agent")]
    Token { path: PathBuf, source: std::io::Error },
    #[error("the agent token file {0} is empty; put a token of role agent in it")]
    EmptyToken(PathBuf),
    #[error("device identity: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("the controller did not accept the session within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("the controller refused the agent's token ({0}); check controller.token_file holds a token of role agent")]
    Unauthenticated(String),
    #[error("the session failed: {0}")]
    Rpc(tonic::Status),
    #[error("the controller stopped reading; reconnecting")]
    Stalled,
    #[error("the controller closed the session")]
    Closed,
}

/// Exponential backoff with ±20% jitter: 0.5 s doubling to 30 s.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { next: min, min, max }
    }

    /// The next delay, jittered by a factor in [0.8, 1.2].
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rng.random_range(0.8..=1.2))
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The telemetry cadence, kept across sessions: a reconnect neither skips an interval nor sends an extra one.
struct TelemetryClock {
    every: Duration,
    tick: tokio::time::Interval,
}

impl TelemetryClock {
    fn new(every: Duration) -> TelemetryClock {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        TelemetryClock { every, tick }
    }

    /// The controller's interval (from Welcome); the next tick is one interval from now when it changes.
    fn set(&mut self, every: Duration) {
        if every != self.every {
            self.every = every;
            self.tick = tokio::time::interval_at(Instant::now() + every, every);
            self.tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
    }
}

/// Keeps a report for the next session, logging the first drop of its kind in this outage.
fn keep(outbox: &mut Outbox, metrics: &AgentMetrics, report: Report) {
    if let Pushed::FirstDrop(kind) = outbox.push(report) {
        tracing::warn!(
            kind = kind.label(),
            kept = outbox.held(kind),
            "The controller is unreachable and reports of this kind are past their bound; dropping the oldest."
        );
    }
    metrics.outbox(outbox);
}

/// Sends a report, or keeps it for the next session when the send fails.
async fn send_or_keep(
    out: &mpsc::Sender<proto::AgentMessage>,
    outbox: &mut Outbox,
    metrics: &AgentMetrics,
    report: Report,
) -> Result<(), SessionError> {
    if let Err(e) = send(out, report.clone().into_msg()).await {
        keep(outbox, metrics, report);
        return Err(e);
    }
    Ok(())
}

/// Sends the reports kept while disconnected, oldest first; each leaves the outbox only once sent.
async fn replay(
    out: &mpsc::Sender<proto::AgentMessage>,
    outbox: &mut Outbox,
    metrics: &AgentMetrics,
) -> Result<(), SessionError> {
    if outbox.is_empty() {
        return Ok(());
    }
    let dropped: Vec<String> = ReportKind::ALL
        .iter()
        .filter(|k| outbox.dropped_since_replay(**k) > 0)
        .map(|k| format!("{} {}", outbox.dropped_since_replay(*k), k.label()))
        .collect();
    tracing::info!(
        reports = outbox.len(),
        dropped = %dropped.join(", "),
        "Replaying the reports kept while the controller was unreachable."
    );
    while let Some(report) = outbox.front() {
        send(out, report.clone().into_msg()).await?;
        outbox.sent();
    }
    metrics.outbox(outbox);
    Ok(())
}

async fn collect_telemetry(ctx: &mut SessionContext, every: Duration) -> proto::Telemetry {
    let snapshot = ctx.snapshot.borrow().clone();
    ctx.telemetry.collector.collect(&ctx.proxy, &snapshot, &ctx.telemetry.metrics, every).await
}

/// Runs sessions until `shutdown` turns true, reconnecting with backoff.
pub async fn run(mut ctx: SessionContext, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Backoff::default();
    let mut outbox = Outbox::new(crate::outbox::Bounds::default());
    let mut clock = TelemetryClock::new(TELEMETRY_INTERVAL);
    let mut statuses_open = true;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let outcome = one_session(&mut ctx, &mut outbox, &mut clock, &mut statuses_open, &mut shutdown).await;
        // Nobody reads their answers any more: logs being followed stop on the device too.
        ctx.operations.diagnostics.cancel_all();
        if *shutdown.borrow() {
            return;
        }
        match &outcome {
            Err(
                e @ (SessionError::Unauthenticated(_)
                | SessionError::Token { .. }
                | SessionError::EmptyToken(_)
                | SessionError::Identity(
                    crate::identity::IdentityError::NotEnrolled(_) | crate::identity::IdentityError::Refused(_),
                )),
            ) => {
                tracing::error!(error = %e, "Controller session refused.");
            }
            Err(e) => tracing::warn!(error = %e, "Controller session ended."),
            Ok(()) => {}
        }
        if started.elapsed() >= SESSION_LASTED {
            backoff.reset();
        }
        let delay = backoff.next_delay(&mut rand::rng());
        tracing::debug!(delay_ms = delay.as_millis() as u64, "Reconnecting to the controller later.");
        let wait = tokio::time::sleep(delay);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = clock.tick.tick() => {
                    let t = collect_telemetry(&mut ctx, clock.every).await;
                    keep(&mut outbox, &ctx.telemetry.metrics, Report::Telemetry(t));
                }
                Some(report) = ctx.telemetry.reports.recv() => {
                    keep(&mut outbox, &ctx.telemetry.metrics, Report::Benchmark(report));
                }
                Some(report) = ctx.staging.reports.recv() => {
                    keep(&mut outbox, &ctx.telemetry.metrics, Report::Prestage(report));
                }
                Some(report) = ctx.telemetry.eval_reports.recv() => {
                    keep(&mut outbox, &ctx.telemetry.metrics, Report::Eval(Box::new(report)));
                }
                status = ctx.statuses.recv(), if statuses_open => match status {
                    Some(s) => keep(&mut outbox, &ctx.telemetry.metrics, Report::Status(s)),
                    None => statuses_open = false,
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn read_token(path: &Path) -> Result<String, SessionError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| SessionError::Token { path: path.to_owned(), source })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(SessionError::EmptyToken(path.to_owned()));
    }
    Ok(token.to_owned())
}

async fn send(out: &mpsc::Sender<proto::AgentMessage>, msg: agent_message::Msg) -> Result<(), SessionError> {
    let message = proto::AgentMessage { msg: Some(msg) };
    match tokio::time::timeout(SEND_TIMEOUT, out.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(SessionError::Closed),
        Err(_) => Err(SessionError::Stalled),
    }
}

/// One session: connect, Hello, replay what was kept, then serve the stream until it ends, the labels
/// change (a new Hello must carry them) or the agent shuts down.
async fn one_session(
    ctx: &mut SessionContext,
    outbox: &mut Outbox,
    clock: &mut TelemetryClock,
    statuses_open: &mut bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let (token, channel) = connect(ctx).await?;
    let (out, out_rx) = mpsc::channel::<proto::AgentMessage>(OUTBOUND_CAPACITY);
    send(&out, agent_message::Msg::Hello(hello(ctx).await)).await?;
    let mut inbound = open_stream(channel, out_rx, token).await?;
    tracing::info!(url = %ctx.url, "Connected to the controller.");
    // Reports kept while disconnected go right after the Hello, now that the stream is being read.
    replay(&out, outbox, &ctx.telemetry.metrics).await?;

    // The first heartbeat goes at once; the Welcome sets the controller's interval.
    let mut heartbeat = tokio::time::interval(DEFAULT_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(proto::ControllerMessage { msg: Some(msg) })) => match msg {
                    controller_message::Msg::Welcome(welcome) => {
                        heartbeat = on_welcome(ctx, welcome, clock);
                    }
                    controller_message::Msg::DesiredState(desired) => {
                        tracing::info!(generation = desired.generation, "Received a desired state.");
                        ctx.desired.send_replace(Some(desired));
                    }
                    controller_message::Msg::Command(command) => on_command(ctx, command, &out, outbox).await?,
                },
                Ok(Some(proto::ControllerMessage { msg: None })) => {}
                Ok(None) => return Err(SessionError::Closed),
                Err(status) => return Err(refused_or_failed(status)),
            },
            _ = heartbeat.tick() => {
                send(&out, agent_message::Msg::Heartbeat(proto::Heartbeat { sent_unix_ms: UnixMs::now().as_millis() })).await?;
            }
            _ = clock.tick.tick() => {
                let t = collect_telemetry(ctx, clock.every).await;
                send_or_keep(&out, outbox, &ctx.telemetry.metrics, Report::Telemetry(t)).await?;
            }
            Some(report) = ctx.telemetry.reports.recv() => {
                send_or_keep(&out, outbox, &ctx.telemetry.metrics, Report::Benchmark(report)).await?;
            }
            Some(report) = ctx.staging.reports.recv() => {
                send_or_keep(&out, outbox, &ctx.telemetry.metrics, Report::Prestage(report)).await?;
            }
            Some(report) = ctx.telemetry.eval_reports.recv() => {
                send_or_keep(&out, outbox, &ctx.telemetry.metrics, Report::Eval(Box::new(report))).await?;
            }
            status = ctx.statuses.recv(), if *statuses_open => match status {
                Some(status) => send_or_keep(&out, outbox, &ctx.telemetry.metrics, Report::Status(status)).await?,
                None => *statuses_open = false,
            },
            changed = labels_changed(&mut ctx.config, &ctx.labels) => match changed {
                Some(labels) => {
                    tracing::info!("Labels changed; starting a new session to report them.");
                    ctx.labels = labels;
                    return Ok(());
                }
                None => ctx.config = None,
            },
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// The channel to the controller: mTLS with the device certificate (enrolling first if needed), or a bearer
/// token (returned) in the insecure mode.
async fn connect(ctx: &SessionContext) -> Result<(Option<String>, tonic::transport::Channel), SessionError> {
    if ctx.settings.controller.insecure_plaintext {
        let token = read_token(&ctx.token_file).await?;
        return Ok((Some(token), crate::identity::connect(&ctx.settings, None).await?));
    }
    crate::enroll::ensure_enrolled(&ctx.settings, &ctx.device_id).await?;
    let client = crate::identity::IdentityFiles::of(&ctx.settings).tls_identity()?;
    Ok((None, crate::identity::connect(&ctx.settings, Some(client)).await?))
}

/// The Hello: who the device is, what it has and runs, what it last applied and what is staged.
async fn hello(ctx: &SessionContext) -> proto::Hello {
    let (data_dir, labels) = (ctx.data_dir.clone(), ctx.labels.clone());
    let mut inventory = tokio::task::spawn_blocking(move || crate::inventory::collect(&data_dir, &labels)).await.ok();
    let remote_logs = match &ctx.config {
        Some(reloads) => reloads.borrow().config.diagnostics.remote_logs,
        None => ctx.settings.diagnostics.remote_logs,
    };
    if let Some(inventory) = inventory.as_mut() {
        inventory.remote_diagnostics_refused = !remote_logs;
    }
    let snapshot = ctx.snapshot.borrow().clone();
    let staged = ctx.staging.staged.borrow().listed(snapshot.running.as_ref());
    proto::Hello {
        device_id: ctx.device_id.to_string(),
        agent_version: alki_shared::build::LONG_VERSION.to_owned(),
        inventory,
        labels: ctx.labels.clone().into_iter().collect(),
        running: snapshot.running,
        last_applied_generation: snapshot.last_applied.0,
        staged,
    }
}

/// Opens the session stream with `outbound` as what goes up (the Hello is already queued in it).
async fn open_stream(
    channel: tonic::transport::Channel,
    outbound: mpsc::Receiver<proto::AgentMessage>,
    token: Option<String>,
) -> Result<tonic::Streaming<proto::ControllerMessage>, SessionError> {
    let mut client = proto::agent_service_client::AgentServiceClient::new(channel);
    let mut request = tonic::Request::new(ReceiverStream::new(outbound));
    if let Some(token) = token {
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| SessionError::Unauthenticated("the token holds characters not allowed in a header".into()))?;
        request.metadata_mut().insert("authorization", bearer);
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, client.session(request)).await {
        Err(_) => Err(SessionError::ConnectTimeout),
        Ok(Err(status)) => Err(refused_or_failed(status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

/// A failed RPC: refused (the credentials) or failed otherwise.
fn refused_or_failed(status: tonic::Status) -> SessionError {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            SessionError::Unauthenticated(status.message().to_owned())
        }
        _ => SessionError::Rpc(status),
    }
}

fn heartbeat_every(every: Duration) -> tokio::time::Interval {
    let mut heartbeat = tokio::time::interval_at(Instant::now() + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat
}

/// The Welcome: the registry token for pulls, and the heartbeat (returned) and telemetry intervals.
fn on_welcome(ctx: &mut SessionContext, welcome: proto::Welcome, clock: &mut TelemetryClock) -> tokio::time::Interval {
    if !welcome.device_id.is_empty() && welcome.device_id != ctx.device_id.as_str() {
        tracing::warn!(controller_says = %welcome.device_id, "The controller knows this device by another id.");
    }
    let every = match welcome.heartbeat_interval_seconds {
        0 => DEFAULT_HEARTBEAT,
        s => Duration::from_secs(u64::from(s.clamp(1, 300))),
    };
    ctx.registry_token.set(welcome.registry_token, welcome.registry_token_expires_unix_ms, welcome.registry);
    let selected_by: BTreeMap<String, String> = welcome.labels.into_iter().collect();
    if selected_by != ctx.selected_by {
        let shown: Vec<String> = selected_by.iter().map(|(k, v)| format!("{k}={v}")).collect();
        tracing::info!(labels = %shown.join(","), "The controller selects this device by these labels.");
        ctx.selected_by = selected_by;
    }
    tracing::debug!(heartbeat_secs = every.as_secs(), "Welcomed by the controller.");
    let telemetry = match welcome.telemetry_interval_seconds {
        0 => TELEMETRY_INTERVAL,
        s => Duration::from_secs(u64::from(s.clamp(1, 3600))),
    };
    clock.set(telemetry);
    heartbeat_every(every)
}

/// A command: Prestage to the staging queue, Evaluate to the evaluation queue (its baseline, unless named,
/// what the device serves now), the others to the benchmark queue; a refusal is reported at once.
async fn on_command(
    ctx: &SessionContext,
    command: proto::Command,
    out: &mpsc::Sender<proto::AgentMessage>,
    outbox: &mut Outbox,
) -> Result<(), SessionError> {
    tracing::info!(command_id = %command.id, "Received a command.");
    if operation(ctx, &command, out) {
        return Ok(());
    }
    let metrics = &ctx.telemetry.metrics;
    if let Some(proto::command::Kind::Prestage(prestage)) = &command.kind {
        if let Err(refusal) = ctx.staging.jobs.offer(&command.id, prestage.clone()) {
            tracing::warn!(command_id = %command.id, "Prestage refused: the staging queue is full.");
            send_or_keep(out, outbox, metrics, Report::Prestage(*refusal)).await?;
        }
    } else if let Some(proto::command::Kind::Evaluate(evaluate)) = &command.kind {
        let snapshot = ctx.snapshot.borrow().clone();
        let serving = snapshot.running.as_ref().map(|running| (running, snapshot.variant_digest.as_str()));
        match crate::eval::Job::command(&command.id, evaluate, serving) {
            Ok(job) => {
                ctx.telemetry.evals.submit(job);
            }
            Err(refusal) => {
                tracing::warn!(command_id = %command.id, "Evaluate command refused: it names no usable bundle or suite.");
                send_or_keep(out, outbox, metrics, Report::Eval(refusal)).await?;
            }
        }
    } else if let Err(refusal) = command_job(ctx.telemetry.bench.as_ref(), command) {
        tracing::warn!(command_id = %refusal.command_id, error = %refusal.error, "Command refused.");
        send_or_keep(out, outbox, metrics, Report::Benchmark(refusal)).await?;
    }
    Ok(())
}

/// An operator's diagnostics or device command, started on its own task (its answer goes up `out` when
/// done). False for other commands.
fn operation(ctx: &SessionContext, command: &proto::Command, out: &mpsc::Sender<proto::AgentMessage>) -> bool {
    use crate::diagnostics::Ask;
    use proto::command::Kind;
    let ops = &ctx.operations;
    let id = command.id.clone();
    match &command.kind {
        Some(Kind::CollectLogs(ask)) => ops.diagnostics.start(&id, Ask::Logs(ask.clone()), out.clone()),
        Some(Kind::SupportBundle(ask)) => ops.diagnostics.start(&id, Ask::Bundle(*ask), out.clone()),
        Some(Kind::Cancel(cancel)) => ops.diagnostics.cancel(&cancel.command_id),
        Some(Kind::RestartRuntime(_)) => {
            let device = ops.device.clone();
            tokio::spawn(answer(id, out.clone(), async move { restart(device).await }));
        }
        Some(Kind::Reverify(_)) => {
            let scrubber = ops.scrubber.clone();
            tokio::spawn(answer(id, out.clone(), async move {
                scrubber.reverify().await.map(|r| proto::CommandResult {
                    ok: true,
                    detail: format!("{} blobs hashed, {} corrupt, {} removed", r.checked, r.corrupt, r.removed),
                    checked: r.checked,
                    corrupt: r.corrupt,
                    removed: r.removed,
                    corrupt_digests: r.corrupt_digests,
                    ..Default::default()
                })
            }));
        }
        _ => return false,
    }
    true
}

/// Asks the device loop to restart the runtime and waits for its answer.
async fn restart(device: mpsc::Sender<crate::device::DeviceRequest>) -> Result<proto::CommandResult, String> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    device
        .try_send(crate::device::DeviceRequest::RestartRuntime(reply))
        .map_err(|_| "the device is busy with another restart; retry when it ends".to_owned())?;
    let detail = answer.await.map_err(|_| "the agent is shutting down".to_owned())??;
    Ok(proto::CommandResult { ok: true, detail, ..Default::default() })
}

/// Sends a device command's result (or its failure) up the session it came on.
async fn answer(
    command_id: String,
    out: mpsc::Sender<proto::AgentMessage>,
    work: impl std::future::Future<Output = Result<proto::CommandResult, String>>,
) {
    let mut result = work.await.unwrap_or_else(|error| proto::CommandResult { error, ..Default::default() });
    result.command_id = command_id;
    if send(&out, agent_message::Msg::CommandResult(result)).await.is_err() {
        tracing::warn!("A device command's result was lost with its session.");
    }
}

/// Resolves with new labels when a reloaded config changes them; None when the watcher is gone.
async fn labels_changed(
    config: &mut Option<watch::Receiver<crate::reload::ConfigState>>,
    current: &BTreeMap<String, String>,
) -> Option<BTreeMap<String, String>> {
    let Some(rx) = config else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            return None;
        }
        let labels = rx.borrow_and_update().config.labels.clone();
        if &labels != current {
            return Some(labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay(&mut rng)).collect();
        let bases = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0];
        for (d, base) in delays.iter().zip(bases) {
            let s = d.as_secs_f64();
            assert!(s >= base * 0.8 - 1e-9 && s <= base * 1.2 + 1e-9, "{s} vs {base}");
        }
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(600));
    }
}
