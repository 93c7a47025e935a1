//! Exclusive readers: the service's epoch (owner level) rule for the receivers of one consumer group
//! partition. A receiver with epoch `e` disconnects every receiver with no epoch or an epoch `<= e`; a
//! receiver is refused while one with a higher epoch, or (without an epoch) one with any epoch, is connected.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The readers of every consumer group partition of one hub.
#[derive(Debug, Default)]
pub struct Readers {
    by_partition: Mutex<HashMap<(String, usize), Vec<Reader>>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct Reader {
    id: u64,
    epoch: Option<i64>,
    disconnect: Arc<Notify>,
}

/// A connected reader; dropping it unregisters the reader.
#[derive(Debug)]
pub struct ReaderGuard {
    readers: Arc<Readers>,
    key: (String, usize),
    id: u64,
    /// Notified when a reader with a higher or equal epoch takes over.
    pub disconnect: Arc<Notify>,
}

impl Readers {
    /// Registers a reader of `partition` through `consumer_group`, applying the epoch rule; the error
    /// says which epoch holds the partition.
    pub fn register(
        self: &Arc<Self>,
        consumer_group: &str,
        partition: usize,
        epoch: Option<i64>,
    ) -> Result<ReaderGuard, String> {
        let key = (consumer_group.to_ascii_lowercase(), partition);
        let mut by_partition = self.by_partition.lock();
        let readers = by_partition.entry(key.clone()).or_default();
        let highest = readers.iter().filter_map(|r| r.epoch).max();
        match (epoch, highest) {
            (None, Some(held)) => {
                return Err(format!(
                    "a receiver with epoch {held} holds this partition; connect with an epoch"
                ));
            }
            (Some(wanted), Some(held)) if held > wanted => {
                return Err(format!(
                    "a receiver with the higher epoch {held} holds this partition"
                ));
            }
            (Some(wanted), _) => readers.retain(|reader| {
                let keep = reader.epoch.is_some_and(|e| e > wanted);
                if !keep {
                    reader.disconnect.notify_one();
                }
                keep
            }),
            (None, None) => {}
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let disconnect = Arc::new(Notify::new());
        readers.push(Reader {
            id,
            epoch,
            disconnect: Arc::clone(&disconnect),
        });
        Ok(ReaderGuard {
            readers: Arc::clone(self),
            key,
            id,
            disconnect,
        })
    }
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let mut by_partition = self.readers.by_partition.lock();
        if let Some(readers) = by_partition.get_mut(&self.key) {
            readers.retain(|reader| reader.id != self.id);
            if readers.is_empty() {
                by_partition.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_higher_or_equal_epoch_takes_over() {
        let readers = Arc::new(Readers::default());
        let plain = readers.register("$Default", 0, None).unwrap();
        let first = readers.register("$default", 0, Some(1)).unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            plain.disconnect.notified(),
        )
        .await
        .unwrap();
        let second = readers.register("$Default", 0, Some(1)).unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            first.disconnect.notified(),
        )
        .await
        .unwrap();
        assert!(
            readers
                .register("$Default", 0, Some(0))
                .unwrap_err()
                .contains("higher epoch 1")
        );
        assert!(
            readers
                .register("$Default", 0, None)
                .unwrap_err()
                .contains("epoch 1")
        );
        assert!(
            readers.register("$Default", 1, None).is_ok(),
            "another partition is free"
        );
        assert!(
            readers.register("cg1", 0, None).is_ok(),
            "another consumer group is free"
        );
        drop(second);
        assert!(
            readers.register("$Default", 0, None).is_ok(),
            "free again once the holder leaves"
        );
    }

    #[test]
    fn readers_without_epochs_share() {
        let readers = Arc::new(Readers::default());
        let _a = readers.register("$Default", 0, None).unwrap();
        let _b = readers.register("$Default", 0, None).unwrap();
    }
}
