//! `SendStream`: reads events while fewer than `max_unacked_per_stream` are unacknowledged (beyond that it
//! stops reading, so HTTP/2 flow control holds the client back), acknowledges every sequence exactly once
//! with its real outcome, groups acks that are ready together, and on half-close sends every remaining ack.
//! Every other ending (a message it cannot read, the stream's deadline, idleness past
//! `stream_idle_timeout_seconds`, draining, its connection's age) also answers every event read first, then ends the call with a
//! status that says why; only a client that went away gets nothing.
//!
//! Memory per stream has a fixed ceiling, whatever the client sends or fails to read: every sequence read,
//! acked or nacked, holds a permit until its ack is taken by the acker, so at most `max_unacked_per_stream`
//! plus `max_events_per_request` (one message may exceed the budget) acks are pending, plus 17,408 taken and
//! queued toward the client (`RESPONSE_QUEUE` times `MAX_ACKS_PER_RESPONSE`, and one response being
//! grouped), each at most ~3 KiB (a nack's texts are clipped); the message being read is bounded by the
//! request guard (3 x `max_request_bytes` of buffers, 4 x decoded). At the defaults: 48 MiB + 64 MiB +
//! 28,408 x 3 KiB = 204,709,888 bytes.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use tracing::Instrument;

use super::guard::Refusal;
use super::status::{self, GatewayError, StreamFault, StreamProgress};
use super::{CallContext, GatewayState};
use crate::listener::GoingAway;
use crate::proto::v1;
use eventhub_telemetry::metrics::{HubEventsCache, OpenStream, Outcomes, Rpc};

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
    /// The stream cannot go on (a message it cannot read, its deadline): answer everything read, then end
    /// with this error.
    Failed(GatewayError),
    /// The client went away (cancelled, reset the stream, lost the connection): nobody is left to answer.
    ClientGone,
}

/// What interrupts reading besides the stream itself.
enum Interruption {
    Draining,
    Deadline,
    ConnectionAged,
}

impl Interruption {
    fn end(self, progress: StreamProgress) -> ReadEnd {
        match self {
            Self::Draining => ReadEnd::Draining,
            Self::Deadline => ReadEnd::Failed(GatewayError::StreamDeadlineExceeded { progress }),
            Self::ConnectionAged => ReadEnd::Failed(GatewayError::ConnectionAged { progress }),
        }
    }
}

/// Resolves when the gateway starts draining, the stream's deadline passes, or its connection reaches its age
/// (the drain's ending, for one connection: stop reading, answer what was read, say why).
async fn interruption(
    state: &GatewayState,
    deadline: Option<Instant>,
    going_away: &GoingAway,
) -> Interruption {
    let deadline_passed = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        () = state.draining.cancelled() => Interruption::Draining,
        () = deadline_passed => Interruption::Deadline,
        () = going_away.reached() => Interruption::ConnectionAged,
    }
}

/// How a read error ends the stream. The decoder's own errors (too large, undecodable, bad compression,
/// truncated) carry no cause and the client is still there to hear why; transport errors (a reset stream, a
/// broken connection) carry the h2 or hyper error that caused them, and nobody is left to answer.
fn unreadable(status: &Status, progress: StreamProgress, max_request_bytes: usize) -> ReadEnd {
    // The request guard's refusals (over a bound, malformed) ride as the source of the codec's status.
    if let Some(refusal) = status
        .source()
        .and_then(|source| source.downcast_ref::<Refusal>())
    {
        return ReadEnd::Failed(refusal.clone().into_stream_error(progress));
    }
    if status.source().is_some() {
        return ReadEnd::ClientGone;
    }
    let fault = match status.code() {
        // OUT_OF_RANGE: its length prefix is over the limit; RESOURCE_EXHAUSTED: it is once decompressed.
        Code::OutOfRange | Code::ResourceExhausted => StreamFault::TooLarge {
            limit: max_request_bytes,
        },
        _ => StreamFault::Malformed,
    };
    ReadEnd::Failed(fault.with_progress(status.message().to_owned(), progress))
}

/// Starts serving one stream, which ends by `deadline` (the caller's `grpc-timeout`, if any) or when its
/// connection is `going_away`; returns its responses.
pub fn start(
    state: Arc<GatewayState>,
    call: CallContext,
    deadline: Option<Instant>,
    going_away: GoingAway,
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
            let end = read(&state, &call, deadline, &going_away, inbound, pending_tx).await;
            // The reader dropped its sender: the acker answers what is pending, then ends.
            let _ = acker.await;
            let error = match end {
                ReadEnd::HalfClosed | ReadEnd::ClientGone => None,
                ReadEnd::Draining => Some(GatewayError::Draining),
                ReadEnd::Failed(error) => Some(error),
            };
            if let Some(error) = error {
                // Bounded: what a client wrote is clipped in the error's texts.
                let text = error.to_string();
                let text = status::clip_to(&text, status::MESSAGE_MAX);
                tracing::info!(reason = error.reason(), error = %text, "a stream ended with an error");
                let _ = responses.send(Err(error.to_status())).await;
            }
            // Dropping `responses` ends the stream: with OK unless an error was sent.
        }
        .instrument(span),
    );
    ReceiverStream::new(outbound)
}

async fn read(
    state: &Arc<GatewayState>,
    call: &CallContext,
    deadline: Option<Instant>,
    going_away: &GoingAway,
    mut inbound: Streaming<v1::SendStreamRequest>,
    pending: mpsc::UnboundedSender<PendingAck>,
) -> ReadEnd {
    let budget = state.limits.max_unacked_per_stream;
    let idle_timeout = state.limits.stream_idle_timeout;
    let unacked = Arc::new(Semaphore::new(budget));
    let mut counters = HubEventsCache::new(Rpc::SendStream);
    let mut progress = StreamProgress::default();
    let interrupted = interruption(state, deadline, going_away);
    tokio::pin!(interrupted);
    loop {
        // A permit before every read: with none left the stream is not read, and HTTP/2 pushes back.
        let mut permits = tokio::select! {
            permit = Arc::clone(&unacked).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return ReadEnd::ClientGone,
            },
            why = &mut interrupted => return why.end(progress),
        };
        let message = loop {
            tokio::select! {
                message = inbound.message() => break message,
                why = &mut interrupted => return why.end(progress),
                () = tokio::time::sleep(idle_timeout) => {
                    // Idle only with every ack sent (the permit held for this read is the one not free).
                    if unacked.available_permits() + 1 >= budget {
                        return ReadEnd::Failed(GatewayError::StreamIdle { idle: idle_timeout, progress });
                    }
                }
            }
        };
        let mut request = match message {
            Ok(Some(request)) => request,
            Ok(None) => return ReadEnd::HalfClosed,
            Err(status) => return unreadable(&status, progress, state.limits.max_request_bytes),
        };
        progress.read(request.sequence);
        let (sequence, hub) = (request.sequence, std::mem::take(&mut request.event_hub));
        // Every sequence of the message takes the budget, acked or nacked: a nack holds its permit until the
        // acker takes it, so a client that sends refused messages and reads no acks is held back like any.
        let (count, refused) = match message_events(request, state.limits.max_events_per_request) {
            Ok(events) => (events.len(), Ok(events)),
            Err(Unadmitted::Nack { count, error }) => (count, Err(error)),
            Err(Unadmitted::Whole(fault, detail)) => {
                return ReadEnd::Failed(fault.with_progress(detail, progress));
            }
        };
        // A message of n events counts n toward the budget (all of it, if n is larger).
        let wanted = count.min(budget);
        if wanted > 1 {
            let more = tokio::select! {
                more = Arc::clone(&unacked).acquire_many_owned(wanted as u32 - 1) => match more {
                    Ok(more) => more,
                    Err(_) => return ReadEnd::ClientGone,
                },
                why = &mut interrupted => return why.end(progress),
            };
            permits.merge(more);
        }
        match refused {
            Ok(events) => {
                for event in events {
                    let permit = permits.split(1);
                    let ack =
                        admit(state, call, deadline, &hub, event, permit, &mut counters).await;
                    if pending.send(ack).is_err() {
                        return ReadEnd::ClientGone;
                    }
                }
            }
            Err(error) => {
                for offset in 0..count as u64 {
                    let ack = nack(
                        sequence.wrapping_add(offset),
                        error.clone(),
                        permits.split(1),
                    );
                    if pending.send(ack).is_err() {
                        return ReadEnd::ClientGone;
                    }
                }
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

/// Why a stream message's events are not admitted.
enum Unadmitted {
    /// Each of the message's `count` sequences (at most `max_events_per_request`) is nacked with `error`.
    Nack { count: usize, error: GatewayError },
    /// The message is refused as one unit and the stream ends: nacking each of its sequences would cost
    /// more than the stream's budget. (The request guard refuses such messages before they are decoded;
    /// this is the same rule for a message that did not pass through it.)
    Whole(StreamFault, String),
}

/// The events of one stream message, on consecutive sequences from the message's. A malformed message is
/// refused whole: each of its sequences nacked, or the stream ended when it has too many.
fn message_events(
    request: v1::SendStreamRequest,
    max_events: usize,
) -> Result<Vec<StreamEvent>, Unadmitted> {
    let first = request.sequence;
    let invalid = |field: &str, reason: String| GatewayError::InvalidRequest {
        field: field.into(),
        reason,
    };
    if request.events.len() > max_events {
        return Err(Unadmitted::Whole(
            StreamFault::Invalid {
                field: "events".into(),
            },
            format!(
                "at most {max_events} events per message (max_events_per_request); got {}",
                request.events.len()
            ),
        ));
    }
    match (request.event, request.events) {
        (Some(proto), events) if events.is_empty() => Ok(vec![StreamEvent {
            sequence: first,
            index: None,
            proto,
        }]),
        (None, events) if events.is_empty() => Err(Unadmitted::Nack {
            count: 1,
            error: invalid("event", "is required".into()),
        }),
        (Some(_), events) => Err(Unadmitted::Nack {
            count: events.len(),
            error: invalid(
                "events",
                "cannot be set together with `event`: send one or the other".into(),
            ),
        }),
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

/// An ack that is ready at once: the event was refused before it was enqueued. It holds its share of the
/// budget (`permit`) until the acker takes it.
fn nack(sequence: u64, error: GatewayError, permit: Option<OwnedSemaphorePermit>) -> PendingAck {
    let ack = v1::StreamAck {
        sequence,
        status: Some(error.to_rpc_status()),
        partition_id: String::new(),
    };
    async move {
        drop(permit);
        ack
    }
    .boxed()
}

/// Checks and enqueues one event (in arrival order, so each key keeps it); the ack resolves with its outcome,
/// by the stream's deadline at the latest. The event's share of the unacked budget (`permit`; none once a
/// message has used all of it) is released when its outcome is known.
async fn admit(
    state: &Arc<GatewayState>,
    call: &CallContext,
    stream_deadline: Option<Instant>,
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
        Err(error) => return nack(sequence, error, permit),
    };
    // Counted from here on: an unknown hub's name is the caller's text, never a label.
    let mut counted = counters.get(&hub).receive(1);
    let refuse = |mut counted: Outcomes, error: GatewayError, permit| {
        counted.failed(error.reason(), 1);
        nack(sequence, error, permit)
    };
    if let Err(error) = call
        .check_grant(&hub, 1)
        .and_then(|()| state.charge(call, 1))
    {
        return refuse(counted, error, permit);
    }
    let own = Instant::now() + state.send_timeout;
    let deadline = stream_deadline.map_or(own, |stream| stream.min(own));
    match state.enqueue(call, &hub, proto, deadline, &field).await {
        Ok((ticket, share)) => async move {
            let outcome = ticket.outcome_by(deadline).await;
            drop((permit, share));
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
        Err(error) => refuse(counted, error, permit),
    }
}

/// Awaits pending acks and sends them, grouping those ready at the same time, until the reader is done and
/// nothing is pending; stops as soon as the client is gone (nobody reads the responses any more).
async fn acknowledge(
    mut pending: mpsc::UnboundedReceiver<PendingAck>,
    responses: mpsc::Sender<Result<v1::SendStreamResponse, Status>>,
) {
    let mut waiting = FuturesUnordered::new();
    let mut reading = true;
    while reading || !waiting.is_empty() {
        tokio::select! {
            () = responses.closed() => return,
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
