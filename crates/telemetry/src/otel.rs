//! OpenTelemetry spans through the API only (the exporter is the binary's business): the conversions between
//! the W3C [`TraceContext`] events carry and OpenTelemetry span contexts, the spans of a sampled call's events,
//! and the links of a batch's span to its events.

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use parking_lot::RwLock;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::trace_context::TraceContext;

/// Whether spans are exported (set once at start-up): without an exporter, events keep the caller's context.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// OpenTelemetry's default bound on a span's links (`OTEL_SPAN_LINK_COUNT_LIMIT`).
pub const DEFAULT_LINK_LIMIT: usize = 128;

/// The most links a batch's span gets (the SDK would drop the rest anyway, after they cost their making).
static LINK_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_LINK_LIMIT);

/// Whether an OTLP exporter is installed.
pub fn is_exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Records that an exporter is installed as the global tracer provider, so sampled calls' events get spans of
/// their own, and the SDK's bound on a span's links.
pub fn mark_exporting(link_limit: usize) {
    LINK_LIMIT.store(link_limit, Ordering::Relaxed);
    EXPORTING.store(true, Ordering::Relaxed);
}

/// The bound on a batch span's links.
pub fn link_limit() -> usize {
    LINK_LIMIT.load(Ordering::Relaxed)
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

/// What the spans of one call's events need, decided and built once per call: there are none unless spans
/// are exported and the call's span is sampled, so an unsampled call's events carry the caller's context
/// unchanged and cost nothing here. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct EventSpans(Arc<EventSpansInner>);

struct EventSpansInner {
    tracer: BoxedTracer,
    parent: opentelemetry::Context,
    /// The parent's `tracestate`, which every event span inherits (bounded as a caller's would be).
    tracestate: Option<String>,
}

impl std::fmt::Debug for EventSpans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSpans")
            .field("parent", self.0.parent.span().span_context())
            .finish_non_exhaustive()
    }
}

impl EventSpans {
    /// The event spans of the call whose span is current, if spans are exported and it is sampled.
    pub fn for_current_call() -> Option<Self> {
        if !is_exporting() {
            return None;
        }
        Self::under(current_context())
    }

    /// Event spans as children of `parent`, if it is a sampled span.
    pub fn under(parent: opentelemetry::Context) -> Option<Self> {
        let span_context = parent.span().span_context().clone();
        if !span_context.is_valid() || !span_context.is_sampled() {
            return None;
        }
        let header = span_context.trace_state().header();
        // Bounded as a caller's tracestate is (parsed once per call, not per event).
        let tracestate = TraceContext::parse(&traceparent(&span_context), Some(&header))
            .ok()
            .and_then(|context| context.tracestate);
        Some(Self(Arc::new(EventSpansInner {
            tracer: opentelemetry::global::tracer("eventhub-gateway"),
            parent,
            tracestate,
        })))
    }

    /// Records one event's span, `create <hub>` (kind producer, the messaging conventions' attributes), and
    /// returns its W3C context for the event. Made with the OpenTelemetry API directly (a `tracing` span per
    /// event costs more), with the hub's name and attribute allocated once per hub, not per event.
    pub fn event(&self, hub: &str) -> Option<TraceContext> {
        let (name, destination) = match interned(hub) {
            Some(names) => (Cow::Borrowed(names.span_name), names.hub.into()),
            None => (
                Cow::Owned(format!("create {hub}")),
                opentelemetry::Value::from(hub.to_owned()),
            ),
        };
        let builder = SpanBuilder::from_name(name)
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "eventhubs"),
                KeyValue::new("messaging.operation.type", "create"),
                KeyValue::new("messaging.destination.name", destination),
            ]);
        let inner = &*self.0;
        let mut span = inner.tracer.build_with_context(builder, &inner.parent);
        let span_context = span.span_context();
        let context = span_context.is_valid().then(|| TraceContext {
            traceparent: traceparent(span_context),
            tracestate: inner.tracestate.clone(),
        });
        span.end();
        context
    }
}

/// A hub's span name and attribute value, made once.
#[derive(Clone, Copy)]
struct HubNames {
    span_name: &'static str,
    hub: &'static str,
}

/// The most hubs whose names are kept for the life of the process (a gateway serves a configured few; past
/// this, names are allocated per event rather than kept without bound).
const MAX_INTERNED_HUBS: usize = 256;

static HUB_NAMES: RwLock<Option<HashMap<Box<str>, HubNames>>> = RwLock::new(None);

fn interned(hub: &str) -> Option<HubNames> {
    if let Some(names) = HUB_NAMES.read().as_ref().and_then(|names| names.get(hub)) {
        return Some(*names);
    }
    let mut names = HUB_NAMES.write();
    let names = names.get_or_insert_with(HashMap::new);
    if let Some(found) = names.get(hub) {
        return Some(*found);
    }
    if names.len() >= MAX_INTERNED_HUBS {
        return None;
    }
    let made = HubNames {
        span_name: Box::leak(format!("create {hub}").into_boxed_str()),
        hub: Box::leak(hub.to_owned().into_boxed_str()),
    };
    names.insert(hub.into(), made);
    Some(made)
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
    let tracestate = Some(span_context.trace_state().header()).filter(|state| !state.is_empty());
    TraceContext::parse(&traceparent(span_context), tracestate.as_deref()).ok()
}

/// `00-<trace id>-<span id>-<flags>` in lowercase hex, written directly (no formatting machinery: it is made
/// once per traced event).
fn traceparent(span_context: &SpanContext) -> String {
    let mut text = Vec::with_capacity(55);
    text.extend_from_slice(b"00-");
    push_hex(&mut text, &span_context.trace_id().to_bytes());
    text.push(b'-');
    push_hex(&mut text, &span_context.span_id().to_bytes());
    text.push(b'-');
    push_hex(&mut text, &[span_context.trace_flags().to_u8()]);
    // Only ASCII hex digits and dashes were written.
    String::from_utf8(text).unwrap_or_default()
}

fn push_hex(text: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        text.push(HEX[usize::from(byte >> 4)]);
        text.push(HEX[usize::from(byte & 0x0f)]);
    }
}

/// Adds a link from `span` (a batch's send span) to each event's context, if the span is exported and
/// sampled: to each distinct context once (an unsampled call's events all carry their caller's), and to at
/// most [`link_limit`] of them, which is all the SDK would keep.
pub fn link_to<'a>(span: &tracing::Span, contexts: impl IntoIterator<Item = &'a TraceContext>) {
    if !is_exporting() {
        return;
    }
    // Starts the span, deciding its sampling now rather than at its end: an unsampled span gets no links.
    let started = span.context();
    if !started.span().span_context().is_sampled() {
        return;
    }
    let limit = link_limit();
    let mut linked = 0;
    let mut previous: Option<&str> = None;
    for context in contexts {
        if linked >= limit {
            break;
        }
        if previous == Some(context.traceparent.as_str()) {
            continue;
        }
        previous = Some(&context.traceparent);
        if let Some(span_context) = span_context(context) {
            span.add_link(span_context);
            linked += 1;
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
    fn traceparent_is_the_w3c_text_of_a_span_context() {
        for (trace, span, flags) in [
            ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", 1),
            ("00000000000000000000000000000001", "0000000000000001", 0),
            ("ffffffffffffffffffffffffffffffff", "ffffffffffffffff", 0xff),
        ] {
            let span_context = SpanContext::new(
                TraceId::from_hex(trace).unwrap(),
                SpanId::from_hex(span).unwrap(),
                TraceFlags::new(flags),
                false,
                TraceState::default(),
            );
            assert_eq!(
                traceparent(&span_context),
                format!("00-{trace}-{span}-{flags:02x}")
            );
        }
    }

    #[test]
    fn an_unsampled_or_absent_parent_gets_no_event_spans() {
        let unsampled = TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            None,
        )
        .unwrap();
        let parent = opentelemetry::Context::new()
            .with_remote_span_context(span_context(&unsampled).unwrap());
        assert!(EventSpans::under(parent).is_none());
        assert!(EventSpans::under(opentelemetry::Context::new()).is_none());
    }

    #[test]
    fn a_sampled_parent_gets_event_spans_with_its_tracestate() {
        let sampled = TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("congo=t61rcWkgMzE"),
        )
        .unwrap();
        let parent =
            opentelemetry::Context::new().with_remote_span_context(span_context(&sampled).unwrap());
        let spans = EventSpans::under(parent).expect("a sampled parent");
        assert_eq!(spans.0.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn hub_names_are_made_once() {
        let first = interned("hub-a").unwrap();
        let again = interned("hub-a").unwrap();
        assert_eq!(first.span_name, "create hub-a");
        assert_eq!(first.hub, "hub-a");
        assert!(std::ptr::eq(first.span_name, again.span_name));
    }

    #[test]
    fn spans_without_an_exporter_have_no_context_to_give() {
        assert_eq!(trace_context_of(&tracing::info_span!("nothing")), None);
    }
}
