//! Pulling a bundle by digest into the content store: the signature first, then the index (or single
//! manifest), the variant that fits in memory, room made on the disk, the missing blobs fetched, and the
//! variant materialised as a directory of GGUF files for llama-server. The content store is tried first and
//! alone; registries (mirrors, then the origin) only for what it lacks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use alki_shared::bundle::{
    RuntimeDefaults, VariantInfo, choose_preferred_variant, runtime_layer, safe_file_name, variants, weight_layers,
};
use alki_shared::digest::Digest;
use alki_shared::oci::{Descriptor, ImageManifest, Manifest};
use alki_shared::signing::Verified;

use super::blob::{Pace, PullProgress, Reporter, check_disk, fetch_blob};
use super::error::{PullError, human_bytes};
use super::manifest::{manifest_from, read_small};
use super::materialise::{materialise, prune_variant_dirs, record_verification};
use super::registry::{Attempt, RegistryAccess, Source};
use super::signature::check_signature;
use crate::reference::{BundleLocation, short};
use crate::settings::{LaunchSettings, LaunchSpec, RuntimeOverrides};
use crate::store::ContentStore;
use crate::trust::RepositoryTrust;

/// The runtime layer is a small JSON document; anything bigger is not one.
const MAX_RUNTIME_LAYER_BYTES: u64 = 64 << 10;
/// Free space kept on the data disk beyond what a bundle needs, unless configured.
pub const DEFAULT_DISK_RESERVE_BYTES: u64 = 512 << 20;

/// What a pull may do to the disk.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Free space that must remain after the pull.
    pub disk_reserve: u64,
    /// Blobs that must stay (those of the active and previous bundles); others may be evicted to make room.
    pub keep: HashSet<Digest>,
    /// Variant directories under the bundles directory that must stay.
    pub keep_variants: Vec<Digest>,
    /// Download rate limit in bytes per second, so a fleet update does not saturate a site's uplink.
    pub bandwidth: Option<u64>,
    /// What the trust policy says for the bundle's repository; the default trusts nothing.
    pub trust: RepositoryTrust,
    /// The variant the controller prefers; used when the index lists it and it fits in memory.
    pub preferred_variant: Option<Digest>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            disk_reserve: DEFAULT_DISK_RESERVE_BYTES,
            keep: Default::default(),
            keep_variants: Vec::new(),
            bandwidth: None,
            trust: RepositoryTrust::default(),
            preferred_variant: None,
        }
    }
}

/// A bundle variant present in the content store and materialised for llama-server.
#[derive(Clone, Debug)]
pub struct PulledBundle {
    /// Digest of the variant manifest (the bundle's digest when the bundle is a single manifest).
    pub variant_digest: Digest,
    /// The index entry chosen, when the bundle is an index.
    pub variant: Option<VariantInfo>,
    /// `<bundles_dir>/<variant hex>/`.
    pub dir: PathBuf,
    /// The GGUF files inside `dir`, in layer order; llama-server is given the first.
    pub model_files: Vec<PathBuf>,
    /// The runtime layer, when the variant has one.
    pub runtime_defaults: Option<RuntimeDefaults>,
    /// The extracted `llama-server` of the runtime build the runtime layer names (set when the build is
    /// attached, see [`super::Acquirer::acquire`]); None runs the configured one.
    pub runtime_server: Option<PathBuf>,
    /// The build's platform entry that `runtime_server` came from (`linux/arm64+asimddp+asimdhp`).
    pub runtime_platform: Option<String>,
    /// Bytes of every blob of the variant.
    pub bytes_total: u64,
    /// Bytes fetched from the registry by this pull (the rest were already stored).
    pub bytes_fetched: u64,
    /// The signature that was verified before any layer was fetched; None when the trust policy lets
    /// unsigned bundles through and none verified.
    pub verified: Option<Verified>,
}

impl PulledBundle {
    /// How llama-server runs this variant for `bundle`: its first GGUF file, the bundle's runtime defaults
    /// under `overrides`, on its runtime build when it names one. None when the variant has no GGUF file.
    pub fn launch_spec(&self, bundle: &Digest, overrides: &RuntimeOverrides) -> Option<LaunchSpec> {
        let defaults = self.runtime_defaults.clone().unwrap_or_default();
        let settings = LaunchSettings {
            llama_server: self.runtime_server.clone(),
            runtime_platform: self.runtime_platform.clone(),
            ..LaunchSettings::resolve(&defaults, overrides)
        };
        Some(LaunchSpec { model_path: self.model_files.first()?.clone(), settings, bundle_digest: bundle.to_string() })
    }

    /// Memory the variant needs: the index's annotation when there is one, else its GGUF files' size.
    pub async fn memory_needs(&self) -> u64 {
        if let Some(v) = &self.variant {
            let annotated = v.memory_bytes.max(v.weights_bytes);
            if annotated > 0 {
                return annotated;
            }
        }
        let mut total = 0u64;
        for file in &self.model_files {
            total = total.saturating_add(tokio::fs::metadata(file).await.map(|m| m.len()).unwrap_or(0));
        }
        total
    }
}

/// Pulls `bundle` into `store` and materialises the chosen variant under `bundles_dir`.
///
/// The index (or single manifest) and the variant manifest are checked against their digests; every blob
/// not yet in the store is streamed into it (never held in memory) and checked against its descriptor's
/// digest and size. `memory_available` chooses the variant. Before fetching, the free space must hold the
/// missing bytes plus `options.disk_reserve`; if not, blobs and variant directories not kept are evicted
/// first, and the pull is refused with the reason when that is not enough. `progress` is called at most
/// every [`super::PROGRESS_INTERVAL`] while bytes flow, and once at the start and the end.
pub async fn pull_bundle_with(
    registry: &RegistryAccess,
    store: &ContentStore,
    bundles_dir: &Path,
    bundle: &BundleLocation,
    memory_available: u64,
    options: &PullOptions,
    progress: &mut (dyn FnMut(PullProgress) + Send),
) -> Result<PulledBundle, PullError> {
    // Pulls into one store run one at a time (a pre-staging download and an activation may overlap).
    let _slot = store.pull_slot().await;
    let pull = BundlePull { store, bundles_dir, bundle, memory_available, options };
    // First from the content store alone: when every byte is here (pre-staged, or a rollback to an earlier
    // bundle), everything is verified again from the stored bytes, with the same checks as bytes from the
    // network, and no registry is contacted.
    let local_refusal = match pull.from(Source::Store, bundle, progress).await {
        Ok(pulled) => {
            tracing::info!(bundle = %bundle, variant = %pulled.variant_digest, "Verified from the content store; no download needed.");
            return Ok(pulled);
        }
        Err(PullError::NotInStore(what)) => {
            tracing::debug!(bundle = %bundle, %what, "Not complete in the content store; pulling from the registry.");
            None
        }
        // The stored signature does not satisfy the policy now: the registry may hold a newer signature
        // (re-signed with a rotated key). If it cannot be reached, this refusal is the answer.
        Err(error @ PullError::Signature { .. }) => Some(error),
        // Anything else is a property of the bundle's bytes, which no registry changes.
        Err(error) => return Err(error.about_bundle(bundle)),
    };
    let mut attempt = FromRegistry { pull: &pull, registry, progress };
    match (registry.from_each_endpoint(bundle, &mut attempt).await, local_refusal) {
        (Ok(pulled), _) => Ok(pulled),
        (Err(error), Some(refusal)) if error.is_unreachable() => Err(refusal.about_bundle(bundle)),
        (Err(error), _) => Err(error.about_bundle(bundle)),
    }
}

/// [`pull_bundle_with`] from the content store alone: every stored byte the bundle needs (index, variant
/// manifest, layers, the recorded signature) checked again against its digest and the signature against
/// `options.trust` as it is now, then materialised. Never contacts a registry; whatever is missing is a
/// [`PullError::NotInStore`].
pub async fn verify_from_store(
    store: &ContentStore,
    bundles_dir: &Path,
    bundle: &BundleLocation,
    memory_available: u64,
    options: &PullOptions,
) -> Result<PulledBundle, PullError> {
    let _slot = store.pull_slot().await;
    let pull = BundlePull { store, bundles_dir, bundle, memory_available, options };
    pull.from(Source::Store, bundle, &mut |_| {}).await.map_err(|e| e.about_bundle(bundle))
}

/// One bundle pull: where it goes and what it may do. `bundle` is the bundle as asked for (named in
/// records); each attempt reads it from one source.
struct BundlePull<'a> {
    store: &'a ContentStore,
    bundles_dir: &'a Path,
    bundle: &'a BundleLocation,
    memory_available: u64,
    options: &'a PullOptions,
}

/// [`BundlePull::from`] a registry endpoint, for [`RegistryAccess::from_each_endpoint`].
struct FromRegistry<'a, 'p> {
    pull: &'a BundlePull<'a>,
    registry: &'a RegistryAccess,
    progress: &'a mut (dyn FnMut(PullProgress) + Send + 'p),
}

impl Attempt for FromRegistry<'_, '_> {
    type Output = PulledBundle;
    fn attempt<'a>(
        &'a mut self,
        at: &'a BundleLocation,
    ) -> impl Future<Output = Result<PulledBundle, PullError>> + Send + 'a {
        self.pull.from(Source::Registry(self.registry), at, &mut *self.progress)
    }
}

/// The variant a pull chose and its manifest.
struct Chosen {
    /// The index entry, when the bundle is an index.
    info: Option<VariantInfo>,
    digest: Digest,
    manifest: ImageManifest,
}

impl BundlePull<'_> {
    /// One attempt from `from`: the registry at `at` (the bundle with its registry replaced by a mirror or
    /// the origin itself), or the content store alone. Blobs already stored, by any source, are kept.
    async fn from(
        &self,
        from: Source<'_>,
        at: &BundleLocation,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<PulledBundle, PullError> {
        // The signature first: nothing the bundle's manifests say is acted on before it verifies, and no large
        // layer is fetched for a bundle the device will refuse.
        let verified = check_signature(from, self.store, at, &self.options.trust).await?;
        let chosen = self.choose_variant(from, at).await?;
        let quantization = chosen.info.as_ref().map(|v| v.quantization.as_str()).unwrap_or("");
        tracing::info!(variant = %chosen.digest, quantization, "Chose the bundle variant.");
        let named = check_files(&chosen.manifest)?;
        let blobs = blobs_of(&chosen.manifest);
        let bytes_total = blobs.iter().map(|d| d.size).fold(0, u64::saturating_add);
        let (missing, bytes_present) = self.missing(from, &blobs).await?;
        self.make_room(&chosen.digest, &blobs, bytes_total - bytes_present).await?;
        self.touch_present(&chosen.digest, &blobs, &missing).await;
        let mut reporter = Reporter::new(progress, bytes_present, bytes_total);
        reporter.report(0, true);
        let bytes_fetched = match from {
            Source::Registry(registry) => self.fetch(registry, at, &missing, &mut reporter).await?,
            Source::Store => 0,
        };
        reporter.report(bytes_fetched, true);
        let runtime_defaults = match runtime_layer(&chosen.manifest) {
            Some(layer) => Some(read_runtime_layer(self.store, layer).await?),
            None => None,
        };
        let dir = self.bundles_dir.join(chosen.digest.hex());
        let links: Vec<(PathBuf, String)> =
            named.iter().map(|(d, name)| (self.store.path(&d.digest), name.clone())).collect();
        let model_files = materialise(&dir, links).await?;
        record_verification(&dir, self.bundle, verified.as_ref(), &self.options.trust).await;
        Ok(PulledBundle {
            variant_digest: chosen.digest,
            variant: chosen.info,
            dir,
            model_files,
            runtime_defaults,
            runtime_server: None,
            runtime_platform: None,
            bytes_total,
            bytes_fetched,
            verified,
        })
    }

    /// The variant that fits `memory_available` (the preferred one when it does), its manifest checked
    /// against its digest and its claimed size against its layers.
    async fn choose_variant(&self, from: Source<'_>, at: &BundleLocation) -> Result<Chosen, PullError> {
        let memory = self.memory_available;
        let index = match manifest_from(from, self.store, at, &at.digest, "bundle manifest").await? {
            Manifest::Index(index) => index,
            Manifest::Image(manifest) => {
                let weights: u64 = weight_layers(&manifest).iter().map(|l| l.size).fold(0, u64::saturating_add);
                if weights > memory {
                    let needs = format!("the only variant {}", human_bytes(weights));
                    return Err(PullError::NoVariantFits { available: memory, needs });
                }
                return Ok(Chosen { info: None, digest: at.digest.clone(), manifest });
            }
        };
        let offered = variants(&index);
        if offered.is_empty() {
            return Err(PullError::NotABundle("the bundle's index lists no variants".to_owned()));
        }
        let Some(chosen) = choose_preferred_variant(&index, memory, self.options.preferred_variant.as_ref()) else {
            let needs = offered
                .iter()
                .map(|v| format!("{} {}", label_of(v), human_bytes(v.memory_bytes.max(v.weights_bytes))))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(PullError::NoVariantFits { available: memory, needs });
        };
        let digest = chosen.descriptor.digest.clone();
        let manifest = match manifest_from(from, self.store, at, &digest, "variant manifest").await? {
            Manifest::Image(m) => m,
            Manifest::Index(_) => {
                let reason = format!("variant {} is an index, not a model manifest", short(&digest));
                return Err(PullError::NotABundle(reason));
            }
        };
        // The variant was chosen by the size it claims: a claim its layers do not back is refused.
        let actual: u64 = weight_layers(&manifest).iter().map(|l| l.size).fold(0, u64::saturating_add);
        if chosen.weights_bytes != 0 && chosen.weights_bytes != actual {
            return Err(PullError::VariantSize { variant: digest, claimed: chosen.weights_bytes, actual });
        }
        Ok(Chosen { info: Some(chosen), digest, manifest })
    }

    /// The blobs not usable from the store, and the bytes of those that are. Stored blobs are used only while
    /// they are unchanged since verified (or verify again now); any other, damaged on disk or of the wrong
    /// size, is removed and fetched again. From the store alone, a missing blob ends the attempt.
    async fn missing<'d>(
        &self,
        from: Source<'_>,
        blobs: &[&'d Descriptor],
    ) -> Result<(Vec<&'d Descriptor>, u64), PullError> {
        let mut missing = Vec::new();
        let mut bytes_present = 0u64;
        for d in blobs {
            if self.store.verified(&d.digest, d.size).await.map_err(PullError::Store)? {
                bytes_present = bytes_present.saturating_add(d.size);
            } else {
                missing.push(*d);
            }
        }
        if let (Source::Store, Some(d)) = (from, missing.first()) {
            return Err(PullError::NotInStore(format!("layer {}", short(&d.digest))));
        }
        Ok((missing, bytes_present))
    }

    /// Makes sure `needed` more bytes fit beside the disk reserve, evicting variant directories and blobs
    /// that are not kept (nor this variant's) when they do not.
    async fn make_room(&self, variant: &Digest, blobs: &[&Descriptor], needed: u64) -> Result<(), PullError> {
        let options = self.options;
        if check_disk(self.bundles_dir, needed, options.disk_reserve).await.is_ok() {
            return Ok(());
        }
        let mut keep = options.keep.clone();
        keep.extend([self.bundle.digest.clone(), variant.clone()]);
        keep.extend(blobs.iter().map(|d| d.digest.clone()));
        let mut keep_variants = options.keep_variants.clone();
        keep_variants.push(variant.clone());
        prune_variant_dirs(self.bundles_dir, &keep_variants).await;
        match self.store.evict(&keep, 0).await {
            Ok((removed, freed)) => {
                tracing::warn!(blobs = removed.len(), freed, "Evicted unused blobs to make room for the pull.")
            }
            Err(e) => tracing::warn!(error = %e, "Evicting unused blobs failed."),
        }
        check_disk(self.bundles_dir, needed, options.disk_reserve).await
    }

    /// Marks the bundle's stored blobs as used now, for the least-recently-used eviction.
    async fn touch_present(&self, variant: &Digest, blobs: &[&Descriptor], missing: &[&Descriptor]) {
        for d in blobs {
            if !missing.iter().any(|m| m.digest == d.digest) {
                self.store.touch(&d.digest).await;
            }
        }
        self.store.touch(&self.bundle.digest).await;
        self.store.touch(variant).await;
    }

    /// Fetches `missing` from the registry at `at`, paced; the bytes fetched.
    async fn fetch(
        &self,
        registry: &RegistryAccess,
        at: &BundleLocation,
        missing: &[&Descriptor],
        reporter: &mut Reporter<'_>,
    ) -> Result<u64, PullError> {
        let mut fetched = 0u64;
        let mut pace = self.options.bandwidth.map(Pace::new);
        for d in missing {
            fetch_blob(registry, self.store, at, d, &mut pace, &mut |n| reporter.report(fetched + n, false)).await?;
            fetched += d.size;
        }
        Ok(fetched)
    }
}

/// Every blob of a variant: config and layers, each once.
fn blobs_of(manifest: &ImageManifest) -> Vec<&Descriptor> {
    let mut blobs: Vec<&Descriptor> = Vec::new();
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if !blobs.iter().any(|b| b.digest == d.digest) {
            blobs.push(d);
        }
    }
    blobs
}

fn label_of(v: &VariantInfo) -> &str {
    if v.quantization.is_empty() { "(unnamed)" } else { &v.quantization }
}

/// The weight layers with their file names; refuses a variant without GGUF or with unsafe or repeated names.
fn check_files(manifest: &ImageManifest) -> Result<Vec<(Descriptor, String)>, PullError> {
    let weights = weight_layers(manifest);
    if weights.is_empty() {
        return Err(PullError::NotABundle("the variant has no GGUF weight layer".to_owned()));
    }
    let mut named: Vec<(Descriptor, String)> = Vec::new();
    for layer in weights {
        let Some(name) = safe_file_name(layer) else {
            let shown = layer
                .annotation(alki_shared::oci::ANNOTATION_TITLE)
                .or(layer.annotation(alki_shared::bundle::ANNOTATION_FILEPATH))
                .unwrap_or("no title annotation");
            return Err(PullError::BadFileName { layer: layer.digest.clone(), name: shown.to_owned() });
        };
        if named.iter().any(|(_, n)| n == name) {
            return Err(PullError::BadFileName {
                layer: layer.digest.clone(),
                name: format!("{name}, used by two layers"),
            });
        }
        named.push((layer.clone(), name.to_owned()));
    }
    Ok(named)
}

async fn read_runtime_layer(store: &ContentStore, layer: &Descriptor) -> Result<RuntimeDefaults, PullError> {
    let invalid = |reason: String| PullError::RuntimeLayer { layer: layer.digest.clone(), reason };
    if layer.size > MAX_RUNTIME_LAYER_BYTES {
        return Err(invalid(format!("it is {} bytes, over the limit of {MAX_RUNTIME_LAYER_BYTES}", layer.size)));
    }
    let bytes = read_small(store, &layer.digest, MAX_RUNTIME_LAYER_BYTES)
        .await
        .ok_or_else(|| invalid("it is missing from the content store".to_owned()))?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))
}

/// The runtime defaults a variant manifest's runtime layer holds, as far as it is stored and valid (for
/// bookkeeping: what an activation uses is read with the checks of a pull).
pub async fn stored_runtime_defaults(store: &ContentStore, variant: &ImageManifest) -> Option<RuntimeDefaults> {
    let layer = runtime_layer(variant)?;
    let bytes = read_small(store, &layer.digest, MAX_RUNTIME_LAYER_BYTES).await?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::bundle::MEDIA_TYPE_WEIGHT_RAW;
    use alki_shared::oci::{ANNOTATION_TITLE, MEDIA_TYPE_IMAGE_MANIFEST};

    fn weight(name: &str, content: &[u8]) -> Descriptor {
        let mut d = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, Digest::of(content), content.len() as u64);
        d.annotations.insert(ANNOTATION_TITLE.to_owned(), name.to_owned());
        d
    }

    fn manifest(layers: Vec<Descriptor>) -> ImageManifest {
        ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
            artifact_type: None,
            config: Descriptor::new(alki_shared::oci::MEDIA_TYPE_EMPTY, Digest::of(b"{}"), 2),
            layers,
            subject: None,
            annotations: Default::default(),
        }
    }

    #[test]
    fn unsafe_or_repeated_file_names_are_refused() {
        let ok = check_files(&manifest(vec![weight("a-00001.gguf", b"1"), weight("a-00002.gguf", b"2")]))
            .expect("plain names");
        assert_eq!(ok.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(), ["a-00001.gguf", "a-00002.gguf"]);
        let err = check_files(&manifest(vec![weight("../x.gguf", b"1")])).expect_err("traversal");
        assert!(matches!(err, PullError::BadFileName { .. }), "{err}");
        let err = check_files(&manifest(vec![weight("a.gguf", b"1"), weight("a.gguf", b"2")])).expect_err("dup");
        assert!(matches!(err, PullError::BadFileName { .. }), "{err}");
        let err = check_files(&manifest(vec![])).expect_err("no weights");
        assert!(matches!(err, PullError::NotABundle(_)), "{err}");
    }

    #[test]
    fn a_pulled_variant_launches_its_first_file_on_its_build_with_the_overrides() {
        let pulled = PulledBundle {
            variant_digest: Digest::of(b"variant"),
            variant: None,
            dir: PathBuf::from("/data/bundles/v"),
            model_files: vec![PathBuf::from("/data/bundles/v/a-00001.gguf"), PathBuf::from("/data/bundles/v/b")],
            runtime_defaults: Some(RuntimeDefaults { context_size: 4096, threads: 4, ..Default::default() }),
            runtime_server: Some(PathBuf::from("/data/runtime-builds/x/llama-server")),
            runtime_platform: Some("linux/amd64".into()),
            bytes_total: 0,
            bytes_fetched: 0,
            verified: None,
        };
        let bundle = Digest::of(b"bundle");
        let spec = pulled.launch_spec(&bundle, &RuntimeOverrides { context_size: 1024, ..Default::default() });
        let spec = spec.expect("a GGUF file");
        assert_eq!(spec.model_path, PathBuf::from("/data/bundles/v/a-00001.gguf"));
        assert_eq!((spec.settings.context_size, spec.settings.threads), (1024, 4));
        assert_eq!(spec.settings.llama_server, pulled.runtime_server);
        assert_eq!(spec.bundle_digest, bundle.to_string());
        let empty = PulledBundle { model_files: Vec::new(), ..pulled };
        assert!(empty.launch_spec(&bundle, &RuntimeOverrides::default()).is_none());
    }
}
