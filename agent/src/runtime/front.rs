//! The front port's server: accepts clients on the listener (bound by the agent, or passed by systemd socket
//! activation), serves each connection with HTTP/1.1 through the proxy's router, and stops in one of two ways:
//! - [`FrontStop::Close`] (a stop): no new connections; idle ones are closed and in-flight requests finish.
//! - [`FrontStop::HandOver`] (the agent restarts, llama-server keeps running): no new connections, which wait
//!   in the kernel's accept queue for the next agent when systemd holds the socket; every response from now
//!   on carries `Connection: close`, so a client's next request on a kept-alive connection is still served
//!   here and the one after goes to a new connection (the next agent). Connections still open after the drain
//!   bound are then closed as in a stop. No request in flight is cut.
//!
//! Bounded against idle-socket floods (slowloris): a client must send a request's headers within the header
//! read timeout (also between requests on a kept-alive connection); at most `max_connections` are open, and
//! at the cap the oldest *idle* connection is closed to make room, so idle sockets can never lock out a
//! client with a request to make. Only when every open connection is busy is a new one answered 503 and
//! closed. The cap stays below the process's file-descriptor limit less a reserve for the controller
//! session, pulls and llama-server.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::HeaderValue;
use http::header::CONNECTION;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::admission::{ClientAddr, FrontCounters, Refusal};

/// How long accepting pauses after an accept error (too many open files, ...), so it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Bound on connections finishing after they were asked to close.
const CLOSE_BOUND: Duration = Duration::from_secs(5);
/// File descriptors kept out of the front port's reach: the controller session, pulls, the content store,
/// llama-server's pipes and sockets, the metrics port.
pub const FD_RESERVE: u64 = 256;
/// What a connection over the cap reads before it is closed.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\n\
connection: close\r\ncontent-length: 90\r\n\r\n\
{\"error\":{\"code\":503,\"type\":\"unavailable\",\"message\":\"too many connections; retry later\"}}\n";

/// The front port's connection bounds, from `[runtime]` in agent.toml.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontLimits {
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and to start its next request on a kept-alive
    /// connection.
    pub header_read_timeout: Duration,
}

impl Default for FrontLimits {
    fn default() -> FrontLimits {
        FrontLimits { max_connections: 512, header_read_timeout: Duration::from_secs(15) }
    }
}

/// Raises the process's soft file-descriptor limit to its hard limit and returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct passed; no other preconditions.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// The connection cap in force: the configured one, lowered to the descriptor limit less [`FD_RESERVE`].
pub fn connection_cap(configured: usize, fd_limit: u64) -> usize {
    let room = usize::try_from(fd_limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX).max(1);
    configured.clamp(1, room)
}

/// One open client connection: whether a request is in service on it, and how to close it.
#[derive(Default)]
struct Slot {
    busy: AtomicUsize,
    evict: Notify,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Slots {
    next: u64,
    open: BTreeMap<u64, Arc<Slot>>,
}

impl Slots {
    /// Makes room for one more connection under `cap`: closes the oldest idle one if needed. False when every
    /// open connection is busy.
    fn make_room(&mut self, cap: usize) -> bool {
        if self.open.len() < cap {
            return true;
        }
        let idle = self.open.iter().find(|(_, s)| s.busy.load(Ordering::SeqCst) == 0).map(|(id, _)| *id);
        match idle.and_then(|id| self.open.remove(&id)) {
            Some(slot) => {
                slot.evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn insert(&mut self) -> (u64, Arc<Slot>) {
        let id = self.next;
        self.next += 1;
        let slot = Arc::new(Slot::default());
        self.open.insert(id, slot.clone());
        (id, slot)
    }
}

/// Removes a connection's slot when its task ends, however it ends.
struct Registered {
    slots: Arc<Mutex<Slots>>,
    id: u64,
    counters: Arc<FrontCounters>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).open.remove(&self.id);
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks a connection busy while a request is in service, response body included.
struct Busy(Arc<Slot>);

impl Busy {
    fn enter(slot: &Arc<Slot>) -> Busy {
        slot.busy.fetch_add(1, Ordering::SeqCst);
        Busy(slot.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its connection marked busy until it is sent or dropped.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl HttpBody for Tracked {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How the front server stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontStop {
    /// Close idle connections now, finish in-flight requests.
    Close,
    /// Let clients finish on their connections (bounded by the drain time), for the next agent to take over.
    HandOver,
}

/// Serves `router` on `listener` until `stop` resolves, then stops as it says (bounded by `drain`, the
/// agent's drain timeout, plus a few seconds). `counters` are the proxy's front counters.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    stop: impl Future<Output = FrontStop>,
    drain: Duration,
    limits: FrontLimits,
    counters: Arc<FrontCounters>,
) {
    let draining = Arc::new(AtomicBool::new(false));
    let (close_tx, close_rx) = watch::channel(false);
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    let how = loop {
        tokio::select! {
            how = &mut stop => break how,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let admitted = {
                        let mut slots = slots.lock().unwrap_or_else(PoisonError::into_inner);
                        let before = slots.open.len();
                        let room = slots.make_room(limits.max_connections);
                        if room && slots.open.len() < before {
                            counters.evicted.fetch_add(1, Ordering::Relaxed);
                        }
                        room.then(|| slots.insert())
                    };
                    let Some((id, slot)) = admitted else {
                        counters.refuse(Refusal::Connections);
                        // Non-blocking: a client that does not read it just loses it.
                        let _ = stream.try_write(OVER_CAP);
                        continue;
                    };
                    counters.open.fetch_add(1, Ordering::Relaxed);
                    let registered = Registered { slots: slots.clone(), id, counters: counters.clone() };
                    let conn = Conn { peer: peer.ip(), slot, limits, draining: draining.clone(), close: close_rx.clone() };
                    connections.spawn(connection(stream, router.clone(), conn, registered));
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

/// What one connection's task needs besides the socket and the router.
struct Conn {
    peer: std::net::IpAddr,
    slot: Arc<Slot>,
    limits: FrontLimits,
    draining: Arc<AtomicBool>,
    close: watch::Receiver<bool>,
}

/// One client connection; after `close` turns true it is shut down gracefully (idle: at once; busy: after
/// the response in progress). Evicted (idle at the cap), it is dropped at once.
async fn connection(stream: TcpStream, router: axum::Router, c: Conn, _registered: Registered) {
    let _ = stream.set_nodelay(true);
    let Conn { peer, slot, limits, draining, mut close } = c;
    let evict = slot.clone();
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let (router, draining) = (router.clone(), draining.clone());
        let busy = Busy::enter(&slot);
        async move {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ClientAddr(peer));
            let response = router.oneshot(request).await;
            let mut response = match response {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if draining.load(Ordering::SeqCst) {
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: busy }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
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
            () = evict.evict.notified() => {
                tracing::debug!(%peer, "An idle client connection was closed to make room at the connection cap.");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_cap_answer_is_valid_http_with_a_json_body() {
        let text = std::str::from_utf8(OVER_CAP).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        serde_json::from_str::<serde_json::Value>(body).expect("json body");
    }

    #[test]
    fn the_cap_stays_under_the_descriptor_limit() {
        assert_eq!(connection_cap(512, 20_000), 512);
        assert_eq!(connection_cap(4096, 1024), 1024 - FD_RESERVE as usize);
        assert_eq!(connection_cap(512, 100), 1, "never zero");
        assert_eq!(connection_cap(0, 20_000), 1);
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room_and_busy_ones_never_do() {
        let mut slots = Slots::default();
        let (_, a) = slots.insert();
        let (_, b) = slots.insert();
        a.busy.fetch_add(1, Ordering::SeqCst);
        assert!(slots.make_room(2), "b is idle");
        assert_eq!(slots.open.len(), 1);
        assert!(Arc::ptr_eq(slots.open.values().next().expect("one left"), &a), "the busy one stays");
        drop(b);
        slots.insert();
        let (_, c) = slots.insert();
        c.busy.fetch_add(1, Ordering::SeqCst);
        assert!(slots.make_room(3), "under the cap");
        let only_busy = {
            let mut s = Slots::default();
            let (_, x) = s.insert();
            x.busy.fetch_add(1, Ordering::SeqCst);
            s.make_room(1)
        };
        assert!(!only_busy, "every connection busy: no room");
    }
}
