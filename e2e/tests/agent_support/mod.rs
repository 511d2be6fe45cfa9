//! Helpers for the end-to-end tests that run an agent in-process (offline reports, pre-staging, trust):
//! the fake llama-server binary, fake model files, launch settings and a permissive trust policy.

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
    }
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
