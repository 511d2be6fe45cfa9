//! Alki Fleet's control plane: gRPC for agents and operators, the OCI registry, the store, and rollouts.
//!
//! `main` only parses flags; [`server::serve`] takes bound listeners and a shutdown future so tests can
//! run a real controller on port 0.

pub mod api;
pub mod audit;
pub mod auth;
pub mod config;
pub mod fleet;
pub mod insight;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod store;
pub mod tls;
pub mod trust;

pub use server::{Listeners, serve};

/// Milliseconds since the Unix epoch, for records and reports (never for deciding anything in pure logic).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
