//! SIGKILL of the agent binary at every phase of a swap, then a restart: the agent ends up serving exactly
//! one healthy model (the desired one), no llama-server is left over (they outlive the killed agent by
//! design; the restarted one adopts or stops each from its record), and every file in the content store
//! matches its digest.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use alki_agent::reference::BundleLocation;
use alki_agent::settings::RuntimeOverrides;
use alki_agent::state::{AgentState, Deployment, StateFile};
use alki_agent::store::ContentStore;
use alki_shared::bundle::MEDIA_TYPE_WEIGHT_RAW;
use alki_shared::digest::Digest;
use alki_shared::ids::{DeviceId, Generation};
use alki_shared::oci::{ANNOTATION_TITLE, Descriptor, ImageManifest, MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_MANIFEST};
use alki_shared::proto::{self, Phase, agent_message, controller_message};
use common::controller::{FakeController, next_where};
use common::{fake_llama_server, fake_model, launch_settings};
use tokio::sync::mpsc;

const AGENT: &str = env!("CARGO_BIN_EXE_alki-agent");
const TOKEN: &str = "agent-secret";

/// Kills the agent if a test fails half-way.
struct Guard(Child);

impl Drop for Guard {
    /// SIGTERM first (bounded), so the agent stops its llama-server: a killed agent leaves it running by design.
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn location(digest: Digest) -> BundleLocation {
    BundleLocation {
        registry: "127.0.0.1:1".to_owned(),
        repository: "acme/tiny".to_owned(),
        digest,
        tag: String::new(),
    }
}

/// State with model A active, and bundle B (slow to load) in the content store; returns B's location.
async fn prepare(data_dir: &Path) -> BundleLocation {
    let variant = Digest::of(b"variant A");
    let model_dir = data_dir.join("bundles").join(variant.hex());
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    let mut state = AgentState::new(DeviceId::new("pi-kill").expect("id"));
    state.active = Some(Deployment {
        bundle: location(Digest::of(b"bundle A")),
        variant_digest: variant,
        model_files: vec![fake_model(&model_dir, "model-a.gguf", &[])],
        overrides: RuntimeOverrides::default(),
        launch: launch_settings(),
        generation: Generation(3),
    });
    state.last_applied_generation = Generation(3);
    StateFile::new(data_dir).save(&state).expect("state");

    let store = ContentStore::open(&data_dir.join("content")).expect("store");
    let weights = "FAKE-GGUF\nFAKE_LLAMA_LOAD_MS=1500\n";
    let gguf = Digest::of(weights.as_bytes());
    store.write_bytes(&gguf, weights.as_bytes()).await.expect("weights");
    let config = Digest::of(b"{}");
    store.write_bytes(&config, b"{}").await.expect("config");
    let mut layer = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, gguf, weights.len() as u64);
    layer.annotations.insert(ANNOTATION_TITLE.to_owned(), "model-b.gguf".to_owned());
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
        artifact_type: Some(alki_shared::bundle::ARTIFACT_TYPE_MODEL.to_owned()),
        config: Descriptor::new(MEDIA_TYPE_EMPTY, config, 2),
        layers: vec![layer],
        subject: None,
        annotations: Default::default(),
    };
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let digest = Digest::of(&bytes);
    store.write_bytes(&digest, &bytes).await.expect("manifest");
    location(digest)
}

fn write_config(dir: &Path, data_dir: &Path, controller: SocketAddr, front: u16) -> std::path::PathBuf {
    let token = dir.join("agent.token");
    std::fs::write(&token, TOKEN).expect("token");
    let trust = common::unsigned_trust_policy(dir);
    let text = format!(
        "data_dir = {data_dir:?}\ntrust_policy = {trust:?}\n[controller]\nurl = \"http://{controller}\"\ninsecure_plaintext = true\ntoken_file = {token:?}\n\
         [runtime]\nllama_server = {llama:?}\nfront_addr = \"127.0.0.1:{front}\"\ndrain_timeout_secs = 2\n\
         watch_window_secs = 0\n",
        llama = fake_llama_server(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// The agent's log, appended to across restarts, for a failure's message.
fn log_file(config: &Path) -> Stdio {
    let path = config.with_file_name("agent.log");
    std::fs::OpenOptions::new().create(true).append(true).open(path).map(Stdio::from).unwrap_or(Stdio::null())
}

/// Waits (bounded) for `condition`; on timeout fails with what the agents logged.
async fn wait_for(what: &str, dir: &Path, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        if tokio::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            let record = std::fs::read_to_string(dir.join("data/runtime.json")).unwrap_or_default();
            panic!("timed out waiting for {what}; runtime.json: {record}\nagent log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start(config: &Path) -> Guard {
    let child = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(log_file(config))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn alki-agent");
    Guard(child)
}

/// Live (not zombie) llama-server processes whose command line names a file under `data_dir`.
fn llama_servers(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alki_agent::runtime::record::process_identity(*pid).is_some())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("fake-llama-server") && cmdline.contains(&needle)
        })
        .collect()
}

async fn served_by(front: u16) -> Option<String> {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{front}/completion"))
        .json(&serde_json::json!({"prompt": "Hi", "n_predict": 2}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    body["content"].as_str().map(str::to_owned)
}

async fn send(down: &mpsc::Sender<proto::ControllerMessage>, msg: controller_message::Msg) {
    down.send(proto::ControllerMessage { msg: Some(msg) }).await.expect("controller sends");
}

/// Every blob's bytes hash to its name, and no temporary file is left.
fn check_store(data_dir: &Path) {
    let blobs = data_dir.join("content/blobs/sha256");
    for shard in std::fs::read_dir(&blobs).expect("blobs") {
        for entry in std::fs::read_dir(shard.expect("shard").path()).expect("shard dir") {
            let path = entry.expect("entry").path();
            let bytes = std::fs::read(&path).expect("read blob");
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            assert_eq!(Digest::of(&bytes).hex(), name, "blob {} matches its digest", path.display());
        }
    }
    let tmp = data_dir.join("content/tmp");
    assert!(std::fs::read_dir(&tmp).map(|mut d| d.next().is_none()).unwrap_or(true), "no temporary files");
}

async fn kill_at(phase: Phase) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let b = prepare(&data_dir).await;
    let (controller, mut up, mut downs) = FakeController::new(2, TOKEN);
    let controller_addr = controller.serve().await;
    let front = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let config = write_config(dir.path(), &data_dir, controller_addr, front);

    let mut agent = start(&config);
    let down = downs.remove(0);
    next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await;
    let desired = proto::DesiredState { generation: 4, bundle: Some(b.to_proto()), ..Default::default() };
    send(&down, controller_message::Msg::DesiredState(desired.clone())).await;
    next_where(&mut up, |m| matches!(m, agent_message::Msg::Status(s) if s.generation == 4 && s.phase == phase as i32))
        .await;
    agent.0.kill().expect("SIGKILL");
    agent.0.wait().expect("reap");

    // Restarted: the controller sends the same desired state again (it is level-based).
    let agent = start(&config);
    let down = downs.remove(0);
    next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await;
    send(&down, controller_message::Msg::DesiredState(desired)).await;
    let what = format!("B to be served after a kill at {}", phase.label());
    wait_for(&what, dir.path(), async || served_by(front).await.is_some_and(|c| c.contains("model-b.gguf"))).await;
    let what = format!("exactly one llama-server after a kill at {}", phase.label());
    wait_for(&what, dir.path(), async || llama_servers(&data_dir).len() == 1).await;
    let state = StateFile::new(&data_dir).load().expect("state").expect("present");
    assert_eq!(state.active.map(|a| a.bundle), Some(b), "B is active after a kill at {}", phase.label());
    check_store(&data_dir);
    // A stop stops llama-server (the agent's own or adopted).
    // SAFETY: kill(2) has no memory-safety preconditions; the agent is our unreaped child.
    unsafe { libc::kill(agent.0.id() as libc::pid_t, libc::SIGTERM) };
    wait_for("no llama-server after a stop", dir.path(), async || llama_servers(&data_dir).is_empty()).await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_every_phase_of_a_swap_then_a_restart_serves_one_healthy_model() {
    tokio::time::timeout(Duration::from_secs(120), async {
        for phase in [Phase::Pulling, Phase::Verifying, Phase::Starting, Phase::Active] {
            kill_at(phase).await;
        }
    })
    .await
    .expect("test timed out");
}
