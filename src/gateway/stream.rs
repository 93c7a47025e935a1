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

use std::collections::{HashMap, VecDeque};
use std::error::Error as _;
use std::sync::Arc;
use std::time::Instant;

use eventhub_producer::{Outcome, OutcomeSink, Pledge};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use tracing::Instrument;

use super::guard::Refusal;
use super::shares::HeldShare;
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

/// What the acker hears: from the reader in reading order, from the producer by runs of tags. An event's
/// outcome can come before the reader's word that it was enqueued (the producer runs on other threads).
enum Heard {
    /// An event refused before it was enqueued: its ack, ready, and its share of the unacked budget.
    Refused(v1::StreamAck, Option<OwnedSemaphorePermit>),
    /// An event enqueued under the next tag (tags count up from 0 in reading order).
    Enqueued(Waiting),
    /// The outcome of the events tagged `first` to `first + count - 1`.
    Outcome {
        first: u64,
        count: u64,
        outcome: Outcome,
    },
    /// The reader is done: nothing more will be enqueued.
    ReadingDone,
}

/// An enqueued event waiting for its outcome, holding its share of the unacked budget and of its client's
/// buffer until then.
struct Waiting {
    sequence: u64,
    /// Its place in its message's `events` (for the field its errors name).
    index: Option<usize>,
    /// When it is answered without its outcome: never before any earlier event's (see `Acker`).
    deadline: Instant,
    pledge: Pledge,
    counted: Outcomes,
    _held: (Option<OwnedSemaphorePermit>, HeldShare),
}

/// The producer's way into a stream's acker: one message per run of its events in a batch.
struct StreamSink(mpsc::UnboundedSender<Heard>);

impl OutcomeSink for StreamSink {
    fn complete(&self, first: u64, count: u64, outcome: &Outcome) {
        // The acker may have gone with its client: nobody is left to tell.
        let _ = self.0.send(Heard::Outcome {
            first,
            count,
            outcome: outcome.clone(),
        });
    }
}

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
            let (heard, hearing) = mpsc::unbounded_channel();
            let acker = Acker::new(Arc::clone(&state), responses.clone());
            let acker = tokio::spawn(acker.run(hearing).in_current_span());
            let end = read(&state, &call, deadline, &going_away, inbound, heard.clone()).await;
            // The acker answers what is pending, then ends.
            let _ = heard.send(Heard::ReadingDone);
            drop(heard);
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
    heard: mpsc::UnboundedSender<Heard>,
) -> ReadEnd {
    let sink: Arc<dyn OutcomeSink> = Arc::new(StreamSink(heard.clone()));
    let mut next_tag = 0;
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
                    let tagged = Tagged {
                        sink: &sink,
                        tag: next_tag,
                    };
                    let admitted = admit(
                        state,
                        call,
                        deadline,
                        &hub,
                        event,
                        permit,
                        tagged,
                        &mut counters,
                    )
                    .await;
                    if matches!(admitted, Heard::Enqueued(_)) {
                        next_tag += 1;
                    }
                    if heard.send(admitted).is_err() {
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
                    if heard.send(ack).is_err() {
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
fn nack(sequence: u64, error: GatewayError, permit: Option<OwnedSemaphorePermit>) -> Heard {
    let ack = v1::StreamAck {
        sequence,
        status: Some(error.to_rpc_status()),
        partition_id: String::new(),
    };
    Heard::Refused(ack, permit)
}

/// Where an admitted event's outcome goes: the stream's sink, under the next tag.
struct Tagged<'a> {
    sink: &'a Arc<dyn OutcomeSink>,
    tag: u64,
}

/// Checks and enqueues one event (in arrival order, so each key keeps it) under `tagged.tag`, or refuses
/// it. An enqueued event's share of the unacked budget (`permit`; none once a message has used all of it)
/// is released when its outcome is known, by the stream's deadline at the latest.
#[allow(clippy::too_many_arguments)]
async fn admit(
    state: &Arc<GatewayState>,
    call: &CallContext,
    stream_deadline: Option<Instant>,
    hub: &str,
    event: StreamEvent,
    permit: Option<OwnedSemaphorePermit>,
    tagged: Tagged<'_>,
    counters: &mut HubEventsCache,
) -> Heard {
    let StreamEvent {
        sequence,
        index,
        proto,
    } = event;
    // The field path its errors name, built only for an error.
    let field = move || field_path(index);
    let hub = match state.served_hub(hub) {
        Ok(hub) => hub,
        Err(error) => return nack(sequence, error, permit),
    };
    // Counted from here on: an unknown hub's name is the caller's text, never a label.
    let counted = counters.get(hub).receive(1);
    let refuse = |mut counted: Outcomes, error: GatewayError, permit| {
        counted.failed(error.reason(), 1);
        nack(sequence, error, permit)
    };
    if let Err(error) = call
        .check_grant(hub, 1)
        .and_then(|()| state.charge(call, 1))
    {
        return refuse(counted, error, permit);
    }
    let own = Instant::now() + state.send_timeout;
    let deadline = stream_deadline.map_or(own, |stream| stream.min(own));
    let (event, share) = match state.prepare(call, hub, proto, deadline, &field).await {
        Ok(prepared) => prepared,
        Err(error) => return refuse(counted, error, permit),
    };
    let enqueued = state
        .producer
        .enqueue_tagged(hub, event, deadline, tagged.sink, tagged.tag)
        .await;
    match enqueued {
        Ok(pledge) => Heard::Enqueued(Waiting {
            sequence,
            index,
            deadline,
            pledge,
            counted,
            _held: (permit, share),
        }),
        Err(error) => refuse(counted, GatewayError::event(field(), error), permit),
    }
}

/// Answers a stream's events: acks the refused at once, each enqueued one with its outcome or, failing
/// that, at its deadline; groups acks that are ready together. One timer serves the whole stream: an
/// event's deadline is the stream's or the gateway's send timeout from its arrival, whichever is first, so
/// no event's deadline comes before an earlier event's.
struct Acker {
    state: Arc<GatewayState>,
    responses: mpsc::Sender<Result<v1::SendStreamResponse, Status>>,
    waiting: ByTag<Waiting>,
    /// Acks ready to send.
    acks: Vec<v1::StreamAck>,
}

impl Acker {
    fn new(
        state: Arc<GatewayState>,
        responses: mpsc::Sender<Result<v1::SendStreamResponse, Status>>,
    ) -> Self {
        Self {
            state,
            responses,
            waiting: ByTag::default(),
            acks: Vec::new(),
        }
    }

    /// Runs until the reader is done and every event it read is answered; stops as soon as the client is
    /// gone (nobody reads the responses any more).
    async fn run(mut self, mut hearing: mpsc::UnboundedReceiver<Heard>) {
        let mut reading = true;
        let lapse = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(lapse);
        let mut lapse_at = None;
        while reading || !self.waiting.is_empty() {
            let next_deadline = self.next_deadline();
            if next_deadline != lapse_at
                && let Some(at) = next_deadline
            {
                lapse.as_mut().reset(at.into());
            }
            lapse_at = next_deadline;
            tokio::select! {
                () = self.responses.closed() => return,
                heard = hearing.recv() => match heard {
                    Some(heard) => reading &= self.hear(heard),
                    None => reading = false,
                },
                // The deadline the timer was set for has passed, whatever the clocks say (no spin on it).
                () = &mut lapse, if lapse_at.is_some() => {
                    self.lapse(lapse_at.map_or_else(Instant::now, |at| at.max(Instant::now())));
                }
            }
            // Take in whatever else is ready before sending, so acks ready together go together.
            while reading || !self.waiting.is_empty() {
                match hearing.try_recv() {
                    Ok(heard) => reading &= self.hear(heard),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        reading = false;
                        break;
                    }
                }
                if self.acks.len() >= MAX_ACKS_PER_RESPONSE && !self.flush().await {
                    return;
                }
            }
            if !self.flush().await {
                return;
            }
        }
    }

    /// Takes in one message; false once the reader is done.
    fn hear(&mut self, heard: Heard) -> bool {
        let acks = &mut self.acks;
        match heard {
            Heard::Refused(ack, permit) => {
                drop(permit);
                acks.push(ack);
            }
            Heard::Enqueued(waiting) => {
                if let Some((waiting, outcome)) = self.waiting.push(waiting) {
                    acks.push(ack(waiting, outcome));
                }
            }
            Heard::Outcome {
                first,
                count,
                outcome,
            } => self
                .waiting
                .complete(first, count, &outcome, |waiting, outcome| {
                    acks.push(ack(waiting, outcome));
                }),
            Heard::ReadingDone => return false,
        }
        true
    }

    /// The deadline of the oldest event still waiting: the earliest of all.
    fn next_deadline(&self) -> Option<Instant> {
        self.waiting.oldest().map(|waiting| waiting.deadline)
    }

    /// Answers every event whose deadline is past `now` without its outcome.
    fn lapse(&mut self, now: Instant) {
        while self.next_deadline().is_some_and(|deadline| deadline <= now) {
            if let Some(waiting) = self.waiting.take_oldest() {
                let lapsed = self.state.producer.deadline_passed(&waiting.pledge);
                self.acks.push(ack(waiting, Err(lapsed)));
            }
        }
    }

    /// Sends the acks ready, at most `MAX_ACKS_PER_RESPONSE` per response; false when the client is gone.
    async fn flush(&mut self) -> bool {
        while !self.acks.is_empty() {
            let rest = if self.acks.len() > MAX_ACKS_PER_RESPONSE {
                self.acks.split_off(MAX_ACKS_PER_RESPONSE)
            } else {
                Vec::new()
            };
            let acks = std::mem::replace(&mut self.acks, rest);
            if self
                .responses
                .send(Ok(v1::SendStreamResponse { acks }))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}

/// The ack of one event with its outcome; its shares are released as it is dropped here.
fn ack(waiting: Waiting, outcome: Outcome) -> v1::StreamAck {
    let Waiting {
        sequence,
        index,
        mut counted,
        ..
    } = waiting;
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
            let error = GatewayError::event(field_path(index), error);
            counted.failed(error.reason(), 1);
            v1::StreamAck {
                sequence,
                status: Some(error.to_rpc_status()),
                partition_id: String::new(),
            }
        }
    }
}

/// A stream's enqueued events by tag (tags count up from 0 in enqueue order), and the outcomes heard before
/// their event was: each event is taken out once, by its outcome or as the oldest at its deadline.
struct ByTag<T> {
    /// From `first_tag` on; `None` once taken.
    waiting: VecDeque<Option<T>>,
    first_tag: u64,
    /// Outcomes of tags not pushed yet (at most the stream's unacked budget).
    early: HashMap<u64, Outcome>,
}

impl<T> Default for ByTag<T> {
    fn default() -> Self {
        Self {
            waiting: VecDeque::new(),
            first_tag: 0,
            early: HashMap::new(),
        }
    }
}

impl<T> ByTag<T> {
    /// Adds the event of the next tag; gives it back with its outcome if that was heard first.
    fn push(&mut self, entry: T) -> Option<(T, Outcome)> {
        let tag = self.first_tag + self.waiting.len() as u64;
        match self.early.remove(&tag) {
            Some(outcome) => {
                self.waiting.push_back(None); // its tag's place
                self.forget_taken();
                Some((entry, outcome))
            }
            None => {
                self.waiting.push_back(Some(entry));
                None
            }
        }
    }

    /// Hands each event tagged `first` to `first + count - 1` that still waits to `answer`, with `outcome`;
    /// keeps the outcome of a tag not pushed yet for when it is.
    fn complete(
        &mut self,
        first: u64,
        count: u64,
        outcome: &Outcome,
        mut answer: impl FnMut(T, Outcome),
    ) {
        for tag in first..first.saturating_add(count) {
            match tag.checked_sub(self.first_tag).map(|at| at as usize) {
                // Taken already, at its deadline.
                None => {}
                Some(at) if at < self.waiting.len() => {
                    if let Some(entry) = self.waiting[at].take() {
                        answer(entry, outcome.clone());
                    }
                }
                Some(_) => {
                    self.early.insert(tag, outcome.clone());
                }
            }
        }
        self.forget_taken();
    }

    /// The oldest event still waiting.
    fn oldest(&self) -> Option<&T> {
        self.waiting.front().and_then(Option::as_ref)
    }

    /// Takes the oldest event still waiting out.
    fn take_oldest(&mut self) -> Option<T> {
        // The front is always an event still waiting (`forget_taken`).
        let oldest = self.waiting.pop_front()?;
        self.first_tag += 1;
        self.forget_taken();
        oldest
    }

    /// Whether no event waits.
    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Drops the places of taken events at the front, so the front is the oldest still waiting.
    fn forget_taken(&mut self) {
        while let Some(None) = self.waiting.front() {
            self.waiting.pop_front();
            self.first_tag += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventhub_producer::{Receipt, SendError};

    fn ok() -> Outcome {
        Ok(Receipt { partition_id: None })
    }

    fn failed() -> Outcome {
        Err(SendError::Closed)
    }

    /// Completes `first..first + count` and returns what was handed out: (entry, ok?).
    fn complete(
        queue: &mut ByTag<&'static str>,
        first: u64,
        count: u64,
        outcome: Outcome,
    ) -> Vec<(&'static str, bool)> {
        let mut answered = Vec::new();
        queue.complete(first, count, &outcome, |entry, outcome| {
            answered.push((entry, outcome.is_ok()))
        });
        answered
    }

    #[test]
    fn each_event_is_taken_once_by_its_outcome_or_as_the_oldest() {
        let mut queue = ByTag::default();
        for entry in ["a", "b", "c", "d"] {
            assert!(queue.push(entry).is_none());
        }
        // A batch held b and c.
        assert_eq!(complete(&mut queue, 1, 2, ok()), [("b", true), ("c", true)]);
        assert_eq!(queue.oldest(), Some(&"a"));
        // a's deadline passes: it is taken as the oldest, and its late outcome finds nothing.
        assert_eq!(queue.take_oldest(), Some("a"));
        assert_eq!(queue.oldest(), Some(&"d"), "b and c are gone with a");
        assert!(complete(&mut queue, 0, 1, failed()).is_empty());
        assert_eq!(complete(&mut queue, 3, 1, failed()), [("d", false)]);
        assert!(queue.is_empty());
        assert_eq!(queue.take_oldest(), None);
    }

    #[test]
    fn an_outcome_heard_before_its_event_waits_for_it() {
        let mut queue = ByTag::default();
        assert!(queue.push("a").is_none());
        // The route answered tags 1 and 2 before the reader said they were enqueued.
        assert!(complete(&mut queue, 1, 2, failed()).is_empty());
        assert_eq!(queue.oldest(), Some(&"a"));
        let (entry, outcome) = queue.push("b").expect("its outcome came first");
        assert_eq!(entry, "b");
        assert!(outcome.is_err());
        assert!(queue.push("c").is_some());
        // Tag 3 has no outcome yet: it waits behind a.
        assert!(queue.push("d").is_none());
        assert_eq!(complete(&mut queue, 0, 1, ok()), [("a", true)]);
        assert_eq!(queue.oldest(), Some(&"d"));
        assert_eq!(complete(&mut queue, 3, 1, ok()), [("d", true)]);
        assert!(queue.is_empty());
    }
}
