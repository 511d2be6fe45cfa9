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
    /// The CA, the listeners' certificate and device certificate validity.
    pub pki: crate::pki::PkiConfig,
    /// Serve gRPC and HTTP without TLS (`--insecure-plaintext`): only on a loopback test bench.
    pub insecure_plaintext: bool,
    /// Also admit agent sessions that present a bearer token of role agent instead of a device certificate,
    /// trusting the device id in their Hello (`--insecure-agent-tokens`): for the fleet simulator, which
    /// multiplexes thousands of devices over a few connections.
    pub insecure_agent_tokens: bool,
    /// Message sizes, streams per connection, request rates per token and per device.
    pub limits: crate::limits::Limits,
    /// How much of the audit log is kept.
    pub audit_retention: crate::store::audit::AuditRetention,
    /// Public keys (cosign-compatible) a rollout candidate must be signed with (`--trusted-key`). With none,
    /// every rollout needs an explicit override.
    pub trusted_keys: Vec<alki_shared::signing::PublicKey>,
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
            pki: crate::pki::PkiConfig {
                device_cert_validity: Duration::from_secs(30 * 24 * 3600),
                ..Default::default()
            },
            insecure_plaintext: false,
            insecure_agent_tokens: false,
            limits: crate::limits::Limits::default(),
            audit_retention: crate::store::audit::AuditRetention::default(),
            trusted_keys: Vec::new(),
        }
    }
}
