//! `Limits`: what one call, stream or client may make the gateway spend (the `[limits]` section of its
//! configuration), with their defaults and ranges. Fields are named as in files, relative to the section.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use eventhub_wire::settings::{optional_seconds, rate, seconds};

/// Bounds on calls, streams and clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most events in one `SendEvents` request or `SendStream` message (counted on the wire before decoding).
    pub max_events_per_request: usize,
    /// Most unacknowledged events per `SendStream`; beyond it the gateway stops reading the stream.
    pub max_unacked_per_stream: usize,
    /// Largest `SendEvents` request or `SendStream` message, bytes, as sent and once decompressed (a
    /// `SendEvent` has its own bound: one full event plus overhead).
    pub max_request_bytes: usize,
    /// Most calls (unary or streaming) served at once; more are shed with RESOURCE_EXHAUSTED.
    pub max_concurrent_calls: usize,
    /// Most of those calls from one peer address, so no one client can take every slot.
    pub max_calls_per_client: usize,
    /// Most gRPC connections open at once from one peer address; more are closed as they are accepted.
    pub max_connections_per_client: usize,
    /// Most gRPC connections open at once from all peers; more are closed as they are accepted.
    pub max_connections: usize,
    /// Most connections open at once on the metrics and probes listener; more are closed as they are accepted.
    pub metrics_max_connections: usize,
    /// A gRPC connection that has not finished its TLS handshake and sent the HTTP/2 preface and its first
    /// SETTINGS this long after it was accepted is closed.
    #[serde(rename = "handshake_timeout_seconds", with = "seconds")]
    pub handshake_timeout: Duration,
    /// A request whose headers take longer than this to arrive is dropped with its connection: an HTTP/2
    /// header block (HEADERS and its CONTINUATIONs) on the gRPC listener, the request line and headers on the
    /// metrics listener.
    #[serde(rename = "header_read_timeout_seconds", with = "seconds")]
    pub header_read_timeout: Duration,
    /// A gRPC connection with no call open for this long is closed (its client reconnects when it needs to).
    #[serde(rename = "connection_idle_timeout_seconds", with = "seconds")]
    pub connection_idle_timeout: Duration,
    /// How long a gRPC connection may live, ±10% drawn per connection (so connections opened together do not
    /// all reconnect together); then it gets an HTTP/2 GOAWAY: calls in flight finish, new calls go to a new
    /// connection, which a Service or L4 balancer may send to another replica (replicas added by an autoscaler
    /// otherwise get no traffic from clients already connected). A `SendStream` on it stops reading, answers
    /// every event it read, and ends UNAVAILABLE CONNECTION_AGED (retry at once). Off when unset, the default,
    /// as in gRPC's own servers: it costs every client a reconnect and every stream a retry, and behind an L7
    /// proxy (Envoy, a mesh) or with client-side balancing over a headless Service it buys nothing.
    #[serde(rename = "max_connection_age_seconds", with = "optional_seconds")]
    pub max_connection_age: Option<Duration>,
    /// After its GOAWAY, how long an aged connection may still carry its calls before it is closed under them
    /// (a client that keeps a call open, or reads no answers, cannot pin its connection). At least
    /// `producer.send_timeout`, so every event read before the age is answered before the close.
    #[serde(rename = "max_connection_age_grace_seconds", with = "seconds")]
    pub max_connection_age_grace: Duration,
    /// Most encoded event bytes one peer address may have buffered or in flight in the producer (its share of
    /// `producer.max_buffered_bytes`); beyond it its events wait, until their deadline, for its own to finish.
    pub max_buffered_bytes_per_client: u64,
    /// A `SendStream` that has read nothing and has nothing unacknowledged for this long is ended
    /// (UNAVAILABLE, STREAM_IDLE), freeing its call slot.
    #[serde(rename = "stream_idle_timeout_seconds", with = "seconds")]
    pub stream_idle_timeout: Duration,
    /// Most calls open at once on one HTTP/2 connection; a client's further calls wait on its side. Without
    /// it, a client faster than the gateway makes it hold every call it cannot even refuse yet.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of one call, bytes: what a client may send beyond what the gateway read.
    pub http2_stream_window_bytes: u32,
    /// How often an HTTP/2 connection is pinged; a peer that does not answer within
    /// `http2_keepalive_timeout_seconds` is gone, and its connection and every call it held are freed.
    #[serde(rename = "http2_keepalive_interval_seconds", with = "seconds")]
    pub http2_keepalive_interval: Duration,
    /// How long a peer has to answer a keepalive ping.
    #[serde(rename = "http2_keepalive_timeout_seconds", with = "seconds")]
    pub http2_keepalive_timeout: Duration,
    /// Most streams a client may open and reset before the gateway accepted them, per connection; beyond them
    /// the connection is closed with GOAWAY (the HTTP/2 rapid-reset attack, CVE-2023-44487).
    pub http2_max_pending_accept_reset_streams: usize,
    /// Largest header list (names, values and 32 bytes per entry, as HPACK counts) of one call, bytes;
    /// a larger one is refused.
    pub http2_max_header_list_bytes: u32,
    /// HTTP/2 flow-control window of one connection, bytes. h2 drops a connection whose unread small DATA
    /// frames cost more than half of it (its flood guard), so it must stay well above the stream window.
    pub http2_connection_window_bytes: u32,
    /// Events per second across all clients; unlimited when unset.
    #[serde(with = "rate")]
    pub global_events_per_second: Option<NonZeroU32>,
    /// Events per second per client (`x-client-id`, else the peer address); unlimited when unset.
    #[serde(with = "rate")]
    pub client_events_per_second: Option<NonZeroU32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_events_per_request: 1000,
            max_unacked_per_stream: 10_000,
            max_request_bytes: 16 * 1024 * 1024,
            max_concurrent_calls: 10_000,
            max_calls_per_client: 1000,
            max_connections_per_client: 256,
            max_connections: 4096,
            metrics_max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(300),
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(60),
            max_buffered_bytes_per_client: 64 * 1024 * 1024,
            stream_idle_timeout: Duration::from_secs(300),
            http2_max_concurrent_streams: 1000,
            http2_stream_window_bytes: 128 * 1024,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            http2_max_pending_accept_reset_streams: 20,
            http2_max_header_list_bytes: 16 * 1024,
            http2_connection_window_bytes: 32 * 1024 * 1024,
            global_events_per_second: None,
            client_events_per_second: None,
        }
    }
}

impl Limits {
    /// Checks every bound; the error names the first one out of range, relative to the section
    /// (`max_request_bytes`; the loader says `limits.max_request_bytes`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_requests()?;
        self.validate_clients()?;
        self.validate_connections()?;
        self.validate_http2()
    }

    /// What one request or stream may hold.
    fn validate_requests(&self) -> Result<(), ConfigError> {
        if !(1..=100_000).contains(&self.max_events_per_request) {
            return invalid("max_events_per_request", "must be between 1 and 100000");
        }
        if !(1..=1_000_000).contains(&self.max_unacked_per_stream) {
            return invalid("max_unacked_per_stream", "must be between 1 and 1000000");
        }
        if !(1024 * 1024 + 64 * 1024..=1024 * 1024 * 1024).contains(&self.max_request_bytes) {
            return invalid(
                "max_request_bytes",
                "must be between 1088 KiB (a full 1 MiB event plus overhead) and 1 GiB",
            );
        }
        if self.stream_idle_timeout.is_zero()
            || self.stream_idle_timeout > Duration::from_secs(86_400)
        {
            return invalid(
                "stream_idle_timeout_seconds",
                "must be above 0 and at most 86400 s (a day)",
            );
        }
        Ok(())
    }

    /// What all clients together, and each, may hold.
    fn validate_clients(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("max_concurrent_calls", self.max_concurrent_calls),
            ("max_calls_per_client", self.max_calls_per_client),
            (
                "max_connections_per_client",
                self.max_connections_per_client,
            ),
        ] {
            if value == 0 {
                return invalid(field, "must be at least 1");
            }
        }
        if !(1024 * 1024..=u32::MAX as u64).contains(&self.max_buffered_bytes_per_client) {
            return invalid(
                "max_buffered_bytes_per_client",
                "must be between 1 MiB (one full event) and 4 GiB",
            );
        }
        Ok(())
    }

    /// What the listeners hold: connections and how long each may take or sit idle.
    fn validate_connections(&self) -> Result<(), ConfigError> {
        if !(1..=1_000_000).contains(&self.max_connections) {
            return invalid("max_connections", "must be between 1 and 1000000");
        }
        if self.max_connections_per_client > self.max_connections {
            return Err(ConfigError::invalid(
                "max_connections_per_client",
                format!("must not exceed max_connections ({})", self.max_connections),
            ));
        }
        if !(1..=10_000).contains(&self.metrics_max_connections) {
            return invalid("metrics_max_connections", "must be between 1 and 10000");
        }
        let second = Duration::from_secs(1);
        for (field, value, at_most, range) in [
            (
                "handshake_timeout_seconds",
                self.handshake_timeout,
                Duration::from_secs(300),
                "must be between 0.1 s and 300 s",
            ),
            (
                "header_read_timeout_seconds",
                self.header_read_timeout,
                Duration::from_secs(300),
                "must be between 0.1 s and 300 s",
            ),
            (
                "connection_idle_timeout_seconds",
                self.connection_idle_timeout,
                Duration::from_secs(86_400),
                "must be between 0.1 s and 86400 s (a day)",
            ),
        ] {
            if !(second / 10..=at_most).contains(&value) {
                return invalid(field, range);
            }
        }
        let ages = second..=Duration::from_secs(30 * 86_400);
        if self
            .max_connection_age
            .is_some_and(|age| !ages.contains(&age))
        {
            return invalid(
                "max_connection_age_seconds",
                "must be between 1 s and 2592000 s (30 days), or unset for no age",
            );
        }
        if !(second..=Duration::from_secs(86_400)).contains(&self.max_connection_age_grace) {
            return invalid(
                "max_connection_age_grace_seconds",
                "must be between 1 s and 86400 s (a day)",
            );
        }
        Ok(())
    }

    /// HTTP/2 streams and flow-control windows.
    fn validate_http2(&self) -> Result<(), ConfigError> {
        if !(1..=1_000_000).contains(&self.http2_max_concurrent_streams) {
            return invalid(
                "http2_max_concurrent_streams",
                "must be between 1 and 1000000",
            );
        }
        if !(64 * 1024..=16 * 1024 * 1024).contains(&self.http2_stream_window_bytes) {
            return invalid(
                "http2_stream_window_bytes",
                "must be between 64 KiB and 16 MiB",
            );
        }
        // Small messages cost h2's flood guard up to ~25 times their size while unread: a stalled stream
        // must fit many times in half the connection window.
        if self.http2_connection_window_bytes / 64 < self.http2_stream_window_bytes
            || self.http2_connection_window_bytes > 1024 * 1024 * 1024
        {
            return invalid(
                "http2_connection_window_bytes",
                "must be at least 64 times http2_stream_window_bytes and at most 1 GiB",
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400))
            .contains(&self.http2_keepalive_interval)
        {
            return invalid(
                "http2_keepalive_interval_seconds",
                "must be between 1 s and 86400 s (a day)",
            );
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(600))
            .contains(&self.http2_keepalive_timeout)
        {
            return invalid(
                "http2_keepalive_timeout_seconds",
                "must be between 0.1 s and 600 s",
            );
        }
        if !(1..=10_000).contains(&self.http2_max_pending_accept_reset_streams) {
            return invalid(
                "http2_max_pending_accept_reset_streams",
                "must be between 1 and 10000",
            );
        }
        if !(4 * 1024..=1024 * 1024).contains(&self.http2_max_header_list_bytes) {
            return invalid(
                "http2_max_header_list_bytes",
                "must be between 4 KiB and 1 MiB",
            );
        }
        Ok(())
    }
}

fn invalid(field: &str, problem: &str) -> Result<(), ConfigError> {
    Err(ConfigError::invalid(field, problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn out_of_range_bounds_name_their_key() {
        let cases = [
            (
                Limits {
                    stream_idle_timeout: Duration::ZERO,
                    ..Limits::default()
                },
                "stream_idle_timeout_seconds",
            ),
            (
                Limits {
                    max_connections_per_client: 0,
                    ..Limits::default()
                },
                "max_connections_per_client",
            ),
            (
                Limits {
                    http2_stream_window_bytes: 1024,
                    ..Limits::default()
                },
                "http2_stream_window_bytes",
            ),
            (
                Limits {
                    max_connections: 100,
                    ..Limits::default()
                },
                "max_connections_per_client",
            ),
            (
                Limits {
                    handshake_timeout: Duration::ZERO,
                    ..Limits::default()
                },
                "handshake_timeout_seconds",
            ),
            (
                Limits {
                    connection_idle_timeout: Duration::from_secs(100_000),
                    ..Limits::default()
                },
                "connection_idle_timeout_seconds",
            ),
            (
                Limits {
                    max_connection_age: Some(Duration::from_millis(500)),
                    ..Limits::default()
                },
                "max_connection_age_seconds",
            ),
            (
                Limits {
                    max_connection_age: Some(Duration::from_secs(31 * 86_400)),
                    ..Limits::default()
                },
                "max_connection_age_seconds",
            ),
            (
                Limits {
                    max_connection_age_grace: Duration::ZERO,
                    ..Limits::default()
                },
                "max_connection_age_grace_seconds",
            ),
            (
                Limits {
                    http2_max_pending_accept_reset_streams: 0,
                    ..Limits::default()
                },
                "http2_max_pending_accept_reset_streams",
            ),
            (
                Limits {
                    http2_max_header_list_bytes: 100,
                    ..Limits::default()
                },
                "http2_max_header_list_bytes",
            ),
        ];
        for (limits, expected) in cases {
            match limits.validate() {
                Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, expected),
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_idle_timeout_reads_humantime_or_seconds_under_its_documented_key() {
        for (value, expected) in [
            ("\"90s\"", Duration::from_secs(90)),
            ("\"250ms\"", Duration::from_millis(250)),
            ("0.5", Duration::from_millis(500)),
        ] {
            let limits: Limits =
                serde_json::from_str(&format!(r#"{{"stream_idle_timeout_seconds": {value}}}"#))
                    .unwrap();
            assert_eq!(limits.stream_idle_timeout, expected, "{value}");
        }
    }
}
