//! Calibration: every variant of a bundle that fits beside what is served is pulled into the content store,
//! started as its own llama-server on a free loopback port (never behind the front proxy), benchmarked with
//! the fixed prompt set, and stopped; one result per variant, with trigger CALIBRATION. A variant whose runtime
//! layer names a llama.cpp build runs on that build, as an activation of it would.

use std::collections::HashSet;
use std::path::PathBuf;

use alki_shared::bundle::{VariantInfo, variants};
use alki_shared::digest::Digest;
use alki_shared::oci::Manifest;
use alki_shared::proto;

use crate::bench::{self, Identity, Subject};
use crate::pull::{
    PullError, PullOptions, PullProgress, deployment_blobs, human_bytes, prune_variant_dirs, pull_bundle_with,
};
use crate::reference::{BundleLocation, ReferenceError};
use crate::runtime::{HttpClient, Instance, InstanceOptions, LaunchSpec, StopPolicy};
use crate::settings::{LaunchSettings, RuntimeOverrides};
use crate::state::StateFile;
use crate::store::ContentStore;
use crate::trust::RepositoryTrust;

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

/// What calibration needs from the agent: registry access, the content store, and how to run llama-server.
#[derive(Clone)]
pub struct Calibration {
    pub registry: crate::device::RegistrySettings,
    pub store: ContentStore,
    pub data_dir: PathBuf,
    /// Options for the calibration instances (their own log directory).
    pub instance: InstanceOptions,
    /// Memory kept free beside the serving model and the calibration instance.
    pub memory_reserve: u64,
    pub http: HttpClient,
}

impl Calibration {
    /// Where calibration variants are materialised (apart from `bundles/`, so the device loop's pruning and
    /// calibration never remove each other's directories).
    fn work_dir(&self) -> PathBuf {
        self.data_dir.join("calibration")
    }

    /// Blobs of the active and previous deployments, which a pull must not evict to make room.
    async fn kept(&self) -> HashSet<Digest> {
        let state_file = StateFile::new(&self.data_dir);
        let state = tokio::task::spawn_blocking(move || state_file.load()).await.ok().and_then(Result::ok).flatten();
        let mut deployments: Vec<(Digest, Digest)> = Vec::new();
        if let Some(state) = state {
            for d in [state.active, state.previous].into_iter().flatten() {
                deployments.push((d.bundle.digest, d.variant_digest));
            }
        }
        let mut keep = HashSet::new();
        for (bundle, variant) in &deployments {
            keep.extend(deployment_blobs(&self.store, bundle, variant).await);
        }
        keep
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
        let access = self.registry.access().await;
        let available = tokio::task::spawn_blocking(crate::inventory::memory_available).await.unwrap_or_default();
        let budget = available.saturating_sub(self.memory_reserve);
        // The bundle's signature is checked against the trust policy, as for an activation.
        let (trust_store, repository) = (self.registry.trust.clone(), location.repository.clone());
        let trust =
            tokio::task::spawn_blocking(move || trust_store.for_repository(&repository)).await.unwrap_or_default();
        let options = PullOptions { keep: self.kept().await, trust, ..Default::default() };
        let work_dir = self.work_dir();
        tracing::info!(bundle = %location, budget, "Calibrating: pulling the bundle.");
        // The bundle itself first: it checks the index (or single manifest) and fetches the largest variant
        // that fits, and leaves the index in the content store.
        let mut quiet = |_: PullProgress| {};
        let mut first =
            pull_bundle_with(&access, &self.store, &work_dir, &location, budget, &options, &mut quiet).await?;
        let offered = match first.variant {
            None => vec![None],
            Some(_) => self.index_variants(&location).await?.into_iter().map(Some).collect(),
        };
        let mut results = Vec::with_capacity(offered.len());
        for variant in offered {
            let result = match &variant {
                None => match self.attach_build(&access, &location, &mut first, &options).await {
                    Ok(()) => {
                        self.benchmark_pulled(identity, &location, first.clone(), String::new(), repetitions).await
                    }
                    Err(e) => failed_result(identity, &location, &first.variant_digest.to_string(), "", e),
                },
                Some(v) => self.benchmark_variant(identity, &access, &location, v, budget, &options, repetitions).await,
            };
            results.push(result);
        }
        prune_variant_dirs(&work_dir, &[]).await;
        Ok(results)
    }

    async fn index_variants(&self, location: &BundleLocation) -> Result<Vec<VariantInfo>, CalibrateError> {
        let error = |reason: String| CalibrateError::Index { bundle: location.to_string(), reason };
        let bytes = tokio::fs::read(self.store.path(&location.digest)).await.map_err(|e| error(e.to_string()))?;
        match Manifest::parse(&bytes, None) {
            Ok(Manifest::Index(index)) => Ok(variants(&index)),
            Ok(Manifest::Image(_)) => Err(error("it is a single manifest, not an index".to_owned())),
            Err(e) => Err(error(e.to_string())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn benchmark_variant(
        &self,
        identity: &Identity,
        access: &crate::pull::RegistryAccess,
        location: &BundleLocation,
        variant: &VariantInfo,
        budget: u64,
        options: &PullOptions,
        repetitions: u32,
    ) -> proto::BenchmarkResult {
        let failed = |error: String| {
            failed_result(identity, location, &variant.descriptor.digest.to_string(), &variant.quantization, error)
        };
        let needs = variant.memory_bytes.max(variant.weights_bytes);
        if needs > budget {
            return failed(format!(
                "variant {} needs {} of memory and {} is available beside the serving model; it was not benchmarked",
                variant.quantization,
                human_bytes(needs),
                human_bytes(budget)
            ));
        }
        // The variant manifest, pulled as a bundle of its own: the index (whose signature the first pull
        // checked) pins its digest, so it needs no signature of its own.
        let as_bundle = BundleLocation { digest: variant.descriptor.digest.clone(), ..location.clone() };
        let options = &PullOptions {
            trust: RepositoryTrust::allow_unsigned("the bundle's index, verified when the calibration began"),
            ..options.clone()
        };
        let mut quiet = |_: PullProgress| {};
        let mut pulled = match pull_bundle_with(
            access,
            &self.store,
            &self.work_dir(),
            &as_bundle,
            budget,
            options,
            &mut quiet,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => return failed(format!("pulling the variant failed: {e}")),
        };
        if let Err(e) = self.attach_build(access, location, &mut pulled, options).await {
            return failed(e);
        }
        self.benchmark_pulled(identity, location, pulled, variant.quantization.clone(), repetitions).await
    }

    /// The llama.cpp build the variant's runtime layer names, if any: verified against the trust policy,
    /// pulled and extracted as for an activation (into the same directory, so a later activation finds it).
    async fn attach_build(
        &self,
        access: &crate::pull::RegistryAccess,
        location: &BundleLocation,
        pulled: &mut crate::pull::PulledBundle,
        options: &PullOptions,
    ) -> Result<(), String> {
        let builds_dir = self.data_dir.join(crate::builds::DIR_NAME);
        let fetch = crate::builds::Fetch { registry: access, store: &self.store, builds_dir: &builds_dir };
        crate::builds::attach(pulled, location, &fetch, &self.registry.trust, options, &mut |_| {})
            .await
            .map_err(|e| format!("the variant's runtime build could not be used: {e}"))
    }

    /// Starts a pulled variant on its own loopback port (on its runtime build when it names one),
    /// benchmarks it and stops it.
    async fn benchmark_pulled(
        &self,
        identity: &Identity,
        location: &BundleLocation,
        pulled: crate::pull::PulledBundle,
        variant_name: String,
        repetitions: u32,
    ) -> proto::BenchmarkResult {
        let trigger = proto::BenchmarkTrigger::Calibration;
        let subject = Subject {
            bundle: Some(location.to_proto()),
            variant_digest: pulled.variant_digest.to_string(),
            variant_name,
            model_path: pulled.model_files.first().cloned(),
        };
        let failed =
            |error: String| failed_result(identity, location, &subject.variant_digest, &subject.variant_name, error);
        let Some(model_path) = subject.model_path.clone() else {
            return failed("the variant has no GGUF file".to_owned());
        };
        let defaults = pulled.runtime_defaults.clone().unwrap_or_default();
        let settings = LaunchSettings {
            llama_server: pulled.runtime_server.clone(),
            ..LaunchSettings::resolve(&defaults, &RuntimeOverrides::default())
        };
        let spec = LaunchSpec { model_path, settings, bundle_digest: location.digest.to_string() };
        let instance = match Instance::start(&self.instance, spec, &self.http).await {
            Ok(i) => i,
            Err(e) => return failed(format!("the variant did not start: {e}")),
        };
        let result = bench::benchmark_instance(
            &self.http,
            identity,
            &subject,
            instance.addr(),
            instance.pid(),
            instance.load_time(),
            trigger,
            repetitions,
        )
        .await;
        // Nothing else uses this instance and the benchmark's requests have finished: stop it at once.
        instance.stop(&StopPolicy::default()).await;
        result
    }
}

/// A result for a variant that could not be benchmarked, saying why.
fn failed_result(
    identity: &Identity,
    location: &BundleLocation,
    variant_digest: &str,
    variant_name: &str,
    error: String,
) -> proto::BenchmarkResult {
    let mut r = bench::failed(identity, proto::BenchmarkTrigger::Calibration, error);
    r.bundle = Some(location.to_proto());
    r.variant_digest = variant_digest.to_owned();
    r.variant_name = variant_name.to_owned();
    r
}
