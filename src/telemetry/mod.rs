//! Telemetry: Prometheus metrics and the HTTP listener of `/metrics` and the probes.

pub mod http;
pub mod metrics;
