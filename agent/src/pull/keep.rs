//! What must stay on disk: the blobs a deployment needs to run and to be verified again without a registry
//! (its manifests, layers, recorded signature and the runtime build it names) and its variant directory;
//! pulls never evict them to make room, and the device loop's garbage collection keeps them.

use std::collections::HashSet;
use std::path::Path;

use alki_shared::bundle::parse_runtime_build;
use alki_shared::digest::Digest;
use alki_shared::oci::{ImageManifest, MAX_MANIFEST_BYTES, Manifest};

use super::bundle::stored_runtime_defaults;
use super::manifest::{read_small, stored_manifest};
use super::signature::signature_blobs;
use crate::state::{AgentState, StateFile};
use crate::store::ContentStore;

/// A deployment as far as the disk is concerned: its bundle and the variant chosen from it.
pub type DeploymentKey = (Digest, Digest);

/// Blobs and variant directories that must stay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    pub blobs: HashSet<Digest>,
    pub variants: Vec<Digest>,
}

/// What `deployments` need on disk.
pub async fn kept(store: &ContentStore, deployments: Vec<DeploymentKey>) -> Kept {
    let mut kept = Kept::default();
    for (bundle, variant) in deployments {
        kept.blobs.extend(deployment_blobs(store, &bundle, &variant).await);
        kept.variants.push(variant);
    }
    kept
}

/// The active and previous deployments of `state`.
pub fn deployments_of(state: &AgentState) -> Vec<DeploymentKey> {
    [&state.active, &state.previous]
        .into_iter()
        .flatten()
        .map(|d| (d.bundle.digest.clone(), d.variant_digest.clone()))
        .collect()
}

/// The active and previous deployments in the state file the device loop keeps (for the tasks beside it:
/// staging and calibration); none when it cannot be read.
pub async fn deployed(data_dir: &Path) -> Vec<DeploymentKey> {
    let state_file = StateFile::new(data_dir);
    let state = tokio::task::spawn_blocking(move || state_file.load()).await.ok().and_then(Result::ok).flatten();
    state.as_ref().map(deployments_of).unwrap_or_default()
}

/// The blobs a deployment needs: the bundle's manifest (or index), the variant manifest and every blob it
/// names, the runtime build it names, and the bundle's recorded signature manifest and payloads (to verify
/// it again without a registry), as far as they are in the store.
pub async fn deployment_blobs(store: &ContentStore, bundle: &Digest, variant: &Digest) -> HashSet<Digest> {
    let mut keep: HashSet<Digest> = [bundle.clone(), variant.clone()].into();
    if let Some(Manifest::Image(m)) = stored_manifest(store, variant).await {
        keep.extend(std::iter::once(&m.config).chain(&m.layers).map(|d| d.digest.clone()));
        keep.extend(build_blobs_named_by(store, &m).await);
    }
    keep.extend(signature_blobs(store, bundle).await);
    keep
}

/// The blobs of the runtime build a variant manifest's runtime layer names, as far as they are stored: the
/// index, every stored platform manifest and their config and layers.
pub async fn build_blobs_named_by(store: &ContentStore, variant: &ImageManifest) -> HashSet<Digest> {
    let mut keep = HashSet::new();
    let Some(defaults) = stored_runtime_defaults(store, variant).await else { return keep };
    let Some(Ok((_, _, index_digest))) = defaults.runtime_build.as_deref().map(parse_runtime_build) else {
        return keep;
    };
    let Some(bytes) = read_small(store, &index_digest, MAX_MANIFEST_BYTES as u64).await else { return keep };
    keep.insert(index_digest);
    let Ok(Manifest::Index(index)) = Manifest::parse(&bytes, None) else { return keep };
    for entry in &index.manifests {
        let Some(bytes) = read_small(store, &entry.digest, MAX_MANIFEST_BYTES as u64).await else { continue };
        keep.insert(entry.digest.clone());
        if let Ok(Manifest::Image(m)) = Manifest::parse(&bytes, None) {
            keep.extend(std::iter::once(&m.config).chain(&m.layers).map(|d| d.digest.clone()));
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::bundle::{
        ANNOTATION_ACCELERATOR, MEDIA_TYPE_RUNTIME_BUILD_CONFIG, MEDIA_TYPE_RUNTIME_BUILD_TAR, RuntimeDefaults,
    };
    use alki_shared::oci::{Descriptor, ImageIndex, MEDIA_TYPE_IMAGE_MANIFEST, Platform};

    fn entry(arch: &str) -> Descriptor {
        let mut d = Descriptor::new(MEDIA_TYPE_IMAGE_MANIFEST, Digest::of(format!("{arch}cpu").as_bytes()), 1);
        d.platform = Some(Platform { os: "linux".into(), architecture: arch.into(), variant: None });
        d.annotations.insert(ANNOTATION_ACCELERATOR.into(), "cpu".into());
        d
    }

    #[tokio::test]
    async fn a_deployment_keeps_the_blobs_of_the_build_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContentStore::open(&dir.path().join("content")).expect("store");
        let put = |bytes: Vec<u8>| {
            let store = store.clone();
            async move {
                let d = Digest::of(&bytes);
                store.write_bytes(&d, &bytes).await.expect("put");
                d
            }
        };
        let layer = put(b"tar bytes".to_vec()).await;
        let config = put(b"{}".to_vec()).await;
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            config: Descriptor::new(MEDIA_TYPE_RUNTIME_BUILD_CONFIG, config.clone(), 2),
            layers: vec![Descriptor::new(MEDIA_TYPE_RUNTIME_BUILD_TAR, layer.clone(), 9)],
            subject: None,
            annotations: Default::default(),
        };
        let manifest_digest = put(serde_json::to_vec(&manifest).expect("json")).await;
        let mut e = entry("amd64");
        e.digest = manifest_digest.clone();
        let index = ImageIndex {
            schema_version: 2,
            media_type: None,
            artifact_type: None,
            manifests: vec![e, entry("arm64")],
            subject: None,
            annotations: Default::default(),
        };
        let index_digest = put(serde_json::to_vec(&index).expect("json")).await;
        let runtime = RuntimeDefaults {
            runtime_build: Some(format!("reg:5000/acme/llama@{index_digest}")),
            ..RuntimeDefaults::default()
        };
        let runtime_bytes = serde_json::to_vec(&runtime).expect("json");
        let runtime_digest = put(runtime_bytes.clone()).await;
        let variant = ImageManifest {
            layers: vec![Descriptor::new(
                alki_shared::bundle::MEDIA_TYPE_RUNTIME,
                runtime_digest,
                runtime_bytes.len() as u64,
            )],
            ..manifest.clone()
        };
        let kept = build_blobs_named_by(&store, &variant).await;
        let expected: HashSet<Digest> = [index_digest, manifest_digest, config, layer].into();
        assert_eq!(kept, expected, "the arm64 entry is not stored and not named");
        assert!(build_blobs_named_by(&store, &ImageManifest { layers: vec![], ..manifest }).await.is_empty());
    }
}
