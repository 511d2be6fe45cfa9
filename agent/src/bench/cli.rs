//! `alki-agent bench`: benchmarks the model the running agent serves (found through its serving file), or a
//! GGUF file in a llama-server of its own, and shows the result as a table.

use std::path::Path;

use alki_shared::proto;
use anyhow::Context;

use super::files::{ResultsFile, ServingFile};
use super::measure::PROMPT_SET;
use super::result::{Identity, Subject, Target, benchmark_instance};
use crate::pull::human_bytes;
use crate::runtime::{HttpClient, Instance, InstanceOptions, StopPolicy};
use crate::settings::{LaunchSettings, LaunchSpec, RuntimeOverrides};

const TRIGGER: proto::BenchmarkTrigger = proto::BenchmarkTrigger::OnDemand;

/// `alki-agent bench`: benchmarks the model the running agent serves (found through its serving file), or
/// `model` in a llama-server of its own; the result is stored in the results file when it succeeded.
pub async fn run_cli(
    config: &crate::Config,
    model: Option<&Path>,
    repetitions: u32,
) -> anyhow::Result<proto::BenchmarkResult> {
    let identity = identity(config).await?;
    let http = crate::runtime::http_client();
    let result = match model {
        Some(path) => bench_file(config, &http, &identity, path, repetitions).await?,
        None => bench_served(config, &http, &identity, repetitions).await?,
    };
    if result.error.is_empty() {
        ResultsFile::new(&config.data_dir).append_async(vec![result.clone()]).await;
    }
    Ok(result)
}

/// The device's id (from the state file, when the agent ran here) and hardware class.
async fn identity(config: &crate::Config) -> anyhow::Result<Identity> {
    let (data_dir, labels) = (config.data_dir.clone(), config.labels.clone());
    tokio::task::spawn_blocking(move || {
        let device_id = crate::state::StateFile::new(&data_dir)
            .load()
            .ok()
            .flatten()
            .map(|s| s.device_id.to_string())
            .unwrap_or_default();
        Identity { device_id, hardware_class: crate::inventory::collect(&data_dir, &labels).hardware_class }
    })
    .await
    .context("measuring the device")
}

/// Benchmarks the GGUF file at `path` in a llama-server of its own, stopped afterwards.
async fn bench_file(
    config: &crate::Config,
    http: &HttpClient,
    identity: &Identity,
    path: &Path,
    repetitions: u32,
) -> anyhow::Result<proto::BenchmarkResult> {
    anyhow::ensure!(path.is_file(), "{}: no such model file; give the path of a GGUF file", path.display());
    let logs = tempfile::tempdir().context("creating a log directory")?;
    let opts = InstanceOptions {
        llama_server: config.runtime.llama_server.clone(),
        extra_args: config.runtime.extra_args.clone(),
        launcher: config.runtime.launcher.clone(),
        log_dir: logs.path().to_owned(),
        health_timeout: config.health_timeout(),
        stop: StopPolicy::default(),
    };
    let settings =
        LaunchSettings::resolve(&alki_shared::bundle::RuntimeDefaults::default(), &RuntimeOverrides::default());
    let spec = LaunchSpec { model_path: path.to_owned(), settings, bundle_digest: String::new() };
    eprintln!("Starting llama-server for {} ...", path.display());
    let instance = Instance::start(&opts, spec, http)
        .await
        .with_context(|| format!("starting llama-server for {}", path.display()))?;
    let subject = Subject { model_path: Some(path.to_owned()), ..Default::default() };
    eprintln!("Benchmarking: {repetitions} repetitions of {PROMPT_SET} ...");
    let result = benchmark_instance(http, identity, &subject, Target::instance(&instance), TRIGGER, repetitions).await;
    instance.stop(&StopPolicy::default()).await;
    Ok(result)
}

/// Benchmarks the model the running agent serves, as its serving file describes it.
async fn bench_served(
    config: &crate::Config,
    http: &HttpClient,
    identity: &Identity,
    repetitions: u32,
) -> anyhow::Result<proto::BenchmarkResult> {
    let file = ServingFile::new(&config.data_dir);
    let serving = file.load().with_context(|| {
        format!(
            "no model is served here ({} is missing): start the agent and activate a bundle, or pass \
             --model FILE to benchmark a GGUF file",
            file.path().display()
        )
    })?;
    if let Some(pid) = serving.pid {
        anyhow::ensure!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "the llama-server named in {} (pid {pid}) is gone; is the agent running?",
            file.path().display()
        );
    }
    eprintln!("Benchmarking the served model at {}: {repetitions} repetitions of {PROMPT_SET} ...", serving.addr);
    Ok(benchmark_instance(http, identity, &serving.subject(), serving.target(), TRIGGER, repetitions).await)
}

/// A benchmark result as a table for people.
pub fn table(result: &proto::BenchmarkResult) -> String {
    let mut out = String::new();
    let bundle = result.bundle.as_ref().map(|b| {
        let name = if b.repository.is_empty() { b.digest.clone() } else { format!("{}@{}", b.repository, b.digest) };
        if b.tag.is_empty() { name } else { format!("{name} ({})", b.tag) }
    });
    let mut facts = vec![
        ("bundle", bundle.unwrap_or_else(|| "-".to_owned())),
        ("variant", if result.variant_digest.is_empty() { "-".to_owned() } else { result.variant_digest.clone() }),
        ("quantization", if result.variant_name.is_empty() { "-".to_owned() } else { result.variant_name.clone() }),
        ("hardware class", result.hardware_class.clone()),
        ("prompt set", format!("{} x {} repetitions", result.prompt_set, result.repetitions)),
        ("load time", format!("{:.0} ms", result.load_ms)),
        ("peak RSS", human_bytes(result.peak_rss_bytes)),
        ("throttled", if result.throttled { "yes: the figures are suspect".to_owned() } else { "no".to_owned() }),
    ];
    if !result.error.is_empty() {
        facts.push(("error", result.error.clone()));
    }
    for (k, v) in facts {
        out.push_str(&format!("{k:<15} {v}\n"));
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header(["", "median", "min", "max", "stddev", "samples"]);
    for (name, stat) in [
        ("TTFT (ms)", &result.ttft_ms),
        ("prompt tok/s", &result.prompt_tokens_per_second),
        ("generation tok/s", &result.generation_tokens_per_second),
    ] {
        let s = stat.unwrap_or_default();
        t.add_row([
            name.to_owned(),
            format!("{:.1}", s.median),
            format!("{:.1}", s.min),
            format!("{:.1}", s.max),
            format!("{:.1}", s.stddev),
            s.samples.to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&t.to_string());
    out.push('\n');
    out
}
