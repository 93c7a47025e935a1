//! The clients: unary senders and streams at a fixed rate, each event with a unique id (its body and its
//! message-id), and the ledger of what each event was answered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use eventhub_gateway::proto::google::rpc;
use eventhub_gateway::proto::v1;
use eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::HUB;

/// What one event was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Accepted: the gateway says Event Hubs stored it.
    Ok,
    /// Refused by the gateway with this `ErrorInfo.reason`.
    Failed(String),
    /// The call or stream ended without an answer from the gateway (its connection broke, or the gateway was
    /// gone); the text says how.
    Broken(String),
    /// Sent and never answered although its call or stream ended normally: a defect.
    Unanswered,
}

/// Every event offered in one scenario and its answer.
pub struct Ledger {
    started: Instant,
    answers: Mutex<HashMap<String, Answer>>,
    offered: AtomicU64,
    /// Answers to an event that already had one (a defect).
    double_answers: AtomicU64,
    /// OK answers per second since `started`.
    ok_per_second: Mutex<Vec<u64>>,
}

impl Ledger {
    /// An empty ledger whose clock starts now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            answers: Mutex::new(HashMap::new()),
            offered: AtomicU64::new(0),
            double_answers: AtomicU64::new(0),
            ok_per_second: Mutex::new(Vec::new()),
        })
    }

    /// Seconds since the ledger started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn offer(&self) {
        self.offered.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn answer(&self, id: String, answer: Answer) {
        if answer == Answer::Ok {
            let second = self.started.elapsed().as_secs() as usize;
            let mut buckets = self.ok_per_second.lock();
            if buckets.len() <= second {
                buckets.resize(second + 1, 0);
            }
            buckets[second] += 1;
        }
        if self.answers.lock().insert(id, answer).is_some() {
            self.double_answers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events offered so far.
    pub fn offered(&self) -> u64 {
        self.offered.load(Ordering::Relaxed)
    }

    /// Answers to an event that already had one.
    pub fn double_answers(&self) -> u64 {
        self.double_answers.load(Ordering::Relaxed)
    }

    /// OK answers per second since the start.
    pub fn ok_per_second(&self) -> Vec<u64> {
        self.ok_per_second.lock().clone()
    }

    /// Every answered event so far.
    pub fn answers(&self) -> HashMap<String, Answer> {
        self.answers.lock().clone()
    }
}

/// Which clients run, and how fast.
#[derive(Clone, Debug)]
pub struct LoadShape {
    /// Unary `SendEvent` senders, each one call at a time.
    pub unary_clients: usize,
    /// Events per second of each unary sender.
    pub unary_rate: f64,
    /// `SendStream` clients.
    pub streams: usize,
    /// Events per second of each stream.
    pub stream_rate: f64,
    /// Body bytes per event (the id, padded).
    pub body_bytes: usize,
    /// A client's deadline for one unary call; longer than the gateway's send timeout, so the gateway answers.
    pub call_deadline: Duration,
}

impl LoadShape {
    /// Events per second offered by all clients together.
    pub fn rate(&self) -> f64 {
        self.unary_clients as f64 * self.unary_rate + self.streams as f64 * self.stream_rate
    }
}

/// A stream client's extra behaviour.
#[derive(Clone, Debug, Default)]
pub struct StreamQuirk {
    /// Sleep this long before reading each response while the load runs (a client slow to read its acks); it
    /// catches up once the load stops.
    pub slow_reader: Option<Duration>,
}

/// The running clients; [`Load::stop`] stops offering and waits for every answer.
pub struct Load {
    stopping: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Load {
    /// Starts the clients of `shape` against `gateway`, answering into `ledger`; `extra` are more streams (with
    /// their own quirks and addresses, e.g. through a proxy that can make them vanish), named by their label.
    pub fn start(
        gateway: SocketAddr,
        shape: &LoadShape,
        ledger: &Arc<Ledger>,
        extra: Vec<(String, SocketAddr, StreamQuirk)>,
    ) -> Self {
        let stopping = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        let channel = channel(gateway);
        for worker in 0..shape.unary_clients {
            tasks.spawn(unary_sender(
                format!("u{worker}"),
                channel.clone(),
                shape.clone(),
                Arc::clone(ledger),
                Arc::clone(&stopping),
            ));
        }
        let streams = (0..shape.streams)
            .map(|n| (format!("s{n}"), gateway, StreamQuirk::default()))
            .chain(extra);
        for (label, address, quirk) in streams {
            tasks.spawn(stream_sender(
                label,
                channel_for(address, gateway, &channel),
                shape.clone(),
                quirk,
                Arc::clone(ledger),
                Arc::clone(&stopping),
            ));
        }
        Self { stopping, tasks }
    }

    /// Stops offering events and waits for the answers to those already sent; clients still waiting after
    /// `bound` are abandoned (their events stay unanswered in the ledger).
    pub async fn stop(mut self, bound: Duration) -> bool {
        self.stopping.store(true, Ordering::Relaxed);
        let finished = tokio::time::timeout(bound, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        self.tasks.abort_all();
        finished
    }
}

fn channel(address: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{address}"))
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .connect_lazy()
        })
        .unwrap_or_else(|_| unreachable!("an IP address and port make a valid URI"))
}

/// Extra streams reach the gateway through their own address (their own connection), others share one.
fn channel_for(address: SocketAddr, gateway: SocketAddr, shared: &Channel) -> Channel {
    if address == gateway {
        shared.clone()
    } else {
        channel(address)
    }
}

fn event(id: &str, body_bytes: usize, sequence: u64) -> v1::Event {
    let mut body = String::with_capacity(body_bytes.max(id.len()));
    body.push_str(id);
    body.push(' ');
    while body.len() < body_bytes {
        body.push('.');
    }
    v1::Event {
        body: Some(v1::event::Body::Text(body)),
        // Sixteen keys: several batching routes, each kept in order.
        partition_key: format!("key-{}", sequence % 16),
        message_id: id.to_owned(),
        ..Default::default()
    }
}

/// The id an event's body starts with.
pub fn id_of_body(body: &str) -> &str {
    body.split(' ').next().unwrap_or(body)
}

/// The `ErrorInfo.reason` of a `google.rpc.Status`, if it has one.
fn reason_of_details(status: &rpc::Status) -> Option<String> {
    status
        .details
        .iter()
        .find(|any| any.type_url.ends_with("/google.rpc.ErrorInfo"))
        .and_then(|any| rpc::ErrorInfo::decode(any.value.as_slice()).ok())
        .map(|info| info.reason)
}

/// A failed call's answer: the gateway's reason when it answered, else how the call broke.
fn answer_of_status(status: &tonic::Status) -> Answer {
    let reason = rpc::Status::decode(status.details())
        .ok()
        .and_then(|details| reason_of_details(&details));
    match reason {
        Some(reason) => Answer::Failed(reason),
        None => Answer::Broken(format!("{:?}", status.code())),
    }
}

async fn unary_sender(
    label: String,
    channel: Channel,
    shape: LoadShape,
    ledger: Arc<Ledger>,
    stopping: Arc<AtomicBool>,
) {
    let mut client = EventHubGatewayClient::new(channel);
    let mut ticks = interval(Duration::from_secs_f64(1.0 / shape.unary_rate));
    // A sender held up by a slow answer sends at its pace afterwards, not in a burst: a real caller waits.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    while !stopping.load(Ordering::Relaxed) {
        ticks.tick().await;
        let id = format!("{label}-{sequence}");
        let mut request = tonic::Request::new(v1::SendEventRequest {
            event_hub: HUB.to_owned(),
            event: Some(event(&id, shape.body_bytes, sequence)),
        });
        request.set_timeout(shape.call_deadline);
        sequence += 1;
        ledger.offer();
        let answer = match client.send_event(request).await {
            Ok(_) => Answer::Ok,
            Err(status) => answer_of_status(&status),
        };
        ledger.answer(id, answer);
    }
}

/// The sequences a stream has sent and not had answered, with their ids.
type Pending = Arc<Mutex<HashMap<u64, String>>>;

async fn stream_sender(
    label: String,
    channel: Channel,
    shape: LoadShape,
    quirk: StreamQuirk,
    ledger: Arc<Ledger>,
    stopping: Arc<AtomicBool>,
) {
    let mut client = EventHubGatewayClient::new(channel);
    let mut next_id = 0u64;
    let mut attempt = 0u32;
    while !stopping.load(Ordering::Relaxed) {
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (requests, outgoing) = mpsc::channel::<v1::SendStreamRequest>(64);
        let call = client.send_stream(ReceiverStream::new(outgoing));
        let producer = {
            let label = format!("{label}.{attempt}");
            let (shape, ledger, stopping, pending) = (
                shape.clone(),
                Arc::clone(&ledger),
                Arc::clone(&stopping),
                Arc::clone(&pending),
            );
            let first = next_id;
            tokio::spawn(async move {
                offer_stream(label, first, requests, shape, ledger, stopping, pending).await
            })
        };
        let outcome = match call.await {
            Ok(response) => {
                read_acks(response.into_inner(), &pending, &ledger, &quirk, &stopping).await
            }
            Err(status) => Err(status),
        };
        // The offering side must be gone before its pending events are settled, or one could slip in after.
        producer.abort();
        let _ = producer.await;
        next_id += 1_000_000;
        attempt += 1;
        let left: Vec<String> = pending.lock().drain().map(|(_, id)| id).collect();
        for id in left {
            let answer = match &outcome {
                Ok(()) => Answer::Unanswered,
                Err(status) => answer_of_status(status),
            };
            ledger.answer(id, answer);
        }
        if outcome.is_err() && !stopping.load(Ordering::Relaxed) {
            sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Sends events into one stream at the shape's rate until stopping, then closes its side.
async fn offer_stream(
    label: String,
    first: u64,
    requests: mpsc::Sender<v1::SendStreamRequest>,
    shape: LoadShape,
    ledger: Arc<Ledger>,
    stopping: Arc<AtomicBool>,
    pending: Pending,
) {
    let mut ticks = interval(Duration::from_secs_f64(1.0 / shape.stream_rate));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sequence = first;
    while !stopping.load(Ordering::Relaxed) {
        ticks.tick().await;
        let id = format!("{label}-{sequence}");
        let request = v1::SendStreamRequest {
            event_hub: HUB.to_owned(),
            sequence,
            event: Some(event(&id, shape.body_bytes, sequence)),
            ..Default::default()
        };
        pending.lock().insert(sequence, id);
        ledger.offer();
        if requests.send(request).await.is_err() {
            return;
        }
        sequence += 1;
    }
}

/// Reads acks until the stream ends: `Ok` when it ended cleanly, the status when it failed.
async fn read_acks(
    mut acks: tonic::Streaming<v1::SendStreamResponse>,
    pending: &Pending,
    ledger: &Ledger,
    quirk: &StreamQuirk,
    stopping: &AtomicBool,
) -> Result<(), tonic::Status> {
    loop {
        if let Some(pause) = quirk
            .slow_reader
            .filter(|_| !stopping.load(Ordering::Relaxed))
        {
            sleep(pause).await;
        }
        let Some(response) = acks.message().await? else {
            return Ok(());
        };
        for ack in response.acks {
            let id = pending.lock().remove(&ack.sequence);
            let Some(id) = id else {
                // An ack for a sequence never sent or already answered.
                ledger.double_answers.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let answer = match ack.status {
                Some(status) if status.code != 0 => Answer::Failed(
                    reason_of_details(&status).unwrap_or_else(|| format!("code {}", status.code)),
                ),
                _ => Answer::Ok,
            };
            ledger.answer(id, answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_carries_its_id_as_body_prefix_and_message_id() {
        let event = event("s1.0-7", 64, 7);
        let Some(v1::event::Body::Text(body)) = &event.body else {
            panic!("a text body");
        };
        assert_eq!(body.len(), 64);
        assert_eq!(id_of_body(body), "s1.0-7");
        assert_eq!(event.message_id, "s1.0-7");
    }

    #[test]
    fn a_second_answer_to_one_event_is_counted() {
        let ledger = Ledger::new();
        ledger.answer("a".into(), Answer::Ok);
        ledger.answer("b".into(), Answer::Failed("OVERLOADED".into()));
        assert_eq!(ledger.double_answers(), 0);
        ledger.answer("a".into(), Answer::Ok);
        assert_eq!(ledger.double_answers(), 1);
        assert_eq!(ledger.ok_per_second().iter().sum::<u64>(), 2);
    }

    #[test]
    fn a_status_without_details_is_a_broken_call_and_one_with_a_reason_is_an_answer() {
        assert_eq!(
            answer_of_status(&tonic::Status::unavailable("connection refused")),
            Answer::Broken("Unavailable".into())
        );
        let info = rpc::ErrorInfo {
            reason: "DRAINING".into(),
            ..Default::default()
        };
        let details = rpc::Status {
            code: 14,
            message: "draining".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                value: info.encode_to_vec(),
            }],
        };
        let status = tonic::Status::with_details(
            tonic::Code::Unavailable,
            "draining",
            details.encode_to_vec().into(),
        );
        assert_eq!(answer_of_status(&status), Answer::Failed("DRAINING".into()));
    }
}
