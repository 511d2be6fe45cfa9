//! Third-party OCI registries on loopback for interop tests and benchmarks: CNCF distribution 2.8
//! (Debian's `docker-registry`) with filesystem storage in a temporary directory, open or behind an
//! htpasswd login (Basic auth, as a site registry with its own accounts has).
//!
//! Self-contained (std, anyhow and bcrypt only) so tests and the benchmark can include it before
//! `alki_e2e` exports it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long a registry may take to answer `GET /v2/` after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds `tool` on PATH, or fails saying how to install it (CI installs it; a missing tool is an error,
/// never a skipped test).
pub fn require_tool(tool: &str, install: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{tool} is not installed (not on PATH); install it with `{install}` (.ci/run installs it for CI)")
}

/// A CNCF distribution registry (`docker-registry serve`) on 127.0.0.1, killed when dropped.
pub struct Distribution {
    addr: SocketAddr,
    root: PathBuf,
    log: PathBuf,
    child: Child,
    /// Whether it asks for a login (then `GET /v2/` answers 401 when ready).
    login: bool,
}

impl Distribution {
    /// Starts `docker-registry` with its config, storage and log under `work_dir`, on a free loopback
    /// port, and waits until it answers `GET /v2/`.
    pub fn start(work_dir: &Path) -> anyhow::Result<Distribution> {
        Distribution::start_with(work_dir, None)
    }

    /// Like [`Distribution::start`], but every request needs Basic auth as `username`/`password`
    /// (distribution's htpasswd backend, bcrypt hashes).
    pub fn start_with_login(work_dir: &Path, username: &str, password: &str) -> anyhow::Result<Distribution> {
        std::fs::create_dir_all(work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
        let hash = bcrypt::hash_with_result(password, 4)?.format_for_version(bcrypt::Version::TwoY);
        let htpasswd = work_dir.join("htpasswd");
        std::fs::write(&htpasswd, format!("{username}:{hash}\n"))
            .with_context(|| format!("writing {}", htpasswd.display()))?;
        Distribution::start_with(work_dir, Some(htpasswd))
    }

    fn start_with(work_dir: &Path, htpasswd: Option<PathBuf>) -> anyhow::Result<Distribution> {
        let binary = require_tool("docker-registry", "apt-get install -y docker-registry")?;
        let root = work_dir.join("storage");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let mut last_error = None;
        // The port is free when picked; another process may take it before the registry binds it.
        for attempt in 0..3 {
            let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            let config = work_dir.join("config.yml");
            std::fs::write(&config, config_yaml(&root, addr, htpasswd.as_deref()))
                .with_context(|| format!("writing {}", config.display()))?;
            let log = work_dir.join(format!("docker-registry-{attempt}.log"));
            let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let child = Command::new(&binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            let mut registry = Distribution { addr, root: root.clone(), log, child, login: htpasswd.is_some() };
            match registry.wait_ready() {
                Ok(()) => return Ok(registry),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("docker-registry did not start")))
    }

    /// `127.0.0.1:<port>`, as registry clients take it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it stores blobs and manifests.
    pub fn storage(&self) -> &Path {
        &self.root
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("docker-registry exited ({status}) before serving:\n{}", self.log_tail());
            }
            if let Ok(status) = http_status(self.addr, "/v2/") {
                if status == 200 || (self.login && status == 401) {
                    return Ok(());
                }
                bail!("docker-registry answered GET /v2/ with {status}:\n{}", self.log_tail());
            }
            if start.elapsed() > START_TIMEOUT {
                bail!("docker-registry did not answer on {} within {START_TIMEOUT:?}:\n{}", self.addr, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_yaml(root: &Path, addr: SocketAddr, htpasswd: Option<&Path>) -> String {
    let auth = match htpasswd {
        Some(path) => format!("auth:\n  htpasswd:\n    realm: alki-e2e\n    path: {}\n", path.display()),
        None => String::new(),
    };
    auth + &format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: alki-e2e-loopback-only\n",
        root = root.display()
    )
}

/// The status code of a plain `GET` (HTTP/1.0, no body read beyond the status line).
fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let line = std::str::from_utf8(&head[..n]).unwrap_or_default();
    line.split_whitespace().nth(1).and_then(|code| code.parse().ok()).context("no HTTP status line")
}
