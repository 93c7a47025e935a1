//! Every knob of the producer, with the pooled Python producer's names where it had one, defaults, and one
//! validation that names the field at fault. Durations are `Duration`s read as humantime strings or numbers in
//! their key's unit (`eventhubs::settings`), under the keys files and the Helm chart already use.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::throttle::Throttle;
use eventhub_wire::settings::{millis, rate, seconds};

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
    #[serde(rename = "max_idle_seconds", with = "seconds")]
    pub max_idle: Duration,
    /// A connection older than this is replaced: a new one opens first, then the old one drains and closes.
    #[serde(rename = "max_lifespan_seconds", with = "seconds")]
    pub max_lifespan: Duration,
    /// A text event sent exactly once on each new connection, to the hub it first serves; none by default.
    pub ready_message: Option<String>,
    /// Bound on connect + TLS + SASL + CBS + attach of a new connection.
    #[serde(with = "seconds")]
    pub pool_connection_create_timeout: Duration,
    /// First pause after a failed connection attempt; it doubles per failure (full jitter) up to
    /// `reconnect_backoff_max`, and resets once a connection opens.
    #[serde(rename = "reconnect_backoff_initial_seconds", with = "seconds")]
    pub reconnect_backoff_initial: Duration,
    /// Longest pause between connection attempts to an unreachable Event Hubs.
    #[serde(rename = "reconnect_backoff_max_seconds", with = "seconds")]
    pub reconnect_backoff_max: Duration,
    /// How long a batch waits for a connection with room; then it fails with a pool timeout.
    #[serde(with = "seconds")]
    pub pool_get_timeout: Duration,
    /// How long an event waits for others to share its batch (a number in files is milliseconds).
    #[serde(rename = "linger_ms", with = "millis")]
    pub linger: Duration,
    /// Linger only while the route has a batch in flight: with nothing in flight, a batch goes once no more
    /// events arrive for about a millisecond (the rest of a burst), and a lingering one goes once the route's last
    /// batch is answered. A batch then waits behind a round trip, not for a timer it has no company to wait for.
    pub adaptive_linger: bool,
    /// Batches in flight (unsettled) on one link.
    pub max_in_flight_per_link: usize,
    /// Batches in flight for one keyless route; keyed and partition routes keep one, so retries never reorder a key.
    pub max_in_flight_unordered: usize,
    /// Hash partition keys locally and send to partition links, so many keys share one batch.
    pub local_partitioning: bool,
    /// Default deadline of an event: past it the event fails with deadline exceeded.
    #[serde(with = "seconds")]
    pub send_timeout: Duration,
    /// How long one transfer waits for its disposition before the link is presumed lost.
    #[serde(with = "seconds")]
    pub disposition_timeout: Duration,
    /// A connection with work awaiting an answer (a disposition, a CBS or management reply) that receives
    /// nothing at all (no frame, no heartbeat) for this long is declared dead and replaced; its unsettled
    /// batches are in doubt (resent, or OUTCOME_UNKNOWN).
    #[serde(with = "seconds")]
    pub stall_timeout: Duration,
    /// Attempts per batch, the first included.
    pub retry_max_attempts: u32,
    /// First retry pause (exponential with full jitter; a number in files is milliseconds).
    #[serde(rename = "retry_initial_backoff_ms", with = "millis")]
    pub retry_initial_backoff: Duration,
    /// Longest retry pause (a number in files is milliseconds).
    #[serde(rename = "retry_max_backoff_ms", with = "millis")]
    pub retry_max_backoff: Duration,
    /// Bytes of encoded events buffered or in flight, across all routes.
    pub max_buffered_bytes: u64,
    /// Events queued per route before senders wait.
    pub route_queue_capacity: usize,
    /// Batching routes (hub + partition key, hub + partition id, hub) open at once. At the limit, an idle route
    /// closes early to make room and a new key waits for one (until its deadline, then OVERLOADED): a flood
    /// of distinct keys makes batching slower, never memory larger (a route costs about 8 KiB).
    pub max_routes: usize,
    /// Lifetime of locally signed SAS tokens.
    #[serde(rename = "sas_token_lifetime_seconds", with = "seconds")]
    pub sas_token_lifetime: Duration,
    /// Fraction of a token's lifetime after which it is refreshed.
    pub token_refresh_fraction: f64,
    /// AMQP idle timeout: half of it is announced to the service (which heartbeats at least that often), and a
    /// connection that receives nothing for all of it is closed; under Azure's 240 s TCP cut.
    #[serde(rename = "idle_timeout_seconds", with = "seconds")]
    pub idle_timeout: Duration,
    /// TCP keepalive on every connection to Event Hubs: probes after this long without traffic, and the kernel
    /// ends a connection whose peer has acknowledged nothing (probe or data) for twice as long, so a peer gone
    /// silent behind a blackhole is found in seconds even when no send is waiting on it.
    #[serde(rename = "tcp_keepalive_seconds", with = "seconds")]
    pub tcp_keepalive: Duration,
    /// Gives every event sent without a message id a random one (a UUID), so the copies a resend after a lost
    /// connection may store carry the same id and consumers can drop them; about 40 bytes per event. Off by
    /// default: events with the caller's own id are deduplicable already.
    pub assign_message_ids: bool,
    /// Most events per second sent to Event Hubs, across all hubs; unlimited when unset.
    #[serde(with = "rate")]
    pub rate_limit_events_per_second: Option<NonZeroU32>,
    /// Most encoded bytes per second sent to Event Hubs, across all hubs; unlimited when unset.
    #[serde(with = "rate")]
    pub rate_limit_bytes_per_second: Option<NonZeroU32>,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            max_size: 4,
            min_size: 1,
            client_limit: 64,
            max_idle: Duration::from_secs(300),
            max_lifespan: Duration::from_secs(3600),
            ready_message: None,
            pool_connection_create_timeout: Duration::from_secs(30),
            reconnect_backoff_initial: Duration::from_millis(200),
            reconnect_backoff_max: Duration::from_secs(30),
            pool_get_timeout: Duration::from_secs(60),
            linger: Duration::from_millis(5),
            adaptive_linger: true,
            max_in_flight_per_link: 64,
            max_in_flight_unordered: 16,
            local_partitioning: false,
            send_timeout: Duration::from_secs(60),
            disposition_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
            retry_max_attempts: 5,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(10),
            max_buffered_bytes: 256 * 1024 * 1024,
            route_queue_capacity: 16 * 1024,
            max_routes: 4096,
            sas_token_lifetime: Duration::from_secs(3600),
            token_refresh_fraction: 0.9,
            idle_timeout: Duration::from_secs(120),
            tcp_keepalive: Duration::from_secs(15),
            assign_message_ids: false,
            rate_limit_events_per_second: None,
            rate_limit_bytes_per_second: None,
        }
    }
}

/// A producer setting out of range: the same `{ field, problem }` shape as the gateway's and the emulator's
/// configuration errors, the field named as in files (`max_idle_seconds`), relative to the producer section.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range.
    #[error("{field}: {problem}")]
    Invalid {
        /// The setting, as its key in files.
        field: String,
        /// What is allowed.
        problem: String,
    },
}

impl ConfigError {
    /// The setting at fault.
    pub fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. } => field,
        }
    }
}

/// The longest duration a setting takes: far beyond any use, and `Instant + it` cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(1_000_000_000);

impl ProducerConfig {
    /// Checks every field once; the error names the first field out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_durations()?;
        self.validate_pool()?;
        self.validate_memory()?;
        if !(self.token_refresh_fraction > 0.0 && self.token_refresh_fraction < 1.0) {
            return fail(
                "token_refresh_fraction",
                "must be between 0 and 1, exclusive",
            );
        }
        if self.ready_message.as_deref() == Some("") {
            return fail("ready_message", "must not be empty when set");
        }
        Ok(())
    }

    /// Timeouts, pauses and lifetimes: each above zero and bounded, pairs in order.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_idle_seconds", self.max_idle),
            ("max_lifespan_seconds", self.max_lifespan),
            (
                "pool_connection_create_timeout",
                self.pool_connection_create_timeout,
            ),
            (
                "reconnect_backoff_initial_seconds",
                self.reconnect_backoff_initial,
            ),
            ("reconnect_backoff_max_seconds", self.reconnect_backoff_max),
            ("pool_get_timeout", self.pool_get_timeout),
            ("send_timeout", self.send_timeout),
            ("disposition_timeout", self.disposition_timeout),
            ("stall_timeout", self.stall_timeout),
            ("retry_initial_backoff_ms", self.retry_initial_backoff),
            ("retry_max_backoff_ms", self.retry_max_backoff),
            ("sas_token_lifetime_seconds", self.sas_token_lifetime),
            ("idle_timeout_seconds", self.idle_timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() || value > MAX_DURATION {
                return fail(field, "must be above 0 and at most 1e9 seconds");
            }
        }
        if self.linger > Duration::from_secs(60) {
            return fail("linger_ms", "must be between 0 and 60 s (60000 ms)");
        }
        if self.retry_max_backoff < self.retry_initial_backoff {
            return fail(
                "retry_max_backoff_ms",
                "must be at least retry_initial_backoff_ms",
            );
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_initial {
            return fail(
                "reconnect_backoff_max_seconds",
                "must be at least reconnect_backoff_initial_seconds",
            );
        }
        if self.idle_timeout > Duration::from_secs(230) {
            return fail(
                "idle_timeout_seconds",
                "must stay under Azure's 240 s idle TCP cut (at most 230 s)",
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.tcp_keepalive) {
            return fail(
                "tcp_keepalive_seconds",
                "must be between 1 and 3600 seconds",
            );
        }
        Ok(())
    }

    /// Connections, links and batches in flight.
    fn validate_pool(&self) -> Result<(), ConfigError> {
        if self.max_size == 0 {
            return fail("max_size", "must be at least 1");
        }
        if self.min_size > self.max_size {
            return fail("min_size", "must not exceed max_size");
        }
        for (field, value) in [
            ("client_limit", self.client_limit),
            ("max_in_flight_per_link", self.max_in_flight_per_link),
            ("max_in_flight_unordered", self.max_in_flight_unordered),
        ] {
            if value == 0 {
                return fail(field, "must be at least 1");
            }
        }
        if self.retry_max_attempts == 0 {
            return fail(
                "retry_max_attempts",
                "must be at least 1 (the first attempt)",
            );
        }
        Ok(())
    }

    /// What events may hold in memory: the byte budget, queues and routes.
    fn validate_memory(&self) -> Result<(), ConfigError> {
        if self.max_buffered_bytes < 1024 * 1024 || self.max_buffered_bytes > u32::MAX as u64 {
            return fail("max_buffered_bytes", "must be between 1 MiB and 4 GiB");
        }
        if self.route_queue_capacity == 0 {
            return fail("route_queue_capacity", "must be at least 1");
        }
        if !(1..=1_000_000).contains(&self.max_routes) {
            return fail("max_routes", "must be between 1 and 1000000");
        }
        Ok(())
    }

    /// The rate limit toward Event Hubs, if any.
    pub fn throttle(&self) -> Option<Arc<Throttle>> {
        Throttle::new(
            self.rate_limit_events_per_second,
            self.rate_limit_bytes_per_second,
        )
    }
}

fn fail(field: &str, problem: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        field: field.to_owned(),
        problem: problem.to_owned(),
    })
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
                    pool_get_timeout: Duration::ZERO,
                    ..Default::default()
                },
                "pool_get_timeout",
            ),
            (
                ProducerConfig {
                    send_timeout: Duration::from_secs(2_000_000_000),
                    ..Default::default()
                },
                "send_timeout",
            ),
            (
                ProducerConfig {
                    reconnect_backoff_initial: Duration::ZERO,
                    ..Default::default()
                },
                "reconnect_backoff_initial_seconds",
            ),
            (
                ProducerConfig {
                    reconnect_backoff_max: Duration::ZERO,
                    ..Default::default()
                },
                "reconnect_backoff_max_seconds",
            ),
            (
                ProducerConfig {
                    reconnect_backoff_initial: Duration::from_secs(5),
                    reconnect_backoff_max: Duration::from_secs(1),
                    ..Default::default()
                },
                "reconnect_backoff_max_seconds",
            ),
            (
                ProducerConfig {
                    linger: Duration::from_secs(61),
                    ..Default::default()
                },
                "linger_ms",
            ),
            (
                ProducerConfig {
                    idle_timeout: Duration::from_secs(240),
                    ..Default::default()
                },
                "idle_timeout_seconds",
            ),
            (
                ProducerConfig {
                    tcp_keepalive: Duration::from_millis(500),
                    ..Default::default()
                },
                "tcp_keepalive_seconds",
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
            assert_eq!(config.validate().unwrap_err().field(), field);
        }
    }

    #[test]
    fn durations_read_as_humantime_or_numbers_under_the_documented_keys() {
        let config: ProducerConfig = serde_json::from_str(
            r#"{"max_idle_seconds": "30s", "pool_get_timeout": 2.5, "linger_ms": 5,
                "retry_initial_backoff_ms": "250ms", "send_timeout": "1m 30s",
                "reconnect_backoff_initial_seconds": 0.2, "tcp_keepalive_seconds": "20s",
                "assign_message_ids": true}"#,
        )
        .unwrap();
        assert_eq!(config.tcp_keepalive, Duration::from_secs(20));
        assert!(config.assign_message_ids);
        assert_eq!(config.max_idle, Duration::from_secs(30));
        assert_eq!(config.pool_get_timeout, Duration::from_millis(2500));
        assert_eq!(config.linger, Duration::from_millis(5));
        assert_eq!(config.retry_initial_backoff, Duration::from_millis(250));
        assert_eq!(config.send_timeout, Duration::from_secs(90));
        assert_eq!(config.reconnect_backoff_initial, Duration::from_millis(200));
        let error = serde_json::from_str::<ProducerConfig>(r#"{"stall_timeout": "10 sekunden"}"#)
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("\"10 sekunden\" is not a duration"),
            "{error}"
        );
    }

    #[test]
    fn a_zero_rate_is_refused_and_unset_means_unlimited() {
        let error = serde_json::from_str::<ProducerConfig>(r#"{"rate_limit_bytes_per_second": 0}"#)
            .unwrap_err();
        assert!(
            error.to_string().contains("must be at least 1 when set"),
            "{error}"
        );
        let config: ProducerConfig =
            serde_json::from_str(r#"{"rate_limit_events_per_second": 400}"#).unwrap();
        assert_eq!(config.rate_limit_events_per_second, NonZeroU32::new(400));
        assert_eq!(config.rate_limit_bytes_per_second, None);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = serde_json::from_str::<ProducerConfig>(r#"{"max_sise": 3}"#).unwrap_err();
        assert!(error.to_string().contains("max_sise"), "{error}");
    }
}
