//! Wiring: opens the store and registry, builds the application context (`app::App`), starts gRPC, HTTP,
//! the rollout reconciler and the background loops, and shuts them down. This is the single place where
//! listeners are set up, so TLS plugs in here.

use std::future::Future;
use std::sync::Arc;

use alki_shared::clock::{self, SharedClock};
use alki_shared::proto::admin_service_server::AdminServiceServer;
use alki_shared::proto::agent_service_server::AgentServiceServer;
use alki_shared::proto::diagnostics_service_server::DiagnosticsServiceServer;
use alki_shared::proto::enrollment_service_server::EnrollmentServiceServer;
use alki_shared::proto::event_service_server::EventServiceServer;
use alki_shared::proto::fleet_service_server::FleetServiceServer;
use alki_shared::proto::insight_service_server::InsightServiceServer;
use alki_shared::proto::security_service_server::SecurityServiceServer;
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::app::App;
use crate::auth::Authenticator;
use crate::config::ControllerConfig;
use crate::fleet::Fleet;
use crate::fleet::reports::{ReportCounters, ReportWriter, WriterTask};
use crate::registry::Registry;
use crate::rollout::Rollouts;
use crate::rollout::create::Sources;
use crate::rollout::reconcile;
use crate::store::Store;

/// Already-bound listeners: tests bind 127.0.0.1:0 and pass them in.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

/// Runs the controller until `shutdown` resolves, then stops accepting, finishes in-flight work and returns.
pub async fn serve(
    listeners: Listeners,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_clock(listeners, config, clock::system(), shutdown).await
}

/// [`serve`] with every record and report stamped by `clock` (tests drive time with it).
pub async fn serve_with_clock(
    listeners: Listeners,
    config: ControllerConfig,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let http_addr = listeners.http.local_addr()?;
    let stop = CancellationToken::new();
    let (app, gate, report_writer_task) = open_app(&config, clock, http_addr, stop.clone())?;
    let background = Background::start(&app, &config, stop.clone());
    let grpc = grpc_server(&app, &config, gate.clone(), listeners.grpc, stop.clone()).await?;
    let http = http_server(&app, gate, listeners.http, config.insecure_plaintext, stop.clone());

    tracing::info!(http = %http_addr, "Controller is serving.");
    let hub = app.fleet.hub.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("Shutting down.");
        stop.cancel();
        // Agent sessions never end on their own: close them so the gRPC server's graceful shutdown can
        // finish. Agents reconnect to whichever controller comes back.
        let closed = hub.close_all();
        tracing::info!(sessions = closed, "Closed agent sessions.");
    });
    let (grpc_result, http_result) = tokio::join!(grpc, http);
    // What the agents reported last is written before the store is let go.
    report_writer_task.finish().await;
    background.finish().await;
    app.deliveries.finish().await;
    grpc_result.context("gRPC server")?;
    http_result.context("HTTP server")?;
    Ok(())
}

/// Opens the store, the CA and the registry and builds the application context around them, with the
/// gate every call passes and the report writer's task (to finish at shutdown).
fn open_app(
    config: &ControllerConfig,
    clock: SharedClock,
    http_addr: std::net::SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<(App, crate::audit::Gate, WriterTask)> {
    let store = Store::open(&config.data_dir)
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?
        .with_clock(clock.clone());
    crate::pki::install_crypto_provider();
    let pki = crate::pki::Pki::load_or_create(&config.data_dir, &config.pki).context("setting up the controller CA")?;
    let auth = Authenticator::new(store.clone()).with_device_tokens(pki.clone()).with_clock(clock.clone());
    if let Some(path) = auth.bootstrap_admin(&config.data_dir)? {
        tracing::info!(path = %path.display(), "First start: wrote the bootstrap admin token.");
    }
    // Every call passes the gate (authentication by table, rate limits, audit) before any handler.
    let gate = crate::audit::Gate {
        auth: auth.clone(),
        auditor: crate::audit::Auditor::start(store.clone(), config.audit_retention, clock.clone()),
        token_limiter: Arc::new(crate::limits::RateLimiter::new(
            config.limits.token_rate,
            crate::limits::MAX_RATE_KEYS,
        )),
        refused: Arc::default(),
        sessions: Arc::new(crate::console::session::Sessions::new(config.console_session_ttl, clock.clone())),
    };
    let registry =
        Registry::open_with_clock(&config.data_dir, store.database(), config.registry.clone(), clock.clone())
            .context("opening the registry")?;
    let sources = Sources {
        registry: Arc::new(registry),
        registry_host: config.registry_host.clone().unwrap_or_else(|| http_addr.to_string()),
        externals: config.external_registries.clone().into(),
        trusted_keys: config.trusted_keys.clone().into(),
        gates: Arc::new(config.gates.clone()),
    };
    let fleet = Fleet::new(store.clone()).with_command_ttl(config.command_queue_ttl);
    let deliveries = crate::events::deliver::Deliveries::start(
        store.clone(),
        clock.clone(),
        format!("//{}", sources.registry_host),
        config.webhook_delivery,
        stop.clone(),
    )
    .context("starting webhook deliveries")?;
    let report_counters = Arc::new(ReportCounters::default());
    let (reports, report_writer_task) = ReportWriter::start(fleet.clone(), report_counters.clone());
    let rollouts = Rollouts::new(fleet.clone());
    let gate_calls = crate::rollout::gate_calls::GateCalls::new(rollouts.clone(), config.gates.clone(), clock.clone())
        .map_err(anyhow::Error::msg)?;
    let app = App {
        clock,
        store,
        rollouts,
        gate_calls,
        fleet,
        auth,
        pki,
        sources,
        ingest: Arc::default(),
        reports,
        http_counters: Arc::default(),
        report_counters,
        refused_calls: gate.refused.clone(),
        console_sessions: gate.sessions.clone(),
        label_trust: Arc::new(config.label_trust.clone()),
        heartbeat_interval: config.heartbeat_interval,
        deliveries,
        watchers: crate::events::watch::Watchers::new(stop),
    };
    Ok((app, gate, report_writer_task))
}

/// The loops that run beside the servers: the rollout reconciler, the rollup flush, the registry token
/// refresher and the registry's garbage collection schedule.
struct Background {
    reconciler_stop: Arc<tokio::sync::Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    fn start(app: &App, config: &ControllerConfig, stop: CancellationToken) -> Background {
        let reconciler_stop = Arc::new(tokio::sync::Notify::new());
        let tasks = vec![
            tokio::spawn(reconcile::reconcile_loop(
                app.rollouts.clone(),
                app.gate_calls.clone(),
                app.clock.clone(),
                reconciler_stop.clone(),
            )),
            tokio::spawn(crate::insight::flush_loop(
                app.ingest.clone(),
                app.store.clone(),
                app.clock.clone(),
                stop.clone(),
            )),
            tokio::spawn(crate::enrollment::refresh_registry_tokens(
                app.fleet.clone(),
                app.pki.clone(),
                app.clock.clone(),
                config.heartbeat_interval,
                app.sources.registry_host.clone(),
                stop.clone(),
            )),
            tokio::spawn(app.sources.registry.clone().run_gc_schedule(stop)),
        ];
        Background { reconciler_stop, tasks }
    }

    /// Stops the reconciler (the others stop with the shutdown token) and waits for every loop to end.
    async fn finish(self) {
        self.reconciler_stop.notify_one();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The gRPC server: every service behind the gate, the standard health service and reflection.
async fn grpc_server(
    app: &App,
    config: &ControllerConfig,
    gate: crate::audit::Gate,
    listener: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<impl Future<Output = Result<(), tonic::transport::Error>>> {
    let limits = &config.limits;
    let agent_api = api::agent::AgentApi {
        app: app.clone(),
        insecure_agent_tokens: config.insecure_agent_tokens,
        device_limiter: Arc::new(crate::limits::RateLimiter::new(limits.device_rate, crate::limits::MAX_RATE_KEYS)),
    };
    let admin_api = api::admin::AdminApi { app: app.clone() };
    let enroll_api = api::enroll::EnrollApi { app: app.clone() };
    let security_api = api::security::SecurityApi { app: app.clone() };
    let insight_api = api::insight::InsightApi { app: app.clone() };
    let fleet_api = api::fleet::FleetApi { app: app.clone() };
    let events_api = api::events::EventsApi { app: app.clone() };
    let diagnostics_api = api::diagnostics::DiagnosticsApi { app: app.clone() };
    // The standard health service: every Alki service is SERVING while the listener is up (a stopping
    // controller stops answering altogether).
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for service in [
        "alki.v1.AgentService",
        "alki.v1.FleetService",
        "alki.v1.InsightService",
        "alki.v1.AdminService",
        "alki.v1.EnrollmentService",
        "alki.v1.SecurityService",
        "alki.v1.EventService",
        "alki.v1.DiagnosticsService",
    ] {
        health_reporter.set_service_status(service, tonic_health::ServingStatus::Serving).await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(alki_shared::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("the gRPC reflection service")?;
    let mut grpc = tonic::transport::Server::builder();
    if config.insecure_plaintext {
        tracing::warn!("Serving gRPC and HTTP WITHOUT TLS (--insecure-plaintext): use only on a loopback test bench.");
    } else {
        grpc = grpc.tls_config(crate::tls::grpc_config(&app.pki)).context("the gRPC listener's TLS settings")?;
    }
    Ok(grpc
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .layer(crate::audit::GrpcGateLayer::new(gate, limits.grpc_max_message))
        .add_service(AgentServiceServer::new(agent_api).max_decoding_message_size(limits.session_max_message))
        .add_service(AdminServiceServer::new(admin_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(FleetServiceServer::new(fleet_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(InsightServiceServer::new(insight_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(EnrollmentServiceServer::new(enroll_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(SecurityServiceServer::new(security_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(EventServiceServer::new(events_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(DiagnosticsServiceServer::new(diagnostics_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(nodelay(TcpListenerStream::new(listener)), async move { stop.cancelled().await }))
}

/// The HTTP server: probes, the registry, the dashboard API and the web console, counted and behind the gate, over TLS
/// unless `insecure_plaintext`.
fn http_server(
    app: &App,
    gate: crate::audit::Gate,
    listener: TcpListener,
    insecure_plaintext: bool,
    stop: CancellationToken,
) -> impl Future<Output = std::io::Result<()>> {
    // With connect info, so the audit log and the per-peer limits see the client's address.
    let router = api::http::router(app.sources.registry.clone(), app.auth.clone(), app.store.clone())
        .merge(api::dashboard::router(api::dashboard::DashboardState { app: app.clone() }))
        .merge(crate::console::router(crate::console::ConsoleState {
            auth: app.auth.clone(),
            sessions: gate.sessions.clone(),
            auditor: gate.auditor.clone(),
            secure: !insecure_plaintext,
        }))
        .layer(axum::middleware::from_fn_with_state(app.http_counters.clone(), crate::metrics::count_registry))
        .layer(axum::middleware::from_fn_with_state(gate, crate::audit::http_gate));
    let pki = app.pki.clone();
    async move {
        let shutdown = async move { stop.cancelled().await };
        if insecure_plaintext {
            let listener = crate::listen::PlainListener(listener);
            axum::serve(listener, router.into_make_service_with_connect_info::<crate::listen::PeerAddr>())
                .with_graceful_shutdown(shutdown)
                .await
        } else {
            let tls = crate::tls::http_config(&pki).map_err(std::io::Error::other)?;
            let listener = crate::tls::TlsListener::new(listener, tls)?;
            axum::serve(listener, router.into_make_service_with_connect_info::<crate::listen::PeerAddr>())
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// Accepted connections with TCP_NODELAY: without it a reply's last small write can wait for the peer's
/// delayed ACK (40 ms on Linux), on every small registry response and gRPC message.
fn nodelay(incoming: TcpListenerStream) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    incoming.map(|accepted| {
        if let Ok(tcp) = &accepted
            && let Err(error) = tcp.set_nodelay(true)
        {
            tracing::debug!(%error, "TCP_NODELAY could not be set.");
        }
        accepted
    })
}
