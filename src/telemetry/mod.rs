//! The binary's observability set-up: logs (text or JSON lines), the OTLP span exporter, and the HTTP listener
//! of `/metrics` and the probes. What is recorded, and how, is the `eventhub-telemetry` crate's.

pub mod export;
pub mod http;
pub mod logging;
