//! `Limits`: what one call, stream or client may make the gateway spend (the `[limits]` section of its
//! configuration), with their defaults and ranges. Fields are named as in files, relative to the section.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use eventhub_wire::settings::{rate, seconds};

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
            max_buffered_bytes_per_client: 64 * 1024 * 1024,
            stream_idle_timeout: Duration::from_secs(300),
            http2_max_concurrent_streams: 1000,
            http2_stream_window_bytes: 128 * 1024,
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
