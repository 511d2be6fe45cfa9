//! Controller state in redb: devices, rollouts (with their per-device records and event log), tokens;
//! telemetry, benchmarks and quality evaluations in their own modules.
//! One ACID, fsynced transaction per change.
//!
//! Records are the wire contract's messages kept as JSON (see shared/build.rs): prost defaults fill
//! fields a newer controller added, so old records keep loading. The registry keeps its own tables in
//! the same database (see `registry::index`).

pub mod audit;
pub mod evaluations;
pub mod identity;
pub mod latency;

use std::path::Path;
use std::sync::Arc;

use alki_shared::proto;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::{Serialize, de::DeserializeOwned};

mod telemetry;
pub use evaluations::{EvalSample, EvaluationFilter, StoredEvaluation};
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
    pub created_unix_ms: i64,
    /// Set when an admin revoked the token; the record stays so the audit log's names keep meaning.
    #[serde(default)]
    pub revoked_unix_ms: Option<i64>,
}

/// The controller's durable state.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
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
        audit::create_tables(&txn)?;
        txn.commit()?;
        Ok(Store { db: Arc::new(db) })
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

    pub fn device(&self, id: &str) -> Result<Option<proto::Device>, StoreError> {
        self.get(DEVICES, id)
    }

    pub fn devices(&self) -> Result<Vec<proto::Device>, StoreError> {
        self.list(DEVICES)
    }

    /// Creates or changes a device record atomically; `f` gets the current record (or a new one with only
    /// the id set) and returns whatever the caller wants back.
    pub fn update_device<R>(&self, id: &str, f: impl FnOnce(&mut proto::Device) -> R) -> Result<R, StoreError> {
        self.update(DEVICES, id, |current: Option<proto::Device>| {
            let mut device = current.unwrap_or_else(|| proto::Device { id: id.to_owned(), ..Default::default() });
            let r = f(&mut device);
            (Some(device), r)
        })
    }

    /// Changes several device records in one transaction (a rollout step moving many devices at once).
    /// `f` gets each current record (or a new one with only the id set) and its index in `ids`.
    pub fn update_devices<R>(
        &self,
        ids: &[&str],
        f: impl FnMut(&mut proto::Device, usize) -> R,
    ) -> Result<Vec<R>, StoreError> {
        self.update_devices_with(ids, true, f)
    }

    /// Like `update_devices`; without `durable` the commit does not wait for the disk: for facts a crash may
    /// lose because agents report them again (progress phases), persisted by the next durable commit. An id
    /// may appear more than once: each change sees the one before it.
    pub fn update_devices_with<R>(
        &self,
        ids: &[&str],
        durable: bool,
        mut f: impl FnMut(&mut proto::Device, usize) -> R,
    ) -> Result<Vec<R>, StoreError> {
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None).map_err(|e| StoreError::Database(e.into()))?;
        }
        let mut out = Vec::with_capacity(ids.len());
        {
            let mut t = txn.open_table(DEVICES)?;
            for (i, id) in ids.iter().enumerate() {
                let current: Option<proto::Device> = match t.get(*id)? {
                    None => None,
                    Some(v) => Some(decode(DEVICES.name().to_owned(), id, v.value())?),
                };
                let mut device =
                    current.unwrap_or_else(|| proto::Device { id: (*id).to_owned(), ..Default::default() });
                out.push(f(&mut device, i));
                let bytes =
                    serde_json::to_vec(&device).map_err(|e| StoreError::Encode(e, DEVICES.name().to_owned()))?;
                t.insert(*id, bytes.as_slice())?;
            }
        }
        txn.commit()?;
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

    pub fn rollout(&self, id: &str) -> Result<Option<proto::Rollout>, StoreError> {
        self.get(ROLLOUTS, id)
    }

    pub fn rollouts(&self) -> Result<Vec<proto::Rollout>, StoreError> {
        self.list(ROLLOUTS)
    }

    pub fn put_rollout(&self, rollout: &proto::Rollout) -> Result<(), StoreError> {
        self.put(ROLLOUTS, &rollout.id, rollout)
    }

    /// Writes a rollout, its changed device records and its new events in one transaction, so a
    /// restart sees all of a transition or none of it.
    pub fn commit_rollout(
        &self,
        rollout: &proto::Rollout,
        devices: &[proto::RolloutDevice],
        events: &[proto::RolloutEvent],
    ) -> Result<(), StoreError> {
        let encode = |value: &dyn erased::Encode, table: Table| {
            value.encode().map_err(|e| StoreError::Encode(e, table.name().to_owned()))
        };
        let txn = self.db.begin_write()?;
        {
            txn.open_table(ROLLOUTS)?.insert(rollout.id.as_str(), encode(rollout, ROLLOUTS)?.as_slice())?;
            let mut t = txn.open_table(ROLLOUT_DEVICES)?;
            for d in devices {
                t.insert(format!("{}/{}", d.rollout_id, d.device_id).as_str(), encode(d, ROLLOUT_DEVICES)?.as_slice())?;
            }
            let mut t = txn.open_table(EVENTS)?;
            for e in events {
                t.insert(event_key(&e.rollout_id, e.seq).as_str(), encode(e, EVENTS)?.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The per-device records of one rollout.
    pub fn rollout_devices(&self, rollout_id: &str) -> Result<Vec<proto::RolloutDevice>, StoreError> {
        self.range(ROLLOUT_DEVICES, &format!("{rollout_id}/"), &format!("{rollout_id}0"))
    }

    /// Events of one rollout with a sequence number above `after_seq`, oldest first.
    pub fn rollout_events(&self, rollout_id: &str, after_seq: u64) -> Result<Vec<proto::RolloutEvent>, StoreError> {
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
    pub fn revoke_token(&self, hash_hex: &str, now_unix_ms: i64) -> Result<Option<TokenRecord>, StoreError> {
        self.update(TOKENS, hash_hex, |current: Option<TokenRecord>| match current {
            None => (None, None),
            Some(mut record) => {
                record.revoked_unix_ms.get_or_insert(now_unix_ms);
                (Some(record.clone()), Some(record))
            }
        })
    }

    pub fn token_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(TOKENS)?.len()?)
    }
}

fn event_key(rollout_id: &str, seq: u64) -> String {
    format!("{rollout_id}/{seq:020}")
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

    #[test]
    fn device_updates_persist_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store
                .update_device("pi-1", |d| {
                    d.agent_version = "1.0".into();
                    d.desired_generation = 3;
                })
                .expect("update");
            store.update_device("pi-1", |d| d.applied_generation = 3).expect("second update");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let d = store.device("pi-1").expect("read").expect("present");
        assert_eq!((d.agent_version.as_str(), d.desired_generation, d.applied_generation), ("1.0", 3, 3));
        assert_eq!(store.devices().expect("list").len(), 1);
        assert!(store.device("nope").expect("read").is_none());
    }

    #[test]
    fn rollout_records_and_events_are_scoped_to_their_rollout_and_ordered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for (id, n) in [("ro-a", 12u64), ("ro-b", 2)] {
            let rollout = proto::Rollout { id: id.into(), event_seq: n, ..Default::default() };
            let devices: Vec<_> = (0..3)
                .map(|i| proto::RolloutDevice {
                    rollout_id: id.into(),
                    device_id: format!("d{i}"),
                    ..Default::default()
                })
                .collect();
            let events: Vec<_> =
                (1..=n).map(|seq| proto::RolloutEvent { rollout_id: id.into(), seq, ..Default::default() }).collect();
            store.commit_rollout(&rollout, &devices, &events).expect("commit");
        }
        assert_eq!(store.rollout_devices("ro-a").expect("devices").len(), 3);
        let seqs: Vec<u64> = store.rollout_events("ro-a", 0).expect("events").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
        assert_eq!(store.rollout_events("ro-a", 10).expect("events").len(), 2);
        assert_eq!(store.rollout_events("ro-b", 0).expect("events").len(), 2);
        assert_eq!(store.rollout("ro-b").expect("read").map(|r| r.event_seq), Some(2));
    }
}
