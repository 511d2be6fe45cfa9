//! The standard gRPC services on the controller's TLS listener: health (public, like /healthz) answers
//! SERVING for each Alki service, and reflection lists the Alki services to a token holder only.

mod common;

use common::{bearer_request, bounded, start_secure};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

#[tokio::test]
async fn health_answers_without_credentials_and_reflection_lists_the_services_to_token_holders() {
    bounded(async {
        let c = start_secure(|_| {}).await;
        let mut health = HealthClient::new(c.channel(None).await.expect("connect"));
        for service in ["", "alki.v1.FleetService", "alki.v1.AgentService"] {
            let answer = health
                .check(HealthCheckRequest { service: service.to_owned() })
                .await
                .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
                .into_inner();
            assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
        }
        let unknown = health.check(HealthCheckRequest { service: "no.such.Service".to_owned() }).await;
        assert_eq!(unknown.expect_err("unknown service").code(), tonic::Code::NotFound);

        let list = || ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut reflection = ServerReflectionClient::new(c.channel(None).await.expect("connect"));
        let refused = reflection.server_reflection_info(tokio_stream::iter([list()])).await;
        assert_eq!(refused.expect_err("no token").code(), tonic::Code::Unauthenticated);

        let stream = reflection
            .server_reflection_info(bearer_request(&c.admin, tokio_stream::iter([list()])))
            .await
            .expect("reflection with a token")
            .into_inner();
        let answers: Vec<ServerReflectionResponse> =
            tokio_stream::StreamExt::collect::<Result<Vec<_>, _>>(stream).await.expect("answers");
        let Some(MessageResponse::ListServicesResponse(listed)) =
            answers.first().and_then(|a| a.message_response.clone())
        else {
            panic!("expected a service list, got {answers:?}");
        };
        let names: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
        for service in
            ["alki.v1.AgentService", "alki.v1.FleetService", "alki.v1.InsightService", "alki.v1.AdminService"]
        {
            assert!(names.contains(&service.to_owned()), "{service} missing from {names:?}");
        }
        c.shutdown().await;
    })
    .await;
}
