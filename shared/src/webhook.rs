//! Webhook signatures as the Standard Webhooks specification defines them (pure): the controller signs
//! every delivery with the webhook's secret, and a receiver checks the signature and that the timestamp is
//! within its replay window. HMAC-SHA256 over `<msg id>.<unix seconds>.<body>`, header `v1,<base64>`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The headers a delivery carries.
pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";
/// What a secret starts with; the rest is the key, base64.
pub const SECRET_PREFIX: &str = "whsec_";
/// How far a delivery's timestamp may be from the receiver's clock, as the specification recommends.
pub const REPLAY_WINDOW_SECONDS: i64 = 300;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the webhook secret must be `{SECRET_PREFIX}` followed by base64 of at least 24 bytes")]
    BadSecret,
    #[error("the delivery's timestamp {0} is not a number of seconds")]
    BadTimestamp(String),
    #[error("the delivery is {0} s away from now, outside the {REPLAY_WINDOW_SECONDS} s replay window")]
    OutsideWindow(i64),
    #[error("no signature in the delivery matches the secret")]
    Mismatch,
}

/// The key a secret names.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, SignatureError> {
    let key = secret.strip_prefix(SECRET_PREFIX).ok_or(SignatureError::BadSecret)?;
    let key = STANDARD.decode(key).map_err(|_| SignatureError::BadSecret)?;
    if key.len() < 24 {
        return Err(SignatureError::BadSecret);
    }
    Ok(key)
}

/// A secret made from random key bytes.
pub fn secret_from_key(key: &[u8]) -> String {
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

fn mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `webhook-signature` header value for a delivery.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = mac(key, id, &timestamp.to_string(), body).finalize().into_bytes();
    format!("v1,{}", STANDARD.encode(tag))
}

/// Checks a delivery as a receiver does: the timestamp within the replay window of `now` (seconds), and one
/// of the space-separated signatures made with the key (compared in constant time).
pub fn verify(
    key: &[u8],
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let at: i64 = timestamp.trim().parse().map_err(|_| SignatureError::BadTimestamp(timestamp.to_owned()))?;
    let skew = now.saturating_sub(at);
    if skew.abs() > REPLAY_WINDOW_SECONDS {
        return Err(SignatureError::OutsideWindow(skew));
    }
    let matches = signatures.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|given| {
        STANDARD.decode(given).is_ok_and(|tag| mac(key, id, timestamp.trim(), body).verify_slice(&tag).is_ok())
    });
    if matches { Ok(()) } else { Err(SignatureError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        // From the Standard Webhooks reference libraries' tests.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", &signature, body, 1614265330).expect("verifies");
    }

    #[test]
    fn a_changed_body_an_old_timestamp_or_another_key_is_refused() {
        let key = [7u8; 32];
        let signature = sign(&key, "alki-1", 1_000, b"{}");
        assert_eq!(verify(&key, "alki-1", "1000", &signature, b"{ }", 1_000), Err(SignatureError::Mismatch));
        assert_eq!(verify(&key, "alki-2", "1000", &signature, b"{}", 1_000), Err(SignatureError::Mismatch));
        assert_eq!(verify(&[8u8; 32], "alki-1", "1000", &signature, b"{}", 1_000), Err(SignatureError::Mismatch));
        assert_eq!(verify(&key, "alki-1", "1000", &signature, b"{}", 1_400), Err(SignatureError::OutsideWindow(400)));
        assert!(matches!(
            verify(&key, "alki-1", "soon", &signature, b"{}", 1_000),
            Err(SignatureError::BadTimestamp(_))
        ));
        let several = format!("v1,bm9wZQ== {signature}");
        verify(&key, "alki-1", "1000", &several, b"{}", 1_000).expect("any listed signature may match");
        assert_eq!(secret_key("whsec_c2hvcnQ="), Err(SignatureError::BadSecret));
        assert_eq!(secret_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), Err(SignatureError::BadSecret));
        assert_eq!(secret_key(&secret_from_key(&key)), Ok(key.to_vec()));
    }
}
