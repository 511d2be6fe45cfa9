//! Alki Fleet's bundle tooling as a library: GGUF files packed as a bundle ([`pack`]) and llama.cpp builds
//! packed as a runtime build ([`runtime_build`]) in an OCI layout ([`layout`]), pushed ([`push`]), signed
//! ([`sign`]) and inspected ([`inspect`]) in a registry through one client ([`registry`]), signing keys
//! ([`keys`]), bundle references as people write them ([`reference`]), and eval suites packed, pushed and
//! inspected as OCI artifacts ([`suite`]).
//!
//! It prints nothing: long work reports through [`progress::Progress`], failures are [`Error`]s. alkictl,
//! the controller (reading an external registry's signatures), the end-to-end tests and the benchmarks use it.

pub mod error;
pub mod inspect;
pub mod keys;
pub mod layout;
pub mod pack;
pub mod progress;
pub mod push;
pub mod reference;
pub mod registry;
pub mod runtime_build;
pub mod sbom;
pub mod sign;
pub mod suite;

pub use error::{Error, Result};
pub use progress::{Progress, ProgressSink};
pub use reference::BundleRef;
pub use registry::Remote;
