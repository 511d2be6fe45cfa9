//! A scripted fake controller for agent tests: records what the agent sends, sends what the test pushes.

use std::net::SocketAddr;

use alki_shared::proto::{self, Phase, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A scripted controller: forwards what agents send to `up`, sends what the test pushes into the session.
pub struct FakeController {
    token: String,
    up: mpsc::Sender<proto::AgentMessage>,
    /// One receiver per session, in order; a session ends when the test drops the matching sender.
    down: tokio::sync::Mutex<std::collections::VecDeque<mpsc::Receiver<proto::ControllerMessage>>>,
}

impl FakeController {
    /// A controller for `sessions` sessions: messages up, and one sender per session down.
    pub fn new(
        sessions: usize,
        token: &str,
    ) -> (Self, mpsc::Receiver<proto::AgentMessage>, Vec<mpsc::Sender<proto::ControllerMessage>>) {
        let (up, up_rx) = mpsc::channel(64);
        let (senders, receivers): (Vec<_>, std::collections::VecDeque<_>) =
            (0..sessions).map(|_| mpsc::channel(16)).unzip();
        (FakeController { token: token.to_owned(), up, down: tokio::sync::Mutex::new(receivers) }, up_rx, senders)
    }

    pub async fn serve(self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind controller");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(proto::agent_service_server::AgentServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("controller server");
        });
        addr
    }
}

#[tonic::async_trait]
impl proto::agent_service_server::AgentService for FakeController {
    type SessionStream = ReceiverStream<Result<proto::ControllerMessage, tonic::Status>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<proto::AgentMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let auth = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if auth != format!("Bearer {}", self.token) {
            return Err(tonic::Status::unauthenticated("bad token"));
        }
        let mut down =
            self.down.lock().await.pop_front().ok_or_else(|| tonic::Status::unavailable("no more sessions"))?;
        let mut inbound = request.into_inner();
        let up = self.up.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(m)) => { let _ = up.send(m).await; }
                        _ => return,
                    },
                    out = down.recv() => match out {
                        Some(m) => { let _ = tx.send(Ok(m)).await; }
                        None => return,
                    },
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

pub async fn next_where(
    up: &mut mpsc::Receiver<proto::AgentMessage>,
    mut wanted: impl FnMut(&agent_message::Msg) -> bool,
) -> agent_message::Msg {
    loop {
        let message = up.recv().await.expect("agent stream open");
        if let Some(msg) = message.msg
            && wanted(&msg)
        {
            return msg;
        }
    }
}

pub fn status_with(up_phase: Phase, generation: u64) -> impl FnMut(&agent_message::Msg) -> bool {
    move |m| matches!(m, agent_message::Msg::Status(s) if s.generation == generation && s.phase == up_phase as i32)
}

/// The eval report `wanted` picks and the status of `generation` in `phase`, in whichever order they come (an
/// evaluation reported from a swap's gap may arrive before or after the activation's status).
pub async fn report_and_status(
    up: &mut mpsc::Receiver<proto::AgentMessage>,
    wanted: impl Fn(&proto::EvalReport) -> bool,
    phase: Phase,
    generation: u64,
) -> proto::EvalReport {
    let mut is_status = status_with(phase, generation);
    let (mut report, mut status) = (None, false);
    while report.is_none() || !status {
        match next_where(up, |m| matches!(m, agent_message::Msg::Eval(r) if wanted(r)) || is_status(m)).await {
            agent_message::Msg::Eval(r) => report = Some(r),
            _ => status = true,
        }
    }
    report.expect("the loop ends with a report")
}
