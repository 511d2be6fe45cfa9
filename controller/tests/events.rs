//! The fleet's events going out, over real gRPC and HTTP: webhooks receive every event as a signed CloudEvent
//! in order, through receiver errors, a dead webhook beside them and a controller restart; watchers follow a
//! rollout to its end and resume after an event id, over gRPC and Server-Sent Events.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use alki_shared::proto::{self, controller_message::Msg, event_service_client::EventServiceClient};
use alki_shared::webhook;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::scripted::*;
use tonic::transport::Channel;

/// A webhook receiver as an operator would run one: it checks every delivery's signature and time, and can
/// be told to fail.
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ReceiverState {
    key: Vec<u8>,
    /// Answer 500 to this many deliveries first.
    fail_next: AtomicU32,
    /// Answer 503 to everything while set.
    down: AtomicBool,
    bad_signatures: AtomicU32,
    refused: AtomicU32,
    /// CloudEvents taken, in the order they arrived.
    got: std::sync::Mutex<Vec<serde_json::Value>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(State(s): State<Arc<ReceiverState>>, headers: HeaderMap, body: axum::body::Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let (id, timestamp, signature) =
        (header(webhook::ID_HEADER), header(webhook::TIMESTAMP_HEADER), header(webhook::SIGNATURE_HEADER));
    if webhook::verify(&s.key, &id, &timestamp, &signature, &body, now).is_err() {
        s.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    if header("content-type") != "application/cloudevents+json" {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE;
    }
    if s.down.load(Ordering::SeqCst)
        || s.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    {
        s.refused.fetch_add(1, Ordering::SeqCst);
        return if s.down.load(Ordering::SeqCst) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
    }
    let event: serde_json::Value = serde_json::from_slice(&body).expect("a CloudEvent is JSON");
    assert_eq!(event["id"], id.as_str(), "the webhook-id is the CloudEvent id");
    s.got.lock().expect("lock").push(event);
    StatusCode::NO_CONTENT
}

async fn receiver(key: &[u8], fail_first: u32) -> Receiver {
    let state =
        Arc::new(ReceiverState { key: key.to_vec(), fail_next: AtomicU32::new(fail_first), ..Default::default() });
    let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver { url, state, task }
}

impl Receiver {
    fn types(&self) -> Vec<String> {
        let got = self.state.got.lock().expect("lock");
        got.iter().map(|e| e["type"].as_str().unwrap_or_default().to_owned()).collect()
    }

    /// Event ids in the order they first arrived (a redelivery after a restart is dropped, as receivers do).
    fn ids(&self) -> Vec<u64> {
        let got = self.state.got.lock().expect("lock");
        let mut ids: Vec<u64> = Vec::new();
        for e in got.iter() {
            let id = e["data"]["event_id"].as_u64().expect("event id");
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    async fn wait_for(&self, event_type: &str) {
        let wanted = format!("ai.alki.{event_type}");
        tokio::time::timeout(TIMEOUT, async {
            while !self.types().contains(&wanted) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{wanted} reached the receiver; it got {:?}", self.types()));
    }
}

async fn events(c: &Controller) -> EventServiceClient<Channel> {
    EventServiceClient::connect(c.grpc.clone()).await.expect("connect events")
}

async fn webhooks(c: &Controller) -> Vec<proto::Webhook> {
    let request = with_token(&c.admin, proto::ListWebhooksRequest {});
    events(c).await.list_webhooks(request).await.expect("webhooks").into_inner().webhooks
}

async fn wait_webhook(c: &Controller, id: &str, done: impl Fn(&proto::Webhook) -> bool) -> proto::Webhook {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(w) = webhooks(c).await.into_iter().find(|w| w.id == id && done(w)) {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the webhook reaches the state")
}

fn fast_retries(config: &mut alki_controller::config::ControllerConfig) {
    config.webhook_delivery.retry_base = Duration::from_millis(20);
    config.webhook_delivery.retry_max = Duration::from_millis(200);
}

async fn add_webhook(c: &Controller, url: &str, secret: &str) -> proto::Webhook {
    let request = proto::AddWebhookRequest {
        url: url.into(),
        secret: secret.into(),
        insecure_http: true,
        from_start: true,
        ..Default::default()
    };
    let added = events(c).await.add_webhook(with_token(&c.admin, request)).await.expect("add webhook").into_inner();
    assert_eq!(added.secret, secret, "a given secret is kept");
    added.webhook.expect("webhook")
}

/// A scripted agent that says Hello and takes its Welcome.
async fn agent(c: &Controller, token: &str, device_id: &str) -> FakeAgent {
    let mut agent = connect_agent(c, token, device_id, 0, None).await;
    assert!(matches!(agent.next().await, Msg::Welcome(_)));
    agent
}

/// Drives a lab rollout on a connected agent to completion.
async fn complete_rollout(c: &Controller, agent: &mut FakeAgent) -> proto::Rollout {
    let rollout = create_lab_rollout(c, &mut fleet(c).await).await;
    let Msg::DesiredState(desired) = agent.next().await else { panic!("expected a desired state") };
    let active = proto::Status {
        generation: desired.generation,
        phase: proto::Phase::Active as i32,
        serving: desired.bundle.clone(),
        ..Default::default()
    };
    agent.report(active).await;
    wait_rollout(c, &rollout.id, completed).await
}

#[tokio::test]
async fn webhooks_get_every_event_signed_in_order_through_errors_a_dead_neighbour_and_a_restart() {
    let key = [9u8; 32];
    let secret = webhook::secret_from_key(&key);
    let live = receiver(&key, 2).await;
    let c = start_with(tempfile::tempdir().expect("tempdir"), fast_retries).await;
    push_bundle(&c, "v1", 1).await;

    // Only admins point the fleet's events somewhere.
    let operator = create_token(&c, "ops", proto::Role::Operator).await;
    let request = proto::AddWebhookRequest { url: live.url.clone(), insecure_http: true, ..Default::default() };
    let refused = events(&c).await.add_webhook(with_token(&operator, request)).await.expect_err("operator");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let plain = proto::AddWebhookRequest { url: live.url.clone(), ..Default::default() };
    let refused = events(&c).await.add_webhook(with_token(&c.admin, plain)).await.expect_err("plain http");
    assert!(refused.message().contains("https"), "{}", refused.message());

    let hook = add_webhook(&c, &live.url, &secret).await;
    // A receiver that never answers (nothing listens on the port) must delay nobody else.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let dead = add_webhook(&c, &format!("http://127.0.0.1:{dead_port}/hook"), &secret).await;

    let agent_token = create_token(&c, "pi-1", proto::Role::Agent).await;
    let mut pi = agent(&c, &agent_token, "pi-1").await;
    let rollout = complete_rollout(&c, &mut pi).await;
    live.wait_for("rollout.completed").await;

    let types = live.types();
    let position =
        |t: &str| types.iter().position(|x| x == &format!("ai.alki.{t}")).unwrap_or_else(|| panic!("{t} in {types:?}"));
    assert!(position("device.online") < position("rollout.created"));
    assert!(position("rollout.created") < position("rollout.started"));
    assert!(position("rollout.started") < position("rollout.completed"));
    let ids = live.ids();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "delivered in log order: {ids:?}");
    assert_eq!(live.state.bad_signatures.load(Ordering::SeqCst), 0);
    assert_eq!(live.state.refused.load(Ordering::SeqCst), 2, "the first two attempts failed and were retried");
    let completed_event = live.state.got.lock().expect("lock").last().cloned().expect("one");
    assert_eq!(completed_event["subject"], format!("rollouts/{}", rollout.id));
    assert_eq!(completed_event["specversion"], "1.0");

    // Delivery state: the live webhook is caught up; the dead one owes everything and says why.
    let list = events(&c).await.list_events(with_token(&operator, proto::ListEventsRequest::default())).await;
    let list = list.expect("list events").into_inner();
    assert_eq!(list.events.iter().map(|e| e.id).collect::<Vec<_>>(), ids, "the receiver got the whole log");
    let live_state = wait_webhook(&c, &hook.id, |w| w.pending == 0).await;
    assert_eq!(live_state.delivered_through, list.last_event_id);
    let dead_state = wait_webhook(&c, &dead.id, |w| w.attempts > 0).await;
    assert!(dead_state.pending >= list.events.len() as u64 - 1, "{dead_state:?}");
    assert!(!dead_state.last_error.is_empty() && dead_state.last_status == 0, "{dead_state:?}");
    assert!(list.events.iter().all(|e| e.pending_webhooks.contains(&dead.id)));
    assert!(list.events.iter().all(|e| !e.pending_webhooks.contains(&hook.id)));
    let removed = proto::RemoveWebhookRequest { id: dead.id.clone() };
    events(&c).await.remove_webhook(with_token(&c.admin, removed)).await.expect("remove the dead webhook");

    // The receiver goes down; the device crash-loops and leaves meanwhile, and the controller restarts:
    // nothing is lost.
    live.state.down.store(true, Ordering::SeqCst);
    let looping = proto::ActivationError {
        code: proto::ErrorCode::CrashLoop as i32,
        message: "llama-server crashed 3 times in 10 min".into(),
        ..Default::default()
    };
    let status =
        proto::Status { generation: 1, phase: proto::Phase::Failed as i32, error: Some(looping), ..Default::default() };
    pi.report(status).await;
    wait_webhook(&c, &hook.id, |w| w.pending >= 1).await;
    drop(pi);
    wait_webhook(&c, &hook.id, |w| w.last_status == 503 && w.pending >= 2).await;
    let dir = c.shutdown().await;
    live.state.down.store(false, Ordering::SeqCst);
    let c = start_with(dir, fast_retries).await;
    live.wait_for("device.crash_loop").await;
    live.wait_for("device.offline").await;
    let all = events(&c).await.list_events(with_token(&c.admin, proto::ListEventsRequest::default())).await;
    let all: Vec<u64> = all.expect("list").into_inner().events.iter().map(|e| e.id).collect();
    assert_eq!(live.ids(), all, "every event reached the receiver once it was back, in order");
    assert_eq!(live.state.bad_signatures.load(Ordering::SeqCst), 0);
    let request = with_token(&c.admin, proto::TestWebhookRequest { id: hook.id.clone() });
    let test = events(&c).await.test_webhook(request).await.expect("test").into_inner();
    assert_eq!((test.status, test.error.as_str()), (204, ""));
    assert!(live.types().contains(&"ai.alki.webhook.test".to_owned()));
    let metrics = reqwest::Client::new().get(format!("http://{}/metrics", c.registry)).bearer_auth(&c.admin).send();
    let metrics = metrics.await.expect("metrics").text().await.expect("text");
    let value = |line: &str| {
        metrics.lines().find(|l| l.starts_with(line)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert!(value("alki_webhook_deliveries_total").is_some_and(|n| n > 0.0), "{metrics}");
    assert_eq!(value(&format!("alki_webhook_pending_events{{webhook=\"{}\"}}", hook.id)), Some(0.0), "{metrics}");
    c.shutdown().await;
}

#[tokio::test]
async fn watchers_follow_a_rollout_to_its_end_and_resume_after_an_event_id() {
    let c = start(tempfile::tempdir().expect("tempdir")).await;
    push_bundle(&c, "v1", 1).await;
    let viewer = create_token(&c, "dashboard", proto::Role::Viewer).await;
    let agent_token = create_token(&c, "pi-1", proto::Role::Agent).await;

    let request = with_token(
        &viewer,
        proto::WatchDevicesRequest { after_event_id: 0, selector: [("site".to_owned(), "lab".to_owned())].into() },
    );
    let mut devices = events(&c).await.watch_devices(request).await.expect("watch devices").into_inner();
    let mut pi = agent(&c, &agent_token, "pi-1").await;
    let online = tokio::time::timeout(TIMEOUT, devices.message()).await.expect("in time").expect("ok").expect("one");
    let event = online.event.expect("event");
    assert_eq!((event.r#type.as_str(), event.device_id.as_str()), ("device.online", "pi-1"));
    assert!(online.device.is_some_and(|d| d.connected));

    let rollout = create_lab_rollout(&c, &mut fleet(&c).await).await;
    let request = with_token(&viewer, proto::WatchRolloutRequest { id: rollout.id.clone(), after_event_id: 0 });
    let mut updates = events(&c).await.watch_rollout(request).await.expect("watch").into_inner();
    let first = updates.message().await.expect("ok").expect("the rollout as it is");
    assert!(first.event.is_none() && first.rollout.is_some_and(|r| r.id == rollout.id));
    let Msg::DesiredState(desired) = pi.next().await else { panic!("expected a desired state") };
    let active = proto::Status {
        generation: desired.generation,
        phase: proto::Phase::Active as i32,
        serving: desired.bundle.clone(),
        ..Default::default()
    };
    pi.report(active).await;
    let mut seen = Vec::new();
    let ended = tokio::time::timeout(TIMEOUT, async {
        while let Some(update) = updates.message().await.expect("ok") {
            seen.push(update);
        }
    });
    ended.await.expect("the watch ends when the rollout does");
    let kinds: Vec<String> = seen.iter().filter_map(|u| u.event.as_ref()).map(|e| e.r#type.clone()).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("rollout.created"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("rollout.completed"), "{kinds:?}");
    assert!(seen.last().and_then(|u| u.rollout.as_ref()).is_some_and(completed));
    let started =
        seen.iter().filter_map(|u| u.event.as_ref()).find(|e| e.r#type == "rollout.started").expect("started");

    // Resumed after an event: only what came later, then the end (the rollout is over).
    let request =
        with_token(&viewer, proto::WatchRolloutRequest { id: rollout.id.clone(), after_event_id: started.id });
    let mut resumed = events(&c).await.watch_rollout(request).await.expect("watch").into_inner();
    let mut later = Vec::new();
    while let Some(update) = tokio::time::timeout(TIMEOUT, resumed.message()).await.expect("in time").expect("ok") {
        later.extend(update.event);
    }
    assert!(!later.is_empty() && later.iter().all(|e| e.id > started.id), "{later:?}");
    assert_eq!(later.last().map(|e| e.r#type.as_str()), Some("rollout.completed"));
    let missing = proto::WatchRolloutRequest { id: "ro-none".into(), after_event_id: 0 };
    let err = events(&c).await.watch_rollout(with_token(&viewer, missing)).await.expect_err("no such rollout");
    assert_eq!(err.code(), tonic::Code::NotFound);

    // The same log as Server-Sent Events, resumed from Last-Event-ID as an EventSource does.
    let url = format!("http://{}/api/v1/events/stream?rollout={}", c.registry, rollout.id);
    let client = reqwest::Client::new();
    let unauthenticated = client.get(&url).send().await.expect("request");
    assert_eq!(unauthenticated.status(), reqwest::StatusCode::UNAUTHORIZED);
    let mut sse = client
        .get(&url)
        .bearer_auth(&viewer)
        .header("last-event-id", started.id.to_string())
        .send()
        .await
        .expect("stream");
    assert_eq!(sse.status(), reqwest::StatusCode::OK);
    assert!(sse.headers()["content-type"].to_str().unwrap_or_default().starts_with("text/event-stream"));
    let mut text = String::new();
    tokio::time::timeout(TIMEOUT, async {
        while !text.contains("event: rollout.completed") {
            let chunk = sse.chunk().await.expect("chunk").expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the completed event arrives as SSE");
    let sse_ids: Vec<u64> =
        text.lines().filter_map(|l| l.strip_prefix("id: ")).filter_map(|v| v.parse().ok()).collect();
    assert_eq!(sse_ids, later.iter().map(|e| e.id).collect::<Vec<_>>(), "{text}");
    let list = client
        .get(format!("http://{}/api/v1/events?types=device.&limit=10", c.registry))
        .bearer_auth(&viewer)
        .send()
        .await
        .expect("list");
    let list: serde_json::Value = list.json().await.expect("json");
    let types: Vec<&str> =
        list["events"].as_array().expect("events").iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(types.contains(&"device.online") && types.iter().all(|t| t.starts_with("device.")), "{types:?}");

    drop(pi);
    // The rollout activated the candidate on pi-1 meanwhile (device.activated); then its session ended.
    let offline = tokio::time::timeout(TIMEOUT, async {
        loop {
            let update = devices.message().await.expect("ok").expect("one");
            let kind = update.event.map(|e| e.r#type).unwrap_or_default();
            if kind != "device.activated" {
                return kind;
            }
        }
    })
    .await
    .expect("in time");
    assert_eq!(offline, "device.offline");
    drop(devices);
    c.shutdown().await;
}
