//! Pulling a bundle by digest from an OCI registry into the content store, choosing the variant that fits,
//! and materialising it as a directory of GGUF files for llama-server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_shared::bundle::{
    RuntimeDefaults, VariantInfo, choose_preferred_variant, runtime_layer, safe_file_name, variants, weight_layers,
};
use alki_shared::digest::Digest;
use alki_shared::oci::{
    Descriptor, ImageManifest, MAX_MANIFEST_BYTES, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, Manifest, ManifestError,
};
use alki_shared::proto::ErrorCode;
use alki_shared::signing::{self, SignatureLayer, SignatureProblem, Verified};
use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::time::Instant;

use crate::reference::{BundleLocation, short};
use crate::store::{ContentStore, StoreError};
use crate::trust::RepositoryTrust;

/// How often progress is reported at most while bytes flow.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts per blob when the connection fails (not when content is wrong).
const BLOB_ATTEMPTS: u32 = 3;
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
    pub keep: std::collections::HashSet<Digest>,
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
/// The username sent with the token in Basic authentication.
const BASIC_USER: &str = "alki-agent";
const ACCEPTED_MANIFESTS: [&str; 4] =
    [MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST];

/// Bytes of a pull done so far out of the bytes the chosen variant needs (already stored bytes count as done).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PullProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
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
    /// The extracted `llama-server` of the runtime build the runtime layer names (set by
    /// [`crate::builds::attach`]); None runs the configured one.
    pub runtime_server: Option<PathBuf>,
    /// Bytes of every blob of the variant.
    pub bytes_total: u64,
    /// Bytes fetched from the registry by this pull (the rest were already stored).
    pub bytes_fetched: u64,
    /// The signature that was verified before any layer was fetched; None when the trust policy lets
    /// unsigned bundles through and none verified.
    pub verified: Option<Verified>,
}

/// Written beside the model files: what was verified, so an operator on the device can see why it runs.
pub const VERIFICATION_RECORD: &str = ".alki-verification.json";

/// Registry access for pulls: protocol per registry and the credentials for the embedded registry.
#[derive(Clone)]
pub struct RegistryAccess {
    client: std::sync::Arc<Client>,
    embedded: String,
    token: Option<String>,
    /// Mirrors per registry (`host:port`), tried in order before the registry itself.
    mirrors: std::collections::BTreeMap<String, Vec<String>>,
    /// Basic credentials (username, password) per `host:port`, sent to that exact `host:port` only.
    credentials: std::collections::BTreeMap<String, (String, String)>,
}

impl std::fmt::Debug for RegistryAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAccess").field("embedded", &self.embedded).finish_non_exhaustive()
    }
}

impl RegistryAccess {
    /// `plain_http`: registries (`host:port`) reached over HTTP. `embedded`: the registry used when a bundle
    /// names none. `token`: sent (Basic, user `alki-agent`) only to registries on the embedded registry's host
    /// (any port: the controller serves gRPC and its registry on different ports), never elsewhere.
    pub fn new(plain_http: Vec<String>, embedded: String, token: Option<String>) -> RegistryAccess {
        RegistryAccess::with_roots(plain_http, embedded, token, Vec::new())
    }

    /// [`RegistryAccess::new`], also trusting the PEM CA certificates in `roots` for HTTPS (the controller's CA,
    /// which signs its embedded registry's certificate).
    pub fn with_roots(
        plain_http: Vec<String>,
        embedded: String,
        token: Option<String>,
        roots: Vec<Vec<u8>>,
    ) -> RegistryAccess {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain_http),
            extra_root_certificates: roots
                .into_iter()
                .map(|data| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data,
                })
                .collect(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("alki-agent/", env!("CARGO_PKG_VERSION")),
            platform_resolver: None,
            ..Default::default()
        };
        RegistryAccess {
            client: std::sync::Arc::new(Client::new(config)),
            embedded,
            token,
            mirrors: Default::default(),
            credentials: Default::default(),
        }
    }

    /// Mirrors per registry (`host:port` to an ordered list of `host:port`), like containerd's hosts: pulls
    /// try them in order and fall back to the registry itself.
    pub fn with_mirrors(mut self, mirrors: std::collections::BTreeMap<String, Vec<String>>) -> RegistryAccess {
        self.mirrors = mirrors;
        self
    }

    /// Basic credentials (username, password) per `host:port`; each is sent to that exact `host:port` only.
    /// They take precedence over the agent's token on the embedded registry.
    pub fn with_credentials(
        mut self,
        credentials: std::collections::BTreeMap<String, (String, String)>,
    ) -> RegistryAccess {
        self.credentials = credentials;
        self
    }

    /// Where `bundle` is pulled from, in order: the mirrors configured for its registry, then the registry.
    pub fn endpoints(&self, bundle: &BundleLocation) -> Vec<String> {
        let origin = self.registry_of(bundle);
        let mut out: Vec<String> = Vec::new();
        for mirror in self.mirrors.get(origin).into_iter().flatten() {
            if mirror != origin && !out.contains(mirror) {
                out.push(mirror.clone());
            }
        }
        out.push(origin.to_owned());
        out
    }

    fn registry_of<'a>(&'a self, bundle: &'a BundleLocation) -> &'a str {
        if bundle.registry.is_empty() { &self.embedded } else { &bundle.registry }
    }

    fn reference(&self, bundle: &BundleLocation, digest: &Digest) -> Reference {
        Reference::with_digest(self.registry_of(bundle).to_owned(), bundle.repository.clone(), digest.to_string())
    }

    fn auth(&self, bundle: &BundleLocation) -> RegistryAuth {
        let registry = self.registry_of(bundle);
        if let Some((username, password)) = self.credentials.get(registry) {
            return RegistryAuth::Basic(username.clone(), password.clone());
        }
        match &self.token {
            Some(token) if host_of(self.registry_of(bundle)) == host_of(&self.embedded) => {
                RegistryAuth::Basic(BASIC_USER.to_owned(), token.clone())
            }
            _ => RegistryAuth::Anonymous,
        }
    }
}

/// The host of `host[:port]` (IPv6 in brackets).
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_once(']').map(|(h, _)| &authority[..=h.len()]).unwrap_or(authority);
    }
    authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority)
}

/// A failed pull, for people ([`std::fmt::Display`]) and for the controller ([`PullError::code`]).
#[derive(Debug, thiserror::Error)]
#[error("bundle {bundle}: {kind}")]
pub struct PullError {
    pub bundle: String,
    pub kind: PullErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum PullErrorKind {
    #[error(
        "cannot fetch {what} from registry {registry}: {source}; check that the registry is reachable from this \
         device, that the bundle was pushed there, and the agent's token"
    )]
    Registry { what: String, registry: String, source: Box<OciDistributionError> },
    #[error(
        "{what} {} does not match its digest (got {actual}); the registry copy is corrupt — push the bundle again",
        short(expected)
    )]
    ManifestDigest { what: String, expected: Digest, actual: String },
    #[error(
        "{what} {} is not a valid OCI manifest ({source}); push a bundle made by alkictl bundle pack",
        short(digest)
    )]
    Manifest { what: String, digest: Digest, source: ManifestError },
    #[error("{0}; push a bundle made by alkictl bundle pack")]
    NotABundle(String),
    #[error(
        "no variant fits in the {} of memory available (variants need: {needs}); free memory or add a smaller \
         quantization to the bundle", human_bytes(*available)
    )]
    NoVariantFits { available: u64, needs: String },
    #[error(
        "layer {layer} does not match its digest (got {actual}); the registry copy is corrupt — push the bundle again"
    )]
    LayerDigest { layer: Digest, actual: Digest },
    #[error(
        "layer {} is {actual}{} bytes but its descriptor says {expected}; the registry copy is corrupt — push the \
         bundle again", short(layer), if *more { " or more" } else { "" }
    )]
    LayerSize { layer: Digest, expected: u64, actual: u64, more: bool },
    #[error("layer {} has no safe file name ({name:?}); repack the bundle with plain file names", short(layer))]
    BadFileName { layer: Digest, name: String },
    #[error("runtime layer {} is not valid: {reason}; repack the bundle with alkictl bundle pack", short(layer))]
    RuntimeLayer { layer: Digest, reason: String },
    #[error(
        "needs {} more on the disk of {} plus a reserve of {} but only {} is free after evicting unused \
         bundles; free disk space, lower store.disk_reserve_mib or use a smaller bundle",
        human_bytes(*needed), dir.display(), human_bytes(*reserve), human_bytes(*available)
    )]
    DiskFull { needed: u64, reserve: u64, available: u64, dir: PathBuf },
    #[error(
        "the download of layer {} from registry {registry} broke off with {bytes_on_disk} of {size} bytes on \
         disk ({source}); they are kept and the next attempt resumes from there; check the device's network",
        short(layer)
    )]
    Transfer { layer: Digest, registry: String, bytes_on_disk: u64, size: u64, source: std::io::Error },
    #[error("{problem} ({policy})")]
    Signature { problem: SignatureProblem, policy: String },
    #[error(
        "variant {} claims {claimed} bytes of weights but its GGUF layers hold {actual}; the bundle is not what \
         it says — repack it with alkictl bundle pack",
        short(variant)
    )]
    VariantSize { variant: Digest, claimed: u64, actual: u64 },
    #[error("local content store: {0}; check that the data_dir is writable and has free space")]
    Store(StoreError),
    #[error(
        "disk full: writing layer {} failed after {written} bytes ({error}); the partial download was removed and \
         the model served before keeps serving; free space in the data_dir (or raise store.disk_reserve_mib so \
         such pulls are refused before they start)",
        short(layer)
    )]
    DiskFullWriting { layer: Digest, written: u64, error: StoreError },
    #[error("cannot create the bundle directory {}: {source}; check that the data_dir is writable", dir.display())]
    Materialise { dir: PathBuf, source: std::io::Error },
    /// The llama.cpp build the runtime layer names cannot be used (see [`crate::builds`]).
    #[error("{0}")]
    RuntimeBuild(Box<crate::builds::BuildError>),
    /// The local check found something missing: the pull goes to the registry. Not shown unless the registry
    /// path is unavailable too.
    #[error("{0} is not in the local content store; the device needs the registry to fetch it")]
    NotInStore(String),
}

impl PullError {
    /// The stable code reported to the controller.
    pub fn code(&self) -> ErrorCode {
        match &self.kind {
            PullErrorKind::Registry { source, .. } => match source.as_ref() {
                OciDistributionError::DigestError(_) => ErrorCode::DigestMismatch,
                _ => ErrorCode::PullFailed,
            },
            PullErrorKind::ManifestDigest { .. }
            | PullErrorKind::LayerDigest { .. }
            | PullErrorKind::LayerSize { .. } => ErrorCode::DigestMismatch,
            PullErrorKind::Manifest { .. }
            | PullErrorKind::NotABundle(_)
            | PullErrorKind::BadFileName { .. }
            | PullErrorKind::RuntimeLayer { .. } => ErrorCode::BundleInvalid,
            PullErrorKind::NoVariantFits { .. } => ErrorCode::NoVariantFits,
            PullErrorKind::Signature { problem, .. } => problem.code(),
            PullErrorKind::VariantSize { .. } => ErrorCode::BundleInvalid,
            PullErrorKind::DiskFull { .. } => ErrorCode::DiskFull,
            PullErrorKind::Transfer { .. } | PullErrorKind::NotInStore(_) => ErrorCode::PullFailed,
            PullErrorKind::Store(e) if e.is_disk_full() => ErrorCode::DiskFull,
            PullErrorKind::DiskFullWriting { .. } => ErrorCode::DiskFull,
            PullErrorKind::Store(_) | PullErrorKind::Materialise { .. } => ErrorCode::Io,
            PullErrorKind::RuntimeBuild(e) => e.code(),
        }
    }

    /// True when another source (the next mirror, or the origin) may succeed where this one failed: the
    /// registry did not answer or answered wrongly, or its bytes did not verify. Not for problems of the
    /// bundle itself or of this device, which no other source changes.
    pub fn may_try_another_source(&self) -> bool {
        matches!(
            self.kind,
            PullErrorKind::Registry { .. }
                | PullErrorKind::Transfer { .. }
                | PullErrorKind::ManifestDigest { .. }
                | PullErrorKind::LayerDigest { .. }
                | PullErrorKind::LayerSize { .. }
                // A mirror may lack the signature tag, or serve a stale one: the origin may have it.
                | PullErrorKind::Signature { .. }
        )
    }

    /// The layer (or manifest) concerned, when there is one.
    pub fn layer_digest(&self) -> Option<&Digest> {
        match &self.kind {
            PullErrorKind::ManifestDigest { expected, .. } => Some(expected),
            PullErrorKind::Manifest { digest, .. } => Some(digest),
            PullErrorKind::VariantSize { variant: layer, .. }
            | PullErrorKind::LayerDigest { layer, .. }
            | PullErrorKind::LayerSize { layer, .. }
            | PullErrorKind::BadFileName { layer, .. }
            | PullErrorKind::RuntimeLayer { layer, .. }
            | PullErrorKind::Transfer { layer, .. }
            | PullErrorKind::DiskFullWriting { layer, .. } => Some(layer),
            PullErrorKind::RuntimeBuild(e) => e.layer_digest(),
            _ => None,
        }
    }
}

/// Pulls `bundle` into `store` and materialises the chosen variant under `bundles_dir`.
///
/// The index (or single manifest) and the variant manifest are checked against their digests; every blob
/// not yet in the store is streamed into it (never held in memory) and checked against its descriptor's
/// digest and size. `memory_available` chooses the variant. `progress` is called at most every
/// [`PROGRESS_INTERVAL`] while bytes flow, and once at the start and the end.
pub async fn pull_bundle(
    registry: &RegistryAccess,
    store: &ContentStore,
    bundles_dir: &Path,
    bundle: &BundleLocation,
    memory_available: u64,
    progress: &mut (dyn FnMut(PullProgress) + Send),
) -> Result<PulledBundle, PullError> {
    pull_bundle_with(registry, store, bundles_dir, bundle, memory_available, &PullOptions::default(), progress).await
}

/// [`pull_bundle`] with disk options: before fetching, the free space must hold the missing bytes plus
/// `options.disk_reserve`; if not, blobs and variant directories not kept are evicted first, and the pull is
/// refused with the reason when that is not enough.
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
    // First from the content store alone: when every byte is here (pre-staged, or a rollback to an earlier
    // bundle), everything is verified again from the stored bytes, with the same checks as bytes from the
    // network, and no registry is contacted.
    let local = pull_from(Source::Store, store, bundles_dir, bundle, bundle, memory_available, options, progress);
    let local_refusal = match local.await {
        Ok(pulled) => {
            tracing::info!(bundle = %bundle, variant = %pulled.variant_digest, "Verified from the content store; no download needed.");
            return Ok(pulled);
        }
        Err(PullError { kind: PullErrorKind::NotInStore(what), .. }) => {
            tracing::debug!(bundle = %bundle, %what, "Not complete in the content store; pulling from the registry.");
            None
        }
        // The stored signature does not satisfy the policy now: the registry may hold a newer signature
        // (re-signed with a rotated key). If it cannot be reached, this refusal is the answer.
        Err(error @ PullError { kind: PullErrorKind::Signature { .. }, .. }) => Some(error),
        // Anything else is a property of the bundle's bytes, which no registry changes.
        Err(error) => return Err(error),
    };
    let endpoints = registry.endpoints(bundle);
    let mut last_error = None;
    for (i, endpoint) in endpoints.iter().enumerate() {
        let source = BundleLocation { registry: endpoint.clone(), ..bundle.clone() };
        let from = Source::Registry(registry);
        match pull_from(from, store, bundles_dir, bundle, &source, memory_available, options, progress).await {
            Ok(pulled) => return Ok(pulled),
            Err(error) if i + 1 < endpoints.len() && error.may_try_another_source() => {
                tracing::warn!(%error, source = %endpoint, next = %endpoints[i + 1], "Pull from a mirror failed; trying the next source.");
            }
            Err(error) => {
                last_error = Some(error);
                break;
            }
        }
    }
    let error = last_error.expect("the origin is always tried last and breaks the loop on error");
    match local_refusal {
        Some(refusal) if matches!(error.kind, PullErrorKind::Registry { .. } | PullErrorKind::Transfer { .. }) => {
            Err(refusal)
        }
        _ => Err(error),
    }
}

/// [`pull_bundle_with`] from the content store alone: every stored byte the bundle needs (index, variant
/// manifest, layers, the recorded signature) checked again against its digest and the signature against
/// `options.trust` as it is now, then materialised. Never contacts a registry; whatever is missing is a
/// [`PullErrorKind::NotInStore`].
pub async fn verify_from_store(
    store: &ContentStore,
    bundles_dir: &Path,
    bundle: &BundleLocation,
    memory_available: u64,
    options: &PullOptions,
) -> Result<PulledBundle, PullError> {
    let _slot = store.pull_slot().await;
    pull_from(Source::Store, store, bundles_dir, bundle, bundle, memory_available, options, &mut |_| {}).await
}

/// Where [`pull_from`] reads a bundle: a registry (storing what it fetches), or the content store alone.
#[derive(Clone, Copy)]
enum Source<'a> {
    Registry(&'a RegistryAccess),
    /// Nothing is fetched: whatever is missing is a [`PullErrorKind::NotInStore`]. Every stored byte used is
    /// hashed again, so bytes on disk are never trusted for being there.
    Store,
}

/// One attempt of [`pull_bundle_with`] from `from`: the registry at `bundle` (its registry replaced by a
/// mirror or the origin itself), or the content store alone; errors name `shown`. Blobs already stored, by
/// any source, are kept.
#[allow(clippy::too_many_arguments)]
async fn pull_from(
    from: Source<'_>,
    store: &ContentStore,
    bundles_dir: &Path,
    shown: &BundleLocation,
    bundle: &BundleLocation,
    memory_available: u64,
    options: &PullOptions,
    progress: &mut (dyn FnMut(PullProgress) + Send),
) -> Result<PulledBundle, PullError> {
    let wrap = |kind| PullError { bundle: shown.to_string(), kind };
    // The signature first: nothing the bundle's manifests say is acted on before it verifies, and no large
    // layer is fetched for a bundle the device will refuse.
    let verified = check_signature(from, store, bundle, &options.trust).await.map_err(wrap)?;
    let top = manifest_from(from, store, bundle, &bundle.digest, "bundle manifest").await.map_err(wrap)?;
    let (variant, variant_digest, manifest) = match top {
        Manifest::Index(index) => {
            let offered = variants(&index);
            if offered.is_empty() {
                return Err(wrap(PullErrorKind::NotABundle("the bundle's index lists no variants".to_owned())));
            }
            let Some(chosen) = choose_preferred_variant(&index, memory_available, options.preferred_variant.as_ref())
            else {
                let needs = offered
                    .iter()
                    .map(|v| format!("{} {}", label_of(v), human_bytes(v.memory_bytes.max(v.weights_bytes))))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(wrap(PullErrorKind::NoVariantFits { available: memory_available, needs }));
            };
            let digest = chosen.descriptor.digest.clone();
            let manifest = match manifest_from(from, store, bundle, &digest, "variant manifest").await.map_err(wrap)? {
                Manifest::Image(m) => m,
                Manifest::Index(_) => {
                    return Err(wrap(PullErrorKind::NotABundle(format!(
                        "variant {} is an index, not a model manifest",
                        short(&digest)
                    ))));
                }
            };
            // The variant was chosen by the size it claims: a claim its layers do not back is refused.
            let actual: u64 = weight_layers(&manifest).iter().map(|l| l.size).fold(0, u64::saturating_add);
            if chosen.weights_bytes != 0 && chosen.weights_bytes != actual {
                return Err(wrap(PullErrorKind::VariantSize {
                    variant: digest,
                    claimed: chosen.weights_bytes,
                    actual,
                }));
            }
            (Some(chosen), digest, manifest)
        }
        Manifest::Image(manifest) => {
            let weights: u64 = weight_layers(&manifest).iter().map(|l| l.size).fold(0, u64::saturating_add);
            if weights > memory_available {
                return Err(wrap(PullErrorKind::NoVariantFits {
                    available: memory_available,
                    needs: format!("the only variant {}", human_bytes(weights)),
                }));
            }
            (None, bundle.digest.clone(), manifest)
        }
    };
    tracing::info!(variant = %variant_digest, quantization = variant.as_ref().map(|v| v.quantization.as_str()).unwrap_or(""), "Chose the bundle variant.");
    let named = check_files(&manifest).map_err(wrap)?;

    // Every blob of the variant: config and layers, each once.
    let mut blobs: Vec<&Descriptor> = Vec::new();
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if !blobs.iter().any(|b| b.digest == d.digest) {
            blobs.push(d);
        }
    }
    let bytes_total = blobs.iter().map(|d| d.size).fold(0, u64::saturating_add);
    let mut missing = Vec::new();
    let mut bytes_present = 0u64;
    // Stored blobs are used only while they are unchanged since verified (or verify again now); any other,
    // damaged on disk or of the wrong size, is removed and fetched again.
    for d in &blobs {
        if store.verified(&d.digest, d.size).await.map_err(|e| wrap(PullErrorKind::Store(e)))? {
            bytes_present = bytes_present.saturating_add(d.size);
        } else {
            missing.push(*d);
        }
    }
    if let Source::Store = from
        && let Some(d) = missing.first()
    {
        return Err(wrap(PullErrorKind::NotInStore(format!("layer {}", short(&d.digest)))));
    }
    let needed = bytes_total - bytes_present;
    if check_disk(bundles_dir, needed, options.disk_reserve).await.is_err() {
        let mut keep = options.keep.clone();
        keep.extend([bundle.digest.clone(), variant_digest.clone()]);
        keep.extend(blobs.iter().map(|d| d.digest.clone()));
        let mut keep_variants = options.keep_variants.clone();
        keep_variants.push(variant_digest.clone());
        prune_variant_dirs(bundles_dir, &keep_variants).await;
        match store.evict(&keep, 0).await {
            Ok((removed, freed)) => {
                tracing::warn!(blobs = removed.len(), freed, "Evicted unused blobs to make room for the pull.")
            }
            Err(e) => tracing::warn!(error = %e, "Evicting unused blobs failed."),
        }
        check_disk(bundles_dir, needed, options.disk_reserve).await.map_err(wrap)?;
    }
    for d in &blobs {
        if !missing.iter().any(|m| m.digest == d.digest) {
            store.touch(&d.digest).await;
        }
    }
    store.touch(&bundle.digest).await;
    store.touch(&variant_digest).await;

    let mut reporter = Reporter { progress, last: None, base: bytes_present, total: bytes_total };
    reporter.report(0, true);
    let mut fetched = 0u64;
    let mut pace = options.bandwidth.map(Pace::new);
    if let Source::Registry(registry) = from {
        for d in missing {
            fetch_blob(registry, store, bundle, d, &mut pace, &mut |n| reporter.report(fetched + n, false))
                .await
                .map_err(wrap)?;
            fetched += d.size;
        }
    }
    reporter.report(fetched, true);

    let runtime_defaults = match runtime_layer(&manifest) {
        Some(layer) => Some(read_runtime_layer(store, layer).await.map_err(wrap)?),
        None => None,
    };
    let dir = bundles_dir.join(variant_digest.hex());
    let links: Vec<(PathBuf, String)> = named.iter().map(|(d, name)| (store.path(&d.digest), name.clone())).collect();
    let model_files = materialise(&dir, links).await.map_err(wrap)?;
    record_verification(&dir, shown, verified.as_ref(), &options.trust).await;
    Ok(PulledBundle {
        variant_digest,
        variant,
        dir,
        model_files,
        runtime_defaults,
        runtime_server: None,
        bytes_total,
        bytes_fetched: fetched,
        verified,
    })
}

/// Checks the bundle's signature against the trust policy for its repository, before anything else is
/// fetched. `Ok(None)`: the policy lets unsigned bundles through and none verified.
///
/// From a registry, the signature manifest and payloads are kept in the store and, once they verify, recorded
/// as the bundle's signature; from the store, that record is read back and every byte checked again (digests,
/// then the signatures against the policy as it is now, so a key removed since refuses).
async fn check_signature(
    from: Source<'_>,
    store: &ContentStore,
    bundle: &BundleLocation,
    trust: &RepositoryTrust,
) -> Result<Option<Verified>, PullErrorKind> {
    if !trust.required && trust.keys.is_empty() {
        return Ok(None);
    }
    let refuse = |problem: SignatureProblem| PullErrorKind::Signature { problem, policy: trust.source.clone() };
    let (layers, manifest) = match from {
        Source::Registry(registry) => fetch_signatures(registry, store, bundle).await?,
        Source::Store => stored_signatures(store, bundle, trust.required).await?,
    };
    match signing::verify(&bundle.digest, &layers, &trust.keys) {
        Ok(verified) => {
            tracing::info!(bundle = %bundle, key = %verified.key_fingerprint, policy = %trust.source, "Signature verified.");
            if let (Source::Registry(_), Some(manifest)) = (from, manifest)
                && let Err(e) = store.set_signature_of(&bundle.digest, &manifest).await
            {
                // Only offline re-verification is lost: the next activation fetches the signature again.
                tracing::warn!(bundle = %bundle, error = %e, "Cannot record the verified signature in the content store.");
            }
            Ok(Some(verified))
        }
        Err(problem) if trust.required => Err(refuse(problem)),
        Err(problem) => {
            tracing::warn!(bundle = %bundle, %problem, policy = %trust.source, "Signature does not verify; the trust policy does not require one.");
            Ok(None)
        }
    }
}

/// The signatures at the bundle's `sha256-<hex>.sig` tag (none when the tag does not exist), each payload
/// bounded and checked against its digest, and the signature manifest's digest. The manifest and payloads are
/// kept in the store so the signature can be checked again without the registry.
async fn fetch_signatures(
    registry: &RegistryAccess,
    store: &ContentStore,
    bundle: &BundleLocation,
) -> Result<(Vec<SignatureLayer>, Option<Digest>), PullErrorKind> {
    let tag = signing::signature_tag(&bundle.digest);
    let origin = registry.registry_of(bundle).to_owned();
    let reference = Reference::with_tag(origin.clone(), bundle.repository.clone(), tag.clone());
    let fetch_error =
        |what: String, source| PullErrorKind::Registry { what, registry: origin.clone(), source: Box::new(source) };
    let accepted = [MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST];
    let bytes = match registry.client.pull_manifest_raw(&reference, &registry.auth(bundle), &accepted).await {
        Ok((bytes, _)) => bytes,
        Err(e) if is_not_found(&e) => return Ok((Vec::new(), None)),
        Err(e) => return Err(fetch_error(format!("signature manifest {tag}"), e)),
    };
    let manifest = signature_manifest(&bytes, &tag)?;
    let mut payloads = Vec::new();
    for d in signing::signature_descriptors(&manifest) {
        let reference = registry.reference(bundle, &d.digest);
        let mut stream = registry
            .client
            .pull_blob_stream(&reference, d.digest.as_str())
            .await
            .map_err(|e| fetch_error(format!("signature payload {}", short(&d.digest)), e))?;
        let mut payload = Vec::new();
        while let Some(chunk) = stream.stream.next().await {
            match chunk {
                Ok(chunk) if (payload.len() + chunk.len()) as u64 <= signing::MAX_PAYLOAD_BYTES => {
                    payload.extend_from_slice(&chunk)
                }
                Ok(_) => {
                    let reason = format!("payload {} is larger than it says", short(&d.digest));
                    return Err(invalid_signature(&tag, reason));
                }
                Err(e) if is_stream_digest_error(&e) => break,
                Err(e) => {
                    return Err(PullErrorKind::Transfer {
                        layer: d.digest.clone(),
                        registry: origin.clone(),
                        bytes_on_disk: 0,
                        size: d.size,
                        source: e,
                    });
                }
            }
        }
        payloads.push(payload);
    }
    let layers = signature_layers(&manifest, payloads.clone(), &tag)?;
    // Kept as fetched (each checked against its digest above), for verifying again without the registry.
    let digest = Digest::of(&bytes);
    if bytes.len() <= MAX_MANIFEST_BYTES {
        store.write_bytes(&digest, &bytes).await.map_err(PullErrorKind::Store)?;
        for (d, payload) in signing::signature_descriptors(&manifest).into_iter().zip(&payloads) {
            store.write_bytes(&d.digest, payload).await.map_err(PullErrorKind::Store)?;
        }
    }
    Ok((layers, Some(digest).filter(|_| bytes.len() <= MAX_MANIFEST_BYTES)))
}

/// The signatures recorded for the bundle in the store (see [`ContentStore::signature_of`]), every byte checked
/// against its digest again with the same code as bytes from a registry. Without a record: none when the policy
/// does not require a signature, else [`PullErrorKind::NotInStore`] (the registry may have one).
async fn stored_signatures(
    store: &ContentStore,
    bundle: &BundleLocation,
    required: bool,
) -> Result<(Vec<SignatureLayer>, Option<Digest>), PullErrorKind> {
    let tag = signing::signature_tag(&bundle.digest);
    let not_here = || PullErrorKind::NotInStore(format!("the signature at {tag}"));
    let Some(digest) = store.signature_of(&bundle.digest).await else {
        return if required { Err(not_here()) } else { Ok((Vec::new(), None)) };
    };
    let bytes = read_small(store, &digest, MAX_MANIFEST_BYTES as u64).await.ok_or_else(not_here)?;
    if Digest::of(&bytes) != digest {
        // Damaged on disk: dropped, so the registry path fetches it again.
        let _ = store.remove(&digest).await;
        return Err(not_here());
    }
    let manifest = signature_manifest(&bytes, &tag)?;
    let mut payloads = Vec::new();
    for d in signing::signature_descriptors(&manifest) {
        let payload = read_small(store, &d.digest, signing::MAX_PAYLOAD_BYTES).await.ok_or_else(not_here)?;
        payloads.push(payload);
    }
    Ok((signature_layers(&manifest, payloads, &tag)?, Some(digest)))
}

fn invalid_signature(tag: &str, reason: String) -> PullErrorKind {
    PullErrorKind::Signature {
        problem: SignatureProblem::Invalid { reason },
        policy: String::from("signature tag ") + tag,
    }
}

/// A signature manifest, parsed strictly (from a registry or from the store alike).
fn signature_manifest(bytes: &[u8], tag: &str) -> Result<ImageManifest, PullErrorKind> {
    match Manifest::parse(bytes, None) {
        Ok(Manifest::Image(m)) => Ok(m),
        Ok(Manifest::Index(_)) => Err(invalid_signature(tag, "the signature tag holds an index".to_owned())),
        Err(e) => Err(invalid_signature(tag, format!("the signature manifest is malformed ({e})"))),
    }
}

/// The signature layers of `manifest` with their payloads (in descriptor order), each payload checked against
/// its descriptor's digest (from a registry or from the store alike).
fn signature_layers(
    manifest: &ImageManifest,
    payloads: Vec<Vec<u8>>,
    tag: &str,
) -> Result<Vec<SignatureLayer>, PullErrorKind> {
    let mut layers = Vec::new();
    for (d, payload) in signing::signature_descriptors(manifest).into_iter().zip(payloads) {
        if payload.len() as u64 > signing::MAX_PAYLOAD_BYTES {
            return Err(invalid_signature(tag, format!("payload {} is larger than it says", short(&d.digest))));
        }
        if Digest::of(&payload) != d.digest {
            return Err(invalid_signature(tag, format!("payload {} does not match its digest", short(&d.digest))));
        }
        layers.extend(SignatureLayer::new(d, payload));
    }
    Ok(layers)
}

/// True when the registry said the manifest or repository does not exist.
fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                oci_client::errors::OciErrorCode::ManifestUnknown | oci_client::errors::OciErrorCode::NameUnknown
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

/// Writes what was verified into the variant directory (best effort: the pull already succeeded).
async fn record_verification(
    dir: &Path,
    bundle: &BundleLocation,
    verified: Option<&Verified>,
    trust: &RepositoryTrust,
) {
    let record = serde_json::json!({
        "bundle": bundle.to_proto().display(),
        "digest": bundle.digest,
        "verified": verified,
        "policy": trust.source,
        "signature_required": trust.required,
    });
    let path = dir.join(VERIFICATION_RECORD);
    let bytes = serde_json::to_vec_pretty(&record).unwrap_or_default();
    let written = tokio::task::spawn_blocking(move || alki_shared::fsutil::write_atomic(&path, &bytes)).await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::warn!(dir = %dir.display(), "Cannot write the verification record.");
    }
}

fn label_of(v: &VariantInfo) -> &str {
    if v.quantization.is_empty() { "(unnamed)" } else { &v.quantization }
}

/// The weight layers with their file names; refuses a variant without GGUF or with unsafe or repeated names.
fn check_files(manifest: &ImageManifest) -> Result<Vec<(Descriptor, String)>, PullErrorKind> {
    let weights = weight_layers(manifest);
    if weights.is_empty() {
        return Err(PullErrorKind::NotABundle("the variant has no GGUF weight layer".to_owned()));
    }
    let mut named: Vec<(Descriptor, String)> = Vec::new();
    for layer in weights {
        let Some(name) = safe_file_name(layer) else {
            let shown = layer
                .annotation(alki_shared::oci::ANNOTATION_TITLE)
                .or(layer.annotation(alki_shared::bundle::ANNOTATION_FILEPATH))
                .unwrap_or("no title annotation");
            return Err(PullErrorKind::BadFileName { layer: layer.digest.clone(), name: shown.to_owned() });
        };
        if named.iter().any(|(_, n)| n == name) {
            return Err(PullErrorKind::BadFileName {
                layer: layer.digest.clone(),
                name: format!("{name}, used by two layers"),
            });
        }
        named.push((layer.clone(), name.to_owned()));
    }
    Ok(named)
}

struct Reporter<'a> {
    progress: &'a mut (dyn FnMut(PullProgress) + Send),
    last: Option<Instant>,
    base: u64,
    total: u64,
}

impl Reporter<'_> {
    fn report(&mut self, fetched: u64, force: bool) {
        let due = self.last.is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
        if force || due {
            self.last = Some(Instant::now());
            (self.progress)(PullProgress { bytes_done: self.base.saturating_add(fetched), bytes_total: self.total });
        }
    }
}

/// A manifest from the store if present (verified when it was stored), else from the registry, checked
/// against `digest` and stored.
async fn fetch_manifest(
    registry: &RegistryAccess,
    store: &ContentStore,
    bundle: &BundleLocation,
    digest: &Digest,
    what: &str,
) -> Result<Manifest, PullErrorKind> {
    let bytes = match read_small(store, digest, MAX_MANIFEST_BYTES as u64).await {
        Some(bytes) => bytes,
        None => {
            let reference = registry.reference(bundle, digest);
            let pulled =
                registry.client.pull_manifest_raw(&reference, &registry.auth(bundle), &ACCEPTED_MANIFESTS).await;
            let (bytes, _) = pulled.map_err(|source| match source {
                OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
                    actual,
                    ..
                }) => PullErrorKind::ManifestDigest { what: what.to_owned(), expected: digest.clone(), actual },
                source => PullErrorKind::Registry {
                    what: format!("{what} {}", short(digest)),
                    registry: registry.registry_of(bundle).to_owned(),
                    source: Box::new(source),
                },
            })?;
            let actual = Digest::of(&bytes);
            if &actual != digest {
                return Err(PullErrorKind::ManifestDigest {
                    what: what.to_owned(),
                    expected: digest.clone(),
                    actual: actual.to_string(),
                });
            }
            if bytes.len() <= MAX_MANIFEST_BYTES {
                store.write_bytes(digest, &bytes).await.map_err(PullErrorKind::Store)?;
            }
            bytes.to_vec()
        }
    };
    Manifest::parse(&bytes, None).map_err(|source| PullErrorKind::Manifest {
        what: what.to_owned(),
        digest: digest.clone(),
        source,
    })
}

/// A manifest from `from`: [`fetch_manifest`] from a registry; from the store alone, the stored bytes hashed
/// again and checked against `digest` (a damaged copy is removed, so the registry path fetches it anew).
async fn manifest_from(
    from: Source<'_>,
    store: &ContentStore,
    bundle: &BundleLocation,
    digest: &Digest,
    what: &str,
) -> Result<Manifest, PullErrorKind> {
    let bytes = match from {
        Source::Registry(registry) => return fetch_manifest(registry, store, bundle, digest, what).await,
        Source::Store => {
            let not_here = || PullErrorKind::NotInStore(format!("{what} {}", short(digest)));
            let bytes = read_small(store, digest, MAX_MANIFEST_BYTES as u64).await.ok_or_else(not_here)?;
            if &Digest::of(&bytes) != digest {
                let _ = store.remove(digest).await;
                return Err(not_here());
            }
            bytes
        }
    };
    Manifest::parse(&bytes, None).map_err(|source| PullErrorKind::Manifest {
        what: what.to_owned(),
        digest: digest.clone(),
        source,
    })
}

/// A stored blob's bytes when present and at most `limit` bytes long.
async fn read_small(store: &ContentStore, digest: &Digest, limit: u64) -> Option<Vec<u8>> {
    let size = store.size(digest).await?;
    if size > limit {
        return None;
    }
    tokio::fs::read(store.path(digest)).await.ok()
}

/// True for the error oci-client's verifying stream yields at its end when the digest does not match:
/// the store hashes the bytes itself and reports the mismatch with both digests.
fn is_stream_digest_error(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
}

/// Streams one blob into the store, resuming with a Range request from the bytes already on disk (after a
/// broken connection, or from an earlier pull the agent did not finish), retrying a few times when the
/// connection fails. The whole file is verified before it becomes a blob; a resumed file that does not
/// verify is downloaded once more from zero.
async fn fetch_blob(
    registry: &RegistryAccess,
    store: &ContentStore,
    bundle: &BundleLocation,
    descriptor: &Descriptor,
    pace: &mut Option<Pace>,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), PullErrorKind> {
    let reference = registry.reference(bundle, &descriptor.digest);
    // Authentication is stored per registry by the first manifest request; make sure it is there.
    registry.client.store_auth_if_needed(reference.resolve_registry(), &registry.auth(bundle)).await;
    let mut partial = store.partial(&descriptor.digest, descriptor.size).await.map_err(PullErrorKind::Store)?;
    if !partial.is_empty() {
        tracing::info!(layer = %descriptor.digest, bytes_on_disk = partial.len(), "Resuming the layer's download.");
    }
    let mut attempt = 0;
    let mut fresh_retry = true;
    loop {
        attempt += 1;
        let last_attempt = attempt >= BLOB_ATTEMPTS;
        let retry_pause = Duration::from_millis(500 * 2u64.pow(attempt.min(8) - 1));
        let offset = partial.len();
        if offset < descriptor.size {
            // Only the digest is passed: descriptor `urls` are never followed. Always a range request, even
            // from byte 0: oci-client hashes a whole-blob (200) stream itself, on the task that receives it,
            // which would hash every byte twice (the store hashes what it writes, and that is what is
            // checked). A registry that ignores ranges answers 200 and gets the double check.
            let response = registry
                .client
                .pull_blob_stream_partial(&reference, descriptor.digest.as_str(), offset, None)
                .await
                .map(|r| match r {
                    BlobResponse::Full(s) => (s, true),
                    BlobResponse::Partial(s) => (s, false),
                });
            let (stream, whole) = match response {
                Ok(r) => r,
                Err(OciDistributionError::ServerError { code: 416, .. }) if offset > 0 => {
                    // The registry has no bytes past those already here: its copy is shorter than the
                    // descriptor says (truncated), which no retry changes.
                    partial.discard().await;
                    return Err(PullErrorKind::LayerSize {
                        layer: descriptor.digest.clone(),
                        expected: descriptor.size,
                        actual: offset,
                        more: false,
                    });
                }
                Err(source) => {
                    let transient =
                        matches!(source, OciDistributionError::RequestError(_) | OciDistributionError::IoError(_))
                            || matches!(&source, OciDistributionError::ServerError { code, .. } if *code >= 500);
                    if transient && !last_attempt {
                        tracing::warn!(layer = %descriptor.digest, attempt, error = %source, "Blob request failed; retrying.");
                        tokio::time::sleep(retry_pause).await;
                        continue;
                    }
                    return Err(PullErrorKind::Registry {
                        what: format!("layer {}", short(&descriptor.digest)),
                        registry: registry.registry_of(bundle).to_owned(),
                        source: Box::new(source),
                    });
                }
            };
            if whole && offset > 0 {
                tracing::info!(layer = %descriptor.digest, "The registry ignored the range; downloading the layer from the start.");
                partial.restart().await.map_err(PullErrorKind::Store)?;
            }
            let bytes = stream.stream.take_while(|item| {
                let keep = !matches!(item, Err(e) if is_stream_digest_error(e));
                std::future::ready(keep)
            });
            let bytes = throttled(bytes, pace);
            match partial.append(bytes, &mut *progress).await {
                Ok(()) => {}
                Err(StoreError::Source { source, .. }) if !last_attempt => {
                    tracing::warn!(layer = %descriptor.digest, attempt, bytes_on_disk = partial.len(), error = %source, "Blob transfer broke off; resuming.");
                    tokio::time::sleep(retry_pause).await;
                    continue;
                }
                Err(StoreError::Source { source, .. }) => {
                    return Err(PullErrorKind::Transfer {
                        layer: descriptor.digest.clone(),
                        registry: registry.registry_of(bundle).to_owned(),
                        bytes_on_disk: partial.len(),
                        size: descriptor.size,
                        source,
                    });
                }
                Err(StoreError::SizeMismatch { digest, expected, actual, more: true }) => {
                    partial.discard().await;
                    return Err(PullErrorKind::LayerSize { layer: digest, expected, actual, more: true });
                }
                Err(e) if e.is_disk_full() => {
                    // The partial bytes go: a full disk would break the state file, logs and the serving model.
                    let written = partial.len();
                    partial.discard().await;
                    return Err(PullErrorKind::DiskFullWriting { layer: descriptor.digest.clone(), written, error: e });
                }
                Err(e) => return Err(PullErrorKind::Store(e)),
            }
        }
        match partial.finish().await {
            Ok(_) => return Ok(()),
            Err(StoreError::SizeMismatch { .. }) if !last_attempt => {
                // The body ended early without an error: resume from where it stopped.
                tracing::warn!(layer = %descriptor.digest, attempt, bytes_on_disk = partial.len(), "Blob transfer ended early; resuming.");
                tokio::time::sleep(retry_pause).await;
            }
            Err(StoreError::SizeMismatch { digest, expected, actual, more }) => {
                return Err(PullErrorKind::LayerSize { layer: digest, expected, actual, more });
            }
            Err(StoreError::DigestMismatch { .. }) if offset > 0 && fresh_retry => {
                // Bytes kept from an earlier attempt may be what was wrong (a power cut): try once from zero.
                tracing::warn!(layer = %descriptor.digest, "The resumed layer did not verify; downloading it again from the start.");
                fresh_retry = false;
                attempt = attempt.min(BLOB_ATTEMPTS - 1);
            }
            Err(StoreError::DigestMismatch { expected, actual }) => {
                return Err(PullErrorKind::LayerDigest { layer: expected, actual });
            }
            Err(e) => return Err(PullErrorKind::Store(e)),
        }
    }
}

/// A download rate limit: after `sent` bytes, the transfer may not be ahead of `sent / rate` seconds since
/// it started.
#[derive(Clone, Debug)]
pub struct Pace {
    rate: u64,
    started: Option<Instant>,
    sent: u64,
}

impl Pace {
    pub fn new(bytes_per_second: u64) -> Pace {
        Pace { rate: bytes_per_second.max(1), started: None, sent: 0 }
    }

    /// How long to wait after `n` more bytes arrived at `now`, to stay under the rate.
    pub fn after(&mut self, n: u64, now: Instant) -> Duration {
        let started = *self.started.get_or_insert(now);
        self.sent = self.sent.saturating_add(n);
        let due = started + Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        due.saturating_duration_since(now)
    }
}

/// `stream`, slowed down to `pace` (unchanged without one). Waits between chunks, so memory stays bounded
/// by one chunk and the TCP window throttles the sender.
pub fn throttled<'a, S>(
    stream: S,
    pace: &'a mut Option<Pace>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + 'a
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + 'a,
{
    stream.then(move |item| {
        let wait = match (&item, pace.as_mut()) {
            (Ok(chunk), Some(pace)) => pace.after(chunk.len() as u64, Instant::now()),
            _ => Duration::ZERO,
        };
        async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            item
        }
    })
}

async fn read_runtime_layer(store: &ContentStore, layer: &Descriptor) -> Result<RuntimeDefaults, PullErrorKind> {
    let invalid = |reason: String| PullErrorKind::RuntimeLayer { layer: layer.digest.clone(), reason };
    if layer.size > MAX_RUNTIME_LAYER_BYTES {
        return Err(invalid(format!("it is {} bytes, over the limit of {MAX_RUNTIME_LAYER_BYTES}", layer.size)));
    }
    let bytes = read_small(store, &layer.digest, MAX_RUNTIME_LAYER_BYTES)
        .await
        .ok_or_else(|| invalid("it is missing from the content store".to_owned()))?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))
}

async fn check_disk(dir: &Path, needed: u64, reserve: u64) -> Result<(), PullErrorKind> {
    if needed == 0 {
        return Ok(());
    }
    let probe = dir.to_owned();
    let space = tokio::task::spawn_blocking(move || crate::inventory::disk_space(&probe)).await.ok().flatten();
    match space {
        Some((_, available)) if available < needed.saturating_add(reserve) => {
            Err(PullErrorKind::DiskFull { needed, reserve, available, dir: dir.to_owned() })
        }
        _ => Ok(()),
    }
}

/// Removes variant directories under `bundles_dir` other than `keep` (they hold hard links to blobs, so a
/// blob's space is only freed once no directory links it). Best effort.
pub async fn prune_variant_dirs(bundles_dir: &Path, keep: &[Digest]) {
    let Ok(mut entries) = tokio::fs::read_dir(bundles_dir).await else { return };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        if keep.iter().any(|d| d.hex() == name) {
            continue;
        }
        if let Err(e) = tokio::fs::remove_dir_all(entry.path()).await {
            tracing::warn!(dir = %entry.path().display(), error = %e, "Cannot remove an unused bundle directory.");
        }
    }
}

/// The blobs a deployment needs: the bundle's manifest (or index), the variant manifest and every blob it
/// names, and the bundle's recorded signature manifest and payloads (to verify it again without a registry),
/// as far as they are in the store.
pub async fn deployment_blobs(
    store: &ContentStore,
    bundle: &Digest,
    variant: &Digest,
) -> std::collections::HashSet<Digest> {
    let mut keep: std::collections::HashSet<Digest> = [bundle.clone(), variant.clone()].into();
    if let Some(bytes) = read_small(store, variant, MAX_MANIFEST_BYTES as u64).await
        && let Ok(Manifest::Image(m)) = Manifest::parse(&bytes, None)
    {
        keep.extend(std::iter::once(&m.config).chain(&m.layers).map(|d| d.digest.clone()));
        keep.extend(crate::builds::blobs_named_by(store, &m).await);
    }
    if let Some(signature) = store.signature_of(bundle).await {
        if let Some(bytes) = read_small(store, &signature, MAX_MANIFEST_BYTES as u64).await
            && let Ok(Manifest::Image(m)) = Manifest::parse(&bytes, None)
        {
            keep.extend(signing::signature_descriptors(&m).into_iter().map(|d| d.digest.clone()));
        }
        keep.insert(signature);
    }
    keep
}

/// Makes `dir` hold one entry per `(blob path, file name)`: a hard link to the blob, or a copy when the
/// link fails (another filesystem). Entries already linked to their blob are kept; others are replaced.
async fn materialise(dir: &Path, files: Vec<(PathBuf, String)>) -> Result<Vec<PathBuf>, PullErrorKind> {
    let dir = dir.to_owned();
    let owned = dir.clone();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<PathBuf>> {
        use std::os::unix::fs::MetadataExt;
        std::fs::create_dir_all(&owned)?;
        let mut out = Vec::new();
        for (blob, name) in files {
            let target = owned.join(&name);
            let blob_meta = std::fs::metadata(&blob)?;
            if let Ok(meta) = std::fs::symlink_metadata(&target) {
                let same = meta.is_file() && meta.dev() == blob_meta.dev() && meta.ino() == blob_meta.ino();
                if same {
                    out.push(target);
                    continue;
                }
                std::fs::remove_file(&target)?;
            }
            if let Err(e) = std::fs::hard_link(&blob, &target) {
                tracing::debug!(error = %e, file = %target.display(), "Hard link failed; copying.");
                let tmp = owned.join(format!(".{name}.copy"));
                std::fs::copy(&blob, &tmp)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &target)?;
            }
            out.push(target);
        }
        alki_shared::fsutil::sync_dir(&owned)?;
        Ok(out)
    })
    .await;
    match result {
        Ok(Ok(files)) => Ok(files),
        Ok(Err(source)) => Err(PullErrorKind::Materialise { dir, source }),
        Err(join) => Err(PullErrorKind::Materialise { dir, source: std::io::Error::other(join) }),
    }
}

/// `1.5 GiB`, `600 MiB`, `12 KiB`, `10 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// What [`crate::builds`] reuses of the bundle pull: the signature check against the trust policy, manifests
/// checked against their digest and kept in the store, resumable digest-verified blob downloads, the disk check.
pub(crate) mod for_builds {
    use super::*;

    pub(crate) async fn check_signature(
        registry: &RegistryAccess,
        store: &ContentStore,
        artifact: &BundleLocation,
        trust: &RepositoryTrust,
    ) -> Result<Option<Verified>, PullErrorKind> {
        // As for bundles: a signature recorded in the store when the build was pulled (or staged) is checked
        // first, against the policy as it is now, so the build activates with no registry; the registry is
        // asked when none is recorded, or when the recorded one no longer satisfies the policy (it may hold a
        // newer signature) and can be reached.
        if store.signature_of(&artifact.digest).await.is_none() {
            return super::check_signature(Source::Registry(registry), store, artifact, trust).await;
        }
        match super::check_signature(Source::Store, store, artifact, trust).await {
            Ok(verified) => Ok(verified),
            Err(PullErrorKind::NotInStore(_)) => {
                super::check_signature(Source::Registry(registry), store, artifact, trust).await
            }
            Err(refusal @ PullErrorKind::Signature { .. }) => {
                match super::check_signature(Source::Registry(registry), store, artifact, trust).await {
                    Err(PullErrorKind::Registry { .. } | PullErrorKind::Transfer { .. }) => Err(refusal),
                    other => other,
                }
            }
            Err(other) => Err(other),
        }
    }

    pub(crate) async fn fetch_manifest(
        registry: &RegistryAccess,
        store: &ContentStore,
        artifact: &BundleLocation,
        digest: &Digest,
        what: &str,
    ) -> Result<Manifest, PullErrorKind> {
        super::fetch_manifest(registry, store, artifact, digest, what).await
    }

    pub(crate) async fn fetch_blob(
        registry: &RegistryAccess,
        store: &ContentStore,
        artifact: &BundleLocation,
        descriptor: &Descriptor,
        pace: &mut Option<Pace>,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), PullErrorKind> {
        super::fetch_blob(registry, store, artifact, descriptor, pace, progress).await
    }

    pub(crate) async fn check_disk(dir: &Path, needed: u64, reserve: u64) -> Result<(), PullErrorKind> {
        super::check_disk(dir, needed, reserve).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::bundle::MEDIA_TYPE_WEIGHT_RAW;
    use alki_shared::oci::ANNOTATION_TITLE;

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
        assert!(matches!(err, PullErrorKind::BadFileName { .. }), "{err}");
        let err = check_files(&manifest(vec![weight("a.gguf", b"1"), weight("a.gguf", b"2")])).expect_err("dup");
        assert!(matches!(err, PullErrorKind::BadFileName { .. }), "{err}");
        let err = check_files(&manifest(vec![])).expect_err("no weights");
        assert!(matches!(err, PullErrorKind::NotABundle(_)), "{err}");
    }

    #[tokio::test]
    async fn materialise_links_blobs_by_name_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(&dir.path().join("content")).expect("store");
        let digest = Digest::of(b"gguf bytes");
        let blob = store.write_bytes(&digest, b"gguf bytes").await.expect("store blob");
        let target_dir = dir.path().join("bundles").join(digest.hex());
        for _ in 0..2 {
            let files = materialise(&target_dir, vec![(blob.clone(), "model.gguf".to_owned())]).await.expect("link");
            assert_eq!(files, vec![target_dir.join("model.gguf")]);
            assert_eq!(std::fs::read(&files[0]).expect("read"), b"gguf bytes");
        }
    }

    #[test]
    fn errors_carry_codes_and_layer_digests_and_say_what_to_do() {
        let layer = Digest::of(b"expected");
        let err = PullError {
            bundle: "acme/qwen@sha256:ab12…".to_owned(),
            kind: PullErrorKind::LayerDigest { layer: layer.clone(), actual: Digest::of(b"actual") },
        };
        assert_eq!(err.code(), ErrorCode::DigestMismatch);
        assert_eq!(err.layer_digest(), Some(&layer));
        let text = err.to_string();
        assert!(text.starts_with("bundle acme/qwen@sha256:ab12…: layer sha256:"), "{text}");
        assert!(text.contains("push the bundle again"), "{text}");
        let full = PullError {
            bundle: "b".to_owned(),
            kind: PullErrorKind::DiskFull {
                needed: 3 << 30,
                reserve: 512 << 20,
                available: 1 << 30,
                dir: PathBuf::from("/data"),
            },
        };
        assert_eq!(full.code(), ErrorCode::DiskFull);
        assert!(full.to_string().contains("3.0 GiB"), "{full}");
    }

    #[test]
    fn the_token_follows_the_embedded_registry_host() {
        assert_eq!(host_of("127.0.0.1:7080"), "127.0.0.1");
        assert_eq!(host_of("registry.local"), "registry.local");
        assert_eq!(host_of("[::1]:5000"), "[::1]");
        let access = RegistryAccess::new(vec![], "ctl.example:7070".to_owned(), Some("t".to_owned()));
        let at = |registry: &str| BundleLocation {
            registry: registry.to_owned(),
            repository: "a/b".to_owned(),
            digest: Digest::of(b"x"),
            tag: String::new(),
        };
        assert!(matches!(access.auth(&at("")), RegistryAuth::Basic(..)));
        assert!(matches!(access.auth(&at("ctl.example:7080")), RegistryAuth::Basic(..)));
        assert!(matches!(access.auth(&at("docker.io")), RegistryAuth::Anonymous));
        assert!(matches!(access.auth(&at("ctl.example.evil:7070")), RegistryAuth::Anonymous));
    }

    #[test]
    fn mirrors_come_first_in_order_then_the_origin() {
        let at = |registry: &str| BundleLocation {
            registry: registry.to_owned(),
            repository: "a/b".to_owned(),
            digest: Digest::of(b"x"),
            tag: String::new(),
        };
        let mirrors = [
            ("reg.example:5000".to_owned(), vec!["m1:5000".to_owned(), "m2:5000".to_owned(), "m1:5000".to_owned()]),
            ("ctl.example:7080".to_owned(), vec!["ctl.example:7080".to_owned(), "cache:5000".to_owned()]),
        ]
        .into();
        let access = RegistryAccess::new(vec![], "ctl.example:7080".to_owned(), None).with_mirrors(mirrors);
        assert_eq!(access.endpoints(&at("reg.example:5000")), ["m1:5000", "m2:5000", "reg.example:5000"]);
        assert_eq!(access.endpoints(&at("")), ["cache:5000", "ctl.example:7080"], "embedded, origin not twice");
        assert_eq!(access.endpoints(&at("other:5000")), ["other:5000"], "no mirrors: the origin only");
    }

    #[test]
    fn credentials_go_to_their_exact_registry_only() {
        let at = |registry: &str| BundleLocation {
            registry: registry.to_owned(),
            repository: "a/b".to_owned(),
            digest: Digest::of(b"x"),
            tag: String::new(),
        };
        let credentials = [("reg.example:5000".to_owned(), ("ci".to_owned(), "secret".to_owned()))].into();
        let access = RegistryAccess::new(vec![], "ctl.example:7080".to_owned(), Some("t".to_owned()))
            .with_credentials(credentials);
        assert!(
            matches!(access.auth(&at("reg.example:5000")), RegistryAuth::Basic(u, p) if u == "ci" && p == "secret")
        );
        assert!(matches!(access.auth(&at("reg.example:5001")), RegistryAuth::Anonymous));
        assert!(matches!(access.auth(&at("mirror:5000")), RegistryAuth::Anonymous));
        assert!(matches!(access.auth(&at("")), RegistryAuth::Basic(u, _) if u == BASIC_USER));
    }

    #[test]
    fn only_source_failures_fall_back_to_the_next_source() {
        let error = |kind| PullError { bundle: "b".to_owned(), kind };
        let layer = Digest::of(b"l");
        let source_failures = [
            PullErrorKind::Registry {
                what: "m".to_owned(),
                registry: "r".to_owned(),
                source: Box::new(OciDistributionError::GenericError(None)),
            },
            PullErrorKind::LayerDigest { layer: layer.clone(), actual: Digest::of(b"other") },
            PullErrorKind::LayerSize { layer: layer.clone(), expected: 1, actual: 2, more: true },
            PullErrorKind::ManifestDigest { what: "m".to_owned(), expected: layer.clone(), actual: "x".to_owned() },
            PullErrorKind::Transfer {
                layer: layer.clone(),
                registry: "r".to_owned(),
                bytes_on_disk: 0,
                size: 1,
                source: std::io::Error::other("reset"),
            },
        ];
        for kind in source_failures {
            assert!(error(kind).may_try_another_source());
        }
        let final_failures = [
            PullErrorKind::NotABundle("no".to_owned()),
            PullErrorKind::NoVariantFits { available: 1, needs: "2".to_owned() },
            PullErrorKind::DiskFull { needed: 1, reserve: 1, available: 0, dir: PathBuf::from("/d") },
            PullErrorKind::BadFileName { layer, name: "../x".to_owned() },
        ];
        for kind in final_failures {
            assert!(!error(kind).may_try_another_source());
        }
    }

    #[test]
    fn pace_holds_the_transfer_to_the_rate() {
        let start = Instant::now();
        let mut pace = Pace::new(1000);
        assert_eq!(pace.after(500, start), Duration::from_millis(500), "half a second's worth at once");
        assert_eq!(pace.after(500, start + Duration::from_millis(2000)), Duration::ZERO, "behind: no wait");
        assert_eq!(pace.after(1000, start + Duration::from_millis(2000)), Duration::from_millis(0));
        assert_eq!(pace.after(1000, start + Duration::from_millis(2000)), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_stream_takes_at_least_size_over_rate() {
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
            (0..10).map(|_| Ok(bytes::Bytes::from(vec![0u8; 100_000]))).collect();
        let mut pace = Some(Pace::new(500_000));
        let started = Instant::now();
        let total: usize = throttled(futures::stream::iter(chunks), &mut pace)
            .map(|c| c.map(|c| c.len()).unwrap_or(0))
            .fold(0, |a, b| async move { a + b })
            .await;
        assert_eq!(total, 1_000_000);
        // The paused clock advances only by the waits: 1 MB at 500 kB/s is 2 s.
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(600 << 20), "600.0 MiB");
    }
}
