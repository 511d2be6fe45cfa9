//! Benchmark scheduling: the jobs (after an activation, on a controller command, calibration), the bounded
//! queue they wait in (a command that does not fit is refused at once with a report), and the task that runs
//! them one at a time, stores their results and hands the reports to the session.

use std::sync::Arc;

use alki_shared::proto;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::calibrate::Calibration;
use super::files::{ResultsFile, ServingFile, record_serving};
use super::measure::DEFAULT_REPETITIONS;
use super::result::{Identity, benchmark_serving};
use crate::metrics::AgentMetrics;
use crate::runtime::{HttpClient, Proxy};
use crate::state::Snapshot;

/// Benchmark jobs waiting; more are refused (commands) or dropped (after an activation).
pub const JOB_QUEUE: usize = 4;

/// A benchmark to run.
#[derive(Clone, Debug)]
pub enum Job {
    /// After an activation: benchmark what is served now.
    Activation,
    /// A controller command: benchmark what is served now.
    OnDemand { command_id: String, repetitions: u32 },
    /// A controller command: benchmark every variant of a bundle that fits; with a suite, the evaluation
    /// task then evaluates them too.
    Calibrate {
        command_id: String,
        bundle: Option<proto::BundleRef>,
        repetitions: u32,
        suite: Option<proto::BundleRef>,
    },
}

impl Job {
    fn command_id(&self) -> &str {
        match self {
            Job::Activation => "",
            Job::OnDemand { command_id, .. } | Job::Calibrate { command_id, .. } => command_id,
        }
    }
}

/// Everything the benchmark task needs; built by [`crate::Agent::run`].
pub struct Benchmarker {
    pub identity: Identity,
    pub proxy: Arc<Proxy>,
    pub http: HttpClient,
    pub snapshot: watch::Receiver<Snapshot>,
    pub results: ResultsFile,
    pub serving_file: ServingFile,
    pub reports: mpsc::Sender<proto::BenchmarkReport>,
    pub metrics: Arc<AgentMetrics>,
    pub calibration: Calibration,
    /// Where a calibration with a suite hands its evaluations, once its benchmarks are done (one after the
    /// other: both load models beside the serving one).
    pub evals: Option<crate::eval::Jobs>,
}

/// The sending side of the benchmark queue.
#[derive(Clone, Debug)]
pub struct Jobs(mpsc::Sender<Job>);

impl Jobs {
    /// Queues `job`; false when the queue is full (a benchmark is running and others wait).
    pub fn offer(&self, job: Job) -> bool {
        self.0.try_send(job).is_ok()
    }

    /// A new model is committed: benchmark it, unless benchmarks are queued already.
    pub fn offer_activation(&self) {
        if !self.offer(Job::Activation) {
            tracing::info!("Benchmarks are queued already; this activation is not benchmarked.");
        }
    }
}

impl Benchmarker {
    /// Starts the task that runs queued jobs one at a time until `shutdown`, and keeps the serving file
    /// up to date meanwhile.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> (Jobs, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(JOB_QUEUE);
        let serving =
            record_serving(self.proxy.clone(), self.snapshot.clone(), self.serving_file.clone(), shutdown.clone());
        let task = tokio::spawn(
            async move {
                tokio::join!(self.run(rx, shutdown), serving);
            }
            .in_current_span(),
        );
        (Jobs(tx), task)
    }

    async fn run(self, mut jobs: mpsc::Receiver<Job>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let job = tokio::select! {
                job = jobs.recv() => match job { Some(job) => job, None => return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let command_id = job.command_id().to_owned();
            let report = tokio::select! {
                report = self.run_job(job) => report,
                _ = shutdown.wait_for(|stop| *stop) => {
                    tracing::info!(%command_id, "Benchmark abandoned for shutdown.");
                    return;
                }
            };
            self.finished(report).await;
        }
    }

    /// A job's report: the last benchmark of what is served goes to the metrics, the results to the results
    /// file, the report to the session.
    async fn finished(&self, report: proto::BenchmarkReport) {
        let ok: Vec<proto::BenchmarkResult> = report.results.iter().filter(|r| r.error.is_empty()).cloned().collect();
        if let Some(last) = ok.iter().rev().find(|r| r.trigger != proto::BenchmarkTrigger::Calibration as i32) {
            self.metrics.set_last_benchmark(last.clone());
        }
        if !report.results.is_empty() {
            self.results.append_async(report.results.clone()).await;
        }
        // The session forwards reports while connected; a full queue drops this one (it is stored).
        let command_id = report.command_id.clone();
        if self.reports.try_send(report).is_err() {
            tracing::warn!(%command_id, "The benchmark report could not be queued for the controller; it is kept in the results file.");
        }
    }

    /// A report of one benchmark of what is served now.
    async fn benchmark_serving(
        &self,
        command_id: String,
        trigger: proto::BenchmarkTrigger,
        repetitions: u32,
    ) -> proto::BenchmarkReport {
        let snapshot = self.snapshot.borrow().clone();
        let result = benchmark_serving(&self.proxy, &self.http, &self.identity, &snapshot, trigger, repetitions).await;
        proto::BenchmarkReport { command_id, results: vec![result], error: String::new() }
    }

    async fn run_job(&self, job: Job) -> proto::BenchmarkReport {
        tracing::info!(?job, "Benchmark starting.");
        match job {
            Job::Activation => {
                self.benchmark_serving(String::new(), proto::BenchmarkTrigger::Activation, DEFAULT_REPETITIONS).await
            }
            Job::OnDemand { command_id, repetitions } => {
                self.benchmark_serving(command_id, proto::BenchmarkTrigger::OnDemand, repetitions).await
            }
            Job::Calibrate { command_id, bundle, repetitions, suite } => {
                let report = match self.calibration.run(&self.identity, bundle.as_ref(), repetitions).await {
                    Ok(results) => {
                        proto::BenchmarkReport { command_id: command_id.clone(), results, error: String::new() }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Calibration could not run.");
                        proto::BenchmarkReport {
                            command_id: command_id.clone(),
                            results: Vec::new(),
                            error: e.to_string(),
                        }
                    }
                };
                if let (Some(suite), Some(evals)) = (suite, &self.evals) {
                    evals.calibrate(&command_id, bundle.as_ref(), &suite);
                }
                report
            }
        }
    }
}

/// A controller command as a benchmark job; an immediate report when it cannot be queued.
pub fn command_job(bench: Option<&Jobs>, command: proto::Command) -> Result<(), proto::BenchmarkReport> {
    let refuse = |error: &str| proto::BenchmarkReport {
        command_id: command.id.clone(),
        results: Vec::new(),
        error: error.to_owned(),
    };
    let job = match &command.kind {
        Some(proto::command::Kind::RunBenchmark(r)) => {
            Job::OnDemand { command_id: command.id.clone(), repetitions: r.repetitions }
        }
        Some(proto::command::Kind::Calibrate(c)) => Job::Calibrate {
            command_id: command.id.clone(),
            bundle: c.bundle.clone(),
            repetitions: c.repetitions,
            suite: c.suite.clone(),
        },
        // The session hands Prestage to the staging queue (crate::stage); it is never a benchmark.
        Some(proto::command::Kind::Prestage(_)) => {
            return Err(refuse("a prestage command is not a benchmark; the staging queue runs it"));
        }
        Some(proto::command::Kind::Evaluate(_)) => {
            return Err(refuse("an evaluate command is not a benchmark; the evaluation queue runs it"));
        }
        // Diagnostics and device commands are the session's own (crate::session::Operations).
        Some(
            proto::command::Kind::CollectLogs(_)
            | proto::command::Kind::Cancel(_)
            | proto::command::Kind::SupportBundle(_)
            | proto::command::Kind::RestartRuntime(_)
            | proto::command::Kind::Reverify(_),
        ) => {
            return Err(refuse("a diagnostics or device command is not a benchmark"));
        }
        None => return Err(refuse("this agent does not know the command; upgrade the agent")),
    };
    let Some(bench) = bench else { return Err(refuse("benchmarks are turned off on this device")) };
    if bench.offer(job) {
        Ok(())
    } else {
        Err(refuse("the device is busy with other benchmarks; send the command again later"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_become_jobs_or_refusals() {
        let run = proto::Command {
            id: "c1".into(),
            kind: Some(proto::command::Kind::RunBenchmark(proto::RunBenchmark { repetitions: 2 })),
        };
        let refused = command_job(None, run).expect_err("benchmarks off");
        assert_eq!(refused.command_id, "c1");
        assert!(refused.error.contains("turned off"));
        let unknown = command_job(None, proto::Command { id: "c2".into(), kind: None }).expect_err("unknown");
        assert!(unknown.error.contains("upgrade"));
    }
}
