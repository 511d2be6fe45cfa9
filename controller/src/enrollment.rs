//! Enrollment's rules: bootstrap tokens (a secret shown once and kept only as its hash, a bounded number
//! of uses and lifetime, the labels they give the devices that use them) and the Welcome that hands an
//! enrolled device its short-lived registry token, sent when a session opens and refreshed while it lasts.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use alki_shared::clock::{SharedClock, UnixMs};
use alki_shared::ids::DeviceId;
use alki_shared::proto;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::fleet::Fleet;
use crate::pki::Pki;
use crate::store::identity::{EnrollTokenRecord, TOKEN_ID_LEN};

/// How long a registry token handed to a device lives; sessions get a fresh one well before.
pub const REGISTRY_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How often connected devices are handed a fresh registry token.
const REGISTRY_TOKEN_REFRESH: Duration = Duration::from_secs(20 * 60);

const SECRET_PREFIX: &str = "alkienroll_";
/// Longest a bootstrap token may live: they are for provisioning, not standing credentials.
const MAX_TOKEN_LIFETIME_SECS: u64 = 366 * 24 * 3600;
const MAX_USES: u32 = 100_000;
const MAX_LABELS: usize = 64;

/// A bootstrap token an admin asked for is refused; the message names the field and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidBootstrapToken(String);

/// A new bootstrap token: the secret (shown once), the hash the store keeps it under, and its record.
pub struct BootstrapToken {
    pub secret: String,
    pub hash: String,
    pub record: EnrollTokenRecord,
}

/// Mints a bootstrap token for `uses` enrollments within `expires_in_seconds`, giving devices `labels`.
pub fn mint_bootstrap_token(
    labels: BTreeMap<String, String>,
    uses: u32,
    expires_in_seconds: u64,
    now: UnixMs,
) -> Result<BootstrapToken, InvalidBootstrapToken> {
    if uses == 0 || uses > MAX_USES {
        return Err(InvalidBootstrapToken(format!("uses is {uses}; allow 1 to {MAX_USES} enrollments")));
    }
    if expires_in_seconds == 0 || expires_in_seconds > MAX_TOKEN_LIFETIME_SECS {
        return Err(InvalidBootstrapToken(format!("expires_in_seconds is {expires_in_seconds}; use 1 s to 366 days")));
    }
    check_labels(&labels)?;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{SECRET_PREFIX}{}", hex::encode(bytes));
    let hash = hash_secret(&secret);
    let record = EnrollTokenRecord {
        id: hash[..TOKEN_ID_LEN].to_owned(),
        labels,
        uses_allowed: uses,
        uses: 0,
        expires_unix_ms: now.plus(std::time::Duration::from_secs(expires_in_seconds)),
        created_unix_ms: now,
        revoked: false,
        device_id: None,
    };
    Ok(BootstrapToken { secret, hash, record })
}

/// What the store keeps of a bootstrap token's secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.trim().as_bytes()))
}

/// Label keys and values as the agent's config accepts them.
fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), InvalidBootstrapToken> {
    if labels.len() > MAX_LABELS {
        return Err(InvalidBootstrapToken(format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(InvalidBootstrapToken(format!(
                "label key {k:?}: use 1 to 63 characters from a-z, A-Z, 0-9, '.', '_', '-' and '/'"
            )));
        }
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(InvalidBootstrapToken(format!(
                "label {k:?}: use at most 255 printable characters for the value"
            )));
        }
    }
    Ok(())
}

/// The Welcome a device's session gets at `now`: its heartbeat and telemetry intervals, a fresh registry
/// token for `registry` (the embedded registry's `host:port`, named so the agent sends it nowhere else) and
/// the `labels` it is selected by. A Welcome is complete: the agent applies every field of it.
pub fn welcome(
    pki: &Pki,
    device_id: &DeviceId,
    heartbeat: Duration,
    registry: &str,
    labels: &HashMap<String, String>,
    now: UnixMs,
) -> proto::Welcome {
    let expires = now.plus(REGISTRY_TOKEN_TTL);
    proto::Welcome {
        device_id: device_id.to_string(),
        heartbeat_interval_seconds: heartbeat.as_secs().max(1) as u32,
        registry_token: pki.registry_token(device_id.as_str(), expires.as_millis()),
        registry_token_expires_unix_ms: expires.as_millis(),
        telemetry_interval_seconds: crate::insight::TELEMETRY_INTERVAL_SECONDS,
        registry: registry.to_owned(),
        labels: labels.clone(),
    }
}

/// Every [`REGISTRY_TOKEN_REFRESH`], sends each connected device a Welcome with a fresh registry token, so a
/// session that lasts days keeps pulling. Stops when `stop` is cancelled.
pub async fn refresh_registry_tokens(
    fleet: Fleet,
    pki: Pki,
    clock: SharedClock,
    heartbeat: Duration,
    registry: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + REGISTRY_TOKEN_REFRESH, REGISTRY_TOKEN_REFRESH);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ids = fleet.hub.connected_ids();
        let store = fleet.store.clone();
        // The labels each device is selected by go with its token (a Welcome is complete).
        let labels = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|id| {
                    let labels = store.device(&id).ok().flatten().map(|d| d.labels).unwrap_or_default();
                    (id, labels)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (device_id, labels) in labels {
            let welcome = welcome(&pki, &device_id, heartbeat, &registry, &labels, clock.now());
            fleet.hub.send(device_id.as_str(), proto::controller_message::Msg::Welcome(welcome));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_tokens_are_bounded_and_kept_as_hashes() {
        let labels = BTreeMap::from([("site".to_owned(), "lab".to_owned())]);
        let token = mint_bootstrap_token(labels.clone(), 5, 3600, UnixMs(1_000)).expect("valid");
        assert!(token.secret.starts_with(SECRET_PREFIX));
        assert_eq!(token.hash, hash_secret(&token.secret));
        assert_eq!((token.record.uses_allowed, token.record.expires_unix_ms), (5, UnixMs(1_000 + 3_600_000)));
        assert!(mint_bootstrap_token(labels.clone(), 0, 3600, UnixMs(0)).is_err(), "no uses");
        assert!(mint_bootstrap_token(labels, 1, MAX_TOKEN_LIFETIME_SECS + 1, UnixMs(0)).is_err(), "too long");
        let bad = BTreeMap::from([("bad key".to_owned(), "x".to_owned())]);
        let refused = mint_bootstrap_token(bad, 1, 60, UnixMs(0)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("label key"), "{refused}");
    }
}
