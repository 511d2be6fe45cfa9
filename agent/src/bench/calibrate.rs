//! Calibration: every variant of a bundle that fits beside what is served is acquired (as for an activation:
//! the index's signature checked, the runtime build it names verified and extracted), started as its own
//! llama-server on a free loopback port (never behind the front proxy), benchmarked with the fixed prompt
//! set, and stopped; one result per variant, with trigger CALIBRATION.

use std::path::PathBuf;

use alki_shared::bundle::{VariantInfo, variants};
use alki_shared::oci::Manifest;
use alki_shared::proto;

use super::result::{Identity, Subject, Target, benchmark_instance, failed};
use crate::pull::keep::{deployed, kept};
use crate::pull::{Acquirer, PullError, PullOptions, PulledBundle, Want, human_bytes, prune_variant_dirs};
use crate::reference::{BundleLocation, ReferenceError};
use crate::runtime::{HttpClient, Instance, InstanceOptions, StopPolicy};
use crate::settings::RuntimeOverrides;
use crate::trust::RepositoryTrust;

const TRIGGER: proto::BenchmarkTrigger = proto::BenchmarkTrigger::Calibration;

/// Why a calibration could not run at all (a variant that fails is a result with an error instead).
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("the calibrate command names no usable bundle: {0}")]
    Reference(#[from] ReferenceError),
    #[error("{0}")]
    Pull(#[from] PullError),
    #[error("bundle {bundle}: its index in the content store cannot be read ({reason}); calibrate again")]
    Index { bundle: String, reason: String },
}

/// What calibration needs from the agent: the acquire path, and how to run llama-server.
#[derive(Clone)]
pub struct Calibration {
    pub acquirer: Acquirer,
    pub data_dir: PathBuf,
    /// Options for the calibration instances (their own log directory).
    pub instance: InstanceOptions,
    /// Memory kept free beside the serving model and the calibration instance.
    pub memory_reserve: u64,
    pub http: HttpClient,
}

/// One calibration run: the bundle, the memory it may use and what every variant's result carries.
struct Run<'a> {
    calibration: &'a Calibration,
    identity: &'a Identity,
    location: BundleLocation,
    /// Memory available now, less the reserve.
    budget: u64,
    /// Blobs of the active and previous deployments, which a pull must not evict to make room.
    options: PullOptions,
    repetitions: u32,
}

impl Calibration {
    /// Where calibration variants are materialised (apart from `bundles/`, so the device loop's pruning and
    /// calibration never remove each other's directories).
    fn work_dir(&self) -> PathBuf {
        self.data_dir.join("calibration")
    }

    /// Benchmarks every variant of `bundle` that fits the memory available now (less the reserve); variants
    /// that do not fit, or fail to start, give a result with `error` set.
    pub async fn run(
        &self,
        identity: &Identity,
        bundle: Option<&proto::BundleRef>,
        repetitions: u32,
    ) -> Result<Vec<proto::BenchmarkResult>, CalibrateError> {
        let location = BundleLocation::from_proto(bundle)?;
        let available = tokio::task::spawn_blocking(crate::inventory::memory_available).await.unwrap_or_default();
        let keep = kept(&self.acquirer.store, deployed(&self.data_dir).await).await.blobs;
        let run = Run {
            calibration: self,
            identity,
            location,
            budget: available.saturating_sub(self.memory_reserve),
            options: PullOptions { keep, ..Default::default() },
            repetitions,
        };
        let results = run.all_variants().await;
        prune_variant_dirs(&self.work_dir(), &[]).await;
        results
    }
}

impl Run<'_> {
    async fn all_variants(&self) -> Result<Vec<proto::BenchmarkResult>, CalibrateError> {
        let work_dir = self.calibration.work_dir();
        tracing::info!(bundle = %self.location, budget = self.budget, "Calibrating: pulling the bundle.");
        // The bundle itself first: its signature is checked against the trust policy, as for an activation;
        // it fetches the largest variant that fits, and leaves the index in the content store.
        let want = Want {
            bundle: &self.location,
            into: &work_dir,
            memory: Some(self.budget),
            trust: None,
            options: self.options.clone(),
        };
        let first = self.calibration.acquirer.pull(want, &mut |_| {}).await?;
        if first.variant.is_none() {
            return Ok(vec![self.single_manifest(first).await]);
        }
        let mut results = Vec::new();
        for variant in self.index_variants().await? {
            results.push(self.variant(&variant).await);
        }
        Ok(results)
    }

    async fn index_variants(&self) -> Result<Vec<VariantInfo>, CalibrateError> {
        let error = |reason: String| CalibrateError::Index { bundle: self.location.to_string(), reason };
        let path = self.calibration.acquirer.store.path(&self.location.digest);
        let bytes = tokio::fs::read(path).await.map_err(|e| error(e.to_string()))?;
        match Manifest::parse(&bytes, None) {
            Ok(Manifest::Index(index)) => Ok(variants(&index)),
            Ok(Manifest::Image(_)) => Err(error("it is a single manifest, not an index".to_owned())),
            Err(e) => Err(error(e.to_string())),
        }
    }

    /// A bundle that is a single manifest: the one variant, on the runtime build it names.
    async fn single_manifest(&self, mut pulled: PulledBundle) -> proto::BenchmarkResult {
        let variant_digest = pulled.variant_digest.to_string();
        match self.calibration.acquirer.attach_build(&mut pulled, &self.options).await {
            Ok(()) => self.benchmark(pulled, String::new()).await,
            Err(e) => self.failed(&variant_digest, "", format!("the variant's runtime build could not be used: {e}")),
        }
    }

    /// One variant of the index: acquired when it fits, then benchmarked.
    async fn variant(&self, variant: &VariantInfo) -> proto::BenchmarkResult {
        let (digest, name) = (variant.descriptor.digest.to_string(), variant.quantization.as_str());
        let needs = variant.memory_bytes.max(variant.weights_bytes);
        if needs > self.budget {
            return self.failed(&digest, name, format!(
                "variant {name} needs {} of memory and {} is available beside the serving model; it was not benchmarked",
                human_bytes(needs),
                human_bytes(self.budget)
            ));
        }
        // The variant manifest, acquired as a bundle of its own: the index (whose signature the first pull
        // checked) pins its digest, so it needs no signature of its own.
        let as_bundle = BundleLocation { digest: variant.descriptor.digest.clone(), ..self.location.clone() };
        let work_dir = self.calibration.work_dir();
        let want = Want {
            bundle: &as_bundle,
            into: &work_dir,
            memory: Some(self.budget),
            trust: Some(RepositoryTrust::allow_unsigned("the bundle's index, verified when the calibration began")),
            options: self.options.clone(),
        };
        match self.calibration.acquirer.acquire(want, &mut |_| {}).await {
            Ok(pulled) => self.benchmark(pulled, name.to_owned()).await,
            Err(e) => self.failed(&digest, name, format!("pulling the variant failed: {e}")),
        }
    }

    /// Starts an acquired variant on its own loopback port (on its runtime build when it names one),
    /// benchmarks it and stops it.
    async fn benchmark(&self, pulled: PulledBundle, variant_name: String) -> proto::BenchmarkResult {
        let Calibration { instance: opts, http, .. } = self.calibration;
        let subject = Subject {
            bundle: Some(self.location.to_proto()),
            variant_digest: pulled.variant_digest.to_string(),
            variant_name,
            model_path: pulled.model_files.first().cloned(),
        };
        let failed = |error: String| self.failed(&subject.variant_digest, &subject.variant_name, error);
        let Some(spec) = pulled.launch_spec(&self.location.digest, &RuntimeOverrides::default()) else {
            return failed("the variant has no GGUF file".to_owned());
        };
        let instance = match Instance::start(opts, spec, http).await {
            Ok(i) => i,
            Err(e) => return failed(format!("the variant did not start: {e}")),
        };
        let target = Target::instance(&instance);
        let result = benchmark_instance(http, self.identity, &subject, target, TRIGGER, self.repetitions).await;
        // Nothing else uses this instance and the benchmark's requests have finished: stop it at once.
        instance.stop(&StopPolicy::default()).await;
        result
    }

    /// A result for a variant that could not be benchmarked, saying why.
    fn failed(&self, variant_digest: &str, variant_name: &str, error: String) -> proto::BenchmarkResult {
        let mut r = failed(self.identity, TRIGGER, error);
        r.bundle = Some(self.location.to_proto());
        r.variant_digest = variant_digest.to_owned();
        r.variant_name = variant_name.to_owned();
        r
    }
}
