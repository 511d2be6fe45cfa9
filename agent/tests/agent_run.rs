//! The whole agent with the fake llama-server: it serves what was active before a restart without any
//! controller, and talks the session protocol to a scripted fake controller.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_agent::reference::BundleLocation;
use alki_agent::settings::RuntimeOverrides;
use alki_agent::state::{AgentState, Deployment, StateFile};
use alki_agent::{Agent, Config};
use alki_shared::digest::Digest;
use alki_shared::ids::{DeviceId, Generation};
use alki_shared::proto::{self, ErrorCode, Phase, agent_message, controller_message};
use common::{TEST_TIMEOUT, fake_llama_server, fake_model, launch_settings};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const TOKEN: &str = "agent-secret";

fn bundle() -> BundleLocation {
    BundleLocation {
        registry: String::new(),
        repository: "acme/tiny".to_owned(),
        digest: Digest::of(b"bundle A"),
        tag: "v1".to_owned(),
    }
}

/// A data dir whose state says bundle A (a fake model) was active at generation 3.
fn prepared_data_dir(dir: &Path) -> PathBuf {
    let data_dir = dir.join("data");
    let model_dir = data_dir.join("bundles").join(Digest::of(b"variant A").hex());
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    let model = fake_model(&model_dir, "model-a.gguf", &[]);
    let mut state = AgentState::new(DeviceId::new("pi-test").expect("id"));
    state.active = Some(Deployment {
        bundle: bundle(),
        variant_digest: Digest::of(b"variant A"),
        model_files: vec![model],
        overrides: RuntimeOverrides::default(),
        launch: launch_settings(),
        generation: Generation(3),
    });
    state.last_applied_generation = Generation(3);
    StateFile::new(&data_dir).save(&state).expect("save state");
    data_dir
}

fn config(dir: &Path, data_dir: &Path, controller: SocketAddr) -> Config {
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let text = format!(
        r#"
data_dir = {data_dir:?}
labels = {{ site = "lab", class = "test-class" }}
[controller]
url = "http://{controller}"
token_file = {token_file:?}
[runtime]
llama_server = {llama:?}
front_addr = "127.0.0.1:0"
health_timeout_secs = 15
drain_timeout_secs = 2
"#,
        llama = fake_llama_server(),
    );
    Config::from_toml(&text).expect("valid config")
}

async fn completion(front: SocketAddr) -> Option<String> {
    let response = reqwest::Client::new()
        .post(format!("http://{front}/completion"))
        .json(&serde_json::json!({"prompt": "Hi", "n_predict": 2}))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body["content"].as_str().map(str::to_owned)
}

async fn wait_until_served(front: SocketAddr) -> String {
    loop {
        if let Some(content) = completion(front).await {
            return content;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_logs(data_dir: &Path) -> String {
    std::fs::read_dir(data_dir.join("logs"))
        .map(|entries| entries.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_previously_active_bundle_without_a_controller_and_stops_cleanly() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = prepared_data_dir(dir.path());
        // Nothing listens on this port: the controller is unreachable.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let agent = Agent::start(config(dir.path(), &data_dir, closed)).await.expect("agent starts");
        assert_eq!(agent.device_id().as_str(), "pi-test", "the id comes from the state file");
        let front = agent.front_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(agent.run(async move {
            let _ = stop_rx.await;
        }));

        let content = wait_until_served(front).await;
        assert!(content.contains("model-a.gguf"), "{content}");

        stop_tx.send(()).expect("signal shutdown");
        running.await.expect("task").expect("clean exit");
        assert!(reqwest::get(format!("http://{front}/health")).await.is_err(), "the front port is closed");
        assert!(read_logs(&data_dir).contains("SIGTERM, exiting"), "llama-server got the safe stop");
    })
    .await
    .expect("test timed out");
}

/// A scripted controller: forwards what agents send to `up`, sends what the test pushes into the session.
struct FakeController {
    up: mpsc::Sender<proto::AgentMessage>,
    /// One receiver per session, in order; a session ends when the test drops the matching sender.
    down: tokio::sync::Mutex<std::collections::VecDeque<mpsc::Receiver<proto::ControllerMessage>>>,
}

impl FakeController {
    /// A controller for `sessions` sessions: messages up, and one sender per session down.
    fn new(
        sessions: usize,
    ) -> (Self, mpsc::Receiver<proto::AgentMessage>, Vec<mpsc::Sender<proto::ControllerMessage>>) {
        let (up, up_rx) = mpsc::channel(64);
        let (senders, receivers): (Vec<_>, std::collections::VecDeque<_>) =
            (0..sessions).map(|_| mpsc::channel(16)).unzip();
        (FakeController { up, down: tokio::sync::Mutex::new(receivers) }, up_rx, senders)
    }

    async fn serve(self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind controller");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(proto::agent_service_server::AgentServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("controller server");
        });
        addr
    }
}

#[tonic::async_trait]
impl proto::agent_service_server::AgentService for FakeController {
    type SessionStream = ReceiverStream<Result<proto::ControllerMessage, tonic::Status>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<proto::AgentMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if auth != format!("Bearer {TOKEN}") {
            return Err(tonic::Status::unauthenticated("bad token"));
        }
        let mut down =
            self.down.lock().await.pop_front().ok_or_else(|| tonic::Status::unavailable("no more sessions"))?;
        let mut inbound = request.into_inner();
        let up = self.up.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(m)) => { let _ = up.send(m).await; }
                        _ => return,
                    },
                    out = down.recv() => match out {
                        Some(m) => { let _ = tx.send(Ok(m)).await; }
                        None => return,
                    },
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

async fn next_where(
    up: &mut mpsc::Receiver<proto::AgentMessage>,
    mut wanted: impl FnMut(&agent_message::Msg) -> bool,
) -> agent_message::Msg {
    loop {
        let message = up.recv().await.expect("agent stream open");
        if let Some(msg) = message.msg
            && wanted(&msg)
        {
            return msg;
        }
    }
}

fn status_with(up_phase: Phase, generation: u64) -> impl FnMut(&agent_message::Msg) -> bool {
    move |m| matches!(m, agent_message::Msg::Status(s) if s.generation == generation && s.phase == up_phase as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talks_to_the_controller_and_converges() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = prepared_data_dir(dir.path());
        let (controller, mut up, mut downs) = FakeController::new(1);
        let down = downs.remove(0);
        let controller_addr = controller.serve().await;

        let agent = Agent::start(config(dir.path(), &data_dir, controller_addr)).await.expect("agent starts");
        let front = agent.front_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(agent.run(async move {
            let _ = stop_rx.await;
        }));

        let agent_message::Msg::Hello(hello) = next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await
        else {
            unreachable!()
        };
        assert_eq!(hello.device_id, "pi-test");
        assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hello.last_applied_generation, 3);
        assert_eq!(hello.labels.get("site").map(String::as_str), Some("lab"));
        let inventory = hello.inventory.expect("inventory");
        assert_eq!(inventory.hardware_class, "test-class");
        assert!(inventory.memory_total_bytes > 0);

        let send = |msg| {
            let down = down.clone();
            async move { down.send(proto::ControllerMessage { msg: Some(msg) }).await.expect("controller sends") }
        };
        send(controller_message::Msg::Welcome(proto::Welcome {
            device_id: "pi-test".to_owned(),
            heartbeat_interval_seconds: 1,
        }))
        .await;
        // Heartbeats follow the Welcome's interval; telemetry starts right away. Either may come first.
        let (mut heartbeat, mut telemetry) = (false, false);
        while !(heartbeat && telemetry) {
            match next_where(&mut up, |_| true).await {
                agent_message::Msg::Heartbeat(_) => heartbeat = true,
                agent_message::Msg::Telemetry(t) => {
                    assert!(t.memory_available_bytes > 0);
                    telemetry = true;
                }
                _ => {}
            }
        }

        // The bundle it already serves, with the same settings: ACTIVE at once, no restart.
        let same = proto::DesiredState {
            generation: 4,
            bundle: Some(bundle().to_proto()),
            runtime: None,
            rollout_id: "ro-1".to_owned(),
            cohort: "A".to_owned(),
        };
        send(controller_message::Msg::DesiredState(same)).await;
        let agent_message::Msg::Status(active) = next_where(&mut up, status_with(Phase::Active, 4)).await else {
            unreachable!()
        };
        assert_eq!(active.serving, Some(bundle().to_proto()));
        assert_eq!(active.variant_digest, Digest::of(b"variant A").to_string());
        assert!(wait_until_served(front).await.contains("model-a.gguf"));

        // A bundle from a registry nobody answers on: PULLING, then FAILED while A keeps serving.
        let mut unreachable_bundle = bundle();
        unreachable_bundle.registry = "127.0.0.1:1".to_owned();
        unreachable_bundle.digest = Digest::of(b"bundle B");
        let other =
            proto::DesiredState { generation: 5, bundle: Some(unreachable_bundle.to_proto()), ..Default::default() };
        send(controller_message::Msg::DesiredState(other)).await;
        next_where(&mut up, status_with(Phase::Pulling, 5)).await;
        let agent_message::Msg::Status(failed) = next_where(&mut up, status_with(Phase::Failed, 5)).await else {
            unreachable!()
        };
        let error = failed.error.expect("error set");
        assert_eq!(error.code, ErrorCode::PullFailed as i32, "{}", error.message);
        assert!(error.message.contains("127.0.0.1:1"), "{}", error.message);
        assert_eq!(failed.serving, Some(bundle().to_proto()), "the previous bundle still serves");
        assert!(completion(front).await.is_some_and(|c| c.contains("model-a.gguf")));

        // An invalid reference fails visibly rather than being dropped.
        let invalid = proto::DesiredState { generation: 6, bundle: None, ..Default::default() };
        send(controller_message::Msg::DesiredState(invalid)).await;
        let agent_message::Msg::Status(invalid) = next_where(&mut up, status_with(Phase::Failed, 6)).await else {
            unreachable!()
        };
        assert_eq!(invalid.error.map(|e| e.code), Some(ErrorCode::BundleInvalid as i32));

        stop_tx.send(()).expect("signal shutdown");
        running.await.expect("task").expect("clean exit");
        let state = StateFile::new(&data_dir).load().expect("state").expect("present");
        assert_eq!(state.last_applied_generation, Generation(6));
        assert_eq!(state.active.map(|a| a.bundle), Some(bundle()));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_with_a_new_hello_after_the_controller_drops_the_session() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = prepared_data_dir(dir.path());
        let (controller, mut up, mut downs) = FakeController::new(2);
        let controller_addr = controller.serve().await;
        let agent = Agent::start(config(dir.path(), &data_dir, controller_addr)).await.expect("agent starts");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(agent.run(async move {
            let _ = stop_rx.await;
        }));

        next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await;
        drop(downs.remove(0)); // The controller ends the first session.
        let agent_message::Msg::Hello(again) = next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await
        else {
            unreachable!()
        };
        assert_eq!(again.device_id, "pi-test");
        assert_eq!(again.last_applied_generation, 3);

        stop_tx.send(()).expect("signal shutdown");
        running.await.expect("task").expect("clean exit");
    })
    .await
    .expect("test timed out");
}
