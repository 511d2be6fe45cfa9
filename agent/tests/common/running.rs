//! An agent running in-process against the scripted controller of [`super::controller`]: desired states down,
//! statuses awaited, a clean stop.

use std::net::SocketAddr;

use alki_agent::reference::BundleLocation;
use alki_agent::{Agent, Config};
use alki_shared::proto::{self, Phase, agent_message, controller_message};
use tokio::sync::mpsc;

use super::controller::{FakeController, next_where, status_with};

pub struct Running {
    pub front: SocketAddr,
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
    let front = agent.front_addr();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    let welcome =
        proto::Welcome { device_id: "pi-test".to_owned(), heartbeat_interval_seconds: 5, ..Default::default() };
    down.send(proto::ControllerMessage { msg: Some(controller_message::Msg::Welcome(welcome)) })
        .await
        .expect("welcome");
    Running { front, up, down, stop, task }
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

    pub async fn stop(self) {
        self.stop.send(()).expect("signal shutdown");
        self.task.await.expect("task").expect("clean exit");
    }
}
