//! A disk that fills up during a pull, on a real small filesystem (a 6 MiB tmpfs mounted for the test; it
//! needs root, as CI on a fresh Debian machine runs): the activation ends FAILED with ERROR_CODE_DISK_FULL and
//! a message saying so, nothing partial or corrupt is left in the content store, and the old model serves on.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alki_agent::reference::BundleLocation;
use alki_agent::settings::RuntimeOverrides;
use alki_agent::state::{AgentState, Deployment, StateFile};
use alki_agent::{Agent, Config};
use alki_shared::bundle::variant_annotations;
use alki_shared::bundle::{MEDIA_TYPE_RUNTIME, MEDIA_TYPE_WEIGHT_RAW};
use alki_shared::digest::Digest;
use alki_shared::ids::{DeviceId, Generation};
use alki_shared::oci::{
    ANNOTATION_TITLE, Descriptor, ImageIndex, ImageManifest, MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
};
use alki_shared::proto::{self, ErrorCode, Phase, agent_message, controller_message};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::controller::{FakeController, next_where, status_with};
use common::{fake_llama_server, fake_model, launch_settings};

const TOKEN: &str = "agent-secret";
const FS_SIZE: &str = "6m";
/// The new model's weights: fits the free space when the pull starts.
const WEIGHTS: usize = 4 << 20;

/// A tmpfs mounted on a directory for the test's life.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).expect("mkdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_SIZE}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs a real small filesystem: mounting a tmpfs failed ({}); run the tests as root \
             (CI on a fresh Debian machine does)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Mount(dir.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A minimal OCI registry serving manifests and blobs from memory.
#[derive(Default)]
struct Registry {
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    blobs: Mutex<HashMap<String, Bytes>>,
}

impl Registry {
    fn manifest(&self, media_type: &str, bytes: Vec<u8>) -> Digest {
        let digest = Digest::of(&bytes);
        self.manifests.lock().expect("lock").insert(digest.to_string(), (media_type.to_owned(), bytes.into()));
        digest
    }

    fn blob(&self, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        self.blobs.lock().expect("lock").insert(digest.to_string(), Bytes::copy_from_slice(bytes));
        digest
    }
}

async fn v2(State(registry): State<Arc<Registry>>, UrlPath(rest): UrlPath<String>, headers: HeaderMap) -> Response {
    if let Some((_, reference)) = rest.split_once("/manifests/") {
        let found = registry.manifests.lock().expect("lock").get(reference).cloned();
        return match found {
            Some((media_type, bytes)) => {
                ([("content-type", media_type), ("docker-content-digest", reference.to_owned())], bytes).into_response()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if let Some((_, digest)) = rest.split_once("/blobs/") {
        let Some(bytes) = registry.blobs.lock().expect("lock").get(digest).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let start: usize = headers
            .get("range")
            .and_then(|v| v.to_str().ok())
            .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
            .unwrap_or(0);
        let body = bytes.slice(start.min(bytes.len())..);
        let status = if start > 0 { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
        return (status, [("content-type", "application/octet-stream")], body).into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}

async fn serve(registry: Arc<Registry>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind registry");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(|| async { "{}" }))
        .route("/v2/{*rest}", axum::routing::get(v2))
        .with_state(registry);
    tokio::spawn(async move { axum::serve(listener, app).await.expect("registry server") });
    addr
}

/// Bundle B: one variant whose weights are [`WEIGHTS`] bytes of a fake model.
fn push_bundle(registry: &Registry) -> Digest {
    let mut weights = b"FAKE-GGUF\n".to_vec();
    weights.resize(WEIGHTS, b'#');
    let gguf = registry.blob(&weights);
    let runtime_json = br#"{"context_size":512,"parallel_slots":1}"#;
    let runtime = registry.blob(runtime_json);
    let config = registry.blob(b"{}");
    let mut weight = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, gguf, weights.len() as u64);
    weight.annotations.insert(ANNOTATION_TITLE.to_owned(), "model-b.gguf".to_owned());
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
        artifact_type: Some(alki_shared::bundle::ARTIFACT_TYPE_MODEL.to_owned()),
        config: Descriptor::new(MEDIA_TYPE_EMPTY, config, 2),
        layers: vec![weight, Descriptor::new(MEDIA_TYPE_RUNTIME, runtime, runtime_json.len() as u64)],
        subject: None,
        annotations: Default::default(),
    };
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let variant = registry.manifest(MEDIA_TYPE_IMAGE_MANIFEST, bytes.clone());
    let mut entry = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, variant, bytes.len() as u64);
    entry.annotations = variant_annotations("Q4_K_M", "llama", "tiny", 1, 512, WEIGHTS as u64, WEIGHTS as u64);
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_INDEX.to_owned()),
        artifact_type: None,
        manifests: vec![entry],
        subject: None,
        annotations: Default::default(),
    };
    registry.manifest(MEDIA_TYPE_IMAGE_INDEX, serde_json::to_vec(&index).expect("json"))
}

fn bundle_a() -> BundleLocation {
    BundleLocation {
        registry: String::new(),
        repository: "acme/tiny".to_owned(),
        digest: Digest::of(b"bundle A"),
        tag: "v1".to_owned(),
    }
}

/// Fills the filesystem under `dir` until a write fails with "no space left".
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 64 << 10];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling the disk failed otherwise: {e}"),
        }
    }
    // Smaller pieces take the last free blocks.
    for _ in 0..64 {
        if file.write_all(&[0u8; 1024]).is_err() {
            break;
        }
    }
    path
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(files_under(&path)) } else { out.push(path) }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_up_during_a_pull_fails_the_activation_cleanly_and_the_old_model_serves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let _mount = Mount::tmpfs(&data_dir);
    tokio::time::timeout(Duration::from_secs(90), async {
        // Model A serves (a tiny fake model file on the small filesystem).
        let model_dir = data_dir.join("bundles").join(Digest::of(b"variant A").hex());
        std::fs::create_dir_all(&model_dir).expect("mkdir");
        let model = fake_model(&model_dir, "model-a.gguf", &[]);
        let mut state = AgentState::new(DeviceId::new("pi-disk").expect("id"));
        state.active = Some(Deployment {
            bundle: bundle_a(),
            variant_digest: Digest::of(b"variant A"),
            model_files: vec![model],
            overrides: RuntimeOverrides::default(),
            launch: launch_settings(),
            generation: Generation(3),
        });
        state.last_applied_generation = Generation(3);
        StateFile::new(&data_dir).save(&state).expect("state");

        let registry = Arc::new(Registry::default());
        let index = push_bundle(&registry);
        let registry_addr = serve(registry).await;
        let (controller, mut up, mut downs) = FakeController::new(1, TOKEN);
        let controller_addr = controller.serve().await;
        let token = dir.path().join("agent.token");
        std::fs::write(&token, TOKEN).expect("token");
        let trust = common::unsigned_trust_policy(dir.path());
        // 1 MiB/s: the 4 MiB layer takes seconds, and the disk fills up while it streams.
        let text = format!(
            "data_dir = {data_dir:?}\ntrust_policy = {trust:?}\n[controller]\nurl = \"http://{controller_addr}\"\n\
             insecure_plaintext = true\ntoken_file = {token:?}\n[registry]\nbandwidth_limit_kib = 1024\n\
             insecure_plain_http = [\"{registry_addr}\"]\n[store]\ndisk_reserve_mib = 0\n[runtime]\nllama_server = {llama:?}\n\
             front_addr = \"127.0.0.1:0\"\ndrain_timeout_secs = 2\nwatch_window_secs = 0\n",
            llama = fake_llama_server(),
        );
        let config = Config::from_toml(&text).expect("config");
        let agent = Agent::start(config).await.expect("agent starts");
        let front = agent.front_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(agent.run(async move {
            let _ = stop_rx.await;
        }));
        let down = downs.remove(0);
        next_where(&mut up, |m| matches!(m, agent_message::Msg::Hello(_))).await;

        let b = BundleLocation {
            registry: registry_addr.to_string(),
            repository: "acme/tiny".to_owned(),
            digest: index,
            tag: String::new(),
        };
        let desired = proto::DesiredState { generation: 4, bundle: Some(b.to_proto()), ..Default::default() };
        down.send(proto::ControllerMessage { msg: Some(controller_message::Msg::DesiredState(desired)) })
            .await
            .expect("send");
        // Once bytes of the layer are on disk, something else fills the disk.
        next_where(&mut up, |m| {
            matches!(m, agent_message::Msg::Status(s) if s.generation == 4 && s.phase == Phase::Pulling as i32
                && s.progress.as_ref().is_some_and(|p| p.bytes_done > 0))
        })
        .await;
        let filler = fill(&data_dir);

        let agent_message::Msg::Status(failed) = next_where(&mut up, status_with(Phase::Failed, 4)).await else {
            unreachable!()
        };
        let error = failed.error.expect("error");
        assert_eq!(error.code, ErrorCode::DiskFull as i32, "{}", error.message);
        assert!(error.message.contains(": disk full: "), "{}", error.message);
        assert!(!error.layer_digest.is_empty(), "the layer is named");
        assert_eq!(failed.serving, Some(bundle_a().to_proto()), "the old model still serves");

        // Nothing partial or corrupt in the content store: every blob matches its name, no leftovers.
        let content = data_dir.join("content");
        for blob in files_under(&content.join("blobs")) {
            let bytes = std::fs::read(&blob).expect("read blob");
            let name = blob.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            assert_eq!(Digest::of(&bytes).hex(), name, "{} matches its digest", blob.display());
        }
        assert!(files_under(&content.join("tmp")).is_empty(), "no temporary files");
        assert!(files_under(&content.join("partial")).is_empty(), "the partial download was removed");
        assert!(!files_under(&data_dir.join("bundles")).iter().any(|f| f.ends_with("model-b.gguf")));

        let response = reqwest::Client::new()
            .post(format!("http://{front}/completion"))
            .json(&serde_json::json!({"prompt": "Hi", "n_predict": 2}))
            .send()
            .await
            .expect("A answers");
        let body: serde_json::Value = response.json().await.expect("json");
        assert!(body["content"].as_str().unwrap_or_default().contains("model-a.gguf"), "{body}");

        std::fs::remove_file(filler).expect("free the disk");
        stop_tx.send(()).expect("stop");
        running.await.expect("task").expect("clean exit");
        let state = StateFile::new(&data_dir).load().expect("state").expect("present");
        assert_eq!(state.active.map(|a| a.bundle), Some(bundle_a()));
        assert_eq!(state.last_applied_generation, Generation(4));
    })
    .await
    .expect("test timed out");
}
