//! What the gateway records about itself, for every crate above it: metric names and recording helpers over the
//! `metrics` facade (with the [`metrics::Report`] trait owners implement), the W3C trace context events carry,
//! and span helpers over the OpenTelemetry API. It imports nothing of the project's other crates.

#![warn(missing_docs)]

pub mod metrics;
pub mod otel;
pub mod trace_context;

pub use trace_context::{TraceContext, TraceContextError};
