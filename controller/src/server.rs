//! Wiring: opens the store and registry, starts gRPC, HTTP and the rollout reconciler, and shuts them down.
//! This is the single place where listeners are set up, so TLS plugs in here.

use std::future::Future;
use std::sync::Arc;

use alki_shared::proto::agent_service_server::AgentServiceServer;
use alki_shared::proto::fleet_service_server::FleetServiceServer;
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

/// Largest gRPC message accepted from anyone.
const MAX_GRPC_MESSAGE: usize = 4 << 20;

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
    let auth = Authenticator::new(store.clone());
    if let Some(path) = auth.bootstrap_admin(&config.data_dir)? {
        tracing::info!(path = %path.display(), "First start: wrote the bootstrap admin token.");
    }
    let registry = Arc::new(
        Registry::open(&config.data_dir, store.database(), config.registry.clone()).context("opening the registry")?,
    );
    let http_addr = listeners.http.local_addr()?;
    let registry_host = config.registry_host.clone().unwrap_or_else(|| http_addr.to_string());
    let fleet = Fleet::new(store);

    let stop = CancellationToken::new();
    let reconciler_stop = Arc::new(tokio::sync::Notify::new());
    let reconciler = tokio::spawn(rollout::reconcile_loop(fleet.clone(), reconciler_stop.clone()));

    let agent_api = api::agent::AgentApi {
        fleet: fleet.clone(),
        auth: auth.clone(),
        heartbeat_interval: config.heartbeat_interval,
    };
    let hub = fleet.hub.clone();
    let fleet_api = api::fleet::FleetApi {
        fleet,
        auth: auth.clone(),
        registry: registry.clone(),
        registry_host,
        external_registries: config.external_registries.clone().into(),
    };
    let grpc_stop = stop.clone();
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(AgentServiceServer::new(agent_api).max_decoding_message_size(MAX_GRPC_MESSAGE))
        .add_service(FleetServiceServer::new(fleet_api).max_decoding_message_size(MAX_GRPC_MESSAGE))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listeners.grpc),
            async move { grpc_stop.cancelled().await },
        );

    let gc_schedule = tokio::spawn(registry.clone().run_gc_schedule(stop.clone()));
    let http_stop = stop.clone();
    let http = axum::serve(listeners.http, api::http::router(registry, auth))
        .with_graceful_shutdown(async move { http_stop.cancelled().await });

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
    reconciler_stop.notify_one();
    let _ = reconciler.await;
    let _ = gc_schedule.await;
    grpc_result.context("gRPC server")?;
    http_result.context("HTTP server")?;
    Ok(())
}
