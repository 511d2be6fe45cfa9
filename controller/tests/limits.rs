//! Limits on every input and hostile input, against a real controller on 127.0.0.1:0: message sizes, label
//! counts and lengths, token names, request rates per token and per device; registry paths that try to
//! climb out of the data directory, and oversized or malformed manifests. Each is refused with a clear
//! error and leaves no trace.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use alki_controller::config::ControllerConfig;
use alki_controller::limits::{Limits, MAX_LABELS, Rate};
use alki_controller::registry::RegistryConfig;
use alki_shared::proto::{
    self, AgentMessage, agent_message, agent_service_client::AgentServiceClient,
    fleet_service_client::FleetServiceClient,
};
use reqwest::{Method, StatusCode};
use tonic::Code;
use tonic::transport::Channel;

struct Controller {
    _dir: tempfile::TempDir,
    grpc: Channel,
    http: String,
    admin: String,
    _task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(limits: Limits) -> Controller {
    let dir = tempfile::tempdir().expect("tempdir");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let mut config = ControllerConfig::new(dir.path().to_owned());
    config.insecure_plaintext = true;
    config.insecure_agent_tokens = true;
    config.limits = limits;
    let task = tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        std::future::pending::<()>().await
    }));
    let token_path = dir.path().join("admin.token");
    let admin = loop {
        if let Ok(t) = tokio::fs::read_to_string(&token_path).await
            && !t.trim().is_empty()
        {
            break t.trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let channel = loop {
        if let Ok(c) = Channel::from_shared(format!("http://{grpc_addr}")).expect("uri").connect().await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Controller { _dir: dir, grpc: channel, http: format!("http://{http_addr}"), admin, _task: task }
}

fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    request
}

impl Controller {
    fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(self.grpc.clone()).max_encoding_message_size(64 << 20)
    }

    async fn token(&self, name: &str, role: proto::Role) -> String {
        let request = proto::CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            repositories: if role == proto::Role::Push { vec!["*".into()] } else { vec![] },
        };
        self.fleet().create_token(authed(&self.admin, request)).await.expect("token").into_inner().token
    }

    async fn state(&self) -> String {
        let mut fleet = self.fleet();
        let devices = fleet.list_devices(authed(&self.admin, proto::ListDevicesRequest::default())).await;
        let rollouts = fleet.list_rollouts(authed(&self.admin, proto::ListRolloutsRequest {})).await;
        let tokens = proto::admin_service_client::AdminServiceClient::new(self.grpc.clone())
            .list_tokens(authed(&self.admin, proto::ListTokensRequest {}))
            .await;
        format!(
            "{:?}\n{:?}\n{:?}",
            devices.expect("devices").into_inner(),
            rollouts.expect("rollouts").into_inner(),
            tokens.expect("tokens").into_inner()
        )
    }
}

fn relaxed() -> Limits {
    Limits { token_rate: Rate { per_second: 1000.0, burst: 10_000 }, ..Limits::default() }
}

fn hello(device: &str, labels: HashMap<String, String>) -> AgentMessage {
    let hello = proto::Hello { device_id: device.into(), labels, agent_version: "test".into(), ..Default::default() };
    AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }
}

async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), test).await.expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_grpc_messages_are_refused_without_a_state_change() {
    bounded(async {
        let limits = Limits { grpc_max_message: 64 << 10, session_max_message: 32 << 10, ..relaxed() };
        let c = start(limits).await;
        let before = c.state().await;
        // A state-changing call (read by the gate to name its target) and a read (decoded by tonic).
        let big_name = "a".repeat(100 << 10);
        let request =
            proto::CreateTokenRequest { name: big_name, role: proto::Role::Viewer as i32, ..Default::default() };
        let refused = c.fleet().create_token(authed(&c.admin, request)).await.expect_err("too large");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains("limit"), "{}", refused.message());
        let selector: HashMap<String, String> = [("k".to_owned(), "v".repeat(100 << 10))].into();
        let refused = c
            .fleet()
            .list_devices(authed(&c.admin, proto::ListDevicesRequest { selector }))
            .await
            .expect_err("too large");
        assert!(matches!(refused.code(), Code::ResourceExhausted | Code::OutOfRange), "{refused:?}");

        // An agent's Hello above the session limit.
        let agent = c.token("pi", proto::Role::Agent).await;
        let before_session = c.state().await;
        let labels: HashMap<String, String> = [("blob".to_owned(), "x".repeat(40 << 10))].into();
        let outbound = tokio_stream::iter(vec![hello("pi-big", labels)]);
        let mut client = AgentServiceClient::new(c.grpc.clone()).max_encoding_message_size(64 << 20);
        let result = match client.session(authed(&agent, outbound)).await {
            Err(status) => status,
            Ok(response) => response.into_inner().message().await.expect_err("refused"),
        };
        assert!(matches!(result.code(), Code::ResourceExhausted | Code::OutOfRange), "{result:?}");
        assert_eq!(c.state().await, before_session, "nothing recorded for the oversized Hello");
        assert_ne!(before, before_session, "(only the agent token was added)");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_and_token_names_are_bounded() {
    bounded(async {
        let c = start(relaxed()).await;
        let agent = c.token("pi", proto::Role::Agent).await;
        let before = c.state().await;

        // Hello with too many labels, and with a key that is not a label key.
        let many: HashMap<String, String> = (0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".into())).collect();
        let bad_key: HashMap<String, String> = [("no spaces".to_owned(), "v".into())].into();
        for labels in [many.clone(), bad_key] {
            let outbound = tokio_stream::iter(vec![hello("pi-labels", labels)]);
            let mut client = AgentServiceClient::new(c.grpc.clone());
            let status = match client.session(authed(&agent, outbound)).await {
                Err(status) => status,
                Ok(response) => response.into_inner().message().await.expect_err("refused"),
            };
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("Hello labels"), "{}", status.message());
        }

        // A rollout selector with too many labels.
        let spec = proto::RolloutSpec {
            repository: "acme/qwen".into(),
            candidate: "latest".into(),
            selector: many,
            ..Default::default()
        };
        let request = proto::CreateRolloutRequest { spec: Some(spec), ..Default::default() };
        let status = c.fleet().create_rollout(authed(&c.admin, request)).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("rollout selector"), "{}", status.message());

        // Token names: empty, too long, and characters that would confuse logs and tables.
        for name in [String::new(), "n".repeat(129), "ci\nadmin".into(), "a b".into()] {
            let request = proto::CreateTokenRequest {
                name: name.clone(),
                role: proto::Role::Viewer as i32,
                ..Default::default()
            };
            let status = c.fleet().create_token(authed(&c.admin, request)).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{name:?}");
        }
        assert_eq!(c.state().await, before, "no device, rollout or token was created");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_is_rate_limited_on_grpc_and_the_registry() {
    bounded(async {
        // Nearly no refill: the burst is all a token gets during the test.
        let limits = Limits { token_rate: Rate { per_second: 0.001, burst: 4 }, ..Limits::default() };
        let c = start(limits).await;
        let mut fleet = c.fleet();
        // The admin spends 2 of its 4 creating tokens.
        let viewer = c.token("viewer", proto::Role::Viewer).await;
        let push = c.token("push", proto::Role::Push).await;
        for _ in 0..4 {
            fleet.list_rollouts(authed(&viewer, proto::ListRolloutsRequest {})).await.expect("within the burst");
        }
        let refused = fleet.list_rollouts(authed(&viewer, proto::ListRolloutsRequest {})).await.expect_err("over");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("token:viewer"), "{}", refused.message());

        let client = reqwest::Client::new();
        for _ in 0..4 {
            let ok = client.get(format!("{}/v2/", c.http)).bearer_auth(&push).send().await.expect("send");
            assert_eq!(ok.status(), StatusCode::OK);
        }
        let over = client.get(format!("{}/v2/", c.http)).bearer_auth(&push).send().await.expect("send");
        assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(over.headers().contains_key("retry-after"));
        let body: serde_json::Value = over.json().await.expect("json");
        assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
        // Other tokens keep their own budget.
        fleet.list_rollouts(authed(&c.admin, proto::ListRolloutsRequest {})).await.expect("admin unaffected");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_is_rate_limited_on_its_session() {
    bounded(async {
        let limits = Limits { device_rate: Rate { per_second: 0.001, burst: 3 }, ..relaxed() };
        let c = start(limits).await;
        let agent = c.token("fleet", proto::Role::Agent).await;
        // The session open takes one; two heartbeats pass; the third message ends the session.
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(hello("pi-chatty", HashMap::new())).await.expect("send");
        let mut client = AgentServiceClient::new(c.grpc.clone());
        let mut inbound = client
            .session(authed(&agent, tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .expect("session")
            .into_inner();
        inbound.message().await.expect("welcome").expect("a message");
        let beat = || AgentMessage { msg: Some(agent_message::Msg::Heartbeat(proto::Heartbeat::default())) };
        for _ in 0..3 {
            tx.send(beat()).await.expect("send");
        }
        let ended = loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the session ended without saying why"),
                Err(status) => break status,
            }
        };
        assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
        assert!(ended.message().contains("pi-chatty"), "{}", ended.message());

        // Its next session is refused too; another device is unaffected.
        let again = client.session(authed(&agent, tokio_stream::iter(vec![hello("pi-chatty", HashMap::new())]))).await;
        let status = match again {
            Err(status) => status,
            Ok(response) => response.into_inner().message().await.expect_err("refused"),
        };
        assert_eq!(status.code(), Code::ResourceExhausted);
        let (tx2, rx2) = tokio::sync::mpsc::channel(1);
        tx2.send(hello("pi-quiet", HashMap::new())).await.expect("send");
        let mut other = client
            .session(authed(&agent, tokio_stream::wrappers::ReceiverStream::new(rx2)))
            .await
            .expect("other device")
            .into_inner();
        other.message().await.expect("welcome").expect("a message");
    })
    .await;
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != "controller.redb") {
                out.push(path.display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn registry_paths_that_climb_out_are_refused_and_write_nothing() {
    common::bounded(async {
        let h = common::start().await;
        let outside = h.dir.path().parent().expect("parent").join("escaped");
        let before = files_under(h.dir.path());
        for (method, path) in [
            (Method::POST, "/v2/..%2F..%2Fescaped/blobs/uploads/"),
            (Method::POST, "/v2/acme/%2E%2E/blobs/uploads/"),
            (Method::PUT, "/v2/acme/qwen/manifests/..%2F..%2Fescaped"),
            (Method::PATCH, "/v2/acme/qwen/blobs/uploads/..%2F..%2Fescaped"),
            (Method::PUT, "/v2/acme/qwen/blobs/uploads/../../../escaped?digest=sha256:00"),
            (Method::GET, "/v2/acme/qwen/blobs/sha256:..%2F..%2Fcontroller.redb"),
            (Method::DELETE, "/v2/acme/qwen/manifests/sha256:..%2F..%2Fcontroller.redb"),
        ] {
            let resp = h
                .req(method.clone(), path)
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body("{}")
                .send()
                .await
                .expect("send");
            let status = resp.status();
            assert!(status.is_client_error(), "{method} {path}: {status}");
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            let code = body["errors"][0]["code"].as_str().unwrap_or_default().to_owned();
            assert!(!code.is_empty(), "{method} {path}: the error names its code");
        }
        assert_eq!(files_under(h.dir.path()), before, "no file was created or removed");
        assert!(!outside.exists());
    })
    .await;
}

#[tokio::test]
async fn oversized_and_malformed_manifests_are_refused_and_store_nothing() {
    common::bounded(async {
        let h = common::start_with(RegistryConfig { max_manifest_bytes: 4096, ..RegistryConfig::default() }).await;
        let config = h.push_blob("acme/qwen", b"{}").await;
        let manifest_type = "application/vnd.oci.image.manifest.v1+json";
        let padding = "x".repeat(8192);
        let oversized = format!(
            r#"{{"schemaVersion":2,"mediaType":"{manifest_type}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":2}},"layers":[],"annotations":{{"pad":"{padding}"}}}}"#
        );
        let missing = format!("sha256:{}", "1".repeat(64));
        let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
            ("oversized", oversized.into_bytes(), StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
            ("not JSON", b"{\"schemaVersion\":2,".to_vec(), StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            ("wrong schema", br#"{"schemaVersion":1,"layers":[]}"#.to_vec(), StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
            (
                "lying size",
                format!(
                    r#"{{"schemaVersion":2,"mediaType":"{manifest_type}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":-5}},"layers":[]}}"#
                )
                .into_bytes(),
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
            ),
            (
                "missing blob",
                format!(
                    r#"{{"schemaVersion":2,"mediaType":"{manifest_type}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{missing}","size":2}},"layers":[]}}"#
                )
                .into_bytes(),
                StatusCode::BAD_REQUEST,
                "MANIFEST_BLOB_UNKNOWN",
            ),
        ];
        for (what, body, status, code) in cases {
            let resp = h.put_manifest("acme/qwen", "v1", manifest_type, &body).await;
            assert_eq!(resp.status(), status, "{what}");
            let err: serde_json::Value = resp.json().await.expect("error body");
            assert_eq!(err["errors"][0]["code"], code, "{what}: {err}");
            let get = h.req(Method::GET, "/v2/acme/qwen/manifests/v1").send().await.expect("get");
            assert_eq!(get.status(), StatusCode::NOT_FOUND, "{what}: nothing was stored");
        }
        let tags = h.req(Method::GET, "/v2/acme/qwen/tags/list").send().await.expect("tags");
        let tags: serde_json::Value = tags.json().await.unwrap_or_default();
        assert!(tags["tags"].as_array().is_none_or(|t| t.is_empty()), "{tags}");
    })
    .await;
}
