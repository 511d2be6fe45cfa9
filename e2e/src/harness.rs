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
    /// The last 40 lines of the process's log, without backtrace frames (they would push the error itself out).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let is_frame = |line: &&str| {
            let line = line.trim_start();
            line.starts_with("at ") || line.split_once(": ").is_some_and(|(n, _)| n.parse::<u32>().is_ok())
        };
        let lines: Vec<&str> = text.lines().filter(|l| !is_frame(l)).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// True once the process has exited (a zombie not reaped yet counts): waits on it stop at once.
    pub fn has_exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            // The state follows the command name, which is in parentheses and may hold spaces.
            Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => true,
        }
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
    /// A graceful stop first (bounded): an agent stops its llama-server only then; a killed agent leaves it
    /// running for the next agent to adopt, which a test that ends here would leak.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop(Duration::from_secs(10));
        }
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
        let logs = || procs.iter().map(|p| format!("--- {} ---\n{}", p.name, p.log_tail())).collect::<Vec<_>>();
        if let Some(gone) = procs.iter().find(|p| p.has_exited()) {
            bail!("{} exited while waiting for {what} (last error: {last_error})\n{}", gone.name, logs().join("\n"));
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_error})\n{}", logs().join("\n"));
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

/// A real `alki-controller` with TLS on (the default), its data directory, and how to reach it.
pub struct Controller {
    pub proc: Proc,
    pub data_dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub grpc: String,
    /// `127.0.0.1:<port>` of the embedded registry (HTTPS).
    pub registry: String,
    /// The bootstrap admin token.
    pub token_file: PathBuf,
    /// The controller CA (`<data-dir>/pki/ca.crt`) agents and alkictl trust.
    pub ca_file: PathBuf,
}

/// Starts `alki-controller` with its data in `<root>/controller`, heartbeats every 2 s, and `extra` flags;
/// waits until its CA and admin token are written and both ports accept connections.
pub fn start_controller(root: &Path, extra: &[&str]) -> anyhow::Result<Controller> {
    // A port found free can be taken by a parallel test before the controller binds it: try fresh ports then.
    let mut attempts = 0;
    let controller = loop {
        attempts += 1;
        let (grpc_port, http_port) = (free_port()?, free_port()?);
        let data_dir = root.join("controller");
        let mut cmd = Command::new(binary("alki-controller")?);
        cmd.arg("--data-dir")
            .arg(&data_dir)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(["--heartbeat-seconds", "2"])
            .args(extra);
        let proc = Proc::spawn("controller", cmd, root)?;
        let controller = Controller {
            proc,
            grpc: format!("https://127.0.0.1:{grpc_port}"),
            registry: format!("127.0.0.1:{http_port}"),
            token_file: data_dir.join("admin.token"),
            ca_file: data_dir.join("pki/ca.crt"),
            data_dir,
        };
        let ready = wait_for("the controller to be ready", Duration::from_secs(30), &[&controller.proc], || {
            // The admin token is written after the CA, and both before the listeners serve.
            let files = controller.token_file.is_file() && controller.ca_file.is_file();
            let ports = [grpc_port, http_port].iter().all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok());
            Ok((files && ports).then_some(()))
        });
        match ready {
            Ok(()) => break controller,
            Err(error) if attempts < 3 && controller.proc.log_tail().contains("Address already in use") => {
                eprintln!("controller could not bind its ports; trying others: {error:#}");
            }
            Err(error) => return Err(error),
        }
    };
    // A real request over TLS proves the listeners serve with the CA's certificate.
    wait_for("the controller to answer over TLS", Duration::from_secs(30), &[&controller.proc], || {
        Ok(controller.alkictl_json(&["devices", "list"]).ok())
    })?;
    Ok(controller)
}

impl Controller {
    /// alkictl pointed at this controller over TLS, with the admin token.
    pub fn alkictl(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(binary("alkictl")?);
        cmd.args(["--controller", &self.grpc, "--registry", &self.registry])
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--ca-file")
            .arg(&self.ca_file);
        Ok(cmd)
    }

    /// Runs alkictl with `-o json` and parses its output.
    pub fn alkictl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = run(self.alkictl()?.args(args).args(["-o", "json"]))?;
        serde_json::from_str(&out).with_context(|| format!("alkictl {args:?} printed non-JSON: {out}"))
    }

    /// Signs a pushed bundle (`REPOSITORY:TAG`) with `key`, as CI would: the password from the environment.
    pub fn sign(&self, reference: &str, key: &SigningKey) -> anyhow::Result<serde_json::Value> {
        let out = run(self
            .alkictl()?
            .args(["bundle", "sign", reference, "--key"])
            .arg(&key.private_key)
            .args(["-o", "json"])
            .env("ALKI_KEY_PASSWORD", &key.password))?;
        serde_json::from_str(&out).with_context(|| format!("alkictl bundle sign printed non-JSON: {out}"))
    }

    /// Packs `model` into `layout` naming the pinned `runtime_build`, pushes it as `REPOSITORY:TAG` and signs
    /// it with `key`, as a release would; returns the bundle's digest.
    pub fn release_on_build(
        &self,
        model: &Path,
        layout: &Path,
        reference: &str,
        runtime_build: &str,
        key: &SigningKey,
    ) -> anyhow::Result<String> {
        let tag = reference.rsplit_once(':').map(|(_, t)| t).context("REPOSITORY:TAG")?;
        let (model, layout_str) = (model.to_str().context("UTF-8 path")?, layout.to_str().context("UTF-8 path")?);
        let packed = self.alkictl_json(&[
            "bundle",
            "pack",
            model,
            "--out",
            layout_str,
            "--tag",
            tag,
            "--runtime-build",
            runtime_build,
        ])?;
        let digest = packed["digest"].as_str().context("bundle pack prints the digest")?.to_owned();
        self.alkictl_json(&["bundle", "push", layout_str, reference])?;
        self.sign(reference, key)?;
        Ok(digest)
    }

    /// Starts a real `alki-agent` under `root`, labelled `site=<site>`, that enrolls with a fresh bootstrap
    /// token of this controller, runs `llama_server` (a real build: two minutes to get healthy), trusts
    /// `trust_policy` and has `runtime_extra` in its `[runtime]` section; returns it and its front port.
    pub fn start_agent(
        &self,
        root: &Path,
        device_id: &str,
        site: &str,
        llama_server: &Path,
        trust_policy: &Path,
        runtime_extra: &str,
    ) -> anyhow::Result<(Proc, u16)> {
        let bootstrap = self.bootstrap_token(1, site)?;
        let front_port = free_port()?;
        let setup = AgentSetup {
            device_id,
            site,
            controller: &self.grpc,
            ca_file: &self.ca_file,
            bootstrap_token: &bootstrap,
            registry: "",
            llama_server,
            front_port,
            health_timeout_secs: 120,
            trust_policy,
            runtime_extra,
        };
        Ok((start_agent(root, &setup)?, front_port))
    }

    /// A bootstrap token for `uses` enrollments, valid for an hour, giving its devices the label
    /// `site=<site>` (rollouts select by the token's labels, not by what a device says of itself).
    pub fn bootstrap_token(&self, uses: u32, site: &str) -> anyhow::Result<String> {
        let (uses, site) = (uses.to_string(), format!("site={site}"));
        let created =
            self.alkictl_json(&["enroll", "token", "create", "--uses", &uses, "--expires", "1h", "--labels", &site])?;
        Ok(created["secret"].as_str().context("no secret in alkictl enroll token create")?.to_owned())
    }
}

/// What an end-to-end test's agent is configured with (see deploy/config/agent.toml for every field).
pub struct AgentSetup<'a> {
    pub device_id: &'a str,
    /// The value of the `site` label the agent reports (rollouts select on its token's).
    pub site: &'a str,
    /// gRPC URL of the controller (`https://`).
    pub controller: &'a str,
    /// The controller CA.
    pub ca_file: &'a Path,
    /// A bootstrap token: the agent enrolls with it on its first start, then every session is mTLS.
    pub bootstrap_token: &'a str,
    /// The body of the `[registry]` section.
    pub registry: &'a str,
    pub llama_server: &'a Path,
    pub front_port: u16,
    pub health_timeout_secs: u32,
    /// The agent's trust policy file (see [`write_trust_policy`]).
    pub trust_policy: &'a Path,
    /// More lines for the `[runtime]` section (e.g. `watch_window_secs = 1`); empty for the defaults.
    pub runtime_extra: &'a str,
}

/// The agent's directory for `device_id` under `root` (config, bootstrap token, data).
pub fn agent_dir(root: &Path, device_id: &str) -> PathBuf {
    root.join(device_id)
}

/// Writes `<root>/<device id>/{bootstrap.token,agent.toml}` and starts the real `alki-agent` on it, with the
/// llama-server's directory on `LD_LIBRARY_PATH` (where a real build keeps its shared libraries).
pub fn start_agent(root: &Path, setup: &AgentSetup<'_>) -> anyhow::Result<Proc> {
    let config_path = write_agent_config(root, setup)?;
    let mut cmd = Command::new(binary("alki-agent")?);
    cmd.arg("run").arg("--config").arg(&config_path);
    if let Some(lib_dir) = setup.llama_server.parent() {
        cmd.env("LD_LIBRARY_PATH", lib_dir);
    }
    Proc::spawn(setup.device_id, cmd, root)
}

/// Writes the agent's config (and bootstrap token) and returns the config's path.
pub fn write_agent_config(root: &Path, setup: &AgentSetup<'_>) -> anyhow::Result<PathBuf> {
    let dir = agent_dir(root, setup.device_id);
    std::fs::create_dir_all(&dir)?;
    let token_file = dir.join("bootstrap.token");
    std::fs::write(&token_file, setup.bootstrap_token)?;
    let config = format!(
        r#"device_id = "{id}"
data_dir = "{data}"
trust_policy = "{trust}"
labels = {{ site = "{site}" }}

[controller]
url = "{controller}"
ca_file = "{ca}"
bootstrap_token_file = "{token_file}"

[registry]
{registry}

[runtime]
llama_server = "{llama}"
front_addr = "127.0.0.1:{front}"
health_timeout_secs = {health}
{runtime_extra}
"#,
        id = setup.device_id,
        data = dir.join("data").display(),
        site = setup.site,
        controller = setup.controller,
        ca = setup.ca_file.display(),
        token_file = token_file.display(),
        registry = setup.registry,
        llama = setup.llama_server.display(),
        front = setup.front_port,
        health = setup.health_timeout_secs,
        trust = setup.trust_policy.display(),
        runtime_extra = setup.runtime_extra,
    );
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config)?;
    Ok(config_path)
}

/// A key pair made by `alkictl key generate`, and the password its private key is encrypted with.
pub struct SigningKey {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub password: String,
}

/// Runs `alkictl key generate` into `<root>/<name>.{key,pub}` with the password in ALKI_KEY_PASSWORD.
pub fn generate_key(root: &Path, name: &str) -> anyhow::Result<SigningKey> {
    let password = format!("e2e-{name}-password");
    let prefix = root.join(name);
    run(Command::new(binary("alkictl")?)
        .args(["key", "generate", "--output-prefix"])
        .arg(&prefix)
        .env("ALKI_KEY_PASSWORD", &password))?;
    let key =
        SigningKey { private_key: prefix.with_extension("key"), public_key: prefix.with_extension("pub"), password };
    if !key.private_key.is_file() || !key.public_key.is_file() {
        bail!("alkictl key generate wrote no {} / {}", key.private_key.display(), key.public_key.display());
    }
    Ok(key)
}

/// Writes `<root>/trust.toml`: every repository must be signed by `public_key`. Returns its path.
pub fn write_trust_policy(root: &Path, public_key: &Path) -> anyhow::Result<PathBuf> {
    let path = root.join("trust.toml");
    let text = format!("[[repository]]\npattern = \"*\"\nkeys = [\"{}\"]\nrequired = true\n", public_key.display());
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Waits (up to a minute) for a starting controller to write `<data-dir>/admin.token`, and returns it.
pub async fn admin_token(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("admin.token");
    let wait = async {
        loop {
            if let Ok(t) = tokio::fs::read_to_string(&path).await
                && !t.trim().is_empty()
            {
                return t.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .with_context(|| format!("{} never written", path.display()))
}
