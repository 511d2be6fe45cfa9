//! Agent reports into the store by group commit: whatever the sessions queued meanwhile is written in one
//! transaction, with at most one fsync, on a blocking thread.
//!
//! Why: a rollout step moves thousands of devices at once, and each answers with a status; an fsync per
//! report, run on the async workers, held back the very desired states the step was sending (the last
//! device of a 2,500-device step waited 2.2 s). Queued in order through one writer, a device's reports
//! are applied in the order it sent them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Fleet;
use crate::store::{Store, StoreError};

/// Reports waiting to be written; sessions wait (bounded) when the writer falls behind, which slows
/// their agents through HTTP/2 flow control rather than growing memory.
const REPORT_QUEUE: usize = 4096;
/// Reports applied in one pass at most.
const REPORT_BATCH: usize = 1024;

type DeviceChange = Box<dyn FnOnce(&mut proto::Device) + Send>;
/// Store work of its own; `Ok(true)` when the rollout reconciler should look again once it is done.
type StoreWork = Box<dyn FnOnce(&Store) -> Result<bool, StoreError> + Send>;

type Reply = oneshot::Sender<Result<proto::Device, StoreError>>;

/// A change to one device record, committed with the others queued beside it.
struct DeviceReport {
    device_id: DeviceId,
    /// Outcomes must survive a crash; progress is reported again by the agent.
    durable: bool,
    /// Whether the rollout reconciler should look again once it is committed (not for last-seen times).
    wakes: bool,
    change: DeviceChange,
    /// Gets the record as committed (or the error), for a caller that needs it.
    done: Option<Reply>,
}

enum Report {
    Device(DeviceReport),
    /// Writes of their own (telemetry, benchmarks), run in queue order.
    Other {
        device_id: DeviceId,
        work: StoreWork,
    },
}

/// How a queued device change is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// The commit waits for the disk.
    Durable,
    /// Persisted by the next durable commit; a crash may lose it (the agent reports it again).
    Volatile,
}

/// What the writer has done, for `/metrics`.
#[derive(Default)]
pub struct ReportCounters {
    /// Reports queued and not written yet.
    pub queued: AtomicU64,
    /// Reports written (or failed) so far.
    pub written: AtomicU64,
    /// Write transactions committed: reports per commit shows the group commit at work.
    pub commits: AtomicU64,
}

/// The queue into the report writer. Cheap to clone.
#[derive(Clone)]
pub struct ReportWriter {
    tx: mpsc::Sender<Report>,
    counters: Arc<ReportCounters>,
}

/// The writer has stopped (the controller is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the controller is shutting down and records no more agent reports")]
pub struct WriterStopped;

impl ReportWriter {
    /// Starts the writer, counting what it does in `counters`. It runs until [`WriterTask::finish`] (or
    /// until the last `ReportWriter` clone is dropped), and writes what is queued before it ends.
    pub fn start(fleet: Fleet, counters: Arc<ReportCounters>) -> (ReportWriter, WriterTask) {
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let stop = CancellationToken::new();
        let writer = Writer { fleet, counters: counters.clone() };
        let handle = tokio::spawn(write_loop(writer, rx, stop.clone()));
        (ReportWriter { tx, counters }, WriterTask { stop, handle })
    }

    async fn queue(&self, report: Report) -> Result<(), WriterStopped> {
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(report).await.map_err(|_| {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            WriterStopped
        })
    }

    /// Queues a change to a device record. The rollout reconciler looks again once it is committed.
    pub async fn update(
        &self,
        device_id: &DeviceId,
        durability: Durability,
        change: impl FnOnce(&mut proto::Device) + Send + 'static,
    ) -> Result<(), WriterStopped> {
        let report = Report::Device(DeviceReport {
            device_id: device_id.clone(),
            durable: durability == Durability::Durable,
            wakes: true,
            change: Box::new(change),
            done: None,
        });
        self.queue(report).await
    }

    /// Queues a device's last-seen time (durable). Rollout decisions do not depend on it, so unlike
    /// [`ReportWriter::update`] it does not wake the reconciler: heartbeats of a whole fleet would.
    pub async fn touch(&self, device_id: &DeviceId, seen: UnixMs) -> Result<(), WriterStopped> {
        let report = Report::Device(DeviceReport {
            device_id: device_id.clone(),
            durable: true,
            wakes: false,
            change: Box::new(move |d| d.last_seen_unix_ms = seen.as_millis()),
            done: None,
        });
        self.queue(report).await
    }

    /// Changes a device record durably and returns it as committed.
    pub async fn update_and_read(
        &self,
        device_id: &DeviceId,
        change: impl FnOnce(&mut proto::Device) + Send + 'static,
    ) -> Result<Result<proto::Device, StoreError>, WriterStopped> {
        let (done, committed) = oneshot::channel();
        let report = Report::Device(DeviceReport {
            device_id: device_id.clone(),
            durable: true,
            wakes: true,
            change: Box::new(change),
            done: Some(done),
        });
        self.queue(report).await?;
        committed.await.map_err(|_| WriterStopped)
    }

    /// Queues events of a device that no record change carries (its session opening or closing), in order
    /// with its reports.
    pub async fn events(
        &self,
        device_id: &DeviceId,
        events: Vec<crate::store::events::NewEvent>,
    ) -> Result<(), WriterStopped> {
        self.run(device_id, move |store| store.append_events(events).map(|()| false)).await
    }

    /// Queues store work of its own for a device's report (it opens its own transaction). The work returns
    /// whether the rollout reconciler should look again once it is done (benchmarks may let a gate decide).
    pub async fn run(
        &self,
        device_id: &DeviceId,
        work: impl FnOnce(&Store) -> Result<bool, StoreError> + Send + 'static,
    ) -> Result<(), WriterStopped> {
        let report = Report::Other { device_id: device_id.clone(), work: Box::new(work) };
        self.queue(report).await
    }
}

/// The running writer, to stop it at shutdown.
pub struct WriterTask {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl WriterTask {
    /// Refuses new reports, writes those already queued, and returns once the writer has let go of the
    /// store (a controller started next on the same data directory can open it).
    pub async fn finish(self) {
        self.stop.cancel();
        if let Err(error) = self.handle.await {
            tracing::error!(%error, "The report writer ended abnormally.");
        }
    }
}

/// What the writer task writes to and counts in.
#[derive(Clone)]
struct Writer {
    fleet: Fleet,
    counters: Arc<ReportCounters>,
}

async fn write_loop(writer: Writer, mut rx: mpsc::Receiver<Report>, stop: CancellationToken) {
    let mut batch = Vec::with_capacity(REPORT_BATCH);
    loop {
        let received = tokio::select! {
            received = rx.recv_many(&mut batch, REPORT_BATCH) => received,
            _ = stop.cancelled(), if !rx.is_closed() => {
                // Senders now get WriterStopped; what they queued before is still received below.
                rx.close();
                continue;
            }
        };
        if received == 0 {
            return;
        }
        let reports = std::mem::take(&mut batch);
        let pass = writer.clone();
        let changed_devices = match tokio::task::spawn_blocking(move || write(&pass, reports)).await {
            Ok(changed) => changed,
            Err(error) => {
                tracing::error!(%error, "The report writer panicked; the reports of that batch are lost.");
                true
            }
        };
        if changed_devices {
            writer.fleet.changed.notify_one();
        }
    }
}

/// Applies reports in queue order: each run of device changes in one transaction, other work one by one.
/// Returns whether the rollout reconciler should look again.
fn write(writer: &Writer, reports: Vec<Report>) -> bool {
    writer.counters.queued.fetch_sub(reports.len() as u64, Ordering::Relaxed);
    let mut changed = false;
    let mut run = Vec::new();
    for report in reports {
        match report {
            Report::Device(device) => run.push(device),
            Report::Other { device_id, work } => {
                changed |= commit_devices(writer, std::mem::take(&mut run));
                let result = work(&writer.fleet.store);
                writer.counters.commits.fetch_add(1, Ordering::Relaxed);
                writer.counters.written.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(wakes) => changed |= wakes,
                    Err(error) => tracing::error!(%device_id, %error, "Could not record an agent report."),
                }
            }
        }
    }
    changed | commit_devices(writer, run)
}

/// Commits a run of device changes in one transaction, durable when any of them must be. Returns whether
/// any of them wakes the reconciler.
fn commit_devices(writer: &Writer, run: Vec<DeviceReport>) -> bool {
    if run.is_empty() {
        return false;
    }
    let durable = run.iter().any(|r| r.durable);
    let wakes = run.iter().any(|r| r.wakes);
    let (mut ids, mut changes, mut waiters) = (Vec::new(), Vec::new(), Vec::new());
    for report in run {
        ids.push(report.device_id);
        changes.push(Some(report.change));
        waiters.push(report.done);
    }
    let id_refs: Vec<&DeviceId> = ids.iter().collect();
    let result = writer.fleet.store.update_devices_with(&id_refs, durable, |device, i| {
        if let Some(change) = changes[i].take() {
            change(device);
        }
        waiters[i].is_some().then(|| device.clone())
    });
    // Counted before anyone waiting hears of it.
    writer.counters.commits.fetch_add(1, Ordering::Relaxed);
    writer.counters.written.fetch_add(ids.len() as u64, Ordering::Relaxed);
    match result {
        Ok(records) => {
            for (done, record) in waiters.into_iter().zip(records) {
                if let (Some(done), Some(record)) = (done, record) {
                    let _ = done.send(Ok(record));
                }
            }
        }
        Err(error) => {
            tracing::error!(%error, devices = ids.len(), "Could not record agent reports.");
            let message = error.to_string();
            for done in waiters.into_iter().flatten() {
                let _ = done.send(Err(StoreError::Batch(message.clone())));
            }
        }
    }
    wakes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn fleet() -> (tempfile::TempDir, Fleet) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        (dir, Fleet::new(store))
    }

    fn start(fleet: &Fleet) -> (ReportWriter, WriterTask, Arc<ReportCounters>) {
        let counters = Arc::new(ReportCounters::default());
        let (writer, task) = ReportWriter::start(fleet.clone(), counters.clone());
        (writer, task, counters)
    }

    fn pi1() -> DeviceId {
        DeviceId::new("pi-1").expect("device id")
    }

    #[tokio::test]
    async fn a_device_s_reports_are_applied_in_the_order_sent_and_read_back_once_committed() {
        let (_dir, fleet) = fleet();
        let (writer, _task, counters) = start(&fleet);
        for generation in 1..=50 {
            let durability = if generation % 10 == 0 { Durability::Durable } else { Durability::Volatile };
            writer
                .update(&pi1(), durability, move |d| {
                    // Each change sees the one before it, in one transaction or across several.
                    assert_eq!(d.applied_generation, generation - 1, "reports applied out of order");
                    d.applied_generation = generation;
                })
                .await
                .expect("queued");
        }
        let record = writer.update_and_read(&pi1(), |d| d.agent_version = "1.2.3".into()).await.expect("running");
        let record = record.expect("committed");
        assert_eq!((record.applied_generation, record.agent_version.as_str()), (50, "1.2.3"));
        let stored = fleet.store.device(&pi1()).expect("read").expect("device");
        assert_eq!(stored.applied_generation, 50, "what was read back is in the store");
        assert_eq!(counters.queued.load(Ordering::Relaxed), 0);
        assert_eq!(counters.written.load(Ordering::Relaxed), 51);
        assert!(counters.commits.load(Ordering::Relaxed) <= 51);
    }

    #[tokio::test]
    async fn other_work_runs_between_device_changes_in_queue_order() {
        let (_dir, fleet) = fleet();
        let (writer, _task, _) = start(&fleet);
        writer.update(&pi1(), Durability::Volatile, |d| d.applied_generation = 1).await.expect("queued");
        writer
            .run(&pi1(), |store| {
                let seen = store.device(&pi1())?.map(|d| d.applied_generation);
                store.update_device(&pi1(), |d| d.agent_version = format!("saw {seen:?}"))?;
                Ok(false)
            })
            .await
            .expect("queued");
        let record = writer.update_and_read(&pi1(), |d| d.applied_generation += 1).await.expect("running");
        let record = record.expect("committed");
        assert_eq!(record.agent_version, "saw Some(1)", "the work saw the change queued before it");
        assert_eq!(record.applied_generation, 2, "the change queued after it saw the work's write");
    }

    #[tokio::test]
    async fn finishing_writes_what_was_queued_then_refuses_more_and_lets_go_of_the_store() {
        let (_dir, fleet) = fleet();
        let (writer, task, counters) = start(&fleet);
        for generation in 1..=100 {
            writer
                .update(&pi1(), Durability::Volatile, move |d| d.applied_generation = generation)
                .await
                .expect("queued");
        }
        task.finish().await;
        let stored = fleet.store.device(&pi1()).expect("read").expect("device");
        assert_eq!(stored.applied_generation, 100, "every queued report was written before the writer ended");
        let refused = writer.update(&pi1(), Durability::Durable, |d| d.applied_generation = 0).await;
        assert!(refused.is_err(), "a stopped writer refuses reports");
        assert_eq!(counters.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn last_seen_times_are_written_without_waking_the_reconciler_and_other_changes_wake_it() {
        let (_dir, fleet) = fleet();
        let writer = Writer { fleet: fleet.clone(), counters: Arc::default() };
        let device = |wakes| {
            Report::Device(DeviceReport {
                device_id: pi1(),
                durable: true,
                wakes,
                change: Box::new(|d| d.last_seen_unix_ms += 1),
                done: None,
            })
        };
        assert!(!write(&writer, vec![device(false), device(false)]), "last-seen times alone wake nothing");
        assert!(write(&writer, vec![device(false), device(true)]), "a status in the same batch wakes it");
        let stored = fleet.store.device(&pi1()).expect("read").expect("device");
        assert_eq!(stored.last_seen_unix_ms, 4, "every change was written");
    }

    #[tokio::test]
    async fn a_commit_wakes_the_rollout_reconciler() {
        let (_dir, fleet) = fleet();
        let woken = fleet.changed.clone();
        let wait = tokio::spawn(async move { woken.notified().await });
        let (writer, _task, _) = start(&fleet);
        writer.update(&pi1(), Durability::Durable, |d| d.applied_generation = 1).await.expect("queued");
        tokio::time::timeout(std::time::Duration::from_secs(30), wait)
            .await
            .expect("the reconciler was woken")
            .expect("join");
    }
}
