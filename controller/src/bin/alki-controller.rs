//! alki-controller: parses flags, binds listeners, and runs the controller until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

#[derive(Parser)]
#[command(name = "alki-controller", version = alki_shared::build::LONG_VERSION, about = "Alki Fleet control plane.")]
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
    /// How long a command to an offline device (bench run, calibrate, eval run, restart-runtime, reverify)
    /// waits for the device's return before it is dropped, e.g. `24h`, `90m`.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    command_queue_ttl: Duration,
    /// How long a web console login (/ui/) lasts before the console asks for the token again, e.g. `8h`.
    #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
    console_session_ttl: Duration,
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
    /// A TOML file with one `[[registry]]` table per external registry (host, plain_http, username,
    /// password_file), for registries that each need their own transport or login.
    #[arg(long, env = "ALKI_EXTERNAL_REGISTRIES_FILE")]
    external_registries_file: Option<PathBuf>,
    /// A TOML file naming the external gates rollouts may use: the Prometheus query gates ask and the
    /// webhook gates (url, secret_file) that approve or reject each step. See README "External gates".
    #[arg(long, env = "ALKI_GATES_FILE")]
    gates_file: Option<PathBuf>,
    /// Log as JSON lines (for log shippers) instead of text.
    #[arg(long)]
    log_json: bool,
    /// A public key (PEM, from `alkictl key generate` or cosign) rollout candidates must be signed with.
    /// Repeatable. Without any, every rollout needs --override-signature-check.
    #[arg(long = "trusted-key", env = "ALKI_TRUSTED_KEYS", value_delimiter = ',')]
    trusted_keys: Vec<PathBuf>,
    /// Serve gRPC and HTTP without TLS. Only for a test bench on loopback: tokens and models cross in clear.
    #[arg(long, env = "ALKI_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// Also admit agent sessions with a bearer token of role agent instead of a device certificate, trusting
    /// the device id they claim. Only for the fleet simulator.
    #[arg(long)]
    insecure_agent_tokens: bool,
    /// Label keys devices may set themselves (their agent.toml `labels`, e.g. `zone`): rollouts select by
    /// these reported values unless the enrollment token or an operator sets the key. Other reported labels
    /// are only shown, so a device cannot join a selector by claiming a label.
    #[arg(long, env = "ALKI_DEVICE_OWNED_LABEL_KEYS", value_delimiter = ',')]
    device_owned_label_keys: Vec<String>,
    /// Your own CA certificate (PEM) to issue device and server certificates with (with --ca-key); default:
    /// <data-dir>/pki/ca.crt, generated on first start.
    #[arg(long, env = "ALKI_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, env = "ALKI_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The listeners' certificate (PEM, with --tls-key); default: one issued by the CA at every start.
    #[arg(long, env = "ALKI_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "ALKI_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A DNS name or IP address agents and alkictl reach the controller by, put in the issued server
    /// certificate. Repeatable; default: localhost, 127.0.0.1, ::1 and this host's name.
    #[arg(long = "tls-name", env = "ALKI_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// How long device certificates are valid; agents renew them at two thirds of it.
    #[arg(long, env = "ALKI_DEVICE_CERT_VALIDITY_SECS", default_value_t = 30 * 24 * 3600)]
    device_cert_validity_secs: u64,
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
    config.command_queue_ttl = args.command_queue_ttl;
    config.console_session_ttl = args.console_session_ttl;
    config.registry.gc_interval = Duration::from_secs(args.registry_gc_interval_secs);
    config.registry.gc_grace = Duration::from_secs(args.registry_gc_grace_secs);
    config.insecure_plaintext = args.insecure_plaintext;
    config.insecure_agent_tokens = args.insecure_agent_tokens;
    config.label_trust = alki_controller::facts::LabelTrust { device_owned: args.device_owned_label_keys.clone() };
    config.pki = alki_controller::pki::PkiConfig {
        ca: args.ca_cert.clone().zip(args.ca_key.clone()),
        server: args.tls_cert.clone().zip(args.tls_key.clone()),
        server_names: if args.tls_names.is_empty() {
            alki_controller::pki::PkiConfig::default_server_names()
        } else {
            args.tls_names.clone()
        },
        device_cert_validity: Duration::from_secs(args.device_cert_validity_secs.max(1)),
    };
    let credentials = match (&args.external_registry_username, &args.external_registry_password_file) {
        (Some(user), Some(file)) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read --external-registry-password-file {}", file.display()))?;
            Some((user.clone(), password.trim().to_owned()))
        }
        _ => None,
    };
    for host in &args.external_registries {
        alki_controller::config::check_registry_host(host).map_err(|e| anyhow::anyhow!("--external-registry {e}"))?;
        config.external_registries.push(alki_controller::config::ExternalRegistry {
            host: host.clone(),
            plain_http: args.external_registry_plain_http,
            credentials: credentials.clone(),
        });
    }
    if let Some(file) = &args.external_registries_file {
        for registry in alki_controller::config::load_external_registries(file).map_err(anyhow::Error::msg)? {
            if config.external_registries.iter().any(|r| r.host == registry.host) {
                anyhow::bail!(
                    "external registry {:?} is named both by --external-registry and in {}; keep one",
                    registry.host,
                    file.display()
                );
            }
            config.external_registries.push(registry);
        }
    }
    if let Some(file) = &args.gates_file {
        config.gates = alki_controller::config::load_gates(file).map_err(anyhow::Error::msg)?;
    }
    for path in &args.trusted_keys {
        let key =
            alki_shared::signing::PublicKey::load(path).with_context(|| format!("--trusted-key {}", path.display()))?;
        tracing::info!(key = %path.display(), fingerprint = key.fingerprint(), "Trusting signing key.");
        config.trusted_keys.push(key);
    }
    if config.trusted_keys.is_empty() {
        tracing::warn!("No --trusted-key: every rollout will need --override-signature-check.");
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
