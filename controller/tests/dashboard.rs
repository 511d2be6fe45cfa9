//! The dashboards' side of a real controller on 127.0.0.1:0: every documented `/api/v1` route answers
//! viewers and refuses others, the OpenAPI document lists exactly the router's routes, the Grafana
//! dashboard queries only metrics a real scrape exports, and InsightService commands reach agent sessions
//! whose benchmark reports come back through ListBenchmarks, the dashboard API and Recommend.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use alki_controller::api::dashboard::ROUTES;
use alki_controller::config::ControllerConfig;
use alki_shared::proto::{
    self, AgentMessage, agent_message, agent_service_client::AgentServiceClient, controller_message::Msg,
    fleet_service_client::FleetServiceClient, insight_service_client::InsightServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

mod common;

const TIMEOUT: Duration = Duration::from_secs(30);

struct Controller {
    grpc: String,
    http: String,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// Starts a controller whose store already holds `seed`'s records.
async fn start(seed: impl FnOnce(&alki_controller::store::Store)) -> Controller {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = alki_controller::store::Store::open(dir.path()).expect("store");
        seed(&store);
    }
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(dir.path().to_owned());
    // Plaintext on loopback with agent tokens, as the other in-process tests; TLS has its own tests.
    config.insecure_plaintext = true;
    config.insecure_agent_tokens = true;
    let task = tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        let _ = stopped.await;
    }));
    let admin = common::admin_token(dir.path()).await;
    Controller {
        grpc: format!("http://{grpc_addr}"),
        http: format!("http://{http_addr}"),
        admin,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

impl Controller {
    fn req<T>(&self, token: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
        request
    }

    async fn token(&self, role: proto::Role) -> String {
        let mut fleet = FleetServiceClient::connect(self.grpc.clone()).await.expect("connect");
        let request = self.req(
            &self.admin,
            proto::CreateTokenRequest {
                name: format!("{role:?}"),
                role: role as i32,
                // A push token must name its repositories.
                repositories: if role == proto::Role::Push { vec!["*".into()] } else { vec![] },
            },
        );
        fleet.create_token(request).await.expect("token").into_inner().token
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new().get(format!("{}{path}", self.http));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send().await.expect("http request")
    }

    async fn post(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new().post(format!("{}{path}", self.http));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send().await.expect("http request")
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(TIMEOUT, &mut self.task).await.expect("shuts down").expect("join").expect("serve ok");
    }
}

fn seed_fleet(store: &alki_controller::store::Store) {
    store
        .update_device(&alki_shared::ids::DeviceId::new("pi-1").expect("id"), |d| {
            d.labels.insert("class".into(), "pi5-8g".into());
            d.phase = proto::Phase::Active as i32;
        })
        .expect("device");
    // A finished rollout: the reconciler leaves it alone, the gauges and the API show it.
    let rollout = proto::Rollout {
        id: "ro-seeded".into(),
        state: proto::RolloutState::Completed as i32,
        spec: Some(proto::RolloutSpec {
            steps: vec![proto::RolloutStep { percent: 100, min_soak_seconds: 0 }],
            ..Default::default()
        }),
        candidate: Some(proto::BundleRef { digest: format!("sha256:{}", "b".repeat(64)), ..Default::default() }),
        classes: vec![proto::ClassStatus {
            class: "pi5-8g".into(),
            tokens_per_second_ratio: 0.7,
            ttft_ratio: 1.4,
            a_samples: 3,
            b_samples: 3,
            quality: Some(proto::ClassQuality {
                measured: 3,
                could_not_run: 1,
                max_kld: Some(0.0008),
                min_top1_agreement: Some(0.97),
                max_perplexity_ratio: Some(1.01),
                min_golden_pass: Some(1.0),
            }),
            a_error_rate: 0.001,
            b_error_rate: 0.0012,
            a_p95_latency_ms: 400.0,
            b_p95_latency_ms: 420.0,
            ..Default::default()
        }],
        ..Default::default()
    };
    store.put_rollout(&alki_controller::store::Keyed::new(rollout).expect("rollout id")).expect("rollout");
}

/// A route with its parameters filled in.
fn concrete(route: &str) -> String {
    match route {
        "/api/v1/devices/{id}" => "/api/v1/devices/pi-1".into(),
        "/api/v1/rollouts/{id}" => "/api/v1/rollouts/ro-seeded".into(),
        "/api/v1/rollouts/{id}/devices" => "/api/v1/rollouts/ro-seeded/devices".into(),
        "/api/v1/rollouts/{id}/{verb}" => "/api/v1/rollouts/ro-seeded/pause".into(),
        "/api/v1/compare" => "/api/v1/compare?rollout=ro-seeded".into(),
        "/api/v1/recommend" => format!("/api/v1/recommend?bundle=sha256:{}", "0".repeat(64)),
        other => other.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_answers_viewers_and_refuses_everyone_else() {
    let c = start(seed_fleet).await;
    let (viewer, push) = (c.token(proto::Role::Viewer).await, c.token(proto::Role::Push).await);

    let doc: serde_json::Value = c.get("/api/v1/openapi.json", Some(&viewer)).await.json().await.expect("openapi json");
    let documented: BTreeSet<String> = doc["paths"].as_object().expect("paths").keys().cloned().collect();
    let routed: BTreeSet<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    assert_eq!(documented, routed, "the OpenAPI document lists exactly the router's routes");

    let operator = c.token(proto::Role::Operator).await;
    for route in ROUTES {
        let path = concrete(route);
        if route.ends_with("{verb}") {
            // A change: the gate refuses viewers; an operator reaches the verb, which a completed rollout refuses.
            assert_eq!(c.post(&path, Some(&viewer)).await.status(), 403, "{path} for a viewer");
            assert_eq!(c.post(&path, None).await.status(), 401, "{path} without a token");
            let refused = c.post(&path, Some(&operator)).await;
            assert_eq!(refused.status(), 409, "{path} on a completed rollout");
            let body: serde_json::Value = refused.json().await.expect("error json");
            assert!(body["error"].as_str().is_some_and(|e| e.contains("completed")), "{body}");
            continue;
        }
        let ok = c.get(&path, Some(&viewer)).await;
        assert_eq!(ok.status(), 200, "{path} for a viewer");
        assert_eq!(c.get(&path, None).await.status(), 401, "{path} without a token");
        assert_eq!(c.get(&path, Some(&push)).await.status(), 403, "{path} for a push-only token");
    }

    let device: proto::Device = c.get("/api/v1/devices/pi-1", Some(&viewer)).await.json().await.expect("device json");
    assert_eq!(device.labels.get("class").map(String::as_str), Some("pi5-8g"));
    let listed: proto::ListDevicesResponse =
        c.get("/api/v1/devices?selector=class=pi5-8g", Some(&viewer)).await.json().await.expect("devices json");
    assert_eq!(listed.devices.len(), 1);
    let none: proto::ListDevicesResponse =
        c.get("/api/v1/devices?selector=class=orin", Some(&viewer)).await.json().await.expect("devices json");
    assert!(none.devices.is_empty());
    let missing = c.get("/api/v1/devices/nope", Some(&viewer)).await;
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.expect("error json");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("nope")), "{body}");
    let bad = c.get("/api/v1/compare", Some(&viewer)).await;
    assert_eq!(bad.status(), 400, "compare without a rollout says what to add");
    assert_eq!(c.get("/api/v1/compare?rollout=ro-nope", Some(&viewer)).await.status(), 404);
    c.shutdown().await;
}

/// Every metric name a PromQL expression mentions (alki_ prefixed identifiers).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("alki_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_a_real_scrape_exports() {
    let c = start(seed_fleet).await;
    let viewer = c.token(proto::Role::Viewer).await;
    let agent = c.token(proto::Role::Agent).await;
    // Simulated devices serving and reporting telemetry, so the serving gauges have samples.
    let (_tx, controller) = tokio::sync::watch::channel(c.grpc.clone());
    let config = alki_e2e::sim::SimConfig {
        controller,
        token: agent,
        heartbeat: Duration::from_secs(1),
        activation: Duration::from_millis(10),
        sessions_per_connection: 10,
        telemetry: Some(Duration::from_millis(200)),
        ca_pem: None,
    };
    let running = proto::BundleRef {
        repository: "acme/tiny".into(),
        digest: format!("sha256:{}", "a".repeat(64)),
        ..Default::default()
    };
    let devices =
        alki_e2e::sim::devices(4, &["pi5-8g", "x86-avx2"], Some(running), |_, _| alki_e2e::sim::Behaviour::Success);
    let sims = alki_e2e::sim::SimFleet::start(config, devices);
    // Registry traffic: one request that the counters see.
    let _ = c.get("/v2/", Some(&c.admin)).await;
    // A webhook, so the per-webhook delivery gauges have a sample (its receiver need not exist).
    let mut events = proto::event_service_client::EventServiceClient::connect(c.grpc.clone()).await.expect("connect");
    let webhook =
        proto::AddWebhookRequest { url: "http://127.0.0.1:9/hook".into(), insecure_http: true, ..Default::default() };
    events.add_webhook(c.req(&c.admin, webhook)).await.expect("webhook");

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/alki-fleet.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard file")).expect("dashboard is JSON");
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    let wanted: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    assert!(wanted.len() >= 10, "the dashboard queries the fleet, rollouts and registry: {wanted:?}");

    let mut scrape = String::new();
    let exported = tokio::time::timeout(TIMEOUT, async {
        loop {
            scrape = c.get("/metrics", Some(&viewer)).await.text().await.expect("scrape");
            let exported: BTreeSet<String> = scrape
                .lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned)
                .collect();
            if wanted.is_subset(&exported) {
                return exported;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let exported = exported.unwrap_or_else(|_| {
        let missing: Vec<&String> = wanted.iter().filter(|w| !scrape.contains(&format!("# TYPE {w} "))).collect();
        panic!("the dashboard queries metrics the controller does not export: {missing:?}\n{scrape}")
    });
    assert!(exported.contains("alki_devices_connected"));
    assert!(scrape.contains("alki_devices_connected 4"), "{scrape}");
    assert!(scrape.contains("alki_registry_requests_total{method=\"GET\"}"), "{scrape}");
    sims.stop().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benchmark_commands_reach_the_session_and_reports_come_back_through_every_door() {
    let c = start(|_| {}).await;
    let (viewer, agent) = (c.token(proto::Role::Viewer).await, c.token(proto::Role::Agent).await);

    // A scripted agent.
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let hello = proto::Hello {
        device_id: "pi-7".into(),
        labels: HashMap::from([("class".to_owned(), "pi5-8g".to_owned()), ("site".to_owned(), "lab".to_owned())]),
        ..Default::default()
    };
    tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await.expect("hello");
    let mut agent_client = AgentServiceClient::connect(c.grpc.clone()).await.expect("connect agent");
    let mut inbound = agent_client.session(c.req(&agent, ReceiverStream::new(rx))).await.expect("session").into_inner();
    let welcome = inbound.message().await.expect("welcome").expect("a message");
    assert!(matches!(welcome.msg, Some(Msg::Welcome(_))));

    let mut insight = InsightServiceClient::connect(c.grpc.clone()).await.expect("connect insight");
    let denied = insight
        .run_benchmark(
            c.req(&viewer, proto::RunBenchmarkRequest { device_ids: vec!["pi-7".into()], ..Default::default() }),
        )
        .await
        .expect_err("viewers may not send commands");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let empty =
        insight.run_benchmark(c.req(&c.admin, proto::RunBenchmarkRequest::default())).await.expect_err("no targets");
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    assert!(empty.message().contains("selector"), "{}", empty.message());

    let sent = insight
        .run_benchmark(c.req(
            &c.admin,
            proto::RunBenchmarkRequest {
                selector: HashMap::from([("site".to_owned(), "lab".to_owned())]),
                repetitions: 2,
                ..Default::default()
            },
        ))
        .await
        .expect("run benchmark")
        .into_inner()
        .commands;
    assert_eq!(sent.len(), 1);
    assert!(sent[0].delivered);
    let command = tokio::time::timeout(TIMEOUT, async {
        loop {
            match inbound.message().await.expect("stream").expect("a message").msg {
                Some(Msg::Command(cmd)) => return cmd,
                _ => continue,
            }
        }
    })
    .await
    .expect("the command arrives on the session");
    assert_eq!(command.id, sent[0].command_id);
    assert!(matches!(command.kind, Some(proto::command::Kind::RunBenchmark(proto::RunBenchmark { repetitions: 2 }))));

    // The agent answers with calibration-style results for two variants.
    let bundle = proto::BundleRef {
        repository: "acme/tiny".into(),
        digest: format!("sha256:{}", "b".repeat(64)),
        ..Default::default()
    };
    let result = |variant: &str, tps: f64| proto::BenchmarkResult {
        bundle: Some(bundle.clone()),
        variant_digest: format!("sha256:{}", variant.repeat(64)),
        variant_name: if variant == "1" { "Q4_K_M".into() } else { "Q8_0".into() },
        trigger: proto::BenchmarkTrigger::Calibration as i32,
        generation_tokens_per_second: Some(proto::Stat { median: tps, samples: 2, ..Default::default() }),
        ..Default::default()
    };
    let report = proto::BenchmarkReport {
        command_id: command.id.clone(),
        results: vec![result("1", 9.0), result("2", 4.0)],
        error: String::new(),
    };
    tx.send(AgentMessage { msg: Some(agent_message::Msg::Benchmark(report)) }).await.expect("report");

    let listed = tokio::time::timeout(TIMEOUT, async {
        loop {
            let request = proto::ListBenchmarksRequest { device_id: "pi-7".into(), ..Default::default() };
            let r = insight.list_benchmarks(c.req(&viewer, request)).await.expect("list").into_inner().results;
            if r.len() == 2 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the results are stored");
    assert!(listed.iter().all(|r| r.hardware_class == "pi5-8g" && r.device_id == "pi-7"), "{listed:?}");

    let via_http: proto::ListBenchmarksResponse = c
        .get(&format!("/api/v1/benchmarks?bundle={}&class=pi5-8g", bundle.digest), Some(&viewer))
        .await
        .json()
        .await
        .expect("benchmarks json");
    assert_eq!(via_http.results.len(), 2);
    let recommended: proto::Recommendation = c
        .get(&format!("/api/v1/recommend?bundle={}", bundle.digest), Some(&viewer))
        .await
        .json()
        .await
        .expect("recommendation json");
    assert_eq!(recommended.classes.len(), 1);
    assert_eq!(recommended.classes[0].variant_name, "Q4_K_M", "the fastest");
    let floor: proto::Recommendation = c
        .get(&format!("/api/v1/recommend?bundle={}&min_quantization=Q5_K_M", bundle.digest), Some(&viewer))
        .await
        .json()
        .await
        .expect("recommendation json");
    assert_eq!(floor.classes[0].variant_name, "Q8_0", "the fastest at or above Q5_K_M");
    drop(tx);
    c.shutdown().await;
}
