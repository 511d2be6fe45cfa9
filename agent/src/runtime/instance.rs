//! One llama-server process: started on a loopback port the agent picks, proven healthy (`/health`, then a
//! smoke completion), asked whether it is busy (`/slots`), and stopped with the safe signal sequence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::proxy::HttpClient;
use crate::settings::LaunchSettings;

/// Log files kept per data dir; instances use them in turn, each truncated when an instance starts.
const LOG_FILES: u64 = 4;
/// How much of the log end a start failure quotes.
const LOG_TAIL_BYTES: u64 = 2048;
/// Bound on any single request to an instance made by the agent itself (health, slots).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const HEALTH_POLL: Duration = Duration::from_millis(100);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// What to run: a model file with settings, on behalf of a bundle.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchSpec {
    /// The GGUF file given to `-m` (split parts lie beside it).
    pub model_path: PathBuf,
    pub settings: LaunchSettings,
    /// The bundle this serves; the proxy's counters are kept per bundle.
    pub bundle_digest: String,
}

/// How instances are run, from the agent's configuration.
#[derive(Clone, Debug)]
pub struct InstanceOptions {
    pub llama_server: PathBuf,
    pub extra_args: Vec<String>,
    /// Where `llama-server-<n>.log` files go.
    pub log_dir: PathBuf,
    /// Bound on loading the model and answering `/health` and the smoke completion.
    pub health_timeout: Duration,
    pub stop: StopPolicy,
}

/// Waits of the stop sequence: SIGTERM, wait `term_grace`, SIGTERM, wait `term_grace`, SIGKILL, wait `kill_grace`.
#[derive(Clone, Copy, Debug)]
pub struct StopPolicy {
    pub term_grace: Duration,
    pub kill_grace: Duration,
}

impl Default for StopPolicy {
    fn default() -> Self {
        StopPolicy { term_grace: Duration::from_secs(5), kill_grace: Duration::from_secs(5) }
    }
}

/// Why an instance could not be started. Any of these leaves the instance stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot run llama-server {}: {source}; check runtime.llama_server in the agent's config", program.display())]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("cannot prepare llama-server's {what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error(
        "llama-server exited ({status}) while loading {}: the model cannot be loaded (corrupt or truncated file, \
         unsupported architecture, or not enough memory); log {}: {log_tail}", model.display(), log.display()
    )]
    Exited { status: String, model: PathBuf, log: PathBuf, log_tail: String },
    #[error(
        "llama-server did not become healthy within {}s ({last}); raise runtime.health_timeout_secs for large \
         models or slow disks; log {}: {log_tail}", waited.as_secs(), log.display()
    )]
    Unhealthy { waited: Duration, last: String, log: PathBuf, log_tail: String },
    #[error(
        "llama-server is up but the smoke completion failed ({reason}); the model loads but does not generate; \
         log {}: {log_tail}", log.display()
    )]
    Smoke { reason: String, log: PathBuf, log_tail: String },
}

/// A running (or exited) llama-server.
#[derive(Debug)]
pub struct Instance {
    id: u64,
    pid: Option<u32>,
    addr: SocketAddr,
    log: PathBuf,
    spec: LaunchSpec,
    exit: watch::Receiver<Option<String>>,
    /// Process start to `/health` 200, once proven.
    load_time: Option<Duration>,
    /// Owns the child; aborting it kills the process (kill_on_drop).
    waiter: tokio::task::JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.waiter.abort();
    }
}

impl Instance {
    /// Starts llama-server and waits until it is healthy and a smoke completion succeeds.
    pub async fn start(opts: &InstanceOptions, spec: LaunchSpec, http: &HttpClient) -> Result<Instance, StartError> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let port = free_loopback_port().map_err(|source| StartError::Io { what: "port", source })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        std::fs::create_dir_all(&opts.log_dir).map_err(|source| StartError::Io { what: "log directory", source })?;
        let log = opts.log_dir.join(format!("llama-server-{}.log", id % LOG_FILES));
        let log_file = std::fs::File::create(&log).map_err(|source| StartError::Io { what: "log file", source })?;
        let log_err = log_file.try_clone().map_err(|source| StartError::Io { what: "log file", source })?;

        let mut command = tokio::process::Command::new(&opts.llama_server);
        command
            .arg("-m")
            .arg(&spec.model_path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(spec.settings.args())
            .args(["--metrics", "--no-webui"])
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let mut child =
            command.spawn().map_err(|source| StartError::Spawn { program: opts.llama_server.clone(), source })?;
        let pid = child.id();
        let (exit_tx, exit) = watch::channel(None);
        let waiter = tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(Some(status));
        });
        tracing::info!(instance = id, pid, %addr, model = %spec.model_path.display(), "Started llama-server.");
        let mut instance = Instance { id, pid, addr, log, spec, exit, load_time: None, waiter };
        match instance.prove(opts.health_timeout, http).await {
            Ok(load_time) => {
                instance.load_time = Some(load_time);
                Ok(instance)
            }
            Err(e) => {
                tracing::warn!(instance = id, error = %e, "llama-server failed to start.");
                instance
                    .stop(&StopPolicy { term_grace: Duration::from_secs(2), kill_grace: Duration::from_secs(2) })
                    .await;
                Err(e)
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Process start to `/health` answering 200.
    pub fn load_time(&self) -> Option<Duration> {
        self.load_time
    }

    pub fn spec(&self) -> &LaunchSpec {
        &self.spec
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// Resolves when the process exits (for any reason).
    pub async fn exited(&self) -> String {
        let mut exit = self.exit.clone();
        loop {
            if let Some(status) = exit.borrow_and_update().clone() {
                return status;
            }
            if exit.changed().await.is_err() {
                return exit.borrow().clone().unwrap_or_else(|| "unknown".to_owned());
            }
        }
    }

    /// `/health` 200 within the timeout, then `POST /completion` 200; an exit meanwhile fails at once.
    /// Returns the time from start to `/health` 200 (the load time).
    async fn prove(&self, timeout: Duration, http: &HttpClient) -> Result<Duration, StartError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut last = "no answer yet".to_owned();
        loop {
            if let Some(status) = self.exit_status() {
                return Err(self.exited_error(status).await);
            }
            if Instant::now() >= deadline {
                return Err(StartError::Unhealthy {
                    waited: timeout,
                    last,
                    log: self.log.clone(),
                    log_tail: log_tail(&self.log).await,
                });
            }
            let probe = request(http, self.addr, "GET", "/health", None, PROBE_TIMEOUT);
            tokio::select! {
                status = self.exited() => return Err(self.exited_error(status).await),
                answer = probe => match answer {
                    Ok((200, _)) => break,
                    Ok((code, body)) => last = format!("/health answered {code} {}", String::from_utf8_lossy(&body[..body.len().min(200)])),
                    Err(e) => last = e,
                },
            }
            tokio::select! {
                status = self.exited() => return Err(self.exited_error(status).await),
                _ = tokio::time::sleep(HEALTH_POLL) => {}
            }
        }
        let load_time = started.elapsed();
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(10));
        let smoke =
            request(http, self.addr, "POST", "/completion", Some(r#"{"prompt":"Hello","n_predict":4}"#), remaining);
        let reason = tokio::select! {
            status = self.exited() => return Err(self.exited_error(status).await),
            answer = smoke => match answer {
                Ok((200, _)) => {
                    tracing::info!(instance = self.id, took_ms = started.elapsed().as_millis() as u64, "llama-server is healthy and generates.");
                    return Ok(load_time);
                }
                Ok((code, body)) => format!("/completion answered {code} {}", String::from_utf8_lossy(&body[..body.len().min(200)])),
                Err(e) => e,
            },
        };
        Err(StartError::Smoke { reason, log: self.log.clone(), log_tail: log_tail(&self.log).await })
    }

    async fn exited_error(&self, status: String) -> StartError {
        StartError::Exited {
            status,
            model: self.spec.model_path.clone(),
            log: self.log.clone(),
            log_tail: log_tail(&self.log).await,
        }
    }

    /// True when `/slots` shows a slot processing. A `/slots` that does not answer in time counts as idle:
    /// the caller has already seen no proxied request in flight.
    pub async fn busy(&self, http: &HttpClient) -> bool {
        match request(http, self.addr, "GET", "/slots", None, PROBE_TIMEOUT).await {
            Ok((200, body)) => slots_busy(&body),
            _ => false,
        }
    }

    /// Liveness: the process runs, `/health` answers 200 and `/slots` answers, each within a probe timeout.
    /// (`/health` alone can answer while the engine is wedged.)
    pub async fn check(&self, http: &HttpClient) -> Result<(), String> {
        if let Some(status) = self.exit_status() {
            return Err(format!("llama-server exited ({status})"));
        }
        match request(http, self.addr, "GET", "/health", None, PROBE_TIMEOUT).await {
            Ok((200, _)) => {}
            Ok((code, _)) => return Err(format!("/health answered {code}")),
            Err(e) => return Err(e),
        }
        match request(http, self.addr, "GET", "/slots", None, PROBE_TIMEOUT).await {
            Ok((200, _)) => Ok(()),
            Ok((code, _)) => Err(format!("/slots answered {code}")),
            Err(e) => Err(e),
        }
    }

    /// The safe stop: SIGTERM, wait, SIGTERM again, wait, SIGKILL, wait (each bounded). llama-server can
    /// deadlock on a SIGTERM during generation, hence the escalation; callers drain it first.
    pub async fn stop(self, policy: &StopPolicy) {
        let steps = [
            (libc::SIGTERM, policy.term_grace),
            (libc::SIGTERM, policy.term_grace),
            (libc::SIGKILL, policy.kill_grace),
        ];
        for (signal, grace) in steps {
            if self.exit_status().is_some() {
                break;
            }
            if let Some(pid) = self.pid {
                send_signal(pid, signal);
            }
            if let Ok(status) = tokio::time::timeout(grace, self.exited()).await {
                tracing::info!(instance = self.id, %status, "llama-server stopped.");
                return;
            }
            tracing::warn!(instance = self.id, signal, "llama-server did not exit in time after a signal.");
        }
        if self.exit_status().is_none() {
            tracing::error!(
                instance = self.id,
                pid = self.pid,
                "llama-server survived SIGKILL; it may be stuck in the kernel."
            );
        }
    }
}

/// Makes the kernel SIGKILL llama-server if the agent dies without stopping it (SIGKILL, crash): a graceful
/// agent shutdown uses the safe stop sequence instead; this only keeps orphans from holding memory and ports.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: `getpid` is called before the fork; between fork and exec the closure only calls the
    // async-signal-safe `prctl` and `getppid` and allocates nothing (errors are raw OS error codes).
    let agent = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent may have died before prctl took effect: then nobody would kill us later.
            if libc::getppid() != agent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut tokio::process::Command) {}

fn send_signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions. The child has not been reaped (the caller saw no
    // exit status and the waiter task owns it), so the pid still names our child and not a reused one.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        tracing::debug!(pid, signal, error = %std::io::Error::last_os_error(), "kill failed.");
    }
}

/// Any slot with `is_processing: true` in a `/slots` answer.
fn slots_busy(body: &[u8]) -> bool {
    serde_json::from_slice::<Vec<serde_json::Value>>(body)
        .map(|slots| slots.iter().any(|s| s.get("is_processing").and_then(|v| v.as_bool()) == Some(true)))
        .unwrap_or(false)
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// One bounded request to an instance; the body is read whole (small answers only).
pub(crate) async fn request(
    http: &HttpClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let builder = http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    let request = match json {
        Some(j) => builder.header(http::header::CONTENT_TYPE, "application/json").body(Body::from(j.to_owned())),
        None => builder.body(Body::empty()),
    }
    .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = http.request(request).await.map_err(|e| format!("{path}: {e}"))?;
        let status = response.status().as_u16();
        let limited = http_body_util::Limited::new(response.into_body(), 1 << 20);
        let body = limited.collect().await.map_err(|e| format!("{path}: {e}"))?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| format!("{path} did not answer within {timeout:?}"))?
}

/// The last lines of a log file, for error messages.
pub(crate) async fn log_tail(path: &Path) -> String {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut file) = tokio::fs::File::open(path).await else { return String::new() };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    if file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let skip = if start > 0 { 1 } else { 0 }; // a cut first line is dropped
    lines[skip.min(lines.len())..].iter().rev().take(12).rev().copied().collect::<Vec<_>>().join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_slots_are_recognised() {
        assert!(slots_busy(br#"[{"id":0,"is_processing":false},{"id":1,"is_processing":true}]"#));
        assert!(!slots_busy(br#"[{"id":0,"is_processing":false}]"#));
        assert!(!slots_busy(b"not json"));
    }

    #[tokio::test]
    async fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        let text: String = (0..500).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).expect("write");
        let tail = log_tail(&path).await;
        assert!(tail.ends_with("line 499"), "{tail}");
        assert_eq!(tail.split(" | ").count(), 12);
        assert_eq!(log_tail(&dir.path().join("missing")).await, "");
    }
}
