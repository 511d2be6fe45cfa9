//! Shared by the registry's integration tests: the real registry router on 127.0.0.1:0 with push, agent and
//! admin tokens, a reqwest client, and the few requests every test makes.

#![allow(dead_code)] // Each test binary uses its own subset.

pub mod scripted;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use alki_controller::auth::{Authenticator, Role};
use alki_controller::registry::{self, Registry, RegistryConfig};
use alki_controller::store::Store;
use alki_shared::clock::SharedClock;
use alki_shared::digest::Digest;
use reqwest::{Method, StatusCode};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Every test runs under a timeout.
pub async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_TIMEOUT, test).await.expect("test timed out");
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    /// host:port of the router.
    pub addr: String,
    /// `http://host:port`.
    pub base: String,
    pub client: reqwest::Client,
    /// A push token (reads and writes); `req` uses it.
    pub push: String,
    /// An agent token (reads only).
    pub agent: String,
    pub admin: String,
    pub registry: Arc<Registry>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn start() -> Harness {
    start_with(RegistryConfig::default()).await
}

pub async fn start_with(config: RegistryConfig) -> Harness {
    start_with_clock(config, alki_shared::clock::system()).await
}

/// A registry reading time from `clock`, so a test can move it past a grace period instead of sleeping.
pub async fn start_with_clock(config: RegistryConfig, clock: SharedClock) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let auth = Authenticator::new(store.clone());
    let push = auth.create_token("ci", Role::Push, &["*".to_owned()]).expect("push token");
    let agent = auth.create_token("pi-1", Role::Agent, &[]).expect("agent token");
    let admin = auth.create_token("root", Role::Admin, &[]).expect("admin token");
    let registry = Arc::new(Registry::open_with_clock(dir.path(), store.database(), config, clock).expect("registry"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let app = registry::router(registry.clone(), auth, Arc::new(registry::access::NoFleet));
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    let base = format!("http://{addr}");
    Harness { dir, addr, base, client: reqwest::Client::new(), push, agent, admin, registry, server }
}

impl Harness {
    /// A request with the push token (which may read and write); `path` may be a full URL.
    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") { path.to_owned() } else { format!("{}{path}", self.base) };
        self.client.request(method, url).bearer_auth(&self.push)
    }

    /// Pushes a blob in one request and returns its digest.
    pub async fn push_blob(&self, repo: &str, content: &[u8]) -> Digest {
        let digest = Digest::of(content);
        let resp = self
            .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={digest}"))
            .body(content.to_vec())
            .send()
            .await
            .expect("push blob");
        assert_eq!(resp.status(), StatusCode::CREATED, "pushing a blob to {repo}");
        digest
    }

    pub async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> reqwest::Response {
        self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("put manifest")
    }
}

/// A whole controller (`alki_controller::serve`) on 127.0.0.1:0 with its defaults: TLS on both listeners with
/// the CA it generates, device sessions only with a device certificate.
pub struct SecureController {
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:<port>`.
    pub grpc: String,
    /// `127.0.0.1:<port>` of the HTTPS registry.
    pub registry: String,
    pub admin: String,
    /// The controller CA (PEM).
    pub ca_pem: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Waits for a starting controller to write `<data-dir>/admin.token` and returns it.
pub async fn admin_token(data_dir: &std::path::Path) -> String {
    alki_e2e::harness::admin_token(data_dir).await.expect("admin token written")
}

/// A controller started on 127.0.0.1:0 with `configure`d defaults, until its stop channel fires.
struct Started {
    dir: tempfile::TempDir,
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    admin: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start_controller(configure: impl FnOnce(&mut alki_controller::config::ControllerConfig)) -> Started {
    let dir = tempfile::tempdir().expect("tempdir");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = alki_controller::config::ControllerConfig::new(dir.path().to_owned());
    config.heartbeat_interval = Duration::from_secs(1);
    configure(&mut config);
    let task = tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        let _ = stopped.await;
    }));
    // The admin token is written after the CA: once it is there, both are.
    let admin = admin_token(dir.path()).await;
    Started { dir, grpc: grpc_addr, http: http_addr, admin, stop, task }
}

pub async fn start_secure(configure: impl FnOnce(&mut alki_controller::config::ControllerConfig)) -> SecureController {
    let Started { dir, grpc: grpc_addr, http: http_addr, admin, stop, task } = start_controller(configure).await;
    let ca_pem = std::fs::read_to_string(dir.path().join("pki/ca.crt")).expect("the CA is written on first start");
    SecureController {
        dir,
        grpc: format!("https://{grpc_addr}"),
        registry: http_addr.to_string(),
        admin,
        ca_pem,
        stop: Some(stop),
        task,
    }
}

impl SecureController {
    /// A channel over TLS trusting the controller CA, presenting `identity` (cert, key PEM) when given.
    pub async fn channel(
        &self,
        identity: Option<(&str, &str)>,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        tonic::transport::Channel::from_shared(self.grpc.clone()).expect("url").tls_config(tls)?.connect().await
    }

    /// An HTTPS client for the registry, trusting the controller CA.
    pub fn https(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("CA");
        reqwest::Client::builder().add_root_certificate(ca).build().expect("client")
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(TEST_TIMEOUT, &mut self.task).await.expect("shuts down").expect("join").expect("serve ok");
    }
}

/// A request carrying `Bearer <token>`.
pub fn bearer_request<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    request
}

/// A whole controller on 127.0.0.1:0 over plaintext, admitting agent sessions with role-agent tokens (the
/// scripted agents of in-process tests; TLS and enrollment have their own tests).
pub struct PlainController {
    pub dir: tempfile::TempDir,
    /// `http://127.0.0.1:<port>` of gRPC.
    pub grpc: String,
    /// `127.0.0.1:<port>` of the HTTP listener (registry, dashboard API, metrics).
    pub http: String,
    pub admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn start_plaintext(
    configure: impl FnOnce(&mut alki_controller::config::ControllerConfig),
) -> PlainController {
    let Started { dir, grpc: grpc_addr, http: http_addr, admin, stop, task } = start_controller(|config| {
        config.insecure_plaintext = true;
        config.insecure_agent_tokens = true;
        configure(config);
    })
    .await;
    PlainController {
        dir,
        grpc: format!("http://{grpc_addr}"),
        http: http_addr.to_string(),
        admin,
        stop: Some(stop),
        task,
    }
}

impl PlainController {
    /// Stops the controller and waits for it (connected agent sessions must have been dropped).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(TEST_TIMEOUT, &mut self.task).await.expect("shuts down").expect("join").expect("serve ok");
    }
}
