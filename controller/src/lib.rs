//! Alki Fleet's control plane: gRPC for agents and operators, the OCI registry, the store, and rollouts.
//!
//! `main` only parses flags; [`server::serve`] takes bound listeners and a shutdown future so tests can
//! run a real controller on port 0.

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod bundles;
pub mod config;
pub mod console;
pub mod enrollment;
pub mod events;
pub mod facts;
pub mod fleet;
pub mod insight;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod outbound;
pub mod pki;
pub mod registry;
pub mod roles;
pub mod rollout;
pub mod scope;
pub mod server;
pub mod store;
pub mod suites;
pub mod tls;
pub mod trust;

pub use server::{Listeners, serve, serve_with_clock};
