//! The agent's configuration file (TOML): its shape, defaults, and validation that names the field and the fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alki_shared::ids::DeviceId;
use serde::Deserialize;

/// The whole configuration file. Unknown fields are refused so that a typo never silently does nothing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's id. When absent, one is generated on first start and kept in the state file.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Where the agent keeps its state file, content store, bundle directories and llama-server logs.
    /// Must be an absolute path.
    pub data_dir: PathBuf,
    /// Labels reported to the controller; rollouts select devices by them. The label `class`, when set,
    /// is the device's hardware class.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How to reach the controller.
    pub controller: ControllerConfig,
    /// How to reach OCI registries.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// How to run llama-server and where to serve clients.
    pub runtime: RuntimeConfig,
    /// The local content store's disk use.
    #[serde(default)]
    pub store: StoreConfig,
    /// The trust policy file (TOML, see `alki_agent::trust`): public keys trusted per repository and whether a
    /// signature is required. Read again before every pull. Absent: nothing is trusted and every bundle is
    /// refused.
    #[serde(default)]
    pub trust_policy: Option<PathBuf>,
    /// Where the agent serves its own Prometheus `/metrics` (e.g. `127.0.0.1:9464`). Absent: not served.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Benchmark the new model (fixed prompt set, a few repetitions against the serving instance) after
    /// every activation and report it to the controller.
    #[serde(default = "default_true")]
    pub benchmark_after_activation: bool,
    /// How quality evaluations run (eval suites named by a desired state, an Evaluate command or a
    /// calibration).
    #[serde(default)]
    pub eval: EvalConfig,
    /// Remote diagnostics: logs and support bundles the controller may ask for, their caps, and the
    /// agent's own log file.
    #[serde(default)]
    pub diagnostics: DiagnosticsConfig,
}

/// Remote diagnostics (`alkictl devices logs|support-bundle`). No remote shell exists: these only read.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticsConfig {
    /// Whether the controller may collect this device's logs and support bundles. False refuses them, and
    /// the operator is told the device disables remote diagnostics. Read again when the config changes.
    #[serde(default = "default_true")]
    pub remote_logs: bool,
    /// Most bytes (uncompressed) one logs request or support bundle sends, following included.
    #[serde(default = "default_diag_request_mib")]
    pub max_mib_per_request: u64,
    /// Most bytes per second (uncompressed) diagnostics send, so a follow never competes with serving.
    #[serde(default = "default_diag_rate_kib")]
    pub max_kib_per_second: u64,
    /// The agent's own log, copied to `<data_dir>/logs/agent.log` (rotated once to `agent.log.1`, the two at
    /// most this many MiB together) when the agent does not run under systemd's journal; under journald
    /// its log is read with `journalctl`. 0: no file (remote logs then have only llama-server's).
    #[serde(default = "default_agent_log_mib")]
    pub agent_log_file_mib: u64,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        DiagnosticsConfig {
            remote_logs: true,
            max_mib_per_request: default_diag_request_mib(),
            max_kib_per_second: default_diag_rate_kib(),
            agent_log_file_mib: default_agent_log_mib(),
        }
    }
}

fn default_diag_request_mib() -> u64 {
    64
}

fn default_diag_rate_kib() -> u64 {
    1024
}

fn default_agent_log_mib() -> u64 {
    16
}

/// Quality evaluations: llama-perplexity and a loopback llama-server beside the serving model, or in a
/// stop-then-start swap's gap when they do not fit beside it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// CPU priority of the evaluation's processes: `idle` (default: SCHED_IDLE and nice 19, they run only on
    /// CPU time the serving model leaves), `nice` (nice 19 only) or `normal`. An evaluation that cannot
    /// finish within its suite's time budget at this priority reports "out of time".
    #[serde(default)]
    pub priority: crate::runtime::priority::Priority,
    /// llama-perplexity's threads (`-t`); 0 lets the tool decide.
    #[serde(default)]
    pub threads: u32,
    /// When a stop-then-start swap's candidate is to be evaluated and the evaluation would not fit beside it
    /// once it serves, it runs in the gap instead (the old model stopped, the memory free), for at most this
    /// many seconds more of outage; past it the evaluation is stopped, reported as out of time, and the
    /// candidate starts. 0: never evaluate in the gap (such a device reports "does not fit").
    #[serde(default = "default_gap_budget")]
    pub gap_budget_seconds: u32,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { priority: Default::default(), threads: 0, gap_budget_seconds: default_gap_budget() }
    }
}

fn default_gap_budget() -> u32 {
    120
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Bytes the content store may hold (MiB); beyond it, blobs of bundles other than the active and the
    /// previous one are evicted, least recently used first. 0: no budget (evict only to make room for a pull).
    #[serde(default)]
    pub budget_mib: u64,
    /// Free space (MiB) that must remain on the data disk after a pull; a pull that would leave less is
    /// refused with the reason (after evicting unused bundles).
    #[serde(default = "default_disk_reserve")]
    pub disk_reserve_mib: u64,
    /// The background scrub: every blob is hashed again at this rate (KiB/s), also when its file looks
    /// unchanged (silent media corruption keeps inode, size and mtime), and a corrupt one is removed.
    /// 0: no background scrub (`alkictl devices reverify` still re-hashes on demand).
    #[serde(default = "default_scrub_rate")]
    pub scrub_kib_per_second: u64,
    /// Hours between the starts of two scrub passes.
    #[serde(default = "default_scrub_interval")]
    pub scrub_interval_hours: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            budget_mib: 0,
            disk_reserve_mib: default_disk_reserve(),
            scrub_kib_per_second: default_scrub_rate(),
            scrub_interval_hours: default_scrub_interval(),
        }
    }
}

fn default_scrub_rate() -> u64 {
    2048
}

fn default_scrub_interval() -> u64 {
    168
}

fn default_disk_reserve() -> u64 {
    512
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// gRPC endpoint of alki-controller, e.g. `https://ctl.example:7070`. Sessions are mutual TLS with the
    /// device certificate from enrollment. `http://` only with `insecure_plaintext = true`.
    pub url: String,
    /// The controller's CA certificate (PEM; the controller's `<data-dir>/pki/ca.crt`): the agent trusts the
    /// controller, its registry and enrollment with it. Required for `https://`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Where the device key (mode 0600), certificate and the CA from enrollment are kept; default
    /// `<data_dir>/identity`.
    #[serde(default)]
    pub identity_dir: Option<PathBuf>,
    /// A bootstrap token file (`alkictl enroll token create`): on a start without a certificate the agent
    /// enrolls with it. `alki-agent enroll --token-file` does the same by hand.
    #[serde(default)]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Talk plain HTTP/2 to the controller with a bearer token instead of mTLS: only for tests on loopback.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// With `insecure_plaintext`: the file holding a bearer token of role agent, read again at every
    /// connection attempt.
    #[serde(default)]
    pub token_file: PathBuf,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registries (`host:port`) reached over plain HTTP; all others use HTTPS. The controller's embedded
    /// registry is added automatically when the controller URL is `http://`.
    #[serde(default)]
    pub insecure_plain_http: Vec<String>,
    /// `host:port` of the controller's embedded registry, used for bundles whose reference names no
    /// registry. Defaults to the host and port of `controller.url`. The agent's token is sent to registries
    /// on this host (any port) and to no other registry.
    #[serde(default)]
    pub embedded: Option<String>,
    /// Download rate limit for pulls in KiB per second (0: unlimited), so a fleet update does not saturate
    /// a site's uplink.
    #[serde(default)]
    pub bandwidth_limit_kib: u64,
    /// Mirrors per registry, like containerd's hosts: `"registry:port" = ["cache.site:5000", ...]`. Pulls
    /// try the mirrors in order, then the registry itself; every byte is verified against the bundle's
    /// digests, so a mirror cannot change what is served. Name the embedded registry by its `host:port`
    /// too. Mirrors reached over plain HTTP go in `insecure_plain_http`.
    #[serde(default)]
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Credentials per registry or mirror (`host:port`, exactly as bundles or `mirrors` name it), sent only
    /// to that `host:port`. The embedded registry uses the agent's token unless credentials are given here.
    #[serde(default)]
    pub credentials: BTreeMap<String, RegistryCredentials>,
}

/// Basic-auth credentials for one registry; the password is read from a file at every pull, so it can be
/// rotated without a restart.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub username: String,
    pub password_file: PathBuf,
}

/// Most mirrors tried for one registry before its origin.
pub const MAX_MIRRORS: usize = 8;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Path of the llama-server binary.
    pub llama_server: PathBuf,
    /// Where clients reach the model (OpenAI-compatible paths are passed through). Port 0 picks a free port.
    #[serde(default = "default_front_addr")]
    pub front_addr: String,
    /// How long a new llama-server may take to load its model and answer `/health` and a smoke completion.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_secs: u64,
    /// How long an old llama-server may keep finishing in-flight requests after a swap before it is stopped.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    /// Extra arguments appended to llama-server's command line.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// A command llama-server is started through, its program path appended: e.g. `["numactl",
    /// "--interleave=all"]` or `["taskset", "-c", "2-3"]` to place it on the board's cores, or
    /// `["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"]` to run an arm64 build emulated. Empty: run
    /// llama-server directly.
    #[serde(default)]
    pub launcher: Vec<String>,
    /// After a swap, how long the new model is watched (exit, `/health`, `/slots`); a failure within it swaps
    /// back to the previous model. 0 turns the watch off.
    #[serde(default = "default_watch_window")]
    pub watch_window_secs: u64,
    /// `auto` (default): blue/green when the device's available memory holds the new model beside the one
    /// serving (plus `memory_reserve_mib`), otherwise stop-then-start. `blue_green` or `stop_then_start`
    /// force one.
    #[serde(default)]
    pub swap_strategy: SwapStrategyChoice,
    /// Memory kept free beyond the new model's needs when deciding whether both models fit.
    #[serde(default = "default_memory_reserve")]
    pub memory_reserve_mib: u64,
    /// During a stop-then-start gap (or a restart after a crash), how long a client request waits for the
    /// model before it gets 503 with Retry-After.
    #[serde(default = "default_gap_wait")]
    pub gap_wait_secs: u64,
    /// API keys clients must present on the front port (`Authorization: Bearer KEY`), one per line; read
    /// again when the file changes. Unset: no key is asked for (keep the port on loopback then).
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// Requests one client address may make per minute on the front port; 0: no limit.
    #[serde(default)]
    pub requests_per_minute_per_client: u32,
    /// Largest request body the front port accepts (413 beyond it).
    #[serde(default = "default_max_body")]
    pub max_body_mib: u64,
    /// Client connections open at once on the front port; at the cap the oldest idle one is closed, and
    /// when all are busy a new one gets 503. Lowered to the file-descriptor limit less a reserve.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (and to start the next request on a
    /// kept-alive connection) before the connection is closed.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_secs: u64,
}

/// How swaps place the new model; see [`RuntimeConfig::swap_strategy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapStrategyChoice {
    #[default]
    Auto,
    BlueGreen,
    StopThenStart,
}

fn default_front_addr() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_health_timeout() -> u64 {
    120
}
fn default_drain_timeout() -> u64 {
    30
}
fn default_watch_window() -> u64 {
    60
}
fn default_memory_reserve() -> u64 {
    256
}
fn default_gap_wait() -> u64 {
    30
}
fn default_max_body() -> u64 {
    32
}
fn default_max_connections() -> usize {
    512
}
fn default_header_read_timeout() -> u64 {
    15
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("config field `{field}` {problem}; {fix}")]
    Invalid { field: &'static str, problem: String, fix: &'static str },
}

fn invalid(field: &'static str, problem: impl Into<String>, fix: &'static str) -> ConfigError {
    ConfigError::Invalid { field, problem: problem.into(), fix }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    /// Parses and validates a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), source: Box::new(e) })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; the error names the field and says how to fix it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_identity()?;
        self.validate_controller()?;
        self.validate_registry()?;
        self.validate_runtime()?;
        self.validate_eval()?;
        self.validate_diagnostics()
    }

    /// Diagnostics caps and the store's scrub.
    fn validate_diagnostics(&self) -> Result<(), ConfigError> {
        let d = &self.diagnostics;
        if !(1..=4096).contains(&d.max_mib_per_request) {
            return Err(invalid(
                "diagnostics.max_mib_per_request",
                format!("is {}", d.max_mib_per_request),
                "use 1 to 4096 MiB",
            ));
        }
        if !(16..=1 << 20).contains(&d.max_kib_per_second) {
            return Err(invalid(
                "diagnostics.max_kib_per_second",
                format!("is {}", d.max_kib_per_second),
                "use 16 to 1048576 KiB/s",
            ));
        }
        if d.agent_log_file_mib > 1024 {
            return Err(invalid(
                "diagnostics.agent_log_file_mib",
                format!("is {}", d.agent_log_file_mib),
                "use 0 (no file) to 1024 MiB",
            ));
        }
        if self.store.scrub_interval_hours == 0 || self.store.scrub_interval_hours > 24 * 365 {
            return Err(invalid(
                "store.scrub_interval_hours",
                format!("is {}", self.store.scrub_interval_hours),
                "use 1 to 8760 hours (turn the scrub off with scrub_kib_per_second = 0)",
            ));
        }
        Ok(())
    }

    /// How evaluations run.
    fn validate_eval(&self) -> Result<(), ConfigError> {
        if self.eval.gap_budget_seconds > 3600 {
            return Err(invalid(
                "eval.gap_budget_seconds",
                format!("is {}", self.eval.gap_budget_seconds),
                "use 0 (never evaluate in a swap's gap) to 3600 seconds: the gap is an outage",
            ));
        }
        Ok(())
    }

    /// The device id, the data directory and the labels.
    fn validate_identity(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.device_id {
            DeviceId::new(id.clone()).map_err(|e| {
                invalid("device_id", e.to_string(), "pick another id or remove the field to have one generated")
            })?;
        }
        if !self.data_dir.is_absolute() {
            return Err(invalid(
                "data_dir",
                format!("is {:?}, a relative path", self.data_dir),
                "use an absolute path such as /var/lib/alki-agent",
            ));
        }
        for (key, value) in &self.labels {
            let key_ok = !key.is_empty()
                && key.len() <= 63
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
            if !key_ok {
                return Err(invalid(
                    "labels",
                    format!("has key {key:?}"),
                    "use 1 to 63 characters from a-z, A-Z, 0-9, '.', '_', '-' and '/' for label keys",
                ));
            }
            if value.len() > 255 || value.chars().any(char::is_control) {
                return Err(invalid(
                    "labels",
                    format!("has a value for {key:?} that is too long or holds control characters"),
                    "use at most 255 printable characters for label values",
                ));
            }
        }
        Ok(())
    }

    /// How the controller is reached: its URL, TLS or the insecure token mode, the identity files.
    fn validate_controller(&self) -> Result<(), ConfigError> {
        self.controller_authority()?;
        if self.controller.insecure_plaintext && self.controller.token_file.as_os_str().is_empty() {
            return Err(invalid(
                "controller.token_file",
                "is empty",
                "with insecure_plaintext, name the file holding a token of role agent",
            ));
        }
        if self.controller.insecure_plaintext && self.controller.url.starts_with("https://") {
            return Err(invalid(
                "controller.insecure_plaintext",
                "is true with an https:// URL",
                "remove insecure_plaintext: https:// sessions use the device certificate",
            ));
        }
        if !self.controller.insecure_plaintext && self.controller.ca_file.is_none() {
            return Err(invalid(
                "controller.ca_file",
                "is missing",
                "copy the controller's <data-dir>/pki/ca.crt to the device and name it here",
            ));
        }
        for (field, path) in [
            ("controller.ca_file", &self.controller.ca_file),
            ("controller.identity_dir", &self.controller.identity_dir),
            ("controller.bootstrap_token_file", &self.controller.bootstrap_token_file),
        ] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(invalid(field, format!("is {path:?}, a relative path"), "use an absolute path"));
            }
        }
        Ok(())
    }

    /// Registries: plain-HTTP ones, the embedded one, mirrors and credentials.
    fn validate_registry(&self) -> Result<(), ConfigError> {
        for entry in &self.registry.insecure_plain_http {
            if !valid_authority(entry) {
                return Err(invalid(
                    "registry.insecure_plain_http",
                    format!("has entry {entry:?}"),
                    "list registries as host or host:port, without a scheme or path",
                ));
            }
        }
        if let Some(embedded) = &self.registry.embedded
            && !valid_authority(embedded)
        {
            return Err(invalid(
                "registry.embedded",
                format!("is {embedded:?}"),
                "write it as host:port, without a scheme or path, or remove it to use the controller's",
            ));
        }
        for (origin, mirrors) in &self.registry.mirrors {
            let fix = "write registries and mirrors as host:port, without a scheme or path";
            if !valid_authority(origin) {
                return Err(invalid("registry.mirrors", format!("has registry {origin:?}"), fix));
            }
            if let Some(bad) = mirrors.iter().find(|m| !valid_authority(m)) {
                return Err(invalid("registry.mirrors", format!("has mirror {bad:?} for {origin:?}"), fix));
            }
            if mirrors.len() > MAX_MIRRORS {
                return Err(invalid(
                    "registry.mirrors",
                    format!("lists {} mirrors for {origin:?}", mirrors.len()),
                    "list at most 8 mirrors per registry; each one down costs a connection attempt per pull",
                ));
            }
        }
        for (registry, credentials) in &self.registry.credentials {
            if !valid_authority(registry) {
                return Err(invalid(
                    "registry.credentials",
                    format!("has registry {registry:?}"),
                    "key credentials by host:port, without a scheme or path",
                ));
            }
            if credentials.username.is_empty() || credentials.username.contains(':') {
                return Err(invalid(
                    "registry.credentials",
                    format!("has username {:?} for {registry:?}", credentials.username),
                    "give a non-empty username without ':'",
                ));
            }
            if !credentials.password_file.is_absolute() {
                return Err(invalid(
                    "registry.credentials",
                    format!("has password_file {:?} for {registry:?}", credentials.password_file),
                    "give the absolute path of the file holding the password or token",
                ));
            }
        }
        Ok(())
    }

    /// The front port's bounds.
    fn validate_front(&self) -> Result<(), ConfigError> {
        let r = &self.runtime;
        if !(1..=4096).contains(&r.max_body_mib) {
            return Err(invalid("runtime.max_body_mib", format!("is {}", r.max_body_mib), "use 1 to 4096 MiB"));
        }
        if !(1..=1_000_000).contains(&r.max_connections) {
            return Err(invalid("runtime.max_connections", format!("is {}", r.max_connections), "use 1 to 1000000"));
        }
        if !(1..=3600).contains(&r.header_read_timeout_secs) {
            return Err(invalid(
                "runtime.header_read_timeout_secs",
                format!("is {}", r.header_read_timeout_secs),
                "use 1 to 3600 seconds",
            ));
        }
        if r.api_keys_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid(
                "runtime.api_keys_file",
                "is empty",
                "give the path of the keys file or remove the field",
            ));
        }
        Ok(())
    }

    /// How llama-server runs and is swapped, and the agent's own addresses.
    fn validate_runtime(&self) -> Result<(), ConfigError> {
        if self.runtime.llama_server.as_os_str().is_empty() {
            return Err(invalid("runtime.llama_server", "is empty", "give the path of the llama-server binary"));
        }
        self.front_addr()?;
        if !(1..=3600).contains(&self.runtime.health_timeout_secs) {
            return Err(invalid(
                "runtime.health_timeout_secs",
                format!("is {}", self.runtime.health_timeout_secs),
                "use 1 to 3600 seconds (large models on slow disks need a few minutes)",
            ));
        }
        if !(1..=3600).contains(&self.runtime.drain_timeout_secs) {
            return Err(invalid(
                "runtime.drain_timeout_secs",
                format!("is {}", self.runtime.drain_timeout_secs),
                "use 1 to 3600 seconds",
            ));
        }
        if self.runtime.watch_window_secs > 3600 {
            return Err(invalid(
                "runtime.watch_window_secs",
                format!("is {}", self.runtime.watch_window_secs),
                "use 0 (no watch) to 3600 seconds",
            ));
        }
        if !(1..=600).contains(&self.runtime.gap_wait_secs) {
            return Err(invalid(
                "runtime.gap_wait_secs",
                format!("is {}", self.runtime.gap_wait_secs),
                "use 1 to 600 seconds (clients usually time out after a minute)",
            ));
        }
        if self.runtime.memory_reserve_mib > 1 << 20 {
            return Err(invalid(
                "runtime.memory_reserve_mib",
                format!("is {}", self.runtime.memory_reserve_mib),
                "use at most 1048576 MiB (1 TiB)",
            ));
        }
        self.validate_front()?;
        self.metrics_addr()?;
        const RESERVED: [&str; 6] = ["-m", "--model", "--host", "--port", "-np", "--parallel"];
        if let Some(arg) = self.runtime.extra_args.iter().find(|a| RESERVED.contains(&a.as_str())) {
            return Err(invalid(
                "runtime.extra_args",
                format!("contains {arg:?}, which the agent sets itself"),
                "remove it; the model, address and slots come from the bundle and the desired state",
            ));
        }
        if self.runtime.launcher.first().is_some_and(|program| program.trim().is_empty()) {
            return Err(invalid(
                "runtime.launcher",
                "starts with an empty program",
                "name the command first, e.g. [\"numactl\", \"--interleave=all\"], or leave it out",
            ));
        }
        Ok(())
    }

    /// The address of the agent's own `/metrics`, when configured.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(addr) = &self.metrics_addr else { return Ok(None) };
        addr.parse().map(Some).map_err(|_| {
            invalid(
                "metrics_addr",
                format!("is {addr:?}"),
                "write an IP address and port such as 127.0.0.1:9464, or remove it to serve no metrics",
            )
        })
    }

    /// The front proxy's listening address.
    pub fn front_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.runtime.front_addr.parse().map_err(|_| {
            invalid(
                "runtime.front_addr",
                format!("is {:?}", self.runtime.front_addr),
                "write an IP address and port such as 127.0.0.1:8080 or 0.0.0.0:8080",
            )
        })
    }

    /// `host:port` of the controller URL (the port defaulting to 443, or 80 for `http://`).
    pub fn controller_authority(&self) -> Result<String, ConfigError> {
        let url = &self.controller.url;
        let fix = "write it as https://host:port, e.g. https://ctl.example:7070";
        let (rest, default_port) = if let Some(rest) = url.strip_prefix("https://") {
            (rest, 443)
        } else if let Some(rest) = url.strip_prefix("http://") {
            if !self.controller.insecure_plaintext {
                let problem = format!("is {url:?}, plain HTTP");
                return Err(invalid(
                    "controller.url",
                    problem,
                    "use https:// (plain http:// needs insecure_plaintext = true)",
                ));
            }
            (rest, 80)
        } else {
            return Err(invalid("controller.url", format!("is {url:?}, not an https:// URL"), fix));
        };
        let authority = rest.trim_end_matches('/');
        if !valid_authority(authority) {
            return Err(invalid("controller.url", format!("is {url:?}, which has no valid host:port"), fix));
        }
        Ok(if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:{default_port}")
        })
    }

    /// Where the device key, certificate and enrolled CA live.
    pub fn identity_dir(&self) -> PathBuf {
        self.controller.identity_dir.clone().unwrap_or_else(|| self.data_dir.join("identity"))
    }

    /// `host:port` of the registry bundles without a registry name are pulled from.
    pub fn embedded_registry(&self) -> String {
        match &self.registry.embedded {
            Some(r) => r.clone(),
            None => self.controller_authority().unwrap_or_default(),
        }
    }

    /// Registries reached over plain HTTP: the configured ones, plus the embedded registry when the
    /// controller itself is reached over plain HTTP and no separate embedded registry is configured.
    pub fn plain_http_registries(&self) -> Vec<String> {
        let mut list = self.registry.insecure_plain_http.clone();
        if self.registry.embedded.is_none() && self.controller.insecure_plaintext {
            let embedded = self.embedded_registry();
            if !embedded.is_empty() && !list.contains(&embedded) {
                list.push(embedded);
            }
        }
        list
    }

    pub fn health_timeout(&self) -> Duration {
        Duration::from_secs(self.runtime.health_timeout_secs)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.runtime.drain_timeout_secs)
    }

    pub fn watch_window(&self) -> Duration {
        Duration::from_secs(self.runtime.watch_window_secs)
    }

    pub fn gap_wait(&self) -> Duration {
        Duration::from_secs(self.runtime.gap_wait_secs)
    }

    /// How much longer a stop-then-start gap may last to evaluate the candidate in it; zero: never.
    pub fn eval_gap_budget(&self) -> Duration {
        Duration::from_secs(u64::from(self.eval.gap_budget_seconds))
    }

    /// The pull rate limit in bytes per second, if any.
    pub fn bandwidth_limit(&self) -> Option<u64> {
        (self.registry.bandwidth_limit_kib > 0).then(|| self.registry.bandwidth_limit_kib.saturating_mul(1024))
    }

    pub fn disk_reserve_bytes(&self) -> u64 {
        self.store.disk_reserve_mib.saturating_mul(1 << 20)
    }

    /// The content store's budget in bytes; None when unlimited.
    pub fn store_budget_bytes(&self) -> Option<u64> {
        (self.store.budget_mib > 0).then(|| self.store.budget_mib.saturating_mul(1 << 20))
    }

    pub fn memory_reserve_bytes(&self) -> u64 {
        self.runtime.memory_reserve_mib.saturating_mul(1 << 20)
    }
}

/// `host` or `host:port`, with a conservative host alphabet (names, IPv4, bracketed IPv6).
fn valid_authority(s: &str) -> bool {
    if s.is_empty() || s.contains(['/', '@', ' ', '?', '#']) {
        return false;
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':')),
            None => return false,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let host_ok =
        !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
device_id = "pi-001"
data_dir = "/var/lib/alki-agent"
labels = { site = "lab", class = "x86-avx2" }
[controller]
url = "http://127.0.0.1:7070"
insecure_plaintext = true
token_file = "/etc/alki/agent.token"
[registry]
insecure_plain_http = ["127.0.0.1:5000"]
bandwidth_limit_kib = 2048
[runtime]
llama_server = "/usr/local/bin/llama-server"
front_addr = "127.0.0.1:8080"
health_timeout_secs = 120
drain_timeout_secs = 30
extra_args = []
watch_window_secs = 60
swap_strategy = "auto"
memory_reserve_mib = 256
gap_wait_secs = 30
[store]
budget_mib = 20480
disk_reserve_mib = 512
[eval]
gap_budget_seconds = 120
"#;

    fn field_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected a validation error, got {other}"),
        }
    }

    #[test]
    fn the_documented_example_parses() {
        let config = Config::from_toml(EXAMPLE).expect("example is valid");
        assert_eq!(config.device_id.as_deref(), Some("pi-001"));
        assert_eq!(config.labels.get("class").map(String::as_str), Some("x86-avx2"));
        assert_eq!(config.embedded_registry(), "127.0.0.1:7070");
        assert_eq!(config.plain_http_registries(), vec!["127.0.0.1:5000".to_owned(), "127.0.0.1:7070".to_owned()]);
        assert_eq!(config.front_addr().expect("addr").port(), 8080);
        assert_eq!(config.bandwidth_limit(), Some(2 << 20));
        assert_eq!(config.store_budget_bytes(), Some(20 << 30));
    }

    #[test]
    fn the_deployed_example_config_is_valid() {
        let text = include_str!("../../deploy/config/agent.toml");
        let config = Config::from_toml(text).expect("deploy/config/agent.toml is valid");
        assert_eq!(config.runtime.swap_strategy, SwapStrategyChoice::Auto);
    }

    #[test]
    fn the_example_config_and_the_socket_unit_bind_the_same_loopback_front_port() {
        let config = Config::from_toml(include_str!("../../deploy/config/agent.toml")).expect("valid");
        let socket = include_str!("../../deploy/systemd/alki-agent.socket");
        let listen = socket.lines().find_map(|l| l.strip_prefix("ListenStream=")).expect("ListenStream");
        assert_eq!(listen, config.runtime.front_addr);
        assert!(config.front_addr().expect("addr").ip().is_loopback(), "loopback unless an operator opens it");
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let minimal = r#"
data_dir = "/data"
[controller]
url = "https://ctl.example:7070/"
ca_file = "/etc/alki/ca.crt"
[runtime]
llama_server = "/bin/llama-server"
"#;
        let config = Config::from_toml(minimal).expect("minimal is valid");
        assert_eq!(config.device_id, None);
        assert_eq!(config.runtime.front_addr, "127.0.0.1:8080");
        assert_eq!(config.runtime.health_timeout_secs, 120);
        assert_eq!(config.runtime.watch_window_secs, 60);
        assert_eq!(config.runtime.swap_strategy, SwapStrategyChoice::Auto);
        assert_eq!(config.store_budget_bytes(), None);
        assert_eq!(config.disk_reserve_bytes(), 512 << 20);
        assert_eq!(config.embedded_registry(), "ctl.example:7070");
        assert!(config.plain_http_registries().is_empty(), "the embedded registry is reached over HTTPS");
        assert_eq!(config.identity_dir(), PathBuf::from("/data/identity"));
        assert_eq!((config.eval.priority, config.eval.threads), (crate::runtime::priority::Priority::Idle, 0));
        assert_eq!(config.eval_gap_budget(), Duration::from_secs(120));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let typo = EXAMPLE.replace("drain_timeout_secs", "drain_timeout");
        let err = Config::from_toml(&typo).expect_err("typo refused");
        assert!(err.to_string().contains("drain_timeout"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            ("device_id = \"pi-001\"", "device_id = \"../x\"", "device_id"),
            ("data_dir = \"/var/lib/alki-agent\"", "data_dir = \"rel/dir\"", "data_dir"),
            ("url = \"http://127.0.0.1:7070\"", "url = \"https://127.0.0.1:7070\"", "controller.insecure_plaintext"),
            ("insecure_plaintext = true", "insecure_plaintext = false\nca_file = \"rel/ca.crt\"", "controller.url"),
            (
                "url = \"http://127.0.0.1:7070\"\ninsecure_plaintext = true",
                "url = \"https://c:1\"",
                "controller.ca_file",
            ),
            ("insecure_plaintext = true", "insecure_plaintext = false", "controller.url"),
            ("url = \"http://127.0.0.1:7070\"", "url = \"127.0.0.1:7070\"", "controller.url"),
            ("[\"127.0.0.1:5000\"]", "[\"http://127.0.0.1:5000\"]", "registry.insecure_plain_http"),
            ("front_addr = \"127.0.0.1:8080\"", "front_addr = \"localhost\"", "runtime.front_addr"),
            ("health_timeout_secs = 120", "health_timeout_secs = 0", "runtime.health_timeout_secs"),
            ("drain_timeout_secs = 30", "drain_timeout_secs = 99999", "runtime.drain_timeout_secs"),
            ("extra_args = []", "extra_args = [\"--port\", \"1\"]", "runtime.extra_args"),
            ("extra_args = []", "extra_args = []\nlauncher = [\"\", \"-c\"]", "runtime.launcher"),
            ("watch_window_secs = 60", "watch_window_secs = 3601", "runtime.watch_window_secs"),
            ("gap_wait_secs = 30", "gap_wait_secs = 0", "runtime.gap_wait_secs"),
            ("memory_reserve_mib = 256", "memory_reserve_mib = 2000000", "runtime.memory_reserve_mib"),
            ("gap_budget_seconds = 120", "gap_budget_seconds = 3601", "eval.gap_budget_seconds"),
            ("site = \"lab\"", "\"bad key\" = \"lab\"", "labels"),
        ];
        for (from, to, field) in cases {
            let text = EXAMPLE.replace(from, to);
            assert_ne!(text, EXAMPLE, "replacement {from:?} must apply");
            let err = Config::from_toml(&text).expect_err(field);
            let message = err.to_string();
            assert!(message.contains(field), "{message}");
            assert_eq!(field_of(err), field);
        }
    }

    #[test]
    fn mirrors_and_credentials_are_validated() {
        let section = |extra: &str| {
            EXAMPLE.replace("bandwidth_limit_kib = 2048\n", &format!("bandwidth_limit_kib = 2048\n{extra}\n"))
        };
        let good = section(
            "mirrors = { \"reg.example:5000\" = [\"cache.site:5000\", \"127.0.0.1:5001\"] }\n\
             credentials = { \"reg.example:5000\" = { username = \"ci\", password_file = \"/etc/alki/reg.pass\" } }",
        );
        let config = Config::from_toml(&good).expect("mirrors and credentials are valid");
        assert_eq!(config.registry.mirrors["reg.example:5000"], ["cache.site:5000", "127.0.0.1:5001"]);
        assert_eq!(config.registry.credentials["reg.example:5000"].username, "ci");
        let cases = [
            ("mirrors = { \"http://reg:5000\" = [] }", "registry.mirrors"),
            ("mirrors = { \"reg:5000\" = [\"cache/x\"] }", "registry.mirrors"),
            (
                "mirrors = { \"reg:5000\" = [\"a:1\",\"a:2\",\"a:3\",\"a:4\",\"a:5\",\"a:6\",\"a:7\",\"a:8\",\"a:9\"] }",
                "registry.mirrors",
            ),
            ("credentials = { \"reg:5000\" = { username = \"\", password_file = \"/p\" } }", "registry.credentials"),
            ("credentials = { \"reg:5000\" = { username = \"u\", password_file = \"rel\" } }", "registry.credentials"),
            ("credentials = { \"a b\" = { username = \"u\", password_file = \"/p\" } }", "registry.credentials"),
        ];
        for (extra, field) in cases {
            let err = Config::from_toml(&section(extra)).expect_err(extra);
            assert_eq!(field_of(err), field, "{extra}");
        }
        let typo = section("credentials = { \"reg:5000\" = { user = \"u\", password_file = \"/p\" } }");
        assert!(Config::from_toml(&typo).is_err(), "unknown credential fields are refused");
    }

    #[test]
    fn authorities_are_checked() {
        for good in ["registry.local", "127.0.0.1:5000", "[::1]:5000", "a-b.example:443"] {
            assert!(valid_authority(good), "{good}");
        }
        for bad in ["", "http://x", "x:0", "x:99999", "x/y", "user@x", "[::1"] {
            assert!(!valid_authority(bad), "{bad}");
        }
    }

    #[test]
    fn the_metrics_address_is_optional_and_checked() {
        let config = Config::from_toml(EXAMPLE).expect("example");
        assert_eq!(config.metrics_addr().expect("valid"), None, "no metrics endpoint unless configured");
        assert!(config.benchmark_after_activation, "benchmarks after activations are on by default");
        let with = format!("metrics_addr = \"127.0.0.1:9464\"\nbenchmark_after_activation = false\n{EXAMPLE}");
        let config = Config::from_toml(&with).expect("metrics_addr");
        assert_eq!(config.metrics_addr().expect("valid"), Some("127.0.0.1:9464".parse().expect("addr")));
        assert!(!config.benchmark_after_activation);
        let bad = format!("metrics_addr = \"localhost\"\n{EXAMPLE}");
        assert_eq!(field_of(Config::from_toml(&bad).expect_err("bad address")), "metrics_addr");
    }
}
