//! The controller over real gRPC and real OCI on 127.0.0.1:0: a bundle packed and pushed with alkictl's
//! code, a rollout created through FleetService, and a scripted agent on AgentService converging to it.

mod common;

use alki_shared::proto::{self, controller_message::Msg};
use common::scripted::*;

#[tokio::test]
async fn a_rollout_reaches_a_scripted_agent_and_completes_when_it_reports_active() {
    let c = start(tempfile::tempdir().expect("tempdir")).await;
    let digest = push_bundle(&c, "v1", 1).await;
    let mut fleet_client = fleet(&c).await;
    let agent_token = create_token(&c, "pi-1", proto::Role::Agent).await;

    let mut agent = connect_agent(&c, &agent_token, "pi-1", 0, None).await;
    assert!(
        matches!(agent.next().await, Msg::Welcome(w) if w.device_id == "pi-1" && w.heartbeat_interval_seconds == 1)
    );

    let bundles = fleet_client.list_bundles(with_token(&c.admin, proto::ListBundlesRequest::default())).await;
    let bundle = bundles.expect("bundles").into_inner().bundles.into_iter().find(|b| b.digest == digest);
    let bundle = bundle.expect("pushed bundle listed");
    assert_eq!(bundle.tags, vec!["v1".to_owned()]);
    assert_eq!(bundle.variants.len(), 1);
    assert_eq!(bundle.variants[0].quantization, "F16");

    let rollout = create_lab_rollout(&c, &mut fleet_client).await;
    assert_eq!(rollout.candidate.as_ref().map(|b| b.digest.as_str()), Some(digest.as_str()));

    let Msg::DesiredState(desired) = agent.next().await else { panic!("expected a desired state") };
    assert_eq!(desired.generation, 1);
    assert_eq!(desired.rollout_id, rollout.id);
    let bundle_ref = desired.bundle.clone().expect("bundle");
    assert_eq!((bundle_ref.digest.as_str(), bundle_ref.registry.as_str()), (digest.as_str(), c.registry.as_str()));

    agent.report(proto::Status { generation: 1, phase: proto::Phase::Pulling as i32, ..Default::default() }).await;
    let active = proto::Status {
        generation: 1,
        phase: proto::Phase::Active as i32,
        serving: Some(bundle_ref.clone()),
        ..Default::default()
    };
    agent.report(active).await;
    let done = wait_rollout(&c, &rollout.id, completed).await;
    assert_eq!(done.counts.map(|c| (c.selected, c.active, c.failed)), Some((1, 1, 0)));

    let request = with_token(&c.admin, proto::GetDeviceRequest { id: "pi-1".into() });
    let device = fleet_client.get_device(request).await.expect("device").into_inner();
    assert!(device.connected);
    assert_eq!(device.phase, proto::Phase::Active as i32);
    assert_eq!(device.running.map(|b| b.digest), Some(digest.clone()));
    drop(agent);
    let dir = c.shutdown().await;

    // A restarted controller keeps everything, and a reconnecting agent gets the same desired state
    // (level-based), not a new generation.
    let c = start(dir).await;
    let mut agent = connect_agent(&c, &agent_token, "pi-1", 1, Some(bundle_ref)).await;
    assert!(matches!(agent.next().await, Msg::Welcome(_)));
    let Msg::DesiredState(again) = agent.next().await else { panic!("expected the desired state again") };
    assert_eq!(again.generation, 1);
    let r = wait_rollout(&c, &rollout.id, completed).await;
    assert_eq!(r.id, rollout.id);
    drop(agent);
    c.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_failures_hold_the_rollout() {
    let c = start(tempfile::tempdir().expect("tempdir")).await;
    let mut client = fleet(&c).await;

    let err = client.list_devices(proto::ListDevicesRequest::default()).await.expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client.list_devices(with_token("alki_wrong", proto::ListDevicesRequest::default())).await;
    assert_eq!(err.expect_err("bad token").code(), tonic::Code::Unauthenticated);

    let err = client.get_device(with_token(&c.admin, proto::GetDeviceRequest { id: "ghost".into() })).await;
    let err = err.expect_err("unknown device");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("ghost"), "{}", err.message());
    // An id that does not parse is parsed once, at this edge, and names nothing.
    let err = client.get_device(with_token(&c.admin, proto::GetDeviceRequest { id: "../ghost".into() })).await;
    let err = err.expect_err("an id that does not parse");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("../ghost"), "{}", err.message());
    let err = client.get_rollout(with_token(&c.admin, proto::GetRolloutRequest { id: "ro 1".into() })).await;
    assert_eq!(err.expect_err("an invalid rollout id").code(), tonic::Code::NotFound);
    let events = proto::ListRolloutEventsRequest { id: String::new(), after_seq: 0 };
    let err = client.list_rollout_events(with_token(&c.admin, events)).await.expect_err("an empty rollout id");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let spec = proto::RolloutSpec { repository: "acme/none".into(), candidate: "v9".into(), ..Default::default() };
    let err = client
        .create_rollout(with_token(&c.admin, proto::CreateRolloutRequest { spec: Some(spec), ..Default::default() }))
        .await;
    let err = err.expect_err("missing bundle");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("acme/none:v9"), "{}", err.message());

    // A push-only token may not read the fleet API.
    let push = create_token(&c, "ci", proto::Role::Push).await;
    let err = client.list_rollouts(with_token(&push, proto::ListRolloutsRequest {})).await.expect_err("push role");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Conflicting rollouts are refused, naming the active one.
    let digest = push_bundle(&c, "v1", 7).await;
    let agent_token = create_token(&c, "pi-2", proto::Role::Agent).await;
    let mut agent = connect_agent(&c, &agent_token, "pi-2", 0, None).await;
    assert!(matches!(agent.next().await, Msg::Welcome(_)));
    let spec = proto::RolloutSpec { repository: "acme/tiny".into(), candidate: digest.clone(), ..Default::default() };
    let request = with_token(&c.admin, proto::CreateRolloutRequest { spec: Some(spec.clone()), ..Default::default() });
    let first = client.create_rollout(request).await.expect("first rollout").into_inner();
    let err = client
        .create_rollout(with_token(&c.admin, proto::CreateRolloutRequest { spec: Some(spec), ..Default::default() }))
        .await;
    let err = err.expect_err("overlap");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains(&first.id), "{}", err.message());

    // A failed activation holds the rollout and shows the device's reason.
    let Msg::DesiredState(desired) = agent.next().await else { panic!("desired state") };
    agent
        .report(proto::Status {
            generation: desired.generation,
            phase: proto::Phase::Failed as i32,
            error: Some(proto::ActivationError {
                code: proto::ErrorCode::DigestMismatch as i32,
                message: "layer does not match".into(),
                layer_digest: "sha256:00".into(),
            }),
            ..Default::default()
        })
        .await;
    let held = wait_rollout(&c, &first.id, |r| r.counts.is_some_and(|c| c.failed == 1)).await;
    assert_eq!(held.state, proto::RolloutState::Progressing as i32);
    assert!(held.message.contains("failed"), "{}", held.message);
    let device = client.get_device(with_token(&c.admin, proto::GetDeviceRequest { id: "pi-2".into() })).await;
    let device = device.expect("device").into_inner();
    assert_eq!(device.error.map(|e| e.code), Some(proto::ErrorCode::DigestMismatch as i32));
    drop(agent);
    c.shutdown().await;
}

/// A registry request with `token` (HTTP Basic, as registry clients send it).
fn registry(c: &Controller, method: reqwest::Method, path: &str, token: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new().request(method, format!("http://{}/v2/{path}", c.registry)).basic_auth("x", Some(token))
}

#[tokio::test]
async fn push_tokens_reach_their_repositories_and_pinned_manifests_are_not_deleted() {
    let c = start(tempfile::tempdir().expect("tempdir")).await;
    let digest = push_bundle(&c, "v1", 3).await;
    let mut client = fleet(&c).await;

    // A push token needs repositories; other roles take none.
    let unscoped =
        proto::CreateTokenRequest { name: "ci".into(), role: proto::Role::Push as i32, ..Default::default() };
    let refused = client.create_token(with_token(&c.admin, unscoped)).await.expect_err("no --repo");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("--repo"), "{refused:?}");
    let scoped = |name: &str, pattern: &str| proto::CreateTokenRequest {
        name: name.into(),
        role: proto::Role::Push as i32,
        repositories: vec![pattern.into()],
    };
    let acme = client.create_token(with_token(&c.admin, scoped("acme-ci", "acme/*"))).await.expect("acme");
    let acme = acme.into_inner().token;
    let other = client.create_token(with_token(&c.admin, scoped("other-ci", "other/*"))).await.expect("other");
    let other = other.into_inner().token;

    // Another team's token neither reads, overwrites nor mounts from acme's repositories.
    let manifest = format!("acme/tiny/manifests/{digest}");
    let read = registry(&c, reqwest::Method::GET, &manifest, &other).send().await.expect("get");
    assert_eq!(read.status(), 403);
    assert!(read.text().await.expect("body").contains("DENIED"));
    let put =
        registry(&c, reqwest::Method::PUT, "acme/tiny/manifests/v1", &other).body("{}").send().await.expect("put");
    assert_eq!(put.status(), 403);
    let mount = format!("other/x/blobs/uploads/?mount={digest}&from=acme/tiny");
    let mounted = registry(&c, reqwest::Method::POST, &mount, &other).send().await.expect("mount");
    assert_eq!(mounted.status(), 403, "a mount from a repository outside the scope is refused");
    assert_eq!(registry(&c, reqwest::Method::GET, &manifest, &acme).send().await.expect("get").status(), 200);

    // A rollout pins its candidate: its manifest and signature tag are not deleted, not even by acme's token.
    let agent_token = create_token(&c, "pi-1", proto::Role::Agent).await;
    let mut agent = connect_agent(&c, &agent_token, "pi-1", 0, None).await;
    assert!(matches!(agent.next().await, Msg::Welcome(_)));
    let rollout = create_lab_rollout(&c, &mut client).await;
    let deleted = registry(&c, reqwest::Method::DELETE, &manifest, &acme).send().await.expect("delete");
    assert_eq!(deleted.status(), 403);
    assert!(deleted.text().await.expect("body").contains("pinned by an active rollout"));
    let signature = format!("acme/tiny/manifests/{}.sig", digest.replacen(':', "-", 1));
    let untagged = registry(&c, reqwest::Method::DELETE, &signature, &acme).send().await.expect("delete sig");
    assert_eq!(untagged.status(), 403, "the signature tag of a pinned bundle stays");
    let forced = registry(&c, reqwest::Method::DELETE, &format!("{signature}?force=true"), &acme).send().await;
    assert_eq!(forced.expect("force").status(), 403, "only an admin may force");

    // Once the rollout is over, the same delete goes through.
    let abort = proto::RolloutActionRequest { id: rollout.id.clone(), reason: "test".into() };
    client.abort_rollout(with_token(&c.admin, abort)).await.expect("abort");
    let untagged = registry(&c, reqwest::Method::DELETE, &signature, &acme).send().await.expect("delete sig");
    assert_eq!(untagged.status(), 202);
    drop(agent);
    c.shutdown().await;
}
