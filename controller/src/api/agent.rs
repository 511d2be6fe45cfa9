//! `AgentService`: the long-lived session each agent keeps open.

use std::pin::Pin;
use std::time::Duration;

use alki_shared::ids::DeviceId;
use alki_shared::proto::{
    self, AgentMessage, ControllerMessage, Phase, PrestageState, agent_message, agent_service_server::AgentService,
    controller_message::Msg,
};
use futures::Stream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::auth::{Action, Authenticator};
use crate::fleet::reports::{Durability, ReportWriter, WriterStopped};
use crate::fleet::{Fleet, desired_state, hub::SESSION_QUEUE};

/// Most staged bundles kept per device record (an agent keeps few: they cost disk).
const MAX_STAGED: usize = 16;

/// How long an agent has to say Hello after opening its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AgentApi {
    pub fleet: Fleet,
    pub auth: Authenticator,
    pub heartbeat_interval: Duration,
    /// Signs the devices' short-lived registry tokens.
    pub pki: crate::pki::Pki,
    /// Admit bearer tokens of role agent (the device id then comes from Hello): `--insecure-agent-tokens`.
    pub insecure_agent_tokens: bool,
    /// Session opens and messages per device (`limits::Limits::device_rate`).
    pub device_limiter: std::sync::Arc<crate::limits::RateLimiter>,
    /// Sessions' reports go to the store through it, by group commit.
    pub reports: ReportWriter,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        // The device id is the client certificate's; without one, only the insecure token mode admits a session.
        let identity = super::enroll::peer_identity(&self.fleet, &request)?;
        if identity.is_none() {
            if !self.insecure_agent_tokens {
                return Err(Status::unauthenticated(
                    "agent sessions need a device certificate (mTLS); enroll the device with `alki-agent enroll`",
                ));
            }
            super::authorize(&self.auth, &request, Action::AgentSession)?;
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }))) => hello,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message of a session must be a Hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 30 s of opening the session")),
        };
        let device_id = match &identity {
            Some(identity) if !hello.device_id.is_empty() && hello.device_id != identity.device_id => {
                return Err(Status::permission_denied(format!(
                    "this certificate belongs to device {:?}, not {:?}",
                    identity.device_id, hello.device_id
                )));
            }
            Some(identity) => identity.device_id.clone(),
            None => {
                DeviceId::new(hello.device_id.clone()).map_err(|e| Status::invalid_argument(e.to_string()))?.to_string()
            }
        };
        crate::limits::check_labels("Hello labels", hello.labels.iter())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Err(crate::limits::RetryAfter(wait)) = self.device_limiter.check(&device_id, std::time::Instant::now()) {
            return Err(Status::resource_exhausted(format!(
                "device {device_id} opens sessions too often; retry in {} ms",
                wait.as_millis().max(1)
            )));
        }
        // Labels from the bootstrap token win over what the device reports.
        let mut labels = hello.labels.clone();
        if let Some(identity) = &identity {
            labels.extend(identity.labels.clone());
        }

        let agent_version = hello.agent_version.clone();
        let record = self
            .reports
            .update_and_read(&device_id, move |d| {
                d.labels = labels;
                d.inventory = hello.inventory;
                d.agent_version = hello.agent_version;
                d.running = hello.running;
                d.applied_generation = hello.last_applied_generation;
                d.staged = hello.staged.into_iter().take(MAX_STAGED).collect();
                // A Prestage command the previous session never answered is lost with it: sent again
                // (the rollout reconciler counts the attempt) unless Hello says the bundle is staged.
                if let Some(p) = d.prestage.as_mut().filter(|p| p.state == PrestageState::Sent as i32) {
                    p.state = PrestageState::Unspecified as i32;
                }
                d.last_seen_unix_ms = crate::now_unix_ms();
                if d.phase == Phase::Unspecified as i32 {
                    d.phase = if d.running.is_some() { Phase::Active } else { Phase::Idle } as i32;
                }
            })
            .await
            .map_err(|stopped| Status::unavailable(stopped.to_string()))?
            .map_err(super::internal)?;

        let (tx, rx) = tokio::sync::mpsc::channel(SESSION_QUEUE);
        let (registry_token, registry_token_expires_unix_ms) = super::enroll::registry_token(&self.pki, &device_id);
        let welcome = proto::Welcome {
            device_id: device_id.clone(),
            heartbeat_interval_seconds: self.heartbeat_interval.as_secs().max(1) as u32,
            registry_token,
            registry_token_expires_unix_ms,
            telemetry_interval_seconds: crate::insight::TELEMETRY_INTERVAL_SECONDS,
        };
        let mut first = vec![Msg::Welcome(welcome)];
        first.extend(desired_state(&record).map(Msg::DesiredState));
        for msg in first {
            // The queue is new and larger than two messages: this cannot fail.
            let _ = tx.try_send(Ok(ControllerMessage { msg: Some(msg) }));
        }
        // Weak: the session's stream must still end when the hub drops its sender (shutdown, replacement).
        let refuse = tx.downgrade();
        let limiter = self.device_limiter.clone();
        let session_id = self.fleet.hub.register(&device_id, tx);
        self.fleet.hub.touch(&device_id, record.last_seen_unix_ms);
        tracing::info!(device_id, %agent_version, "Agent connected.");
        self.fleet.changed.notify_one();

        let fleet = self.fleet.clone();
        let reports = self.reports.clone();
        let span = tracing::info_span!("session", device_id = %device_id);
        tokio::spawn(
            async move {
                loop {
                    match inbound.next().await {
                        Some(Ok(_)) if limiter.check(&device_id, std::time::Instant::now()).is_err() => {
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
                            if let Err(stopped) = queue_report(&fleet, &reports, &device_id, message).await {
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
                fleet.hub.unregister(&device_id, session_id);
                let gone = crate::now_unix_ms();
                // The writer wakes the reconciler once this is committed.
                let _ = reports.update(&device_id, Durability::Durable, move |d| d.last_seen_unix_ms = gone).await;
                tracing::info!("Agent disconnected.");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Queues one message from an agent for the report writer (in-memory facts are kept at once). Only a
/// stopped writer is an error: a write that fails is logged by the writer.
async fn queue_report(
    fleet: &Fleet,
    reports: &ReportWriter,
    device_id: &str,
    message: AgentMessage,
) -> Result<(), WriterStopped> {
    let now = crate::now_unix_ms();
    match message.msg {
        // Last-seen lives in the hub; the store gets it at most once a minute per device.
        Some(agent_message::Msg::Heartbeat(_)) => {
            if fleet.hub.touch(device_id, now) {
                reports.touch(device_id, now).await?;
            }
            Ok(())
        }
        Some(agent_message::Msg::Status(status)) => {
            let phase = Phase::try_from(status.phase).unwrap_or(Phase::Unspecified);
            tracing::info!(
                generation = status.generation,
                phase = phase.label(),
                error = status.error.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
                "Agent reported a phase."
            );
            fleet.hub.touch(device_id, now);
            // IDLE with a generation settles a desired state that said serve nothing.
            let settled = matches!(phase, Phase::Active | Phase::Failed)
                || (phase == Phase::Idle && status.generation > 0 && status.serving.is_none());
            // Outcomes are durable; progress phases are not worth an fsync each (the agent reports again).
            let durability = if settled { Durability::Durable } else { Durability::Volatile };
            reports
                .update(device_id, durability, move |d| {
                    d.last_seen_unix_ms = now;
                    d.phase = status.phase;
                    d.error = status.error;
                    d.running = status.serving;
                    if !status.variant_digest.is_empty() && phase == Phase::Active {
                        d.running_variant = status.variant_digest;
                    }
                    if settled {
                        d.applied_generation = d.applied_generation.max(status.generation);
                    }
                })
                .await
        }
        Some(agent_message::Msg::Telemetry(t)) => {
            fleet.hub.touch(device_id, now);
            // Counters arrive again with the next report: no fsync for each.
            let id = device_id.to_owned();
            reports.run(device_id, move |fleet| crate::insight::ingest_telemetry(fleet, &id, &t, now)).await
        }
        Some(agent_message::Msg::Benchmark(report)) => {
            let id = device_id.to_owned();
            reports.run(device_id, move |fleet| crate::insight::ingest_benchmarks(fleet, &id, &report, now)).await
        }
        Some(agent_message::Msg::Prestage(report)) => {
            fleet.hub.touch(device_id, now);
            log_prestage(&report);
            reports.update(device_id, Durability::Durable, move |d| record_prestage(d, &report)).await
        }
        Some(agent_message::Msg::Hello(_)) => {
            tracing::warn!("Ignored a second Hello within one session.");
            Ok(())
        }
        None => Ok(()),
    }
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
