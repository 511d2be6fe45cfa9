//! `alki-agent eval`: one evaluation by hand, of GGUF files with a suite directory (as `alkictl eval push`
//! would push it): the candidate, and a baseline when given, run on the configured llama-server's build at the
//! configured priority, with the same measurement as on a rollout; the result as a table or JSON.

use std::path::Path;

use alki_shared::bundle::RuntimeDefaults;
use alki_shared::digest::{Digest, hash_file};
use alki_shared::eval::artifact::build_manifest;
use alki_shared::eval::quality::{CouldNotRun, Outcome, QualityResult};
use alki_shared::eval::suite::{
    MAX_CORPUS_BYTES, MAX_PROMPTS_BYTES, MAX_SUITE_TOML_BYTES, SUITE_FILE, Suite, SuiteFiles, SuiteManifest,
};
use anyhow::Context;

use super::logits::BaseLogits;
use super::measure::{Baseline, Meter, Model, SuiteRef};
use super::subject::Memory;
use super::{tool, vocab};
use crate::runtime::{InstanceOptions, LaunchSpec, StopPolicy, http_client};
use crate::settings::{LaunchSettings, RuntimeOverrides};
use crate::store::ContentStore;

/// A suite directory read and parsed, with the digest its manifest would have in a registry.
pub struct SuiteDir {
    pub suite: Suite,
    pub digest: Digest,
}

/// Reads `dir/suite.toml` and the files it names, each within its cap.
pub fn read_suite_dir(dir: &Path) -> anyhow::Result<SuiteDir> {
    let read = |name: &str, cap: usize| -> anyhow::Result<Vec<u8>> {
        let path = dir.join(name);
        let len = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
        anyhow::ensure!(len <= cap as u64, "{} is {len} bytes, over the limit of {cap}", path.display());
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let manifest_bytes = read(SUITE_FILE, MAX_SUITE_TOML_BYTES)?;
    let manifest = SuiteManifest::parse(&manifest_bytes).with_context(|| format!("suite {}", dir.display()))?;
    let corpus = read(&manifest.corpus, MAX_CORPUS_BYTES)?;
    let prompts = read(&manifest.prompts, MAX_PROMPTS_BYTES)?;
    let files = SuiteFiles { manifest: &manifest_bytes, corpus: &corpus, prompts: &prompts };
    let suite = Suite::parse(files).with_context(|| format!("suite {}", dir.display()))?;
    let oci = serde_json::to_vec(&build_manifest(&suite, files)).context("serialising the suite manifest")?;
    Ok(SuiteDir { suite, digest: Digest::of(&oci) })
}

/// `alki-agent eval --suite DIR --model FILE [--baseline FILE]`.
pub async fn run_cli(
    config: &crate::Config,
    suite_dir: &Path,
    model: &Path,
    baseline: Option<&Path>,
) -> anyhow::Result<QualityResult> {
    let SuiteDir { suite, digest } = read_suite_dir(suite_dir)?;
    let corpus = suite_dir.join(&suite.manifest.corpus);
    let (candidate_digest, candidate) = file_model(&config.runtime.llama_server, model).await?;
    let baseline_model = match baseline {
        Some(path) => Some(file_model(&config.runtime.llama_server, path).await?),
        None => None,
    };
    let mut result = QualityResult {
        suite: digest.clone(),
        candidate: candidate_digest,
        baseline: baseline_model.as_ref().map(|(d, _)| d.clone()),
        outcome: Outcome::CouldNotRun(CouldNotRun::Failed { problem: String::new() }),
    };
    let baseline_model = baseline_model.map(|(_, m)| m);
    let work = tempfile::tempdir().context("creating a work directory")?;
    let outcome = measure(
        config,
        work.path(),
        candidate,
        baseline_model,
        SuiteRef { digest: &digest, suite: &suite, corpus: &corpus },
    )
    .await;
    result.outcome = match outcome {
        Ok(m) => Outcome::Measured(m),
        Err(why) => Outcome::CouldNotRun(why),
    };
    Ok(result)
}

/// The memory probe, then the measurement (baseline logits in a scratch store: nothing is cached).
async fn measure(
    config: &crate::Config,
    work: &Path,
    candidate: Result<Model, CouldNotRun>,
    baseline: Option<Result<Model, CouldNotRun>>,
    suite: SuiteRef<'_>,
) -> Result<alki_shared::eval::quality::Measurement, CouldNotRun> {
    let candidate = candidate?;
    let baseline = baseline.transpose()?;
    let memory = Memory::probe(config.memory_reserve_bytes()).await;
    for m in std::iter::once(&candidate).chain(&baseline) {
        let size = tokio::fs::metadata(&m.spec.model_path).await.map(|m| m.len()).unwrap_or(0);
        memory.fit(size)?;
    }
    let store =
        ContentStore::open(&work.join("content")).map_err(|e| CouldNotRun::Failed { problem: e.to_string() })?;
    let logits = BaseLogits::new(store, &work.join("content"));
    let instance = InstanceOptions {
        llama_server: config.runtime.llama_server.clone(),
        extra_args: config.runtime.extra_args.clone(),
        launcher: config.runtime.launcher.clone(),
        log_dir: work.join("logs"),
        health_timeout: config.health_timeout(),
        stop: StopPolicy::default(),
    };
    let http = http_client();
    let meter = Meter {
        instance: &instance,
        http: &http,
        priority: config.eval.priority,
        threads: config.eval.threads,
        logits: &logits,
        disk_reserve: config.disk_reserve_bytes(),
        speeds: None,
    };
    meter.measure(&candidate, baseline.map(|m| Baseline::Model(Box::new(m))), suite).await
}

/// A GGUF file as a model on the build of `llama_server` (the bundle defaults: one slot, the golden
/// context), named by the file's digest; [`CouldNotRun::ToolMissing`] when the build has no llama-perplexity.
pub async fn file_model(llama_server: &Path, path: &Path) -> anyhow::Result<(Digest, Result<Model, CouldNotRun>)> {
    anyhow::ensure!(path.is_file(), "{}: no such model file; give the path of a GGUF file", path.display());
    let (digest, _) = hash_file(path).await.with_context(|| format!("reading {}", path.display()))?;
    let settings = LaunchSettings::resolve(&RuntimeDefaults::default(), &RuntimeOverrides::default());
    let tool = match tool::find(&settings, llama_server).await {
        Ok(tool) => tool,
        Err(why) => return Ok((digest, Err(why))),
    };
    let spec = LaunchSpec { model_path: path.to_owned(), settings, bundle_digest: String::new() };
    let model = Model { digest: digest.clone(), spec, tool, vocab: vocab::read(path).await };
    Ok((digest, Ok(model)))
}

/// A quality result as a table for people.
pub fn table(result: &QualityResult) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("suite", result.suite.to_string()),
        ("candidate", result.candidate.to_string()),
        ("baseline", result.baseline.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".to_owned())),
    ];
    match &result.outcome {
        Outcome::CouldNotRun(why) => rows.push(("outcome", format!("could not run: {why}"))),
        Outcome::Measured(m) => {
            rows.push(("outcome", "measured".to_owned()));
            let estimate =
                |e: &alki_shared::eval::perplexity::Estimate| format!("{:.4} ± {:.4}", e.value, e.uncertainty);
            if let Some(p) = &m.perplexity {
                rows.push(("perplexity", estimate(p)));
            }
            if let Some(k) = &m.kl_divergence {
                rows.push(("perplexity ratio", estimate(&k.ppl_ratio)));
                rows.push(("KLD mean", estimate(&k.kld_mean)));
                rows.push(("KLD p99 / max", format!("{:.6} / {:.6}", k.kld_p99, k.kld_max)));
                rows.push(("top-1 agreement", format!("{:.2} %", k.top1_agreement.value * 100.0)));
            }
            rows.push(("golden prompts", format!("{} of {} passed", m.golden.passed, m.golden.prompts)));
            for failure in &m.golden.failures {
                rows.push(("  failed", failure.to_string()));
            }
            let p = &m.settings.perplexity;
            rows.push(("build", m.build.clone()));
            rows.push((
                "settings",
                format!(
                    "-c {} --chunks {} -t {} -ngl {}, seed {}",
                    p.context_size, p.chunks, p.threads, p.gpu_layers, m.settings.seed
                ),
            ));
            rows.push(("duration", format!("{:.1} s", m.duration_ms as f64 / 1000.0)));
        }
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<17} {v}\n"));
    }
    out
}
