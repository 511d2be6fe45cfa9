//! The controller's configuration, built by `main` from flags and injected, never read from globals.

use std::path::PathBuf;
use std::time::Duration;

use crate::registry::RegistryConfig;

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Where the store (`controller.redb`), blobs and the bootstrap admin token live.
    pub data_dir: PathBuf,
    /// host:port agents use to pull from the embedded registry. Defaults to the HTTP listener's
    /// address, which is right only when agents reach the controller at that address.
    pub registry_host: Option<String>,
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    pub registry: RegistryConfig,
    /// External OCI registries (CNCF distribution, zot, Harbor, a cloud registry) bundles may be rolled out
    /// from, besides the embedded one. A rollout names one by prefixing the repository with its
    /// `host:port` exactly as configured here; agents are given that registry in the bundle reference.
    pub external_registries: Vec<ExternalRegistry>,
}

/// An external registry the controller resolves tags on (and checks bundles in) when a rollout is created.
#[derive(Clone, PartialEq, Eq)]
pub struct ExternalRegistry {
    /// `host:port`, as agents and alkictl reach it.
    pub host: String,
    /// Reach it over plain HTTP instead of HTTPS (a registry on loopback or a trusted site network).
    pub plain_http: bool,
    /// Basic credentials (username, password or token) for reading from it; anonymous when absent.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for ExternalRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalRegistry")
            .field("host", &self.host)
            .field("plain_http", &self.plain_http)
            .field("username", &self.credentials.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl ExternalRegistry {
    pub fn new(host: impl Into<String>) -> ExternalRegistry {
        ExternalRegistry { host: host.into(), plain_http: false, credentials: None }
    }
}

impl ControllerConfig {
    pub fn new(data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            data_dir,
            registry_host: None,
            heartbeat_interval: Duration::from_secs(10),
            registry: RegistryConfig::default(),
            external_registries: Vec::new(),
        }
    }
}
