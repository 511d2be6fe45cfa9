//! Starting the real binaries for end-to-end tests: locating them, free ports, child processes with logs,
//! and waiting for conditions with a deadline (never sleeping and hoping).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The directory holding the workspace's binaries (`target/debug`), found from the running test
/// executable (`target/debug/deps/<test>`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test executable has no directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// A workspace binary; fails with the command that builds it when it is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!("{} is missing; run `cargo build --workspace --bins` first", path.display());
    }
    Ok(path)
}

/// The llama.cpp build `e2e/scripts/build-llama-server.sh` makes, or `ALKI_LLAMA_BIN_DIR`.
pub fn llama_bin_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("ALKI_LLAMA_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("ALKI_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/alki")))
                .context("neither ALKI_CACHE_DIR nor HOME is set")?;
            cache.join(format!("llama-cpp-{}", crate::tiny_model::LLAMA_CPP_VERSION)).join("build/bin")
        }
    };
    if !dir.join("llama-server").is_file() {
        bail!(
            "no llama-server in {}; run e2e/scripts/build-llama-server.sh (cached after the first build)",
            dir.display()
        );
    }
    Ok(dir)
}

/// A loopback port that was free a moment ago (the child binds it; a race is possible but rare).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed on drop, its output in a log file kept for post-mortems.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        cmd.stdout(out.try_clone()?).stderr(out).stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.to_owned(), child, log })
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Sends SIGTERM and waits (bounded) for a graceful exit; SIGKILL after the deadline.
    pub fn stop(&mut self, deadline: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        Ok(None)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 200 ms until it returns `Some`, failing with `what` and the processes' log tails
/// after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    procs: &[&Proc],
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut last_error = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            let logs: Vec<String> = procs.iter().map(|p| format!("--- {} ---\n{}", p.name, p.log_tail())).collect();
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_error})\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs a command to completion and returns its stdout, failing with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// What an end-to-end test's agent is configured with (see deploy/config/agent.toml for every field).
pub struct AgentSetup<'a> {
    pub device_id: &'a str,
    /// The value of the `site` label rollouts select on.
    pub site: &'a str,
    /// gRPC URL of the controller.
    pub controller: &'a str,
    /// A token of role agent.
    pub token: &'a str,
    /// The body of the `[registry]` section.
    pub registry: &'a str,
    pub llama_server: &'a Path,
    pub front_port: u16,
    pub health_timeout_secs: u32,
}

/// Writes `<root>/<device id>/{agent.token,agent.toml}` and starts the real `alki-agent` on it, with the
/// llama-server's directory on `LD_LIBRARY_PATH` (where a real build keeps its shared libraries).
pub fn start_agent(root: &Path, setup: &AgentSetup<'_>) -> anyhow::Result<Proc> {
    let dir = root.join(setup.device_id);
    std::fs::create_dir_all(&dir)?;
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, setup.token)?;
    let config = format!(
        r#"device_id = "{id}"
data_dir = "{data}"
labels = {{ site = "{site}" }}

[controller]
url = "{controller}"
token_file = "{token_file}"

[registry]
{registry}

[runtime]
llama_server = "{llama}"
front_addr = "127.0.0.1:{front}"
health_timeout_secs = {health}
"#,
        id = setup.device_id,
        data = dir.join("data").display(),
        site = setup.site,
        controller = setup.controller,
        token_file = token_file.display(),
        registry = setup.registry,
        llama = setup.llama_server.display(),
        front = setup.front_port,
        health = setup.health_timeout_secs,
    );
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config)?;
    let mut cmd = Command::new(binary("alki-agent")?);
    cmd.arg("run").arg("--config").arg(&config_path);
    if let Some(lib_dir) = setup.llama_server.parent() {
        cmd.env("LD_LIBRARY_PATH", lib_dir);
    }
    Proc::spawn(setup.device_id, cmd, root)
}
