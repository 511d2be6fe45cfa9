//! `DiagnosticsService`: operators read a device's logs and support bundle, relayed from its session as
//! the device sends them, and send it device commands (restart the runtime, reverify its content store),
//! queued while it is offline. The gate let only operators and admins in and audits every call with the
//! device as its target. A caller that stops reading (or drops the stream) makes the device stop too.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use alki_shared::ids::DeviceId;
use alki_shared::proto::{
    self, command::Kind, controller_message::Msg, diagnostics_service_server::DiagnosticsService,
};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::fleet::Hub;
use crate::fleet::relay::{Pending, Reply};

/// How long an answer may be silent before its caller is told (a follow waits as long as the device is
/// connected: quiet logs are normal).
const ANSWER_IDLE: Duration = Duration::from_secs(60);
/// Default and longest wait for a device command's result.
const DEFAULT_COMMAND_WAIT: u32 = 300;
const MAX_COMMAND_WAIT: u32 = 3600;
/// Longest `--since` accepted.
const MAX_SINCE: u64 = 90 * 24 * 3600;

pub struct DiagnosticsApi {
    pub app: App,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::DiagnosticChunk, Status>> + Send>>;

#[tonic::async_trait]
impl DiagnosticsService for DiagnosticsApi {
    type DeviceLogsStream = ChunkStream;
    type SupportBundleStream = ChunkStream;

    async fn device_logs(&self, request: Request<proto::DeviceLogsRequest>) -> Result<Response<ChunkStream>, Status> {
        let principal = super::principal(&request)?;
        let r = request.into_inner();
        if !matches!(r.source.as_str(), "" | "all" | "agent" | "runtime") {
            return Err(Status::invalid_argument(format!(
                "unknown log source {:?}: use agent, runtime or all",
                r.source
            )));
        }
        if r.since_seconds > MAX_SINCE {
            return Err(Status::invalid_argument("--since reaches back at most 90 days"));
        }
        let device_id = self.known_device(&r.device_id).await?;
        let ask = proto::CollectLogs {
            source: r.source.clone(),
            since_seconds: r.since_seconds,
            follow: r.follow,
            max_bytes: r.max_bytes,
        };
        tracing::info!(%device_id, by = %principal.name, source = %r.source, follow = r.follow, "Device logs requested.");
        self.relay(device_id, Kind::CollectLogs(ask), r.follow).await
    }

    async fn support_bundle(
        &self,
        request: Request<proto::SupportBundleRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let principal = super::principal(&request)?;
        let r = request.into_inner();
        let device_id = self.known_device(&r.device_id).await?;
        tracing::info!(%device_id, by = %principal.name, "Support bundle requested.");
        let ask = proto::SupportBundle { log_tail_bytes: r.log_tail_bytes };
        self.relay(device_id, Kind::SupportBundle(ask), false).await
    }

    async fn restart_runtime(
        &self,
        request: Request<proto::DeviceCommandRequest>,
    ) -> Result<Response<proto::DeviceCommandResponse>, Status> {
        self.command(request, Kind::RestartRuntime(proto::RestartRuntime {})).await
    }

    async fn reverify(
        &self,
        request: Request<proto::DeviceCommandRequest>,
    ) -> Result<Response<proto::DeviceCommandResponse>, Status> {
        self.command(request, Kind::Reverify(proto::Reverify {})).await
    }
}

impl DiagnosticsApi {
    /// The device named, which must be known (an id that does not parse names none).
    async fn known_device(&self, id: &str) -> Result<DeviceId, Status> {
        let not_found = || {
            Status::not_found(format!("device {id:?} is not known to this controller; alkictl devices list shows them"))
        };
        let device_id = DeviceId::new(id.to_owned()).map_err(|_| not_found())?;
        let lookup = device_id.clone();
        super::with_store(&self.app.store, move |store| store.device(&lookup)).await?.ok_or_else(not_found)?;
        Ok(device_id)
    }

    /// Sends a diagnostics command and streams its answer to the caller as it comes.
    async fn relay(&self, device_id: DeviceId, kind: Kind, follow: bool) -> Result<Response<ChunkStream>, Status> {
        let fleet = &self.app.fleet;
        let command_id = format!("diag-{}", uuid::Uuid::new_v4().simple());
        let pending =
            fleet.relay.open(&device_id, &command_id).map_err(|busy| Status::resource_exhausted(busy.to_string()))?;
        let command = proto::Command { id: command_id.clone(), kind: Some(kind) };
        let Some(session) = fleet.hub.send_on_session(device_id.as_str(), Msg::Command(command)) else {
            return Err(Status::unavailable(format!(
                "device {device_id} is offline; logs and support bundles are not queued (they are read live): \
                 retry when `alkictl devices get {device_id}` says it is connected"
            )));
        };
        fleet.relay.bind(&device_id, &command_id, session);
        let guard = CancelOnDrop { hub: fleet.hub.clone(), device_id, command_id, done: false };
        Ok(Response::new(Box::pin(answer_stream(pending, guard, follow))))
    }

    /// A device command: sent and its result awaited (bounded) when the device is connected, queued when
    /// it is not.
    async fn command(
        &self,
        request: Request<proto::DeviceCommandRequest>,
        kind: Kind,
    ) -> Result<Response<proto::DeviceCommandResponse>, Status> {
        let principal = super::principal(&request)?;
        let r = request.into_inner();
        let device_id = self.known_device(&r.device_id).await?;
        let wait = Duration::from_secs(u64::from(match r.wait_seconds {
            0 => DEFAULT_COMMAND_WAIT,
            s => s.min(MAX_COMMAND_WAIT),
        }));
        let fleet = self.app.fleet.clone();
        tracing::info!(%device_id, by = %principal.name, "Device command requested.");
        if !fleet.hub.is_connected(device_id.as_str()) {
            let (now, id) = (self.app.clock.now(), device_id.clone());
            let sent = super::blocking(move || crate::insight::queries::send_command(&fleet, &id, &kind, now)).await?;
            if !sent.delivered && !sent.queued {
                return Err(Status::resource_exhausted(sent.reason));
            }
            return Ok(Response::new(proto::DeviceCommandResponse { sent: Some(sent), result: None }));
        }
        let command_id = format!("cmd-{}", uuid::Uuid::new_v4().simple());
        let mut pending =
            fleet.relay.open(&device_id, &command_id).map_err(|busy| Status::resource_exhausted(busy.to_string()))?;
        let command = proto::Command { id: command_id.clone(), kind: Some(kind) };
        let session = fleet.hub.send_on_session(device_id.as_str(), Msg::Command(command)).ok_or_else(|| {
            Status::unavailable(format!("device {device_id} disconnected just now; send the command again to queue it"))
        })?;
        fleet.relay.bind(&device_id, &command_id, session);
        let sent =
            proto::SentCommand { device_id: device_id.to_string(), command_id, delivered: true, ..Default::default() };
        let result = match tokio::time::timeout(wait, pending.rx.recv()).await {
            Ok(Some(Reply::Result(result))) => result,
            Ok(Some(Reply::Chunk(_))) => {
                return Err(Status::internal("the device answered a command with diagnostics"));
            }
            Ok(None) => {
                return Err(Status::unavailable(format!(
                    "device {device_id} disconnected before answering; the command may have run: check its log"
                )));
            }
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "device {device_id} did not answer within {} s; the command still runs there (its log has the result)",
                    wait.as_secs()
                )));
            }
        };
        if !result.ok {
            return Err(Status::failed_precondition(format!("device {device_id}: {}", result.error)));
        }
        Ok(Response::new(proto::DeviceCommandResponse { sent: Some(sent), result: Some(result) }))
    }
}

/// Tells the device to stop sending an answer its caller no longer reads (the stream dropped, Ctrl-C).
struct CancelOnDrop {
    hub: Arc<Hub>,
    device_id: DeviceId,
    command_id: String,
    /// The device ended the answer itself: nothing to cancel.
    done: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        tracing::info!(device_id = %self.device_id, command_id = %self.command_id, "The caller stopped reading; cancelling on the device.");
        let cancel = Kind::Cancel(proto::CancelCommand { command_id: self.command_id.clone() });
        self.hub.send(self.device_id.as_str(), Msg::Command(proto::Command { id: String::new(), kind: Some(cancel) }));
    }
}

/// The answer's chunks as the device sends them, ending with its last chunk (an error, a refusal), the
/// device's disconnection, or (unless following) [`ANSWER_IDLE`] of silence.
fn answer_stream(
    mut pending: Pending,
    mut guard: CancelOnDrop,
    follow: bool,
) -> impl Stream<Item = Result<proto::DiagnosticChunk, Status>> + Send {
    async_stream::stream! {
        loop {
            let next = if follow {
                pending.rx.recv().await
            } else {
                match tokio::time::timeout(ANSWER_IDLE, pending.rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        yield Err(Status::deadline_exceeded(format!(
                            "device {} sent nothing for {} s; try again, or with a smaller --since",
                            guard.device_id, ANSWER_IDLE.as_secs()
                        )));
                        break;
                    }
                }
            };
            let chunk = match next {
                Some(Reply::Chunk(chunk)) => chunk,
                Some(Reply::Result(_)) => continue,
                None => {
                    guard.done = true;
                    yield Err(Status::unavailable(format!("device {} disconnected", guard.device_id)));
                    break;
                }
            };
            if !chunk.last {
                yield Ok(chunk);
                continue;
            }
            guard.done = true;
            if chunk.refused {
                yield Err(Status::failed_precondition(chunk.error));
            } else if !chunk.error.is_empty() {
                yield Err(Status::aborted(format!("device {}: {}", guard.device_id, chunk.error)));
            } else {
                yield Ok(chunk);
            }
            break;
        }
    }
}
