//! Helpers shared by the agent's integration tests: the fake llama-server, fake model files, a front proxy.

#![allow(dead_code)]

pub mod controller;
pub mod registry;
pub mod running;
pub mod staged;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alki_agent::runtime::{InstanceOptions, LaunchSpec, Proxy, StopPolicy, Supervisor, http_client};
use alki_agent::settings::LaunchSettings;

/// Every test is bounded by this.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `<target>/debug/fake-llama-server`, found from this test binary's path (`<target>/debug/deps/...`).
pub fn fake_llama_server() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let debug = exe.parent().and_then(Path::parent).expect("test binaries live in <target>/debug/deps");
    let path = debug.join("fake-llama-server");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p alki-e2e --bin fake-llama-server` first",
        path.display()
    );
    path
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

pub fn spec(model: &Path, bundle: &str) -> LaunchSpec {
    LaunchSpec { model_path: model.to_owned(), settings: launch_settings(), bundle_digest: bundle.to_owned() }
}

pub fn options(log_dir: &Path, stop: StopPolicy) -> InstanceOptions {
    InstanceOptions {
        llama_server: fake_llama_server(),
        extra_args: vec!["--jinja".to_owned()],
        launcher: Vec::new(),
        log_dir: log_dir.to_owned(),
        health_timeout: Duration::from_secs(15),
        stop,
    }
}

/// A front proxy on 127.0.0.1:0 and a supervisor behind it.
pub struct Front {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub supervisor: Supervisor,
    pub server: tokio::task::JoinHandle<()>,
}

pub async fn front(log_dir: &Path, stop: StopPolicy, drain: Duration) -> Front {
    let proxy = Proxy::new(http_client());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind front");
    let addr = listener.local_addr().expect("front addr");
    let router = proxy.router();
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("front server");
    });
    let supervisor = Supervisor::new(options(log_dir, stop), drain, proxy.clone());
    Front { addr, proxy, supervisor, server }
}

/// POSTs a small completion through `front` and returns (status, content).
pub async fn complete(client: &reqwest::Client, front: SocketAddr, n_predict: u32) -> Result<(u16, String), String> {
    let response = client
        .post(format!("http://{front}/completion"))
        .json(&serde_json::json!({"prompt": "Hi", "n_predict": n_predict}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    Ok((status, body.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_owned()))
}

/// True while a process with this pid exists (and has not been reaped).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `condition` every 20 ms until it holds; the caller bounds the wait with a timeout.
pub async fn until(mut condition: impl FnMut() -> bool) {
    while !condition() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `<dir>/trust.toml` letting unsigned bundles through, for tests whose scripted controller hands out
/// unsigned bundles (signatures are covered by tests/trust.rs and the end-to-end tests); returns its path.
pub fn unsigned_trust_policy(dir: &Path) -> PathBuf {
    let path = dir.join("trust.toml");
    std::fs::write(&path, "[[repository]]\npattern = \"*\"\nrequired = false\n").expect("trust policy");
    path
}
