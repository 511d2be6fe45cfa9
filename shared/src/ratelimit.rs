//! Token buckets keyed by caller (a token name, a device id, a client address), bounded in keys: the rate
//! limits of the controller's APIs and of the agent's front port. Pure: callers pass the time in.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A token bucket's shape: `burst` requests at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    /// `n` requests a minute, in bursts of up to `n`.
    pub fn per_minute(n: u32) -> Rate {
        Rate { per_second: f64::from(n) / 60.0, burst: n }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A refusal: how long until one more request would pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryAfter(pub Duration);

/// Token buckets keyed by `K`. Bounded: at most `max_keys` buckets. When full, buckets that refilled
/// completely are forgotten first (forgetting them changes nothing); if that is not enough, the least
/// recently used tenth goes, so a flood of new keys neither grows the table nor resets the buckets of
/// the callers being limited (which clearing the table would).
pub struct RateLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> RateLimiter<K> {
        RateLimiter { rate, max_keys: max_keys.max(1), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `key`'s bucket at time `now`.
    pub fn check<Q>(&self, key: &Q, now: Instant) -> Result<(), RetryAfter>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let burst = f64::from(self.rate.burst.max(1));
        let per_second = self.rate.per_second.max(f64::MIN_POSITIVE);
        // A poisoned lock only means another thread panicked mid-update of plain numbers: keep going.
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= self.max_keys && !buckets.contains_key(key) {
            buckets.retain(|_, b| refill(b, now, per_second, burst) < burst);
            if buckets.len() >= self.max_keys {
                forget_least_recent(&mut buckets, self.max_keys / 10 + 1);
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

    /// Keys with a bucket now.
    pub fn keys(&self) -> usize {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Removes the `n` least recently updated buckets (one sort per eviction, amortised over `n` new keys).
fn forget_least_recent<K: Hash + Eq + Clone>(buckets: &mut HashMap<K, Bucket>, n: usize) {
    let mut by_age: Vec<(Instant, K)> = buckets.iter().map(|(k, b)| (b.updated, k.clone())).collect();
    by_age.sort_unstable_by_key(|(at, _)| *at);
    for (_, key) in by_age.into_iter().take(n) {
        buckets.remove(&key);
    }
}

fn refill(bucket: &Bucket, now: Instant, per_second: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * per_second).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate_per_key() {
        let limiter: RateLimiter<String> = RateLimiter::new(Rate { per_second: 2.0, burst: 3 }, 100);
        let t0 = Instant::now();
        let ci = "ci";
        for _ in 0..3 {
            assert!(limiter.check(ci, t0).is_ok());
        }
        let RetryAfter(wait) = limiter.check(ci, t0).expect_err("burst spent");
        assert_eq!(wait, Duration::from_millis(500));
        assert!(limiter.check("other", t0).is_ok(), "buckets are per key");
        assert!(limiter.check(ci, t0 + Duration::from_millis(500)).is_ok());
        assert!(limiter.check(ci, t0 + Duration::from_millis(500)).is_err());
        // Long idle refills to the burst, never beyond.
        for _ in 0..3 {
            assert!(limiter.check(ci, t0 + Duration::from_secs(60)).is_ok());
        }
        assert!(limiter.check(ci, t0 + Duration::from_secs(60)).is_err());
    }

    #[test]
    fn per_minute_refills_one_every_sixtieth_of_a_minute_times_n() {
        let limiter = RateLimiter::new(Rate::per_minute(3), 10);
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.check(&1u8, t0).is_ok()));
        assert!(limiter.check(&1u8, t0).is_err());
        assert!(limiter.check(&1u8, t0 + Duration::from_secs(20)).is_ok());
    }

    #[test]
    fn a_flood_of_new_keys_stays_bounded_and_does_not_reset_a_limited_caller() {
        let limiter: RateLimiter<String> = RateLimiter::new(Rate { per_second: 0.001, burst: 1 }, 10);
        let t0 = Instant::now();
        let abuser = "abuser";
        assert!(limiter.check(abuser, t0).is_ok());
        for i in 0..100u64 {
            let now = t0 + Duration::from_millis(i + 1);
            assert!(limiter.check(format!("k{i}").as_str(), now).is_ok());
            assert!(limiter.keys() <= 10);
            // The limited caller keeps using its key, so it is never the least recent one.
            assert!(limiter.check(abuser, now).is_err(), "still limited after {i} new keys");
        }
    }
}
