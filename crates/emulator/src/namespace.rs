//! The emulated namespace: its hubs with their partitions and consumer groups, and the service's routing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::config::{EmulatorConfig, HubConfig};
use super::partition_log::PartitionLog;
use super::readers::Readers;
use eventhub_wire::partition::partition_for_key;

/// One hub.
#[derive(Debug)]
pub struct Hub {
    /// Its name as configured.
    pub name: String,
    /// When the emulator created it, Unix milliseconds.
    pub created_at_ms: i64,
    /// Its partition ids, `"0"` to `"n-1"`.
    pub partition_ids: Vec<String>,
    partitions: Vec<PartitionLog>,
    consumer_groups: Vec<String>,
    next_round_robin: AtomicUsize,
    /// The connected receivers, for the epoch rule.
    pub readers: Arc<Readers>,
}

impl Hub {
    fn new(
        config: &HubConfig,
        retention: &super::config::RetentionConfig,
        created_at_ms: i64,
    ) -> Self {
        let count = config.partitions as usize;
        Self {
            name: config.name.clone(),
            created_at_ms,
            partition_ids: (0..count).map(|i| i.to_string()).collect(),
            partitions: (0..count)
                .map(|_| PartitionLog::new(retention.clone()))
                .collect(),
            consumer_groups: config
                .consumer_groups
                .iter()
                .map(|g| g.to_ascii_lowercase())
                .collect(),
            next_round_robin: AtomicUsize::new(0),
            readers: Arc::default(),
        }
    }

    /// The index of a partition id, if the hub has it.
    pub fn partition_index(&self, id: &str) -> Option<usize> {
        self.partition_ids.iter().position(|p| p == id)
    }

    /// A partition's log by index.
    pub fn partition(&self, index: usize) -> &PartitionLog {
        &self.partitions[index]
    }

    /// Whether the hub has this consumer group (names are case-insensitive).
    pub fn has_consumer_group(&self, name: &str) -> bool {
        self.consumer_groups
            .iter()
            .any(|g| g.eq_ignore_ascii_case(name))
    }

    /// Where the service puts an event sent to the hub address: by key hash, or round-robin without one.
    pub fn route(&self, partition_key: Option<&str>) -> usize {
        match partition_key {
            Some(key) => partition_for_key(key, self.partitions.len() as u32) as usize,
            None => self.next_round_robin.fetch_add(1, Ordering::Relaxed) % self.partitions.len(),
        }
    }
}

/// The namespace: hubs by lower-cased name, and the keys that sign tokens.
#[derive(Debug)]
pub struct Namespace {
    hubs: HashMap<String, Arc<Hub>>,
    key_name: String,
    key: String,
    /// Whether `jwt` CBS tokens are accepted.
    pub accept_jwt: bool,
}

impl Namespace {
    /// Builds the namespace of a validated configuration.
    pub fn new(config: &EmulatorConfig, now_ms: i64) -> Self {
        let hubs = config
            .hubs()
            .map(|hub| {
                (
                    hub.name.to_ascii_lowercase(),
                    Arc::new(Hub::new(&hub, &config.retention, now_ms)),
                )
            })
            .collect();
        Self {
            hubs,
            key_name: config.key_name.clone(),
            key: config.key.clone(),
            accept_jwt: config.accept_jwt,
        }
    }

    /// A hub by name (case-insensitive).
    pub fn hub(&self, name: &str) -> Option<&Arc<Hub>> {
        self.hubs.get(&name.to_ascii_lowercase())
    }

    /// The key value for a key name, if the namespace has it.
    pub fn key(&self, key_name: &str) -> Option<&str> {
        (key_name == self.key_name).then_some(self.key.as_str())
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyless_events_go_round_robin_and_keys_hash() {
        let mut config = EmulatorConfig::default();
        config.event_hubs[0].partitions = 4;
        let namespace = Namespace::new(&config, 0);
        let hub = namespace.hub("EH1").expect("lookup is case-insensitive");
        let spread: Vec<usize> = (0..8).map(|_| hub.route(None)).collect();
        assert_eq!(spread, [0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(
            hub.route(Some("user-42")),
            3,
            "the JS SDK's resolver puts user-42 on partition 3 of 4"
        );
        assert!(hub.has_consumer_group("$default"));
        assert!(hub.has_consumer_group("CG1"));
        assert!(!hub.has_consumer_group("other"));
        assert_eq!(hub.partition_index("3"), Some(3));
        assert_eq!(hub.partition_index("4"), None);
    }
}
