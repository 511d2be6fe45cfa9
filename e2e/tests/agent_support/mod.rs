//! Helpers for the end-to-end tests that run an agent in-process (offline reports, pre-staging, trust):
//! the fake llama-server binary, fake model files, a data directory already serving one, launch settings and
//! a permissive trust policy.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_agent::settings::LaunchSettings;

/// Every test is bounded by this.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `<target>/debug/fake-llama-server`; `cargo build --workspace --bins` makes it.
pub fn fake_llama_server() -> PathBuf {
    alki_e2e::harness::binary("fake-llama-server").unwrap_or_else(|e| panic!("{e:#}"))
}

/// A fake model file; `knobs` are `KEY=VALUE` lines the fake llama-server reads from it.
pub fn fake_model(dir: &Path, name: &str, knobs: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut text = String::from("FAKE-GGUF\n");
    for knob in knobs {
        text.push_str(knob);
        text.push('\n');
    }
    std::fs::write(&path, text).expect("write fake model");
    path
}

pub fn launch_settings() -> LaunchSettings {
    LaunchSettings {
        context_size: 512,
        threads: 0,
        gpu_layers: 0,
        parallel_slots: 2,
        chat_template: None,
        llama_server: None,
        runtime_platform: None,
    }
}

/// `<dir>/agent-data` with a state file saying `device_id` serves a fake model (with `knobs`) of acme/tiny:v1,
/// so an agent started on it serves at once, with or without a controller.
pub fn serving_data_dir(dir: &Path, device_id: &str, knobs: &[&str]) -> PathBuf {
    use alki_agent::state::{AgentState, Deployment, StateFile};
    use alki_shared::digest::Digest;
    use alki_shared::ids::{DeviceId, Generation};
    let data_dir = dir.join("agent-data");
    let variant = Digest::of(format!("{device_id} variant").as_bytes());
    let model_dir = data_dir.join("bundles").join(variant.hex());
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    let model = fake_model(&model_dir, "model.gguf", knobs);
    let mut state = AgentState::new(DeviceId::new(device_id).expect("id"));
    state.active = Some(Deployment {
        bundle: alki_agent::reference::BundleLocation {
            registry: String::new(),
            repository: "acme/tiny".to_owned(),
            digest: Digest::of(format!("{device_id} bundle").as_bytes()),
            tag: "v1".to_owned(),
        },
        variant_digest: variant,
        model_files: vec![model],
        overrides: alki_agent::settings::RuntimeOverrides::default(),
        launch: launch_settings(),
        generation: Generation(1),
    });
    state.last_applied_generation = Generation(1);
    StateFile::new(&data_dir).save(&state).expect("save state");
    data_dir
}

/// Writes `<dir>/trust.toml` letting unsigned bundles through, for tests whose bundles are not signed
/// (signatures are covered by trust.rs); returns its path.
pub fn unsigned_trust_policy(dir: &Path) -> PathBuf {
    let path = dir.join("trust.toml");
    std::fs::write(&path, "[[repository]]\npattern = \"*\"\nrequired = false\n").expect("trust policy");
    path
}

/// The next message up the session that `wanted` accepts; the session must still be open.
pub async fn next_where(
    up: &mut tokio::sync::mpsc::Receiver<alki_shared::proto::AgentMessage>,
    wanted: impl FnMut(&alki_shared::proto::agent_message::Msg) -> bool,
) -> alki_shared::proto::agent_message::Msg {
    alki_e2e::fake_controller::next_where(up, wanted).await.expect("agent stream open")
}
