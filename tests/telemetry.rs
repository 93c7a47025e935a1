//! Traces from the client to Event Hubs: a real OTLP/gRPC receiver in this test gets the gateway's spans; the
//! server span continues the client's trace, each event has its own span whose context is stored on the event,
//! and each batch's send span carries the messaging attributes and links to its events; a stream's events get
//! spans of their own too; an unsampled call exports no span and its event keeps the caller's traceparent.
//! (One test in its own binary: the tracing subscriber and exporter are process-wide.)

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use eventhub_gateway::proto::v1;
use eventhub_gateway::telemetry::export::{OtlpProtocol, OtlpSettings};
use eventhub_gateway::telemetry::logging::{self, LogFormat};
use fe2o3_amqp_types::primitives::SimpleValue;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use parking_lot::Mutex;
use support::*;

/// An OTLP trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_receiver() -> (Receiver, SocketAddr) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (receiver, addr)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            Value::StringValue(text) => text.clone(),
            Value::IntValue(number) => number.to_string(),
            other => format!("{other:?}"),
        })
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// A caller's trace it chose not to sample (flags 00): the parent-based sampler leaves the call unsampled.
const UNSAMPLED_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
const STREAM_TRACE: &str = "6bf92f3577b34da6a3ce929d0e0e4738";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_trace_continues_through_the_gateway_onto_the_stored_event() {
    let (receiver, addr) = start_receiver().await;
    let telemetry = logging::init(
        LogFormat::Text,
        Some(&OtlpSettings {
            endpoint: Some(format!("http://{addr}")),
            protocol: OtlpProtocol::Grpc,
            sampler_ratio: None,
        }),
    )
    .unwrap();
    let gateway = start_gateway(|_| {}).await;
    let mut client = gateway_client(&gateway).await;
    let mut request = tonic::Request::new(v1::SendEventRequest {
        event_hub: String::new(),
        event: Some(v1::Event {
            partition_id: "1".into(),
            ..text_event("traced")
        }),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
            .parse()
            .unwrap(),
    );
    request
        .metadata_mut()
        .insert("tracestate", "vendor=value".parse().unwrap());
    client.send_event(request).await.unwrap();
    let refused = client
        .send_event(v1::SendEventRequest {
            event_hub: "nope".into(),
            event: Some(text_event("refused")),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);

    let unsampled_parent = format!("00-{UNSAMPLED_TRACE}-{CLIENT_SPAN}-00");
    let mut request = tonic::Request::new(v1::SendEventRequest {
        event_hub: String::new(),
        event: Some(v1::Event {
            partition_id: "2".into(),
            ..text_event("unsampled")
        }),
    });
    request
        .metadata_mut()
        .insert("traceparent", unsampled_parent.parse().unwrap());
    client.send_event(request).await.unwrap();

    let messages: Vec<v1::SendStreamRequest> = (1..=3)
        .map(|sequence| v1::SendStreamRequest {
            event_hub: String::new(),
            sequence,
            event: Some(v1::Event {
                partition_id: "3".into(),
                ..text_event("streamed")
            }),
            events: Vec::new(),
        })
        .collect();
    let mut request = tonic::Request::new(tokio_stream::iter(messages));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{STREAM_TRACE}-{CLIENT_SPAN}-01")
            .parse()
            .unwrap(),
    );
    let mut acks = client.send_stream(request).await.unwrap().into_inner();
    let mut acked = 0;
    while let Some(response) = acks.message().await.unwrap() {
        for ack in response.acks {
            assert_eq!(ack.status.map(|status| status.code), Some(0));
            acked += 1;
        }
    }
    assert_eq!(acked, 3);

    let stored = stored_events(gateway.emulator().unwrap(), "eh1", 4);
    gateway.shutdown().await.unwrap();
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();

    let spans = receiver.spans.lock().clone();
    let calls: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "eventhub.gateway.v1.EventHubGateway/SendEvent")
        .collect();
    assert_eq!(calls.len(), 2, "a server span per call");
    let failed = calls
        .iter()
        .find(|s| attribute(s, "rpc.grpc.status_code").as_deref() == Some("5"))
        .expect("the refused call's span has its status code");
    assert_eq!(failed.status.as_ref().map(|s| s.code), Some(2), "ERROR");
    let server = *calls.iter().find(|s| s.span_id != failed.span_id).unwrap();
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(hex(&server.trace_id), CLIENT_TRACE);
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(attribute(server, "rpc.system").as_deref(), Some("grpc"));

    let event = spans
        .iter()
        .find(|s| s.name == "create eh1" && hex(&s.trace_id) == CLIENT_TRACE)
        .expect("an event span");
    assert_eq!(hex(&event.trace_id), CLIENT_TRACE);
    assert_eq!(
        event.parent_span_id, server.span_id,
        "the event's parent is the call"
    );
    assert_eq!(event.kind, SpanKind::Producer as i32);

    let send = spans
        .iter()
        .find(|s| {
            s.name == "send eh1"
                && attribute(s, "messaging.destination.partition.id").as_deref() == Some("1")
        })
        .expect("a send span");
    assert_eq!(send.kind, SpanKind::Producer as i32);
    for (key, value) in [
        ("messaging.system", "eventhubs"),
        ("messaging.destination.name", "eh1"),
        ("messaging.destination.partition.id", "1"),
        ("messaging.operation.type", "send"),
        ("messaging.batch.message_count", "1"),
        ("server.address", "localhost"),
    ] {
        assert_eq!(attribute(send, key).as_deref(), Some(value), "{key}");
    }
    assert!(
        send.links
            .iter()
            .any(|link| link.trace_id == event.trace_id && link.span_id == event.span_id),
        "the send span links to the event's span"
    );

    // The stored event carries the event span's context, as the Azure SDKs write it.
    let in_partition = |partition: &str| -> Vec<&eventhub_wire::message::AmqpMessage> {
        stored
            .iter()
            .filter(|(id, _)| id == partition)
            .map(|(_, message)| message)
            .collect()
    };
    let traced = in_partition("1");
    assert_eq!(traced.len(), 1);
    let properties = &traced[0].application_properties.as_ref().unwrap().0;
    let expected = format!("00-{CLIENT_TRACE}-{}-01", hex(&event.span_id));
    for name in ["Diagnostic-Id", "traceparent"] {
        assert_eq!(
            properties.get(name),
            Some(&SimpleValue::String(expected.clone())),
            "{name}"
        );
    }
    assert_eq!(
        properties.get("tracestate"),
        Some(&SimpleValue::String("vendor=value".into()))
    );

    // An unsampled call: no span of its trace is exported, and its event carries the caller's context as is.
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) != UNSAMPLED_TRACE),
        "an unsampled call exports no span"
    );
    let unsampled = in_partition("2");
    assert_eq!(unsampled.len(), 1);
    let properties = &unsampled[0].application_properties.as_ref().unwrap().0;
    for name in ["Diagnostic-Id", "traceparent"] {
        assert_eq!(
            properties.get(name),
            Some(&SimpleValue::String(unsampled_parent.clone())),
            "{name}"
        );
    }

    // A sampled stream: a server span, a span per event as its child (whose context each stored event
    // carries), and the batches' send spans link to them.
    let stream_call = spans
        .iter()
        .find(|s| s.name == "eventhub.gateway.v1.EventHubGateway/SendStream")
        .expect("the stream's server span");
    assert_eq!(hex(&stream_call.trace_id), STREAM_TRACE);
    let stream_events: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "create eh1" && s.parent_span_id == stream_call.span_id)
        .collect();
    assert_eq!(stream_events.len(), 3, "a span per streamed event");
    let streamed = in_partition("3");
    assert_eq!(streamed.len(), 3);
    for message in streamed {
        let properties = &message.application_properties.as_ref().unwrap().0;
        let Some(SimpleValue::String(traceparent)) = properties.get("traceparent") else {
            panic!("a streamed event without traceparent");
        };
        let event = stream_events
            .iter()
            .find(|s| format!("00-{STREAM_TRACE}-{}-01", hex(&s.span_id)) == *traceparent)
            .expect("the stored context is its event's span");
        assert!(
            spans.iter().any(|send| send.name == "send eh1"
                && send
                    .links
                    .iter()
                    .any(|link| link.span_id == event.span_id && link.trace_id == event.trace_id)),
            "a send span links to each streamed event's span"
        );
    }
}
