//! `alkictl bench`: benchmark and calibrate devices, list results, compare a rollout's A and B per
//! hardware class, and recommend a variant per class. Tables for people, `-o json` for scripts.

use std::fmt::Write as _;

use alki_bundle::BundleRef;
use alki_shared::proto;
use clap::Subcommand;
use serde::Serialize;

use crate::connection::{Connection, status};
use crate::labels::SelectorArgs;
use crate::output::{Output, print, short, table};
use crate::quality::{self, QualityArgs};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Ask devices to benchmark what they serve now (results arrive as they finish: `alkictl bench list`).
    Run {
        /// Device ids; or select devices with -l.
        #[arg(long = "device")]
        devices: Vec<String>,
        #[command(flatten)]
        selector: SelectorArgs,
        /// Repetitions of the prompt set; default: the agent's.
        #[arg(long, default_value_t = 0)]
        repetitions: u32,
    },
    /// Ask devices to benchmark every variant of a bundle that fits them: `alkictl bench calibrate acme/qwen:v2 -l site=lab`.
    Calibrate {
        /// [REGISTRY/]REPOSITORY:TAG or [REGISTRY/]REPOSITORY@sha256:...
        bundle: BundleRef,
        #[arg(long = "device")]
        devices: Vec<String>,
        #[command(flatten)]
        selector: SelectorArgs,
        #[arg(long, default_value_t = 0)]
        repetitions: u32,
        /// Also evaluate each variant with this eval suite against the bundle's most precise variant on the
        /// same device (`alkictl eval list`), which `bench recommend --suite` with a quality floor reads.
        #[arg(long)]
        suite: Option<BundleRef>,
    },
    /// Stored benchmark results, newest first.
    List {
        #[arg(long)]
        device: Option<String>,
        /// Bundle (index) digest.
        #[arg(long)]
        bundle_digest: Option<String>,
        #[arg(long)]
        class: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// A rollout's candidate B against its baseline A per hardware class: medians, spreads, samples, pairs.
    Compare {
        rollout: String,
        /// Also list every paired device (its own A before the swap and B after).
        #[arg(long)]
        devices: bool,
    },
    /// Per hardware class, the fastest calibrated variant of a bundle within a quality floor: measured
    /// numbers against the most precise variant (`--max-kld 0.05 --suite REF`, from `bench calibrate
    /// --suite`), or a quantization name (`--min-quantization Q4_K_M`).
    Recommend {
        /// [REGISTRY/]REPOSITORY:TAG or [REGISTRY/]REPOSITORY@sha256:...
        bundle: BundleRef,
        /// Lowest acceptable quantization, e.g. Q4_K_M (ignored when a measured floor is given).
        #[arg(long, default_value = "")]
        min_quantization: String,
        #[command(flatten)]
        floor: QualityArgs,
        /// The eval suite the floor was measured with (as given to `bench calibrate --suite`).
        #[arg(long)]
        suite: Option<BundleRef>,
        /// Also list every calibrated variant of each class with its speed and quality.
        #[arg(long)]
        variants: bool,
    },
}

#[derive(Serialize)]
struct CommandView {
    device_id: String,
    command_id: String,
    delivered: bool,
    /// Offline: waiting in the controller's queue for the device's return, until `expires`.
    queued: bool,
    expires: Option<String>,
    /// Neither delivered nor queued: why.
    reason: String,
}

impl From<proto::SentCommand> for CommandView {
    fn from(c: proto::SentCommand) -> Self {
        CommandView {
            device_id: c.device_id,
            command_id: c.command_id,
            delivered: c.delivered,
            queued: c.queued,
            expires: (c.expires_unix_ms > 0).then(|| crate::output::rfc3339(c.expires_unix_ms)),
            reason: c.reason,
        }
    }
}

impl CommandView {
    /// The DELIVERED cell.
    pub fn delivery(&self) -> String {
        match (self.delivered, self.queued) {
            (true, _) => "yes".into(),
            (false, true) => format!("queued until {}", self.expires.clone().unwrap_or_default()),
            (false, false) if self.reason.is_empty() => "no: offline".into(),
            (false, false) => format!("no: {}", self.reason),
        }
    }
}

#[derive(Serialize)]
struct BenchmarkView {
    device_id: String,
    class: String,
    bundle: String,
    variant: String,
    variant_digest: String,
    trigger: String,
    at_unix_ms: i64,
    load_ms: f64,
    ttft_ms_median: f64,
    generation_tokens_per_second_median: f64,
    generation_tokens_per_second_stddev: f64,
    prompt_tokens_per_second_median: f64,
    peak_rss_bytes: u64,
    repetitions: u32,
    throttled: bool,
    error: String,
}

impl From<&proto::BenchmarkResult> for BenchmarkView {
    fn from(r: &proto::BenchmarkResult) -> Self {
        let stat = |s: Option<proto::Stat>| s.unwrap_or_default();
        let trigger = proto::BenchmarkTrigger::try_from(r.trigger).unwrap_or_default();
        BenchmarkView {
            device_id: r.device_id.clone(),
            class: r.hardware_class.clone(),
            bundle: r.bundle.as_ref().map(|b| b.digest.clone()).unwrap_or_default(),
            variant: r.variant_name.clone(),
            variant_digest: r.variant_digest.clone(),
            trigger: trigger.as_str_name().trim_start_matches("BENCHMARK_TRIGGER_").to_ascii_lowercase(),
            at_unix_ms: r.at_unix_ms,
            load_ms: r.load_ms,
            ttft_ms_median: stat(r.ttft_ms).median,
            generation_tokens_per_second_median: stat(r.generation_tokens_per_second).median,
            generation_tokens_per_second_stddev: stat(r.generation_tokens_per_second).stddev,
            prompt_tokens_per_second_median: stat(r.prompt_tokens_per_second).median,
            peak_rss_bytes: r.peak_rss_bytes,
            repetitions: r.repetitions,
            throttled: r.throttled,
            error: r.error.clone(),
        }
    }
}

/// The commands sent, and whether each device got its one; `results` is the command that lists the results.
pub fn print_commands(output: Output, sent: Vec<proto::SentCommand>, results: &str) -> anyhow::Result<()> {
    let views: Vec<CommandView> = sent.into_iter().map(CommandView::from).collect();
    print(output, &views, |v| commands_table(v, results))
}

fn benchmarks_table(views: &[BenchmarkView]) -> String {
    let mut t = table(["DEVICE", "CLASS", "VARIANT", "TRIGGER", "LOAD ms", "TTFT ms", "GEN tok/s", "PP tok/s", "NOTE"]);
    for v in views {
        let note = if !v.error.is_empty() {
            v.error.clone()
        } else if v.throttled {
            "throttled".into()
        } else {
            String::new()
        };
        t.add_row([
            v.device_id.clone(),
            v.class.clone(),
            if v.variant.is_empty() { short(&v.variant_digest) } else { v.variant.clone() },
            v.trigger.clone(),
            f(v.load_ms),
            f(v.ttft_ms_median),
            format!("{} ±{:.1}", f(v.generation_tokens_per_second_median), v.generation_tokens_per_second_stddev),
            f(v.prompt_tokens_per_second_median),
            note,
        ]);
    }
    t.to_string()
}

fn commands_table(commands: &[CommandView], results: &str) -> String {
    let mut t = table(["DEVICE", "COMMAND", "DELIVERED"]);
    for c in commands {
        t.add_row([c.device_id.clone(), c.command_id.clone(), c.delivery()]);
    }
    let delivered = commands.iter().filter(|c| c.delivered).count();
    let queued = commands.iter().filter(|c| c.queued).count();
    let queued = if queued > 0 { format!(" ({queued} queued for their return)") } else { String::new() };
    format!("{t}\n{delivered} of {} devices got the command{queued}; results: {results}", commands.len())
}

fn f(v: f64) -> String {
    if v == 0.0 { "-".into() } else { format!("{v:.1}") }
}

fn ratio(v: f64) -> String {
    if v == 0.0 { "-".into() } else { format!("{v:.2}") }
}

fn spread(s: &Option<proto::Stat>) -> String {
    match s {
        Some(s) if s.samples > 0 => format!("{:.1} ±{:.1} (n={})", s.median, s.stddev, s.samples),
        _ => "-".into(),
    }
}

fn comparison_table(c: &proto::Comparison, devices: bool) -> String {
    let mut t = table(["CLASS", "A tok/s", "B tok/s", "B/A tok/s", "A TTFT ms", "B TTFT ms", "B/A TTFT", "PAIRED"]);
    for class in &c.classes {
        let tps = class.generation_tokens_per_second.unwrap_or_default();
        let ttft = class.ttft_ms.unwrap_or_default();
        t.add_row([
            class.class.clone(),
            spread(&tps.a),
            spread(&tps.b),
            ratio(tps.gate_ratio),
            spread(&ttft.a),
            spread(&ttft.b),
            ratio(ttft.gate_ratio),
            class.paired.to_string(),
        ]);
    }
    let mut out = format!(
        "rollout {} candidate {}\n{t}",
        c.rollout_id,
        c.candidate.as_ref().map(|b| b.display()).unwrap_or_default()
    );
    if devices {
        let mut d = table(["DEVICE", "CLASS", "A tok/s", "B tok/s", "A TTFT ms", "B TTFT ms"]);
        for p in &c.devices {
            d.add_row([
                p.device_id.clone(),
                p.class.clone(),
                f(p.a_tokens_per_second),
                f(p.b_tokens_per_second),
                f(p.a_ttft_ms),
                f(p.b_ttft_ms),
            ]);
        }
        let _ = write!(out, "\n\n{d}");
    }
    out
}

fn recommendation_table(r: &proto::Recommendation, variants: bool) -> String {
    let header = ["CLASS", "VARIANT", "TOK/S"].into_iter().chain(quality::COLUMNS).chain(["DIGEST", "WHY"]);
    let mut t = table(header);
    for c in &r.classes {
        let chosen = c.variants.iter().find(|v| !c.variant_digest.is_empty() && v.variant_digest == c.variant_digest);
        let mut row = vec![
            c.class.clone(),
            if c.variant_name.is_empty() { "-".into() } else { c.variant_name.clone() },
            f(c.generation_tokens_per_second),
        ];
        row.extend(quality::cells(chosen.and_then(|v| v.quality.as_ref())));
        row.extend([short(&c.variant_digest), c.reason.clone()]);
        t.add_row(row);
    }
    if !variants {
        return t.to_string();
    }
    let header =
        ["CLASS", "VARIANT", "TOK/S", "TTFT ms", "DEVICES"].into_iter().chain(quality::COLUMNS).chain(["DIGEST"]);
    let mut all = table(header);
    for c in &r.classes {
        for v in &c.variants {
            let mut row = vec![
                c.class.clone(),
                v.variant_name.clone(),
                spread(&v.generation_tokens_per_second),
                spread(&v.ttft_ms),
                v.devices.to_string(),
            ];
            row.extend(quality::cells(v.quality.as_ref()));
            row.push(short(&v.variant_digest));
            all.add_row(row);
        }
    }
    format!("{t}\n\n{all}")
}

/// Runs one `alkictl bench` command.
pub async fn run(connection: &Connection, output: Output, cmd: BenchCmd) -> anyhow::Result<()> {
    let mut client = connection.insight().await?;
    match cmd {
        BenchCmd::Run { devices, selector, repetitions } => {
            let request = proto::RunBenchmarkRequest {
                device_ids: devices,
                selector: selector.selector.into_iter().collect(),
                repetitions,
            };
            let sent = client.run_benchmark(request).await.map_err(status)?.into_inner().commands;
            print_commands(output, sent, "alkictl bench list")
        }
        BenchCmd::Calibrate { bundle, devices, selector, repetitions, suite } => {
            let (repository, reference) = connection.controller_bundle(&bundle);
            let request = proto::CalibrateRequest {
                suite: suite.as_ref().map(|s| connection.controller_reference(s)).unwrap_or_default(),
                repository,
                bundle: reference,
                device_ids: devices,
                selector: selector.selector.into_iter().collect(),
                repetitions,
            };
            let sent = client.calibrate(request).await.map_err(status)?.into_inner().commands;
            let results = if suite.is_some() { "alkictl bench list, alkictl eval list" } else { "alkictl bench list" };
            print_commands(output, sent, results)
        }
        BenchCmd::List { device, bundle_digest, class, limit } => {
            let request = proto::ListBenchmarksRequest {
                device_id: device.unwrap_or_default(),
                bundle_digest: bundle_digest.unwrap_or_default(),
                hardware_class: class.unwrap_or_default(),
                limit,
            };
            let results = client.list_benchmarks(request).await.map_err(status)?.into_inner().results;
            let views: Vec<BenchmarkView> = results.iter().map(BenchmarkView::from).collect();
            print(output, &views, |vs| benchmarks_table(vs))
        }
        BenchCmd::Compare { rollout, devices } => {
            let c = client.compare(proto::CompareRequest { rollout_id: rollout }).await.map_err(status)?.into_inner();
            print(output, &c, |c| comparison_table(c, devices))
        }
        BenchCmd::Recommend { bundle, min_quantization, floor, suite, variants } => {
            floor.validate("")?;
            if let (Some(flag), None) = (floor.first_flag(""), &suite) {
                anyhow::bail!(
                    "{flag} needs --suite REF: the eval suite the variants were measured with (bench calibrate --suite)"
                );
            }
            let (repository, reference) = connection.controller_bundle(&bundle);
            let request = proto::RecommendRequest {
                repository,
                bundle: reference,
                min_quantization,
                quality_floor: floor.floor(),
                suite: suite.map(|s| connection.controller_reference(&s)).unwrap_or_default(),
            };
            let r = client.recommend(request).await.map_err(status)?.into_inner();
            print(output, &r, |r| recommendation_table(r, variants))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(name: &str, tps: f64, top1: f64) -> proto::VariantScore {
        proto::VariantScore {
            variant_digest: alki_shared::digest::Digest::of(name.as_bytes()).to_string(),
            variant_name: name.into(),
            generation_tokens_per_second: Some(proto::Stat { median: tps, samples: 2, ..Default::default() }),
            devices: 2,
            quality: Some(proto::ClassQuality {
                measured: 2,
                max_kld: Some(0.0),
                min_top1_agreement: Some(top1),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_recommendation_shows_the_chosen_variants_quality_and_every_variant_on_request() {
        let (f16, q8) = (variant("F16", 150.0, 1.0), variant("Q8_0", 900.0, 0.982));
        let r = proto::Recommendation {
            classes: vec![proto::ClassRecommendation {
                class: "x86-avx512".into(),
                variant_digest: f16.variant_digest.clone(),
                variant_name: "F16".into(),
                generation_tokens_per_second: 150.0,
                variants: vec![q8, f16],
                reason: "Q8_0 is faster but top-1 agreement 98.2% < 99%".into(),
            }],
            ..Default::default()
        };
        let short = recommendation_table(&r, false);
        let row = short.lines().find(|l| l.contains("x86-avx512")).expect("class row");
        for cell in ["F16", "150.0", "0.000000", "100.0%", "Q8_0 is faster"] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        assert_eq!(short.lines().count(), 2, "one class, no variant list: {short}");
        let long = recommendation_table(&r, true);
        assert!(long.lines().any(|l| l.contains("Q8_0") && l.contains("98.2%") && l.contains("900.0")), "{long}");
    }
}
