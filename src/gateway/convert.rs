//! Protobuf events into producer events: body kinds (a CloudEvent through `cloud_event`), JSON from
//! `google.protobuf.Struct`, ids, properties, and the call's trace context; every refusal names the field.

use prost_types::value::Kind;

use super::cloud_event;
use crate::proto::v1;
use eventhub_producer::{Event, SendError, TraceContext};
use eventhub_wire::limits;

/// The producer event of a protobuf event (routing, size and partition ids are checked by the producer).
pub fn event_from_proto(
    mut proto: v1::Event,
    trace_context: Option<&TraceContext>,
) -> Result<Event, SendError> {
    let mut cloud_event_key = None;
    let mut event = match proto.body {
        None => {
            return Err(SendError::InvalidEvent {
                field: "body",
                reason: "is required: set one of text, binary, json or cloud_event".into(),
            });
        }
        Some(v1::event::Body::Text(text)) => Event::text(text),
        Some(v1::event::Body::Binary(bytes)) => Event::binary(bytes),
        Some(v1::event::Body::Json(object)) => Event::json(&struct_to_json(object)?),
        Some(v1::event::Body::CloudEvent(cloud)) => {
            let mode = cloud_event::mode(&proto.content_type)?;
            let converted = cloud_event::convert(*cloud, mode)?;
            if let Some(name) = proto.properties.keys().find(|name| {
                name.starts_with(cloud_event::PROPERTY_PREFIX)
                    || name.starts_with(cloud_event::OTHER_PROPERTY_PREFIX)
            }) {
                return Err(SendError::InvalidEvent {
                    field: "properties",
                    reason: format!(
                        "{name:?}: beside a cloud_event, names starting with cloudEvents_ or cloudEvents: \
                         are the CloudEvent's own; set it as a cloud_event attribute"
                    ),
                });
            }
            cloud_event_key = converted.partition_key;
            let mut event = Event::binary(converted.body);
            event.content_type = match mode {
                cloud_event::Mode::Binary => converted.content_type,
                cloud_event::Mode::Structured => Some(std::mem::take(&mut proto.content_type)),
            };
            event.properties = converted.properties.into_iter().collect();
            proto.content_type.clear();
            event
        }
    };
    if !proto.content_type.is_empty() {
        event = event.with_content_type(proto.content_type);
    }
    if !proto.partition_key.is_empty() {
        event = event.with_partition_key(proto.partition_key);
    } else if proto.partition_id.is_empty()
        && let Some(key) = cloud_event_key
    {
        // The CloudEvents partitioning extension routes when the Event itself does not.
        event = event.with_partition_key(key);
    }
    if !proto.partition_id.is_empty() {
        event = event.with_partition_id(proto.partition_id);
    }
    if !proto.message_id.is_empty() {
        event = event.with_message_id(proto.message_id);
    }
    if !proto.correlation_id.is_empty() {
        event = event.with_correlation_id(proto.correlation_id);
    }
    // Far too many is refused before they are copied and sorted (the producer checks every rule again).
    if proto.properties.len() > limits::MAX_PROPERTIES {
        return Err(SendError::OverLimit(limits::Violation {
            field: "properties",
            rule: "max_properties",
            limit: limits::MAX_PROPERTIES,
            actual: proto.properties.len(),
        }));
    }
    // Sorted, so the stored message does not depend on the map's iteration order.
    let mut properties: Vec<(String, String)> = proto.properties.into_iter().collect();
    properties.sort();
    for (name, value) in properties {
        if name.is_empty() {
            return Err(SendError::InvalidEvent {
                field: "properties",
                reason: "property names must not be empty".into(),
            });
        }
        event = event.with_property(name, value);
    }
    if let Some(context) = trace_context {
        event = event.with_trace_context(context.clone());
    }
    Ok(event)
}

fn struct_to_json(object: prost_types::Struct) -> Result<serde_json::Value, SendError> {
    object
        .fields
        .into_iter()
        .map(|(name, value)| Ok((name, value_to_json(value)?)))
        .collect::<Result<serde_json::Map<_, _>, _>>()
        .map(serde_json::Value::Object)
}

/// Largest integer a double holds exactly: integral numbers up to it are written without a fraction.
const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

fn value_to_json(value: prost_types::Value) -> Result<serde_json::Value, SendError> {
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(flag)) => serde_json::Value::Bool(flag),
        Some(Kind::StringValue(text)) => serde_json::Value::String(text),
        Some(Kind::NumberValue(number)) => {
            if number.fract() == 0.0 && number.abs() <= EXACT_INTEGER_LIMIT {
                serde_json::Value::from(number as i64)
            } else {
                serde_json::Number::from_f64(number)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| SendError::InvalidEvent {
                        field: "json",
                        reason: format!(
                            "{number} is not a JSON number (NaN and infinities are not)"
                        ),
                    })?
            }
        }
        Some(Kind::StructValue(object)) => struct_to_json(object)?,
        Some(Kind::ListValue(list)) => serde_json::Value::Array(
            list.values
                .into_iter()
                .map(value_to_json)
                .collect::<Result<_, _>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn value(kind: Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    #[test]
    fn json_bodies_are_compact_with_integers_kept_integral() {
        let mut fields = BTreeMap::new();
        fields.insert("n".to_owned(), value(Kind::NumberValue(3.0)));
        fields.insert("x".to_owned(), value(Kind::NumberValue(0.5)));
        fields.insert(
            "list".to_owned(),
            value(Kind::ListValue(prost_types::ListValue {
                values: vec![value(Kind::BoolValue(true)), value(Kind::NullValue(0))],
            })),
        );
        let proto = v1::Event {
            body: Some(v1::event::Body::Json(prost_types::Struct { fields })),
            ..Default::default()
        };
        let event = event_from_proto(proto, None).unwrap();
        assert_eq!(
            event.body.as_ref(),
            br#"{"list":[true,null],"n":3,"x":0.5}"#
        );
        assert_eq!(event.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn a_given_content_type_is_kept() {
        let proto = v1::Event {
            body: Some(v1::event::Body::Json(prost_types::Struct::default())),
            content_type: "application/vnd.example+json".into(),
            ..Default::default()
        };
        let event = event_from_proto(proto, None).unwrap();
        assert_eq!(
            event.content_type.as_deref(),
            Some("application/vnd.example+json")
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let no_body = event_from_proto(v1::Event::default(), None).unwrap_err();
        assert!(matches!(
            no_body,
            SendError::InvalidEvent { field: "body", .. }
        ));
        let nan = v1::Event {
            body: Some(v1::event::Body::Json(prost_types::Struct {
                fields: [("n".to_owned(), value(Kind::NumberValue(f64::NAN)))].into(),
            })),
            ..Default::default()
        };
        let error = event_from_proto(nan, None).unwrap_err();
        assert!(matches!(
            error,
            SendError::InvalidEvent { field: "json", .. }
        ));
        let crowded = v1::Event {
            body: Some(v1::event::Body::Text("t".into())),
            properties: (0..=limits::MAX_PROPERTIES)
                .map(|n| (format!("p{n}"), String::new()))
                .collect(),
            ..Default::default()
        };
        let error = event_from_proto(crowded, None).unwrap_err();
        assert!(
            matches!(&error, SendError::OverLimit(v) if v.rule == "max_properties" && v.actual == 1025),
            "{error}"
        );
        let unnamed = v1::Event {
            body: Some(v1::event::Body::Text("t".into())),
            properties: [(String::new(), "v".to_owned())].into(),
            ..Default::default()
        };
        let error = event_from_proto(unnamed, None).unwrap_err();
        assert!(matches!(
            error,
            SendError::InvalidEvent {
                field: "properties",
                ..
            }
        ));
    }

    fn cloud_event(partition_key: Option<&str>) -> v1::Event {
        use crate::proto::io::cloudevents::v1::{
            CloudEvent,
            cloud_event::{CloudEventAttributeValue, Data, cloud_event_attribute_value::Attr},
        };
        let mut attributes = std::collections::HashMap::new();
        if let Some(key) = partition_key {
            attributes.insert(
                "partitionkey".to_owned(),
                CloudEventAttributeValue {
                    attr: Some(Attr::CeString(key.into())),
                },
            );
        }
        v1::Event {
            body: Some(v1::event::Body::CloudEvent(Box::new(CloudEvent {
                id: "1".into(),
                source: "/s".into(),
                spec_version: "1.0".into(),
                r#type: "t".into(),
                attributes,
                data: Some(Data::TextData("hi".into())),
            }))),
            ..Default::default()
        }
    }

    #[test]
    fn a_cloud_event_keeps_the_events_own_fields_beside_its_attributes() {
        let proto = v1::Event {
            properties: [("colour".to_owned(), "blue".to_owned())].into(),
            message_id: "m".into(),
            ..cloud_event(Some("from-extension"))
        };
        let event = event_from_proto(proto, None).unwrap();
        assert_eq!(event.body.as_ref(), b"hi");
        assert_eq!(event.properties["colour"], "blue");
        assert_eq!(event.properties["cloudEvents_id"], "1");
        assert_eq!(
            event.properties["cloudEvents_partitionkey"],
            "from-extension"
        );
        assert_eq!(event.message_id.as_deref(), Some("m"));
        // The partitioning extension routes only when the Event does not.
        assert_eq!(event.partition_key.as_deref(), Some("from-extension"));
        let keyed = v1::Event {
            partition_key: "own".into(),
            ..cloud_event(Some("from-extension"))
        };
        assert_eq!(
            event_from_proto(keyed, None)
                .unwrap()
                .partition_key
                .as_deref(),
            Some("own")
        );
        let pinned = v1::Event {
            partition_id: "2".into(),
            ..cloud_event(Some("from-extension"))
        };
        let pinned = event_from_proto(pinned, None).unwrap();
        assert_eq!(pinned.partition_key, None);
        assert_eq!(pinned.partition_id.as_deref(), Some("2"));
    }

    #[test]
    fn a_cloud_events_content_type_selects_the_mode() {
        let structured = v1::Event {
            content_type: "application/cloudevents+json; charset=utf-8".into(),
            ..cloud_event(None)
        };
        let event = event_from_proto(structured, None).unwrap();
        assert_eq!(
            event.content_type.as_deref(),
            Some("application/cloudevents+json; charset=utf-8")
        );
        let json: serde_json::Value = serde_json::from_slice(&event.body).unwrap();
        assert_eq!(json["data"], "hi");
        assert!(event.properties.is_empty());
        let other = v1::Event {
            content_type: "text/plain".into(),
            ..cloud_event(None)
        };
        let error = event_from_proto(other, None).unwrap_err();
        assert!(matches!(
            error,
            SendError::InvalidEvent {
                field: "content_type",
                ..
            }
        ));
    }

    #[test]
    fn properties_cannot_pose_as_cloud_event_attributes() {
        for name in ["cloudEvents_id", "cloudEvents:type"] {
            let proto = v1::Event {
                properties: [(name.to_owned(), "x".to_owned())].into(),
                ..cloud_event(None)
            };
            let error = event_from_proto(proto, None).unwrap_err();
            assert!(
                matches!(&error, SendError::InvalidEvent { field: "properties", reason } if reason.contains(name)),
                "{error:?}"
            );
        }
        // Without a CloudEvent such names are the sender's own.
        let plain = v1::Event {
            body: Some(v1::event::Body::Text("t".into())),
            properties: [("cloudEvents_id".to_owned(), "x".to_owned())].into(),
            ..Default::default()
        };
        event_from_proto(plain, None).unwrap();
    }
}
