//! `Event.cloud_event` (the CloudEvents protobuf format) into the body, content type and application
//! properties of the AMQP message, in the CloudEvents AMQP binding: the required and known attributes checked,
//! binary content mode by default, structured content mode (the JSON event format) on request. The mapping
//! and its choices are documented in docs/cloudevents.md.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;

use crate::proto::io::cloudevents::v1::CloudEvent;
use crate::proto::io::cloudevents::v1::cloud_event::Data;
use crate::proto::io::cloudevents::v1::cloud_event::cloud_event_attribute_value::Attr;
use eventhub_producer::SendError;
use eventhub_wire::limits;

/// Prefix of the application properties that carry attributes in binary content mode. The binding allows
/// `cloudEvents_` and `cloudEvents:`; it prefers `_` (JMS 2.0 selectors cannot name `:`), and the Python and
/// .NET SDKs write it. Readers of the binding accept both.
pub const PROPERTY_PREFIX: &str = "cloudEvents_";
/// The other prefix the binding allows; an `Event.properties` name with either prefix is refused beside a
/// CloudEvent, so a consumer never sees an attribute the CloudEvent does not hold.
pub const OTHER_PROPERTY_PREFIX: &str = "cloudEvents:";
/// The media type of the JSON event format: as `Event.content_type`, it asks for structured content mode.
pub const STRUCTURED_JSON: &str = "application/cloudevents+json";
/// The `datacontenttype` given to `proto_data` when the event names none (the protobuf format's choice).
pub const PROTOBUF_CONTENT_TYPE: &str = "application/protobuf";
/// The CloudEvents partitioning extension's attribute: the partition key when the `Event` names none.
pub const PARTITION_KEY_ATTRIBUTE: &str = "partitionkey";
/// The only CloudEvents version taken.
pub const SPEC_VERSION: &str = "1.0";

/// How the event is laid out in the AMQP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Data as the body, `datacontenttype` as the content type, the other attributes as properties.
    Binary,
    /// The whole event in the JSON event format as the body.
    Structured,
}

/// What a CloudEvent contributes to the producer event; the `Event`'s own fields are applied by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    /// The AMQP body.
    pub body: Bytes,
    /// The AMQP content type.
    pub content_type: Option<String>,
    /// Application properties (binary mode: the attributes, prefixed), sorted by name.
    pub properties: Vec<(String, String)>,
    /// The `partitionkey` extension attribute, if the event has one.
    pub partition_key: Option<String>,
}

/// The mode `content_type` (the `Event`'s) asks for: empty for binary, the JSON event format for structured.
pub fn mode(content_type: &str) -> Result<Mode, SendError> {
    if content_type.is_empty() {
        return Ok(Mode::Binary);
    }
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if media_type.eq_ignore_ascii_case(STRUCTURED_JSON) {
        return Ok(Mode::Structured);
    }
    Err(SendError::InvalidEvent {
        field: "content_type",
        reason: format!(
            "with a cloud_event, content_type is empty (binary content mode) or {STRUCTURED_JSON} \
             (structured content mode), not {content_type:?}; the data's media type is the \
             datacontenttype attribute"
        ),
    })
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SendError {
    SendError::InvalidEvent {
        field,
        reason: reason.into(),
    }
}

/// A checked attribute value in its canonical string form, and whether it is a JSON string or literal.
#[derive(Debug, Clone, PartialEq)]
struct Value {
    text: String,
    json: JsonKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum JsonKind {
    String,
    Literal,
}

impl Value {
    fn string(text: String) -> Self {
        Self {
            text,
            json: JsonKind::String,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self.json {
            JsonKind::String => serde_json::Value::String(self.text.clone()),
            // Booleans and integers print as their JSON literals.
            JsonKind::Literal => {
                serde_json::from_str(&self.text).unwrap_or(serde_json::Value::Null)
            }
        }
    }
}

/// Converts a CloudEvent into the parts of the AMQP message that `mode` puts it in.
pub fn convert(event: CloudEvent, mode: Mode) -> Result<Converted, SendError> {
    check_string("cloud_event.id", &event.id)?;
    check_string("cloud_event.source", &event.source)?;
    check_uri_reference(&event.source).map_err(|why| {
        invalid(
            "cloud_event.source",
            format!("must be a URI-reference: {why}"),
        )
    })?;
    if event.spec_version != SPEC_VERSION {
        return Err(invalid(
            "cloud_event.spec_version",
            format!(
                "must be \"{SPEC_VERSION}\" (the only CloudEvents version taken), not {:?}",
                event.spec_version
            ),
        ));
    }
    check_string("cloud_event.type", &event.r#type)?;
    if event.attributes.len() > limits::MAX_PROPERTIES {
        return Err(SendError::OverLimit(limits::Violation {
            field: "cloud_event.attributes",
            rule: "max_properties",
            limit: limits::MAX_PROPERTIES,
            actual: event.attributes.len(),
        }));
    }
    let mut attributes: Vec<(String, Value)> = Vec::with_capacity(event.attributes.len());
    for (name, value) in event.attributes {
        let value = attribute(&name, value.attr)?;
        attributes.push((name, value));
    }
    attributes.sort_by(|a, b| a.0.cmp(&b.0));
    let find = |name: &str| {
        attributes
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.text.clone())
    };
    let mut content_type = find("datacontenttype");
    let partition_key = find(PARTITION_KEY_ATTRIBUTE);
    let mut extra: Vec<(String, Value)> = Vec::new();
    let data = match event.data {
        None => None,
        Some(Data::BinaryData(bytes)) => Some(DataKind::Binary(bytes)),
        Some(Data::TextData(text)) => Some(DataKind::Text(text)),
        Some(Data::ProtoData(any)) => {
            if any.type_url.is_empty() {
                return Err(invalid(
                    "cloud_event.proto_data",
                    "type_url must not be empty: it names the message type of the data",
                ));
            }
            // The protobuf format: datacontenttype MAY be application/protobuf, dataschema SHOULD be the type URL.
            if content_type.is_none() {
                content_type = Some(PROTOBUF_CONTENT_TYPE.to_owned());
                extra.push((
                    "datacontenttype".to_owned(),
                    Value::string(PROTOBUF_CONTENT_TYPE.to_owned()),
                ));
            }
            if find("dataschema").is_none() {
                extra.push(("dataschema".to_owned(), Value::string(any.type_url)));
            }
            Some(DataKind::Binary(any.value.into()))
        }
    };
    if !extra.is_empty() {
        attributes.extend(extra);
        attributes.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let required = [
        ("id", event.id),
        ("source", event.source),
        ("specversion", event.spec_version),
        ("type", event.r#type),
    ];
    match mode {
        Mode::Binary => {
            let mut properties: Vec<(String, String)> = required
                .into_iter()
                .map(|(name, value)| (format!("{PROPERTY_PREFIX}{name}"), value))
                .chain(
                    attributes
                        .into_iter()
                        .filter(|(name, _)| name != "datacontenttype")
                        .map(|(name, value)| (format!("{PROPERTY_PREFIX}{name}"), value.text)),
                )
                .collect();
            properties.sort();
            // The attributes alone within the property limits, so the refusal names them; the producer checks
            // them again with the event's own properties and the trace context's.
            limits::check_properties(
                properties
                    .iter()
                    .map(|(name, value)| (name.len(), value.len())),
            )
            .map_err(|violation| {
                SendError::OverLimit(limits::Violation {
                    field: "cloud_event.attributes",
                    ..violation
                })
            })?;
            let body = match data {
                None => Bytes::new(),
                Some(DataKind::Binary(bytes)) => bytes,
                Some(DataKind::Text(text)) => Bytes::from(text),
            };
            Ok(Converted {
                body,
                content_type,
                properties,
                partition_key,
            })
        }
        Mode::Structured => {
            let mut object = serde_json::Map::new();
            for (name, value) in required {
                object.insert(name.to_owned(), serde_json::Value::String(value));
            }
            for (name, value) in &attributes {
                object.insert(name.clone(), value.to_json());
            }
            let raw_json = match data {
                None => None,
                Some(DataKind::Binary(bytes)) => {
                    object.insert(
                        "data_base64".to_owned(),
                        serde_json::Value::String(BASE64.encode(&bytes)),
                    );
                    None
                }
                Some(DataKind::Text(text)) if content_type.as_deref().is_some_and(is_json) => {
                    // JSON data is embedded as JSON, as written (checked, never re-encoded).
                    if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                        return Err(invalid(
                            "cloud_event.text_data",
                            format!(
                                "is not JSON ({error}) although datacontenttype says it is; \
                                 structured content mode embeds JSON data as JSON"
                            ),
                        ));
                    }
                    Some(text)
                }
                Some(DataKind::Text(text)) => {
                    object.insert("data".to_owned(), serde_json::Value::String(text));
                    None
                }
            };
            let mut body = serde_json::Value::Object(object).to_string();
            if let Some(raw) = raw_json {
                // The object is never empty (the required attributes), so it ends in `}` after a member.
                body.pop();
                body.push_str(",\"data\":");
                body.push_str(&raw);
                body.push('}');
            }
            Ok(Converted {
                body: Bytes::from(body),
                content_type: None,
                properties: Vec::new(),
                partition_key,
            })
        }
    }
}

enum DataKind {
    Binary(Bytes),
    Text(String),
}

/// Whether a media type is JSON as the JSON event format reads it: `application/json`, `text/json`, or a
/// `+json` structured suffix.
pub fn is_json(media_type: &str) -> bool {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let Some((top, sub)) = essence.split_once('/') else {
        return false;
    };
    (top == "application" || top == "text") && (sub == "json" || sub.ends_with("+json"))
}

/// A required String attribute: non-empty, without the control characters CloudEvents strings exclude.
fn check_string(field: &'static str, value: &str) -> Result<(), SendError> {
    if value.is_empty() {
        return Err(invalid(field, "is required and must not be empty"));
    }
    check_characters(value).map_err(|why| invalid(field, why))
}

/// CloudEvents strings exclude the control characters U+0000-U+001F and U+007F-U+009F.
fn check_characters(value: &str) -> Result<(), String> {
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "contains the control character U+{:04X}, which CloudEvents strings exclude",
            c as u32
        )),
        None => Ok(()),
    }
}

/// An optional or extension attribute's value, checked against its name and type.
fn attribute(name: &str, value: Option<Attr>) -> Result<Value, SendError> {
    const FIELD: &str = "cloud_event.attributes";
    let fail = |why: String| invalid(FIELD, format!("attribute {name:?}: {why}"));
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(fail(
            "attribute names are lowercase letters a-z and digits 0-9 only (CloudEvents 1.0)"
                .into(),
        ));
    }
    match name {
        "id" | "source" | "type" => {
            return Err(fail(format!(
                "is a required attribute: set cloud_event.{name}"
            )));
        }
        "specversion" => {
            return Err(fail(
                "is a required attribute: set cloud_event.spec_version".into(),
            ));
        }
        "data" => {
            return Err(fail(
                "is reserved for the data: set cloud_event.binary_data, text_data or proto_data"
                    .into(),
            ));
        }
        _ => {}
    }
    let Some(value) = value else {
        return Err(fail(
            "has no value: set one of ce_boolean, ce_integer, ce_string, ce_bytes, ce_uri, ce_uri_ref, ce_timestamp"
                .into(),
        ));
    };
    let kind = match &value {
        Attr::CeBoolean(_) => "ce_boolean",
        Attr::CeInteger(_) => "ce_integer",
        Attr::CeString(_) => "ce_string",
        Attr::CeBytes(_) => "ce_bytes",
        Attr::CeUri(_) => "ce_uri",
        Attr::CeUriRef(_) => "ce_uri_ref",
        Attr::CeTimestamp(_) => "ce_timestamp",
    };
    // The context attributes the spec types; extensions take any type.
    let expected: Option<&[&str]> = match name {
        "datacontenttype" | "subject" | PARTITION_KEY_ATTRIBUTE => Some(&["ce_string"]),
        "dataschema" => Some(&["ce_uri", "ce_string"]),
        "time" => Some(&["ce_timestamp"]),
        _ => None,
    };
    if let Some(expected) = expected
        && !expected.contains(&kind)
    {
        return Err(fail(format!(
            "must be {}, not {kind}",
            expected.join(" or ")
        )));
    }
    let value = match value {
        Attr::CeBoolean(flag) => Value {
            text: flag.to_string(),
            json: JsonKind::Literal,
        },
        Attr::CeInteger(number) => Value {
            text: number.to_string(),
            json: JsonKind::Literal,
        },
        Attr::CeString(text) => {
            check_characters(&text).map_err(&fail)?;
            Value::string(text)
        }
        Attr::CeBytes(bytes) => Value::string(BASE64.encode(bytes)),
        Attr::CeUri(text) => {
            check_uri(&text).map_err(|why| fail(format!("must be an absolute URI: {why}")))?;
            Value::string(text)
        }
        Attr::CeUriRef(text) => {
            check_uri_reference(&text)
                .map_err(|why| fail(format!("must be a URI-reference: {why}")))?;
            Value::string(text)
        }
        Attr::CeTimestamp(timestamp) => Value::string(rfc3339(&timestamp).map_err(&fail)?),
    };
    match name {
        "datacontenttype" => {
            if value.text.is_empty() {
                return Err(fail("must not be empty".into()));
            }
            // It becomes the AMQP content-type, a symbol.
            limits::check_content_type(&value.text)
                .map_err(|violation| fail(violation.to_string()))?;
        }
        "subject" | PARTITION_KEY_ATTRIBUTE if value.text.is_empty() => {
            return Err(fail("must not be empty".into()));
        }
        "dataschema" => {
            check_uri(&value.text)
                .map_err(|why| fail(format!("must be an absolute URI: {why}")))?;
        }
        _ => {}
    }
    Ok(value)
}

/// Checks RFC 3986's syntax of an absolute URI (a URI-reference with a scheme).
fn check_uri(text: &str) -> Result<(), String> {
    if check_uri_reference(text)? {
        Ok(())
    } else {
        Err("it has no scheme (such as https:)".into())
    }
}

/// Checks RFC 3986's syntax of a URI-reference: its characters, percent-escapes, scheme, and brackets only
/// around an IP literal in the authority; returns whether it has a scheme. Empty is refused (CloudEvents
/// requires a non-empty source).
fn check_uri_reference(text: &str) -> Result<bool, String> {
    if text.is_empty() {
        return Err("it is empty".into());
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let escaped = bytes.get(i + 1..i + 3);
                if !escaped.is_some_and(|pair| pair.iter().all(u8::is_ascii_hexdigit)) {
                    return Err(format!(
                        "'%' at byte {i} does not start a percent-escape (two hex digits)"
                    ));
                }
                i += 3;
                continue;
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => {}
            b'-' | b'.' | b'_' | b'~' => {}
            b':' | b'/' | b'?' | b'#' | b'[' | b']' | b'@' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            _ => {
                let c = text[i..].chars().next().unwrap_or_default();
                return Err(format!(
                    "{c:?} at byte {i} is not allowed (percent-encode it)"
                ));
            }
        }
        i += 1;
    }
    if text.matches('#').count() > 1 {
        return Err("it has more than one '#'".into());
    }
    let end = text.find(['/', '?', '#']).unwrap_or(text.len());
    let (has_scheme, rest) = match text[..end].find(':') {
        Some(colon) => {
            let scheme = &text[..colon];
            let valid = scheme
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic())
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
            if !valid {
                return Err(format!(
                    "{scheme:?} before the first ':' is not a scheme (a relative reference's first segment \
                     cannot hold ':')"
                ));
            }
            (true, &text[colon + 1..])
        }
        None => (false, text),
    };
    // Brackets belong only around an IP literal, the host of the authority.
    let (authority, path) = match rest.strip_prefix("//") {
        Some(after) => after.split_at(after.find(['/', '?', '#']).unwrap_or(after.len())),
        None => ("", rest),
    };
    if path.contains(['[', ']']) {
        return Err("'[' and ']' are allowed only around an IP literal host".into());
    }
    if authority.contains(['[', ']']) {
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        let literal = host
            .strip_prefix('[')
            .and_then(|inner| inner.split_once(']'))
            .is_some_and(|(inside, after)| {
                !inside.contains(['[', ']'])
                    && (after.is_empty()
                        || after
                            .strip_prefix(':')
                            .is_some_and(|port| port.bytes().all(|b| b.is_ascii_digit())))
            });
        if !literal {
            return Err("'[' and ']' are allowed only around an IP literal host".into());
        }
    }
    Ok(has_scheme)
}

/// Earliest and latest seconds of an RFC 3339 time: 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

/// A protobuf Timestamp as RFC 3339 in UTC, with 0, 3, 6 or 9 fractional digits as protobuf's JSON mapping.
fn rfc3339(timestamp: &prost_types::Timestamp) -> Result<String, String> {
    let (seconds, nanos) = (timestamp.seconds, timestamp.nanos);
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&seconds) || !(0..1_000_000_000).contains(&nanos) {
        return Err(format!(
            "ce_timestamp {seconds} s {nanos} ns is not a valid time (years 1 to 9999, nanos 0 to 999999999)"
        ));
    }
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    );
    if nanos != 0 {
        if nanos % 1_000_000 == 0 {
            text.push_str(&format!(".{:03}", nanos / 1_000_000));
        } else if nanos % 1_000 == 0 {
            text.push_str(&format!(".{:06}", nanos / 1_000));
        } else {
            text.push_str(&format!(".{nanos:09}"));
        }
    }
    text.push('Z');
    Ok(text)
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::io::cloudevents::v1::cloud_event::CloudEventAttributeValue;

    fn sample() -> CloudEvent {
        CloudEvent {
            id: "e-1".into(),
            source: "/sensors/7".into(),
            spec_version: "1.0".into(),
            r#type: "com.example.reading".into(),
            ..Default::default()
        }
    }

    fn with(mut event: CloudEvent, name: &str, attr: Attr) -> CloudEvent {
        event
            .attributes
            .insert(name.into(), CloudEventAttributeValue { attr: Some(attr) });
        event
    }

    fn refusal(event: CloudEvent) -> (&'static str, String) {
        match convert(event, Mode::Binary).unwrap_err() {
            SendError::InvalidEvent { field, reason } => (field, reason),
            SendError::OverLimit(violation) => (violation.field, violation.to_string()),
            other => panic!("{other:?}"),
        }
    }

    fn property<'a>(converted: &'a Converted, name: &str) -> Option<&'a str> {
        converted
            .properties
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_str())
    }

    #[test]
    fn binary_mode_maps_attributes_to_prefixed_properties_and_data_to_the_body() {
        let mut event = with(
            sample(),
            "datacontenttype",
            Attr::CeString("application/json".into()),
        );
        event = with(event, "subject", Attr::CeString("temp".into()));
        event = with(event, "flag", Attr::CeBoolean(true));
        event = with(event, "count", Attr::CeInteger(-42));
        event = with(event, "blob", Attr::CeBytes(vec![0, 1, 255]));
        event = with(
            event,
            "time",
            Attr::CeTimestamp(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 120_000_000,
            }),
        );
        event.data = Some(Data::TextData(r#"{"t":21.5}"#.into()));
        let converted = convert(event, Mode::Binary).unwrap();
        assert_eq!(converted.body.as_ref(), br#"{"t":21.5}"#);
        assert_eq!(converted.content_type.as_deref(), Some("application/json"));
        assert_eq!(property(&converted, "cloudEvents_id"), Some("e-1"));
        assert_eq!(
            property(&converted, "cloudEvents_source"),
            Some("/sensors/7")
        );
        assert_eq!(property(&converted, "cloudEvents_specversion"), Some("1.0"));
        assert_eq!(
            property(&converted, "cloudEvents_type"),
            Some("com.example.reading")
        );
        assert_eq!(property(&converted, "cloudEvents_subject"), Some("temp"));
        assert_eq!(property(&converted, "cloudEvents_flag"), Some("true"));
        assert_eq!(property(&converted, "cloudEvents_count"), Some("-42"));
        assert_eq!(property(&converted, "cloudEvents_blob"), Some("AAH/"));
        assert_eq!(
            property(&converted, "cloudEvents_time"),
            Some("2023-11-14T22:13:20.120Z")
        );
        assert_eq!(property(&converted, "cloudEvents_datacontenttype"), None);
        assert_eq!(converted.properties.len(), 9);
        assert!(converted.properties.is_sorted());
    }

    #[test]
    fn structured_mode_writes_the_json_event_format() {
        let mut event = with(
            sample(),
            "datacontenttype",
            Attr::CeString("application/json".into()),
        );
        event = with(event, "count", Attr::CeInteger(7));
        event = with(event, "flag", Attr::CeBoolean(false));
        event.data = Some(Data::TextData(r#"{"big":12345678901234567890}"#.into()));
        let converted = convert(event, Mode::Structured).unwrap();
        assert!(converted.properties.is_empty());
        let text = std::str::from_utf8(&converted.body).unwrap();
        // JSON data is embedded as written: the big integer keeps every digit.
        assert!(
            text.contains(r#""data":{"big":12345678901234567890}"#),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["id"], "e-1");
        assert_eq!(json["count"], 7);
        assert_eq!(json["flag"], false);
        assert_eq!(json["datacontenttype"], "application/json");

        let mut binary = sample();
        binary.data = Some(Data::BinaryData(Bytes::from_static(&[1, 2, 3])));
        let converted = convert(binary, Mode::Structured).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&converted.body).unwrap();
        assert_eq!(json["data_base64"], "AQID");
        assert!(json.get("data").is_none());

        let mut text = with(
            sample(),
            "datacontenttype",
            Attr::CeString("text/plain".into()),
        );
        text.data = Some(Data::TextData("not json".into()));
        let converted = convert(text, Mode::Structured).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&converted.body).unwrap();
        assert_eq!(json["data"], "not json");

        let mut bad = with(
            sample(),
            "datacontenttype",
            Attr::CeString("application/vnd.x+json".into()),
        );
        bad.data = Some(Data::TextData("{nope".into()));
        let error = convert(bad, Mode::Structured).unwrap_err();
        assert!(
            matches!(
                &error,
                SendError::InvalidEvent {
                    field: "cloud_event.text_data",
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn proto_data_is_its_value_bytes_typed_by_its_url() {
        let mut event = sample();
        event.data = Some(Data::ProtoData(prost_types::Any {
            type_url: "type.googleapis.com/example.Reading".into(),
            value: vec![8, 1],
        }));
        let converted = convert(event.clone(), Mode::Binary).unwrap();
        assert_eq!(converted.body.as_ref(), &[8, 1]);
        assert_eq!(
            converted.content_type.as_deref(),
            Some(PROTOBUF_CONTENT_TYPE)
        );
        assert_eq!(
            property(&converted, "cloudEvents_dataschema"),
            Some("type.googleapis.com/example.Reading")
        );
        // A dataschema given is kept.
        let given = with(
            event.clone(),
            "dataschema",
            Attr::CeUri("https://example.com/r.proto".into()),
        );
        let converted = convert(given, Mode::Binary).unwrap();
        assert_eq!(
            property(&converted, "cloudEvents_dataschema"),
            Some("https://example.com/r.proto")
        );
        let structured = convert(event, Mode::Structured).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&structured.body).unwrap();
        assert_eq!(json["data_base64"], "CAE=");
        assert_eq!(json["datacontenttype"], PROTOBUF_CONTENT_TYPE);
        let mut untyped = sample();
        untyped.data = Some(Data::ProtoData(prost_types::Any::default()));
        assert_eq!(refusal(untyped).0, "cloud_event.proto_data");
    }

    #[test]
    fn each_required_attribute_is_checked_by_name() {
        let cases: Vec<(CloudEvent, &str, &str)> = vec![
            (
                CloudEvent {
                    id: String::new(),
                    ..sample()
                },
                "cloud_event.id",
                "must not be empty",
            ),
            (
                CloudEvent {
                    source: String::new(),
                    ..sample()
                },
                "cloud_event.source",
                "must not be empty",
            ),
            (
                CloudEvent {
                    source: "a b".into(),
                    ..sample()
                },
                "cloud_event.source",
                "URI-reference",
            ),
            (
                CloudEvent {
                    source: "1x:y".into(),
                    ..sample()
                },
                "cloud_event.source",
                "not a scheme",
            ),
            (
                CloudEvent {
                    spec_version: String::new(),
                    ..sample()
                },
                "cloud_event.spec_version",
                "\"1.0\"",
            ),
            (
                CloudEvent {
                    spec_version: "0.3".into(),
                    ..sample()
                },
                "cloud_event.spec_version",
                "\"0.3\"",
            ),
            (
                CloudEvent {
                    r#type: String::new(),
                    ..sample()
                },
                "cloud_event.type",
                "must not be empty",
            ),
            (
                CloudEvent {
                    r#type: "a\u{7}b".into(),
                    ..sample()
                },
                "cloud_event.type",
                "U+0007",
            ),
        ];
        for (event, field, words) in cases {
            let (got, reason) = refusal(event);
            assert_eq!(got, field);
            assert!(reason.contains(words), "{field}: {reason}");
        }
    }

    #[test]
    fn attribute_names_types_and_values_are_checked() {
        let cases: Vec<(&str, Attr, &str)> = vec![
            ("Upper", Attr::CeString("x".into()), "lowercase"),
            ("with_underscore", Attr::CeString("x".into()), "lowercase"),
            ("id", Attr::CeString("x".into()), "set cloud_event.id"),
            (
                "specversion",
                Attr::CeString("1.0".into()),
                "cloud_event.spec_version",
            ),
            ("data", Attr::CeString("x".into()), "reserved"),
            (
                "time",
                Attr::CeString("2024-01-01T00:00:00Z".into()),
                "ce_timestamp",
            ),
            (
                "time",
                Attr::CeTimestamp(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                "not a valid time",
            ),
            ("datacontenttype", Attr::CeInteger(1), "ce_string"),
            (
                "datacontenttype",
                Attr::CeString("tëxt/plain".into()),
                "ASCII",
            ),
            (
                "dataschema",
                Attr::CeUri("relative/path".into()),
                "no scheme",
            ),
            (
                "subject",
                Attr::CeString(String::new()),
                "must not be empty",
            ),
            ("partitionkey", Attr::CeInteger(3), "ce_string"),
            ("ref", Attr::CeUriRef("%zz".into()), "percent-escape"),
            ("uri", Attr::CeUri("http://[::1/x".into()), "IP literal"),
        ];
        for (name, attr, words) in cases {
            let (field, reason) = refusal(with(sample(), name, attr));
            assert_eq!(field, "cloud_event.attributes");
            assert!(
                reason.contains(name) && reason.contains(words),
                "{name}: {reason}"
            );
        }
        let mut unset = sample();
        unset
            .attributes
            .insert("empty".into(), CloudEventAttributeValue { attr: None });
        assert!(refusal(unset).1.contains("has no value"));
        // Names longer than the 20 characters the spec recommends are taken (a SHOULD, not a MUST).
        convert(
            with(
                sample(),
                "averyveryverylongextensionname",
                Attr::CeBoolean(true),
            ),
            Mode::Binary,
        )
        .unwrap();
    }

    #[test]
    fn attributes_count_against_the_property_limits_by_their_own_field() {
        let mut many = sample();
        for n in 0..=limits::MAX_PROPERTIES {
            many = with(many, &format!("x{n}"), Attr::CeBoolean(true));
        }
        let (field, reason) = refusal(many);
        assert_eq!(field, "cloud_event.attributes");
        assert!(reason.contains("1024"), "{reason}");
        let big = with(
            sample(),
            "big",
            Attr::CeString("x".repeat(limits::MAX_PROPERTY_BYTES)),
        );
        let (field, reason) = refusal(big);
        assert_eq!(field, "cloud_event.attributes");
        assert!(reason.contains("32768"), "{reason}");
    }

    #[test]
    fn the_partitionkey_extension_is_reported() {
        let converted = convert(
            with(sample(), "partitionkey", Attr::CeString("device-9".into())),
            Mode::Binary,
        )
        .unwrap();
        assert_eq!(converted.partition_key.as_deref(), Some("device-9"));
        assert_eq!(
            property(&converted, "cloudEvents_partitionkey"),
            Some("device-9")
        );
    }

    #[test]
    fn the_mode_comes_from_the_events_content_type() {
        assert_eq!(mode("").unwrap(), Mode::Binary);
        assert_eq!(mode(STRUCTURED_JSON).unwrap(), Mode::Structured);
        assert_eq!(
            mode("Application/CloudEvents+JSON; charset=utf-8").unwrap(),
            Mode::Structured
        );
        for other in [
            "application/json",
            "application/cloudevents+protobuf",
            "text/plain",
        ] {
            assert!(
                matches!(
                    mode(other),
                    Err(SendError::InvalidEvent {
                        field: "content_type",
                        ..
                    })
                ),
                "{other}"
            );
        }
    }

    #[test]
    fn uri_references_follow_rfc_3986_syntax() {
        for good in [
            "/a/b",
            "urn:example:x",
            "https://user@example.com:8443/p?q=1#f",
            "http://[2001:db8::1]:80/x",
            "a%20b",
            "./x:y",
            "//host",
            "mailto:x@example.com",
        ] {
            check_uri_reference(good).unwrap_or_else(|why| panic!("{good}: {why}"));
        }
        for bad in [
            "",
            "a b",
            "x:y:#a#b",
            "%4",
            "1a:b",
            "a[b]",
            "http://x/[y]",
            "é",
        ] {
            assert!(check_uri_reference(bad).is_err(), "{bad}");
        }
        assert_eq!(check_uri_reference("https://x"), Ok(true));
        assert_eq!(check_uri_reference("/x"), Ok(false));
    }

    #[test]
    fn timestamps_print_as_rfc_3339() {
        let at = |seconds, nanos| rfc3339(&prost_types::Timestamp { seconds, nanos });
        assert_eq!(at(0, 0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(
            at(951_782_400, 5_000).unwrap(),
            "2000-02-29T00:00:00.000005Z"
        );
        assert_eq!(at(-1, 1).unwrap(), "1969-12-31T23:59:59.000000001Z");
        assert_eq!(at(MIN_SECONDS, 0).unwrap(), "0001-01-01T00:00:00Z");
        assert_eq!(
            at(MAX_SECONDS, 999_000_000).unwrap(),
            "9999-12-31T23:59:59.999Z"
        );
        assert!(at(MAX_SECONDS + 1, 0).is_err());
    }

    #[test]
    fn json_media_types_are_recognised() {
        for json in [
            "application/json",
            "text/json; charset=utf-8",
            "application/vnd.a+json",
            "Application/JSON",
        ] {
            assert!(is_json(json), "{json}");
        }
        for other in ["text/plain", "application/jsonx", "json", "image/svg+xml"] {
            assert!(!is_json(other), "{other}");
        }
    }
}
