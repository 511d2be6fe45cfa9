//! Answers in flight from devices to waiting operators: a diagnostics stream (logs, support bundle) or a
//! device command's result, by (device, command id). Bounded per device ([`MAX_PER_DEVICE`]) and overall
//! ([`MAX_PENDING`]); each answer's queue is bounded and a delivery waits at most [`DELIVER_WAIT`] for a
//! slow reader (then the answer is dropped and its caller told), so one operator never stalls a device's
//! session. An answer whose session ends is dropped, which ends its caller's stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use alki_shared::ids::DeviceId;
use alki_shared::proto;
use tokio::sync::mpsc;

/// Answers one device may have in flight.
pub const MAX_PER_DEVICE: usize = 4;
/// Answers in flight across the fleet.
pub const MAX_PENDING: usize = 256;
/// Pieces of one answer buffered between the device's session and its caller.
pub const ANSWER_QUEUE: usize = 16;
/// How long a device's session waits for a slow caller to take a piece.
pub const DELIVER_WAIT: Duration = Duration::from_secs(10);

/// A piece of an answer.
#[derive(Debug)]
pub enum Reply {
    Chunk(proto::DiagnosticChunk),
    Result(proto::CommandResult),
}

type Key = (DeviceId, String);

struct Slot {
    /// The session the command went out on (None until sent): only its end drops the answer.
    session: Option<u64>,
    tx: mpsc::Sender<Reply>,
}

/// The answers in flight, and the diagnostics bytes relayed.
#[derive(Default)]
pub struct Relay {
    pending: Mutex<HashMap<Key, Slot>>,
    /// Diagnostics bytes relayed to callers (compressed, as they travel): `alki_diagnostic_bytes_relayed_total`.
    pub bytes: AtomicU64,
    /// Answers recently found with nobody waiting (newest last, at most [`ORPHANS_KEPT`]), so the device is
    /// told to stop once per answer rather than once per piece.
    orphans: Mutex<std::collections::VecDeque<Key>>,
}

/// Orphaned answers remembered.
const ORPHANS_KEPT: usize = 64;

/// Why an answer cannot be awaited now.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    #[error("device {0} already has {MAX_PER_DEVICE} diagnostics or commands in flight; retry when one ends")]
    Device(DeviceId),
    #[error("the controller has {MAX_PENDING} diagnostics or commands in flight; retry shortly")]
    Controller,
}

/// A caller's wait for one answer; dropping it forgets the answer (later pieces are discarded).
pub struct Pending {
    relay: Arc<Relay>,
    key: Key,
    pub rx: mpsc::Receiver<Reply>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.relay.lock().remove(&self.key);
    }
}

impl Relay {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts waiting for `command_id`'s answer from `device_id` (before the command is sent, so no piece
    /// is missed).
    pub fn open(self: &Arc<Self>, device_id: &DeviceId, command_id: &str) -> Result<Pending, Busy> {
        let mut pending = self.lock();
        if pending.len() >= MAX_PENDING {
            return Err(Busy::Controller);
        }
        if pending.keys().filter(|(d, _)| d == device_id).count() >= MAX_PER_DEVICE {
            return Err(Busy::Device(device_id.clone()));
        }
        let (tx, rx) = mpsc::channel(ANSWER_QUEUE);
        let key = (device_id.clone(), command_id.to_owned());
        pending.insert(key.clone(), Slot { session: None, tx });
        Ok(Pending { relay: self.clone(), key, rx })
    }

    /// Notes the session the command went out on.
    pub fn bind(&self, device_id: &DeviceId, command_id: &str, session: u64) {
        if let Some(slot) = self.lock().get_mut(&(device_id.clone(), command_id.to_owned())) {
            slot.session = Some(session);
        }
    }

    /// Hands a piece to its caller, waiting at most [`DELIVER_WAIT`] (the lock is not held meanwhile).
    /// False when nobody waits for it (a caller gone, or too slow: its answer is then dropped).
    pub async fn deliver(&self, device_id: &DeviceId, command_id: &str, reply: Reply) -> bool {
        let key = (device_id.clone(), command_id.to_owned());
        let Some(tx) = self.lock().get(&key).map(|slot| slot.tx.clone()) else { return false };
        let bytes = match &reply {
            Reply::Chunk(chunk) => chunk.data.len() as u64,
            Reply::Result(_) => 0,
        };
        match tokio::time::timeout(DELIVER_WAIT, tx.send(reply)).await {
            Ok(Ok(())) => {
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
                true
            }
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::warn!(%device_id, command_id, "A caller read a device's answer too slowly; dropping it.");
                self.lock().remove(&key);
                false
            }
        }
    }

    /// Whether a caller waits for this answer (its pieces were asked for).
    pub fn expects(&self, device_id: &DeviceId, command_id: &str) -> bool {
        self.lock().contains_key(&(device_id.clone(), command_id.to_owned()))
    }

    /// Whether a piece of an answer nobody waits for is the first seen of that answer (the device should
    /// then be told to stop sending it).
    pub fn first_orphan(&self, device_id: &DeviceId, command_id: &str) -> bool {
        let key = (device_id.clone(), command_id.to_owned());
        let mut orphans = self.orphans.lock().unwrap_or_else(PoisonError::into_inner);
        if orphans.contains(&key) {
            return false;
        }
        if orphans.len() >= ORPHANS_KEPT {
            orphans.pop_front();
        }
        orphans.push_back(key);
        true
    }

    /// A device's session ended: its answers in flight on it end too (their callers see the stream close).
    pub fn session_ended(&self, device_id: &DeviceId, session: u64) {
        self.lock().retain(|(d, _), slot| !(d == device_id && slot.session == Some(session)));
    }

    /// Answers in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_are_bounded_per_device_and_end_with_their_session() {
        let relay = Arc::new(Relay::default());
        let pi = DeviceId::new("pi-1").expect("id");
        let mut held: Vec<Pending> =
            (0..MAX_PER_DEVICE).map(|i| relay.open(&pi, &format!("c{i}")).expect("room")).collect();
        assert_eq!(relay.open(&pi, "over").err(), Some(Busy::Device(pi.clone())));
        relay.bind(&pi, "c0", 7);
        assert!(relay.deliver(&pi, "c0", Reply::Result(Default::default())).await);
        assert!(!relay.deliver(&pi, "nobody", Reply::Result(Default::default())).await);
        relay.session_ended(&pi, 7);
        let first = &mut held[0];
        assert!(first.rx.recv().await.is_some(), "what was delivered is still read");
        assert!(first.rx.recv().await.is_none(), "then the stream ends with the session");
        assert_eq!(relay.in_flight(), MAX_PER_DEVICE - 1, "other answers (not yet sent) stay");
        held.clear();
        assert_eq!(relay.in_flight(), 0, "dropped waits leave nothing behind");
    }
}
