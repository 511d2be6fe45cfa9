//! Who and what the front port admits before a request reaches llama-server: the path allow-list (the
//! inference API only; llama-server's `/slots`, `/props`, `/metrics` and the like show other users' prompts or
//! change the server, so only the agent reads them, on the instance's loopback port), the API keys when
//! configured, a per-client rate limit, and the body size cap. Refusals answer at once and never count in the
//! serving counters the rollout gates read.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use alki_shared::ratelimit::{Rate, RateLimiter};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderMap, StatusCode, header};
use sha2::{Digest as _, Sha256};

use super::answer::error_response;

/// Paths clients may call: llama-server's inference API (OpenAI- and Anthropic-compatible routes and its
/// own), health and the model list. Anything else is refused with 404.
const ALLOWED_PATHS: &[&str] = &[
    "/health",
    "/v1/health",
    "/models",
    "/v1/models",
    "/completion",
    "/completions",
    "/v1/completions",
    "/chat/completions",
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/embedding",
    "/embeddings",
    "/v1/embeddings",
    "/rerank",
    "/reranking",
    "/v1/rerank",
    "/v1/reranking",
    "/infill",
    "/tokenize",
    "/detokenize",
    "/apply-template",
];

/// Paths that need no API key: a load balancer's health probe.
const OPEN_PATHS: &[&str] = &["/health", "/v1/health"];

/// Whether the front port forwards `path` (exact match; no prefix, so `/slots/0?action=save` is refused).
pub fn path_allowed(path: &str) -> bool {
    ALLOWED_PATHS.contains(&path)
}

/// How often the API keys file is looked at for changes, at most.
const KEYS_RECHECK: Duration = Duration::from_secs(2);
/// Clients whose rate-limit buckets are kept (the least recently seen are dropped beyond it).
pub const MAX_RATE_CLIENTS: usize = 10_000;
/// The shortest API key accepted from the keys file (shorter lines are ignored with a warning).
const MIN_KEY_LEN: usize = 16;

/// Why a request was refused, as the metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Path,
    Auth,
    Rate,
    BodyTooLarge,
    Connections,
}

impl Refusal {
    pub const ALL: [Refusal; 5] =
        [Refusal::Path, Refusal::Auth, Refusal::Rate, Refusal::BodyTooLarge, Refusal::Connections];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Path => "path",
            Refusal::Auth => "auth",
            Refusal::Rate => "rate",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::Connections => "connections",
        }
    }
}

/// The front port's own counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct FrontCounters {
    refused: [AtomicU64; 5],
    /// Client connections open now.
    pub open: AtomicU64,
    /// Idle connections closed to make room for a new one at the connection cap.
    pub evicted: AtomicU64,
}

impl FrontCounters {
    pub fn refuse(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }
}

/// What the front port admits, from `[runtime]` in agent.toml.
#[derive(Clone, Debug)]
pub struct AdmissionSettings {
    /// One key per line; None: no key needed.
    pub api_keys_file: Option<PathBuf>,
    /// Requests a client (by IP address) may make per minute; 0: no limit.
    pub requests_per_minute_per_client: u32,
    pub max_body_bytes: u64,
}

/// The default body cap: chat requests with a few images inlined fit.
pub const DEFAULT_MAX_BODY_MIB: u64 = 32;

impl Default for AdmissionSettings {
    /// The inference API only, no key, no rate limit, the default body cap.
    fn default() -> AdmissionSettings {
        AdmissionSettings {
            api_keys_file: None,
            requests_per_minute_per_client: 0,
            max_body_bytes: DEFAULT_MAX_BODY_MIB << 20,
        }
    }
}

/// The admission state shared by every request.
pub struct Admission {
    settings: AdmissionSettings,
    keys: Mutex<KeyFile>,
    /// None without a limit.
    limiter: Option<RateLimiter<IpAddr>>,
    counters: Arc<FrontCounters>,
}

impl Admission {
    pub fn new(settings: AdmissionSettings, counters: Arc<FrontCounters>) -> Arc<Admission> {
        let limiter = match settings.requests_per_minute_per_client {
            0 => None,
            n => Some(RateLimiter::new(Rate::per_minute(n), MAX_RATE_CLIENTS)),
        };
        Arc::new(Admission { keys: Mutex::new(KeyFile::default()), settings, limiter, counters })
    }

    fn refuse(&self, why: Refusal, status: StatusCode, kind: &str, message: &str) -> Response {
        self.counters.refuse(why);
        error_response(status, kind, message)
    }

    /// Checks the request; None admits it.
    async fn check(&self, asked: Asked) -> Option<Response> {
        let path = asked.path.as_str();
        if !path_allowed(path) {
            let message = format!(
                "{path} is not served on this port: the front port serves the inference API only \
                 (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health, ...)"
            );
            return Some(self.refuse(Refusal::Path, StatusCode::NOT_FOUND, "not_found_error", &message));
        }
        if let Some(file) = &self.settings.api_keys_file
            && !OPEN_PATHS.contains(&path)
        {
            let keys = self.current_keys(file).await;
            if !asked.key.as_deref().is_some_and(|k| keys.verify(k)) {
                let message = "a valid API key is required: send it as `Authorization: Bearer KEY`";
                return Some(self.refuse(Refusal::Auth, StatusCode::UNAUTHORIZED, "authentication_error", message));
            }
        }
        if let (Some(ip), Some(limiter)) = (asked.client, &self.limiter)
            && limiter.check(&ip, Instant::now()).is_err()
        {
            let message = format!(
                "more than {} requests a minute from {ip}: slow down and retry",
                self.settings.requests_per_minute_per_client
            );
            return Some(self.refuse(Refusal::Rate, StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", &message));
        }
        if asked.length.is_some_and(|n| n > self.settings.max_body_bytes) {
            return Some(self.body_too_large());
        }
        None
    }

    pub fn body_too_large(&self) -> Response {
        let message = format!(
            "the request body is larger than the {} bytes this port accepts (runtime.max_body_mib)",
            self.settings.max_body_bytes
        );
        self.refuse(Refusal::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", &message)
    }

    pub fn max_body_bytes(&self) -> u64 {
        self.settings.max_body_bytes
    }

    /// The keys in the file now: read again when its modification time or size changed, looked at no more
    /// often than [`KEYS_RECHECK`]. A file that cannot be read keeps the last keys read (none at first:
    /// every request is refused rather than admitted without a key).
    async fn current_keys(&self, file: &std::path::Path) -> ApiKeys {
        let due = {
            let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            keys.checked.is_none_or(|at| at.elapsed() >= KEYS_RECHECK)
        };
        if due {
            let path = file.to_owned();
            let stamp = tokio::task::spawn_blocking(move || file_stamp(&path)).await.ok().flatten();
            let changed = {
                let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
                keys.checked = Some(Instant::now());
                stamp.is_some() && stamp != keys.stamp
            };
            if changed {
                let path = file.to_owned();
                match tokio::task::spawn_blocking(move || ApiKeys::read(&path)).await {
                    Ok(Ok(read)) => {
                        tracing::info!(keys = read.len(), file = %file.display(), "API keys of the front port read.");
                        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
                        (keys.keys, keys.stamp) = (read, stamp);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, file = %file.display(), "The API keys file could not be read; the last keys read stay in force.")
                    }
                    Err(_) => {}
                }
            }
        }
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).keys.clone()
    }
}

/// The axum middleware: refuses what [`Admission::check`] refuses, forwards the rest with the body capped.
pub async fn admit(State(admission): State<Arc<Admission>>, request: Request, next: Next) -> Response {
    let asked = Asked::of(&request);
    let declared = asked.length;
    if let Some(refused) = admission.check(asked).await {
        if refused.status() == StatusCode::PAYLOAD_TOO_LARGE {
            linger(request.into_body(), declared.unwrap_or(0), admission.max_body_bytes());
        }
        return refused;
    }
    let cap = usize::try_from(admission.max_body_bytes()).unwrap_or(usize::MAX);
    let request = request.map(|body| axum::body::Body::new(http_body_util::Limited::new(body, cap)));
    next.run(request).await
}

/// Bytes of a refused body read and dropped at most, and for how long, before the connection closes.
const LINGER_BYTES: u64 = 64 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops a refused request's body for a bounded while, so the client, still sending it, reads the
/// 413 instead of a reset (closing a socket with unread data resets it: nginx's "lingering close").
fn linger(body: axum::body::Body, declared: u64, cap: u64) {
    let budget = declared.min(cap.saturating_mul(4)).min(LINGER_BYTES);
    tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        let mut read = 0u64;
        let drain = async {
            while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
                read += chunk.len() as u64;
                if read >= budget {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

/// What admission looks at in a request (taken out first: a request's body is not `Sync`).
struct Asked {
    path: String,
    key: Option<String>,
    client: Option<IpAddr>,
    /// The declared body length.
    length: Option<u64>,
}

impl Asked {
    fn of(request: &Request) -> Asked {
        let headers = request.headers();
        Asked {
            path: request.uri().path().to_owned(),
            key: presented_key(headers).map(str::to_owned),
            client: request.extensions().get::<ClientAddr>().map(|c| c.0),
            length: headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()),
        }
    }
}

/// The client's address, put in each request's extensions by the front server.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

/// The key a request presents: `Authorization: Bearer KEY` (OpenAI clients) or `x-api-key: KEY` (Anthropic's).
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim))
}

#[derive(Default)]
struct KeyFile {
    keys: ApiKeys,
    stamp: Option<(SystemTime, u64)>,
    checked: Option<Instant>,
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// API keys, kept as SHA-256 digests and compared in constant time, so neither a key's bytes nor how much
/// of it matched leaks through timing.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys(Arc<Vec<[u8; 32]>>);

impl ApiKeys {
    /// One key per line; blank lines and `#` comments are skipped, and lines shorter than 16 characters are
    /// ignored with a warning (a key that short can be guessed).
    pub fn parse(text: &str) -> ApiKeys {
        let mut digests = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            if key.len() < MIN_KEY_LEN {
                tracing::warn!(line = n + 1, "An API key shorter than {MIN_KEY_LEN} characters is ignored.");
                continue;
            }
            digests.push(Sha256::digest(key.as_bytes()).into());
        }
        ApiKeys(Arc::new(digests))
    }

    pub fn read(path: &std::path::Path) -> std::io::Result<ApiKeys> {
        std::fs::read_to_string(path).map(|text| ApiKeys::parse(&text))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `presented` is one of the keys; every key is compared whole, whatever matches.
    pub fn verify(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = 0u8;
        for key in self.0.iter() {
            let diff = key.iter().zip(digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found |= u8::from(diff == 0);
        }
        found == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_inference_api_is_allowed() {
        for path in ["/v1/chat/completions", "/completion", "/v1/embeddings", "/health", "/v1/models", "/tokenize"] {
            assert!(path_allowed(path), "{path}");
        }
        for path in ["/slots", "/slots/0", "/props", "/metrics", "/lora-adapters", "/", "/v1/chat/completions/x"] {
            assert!(!path_allowed(path), "{path}");
        }
    }

    #[test]
    fn keys_are_verified_whole_and_short_or_commented_lines_are_not_keys() {
        let keys = ApiKeys::parse("# the app\nsk-0123456789abcdef\n\nshort\n  sk-fedcba9876543210  \n");
        assert_eq!(keys.len(), 2);
        assert!(keys.verify("sk-0123456789abcdef"));
        assert!(keys.verify("sk-fedcba9876543210"));
        assert!(!keys.verify("sk-0123456789abcde"));
        assert!(!keys.verify("short"));
        assert!(!keys.verify(""));
        assert!(!ApiKeys::default().verify(""));
    }

    #[test]
    fn a_key_is_read_from_either_header() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer sk-1".parse().expect("value"));
        assert_eq!(presented_key(&headers), Some("sk-1"));
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "sk-2".parse().expect("value"));
        assert_eq!(presented_key(&headers), Some("sk-2"));
        assert_eq!(presented_key(&HeaderMap::new()), None);
    }
}
