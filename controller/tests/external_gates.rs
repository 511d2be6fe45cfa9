//! External gates over real HTTP: an approval webhook that says "not yet" before a person approves (or
//! rejects), and a server speaking Prometheus' query API with fixed answers per class, deciding a real
//! controller's rollouts of scripted agents.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alki_controller::config::{ControllerConfig, GatesConfig, PrometheusGateConfig, WebhookGateConfig};
use alki_shared::proto::{self, controller_message::Msg};
use alki_shared::webhook;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use common::scripted::*;

/// The approval service: answers each ask with the next scripted decision (the last one repeats), after
/// checking the signature.
#[derive(Default)]
struct Approvals {
    key: Vec<u8>,
    script: Mutex<Vec<serde_json::Value>>,
    asked: Mutex<Vec<serde_json::Value>>,
}

async fn approve(State(s): State<Arc<Approvals>>, headers: HeaderMap, body: axum::body::Bytes) -> (StatusCode, String) {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let (id, ts, sig) =
        (header(webhook::ID_HEADER), header(webhook::TIMESTAMP_HEADER), header(webhook::SIGNATURE_HEADER));
    if webhook::verify(&s.key, &id, &ts, &sig, &body, now).is_err() {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    s.asked.lock().expect("lock").push(serde_json::from_slice(&body).expect("json"));
    let mut script = s.script.lock().expect("lock");
    let next = if script.len() > 1 { script.remove(0) } else { script[0].clone() };
    (StatusCode::OK, next.to_string())
}

/// Prometheus' `/api/v1/query` with a fixed value per class named in the query (none: no data).
#[derive(Default)]
struct Prometheus {
    values: BTreeMap<String, f64>,
    queries: Mutex<Vec<String>>,
}

async fn query(State(p): State<Arc<Prometheus>>, Query(q): Query<BTreeMap<String, String>>) -> String {
    let promql = q.get("query").cloned().unwrap_or_default();
    p.queries.lock().expect("lock").push(promql.clone());
    let result: Vec<serde_json::Value> = p
        .values
        .iter()
        .filter(|(class, _)| promql.contains(&format!("class=\"{class}\"")))
        .map(|(_, v)| serde_json::json!({ "metric": {}, "value": [1_700_000_000, v.to_string()] }))
        .collect();
    serde_json::json!({ "status": "success", "data": { "resultType": "vector", "result": result } }).to_string()
}

struct Services {
    approvals: Arc<Approvals>,
    prometheus: Arc<Prometheus>,
    gates: GatesConfig,
    _task: tokio::task::JoinHandle<()>,
}

async fn services(script: Vec<serde_json::Value>, values: &[(&str, f64)]) -> Services {
    let key = [4u8; 32];
    let approvals = Arc::new(Approvals { key: key.to_vec(), script: Mutex::new(script), ..Default::default() });
    let values = values.iter().map(|(c, v)| ((*c).to_owned(), *v)).collect();
    let prometheus = Arc::new(Prometheus { values, ..Default::default() });
    let app = axum::Router::new()
        .route("/approve", axum::routing::post(approve).with_state(approvals.clone()))
        .route("/api/v1/query", axum::routing::get(query).with_state(prometheus.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let webhook = WebhookGateConfig { url: format!("http://{addr}/approve"), secret: webhook::secret_from_key(&key) };
    let gates = GatesConfig {
        prometheus: Some(PrometheusGateConfig { url: format!("http://{addr}"), bearer_token: None }),
        webhooks: [("change-approval".to_owned(), webhook)].into(),
        retry: Duration::from_millis(100),
    };
    Services { approvals, prometheus, gates, _task: task }
}

/// A scripted agent of `class` labelled site=lab that takes whatever it is told and reports it active.
async fn device(c: &Controller, name: &str, class: &str) -> FakeAgent {
    let token = create_token(c, name, proto::Role::Agent).await;
    let mut client =
        alki_shared::proto::agent_service_client::AgentServiceClient::connect(c.grpc.clone()).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let hello = proto::Hello {
        device_id: name.into(),
        agent_version: "test".into(),
        labels: [("site".to_owned(), "lab".to_owned()), ("class".to_owned(), class.to_owned())].into(),
        ..Default::default()
    };
    tx.send(proto::AgentMessage { msg: Some(proto::agent_message::Msg::Hello(hello)) }).await.expect("hello");
    let response =
        client.session(with_token(&token, tokio_stream::wrappers::ReceiverStream::new(rx))).await.expect("session");
    let mut agent = FakeAgent { tx, rx: response.into_inner() };
    assert!(matches!(agent.next().await, Msg::Welcome(_)));
    agent
}

/// Reports every desired state the agent gets as active, until the test ends.
fn serve_everything(mut agent: FakeAgent) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(message)) = agent.rx.message().await {
            if let Some(Msg::DesiredState(d)) = message.msg {
                let status = proto::Status {
                    generation: d.generation,
                    phase: proto::Phase::Active as i32,
                    serving: d.bundle.clone(),
                    ..Default::default()
                };
                agent.report(status).await;
            }
        }
    })
}

async fn create(
    c: &Controller,
    gates: Vec<proto::ExternalGate>,
    halt_class: bool,
) -> Result<proto::Rollout, tonic::Status> {
    let spec = proto::RolloutSpec {
        repository: "acme/tiny".into(),
        candidate: "v1".into(),
        selector: [("site".to_owned(), "lab".to_owned())].into(),
        external_gates: gates,
        on_class_failure: if halt_class { proto::ClassFailurePolicy::HaltClass as i32 } else { 0 },
        ..Default::default()
    };
    let request = with_token(&c.admin, proto::CreateRolloutRequest { spec: Some(spec), ..Default::default() });
    fleet(c).await.create_rollout(request).await.map(|r| r.into_inner())
}

fn approval() -> proto::ExternalGate {
    proto::ExternalGate { name: "change-approval".into(), webhook: "change-approval".into(), ..Default::default() }
}

fn ended(r: &proto::Rollout) -> bool {
    !matches!(
        proto::RolloutState::try_from(r.state).unwrap_or_default(),
        proto::RolloutState::Pending | proto::RolloutState::Progressing
    )
}

async fn events_of(c: &Controller, id: &str) -> Vec<proto::RolloutEvent> {
    let request = with_token(&c.admin, proto::ListRolloutEventsRequest { id: id.into(), after_seq: 0 });
    fleet(c).await.list_rollout_events(request).await.expect("events").into_inner().events
}

#[tokio::test]
async fn an_approval_webhook_holds_each_step_until_a_person_approves_and_a_rejection_aborts() {
    let approve = serde_json::json!({ "decision": "approve", "by": "alice", "reason": "change CHG-42 approved" });
    let not_yet = serde_json::json!({ "decision": "retry_later", "reason": "waiting for the change board", "retry_after_seconds": 1 });
    let s = services(vec![not_yet.clone(), not_yet, approve], &[]).await;
    let gates = s.gates.clone();
    let c =
        start_with(tempfile::tempdir().expect("tempdir"), move |config: &mut ControllerConfig| config.gates = gates)
            .await;
    push_bundle(&c, "v1", 1).await;
    let _pi = serve_everything(device(&c, "pi-1", "pi4").await);

    // A gate the controller does not know is refused before anything starts.
    let unknown = proto::ExternalGate { name: "x".into(), webhook: "nobody".into(), ..Default::default() };
    let err = create(&c, vec![unknown], false).await.expect_err("unknown gate");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("change-approval"), "{}", err.message());

    let rollout = create(&c, vec![approval()], false).await.expect("create");
    let done = wait_rollout(&c, &rollout.id, ended).await;
    assert!(completed(&done), "{}", done.message);
    let asked = s.approvals.asked.lock().expect("lock").clone();
    assert_eq!(asked.len(), 3, "asked until it approved: {asked:?}");
    assert_eq!(asked[0]["rollout_id"], rollout.id.as_str());
    assert_eq!(asked[0]["classes"][0]["class"], "pi4", "the step's comparison goes with the question");
    let answer = done.external_gates.iter().find(|g| g.gate == "change-approval").expect("answer kept");
    assert_eq!((answer.decided_by.as_str(), answer.state), ("alice", proto::ExternalGateState::Passed as i32));
    let history: Vec<String> =
        events_of(&c, &rollout.id).await.into_iter().filter(|e| e.kind == "gate").map(|e| e.message).collect();
    assert_eq!(history.len(), 3, "{history:?}");
    assert!(history[0].contains("not yet: waiting for the change board"), "{history:?}");
    assert!(history[2].contains("passed by alice: change CHG-42 approved"), "{history:?}");

    // The next rollout is rejected: it aborts, saying who rejected it and why.
    *s.approvals.script.lock().expect("lock") =
        vec![serde_json::json!({ "decision": "reject", "by": "bob", "reason": "freeze until Monday" })];
    push_bundle(&c, "v1", 2).await;
    let rollout = create(&c, vec![approval()], false).await.expect("create");
    let done = wait_rollout(&c, &rollout.id, ended).await;
    assert_eq!(done.state, proto::RolloutState::Aborted as i32, "{}", done.message);
    assert!(done.message.contains("freeze until Monday (by bob)"), "{}", done.message);
    c.shutdown().await;
}

#[tokio::test]
async fn a_prometheus_gate_halts_the_class_past_its_threshold_and_no_data_is_inconclusive() {
    let s = services(vec![serde_json::json!({ "decision": "approve" })], &[("pi4", 0.01), ("pi5", 0.5)]).await;
    let gates = s.gates.clone();
    let c =
        start_with(tempfile::tempdir().expect("tempdir"), move |config: &mut ControllerConfig| config.gates = gates)
            .await;
    push_bundle(&c, "v1", 1).await;
    let _agents =
        [serve_everything(device(&c, "pi-4", "pi4").await), serve_everything(device(&c, "pi-5", "pi5").await)];
    let errors = proto::ExternalGate {
        name: "error-rate".into(),
        promql: r#"max(rate(http_errors_total{class="$class",rollout="$rollout"}[5m]))"#.into(),
        op: "<".into(),
        threshold: 0.1,
        ..Default::default()
    };
    let rollout = create(&c, vec![errors.clone()], true).await.expect("create");
    let done = wait_rollout(&c, &rollout.id, ended).await;
    assert!(completed(&done), "{}", done.message);
    assert_eq!(done.halted_classes, ["pi5"], "{}", done.message);
    let queries = s.prometheus.queries.lock().expect("lock").clone();
    let wanted = format!(r#"max(rate(http_errors_total{{class="pi4",rollout="{}"}}[5m]))"#, rollout.id);
    assert!(queries.contains(&wanted), "{queries:?}");
    let history: Vec<String> =
        events_of(&c, &rollout.id).await.into_iter().map(|e| format!("{} {}", e.kind, e.message)).collect();
    assert!(
        history.iter().any(|e| e.starts_with("gate gate error-rate for class pi5") && e.contains("not 0.5 < 0.1")),
        "{history:?}"
    );
    assert!(history.iter().any(|e| e.starts_with("class_halted class pi5")), "{history:?}");

    // A query without data past its deadline holds the rollout for a person.
    let silent = proto::ExternalGate {
        name: "latency".into(),
        promql: r#"p95{class="none"}"#.into(),
        op: "<".into(),
        threshold: 1.0,
        deadline_seconds: 1,
        ..Default::default()
    };
    push_bundle(&c, "v1", 3).await;
    let rollout = create(&c, vec![silent], false).await.expect("create");
    let held = wait_rollout(&c, &rollout.id, ended).await;
    assert_eq!(held.state, proto::RolloutState::Paused as i32, "{}", held.message);
    assert!(held.message.contains("no decision within 1 s"), "{}", held.message);
    c.shutdown().await;
}
