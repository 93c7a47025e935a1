//! Encoding and decoding whole AMQP messages, as batches carry them in Data sections, and reading the
//! Event Hubs annotations of a message.

use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{Body, Message};
use fe2o3_amqp_types::primitives::Symbol;
// fe2o3 encodes whole messages only through these hidden wrappers (what its links use); no public codec exists.
use fe2o3_amqp_types::messaging::message::__private::{Deserializable, Serializable};
use serde_amqp::Value;

use super::annotations;

/// An AMQP message with any body.
pub type AmqpMessage = Message<Body<Value>>;

/// Encodes a complete message (header, annotations, properties, body, footer).
pub fn encode(message: &AmqpMessage) -> Result<Vec<u8>, serde_amqp::Error> {
    serde_amqp::to_vec(&Serializable(message))
}

/// Decodes a complete message.
pub fn decode(bytes: &[u8]) -> Result<AmqpMessage, serde_amqp::Error> {
    serde_amqp::from_slice::<Deserializable<AmqpMessage>>(bytes).map(|message| message.0)
}

/// The message annotation `name`, if present.
pub fn annotation<'a>(message: &'a AmqpMessage, name: &str) -> Option<&'a Value> {
    let key = OwnedKey::Symbol(Symbol::from(name));
    message.message_annotations.as_ref()?.0.get(&key)
}

/// The partition key annotation: `Ok(None)` when absent, an error when it is not a string.
pub fn partition_key(message: &AmqpMessage) -> Result<Option<String>, String> {
    match annotation(message, annotations::PARTITION_KEY) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(key)) => Ok(Some(key.clone())),
        Some(other) => Err(format!(
            "x-opt-partition-key must be a string, not {other:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{AmqpValue, Properties};

    #[test]
    fn encode_then_decode_is_the_identity() {
        let message: AmqpMessage = Message::builder()
            .properties(Properties {
                content_type: Some(Symbol::from("application/json")),
                ..Default::default()
            })
            .body(Body::Value(AmqpValue(Value::String("{}".into()))))
            .build();
        assert_eq!(decode(&encode(&message).unwrap()).unwrap(), message);
        assert_eq!(partition_key(&message), Ok(None));
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(decode(&[0xff, 0x00, 0x01]).is_err());
    }
}
