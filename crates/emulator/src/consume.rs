//! A client's receiver link on a consumer group partition: stored events from the filter's position on,
//! then live ones, each stamped with the service's annotations, paced by the client's link credit.

use std::sync::Arc;

use fe2o3_amqp::link::Sender;
use tracing::{debug, warn};

use super::codec::stamp_for_delivery;
use super::connection::{ConnectionContext, service_error, until_link_end};
use super::namespace::Hub;
use super::partition_log::StartPosition;
use super::readers::ReaderGuard;
use eventhub_wire::conditions;

/// Events read from the log per round; sending each still waits for credit.
const READ_CHUNK: usize = 256;

/// What a receiver link reads, checked when it attached.
pub(crate) struct ConsumerLink {
    pub hub: Arc<Hub>,
    pub partition: usize,
    pub position: StartPosition,
    pub authorization_path: String,
    /// Its place among the partition's readers; notified when a higher epoch takes over.
    pub reader: ReaderGuard,
}

/// Serves one client receiver link until it detaches or must end.
pub(crate) async fn serve(mut sender: Sender, link: ConsumerLink, context: Arc<ConnectionContext>) {
    let path = &link.authorization_path;
    let work = async {
        tokio::select! {
            () = deliver(&mut sender, &link.hub, link.partition, link.position) => None,
            () = link.reader.disconnect.notified() => Some(service_error(
                conditions::RECEIVER_DISCONNECTED,
                "a receiver with a higher or equal epoch took over this partition".into(),
            )),
        }
    };
    let mut error = None;
    let ended = until_link_end(context, path, async { error = work.await }).await;
    if let Some(error) = ended.and_then(|end| end.error(path)).or(error) {
        let _ = sender.close_with_error(error).await;
    }
}

/// Sends stored and then live events until the client detaches or the link fails.
async fn deliver(sender: &mut Sender, hub: &Hub, partition: usize, position: StartPosition) {
    let log = hub.partition(partition);
    // Subscribe before resolving, so an event stored in between still wakes this reader.
    let mut appended = log.subscribe();
    let mut next = log.resolve(position);
    loop {
        let events = log.read(&mut next, READ_CHUNK);
        if events.is_empty() {
            tokio::select! {
                // fe2o3 answers the client's detach before on_detach returns; nothing is left to close.
                err = sender.on_detach() => {
                    debug!(%err, "receiver link detached by the client");
                    return;
                }
                changed = appended.changed() => if changed.is_err() { return },
            }
            continue;
        }
        for event in events {
            let message = match stamp_for_delivery(&event) {
                Ok(message) => message,
                Err(err) => {
                    // Stored events were decoded once on the way in, so this is an emulator bug.
                    warn!(%err, sequence_number = event.sequence_number, "a stored event does not decode; skipped");
                    continue;
                }
            };
            // The outcome future is dropped: a consumer's settlement needs no answer from the emulator.
            if let Err(err) = sender.send_batchable(message).await {
                debug!(%err, "receiver link ended");
                return;
            }
        }
    }
}
