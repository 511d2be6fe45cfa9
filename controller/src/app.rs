//! The application context: what the controller's parts share, built once by `server` (the store, the
//! fleet's sessions, the rollouts, ingestion, the report writer, the counters and the clock) and handed to
//! the front doors in `api`. Domain modules never see it: each is handed the pieces it uses.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use alki_shared::clock::SharedClock;
use alki_shared::ids::DeviceId;
use alki_shared::proto;

use crate::audit::RefusedCalls;
use crate::auth::Authenticator;
use crate::facts::LabelTrust;
use crate::fleet::Fleet;
use crate::fleet::reports::{ReportCounters, ReportWriter};
use crate::insight::Ingest;
use crate::metrics::{Counters, EventCounts, HttpCounters, Scrape};
use crate::pki::Pki;
use crate::rollout::Rollouts;
use crate::rollout::create::Sources;
use crate::store::{Keyed, Store, StoreError};

/// Cheap to clone: every field is shared.
#[derive(Clone)]
pub struct App {
    /// Where "now" comes from, for every record and report the controller stamps.
    pub clock: SharedClock,
    pub store: Store,
    /// Device records, live sessions, desired-state assignment.
    pub fleet: Fleet,
    pub rollouts: Rollouts,
    /// Calls to the external gates rollouts name.
    pub gate_calls: Arc<crate::rollout::gate_calls::GateCalls>,
    pub auth: Authenticator,
    /// The controller CA: device certificates and registry tokens.
    pub pki: Pki,
    /// The registries bundles come from and the keys rollout candidates must be signed with.
    pub sources: Sources,
    /// Telemetry ingestion: the rollup accumulator and its counters.
    pub ingest: Arc<Ingest>,
    /// Agent reports reach the store through it, by group commit.
    pub reports: ReportWriter,
    /// Registry traffic, counted by `metrics::count_registry`.
    pub http_counters: Arc<HttpCounters>,
    /// What the report writer has done.
    pub report_counters: Arc<ReportCounters>,
    /// Calls the gate counted instead of recording them in the audit log.
    pub refused_calls: Arc<RefusedCalls>,
    /// The web console's logins (the gate admits them; metrics count them).
    pub console_sessions: Arc<crate::console::session::Sessions>,
    /// Which of a device's own labels rollouts select by.
    pub label_trust: Arc<LabelTrust>,
    /// How often agents send a heartbeat (told in every Welcome).
    pub heartbeat_interval: std::time::Duration,
    /// The webhook delivery tasks.
    pub deliveries: Arc<crate::events::deliver::Deliveries>,
    /// The budget of live event watchers.
    pub watchers: crate::events::watch::Watchers,
}

impl App {
    /// The Welcome for `device_id`'s session now, selected by `labels`.
    pub fn welcome(&self, device_id: &DeviceId, labels: &HashMap<String, String>) -> proto::Welcome {
        let registry = &self.sources.registry_host;
        crate::enrollment::welcome(&self.pki, device_id, self.heartbeat_interval, registry, labels, self.clock.now())
    }

    /// What `/metrics` renders now: devices (with their live session state), rollouts, and every counter.
    /// Blocking (reads the store).
    pub fn scrape(&self) -> Result<Scrape, StoreError> {
        Ok(Scrape {
            devices: self.fleet.devices(&Default::default())?,
            rollouts: self.store.rollouts()?.into_iter().map(Keyed::into_record).collect(),
            counters: Counters { events: self.event_counts()?, ..self.counters() },
        })
    }

    /// The event log's position and what webhooks have delivered.
    fn event_counts(&self) -> Result<EventCounts, StoreError> {
        let c = self.deliveries.counters();
        let pending = self
            .store
            .webhooks()?
            .iter()
            .map(|w| Ok((w.id.clone(), crate::events::webhooks::describe(&self.store, w)?.pending)))
            .collect::<Result<_, StoreError>>()?;
        Ok(EventCounts {
            last_id: *self.store.subscribe_events().borrow(),
            delivered: c.delivered.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            given_up: c.given_up.load(Ordering::Relaxed),
            latency_ms_sum: c.latency_ms_sum.load(Ordering::Relaxed),
            pending,
        })
    }

    fn counters(&self) -> Counters {
        let (ingest, reports) = (&self.ingest, &self.report_counters);
        Counters {
            registry: self.http_counters.registry(),
            telemetry_reports: ingest.telemetry_reports.load(Ordering::Relaxed),
            benchmark_results: ingest.benchmark_results.load(Ordering::Relaxed),
            rollups_dropped: ingest.rollups_dropped.load(Ordering::Relaxed),
            rollup_flushes: ingest.rollup_flushes.load(Ordering::Relaxed),
            reports_queued: reports.queued.load(Ordering::Relaxed),
            reports_written: reports.written.load(Ordering::Relaxed),
            report_commits: reports.commits.load(Ordering::Relaxed),
            evaluations: ingest.evaluations.snapshot(),
            refused_calls: self.refused_calls.snapshot(),
            console_sessions: self.console_sessions.len() as u64,
            console_logins: self.console_sessions.logins.load(Ordering::Relaxed),
            console_logins_refused: self.console_sessions.logins_refused.load(Ordering::Relaxed),
            sessions_waiting_hello: self.fleet.hub.waiting_count() as u64,
            events: EventCounts::default(),
            commands_queued: self.fleet.commands.queued.load(Ordering::Relaxed),
            commands_expired: self.fleet.commands.expired.load(Ordering::Relaxed),
            commands_delivered: self.fleet.commands.delivered.load(Ordering::Relaxed),
            diagnostic_bytes: self.fleet.relay.bytes.load(Ordering::Relaxed),
            diagnostics_in_flight: self.fleet.relay.in_flight() as u64,
        }
    }
}
