//! Bundles that name a llama.cpp runtime build: the agent resolves this device's platform entry, extracts the
//! build and runs its llama-server (the fake one, packed as a build); a build whose server exits at load
//! leaves the old model serving; a build that crashes after the flip is rolled back to the previous build; a
//! build with no entry for this platform is refused saying which platforms it has; calibration runs a
//! variant on the build it names.
//!
//! Content is staged in the agent's store and the registry named is unreachable: these are the agent's
//! paths after the pull (the pull and signature check against a real registry are in
//! e2e/tests/runtime_build_real.rs).

mod common;

use std::path::{Path, PathBuf};

use alki_agent::reference::BundleLocation;
use alki_agent::settings::RuntimeOverrides;
use alki_agent::state::{AgentState, Deployment, StateFile};
use alki_agent::store::ContentStore;
use alki_shared::bundle::{
    ANNOTATION_ACCELERATOR, ARTIFACT_TYPE_RUNTIME_BUILD, MEDIA_TYPE_RUNTIME, MEDIA_TYPE_RUNTIME_BUILD_CONFIG,
    MEDIA_TYPE_RUNTIME_BUILD_TAR, MEDIA_TYPE_WEIGHT_RAW, RuntimeBuildConfig, RuntimeDefaults,
};
use alki_shared::digest::Digest;
use alki_shared::ids::{DeviceId, Generation};
use alki_shared::oci::{
    ANNOTATION_TITLE, Descriptor, ImageIndex, ImageManifest, MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST, Platform,
};
use alki_shared::proto::{self, ErrorCode, Phase};
use common::controller::{next_where, status_with};
use common::running::{Running, completion, until_served_by};
use common::{TEST_TIMEOUT, fake_llama_server, fake_model, launch_settings};

const TOKEN: &str = "agent-secret";
/// Nobody answers here: everything must come from the content store.
const REGISTRY: &str = "127.0.0.1:1";

fn location(repository: &str, digest: Digest) -> BundleLocation {
    BundleLocation { registry: REGISTRY.to_owned(), repository: repository.to_owned(), digest, tag: String::new() }
}

async fn put(store: &ContentStore, bytes: &[u8]) -> Digest {
    let digest = Digest::of(bytes);
    store.write_bytes(&digest, bytes).await.expect("store blob");
    digest
}

fn here() -> (String, String) {
    (std::env::consts::OS.to_owned(), alki_agent::pull::build::oci_architecture(std::env::consts::ARCH).to_owned())
}

/// Stages a runtime build whose `llama-server` is `server` (a file copied in with mode 0755), with one
/// entry per `(os, architecture)`; returns the pinned reference a bundle names.
async fn stage_build(data_dir: &Path, server: &[u8], platforms: &[(String, String)]) -> String {
    let store = ContentStore::open(&data_dir.join("content")).expect("store");
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(server.len() as u64);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, "llama-server", server).expect("tar entry");
    let tar = builder.into_inner().expect("tar");
    let layer_digest = put(&store, &tar).await;
    let mut entries = Vec::new();
    for (os, architecture) in platforms {
        let config = RuntimeBuildConfig {
            version: "test".into(),
            build_info: String::new(),
            accelerator: "cpu".into(),
            os: os.clone(),
            architecture: architecture.clone(),
            variant: None,
            cpu_features: Vec::new(),
        };
        let config_bytes = serde_json::to_vec(&config).expect("json");
        let config_digest = put(&store, &config_bytes).await;
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.into()),
            artifact_type: Some(ARTIFACT_TYPE_RUNTIME_BUILD.into()),
            config: Descriptor::new(MEDIA_TYPE_RUNTIME_BUILD_CONFIG, config_digest, config_bytes.len() as u64),
            layers: vec![Descriptor::new(MEDIA_TYPE_RUNTIME_BUILD_TAR, layer_digest.clone(), tar.len() as u64)],
            subject: None,
            annotations: Default::default(),
        };
        let bytes = serde_json::to_vec(&manifest).expect("json");
        let mut entry = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, put(&store, &bytes).await, bytes.len() as u64);
        entry.platform = Some(Platform { os: os.clone(), architecture: architecture.clone(), variant: None });
        entry.annotations.insert(ANNOTATION_ACCELERATOR.into(), "cpu".into());
        entries.push(entry);
    }
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_INDEX.into()),
        artifact_type: Some(ARTIFACT_TYPE_RUNTIME_BUILD.into()),
        manifests: entries,
        subject: None,
        annotations: Default::default(),
    };
    let digest = put(&store, &serde_json::to_vec(&index).expect("json")).await;
    format!("{REGISTRY}/acme/llama-server@{digest}")
}

/// Stages a one-variant bundle of a fake model whose runtime layer names `build`.
async fn stage_bundle(data_dir: &Path, name: &str, build: Option<&str>) -> BundleLocation {
    let store = ContentStore::open(&data_dir.join("content")).expect("store");
    let weights = format!("FAKE-GGUF\nNAME={name}\n");
    let gguf = put(&store, weights.as_bytes()).await;
    let config = put(&store, b"{}").await;
    let runtime =
        RuntimeDefaults { context_size: 512, runtime_build: build.map(str::to_owned), ..RuntimeDefaults::default() };
    let runtime_bytes = serde_json::to_vec(&runtime).expect("json");
    let runtime_digest = put(&store, &runtime_bytes).await;
    let mut layer = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, gguf, weights.len() as u64);
    layer.annotations.insert(ANNOTATION_TITLE.to_owned(), format!("{name}.gguf"));
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
        artifact_type: Some(alki_shared::bundle::ARTIFACT_TYPE_MODEL.to_owned()),
        config: Descriptor::new(MEDIA_TYPE_EMPTY, config, 2),
        layers: vec![layer, Descriptor::new(MEDIA_TYPE_RUNTIME, runtime_digest, runtime_bytes.len() as u64)],
        subject: None,
        annotations: Default::default(),
    };
    location("acme/tiny", put(&store, &serde_json::to_vec(&manifest).expect("json")).await)
}

/// Model A, served by the configured llama-server, active before the agent starts.
fn save_model_a(data_dir: &Path) -> Deployment {
    let variant = Digest::of(b"model-a");
    let model_dir = data_dir.join("bundles").join(variant.hex());
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    let a = Deployment {
        bundle: location("acme/tiny", Digest::of(b"bundle model-a")),
        variant_digest: variant,
        model_files: vec![fake_model(&model_dir, "model-a.gguf", &[])],
        overrides: RuntimeOverrides::default(),
        launch: launch_settings(),
        generation: Generation(3),
    };
    let mut state = AgentState::new(DeviceId::new("pi-test").expect("id"));
    state.last_applied_generation = a.generation;
    state.active = Some(a.clone());
    StateFile::new(data_dir).save(&state).expect("save state");
    a
}

/// A shell script standing in for a build's llama-server: `body` runs with the fake's path in `$FAKE`.
fn script(body: &str) -> Vec<u8> {
    format!("#!/bin/sh\nFAKE={:?}\n{body}\n", fake_llama_server().display().to_string()).into_bytes()
}

/// Processes whose executable lies under `dir` (each llama-server started from a build there).
fn processes_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            exe.starts_with(dir).then_some((pid, exe))
        })
        .collect()
}

async fn start_agent(dir: &Path, data_dir: &Path, runtime_extra: &str) -> Running {
    common::running::start_configured(dir, data_dir, TOKEN, runtime_extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_naming_a_build_runs_that_builds_server_and_a_crash_after_the_flip_rolls_back_to_the_previous_build() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let builds_dir = data_dir.join("runtime-builds");
        save_model_a(&data_dir);
        let fake = std::fs::read(fake_llama_server()).expect("fake llama-server");
        let good_build = stage_build(&data_dir, &fake, &[here()]).await;
        let b = stage_bundle(&data_dir, "model-b", Some(&good_build)).await;
        // Build Y: the fake again, but its server crashes on the second completion (the first is the smoke test).
        let crashy_build =
            stage_build(&data_dir, &script("FAKE_LLAMA_CRASH_AFTER=2 exec \"$FAKE\" \"$@\""), &[here()]).await;
        let c = stage_bundle(&data_dir, "model-c", Some(&crashy_build)).await;
        let mut agent =
            start_agent(dir.path(), &data_dir, "watch_window_secs = 30\nswap_strategy = \"blue_green\"").await;
        until_served_by(agent.front, "model-a.gguf").await;
        assert!(processes_under(&builds_dir).is_empty(), "A runs on the configured llama-server");

        agent.desire(4, &b).await;
        let active = next_where(&mut agent.up, status_with(Phase::Active, 4)).await;
        let proto::agent_message::Msg::Status(active) = active else { unreachable!("status_with matched a status") };
        let (os, arch) = here();
        assert_eq!(active.runtime_platform, format!("{os}/{arch}"), "the device says which build entry it chose");
        until_served_by(agent.front, "model-b.gguf").await;
        let on_b = processes_under(&builds_dir);
        assert_eq!(on_b.len(), 1, "B's llama-server runs from its build: {on_b:?}");
        let build_b_dir = on_b[0].1.parent().expect("build dir").to_owned();
        assert_eq!(on_b[0].1.file_name().and_then(|n| n.to_str()), Some("llama-server"));
        let state = StateFile::new(&data_dir).load().expect("state").expect("present");
        let launched = state.active.and_then(|a| a.launch.llama_server).expect("the deployment records its build");
        assert_eq!(launched, on_b[0].1);

        // C's build crashes after the flip: back to B, on B's build, reported with its cause.
        agent.desire(5, &c).await;
        next_where(&mut agent.up, status_with(Phase::Active, 5)).await;
        until_served_by(agent.front, "model-c.gguf").await;
        let _ = completion(agent.front).await; // C's server crashes on this one.
        let failed = agent.failed(5).await;
        let error = failed.error.expect("error set");
        assert!(error.message.contains("rolled back to"), "{}", error.message);
        until_served_by(agent.front, "model-b.gguf").await;
        let serving: Vec<_> = processes_under(&builds_dir);
        assert!(serving.iter().any(|(_, exe)| exe.starts_with(&build_b_dir)), "B's build serves again: {serving:?}");
        agent.stop().await;
        let state = StateFile::new(&data_dir).load().expect("state").expect("present");
        assert_eq!(state.active.and_then(|a| a.launch.llama_server), Some(launched), "B's build after a restart too");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_whose_server_exits_at_load_leaves_the_old_model_serving_and_is_reported() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let a = save_model_a(&data_dir);
        let broken = stage_build(&data_dir, &script("echo 'cannot load libllama.so' >&2\nexit 1"), &[here()]).await;
        let b = stage_bundle(&data_dir, "model-b", Some(&broken)).await;
        let mut agent =
            start_agent(dir.path(), &data_dir, "watch_window_secs = 30\nswap_strategy = \"blue_green\"").await;
        until_served_by(agent.front, "model-a.gguf").await;

        agent.desire(4, &b).await;
        let failed = agent.failed(4).await;
        let error = failed.error.expect("error set");
        assert_eq!(error.code, ErrorCode::StartFailed as i32, "{}", error.message);
        assert!(
            error.message.contains("exited") && error.message.contains("cannot load libllama.so"),
            "{}",
            error.message
        );
        assert_eq!(failed.serving, Some(a.bundle.to_proto()), "A still serves");
        assert!(completion(agent.front).await.is_some_and(|c| c.contains("model-a.gguf")));
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_without_an_entry_for_this_platform_is_refused_naming_the_platforms_it_has() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let a = save_model_a(&data_dir);
        let other = [("linux".to_owned(), "s390x".to_owned()), ("windows".to_owned(), "amd64".to_owned())];
        let build = stage_build(&data_dir, b"#!/bin/sh\n", &other).await;
        let b = stage_bundle(&data_dir, "model-b", Some(&build)).await;
        let mut agent = start_agent(dir.path(), &data_dir, "").await;
        until_served_by(agent.front, "model-a.gguf").await;

        agent.desire(4, &b).await;
        let failed = agent.failed(4).await;
        let error = failed.error.expect("error set");
        assert_eq!(error.code, ErrorCode::NoVariantFits as i32, "{}", error.message);
        assert!(error.message.contains("linux/s390x, windows/amd64"), "{}", error.message);
        assert!(error.message.contains("alkictl runtime push --platform"), "{}", error.message);
        assert_eq!(failed.serving, Some(a.bundle.to_proto()));
        assert!(std::fs::read_dir(data_dir.join("runtime-builds")).expect("dir").next().is_none(), "nothing extracted");
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibration_runs_a_variant_on_the_build_its_runtime_layer_names() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        save_model_a(&data_dir);
        // The build's server notes where it ran from, then is the fake llama-server.
        let ran = dir.path().join("build-ran");
        let build =
            stage_build(&data_dir, &script(&format!("echo \"$0\" >> {ran:?}\nexec \"$FAKE\" \"$@\"")), &[here()]).await;
        let b = stage_bundle(&data_dir, "model-b", Some(&build)).await;
        let elsewhere = stage_build(&data_dir, b"#!/bin/sh\n", &[("linux".to_owned(), "s390x".to_owned())]).await;
        let c = stage_bundle(&data_dir, "model-c", Some(&elsewhere)).await;
        let mut agent = start_agent(dir.path(), &data_dir, "").await;
        until_served_by(agent.front, "model-a.gguf").await;

        let calibrate = proto::Calibrate { bundle: Some(b.to_proto()), repetitions: 1, suite: None };
        agent.command("cal-b", proto::command::Kind::Calibrate(calibrate)).await;
        let report = agent.benchmark_report("cal-b").await;
        assert!(report.error.is_empty(), "{}", report.error);
        assert_eq!(report.results.len(), 1);
        assert!(report.results[0].error.is_empty(), "{}", report.results[0].error);
        let ran_from = std::fs::read_to_string(&ran).expect("the build's server ran");
        let ran_from: Vec<&str> = ran_from.lines().collect();
        assert_eq!(ran_from.len(), 1, "{ran_from:?}");
        assert!(Path::new(ran_from[0]).starts_with(data_dir.join("runtime-builds")), "{ran_from:?}");
        assert!(ran_from[0].ends_with("/llama-server"), "{ran_from:?}");

        // A build this device cannot run: the variant's result says why; nothing else changes.
        let calibrate = proto::Calibrate { bundle: Some(c.to_proto()), repetitions: 1, suite: None };
        agent.command("cal-c", proto::command::Kind::Calibrate(calibrate)).await;
        let report = agent.benchmark_report("cal-c").await;
        assert_eq!(report.results.len(), 1);
        let error = &report.results[0].error;
        assert!(error.contains("runtime build") && error.contains("linux/s390x"), "{error}");
        assert!(completion(agent.front).await.is_some_and(|c| c.contains("model-a.gguf")), "A serves throughout");
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}
