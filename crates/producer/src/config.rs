//! Every knob of the producer, with the pooled Python producer's names where it had one, defaults, and one
//! validation that names the field at fault.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::throttle::Throttle;

/// How the producer pools, batches, retries and bounds memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducerConfig {
    /// Most AMQP connections open at once (the seed's `max_size`).
    pub max_size: usize,
    /// Connections kept open even when idle.
    pub min_size: usize,
    /// Most sender links sharing one connection (the seed's `client_limit`).
    pub client_limit: usize,
    /// A link or connection unused this long is closed (down to `min_size` connections).
    pub max_idle_seconds: f64,
    /// A connection older than this is replaced: a new one opens first, then the old one drains and closes.
    pub max_lifespan_seconds: f64,
    /// A text event sent exactly once on each new connection, to the hub it first serves; none by default.
    pub ready_message: Option<String>,
    /// Bound on connect + TLS + SASL + CBS + attach of a new connection, seconds.
    pub pool_connection_create_timeout: f64,
    /// First pause after a failed connection attempt, seconds; it doubles per failure (full jitter) up to
    /// `reconnect_backoff_max_seconds`, and resets once a connection opens.
    pub reconnect_backoff_initial_seconds: f64,
    /// Longest pause between connection attempts to an unreachable Event Hubs, seconds.
    pub reconnect_backoff_max_seconds: f64,
    /// How long a batch waits for a connection with room, seconds; then it fails with a pool timeout.
    pub pool_get_timeout: f64,
    /// How long an event waits for others to share its batch, milliseconds.
    pub linger_ms: f64,
    /// Batches in flight (unsettled) on one link.
    pub max_in_flight_per_link: usize,
    /// Batches in flight for one keyless route; keyed and partition routes keep one, so retries never reorder a key.
    pub max_in_flight_unordered: usize,
    /// Hash partition keys locally and send to partition links, so many keys share one batch.
    pub local_partitioning: bool,
    /// Default deadline of an event, seconds: past it the event fails with deadline exceeded.
    pub send_timeout: f64,
    /// How long one transfer waits for its disposition, seconds, before the link is presumed lost.
    pub disposition_timeout: f64,
    /// A connection with work awaiting an answer (a disposition, a CBS or management reply) that receives
    /// nothing at all (no frame, no heartbeat) for this long, seconds, is declared dead and replaced; its
    /// unsettled batches are in doubt (resent, or OUTCOME_UNKNOWN).
    pub stall_timeout: f64,
    /// Attempts per batch, the first included.
    pub retry_max_attempts: u32,
    /// First retry pause, milliseconds (exponential with full jitter).
    pub retry_initial_backoff_ms: f64,
    /// Longest retry pause, milliseconds.
    pub retry_max_backoff_ms: f64,
    /// Bytes of encoded events buffered or in flight, across all routes.
    pub max_buffered_bytes: u64,
    /// Events queued per route before senders wait.
    pub route_queue_capacity: usize,
    /// Batching routes (hub + partition key, hub + partition id, hub) open at once. At the limit, an idle route
    /// closes early to make room and a new key waits for one (until its deadline, then OVERLOADED): a flood
    /// of distinct keys makes batching slower, never memory larger (a route costs about 8 KiB).
    pub max_routes: usize,
    /// Lifetime of locally signed SAS tokens, seconds.
    pub sas_token_lifetime_seconds: f64,
    /// Fraction of a token's lifetime after which it is refreshed.
    pub token_refresh_fraction: f64,
    /// AMQP idle timeout announced to the service, seconds (heartbeats at half of it); under Azure's 240 s TCP cut.
    pub idle_timeout_seconds: f64,
    /// Most events per second sent to Event Hubs, across all hubs; unlimited when unset.
    pub rate_limit_events_per_second: Option<u32>,
    /// Most encoded bytes per second sent to Event Hubs, across all hubs; unlimited when unset.
    pub rate_limit_bytes_per_second: Option<u32>,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            max_size: 4,
            min_size: 1,
            client_limit: 64,
            max_idle_seconds: 300.0,
            max_lifespan_seconds: 3600.0,
            ready_message: None,
            pool_connection_create_timeout: 30.0,
            reconnect_backoff_initial_seconds: 0.2,
            reconnect_backoff_max_seconds: 30.0,
            pool_get_timeout: 60.0,
            linger_ms: 5.0,
            max_in_flight_per_link: 64,
            max_in_flight_unordered: 16,
            local_partitioning: false,
            send_timeout: 60.0,
            disposition_timeout: 30.0,
            stall_timeout: 10.0,
            retry_max_attempts: 5,
            retry_initial_backoff_ms: 100.0,
            retry_max_backoff_ms: 10_000.0,
            max_buffered_bytes: 256 * 1024 * 1024,
            route_queue_capacity: 16 * 1024,
            max_routes: 4096,
            sas_token_lifetime_seconds: 3600.0,
            token_refresh_fraction: 0.9,
            idle_timeout_seconds: 120.0,
            rate_limit_events_per_second: None,
            rate_limit_bytes_per_second: None,
        }
    }
}

/// A configuration value out of range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("producer.{field}: {reason}")]
pub struct ConfigError {
    /// The field at fault.
    pub field: &'static str,
    /// Its allowed range.
    pub reason: String,
}

fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}

impl ProducerConfig {
    /// Checks every field once; the error names the first field out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.to_owned(),
            })
        };
        let positive = [
            ("max_idle_seconds", self.max_idle_seconds),
            ("max_lifespan_seconds", self.max_lifespan_seconds),
            (
                "pool_connection_create_timeout",
                self.pool_connection_create_timeout,
            ),
            (
                "reconnect_backoff_initial_seconds",
                self.reconnect_backoff_initial_seconds,
            ),
            (
                "reconnect_backoff_max_seconds",
                self.reconnect_backoff_max_seconds,
            ),
            ("pool_get_timeout", self.pool_get_timeout),
            ("send_timeout", self.send_timeout),
            ("disposition_timeout", self.disposition_timeout),
            ("stall_timeout", self.stall_timeout),
            ("retry_initial_backoff_ms", self.retry_initial_backoff_ms),
            ("retry_max_backoff_ms", self.retry_max_backoff_ms),
            (
                "sas_token_lifetime_seconds",
                self.sas_token_lifetime_seconds,
            ),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
        ];
        for (field, value) in positive {
            // Also bounds values so that Duration conversions cannot panic.
            if !(value > 0.0 && value <= 1e9) {
                return fail(field, "must be a number above 0 and at most 1e9");
            }
        }
        if !(self.linger_ms >= 0.0 && self.linger_ms <= 60_000.0) {
            return fail("linger_ms", "must be between 0 and 60000");
        }
        if self.max_size == 0 {
            return fail("max_size", "must be at least 1");
        }
        if self.min_size > self.max_size {
            return fail("min_size", "must not exceed max_size");
        }
        if self.client_limit == 0 {
            return fail("client_limit", "must be at least 1");
        }
        if self.max_in_flight_per_link == 0 {
            return fail("max_in_flight_per_link", "must be at least 1");
        }
        if self.max_in_flight_unordered == 0 {
            return fail("max_in_flight_unordered", "must be at least 1");
        }
        if self.retry_max_attempts == 0 {
            return fail(
                "retry_max_attempts",
                "must be at least 1 (the first attempt)",
            );
        }
        if self.retry_max_backoff_ms < self.retry_initial_backoff_ms {
            return fail(
                "retry_max_backoff_ms",
                "must be at least retry_initial_backoff_ms",
            );
        }
        if self.reconnect_backoff_max_seconds < self.reconnect_backoff_initial_seconds {
            return fail(
                "reconnect_backoff_max_seconds",
                "must be at least reconnect_backoff_initial_seconds",
            );
        }
        if self.max_buffered_bytes < 1024 * 1024 || self.max_buffered_bytes > u32::MAX as u64 {
            return fail("max_buffered_bytes", "must be between 1 MiB and 4 GiB");
        }
        if self.route_queue_capacity == 0 {
            return fail("route_queue_capacity", "must be at least 1");
        }
        if !(1..=1_000_000).contains(&self.max_routes) {
            return fail("max_routes", "must be between 1 and 1000000");
        }
        if !(self.token_refresh_fraction > 0.0 && self.token_refresh_fraction < 1.0) {
            return fail(
                "token_refresh_fraction",
                "must be between 0 and 1, exclusive",
            );
        }
        if self.idle_timeout_seconds > 230.0 {
            return fail(
                "idle_timeout_seconds",
                "must stay under Azure's 240 s idle TCP cut (at most 230)",
            );
        }
        if self.rate_limit_events_per_second == Some(0) {
            return fail(
                "rate_limit_events_per_second",
                "must be at least 1 when set (leave it unset for no limit)",
            );
        }
        if self.rate_limit_bytes_per_second == Some(0) {
            return fail(
                "rate_limit_bytes_per_second",
                "must be at least 1 when set (leave it unset for no limit)",
            );
        }
        if self.ready_message.as_deref() == Some("") {
            return fail("ready_message", "must not be empty when set");
        }
        Ok(())
    }

    /// The rate limit toward Event Hubs, if any.
    pub fn throttle(&self) -> Option<Arc<Throttle>> {
        Throttle::new(
            self.rate_limit_events_per_second.and_then(NonZeroU32::new),
            self.rate_limit_bytes_per_second.and_then(NonZeroU32::new),
        )
    }

    /// `max_idle_seconds` as a duration.
    pub fn max_idle(&self) -> Duration {
        seconds(self.max_idle_seconds)
    }
    /// `max_lifespan_seconds` as a duration.
    pub fn max_lifespan(&self) -> Duration {
        seconds(self.max_lifespan_seconds)
    }
    /// `pool_connection_create_timeout` as a duration.
    pub fn create_timeout(&self) -> Duration {
        seconds(self.pool_connection_create_timeout)
    }
    /// `reconnect_backoff_initial_seconds` as a duration.
    pub fn reconnect_backoff_initial(&self) -> Duration {
        seconds(self.reconnect_backoff_initial_seconds)
    }
    /// `reconnect_backoff_max_seconds` as a duration.
    pub fn reconnect_backoff_max(&self) -> Duration {
        seconds(self.reconnect_backoff_max_seconds)
    }
    /// `pool_get_timeout` as a duration.
    pub fn get_timeout(&self) -> Duration {
        seconds(self.pool_get_timeout)
    }
    /// `linger_ms` as a duration.
    pub fn linger(&self) -> Duration {
        Duration::from_secs_f64(self.linger_ms / 1000.0)
    }
    /// `send_timeout` as a duration.
    pub fn default_deadline(&self) -> Duration {
        seconds(self.send_timeout)
    }
    /// `disposition_timeout` as a duration.
    pub fn disposition_wait(&self) -> Duration {
        seconds(self.disposition_timeout)
    }
    /// `stall_timeout` as a duration.
    pub fn stall_timeout(&self) -> Duration {
        seconds(self.stall_timeout)
    }
    /// `retry_initial_backoff_ms` as a duration.
    pub fn initial_backoff(&self) -> Duration {
        Duration::from_secs_f64(self.retry_initial_backoff_ms / 1000.0)
    }
    /// `retry_max_backoff_ms` as a duration.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_secs_f64(self.retry_max_backoff_ms / 1000.0)
    }
    /// `sas_token_lifetime_seconds` as a duration.
    pub fn sas_token_lifetime(&self) -> Duration {
        seconds(self.sas_token_lifetime_seconds)
    }
    /// `idle_timeout_seconds` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        seconds(self.idle_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(ProducerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases: Vec<(ProducerConfig, &str)> = vec![
            (
                ProducerConfig {
                    max_size: 0,
                    ..Default::default()
                },
                "max_size",
            ),
            (
                ProducerConfig {
                    min_size: 9,
                    ..Default::default()
                },
                "min_size",
            ),
            (
                ProducerConfig {
                    client_limit: 0,
                    ..Default::default()
                },
                "client_limit",
            ),
            (
                ProducerConfig {
                    pool_get_timeout: 0.0,
                    ..Default::default()
                },
                "pool_get_timeout",
            ),
            (
                ProducerConfig {
                    pool_get_timeout: f64::NAN,
                    ..Default::default()
                },
                "pool_get_timeout",
            ),
            (
                ProducerConfig {
                    reconnect_backoff_initial_seconds: 0.0,
                    ..Default::default()
                },
                "reconnect_backoff_initial_seconds",
            ),
            (
                ProducerConfig {
                    reconnect_backoff_max_seconds: -1.0,
                    ..Default::default()
                },
                "reconnect_backoff_max_seconds",
            ),
            (
                ProducerConfig {
                    reconnect_backoff_initial_seconds: 5.0,
                    reconnect_backoff_max_seconds: 1.0,
                    ..Default::default()
                },
                "reconnect_backoff_max_seconds",
            ),
            (
                ProducerConfig {
                    linger_ms: -1.0,
                    ..Default::default()
                },
                "linger_ms",
            ),
            (
                ProducerConfig {
                    idle_timeout_seconds: 240.0,
                    ..Default::default()
                },
                "idle_timeout_seconds",
            ),
            (
                ProducerConfig {
                    rate_limit_events_per_second: Some(0),
                    ..Default::default()
                },
                "rate_limit_events_per_second",
            ),
            (
                ProducerConfig {
                    token_refresh_fraction: 1.0,
                    ..Default::default()
                },
                "token_refresh_fraction",
            ),
            (
                ProducerConfig {
                    max_buffered_bytes: 10,
                    ..Default::default()
                },
                "max_buffered_bytes",
            ),
            (
                ProducerConfig {
                    ready_message: Some(String::new()),
                    ..Default::default()
                },
                "ready_message",
            ),
        ];
        for (config, field) in cases {
            assert_eq!(config.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = serde_json::from_str::<ProducerConfig>(r#"{"max_sise": 3}"#).unwrap_err();
        assert!(error.to_string().contains("max_sise"), "{error}");
    }
}
