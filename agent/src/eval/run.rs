//! One evaluation of bundles, from request to result: the suite acquired, the candidate's variant chosen,
//! fit-checked and acquired, the baseline's logits taken from the cache (or the baseline acquired so they are
//! computed), then measured. Every refusal becomes the result's "could not run" with its reason: a device
//! never fails an evaluation silently.

use std::path::PathBuf;
use std::sync::Arc;

use alki_shared::digest::Digest;
use alki_shared::eval::quality::{CouldNotRun, Measurement, Outcome, QualityResult};
use tokio::time::Instant;

use super::logits::{BaseLogits, Cached, Key};
use super::measure::{Baseline, Meter, Model, Speeds, SuiteRef};
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
pub(crate) struct Named {
    pub candidate: Digest,
    pub baseline: Option<Digest>,
}

impl Named {
    /// What `request` names before anything is resolved.
    pub(crate) fn of(request: &Request) -> Named {
        let candidate = request.variant.clone().unwrap_or_else(|| request.candidate.digest.clone());
        Named { candidate, baseline: request.baseline.as_ref().and_then(|b| b.variant.clone()) }
    }

    /// The result of an evaluation of `suite` that ended with `outcome`.
    pub(crate) fn result(self, suite: &Digest, outcome: Outcome) -> QualityResult {
        QualityResult { suite: suite.clone(), candidate: self.candidate, baseline: self.baseline, outcome }
    }
}

/// The variants an evaluation compares.
pub(crate) struct Chosen {
    pub candidate: Choice,
    /// The baseline, and its logits when they are cached already (then it is never loaded).
    pub baseline: Option<(Choice, Option<Cached>)>,
}

impl Chosen {
    /// The memory the evaluation needs at most at once: it loads one model at a time (the baseline for its
    /// logits when they are not cached, then the candidate).
    pub(crate) fn needs(&self) -> u64 {
        let baseline = match &self.baseline {
            Some((choice, None)) => choice.needs,
            _ => 0,
        };
        self.candidate.needs.max(baseline)
    }
}

/// A suite as a measurement reads it.
pub(crate) fn suite_ref(suite: &AcquiredSuite) -> SuiteRef<'_> {
    SuiteRef { digest: suite.digest(), suite: &suite.suite, corpus: &suite.corpus }
}

impl Env {
    /// Evaluates as `request` says; the result says what was measured or why it could not be.
    pub async fn evaluate(&self, request: &Request) -> QualityResult {
        let started = Instant::now();
        let mut named = Named::of(request);
        let outcome = match self.try_evaluate(request, &mut named).await {
            Ok(measurement) => Outcome::Measured(measurement),
            Err(why) => Outcome::CouldNotRun(why),
        };
        self.tidy().await;
        let result = named.result(&request.suite.digest, outcome);
        tracing::info!(candidate = %request.candidate, outcome = outcome_label(&result.outcome), took_ms = started.elapsed().as_millis() as u64, "Evaluation done.");
        result
    }

    async fn try_evaluate(&self, request: &Request, named: &mut Named) -> Result<Measurement, CouldNotRun> {
        let options = self.pull_options().await;
        let memory = Memory::probe(self.memory_reserve).await;
        let suite = self.suite(&request.suite, &options).await?;
        let chosen = self.choose(request, &suite, memory, &options, named).await?;
        memory.fit(chosen.needs())?;
        let (candidate, baseline) = self.load(chosen, memory, &options).await?;
        self.meter().measure(&candidate, baseline, suite_ref(&suite)).await
    }

    /// The suite, acquired through the pull layer.
    pub(crate) async fn suite(
        &self,
        suite: &BundleLocation,
        options: &PullOptions,
    ) -> Result<AcquiredSuite, CouldNotRun> {
        suite::acquire(&self.acquirer, suite, options).await.map_err(|e| CouldNotRun::Failed { problem: e.to_string() })
    }

    /// The candidate's and the baseline's variants (chosen within `memory` when the request names none, and
    /// learnt by `named`), and whether the baseline's logits are cached already. Nothing is acquired or
    /// checked against the memory.
    pub(crate) async fn choose(
        &self,
        request: &Request,
        suite: &AcquiredSuite,
        memory: Memory,
        options: &PullOptions,
        named: &mut Named,
    ) -> Result<Chosen, CouldNotRun> {
        let candidate =
            subject::choose(&self.acquirer, &request.candidate, request.variant.as_ref(), memory, options).await?;
        named.candidate = candidate.variant.clone();
        let Some(b) = &request.baseline else { return Ok(Chosen { candidate, baseline: None }) };
        let baseline = subject::choose(&self.acquirer, &b.bundle, b.variant.as_ref(), memory, options).await?;
        named.baseline = Some(baseline.variant.clone());
        let m = &suite.suite.manifest;
        let key =
            Key { baseline: &baseline.variant, suite: suite.digest(), context_size: m.context_size, chunks: m.chunks };
        let cached = self.logits.get(key).await;
        Ok(Chosen { candidate, baseline: Some((baseline, cached)) })
    }

    /// The chosen variants acquired into the work directory and made models; a baseline with cached logits
    /// is not acquired.
    pub(crate) async fn load(
        &self,
        chosen: Chosen,
        memory: Memory,
        options: &PullOptions,
    ) -> Result<(Model, Option<Baseline>), CouldNotRun> {
        let pulled = subject::acquire(&self.acquirer, &chosen.candidate, &self.work_dir, memory, options).await?;
        let candidate = subject::model(&pulled, &chosen.candidate.bundle, &self.instance.llama_server).await?;
        let baseline = match chosen.baseline {
            None => None,
            Some((choice, Some(cached))) => {
                tracing::info!(baseline = %choice.bundle, "Reusing the baseline's cached logits.");
                self.metrics.base_logits(true);
                Some(Baseline::Cached(cached))
            }
            Some((choice, None)) => {
                let pulled = subject::acquire(&self.acquirer, &choice, &self.work_dir, memory, options).await?;
                let model = subject::model(&pulled, &choice.bundle, &self.instance.llama_server).await?;
                self.metrics.base_logits(false);
                Some(Baseline::Model(Box::new(model)))
            }
        };
        Ok((candidate, baseline))
    }

    /// How measurements run here.
    pub(crate) fn meter(&self) -> Meter<'_> {
        Meter {
            instance: &self.instance,
            http: &self.http,
            priority: self.priority,
            threads: self.threads,
            logits: &self.logits,
            disk_reserve: self.disk_reserve,
            speeds: self.speeds(),
        }
    }

    /// Pulls keep what the device runs (active and previous deployments) and honour the disk limits.
    pub(crate) async fn pull_options(&self) -> PullOptions {
        let keep = kept(&self.acquirer.store, deployed(&self.data_dir).await).await;
        PullOptions {
            disk_reserve: self.disk_reserve,
            keep: keep.blobs,
            keep_variants: keep.variants,
            bandwidth: self.bandwidth,
            ..PullOptions::default()
        }
    }

    /// After an evaluation: its materialised variants removed, the logits cache's size published.
    pub(crate) async fn tidy(&self) {
        prune_variant_dirs(&self.work_dir, &[]).await;
        self.metrics.set_base_logits_bytes(self.logits.bytes().await);
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
