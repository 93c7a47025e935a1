//! `traceparent` and `tracestate` as a caller sends them (`eventhub_telemetry::TraceContext::parse`), their
//! conversion to an OpenTelemetry parent (`otel::span_context`), and an event carrying them through the
//! producer's checks and encoding.
//!
//! Input: `traceparent`, then optionally a 0 byte and `tracestate`. Checked: an accepted context is a
//! valid OpenTelemetry parent with the same ids, its kept `tracestate` is at most 512 bytes of whole
//! members, and an event carrying it validates and encodes.

#![no_main]

use eventhub_producer::Event;
use eventhub_telemetry::TraceContext;
use eventhub_telemetry::otel::span_context;
use eventhub_telemetry::trace_context::MAX_TRACESTATE_BYTES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (parent, state) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Ok(parent) = std::str::from_utf8(parent) else {
        return;
    };
    let state = match state.map(std::str::from_utf8) {
        None => None,
        Some(Ok(state)) => Some(state),
        Some(Err(_)) => return,
    };
    let Ok(context) = TraceContext::parse(parent, state) else {
        return;
    };
    if let Some(kept) = &context.tracestate {
        assert!(
            kept.len() <= MAX_TRACESTATE_BYTES,
            "tracestate kept too long"
        );
        let given = state.expect("a kept tracestate was given");
        assert!(
            kept == given || kept.split(',').all(|member| given.contains(member)),
            "tracestate members are kept whole"
        );
    }
    let remote = span_context(&context).expect("an accepted traceparent is a valid parent");
    assert_eq!(remote.trace_id().to_string(), &context.traceparent[3..35]);
    assert_eq!(remote.span_id().to_string(), &context.traceparent[36..52]);
    let event = Event::text("body").with_trace_context(context);
    event
        .validate()
        .expect("an event with an accepted trace context is valid");
    event
        .encode()
        .expect("an event with a trace context encodes");
});
