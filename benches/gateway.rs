//! Micro-benchmark (not a test): events/s streamed through the gRPC gateway (`SendStream`, tonic clients on
//! loopback) against the producer core alone, both into an in-process emulator, for 100 B and 1 KiB events.
//! Then the same with every span exported over OTLP/gRPC to a receiver on loopback, for the cost of tracing.
//! Run: `cargo bench --bench gateway`. `BENCH_STREAMS` sets the number of streams (default 8).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventhub_gateway::config::GatewayConfig;
use eventhub_gateway::producer::{Event, Producer};
use eventhub_gateway::proto::v1;
use eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient;
use eventhub_gateway::telemetry::otel::{OtlpProtocol, OtlpSettings};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const RUN_FOR: Duration = Duration::from_secs(4);
const DIRECT_SENDERS: usize = 4096;

fn config() -> GatewayConfig {
    GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        emulator: true,
        event_hubs: vec!["bench".into()],
        emulator_partitions: 8,
        ..GatewayConfig::default()
    }
}

/// The producer alone: closed-loop senders, each awaiting its event's outcome.
async fn direct(producer: &Producer, size: usize) -> f64 {
    let body = Arc::new(vec![b'x'; size]);
    let started = Instant::now();
    let tasks: Vec<_> = (0..DIRECT_SENDERS)
        .map(|_| {
            let producer = producer.clone();
            let body = Arc::clone(&body);
            tokio::spawn(async move {
                let mut sent = 0u64;
                while started.elapsed() < RUN_FOR {
                    producer
                        .send("bench", Event::binary(body.to_vec()))
                        .await
                        .expect("accepted");
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("sender");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// `streams` SendStream calls, each on its own connection, fed as fast as flow control allows.
async fn stream(addr: SocketAddr, streams: usize, size: usize) -> f64 {
    let body = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut client = EventHubGatewayClient::connect(format!("http://{addr}"))
                    .await
                    .expect("connects");
                let (requests, outbound) = mpsc::channel(1024);
                let feeder = tokio::spawn(async move {
                    let mut sequence = 0;
                    while started.elapsed() < RUN_FOR {
                        sequence += 1;
                        let request = v1::SendStreamRequest {
                            event_hub: String::new(),
                            sequence,
                            event: Some(v1::Event {
                                body: Some(v1::event::Body::Binary(body.clone())),
                                ..Default::default()
                            }),
                        };
                        if requests.send(request).await.is_err() {
                            break;
                        }
                    }
                });
                let mut acks = client
                    .send_stream(ReceiverStream::new(outbound))
                    .await
                    .expect("stream opens")
                    .into_inner();
                let mut accepted = 0u64;
                while let Some(response) = acks.message().await.expect("stream ends OK") {
                    for ack in response.acks {
                        assert_eq!(ack.status.map(|s| s.code), Some(0), "accepted");
                        accepted += 1;
                    }
                }
                feeder.await.expect("feeder");
                accepted
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("stream task");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// An OTLP/gRPC receiver that counts the spans it is sent and drops them.
#[derive(Clone, Default)]
struct SpanCounter(Arc<std::sync::atomic::AtomicU64>);

#[tonic::async_trait]
impl TraceService for SpanCounter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        self.0
            .fetch_add(spans as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts a span counter on loopback and exports every span to it from now on.
async fn export_spans() -> (SpanCounter, eventhub_gateway::telemetry::logging::Telemetry) {
    let counter = SpanCounter::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(counter.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let telemetry = eventhub_gateway::telemetry::logging::init(
        eventhub_gateway::telemetry::logging::LogFormat::Text,
        Some(&OtlpSettings {
            endpoint: Some(format!("http://{addr}")),
            protocol: OtlpProtocol::Grpc,
        }),
    )
    .expect("telemetry");
    (counter, telemetry)
}

/// (direct, stream) events/s for one event size, on a fresh gateway.
async fn measure(streams: usize, size: usize) -> (f64, f64) {
    let gateway = eventhub_gateway::server::start(config())
        .await
        .expect("gateway starts");
    let direct_rate = direct(gateway.state().producer(), size).await;
    let stream_rate = stream(gateway.local_addr(), streams, size).await;
    gateway.shutdown().await.expect("drains");
    (direct_rate, stream_rate)
}

#[tokio::main]
async fn main() {
    let streams = std::env::var("BENCH_STREAMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8);
    println!(
        "{RUN_FOR:?} per scenario; direct: {DIRECT_SENDERS} closed-loop senders; stream: {streams} SendStream calls"
    );
    // Without an exporter first: once installed, the tracing subscriber stays for the process.
    let mut plain = Vec::new();
    for size in [100, 1024] {
        plain.push((size, measure(streams, size).await));
    }
    let (spans, telemetry) = export_spans().await;
    let mut traced = Vec::new();
    for size in [100, 1024] {
        traced.push(measure(streams, size).await);
    }
    tokio::task::block_in_place(|| telemetry.shutdown());
    println!(
        "{:<8} {:>16} {:>16} {:>13} {:>22} {:>14}",
        "size",
        "direct events/s",
        "stream events/s",
        "stream/direct",
        "stream+OTLP events/s",
        "OTLP/no OTLP"
    );
    for ((size, (direct_rate, stream_rate)), (_, traced_stream)) in plain.iter().zip(&traced) {
        println!(
            "{:<8} {direct_rate:>16.0} {stream_rate:>16.0} {:>13.2} {traced_stream:>22.0} {:>14.2}",
            format!("{size} B"),
            stream_rate / direct_rate,
            traced_stream / stream_rate
        );
    }
    println!(
        "{} spans exported",
        spans.0.load(std::sync::atomic::Ordering::Relaxed)
    );
}
