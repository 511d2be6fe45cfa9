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
use common::controller::{FakeController, next_where, status_with};
use common::{TEST_TIMEOUT, fake_llama_server, fake_model, launch_settings};

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
    Config::from_toml(&config_text(dir, data_dir, controller)).expect("valid config")
}

fn config_text(dir: &Path, data_dir: &Path, controller: SocketAddr) -> String {
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let trust = common::unsigned_trust_policy(dir);
    let text = format!(
        r#"
data_dir = {data_dir:?}
trust_policy = {trust:?}
labels = {{ site = "lab", class = "test-class" }}
[controller]
url = "http://{controller}"
insecure_plaintext = true
token_file = {token_file:?}
[runtime]
llama_server = {llama:?}
front_addr = "127.0.0.1:0"
health_timeout_secs = 15
drain_timeout_secs = 2
"#,
        llama = fake_llama_server(),
    );
    text
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talks_to_the_controller_and_converges() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = prepared_data_dir(dir.path());
        let (controller, mut up, mut downs) = FakeController::new(1, TOKEN);
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
        assert_eq!(hello.agent_version, alki_shared::build::LONG_VERSION);
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
            ..Default::default()
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
            ..Default::default()
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
        let (controller, mut up, mut downs) = FakeController::new(2, TOKEN);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_labels_in_the_config_file_reach_the_controller_without_a_restart() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = prepared_data_dir(dir.path());
        let (controller, mut up, downs) = FakeController::new(2, TOKEN);
        let controller_addr = controller.serve().await;
        let text = config_text(dir.path(), &data_dir, controller_addr);
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &text).expect("write config");
        let agent = Agent::start(Config::load(&path).expect("config")).await.expect("agent starts");
        let front = agent.front_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(agent.with_config_file(path.clone()).run(async move {
            let _ = stop_rx.await;
        }));
        let agent_message::Msg::Hello(first) = next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await
        else {
            unreachable!()
        };
        assert_eq!(first.labels.get("site").map(String::as_str), Some("lab"));

        // An invalid file is rejected: nothing changes, the model keeps serving.
        std::fs::write(&path, text.replace("drain_timeout_secs = 2", "drain_timeout_secs = 0")).expect("write");
        // A valid change of labels: a new session says so in its Hello.
        std::fs::write(&path, text.replace("site = \"lab\"", "site = \"shop-7\"")).expect("write");
        let agent_message::Msg::Hello(second) =
            next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await
        else {
            unreachable!()
        };
        assert_eq!(second.labels.get("site").map(String::as_str), Some("shop-7"));
        assert!(wait_until_served(front).await.contains("model-a.gguf"), "the model was not restarted away");

        stop_tx.send(()).expect("signal shutdown");
        running.await.expect("task").expect("clean exit");
        drop(downs);
    })
    .await
    .expect("test timed out");
}
