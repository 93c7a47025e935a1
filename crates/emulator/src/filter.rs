//! Consumers' selector filters: `amqp.annotation.x-opt-offset > '-1'` and its siblings, as the SDKs send them.

use fe2o3_amqp_types::messaging::FilterSet;
use serde_amqp::Value;

use super::partition_log::StartPosition;

/// The filter key (and descriptor) the SDKs use for the start position.
pub const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";

/// A selector the emulator cannot read; the link is refused with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported selector filter {selector:?}: {reason}")]
pub struct FilterError {
    /// The selector as sent.
    pub selector: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The start position named by a receiver's filter set; no selector means the start of the partition.
pub fn start_position(filters: Option<&FilterSet>) -> Result<StartPosition, FilterError> {
    let selector = filters.and_then(|set| {
        set.iter()
            .find(|(key, _)| key.0 == SELECTOR_FILTER)
            .map(|(_, value)| selector_string(value))
    });
    match selector {
        None => Ok(StartPosition::Earliest),
        Some(None) => Err(FilterError {
            selector: String::new(),
            reason: "the selector is not a string",
        }),
        Some(Some(selector)) => parse_selector(&selector),
    }
}

fn selector_string(value: &Value) -> Option<String> {
    match value {
        Value::Described(described) => selector_string(&described.value),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Parses `amqp.annotation.<field> <op> '<value>'`.
pub fn parse_selector(selector: &str) -> Result<StartPosition, FilterError> {
    let fail = |reason| FilterError {
        selector: selector.into(),
        reason,
    };
    let rest = selector
        .trim()
        .strip_prefix("amqp.annotation.")
        .ok_or_else(|| {
            fail(
                "expected amqp.annotation.<x-opt-offset|x-opt-sequence-number|x-opt-enqueued-time>",
            )
        })?;
    let (field, rest) = rest
        .split_once(char::is_whitespace)
        .ok_or_else(|| fail("expected an operator"))?;
    let rest = rest.trim_start();
    let (inclusive, rest) = if let Some(rest) = rest.strip_prefix(">=") {
        (true, rest)
    } else if let Some(rest) = rest.strip_prefix('>') {
        (false, rest)
    } else {
        return Err(fail("the operator must be > or >="));
    };
    let value = rest
        .trim()
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .ok_or_else(|| fail("the value must be quoted with '"))?;
    let number = |reason| value.parse::<i64>().map_err(|_| fail(reason));
    match field {
        "x-opt-offset" => match value {
            "-1" => Ok(StartPosition::Earliest),
            "@latest" => Ok(StartPosition::Latest),
            _ => Ok(StartPosition::Offset {
                offset: number("an offset is a whole number, -1 or @latest")?,
                inclusive,
            }),
        },
        "x-opt-sequence-number" => Ok(StartPosition::SequenceNumber {
            sequence_number: number("a sequence number is a whole number")?,
            inclusive,
        }),
        "x-opt-enqueued-time" => Ok(StartPosition::EnqueuedTime {
            time_ms: number("an enqueued time is Unix milliseconds")?,
            inclusive,
        }),
        _ => Err(fail(
            "unknown annotation: use x-opt-offset, x-opt-sequence-number or x-opt-enqueued-time",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::primitives::Symbol;
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;

    #[test]
    fn parses_what_the_sdks_send() {
        let cases = [
            (
                "amqp.annotation.x-opt-offset > '-1'",
                StartPosition::Earliest,
            ),
            (
                "amqp.annotation.x-opt-offset > '@latest'",
                StartPosition::Latest,
            ),
            (
                "amqp.annotation.x-opt-offset > '120'",
                StartPosition::Offset {
                    offset: 120,
                    inclusive: false,
                },
            ),
            (
                "amqp.annotation.x-opt-offset >= '120'",
                StartPosition::Offset {
                    offset: 120,
                    inclusive: true,
                },
            ),
            (
                "amqp.annotation.x-opt-sequence-number > '7'",
                StartPosition::SequenceNumber {
                    sequence_number: 7,
                    inclusive: false,
                },
            ),
            (
                "amqp.annotation.x-opt-enqueued-time >= '1700000000000'",
                StartPosition::EnqueuedTime {
                    time_ms: 1_700_000_000_000,
                    inclusive: true,
                },
            ),
        ];
        for (selector, expected) in cases {
            assert_eq!(parse_selector(selector), Ok(expected), "{selector}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            "x-opt-offset > '1'",
            "amqp.annotation.x-opt-offset = '1'",
            "amqp.annotation.x-opt-offset > 1",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-size > '1'",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_the_described_filter_value() {
        let mut filters = FilterSet::new();
        filters.insert(
            Symbol::from(SELECTOR_FILTER),
            Value::Described(Box::new(Described {
                descriptor: Descriptor::Name(Symbol::from(SELECTOR_FILTER)),
                value: Value::String("amqp.annotation.x-opt-sequence-number >= '3'".into()),
            })),
        );
        assert_eq!(
            start_position(Some(&filters)),
            Ok(StartPosition::SequenceNumber {
                sequence_number: 3,
                inclusive: true
            })
        );
        assert_eq!(start_position(None), Ok(StartPosition::Earliest));
    }
}
