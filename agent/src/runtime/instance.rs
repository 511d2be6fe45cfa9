//! One llama-server process: started on a loopback port the agent picks, proven healthy (`/health`, then a
//! smoke completion), asked whether it is busy (`/slots`), and stopped with the safe signal sequence.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::priority::Priority;
use super::proxy::HttpClient;
use super::record::{ProcessRecord, Recorder, Role, process_identity};
pub use crate::settings::LaunchSpec;

/// Log files kept per data dir; instances use them in turn, each truncated when an instance starts.
const LOG_FILES: u64 = 6;
/// A log file past this size is copied to `<log>.old` and truncated.
const LOG_CAP_BYTES: u64 = 8 << 20;
/// How often the log size is checked.
const LOG_CHECK: Duration = Duration::from_secs(10);
/// How often `/proc` is polled for an adopted process's exit when pidfds are not available.
const ADOPTED_POLL: Duration = Duration::from_millis(500);
/// Bound on the smoke completion that proves an adopted instance.
const ADOPT_SMOKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The smoke completion: a few tokens prove the engine generates.
const SMOKE_REQUEST: &str = r#"{"prompt":"Hello","n_predict":4}"#;
/// How much of the log end a start failure quotes.
const LOG_TAIL_BYTES: u64 = 2048;
/// Bound on any single request to an instance made by the agent itself (health, slots).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const HEALTH_POLL: Duration = Duration::from_millis(100);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// How instances are run, from the agent's configuration.
#[derive(Clone, Debug)]
pub struct InstanceOptions {
    pub llama_server: PathBuf,
    pub extra_args: Vec<String>,
    /// `runtime.launcher`: a command llama-server runs through (empty: none).
    pub launcher: Vec<String>,
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
    #[error(
        "cannot run llama-server ({} failed: {source}); check runtime.llama_server and runtime.launcher in the \
         agent's config",
        program.display()
    )]
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
    /// A pidfd for the process: signals through it can never reach another process that reused the pid,
    /// and for an adopted process (not our child) it is how its exit is seen. None on kernels before 5.3.
    pidfd: Option<Arc<OwnedFd>>,
    addr: SocketAddr,
    log: PathBuf,
    spec: LaunchSpec,
    exit: watch::Receiver<Option<String>>,
    /// Process start to `/health` 200, once proven.
    load_time: Option<Duration>,
    /// Waits for the exit (the child, or the pidfd of an adopted process).
    waiter: tokio::task::JoinHandle<()>,
    /// Keeps the log file under [`LOG_CAP_BYTES`].
    log_cap: tokio::task::JoinHandle<()>,
    _log_slot: LogSlot,
    /// Where the process is recorded for a restarted agent, if anywhere.
    recorder: Option<Recorder>,
    /// Handed over to the next agent: dropping the instance leaves the process running.
    released: bool,
}

impl Drop for Instance {
    /// A dropped instance (a start abandoned half-way, a test that failed) is killed, unless it was released
    /// for the next agent ([`Instance::release`]). A crash of the agent runs no destructor: llama-server
    /// survives it and the restarted agent adopts or stops it from the record.
    fn drop(&mut self) {
        self.waiter.abort();
        self.log_cap.abort();
        if !self.released && self.exit_status().is_none() {
            self.signal(libc::SIGKILL);
            if let (Some(recorder), Some(pid)) = (&self.recorder, self.pid) {
                recorder.remove(pid);
            }
        }
    }
}

/// Why a recorded llama-server was not adopted by a restarted agent.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("process {pid} is gone or is another program now (its start time differs from the record)")]
    NotOurs { pid: u32 },
    #[error("process {pid} runs {} but {} is configured", actual.display(), wanted.display())]
    OtherBinary { pid: u32, actual: PathBuf, wanted: PathBuf },
    #[error("process {pid} serves {got} but {wanted} should be served")]
    OtherModel { pid: u32, got: String, wanted: String },
    #[error("process {pid} is not healthy: {reason}")]
    Unhealthy { pid: u32, reason: String },
}

impl Instance {
    /// Starts llama-server on a loopback port of its own (never behind the front proxy) and waits until it is
    /// healthy and a smoke completion succeeds. The process dies with the agent: this is how a variant runs
    /// for a benchmark or a calibration (its spec from `PulledBundle::launch_spec`); the supervisor, whose
    /// instances serve clients, uses [`Instance::start_recorded`].
    pub async fn start(opts: &InstanceOptions, spec: LaunchSpec, http: &HttpClient) -> Result<Instance, StartError> {
        Instance::start_inner(opts, spec, http, None, Priority::Normal).await
    }

    /// [`Instance::start`] at a lower CPU priority (an evaluation's loopback instance, which must yield to
    /// the serving model): every thread of the process runs at `priority`.
    pub async fn start_at(
        opts: &InstanceOptions,
        spec: LaunchSpec,
        http: &HttpClient,
        priority: Priority,
    ) -> Result<Instance, StartError> {
        Instance::start_inner(opts, spec, http, None, priority).await
    }

    /// [`Instance::start`]; with a recorder, llama-server runs in a session of its own, outlives the agent
    /// (a crash, or a hand-over to the next agent) and is written to the record so the next agent finds it.
    pub async fn start_recorded(
        opts: &InstanceOptions,
        spec: LaunchSpec,
        http: &HttpClient,
        recorder: Option<&Recorder>,
    ) -> Result<Instance, StartError> {
        Instance::start_inner(opts, spec, http, recorder, Priority::Normal).await
    }

    async fn start_inner(
        opts: &InstanceOptions,
        spec: LaunchSpec,
        http: &HttpClient,
        recorder: Option<&Recorder>,
        priority: Priority,
    ) -> Result<Instance, StartError> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let port = free_loopback_port().map_err(|source| StartError::Io { what: "port", source })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (slot, log_file) = open_log(&opts.log_dir, id)?;
        let log = slot.0.clone();
        let program = spec.settings.program(&opts.llama_server).to_owned();
        let mut command = llama_server_command(opts, &spec, port, log_file)?;
        if recorder.is_some() {
            own_session(&mut command);
        } else {
            die_with_parent(&mut command);
        }
        super::priority::lower(&mut command, priority);
        let pending = ProcessRecord {
            pid: 0,
            start_time: 0,
            exe: program.clone(),
            port,
            model_path: spec.model_path.clone(),
            settings: spec.settings.clone(),
            bundle_digest: spec.bundle_digest.clone(),
            log: log.clone(),
            role: Role::Starting,
        };
        let (child, pid) = spawn_recorded(command, pending, recorder)?;
        // The child is not reaped before its waiter runs, so this pidfd names it.
        let pidfd = pid.and_then(|p| pidfd_open(p).ok()).map(Arc::new);
        let (exit, waiter) = wait_for_exit(child, pid, recorder.cloned());
        tracing::info!(instance = id, pid, %addr, model = %spec.model_path.display(), detached = recorder.is_some(), "Started llama-server.");
        let log_cap = tokio::spawn(cap_log(log.clone()));
        let mut instance = Instance {
            id,
            pid,
            pidfd,
            addr,
            log,
            spec,
            exit,
            load_time: None,
            waiter,
            log_cap,
            _log_slot: slot,
            recorder: recorder.cloned(),
            released: false,
        };
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

    /// Takes over a llama-server a previous agent started and recorded. It must be the very process recorded
    /// (pid and start time); then it is supervised like a child (its exit is seen
    /// through a pidfd, or by polling `/proc` on old kernels). Proving it (health, smoke) is
    /// [`Instance::prove_adopted`]; on error nothing was signalled.
    pub fn adopt(record: &ProcessRecord, recorder: &Recorder) -> Result<Instance, AdoptError> {
        let pid = record.pid;
        let pidfd = pidfd_open(pid).ok().map(Arc::new);
        // Checked after the pidfd is open: if this is still the recorded process, the pidfd names it.
        let identity =
            process_identity(pid).filter(|id| id.start_time == record.start_time).ok_or(AdoptError::NotOurs { pid })?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (exit_tx, exit) = watch::channel(None);
        let (waiter_fd, start_time, owner) =
            (pidfd.as_ref().and_then(|f| f.try_clone().ok()), record.start_time, recorder.clone());
        let waiter = tokio::spawn(async move {
            let status = wait_adopted(pid, start_time, waiter_fd).await;
            owner.remove(pid);
            let _ = exit_tx.send(Some(status));
        });
        let log = record.log.clone();
        let slot = LogSlot::claim(log.clone());
        let log_cap = tokio::spawn(cap_log(log.clone()));
        tracing::debug!(instance = id, pid, exe = %identity.exe.display(), "Took over a recorded llama-server.");
        Ok(Instance {
            id,
            pid: Some(pid),
            pidfd,
            addr: SocketAddr::from(([127, 0, 0, 1], record.port)),
            log,
            spec: record.spec(),
            exit,
            load_time: None,
            waiter,
            log_cap,
            _log_slot: slot,
            recorder: Some(recorder.clone()),
            released: false,
        })
    }

    /// An adopted instance runs `binary` (the same file, not a replaced one), answers `/health` and `/slots`
    /// and generates (a smoke completion), each bounded.
    pub async fn prove_adopted(&self, binary: &Path, http: &HttpClient) -> Result<(), AdoptError> {
        let pid = self.pid.unwrap_or_default();
        let wanted = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
        let actual = process_identity(pid).map(|id| id.exe).unwrap_or_default();
        if actual != wanted {
            return Err(AdoptError::OtherBinary { pid, actual, wanted });
        }
        self.check(http).await.map_err(|reason| AdoptError::Unhealthy { pid, reason })?;
        let smoke = request(http, self.addr, "POST", "/completion", Some(SMOKE_REQUEST), ADOPT_SMOKE_TIMEOUT);
        match smoke.await {
            Ok((200, _)) => Ok(()),
            Ok((code, _)) => {
                Err(AdoptError::Unhealthy { pid, reason: format!("the smoke completion answered {code}") })
            }
            Err(reason) => Err(AdoptError::Unhealthy { pid, reason }),
        }
    }

    /// Leaves the process running when this instance is dropped (and in the record): the agent hands it over
    /// to the next agent.
    pub fn release(mut self) {
        self.released = true;
        if let (Some(recorder), Some(pid)) = (&self.recorder, self.pid) {
            recorder.set_role(pid, Role::Serving);
        }
    }

    /// Records what this instance does now (serving, or out of rotation), for a restarted agent.
    pub(crate) fn set_role(&self, role: Role) {
        if let (Some(recorder), Some(pid)) = (&self.recorder, self.pid) {
            recorder.set_role(pid, role);
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
        let smoke = request(http, self.addr, "POST", "/completion", Some(SMOKE_REQUEST), remaining);
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
            self.signal(signal);
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

/// Makes the kernel SIGKILL llama-server (or an evaluation's llama-perplexity) if the agent dies without
/// stopping it (SIGKILL, crash): a graceful agent shutdown uses the safe stop sequence instead; this only keeps
/// orphans from holding memory and ports.
#[cfg(target_os = "linux")]
pub(crate) fn die_with_parent(command: &mut tokio::process::Command) {
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
pub(crate) fn die_with_parent(_command: &mut tokio::process::Command) {}

impl Instance {
    /// Sends `signal`, through the pidfd when there is one (it cannot reach a process that reused the pid).
    fn signal(&self, signal: libc::c_int) {
        if let Some(fd) = &self.pidfd {
            match pidfd_signal(fd, signal) {
                Ok(()) => return,
                // Exited already (ESRCH), or the call is not available: nothing more to do for ESRCH.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return,
                Err(e) => tracing::debug!(error = %e, "pidfd_send_signal failed; using kill."),
            }
        }
        let Some(pid) = self.pid else { return };
        let Ok(pid) = libc::pid_t::try_from(pid) else { return };
        // SAFETY: kill(2) has no memory-safety preconditions. The process has not been reaped (the caller saw no
        // exit status; a child is reaped by its waiter, an adopted process was checked by start time).
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            tracing::debug!(pid, signal, error = %std::io::Error::last_os_error(), "kill failed.");
        }
    }
}

/// Puts llama-server in a session (and process group) of its own, so it outlives the agent: a signal to the
/// agent's process group (Ctrl-C in a terminal) does not reach it, and no parent-death signal is set.
fn own_session(command: &mut tokio::process::Command) {
    // SAFETY: between fork and exec the closure only calls the async-signal-safe setsid and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// pidfd_open(2): a file descriptor naming `pid` (Linux 5.3+).
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: the syscall takes a pid and flags, touches no memory of ours, and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// pidfd_send_signal(2).
fn pidfd_signal(fd: &OwnedFd, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo (null is allowed), no flags.
    let rc = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Resolves when an adopted process (not our child, so it cannot be waited for) exits: its pidfd turns
/// readable; without a pidfd, `/proc` is polled every [`ADOPTED_POLL`].
async fn wait_adopted(pid: u32, start_time: u64, pidfd: Option<OwnedFd>) -> String {
    const STATUS: &str = "exited (adopted from a previous agent, so its exit status is unknown)";
    // SAFETY: an OwnedFd is a valid open descriptor that stays open (and the same) until the AsyncFd drops it.
    let registered =
        pidfd.map(|fd| unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) });
    if let Some(Ok(readable)) = registered {
        let _ = readable.readable().await;
        return STATUS.to_owned();
    }
    loop {
        if process_identity(pid).is_none_or(|id| id.start_time != start_time) {
            return STATUS.to_owned();
        }
        tokio::time::sleep(ADOPTED_POLL).await;
    }
}

/// Log files in use by live instances of this agent, so a new instance never truncates the log of one that
/// runs (an adopted instance keeps the log its first agent chose).
static LOGS_IN_USE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A log file held by a live instance.
#[derive(Debug)]
struct LogSlot(PathBuf);

impl LogSlot {
    /// `llama-server-<n>.log` in `dir`, the first of [`LOG_FILES`] from `id` on that no live instance uses.
    fn take(dir: &Path, id: u64) -> LogSlot {
        let mut in_use = LOGS_IN_USE.lock().unwrap_or_else(PoisonError::into_inner);
        let path = (0..LOG_FILES)
            .map(|k| dir.join(format!("llama-server-{}.log", (id + k) % LOG_FILES)))
            .find(|p| !in_use.contains(p))
            .unwrap_or_else(|| dir.join(format!("llama-server-{}.log", id % LOG_FILES)));
        in_use.push(path.clone());
        LogSlot(path)
    }

    fn claim(path: PathBuf) -> LogSlot {
        LOGS_IN_USE.lock().unwrap_or_else(PoisonError::into_inner).push(path.clone());
        LogSlot(path)
    }
}

impl Drop for LogSlot {
    fn drop(&mut self) {
        let mut in_use = LOGS_IN_USE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = in_use.iter().position(|p| p == &self.0) {
            in_use.swap_remove(i);
        }
    }
}

/// Keeps a log file under [`LOG_CAP_BYTES`]: past it, the file is copied to `<log>.old` and truncated
/// (llama-server appends, so it goes on writing from the start). A process outliving the agent for months
/// cannot fill the disk with its log, and no pipe ties it to the agent.
async fn cap_log(log: PathBuf) {
    loop {
        tokio::time::sleep(LOG_CHECK).await;
        let path = log.clone();
        let capped = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            if std::fs::metadata(&path)?.len() <= LOG_CAP_BYTES {
                return Ok(false);
            }
            let mut old = path.clone().into_os_string();
            old.push(".old");
            std::fs::copy(&path, &old)?;
            std::fs::OpenOptions::new().write(true).open(&path)?.set_len(0)?;
            Ok(true)
        })
        .await;
        match capped {
            Ok(Ok(true)) => tracing::debug!(log = %log.display(), "Capped the llama-server log."),
            Ok(Ok(false)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return,
            Ok(Err(e)) => tracing::warn!(log = %log.display(), error = %e, "Cannot cap the llama-server log."),
            Err(_) => return,
        }
    }
}

/// Any slot with `is_processing: true` in a `/slots` answer.
fn slots_busy(body: &[u8]) -> bool {
    serde_json::from_slice::<Vec<serde_json::Value>>(body)
        .map(|slots| slots.iter().any(|s| s.get("is_processing").and_then(|v| v.as_bool()) == Some(true)))
        .unwrap_or(false)
}

/// A log file for instance `id`, emptied: the slot that holds it and the file opened for appending (so that
/// capping the file, copy then truncate, makes llama-server write from its start again).
fn open_log(dir: &Path, id: u64) -> Result<(LogSlot, std::fs::File), StartError> {
    std::fs::create_dir_all(dir).map_err(|source| StartError::Io { what: "log directory", source })?;
    let slot = LogSlot::take(dir, id);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&slot.0)
        .and_then(|f| f.set_len(0).map(|()| f))
        .map_err(|source| StartError::Io { what: "log file", source })?;
    Ok((slot, file))
}

/// The llama-server command for `spec` on `port`, its output going to `log`, with none of the agent's
/// systemd variables (they are not meant for it).
fn llama_server_command(
    opts: &InstanceOptions,
    spec: &LaunchSpec,
    port: u16,
    log: std::fs::File,
) -> Result<tokio::process::Command, StartError> {
    let log_err = log.try_clone().map_err(|source| StartError::Io { what: "log file", source })?;
    let program = spec.settings.program(&opts.llama_server);
    let mut command = match opts.launcher.split_first() {
        Some((launcher, args)) => {
            let mut command = tokio::process::Command::new(launcher);
            command.args(args).arg(program);
            command
        }
        None => tokio::process::Command::new(program),
    };
    // A runtime build's llama-server loads the libraries packed beside it, whatever its RUNPATH says.
    if let Some(build_dir) = spec.settings.llama_server.as_ref().and_then(|p| p.parent()) {
        command.env("LD_LIBRARY_PATH", build_dir);
    }
    command
        .arg("-m")
        .arg(&spec.model_path)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(spec.settings.args())
        .args(["--metrics", "--no-webui"])
        .args(&opts.extra_args)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    Ok(command)
}

/// Spawns `command`, recorded before the fork (by port, pid unknown yet: an agent killed right after the fork
/// still leaves a record the next agent finds the process by) and again with its pid and start time after.
fn spawn_recorded(
    mut command: tokio::process::Command,
    pending: ProcessRecord,
    recorder: Option<&Recorder>,
) -> Result<(tokio::process::Child, Option<u32>), StartError> {
    let port = pending.port;
    if let Some(recorder) = recorder {
        recorder.add(pending.clone());
    }
    let child = command.spawn().map_err(|source| {
        if let Some(recorder) = recorder {
            recorder.remove_pending(port);
        }
        // What failed to start: llama-server, or the launcher in front of it.
        StartError::Spawn { program: PathBuf::from(command.as_std().get_program()), source }
    })?;
    let pid = child.id();
    if let Some(recorder) = recorder {
        recorder.remove_pending(port);
        match pid.and_then(|pid| Some((pid, process_identity(pid)?))) {
            Some((pid, identity)) => {
                recorder.add(ProcessRecord { pid, start_time: identity.start_time, exe: identity.exe, ..pending })
            }
            None => tracing::warn!(?pid, "llama-server exited at once; not recorded."),
        }
    }
    Ok((child, pid))
}

/// Waits for the child's exit on a task of its own: the exit status (when it comes) and the task. The record
/// of the process goes with it.
fn wait_for_exit(
    mut child: tokio::process::Child,
    pid: Option<u32>,
    recorder: Option<Recorder>,
) -> (watch::Receiver<Option<String>>, tokio::task::JoinHandle<()>) {
    let (exit_tx, exit) = watch::channel(None);
    let waiter = tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        if let (Some(recorder), Some(pid)) = (&recorder, pid) {
            recorder.remove(pid);
        }
        let _ = exit_tx.send(Some(status));
    });
    (exit, waiter)
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
    fn a_launcher_runs_llama_server_with_its_whole_command_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let mut opts = InstanceOptions {
            llama_server: PathBuf::from("/opt/llama/llama-server"),
            extra_args: vec!["--jinja".into()],
            launcher: Vec::new(),
            log_dir: dir.path().to_owned(),
            health_timeout: Duration::from_secs(1),
            stop: StopPolicy::default(),
        };
        let spec = LaunchSpec {
            model_path: PathBuf::from("/m.gguf"),
            settings: crate::settings::LaunchSettings::resolve(&Default::default(), &Default::default()),
            bundle_digest: String::new(),
        };
        let line = |opts: &InstanceOptions| {
            let log = log.try_clone().expect("log");
            let command = llama_server_command(opts, &spec, 8081, log).expect("command");
            let command = command.as_std();
            let mut line = vec![command.get_program().to_string_lossy().into_owned()];
            line.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
            line
        };
        let direct = line(&opts);
        assert_eq!(direct[..3], ["/opt/llama/llama-server", "-m", "/m.gguf"]);
        opts.launcher = vec!["qemu-aarch64-static".into(), "-L".into(), "/usr/aarch64-linux-gnu".into()];
        let launched = line(&opts);
        assert_eq!(launched[..3], ["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"]);
        assert_eq!(launched[3..], direct[..], "the launcher is followed by the same command line");

        // A launcher that is not there is named in the refusal, not llama-server.
        opts.launcher = vec!["/nonexistent/launcher".into()];
        let log = log.try_clone().expect("log");
        let command = llama_server_command(&opts, &spec, 8081, log).expect("command");
        let pending = ProcessRecord {
            pid: 0,
            start_time: 0,
            exe: opts.llama_server.clone(),
            port: 8081,
            model_path: spec.model_path.clone(),
            settings: spec.settings.clone(),
            bundle_digest: String::new(),
            log: dir.path().join("log"),
            role: Role::Starting,
        };
        let refused = spawn_recorded(command, pending, None).expect_err("no such launcher").to_string();
        assert!(refused.contains("/nonexistent/launcher") && refused.contains("runtime.launcher"), "{refused}");
    }

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
