//! Evaluation scheduling: the three triggers as jobs (after a committed activation whose desired state names a
//! suite, once per variant × suite × baseline; an Evaluate command, whose baseline defaults to what the
//! device serves; a calibration with a suite, each variant that fits against the bundle's most precise one),
//! the bounded queue they wait in (beyond it a job is refused at once with a report saying the device is
//! busy), and the task that runs them one at a time, keeps their reports in `evaluations.json`, counts them,
//! and hands them to the session (which keeps them in its outbox while the controller is unreachable).

use std::sync::Arc;
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::digest::Digest;
use alki_shared::eval::quality::{CouldNotRun, Outcome, QualityResult};
use alki_shared::eval::wire;
use alki_shared::proto;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use super::files::{DoneFile, EvaluationsFile, done_key};
use super::run::{BaselineRef, Env, Request, outcome_label};
use super::subject::{self, Memory, Offer};
use crate::metrics::{AgentMetrics, EvalPlace};
use crate::reference::BundleLocation;

/// Evaluations waiting behind the one running; more are refused with a "busy" report.
pub const QUEUE: usize = 2;
/// Reports waiting for the session.
pub const REPORTS: usize = 16;
/// How long a report waits for room in the session's queue before it is left in the reports file only.
const REPORT_WAIT: Duration = Duration::from_secs(10);

/// An evaluation to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// A committed activation whose desired state names a suite: the active variant against the baseline.
    Activation { rollout_id: String, request: Request },
    /// An Evaluate command.
    Command { command_id: String, request: Request },
    /// A Calibrate command with a suite: every variant of `bundle` against its most precise one that fits.
    Calibrate { command_id: String, bundle: BundleLocation, suite: BundleLocation },
}

impl Job {
    fn ids(&self) -> (&str, &str) {
        match self {
            Job::Activation { rollout_id, .. } => ("", rollout_id),
            Job::Command { command_id, .. } | Job::Calibrate { command_id, .. } => (command_id, ""),
        }
    }

    /// The Evaluate command as a job; its baseline defaults to `serving` (what the device serves now, with
    /// its variant). A command naming no usable bundle or suite is refused with a report.
    pub fn command(
        command_id: &str,
        evaluate: &proto::Evaluate,
        serving: Option<(&proto::BundleRef, &str)>,
    ) -> Result<Job, Box<proto::EvalReport>> {
        let refuse = |problem: String| {
            let mut report = refusal(command_id, "", evaluate.bundle.as_ref(), evaluate.suite.as_ref(), problem);
            report.baseline = evaluate.baseline.clone();
            Box::new(report)
        };
        let candidate = BundleLocation::from_proto(evaluate.bundle.as_ref())
            .map_err(|e| refuse(format!("the evaluate command names no usable bundle: {e}")))?;
        let suite = BundleLocation::from_proto(evaluate.suite.as_ref())
            .map_err(|e| refuse(format!("the evaluate command names no usable eval suite: {e}")))?;
        let (baseline, baseline_variant) = match (&evaluate.baseline, serving) {
            (Some(b), _) => (Some(b), evaluate.baseline_variant_digest.as_str()),
            (None, Some((running, variant))) => (Some(running), variant),
            (None, None) => (None, ""),
        };
        let baseline = match baseline {
            Some(b) => Some(BaselineRef {
                bundle: BundleLocation::from_proto(Some(b))
                    .map_err(|e| refuse(format!("the evaluate command names no usable baseline: {e}")))?,
                variant: baseline_variant.parse().ok(),
            }),
            None => None,
        };
        let variant = evaluate.variant_digest.parse().ok();
        Ok(Job::Command { command_id: command_id.to_owned(), request: Request { candidate, variant, suite, baseline } })
    }
}

/// A report for an evaluation that did not run, saying why (failed: the controller counts it as a device
/// that could not run the suite, never as a measurement).
fn refusal(
    command_id: &str,
    rollout_id: &str,
    bundle: Option<&proto::BundleRef>,
    suite: Option<&proto::BundleRef>,
    problem: String,
) -> proto::EvalReport {
    let digest = |r: Option<&proto::BundleRef>| r.map(|r| r.digest.clone()).unwrap_or_default();
    proto::EvalReport {
        command_id: command_id.to_owned(),
        rollout_id: rollout_id.to_owned(),
        bundle: bundle.cloned(),
        suite: suite.cloned(),
        baseline: None,
        result: Some(proto::QualityResult {
            suite_digest: digest(suite),
            variant_digest: digest(bundle),
            baseline_variant_digest: String::new(),
            outcome: Some(proto::quality_result::Outcome::CouldNotRun(proto::CouldNotRun {
                kind: "failed".to_owned(),
                problem,
                ..Default::default()
            })),
        }),
        at_unix_ms: UnixMs::now().as_millis(),
    }
}

/// The sending side of the evaluation queue (session, device loop, benchmark task).
#[derive(Clone, Debug)]
pub struct Jobs {
    queue: mpsc::Sender<Job>,
    reports: mpsc::Sender<proto::EvalReport>,
}

impl Jobs {
    /// Queues `job`; when the queue is full it is refused at once with a report saying the device is busy.
    pub fn submit(&self, job: Job) -> bool {
        let job = match self.queue.try_send(job) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => job,
        };
        let (command_id, rollout_id) = job.ids();
        tracing::warn!(%command_id, %rollout_id, "Evaluation refused: the device is busy with other evaluations.");
        let problem =
            format!("the device is busy with other evaluations (at most {} at once); ask again later", QUEUE + 1);
        let (bundle, suite) = match &job {
            Job::Activation { request, .. } | Job::Command { request, .. } => (&request.candidate, &request.suite),
            Job::Calibrate { bundle, suite, .. } => (bundle, suite),
        };
        self.refuse(refusal(command_id, rollout_id, Some(&bundle.to_proto()), Some(&suite.to_proto()), problem));
        false
    }
}

impl Jobs {
    /// A calibration's evaluations (command `command_id`, with `suite`): queued, or refused with a report.
    pub fn calibrate(&self, command_id: &str, bundle: Option<&proto::BundleRef>, suite: &proto::BundleRef) {
        let refs = BundleLocation::from_proto(bundle).and_then(|b| Ok((b, BundleLocation::from_proto(Some(suite))?)));
        match refs {
            Ok((bundle, suite)) => {
                self.submit(Job::Calibrate { command_id: command_id.to_owned(), bundle, suite });
            }
            Err(e) => {
                let problem = format!("the calibrate command names no usable bundle or eval suite: {e}");
                self.refuse(refusal(command_id, "", bundle, Some(suite), problem));
            }
        }
    }

    /// Sends a refusal report at once.
    pub fn refuse(&self, report: proto::EvalReport) {
        if self.reports.try_send(report).is_err() {
            tracing::warn!("An evaluation refusal could not be queued for the controller.");
        }
    }
}

/// Where finished evaluations go (counted, kept in `evaluations.json`, handed to the session), and the file
/// of those done after activations. Shared by the evaluation task and the device loop (evaluations in a
/// swap's gap).
#[derive(Clone, Debug)]
pub struct Reporter {
    pub metrics: Arc<AgentMetrics>,
    pub reports: mpsc::Sender<proto::EvalReport>,
    pub file: EvaluationsFile,
    pub done: DoneFile,
}

impl Reporter {
    /// A report is counted (by outcome and where it ran), kept in the reports file, and handed to the session.
    pub async fn finished(&self, report: proto::EvalReport, outcome: &str, place: EvalPlace, took: Duration) {
        self.metrics.evaluated(outcome, place, took.as_secs_f64());
        self.file.append_async(report.clone()).await;
        let command_id = report.command_id.clone();
        if tokio::time::timeout(REPORT_WAIT, self.reports.send(report)).await.is_err() {
            tracing::warn!(%command_id, "The evaluation report could not be queued for the controller; it is kept in the evaluations file.");
        }
    }
}

/// What an evaluation after an activation is remembered by in `evaluated.json`.
pub(crate) fn activation_key(request: &Request) -> String {
    let variant = request.variant.as_ref().unwrap_or(&request.candidate.digest);
    let baseline = request.baseline.as_ref().map(|b| b.variant.as_ref().unwrap_or(&b.bundle.digest));
    done_key(variant, &request.suite.digest, baseline)
}

/// The evaluation task: the environment, and where its reports go.
pub struct Evaluator {
    pub env: Env,
    pub reporter: Reporter,
}

impl Evaluator {
    /// Starts the task that runs queued evaluations one at a time until `shutdown` (an evaluation running
    /// then is abandoned: its processes are killed).
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> (Jobs, tokio::task::JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let jobs = Jobs { queue, reports: self.reporter.reports.clone() };
        let task = tokio::spawn(self.run(rx, shutdown).in_current_span());
        (jobs, task)
    }

    async fn run(self, mut jobs: mpsc::Receiver<Job>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let job = tokio::select! {
                job = jobs.recv() => match job { Some(job) => job, None => return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let (command_id, rollout_id) = job.ids();
            let span = tracing::info_span!("evaluation", %command_id, %rollout_id);
            tokio::select! {
                () = self.run_job(job.clone()).instrument(span) => {}
                _ = shutdown.wait_for(|stop| *stop) => {
                    tracing::info!("Evaluation abandoned for shutdown.");
                    return;
                }
            }
        }
    }

    async fn run_job(&self, job: Job) {
        match job {
            Job::Activation { rollout_id, request } => self.after_activation(&rollout_id, &request).await,
            Job::Command { command_id, request } => self.evaluate(&command_id, "", &request).await,
            Job::Calibrate { command_id, bundle, suite } => self.calibrate(&command_id, &bundle, &suite).await,
        }
    }

    /// Once per variant × suite × baseline: a reconnect or a restart that offers it again is ignored, and so
    /// is an activation whose candidate was evaluated in its swap's gap.
    async fn after_activation(&self, rollout_id: &str, request: &Request) {
        let key = activation_key(request);
        if self.reporter.done.contains(&key).await {
            tracing::info!(candidate = %request.candidate, suite = %request.suite, "Evaluated already; not again.");
            return;
        }
        self.evaluate("", rollout_id, request).await;
        self.reporter.done.insert(key).await;
    }

    async fn evaluate(&self, command_id: &str, rollout_id: &str, request: &Request) {
        tracing::info!(candidate = %request.candidate, suite = %request.suite, "Evaluation starting.");
        let started = Instant::now();
        let result = self.env.evaluate(request).await;
        let baseline = request.baseline.as_ref().map(|b| &b.bundle);
        let report = report(command_id, rollout_id, &request.candidate, &request.suite, baseline, &result);
        self.finished(report, outcome_label(&result.outcome), started.elapsed()).await;
    }

    /// Every variant of `bundle` against the most precise one that fits (the largest: same parameters, more
    /// bits per weight); variants that do not fit are reported as such.
    async fn calibrate(&self, command_id: &str, bundle: &BundleLocation, suite: &BundleLocation) {
        let started = Instant::now();
        let memory = Memory::probe(self.env.memory_reserve).await;
        let options = crate::pull::PullOptions { disk_reserve: self.env.disk_reserve, ..Default::default() };
        let offered = match subject::offer(&self.env.acquirer, bundle, &options).await {
            Ok(Offer::Index(variants)) => variants,
            Ok(Offer::Single { .. }) => {
                let request =
                    Request { candidate: bundle.clone(), variant: None, suite: suite.clone(), baseline: None };
                return self.evaluate(command_id, "", &request).await;
            }
            Err(why) => {
                let result = could_not_run(suite, &bundle.digest, None, why);
                let report = report(command_id, "", bundle, suite, None, &result);
                return self.finished(report, outcome_label(&result.outcome), started.elapsed()).await;
            }
        };
        let fits = |v: &alki_shared::bundle::VariantInfo| memory.fit(v.memory_bytes.max(v.weights_bytes));
        let precise = offered.iter().filter(|v| fits(v).is_ok()).max_by_key(|v| v.weights_bytes);
        let baseline =
            precise.map(|v| BaselineRef { bundle: bundle.clone(), variant: Some(v.descriptor.digest.clone()) });
        for variant in &offered {
            let digest = &variant.descriptor.digest;
            if let Err(why) = fits(variant) {
                let baseline_variant = baseline.as_ref().and_then(|b| b.variant.clone());
                let result = could_not_run(suite, digest, baseline_variant, why);
                let report = report(command_id, "", bundle, suite, Some(bundle), &result);
                self.finished(report, outcome_label(&result.outcome), Duration::ZERO).await;
                continue;
            }
            let request = Request {
                candidate: bundle.clone(),
                variant: Some(digest.clone()),
                suite: suite.clone(),
                baseline: baseline.clone(),
            };
            self.evaluate(command_id, "", &request).await;
        }
    }

    async fn finished(&self, report: proto::EvalReport, outcome: &str, took: Duration) {
        self.reporter.finished(report, outcome, EvalPlace::Beside, took).await;
    }
}

fn could_not_run(
    suite: &BundleLocation,
    candidate: &Digest,
    baseline: Option<Digest>,
    why: CouldNotRun,
) -> QualityResult {
    QualityResult {
        suite: suite.digest.clone(),
        candidate: candidate.clone(),
        baseline,
        outcome: Outcome::CouldNotRun(why),
    }
}

/// The report of one evaluation.
pub(crate) fn report(
    command_id: &str,
    rollout_id: &str,
    bundle: &BundleLocation,
    suite: &BundleLocation,
    baseline: Option<&BundleLocation>,
    result: &QualityResult,
) -> proto::EvalReport {
    proto::EvalReport {
        command_id: command_id.to_owned(),
        rollout_id: rollout_id.to_owned(),
        bundle: Some(bundle.to_proto()),
        suite: Some(suite.to_proto()),
        baseline: result.baseline.as_ref().and(baseline).map(BundleLocation::to_proto),
        result: Some(wire::to_proto(result)),
        at_unix_ms: UnixMs::now().as_millis(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(repository: &str, what: &[u8]) -> proto::BundleRef {
        proto::BundleRef {
            registry: String::new(),
            repository: repository.to_owned(),
            digest: Digest::of(what).to_string(),
            tag: String::new(),
        }
    }

    #[test]
    fn an_evaluate_command_compares_with_what_is_served_unless_it_names_a_baseline() {
        let evaluate = proto::Evaluate {
            bundle: Some(reference("acme/b", b"b")),
            suite: Some(reference("acme/suite", b"s")),
            ..Default::default()
        };
        let served = reference("acme/a", b"a");
        let variant = Digest::of(b"a-q8").to_string();
        let Ok(Job::Command { command_id, request }) = Job::command("c1", &evaluate, Some((&served, &variant))) else {
            panic!("a job");
        };
        assert_eq!(command_id, "c1");
        let baseline = request.baseline.expect("the served model");
        assert_eq!((baseline.bundle.repository.as_str(), baseline.variant), ("acme/a", Some(Digest::of(b"a-q8"))));
        let Ok(Job::Command { request, .. }) = Job::command("c2", &evaluate, None) else { panic!("a job") };
        assert_eq!(request.baseline, None, "nothing served: no baseline");

        let named = proto::Evaluate { baseline: Some(reference("acme/x", b"x")), ..evaluate.clone() };
        let Ok(Job::Command { request, .. }) = Job::command("c3", &named, Some((&served, &variant))) else {
            panic!("a job");
        };
        assert_eq!(request.baseline.map(|b| (b.bundle.repository, b.variant)), Some(("acme/x".to_owned(), None)));

        let no_suite = proto::Evaluate { suite: None, ..evaluate };
        let refused = Job::command("c4", &no_suite, None).expect_err("refused");
        let result = wire::from_proto(refused.result.as_ref().expect("result")).expect_err("no suite digest");
        assert!(matches!(result, wire::WireError::Digest { field: "suite_digest", .. }));
        let Some(proto::quality_result::Outcome::CouldNotRun(c)) = refused.result.and_then(|r| r.outcome) else {
            panic!("could not run");
        };
        assert!(c.problem.contains("no usable eval suite"), "{}", c.problem);
    }

    #[tokio::test]
    async fn beyond_the_queue_a_job_is_refused_with_a_busy_report() {
        let (queue, _waiting) = mpsc::channel(QUEUE);
        let (reports, mut sent) = mpsc::channel(4);
        let jobs = Jobs { queue, reports };
        let request = Request {
            candidate: BundleLocation::from_proto(Some(&reference("acme/b", b"b"))).expect("bundle"),
            variant: None,
            suite: BundleLocation::from_proto(Some(&reference("acme/s", b"s"))).expect("suite"),
            baseline: None,
        };
        for i in 0..QUEUE {
            assert!(jobs.submit(Job::Command { command_id: format!("c{i}"), request: request.clone() }));
        }
        assert!(!jobs.submit(Job::Command { command_id: "late".into(), request }));
        let report = sent.try_recv().expect("a refusal at once");
        assert_eq!(report.command_id, "late");
        let result = wire::from_proto(report.result.as_ref().expect("result")).expect("well-formed");
        assert!(
            matches!(result.outcome, Outcome::CouldNotRun(CouldNotRun::Failed { ref problem }) if problem.contains("busy"))
        );
    }
}
