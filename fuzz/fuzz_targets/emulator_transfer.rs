//! A transfer arriving on one of the emulator's sender links: its payload decoded as fe2o3 decodes a
//! delivery (`eventhub_wire::message::decode`), then unpacked (`codec::unpack`: a plain message, or a batch of
//! messages in Data sections), routed, and each stored event stamped and encoded for a consumer
//! (`eventhub_emulator::fuzzing::ingest_transfer`).
//!
//! Input: one selector byte (the transfer's message-format: 0, the batch format, or the next 4 bytes), then
//! the payload. Checked: nothing panics (but serde_amqp's known overflow: common/upstream.rs); a transfer taken yields at least one event, each a whole AMQP message.

#![no_main]

#[path = "common/upstream.rs"]
mod upstream;

use eventhub_emulator::fuzzing::ingest_transfer;
use eventhub_wire::BATCH_MESSAGE_FORMAT;
use eventhub_wire::message::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, mut payload)) = data.split_first() else {
        return;
    };
    let message_format = match selector % 4 {
        0 => 0,
        1 | 2 => BATCH_MESSAGE_FORMAT,
        _ => {
            let Some((format, rest)) = payload.split_first_chunk::<4>() else {
                return;
            };
            payload = rest;
            u32::from_be_bytes(*format)
        }
    };
    let Some(taken) = upstream::tolerating_serde_amqp(|| {
        let message = decode(payload).ok()?;
        Some(ingest_transfer(message_format, message))
    }) else {
        return;
    };
    if let Ok(events) = taken {
        assert!(!events.is_empty(), "a transfer taken holds an event");
        for event in &events {
            decode(event).expect("a stored event is a whole AMQP message");
        }
    }
});
