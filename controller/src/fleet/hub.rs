//! Live agent sessions: one bounded outbound queue per connected device.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use alki_shared::proto::{ControllerMessage, controller_message::Msg};
use tokio::sync::mpsc;

/// Outbound messages a session may have queued before it counts as stuck.
pub const SESSION_QUEUE: usize = 32;

pub type Outbound = mpsc::Sender<Result<ControllerMessage, tonic::Status>>;

#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<String, (u64, Outbound)>>,
    next_id: AtomicU64,
}

impl Hub {
    /// Registers a device's new session, replacing (and so closing) any older one. Returns the
    /// session's id, to unregister only itself later.
    pub fn register(&self, device_id: &str, tx: Outbound) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().insert(device_id.to_owned(), (id, tx));
        if old.is_some() {
            tracing::info!(device_id, "A new session replaced the device's previous one.");
        }
        id
    }

    pub fn unregister(&self, device_id: &str, session_id: u64) {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Outbound)>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts/removes).
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alki_shared::proto::Welcome;

    #[tokio::test]
    async fn a_newer_session_replaces_the_older_and_full_queues_are_dropped() {
        let hub = Hub::default();
        let (tx1, _rx1) = mpsc::channel(1);
        let first = hub.register("d1", tx1);
        let (tx2, mut rx2) = mpsc::channel(1);
        let _second = hub.register("d1", tx2);
        hub.unregister("d1", first);
        assert!(hub.is_connected("d1"), "unregistering the old session must not remove the new one");
        assert!(hub.send("d1", Msg::Welcome(Welcome::default())));
        assert!(!hub.send("d1", Msg::Welcome(Welcome::default())), "second message overflows a queue of 1");
        assert!(!hub.is_connected("d1"));
        assert!(rx2.recv().await.is_some());
    }
}
