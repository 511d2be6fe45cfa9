//! Offline operation with the real controller in-process: the agent keeps serving while the controller is
//! down, keeps the telemetry it builds meanwhile in its outbox, and replays it after the Hello when the
//! controller comes back on the same port, so the controller's store counts every interval the agent measured.

mod agent_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::{fake_llama_server, serving_data_dir};
use alki_agent::{Agent, Config};
use alki_controller::config::ControllerConfig;
use alki_shared::proto;
use alki_shared::proto::fleet_service_client::FleetServiceClient;

const DEVICE: &str = "pi-offline";
/// Covers one telemetry interval of the controller (10 s) during the outage, plus the reconnect backoff.
const TIMEOUT: Duration = Duration::from_secs(120);

fn agent_config(dir: &Path, data_dir: &Path, controller: SocketAddr, token: &str) -> Config {
    let token_file = dir.join("agent.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    let trust = agent_support::unsigned_trust_policy(dir);
    let text = format!(
        r#"
data_dir = {data_dir:?}
trust_policy = {trust:?}
metrics_addr = "127.0.0.1:0"
[controller]
url = "http://{controller}"
insecure_plaintext = true
token_file = {token_file:?}
[runtime]
llama_server = {llama:?}
front_addr = "127.0.0.1:0"
health_timeout_secs = 15
drain_timeout_secs = 2
"#,
        llama = fake_llama_server(),
    );
    Config::from_toml(&text).expect("valid config")
}

/// The real controller on fixed ports (so it can come back on the same ones) over a data dir it keeps.
struct Controller {
    data: PathBuf,
    grpc: SocketAddr,
    http: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl Controller {
    async fn start(data: &Path, grpc: SocketAddr, http: SocketAddr) -> Controller {
        let grpc_listener = tokio::net::TcpListener::bind(grpc).await.expect("bind gRPC");
        let http_listener = tokio::net::TcpListener::bind(http).await.expect("bind HTTP");
        let (grpc, http) = (grpc_listener.local_addr().expect("addr"), http_listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut config = ControllerConfig::new(data.to_owned());
        config.insecure_plaintext = true;
        // A bearer token of role agent instead of a device certificate: enrollment is covered elsewhere.
        config.insecure_agent_tokens = true;
        let served = tokio::spawn(async move {
            let listeners = alki_controller::Listeners { grpc: grpc_listener, http: http_listener };
            if let Err(e) = alki_controller::serve(listeners, config, async {
                let _ = stopped.await;
            })
            .await
            {
                panic!("controller: {e:#}");
            }
        });
        Controller { data: data.to_owned(), grpc, http, stop: Some(stop), served: Some(served) }
    }

    async fn admin(&self) -> String {
        let path = self.data.join("admin.token");
        loop {
            if let Ok(t) = tokio::fs::read_to_string(&path).await
                && !t.trim().is_empty()
            {
                return t.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn fleet(&self) -> FleetServiceClient<tonic::transport::Channel> {
        loop {
            if let Ok(client) = FleetServiceClient::connect(format!("http://{}", self.grpc)).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn device(&self, admin: &str) -> Option<proto::Device> {
        let request = with_token(admin, proto::GetDeviceRequest { id: DEVICE.into() });
        self.fleet().await.get_device(request).await.ok().map(|r| r.into_inner())
    }

    /// Stops the controller and waits until its store can be opened again (every session task let go).
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("controller task");
        }
        loop {
            if alki_controller::store::Store::open(&self.data).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    request
}

/// The value of one sample (`name{labels}` exactly as exposed) on the agent's `/metrics`.
async fn agent_metric(metrics: SocketAddr, sample: &str) -> f64 {
    let text = reqwest::get(format!("http://{metrics}/metrics")).await.expect("scrape").text().await.expect("body");
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{sample} is not on the agent's /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_built_while_the_controller_is_down_reaches_its_store_after_it_returns() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    tokio::time::timeout(TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let controller_data = dir.path().join("controller-data");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut controller = Controller::start(&controller_data, any, any).await;
        let (grpc, http) = (controller.grpc, controller.http);
        let admin = controller.admin().await;
        let request =
            proto::CreateTokenRequest { name: DEVICE.into(), role: proto::Role::Agent as i32, ..Default::default() };
        let token =
            controller.fleet().await.create_token(with_token(&admin, request)).await.expect("token").into_inner().token;

        let data_dir = serving_data_dir(dir.path(), DEVICE, &[]);
        let agent = Agent::start(agent_config(dir.path(), &data_dir, grpc, &token)).await.expect("agent starts");
        let (front, metrics) = (agent.front_addr(), agent.metrics_addr().expect("metrics listener"));
        let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(agent.run(async move {
            let _ = agent_stopped.await;
        }));

        // Connected, and the first interval's telemetry recorded.
        loop {
            if controller.device(&admin).await.is_some_and(|d| d.connected && d.latest_telemetry.is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        controller.stop().await;
        // The agent keeps serving, and keeps the next interval's telemetry instead of losing it.
        let health = reqwest::get(format!("http://{front}/health")).await.expect("front port answers");
        assert_eq!(health.status(), 200, "the agent serves with the controller down");
        let buffered = r#"alki_agent_reports_buffered{kind="telemetry"}"#;
        while agent_metric(metrics, buffered).await < 1.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let mut controller = Controller::start(&controller_data, grpc, http).await;
        assert_eq!((controller.grpc, controller.http), (grpc, http), "back on the same ports");
        // Replayed after the Hello: the outbox empties once the session is back.
        loop {
            let connected = controller.device(&admin).await.is_some_and(|d| d.connected);
            if connected && agent_metric(metrics, buffered).await == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let built = agent_metric(metrics, "alki_agent_telemetry_reports_total").await;
        let dropped = agent_metric(metrics, r#"alki_agent_reports_dropped_total{kind="telemetry"}"#).await;
        assert_eq!(dropped, 0.0, "one interval is far below the bound");

        stop_agent.send(()).expect("signal the agent");
        running.await.expect("agent task").expect("agent stops cleanly");
        controller.stop().await;

        // Every telemetry interval the agent built (the one from the outage too) is in the controller's
        // rollups (flushed at each stop), each counted once as a report.
        let store = alki_controller::store::Store::open(&controller_data).expect("open the controller store");
        let reports: u64 =
            store.rollups(alki_shared::clock::UnixMs::EPOCH).expect("rollups").iter().map(|r| r.reports).sum();
        assert!(
            reports as f64 >= built,
            "the controller recorded {reports} telemetry reports, the agent built {built}: the outage's were lost"
        );
    })
    .await
    .expect("test timed out");
}
