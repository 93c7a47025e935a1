//! The connection pool: picks a link with room for each batch, opens connections up to `max_size` with at most
//! `client_limit` links each, waits `pool_get_timeout` for capacity, replaces connections past their lifespan
//! before retiring them, closes idle ones down to `min_size`, backs off (exponentially, with jitter) from an
//! Event Hubs it cannot reach, logs the outage's start, reminders and end, and reports its gauges and counts.
//! Each new connection is warmed up (every configured hub authorized, a sender link attached) before it takes
//! work, open and warm-up together within `pool_connection_create_timeout`: an attempt whose peer stops
//! answering at any step fails, naming the step, and is retried with backoff; the maintenance task retries
//! warm-ups that were refused and declares dead a connection that stalls (work awaiting an answer, nothing
//! received for `stall_timeout`). The pool is ready when one connection is.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::ProducerConfig;
use super::connection::{
    ConnectError, ConnectStage, ConnectionContext, PooledConnection, link_address,
};
use super::error::SendError;
use super::link::Link;
use super::transport::Progress;

/// How often the pool looks for connections to retire, close or warm up.
const MAINTENANCE_PERIOD: Duration = Duration::from_millis(200);

/// While Event Hubs stays unreachable, how often the warning is repeated (each failed attempt is logged at
/// debug level only).
const OUTAGE_REMINDER_PERIOD: Duration = Duration::from_secs(60);

/// How long after a failed warm-up (a refused token or attach) the next one starts.
const WARM_UP_RETRY: Duration = Duration::from_secs(5);

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
    /// Connections that opened since start (attempts that failed are not counted here).
    pub opened_total: u64,
    /// Connection attempts since start, whatever their outcome.
    pub connect_attempts: u64,
    /// Failed connection attempts since start, by [`ConnectStage::index`].
    pub connect_failures: [u64; ConnectStage::ALL.len()],
    /// Connections declared dead since start because they stalled (`stall_timeout`).
    pub stalled_total: u64,
}

impl PoolStats {
    /// Failed connection attempts that failed at `stage`.
    pub fn connect_failures_at(&self, stage: ConnectStage) -> u64 {
        self.connect_failures[stage.index()]
    }

    /// Failed connection attempts, every stage together.
    pub fn connect_failures_total(&self) -> u64 {
        self.connect_failures.iter().sum()
    }
}

/// Exponential backoff with full jitter: after the n-th consecutive failure the pause is uniform in
/// `[0, min(max, initial * 2^(n-1))]`, so many gateways that lost the same namespace do not retry in step.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and growing up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The longest pause the next failure can bring.
    pub fn ceiling(&self) -> Duration {
        // 2^30 times any initial pause is past every sane maximum: the shift stays small.
        self.initial
            .saturating_mul(1 << self.failures.min(30))
            .min(self.max)
    }

    /// Counts a failure and draws the pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(rand::rng().random::<f64>())
    }

    /// Starts over (a connection opened).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// An unbroken run of failed connection attempts.
#[derive(Clone, Debug)]
struct Outage {
    since: tokio::time::Instant,
    failed_attempts: u64,
    next_attempt: tokio::time::Instant,
    last_warning: tokio::time::Instant,
    last_error: ConnectError,
}

/// What a connection attempt's outcome changed, for the log.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// The first failure after a success (or at start): Event Hubs became unreachable.
    Down,
    /// One more failure; `remind` when the outage has gone unmentioned for a reminder period.
    StillDown {
        /// Whether to repeat the warning now.
        remind: bool,
        /// How long it has been unreachable.
        down_for: Duration,
        /// Failed attempts in this outage.
        failed_attempts: u64,
    },
    /// A connection opened after an outage.
    Recovered {
        /// How long it was unreachable.
        down_for: Duration,
        /// Failed attempts in the outage.
        failed_attempts: u64,
    },
    /// A connection opened, as usual.
    Opened,
}

/// Whether a connection attempt may start now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Yes.
    Open,
    /// Not before this instant (backing off), or, when `None`, not before the attempt under way ends.
    Closed(Option<tokio::time::Instant>),
}

/// The reconnect policy: while attempts succeed any number may run at once (up to `max_size`); after a
/// failure one attempt at a time, each after a backoff pause, until one succeeds.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Backoff,
    outage: Option<Outage>,
    reminder_period: Duration,
}

impl Reconnect {
    /// A policy with this backoff, repeating the outage's warning every `reminder_period`.
    pub fn new(backoff: Backoff, reminder_period: Duration) -> Self {
        Self {
            backoff,
            outage: None,
            reminder_period,
        }
    }

    /// Whether an attempt may start at `now`, with `opening` attempts under way.
    pub fn gate(&self, now: tokio::time::Instant, opening: usize) -> Gate {
        match &self.outage {
            None => Gate::Open,
            Some(_) if opening > 0 => Gate::Closed(None),
            Some(outage) if now < outage.next_attempt => Gate::Closed(Some(outage.next_attempt)),
            Some(_) => Gate::Open,
        }
    }

    /// The error of the last failed attempt, while Event Hubs is unreachable.
    pub fn last_error(&self) -> Option<&ConnectError> {
        self.outage.as_ref().map(|outage| &outage.last_error)
    }

    /// When the next attempt may start, while backing off.
    pub fn next_attempt(&self) -> Option<tokio::time::Instant> {
        self.outage.as_ref().map(|outage| outage.next_attempt)
    }

    /// Records an attempt started at `started` that failed at `now`.
    pub fn failed(
        &mut self,
        error: ConnectError,
        started: tokio::time::Instant,
        now: tokio::time::Instant,
    ) -> Transition {
        let Some(outage) = &mut self.outage else {
            let pause = self.backoff.next_pause();
            self.outage = Some(Outage {
                since: now,
                failed_attempts: 1,
                next_attempt: now + pause,
                last_warning: now,
                last_error: error,
            });
            return Transition::Down;
        };
        outage.failed_attempts += 1;
        outage.last_error = error;
        // Attempts that were already under way when the outage began (opened together while all was well)
        // do not each push the next attempt further out.
        if started >= outage.since {
            outage.next_attempt = now + self.backoff.next_pause();
        }
        let remind = now.duration_since(outage.last_warning) >= self.reminder_period;
        if remind {
            outage.last_warning = now;
        }
        Transition::StillDown {
            remind,
            down_for: now.duration_since(outage.since),
            failed_attempts: outage.failed_attempts,
        }
    }

    /// Records an attempt that opened a connection at `now`.
    pub fn opened(&mut self, now: tokio::time::Instant) -> Transition {
        self.backoff.reset();
        match self.outage.take() {
            Some(outage) => Transition::Recovered {
                down_for: now.duration_since(outage.since),
                failed_attempts: outage.failed_attempts,
            },
            None => Transition::Opened,
        }
    }
}

struct State {
    connections: Vec<Arc<PooledConnection>>,
    opening: usize,
    /// The steps of the attempts under way, oldest first.
    attempts: Vec<Arc<Progress>>,
    reconnect: Reconnect,
}

impl State {
    /// Counts an attempt in `opening` if the reconnect policy lets one start now.
    fn try_start_attempt(&mut self) -> Gate {
        let gate = self
            .reconnect
            .gate(tokio::time::Instant::now(), self.opening);
        if gate == Gate::Open {
            self.opening += 1;
        }
        gate
    }
}

enum Decision {
    Use(Arc<Link>),
    Attach(Arc<PooledConnection>),
    Open,
    /// Wait for capacity, or (backing off) until the next attempt may start.
    Wait(Option<tokio::time::Instant>),
}

/// Connection attempts and their outcomes since start.
#[derive(Default)]
struct ConnectCounts {
    attempts: AtomicU64,
    opened: AtomicU64,
    failures: [AtomicU64; ConnectStage::ALL.len()],
    stalled: AtomicU64,
}

/// The pool of connections to one Event Hubs namespace.
pub struct Pool {
    config: ProducerConfig,
    context: Arc<ConnectionContext>,
    state: Mutex<State>,
    capacity: Notify,
    waiters: AtomicUsize,
    next_id: AtomicU64,
    counts: ConnectCounts,
    stop: CancellationToken,
    /// The hubs every connection warms up and readiness requires.
    hubs: parking_lot::RwLock<Arc<[String]>>,
}

impl Pool {
    /// A pool; its maintenance task runs until `stop` is cancelled.
    pub fn new(
        config: ProducerConfig,
        context: ConnectionContext,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let backoff = Backoff::new(
            config.reconnect_backoff_initial,
            config.reconnect_backoff_max,
        );
        let pool = Arc::new(Self {
            config,
            context: Arc::new(context),
            state: Mutex::new(State {
                connections: Vec::new(),
                opening: 0,
                attempts: Vec::new(),
                reconnect: Reconnect::new(backoff, OUTAGE_REMINDER_PERIOD),
            }),
            capacity: Notify::new(),
            waiters: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            counts: ConnectCounts::default(),
            stop,
            hubs: parking_lot::RwLock::new(Arc::from(Vec::new())),
        });
        tokio::spawn(Arc::clone(&pool).maintain());
        pool
    }

    /// Sets the hubs each connection warms up (authorizes and attaches a sender link to) and that readiness
    /// requires; connections already open warm up at the next maintenance tick.
    pub fn set_hubs(&self, hubs: &[String]) {
        *self.hubs.write() = Arc::from(hubs.to_vec());
    }

    /// Ready when one live connection is ready ([`PooledConnection::readiness`]); otherwise why not: what keeps
    /// the connections from being ready, or why none is open.
    pub fn readiness(&self) -> Result<(), String> {
        let hubs = Arc::clone(&self.hubs.read());
        let state = self.state.lock();
        let mut reason = None;
        for connection in state
            .connections
            .iter()
            .filter(|c| !c.is_lost() && !c.is_retiring())
        {
            match connection.readiness(&hubs) {
                Ok(()) => return Ok(()),
                Err(why) => {
                    reason.get_or_insert(why);
                }
            }
        }
        if let Some(reason) = reason {
            return Err(reason);
        }
        if let Some(error) = state.reconnect.last_error() {
            return Err(error.to_string());
        }
        // Without the time it has taken: readiness is logged at each change of its wording.
        Err(state.attempts.first().map_or_else(
            || "no connection open".into(),
            |attempt| format!("connecting to {}: at {}", self.host(), attempt.describe()),
        ))
    }

    /// `host:port` of Event Hubs.
    fn host(&self) -> String {
        format!(
            "{}:{}",
            self.context.endpoint.host, self.context.endpoint.port
        )
    }

    /// A link to `hub` (or one of its partitions) with room for a batch. Waits at most `pool_get_timeout`, and
    /// never past `deadline`, for capacity (or for the next connection attempt, while backing off).
    pub async fn link(
        self: &Arc<Self>,
        hub: &str,
        partition: Option<&str>,
        deadline: Instant,
    ) -> Result<Arc<Link>, SendError> {
        let address = link_address(hub, partition);
        let get_timeout = self.config.pool_get_timeout;
        let pool_limit = Instant::now() + get_timeout;
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
                Decision::Wait(retry_at) => {
                    self.wait(capacity, retry_at, deadline, pool_limit).await?;
                }
            }
        }
    }

    /// Waits for `capacity` or until `retry_at`; past `deadline` or `pool_limit`, fails with the reason.
    async fn wait(
        &self,
        capacity: tokio::sync::futures::Notified<'_>,
        retry_at: Option<tokio::time::Instant>,
        deadline: Instant,
        pool_limit: Instant,
    ) -> Result<(), SendError> {
        let give_up = tokio::time::Instant::from_std(pool_limit.min(deadline));
        let until = retry_at.map_or(give_up, |at| at.min(give_up));
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let woke = tokio::time::timeout_at(until, capacity).await;
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        if woke.is_ok() || until < give_up {
            return Ok(());
        }
        // The real reason: what the last connection attempt met, when Event Hubs is unreachable.
        let unreachable = self.state.lock().reconnect.last_error().cloned();
        Err(match unreachable {
            Some(error) if deadline < pool_limit => SendError::DeadlineExceeded {
                last_error: Some(error.to_string()),
            },
            Some(error) => error.into(),
            None if deadline < pool_limit => SendError::DeadlineExceeded {
                last_error: Some("waiting for a pooled connection".into()),
            },
            None => SendError::PoolTimeout {
                timeout: self.config.pool_get_timeout,
            },
        })
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
        let mut retry_at = None;
        if state.connections.len() + state.opening < self.config.max_size {
            match state.try_start_attempt() {
                Gate::Open => return Decision::Open,
                Gate::Closed(at) => retry_at = at,
            }
        }
        // Full everywhere: queue on the least loaded link (its window bounds what it takes at once).
        match best {
            Some(link) => Decision::Use(link),
            None => Decision::Wait(retry_at),
        }
    }

    /// Opens a connection within `pool_connection_create_timeout`; the caller has counted it in `opening`. The
    /// attempt runs in its own task, so a caller that stops waiting (its deadline) leaves its outcome recorded.
    async fn open_connection(self: &Arc<Self>) -> Result<Arc<PooledConnection>, SendError> {
        let pool = Arc::clone(self);
        let attempt = tokio::spawn(async move { pool.attempt().await });
        match attempt.await {
            Ok(opened) => opened.map_err(SendError::from),
            Err(_) => Err(SendError::Closed), // the runtime is shutting down
        }
    }

    async fn attempt(&self) -> Result<Arc<PooledConnection>, ConnectError> {
        let started = tokio::time::Instant::now();
        self.counts.attempts.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let timeout = self.config.pool_connection_create_timeout;
        let endpoint = &self.context.endpoint;
        let host = format!("{}:{}", endpoint.host, endpoint.port);
        let progress = Arc::new(Progress::new());
        self.state.lock().attempts.push(Arc::clone(&progress));
        let hubs = Arc::clone(&self.hubs.read());
        let client_limit = self.config.client_limit;
        let opening = async {
            let connection =
                PooledConnection::open(id, Arc::clone(&self.context), &progress).await?;
            // Ended unless it is kept: a failed attempt, or one cut short by its timeout, leaves no connection behind.
            let mut guard = EndUnlessKept(Some(Arc::clone(&connection)));
            // Proven before it takes work, so a replacement is ready before the old connection retires. A
            // refusal does not fail the attempt (sends then get the service's own answer, PERMISSION_DENIED);
            // a peer that stops answering does, as it would have at any earlier step.
            let warm = connection.warm_up(&hubs, client_limit, Some(&progress));
            if let Err(error) = Box::pin(warm).await {
                return Err(ConnectError {
                    host: host.clone(),
                    stage: ConnectStage::Amqp,
                    reason: format!("at {}: {error}", progress.step()),
                });
            }
            guard.0 = None;
            Ok(connection)
        };
        // Boxed, as every slow path of the pool: opening a connection is a large future. One bound for every
        // step, warm-up included.
        let opened = tokio::time::timeout(timeout, Box::pin(opening))
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError {
                    host: host.clone(),
                    stage: ConnectStage::Timeout,
                    reason: format!(
                        "no answer within pool_connection_create_timeout ({timeout:?}) at {}",
                        progress.describe()
                    ),
                })
            });
        let now = tokio::time::Instant::now();
        let mut state = self.state.lock();
        state.opening -= 1;
        state
            .attempts
            .retain(|attempt| !Arc::ptr_eq(attempt, &progress));
        let transition = match &opened {
            Ok(connection) => {
                state.connections.push(Arc::clone(connection));
                self.counts.opened.fetch_add(1, Ordering::Relaxed);
                state.reconnect.opened(now)
            }
            Err(error) => {
                self.counts.failures[error.stage.index()].fetch_add(1, Ordering::Relaxed);
                state.reconnect.failed(error.clone(), started, now)
            }
        };
        let next_attempt = state.reconnect.next_attempt();
        drop(state);
        self.capacity.notify_waiters();
        let retry_in = next_attempt.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        let max_pause = self.config.reconnect_backoff_max;
        // State changes are logged, not every attempt: an unreachable namespace must not flood the log.
        match (&opened, transition) {
            (Err(error), Transition::Down) => warn!(
                %host, stage = error.stage.as_str(), %error, ?retry_in, ?max_pause,
                "could not connect to Event Hubs; retrying with backoff"
            ),
            (
                Err(error),
                Transition::StillDown {
                    remind: true,
                    down_for,
                    failed_attempts,
                },
            ) => warn!(
                %host, stage = error.stage.as_str(), %error, ?down_for, failed_attempts, ?retry_in,
                "still cannot connect to Event Hubs"
            ),
            (Err(error), _) => debug!(
                connection = id, %host, stage = error.stage.as_str(), %error, ?retry_in,
                "connection attempt failed"
            ),
            (
                Ok(_),
                Transition::Recovered {
                    down_for,
                    failed_attempts,
                },
            ) => info!(
                connection = id, %host, ?down_for, failed_attempts,
                "connected to Event Hubs again"
            ),
            (Ok(_), _) => {}
        }
        opened
    }

    /// Any live connection (opening one if there is none), for management requests; waits as [`Self::link`].
    pub async fn any_connection(
        self: &Arc<Self>,
        deadline: Instant,
    ) -> Result<Arc<PooledConnection>, SendError> {
        let pool_limit = Instant::now() + self.config.pool_get_timeout;
        loop {
            let capacity = self.capacity.notified();
            let retry_at = {
                let mut state = self.state.lock();
                state.connections.retain(|c| !c.is_lost());
                if let Some(found) = state.connections.iter().find(|c| !c.is_retiring()) {
                    return Ok(Arc::clone(found));
                }
                match state.try_start_attempt() {
                    Gate::Open => None,
                    Gate::Closed(at) => Some(at),
                }
            };
            match retry_at {
                None => return self.open_connection().await,
                Some(at) => self.wait(capacity, at, deadline, pool_limit).await?,
            }
        }
    }

    /// Why no connection can be had, while none is open: the last failed attempt's error, or what the attempt
    /// under way is waiting for (a send whose deadline passes meanwhile says so).
    pub fn unreachable(&self) -> Option<String> {
        let state = self.state.lock();
        if state
            .connections
            .iter()
            .any(|c| !c.is_lost() && !c.is_retiring())
        {
            return None;
        }
        if let Some(error) = state.reconnect.last_error() {
            return Some(error.to_string());
        }
        state.attempts.first().map(|attempt| {
            format!(
                "still connecting to {} after {:.1} s: at {}",
                self.host(),
                attempt.elapsed().as_secs_f64(),
                attempt.describe()
            )
        })
    }

    /// The pool's gauges now.
    pub fn stats(&self) -> PoolStats {
        let state = self.state.lock();
        let mut stats = PoolStats {
            opening: state.opening,
            waiters: self.waiters.load(Ordering::Relaxed),
            opened_total: self.counts.opened.load(Ordering::Relaxed),
            connect_attempts: self.counts.attempts.load(Ordering::Relaxed),
            connect_failures: std::array::from_fn(|index| {
                self.counts.failures[index].load(Ordering::Relaxed)
            }),
            stalled_total: self.counts.stalled.load(Ordering::Relaxed),
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
        let max_idle = self.config.max_idle;
        let stall_timeout = self.config.stall_timeout;
        let hubs = Arc::clone(&self.hubs.read());
        let (replace, close, warm, warm_ups) = {
            let mut state = self.state.lock();
            for connection in &state.connections {
                if connection.is_lost() {
                    continue;
                }
                if let Some(why) = connection.stalled(stall_timeout) {
                    warn!(connection = connection.id, %why, "connection stalled; declaring it dead and replacing it");
                    self.counts.stalled.fetch_add(1, Ordering::Relaxed);
                    connection.declare_dead();
                }
            }
            state.connections.retain(|c| !c.is_lost());
            let warm_ups: Vec<_> = state
                .connections
                .iter()
                .filter(|c| c.wants_warm_up(&hubs, WARM_UP_RETRY))
                .cloned()
                .collect();
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
                    && connection.age() >= self.config.max_lifespan
                    && state.opening == 0
                {
                    replace = Some(Arc::clone(connection));
                }
            }
            // The replacement may exceed max_size for the overlap; like warming up, it waits out any backoff.
            if replace.is_some() && state.try_start_attempt() != Gate::Open {
                replace = None;
            }
            let warm = live + state.opening < self.config.min_size
                && state.try_start_attempt() == Gate::Open;
            (replace, close, warm, warm_ups)
        };
        for connection in warm_ups {
            let hubs = Arc::clone(&hubs);
            let client_limit = self.config.client_limit;
            // Its refusals and silences are recorded on the connection (readiness says them); a silent peer is
            // the stall check's to declare dead.
            tokio::spawn(async move {
                let _ = connection.warm_up(&hubs, client_limit, None).await;
            });
        }
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
                        // The failure itself is logged (as a state change) where the attempt ends.
                        debug!(connection = old.id, %error, "could not open a replacement; keeping the old connection")
                    }
                }
            });
        }
    }
}

/// Ends the connection it holds when dropped, unless emptied first: the attempt failed for want of an answer,
/// so without a closing handshake.
struct EndUnlessKept(Option<Arc<PooledConnection>>);

impl Drop for EndUnlessKept {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            connection.declare_dead();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant as TokioInstant;

    const INITIAL: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(2);

    fn refused() -> ConnectError {
        ConnectError {
            host: "127.0.0.1:5672".into(),
            stage: ConnectStage::Tcp,
            reason: "Connection refused".into(),
        }
    }

    #[test]
    fn ceilings_double_per_failure_up_to_the_cap_and_start_over_after_a_success() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(backoff.ceiling().as_millis());
            backoff.next_pause();
        }
        assert_eq!(ceilings, [200, 400, 800, 1600, 2000, 2000, 2000, 2000]);
        for _ in 0..100 {
            backoff.next_pause(); // far past the shift that would overflow
        }
        assert_eq!(backoff.ceiling(), MAX);
        backoff.reset();
        assert_eq!(backoff.ceiling(), INITIAL);
    }

    #[test]
    fn pauses_are_jittered_over_the_whole_range_below_the_ceiling() {
        let mut pauses = Vec::new();
        for _ in 0..1000 {
            let mut backoff = Backoff::new(INITIAL, MAX);
            for _ in 0..3 {
                backoff.next_pause();
            }
            assert_eq!(backoff.ceiling(), Duration::from_millis(1600));
            pauses.push(backoff.next_pause());
        }
        let ceiling = Duration::from_millis(1600);
        assert!(pauses.iter().all(|pause| *pause <= ceiling));
        // Full jitter: draws reach both ends of [0, ceiling] (each bound fails with odds of 0.75^1000).
        assert!(pauses.iter().any(|pause| *pause < ceiling / 4));
        assert!(pauses.iter().any(|pause| *pause > ceiling * 3 / 4));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_wait_out_a_growing_capped_pause_one_at_a_time_and_reset_on_success() {
        let mut reconnect = Reconnect::new(Backoff::new(INITIAL, MAX), OUTAGE_REMINDER_PERIOD);
        let started = TokioInstant::now();
        assert_eq!(reconnect.gate(started, 0), Gate::Open);
        assert_eq!(
            reconnect.gate(started, 3),
            Gate::Open,
            "healthy: attempts may overlap"
        );
        let mut attempts = 0u64;
        while TokioInstant::now().duration_since(started) < Duration::from_secs(10) {
            let now = TokioInstant::now();
            let ceiling = reconnect.backoff.ceiling();
            let transition = reconnect.failed(refused(), now, now);
            attempts += 1;
            if attempts == 1 {
                assert_eq!(transition, Transition::Down);
            } else {
                assert!(
                    matches!(transition, Transition::StillDown { remind: false, failed_attempts, .. } if failed_attempts == attempts)
                );
            }
            let next = reconnect.next_attempt().unwrap();
            assert!(next - now <= ceiling, "a pause above its ceiling");
            assert_eq!(
                reconnect.gate(now, 1),
                Gate::Closed(None),
                "one attempt at a time"
            );
            if next > now {
                assert_eq!(reconnect.gate(now, 0), Gate::Closed(Some(next)));
            }
            tokio::time::sleep_until(next).await;
            assert_eq!(reconnect.gate(TokioInstant::now(), 0), Gate::Open);
            assert_eq!(reconnect.last_error(), Some(&refused()));
        }
        // No pause exceeds its ceiling (200 ms doubling to 2 s: the first seven sum to 9 s), so at least 8
        // attempts; a fixed 200 ms cadence would have made 50, and these pauses average 1 s once capped.
        assert!((8..30).contains(&attempts), "{attempts} attempts in 10 s");
        let down_for = TokioInstant::now().duration_since(started);
        assert_eq!(
            reconnect.opened(TokioInstant::now()),
            Transition::Recovered {
                down_for,
                failed_attempts: attempts
            }
        );
        assert_eq!(reconnect.gate(TokioInstant::now(), 2), Gate::Open);
        assert_eq!(reconnect.last_error(), None);
        assert_eq!(
            reconnect.backoff.ceiling(),
            INITIAL,
            "the next outage starts small"
        );
        let now = TokioInstant::now();
        assert_eq!(reconnect.failed(refused(), now, now), Transition::Down);
        assert!(reconnect.next_attempt().unwrap() - now <= INITIAL);
        assert_eq!(
            reconnect.opened(TokioInstant::now()),
            Transition::Recovered {
                down_for: Duration::ZERO,
                failed_attempts: 1
            }
        );
        assert_eq!(reconnect.opened(TokioInstant::now()), Transition::Opened);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_under_way_when_the_outage_began_do_not_push_the_next_one_out() {
        let mut reconnect = Reconnect::new(Backoff::new(INITIAL, MAX), OUTAGE_REMINDER_PERIOD);
        let started = TokioInstant::now();
        tokio::time::advance(Duration::from_millis(50)).await;
        let now = TokioInstant::now();
        // Four attempts opened together while all was well fail together.
        assert_eq!(reconnect.failed(refused(), started, now), Transition::Down);
        let next = reconnect.next_attempt();
        for _ in 0..3 {
            reconnect.failed(refused(), started, now);
        }
        assert_eq!(reconnect.next_attempt(), next);
        assert_eq!(reconnect.backoff.ceiling(), INITIAL * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_outage_is_recalled_once_a_reminder_period() {
        let mut reconnect = Reconnect::new(Backoff::new(INITIAL, MAX), OUTAGE_REMINDER_PERIOD);
        let mut reminders = Vec::new();
        let started = TokioInstant::now();
        for second in 0..=150u64 {
            let now = TokioInstant::now();
            if let Transition::StillDown { remind: true, .. } =
                reconnect.failed(refused(), now, now)
            {
                reminders.push(second);
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(reminders, [60, 120]);
        assert!(matches!(
            reconnect.opened(TokioInstant::now()),
            Transition::Recovered { failed_attempts: 151, down_for } if down_for == TokioInstant::now() - started
        ));
    }
}
