//! A gRPC request body as the gateway takes it: the guard's wire-level pre-scan (`gateway::prescan::scan`),
//! prost's decoding, then each event through `gateway::convert::event_from_proto` and the producer's checks
//! and AMQP encoding (`Event::routing`, `validate`, `encode`), read back as the emulator would.
//!
//! Input: one selector byte (the request kind, whether a trace context rides along), then the protobuf
//! bytes. Checked: the scan agrees with prost (with wide-open limits, it passes exactly what decodes; with
//! the gateway's limits, what it passes decodes); what a passed request allocates while prost decodes it
//! stays within the scan's estimate; a JSON body is valid JSON; an encoded event decodes to its body.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use eventhub_gateway::gateway::convert::event_from_proto;
use eventhub_gateway::gateway::prescan::{MAX_JSON_DEPTH, ScanLimits, Schema, scan};
use eventhub_gateway::proto::v1;
use eventhub_producer::TraceContext;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Counts the bytes live on the heap and their peak, so a decode's real footprint can be held against the
/// scan's estimate.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                - layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The gateway's own bounds for a request (guard.rs: 4 x max_request_bytes decoded; 4 MiB requests).
const LIMITS: ScanLimits = ScanLimits {
    max_events: 1000,
    max_decoded_bytes: 4 * (4 << 20),
    max_json_depth: MAX_JSON_DEPTH,
};

/// Only well-formedness (and prost's recursion limit) can fail.
const OPEN: ScanLimits = ScanLimits {
    max_events: usize::MAX,
    max_decoded_bytes: usize::MAX,
    max_json_depth: usize::MAX,
};

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// The request's events, as prost decodes them, with the peak heap growth while decoding.
fn decode(schema: Schema, bytes: &[u8]) -> (Result<Vec<v1::Event>, prost::DecodeError>, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let events = match schema {
        Schema::SendEvent => {
            v1::SendEventRequest::decode(bytes).map(|request| request.event.into_iter().collect())
        }
        Schema::SendEvents => v1::SendEventsRequest::decode(bytes).map(|request| request.events),
        Schema::SendStream => v1::SendStreamRequest::decode(bytes)
            .map(|request| request.event.into_iter().chain(request.events).collect()),
        Schema::GetEventHubProperties => {
            v1::GetEventHubPropertiesRequest::decode(bytes).map(|_| Vec::new())
        }
    };
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    (events, grown)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let schema = match selector & 3 {
        0 => Schema::SendEvent,
        1 => Schema::SendEvents,
        2 => Schema::SendStream,
        _ => Schema::GetEventHubProperties,
    };
    let trace = (selector & 4 != 0).then(|| {
        TraceContext::parse(TRACEPARENT, Some("vendor=a,other=b")).expect("a valid traceparent")
    });

    let open = scan(schema, bytes, &OPEN);
    let bounded = scan(schema, bytes, &LIMITS);
    let (decoded, grown) = decode(schema, bytes);
    assert_eq!(
        open.is_ok(),
        decoded.is_ok(),
        "the scan and prost disagree: scan {open:?}, prost {:?}",
        decoded.as_ref().err()
    );
    let Ok(scanned) = bounded else {
        return;
    };
    let events = decoded.expect("a request the scan passes decodes");
    assert!(
        grown <= scanned.decoded_bytes,
        "decoding took {grown} bytes of heap, more than the scan's estimate of {}",
        scanned.decoded_bytes
    );

    for proto in events {
        let json = matches!(proto.body, Some(v1::event::Body::Json(_)));
        let Ok(event) = event_from_proto(proto, trace.as_ref()) else {
            continue;
        };
        if json {
            serde_json::from_slice::<serde_json::Value>(&event.body)
                .expect("a JSON body is valid JSON");
        }
        let _ = event.routing();
        if event.validate().is_err() {
            continue;
        }
        let encoded = event.encode().expect("a valid event encodes");
        let message = eventhub_wire::message::decode(&encoded).expect("an encoded event decodes");
        let body: Vec<u8> = match message.body {
            fe2o3_amqp_types::messaging::Body::Data(sections) => sections
                .into_iter()
                .flat_map(|section| section.0.into_vec())
                .collect(),
            other => panic!("an event's body is one Data section, not {other:?}"),
        };
        assert_eq!(body, event.body.as_ref(), "the body survives encoding");
    }
});
