//! Swap-under-load benchmark with the real llama-server (the cached build from
//! e2e/scripts/build-llama-server.sh) and two tiny generated models, in one run:
//!  1. ours: the agent's front proxy and supervisor swap A → B blue/green while clients keep asking;
//!  2. llama-server's own router mode (`--models-dir`, `--models-max 1`): the clients switch from asking
//!     for A to asking for B, which makes the router unload A and load B.
//!
//! For each: requests failed (goal 0 for ours) and p99 latency of requests overlapping the swap against
//! the steady-state p99.
//!
//!   cargo run --release -p alki-agent --example bench-swap -- [--clients 3] [--steady 40]
//!
//! A command, not a test: it prints figures for the note.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use alki_agent::runtime::{InstanceOptions, LaunchSpec, Proxy, StopPolicy, Supervisor, SwapStrategy, http_client};
use alki_agent::settings::LaunchSettings;
use alki_e2e::tiny_model::{self, TinyModelOptions};
use anyhow::{Context as _, bail, ensure};
use tokio::sync::watch;
use tokio::time::Instant;

/// Which model the clients name in their requests (the router routes on it; our proxy ignores it).
type Asking = watch::Receiver<&'static str>;

#[derive(Default)]
struct Outcome {
    /// (start, latency) of each request answered 200 with a completion.
    ok: Vec<(Instant, Duration)>,
    failed: Vec<(Instant, String)>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let (mut clients, mut steady) = (3usize, 40usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--clients" => clients = value()?.parse().context("--clients takes a number")?,
            "--steady" => steady = value()?.parse().context("--steady takes a number")?,
            other => bail!("unknown argument {other:?}; use --clients N and --steady N"),
        }
    }
    let bin_dir = alki_e2e::harness::llama_bin_dir()?;
    let work = tempfile::tempdir()?;
    let models = work.path().join("models");
    std::fs::create_dir_all(&models)?;
    let model_a = write_model(&models, "tiny-a", 1)?;
    let model_b = write_model(&models, "tiny-b", 2)?;

    // 1. Ours.
    let opts = InstanceOptions {
        llama_server: bin_dir.join("llama-server"),
        extra_args: vec![],
        launcher: Vec::new(),
        log_dir: work.path().join("logs"),
        health_timeout: Duration::from_secs(120),
        stop: StopPolicy::default(),
    };
    let proxy = Proxy::new(http_client());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let front = listener.local_addr()?;
    let router = proxy.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut supervisor = Supervisor::new(opts, Duration::from_secs(30), proxy.clone());
    supervisor.swap(spec(&model_a, "sha256:a")).await.map_err(|e| anyhow::anyhow!("A did not start: {e}"))?;
    let (ask, asking) = watch::channel("tiny-a");
    let load = Load::start(front, clients, asking);
    let warm = load.warm_up(clients * 2).await;
    load.until_served(steady).await;
    let swap_started = Instant::now();
    supervisor
        .swap_watched(spec(&model_b, "sha256:b"), SwapStrategy::BlueGreen)
        .await
        .map_err(|e| anyhow::anyhow!("B did not start: {e}"))?;
    supervisor.commit();
    let swap_window = (swap_started, Instant::now());
    drop(ask);
    load.until_served(load.served() + steady).await;
    let ours = load.stop().await;
    supervisor.shutdown().await;
    report("agent blue/green", &ours, warm, swap_window);

    // 2. llama-server's router mode with one model at a time.
    let port = free_port()?;
    let mut router = tokio::process::Command::new(bin_dir.join("llama-server"))
        .arg("--models-dir")
        .arg(&models)
        .args(["--models-max", "1", "--host", "127.0.0.1", "--port", &port.to_string(), "-c", "512", "-np", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting llama-server in router mode")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (ask, asking) = watch::channel("tiny-a");
    let load = Load::start(addr, clients, asking);
    let warm = load.warm_up(clients * 2).await;
    load.until_served(steady).await;
    // The switch: from now on every client asks for B; the router must unload A to load B.
    let swap_started = Instant::now();
    let before = load.served_model("tiny-b");
    ask.send("tiny-b")?;
    load.until(|| load.served_model("tiny-b") > before).await;
    let swap_window = (swap_started, Instant::now());
    load.until_served(load.served() + steady).await;
    let theirs = load.stop().await;
    let _ = router.kill().await;
    report("llama-server router, --models-max 1", &theirs, warm, swap_window);
    ensure!(ours.failed.is_empty(), "our swap failed {} requests", ours.failed.len());
    Ok(())
}

fn write_model(dir: &Path, name: &str, seed: u64) -> anyhow::Result<PathBuf> {
    let vocab = tiny_model::cached_vocab_path().context("no cached vocab: run e2e/scripts/build-llama-server.sh")?;
    let tokenizer = tiny_model::read_tokenizer(&vocab)?;
    let path = dir.join(format!("{name}.gguf"));
    tiny_model::write_tiny_model(&path, &TinyModelOptions { name: name.to_owned(), seed }, &tokenizer)?;
    Ok(path)
}

fn spec(model: &Path, digest: &str) -> LaunchSpec {
    let settings = LaunchSettings {
        context_size: 512,
        threads: 0,
        gpu_layers: 0,
        parallel_slots: 2,
        chat_template: None,
        llama_server: None,
        runtime_platform: None,
    };
    LaunchSpec { model_path: model.to_owned(), settings, bundle_digest: digest.to_owned() }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Clients asking for chat completions in a loop until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    served_b: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<Outcome>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, asking: Asking) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (served, served_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let clients = (0..clients)
            .map(|_| {
                let (stop, served, served_b, asking) = (stop.clone(), served.clone(), served_b.clone(), asking.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut outcome = Outcome::default();
                    while !stop.load(Ordering::SeqCst) {
                        let model = *asking.borrow();
                        let started = Instant::now();
                        let body = serde_json::json!({
                            "model": model,
                            "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 8,
                        });
                        let response = client
                            .post(format!("http://{addr}/v1/chat/completions"))
                            .timeout(Duration::from_secs(120))
                            .json(&body)
                            .send()
                            .await;
                        let result = match response {
                            Ok(r) if r.status() == 200 => match r.json::<serde_json::Value>().await {
                                Ok(body) if body["choices"][0]["message"].is_object() => Ok(()),
                                other => Err(format!("bad body: {other:?}")),
                            },
                            Ok(r) => Err(format!("status {}", r.status())),
                            Err(e) => Err(e.to_string()),
                        };
                        match result {
                            Ok(()) => {
                                served.fetch_add(1, Ordering::SeqCst);
                                if model == "tiny-b" {
                                    served_b.fetch_add(1, Ordering::SeqCst);
                                }
                                outcome.ok.push((started, started.elapsed()));
                            }
                            Err(e) => {
                                outcome.failed.push((started, e));
                                // A refused connection returns at once; do not spin.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    outcome
                })
            })
            .collect();
        Load { stop, served, served_b, clients }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    fn served_model(&self, model: &str) -> usize {
        if model == "tiny-b" { self.served_b.load(Ordering::SeqCst) } else { self.served() }
    }

    /// Waits for `n` answers (the first model load and cold caches) and returns when measuring starts.
    async fn warm_up(&self, n: usize) -> Instant {
        self.until_served(n).await;
        Instant::now()
    }

    async fn until_served(&self, n: usize) {
        self.until(|| self.served() >= n).await;
    }

    async fn until(&self, done: impl Fn() -> bool) {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Outcome::default();
        for client in self.clients {
            if let Ok(outcome) = client.await {
                all.ok.extend(outcome.ok);
                all.failed.extend(outcome.failed);
            }
        }
        all
    }
}

fn report(name: &str, outcome: &Outcome, warm: Instant, (from, to): (Instant, Instant)) {
    let (mut steady, mut during): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for (started, took) in &outcome.ok {
        if *started < warm {
            continue;
        }
        if *started <= to && *started + *took >= from {
            during.push(*took);
        } else {
            steady.push(*took);
        }
    }
    let p99 = |v: &mut Vec<Duration>| {
        v.sort();
        v.get(((v.len() as f64 - 1.0) * 0.99).round() as usize).copied().unwrap_or_default()
    };
    let (steady_p99, during_p99) = (p99(&mut steady), p99(&mut during));
    println!(
        "{name}: swap took {:.2} s; {} requests failed ({}); steady p99 {:.0} ms over {} requests; p99 of the {} \
         requests overlapping the swap {:.0} ms ({:.1}x steady)",
        (to - from).as_secs_f64(),
        outcome.failed.len(),
        outcome.failed.first().map(|(_, e)| e.as_str()).unwrap_or("none"),
        steady_p99.as_secs_f64() * 1e3,
        steady.len(),
        during.len(),
        during_p99.as_secs_f64() * 1e3,
        during_p99.as_secs_f64() / steady_p99.as_secs_f64().max(1e-9),
    );
}
