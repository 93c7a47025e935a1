//! How the configurations (gateway, producer, emulator) read durations and rates, so that all three accept the
//! same forms. A duration is a humantime string (`"30s"`, `"250ms"`, `"1m 30s"`) or a plain number in its
//! key's unit (`pool_get_timeout = 2.5` is seconds, `linger_ms = 5` milliseconds): the key names and numbers
//! of existing files and the Helm chart keep their meaning. A rate is a whole number of at least 1, or unset.
//! Use with `#[serde(with = "...")]`; what is refused says what is allowed (the loader adds the key).

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serializer};

/// What a duration may be written as, for error messages.
const FORMS: &str = "a duration (\"30s\", \"250ms\", \"1m 30s\")";

/// The number form's unit.
#[derive(Clone, Copy)]
enum Unit {
    Seconds,
    Millis,
}

impl Unit {
    fn nanos(self) -> f64 {
        match self {
            Self::Seconds => 1e9,
            Self::Millis => 1e6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Seconds => "seconds",
            Self::Millis => "milliseconds",
        }
    }
}

/// A number of `unit`s as a duration, rounded to the nanosecond (so `0.2` seconds is exactly 200 ms).
fn from_number(value: f64, unit: Unit) -> Result<Duration, String> {
    if !value.is_finite() {
        return Err(format!("must be a finite number of {}", unit.name()));
    }
    if value < 0.0 {
        return Err("must not be negative".into());
    }
    let nanos = (value * unit.nanos()).round();
    if nanos < u64::MAX as f64 {
        // Exact below 2^64 ns (584 years): the cast is in range.
        return Ok(Duration::from_nanos(nanos as u64));
    }
    Duration::try_from_secs_f64(nanos / 1e9).map_err(|_| "is too long".to_owned())
}

/// A duration from text: a plain number in `unit`, else humantime.
fn from_text(text: &str, unit: Unit) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(number) = text.parse::<f64>() {
        return from_number(number, unit);
    }
    humantime::parse_duration(text).map_err(|error| {
        format!(
            "{text:?} is not {FORMS} or a number of {}: {error}",
            unit.name()
        )
    })
}

struct DurationVisitor(Unit);

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{FORMS}, or a number of {}", self.0.name())
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Duration, E> {
        match self.0 {
            Unit::Seconds => Ok(Duration::from_secs(value)),
            Unit::Millis => Ok(Duration::from_millis(value)),
        }
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Duration, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => Err(E::custom("must not be negative")),
        }
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Duration, E> {
        from_number(value, self.0).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        from_text(text, self.0).map_err(E::custom)
    }
}

/// Written back as a number in `unit` (whole when it is), the form the key names promise.
fn serialize<S: Serializer>(
    duration: &Duration,
    unit: Unit,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let nanos = duration.as_nanos();
    let per_unit = match unit {
        Unit::Seconds => 1_000_000_000,
        Unit::Millis => 1_000_000,
    };
    match u64::try_from(nanos / per_unit) {
        Ok(whole) if nanos % per_unit == 0 => serializer.serialize_u64(whole),
        _ => serializer.serialize_f64(nanos as f64 / per_unit as f64),
    }
}

/// A duration whose number form is seconds (`*_seconds` keys and the `*_timeout` keys of the Python pool).
pub mod seconds {
    use super::*;

    /// Reads a humantime string or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor(Unit::Seconds))
    }

    /// Writes a number of seconds.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        super::serialize(duration, Unit::Seconds, serializer)
    }
}

/// A duration whose number form is milliseconds (`*_ms` keys).
pub mod millis {
    use super::*;

    /// Reads a humantime string or a number of milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor(Unit::Millis))
    }

    /// Writes a number of milliseconds.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        super::serialize(duration, Unit::Millis, serializer)
    }
}

/// An optional duration whose number form is seconds: unset (or null) means the bound is off.
pub mod optional_seconds {
    use super::*;

    /// One duration, read and written as [`seconds`](super::seconds) does.
    #[derive(Deserialize)]
    #[serde(transparent)]
    struct Seconds(#[serde(with = "super::seconds")] Duration);

    /// Reads nothing (off), or a humantime string or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Seconds>::deserialize(deserializer)?.map(|Seconds(duration)| duration))
    }

    /// Writes a number of seconds, or nothing.
    pub fn serialize<S: Serializer>(
        duration: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => super::seconds::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }
}

/// An optional rate (events or bytes per second): unset means unlimited, and 0 is refused rather than
/// taken to mean "off" or "nothing passes".
pub mod rate {
    use super::*;

    /// What a rate must be.
    pub const PROBLEM: &str = "must be at least 1 when set (leave it unset for no limit)";

    /// Reads nothing (unlimited) or a whole number from 1 to 2^32 - 1.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<NonZeroU32>, D::Error> {
        let Some(value) = Option::<u64>::deserialize(deserializer)? else {
            return Ok(None);
        };
        let value = u32::try_from(value)
            .map_err(|_| de::Error::custom(format!("must be at most {}", u32::MAX)))?;
        NonZeroU32::new(value)
            .map(Some)
            .ok_or_else(|| de::Error::custom(PROBLEM))
    }

    /// Writes the number, or nothing.
    pub fn serialize<S: Serializer>(
        rate: &Option<NonZeroU32>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match rate {
            Some(rate) => serializer.serialize_some(&rate.get()),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Settings {
        #[serde(with = "seconds")]
        timeout: Duration,
        #[serde(with = "millis")]
        linger_ms: Duration,
        #[serde(with = "rate", default)]
        rate: Option<NonZeroU32>,
    }

    fn parse(json: &str) -> Result<Settings, String> {
        serde_json::from_str(json).map_err(|error| error.to_string())
    }

    #[test]
    fn durations_are_humantime_or_numbers_in_the_keys_unit() {
        for (timeout, seconds) in [
            ("\"30s\"", 30_000),
            ("\"250ms\"", 250),
            ("\"1m 30s\"", 90_000),
            ("2.5", 2_500),
            ("0.2", 200),
            ("60", 60_000),
            ("\"2.5\"", 2_500),
        ] {
            let settings = parse(&format!(r#"{{"timeout": {timeout}, "linger_ms": 5}}"#)).unwrap();
            assert_eq!(
                settings.timeout,
                Duration::from_millis(seconds),
                "{timeout}"
            );
            assert_eq!(settings.linger_ms, Duration::from_millis(5));
        }
        let settings = parse(r#"{"timeout": 1, "linger_ms": "1s"}"#).unwrap();
        assert_eq!(settings.linger_ms, Duration::from_secs(1));
        let settings = parse(r#"{"timeout": 1, "linger_ms": 0.5}"#).unwrap();
        assert_eq!(settings.linger_ms, Duration::from_micros(500));
    }

    #[test]
    fn bad_durations_say_what_is_allowed() {
        for (bad, expected) in [
            (
                "\"30x\"",
                "is not a duration (\"30s\", \"250ms\", \"1m 30s\") or a number of seconds",
            ),
            ("\"soon\"", "or a number of seconds"),
            ("-1", "must not be negative"),
            ("-0.5", "must not be negative"),
            ("true", "a duration (\"30s\""),
        ] {
            let error = parse(&format!(r#"{{"timeout": {bad}, "linger_ms": 5}}"#)).unwrap_err();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn durations_are_written_as_numbers_that_read_back_the_same() {
        for millis in [0, 1, 200, 5_000, 300_000, 1_500] {
            let settings = Settings {
                timeout: Duration::from_millis(millis),
                linger_ms: Duration::from_micros(millis * 7),
                rate: NonZeroU32::new(millis as u32),
            };
            let json = serde_json::to_string(&settings).unwrap();
            assert_eq!(parse(&json).unwrap(), settings, "{json}");
        }
        let json = serde_json::to_value(Settings {
            timeout: Duration::from_secs(30),
            linger_ms: Duration::from_millis(5),
            rate: None,
        })
        .unwrap();
        assert_eq!(json["timeout"], 30);
        assert_eq!(json["linger_ms"], 5);
    }

    #[test]
    fn a_rate_is_unset_or_at_least_one() {
        assert_eq!(
            parse(r#"{"timeout": 1, "linger_ms": 1}"#).unwrap().rate,
            None
        );
        assert_eq!(
            parse(r#"{"timeout": 1, "linger_ms": 1, "rate": null}"#)
                .unwrap()
                .rate,
            None
        );
        assert_eq!(
            parse(r#"{"timeout": 1, "linger_ms": 1, "rate": 50}"#)
                .unwrap()
                .rate,
            NonZeroU32::new(50)
        );
        let error = parse(r#"{"timeout": 1, "linger_ms": 1, "rate": 0}"#).unwrap_err();
        assert!(error.contains(rate::PROBLEM), "{error}");
        let error = parse(r#"{"timeout": 1, "linger_ms": 1, "rate": 4294967296}"#).unwrap_err();
        assert!(error.contains("at most"), "{error}");
    }

    #[test]
    fn an_optional_duration_is_unset_null_or_a_duration() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Optional {
            #[serde(with = "optional_seconds", default)]
            age: Option<Duration>,
        }
        let read = |json: &str| serde_json::from_str::<Optional>(json).map_err(|e| e.to_string());
        assert_eq!(read("{}").unwrap().age, None);
        assert_eq!(read(r#"{"age": null}"#).unwrap().age, None);
        assert_eq!(
            read(r#"{"age": "30m"}"#).unwrap().age,
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            read(r#"{"age": 1.5}"#).unwrap().age,
            Some(Duration::from_millis(1500))
        );
        assert!(
            read(r#"{"age": -1}"#)
                .unwrap_err()
                .contains("must not be negative")
        );
        let written = serde_json::to_string(&Optional {
            age: Some(Duration::from_secs(90)),
        })
        .unwrap();
        assert_eq!(written, r#"{"age":90}"#);
        assert_eq!(
            serde_json::to_string(&Optional { age: None }).unwrap(),
            r#"{"age":null}"#
        );
    }
}
