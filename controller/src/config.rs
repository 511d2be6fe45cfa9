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
}

impl ControllerConfig {
    pub fn new(data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            data_dir,
            registry_host: None,
            heartbeat_interval: Duration::from_secs(10),
            registry: RegistryConfig::default(),
        }
    }
}
