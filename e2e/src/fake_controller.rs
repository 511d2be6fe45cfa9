//! A scripted fake controller for agent tests: records what the agent sends up the session and sends down
//! what the test pushes (no store, no rollouts, one bearer token).

use std::net::SocketAddr;

use alki_shared::proto::{self, agent_message};
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

    /// Serves on 127.0.0.1:0 until the test ends; returns the address.
    pub async fn serve(self) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(proto::agent_service_server::AgentServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
            if let Err(e) = served {
                eprintln!("fake controller: {e}");
            }
        });
        Ok(addr)
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

/// The next message up that `wanted` accepts, skipping others; None once every session has ended.
pub async fn next_where(
    up: &mut mpsc::Receiver<proto::AgentMessage>,
    mut wanted: impl FnMut(&agent_message::Msg) -> bool,
) -> Option<agent_message::Msg> {
    loop {
        let message = up.recv().await?;
        if let Some(msg) = message.msg
            && wanted(&msg)
        {
            return Some(msg);
        }
    }
}
