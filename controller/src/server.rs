//! Wiring: opens the store and registry, starts gRPC, HTTP and the rollout reconciler, and shuts them down.
//! This is the single place where listeners are set up, so TLS plugs in here.

use std::future::Future;
use std::sync::Arc;

use alki_shared::proto::admin_service_server::AdminServiceServer;
use alki_shared::proto::agent_service_server::AgentServiceServer;
use alki_shared::proto::enrollment_service_server::EnrollmentServiceServer;
use alki_shared::proto::fleet_service_server::FleetServiceServer;
use alki_shared::proto::insight_service_server::InsightServiceServer;
use alki_shared::proto::security_service_server::SecurityServiceServer;
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::auth::Authenticator;
use crate::config::ControllerConfig;
use crate::fleet::Fleet;
use crate::registry::Registry;
use crate::rollout;
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
    let store =
        Store::open(&config.data_dir).with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    crate::pki::install_crypto_provider();
    let pki = crate::pki::Pki::load_or_create(&config.data_dir, &config.pki).context("setting up the controller CA")?;
    let auth = Authenticator::new(store.clone()).with_device_tokens(pki.clone());
    if let Some(path) = auth.bootstrap_admin(&config.data_dir)? {
        tracing::info!(path = %path.display(), "First start: wrote the bootstrap admin token.");
    }
    // Every call passes the gate (authentication by table, rate limits, audit) before any handler.
    let limits = config.limits.clone();
    let gate = crate::audit::Gate {
        auth: auth.clone(),
        auditor: crate::audit::Auditor::start(store.clone(), config.audit_retention),
        token_limiter: Arc::new(crate::limits::RateLimiter::new(limits.token_rate)),
    };
    let admin_api = api::admin::AdminApi { auth: auth.clone(), store: store.clone() };
    let registry = Arc::new(
        Registry::open(&config.data_dir, store.database(), config.registry.clone()).context("opening the registry")?,
    );
    let http_addr = listeners.http.local_addr()?;
    let registry_host = config.registry_host.clone().unwrap_or_else(|| http_addr.to_string());
    let fleet = Fleet::new(store);

    let stop = CancellationToken::new();
    let reconciler_stop = Arc::new(tokio::sync::Notify::new());
    let reconciler = tokio::spawn(rollout::reconcile_loop(fleet.clone(), reconciler_stop.clone()));
    let rollup_flush = tokio::spawn(crate::insight::flush_loop(fleet.clone(), stop.clone()));
    let dashboard = api::dashboard::DashboardState {
        fleet: fleet.clone(),
        auth: auth.clone(),
        registry: registry.clone(),
        trusted_keys: config.trusted_keys.clone().into(),
    };

    let (report_writer, report_writer_task) = crate::fleet::reports::ReportWriter::start(fleet.clone());
    let agent_api = api::agent::AgentApi {
        fleet: fleet.clone(),
        auth: auth.clone(),
        heartbeat_interval: config.heartbeat_interval,
        pki: pki.clone(),
        insecure_agent_tokens: config.insecure_agent_tokens,
        device_limiter: Arc::new(crate::limits::RateLimiter::new(limits.device_rate)),
        reports: report_writer,
    };
    let enroll_api = api::enroll::EnrollApi { fleet: fleet.clone(), pki: pki.clone() };
    let security_api = api::security::SecurityApi { fleet: fleet.clone(), auth: auth.clone() };
    let token_refresher = tokio::spawn(api::enroll::refresh_registry_tokens(
        fleet.clone(),
        pki.clone(),
        config.heartbeat_interval,
        stop.clone(),
    ));
    let hub = fleet.hub.clone();
    let insight_api = api::insight::InsightApi {
        fleet: fleet.clone(),
        auth: auth.clone(),
        registry: registry.clone(),
        registry_host: registry_host.clone(),
    };
    let fleet_api = api::fleet::FleetApi {
        fleet,
        auth: auth.clone(),
        registry: registry.clone(),
        registry_host,
        external_registries: config.external_registries.clone().into(),
        trusted_keys: config.trusted_keys.clone().into(),
    };
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
    ] {
        health_reporter.set_service_status(service, tonic_health::ServingStatus::Serving).await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(alki_shared::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("the gRPC reflection service")?;
    let grpc_stop = stop.clone();
    let mut grpc = tonic::transport::Server::builder();
    if config.insecure_plaintext {
        tracing::warn!("Serving gRPC and HTTP WITHOUT TLS (--insecure-plaintext): use only on a loopback test bench.");
    } else {
        grpc = grpc.tls_config(crate::tls::grpc_config(&pki)).context("the gRPC listener's TLS settings")?;
    }
    let grpc = grpc
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .layer(crate::audit::GrpcGateLayer::new(gate.clone(), limits.grpc_max_message))
        .add_service(AgentServiceServer::new(agent_api).max_decoding_message_size(limits.session_max_message))
        .add_service(AdminServiceServer::new(admin_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(FleetServiceServer::new(fleet_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(InsightServiceServer::new(insight_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(EnrollmentServiceServer::new(enroll_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(SecurityServiceServer::new(security_api).max_decoding_message_size(limits.grpc_max_message))
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(nodelay(TcpListenerStream::new(listeners.grpc)), async move {
            grpc_stop.cancelled().await
        });

    let gc_schedule = tokio::spawn(registry.clone().run_gc_schedule(stop.clone()));
    let http_stop = stop.clone();
    let counted = dashboard.fleet.clone();
    let router = api::http::router(registry, auth)
        .merge(api::dashboard::router(dashboard))
        .layer(axum::middleware::from_fn_with_state(counted, crate::metrics::count_registry))
        .layer(axum::middleware::from_fn_with_state(gate, crate::audit::http_gate));
    let http_shutdown = async move { http_stop.cancelled().await };
    let http = async move {
        if config.insecure_plaintext {
            use axum::serve::ListenerExt as _;
            let listener = listeners.http.tap_io(|tcp| {
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY could not be set.");
                }
            });
            axum::serve(listener, router).with_graceful_shutdown(http_shutdown).await
        } else {
            let tls = crate::tls::http_config(&pki).map_err(std::io::Error::other)?;
            let listener = crate::tls::TlsListener::new(listeners.http, tls)?;
            axum::serve(listener, router).with_graceful_shutdown(http_shutdown).await
        }
    };

    tracing::info!(http = %http_addr, "Controller is serving.");
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("Shutting down.");
        trigger.cancel();
        // Agent sessions never end on their own: close them so the gRPC server's graceful shutdown can
        // finish. Agents reconnect to whichever controller comes back.
        let closed = hub.close_all();
        tracing::info!(sessions = closed, "Closed agent sessions.");
    });
    let (grpc_result, http_result) = tokio::join!(grpc, http);
    // What the agents reported last is written before the store is let go.
    report_writer_task.finish().await;
    reconciler_stop.notify_one();
    let _ = reconciler.await;
    let _ = gc_schedule.await;
    let _ = rollup_flush.await;
    let _ = token_refresher.await;
    grpc_result.context("gRPC server")?;
    http_result.context("HTTP server")?;
    Ok(())
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
