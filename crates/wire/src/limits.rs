//! What one event may hold beyond its size: the rules the producer checks before an event joins a batch (so a
//! bad event fails alone) and the emulator applies to every event of a transfer (so it refuses what the
//! producer would). Each rule has a name, a limit and a message that says both.
//!
//! Where the values come from: the event's encoded size is the service's documented limit (the link's
//! `max-message-size`, checked elsewhere). Event Hubs documents no per-field limits; the id and property bounds
//! are Service Bus's documented ones (message id 128 characters; each property at most 32 KB, all together at
//! most 64 KB), the broker both run on; the property count and the content type's length are this project's
//! own bounds (a content type is an AMQP symbol, so ASCII by definition). Partition keys are deliberately not
//! bounded here: a key's batch carries only that key, so a key Event Hubs refused could fail no other key's
//! events.

use std::fmt;

/// Most characters (UTF-16 code units, as .NET and Java count them) in `message_id`.
pub const MAX_MESSAGE_ID_CHARS: usize = 128;
/// Most characters (UTF-16 code units) in `correlation_id`.
pub const MAX_CORRELATION_ID_CHARS: usize = 128;
/// Most bytes in `content_type`, which must be ASCII.
pub const MAX_CONTENT_TYPE_BYTES: usize = 256;
/// Most application properties on one event (the trace context's included).
pub const MAX_PROPERTIES: usize = 1024;
/// Most bytes of one property, its name and (UTF-8) value together.
pub const MAX_PROPERTY_BYTES: usize = 32 * 1024;
/// Most bytes of all properties of one event, names and values together.
pub const MAX_PROPERTIES_BYTES: usize = 64 * 1024;

/// An event over one of the rules: which field, which rule, its limit and what the event has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field at fault (`properties`, `message_id`, ...).
    pub field: &'static str,
    /// The rule's stable name (`max_properties`, `max_message_id_chars`, ...).
    pub rule: &'static str,
    /// The rule's limit.
    pub limit: usize,
    /// What the event has (0 for a rule about content rather than size).
    pub actual: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = self.limit;
        let actual = self.actual;
        match self.rule {
            "max_message_id_chars" | "max_correlation_id_chars" => write!(
                f,
                "{actual} characters; Event Hubs accepts at most {limit} ({})",
                self.rule
            ),
            "content_type_ascii" => write!(
                f,
                "must be ASCII (an AMQP symbol) of at most {limit} bytes ({})",
                self.rule
            ),
            "max_properties" => write!(
                f,
                "{actual} properties (the trace context's included); at most {limit} per event ({})",
                self.rule
            ),
            _ => write!(f, "{actual} bytes; at most {limit} ({})", self.rule),
        }
    }
}

fn utf16_len(text: &str) -> usize {
    text.chars().map(char::len_utf16).sum()
}

/// Checks `message_id`.
pub fn check_message_id(id: &str) -> Result<(), Violation> {
    check_chars(
        "message_id",
        "max_message_id_chars",
        id,
        MAX_MESSAGE_ID_CHARS,
    )
}

/// Checks `correlation_id`.
pub fn check_correlation_id(id: &str) -> Result<(), Violation> {
    check_chars(
        "correlation_id",
        "max_correlation_id_chars",
        id,
        MAX_CORRELATION_ID_CHARS,
    )
}

fn check_chars(
    field: &'static str,
    rule: &'static str,
    text: &str,
    limit: usize,
) -> Result<(), Violation> {
    // A byte length within the limit is a character count within it too; count only longer ones.
    if text.len() <= limit {
        return Ok(());
    }
    let actual = utf16_len(text);
    if actual > limit {
        return Err(Violation {
            field,
            rule,
            limit,
            actual,
        });
    }
    Ok(())
}

/// Checks `content_type`: ASCII, at most [`MAX_CONTENT_TYPE_BYTES`].
pub fn check_content_type(content_type: &str) -> Result<(), Violation> {
    if content_type.len() > MAX_CONTENT_TYPE_BYTES {
        return Err(Violation {
            field: "content_type",
            rule: "max_content_type_bytes",
            limit: MAX_CONTENT_TYPE_BYTES,
            actual: content_type.len(),
        });
    }
    if !content_type.is_ascii() {
        return Err(Violation {
            field: "content_type",
            rule: "content_type_ascii",
            limit: MAX_CONTENT_TYPE_BYTES,
            actual: 0,
        });
    }
    Ok(())
}

/// Checks application properties given as (name bytes, value bytes) pairs: their count, each one's size and
/// their total.
pub fn check_properties(
    sizes: impl ExactSizeIterator<Item = (usize, usize)>,
) -> Result<(), Violation> {
    let count = sizes.len();
    if count > MAX_PROPERTIES {
        return Err(Violation {
            field: "properties",
            rule: "max_properties",
            limit: MAX_PROPERTIES,
            actual: count,
        });
    }
    let mut total = 0usize;
    for (name, value) in sizes {
        let size = name.saturating_add(value);
        if size > MAX_PROPERTY_BYTES {
            return Err(Violation {
                field: "properties",
                rule: "max_property_bytes",
                limit: MAX_PROPERTY_BYTES,
                actual: size,
            });
        }
        total = total.saturating_add(size);
    }
    if total > MAX_PROPERTIES_BYTES {
        return Err(Violation {
            field: "properties",
            rule: "max_properties_bytes",
            limit: MAX_PROPERTIES_BYTES,
            actual: total,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_count_characters_as_dotnet_does() {
        assert!(check_message_id(&"a".repeat(128)).is_ok());
        let error = check_message_id(&"a".repeat(129)).unwrap_err();
        assert_eq!(
            (error.field, error.actual, error.limit),
            ("message_id", 129, 128)
        );
        // 128 two-byte characters are 256 bytes but 128 characters.
        assert!(check_correlation_id(&"é".repeat(128)).is_ok());
        // An emoji is two UTF-16 code units.
        assert_eq!(
            check_correlation_id(&"🚀".repeat(65)).unwrap_err().actual,
            130
        );
    }

    #[test]
    fn content_types_are_short_ascii() {
        assert!(check_content_type("application/vnd.example+json").is_ok());
        assert_eq!(
            check_content_type("text/plain; charset=ü")
                .unwrap_err()
                .rule,
            "content_type_ascii"
        );
        assert_eq!(
            check_content_type(&"a".repeat(257)).unwrap_err().rule,
            "max_content_type_bytes"
        );
    }

    #[test]
    fn properties_are_bounded_in_count_each_and_together() {
        let many = vec![(4, 1); MAX_PROPERTIES + 1];
        let error = check_properties(many.into_iter()).unwrap_err();
        assert_eq!((error.rule, error.actual), ("max_properties", 1025));
        assert!(error.to_string().contains("at most 1024"), "{error}");
        let big = vec![(1, MAX_PROPERTY_BYTES)];
        assert_eq!(
            check_properties(big.into_iter()).unwrap_err().rule,
            "max_property_bytes"
        );
        let together = vec![(10, 20_000); 4];
        let error = check_properties(together.into_iter()).unwrap_err();
        assert_eq!((error.rule, error.actual), ("max_properties_bytes", 80_040));
        assert!(check_properties(vec![(10, 20_000); 3].into_iter()).is_ok());
    }
}
