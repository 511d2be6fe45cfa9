//! Live agent sessions: one bounded outbound queue per connected device, and when each device was last
//! heard from (kept in memory and persisted coarsely, so heartbeats from thousands of devices do not
//! each cost a durable write).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto::{ControllerMessage, controller_message::Msg};
use tokio::sync::mpsc;

/// Outbound messages a session may have queued before it counts as stuck.
pub const SESSION_QUEUE: usize = 32;

pub type Outbound = mpsc::Sender<Result<ControllerMessage, tonic::Status>>;

/// How stale the stored last-seen time may get before a heartbeat writes it through.
pub const LAST_SEEN_PERSIST: Duration = Duration::from_secs(60);

/// Sessions are registered under a validated [`DeviceId`] and looked up by the id as records carry it.
#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<DeviceId, (u64, Outbound)>>,
    next_id: AtomicU64,
    /// device id → (last seen, last persisted).
    last_seen: Mutex<HashMap<DeviceId, (UnixMs, UnixMs)>>,
}

impl Hub {
    /// Registers a device's new session, replacing (and so closing) any older one. Returns the
    /// session's id, to unregister only itself later.
    pub fn register(&self, device_id: &DeviceId, tx: Outbound) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().insert(device_id.clone(), (id, tx));
        if old.is_some() {
            tracing::info!(%device_id, "A new session replaced the device's previous one.");
        }
        id
    }

    pub fn unregister(&self, device_id: &DeviceId, session_id: u64) {
        let mut sessions = self.lock();
        if sessions.get(device_id).is_some_and(|(id, _)| *id == session_id) {
            sessions.remove(device_id);
        }
    }

    pub fn is_connected(&self, device_id: &str) -> bool {
        self.lock().contains_key(device_id)
    }

    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    /// Ids of the devices with an open session.
    pub fn connected_ids(&self) -> Vec<DeviceId> {
        self.lock().keys().cloned().collect()
    }

    /// Ends a device's session (decommissioning): dropping its sender ends the response stream. True when
    /// one was open.
    pub fn close(&self, device_id: &str) -> bool {
        self.lock().remove(device_id).is_some()
    }

    /// Queues a message without waiting. A session whose queue is full is dropped: desired state is
    /// level-based, so the agent gets everything it missed when it reconnects and says Hello.
    pub fn send(&self, device_id: &str, msg: Msg) -> bool {
        let mut sessions = self.lock();
        let Some((_, tx)) = sessions.get(device_id) else { return false };
        match tx.try_send(Ok(ControllerMessage { msg: Some(msg) })) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(device_id, "Session queue is full; closing it so the agent resynchronises.");
                sessions.remove(device_id);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                sessions.remove(device_id);
                false
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
        let first = hub.register(&id("d1"), tx1);
        let (tx2, mut rx2) = mpsc::channel(1);
        let _second = hub.register(&id("d1"), tx2);
        hub.unregister(&id("d1"), first);
        assert!(hub.is_connected("d1"), "unregistering the old session must not remove the new one");
        assert!(hub.send("d1", Msg::Welcome(Welcome::default())));
        assert!(!hub.send("d1", Msg::Welcome(Welcome::default())), "second message overflows a queue of 1");
        assert!(!hub.is_connected("d1"));
        assert!(rx2.recv().await.is_some());
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
