//! The producer's gauges and totals (pool, buffers, routes, connection attempts, tokens), reported to a
//! metrics scrape.

use metrics::{counter, gauge};

use super::{ConnectStage, Producer};
use eventhub_telemetry::metrics::{
    BATCHES_IN_FLIGHT, BUFFERED_BYTES, CONNECTION_ATTEMPTS, CONNECTION_FAILURES,
    CONNECTIONS_OPENED, CONNECTIONS_STALLED, POOL_CONNECTIONS, POOL_LINKS, POOL_WAITERS,
    PRODUCER_RATE_LIMITED_BATCHES, PRODUCER_ROUTES, Report, TOKEN_REFRESH_FAILURES,
    TOKEN_REFRESHES,
};

impl Report for Producer {
    fn report(&self) {
        let stats = self.stats();
        let pool = stats.pool;
        gauge!(POOL_CONNECTIONS, "state" => "ready").set(pool.ready as f64);
        gauge!(POOL_CONNECTIONS, "state" => "retiring").set(pool.retiring as f64);
        gauge!(POOL_CONNECTIONS, "state" => "opening").set(pool.opening as f64);
        gauge!(POOL_LINKS).set(pool.links as f64);
        gauge!(BATCHES_IN_FLIGHT).set(pool.in_flight as f64);
        gauge!(POOL_WAITERS).set(pool.waiters as f64);
        gauge!(BUFFERED_BYTES).set(stats.buffered_bytes as f64);
        gauge!(PRODUCER_ROUTES).set(stats.routes as f64);
        counter!(CONNECTIONS_OPENED).absolute(pool.opened_total);
        counter!(CONNECTION_ATTEMPTS).absolute(pool.connect_attempts);
        counter!(CONNECTIONS_STALLED).absolute(pool.stalled_total);
        for stage in ConnectStage::ALL {
            counter!(CONNECTION_FAILURES, "reason" => stage.as_str())
                .absolute(pool.connect_failures_at(stage));
        }
        counter!(TOKEN_REFRESHES).absolute(stats.token_refreshes);
        counter!(TOKEN_REFRESH_FAILURES).absolute(stats.token_failures);
        counter!(PRODUCER_RATE_LIMITED_BATCHES).absolute(stats.rate_limited_batches);
    }
}
