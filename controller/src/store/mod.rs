//! Controller state in redb: devices, rollouts (with their per-device records and event log), tokens;
//! telemetry, benchmarks and quality evaluations in their own modules.
//! One ACID, fsynced transaction per change.
//!
//! Records are the wire contract's messages kept as JSON (see shared/build.rs): prost defaults fill
//! fields a newer controller added, so old records keep loading. The registry keeps its own tables in
//! the same database (see `registry::index`).

pub mod audit;
pub mod commands;
pub mod evaluations;
pub mod events;
pub mod identity;
mod keyed;
pub mod latency;

use std::path::Path;
use std::sync::Arc;

use alki_shared::clock::{SharedClock, SystemClock, UnixMs};
use alki_shared::ids::{DeviceId, IdError, RolloutId};
use alki_shared::proto;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::{Serialize, de::DeserializeOwned};

mod telemetry;
pub use evaluations::{EvalSample, EvaluationFilter, StoredEvaluation};
pub use keyed::{Keyed, Record};
pub use latency::LatencyHistogram;
pub use telemetry::{BenchmarkFilter, MAX_ROLLUP_KEYS, PerfRecord, Rollup, Traffic};

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

const DEVICES: Table = TableDefinition::new("devices");
const ROLLOUTS: Table = TableDefinition::new("rollouts");
const TOKENS: Table = TableDefinition::new("tokens");
/// Per-device rollout records, keyed `<rollout id>/<device id>`.
const ROLLOUT_DEVICES: Table = TableDefinition::new("rollout_devices");
/// Rollout events, keyed `<rollout id>/<seq, 20 digits>` so a range scan reads them in order.
const EVENTS: Table = TableDefinition::new("events");
/// Bundles of external registries pinned for rollouts (key `host/repository@digest`), for ListBundles.
const EXTERNAL_BUNDLES: Table = TableDefinition::new("external_bundles");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database error: {0}")]
    Database(#[from] redb::Error),
    #[error("store record {table}/{key} is unreadable: {source}")]
    Corrupt { table: String, key: String, source: serde_json::Error },
    /// Ids are checked before they are written, so only something else changing the database stores a bad one.
    #[error(
        "store record {table}/{key} carries an id this controller cannot have written ({source}); the database \
         was changed by something else: restore it from a backup"
    )]
    InvalidId { table: String, key: String, source: IdError },
    #[error("could not encode a {table} record: {0}", table = .1)]
    Encode(serde_json::Error, String),
    /// A write committed together with others failed; each caller gets the cause as text.
    #[error("a batched store write failed: {0}")]
    Batch(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(e.into())
            }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// A token as the store keeps it: only the SHA-256 of the secret, never the secret.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: crate::roles::Role,
    pub created_unix_ms: UnixMs,
    /// Set when an admin revoked the token; the record stays so the audit log's names keep meaning.
    #[serde(default)]
    pub revoked_unix_ms: Option<UnixMs>,
    /// A push token's repository patterns; empty (every repository) for the other roles, and for push
    /// tokens made before tokens had scopes.
    #[serde(default)]
    pub repositories: Vec<crate::scope::RepoPattern>,
}

/// The controller's durable state.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    /// The time events are stamped with.
    clock: SharedClock,
    /// The newest event id committed, for watchers (see `events`).
    events_announced: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Store {
    /// Opens (or creates) `<data_dir>/controller.redb`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Database(redb::StorageError::Io(e).into()))?;
        let db = Database::create(data_dir.join("controller.redb"))?;
        let txn = db.begin_write()?;
        for table in [DEVICES, ROLLOUTS, TOKENS, ROLLOUT_DEVICES, EVENTS, EXTERNAL_BUNDLES]
            .into_iter()
            .chain(telemetry::TABLES)
            .chain(evaluations::TABLES)
        {
            txn.open_table(table)?;
        }
        identity::create_tables(&txn)?;
        commands::create_tables(&txn)?;
        audit::create_tables(&txn)?;
        events::create_tables(&txn)?;
        txn.commit()?;
        let last_event = events::last_id(&db)?;
        let (events_announced, _) = tokio::sync::watch::channel(last_event);
        Ok(Store { db: Arc::new(db), clock: Arc::new(SystemClock), events_announced: Arc::new(events_announced) })
    }

    /// The store with the clock its events are stamped by (the controller's own; tests drive it).
    pub fn with_clock(mut self, clock: SharedClock) -> Store {
        self.clock = clock;
        self
    }

    /// The database handle, for modules that keep their own tables (the registry's index).
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        match t.get(key)? {
            None => Ok(None),
            Some(v) => decode(table.name().to_owned(), key, v.value()).map(Some),
        }
    }

    fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push(decode(table.name().to_owned(), k.value(), v.value())?);
        }
        Ok(out)
    }

    fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Encode(e, table.name().to_owned()))?;
        let txn = self.db.begin_write()?;
        txn.open_table(table)?.insert(key, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Reads a record, lets `f` change it, and writes it back in one transaction, so concurrent
    /// updates of one record (a session's status and a rollout's desired state) never lose each other.
    fn update<T, R>(
        &self,
        table: Table,
        key: &str,
        f: impl FnOnce(Option<T>) -> (Option<T>, R),
    ) -> Result<R, StoreError>
    where
        T: Serialize + DeserializeOwned,
    {
        let txn = self.db.begin_write()?;
        let result = {
            let mut t = txn.open_table(table)?;
            let current = match t.get(key)? {
                None => None,
                Some(v) => Some(decode(table.name().to_owned(), key, v.value())?),
            };
            let (next, result) = f(current);
            if let Some(next) = next {
                let bytes = serde_json::to_vec(&next).map_err(|e| StoreError::Encode(e, table.name().to_owned()))?;
                t.insert(key, bytes.as_slice())?;
            }
            result
        };
        txn.commit()?;
        Ok(result)
    }

    pub fn device(&self, id: &DeviceId) -> Result<Option<proto::Device>, StoreError> {
        self.get(DEVICES, id.as_str())
    }

    /// Every device record, its id checked.
    pub fn devices(&self) -> Result<Vec<Keyed<proto::Device>>, StoreError> {
        self.list_keyed(DEVICES)
    }

    /// Creates or changes a device record atomically; `f` gets the current record (or a new one with only
    /// the id set) and returns whatever the caller wants back.
    pub fn update_device<R>(&self, id: &DeviceId, f: impl FnOnce(&mut proto::Device) -> R) -> Result<R, StoreError> {
        let mut f = Some(f);
        let mut out = self.update_devices_with(&[id], true, |device, _| f.take().map(|f| f(device)))?;
        out.pop().flatten().ok_or_else(|| StoreError::Batch("a device update ran no change".into()))
    }

    /// Changes several device records in one transaction (a rollout step moving many devices at once).
    /// `f` gets each current record (or a new one with only the id set) and its index in `ids`.
    pub fn update_devices<R>(
        &self,
        ids: &[&DeviceId],
        f: impl FnMut(&mut proto::Device, usize) -> R,
    ) -> Result<Vec<R>, StoreError> {
        self.update_devices_with(ids, true, f)
    }

    /// Like `update_devices`; without `durable` the commit does not wait for the disk: for facts a crash may
    /// lose because agents report them again (progress phases), persisted by the next durable commit. An id
    /// may appear more than once: each change sees the one before it.
    pub fn update_devices_with<R>(
        &self,
        ids: &[&DeviceId],
        durable: bool,
        mut f: impl FnMut(&mut proto::Device, usize) -> R,
    ) -> Result<Vec<R>, StoreError> {
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(|e| StoreError::Database(e.into()))?;
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut changes = Vec::new();
        {
            let mut t = txn.open_table(DEVICES)?;
            for (i, id) in ids.iter().enumerate() {
                let current: Option<proto::Device> = match t.get(id.as_str())? {
                    None => None,
                    Some(v) => Some(decode(DEVICES.name().to_owned(), id.as_str(), v.value())?),
                };
                let mut device =
                    current.clone().unwrap_or_else(|| proto::Device { id: id.to_string(), ..Default::default() });
                out.push(f(&mut device, i));
                changes.extend(events::device_changes(current.as_ref(), &device));
                let bytes =
                    serde_json::to_vec(&device).map_err(|e| StoreError::Encode(e, DEVICES.name().to_owned()))?;
                t.insert(id.as_str(), bytes.as_slice())?;
            }
        }
        let last_event = events::append_in(&txn, changes, self.clock.now())?;
        txn.commit()?;
        self.announce(last_event);
        Ok(out)
    }

    /// Records a bundle of an external registry, keeping the time it was first recorded and every tag seen.
    pub fn record_external_bundle(&self, bundle: proto::Bundle) -> Result<(), StoreError> {
        let key = format!("{}/{}@{}", bundle.registry, bundle.repository, bundle.digest);
        self.update(EXTERNAL_BUNDLES, &key, |current: Option<proto::Bundle>| {
            let mut next = bundle;
            if let Some(known) = current {
                next.pushed_unix_ms = known.pushed_unix_ms;
                for tag in known.tags {
                    if !next.tags.contains(&tag) {
                        next.tags.push(tag);
                    }
                }
            }
            (Some(next), ())
        })
    }

    pub fn external_bundles(&self) -> Result<Vec<proto::Bundle>, StoreError> {
        self.list(EXTERNAL_BUNDLES)
    }

    pub fn rollout(&self, id: &RolloutId) -> Result<Option<proto::Rollout>, StoreError> {
        self.get(ROLLOUTS, id.as_str())
    }

    /// Every rollout, its id checked.
    pub fn rollouts(&self) -> Result<Vec<Keyed<proto::Rollout>>, StoreError> {
        self.list_keyed(ROLLOUTS)
    }

    pub fn put_rollout(&self, rollout: &Keyed<proto::Rollout>) -> Result<(), StoreError> {
        self.put(ROLLOUTS, rollout.id().as_str(), rollout.record())
    }

    /// Writes a rollout, its changed device records and its new events in one transaction, so a
    /// restart sees all of a transition or none of it. Records and events are kept under the rollout's id
    /// (their own `rollout_id` fields say the same).
    pub fn commit_rollout(
        &self,
        rollout: &Keyed<proto::Rollout>,
        devices: &[Keyed<proto::RolloutDevice>],
        events: &[proto::RolloutEvent],
    ) -> Result<(), StoreError> {
        let encode = |value: &dyn erased::Encode, table: Table| {
            value.encode().map_err(|e| StoreError::Encode(e, table.name().to_owned()))
        };
        let id = rollout.id();
        let txn = self.db.begin_write()?;
        {
            txn.open_table(ROLLOUTS)?.insert(id.as_str(), encode(rollout.record(), ROLLOUTS)?.as_slice())?;
            let mut t = txn.open_table(ROLLOUT_DEVICES)?;
            for d in devices {
                t.insert(format!("{id}/{}", d.id()).as_str(), encode(d.record(), ROLLOUT_DEVICES)?.as_slice())?;
            }
            let mut t = txn.open_table(EVENTS)?;
            for e in events {
                t.insert(event_key(id, e.seq).as_str(), encode(e, EVENTS)?.as_slice())?;
            }
        }
        let last_event = events::append_in(&txn, events.iter().map(events::NewEvent::rollout), self.clock.now())?;
        txn.commit()?;
        self.announce(last_event);
        Ok(())
    }

    /// The per-device records of one rollout, their device ids checked.
    pub fn rollout_devices(&self, rollout_id: &RolloutId) -> Result<Vec<Keyed<proto::RolloutDevice>>, StoreError> {
        self.range_keyed(ROLLOUT_DEVICES, &format!("{rollout_id}/"), &format!("{rollout_id}0"))
    }

    /// Events of one rollout with a sequence number above `after_seq`, oldest first.
    pub fn rollout_events(
        &self,
        rollout_id: &RolloutId,
        after_seq: u64,
    ) -> Result<Vec<proto::RolloutEvent>, StoreError> {
        let start = event_key(rollout_id, after_seq.saturating_add(1));
        self.range(EVENTS, &start, &format!("{rollout_id}0"))
    }

    fn range<T: DeserializeOwned>(&self, table: Table, start: &str, end: &str) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.range(start..end)? {
            let (k, v) = entry?;
            out.push(decode(table.name().to_owned(), k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Records in a key range, their ids checked.
    fn range_keyed<T: Record + DeserializeOwned>(
        &self,
        table: Table,
        start: &str,
        end: &str,
    ) -> Result<Vec<Keyed<T>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.range(start..end)? {
            let (k, v) = entry?;
            out.push(keyed(table, k.value(), decode(table.name().to_owned(), k.value(), v.value())?)?);
        }
        Ok(out)
    }

    /// Every record of a table, its id checked.
    fn list_keyed<T: Record + DeserializeOwned>(&self, table: Table) -> Result<Vec<Keyed<T>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push(keyed(table, k.value(), decode(table.name().to_owned(), k.value(), v.value())?)?);
        }
        Ok(out)
    }

    pub fn token(&self, hash_hex: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(TOKENS, hash_hex)
    }

    pub fn put_token(&self, hash_hex: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.put(TOKENS, hash_hex, record)
    }

    /// Every token record with the hex SHA-256 it is kept under.
    pub fn tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_owned(), decode(TOKENS.name().to_owned(), k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Marks the token stored under `hash_hex` revoked (keeping the first revocation time) and returns it.
    pub fn revoke_token(&self, hash_hex: &str, now: UnixMs) -> Result<Option<TokenRecord>, StoreError> {
        self.update(TOKENS, hash_hex, |current: Option<TokenRecord>| match current {
            None => (None, None),
            Some(mut record) => {
                record.revoked_unix_ms.get_or_insert(now);
                (Some(record.clone()), Some(record))
            }
        })
    }

    pub fn token_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(TOKENS)?.len()?)
    }
}

fn event_key(rollout_id: &RolloutId, seq: u64) -> String {
    format!("{rollout_id}/{seq:020}")
}

/// A decoded record with its id checked: a bad one is an error naming the record, never a panic.
fn keyed<T: Record>(table: Table, key: &str, record: T) -> Result<Keyed<T>, StoreError> {
    Keyed::new(record).map_err(|source| StoreError::InvalidId {
        table: table.name().to_owned(),
        key: key.to_owned(),
        source,
    })
}

/// JSON encoding behind a trait object, so one closure encodes every record type of a transaction.
mod erased {
    pub trait Encode {
        fn encode(&self) -> Result<Vec<u8>, serde_json::Error>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}

fn decode<T: DeserializeOwned>(table: String, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt { table, key: key.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device_id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("device id")
    }

    fn rollout_id(s: &str) -> RolloutId {
        RolloutId::new(s).expect("rollout id")
    }

    #[test]
    fn device_updates_persist_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pi1 = device_id("pi-1");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .update_device(&pi1, |d| {
                    d.agent_version = "1.0".into();
                    d.desired_generation = 3;
                })
                .expect("update");
            store.update_device(&pi1, |d| d.applied_generation = 3).expect("second update");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let d = store.device(&pi1).expect("read").expect("present");
        assert_eq!((d.agent_version.as_str(), d.desired_generation, d.applied_generation), ("1.0", 3, 3));
        let all = store.devices().expect("list");
        assert_eq!(all.iter().map(|d| d.id()).collect::<Vec<_>>(), [&pi1]);
        assert_eq!(all[0].record().id, "pi-1", "a new record carries its id");
        assert!(store.device(&device_id("nope")).expect("read").is_none());
    }

    #[test]
    fn rollout_records_and_events_are_scoped_to_their_rollout_and_ordered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for (id, n) in [("ro-a", 12u64), ("ro-b", 2)] {
            let id = rollout_id(id);
            let rollout = Keyed::with_id(id.clone(), proto::Rollout { event_seq: n, ..Default::default() });
            let devices: Vec<_> = (0..3)
                .map(|i| {
                    let record = proto::RolloutDevice { rollout_id: id.to_string(), ..Default::default() };
                    Keyed::with_id(device_id(&format!("d{i}")), record)
                })
                .collect();
            let events: Vec<_> = (1..=n)
                .map(|seq| proto::RolloutEvent { rollout_id: id.to_string(), seq, ..Default::default() })
                .collect();
            store.commit_rollout(&rollout, &devices, &events).expect("commit");
        }
        let (a, b) = (rollout_id("ro-a"), rollout_id("ro-b"));
        let records = store.rollout_devices(&a).expect("devices");
        assert_eq!(records.iter().map(|r| r.id().as_str()).collect::<Vec<_>>(), ["d0", "d1", "d2"]);
        assert_eq!(records[1].record().device_id, "d1");
        let seqs: Vec<u64> = store.rollout_events(&a, 0).expect("events").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
        assert_eq!(store.rollout_events(&a, 10).expect("events").len(), 2);
        assert_eq!(store.rollout_events(&b, 0).expect("events").len(), 2);
        assert_eq!(store.rollout(&b).expect("read").map(|r| r.event_seq), Some(2));
        assert_eq!(store.rollouts().expect("list").iter().map(|r| r.id()).collect::<Vec<_>>(), [&a, &b]);
    }

    #[test]
    fn a_stored_id_that_does_not_parse_is_an_error_naming_the_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        // Only something writing the database behind the controller's back stores such a record.
        store.put(DEVICES, "bad id", &proto::Device { id: "bad id".into(), ..Default::default() }).expect("put");
        let error = store.devices().expect_err("an invalid id");
        assert!(matches!(error, StoreError::InvalidId { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("devices/bad id") && message.contains("restore it from a backup"), "{message}");

        let rollout = rollout_id("ro-1");
        let record = proto::RolloutDevice { device_id: "../etc".into(), ..Default::default() };
        store.put(ROLLOUT_DEVICES, "ro-1/../etc", &record).expect("put");
        let error = store.rollout_devices(&rollout).expect_err("an invalid device id");
        assert!(error.to_string().contains("rollout_devices/ro-1/../etc"), "{error}");
    }
}
