//! Every gRPC method and HTTP route refuses callers without the right credential (no token, a garbage
//! token, a revoked admin token, a token of the wrong role), except `/healthz` and `/readyz`; and the right
//! credential is let through. The lists are derived, not written down: gRPC methods come from the proto
//! descriptors compiled into `alki-shared`, HTTP routes from every `.route("…", …)` in the controller's
//! source, so a method or route added later is covered the moment it exists.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use alki_controller::auth::{Access, Action, Policy, Role, grpc_policy, http_policy};
use alki_controller::config::ControllerConfig;
use alki_shared::proto::{self, admin_service_client::AdminServiceClient, fleet_service_client::FleetServiceClient};
use prost::Message as _;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(120);

struct Controller {
    _dir: tempfile::TempDir,
    grpc: String,
    http: String,
    admin: String,
    _task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start() -> Controller {
    let dir = tempfile::tempdir().expect("tempdir");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let mut config = ControllerConfig::new(dir.path().to_owned());
    // Authorization is what is under test; TLS has its own tests.
    config.insecure_plaintext = true;
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
    Controller {
        _dir: dir,
        grpc: format!("http://{grpc_addr}"),
        http: format!("http://{http_addr}"),
        admin,
        _task: task,
    }
}

fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    request
}

async fn channel(addr: &str) -> Channel {
    for _ in 0..200 {
        if let Ok(channel) = Channel::from_shared(addr.to_owned()).expect("uri").connect().await {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("controller at {addr} did not come up");
}

/// Passes request and response messages through as bytes, so one client calls any method.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// Calls `path` with one message and returns how the call ended.
async fn call(channel: &Channel, path: &str, token: Option<&str>, message: Vec<u8>) -> (Code, String) {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(tokio_stream::once(message));
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    }
    let path = http::uri::PathAndQuery::from_str(path).expect("path");
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        match grpc.streaming(request, path, Raw).await {
            Err(status) => (status.code(), status.message().to_owned()),
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return (Code::Ok, String::new()),
                        Err(status) => return (status.code(), status.message().to_owned()),
                    }
                }
            }
        }
    })
    .await;
    // A stream that stays open (a session that was admitted) is an answer too.
    outcome.unwrap_or((Code::Ok, "still open".into()))
}

/// Every `/alki.v1.Service/Method` in the compiled proto files.
fn grpc_methods() -> Vec<String> {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                methods.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
            }
        }
    }
    methods.sort();
    methods
}

/// A role whose token may not do `action`, if any role lacks it.
fn wrong_role(action: Action) -> Option<Role> {
    [Role::Viewer, Role::Push, Role::Agent, Role::Operator].into_iter().find(|r| !r.allows(action))
}

/// A role whose token may do `action`.
fn right_role(action: Action) -> Role {
    [Role::Viewer, Role::Push, Role::Agent, Role::Operator, Role::Admin]
        .into_iter()
        .find(|r| r.allows(action))
        .expect("admin may do everything")
}

struct Tokens {
    admin: String,
    revoked_admin: String,
    by_role: Vec<(Role, String)>,
}

impl Tokens {
    fn of(&self, role: Role) -> &str {
        if role == Role::Admin {
            return &self.admin;
        }
        self.by_role.iter().find(|(r, _)| *r == role).map(|(_, t)| t.as_str()).expect("token for role")
    }
}

async fn tokens(channel: &Channel, admin: &str) -> Tokens {
    let mut fleet = FleetServiceClient::new(channel.clone());
    let mut by_role = Vec::new();
    for (name, role) in [
        ("viewer", proto::Role::Viewer),
        ("operator", proto::Role::Operator),
        ("push", proto::Role::Push),
        ("agent", proto::Role::Agent),
    ] {
        let created = fleet
            .create_token(authed(
                admin,
                proto::CreateTokenRequest {
                    name: name.into(),
                    role: role as i32,
                    repositories: if role == proto::Role::Push { vec!["*".into()] } else { vec![] },
                },
            ))
            .await
            .expect("create token")
            .into_inner();
        by_role.push((Role::from_proto(role).expect("role"), created.token));
    }
    let revoked_admin = fleet
        .create_token(authed(
            admin,
            proto::CreateTokenRequest {
                name: "former-admin".into(),
                role: proto::Role::Admin as i32,
                ..Default::default()
            },
        ))
        .await
        .expect("create token")
        .into_inner()
        .token;
    AdminServiceClient::new(channel.clone())
        .revoke_token(authed(admin, proto::RevokeTokenRequest { token: "former-admin".into() }))
        .await
        .expect("revoke");
    Tokens { admin: admin.to_owned(), revoked_admin, by_role }
}

/// What the fleet holds, to show refused calls changed nothing.
async fn snapshot(channel: &Channel, admin: &str) -> String {
    let mut fleet = FleetServiceClient::new(channel.clone());
    let devices = fleet.list_devices(authed(admin, proto::ListDevicesRequest::default())).await.expect("devices");
    let rollouts = fleet.list_rollouts(authed(admin, proto::ListRolloutsRequest {})).await.expect("rollouts");
    let tokens = AdminServiceClient::new(channel.clone()).list_tokens(authed(admin, proto::ListTokensRequest {})).await;
    format!("{:?}\n{:?}\n{:?}", devices.into_inner(), rollouts.into_inner(), tokens.expect("tokens").into_inner())
}

/// `PermissionDenied` → `PERMISSION_DENIED`, as the audit log writes codes.
fn wire_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

const REFUSED: [Code; 2] = [Code::Unauthenticated, Code::PermissionDenied];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_method_refuses_callers_without_the_right_credential() {
    tokio::time::timeout(TIMEOUT, async {
        let controller = start().await;
        let channel = channel(&controller.grpc).await;
        let tokens = tokens(&channel, &controller.admin).await;
        let before = snapshot(&channel, &controller.admin).await;

        let methods = grpc_methods();
        // The descriptors hold every service this workspace compiles, at least the original three.
        for known in
            ["/alki.v1.AgentService/Session", "/alki.v1.FleetService/CreateRollout", "/alki.v1.AdminService/ListAudit"]
        {
            assert!(methods.iter().any(|m| m == known), "{known} missing from the descriptors: {methods:?}");
        }
        let mut failures = Vec::new();
        for method in &methods {
            let Some(Policy { access, .. }) = grpc_policy(method) else {
                failures.push(format!("{method}: not in auth::grpc_policy (so refused for everyone); add it"));
                continue;
            };
            // An empty message is valid for every type; Enroll gets a device id so only its token is missing.
            let message = if method.ends_with("/Enroll") {
                proto::EnrollRequest { device_id: "authz-probe".into(), ..Default::default() }.encode_to_vec()
            } else {
                Vec::new()
            };
            let mut callers: Vec<(String, Option<&str>)> = vec![
                ("no token".into(), None),
                ("garbage token".into(), Some("alki_not-a-token")),
                ("revoked admin token".into(), Some(tokens.revoked_admin.as_str())),
            ];
            match access {
                Access::Public => failures.push(format!("{method}: public gRPC methods are not allowed")),
                Access::Login => failures.push(format!("{method}: the console login is HTTP only")),
                Access::Token(action) => {
                    if let Some(role) = wrong_role(action) {
                        callers.push((format!("{role:?} token"), Some(tokens.of(role))));
                    }
                }
                // Operator credentials are not a device certificate or a bootstrap token.
                Access::Device | Access::BootstrapToken => {
                    callers.push(("admin token".into(), Some(tokens.admin.as_str())));
                    callers.push(("agent token".into(), Some(tokens.of(Role::Agent))));
                }
            }
            for (who, token) in callers {
                let (code, message_text) = call(&channel, method, token, message.clone()).await;
                if !REFUSED.contains(&code) {
                    failures.push(format!("{method} with {who}: answered {code:?} {message_text:?}"));
                }
            }
            // And the right credential gets past the gate (whatever the handler then says of an empty request).
            if let Access::Token(action) = access {
                let role = right_role(action);
                let (code, message_text) = call(&channel, method, Some(tokens.of(role)), message.clone()).await;
                if REFUSED.contains(&code) {
                    failures.push(format!("{method} with {role:?} token was refused: {code:?} {message_text:?}"));
                }
            }
        }
        assert!(failures.is_empty(), "authorization failures:\n{}", failures.join("\n"));
        assert_eq!(snapshot(&channel, &controller.admin).await, before, "a refused call changed state");
        eprintln!("checked {} gRPC methods", methods.len());
    })
    .await
    .expect("test timed out");
}

/// `(method, path)` for every `.route("…", …)` under controller/src, with parameters filled in.
fn http_routes() -> BTreeSet<(http::Method, String)> {
    let mut routes = BTreeSet::new();
    for (method, template) in http_route_templates() {
        for concrete in concrete_paths(&template) {
            routes.insert((method.clone(), concrete));
        }
    }
    routes
}

/// Every (method, path template) of a `.route("…", …)` in the controller's source.
fn http_route_templates() -> BTreeSet<(http::Method, String)> {
    let mut sources = Vec::new();
    collect_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut sources);
    let mut routes = BTreeSet::new();
    for source in sources {
        let text = std::fs::read_to_string(&source).expect("read source");
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let call = balanced(rest);
            let Some(path) = call.split('"').nth(1) else { continue };
            for method in methods_in(call) {
                routes.insert((method, path.to_owned()));
            }
        }
    }
    routes
}

fn collect_sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text up to the parenthesis closing the one just opened.
fn balanced(text: &str) -> &str {
    let mut depth = 1;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[..i];
                }
            }
            _ => {}
        }
    }
    text
}

/// The HTTP methods a route's method router answers (`get(..)`, `.post(..)`, `any(..)`, ...).
fn methods_in(call: &str) -> Vec<http::Method> {
    use http::Method;
    let all = [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::PATCH, Method::DELETE];
    let mut out = Vec::new();
    for (word, methods) in [
        ("get", vec![Method::GET, Method::HEAD]),
        ("post", vec![Method::POST]),
        ("put", vec![Method::PUT]),
        ("patch", vec![Method::PATCH]),
        ("delete", vec![Method::DELETE]),
        ("head", vec![Method::HEAD]),
        ("any", all.to_vec()),
    ] {
        let mentioned = call
            .match_indices(&format!("{word}("))
            .any(|(i, _)| call[..i].chars().next_back().is_none_or(|c| !(c.is_alphanumeric() || c == '_')));
        if mentioned {
            out.extend(methods);
        }
    }
    out
}

/// Fills `{param}` with a sample; the registry's wildcard gets one path per endpoint.
fn concrete_paths(template: &str) -> Vec<String> {
    let zero = format!("sha256:{}", "0".repeat(64));
    if template == "/ui/{*path}" {
        return vec!["/ui/app.js".to_owned()];
    }
    if let Some(prefix) = template.strip_suffix("{*rest}") {
        return [
            "probe/repo/manifests/latest".to_owned(),
            format!("probe/repo/blobs/{zero}"),
            "probe/repo/blobs/uploads/".to_owned(),
            "probe/repo/blobs/uploads/00000000-0000-0000-0000-000000000000".to_owned(),
            "probe/repo/tags/list".to_owned(),
            format!("probe/repo/referrers/{zero}"),
        ]
        .into_iter()
        .map(|tail| format!("{prefix}{tail}"))
        .collect();
    }
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
        out.push_str("probe");
        rest = &rest[close..];
    }
    out.push_str(rest);
    vec![out]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_route_refuses_callers_without_the_right_credential() {
    tokio::time::timeout(TIMEOUT, async {
        let controller = start().await;
        let channel = channel(&controller.grpc).await;
        let tokens = tokens(&channel, &controller.admin).await;
        let before = snapshot(&channel, &controller.admin).await;
        let client = reqwest::Client::new();

        let routes = http_routes();
        for known in ["/healthz", "/readyz", "/v2/", "/api/v1/registry/gc"] {
            assert!(routes.iter().any(|(_, p)| p == known), "{known} not found in the sources: {routes:?}");
        }
        let mut failures = Vec::new();
        for (method, path) in &routes {
            let url = format!("{}{path}", controller.http);
            let send = |token: Option<&str>| {
                let mut request = client.request(method.clone(), &url).body(Vec::<u8>::new());
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                async move { request.send().await.expect("send").status() }
            };
            let Policy { access, .. } = http_policy(method, path);
            match access {
                Access::Public => {
                    if !send(None).await.is_success() {
                        failures.push(format!("{method} {path}: public route did not answer without a token"));
                    }
                    continue;
                }
                Access::Token(action) => {
                    for (who, token) in [
                        ("no token", None),
                        ("garbage token", Some("alki_not-a-token")),
                        ("revoked admin token", Some(tokens.revoked_admin.as_str())),
                    ] {
                        let status = send(token).await;
                        if status != reqwest::StatusCode::UNAUTHORIZED {
                            failures.push(format!("{method} {path} with {who}: {status}, wanted 401"));
                        }
                    }
                    if let Some(role) = wrong_role(action) {
                        let status = send(Some(tokens.of(role))).await;
                        if status != reqwest::StatusCode::FORBIDDEN {
                            failures.push(format!("{method} {path} with {role:?} token: {status}, wanted 403"));
                        }
                    }
                    let role = right_role(action);
                    let status = send(Some(tokens.of(role))).await;
                    if matches!(status.as_u16(), 401 | 403) {
                        failures.push(format!("{method} {path} with {role:?} token was refused: {status}"));
                    }
                }
                // The console login reads a token from its body: none is a bad request, never a session.
                Access::Login => {
                    let status = send(None).await;
                    if status != reqwest::StatusCode::BAD_REQUEST {
                        failures.push(format!("{method} {path} without a token in the body: {status}, wanted 400"));
                    }
                }
                other => failures.push(format!("{method} {path}: unexpected HTTP access {other:?}")),
            }
        }
        // A path nobody routed is not an open door either.
        let stray = client.get(format!("{}/no/such/page", controller.http)).send().await.expect("send");
        assert_eq!(stray.status(), reqwest::StatusCode::UNAUTHORIZED);
        assert!(failures.is_empty(), "authorization failures:\n{}", failures.join("\n"));
        // The right-role probes above ran garbage collection and nothing else: the fleet is unchanged.
        assert_eq!(snapshot(&channel, &controller.admin).await, before, "a refused request changed state");
        eprintln!("checked {} HTTP method+path pairs", routes.len());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_on_its_next_request_and_listed_as_revoked() {
    tokio::time::timeout(TIMEOUT, async {
        let controller = start().await;
        let channel = channel(&controller.grpc).await;
        let mut fleet = FleetServiceClient::new(channel.clone());
        let mut admin = AdminServiceClient::new(channel.clone());
        let ci = fleet
            .create_token(authed(
                &controller.admin,
                proto::CreateTokenRequest {
                    name: "ci".into(),
                    role: proto::Role::Operator as i32,
                    ..Default::default()
                },
            ))
            .await
            .expect("create")
            .into_inner()
            .token;
        fleet.list_rollouts(authed(&ci, proto::ListRolloutsRequest {})).await.expect("valid before revocation");
        let registry = reqwest::Client::new().get(format!("{}/v2/", controller.http)).bearer_auth(&ci);
        assert_eq!(registry.send().await.expect("send").status(), reqwest::StatusCode::OK);

        let listed = admin.list_tokens(authed(&controller.admin, proto::ListTokensRequest {})).await.expect("list");
        let id = listed.into_inner().tokens.into_iter().find(|t| t.name == "ci").expect("ci listed").id;
        let revoked = admin
            .revoke_token(authed(&controller.admin, proto::RevokeTokenRequest { token: id.clone() }))
            .await
            .expect("revoke")
            .into_inner()
            .token
            .expect("token");
        assert!(revoked.revoked_unix_ms > 0);

        let refused = fleet.list_rollouts(authed(&ci, proto::ListRolloutsRequest {})).await.expect_err("revoked");
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert!(refused.message().contains("revoked"), "{}", refused.message());
        let registry = reqwest::Client::new().get(format!("{}/v2/", controller.http)).bearer_auth(&ci);
        assert_eq!(registry.send().await.expect("send").status(), reqwest::StatusCode::UNAUTHORIZED);

        let listed = admin.list_tokens(authed(&controller.admin, proto::ListTokensRequest {})).await.expect("list");
        let ci_info = listed.into_inner().tokens.into_iter().find(|t| t.id == id).expect("still listed");
        assert!(ci_info.revoked_unix_ms > 0);
        // A name no live token carries is not found; an operator may not revoke.
        let missing = admin
            .revoke_token(authed(&controller.admin, proto::RevokeTokenRequest { token: "nobody".into() }))
            .await
            .expect_err("unknown");
        assert_eq!(missing.code(), Code::NotFound);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_calls_are_audited_with_who_what_target_and_result() {
    tokio::time::timeout(TIMEOUT, async {
        let controller = start().await;
        let channel = channel(&controller.grpc).await;
        let tokens = tokens(&channel, &controller.admin).await;
        let mut fleet = FleetServiceClient::new(channel.clone());
        // A refused rollout (no such bundle), a forbidden one (viewer), and a registry manifest push.
        let spec =
            proto::RolloutSpec { repository: "acme/none".into(), candidate: "latest".into(), ..Default::default() };
        let request = proto::CreateRolloutRequest { spec: Some(spec.clone()), ..Default::default() };
        let failed = fleet.create_rollout(authed(tokens.of(Role::Operator), request.clone())).await.expect_err("none");
        let forbidden = fleet.create_rollout(authed(tokens.of(Role::Viewer), request)).await.expect_err("viewer");
        assert_eq!(forbidden.code(), Code::PermissionDenied);
        let put = reqwest::Client::new()
            .put(format!("{}/v2/acme/none/manifests/latest", controller.http))
            .bearer_auth(tokens.of(Role::Push))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body("{}")
            .send()
            .await
            .expect("send");
        assert_eq!(put.status(), reqwest::StatusCode::BAD_REQUEST);
        // Reads are not audited.
        fleet.list_rollouts(authed(tokens.of(Role::Viewer), proto::ListRolloutsRequest {})).await.expect("read");

        let mut admin = AdminServiceClient::new(channel.clone());
        let entries = admin
            .list_audit(authed(&controller.admin, proto::ListAuditRequest::default()))
            .await
            .expect("audit")
            .into_inner()
            .entries;
        let find = |actor: &str, action: &str| {
            entries.iter().find(|e| e.actor == actor && e.action == action).cloned().unwrap_or_else(|| {
                panic!("no audit entry for {actor} {action}: {entries:#?}");
            })
        };
        let created = find("token:operator", "/alki.v1.FleetService/CreateRollout");
        assert_eq!(created.target, "acme/none:latest");
        assert_eq!(created.result, wire_name(failed.code()), "{failed:?}");
        assert_eq!(created.role, "operator");
        assert!(created.unix_ms > 0);
        let denied = find("token:viewer", "/alki.v1.FleetService/CreateRollout");
        assert_eq!(denied.result, "PERMISSION_DENIED");
        let pushed = find("token:push", "PUT /v2/{name}/manifests/{reference}");
        assert_eq!((pushed.target.as_str(), pushed.result.as_str()), ("acme/none:latest", "http_400"));
        assert!(pushed.peer.starts_with("127.0.0.1:"), "the HTTP caller's address is recorded: {pushed:?}");
        assert!(created.peer.starts_with("127.0.0.1:"), "and the gRPC caller's: {created:?}");
        let tokens_made = entries.iter().filter(|e| e.action == "/alki.v1.FleetService/CreateToken").count();
        assert_eq!(tokens_made, 5, "each CreateToken is audited");
        assert!(entries.iter().all(|e| !e.action.contains("List")), "reads are not audited: {entries:#?}");
        assert!(entries.windows(2).all(|w| w[0].id > w[1].id), "newest first");

        // Filters: by actor name, and since a time after everything.
        let by_push = admin
            .list_audit(authed(
                &controller.admin,
                proto::ListAuditRequest { actor: "push".into(), ..Default::default() },
            ))
            .await
            .expect("audit")
            .into_inner()
            .entries;
        assert_eq!(by_push.len(), 1);
        let later = proto::ListAuditRequest { since_unix_ms: i64::MAX / 2, ..Default::default() };
        let none = admin.list_audit(authed(&controller.admin, later)).await.expect("audit").into_inner().entries;
        assert!(none.is_empty());
        // The audit log is the admin's: an operator may not read it.
        let refused = admin
            .list_audit(authed(tokens.of(Role::Operator), proto::ListAuditRequest::default()))
            .await
            .expect_err("operator");
        assert_eq!(refused.code(), Code::PermissionDenied);
    })
    .await
    .expect("test timed out");
}

/// How the threat model in ARCHITECTURE.md names what a method or route needs.
fn needs(access: Access) -> String {
    match access {
        Access::Public => "anyone".into(),
        Access::BootstrapToken => "a bootstrap token".into(),
        Access::Device => "a device certificate".into(),
        Access::Token(action) => format!("{action:?}"),
        Access::Login => "a token in the body".into(),
    }
}

/// The rows of the markdown table after `<!-- marker -->` in ARCHITECTURE.md, as cells.
fn documented_rows(marker: &str) -> Vec<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    let text = std::fs::read_to_string(path).expect("ARCHITECTURE.md");
    let start = text.find(&format!("<!-- {marker} -->")).unwrap_or_else(|| panic!("no <!-- {marker} --> table"));
    text[start..]
        .lines()
        .skip(1)
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().trim_matches('`').to_owned()).collect())
        .collect()
}

/// The threat model's tables say what the code enforces: every gRPC method and HTTP route with what it needs,
/// and every role with the actions it allows. A method, route or permission changed without the threat
/// model fails here, with the rows to write.
#[test]
fn the_threat_model_lists_every_method_route_and_permission() {
    let mut expected: Vec<Vec<String>> = grpc_methods()
        .iter()
        .filter(|m| m.starts_with("/alki.v1."))
        .map(|m| {
            let access = grpc_policy(m).map(|p| needs(p.access)).unwrap_or_else(|| "nobody".into());
            vec![m.trim_start_matches("/alki.v1.").to_owned(), access]
        })
        .collect();
    // One row per path template and what it needs, its methods together.
    let mut by_template: std::collections::BTreeMap<(String, String), Vec<String>> = Default::default();
    for (method, template) in http_route_templates() {
        let concrete = concrete_paths(&template).into_iter().next().expect("a concrete path");
        let need = needs(http_policy(&method, &concrete).access);
        by_template.entry((template, need)).or_default().push(method.to_string());
    }
    let mut routes: Vec<Vec<String>> = by_template
        .into_iter()
        .map(|((template, need), methods)| vec![format!("{} {template}", methods.join(",")), need])
        .collect();
    let actions = [
        Action::ReadFleet,
        Action::WriteFleet,
        Action::ManageTokens,
        Action::ReadAudit,
        Action::RegistryRead,
        Action::RegistryWrite,
        Action::AgentSession,
        Action::ManageWebhooks,
    ];
    let mut roles: Vec<Vec<String>> = [Role::Viewer, Role::Operator, Role::Admin, Role::Push, Role::Agent]
        .iter()
        .map(|role| {
            let allowed: Vec<String> = actions.iter().filter(|a| role.allows(**a)).map(|a| format!("{a:?}")).collect();
            vec![format!("{role:?}").to_lowercase(), allowed.join(", ")]
        })
        .collect();
    expected.sort();
    routes.sort();
    roles.sort();
    let show =
        |rows: &[Vec<String>]| rows.iter().map(|r| format!("| `{}` | {} |", r[0], r[1])).collect::<Vec<_>>().join("\n");
    for (marker, want) in
        [("threat-model:grpc", &expected), ("threat-model:http", &routes), ("threat-model:roles", &roles)]
    {
        let mut have = documented_rows(marker);
        have.sort();
        assert_eq!(&have, want, "ARCHITECTURE.md's {marker} table is out of date; it should read:\n{}", show(want));
    }
}
