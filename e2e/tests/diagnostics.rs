//! Remote diagnostics end to end with the real controller and agent in-process over real gRPC (the agent
//! runs the fake llama-server): a crash-looping device's llama-server log read with the alkictl binary,
//! a follow that stops on the device when its caller goes and ends when the device disconnects, the
//! device-side switch, viewers refused, support bundles without secrets, reverify, restart-runtime, and
//! commands queued for an offline device, delivered on its return or expired.

mod agent_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_support::{fake_llama_server, serving_data_dir};
use alki_agent::{Agent, Config};
use alki_controller::config::ControllerConfig;
use alki_shared::clock::{ManualClock, UnixMs};
use alki_shared::digest::Digest;
use alki_shared::proto;
use alki_shared::proto::diagnostics_service_client::DiagnosticsServiceClient;
use alki_shared::proto::fleet_service_client::FleetServiceClient;

const DEVICE: &str = "pi-diag";
const TIMEOUT: Duration = Duration::from_secs(120);

fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    request
}

/// Polls `check` until it holds (every 50 ms; the test's own timeout bounds it).
async fn until<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    while !check().await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real controller in-process over plaintext, with agent tokens instead of certificates.
struct Controller {
    grpc: SocketAddr,
    http: SocketAddr,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Controller {
    async fn start(data: &Path, clock: Option<Arc<ManualClock>>) -> Controller {
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (grpc, http) = (grpc_listener.local_addr().expect("addr"), http_listener.local_addr().expect("addr"));
        let mut config = ControllerConfig::new(data.to_owned());
        config.insecure_plaintext = true;
        config.insecure_agent_tokens = true;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listeners = alki_controller::Listeners { grpc: grpc_listener, http: http_listener };
        let shutdown = async {
            let _ = stopped.await;
        };
        tokio::spawn(async move {
            let served = match clock {
                Some(clock) => alki_controller::serve_with_clock(listeners, config, clock, shutdown).await,
                None => alki_controller::serve(listeners, config, shutdown).await,
            };
            if let Err(e) = served {
                panic!("controller: {e:#}");
            }
        });
        let path = data.join("admin.token");
        let admin = loop {
            if let Ok(t) = tokio::fs::read_to_string(&path).await
                && !t.trim().is_empty()
            {
                break t.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Controller { grpc, http, admin, stop: Some(stop) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    async fn fleet(&self) -> FleetServiceClient<tonic::transport::Channel> {
        FleetServiceClient::connect(self.url()).await.expect("connect")
    }

    async fn diagnostics(&self) -> DiagnosticsServiceClient<tonic::transport::Channel> {
        DiagnosticsServiceClient::connect(self.url()).await.expect("connect")
    }

    async fn token(&self, name: &str, role: proto::Role) -> String {
        let request = proto::CreateTokenRequest { name: name.into(), role: role as i32, ..Default::default() };
        self.fleet().await.create_token(with_token(&self.admin, request)).await.expect("token").into_inner().token
    }

    async fn device(&self) -> Option<proto::Device> {
        let request = with_token(&self.admin, proto::GetDeviceRequest { id: DEVICE.into() });
        self.fleet().await.get_device(request).await.ok().map(|r| r.into_inner())
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.http))
            .bearer_auth(&self.admin)
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The agent's config text: `extra` is appended (more tables).
fn agent_config_text(dir: &Path, data_dir: &Path, controller: &Controller, token: &str, extra: &str) -> String {
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    let trust = agent_support::unsigned_trust_policy(dir);
    format!(
        r#"
data_dir = {data_dir:?}
trust_policy = {trust:?}
metrics_addr = "127.0.0.1:0"
benchmark_after_activation = false
[controller]
url = "{url}"
insecure_plaintext = true
token_file = {token_file:?}
[runtime]
llama_server = {llama:?}
front_addr = "127.0.0.1:0"
health_timeout_secs = 15
drain_timeout_secs = 1
watch_window_secs = 0
{extra}
"#,
        url = controller.url(),
        llama = fake_llama_server(),
    )
}

/// A running in-process agent.
struct RunningAgent {
    front: SocketAddr,
    metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), alki_agent::AgentError>>>,
}

impl RunningAgent {
    async fn start(config_text: &str, config_file: Option<&Path>) -> RunningAgent {
        let config = Config::from_toml(config_text).expect("valid config");
        let mut agent = Agent::start(config).await.expect("agent starts");
        if let Some(path) = config_file {
            std::fs::write(path, config_text).expect("config file");
            agent = agent.with_config_file(path.to_owned());
        }
        let (front, metrics) = (agent.front_addr(), agent.metrics_addr().expect("metrics"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async move {
            let _ = stopped.await;
        }));
        RunningAgent { front, metrics, stop: Some(stop), task: Some(task) }
    }

    async fn metric(&self, sample: &str) -> f64 {
        let text =
            reqwest::get(format!("http://{}/metrics", self.metrics)).await.expect("scrape").text().await.expect("body");
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{sample} is not on the agent's /metrics"))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("agent task").expect("agent ran");
        }
    }
}

/// The controller, an agent token, and the agent connected.
async fn fleet_with_agent(dir: &Path, knobs: &[&str], extra: &str) -> (Controller, RunningAgent, PathBuf) {
    let controller = Controller::start(&dir.join("controller-data"), None).await;
    let token = controller.token(DEVICE, proto::Role::Agent).await;
    let data_dir = serving_data_dir(dir, DEVICE, knobs);
    let text = agent_config_text(dir, &data_dir, &controller, &token, extra);
    let agent = RunningAgent::start(&text, Some(&dir.join("agent.toml"))).await;
    until(|| async { controller.device().await.is_some_and(|d| d.connected) }).await;
    (controller, agent, data_dir)
}

/// Runs the alkictl binary against `controller` with `token`; (success, stdout, stderr).
async fn alkictl(controller: &Controller, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(alki_e2e::harness::binary("alkictl").expect("alkictl built"))
        .args(args)
        .env("ALKI_CONTROLLER", controller.url())
        .env("ALKI_TOKEN", token)
        .env_remove("ALKI_TOKEN_FILE")
        .output()
        .await
        .expect("run alkictl");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_devices_llama_server_log_is_read_with_alkictl_and_viewers_are_refused() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (controller, agent, _) = fleet_with_agent(dir.path(), &["FAKE_LLAMA_CRASH_AFTER=1"], "").await;
        // Every completion after the smoke test crashes llama-server; three crashes are a crash loop.
        let http = reqwest::Client::new();
        until(|| async {
            let body = r#"{"prompt":"hi","n_predict":2}"#;
            let _ = http.post(format!("http://{}/v1/completions", agent.front)).body(body).send().await;
            controller
                .device()
                .await
                .and_then(|d| d.error)
                .is_some_and(|e| e.code == proto::ErrorCode::CrashLoop as i32)
        })
        .await;

        let operator = controller.token("oncall", proto::Role::Operator).await;
        let (ok, stdout, stderr) =
            alkictl(&controller, &operator, &["devices", "logs", DEVICE, "--source", "runtime"]).await;
        assert!(ok, "alkictl devices logs failed: {stderr}");
        assert!(stdout.contains("==> llama-server-"), "each llama-server log is named:\n{stdout}");
        assert!(
            stdout.matches("crashing after 1 completions (FAKE_LLAMA_CRASH_AFTER)").count() >= 2,
            "the crashes of several instances are in the log:\n{stdout}"
        );

        let (ok, json, stderr) =
            alkictl(&controller, &operator, &["-o", "json", "devices", "logs", DEVICE, "--source", "runtime"]).await;
        assert!(ok, "{stderr}");
        let first: serde_json::Value = serde_json::from_str(json.lines().next().expect("a line")).expect("JSON lines");
        assert_eq!(first["source"], "runtime");

        let viewer = controller.token("dashboards", proto::Role::Viewer).await;
        let (ok, _, stderr) = alkictl(&controller, &viewer, &["devices", "logs", DEVICE]).await;
        assert!(!ok && stderr.contains("may not WriteFleet"), "a viewer is refused: {stderr}");

        // The read is audited with the device as its target, who read it, and the refused viewer too.
        let request = with_token(&controller.admin, proto::ListAuditRequest { limit: 100, ..Default::default() });
        let mut admin =
            proto::admin_service_client::AdminServiceClient::connect(controller.url()).await.expect("connect");
        let entries = admin.list_audit(request).await.expect("audit").into_inner().entries;
        assert!(
            entries.iter().any(|e| e.actor == "token:oncall"
                && e.target == format!("device {DEVICE} logs runtime")
                && e.result == "ok"),
            "{entries:?}"
        );
        assert!(
            entries.iter().any(|e| e.actor == "token:dashboards" && e.result == "PERMISSION_DENIED"),
            "{entries:?}"
        );
        assert!(controller.metric("alki_diagnostic_bytes_relayed_total").await > 0.0);
        agent.stop().await;
    })
    .await
    .expect("within the test's time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_stops_on_the_device_when_its_caller_goes_and_ends_when_the_device_disconnects() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (controller, agent, _) = fleet_with_agent(dir.path(), &[], "").await;
        let operator = controller.token("oncall", proto::Role::Operator).await;
        let follow = || {
            let request = proto::DeviceLogsRequest {
                device_id: DEVICE.into(),
                source: "runtime".into(),
                follow: true,
                ..Default::default()
            };
            with_token(&operator, request)
        };
        let mut stream = controller.diagnostics().await.device_logs(follow()).await.expect("follow").into_inner();
        let first = stream.message().await.expect("a chunk").expect("not ended");
        assert_eq!(first.source, "runtime");
        assert_eq!(agent.metric("alki_agent_diagnostics_active").await, 1.0, "the device is sending");
        // New lines reach the follower.
        let http = reqwest::Client::new();
        let _ = http
            .post(format!("http://{}/v1/completions", agent.front))
            .body(r#"{"prompt":"x","n_predict":1}"#)
            .send()
            .await;

        drop(stream);
        until(|| async { agent.metric("alki_agent_diagnostics_active").await == 0.0 }).await;
        assert!(agent.metric("alki_agent_diagnostic_bytes_total{source=\"runtime\"}").await > 0.0);
        until(|| async { controller.metric("alki_diagnostics_in_flight").await == 0.0 }).await;

        // A follow whose device goes away ends with the reason instead of hanging.
        let mut stream = controller.diagnostics().await.device_logs(follow()).await.expect("follow").into_inner();
        stream.message().await.expect("a chunk").expect("not ended");
        agent.stop().await;
        let ended = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        let status = ended.expect("an error saying why");
        assert!(
            matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Aborted),
            "the device's disconnection (or its last chunk, cancelled) ends the follow: {status:?}"
        );
    })
    .await
    .expect("within the test's time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_disables_remote_logs_refuses_them_and_the_operator_is_told_why() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (controller, agent, _) = fleet_with_agent(dir.path(), &[], "[diagnostics]\nremote_logs = false\n").await;
        let operator = controller.token("oncall", proto::Role::Operator).await;
        let (ok, _, stderr) = alkictl(&controller, &operator, &["devices", "logs", DEVICE]).await;
        assert!(!ok && stderr.contains("remote_logs = false"), "the refusal names the switch: {stderr}");
        let (ok, json, stderr) = alkictl(&controller, &operator, &["-o", "json", "devices", "get", DEVICE]).await;
        assert!(ok, "{stderr}");
        let device: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(device["remote_diagnostics"], false, "devices get shows the switch: {json}");
        let out = dir.path().join("bundle.tar.zst");
        let path = out.to_str().expect("utf-8");
        let (ok, _, stderr) = alkictl(&controller, &operator, &["devices", "support-bundle", DEVICE, "-f", path]).await;
        assert!(!ok && stderr.contains("refuses remote diagnostics"), "{stderr}");
        assert!(!out.exists(), "no file is left behind");
        let leftovers = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".support-bundle-"))
            .count();
        assert_eq!(leftovers, 0, "nor a temporary one");
        agent.stop().await;
    })
    .await
    .expect("within the test's time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_support_bundle_has_the_devices_records_and_no_secret() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets).expect("mkdir");
        let password = "reg-pass-0f9e8d7c6b";
        let api_key = "sk-front-1a2b3c4d5e";
        let inline_key = "sk-inline-9z8y7x";
        std::fs::write(secrets.join("registry.password"), password).expect("write");
        std::fs::write(secrets.join("api.keys"), format!("{api_key}\n")).expect("write");
        std::fs::write(secrets.join("bootstrap.token"), "alki_boot_5e5e5e").expect("write");
        let extra = format!(
            r#"
api_keys_file = {keys:?}
extra_args = ["--api-key", "{inline_key}"]
[registry.credentials."reg.example:5000"]
username = "robot-user-77"
password_file = {pass:?}
"#,
            keys = secrets.join("api.keys"),
            pass = secrets.join("registry.password"),
        );
        // `api_keys_file` and `extra_args` belong to [runtime], which the extra text continues.
        let (controller, agent, data_dir) = fleet_with_agent(dir.path(), &[], &extra).await;
        let agent_token = std::fs::read_to_string(dir.path().join("agent.token")).expect("token").trim().to_owned();
        let operator = controller.token("oncall", proto::Role::Operator).await;
        let out = dir.path().join("out").join("pi.tar.zst");
        std::fs::create_dir_all(out.parent().expect("parent")).expect("mkdir");
        let (ok, stdout, stderr) =
            alkictl(&controller, &operator, &["devices", "support-bundle", DEVICE, "-f", out.to_str().expect("utf-8")])
                .await;
        assert!(ok, "{stderr}");
        assert!(stdout.contains("wrote"), "{stdout}");

        let unpacked = dir.path().join("unpacked");
        let file = std::fs::File::open(&out).expect("bundle");
        tar::Archive::new(zstd::stream::read::Decoder::new(file).expect("zstd")).unpack(&unpacked).expect("tar");
        let mut names = Vec::new();
        let mut all = Vec::new();
        collect(&unpacked, &unpacked, &mut names, &mut all);
        for expected in [
            "README.txt",
            "inventory.json",
            "config.toml",
            "records/state.json",
            "content-store.txt",
            "agent-metrics.prom",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} is in the bundle: {names:?}");
        }
        assert!(names.iter().any(|n| n.starts_with("logs/llama-server-")), "{names:?}");
        let config = std::fs::read_to_string(unpacked.join("config.toml")).expect("config");
        assert!(config.contains("<redacted>") && config.contains(&data_dir.display().to_string()), "{config}");
        let text = String::from_utf8_lossy(&all);
        for secret in [
            password,
            api_key,
            inline_key,
            "robot-user-77",
            "alki_boot_5e5e5e",
            agent_token.as_str(),
            &operator,
            &controller.admin,
        ] {
            assert!(!text.contains(secret), "secret {secret:?} leaked into the support bundle");
        }
        agent.stop().await;
    })
    .await
    .expect("within the test's time");
}

/// Every file under `dir` (relative names) and all their bytes together.
fn collect(root: &Path, dir: &Path, names: &mut Vec<String>, all: &mut Vec<u8>) {
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, names, all);
        } else {
            names.push(path.strip_prefix(root).expect("under root").to_string_lossy().into_owned());
            all.extend(std::fs::read(&path).expect("read"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverify_removes_a_blob_corrupted_in_place_and_restart_runtime_swaps_blue_green() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        // Two blobs in the agent's content store before it starts; one rots in place, mtime restored.
        let data_dir = dir.path().join("agent-data");
        let store = alki_agent::store::ContentStore::open(&data_dir.join("content")).expect("store");
        let (good, bad) = (Digest::of(b"good blob"), Digest::of(b"rotting blob"));
        store.write_bytes(&good, b"good blob").await.expect("write");
        store.write_bytes(&bad, b"rotting blob").await.expect("write");
        let path = store.path(&bad);
        let mtime = std::fs::metadata(&path).expect("meta").modified().expect("mtime");
        std::fs::write(&path, b"rotting blub").expect("same size, other bytes");
        std::fs::File::options().write(true).open(&path).expect("open").set_modified(mtime).expect("mtime back");
        assert!(store.verified(&bad, 12).await.expect("check"), "the seal alone does not see it");

        let (controller, agent, _) = fleet_with_agent(dir.path(), &[], "").await;
        let operator = controller.token("oncall", proto::Role::Operator).await;
        let (ok, json, stderr) = alkictl(&controller, &operator, &["-o", "json", "devices", "reverify", DEVICE]).await;
        assert!(ok, "{stderr}");
        let result: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(
            (result["checked"].as_u64(), result["corrupt"].as_u64(), result["removed"].as_u64()),
            (Some(2), Some(1), Some(1)),
            "{json}"
        );
        assert_eq!(result["corrupt_digests"][0], bad.to_string());
        assert!(!store.contains(&bad).await && store.contains(&good).await);

        let (ok, stdout, stderr) = alkictl(&controller, &operator, &["devices", "restart-runtime", DEVICE]).await;
        assert!(ok, "{stderr}");
        assert!(stdout.contains("blue/green"), "{stdout}");
        let health = reqwest::get(format!("http://{}/health", agent.front)).await.expect("front");
        assert_eq!(health.status(), 200, "the restarted model serves");
        agent.stop().await;
    })
    .await
    .expect("within the test's time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_to_an_offline_device_are_queued_delivered_on_its_return_and_dropped_when_expired() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::starting_at(UnixMs::now());
        let controller = Controller::start(&dir.path().join("controller-data"), Some(clock.clone())).await;
        let token = controller.token(DEVICE, proto::Role::Agent).await;
        let data_dir = serving_data_dir(dir.path(), DEVICE, &[]);
        let store = alki_agent::store::ContentStore::open(&data_dir.join("content")).expect("store");
        store.write_bytes(&Digest::of(b"a blob"), b"a blob").await.expect("write");
        let text = agent_config_text(dir.path(), &data_dir, &controller, &token, "");
        let agent = RunningAgent::start(&text, None).await;
        until(|| async { controller.device().await.is_some_and(|d| d.connected) }).await;
        agent.stop().await;
        until(|| async { controller.device().await.is_some_and(|d| !d.connected) }).await;

        let operator = controller.token("oncall", proto::Role::Operator).await;
        let reverify =
            || with_token(&operator, proto::DeviceCommandRequest { device_id: DEVICE.into(), wait_seconds: 0 });
        let first = controller.diagnostics().await.reverify(reverify()).await.expect("queued").into_inner();
        let sent = first.sent.expect("sent");
        assert!(sent.queued && !sent.delivered && first.result.is_none(), "{sent:?}");
        clock.advance(Duration::from_secs(23 * 3600));
        let second = controller.diagnostics().await.reverify(reverify()).await.expect("queued").into_inner();
        assert!(second.sent.expect("sent").queued);
        // A benchmark through InsightService is queued the same way, and says so.
        let bench = proto::RunBenchmarkRequest { device_ids: vec![DEVICE.into()], ..Default::default() };
        let mut insight =
            proto::insight_service_client::InsightServiceClient::connect(controller.url()).await.expect("connect");
        let commands = insight.run_benchmark(with_token(&operator, bench)).await.expect("bench").into_inner().commands;
        assert!(commands[0].queued && commands[0].expires_unix_ms > 0, "{commands:?}");
        assert_eq!(controller.metric("alki_commands_queued_total").await, 3.0);

        // 25 h after the first: it expired; the others are delivered when the device says Hello.
        clock.advance(Duration::from_secs(2 * 3600));
        let agent = RunningAgent::start(&text, None).await;
        until(|| async { controller.metric("alki_commands_delivered_from_queue_total").await == 2.0 }).await;
        assert_eq!(controller.metric("alki_commands_expired_total").await, 1.0);
        until(|| async { agent.metric("alki_agent_store_scrub_blobs_total{result=\"checked\"}").await >= 1.0 }).await;
        // Nobody waited for the queued reverify: its result is in the event log.
        let events = proto::event_service_client::EventServiceClient::connect(controller.url()).await.expect("connect");
        let results = || proto::ListEventsRequest {
            device_id: DEVICE.into(),
            types: vec!["device.command_result".into()],
            ..Default::default()
        };
        until(|| {
            let (request, mut events) = (with_token(&operator, results()), events.clone());
            async move {
                let listed = events.list_events(request).await.expect("events").into_inner().events;
                listed.iter().any(|e| e.message.contains("ok") && e.message.contains("blobs checked, 0 corrupt"))
            }
        })
        .await;
        agent.stop().await;
    })
    .await
    .expect("within the test's time");
}
