//! `alkictl rollout`: create (flags or a TOML spec file), list, status (per class, `--watch`), the
//! operator verbs and the event history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alki_bundle::BundleRef;
use alki_shared::proto::{self, ClassFailurePolicy, GateVerdict, InconclusivePolicy, RolloutState};
use alki_shared::quantization::quantization_rank;
use alki_shared::schedule;
use alki_shared::text::printable;
use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::connection::{Connection, name_for_controller, status, text_for_controller};
use crate::labels::SelectorArgs;
use crate::output::{Output, print, rfc3339, short_ref, table};
use crate::quality::{self, QualityArgs};

#[derive(Subcommand)]
// Parsed once per run: the size of the largest variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
pub enum RolloutCmd {
    /// Start rolling a bundle out to the selected devices (flags, or `--file spec.toml`; flags win).
    ///
    /// With --window, steps advance and devices move to the candidate only inside that daily UTC window;
    /// outside it the rollout waits and `rollout status` says when it opens. Aborts, halted classes and
    /// returns to A act at any time, and so does an operator's promote.
    Create(CreateArgs),
    /// One rollout, in one line.
    Get { id: String },
    /// Every rollout, newest first.
    List,
    /// A rollout per step and per hardware class: counts, gate values against thresholds, why it waits.
    Status {
        id: String,
        /// Redraw every 2 s until the rollout completes or aborts.
        #[arg(long)]
        watch: bool,
    },
    /// Stop moving devices until resumed.
    Pause(ActionArgs),
    /// Continue a paused rollout (accepting an inconclusive step it was held on).
    Resume(ActionArgs),
    /// Jump to 100% now; failures still halt or abort. Acts at once, even outside the rollout's schedule
    /// window: an explicit promote is the operator's decision to move every selected device now.
    Promote(ActionArgs),
    /// Return every candidate device to what it ran before.
    Abort(ActionArgs),
    /// Give failed candidate devices another try (at once, even outside the schedule window).
    Retry(ActionArgs),
    /// The rollout's events, oldest first.
    History { id: String },
}

#[derive(Args)]
pub struct ActionArgs {
    pub id: String,
    /// Why, for the event log.
    #[arg(long, default_value = "")]
    pub reason: String,
}

#[derive(Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassFailure {
    /// Abort the whole rollout.
    Abort,
    /// Halt only the failing class; the others continue.
    HaltClass,
}

#[derive(Clone, Copy, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Inconclusive {
    /// Pause for a human.
    Hold,
    /// Advance anyway.
    Advance,
}

#[derive(Args, Default)]
pub struct CreateArgs {
    /// A rollout spec file, TOML or YAML by extension (see `SpecFile`); flags given as well override its fields.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The candidate: [REGISTRY/]REPOSITORY:TAG or [REGISTRY/]REPOSITORY@sha256:... (a registry other than
    /// --registry is one of the controller's external registries).
    #[arg(long)]
    pub bundle: Option<String>,
    #[command(flatten)]
    pub selector: SelectorArgs,
    /// Percentages of the selected devices per step, e.g. 5,25,50,100.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<u32>,
    /// A webhook gate configured on the controller (--gates-file) that must approve every step before it
    /// advances and the rollout before it completes. Repeatable; query gates go in the spec file.
    #[arg(long = "approval-webhook")]
    pub approval_webhooks: Vec<String>,
    /// Instead of --steps: an exponential ramp starting here (percent)...
    #[arg(long)]
    pub ramp_start: Option<u32>,
    /// ...multiplied by this factor each step until 100%.
    #[arg(long)]
    pub ramp_factor: Option<f64>,
    /// Minimum time each step soaks before the next, in seconds.
    #[arg(long)]
    pub soak_seconds: Option<u32>,
    /// Context size override for llama-server (0 keeps the bundle's default).
    #[arg(long)]
    pub context: Option<u32>,
    /// Judge a class once this many of its candidate devices settled.
    #[arg(long)]
    pub min_devices: Option<u32>,
    /// Lowest acceptable ratio of active to settled candidate devices per class (0..1).
    #[arg(long)]
    pub min_success_ratio: Option<f64>,
    /// Highest acceptable ratio of failed to settled candidate devices per class (0..1).
    #[arg(long)]
    pub max_failure_ratio: Option<f64>,
    /// Highest acceptable number of failed candidate devices per class.
    #[arg(long)]
    pub max_failures: Option<u32>,
    /// A candidate device not active this long after assignment counts as failed.
    #[arg(long)]
    pub deadline_seconds: Option<u32>,
    /// At most this many candidate devices converging at once.
    #[arg(long)]
    pub max_concurrent: Option<u32>,
    #[arg(long, value_enum)]
    pub on_class_failure: Option<ClassFailure>,
    #[arg(long, value_enum)]
    pub on_inconclusive: Option<Inconclusive>,
    /// Lowest acceptable B/A ratio of generation tokens/s per class (e.g. 0.9).
    #[arg(long)]
    pub min_tokens_per_second_ratio: Option<f64>,
    /// Highest acceptable B/A ratio of time to first token per class (e.g. 1.2).
    #[arg(long)]
    pub max_ttft_ratio: Option<f64>,
    /// Which variant of the candidate devices run: their own choice, or the one calibration recommends
    /// for their hardware class (`alkictl bench calibrate` first).
    #[arg(long, value_enum)]
    pub variant_policy: Option<VariantChoice>,
    /// With --variant-policy recommended: the lowest acceptable quantization, e.g. Q4_K_M.
    #[arg(long)]
    pub variant_min_quantization: Option<String>,
    /// Create the rollout even though the candidate's signature does not verify against the controller's
    /// trusted keys (agents still apply their own trust policy). Needs --reason; both go in the event log.
    #[arg(long, requires = "reason")]
    pub override_signature_check: bool,
    /// Why the signature check is overridden.
    #[arg(long)]
    pub reason: Option<String>,
    /// Daily window in UTC in which steps may advance and devices move to the candidate, HH:MM-HH:MM, e.g.
    /// 01:00-05:00 (an end before the start spans midnight and belongs to the day it starts on).
    #[arg(long)]
    pub window: Option<String>,
    /// With --window: the days it is open, e.g. mon,tue,wed (default: every day).
    #[arg(long, value_delimiter = ',', requires = "window")]
    pub window_days: Vec<String>,
    /// Tell every selected device to download and verify the candidate when the rollout starts, so its
    /// activation at its step needs no network (devices connecting later are told when they connect).
    #[arg(long)]
    pub prestage: bool,
    /// An eval suite every candidate device runs once active, against what it ran before (KL divergence,
    /// top-1 agreement, perplexity, golden prompts): [REGISTRY/]REPOSITORY:TAG or ...@sha256:..., as `eval
    /// push` printed it. Needed by the quality gates (--max-kld, --min-top1-agreement, ...).
    #[arg(long)]
    pub eval_suite: Option<String>,
    /// Quality gates per hardware class, from the eval suite: a class with a device past one halts (or
    /// aborts) with the measured value in the reason.
    #[command(flatten)]
    pub quality: QualityArgs,
    /// Highest acceptable ratio of B's error rate to A's at the devices' front port (real traffic), e.g. 1.5.
    #[arg(long)]
    pub max_error_rate_ratio: Option<f64>,
    /// Highest acceptable ratio of B's p95 request latency to A's at the devices' front port (real
    /// traffic, pooled per hardware class), e.g. 1.5.
    #[arg(long)]
    pub max_p95_latency_ratio: Option<f64>,
    /// With --variant-policy recommended: the highest KL divergence a recommended variant may have against
    /// the bundle's most precise variant (measured by `bench calibrate --suite` with --eval-suite).
    #[arg(long)]
    pub variant_max_kld: Option<f64>,
    /// With --variant-policy recommended: the lowest top-1 agreement (0..1) of a recommended variant.
    #[arg(long)]
    pub variant_min_top1_agreement: Option<f64>,
    /// With --variant-policy recommended: the highest perplexity ratio of a recommended variant.
    #[arg(long)]
    pub variant_max_perplexity_ratio: Option<f64>,
    /// With --variant-policy recommended: the lowest golden pass rate (0..1) of a recommended variant.
    #[arg(long)]
    pub variant_min_golden_pass: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VariantChoice {
    /// Each device chooses the best variant that fits it.
    Device,
    /// Each hardware class runs the variant its calibration benchmarks recommend.
    Recommended,
}

/// A rollout spec file, TOML or YAML (`.yaml`/`.yml`, the same fields). Every field is optional; unknown
/// fields are refused.
///
/// ```toml
/// bundle = "acme/qwen:v2"
/// selector = { site = "shop-7" }
/// steps = [5, 25, 50, 100]        # or: ramp = { start_percent = 1, factor = 2 }
/// soak_seconds = 600
/// deadline_seconds = 1800
/// max_concurrent = 50
/// on_class_failure = "halt-class" # or "abort"
/// on_inconclusive = "hold"        # or "advance"
/// variant_policy = "recommended" # or "device" (the default)
/// window = "01:00-05:00"          # UTC; steps advance only inside it
/// window_days = ["mon", "tue"]    # default: every day
/// prestage = true                 # download and verify on every selected device first
/// eval_suite = "acme/evals:v1"    # run on every candidate device; needed by the quality gates
/// variant_quality_floor = { max_kld = 0.05 }   # with variant_policy = "recommended"
/// [gates]
/// min_devices = 5
/// min_success_ratio = 0.95
/// max_failure_ratio = 0.05
/// max_failures = 3
/// min_tokens_per_second_ratio = 0.9
/// max_ttft_ratio = 1.2
/// max_kld = 0.05                  # quality: highest mean KL divergence from A
/// min_top1_agreement = 0.9        # lowest top-1 agreement with A (0..1)
/// max_perplexity_ratio = 1.05     # highest PPL(B)/PPL(A)
/// min_golden_pass = 1.0           # lowest fraction of golden prompts passed
/// max_error_rate_ratio = 1.5      # B's front-port error rate against A's
/// max_p95_latency_ratio = 1.5     # B's front-port p95 latency against A's
/// [runtime]
/// context_size = 4096
/// [[external_gates]]              # asked once a step's own gates pass (see README "External gates")
/// name = "change-approval"
/// webhook = "change-approval"     # a webhook gate in the controller's --gates-file
/// deadline_seconds = 3600         # no decision by then: inconclusive (on_inconclusive applies)
/// [[external_gates]]
/// name = "errors"
/// promql = 'sum(rate(http_errors_total{class="$class"}[5m]))'
/// op = "<"
/// threshold = 0.05
/// ```
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    pub bundle: Option<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub steps: Vec<u32>,
    pub ramp: Option<RampFile>,
    pub soak_seconds: Option<u32>,
    pub deadline_seconds: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub on_class_failure: Option<ClassFailure>,
    pub on_inconclusive: Option<Inconclusive>,
    pub gates: Option<GatesFile>,
    pub runtime: Option<RuntimeFile>,
    pub variant_policy: Option<VariantChoice>,
    pub variant_min_quantization: Option<String>,
    pub window: Option<String>,
    #[serde(default)]
    pub window_days: Vec<String>,
    pub prestage: Option<bool>,
    pub eval_suite: Option<String>,
    /// The same keys as the quality gates'.
    pub variant_quality_floor: Option<QualityArgs>,
    #[serde(default)]
    pub external_gates: Vec<ExternalGateFile>,
}

/// One external gate in a spec file: a webhook gate by its name on the controller, or a PromQL query.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ExternalGateFile {
    pub name: String,
    #[serde(default)]
    pub webhook: String,
    #[serde(default)]
    pub promql: String,
    #[serde(default)]
    pub op: String,
    #[serde(default)]
    pub threshold: f64,
    #[serde(default)]
    pub deadline_seconds: u32,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RampFile {
    pub start_percent: u32,
    pub factor: f64,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct GatesFile {
    pub min_devices: Option<u32>,
    pub min_success_ratio: Option<f64>,
    pub max_failure_ratio: Option<f64>,
    pub max_failures: Option<u32>,
    pub min_tokens_per_second_ratio: Option<f64>,
    pub max_ttft_ratio: Option<f64>,
    pub max_kld: Option<f64>,
    pub min_top1_agreement: Option<f64>,
    pub max_perplexity_ratio: Option<f64>,
    pub min_golden_pass: Option<f64>,
    pub max_error_rate_ratio: Option<f64>,
    pub max_p95_latency_ratio: Option<f64>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFile {
    #[serde(default)]
    pub context_size: u32,
    #[serde(default)]
    pub threads: u32,
    #[serde(default)]
    pub gpu_layers: i32,
    #[serde(default)]
    pub parallel_slots: u32,
}

/// Reads a spec file: YAML when its name ends in `.yaml` or `.yml`, TOML otherwise (same fields).
fn read_spec_file(path: &Path) -> anyhow::Result<SpecFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading rollout spec {}", path.display()))?;
    let invalid = || format!("rollout spec {} is not valid (see alkictl rollout create --help)", path.display());
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    if yaml { serde_norway::from_str(&text).with_context(invalid) } else { toml::from_str(&text).with_context(invalid) }
}

/// Builds the wire spec from a spec file and flags; flags override the file. `own_registry` is how alkictl
/// reaches the controller's registry (--registry): a candidate there is named without its host.
pub fn build_spec(args: &CreateArgs, own_registry: &str) -> anyhow::Result<proto::RolloutSpec> {
    let file = match &args.file {
        Some(path) => read_spec_file(path)?,
        None => SpecFile::default(),
    };
    let Some(bundle) = args.bundle.clone().or(file.bundle) else {
        bail!("name the candidate with --bundle REPOSITORY:TAG or `bundle = ...` in the spec file");
    };
    let bundle: BundleRef = bundle.parse()?;
    let (repository, candidate) = name_for_controller(&bundle, own_registry);
    let mut selector: BTreeMap<String, String> = file.selector;
    selector.extend(args.selector.selector.iter().cloned());
    let soak = args.soak_seconds.or(file.soak_seconds).unwrap_or(0);
    let percents = if args.steps.is_empty() { file.steps } else { args.steps.clone() };
    let ramp = match (args.ramp_start, args.ramp_factor, file.ramp) {
        (Some(start_percent), factor, _) => Some(RampFile { start_percent, factor: factor.unwrap_or(2.0) }),
        (None, Some(_), _) => bail!("--ramp-factor needs --ramp-start"),
        (None, None, ramp) if percents.is_empty() => ramp,
        _ => None,
    };
    let steps = if ramp.is_some() {
        Vec::new()
    } else if percents.is_empty() {
        vec![proto::RolloutStep { percent: 100, min_soak_seconds: soak }]
    } else {
        percents.iter().map(|&percent| proto::RolloutStep { percent, min_soak_seconds: soak }).collect()
    };
    let g = file.gates.unwrap_or_default();
    let quality = QualityArgs {
        max_kld: args.quality.max_kld.or(g.max_kld),
        min_top1_agreement: args.quality.min_top1_agreement.or(g.min_top1_agreement),
        max_perplexity_ratio: args.quality.max_perplexity_ratio.or(g.max_perplexity_ratio),
        min_golden_pass: args.quality.min_golden_pass.or(g.min_golden_pass),
    };
    let max_error_rate_ratio = args.max_error_rate_ratio.or(g.max_error_rate_ratio);
    let max_p95_latency_ratio = args.max_p95_latency_ratio.or(g.max_p95_latency_ratio);
    let gates = proto::RolloutGates {
        min_devices: args.min_devices.or(g.min_devices).unwrap_or(0),
        min_success_ratio: args.min_success_ratio.or(g.min_success_ratio),
        max_failure_ratio: args.max_failure_ratio.or(g.max_failure_ratio),
        max_failures: args.max_failures.or(g.max_failures),
        min_tokens_per_second_ratio: args.min_tokens_per_second_ratio.or(g.min_tokens_per_second_ratio),
        max_ttft_ratio: args.max_ttft_ratio.or(g.max_ttft_ratio),
        max_kld: quality.max_kld,
        min_top1_agreement: quality.min_top1_agreement,
        max_perplexity_ratio: quality.max_perplexity_ratio,
        min_golden_pass: quality.min_golden_pass,
        max_error_rate_ratio,
        max_p95_latency_ratio,
    };
    let variant_policy = match args.variant_policy.or(file.variant_policy) {
        Some(VariantChoice::Recommended) => proto::VariantPolicy::RecommendedPerClass,
        Some(VariantChoice::Device) | None => proto::VariantPolicy::Unspecified,
    };
    let floor = variant_floor(args, file.variant_quality_floor.unwrap_or_default());
    let eval_suite = args.eval_suite.clone().or(file.eval_suite);
    check_traffic_ratio("--max-error-rate-ratio", max_error_rate_ratio, "50% more errors")?;
    check_traffic_ratio("--max-p95-latency-ratio", max_p95_latency_ratio, "a 50% slower p95")?;
    check_quality(&quality, &floor, eval_suite.is_some(), variant_policy)?;
    let eval_suite = match eval_suite {
        Some(text) => text_for_controller(&text.parse::<BundleRef>()?, own_registry),
        None => String::new(),
    };
    let variant_min_quantization =
        args.variant_min_quantization.clone().or(file.variant_min_quantization).unwrap_or_default();
    if !variant_min_quantization.is_empty() && quantization_rank(&variant_min_quantization).is_none() {
        bail!("--variant-min-quantization {variant_min_quantization:?} is not a llama.cpp quantization (e.g. Q4_K_M)");
    }
    let days = if args.window_days.is_empty() { file.window_days } else { args.window_days.clone() };
    let schedule = match args.window.clone().or(file.window) {
        Some(window) => Some(schedule_window(&window, &days)?),
        None if !days.is_empty() => bail!("window_days needs a window (e.g. window = \"01:00-05:00\")"),
        None => None,
    };
    let rt = file.runtime.unwrap_or_default();
    let mut external_gates: Vec<proto::ExternalGate> = file
        .external_gates
        .into_iter()
        .map(|g| proto::ExternalGate {
            name: g.name,
            webhook: g.webhook,
            promql: g.promql,
            op: g.op,
            threshold: g.threshold,
            deadline_seconds: g.deadline_seconds,
        })
        .collect();
    for webhook in &args.approval_webhooks {
        external_gates.push(proto::ExternalGate {
            name: webhook.clone(),
            webhook: webhook.clone(),
            ..Default::default()
        });
    }
    Ok(proto::RolloutSpec {
        external_gates,
        repository,
        candidate,
        selector: selector.into_iter().collect(),
        steps,
        runtime: Some(proto::RuntimeSettings {
            context_size: args.context.unwrap_or(rt.context_size),
            threads: rt.threads,
            gpu_layers: rt.gpu_layers,
            parallel_slots: rt.parallel_slots,
        }),
        gates: Some(gates),
        device_deadline_seconds: args.deadline_seconds.or(file.deadline_seconds).unwrap_or(0),
        max_concurrent: args.max_concurrent.or(file.max_concurrent).unwrap_or(0),
        on_class_failure: match args.on_class_failure.or(file.on_class_failure) {
            Some(ClassFailure::HaltClass) => ClassFailurePolicy::HaltClass,
            Some(ClassFailure::Abort) | None => ClassFailurePolicy::Abort,
        } as i32,
        on_inconclusive: match args.on_inconclusive.or(file.on_inconclusive) {
            Some(Inconclusive::Advance) => InconclusivePolicy::Advance,
            Some(Inconclusive::Hold) | None => InconclusivePolicy::Hold,
        } as i32,
        ramp: ramp.map(|r| proto::ExponentialRamp {
            start_percent: r.start_percent,
            factor: r.factor,
            min_soak_seconds: soak,
        }),
        variant_policy: variant_policy as i32,
        variant_min_quantization,
        schedule,
        prestage: args.prestage || file.prestage.unwrap_or(false),
        eval_suite,
        variant_quality_floor: floor.floor(),
    })
}

/// The recommended variant's quality floor: the --variant-* flags over the spec file's.
fn variant_floor(args: &CreateArgs, file: QualityArgs) -> QualityArgs {
    QualityArgs {
        max_kld: args.variant_max_kld.or(file.max_kld),
        min_top1_agreement: args.variant_min_top1_agreement.or(file.min_top1_agreement),
        max_perplexity_ratio: args.variant_max_perplexity_ratio.or(file.max_perplexity_ratio),
        min_golden_pass: args.variant_min_golden_pass.or(file.min_golden_pass),
    }
}

/// Refuses a real-traffic gate's ratio (B's against A's) that is not a positive number.
fn check_traffic_ratio(flag: &str, ratio: Option<f64>, example: &str) -> anyhow::Result<()> {
    if let Some(ratio) = ratio
        && !(ratio.is_finite() && ratio > 0.0)
    {
        bail!("{flag}: {ratio} is out of range; give a ratio above 0, e.g. 1.5 for at most {example}");
    }
    Ok(())
}

/// Refuses quality thresholds out of range, and quality gates or a floor without the suite that measures
/// them, before anything is sent.
fn check_quality(
    gates: &QualityArgs,
    floor: &QualityArgs,
    has_suite: bool,
    policy: proto::VariantPolicy,
) -> anyhow::Result<()> {
    gates.validate("")?;
    floor.validate("variant-")?;
    if let (Some(flag), false) = (gates.first_flag("").or(floor.first_flag("variant-")), has_suite) {
        bail!(
            "{flag} needs --eval-suite REF (or eval_suite in the spec file): the suite candidate devices are measured with"
        );
    }
    if let (Some(flag), false) = (floor.first_flag("variant-"), policy == proto::VariantPolicy::RecommendedPerClass) {
        bail!("{flag} applies to --variant-policy recommended; add it or drop the flag");
    }
    Ok(())
}

/// `01:00-05:00` and weekday names into a checked wire window.
fn schedule_window(window: &str, days: &[String]) -> anyhow::Result<proto::ScheduleWindow> {
    let (start_minute_utc, end_minute_utc) = schedule::parse_range(window).map_err(anyhow::Error::msg)?;
    let weekdays = days
        .iter()
        .map(|d| schedule::parse_weekday(d))
        .collect::<Result<Vec<u32>, String>>()
        .map_err(anyhow::Error::msg)?;
    let w = proto::ScheduleWindow { start_minute_utc, end_minute_utc, weekdays };
    schedule::Window::new(&w).with_context(|| format!("--window {window}"))?;
    Ok(w)
}

/// Runs one `alkictl rollout` command.
pub async fn run(connection: &Connection, output: Output, cmd: RolloutCmd) -> anyhow::Result<()> {
    match cmd {
        RolloutCmd::Create(args) => create(connection, output, &args).await,
        RolloutCmd::Get { id } => {
            let r = connection.fleet().await?.get_rollout(proto::GetRolloutRequest { id }).await.map_err(status)?;
            let view = GetView::from(&r.into_inner());
            print(output, &view, get_text)
        }
        RolloutCmd::List => {
            let rs = connection.fleet().await?.list_rollouts(proto::ListRolloutsRequest {}).await.map_err(status)?;
            let views: Vec<RolloutView> = rs.into_inner().rollouts.iter().map(RolloutView::from).collect();
            print(output, &views, |rs| rollout_table(rs))
        }
        RolloutCmd::Status { id, watch } => status_of(connection, output, id, watch).await,
        RolloutCmd::Pause(a) => act(connection, output, Verb::Pause, a).await,
        RolloutCmd::Resume(a) => act(connection, output, Verb::Resume, a).await,
        RolloutCmd::Promote(a) => act(connection, output, Verb::Promote, a).await,
        RolloutCmd::Abort(a) => act(connection, output, Verb::Abort, a).await,
        RolloutCmd::Retry(a) => act(connection, output, Verb::Retry, a).await,
        RolloutCmd::History { id } => history(connection, output, id).await,
    }
}

async fn create(connection: &Connection, output: Output, args: &CreateArgs) -> anyhow::Result<()> {
    let spec = build_spec(args, &connection.registry)?;
    let created = connection
        .fleet()
        .await?
        .create_rollout(proto::CreateRolloutRequest {
            spec: Some(spec),
            override_signature_check: args.override_signature_check,
            override_reason: args.reason.clone().unwrap_or_default(),
        })
        .await
        .map_err(status)?;
    let view = RolloutView::from(&created.into_inner());
    print(output, &view, |r| format!("rollout {} created for {} (steps {:?})", r.id, r.candidate, r.steps))
}

/// `rollout status`; with `--watch`, redrawn on each of the rollout's events as the controller streams them
/// (WatchRollout), until the rollout completes or aborts.
async fn status_of(connection: &Connection, output: Output, id: String, watch: bool) -> anyhow::Result<()> {
    let mut client = connection.fleet().await?;
    let mut events = client
        .list_rollout_events(proto::ListRolloutEventsRequest { id: id.clone(), after_seq: 0 })
        .await
        .map_err(status)?
        .into_inner()
        .events;
    if !watch {
        let r = client.get_rollout(proto::GetRolloutRequest { id: id.clone() }).await.map_err(status)?.into_inner();
        return print(output, &StatusView::new(&r, &events), status_text);
    }
    let seen = events.iter().map(|e| e.seq).max().unwrap_or(0);
    let request = proto::WatchRolloutRequest { id, after_event_id: 0 };
    let mut updates = connection.events().await?.watch_rollout(request).await.map_err(status)?.into_inner();
    loop {
        let update = tokio::select! {
            update = updates.message() => update.map_err(status)?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(update) = update else { return Ok(()) };
        if let Some(event) = update.event.filter(|e| e.rollout_seq > seen) {
            events.push(rollout_event(event));
        }
        let Some(r) = update.rollout else { continue };
        if output == Output::Table {
            // Clear the screen and home the cursor, then redraw.
            print!("\x1b[2J\x1b[H");
        }
        print(output, &StatusView::new(&r, &events), status_text)?;
    }
}

/// A rollout's event as the fleet's log carried it, back in the rollout's own terms.
fn rollout_event(e: proto::FleetEvent) -> proto::RolloutEvent {
    proto::RolloutEvent {
        rollout_id: e.rollout_id,
        seq: e.rollout_seq,
        unix_ms: e.unix_ms,
        kind: e.r#type.strip_prefix("rollout.").unwrap_or(&e.r#type).to_owned(),
        message: e.message,
        device_id: e.device_id,
    }
}

/// The operator verbs, each one RPC.
enum Verb {
    Pause,
    Resume,
    Promote,
    Abort,
    Retry,
}

async fn act(connection: &Connection, output: Output, verb: Verb, a: ActionArgs) -> anyhow::Result<()> {
    let request = proto::RolloutActionRequest { id: a.id, reason: a.reason };
    let mut client = connection.fleet().await?;
    let r = match verb {
        Verb::Pause => client.pause_rollout(request).await,
        Verb::Resume => client.resume_rollout(request).await,
        Verb::Promote => client.promote_rollout(request).await,
        Verb::Abort => client.abort_rollout(request).await,
        Verb::Retry => client.retry_rollout(request).await,
    }
    .map_err(status)?;
    let view = RolloutView::from(&r.into_inner());
    print(output, &view, |r| format!("rollout {}: {} ({})", r.id, r.state, r.message))
}

async fn history(connection: &Connection, output: Output, id: String) -> anyhow::Result<()> {
    let events = connection
        .fleet()
        .await?
        .list_rollout_events(proto::ListRolloutEventsRequest { id, after_seq: 0 })
        .await
        .map_err(status)?
        .into_inner()
        .events;
    let views: Vec<EventView> = events.iter().map(EventView::from).collect();
    print(output, &views, |es| {
        let mut t = table(["SEQ", "TIME", "KIND", "DEVICE", "MESSAGE"]);
        for e in es {
            t.add_row([e.seq.to_string(), e.time.clone(), e.kind.clone(), e.device_id.clone(), e.message.clone()]);
        }
        t.to_string()
    })
}

#[derive(Serialize)]
pub struct RolloutView {
    id: String,
    state: String,
    candidate: String,
    step: u32,
    steps: Vec<u32>,
    selected: u32,
    candidate_devices: u32,
    active: u32,
    failed: u32,
    pending: u32,
    halted_classes: Vec<String>,
    message: String,
    /// The schedule window, e.g. "01:00-05:00 UTC on mon,tue" (empty: any time).
    window: String,
    /// While the window is closed: when it opens next (unix ms, and RFC 3339); 0 and empty when open.
    window_opens_unix_ms: i64,
    window_opens: String,
    prestage: bool,
    /// The eval suite pinned by digest (empty: none).
    eval_suite: String,
}

impl From<&proto::Rollout> for RolloutView {
    fn from(r: &proto::Rollout) -> Self {
        let c = r.counts.unwrap_or_default();
        RolloutView {
            id: r.id.clone(),
            state: RolloutState::try_from(r.state).unwrap_or_default().label().into(),
            candidate: r.candidate.as_ref().map(|b| b.display()).unwrap_or_default(),
            step: r.current_step + 1,
            steps: r.spec.as_ref().map(|s| s.steps.iter().map(|s| s.percent).collect()).unwrap_or_default(),
            selected: c.selected,
            candidate_devices: c.candidate,
            active: c.active,
            failed: c.failed,
            pending: c.pending,
            halted_classes: r.halted_classes.clone(),
            message: r.message.clone(),
            window: r
                .spec
                .as_ref()
                .and_then(|s| s.schedule.as_ref())
                .and_then(|w| schedule::Window::new(w).ok())
                .map(|w| w.describe())
                .unwrap_or_default(),
            window_opens_unix_ms: r.window_opens_unix_ms,
            window_opens: if r.window_opens_unix_ms > 0 { rfc3339(r.window_opens_unix_ms) } else { String::new() },
            prestage: r.spec.as_ref().is_some_and(|s| s.prestage),
            eval_suite: r.eval_suite.as_ref().map(|b| b.display()).unwrap_or_default(),
        }
    }
}

/// `rollout get`: the rollout in one line, then each class's verdict, quality values and why.
#[derive(Serialize)]
struct GetView {
    #[serde(flatten)]
    rollout: RolloutView,
    classes: Vec<ClassView>,
}

impl From<&proto::Rollout> for GetView {
    fn from(r: &proto::Rollout) -> Self {
        GetView { rollout: RolloutView::from(r), classes: r.classes.iter().map(ClassView::from).collect() }
    }
}

fn get_text(v: &GetView) -> String {
    let mut out = rollout_table(std::slice::from_ref(&v.rollout));
    if v.classes.is_empty() {
        return out;
    }
    let header = ["CLASS", "VERDICT", "EVALUATED"].into_iter().chain(quality::COLUMNS).chain(["WHY"]);
    let mut t = table(header);
    for c in &v.classes {
        let mut row = vec![c.class.clone(), c.verdict.clone(), quality::counts(c.quality.as_ref())];
        row.extend(quality::cells(c.quality.as_ref()));
        row.push(c.reason.clone());
        t.add_row(row);
    }
    out.push_str(&format!("\n\n{t}"));
    out
}

fn rollout_table(rs: &[RolloutView]) -> String {
    let mut t =
        table(["ROLLOUT", "STATE", "STEP", "SELECTED", "B", "ACTIVE", "FAILED", "PENDING", "CANDIDATE", "MESSAGE"]);
    for r in rs {
        t.add_row([
            r.id.clone(),
            r.state.clone(),
            format!("{}/{}", r.step.min(r.steps.len() as u32), r.steps.len()),
            r.selected.to_string(),
            r.candidate_devices.to_string(),
            r.active.to_string(),
            r.failed.to_string(),
            r.pending.to_string(),
            short_ref(&r.candidate),
            r.message.clone(),
        ]);
    }
    t.to_string()
}

#[derive(Serialize)]
struct ClassView {
    class: String,
    verdict: String,
    selected: u32,
    candidate: u32,
    active: u32,
    failed: u32,
    pending: u32,
    success_ratio: f64,
    failure_ratio: f64,
    /// B/A on the performance gates (0: not measured), and the devices measured on each side.
    tokens_per_second_ratio: f64,
    ttft_ratio: f64,
    a_samples: u32,
    b_samples: u32,
    /// With prestage: selected devices that report the candidate staged, and that failed to stage it.
    staged: u32,
    stage_failed: u32,
    /// Quality of B against A from the eval suite: the worst values across measured devices, and how many
    /// devices measured or could not run it.
    quality: Option<proto::ClassQuality>,
    /// B's and A's error rates at the front port (0: no traffic).
    b_error_rate: f64,
    a_error_rate: f64,
    /// B's and A's p95 request latency at the front port in milliseconds (0: not measured).
    b_p95_latency_ms: f64,
    a_p95_latency_ms: f64,
    reason: String,
}

impl From<&proto::ClassStatus> for ClassView {
    fn from(c: &proto::ClassStatus) -> Self {
        let n = c.counts.unwrap_or_default();
        ClassView {
            class: c.class.clone(),
            verdict: verdict_label(c.verdict).into(),
            selected: n.selected,
            candidate: n.candidate,
            active: n.active,
            failed: n.failed,
            pending: n.pending,
            success_ratio: c.success_ratio,
            failure_ratio: c.failure_ratio,
            tokens_per_second_ratio: c.tokens_per_second_ratio,
            ttft_ratio: c.ttft_ratio,
            a_samples: c.a_samples,
            b_samples: c.b_samples,
            staged: c.staged,
            stage_failed: c.stage_failed,
            quality: c.quality,
            b_error_rate: c.b_error_rate,
            a_error_rate: c.a_error_rate,
            b_p95_latency_ms: c.b_p95_latency_ms,
            a_p95_latency_ms: c.a_p95_latency_ms,
            reason: c.reason.clone(),
        }
    }
}

#[derive(Serialize)]
struct EventView {
    seq: u64,
    unix_ms: i64,
    time: String,
    kind: String,
    device_id: String,
    message: String,
}

impl From<&proto::RolloutEvent> for EventView {
    fn from(e: &proto::RolloutEvent) -> Self {
        let time = rfc3339(e.unix_ms);
        EventView {
            seq: e.seq,
            unix_ms: e.unix_ms,
            time,
            kind: e.kind.clone(),
            device_id: e.device_id.clone(),
            message: e.message.clone(),
        }
    }
}

#[derive(Serialize)]
struct StatusView {
    rollout: RolloutView,
    step_percent: u32,
    soak_seconds: u32,
    gates: String,
    classes: Vec<ClassView>,
    /// External gates' answers at this step.
    external_gates: Vec<ExternalGateView>,
    recent_events: Vec<EventView>,
}

#[derive(Serialize)]
struct ExternalGateView {
    gate: String,
    class: String,
    state: String,
    message: String,
    decided_by: String,
    value: f64,
}

impl From<&proto::ExternalGateResult> for ExternalGateView {
    fn from(r: &proto::ExternalGateResult) -> Self {
        let state = match proto::ExternalGateState::try_from(r.state).unwrap_or_default() {
            proto::ExternalGateState::Unspecified => "-",
            proto::ExternalGateState::Asking => "asking",
            proto::ExternalGateState::Passed => "passed",
            proto::ExternalGateState::Failed => "failed",
            proto::ExternalGateState::RetryLater => "not yet",
        };
        ExternalGateView {
            gate: r.gate.clone(),
            class: r.class.clone(),
            state: state.into(),
            message: r.message.clone(),
            decided_by: r.decided_by.clone(),
            value: r.value,
        }
    }
}

impl StatusView {
    fn new(r: &proto::Rollout, events: &[proto::RolloutEvent]) -> StatusView {
        let spec = r.spec.clone().unwrap_or_default();
        let step = spec.steps.get(r.current_step as usize).copied().unwrap_or_default();
        let g = spec.gates.unwrap_or_default();
        let mut gates = vec![format!("min devices {}", g.min_devices.max(1))];
        if let Some(v) = g.min_success_ratio {
            gates.push(format!("success >= {v:.2}"));
        }
        if let Some(v) = g.max_failure_ratio {
            gates.push(format!("failures <= {v:.2}"));
        }
        if let Some(v) = g.max_failures {
            gates.push(format!("failed devices <= {v}"));
        }
        if let Some(v) = g.min_tokens_per_second_ratio {
            gates.push(format!("B/A tokens/s >= {v:.2}"));
        }
        if let Some(v) = g.max_ttft_ratio {
            gates.push(format!("B/A ttft <= {v:.2}"));
        }
        gates.extend(quality::thresholds_text(&quality::rollout_gates(&g)));
        if let Some(v) = g.max_error_rate_ratio {
            gates.push(format!("B/A error rate <= {v:.2}"));
        }
        if let Some(v) = g.max_p95_latency_ratio {
            gates.push(format!("B/A p95 latency <= {v:.2}"));
        }
        for g in &spec.external_gates {
            gates.push(match g.webhook.is_empty() {
                true => format!("{}: {} {} {}", g.name, g.promql, g.op, g.threshold),
                false => format!("{}: approval by webhook {}", g.name, g.webhook),
            });
        }
        let policy = if spec.on_class_failure == ClassFailurePolicy::HaltClass as i32 { "halt class" } else { "abort" };
        gates.push(format!("on failure: {policy}"));
        let classes = r.classes.iter().map(ClassView::from).collect();
        let skip = events.len().saturating_sub(5);
        StatusView {
            rollout: RolloutView::from(r),
            step_percent: step.percent,
            soak_seconds: step.min_soak_seconds,
            gates: gates.join(", "),
            classes,
            external_gates: r.external_gates.iter().map(ExternalGateView::from).collect(),
            recent_events: events[skip..].iter().map(EventView::from).collect(),
        }
    }
}

pub(crate) fn verdict_label(v: i32) -> &'static str {
    match GateVerdict::try_from(v).unwrap_or_default() {
        GateVerdict::Unspecified => "-",
        GateVerdict::NotSampled => "not sampled",
        GateVerdict::Waiting => "waiting",
        GateVerdict::Pass => "pass",
        GateVerdict::Inconclusive => "inconclusive",
        GateVerdict::Fail => "fail",
        GateVerdict::Halted => "halted",
    }
}

/// A p95 latency cell: milliseconds, or "-" when not measured.
fn p95_cell(ms: f64) -> String {
    if ms > 0.0 { format!("{ms:.0} ms") } else { "-".into() }
}

fn status_text(s: &StatusView) -> String {
    let r = &s.rollout;
    let mut out = format!(
        "rollout {}  {}  step {}/{} ({}%, soak {} s)  candidate {}\n{}\ngates: {}\n\n",
        r.id,
        r.state,
        r.step.min(r.steps.len() as u32),
        r.steps.len(),
        s.step_percent,
        s.soak_seconds,
        short_ref(&r.candidate),
        r.message,
        s.gates
    );
    if !r.eval_suite.is_empty() {
        out.insert_str(out.len() - 1, &format!("eval suite: {}\n", short_ref(&r.eval_suite)));
    }
    if !r.window.is_empty() {
        let state = if r.window_opens.is_empty() { "open now".to_owned() } else { format!("opens {}", r.window_opens) };
        out.insert_str(out.len() - 1, &format!("window: {} ({state})\n", r.window));
    }
    for g in &s.external_gates {
        let class = if g.class.is_empty() { String::new() } else { format!(" [{}]", g.class) };
        let by = if g.decided_by.is_empty() { String::new() } else { format!(" by {}", printable(&g.decided_by, 64)) };
        let line = format!("external gate {}{class}: {}{by}: {}\n", g.gate, g.state, printable(&g.message, 200));
        out.insert_str(out.len() - 1, &line);
    }
    let mut header =
        vec!["CLASS", "VERDICT", "SELECTED", "B", "ACTIVE", "FAILED", "PENDING", "SUCCESS", "B/A TOK/S", "B/A TTFT"];
    if r.prestage {
        header.extend(["STAGED", "STAGE FAILED"]);
    }
    let quality = !r.eval_suite.is_empty() || s.classes.iter().any(|c| c.quality.is_some());
    if quality {
        header.push("EVALUATED");
        header.extend(quality::COLUMNS);
    }
    let errors = s.classes.iter().any(|c| c.b_error_rate > 0.0 || c.a_error_rate > 0.0);
    if errors {
        header.extend(["B ERR", "A ERR"]);
    }
    let latency = s.classes.iter().any(|c| c.b_p95_latency_ms > 0.0 || c.a_p95_latency_ms > 0.0);
    if latency {
        header.extend(["B P95", "A P95"]);
    }
    header.push("WHY");
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header(header);
    let ratio = |v: f64| if v > 0.0 { format!("{v:.2}") } else { "-".into() };
    for c in &s.classes {
        let mut row = vec![
            c.class.clone(),
            c.verdict.clone(),
            c.selected.to_string(),
            c.candidate.to_string(),
            c.active.to_string(),
            c.failed.to_string(),
            c.pending.to_string(),
            format!("{:.2}", c.success_ratio),
            ratio(c.tokens_per_second_ratio),
            ratio(c.ttft_ratio),
        ];
        if r.prestage {
            row.extend([c.staged.to_string(), c.stage_failed.to_string()]);
        }
        if quality {
            row.push(quality::counts(c.quality.as_ref()));
            row.extend(quality::cells(c.quality.as_ref()));
        }
        if errors {
            row.extend(quality::error_rates(c.b_error_rate, c.a_error_rate));
        }
        if latency {
            row.extend([c.b_p95_latency_ms, c.a_p95_latency_ms].map(p95_cell));
        }
        row.push(c.reason.clone());
        t.add_row(row);
    }
    out.push_str(&t.to_string());
    out.push_str("\n\nrecent events:\n");
    for e in &s.recent_events {
        out.push_str(&format!("  {} {} {}\n", e.time, e.kind, e.message));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How these tests reach the controller's registry.
    const REGISTRY: &str = "127.0.0.1:7080";

    #[test]
    fn a_spec_file_is_read_and_flags_override_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.toml");
        std::fs::write(
            &path,
            r#"
bundle = "acme/qwen:v2"
selector = { site = "shop-7" }
steps = [5, 25, 50, 100]
soak_seconds = 600
on_class_failure = "halt-class"
[gates]
min_devices = 5
max_failure_ratio = 0.05
[runtime]
context_size = 4096
"#,
        )
        .expect("write");
        let args = CreateArgs { file: Some(path.clone()), max_concurrent: Some(7), ..Default::default() };
        let spec = build_spec(&args, REGISTRY).expect("spec");
        assert_eq!((spec.repository.as_str(), spec.candidate.as_str()), ("acme/qwen", "v2"));
        assert_eq!(spec.steps.iter().map(|s| (s.percent, s.min_soak_seconds)).collect::<Vec<_>>()[0], (5, 600));
        assert_eq!(spec.on_class_failure, ClassFailurePolicy::HaltClass as i32);
        assert_eq!(spec.gates.and_then(|g| g.max_failure_ratio), Some(0.05));
        assert_eq!((spec.max_concurrent, spec.runtime.map(|r| r.context_size)), (7, Some(4096)));

        std::fs::write(&path, "bundle = \"a/b:c\"\nstepz = [1]\n").expect("write");
        let err = build_spec(&args, REGISTRY).expect_err("unknown field");
        assert!(format!("{err:#}").contains("stepz"), "{err:#}");
    }

    #[test]
    fn a_candidate_named_as_push_printed_it_is_the_controllers_own_and_another_registry_is_external() {
        let spec = |bundle: &str| {
            build_spec(&CreateArgs { bundle: Some(bundle.into()), ..Default::default() }, REGISTRY).expect(bundle)
        };
        let own = spec("127.0.0.1:7080/acme/gemma:v1");
        assert_eq!((own.repository.as_str(), own.candidate.as_str()), ("acme/gemma", "v1"));
        let external = spec("127.0.0.1:5000/acme/gemma:v1");
        assert_eq!(external.repository, "127.0.0.1:5000/acme/gemma");
        let digest = alki_shared::digest::Digest::of(b"bundle").to_string();
        assert_eq!(spec(&format!("acme/gemma@{digest}")).candidate, digest, "as devices and rollouts print it");
        let err = build_spec(&CreateArgs { bundle: Some("acme/gemma@abc123".into()), ..Default::default() }, REGISTRY)
            .expect_err("short digest");
        assert!(format!("{err:#}").contains("shortened digest"), "{err:#}");
    }

    #[test]
    fn performance_gates_and_the_recommended_variant_policy_come_from_flags_or_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.toml");
        let file =
            "bundle = \"acme/qwen:v2\"\nvariant_policy = \"recommended\"\n[gates]\nmin_tokens_per_second_ratio = 0.9\n";
        std::fs::write(&path, file).expect("write");
        let args = CreateArgs { file: Some(path.clone()), max_ttft_ratio: Some(1.2), ..Default::default() };
        let spec = build_spec(&args, REGISTRY).expect("spec");
        assert_eq!(spec.variant_policy, proto::VariantPolicy::RecommendedPerClass as i32);
        let gates = spec.gates.expect("gates");
        assert_eq!((gates.min_tokens_per_second_ratio, gates.max_ttft_ratio), (Some(0.9), Some(1.2)));

        let args = CreateArgs {
            bundle: Some("acme/qwen:v2".into()),
            variant_policy: Some(VariantChoice::Recommended),
            variant_min_quantization: Some("Q9_X".into()),
            ..Default::default()
        };
        let err = build_spec(&args, REGISTRY).expect_err("unknown quantization");
        assert!(format!("{err:#}").contains("Q9_X"), "{err:#}");
    }

    #[test]
    fn a_schedule_window_and_prestage_come_from_flags_or_the_file_and_bad_input_is_named() {
        let args = CreateArgs {
            bundle: Some("acme/qwen:v2".into()),
            window: Some("22:30-02:00".into()),
            window_days: vec!["fri".into(), "Saturday".into()],
            prestage: true,
            ..Default::default()
        };
        let spec = build_spec(&args, REGISTRY).expect("spec");
        let w = spec.schedule.expect("window");
        assert_eq!((w.start_minute_utc, w.end_minute_utc, w.weekdays), (1350, 120, vec![5, 6]));
        assert!(spec.prestage);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.toml");
        let file = "bundle = \"acme/qwen:v2\"\nwindow = \"01:00-05:00\"\nwindow_days = [\"mon\"]\nprestage = true\n";
        std::fs::write(&path, file).expect("write");
        let spec = build_spec(&CreateArgs { file: Some(path.clone()), ..Default::default() }, REGISTRY).expect("spec");
        let w = spec.schedule.expect("window");
        assert_eq!((w.start_minute_utc, w.end_minute_utc, w.weekdays), (60, 300, vec![1]));
        assert!(spec.prestage);

        let bad = |window: &str, days: &[&str]| {
            let args = CreateArgs {
                bundle: Some("acme/qwen:v2".into()),
                window: Some(window.into()),
                window_days: days.iter().map(|d| d.to_string()).collect(),
                ..Default::default()
            };
            format!("{:#}", build_spec(&args, REGISTRY).expect_err("bad window"))
        };
        assert!(bad("1am-5am", &[]).contains("HH:MM-HH:MM"));
        assert!(bad("01:00-01:00", &[]).contains("same minute"));
        assert!(bad("01:00-05:00", &["mon", "funday"]).contains("\"funday\" is not a weekday"));
        assert!(bad("01:00-05:00", &["mon", "monday"]).contains("twice"));
        std::fs::write(&path, "bundle = \"acme/qwen:v2\"\nwindow_days = [\"mon\"]\n").expect("write");
        let err = build_spec(&CreateArgs { file: Some(path), ..Default::default() }, REGISTRY)
            .expect_err("days without window");
        assert!(format!("{err:#}").contains("needs a window"), "{err:#}");
    }

    #[test]
    fn a_yaml_spec_file_has_the_same_fields_and_refuses_unknown_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.yaml");
        let yaml = "bundle: acme/qwen:v2\nselector: {site: shop-7}\nsteps: [10, 100]\nwindow: \"23:00-03:00\"\n\
                    window_days: [fri]\nprestage: true\ngates:\n  max_failures: 2\n";
        std::fs::write(&path, yaml).expect("write");
        let spec = build_spec(&CreateArgs { file: Some(path.clone()), ..Default::default() }, REGISTRY).expect("spec");
        assert_eq!(spec.steps.iter().map(|s| s.percent).collect::<Vec<_>>(), [10, 100]);
        assert_eq!(
            spec.schedule.map(|w| (w.start_minute_utc, w.end_minute_utc, w.weekdays)),
            Some((1380, 180, vec![5]))
        );
        assert!(spec.prestage);
        assert_eq!(spec.gates.and_then(|g| g.max_failures), Some(2));
        std::fs::write(&path, "bundle: a/b:c\nwindw: \"01:00-02:00\"\n").expect("write");
        let err =
            build_spec(&CreateArgs { file: Some(path), ..Default::default() }, REGISTRY).expect_err("unknown field");
        assert!(format!("{err:#}").contains("windw"), "{err:#}");
    }

    #[test]
    fn status_shows_the_window_and_staged_counts_per_class_in_tables_and_json() {
        let r = proto::Rollout {
            id: "ro-1".into(),
            state: RolloutState::Pending as i32,
            spec: Some(proto::RolloutSpec {
                steps: vec![proto::RolloutStep { percent: 100, min_soak_seconds: 0 }],
                schedule: Some(proto::ScheduleWindow { start_minute_utc: 60, end_minute_utc: 300, weekdays: vec![1] }),
                prestage: true,
                ..Default::default()
            }),
            window_opens_unix_ms: 1_795_395_600_000,
            message: "waiting to start: outside the schedule window".into(),
            classes: vec![proto::ClassStatus {
                class: "pi5-8g".into(),
                counts: Some(proto::RolloutCounts { selected: 7, ..Default::default() }),
                staged: 5,
                stage_failed: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let view = StatusView::new(&r, &[]);
        let text = status_text(&view);
        assert!(text.contains("window: 01:00-05:00 UTC on mon (opens 2026-11-23T01:00:00Z)"), "{text}");
        assert!(text.contains("STAGED") && text.contains("STAGE FAILED"), "{text}");
        let row = text.lines().find(|l| l.contains("pi5-8g")).expect("class row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[cells.len() - 2..], ["5", "2"], "{row}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["classes"][0]["staged"], 5);
        assert_eq!(json["classes"][0]["stage_failed"], 2);
        assert_eq!(json["rollout"]["window_opens"], "2026-11-23T01:00:00Z");
        assert_eq!(json["rollout"]["prestage"], true);
    }

    #[test]
    fn quality_gates_and_the_eval_suite_come_from_flags_or_the_file() {
        let suite = format!("{REGISTRY}/acme/evals@{}", alki_shared::digest::Digest::of(b"suite"));
        let args = CreateArgs {
            bundle: Some("acme/qwen:v2".into()),
            eval_suite: Some(suite.clone()),
            quality: QualityArgs { max_kld: Some(0.001), min_top1_agreement: Some(0.9), ..Default::default() },
            max_error_rate_ratio: Some(1.5),
            variant_policy: Some(VariantChoice::Recommended),
            variant_max_kld: Some(0.05),
            ..Default::default()
        };
        let spec = build_spec(&args, REGISTRY).expect("spec");
        assert_eq!(spec.eval_suite, suite.trim_start_matches(&format!("{REGISTRY}/")), "the controller's own registry");
        let g = spec.gates.expect("gates");
        assert_eq!((g.max_kld, g.min_top1_agreement, g.min_golden_pass), (Some(0.001), Some(0.9), None));
        assert_eq!(g.max_error_rate_ratio, Some(1.5));
        assert_eq!(spec.variant_quality_floor.and_then(|f| f.max_kld), Some(0.05));

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.yaml");
        let yaml = "bundle: acme/qwen:v2\neval_suite: acme/evals:v1\nvariant_policy: recommended\n\
                    variant_quality_floor: {min_top1_agreement: 0.95}\ngates:\n  min_golden_pass: 1.0\n  max_perplexity_ratio: 1.05\n";
        std::fs::write(&path, yaml).expect("write");
        let args = CreateArgs {
            file: Some(path),
            quality: QualityArgs { min_golden_pass: Some(0.5), ..Default::default() },
            ..Default::default()
        };
        let spec = build_spec(&args, REGISTRY).expect("spec");
        assert_eq!(spec.eval_suite, "acme/evals:v1");
        let g = spec.gates.expect("gates");
        assert_eq!((g.min_golden_pass, g.max_perplexity_ratio), (Some(0.5), Some(1.05)), "the flag wins");
        assert_eq!(spec.variant_quality_floor.and_then(|f| f.min_top1_agreement), Some(0.95));
        assert_eq!(
            build_spec(&CreateArgs { bundle: Some("a/b:c".into()), ..Default::default() }, REGISTRY)
                .expect("spec")
                .variant_quality_floor,
            None
        );
    }

    #[test]
    fn quality_thresholds_without_a_suite_or_out_of_range_are_refused_before_sending() {
        let refused = |args: CreateArgs| {
            format!(
                "{:#}",
                build_spec(&CreateArgs { bundle: Some("acme/qwen:v2".into()), ..args }, REGISTRY).expect_err("refused")
            )
        };
        let no_suite = refused(CreateArgs {
            quality: QualityArgs { min_golden_pass: Some(1.0), ..Default::default() },
            ..Default::default()
        });
        assert!(no_suite.starts_with("--min-golden-pass needs --eval-suite REF"), "{no_suite}");
        let kld = refused(CreateArgs {
            eval_suite: Some("acme/evals:v1".into()),
            quality: QualityArgs { max_kld: Some(-1.0), ..Default::default() },
            ..Default::default()
        });
        assert!(kld.starts_with("--max-kld: -1 is out of range"), "{kld}");
        let ratio = refused(CreateArgs { max_error_rate_ratio: Some(0.0), ..Default::default() });
        assert!(ratio.starts_with("--max-error-rate-ratio: 0 is out of range"), "{ratio}");
        let floor = refused(CreateArgs {
            eval_suite: Some("acme/evals:v1".into()),
            variant_max_kld: Some(0.05),
            ..Default::default()
        });
        assert!(floor.starts_with("--variant-max-kld applies to --variant-policy recommended"), "{floor}");
        let bad_suite = refused(CreateArgs { eval_suite: Some("acme/evals@abc".into()), ..Default::default() });
        assert!(bad_suite.contains("shortened digest"), "{bad_suite}");
    }

    #[test]
    fn status_and_get_show_each_class_quality_and_why_it_halted() {
        let quality = proto::ClassQuality {
            measured: 2,
            could_not_run: 1,
            max_kld: Some(0.007954),
            min_top1_agreement: Some(0.0),
            ..Default::default()
        };
        let reason =
            "quality: KL divergence 0.0080 > --max-kld 0.001 on device pi-2 (2 of 2 measured devices break it)";
        let r = proto::Rollout {
            id: "ro-2".into(),
            state: RolloutState::Aborted as i32,
            spec: Some(proto::RolloutSpec {
                steps: vec![proto::RolloutStep { percent: 100, min_soak_seconds: 0 }],
                gates: Some(proto::RolloutGates {
                    max_kld: Some(0.001),
                    min_top1_agreement: Some(0.9),
                    max_error_rate_ratio: Some(1.5),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            eval_suite: Some(proto::BundleRef {
                repository: "acme/evals".into(),
                digest: alki_shared::digest::Digest::of(b"s").to_string(),
                ..Default::default()
            }),
            classes: vec![proto::ClassStatus {
                class: "x86_64-8g".into(),
                verdict: GateVerdict::Fail as i32,
                reason: reason.into(),
                quality: Some(quality),
                b_error_rate: 0.02,
                a_error_rate: 0.01,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = status_text(&StatusView::new(&r, &[]));
        assert!(text.contains("KLD <= 0.001, top-1 >= 0.9, B/A error rate <= 1.50"), "{text}");
        assert!(text.contains("eval suite: acme/evals@"), "{text}");
        let row = text.lines().find(|l| l.contains("x86_64-8g")).expect("class row");
        for cell in ["fail", "2 measured, 1 could not run", "0.007954", "0.0%", "2.0%", "1.0%", reason] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        let get = GetView::from(&r);
        let text = get_text(&get);
        assert!(
            text.lines().any(|l| l.contains("x86_64-8g") && l.contains("0.007954") && l.contains(reason)),
            "{text}"
        );
        let json = serde_json::to_value(&get).expect("json");
        assert_eq!(json["id"], "ro-2");
        assert_eq!(json["classes"][0]["quality"]["max_kld"], 0.007954);
        assert!(json["eval_suite"].as_str().is_some_and(|s| s.starts_with("acme/evals@sha256:")), "{json}");
    }

    #[test]
    fn the_p95_latency_gate_comes_from_the_flag_or_the_file_is_checked_and_shows_both_sides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.yaml");
        std::fs::write(&path, "bundle: acme/qwen:v2\ngates:\n  max_p95_latency_ratio: 2.0\n").expect("write");
        let from_file = build_spec(&CreateArgs { file: Some(path.clone()), ..Default::default() }, REGISTRY);
        assert_eq!(from_file.expect("spec").gates.and_then(|g| g.max_p95_latency_ratio), Some(2.0));
        let args = CreateArgs { file: Some(path), max_p95_latency_ratio: Some(1.5), ..Default::default() };
        assert_eq!(build_spec(&args, REGISTRY).expect("spec").gates.and_then(|g| g.max_p95_latency_ratio), Some(1.5));
        for bad in [0.0, -1.0, f64::NAN] {
            let args = CreateArgs {
                bundle: Some("acme/qwen:v2".into()),
                max_p95_latency_ratio: Some(bad),
                ..Default::default()
            };
            let err = format!("{:#}", build_spec(&args, REGISTRY).expect_err("refused"));
            assert!(err.starts_with(&format!("--max-p95-latency-ratio: {bad} is out of range")), "{err}");
        }

        let reason = "p95 latency 840 ms on B is 2.1x A's 400 ms, over the gate 1.5x";
        let r = proto::Rollout {
            id: "ro-3".into(),
            spec: Some(proto::RolloutSpec {
                gates: Some(proto::RolloutGates { max_p95_latency_ratio: Some(1.5), ..Default::default() }),
                ..Default::default()
            }),
            classes: vec![proto::ClassStatus {
                class: "pi5".into(),
                verdict: GateVerdict::Fail as i32,
                reason: reason.into(),
                b_p95_latency_ms: 840.0,
                a_p95_latency_ms: 400.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        let view = StatusView::new(&r, &[]);
        let text = status_text(&view);
        assert!(text.contains("B/A p95 latency <= 1.50") && text.contains("B P95") && text.contains("A P95"), "{text}");
        let row = text.lines().find(|l| l.contains("pi5")).expect("class row");
        assert!(row.contains("840 ms") && row.contains("400 ms") && row.contains(reason), "{row}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(
            (json["classes"][0]["b_p95_latency_ms"].as_f64(), json["classes"][0]["a_p95_latency_ms"].as_f64()),
            (Some(840.0), Some(400.0))
        );
    }
}
