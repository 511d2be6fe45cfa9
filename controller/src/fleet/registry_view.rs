//! The fleet as the registry's access rules see it ([`FleetView`]): a device's repositories (its bundles',
//! and the runtime builds those bundles name in their runtime layers) and the manifests active rollouts pin.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use alki_shared::bundle::{MEDIA_TYPE_RUNTIME, RuntimeDefaults, parse_runtime_build};
use alki_shared::digest::Digest;
use alki_shared::ids::DeviceId;
use alki_shared::oci::Manifest;
use alki_shared::proto;

use crate::facts::rollout_is_active;
use crate::registry::Registry;
use crate::registry::access::FleetView;
use crate::scope::device_bundles;
use crate::store::Store;

/// Bundles whose runtime builds are remembered; manifests are immutable by digest, so entries never go
/// stale, and past this many the memory is cleared and filled again.
const REMEMBERED_BUNDLES: usize = 4096;
/// Largest runtime layer read (it is a small JSON document).
const MAX_RUNTIME_LAYER: u64 = 64 << 10;

pub struct RegistryView {
    store: Store,
    registry: Arc<Registry>,
    /// Bundle digest → repositories of the runtime builds its variants name.
    runtime_builds: Mutex<HashMap<String, BTreeSet<String>>>,
}

impl RegistryView {
    pub fn new(store: Store, registry: Arc<Registry>) -> RegistryView {
        RegistryView { store, registry, runtime_builds: Mutex::default() }
    }

    /// The repositories of the runtime builds `bundle`'s variants name (none for a bundle the embedded
    /// registry does not hold).
    fn runtime_repositories(&self, bundle: &proto::BundleRef) -> BTreeSet<String> {
        if let Some(known) = self.lock().get(&bundle.digest) {
            return known.clone();
        }
        let found = self.read_runtime_repositories(bundle);
        let mut remembered = self.lock();
        if remembered.len() >= REMEMBERED_BUNDLES {
            remembered.clear();
        }
        remembered.insert(bundle.digest.clone(), found.clone());
        found
    }

    fn read_runtime_repositories(&self, bundle: &proto::BundleRef) -> BTreeSet<String> {
        let manifest = |reference: &str| {
            let stored = self.registry.resolve(&bundle.repository, reference).ok().flatten()?;
            Manifest::parse(&stored.bytes, Some(&stored.media_type)).ok()
        };
        let images = match manifest(&bundle.digest) {
            Some(Manifest::Index(index)) => {
                index.manifests.iter().filter_map(|d| manifest(d.digest.as_str())).collect::<Vec<_>>()
            }
            Some(image) => vec![image],
            None => Vec::new(),
        };
        let mut repositories = BTreeSet::new();
        for image in images {
            let Manifest::Image(image) = image else { continue };
            for layer in
                image.layers.iter().filter(|l| l.media_type == MEDIA_TYPE_RUNTIME && l.size <= MAX_RUNTIME_LAYER)
            {
                let Some(path) = self.registry.blob_path(&layer.digest) else { continue };
                let Ok(bytes) = std::fs::read(path) else { continue };
                let Ok(defaults) = serde_json::from_slice::<RuntimeDefaults>(&bytes) else { continue };
                if let Some(Ok((_, repository, _))) = defaults.runtime_build.as_deref().map(parse_runtime_build) {
                    repositories.insert(repository);
                }
            }
        }
        repositories
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeSet<String>>> {
        self.runtime_builds.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FleetView for RegistryView {
    fn device_repositories(&self, device_id: &str) -> Result<BTreeSet<String>, String> {
        let Ok(id) = DeviceId::new(device_id) else { return Ok(BTreeSet::new()) };
        let Some(device) = self.store.device(&id).map_err(|e| e.to_string())? else { return Ok(BTreeSet::new()) };
        let mut repositories = BTreeSet::new();
        for bundle in device_bundles(&device) {
            repositories.insert(bundle.repository.clone());
            repositories.extend(self.runtime_repositories(bundle));
        }
        Ok(repositories)
    }

    fn pinned(&self, repository: &str) -> Result<BTreeSet<Digest>, String> {
        let mut pinned = BTreeSet::new();
        let mut pin = |bundle: Option<&proto::BundleRef>| {
            if let Some(digest) = bundle.filter(|b| b.repository == repository).and_then(|b| b.digest.parse().ok()) {
                pinned.insert(digest);
            }
        };
        for rollout in self.store.rollouts().map_err(|e| e.to_string())? {
            let record = rollout.record();
            if !rollout_is_active(record) {
                continue;
            }
            pin(record.candidate.as_ref());
            pin(record.eval_suite.as_ref());
            for device in self.store.rollout_devices(rollout.id()).map_err(|e| e.to_string())? {
                pin(device.record().baseline.as_ref());
            }
        }
        Ok(pinned)
    }
}
