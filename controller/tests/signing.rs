//! Signatures at the controller, over real gRPC and real OCI on 127.0.0.1:0: `alkictl bundle sign`'s code
//! writes cosign's classic signature tags, ListBundles reports them, and CreateRollout refuses a candidate
//! that is unsigned, signed by an untrusted key or signed for another digest — unless the operator
//! overrides with a reason, which lands in the rollout's events.

use std::time::Duration;

use alki_bundle::Remote;
use alki_bundle::inspect::{self, Target};
use alki_bundle::sign::sign;
use alki_controller::config::ControllerConfig;
use alki_shared::digest::Digest;
use alki_shared::proto::{self, fleet_service_client::FleetServiceClient};
use alki_shared::signing::{SigningKey, signature_tag};

mod common;

struct Controller {
    _dir: tempfile::TempDir,
    grpc: String,
    registry: String,
    admin: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(trusted: Vec<alki_shared::signing::PublicKey>) -> Controller {
    let dir = tempfile::tempdir().expect("tempdir");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc_addr, http_addr) = (grpc.local_addr().expect("addr"), http.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(dir.path().to_owned());
    // A scripted agent over plaintext with a token of role agent: the TLS and enrollment paths are
    // covered by tests/enroll.rs and e2e/tests/enrollment.rs.
    config.insecure_plaintext = true;
    config.insecure_agent_tokens = true;
    config.insecure_plaintext = true;
    config.trusted_keys = trusted;
    tokio::spawn(alki_controller::serve(alki_controller::Listeners { grpc, http }, config, async {
        let _ = stopped.await;
    }));
    let admin = common::admin_token(dir.path()).await;
    Controller { _dir: dir, grpc: format!("http://{grpc_addr}"), registry: http_addr.to_string(), admin, _stop: stop }
}

fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    request
}

impl Controller {
    fn remote(&self) -> Remote {
        Remote::with_token(self.registry.clone(), "acme/tiny".into(), Some(self.admin.clone()), true)
    }

    async fn push(&self, tag: &str, seed: u64) -> Digest {
        alki_e2e::tiny_bundle::push_tiny_bundle(&self.registry, "acme/tiny", &self.admin, tag, seed)
            .await
            .expect("push the tiny bundle")
    }

    async fn create(&self, candidate: &str, override_reason: Option<&str>) -> Result<proto::Rollout, tonic::Status> {
        let spec = proto::RolloutSpec {
            repository: "acme/tiny".into(),
            candidate: candidate.into(),
            selector: [("site".to_owned(), "nowhere".to_owned())].into(),
            ..Default::default()
        };
        let request = proto::CreateRolloutRequest {
            spec: Some(spec),
            override_signature_check: override_reason.is_some(),
            override_reason: override_reason.unwrap_or_default().into(),
        };
        let mut fleet = FleetServiceClient::connect(self.grpc.clone()).await.expect("connect");
        fleet.create_rollout(authed(&self.admin, request)).await.map(|r| r.into_inner())
    }
}

#[tokio::test]
async fn rollouts_need_a_signature_by_a_fleet_key_or_an_explicit_override() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let fleet_key = SigningKey::generate().expect("key");
        let stranger = SigningKey::generate().expect("key");
        let c = start(vec![fleet_key.public_key().clone()]).await;
        let v1 = c.push("v1", 1).await;

        // Unsigned: refused, and the message says what to do.
        let err = c.create("v1", None).await.expect_err("unsigned refused");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("not signed") && err.message().contains("alkictl bundle sign"), "{err:?}");

        // Signed by a key the controller does not trust: refused as untrusted.
        let signed = sign(&c.remote(), "v1", &stranger).await.expect("sign");
        assert_eq!(signed.signatures.len(), 2, "the index and its one variant: {signed:?}");
        let err = c.create("v1", None).await.expect_err("untrusted refused");
        assert!(err.message().contains("no trusted key"), "{err:?}");

        // The fleet key's signature is added beside the other one, and the rollout goes ahead.
        let signed = sign(&c.remote(), "v1", &fleet_key).await.expect("sign");
        assert_eq!(signed.signatures[0].signatures_at_tag, 2);
        let rollout = c.create("v1", None).await.expect("signed candidate accepted");
        assert_eq!(rollout.candidate.as_ref().map(|b| b.digest.clone()), Some(v1.to_string()));

        // ListBundles shows the signatures and which verify.
        let mut fleet = FleetServiceClient::connect(c.grpc.clone()).await.expect("connect");
        let bundles = fleet
            .list_bundles(authed(&c.admin, proto::ListBundlesRequest { repository: "acme/tiny".into() }))
            .await
            .expect("list")
            .into_inner()
            .bundles;
        let bundle = bundles.iter().find(|b| b.digest == v1.to_string()).expect("v1 listed");
        assert_eq!(bundle.signatures.len(), 2, "{:?}", bundle.signatures);
        let good: Vec<_> = bundle.signatures.iter().filter(|s| s.verified).collect();
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].key_fingerprint, fleet_key.public_key().fingerprint());
        assert!(bundle.signatures.iter().any(|s| !s.verified && !s.problem.is_empty()));
        assert!(
            bundles.iter().all(|b| !b.tags.iter().any(|t| t.ends_with(".sig"))),
            "signature manifests are not bundles"
        );

        // bundle inspect's registry path reports the same.
        let target = Target::Registry { remote: c.remote(), tag_or_digest: "v1".into() };
        let report = inspect::inspect(target, &[fleet_key.public_key().clone()]).await.expect("inspect");
        assert!(report.verified, "{report:?}");
        assert_eq!(report.variants.len(), 1);
        assert!(report.signatures.iter().any(|s| s.of == "index" && s.check.verified));
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn a_signature_copied_from_another_bundle_is_refused_and_overrides_are_recorded() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let key = SigningKey::generate().expect("key");
        let c = start(vec![key.public_key().clone()]).await;
        let v1 = c.push("v1", 1).await;
        let v2 = c.push("v2", 2).await;
        sign(&c.remote(), "v1", &key).await.expect("sign v1");

        // Copy v1's signature manifest to v2's signature tag, as an attacker with push rights could.
        let remote = c.remote();
        let client = remote.client();
        let (bytes, _) = remote.manifest(&client, &signature_tag(&v1)).await.expect("read").expect("v1 signed");
        client
            .push_manifest_raw(
                &remote.reference(&signature_tag(&v2)),
                bytes,
                http::HeaderValue::from_static(alki_shared::oci::MEDIA_TYPE_IMAGE_MANIFEST),
            )
            .await
            .expect("copy signature");
        let err = c.create("v2", None).await.expect_err("copied signature refused");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("not for") && err.message().contains(v2.as_str()), "{err:?}");

        // An override needs a reason.
        let err = c.create("v2", Some("  ")).await.expect_err("no reason");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let rollout = c.create("v2", Some("hotfix signed out of band, ticket 42")).await.expect("overridden");
        let mut fleet = FleetServiceClient::connect(c.grpc.clone()).await.expect("connect");
        let events = fleet
            .list_rollout_events(authed(&c.admin, proto::ListRolloutEventsRequest { id: rollout.id, after_seq: 0 }))
            .await
            .expect("events")
            .into_inner()
            .events;
        let event = events.iter().find(|e| e.kind == "signature_override").expect("override recorded");
        assert!(event.message.contains("ticket 42") && event.message.contains("not for"), "{event:?}");
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn a_controller_without_trusted_keys_refuses_everything_but_overrides() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let c = start(Vec::new()).await;
        c.push("v1", 1).await;
        sign(&c.remote(), "v1", &SigningKey::generate().expect("key")).await.expect("sign");
        let err = c.create("v1", None).await.expect_err("no keys: refused");
        assert!(err.message().contains("trusts no key"), "{err:?}");
        assert!(c.create("v1", Some("lab bench without keys")).await.is_ok());
    })
    .await
    .expect("bounded");
}
