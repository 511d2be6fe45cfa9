//! The runtime supervisor: llama-server instances behind the front proxy, swapped blue/green (start the
//! candidate beside the old one, prove it, flip the proxy, drain and stop the old one).

pub mod instance;
pub mod proxy;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

pub use instance::{Instance, InstanceOptions, LaunchSpec, StartError, StopPolicy};
pub use proxy::{HttpClient, Proxy, ProxyStats, Upstream, http_client};

const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Owns the llama-server instances and decides which one the proxy forwards to. Driven by one task.
pub struct Supervisor {
    opts: InstanceOptions,
    drain_timeout: Duration,
    proxy: Arc<Proxy>,
    http: HttpClient,
    active: Option<Serving>,
    /// Old instances draining and stopping after a swap.
    retiring: JoinSet<()>,
}

struct Serving {
    instance: Instance,
    upstream: Arc<Upstream>,
}

impl Supervisor {
    pub fn new(opts: InstanceOptions, drain_timeout: Duration, proxy: Arc<Proxy>) -> Supervisor {
        Supervisor { opts, drain_timeout, proxy, http: http_client(), active: None, retiring: JoinSet::new() }
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
        let instance = Instance::start(&self.opts, spec, &self.http).await?;
        let upstream = self.proxy.upstream(instance.addr(), &instance.spec().bundle_digest);
        self.proxy.switch(Some(upstream.clone()));
        tracing::info!(upstream = %instance.addr(), bundle = %instance.spec().bundle_digest, "Front proxy switched.");
        if let Some(old) = self.active.replace(Serving { instance, upstream }) {
            let (http, drain_timeout, stop) = (self.http.clone(), self.drain_timeout, self.opts.stop);
            self.retiring.spawn(retire(old, http, drain_timeout, stop).in_current_span());
        }
        Ok(())
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
    pub async fn shutdown(&mut self) {
        self.proxy.switch(None);
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
