//! Observability: logs (text or JSON lines), OpenTelemetry traces exported over OTLP, and the conversions
//! between W3C trace contexts and spans.

pub mod logging;
pub mod otel;
