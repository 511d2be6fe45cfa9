//! `InsightService`: benchmark, calibration and evaluation commands, stored benchmarks and evaluations,
//! A/B comparisons and recommendations. Thin: authenticates, pins what the request names (`bundles`,
//! `suites`), converts, and calls `insight::queries`.

use alki_shared::ids::{DeviceId, RolloutId};
use alki_shared::proto::{self, insight_service_server::InsightService};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::insight::quality;
use crate::insight::queries::{self, QueryError};
use crate::rollout::external::{self, ExternalError};
use crate::store::{BenchmarkFilter, EvaluationFilter};
use crate::suites::{self, SuiteSources};

pub struct InsightApi {
    pub app: App,
}

pub fn query_status(error: QueryError) -> Status {
    match error {
        e @ (QueryError::RolloutNotFound(_) | QueryError::DeviceNotFound(_)) => Status::not_found(e.to_string()),
        e @ (QueryError::NoTargets | QueryError::Recommend(_)) => Status::invalid_argument(e.to_string()),
        QueryError::Store(e) => super::internal(e),
    }
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, QueryError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(super::internal)?.map_err(query_status)
}

impl InsightApi {
    /// The devices a command targets, each with the bundles `kind` names recorded so it may fetch them.
    async fn targets_granted(
        &self,
        device_ids: Vec<String>,
        selector: std::collections::HashMap<String, String>,
        kind: &proto::command::Kind,
    ) -> Result<Vec<DeviceId>, Status> {
        let (fleet, kind) = (self.app.fleet.clone(), kind.clone());
        blocking(move || {
            let targets = queries::targets(&fleet, &device_ids, &selector)?;
            queries::grant_command_bundles(&fleet, &targets, &kind)?;
            Ok(targets)
        })
        .await
    }
    /// Pins `reference` (a digest or a tag in `repository`) to a bundle in the embedded registry, or in the
    /// configured external registry whose host starts `repository`.
    async fn pin(&self, repository: &str, reference: &str) -> Result<proto::BundleRef, Status> {
        if repository.is_empty() || reference.is_empty() {
            return Err(Status::invalid_argument("name the bundle's repository and its tag or digest"));
        }
        let sources = &self.app.sources;
        if let Some((registry, inner)) = external::split(&sources.externals, repository) {
            return external::pin(registry, inner, reference).await.map(|p| p.bundle).map_err(|e| match e {
                e @ ExternalError::NotFound { .. } => Status::not_found(e.to_string()),
                e @ ExternalError::Invalid(_) => Status::invalid_argument(e.to_string()),
                e @ ExternalError::Unreachable(_) => Status::unavailable(e.to_string()),
            });
        }
        let (registry, host) = (sources.registry.clone(), sources.registry_host.clone());
        let (repository, reference) = (repository.to_owned(), reference.to_owned());
        let pinned = super::blocking(move || {
            let pinned = crate::bundles::pin_embedded(&registry, &host, &repository, &reference);
            pinned.map(|p| p.ok_or((repository, reference)))
        })
        .await?;
        pinned.map_err(super::internal)?.map_err(|(repository, reference)| {
            Status::not_found(format!(
                "bundle {repository}:{reference} is not in the registry; push it with `alkictl bundle push` or check the name"
            ))
        })
    }

    /// Pins an eval suite reference (`repo:tag` / `repo@sha256:...`), checked to be a suite.
    async fn pin_suite(&self, reference: &str) -> Result<proto::BundleRef, Status> {
        let sources = &self.app.sources;
        let from = SuiteSources {
            registry: &sources.registry,
            registry_host: &sources.registry_host,
            externals: &sources.externals,
        };
        suites::pin(&from, reference).await.map_err(super::suite_status)
    }
}

impl InsightApi {
    /// Sends (or, for offline devices, queues) `kind` to each target, off the async workers.
    async fn send(
        &self,
        targets: Vec<alki_shared::ids::DeviceId>,
        kind: proto::command::Kind,
    ) -> Result<Vec<proto::SentCommand>, Status> {
        let (fleet, now) = (self.app.fleet.clone(), self.app.clock.now());
        super::blocking(move || queries::send_commands(&fleet, &targets, &kind, now)).await
    }
}

#[tonic::async_trait]
impl InsightService for InsightApi {
    async fn run_benchmark(
        &self,
        request: Request<proto::RunBenchmarkRequest>,
    ) -> Result<Response<proto::CommandsResponse>, Status> {
        let principal = super::principal(&request)?;
        let r = request.into_inner();
        let fleet = self.app.fleet.clone();
        let targets = blocking(move || queries::targets(&fleet, &r.device_ids, &r.selector)).await?;
        let kind = proto::command::Kind::RunBenchmark(proto::RunBenchmark { repetitions: r.repetitions });
        let commands = self.send(targets, kind.clone()).await?;
        tracing::info!(by = %principal.name, devices = commands.len(), "Benchmark requested.");
        Ok(Response::new(proto::CommandsResponse { commands }))
    }

    async fn calibrate(
        &self,
        request: Request<proto::CalibrateRequest>,
    ) -> Result<Response<proto::CommandsResponse>, Status> {
        let principal = super::principal(&request)?;
        let r = request.into_inner();
        let bundle = self.pin(&r.repository, &r.bundle).await?;
        let suite = match r.suite.trim() {
            "" => None,
            reference => Some(self.pin_suite(reference).await?),
        };
        let kind = proto::command::Kind::Calibrate(proto::Calibrate {
            bundle: Some(bundle.clone()),
            repetitions: r.repetitions,
            suite: suite.clone(),
        });
        let targets = self.targets_granted(r.device_ids, r.selector, &kind).await?;
        let commands = self.send(targets, kind.clone()).await?;
        let suite = suite.map(|s| s.digest).unwrap_or_default();
        tracing::info!(by = %principal.name, bundle = %bundle.digest, %suite, devices = commands.len(), "Calibration requested.");
        Ok(Response::new(proto::CommandsResponse { commands }))
    }

    async fn list_benchmarks(
        &self,
        request: Request<proto::ListBenchmarksRequest>,
    ) -> Result<Response<proto::ListBenchmarksResponse>, Status> {
        super::principal(&request)?;
        let r = request.into_inner();
        let filter =
            BenchmarkFilter { device_id: r.device_id, bundle_digest: r.bundle_digest, class: r.hardware_class };
        let fleet = self.app.fleet.clone();
        let results = blocking(move || queries::benchmarks(&fleet, &filter, r.limit)).await?;
        Ok(Response::new(proto::ListBenchmarksResponse { results }))
    }

    async fn compare(&self, request: Request<proto::CompareRequest>) -> Result<Response<proto::Comparison>, Status> {
        super::principal(&request)?;
        let requested = request.into_inner().rollout_id;
        // An id that does not parse names no rollout.
        let id = RolloutId::new(requested.clone())
            .map_err(|_| query_status(QueryError::RolloutNotFound(requested.clone())))?;
        let fleet = self.app.fleet.clone();
        Ok(Response::new(blocking(move || queries::comparison(&fleet, &id)).await?))
    }

    async fn recommend(
        &self,
        request: Request<proto::RecommendRequest>,
    ) -> Result<Response<proto::Recommendation>, Status> {
        super::principal(&request)?;
        let r = request.into_inner();
        let bundle = self.pin(&r.repository, &r.bundle).await?;
        let gates = r.quality_floor.as_ref().map(quality::floor_gates).filter(|g| !g.is_empty());
        let suite = match (&gates, r.suite.trim()) {
            (None, _) => None,
            (Some(_), "") => {
                return Err(Status::invalid_argument(
                    "a quality floor is measured with an eval suite: name it (--suite REPO:TAG), the one the \
                     bundle was calibrated with",
                ));
            }
            (Some(_), reference) => Some(self.pin_suite(reference).await?),
        };
        let fleet = self.app.fleet.clone();
        let digest = bundle.digest.clone();
        let classes = blocking(move || {
            let floor = gates.zip(suite.as_ref().map(|s| s.digest.as_str()));
            queries::recommendation(&fleet, &digest, &r.min_quantization, floor)
        })
        .await?;
        Ok(Response::new(proto::Recommendation { bundle: Some(bundle), classes }))
    }

    async fn evaluate(
        &self,
        request: Request<proto::EvaluateRequest>,
    ) -> Result<Response<proto::CommandsResponse>, Status> {
        let principal = super::principal(&request)?;
        let r = request.into_inner();
        let bundle = self.pin(&r.repository, &r.bundle).await?;
        if r.suite.trim().is_empty() {
            return Err(Status::invalid_argument("name the eval suite to evaluate with (--suite REPO:TAG)"));
        }
        let suite = self.pin_suite(&r.suite).await?;
        let baseline = match r.baseline.trim() {
            "" => None,
            reference => {
                let (repository, tag_or_digest) = suites::parse_reference(reference).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "baseline {reference:?}: name it as repository:tag or repository@sha256:<digest>"
                    ))
                })?;
                Some(self.pin(repository, tag_or_digest).await?)
            }
        };
        let kind = proto::command::Kind::Evaluate(proto::Evaluate {
            bundle: Some(bundle.clone()),
            variant_digest: String::new(),
            suite: Some(suite.clone()),
            baseline: baseline.clone(),
            baseline_variant_digest: String::new(),
        });
        let targets = self.targets_granted(r.device_ids, r.selector, &kind).await?;
        let commands = self.send(targets, kind.clone()).await?;
        tracing::info!(
            by = %principal.name,
            bundle = %bundle.digest,
            suite = %suite.digest,
            baseline = %baseline.map(|b| b.digest).unwrap_or_default(),
            devices = commands.len(),
            "Evaluation requested."
        );
        Ok(Response::new(proto::CommandsResponse { commands }))
    }

    async fn list_evaluations(
        &self,
        request: Request<proto::ListEvaluationsRequest>,
    ) -> Result<Response<proto::ListEvaluationsResponse>, Status> {
        super::principal(&request)?;
        let r = request.into_inner();
        let filter = EvaluationFilter {
            device_id: r.device_id,
            bundle_digest: r.bundle_digest,
            suite_digest: r.suite_digest,
            class: r.hardware_class,
            rollout_id: r.rollout_id,
        };
        let fleet = self.app.fleet.clone();
        let evaluations = blocking(move || queries::evaluations(&fleet, &filter, r.limit)).await?;
        Ok(Response::new(proto::ListEvaluationsResponse { evaluations }))
    }
}
