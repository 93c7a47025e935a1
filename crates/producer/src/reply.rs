//! Where an event's outcome goes: the channel of its own [`Ticket`](crate::Ticket) (one caller awaiting one
//! event), or the [`OutcomeSink`] of a caller with many events in flight (a stream), named by a tag and told
//! once per run of consecutive tags in a batch rather than once per event.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::error::SendError;
use super::route::Receipt;

/// An event's outcome.
pub type Outcome = Result<Receipt, SendError>;

/// Receives the outcomes of a caller's tagged events (see [`Producer::enqueue_tagged`](crate::Producer)). Called
/// from the producer's tasks: it must not block.
pub trait OutcomeSink: Send + Sync + 'static {
    /// The events tagged `first` to `first + count - 1` have this outcome.
    fn complete(&self, first: u64, count: u64, outcome: &Outcome);
}

/// Where one event's outcome goes.
pub enum Reply {
    /// Its ticket's channel.
    Ticket(oneshot::Sender<Outcome>),
    /// Its caller's sink, under its tag.
    Tagged {
        /// The caller's sink.
        sink: Arc<dyn OutcomeSink>,
        /// The event's tag, chosen by the caller.
        tag: u64,
    },
}

impl Reply {
    /// Answers this one event.
    pub fn send(self, outcome: Outcome) {
        match self {
            Self::Ticket(sender) => {
                // A ticket dropped by its caller wants no answer.
                let _ = sender.send(outcome);
            }
            Self::Tagged { sink, tag } => sink.complete(tag, 1, &outcome),
        }
    }
}

/// Answers every reply with `outcome`: each ticket alone, each sink once per run of consecutive tags (a
/// stream's events sit side by side in a batch, so a batch of them is one call).
pub fn answer_all(replies: impl IntoIterator<Item = Reply>, outcome: &Outcome) {
    let mut run: Option<(Arc<dyn OutcomeSink>, u64, u64)> = None;
    for reply in replies {
        match reply {
            Reply::Ticket(sender) => {
                let _ = sender.send(outcome.clone());
            }
            Reply::Tagged { sink, tag } => match &mut run {
                Some((current, first, count))
                    if Arc::ptr_eq(current, &sink) && *first + *count == tag =>
                {
                    *count += 1;
                }
                _ => {
                    if let Some((current, first, count)) = run.replace((sink, tag, 1)) {
                        current.complete(first, count, outcome);
                    }
                }
            },
        }
    }
    if let Some((sink, first, count)) = run {
        sink.complete(first, count, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(u64, u64, bool)>>);

    impl OutcomeSink for Recorded {
        fn complete(&self, first: u64, count: u64, outcome: &Outcome) {
            self.0.lock().push((first, count, outcome.is_ok()));
        }
    }

    #[test]
    fn a_sink_hears_once_per_run_of_consecutive_tags_and_each_ticket_alone() {
        let one = Arc::new(Recorded::default());
        let other = Arc::new(Recorded::default());
        let tagged = |sink: &Arc<Recorded>, tag| Reply::Tagged {
            sink: Arc::clone(sink) as Arc<dyn OutcomeSink>,
            tag,
        };
        let (ticket, answered) = oneshot::channel();
        let replies = vec![
            tagged(&one, 4),
            tagged(&one, 5),
            tagged(&one, 6),
            Reply::Ticket(ticket),
            tagged(&one, 7),
            tagged(&other, 8),
            tagged(&one, 9),
            tagged(&one, 11),
        ];
        answer_all(replies, &Ok(Receipt { partition_id: None }));
        assert_eq!(*one.0.lock(), [(4, 4, true), (9, 1, true), (11, 1, true)]);
        assert_eq!(*other.0.lock(), [(8, 1, true)]);
        assert!(answered.blocking_recv().expect("answered").is_ok());
    }
}
