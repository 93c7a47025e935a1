//! One partition's in-memory log: sequence numbers, offsets and enqueued times stamped as the service does,
//! a retention bound, and a wake-up for consumers waiting on new events.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::config::RetentionConfig;

/// An event as the partition stores it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Its sequence number in the partition, from 0.
    pub sequence_number: i64,
    /// Its offset: the number of bytes stored in the partition before it.
    pub offset: i64,
    /// When it was stored, Unix milliseconds.
    pub enqueued_time_ms: i64,
    /// The partition key it was sent with.
    pub partition_key: Option<Arc<str>>,
    /// The complete encoded AMQP message, exactly as the client sent it.
    pub message: Bytes,
}

/// Where a reader starts, from a consumer's selector filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest retained event.
    Earliest,
    /// Only events stored after the reader attaches.
    Latest,
    /// The first event whose offset is greater than (or, inclusive, equal to) this one.
    Offset {
        /// The offset.
        offset: i64,
        /// Whether the event at exactly this offset is included.
        inclusive: bool,
    },
    /// The first event whose sequence number is greater than (or equal to) this one.
    SequenceNumber {
        /// The sequence number.
        sequence_number: i64,
        /// Whether the event with exactly this sequence number is included.
        inclusive: bool,
    },
    /// The first event enqueued after (or at) this time, Unix milliseconds.
    EnqueuedTime {
        /// The time.
        time_ms: i64,
        /// Whether an event enqueued at exactly this time is included.
        inclusive: bool,
    },
}

/// What `$management` reports of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionProperties {
    /// The oldest retained sequence number.
    pub begin_sequence_number: i64,
    /// The newest sequence number, -1 when nothing was ever stored.
    pub last_enqueued_sequence_number: i64,
    /// The newest event's offset, -1 when nothing was ever stored.
    pub last_enqueued_offset: i64,
    /// When the newest event was stored, Unix milliseconds (0 when nothing was).
    pub last_enqueued_time_ms: i64,
    /// Whether the partition retains no event.
    pub is_empty: bool,
}

/// One partition's log.
#[derive(Debug)]
pub struct PartitionLog {
    state: Mutex<LogState>,
    retention: RetentionConfig,
    /// The next sequence number to be assigned; readers wait for it to move.
    appended: watch::Sender<i64>,
}

#[derive(Debug, Default)]
struct LogState {
    events: VecDeque<StoredEvent>,
    retained_bytes: u64,
    next_sequence_number: i64,
    next_offset: i64,
    last_enqueued_time_ms: i64,
}

impl PartitionLog {
    /// An empty partition with the given retention bound.
    pub fn new(retention: RetentionConfig) -> Self {
        Self {
            state: Mutex::default(),
            retention,
            appended: watch::Sender::new(0),
        }
    }

    /// Stores a batch atomically: its events get consecutive sequence numbers and one enqueued time.
    /// Returns the sequence number of the batch's first event.
    pub fn append(
        &self,
        messages: Vec<Bytes>,
        partition_key: Option<Arc<str>>,
        now_ms: i64,
    ) -> i64 {
        let mut state = self.state.lock();
        let first = state.next_sequence_number;
        // Enqueued times never go backwards within a partition, even if the clock does.
        let enqueued_time_ms = now_ms.max(state.last_enqueued_time_ms);
        for message in messages {
            let event = StoredEvent {
                sequence_number: state.next_sequence_number,
                offset: state.next_offset,
                enqueued_time_ms,
                partition_key: partition_key.clone(),
                message,
            };
            state.next_sequence_number += 1;
            state.next_offset += event.message.len() as i64;
            state.retained_bytes += event.message.len() as u64;
            state.events.push_back(event);
        }
        state.last_enqueued_time_ms = enqueued_time_ms;
        // Always keep the newest event, so the log never looks emptier than it is.
        while state.events.len() > 1
            && (state.events.len() > self.retention.max_events
                || state.retained_bytes > self.retention.max_bytes)
        {
            if let Some(dropped) = state.events.pop_front() {
                state.retained_bytes -= dropped.message.len() as u64;
            }
        }
        let next = state.next_sequence_number;
        drop(state);
        self.appended.send_replace(next);
        first
    }

    /// The sequence number a reader starting at `position` reads first (it may not be stored yet).
    pub fn resolve(&self, position: StartPosition) -> i64 {
        let state = self.state.lock();
        let begin = state.begin_sequence_number();
        let first_where = |matches: &dyn Fn(&StoredEvent) -> bool| {
            let index = state.events.partition_point(|event| !matches(event));
            begin + index as i64
        };
        match position {
            StartPosition::Earliest => begin,
            StartPosition::Latest => state.next_sequence_number,
            StartPosition::SequenceNumber {
                sequence_number,
                inclusive,
            } => {
                let first = if inclusive {
                    sequence_number
                } else {
                    sequence_number.saturating_add(1)
                };
                first.clamp(begin, state.next_sequence_number.max(begin))
            }
            StartPosition::Offset { offset, inclusive } => first_where(&|e| {
                if inclusive {
                    e.offset >= offset
                } else {
                    e.offset > offset
                }
            }),
            StartPosition::EnqueuedTime { time_ms, inclusive } => first_where(&|e| {
                if inclusive {
                    e.enqueued_time_ms >= time_ms
                } else {
                    e.enqueued_time_ms > time_ms
                }
            }),
        }
    }

    /// Up to `max` events from sequence number `*next` on; advances `*next` past them. A reader that fell
    /// behind retention skips to the oldest retained event.
    pub fn read(&self, next: &mut i64, max: usize) -> Vec<StoredEvent> {
        let state = self.state.lock();
        let begin = state.begin_sequence_number();
        *next = (*next).max(begin);
        let start = (*next - begin) as usize;
        let events: Vec<StoredEvent> = state.events.iter().skip(start).take(max).cloned().collect();
        *next += events.len() as i64;
        events
    }

    /// A receiver that changes whenever events are stored.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.appended.subscribe()
    }

    /// What `$management` reports.
    pub fn properties(&self) -> PartitionProperties {
        let state = self.state.lock();
        let last_offset = state.events.back().map_or(-1, |e| e.offset);
        PartitionProperties {
            begin_sequence_number: state.begin_sequence_number(),
            last_enqueued_sequence_number: state.next_sequence_number - 1,
            last_enqueued_offset: last_offset,
            last_enqueued_time_ms: state.last_enqueued_time_ms,
            is_empty: state.events.is_empty(),
        }
    }
}

impl LogState {
    fn begin_sequence_number(&self) -> i64 {
        self.events
            .front()
            .map_or(self.next_sequence_number, |e| e.sequence_number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(max_events: usize, max_bytes: u64) -> PartitionLog {
        PartitionLog::new(RetentionConfig {
            max_events,
            max_bytes,
        })
    }

    fn bodies(sizes: &[usize]) -> Vec<Bytes> {
        sizes.iter().map(|&n| Bytes::from(vec![b'x'; n])).collect()
    }

    #[test]
    fn stamps_sequence_numbers_and_byte_offsets() {
        let log = log(100, 1 << 20);
        assert_eq!(log.properties().last_enqueued_sequence_number, -1);
        assert!(log.properties().is_empty);
        assert_eq!(log.append(bodies(&[10, 20]), None, 1_000), 0);
        assert_eq!(log.append(bodies(&[5]), Some("k".into()), 2_000), 2);
        let mut next = 0;
        let events = log.read(&mut next, 10);
        assert_eq!(next, 3);
        let stamps: Vec<_> = events
            .iter()
            .map(|e| (e.sequence_number, e.offset, e.enqueued_time_ms))
            .collect();
        assert_eq!(stamps, [(0, 0, 1_000), (1, 10, 1_000), (2, 30, 2_000)]);
        assert_eq!(events[2].partition_key.as_deref(), Some("k"));
        let props = log.properties();
        assert_eq!(
            (
                props.begin_sequence_number,
                props.last_enqueued_sequence_number
            ),
            (0, 2)
        );
        assert_eq!(
            (
                props.last_enqueued_offset,
                props.last_enqueued_time_ms,
                props.is_empty
            ),
            (30, 2_000, false)
        );
    }

    #[test]
    fn retention_drops_the_oldest_and_readers_skip_ahead() {
        let log = log(3, 1 << 20);
        log.append(bodies(&[1; 5]), None, 0);
        assert_eq!(log.properties().begin_sequence_number, 2);
        let mut next = 0;
        let events = log.read(&mut next, 10);
        assert_eq!(events.first().map(|e| e.sequence_number), Some(2));
        assert_eq!(next, 5);

        let by_bytes = self::log(100, 25);
        by_bytes.append(bodies(&[10, 10, 10]), None, 0);
        assert_eq!(by_bytes.properties().begin_sequence_number, 1);
    }

    #[test]
    fn start_positions_resolve_like_the_selector_filters() {
        use StartPosition::*;
        let log = log(100, 1 << 20);
        log.append(bodies(&[10, 10]), None, 1_000);
        log.append(bodies(&[10]), None, 2_000);
        let offset = |offset, inclusive| Offset { offset, inclusive };
        let sequence = |sequence_number, inclusive| SequenceNumber {
            sequence_number,
            inclusive,
        };
        let enqueued = |time_ms, inclusive| EnqueuedTime { time_ms, inclusive };
        let cases = [
            (Earliest, 0),
            (Latest, 3),
            (offset(10, false), 2),
            (offset(10, true), 1),
            (offset(-1, false), 0),
            (sequence(0, false), 1),
            (sequence(1, true), 1),
            (sequence(99, true), 3),
            (enqueued(1_000, false), 2),
            (enqueued(1_000, true), 0),
        ];
        for (position, first) in cases {
            assert_eq!(log.resolve(position), first, "{position:?}");
        }
    }

    #[tokio::test]
    async fn readers_are_woken_by_appends() {
        let log = std::sync::Arc::new(log(100, 1 << 20));
        let mut appended = log.subscribe();
        let writer = std::sync::Arc::clone(&log);
        tokio::spawn(async move { writer.append(bodies(&[1]), None, 0) });
        appended.changed().await.unwrap();
        assert_eq!(*appended.borrow(), 1);
    }
}
