//! The fleet's event log (the durable outbox that webhooks, watchers and `ListEvents` read) and the webhooks'
//! records with their delivery positions.
//!
//! Events are appended inside the transaction that makes them true (a rollout's transition, a device's
//! record change), so an event exists exactly when its change was committed, and never twice. Ids increase
//! by one across the fleet. Bounded: retention by count and age, applied on every append; a webhook whose
//! position falls behind the pruned start counts the lost events as failed.

use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, Table, decode};

const FLEET_EVENTS: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("fleet_events");
/// Webhooks by id, each with its secret and delivery position.
const WEBHOOKS: Table = TableDefinition::new("webhooks");

/// Events kept at most; older ones are pruned first.
pub const MAX_EVENTS: u64 = 200_000;
/// Events older than this are pruned.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Webhooks at most: each has its own delivery task.
pub const MAX_WEBHOOKS: usize = 32;

/// An event before it has its id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewEvent {
    pub kind: String,
    pub rollout_id: String,
    pub device_id: String,
    pub message: String,
    pub rollout_seq: u64,
}

impl NewEvent {
    pub fn device(device_id: &DeviceId, kind: &str, message: impl Into<String>) -> NewEvent {
        NewEvent {
            kind: format!("device.{kind}"),
            device_id: device_id.to_string(),
            message: message.into(),
            ..Default::default()
        }
    }

    /// A rollout's own event, as the fleet's log carries it.
    pub fn rollout(event: &proto::RolloutEvent) -> NewEvent {
        NewEvent {
            kind: format!("rollout.{}", event.kind),
            rollout_id: event.rollout_id.clone(),
            device_id: event.device_id.clone(),
            message: event.message.clone(),
            rollout_seq: event.seq,
        }
    }
}

/// A webhook as stored: its secret is kept because every delivery is signed with it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub types: Vec<String>,
    pub secret: String,
    pub created_unix_ms: i64,
    pub delivered_through: u64,
    pub failed: u64,
    pub last_attempt_unix_ms: i64,
    pub last_status: u16,
    pub last_error: String,
    pub attempts: u32,
}

impl WebhookRecord {
    /// Whether the webhook wants events of this type (its type prefixes; none: every type).
    pub fn wants(&self, kind: &str) -> bool {
        type_matches(&self.types, kind)
    }
}

/// Whether `kind` starts with one of `prefixes` (none: every kind).
pub fn type_matches(prefixes: &[String], kind: &str) -> bool {
    prefixes.is_empty() || prefixes.iter().any(|p| kind.starts_with(p.as_str()))
}

/// Log entries one `events` call reads at most.
pub const MAX_SCAN: usize = 10_000;

/// A page of the log.
#[derive(Clone, Debug, Default)]
pub struct EventPage {
    pub events: Vec<proto::FleetEvent>,
    /// The oldest id kept and the newest id in the log (0 when empty).
    pub first: u64,
    pub last: u64,
    /// The last id this call read: the next call goes on after it.
    pub scanned_through: u64,
}

/// Which events a query wants.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    pub after: u64,
    pub rollout_id: String,
    pub device_id: String,
    pub types: Vec<String>,
    pub limit: usize,
    /// Read from the newest end back to `after` (a page showing the latest events first) instead of on
    /// from `after`.
    pub newest_first: bool,
}

impl EventQuery {
    fn matches(&self, event: &proto::FleetEvent) -> bool {
        (self.rollout_id.is_empty() || event.rollout_id == self.rollout_id)
            && (self.device_id.is_empty() || event.device_id == self.device_id)
            && type_matches(&self.types, &event.r#type)
    }
}

pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(FLEET_EVENTS)?;
    txn.open_table(WEBHOOKS)?;
    Ok(())
}

/// The newest event id in the log (0 when it is empty).
pub(super) fn last_id(db: &redb::Database) -> Result<u64, StoreError> {
    let txn = db.begin_read()?;
    let t = txn.open_table(FLEET_EVENTS)?;
    Ok(t.last()?.map(|(k, _)| k.value()).unwrap_or(0))
}

/// Appends events inside a write transaction and prunes the log; returns the newest id, if any was appended.
pub(super) fn append_in(
    txn: &redb::WriteTransaction,
    events: impl IntoIterator<Item = NewEvent>,
    now: UnixMs,
) -> Result<Option<u64>, StoreError> {
    let mut t = txn.open_table(FLEET_EVENTS)?;
    let first_id = t.last()?.map(|(k, _)| k.value()).unwrap_or(0) + 1;
    let mut appended = None;
    for (id, event) in (first_id..).zip(events) {
        let record = proto::FleetEvent {
            id,
            unix_ms: now.as_millis(),
            r#type: event.kind,
            rollout_id: event.rollout_id,
            device_id: event.device_id,
            message: event.message,
            rollout_seq: event.rollout_seq,
            pending_webhooks: Vec::new(),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Encode(e, "fleet_events".into()))?;
        t.insert(id, bytes.as_slice())?;
        appended = Some(id);
    }
    if appended.is_some() {
        prune(&mut t, now)?;
    }
    Ok(appended)
}

fn prune(t: &mut redb::Table<u64, &[u8]>, now: UnixMs) -> Result<(), StoreError> {
    let cutoff = now.minus(MAX_EVENT_AGE).as_millis();
    let mut excess = t.len()?.saturating_sub(MAX_EVENTS);
    loop {
        let expired = match t.first()? {
            Some((_, v)) => event_time(v.value()).is_some_and(|at| at < cutoff),
            None => break,
        };
        if excess == 0 && !expired {
            break;
        }
        t.pop_first()?;
        excess = excess.saturating_sub(1);
    }
    Ok(())
}

/// An event's time without decoding the rest (an unreadable record counts as old).
fn event_time(bytes: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct At {
        #[serde(default)]
        unix_ms: i64,
    }
    Some(serde_json::from_slice::<At>(bytes).map(|a| a.unix_ms).unwrap_or(i64::MIN))
}

/// Events a device record's change means: it activated another bundle, failed, went into a crash loop, was
/// decommissioned.
pub(super) fn device_changes(before: Option<&proto::Device>, after: &proto::Device) -> Vec<NewEvent> {
    let id = after.id.as_str();
    let new = |kind: &str, message: String| NewEvent {
        kind: format!("device.{kind}"),
        device_id: id.to_owned(),
        message,
        ..Default::default()
    };
    let failed = |d: &proto::Device| d.phase == proto::Phase::Failed as i32;
    let crash_loop = |d: &proto::Device| d.error.as_ref().is_some_and(|e| e.code == proto::ErrorCode::CrashLoop as i32);
    let mut out = Vec::new();
    let error_message = || after.error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
    if crash_loop(after) && !before.is_some_and(crash_loop) {
        out.push(new("crash_loop", error_message()));
    } else if failed(after) && !before.is_some_and(|b| failed(b) && b.desired_generation == after.desired_generation) {
        out.push(new("failed", error_message()));
    }
    if let Some(running) = after.running.as_ref().filter(|r| !r.digest.is_empty())
        && before.and_then(|b| b.running.as_ref()).is_none_or(|r| r.digest != running.digest)
    {
        let tag = if running.tag.is_empty() { String::new() } else { format!(":{}", running.tag) };
        out.push(new("activated", format!("serves {}{tag} ({})", running.repository, running.digest)));
    }
    if after.decommissioned && !before.is_some_and(|b| b.decommissioned) {
        out.push(new("decommissioned", String::new()));
    }
    out
}

impl Store {
    /// Appends events in a transaction of their own (durable), for changes that have no record of their own
    /// (a device's session opening or closing).
    pub fn append_events(&self, events: Vec<NewEvent>) -> Result<(), StoreError> {
        self.append_events_at(events, self.clock.now())
    }

    /// [`Store::append_events`] stamped `now`.
    pub fn append_events_at(&self, events: Vec<NewEvent>, now: UnixMs) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        let last = append_in(&txn, events, now)?;
        txn.commit()?;
        self.announce(last);
        Ok(())
    }

    /// Events matching `query`, oldest first, with how far the log was read: at most `query.limit` events
    /// and [`MAX_SCAN`] entries per call, so a sparse filter over a long log costs bounded work per call.
    pub fn events(&self, query: &EventQuery) -> Result<EventPage, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FLEET_EVENTS)?;
        let first = t.first()?.map(|(k, _)| k.value()).unwrap_or(0);
        let last = t.last()?.map(|(k, _)| k.value()).unwrap_or(0);
        let mut page = EventPage { events: Vec::new(), first, last, scanned_through: query.after };
        let range = t.range(query.after.saturating_add(1)..)?;
        let entries: Box<dyn Iterator<Item = _>> =
            if query.newest_first { Box::new(range.rev()) } else { Box::new(range) };
        for (scanned, entry) in entries.enumerate() {
            if page.events.len() >= query.limit || scanned >= MAX_SCAN {
                break;
            }
            let (k, v) = entry?;
            let event: proto::FleetEvent = decode("fleet_events".into(), &k.value().to_string(), v.value())?;
            page.scanned_through = k.value();
            if query.matches(&event) {
                page.events.push(event);
            }
        }
        Ok(page)
    }

    /// The id events are announced under: watchers wait for it to pass what they have read.
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_announced.subscribe()
    }

    pub(super) fn announce(&self, last: Option<u64>) {
        if let Some(last) = last {
            self.events_announced.send_if_modified(|seen| {
                let newer = last > *seen;
                *seen = (*seen).max(last);
                newer
            });
        }
    }

    pub fn put_webhook(&self, record: &WebhookRecord) -> Result<(), StoreError> {
        self.put(WEBHOOKS, &record.id, record)
    }

    /// Adds a webhook unless there are [`MAX_WEBHOOKS`] already; false when full.
    pub fn add_webhook(&self, record: &WebhookRecord) -> Result<bool, StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Encode(e, "webhooks".into()))?;
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(WEBHOOKS)?;
            if t.len()? >= MAX_WEBHOOKS as u64 {
                return Ok(false);
            }
            t.insert(record.id.as_str(), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(true)
    }

    pub fn webhook(&self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        self.get(WEBHOOKS, id)
    }

    pub fn webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError> {
        self.list(WEBHOOKS)
    }

    /// True when it existed.
    pub fn remove_webhook(&self, id: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = txn.open_table(WEBHOOKS)?.remove(id)?.is_some();
        txn.commit()?;
        Ok(removed)
    }

    /// Records a webhook's delivery state unless it was removed meanwhile; durable only when asked (a crash
    /// may then deliver a few events again, which receivers tell apart by their id).
    pub fn record_delivery(
        &self,
        id: &str,
        durable: bool,
        f: impl FnOnce(&mut WebhookRecord),
    ) -> Result<bool, StoreError> {
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(|e| StoreError::Database(e.into()))?;
        }
        let found = {
            let mut t = txn.open_table(WEBHOOKS)?;
            let current: Option<WebhookRecord> = match t.get(id)? {
                Some(v) => Some(decode("webhooks".into(), id, v.value())?),
                None => None,
            };
            match current {
                Some(mut record) => {
                    f(&mut record);
                    let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Encode(e, "webhooks".into()))?;
                    t.insert(id, bytes.as_slice())?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(phase: proto::Phase, code: proto::ErrorCode, generation: u64) -> proto::Device {
        proto::Device {
            id: "pi-1".into(),
            phase: phase as i32,
            desired_generation: generation,
            error: Some(proto::ActivationError { code: code as i32, message: "boom".into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn device_events_are_derived_once_per_transition() {
        use proto::{ErrorCode as E, Phase as P};
        let active = device(P::Active, E::Unspecified, 1);
        let failed = device(P::Failed, E::PullFailed, 1);
        let kinds = |b: Option<&proto::Device>, a: &proto::Device| {
            device_changes(b, a).into_iter().map(|e| e.kind).collect::<Vec<_>>()
        };
        assert_eq!(kinds(Some(&active), &failed), ["device.failed"]);
        assert!(kinds(Some(&failed), &failed).is_empty(), "a repeated status is not a new event");
        assert_eq!(kinds(Some(&failed), &device(P::Failed, E::PullFailed, 2)), ["device.failed"]);
        let looping = device(P::Failed, E::CrashLoop, 1);
        assert_eq!(kinds(Some(&failed), &looping), ["device.crash_loop"]);
        assert!(kinds(Some(&looping), &looping).is_empty());
        let mut gone = active.clone();
        gone.decommissioned = true;
        assert_eq!(kinds(Some(&active), &gone), ["device.decommissioned"]);
        assert!(kinds(Some(&gone), &gone).is_empty());
        assert!(kinds(None, &active).is_empty());
        let serving = |digest: &str| proto::Device {
            running: Some(proto::BundleRef {
                repository: "acme/tiny".into(),
                digest: digest.into(),
                ..Default::default()
            }),
            ..active.clone()
        };
        assert_eq!(kinds(Some(&active), &serving("sha256:a")), ["device.activated"]);
        assert_eq!(kinds(None, &serving("sha256:a")), ["device.activated"], "a first record serving a bundle");
        assert!(kinds(Some(&serving("sha256:a")), &serving("sha256:a")).is_empty());
        assert_eq!(kinds(Some(&serving("sha256:a")), &serving("sha256:b")), ["device.activated"]);
    }

    #[test]
    fn the_log_numbers_events_across_the_fleet_filters_and_prunes_by_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let mut seen = store.subscribe_events();
        let pi = DeviceId::new("pi-1").expect("id");
        store
            .append_events_at(
                vec![NewEvent::device(&pi, "online", ""), NewEvent::device(&pi, "offline", "")],
                UnixMs(5),
            )
            .expect("append");
        assert_eq!(*seen.borrow_and_update(), 2);
        let rollout =
            proto::RolloutEvent { rollout_id: "ro-1".into(), seq: 7, kind: "advanced".into(), ..Default::default() };
        store.append_events_at(vec![NewEvent::rollout(&rollout)], UnixMs(6)).expect("append");
        let all = |q: EventQuery| {
            let page = store.events(&EventQuery { limit: 100, ..q }).expect("events");
            (page.events, page.first, page.last)
        };
        let (events, first, last) = all(EventQuery::default());
        assert_eq!((events.iter().map(|e| e.id).collect::<Vec<_>>(), first, last), (vec![1, 2, 3], 1, 3));
        assert_eq!(events[2].r#type, "rollout.advanced");
        assert_eq!(events[2].rollout_seq, 7);
        assert_eq!(all(EventQuery { after: 1, ..Default::default() }).0.len(), 2);
        assert_eq!(all(EventQuery { rollout_id: "ro-1".into(), ..Default::default() }).0.len(), 1);
        assert_eq!(all(EventQuery { types: vec!["device.off".into()], ..Default::default() }).0.len(), 1);
        assert_eq!(all(EventQuery { device_id: "pi-1".into(), ..Default::default() }).0.len(), 2);
        let newest = store.events(&EventQuery { limit: 2, newest_first: true, ..Default::default() }).expect("events");
        assert_eq!(newest.events.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 2], "the latest, newest first");

        let txn = store.db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(FLEET_EVENTS).expect("table");
            prune_to(&mut t, 1);
        }
        txn.commit().expect("commit");
        let (events, first, _) = all(EventQuery::default());
        assert_eq!((events.len(), first), (1, 3), "the oldest go first");
    }

    fn prune_to(t: &mut redb::Table<u64, &[u8]>, keep: u64) {
        while t.len().expect("len") > keep {
            t.pop_first().expect("pop");
        }
    }

    #[test]
    fn events_older_than_the_retention_are_pruned_on_append() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let pi = DeviceId::new("pi-1").expect("id");
        store.append_events_at(vec![NewEvent::device(&pi, "online", "")], UnixMs(1_000)).expect("append");
        let later = UnixMs(1_000).plus(MAX_EVENT_AGE).plus(Duration::from_secs(1));
        store.append_events_at(vec![NewEvent::device(&pi, "offline", "")], later).expect("append");
        let page = store.events(&EventQuery { limit: 10, ..Default::default() }).expect("events");
        assert_eq!((page.events.len(), page.first, page.last), (1, 2, 2), "ids keep counting after a prune");
    }

    #[test]
    fn webhooks_are_bounded_and_their_delivery_state_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        for i in 0..MAX_WEBHOOKS {
            let record = WebhookRecord { id: format!("wh-{i}"), ..Default::default() };
            assert!(store.add_webhook(&record).expect("add"));
        }
        assert!(!store.add_webhook(&WebhookRecord { id: "one-too-many".into(), ..Default::default() }).expect("add"));
        assert!(store.record_delivery("wh-3", false, |w| w.delivered_through = 9).expect("record"));
        assert_eq!(store.webhook("wh-3").expect("read").map(|w| w.delivered_through), Some(9));
        assert!(store.remove_webhook("wh-3").expect("remove"));
        assert!(!store.record_delivery("wh-3", true, |w| w.delivered_through = 10).expect("record"));
        assert!(store.webhook("wh-3").expect("read").is_none());
    }
}
