//! What an Event Hubs REST send request says: its route (`/{hub}/messages`, `/{hub}/partitions/{id}/messages`,
//! `/{hub}/publishers/{publisher}/messages`), its `?timeout=`, and its events (one: the body as sent with the
//! `BrokerProperties` header and custom headers as properties; a batch: the service's JSON array).

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::HeaderMap;
use percent_encoding::percent_decode_str;

use crate::gateway::GatewayError;
use crate::proto::v1;

/// The media type of a batch (parameters such as `charset` are ignored).
pub const BATCH_MEDIA_TYPE: &str = "application/vnd.microsoft.servicebus.json";

/// The longest `?timeout=` taken, seconds (the gateway's send timeout bounds the call anyway).
const MAX_TIMEOUT_SECONDS: u64 = 3600;

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The hub, as in the path (percent-decoded).
    pub hub: String,
    /// The partition or publisher it names, if any.
    pub target: Target,
}

/// The part of a route under its hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `/{hub}/messages`: Event Hubs (or the event's `PartitionKey`) chooses the partition.
    Hub,
    /// `/{hub}/partitions/{id}/messages`.
    Partition(String),
    /// `/{hub}/publishers/{publisher}/messages`: the publisher is the partition key.
    Publisher(String),
}

impl Route {
    /// The route of a request path, or `None` for a path that is none of the three send routes.
    pub fn parse(path: &str) -> Option<Self> {
        let segments: Vec<String> = path
            .strip_prefix('/')?
            .split('/')
            .map(|segment| {
                percent_decode_str(segment)
                    .decode_utf8()
                    .ok()
                    .map(|s| s.into_owned())
            })
            .collect::<Option<_>>()?;
        let segment = |index: usize, literal: &str| {
            segments
                .get(index)
                .is_some_and(|segment| segment.eq_ignore_ascii_case(literal))
        };
        let named = |segment: &String| !segment.is_empty();
        match segments.as_slice() {
            [hub, _] if named(hub) && segment(1, "messages") => Some(Self {
                hub: hub.clone(),
                target: Target::Hub,
            }),
            [hub, _, id, _]
                if named(hub)
                    && named(id)
                    && segment(1, "partitions")
                    && segment(3, "messages") =>
            {
                Some(Self {
                    hub: hub.clone(),
                    target: Target::Partition(id.clone()),
                })
            }
            [hub, _, publisher, _]
                if named(hub)
                    && named(publisher)
                    && segment(1, "publishers")
                    && segment(3, "messages") =>
            {
                Some(Self {
                    hub: hub.clone(),
                    target: Target::Publisher(publisher.clone()),
                })
            }
            _ => None,
        }
    }

    /// The route under the hub, as a SAS token's `sr` must cover it.
    pub fn tail(&self) -> Vec<String> {
        match &self.target {
            Target::Hub => Vec::new(),
            Target::Partition(id) => vec!["partitions".into(), id.clone()],
            Target::Publisher(publisher) => vec!["publishers".into(), publisher.clone()],
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The `?timeout=` of a query (whole seconds), if given; `api-version` and unknown parameters are ignored.
pub fn timeout(query: Option<&str>) -> Result<Option<Duration>, GatewayError> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name.eq_ignore_ascii_case("timeout") {
            let seconds: u64 = value
                .parse()
                .ok()
                .filter(|seconds| (1..=MAX_TIMEOUT_SECONDS).contains(seconds))
                .ok_or_else(|| {
                    invalid(
                        "timeout",
                        format!("must be whole seconds from 1 to {MAX_TIMEOUT_SECONDS}"),
                    )
                })?;
            return Ok(Some(Duration::from_secs(seconds)));
        }
    }
    Ok(None)
}

/// Whether the request's `Content-Type` is the batch media type.
pub fn is_batch(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(BATCH_MEDIA_TYPE))
}

/// Headers that are HTTP's, the gateway's or a proxy's, never an event's custom properties.
const NOT_PROPERTIES: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "authorization",
    "baggage",
    "brokerproperties",
    "cache-control",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "cookie",
    "date",
    "expect",
    "forwarded",
    "host",
    "keep-alive",
    "origin",
    "pragma",
    "proxy-authorization",
    "proxy-connection",
    "referer",
    "te",
    "traceparent",
    "tracestate",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "via",
    "x-client-id",
    "x-real-ip",
];

/// Prefixes of headers that are never properties (Azure's `x-ms-*`, proxies' `x-forwarded-*`).
const NOT_PROPERTY_PREFIXES: &[&str] = &["x-ms-", "x-forwarded-"];

fn is_property(name: &str) -> bool {
    !NOT_PROPERTIES.contains(&name)
        && !NOT_PROPERTY_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// The events of a request: one from its body and headers, or a batch's.
pub fn events(
    route: &Route,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Vec<v1::Event>, GatewayError> {
    if is_batch(headers) {
        return batch(route, &body);
    }
    let mut event = v1::Event {
        body: Some(v1::event::Body::Binary(body)),
        ..v1::Event::default()
    };
    if let Some(value) = headers.get("brokerproperties") {
        let text = std::str::from_utf8(value.as_bytes())
            .map_err(|_| invalid("BrokerProperties", "is not UTF-8"))?;
        let parsed: serde_json::Value = serde_json::from_str(text)
            .map_err(|error| invalid("BrokerProperties", format!("is not JSON: {error}")))?;
        broker_properties(&mut event, &parsed, "BrokerProperties")?;
    }
    for (name, value) in headers {
        let name = name.as_str();
        if !is_property(name) {
            continue;
        }
        let value = std::str::from_utf8(value.as_bytes())
            .map_err(|_| invalid(format!("headers.{name}"), "is not UTF-8"))?;
        // A repeated header is one property whose values are joined, as HTTP reads repeated fields.
        event
            .properties
            .entry(name.to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(value);
            })
            .or_insert_with(|| value.to_owned());
    }
    route_event(route, &mut event, "BrokerProperties.PartitionKey")?;
    Ok(vec![event])
}

/// The `BrokerProperties` the gateway honours: `PartitionKey`, `MessageId`, `CorrelationId`, `ContentType`
/// (strings); the service's others (`Label`, `TimeToLive`, ...) mean nothing to Event Hubs and are ignored.
fn broker_properties(
    event: &mut v1::Event,
    value: &serde_json::Value,
    at: &str,
) -> Result<(), GatewayError> {
    let object = value
        .as_object()
        .ok_or_else(|| invalid(at, "must be a JSON object"))?;
    let string = |name: &str| -> Result<Option<String>, GatewayError> {
        match object.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(invalid(format!("{at}.{name}"), "must be a string")),
        }
    };
    if let Some(key) = string("PartitionKey")? {
        event.partition_key = key;
    }
    if let Some(id) = string("MessageId")? {
        event.message_id = id;
    }
    if let Some(id) = string("CorrelationId")? {
        event.correlation_id = id;
    }
    if let Some(content_type) = string("ContentType")? {
        event.content_type = content_type;
    }
    Ok(())
}

/// Applies the route to an event: a partition route sets its partition id; a publisher route its partition
/// key, which the event's own `PartitionKey` may repeat but not contradict.
fn route_event(route: &Route, event: &mut v1::Event, key_field: &str) -> Result<(), GatewayError> {
    match &route.target {
        Target::Hub => {}
        Target::Partition(id) => event.partition_id = id.clone(),
        Target::Publisher(publisher) => {
            if !event.partition_key.is_empty() && event.partition_key != *publisher {
                return Err(invalid(
                    key_field,
                    "differs from the route's publisher (the publisher is the partition key)",
                ));
            }
            event.partition_key = publisher.clone();
        }
    }
    Ok(())
}

/// A batch: `[{"Body": "...", "IsBodyBase64": false, "UserProperties": {...}, "BrokerProperties": {...}}, ...]`.
fn batch(route: &Route, body: &[u8]) -> Result<Vec<v1::Event>, GatewayError> {
    let parsed: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| GatewayError::MalformedRequest {
            field: Some("body".into()),
            detail: format!("a batch must be a JSON array of events: {error}"),
        })?;
    let items = parsed
        .as_array()
        .ok_or_else(|| invalid("body", "a batch must be a JSON array of events"))?;
    if items.is_empty() {
        return Err(invalid("body", "a batch must hold at least one event"));
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| batch_event(route, index, item))
        .collect()
}

fn batch_event(
    route: &Route,
    index: usize,
    item: &serde_json::Value,
) -> Result<v1::Event, GatewayError> {
    let at = |field: &str| format!("[{index}].{field}");
    let object = item
        .as_object()
        .ok_or_else(|| invalid(format!("[{index}]"), "must be a JSON object"))?;
    let base64 = match object.get("IsBodyBase64") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(flag)) => *flag,
        Some(_) => return Err(invalid(at("IsBodyBase64"), "must be true or false")),
    };
    let body = match object.get("Body") {
        Some(serde_json::Value::String(text)) if base64 => BASE64
            .decode(text)
            .map_err(|_| invalid(at("Body"), "is not base64 (IsBodyBase64 is true)"))?,
        Some(serde_json::Value::String(text)) => text.as_bytes().to_vec(),
        Some(_) => {
            return Err(invalid(
                at("Body"),
                "must be a string (its UTF-8 bytes are published; a JSON document goes in as its text, \
                 binary as base64 with IsBodyBase64)",
            ));
        }
        None => return Err(invalid(at("Body"), "is required")),
    };
    let mut event = v1::Event {
        body: Some(v1::event::Body::Binary(Bytes::from(body))),
        ..v1::Event::default()
    };
    if let Some(properties) = object
        .get("UserProperties")
        .filter(|value| !value.is_null())
    {
        event.properties = user_properties(properties, &at("UserProperties"))?;
    }
    if let Some(broker) = object
        .get("BrokerProperties")
        .filter(|value| !value.is_null())
    {
        broker_properties(&mut event, broker, &at("BrokerProperties"))?;
    }
    route_event(route, &mut event, &at("BrokerProperties.PartitionKey"))?;
    Ok(event)
}

/// A batch event's `UserProperties`: strings as they are, numbers and booleans as their JSON text.
fn user_properties(
    value: &serde_json::Value,
    at: &str,
) -> Result<HashMap<String, String>, GatewayError> {
    let object = value
        .as_object()
        .ok_or_else(|| invalid(at, "must be a JSON object"))?;
    object
        .iter()
        .map(|(name, value)| {
            let text = match value {
                serde_json::Value::String(text) => text.clone(),
                serde_json::Value::Number(number) => number.to_string(),
                serde_json::Value::Bool(flag) => flag.to_string(),
                _ => {
                    return Err(invalid(
                        format!("{at}.{name}"),
                        "must be a string, a number or a boolean",
                    ));
                }
            };
            Ok((name.clone(), text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> Route {
        Route::parse(path).unwrap()
    }

    #[test]
    fn routes_are_the_services_three() {
        assert_eq!(
            route("/orders/messages"),
            Route {
                hub: "orders".into(),
                target: Target::Hub
            }
        );
        assert_eq!(
            route("/orders/Partitions/3/Messages").target,
            Target::Partition("3".into())
        );
        assert_eq!(
            route("/orders/publishers/dev%201/messages").target,
            Target::Publisher("dev 1".into())
        );
        for bad in [
            "/",
            "/orders",
            "/orders/messages/x",
            "//messages",
            "/orders/partitions//messages",
            "/orders/consumergroups/x/messages",
            "/orders/%ff/messages/x",
        ] {
            assert_eq!(Route::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn timeout_is_whole_seconds() {
        assert_eq!(timeout(None).unwrap(), None);
        assert_eq!(
            timeout(Some("timeout=60&api-version=2014-01")).unwrap(),
            Some(Duration::from_secs(60))
        );
        assert_eq!(timeout(Some("api-version=2014-01")).unwrap(), None);
        assert!(timeout(Some("timeout=0")).is_err());
        assert!(timeout(Some("timeout=1.5")).is_err());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn one_event_takes_body_broker_properties_and_custom_headers() {
        let events = events(
            &route("/orders/messages"),
            &headers(&[
                ("content-type", "application/atom+xml;type=entry;charset=utf-8"),
                ("authorization", "SharedAccessSignature sr=x"),
                (
                    "brokerproperties",
                    r#"{"PartitionKey":"k1","MessageId":"m1","CorrelationId":"c1","ContentType":"application/json","Label":"ignored"}"#,
                ),
                ("alert", "Strong Wind"),
                ("x-ms-retrypolicy", "NoRetry"),
                ("user-agent", "curl"),
            ]),
            Bytes::from_static(b"{\"t\":1}"),
        )
        .unwrap();
        let event = &events[0];
        assert_eq!(
            event.body,
            Some(v1::event::Body::Binary(Bytes::from_static(b"{\"t\":1}")))
        );
        assert_eq!(event.partition_key, "k1");
        assert_eq!(event.message_id, "m1");
        assert_eq!(event.correlation_id, "c1");
        assert_eq!(event.content_type, "application/json");
        assert_eq!(
            event.properties,
            HashMap::from([("alert".to_owned(), "Strong Wind".to_owned())])
        );
    }

    #[test]
    fn broker_properties_are_checked() {
        let refused = |value: &str| {
            let error = events(
                &route("/orders/messages"),
                &headers(&[("brokerproperties", value)]),
                Bytes::new(),
            )
            .unwrap_err();
            match error {
                GatewayError::InvalidRequest { field, .. } => field,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(refused("not json"), "BrokerProperties");
        assert_eq!(refused("[1]"), "BrokerProperties");
        assert_eq!(
            refused(r#"{"PartitionKey":5}"#),
            "BrokerProperties.PartitionKey"
        );
        let publisher = events(
            &route("/orders/publishers/dev-1/messages"),
            &headers(&[("brokerproperties", r#"{"PartitionKey":"dev-2"}"#)]),
            Bytes::new(),
        );
        assert!(publisher.is_err());
    }

    #[test]
    fn a_batch_is_the_services_json_array() {
        let body = br#"[
            {"Body":"one","UserProperties":{"Alert":"Strong Wind","n":3,"ok":true},"BrokerProperties":{"PartitionKey":"k"}},
            {"Body":"AAEC","IsBodyBase64":true},
            {"Body":"three","BrokerProperties":{"MessageId":"m3"}}
        ]"#;
        let events = events(
            &route("/orders/partitions/1/messages"),
            &headers(&[
                (
                    "content-type",
                    "application/vnd.microsoft.servicebus.json; charset=utf-8",
                ),
                ("alert", "ignored"),
            ]),
            Bytes::from_static(body),
        );
        // A partition route and a key both set: the gateway refuses that per event; here the route applies.
        let events = events.unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0].body,
            Some(v1::event::Body::Binary(Bytes::from_static(b"one")))
        );
        assert_eq!(events[0].properties["Alert"], "Strong Wind");
        assert_eq!(events[0].properties["n"], "3");
        assert_eq!(events[0].properties["ok"], "true");
        assert_eq!(events[0].partition_id, "1");
        assert_eq!(
            events[1].body,
            Some(v1::event::Body::Binary(Bytes::from_static(&[0, 1, 2])))
        );
        assert!(events[1].properties.is_empty());
        assert_eq!(events[2].message_id, "m3");

        let field = |body: &'static [u8]| match super::events(
            &route("/orders/messages"),
            &headers(&[("content-type", BATCH_MEDIA_TYPE)]),
            Bytes::from_static(body),
        )
        .unwrap_err()
        {
            GatewayError::InvalidRequest { field, .. } => field,
            GatewayError::MalformedRequest { field, .. } => field.unwrap_or_default(),
            other => panic!("{other:?}"),
        };
        assert_eq!(field(b"[{\"Body\":1}]"), "[0].Body");
        assert_eq!(field(b"[{\"Body\":\"a\"},{}]"), "[1].Body");
        assert_eq!(
            field(b"[{\"Body\":\"%%\",\"IsBodyBase64\":true}]"),
            "[0].Body"
        );
        assert_eq!(
            field(b"[{\"Body\":\"a\",\"UserProperties\":{\"x\":[1]}}]"),
            "[0].UserProperties.x"
        );
        assert_eq!(field(b"[]"), "body");
        assert_eq!(field(b"{"), "body");
    }
}
