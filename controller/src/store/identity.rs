//! Device identity in the store: bootstrap tokens (hashed, with uses and expiry) and each device's current
//! certificate serial and decommissioning. Enrollment and renewal check and change them in one transaction,
//! so two devices racing for one token use or one id never both win.

use std::collections::BTreeMap;

use alki_shared::clock::UnixMs;
use alki_shared::ids::DeviceId;
use redb::{ReadableTable, TableDefinition, TableHandle};

use super::{Store, StoreError, Table, decode};

/// Bootstrap tokens keyed by the hex SHA-256 of the secret.
const ENROLL_TOKENS: Table = TableDefinition::new("enroll_tokens");
/// Device identities keyed by device id.
const DEVICE_IDENTITIES: Table = TableDefinition::new("device_identities");

/// Characters of the hash used as a token's public id.
pub const TOKEN_ID_LEN: usize = 12;

/// A bootstrap token as stored: never the secret.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EnrollTokenRecord {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub uses_allowed: u32,
    pub uses: u32,
    pub expires_unix_ms: UnixMs,
    pub created_unix_ms: UnixMs,
    pub revoked: bool,
    /// The one device id this token enrolls; the only way a known id enrolls again.
    #[serde(default)]
    pub device_id: Option<DeviceId>,
}

/// What the controller knows of one device's identity.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    /// Checked when the record is read: an id that does not parse makes the record unreadable.
    pub device_id: DeviceId,
    /// Hex serial of the one certificate that is valid for this device; older ones are refused.
    pub serial: String,
    pub not_after_unix_ms: UnixMs,
    pub enrolled_unix_ms: UnixMs,
    /// The bootstrap token it enrolled with.
    pub token_id: String,
    /// Labels from the bootstrap token; they win over what the device reports.
    pub labels: BTreeMap<String, String>,
    pub decommissioned_unix_ms: Option<UnixMs>,
}

/// Why an enrollment or renewal was refused; nothing changed in the store.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the bootstrap token is not known to this controller; ask an admin for one (alkictl enroll token create)")]
    UnknownToken,
    #[error("the bootstrap token {0} has expired; ask an admin for a new one")]
    TokenExpired(String),
    #[error("the bootstrap token {0} has been used as many times as it allows; ask an admin for a new one")]
    TokenUsedUp(String),
    #[error("the bootstrap token {0} was revoked; ask an admin for a new one")]
    TokenRevoked(String),
    #[error(
        "device id \"{0}\" is already enrolled; a device id stays bound to its identity, even after its \
         certificate expires. To enroll it again (new hardware, a lost or expired certificate), an admin makes a \
         token for that id: alkictl enroll token create --device-id {0}"
    )]
    DeviceClaimed(DeviceId),
    #[error("the bootstrap token {token} enrolls only device \"{bound}\", not \"{asked}\"")]
    TokenForAnotherDevice { token: String, bound: DeviceId, asked: DeviceId },
    #[error("device \"{0}\" was decommissioned; enroll the hardware again under a new device id")]
    Decommissioned(DeviceId),
    #[error("device \"{0}\" is not enrolled; enroll it with a bootstrap token (alki-agent enroll)")]
    NotEnrolled(DeviceId),
    #[error("this certificate of device \"{0}\" was replaced by a newer one; use the newest certificate")]
    StaleCertificate(DeviceId),
    #[error("{0}")]
    Sign(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A certificate the caller signed inside the transaction.
pub struct Issued {
    pub serial: String,
    pub not_after_unix_ms: UnixMs,
}

pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(ENROLL_TOKENS)?;
    txn.open_table(DEVICE_IDENTITIES)?;
    Ok(())
}

fn encode<T: serde::Serialize>(value: &T, table: Table) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode(e, table.name().to_owned()))
}

impl Store {
    pub fn put_enroll_token(&self, hash_hex: &str, record: &EnrollTokenRecord) -> Result<(), StoreError> {
        self.put(ENROLL_TOKENS, hash_hex, record)
    }

    pub fn enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>, StoreError> {
        self.list(ENROLL_TOKENS)
    }

    /// Marks the token with public id `id` revoked; None when there is no such token.
    pub fn revoke_enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let found = {
            let mut t = txn.open_table(ENROLL_TOKENS)?;
            let mut found = None;
            for entry in t.iter()? {
                let (k, v) = entry?;
                let record: EnrollTokenRecord = decode(ENROLL_TOKENS.name().to_owned(), k.value(), v.value())?;
                if record.id == id {
                    found = Some((k.value().to_owned(), record));
                    break;
                }
            }
            if let Some((key, record)) = &mut found {
                record.revoked = true;
                t.insert(key.as_str(), encode(record, ENROLL_TOKENS)?.as_slice())?;
            }
            found.map(|(_, r)| r)
        };
        txn.commit()?;
        Ok(found)
    }

    pub fn device_identity(&self, device_id: &DeviceId) -> Result<Option<DeviceIdentity>, StoreError> {
        self.get(DEVICE_IDENTITIES, device_id.as_str())
    }

    /// Enrolls `device_id` with the token hashing to `token_hash`, in one transaction: the token must be
    /// known, unrevoked, unexpired, have a use left and (when bound to an id) name this one; a known id
    /// enrolls again only with a token bound to it, and a decommissioned id never. `sign` (given the token) issues the certificate; only if everything holds is a use
    /// counted and the identity written.
    pub fn enroll<T>(
        &self,
        token_hash: &str,
        device_id: &DeviceId,
        now: UnixMs,
        sign: impl FnOnce(&EnrollTokenRecord) -> Result<(Issued, T), String>,
    ) -> Result<(DeviceIdentity, T), IdentityError> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        let result = {
            let mut tokens = txn.open_table(ENROLL_TOKENS).map_err(StoreError::from)?;
            let mut token: EnrollTokenRecord = match tokens.get(token_hash).map_err(StoreError::from)? {
                None => return Err(IdentityError::UnknownToken),
                Some(v) => decode(ENROLL_TOKENS.name().to_owned(), token_hash, v.value())?,
            };
            if token.revoked {
                return Err(IdentityError::TokenRevoked(token.id));
            }
            if token.expires_unix_ms <= now {
                return Err(IdentityError::TokenExpired(token.id));
            }
            if token.uses >= token.uses_allowed {
                return Err(IdentityError::TokenUsedUp(token.id));
            }
            if let Some(bound) = token.device_id.as_ref().filter(|bound| *bound != device_id) {
                let (token, bound, asked) = (token.id.clone(), bound.clone(), device_id.clone());
                return Err(IdentityError::TokenForAnotherDevice { token, bound, asked });
            }
            let mut identities = txn.open_table(DEVICE_IDENTITIES).map_err(StoreError::from)?;
            if let Some(v) = identities.get(device_id.as_str()).map_err(StoreError::from)? {
                let existing: DeviceIdentity =
                    decode(DEVICE_IDENTITIES.name().to_owned(), device_id.as_str(), v.value())?;
                if existing.decommissioned_unix_ms.is_some() {
                    return Err(IdentityError::Decommissioned(device_id.clone()));
                }
                // Bound until an operator decommissions it: an expired certificate does not free the id
                // for any bootstrap token, only for one made for this id.
                if token.device_id.as_ref() != Some(device_id) {
                    return Err(IdentityError::DeviceClaimed(device_id.clone()));
                }
            }
            let (issued, extra) = sign(&token).map_err(IdentityError::Sign)?;
            token.uses += 1;
            let identity = DeviceIdentity {
                device_id: device_id.clone(),
                serial: issued.serial,
                not_after_unix_ms: issued.not_after_unix_ms,
                enrolled_unix_ms: now,
                token_id: token.id.clone(),
                labels: token.labels.clone(),
                decommissioned_unix_ms: None,
            };
            tokens.insert(token_hash, encode(&token, ENROLL_TOKENS)?.as_slice()).map_err(StoreError::from)?;
            let bytes = encode(&identity, DEVICE_IDENTITIES)?;
            identities.insert(device_id.as_str(), bytes.as_slice()).map_err(StoreError::from)?;
            (identity, extra)
        };
        txn.commit().map_err(StoreError::from)?;
        Ok(result)
    }

    /// Checks that certificate `serial` is the device's current one and it is not decommissioned.
    pub fn check_device_certificate(
        &self,
        device_id: &DeviceId,
        serial: &str,
    ) -> Result<DeviceIdentity, IdentityError> {
        let identity = self.device_identity(device_id)?.ok_or_else(|| IdentityError::NotEnrolled(device_id.clone()))?;
        check_current(&identity, serial)?;
        Ok(identity)
    }

    /// Replaces the device's certificate in one transaction, if `serial` is still its current one.
    pub fn renew<T>(
        &self,
        device_id: &DeviceId,
        serial: &str,
        sign: impl FnOnce() -> Result<(Issued, T), String>,
    ) -> Result<(DeviceIdentity, T), IdentityError> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        let result = {
            let mut identities = txn.open_table(DEVICE_IDENTITIES).map_err(StoreError::from)?;
            let mut identity: DeviceIdentity = match identities.get(device_id.as_str()).map_err(StoreError::from)? {
                None => return Err(IdentityError::NotEnrolled(device_id.clone())),
                Some(v) => decode(DEVICE_IDENTITIES.name().to_owned(), device_id.as_str(), v.value())?,
            };
            check_current(&identity, serial)?;
            let (issued, extra) = sign().map_err(IdentityError::Sign)?;
            identity.serial = issued.serial;
            identity.not_after_unix_ms = issued.not_after_unix_ms;
            let bytes = encode(&identity, DEVICE_IDENTITIES)?;
            identities.insert(device_id.as_str(), bytes.as_slice()).map_err(StoreError::from)?;
            (identity, extra)
        };
        txn.commit().map_err(StoreError::from)?;
        Ok(result)
    }

    /// Decommissions a device: its certificates are refused from now on. Returns the identity, or None when
    /// the device never enrolled. Decommissioning twice keeps the first time.
    pub fn decommission(&self, device_id: &DeviceId, now: UnixMs) -> Result<Option<DeviceIdentity>, StoreError> {
        self.update(DEVICE_IDENTITIES, device_id.as_str(), |current: Option<DeviceIdentity>| match current {
            None => (None, None),
            Some(mut identity) => {
                identity.decommissioned_unix_ms.get_or_insert(now);
                (Some(identity.clone()), Some(identity))
            }
        })
    }
}

fn check_current(identity: &DeviceIdentity, serial: &str) -> Result<(), IdentityError> {
    if identity.decommissioned_unix_ms.is_some() {
        return Err(IdentityError::Decommissioned(identity.device_id.clone()));
    }
    if identity.serial != serial {
        return Err(IdentityError::StaleCertificate(identity.device_id.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).expect("device id")
    }

    fn token(uses_allowed: u32, expires_unix_ms: i64) -> EnrollTokenRecord {
        EnrollTokenRecord {
            id: "abc".into(),
            labels: BTreeMap::from([("site".into(), "lab".into())]),
            uses_allowed,
            uses: 0,
            expires_unix_ms: UnixMs(expires_unix_ms),
            created_unix_ms: UnixMs(0),
            revoked: false,
            device_id: None,
        }
    }

    fn issued(serial: &str) -> impl FnOnce(&EnrollTokenRecord) -> Result<(Issued, ()), String> + '_ {
        move |_| Ok((Issued { serial: serial.into(), not_after_unix_ms: UnixMs(10_000) }, ()))
    }

    #[test]
    fn tokens_enforce_uses_expiry_and_revocation_and_ids_are_claimed_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        store.put_enroll_token("h1", &token(2, 5_000)).expect("put");
        let (identity, ()) = store.enroll("h1", &id("pi-1"), UnixMs(1_000), issued("s1")).expect("first");
        assert_eq!(identity.labels.get("site").map(String::as_str), Some("lab"));
        assert!(matches!(
            store.enroll("h1", &id("pi-1"), UnixMs(1_000), issued("s2")),
            Err(IdentityError::DeviceClaimed(_))
        ));
        store.enroll("h1", &id("pi-2"), UnixMs(1_000), issued("s3")).expect("second use");
        assert!(matches!(
            store.enroll("h1", &id("pi-3"), UnixMs(1_000), issued("s4")),
            Err(IdentityError::TokenUsedUp(_))
        ));
        assert_eq!(store.enroll_tokens().expect("list")[0].uses, 2, "a refused claim does not use the token");
        store.put_enroll_token("h2", &EnrollTokenRecord { id: "def".into(), ..token(5, 5_000) }).expect("put");
        assert!(matches!(
            store.enroll("h2", &id("pi-4"), UnixMs(5_000), issued("s5")),
            Err(IdentityError::TokenExpired(_))
        ));
        assert!(matches!(store.enroll("nope", &id("pi-4"), UnixMs(0), issued("s5")), Err(IdentityError::UnknownToken)));
        assert!(store.revoke_enroll_token("def").expect("revoke").is_some());
        assert!(store.revoke_enroll_token("nope").expect("revoke").is_none());
        assert!(matches!(
            store.enroll("h2", &id("pi-4"), UnixMs(0), issued("s5")),
            Err(IdentityError::TokenRevoked(_))
        ));
    }

    #[test]
    fn renewal_replaces_the_serial_and_decommissioning_refuses_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        store.put_enroll_token("h1", &token(5, 50_000)).expect("put");
        store.enroll("h1", &id("pi-1"), UnixMs(1_000), issued("s1")).expect("enroll");
        store.check_device_certificate(&id("pi-1"), "s1").expect("current");
        store
            .renew(&id("pi-1"), "s1", || Ok((Issued { serial: "s2".into(), not_after_unix_ms: UnixMs(20_000) }, ())))
            .expect("renew");
        assert!(matches!(store.check_device_certificate(&id("pi-1"), "s1"), Err(IdentityError::StaleCertificate(_))));
        store.check_device_certificate(&id("pi-1"), "s2").expect("renewed");
        store.decommission(&id("pi-1"), UnixMs(3_000)).expect("decommission").expect("known");
        assert!(matches!(store.check_device_certificate(&id("pi-1"), "s2"), Err(IdentityError::Decommissioned(_))));
        assert!(matches!(
            store.renew(&id("pi-1"), "s2", || Ok((Issued { serial: "s3".into(), not_after_unix_ms: UnixMs(0) }, ()))),
            Err(IdentityError::Decommissioned(_))
        ));
        assert!(matches!(
            store.enroll("h1", &id("pi-1"), UnixMs(30_000), issued("s4")),
            Err(IdentityError::Decommissioned(_))
        ));
        assert!(store.decommission(&id("never"), UnixMs(0)).expect("decommission").is_none());
    }

    #[test]
    fn a_known_id_enrolls_again_only_with_a_token_made_for_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        store.put_enroll_token("h1", &token(5, 1_000_000)).expect("put");
        store.enroll("h1", &id("pi-1"), UnixMs(1_000), issued("s1")).expect("enroll");
        // Long after the certificate (valid to 10,000) expired, an unbound token still cannot claim the id.
        assert!(matches!(
            store.enroll("h1", &id("pi-1"), UnixMs(500_000), issued("s2")),
            Err(IdentityError::DeviceClaimed(_))
        ));
        let bound = EnrollTokenRecord { id: "for-pi-1".into(), device_id: Some(id("pi-1")), ..token(2, 1_000_000) };
        store.put_enroll_token("h2", &bound).expect("put");
        assert!(matches!(
            store.enroll("h2", &id("pi-2"), UnixMs(500_000), issued("s3")),
            Err(IdentityError::TokenForAnotherDevice { .. })
        ));
        let (identity, ()) = store.enroll("h2", &id("pi-1"), UnixMs(500_000), issued("s4")).expect("bound token");
        assert_eq!(identity.serial, "s4");
        assert!(matches!(store.check_device_certificate(&id("pi-1"), "s1"), Err(IdentityError::StaleCertificate(_))));
        store.decommission(&id("pi-1"), UnixMs(600_000)).expect("decommission");
        assert!(matches!(
            store.enroll("h2", &id("pi-1"), UnixMs(700_000), issued("s5")),
            Err(IdentityError::Decommissioned(_))
        ));
    }
}
