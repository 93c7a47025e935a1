//! The caller's deadline from the `grpc-timeout` header, answered a little early so the caller gets the
//! gateway's DEADLINE_EXCEEDED (with its details) rather than its own library's.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// How much earlier than the caller's deadline the gateway answers, at most.
const ANSWER_MARGIN: Duration = Duration::from_millis(50);

/// The timeout a call carries in `grpc-timeout`, if a valid one: 1 to 8 digits and a unit (H, M, S, m, u, n).
pub fn from_metadata(metadata: &MetadataMap) -> Option<Duration> {
    parse(metadata.get("grpc-timeout")?.to_str().ok()?)
}

fn parse(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The instant the gateway answers by for a call with this timeout: the margin (at most a tenth of the
/// timeout) before the caller gives up.
pub fn answer_before(timeout: Duration) -> Instant {
    let margin = ANSWER_MARGIN.min(timeout / 10);
    Instant::now() + timeout - margin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses_and_malformed_values_do_not() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", "1 S", "1é"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
