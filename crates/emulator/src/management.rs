//! The `$management` node: `READ` of hub and partition properties, with the service's response schema.

use fe2o3_amqp_types::primitives::{Array, OrderedMap, Timestamp};
use serde_amqp::Value;

use super::cbs::{Grants, verify_token_for};
use super::namespace::Namespace;
use super::node::{AnyMessage, Status, string_property};

/// `type` of a hub properties request.
pub const EVENT_HUB_TYPE: &str = "com.microsoft:eventhub";
/// `type` of a partition properties request.
pub const PARTITION_TYPE: &str = "com.microsoft:partition";

/// Answers one management request: the response body, or the status explaining the refusal.
pub fn handle(
    namespace: &Namespace,
    grants: &Grants,
    request: &AnyMessage,
    now_ms: i64,
    token_generation: u64,
) -> Result<Value, Status> {
    let operation = string_property(request, "operation");
    if operation.as_deref() != Some("READ") {
        return Err(Status::new(
            400,
            format!("unsupported management operation {operation:?}: only READ is"),
        ));
    }
    let name =
        string_property(request, "name").ok_or_else(|| Status::new(400, "no `name` property"))?;
    let hub = namespace.hub(&name).ok_or_else(|| {
        Status::new(
            404,
            format!("the messaging entity '{name}' could not be found"),
        )
    })?;
    let path = name.to_ascii_lowercase();
    match string_property(request, "security_token") {
        Some(token) => verify_token_for(namespace, &token, &path, now_ms)?,
        None if grants
            .expiry_covering(&path, now_ms, token_generation)
            .is_some() => {}
        None => {
            return Err(Status::new(
                401,
                format!("unauthorized: no valid token for '{path}'"),
            ));
        }
    }

    let entry = |key: &str, value: Value| (Value::String(key.into()), value);
    let string = |s: &str| Value::String(s.to_owned());
    match string_property(request, "type").as_deref() {
        Some(EVENT_HUB_TYPE) => Ok(Value::Map(OrderedMap::from_iter([
            entry("name", string(&hub.name)),
            entry("type", string(EVENT_HUB_TYPE)),
            entry(
                "created_at",
                Value::Timestamp(Timestamp::from_milliseconds(hub.created_at_ms)),
            ),
            entry(
                "partition_count",
                Value::Int(hub.partition_ids.len() as i32),
            ),
            entry(
                "partition_ids",
                Value::Array(Array::from(
                    hub.partition_ids
                        .iter()
                        .map(|id| string(id))
                        .collect::<Vec<_>>(),
                )),
            ),
        ]))),
        Some(PARTITION_TYPE) => {
            let id = string_property(request, "partition")
                .ok_or_else(|| Status::new(400, "no `partition` property"))?;
            let index = hub.partition_index(&id).ok_or_else(|| {
                Status::new(
                    404,
                    format!("the partition '{id}' of '{}' could not be found", hub.name),
                )
            })?;
            let props = hub.partition(index).properties();
            Ok(Value::Map(OrderedMap::from_iter([
                entry("name", string(&hub.name)),
                entry("type", string(PARTITION_TYPE)),
                entry("partition", string(&id)),
                entry(
                    "begin_sequence_number",
                    Value::Long(props.begin_sequence_number),
                ),
                entry(
                    "last_enqueued_sequence_number",
                    Value::Long(props.last_enqueued_sequence_number),
                ),
                entry(
                    "last_enqueued_offset",
                    string(&props.last_enqueued_offset.to_string()),
                ),
                entry(
                    "last_enqueued_time_utc",
                    Value::Timestamp(Timestamp::from_milliseconds(props.last_enqueued_time_ms)),
                ),
                entry("is_partition_empty", Value::Bool(props.is_empty)),
            ])))
        }
        other => Err(Status::new(
            400,
            format!("unknown management type {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EmulatorConfig;
    use eventhub_wire::sas::sign_token;
    use fe2o3_amqp_types::messaging::{AmqpValue, ApplicationProperties, Body, Message};

    fn request(properties: &[(&str, &str)]) -> AnyMessage {
        let mut builder = ApplicationProperties::builder();
        for (key, value) in properties {
            builder = builder.insert(*key, *value);
        }
        Message::builder()
            .application_properties(builder.build())
            .body(Body::Value(AmqpValue(Value::Null)))
            .build()
    }

    fn field<'a>(map: &'a Value, key: &str) -> &'a Value {
        let Value::Map(map) = map else {
            panic!("not a map: {map:?}")
        };
        map.get(&Value::String(key.into()))
            .unwrap_or_else(|| panic!("no {key}"))
    }

    #[test]
    fn reads_hub_and_partition_properties() {
        let namespace = Namespace::new(&EmulatorConfig::default(), 1_700_000_000_000);
        let token = sign_token(
            "sb://localhost/eh1",
            "RootManageSharedAccessKey",
            "SAS_KEY_VALUE",
            4_000_000_000,
        );
        let hub = handle(
            &namespace,
            &Grants::default(),
            &request(&[
                ("operation", "READ"),
                ("type", EVENT_HUB_TYPE),
                ("name", "eh1"),
                ("security_token", &token),
            ]),
            0,
            0,
        )
        .unwrap();
        assert_eq!(field(&hub, "partition_count"), &Value::Int(2));
        assert_eq!(
            field(&hub, "created_at"),
            &Value::Timestamp(Timestamp::from_milliseconds(1_700_000_000_000))
        );

        let partition = handle(
            &namespace,
            &Grants::default(),
            &request(&[
                ("operation", "READ"),
                ("type", PARTITION_TYPE),
                ("name", "eh1"),
                ("partition", "1"),
                ("security_token", &token),
            ]),
            0,
            0,
        )
        .unwrap();
        assert_eq!(
            field(&partition, "last_enqueued_sequence_number"),
            &Value::Long(-1)
        );
        assert_eq!(
            field(&partition, "last_enqueued_offset"),
            &Value::String("-1".into())
        );
        assert_eq!(field(&partition, "is_partition_empty"), &Value::Bool(true));
    }

    #[test]
    fn refusals_carry_the_service_codes() {
        let namespace = Namespace::new(&EmulatorConfig::default(), 0);
        let grants = Grants::default();
        let code = |props: &[(&str, &str)]| {
            handle(&namespace, &grants, &request(props), 0, 0)
                .unwrap_err()
                .code
        };
        assert_eq!(
            code(&[
                ("operation", "READ"),
                ("type", EVENT_HUB_TYPE),
                ("name", "nope")
            ]),
            404
        );
        assert_eq!(
            code(&[
                ("operation", "READ"),
                ("type", EVENT_HUB_TYPE),
                ("name", "eh1")
            ]),
            401
        );
        assert_eq!(code(&[("operation", "DELETE"), ("name", "eh1")]), 400);
        let bad_token = [
            ("operation", "READ"),
            ("type", EVENT_HUB_TYPE),
            ("name", "eh1"),
            ("security_token", "x"),
        ];
        assert_eq!(code(&bad_token), 401);
    }
}
