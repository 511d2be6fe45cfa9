//! Measuring a llama-server: the fixed, versioned prompt set sent repeatedly to an instance's loopback port,
//! time to first token and prompt/generation tokens per second from llama-server's own `timings` (parsed
//! from the streamed events), peak RSS (`VmHWM`) and throttling during the run; median and spread per figure.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use alki_shared::proto;
use axum::body::Body;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::time::Instant;

use crate::runtime::HttpClient;
use crate::stats::stat;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
