//! Bundles as ListBundles and the dashboard show them: the model manifests and indexes of the embedded
//! registry, with their signatures checked against the fleet's trusted keys, and the bundles of external
//! registries the controller pinned for rollouts. Also what one bundle manifest holds ([`summarize`]), and
//! pinning a tag of the embedded registry to the digest agents are given ([`pin_embedded`]).

use std::collections::HashSet;

use alki_shared::bundle::VariantInfo;
use alki_shared::clock::UnixMs;
use alki_shared::digest::Digest;
use alki_shared::oci::Manifest;
use alki_shared::proto;
use alki_shared::signing::{self, PublicKey, SignatureLayer};

use crate::registry::{ManifestEntry, Registry, RegistryError};
use crate::rollout::external::Pinned;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every bundle, in `repository` if given (for an external bundle, either the repository inside its
/// registry or `host/repository`): the embedded registry's first, then the external ones. Blocking
/// (the registry's index and small blob files).
pub fn list(
    registry: &Registry,
    store: &Store,
    keys: &[PublicKey],
    repository: Option<&str>,
) -> Result<Vec<proto::Bundle>, ListError> {
    let entries = registry.manifests(repository)?;
    let mut bundles = embedded(registry, &entries, keys);
    bundles.extend(external(store, repository)?);
    Ok(bundles)
}

/// The variants and total weight size of a bundle manifest: an index whose entries carry quantizations, or
/// a single ModelPack manifest. None for anything else (signatures, runtime builds, other artifacts).
pub fn summarize(manifest: &Manifest) -> Option<(Vec<proto::Variant>, u64)> {
    match manifest {
        Manifest::Index(index) => {
            let variants: Vec<VariantInfo> = alki_shared::bundle::variants(index);
            if variants.iter().all(|v| v.quantization.is_empty()) {
                return None;
            }
            let total = variants.iter().map(|v| v.weights_bytes).sum();
            let variants = variants
                .into_iter()
                .map(|v| proto::Variant {
                    digest: v.descriptor.digest.to_string(),
                    name: v.model_name,
                    architecture: v.architecture,
                    quantization: v.quantization,
                    size: v.weights_bytes,
                })
                .collect();
            Some((variants, total))
        }
        Manifest::Image(image) => (image.artifact_type.as_deref() == Some(alki_shared::bundle::ARTIFACT_TYPE_MODEL))
            .then(|| (Vec::new(), image.layers.iter().map(|l| l.size).sum())),
    }
}

/// Pins `reference` (a tag or a digest) in `repository` of the embedded registry, reached by agents at
/// `registry_host`, to the bundle reference agents are given (its tag is empty when a digest was named).
/// None when the registry does not hold it. Blocking (the index and a small file).
pub fn pin_embedded(
    registry: &Registry,
    registry_host: &str,
    repository: &str,
    reference: &str,
) -> Result<Option<proto::BundleRef>, RegistryError> {
    let Some(manifest) = registry.resolve(repository, reference)? else { return Ok(None) };
    Ok(Some(proto::BundleRef {
        registry: registry_host.to_owned(),
        repository: repository.to_owned(),
        digest: manifest.digest.to_string(),
        tag: if reference.starts_with("sha256:") { String::new() } else { reference.to_owned() },
    }))
}

/// How a bundle pinned in an external registry is listed (recorded when a rollout names it, at `now`).
pub fn pinned_external(pinned: &Pinned, now: UnixMs) -> proto::Bundle {
    let (variants, total_size) = summarize(&pinned.manifest).unwrap_or_default();
    let tag = &pinned.bundle.tag;
    proto::Bundle {
        registry: pinned.bundle.registry.clone(),
        repository: pinned.bundle.repository.clone(),
        digest: pinned.bundle.digest.clone(),
        tags: if tag.is_empty() { Vec::new() } else { vec![tag.clone()] },
        media_type: pinned.manifest.media_type().to_owned(),
        total_size,
        pushed_unix_ms: now.as_millis(),
        variants,
        signatures: Vec::new(),
    }
}

/// What ListBundles shows of one digest's signatures.
pub fn signature_infos(digest: &Digest, layers: &[SignatureLayer], keys: &[PublicKey]) -> Vec<proto::SignatureInfo> {
    signing::check_each(digest, layers, keys)
        .into_iter()
        .map(|c| proto::SignatureInfo {
            signed_digest: if c.signed_digest.is_empty() { digest.to_string() } else { c.signed_digest },
            key_fingerprint: c.key_fingerprint.unwrap_or_default(),
            verified: c.verified,
            problem: c.problem.unwrap_or_default(),
        })
        .collect()
}

/// The bundles of external registries the controller has pinned for rollouts, in `repository` if given.
fn external(store: &Store, repository: Option<&str>) -> Result<Vec<proto::Bundle>, StoreError> {
    let mut bundles = store.external_bundles()?;
    if let Some(wanted) = repository {
        bundles.retain(|b| b.repository == wanted || format!("{}/{}", b.registry, b.repository) == wanted);
    }
    bundles.sort_by(|a, b| {
        (&a.registry, &a.repository, b.pushed_unix_ms).cmp(&(&b.registry, &b.repository, a.pushed_unix_ms))
    });
    Ok(bundles)
}

/// Bundles are the model manifests and indexes in the registry (signatures and other artifacts are not).
/// Variant manifests listed by an index are shown inside it, not on their own.
fn embedded(registry: &Registry, entries: &[ManifestEntry], keys: &[PublicKey]) -> Vec<proto::Bundle> {
    let mut in_index = HashSet::new();
    let mut bundles = Vec::new();
    for entry in entries {
        let Ok(Some(stored)) = registry.resolve(&entry.repository, entry.digest.as_str()) else { continue };
        let Ok(manifest) = Manifest::parse(&stored.bytes, Some(&stored.media_type)) else { continue };
        if let Manifest::Index(index) = &manifest {
            in_index.extend(index.manifests.iter().map(|d| (entry.repository.clone(), d.digest.clone())));
        }
        let Some((variants, total_size)) = summarize(&manifest) else { continue };
        let signatures = crate::trust::embedded_signatures(registry, &entry.repository, &entry.digest);
        bundles.push(proto::Bundle {
            repository: entry.repository.clone(),
            digest: entry.digest.to_string(),
            tags: entry.tags.clone(),
            media_type: entry.media_type.clone(),
            total_size,
            pushed_unix_ms: entry.pushed_unix_ms,
            signatures: signature_infos(&entry.digest, &signatures, keys),
            variants,
            registry: String::new(),
        });
    }
    bundles.retain(|b| !b.digest.parse().is_ok_and(|d: Digest| in_index.contains(&(b.repository.clone(), d))));
    bundles.sort_by(|a, b| (&a.repository, b.pushed_unix_ms).cmp(&(&b.repository, a.pushed_unix_ms)));
    bundles
}
