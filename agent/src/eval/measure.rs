//! One measurement of resolved models with a suite: the time-budget check against the device's measured
//! speeds, then, within the suite's time budget, the baseline's logits (cached, or computed once and cached),
//! the candidate's KL-divergence run against them (a plain perplexity run without a baseline), and the golden
//! prompts. The result is a [`Measurement`], or why the device could not run it.

use std::path::Path;
use std::time::Duration;

use alki_shared::digest::Digest;
use alki_shared::eval::perplexity::{KlDivergence, Perplexity, PerplexitySettings};
use alki_shared::eval::quality::{CouldNotRun, EvalSettings, GoldenSummary, Measurement};
use alki_shared::eval::suite::{Suite, Workload};
use tokio::time::Instant;

use super::golden::{Golden, GoldenError};
use super::logits::{BaseLogits, Cached, Key};
use super::perplexity::{RunError, Runner};
use super::tool::Tool;
use super::vocab::Vocab;
use crate::runtime::priority::Priority;
use crate::runtime::{HttpClient, InstanceOptions, LaunchSpec};

/// A model ready to measure: which variant (or file) it is, how it runs, its tool and vocabulary.
#[derive(Clone, Debug)]
pub struct Model {
    pub digest: Digest,
    pub spec: LaunchSpec,
    pub tool: Tool,
    pub vocab: Vocab,
}

/// The baseline's logits: already cached, or to compute from the baseline model.
#[derive(Debug)]
pub enum Baseline {
    Cached(Cached),
    Model(Box<Model>),
}

/// A suite as a measurement reads it.
#[derive(Clone, Copy, Debug)]
pub struct SuiteRef<'a> {
    pub digest: &'a Digest,
    pub suite: &'a Suite,
    /// The corpus file llama-perplexity reads.
    pub corpus: &'a Path,
}

/// Prompt processing and generation speeds measured on this device (tokens/s), for the budget check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speeds {
    pub prompt: f64,
    pub generation: f64,
}

/// What measurements share: how processes run and where baseline logits are cached.
pub struct Meter<'a> {
    pub instance: &'a InstanceOptions,
    pub http: &'a HttpClient,
    pub priority: Priority,
    /// llama-perplexity's `-t` (0: the tool decides).
    pub threads: u32,
    pub logits: &'a BaseLogits,
    /// Free disk space a baseline run must leave.
    pub disk_reserve: u64,
    /// The device's measured speeds, when known.
    pub speeds: Option<Speeds>,
}

/// Refuses a suite whose estimated run time here exceeds its budget; passes when a speed is unknown (no
/// promise either way: the deadline still holds).
pub fn check_budget(work: &Workload, speeds: Option<Speeds>, budget_seconds: u32) -> Result<(), CouldNotRun> {
    let Some(speeds) = speeds else { return Ok(()) };
    let estimated = work.estimated_seconds(speeds.prompt, speeds.generation);
    if !estimated.is_finite() || estimated <= f64::from(budget_seconds) {
        return Ok(());
    }
    Err(CouldNotRun::SuiteTooLargeForBudget { estimated_seconds: estimated.ceil() as u64, budget_seconds })
}

/// A failed step, said for the report.
fn failed(what: &str, e: impl std::fmt::Display) -> CouldNotRun {
    CouldNotRun::Failed { problem: format!("{what}: {e}") }
}

impl Meter<'_> {
    /// Measures `candidate` with `suite`, against `baseline` when there is one.
    pub async fn measure(
        &self,
        candidate: &Model,
        baseline: Option<Baseline>,
        suite: SuiteRef<'_>,
    ) -> Result<Measurement, CouldNotRun> {
        let manifest = &suite.suite.manifest;
        let runs = 1 + u32::from(matches!(baseline, Some(Baseline::Model(_))));
        check_budget(&suite.suite.workload(runs), self.speeds, manifest.time_budget_seconds)?;
        let started = Instant::now();
        let budget = manifest.time_budget_seconds;
        let deadline = started + Duration::from_secs(u64::from(budget));
        let settings = self.settings(suite.suite, &candidate.spec);
        let runner = Runner { tool: &candidate.tool, priority: self.priority, deadline };
        let out_of_time = CouldNotRun::OutOfTime { budget_seconds: budget };
        let (perplexity, kl_divergence) = match baseline {
            None => (Some(self.plain(&runner, &settings, candidate, suite).await?.ppl), None),
            Some(baseline) => {
                let logits = self.baseline_logits(baseline, suite, deadline).await?;
                let kld = self.kl_divergence(&runner, &settings, candidate, &logits, budget).await?;
                (Some(kld.ppl), Some(kld))
            }
        };
        let golden = Golden { instance: self.instance, http: self.http, priority: self.priority, deadline };
        let prompts = &suite.suite.prompts;
        let golden: GoldenSummary =
            match golden.run(candidate.spec.clone(), prompts, manifest.seed, &candidate.vocab.control_tokens).await {
                Ok(summary) => summary,
                Err(GoldenError::OutOfTime) => return Err(out_of_time),
                Err(e) => return Err(failed("golden prompts", e)),
            };
        Ok(Measurement {
            perplexity,
            kl_divergence,
            golden,
            build: candidate.tool.build.clone(),
            settings: EvalSettings { perplexity: settings, seed: manifest.seed },
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    fn settings(&self, suite: &Suite, spec: &LaunchSpec) -> PerplexitySettings {
        let gpu_layers = match spec.settings.gpu_layers {
            // "all layers": llama.cpp caps the count at the model's layers.
            n if n < 0 => 999,
            n => n as u32,
        };
        PerplexitySettings {
            context_size: suite.manifest.context_size,
            chunks: suite.manifest.chunks,
            threads: self.threads,
            gpu_layers,
        }
    }

    async fn plain(
        &self,
        runner: &Runner<'_>,
        settings: &PerplexitySettings,
        candidate: &Model,
        suite: SuiteRef<'_>,
    ) -> Result<Perplexity, CouldNotRun> {
        let budget = suite.suite.manifest.time_budget_seconds;
        runner.perplexity(settings, &candidate.spec.model_path, suite.corpus).await.map_err(|e| match e {
            RunError::OutOfTime => CouldNotRun::OutOfTime { budget_seconds: budget },
            e => failed("the candidate's perplexity run", e),
        })
    }

    async fn kl_divergence(
        &self,
        runner: &Runner<'_>,
        settings: &PerplexitySettings,
        candidate: &Model,
        logits: &Cached,
        budget: u32,
    ) -> Result<KlDivergence, CouldNotRun> {
        if let Some(n_vocab) = candidate.vocab.n_vocab.filter(|n| *n != logits.header.n_vocab) {
            let problem = format!(
                "the candidate's vocabulary has {n_vocab} tokens and the baseline's {}; KL divergence compares \
                 models with the same tokenizer — evaluate without a baseline or against a model of the same family",
                logits.header.n_vocab
            );
            return Err(CouldNotRun::Failed { problem });
        }
        runner.kl_divergence(settings, &candidate.spec.model_path, &logits.path).await.map_err(|e| match e {
            RunError::OutOfTime => CouldNotRun::OutOfTime { budget_seconds: budget },
            e => failed("the candidate's KL-divergence run", e),
        })
    }

    /// The baseline's logits: as cached, or computed with the baseline's own build (and cached). A file the
    /// run left incomplete is computed once more.
    async fn baseline_logits(
        &self,
        baseline: Baseline,
        suite: SuiteRef<'_>,
        deadline: Instant,
    ) -> Result<Cached, CouldNotRun> {
        let model = match baseline {
            Baseline::Cached(cached) => return Ok(cached),
            Baseline::Model(model) => model,
        };
        let manifest = &suite.suite.manifest;
        let key = Key {
            baseline: &model.digest,
            suite: suite.digest,
            context_size: manifest.context_size,
            chunks: manifest.chunks,
        };
        let n_vocab = model.vocab.n_vocab.unwrap_or(0);
        self.logits.make_room(key, n_vocab, self.disk_reserve).await.map_err(|e| failed("the baseline's logits", e))?;
        let runner = Runner { tool: &model.tool, priority: self.priority, deadline };
        let settings = self.settings(suite.suite, &model.spec);
        let out_of_time = || CouldNotRun::OutOfTime { budget_seconds: manifest.time_budget_seconds };
        let mut last = String::new();
        for attempt in 1..=2 {
            let scratch = self.logits.scratch().map_err(|e| failed("the baseline's logits", e))?;
            match runner.base_logits(&settings, &model.spec.model_path, suite.corpus, &scratch).await {
                Err(RunError::OutOfTime) => return Err(out_of_time()),
                Err(e) => return Err(failed("the baseline's run", e)),
                Ok(()) => {}
            }
            match self.logits.insert(key, scratch).await {
                Ok(cached) => return Ok(cached),
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "The baseline's run left no usable logits.");
                    last = e;
                }
            }
        }
        Err(failed("the baseline's run", last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work() -> Workload {
        Workload { perplexity_runs: 2, tokens_per_run: 2048, prompts: 20, reply_tokens: 320 }
    }

    #[test]
    fn the_budget_is_checked_against_measured_speeds_only() {
        assert_eq!(check_budget(&work(), None, 1), Ok(()), "unknown speeds: no promise either way");
        let fast = Speeds { prompt: 1024.0, generation: 64.0 };
        assert_eq!(check_budget(&work(), Some(fast), 10), Ok(()), "4 s + 5 s fits 10 s");
        let slow = Speeds { prompt: 100.0, generation: 4.0 };
        assert_eq!(
            check_budget(&work(), Some(slow), 60),
            Err(CouldNotRun::SuiteTooLargeForBudget { estimated_seconds: 121, budget_seconds: 60 }),
            "40.96 s of perplexity and 80 s of replies"
        );
        let unmeasured_generation = Speeds { prompt: 1000.0, generation: 0.0 };
        assert_eq!(check_budget(&work(), Some(unmeasured_generation), 1), Ok(()), "a speed not measured");
    }
}
