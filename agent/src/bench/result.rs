//! Benchmark results: what was benchmarked ([`Subject`]) on which llama-server ([`Target`]), measured and
//! turned into the `BenchmarkResult` the controller receives (a failure is a result with `error` set), for a
//! loopback instance of its own or for what the front proxy serves now.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::proto;
use tracing::Instrument;

use super::measure::{BENCH_TIMEOUT, DEFAULT_REPETITIONS, MAX_REPETITIONS, Measurement, PROMPT_SET, measure, peak_rss};
use crate::runtime::{HttpClient, Instance, Proxy, Upstream};
use crate::state::Snapshot;

/// What was benchmarked, for the result.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    pub bundle: Option<proto::BundleRef>,
    pub variant_digest: String,
    /// Quantization, e.g. "Q4_K_M"; read from the GGUF file when not known otherwise.
    pub variant_name: String,
    pub model_path: Option<PathBuf>,
}

impl Subject {
    /// What `upstream` serves, described with the device loop's snapshot when they agree (the snapshot may
    /// lag a swap by a moment; then only the bundle digest is known).
    pub fn serving(upstream: &Upstream, snapshot: &Snapshot) -> Subject {
        let same = snapshot.running.as_ref().is_some_and(|r| r.digest == upstream.bundle_digest());
        if !same {
            let bundle = proto::BundleRef { digest: upstream.bundle_digest().to_owned(), ..Default::default() };
            return Subject { bundle: Some(bundle), ..Default::default() };
        }
        Subject {
            bundle: snapshot.running.clone(),
            variant_digest: snapshot.variant_digest.clone(),
            variant_name: String::new(),
            model_path: snapshot.model_path.clone(),
        }
    }
}

/// Who the results belong to.
#[derive(Clone, Debug)]
pub struct Identity {
    pub device_id: String,
    pub hardware_class: String,
}

/// The llama-server a benchmark runs against: its loopback address, its process (for peak RSS) and how long
/// it took to load.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub load_time: Option<Duration>,
}

impl Target {
    pub fn instance(instance: &Instance) -> Target {
        Target { addr: instance.addr(), pid: instance.pid(), load_time: instance.load_time() }
    }

    pub fn upstream(upstream: &Upstream) -> Target {
        let info = upstream.info();
        Target { addr: upstream.addr(), pid: info.pid, load_time: info.load_time }
    }
}

/// The quantization named in a GGUF file's metadata, or empty.
pub async fn quantization_of(model: &Path) -> String {
    let model = model.to_owned();
    tokio::task::spawn_blocking(move || {
        alki_shared::gguf::read_file(&model).ok().and_then(|g| g.info().quantization).unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// Benchmarks `target` and builds the result; a failure is a result with `error` set.
pub async fn benchmark_instance(
    http: &HttpClient,
    identity: &Identity,
    subject: &Subject,
    target: Target,
    trigger: proto::BenchmarkTrigger,
    repetitions: u32,
) -> proto::BenchmarkResult {
    let repetitions = if repetitions == 0 { DEFAULT_REPETITIONS } else { repetitions.min(MAX_REPETITIONS) };
    let variant_name = match (&subject.variant_name, &subject.model_path) {
        (name, Some(path)) if name.is_empty() => quantization_of(path).await,
        (name, _) => name.clone(),
    };
    let mut result = proto::BenchmarkResult {
        bundle: subject.bundle.clone(),
        variant_digest: subject.variant_digest.clone(),
        variant_name,
        load_ms: target.load_time.map(|d| d.as_secs_f64() * 1000.0).unwrap_or_default(),
        ..failed(identity, trigger, String::new())
    };
    let span = tracing::info_span!("benchmark", variant = %subject.variant_digest, trigger = trigger.as_str_name());
    let measured = measure(http, target.addr, repetitions, BENCH_TIMEOUT, Path::new("/")).instrument(span).await;
    match measured {
        Ok(m) => {
            let peak_rss = match target.pid {
                Some(pid) => peak_rss(pid).await.unwrap_or_default(),
                None => 0,
            };
            record(&mut result, m, peak_rss);
        }
        Err(e) => {
            tracing::warn!(error = %e, "Benchmark failed.");
            result.error = e;
        }
    }
    result
}

/// Puts what was measured into `result`.
fn record(result: &mut proto::BenchmarkResult, m: Measurement, peak_rss: u64) {
    result.repetitions = m.repetitions;
    result.ttft_ms = Some(m.ttft_ms);
    result.prompt_tokens_per_second = Some(m.prompt_tokens_per_second);
    result.generation_tokens_per_second = Some(m.generation_tokens_per_second);
    result.throttled = m.throttled;
    result.peak_rss_bytes = peak_rss;
    tracing::info!(
        generation_tps = result.generation_tokens_per_second.as_ref().map(|s| s.median).unwrap_or_default(),
        prompt_tps = result.prompt_tokens_per_second.as_ref().map(|s| s.median).unwrap_or_default(),
        ttft_ms = result.ttft_ms.as_ref().map(|s| s.median).unwrap_or_default(),
        peak_rss = result.peak_rss_bytes,
        throttled = result.throttled,
        "Benchmark finished."
    );
}

/// Benchmarks what the front proxy serves now, directly on its loopback port (a [`crate::runtime::Lease`]
/// keeps a swap from stopping it meanwhile; the requests do not count in the serving counters).
pub async fn benchmark_serving(
    proxy: &Proxy,
    http: &HttpClient,
    identity: &Identity,
    snapshot: &Snapshot,
    trigger: proto::BenchmarkTrigger,
    repetitions: u32,
) -> proto::BenchmarkResult {
    let Some(lease) = proxy.lease() else {
        return failed(identity, trigger, "no model is served on this device; activate a bundle first".to_owned());
    };
    let upstream = lease.upstream().clone();
    let subject = Subject::serving(&upstream, snapshot);
    let result = benchmark_instance(http, identity, &subject, Target::upstream(&upstream), trigger, repetitions).await;
    drop(lease);
    result
}

/// A result saying the benchmark could not run.
pub fn failed(identity: &Identity, trigger: proto::BenchmarkTrigger, error: String) -> proto::BenchmarkResult {
    proto::BenchmarkResult {
        device_id: identity.device_id.clone(),
        hardware_class: identity.hardware_class.clone(),
        trigger: trigger as i32,
        at_unix_ms: UnixMs::now().as_millis(),
        prompt_set: PROMPT_SET.to_owned(),
        error,
        ..Default::default()
    }
}
