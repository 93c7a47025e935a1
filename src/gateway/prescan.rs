//! A cheap wire-level pass over a request's protobuf bytes before prost decodes them: counts `events`,
//! bounds JSON (`google.protobuf.Struct`) nesting, walks CloudEvents (`io.cloudevents.v1.CloudEvent`),
//! estimates what the decoded message will occupy in memory, and checks everything prost would (wire types,
//! varints, lengths, UTF-8, its recursion limit), without allocating. A request it passes decodes, into at most `max_decoded_bytes` of structures.
//!
//! Why: protobuf's in-memory form is far larger than its wire form (an empty `Event` is 2 bytes on the wire
//! and a few hundred in memory; a `Struct` field a few bytes and a B-tree slot), so a 16 MiB request of empty
//! events decodes to gigabytes before any count could be checked on the decoded message.

use std::fmt;
use std::mem::size_of;

use crate::proto::io::cloudevents::v1::{CloudEvent, cloud_event};
use crate::proto::v1;

/// The request messages the gateway decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `SendEventRequest`.
    SendEvent,
    /// `SendEventsRequest`.
    SendEvents,
    /// `SendStreamRequest`.
    SendStream,
    /// `GetEventHubPropertiesRequest`.
    GetEventHubProperties,
}

/// What a request may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanLimits {
    /// Most events in `events` (`max_events_per_request`).
    pub max_events: usize,
    /// Most bytes the decoded message may occupy (estimated from the wire, conservatively).
    pub max_decoded_bytes: usize,
    /// Most levels of JSON nesting in a `json` body (objects and lists).
    pub max_json_depth: usize,
}

/// Deepest JSON body taken: prost itself stops at 100 nested messages, about 32 JSON levels.
pub const MAX_JSON_DEPTH: usize = 32;

/// What a scan found in a request it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Entries of `events`.
    pub events: usize,
    /// The estimated size of the decoded message, bytes.
    pub decoded_bytes: usize,
}

/// Why a request is refused before it is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// The bytes are not the message: prost would fail too. `field` is where it broke.
    Malformed {
        /// The field path (`events[3].properties`), empty at the top level.
        field: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// More entries in `events` than `max_events`.
    TooManyEvents {
        /// `max_events`.
        limit: usize,
        /// How many there are.
        found: usize,
    },
    /// A JSON body nested deeper than `max_json_depth`.
    TooDeep {
        /// The `json` field at fault.
        field: String,
        /// `max_json_depth`.
        limit: usize,
    },
    /// The decoded message would occupy more than `max_decoded_bytes`; `field` is where the bound was crossed.
    TooCostly {
        /// The field path.
        field: String,
        /// `max_decoded_bytes`.
        limit: usize,
    },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed { field, reason } if field.is_empty() => f.write_str(reason),
            Self::Malformed { field, reason } => write!(f, "{field}: {reason}"),
            Self::TooManyEvents { limit, found } => write!(
                f,
                "at most {limit} events per request (max_events_per_request); got {found}"
            ),
            Self::TooDeep { limit, .. } => {
                write!(
                    f,
                    "JSON nested deeper than {limit} levels (objects and lists)"
                )
            }
            Self::TooCostly { limit, .. } => write!(
                f,
                "the request would take more than {limit} bytes of memory once decoded (4 x max_request_bytes; \
                 every event, property and JSON value costs its overhead besides its bytes)"
            ),
        }
    }
}

impl ScanError {
    /// The field the refusal names (`events` for too many).
    pub fn field(&self) -> &str {
        match self {
            Self::Malformed { field, .. }
            | Self::TooDeep { field, .. }
            | Self::TooCostly { field, .. } => field,
            Self::TooManyEvents { .. } => "events",
        }
    }
}

/// Checks `bytes` as the message of `schema` within `limits`.
pub fn scan(schema: Schema, bytes: &[u8], limits: &ScanLimits) -> Result<Scanned, ScanError> {
    let mut scanner = Scanner {
        limits,
        decoded: size_of::<v1::SendStreamRequest>(),
        events: 0,
    };
    if matches!(schema, Schema::SendEvents | Schema::SendStream) {
        // Counted first over the top level alone, so a flood of events is refused by its count at the cost
        // of one cheap pass, whatever else is wrong further in.
        let field = if schema == Schema::SendEvents { 2 } else { 4 };
        let found = count_events(bytes, field, &Path::ROOT)?;
        if found > limits.max_events {
            return Err(ScanError::TooManyEvents {
                limit: limits.max_events,
                found,
            });
        }
    }
    let mut reader = Reader::new(bytes);
    scanner.request(schema, &mut reader, &Path::ROOT)?;
    Ok(Scanned {
        events: scanner.events,
        decoded_bytes: scanner.decoded,
    })
}

// What the decoded forms cost, bytes: the structure itself, with room for a growing Vec's or map's spare
// capacity, and each non-empty string's heap block (rounded up by the allocator).
const EVENT_COST: usize = 2 * size_of::<v1::Event>();
/// A Vec's first push makes room for 4 (Rust's least capacity for small items), beyond the doubled per-item cost
/// for a list of one: charged for a request's first event and a JSON list's first value.
const FIRST_EVENT_COST: usize = 2 * size_of::<v1::Event>();
const FIRST_VALUE_COST: usize = 2 * size_of::<prost_types::Value>();
const PROPERTY_COST: usize = 2 * size_of::<(String, String)>() + 16;
/// The hash table of an event's first property: 4 buckets and their control bytes, more than
/// [`PROPERTY_COST`] covers for a map of one (the fuzz target `gateway_request` measured 12 bytes over).
const PROPERTY_TABLE_COST: usize = 4 * size_of::<(String, String)>() + 32;
const VALUE_COST: usize = 2 * size_of::<prost_types::Value>();
/// A B-tree node holds 11 entries and is at least half full below the root.
const BTREE_NODE_COST: usize = 11 * (size_of::<String>() + size_of::<prost_types::Value>()) + 64;
const STRUCT_COST: usize = size_of::<prost_types::Struct>() + BTREE_NODE_COST;
const STRUCT_FIELD_COST: usize = BTREE_NODE_COST / 5;
const STRING_SLACK: usize = 16;
/// A CloudEvent is boxed in its `Event` (build.rs): the box, once per `cloud_event` field.
const CLOUD_EVENT_COST: usize = size_of::<CloudEvent>() + STRING_SLACK;
type AttributeEntry = (String, cloud_event::CloudEventAttributeValue);
/// An attribute's share of the hash map, generously: while the table doubles, the old and the new one (3 x
/// the buckets, at 7/8 load) are both live.
const ATTRIBUTE_COST: usize = 4 * size_of::<AttributeEntry>() + 16;
/// The attribute map's first table: 4 buckets and their control bytes.
const ATTRIBUTE_TABLE_COST: usize = 4 * size_of::<AttributeEntry>() + 32;

fn string_cost(len: usize) -> usize {
    if len == 0 { 0 } else { len + STRING_SLACK }
}

/// prost's recursion limit: nested messages (and groups being skipped) deeper than this fail to decode.
const RECURSION_LIMIT: u32 = 100;

/// A field path, built as a chain on the stack and rendered only for an error.
#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    name: &'static str,
    index: Option<usize>,
}

impl<'a> Path<'a> {
    const ROOT: Path<'static> = Path {
        parent: None,
        name: "",
        index: None,
    };

    fn field(&'a self, name: &'static str) -> Path<'a> {
        Path {
            parent: Some(self),
            name,
            index: None,
        }
    }

    fn item(&'a self, name: &'static str, index: usize) -> Path<'a> {
        Path {
            parent: Some(self),
            name,
            index: Some(index),
        }
    }

    fn render(&self) -> String {
        let mut parts = Vec::new();
        let mut at = Some(self);
        while let Some(path) = at {
            if !path.name.is_empty() {
                parts.push(match path.index {
                    Some(index) => format!("{}[{index}]", path.name),
                    None => path.name.to_owned(),
                });
            }
            at = path.parent;
        }
        parts.reverse();
        parts.join(".")
    }

    fn malformed(&self, reason: &'static str) -> ScanError {
        ScanError::Malformed {
            field: self.render(),
            reason,
        }
    }
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// A cursor over protobuf bytes with prost's rules for keys, varints and lengths.
struct Reader<'b> {
    bytes: &'b [u8],
}

impl<'b> Reader<'b> {
    fn new(bytes: &'b [u8]) -> Self {
        Self { bytes }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A varint of at most 10 bytes whose tenth byte is 0 or 1, as prost reads it.
    fn varint(&mut self, path: &Path<'_>) -> Result<u64, ScanError> {
        let mut value = 0u64;
        for (i, &byte) in self.bytes.iter().enumerate().take(10) {
            if i == 9 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.bytes = &self.bytes[i + 1..];
                return Ok(value);
            }
        }
        Err(path.malformed("invalid varint"))
    }

    /// A field key: its number and wire type.
    fn key(&mut self, path: &Path<'_>) -> Result<(u32, u8), ScanError> {
        let key = self.varint(path)?;
        if key > u64::from(u32::MAX) {
            return Err(path.malformed("invalid key value"));
        }
        let wire_type = (key & 0x07) as u8;
        if wire_type > FIXED32 {
            return Err(path.malformed("invalid wire type value"));
        }
        let number = (key as u32) >> 3;
        if number == 0 {
            return Err(path.malformed("invalid tag value: 0"));
        }
        Ok((number, wire_type))
    }

    /// A length-delimited payload (its length prefix read here).
    fn delimited(&mut self, path: &Path<'_>) -> Result<&'b [u8], ScanError> {
        let len = self.varint(path)?;
        if len > self.bytes.len() as u64 {
            return Err(path.malformed("buffer underflow"));
        }
        let (payload, rest) = self.bytes.split_at(len as usize);
        self.bytes = rest;
        Ok(payload)
    }

    fn advance(&mut self, len: usize, path: &Path<'_>) -> Result<(), ScanError> {
        if len > self.bytes.len() {
            return Err(path.malformed("buffer underflow"));
        }
        self.bytes = &self.bytes[len..];
        Ok(())
    }

    /// Skips an unknown field as prost does, groups included (counted against the recursion limit).
    fn skip(
        &mut self,
        number: u32,
        wire_type: u8,
        ctx: u32,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        if ctx == 0 {
            return Err(path.malformed("recursion limit reached"));
        }
        match wire_type {
            VARINT => self.varint(path).map(drop),
            FIXED64 => self.advance(8, path),
            FIXED32 => self.advance(4, path),
            LEN => self.delimited(path).map(drop),
            START_GROUP => loop {
                let (inner, inner_type) = self.key(path)?;
                if inner_type == END_GROUP {
                    if inner != number {
                        return Err(path.malformed("unexpected end group tag"));
                    }
                    return Ok(());
                }
                self.skip(inner, inner_type, ctx - 1, path)?;
            },
            _ => Err(path.malformed("unexpected end group tag")),
        }
    }
}

fn expect(wire_type: u8, expected: u8, path: &Path<'_>) -> Result<(), ScanError> {
    if wire_type == expected {
        Ok(())
    } else {
        Err(path.malformed("invalid wire type"))
    }
}

/// The number of `events` entries (`field`: 4 of `SendStreamRequest`, 2 of `SendEventsRequest`) at the top
/// level.
fn count_events(bytes: &[u8], field: u32, path: &Path<'_>) -> Result<usize, ScanError> {
    // Both request kinds are read by the full scan afterwards; here only the top-level framing matters.
    let mut reader = Reader::new(bytes);
    let mut count = 0usize;
    while !reader.is_empty() {
        let (number, wire_type) = reader.key(path)?;
        if wire_type == LEN {
            reader.delimited(path)?;
            if number == field {
                count += 1;
            }
        } else {
            reader.skip(number, wire_type, RECURSION_LIMIT, path)?;
        }
    }
    Ok(count)
}

struct Scanner<'l> {
    limits: &'l ScanLimits,
    decoded: usize,
    events: usize,
}

impl Scanner<'_> {
    fn cost(&mut self, bytes: usize, path: &Path<'_>) -> Result<(), ScanError> {
        self.decoded = self.decoded.saturating_add(bytes);
        if self.decoded > self.limits.max_decoded_bytes {
            return Err(ScanError::TooCostly {
                field: path.render(),
                limit: self.limits.max_decoded_bytes,
            });
        }
        Ok(())
    }

    /// A string field: LEN, valid UTF-8.
    fn string(
        &mut self,
        reader: &mut Reader<'_>,
        wire_type: u8,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        expect(wire_type, LEN, path)?;
        let text = reader.delimited(path)?;
        if std::str::from_utf8(text).is_err() {
            return Err(path.malformed("invalid string value: data is not UTF-8 encoded"));
        }
        self.cost(string_cost(text.len()), path)
    }

    fn bytes(
        &mut self,
        reader: &mut Reader<'_>,
        wire_type: u8,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        expect(wire_type, LEN, path)?;
        let bytes = reader.delimited(path)?;
        self.cost(string_cost(bytes.len()), path)
    }

    /// The payload of a nested message field (LEN, within the recursion limit); `ctx` is the field's.
    fn nested<'b>(
        reader: &mut Reader<'b>,
        wire_type: u8,
        ctx: u32,
        path: &Path<'_>,
    ) -> Result<Reader<'b>, ScanError> {
        expect(wire_type, LEN, path)?;
        if ctx == 0 {
            return Err(path.malformed("recursion limit reached"));
        }
        Ok(Reader::new(reader.delimited(path)?))
    }

    /// A map field's entry (LEN, within the recursion limit).
    fn map_entry<'b>(
        reader: &mut Reader<'b>,
        wire_type: u8,
        ctx: u32,
        path: &Path<'_>,
    ) -> Result<Reader<'b>, ScanError> {
        expect(wire_type, LEN, path)?;
        if ctx == 0 {
            return Err(path.malformed("recursion limit reached"));
        }
        Ok(Reader::new(reader.delimited(path)?))
    }

    fn request(
        &mut self,
        schema: Schema,
        reader: &mut Reader<'_>,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        let ctx = RECURSION_LIMIT;
        while !reader.is_empty() {
            let (number, wire_type) = reader.key(path)?;
            match (schema, number) {
                (_, 1) => self.string(reader, wire_type, &path.field("event_hub"))?,
                (Schema::SendEvent, 2) | (Schema::SendStream, 3) => {
                    let path = path.field("event");
                    let mut inner = Self::nested(reader, wire_type, ctx, &path)?;
                    self.cost(size_of::<v1::Event>(), &path)?;
                    self.event(&mut inner, ctx - 1, &path)?;
                }
                (Schema::SendEvents, 2) | (Schema::SendStream, 4) => {
                    let path = path.item("events", self.events);
                    let mut inner = Self::nested(reader, wire_type, ctx, &path)?;
                    if self.events == 0 {
                        self.cost(FIRST_EVENT_COST, &path)?;
                    }
                    self.events += 1;
                    self.cost(EVENT_COST, &path)?;
                    self.event(&mut inner, ctx - 1, &path)?;
                }
                (Schema::SendStream, 2) => {
                    expect(wire_type, VARINT, &path.field("sequence"))?;
                    reader.varint(&path.field("sequence"))?;
                }
                _ => reader.skip(number, wire_type, ctx, path)?,
            }
        }
        Ok(())
    }

    fn event(
        &mut self,
        reader: &mut Reader<'_>,
        ctx: u32,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        let mut has_properties = false;
        while !reader.is_empty() {
            let (number, wire_type) = reader.key(path)?;
            match number {
                1 => self.string(reader, wire_type, &path.field("text"))?,
                2 => self.bytes(reader, wire_type, &path.field("binary"))?,
                3 => {
                    let path = path.field("json");
                    let mut inner = Self::nested(reader, wire_type, ctx, &path)?;
                    self.json_struct(&mut inner, ctx - 1, 1, &path)?;
                }
                4 => self.string(reader, wire_type, &path.field("partition_key"))?,
                5 => self.string(reader, wire_type, &path.field("partition_id"))?,
                6 => {
                    let path = path.field("properties");
                    let mut entry = Self::map_entry(reader, wire_type, ctx, &path)?;
                    if !has_properties {
                        has_properties = true;
                        self.cost(PROPERTY_TABLE_COST, &path)?;
                    }
                    self.cost(PROPERTY_COST, &path)?;
                    while !entry.is_empty() {
                        let (number, wire_type) = entry.key(&path)?;
                        match number {
                            1 | 2 => self.string(&mut entry, wire_type, &path)?,
                            _ => entry.skip(number, wire_type, ctx - 1, &path)?,
                        }
                    }
                }
                7 => self.string(reader, wire_type, &path.field("content_type"))?,
                8 => self.string(reader, wire_type, &path.field("message_id"))?,
                9 => self.string(reader, wire_type, &path.field("correlation_id"))?,
                10 => {
                    let path = path.field("cloud_event");
                    let mut inner = Self::nested(reader, wire_type, ctx, &path)?;
                    self.cost(CLOUD_EVENT_COST, &path)?;
                    self.cloud_event(&mut inner, ctx - 1, &path)?;
                }
                _ => reader.skip(number, wire_type, ctx, path)?,
            }
        }
        Ok(())
    }

    /// An `io.cloudevents.v1.CloudEvent`. Its nesting is fixed (attribute values, a timestamp inside one, the
    /// `Any` of `proto_data`; unknown groups count against the recursion limit as everywhere), so only its
    /// size needs a bound: strings and bytes by their length, the attribute map by its entries.
    fn cloud_event(
        &mut self,
        reader: &mut Reader<'_>,
        ctx: u32,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        let mut has_attributes = false;
        while !reader.is_empty() {
            let (number, wire_type) = reader.key(path)?;
            match number {
                1 => self.string(reader, wire_type, &path.field("id"))?,
                2 => self.string(reader, wire_type, &path.field("source"))?,
                3 => self.string(reader, wire_type, &path.field("spec_version"))?,
                4 => self.string(reader, wire_type, &path.field("type"))?,
                5 => {
                    let path = path.field("attributes");
                    let mut entry = Self::map_entry(reader, wire_type, ctx, &path)?;
                    if !has_attributes {
                        has_attributes = true;
                        self.cost(ATTRIBUTE_TABLE_COST, &path)?;
                    }
                    self.cost(ATTRIBUTE_COST, &path)?;
                    while !entry.is_empty() {
                        let (number, wire_type) = entry.key(&path)?;
                        match number {
                            1 => self.string(&mut entry, wire_type, &path)?,
                            2 => {
                                let mut value =
                                    Self::nested(&mut entry, wire_type, ctx - 1, &path)?;
                                self.attribute_value(&mut value, ctx - 2, &path)?;
                            }
                            _ => entry.skip(number, wire_type, ctx - 1, &path)?,
                        }
                    }
                }
                6 => self.bytes(reader, wire_type, &path.field("binary_data"))?,
                7 => self.string(reader, wire_type, &path.field("text_data"))?,
                8 => {
                    let path = path.field("proto_data");
                    let mut any = Self::nested(reader, wire_type, ctx, &path)?;
                    while !any.is_empty() {
                        let (number, wire_type) = any.key(&path)?;
                        match number {
                            1 => self.string(&mut any, wire_type, &path)?,
                            2 => self.bytes(&mut any, wire_type, &path)?,
                            _ => any.skip(number, wire_type, ctx - 1, &path)?,
                        }
                    }
                }
                _ => reader.skip(number, wire_type, ctx, path)?,
            }
        }
        Ok(())
    }

    /// A `CloudEventAttributeValue`: scalars, strings and bytes, or a `google.protobuf.Timestamp`.
    fn attribute_value(
        &mut self,
        reader: &mut Reader<'_>,
        ctx: u32,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        while !reader.is_empty() {
            let (number, wire_type) = reader.key(path)?;
            match number {
                1 | 2 => {
                    expect(wire_type, VARINT, path)?;
                    reader.varint(path)?;
                }
                3 | 5 | 6 => self.string(reader, wire_type, path)?,
                4 => self.bytes(reader, wire_type, path)?,
                7 => {
                    let mut timestamp = Self::nested(reader, wire_type, ctx, path)?;
                    while !timestamp.is_empty() {
                        let (number, wire_type) = timestamp.key(path)?;
                        match number {
                            1 | 2 => {
                                expect(wire_type, VARINT, path)?;
                                timestamp.varint(path)?;
                            }
                            _ => timestamp.skip(number, wire_type, ctx - 1, path)?,
                        }
                    }
                }
                _ => reader.skip(number, wire_type, ctx, path)?,
            }
        }
        Ok(())
    }

    /// Refuses JSON nested deeper than `max_json_depth`.
    fn check_depth(&self, depth: usize, path: &Path<'_>) -> Result<(), ScanError> {
        if depth > self.limits.max_json_depth {
            return Err(ScanError::TooDeep {
                field: path.render(),
                limit: self.limits.max_json_depth,
            });
        }
        Ok(())
    }

    /// A `Struct` at JSON `depth` (the body's own object is 1); `path` is the event's `json` field.
    fn json_struct(
        &mut self,
        reader: &mut Reader<'_>,
        ctx: u32,
        depth: usize,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        self.check_depth(depth, path)?;
        self.cost(STRUCT_COST, path)?;
        while !reader.is_empty() {
            let (number, wire_type) = reader.key(path)?;
            if number != 1 {
                reader.skip(number, wire_type, ctx, path)?;
                continue;
            }
            let mut entry = Self::map_entry(reader, wire_type, ctx, path)?;
            self.cost(STRUCT_FIELD_COST, path)?;
            while !entry.is_empty() {
                let (number, wire_type) = entry.key(path)?;
                match number {
                    1 => self.string(&mut entry, wire_type, path)?,
                    2 => {
                        let mut value = Self::nested(&mut entry, wire_type, ctx - 1, path)?;
                        self.json_value(&mut value, ctx - 2, depth, path)?;
                    }
                    _ => entry.skip(number, wire_type, ctx - 1, path)?,
                }
            }
        }
        Ok(())
    }

    /// A `Value` inside a structure at `depth`.
    fn json_value(
        &mut self,
        reader: &mut Reader<'_>,
        ctx: u32,
        depth: usize,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        while !reader.is_empty() {
            let (number, wire_type) = reader.key(path)?;
            match number {
                1 | 4 => {
                    expect(wire_type, VARINT, path)?;
                    reader.varint(path)?;
                }
                2 => {
                    expect(wire_type, FIXED64, path)?;
                    reader.advance(8, path)?;
                }
                3 => self.string(reader, wire_type, path)?,
                5 => {
                    let mut inner = Self::nested(reader, wire_type, ctx, path)?;
                    self.json_struct(&mut inner, ctx - 1, depth + 1, path)?;
                }
                6 => {
                    let mut inner = Self::nested(reader, wire_type, ctx, path)?;
                    self.json_list(&mut inner, ctx - 1, depth + 1, path)?;
                }
                _ => reader.skip(number, wire_type, ctx, path)?,
            }
        }
        Ok(())
    }

    /// A `ListValue` at JSON `depth`.
    fn json_list(
        &mut self,
        reader: &mut Reader<'_>,
        ctx: u32,
        depth: usize,
        path: &Path<'_>,
    ) -> Result<(), ScanError> {
        self.check_depth(depth, path)?;
        let mut empty = true;
        while !reader.is_empty() {
            let (number, wire_type) = reader.key(path)?;
            if number != 1 {
                reader.skip(number, wire_type, ctx, path)?;
                continue;
            }
            let mut value = Self::nested(reader, wire_type, ctx, path)?;
            if empty {
                empty = false;
                self.cost(FIRST_VALUE_COST, path)?;
            }
            self.cost(VALUE_COST, path)?;
            self.json_value(&mut value, ctx - 1, depth, path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use prost_types::value::Kind;
    use rand::{Rng, SeedableRng};

    const LIMITS: ScanLimits = ScanLimits {
        max_events: 1000,
        max_decoded_bytes: 64 << 20,
        max_json_depth: MAX_JSON_DEPTH,
    };

    /// Wide open: only well-formedness (and prost's own recursion limit) can fail.
    const OPEN: ScanLimits = ScanLimits {
        max_events: usize::MAX,
        max_decoded_bytes: usize::MAX,
        max_json_depth: usize::MAX,
    };

    fn text(body: &str) -> v1::Event {
        v1::Event {
            body: Some(v1::event::Body::Text(body.into())),
            ..Default::default()
        }
    }

    fn nested_json(depth: usize) -> prost_types::Struct {
        let mut inner = prost_types::Struct::default();
        for _ in 1..depth {
            inner = prost_types::Struct {
                fields: [(
                    "a".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StructValue(inner)),
                    },
                )]
                .into(),
            };
        }
        inner
    }

    fn json_event(object: prost_types::Struct) -> v1::Event {
        v1::Event {
            body: Some(v1::event::Body::Json(object)),
            ..Default::default()
        }
    }

    fn rich_event() -> v1::Event {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            "list".to_owned(),
            prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![
                        prost_types::Value {
                            kind: Some(Kind::NumberValue(1.5)),
                        },
                        prost_types::Value {
                            kind: Some(Kind::BoolValue(true)),
                        },
                        prost_types::Value {
                            kind: Some(Kind::NullValue(0)),
                        },
                        prost_types::Value {
                            kind: Some(Kind::StringValue("s".into())),
                        },
                    ],
                })),
            },
        );
        fields.insert(
            "nested".to_owned(),
            prost_types::Value {
                kind: Some(Kind::StructValue(nested_json(3))),
            },
        );
        v1::Event {
            body: Some(v1::event::Body::Json(prost_types::Struct { fields })),
            partition_key: "key".into(),
            properties: [("p".to_owned(), "v".to_owned())].into(),
            content_type: "application/json".into(),
            message_id: "m".into(),
            correlation_id: "c".into(),
            ..Default::default()
        }
    }

    fn cloud_event_body() -> v1::Event {
        use crate::proto::io::cloudevents::v1::cloud_event::{
            CloudEventAttributeValue, Data, cloud_event_attribute_value::Attr,
        };
        let attributes = [
            ("flag", Attr::CeBoolean(true)),
            ("count", Attr::CeInteger(-7)),
            ("subject", Attr::CeString("s".into())),
            ("blob", Attr::CeBytes(vec![1, 2])),
            ("dataschema", Attr::CeUri("https://example.com/s".into())),
            ("ref", Attr::CeUriRef("/r".into())),
            (
                "time",
                Attr::CeTimestamp(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5,
                }),
            ),
        ]
        .into_iter()
        .map(|(name, attr)| {
            (
                name.to_owned(),
                CloudEventAttributeValue { attr: Some(attr) },
            )
        })
        .collect();
        v1::Event {
            body: Some(v1::event::Body::CloudEvent(Box::new(CloudEvent {
                id: "id-1".into(),
                source: "/source".into(),
                spec_version: "1.0".into(),
                r#type: "com.example.t".into(),
                attributes,
                data: Some(Data::ProtoData(prost_types::Any {
                    type_url: "type.googleapis.com/x.Y".into(),
                    value: vec![8, 1],
                })),
            }))),
            partition_key: "k".into(),
            ..Default::default()
        }
    }

    #[test]
    fn cloud_events_are_walked_and_costed() {
        let one = v1::SendEventRequest {
            event_hub: String::new(),
            event: Some(cloud_event_body()),
        };
        let bytes = one.encode_to_vec();
        let scanned = scan(Schema::SendEvent, &bytes, &LIMITS).unwrap();
        v1::SendEventRequest::decode(bytes.as_slice()).unwrap();
        let bare = v1::SendEventRequest {
            event_hub: String::new(),
            event: Some(text("t")),
        };
        let plain = scan(Schema::SendEvent, &bare.encode_to_vec(), &LIMITS).unwrap();
        assert!(
            scanned.decoded_bytes - plain.decoded_bytes
                >= size_of::<CloudEvent>() + 7 * 2 * size_of::<AttributeEntry>(),
            "{scanned:?} {plain:?}"
        );
        // Bad UTF-8 in an attribute's string names the attribute map.
        let mut damaged = bytes.clone();
        let at = damaged.windows(2).position(|w| w == b"/r").unwrap();
        damaged[at] = 0xff;
        let error = scan(Schema::SendEvent, &damaged, &LIMITS).unwrap_err();
        assert_eq!(error.field(), "event.cloud_event.attributes", "{error}");
        assert!(v1::SendEventRequest::decode(damaged.as_slice()).is_err());
        // A timestamp's seconds as a string (LEN) instead of a varint: prost fails, so must the scan.
        let wrong = [
            0x12, 0x0d, // event
            0x52, 0x0b, // cloud_event
            0x2a, 0x09, // attributes entry
            0x0a, 0x01, b't', // key "t"
            0x12, 0x04, // value
            0x3a, 0x02, // ce_timestamp
            0x0a, 0x00, // seconds as LEN
        ];
        assert!(v1::SendEventRequest::decode(wrong.as_slice()).is_err());
        let error = scan(Schema::SendEvent, &wrong, &OPEN).unwrap_err();
        assert_eq!(error.field(), "event.cloud_event.attributes", "{error}");
        // Many attributes cross the bound at their map.
        let tight = ScanLimits {
            max_decoded_bytes: 1 << 16,
            ..LIMITS
        };
        let mut many = cloud_event_body();
        if let Some(v1::event::Body::CloudEvent(cloud)) = &mut many.body {
            for n in 0..1000 {
                cloud.attributes.insert(format!("x{n}"), Default::default());
            }
        }
        let request = v1::SendEventRequest {
            event_hub: String::new(),
            event: Some(many),
        };
        let error = scan(Schema::SendEvent, &request.encode_to_vec(), &tight).unwrap_err();
        assert_eq!(
            error,
            ScanError::TooCostly {
                field: "event.cloud_event.attributes".into(),
                limit: 1 << 16
            }
        );
    }

    #[test]
    fn well_formed_requests_pass_with_their_events_counted() {
        let events = v1::SendEventsRequest {
            event_hub: "eh1".into(),
            events: vec![text("a"), rich_event(), v1::Event::default()],
        };
        let scanned = scan(Schema::SendEvents, &events.encode_to_vec(), &LIMITS).unwrap();
        assert_eq!(scanned.events, 3);
        assert!(scanned.decoded_bytes > 3 * size_of::<v1::Event>());
        let stream = v1::SendStreamRequest {
            event_hub: String::new(),
            sequence: u64::MAX,
            event: Some(rich_event()),
            events: vec![text("b")],
        };
        scan(Schema::SendStream, &stream.encode_to_vec(), &LIMITS).unwrap();
        let one = v1::SendEventRequest {
            event_hub: "eh1".into(),
            event: Some(v1::Event {
                body: Some(v1::event::Body::Binary(vec![0, 1, 2].into())),
                ..Default::default()
            }),
        };
        scan(Schema::SendEvent, &one.encode_to_vec(), &LIMITS).unwrap();
        scan(Schema::SendEvent, &[], &LIMITS).unwrap();
    }

    #[test]
    fn millions_of_empty_events_are_counted_without_being_decoded() {
        // 8 million empty events: 16 MiB on the wire, gigabytes once decoded.
        let bytes = [0x12u8, 0x00].repeat(8 << 20);
        let error = scan(Schema::SendEvents, &bytes, &LIMITS).unwrap_err();
        assert_eq!(
            error,
            ScanError::TooManyEvents {
                limit: 1000,
                found: 8 << 20
            }
        );
        assert_eq!(error.field(), "events");
        assert!(error.to_string().contains("at most 1000 events"), "{error}");
        // In a stream message `events` is field 4; field 2 there is the sequence.
        let stream = [0x22u8, 0x00].repeat(1001);
        assert!(matches!(
            scan(Schema::SendStream, &stream, &LIMITS),
            Err(ScanError::TooManyEvents { found: 1001, .. })
        ));
    }

    #[test]
    fn json_deeper_than_the_limit_is_refused_naming_its_field() {
        let at_limit = v1::SendEventsRequest {
            event_hub: String::new(),
            events: vec![text("x"), json_event(nested_json(MAX_JSON_DEPTH))],
        };
        let bytes = at_limit.encode_to_vec();
        scan(Schema::SendEvents, &bytes, &LIMITS).unwrap();
        v1::SendEventsRequest::decode(bytes.as_slice())
            .expect("prost decodes the deepest JSON taken");
        let deeper = v1::SendEventsRequest {
            event_hub: String::new(),
            events: vec![text("x"), json_event(nested_json(MAX_JSON_DEPTH + 1))],
        };
        let error = scan(Schema::SendEvents, &deeper.encode_to_vec(), &LIMITS).unwrap_err();
        assert_eq!(
            error,
            ScanError::TooDeep {
                field: "events[1].json".into(),
                limit: MAX_JSON_DEPTH
            }
        );
    }

    #[test]
    fn an_events_first_property_costs_its_whole_hash_table() {
        // Found by the fuzz target gateway_request: a map of one entry allocates 4 buckets.
        let with = |properties: &[(&str, &str)]| {
            let event = v1::Event {
                properties: properties
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..text("t")
            };
            let request = v1::SendEventRequest {
                event_hub: String::new(),
                event: Some(event),
            };
            scan(Schema::SendEvent, &request.encode_to_vec(), &LIMITS)
                .unwrap()
                .decoded_bytes
        };
        let table = 4 * size_of::<(String, String)>() + 16;
        assert!(with(&[("a", "")]) - with(&[]) >= table);
    }

    #[test]
    fn a_lists_first_item_costs_the_four_a_vec_makes_room_for() {
        // Found by the fuzz target gateway_request: one event decoded into 4 x its size.
        let one = v1::SendEventsRequest {
            event_hub: String::new(),
            events: vec![v1::Event::default()],
        };
        let scanned = scan(Schema::SendEvents, &one.encode_to_vec(), &LIMITS).unwrap();
        assert!(scanned.decoded_bytes >= 4 * size_of::<v1::Event>());
        let list = |values: Vec<prost_types::Value>| {
            let body = prost_types::Struct {
                fields: [(
                    "a".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::ListValue(prost_types::ListValue { values })),
                    },
                )]
                .into(),
            };
            let request = v1::SendEventRequest {
                event_hub: String::new(),
                event: Some(json_event(body)),
            };
            scan(Schema::SendEvent, &request.encode_to_vec(), &LIMITS)
                .unwrap()
                .decoded_bytes
        };
        let null = prost_types::Value {
            kind: Some(Kind::NullValue(0)),
        };
        assert!(list(vec![null]) - list(vec![]) >= 4 * size_of::<prost_types::Value>());
    }

    #[test]
    fn the_decoded_size_is_bounded_where_it_is_crossed() {
        // 100,000 empty properties: 200 KB on the wire, several MB in a HashMap.
        let mut bytes = vec![];
        let mut event = vec![0x0a, 0x01, b'x'];
        for _ in 0..100_000 {
            event.extend_from_slice(&[0x32, 0x00]);
        }
        bytes.push(0x12);
        prost::encoding::encode_varint(event.len() as u64, &mut bytes);
        bytes.extend_from_slice(&event);
        let tight = ScanLimits {
            max_decoded_bytes: 1 << 20,
            ..LIMITS
        };
        let error = scan(Schema::SendEvent, &bytes, &tight).unwrap_err();
        assert_eq!(
            error,
            ScanError::TooCostly {
                field: "event.properties".into(),
                limit: 1 << 20
            }
        );
        let scanned = scan(Schema::SendEvent, &bytes, &LIMITS).unwrap();
        assert!(scanned.decoded_bytes > 100_000 * 48, "{scanned:?}");
    }

    #[test]
    fn malformed_bytes_are_refused_as_prost_would() {
        let cases: &[(&[u8], &str)] = &[
            (&[0x0a], "invalid varint"),                 // a key, then no length
            (&[0x0a, 0x80], "invalid varint"),           // a truncated length
            (&[0x0a, 0x05, b'a'], "buffer underflow"),   // a length past the end
            (&[0x0a, 0x02, 0xc3, 0x28], "not UTF-8"),    // invalid UTF-8 in event_hub
            (&[0x08, 0x01], "invalid wire type"),        // event_hub as a varint
            (&[0x00], "invalid tag value: 0"),           // field 0
            (&[0x0f], "invalid wire type value"),        // wire type 7
            (&[0x1c], "unexpected end group tag"),       // an end group with no start
            (&[0x1b, 0x24], "unexpected end group tag"), // groups 3 and 4 crossed
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
                "invalid varint",
            ),
            (&[0xff, 0xff, 0xff, 0xff, 0x7f], "invalid key value"), // a key above u32::MAX
        ];
        for (bytes, reason) in cases {
            let error = scan(Schema::SendEvent, bytes, &LIMITS).unwrap_err();
            assert!(error.to_string().contains(reason), "{bytes:?}: {error}");
            assert!(v1::SendEventRequest::decode(*bytes).is_err(), "{bytes:?}");
        }
        // An unknown group is skipped, as prost does.
        let group = [0x1b, 0x08, 0x01, 0x1c, 0x0a, 0x01, b'a'];
        scan(Schema::SendEvent, &group, &LIMITS).unwrap();
        v1::SendEventRequest::decode(group.as_slice()).unwrap();
        // Bad UTF-8 deep inside names its field.
        let event = v1::SendEventRequest {
            event_hub: String::new(),
            event: Some(v1::Event {
                properties: [("k".to_owned(), "\u{e9}".to_owned())].into(),
                ..text("x")
            }),
        };
        let mut bytes = event.encode_to_vec();
        let at = bytes.iter().position(|&b| b == 0xc3).unwrap();
        bytes[at] = 0xff;
        let error = scan(Schema::SendEvent, &bytes, &LIMITS).unwrap_err();
        assert_eq!(error.field(), "event.properties", "{error}");
    }

    #[test]
    fn nesting_past_prosts_recursion_limit_fails_like_prost_even_without_a_depth_limit() {
        let deep = v1::SendEventRequest {
            event_hub: String::new(),
            event: Some(json_event(nested_json(40))),
        };
        let bytes = deep.encode_to_vec();
        assert!(v1::SendEventRequest::decode(bytes.as_slice()).is_err());
        let error = scan(Schema::SendEvent, &bytes, &OPEN).unwrap_err();
        assert!(error.to_string().contains("recursion limit"), "{error}");
    }

    fn decodes(schema: Schema, bytes: &[u8]) -> bool {
        match schema {
            Schema::SendEvent => v1::SendEventRequest::decode(bytes).is_ok(),
            Schema::SendEvents => v1::SendEventsRequest::decode(bytes).is_ok(),
            Schema::SendStream => v1::SendStreamRequest::decode(bytes).is_ok(),
            Schema::GetEventHubProperties => {
                v1::GetEventHubPropertiesRequest::decode(bytes).is_ok()
            }
        }
    }

    /// Seeded random damage to real requests (bytes flipped, cut, inserted, spliced): the scan passes exactly
    /// what prost decodes.
    #[test]
    fn the_scan_agrees_with_prost_on_damaged_requests() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let samples: Vec<(Schema, Vec<u8>)> = vec![
            (
                Schema::SendEvents,
                v1::SendEventsRequest {
                    event_hub: "eh1".into(),
                    events: vec![
                        rich_event(),
                        text("é"),
                        json_event(nested_json(5)),
                        cloud_event_body(),
                    ],
                }
                .encode_to_vec(),
            ),
            (
                Schema::SendStream,
                v1::SendStreamRequest {
                    event_hub: "eh1".into(),
                    sequence: 300,
                    event: Some(rich_event()),
                    events: vec![text("a")],
                }
                .encode_to_vec(),
            ),
            (
                Schema::SendEvent,
                v1::SendEventRequest {
                    event_hub: "eh1".into(),
                    event: Some(rich_event()),
                }
                .encode_to_vec(),
            ),
            (
                Schema::SendEvent,
                v1::SendEventRequest {
                    event_hub: "eh1".into(),
                    event: Some(cloud_event_body()),
                }
                .encode_to_vec(),
            ),
            (
                Schema::GetEventHubProperties,
                v1::GetEventHubPropertiesRequest {
                    event_hub: "hub".into(),
                }
                .encode_to_vec(),
            ),
        ];
        let (mut passed, mut failed) = (0, 0);
        for round in 0..20_000 {
            let (schema, original) = &samples[round % samples.len()];
            let mut bytes = original.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len().max(1));
                match rng.random_range(0..5) {
                    0 if !bytes.is_empty() => bytes[at] = rng.random(),
                    1 if !bytes.is_empty() => bytes[at] ^= 1 << rng.random_range(0..8),
                    2 => bytes.truncate(at),
                    3 => bytes.insert(at.min(bytes.len()), rng.random()),
                    _ => {
                        let other = &samples[rng.random_range(0..samples.len())].1;
                        let from = rng.random_range(0..other.len());
                        let to = rng.random_range(from..=other.len());
                        let at = at.min(bytes.len());
                        bytes.splice(at..at, other[from..to].iter().copied());
                    }
                }
            }
            let scanned = scan(*schema, &bytes, &OPEN);
            assert_eq!(
                scanned.is_ok(),
                decodes(*schema, &bytes),
                "{schema:?} {bytes:?}: the scan says {scanned:?}"
            );
            if scanned.is_ok() {
                passed += 1
            } else {
                failed += 1
            }
        }
        assert!(
            passed > 1000 && failed > 1000,
            "both sides exercised: {passed} passed, {failed} failed"
        );
    }
}
