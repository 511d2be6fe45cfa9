//! A device with models already on it: deployments and one-variant bundles of fake models written straight
//! into the agent's data dir, so a test starts from "A serves" without a registry.

use std::path::Path;

use alki_agent::reference::BundleLocation;
use alki_agent::settings::RuntimeOverrides;
use alki_agent::state::{AgentState, Deployment, StateFile};
use alki_agent::store::ContentStore;
use alki_shared::bundle::MEDIA_TYPE_WEIGHT_RAW;
use alki_shared::digest::Digest;
use alki_shared::ids::{DeviceId, Generation};
use alki_shared::oci::{ANNOTATION_TITLE, Descriptor, ImageManifest, MEDIA_TYPE_EMPTY, MEDIA_TYPE_IMAGE_MANIFEST};

use super::{fake_model, launch_settings};

/// A bundle reference on a registry nobody answers on: activations must work from the content store alone.
pub fn location(digest: Digest) -> BundleLocation {
    BundleLocation {
        registry: "127.0.0.1:1".to_owned(),
        repository: "acme/tiny".to_owned(),
        digest,
        tag: String::new(),
    }
}

/// A deployment of a fake model (with fault `knobs`) materialised under the data dir.
pub fn deployment(data_dir: &Path, name: &str, knobs: &[&str], generation: u64) -> Deployment {
    let variant = Digest::of(name.as_bytes());
    let model_dir = data_dir.join("bundles").join(variant.hex());
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    let model = fake_model(&model_dir, &format!("{name}.gguf"), knobs);
    Deployment {
        bundle: location(Digest::of(format!("bundle {name}").as_bytes())),
        variant_digest: variant,
        model_files: vec![model],
        overrides: RuntimeOverrides::default(),
        launch: launch_settings(),
        generation: Generation(generation),
    }
}

pub fn save_state(data_dir: &Path, active: Deployment, previous: Option<Deployment>) {
    let mut state = AgentState::new(DeviceId::new("pi-test").expect("id"));
    state.last_applied_generation = active.generation;
    state.active = Some(active);
    state.previous = previous;
    StateFile::new(data_dir).save(&state).expect("save state");
}

/// Puts a one-variant bundle holding a fake model into the agent's content store; returns its location.
pub async fn stage_bundle(data_dir: &Path, name: &str, knobs: &[&str]) -> BundleLocation {
    let store = ContentStore::open(&data_dir.join("content")).expect("store");
    let mut weights = String::from("FAKE-GGUF\n");
    for knob in knobs {
        weights.push_str(knob);
        weights.push('\n');
    }
    let gguf = Digest::of(weights.as_bytes());
    store.write_bytes(&gguf, weights.as_bytes()).await.expect("weights");
    let config = Digest::of(b"{}");
    store.write_bytes(&config, b"{}").await.expect("config");
    let mut layer = Descriptor::new(MEDIA_TYPE_WEIGHT_RAW, gguf, weights.len() as u64);
    layer.annotations.insert(ANNOTATION_TITLE.to_owned(), format!("{name}.gguf"));
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_IMAGE_MANIFEST.to_owned()),
        artifact_type: Some(alki_shared::bundle::ARTIFACT_TYPE_MODEL.to_owned()),
        config: Descriptor::new(MEDIA_TYPE_EMPTY, config, 2),
        layers: vec![layer],
        subject: None,
        annotations: Default::default(),
    };
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let digest = Digest::of(&bytes);
    store.write_bytes(&digest, &bytes).await.expect("manifest");
    location(digest)
}
