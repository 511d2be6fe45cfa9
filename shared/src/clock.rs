//! Wall-clock time as a type (`UnixMs`) and the one clock abstraction both daemons read it through.
//!
//! Code that needs "now" takes a [`Clock`] (or an `UnixMs` argument, as the rollout engine does) instead
//! of calling `SystemTime::now()`, so a test can drive time: [`ManualClock`] is set and advanced by hand,
//! and [`TokioClock`] follows tokio's clock, which `tokio::time::pause()` / `advance()` control, so a
//! test that waits on a timer and reads wall time sees both move together without sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (UTC): the one representation of a wall-clock instant, as stored
/// in records and carried on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct UnixMs(pub i64);

impl UnixMs {
    pub const EPOCH: UnixMs = UnixMs(0);

    /// The system's wall clock. Prefer a [`Clock`] where a test may want to drive time.
    pub fn now() -> UnixMs {
        UnixMs::from_system_time(SystemTime::now())
    }

    /// A `SystemTime` as milliseconds; times before the epoch are negative, far-future ones saturate.
    pub fn from_system_time(t: SystemTime) -> UnixMs {
        match t.duration_since(UNIX_EPOCH) {
            Ok(after) => UnixMs(i64::try_from(after.as_millis()).unwrap_or(i64::MAX)),
            Err(before) => UnixMs(-i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX)),
        }
    }

    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant plus a duration, saturating instead of overflowing.
    pub fn plus(self, d: Duration) -> UnixMs {
        UnixMs(self.0.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }

    /// This instant minus a duration, saturating instead of overflowing.
    pub fn minus(self, d: Duration) -> UnixMs {
        UnixMs(self.0.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }

    /// How long after `earlier` this instant is; zero when it is not after it.
    pub fn since(self, earlier: UnixMs) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

impl fmt::Display for UnixMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

impl fmt::Debug for UnixMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnixMs({})", self.0)
    }
}

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> UnixMs;
}

/// A clock shared by the parts of a daemon.
pub type SharedClock = Arc<dyn Clock>;

/// The system's wall clock: what the daemons run on.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMs {
        UnixMs::now()
    }
}

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock a test sets and advances by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn starting_at(t: UnixMs) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(t.0)))
    }

    pub fn set(&self, t: UnixMs) {
        self.0.store(t.0, Ordering::SeqCst);
    }

    pub fn advance(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMs {
        UnixMs(self.0.load(Ordering::SeqCst))
    }
}

/// Wall time anchored once at creation and moved on by tokio's clock: under `tokio::time::pause()`
/// it stands still until the test advances it, together with every tokio timer.
#[derive(Debug)]
pub struct TokioClock {
    wall: UnixMs,
    at: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(wall: UnixMs) -> Arc<TokioClock> {
        Arc::new(TokioClock { wall, at: tokio::time::Instant::now() })
    }
}

impl Clock for TokioClock {
    fn now(&self) -> UnixMs {
        self.wall.plus(self.at.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_never_goes_negative_in_since() {
        let t = UnixMs(1_000);
        assert_eq!(t.plus(Duration::from_millis(500)), UnixMs(1_500));
        assert_eq!(t.minus(Duration::from_secs(2)), UnixMs(-1_000));
        assert_eq!(UnixMs(i64::MAX).plus(Duration::from_secs(1)), UnixMs(i64::MAX));
        assert_eq!(UnixMs(2_000).since(t), Duration::from_secs(1));
        assert_eq!(t.since(UnixMs(2_000)), Duration::ZERO);
    }

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::starting_at(UnixMs(10));
        assert_eq!(clock.now(), UnixMs(10));
        clock.advance(Duration::from_millis(5));
        assert_eq!(clock.now(), UnixMs(15));
        clock.set(UnixMs(3));
        assert_eq!(clock.now(), UnixMs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_follows_the_paused_tokio_time() {
        let clock = TokioClock::starting_at(UnixMs(1_000));
        assert_eq!(clock.now(), UnixMs(1_000));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(clock.now(), UnixMs(4_000));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(clock.now(), UnixMs(5_000));
    }
}
