//! Live agent sessions: one bounded outbound queue per connected device, the sessions still waiting for
//! their Hello (so decommissioning reaches them too), and when each device was last heard from (kept in
//! memory and persisted coarsely, so heartbeats from thousands of devices do not each cost a durable write).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto::{ControllerMessage, controller_message::Msg};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Outbound messages a session may have queued before it counts as stuck.
pub const SESSION_QUEUE: usize = 32;

pub type Outbound = mpsc::Sender<Result<ControllerMessage, tonic::Status>>;

/// How stale the stored last-seen time may get before a heartbeat writes it through.
pub const LAST_SEEN_PERSIST: Duration = Duration::from_secs(60);
/// Sessions of one device that may wait for their Hello at once; more are refused.
pub const MAX_WAITING_PER_DEVICE: usize = 4;

/// Sessions are registered under a validated [`DeviceId`] and looked up by the id as records carry it.
#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<DeviceId, (u64, Outbound)>>,
    /// Sessions whose certificate named a device and that wait for its Hello, by device. Locked after
    /// `sessions` when both are held.
    waiting: Mutex<HashMap<DeviceId, Vec<(u64, CancellationToken)>>>,
    next_id: AtomicU64,
    /// device id → (last seen, last persisted).
    last_seen: Mutex<HashMap<DeviceId, (UnixMs, UnixMs)>>,
}

/// A session of a known device waiting for its Hello: cancelled when the device is closed (decommissioned)
/// meanwhile. Dropping it forgets the wait.
pub struct Waiting {
    hub: Arc<Hub>,
    device_id: DeviceId,
    id: u64,
    closed: CancellationToken,
}

impl Waiting {
    /// Completes when the device was closed while this session waited.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiting = self.hub.waiting_lock();
        if let Some(list) = waiting.get_mut(&self.device_id) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                waiting.remove(&self.device_id);
            }
        }
    }
}

/// Why a session was not registered.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum NotRegistered {
    #[error("device {0} has {MAX_WAITING_PER_DEVICE} sessions waiting for their Hello already")]
    TooManyWaiting(DeviceId),
    #[error("device {0} was closed (decommissioned) while its session waited for its Hello")]
    Closed(DeviceId),
}

impl Hub {
    /// Notes a session whose certificate names `device_id`, until its Hello: closing the device meanwhile
    /// cancels it, and [`Hub::register`] then refuses it.
    pub fn expect(self: &Arc<Self>, device_id: &DeviceId) -> Result<Waiting, NotRegistered> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = CancellationToken::new();
        let mut waiting = self.waiting_lock();
        let list = waiting.entry(device_id.clone()).or_default();
        if list.len() >= MAX_WAITING_PER_DEVICE {
            return Err(NotRegistered::TooManyWaiting(device_id.clone()));
        }
        list.push((id, closed.clone()));
        Ok(Waiting { hub: self.clone(), device_id: device_id.clone(), id, closed })
    }

    /// Registers a device's new session, replacing (and so closing) any older one; `waiting`, when the
    /// session was expected, must not have been closed meanwhile (checked under the same lock as
    /// [`Hub::close`], so a decommission either sees the session or the session sees it). Returns the
    /// session's id, to unregister only itself later.
    pub fn register(
        &self,
        device_id: &DeviceId,
        waiting: Option<&Waiting>,
        tx: Outbound,
    ) -> Result<u64, NotRegistered> {
        let mut sessions = self.lock();
        if waiting.is_some_and(|w| w.closed.is_cancelled()) {
            return Err(NotRegistered::Closed(device_id.clone()));
        }
        let id = waiting.map_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed), |w| w.id);
        let old = sessions.insert(device_id.clone(), (id, tx));
        if old.is_some() {
            tracing::info!(%device_id, "A new session replaced the device's previous one.");
        }
        Ok(id)
    }

    /// Forgets a session unless a newer one replaced it; true when it was the device's open session (so
    /// the device is now offline).
    pub fn unregister(&self, device_id: &DeviceId, session_id: u64) -> bool {
        let mut sessions = self.lock();
        if sessions.get(device_id).is_some_and(|(id, _)| *id == session_id) {
            sessions.remove(device_id);
            return true;
        }
        false
    }

    pub fn is_connected(&self, device_id: &str) -> bool {
        self.lock().contains_key(device_id)
    }

    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    /// Sessions waiting for their Hello.
    pub fn waiting_count(&self) -> usize {
        self.waiting_lock().values().map(Vec::len).sum()
    }

    /// Ids of the devices with an open session.
    pub fn connected_ids(&self) -> Vec<DeviceId> {
        self.lock().keys().cloned().collect()
    }

    /// Ends a device's sessions (decommissioning): dropping its sender ends the open one's response stream,
    /// and sessions still waiting for their Hello are cancelled. True when one was open or waiting.
    pub fn close(&self, device_id: &str) -> bool {
        let sessions = &mut self.lock();
        let open = sessions.remove(device_id).is_some();
        let waiting = self.waiting_lock().remove(device_id).unwrap_or_default();
        // Cancelled while `sessions` is held: `register` checks the cancellation under that lock, so a
        // session either registered before this (and was removed above) or sees itself cancelled.
        for (_, closed) in &waiting {
            closed.cancel();
        }
        open || !waiting.is_empty()
    }

    /// Queues a message without waiting. A session whose queue is full is dropped: desired state is
    /// level-based, so the agent gets everything it missed when it reconnects and says Hello.
    pub fn send(&self, device_id: &str, msg: Msg) -> bool {
        self.send_on_session(device_id, msg).is_some()
    }

    /// [`Hub::send`], returning the id of the session the message was queued on.
    pub fn send_on_session(&self, device_id: &str, msg: Msg) -> Option<u64> {
        let mut sessions = self.lock();
        let (session, tx) = sessions.get(device_id)?;
        let session = *session;
        match tx.try_send(Ok(ControllerMessage { msg: Some(msg) })) {
            Ok(()) => Some(session),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(device_id, "Session queue is full; closing it so the agent resynchronises.");
                sessions.remove(device_id);
                None
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                sessions.remove(device_id);
                None
            }
        }
    }

    /// Ends every session: dropping the senders ends each response stream, so a graceful server shutdown
    /// is not held open by agents' long-lived sessions (they reconnect to the next controller). Returns how
    /// many were closed.
    pub fn close_all(&self) -> usize {
        let mut sessions = self.lock();
        let n = sessions.len();
        sessions.clear();
        n
    }

    /// Records that a device was heard from at `now`. True when the stored time is older than
    /// [`LAST_SEEN_PERSIST`] and the caller should write it through (the time is then counted as persisted).
    pub fn touch(&self, device_id: &DeviceId, now: UnixMs) -> bool {
        let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen.entry(device_id.clone()).or_insert((now, UnixMs(i64::MIN)));
        entry.0 = entry.0.max(now);
        if now.since(entry.1) >= LAST_SEEN_PERSIST {
            entry.1 = now;
            true
        } else {
            false
        }
    }

    /// When the device was last heard from by this controller process, if at all.
    pub fn last_seen(&self, device_id: &str) -> Option<UnixMs> {
        self.last_seen.lock().unwrap_or_else(|p| p.into_inner()).get(device_id).map(|(seen, _)| *seen)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, (u64, Outbound)>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts/removes).
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn waiting_lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Vec<(u64, CancellationToken)>>> {
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::proto::Welcome;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("device id")
    }

    #[tokio::test]
    async fn a_newer_session_replaces_the_older_and_full_queues_are_dropped() {
        let hub = Hub::default();
        let (tx1, _rx1) = mpsc::channel(1);
        let first = hub.register(&id("d1"), None, tx1).expect("registered");
        let (tx2, mut rx2) = mpsc::channel(1);
        let _second = hub.register(&id("d1"), None, tx2).expect("registered");
        hub.unregister(&id("d1"), first);
        assert!(hub.is_connected("d1"), "unregistering the old session must not remove the new one");
        assert!(hub.send("d1", Msg::Welcome(Welcome::default())));
        assert!(!hub.send("d1", Msg::Welcome(Welcome::default())), "second message overflows a queue of 1");
        assert!(!hub.is_connected("d1"));
        assert!(rx2.recv().await.is_some());
    }

    #[tokio::test]
    async fn closing_a_device_cancels_its_sessions_waiting_for_hello() {
        let hub = Arc::new(Hub::default());
        let waiting = hub.expect(&id("d1")).expect("expected");
        let other = hub.expect(&id("d2")).expect("expected");
        assert!(hub.close("d1"), "a waiting session counts as closed");
        waiting.closed().await;
        let (tx, _rx) = mpsc::channel(1);
        assert_eq!(hub.register(&id("d1"), Some(&waiting), tx), Err(NotRegistered::Closed(id("d1"))));
        assert!(!hub.is_connected("d1"));
        let (tx, _rx) = mpsc::channel(1);
        hub.register(&id("d2"), Some(&other), tx).expect("another device's session registers");
        drop(other);
        let held: Vec<Waiting> = (0..MAX_WAITING_PER_DEVICE).map(|_| hub.expect(&id("d3")).expect("room")).collect();
        assert!(matches!(hub.expect(&id("d3")), Err(NotRegistered::TooManyWaiting(_))));
        drop(held);
        assert!(hub.expect(&id("d3")).is_ok(), "dropped waits make room");
        assert!(hub.waiting_lock().get("d3").is_none(), "dropped waits leave nothing behind");
    }

    #[test]
    fn last_seen_is_kept_in_memory_and_written_through_coarsely() {
        let hub = Hub::default();
        let d1 = id("d1");
        assert!(hub.touch(&d1, UnixMs(1_000)), "the first sighting is persisted");
        assert!(!hub.touch(&d1, UnixMs(11_000)), "a heartbeat 10 s later is not");
        assert_eq!(hub.last_seen("d1"), Some(UnixMs(11_000)));
        assert!(hub.touch(&d1, UnixMs(1_000).plus(LAST_SEEN_PERSIST)));
        assert_eq!(hub.last_seen("d2"), None);
    }
}
