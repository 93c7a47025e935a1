//! eventhub-gateway: publish events to Azure Event Hubs through gRPC, with an embedded Event Hubs emulator.

pub mod emulator;
pub mod eventhubs;
pub mod middleware;
pub mod producer;
pub mod proto;
