//! The emulator's message codec: unpacking an incoming transfer (single message or batch) into the events
//! a partition stores, and stamping a stored event with the service's annotations for delivery.

use bytes::Bytes;
use fe2o3_amqp_types::messaging::{Body, MessageAnnotations, MessageId, annotations::OwnedKey};
use fe2o3_amqp_types::primitives::{SimpleValue, Symbol, Timestamp};
use serde_amqp::Value;

use super::node::AnyMessage;
use super::partition_log::StoredEvent;
use eventhub_wire::limits::{self, Violation};
use eventhub_wire::message::{self, AmqpMessage, decode, encode};
use eventhub_wire::{BATCH_MESSAGE_FORMAT, annotations};

/// An incoming transfer the service would refuse; the text says which event and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnpackError(pub String);

/// The events of one transfer, all bound for one partition.
#[derive(Debug)]
pub struct Unpacked {
    /// Each event's complete encoded message, as the client sent it.
    pub events: Vec<Bytes>,
    /// The partition key of the transfer, if any.
    pub partition_key: Option<String>,
}

/// Unpacks a transfer: a batch (`message-format` 0x80013700) yields its Data sections, each checked to be
/// a well-formed message with the batch's partition key; a plain message (format 0) is itself the event.
pub fn unpack(message_format: u32, message: AnyMessage) -> Result<Unpacked, UnpackError> {
    let partition_key =
        message::partition_key(&message).map_err(|e| UnpackError(format!("the message's {e}")))?;
    match message_format {
        BATCH_MESSAGE_FORMAT => {
            let Body::Data(sections) = message.body else {
                return Err(UnpackError(
                    "a batch (message-format 0x80013700) must carry its events as Data sections"
                        .into(),
                ));
            };
            let events = sections
                .into_iter()
                .enumerate()
                .map(|(index, section)| {
                    let bytes = Bytes::from(section.0.into_vec());
                    let inner = decode(&bytes)
                        .map_err(|e| UnpackError(format!("event {index} of the batch is not an AMQP message: {e}")))?;
                    let inner_key =
                        message::partition_key(&inner).map_err(|e| UnpackError(format!("event {index} of the batch: {e}")))?;
                    check_limits(&inner)
                        .map_err(|e| UnpackError(format!("event {index} of the batch: {}: {e}", e.field)))?;
                    if inner_key.is_some() && inner_key != partition_key {
                        return Err(UnpackError(format!(
                            "event {index} has partition key {inner_key:?} but the batch has {partition_key:?}: \
                             all events of a batch share one partition key"
                        )));
                    }
                    Ok(bytes)
                })
                .collect::<Result<Vec<_>, _>>()?;
            if events.is_empty() {
                return Err(UnpackError("the batch holds no event".into()));
            }
            Ok(Unpacked {
                events,
                partition_key,
            })
        }
        0 => {
            check_limits(&message)
                .map_err(|e| UnpackError(format!("the message: {}: {e}", e.field)))?;
            let encoded = encode(&message)
                .map_err(|e| UnpackError(format!("the message cannot be re-encoded: {e}")))?;
            Ok(Unpacked {
                events: vec![Bytes::from(encoded)],
                partition_key,
            })
        }
        other => Err(UnpackError(format!(
            "message-format {other:#x} is neither 0 nor the batch format 0x80013700"
        ))),
    }
}

/// Checks one event against the rules the service applies beyond its size (the producer checks the same, so the
/// gateway never sends what is refused here).
fn check_limits(event: &AmqpMessage) -> Result<(), Violation> {
    if let Some(properties) = &event.properties {
        if let Some(MessageId::String(id)) = &properties.message_id {
            limits::check_message_id(id)?;
        }
        if let Some(MessageId::String(id)) = &properties.correlation_id {
            limits::check_correlation_id(id)?;
        }
        if let Some(content_type) = &properties.content_type {
            limits::check_content_type(content_type.as_str())?;
        }
    }
    if let Some(application) = &event.application_properties {
        limits::check_properties(application.0.iter().map(|(name, value)| {
            let value = match value {
                SimpleValue::String(text) => text.len(),
                SimpleValue::Symbol(symbol) => symbol.as_str().len(),
                SimpleValue::Binary(bytes) => bytes.len(),
                // Numbers, timestamps, uuids: fixed and small.
                _ => 8,
            };
            (name.len(), value)
        }))?;
    }
    Ok(())
}

/// A stored event as a consumer receives it: the message as sent, with the service's annotations stamped.
pub fn stamp_for_delivery(event: &StoredEvent) -> Result<AnyMessage, serde_amqp::Error> {
    let mut message = decode(&event.message)?;
    let annotations = message
        .message_annotations
        .get_or_insert_with(|| MessageAnnotations(Default::default()));
    let mut set = |key: &str, value: Value| {
        annotations
            .0
            .insert(OwnedKey::Symbol(Symbol::from(key)), value)
    };
    set(
        annotations::SEQUENCE_NUMBER,
        Value::Long(event.sequence_number),
    );
    set(annotations::OFFSET, Value::String(event.offset.to_string()));
    set(
        annotations::ENQUEUED_TIME,
        Value::Timestamp(Timestamp::from_milliseconds(event.enqueued_time_ms)),
    );
    if let Some(key) = &event.partition_key {
        set(annotations::PARTITION_KEY, Value::String(key.to_string()));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{Data, Message, Properties, annotations::Annotations};
    use fe2o3_amqp_types::primitives::Binary;

    fn event(body: &str, key: Option<&str>) -> AnyMessage {
        let mut annotations = Annotations::new();
        if let Some(key) = key {
            annotations.insert(
                OwnedKey::Symbol(Symbol::from(annotations::PARTITION_KEY)),
                Value::String(key.into()),
            );
        }
        Message::builder()
            .message_annotations(MessageAnnotations(annotations))
            .properties(Properties {
                content_type: Some(Symbol::from("text/plain")),
                ..Default::default()
            })
            .body(Body::Data(
                vec![Data(Binary::from(body.as_bytes().to_vec()))].into(),
            ))
            .build()
    }

    fn batch(events: &[AnyMessage], key: Option<&str>) -> AnyMessage {
        let sections: Vec<Data> = events
            .iter()
            .map(|e| Data(Binary::from(encode(e).unwrap())))
            .collect();
        Message {
            body: Body::Data(sections.into()),
            ..event("", key)
        }
    }

    #[test]
    fn a_batch_yields_its_events_as_sent() {
        let events = [event("a", Some("k")), event("b", Some("k"))];
        let unpacked = unpack(BATCH_MESSAGE_FORMAT, batch(&events, Some("k"))).unwrap();
        assert_eq!(unpacked.partition_key.as_deref(), Some("k"));
        assert_eq!(unpacked.events.len(), 2);
        assert_eq!(decode(&unpacked.events[1]).unwrap(), events[1]);
    }

    #[test]
    fn a_batch_with_mixed_keys_is_refused() {
        let events = [event("a", Some("k")), event("b", Some("other"))];
        let err = unpack(BATCH_MESSAGE_FORMAT, batch(&events, Some("k"))).unwrap_err();
        assert!(
            err.0
                .starts_with("event 1 has partition key Some(\"other\")"),
            "{err}"
        );
    }

    #[test]
    fn a_batch_of_garbage_is_refused() {
        let garbage = Message {
            body: Body::Data(vec![Data(Binary::from(vec![0xff, 0x00]))].into()),
            ..event("", None)
        };
        let err = unpack(BATCH_MESSAGE_FORMAT, garbage).unwrap_err();
        assert!(
            err.0
                .starts_with("event 0 of the batch is not an AMQP message"),
            "{err}"
        );
    }

    #[test]
    fn a_single_message_is_its_own_event_and_gets_stamped() {
        let unpacked = unpack(0, event("hello", Some("k"))).unwrap();
        let stored = StoredEvent {
            sequence_number: 7,
            offset: 1234,
            enqueued_time_ms: 1_700_000_000_000,
            partition_key: Some("k".into()),
            message: unpacked.events[0].clone(),
        };
        let delivered = stamp_for_delivery(&stored).unwrap();
        let annotations = delivered.message_annotations.unwrap().0;
        let get = |k: &str| annotations.get(&OwnedKey::Symbol(Symbol::from(k))).cloned();
        assert_eq!(get(annotations::SEQUENCE_NUMBER), Some(Value::Long(7)));
        assert_eq!(get(annotations::OFFSET), Some(Value::String("1234".into())));
        assert_eq!(
            get(annotations::PARTITION_KEY),
            Some(Value::String("k".into()))
        );
        assert_eq!(
            delivered.properties.unwrap().content_type,
            Some(Symbol::from("text/plain"))
        );
    }

    #[test]
    fn a_batch_with_an_event_over_a_limit_is_refused_naming_the_event_and_the_rule() {
        let mut crowded = event("b", None);
        crowded.application_properties = Some(fe2o3_amqp_types::messaging::ApplicationProperties(
            (0..=limits::MAX_PROPERTIES)
                .map(|n| (format!("p{n}"), SimpleValue::Int(n as i32)))
                .collect(),
        ));
        let err = unpack(
            BATCH_MESSAGE_FORMAT,
            batch(&[event("a", None), crowded.clone()], None),
        )
        .unwrap_err();
        assert!(
            err.0
                .starts_with("event 1 of the batch: properties: 1025 properties")
                && err.0.contains("max_properties"),
            "{err}"
        );
        let err = unpack(0, crowded).unwrap_err();
        assert!(err.0.starts_with("the message: properties:"), "{err}");
        let mut long_id = event("c", None);
        long_id.properties = Some(Properties {
            message_id: Some(MessageId::String("m".repeat(129))),
            ..Default::default()
        });
        let err = unpack(BATCH_MESSAGE_FORMAT, batch(&[long_id], None)).unwrap_err();
        assert!(err.0.contains("message_id: 129 characters"), "{err}");
    }

    #[test]
    fn unknown_formats_are_refused() {
        assert!(unpack(42, event("a", None)).unwrap_err().0.contains("0x2a"));
    }
}
