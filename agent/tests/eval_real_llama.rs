//! Quality evaluation with the real llama.cpp tools (llama-server, llama-perplexity, llama-quantize from the
//! build of e2e/scripts/build-llama-server.sh) and tiny generated models: A (F16), B1 = A in Q8_0 (close to
//! A), B2 = other weights (far from A), B3 = A under a mismatched chat template. An in-process agent with a
//! real registry serves A and evaluates B1, B2 and B3 against it on Evaluate commands (the baseline's logits
//! computed once and reused, the front port answering throughout), then evaluates B1 once after an
//! activation that names the suite; a run past its time budget is killed; `alki-agent eval` runs one by hand;
//! a B1 that claims more memory than is left beside itself is evaluated in its stop-then-start gap.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alki_agent::Config;
use alki_agent::eval::logits::BaseLogits;
use alki_agent::eval::measure::{Baseline, Meter, Model, SuiteRef};
use alki_agent::runtime::priority::Priority;
use alki_agent::runtime::{InstanceOptions, StopPolicy, http_client};
use alki_agent::store::ContentStore;
use alki_e2e::tiny_model::{self, CHATML_TEMPLATE, MISMATCHED_TEMPLATE, TinyModelOptions};
use alki_shared::digest::Digest;
use alki_shared::eval::prompts::parse_prompts;
use alki_shared::eval::quality::{CouldNotRun, Measurement, Outcome, QualityResult};
use alki_shared::eval::suite::Suite;
use alki_shared::eval::wire;
use alki_shared::proto::{self, Phase, agent_message, controller_message};
use common::controller::{next_where, report_and_status, status_with};
use common::registry::{PushedBundle, Registry, corpus, suite_files, trusted_key};
use common::running::{Running, start_agent};
use tokio::sync::mpsc;

/// Model loads and perplexity runs on 2 shared cores take seconds each; the whole test stays bounded.
const REAL_TIMEOUT: Duration = Duration::from_secs(900);
const TOKEN: &str = "eval-agent-token";
const SEED: u32 = 42;

/// The golden prompts before their replies are recorded on A: two chat prompts (which see the chat
/// template) and a plain completion (which does not).
const PROMPTS: [(&str, &str); 3] = [
    ("capital", r#""messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":8"#),
    ("colours", r#""messages":[{"role":"user","content":"Name three colours."}],"max_tokens":8"#),
    ("count", r#""prompt":"1, 2, 3,","max_tokens":4"#),
];

fn bin_dir() -> Option<PathBuf> {
    match alki_e2e::harness::llama_bin_dir() {
        Ok(dir) => Some(dir),
        Err(e) => {
            // Marked slow: it needs the cached llama.cpp build; e2e/scripts/test.sh builds it first.
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

/// A, B1 (A quantized to Q8_0 by the real llama-quantize), B2 and B3, as GGUF files in `dir`.
fn models(dir: &Path, bin: &Path) -> [PathBuf; 4] {
    let vocab = tiny_model::cached_vocab_path().expect("the llama-server build caches the vocab file");
    let tokenizer = tiny_model::read_tokenizer(&vocab).expect("tokenizer");
    let write = |name: &str, seed: u64, template: &str| {
        let path = dir.join(format!("{name}.gguf"));
        let options = TinyModelOptions { name: format!("alki-tiny-{name}"), seed };
        tiny_model::write_tiny_model(&path, &options, &tiny_model::with_chat_template(&tokenizer, template))
            .expect("model");
        path
    };
    let a = write("a", 1, CHATML_TEMPLATE);
    let b2 = write("b2", 2, CHATML_TEMPLATE);
    let b3 = write("b3", 1, MISMATCHED_TEMPLATE);
    let b1 = dir.join("b1.gguf");
    let quantized = std::process::Command::new(bin.join("llama-quantize"))
        .args([a.as_os_str(), b1.as_os_str(), "Q8_0".as_ref()])
        .output()
        .expect("llama-quantize runs");
    assert!(quantized.status.success(), "llama-quantize: {}", String::from_utf8_lossy(&quantized.stderr));
    [a, b1, b2, b3]
}

fn agent_config(dir: &Path, bin: &Path, registry: &str, policy: &Path, controller: SocketAddr) -> Config {
    agent_config_with(dir, bin, registry, policy, controller, "")
}

/// [`agent_config`] with `runtime_extra` lines in its `[runtime]` section.
fn agent_config_with(
    dir: &Path,
    bin: &Path,
    registry: &str,
    policy: &Path,
    controller: SocketAddr,
    runtime_extra: &str,
) -> Config {
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, TOKEN).expect("token");
    // Normal priority: this machine's cores are shared with compilers, which would starve SCHED_IDLE work
    // past any budget (the priority itself is proven by runtime::priority's tests).
    let text = format!(
        r#"
data_dir = {data:?}
trust_policy = {policy:?}
metrics_addr = "127.0.0.1:0"
benchmark_after_activation = false
[controller]
url = "http://{controller}"
insecure_plaintext = true
token_file = {token_file:?}
[registry]
insecure_plain_http = ["{registry}"]
[runtime]
llama_server = {server:?}
front_addr = "127.0.0.1:0"
health_timeout_secs = 120
drain_timeout_secs = 5
watch_window_secs = 0
{runtime_extra}
[eval]
priority = "normal"
"#,
        data = dir.join("data"),
        server = bin.join("llama-server"),
    );
    Config::from_toml(&text).expect("valid config")
}

/// The golden prompts with `exact` checks holding what A (served at `front`) answers to each.
async fn record_golden_prompts(front: SocketAddr) -> String {
    let http = reqwest::Client::new();
    let mut lines = String::new();
    for (id, head) in PROMPTS {
        let draft = format!(r#"{{"id":"{id}",{head},"checks":[{{"exact":"draft"}}]}}"#);
        let prompt = parse_prompts(draft.as_bytes(), 1 << 20).expect("draft prompt").remove(0);
        let asked = prompt.request(SEED);
        let answer = http
            .post(format!("http://{front}{}", asked.path))
            .json(&asked.body)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("A answers")
            .bytes()
            .await
            .expect("answer body");
        let reply = prompt.read_reply(&answer).expect("a reply");
        let recorded = reply.text.trim().to_owned();
        assert!(!recorded.is_empty(), "A's reply to {id} is empty");
        let checks = serde_json::json!([{ "exact": recorded }]);
        lines.push_str(&format!(r#"{{"id":"{id}",{head},"checks":{checks}}}"#));
        lines.push('\n');
    }
    lines
}

/// Completions through the front port until `stop`: (answered, failed).
fn keep_asking(front: SocketAddr) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<(u64, u64)>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let ok = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(async move {
        let mut failed = 0;
        loop {
            match common::running::completion(front).await {
                Some(_) => ok.fetch_add(1, Ordering::Relaxed),
                None => {
                    failed += 1;
                    0
                }
            };
            tokio::select! {
                _ = &mut stopped => return (ok.load(Ordering::Relaxed), failed),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });
    (stop, task)
}

async fn eval_report(
    up: &mut mpsc::Receiver<proto::AgentMessage>,
    wanted: impl Fn(&proto::EvalReport) -> bool,
) -> QualityResult {
    let msg = next_where(up, |m| matches!(m, agent_message::Msg::Eval(r) if wanted(r))).await;
    let agent_message::Msg::Eval(report) = msg else { unreachable!("matched eval reports only") };
    wire::from_proto(report.result.as_ref().expect("a result")).expect("a well-formed result")
}

fn measured(result: &QualityResult) -> &Measurement {
    match &result.outcome {
        Outcome::Measured(m) => m,
        Outcome::CouldNotRun(why) => panic!("not measured: {why}"),
    }
}

async fn scrape(metrics: SocketAddr) -> String {
    reqwest::get(format!("http://{metrics}/metrics")).await.expect("metrics").text().await.expect("text")
}

async fn command(running: &Running, id: &str, bundle: &PushedBundle, suite: &proto::BundleRef) {
    let evaluate =
        proto::Evaluate { bundle: Some(bundle.location.to_proto()), suite: Some(suite.clone()), ..Default::default() };
    running.command(id, proto::command::Kind::Evaluate(evaluate)).await;
}

async fn desire(running: &Running, desired: proto::DesiredState) {
    let message = proto::ControllerMessage { msg: Some(controller_message::Msg::DesiredState(desired)) };
    running.down.send(message).await.expect("desired state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_evaluates_b1_b2_and_b3_against_the_served_a_and_again_after_an_activation_naming_the_suite() {
    let Some(bin) = bin_dir() else { return };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    tokio::time::timeout(REAL_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let [a, b1, b2, b3] = models(dir.path(), &bin);
        let registry = Registry::start(dir.path());
        let (key, policy) = trusted_key(dir.path());
        let mut bundles = Vec::new();
        for (repository, quantization, file) in
            [("acme/a", "F16", &a), ("acme/b1", "Q8_0", &b1), ("acme/b2", "F16", &b2), ("acme/b3", "F16", &b3)]
        {
            let pushed = registry.push_bundle(repository, &[(quantization, file)]).await;
            registry.sign(repository, &pushed.location.digest, &key).await;
            bundles.push(pushed);
        }
        let [bundle_a, bundle_b1, bundle_b2, bundle_b3] = <[PushedBundle; 4]>::try_from(bundles).expect("four");
        let mut running =
            start_agent(TOKEN, |controller| agent_config(dir.path(), &bin, &registry.host(), &policy, controller))
                .await;
        running.desire(1, &bundle_a.location).await;
        next_where(&mut running.up, status_with(Phase::Active, 1)).await;
        eprintln!("A is served; recording its golden replies");

        let prompts = record_golden_prompts(running.front).await;
        let files = suite_files(&corpus(), &prompts, 600);
        let suite = Suite::parse(files.files()).expect("suite");
        let suite_digest = registry.push_suite("acme/suites", "smoke", &files, &suite).await;
        registry.sign("acme/suites", &suite_digest, &key).await;
        let suite_ref = registry.location("acme/suites", &suite_digest).to_proto();

        let (stop_asking, asking) = keep_asking(running.front);
        // One after the other: a burst beyond the queue would be refused as busy (tested in eval::jobs).
        let mut results = Vec::new();
        for (id, bundle) in [("e-b1", &bundle_b1), ("e-b2", &bundle_b2), ("e-b3", &bundle_b3)] {
            command(&running, id, bundle, &suite_ref).await;
            eprintln!("asked to evaluate {}", bundle.location);
            results.push(eval_report(&mut running.up, |r| r.command_id == id).await);
        }
        let [r1, r2, r3] = <[QualityResult; 3]>::try_from(results).expect("three results");
        let _ = stop_asking.send(());
        let (answered, failed) = asking.await.expect("asking");
        eprintln!("front port during the evaluations: {answered} answered, {failed} failed");
        assert!(answered > 0 && failed == 0, "the served model kept serving: {answered} answered, {failed} failed");

        for r in [&r1, &r2, &r3] {
            assert_eq!(r.baseline.as_ref(), Some(&bundle_a.variants[0]), "compared with the served A");
            assert_eq!(r.suite, suite_digest);
            eprintln!("{}", alki_agent::eval::table(r));
        }
        let (m1, m2, m3) = (measured(&r1), measured(&r2), measured(&r3));
        let kld = |m: &Measurement| m.kl_divergence.expect("a KL divergence");
        assert_eq!(r1.candidate, bundle_b1.variants[0]);
        assert!(
            kld(m1).kld_mean.value < 0.001 && kld(m1).top1_agreement.value >= 0.9,
            "B1 is close to A: {:?}",
            kld(m1)
        );
        assert!(
            kld(m2).kld_mean.value > 0.001 && kld(m2).top1_agreement.value < 0.1,
            "B2 is far from A: {:?}",
            kld(m2)
        );
        assert!(kld(m3).top1_agreement.value > 0.99, "B3 has A's weights: {:?}", kld(m3));
        assert_eq!((m3.golden.prompts, m3.golden.passed), (3, 1), "{:?}", m3.golden);
        let failed_prompts: Vec<(&str, u32, &str)> =
            m3.golden.failures.iter().map(|f| (f.prompt.as_str(), f.check, f.label.as_str())).collect();
        assert!(
            failed_prompts.iter().all(|(p, check, label)| *p != "count" && *check == 1 && label.starts_with("exact ")),
            "B3 fails the chat prompts' exact checks, named: {failed_prompts:?}"
        );
        assert!(m1.build.starts_with("llama.cpp "), "{}", m1.build);
        assert_eq!(
            (m1.settings.perplexity.context_size, m1.settings.perplexity.chunks, m1.settings.seed),
            (128, 16, SEED)
        );

        let metrics = running.metrics.expect("metrics served");
        let text = scrape(metrics).await;
        assert!(text.contains("alki_agent_eval_base_logits_total{result=\"computed\"} 1\n"), "{text}");
        assert!(text.contains("alki_agent_eval_base_logits_total{result=\"reused\"} 2\n"), "{text}");
        assert!(text.contains("alki_agent_evaluations_total{outcome=\"measured\",place=\"beside\"} 3\n"), "{text}");
        let index = dir.path().join("data/content").join(alki_agent::eval::logits::DIR_NAME);
        let entries: Vec<_> = std::fs::read_dir(&index).expect("the cache index").flatten().collect();
        assert_eq!(entries.len(), 1, "one baseline × suite");
        let entry: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entries[0].path()).expect("entry")).expect("json");
        eprintln!("cached base logits: {} bytes for 16 chunks of 128 tokens", entry["size"]);
        assert!(text.contains(&format!("alki_agent_eval_base_logits_bytes {}\n", entry["size"])), "{text}");

        // An activation of B1 whose desired state names the suite and A as the baseline: evaluated once
        // committed, against A's cached logits.
        let mut desired = proto::DesiredState {
            generation: 2,
            bundle: Some(bundle_b1.location.to_proto()),
            rollout_id: "r-b1".into(),
            cohort: "B".into(),
            eval_suite: Some(suite_ref.clone()),
            eval_baseline: Some(bundle_a.location.to_proto()),
            eval_baseline_variant_digest: bundle_a.variants[0].to_string(),
            ..Default::default()
        };
        desire(&running, desired.clone()).await;
        eprintln!("activating B1 with the suite");
        let after = eval_report(&mut running.up, |r| r.rollout_id == "r-b1").await;
        assert_eq!(
            (after.candidate.clone(), after.baseline.clone()),
            (bundle_b1.variants[0].clone(), Some(bundle_a.variants[0].clone()))
        );
        assert!(kld(measured(&after)).top1_agreement.value >= 0.9);
        // The same desired state again (as after a reconnect, with a new generation): not evaluated again.
        // Evaluations run in order, so the next report is the command's, not a second one of the rollout's.
        desired.generation = 3;
        desire(&running, desired).await;
        next_where(&mut running.up, status_with(Phase::Active, 3)).await;
        let missing = proto::BundleRef { digest: Digest::of(b"no such suite").to_string(), ..suite_ref.clone() };
        command(&running, "e-missing", &bundle_b2, &missing).await;
        let next = next_where(&mut running.up, |m| matches!(m, agent_message::Msg::Eval(_))).await;
        let agent_message::Msg::Eval(next) = next else { unreachable!() };
        assert_eq!(
            (next.command_id.as_str(), next.rollout_id.as_str()),
            ("e-missing", ""),
            "no second evaluation of r-b1"
        );
        let text = scrape(metrics).await;
        assert!(text.contains("alki_agent_eval_base_logits_total{result=\"computed\"} 1\n"), "A's logits once: {text}");
        let stored = alki_agent::eval::files::EvaluationsFile::new(&dir.path().join("data")).load();
        assert_eq!(stored.len(), 5, "every report is kept on the device");
        running.stop().await;
    })
    .await
    .expect("bounded");
}

/// A model file on the real build, for the library-level tests.
async fn file_model(bin: &Path, path: &Path) -> Model {
    let (_, model) = alki_agent::eval::cli::file_model(&bin.join("llama-server"), path).await.expect("a model file");
    model.expect("llama-perplexity beside llama-server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_the_suites_time_budget_is_killed_and_reported_out_of_time() {
    let Some(bin) = bin_dir() else { return };
    tokio::time::timeout(REAL_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let [a, b1, ..] = models(dir.path(), &bin);
        let files = suite_files(&corpus(), r#"{"id":"p","prompt":"Hi","max_tokens":2,"checks":[{"contains":"x"}]}"#, 1);
        let suite = Suite::parse(files.files()).expect("suite");
        let corpus_path = dir.path().join("corpus.txt");
        std::fs::write(&corpus_path, &files.corpus).expect("corpus");
        let store = ContentStore::open(&dir.path().join("content")).expect("store");
        let logits = BaseLogits::new(store, &dir.path().join("content"));
        let instance = InstanceOptions {
            llama_server: bin.join("llama-server"),
            extra_args: Vec::new(),
            launcher: Vec::new(),
            log_dir: dir.path().join("logs"),
            health_timeout: Duration::from_secs(120),
            stop: StopPolicy::default(),
        };
        let http = http_client();
        let meter = Meter {
            instance: &instance,
            http: &http,
            priority: Priority::Normal,
            threads: 0,
            logits: &logits,
            disk_reserve: 0,
            speeds: None,
        };
        let (a, b1) = (file_model(&bin, &a).await, file_model(&bin, &b1).await);
        let digest = Digest::of(b"suite");
        let started = std::time::Instant::now();
        let refused = meter
            .measure(
                &b1,
                Some(Baseline::Model(Box::new(a))),
                SuiteRef { digest: &digest, suite: &suite, corpus: &corpus_path },
            )
            .await
            .expect_err("a one-second budget");
        assert_eq!(refused, CouldNotRun::OutOfTime { budget_seconds: 1 });
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "killed at the deadline, not waited for: {:?}",
            started.elapsed()
        );
        // The deadline fell in the baseline's run (nothing cached) or in the candidate's (the baseline whole).
        let whole = alki_shared::eval::perplexity::base_logits_size(128, 32000, 16).expect("size");
        let cached = logits.bytes().await;
        assert!(cached == 0 || cached == whole, "only whole baseline logits are cached: {cached} bytes");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alki_agent_eval_runs_one_evaluation_by_hand() {
    let Some(bin) = bin_dir() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b1, ..] = models(dir.path(), &bin);
    let suite_dir = dir.path().join("suite");
    std::fs::create_dir_all(&suite_dir).expect("suite dir");
    let files =
        suite_files(&corpus(), r#"{"id":"count","prompt":"1, 2, 3,","max_tokens":4,"checks":[{"regex":"."}]}"#, 600);
    std::fs::write(suite_dir.join("suite.toml"), &files.manifest).expect("suite.toml");
    std::fs::write(suite_dir.join("corpus.txt"), &files.corpus).expect("corpus");
    std::fs::write(suite_dir.join("prompts.jsonl"), &files.prompts).expect("prompts");
    let config = dir.path().join("agent.toml");
    let text = format!(
        "data_dir = {data:?}\n[controller]\nurl = \"http://127.0.0.1:1\"\ninsecure_plaintext = true\ntoken_file = \"/dev/null\"\n\
         [runtime]\nllama_server = {server:?}\n[eval]\npriority = \"normal\"\n",
        data = dir.path().join("data"),
        server = bin.join("llama-server"),
    );
    std::fs::write(&config, text).expect("config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_alki-agent"))
        .args(["eval", "--config"])
        .arg(&config)
        .arg("--suite")
        .arg(&suite_dir)
        .arg("--model")
        .arg(&b1)
        .arg("--baseline")
        .arg(&a)
        .args(["-o", "json"])
        .output()
        .expect("alki-agent runs");
    assert!(output.status.success(), "alki-agent eval: {}", String::from_utf8_lossy(&output.stderr));
    let result: QualityResult = serde_json::from_slice(&output.stdout).expect("a quality result in JSON");
    let m = measured(&result);
    assert!(m.kl_divergence.expect("KLD").top1_agreement.value >= 0.9);
    assert_eq!((m.golden.prompts, m.golden.passed), (1, 1));
    let (candidate, _) = alki_shared::digest::hash_file(&b1).await.expect("hash");
    assert_eq!(result.candidate, candidate, "a file is named by its digest");
    let suite = alki_agent::eval::cli::read_suite_dir(&suite_dir).expect("suite dir");
    assert_eq!(result.suite, suite.digest, "the digest the suite would have in a registry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calibration_with_a_suite_evaluates_each_variant_against_the_most_precise_one() {
    let Some(bin) = bin_dir() else { return };
    tokio::time::timeout(REAL_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let [a, b1, ..] = models(dir.path(), &bin);
        let registry = Registry::start(dir.path());
        let (key, policy) = trusted_key(dir.path());
        let bundle = registry.push_bundle("acme/tiny", &[("F16", &a), ("Q8_0", &b1)]).await;
        registry.sign("acme/tiny", &bundle.location.digest, &key).await;
        let prompts = r#"{"id":"count","prompt":"1, 2, 3,","max_tokens":4,"checks":[{"regex":"."}]}"#;
        let files = suite_files(&corpus(), prompts, 600);
        let suite = Suite::parse(files.files()).expect("suite");
        let suite_digest = registry.push_suite("acme/suites", "smoke", &files, &suite).await;
        registry.sign("acme/suites", &suite_digest, &key).await;
        let mut running =
            start_agent(TOKEN, |controller| agent_config(dir.path(), &bin, &registry.host(), &policy, controller))
                .await;

        let calibrate = proto::Calibrate {
            bundle: Some(bundle.location.to_proto()),
            repetitions: 1,
            suite: Some(registry.location("acme/suites", &suite_digest).to_proto()),
        };
        running.command("cal", proto::command::Kind::Calibrate(calibrate)).await;
        let benchmarks = running.benchmark_report("cal").await;
        assert_eq!(benchmarks.results.len(), 2, "both variants benchmarked first: {:?}", benchmarks.error);
        let f16 = eval_report(&mut running.up, |r| r.command_id == "cal").await;
        let q8 = eval_report(&mut running.up, |r| r.command_id == "cal").await;
        let (f16_variant, q8_variant) = (&bundle.variants[0], &bundle.variants[1]);
        assert_eq!((&f16.candidate, f16.baseline.as_ref()), (f16_variant, Some(f16_variant)), "in index order");
        assert_eq!((&q8.candidate, q8.baseline.as_ref()), (q8_variant, Some(f16_variant)), "against the most precise");
        let kld = |r: &QualityResult| measured(r).kl_divergence.expect("KLD");
        assert_eq!(kld(&f16).top1_agreement.value, 1.0, "the baseline against itself");
        assert!(kld(&q8).top1_agreement.value >= 0.9 && kld(&q8).kld_mean.value < 0.001, "{:?}", kld(&q8));
        assert_eq!(measured(&q8).golden.passed, 1);
        running.stop().await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_does_not_fit_beside_itself_is_evaluated_in_the_stop_then_start_gap() {
    let Some(bin) = bin_dir() else { return };
    tokio::time::timeout(REAL_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let [a, b1, ..] = models(dir.path(), &bin);
        let registry = Registry::start(dir.path());
        let (key, policy) = trusted_key(dir.path());
        let bundle_a = registry.push_bundle("acme/a", &[("F16", &a)]).await;
        registry.sign("acme/a", &bundle_a.location.digest, &key).await;
        // B1 claims 60% of the memory available: it fits in the gap, not twice (beside itself).
        let claimed = alki_agent::inventory::memory_available() / 10 * 6;
        let bundle_b1 = registry.push_bundle_needing("acme/b1", &[("Q8_0", &b1)], Some(claimed)).await;
        registry.sign("acme/b1", &bundle_b1.location.digest, &key).await;
        let prompts = r#"{"id":"count","prompt":"1, 2, 3,","max_tokens":4,"checks":[{"regex":"."}]}"#;
        let files = suite_files(&corpus(), prompts, 600);
        let suite = Suite::parse(files.files()).expect("suite");
        let suite_digest = registry.push_suite("acme/suites", "smoke", &files, &suite).await;
        registry.sign("acme/suites", &suite_digest, &key).await;
        let runtime = "swap_strategy = \"stop_then_start\"\nmemory_reserve_mib = 0";
        let mut running = start_agent(TOKEN, |controller| {
            agent_config_with(dir.path(), &bin, &registry.host(), &policy, controller, runtime)
        })
        .await;
        running.desire(1, &bundle_a.location).await;
        next_where(&mut running.up, status_with(Phase::Active, 1)).await;

        let desired = proto::DesiredState {
            generation: 2,
            bundle: Some(bundle_b1.location.to_proto()),
            rollout_id: "r-gap".into(),
            cohort: "B".into(),
            eval_suite: Some(registry.location("acme/suites", &suite_digest).to_proto()),
            eval_baseline: Some(bundle_a.location.to_proto()),
            eval_baseline_variant_digest: bundle_a.variants[0].to_string(),
            ..Default::default()
        };
        desire(&running, desired).await;
        let report = report_and_status(&mut running.up, |r| r.rollout_id == "r-gap", Phase::Active, 2).await;
        let result = wire::from_proto(report.result.as_ref().expect("a result")).expect("a well-formed result");
        let m = measured(&result);
        let kld = m.kl_divergence.expect("B1 against A's logits, computed in the gap");
        assert!(kld.top1_agreement.value >= 0.9 && kld.kld_mean.value < 0.001, "{kld:?}");
        assert_eq!((m.golden.prompts, m.golden.passed), (1, 1), "asked of B1's new instance: {:?}", m.golden);
        assert!(common::running::completion(running.front).await.is_some(), "B1 serves after the gap");
        let text = scrape(running.metrics.expect("metrics served")).await;
        assert!(text.contains("alki_agent_evaluations_total{outcome=\"measured\",place=\"gap\"} 1\n"), "{text}");
        let gaps: Vec<&str> = text.lines().filter(|l| l.starts_with("alki_agent_swap_gap_seconds_")).collect();
        eprintln!(
            "evaluated in the gap in {} ms; swap gaps (A's start, then B1's with the evaluation): {gaps:?}",
            m.duration_ms
        );
        running.stop().await;
    })
    .await
    .expect("bounded");
}
