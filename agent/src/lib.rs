//! Alki Fleet's device agent: one session to the controller, bundles pulled and verified into a local
//! content store, llama-server hot-swapped behind a stable front port.
//!
//! [`run`] is the whole agent; [`Agent::start`] then [`Agent::run`] does the same in two steps, so a test
//! can learn the front address (configured as port 0) before the agent runs.

pub mod bench;
pub mod config;
pub mod converge;
mod device;
pub mod diagnostics;
pub mod enroll;
pub mod eval;
pub mod identity;
pub mod inventory;
pub mod logfile;
pub mod metrics;
pub mod outbox;
pub mod pull;
pub mod reference;
pub mod reload;
pub mod runtime;
pub mod scrub;
pub mod session;
pub mod settings;
pub mod stage;
pub mod state;
pub mod stats;
pub mod store;
pub mod systemd;
pub mod trust;

/// Runtime builds, by the path they had before the pull module held them (`alki_agent::builds::DIR_NAME`).
pub use pull::build as builds;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alki_shared::ids::DeviceId;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use config::Config;
use converge::Converger;
use device::{Device, DeviceHooks};
use identity::DeviceRegistryToken;
use metrics::AgentMetrics;
use pull::{Acquirer, RegistrySettings};
use reload::ConfigState;
use runtime::admission::AdmissionSettings;
use runtime::front::{FrontLimits, FrontStop};
use runtime::{InstanceOptions, Proxy, StopPolicy, Supervisor, http_client};
use session::{SessionContext, SessionTelemetry};
use state::{AgentState, Snapshot, StateError, StateFile};
use store::{ContentStore, StoreError};

/// Statuses queued from the device loop to the session.
const STATUS_CAPACITY: usize = 64;
/// Operators' requests (restart the runtime) queued for the device loop; more are refused as busy.
const DEVICE_REQUESTS: usize = 2;
/// Bound on the front server's and the session's own shutdown, after llama-server has stopped.
const TASK_SHUTDOWN: Duration = Duration::from_secs(5);

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot create the data directory {path}: {source}; check data_dir and its permissions")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot open the content store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on the front address {addr}: {source}; change runtime.front_addr or stop what uses it")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen on the metrics address {addr}: {source}; change metrics_addr or stop what uses it")]
    BindMetrics { addr: SocketAddr, source: std::io::Error },
}

/// Paths inside the data directory.
#[derive(Clone, Debug)]
pub struct Layout {
    pub data_dir: PathBuf,
}

impl Layout {
    pub fn content(&self) -> PathBuf {
        self.data_dir.join("content")
    }
    pub fn bundles(&self) -> PathBuf {
        self.data_dir.join("bundles")
    }
    /// Extracted runtime builds, one directory per tar layer digest.
    pub fn runtime_builds(&self) -> PathBuf {
        self.data_dir.join(pull::build::DIR_NAME)
    }
    pub fn logs(&self) -> PathBuf {
        self.data_dir.join("logs")
    }
    /// Where evaluations materialise the variants they run (hard links into the content store).
    pub fn evaluation(&self) -> PathBuf {
        self.data_dir.join("evaluation")
    }

    /// Where evaluations in a swap's gap materialise theirs (apart: each cleans its own directory up).
    pub fn evaluation_gap(&self) -> PathBuf {
        self.data_dir.join("evaluation-gap")
    }
}

/// An agent with its identity, state, content store and front listener ready; [`Agent::run`] runs it.
pub struct Agent {
    config: Config,
    notifier: systemd::Notifier,
    /// The config file, watched for changes when set.
    config_file: Option<PathBuf>,
    device_id: DeviceId,
    state: AgentState,
    state_file: StateFile,
    store: ContentStore,
    front: tokio::net::TcpListener,
    /// The agent's own `/metrics` listener, when `metrics_addr` is configured.
    metrics: Option<tokio::net::TcpListener>,
}

impl Agent {
    /// Validates the config, prepares the data directory, loads (or creates) the state and binds the front port.
    pub async fn start(config: Config) -> Result<Agent, AgentError> {
        Agent::start_with_front(config, None).await
    }

    /// [`Agent::start`] serving clients on `front` (a socket systemd passed, see
    /// [`systemd::front_listener_from_env`]) instead of binding `runtime.front_addr`.
    pub async fn start_with_front(config: Config, front: Option<std::net::TcpListener>) -> Result<Agent, AgentError> {
        config.validate()?;
        let layout = Layout { data_dir: config.data_dir.clone() };
        for dir in [layout.data_dir.clone(), layout.bundles(), layout.runtime_builds(), layout.logs()] {
            std::fs::create_dir_all(&dir).map_err(|source| AgentError::DataDir { path: dir.clone(), source })?;
        }
        let state_file = StateFile::new(&layout.data_dir);
        let loaded = match state_file.load() {
            Ok(state) => state,
            Err(e @ StateError::Corrupt { .. }) => {
                tracing::error!(error = %e, "The state file was unreadable.");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let configured = match &config.device_id {
            Some(id) => Some(DeviceId::new(id.clone()).map_err(|e| config::ConfigError::Invalid {
                field: "device_id",
                problem: e.to_string(),
                fix: "pick another id or remove the field to have one generated",
            })?),
            None => None,
        };
        let mut state = match loaded {
            Some(state) => state,
            None => AgentState::new(configured.clone().unwrap_or_else(DeviceId::generate)),
        };
        if let Some(id) = configured
            && id != state.device_id
        {
            tracing::warn!(old = %state.device_id, new = %id, "The configured device id replaces the one in the state file.");
            state.device_id = id;
        }
        state_file.save(&state)?;
        let store = ContentStore::open(&layout.content())?;
        let addr = config.front_addr()?;
        let front = match front {
            Some(passed) => {
                let passed =
                    tokio::net::TcpListener::from_std(passed).map_err(|source| AgentError::Bind { addr, source })?;
                let local = passed.local_addr().ok();
                if local != Some(addr) {
                    tracing::info!(passed = ?local, configured = %addr, "Serving clients on the socket systemd passed; runtime.front_addr is not used.");
                }
                passed
            }
            None => tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::Bind { addr, source })?,
        };
        let metrics = match config.metrics_addr()? {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::BindMetrics { addr, source })?,
            ),
            None => None,
        };
        Ok(Agent {
            device_id: state.device_id.clone(),
            config,
            notifier: systemd::Notifier::disabled(),
            config_file: None,
            state,
            state_file,
            store,
            front,
            metrics,
        })
    }

    /// Notifies systemd (readiness, watchdog, stopping) through `notifier`; see [`systemd::Notifier::from_env`].
    pub fn with_notifier(mut self, notifier: systemd::Notifier) -> Agent {
        self.notifier = notifier;
        self
    }

    /// Watches `path` (the file `config` was read from) and applies valid changes without a restart.
    pub fn with_config_file(mut self, path: PathBuf) -> Agent {
        self.config_file = Some(path);
        self
    }

    /// The address clients reach the model at (the bound port when the config said port 0).
    pub fn front_addr(&self) -> SocketAddr {
        self.front.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// Where the agent's own `/metrics` is served (the bound port when the config said port 0), if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs until `shutdown` resolves: serves what was active before (at once, without the controller), keeps
    /// the controller session, converges to desired states. On shutdown it stops accepting clients, stops
    /// llama-server with the safe sequence, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        self.run_until(async move {
            shutdown.await;
            Exit::Stop
        })
        .await
    }

    /// [`Agent::run`] until `exit` resolves, then stops as it says: [`Exit::Stop`] stops llama-server,
    /// [`Exit::HandOver`] leaves it running for the next agent, which adopts it.
    pub async fn run_until(self, exit: impl Future<Output = Exit> + Send) -> Result<(), AgentError> {
        let span = tracing::info_span!("agent", device_id = %self.device_id);
        self.run_inner(exit).instrument(span).await
    }

    /// Wires the parts (front proxy, benchmarks, metrics, staging, device loop, session) as tasks, signals
    /// readiness, and on `shutdown` stops them in order.
    async fn run_inner(self, shutdown: impl Future<Output = Exit> + Send) -> Result<(), AgentError> {
        let Agent { config, notifier, config_file, device_id, state, state_file, store, front, metrics } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let proxy = Proxy::new(http_client());
        proxy.set_unassigned(state.serve_nothing);
        if state.active.is_some() {
            // Requests wait while the model that served before the restart is adopted or started again.
            proxy.hold(config.gap_wait());
        }
        let (front_stop, front_task) = spawn_front(front, &proxy, &config);
        let (reloads, reload_task) = watch_config_file(config_file.clone(), &config, &stop_rx);
        let (snapshot_tx, snapshot_rx) = watch::channel(Snapshot::default());
        let parts = Parts::new(config, store, proxy, reloads, snapshot_rx, stop_rx);

        let (eval_reports_tx, eval_reports_rx) = mpsc::channel(eval::jobs::REPORTS);
        let evaluator = parts.evaluator(eval_reports_tx);
        let gap_evaluator = parts.gap_evaluator(&evaluator);
        let (evals, eval_task) = evaluator.spawn(parts.stop.clone());
        let (reports_tx, reports_rx) = mpsc::channel(bench::JOB_QUEUE);
        let benchmarker = parts.benchmarker(&device_id, reports_tx, evals.clone()).await;
        let (bench_jobs, bench_task) = benchmarker.spawn(parts.stop.clone());
        let metrics_task = metrics.map(|listener| parts.spawn_metrics_server(listener));
        // Pre-staging: staged bundles are pinned in the store before the device loop may evict anything.
        let (staging, stage_task) = parts.stager().spawn(parts.stop.clone()).await;
        let (status_tx, status_rx) = mpsc::channel(STATUS_CAPACITY);
        let (desired_tx, desired_rx) = watch::channel(None);
        let bench_after = parts.config.benchmark_after_activation.then(|| bench_jobs.clone());
        let hooks = DeviceHooks {
            metrics: Arc::clone(&parts.metrics),
            bench: bench_after,
            eval: Some(evals.clone()),
            gap: Some(gap_evaluator),
        };
        let (requests_tx, requests_rx) = mpsc::channel(DEVICE_REQUESTS);
        let (device, hand_over) = parts.device(state, state_file, status_tx, snapshot_tx, desired_rx, hooks);
        let device = Device { requests: Some(requests_rx), ..device };
        let scrubber = scrub::Scrubber::new(parts.acquirer.store.clone(), Arc::clone(&parts.metrics));
        let scrub_task = parts.spawn_scrub(&scrubber);
        let operations = session::Operations {
            diagnostics: parts.diagnostics(&device_id, config_file.clone()),
            device: requests_tx,
            scrubber,
        };
        let device_task = tokio::spawn(device.run(parts.stop.clone()).in_current_span());
        let reports = SessionReports { benchmarks: reports_rx, evals, eval_reports: eval_reports_rx, operations };
        let session = parts.session(device_id, desired_tx, status_rx, reports, bench_jobs, staging);
        // Device certificates renew themselves at two thirds of their life (not in the insecure token mode).
        let renewal = (!parts.config.controller.insecure_plaintext)
            .then(|| tokio::spawn(identity::renew_loop(parts.config.clone(), parts.stop.clone()).in_current_span()));
        let session_task = tokio::spawn(session::run(session, parts.stop.clone()).in_current_span());

        // Ready: the front port accepts clients (held requests wait while the previous model starts).
        notifier.ready();
        let watchdog = spawn_watchdog(&notifier);

        let exit = shutdown.await;
        tracing::info!(?exit, "Shutting down.");
        notifier.stopping();
        if exit == Exit::HandOver {
            hand_over.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = front_stop.send(match exit {
            Exit::Stop => FrontStop::Close,
            Exit::HandOver => FrontStop::HandOver,
        });
        let _ = stop_tx.send(true);
        let drain_timeout = parts.config.drain_timeout();
        // The device loop's own waits are bounded (drain timeout, stop sequence); this bound is a backstop.
        let tasks = [
            ("device loop", device_task, drain_timeout + Duration::from_secs(30)),
            ("session", session_task, TASK_SHUTDOWN),
            ("front server", front_task, drain_timeout + TASK_SHUTDOWN),
            ("benchmarks", bench_task, TASK_SHUTDOWN),
            ("evaluations", eval_task, TASK_SHUTDOWN),
            ("staging", stage_task, TASK_SHUTDOWN),
        ];
        let metrics_task = metrics_task.map(|task| ("metrics server", task, TASK_SHUTDOWN));
        join_bounded(tasks.into_iter().chain(metrics_task)).await;
        // Pings continue through the (bounded) stop so systemd does not kill a graceful drain.
        for task in [watchdog, reload_task, renewal, scrub_task].into_iter().flatten() {
            task.abort();
        }
        tracing::info!("Stopped.");
        Ok(())
    }
}

/// Serves clients on `front` through `proxy` until the returned sender says how to stop.
fn spawn_front(
    front: tokio::net::TcpListener,
    proxy: &Arc<Proxy>,
    config: &Config,
) -> (tokio::sync::oneshot::Sender<FrontStop>, JoinHandle<()>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<FrontStop>();
    let front_addr = front.local_addr().ok();
    let stop = async move { stop_rx.await.unwrap_or(FrontStop::Close) };
    let drain_timeout = config.drain_timeout();
    let fd_limit = runtime::front::raise_fd_limit();
    let limits = FrontLimits {
        max_connections: runtime::front::connection_cap(config.runtime.max_connections, fd_limit),
        header_read_timeout: Duration::from_secs(config.runtime.header_read_timeout_secs),
    };
    let admission = AdmissionSettings {
        api_keys_file: config.runtime.api_keys_file.clone(),
        requests_per_minute_per_client: config.runtime.requests_per_minute_per_client,
        max_body_bytes: config.runtime.max_body_mib << 20,
    };
    if limits.max_connections < config.runtime.max_connections {
        tracing::warn!(
            fd_limit,
            cap = limits.max_connections,
            "runtime.max_connections is lowered to fit the file-descriptor limit; raise LimitNOFILE."
        );
    }
    let counters = proxy.front_counters().clone();
    let serve = runtime::front::serve(front, proxy.router_with(admission), stop, drain_timeout, limits, counters);
    let task = tokio::spawn(serve.in_current_span());
    tracing::info!(front = ?front_addr, max_connections = limits.max_connections, keys = config.runtime.api_keys_file.is_some(), "Front proxy listening.");
    (stop_tx, task)
}

/// Watches the config file, when there is one; a watcher that cannot start leaves changes for a restart.
fn watch_config_file(
    path: Option<PathBuf>,
    config: &Config,
    stop: &watch::Receiver<bool>,
) -> (Option<watch::Receiver<ConfigState>>, Option<JoinHandle<()>>) {
    let Some(path) = path else { return (None, None) };
    match reload::watch_config(path.clone(), config.clone(), stop.clone()) {
        Ok((rx, task)) => (Some(rx), Some(task)),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "Cannot watch the config file; changes need a restart.");
            (None, None)
        }
    }
}

/// Pings systemd's watchdog from the async runtime, when the unit asks for it: a wedged runtime stops the
/// pings and systemd restarts the agent.
fn spawn_watchdog(notifier: &systemd::Notifier) -> Option<JoinHandle<()>> {
    let every = notifier.watchdog_interval()?;
    let notifier = notifier.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notifier.watchdog();
        }
    }))
}

/// Waits for each task in turn, within its bound; one that does not stop in time is aborted.
async fn join_bounded(tasks: impl Iterator<Item = (&'static str, JoinHandle<()>, Duration)>) {
    for (name, task, bound) in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(bound, task).await.is_err() {
            tracing::warn!(task = name, "Did not stop in time; aborted.");
            abort.abort();
        }
    }
}

/// What the agent's tasks share: the config, the front proxy, the counters, the acquire path, how
/// llama-server is run, the device loop's snapshot, config reloads and the stop signal.
struct Parts {
    config: Config,
    layout: Layout,
    proxy: Arc<Proxy>,
    metrics: Arc<AgentMetrics>,
    /// Registry settings with the token from the controller's Welcome, the content store, runtime builds.
    acquirer: Acquirer,
    /// How llama-server instances run (the configured binary and flags, logs, stop sequence).
    instance: InstanceOptions,
    snapshot: watch::Receiver<Snapshot>,
    reloads: Option<watch::Receiver<ConfigState>>,
    stop: watch::Receiver<bool>,
}

impl Parts {
    fn new(
        config: Config,
        store: ContentStore,
        proxy: Arc<Proxy>,
        reloads: Option<watch::Receiver<ConfigState>>,
        snapshot: watch::Receiver<Snapshot>,
        stop: watch::Receiver<bool>,
    ) -> Parts {
        let layout = Layout { data_dir: config.data_dir.clone() };
        let instance = InstanceOptions {
            llama_server: config.runtime.llama_server.clone(),
            extra_args: config.runtime.extra_args.clone(),
            launcher: config.runtime.launcher.clone(),
            log_dir: layout.logs(),
            health_timeout: config.health_timeout(),
            stop: StopPolicy::default(),
        };
        // One token for every pull: the session sets it from each Welcome.
        let registry = RegistrySettings::from_config(&config, DeviceRegistryToken::default());
        let acquirer = Acquirer { registry, store, builds_dir: layout.runtime_builds() };
        let metrics = Arc::new(AgentMetrics::default());
        Parts { config, layout, proxy, metrics, acquirer, instance, snapshot, reloads, stop }
    }

    /// The benchmark task (with calibration), for this device and its hardware class.
    async fn benchmarker(
        &self,
        device_id: &DeviceId,
        reports: mpsc::Sender<alki_shared::proto::BenchmarkReport>,
        evals: eval::Jobs,
    ) -> bench::Benchmarker {
        let (data_dir, labels) = (self.config.data_dir.clone(), self.config.labels.clone());
        let hardware_class = tokio::task::spawn_blocking(move || inventory::collect(&data_dir, &labels).hardware_class)
            .await
            .unwrap_or_default();
        bench::Benchmarker {
            identity: bench::Identity { device_id: device_id.to_string(), hardware_class },
            proxy: Arc::clone(&self.proxy),
            http: http_client(),
            snapshot: self.snapshot.clone(),
            results: bench::ResultsFile::new(&self.layout.data_dir),
            serving_file: bench::ServingFile::new(&self.layout.data_dir),
            reports,
            metrics: Arc::clone(&self.metrics),
            calibration: bench::Calibration {
                acquirer: self.acquirer.clone(),
                data_dir: self.layout.data_dir.clone(),
                instance: InstanceOptions { log_dir: self.layout.logs().join("calibration"), ..self.instance.clone() },
                memory_reserve: self.config.memory_reserve_bytes(),
                http: http_client(),
            },
            evals: Some(evals),
        }
    }

    /// The evaluation task: suites, candidates and baselines through the acquire path, tools at the
    /// configured priority, baseline logits cached in the content store.
    fn evaluator(&self, reports: mpsc::Sender<alki_shared::proto::EvalReport>) -> eval::Evaluator {
        let (config, layout) = (&self.config, &self.layout);
        let env = eval::Env {
            acquirer: self.acquirer.clone(),
            data_dir: layout.data_dir.clone(),
            work_dir: layout.evaluation(),
            instance: InstanceOptions { log_dir: layout.logs().join("evaluation"), ..self.instance.clone() },
            http: http_client(),
            logits: eval::logits::BaseLogits::new(self.acquirer.store.clone(), &layout.content()),
            priority: config.eval.priority,
            threads: config.eval.threads,
            memory_reserve: config.memory_reserve_bytes(),
            disk_reserve: config.disk_reserve_bytes(),
            bandwidth: config.bandwidth_limit(),
            metrics: Arc::clone(&self.metrics),
        };
        let reporter = eval::Reporter {
            metrics: Arc::clone(&self.metrics),
            reports,
            file: eval::files::EvaluationsFile::new(&layout.data_dir),
            done: eval::files::DoneFile::new(&layout.data_dir),
        };
        eval::Evaluator { env, reporter }
    }

    /// Evaluations in a stop-then-start swap's gap, run by the device loop: the evaluation task's
    /// environment with a work directory of its own, and the same reports.
    fn gap_evaluator(&self, evaluator: &eval::Evaluator) -> eval::GapEvaluator {
        // Nothing serves in the gap for a low priority to protect, and every second of it is outage.
        let env = eval::Env {
            work_dir: self.layout.evaluation_gap(),
            priority: runtime::priority::Priority::Normal,
            ..evaluator.env.clone()
        };
        eval::GapEvaluator { env, reporter: evaluator.reporter.clone() }
    }

    fn metrics_state(&self) -> metrics::MetricsState {
        metrics::MetricsState {
            proxy: Arc::clone(&self.proxy),
            snapshot: self.snapshot.clone(),
            metrics: Arc::clone(&self.metrics),
            http: http_client(),
        }
    }

    /// The agent's own `/metrics` on `listener`.
    fn spawn_metrics_server(&self, listener: tokio::net::TcpListener) -> JoinHandle<()> {
        tokio::spawn(metrics::serve(listener, self.metrics_state(), self.stop.clone()).in_current_span())
    }

    /// Remote diagnostics: logs in the data dir's logs directory (or the journal), support bundles.
    fn diagnostics(&self, device_id: &DeviceId, config_file: Option<PathBuf>) -> diagnostics::Diagnostics {
        diagnostics::Diagnostics::new(
            device_id.to_string(),
            self.layout.data_dir.clone(),
            config_file,
            self.config.labels.clone(),
            self.config.diagnostics.clone(),
            self.reloads.clone(),
            self.acquirer.store.clone(),
            self.metrics_state(),
        )
    }

    /// The content store's background scrub, unless `store.scrub_kib_per_second` is 0.
    fn spawn_scrub(&self, scrubber: &scrub::Scrubber) -> Option<JoinHandle<()>> {
        let rate = self.config.store.scrub_kib_per_second << 10;
        if rate == 0 {
            return None;
        }
        let interval = Duration::from_secs(self.config.store.scrub_interval_hours * 3600);
        let run = scrubber.clone().run(self.layout.data_dir.clone(), rate, interval, self.stop.clone());
        Some(tokio::spawn(run.in_current_span()))
    }

    fn stager(&self) -> stage::Stager {
        stage::Stager {
            acquirer: self.acquirer.clone(),
            bundles_dir: self.layout.bundles(),
            data_dir: self.layout.data_dir.clone(),
            config: Arc::new(self.config.clone()),
            reloads: self.reloads.clone(),
            snapshot: self.snapshot.clone(),
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// The device loop, and the switch that makes its shutdown a hand-over (llama-server left running).
    fn device(
        &self,
        state: AgentState,
        state_file: StateFile,
        statuses: mpsc::Sender<alki_shared::proto::Status>,
        snapshot: watch::Sender<Snapshot>,
        desired: watch::Receiver<Option<alki_shared::proto::DesiredState>>,
        hooks: DeviceHooks,
    ) -> (Device, Arc<std::sync::atomic::AtomicBool>) {
        let config = &self.config;
        let mut supervisor = Supervisor::new(self.instance.clone(), config.drain_timeout(), Arc::clone(&self.proxy));
        supervisor.set_gap_wait(config.gap_wait());
        supervisor.set_recorder(runtime::Recorder::open(&self.layout.data_dir));
        let hand_over = supervisor.hand_over_switch();
        let device = Device {
            converger: Converger::new(state.last_applied_generation),
            state,
            state_file,
            acquirer: self.acquirer.clone(),
            bundles_dir: self.layout.bundles(),
            supervisor,
            statuses,
            snapshot,
            desired,
            retry: None,
            retry_delay: device::RETRY_MIN,
            restart: None,
            restart_delay: device::RESTART_MIN,
            policy: device::SwapPolicy::from_config(config),
            config: self.reloads.clone(),
            instance_base: self.instance.clone(),
            gap_wait: config.gap_wait(),
            watching: None,
            crashes: std::collections::VecDeque::with_capacity(device::CRASH_LOOP_COUNT),
            hooks,
            save_retry: None,
            requests: None,
        };
        (device, hand_over)
    }

    /// The controller session: desired states down, statuses, telemetry and reports up, commands to the
    /// benchmark and staging queues.
    fn session(
        &self,
        device_id: DeviceId,
        desired: watch::Sender<Option<alki_shared::proto::DesiredState>>,
        statuses: mpsc::Receiver<alki_shared::proto::Status>,
        reports: SessionReports,
        bench: bench::Jobs,
        staging: stage::SessionStaging,
    ) -> SessionContext {
        let config = &self.config;
        SessionContext {
            device_id,
            url: config.controller.url.clone(),
            token_file: config.controller.token_file.clone(),
            labels: config.labels.clone(),
            selected_by: Default::default(),
            data_dir: config.data_dir.clone(),
            proxy: Arc::clone(&self.proxy),
            snapshot: self.snapshot.clone(),
            desired,
            statuses,
            config: self.reloads.clone(),
            telemetry: SessionTelemetry {
                collector: metrics::TelemetryCollector::new(http_client()),
                metrics: Arc::clone(&self.metrics),
                bench: Some(bench),
                reports: reports.benchmarks,
                evals: reports.evals,
                eval_reports: reports.eval_reports,
            },
            settings: config.clone(),
            registry_token: self.acquirer.registry.device_token.clone(),
            staging,
            operations: reports.operations,
        }
    }
}

/// What the session forwards, and where Evaluate, diagnostics and device commands go.
struct SessionReports {
    benchmarks: mpsc::Receiver<alki_shared::proto::BenchmarkReport>,
    evals: eval::Jobs,
    eval_reports: mpsc::Receiver<alki_shared::proto::EvalReport>,
    operations: session::Operations,
}

/// How the agent ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A stop (SIGTERM): the model is served until the last moment, then llama-server is stopped safely.
    Stop,
    /// A hand-over (SIGUSR2): the front port stops accepting, in-flight requests finish (bounded), and
    /// llama-server keeps running for the next agent to adopt.
    HandOver,
}

/// The whole agent: [`Agent::start`] then [`Agent::run`].
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
    Agent::start(config).await?.run(shutdown).await
}

/// [`run`] under systemd: readiness, watchdog and stopping notifications through `notifier`.
pub async fn run_with_notifier(
    config: Config,
    notifier: systemd::Notifier,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    Agent::start(config).await?.with_notifier(notifier).run(shutdown).await
}
