//! `alkictl eval`: eval suites validated, pushed, signed and inspected as OCI artifacts (over
//! `alki_bundle::suite`), evaluations asked of devices (InsightService.Evaluate), stored results listed
//! (ListEvaluations), and a rollout's candidate B against its baseline A on quality per hardware class
//! (Compare, as `bench compare` does for speed). Tables for people, `-o json` for scripts.

use std::path::{Path, PathBuf};

use alki_bundle::BundleRef;
use alki_bundle::suite::{InspectedSuite, PushedSuite};
use alki_shared::eval::quality::{Outcome, QualityResult};
use alki_shared::eval::wire;
use alki_shared::proto::{self, GateVerdict};
use alki_shared::signing::{self, PublicKey};
use clap::Subcommand;
use serde::Serialize;

use crate::bundle::push_tag;
use crate::connection::{Connection, status};
use crate::labels::SelectorArgs;
use crate::output::{self, Output, bytes, print, rfc3339, short, short_ref, table};
use crate::quality;

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Validate an eval suite directory (suite.toml, corpus, prompts.jsonl) and push it as a signed-able OCI
    /// artifact: `alkictl eval push ./suite acme/evals:v1`. Prints the pinned reference rollouts take.
    Push {
        dir: PathBuf,
        /// Repository and optional tag, e.g. acme/evals:v1 (a registry in front pushes there).
        target: BundleRef,
        /// Sign it right after the push with this private key (or later: `alkictl bundle sign REF --key`).
        /// The key password comes from ALKI_KEY_PASSWORD, COSIGN_PASSWORD or a prompt.
        #[arg(long)]
        sign_key: Option<PathBuf>,
        /// Talk plain HTTP to the registry. Never use across a network you do not trust.
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// Show a suite: a directory (validated as push would, with the digest it would get) or a reference
    /// (layers, sizes, content checked against its digests, signatures against --key).
    Inspect {
        /// A suite directory, or [REGISTRY/]REPOSITORY[:TAG] / REPOSITORY@sha256:... (any reference alkictl printed).
        target: String,
        /// Public keys to verify signatures with (repeatable).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// Ask devices to evaluate a bundle with a suite now, on a loopback instance beside what they serve
    /// (results arrive as they finish: `alkictl eval list`).
    Run {
        /// The candidate: [REGISTRY/]REPOSITORY:TAG or ...@sha256:...
        #[arg(long)]
        bundle: BundleRef,
        /// The eval suite: [REGISTRY/]REPOSITORY:TAG or ...@sha256:... (as `eval push` printed it).
        #[arg(long)]
        suite: BundleRef,
        /// The baseline A for KL divergence and top-1 agreement; default: what each device serves now.
        #[arg(long)]
        baseline: Option<BundleRef>,
        /// Device ids; or select devices with -l.
        #[arg(long = "device")]
        devices: Vec<String>,
        #[command(flatten)]
        selector: SelectorArgs,
    },
    /// Stored evaluations, newest first: perplexity, KL divergence, top-1 agreement, golden prompts, and why
    /// a device could not run a suite.
    List {
        #[arg(long)]
        device: Option<String>,
        /// The bundle: a digest or any reference (a tag is looked up in the registry).
        #[arg(long)]
        bundle: Option<String>,
        /// The suite: a digest or any reference (a tag is looked up in the registry).
        #[arg(long)]
        suite: Option<String>,
        /// Hardware class.
        #[arg(long)]
        class: Option<String>,
        #[arg(long)]
        rollout: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Talk plain HTTP to the registry when a tag is looked up.
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// A rollout's candidate B against its baseline A on quality, per hardware class: the worst values
    /// measured, the thresholds, each class's verdict and why.
    Compare { rollout: String },
}

/// Runs one `alkictl eval` command.
pub async fn run(connection: &Connection, output: Output, cmd: EvalCmd) -> anyhow::Result<()> {
    match cmd {
        EvalCmd::Push { dir, target, sign_key, insecure_plain_http } => {
            push(connection, output, &dir, &target, sign_key, insecure_plain_http).await
        }
        EvalCmd::Inspect { target, keys, insecure_plain_http } => {
            inspect(connection, output, &target, &keys, insecure_plain_http).await
        }
        EvalCmd::Run { bundle, suite, baseline, devices, selector } => {
            let (repository, bundle) = connection.controller_bundle(&bundle);
            let request = proto::EvaluateRequest {
                repository,
                bundle,
                suite: connection.controller_reference(&suite),
                device_ids: devices,
                selector: selector.selector.into_iter().collect(),
                baseline: baseline.map(|b| connection.controller_reference(&b)).unwrap_or_default(),
            };
            let sent = connection.insight().await?.evaluate(request).await.map_err(status)?.into_inner().commands;
            crate::bench::print_commands(output, sent, "alkictl eval list")
        }
        EvalCmd::List { device, bundle, suite, class, rollout, limit, insecure_plain_http } => {
            let digest = async |text: Option<String>| match text {
                Some(t) => connection.resolve_digest(&t, insecure_plain_http).await.map(|d| d.to_string()),
                None => Ok(String::new()),
            };
            let request = proto::ListEvaluationsRequest {
                device_id: device.unwrap_or_default(),
                bundle_digest: digest(bundle).await?,
                suite_digest: digest(suite).await?,
                hardware_class: class.unwrap_or_default(),
                rollout_id: rollout.unwrap_or_default(),
                limit,
            };
            let response = connection.insight().await?.list_evaluations(request).await.map_err(status)?;
            let views: Vec<EvaluationView> =
                response.into_inner().evaluations.iter().map(EvaluationView::from).collect();
            print(output, &views, |vs| evaluations_table(vs))
        }
        EvalCmd::Compare { rollout } => compare(connection, output, rollout).await,
    }
}

/// What `eval push` prints: the push, and the signature when --sign-key was given.
#[derive(Serialize)]
struct PushView {
    #[serde(flatten)]
    pushed: PushedSuite,
    #[serde(skip_serializing_if = "Option::is_none")]
    signed: Option<alki_bundle::sign::Signed>,
}

async fn push(
    connection: &Connection,
    output: Output,
    dir: &Path,
    target: &BundleRef,
    sign_key: Option<PathBuf>,
    plain_http: bool,
) -> anyhow::Result<()> {
    let tag = push_tag(target)?;
    // The key first: a wrong password stops the command before anything is pushed.
    let key = match &sign_key {
        Some(path) => Some(alki_bundle::keys::load(path, &crate::key::password(false)?)?),
        None => None,
    };
    let remote = connection.remote(target, plain_http)?;
    let pushed = alki_bundle::suite::push(dir, &remote, &tag, &output::progress(output, "pushing")).await?;
    let signed = match &key {
        Some(key) => Some(alki_bundle::sign::sign(&remote, pushed.digest.as_str(), key).await?),
        None => None,
    };
    print(output, &PushView { pushed, signed }, |v| {
        let p = &v.pushed;
        let mut text = format!(
            "pushed eval suite {} {} as {} ({} prompts, {}): {} uploaded, {} blobs already present\npinned: {}",
            p.summary.name,
            p.summary.version,
            p.reference,
            p.summary.prompts,
            bytes(p.summary.size),
            bytes(p.uploaded_bytes),
            p.skipped_blobs,
            p.pinned
        );
        match &v.signed {
            Some(s) => text.push_str(&format!("\nsigned with key {}", s.key_fingerprint)),
            None => text.push_str(&format!(
                "\nnot signed: devices refuse it until `alkictl bundle sign {} --key KEY`",
                p.pinned
            )),
        }
        text
    })
}

async fn inspect(
    connection: &Connection,
    output: Output,
    target: &str,
    keys: &[PathBuf],
    plain_http: bool,
) -> anyhow::Result<()> {
    let keys = keys.iter().map(|p| PublicKey::load(p)).collect::<Result<Vec<_>, _>>()?;
    let report = if Path::new(target).is_dir() {
        alki_bundle::suite::inspect_dir(Path::new(target))?
    } else {
        let reference: BundleRef = target.parse()?;
        let remote = connection.remote(&reference, plain_http)?;
        alki_bundle::suite::inspect_remote(&remote, &reference.tag_or_digest(), &keys).await?
    };
    print(output, &report, inspected_text)
}

fn inspected_text(r: &InspectedSuite) -> String {
    let s = &r.summary;
    let mut out = format!(
        "eval suite {} {} ({}) in {}\ncontext {} tokens x {} chunks, {} golden prompts, seed {}, budget {} s, {}\n",
        s.name,
        s.version,
        r.digest,
        r.source,
        s.context_size,
        s.chunks,
        s.prompts,
        s.seed,
        s.time_budget_seconds,
        bytes(s.size)
    );
    let mut t = table(["LAYER", "MEDIA TYPE", "DIGEST", "SIZE"]);
    for l in &r.layers {
        t.add_row([l.title.clone(), l.media_type.clone(), short(l.digest.as_str()), bytes(l.size)]);
    }
    out.push_str(&format!("{t}\n"));
    if !r.from_registry {
        out.push_str("valid: this is what `alkictl eval push` sends (signatures live in the registry, once pushed)");
        return out;
    }
    match &r.content_problem {
        Some(problem) => out.push_str(&format!("content: UNUSABLE: {problem}\n")),
        None => out.push_str("content: verified against its digests and the suite format\n"),
    }
    for sig in &r.signatures {
        let key = sig.check.key_fingerprint.as_deref().map(signing::short_fingerprint).unwrap_or_else(|| "-".into());
        let verdict =
            if sig.check.verified { "verified".to_owned() } else { sig.check.problem.clone().unwrap_or_default() };
        out.push_str(&format!("signature by {key}: {verdict}\n"));
    }
    if r.signatures.is_empty() && r.from_registry {
        out.push_str("signatures: none (sign it with `alkictl bundle sign REF --key KEY`)\n");
    }
    out.push_str(if r.verified { "verified: yes" } else { "verified: no" });
    out
}

/// One stored evaluation, flattened for tables and scripts; `result` holds everything the device said.
#[derive(Serialize)]
pub struct EvaluationView {
    device_id: String,
    class: String,
    at: String,
    at_unix_ms: i64,
    rollout_id: String,
    command_id: String,
    /// `repository@digest` of the candidate bundle, the suite and the baseline (empty without one).
    bundle: String,
    suite: String,
    baseline: String,
    variant_digest: String,
    baseline_variant_digest: String,
    perplexity: Option<f64>,
    kld_mean: Option<f64>,
    kld_p99: Option<f64>,
    top1_agreement: Option<f64>,
    perplexity_ratio: Option<f64>,
    golden_prompts: Option<u32>,
    golden_passed: Option<u32>,
    /// `prompt: check: reason` of every failed golden check.
    failed_checks: Vec<String>,
    /// `prompt: check` of every failed golden check, for the table (the reasons quote long replies).
    #[serde(skip)]
    failed_labels: Vec<String>,
    /// Why the device could not run the suite.
    could_not_run: Option<String>,
    duration_ms: Option<u64>,
    result: Option<QualityResult>,
    /// Set when the stored result cannot be read back.
    problem: Option<String>,
}

impl From<&proto::Evaluation> for EvaluationView {
    fn from(e: &proto::Evaluation) -> Self {
        let report = e.report.clone().unwrap_or_default();
        let display = |b: &Option<proto::BundleRef>| b.as_ref().map(proto::BundleRef::display).unwrap_or_default();
        let raw = report.result.clone().unwrap_or_default();
        let (result, problem) = match wire::from_proto(&raw) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let mut view = EvaluationView {
            device_id: e.device_id.clone(),
            class: e.hardware_class.clone(),
            at: rfc3339(report.at_unix_ms),
            at_unix_ms: report.at_unix_ms,
            rollout_id: report.rollout_id.clone(),
            command_id: report.command_id.clone(),
            bundle: display(&report.bundle),
            suite: display(&report.suite),
            baseline: display(&report.baseline),
            variant_digest: raw.variant_digest.clone(),
            baseline_variant_digest: raw.baseline_variant_digest.clone(),
            perplexity: None,
            kld_mean: None,
            kld_p99: None,
            top1_agreement: None,
            perplexity_ratio: None,
            golden_prompts: None,
            golden_passed: None,
            failed_checks: Vec::new(),
            failed_labels: Vec::new(),
            could_not_run: None,
            duration_ms: None,
            result: None,
            problem,
        };
        if let Some(result) = result {
            view.fill(&result.outcome);
            view.result = Some(result);
        }
        view
    }
}

impl EvaluationView {
    fn fill(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Measured(m) => {
                self.perplexity = m.perplexity.map(|p| p.value);
                if let Some(k) = &m.kl_divergence {
                    self.kld_mean = Some(k.kld_mean.value);
                    self.kld_p99 = Some(k.kld_p99);
                    self.top1_agreement = Some(k.top1_agreement.value);
                    self.perplexity_ratio = Some(k.ppl_ratio.value);
                }
                self.golden_prompts = Some(m.golden.prompts);
                self.golden_passed = Some(m.golden.passed);
                let failures = &m.golden.failures;
                self.failed_checks =
                    failures.iter().map(|f| format!("{}: {}: {}", f.prompt, f.label, f.reason)).collect();
                self.failed_labels = failures.iter().map(|f| format!("{}: {}", f.prompt, f.label)).collect();
                self.duration_ms = Some(m.duration_ms);
            }
            Outcome::CouldNotRun(why) => self.could_not_run = Some(why.to_string()),
        }
    }

    /// The table's last column: why it could not run, the failed checks, or a problem with the record.
    fn note(&self) -> String {
        if let Some(why) = &self.could_not_run {
            return format!("could not run: {why}");
        }
        if let Some(problem) = &self.problem {
            return problem.clone();
        }
        if self.failed_labels.is_empty() { String::new() } else { format!("failed {}", self.failed_labels.join("; ")) }
    }
}

fn evaluations_table(views: &[EvaluationView]) -> String {
    let mut t = table(["DEVICE", "CLASS", "BUNDLE", "SUITE", "PPL", "KLD mean/p99", "TOP-1", "GOLDEN", "AT", "NOTE"]);
    for v in views {
        let kld = match (v.kld_mean, v.kld_p99) {
            (Some(mean), Some(p99)) => format!("{mean:.6}/{p99:.6}"),
            _ => "-".into(),
        };
        let golden = match (v.golden_passed, v.golden_prompts) {
            (Some(passed), Some(prompts)) if prompts > 0 => format!("{passed}/{prompts}"),
            _ => "-".into(),
        };
        t.add_row([
            v.device_id.clone(),
            v.class.clone(),
            short_ref(&v.bundle),
            short_ref(&v.suite),
            v.perplexity.map(|p| format!("{p:.2}")).unwrap_or_else(|| "-".into()),
            kld,
            quality::percent(v.top1_agreement),
            golden,
            v.at.clone(),
            v.note(),
        ]);
    }
    t.to_string()
}

/// `eval compare`: quality per class from Compare, the thresholds and verdicts from the rollout.
#[derive(Serialize)]
struct QualityComparison {
    rollout_id: String,
    candidate: String,
    eval_suite: String,
    /// The rollout's quality thresholds, as people read them (`KLD <= 0.001`).
    thresholds: Vec<String>,
    max_error_rate_ratio: Option<f64>,
    classes: Vec<ClassQualityView>,
}

#[derive(Serialize)]
struct ClassQualityView {
    class: String,
    verdict: String,
    quality: Option<proto::ClassQuality>,
    b_error_rate: f64,
    a_error_rate: f64,
    reason: String,
}

async fn compare(connection: &Connection, output: Output, rollout_id: String) -> anyhow::Result<()> {
    let comparison = connection
        .insight()
        .await?
        .compare(proto::CompareRequest { rollout_id: rollout_id.clone() })
        .await
        .map_err(status)?
        .into_inner();
    let rollout = connection
        .fleet()
        .await?
        .get_rollout(proto::GetRolloutRequest { id: rollout_id })
        .await
        .map_err(status)?
        .into_inner();
    let view = QualityComparison::new(&comparison, &rollout);
    print(output, &view, comparison_text)
}

impl QualityComparison {
    fn new(c: &proto::Comparison, r: &proto::Rollout) -> QualityComparison {
        let gates = r.spec.as_ref().and_then(|s| s.gates).unwrap_or_default();
        let mut classes: Vec<ClassQualityView> = r
            .classes
            .iter()
            .map(|s| ClassQualityView {
                class: s.class.clone(),
                verdict: crate::rollout::verdict_label(s.verdict).into(),
                quality: s.quality,
                b_error_rate: s.b_error_rate,
                a_error_rate: s.a_error_rate,
                reason: s.reason.clone(),
            })
            .collect();
        // Compare's quality is what the gates saw; classes only Compare knows are listed too.
        for compared in &c.classes {
            match classes.iter_mut().find(|v| v.class == compared.class) {
                Some(view) => view.quality = compared.quality.or(view.quality),
                None => classes.push(ClassQualityView {
                    class: compared.class.clone(),
                    verdict: crate::rollout::verdict_label(GateVerdict::Unspecified as i32).into(),
                    quality: compared.quality,
                    b_error_rate: 0.0,
                    a_error_rate: 0.0,
                    reason: String::new(),
                }),
            }
        }
        QualityComparison {
            rollout_id: c.rollout_id.clone(),
            candidate: c.candidate.as_ref().or(r.candidate.as_ref()).map(|b| b.display()).unwrap_or_default(),
            eval_suite: r.eval_suite.as_ref().map(|b| b.display()).unwrap_or_default(),
            thresholds: quality::thresholds_text(&quality::rollout_gates(&gates)),
            max_error_rate_ratio: gates.max_error_rate_ratio,
            classes,
        }
    }
}

fn comparison_text(c: &QualityComparison) -> String {
    let suite = if c.eval_suite.is_empty() { "none".to_owned() } else { short_ref(&c.eval_suite) };
    let mut thresholds = c.thresholds.clone();
    if let Some(ratio) = c.max_error_rate_ratio {
        thresholds.push(format!("B/A error rate <= {ratio}"));
    }
    let thresholds = if thresholds.is_empty() { "none".to_owned() } else { thresholds.join(", ") };
    let mut header = vec!["CLASS", "VERDICT", "RESULTS"];
    header.extend(quality::COLUMNS);
    header.extend(["B ERR", "A ERR", "WHY"]);
    let mut t = table(header);
    for class in &c.classes {
        let mut row = vec![class.class.clone(), class.verdict.clone(), quality::counts(class.quality.as_ref())];
        row.extend(quality::cells(class.quality.as_ref()));
        row.extend(quality::error_rates(class.b_error_rate, class.a_error_rate));
        row.push(class.reason.clone());
        t.add_row(row);
    }
    format!(
        "rollout {} candidate {}\neval suite {suite}; thresholds: {thresholds}\n{t}",
        c.rollout_id,
        short_ref(&c.candidate)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::digest::Digest;

    fn evaluation(outcome: proto::quality_result::Outcome) -> proto::Evaluation {
        proto::Evaluation {
            device_id: "pi-1".into(),
            hardware_class: "x86_64-8g".into(),
            report: Some(proto::EvalReport {
                bundle: Some(proto::BundleRef {
                    repository: "acme/tiny".into(),
                    digest: Digest::of(b"b").to_string(),
                    ..Default::default()
                }),
                result: Some(proto::QualityResult {
                    suite_digest: Digest::of(b"suite").to_string(),
                    variant_digest: Digest::of(b"variant").to_string(),
                    baseline_variant_digest: String::new(),
                    outcome: Some(outcome),
                }),
                at_unix_ms: 1_700_000_000_000,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_could_not_run_result_says_why_and_a_broken_record_says_what_is_wrong() {
        let unable = proto::CouldNotRun {
            kind: "suite_too_large_for_budget".into(),
            estimated_seconds: 900,
            budget_seconds: 300,
            ..Default::default()
        };
        let view = EvaluationView::from(&evaluation(proto::quality_result::Outcome::CouldNotRun(unable)));
        assert_eq!(view.note(), "could not run: suite too large for the budget: about 900 s here, 300 s allowed");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["result"]["outcome"]["could_not_run"]["reason"], "suite_too_large_for_budget");
        let table = evaluations_table(&[view]);
        assert!(table.contains("pi-1") && table.contains("acme/tiny@"), "{table}");

        let mut broken = evaluation(proto::quality_result::Outcome::CouldNotRun(proto::CouldNotRun::default()));
        if let Some(r) = broken.report.as_mut().and_then(|r| r.result.as_mut()) {
            r.outcome = None;
        }
        let view = EvaluationView::from(&broken);
        assert!(view.note().contains("neither what was measured"), "{}", view.note());
    }

    #[test]
    fn a_measurement_shows_kld_top1_and_the_failed_checks() {
        let e = |value| Some(proto::Estimate { value, uncertainty: 0.0 });
        let measured = proto::QualityMeasurement {
            perplexity: e(32107.1),
            kl_divergence: Some(proto::KlDivergence {
                ppl: e(32107.1),
                base_ppl: e(32107.1),
                ppl_ratio: e(1.0),
                kld_mean: e(0.007954),
                kld_median: 0.0079,
                kld_p99: 0.008103,
                kld_max: 0.01,
                top1_agreement: e(0.0),
            }),
            golden_prompts: 3,
            golden_passed: 2,
            golden_failures: vec![proto::GoldenFailure {
                prompt_id: "capital".into(),
                check: 1,
                label: "exact \"Paris\"".into(),
                reason: "the reply is \"Lyon\"".into(),
            }],
            build: "0.6.0-dev".into(),
            settings: Some(proto::EvalSettings { context_size: 128, chunks: 16, threads: 2, gpu_layers: 0, seed: 42 }),
            duration_ms: 1500,
        };
        let view = EvaluationView::from(&evaluation(proto::quality_result::Outcome::Measured(measured)));
        assert_eq!((view.kld_mean, view.top1_agreement, view.golden_passed), (Some(0.007954), Some(0.0), Some(2)));
        assert_eq!(view.failed_checks, ["capital: exact \"Paris\": the reply is \"Lyon\""], "the reasons in JSON");
        let table = evaluations_table(&[view]);
        let row = table.lines().find(|l| l.contains("pi-1")).expect("row");
        for cell in ["32107.10", "0.007954/0.008103", "0.0%", "2/3", "failed capital: exact \"Paris\""] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
    }

    #[test]
    fn compare_shows_each_class_against_the_rollouts_thresholds() {
        let quality = proto::ClassQuality {
            measured: 2,
            max_kld: Some(0.008),
            min_top1_agreement: Some(0.0),
            ..Default::default()
        };
        let rollout = proto::Rollout {
            id: "ro-1".into(),
            spec: Some(proto::RolloutSpec {
                gates: Some(proto::RolloutGates {
                    max_kld: Some(0.001),
                    min_top1_agreement: Some(0.9),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            classes: vec![proto::ClassStatus {
                class: "x86_64-8g".into(),
                verdict: GateVerdict::Fail as i32,
                reason: "KL divergence 0.0080 > --max-kld 0.001 on device pi-2".into(),
                quality: Some(quality),
                ..Default::default()
            }],
            ..Default::default()
        };
        let comparison = proto::Comparison {
            rollout_id: "ro-1".into(),
            classes: vec![proto::ClassComparison {
                class: "x86_64-8g".into(),
                quality: Some(quality),
                ..Default::default()
            }],
            ..Default::default()
        };
        let view = QualityComparison::new(&comparison, &rollout);
        let text = comparison_text(&view);
        assert!(text.contains("thresholds: KLD <= 0.001, top-1 >= 0.9"), "{text}");
        let row = text.lines().find(|l| l.contains("x86_64-8g")).expect("row");
        for cell in ["fail", "2 measured", "0.008000", "0.0%", "--max-kld 0.001"] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        assert_eq!(serde_json::to_value(&view).expect("json")["classes"][0]["quality"]["max_kld"], 0.008);
    }
}
