//! The runtime supervisor: llama-server instances behind the front proxy, swapped blue/green (start the
//! candidate beside the old one, prove it, flip the proxy, drain and stop the old one) or, when memory cannot
//! hold both, stop-then-start with the proxy holding requests through the gap (where [`GapWork`] may use the
//! memory the old model freed). A watched swap keeps the previous instance (or, after stop-then-start, its
//! launch spec) until [`Supervisor::commit`] or [`Supervisor::roll_back`].

pub mod admission;
pub mod answer;
pub mod front;
pub mod instance;
pub mod priority;
pub mod proxy;
pub mod record;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

pub use instance::{AdoptError, Instance, InstanceOptions, LaunchSpec, StartError, StopPolicy};
pub use proxy::{HttpClient, Lease, Proxy, ProxyStats, Upstream, UpstreamInfo, http_client};
pub use record::{Recorder, Role};

const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How long requests wait for an upstream during a stop-then-start gap, unless configured.
pub const DEFAULT_GAP_WAIT: Duration = Duration::from_secs(30);

/// How a swap places the candidate next to the instance serving now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapStrategy {
    /// Candidate started beside the old instance; no gap at all. Needs memory for both models.
    BlueGreen,
    /// Old instance drained and stopped first; requests arriving in the gap wait (bounded) or get 503.
    StopThenStart,
}

/// Work done inside a stop-then-start gap, while the proxy holds requests: the old instance has stopped (its
/// memory is free) and the new one is not yet behind the proxy. The swap goes on whatever the work does, so
/// the work bounds its own time.
pub trait GapWork: Send {
    /// The old instance has stopped; the new one has not started.
    fn freed(&mut self) -> impl Future<Output = ()> + Send;
    /// The new instance answers on `addr` (loopback); the proxy sends it nothing until this returns.
    fn started(&mut self, addr: SocketAddr) -> impl Future<Output = ()> + Send;
}

/// Nothing to do in a gap.
pub struct NoGapWork;

impl GapWork for NoGapWork {
    async fn freed(&mut self) {}
    async fn started(&mut self, _: SocketAddr) {}
}

impl<W: GapWork> GapWork for Option<W> {
    async fn freed(&mut self) {
        if let Some(work) = self {
            work.freed().await;
        }
    }

    async fn started(&mut self, addr: SocketAddr) {
        if let Some(work) = self {
            work.started(addr).await;
        }
    }
}

/// Why a rollback could not put the previous model back.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("there is no previous model to roll back to")]
    NothingToRollBackTo,
    #[error("the previous model could not be started again: {0}")]
    Start(#[from] StartError),
}

/// Owns the llama-server instances and decides which one the proxy forwards to. Driven by one task.
pub struct Supervisor {
    opts: InstanceOptions,
    drain_timeout: Duration,
    proxy: Arc<Proxy>,
    http: HttpClient,
    gap_wait: Duration,
    active: Option<Serving>,
    /// After a watched blue/green swap: the previous instance, out of rotation but loaded, for an instant rollback.
    standby: Option<Serving>,
    /// After a watched stop-then-start swap: what served before, to be started again on rollback.
    fallback: Option<LaunchSpec>,
    /// Old instances draining and stopping after a swap.
    retiring: JoinSet<()>,
    /// Where instances are recorded so a restarted agent finds them; None: they die with the agent.
    recorder: Option<Recorder>,
    /// Turned on for a hand-over exit: [`Supervisor::shutdown`] then hands over instead of stopping.
    handing_over: Arc<AtomicBool>,
    /// How long the last stop-then-start held requests, until [`Supervisor::take_gap`].
    last_gap: Option<Duration>,
}

struct Serving {
    instance: Instance,
    upstream: Arc<Upstream>,
}

impl Supervisor {
    pub fn new(opts: InstanceOptions, drain_timeout: Duration, proxy: Arc<Proxy>) -> Supervisor {
        Supervisor {
            opts,
            drain_timeout,
            proxy,
            http: http_client(),
            gap_wait: DEFAULT_GAP_WAIT,
            active: None,
            standby: None,
            fallback: None,
            retiring: JoinSet::new(),
            recorder: None,
            handing_over: Arc::new(AtomicBool::new(false)),
            last_gap: None,
        }
    }

    /// How long the last stop-then-start gap (a swap, a cold rollback, a restart) held requests, once.
    pub fn take_gap(&mut self) -> Option<Duration> {
        self.last_gap.take()
    }

    /// The switch that turns the next [`Supervisor::shutdown`] into a [`Supervisor::hand_over`].
    pub fn hand_over_switch(&self) -> Arc<AtomicBool> {
        self.handing_over.clone()
    }

    /// Records instances in `recorder` and runs them detached from the agent, so they outlive it (a crash, or
    /// [`Supervisor::hand_over`]) and the next agent can [`Supervisor::adopt`] them.
    pub fn set_recorder(&mut self, recorder: Recorder) {
        self.recorder = Some(recorder);
    }

    async fn start_instance(&self, spec: LaunchSpec) -> Result<Instance, StartError> {
        Instance::start_recorded(&self.opts, spec, &self.http, self.recorder.as_ref()).await
    }

    /// After the agent restarted: takes over the llama-server processes the previous agent recorded. The one
    /// that served `wanted` is adopted when it is the very process recorded (pid and start time), runs the
    /// configured binary, and answers health and a smoke completion: the proxy then forwards to it and nothing
    /// restarts. Every other recorded process that is still ours is drained and stopped (waited for, so its
    /// memory is free before anything new starts); a pid that now names another process is left alone.
    /// Returns the adopted pid.
    pub async fn adopt(&mut self, wanted: Option<&LaunchSpec>) -> Option<u32> {
        let recorder = self.recorder.clone()?;
        let mut adopted = None;
        let mut stopping = false;
        for record in recorder.processes() {
            let record = if record.pid == 0 {
                // Recorded just before a fork the previous agent did not live to complete.
                recorder.remove_pending(record.port);
                match record::find_pending(&record) {
                    Some(found) => {
                        recorder.add(found.clone());
                        found
                    }
                    None => continue,
                }
            } else {
                record
            };
            let pid = record.pid;
            let instance = match Instance::adopt(&record, &recorder) {
                Ok(instance) => instance,
                Err(e) => {
                    tracing::info!(pid, reason = %e, "A recorded llama-server is not ours any more; left alone.");
                    recorder.remove(pid);
                    continue;
                }
            };
            let reason = if adopted.is_some() {
                "another process serves already".to_owned()
            } else if record.role != Role::Serving {
                format!("it was not serving ({:?}) when the previous agent stopped", record.role)
            } else if wanted != Some(&record.spec()) {
                let wanted = wanted.map(|w| w.bundle_digest.as_str()).unwrap_or("nothing");
                AdoptError::OtherModel { pid, got: record.bundle_digest.clone(), wanted: wanted.to_owned() }.to_string()
            } else {
                let binary = instance.spec().settings.program(&self.opts.llama_server).to_owned();
                match instance.prove_adopted(&binary, &self.http).await {
                    Ok(()) => {
                        tracing::info!(pid, upstream = %instance.addr(), bundle = %record.bundle_digest, "Adopted the llama-server the previous agent left serving; no restart.");
                        self.flip_to(instance);
                        adopted = Some(pid);
                        continue;
                    }
                    Err(e) => e.to_string(),
                }
            };
            tracing::warn!(pid, %reason, "Stopping a llama-server the previous agent left running.");
            instance.set_role(Role::Standby);
            let upstream = self.proxy.upstream(instance.addr(), &instance.spec().bundle_digest);
            let (http, drain_timeout, stop) = (self.http.clone(), self.drain_timeout, self.opts.stop);
            self.retiring.spawn(retire(Serving { instance, upstream }, http, drain_timeout, stop).in_current_span());
            stopping = true;
        }
        if stopping {
            self.wait_retired().await;
        }
        adopted
    }

    /// Hand-over exit: what serves keeps running for the next agent to adopt (recorded as serving); a
    /// previous instance kept for rollback and old ones still draining are stopped (bounded). The caller has
    /// stopped the front port and let in-flight requests finish. Returns the pid left running.
    pub async fn hand_over(&mut self) -> Option<u32> {
        self.fallback = None;
        if let Some(standby) = self.standby.take() {
            let (http, drain_timeout, stop) = (self.http.clone(), self.drain_timeout, self.opts.stop);
            self.retiring.spawn(retire(standby, http, drain_timeout, stop).in_current_span());
        }
        self.wait_retired().await;
        let serving = self.active.take()?;
        let pid = serving.instance.pid();
        if self.recorder.is_none() || serving.instance.exit_status().is_some() {
            tracing::warn!("Nothing can be handed over (no record, or llama-server exited); stopping.");
            serving.instance.stop(&self.opts.stop).await;
            return None;
        }
        tracing::info!(pid, upstream = %serving.instance.addr(), "Handing llama-server over to the next agent; it keeps running.");
        serving.instance.release();
        pid
    }

    /// New options (from a reloaded config) for instances started from now on.
    pub fn set_options(&mut self, opts: InstanceOptions, drain_timeout: Duration) {
        self.opts = opts;
        self.drain_timeout = drain_timeout;
    }

    /// How long requests wait for an upstream during a gap (stop-then-start, cold rollback, crash restart).
    pub fn set_gap_wait(&mut self, wait: Duration) {
        self.gap_wait = wait;
    }

    /// The process id of the previous instance kept loaded for rollback, if any.
    pub fn standby_pid(&self) -> Option<u32> {
        self.standby.as_ref().and_then(|s| s.instance.pid())
    }

    /// True when a watched swap can be rolled back.
    pub fn can_roll_back(&self) -> bool {
        self.standby.is_some() || self.fallback.is_some()
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// What is served now, if anything.
    pub fn serving(&self) -> Option<&LaunchSpec> {
        self.active.as_ref().map(|s| s.instance.spec())
    }

    /// The process id of the instance serving now.
    pub fn active_pid(&self) -> Option<u32> {
        self.active.as_ref().and_then(|s| s.instance.pid())
    }

    /// Starts `spec` beside what is served, proves it (health, smoke), and flips the proxy to it. The old
    /// instance then drains and stops in the background ([`Supervisor::wait_retired`] waits for that).
    /// On error nothing changed: the old instance still serves.
    pub async fn swap(&mut self, spec: LaunchSpec) -> Result<(), StartError> {
        self.reap_retired();
        self.commit();
        let instance = self.start_instance(spec).await?;
        if let Some(old) = self.flip_to(instance) {
            let (http, drain_timeout, stop) = (self.http.clone(), self.drain_timeout, self.opts.stop);
            self.retiring.spawn(retire(old, http, drain_timeout, stop).in_current_span());
        }
        Ok(())
    }

    /// A watched swap: like [`Supervisor::swap`] with `strategy`, but what served before is kept for
    /// [`Supervisor::roll_back`] until [`Supervisor::commit`] (blue/green: the old instance stays loaded, out
    /// of rotation; stop-then-start: its launch spec). On error the old model serves again.
    pub async fn swap_watched(&mut self, spec: LaunchSpec, strategy: SwapStrategy) -> Result<(), StartError> {
        self.swap_watched_with(spec, strategy, &mut NoGapWork).await
    }

    /// [`Supervisor::swap_watched`], doing `gap` in a stop-then-start's gap (nothing with blue/green).
    pub async fn swap_watched_with(
        &mut self,
        spec: LaunchSpec,
        strategy: SwapStrategy,
        gap: &mut impl GapWork,
    ) -> Result<(), StartError> {
        self.reap_retired();
        self.commit();
        match strategy {
            SwapStrategy::BlueGreen => {
                let instance = self.start_instance(spec).await?;
                let old = self.flip_to(instance);
                self.standby = old;
                Ok(())
            }
            SwapStrategy::StopThenStart => {
                let old_spec = self.active.as_ref().map(|s| s.instance.spec().clone());
                self.stop_then_start(spec, old_spec.clone(), gap).await?;
                self.fallback = old_spec;
                Ok(())
            }
        }
    }

    /// Stop-then-start: the proxy holds, the serving instance drains and stops, `gap` uses the freed memory,
    /// `spec` starts (and `gap` sees it before the proxy does); if it fails, `restore` (what served before)
    /// starts again. The hold ends either way.
    async fn stop_then_start(
        &mut self,
        spec: LaunchSpec,
        restore: Option<LaunchSpec>,
        gap: &mut impl GapWork,
    ) -> Result<(), StartError> {
        let held = Instant::now();
        self.proxy.hold(self.gap_wait);
        self.proxy.switch(None);
        if let Some(old) = self.active.take() {
            tracing::info!(upstream = %old.instance.addr(), "Stopping the serving llama-server first: memory cannot hold both models.");
            retire(old, self.http.clone(), self.drain_timeout, self.opts.stop).await;
        }
        gap.freed().await;
        let result = match self.start_instance(spec).await {
            Ok(instance) => {
                gap.started(instance.addr()).await;
                self.flip_to(instance);
                Ok(())
            }
            Err(e) => {
                if let Some(restore) = restore {
                    match self.start_instance(restore).await {
                        Ok(instance) => {
                            self.flip_to(instance);
                            tracing::info!("The previous model serves again.");
                        }
                        Err(again) => {
                            tracing::error!(error = %again, "The previous model could not be started again; nothing is served.")
                        }
                    }
                }
                Err(e)
            }
        };
        self.proxy.release();
        self.last_gap = Some(held.elapsed());
        result
    }

    /// Makes `instance` the serving one and returns what served before (out of rotation, not stopped).
    fn flip_to(&mut self, instance: Instance) -> Option<Serving> {
        let info = UpstreamInfo { pid: instance.pid(), load_time: instance.load_time() };
        let upstream = self.proxy.upstream_with(instance.addr(), &instance.spec().bundle_digest, info);
        self.proxy.switch(Some(upstream.clone()));
        tracing::info!(upstream = %instance.addr(), bundle = %instance.spec().bundle_digest, "Front proxy switched.");
        instance.set_role(Role::Serving);
        let old = self.active.replace(Serving { instance, upstream });
        if let Some(old) = &old {
            old.instance.set_role(Role::Standby);
        }
        old
    }

    /// The watch window passed: the previous instance kept for rollback drains and stops.
    pub fn commit(&mut self) {
        self.fallback = None;
        if let Some(old) = self.standby.take() {
            let (http, drain_timeout, stop) = (self.http.clone(), self.drain_timeout, self.opts.stop);
            self.retiring.spawn(retire(old, http, drain_timeout, stop).in_current_span());
        }
    }

    /// Liveness of the serving instance (process, `/health`, `/slots`); an error says what failed.
    pub async fn check_active(&self) -> Result<(), String> {
        match &self.active {
            Some(s) => s.instance.check(&self.http).await,
            None => Err("no llama-server is serving".to_owned()),
        }
    }

    /// Swaps back to what served before the last watched swap: at once when the previous instance is still
    /// loaded, otherwise by stopping the failed one and starting the previous spec (the proxy holds meanwhile).
    pub async fn roll_back(&mut self) -> Result<(), RollbackError> {
        self.reap_retired();
        let standby = self.standby.take();
        if let Some(standby) = standby {
            if standby.instance.exit_status().is_none() {
                if let Some(failed) = self.flip_to_serving(standby) {
                    let (http, drain_timeout, stop) = (self.http.clone(), self.drain_timeout, self.opts.stop);
                    self.retiring.spawn(retire(failed, http, drain_timeout, stop).in_current_span());
                }
                self.fallback = None;
                return Ok(());
            }
            // The previous instance died meanwhile: start it again from its spec.
            self.fallback = Some(standby.instance.spec().clone());
        }
        let Some(spec) = self.fallback.take() else { return Err(RollbackError::NothingToRollBackTo) };
        self.stop_then_start(spec, None, &mut NoGapWork).await.map_err(RollbackError::Start)
    }

    fn flip_to_serving(&mut self, serving: Serving) -> Option<Serving> {
        self.proxy.switch(Some(serving.upstream.clone()));
        tracing::info!(upstream = %serving.instance.addr(), bundle = %serving.instance.spec().bundle_digest, "Front proxy switched back.");
        serving.instance.set_role(Role::Serving);
        let old = self.active.replace(serving);
        if let Some(old) = &old {
            old.instance.set_role(Role::Standby);
        }
        old
    }

    /// Restarts `spec` after a crash with the proxy holding, so requests meanwhile wait (bounded) instead
    /// of failing. Nothing is serving when this is called.
    pub async fn restart(&mut self, spec: LaunchSpec) -> Result<(), StartError> {
        self.stop_then_start(spec, None, &mut NoGapWork).await
    }

    /// Resolves when the serving instance exits (it crashed or was killed); pending forever when none.
    pub async fn active_exited(&self) -> String {
        match &self.active {
            Some(s) => s.instance.exited().await,
            None => std::future::pending().await,
        }
    }

    /// Takes a crashed instance out of the proxy (clients get 503 instead of errors) and returns its spec.
    pub fn remove_exited(&mut self) -> Option<LaunchSpec> {
        if self.active.as_ref().is_some_and(|s| s.instance.exit_status().is_some()) {
            self.proxy.switch(None);
            return self.active.take().map(|s| s.instance.spec().clone());
        }
        None
    }

    /// Waits (bounded by the drain timeout plus the stop sequence) for old instances to drain and stop.
    pub async fn wait_retired(&mut self) {
        let bound =
            self.drain_timeout + self.opts.stop.term_grace * 2 + self.opts.stop.kill_grace + Duration::from_secs(2);
        let all = async { while self.retiring.join_next().await.is_some() {} };
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::error!(
                "Old llama-server instances did not stop in time; abandoning them (they are killed on exit)."
            );
        }
    }

    fn reap_retired(&mut self) {
        while self.retiring.try_join_next().is_some() {}
    }

    /// Graceful shutdown: stop forwarding, let in-flight requests finish (bounded), stop every instance safely.
    /// When the [`Supervisor::hand_over_switch`] is on, [`Supervisor::hand_over`] instead.
    pub async fn shutdown(&mut self) {
        if self.handing_over.load(Ordering::SeqCst) {
            self.hand_over().await;
            return;
        }
        self.stop_serving().await;
    }

    /// Stops serving: the proxy forwards nothing more, in-flight requests finish (bounded), and every
    /// instance is stopped safely (drained, SIGTERM, SIGTERM, SIGKILL).
    pub async fn stop_serving(&mut self) {
        self.proxy.release();
        self.proxy.switch(None);
        self.fallback = None;
        if let Some(standby) = self.standby.take() {
            let (http, drain_timeout, stop) = (self.http.clone(), self.drain_timeout, self.opts.stop);
            self.retiring.spawn(retire(standby, http, drain_timeout, stop).in_current_span());
        }
        if let Some(serving) = self.active.take() {
            let (http, drain_timeout, stop) = (self.http.clone(), self.drain_timeout, self.opts.stop);
            self.retiring.spawn(retire(serving, http, drain_timeout, stop).in_current_span());
        }
        self.wait_retired().await;
    }
}

/// Drains an instance already out of rotation, then stops it safely.
async fn retire(old: Serving, http: HttpClient, drain_timeout: Duration, stop: StopPolicy) {
    let drained = drain(&old, &http, drain_timeout).await;
    if !drained {
        tracing::warn!(
            upstream = %old.instance.addr(),
            in_flight = old.upstream.in_flight(),
            "llama-server still busy after the drain timeout; stopping it anyway."
        );
    }
    old.instance.stop(&stop).await;
}

/// Waits until no proxied request is in flight and `/slots` shows nothing processing; false on timeout.
async fn drain(old: &Serving, http: &HttpClient, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if old.instance.exit_status().is_some() {
            return true;
        }
        if old.upstream.in_flight() == 0 && !old.instance.busy(http).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}
