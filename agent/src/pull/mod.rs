//! Acquiring content: everything between a bundle reference and verified files on disk. [`Acquirer`] is the
//! one path activation, pre-staging and calibration take (memory → trust → bundle → runtime build); the parts
//! below it are public for tools and tests that pull one piece at a time.
//!
//! From the bottom up: `registry` (access, mirrors with fallback, credentials to their exact host only),
//! `manifest` (checked against their digest, from a registry or the store), `signature` (the trust check
//! before anything else is fetched), `blob` (resumable, paced, verified downloads; disk checks), `extract`
//! (runtime build archives, safely), `materialise` (variant directories), `keep` (what stays on disk),
//! `bundle` (variant choice, store first), `build` (runtime builds), `acquire`. One error type:
//! [`PullError`].

mod acquire;
pub mod blob;
pub mod build;
mod bundle;
mod error;
pub mod extract;
pub mod keep;
pub mod manifest;
mod materialise;
mod registry;
pub mod signature;

pub use acquire::{Acquirer, LayerChoice, Want};
pub use blob::{PROGRESS_INTERVAL, Pace, PullProgress, throttled};
pub use bundle::{DEFAULT_DISK_RESERVE_BYTES, PullOptions, PulledBundle, pull_bundle_with, verify_from_store};
pub use error::{ArchiveProblem, PullError, Pushed, human_bytes};
pub use materialise::{VERIFICATION_RECORD, prune_variant_dirs};
pub use registry::{RegistryAccess, RegistrySettings, Source};
