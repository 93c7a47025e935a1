//! The tower layers around the gRPC server: trace context, client identity, load shedding.
//!
//! Apply them with `tonic::transport::Server::builder().layer(...)`, outermost first:
//! [`TraceContextLayer`] (so even shed calls are logged in the call's span), [`ClientIdLayer`], then
//! [`LoadShedLayer`]. The events-per-second limits are no layer (events can only be counted once a request is
//! decoded): the gateway's handlers charge them with the [`ClientId`] the layer leaves in the request.

mod client_id;
mod held_body;
mod shed;
mod trace_context;

pub use client_id::{
    CLIENT_ID_HEADER, ClientId, ClientIdLayer, ClientIdService, peer_addr, peer_ip,
};
pub use held_body::HeldBody;
pub use shed::{CallSlot, ClientSlot, LoadShed, LoadShedLayer, PermitBody, ShedBound, ShedFuture};
pub use trace_context::{
    TRACEPARENT_HEADER, TRACESTATE_HEADER, TraceContextFuture, TraceContextLayer,
    TraceContextService, TracedBody, trace_context,
};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::Code;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    /// The three layers on a real tonic server and client (over loopback): calls pass, a streaming call holds
    /// its place until the client drops it, and a shed call reaches the client as the configured status.
    #[tokio::test]
    async fn layers_serve_a_tonic_client() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shed = LoadShedLayer::new(1, usize::MAX, |_| {
            tonic::Status::resource_exhausted("overloaded")
        });
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(TraceContextLayer::new())
                .layer(ClientIdLayer::new())
                .layer(shed.clone())
                .add_service(health)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let request = || HealthCheckRequest {
            service: String::new(),
        };

        client.check(request()).await.unwrap();
        client.check(request()).await.unwrap();
        assert_eq!(shed.in_flight(), 0, "finished unary calls hold no place");

        let mut watch = client.watch(request()).await.unwrap().into_inner();
        watch.message().await.unwrap().unwrap();
        assert_eq!(shed.in_flight(), 1);
        let refused = client.check(request()).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(refused.message(), "overloaded");
        assert_eq!(shed.shed_total(), 1);

        drop(watch);
        tokio::time::timeout(Duration::from_secs(5), async {
            while shed.in_flight() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the cancelled stream gives its place back");
        client.check(request()).await.unwrap();

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
