//! Device identity against a whole controller on 127.0.0.1:0 with its secure defaults (TLS on both
//! listeners, its own CA): enrollment over real gRPC, mTLS sessions whose device id is the certificate's,
//! renewal, short-lived registry tokens on the HTTPS registry, and decommissioning.

mod common;

use alki_shared::proto::{
    self, AgentMessage, agent_message, agent_service_client::AgentServiceClient, controller_message::Msg,
    enrollment_service_client::EnrollmentServiceClient, fleet_service_client::FleetServiceClient,
    security_service_client::SecurityServiceClient,
};
use common::{SecureController, bearer_request, bounded, start_secure};
use rcgen::{CertificateParams, KeyPair};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A device key and a CSR for it.
fn device_key() -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = CertificateParams::default().serialize_request(&key).expect("csr").pem().expect("pem");
    (key, csr)
}

async fn bootstrap_token(c: &SecureController, uses: u32) -> String {
    let mut security = SecurityServiceClient::new(c.channel(None).await.expect("connect"));
    let request = proto::CreateEnrollTokenRequest {
        labels: [("site".to_owned(), "lab".to_owned())].into(),
        uses,
        expires_in_seconds: 3600,
        ..Default::default()
    };
    security.create_enroll_token(bearer_request(&c.admin, request)).await.expect("create token").into_inner().secret
}

/// Enrolls `id`; returns (certificate PEM, key PEM).
async fn enroll(c: &SecureController, token: &str, id: &str) -> Result<(String, String), tonic::Status> {
    let (key, csr) = device_key();
    let mut enrollment = EnrollmentServiceClient::new(c.channel(None).await.expect("connect"));
    let request = proto::EnrollRequest {
        bootstrap_token: token.to_owned(),
        csr_pem: csr,
        device_id: id.to_owned(),
        labels: [("site".to_owned(), "device-says".to_owned()), ("class".to_owned(), "x86".to_owned())].into(),
        inventory: None,
    };
    let response = enrollment.enroll(request).await?.into_inner();
    assert_eq!(response.device_id, id);
    assert_eq!(response.ca_certificate_pem.trim(), c.ca_pem.trim());
    Ok((response.certificate_pem, key.serialize_pem()))
}

/// Opens a session with `identity` and Hello naming `hello_id`; returns the first message or the refusal.
async fn session(
    c: &SecureController,
    identity: Option<(&str, &str)>,
    hello_id: &str,
) -> Result<(proto::Welcome, tonic::Streaming<proto::ControllerMessage>, mpsc::Sender<AgentMessage>), tonic::Status> {
    let channel = c.channel(identity).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let hello = proto::Hello { device_id: hello_id.to_owned(), agent_version: "test".into(), ..Default::default() };
    tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await.expect("queue hello");
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(proto::ControllerMessage { msg: Some(Msg::Welcome(welcome)) }) => Ok((welcome, inbound, tx)),
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn an_enrolled_device_is_known_by_its_certificate_and_decommissioning_refuses_it() {
    bounded(async {
        let c = start_secure(|_| {}).await;
        let token = bootstrap_token(&c, 2).await;
        let (cert, key) = enroll(&c, &token, "pi-1").await.expect("enroll");

        // Without a certificate there is no device session; a certificate speaks for its own device only.
        let refused = session(&c, None, "pi-1").await.map(|_| ()).expect_err("no certificate, no session");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let other = session(&c, Some((&cert, &key)), "pi-2").await.map(|_| ()).expect_err("another id refused");
        assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");

        let (welcome, mut inbound, tx1) = session(&c, Some((&cert, &key)), "").await.expect("mTLS session");
        assert_eq!(welcome.device_id, "pi-1", "the id comes from the certificate");
        assert!(!welcome.registry_token.is_empty() && welcome.registry_token_expires_unix_ms > 0);

        // The token's labels win over what the device reports (its Hello here reports none).
        let mut fleet = FleetServiceClient::new(c.channel(None).await.expect("connect"));
        let device = fleet
            .get_device(bearer_request(&c.admin, proto::GetDeviceRequest { id: "pi-1".into() }))
            .await
            .expect("device")
            .into_inner();
        assert_eq!(device.labels.get("site").map(String::as_str), Some("lab"));

        // The registry token reads the HTTPS registry.
        let https = c.https();
        let v2 = format!("https://{}/v2/", c.registry);
        let ok = https.get(&v2).bearer_auth(&welcome.registry_token).send().await.expect("registry");
        assert_eq!(ok.status(), 200, "a device's registry token reads the registry");
        let forged = welcome.registry_token.replace("pi-1.", "pi-9.");
        let bad = https.get(&v2).bearer_auth(&forged).send().await.expect("registry");
        assert_eq!(bad.status(), 401, "a token edited to name another device is refused");

        // Renewal over mTLS: a new certificate; the old one is refused from then on.
        let (new_key, csr) = device_key();
        let mut renew_client = EnrollmentServiceClient::new(c.channel(Some((&cert, &key))).await.expect("connect"));
        let renewed = renew_client.renew(proto::RenewRequest { csr_pem: csr }).await.expect("renew").into_inner();
        let new_key = new_key.serialize_pem();
        let stale =
            session(&c, Some((&cert, &key)), "").await.map(|_| ()).expect_err("the replaced certificate is refused");
        assert_eq!(stale.code(), tonic::Code::PermissionDenied, "{stale:?}");
        let (welcome, inbound2, tx2) =
            session(&c, Some((&renewed.certificate_pem, &new_key)), "pi-1").await.expect("renewed session");
        assert_eq!(welcome.device_id, "pi-1");
        // The first session was replaced by the second: its stream ends.
        assert!(matches!(inbound.message().await, Ok(None) | Err(_)));
        drop((inbound, tx1));

        // Decommission: the open session ends, and sessions, renewals and registry tokens are refused.
        let mut security = SecurityServiceClient::new(c.channel(None).await.expect("connect"));
        let done = security
            .decommission_device(bearer_request(
                &c.admin,
                proto::DecommissionDeviceRequest { device_id: "pi-1".into() },
            ))
            .await
            .expect("decommission")
            .into_inner();
        assert!(done.session_closed);
        let mut inbound = inbound2;
        assert!(matches!(inbound.message().await, Ok(None) | Err(_)), "the open session was closed");
        // A real agent ends its half of the stream when the controller ends its half.
        drop((inbound, tx2));
        let refused =
            session(&c, Some((&renewed.certificate_pem, &new_key)), "pi-1").await.map(|_| ()).expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("decommissioned"), "{refused:?}");
        let mut renew_client =
            EnrollmentServiceClient::new(c.channel(Some((&renewed.certificate_pem, &new_key))).await.expect("connect"));
        let (_, csr) = device_key();
        let renewal = renew_client.renew(proto::RenewRequest { csr_pem: csr }).await.expect_err("no renewal");
        assert_eq!(renewal.code(), tonic::Code::PermissionDenied);
        let after = https.get(&v2).bearer_auth(&welcome.registry_token).send().await.expect("registry");
        assert_eq!(after.status(), 401, "a decommissioned device's registry token is refused");

        // The id stays taken; the token's second use still enrolls another device.
        let again = enroll(&c, &token, "pi-1").await.expect_err("decommissioned ids are not reused");
        assert_eq!(again.code(), tonic::Code::PermissionDenied);
        enroll(&c, &token, "pi-2").await.expect("second use");
        c.shutdown().await;
    })
    .await;
}

/// An agent token's session naming `hello_id`: the Welcome, or the refusal.
async fn token_session(c: &SecureController, token: &str, hello_id: &str) -> Result<proto::Welcome, tonic::Status> {
    let mut client = AgentServiceClient::new(c.channel(None).await.expect("connect"));
    let (tx, rx) = mpsc::channel(8);
    let hello = proto::Hello { device_id: hello_id.to_owned(), agent_version: "test".into(), ..Default::default() };
    tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await.expect("queue hello");
    let mut inbound = client.session(bearer_request(token, ReceiverStream::new(rx))).await?.into_inner();
    match inbound.message().await? {
        Some(proto::ControllerMessage { msg: Some(Msg::Welcome(welcome)) }) => Ok(welcome),
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn insecure_agent_tokens_cannot_speak_for_an_enrolled_device() {
    bounded(async {
        let c = start_secure(|config| config.insecure_agent_tokens = true).await;
        let token = bootstrap_token(&c, 1).await;
        enroll(&c, &token, "pi-1").await.expect("enroll");
        let mut admin = FleetServiceClient::new(c.channel(None).await.expect("connect"));
        let request =
            proto::CreateTokenRequest { name: "sim".into(), role: proto::Role::Agent as i32, ..Default::default() };
        let agent_token =
            admin.create_token(bearer_request(&c.admin, request)).await.expect("token").into_inner().token;

        let refused = token_session(&c, &agent_token, "pi-1").await.expect_err("an enrolled id is refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("certificate identity"), "{refused:?}");
        let welcome = token_session(&c, &agent_token, "sim-7").await.expect("an id without a certificate is admitted");
        assert_eq!(welcome.device_id, "sim-7");
        assert_eq!(welcome.registry, c.registry, "the Welcome names the registry its token is for");
        c.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bootstrap_tokens_are_single_purpose_and_ids_cannot_be_claimed_twice() {
    bounded(async {
        let c = start_secure(|_| {}).await;
        let token = bootstrap_token(&c, 1).await;
        enroll(&c, &token, "pi-1").await.expect("first use");
        let used_up = enroll(&c, &token, "pi-2").await.expect_err("one use only");
        assert_eq!(used_up.code(), tonic::Code::PermissionDenied);
        assert!(used_up.message().contains("used as many times"), "{used_up:?}");

        let fresh = bootstrap_token(&c, 3).await;
        let claimed = enroll(&c, &fresh, "pi-1").await.expect_err("claimed");
        assert_eq!(claimed.code(), tonic::Code::AlreadyExists);
        let unknown = enroll(&c, "alkienroll_nope", "pi-3").await.expect_err("unknown token");
        assert_eq!(unknown.code(), tonic::Code::Unauthenticated);
        let bad_csr = {
            let mut enrollment = EnrollmentServiceClient::new(c.channel(None).await.expect("connect"));
            let request = proto::EnrollRequest {
                bootstrap_token: fresh.clone(),
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
                device_id: "pi-4".into(),
                ..Default::default()
            };
            enrollment.enroll(request).await.expect_err("bad CSR")
        };
        assert_eq!(bad_csr.code(), tonic::Code::InvalidArgument);

        // Tokens are admin business; the list never carries a secret, and uses are counted.
        let mut security = SecurityServiceClient::new(c.channel(None).await.expect("connect"));
        let anonymous = security.list_enroll_tokens(proto::ListEnrollTokensRequest {}).await.expect_err("no token");
        assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
        let listed = security
            .list_enroll_tokens(bearer_request(&c.admin, proto::ListEnrollTokensRequest {}))
            .await
            .expect("list")
            .into_inner()
            .tokens;
        assert_eq!(listed.len(), 2);
        assert_eq!(listed.iter().map(|t| t.uses).sum::<u32>(), 1, "refused enrollments use nothing");
        assert!(!format!("{listed:?}").contains("alkienroll_"));
        c.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn plaintext_clients_cannot_talk_to_a_default_controller() {
    bounded(async {
        let c = start_secure(|_| {}).await;
        let plain = c.grpc.replace("https://", "http://");
        let channel = tonic::transport::Channel::from_shared(plain).expect("url").connect().await;
        if let Ok(channel) = channel {
            let mut fleet = FleetServiceClient::new(channel);
            let result = fleet.list_devices(bearer_request(&c.admin, proto::ListDevicesRequest::default())).await;
            assert!(result.is_err(), "plaintext gRPC must not be served");
        }
        let http = reqwest::Client::new().get(format!("http://{}/healthz", c.registry)).send().await;
        assert!(http.is_err() || http.is_ok_and(|r| !r.status().is_success()), "plaintext HTTP must not be served");
        let https = c.https().get(format!("https://{}/healthz", c.registry)).send().await.expect("https");
        assert!(https.status().is_success());
        c.shutdown().await;
    })
    .await;
}

/// The controller's `/metrics` over HTTPS as the admin sees it.
async fn scrape(c: &SecureController) -> String {
    let url = format!("https://{}/metrics", c.registry);
    c.https().get(url).bearer_auth(&c.admin).send().await.expect("scrape").text().await.expect("body")
}

async fn decommission(c: &SecureController, id: &str) -> proto::DecommissionDeviceResponse {
    let mut security = SecurityServiceClient::new(c.channel(None).await.expect("connect"));
    let request = proto::DecommissionDeviceRequest { device_id: id.into() };
    security.decommission_device(bearer_request(&c.admin, request)).await.expect("decommission").into_inner()
}

#[tokio::test]
async fn decommissioning_closes_a_session_still_waiting_for_its_hello() {
    bounded(async {
        let c = start_secure(|_| {}).await;
        let token = bootstrap_token(&c, 1).await;
        let (cert, key) = enroll(&c, &token, "pi-1").await.expect("enroll");

        // The session opens with the device's certificate and sends nothing yet.
        let channel = c.channel(Some((&cert, &key))).await.expect("connect");
        let (tx, rx) = mpsc::channel::<AgentMessage>(8);
        let opening = tokio::spawn(async move {
            let mut client = AgentServiceClient::new(channel);
            match client.session(ReceiverStream::new(rx)).await {
                Err(status) => Err(status),
                Ok(response) => {
                    let mut inbound = response.into_inner();
                    Ok(inbound.message().await)
                }
            }
        });
        while !scrape(&c).await.contains("\nalki_sessions_waiting_hello 1") {
            tokio::task::yield_now().await;
        }
        let done = decommission(&c, "pi-1").await;
        assert!(done.session_closed, "the waiting session was closed");

        // A Hello now is too late: the stream gets no Welcome and no desired state, only the refusal.
        let hello = proto::Hello { agent_version: "test".into(), ..Default::default() };
        let _ = tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await;
        let refused = opening.await.expect("session task").expect_err("no session for a decommissioned device");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("decommissioned"), "{refused:?}");
        assert!(scrape(&c).await.contains("\nalki_sessions_waiting_hello 0"));

        // The device record says so, for the dashboards and the rollout engine.
        let mut fleet = FleetServiceClient::new(c.channel(None).await.expect("connect"));
        let request = bearer_request(&c.admin, proto::GetDeviceRequest { id: "pi-1".into() });
        assert!(fleet.get_device(request).await.expect("device").into_inner().decommissioned);
        c.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_known_device_id_enrolls_again_only_with_a_token_made_for_it() {
    bounded(async {
        let c = start_secure(|_| {}).await;
        let token = bootstrap_token(&c, 1).await;
        let (old_cert, old_key) = enroll(&c, &token, "pi-1").await.expect("enroll");

        // Any other bootstrap token is refused for the id (live or expired certificate alike).
        let unbound = bootstrap_token(&c, 5).await;
        let claimed = enroll(&c, &unbound, "pi-1").await.expect_err("the id stays bound");
        assert_eq!(claimed.code(), tonic::Code::AlreadyExists);
        assert!(claimed.message().contains("--device-id pi-1"), "the error says how: {claimed:?}");

        // An admin makes a token for that id; it enrolls that id and no other.
        let mut security = SecurityServiceClient::new(c.channel(None).await.expect("connect"));
        let request = proto::CreateEnrollTokenRequest {
            uses: 2,
            expires_in_seconds: 600,
            device_id: "pi-1".into(),
            ..Default::default()
        };
        let created = security.create_enroll_token(bearer_request(&c.admin, request)).await.expect("create");
        let created = created.into_inner();
        assert_eq!(created.token.as_ref().map(|t| t.device_id.as_str()), Some("pi-1"));
        let other = enroll(&c, &created.secret, "pi-2").await.expect_err("bound to pi-1");
        assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
        let (cert, key) = enroll(&c, &created.secret, "pi-1").await.expect("re-enrolled with the bound token");
        session(&c, Some((&cert, &key)), "").await.map(|_| ()).expect("the new certificate opens a session");
        let stale = session(&c, Some((&old_cert, &old_key)), "").await.map(|_| ()).expect_err("old one refused");
        assert_eq!(stale.code(), tonic::Code::PermissionDenied, "{stale:?}");
        c.shutdown().await;
    })
    .await;
}

/// Opens an mTLS session saying `hello`; returns the Welcome, the stream and the agent's sender.
async fn session_saying(
    c: &SecureController,
    identity: (&str, &str),
    hello: proto::Hello,
) -> (proto::Welcome, tonic::Streaming<proto::ControllerMessage>, mpsc::Sender<AgentMessage>) {
    let mut client = AgentServiceClient::new(c.channel(Some(identity)).await.expect("connect"));
    let (tx, rx) = mpsc::channel(8);
    tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await.expect("queue hello");
    let mut inbound = client.session(ReceiverStream::new(rx)).await.expect("session").into_inner();
    match inbound.message().await.expect("first message") {
        Some(proto::ControllerMessage { msg: Some(Msg::Welcome(welcome)) }) => (welcome, inbound, tx),
        other => panic!("expected a Welcome, got {other:?}"),
    }
}

fn hello_with(labels: &[(&str, &str)], class: &str) -> proto::Hello {
    proto::Hello {
        agent_version: "test".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        inventory: Some(proto::Inventory { hardware_class: class.into(), ..Default::default() }),
        ..Default::default()
    }
}

async fn device(c: &SecureController, id: &str) -> proto::Device {
    let mut fleet = FleetServiceClient::new(c.channel(None).await.expect("connect"));
    fleet
        .get_device(bearer_request(&c.admin, proto::GetDeviceRequest { id: id.into() }))
        .await
        .expect("device")
        .into_inner()
}

#[tokio::test]
async fn devices_cannot_choose_the_labels_rollouts_select_them_by() {
    bounded(async {
        let c = start_secure(|config| {
            config.label_trust = alki_controller::facts::LabelTrust { device_owned: vec!["zone".into()] };
        })
        .await;
        let token = bootstrap_token(&c, 1).await;
        let (cert, key) = enroll(&c, &token, "pi-1").await.expect("enroll");

        // A compromised device claims another site and a tier: only its device-owned `zone` counts.
        let hello = hello_with(&[("site", "shop-9"), ("tier", "gold"), ("zone", "b")], "pi5-8g");
        let (welcome, mut inbound, tx) = session_saying(&c, (&cert, &key), hello).await;
        let d = device(&c, "pi-1").await;
        let labels: std::collections::BTreeMap<_, _> = d.labels.clone().into_iter().collect();
        let expected: std::collections::BTreeMap<String, String> =
            [("site".into(), "lab".into()), ("zone".into(), "b".into())].into();
        assert_eq!(labels, expected, "the token's site and the device-owned zone, nothing else");
        assert_eq!(d.reported_labels.get("tier").map(String::as_str), Some("gold"), "what it said is kept apart");
        assert_eq!(welcome.labels, d.labels, "the Welcome tells the device what it is selected by");

        // An operator labels it: recorded in the audit log, selected by at once, and the device is told.
        let mut fleet = FleetServiceClient::new(c.channel(None).await.expect("connect"));
        let request = proto::LabelDeviceRequest {
            device_id: "pi-1".into(),
            set: [("tier".to_owned(), "silver".to_owned()), ("site".to_owned(), "lab-2".to_owned())].into(),
            remove: vec![],
        };
        let labelled = fleet.label_device(bearer_request(&c.admin, request)).await.expect("label").into_inner();
        assert_eq!(labelled.labels.get("site").map(String::as_str), Some("lab-2"), "operators win over the token");
        assert_eq!(labelled.labels.get("tier").map(String::as_str), Some("silver"));
        let told = loop {
            match inbound.message().await.expect("stream") {
                Some(proto::ControllerMessage { msg: Some(Msg::Welcome(w)) }) => break w,
                Some(_) => continue,
                None => panic!("the session ended"),
            }
        };
        assert_eq!(told.labels, labelled.labels);
        let selected = fleet
            .list_devices(bearer_request(
                &c.admin,
                proto::ListDevicesRequest { selector: [("tier".to_owned(), "silver".to_owned())].into() },
            ))
            .await
            .expect("list")
            .into_inner()
            .devices;
        assert_eq!(selected.len(), 1);
        let removed =
            proto::LabelDeviceRequest { device_id: "pi-1".into(), remove: vec!["site".into()], ..Default::default() };
        let after = fleet.label_device(bearer_request(&c.admin, removed)).await.expect("remove").into_inner();
        assert_eq!(
            after.labels.get("site").map(String::as_str),
            Some("lab"),
            "removing an operator's label uncovers the token's"
        );
        let bad = proto::LabelDeviceRequest { device_id: "pi-1".into(), ..Default::default() };
        let refused = fleet.label_device(bearer_request(&c.admin, bad)).await.expect_err("nothing to change");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let mut admin = proto::admin_service_client::AdminServiceClient::new(c.channel(None).await.expect("connect"));
        let audit = admin
            .list_audit(bearer_request(&c.admin, proto::ListAuditRequest { limit: 100, ..Default::default() }))
            .await
            .expect("audit")
            .into_inner()
            .entries;
        assert!(
            audit.iter().any(|e| e.action.ends_with("/LabelDevice") && e.target.contains("tier=silver")),
            "{audit:?}"
        );

        // A new hardware class is recorded for operators to see.
        drop((inbound, tx));
        let hello = hello_with(&[("zone", "b")], "x86-avx2");
        let session = session_saying(&c, (&cert, &key), hello).await;
        let d = device(&c, "pi-1").await;
        assert_eq!(d.previous_class, "pi5-8g");
        assert!(d.class_changed_unix_ms > 0);
        // A real agent ends its half of the stream when the controller ends its half.
        drop(session);
        c.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_device_registry_token_reads_only_its_own_repositories() {
    bounded(async {
        let c = start_secure(|_| {}).await;
        let token = bootstrap_token(&c, 1).await;
        let (cert, key) = enroll(&c, &token, "pi-1").await.expect("enroll");
        let (welcome, inbound, tx) = session(&c, Some((&cert, &key)), "").await.expect("session");
        let https = c.https();
        let manifest = format!("https://{}/v2/acme/secret/manifests/v1", c.registry);
        let device = https.get(&manifest).bearer_auth(&welcome.registry_token).send().await.expect("registry");
        assert_eq!(device.status(), 403, "nothing assigned to the device lives in acme/secret");
        assert!(device.text().await.expect("body").contains("DENIED"));
        let admin = https.get(&manifest).bearer_auth(&c.admin).send().await.expect("registry");
        assert_eq!(admin.status(), 404, "an operator reaches every repository (this one is empty)");
        drop((inbound, tx));
        c.shutdown().await;
    })
    .await;
}
