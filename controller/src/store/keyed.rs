//! Stored records with their ids typed: the store keeps the wire contract's messages, whose ids are strings,
//! and hands them out as [`Keyed`] records whose id was checked on the way out, so code past the store
//! carries a `DeviceId` / `RolloutId` instead of parsing the string again (or trusting it unparsed).

use alki_shared::ids::{DeviceId, IdError, RolloutId};
use alki_shared::proto;

/// A wire-contract message the store keeps under an id of its own.
pub trait Record {
    type Id: Clone;
    /// The id as the message carries it.
    fn raw_id(&self) -> &str;
    fn parse_id(raw: &str) -> Result<Self::Id, IdError>;
    fn set_id(&mut self, id: &Self::Id);
}

/// A stored record and its id, checked when it left the store (or given by typed code). The record's own
/// id field says the same; the store keys the record by `id`.
#[derive(Clone, Debug, PartialEq)]
pub struct Keyed<T: Record> {
    id: T::Id,
    record: T,
}

impl<T: Record> Keyed<T> {
    /// Checks the record's own id.
    pub fn new(record: T) -> Result<Keyed<T>, IdError> {
        Ok(Keyed { id: T::parse_id(record.raw_id())?, record })
    }

    /// A record under a typed id, which is written into the record.
    pub fn with_id(id: T::Id, mut record: T) -> Keyed<T> {
        record.set_id(&id);
        Keyed { id, record }
    }

    pub fn id(&self) -> &T::Id {
        &self.id
    }

    pub fn record(&self) -> &T {
        &self.record
    }

    /// The record to change; its id field is not what the store keys it by, so leave it alone.
    pub fn record_mut(&mut self) -> &mut T {
        &mut self.record
    }

    pub fn into_record(self) -> T {
        self.record
    }
}

impl Record for proto::Device {
    type Id = DeviceId;
    fn raw_id(&self) -> &str {
        &self.id
    }
    fn parse_id(raw: &str) -> Result<DeviceId, IdError> {
        DeviceId::new(raw)
    }
    fn set_id(&mut self, id: &DeviceId) {
        self.id = id.to_string();
    }
}

impl Record for proto::Rollout {
    type Id = RolloutId;
    fn raw_id(&self) -> &str {
        &self.id
    }
    fn parse_id(raw: &str) -> Result<RolloutId, IdError> {
        RolloutId::new(raw)
    }
    fn set_id(&mut self, id: &RolloutId) {
        self.id = id.to_string();
    }
}

/// A rollout's per-device record, keyed by its device (its rollout is the one it is read with).
impl Record for proto::RolloutDevice {
    type Id = DeviceId;
    fn raw_id(&self) -> &str {
        &self.device_id
    }
    fn parse_id(raw: &str) -> Result<DeviceId, IdError> {
        DeviceId::new(raw)
    }
    fn set_id(&mut self, id: &DeviceId) {
        self.device_id = id.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_or_written_into_the_record() {
        let device = proto::Device { id: "pi-1".into(), ..Default::default() };
        let keyed = Keyed::new(device.clone()).expect("valid");
        assert_eq!((keyed.id().as_str(), keyed.record()), ("pi-1", &device));
        assert!(Keyed::new(proto::Device { id: "../pi".into(), ..Default::default() }).is_err());
        assert!(Keyed::new(proto::Rollout::default()).is_err(), "an empty id is no id");

        let rollout = RolloutId::new("ro-1").expect("id");
        let keyed = Keyed::with_id(rollout.clone(), proto::Rollout { id: "stale".into(), ..Default::default() });
        assert_eq!((keyed.id(), keyed.record().id.as_str()), (&rollout, "ro-1"));
        let member = Keyed::with_id(DeviceId::new("pi-2").expect("id"), proto::RolloutDevice::default());
        assert_eq!(member.into_record().device_id, "pi-2");
    }
}
