//! The connection pool: picks a link with room for each batch, opens connections up to `max_size` with at most
//! `client_limit` links each, waits `pool_get_timeout` for capacity, replaces connections past their lifespan
//! before retiring them, closes idle ones down to `min_size`, and reports its gauges.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::ProducerConfig;
use super::connection::{ConnectionContext, PooledConnection, link_address};
use super::error::SendError;
use super::link::Link;

/// How often the pool looks for connections to retire, close or warm up.
const MAINTENANCE_PERIOD: Duration = Duration::from_millis(200);

/// A snapshot of the pool, for metrics and readiness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections taking new work.
    pub ready: usize,
    /// Open connections being replaced (draining).
    pub retiring: usize,
    /// Connections being opened.
    pub opening: usize,
    /// Sender links across connections.
    pub links: usize,
    /// Batches queued or in flight on links.
    pub in_flight: usize,
    /// Callers waiting for capacity.
    pub waiters: usize,
    /// Connections opened since start.
    pub opened_total: u64,
}

#[derive(Default)]
struct State {
    connections: Vec<Arc<PooledConnection>>,
    opening: usize,
}

enum Decision {
    Use(Arc<Link>),
    Attach(Arc<PooledConnection>),
    Open,
    Wait,
}

/// The pool of connections to one Event Hubs namespace.
pub struct Pool {
    config: ProducerConfig,
    context: Arc<ConnectionContext>,
    state: Mutex<State>,
    capacity: Notify,
    waiters: AtomicUsize,
    next_id: AtomicU64,
    stop: CancellationToken,
}

impl Pool {
    /// A pool; its maintenance task runs until `stop` is cancelled.
    pub fn new(
        config: ProducerConfig,
        context: ConnectionContext,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            config,
            context: Arc::new(context),
            state: Mutex::new(State::default()),
            capacity: Notify::new(),
            waiters: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            stop,
        });
        tokio::spawn(Arc::clone(&pool).maintain());
        pool
    }

    /// The shared connection settings.
    pub fn context(&self) -> &ConnectionContext {
        &self.context
    }

    /// A link to `hub` (or one of its partitions) with room for a batch. Waits at most `pool_get_timeout`, and
    /// never past `deadline`, for capacity.
    pub async fn link(
        &self,
        hub: &str,
        partition: Option<&str>,
        deadline: Instant,
    ) -> Result<Arc<Link>, SendError> {
        let address = link_address(hub, partition);
        let get_timeout = self.config.get_timeout();
        let pool_limit = Instant::now() + get_timeout;
        let give_up = pool_limit.min(deadline);
        loop {
            // Registered before deciding, so a release between the decision and the wait is not missed.
            let capacity = self.capacity.notified();
            match self.decide(&address) {
                Decision::Use(link) => return Ok(link),
                Decision::Attach(connection) => {
                    match Box::pin(connection.attach_link(hub, partition)).await {
                        Ok(link) => return Ok(link),
                        Err(error) => {
                            self.capacity.notify_waiters();
                            return Err(error);
                        }
                    }
                }
                Decision::Open => {
                    let opened = self.open_connection().await?;
                    opened.reserve_link();
                    return Box::pin(opened.attach_link(hub, partition)).await;
                }
                Decision::Wait => {
                    self.waiters.fetch_add(1, Ordering::Relaxed);
                    let woke = tokio::time::timeout_at(give_up.into(), capacity).await;
                    self.waiters.fetch_sub(1, Ordering::Relaxed);
                    if woke.is_err() {
                        return Err(if deadline < pool_limit {
                            SendError::DeadlineExceeded {
                                last_error: Some("waiting for a pooled connection".into()),
                            }
                        } else {
                            SendError::PoolTimeout {
                                timeout: get_timeout,
                            }
                        });
                    }
                }
            }
        }
    }

    fn decide(&self, address: &str) -> Decision {
        let mut state = self.state.lock();
        state.connections.retain(|c| !c.is_lost());
        let window = self.context.link_settings.window;
        let live = || state.connections.iter().filter(|c| !c.is_retiring());
        // The least loaded existing link with room.
        let best = live()
            .filter_map(|c| c.link_to(address))
            .min_by_key(|link| link.load());
        if let Some(link) = best.as_ref().filter(|link| link.load() < window) {
            return Decision::Use(Arc::clone(link));
        }
        // A new link on the connection with the fewest links, if one has a free slot.
        if let Some(connection) = live()
            .filter(|c| c.link_to(address).is_none() && c.link_count() < self.config.client_limit)
            .min_by_key(|c| c.link_count())
        {
            connection.reserve_link();
            return Decision::Attach(Arc::clone(connection));
        }
        if state.connections.len() + state.opening < self.config.max_size {
            state.opening += 1;
            return Decision::Open;
        }
        // Full everywhere: queue on the least loaded link (its window bounds what it takes at once).
        match best {
            Some(link) => Decision::Use(link),
            None => Decision::Wait,
        }
    }

    /// Opens a connection within `pool_connection_create_timeout`; the caller has counted it in `opening`.
    async fn open_connection(&self) -> Result<Arc<PooledConnection>, SendError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let timeout = self.config.create_timeout();
        // Boxed, as every slow path of the pool: opening a connection is a large future, and inline it would
        // make every send's future as large (moving those cost a tenth of the gateway's instructions).
        let opened = tokio::time::timeout(
            timeout,
            Box::pin(PooledConnection::open(id, Arc::clone(&self.context))),
        )
        .await
        .unwrap_or_else(|_| {
            Err(SendError::Connection(format!(
                "opening a connection took longer than pool_connection_create_timeout ({timeout:?})"
            )))
        });
        let mut state = self.state.lock();
        state.opening -= 1;
        if let Ok(connection) = &opened {
            state.connections.push(Arc::clone(connection));
        }
        drop(state);
        self.capacity.notify_waiters();
        if let Err(error) = &opened {
            warn!(connection = id, %error, "opening a connection failed");
        }
        opened
    }

    /// Any live connection (opening one if there is none), for management requests.
    pub async fn any_connection(&self) -> Result<Arc<PooledConnection>, SendError> {
        let existing = {
            let mut state = self.state.lock();
            state.connections.retain(|c| !c.is_lost());
            let found = state.connections.iter().find(|c| !c.is_retiring()).cloned();
            if found.is_none() {
                state.opening += 1;
            }
            found
        };
        match existing {
            Some(connection) => Ok(connection),
            None => self.open_connection().await,
        }
    }

    /// The pool's gauges now.
    pub fn stats(&self) -> PoolStats {
        let state = self.state.lock();
        let mut stats = PoolStats {
            opening: state.opening,
            waiters: self.waiters.load(Ordering::Relaxed),
            opened_total: self.next_id.load(Ordering::Relaxed),
            ..PoolStats::default()
        };
        for connection in state.connections.iter().filter(|c| !c.is_lost()) {
            if connection.is_retiring() {
                stats.retiring += 1;
            } else {
                stats.ready += 1;
            }
            stats.links += connection.link_count();
            stats.in_flight += connection.load();
        }
        stats
    }

    /// Closes every connection and waits (at most `grace`) for them to end.
    pub async fn close(&self, grace: Duration) {
        let connections = std::mem::take(&mut self.state.lock().connections);
        for connection in &connections {
            connection.close();
        }
        let all_ended = futures_util::future::join_all(connections.iter().map(|c| c.ended()));
        let _ = tokio::time::timeout(grace, all_ended).await;
    }

    async fn maintain(self: Arc<Self>) {
        let mut tick = tokio::time::interval(MAINTENANCE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stop.cancelled() => return,
            }
            self.maintain_once().await;
        }
    }

    async fn maintain_once(self: &Arc<Self>) {
        let max_idle = self.config.max_idle();
        let (replace, close, warm) = {
            let mut state = self.state.lock();
            state.connections.retain(|c| !c.is_lost());
            let mut close = Vec::new();
            let mut replace = None;
            let mut live = state
                .connections
                .iter()
                .filter(|c| !c.is_retiring())
                .count();
            for connection in &state.connections {
                let idle_since = connection.sweep_links(max_idle);
                if connection.is_retiring() {
                    // Drained: every link has settled what it carried.
                    if idle_since.is_some() {
                        close.push(Arc::clone(connection));
                    }
                    continue;
                }
                if let Some(since) = idle_since
                    && since.elapsed() >= max_idle
                    && live > self.config.min_size
                {
                    live -= 1;
                    connection.retire();
                    close.push(Arc::clone(connection));
                    continue;
                }
                if replace.is_none()
                    && connection.age() >= self.config.max_lifespan()
                    && state.opening == 0
                {
                    replace = Some(Arc::clone(connection));
                }
            }
            if replace.is_some() {
                state.opening += 1; // the replacement may exceed max_size for the overlap
            }
            let warm = live + state.opening < self.config.min_size;
            if warm {
                state.opening += 1;
            }
            (replace, close, warm)
        };
        for connection in close {
            debug!(
                connection = connection.id,
                "closing a drained or idle connection"
            );
            connection.close();
        }
        // Links and connections may have ended since the last tick: let waiting callers look again.
        self.capacity.notify_waiters();
        if warm {
            let pool = Arc::clone(self);
            tokio::spawn(async move {
                let _ = pool.open_connection().await;
            });
        }
        if let Some(old) = replace {
            let pool = Arc::clone(self);
            tokio::spawn(async move {
                // The replacement opens first; only then does the old one stop taking work.
                match pool.open_connection().await {
                    Ok(new) => {
                        info!(
                            old = old.id,
                            new = new.id,
                            "connection past max_lifespan_seconds replaced"
                        );
                        old.retire();
                    }
                    Err(error) => {
                        warn!(connection = old.id, %error, "could not open a replacement; keeping the old connection")
                    }
                }
            });
        }
    }
}
