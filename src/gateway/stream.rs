//! `SendStream`: reads events while fewer than `max_unacked_per_stream` are unacknowledged (beyond that it
//! stops reading, so HTTP/2 flow control holds the client back), acknowledges every sequence exactly once
//! with its real outcome, groups acks that are ready together, and on half-close sends every remaining ack.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::convert::event_from_proto;
use super::status::{self, GatewayError};
use super::{CallContext, GatewayState};
use crate::proto::v1;
use crate::telemetry::metrics::{HubEventsCache, OpenStream, Outcomes, Rpc};

/// The responses of a stream, as tonic sends them.
pub type AckStream = ReceiverStream<Result<v1::SendStreamResponse, Status>>;

/// Most acks in one response.
const MAX_ACKS_PER_RESPONSE: usize = 1024;

/// Responses queued toward the client before acking waits for it to read.
const RESPONSE_QUEUE: usize = 16;

/// An ack to come, holding its share of the stream's unacknowledged budget until it is ready.
type PendingAck = BoxFuture<'static, v1::StreamAck>;

/// Why the stream stopped reading.
enum ReadEnd {
    /// The client half-closed: answer everything, then end with OK.
    HalfClosed,
    /// The gateway is draining: answer everything read, then end with DRAINING.
    Draining,
    /// The client went away or broke the stream: nobody is left to answer.
    ClientGone,
}

/// Starts serving one stream; returns its responses.
pub fn start(
    state: Arc<GatewayState>,
    call: CallContext,
    inbound: Streaming<v1::SendStreamRequest>,
) -> AckStream {
    let (responses, outbound) = mpsc::channel(RESPONSE_QUEUE);
    // The stream's tasks run in the call's span, so its events' spans are children of it.
    let span = tracing::Span::current();
    let streams = state.streams.clone();
    streams.spawn(
        async move {
            let _open = OpenStream::open();
            let (pending_tx, pending_rx) = mpsc::unbounded_channel();
            let acker = tokio::spawn(acknowledge(pending_rx, responses.clone()).in_current_span());
            let end = read(&state, &call, inbound, pending_tx).await;
            // The reader dropped its sender: the acker answers what is pending, then ends.
            let _ = acker.await;
            if let ReadEnd::Draining = end {
                let _ = responses
                    .send(Err(GatewayError::Draining.to_status()))
                    .await;
            }
            // Dropping `responses` ends the stream with OK.
        }
        .instrument(span),
    );
    ReceiverStream::new(outbound)
}

async fn read(
    state: &Arc<GatewayState>,
    call: &CallContext,
    mut inbound: Streaming<v1::SendStreamRequest>,
    pending: mpsc::UnboundedSender<PendingAck>,
) -> ReadEnd {
    let budget = state.limits.max_unacked_per_stream;
    let unacked = Arc::new(Semaphore::new(budget));
    let mut counters = HubEventsCache::new(Rpc::SendStream);
    loop {
        // A permit before every read: with none left the stream is not read, and HTTP/2 pushes back.
        let mut permits = tokio::select! {
            permit = Arc::clone(&unacked).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return ReadEnd::ClientGone,
            },
            () = state.draining.cancelled() => return ReadEnd::Draining,
        };
        let message = tokio::select! {
            message = inbound.message() => message,
            () = state.draining.cancelled() => return ReadEnd::Draining,
        };
        let mut request = match message {
            Ok(Some(request)) => request,
            Ok(None) => return ReadEnd::HalfClosed,
            Err(_) => return ReadEnd::ClientGone,
        };
        let (sequence, hub) = (request.sequence, std::mem::take(&mut request.event_hub));
        let events = match message_events(request, state.limits.max_events_per_request) {
            Ok(events) => events,
            Err((count, error)) => {
                for offset in 0..count {
                    let ack = nack(sequence.wrapping_add(offset), error.clone());
                    if pending.send(ack).is_err() {
                        return ReadEnd::ClientGone;
                    }
                }
                continue;
            }
        };
        // A message of n events counts n toward the budget (all of it, if n is larger).
        let wanted = events.len().min(budget);
        if wanted > 1 {
            let more = tokio::select! {
                more = Arc::clone(&unacked).acquire_many_owned(wanted as u32 - 1) => match more {
                    Ok(more) => more,
                    Err(_) => return ReadEnd::ClientGone,
                },
                () = state.draining.cancelled() => return ReadEnd::Draining,
            };
            permits.merge(more);
        }
        for event in events {
            let permit = permits.split(1);
            let ack = admit(state, call, &hub, event, permit, &mut counters).await;
            if pending.send(ack).is_err() {
                return ReadEnd::ClientGone;
            }
        }
    }
}

/// One event read from a stream.
struct StreamEvent {
    sequence: u64,
    /// Its place in the message's `events`; `None` when it came in `event`.
    index: Option<usize>,
    proto: v1::Event,
}

/// The field path of a stream event: `event`, or `events[i]`.
fn field_path(index: Option<usize>) -> String {
    index.map_or_else(|| "event".into(), |index| format!("events[{index}]"))
}

/// The events of one stream message, on consecutive sequences from the message's. A malformed message is
/// refused whole, with the number of sequences its nacks cover.
fn message_events(
    request: v1::SendStreamRequest,
    max_events: usize,
) -> Result<Vec<StreamEvent>, (u64, GatewayError)> {
    let first = request.sequence;
    let invalid = |field: &str, reason: String| GatewayError::InvalidRequest {
        field: field.into(),
        reason,
    };
    match (request.event, request.events) {
        (Some(proto), events) if events.is_empty() => Ok(vec![StreamEvent {
            sequence: first,
            index: None,
            proto,
        }]),
        (None, events) if events.is_empty() => Err((1, invalid("event", "is required".into()))),
        (Some(_), events) => Err((
            events.len() as u64,
            invalid(
                "events",
                "cannot be set together with `event`: send one or the other".into(),
            ),
        )),
        (None, events) if events.len() > max_events => Err((
            events.len() as u64,
            invalid(
                "events",
                format!(
                    "at most {max_events} events per message (max_events_per_request); got {}",
                    events.len()
                ),
            ),
        )),
        (None, events) => Ok(events
            .into_iter()
            .enumerate()
            .map(|(index, proto)| StreamEvent {
                sequence: first.wrapping_add(index as u64),
                index: Some(index),
                proto,
            })
            .collect()),
    }
}

/// An ack that is ready at once: the event was refused before it was enqueued.
fn nack(sequence: u64, error: GatewayError) -> PendingAck {
    let ack = v1::StreamAck {
        sequence,
        status: Some(error.to_rpc_status()),
        partition_id: String::new(),
    };
    futures_util::future::ready(ack).boxed()
}

/// Checks and enqueues one event (in arrival order, so each key keeps it); the ack resolves with its outcome.
/// The event's share of the unacked budget (`permit`; none once a message has used all of it) is released
/// when its outcome is known.
async fn admit(
    state: &Arc<GatewayState>,
    call: &CallContext,
    hub: &str,
    event: StreamEvent,
    permit: Option<OwnedSemaphorePermit>,
    counters: &mut HubEventsCache,
) -> PendingAck {
    let StreamEvent {
        sequence,
        index,
        proto,
    } = event;
    // The field path its errors name, built only for an error.
    let field = move || field_path(index);
    let hub = match state.hub(hub) {
        Ok(hub) => hub,
        Err(error) => return nack(sequence, error),
    };
    // Counted from here on: an unknown hub's name is the caller's text, never a label.
    let mut counted = counters.get(&hub).receive(1);
    let refuse = |mut counted: Outcomes, error: GatewayError| {
        counted.failed(error.reason(), 1);
        nack(sequence, error)
    };
    if let Err(error) = state.charge(call, 1) {
        return refuse(counted, error);
    }
    let event = match event_from_proto(proto, call.event_trace_context(&hub).as_ref()) {
        Ok(event) => event,
        Err(error) => return refuse(counted, GatewayError::event(field(), error)),
    };
    let deadline = Instant::now() + state.send_timeout;
    match state.producer.enqueue(&hub, event, deadline).await {
        Ok(ticket) => async move {
            let outcome = ticket.await;
            drop(permit);
            match outcome {
                Ok(receipt) => {
                    counted.ok(1);
                    v1::StreamAck {
                        sequence,
                        status: Some(status::ok()),
                        partition_id: receipt.partition_id.unwrap_or_default(),
                    }
                }
                Err(error) => {
                    let error = GatewayError::event(field(), error);
                    counted.failed(error.reason(), 1);
                    v1::StreamAck {
                        sequence,
                        status: Some(error.to_rpc_status()),
                        partition_id: String::new(),
                    }
                }
            }
        }
        .boxed(),
        Err(error) => refuse(counted, GatewayError::event(field(), error)),
    }
}

/// Awaits pending acks and sends them, grouping those ready at the same time, until the reader is done and
/// nothing is pending; stops early if the client is gone.
async fn acknowledge(
    mut pending: mpsc::UnboundedReceiver<PendingAck>,
    responses: mpsc::Sender<Result<v1::SendStreamResponse, Status>>,
) {
    let mut waiting = FuturesUnordered::new();
    let mut reading = true;
    while reading || !waiting.is_empty() {
        tokio::select! {
            next = pending.recv(), if reading => match next {
                Some(ack) => waiting.push(ack),
                None => reading = false,
            },
            Some(ack) = waiting.next(), if !waiting.is_empty() => {
                let mut acks = vec![ack];
                while acks.len() < MAX_ACKS_PER_RESPONSE {
                    while let Ok(more) = pending.try_recv() {
                        waiting.push(more);
                    }
                    match waiting.next().now_or_never() {
                        Some(Some(ack)) => acks.push(ack),
                        _ => break,
                    }
                }
                if responses.send(Ok(v1::SendStreamResponse { acks })).await.is_err() {
                    return;
                }
            }
        }
    }
}
