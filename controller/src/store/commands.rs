//! The offline command queue's table: commands to devices that were offline when an operator sent them,
//! keyed `<device id>/<queued at, 20 digits>/<command id>` so a device's commands read in the order sent.

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use alki_shared::proto;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::{Store, StoreError, Table, decode};

const QUEUED_COMMANDS: Table = TableDefinition::new("queued_commands");

/// A command waiting for its device's next Hello.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueuedCommand {
    pub command: proto::Command,
    pub queued: UnixMs,
    pub expires: UnixMs,
}

impl QueuedCommand {
    fn key(&self, device_id: &DeviceId) -> String {
        format!("{device_id}/{:020}/{}", self.queued.as_millis().max(0), self.command.id)
    }
}

pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(QUEUED_COMMANDS)?;
    Ok(())
}

/// Every key of `device_id`'s commands: ids hold no '/', and '0' follows '/' in byte order.
fn range(device_id: &DeviceId) -> (String, String) {
    (format!("{device_id}/"), format!("{device_id}0"))
}

impl Store {
    /// Queues `command` for `device_id` unless `bound` commands wait already (then returns how many do).
    /// The count and the insert are one transaction, so concurrent sends cannot pass the bound.
    pub fn queue_command(
        &self,
        device_id: &DeviceId,
        queued: &QueuedCommand,
        bound: usize,
    ) -> Result<Result<(), usize>, StoreError> {
        let bytes = serde_json::to_vec(queued).map_err(|e| StoreError::Encode(e, QUEUED_COMMANDS.name().to_owned()))?;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(QUEUED_COMMANDS)?;
            let (from, to) = range(device_id);
            let waiting = table.range(from.as_str()..to.as_str())?.count();
            if waiting >= bound {
                return Ok(Err(waiting));
            }
            table.insert(queued.key(device_id).as_str(), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(Ok(()))
    }

    /// The commands waiting for `device_id`, oldest first.
    pub fn queued_commands(&self, device_id: &DeviceId) -> Result<Vec<QueuedCommand>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(QUEUED_COMMANDS)?;
        let (from, to) = range(device_id);
        let mut out = Vec::new();
        for entry in table.range(from.as_str()..to.as_str())? {
            let (key, value) = entry?;
            out.push(decode(QUEUED_COMMANDS.name().to_owned(), key.value(), value.value())?);
        }
        Ok(out)
    }

    /// Removes these commands of `device_id` (delivered or expired), in one transaction.
    pub fn remove_queued(&self, device_id: &DeviceId, commands: &[QueuedCommand]) -> Result<(), StoreError> {
        if commands.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(QUEUED_COMMANDS)?;
            for command in commands {
                table.remove(command.key(device_id).as_str())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}
