//! The OTLP span exporter, configured by the standard `OTEL_*` variables, installed as the global tracer
//! provider, behind a bounded span queue that drops (and counts) what a slow collector cannot take.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};

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
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpSettings {
    /// The collector's URL (over HTTP, the whole URL: `http://host:4318/v1/traces`); `None` lets the exporter
    /// read `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`.
    pub endpoint: Option<String>,
    /// gRPC (default) or HTTP with protobuf bodies.
    pub protocol: OtlpProtocol,
    /// Sample this fraction of traces (`parentbased_traceidratio`); `None` leaves the sampler to
    /// `OTEL_TRACES_SAMPLER` (default: every trace).
    pub sampler_ratio: Option<f64>,
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
            sampler_ratio: None,
        }))
    }
}

/// A tracer provider exporting in batches (`OTEL_BSP_*`) through a bounded [`SpanQueue`] (also returned, for
/// its count of dropped spans), sampled per `settings` or `OTEL_TRACES_SAMPLER`, with the resource of
/// `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`. Must be called inside the Tokio runtime.
pub fn tracer_provider(
    settings: &OtlpSettings,
) -> Result<(SdkTracerProvider, SpanQueue), OtelError> {
    let exporter = span_exporter(settings)?;
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|value| value.contains("service.name="));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    let queue = SpanQueue::new(env_usize("OTEL_BSP_MAX_QUEUE_SIZE").unwrap_or(DEFAULT_QUEUE_SIZE));
    let mut builder = SdkTracerProvider::builder()
        .with_span_processor(queue.processor(exporter))
        .with_resource(resource.build());
    if let Some(ratio) = settings.sampler_ratio {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    let provider = builder.build();
    // Event spans are made through the global provider (see `EventSpans`).
    opentelemetry::global::set_tracer_provider(provider.clone());
    eventhub_telemetry::otel::mark_exporting(
        env_usize("OTEL_SPAN_LINK_COUNT_LIMIT")
            .unwrap_or(eventhub_telemetry::otel::DEFAULT_LINK_LIMIT),
    );
    Ok((provider, queue))
}

/// The OTLP exporter `settings` name.
fn span_exporter(settings: &OtlpSettings) -> Result<opentelemetry_otlp::SpanExporter, OtelError> {
    let failed =
        |error: opentelemetry_otlp::ExporterBuildError| OtelError::Exporter(error.to_string());
    Ok(match settings.protocol {
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
    })
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// The SDK's default span queue (`OTEL_BSP_MAX_QUEUE_SIZE`).
pub const DEFAULT_QUEUE_SIZE: usize = 2048;

/// The bound on the spans waiting for the exporter. The SDK's batch processor drops when its own queue is
/// full, but keeps the count to itself until shutdown; this admits a span only while fewer than `capacity`
/// wait (queued, or taken but not yet handed to the exporter), so the SDK's queue of the same size never
/// overflows, and counts what it turns away.
#[derive(Clone, Debug)]
pub struct SpanQueue {
    waiting: Arc<AtomicUsize>,
    capacity: usize,
    dropped: Arc<AtomicU64>,
}

impl SpanQueue {
    /// A queue of at most `capacity` spans (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            waiting: Arc::new(AtomicUsize::new(0)),
            capacity: capacity.max(1),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Spans this queue turned away.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Spans waiting for the exporter now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// The span processor: the SDK's batch processor (`OTEL_BSP_*`, its queue this one's size) behind this
    /// bound, exporting with `exporter`.
    pub fn processor<E: SpanExporter + 'static>(&self, exporter: E) -> BoundedProcessor {
        let config = BatchConfigBuilder::default()
            .with_max_queue_size(self.capacity)
            .build();
        let exporter = Handed {
            inner: exporter,
            waiting: Arc::clone(&self.waiting),
            runtime: tokio::runtime::Handle::try_current().ok(),
        };
        BoundedProcessor {
            inner: BatchSpanProcessor::builder(exporter)
                .with_batch_config(config)
                .build(),
            queue: self.clone(),
        }
    }
}

/// The SDK's batch processor behind a [`SpanQueue`]: never blocks a span's end, never grows past the bound.
#[derive(Debug)]
pub struct BoundedProcessor {
    inner: BatchSpanProcessor,
    queue: SpanQueue,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let queue = &self.queue;
        if queue.waiting.fetch_add(1, Ordering::AcqRel) >= queue.capacity {
            queue.waiting.fetch_sub(1, Ordering::AcqRel);
            // Counted, not logged: this runs inside the `tracing` subscriber, ending a span.
            queue.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let dropped = self.queue.dropped();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                capacity = self.queue.capacity,
                "spans were dropped because the exporter could not keep up \
                 (raise OTEL_BSP_MAX_QUEUE_SIZE, or sample with OTEL_TRACES_SAMPLER)"
            );
        }
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter behind a [`SpanQueue`]: spans stop counting against the bound once handed to it. Its exports
/// are polled in the Tokio runtime's context: the batch processor polls them on a thread of its own, where the
/// OTLP/HTTP client (reqwest) would otherwise find no runtime and panic, ending all export.
#[derive(Debug)]
struct Handed<E> {
    inner: E,
    waiting: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Handle>,
}

impl<E: SpanExporter> SpanExporter for Handed<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.waiting.fetch_sub(batch.len(), Ordering::AcqRel);
        InRuntime {
            runtime: self.runtime.clone(),
            inner: self.inner.export(batch),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The tracer spans are recorded with.
pub fn tracer(provider: &SdkTracerProvider) -> SdkTracer {
    provider.tracer("eventhub-gateway")
}

pin_project_lite::pin_project! {
    /// A future polled inside a Tokio runtime's context (when there is one).
    struct InRuntime<F> {
        runtime: Option<tokio::runtime::Handle>,
        #[pin]
        inner: F,
    }
}

impl<F: std::future::Future> std::future::Future for InRuntime<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _entered = this.runtime.as_ref().map(tokio::runtime::Handle::enter);
        this.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use parking_lot::Mutex;

    use super::*;

    /// An exporter that stops in its first export until released, and counts what it is given.
    #[derive(Debug)]
    struct StuckExporter {
        entered: Mutex<Option<mpsc::Sender<()>>>,
        release: Mutex<Option<mpsc::Receiver<()>>>,
        exported: Arc<AtomicUsize>,
    }

    impl SpanExporter for StuckExporter {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if let Some(entered) = self.entered.lock().take() {
                let _ = entered.send(());
                if let Some(release) = self.release.lock().take() {
                    // Bounded, so a broken test cannot hang.
                    let _ = release.recv_timeout(Duration::from_secs(30));
                }
            }
            self.exported.fetch_add(batch.len(), Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking_or_growing() {
        const CAPACITY: usize = 4;
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let exported = Arc::new(AtomicUsize::new(0));
        let queue = SpanQueue::new(CAPACITY);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue.processor(StuckExporter {
                entered: Mutex::new(Some(entered_tx)),
                release: Mutex::new(Some(release_rx)),
                exported: Arc::clone(&exported),
            }))
            .build();
        let tracer = provider.tracer("test");
        // A full batch (the SDK caps the batch at the queue's size) starts an export, which gets stuck.
        for _ in 0..CAPACITY {
            tracer.start("span").end();
        }
        entered
            .recv_timeout(Duration::from_secs(30))
            .expect("the first export starts");
        assert_eq!(queue.dropped(), 0);
        // The collector is stuck: what the queue cannot hold is dropped and counted, and ending spans
        // never waits.
        let free = CAPACITY - queue.waiting();
        for _ in 0..100 {
            tracer.start("span").end();
        }
        assert_eq!(queue.waiting(), CAPACITY);
        assert_eq!(queue.dropped(), (100 - free) as u64);
        release.send(()).unwrap();
        provider.shutdown().unwrap();
        assert_eq!(
            exported.load(Ordering::Relaxed),
            CAPACITY + 100 - (100 - free),
            "every span admitted is exported"
        );
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_otlp_http_collector() {
        let (requests_tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let _ = requests_tx.send(body.len());
                async { "" }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let exporter = span_exporter(&OtlpSettings {
            endpoint: Some(format!("http://{addr}/v1/traces")),
            protocol: OtlpProtocol::HttpProtobuf,
            sampler_ratio: None,
        })
        .unwrap();
        let queue = SpanQueue::new(16);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue.processor(exporter))
            .build();
        provider.tracer("test").start("span").end();
        // The batch processor's thread exports with the runtime's HTTP client (it panicked without one).
        tokio::task::spawn_blocking(move || provider.shutdown())
            .await
            .unwrap()
            .unwrap();
        let bytes = tokio::time::timeout(Duration::from_secs(30), requests.recv())
            .await
            .expect("an export request")
            .unwrap();
        assert!(bytes > 0);
        assert_eq!(queue.dropped(), 0);
    }
}
