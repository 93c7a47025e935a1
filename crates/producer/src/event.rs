//! The event a caller sends, and its encoding into the AMQP message Event Hubs stores: body, content type,
//! properties, ids, routing and the W3C trace context the Azure SDKs write.

use std::collections::BTreeMap;

use bytes::Bytes;
use fe2o3_amqp_types::messaging::annotations::{Annotations, OwnedKey};
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol};
use serde::Serialize;
use serde_amqp::Value;

use super::error::SendError;
pub use eventhub_telemetry::trace_context::TraceContext;
use eventhub_wire::annotations;
use eventhub_wire::limits;
use eventhub_wire::message::AmqpMessage;

/// Content type of JSON bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// Application property the Azure SDKs put the `traceparent` value in.
pub const DIAGNOSTIC_ID_PROPERTY: &str = "Diagnostic-Id";
/// Application property of the W3C `traceparent`.
pub const TRACEPARENT_PROPERTY: &str = "traceparent";
/// Application property of the W3C `tracestate`.
pub const TRACESTATE_PROPERTY: &str = "tracestate";

/// Where an event goes: wherever the service likes, where its key hashes, or one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Routing {
    /// The service spreads keyless events over the partitions.
    #[default]
    Any,
    /// The service (or the producer, with local partitioning) hashes the key to a partition.
    PartitionKey(String),
    /// This partition.
    PartitionId(String),
}

/// One event to send.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    /// The body's bytes.
    pub body: Bytes,
    /// `properties.content-type`.
    pub content_type: Option<String>,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
    /// `properties.message-id`.
    pub message_id: Option<String>,
    /// `properties.correlation-id`.
    pub correlation_id: Option<String>,
    /// The partition key, if any (exclusive with `partition_id`).
    pub partition_key: Option<String>,
    /// The partition id, if any (exclusive with `partition_key`).
    pub partition_id: Option<String>,
    /// The trace context written onto the message.
    pub trace_context: Option<TraceContext>,
}

impl Event {
    /// An event with a UTF-8 text body.
    pub fn text(text: impl Into<String>) -> Self {
        Self::binary(Bytes::from(text.into()))
    }

    /// An event with a binary body.
    pub fn binary(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// An event with a JSON body, encoded once and compactly, content type `application/json`.
    pub fn json(value: &serde_json::Value) -> Self {
        let encoded = serde_json::to_vec(value).unwrap_or_default(); // a Value always serializes
        Self {
            content_type: Some(JSON_CONTENT_TYPE.to_owned()),
            ..Self::binary(encoded)
        }
    }

    /// Sets the partition key.
    pub fn with_partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Sets the partition id.
    pub fn with_partition_id(mut self, id: impl Into<String>) -> Self {
        self.partition_id = Some(id.into());
        self
    }

    /// Adds an application property.
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the message id.
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the trace context.
    pub fn with_trace_context(mut self, context: TraceContext) -> Self {
        self.trace_context = Some(context);
        self
    }

    /// Where the event goes; a key together with an id is an error, as in every SDK.
    pub fn routing(&self) -> Result<Routing, SendError> {
        match (&self.partition_key, &self.partition_id) {
            (Some(_), Some(_)) => Err(SendError::InvalidEvent {
                field: "partition_key",
                reason: "give a partition key or a partition id, not both".into(),
            }),
            (Some(key), None) => Ok(Routing::PartitionKey(key.clone())),
            (None, Some(id)) if id.is_empty() => Err(SendError::InvalidEvent {
                field: "partition_id",
                reason: "must not be empty".into(),
            }),
            (None, Some(id)) => Ok(Routing::PartitionId(id.clone())),
            (None, None) => Ok(Routing::Any),
        }
    }

    /// Checks the event against the rules of [`limits`] (ids, content type, properties with the trace context's),
    /// so an event Event Hubs would refuse fails alone, before it joins a batch.
    pub fn validate(&self) -> Result<(), SendError> {
        if let Some(id) = &self.message_id {
            limits::check_message_id(id).map_err(SendError::OverLimit)?;
        }
        if let Some(id) = &self.correlation_id {
            limits::check_correlation_id(id).map_err(SendError::OverLimit)?;
        }
        if let Some(content_type) = &self.content_type {
            limits::check_content_type(content_type).map_err(SendError::OverLimit)?;
        }
        // The trace context's properties replace any of the same name.
        let trace: Vec<(&str, usize)> = match &self.trace_context {
            None => Vec::new(),
            Some(context) => {
                let mut trace = vec![
                    (DIAGNOSTIC_ID_PROPERTY, context.traceparent.len()),
                    (TRACEPARENT_PROPERTY, context.traceparent.len()),
                ];
                if let Some(state) = &context.tracestate {
                    trace.push((TRACESTATE_PROPERTY, state.len()));
                }
                trace
            }
        };
        let own = self
            .properties
            .iter()
            .filter(|(name, _)| !trace.iter().any(|(traced, _)| traced == name))
            .map(|(name, value)| (name.len(), value.len()));
        let all: Vec<(usize, usize)> = own
            .chain(trace.iter().map(|(name, len)| (name.len(), *len)))
            .collect();
        limits::check_properties(all.into_iter()).map_err(SendError::OverLimit)
    }

    /// The sections before the body: partition key annotation, properties, application properties.
    fn sections(&self) -> Sections {
        let message_annotations = self.partition_key.as_ref().map(|key| {
            let mut map = Annotations::new();
            map.insert(
                OwnedKey::Symbol(Symbol::from(annotations::PARTITION_KEY)),
                Value::String(key.clone()),
            );
            MessageAnnotations(map)
        });
        let properties = (self.content_type.is_some()
            || self.message_id.is_some()
            || self.correlation_id.is_some())
        .then(|| Properties {
            message_id: self.message_id.clone().map(MessageId::String),
            correlation_id: self.correlation_id.clone().map(MessageId::String),
            content_type: self.content_type.as_deref().map(Symbol::from),
            ..Properties::default()
        });
        let mut application = BTreeMap::new();
        for (name, value) in &self.properties {
            application.insert(name.clone(), SimpleValue::String(value.clone()));
        }
        if let Some(context) = &self.trace_context {
            let traceparent = SimpleValue::String(context.traceparent.clone());
            application.insert(DIAGNOSTIC_ID_PROPERTY.to_owned(), traceparent.clone());
            application.insert(TRACEPARENT_PROPERTY.to_owned(), traceparent);
            if let Some(state) = &context.tracestate {
                application.insert(
                    TRACESTATE_PROPERTY.to_owned(),
                    SimpleValue::String(state.clone()),
                );
            }
        }
        let application_properties = (!application.is_empty())
            .then(|| ApplicationProperties(application.into_iter().collect()));
        Sections {
            message_annotations,
            properties,
            application_properties,
        }
    }

    /// The AMQP message Event Hubs stores for this event.
    pub fn to_message(&self) -> AmqpMessage {
        let sections = self.sections();
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: sections.message_annotations,
            properties: sections.properties,
            application_properties: sections.application_properties,
            body: Body::Data(vec![Data(Binary::from(self.body.to_vec()))].into()),
            footer: None,
        }
    }

    /// The event encoded as one Data section of a batch: the same bytes as encoding [`Self::to_message`], but
    /// the body is copied once, into a buffer of the right size, instead of twice into a growing one.
    pub fn encode(&self) -> Result<Vec<u8>, SendError> {
        let sections = self.sections();
        let mut encoded = Vec::with_capacity(SECTIONS_SIZE_HINT + 8 + self.body.len());
        let mut serializer = serde_amqp::ser::Serializer::new(&mut encoded);
        // Absent sections are left out (serializing a None would write a null).
        let mut written = Ok(());
        if let Some(section) = &sections.message_annotations {
            written = written.and_then(|()| section.serialize(&mut serializer));
        }
        if let Some(section) = &sections.properties {
            written = written.and_then(|()| section.serialize(&mut serializer));
        }
        if let Some(section) = &sections.application_properties {
            written = written.and_then(|()| section.serialize(&mut serializer));
        }
        written.map_err(|error| SendError::InvalidEvent {
            field: "event",
            reason: format!("cannot be encoded as AMQP: {error}"),
        })?;
        write_data_section(&mut encoded, &self.body);
        Ok(encoded)
    }
}

/// Room reserved for the sections before the body; more only costs one reallocation.
const SECTIONS_SIZE_HINT: usize = 256;

/// The optional sections of an event's message before its body.
struct Sections {
    message_annotations: Option<MessageAnnotations>,
    properties: Option<Properties>,
    application_properties: Option<ApplicationProperties>,
}

/// Writes a Data section as serde_amqp does: descriptor 0x75, then vbin8 below 255 bytes, vbin32 from 255.
fn write_data_section(out: &mut Vec<u8>, body: &[u8]) {
    const DESCRIBED: u8 = 0x00;
    const SMALL_ULONG: u8 = 0x53;
    const DATA: u8 = 0x75;
    const VBIN8: u8 = 0xa0;
    const VBIN32: u8 = 0xb0;
    out.extend_from_slice(&[DESCRIBED, SMALL_ULONG, DATA]);
    match u8::try_from(body.len()) {
        Ok(len) if len < u8::MAX => out.extend_from_slice(&[VBIN8, len]),
        _ => {
            out.push(VBIN32);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventhub_wire::message::{decode, partition_key};

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn the_direct_encoding_is_the_message_encoding() {
        for len in [0, 1, 254, 255, 256, 70_000] {
            let plain = Event::binary(vec![7; len]);
            let full = Event::binary(vec![7; len])
                .with_partition_key("k")
                .with_property("colour", "blue")
                .with_content_type("text/plain")
                .with_message_id("m1")
                .with_trace_context(TraceContext::parse(TRACEPARENT, Some("a=b")).unwrap());
            for event in [plain, full] {
                let expected = eventhub_wire::message::encode(&event.to_message()).unwrap();
                assert_eq!(event.encode().unwrap(), expected, "body of {len} bytes");
            }
        }
    }

    #[test]
    fn an_event_encodes_every_field_the_sdks_read() {
        let event = Event::text("hello")
            .with_partition_key("k")
            .with_property("colour", "blue")
            .with_content_type("text/plain")
            .with_message_id("m1")
            .with_correlation_id("c1")
            .with_trace_context(TraceContext::parse(TRACEPARENT, Some("a=b")).unwrap());
        let message = decode(&event.encode().unwrap()).unwrap();
        assert_eq!(partition_key(&message), Ok(Some("k".into())));
        let properties = message.properties.unwrap();
        assert_eq!(properties.message_id, Some(MessageId::String("m1".into())));
        assert_eq!(
            properties.correlation_id,
            Some(MessageId::String("c1".into()))
        );
        assert_eq!(properties.content_type, Some(Symbol::from("text/plain")));
        let application = message.application_properties.unwrap().0;
        let get = |name: &str| match application.get(name) {
            Some(SimpleValue::String(value)) => value.clone(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(get("colour"), "blue");
        assert_eq!(get(DIAGNOSTIC_ID_PROPERTY), TRACEPARENT);
        assert_eq!(get(TRACEPARENT_PROPERTY), TRACEPARENT);
        assert_eq!(get(TRACESTATE_PROPERTY), "a=b");
        match message.body {
            Body::Data(sections) => assert_eq!(sections[0].0.as_ref(), b"hello"),
            other => panic!("data body expected: {other:?}"),
        }
    }

    #[test]
    fn json_is_compact_and_typed() {
        let event = Event::json(&serde_json::json!({ "a": [1, 2], "b": "c" }));
        assert_eq!(event.body.as_ref(), br#"{"a":[1,2],"b":"c"}"#);
        assert_eq!(event.content_type.as_deref(), Some(JSON_CONTENT_TYPE));
    }

    #[test]
    fn a_key_and_an_id_together_are_refused() {
        let error = Event::text("x")
            .with_partition_key("k")
            .with_partition_id("0")
            .routing()
            .unwrap_err();
        assert!(matches!(
            error,
            SendError::InvalidEvent {
                field: "partition_key",
                ..
            }
        ));
        assert_eq!(Event::text("x").routing(), Ok(Routing::Any));
        assert_eq!(
            Event::text("x").with_partition_id("3").routing(),
            Ok(Routing::PartitionId("3".into()))
        );
    }

    #[test]
    fn events_over_a_limit_are_refused_naming_the_rule() {
        let rule = |event: Event| match event.validate() {
            Err(SendError::OverLimit(violation)) => (violation.field, violation.rule),
            other => panic!("{other:?}"),
        };
        let mut many = Event::text("x");
        for n in 0..32_769 {
            many = many.with_property(format!("p{n}"), "");
        }
        assert_eq!(rule(many), ("properties", "max_properties"));
        assert_eq!(
            rule(Event::text("x").with_message_id("m".repeat(129))),
            ("message_id", "max_message_id_chars")
        );
        assert_eq!(
            rule(Event::text("x").with_correlation_id("c".repeat(129))),
            ("correlation_id", "max_correlation_id_chars")
        );
        assert_eq!(
            rule(Event::text("x").with_content_type("tëxt/plain")),
            ("content_type", "content_type_ascii")
        );
        assert_eq!(
            rule(Event::text("x").with_property("big", "v".repeat(40_000))),
            ("properties", "max_property_bytes")
        );
        // 1,022 properties and the trace context's three are one too many; the trace context's names replace
        // a caller's property of the same name rather than adding to the count.
        let mut near = Event::text("x")
            .with_trace_context(TraceContext::parse(TRACEPARENT, Some("a=b")).unwrap());
        for n in 0..1_021 {
            near = near.with_property(format!("p{n}"), "");
        }
        assert!(
            near.clone()
                .with_property("traceparent", "mine")
                .validate()
                .is_ok()
        );
        assert_eq!(
            rule(near.with_property("one-more", "")),
            ("properties", "max_properties")
        );
        assert!(
            Event::text("x")
                .with_message_id("é".repeat(128))
                .validate()
                .is_ok()
        );
    }
}
