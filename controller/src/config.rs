//! The controller's configuration, built by `main` from flags and injected, never read from globals.

use std::path::{Path, PathBuf};
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
    /// How long a command to an offline device (benchmark, calibrate, evaluate, restart-runtime, reverify)
    /// waits in the controller's queue for the device's next Hello before it is dropped.
    pub command_queue_ttl: Duration,
    /// How long a web console login lasts (`--console-session-ttl`); the console asks for the token again.
    pub console_session_ttl: Duration,
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
    /// Which labels a device's own report may set (`--device-owned-label-keys`); by default none: labels
    /// come from enrollment tokens and operators.
    pub label_trust: crate::facts::LabelTrust,
    /// Message sizes, streams per connection, request rates per token and per device.
    pub limits: crate::limits::Limits,
    /// How much of the audit log is kept.
    pub audit_retention: crate::store::audit::AuditRetention,
    /// Public keys (cosign-compatible) a rollout candidate must be signed with (`--trusted-key`). With none,
    /// every rollout needs an explicit override.
    pub trusted_keys: Vec<alki_shared::signing::PublicKey>,
    /// How webhook deliveries are retried.
    pub webhook_delivery: DeliveryConfig,
    /// The external gates rollouts may name (`--gates-file`): webhook gates and the operator's Prometheus.
    pub gates: GatesConfig,
}

/// The `--gates-file`: the Prometheus that query gates ask, and the webhook gates rollouts name.
///
/// ```toml
/// retry_seconds = 30                      # an unreachable gate or one without data is asked again after this
/// [prometheus]
/// url = "https://prometheus.example:9090" # http:// too: this is the admin's own network
/// bearer_token_file = "/etc/alki/prometheus.token"   # optional
/// [webhook.change-approval]
/// url = "https://approvals.example.com/alki"
/// secret_file = "/etc/alki/change-approval.secret"  # whsec_...; deliveries are signed like event webhooks
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GatesConfig {
    pub prometheus: Option<PrometheusGateConfig>,
    pub webhooks: std::collections::BTreeMap<String, WebhookGateConfig>,
    /// How long before asking again a gate that said not yet without saying when, failed, or had no data.
    pub retry: Duration,
}

#[derive(Clone, PartialEq)]
pub struct PrometheusGateConfig {
    pub url: String,
    pub bearer_token: Option<String>,
}

impl std::fmt::Debug for PrometheusGateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusGateConfig").field("url", &self.url).finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq)]
pub struct WebhookGateConfig {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for WebhookGateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookGateConfig").field("url", &self.url).finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GatesFile {
    retry_seconds: Option<u32>,
    prometheus: Option<PrometheusEntry>,
    #[serde(default)]
    webhook: std::collections::BTreeMap<String, WebhookGateEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrometheusEntry {
    url: String,
    bearer_token_file: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookGateEntry {
    url: String,
    secret_file: PathBuf,
}

/// Reads a gates file (see [`GatesConfig`]); every error names the file and the entry.
pub fn load_gates(path: &Path) -> Result<GatesConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_gates(&text, |file| std::fs::read_to_string(file)).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_gates(text: &str, read_secret: impl Fn(&Path) -> std::io::Result<String>) -> Result<GatesConfig, String> {
    let file: GatesFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let secret = |what: &str, path: &Path| {
        read_secret(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))
    };
    let http_url = |what: &str, url: &str| match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(()),
        _ => Err(format!("{what}: url {url:?} is not an http(s) URL")),
    };
    let prometheus = match file.prometheus {
        Some(p) => {
            http_url("prometheus", &p.url)?;
            let bearer_token = p.bearer_token_file.map(|f| secret("prometheus bearer_token_file", &f)).transpose()?;
            Some(PrometheusGateConfig { url: p.url.trim_end_matches('/').to_owned(), bearer_token })
        }
        None => None,
    };
    let mut webhooks = std::collections::BTreeMap::new();
    for (name, entry) in file.webhook {
        let what = format!("webhook gate {name:?}");
        http_url(&what, &entry.url)?;
        let secret = secret(&what, &entry.secret_file)?;
        alki_shared::webhook::secret_key(&secret).map_err(|e| format!("{what}: secret_file: {e}"))?;
        webhooks.insert(name, WebhookGateConfig { url: entry.url, secret });
    }
    let retry = Duration::from_secs(u64::from(file.retry_seconds.unwrap_or(30).max(1)));
    Ok(GatesConfig { prometheus, webhooks, retry })
}

/// How deliveries are attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// The first retry waits about this long; each next one twice as long, up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// An event still undelivered this long after it happened is given up on (counted as failed).
    pub give_up_after: Duration,
    /// One attempt's deadline, connection included.
    pub timeout: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            give_up_after: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(10),
        }
    }
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

/// The `--external-registries-file`: one table per registry, each with its own transport and credentials,
/// for fleets that pull from several registries (a site mirror with its own login, a cloud registry).
///
/// ```toml
/// [[registry]]
/// host = "registry.site-a.example:5000"
/// plain_http = false              # default
/// username = "alki"               # with password_file; anonymous reads without both
/// password_file = "/etc/alki/site-a.password"
/// ```
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistriesFile {
    #[serde(default)]
    registry: Vec<RegistryEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryEntry {
    host: String,
    #[serde(default)]
    plain_http: bool,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

/// Checks a registry host as the configuration names it: `host` or `host:port`, no scheme, path or user.
pub fn check_registry_host(host: &str) -> Result<(), String> {
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(format!("{host:?} must be host or host:port, without a scheme or path"));
    }
    Ok(())
}

/// Reads an external-registries file (see [`RegistriesFile`]); password files are read relative to the
/// working directory when not absolute. Every error names the file and the entry.
pub fn load_external_registries(path: &Path) -> Result<Vec<ExternalRegistry>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_external_registries(&text, |file| std::fs::read_to_string(file))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_external_registries(
    text: &str,
    read_password: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<Vec<ExternalRegistry>, String> {
    let file: RegistriesFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut registries: Vec<ExternalRegistry> = Vec::new();
    for entry in file.registry {
        check_registry_host(&entry.host).map_err(|e| format!("registry host {e}"))?;
        if registries.iter().any(|r| r.host == entry.host) {
            return Err(format!("registry {:?} is listed twice; keep one table per host", entry.host));
        }
        let credentials = match (entry.username, entry.password_file) {
            (Some(user), Some(file)) => {
                let password = read_password(&file).map_err(|e| {
                    format!("registry {:?}: cannot read password_file {}: {e}", entry.host, file.display())
                })?;
                Some((user, password.trim().to_owned()))
            }
            (None, None) => None,
            _ => {
                return Err(format!(
                    "registry {:?}: give both username and password_file, or neither for anonymous reads",
                    entry.host
                ));
            }
        };
        registries.push(ExternalRegistry { host: entry.host, plain_http: entry.plain_http, credentials });
    }
    Ok(registries)
}

impl ControllerConfig {
    pub fn new(data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            data_dir,
            registry_host: None,
            heartbeat_interval: Duration::from_secs(10),
            command_queue_ttl: crate::fleet::commands::DEFAULT_TTL,
            console_session_ttl: crate::console::session::DEFAULT_SESSION_TTL,
            registry: RegistryConfig::default(),
            external_registries: Vec::new(),
            pki: crate::pki::PkiConfig {
                device_cert_validity: Duration::from_secs(30 * 24 * 3600),
                ..Default::default()
            },
            insecure_plaintext: false,
            insecure_agent_tokens: false,
            label_trust: crate::facts::LabelTrust::default(),
            limits: crate::limits::Limits::default(),
            audit_retention: crate::store::audit::AuditRetention::default(),
            trusted_keys: Vec::new(),
            webhook_delivery: DeliveryConfig::default(),
            gates: GatesConfig { retry: Duration::from_secs(30), ..Default::default() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passwords(path: &Path) -> std::io::Result<String> {
        match path.to_str() {
            Some("/etc/alki/a.password") => Ok("s3cret\n".into()),
            _ => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }

    #[test]
    fn each_registry_keeps_its_own_transport_and_credentials() {
        let text = r#"
            [[registry]]
            host = "a.example:5000"
            username = "alki"
            password_file = "/etc/alki/a.password"

            [[registry]]
            host = "127.0.0.1:5001"
            plain_http = true
        "#;
        let registries = parse_external_registries(text, passwords).expect("valid file");
        assert_eq!(registries.len(), 2);
        assert_eq!(registries[0].credentials, Some(("alki".into(), "s3cret".into())));
        assert!(!registries[0].plain_http);
        assert_eq!(registries[1].credentials, None);
        assert!(registries[1].plain_http);
    }

    #[test]
    fn bad_entries_are_named() {
        let cases = [
            ("[[registry]]\nhost = \"https://a.example\"\n", "without a scheme"),
            ("[[registry]]\nhost = \"a\"\n[[registry]]\nhost = \"a\"\n", "listed twice"),
            ("[[registry]]\nhost = \"a\"\nusername = \"u\"\n", "both username and password_file"),
            ("[[registry]]\nhost = \"a\"\nusername = \"u\"\npassword_file = \"/nope\"\n", "cannot read password_file"),
            ("[[registry]]\nhost = \"a\"\nplain = true\n", "unknown field"),
        ];
        for (text, expected) in cases {
            let error = parse_external_registries(text, passwords).err().unwrap_or_default();
            assert!(error.contains(expected), "{text:?} gave {error:?}, expected {expected:?}");
        }
    }

    #[test]
    fn a_gates_file_names_prometheus_and_webhook_gates_with_their_secrets() {
        let secret = alki_shared::webhook::secret_from_key(&[1u8; 32]);
        let read = |path: &Path| match path.to_str() {
            Some("/s") => Ok(secret.clone()),
            Some("/t") => Ok("tok\n".to_owned()),
            _ => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        };
        let text = r#"
            retry_seconds = 5
            [prometheus]
            url = "http://prom:9090/"
            bearer_token_file = "/t"
            [webhook.change-approval]
            url = "https://approve.example/alki"
            secret_file = "/s"
        "#;
        let gates = parse_gates(text, read).expect("valid");
        assert_eq!(gates.retry, Duration::from_secs(5));
        let prometheus = gates.prometheus.expect("prometheus");
        assert_eq!((prometheus.url.as_str(), prometheus.bearer_token.as_deref()), ("http://prom:9090", Some("tok")));
        assert_eq!(gates.webhooks["change-approval"].secret, secret);
        for (text, expected) in [
            ("[prometheus]\nurl = \"prom:9090\"", "not an http(s) URL"),
            ("[webhook.a]\nurl = \"https://a\"\nsecret_file = \"/missing\"", "cannot read /missing"),
            ("[webhook.a]\nurl = \"https://a\"\nsecret_file = \"/t\"", "whsec_"),
            ("[webhook.a]\nurl = \"https://a\"", "secret_file"),
            ("colour = 1", "unknown field"),
        ] {
            let error = parse_gates(text, read).err().unwrap_or_default();
            assert!(error.contains(expected), "{text:?} gave {error:?}, expected {expected:?}");
        }
    }

    #[test]
    fn the_example_gates_file_parses() {
        let secret = alki_shared::webhook::secret_from_key(&[2u8; 32]);
        let gates = parse_gates(include_str!("../../deploy/config/gates.toml"), |_| Ok(secret.clone())).expect("valid");
        assert!(gates.prometheus.is_some() && gates.webhooks.contains_key("change-approval"));
    }
}
