//! The process's `tracing` subscriber: `RUST_LOG` filtered logs on stderr, human-readable or JSON lines, and
//! the OpenTelemetry layer when an OTLP exporter is configured; [`Telemetry::shutdown`] flushes spans.

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use super::export::{self, OtelError, OtlpSettings, SpanQueue};

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The logs filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info,fe2o3_amqp=warn";

/// The crates whose spans are exported (the gateway's call spans and the producer's send spans).
const SPAN_TARGETS: &[&str] = &["eventhub_gateway", "eventhub_producer"];

/// Installed telemetry; keep it for the life of the process and shut it down to flush spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    queue: Option<SpanQueue>,
}

impl Telemetry {
    /// Spans dropped so far because the exporter could not keep up.
    pub fn dropped_spans(&self) -> u64 {
        self.queue.as_ref().map_or(0, SpanQueue::dropped)
    }

    /// Exports every span still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing spans at shutdown failed");
        }
    }
}

/// Installs the global subscriber: logs in `format`, and spans to OTLP when `otlp` is given. Call once, inside
/// the Tokio runtime.
pub fn init(format: LogFormat, otlp: Option<&OtlpSettings>) -> Result<Telemetry, OtelError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);
    let (provider, queue) = otlp.map(export::tracer_provider).transpose()?.unzip();
    // Spans have their own filter: quieting logs with RUST_LOG must not silence traces.
    let spans = provider.as_ref().map(|provider| {
        // Entering a span (every poll of a call's future, body and stream tasks) costs no clock reads or
        // OpenTelemetry context switches: nothing here reads busy/idle times or `Context::current()` (event
        // spans get their parent from the call's span explicitly).
        tracing_opentelemetry::layer()
            .with_tracer(export::tracer(provider))
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(
                SPAN_TARGETS
                    .iter()
                    .fold(Targets::new(), |targets, crate_name| {
                        targets.with_target(*crate_name, tracing::Level::INFO)
                    }),
            )
    });
    // A second init (tests starting several gateways) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    Ok(Telemetry { provider, queue })
}
