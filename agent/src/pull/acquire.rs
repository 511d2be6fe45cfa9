//! The one acquire path: memory probe → trust policy → bundle pull (store first, then mirrors and origin;
//! signature before any layer) → the runtime build it names. The device loop (activation), staging
//! (pre-staging) and calibration all acquire through an [`Acquirer`], so every bundle that reaches the disk
//! passed the same checks.

use std::path::{Path, PathBuf};

use super::blob::PullProgress;
use super::build::{Builds, attach};
use super::bundle::{PullOptions, PulledBundle, pull_bundle_with, verify_from_store};
use super::error::PullError;
use super::registry::{RegistryAccess, RegistrySettings};
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
