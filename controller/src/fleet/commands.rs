//! The offline command queue: a command an operator sends to a device that is offline (benchmark,
//! calibrate, evaluate, restart-runtime, reverify; never logs or support bundles, which are interactive,
//! nor prestage, which rollouts resend themselves) waits in the store, at most [`MAX_PER_DEVICE`] per
//! device and until it expires, and is delivered right after the device's next Hello. Expired commands are
//! dropped and counted (`alki_commands_expired_total`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto::{self, command::Kind};

use crate::store::commands::QueuedCommand;
use crate::store::{Store, StoreError};

/// Commands one device may have waiting; more are refused (the operator is told).
pub const MAX_PER_DEVICE: usize = 16;
/// How long a queued command waits by default (`--command-queue-ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Whether a command kind waits for an offline device (pure).
pub fn queueable(kind: &Kind) -> bool {
    match kind {
        Kind::RunBenchmark(_)
        | Kind::Calibrate(_)
        | Kind::Evaluate(_)
        | Kind::RestartRuntime(_)
        | Kind::Reverify(_) => true,
        // Logs and bundles are read by a waiting operator; a cancel means nothing later; prestage is the
        // rollout reconciler's to resend.
        Kind::CollectLogs(_) | Kind::SupportBundle(_) | Kind::Cancel(_) | Kind::Prestage(_) => false,
    }
}

/// The commands still live at `now`, and the expired ones (pure).
pub fn split_expired(commands: Vec<QueuedCommand>, now: UnixMs) -> (Vec<QueuedCommand>, Vec<QueuedCommand>) {
    commands.into_iter().partition(|c| c.expires > now)
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "device {0} is offline and has {MAX_PER_DEVICE} commands waiting already; wait for it to return or for them to expire"
    )]
    Full(DeviceId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The queue's expiry and counters (the commands themselves are in the store).
#[derive(Debug)]
pub struct CommandQueue {
    ttl: Duration,
    pub queued: AtomicU64,
    pub expired: AtomicU64,
    pub delivered: AtomicU64,
}

impl Default for CommandQueue {
    fn default() -> Self {
        CommandQueue::new(DEFAULT_TTL)
    }
}

impl CommandQueue {
    pub fn new(ttl: Duration) -> CommandQueue {
        CommandQueue { ttl, queued: AtomicU64::new(0), expired: AtomicU64::new(0), delivered: AtomicU64::new(0) }
    }

    /// Queues `command` for `device_id`; returns when it expires. Blocking (a store write).
    pub fn enqueue(
        &self,
        store: &Store,
        device_id: &DeviceId,
        command: proto::Command,
        now: UnixMs,
    ) -> Result<UnixMs, QueueError> {
        let expires = now.plus(self.ttl);
        let queued = QueuedCommand { command, queued: now, expires };
        store.queue_command(device_id, &queued, MAX_PER_DEVICE)?.map_err(|_| QueueError::Full(device_id.clone()))?;
        self.queued.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%device_id, command_id = %queued.command.id, expires = expires.as_millis(), "Queued a command for an offline device.");
        Ok(expires)
    }

    /// The live commands waiting for `device_id` (expired ones are removed and counted). Blocking.
    pub fn waiting(&self, store: &Store, device_id: &DeviceId, now: UnixMs) -> Result<Vec<QueuedCommand>, StoreError> {
        let (live, expired) = split_expired(store.queued_commands(device_id)?, now);
        if !expired.is_empty() {
            store.remove_queued(device_id, &expired)?;
            self.expired.fetch_add(expired.len() as u64, Ordering::Relaxed);
            tracing::warn!(%device_id, expired = expired.len(), "Dropped queued commands that expired before the device returned.");
        }
        Ok(live)
    }

    /// Forgets the commands delivered to `device_id`. Blocking.
    pub fn delivered(&self, store: &Store, device_id: &DeviceId, sent: &[QueuedCommand]) -> Result<(), StoreError> {
        store.remove_queued(device_id, sent)?;
        self.delivered.fetch_add(sent.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(id: &str, expires: i64) -> QueuedCommand {
        let kind = Some(Kind::Reverify(proto::Reverify {}));
        QueuedCommand { command: proto::Command { id: id.into(), kind }, queued: UnixMs(0), expires: UnixMs(expires) }
    }

    #[test]
    fn the_queue_is_bounded_per_device_and_expired_commands_are_dropped_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let queue = CommandQueue::new(Duration::from_secs(60));
        let pi = DeviceId::new("pi-1").expect("id");
        for i in 0..MAX_PER_DEVICE {
            let c = command(&format!("c{i}"), 0).command;
            queue.enqueue(&store, &pi, c, UnixMs(i as i64)).expect("room");
        }
        assert!(matches!(queue.enqueue(&store, &pi, command("over", 0).command, UnixMs(99)), Err(QueueError::Full(_))));
        let other = DeviceId::new("pi-10").expect("id");
        queue.enqueue(&store, &other, command("x", 0).command, UnixMs(0)).expect("another device has room");
        assert_eq!(queue.waiting(&store, &pi, UnixMs(60_005)).expect("waiting").len(), 10, "6 expired");
        assert_eq!(queue.expired.load(Ordering::Relaxed), 6);
        assert_eq!(store.queued_commands(&other).expect("other").len(), 1, "a prefix id is another device");
        assert!(!queueable(&Kind::CollectLogs(Default::default())) && queueable(&Kind::Reverify(Default::default())));
    }
}
