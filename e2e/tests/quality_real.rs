//! Quality gates end to end with the real binaries and the real llama.cpp tools (llama-server,
//! llama-perplexity, llama-quantize): devices serve the tiny model A; an eval suite (a corpus, golden
//! prompts whose `exact` checks were recorded from A's real replies) is pushed and signed with alkictl; a
//! rollout to B1 (A in Q8_0) completes; rollouts to B2 (other weights) and B3 (a broken chat template) halt
//! with the gate and the measured values in the reason; devices that cannot run a suite hold the rollout
//! for a human; `bench recommend` chooses the fastest variant only among those within a measured floor (F16
//! when the floor excludes Q8_0, none when it excludes both);
//! eval suites that are unsigned, tampered or too large are refused with their reason.
//!
//! The tests share two cores with everything else, so they run one at a time ([`SERIAL`]).

mod quality_support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use alki_bundle::layout::Layout;
use alki_bundle::suite::SuiteSource;
use alki_bundle::{Progress, Remote};
use alki_e2e::harness::{self, Controller, Proc, llama_bin_dir, run, wait_for};
use alki_shared::digest::Digest;
use alki_shared::eval::artifact::MEDIA_TYPE_CORPUS;
use alki_shared::eval::suite::MAX_CORPUS_BYTES;
use alki_shared::oci::{ANNOTATION_TITLE, Descriptor, MEDIA_TYPE_IMAGE_MANIFEST};
use anyhow::{Context as _, bail, ensure};
use quality_support::{Models, SMOKE, SuiteShape, lenient_prompts, make_models, record_golden_prompts, write_suite};
use serde_json::Value;

/// One heavy test at a time: each runs a controller, agents and llama-servers.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long a rollout step may take: pull, start llama-server, benchmark, evaluate, judge.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(240);

/// Devices evaluate a candidate once its watch window passed (the previous model released): one second
/// here, not the default minute.
const WATCH_WINDOW: &str = "watch_window_secs = 1";

/// The gates that separate B1 from B2 and B3 on the tiny model (see shared/tests/fixtures/eval/README.md).
const GATES: [&str; 6] = ["--max-kld", "0.001", "--min-top1-agreement", "0.9", "--min-golden-pass", "1"];

/// A controller trusting one signing key, and agents on the real llama-server with a trust policy of that key.
struct Fleet {
    dir: tempfile::TempDir,
    controller: Controller,
    key: harness::SigningKey,
    llama_bin: PathBuf,
    agents: Vec<Proc>,
    devices: Vec<String>,
}

impl Fleet {
    fn start(devices: &[&str]) -> anyhow::Result<Fleet> {
        let llama_bin = llama_bin_dir()?;
        let dir = tempfile::tempdir()?;
        let key = harness::generate_key(dir.path(), "release")?;
        let controller = harness::start_controller(dir.path(), &["--trusted-key", path(&key.public_key)?])?;
        let trust_policy = harness::write_trust_policy(dir.path(), &key.public_key)?;
        let mut agents = Vec::new();
        for device_id in devices {
            let server = llama_bin.join("llama-server");
            agents.push(controller.start_agent(dir.path(), device_id, "lab", &server, &trust_policy, WATCH_WINDOW)?.0);
        }
        let fleet =
            Fleet { dir, controller, key, llama_bin, agents, devices: devices.iter().map(|d| d.to_string()).collect() };
        fleet.wait("every agent to connect", Duration::from_secs(60), || {
            let all = fleet.devices()?;
            Ok(fleet
                .devices
                .iter()
                .all(|id| all.iter().any(|d| d["id"] == id.as_str() && d["connected"] == true))
                .then_some(()))
        })?;
        Ok(fleet)
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        self.controller.alkictl_json(args)
    }

    /// Runs alkictl expecting it to fail; returns its error output.
    fn refused(&self, args: &[&str]) -> anyhow::Result<String> {
        match run(self.controller.alkictl()?.args(args).env("ALKI_KEY_PASSWORD", &self.key.password)) {
            Ok(out) => bail!("alkictl {args:?} succeeded: {out}"),
            Err(e) => Ok(format!("{e:#}")),
        }
    }

    fn procs(&self) -> Vec<&Proc> {
        std::iter::once(&self.controller.proc).chain(&self.agents).collect()
    }

    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        wait_for(what, timeout, &self.procs(), check)
    }

    fn devices(&self) -> anyhow::Result<Vec<Value>> {
        Ok(self.json(&["devices", "list"])?.as_array().cloned().unwrap_or_default())
    }

    /// Packs `models` as one bundle, pushes it to `repo_tag` and signs it; returns the bundle's digest.
    fn push_bundle(&self, models: &[&Path], repo_tag: &str) -> anyhow::Result<String> {
        let layout = self.dir.path().join(repo_tag.replace([':', '/'], "-"));
        let mut args = vec!["bundle", "pack"];
        for m in models {
            args.push(path(m)?);
        }
        args.extend(["--out", path(&layout)?, "--context", "2048"]);
        let packed = self.json(&args)?;
        self.json(&["bundle", "push", path(&layout)?, repo_tag])?;
        self.controller.sign(repo_tag, &self.key)?;
        text(&packed, "digest")
    }

    /// `alkictl eval push DIR REPO:TAG --sign-key`: returns what it printed.
    fn push_suite(&self, dir: &Path, repo_tag: &str) -> anyhow::Result<Value> {
        let out = run(self
            .controller
            .alkictl()?
            .args(["eval", "push", path(dir)?, repo_tag, "--sign-key", path(&self.key.private_key)?, "-o", "json"])
            .env("ALKI_KEY_PASSWORD", &self.key.password))?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Waits until every device is active on the bundle `digest`.
    fn wait_serving(&self, digest: &str) -> anyhow::Result<()> {
        self.wait(&format!("every device to serve {digest}"), ROLLOUT_DEADLINE, || {
            let all = self.devices()?;
            let serving = |id: &String| {
                all.iter().any(|d| {
                    d["id"] == id.as_str()
                        && d["phase"] == "active"
                        && d["running"].as_str().is_some_and(|r| r.ends_with(digest))
                })
            };
            Ok(self.devices.iter().all(serving).then_some(()))
        })
    }

    /// Creates a rollout of `bundle` to the lab with `extra` flags; returns its id.
    fn rollout(&self, bundle: &str, extra: &[&str]) -> anyhow::Result<String> {
        let args = [&["rollout", "create", "--bundle", bundle, "--selector", "site=lab"][..], extra].concat();
        text(&self.json(&args)?, "id")
    }

    /// Waits for the rollout to reach `state`; returns `rollout get`. A rollout that ends in another state
    /// fails at once, with its history.
    fn wait_state(&self, id: &str, state: &str) -> anyhow::Result<Value> {
        let reached = self.wait(&format!("rollout {id} to be {state}"), ROLLOUT_DEADLINE, || {
            let r = self.json(&["rollout", "get", id])?;
            let now = r["state"].as_str().unwrap_or_default().to_owned();
            if now == state {
                Ok(Some(Ok(r)))
            } else if ["completed", "aborted"].contains(&now.as_str()) {
                Ok(Some(Err(format!("rollout {id} ended {now} instead of {state}: {r}"))))
            } else {
                Ok(None)
            }
        })?;
        reached.map_err(|e| {
            anyhow::anyhow!("{e}\nhistory: {}", self.json(&["rollout", "history", id]).unwrap_or_default())
        })
    }

    /// Everything a rollout says about why it is where it is: its message, its classes' reasons, its history.
    fn reasons(&self, id: &str) -> anyhow::Result<String> {
        let r = self.json(&["rollout", "get", id])?;
        let mut text = r["message"].as_str().unwrap_or_default().to_owned();
        for class in r["classes"].as_array().into_iter().flatten() {
            text.push('\n');
            text.push_str(class["reason"].as_str().unwrap_or_default());
        }
        for event in self.json(&["rollout", "history", id])?.as_array().into_iter().flatten() {
            text.push('\n');
            text.push_str(event["message"].as_str().unwrap_or_default());
        }
        Ok(text)
    }

    /// The stored evaluations of a rollout, one per device at least.
    fn evaluations(&self, filter: &[&str]) -> anyhow::Result<Vec<Value>> {
        let args = [&["eval", "list"][..], filter].concat();
        let devices = &self.devices;
        self.wait(&format!("an evaluation from every device ({filter:?})"), ROLLOUT_DEADLINE, || {
            let list = self.json(&args)?.as_array().cloned().unwrap_or_default();
            Ok(devices.iter().all(|d| list.iter().any(|e| e["device_id"] == d.as_str())).then_some(list))
        })
    }
}

/// The text of the one could-not-run reason tolerated in these tests: llama.cpp's logger writes from a
/// thread its tools do not wait for at exit, so the end of llama-perplexity's output (the KL-divergence
/// summary) is sometimes lost (here 7-20% of runs, under load); the agent runs it once more, and both runs
/// can still lose it.
const LOST_SUMMARY: &str = "printed no KL-divergence summary";

/// The evaluations that measured; every other one must be the known lost summary, and one at least measured.
fn measured(evaluations: &[Value]) -> anyhow::Result<Vec<&Value>> {
    let mut measured = Vec::new();
    for e in evaluations {
        match e["could_not_run"].as_str() {
            None => measured.push(e),
            Some(why) if why.contains(LOST_SUMMARY) => eprintln!("tolerated: {} {why}", e["device_id"]),
            Some(why) => bail!("{} could not run the suite: {why}", e["device_id"]),
        }
    }
    ensure!(!measured.is_empty(), "no device measured: {evaluations:?}");
    Ok(measured)
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("temporary paths are UTF-8")
}

fn text(value: &Value, field: &str) -> anyhow::Result<String> {
    value[field].as_str().map(str::to_owned).with_context(|| format!("no {field} in {value}"))
}

/// The number right after `prefix` in `text` (`KL divergence 0.0080 > ...` → 0.008).
fn number_after(text: &str, prefix: &str) -> Option<f64> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-')).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The models, the recorded suite and the budget-breaking suite, made once per fleet.
struct Kit {
    models: Models,
    /// The suite whose golden replies were recorded from A.
    suite: PathBuf,
}

fn kit(fleet: &Fleet) -> anyhow::Result<Kit> {
    let models = make_models(fleet.dir.path(), &fleet.llama_bin)?;
    let golden = record_golden_prompts(&fleet.llama_bin, &models.a, fleet.dir.path())?;
    let suite = write_suite(&fleet.dir.path().join("suite"), &SMOKE, &golden)?;
    Ok(Kit { models, suite })
}

#[test]
fn quality_gates_pass_a_close_quantization_and_halt_far_weights_and_a_broken_template() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let fleet = Fleet::start(&["pi-1", "pi-2"])?;
    let kit = kit(&fleet)?;
    let suite = fleet.push_suite(&kit.suite, "acme/evals:smoke")?;
    let pinned = text(&suite, "pinned")?;
    ensure!(suite["signed"]["signatures"][0]["what"] == "suite", "{suite}");

    let a = fleet.push_bundle(&[&kit.models.a], "acme/tiny:a")?;
    let b1 = fleet.push_bundle(&[&kit.models.b1], "acme/tiny:b1")?;
    fleet.push_bundle(&[&kit.models.b2], "acme/tiny:b2")?;
    fleet.push_bundle(&[&kit.models.b3], "acme/tiny:b3")?;
    let first = fleet.rollout("acme/tiny:a", &[])?;
    fleet.wait_state(&first, "completed")?;
    fleet.wait_serving(&a)?;

    // B2, other weights: the KL-divergence gate aborts the rollout naming the value; devices return to A.
    let with_gates = |policy: &'static str| {
        [&["--eval-suite", pinned.as_str(), "--on-class-failure", policy][..], &GATES[..]].concat()
    };
    let far = fleet.rollout("acme/tiny:b2", &with_gates("abort"))?;
    fleet.wait_state(&far, "aborted")?;
    let reasons = fleet.reasons(&far)?;
    let kld = number_after(&reasons, "KL divergence ").with_context(|| format!("no KL divergence named: {reasons}"))?;
    ensure!(kld > 0.001 && reasons.contains("> --max-kld 0.001"), "the gate and the value: {reasons}");
    let evaluations = fleet.evaluations(&["--rollout", &far])?;
    for e in measured(&evaluations)? {
        ensure!(e["kld_mean"].as_f64().is_some_and(|k| k > 0.001), "B2 is far from A on every device: {e}");
        ensure!(e["top1_agreement"].as_f64().is_some_and(|t| t < 0.9), "{e}");
        ensure!(e["baseline"].as_str().is_some_and(|b| b.ends_with(&a)), "measured against A: {e}");
    }
    let compared = fleet.json(&["eval", "compare", &far])?;
    ensure!(compared["classes"][0]["quality"]["max_kld"].as_f64().is_some_and(|k| k > 0.001), "{compared}");
    fleet.wait_serving(&a)?;

    // B3, A's weights under a wrong template: only the golden prompts see it; the class halts.
    let broken = fleet.rollout("acme/tiny:b3", &with_gates("halt-class"))?;
    let halted = fleet.wait_state(&broken, "aborted")?;
    ensure!(halted["halted_classes"].as_array().is_some_and(|c| !c.is_empty()), "the class halted: {halted}");
    let reasons = fleet.reasons(&broken)?;
    ensure!(reasons.contains("golden pass rate") && reasons.contains("< --min-golden-pass 1"), "{reasons}");
    for e in measured(&fleet.evaluations(&["--rollout", &broken])?)? {
        ensure!(e["kld_mean"].as_f64().is_some_and(|k| k <= 0.001), "B3 has A's weights: {e}");
        let failed = e["failed_checks"].as_array().context("failed checks")?;
        ensure!(failed.iter().any(|f| f.as_str().is_some_and(|f| f.starts_with("capital: exact"))), "{e}");
        let (passed, prompts) =
            (e["golden_passed"].as_u64().context("golden")?, e["golden_prompts"].as_u64().context("golden")?);
        ensure!(passed < prompts, "{e}");
    }
    fleet.wait_serving(&a)?;

    // A suite no device can run within its budget: too few results, so the rollout holds for a human.
    let budget = SuiteShape { name: "over-budget", context_size: 2048, chunks: 1024, time_budget_seconds: 1 };
    let over = write_suite(&fleet.dir.path().join("over-budget"), &budget, &lenient_prompts())?;
    let over = text(&fleet.push_suite(&over, "acme/evals:over-budget")?, "pinned")?;
    let held = fleet.rollout("acme/tiny:b1", &[&["--eval-suite", over.as_str()][..], &GATES[..]].concat())?;
    let paused = fleet.wait_state(&held, "paused")?;
    let reasons = fleet.reasons(&held)?;
    ensure!(reasons.contains("inconclusive") && reasons.contains("could not run"), "{paused}\n{reasons}");
    for e in fleet.evaluations(&["--rollout", &held])? {
        ensure!(e["could_not_run"].as_str().is_some_and(|w| !w.is_empty()), "says why: {e}");
    }
    fleet.json(&["rollout", "abort", &held, "--reason", "e2e: the suite does not fit the budget"])?;
    fleet.wait_serving(&a)?;

    // B1, A in Q8_0: within every gate; the rollout completes and devices serve B1.
    let close = fleet.rollout("acme/tiny:b1", &with_gates("abort"))?;
    let done = fleet.wait_state(&close, "completed")?;
    fleet.wait_serving(&b1)?;
    for e in measured(&fleet.evaluations(&["--rollout", &close])?)? {
        ensure!(e["kld_mean"].as_f64().is_some_and(|k| k <= 0.001), "{e}");
        ensure!(e["top1_agreement"].as_f64().is_some_and(|t| t >= 0.9), "{e}");
        ensure!(e["golden_passed"] == e["golden_prompts"] && e["golden_prompts"].as_u64() > Some(0), "{e}");
    }
    let reported = |c: &Value| {
        c["quality"]["measured"].as_u64().unwrap_or(0) + c["quality"]["could_not_run"].as_u64().unwrap_or(0)
    };
    let classes = done["classes"].as_array().context("classes")?;
    ensure!(classes.iter().all(|c| reported(c) == 2 && c["quality"]["max_kld"].as_f64() <= Some(0.001)), "{done}");
    let listed = fleet.json(&["eval", "list", "--suite", &pinned, "--bundle", &format!("acme/tiny@{b1}")])?;
    ensure!(listed.as_array().is_some_and(|l| l.len() >= 2), "eval list finds them by references: {listed}");
    Ok(())
}

#[test]
fn bench_recommend_chooses_the_fastest_variant_only_within_the_measured_floor() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let fleet = Fleet::start(&["pi-1", "pi-2"])?;
    let kit = kit(&fleet)?;
    let suite = text(&fleet.push_suite(&kit.suite, "acme/evals:smoke")?, "pinned")?;
    let bundle = fleet.push_bundle(&[&kit.models.a, &kit.models.b1], "acme/tiny:two")?;

    fleet.json(&["bench", "calibrate", "acme/tiny:two", "--suite", &suite, "--selector", "site=lab"])?;
    fleet.wait("calibration benchmarks of both variants on every device", ROLLOUT_DEADLINE, || {
        let results = fleet.json(&["bench", "list", "--bundle-digest", &bundle])?;
        let results = results.as_array().cloned().unwrap_or_default();
        let per_device =
            |d: &String| results.iter().filter(|r| r["device_id"] == d.as_str() && r["error"] == "").count();
        Ok(fleet.devices.iter().all(|d| per_device(d) >= 2).then_some(()))
    })?;
    fleet.wait("an evaluation of each variant on every device", ROLLOUT_DEADLINE, || {
        let list = fleet.json(&["eval", "list", "--bundle", &bundle, "--suite", &suite])?;
        let list = list.as_array().cloned().unwrap_or_default();
        let per_device = |d: &String| list.iter().filter(|e| e["device_id"] == d.as_str()).count();
        Ok(fleet.devices.iter().all(|d| per_device(d) >= 2).then_some(()))
    })?;

    let recommend = |floor: &[&str]| -> anyhow::Result<Value> {
        let args = [&["bench", "recommend", "acme/tiny:two", "--suite", suite.as_str()][..], floor].concat();
        let r = fleet.json(&args)?;
        r["classes"].as_array().and_then(|c| c.first()).cloned().with_context(|| format!("no class in {r}"))
    };
    let tokens = |class: &Value, name: &str| -> Option<f64> {
        class["variants"].as_array()?.iter().find(|v| v["variant_name"] == name)?["generation_tokens_per_second"]["median"].as_f64()
    };

    // Within a loose floor both variants qualify and the faster one is chosen: the smaller Q8_0 whenever it
    // measured at least as fast. (The tiny model is cache-resident: its F16 and Q8_0 generate at about the same
    // speed, so which is faster here is the machine's noise; the floor below decides whatever the speeds.)
    let loose = recommend(&["--max-kld", "0.001", "--min-top1-agreement", "0.9"])?;
    let (f16, q8) =
        (tokens(&loose, "F16").context("F16 calibrated")?, tokens(&loose, "Q8_0").context("Q8_0 calibrated")?);
    eprintln!("calibrated: F16 {f16:.0} tokens/s, Q8_0 {q8:.0} tokens/s");
    let fastest = if q8 >= f16 { "Q8_0" } else { "F16" };
    ensure!(loose["variant_name"] == fastest, "the fastest within the floor ({f16} vs {q8} tok/s): {loose}");
    let q8_quality =
        loose["variants"].as_array().and_then(|vs| vs.iter().find(|v| v["variant_name"] == "Q8_0")).context("Q8_0")?;
    ensure!(
        q8_quality["quality"]["min_top1_agreement"].as_f64().is_some_and(|t| (0.9..0.99).contains(&t)),
        "{q8_quality}"
    );

    // A floor Q8_0 does not meet (it agrees with F16 on about 98% of tokens): F16, however fast Q8_0 is.
    let tight = recommend(&["--min-top1-agreement", "0.99"])?;
    ensure!(tight["variant_name"] == "F16", "{tight}");

    // A floor nothing meets (F16 against itself has a perplexity ratio of 1): no variant.
    let impossible = recommend(&["--max-perplexity-ratio", "0.5"])?;
    ensure!(impossible["variant_digest"] == "" && impossible["reason"] != "", "{impossible}");
    Ok(())
}

/// Pushes a suite whose manifest declares a corpus over the cap (alkictl refuses to, so the library's
/// layout and push are used directly) and signs it; returns its pinned reference.
fn push_oversized_suite(fleet: &Fleet, valid: &Path) -> anyhow::Result<String> {
    let source = SuiteSource::read(valid)?;
    let mut manifest = source.oci_manifest();
    let big = vec![b'a'; MAX_CORPUS_BYTES + 1];
    let mut corpus = Descriptor::new(MEDIA_TYPE_CORPUS, Digest::of(&big), big.len() as u64);
    corpus.annotations.insert(ANNOTATION_TITLE.to_owned(), "corpus.txt".to_owned());
    manifest.layers[1] = corpus;
    let out = fleet.dir.path().join("oversized-layout");
    let layout = Layout::create(&out)?;
    for blob in [&b"{}"[..], &source.manifest, &big, &source.prompts] {
        layout.write_blob(blob)?;
    }
    let bytes = serde_json::to_vec(&manifest)?;
    let digest = layout.write_blob(&bytes)?;
    layout.write_index(Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, digest.clone(), bytes.len() as u64), "too-large")?;
    let token = std::fs::read_to_string(&fleet.controller.token_file)?.trim().to_owned();
    let remote = Remote::with_token(fleet.controller.registry.clone(), "acme/evals".into(), Some(token), false)
        .trusting(vec![std::fs::read(&fleet.controller.ca_file)?]);
    tokio::runtime::Runtime::new()?.block_on(alki_bundle::push::push(&out, &remote, "too-large", &Progress::none()))?;
    let signed = fleet.controller.sign("acme/evals:too-large", &fleet.key)?;
    text(&signed, "reference")
}

/// Asks pi-1 to evaluate `bundle` with `suite` and returns why it could not (its report in `eval list`).
fn refusal_on_device(fleet: &Fleet, bundle: &str, suite: &str) -> anyhow::Result<String> {
    let digest = suite.rsplit_once('@').map(|(_, d)| d.to_owned()).context("a pinned suite")?;
    fleet.json(&["eval", "run", "--bundle", bundle, "--suite", suite, "--device", "pi-1"])?;
    fleet.wait(&format!("pi-1's report on suite {digest}"), ROLLOUT_DEADLINE, || {
        let list = fleet.json(&["eval", "list", "--suite", &digest, "--device", "pi-1"])?;
        let first = list.as_array().and_then(|l| l.first()).cloned();
        Ok(first.map(|e| e["could_not_run"].as_str().map(str::to_owned).unwrap_or_else(|| format!("it ran: {e}"))))
    })
}

#[test]
fn eval_suites_that_are_unsigned_tampered_or_too_large_are_refused_with_their_reason() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let fleet = Fleet::start(&["pi-1"])?;
    let models = make_models(fleet.dir.path(), &fleet.llama_bin)?;
    fleet.push_bundle(&[&models.a], "acme/tiny:a")?;
    let valid = write_suite(&fleet.dir.path().join("valid"), &SMOKE, &lenient_prompts())?;

    // Too large: alkictl refuses before sending anything, naming the file and the limit.
    let big = write_suite(&fleet.dir.path().join("big"), &SMOKE, &lenient_prompts())?;
    std::fs::write(big.join("corpus.txt"), "word ".repeat(MAX_CORPUS_BYTES / 5 + 1))?;
    let refused = fleet.refused(&["eval", "push", path(&big)?, "acme/evals:big"])?;
    ensure!(
        refused.contains("corpus.txt is") && refused.contains(&format!("over the limit of {MAX_CORPUS_BYTES}")),
        "{refused}"
    );
    let absent = fleet.refused(&["eval", "inspect", "acme/evals:big"])?;
    ensure!(absent.contains("not in the registry"), "nothing was pushed: {absent}");
    // ... and a manifest that declares one is refused by its declared size, before anything is downloaded:
    // by inspect, and by the controller before any device is told (agents refuse it too: agent/tests/eval.rs).
    let oversized = push_oversized_suite(&fleet, &valid)?;
    let inspected = fleet.refused(&["eval", "inspect", &oversized])?;
    ensure!(inspected.contains("over the limit"), "{inspected}");
    let asked =
        fleet.refused(&["eval", "run", "--bundle", "acme/tiny:a", "--suite", &oversized, "--device", "pi-1"])?;
    ensure!(asked.contains("corpus.txt") && asked.contains("over the limit"), "{asked}");
    let rollout = ["rollout", "create", "--bundle", "acme/tiny:a", "-l", "site=lab", "--eval-suite", &oversized];
    ensure!(fleet.refused(&rollout)?.contains("over the limit"), "a rollout cannot name it either");

    // Unsigned: inspect says so, a rollout naming it is refused unless overridden, and a device asked to
    // evaluate with it refuses it naming the signature.
    let unsigned =
        run(fleet.controller.alkictl()?.args(["eval", "push", path(&valid)?, "acme/evals:unsigned", "-o", "json"]))?;
    let unsigned = text(&serde_json::from_str(&unsigned)?, "pinned")?;
    let inspected = fleet.json(&["eval", "inspect", &unsigned, "--key", path(&fleet.key.public_key)?])?;
    ensure!(inspected["verified"] == false && inspected["content_problem"].is_null(), "{inspected}");
    let rollout = ["rollout", "create", "--bundle", "acme/tiny:a", "-l", "site=lab", "--eval-suite", &unsigned];
    let refused = fleet.refused(&rollout)?;
    ensure!(refused.contains("eval suite") && refused.contains("not signed"), "{refused}");
    let why = refusal_on_device(&fleet, "acme/tiny:a", &unsigned)?;
    ensure!(why.contains("not signed") && why.contains("alkictl bundle sign"), "{why}");

    // Tampered in the registry after signing: inspect and the device name the digest that does not match.
    let tampered_dir =
        write_suite(&fleet.dir.path().join("tampered"), &SuiteShape { name: "tampered", ..SMOKE }, &lenient_prompts())?;
    // Its own corpus bytes: blobs are shared by digest, and no other suite's corpus must break.
    std::fs::write(tampered_dir.join("corpus.txt"), quality_support::corpus()? + "\nA copy to tamper with.\n")?;
    let tampered = text(&fleet.push_suite(&tampered_dir, "acme/evals:tampered")?, "pinned")?;
    let corpus = Digest::of(&std::fs::read(tampered_dir.join("corpus.txt"))?);
    let blob = fleet.controller.data_dir.join("blobs").join(corpus.storage_path());
    let mut bytes = std::fs::read(&blob).with_context(|| format!("reading {}", blob.display()))?;
    bytes[100] ^= 0x20;
    std::fs::write(&blob, &bytes)?;
    let inspected = fleet.json(&["eval", "inspect", &tampered, "--key", path(&fleet.key.public_key)?])?;
    ensure!(inspected["verified"] == true, "the signature still verifies; the content does not: {inspected}");
    let problem = inspected["content_problem"].as_str().unwrap_or_default();
    ensure!(problem.contains("digest") && problem.contains(corpus.hex()), "names the corpus: {inspected}");
    let why = refusal_on_device(&fleet, "acme/tiny:a", &tampered)?;
    ensure!(why.contains(corpus.hex()) && why.contains("does not match its digest"), "{why}");
    Ok(())
}
