//! Observability: logs (text or JSON lines), OpenTelemetry traces exported over OTLP and the conversions
//! between W3C trace contexts and spans, Prometheus metrics, and the HTTP listener of `/metrics` and probes.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod trace_context;
