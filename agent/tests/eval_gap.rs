//! Evaluation in a stop-then-start swap's gap, with the fake llama-server and a stand-in llama-perplexity
//! (a shell script printing what the real tool prints; the real tools are in tests/eval_real_llama.rs). An
//! in-process agent with a real registry serves A, then activates B with a desired state naming a suite:
//! - B claims more memory than is left beside itself: it is evaluated in the gap (A's logits, B's KL
//!   divergence, then the golden prompts on B's new serving instance before held requests are released),
//!   the report says so, the evaluation after the activation does not run again, and B serves;
//! - the same with a tool slower than `[eval] gap_budget_seconds`: cut at the budget, reported as out of
//!   time naming the budget, and B serves all the same;
//! - a reserve larger than the memory: neither beside nor in the gap, so the usual "does not fit" with its
//!   numbers.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use alki_agent::Config;
use alki_agent::eval::files::{DoneFile, done_key};
use alki_shared::digest::Digest;
use alki_shared::eval::perplexity::base_logits_size;
use alki_shared::eval::quality::{CouldNotRun, Outcome, QualityResult};
use alki_shared::eval::suite::Suite;
use alki_shared::eval::wire;
use alki_shared::proto::{self, Phase, agent_message, controller_message};
use common::controller::{next_where, report_and_status, status_with};
use common::registry::{PushedBundle, Registry, corpus, suite_files, trusted_key};
use common::running::{Running, start_agent, until_served_by};
use common::{TEST_TIMEOUT, fake_llama_server, fake_model};

const TOKEN: &str = "gap-agent-token";
/// One golden prompt whose checks pass only on B's serving instance: the fake llama-server's replies name
/// the model file it runs, and B serves from `bundles/` (an evaluation's own instance runs from elsewhere).
const PROMPTS: &str =
    r#"{"id":"p1","prompt":"Hello","max_tokens":4,"checks":[{"contains":"fake reply"},{"contains":"/bundles/"}]}"#;
/// What llama-perplexity prints after a KL-divergence run (the summary the agent reads).
const KLD_SUMMARY: &str = "\
====== Perplexity statistics ======
Mean PPL(Q)                   :  12.600000 \u{b1}   0.250000
Mean PPL(base)                :  12.500000 \u{b1}   0.250000
Mean PPL(Q)/PPL(base)         :   1.008000 \u{b1}   0.001000

====== KL divergence statistics ======
Mean    KLD:   0.004000 \u{b1}   0.000100
Maximum KLD:   0.090000
99.0%   KLD:   0.040000
Median  KLD:   0.002000

====== Token probability statistics ======
Same top p: 97.500 \u{b1} 0.500 %
";

/// A llama.cpp build directory: the fake llama-server, and a stand-in llama-perplexity that writes a valid
/// base-logits file and prints the KL-divergence summary, or (`slow`) runs for a minute.
fn tools(dir: &Path, slow: bool) -> PathBuf {
    let bin = dir.join(if slow { "slow-bin" } else { "bin" });
    std::fs::create_dir_all(&bin).expect("bin");
    std::os::unix::fs::symlink(fake_llama_server(), bin.join("llama-server")).expect("llama-server");
    // One chunk of the suite's 128-token context over a 2-token vocabulary.
    let size = base_logits_size(128, 2, 1).expect("size");
    let mut logits = b"_logits_".to_vec();
    for count in [128i32, 2, 1] {
        logits.extend(count.to_le_bytes());
    }
    logits.resize(usize::try_from(size).expect("small"), 0);
    std::fs::write(bin.join("base.logits"), logits).expect("logits");
    std::fs::write(bin.join("kld.out"), KLD_SUMMARY).expect("summary");
    let work = if slow {
        "exec sleep 60".to_owned()
    } else {
        r#"case " $* " in *" --kl-divergence "*) cat "$dir/kld.out"; exit 0 ;; esac
out=""; prev=""
for arg in "$@"; do [ "$prev" = "--kl-divergence-base" ] && out="$arg"; prev="$arg"; done
[ -n "$out" ] && cp "$dir/base.logits" "$out"
echo "Final estimate: PPL = 12.5 +/- 0.25" >&2"#
            .to_owned()
    };
    let script = format!(
        "#!/bin/sh\ndir=$(dirname \"$0\")\ncase \" $* \" in *\" --version \"*) echo 'version: 1 (fake)' >&2; exit 0 ;; esac\n{work}\n"
    );
    let tool = bin.join("llama-perplexity");
    std::fs::write(&tool, script).expect("tool");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin.join("llama-server")
}

struct Setup {
    dir: tempfile::TempDir,
    registry: Registry,
    a: PushedBundle,
    b: PushedBundle,
    suite: proto::BundleRef,
    /// B's files, for the memory they claim by default.
    weights: u64,
}

/// A and B pushed and signed (B claiming `b_memory` bytes when given), and the suite.
async fn setup(b_memory: Option<u64>) -> (Setup, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path());
    let (key, policy) = trusted_key(dir.path());
    let a = fake_model(dir.path(), "a.gguf", &["NAME=a"]);
    let b = fake_model(dir.path(), "b.gguf", &["NAME=b"]);
    let weights = std::fs::metadata(&b).expect("b").len();
    let bundle_a = registry.push_bundle("acme/a", &[("Q8_0", &a)]).await;
    registry.sign("acme/a", &bundle_a.location.digest, &key).await;
    let bundle_b = registry.push_bundle_needing("acme/b", &[("Q8_0", &b)], b_memory).await;
    registry.sign("acme/b", &bundle_b.location.digest, &key).await;
    let files = suite_files(&corpus(), PROMPTS, 300);
    let parsed = Suite::parse(files.files()).expect("suite");
    let suite_digest = registry.push_suite("acme/suites", "gap", &files, &parsed).await;
    registry.sign("acme/suites", &suite_digest, &key).await;
    let suite = registry.location("acme/suites", &suite_digest).to_proto();
    (Setup { dir, registry, a: bundle_a, b: bundle_b, suite, weights }, policy)
}

fn config(s: &Setup, policy: &Path, server: &Path, controller: SocketAddr, reserve_mib: u64, budget: u32) -> Config {
    let token_file = s.dir.path().join("agent.token");
    std::fs::write(&token_file, TOKEN).expect("token");
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
health_timeout_secs = 15
drain_timeout_secs = 2
watch_window_secs = 0
swap_strategy = "stop_then_start"
memory_reserve_mib = {reserve_mib}
[eval]
priority = "normal"
gap_budget_seconds = {budget}
"#,
        data = s.dir.path().join("data"),
        registry = s.registry.host(),
    );
    Config::from_toml(&text).expect("valid config")
}

/// Serves A, then activates B with a desired state naming the suite (rollout `r-gap`, baseline A); returns
/// the rollout's eval report once B is active too.
async fn swap_to_b_with_the_suite(running: &mut Running, s: &Setup) -> proto::EvalReport {
    running.desire(1, &s.a.location).await;
    next_where(&mut running.up, status_with(Phase::Active, 1)).await;
    until_served_by(running.front, "a.gguf").await;
    let desired = proto::DesiredState {
        generation: 2,
        bundle: Some(s.b.location.to_proto()),
        rollout_id: "r-gap".into(),
        cohort: "B".into(),
        eval_suite: Some(s.suite.clone()),
        eval_baseline: Some(s.a.location.to_proto()),
        eval_baseline_variant_digest: s.a.variants[0].to_string(),
        ..Default::default()
    };
    let message = proto::ControllerMessage { msg: Some(controller_message::Msg::DesiredState(desired)) };
    running.down.send(message).await.expect("desired state");
    report_and_status(&mut running.up, |r| r.rollout_id == "r-gap", Phase::Active, 2).await
}

/// Logs to the test's output (`RUST_LOG`, warnings by default).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

fn result_of(report: &proto::EvalReport) -> QualityResult {
    wire::from_proto(report.result.as_ref().expect("a result")).expect("a well-formed result")
}

async fn scrape(running: &Running) -> String {
    let metrics = running.metrics.expect("metrics served");
    reqwest::get(format!("http://{metrics}/metrics")).await.expect("metrics").text().await.expect("text")
}

/// Memory B claims so that it fits in the gap but not twice (beside itself): 60% of what is available
/// now, so the test holds unless the machine's free memory moves by a fifth while it runs.
fn more_than_half_the_memory() -> u64 {
    alki_agent::inventory::memory_available() / 10 * 6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_does_not_fit_beside_itself_is_evaluated_in_the_gap_then_serves() {
    logs();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (s, policy) = setup(Some(more_than_half_the_memory())).await;
        let server = tools(s.dir.path(), false);
        let mut running = start_agent(TOKEN, |c| config(&s, &policy, &server, c, 0, 120)).await;
        let report = swap_to_b_with_the_suite(&mut running, &s).await;
        let result = result_of(&report);
        let Outcome::Measured(m) = &result.outcome else { panic!("not measured: {:?}", result.outcome) };
        assert_eq!((&result.candidate, result.baseline.as_ref()), (&s.b.variants[0], Some(&s.a.variants[0])));
        let kld = m.kl_divergence.expect("B against A's logits");
        assert_eq!((kld.kld_mean.value, kld.top1_agreement.value), (0.004, 0.975));
        assert_eq!((m.golden.prompts, m.golden.passed), (1, 1), "asked of B's serving instance: {:?}", m.golden);
        // Remembered before it was reported: the evaluation after the activation skips it.
        let key = done_key(&s.b.variants[0], &result.suite, Some(&s.a.variants[0]));
        assert!(DoneFile::new(&s.dir.path().join("data")).contains(&key).await);

        until_served_by(running.front, "b.gguf").await;
        // Evaluations run in order: the next report is this command's, not a second one of the rollout's.
        let missing = proto::BundleRef { digest: Digest::of(b"no such suite").to_string(), ..s.suite.clone() };
        let evaluate =
            proto::Evaluate { bundle: Some(s.b.location.to_proto()), suite: Some(missing), ..Default::default() };
        running.command("e-after", proto::command::Kind::Evaluate(evaluate)).await;
        let next = next_where(&mut running.up, |m| matches!(m, agent_message::Msg::Eval(_))).await;
        let agent_message::Msg::Eval(next) = next else { unreachable!("matched eval reports only") };
        assert_eq!((next.command_id.as_str(), next.rollout_id.as_str()), ("e-after", ""), "no second evaluation");

        let text = scrape(&running).await;
        for line in [
            "alki_agent_evaluations_total{outcome=\"measured\",place=\"gap\"} 1",
            "alki_agent_evaluations_total{outcome=\"measured\",place=\"beside\"} 0",
            "alki_agent_eval_base_logits_total{result=\"computed\"} 1",
            // Both activations went stop-then-start (A's with nothing served before it).
            "alki_agent_swap_gap_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        running.stop().await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_past_the_gap_budget_is_cut_and_reported_and_the_candidate_serves() {
    logs();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (s, policy) = setup(Some(more_than_half_the_memory())).await;
        let server = tools(s.dir.path(), true);
        let mut running = start_agent(TOKEN, |c| config(&s, &policy, &server, c, 0, 1)).await;
        let report = swap_to_b_with_the_suite(&mut running, &s).await;
        assert_eq!(result_of(&report).outcome, Outcome::CouldNotRun(CouldNotRun::OutOfTime { budget_seconds: 1 }));
        let Some(proto::quality_result::Outcome::CouldNotRun(c)) = report.result.and_then(|r| r.outcome) else {
            panic!("could not run");
        };
        assert!(c.problem.contains("[eval] gap_budget_seconds = 1"), "the reason names the budget: {}", c.problem);
        until_served_by(running.front, "b.gguf").await;
        let text = scrape(&running).await;
        let line = "alki_agent_evaluations_total{outcome=\"out_of_time\",place=\"gap\"} 1";
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        running.stop().await;
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_that_fits_neither_beside_nor_in_the_gap_does_not_fit_with_its_numbers() {
    logs();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (s, policy) = setup(None).await;
        let server = tools(s.dir.path(), false);
        let reserve_mib = 1 << 20;
        let mut running = start_agent(TOKEN, |c| config(&s, &policy, &server, c, reserve_mib, 120)).await;
        let report = swap_to_b_with_the_suite(&mut running, &s).await;
        let Outcome::CouldNotRun(CouldNotRun::DoesNotFit { needed_bytes, available_bytes }) =
            result_of(&report).outcome
        else {
            panic!("expected DoesNotFit: {report:?}");
        };
        assert_eq!(needed_bytes, 2 * s.weights + (reserve_mib << 20), "the larger model's need and the reserve");
        assert!(available_bytes > 0 && available_bytes < reserve_mib << 20);
        until_served_by(running.front, "b.gguf").await;
        let text = scrape(&running).await;
        let line = "alki_agent_evaluations_total{outcome=\"does_not_fit\",place=\"beside\"} 1";
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        running.stop().await;
    })
    .await
    .expect("bounded");
}
