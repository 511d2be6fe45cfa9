//! The audit log cannot be flooded: a whole controller with its secure defaults takes 100,000
//! unauthenticated Renew calls (and oversized Enroll calls) from one peer; they are refused and counted,
//! the audit log keeps exactly its genuine entries, the database barely grows, and an operator's call made
//! during the flood answers and is recorded.

mod common;

use std::time::Duration;

use alki_shared::proto::{
    self, admin_service_client::AdminServiceClient, enrollment_service_client::EnrollmentServiceClient,
    security_service_client::SecurityServiceClient,
};
use common::{SecureController, bearer_request, start_secure};

const FLOOD: usize = 100_000;
const WORKERS: usize = 64;

async fn audit_entries(c: &SecureController) -> Vec<proto::AuditEntry> {
    let mut admin = AdminServiceClient::new(c.channel(None).await.expect("connect"));
    let request = proto::ListAuditRequest { limit: 10_000, ..Default::default() };
    admin.list_audit(bearer_request(&c.admin, request)).await.expect("list audit").into_inner().entries
}

async fn create_enroll_token(c: &SecureController) -> Result<(), tonic::Status> {
    let mut security = SecurityServiceClient::new(c.channel(None).await.expect("connect"));
    let request = proto::CreateEnrollTokenRequest { uses: 1, expires_in_seconds: 60, ..Default::default() };
    security.create_enroll_token(bearer_request(&c.admin, request)).await.map(|_| ())
}

fn database_size(c: &SecureController) -> u64 {
    std::fs::metadata(c.dir.path().join("controller.redb")).expect("the store's file").len()
}

/// What a flood worker saw.
#[derive(Default)]
struct Seen {
    /// Answered by the controller with a refusal.
    refused: usize,
    /// Cut at the transport: the controller closes an HTTP/2 connection that makes it reset too many
    /// streams (it answers refused calls before reading them), and the client reconnects.
    cut: usize,
}

/// Sends `calls` Renew calls without a client certificate (and every 1,000th an Enroll naming a 1 MiB device
/// id with a bad token) on one channel; none may succeed.
async fn flood(enrollment: EnrollmentServiceClient<tonic::transport::Channel>, calls: usize) -> Seen {
    let mut seen = Seen::default();
    for i in 0..calls {
        let mut client = enrollment.clone();
        let result = if i % 1000 == 0 {
            let request = proto::EnrollRequest {
                bootstrap_token: "alkienroll_guess".into(),
                device_id: format!("\u{1b}[2J{}", "x".repeat(1 << 20)),
                ..Default::default()
            };
            client.enroll(request).await.map(|_| ())
        } else {
            client.renew(proto::RenewRequest { csr_pem: "junk".into() }).await.map(|_| ())
        };
        let status = result.expect_err("an unauthenticated call never succeeds");
        match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument => {
                seen.refused += 1
            }
            tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Unavailable => seen.cut += 1,
            _ => panic!("{status:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_calls_are_counted_not_recorded() {
    let test = async {
        let c = start_secure(|_| {}).await;
        for _ in 0..3 {
            create_enroll_token(&c).await.expect("a genuine call");
        }
        let genuine = audit_entries(&c).await;
        assert_eq!(genuine.len(), 3, "{genuine:?}");
        let size_before = database_size(&c);

        let channel = c.channel(None).await.expect("connect");
        let enrollment = EnrollmentServiceClient::new(channel);
        let workers: Vec<_> = (0..WORKERS).map(|_| tokio::spawn(flood(enrollment.clone(), FLOOD / WORKERS))).collect();
        // An operator's call while the flood runs answers, and is recorded.
        create_enroll_token(&c).await.expect("an operator's call during the flood");
        let (mut refused, mut cut) = (0, 0);
        for worker in workers {
            let seen = worker.await.expect("flood worker");
            (refused, cut) = (refused + seen.refused, cut + seen.cut);
        }
        assert_eq!(refused + cut, FLOOD / WORKERS * WORKERS);
        assert!(refused >= FLOOD / 2, "most calls reached the controller: {refused} refused, {cut} cut");

        let after = audit_entries(&c).await;
        assert_eq!(
            after.len(),
            genuine.len() + 1,
            "only the operator's call was added: {:?}",
            &after[..4.min(after.len())]
        );
        for entry in &genuine {
            assert!(after.iter().any(|e| e.id == entry.id), "genuine entry {} is kept", entry.id);
        }
        assert!(after.iter().all(|e| e.actor.starts_with("token:")), "no entry names an unauthenticated caller");
        let growth = database_size(&c).saturating_sub(size_before);
        assert!(growth < 4 << 20, "the store grew by {growth} bytes under the flood");

        // The refusals are counted for the operator's graphs.
        let metrics = c
            .https()
            .get(format!("https://{}/metrics", c.registry))
            .bearer_auth(&c.admin)
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        let counted: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("alki_calls_refused_total{"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum();
        // A few refusals come from HTTP/2 itself (ENHANCE_YOUR_CALM reads as RESOURCE_EXHAUSTED) before the gate.
        assert!(counted >= refused as f64 * 0.99, "refused calls counted: {counted} of {refused}\n{metrics}");
        assert!(metrics.contains("method=\"/alki.v1.EnrollmentService/Renew\""), "{metrics}");
        c.shutdown().await;
    };
    tokio::time::timeout(Duration::from_secs(600), test).await.expect("the flood test finished in time");
}
