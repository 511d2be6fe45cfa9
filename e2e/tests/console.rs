//! The web console in a real headless Chromium (WebDriver) against an in-process controller and the fleet
//! simulator's agents over real gRPC: log in, see devices appear as agents connect, watch a rollout advance
//! without reloading, pause, resume and promote it through the confirmation dialog, see the A/B chart; a
//! viewer sees no actions; an expired session is sent to the login page. Screenshots of the main pages are
//! written to `target/tmp/console-screenshots/` for review.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use alki_controller::config::ControllerConfig;
use alki_e2e::browser::Browser;
use alki_e2e::sim::{self, Behaviour, SimConfig, SimFleet};
use alki_shared::proto::{self, fleet_service_client::FleetServiceClient};
use fantoccini::Locator;

const TIMEOUT: Duration = Duration::from_secs(60);
const INJECTION: &str = "<img src=x id=injected onerror=\"window.alkiInjected=1\">";

struct Controller {
    grpc: String,
    http: String,
    http_addr: std::net::SocketAddr,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(session_ttl: Duration) -> Controller {
    let dir = tempfile::tempdir().expect("tempdir");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(dir.path().to_owned());
    config.heartbeat_interval = Duration::from_secs(1);
    config.console_session_ttl = session_ttl;
    // A loopback bench: plaintext, and the simulator's agents use bearer tokens (see ControllerConfig).
    config.insecure_plaintext = true;
    config.insecure_agent_tokens = true;
    let task = tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        let _ = stopped.await;
    }));
    let admin = alki_e2e::harness::admin_token(dir.path()).await.expect("admin token written");
    Controller {
        grpc: format!("http://{grpc_addr}"),
        http: format!("http://{http_addr}"),
        http_addr,
        admin,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

impl Controller {
    fn req<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", format!("Bearer {}", self.admin).parse().expect("header"));
        request
    }

    async fn fleet(&self) -> FleetServiceClient<tonic::transport::Channel> {
        FleetServiceClient::connect(self.grpc.clone()).await.expect("connect")
    }

    async fn token(&self, name: &str, role: proto::Role) -> String {
        let request =
            self.req(proto::CreateTokenRequest { name: name.into(), role: role as i32, repositories: vec![] });
        self.fleet().await.create_token(request).await.expect("token").into_inner().token
    }

    async fn push(&self, tag: &str, seed: u64) -> proto::BundleRef {
        let registry = self.http_addr.to_string();
        let digest = alki_e2e::tiny_bundle::push_tiny_bundle(&registry, "acme/tiny", &self.admin, tag, seed)
            .await
            .expect("push");
        proto::BundleRef { registry, repository: "acme/tiny".into(), digest: digest.to_string(), tag: tag.into() }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(TIMEOUT, &mut self.task).await.expect("shuts down").expect("join").expect("serve ok");
    }
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

async fn login(browser: &Browser, base: &str, token: &str) {
    browser.client.goto(&format!("{base}/ui/")).await.expect("open the console");
    browser.wait_for("#login-form").await.expect("the login page");
    let input = browser.wait_for("#token").await.expect("token field");
    input.send_keys(token).await.expect("type the token");
    browser.wait_for("#login-form button[type=submit]").await.expect("submit").click().await.expect("click");
    browser.wait_for("#whoami").await.expect("logged in");
}

/// Clicks a rollout action and confirms it in the dialog.
async fn act(browser: &Browser, action: &str, reason: &str) {
    let button = browser.wait_for(&format!("button[data-action=\"{action}\"]")).await.expect("action button");
    button.click().await.expect("click action");
    browser.wait_for("dialog#confirm[open]").await.expect("confirmation dialog");
    browser.wait_for("#confirm-reason").await.expect("reason").send_keys(reason).await.expect("type reason");
    browser.wait_for("#confirm-ok").await.expect("ok").click().await.expect("confirm");
    browser.wait_gone("dialog#confirm[open]").await.expect("dialog closes");
}

async fn page_marker(browser: &Browser) -> serde_json::Value {
    browser.client.execute("return window.alkiTestMarker || null;", vec![]).await.expect("script")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_and_steers_a_rollout_and_a_viewer_only_watches() {
    let c = start(Duration::from_secs(3600)).await;
    let (a, _b) = (c.push("v1", 1).await, c.push("v2", 2).await);
    let operator = c.token("ops", proto::Role::Operator).await;
    let viewer = c.token("eve", proto::Role::Viewer).await;
    let browser = Browser::start(&screenshots(), 1280, 900).await.expect("browser");

    // The console sends a visitor without a session to its login, then shows the (empty) fleet.
    browser.client.goto(&format!("{}/ui/", c.http)).await.expect("open");
    browser.wait_for("#login-form").await.expect("login page first");
    browser.screenshot("login").await.expect("screenshot");
    login(&browser, &c.http, &operator).await;
    let who = browser.text("#whoami").await.expect("whoami");
    assert!(who.contains("ops") && who.contains("operator"), "{who}");
    browser.wait_for("table#devices").await.expect("fleet page");
    browser.client.execute("window.alkiTestMarker = 'same page';", vec![]).await.expect("mark the page");

    // Devices appear as their agents connect, without a reload.
    let token = c.token("fleet-sim", proto::Role::Agent).await;
    let (_, controller_rx) = tokio::sync::watch::channel(c.grpc.clone());
    let config = SimConfig {
        controller: controller_rx,
        token,
        heartbeat: Duration::from_secs(1),
        activation: Duration::from_millis(20),
        sessions_per_connection: 50,
        telemetry: Some(Duration::from_secs(1)),
        ca_pem: None,
    };
    let mut devices = sim::devices(8, &["pi5-8g", "orin-nano"], Some(a.clone()), |_, _| Behaviour::Success);
    // A device's own label is text from the field: the console must show it, never run it.
    devices[0].labels.insert("note".into(), INJECTION.into());
    let sims = SimFleet::start(config, devices);
    let online = "tr[data-device-id=\"sim-00007\"] td.connected";
    browser.wait_text(online, "online").await.expect("the last device appears, online");
    assert_eq!(page_marker(&browser).await, "same page", "the fleet page updated itself");
    browser.screenshot("fleet").await.expect("screenshot");

    // A rollout with a soak on each step: the page shows step 1, then step 2 when the engine advances.
    let spec = proto::RolloutSpec {
        repository: "acme/tiny".into(),
        candidate: "v2".into(),
        selector: HashMap::from([("site".to_owned(), "sim".to_owned())]),
        steps: vec![
            proto::RolloutStep { percent: 25, min_soak_seconds: 4 },
            proto::RolloutStep { percent: 50, min_soak_seconds: 600 },
            proto::RolloutStep { percent: 100, min_soak_seconds: 0 },
        ],
        ..Default::default()
    };
    let request = c.req(proto::CreateRolloutRequest {
        spec: Some(spec),
        override_signature_check: true,
        override_reason: "console test bundles are unsigned".into(),
    });
    let rollout = c.fleet().await.create_rollout(request).await.expect("create").into_inner();
    browser.client.goto(&format!("{}/ui/#/rollouts/{}", c.http, rollout.id)).await.expect("rollout page");
    browser.wait_for(&format!("#rollout[data-rollout-id=\"{}\"]", rollout.id)).await.expect("rollout page");
    browser.wait_for("#rollout-step[data-step=\"0\"]").await.expect("step 1 shown");
    browser.client.execute("window.alkiTestMarker = 'rollout page';", vec![]).await.expect("mark");
    browser.wait_for("#rollout-step[data-step=\"1\"]").await.expect("the page follows the rollout to step 2");
    assert_eq!(page_marker(&browser).await, "rollout page", "advanced without a reload");

    // Pause and resume through the confirmation dialog; the engine's state comes back over the stream.
    act(&browser, "pause", "checking the console").await;
    browser.wait_for("#rollout-state[data-state=\"3\"]").await.expect("paused");
    let state = c.fleet().await.get_rollout(c.req(proto::GetRolloutRequest { id: rollout.id.clone() })).await;
    assert_eq!(state.expect("get").into_inner().state, proto::RolloutState::Paused as i32, "the controller paused it");
    browser.screenshot("rollout-paused").await.expect("screenshot");
    act(&browser, "resume", "").await;
    browser.wait_for("#rollout-state[data-state=\"2\"]").await.expect("progressing again");

    // The A/B comparison per class, from the devices' benchmarks on A and on B.
    browser.wait_for("svg#ab-chart g[data-class=\"pi5-8g\"]").await.expect("A/B chart for pi5-8g");
    browser.wait_for("svg#ab-chart g[data-class=\"orin-nano\"]").await.expect("A/B chart for orin-nano");
    browser.screenshot("rollout").await.expect("screenshot");
    let chart = browser.wait_for("svg#ab-chart").await.expect("chart");
    browser
        .client
        .execute("arguments[0].scrollIntoView();", vec![serde_json::to_value(&chart).expect("element")])
        .await
        .expect("scroll");
    browser.screenshot("rollout-ab").await.expect("screenshot");
    act(&browser, "promote", "looks good").await;
    browser.wait_for("#rollout-state[data-state=\"4\"]").await.expect("completed after promote");
    assert_eq!(page_marker(&browser).await, "rollout page", "still the same page");

    for (page, name) in [
        ("#/trends", "trends"),
        ("#/bundles", "bundles"),
        ("#/devices/sim-00000", "device"),
        ("#/rollouts", "rollouts"),
    ] {
        browser.client.goto(&format!("{}/ui/{page}", c.http)).await.expect("navigate");
        browser.wait_for("main#main[data-ready=\"true\"]").await.expect("page rendered");
        browser.screenshot(name).await.expect("screenshot");
    }
    browser.client.goto(&format!("{}/ui/#/devices/sim-00000", c.http)).await.expect("device page");
    browser.wait_for("main#main[data-ready=\"true\"]").await.expect("rendered");
    let shown = browser.client.find(Locator::Css("main#main")).await.expect("main").text().await.expect("text");
    assert!(shown.contains(INJECTION), "the label is shown as text: {shown}");
    assert_eq!(browser.count("#injected").await.expect("count"), 0, "no element was made from it");
    let ran = browser.client.execute("return window.alkiInjected || null;", vec![]).await.expect("script");
    assert_eq!(ran, serde_json::Value::Null, "no script ran from it");
    browser.client.set_window_size(390, 844).await.expect("phone size");
    browser.client.goto(&format!("{}/ui/#/devices", c.http)).await.expect("fleet");
    browser.wait_for("tr[data-device-id=\"sim-00000\"]").await.expect("fleet on a phone");
    browser.screenshot("fleet-phone").await.expect("screenshot");
    browser.client.set_window_size(1280, 900).await.expect("desktop size");

    // Log out; a viewer sees the rollout but no action, and the API would refuse one anyway.
    browser.wait_for("#logout").await.expect("logout button").click().await.expect("log out");
    browser.wait_for("#login-form").await.expect("back at the login");
    login(&browser, &c.http, &viewer).await;
    browser.client.goto(&format!("{}/ui/#/rollouts/{}", c.http, rollout.id)).await.expect("rollout page");
    browser.wait_for("#rollout-state").await.expect("the viewer sees the rollout");
    browser.wait_for("main#main[data-ready=\"true\"]").await.expect("rendered");
    assert_eq!(browser.count("button[data-action]").await.expect("count"), 0, "a viewer sees no actions");
    browser.screenshot("rollout-viewer").await.expect("screenshot");
    eprintln!("screenshots in {}", screenshots().display());

    browser.close().await.expect("close");
    sims.stop().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_sent_to_the_login_page() {
    let c = start(Duration::from_secs(4)).await;
    let operator = c.token("ops", proto::Role::Operator).await;
    let browser = Browser::start(&screenshots(), 1280, 900).await.expect("browser");
    login(&browser, &c.http, &operator).await;
    browser.wait_for("table#devices").await.expect("fleet page");
    // Nobody touches the page: when the session ends, its event stream ends, and the console finds the
    // session gone and shows the login.
    browser.wait_for("#login-form").await.expect("sent to the login page");
    let url = browser.client.current_url().await.expect("url");
    assert!(url.fragment().is_some_and(|f| f.starts_with("/login")), "{url}");
    browser.screenshot("expired").await.expect("screenshot");
    browser.close().await.expect("close");
    c.shutdown().await;
}
