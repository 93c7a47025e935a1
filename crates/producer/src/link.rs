//! One sender link: many batches in flight (a window), each disposition matched to its batch, and every
//! waiting batch answered when the link or its connection goes away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fe2o3_amqp::Sender;
use fe2o3_amqp::link::{DetachError, LinkStateError, SendError as LinkSendError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp_types::messaging::Outcome;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::batch::SealedBatch;
use super::error::{AmqpCondition, SendError, ServiceError};

/// How long a closing link waits to detach cleanly.
const DETACH_WAIT: Duration = Duration::from_secs(2);

struct Delivery {
    batch: Arc<SealedBatch>,
    reply: oneshot::Sender<Result<(), SendError>>,
}

/// A handle to a sender link task. Cheap to share; sending queues onto the link's window.
pub struct Link {
    address: String,
    partition: Option<String>,
    max_message_size: u64,
    requests: mpsc::Sender<Delivery>,
    load: AtomicUsize,
    last_used: Mutex<Instant>,
    stop: CancellationToken,
    ended: CancellationToken,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("address", &self.address)
            .field("load", &self.load())
            .finish_non_exhaustive()
    }
}

/// How a link behaves: its window and how long it waits for a disposition.
#[derive(Clone, Copy, Debug)]
pub struct LinkSettings {
    /// Most unsettled transfers at once.
    pub window: usize,
    /// Longest wait for one disposition before the link is presumed lost.
    pub disposition_wait: Duration,
}

impl Link {
    /// Attaches a sender to `address` (`hub` or `hub/Partitions/id`) and starts its task. The task ends, failing
    /// what is in flight as a lost connection, when `connection_lost` is cancelled.
    pub async fn attach(
        session: &mut SessionHandle<()>,
        address: String,
        partition: Option<String>,
        settings: LinkSettings,
        connection_lost: CancellationToken,
    ) -> Result<Arc<Self>, SendError> {
        let sender = Sender::builder()
            .name(format!("{address}-{}", uuid::Uuid::new_v4()))
            .target(address.clone())
            .attach(session)
            .await
            .map_err(|error| match error {
                fe2o3_amqp::link::SenderAttachError::RemoteClosedWithError(error) => {
                    SendError::Service(ServiceError::from(&error))
                }
                other => SendError::Connection(format!("attaching a sender to {address}: {other}")),
            })?;
        // 0 or absent means no limit; the service always announces one.
        let max_message_size = sender
            .max_message_size()
            .filter(|&size| size > 0)
            .unwrap_or(u64::MAX);
        let (requests, receiver) = mpsc::channel(settings.window);
        let link = Arc::new(Self {
            address,
            partition,
            max_message_size,
            requests,
            load: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            stop: CancellationToken::new(),
            ended: CancellationToken::new(),
        });
        tokio::spawn(run(
            sender,
            receiver,
            settings,
            connection_lost,
            Arc::clone(&link),
        ));
        Ok(link)
    }

    /// The link's target address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The partition it sends to, if it is a partition link.
    pub fn partition(&self) -> Option<&str> {
        self.partition.as_deref()
    }

    /// The link's `max-message-size`.
    pub fn max_message_size(&self) -> u64 {
        self.max_message_size
    }

    /// Batches queued or unsettled on it.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    /// Whether it can take batches.
    pub fn is_usable(&self) -> bool {
        !self.stop.is_cancelled() && !self.ended.is_cancelled()
    }

    /// Whether its task has ended.
    pub fn has_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// When it last took a batch.
    pub fn last_used(&self) -> Instant {
        *self.last_used.lock()
    }

    /// Stops taking batches; the link detaches once those in flight are settled.
    pub fn close(&self) {
        self.stop.cancel();
    }

    /// Completes when its task has ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Sends one batch and waits for its disposition. The batch goes on the wire (its events' deadlines no
    /// longer answer them) when the link's window takes it; if every event's deadline passed first, it is not
    /// sent and the answer is `DeadlineExceeded`.
    pub async fn send(&self, batch: Arc<SealedBatch>) -> Result<(), SendError> {
        self.load.fetch_add(1, Ordering::Relaxed);
        let _guard = DecrementOnDrop(&self.load);
        *self.last_used.lock() = Instant::now();
        let lost = || SendError::Connection(format!("the link to {} closed", self.address));
        let (reply, outcome) = oneshot::channel();
        self.requests
            .send(Delivery { batch, reply })
            .await
            .map_err(|_| lost())?;
        outcome.await.unwrap_or_else(|_| Err(lost()))
    }
}

/// Takes one back from a counter when dropped, however the holder's future ends (done, failed or cancelled).
pub(crate) struct DecrementOnDrop<'a>(pub(crate) &'a AtomicUsize);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run(
    mut sender: Sender,
    mut requests: mpsc::Receiver<Delivery>,
    settings: LinkSettings,
    connection_lost: CancellationToken,
    link: Arc<Link>,
) {
    // Replies live outside the disposition futures so that a link that ends can answer them at once; each with
    // its batch, which an answer without an outcome marks in doubt.
    let mut replies: HashMap<u64, Delivery> = HashMap::new();
    let mut pending = FuturesUnordered::new();
    let mut next_id = 0u64;
    let mut stopping = false;
    let mut drained = false;
    let lost = || SendError::Connection("the connection to Event Hubs was lost".into());
    let end = loop {
        tokio::select! {
            biased;
            () = connection_lost.cancelled() => break lost(),
            Some((id, result)) = pending.next(), if !pending.is_empty() => {
                let result: Result<(), SendError> = result;
                let broken = matches!(result, Err(SendError::Connection(_)));
                if let Some(Delivery { batch, reply }) = replies.remove(&id) {
                    if broken {
                        batch.mark_in_doubt();
                    }
                    let _ = reply.send(result.clone());
                }
                if broken {
                    break result.err().unwrap_or_else(lost);
                }
            }
            request = requests.recv(), if !drained && pending.len() < settings.window => {
                match request {
                    None => drained = true,
                    Some(Delivery { batch, reply }) => {
                let Some(transfer) = batch.transfer_for_wire() else {
                    let _ = reply.send(Err(SendError::DeadlineExceeded { last_error: None }));
                    continue;
                };
                let sent = tokio::select! {
                    sent = sender.send_batchable_ref(&*transfer) => sent,
                    () = connection_lost.cancelled() => {
                        batch.mark_in_doubt();
                        let _ = reply.send(Err(lost()));
                        break lost();
                    }
                };
                match sent {
                    Ok(delivery) => {
                        next_id += 1;
                        let id = next_id;
                        replies.insert(id, Delivery { batch, reply });
                        let wait = settings.disposition_wait;
                        pending.push(async move {
                            let result = match tokio::time::timeout(wait, delivery).await {
                                Ok(Ok(outcome)) => outcome_result(outcome),
                                Ok(Err(error)) => Err(link_error(error)),
                                Err(_) => Err(SendError::Connection(format!(
                                    "no disposition within {wait:?}; presuming the link lost"
                                ))),
                            };
                            (id, result)
                        });
                    }
                    Err(error) => {
                        let error = link_error(error);
                        if matches!(error, SendError::Connection(_)) {
                            batch.mark_in_doubt(); // part of it may have been written
                        }
                        let _ = reply.send(Err(error.clone()));
                        if !matches!(error, SendError::TooLarge { .. }) {
                            break error;
                        }
                    }
                }
                    }
                }
            }
            () = link.stop.cancelled(), if !stopping => {
                stopping = true;
                requests.close();
            }
        }
        if drained && pending.is_empty() {
            break SendError::Closed;
        }
    };
    link.stop.cancel();
    link.ended.cancel();
    requests.close();
    // Whatever still waits gets the reason the link ended: retryable for a lost link, so it is resent elsewhere.
    let reason = match end {
        SendError::Closed => SendError::Connection(format!("the link to {} closed", link.address)),
        other => other,
    };
    for (_, Delivery { batch, reply }) in replies.drain() {
        batch.mark_in_doubt();
        let _ = reply.send(Err(reason.clone()));
    }
    while let Ok(Delivery { reply, .. }) = requests.try_recv() {
        let _ = reply.send(Err(reason.clone()));
    }
    drop(pending);
    debug!(address = %link.address, reason = %reason, "sender link ended");
    if !connection_lost.is_cancelled() {
        let _ = tokio::time::timeout(DETACH_WAIT, sender.close()).await;
    }
}

/// The outcome of a disposition: only Accepted is a success.
fn outcome_result(outcome: Outcome) -> Result<(), SendError> {
    match outcome {
        Outcome::Accepted(_) => Ok(()),
        Outcome::Rejected(rejected) => Err(SendError::Service(match rejected.error {
            Some(error) => ServiceError::from(&error),
            None => ServiceError {
                condition: AmqpCondition::InternalError,
                description: Some("rejected without an error".into()),
            },
        })),
        Outcome::Released(_) => Err(SendError::NotProcessed("released")),
        Outcome::Modified(_) => Err(SendError::NotProcessed("modified")),
    }
}

/// A link-level failure: the service's error when it gave one, a lost connection otherwise.
fn link_error(error: LinkSendError) -> SendError {
    match error {
        LinkSendError::Detached(
            DetachError::RemoteDetachedWithError(error) | DetachError::RemoteClosedWithError(error),
        )
        | LinkSendError::LinkStateError(
            LinkStateError::RemoteDetachedWithError(error)
            | LinkStateError::RemoteClosedWithError(error),
        ) => {
            let error = ServiceError::from(&error);
            // A detach is the end of the link whatever its condition; only conditions that say the request
            // itself is wrong are final.
            if error.condition.is_retryable() {
                SendError::Connection(error.to_string())
            } else {
                SendError::Service(error)
            }
        }
        LinkSendError::MessageSizeExceeded(exceeded) => SendError::TooLarge {
            size: exceeded.size,
            limit: exceeded.max_size,
        },
        other => SendError::Connection(other.to_string()),
    }
}
