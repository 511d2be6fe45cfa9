//! One evaluation of bundles, from request to result: the suite acquired, the candidate's variant chosen,
//! fit-checked and acquired, the baseline's logits taken from the cache (or the baseline acquired so they are
//! computed), then measured. Every refusal becomes the result's "could not run" with its reason: a device
//! never fails an evaluation silently.

use std::path::PathBuf;
use std::sync::Arc;

use alki_shared::digest::Digest;
use alki_shared::eval::quality::{CouldNotRun, Measurement, Outcome, QualityResult};
use tokio::time::Instant;

use super::logits::{BaseLogits, Key};
use super::measure::{Baseline, Meter, Speeds, SuiteRef};
use super::subject::{self, Choice, Memory};
use super::suite::{self, AcquiredSuite};
use crate::metrics::AgentMetrics;
use crate::pull::keep::{deployed, kept};
use crate::pull::{Acquirer, PullOptions, prune_variant_dirs};
use crate::reference::BundleLocation;
use crate::runtime::priority::Priority;
use crate::runtime::{HttpClient, InstanceOptions};

/// What evaluations need from the agent.
#[derive(Clone)]
pub struct Env {
    /// The one acquire path (registries, trust policy, content store, runtime builds).
    pub acquirer: Acquirer,
    pub data_dir: PathBuf,
    /// `<data_dir>/evaluation`: where evaluated variants are materialised (hard links), apart from `bundles/`.
    pub work_dir: PathBuf,
    /// Options of the loopback instances (their own log directory).
    pub instance: InstanceOptions,
    pub http: HttpClient,
    pub logits: BaseLogits,
    pub priority: Priority,
    /// llama-perplexity's `-t`.
    pub threads: u32,
    /// Memory kept free beside what is served and the evaluated model.
    pub memory_reserve: u64,
    pub disk_reserve: u64,
    pub bandwidth: Option<u64>,
    /// The last benchmark (for the speeds of the budget check) and the evaluation counters.
    pub metrics: Arc<AgentMetrics>,
}

/// What to evaluate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub candidate: BundleLocation,
    /// The candidate's variant; None: the one this device would run.
    pub variant: Option<Digest>,
    pub suite: BundleLocation,
    /// What KL divergence and top-1 agreement compare with; None: perplexity and golden prompts only.
    pub baseline: Option<BaselineRef>,
}

/// A baseline bundle and its variant (None: the one this device would run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaselineRef {
    pub bundle: BundleLocation,
    pub variant: Option<Digest>,
}

/// The digests a result names, learnt as the evaluation goes.
struct Named {
    candidate: Digest,
    baseline: Option<Digest>,
}

impl Env {
    /// Evaluates as `request` says; the result says what was measured or why it could not be.
    pub async fn evaluate(&self, request: &Request) -> QualityResult {
        let started = Instant::now();
        let candidate = request.variant.clone().unwrap_or_else(|| request.candidate.digest.clone());
        let mut named = Named { candidate, baseline: request.baseline.as_ref().and_then(|b| b.variant.clone()) };
        let outcome = match self.try_evaluate(request, &mut named).await {
            Ok(measurement) => Outcome::Measured(measurement),
            Err(why) => Outcome::CouldNotRun(why),
        };
        prune_variant_dirs(&self.work_dir, &[]).await;
        self.metrics.set_base_logits_bytes(self.logits.bytes().await);
        let result = QualityResult {
            suite: request.suite.digest.clone(),
            candidate: named.candidate,
            baseline: named.baseline,
            outcome,
        };
        tracing::info!(candidate = %request.candidate, outcome = outcome_label(&result.outcome), took_ms = started.elapsed().as_millis() as u64, "Evaluation done.");
        result
    }

    async fn try_evaluate(&self, request: &Request, named: &mut Named) -> Result<Measurement, CouldNotRun> {
        let options = self.pull_options().await;
        let memory = Memory::probe(self.memory_reserve).await;
        let suite = suite::acquire(&self.acquirer, &request.suite, &options)
            .await
            .map_err(|e| CouldNotRun::Failed { problem: e.to_string() })?;
        let choice =
            subject::choose(&self.acquirer, &request.candidate, request.variant.as_ref(), memory, &options).await?;
        named.candidate = choice.variant.clone();
        let baseline = match &request.baseline {
            Some(b) => Some(subject::choose(&self.acquirer, &b.bundle, b.variant.as_ref(), memory, &options).await?),
            None => None,
        };
        named.baseline = baseline.as_ref().map(|b| b.variant.clone());
        let pulled = subject::acquire(&self.acquirer, &choice, &self.work_dir, memory, &options).await?;
        let candidate = subject::model(&pulled, &choice.bundle, &self.instance.llama_server).await?;
        let baseline = match baseline {
            Some(b) => Some(self.baseline(&b, &suite, memory, &options).await?),
            None => None,
        };
        let meter = Meter {
            instance: &self.instance,
            http: &self.http,
            priority: self.priority,
            threads: self.threads,
            logits: &self.logits,
            disk_reserve: self.disk_reserve,
            speeds: self.speeds(),
        };
        let suite_ref = SuiteRef { digest: suite.digest(), suite: &suite.suite, corpus: &suite.corpus };
        meter.measure(&candidate, baseline, suite_ref).await
    }

    /// The baseline's logits from the cache, or the baseline acquired to compute them.
    async fn baseline(
        &self,
        choice: &Choice,
        suite: &AcquiredSuite,
        memory: Memory,
        options: &PullOptions,
    ) -> Result<Baseline, CouldNotRun> {
        let m = &suite.suite.manifest;
        let key =
            Key { baseline: &choice.variant, suite: suite.digest(), context_size: m.context_size, chunks: m.chunks };
        if let Some(cached) = self.logits.get(key).await {
            tracing::info!(baseline = %choice.bundle, "Reusing the baseline's cached logits.");
            self.metrics.base_logits(true);
            return Ok(Baseline::Cached(cached));
        }
        let pulled = subject::acquire(&self.acquirer, choice, &self.work_dir, memory, options).await?;
        let model = subject::model(&pulled, &choice.bundle, &self.instance.llama_server).await?;
        self.metrics.base_logits(false);
        Ok(Baseline::Model(Box::new(model)))
    }

    /// Pulls keep what the device runs (active and previous deployments) and honour the disk limits.
    async fn pull_options(&self) -> PullOptions {
        let keep = kept(&self.acquirer.store, deployed(&self.data_dir).await).await;
        PullOptions {
            disk_reserve: self.disk_reserve,
            keep: keep.blobs,
            keep_variants: keep.variants,
            bandwidth: self.bandwidth,
            ..PullOptions::default()
        }
    }

    /// Speeds from the last benchmark of the serving model, when there is one.
    fn speeds(&self) -> Option<Speeds> {
        let b = self.metrics.last_benchmark()?;
        let median = |s: Option<alki_shared::proto::Stat>| s.map(|s| s.median).filter(|m| *m > 0.0);
        Some(Speeds {
            prompt: median(b.prompt_tokens_per_second)?,
            generation: median(b.generation_tokens_per_second)?,
        })
    }
}

/// The outcome's name, as `alki_agent_evaluations_total{outcome}` counts it.
pub fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Measured(_) => "measured",
        Outcome::CouldNotRun(CouldNotRun::DoesNotFit { .. }) => "does_not_fit",
        Outcome::CouldNotRun(CouldNotRun::SuiteTooLargeForBudget { .. }) => "suite_too_large_for_budget",
        Outcome::CouldNotRun(CouldNotRun::OutOfTime { .. }) => "out_of_time",
        Outcome::CouldNotRun(CouldNotRun::ToolMissing { .. }) => "tool_missing",
        Outcome::CouldNotRun(CouldNotRun::Failed { .. }) => "failed",
    }
}
