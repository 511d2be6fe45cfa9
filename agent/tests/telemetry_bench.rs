//! Telemetry, benchmarks and calibration through the whole agent with the fake llama-server and a scripted
//! controller: the front proxy's counters and histograms, llama-server's `/metrics` turned into rates, the
//! benchmark command, the benchmark after an activation, calibration of every variant of a bundle, the
//! results and serving files, and the agent's own Prometheus `/metrics`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use alki_agent::bench::{PROMPT_SET, ResultsFile, ServingFile};
use alki_agent::reference::BundleLocation;
use alki_agent::settings::RuntimeOverrides;
use alki_agent::state::{AgentState, Deployment, StateFile};
use alki_agent::store::ContentStore;
use alki_agent::{Agent, Config};
use alki_shared::bundle::{MEDIA_TYPE_WEIGHT_RAW, variant_annotations};
use alki_shared::digest::Digest;
use alki_shared::ids::{DeviceId, Generation};
use alki_shared::oci::{
    ANNOTATION_TITLE, Descriptor, ImageIndex, ImageManifest, MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
};
use alki_shared::proto::{self, BenchmarkTrigger, Phase, agent_message, controller_message};
use common::controller::{FakeController, next_where, status_with};
use common::{TEST_TIMEOUT, fake_llama_server, fake_model, launch_settings};
use tokio::sync::mpsc;

const TOKEN: &str = "agent-secret";

/// A registry nobody answers on: everything comes from the content store.
fn location(digest: Digest) -> BundleLocation {
    BundleLocation { registry: "127.0.0.1:1".to_owned(), repository: "acme/tiny".to_owned(), digest, tag: "v1".into() }
}

/// A data dir whose state says bundle A (a fake model) is active.
fn prepared_data_dir(dir: &Path) -> (std::path::PathBuf, Deployment) {
    let data_dir = dir.join("data");
    let variant = Digest::of(b"variant A");
    let model_dir = data_dir.join("bundles").join(variant.hex());
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    let model = fake_model(&model_dir, "model-a.gguf", &[]);
    let active = Deployment {
        bundle: location(Digest::of(b"bundle A")),
        variant_digest: variant,
        model_files: vec![model],
        overrides: RuntimeOverrides::default(),
        launch: launch_settings(),
        generation: Generation(3),
    };
    let mut state = AgentState::new(DeviceId::new("pi-test").expect("id"));
    state.active = Some(active.clone());
    state.last_applied_generation = Generation(3);
    StateFile::new(&data_dir).save(&state).expect("save state");
    (data_dir, active)
}

/// Stores a variant manifest holding one fake model; returns (manifest digest, manifest size, weights size).
async fn stage_variant(store: &ContentStore, name: &str) -> (Digest, u64, u64) {
    let weights = format!("FAKE-GGUF\nNAME={name}\n");
    let gguf = Digest::of(weights.as_bytes());
    store.write_bytes(&gguf, weights.as_bytes()).await.expect("weights");
    let config = Digest::of(b"{}");
    store.write_bytes(&config, b"{}").await.expect("config");
    let mut layer = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, gguf, weights.len() as u64);
    layer.annotations.insert(ANNOTATION_TITLE.to_owned(), format!("{name}.gguf"));
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
    (digest, bytes.len() as u64, weights.len() as u64)
}

/// Stores an index of variants `(name, quantization, memory bytes)`; returns its location and the variants'
/// digests in order.
async fn stage_index(data_dir: &Path, variants: &[(&str, &str, u64)]) -> (BundleLocation, Vec<Digest>) {
    let store = ContentStore::open(&data_dir.join("content")).expect("store");
    let mut manifests = Vec::new();
    let mut digests = Vec::new();
    for (name, quantization, memory) in variants {
        let (digest, size, weights) = stage_variant(&store, name).await;
        let mut d = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, digest.clone(), size);
        d.annotations = variant_annotations(quantization, "llama", "tiny", 1000, 512, weights, *memory);
        manifests.push(d);
        digests.push(digest);
    }
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_INDEX.to_owned()),
        artifact_type: None,
        manifests,
        subject: None,
        annotations: Default::default(),
    };
    let bytes = serde_json::to_vec(&index).expect("json");
    let digest = Digest::of(&bytes);
    store.write_bytes(&digest, &bytes).await.expect("index");
    (location(digest), digests)
}

fn config(dir: &Path, data_dir: &Path, controller: SocketAddr) -> Config {
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let trust = common::unsigned_trust_policy(dir);
    let text = format!(
        r#"
data_dir = {data_dir:?}
trust_policy = {trust:?}
metrics_addr = "127.0.0.1:0"
labels = {{ class = "test-class" }}
[controller]
url = "http://{controller}"
token_file = {token_file:?}
insecure_plaintext = true
[runtime]
llama_server = {llama:?}
front_addr = "127.0.0.1:0"
health_timeout_secs = 15
drain_timeout_secs = 2
watch_window_secs = 0
"#,
        llama = fake_llama_server(),
    );
    Config::from_toml(&text).expect("valid config")
}

struct Running {
    front: SocketAddr,
    metrics: SocketAddr,
    up: mpsc::Receiver<proto::AgentMessage>,
    down: mpsc::Sender<proto::ControllerMessage>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), alki_agent::AgentError>>,
}

async fn start_agent(dir: &Path, data_dir: &Path) -> Running {
    let (controller, up, mut downs) = FakeController::new(1, TOKEN);
    let down = downs.remove(0);
    let controller_addr = controller.serve().await;
    let agent = Agent::start(config(dir, data_dir, controller_addr)).await.expect("agent starts");
    let front = agent.front_addr();
    let metrics = agent.metrics_addr().expect("metrics_addr is configured");
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    let welcome = proto::Welcome {
        device_id: "pi-test".to_owned(),
        heartbeat_interval_seconds: 5,
        telemetry_interval_seconds: 1,
        ..Default::default()
    };
    down.send(proto::ControllerMessage { msg: Some(controller_message::Msg::Welcome(welcome)) })
        .await
        .expect("welcome");
    Running { front, metrics, up, down, stop, task }
}

impl Running {
    async fn send(&self, msg: controller_message::Msg) {
        self.down.send(proto::ControllerMessage { msg: Some(msg) }).await.expect("send down");
    }

    async fn command(&self, id: &str, kind: proto::command::Kind) {
        self.send(controller_message::Msg::Command(proto::Command { id: id.to_owned(), kind: Some(kind) })).await;
    }

    async fn report(&mut self, command_id: &str) -> proto::BenchmarkReport {
        let id = command_id.to_owned();
        match next_where(&mut self.up, move |m| matches!(m, agent_message::Msg::Benchmark(r) if r.command_id == id))
            .await
        {
            agent_message::Msg::Benchmark(r) => r,
            _ => unreachable!("matched benchmarks only"),
        }
    }

    async fn telemetry_where(&mut self, mut wanted: impl FnMut(&proto::Telemetry) -> bool) -> proto::Telemetry {
        match next_where(&mut self.up, move |m| matches!(m, agent_message::Msg::Telemetry(t) if wanted(t))).await {
            agent_message::Msg::Telemetry(t) => t,
            _ => unreachable!("matched telemetry only"),
        }
    }

    async fn stop(self) {
        self.stop.send(()).expect("signal shutdown");
        self.task.await.expect("task").expect("clean exit");
    }
}

/// A completion through the front port; streamed ones are read to the end.
async fn completion(front: SocketAddr, stream: bool) -> Option<String> {
    let response = reqwest::Client::new()
        .post(format!("http://{front}/completion"))
        .json(&serde_json::json!({"prompt": "Hi there", "n_predict": 8, "stream": stream}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    response.text().await.ok()
}

async fn until_served(front: SocketAddr) {
    while completion(front, false).await.is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= b.abs() * 0.01
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_the_benchmark_command_and_prometheus_metrics() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (data_dir, active) = prepared_data_dir(dir.path());
        let mut agent = start_agent(dir.path(), &data_dir).await;
        let bundle = active.bundle.digest.to_string();
        until_served(agent.front).await;
        // 1 request above; 2 more plain and 2 streamed ones.
        for stream in [false, false, true, true] {
            assert!(completion(agent.front, stream).await.is_some(), "served");
        }

        // Telemetry: the proxy's counters and histogram, TTFT of the streamed requests, and rates from
        // llama-server's counters (the fake takes exactly 0.5 ms per token: 2000 tokens/s both ways).
        let (mut saw_ttft, mut saw_generation, mut saw_prompt) = (false, false, false);
        let t = agent
            .telemetry_where(|t| {
                saw_ttft |= t.ttft_ms > 0.0;
                saw_generation |= close(t.generation_tokens_per_second, 2000.0);
                saw_prompt |= close(t.prompt_tokens_per_second, 2000.0);
                t.requests_total == 5 && t.latency_buckets.last().is_some_and(|b| b.count == 5)
            })
            .await;
        assert!(saw_ttft, "the streamed requests' time to first token was reported");
        assert!(saw_generation && saw_prompt, "speeds from llama-server's counters were reported");
        assert_eq!(t.bundle_digest, bundle);
        assert_eq!(t.variant_digest, active.variant_digest.to_string());
        assert_eq!(t.interval_seconds, 1, "the Welcome's interval");
        assert_eq!(t.request_errors_total, 0);
        assert!(t.latency_buckets.last().is_some_and(|b| b.inf));
        assert!(t.latency_sum_ms > 0.0);
        assert!(t.memory_available_bytes > 0);
        assert!(t.generated_tokens_total >= 5 * 8, "{}", t.generated_tokens_total);
        assert!(t.prompt_tokens_total > 0);
        // An idle interval has no speed (0 means "not measured" to the controller).
        let idle = agent.telemetry_where(|t| t.requests_total == 5).await;
        assert_eq!(idle.generation_tokens_per_second, 0.0);
        assert_eq!(idle.ttft_ms, 0.0);

        // The benchmark command, against the serving instance.
        agent.command("bench-1", proto::command::Kind::RunBenchmark(proto::RunBenchmark { repetitions: 2 })).await;
        let report = agent.report("bench-1").await;
        assert!(report.error.is_empty(), "{}", report.error);
        assert_eq!(report.results.len(), 1);
        let r = &report.results[0];
        assert!(r.error.is_empty(), "{}", r.error);
        assert_eq!(r.trigger, BenchmarkTrigger::OnDemand as i32);
        assert_eq!(r.device_id, "pi-test");
        assert_eq!(r.hardware_class, "test-class");
        assert_eq!(r.prompt_set, PROMPT_SET);
        assert_eq!(r.repetitions, 2);
        assert_eq!(r.bundle.as_ref().map(|b| b.digest.as_str()), Some(bundle.as_str()));
        assert_eq!(r.variant_digest, active.variant_digest.to_string());
        let generation = r.generation_tokens_per_second.expect("generation");
        assert_eq!(generation.samples, 2);
        assert!(close(generation.median, 2000.0), "{generation:?}");
        assert!(close(r.prompt_tokens_per_second.as_ref().expect("prompt").median, 2000.0));
        assert!(r.ttft_ms.as_ref().expect("ttft").median > 0.0);
        assert!(r.load_ms > 0.0, "the serving instance's load time");
        assert!(r.peak_rss_bytes > 0, "VmHWM of the fake llama-server");
        // Stored on the device.
        let stored = ResultsFile::new(&data_dir).load();
        let key = |r: &proto::BenchmarkResult| (r.at_unix_ms, r.trigger, r.variant_digest.clone(), r.repetitions);
        assert_eq!(stored.last().map(key), Some(key(r)));
        let serving = ServingFile::new(&data_dir).load().expect("serving.json");
        assert!(serving.pid.is_some());
        assert_eq!(serving.variant_digest, active.variant_digest.to_string());
        // The benchmark's requests went around the proxy: the serving counters did not move.
        let after = agent.telemetry_where(|_| true).await;
        assert_eq!(after.requests_total, 5);

        // A command this agent cannot run is answered, not dropped.
        agent.send(controller_message::Msg::Command(proto::Command { id: "odd".into(), kind: None })).await;
        assert!(agent.report("odd").await.error.contains("does not know"));

        // The agent's own /metrics.
        let text = reqwest::get(format!("http://{}/metrics", agent.metrics))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text");
        for expected in [
            format!("alki_agent_requests_total{{bundle=\"{bundle}\"}} 5"),
            format!("alki_agent_request_duration_seconds_count{{bundle=\"{bundle}\"}} 5"),
            format!("alki_agent_time_to_first_token_seconds_count{{bundle=\"{bundle}\"}} 2"),
            format!("alki_agent_request_duration_seconds_bucket{{bundle=\"{bundle}\",le=\"+Inf\"}} 5"),
            format!("alki_agent_generated_tokens_total{{bundle=\"{bundle}\"}}"),
            format!("alki_agent_bundle_info{{bundle=\"{bundle}\",repository=\"acme/tiny\""),
            "alki_agent_benchmark_generation_tokens_per_second{".to_owned(),
            "alki_agent_activations_total{outcome=\"active\"} 0".to_owned(),
            "# TYPE alki_agent_pull_bytes_total counter".to_owned(),
        ] {
            assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
        }
        agent.stop().await;
        assert!(ServingFile::new(&data_dir).load().is_none(), "nothing is served after the agent stopped");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_is_benchmarked_and_calibration_covers_every_variant_that_fits() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (data_dir, _) = prepared_data_dir(dir.path());
        let (single, single_variants) = stage_index(&data_dir, &[("model-b", "Q4_0", 1 << 20)]).await;
        let (calibrated, variants) = stage_index(
            &data_dir,
            &[("cal-q4", "Q4_K_M", 1 << 20), ("cal-q8", "Q8_0", 2 << 20), ("cal-huge", "F16", 1 << 50)],
        )
        .await;
        let mut agent = start_agent(dir.path(), &data_dir).await;
        until_served(agent.front).await;

        // An activation: the new model is benchmarked on its own and reported without a command id.
        let desired = proto::DesiredState { generation: 4, bundle: Some(single.to_proto()), ..Default::default() };
        agent.send(controller_message::Msg::DesiredState(desired)).await;
        next_where(&mut agent.up, status_with(Phase::Active, 4)).await;
        let report = agent.report("").await;
        assert_eq!(report.results.len(), 1);
        let r = &report.results[0];
        assert!(r.error.is_empty(), "{}", r.error);
        assert_eq!(r.trigger, BenchmarkTrigger::Activation as i32);
        assert_eq!(r.variant_digest, single_variants[0].to_string());
        assert_eq!(r.bundle.as_ref().map(|b| b.digest.clone()), Some(single.digest.to_string()));
        assert_eq!(r.repetitions, alki_agent::bench::DEFAULT_REPETITIONS);

        // Calibration: each variant that fits in a llama-server of its own; the one that cannot fit says so.
        let calibrate = proto::Calibrate { bundle: Some(calibrated.to_proto()), repetitions: 1, suite: None };
        agent.command("cal-1", proto::command::Kind::Calibrate(calibrate)).await;
        let report = agent.report("cal-1").await;
        assert!(report.error.is_empty(), "{}", report.error);
        assert_eq!(report.results.len(), 3);
        for (result, (digest, quantization)) in
            report.results.iter().zip(variants.iter().zip(["Q4_K_M", "Q8_0", "F16"]))
        {
            assert_eq!(result.trigger, BenchmarkTrigger::Calibration as i32);
            assert_eq!(result.variant_digest, digest.to_string());
            assert_eq!(result.variant_name, quantization);
            assert_eq!(result.bundle.as_ref().map(|b| b.digest.clone()), Some(calibrated.digest.to_string()));
        }
        for fits in &report.results[..2] {
            assert!(fits.error.is_empty(), "{}", fits.error);
            assert_eq!(fits.repetitions, 1);
            assert!(fits.generation_tokens_per_second.as_ref().is_some_and(|s| s.median > 0.0));
            assert!(fits.load_ms > 0.0 && fits.peak_rss_bytes > 0);
        }
        assert!(report.results[2].error.contains("needs"), "{}", report.results[2].error);
        // Serving was never touched: the activated model still answers through the front port.
        let content = completion(agent.front, false).await.expect("still served");
        assert!(content.contains("model-b"), "{content}");
        assert!(!data_dir.join("calibration").join(variants[0].hex()).exists(), "calibration cleans up");

        // A calibration of a bundle that is nowhere to be found fails as a whole, with the reason.
        let missing =
            proto::Calibrate { bundle: Some(location(Digest::of(b"nothing")).to_proto()), repetitions: 1, suite: None };
        agent.command("cal-2", proto::command::Kind::Calibrate(missing)).await;
        let report = agent.report("cal-2").await;
        assert!(report.results.is_empty());
        assert!(report.error.contains("acme/tiny"), "{}", report.error);

        let text = reqwest::get(format!("http://{}/metrics", agent.metrics))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text");
        assert!(text.contains("alki_agent_activations_total{outcome=\"active\"} 1"), "{text}");
        agent.stop().await;
    })
    .await
    .expect("test timed out");
}
