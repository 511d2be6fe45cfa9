//! The device loop: carries out the convergence decisions (pull, verify, start, flip), keeps the state file,
//! reports every phase, and restarts a crashed llama-server with backoff.

use std::path::PathBuf;
use std::time::Duration;

use alki_shared::proto::{self, ErrorCode, Phase};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::converge::{Converger, Decision, Desired, ServingKey};
use crate::pull::{PullError, PullProgress, PulledBundle, RegistryAccess, pull_bundle};
use crate::reference::BundleLocation;
use crate::runtime::{LaunchSpec, Supervisor};
use crate::session::Snapshot;
use crate::settings::LaunchSettings;
use crate::state::{AgentState, Deployment, StateFile};
use crate::store::ContentStore;

const STATUS_SEND_TIMEOUT: Duration = Duration::from_secs(5);
const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// Retries of activations that failed for a reason that may pass (registry unreachable, local I/O).
pub(crate) const RETRY_MIN: Duration = Duration::from_secs(15);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Where a pull gets its registry settings; the token is read again for every pull.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    pub plain_http: Vec<String>,
    pub embedded: String,
    pub token_file: PathBuf,
}

impl RegistrySettings {
    async fn access(&self) -> RegistryAccess {
        let token = match tokio::fs::read_to_string(&self.token_file).await {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            Ok(_) | Err(_) => {
                tracing::warn!(file = %self.token_file.display(), "No agent token; pulling anonymously.");
                None
            }
        };
        RegistryAccess::new(self.plain_http.clone(), self.embedded.clone(), token)
    }
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
pub struct Device {
    pub(crate) state: AgentState,
    pub(crate) state_file: StateFile,
    pub(crate) store: ContentStore,
    pub(crate) bundles_dir: PathBuf,
    pub(crate) registry: RegistrySettings,
    pub(crate) supervisor: Supervisor,
    pub(crate) converger: Converger,
    pub(crate) statuses: mpsc::Sender<proto::Status>,
    pub(crate) snapshot: watch::Sender<Snapshot>,
    pub(crate) desired: watch::Receiver<Option<proto::DesiredState>>,
    /// A failed activation to try again (the registry was unreachable, ...), unless a newer state comes.
    pub(crate) retry: Option<(Instant, Desired)>,
    pub(crate) retry_delay: Duration,
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
        let mut restart: Option<(Instant, LaunchSpec)> = None;
        let mut restart_delay = RESTART_MIN;
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
                    let outcome = match joined {
                        Ok(result) => result.map_err(activation_error_from_pull),
                        Err(join) => Err(activation_error(ErrorCode::Io, format!("the pull task failed: {join}"), None)),
                    };
                    match self.finish_activation(&p.desired, outcome, &mut shutdown).await {
                        Outcome::Active => {
                            restart = None;
                            restart_delay = RESTART_MIN;
                            self.retry = None;
                            self.retry_delay = RETRY_MIN;
                        }
                        Outcome::Failed { retryable: true } => {
                            tracing::info!(generation = %p.desired.generation, retry_in_s = self.retry_delay.as_secs(), "The activation will be tried again.");
                            self.retry = Some((Instant::now() + self.retry_delay, p.desired.clone()));
                            self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
                        }
                        Outcome::Failed { retryable: false } | Outcome::Abandoned => {}
                    }
                    if let Some(next) = self.converger.finished() {
                        self.offer(next, &mut pulling).await;
                    }
                }
                status = self.supervisor.active_exited(), if restart.is_none() => {
                    if let Some(spec) = self.supervisor.remove_exited() {
                        tracing::error!(%status, model = %spec.model_path.display(), retry_in_ms = restart_delay.as_millis() as u64,
                            "llama-server exited unexpectedly; clients get 503 until it is restarted.");
                        restart = Some((Instant::now() + restart_delay, spec));
                        self.publish();
                    }
                }
                _ = sleep_until(self.retry.as_ref().map(|r| r.0)), if pulling.is_none() => {
                    let Some((_, desired)) = self.retry.take() else { continue };
                    match self.converger.retry(desired) {
                        Decision::Activate(desired) => self.start_activation(desired, &mut pulling).await,
                        _ => tracing::debug!("A retry was superseded."),
                    }
                }
                _ = sleep_until(restart.as_ref().map(|r| r.0)) => {
                    let Some((_, spec)) = restart.take() else { continue };
                    match self.swap(spec.clone(), &mut shutdown).await {
                        Ok(()) => {
                            tracing::info!("llama-server restarted after a crash.");
                            restart_delay = RESTART_MIN;
                        }
                        Err(e) => {
                            restart_delay = (restart_delay * 2).min(RESTART_MAX);
                            tracing::error!(error = %e, retry_in_ms = restart_delay.as_millis() as u64, "Restarting llama-server failed.");
                            restart = Some((Instant::now() + restart_delay, spec));
                        }
                    }
                    self.publish();
                }
            }
        }
        if let Some(p) = pulling.take() {
            p.task.abort();
        }
        tracing::info!("Stopping llama-server.");
        self.supervisor.shutdown().await;
    }

    /// Starts the deployment that was active before the agent restarted, before any controller contact.
    async fn restore(&mut self, shutdown: &mut watch::Receiver<bool>) {
        self.publish();
        let Some(active) = self.state.active.clone() else { return };
        let Some(model) = active.model_path() else { return };
        let spec = LaunchSpec {
            model_path: model.to_owned(),
            settings: active.launch.clone(),
            bundle_digest: active.bundle.digest.to_string(),
        };
        tracing::info!(bundle = %active.bundle, "Starting the bundle that was active before the restart.");
        match self.swap(spec, shutdown).await {
            Ok(()) => tracing::info!(bundle = %active.bundle, "Serving the bundle that was active before the restart."),
            Err(e) => {
                tracing::error!(bundle = %active.bundle, error = %e, "The bundle active before the restart could not be started; nothing is served until the controller's desired state is applied again.");
                self.converger.reopen();
            }
        }
        self.publish();
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
        self.snapshot
            .send_replace(Snapshot { running: self.serving_ref(), last_applied: self.state.last_applied_generation });
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
        }
    }

    async fn report(&self, status: proto::Status) {
        let phase = Phase::try_from(status.phase).unwrap_or(Phase::Unspecified);
        tracing::info!(generation = status.generation, phase = phase.label(), "Activation phase.");
        if tokio::time::timeout(STATUS_SEND_TIMEOUT, self.statuses.send(status)).await.is_err() {
            tracing::warn!(phase = phase.label(), "A status could not be queued for the controller in time; dropped.");
        }
    }

    async fn save_state(&self) {
        if let Err(e) = self.state_file.save_async(&self.state).await {
            tracing::error!(error = %e, "Saving the agent state failed.");
        }
    }

    async fn offer(&mut self, desired: Desired, pulling: &mut Option<Pulling>) {
        let generation = desired.generation;
        match self.converger.offer(desired, self.serving_key().as_ref()) {
            Decision::Ignore(why) => tracing::debug!(%generation, ?why, "Desired state ignored."),
            Decision::Queued => tracing::info!(%generation, "Desired state queued behind the activation in progress."),
            Decision::AlreadyServing(desired) => {
                if let Some(active) = self.state.active.as_mut() {
                    active.generation = desired.generation;
                }
                self.state.last_applied_generation = desired.generation;
                self.save_state().await;
                let mut status = self.status(&desired, Phase::Active);
                status.variant_digest =
                    self.state.active.as_ref().map(|a| a.variant_digest.to_string()).unwrap_or_default();
                self.report(status).await;
                self.publish();
            }
            Decision::Activate(desired) => self.start_activation(desired, pulling).await,
        }
    }

    /// Reports PULLING and starts the pull (or fails at once when the reference is unusable).
    async fn start_activation(&mut self, desired: Desired, pulling: &mut Option<Pulling>) {
        if self.retry.as_ref().is_some_and(|(_, r)| r.generation != desired.generation) {
            self.retry = None;
            self.retry_delay = RETRY_MIN;
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

    async fn spawn_pull(
        &self,
        desired: &Desired,
        bundle: BundleLocation,
    ) -> JoinHandle<Result<PulledBundle, PullError>> {
        let access = self.registry.access().await;
        let store = self.store.clone();
        let bundles_dir = self.bundles_dir.clone();
        let statuses = self.statuses.clone();
        let template = self.status(desired, Phase::Pulling);
        tokio::spawn(
            async move {
                let memory = tokio::task::spawn_blocking(crate::inventory::memory_available).await.unwrap_or_default();
                let mut progress = move |p: PullProgress| {
                    let mut status = template.clone();
                    status.progress = Some(proto::Progress { bytes_done: p.bytes_done, bytes_total: p.bytes_total });
                    // Progress is advisory: when the queue is full it is skipped, never waited for.
                    let _ = statuses.try_send(status);
                };
                pull_bundle(&access, &store, &bundles_dir, &bundle, memory, &mut progress).await
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
        let mut status = self.status(desired, Phase::Verifying);
        status.variant_digest = pulled.variant_digest.to_string();
        self.report(status).await;
        // Layer digests were checked while streaming into the content store; check the files llama-server
        // will open are there. (Signature verification against the trust policy comes here later.)
        for file in &pulled.model_files {
            if let Err(e) = tokio::fs::metadata(file).await {
                let message = format!("bundle {bundle}: model file {} is missing after the pull ({e})", file.display());
                self.fail(desired, activation_error(ErrorCode::Io, message, None)).await;
                return Outcome::Failed { retryable: true };
            }
        }
        let Some(model_path) = pulled.model_files.first().cloned() else {
            let message = format!("bundle {bundle}: the variant has no GGUF file");
            self.fail(desired, activation_error(ErrorCode::BundleInvalid, message, None)).await;
            return Outcome::Failed { retryable: false };
        };
        let defaults = pulled.runtime_defaults.clone().unwrap_or_default();
        let launch = LaunchSettings::resolve(&defaults, &desired.overrides);
        let spec = LaunchSpec { model_path, settings: launch.clone(), bundle_digest: bundle.digest.to_string() };
        let mut status = self.status(desired, Phase::Starting);
        status.variant_digest = pulled.variant_digest.to_string();
        self.report(status).await;
        match self.swap(spec, shutdown).await {
            Ok(()) => {}
            Err(SwapFailure::ShuttingDown) => {
                // Not applied: after the restart the controller's desired state is converged to again.
                tracing::info!(generation = %desired.generation, "Activation abandoned for shutdown.");
                return Outcome::Abandoned;
            }
            Err(SwapFailure::Start(e)) => {
                let message = format!("bundle {bundle}: {e}");
                self.fail(desired, activation_error(ErrorCode::StartFailed, message, None)).await;
                return Outcome::Failed { retryable: false };
            }
        }
        let deployment = Deployment {
            bundle,
            variant_digest: pulled.variant_digest.clone(),
            model_files: pulled.model_files,
            overrides: desired.overrides,
            launch,
            generation: desired.generation,
        };
        let new_digest = deployment.bundle.digest.clone();
        if let Some(previous) = self.state.active.replace(deployment) {
            // A restart of the same bundle with other settings keeps the older rollback target.
            if previous.bundle.digest != new_digest {
                self.state.previous = Some(previous);
            }
        }
        self.state.last_applied_generation = self.state.last_applied_generation.max(desired.generation);
        self.save_state().await;
        let mut status = self.status(desired, Phase::Active);
        status.variant_digest = pulled.variant_digest.to_string();
        self.report(status).await;
        self.publish();
        Outcome::Active
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

fn activation_error_from_pull(e: PullError) -> proto::ActivationError {
    activation_error(e.code(), e.to_string(), e.layer_digest().map(ToString::to_string))
}

async fn join_pull(pulling: &mut Option<Pulling>) -> Result<Result<PulledBundle, PullError>, tokio::task::JoinError> {
    match pulling {
        Some(p) => (&mut p.task).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
