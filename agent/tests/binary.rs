//! The `alki-agent` binary: `version`, a graceful stop on SIGTERM (llama-server gets the safe stop), and no
//! orphaned llama-server when the agent is killed outright.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{fake_llama_server, fake_model};

const AGENT: &str = env!("CARGO_BIN_EXE_alki-agent");

/// Kills the agent if a test fails half-way.
struct Guard(Child);

impl Drop for Guard {
    /// SIGTERM first (bounded), so the agent stops its llama-server: a killed agent leaves it running by design.
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes a config whose state has a fake model active; returns (config path, front port).
fn prepare(dir: &Path) -> (std::path::PathBuf, u16) {
    use alki_agent::reference::BundleLocation;
    use alki_agent::state::{AgentState, Deployment, StateFile};
    use alki_shared::digest::Digest;
    use alki_shared::ids::{DeviceId, Generation};

    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir).expect("mkdir");
    let model = fake_model(dir, "model-bin.gguf", &[]);
    let mut state = AgentState::new(DeviceId::new("pi-bin").expect("id"));
    state.active = Some(Deployment {
        bundle: BundleLocation {
            registry: String::new(),
            repository: "acme/tiny".into(),
            digest: Digest::of(b"b"),
            tag: String::new(),
        },
        variant_digest: Digest::of(b"v"),
        model_files: vec![model],
        overrides: Default::default(),
        launch: common::launch_settings(),
        generation: Generation(1),
    });
    StateFile::new(&data_dir).save(&state).expect("state");
    std::fs::write(dir.join("token"), "t").expect("token");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let front = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let trust = common::unsigned_trust_policy(dir);
    let config = format!(
        "data_dir = {data_dir:?}\ntrust_policy = {trust:?}\n[controller]\nurl = \"http://{closed}\"\ninsecure_plaintext = true\ntoken_file = {token:?}\n\
         [runtime]\nllama_server = {llama:?}\nfront_addr = \"127.0.0.1:{front}\"\ndrain_timeout_secs = 2\n",
        token = dir.join("token"),
        llama = fake_llama_server(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).expect("config");
    (path, front)
}

fn start(config: &Path) -> Guard {
    let child = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn alki-agent");
    Guard(child)
}

/// Children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // The fields after the command name (which is in parentheses): state, ppid, ...
            let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
            after.split_whitespace().nth(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// Waits (bounded) until `condition` holds.
fn wait(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn served(port: u16) -> bool {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    client
        .post(format!("http://127.0.0.1:{port}/completion"))
        .body(r#"{"prompt":"Hi","n_predict":2}"#)
        .send()
        .is_ok_and(|r| r.status() == 200)
}

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(AGENT).arg("version").output().expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("alki-agent {}", alki_shared::build::LONG_VERSION));
}

#[test]
fn sigterm_stops_the_agent_and_llama_server_gracefully() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = prepare(dir.path());
    let mut agent = start(&config);
    wait("the model to be served", || served(port));
    let llama = children(agent.0.id());
    assert_eq!(llama.len(), 1, "one llama-server child: {llama:?}");
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(agent.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agent.0.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the agent did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit: {status}");
    assert!(!common::process_exists(llama[0]), "llama-server stopped with the agent");
    let logs: String = std::fs::read_dir(dir.path().join("data/logs"))
        .expect("logs")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    assert!(logs.contains("SIGTERM, exiting"), "llama-server got SIGTERM: {logs}");
}

#[test]
fn a_killed_agent_leaves_llama_server_serving_and_the_next_agent_takes_it_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = prepare(dir.path());
    let mut agent = start(&config);
    wait("the model to be served", || served(port));
    let llama = children(agent.0.id());
    assert_eq!(llama.len(), 1, "one llama-server child: {llama:?}");
    agent.0.kill().expect("SIGKILL the agent");
    agent.0.wait().expect("reap the agent");
    // llama-server runs in its own session and outlives the agent (tests/agent_restart.rs covers adoption).
    let alive = alki_agent::runtime::record::process_identity(llama[0]).is_some();
    let mut next = start(&config);
    wait("the model to be served again", || served(port));
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(next.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let _ = next.0.wait();
    let gone = alki_agent::runtime::record::process_identity(llama[0]).is_none();
    if !gone {
        // SAFETY: kill(2) on the process this test made, so that a failure leaves nothing running.
        unsafe { libc::kill(llama[0] as libc::pid_t, libc::SIGKILL) };
    }
    assert!(alive, "llama-server survived the killed agent");
    assert!(gone, "the next agent adopted llama-server {} and stopped it on SIGTERM", llama[0]);
}

#[test]
fn under_systemd_the_agent_notifies_ready_pings_the_watchdog_and_says_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = prepare(dir.path());
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(30))).expect("bounded reads");
    let child = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn alki-agent");
    let agent = Guard(child);
    let mut next = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification within the bound");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().starts_with("READY=1"), "readiness first");
    assert_eq!(next(), "WATCHDOG=1");
    assert_eq!(next(), "WATCHDOG=1", "pings keep coming");
    wait("the model to be served", || served(port));
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(agent.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let stopping = std::iter::repeat_with(&mut next).find(|m| m != "WATCHDOG=1").expect("a message");
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
}
