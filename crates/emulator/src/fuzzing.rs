//! Entry points into the emulator's decoders of client bytes, for the fuzz targets in `fuzz/` (not an API:
//! hidden from the docs, and free to change with them). Each runs the code a connection runs on what a
//! client sent, on a namespace built from the default configuration, and reports only what a target checks.

use bytes::Bytes;

use super::cbs::{self, Grants, PutToken};
use super::codec::{stamp_for_delivery, unpack};
use super::config::EmulatorConfig;
use super::management;
use super::namespace::Namespace;
use super::node::{AnyMessage, Status, response};
use super::partition_log::StoredEvent;
use eventhub_wire::message::encode;

/// The key name and key of the namespace the entries use (the default configuration's).
pub fn namespace_key() -> (String, String) {
    let config = EmulatorConfig::default();
    (config.key_name, config.key)
}

/// A transfer as the sender link takes it: unpacked, routed, each event stamped for delivery and encoded as
/// a consumer would receive it. The stored events, or the refusal the client would get.
pub fn ingest_transfer(message_format: u32, message: AnyMessage) -> Result<Vec<Bytes>, String> {
    let namespace = Namespace::new(&EmulatorConfig::default(), 0);
    let hub = namespace
        .hub("eh1")
        .ok_or("the default configuration has hub eh1")?;
    let unpacked = unpack(message_format, message).map_err(|error| error.0)?;
    hub.route(unpacked.partition_key.as_deref());
    for (sequence_number, event) in unpacked.events.iter().enumerate() {
        let stored = StoredEvent {
            sequence_number: sequence_number as i64,
            offset: 0,
            enqueued_time_ms: 0,
            partition_key: unpacked.partition_key.as_deref().map(Into::into),
            message: event.clone(),
        };
        let delivered = stamp_for_delivery(&stored)
            .map_err(|error| format!("a stored event does not decode again: {error}"))?;
        encode(&delivered).map_err(|error| format!("a delivery does not encode: {error}"))?;
    }
    Ok(unpacked.events)
}

/// A `$cbs` request answered as the request link does (JWTs accepted), at `now_ms`: its status code, after
/// the response is encoded.
pub fn cbs_request(request: &AnyMessage, now_ms: i64) -> Result<u16, String> {
    let namespace = Namespace::new(
        &EmulatorConfig {
            accept_jwt: true,
            ..EmulatorConfig::default()
        },
        0,
    );
    let grants = Grants::default();
    let status = cbs::put_token(
        &namespace,
        &grants,
        &PutToken::from_message(request),
        now_ms,
        0,
    );
    answered(request, &status, serde_amqp::Value::Null)
}

/// A `$management` request (its `security_token` checked) answered as the request link does, at `now_ms`:
/// its status code, after the response is encoded.
pub fn management_request(request: &AnyMessage, now_ms: i64) -> Result<u16, String> {
    let namespace = Namespace::new(&EmulatorConfig::default(), 0);
    let (status, body) =
        match management::handle(&namespace, &Grants::default(), request, now_ms, 0) {
            Ok(body) => (Status::new(200, "OK"), body),
            Err(status) => (status, serde_amqp::Value::Null),
        };
    answered(request, &status, body)
}

fn answered(request: &AnyMessage, status: &Status, body: serde_amqp::Value) -> Result<u16, String> {
    let answer = response(request, status, body);
    encode(&answer).map_err(|error| format!("the response does not encode: {error}"))?;
    u16::try_from(status.code).map_err(|_| format!("status code {} out of range", status.code))
}
