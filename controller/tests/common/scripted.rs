//! A whole controller on 127.0.0.1:0 over plaintext gRPC with scripted agents (role-agent tokens): a tiny
//! bundle packed, pushed and signed with alkictl's code, rollouts created through FleetService, agents that
//! report what a test scripts. Restartable on the same data directory.

use std::time::Duration;

use alki_bundle::Remote;
use alki_controller::config::ControllerConfig;
use alki_e2e::tiny_bundle::push_tiny_bundle;
use alki_shared::proto::{
    self, AgentMessage, ControllerMessage, agent_message, agent_service_client::AgentServiceClient,
    controller_message::Msg, fleet_service_client::FleetServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Controller {
    pub dir: tempfile::TempDir,
    pub grpc: String,
    pub registry: String,
    pub admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn start(dir: tempfile::TempDir) -> Controller {
    start_with(dir, |_| {}).await
}

/// [`start`] with the configuration changed by `configure` first.
pub async fn start_with(dir: tempfile::TempDir, configure: impl FnOnce(&mut ControllerConfig)) -> Controller {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(dir.path().to_owned());
    // Rollout candidates must be signed by a trusted key; push_bundle signs with this one.
    config.trusted_keys = vec![signing_key().public_key().clone()];
    // A scripted agent over plaintext with a token of role agent: the TLS and enrollment paths are
    // covered by tests/enroll.rs and e2e/tests/enrollment.rs.
    config.insecure_plaintext = true;
    config.insecure_agent_tokens = true;
    config.heartbeat_interval = Duration::from_secs(1);
    configure(&mut config);
    let task = tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        let _ = stopped.await;
    }));
    let admin = super::admin_token(dir.path()).await;
    Controller {
        dir,
        grpc: format!("http://{grpc_addr}"),
        registry: http_addr.to_string(),
        admin,
        stop: Some(stop),
        task,
    }
}

impl Controller {
    pub async fn shutdown(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(TIMEOUT, &mut self.task).await.expect("shuts down").expect("join").expect("serve ok");
        self.dir
    }
}

pub fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    request
}

pub async fn fleet(c: &Controller) -> FleetServiceClient<Channel> {
    FleetServiceClient::connect(c.grpc.clone()).await.expect("connect fleet")
}

/// Packs a tiny model, pushes it to the controller's registry as acme/tiny:<tag> and signs it with
/// [`signing_key`]; returns its digest.
pub async fn push_bundle(c: &Controller, tag: &str, seed: u64) -> String {
    let digest = push_tiny_bundle(&c.registry, "acme/tiny", &c.admin, tag, seed).await.expect("push");
    let remote = Remote::with_token(c.registry.clone(), "acme/tiny".into(), Some(c.admin.clone()), true);
    alki_bundle::sign::sign(&remote, tag, signing_key()).await.expect("sign");
    digest.to_string()
}

pub struct FakeAgent {
    pub tx: mpsc::Sender<AgentMessage>,
    pub rx: tonic::Streaming<ControllerMessage>,
}

pub async fn connect_agent(
    c: &Controller,
    token: &str,
    device_id: &str,
    generation: u64,
    running: Option<proto::BundleRef>,
) -> FakeAgent {
    let mut client = AgentServiceClient::connect(c.grpc.clone()).await.expect("connect agent");
    let (tx, rx) = mpsc::channel(16);
    let hello = proto::Hello {
        device_id: device_id.into(),
        agent_version: "test".into(),
        labels: [("site".to_owned(), "lab".to_owned())].into(),
        last_applied_generation: generation,
        running,
        ..Default::default()
    };
    tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await.expect("hello");
    let response = client.session(with_token(token, ReceiverStream::new(rx))).await.expect("session");
    FakeAgent { tx, rx: response.into_inner() }
}

impl FakeAgent {
    pub async fn next(&mut self) -> Msg {
        let message = tokio::time::timeout(TIMEOUT, self.rx.message()).await.expect("message in time");
        message.expect("stream ok").expect("stream open").msg.expect("message body")
    }

    pub async fn report(&self, status: proto::Status) {
        self.tx.send(AgentMessage { msg: Some(agent_message::Msg::Status(status)) }).await.expect("status");
    }
}

pub async fn create_token(c: &Controller, name: &str, role: proto::Role) -> String {
    let request = proto::CreateTokenRequest {
        name: name.into(),
        role: role as i32,
        repositories: if role == proto::Role::Push { vec!["*".into()] } else { vec![] },
    };
    fleet(c).await.create_token(with_token(&c.admin, request)).await.expect("token").into_inner().token
}

pub async fn wait_rollout(c: &Controller, id: &str, done: impl Fn(&proto::Rollout) -> bool) -> proto::Rollout {
    let mut client = fleet(c).await;
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let request = with_token(&c.admin, proto::GetRolloutRequest { id: id.into() });
            let r = client.get_rollout(request).await.expect("get").into_inner();
            if done(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("rollout reaches the state")
}

/// A rollout of acme/tiny:v1 to the devices labelled site=lab.
pub async fn create_lab_rollout(c: &Controller, client: &mut FleetServiceClient<Channel>) -> proto::Rollout {
    let spec = proto::RolloutSpec {
        repository: "acme/tiny".into(),
        candidate: "v1".into(),
        selector: [("site".to_owned(), "lab".to_owned())].into(),
        ..Default::default()
    };
    let request = with_token(&c.admin, proto::CreateRolloutRequest { spec: Some(spec), ..Default::default() });
    client.create_rollout(request).await.expect("create").into_inner()
}

pub fn completed(r: &proto::Rollout) -> bool {
    r.state == proto::RolloutState::Completed as i32
}

/// The fleet's signing key for this test binary: rollouts of bundles it signed are accepted.
pub fn signing_key() -> &'static alki_shared::signing::SigningKey {
    static KEY: std::sync::OnceLock<alki_shared::signing::SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| alki_shared::signing::SigningKey::generate().expect("signing key"))
}
