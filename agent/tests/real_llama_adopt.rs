//! Adoption with a real llama-server (built by e2e/scripts/build-llama-server.sh) and a tiny generated model:
//! a supervisor hands its llama-server over (as the agent does on SIGUSR2), a new supervisor reading the same
//! record adopts that very process after proving it (health, /slots, a smoke completion), serves through it
//! without a restart, sees it through a pidfd (it is not the new supervisor's child), and stops it safely.

mod common;

use std::time::Duration;

use alki_agent::runtime::record::process_identity;
use alki_agent::runtime::{InstanceOptions, LaunchSpec, Proxy, Recorder, StopPolicy, Supervisor, http_client};
use alki_e2e::tiny_model::{self, TinyModelOptions};
use common::launch_settings;

const REAL_TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_server_handed_over_is_adopted_by_the_next_supervisor_without_a_restart() {
    let bin_dir = match alki_e2e::harness::llama_bin_dir() {
        Ok(dir) => dir,
        Err(e) => {
            // Needs the cached llama.cpp build; e2e/scripts/test.sh builds it first.
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    tokio::time::timeout(REAL_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let vocab = tiny_model::cached_vocab_path().expect("the llama-server build caches the vocab file");
        let tokenizer = tiny_model::read_tokenizer(&vocab).expect("tokenizer");
        let model = dir.path().join("tiny-a.gguf");
        let options = TinyModelOptions { name: "tiny-a".to_owned(), seed: 1 };
        tiny_model::write_tiny_model(&model, &options, &tokenizer).expect("model");
        let opts = InstanceOptions {
            llama_server: bin_dir.join("llama-server"),
            extra_args: vec![],
            launcher: Vec::new(),
            log_dir: dir.path().join("logs"),
            health_timeout: Duration::from_secs(120),
            stop: StopPolicy::default(),
        };
        let spec = LaunchSpec { model_path: model, settings: launch_settings(), bundle_digest: "sha256:a".to_owned() };
        let front = |proxy: std::sync::Arc<Proxy>| async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let router = proxy.router();
            tokio::spawn(async move { axum::serve(listener, router).await.expect("front") });
            addr
        };

        // The first "agent": starts llama-server (recorded, detached) and hands it over.
        let proxy = Proxy::new(http_client());
        let addr = front(proxy.clone()).await;
        let mut first = Supervisor::new(opts.clone(), Duration::from_secs(10), proxy);
        first.set_recorder(Recorder::open(dir.path()));
        first.swap(spec.clone()).await.expect("llama-server starts");
        let pid = first.active_pid().expect("pid");
        let started = process_identity(pid).expect("runs").start_time;
        let (status, _) = common::complete(&reqwest::Client::new(), addr, 4).await.expect("served");
        assert_eq!(status, 200);
        assert_eq!(first.hand_over().await, Some(pid));
        drop(first);
        assert_eq!(process_identity(pid).map(|id| id.start_time), Some(started), "it keeps running");

        // The next "agent": adopts the same process.
        let proxy = Proxy::new(http_client());
        let addr = front(proxy.clone()).await;
        let mut next = Supervisor::new(opts, Duration::from_secs(10), proxy);
        next.set_recorder(Recorder::open(dir.path()));
        assert_eq!(next.adopt(Some(&spec)).await, Some(pid), "adopted, not restarted");
        assert_eq!(next.active_pid(), Some(pid));
        let response = reqwest::Client::new()
            .post(format!("http://{addr}/completion"))
            .json(&serde_json::json!({"prompt": "Hello", "n_predict": 8}))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("json");
        assert!(body["tokens_predicted"].as_u64().unwrap_or(0) > 0, "it generates: {body}");
        next.check_active().await.expect("live");

        next.shutdown().await;
        assert!(process_identity(pid).is_none(), "the adopted llama-server was stopped");
        assert!(Recorder::open(dir.path()).processes().is_empty(), "nothing left in the record");
    })
    .await
    .expect("test timed out");
}
