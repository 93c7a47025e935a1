//! Event Hubs wire facts shared by the producer and the emulator: partition hash, SAS tokens, addresses, names;
//! and how their settings read durations and rates (`settings`).

#![warn(missing_docs)]

pub mod address;
pub mod limits;
pub mod message;
pub mod partition;
pub mod sas;
pub mod settings;

/// `message-format` of a batch transfer: one Data section per event, each an encoded inner message.
pub const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;

/// The CBS (claims-based security) node that takes `put-token` requests.
pub const CBS_NODE: &str = "$cbs";
/// The management node that answers `READ` requests for hub and partition properties.
pub const MANAGEMENT_NODE: &str = "$management";

/// CBS token type of a shared access signature.
pub const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";
/// CBS token type of an Entra ID (JWT) access token.
pub const JWT_TOKEN_TYPE: &str = "jwt";

/// The consumer group every hub has.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";

/// Message annotation names the service reads or stamps.
pub mod annotations {
    /// The partition key (string), on a batch's outer message and on every event.
    pub const PARTITION_KEY: &str = "x-opt-partition-key";
    /// The event's sequence number in its partition (long), stamped by the service.
    pub const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
    /// The event's offset in its partition (string), stamped by the service.
    pub const OFFSET: &str = "x-opt-offset";
    /// When the service stored the event (timestamp), stamped by the service.
    pub const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
}

/// AMQP error conditions specific to Event Hubs (the standard ones come from fe2o3's enums).
pub mod conditions {
    /// The namespace is throttled: retry with backoff.
    pub const SERVER_BUSY: &str = "com.microsoft:server-busy";
    /// A request argument is invalid: do not retry.
    pub const ARGUMENT_ERROR: &str = "com.microsoft:argument-error";
    /// The operation timed out on the service.
    pub const TIMEOUT: &str = "com.microsoft:timeout";
    /// A receiver was disconnected by another with a higher epoch (owner level).
    pub const RECEIVER_DISCONNECTED: &str = "com.microsoft:receiver-disconnected";
}

/// Link property names the SDKs send.
pub mod link_properties {
    /// The exclusive-reader epoch (owner level) of a receiver, a long.
    pub const EPOCH: &str = "com.microsoft:epoch";
}
