//! Limits on what callers may send: message sizes, streams per connection, label counts and lengths, and
//! request rates per token and per device (a keyed token bucket). Pure logic; callers pass the clock in.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// A token bucket's shape: `burst` requests at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by caller (a token name, a device id). Bounded: at most `max_keys` buckets, and
/// buckets that have refilled completely are forgotten first (forgetting them changes nothing).
pub struct RateLimiter {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A refusal: how long until one more request would pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryAfter(pub Duration);

impl RateLimiter {
    pub fn new(rate: Rate) -> RateLimiter {
        RateLimiter { rate, max_keys: 100_000, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `key`'s bucket at time `now`.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), RetryAfter> {
        let burst = f64::from(self.rate.burst.max(1));
        let per_second = self.rate.per_second.max(f64::MIN_POSITIVE);
        // A poisoned lock only means another thread panicked mid-update of plain numbers: keep going.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= self.max_keys && !buckets.contains_key(key) {
            buckets.retain(|_, b| refill(b, now, per_second, burst) < burst);
            if buckets.len() >= self.max_keys {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: burst, updated: now });
        bucket.tokens = refill(bucket, now, per_second, burst);
        bucket.updated = now.max(bucket.updated);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(RetryAfter(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second)))
        }
    }
}

fn refill(bucket: &Bucket, now: Instant, per_second: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * per_second).min(burst)
}

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
    fn a_bucket_allows_its_burst_then_refills_at_its_rate_per_key() {
        let limiter = RateLimiter::new(Rate { per_second: 2.0, burst: 3 });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("ci", t0).is_ok());
        }
        let RetryAfter(wait) = limiter.check("ci", t0).expect_err("burst spent");
        assert_eq!(wait, Duration::from_millis(500));
        assert!(limiter.check("other", t0).is_ok(), "buckets are per key");
        assert!(limiter.check("ci", t0 + Duration::from_millis(500)).is_ok());
        assert!(limiter.check("ci", t0 + Duration::from_millis(500)).is_err());
        // Long idle refills to the burst, never beyond.
        for _ in 0..3 {
            assert!(limiter.check("ci", t0 + Duration::from_secs(60)).is_ok());
        }
        assert!(limiter.check("ci", t0 + Duration::from_secs(60)).is_err());
    }

    #[test]
    fn the_key_table_stays_bounded() {
        let mut limiter = RateLimiter::new(Rate { per_second: 1.0, burst: 1 });
        limiter.max_keys = 10;
        let t0 = Instant::now();
        for i in 0..100 {
            assert!(limiter.check(&format!("k{i}"), t0).is_ok());
            assert!(limiter.buckets.lock().expect("lock").len() <= 10);
        }
    }

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
