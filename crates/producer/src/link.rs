//! One sender link: many batches in flight (a window), each disposition matched to its batch, and every
//! waiting batch answered when the link or its connection goes away.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fe2o3_amqp::Sender;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::{DetachError, LinkStateError, SendError as LinkSendError};
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp_types::messaging::Outcome;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::batch::{SealedBatch, Transfer};
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
    max_message_size: u64,
    requests: mpsc::Sender<Delivery>,
    load: AtomicUsize,
    last_used: Mutex<Instant>,
    stop: CancellationToken,
    ended: CancellationToken,
    token_lost: Mutex<Option<SendError>>,
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
        Ok(Self::start(
            sender,
            address,
            max_message_size,
            settings,
            connection_lost,
        ))
    }

    /// Starts the task of an attached sender (an fe2o3 one, or a stand-in in tests).
    fn start<W: WireSender>(
        sender: W,
        address: String,
        max_message_size: u64,
        settings: LinkSettings,
        connection_lost: CancellationToken,
    ) -> Arc<Self> {
        let (requests, receiver) = mpsc::channel(settings.window);
        let link = Arc::new(Self {
            address,
            max_message_size,
            requests,
            load: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            stop: CancellationToken::new(),
            ended: CancellationToken::new(),
            token_lost: Mutex::new(None),
        });
        tokio::spawn(run(
            sender,
            receiver,
            settings,
            connection_lost,
            Arc::clone(&link),
        ));
        link
    }

    /// The link's target address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Completes when its task has ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Why it ended, when Event Hubs dropped its authorization (see [`SendError::TokenLost`]).
    pub fn token_lost(&self) -> Option<SendError> {
        self.token_lost.lock().clone()
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

/// What the link task needs of an attached sender: write a transfer (its disposition comes later) and detach.
trait WireSender: Send + 'static {
    /// Resolves with a written transfer's disposition.
    type Settled: Future<Output = Result<Outcome, LinkSendError>> + Send + 'static;
    /// Writes a transfer onto the link; resolves once it is written.
    fn write(
        &mut self,
        transfer: &Transfer,
    ) -> impl Future<Output = Result<Self::Settled, LinkSendError>> + Send;
    /// Detaches the link.
    fn detach(self) -> impl Future<Output = ()> + Send;
}

impl WireSender for Sender {
    type Settled = DeliveryFut<Result<Outcome, LinkSendError>>;

    fn write(
        &mut self,
        transfer: &Transfer,
    ) -> impl Future<Output = Result<Self::Settled, LinkSendError>> + Send {
        self.send_batchable_ref(transfer)
    }

    async fn detach(self) {
        let _ = tokio::time::timeout(DETACH_WAIT, self.close()).await;
    }
}

fn connection_lost_error() -> SendError {
    SendError::Connection("the connection to Event Hubs was lost".into())
}

async fn run<W: WireSender>(
    mut sender: W,
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
    let end = loop {
        tokio::select! {
            biased;
            () = connection_lost.cancelled() => break connection_lost_error(),
            Some((id, result)) = pending.next(), if !pending.is_empty() => {
                if let Some(end) = settle(&mut replies, id, result) {
                    break end;
                }
            }
            request = requests.recv(), if !drained && pending.len() < settings.window => match request {
                None => drained = true,
                Some(delivery) => match write(&mut sender, delivery, &connection_lost).await {
                    Written::OnWire(delivery, settled) => {
                        next_id += 1;
                        replies.insert(next_id, delivery);
                        pending.push(disposition(next_id, settled, settings.disposition_wait));
                    }
                    Written::Answered => {}
                    Written::End(error) => break error,
                },
            },
            () = link.stop.cancelled(), if !stopping => {
                stopping = true;
                requests.close();
            }
        }
        if drained && pending.is_empty() {
            break SendError::Closed;
        }
    };
    if matches!(end, SendError::TokenLost(_)) {
        *link.token_lost.lock() = Some(end.clone());
    }
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
        sender.detach().await;
    }
}

/// What writing one batch came to.
enum Written<F> {
    /// On the wire: its disposition is awaited.
    OnWire(Delivery, F),
    /// Answered already: nothing of it was left to send, or the link refused it and carries on.
    Answered,
    /// Answered, and the link ends for this reason.
    End(SendError),
}

/// Writes a batch's transfer (made now, of its events still waiting) onto the link.
async fn write<W: WireSender>(
    sender: &mut W,
    Delivery { batch, reply }: Delivery,
    connection_lost: &CancellationToken,
) -> Written<W::Settled> {
    let Some(transfer) = batch.transfer_for_wire() else {
        let _ = reply.send(Err(SendError::DeadlineExceeded { last_error: None }));
        return Written::Answered;
    };
    let sent = tokio::select! {
        sent = sender.write(&transfer) => sent,
        () = connection_lost.cancelled() => {
            batch.mark_in_doubt();
            let _ = reply.send(Err(connection_lost_error()));
            return Written::End(connection_lost_error());
        }
    };
    match sent {
        Ok(settled) => Written::OnWire(Delivery { batch, reply }, settled),
        Err(error) => {
            let error = link_error(error);
            if is_link_lost(&error) {
                batch.mark_in_doubt(); // part of it may have been written
            }
            let _ = reply.send(Err(error.clone()));
            if matches!(error, SendError::TooLarge { .. }) {
                Written::Answered
            } else {
                Written::End(error)
            }
        }
    }
}

/// A written transfer's disposition, as the batch's result; none within `wait` presumes the link lost.
async fn disposition<F>(id: u64, settled: F, wait: Duration) -> (u64, Result<(), SendError>)
where
    F: Future<Output = Result<Outcome, LinkSendError>>,
{
    let result = match tokio::time::timeout(wait, settled).await {
        Ok(Ok(outcome)) => outcome_result(outcome),
        Ok(Err(error)) => Err(link_error(error)),
        Err(_) => Err(SendError::Connection(format!(
            "no disposition within {wait:?}; presuming the link lost"
        ))),
    };
    (id, result)
}

/// Answers batch `id` with its result; returns why the link ends when the result says it is broken (the batch,
/// written and unanswered by Event Hubs, is then in doubt).
fn settle(
    replies: &mut HashMap<u64, Delivery>,
    id: u64,
    result: Result<(), SendError>,
) -> Option<SendError> {
    let broken = result.as_ref().is_err_and(is_link_lost);
    if let Some(Delivery { batch, reply }) = replies.remove(&id) {
        if broken {
            batch.mark_in_doubt();
        }
        let _ = reply.send(result.clone());
    }
    if broken { result.err() } else { None }
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

/// Whether `error` ends the link with what it had on the wire in doubt.
fn is_link_lost(error: &SendError) -> bool {
    matches!(error, SendError::Connection(_) | SendError::TokenLost(_))
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
            // itself is wrong are final. Unauthorized is not one of them here: a link detached for it lost its
            // token (expired by the service's clock, or revoked), and the next attach puts one again.
            if error.condition == AmqpCondition::Unauthorized {
                SendError::TokenLost(error)
            } else if error.condition.is_retryable() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchBuilder;
    use crate::claim::Claim;
    use fe2o3_amqp_types::definitions;
    use fe2o3_amqp_types::messaging::{Accepted, Rejected, Released};
    use futures_util::future::BoxFuture;
    use std::sync::atomic::AtomicBool;

    /// A link's peer: each written transfer's disposition is sent through its sender (dropped: none ever
    /// comes, as from a silent peer).
    type Dispositions = mpsc::UnboundedReceiver<oneshot::Sender<Outcome>>;

    struct MockWire {
        written: mpsc::UnboundedSender<oneshot::Sender<Outcome>>,
        detached: Arc<AtomicBool>,
    }

    impl WireSender for MockWire {
        type Settled = BoxFuture<'static, Result<Outcome, LinkSendError>>;

        fn write(
            &mut self,
            _: &Transfer,
        ) -> impl Future<Output = Result<Self::Settled, LinkSendError>> + Send {
            let (disposition, settled) = oneshot::channel();
            let _ = self.written.send(disposition);
            let settled: Self::Settled = Box::pin(async move {
                match settled.await {
                    Ok(outcome) => Ok(outcome),
                    Err(_) => std::future::pending().await,
                }
            });
            std::future::ready(Ok(settled))
        }

        async fn detach(self) {
            self.detached.store(true, Ordering::SeqCst);
        }
    }

    const WAIT: Duration = Duration::from_secs(5);

    struct MockLink {
        link: Arc<Link>,
        dispositions: Dispositions,
        detached: Arc<AtomicBool>,
        connection_lost: CancellationToken,
    }

    fn start(window: usize) -> MockLink {
        let (written, dispositions) = mpsc::unbounded_channel();
        let detached = Arc::new(AtomicBool::new(false));
        let connection_lost = CancellationToken::new();
        let wire = MockWire {
            written,
            detached: Arc::clone(&detached),
        };
        let settings = LinkSettings {
            window,
            disposition_wait: WAIT,
        };
        let link = Link::start(
            wire,
            "eh1".into(),
            1 << 20,
            settings,
            connection_lost.clone(),
        );
        MockLink {
            link,
            dispositions,
            detached,
            connection_lost,
        }
    }

    fn batch() -> Arc<SealedBatch> {
        let mut builder = BatchBuilder::new(None, u64::MAX);
        builder.try_push(b"event".to_vec()).unwrap();
        Arc::new(SealedBatch::new(builder, vec![Arc::new(Claim::new())]))
    }

    /// Sends a batch on its own task: the batch and the send's outcome.
    fn send(
        link: &Arc<Link>,
    ) -> (
        Arc<SealedBatch>,
        tokio::task::JoinHandle<Result<(), SendError>>,
    ) {
        let (link, batch) = (Arc::clone(link), batch());
        let sending = tokio::spawn({
            let batch = Arc::clone(&batch);
            async move { link.send(batch).await }
        });
        (batch, sending)
    }

    /// Lets every task run until it waits.
    async fn settle_down() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_bounds_unsettled_transfers_and_each_disposition_answers_its_batch() {
        let mut peer = start(2);
        let sends: Vec<_> = (0..3).map(|_| send(&peer.link)).collect();
        let first = peer.dispositions.recv().await.unwrap();
        let second = peer.dispositions.recv().await.unwrap();
        settle_down().await;
        assert!(
            peer.dispositions.try_recv().is_err(),
            "a third transfer waits for room in the window"
        );
        assert_eq!(peer.link.load(), 3);
        let rejection = definitions::Error::new(
            definitions::AmqpError::InvalidField,
            Some("bad".to_owned()),
            None,
        );
        second
            .send(Outcome::Rejected(Rejected {
                error: Some(rejection),
            }))
            .unwrap();
        let third = peer
            .dispositions
            .recv()
            .await
            .expect("written once the second settled");
        first.send(Outcome::Accepted(Accepted {})).unwrap();
        third.send(Outcome::Released(Released {})).unwrap();
        let mut results = Vec::new();
        for (_, sending) in sends {
            results.push(sending.await.unwrap());
        }
        assert_eq!(results[0], Ok(()));
        assert!(
            matches!(&results[1], Err(SendError::Service(error)) if error.condition == AmqpCondition::InvalidArgument),
            "{results:?}"
        );
        assert_eq!(results[2], Err(SendError::NotProcessed("released")));
        assert_eq!(peer.link.load(), 0);
        assert!(
            peer.link.is_usable(),
            "refusals of a batch leave the link up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_disposition_within_the_wait_ends_the_link_with_the_batch_in_doubt() {
        let mut peer = start(4);
        let started = tokio::time::Instant::now();
        let (batch, sending) = send(&peer.link);
        let _silent = peer.dispositions.recv().await.unwrap();
        let result = sending.await.unwrap();
        assert_eq!(started.elapsed(), WAIT);
        assert!(
            matches!(result, Err(SendError::Connection(_))),
            "{result:?}"
        );
        assert!(
            batch.is_in_doubt(),
            "it was written: Event Hubs may have stored it"
        );
        peer.link.ended().await;
        assert!(peer.detached.load(Ordering::SeqCst));
        let (_, after) = send(&peer.link);
        assert!(matches!(
            after.await.unwrap(),
            Err(SendError::Connection(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_connection_answers_what_is_written_and_what_is_queued_at_once() {
        let mut peer = start(1);
        let (written, written_send) = send(&peer.link);
        let _silent = peer.dispositions.recv().await.unwrap();
        let (queued, queued_send) = send(&peer.link);
        settle_down().await;
        let started = tokio::time::Instant::now();
        peer.connection_lost.cancel();
        for sending in [written_send, queued_send] {
            let result = sending.await.unwrap();
            assert!(
                matches!(result, Err(SendError::Connection(_))),
                "{result:?}"
            );
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(written.is_in_doubt());
        assert!(!queued.is_in_doubt(), "never written: safe to send again");
        peer.link.ended().await;
        assert!(
            !peer.detached.load(Ordering::SeqCst),
            "no detach over a lost connection"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closing_settles_what_is_in_flight_then_detaches() {
        let mut peer = start(4);
        let (_, in_flight) = send(&peer.link);
        let disposition = peer.dispositions.recv().await.unwrap();
        peer.link.close();
        assert!(!peer.link.is_usable());
        settle_down().await;
        let (_, refused) = send(&peer.link);
        assert!(matches!(
            refused.await.unwrap(),
            Err(SendError::Connection(_))
        ));
        settle_down().await;
        assert!(
            !peer.link.has_ended(),
            "the batch in flight is still owed its outcome"
        );
        disposition.send(Outcome::Accepted(Accepted {})).unwrap();
        assert_eq!(in_flight.await.unwrap(), Ok(()));
        peer.link.ended().await;
        assert!(peer.detached.load(Ordering::SeqCst));
    }
}
