//! Local benchmarks of a llama-server: a fixed, versioned prompt set sent repeatedly to an instance's loopback
//! port, measuring time to first token and prompt/generation tokens per second from llama-server's own
//! `timings`, with the instance's peak RSS and any throttling during the run; the statistics (median and
//! spread), the results file in the data directory, and the task that runs benchmarks one at a time (after
//! every activation, on a controller command, for calibration).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alki_shared::proto;
use axum::body::Body;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::runtime::{HttpClient, Proxy};
use crate::session::Snapshot;

/// Name and version of the prompt set: results compare only with results of the same set. Change the
/// version whenever the prompts or the request parameters change.
pub const PROMPT_SET: &str = "alki-prompts/v1";
/// The prompts: a short question, a paragraph to summarise and a longer instruction, so prompt processing
/// is measured over short and long inputs.
pub const PROMPTS: [&str; 3] = [
    "Explain in one sentence what a heat pump does.",
    "Summarise the following paragraph in two sentences. A fleet of small computers runs language models at \
     the edge of a network: in shops, on factory floors and in vehicles. Each device has its own memory, \
     processor and cooling, and each must keep answering while new models arrive. Operators want to know \
     which model and which quantization runs fastest on which hardware, and whether a new version is better \
     than the one it replaces, before it reaches every device.",
    "You are a maintenance assistant. A technician reports that a conveyor belt motor stops after running \
     for about twenty minutes and restarts after it cools down. List the three most likely causes, the \
     measurement that would confirm each one, and the safety precautions to take before opening the motor \
     housing. Answer as a numbered list.",
];
/// Tokens generated per prompt (`ignore_eos`, so always this many).
pub const N_PREDICT: u32 = 32;
const SEED: u64 = 42;
/// Repetitions of the prompt set when the command says 0.
pub const DEFAULT_REPETITIONS: u32 = 3;
pub const MAX_REPETITIONS: u32 = 20;
/// Bound on one benchmark (a slow device stops early and reports the repetitions it finished).
pub const BENCH_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on one request of the benchmark.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A streamed answer larger than this is not a benchmark answer.
const MAX_STREAM_BYTES: usize = 4 << 20;
/// Results kept in the results file (the newest win).
pub const RESULTS_KEPT: usize = 64;
/// Benchmark jobs waiting; more are refused (commands) or dropped (after an activation).
pub const JOB_QUEUE: usize = 4;
/// The results file in the data directory.
pub const RESULTS_FILE: &str = "benchmarks.json";
/// What the agent serves now, for `alki-agent bench` in another process.
pub const SERVING_FILE: &str = "serving.json";

// ---------------------------------------------------------------------------------------------------------
// Statistics (pure)

/// The median of `samples` (the mean of the middle two for an even count); None when empty.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 })
}

/// Median, range and sample standard deviation (n - 1) of repeated measurements; non-finite ones are ignored.
pub fn stat(samples: &[f64]) -> proto::Stat {
    let finite: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
    let Some(median) = median(&finite) else { return proto::Stat::default() };
    let n = finite.len() as f64;
    let mean = finite.iter().sum::<f64>() / n;
    let variance =
        if finite.len() > 1 { finite.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    proto::Stat {
        median,
        min: finite.iter().copied().fold(f64::INFINITY, f64::min),
        max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        stddev: variance.sqrt(),
        samples: u32::try_from(finite.len()).unwrap_or(u32::MAX),
    }
}

/// llama-server's `timings` object of a completion.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub prompt_n: f64,
    pub prompt_ms: f64,
    pub predicted_n: f64,
    pub predicted_ms: f64,
}

impl Timings {
    /// Reads `timings` leniently (every field optional); None without prompt or generation figures.
    pub fn from_json(v: &Value) -> Option<Timings> {
        let t = v.get("timings")?;
        let f = |k: &str| t.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        let timings = Timings {
            prompt_n: f("prompt_n"),
            prompt_ms: f("prompt_ms"),
            predicted_n: f("predicted_n"),
            predicted_ms: f("predicted_ms"),
        };
        (timings.prompt_n > 0.0 || timings.predicted_n > 0.0).then_some(timings)
    }
}

/// One request of the prompt set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Request sent to the first generated text received.
    pub ttft_ms: f64,
    pub timings: Timings,
}

/// The figures of one repetition of the prompt set: tokens over time summed across its prompts (so long
/// and short prompts weigh by their tokens), and the mean time to first token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RepetitionFigures {
    pub ttft_ms: f64,
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
}

pub fn repetition_figures(samples: &[Sample]) -> Option<RepetitionFigures> {
    if samples.is_empty() {
        return None;
    }
    let sum = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>();
    let per_second = |n: f64, ms: f64| if ms > 0.0 { n * 1000.0 / ms } else { f64::NAN };
    Some(RepetitionFigures {
        ttft_ms: sum(|s| s.ttft_ms) / samples.len() as f64,
        prompt_tokens_per_second: per_second(sum(|s| s.timings.prompt_n), sum(|s| s.timings.prompt_ms)),
        generation_tokens_per_second: per_second(sum(|s| s.timings.predicted_n), sum(|s| s.timings.predicted_ms)),
    })
}

/// Takes the complete server-sent events out of `buffer` and returns their `data:` JSON payloads.
pub fn drain_sse_events(buffer: &mut Vec<u8>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
        let event: Vec<u8> = buffer.drain(..end + 2).collect();
        for line in String::from_utf8_lossy(&event).lines() {
            if let Some(data) = line.strip_prefix("data:")
                && let Ok(json) = serde_json::from_str::<Value>(data.trim())
            {
                out.push(json);
            }
        }
    }
    out
}

/// Peak resident set (`VmHWM`) in bytes from a /proc/<pid>/status text.
pub fn vm_hwm(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix("VmHWM:")?;
        rest.split_whitespace().next()?.parse::<u64>().ok().map(|kib| kib.saturating_mul(1024))
    })
}

/// Peak RSS of a process so far; None when it is gone or not readable.
pub async fn peak_rss(pid: u32) -> Option<u64> {
    tokio::fs::read_to_string(format!("/proc/{pid}/status")).await.ok().and_then(|s| vm_hwm(&s))
}

// ---------------------------------------------------------------------------------------------------------
// Measuring an instance

/// What a benchmark run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measurement {
    /// Repetitions of the prompt set finished (fewer than asked when the time bound passed).
    pub repetitions: u32,
    pub ttft_ms: proto::Stat,
    pub prompt_tokens_per_second: proto::Stat,
    pub generation_tokens_per_second: proto::Stat,
    pub throttled: bool,
}

/// One streamed completion of `prompt`, timed.
async fn one_request(http: &HttpClient, addr: SocketAddr, prompt: &str, timeout: Duration) -> Result<Sample, String> {
    let body = serde_json::json!({
        "prompt": prompt,
        "n_predict": N_PREDICT,
        "temperature": 0.0,
        "seed": SEED,
        // Without this, a repeated prompt is served from the slot's cache and prompt processing is not measured.
        "cache_prompt": false,
        "ignore_eos": true,
        "stream": true,
    });
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/completion"))
        .header(http::header::CONTENT_TYPE, "application/json")
        // A fresh connection per request: llama-server may close one after a streamed answer, and a pooled
        // connection closed under us would fail the next request.
        .header(http::header::CONNECTION, "close")
        .body(Body::from(body.to_string()))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let started = Instant::now();
        let response = http.request(request).await.map_err(|e| format!("/completion: {e}"))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes =
                http_body_util::Limited::new(body, 4096).collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            return Err(format!("/completion answered {status}: {}", String::from_utf8_lossy(&bytes)));
        }
        let (mut buffer, mut seen, mut ttft, mut timings) = (Vec::new(), 0usize, None, None);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("/completion stream: {e}"))?;
            let Ok(data) = frame.into_data() else { continue };
            seen += data.len();
            if seen > MAX_STREAM_BYTES {
                return Err(format!("/completion streamed more than {MAX_STREAM_BYTES} bytes"));
            }
            buffer.extend_from_slice(&data);
            for event in drain_sse_events(&mut buffer) {
                let has_text = event.get("content").and_then(Value::as_str).is_some_and(|c| !c.is_empty());
                if ttft.is_none() && has_text {
                    ttft = Some(started.elapsed());
                }
                if let Some(t) = Timings::from_json(&event) {
                    timings = Some(t);
                }
            }
        }
        let timings = timings.ok_or("the streamed completion carried no `timings`")?;
        let ttft_ms = match ttft {
            Some(t) => t.as_secs_f64() * 1000.0,
            // No text seen (all tokens empty): the server's own figure for the first token.
            None => timings.prompt_ms + timings.predicted_ms / timings.predicted_n.max(1.0),
        };
        Ok(Sample { ttft_ms, timings })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("/completion did not finish within {timeout:?}"))?
}

async fn throttle_sample(root: &Path) -> crate::inventory::ThrottleSample {
    let root = root.to_owned();
    tokio::task::spawn_blocking(move || crate::inventory::read_throttle(&root)).await.unwrap_or_default()
}

/// Runs the prompt set `repetitions` times against the instance at `addr` (after one warm-up request),
/// within `bound`; throttling is read from the platform files under `throttle_root` around every repetition.
pub async fn measure(
    http: &HttpClient,
    addr: SocketAddr,
    repetitions: u32,
    bound: Duration,
    throttle_root: &Path,
) -> Result<Measurement, String> {
    let deadline = Instant::now() + bound;
    let remaining = || deadline.saturating_duration_since(Instant::now()).min(REQUEST_TIMEOUT);
    one_request(http, addr, PROMPTS[0], remaining()).await.map_err(|e| format!("the warm-up request failed: {e}"))?;
    let mut figures = Vec::new();
    let mut throttled = false;
    'reps: for _ in 0..repetitions.clamp(1, MAX_REPETITIONS) {
        let before = throttle_sample(throttle_root).await;
        let mut samples = Vec::with_capacity(PROMPTS.len());
        for prompt in PROMPTS {
            if Instant::now() >= deadline {
                break 'reps;
            }
            match one_request(http, addr, prompt, remaining()).await {
                Ok(sample) => samples.push(sample),
                Err(e) if Instant::now() >= deadline => {
                    tracing::debug!(error = %e, "The benchmark's time bound passed mid-request.");
                    break 'reps;
                }
                Err(e) => return Err(e),
            }
        }
        throttled |= throttle_sample(throttle_root).await.throttled_since(&before);
        figures.extend(repetition_figures(&samples));
    }
    if figures.is_empty() {
        return Err(format!("not one repetition of the prompt set finished within {bound:?}"));
    }
    let pick = |f: fn(&RepetitionFigures) -> f64| figures.iter().map(f).collect::<Vec<f64>>();
    Ok(Measurement {
        repetitions: u32::try_from(figures.len()).unwrap_or(u32::MAX),
        ttft_ms: stat(&pick(|f| f.ttft_ms)),
        prompt_tokens_per_second: stat(&pick(|f| f.prompt_tokens_per_second)),
        generation_tokens_per_second: stat(&pick(|f| f.generation_tokens_per_second)),
        throttled,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Results

/// What was benchmarked, for the result.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    pub bundle: Option<proto::BundleRef>,
    pub variant_digest: String,
    /// Quantization, e.g. "Q4_K_M"; read from the GGUF file when not known otherwise.
    pub variant_name: String,
    pub model_path: Option<PathBuf>,
}

/// Who the results belong to.
#[derive(Clone, Debug)]
pub struct Identity {
    pub device_id: String,
    pub hardware_class: String,
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
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

/// Benchmarks the instance at `addr` (process `pid`, loaded in `load_time`) and builds the result; a
/// failure is a result with `error` set.
#[allow(clippy::too_many_arguments)]
pub async fn benchmark_instance(
    http: &HttpClient,
    identity: &Identity,
    subject: &Subject,
    addr: SocketAddr,
    pid: Option<u32>,
    load_time: Option<Duration>,
    trigger: proto::BenchmarkTrigger,
    repetitions: u32,
) -> proto::BenchmarkResult {
    let repetitions = if repetitions == 0 { DEFAULT_REPETITIONS } else { repetitions.min(MAX_REPETITIONS) };
    let variant_name = match (&subject.variant_name, &subject.model_path) {
        (name, Some(path)) if name.is_empty() => quantization_of(path).await,
        (name, _) => name.clone(),
    };
    let mut result = proto::BenchmarkResult {
        device_id: identity.device_id.clone(),
        hardware_class: identity.hardware_class.clone(),
        bundle: subject.bundle.clone(),
        variant_digest: subject.variant_digest.clone(),
        variant_name,
        trigger: trigger as i32,
        at_unix_ms: now_unix_ms(),
        prompt_set: PROMPT_SET.to_owned(),
        load_ms: load_time.map(|d| d.as_secs_f64() * 1000.0).unwrap_or_default(),
        ..Default::default()
    };
    let span = tracing::info_span!("benchmark", variant = %subject.variant_digest, trigger = trigger.as_str_name());
    let measured = measure(http, addr, repetitions, BENCH_TIMEOUT, Path::new("/")).instrument(span).await;
    match measured {
        Ok(m) => {
            result.repetitions = m.repetitions;
            result.ttft_ms = Some(m.ttft_ms);
            result.prompt_tokens_per_second = Some(m.prompt_tokens_per_second);
            result.generation_tokens_per_second = Some(m.generation_tokens_per_second);
            result.throttled = m.throttled;
            result.peak_rss_bytes = match pid {
                Some(pid) => peak_rss(pid).await.unwrap_or_default(),
                None => 0,
            };
            tracing::info!(
                generation_tps = result.generation_tokens_per_second.as_ref().map(|s| s.median).unwrap_or_default(),
                prompt_tps = result.prompt_tokens_per_second.as_ref().map(|s| s.median).unwrap_or_default(),
                ttft_ms = result.ttft_ms.as_ref().map(|s| s.median).unwrap_or_default(),
                peak_rss = result.peak_rss_bytes,
                throttled = result.throttled,
                "Benchmark finished."
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "Benchmark failed.");
            result.error = e;
        }
    }
    result
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
    let same_bundle = snapshot.running.as_ref().is_some_and(|r| r.digest == upstream.bundle_digest());
    let subject = Subject {
        bundle: if same_bundle {
            snapshot.running.clone()
        } else {
            Some(proto::BundleRef { digest: upstream.bundle_digest().to_owned(), ..Default::default() })
        },
        variant_digest: if same_bundle { snapshot.variant_digest.clone() } else { String::new() },
        variant_name: String::new(),
        model_path: if same_bundle { snapshot.model_path.clone() } else { None },
    };
    let info = upstream.info();
    let result =
        benchmark_instance(http, identity, &subject, upstream.addr(), info.pid, info.load_time, trigger, repetitions)
            .await;
    drop(lease);
    result
}

/// A result saying the benchmark could not run.
pub fn failed(identity: &Identity, trigger: proto::BenchmarkTrigger, error: String) -> proto::BenchmarkResult {
    proto::BenchmarkResult {
        device_id: identity.device_id.clone(),
        hardware_class: identity.hardware_class.clone(),
        trigger: trigger as i32,
        at_unix_ms: now_unix_ms(),
        prompt_set: PROMPT_SET.to_owned(),
        error,
        ..Default::default()
    }
}

/// The device's benchmark results, newest last, in `<data_dir>/benchmarks.json` (replaced atomically).
#[derive(Clone, Debug)]
pub struct ResultsFile {
    path: PathBuf,
}

impl ResultsFile {
    pub fn new(data_dir: &Path) -> ResultsFile {
        ResultsFile { path: data_dir.join(RESULTS_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored results; empty when there are none. A corrupt file is reported and treated as empty (it
    /// only holds measurements, which the next benchmark replaces).
    pub fn load(&self) -> Vec<proto::BenchmarkResult> {
        let Ok(bytes) = std::fs::read(&self.path) else { return Vec::new() };
        match serde_json::from_slice(&bytes) {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "The benchmark results file is unreadable; starting it again.");
                Vec::new()
            }
        }
    }

    /// Appends `results`, keeping the newest [`RESULTS_KEPT`]. Blocking.
    pub fn append(&self, results: &[proto::BenchmarkResult]) -> std::io::Result<()> {
        let mut all = self.load();
        all.extend_from_slice(results);
        let excess = all.len().saturating_sub(RESULTS_KEPT);
        all.drain(..excess);
        let bytes = serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?;
        alki_shared::fsutil::write_atomic(&self.path, &bytes)
    }

    pub async fn append_async(&self, results: Vec<proto::BenchmarkResult>) {
        let file = self.clone();
        let outcome = tokio::task::spawn_blocking(move || file.append(&results)).await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(file = %self.path.display(), error = %e, "Cannot store benchmark results."),
            Err(e) => tracing::warn!(error = %e, "Storing benchmark results failed."),
        }
    }
}

/// The serving instance as the running agent describes it in `<data_dir>/serving.json`, so that
/// `alki-agent bench` can benchmark it from another process.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Serving {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub load_ms: Option<f64>,
    pub bundle: Option<proto::BundleRef>,
    pub variant_digest: String,
    pub model_path: Option<PathBuf>,
}

impl Serving {
    /// What the proxy serves now, described with the device loop's snapshot when they agree.
    pub fn of(proxy: &Proxy, snapshot: &Snapshot) -> Option<Serving> {
        let upstream = proxy.current()?;
        let same = snapshot.running.as_ref().is_some_and(|r| r.digest == upstream.bundle_digest());
        let info = upstream.info();
        Some(Serving {
            addr: upstream.addr(),
            pid: info.pid,
            load_ms: info.load_time.map(|d| d.as_secs_f64() * 1000.0),
            bundle: if same {
                snapshot.running.clone()
            } else {
                Some(proto::BundleRef { digest: upstream.bundle_digest().to_owned(), ..Default::default() })
            },
            variant_digest: if same { snapshot.variant_digest.clone() } else { String::new() },
            model_path: if same { snapshot.model_path.clone() } else { None },
        })
    }

    pub fn subject(&self) -> Subject {
        Subject {
            bundle: self.bundle.clone(),
            variant_digest: self.variant_digest.clone(),
            variant_name: String::new(),
            model_path: self.model_path.clone(),
        }
    }
}

/// `<data_dir>/serving.json`, replaced atomically on every switch of the front proxy; absent when nothing
/// is served.
#[derive(Clone, Debug)]
pub struct ServingFile {
    path: PathBuf,
}

impl ServingFile {
    pub fn new(data_dir: &Path) -> ServingFile {
        ServingFile { path: data_dir.join(SERVING_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Option<Serving> {
        serde_json::from_slice(&std::fs::read(&self.path).ok()?).ok()
    }

    async fn store(&self, serving: Option<Serving>) {
        let path = self.path.clone();
        let outcome = tokio::task::spawn_blocking(move || match serving {
            Some(s) => {
                let bytes = serde_json::to_vec_pretty(&s).map_err(std::io::Error::other)?;
                alki_shared::fsutil::write_atomic(&path, &bytes)
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        })
        .await;
        if let Ok(Err(e)) = outcome {
            tracing::warn!(file = %self.path.display(), error = %e, "Cannot record the serving instance.");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The benchmark task

/// A benchmark to run.
#[derive(Clone, Debug)]
pub enum Job {
    /// After an activation: benchmark what is served now.
    Activation,
    /// A controller command: benchmark what is served now.
    OnDemand { command_id: String, repetitions: u32 },
    /// A controller command: benchmark every variant of a bundle that fits.
    Calibrate { command_id: String, bundle: Option<proto::BundleRef>, repetitions: u32 },
}

impl Job {
    fn command_id(&self) -> &str {
        match self {
            Job::Activation => "",
            Job::OnDemand { command_id, .. } | Job::Calibrate { command_id, .. } => command_id,
        }
    }
}

/// Everything the benchmark task needs; built by [`crate::Agent::run`].
pub struct Benchmarker {
    pub identity: Identity,
    pub proxy: Arc<Proxy>,
    pub http: HttpClient,
    pub snapshot: watch::Receiver<Snapshot>,
    pub results: ResultsFile,
    pub serving_file: ServingFile,
    pub reports: mpsc::Sender<proto::BenchmarkReport>,
    pub metrics: Arc<crate::metrics::AgentMetrics>,
    pub calibration: crate::calibrate::Calibration,
}

/// The sending side of the benchmark queue.
#[derive(Clone, Debug)]
pub struct Jobs(mpsc::Sender<Job>);

impl Jobs {
    /// Queues `job`; false when the queue is full (a benchmark is running and others wait).
    pub fn offer(&self, job: Job) -> bool {
        self.0.try_send(job).is_ok()
    }
}

impl Benchmarker {
    /// Starts the task that runs queued jobs one at a time until `shutdown`, and keeps the serving file
    /// up to date meanwhile.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> (Jobs, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(JOB_QUEUE);
        let serving =
            record_serving(self.proxy.clone(), self.snapshot.clone(), self.serving_file.clone(), shutdown.clone());
        let task = tokio::spawn(
            async move {
                tokio::join!(self.run(rx, shutdown), serving);
            }
            .in_current_span(),
        );
        (Jobs(tx), task)
    }

    async fn run(self, mut jobs: mpsc::Receiver<Job>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let job = tokio::select! {
                job = jobs.recv() => match job { Some(job) => job, None => return },
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let command_id = job.command_id().to_owned();
            let report = tokio::select! {
                report = self.run_job(job) => report,
                _ = shutdown.wait_for(|stop| *stop) => {
                    tracing::info!(%command_id, "Benchmark abandoned for shutdown.");
                    return;
                }
            };
            let ok: Vec<proto::BenchmarkResult> =
                report.results.iter().filter(|r| r.error.is_empty()).cloned().collect();
            if let Some(last) = ok.iter().rev().find(|r| r.trigger != proto::BenchmarkTrigger::Calibration as i32) {
                self.metrics.set_last_benchmark(last.clone());
            }
            if !report.results.is_empty() {
                self.results.append_async(report.results.clone()).await;
            }
            // The session forwards reports while connected; a full queue drops this one (it is stored).
            if self.reports.try_send(report).is_err() {
                tracing::warn!(%command_id, "The benchmark report could not be queued for the controller; it is kept in the results file.");
            }
        }
    }

    async fn run_job(&self, job: Job) -> proto::BenchmarkReport {
        tracing::info!(?job, "Benchmark starting.");
        let snapshot = self.snapshot.borrow().clone();
        match job {
            Job::Activation => {
                let result = benchmark_serving(
                    &self.proxy,
                    &self.http,
                    &self.identity,
                    &snapshot,
                    proto::BenchmarkTrigger::Activation,
                    DEFAULT_REPETITIONS,
                )
                .await;
                proto::BenchmarkReport { command_id: String::new(), results: vec![result], error: String::new() }
            }
            Job::OnDemand { command_id, repetitions } => {
                let result = benchmark_serving(
                    &self.proxy,
                    &self.http,
                    &self.identity,
                    &snapshot,
                    proto::BenchmarkTrigger::OnDemand,
                    repetitions,
                )
                .await;
                proto::BenchmarkReport { command_id, results: vec![result], error: String::new() }
            }
            Job::Calibrate { command_id, bundle, repetitions } => {
                match self.calibration.run(&self.identity, bundle.as_ref(), repetitions).await {
                    Ok(results) => proto::BenchmarkReport { command_id, results, error: String::new() },
                    Err(e) => {
                        tracing::warn!(error = %e, "Calibration could not run.");
                        proto::BenchmarkReport { command_id, results: Vec::new(), error: e.to_string() }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// `alki-agent bench`

/// `alki-agent bench`: benchmarks the model the running agent serves (found through its serving file), or
/// `model` in a llama-server of its own; the result is stored in the results file when it succeeded.
pub async fn run_cli(
    config: &crate::Config,
    model: Option<&Path>,
    repetitions: u32,
) -> anyhow::Result<proto::BenchmarkResult> {
    use anyhow::Context;
    let (data_dir, labels) = (config.data_dir.clone(), config.labels.clone());
    let identity = tokio::task::spawn_blocking(move || {
        let device_id = crate::state::StateFile::new(&data_dir)
            .load()
            .ok()
            .flatten()
            .map(|s| s.device_id.to_string())
            .unwrap_or_default();
        Identity { device_id, hardware_class: crate::inventory::collect(&data_dir, &labels).hardware_class }
    })
    .await
    .context("measuring the device")?;
    let http = crate::runtime::http_client();
    let trigger = proto::BenchmarkTrigger::OnDemand;
    let result = match model {
        Some(path) => {
            anyhow::ensure!(path.is_file(), "{}: no such model file; give the path of a GGUF file", path.display());
            let logs = tempfile::tempdir().context("creating a log directory")?;
            let opts = crate::runtime::InstanceOptions {
                llama_server: config.runtime.llama_server.clone(),
                extra_args: config.runtime.extra_args.clone(),
                log_dir: logs.path().to_owned(),
                health_timeout: config.health_timeout(),
                stop: crate::runtime::StopPolicy::default(),
            };
            let settings = crate::settings::LaunchSettings::resolve(
                &alki_shared::bundle::RuntimeDefaults::default(),
                &crate::settings::RuntimeOverrides::default(),
            );
            let spec =
                crate::runtime::LaunchSpec { model_path: path.to_owned(), settings, bundle_digest: String::new() };
            eprintln!("Starting llama-server for {} ...", path.display());
            let instance = crate::runtime::Instance::start(&opts, spec, &http)
                .await
                .with_context(|| format!("starting llama-server for {}", path.display()))?;
            let subject = Subject { model_path: Some(path.to_owned()), ..Default::default() };
            eprintln!("Benchmarking: {repetitions} repetitions of {PROMPT_SET} ...");
            let result = benchmark_instance(
                &http,
                &identity,
                &subject,
                instance.addr(),
                instance.pid(),
                instance.load_time(),
                trigger,
                repetitions,
            )
            .await;
            instance.stop(&crate::runtime::StopPolicy::default()).await;
            result
        }
        None => {
            let file = ServingFile::new(&config.data_dir);
            let serving = file.load().with_context(|| {
                format!(
                    "no model is served here ({} is missing): start the agent and activate a bundle, or pass \
                     --model FILE to benchmark a GGUF file",
                    file.path().display()
                )
            })?;
            if let Some(pid) = serving.pid {
                anyhow::ensure!(
                    Path::new(&format!("/proc/{pid}")).exists(),
                    "the llama-server named in {} (pid {pid}) is gone; is the agent running?",
                    file.path().display()
                );
            }
            eprintln!(
                "Benchmarking the served model at {}: {repetitions} repetitions of {PROMPT_SET} ...",
                serving.addr
            );
            let load_time = serving.load_ms.map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0));
            benchmark_instance(
                &http,
                &identity,
                &serving.subject(),
                serving.addr,
                serving.pid,
                load_time,
                trigger,
                repetitions,
            )
            .await
        }
    };
    if result.error.is_empty() {
        ResultsFile::new(&config.data_dir).append_async(vec![result.clone()]).await;
    }
    Ok(result)
}

/// A benchmark result as a table for people.
pub fn table(result: &proto::BenchmarkResult) -> String {
    let mut out = String::new();
    let bundle = result.bundle.as_ref().map(|b| {
        let name = if b.repository.is_empty() { b.digest.clone() } else { format!("{}@{}", b.repository, b.digest) };
        if b.tag.is_empty() { name } else { format!("{name} ({})", b.tag) }
    });
    let mut facts = vec![
        ("bundle", bundle.unwrap_or_else(|| "-".to_owned())),
        ("variant", if result.variant_digest.is_empty() { "-".to_owned() } else { result.variant_digest.clone() }),
        ("quantization", if result.variant_name.is_empty() { "-".to_owned() } else { result.variant_name.clone() }),
        ("hardware class", result.hardware_class.clone()),
        ("prompt set", format!("{} x {} repetitions", result.prompt_set, result.repetitions)),
        ("load time", format!("{:.0} ms", result.load_ms)),
        ("peak RSS", crate::pull::human_bytes(result.peak_rss_bytes)),
        ("throttled", if result.throttled { "yes: the figures are suspect".to_owned() } else { "no".to_owned() }),
    ];
    if !result.error.is_empty() {
        facts.push(("error", result.error.clone()));
    }
    for (k, v) in facts {
        out.push_str(&format!("{k:<15} {v}\n"));
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header(["", "median", "min", "max", "stddev", "samples"]);
    for (name, stat) in [
        ("TTFT (ms)", &result.ttft_ms),
        ("prompt tok/s", &result.prompt_tokens_per_second),
        ("generation tok/s", &result.generation_tokens_per_second),
    ] {
        let s = stat.unwrap_or_default();
        t.add_row([
            name.to_owned(),
            format!("{:.1}", s.median),
            format!("{:.1}", s.min),
            format!("{:.1}", s.max),
            format!("{:.1}", s.stddev),
            s.samples.to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&t.to_string());
    out.push('\n');
    out
}

/// Rewrites the serving file whenever the proxy switches or the device loop publishes, until `shutdown`;
/// removes it at the end (nothing is served after the agent stops).
async fn record_serving(
    proxy: Arc<Proxy>,
    mut snapshot: watch::Receiver<Snapshot>,
    file: ServingFile,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut switched = proxy.subscribe();
    let mut last = None;
    loop {
        let now = Serving::of(&proxy, &snapshot.borrow_and_update());
        switched.borrow_and_update();
        if now != last {
            file.store(now.clone()).await;
            last = now;
        }
        tokio::select! {
            Ok(()) = switched.changed() => {}
            Ok(()) = snapshot.changed() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    file.store(None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        let s = stat(&[10.0, 12.0, 14.0, f64::NAN]);
        assert_eq!((s.median, s.min, s.max, s.samples), (12.0, 10.0, 14.0, 3));
        assert!((s.stddev - 2.0).abs() < 1e-9, "sample standard deviation: {}", s.stddev);
        assert_eq!(stat(&[7.0]).stddev, 0.0);
        assert_eq!(stat(&[]), proto::Stat::default());
    }

    #[test]
    fn timings_are_read_leniently() {
        let v: Value = serde_json::json!({"content": "", "stop": true, "timings": {
            "prompt_n": 11, "prompt_ms": 5.5, "prompt_per_second": 2000.0,
            "predicted_n": 32, "predicted_ms": 16.0, "predicted_per_second": 2000.0, "cache_n": 0, "extra": "x"}});
        assert_eq!(
            Timings::from_json(&v),
            Some(Timings { prompt_n: 11.0, prompt_ms: 5.5, predicted_n: 32.0, predicted_ms: 16.0 })
        );
        assert_eq!(Timings::from_json(&serde_json::json!({"content": "hi"})), None);
        assert_eq!(Timings::from_json(&serde_json::json!({"timings": {}})), None);
    }

    #[test]
    fn repetition_figures_weigh_prompts_by_their_tokens() {
        let sample = |ttft, pn, pms, gn, gms| Sample {
            ttft_ms: ttft,
            timings: Timings { prompt_n: pn, prompt_ms: pms, predicted_n: gn, predicted_ms: gms },
        };
        let f = repetition_figures(&[sample(10.0, 10.0, 10.0, 32.0, 320.0), sample(30.0, 90.0, 30.0, 32.0, 320.0)])
            .expect("figures");
        assert_eq!(f.ttft_ms, 20.0);
        assert_eq!(f.prompt_tokens_per_second, 100.0 * 1000.0 / 40.0);
        assert_eq!(f.generation_tokens_per_second, 100.0);
        assert_eq!(repetition_figures(&[]), None);
    }

    #[test]
    fn sse_events_are_split_across_chunks() {
        let mut buffer = b"data: {\"content\":\"a\"}\n\ndata: {\"content\":".to_vec();
        let events = drain_sse_events(&mut buffer);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["content"], "a");
        buffer.extend_from_slice(b"\"b\",\"stop\":true}\n\ndata: [DONE]\n\n");
        let events = drain_sse_events(&mut buffer);
        assert_eq!(events.len(), 1, "[DONE] is not JSON and is skipped");
        assert_eq!(events[0]["stop"], true);
        assert!(buffer.is_empty());
    }

    #[test]
    fn peak_rss_comes_from_vm_hwm() {
        let status = "Name:\tllama-server\nVmPeak:\t 1234567 kB\nVmHWM:\t  524288 kB\nVmRSS:\t  400000 kB\n";
        assert_eq!(vm_hwm(status), Some(512 << 20));
        assert_eq!(vm_hwm("Name: x\n"), None);
    }

    #[test]
    fn the_results_file_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = ResultsFile::new(dir.path());
        assert!(file.load().is_empty());
        for i in 0..(RESULTS_KEPT + 3) {
            let r = proto::BenchmarkResult { at_unix_ms: i as i64, ..Default::default() };
            file.append(&[r]).expect("append");
        }
        let all = file.load();
        assert_eq!(all.len(), RESULTS_KEPT);
        assert_eq!(all[0].at_unix_ms, 3);
        std::fs::write(file.path(), b"{not json").expect("corrupt");
        assert!(file.load().is_empty(), "a corrupt file is started again");
    }
}
