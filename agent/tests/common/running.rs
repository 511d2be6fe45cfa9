//! An agent running in-process against the scripted controller of [`super::controller`]: desired states down,
//! statuses awaited, a clean stop.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use alki_agent::reference::BundleLocation;
use alki_agent::{Agent, Config};
use alki_shared::proto::{self, Phase, agent_message, controller_message};
use tokio::sync::mpsc;

use super::controller::{FakeController, next_where, status_with};
use super::{fake_llama_server, unsigned_trust_policy};

pub struct Running {
    pub front: SocketAddr,
    /// The agent's own `/metrics`, when its config names `metrics_addr`.
    pub metrics: Option<SocketAddr>,
    pub up: mpsc::Receiver<proto::AgentMessage>,
    pub down: mpsc::Sender<proto::ControllerMessage>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), alki_agent::AgentError>>,
}

/// Starts the scripted controller (accepting `token`), then the agent with the config `config` makes for
/// that controller's address, and welcomes it as `pi-test`.
pub async fn start_agent(token: &str, config: impl FnOnce(SocketAddr) -> Config) -> Running {
    let (controller, up, mut downs) = FakeController::new(1, token);
    let down = downs.remove(0);
    let controller_addr = controller.serve().await;
    let agent = Agent::start(config(controller_addr)).await.expect("agent starts");
    let (front, metrics) = (agent.front_addr(), agent.metrics_addr());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    let welcome =
        proto::Welcome { device_id: "pi-test".to_owned(), heartbeat_interval_seconds: 5, ..Default::default() };
    down.send(proto::ControllerMessage { msg: Some(controller_message::Msg::Welcome(welcome)) })
        .await
        .expect("welcome");
    Running { front, metrics, up, down, stop, task }
}

/// [`start_agent`] with the [`config`] for the fake llama-server, `runtime_extra` in its `[runtime]` section.
pub async fn start_configured(dir: &Path, data_dir: &Path, token: &str, runtime_extra: &str) -> Running {
    start_agent(token, |controller| config(dir, data_dir, controller, token, runtime_extra)).await
}

impl Running {
    pub async fn desire(&self, generation: u64, bundle: &BundleLocation) {
        let desired = proto::DesiredState { generation, bundle: Some(bundle.to_proto()), ..Default::default() };
        self.down
            .send(proto::ControllerMessage { msg: Some(controller_message::Msg::DesiredState(desired)) })
            .await
            .expect("desired state");
    }

    pub async fn failed(&mut self, generation: u64) -> proto::Status {
        match next_where(&mut self.up, status_with(Phase::Failed, generation)).await {
            agent_message::Msg::Status(status) => status,
            _ => unreachable!("status_with matches statuses only"),
        }
    }

    /// Sends a controller command with `id`.
    pub async fn command(&self, id: &str, kind: proto::command::Kind) {
        let command = proto::Command { id: id.to_owned(), kind: Some(kind) };
        self.down
            .send(proto::ControllerMessage { msg: Some(controller_message::Msg::Command(command)) })
            .await
            .expect("command");
    }

    /// The benchmark report answering command `id`.
    pub async fn benchmark_report(&mut self, id: &str) -> proto::BenchmarkReport {
        let id = id.to_owned();
        match next_where(&mut self.up, move |m| matches!(m, agent_message::Msg::Benchmark(r) if r.command_id == id))
            .await
        {
            agent_message::Msg::Benchmark(report) => report,
            _ => unreachable!("matched benchmark reports only"),
        }
    }

    pub async fn stop(self) {
        self.stop.send(()).expect("signal shutdown");
        self.task.await.expect("task").expect("clean exit");
    }
}

/// An agent config for the fake llama-server and the scripted controller at `controller` (plain gRPC with
/// `token`, unsigned bundles allowed), with `runtime_extra` lines appended to its `[runtime]` section.
pub fn config(dir: &Path, data_dir: &Path, controller: SocketAddr, token: &str, runtime_extra: &str) -> Config {
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    let trust = unsigned_trust_policy(dir);
    let text = format!(
        r#"
data_dir = {data_dir:?}
trust_policy = {trust:?}
[controller]
url = "http://{controller}"
insecure_plaintext = true
token_file = {token_file:?}
[runtime]
llama_server = {llama:?}
front_addr = "127.0.0.1:0"
health_timeout_secs = 15
drain_timeout_secs = 2
{runtime_extra}
"#,
        llama = fake_llama_server(),
    );
    Config::from_toml(&text).expect("valid config")
}

/// The content of a completion through the front port, or None on any failure.
pub async fn completion(front: SocketAddr) -> Option<String> {
    let response = reqwest::Client::new()
        .post(format!("http://{front}/completion"))
        .json(&serde_json::json!({"prompt": "Hi", "n_predict": 2}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body["content"].as_str().map(str::to_owned)
}

/// Sends completions until one is served by `model` (the fake llama-server names its model file).
pub async fn until_served_by(front: SocketAddr, model: &str) {
    loop {
        if completion(front).await.is_some_and(|c| c.contains(model)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
