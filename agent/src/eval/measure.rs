//! One measurement of resolved models with a suite: the time-budget check against the device's measured
//! speeds, then, within the suite's time budget (or a tighter [`Limit`], a swap gap's), the baseline's logits
//! (cached, or computed once and cached), the candidate's KL-divergence run against them (a plain perplexity
//! run without a baseline), and the golden prompts (on a loopback instance of their own, or on one already
//! running). The result is a [`Measurement`], or why the device could not run it.

use std::path::Path;
use std::time::Duration;

use alki_shared::digest::Digest;
use alki_shared::eval::perplexity::{Estimate, KlDivergence, Perplexity, PerplexitySettings};
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

/// When a measurement must be done by, and the budget its "out of time" names when that passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub at: Instant,
    pub budget_seconds: u32,
}

impl Limit {
    /// `budget_seconds` from now.
    pub fn after(budget_seconds: u32) -> Limit {
        Limit { at: Instant::now() + Duration::from_secs(u64::from(budget_seconds)), budget_seconds }
    }

    /// The one that passes first.
    pub fn earliest(self, other: Limit) -> Limit {
        if other.at < self.at { other } else { self }
    }

    fn out_of_time(&self) -> CouldNotRun {
        CouldNotRun::OutOfTime { budget_seconds: self.budget_seconds }
    }
}

/// Perplexity (and KL divergence against a baseline) measured; the golden prompts still to ask.
#[derive(Clone, Debug)]
pub struct Scored {
    perplexity: Option<Estimate>,
    kl_divergence: Option<KlDivergence>,
    settings: PerplexitySettings,
    started: Instant,
    /// What the golden prompts must finish within too.
    pub limit: Limit,
}

impl Scored {
    fn with_golden(self, golden: GoldenSummary, candidate: &Model, seed: u32) -> Measurement {
        Measurement {
            perplexity: self.perplexity,
            kl_divergence: self.kl_divergence,
            golden,
            build: candidate.tool.build.clone(),
            settings: EvalSettings { perplexity: self.settings, seed },
            duration_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

impl Meter<'_> {
    /// Measures `candidate` with `suite`, against `baseline` when there is one: [`Meter::score`], then the
    /// golden prompts on a loopback llama-server of its own.
    pub async fn measure(
        &self,
        candidate: &Model,
        baseline: Option<Baseline>,
        suite: SuiteRef<'_>,
    ) -> Result<Measurement, CouldNotRun> {
        let scored = self.score(candidate, baseline, suite, None).await?;
        let (prompts, seed) = (&suite.suite.prompts, suite.suite.manifest.seed);
        let golden = self.golden(scored.limit);
        let asked = golden.run(candidate.spec.clone(), prompts, seed, &candidate.vocab.control_tokens).await;
        let golden = golden_outcome(asked, scored.limit)?;
        Ok(scored.with_golden(golden, candidate, seed))
    }

    /// Completes a [`Meter::score`] with the golden prompts asked of `candidate` already running on `addr`
    /// (loopback, asked by nothing else meanwhile).
    pub async fn golden_at(
        &self,
        addr: std::net::SocketAddr,
        candidate: &Model,
        suite: SuiteRef<'_>,
        scored: Scored,
    ) -> Result<Measurement, CouldNotRun> {
        let (prompts, seed) = (&suite.suite.prompts, suite.suite.manifest.seed);
        let asked = self.golden(scored.limit).ask_at(addr, prompts, seed, &candidate.vocab.control_tokens).await;
        let golden = golden_outcome(asked, scored.limit)?;
        Ok(scored.with_golden(golden, candidate, seed))
    }

    fn golden(&self, limit: Limit) -> Golden<'_> {
        Golden { instance: self.instance, http: self.http, priority: self.priority, deadline: limit.at }
    }

    /// The time-budget check against the device's measured speeds, then, within the suite's time budget (or
    /// `tighter`, when that passes first), the baseline's logits and the candidate's KL-divergence run against
    /// them (a plain perplexity run without a baseline).
    pub async fn score(
        &self,
        candidate: &Model,
        baseline: Option<Baseline>,
        suite: SuiteRef<'_>,
        tighter: Option<Limit>,
    ) -> Result<Scored, CouldNotRun> {
        let runs = 1 + u32::from(matches!(baseline, Some(Baseline::Model(_))));
        let own = Limit::after(suite.suite.manifest.time_budget_seconds);
        let limit = tighter.map_or(own, |t| own.earliest(t));
        check_budget(&suite.suite.workload(runs), self.speeds, limit.budget_seconds)?;
        let started = Instant::now();
        let settings = self.settings(suite.suite, &candidate.spec);
        let runner = Runner { tool: &candidate.tool, priority: self.priority, deadline: limit.at };
        let (perplexity, kl_divergence) = match baseline {
            None => (Some(self.plain(&runner, &settings, candidate, suite, limit).await?.ppl), None),
            Some(baseline) => {
                let logits = self.baseline_logits(baseline, suite, limit).await?;
                let kld = self.kl_divergence(&runner, &settings, candidate, &logits, limit).await?;
                (Some(kld.ppl), Some(kld))
            }
        };
        Ok(Scored { perplexity, kl_divergence, settings, started, limit })
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
        limit: Limit,
    ) -> Result<Perplexity, CouldNotRun> {
        runner.perplexity(settings, &candidate.spec.model_path, suite.corpus).await.map_err(|e| match e {
            RunError::OutOfTime => limit.out_of_time(),
            e => failed("the candidate's perplexity run", e),
        })
    }

    async fn kl_divergence(
        &self,
        runner: &Runner<'_>,
        settings: &PerplexitySettings,
        candidate: &Model,
        logits: &Cached,
        limit: Limit,
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
            RunError::OutOfTime => limit.out_of_time(),
            e => failed("the candidate's KL-divergence run", e),
        })
    }

    /// The baseline's logits: as cached, or computed with the baseline's own build (and cached). A file the
    /// run left incomplete is computed once more.
    async fn baseline_logits(
        &self,
        baseline: Baseline,
        suite: SuiteRef<'_>,
        limit: Limit,
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
        let runner = Runner { tool: &model.tool, priority: self.priority, deadline: limit.at };
        let settings = self.settings(suite.suite, &model.spec);
        let mut last = String::new();
        for attempt in 1..=2 {
            let scratch = self.logits.scratch().map_err(|e| failed("the baseline's logits", e))?;
            match runner.base_logits(&settings, &model.spec.model_path, suite.corpus, &scratch).await {
                Err(RunError::OutOfTime) => return Err(limit.out_of_time()),
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

/// The golden prompts' summary, or why they could not be asked.
fn golden_outcome(asked: Result<GoldenSummary, GoldenError>, limit: Limit) -> Result<GoldenSummary, CouldNotRun> {
    match asked {
        Ok(summary) => Ok(summary),
        Err(GoldenError::OutOfTime) => Err(limit.out_of_time()),
        Err(e) => Err(failed("golden prompts", e)),
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
