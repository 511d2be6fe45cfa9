//! alki-controller: parses flags, binds listeners, and runs the controller until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

#[derive(Parser)]
#[command(name = "alki-controller", version, about = "Alki Fleet control plane.")]
struct Args {
    /// Directory for the store, blobs and the bootstrap admin token.
    #[arg(long, env = "ALKI_DATA_DIR", default_value = "/var/lib/alki-controller")]
    data_dir: PathBuf,
    /// gRPC listen address (agents and alkictl).
    #[arg(long, env = "ALKI_GRPC_ADDR", default_value = "127.0.0.1:7070")]
    grpc_addr: SocketAddr,
    /// HTTP listen address (OCI registry under /v2/, /healthz, /readyz).
    #[arg(long, env = "ALKI_HTTP_ADDR", default_value = "127.0.0.1:7080")]
    http_addr: SocketAddr,
    /// host:port agents pull bundles from; defaults to --http-addr.
    #[arg(long, env = "ALKI_REGISTRY_HOST")]
    registry_host: Option<String>,
    /// Seconds between agent heartbeats.
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Seconds between registry garbage collections (deleting blobs no manifest references); 0 turns
    /// the schedule off (`alkictl registry gc` still runs one on request).
    #[arg(long, env = "ALKI_REGISTRY_GC_INTERVAL_SECS", default_value_t = 3600)]
    registry_gc_interval_secs: u64,
    /// Unreferenced blobs pushed, mounted or read within this many seconds are kept: make it longer than
    /// your slowest bundle push.
    #[arg(long, env = "ALKI_REGISTRY_GC_GRACE_SECS", default_value_t = 3600)]
    registry_gc_grace_secs: u64,
    /// An external OCI registry (`host:port`) rollouts may name by prefixing the repository with it
    /// (`alkictl rollout create --bundle host:port/acme/qwen:v2`); agents pull from it directly. Repeatable.
    #[arg(long = "external-registry", env = "ALKI_EXTERNAL_REGISTRIES", value_delimiter = ',')]
    external_registries: Vec<String>,
    /// Reach the external registries over plain HTTP instead of HTTPS.
    #[arg(long, env = "ALKI_EXTERNAL_REGISTRY_PLAIN_HTTP")]
    external_registry_plain_http: bool,
    /// Username for reading from the external registries (with --external-registry-password-file).
    #[arg(long, env = "ALKI_EXTERNAL_REGISTRY_USERNAME", requires = "external_registry_password_file")]
    external_registry_username: Option<String>,
    /// File holding the password or token for the external registries; anonymous reads without it.
    #[arg(long, env = "ALKI_EXTERNAL_REGISTRY_PASSWORD_FILE", requires = "external_registry_username")]
    external_registry_password_file: Option<PathBuf>,
    /// Log as JSON lines (for log shippers) instead of text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let grpc = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", args.grpc_addr))?;
    let http = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", args.http_addr))?;
    tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "Listening.");
    let mut config = alki_controller::config::ControllerConfig::new(args.data_dir);
    config.registry_host = args.registry_host;
    config.heartbeat_interval = Duration::from_secs(args.heartbeat_seconds.max(1));
    config.registry.gc_interval = Duration::from_secs(args.registry_gc_interval_secs);
    config.registry.gc_grace = Duration::from_secs(args.registry_gc_grace_secs);
    let credentials = match (&args.external_registry_username, &args.external_registry_password_file) {
        (Some(user), Some(file)) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read --external-registry-password-file {}", file.display()))?;
            Some((user.clone(), password.trim().to_owned()))
        }
        _ => None,
    };
    for host in &args.external_registries {
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            anyhow::bail!("--external-registry {host:?} must be host or host:port, without a scheme or path");
        }
        config.external_registries.push(alki_controller::config::ExternalRegistry {
            host: host.clone(),
            plain_http: args.external_registry_plain_http,
            credentials: credentials.clone(),
        });
    }
    alki_controller::serve(alki_controller::Listeners { grpc, http }, config, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
