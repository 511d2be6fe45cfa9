//! Limits on what callers may send: message sizes, streams per connection, label counts and lengths, and
//! request rates per token and per device (`alki_shared::ratelimit`). Pure logic; callers pass the clock in.

use std::collections::BTreeMap;

/// Most labels a device (Hello), a rollout selector or a bootstrap token may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key (a DNS-label-like name with an optional prefix, as Kubernetes allows).
pub const MAX_LABEL_KEY: usize = 128;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 256;

/// The controller's input limits. `Default` is what production runs with; tests lower them.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Largest gRPC message accepted from operators (FleetService, AdminService, ...).
    pub grpc_max_message: usize,
    /// Largest message an agent may send on its session (Hello, status, telemetry, benchmarks).
    pub session_max_message: usize,
    /// HTTP/2 streams one gRPC connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Sustained requests per second one token may make (gRPC and HTTP together).
    pub token_rate: Rate,
    /// Sustained messages per second one device may send on its session, and session opens per second.
    pub device_rate: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            grpc_max_message: 4 << 20,
            session_max_message: 1 << 20,
            max_concurrent_streams: 128,
            // A registry push of a large bundle makes a PATCH per chunk (500/s of 1 MiB chunks is 500 MiB/s);
            // a flood from one leaked token is still bounded.
            token_rate: Rate { per_second: 500.0, burst: 5000 },
            // Agents report a few messages per heartbeat; a reconnect loop must not become a flood.
            device_rate: Rate { per_second: 20.0, burst: 200 },
        }
    }
}

/// The controller's keyed rate limiter: a token name or a device id to its bucket.
pub type RateLimiter = alki_shared::ratelimit::RateLimiter<String>;
pub use alki_shared::ratelimit::{Rate, RetryAfter};

/// Callers whose buckets are kept; see [`alki_shared::ratelimit::RateLimiter`] for what happens beyond.
pub const MAX_RATE_KEYS: usize = 100_000;

/// Why a label set was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum LabelError {
    #[error("{what} has {count} labels; at most {MAX_LABELS} are allowed")]
    TooMany { what: &'static str, count: usize },
    #[error(
        "{what}: label key {key:?} must be 1 to {MAX_LABEL_KEY} characters of letters, digits, '.', '_', '-' or '/'"
    )]
    BadKey { what: &'static str, key: String },
    #[error("{what}: the value of label {key:?} is {len} bytes; at most {MAX_LABEL_VALUE} are allowed")]
    ValueTooLong { what: &'static str, key: String, len: usize },
}

/// Checks a label set's count and each key and value; `what` names it in the error ("Hello labels").
pub fn check_labels<'a>(
    what: &'static str,
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany { what, count: labels.len() });
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY
            && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(LabelError::BadKey { what, key: key.chars().take(MAX_LABEL_KEY).collect() });
        }
        if value.len() > MAX_LABEL_VALUE {
            return Err(LabelError::ValueTooLong { what, key: key.clone(), len: value.len() });
        }
    }
    Ok(())
}

/// [`check_labels`] for the ordered maps records use.
pub fn check_label_map(what: &'static str, labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    check_labels(what, labels.iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_in_count_and_length() {
        let ok: BTreeMap<String, String> = [("class".into(), "pi5".into()), ("site/zone".into(), "b".into())].into();
        assert!(check_label_map("Hello labels", &ok).is_ok());
        let many: BTreeMap<String, String> = (0..=MAX_LABELS).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(matches!(check_label_map("x", &many), Err(LabelError::TooMany { count: 65, .. })));
        let long: BTreeMap<String, String> = [("k".into(), "v".repeat(MAX_LABEL_VALUE + 1))].into();
        assert!(matches!(check_label_map("x", &long), Err(LabelError::ValueTooLong { .. })));
        for key in ["", "a b", "k=v", "caf\u{e9}"] {
            let bad: BTreeMap<String, String> = [(key.to_owned(), "v".into())].into();
            assert!(check_label_map("x", &bad).is_err(), "{key:?}");
        }
    }
}
