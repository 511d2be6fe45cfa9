//! The whole agent (in process, fake llama-server, scripted controller) when the controller assigns nothing
//! (`serve_nothing`: llama-server stopped safely, 503 "no model is assigned", remembered across a restart)
//! and when the serving llama-server crashes in a loop (restarted with backoff, then reported as
//! ERROR_CODE_CRASH_LOOP naming the bundle and not restarted again).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_agent::reference::BundleLocation;
use alki_agent::runtime::record::process_identity;
use alki_agent::settings::RuntimeOverrides;
use alki_agent::state::{AgentState, Deployment, StateFile};
use alki_agent::{Agent, Config};
use alki_shared::digest::Digest;
use alki_shared::ids::{DeviceId, Generation};
use alki_shared::proto::{self, ErrorCode, Phase, agent_message, controller_message};
use common::controller::{FakeController, next_where, status_with};
use common::{fake_llama_server, fake_model, launch_settings};

const TOKEN: &str = "agent-secret";
const BOUND: Duration = Duration::from_secs(90);

fn bundle() -> BundleLocation {
    BundleLocation {
        registry: String::new(),
        repository: "acme/tiny".to_owned(),
        digest: Digest::of(b"bundle A"),
        tag: "v1".to_owned(),
    }
}

/// A data dir whose state says bundle A (a fake model with `knobs`) was active at generation 3.
fn prepared_data_dir(dir: &Path, knobs: &[&str]) -> PathBuf {
    let data_dir = dir.join("data");
    let model_dir = data_dir.join("bundles").join(Digest::of(b"variant A").hex());
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    let model = fake_model(&model_dir, "model-a.gguf", knobs);
    let mut state = AgentState::new(DeviceId::new("pi-faults").expect("id"));
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
    let trust = common::unsigned_trust_policy(dir);
    let text = format!(
        "data_dir = {data_dir:?}\ntrust_policy = {trust:?}\n[controller]\nurl = \"http://{controller}\"\n\
         insecure_plaintext = true\ntoken_file = {token_file:?}\n[runtime]\nllama_server = {llama:?}\n\
         front_addr = \"127.0.0.1:0\"\nhealth_timeout_secs = 15\ndrain_timeout_secs = 2\nwatch_window_secs = 0\n",
        llama = fake_llama_server(),
    );
    Config::from_toml(&text).expect("valid config")
}

/// Live fake llama-servers whose command line names a file under `data_dir`.
fn llama_servers(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process_identity(*pid).is_some())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("fake-llama-server") && cmdline.contains(&needle)
        })
        .collect()
}

async fn completion(front: SocketAddr) -> Option<String> {
    let response = reqwest::Client::new()
        .post(format!("http://{front}/completion"))
        .json(&serde_json::json!({"prompt": "Hi", "n_predict": 2}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body["content"].as_str().map(str::to_owned)
}

/// The front's answer when nothing serves: (status, Retry-After, error message).
async fn unserved(front: SocketAddr) -> (u16, Option<String>, String) {
    let response = reqwest::get(format!("http://{front}/v1/models")).await.expect("an answer, not a reset");
    let status = response.status().as_u16();
    let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (status, retry, body["error"]["message"].as_str().unwrap_or_default().to_owned())
}

struct Running {
    front: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), alki_agent::AgentError>>,
}

async fn run(config: Config) -> Running {
    let agent = Agent::start(config).await.expect("agent starts");
    let front = agent.front_addr();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    Running { front, stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("task").expect("clean exit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_nothing_stops_llama_server_answers_503_and_is_remembered_across_a_restart() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = prepared_data_dir(dir.path(), &[]);
        let (controller, mut up, mut downs) = FakeController::new(2, TOKEN);
        let controller_addr = controller.serve().await;
        let agent = run(config(dir.path(), &data_dir, controller_addr)).await;
        while !completion(agent.front).await.is_some_and(|c| c.contains("model-a.gguf")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let llama = llama_servers(&data_dir);
        assert_eq!(llama.len(), 1);
        next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await;

        let down = downs.remove(0);
        let nothing = proto::DesiredState { generation: 4, serve_nothing: true, ..Default::default() };
        down.send(proto::ControllerMessage { msg: Some(controller_message::Msg::DesiredState(nothing)) })
            .await
            .expect("send");
        let agent_message::Msg::Status(status) = next_where(&mut up, status_with(Phase::Active, 4)).await else {
            unreachable!()
        };
        assert_eq!(status.serving, None, "serving nothing");
        assert!(status.error.is_none());
        assert!(llama_servers(&data_dir).is_empty(), "llama-server was stopped");
        let logs: String = std::fs::read_dir(data_dir.join("logs"))
            .expect("logs")
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .collect();
        assert!(logs.contains("SIGTERM, exiting"), "stopped with the safe sequence: {logs}");
        let (code, retry, message) = unserved(agent.front).await;
        assert_eq!((code, retry.is_some()), (503, true));
        assert_eq!(message, "no model is assigned to this device");
        let state = StateFile::new(&data_dir).load().expect("state").expect("present");
        assert!(state.serve_nothing && state.active.is_none(), "{state:?}");
        assert_eq!(state.last_applied_generation, Generation(4));
        assert_eq!(state.previous.map(|p| p.bundle), Some(bundle()), "kept for a quick return");
        agent.stop().await;

        // Restarted: still nothing served, and it says why; the Hello reports nothing running.
        let agent = run(config(dir.path(), &data_dir, controller_addr)).await;
        let agent_message::Msg::Hello(hello) = next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await
        else {
            unreachable!()
        };
        assert_eq!((hello.running, hello.last_applied_generation), (None, 4));
        let (code, _, message) = unserved(agent.front).await;
        assert_eq!((code, message.as_str()), (503, "no model is assigned to this device"));
        assert!(llama_servers(&data_dir).is_empty(), "nothing was started");
        agent.stop().await;
        drop(downs);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_reported_as_such_naming_the_bundle_and_not_restarted_forever() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().expect("tempdir");
        // The smoke completion is the first; the first client request crashes the process (exit 139).
        let data_dir = prepared_data_dir(dir.path(), &["FAKE_LLAMA_CRASH_AFTER=1"]);
        let (controller, mut up, mut downs) = FakeController::new(1, TOKEN);
        let controller_addr = controller.serve().await;
        let agent = run(config(dir.path(), &data_dir, controller_addr)).await;
        let down = downs.remove(0);
        next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await;
        let welcome = proto::Welcome { heartbeat_interval_seconds: 1, ..Default::default() };
        down.send(proto::ControllerMessage { msg: Some(controller_message::Msg::Welcome(welcome)) })
            .await
            .expect("send");

        // Clients keep coming; each restart crashes on the next request.
        let front = agent.front;
        let load = tokio::spawn(async move {
            loop {
                let _ = completion(front).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let agent_message::Msg::Status(failed) = next_where(&mut up, status_with(Phase::Failed, 3)).await else {
            unreachable!()
        };
        load.abort();
        let error = failed.error.expect("error");
        assert_eq!(error.code, ErrorCode::CrashLoop as i32, "{}", error.message);
        assert!(error.message.contains("acme/tiny") && error.message.contains("crash loop"), "{}", error.message);
        assert_eq!(failed.bundle, Some(bundle().to_proto()), "the status names the bundle");
        assert_eq!(failed.serving, None);

        // Not restarted again: two heartbeats later (the loop is idle), no llama-server runs.
        for _ in 0..2 {
            next_where(&mut up, |m| matches!(m, agent_message::Msg::Heartbeat(_))).await;
        }
        assert!(llama_servers(&data_dir).is_empty(), "no restart after the crash loop");
        let (code, retry, _) = unserved(front).await;
        assert_eq!((code, retry.is_some()), (503, true));
        let logs: String = std::fs::read_dir(data_dir.join("logs"))
            .expect("logs")
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .collect();
        assert!(logs.matches("FAKE_LLAMA_CRASH_AFTER").count() >= 3, "it crashed (and was restarted) 3 times");
        let state = StateFile::new(&data_dir).load().expect("state").expect("present");
        assert!(state.active.is_none(), "marked bad: a restart of the agent does not start it again");
        agent.stop().await;
        drop(down);
    })
    .await
    .expect("test timed out");
}
