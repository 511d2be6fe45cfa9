//! The web console's server side on a real controller (127.0.0.1:0, a manual clock): its files are public
//! with a strict CSP; a login turns a token into an http-only, same-site session cookie that the JSON API
//! and the event stream accept; a change through a session needs its CSRF token and the role; a revoked
//! token, an expired session and a logout each end it; and the console's reads (summary, device pages,
//! rollout devices, trends) answer from the store.

use std::time::Duration;

use alki_controller::config::ControllerConfig;
use alki_controller::store::{Keyed, Rollup, Store};
use alki_shared::clock::{ManualClock, UnixMs};
use alki_shared::ids::DeviceId;
use alki_shared::proto::{self, admin_service_client::AdminServiceClient, fleet_service_client::FleetServiceClient};
use reqwest::StatusCode;

mod common;

const TIMEOUT: Duration = Duration::from_secs(30);
const NOW: i64 = 1_800_000_000_000;
const TTL: Duration = Duration::from_secs(3600);

struct Controller {
    grpc: String,
    http: String,
    admin: String,
    clock: std::sync::Arc<ManualClock>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(seed: impl FnOnce(&Store)) -> Controller {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("store");
        seed(&store);
    }
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(dir.path().to_owned());
    // Plaintext on loopback, as the other in-process tests (the cookie is then not marked Secure).
    config.insecure_plaintext = true;
    config.console_session_ttl = TTL;
    let clock = ManualClock::starting_at(UnixMs(NOW));
    let task = tokio::spawn(alki_controller::server::serve_with_clock(
        alki_controller::Listeners { grpc, http },
        config,
        clock.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let admin = common::admin_token(dir.path()).await;
    Controller {
        grpc: format!("http://{grpc_addr}"),
        http: format!("http://{http_addr}"),
        admin,
        clock,
        stop: Some(stop),
        task,
        _dir: dir,
    }
}

/// A logged-in console: its cookie and CSRF token.
struct Login {
    cookie: String,
    csrf: String,
    role: String,
}

impl Controller {
    fn req<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", format!("Bearer {}", self.admin).parse().expect("header"));
        request
    }

    async fn token(&self, name: &str, role: proto::Role) -> String {
        let mut fleet = FleetServiceClient::connect(self.grpc.clone()).await.expect("connect");
        let request =
            self.req(proto::CreateTokenRequest { name: name.into(), role: role as i32, repositories: vec![] });
        fleet.create_token(request).await.expect("token").into_inner().token
    }

    async fn revoke(&self, name: &str) {
        let mut admin = AdminServiceClient::connect(self.grpc.clone()).await.expect("connect");
        admin.revoke_token(self.req(proto::RevokeTokenRequest { token: name.into() })).await.expect("revoke");
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> reqwest::Response {
        let mut request = Self::client().get(format!("{}{path}", self.http));
        if let Some(c) = cookie {
            request = request.header("cookie", c);
        }
        request.send().await.expect("http request")
    }

    async fn post(&self, path: &str, cookie: Option<&str>, csrf: Option<&str>, body: &str) -> reqwest::Response {
        let mut request = Self::client().post(format!("{}{path}", self.http)).body(body.to_owned());
        if let Some(c) = cookie {
            request = request.header("cookie", c);
        }
        if let Some(t) = csrf {
            request = request.header("x-alki-csrf", t);
        }
        request.send().await.expect("http request")
    }

    async fn login(&self, token: &str) -> Login {
        let response = self.post("/ui/login", None, None, &serde_json::json!({ "token": token }).to_string()).await;
        assert_eq!(response.status(), StatusCode::OK, "login");
        let set = response.headers().get("set-cookie").and_then(|v| v.to_str().ok()).expect("set-cookie").to_owned();
        for part in ["HttpOnly", "SameSite=Strict", "Path=/", &format!("Max-Age={}", TTL.as_secs())] {
            assert!(set.contains(part), "{set} lacks {part}");
        }
        let cookie = set.split(';').next().expect("cookie pair").to_owned();
        let body: serde_json::Value = response.json().await.expect("session json");
        Login {
            cookie,
            csrf: body["csrf"].as_str().expect("csrf").to_owned(),
            role: body["role"].as_str().expect("role").to_owned(),
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(TIMEOUT, &mut self.task).await.expect("shuts down").expect("join").expect("serve ok");
    }
}

fn seed(store: &Store) {
    for (id, class, digest, phase) in [
        ("pi-1", "pi5-8g", "sha256:a", proto::Phase::Active),
        ("pi-2", "pi5-8g", "sha256:b", proto::Phase::Failed),
        ("orin-1", "orin-nano", "", proto::Phase::Idle),
    ] {
        store
            .update_device(&DeviceId::new(id).expect("id"), |d| {
                d.labels.insert("site".into(), "lab".into());
                d.inventory = Some(proto::Inventory { hardware_class: class.into(), ..Default::default() });
                d.running =
                    (!digest.is_empty()).then(|| proto::BundleRef { digest: digest.into(), ..Default::default() });
                d.phase = phase as i32;
            })
            .expect("device");
    }
    let rollout = proto::Rollout {
        id: "ro-done".into(),
        state: proto::RolloutState::Completed as i32,
        spec: Some(proto::RolloutSpec {
            steps: vec![proto::RolloutStep { percent: 100, min_soak_seconds: 0 }],
            ..Default::default()
        }),
        ..Default::default()
    };
    store.put_rollout(&Keyed::new(rollout).expect("rollout id")).expect("rollout");
    let bucket = NOW - NOW.rem_euclid(300_000) - 300_000;
    let rollup = Rollup {
        bucket_unix_ms: bucket,
        class: "pi5-8g".into(),
        bundle_digest: "sha256:a".into(),
        reports: 2,
        tokens_per_second_sum: 30.0,
        tokens_per_second_count: 2,
        tokens_per_second_min: 10.0,
        tokens_per_second_max: 20.0,
        ..Default::default()
    };
    store.flush_rollups(&[rollup], UnixMs(0)).expect("rollups");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consoles_files_are_public_and_locked_down() {
    common::bounded(async {
        let c = start(|_| {}).await;
        let page = c.get("/ui/", None).await;
        assert_eq!(page.status(), StatusCode::OK);
        let csp = page.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(page.headers().get("x-content-type-options").map(|v| v.as_bytes()), Some(&b"nosniff"[..]));
        let etag = page.headers().get("etag").cloned().expect("etag");
        assert!(page.text().await.expect("html").contains("app.js"), "the page loads the app");
        let script = c.get("/ui/app.js", None).await;
        assert_eq!(script.status(), StatusCode::OK);
        let kind = script.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(kind.contains("javascript"), "{kind}");
        let revalidated =
            C::client().get(format!("{}/ui/", c.http)).header("if-none-match", etag).send().await.expect("revalidate");
        assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(c.get("/ui/no-such-file.js", None).await.status(), StatusCode::NOT_FOUND);
        let root = c.get("/", None).await;
        assert!(root.status().is_redirection());
        assert_eq!(root.headers().get("location").map(|v| v.as_bytes()), Some(&b"/ui/"[..]));
        // Who is logged in is not public; and no Basic challenge, which would make a browser stall the
        // console's call on its own password dialog.
        let anonymous = c.get("/ui/session", None).await;
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
        assert!(anonymous.headers().get("www-authenticate").is_none());
        c.shutdown().await;
    })
    .await;
}

type C = Controller;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stands_for_its_token_until_revoked_expired_or_logged_out() {
    common::bounded(async {
        let c = start(seed).await;
        let bad = c.post("/ui/login", None, None, r#"{"token":"alki_nope"}"#).await;
        assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
        let body: serde_json::Value = bad.json().await.expect("json");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("not a valid token")), "{body}");
        assert_eq!(c.post("/ui/login", None, None, "token=x").await.status(), StatusCode::BAD_REQUEST);
        let push = {
            let mut fleet = FleetServiceClient::connect(c.grpc.clone()).await.expect("connect");
            let request = c.req(proto::CreateTokenRequest {
                name: "ci".into(),
                role: proto::Role::Push as i32,
                repositories: vec!["acme/*".into()],
            });
            fleet.create_token(request).await.expect("token").into_inner().token
        };
        let refused = c.post("/ui/login", None, None, &serde_json::json!({ "token": push }).to_string()).await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "a push token may not read the fleet");

        // A viewer reads through its session, and is refused changes even with the CSRF token.
        let viewer = c.login(&c.token("alice", proto::Role::Viewer).await).await;
        assert_eq!(viewer.role, "viewer");
        let who: serde_json::Value =
            c.get("/ui/session", Some(&viewer.cookie)).await.json().await.expect("session json");
        assert_eq!((who["name"].as_str(), who["role"].as_str()), (Some("alice"), Some("viewer")));
        assert_eq!(c.get("/api/v1/devices", Some(&viewer.cookie)).await.status(), StatusCode::OK);
        let pause = "/api/v1/rollouts/ro-done/pause";
        let forbidden = c.post(pause, Some(&viewer.cookie), Some(&viewer.csrf), "").await;
        assert_eq!(forbidden.status(), StatusCode::FORBIDDEN, "a viewer's session changes nothing");

        // An operator's change needs the session's CSRF token: a cross-site form cannot send it.
        let operator = c.login(&c.token("bob", proto::Role::Operator).await).await;
        let no_csrf = c.post(pause, Some(&operator.cookie), None, "").await;
        assert_eq!(no_csrf.status(), StatusCode::FORBIDDEN);
        let body: serde_json::Value = no_csrf.json().await.expect("json");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("x-alki-csrf")), "{body}");
        let wrong = c.post(pause, Some(&operator.cookie), Some(&viewer.csrf), "").await;
        assert_eq!(wrong.status(), StatusCode::FORBIDDEN, "another session's CSRF token");
        let applied = c.post(pause, Some(&operator.cookie), Some(&operator.csrf), r#"{"reason":"look"}"#).await;
        assert_eq!(applied.status(), StatusCode::CONFLICT, "the handler ran: a completed rollout cannot pause");
        let bad_verb =
            c.post("/api/v1/rollouts/ro-done/explode", Some(&operator.cookie), Some(&operator.csrf), "").await;
        assert_eq!(bad_verb.status(), StatusCode::NOT_FOUND);

        // The event stream accepts the session; the console asks for unnamed messages, which one EventSource
        // listener gets whatever their type (the seeded devices' activations come first).
        let mut stream = c.get("/api/v1/events/stream?named=false", Some(&viewer.cookie)).await;
        assert_eq!(stream.status(), StatusCode::OK);
        let mut text = String::new();
        while !text.contains("\n\n") {
            let chunk = stream.chunk().await.expect("chunk").expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(text.contains("data: ") && text.contains("device.activated"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("event:")), "unnamed: {text}");
        drop(stream);

        // A revoked token ends its sessions at once.
        c.revoke("alice").await;
        assert_eq!(c.get("/api/v1/devices", Some(&viewer.cookie)).await.status(), StatusCode::UNAUTHORIZED);

        // Logging out ends the session and removes the cookie.
        let out = c.post("/ui/logout", Some(&operator.cookie), Some(&operator.csrf), "").await;
        assert_eq!(out.status(), StatusCode::NO_CONTENT);
        let cleared = out.headers().get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(cleared.contains("Max-Age=0"), "{cleared}");
        assert_eq!(c.get("/ui/session", Some(&operator.cookie)).await.status(), StatusCode::UNAUTHORIZED);

        // A session expires after its time to live.
        let carol = c.login(&c.token("carol", proto::Role::Operator).await).await;
        assert_eq!(c.get("/ui/session", Some(&carol.cookie)).await.status(), StatusCode::OK);
        c.clock.advance(TTL + Duration::from_secs(1));
        let expired = c.get("/ui/session", Some(&carol.cookie)).await;
        assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
        let body: serde_json::Value = expired.json().await.expect("json");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("log in again")), "{body}");

        // A bearer token still works beside a stale cookie: the header wins.
        let with_both = C::client()
            .get(format!("{}/api/v1/summary", c.http))
            .header("cookie", &carol.cookie)
            .bearer_auth(&c.admin)
            .send()
            .await
            .expect("request");
        assert_eq!(with_both.status(), StatusCode::OK);

        // An operator graphs logins: three sessions opened (alice, bob, carol), two logins refused (a bad token, a push token).
        let metrics = C::client()
            .get(format!("{}/metrics", c.http))
            .bearer_auth(&c.admin)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        assert!(metrics.contains("alki_console_logins_total 3\n"), "{metrics}");
        assert!(metrics.contains("alki_console_logins_refused_total 2\n"), "{metrics}");
        assert!(metrics.contains("alki_console_sessions "), "{metrics}");
        c.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consoles_reads_answer_from_the_store() {
    common::bounded(async {
        let c = start(seed).await;
        let admin = c.login(&c.admin).await;
        let json = |path: &'static str| {
            let (c, cookie) = (&c, admin.cookie.clone());
            async move {
                let response = c.get(path, Some(&cookie)).await;
                assert_eq!(response.status(), StatusCode::OK, "{path}");
                response.json::<serde_json::Value>().await.expect("json")
            }
        };
        let summary = json("/api/v1/summary").await;
        assert_eq!(summary["devices"], 3);
        assert_eq!(summary["by_class"]["pi5-8g"], 2);
        assert_eq!(summary["by_bundle"][""], 1, "orin-1 serves nothing");
        assert_eq!(summary["by_phase"][(proto::Phase::Failed as i32).to_string()], 1);
        assert_eq!(summary["labels"]["site"], serde_json::json!(["lab"]));
        assert!(summary["newest_event_id"].as_u64().is_some_and(|id| id >= 2), "the seeded activations: {summary}");

        let page = json("/api/v1/devices?class=pi5-8g&limit=1").await;
        assert_eq!((page["total"].as_u64(), page["devices"].as_array().map(Vec::len)), (Some(2), Some(1)));
        assert_eq!(page["devices"][0]["id"], "pi-1", "pages run by id");
        let second = json("/api/v1/devices?class=pi5-8g&limit=1&offset=1").await;
        assert_eq!(second["devices"][0]["id"], "pi-2");
        assert_eq!(json("/api/v1/devices?bundle=none").await["devices"][0]["id"], "orin-1");
        assert_eq!(json("/api/v1/devices?phase=6").await["total"], 1);
        assert_eq!(json("/api/v1/devices?q=orin").await["total"], 1);
        assert_eq!(c.get("/api/v1/devices?phase=active", Some(&admin.cookie)).await.status(), StatusCode::BAD_REQUEST);

        // A device's history, newest first: its activation was recorded with its record.
        let history = json("/api/v1/events?device=pi-2&order=newest&limit=5").await;
        let types: Vec<&str> =
            history["events"].as_array().expect("events").iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(types, ["device.activated", "device.failed"], "{history}");

        assert_eq!(json("/api/v1/rollouts/ro-done/devices").await["devices"], serde_json::json!([]));
        assert_eq!(
            c.get("/api/v1/rollouts/ro-nope/devices", Some(&admin.cookie)).await.status(),
            StatusCode::NOT_FOUND
        );

        let trends = json("/api/v1/trends").await;
        let buckets = trends["buckets"].as_array().expect("buckets");
        assert_eq!(buckets.len(), 1, "{trends}");
        assert_eq!(buckets[0]["tokens_per_second_mean"], 15.0);
        assert_eq!(json("/api/v1/trends?class=orin-nano").await["buckets"], serde_json::json!([]));
        let future = format!("/api/v1/trends?since={}", NOW + 3_600_000);
        let none: serde_json::Value = c.get(&future, Some(&admin.cookie)).await.json().await.expect("json");
        assert_eq!(none["buckets"], serde_json::json!([]));
        c.shutdown().await;
    })
    .await;
}
