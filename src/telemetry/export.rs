//! The OTLP span exporter, configured by the standard `OTEL_*` variables, installed as the global tracer
//! provider.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` gives one.
pub const DEFAULT_SERVICE_NAME: &str = "eventhub-gateway";

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names a protocol this build does not speak.
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0}: supported are grpc and http/protobuf")]
    UnsupportedProtocol(String),
    /// The exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The collector's URL; `None` lets the exporter read `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`.
    pub endpoint: Option<String>,
    /// gRPC (default) or HTTP with protobuf bodies.
    pub protocol: OtlpProtocol,
}

/// The OTLP transports this build speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (tonic), port 4317 by convention.
    Grpc,
    /// OTLP/HTTP with protobuf bodies, port 4318 by convention.
    HttpProtobuf,
}

impl OtlpSettings {
    /// Settings from the standard variables: exporting is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_TRACES_EXPORTER` is not `none`).
    pub fn from_env() -> Result<Option<Self>, OtelError> {
        let variable = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        if variable("OTEL_TRACES_EXPORTER").as_deref() == Some("none")
            || (variable("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
                && variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none())
        {
            return Ok(None);
        }
        let protocol = variable("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| variable("OTEL_EXPORTER_OTLP_PROTOCOL"));
        let protocol = match protocol.as_deref() {
            None | Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(other) => return Err(OtelError::UnsupportedProtocol(other.to_owned())),
        };
        Ok(Some(Self {
            endpoint: None,
            protocol,
        }))
    }
}

/// A tracer provider exporting in batches (`OTEL_BSP_*`), sampled per `OTEL_TRACES_SAMPLER`, with the resource
/// of `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`. Must be called inside the Tokio runtime.
pub fn tracer_provider(settings: &OtlpSettings) -> Result<SdkTracerProvider, OtelError> {
    let failed =
        |error: opentelemetry_otlp::ExporterBuildError| OtelError::Exporter(error.to_string());
    let exporter = match settings.protocol {
        OtlpProtocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = &settings.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            builder.build().map_err(failed)?
        }
        OtlpProtocol::HttpProtobuf => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(endpoint) = &settings.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            builder.build().map_err(failed)?
        }
    };
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|value| value.contains("service.name="));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    // Event spans are made through the global provider (see `event_span`).
    opentelemetry::global::set_tracer_provider(provider.clone());
    eventhub_telemetry::otel::mark_exporting();
    Ok(provider)
}

/// The tracer spans are recorded with.
pub fn tracer(provider: &SdkTracerProvider) -> SdkTracer {
    provider.tracer("eventhub-gateway")
}
