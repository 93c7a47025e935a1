//! eventhub-gateway: publish events to Azure Event Hubs through gRPC, with an embedded Event Hubs emulator.

pub mod client;
pub mod config;
pub mod emulator;
pub mod eventhubs;
pub mod gateway;
pub mod listener;
pub mod middleware;
pub mod producer;
pub mod proto;
pub mod server;
pub mod telemetry;
pub mod tls_material;
