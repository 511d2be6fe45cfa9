//! Alki Fleet's device agent: one session to the controller, bundles pulled and verified into a local
//! content store, llama-server hot-swapped behind a stable front port.
//!
//! [`run`] is the whole agent; [`Agent::start`] then [`Agent::run`] does the same in two steps, so a test
//! can learn the front address (configured as port 0) before the agent runs.

pub mod bench;
pub mod builds;
pub mod calibrate;
pub mod config;
pub mod converge;
mod device;
pub mod enroll;
pub mod identity;
pub mod inventory;
pub mod metrics;
pub mod outbox;
pub mod pull;
pub mod reference;
pub mod reload;
pub mod runtime;
pub mod session;
pub mod settings;
pub mod stage;
pub mod state;
pub mod store;
pub mod systemd;
pub mod trust;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alki_shared::ids::DeviceId;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

pub use config::Config;
use converge::Converger;
use device::{Device, RegistrySettings};
use runtime::{InstanceOptions, Proxy, StopPolicy, Supervisor, http_client};
use session::{SessionContext, Snapshot};
use state::{AgentState, StateError, StateFile};
use store::{ContentStore, StoreError};

/// Statuses queued from the device loop to the session.
const STATUS_CAPACITY: usize = 64;
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
        self.data_dir.join(builds::DIR_NAME)
    }
    pub fn logs(&self) -> PathBuf {
        self.data_dir.join("logs")
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

    async fn run_inner(self, shutdown: impl Future<Output = Exit> + Send) -> Result<(), AgentError> {
        let Agent { config, notifier, config_file, device_id, state, state_file, store, front, metrics } = self;
        let metrics_listener = metrics;
        let layout = Layout { data_dir: config.data_dir.clone() };
        let (stop_tx, stop_rx) = watch::channel(false);
        let proxy = Proxy::new(http_client());
        proxy.set_unassigned(state.serve_nothing);
        if state.active.is_some() {
            // Requests wait while the model that served before the restart is adopted or started again.
            proxy.hold(config.gap_wait());
        }
        let (front_stop_tx, front_stop_rx) = tokio::sync::oneshot::channel::<runtime::front::FrontStop>();
        let front_addr = front.local_addr().ok();
        let router = proxy.router();
        let server = tokio::spawn(
            runtime::front::serve(
                front,
                router,
                async move { front_stop_rx.await.unwrap_or(runtime::front::FrontStop::Close) },
                config.drain_timeout(),
            )
            .in_current_span(),
        );
        tracing::info!(front = ?front_addr, "Front proxy listening.");

        let mut reload_task = None;
        let config_rx = match config_file {
            Some(path) => match reload::watch_config(path.clone(), config.clone(), stop_rx.clone()) {
                Ok((rx, task)) => {
                    reload_task = Some(task);
                    Some(rx)
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "Cannot watch the config file; changes need a restart.");
                    None
                }
            },
            None => None,
        };
        let (status_tx, status_rx) = mpsc::channel(STATUS_CAPACITY);
        let (snapshot_tx, snapshot_rx) = watch::channel(Snapshot::default());
        let (desired_tx, desired_rx) = watch::channel(None);
        let registry_token = identity::DeviceRegistryToken::default();
        let opts = InstanceOptions {
            llama_server: config.runtime.llama_server.clone(),
            extra_args: config.runtime.extra_args.clone(),
            log_dir: layout.logs(),
            health_timeout: config.health_timeout(),
            stop: StopPolicy::default(),
        };
        let drain_timeout = config.drain_timeout();
        let metrics = Arc::new(metrics::AgentMetrics::default());
        let (reports_tx, reports_rx) = mpsc::channel(bench::JOB_QUEUE);
        let (data_dir, labels) = (config.data_dir.clone(), config.labels.clone());
        let hardware_class = tokio::task::spawn_blocking(move || inventory::collect(&data_dir, &labels).hardware_class)
            .await
            .unwrap_or_default();
        let benchmarker = bench::Benchmarker {
            identity: bench::Identity { device_id: device_id.to_string(), hardware_class },
            proxy: Arc::clone(&proxy),
            http: http_client(),
            snapshot: snapshot_rx.clone(),
            results: bench::ResultsFile::new(&layout.data_dir),
            serving_file: bench::ServingFile::new(&layout.data_dir),
            reports: reports_tx,
            metrics: Arc::clone(&metrics),
            calibration: calibrate::Calibration {
                registry: RegistrySettings {
                    device_token: registry_token.clone(),
                    ..RegistrySettings::from_config(&config)
                },
                store: store.clone(),
                data_dir: layout.data_dir.clone(),
                instance: InstanceOptions { log_dir: layout.logs().join("calibration"), ..opts.clone() },
                memory_reserve: config.memory_reserve_bytes(),
                http: http_client(),
            },
        };
        let (bench_jobs, bench_task) = benchmarker.spawn(stop_rx.clone());
        let metrics_task = metrics_listener.map(|listener| {
            let state = metrics::MetricsState {
                proxy: Arc::clone(&proxy),
                snapshot: snapshot_rx.clone(),
                metrics: Arc::clone(&metrics),
                http: http_client(),
            };
            tokio::spawn(metrics::serve(listener, state, stop_rx.clone()).in_current_span())
        });
        // Pre-staging: staged bundles are pinned in the store before the device loop may evict anything.
        let stager = stage::Stager {
            registry: RegistrySettings {
                device_token: registry_token.clone(),
                ..RegistrySettings::from_config(&config)
            },
            store: store.clone(),
            bundles_dir: layout.bundles(),
            data_dir: layout.data_dir.clone(),
            config: Arc::new(config.clone()),
            reloads: config_rx.clone(),
            snapshot: snapshot_rx.clone(),
            metrics: Arc::clone(&metrics),
        };
        let (staging, stage_task) = stager.spawn(stop_rx.clone()).await;
        let hand_over: Arc<std::sync::atomic::AtomicBool>;
        let device = Device {
            converger: Converger::new(state.last_applied_generation),
            state,
            state_file,
            store,
            bundles_dir: layout.bundles(),
            builds_dir: layout.runtime_builds(),
            registry: RegistrySettings {
                device_token: registry_token.clone(),
                ..RegistrySettings::from_config(&config)
            },
            supervisor: {
                let mut supervisor = Supervisor::new(opts.clone(), drain_timeout, Arc::clone(&proxy));
                supervisor.set_gap_wait(config.gap_wait());
                supervisor.set_recorder(runtime::Recorder::open(&layout.data_dir));
                hand_over = supervisor.hand_over_switch();
                supervisor
            },
            statuses: status_tx,
            snapshot: snapshot_tx,
            desired: desired_rx,
            retry: None,
            retry_delay: device::RETRY_MIN,
            policy: device::SwapPolicy::from_config(&config),
            config: config_rx.clone(),
            instance_base: opts.clone(),
            gap_wait: config.gap_wait(),
            watching: None,
            crashes: std::collections::VecDeque::with_capacity(device::CRASH_LOOP_COUNT),
            hooks: metrics::DeviceHooks {
                metrics: Arc::clone(&metrics),
                bench: config.benchmark_after_activation.then(|| bench_jobs.clone()),
            },
        };
        let device_task = tokio::spawn(device.run(stop_rx.clone()).in_current_span());

        let session = SessionContext {
            device_id,
            url: config.controller.url.clone(),
            token_file: config.controller.token_file.clone(),
            labels: config.labels.clone(),
            data_dir: config.data_dir.clone(),
            proxy,
            snapshot: snapshot_rx,
            desired: desired_tx,
            statuses: status_rx,
            config: config_rx,
            telemetry: metrics::SessionTelemetry {
                collector: metrics::TelemetryCollector::new(http_client()),
                metrics,
                bench: Some(bench_jobs),
                reports: reports_rx,
            },
            settings: config.clone(),
            registry_token,
            staging,
        };
        // Device certificates renew themselves at two thirds of their life (not in the insecure token mode).
        let renewal = (!config.controller.insecure_plaintext)
            .then(|| tokio::spawn(identity::renew_loop(config.clone(), stop_rx.clone()).in_current_span()));
        let session_task = tokio::spawn(session::run(session, stop_rx.clone()).in_current_span());

        // Ready: the front port accepts clients (held requests wait while the previous model starts).
        notifier.ready();
        let watchdog = notifier.watchdog_interval().map(|every| {
            let notifier = notifier.clone();
            // The pings come from the async runtime: a wedged runtime stops them and systemd restarts the agent.
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    notifier.watchdog();
                }
            })
        });

        let exit = shutdown.await;
        tracing::info!(?exit, "Shutting down.");
        notifier.stopping();
        if exit == Exit::HandOver {
            hand_over.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = front_stop_tx.send(match exit {
            Exit::Stop => runtime::front::FrontStop::Close,
            Exit::HandOver => runtime::front::FrontStop::HandOver,
        });
        let _ = stop_tx.send(true);
        // The device loop's own waits are bounded (drain timeout, stop sequence); this bound is a backstop.
        let device_bound = drain_timeout + Duration::from_secs(30);
        for (name, task, bound) in [
            ("device loop", device_task, device_bound),
            ("session", session_task, TASK_SHUTDOWN),
            ("front server", server, drain_timeout + TASK_SHUTDOWN),
            ("benchmarks", bench_task, TASK_SHUTDOWN),
            ("staging", stage_task, TASK_SHUTDOWN),
        ]
        .into_iter()
        .chain(metrics_task.map(|task| ("metrics server", task, TASK_SHUTDOWN)))
        {
            let abort = task.abort_handle();
            if tokio::time::timeout(bound, task).await.is_err() {
                tracing::warn!(task = name, "Did not stop in time; aborted.");
                abort.abort();
            }
        }
        // Pings continue through the (bounded) stop so systemd does not kill a graceful drain.
        if let Some(watchdog) = watchdog {
            watchdog.abort();
        }
        if let Some(task) = reload_task {
            task.abort();
        }
        if let Some(task) = renewal {
            task.abort();
        }
        tracing::info!("Stopped.");
        Ok(())
    }
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
