//! eventhub-gateway: publish events to Azure Event Hubs through gRPC, with an embedded Event Hubs emulator.

#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod config;
pub mod gateway;
pub mod grpc_web;
pub mod listener;
pub mod middleware;
pub mod proto;
pub mod rest;
pub mod server;
pub mod telemetry;
pub mod tls_material;
