//! `AgentService`: the long-lived session each agent keeps open. A session is admitted (the device's
//! certificate, or with `--insecure-agent-tokens` a token), its Hello recorded, the identity checked again,
//! the Welcome and the desired state sent, and then every message the agent sends is queued for the report
//! writer. From the moment its certificate names the device, the hub knows the session, so decommissioning
//! closes it even while it waits for its Hello.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto::{
    self, AgentMessage, ControllerMessage, Phase, PrestageState, agent_message, agent_service_server::AgentService,
    controller_message::Msg,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::app::App;
use crate::facts::{effective_labels, hardware_class};
use crate::fleet::desired_state;
use crate::fleet::hub::{NotRegistered, SESSION_QUEUE, Waiting};
use crate::fleet::relay::Reply;
use crate::fleet::reports::{Durability, WriterStopped};
use crate::limits::{RateLimiter, RetryAfter};
use crate::store::events::NewEvent;
use crate::store::identity::DeviceIdentity;

/// Most staged bundles kept per device record (an agent keeps few: they cost disk).
const MAX_STAGED: usize = 16;

/// How long an agent has to say Hello after opening its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AgentApi {
    pub app: App,
    /// Admit bearer tokens of role agent (the device id then comes from Hello): `--insecure-agent-tokens`.
    pub insecure_agent_tokens: bool,
    /// Session opens and messages per device (`limits::Limits::device_rate`).
    pub device_limiter: Arc<RateLimiter>,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;
type Outbound = mpsc::Sender<Result<ControllerMessage, Status>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        let identity = self.authenticate(&request)?;
        let hub = &self.app.fleet.hub;
        let waiting = match &identity {
            Some(identity) => Some(hub.expect(&identity.device_id).map_err(not_registered)?),
            None => None,
        };
        let mut inbound = request.into_inner();
        let hello = tokio::select! {
            hello = receive_hello(&mut inbound) => hello?,
            () = closed(waiting.as_ref()) => return Err(decommissioned_meanwhile()),
        };
        let device_id = device_id_of(identity.as_ref(), &hello)?;
        match &identity {
            // Checked again: the device may have been decommissioned or its certificate replaced while
            // the session waited for its Hello.
            Some(identity) => self.recheck(identity)?,
            None => self.refuse_token_for_enrolled(&device_id)?,
        }
        self.admit(&device_id, &hello)?;
        let agent_version = hello.agent_version.clone();
        let record = self.record_hello(&device_id, identity.as_ref(), hello).await?;

        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        self.greet(&tx, &device_id, &record);
        // Weak: the session's stream must still end when the hub drops its sender (shutdown, replacement).
        let refuse = tx.downgrade();
        // Refused if the device was closed since its Hello: the Welcome queued above is never sent.
        let session_id = hub.register(&device_id, waiting.as_ref(), tx).map_err(not_registered)?;
        drop(waiting);
        hub.touch(&device_id, UnixMs(record.last_seen_unix_ms));
        tracing::info!(%device_id, %agent_version, "Agent connected.");
        let online = NewEvent::device(&device_id, "online", format!("agent {agent_version} connected"));
        if let Err(stopped) = self.app.reports.events(&device_id, vec![online]).await {
            tracing::info!(%stopped, "The device's online event was not recorded.");
        }
        self.app.fleet.changed.notify_one();

        let span = tracing::info_span!("session", device_id = %device_id);
        tokio::spawn(deliver_queued(self.app.clone(), device_id.clone()).instrument(span.clone()));
        let session = Session { app: self.app.clone(), device_id, limiter: self.device_limiter.clone() };
        tokio::spawn(session.serve(inbound, refuse, session_id).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl AgentApi {
    /// The device identity the client certificate proves; without one, only the insecure token mode admits
    /// a session (with a token allowing `auth::DEVICE_TOKEN_ACTION`), and the device id comes from Hello.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Option<DeviceIdentity>, Status> {
        let identity = super::enroll::peer_identity(&self.app.store, request)?;
        if identity.is_none() {
            if !self.insecure_agent_tokens {
                return Err(Status::unauthenticated(
                    "agent sessions need a device certificate (mTLS); enroll the device with `alki-agent enroll`",
                ));
            }
            let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
            self.app.auth.authorize(header, crate::auth::DEVICE_TOKEN_ACTION).map_err(super::auth_status)?;
        }
        Ok(identity)
    }

    /// The certificate's identity is still current (not decommissioned, not replaced by a renewal).
    fn recheck(&self, identity: &DeviceIdentity) -> Result<(), Status> {
        self.app
            .store
            .check_device_certificate(&identity.device_id, &identity.serial)
            .map(|_| ())
            .map_err(super::enroll::identity_status)
    }

    /// A token session (`--insecure-agent-tokens`) may not speak for a device that has a certificate identity:
    /// a role-agent token would otherwise take over any enrolled device by naming it in Hello.
    fn refuse_token_for_enrolled(&self, device_id: &DeviceId) -> Result<(), Status> {
        match self.app.store.device_identity(device_id) {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(Status::permission_denied(format!(
                "device {device_id} has a certificate identity: it connects with its certificate (mTLS), not a token"
            ))),
            Err(e) => Err(super::internal(e)),
        }
    }

    /// Refuses a Hello with too many or malformed labels, and a device opening sessions too often.
    fn admit(&self, device_id: &DeviceId, hello: &proto::Hello) -> Result<(), Status> {
        crate::limits::check_labels("Hello labels", hello.labels.iter())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Err(RetryAfter(wait)) = self.device_limiter.check(device_id.as_str(), std::time::Instant::now()) {
            return Err(Status::resource_exhausted(format!(
                "device {device_id} opens sessions too often; retry in {} ms",
                wait.as_millis().max(1)
            )));
        }
        Ok(())
    }

    /// Records what Hello says (its labels as reported ones: the device is selected by its token's and
    /// operators' labels, and by its own only for device-owned keys) and returns the device record as
    /// committed. A change of hardware class is recorded for operators to see.
    async fn record_hello(
        &self,
        device_id: &DeviceId,
        identity: Option<&DeviceIdentity>,
        hello: proto::Hello,
    ) -> Result<proto::Device, Status> {
        let token_labels = identity.map(|i| i.labels.clone()).unwrap_or_default();
        let (trust, token_session) = (self.app.label_trust.clone(), identity.is_none());
        let now = self.app.clock.now();
        let record = self
            .app
            .reports
            .update_and_read(device_id, move |d| {
                let class_before = d.inventory.is_some().then(|| hardware_class(d));
                d.reported_labels = hello.labels;
                d.inventory = hello.inventory;
                d.labels = effective_labels(d, &token_labels, &trust, token_session);
                let class_now = hardware_class(d);
                if let Some(before) = class_before.filter(|before| *before != class_now) {
                    d.previous_class = before;
                    d.class_changed_unix_ms = now.as_millis();
                }
                d.agent_version = hello.agent_version;
                d.running = hello.running;
                d.applied_generation = hello.last_applied_generation;
                d.staged = hello.staged.into_iter().take(MAX_STAGED).collect();
                // A Prestage command the previous session never answered is lost with it: sent again
                // (the rollout reconciler counts the attempt) unless Hello says the bundle is staged.
                if let Some(p) = d.prestage.as_mut().filter(|p| p.state == PrestageState::Sent as i32) {
                    p.state = PrestageState::Unspecified as i32;
                }
                d.last_seen_unix_ms = now.as_millis();
                if d.phase == Phase::Unspecified as i32 {
                    d.phase = if d.running.is_some() { Phase::Active } else { Phase::Idle } as i32;
                }
            })
            .await
            .map_err(|stopped| Status::unavailable(stopped.to_string()))?
            .map_err(super::internal)?;
        if record.class_changed_unix_ms == now.as_millis() {
            tracing::warn!(
                %device_id,
                from = %record.previous_class,
                to = %hardware_class(&record),
                "The device's hardware class changed: its rollouts judge it in its new class from now on."
            );
        }
        Ok(record)
    }

    /// Queues the Welcome (with a fresh registry token) and the device's desired state, if it has one.
    fn greet(&self, tx: &Outbound, device_id: &DeviceId, record: &proto::Device) {
        let mut first = vec![Msg::Welcome(self.app.welcome(device_id, &record.labels))];
        first.extend(desired_state(record).map(Msg::DesiredState));
        for msg in first {
            // The queue is new and larger than two messages: this cannot fail.
            let _ = tx.try_send(Ok(ControllerMessage { msg: Some(msg) }));
        }
    }
}

/// Sends the commands that waited for this device while it was offline, after its Welcome and desired
/// state (expired ones are dropped and counted); each leaves the queue once it is on the session's queue.
async fn deliver_queued(app: App, device_id: DeviceId) {
    let (fleet, id, now) = (app.fleet.clone(), device_id.clone(), app.clock.now());
    let waiting = match super::blocking(move || fleet.commands.waiting(&fleet.store, &id, now)).await {
        Ok(Ok(waiting)) => waiting,
        Ok(Err(error)) => return tracing::error!(%error, "Cannot read the device's queued commands."),
        Err(_) => return,
    };
    let sent: Vec<_> = waiting
        .into_iter()
        .take_while(|queued| app.fleet.hub.send(device_id.as_str(), Msg::Command(queued.command.clone())))
        .collect();
    if sent.is_empty() {
        return;
    }
    tracing::info!(commands = sent.len(), "Delivered the commands queued while the device was offline.");
    let fleet = app.fleet.clone();
    if let Ok(Err(error)) = super::blocking(move || fleet.commands.delivered(&fleet.store, &device_id, &sent)).await {
        tracing::error!(%error, "Cannot forget delivered queued commands; they may be delivered again.");
    }
}

/// Completes when the expected session's device was closed while it waited; never for a token session.
async fn closed(waiting: Option<&Waiting>) {
    match waiting {
        Some(waiting) => waiting.closed().await,
        None => std::future::pending().await,
    }
}

fn decommissioned_meanwhile() -> Status {
    Status::permission_denied("the device was decommissioned while its session waited for its Hello")
}

fn not_registered(error: NotRegistered) -> Status {
    match error {
        NotRegistered::TooManyWaiting(_) => Status::resource_exhausted(error.to_string()),
        NotRegistered::Closed(_) => decommissioned_meanwhile(),
    }
}

/// The session's first message, which must be a Hello, within [`HELLO_TIMEOUT`].
async fn receive_hello(inbound: &mut Streaming<AgentMessage>) -> Result<proto::Hello, Status> {
    match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }))) => Ok(hello),
        Ok(Ok(_)) => Err(Status::invalid_argument("the first message of a session must be a Hello")),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded("no Hello within 30 s of opening the session")),
    }
}

/// The session's device: the certificate's (a Hello naming another device is refused), else Hello's.
fn device_id_of(identity: Option<&DeviceIdentity>, hello: &proto::Hello) -> Result<DeviceId, Status> {
    match identity {
        Some(identity) if !hello.device_id.is_empty() && identity.device_id != *hello.device_id => {
            Err(Status::permission_denied(format!(
                "this certificate belongs to device {:?}, not {:?}",
                identity.device_id.as_str(),
                hello.device_id
            )))
        }
        // The store checked the id when it read the identity (enrollment had validated it).
        Some(identity) => Ok(identity.device_id.clone()),
        None => DeviceId::new(hello.device_id.clone()).map_err(|e| Status::invalid_argument(e.to_string())),
    }
}

/// One admitted session, from its Hello until it ends.
struct Session {
    app: App,
    device_id: DeviceId,
    limiter: Arc<RateLimiter>,
}

impl Session {
    /// Queues every message the agent sends until the session ends (the agent leaves, floods, or the
    /// controller stops), then records when the device was last seen.
    async fn serve(
        self,
        mut inbound: Streaming<AgentMessage>,
        refuse: mpsc::WeakSender<Result<ControllerMessage, Status>>,
        session_id: u64,
    ) {
        let device_id = &self.device_id;
        loop {
            match inbound.next().await {
                Some(Ok(message))
                    if !self.solicited(&message)
                        && self.limiter.check(device_id.as_str(), std::time::Instant::now()).is_err() =>
                {
                    // Nothing of the flood is recorded: the session ends with a clear error instead.
                    tracing::warn!("Agent exceeded its message rate; closing its session.");
                    if let Some(tx) = refuse.upgrade() {
                        let _ = tx.try_send(Err(Status::resource_exhausted(format!(
                            "device {device_id} sends messages faster than this controller allows; reconnect later"
                        ))));
                    }
                    break;
                }
                Some(Ok(message)) => {
                    if let Err(stopped) = self.queue(message).await {
                        tracing::info!(%stopped, "Ending the session.");
                        break;
                    }
                }
                Some(Err(status)) => {
                    tracing::info!(%status, "Agent session ended with an error.");
                    break;
                }
                None => break,
            }
        }
        let offline = self.app.fleet.hub.unregister(device_id, session_id);
        // Answers in flight on this session end with it: their callers are told the device disconnected.
        self.app.fleet.relay.session_ended(device_id, session_id);
        if offline {
            let _ =
                self.app.reports.events(device_id, vec![NewEvent::device(device_id, "offline", "session ended")]).await;
        }
        let gone = self.app.clock.now().as_millis();
        // The writer wakes the reconciler once this is committed.
        let _ = self.app.reports.update(device_id, Durability::Durable, move |d| d.last_seen_unix_ms = gone).await;
        tracing::info!("Agent disconnected.");
    }

    /// A diagnostics chunk an operator waits for: paced and capped by the device, bounded by the relay's
    /// slow-caller wait, so it does not count against the device's message rate (a fast log transfer
    /// would otherwise close the session it travels on).
    fn solicited(&self, message: &AgentMessage) -> bool {
        match &message.msg {
            Some(agent_message::Msg::Diagnostic(chunk)) => {
                self.app.fleet.relay.expects(&self.device_id, &chunk.command_id)
            }
            _ => false,
        }
    }

    /// Queues one message from the agent for the report writer (in-memory facts are kept at once). Only a
    /// stopped writer is an error: a write that fails is logged by the writer.
    async fn queue(&self, message: AgentMessage) -> Result<(), WriterStopped> {
        let (app, device_id) = (&self.app, &self.device_id);
        let (hub, reports, now) = (&app.fleet.hub, &app.reports, app.clock.now());
        match message.msg {
            // Last-seen lives in the hub; the store gets it at most once a minute per device.
            Some(agent_message::Msg::Heartbeat(_)) => {
                if hub.touch(device_id, now) {
                    reports.touch(device_id, now).await?;
                }
                Ok(())
            }
            Some(agent_message::Msg::Status(status)) => {
                hub.touch(device_id, now);
                let (durability, change) = status_change(status, now);
                reports.update(device_id, durability, change).await
            }
            Some(agent_message::Msg::Telemetry(t)) => {
                hub.touch(device_id, now);
                // Counters arrive again with the next report: no fsync for each.
                let (ingest, id) = (app.ingest.clone(), device_id.clone());
                reports.run(device_id, move |store| ingest.telemetry(store, &id, &t, now).map(|()| false)).await
            }
            Some(agent_message::Msg::Benchmark(report)) => {
                // Recorded benchmarks wake the reconciler: performance gates may now decide.
                let (ingest, id) = (app.ingest.clone(), device_id.clone());
                reports.run(device_id, move |store| ingest.benchmarks(store, &id, &report, now)).await
            }
            Some(agent_message::Msg::Prestage(report)) => {
                hub.touch(device_id, now);
                log_prestage(&report);
                reports.update(device_id, Durability::Durable, move |d| record_prestage(d, &report)).await
            }
            Some(agent_message::Msg::Eval(report)) => {
                hub.touch(device_id, now);
                // A stored result wakes the reconciler: quality gates may now decide.
                let (ingest, id) = (app.ingest.clone(), device_id.clone());
                reports
                    .run(device_id, move |store| {
                        crate::insight::evaluations::ingest(store, &ingest.evaluations, &id, &report, now)
                    })
                    .await
            }
            Some(agent_message::Msg::Diagnostic(chunk)) => {
                let (command_id, last) = (chunk.command_id.clone(), chunk.last);
                let relay = &app.fleet.relay;
                if !relay.deliver(device_id, &command_id, Reply::Chunk(chunk)).await
                    && !last
                    && relay.first_orphan(device_id, &command_id)
                {
                    // Nobody waits: stop the device from sending more of it.
                    let cancel = proto::command::Kind::Cancel(proto::CancelCommand { command_id });
                    hub.send(
                        device_id.as_str(),
                        Msg::Command(proto::Command { id: String::new(), kind: Some(cancel) }),
                    );
                }
                Ok(())
            }
            Some(agent_message::Msg::CommandResult(result)) => {
                let (command_id, ok, error) = (result.command_id.clone(), result.ok, result.error.clone());
                // Every result goes in the event log, so one delivered from the offline queue (or whose caller
                // stopped waiting) is still seen: `alkictl events list --device ID --type device.command`.
                let event = NewEvent::device(device_id, "command_result", command_summary(&result));
                if !app.fleet.relay.deliver(device_id, &command_id, Reply::Result(result)).await {
                    tracing::info!(%command_id, ok, %error, "A device command finished with nobody waiting for it.");
                }
                app.reports.events(device_id, vec![event]).await
            }
            Some(agent_message::Msg::Hello(_)) => {
                tracing::warn!("Ignored a second Hello within one session.");
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// A command's result as one line for the event log: what ran and how it ended, with reverify's counts.
fn command_summary(result: &proto::CommandResult) -> String {
    let outcome = if result.ok { "ok" } else { "failed" };
    let mut text = format!("command {} {outcome}", result.command_id);
    for part in [&result.detail, &result.error].into_iter().filter(|p| !p.is_empty()) {
        text.push_str(": ");
        text.push_str(part);
    }
    if result.checked > 0 {
        text.push_str(&format!(
            " ({} blobs checked, {} corrupt, {} removed)",
            result.checked, result.corrupt, result.removed
        ));
    }
    alki_shared::text::printable(&text, 512)
}

/// How an agent's status report changes its device record, and whether that must be durable: outcomes
/// are; progress phases are not worth an fsync each (the agent reports again).
fn status_change(status: proto::Status, now: UnixMs) -> (Durability, impl FnOnce(&mut proto::Device) + Send + 'static) {
    let phase = Phase::try_from(status.phase).unwrap_or(Phase::Unspecified);
    tracing::info!(
        generation = status.generation,
        phase = phase.label(),
        error = status.error.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
        "Agent reported a phase."
    );
    // IDLE with a generation settles a desired state that said serve nothing.
    let settled = matches!(phase, Phase::Active | Phase::Failed)
        || (phase == Phase::Idle && status.generation > 0 && status.serving.is_none());
    let durability = if settled { Durability::Durable } else { Durability::Volatile };
    let change = move |d: &mut proto::Device| {
        d.last_seen_unix_ms = now.as_millis();
        d.phase = status.phase;
        d.error = status.error;
        d.running = status.serving;
        if !status.variant_digest.is_empty() && phase == Phase::Active {
            d.running_variant = status.variant_digest;
            d.running_runtime_platform = status.runtime_platform;
        }
        if settled {
            d.applied_generation = d.applied_generation.max(status.generation);
        }
    };
    (durability, change)
}

fn log_prestage(report: &proto::PrestageReport) {
    let error = report.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
    if report.ready {
        tracing::info!(command_id = %report.command_id, bytes = report.bytes_downloaded, "Agent staged a bundle.");
    } else {
        tracing::warn!(command_id = %report.command_id, error, "Agent could not stage a bundle.");
    }
}

/// Records a device's answer to a Prestage command: a ready bundle joins the device's staged list, and the
/// rollout's command record (when the answer is to it) becomes READY or FAILED with the device's error.
fn record_prestage(d: &mut proto::Device, report: &proto::PrestageReport) {
    if report.ready
        && let Some(bundle) = &report.bundle
    {
        d.staged.retain(|b| b.digest != bundle.digest);
        d.staged.push(bundle.clone());
        let excess = d.staged.len().saturating_sub(MAX_STAGED);
        d.staged.drain(..excess);
    }
    if let Some(p) = d.prestage.as_mut().filter(|p| !report.command_id.is_empty() && p.command_id == report.command_id)
    {
        p.state = if report.ready { PrestageState::Ready } else { PrestageState::Failed } as i32;
        p.error = if report.ready { None } else { report.error.clone() };
        p.bytes_downloaded = report.bytes_downloaded;
    }
}
