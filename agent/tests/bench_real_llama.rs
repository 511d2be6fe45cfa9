//! The benchmark and telemetry paths with the real llama-server (built by e2e/scripts/build-llama-server.sh)
//! and a tiny generated model: the serving instance benchmarked through its loopback port, `alki-agent bench
//! --model`'s library path, and telemetry rates from llama-server's real `/metrics`. Figures are printed for
//! the report; the assertions are about shape, not speed (the machine is shared).

mod common;

use std::path::Path;
use std::time::Duration;

use alki_agent::bench::{self, Identity};
use alki_agent::metrics::{AgentMetrics, TelemetryCollector};
use alki_agent::runtime::{InstanceOptions, Proxy, StopPolicy, Supervisor, http_client};
use alki_agent::state::Snapshot;
use alki_e2e::tiny_model::{self, TinyModelOptions};
use alki_shared::proto::{self, BenchmarkTrigger};
use common::launch_settings;

/// A real model load on 2 shared cores takes seconds; the whole test stays bounded.
const REAL_TIMEOUT: Duration = Duration::from_secs(240);

fn write_model(dir: &Path, name: &str, seed: u64) -> std::path::PathBuf {
    let vocab = tiny_model::cached_vocab_path().expect("the llama-server build caches the vocab file");
    let tokenizer = tiny_model::read_tokenizer(&vocab).expect("tokenizer");
    let path = dir.join(format!("{name}.gguf"));
    tiny_model::write_tiny_model(&path, &TinyModelOptions { name: name.to_owned(), seed }, &tokenizer).expect("model");
    path
}

fn check(result: &proto::BenchmarkResult, repetitions: u32) {
    assert!(result.error.is_empty(), "{}", result.error);
    assert_eq!(result.repetitions, repetitions);
    assert_eq!(result.prompt_set, bench::PROMPT_SET);
    for (name, stat) in [
        ("ttft", &result.ttft_ms),
        ("prompt", &result.prompt_tokens_per_second),
        ("generation", &result.generation_tokens_per_second),
    ] {
        let s = stat.as_ref().unwrap_or_else(|| panic!("{name} measured"));
        assert_eq!(s.samples, repetitions, "{name}");
        assert!(s.median > 0.0 && s.min <= s.median && s.median <= s.max, "{name}: {s:?}");
    }
    assert!(result.load_ms > 0.0);
    assert!(result.peak_rss_bytes > 8 << 20, "llama-server holds the model and its context: {}", result.peak_rss_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiny_model_is_benchmarked_and_measured_with_the_real_llama_server() {
    let bin_dir = match alki_e2e::harness::llama_bin_dir() {
        Ok(dir) => dir,
        Err(e) => {
            // Marked slow: it needs the cached llama.cpp build; e2e/scripts/test.sh builds it first.
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    tokio::time::timeout(REAL_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = write_model(dir.path(), "tiny-bench", 7);
        let opts = InstanceOptions {
            llama_server: bin_dir.join("llama-server"),
            extra_args: vec![],
            launcher: Vec::new(),
            log_dir: dir.path().join("logs"),
            health_timeout: Duration::from_secs(120),
            stop: StopPolicy::default(),
        };
        let proxy = Proxy::new(http_client());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front = listener.local_addr().expect("addr");
        let router = proxy.router();
        tokio::spawn(async move { axum::serve(listener, router).await.expect("front") });
        let mut supervisor = Supervisor::new(opts, Duration::from_secs(30), proxy.clone());
        let spec = alki_agent::runtime::LaunchSpec {
            model_path: model.clone(),
            settings: launch_settings(),
            bundle_digest: "sha256:tiny".to_owned(),
        };
        supervisor.swap(spec).await.expect("llama-server starts");

        // The serving instance, benchmarked through its loopback port.
        let identity = Identity { device_id: "bench-host".into(), hardware_class: "test".into() };
        let snapshot = Snapshot {
            running: Some(proto::BundleRef { digest: "sha256:tiny".into(), ..Default::default() }),
            variant_digest: "sha256:tiny-variant".into(),
            model_path: Some(model.clone()),
            ..Default::default()
        };
        let http = http_client();
        let result = bench::benchmark_serving(&proxy, &http, &identity, &snapshot, BenchmarkTrigger::OnDemand, 5).await;
        check(&result, 5);
        assert_eq!(result.variant_digest, "sha256:tiny-variant");
        assert_eq!(result.variant_name, "F16", "read from the GGUF's general.file_type");
        eprintln!("tiny model, served instance, 5 repetitions:\n{}", bench::table(&result));
        assert_eq!(proxy.stats().map(|s| s.requests_total), Some(0), "the benchmark bypasses the serving counters");

        // Telemetry from llama-server's real /metrics: two requests through the front port, one streamed.
        let mut collector = TelemetryCollector::new(http_client());
        let metrics = AgentMetrics::default();
        collector.collect(&proxy, &snapshot, &metrics, Duration::from_secs(30)).await;
        let client = reqwest::Client::new();
        for stream in [false, true] {
            let response = client
                .post(format!("http://{front}/completion"))
                .json(&serde_json::json!({"prompt": "Hello there", "n_predict": 16, "stream": stream}))
                .send()
                .await
                .expect("completion");
            assert_eq!(response.status(), 200);
            response.bytes().await.expect("body");
        }
        let t = collector.collect(&proxy, &snapshot, &metrics, Duration::from_secs(30)).await;
        assert_eq!(t.requests_total, 2);
        assert!(t.generated_tokens_total >= 32, "{}", t.generated_tokens_total);
        assert!(t.generation_tokens_per_second > 0.0 && t.prompt_tokens_per_second > 0.0, "{t:?}");
        assert!(t.ttft_ms > 0.0, "the streamed request's time to first token");
        assert_eq!(t.latency_buckets.last().map(|b| b.count), Some(2));
        eprintln!(
            "telemetry: generation {:.0} tok/s, prompt {:.0} tok/s, ttft {:.1} ms",
            t.generation_tokens_per_second, t.prompt_tokens_per_second, t.ttft_ms
        );
        supervisor.shutdown().await;

        // `alki-agent bench --model FILE`: a llama-server of its own, stopped afterwards.
        let data_dir = dir.path().join("data");
        let config = alki_agent::Config::from_toml(&format!(
            r#"
data_dir = {data_dir:?}
[controller]
url = "http://127.0.0.1:1"
token_file = "/dev/null"
insecure_plaintext = true
[runtime]
llama_server = {llama:?}
"#,
            llama = bin_dir.join("llama-server"),
        ))
        .expect("config");
        let result = bench::run_cli(&config, Some(&model), 3).await.expect("bench runs");
        check(&result, 3);
        assert_eq!(bench::ResultsFile::new(&data_dir).load().len(), 1, "stored in the data directory");
        eprintln!("tiny model, `alki-agent bench --model`, 3 repetitions:\n{}", bench::table(&result));
    })
    .await
    .expect("test timed out");
}

/// CPU and memory cost of building telemetry (run with `--ignored --nocapture`; prints figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: prints the agent's cost of telemetry"]
async fn telemetry_cost() {
    let Ok(bin_dir) = alki_e2e::harness::llama_bin_dir() else {
        eprintln!("SKIPPED: no llama-server build");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_model(dir.path(), "tiny-cost", 9);
    let opts = InstanceOptions {
        llama_server: bin_dir.join("llama-server"),
        extra_args: vec![],
        launcher: Vec::new(),
        log_dir: dir.path().join("logs"),
        health_timeout: Duration::from_secs(120),
        stop: StopPolicy::default(),
    };
    let proxy = Proxy::new(http_client());
    let mut supervisor = Supervisor::new(opts, Duration::from_secs(30), proxy.clone());
    let spec = alki_agent::runtime::LaunchSpec {
        model_path: model,
        settings: launch_settings(),
        bundle_digest: "sha256:t".into(),
    };
    supervisor.swap(spec).await.expect("starts");
    let mut collector = TelemetryCollector::new(http_client());
    let metrics = AgentMetrics::default();
    let snapshot = Snapshot::default();
    let cpu = || {
        // SAFETY: getrusage writes into the struct we pass and has no other effect.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        usage.ru_utime.tv_sec as f64
            + usage.ru_utime.tv_usec as f64 / 1e6
            + usage.ru_stime.tv_sec as f64
            + usage.ru_stime.tv_usec as f64 / 1e6
    };
    let rss = || {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
            .unwrap_or_default()
    };
    for _ in 0..20 {
        collector.collect(&proxy, &snapshot, &metrics, Duration::from_secs(30)).await;
    }
    let (rss_before, cpu_before, wall) = (rss(), cpu(), std::time::Instant::now());
    const N: u32 = 1000;
    for _ in 0..N {
        collector.collect(&proxy, &snapshot, &metrics, Duration::from_secs(30)).await;
    }
    let per_call = (cpu() - cpu_before) / f64::from(N);
    eprintln!(
        "telemetry: {:.0} µs CPU per report (wall {:.0} µs), {:.5}% of one core at the default 30 s interval, \
         {:.4}% at 1 s; RSS {} before, {} after {N} reports",
        per_call * 1e6,
        wall.elapsed().as_secs_f64() * 1e6 / f64::from(N),
        per_call / 30.0 * 100.0,
        per_call * 100.0,
        rss_before.trim(),
        rss().trim()
    );
    supervisor.shutdown().await;
}
