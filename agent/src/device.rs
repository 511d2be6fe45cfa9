//! The device loop: carries out the convergence decisions (pull, verify, start, flip), keeps the state file,
//! reports every phase, watches a new model for a while after the flip (swapping back on a crash or a failed
//! liveness check), and restarts a crashed llama-server with backoff, falling back to the previous bundle on
//! a crash loop or a model that no longer loads.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alki_shared::digest::Digest;
use alki_shared::proto::{self, ErrorCode, Phase};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::bench::Jobs;
use crate::config::SwapStrategyChoice;
use crate::converge::{Converger, Decision, Desired, ServingKey};
use crate::metrics::{ActivationOutcome, AgentMetrics};
use crate::pull::keep::{Kept, deployments_of, kept};
use crate::pull::{
    Acquirer, PullError, PullOptions, PullProgress, PulledBundle, RegistrySettings, Want, prune_variant_dirs,
};
use crate::reference::BundleLocation;
use crate::runtime::{LaunchSpec, StartError, Supervisor, SwapStrategy};
use crate::state::{AgentState, Deployment, Snapshot, StateFile};

const STATUS_SEND_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// Retries of activations that failed for a reason that may pass (registry unreachable, local I/O).
pub(crate) const RETRY_MIN: Duration = Duration::from_secs(15);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Liveness checks of a new model during its watch window.
const WATCH_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive failed liveness checks that count as a failure (one can be a hiccup).
const WATCH_PROBE_FAILURES: u32 = 2;
/// This many crashes within [`CRASH_LOOP_WINDOW`] is a crash loop.
pub(crate) const CRASH_LOOP_COUNT: usize = 3;
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(600);

/// How the device swaps models, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct SwapPolicy {
    pub watch_window: Duration,
    pub strategy: SwapStrategyChoice,
    pub memory_reserve: u64,
    /// Free disk space a pull must leave.
    pub disk_reserve: u64,
    /// The content store's budget in bytes, if any.
    pub store_budget: Option<u64>,
    /// Pull rate limit in bytes per second, if any.
    pub bandwidth: Option<u64>,
    /// How much longer a stop-then-start gap may last to evaluate the candidate in it (zero: never).
    pub eval_gap_budget: Duration,
}

impl SwapPolicy {
    pub fn from_config(config: &crate::Config) -> SwapPolicy {
        SwapPolicy {
            watch_window: config.watch_window(),
            strategy: config.runtime.swap_strategy,
            memory_reserve: config.memory_reserve_bytes(),
            disk_reserve: config.disk_reserve_bytes(),
            store_budget: config.store_budget_bytes(),
            bandwidth: config.bandwidth_limit(),
            eval_gap_budget: config.eval_gap_budget(),
        }
    }
}

/// A new model under watch after its flip, and what to put back if it fails.
pub(crate) struct Watch {
    until: Instant,
    next_probe: Instant,
    failures: u32,
    desired: Desired,
    restore_active: Option<Deployment>,
    restore_previous: Option<Deployment>,
}

#[derive(Debug, thiserror::Error)]
enum SwapFailure {
    #[error(transparent)]
    Start(crate::runtime::StartError),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

struct Pulling {
    desired: Desired,
    task: JoinHandle<Result<PulledBundle, PullError>>,
}

/// The device loop's state; see [`Device::run`].
/// How long after a failed state save (a full disk) the agent tries again.
const SAVE_RETRY: Duration = Duration::from_secs(5);

pub struct Device {
    pub(crate) state: AgentState,
    pub(crate) state_file: StateFile,
    /// Bundles and their runtime builds come through it; its content store is collected here.
    pub(crate) acquirer: Acquirer,
    pub(crate) bundles_dir: PathBuf,
    pub(crate) supervisor: Supervisor,
    pub(crate) converger: Converger,
    pub(crate) statuses: mpsc::Sender<proto::Status>,
    pub(crate) snapshot: watch::Sender<Snapshot>,
    pub(crate) desired: watch::Receiver<Option<proto::DesiredState>>,
    /// A failed activation to try again (the registry was unreachable, ...), unless a newer state comes.
    pub(crate) retry: Option<(Instant, Desired)>,
    pub(crate) retry_delay: Duration,
    /// A crashed llama-server to start again, and when.
    pub(crate) restart: Option<(Instant, LaunchSpec)>,
    pub(crate) restart_delay: Duration,
    pub(crate) policy: SwapPolicy,
    /// How long requests wait during a restart after a crash.
    pub(crate) gap_wait: Duration,
    pub(crate) watching: Option<Watch>,
    /// Recent crashes of the serving model (at most [`CRASH_LOOP_COUNT`]).
    pub(crate) crashes: VecDeque<Instant>,
    /// Reloaded configs, when the config file is watched.
    pub(crate) config: Option<watch::Receiver<crate::reload::ConfigState>>,
    /// Instance options that do not come from the config (log directory, stop sequence).
    pub(crate) instance_base: crate::runtime::InstanceOptions,
    /// Activation counters and the benchmark after every activation.
    pub(crate) hooks: DeviceHooks,
    /// When to try again to save a state whose last save failed (a full disk): the state in memory is
    /// newer than the file until a save succeeds, on this timer, at the next change, or at shutdown.
    pub(crate) save_retry: Option<Instant>,
    /// Operators' requests from the session (restart the runtime).
    pub(crate) requests: Option<mpsc::Receiver<DeviceRequest>>,
}

/// An operator's request the device loop carries out between its other work.
#[derive(Debug)]
pub enum DeviceRequest {
    /// Restart the serving model blue/green (the same deployment on a new llama-server); the answer is a
    /// sentence for the operator, or why it was not done.
    RestartRuntime(tokio::sync::oneshot::Sender<Result<String, String>>),
}

/// What the device loop reports to the metrics, the benchmark task and the evaluation task.
#[derive(Clone, Debug, Default)]
pub struct DeviceHooks {
    pub metrics: Arc<AgentMetrics>,
    /// Benchmarks after every activation; None turns them off.
    pub bench: Option<Jobs>,
    /// Evaluations after activations whose desired state names an eval suite.
    pub eval: Option<crate::eval::Jobs>,
    /// Evaluations of such activations in their stop-then-start gap, when they do not fit beside the candidate.
    pub gap: Option<crate::eval::GapEvaluator>,
}

impl DeviceHooks {
    /// An activation ended: count it.
    pub fn activation(&self, outcome: ActivationOutcome) {
        self.metrics.activation(outcome);
    }

    /// A new model is committed (its watch window passed, or there was none): benchmark it. Not during the
    /// watch window, where the benchmark's load could be taken for the new model's failure.
    pub fn benchmark(&self) {
        if let Some(jobs) = &self.bench {
            jobs.offer_activation();
        }
    }

    /// The active deployment is committed for `desired` (or `desired` asks for what is served already):
    /// evaluate it when `desired` names an eval suite. The evaluation task runs each variant × suite ×
    /// baseline once, so offering it again (a reconnect, a restart) is harmless.
    pub fn evaluate(&self, desired: &Desired, active: Option<&Deployment>) {
        let (Some(jobs), Some(active)) = (&self.eval, active) else { return };
        let Some(request) = evaluation_of(desired, &active.bundle, &active.variant_digest) else { return };
        jobs.submit(crate::eval::Job::Activation { rollout_id: desired.rollout_id.clone(), request });
    }

    /// Before a stop-then-start swap to `variant` of `bundle` (needing `serving` bytes once it serves) for
    /// `desired`: the evaluation to try in the gap, when `desired` names an eval suite and the budget allows.
    async fn gap_evaluation(
        &self,
        desired: &Desired,
        bundle: &BundleLocation,
        variant: &Digest,
        serving: u64,
        budget: Duration,
    ) -> Option<crate::eval::GapEvaluation> {
        let gap = self.gap.as_ref()?;
        let request = evaluation_of(desired, bundle, variant)?;
        gap.plan(&desired.rollout_id, request, serving, budget).await
    }
}

/// The evaluation `desired` asks for of `variant` of `bundle`, if it names a usable eval suite.
fn evaluation_of(desired: &Desired, bundle: &BundleLocation, variant: &Digest) -> Option<crate::eval::Request> {
    let wanted = match desired.eval.as_ref()? {
        Ok(wanted) => wanted,
        Err(reason) => {
            tracing::warn!(%reason, "The desired state names an eval suite that cannot be used; not evaluated.");
            return None;
        }
    };
    let baseline = wanted
        .baseline
        .clone()
        .map(|bundle| crate::eval::run::BaselineRef { bundle, variant: wanted.baseline_variant.clone() });
    Some(crate::eval::Request {
        candidate: bundle.clone(),
        variant: Some(variant.clone()),
        suite: wanted.suite.clone(),
        baseline,
    })
}

/// How an activation ended.
enum Outcome {
    Active,
    Failed { retryable: bool },
    Abandoned,
}

impl Device {
    /// Serves what was active before a restart, then converges to desired states until `shutdown`, then stops
    /// llama-server safely.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.restore(&mut shutdown).await;
        let mut pulling: Option<Pulling> = None;
        let mut desired_open = true;
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                changed = shutdown.changed() => if changed.is_err() { break },
                changed = self.desired.changed(), if desired_open => {
                    if changed.is_err() {
                        desired_open = false;
                        continue;
                    }
                    let newest = self.desired.borrow_and_update().clone();
                    if let Some(d) = newest {
                        self.offer(Desired::from_proto(&d), &mut pulling).await;
                    }
                }
                joined = join_pull(&mut pulling) => {
                    let Some(p) = pulling.take() else { continue };
                    self.pull_finished(p.desired, joined, &mut shutdown).await;
                    if let Some(next) = self.converger.finished() {
                        self.offer(next, &mut pulling).await;
                    }
                }
                status = self.supervisor.active_exited(), if self.restart.is_none() => self.exited(status).await,
                changed = config_changed(&mut self.config) => {
                    match changed {
                        Some(config) => self.apply_config(&config),
                        None => self.config = None,
                    }
                }
                _ = sleep_until(self.watching.as_ref().map(|w| w.next_probe.min(w.until))) => {
                    self.watch_step().await;
                }
                _ = sleep_until(self.retry.as_ref().map(|r| r.0)), if pulling.is_none() => {
                    let Some((_, desired)) = self.retry.take() else { continue };
                    match self.converger.retry(desired) {
                        Decision::Activate(desired) => self.start_activation(desired, &mut pulling).await,
                        _ => tracing::debug!("A retry was superseded."),
                    }
                }
                _ = sleep_until(self.restart.as_ref().map(|r| r.0)) => {
                    let Some((_, spec)) = self.restart.take() else { continue };
                    self.restart_after_crash(spec, &mut shutdown).await;
                }
                _ = sleep_until(self.save_retry) => self.save_state().await,
                Some(request) = next_request(&mut self.requests) => {
                    self.on_request(request, pulling.is_some(), &mut shutdown).await;
                }
            }
        }
        if let Some(p) = pulling.take() {
            p.task.abort();
        }
        if self.save_retry.is_some() {
            self.save_state().await;
        }
        tracing::info!("Stopping llama-server.");
        self.supervisor.shutdown().await;
    }

    /// A pull ended: finish the activation (verify, start, flip), count it, and schedule a retry when it
    /// failed for a reason that may pass.
    async fn pull_finished(
        &mut self,
        desired: Desired,
        joined: Result<Result<PulledBundle, PullError>, tokio::task::JoinError>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        if let Ok(Ok(pulled)) = &joined {
            self.hooks.metrics.pulled(pulled.bytes_fetched);
        }
        let outcome = match joined {
            Ok(result) => result.map_err(|e| e.activation_error()),
            Err(join) => Err(activation_error(ErrorCode::Io, format!("the pull task failed: {join}"), None)),
        };
        match self.finish_activation(&desired, outcome, shutdown).await {
            Outcome::Active => {
                self.hooks.activation(ActivationOutcome::Active);
                // Benchmarked and evaluated once proven: at once without a watch window, else when it passes.
                if self.watching.is_none() {
                    self.hooks.benchmark();
                    self.hooks.evaluate(&desired, self.state.active.as_ref());
                }
                self.restart = None;
                self.restart_delay = RESTART_MIN;
                self.retry = None;
                self.retry_delay = RETRY_MIN;
            }
            Outcome::Failed { retryable } => {
                self.hooks.activation(ActivationOutcome::Failed);
                if retryable {
                    tracing::info!(generation = %desired.generation, retry_in_s = self.retry_delay.as_secs(), "The activation will be tried again.");
                    self.retry = Some((Instant::now() + self.retry_delay, desired));
                    self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
                }
            }
            Outcome::Abandoned => {}
        }
    }

    /// The serving llama-server exited: within a watch window that is a rollback; otherwise it is restarted
    /// with a backoff growing with the crashes, and a crash loop falls back to the previous bundle (or, without
    /// one, is reported and nothing is served).
    async fn exited(&mut self, status: String) {
        if self.watching.is_some() {
            self.roll_back(format!("exited ({status})")).await;
            return;
        }
        let Some(spec) = self.supervisor.remove_exited() else { return };
        let now = Instant::now();
        self.crashes.retain(|at| now.duration_since(*at) < CRASH_LOOP_WINDOW);
        if self.crashes.len() >= CRASH_LOOP_COUNT {
            self.crashes.pop_front();
        }
        self.crashes.push_back(now);
        if self.crashes.len() >= CRASH_LOOP_COUNT {
            self.crashes.clear();
            self.crash_loop(&spec, &status).await;
            return;
        }
        // Backoff grows with the crashes in the window: 1 s, 2 s, 4 s, ... up to a minute.
        let exponent = u32::try_from(self.crashes.len().saturating_sub(1)).unwrap_or(u32::MAX).min(6);
        let delay = (RESTART_MIN * 2u32.pow(exponent)).max(self.restart_delay).min(RESTART_MAX);
        tracing::error!(%status, model = %spec.model_path.display(), retry_in_ms = delay.as_millis() as u64,
            "llama-server exited unexpectedly; requests wait for its restart (bounded).");
        self.supervisor.proxy().hold(self.gap_wait);
        self.restart = Some((Instant::now() + delay, spec));
        self.publish();
    }

    /// A crash loop: the previous bundle serves instead, or, without one, the bundle is marked bad.
    async fn crash_loop(&mut self, spec: &LaunchSpec, status: &str) {
        let cause = format!(
            "is in a crash loop: llama-server exited {CRASH_LOOP_COUNT} times within {} min (last: {status}); it is \
             not restarted again",
            CRASH_LOOP_WINDOW.as_secs() / 60
        );
        if self.fall_back_to_previous(&cause, ErrorCode::CrashLoop).await {
            self.restart = None;
            return;
        }
        // Marked bad: the generation stays applied, so only a new desired state (another bundle, or the same
        // one sent again as a new generation) starts a model again.
        tracing::error!(model = %spec.model_path.display(), "llama-server is in a crash loop; nothing is served until a new desired state arrives.");
        self.state.active = None;
        self.save_state().await;
        self.supervisor.proxy().release();
        self.publish();
    }

    /// Starts the crashed model again; a model that no longer loads falls back to the previous bundle (or
    /// stops serving), any other failure is retried with a growing delay.
    async fn restart_after_crash(&mut self, spec: LaunchSpec, shutdown: &mut watch::Receiver<bool>) {
        if self.state.serve_nothing {
            return;
        }
        let restarted = tokio::select! {
            result = self.supervisor.restart(spec.clone()) => result.map_err(SwapFailure::Start),
            _ = shutdown.wait_for(|stop| *stop) => Err(SwapFailure::ShuttingDown),
        };
        self.note_gap();
        match restarted {
            Ok(()) => {
                tracing::info!("llama-server restarted after a crash.");
                self.restart_delay = RESTART_MIN;
            }
            Err(SwapFailure::Start(e @ StartError::Exited { .. })) => {
                // Exit at load: the files or the device changed; retrying the same thing cannot help.
                let cause = format!("no longer loads: {e}");
                if !self.fall_back_to_previous(&cause, ErrorCode::StartFailed).await {
                    let cause = format!("{cause}; nothing is served until a new desired state arrives");
                    self.report_runtime_failure(&cause, ErrorCode::StartFailed).await;
                    self.state.active = None;
                    self.save_state().await;
                    self.converger.reopen();
                }
            }
            Err(e) => {
                self.restart_delay = (self.restart_delay * 2).min(RESTART_MAX);
                tracing::error!(error = %e, retry_in_ms = self.restart_delay.as_millis() as u64, "Restarting llama-server failed.");
                self.restart = Some((Instant::now() + self.restart_delay, spec));
            }
        }
        self.publish();
    }

    /// Starts the deployment that was active before the agent restarted, before any controller contact.
    /// The llama-server the previous agent left serving is adopted when it is still that process and healthy
    /// (no restart); any other it left running is stopped. The proxy held requests since the agent started.
    async fn restore(&mut self, shutdown: &mut watch::Receiver<bool>) {
        self.publish();
        self.restore_inner(shutdown).await;
        self.supervisor.proxy().release();
        self.publish();
    }

    async fn restore_inner(&mut self, shutdown: &mut watch::Receiver<bool>) {
        let active = self.state.active.clone();
        let spec = active.as_ref().and_then(Deployment::launch_spec);
        if self.supervisor.adopt(spec.as_ref()).await.is_some() {
            return;
        }
        let (Some(active), Some(spec)) = (active, spec) else { return };
        tracing::info!(bundle = %active.bundle, "Starting the bundle that was active before the restart.");
        match self.swap(spec, shutdown).await {
            Ok(()) => tracing::info!(bundle = %active.bundle, "Serving the bundle that was active before the restart."),
            Err(SwapFailure::Start(e)) => {
                let cause = format!("could not be started after the agent restarted: {e}");
                if !self.fall_back_to_previous(&cause, ErrorCode::StartFailed).await {
                    tracing::error!(bundle = %active.bundle, "Nothing is served until the controller's desired state is applied again.");
                    self.converger.reopen();
                }
            }
            Err(SwapFailure::ShuttingDown) => {}
        }
    }

    /// An operator's request. A restart waits for no activation: one in progress (or a swap still watched)
    /// refuses it, so the restart never races the convergence.
    async fn on_request(&mut self, request: DeviceRequest, pulling: bool, shutdown: &mut watch::Receiver<bool>) {
        let DeviceRequest::RestartRuntime(reply) = request;
        let answer = self.restart_runtime(pulling, shutdown).await;
        match &answer {
            Ok(done) => tracing::info!(%done, "Runtime restarted on the operator's request."),
            Err(why) => tracing::warn!(%why, "Runtime restart refused or failed."),
        }
        let _ = reply.send(answer);
    }

    async fn restart_runtime(&mut self, pulling: bool, shutdown: &mut watch::Receiver<bool>) -> Result<String, String> {
        if pulling || self.watching.is_some() {
            return Err("an activation is in progress on the device; restart the runtime once it has settled".into());
        }
        let active = self.state.active.clone().ok_or("the device serves no model: there is no runtime to restart")?;
        let spec = active.launch_spec().ok_or("the active deployment has no model files to start")?;
        match self.swap(spec, shutdown).await {
            Ok(()) => {
                // A fresh instance: earlier crashes no longer count towards a crash loop.
                self.crashes.clear();
                self.restart = None;
                self.publish();
                Ok(format!("restarted {} blue/green: a new llama-server serves, the old one drains", active.bundle))
            }
            Err(SwapFailure::Start(e)) => {
                Err(format!("the new llama-server did not start ({e}); the old one keeps serving"))
            }
            Err(SwapFailure::ShuttingDown) => Err("the agent is shutting down".into()),
        }
    }

    /// [`Supervisor::swap`], abandoned (the candidate killed) when the agent shuts down meanwhile.
    async fn swap(&mut self, spec: LaunchSpec, shutdown: &mut watch::Receiver<bool>) -> Result<(), SwapFailure> {
        tokio::select! {
            result = self.supervisor.swap(spec) => result.map_err(SwapFailure::Start),
            _ = shutdown.wait_for(|stop| *stop) => Err(SwapFailure::ShuttingDown),
        }
    }

    fn serving_key(&self) -> Option<ServingKey> {
        let spec = self.supervisor.serving()?;
        let active = self.state.active.as_ref()?;
        (spec.bundle_digest == active.bundle.digest.as_str())
            .then(|| ServingKey { bundle_digest: active.bundle.digest.clone(), overrides: active.overrides })
    }

    fn serving_ref(&self) -> Option<proto::BundleRef> {
        let spec = self.supervisor.serving()?;
        let active = self.state.active.as_ref()?;
        (spec.bundle_digest == active.bundle.digest.as_str()).then(|| active.bundle.to_proto())
    }

    fn publish(&self) {
        let running = self.serving_ref();
        let active = self.state.active.as_ref().filter(|_| running.is_some());
        self.snapshot.send_replace(Snapshot {
            running,
            last_applied: self.state.last_applied_generation,
            variant_digest: active.map(|a| a.variant_digest.to_string()).unwrap_or_default(),
            model_path: active.and_then(|a| a.model_path()).map(ToOwned::to_owned),
        });
    }

    fn status(&self, desired: &Desired, phase: Phase) -> proto::Status {
        proto::Status {
            generation: desired.generation.0,
            phase: phase as i32,
            bundle: desired.named.clone(),
            progress: None,
            error: None,
            serving: self.serving_ref(),
            variant_digest: String::new(),
            runtime_platform: String::new(),
        }
    }

    async fn report(&self, status: proto::Status) {
        let phase = Phase::try_from(status.phase).unwrap_or(Phase::Unspecified);
        tracing::info!(generation = status.generation, phase = phase.label(), "Activation phase.");
        if tokio::time::timeout(STATUS_SEND_TIMEOUT, self.statuses.send(status)).await.is_err() {
            tracing::warn!(phase = phase.label(), "A status could not be queued for the controller in time; dropped.");
        }
    }

    async fn save_state(&mut self) {
        match self.state_file.save_async(&self.state).await {
            Ok(()) => self.save_retry = None,
            Err(e) => {
                tracing::error!(error = %e, "Saving the agent state failed; trying again in a few seconds.");
                self.save_retry = Some(Instant::now() + SAVE_RETRY);
            }
        }
    }

    async fn offer(&mut self, desired: Desired, pulling: &mut Option<Pulling>) {
        let generation = desired.generation;
        match self.converger.offer(desired, self.serving_key().as_ref()) {
            Decision::Ignore(why) => tracing::debug!(%generation, ?why, "Desired state ignored."),
            Decision::Queued => tracing::info!(%generation, "Desired state queued behind the activation in progress."),
            Decision::AlreadyServing(desired) if desired.serve_nothing => self.serve_nothing(&desired).await,
            Decision::AlreadyServing(desired) => {
                if let Some(active) = self.state.active.as_mut() {
                    active.generation = desired.generation;
                }
                self.state.last_applied_generation = desired.generation;
                self.save_state().await;
                self.report(self.active_status(&desired)).await;
                self.publish();
                self.hooks.evaluate(&desired, self.state.active.as_ref());
            }
            Decision::Activate(desired) => self.start_activation(desired, pulling).await,
        }
    }

    /// Serves nothing (`DesiredState.serve_nothing`): llama-server is drained and stopped with the safe
    /// sequence, the front port answers 503 "no model is assigned to this device" with Retry-After, and the
    /// state file remembers it (a restart starts nothing). What served becomes the previous deployment.
    async fn serve_nothing(&mut self, desired: &Desired) {
        tracing::info!(generation = %desired.generation, "Serving nothing, as the controller asks.");
        self.watching = None;
        self.retry = None;
        self.crashes.clear();
        self.supervisor.proxy().set_unassigned(true);
        self.supervisor.stop_serving().await;
        if let Some(active) = self.state.active.take() {
            self.state.previous = Some(active);
        }
        self.state.serve_nothing = true;
        self.state.last_applied_generation = self.state.last_applied_generation.max(desired.generation);
        self.save_state().await;
        self.report(self.status(desired, Phase::Active)).await;
        self.publish();
    }

    /// Reports PULLING and starts the pull (or fails at once when the reference is unusable).
    async fn start_activation(&mut self, desired: Desired, pulling: &mut Option<Pulling>) {
        if self.retry.as_ref().is_some_and(|(_, r)| r.generation != desired.generation) {
            self.retry = None;
            self.retry_delay = RETRY_MIN;
        }
        if desired.serve_nothing {
            self.serve_nothing(&desired).await;
            if let Some(next) = self.converger.finished() {
                Box::pin(self.offer(next, pulling)).await;
            }
            return;
        }
        let mut status = self.status(&desired, Phase::Pulling);
        status.progress = Some(proto::Progress::default());
        self.report(status).await;
        match &desired.target {
            Err(reason) => {
                let error = activation_error(
                    ErrorCode::BundleInvalid,
                    format!("{reason}; the controller sent an unusable bundle reference"),
                    None,
                );
                self.fail(&desired, error).await;
                if let Some(next) = self.converger.finished() {
                    Box::pin(self.offer(next, pulling)).await;
                }
            }
            Ok(bundle) => {
                let task = self.spawn_pull(&desired, bundle.clone()).await;
                *pulling = Some(Pulling { desired, task });
            }
        }
    }

    /// Acquires `bundle` on a task of its own, reporting progress as PULLING statuses.
    async fn spawn_pull(
        &self,
        desired: &Desired,
        bundle: BundleLocation,
    ) -> JoinHandle<Result<PulledBundle, PullError>> {
        let acquirer = self.acquirer.clone();
        let bundles_dir = self.bundles_dir.clone();
        let statuses = self.statuses.clone();
        let template = self.status(desired, Phase::Pulling);
        let Kept { blobs, variants } = self.kept().await;
        let options = PullOptions {
            disk_reserve: self.policy.disk_reserve,
            keep: blobs,
            keep_variants: variants,
            bandwidth: self.policy.bandwidth,
            preferred_variant: desired.preferred_variant.clone(),
            ..PullOptions::default()
        };
        tokio::spawn(
            async move {
                let mut progress = move |p: PullProgress| {
                    let mut status = template.clone();
                    status.progress = Some(proto::Progress { bytes_done: p.bytes_done, bytes_total: p.bytes_total });
                    // Progress is advisory: when the queue is full it is skipped, never waited for.
                    let _ = statuses.try_send(status);
                };
                let want = Want { bundle: &bundle, into: &bundles_dir, memory: None, trust: None, options };
                acquirer.acquire(want, &mut progress).await
            }
            .in_current_span(),
        )
    }

    /// Verifies, starts and flips to a pulled bundle; reports the outcome.
    async fn finish_activation(
        &mut self,
        desired: &Desired,
        pulled: Result<PulledBundle, proto::ActivationError>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let pulled = match pulled {
            Ok(p) => p,
            Err(error) => {
                let retryable = matches!(ErrorCode::try_from(error.code), Ok(ErrorCode::PullFailed | ErrorCode::Io));
                self.fail(desired, error).await;
                return Outcome::Failed { retryable };
            }
        };
        let Ok(bundle) = desired.target.clone() else { return Outcome::Failed { retryable: false } };
        let spec = match self.verify(desired, &bundle, &pulled).await {
            Ok(spec) => spec,
            Err(outcome) => return outcome,
        };
        let launch = spec.settings.clone();
        self.report(self.variant_status(desired, Phase::Starting, &pulled)).await;
        let needs = pulled.memory_needs().await;
        let strategy = self.choose_strategy(needs).await;
        let mut gap = self.plan_gap(desired, &bundle, &pulled.variant_digest, needs, strategy, shutdown).await;
        // A model still under watch is taken as good once a newer activation starts.
        self.watching = None;
        let restore = (self.state.active.clone(), self.state.previous.clone());
        let swapped = tokio::select! {
            result = self.supervisor.swap_watched_with(spec, strategy, &mut gap) => result.map_err(SwapFailure::Start),
            _ = shutdown.wait_for(|stop| *stop) => Err(SwapFailure::ShuttingDown),
        };
        self.note_gap();
        match swapped {
            Ok(()) => {
                if let Some(gap) = gap {
                    gap.conclude(true).await;
                }
            }
            Err(SwapFailure::ShuttingDown) => {
                // Not applied: after the restart the controller's desired state is converged to again.
                tracing::info!(generation = %desired.generation, "Activation abandoned for shutdown.");
                return Outcome::Abandoned;
            }
            Err(SwapFailure::Start(e)) => {
                if let Some(gap) = gap {
                    gap.conclude(false).await;
                }
                let message = format!("bundle {bundle}: {e}");
                self.fail(desired, activation_error(ErrorCode::StartFailed, message, None)).await;
                return Outcome::Failed { retryable: false };
            }
        }
        let deployment = Deployment {
            bundle,
            variant_digest: pulled.variant_digest,
            model_files: pulled.model_files,
            overrides: desired.overrides,
            launch,
            generation: desired.generation,
        };
        self.activated(desired, deployment, restore).await;
        self.report(self.active_status(desired)).await;
        self.publish();
        Outcome::Active
    }

    /// Reports VERIFYING and checks what llama-server will open: the signature was verified against the
    /// trust policy before any layer was fetched, and layer digests while streaming into the content store,
    /// so what is left is that the files are there. The launch spec, or the outcome of a failure (reported).
    async fn verify(
        &mut self,
        desired: &Desired,
        bundle: &BundleLocation,
        pulled: &PulledBundle,
    ) -> Result<LaunchSpec, Outcome> {
        self.report(self.variant_status(desired, Phase::Verifying, pulled)).await;
        for file in &pulled.model_files {
            if let Err(e) = tokio::fs::metadata(file).await {
                let message = format!("bundle {bundle}: model file {} is missing after the pull ({e})", file.display());
                self.fail(desired, activation_error(ErrorCode::Io, message, None)).await;
                return Err(Outcome::Failed { retryable: true });
            }
        }
        match pulled.launch_spec(&bundle.digest, &desired.overrides) {
            Some(spec) => Ok(spec),
            None => {
                let message = format!("bundle {bundle}: the variant has no GGUF file");
                self.fail(desired, activation_error(ErrorCode::BundleInvalid, message, None)).await;
                Err(Outcome::Failed { retryable: false })
            }
        }
    }

    /// The swap to `deployment` happened: it is the active deployment now (what served before becomes the
    /// previous one), saved; committed at once, or watched for the watch window with `restore` (active,
    /// previous) to put back on a failure.
    async fn activated(
        &mut self,
        desired: &Desired,
        deployment: Deployment,
        restore: (Option<Deployment>, Option<Deployment>),
    ) {
        let new_digest = deployment.bundle.digest.clone();
        self.state.serve_nothing = false;
        self.supervisor.proxy().set_unassigned(false);
        if let Some(previous) = self.state.active.replace(deployment) {
            // A restart of the same bundle with other settings keeps the older rollback target.
            if previous.bundle.digest != new_digest {
                self.state.previous = Some(previous);
            }
        }
        self.state.last_applied_generation = self.state.last_applied_generation.max(desired.generation);
        self.save_state().await;
        self.crashes.clear();
        if self.policy.watch_window.is_zero() || !self.supervisor.can_roll_back() {
            self.supervisor.commit();
            self.collect_garbage().await;
            return;
        }
        // Garbage is collected when the watch window passes: a rollback may still need what is there.
        let now = Instant::now();
        tracing::info!(generation = %desired.generation, window_s = self.policy.watch_window.as_secs(), "Watching the new model; a failure within the window swaps back.");
        let (restore_active, restore_previous) = restore;
        self.watching = Some(Watch {
            until: now + self.policy.watch_window,
            next_probe: now + WATCH_PROBE_INTERVAL,
            failures: 0,
            desired: desired.clone(),
            restore_active,
            restore_previous,
        });
    }

    /// ACTIVE for `desired`, naming the variant and the runtime build entry the active deployment runs on.
    fn active_status(&self, desired: &Desired) -> proto::Status {
        let mut status = self.status(desired, Phase::Active);
        if let Some(active) = &self.state.active {
            status.variant_digest = active.variant_digest.to_string();
            status.runtime_platform = active.launch.runtime_platform.clone().unwrap_or_default();
        }
        status
    }

    /// A status of `desired` in `phase`, naming the variant pulled.
    fn variant_status(&self, desired: &Desired, phase: Phase, pulled: &PulledBundle) -> proto::Status {
        let mut status = self.status(desired, phase);
        status.variant_digest = pulled.variant_digest.to_string();
        status.runtime_platform = pulled.runtime_platform.clone().unwrap_or_default();
        status
    }

    /// Applies a reloaded config: swap policy, store limits, bandwidth, registries, and how llama-server is
    /// started from now on (the serving instance is not restarted for it).
    fn apply_config(&mut self, config: &crate::Config) {
        self.policy = SwapPolicy::from_config(config);
        self.gap_wait = config.gap_wait();
        let device_token = self.acquirer.registry.device_token.clone();
        self.acquirer.registry = RegistrySettings::from_config(config, device_token);
        let opts = crate::runtime::InstanceOptions {
            llama_server: config.runtime.llama_server.clone(),
            extra_args: config.runtime.extra_args.clone(),
            launcher: config.runtime.launcher.clone(),
            health_timeout: config.health_timeout(),
            ..self.instance_base.clone()
        };
        self.supervisor.set_options(opts, config.drain_timeout());
        self.supervisor.set_gap_wait(config.gap_wait());
        tracing::info!(policy = ?self.policy, "Applied the reloaded config.");
    }

    /// Blobs and variant directories of the active and previous deployments: never evicted.
    async fn kept(&self) -> Kept {
        kept(&self.acquirer.store, deployments_of(&self.state)).await
    }

    /// Removes variant directories no deployment uses and, under a budget, the least recently used blobs of
    /// bundles other than the active and previous ones.
    async fn collect_garbage(&self) {
        let Kept { blobs: keep, variants } = self.kept().await;
        prune_variant_dirs(&self.bundles_dir, &variants).await;
        crate::pull::extract::prune(&self.acquirer.builds_dir, &keep).await;
        let Some(budget) = self.policy.store_budget else { return };
        match self.acquirer.store.evict(&keep, budget).await {
            Ok((removed, freed)) if !removed.is_empty() => {
                tracing::info!(blobs = removed.len(), freed, budget, "Evicted least recently used blobs.")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Evicting blobs over the store budget failed."),
        }
    }

    /// Before a swap: the evaluation to run in its gap, when it goes stop-then-start and `desired` names a
    /// suite. Planning fetches the suite, so a shutdown meanwhile skips it (and then abandons the swap).
    async fn plan_gap(
        &self,
        desired: &Desired,
        bundle: &BundleLocation,
        variant: &Digest,
        needs: u64,
        strategy: SwapStrategy,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<crate::eval::GapEvaluation> {
        if strategy != SwapStrategy::StopThenStart {
            return None;
        }
        let budget = self.policy.eval_gap_budget;
        tokio::select! {
            planned = self.hooks.gap_evaluation(desired, bundle, variant, needs, budget) => planned,
            _ = shutdown.wait_for(|stop| *stop) => None,
        }
    }

    /// A stop-then-start gap just ended: how long it held requests, for the metrics.
    fn note_gap(&mut self) {
        if let Some(gap) = self.supervisor.take_gap() {
            self.hooks.metrics.swap_gap(gap);
        }
    }

    /// Blue/green when the memory available now (the serving model already loaded) holds the new model and
    /// the reserve; stop-then-start otherwise, or when nothing serves there is no difference.
    async fn choose_strategy(&self, needs: u64) -> SwapStrategy {
        match self.policy.strategy {
            SwapStrategyChoice::BlueGreen => SwapStrategy::BlueGreen,
            SwapStrategyChoice::StopThenStart => SwapStrategy::StopThenStart,
            SwapStrategyChoice::Auto => {
                if self.supervisor.serving().is_none() {
                    return SwapStrategy::BlueGreen;
                }
                let available =
                    tokio::task::spawn_blocking(crate::inventory::memory_available).await.unwrap_or_default();
                let strategy = if available >= needs.saturating_add(self.policy.memory_reserve) {
                    SwapStrategy::BlueGreen
                } else {
                    SwapStrategy::StopThenStart
                };
                tracing::info!(available, needs, reserve = self.policy.memory_reserve, ?strategy, "Chose how to swap.");
                strategy
            }
        }
    }

    /// One step of the watch window: commit when it has passed, otherwise a liveness check.
    async fn watch_step(&mut self) {
        let Some(watch) = self.watching.as_mut() else { return };
        let now = Instant::now();
        if now >= watch.until {
            tracing::info!(generation = %watch.desired.generation, "The new model passed its watch window; the previous one is released.");
            let desired = watch.desired.clone();
            self.watching = None;
            self.supervisor.commit();
            self.hooks.benchmark();
            self.hooks.evaluate(&desired, self.state.active.as_ref());
            self.collect_garbage().await;
            return;
        }
        watch.next_probe = now + WATCH_PROBE_INTERVAL;
        match self.supervisor.check_active().await {
            Ok(()) => {
                if let Some(w) = self.watching.as_mut() {
                    w.failures = 0;
                }
            }
            Err(reason) => {
                let failures = self.watching.as_mut().map(|w| {
                    w.failures += 1;
                    w.failures
                });
                tracing::warn!(%reason, ?failures, "The new model failed a liveness check.");
                if failures.is_some_and(|f| f >= WATCH_PROBE_FAILURES) {
                    self.roll_back(format!("failed {WATCH_PROBE_FAILURES} liveness checks in a row ({reason})")).await;
                }
            }
        }
    }

    /// Swaps back to what served before the watched activation and reports it as failed with `cause`.
    async fn roll_back(&mut self, cause: String) {
        let Some(watch) = self.watching.take() else { return };
        let failed = self.state.active.as_ref().map(|a| a.bundle.to_string()).unwrap_or_default();
        let window = self.policy.watch_window.as_secs();
        tracing::error!(generation = %watch.desired.generation, %cause, "The new model failed within its watch window; swapping back.");
        self.hooks.metrics.activation(ActivationOutcome::RolledBack);
        let rolled_back = self.supervisor.roll_back().await;
        self.note_gap();
        let message = match rolled_back {
            Ok(()) => {
                let back = watch.restore_active.as_ref().map(|a| a.bundle.to_string()).unwrap_or_default();
                self.state.active = watch.restore_active;
                self.state.previous = watch.restore_previous;
                format!(
                    "bundle {failed}: rolled back to {back}: the new model {cause} within the {window} s watch window; \
                     look at its llama-server log and fix or replace the bundle"
                )
            }
            Err(e) => {
                self.state.active = None;
                self.converger.reopen();
                format!(
                    "bundle {failed}: the new model {cause} within the {window} s watch window and swapping back \
                     failed ({e}); nothing is served until a new desired state arrives"
                )
            }
        };
        self.save_state().await;
        let mut status = self.status(&watch.desired, Phase::Failed);
        status.error = Some(activation_error(ErrorCode::StartFailed, message, None));
        self.report(status).await;
        self.publish();
    }

    /// Outside a swap, the serving bundle failed for good (`cause`): start the previous bundle instead and
    /// report the failure. False when there is no previous bundle or it does not start either.
    async fn fall_back_to_previous(&mut self, cause: &str, code: ErrorCode) -> bool {
        let Some(previous) = self.state.previous.clone() else {
            self.report_runtime_failure(&format!("{cause}; there is no previous bundle to fall back to"), code).await;
            return false;
        };
        let Some(spec) = previous.launch_spec() else { return false };
        tracing::error!(%cause, previous = %previous.bundle, "The serving model failed; falling back to the previous bundle.");
        let restarted = self.supervisor.restart(spec).await;
        self.note_gap();
        match restarted {
            Ok(()) => {
                let failed = self.state.active.replace(previous.clone());
                self.state.previous = None;
                self.save_state().await;
                let message = format!(
                    "bundle {}: {cause}; rolled back to {}; look at its llama-server log and fix or replace the bundle",
                    failed.as_ref().map(|f| f.bundle.to_string()).unwrap_or_default(),
                    previous.bundle
                );
                if let Some(failed) = failed {
                    self.report_failure_of(&failed, message, code).await;
                }
                self.publish();
                true
            }
            Err(e) => {
                self.report_runtime_failure(
                    &format!("{cause}; the previous bundle {} did not start either ({e})", previous.bundle),
                    code,
                )
                .await;
                false
            }
        }
    }

    /// Reports a failure of the serving bundle outside any activation.
    async fn report_runtime_failure(&mut self, cause: &str, code: ErrorCode) {
        let Some(active) = self.state.active.clone() else { return };
        let message = format!("bundle {}: {cause}", active.bundle);
        self.report_failure_of(&active, message, code).await;
    }

    async fn report_failure_of(&self, deployment: &Deployment, message: String, code: ErrorCode) {
        tracing::error!(generation = %deployment.generation, %message, "The serving bundle failed.");
        let status = proto::Status {
            generation: deployment.generation.0,
            phase: Phase::Failed as i32,
            bundle: Some(deployment.bundle.to_proto()),
            progress: None,
            error: Some(activation_error(code, message, None)),
            serving: self.serving_ref(),
            variant_digest: deployment.variant_digest.to_string(),
            runtime_platform: deployment.launch.runtime_platform.clone().unwrap_or_default(),
        };
        self.report(status).await;
    }

    async fn fail(&mut self, desired: &Desired, error: proto::ActivationError) {
        tracing::error!(generation = %desired.generation, code = ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified).label(), message = %error.message, "Activation failed; the previous model keeps serving.");
        self.state.last_applied_generation = self.state.last_applied_generation.max(desired.generation);
        self.save_state().await;
        let mut status = self.status(desired, Phase::Failed);
        status.error = Some(error);
        self.report(status).await;
        self.publish();
    }
}

fn activation_error(code: ErrorCode, message: String, layer: Option<String>) -> proto::ActivationError {
    proto::ActivationError { code: code as i32, message, layer_digest: layer.unwrap_or_default() }
}

/// The next reloaded config; None when the watcher is gone; pending forever without one.
async fn config_changed(
    config: &mut Option<watch::Receiver<crate::reload::ConfigState>>,
) -> Option<std::sync::Arc<crate::Config>> {
    match config {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().config.clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

async fn join_pull(pulling: &mut Option<Pulling>) -> Result<Result<PulledBundle, PullError>, tokio::task::JoinError> {
    match pulling {
        Some(p) => (&mut p.task).await,
        None => std::future::pending().await,
    }
}

/// The next operator request; never when there is no channel (or it closed).
async fn next_request(requests: &mut Option<mpsc::Receiver<DeviceRequest>>) -> Option<DeviceRequest> {
    match requests {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
