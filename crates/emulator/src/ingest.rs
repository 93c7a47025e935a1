//! A client's sender link on a hub or partition: each transfer unpacked, routed, stored atomically and
//! settled (after the configured latency), or refused with the service's error; faults applied here.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{Receiver, ReceiverDisposer};
use fe2o3_amqp_types::definitions;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::codec::unpack;
use super::connection::{
    ConnectionContext, next_message, server_busy, service_error, until_link_end,
};
use super::faults::TransferFault;
use super::namespace::{Hub, now_ms};
use eventhub_wire::conditions;
use eventhub_wire::message::AmqpMessage;

/// Link credit granted to each client sender: enough for many batches in flight on one link.
const INGEST_CREDIT: u32 = 5_000;

/// How an accepted transfer is settled.
#[derive(Debug, Clone, Copy)]
enum Settlement {
    Accept,
    Release,
}

/// Serves one client sender link until it detaches or must end.
pub(crate) async fn serve(
    mut receiver: Receiver,
    hub: Arc<Hub>,
    partition: Option<usize>,
    authorization_path: String,
    context: Arc<ConnectionContext>,
) {
    if receiver.set_credit(INGEST_CREDIT).await.is_err() {
        return;
    }
    let work = receive(&mut receiver, &hub, partition, &context);
    let ended = until_link_end(Arc::clone(&context), &authorization_path, work).await;
    if let Some(end) = ended {
        debug!(?end, "ending a sender link");
        if let Some(error) = end.error(&authorization_path) {
            let _ = receiver.close_with_error(error).await;
        }
    }
}

/// Receives, stores and settles transfers until the client detaches or the link fails.
async fn receive(
    receiver: &mut Receiver,
    hub: &Hub,
    partition: Option<usize>,
    context: &Arc<ConnectionContext>,
) {
    let mut delayed = DelayedSettler::new(receiver.disposer(), context);
    loop {
        let delivery = match next_message(receiver).await {
            Ok(delivery) => delivery,
            Err(err) => {
                debug!(%err, "sender link ended");
                return;
            }
        };
        let message_format = delivery.message_format().unwrap_or(0);
        let (info, message) = delivery.into_parts();
        let settlement = match context.shared.faults.next_transfer() {
            TransferFault::ForceClose => {
                // Keep the link until the connection closes, so the client sees the connection error
                // rather than a link detach; this transfer is never settled nor stored.
                context.force_close.notify_one();
                continue;
            }
            TransferFault::Throttle => Err(server_busy()),
            TransferFault::Release => Ok(Settlement::Release),
            TransferFault::None => {
                store(hub, partition, message_format, message, context).map(|()| Settlement::Accept)
            }
        };
        let settled = match settlement {
            Ok(settlement) => delayed.settle(receiver, info, settlement).await,
            Err(error) => receiver.reject(info, error).await.map_err(drop),
        };
        if settled.is_err() {
            return;
        }
    }
}

/// Unpacks a transfer and appends its events to one partition, atomically.
fn store(
    hub: &Hub,
    partition: Option<usize>,
    message_format: u32,
    message: AmqpMessage,
    context: &ConnectionContext,
) -> Result<(), definitions::Error> {
    let unpacked = unpack(message_format, message)
        .map_err(|err| service_error(conditions::ARGUMENT_ERROR, err.0))?;
    if let Some(index) = context.shared.faults.refused_event(&unpacked.events) {
        return Err(service_error(
            conditions::ARGUMENT_ERROR,
            format!("event {index} of the transfer holds the refused marker (an injected fault)"),
        ));
    }
    let index = partition.unwrap_or_else(|| hub.route(unpacked.partition_key.as_deref()));
    hub.partition(index).append(
        unpacked.events,
        unpacked.partition_key.map(Arc::from),
        now_ms(),
    );
    Ok(())
}

/// Settles deliveries now or, when a latency or an injected delay applies, after it: a FIFO queue drained
/// by one task per link, so the link keeps receiving while dispositions wait.
struct DelayedSettler {
    disposer: ReceiverDisposer,
    queue: Option<mpsc::UnboundedSender<(Instant, DeliveryInfo, Settlement)>>,
    context: Arc<ConnectionContext>,
}

impl DelayedSettler {
    fn new(disposer: ReceiverDisposer, context: &Arc<ConnectionContext>) -> Self {
        Self {
            disposer,
            queue: None,
            context: Arc::clone(context),
        }
    }

    async fn settle(
        &mut self,
        receiver: &Receiver,
        info: DeliveryInfo,
        settlement: Settlement,
    ) -> Result<(), ()> {
        let shared = &self.context.shared;
        let delay: Duration = shared.latency + shared.faults.extra_disposition_delay();
        if delay.is_zero() {
            return match settlement {
                Settlement::Accept => receiver.accept(info).await,
                Settlement::Release => receiver.release(info).await,
            }
            .map_err(drop);
        }
        let queue = self.queue.get_or_insert_with(|| {
            let (queue, pending) = mpsc::unbounded_channel();
            shared
                .tasks
                .spawn(drain_delayed(self.disposer.clone(), pending));
            queue
        });
        queue
            .send((Instant::now() + delay, info, settlement))
            .map_err(drop)
    }
}

async fn drain_delayed(
    disposer: ReceiverDisposer,
    mut pending: mpsc::UnboundedReceiver<(Instant, DeliveryInfo, Settlement)>,
) {
    while let Some((due, info, settlement)) = pending.recv().await {
        tokio::time::sleep_until(due).await;
        let result = match settlement {
            Settlement::Accept => disposer.accept(info).await,
            Settlement::Release => disposer.release(info).await,
        };
        if result.is_err() {
            return;
        }
    }
}
