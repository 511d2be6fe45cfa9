//! Restarting the agent binary does not restart a healthy llama-server: a hand-over (SIGUSR2) under constant
//! client load through a socket-activated front port fails no request and the same llama-server serves on;
//! after a SIGKILL the restarted agent adopts the same process; a recorded pid that now names another
//! process is left alone and the model started fresh; an unhealthy recorded llama-server is replaced.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use alki_agent::reference::BundleLocation;
use alki_agent::runtime::record::{ProcessRecord, Role, process_identity};
use alki_agent::settings::RuntimeOverrides;
use alki_agent::state::{AgentState, Deployment, StateFile};
use alki_shared::digest::Digest;
use alki_shared::ids::{DeviceId, Generation};
use common::{fake_llama_server, fake_model, launch_settings};

const AGENT: &str = env!("CARGO_BIN_EXE_alki-agent");
const TEST_BOUND: Duration = Duration::from_secs(90);

/// Kills the agent if a test fails half-way (llama-server, detached, is stopped by [`stop_strays`]).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A data dir with model A active (its fake model file under `bundles/`), a config, and the front port.
struct Setup {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    config: PathBuf,
    model: PathBuf,
    /// This test's own link to the fake llama-server, so a concurrent rebuild of the original (a new binary,
    /// which is rightly not adopted) cannot disturb the test.
    llama: PathBuf,
    /// The front socket, held by the test as systemd holds it; None once the agent binds the port itself.
    front: Option<std::net::TcpListener>,
    port: u16,
}

fn setup(knobs: &[&str]) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let variant = Digest::of(b"variant A");
    let model_dir = data_dir.join("bundles").join(variant.hex());
    std::fs::create_dir_all(&model_dir).expect("mkdir");
    let model = fake_model(&model_dir, "model-a.gguf", knobs);
    let mut state = AgentState::new(DeviceId::new("pi-restart").expect("id"));
    state.active = Some(Deployment {
        bundle: BundleLocation {
            registry: "127.0.0.1:1".to_owned(),
            repository: "acme/tiny".to_owned(),
            digest: Digest::of(b"bundle A"),
            tag: String::new(),
        },
        variant_digest: variant,
        model_files: vec![model.clone()],
        overrides: RuntimeOverrides::default(),
        launch: launch_settings(),
        generation: Generation(3),
    });
    state.last_applied_generation = Generation(3);
    StateFile::new(&data_dir).save(&state).expect("state");
    let front = std::net::TcpListener::bind("127.0.0.1:0").expect("bind front");
    let port = front.local_addr().expect("addr").port();
    let token = dir.path().join("agent.token");
    std::fs::write(&token, "agent-secret").expect("token");
    let trust = common::unsigned_trust_policy(dir.path());
    let llama = dir.path().join("fake-llama-server");
    if std::fs::hard_link(fake_llama_server(), &llama).is_err() {
        std::fs::copy(fake_llama_server(), &llama).expect("copy the fake llama-server");
    }
    // No controller answers: the agent serves what it served before on its own.
    let text = format!(
        "data_dir = {data_dir:?}\ntrust_policy = {trust:?}\n[controller]\nurl = \"http://127.0.0.1:1\"\n\
         insecure_plaintext = true\ntoken_file = {token:?}\n[runtime]\nllama_server = {llama:?}\n\
         front_addr = \"127.0.0.1:{port}\"\ndrain_timeout_secs = 2\nwatch_window_secs = 0\n",
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, text).expect("config");
    Setup { dir, data_dir, config, model, llama, front: Some(front), port }
}

impl Setup {
    /// Starts the agent binding the front port itself (the test's socket is closed for that).
    fn start_binding(&mut self) -> Agent {
        self.front = None;
        self.spawn(false)
    }

    /// Starts the agent the way systemd socket activation does: the front socket as fd 3, `LISTEN_FDS=1` and
    /// `LISTEN_PID` set to the agent's own pid (`sh` sets it to its pid, then execs the agent).
    fn start_activated(&self) -> Agent {
        self.spawn(true)
    }

    fn spawn(&self, activated: bool) -> Agent {
        let mut command = Command::new("sh");
        command
            .args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#, AGENT, "run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::fs::File::create(self.dir.path().join("agent.log")).map(Stdio::from).unwrap_or(Stdio::null()))
            .stderr(Stdio::null());
        if activated {
            let fd = self.front.as_ref().expect("the test holds the front socket").as_raw_fd();
            command.env("LISTEN_FDS", "1");
            // SAFETY: dup2 is async-signal-safe; the closure allocates nothing. dup2 clears FD_CLOEXEC on fd 3.
            unsafe {
                command.pre_exec(move || {
                    if libc::dup2(fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            command.env_remove("LISTEN_FDS");
        }
        Agent(command.spawn().expect("spawn alki-agent"))
    }

    /// The llama-server recorded as serving.
    fn serving_record(&self) -> Option<ProcessRecord> {
        let bytes = std::fs::read(self.data_dir.join("runtime.json")).ok()?;
        let file: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let processes: Vec<ProcessRecord> = serde_json::from_value(file["processes"].clone()).ok()?;
        processes.into_iter().find(|p| p.role == Role::Serving)
    }
}

/// Live llama-server processes whose command line names a file under `data_dir`.
fn llama_servers(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process_identity(*pid).is_some())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("fake-llama-server") && cmdline.contains(&needle)
        })
        .collect()
}

/// SIGKILLs llama-servers a failed test left behind (they outlive the agent by design).
struct Strays(PathBuf);

impl Drop for Strays {
    fn drop(&mut self) {
        for pid in llama_servers(&self.0) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

async fn served_by(front: u16) -> Option<String> {
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{front}/completion"))
        .json(&serde_json::json!({"prompt": "Hi", "n_predict": 2}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    body["content"].as_str().map(str::to_owned)
}

async fn until_served(front: u16, model: &str) {
    while !served_by(front).await.is_some_and(|c| c.contains(model)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_recorded(setup: &Setup) -> ProcessRecord {
    loop {
        if let Some(record) = setup.serving_record() {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(agent: &Agent, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the agent is our unreaped child.
    assert_eq!(unsafe { libc::kill(agent.0.id() as libc::pid_t, signal) }, 0);
}

async fn exit_code(agent: &mut Agent) -> Option<i32> {
    loop {
        if let Some(status) = agent.0.try_wait().expect("wait") {
            return status.code();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_over_restart_under_load_fails_no_request_and_the_same_llama_server_serves_on() {
    let setup = setup(&["FAKE_LLAMA_TOKEN_MS=5"]);
    let _strays = Strays(setup.data_dir.clone());
    tokio::time::timeout(TEST_BOUND, async {
        let mut first = setup.start_activated();
        let front = setup.port;
        until_served(front, "model-a.gguf").await;
        let record = until_recorded(&setup).await;

        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let client = reqwest::Client::new();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (stop, served, client) = (stop.clone(), served.clone(), client.clone());
            clients.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match common::complete(&client, ([127, 0, 0, 1], front).into(), 4).await {
                        Ok((200, content)) if content.contains("model-a.gguf") => {
                            _ = served.fetch_add(1, Ordering::SeqCst)
                        }
                        other => failures.push(format!("{other:?}")),
                    }
                }
                failures
            }));
        }
        let wait_for = |n: usize| {
            let served = served.clone();
            async move {
                while served.load(Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        wait_for(50).await;
        signal(&first, libc::SIGUSR2);
        assert_eq!(exit_code(&mut first).await, Some(75), "a hand-over exits with 75 for systemd to restart the agent");
        assert!(record.is_same_process(), "llama-server outlived the agent");
        let at_exit = served.load(Ordering::SeqCst);
        // Like systemd after the exit: the next agent gets the same socket; clients queued meanwhile.
        let mut second = setup.start_activated();
        wait_for(at_exit + 100).await;
        stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        for client in clients {
            failures.extend(client.await.expect("client task"));
        }
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        let now = setup.serving_record().expect("recorded");
        let log = std::fs::read_to_string(setup.dir.path().join("agent.log")).unwrap_or_default();
        assert_eq!((now.pid, now.start_time), (record.pid, record.start_time), "the same llama-server serves: {log}");
        assert_eq!(llama_servers(&setup.data_dir), vec![record.pid], "exactly one llama-server");

        // A stop (SIGTERM) of the agent stops llama-server too, adopted or not.
        signal(&second, libc::SIGTERM);
        assert_eq!(exit_code(&mut second).await, Some(0));
        assert!(!record.is_same_process(), "a stop stops llama-server");
        assert!(setup.serving_record().is_none(), "nothing recorded after a stop");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_restarted_agent_adopts_the_same_llama_server() {
    let mut setup = setup(&[]);
    let _strays = Strays(setup.data_dir.clone());
    tokio::time::timeout(TEST_BOUND, async {
        let mut first = setup.start_binding();
        let front = setup.port;
        until_served(front, "model-a.gguf").await;
        let record = until_recorded(&setup).await;
        first.0.kill().expect("SIGKILL");
        first.0.wait().expect("reap");
        assert!(record.is_same_process(), "llama-server survives a crash of the agent");

        let mut second = setup.start_binding();
        until_served(front, "model-a.gguf").await;
        let now = setup.serving_record().expect("recorded");
        assert_eq!((now.pid, now.start_time), (record.pid, record.start_time), "adopted, not restarted");
        assert_eq!(llama_servers(&setup.data_dir), vec![record.pid]);
        let log = std::fs::read_to_string(setup.dir.path().join("agent.log")).unwrap_or_default();
        assert!(log.contains("Adopted the llama-server"), "{log}");

        signal(&second, libc::SIGTERM);
        assert_eq!(exit_code(&mut second).await, Some(0));
        assert!(!record.is_same_process(), "a stop stops the adopted llama-server (not our child) too");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_pid_that_names_another_process_now_is_left_alone_and_the_model_started_fresh() {
    let mut setup = setup(&[]);
    let _strays = Strays(setup.data_dir.clone());
    tokio::time::timeout(TEST_BOUND, async {
        // Another program got the recorded pid: same pid, another start time.
        let mut stranger = Command::new("sleep").arg("120").spawn().expect("sleep");
        let identity = process_identity(stranger.id()).expect("sleep runs");
        let fake = std::fs::canonicalize(fake_llama_server()).expect("fake path");
        let record = ProcessRecord {
            pid: stranger.id(),
            start_time: identity.start_time.saturating_sub(100),
            exe: fake,
            port: 1,
            model_path: setup.model.clone(),
            settings: launch_settings(),
            bundle_digest: Digest::of(b"bundle A").to_string(),
            log: setup.data_dir.join("logs/llama-server-0.log"),
            role: Role::Serving,
        };
        let file = serde_json::json!({"version": 1, "processes": [record]});
        std::fs::write(setup.data_dir.join("runtime.json"), file.to_string()).expect("record");

        let mut agent = setup.start_binding();
        let front = setup.port;
        until_served(front, "model-a.gguf").await;
        let now = until_recorded(&setup).await;
        assert_ne!(now.pid, stranger.id(), "a fresh llama-server serves");
        assert!(stranger.try_wait().expect("wait").is_none(), "the stranger was not signalled");
        assert_eq!(llama_servers(&setup.data_dir), vec![now.pid]);
        signal(&agent, libc::SIGTERM);
        assert_eq!(exit_code(&mut agent).await, Some(0));
        let _ = stranger.kill();
        let _ = stranger.wait();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_recorded_llama_server_is_stopped_and_replaced() {
    let mut setup = setup(&[]);
    let _strays = Strays(setup.data_dir.clone());
    tokio::time::timeout(TEST_BOUND, async {
        // A llama-server of the right model that never finishes loading (/health answers 503).
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let mut stuck = Command::new(&setup.llama)
            .arg("-m")
            .arg(&setup.model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .env("FAKE_LLAMA_LOAD_MS", "600000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stuck llama-server");
        let identity = process_identity(stuck.id()).expect("runs");
        let record = ProcessRecord {
            pid: stuck.id(),
            start_time: identity.start_time,
            exe: identity.exe,
            port,
            model_path: setup.model.clone(),
            settings: launch_settings(),
            bundle_digest: Digest::of(b"bundle A").to_string(),
            log: setup.data_dir.join("logs/llama-server-0.log"),
            role: Role::Serving,
        };
        let file = serde_json::json!({"version": 1, "processes": [record]});
        std::fs::write(setup.data_dir.join("runtime.json"), file.to_string()).expect("record");

        let mut agent = setup.start_binding();
        let front = setup.port;
        until_served(front, "model-a.gguf").await;
        let status = tokio::task::spawn_blocking(move || stuck.wait()).await.expect("join").expect("wait");
        assert!(status.code() == Some(0) || status.signal().is_some(), "the unhealthy one was stopped: {status}");
        let now = until_recorded(&setup).await;
        assert_ne!(now.pid, record.pid, "replaced by a fresh llama-server");
        assert_eq!(llama_servers(&setup.data_dir), vec![now.pid]);
        signal(&agent, libc::SIGTERM);
        assert_eq!(exit_code(&mut agent).await, Some(0));
    })
    .await
    .expect("test timed out");
}
