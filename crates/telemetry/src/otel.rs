//! OpenTelemetry spans through the API only (the exporter is the binary's business): the conversions between
//! the W3C [`TraceContext`] events carry and OpenTelemetry span contexts, and the span of one event.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::trace_context::TraceContext;

/// Whether spans are exported (set once at start-up): without an exporter, events keep the caller's context.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether an OTLP exporter is installed.
pub fn is_exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Records that an exporter is installed as the global tracer provider, so events get spans of their own.
pub fn mark_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// The span context a W3C trace context names, as a remote parent.
pub fn span_context(context: &TraceContext) -> Option<SpanContext> {
    let mut parts = context.traceparent.split('-');
    let (_version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let state = context
        .tracestate
        .as_deref()
        .and_then(|state| TraceState::from_str(state).ok())
        .unwrap_or_default();
    let span_context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        state,
    );
    span_context.is_valid().then_some(span_context)
}

/// Makes `span` a child of the caller's context.
pub fn set_remote_parent(span: &tracing::Span, context: &TraceContext) {
    if let Some(parent) = span_context(context) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

/// The OpenTelemetry context of the current `tracing` span.
pub fn current_context() -> opentelemetry::Context {
    tracing::Span::current().context()
}

/// Records one event's span, `create <hub>` (kind producer), as a child of `parent`, and returns its W3C
/// context for the event. Made with the OpenTelemetry API directly: a `tracing` span per event costs more.
pub fn event_span(parent: &opentelemetry::Context, hub: &str) -> Option<TraceContext> {
    use opentelemetry::KeyValue;
    use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
    let tracer = opentelemetry::global::tracer("eventhub-gateway");
    let mut span = tracer
        .span_builder(format!("create {hub}"))
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.system", "eventhubs"),
            KeyValue::new("messaging.operation.type", "create"),
            KeyValue::new("messaging.destination.name", hub.to_owned()),
        ])
        .start_with_context(&tracer, parent);
    let context = w3c(span.span_context());
    span.end();
    context
}

/// The W3C trace context of `span` (what goes onto an event), if it is recorded by OpenTelemetry.
pub fn trace_context_of(span: &tracing::Span) -> Option<TraceContext> {
    let context = span.context();
    w3c(context.span().span_context())
}

fn w3c(span_context: &SpanContext) -> Option<TraceContext> {
    if !span_context.is_valid() {
        return None;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    let tracestate = Some(span_context.trace_state().header()).filter(|state| !state.is_empty());
    TraceContext::parse(&traceparent, tracestate.as_deref()).ok()
}

/// Adds a link from `span` to each valid context (a batch's send span to its events' spans).
pub fn link_to<'a>(span: &tracing::Span, contexts: impl IntoIterator<Item = &'a TraceContext>) {
    for context in contexts {
        if let Some(linked) = span_context(context) {
            span.add_link(linked);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_w3c_context_becomes_a_remote_span_context_with_its_state() {
        let context = TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("congo=t61rcWkgMzE"),
        )
        .unwrap();
        let span_context = span_context(&context).unwrap();
        assert_eq!(
            span_context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(span_context.span_id().to_string(), "b7ad6b7169203331");
        assert!(span_context.is_sampled());
        assert!(span_context.is_remote());
        assert_eq!(span_context.trace_state().get("congo"), Some("t61rcWkgMzE"));
    }

    #[test]
    fn spans_without_an_exporter_have_no_context_to_give() {
        assert_eq!(trace_context_of(&tracing::info_span!("nothing")), None);
    }
}
