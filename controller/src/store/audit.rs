//! The audit log's table: one record per state-changing call, keyed by time so the oldest are pruned first
//! and a time range is one scan. Bounded: retention by count and by age, applied on every append.

use std::time::Duration;

use alki_shared::clock::UnixMs;
use alki_shared::proto;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};

use super::{Store, StoreError, Table, decode};

/// Keyed `<unix ms, 13 digits>-<sequence, 10 digits>`: lexical order is time order.
const AUDIT: Table = TableDefinition::new("audit");

/// How much of the audit log is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditRetention {
    /// Entries beyond this many are dropped, oldest first.
    pub max_entries: u64,
    /// Entries older than this are dropped.
    pub max_age: Duration,
}

impl Default for AuditRetention {
    fn default() -> Self {
        // A busy fleet makes a few thousand state-changing calls a day: a year fits comfortably.
        AuditRetention { max_entries: 1_000_000, max_age: Duration::from_secs(365 * 24 * 3600) }
    }
}

/// Which entries a query wants.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub since: UnixMs,
    /// Exact actor (`token:ci`) or the name after the kind (`ci`); empty: everyone.
    pub actor: String,
    pub limit: usize,
}

pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(AUDIT)?;
    Ok(())
}

/// The key (and public id) of an entry.
pub fn audit_key(at: UnixMs, seq: u64) -> String {
    format!("{:013}-{seq:010}", at.as_millis().max(0))
}

impl Store {
    /// Appends entries (their `id` is their key) in one transaction, then applies `retention` as of `now`.
    pub fn append_audit(
        &self,
        entries: &[proto::AuditEntry],
        retention: AuditRetention,
        now: UnixMs,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(AUDIT)?;
            for entry in entries {
                let bytes = serde_json::to_vec(entry).map_err(|e| StoreError::Encode(e, AUDIT.name().to_owned()))?;
                t.insert(entry.id.as_str(), bytes.as_slice())?;
            }
            let cutoff = audit_key(now.minus(retention.max_age), 0);
            let mut excess = t.len()?.saturating_sub(retention.max_entries);
            loop {
                let expired = match t.first()? {
                    Some((k, _)) => k.value() < cutoff.as_str(),
                    None => break,
                };
                if excess == 0 && !expired {
                    break;
                }
                t.pop_first()?;
                excess = excess.saturating_sub(1);
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Entries matching `query`, newest first.
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<proto::AuditEntry>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(AUDIT)?;
        let start = audit_key(query.since, 0);
        let mut out = Vec::new();
        for entry in t.range(start.as_str()..)?.rev() {
            if out.len() >= query.limit {
                break;
            }
            let (k, v) = entry?;
            let entry: proto::AuditEntry = decode(AUDIT.name().to_owned(), k.value(), v.value())?;
            if actor_matches(&entry.actor, &query.actor) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    pub fn audit_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(AUDIT)?.len()?)
    }
}

fn actor_matches(actor: &str, wanted: &str) -> bool {
    wanted.is_empty() || actor == wanted || actor.split_once(':').is_some_and(|(_, name)| name == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ms: i64, seq: u64, actor: &str) -> proto::AuditEntry {
        proto::AuditEntry { id: audit_key(UnixMs(ms), seq), unix_ms: ms, actor: actor.into(), ..Default::default() }
    }

    #[test]
    fn queries_filter_by_time_and_actor_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let entries = [entry(1_000, 1, "token:ci"), entry(2_000, 2, "token:root"), entry(3_000, 3, "device:pi-1")];
        store.append_audit(&entries, AuditRetention::default(), UnixMs(3_000)).expect("append");
        let all = store.audit(&AuditQuery { limit: 10, ..Default::default() }).expect("query");
        assert_eq!(all.iter().map(|e| e.unix_ms).collect::<Vec<_>>(), [3_000, 2_000, 1_000]);
        let since = store.audit(&AuditQuery { since: UnixMs(2_000), limit: 10, ..Default::default() }).expect("q");
        assert_eq!(since.len(), 2);
        for wanted in ["ci", "token:ci"] {
            let by = store.audit(&AuditQuery { actor: wanted.into(), limit: 10, ..Default::default() }).expect("q");
            assert_eq!(by.iter().map(|e| e.actor.as_str()).collect::<Vec<_>>(), ["token:ci"]);
        }
        assert_eq!(store.audit(&AuditQuery { limit: 1, ..Default::default() }).expect("q").len(), 1);
    }

    #[test]
    fn retention_drops_the_oldest_by_count_and_by_age() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let retention = AuditRetention { max_entries: 3, max_age: Duration::from_secs(10) };
        let batch: Vec<_> = (0..5).map(|i| entry(100_000 + i, i as u64, "token:a")).collect();
        store.append_audit(&batch, retention, UnixMs(100_005)).expect("append");
        let kept = store.audit(&AuditQuery { limit: 10, ..Default::default() }).expect("q");
        assert_eq!(kept.iter().map(|e| e.unix_ms).collect::<Vec<_>>(), [100_004, 100_003, 100_002]);
        // 20 s later everything above is older than 10 s.
        store.append_audit(&[entry(120_000, 9, "token:a")], retention, UnixMs(120_000)).expect("append");
        assert_eq!(store.audit_len().expect("len"), 1);
    }
}
