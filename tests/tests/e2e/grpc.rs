//! The layers also fit tonic: `AdmissionLayer` in front of tonic-health's gRPC health service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use layers::{AdmissionConfig, AdmissionLayer, Load};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn check(
    client: &mut HealthClient<tonic::transport::Channel>,
) -> Result<tonic_health::pb::HealthCheckResponse, tonic::Status> {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    client.check(request).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn admission_layer_guards_a_tonic_health_service() {
    let in_use = Arc::new(AtomicUsize::new(0));
    let load = {
        let in_use = in_use.clone();
        move || Load {
            in_use: in_use.load(Ordering::SeqCst),
            capacity: 10,
            release_rate: 2.0,
        }
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(AdmissionLayer::new(load, AdmissionConfig::default()))
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    assert_eq!(
        check(&mut client).await.unwrap().status(),
        ServingStatus::Serving
    );

    // At 90% utilization the layer answers instead of the service, in gRPC's own terms:
    // RESOURCE_EXHAUSTED with a retry delay, not a hang and not SERVING.
    in_use.store(9, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let status = check(&mut client).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("capacity"), "{status:?}");
    assert!(
        status.metadata().get("retry-after-ms").is_some(),
        "{status:?}"
    );

    in_use.store(0, Ordering::SeqCst);
    assert_eq!(
        check(&mut client).await.unwrap().status(),
        ServingStatus::Serving
    );
    server.abort();
}
