//! The one acquire path: memory probe → trust policy → bundle pull (store first, then mirrors and origin;
//! signature before any layer) → the runtime build it names. The device loop (activation), staging
//! (pre-staging) and calibration all acquire through an [`Acquirer`], so every bundle that reaches the disk
//! passed the same checks.

use std::path::{Path, PathBuf};

use alki_shared::oci::{Descriptor, Manifest};

use super::blob::{Pace, PullProgress, check_disk, fetch_blob};
use super::build::{Builds, attach};
use super::bundle::{PullOptions, PulledBundle, pull_bundle_with, verify_from_store};
use super::error::PullError;
use super::manifest::fetch_manifest;
use super::registry::{Attempt, RegistryAccess, RegistrySettings};
use super::signature::check_signature_store_first;
use crate::reference::BundleLocation;
use crate::store::ContentStore;
use crate::trust::RepositoryTrust;

/// Where acquired bundles come from and go; each user (device loop, staging, calibration) holds one.
#[derive(Clone, Debug)]
pub struct Acquirer {
    /// Registries, credentials and the trust policy, read again for every acquisition.
    pub registry: RegistrySettings,
    pub store: ContentStore,
    /// Extracted runtime builds (`<data_dir>/runtime-builds`), shared by every user so a build extracted
    /// once serves them all.
    pub builds_dir: PathBuf,
}

/// One acquisition: which bundle, into where, and under what limits.
#[derive(Clone, Debug)]
pub struct Want<'a> {
    pub bundle: &'a BundleLocation,
    /// Where the chosen variant's directory is made (`bundles/`, or calibration's own directory).
    pub into: &'a Path,
    /// Memory the variant may need; None: the memory available now.
    pub memory: Option<u64>,
    /// What the bundle's signature is checked against; None: the trust policy for its repository, read now.
    pub trust: Option<RepositoryTrust>,
    /// Disk reserve, what to keep, bandwidth and the preferred variant (its `trust` is replaced as above).
    pub options: PullOptions,
}

impl Acquirer {
    /// Acquires a bundle: the variant that fits, verified and materialised, with the runtime build it names
    /// pulled, verified and extracted (`runtime_server`). Failures name the bundle.
    pub async fn acquire(
        &self,
        want: Want<'_>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<PulledBundle, PullError> {
        let access = self.registry.access().await;
        let bundle = want.bundle;
        let (mut pulled, options) = self.pull_bundle(&access, want, progress).await?;
        self.attach(&access, &mut pulled, &options, progress).await.map_err(|e| e.about_bundle(bundle))?;
        Ok(pulled)
    }

    /// [`Acquirer::acquire`] without the runtime build (calibration attaches it per variant, so a broken
    /// build fails that variant's result rather than the whole calibration).
    pub async fn pull(
        &self,
        want: Want<'_>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<PulledBundle, PullError> {
        let access = self.registry.access().await;
        Ok(self.pull_bundle(&access, want, progress).await?.0)
    }

    /// The runtime build `pulled` names, pulled and extracted as [`Acquirer::acquire`] does.
    pub async fn attach_build(&self, pulled: &mut PulledBundle, options: &PullOptions) -> Result<(), PullError> {
        let access = self.registry.access().await;
        self.attach(&access, pulled, options, &mut |_| {}).await
    }

    /// Verifies a bundle again from the content store alone (no registry), as [`Acquirer::acquire`] would
    /// find it: digests of every stored byte, and the recorded signature against the policy as it is now.
    pub async fn verify_stored(&self, want: Want<'_>) -> Result<PulledBundle, PullError> {
        let (memory, options) = self.resolve(&want).await;
        verify_from_store(&self.store, want.into, want.bundle, memory, &options).await
    }

    /// A signed artifact other than a bundle (an eval suite), or a bundle's top manifest alone: the signature
    /// checked against `trust` (None: the trust policy for its repository, read now) before anything else,
    /// its manifest read, `layers` choosing the blobs to download from it (refusing the artifact, e.g. by
    /// their declared sizes, before anything is downloaded), and those fetched into the content store
    /// (verified, sealed, evictable like every blob). The content store is asked first: an artifact that is
    /// all there is used without a registry. Mirrors are tried in order before the artifact's registry.
    /// Errors are bare: the caller says which artifact they are about.
    pub async fn acquire_artifact(
        &self,
        artifact: &BundleLocation,
        trust: Option<RepositoryTrust>,
        layers: &LayerChoice<'_>,
        options: &PullOptions,
    ) -> Result<(Manifest, Vec<Descriptor>), PullError> {
        let access = self.registry.access().await;
        let trust = match trust {
            Some(trust) => trust,
            None => self.registry.trust.for_repository_off_thread(&artifact.repository).await,
        };
        let mut attempt = ArtifactPull { store: &self.store, registry: &access, trust: &trust, layers, options };
        access.from_each_endpoint(artifact, &mut attempt).await
    }

    /// The bundle pulled as `want` says, and the options it was pulled with.
    async fn pull_bundle(
        &self,
        access: &RegistryAccess,
        want: Want<'_>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<(PulledBundle, PullOptions), PullError> {
        let (memory, options) = self.resolve(&want).await;
        let pulled = pull_bundle_with(access, &self.store, want.into, want.bundle, memory, &options, progress).await?;
        Ok((pulled, options))
    }

    async fn attach(
        &self,
        access: &RegistryAccess,
        pulled: &mut PulledBundle,
        options: &PullOptions,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<(), PullError> {
        let builds =
            Builds { registry: access, store: &self.store, dir: &self.builds_dir, trust: &self.registry.trust };
        attach(pulled, &builds, options, progress).await
    }

    /// The memory the variant may use and the options with the trust to check against.
    async fn resolve(&self, want: &Want<'_>) -> (u64, PullOptions) {
        let memory = match want.memory {
            Some(memory) => memory,
            None => tokio::task::spawn_blocking(crate::inventory::memory_available).await.unwrap_or_default(),
        };
        let trust = match &want.trust {
            Some(trust) => trust.clone(),
            None => self.registry.trust.for_repository_off_thread(&want.bundle.repository).await,
        };
        (memory, PullOptions { trust, ..want.options.clone() })
    }
}

/// Chooses the blobs to download from an artifact's manifest, or refuses the artifact.
pub type LayerChoice<'a> = dyn Fn(&Manifest) -> Result<Vec<Descriptor>, PullError> + Send + Sync + 'a;

/// One attempt of [`Acquirer::acquire_artifact`] at one endpoint.
struct ArtifactPull<'a> {
    store: &'a ContentStore,
    registry: &'a RegistryAccess,
    trust: &'a RepositoryTrust,
    layers: &'a LayerChoice<'a>,
    options: &'a PullOptions,
}

impl Attempt for ArtifactPull<'_> {
    type Output = (Manifest, Vec<Descriptor>);
    fn attempt<'a>(
        &'a mut self,
        at: &'a BundleLocation,
    ) -> impl Future<Output = Result<Self::Output, PullError>> + Send + 'a {
        self.from(at)
    }
}

impl ArtifactPull<'_> {
    async fn from(&self, at: &BundleLocation) -> Result<(Manifest, Vec<Descriptor>), PullError> {
        check_signature_store_first(self.registry, self.store, at, self.trust).await?;
        let manifest = fetch_manifest(self.registry, self.store, at, &at.digest, "manifest").await?;
        let layers = (self.layers)(&manifest)?;
        let mut pace = self.options.bandwidth.map(Pace::new);
        for d in &layers {
            if self.store.verified(&d.digest, d.size).await.map_err(PullError::Store)? {
                self.store.touch(&d.digest).await;
                continue;
            }
            check_disk(self.store.blobs_dir(), d.size, self.options.disk_reserve).await?;
            fetch_blob(self.registry, self.store, at, d, &mut pace, &mut |_| {}).await?;
        }
        self.store.touch(&at.digest).await;
        Ok((manifest, layers))
    }
}
