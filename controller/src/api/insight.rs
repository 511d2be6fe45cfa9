//! `InsightService`: benchmark commands, stored benchmarks, A/B comparisons and recommendations.
//! Thin: authenticates, converts, and calls `insight::queries`.

use alki_shared::proto::{self, insight_service_server::InsightService};
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::insight::queries::{self, QueryError};
use crate::store::BenchmarkFilter;

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
    /// Pins `reference` (a digest or a tag in `repository`) to a bundle in the embedded registry.
    fn pin(&self, repository: &str, reference: &str) -> Result<proto::BundleRef, Status> {
        if repository.is_empty() || reference.is_empty() {
            return Err(Status::invalid_argument("name the bundle's repository and its tag or digest"));
        }
        let sources = &self.app.sources;
        let pinned = crate::bundles::pin_embedded(&sources.registry, &sources.registry_host, repository, reference);
        pinned.map_err(super::internal)?.ok_or_else(|| {
            Status::not_found(format!(
                "bundle {repository}:{reference} is not in the registry; push it with `alkictl bundle push` or check the name"
            ))
        })
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
        let commands = queries::send_commands(&self.app.fleet, &targets, &kind);
        tracing::info!(by = %principal.name, devices = commands.len(), "Benchmark requested.");
        Ok(Response::new(proto::CommandsResponse { commands }))
    }

    async fn calibrate(
        &self,
        request: Request<proto::CalibrateRequest>,
    ) -> Result<Response<proto::CommandsResponse>, Status> {
        let principal = super::principal(&request)?;
        let r = request.into_inner();
        let bundle = self.pin(&r.repository, &r.bundle)?;
        let fleet = self.app.fleet.clone();
        let targets = blocking(move || queries::targets(&fleet, &r.device_ids, &r.selector)).await?;
        let kind = proto::command::Kind::Calibrate(proto::Calibrate {
            bundle: Some(bundle.clone()),
            repetitions: r.repetitions,
            suite: None,
        });
        let commands = queries::send_commands(&self.app.fleet, &targets, &kind);
        tracing::info!(by = %principal.name, bundle = %bundle.digest, devices = commands.len(), "Calibration requested.");
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
        let id = request.into_inner().rollout_id;
        let fleet = self.app.fleet.clone();
        Ok(Response::new(blocking(move || queries::comparison(&fleet, &id)).await?))
    }

    async fn recommend(
        &self,
        request: Request<proto::RecommendRequest>,
    ) -> Result<Response<proto::Recommendation>, Status> {
        super::principal(&request)?;
        let r = request.into_inner();
        let bundle = self.pin(&r.repository, &r.bundle)?;
        let fleet = self.app.fleet.clone();
        let digest = bundle.digest.clone();
        let classes = blocking(move || queries::recommendation(&fleet, &digest, &r.min_quantization, None)).await?;
        Ok(Response::new(proto::Recommendation { bundle: Some(bundle), classes }))
    }

    async fn evaluate(
        &self,
        request: Request<proto::EvaluateRequest>,
    ) -> Result<Response<proto::CommandsResponse>, Status> {
        super::principal(&request)?;
        Err(Status::unimplemented("this controller cannot ask devices for evaluations yet"))
    }

    async fn list_evaluations(
        &self,
        request: Request<proto::ListEvaluationsRequest>,
    ) -> Result<Response<proto::ListEvaluationsResponse>, Status> {
        super::principal(&request)?;
        Err(Status::unimplemented("this controller does not record evaluations yet"))
    }
}
