//! The front port's server: accepts clients on the listener (bound by the agent, or passed by systemd socket
//! activation), serves each connection with HTTP/1.1 through the proxy's router, and stops in one of two ways:
//! - [`FrontStop::Close`] (a stop): no new connections; idle ones are closed and in-flight requests finish.
//! - [`FrontStop::HandOver`] (the agent restarts, llama-server keeps running): no new connections, which wait
//!   in the kernel's accept queue for the next agent when systemd holds the socket; every response from now
//!   on carries `Connection: close`, so a client's next request on a kept-alive connection is still served
//!   here and the one after goes to a new connection (the next agent). Connections still open after the drain
//!   bound are then closed as in a stop. No request in flight is cut.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::HeaderValue;
use http::header::CONNECTION;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How long accepting pauses after an accept error (too many open files, ...), so it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Bound on connections finishing after they were asked to close.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// How the front server stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontStop {
    /// Close idle connections now, finish in-flight requests.
    Close,
    /// Let clients finish on their connections (bounded by the drain time), for the next agent to take over.
    HandOver,
}

/// Serves `router` on `listener` until `stop` resolves, then stops as it says (bounded by `drain`, the
/// agent's drain timeout, plus a few seconds).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    stop: impl Future<Output = FrontStop>,
    drain: Duration,
) {
    let draining = Arc::new(AtomicBool::new(false));
    let (close_tx, close_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    let how = loop {
        tokio::select! {
            how = &mut stop => break how,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, router.clone(), draining.clone(), close_rx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Accepting a client connection failed.");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    // Our descriptor of the listening socket closes here; when systemd passed it, systemd keeps it open and
    // new connections queue in the kernel until the next agent accepts them.
    drop(listener);
    draining.store(true, Ordering::SeqCst);
    tracing::info!(connections = connections.len(), ?how, "The front port stopped accepting.");
    if how == FrontStop::HandOver {
        let all = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(drain, all).await.is_err() {
            tracing::info!(connections = connections.len(), "Closing connections still open after the drain time.");
        }
    }
    let _ = close_tx.send(true);
    let all = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_BOUND, all).await.is_err() {
        tracing::warn!(connections = connections.len(), "Client connections did not finish in time; cut.");
        connections.abort_all();
    }
}

/// One client connection; after `close` turns true it is shut down gracefully (idle: at once; busy: after
/// the response in progress).
async fn connection(
    stream: TcpStream,
    router: axum::Router,
    draining: Arc<AtomicBool>,
    mut close: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let (router, draining) = (router.clone(), draining.clone());
        async move {
            let response = router.oneshot(request.map(Body::new)).await;
            let mut response = match response {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if draining.load(Ordering::SeqCst) {
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "A client connection ended with an error.");
                }
                return;
            }
            _ = close.wait_for(|close| *close), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
