//! Hub and partition properties as `$management` READ returns them.

use std::time::SystemTime;

use serde_amqp::Value;

use super::error::SendError;
use super::node::timestamp_time;

/// What `$management` says of a hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubProperties {
    /// The hub's name.
    pub name: String,
    /// Its partition ids, in the service's order.
    pub partition_ids: Vec<String>,
    /// When it was created.
    pub created_at: SystemTime,
}

/// What `$management` says of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionProperties {
    /// The hub's name.
    pub hub: String,
    /// The partition id.
    pub id: String,
    /// Sequence number of the oldest retained event.
    pub begin_sequence_number: i64,
    /// Sequence number of the newest event.
    pub last_enqueued_sequence_number: i64,
    /// Offset of the newest event.
    pub last_enqueued_offset: String,
    /// When the newest event was stored.
    pub last_enqueued_time: SystemTime,
    /// Whether the partition holds no event.
    pub is_empty: bool,
}

fn field<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    match body {
        Value::Map(map) => map.get(&Value::String(name.to_owned())),
        _ => None,
    }
}

fn malformed(what: &str) -> SendError {
    SendError::Connection(format!("malformed management response: {what}"))
}

fn string(body: &Value, name: &str) -> Result<String, SendError> {
    match field(body, name) {
        Some(Value::String(text)) => Ok(text.clone()),
        _ => Err(malformed(name)),
    }
}

fn long(body: &Value, name: &str) -> Result<i64, SendError> {
    match field(body, name) {
        Some(Value::Long(n)) => Ok(*n),
        Some(Value::Int(n)) => Ok(i64::from(*n)),
        _ => Err(malformed(name)),
    }
}

fn time(body: &Value, name: &str) -> Result<SystemTime, SendError> {
    match field(body, name) {
        Some(Value::Timestamp(at)) => Ok(timestamp_time(at)),
        _ => Err(malformed(name)),
    }
}

impl HubProperties {
    /// Reads a hub READ response.
    pub fn from_response(body: &Value) -> Result<Self, SendError> {
        let partition_ids = match field(body, "partition_ids") {
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|id| match id {
                    Value::String(id) => Ok(id.clone()),
                    _ => Err(malformed("partition_ids")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(malformed("partition_ids")),
        };
        Ok(Self {
            name: string(body, "name")?,
            partition_ids,
            created_at: time(body, "created_at")?,
        })
    }
}

impl PartitionProperties {
    /// Reads a partition READ response.
    pub fn from_response(body: &Value) -> Result<Self, SendError> {
        Ok(Self {
            hub: string(body, "name")?,
            id: string(body, "partition")?,
            begin_sequence_number: long(body, "begin_sequence_number")?,
            last_enqueued_sequence_number: long(body, "last_enqueued_sequence_number")?,
            last_enqueued_offset: string(body, "last_enqueued_offset")?,
            last_enqueued_time: time(body, "last_enqueued_time_utc")?,
            is_empty: matches!(field(body, "is_partition_empty"), Some(Value::Bool(true))),
        })
    }
}
