//! Controller state in redb: devices, rollouts, tokens. One ACID, fsynced transaction per change.
//!
//! Records are the wire contract's messages kept as JSON (see shared/build.rs): prost defaults fill
//! fields a newer controller added, so old records keep loading. The registry keeps its own tables in
//! the same database (see `registry::index`).

use std::path::Path;
use std::sync::Arc;

use alki_shared::proto;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::{Serialize, de::DeserializeOwned};

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

const DEVICES: Table = TableDefinition::new("devices");
const ROLLOUTS: Table = TableDefinition::new("rollouts");
const TOKENS: Table = TableDefinition::new("tokens");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database error: {0}")]
    Database(#[from] redb::Error),
    #[error("store record {table}/{key} is unreadable: {source}")]
    Corrupt { table: String, key: String, source: serde_json::Error },
    #[error("could not encode a {table} record: {0}", table = .1)]
    Encode(serde_json::Error, String),
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
    pub role: crate::auth::Role,
    pub created_unix_ms: i64,
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
        for table in [DEVICES, ROLLOUTS, TOKENS] {
            txn.open_table(table)?;
        }
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

    pub fn rollout(&self, id: &str) -> Result<Option<proto::Rollout>, StoreError> {
        self.get(ROLLOUTS, id)
    }

    pub fn rollouts(&self) -> Result<Vec<proto::Rollout>, StoreError> {
        self.list(ROLLOUTS)
    }

    pub fn put_rollout(&self, rollout: &proto::Rollout) -> Result<(), StoreError> {
        self.put(ROLLOUTS, &rollout.id, rollout)
    }

    pub fn token(&self, hash_hex: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(TOKENS, hash_hex)
    }

    pub fn put_token(&self, hash_hex: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.put(TOKENS, hash_hex, record)
    }

    pub fn token_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(TOKENS)?.len()?)
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
}
