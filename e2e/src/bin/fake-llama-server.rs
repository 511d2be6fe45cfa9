//! A fake llama-server for fast tests and fault injection: accepts llama-server's flags, answers 503
//! "Loading model" during a load delay, then the endpoints the agent relies on, with every reply naming the
//! model file it was started with.
//!
//! Fault knobs, from the environment or from the model file itself (a file whose first line is `FAKE-GGUF`
//! followed by `KEY=VALUE` lines, or a real GGUF with such lines under `alki_e2e::tiny_model::FAKE_KNOBS_KEY`
//! (`make-tiny-model --fake-knob`), overrides the environment, so a test bundle can carry its own faults):
//! - `FAKE_LLAMA_LOAD_MS` (default 100): how long "loading" takes.
//! - `FAKE_LLAMA_EXIT_AT_LOAD=1`: exit with code 1 after loading, like a model that cannot load.
//!   A model file that does not exist does the same.
//! - `FAKE_LLAMA_CRASH_AFTER=N`: exit abruptly (code 139) when the N+1th completion request arrives.
//! - `FAKE_LLAMA_WEDGE_AFTER=N`: from the N+1th completion on, hang completions and `/slots` while `/health`
//!   still answers 200 (the wedged engine llama-server shows after a SIGTERM mid-generation).
//! - `FAKE_LLAMA_TOKEN_MS` (default 0): time per generated token; a completion of n tokens takes n times this.
//! - `FAKE_LLAMA_IGNORE_SIGTERM=1`: ignore SIGTERM (like the real server deadlocked mid-generation); only
//!   SIGKILL stops it.
//!
//! `"stream": true` answers are SSE events written one by one, spread over the generation time.
//!
//! Completions carry llama-server's `timings` (a prompt token counts one word and takes
//! `FAKE_LLAMA_PROMPT_US_PER_TOKEN` µs, default 500; a generated token takes `FAKE_LLAMA_TOKEN_MS`, or 0.5 ms
//! when that is 0), and `/metrics` (with `--metrics`) has the same counters as the real one, so rates
//! derived from them are exact.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use alki_e2e::tiny_model::FAKE_KNOBS_KEY;
use alki_shared::gguf;
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Clone, Debug)]
struct Args {
    model: PathBuf,
    host: String,
    port: u16,
    ctx: u64,
    slots: usize,
    metrics: bool,
}

/// llama-server's flags that matter here; every other flag is accepted and ignored (with its value, if the
/// next argument does not look like a flag).
fn parse_args(args: impl Iterator<Item = String>) -> Args {
    let mut parsed =
        Args { model: PathBuf::new(), host: "127.0.0.1".to_owned(), port: 8080, ctx: 4096, slots: 4, metrics: false };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let takes_value = matches!(
            flag.as_str(),
            "-m" | "--model"
                | "--host"
                | "--port"
                | "-c"
                | "--ctx-size"
                | "-t"
                | "--threads"
                | "-ngl"
                | "--n-gpu-layers"
                | "--gpu-layers"
                | "-np"
                | "--parallel"
                | "--chat-template"
                | "--alias"
        );
        let value = if takes_value { inline.or_else(|| args.next()) } else { inline };
        let value = value.unwrap_or_default();
        match flag.as_str() {
            "-m" | "--model" => parsed.model = PathBuf::from(value),
            "--host" => parsed.host = value,
            "--port" => parsed.port = value.parse().unwrap_or(8080),
            "-c" | "--ctx-size" => parsed.ctx = value.parse().unwrap_or(4096),
            "-np" | "--parallel" => parsed.slots = value.parse().unwrap_or(4).max(1),
            "--metrics" => parsed.metrics = true,
            _ if takes_value => {}
            // Unknown flag: swallow a value that follows it.
            other if other.starts_with('-') && args.peek().is_some_and(|next| !next.starts_with('-')) => {
                args.next();
            }
            _ => {}
        }
    }
    parsed
}

#[derive(Debug, Default, Clone)]
struct Knobs {
    load_ms: u64,
    exit_at_load: bool,
    crash_after: Option<u64>,
    token_ms: u64,
    ignore_sigterm: bool,
    /// Simulated prompt processing time per prompt token.
    prompt_us_per_token: u64,
    /// After this many completions the server wedges like llama-server's SIGTERM deadlock: `/health` still
    /// answers 200, `/slots` and completions hang.
    wedge_after: Option<u64>,
}

fn knobs(model_header: &[(String, String)]) -> Knobs {
    let get = |key: &str| {
        model_header.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).or_else(|| std::env::var(key).ok())
    };
    let flag = |key: &str| get(key).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    Knobs {
        load_ms: get("FAKE_LLAMA_LOAD_MS").and_then(|v| v.parse().ok()).unwrap_or(100),
        exit_at_load: flag("FAKE_LLAMA_EXIT_AT_LOAD"),
        crash_after: get("FAKE_LLAMA_CRASH_AFTER").and_then(|v| v.parse().ok()),
        token_ms: get("FAKE_LLAMA_TOKEN_MS").and_then(|v| v.parse().ok()).unwrap_or(0),
        ignore_sigterm: flag("FAKE_LLAMA_IGNORE_SIGTERM"),
        wedge_after: get("FAKE_LLAMA_WEDGE_AFTER").and_then(|v| v.parse().ok()),
        prompt_us_per_token: get("FAKE_LLAMA_PROMPT_US_PER_TOKEN").and_then(|v| v.parse().ok()).unwrap_or(500),
    }
}

/// `KEY=VALUE` lines of a model file that starts with `FAKE-GGUF` (read from its first 4 KiB), or of a GGUF's
/// [`FAKE_KNOBS_KEY`].
fn model_header(bytes: &[u8]) -> Vec<(String, String)> {
    if bytes.starts_with(&gguf::MAGIC) {
        let file = gguf::read(&mut std::io::Cursor::new(bytes));
        let knobs = file.ok().and_then(|f| f.get_str(FAKE_KNOBS_KEY).map(str::to_owned)).unwrap_or_default();
        return pairs(knobs.lines());
    }
    let head = &bytes[..bytes.len().min(4096)];
    let text = String::from_utf8_lossy(head);
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("FAKE-GGUF") {
        return Vec::new();
    }
    pairs(lines)
}

fn pairs<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines.filter_map(|l| l.split_once('=')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect()
}

struct Fake {
    args: Args,
    knobs: Knobs,
    loaded: AtomicBool,
    wedged: AtomicBool,
    processing: AtomicUsize,
    completions: AtomicU64,
    tokens: AtomicU64,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    /// Simulated processing times, in microseconds.
    prompt_us: AtomicU64,
    predicted_us: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args(std::env::args().skip(1));
    let model_bytes = std::fs::read(&args.model).ok();
    let knobs = knobs(&model_bytes.as_deref().map(model_header).unwrap_or_default());
    eprintln!("fake-llama-server: model {} on {}:{} with {:?}", args.model.display(), args.host, args.port, knobs);

    let addr: SocketAddr = match format!("{}:{}", args.host, args.port).parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake-llama-server: bad address: {e}");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-llama-server: cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    let fake = Arc::new(Fake {
        args: args.clone(),
        knobs: knobs.clone(),
        loaded: AtomicBool::new(false),
        wedged: AtomicBool::new(false),
        processing: AtomicUsize::new(0),
        completions: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        prompt_tokens: AtomicU64::new(0),
        prompt_us: AtomicU64::new(0),
        predicted_us: AtomicU64::new(0),
    });

    let loader = fake.clone();
    let model_exists = model_bytes.is_some();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(loader.knobs.load_ms)).await;
        if !model_exists {
            eprintln!("llama_model_load: error loading model: cannot open {}", loader.args.model.display());
            eprintln!("main: exiting due to model loading error");
            std::process::exit(1);
        }
        if loader.knobs.exit_at_load {
            eprintln!("llama_model_load: error loading model: FAKE_LLAMA_EXIT_AT_LOAD");
            eprintln!("main: exiting due to model loading error");
            std::process::exit(1);
        }
        loader.loaded.store(true, Ordering::SeqCst);
        eprintln!("main: model loaded; server is listening on http://{addr}");
    });

    let ignore_sigterm = knobs.ignore_sigterm;
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else { return };
        while term.recv().await.is_some() {
            if ignore_sigterm {
                eprintln!("fake-llama-server: SIGTERM ignored (FAKE_LLAMA_IGNORE_SIGTERM)");
                continue;
            }
            eprintln!("fake-llama-server: SIGTERM, exiting");
            std::process::exit(0);
        }
    });

    let app = axum::Router::new().fallback(handle).with_state(fake);
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("fake-llama-server: server error: {e}");
        std::process::exit(1);
    }
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    (status, Json(json!({"error": {"code": status.as_u16(), "message": message, "type": kind}}))).into_response()
}

/// Counts a request as processing for as long as it lives (for a stream: until its last event is sent).
struct Processing(Arc<Fake>);

impl Processing {
    fn enter(fake: &Arc<Fake>) -> Processing {
        fake.processing.fetch_add(1, Ordering::SeqCst);
        Processing(fake.clone())
    }
}

impl Drop for Processing {
    fn drop(&mut self) {
        self.0.processing.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(State(fake): State<Arc<Fake>>, request: Request) -> Response {
    fake.requests.fetch_add(1, Ordering::Relaxed);
    if !fake.loaded.load(Ordering::SeqCst) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "Loading model", "unavailable_error");
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap_or_default();
    let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method, path.as_str()) {
        (Method::GET, "/health") => Json(json!({"status": "ok"})).into_response(),
        (Method::GET, "/slots") if fake.wedged.load(Ordering::SeqCst) => std::future::pending().await,
        (Method::GET, "/slots") => {
            let busy = fake.processing.load(Ordering::SeqCst);
            let slots: Vec<Value> = (0..fake.args.slots)
                .map(|id| json!({"id": id, "n_ctx": fake.args.ctx / fake.args.slots as u64, "is_processing": id < busy}))
                .collect();
            Json(Value::Array(slots)).into_response()
        }
        (Method::GET, "/props") => Json(json!({
            "total_slots": fake.args.slots,
            "model_path": fake.args.model.display().to_string(),
            "build_info": "fake-llama-server",
        }))
        .into_response(),
        (Method::GET, "/v1/models" | "/models") => Json(json!({
            "object": "list",
            "data": [{
                "id": model_name(&fake),
                "object": "model",
                "owned_by": "llamacpp",
                "meta": {"n_ctx": fake.args.ctx, "n_ctx_train": fake.args.ctx, "n_vocab": 32000, "n_embd": 64, "n_params": 1000, "size": 1000}
            }]
        }))
        .into_response(),
        (Method::GET, "/metrics") if fake.args.metrics => metrics(&fake),
        (Method::GET, "/metrics") => error(StatusCode::NOT_IMPLEMENTED, "This server does not support metrics endpoint. Start it with `--metrics`", "not_supported_error"),
        (Method::POST, "/completion" | "/completions" | "/v1/completions") => completion(&fake, &json_body, false).await,
        (Method::POST, "/v1/chat/completions" | "/chat/completions") => completion(&fake, &json_body, true).await,
        _ => error(StatusCode::NOT_FOUND, "File Not Found", "not_found_error"),
    }
}

/// Prompt tokens of a completion request: one per word of `prompt` or of the chat messages' contents.
fn prompt_tokens(request: &Value) -> u64 {
    let words = |v: &Value| v.as_str().map(|s| s.split_whitespace().count()).unwrap_or(0);
    let mut n = words(request.get("prompt").unwrap_or(&Value::Null));
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        n += messages.iter().map(|m| words(m.get("content").unwrap_or(&Value::Null))).sum::<usize>();
    }
    (n as u64).max(1)
}

fn model_name(fake: &Fake) -> String {
    fake.args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn metrics(fake: &Fake) -> Response {
    let tokens = fake.tokens.load(Ordering::Relaxed);
    let seconds = |us: &AtomicU64| us.load(Ordering::Relaxed) as f64 / 1e6;
    let text = format!(
        "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n\
         # TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total {p}\n\
         # HELP llamacpp:prompt_seconds_total Prompt process time\n\
         # TYPE llamacpp:prompt_seconds_total counter\nllamacpp:prompt_seconds_total {ps}\n\
         # HELP llamacpp:tokens_predicted_total Number of generation tokens processed.\n\
         # TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total {tokens}\n\
         # HELP llamacpp:tokens_predicted_seconds_total Predict process time\n\
         # TYPE llamacpp:tokens_predicted_seconds_total counter\nllamacpp:tokens_predicted_seconds_total {gs}\n\
         # TYPE llamacpp:n_decode_total counter\nllamacpp:n_decode_total {tokens}\n\
         # TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {busy}\n\
         # TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 0\n",
        p = fake.prompt_tokens.load(Ordering::Relaxed),
        ps = seconds(&fake.prompt_us),
        gs = seconds(&fake.predicted_us),
        busy = fake.processing.load(Ordering::SeqCst),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn completion(fake: &Arc<Fake>, request: &Value, chat: bool) -> Response {
    let served = fake.completions.fetch_add(1, Ordering::SeqCst);
    if fake.knobs.crash_after.is_some_and(|n| served >= n) {
        eprintln!("fake-llama-server: crashing after {served} completions (FAKE_LLAMA_CRASH_AFTER)");
        std::process::exit(139);
    }
    if fake.knobs.wedge_after.is_some_and(|n| served >= n) {
        eprintln!("fake-llama-server: wedged after {served} completions (FAKE_LLAMA_WEDGE_AFTER)");
        fake.wedged.store(true, Ordering::SeqCst);
    }
    if fake.wedged.load(Ordering::SeqCst) {
        return std::future::pending().await;
    }
    let processing = Processing::enter(fake);
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let n_predict = request
        .get("n_predict")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .clamp(1, 64);
    let generation = Duration::from_millis(fake.knobs.token_ms * n_predict);
    if !stream && !generation.is_zero() {
        tokio::time::sleep(generation).await;
    }
    fake.tokens.fetch_add(n_predict, Ordering::Relaxed);
    let model = fake.args.model.display().to_string();
    let text = format!("fake reply from {model}");
    let prompt_n = prompt_tokens(request);
    let prompt_us = prompt_n * fake.knobs.prompt_us_per_token;
    let token_us = if fake.knobs.token_ms > 0 { fake.knobs.token_ms * 1000 } else { 500 };
    let predicted_us = token_us * n_predict;
    fake.prompt_tokens.fetch_add(prompt_n, Ordering::Relaxed);
    fake.prompt_us.fetch_add(prompt_us, Ordering::Relaxed);
    fake.predicted_us.fetch_add(predicted_us, Ordering::Relaxed);
    let per_second = |n: u64, us: u64| if us > 0 { n as f64 * 1e6 / us as f64 } else { 0.0 };
    let timings = json!({
        "prompt_n": prompt_n, "prompt_ms": prompt_us as f64 / 1000.0,
        "prompt_per_second": per_second(prompt_n, prompt_us),
        "predicted_n": n_predict, "predicted_ms": predicted_us as f64 / 1000.0,
        "predicted_per_second": per_second(n_predict, predicted_us), "cache_n": 0
    });
    let created =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let name = model_name(fake);
    match (chat, stream) {
        (false, false) => Json(json!({
            "content": text, "model": model, "tokens_predicted": n_predict, "tokens_evaluated": prompt_n,
            "stop": true, "stop_type": "limit", "timings": timings
        }))
        .into_response(),
        (true, false) => Json(json!({
            "id": format!("chatcmpl-fake-{served}"), "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_n, "completion_tokens": n_predict, "total_tokens": n_predict + prompt_n},
            "timings": timings
        }))
        .into_response(),
        (false, true) => {
            let mut sse = Vec::new();
            for word in text.split_inclusive(' ') {
                sse.push(format!("data: {}\n\n", json!({"content": word, "stop": false})));
            }
            sse.push(format!(
                "data: {}\n\n",
                json!({"content": "", "stop": true, "model": model, "tokens_predicted": n_predict, "timings": timings})
            ));
            sse_response(sse, generation, processing)
        }
        (true, true) => {
            let id = format!("chatcmpl-fake-{served}");
            let mut sse = Vec::new();
            for word in text.split_inclusive(' ') {
                let chunk = json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "finish_reason": null, "delta": {"content": word}}]
                });
                sse.push(format!("data: {chunk}\n\n"));
            }
            let last = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "finish_reason": "length", "delta": {}}], "timings": timings
            });
            sse.push(format!("data: {last}\n\ndata: [DONE]\n\n"));
            sse_response(sse, generation, processing)
        }
    }
}

/// Sends `events` one by one, spread over `generation` (like tokens coming out of the model); the request
/// counts as processing until the last one is sent.
fn sse_response(events: Vec<String>, generation: Duration, processing: Processing) -> Response {
    use futures::StreamExt;
    let gap = generation / u32::try_from(events.len().max(1)).unwrap_or(u32::MAX);
    let stream = futures::stream::iter(events).then(move |event| async move {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        Ok::<_, std::convert::Infallible>(event)
    });
    let stream = stream.map(move |event| {
        let _processing = &processing;
        event
    });
    let mut response = axum::body::Body::from_stream(stream).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> impl Iterator<Item = String> {
        args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn flags_are_parsed_and_unknown_ones_ignored() {
        let a = parse_args(strings(&[
            "-m",
            "/m/a.gguf",
            "--host",
            "127.0.0.1",
            "--port",
            "9001",
            "-c",
            "512",
            "-t",
            "2",
            "-ngl",
            "0",
            "-np",
            "3",
            "--metrics",
            "--no-webui",
            "--flash-attn",
            "on",
            "--jinja",
            "--ctx-size=1024",
        ]));
        assert_eq!(a.model, PathBuf::from("/m/a.gguf"));
        assert_eq!(a.port, 9001);
        assert_eq!(a.ctx, 1024);
        assert_eq!(a.slots, 3);
        assert!(a.metrics);
    }

    #[test]
    fn knobs_come_from_the_model_file_header() {
        let header = model_header(b"FAKE-GGUF\nFAKE_LLAMA_EXIT_AT_LOAD=1\nFAKE_LLAMA_TOKEN_MS = 20\n");
        let k = knobs(&header);
        assert!(k.exit_at_load);
        assert_eq!(k.token_ms, 20);
        assert_eq!(k.prompt_us_per_token, 500);
        assert!(model_header(b"GGUF\x03\x00\x00\x00").is_empty());
    }

    #[test]
    fn knobs_come_from_a_real_ggufs_metadata() {
        use alki_e2e::tiny_model::{TinyModelOptions, synthetic_tokenizer, tiny_model_bytes_with_knobs};
        let knobs_of = |lines: &[&str]| {
            let lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            let bytes = tiny_model_bytes_with_knobs(&TinyModelOptions::default(), &synthetic_tokenizer(16), &lines);
            knobs(&model_header(&bytes.expect("tiny model")))
        };
        let k = knobs_of(&["FAKE_LLAMA_TOKEN_MS=150", "FAKE_LLAMA_LOAD_MS=5"]);
        assert_eq!((k.token_ms, k.load_ms), (150, 5));
        assert_eq!(knobs_of(&[]).token_ms, 0, "a GGUF without knobs has none");
    }
}
