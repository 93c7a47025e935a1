//! One pooled AMQP connection: open (transport, SASL, session), CBS authorization of each hub kept fresh from the
//! token cache, the sender links it hosts, the management node, the ready message, and its end; its warm-up
//! (every configured hub authorized, a sender link attached), its readiness and why it is not ready, and the
//! stall check (work awaiting an answer while the peer sends nothing at all). Every exchange awaiting the peer
//! (CBS, management, attach) ends as soon as the connection does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fe2o3_amqp::Session;
use fe2o3_amqp::session::SessionHandle;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::auth::{AccessToken, TokenCache};
use super::batch::{BatchBuilder, SealedBatch};
use super::claim::Claim;
use super::error::{AmqpCondition, ErrorClass, SendError};
use super::event::Event;
use super::link::{DecrementOnDrop, Link, LinkSettings};
use super::node::NodeClient;
use super::transport::{
    Activity, ConnectionOptions, Endpoint, Progress, TlsOptions, TransportError, open_connection,
};
use eventhub_wire::{CBS_NODE, MANAGEMENT_NODE};

/// Where a connection that never opened failed: the `reason` label of `connection_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectStage {
    /// The HTTP CONNECT proxy (WebSockets through `event_hubs_proxy` or `HTTPS_PROXY`).
    Proxy,
    /// The TCP connect: refused, unreachable, or the name did not resolve.
    Tcp,
    /// TLS: the handshake, the certificate, or the client configuration.
    Tls,
    /// The WebSocket upgrade.
    WebSocket,
    /// The AMQP or SASL open, the session, or the `$cbs` links.
    Amqp,
    /// Nothing of the above finished within `pool_connection_create_timeout`.
    Timeout,
}

impl ConnectStage {
    /// Every stage, in the order of [`ConnectStage::index`].
    pub const ALL: [Self; 6] = [
        Self::Proxy,
        Self::Tcp,
        Self::Tls,
        Self::WebSocket,
        Self::Amqp,
        Self::Timeout,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::WebSocket => "websocket",
            Self::Amqp => "amqp",
            Self::Timeout => "timeout",
        }
    }

    /// Its position in [`ConnectStage::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stage a transport error comes from, and the reason to report (the address is said elsewhere).
    fn of_transport(error: &TransportError) -> (Self, String) {
        match error {
            TransportError::ProxyConnect { .. }
            | TransportError::ProxyAuthentication { .. }
            | TransportError::ProxyRefused { .. }
            | TransportError::ProxyProtocol { .. } => (Self::Proxy, error.to_string()),
            TransportError::Connect { source, .. } | TransportError::NoDelay { source, .. } => {
                (Self::Tcp, source.to_string())
            }
            TransportError::KeepAlive { .. } => (Self::Tcp, error.to_string()),
            TransportError::RootCertificate { .. }
            | TransportError::TlsConfig(_)
            | TransportError::InvalidServerName(_)
            | TransportError::Tls { .. }
            | TransportError::TlsIo { .. } => (Self::Tls, error.to_string()),
            TransportError::WebSocketRefused { .. } | TransportError::WebSocket { .. } => {
                (Self::WebSocket, error.to_string())
            }
            TransportError::Open(_) => (Self::Amqp, error.to_string()),
        }
    }
}

/// A connection that never opened (as opposed to one lost after it opened).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("could not connect to {host}: {reason}")]
pub struct ConnectError {
    /// `host:port`.
    pub host: String,
    /// Where it failed.
    pub stage: ConnectStage,
    /// Why.
    pub reason: String,
}

impl From<ConnectError> for SendError {
    fn from(error: ConnectError) -> Self {
        SendError::Unreachable {
            host: error.host,
            reason: error.reason,
        }
    }
}

/// Where a hub was found unusable on a connection: only a success at the same step (or a later one) clears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// Getting or putting its token.
    Token,
    /// Attaching its sender link.
    Attach,
}

/// Why a hub is unusable on a connection.
#[derive(Clone, Debug)]
struct Problem {
    step: Step,
    text: String,
}

/// What every connection of a pool shares.
pub struct ConnectionContext {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Certificates to trust.
    pub tls: TlsOptions,
    /// Tokens for every hub.
    pub tokens: Arc<TokenCache>,
    /// Link window and disposition wait.
    pub link_settings: LinkSettings,
    /// AMQP idle timeout announced to the service.
    pub idle_timeout: Duration,
    /// TCP keepalive of each connection's socket (see [`ConnectionOptions::tcp_keepalive`]).
    pub tcp_keepalive: Option<Duration>,
    /// Bound on each CBS or management exchange and on each attach.
    pub request_timeout: Duration,
    /// Sent once per new connection, if set.
    pub ready_message: Option<String>,
}

impl ConnectionContext {
    /// The audience of a hub's tokens: `sb://<host>/<hub>`.
    pub fn audience(&self, hub: &str) -> String {
        format!("sb://{}/{hub}", self.endpoint.host)
    }
}

/// A live connection of the pool.
pub struct PooledConnection {
    /// Its number in the pool, for logs.
    pub id: u64,
    created: Instant,
    context: Arc<ConnectionContext>,
    session: tokio::sync::Mutex<SessionHandle<()>>,
    /// `None` after an exchange broke the pair (a detach, a timeout): attached again for the next put-token.
    cbs: tokio::sync::Mutex<Option<NodeClient>>,
    management: tokio::sync::Mutex<Option<NodeClient>>,
    links: Mutex<HashMap<String, Arc<Link>>>,
    attaching: AtomicUsize,
    authorized: Mutex<HashSet<String>>,
    lost: CancellationToken,
    close: CancellationToken,
    /// Cuts the TCP stream under fe2o3 (see [`ConnectionOptions::cut`]).
    cut: CancellationToken,
    retiring: AtomicBool,
    ready_message_sent: AtomicBool,
    idle_since: Mutex<Instant>,
    /// When the peer last sent a byte.
    activity: Arc<Activity>,
    /// CBS, management and attach exchanges awaiting the peer's answer.
    requests: AtomicUsize,
    /// Since when work has been awaiting an answer without a break (checked by the pool's maintenance).
    busy_since: Mutex<Option<Instant>>,
    /// Why a hub is not usable on this connection (refused token or attach, failed warm-up), by hub.
    problems: Mutex<HashMap<String, Problem>>,
    /// Whether a sender link has attached since it opened.
    attached: AtomicBool,
    /// A warm-up is running.
    warming: AtomicBool,
    /// When the last warm-up that left a problem ended.
    warm_failed_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for PooledConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledConnection")
            .field("id", &self.id)
            .field("links", &self.link_count())
            .field("retiring", &self.is_retiring())
            .finish_non_exhaustive()
    }
}

impl PooledConnection {
    /// Opens a connection (transport, SASL ANONYMOUS, session, CBS links) and starts watching its end; each step
    /// is recorded in `progress`, whose activity becomes the connection's.
    pub async fn open(
        id: u64,
        context: Arc<ConnectionContext>,
        progress: &Arc<Progress>,
    ) -> Result<Arc<Self>, ConnectError> {
        let host = context.endpoint.host.clone();
        let never_opened = |stage, reason: String| ConnectError {
            host: format!("{}:{}", context.endpoint.host, context.endpoint.port),
            stage,
            reason,
        };
        let activity = progress.activity();
        let cut = CancellationToken::new();
        let options = ConnectionOptions {
            idle_time_out: Some(context.idle_timeout),
            activity: Some(Arc::clone(&activity)),
            tcp_keepalive: context.tcp_keepalive,
            progress: Some(Arc::clone(progress)),
            cut: Some(cut.clone()),
            ..ConnectionOptions::new(format!("eventhub-gateway-{}", uuid::Uuid::new_v4()))
        };
        // Until the connection is handed over, a failure or the attempt's timeout cuts its socket.
        let cut_unless_opened = cut.clone().drop_guard();
        let mut connection = open_connection(&options, &context.endpoint, &context.tls)
            .await
            .map_err(|error| {
                let (stage, reason) = ConnectStage::of_transport(&error);
                never_opened(stage, reason)
            })?;
        progress.enter("the session's begin");
        let mut session = match Session::begin(&mut connection).await {
            Ok(session) => session,
            Err(error) => {
                let _ = tokio::time::timeout(CLOSE_WAIT, connection.close()).await;
                return Err(never_opened(
                    ConnectStage::Amqp,
                    format!("beginning a session: {error}"),
                ));
            }
        };
        progress.enter("the attach of the $cbs links");
        let cbs = match NodeClient::attach(&mut session, CBS_NODE).await {
            Ok(cbs) => cbs,
            Err(error) => {
                let _ = tokio::time::timeout(CLOSE_WAIT, connection.close()).await;
                return Err(never_opened(ConnectStage::Amqp, error.to_string()));
            }
        };
        let this = Arc::new(Self {
            id,
            created: Instant::now(),
            context,
            session: tokio::sync::Mutex::new(session),
            cbs: tokio::sync::Mutex::new(Some(cbs)),
            management: tokio::sync::Mutex::new(None),
            links: Mutex::new(HashMap::new()),
            attaching: AtomicUsize::new(0),
            authorized: Mutex::new(HashSet::new()),
            lost: CancellationToken::new(),
            close: CancellationToken::new(),
            cut: cut.clone(),
            retiring: AtomicBool::new(false),
            ready_message_sent: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            activity,
            requests: AtomicUsize::new(0),
            busy_since: Mutex::new(None),
            problems: Mutex::new(HashMap::new()),
            attached: AtomicBool::new(false),
            warming: AtomicBool::new(false),
            warm_failed_at: Mutex::new(None),
        });
        cut_unless_opened.disarm();
        let lost = this.lost.clone();
        let close = this.close.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = connection.on_close() => {
                    match result {
                        Ok(()) => debug!(connection = id, "connection closed by the service"),
                        // It was open: "lost", unlike a connection that never opened ("could not connect").
                        Err(error) => warn!(connection = id, %error, "connection lost"),
                    }
                }
                () = close.cancelled() => {
                    // A closing handshake unless the peer is known not to answer, then the socket is cut under
                    // fe2o3 whatever came of it: fe2o3 waits for the peer's close for ever (and spins once the
                    // connection's sessions are gone), so a silent peer would keep its task and socket.
                    if !cut.is_cancelled() {
                        let _ = tokio::time::timeout(CLOSE_WAIT, connection.close()).await;
                    }
                    cut.cancel();
                    debug!(connection = id, "connection closed");
                }
            }
            lost.cancel();
        });
        info!(connection = id, host = %host, "connection opened");
        Ok(this)
    }

    /// How long it has been open.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// Whether it has ended (closed by either side).
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Whether it is being replaced and takes no new work.
    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::Relaxed)
    }

    /// Stops giving it new work; it closes once its links have settled what they carry.
    pub fn retire(&self) {
        self.retiring.store(true, Ordering::Relaxed);
        for link in self.links.lock().values() {
            link.close();
        }
    }

    /// Closes it now.
    pub fn close(&self) {
        self.retiring.store(true, Ordering::Relaxed);
        self.close.cancel();
    }

    /// Completes when the connection has ended.
    pub async fn ended(&self) {
        self.lost.cancelled().await;
    }

    /// Ends it at once as lost, its peer not answering: its links answer what they carry as a lost connection (in
    /// doubt, resent), and its socket is cut without a closing handshake (a peer behind a blackhole never
    /// answers one).
    pub fn declare_dead(&self) {
        self.retiring.store(true, Ordering::Relaxed);
        self.cut.cancel();
        self.lost.cancel();
        self.close.cancel();
    }

    /// Whether work awaits the peer's answer now: batches on its links, or a CBS, management or attach exchange.
    fn is_busy(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0 || self.load() > 0
    }

    /// Counts an exchange awaiting the peer until the guard drops.
    fn awaiting_peer(&self) -> DecrementOnDrop<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        DecrementOnDrop(&self.requests)
    }

    /// Whether it has stalled: work has been awaiting an answer for at least `bound` and nothing at all (no
    /// frame, no heartbeat) has arrived for `bound`. Says why when it has. Called on each maintenance tick, which
    /// also starts and clears the busy period, so work that comes and goes never adds up.
    pub fn stalled(&self, bound: Duration) -> Option<String> {
        let mut busy_since = self.busy_since.lock();
        if !self.is_busy() {
            *busy_since = None;
            return None;
        }
        let busy_for = busy_since.get_or_insert_with(Instant::now).elapsed();
        let silent_for = self.activity.silent_for();
        (busy_for >= bound && silent_for >= bound).then(|| {
            format!(
                "{} batches and {} requests awaiting an answer, nothing received for {:.1} s (stall_timeout {:?})",
                self.load(),
                self.requests.load(Ordering::Relaxed),
                silent_for.as_secs_f64(),
                bound
            )
        })
    }

    /// Ready when open and not retiring, every hub of `hubs` authorized with no refusal since, and a sender link
    /// attached since it opened; otherwise why not. With no hubs declared (a bare producer), an open connection
    /// with no refusal is ready.
    pub fn readiness(&self, hubs: &[String]) -> Result<(), String> {
        if self.is_lost() || self.is_retiring() {
            return Err("the connection is closing".into());
        }
        let problems = self.problems.lock();
        let first = hubs
            .iter()
            .find_map(|hub| problems.get_key_value(hub))
            .or_else(|| problems.iter().next());
        if let Some((hub, problem)) = first {
            return Err(format!("event hub {hub}: {}", problem.text));
        }
        drop(problems);
        if hubs.is_empty() {
            return Ok(());
        }
        let authorized = self.authorized.lock();
        if let Some(hub) = hubs.iter().find(|hub| !authorized.contains(*hub)) {
            return Err(format!("event hub {hub}: no CBS token granted yet"));
        }
        drop(authorized);
        if !self.attached.load(Ordering::Relaxed) {
            return Err("no sender link attached yet".into());
        }
        Ok(())
    }

    /// Whether a warm-up should start now: something of `hubs` is missing or refused, none is running, and the
    /// last one that failed ended at least `retry_after` ago.
    pub fn wants_warm_up(&self, hubs: &[String], retry_after: Duration) -> bool {
        if self.is_lost() || self.is_retiring() || self.warming.load(Ordering::Relaxed) {
            return false;
        }
        if let Some(failed) = *self.warm_failed_at.lock()
            && failed.elapsed() < retry_after
        {
            return false;
        }
        !self.problems.lock().is_empty()
            || (!hubs.is_empty() && !self.attached.load(Ordering::Relaxed))
            || {
                let authorized = self.authorized.lock();
                hubs.iter().any(|hub| !authorized.contains(hub))
            }
    }

    /// Proves the connection can serve `hubs`: puts each hub's token and attaches a sender link to it (while
    /// `client_limit` allows), recording what was refused (each step entered in `progress`, if given). An exchange
    /// the peer did not answer (a timeout, the connection lost) stops it with that error: a refusal is an answer
    /// and leaves the connection usable for the other hubs, silence does not.
    pub async fn warm_up(
        self: &Arc<Self>,
        hubs: &[String],
        client_limit: usize,
        progress: Option<&Progress>,
    ) -> Result<(), SendError> {
        if self.warming.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Counted as failed until it finishes, and ended however it ends: a warm-up dropped at its caller's
        // timeout is retried later like a refused one.
        *self.warm_failed_at.lock() = Some(Instant::now());
        let _warming = ClearOnDrop(&self.warming);
        let enter = |step: String| {
            if let Some(progress) = progress {
                progress.enter(step);
            }
        };
        let unanswered = |error: &SendError| matches!(error, SendError::Connection(_));
        let mut failed = false;
        let mut outcome = Ok(());
        for hub in hubs {
            enter(format!("the CBS put-token for {hub}"));
            if let Err(error) = self.authorize(hub).await {
                debug!(connection = self.id, %hub, %error, "warm-up: authorization failed");
                failed = true;
                if unanswered(&error) {
                    outcome = Err(error);
                    break;
                }
                continue;
            }
            let address = link_address(hub, None);
            if self.link_to(&address).is_some() || self.link_count() >= client_limit {
                continue;
            }
            enter(format!("the attach of a sender to {hub}"));
            self.reserve_link();
            if let Err(error) = self.attach_link(hub, None).await {
                debug!(connection = self.id, %hub, %error, "warm-up: attach failed");
                failed = true;
                if unanswered(&error) {
                    outcome = Err(error);
                    break;
                }
            }
        }
        *self.warm_failed_at.lock() = failed.then(Instant::now);
        outcome
    }

    /// `exchange` (an attach, a CBS or management request), or "connection lost" as soon as the connection ends:
    /// fe2o3 never fails an exchange whose answer does not come, so one on a connection declared dead would
    /// otherwise wait out its whole timeout.
    async fn or_lost<T>(
        &self,
        exchange: impl Future<Output = Result<T, SendError>>,
    ) -> Result<T, SendError> {
        tokio::select! {
            biased;
            () = self.lost.cancelled() => Err(SendError::Connection(
                "the connection to Event Hubs was lost".into(),
            )),
            result = exchange => result,
        }
    }

    /// Records why `hub` cannot be used here at `step` (warned once), or that `step` succeeded: that clears a
    /// problem met at `step` or before it (an accepted token does not prove an attach that was refused).
    fn note_problem(&self, hub: &str, step: Step, outcome: Result<(), &SendError>) {
        let mut problems = self.problems.lock();
        match outcome {
            Ok(()) => {
                if problems
                    .get(hub)
                    .is_some_and(|problem| problem.step <= step)
                {
                    problems.remove(hub);
                    info!(connection = self.id, %hub, "Event Hubs accepts this event hub again");
                }
            }
            Err(error) => {
                // Warned once when the hub becomes unusable; the retries' answers (which may word it
                // differently) are debug lines.
                let problem = Problem {
                    step,
                    text: error.to_string(),
                };
                match problems.insert(hub.to_owned(), problem) {
                    None => {
                        warn!(connection = self.id, %hub, %error, "event hub not usable on this connection; not ready")
                    }
                    Some(_) => {
                        debug!(connection = self.id, %hub, %error, "event hub still not usable")
                    }
                }
            }
        }
    }

    /// Links attached or being attached (what `client_limit` bounds).
    pub fn link_count(&self) -> usize {
        self.links.lock().len() + self.attaching.load(Ordering::Relaxed)
    }

    /// Reserves a link slot before an attach, so concurrent attaches respect `client_limit`.
    pub fn reserve_link(&self) {
        self.attaching.fetch_add(1, Ordering::Relaxed);
    }

    /// The usable link to `address`, if it has one.
    pub fn link_to(&self, address: &str) -> Option<Arc<Link>> {
        self.links
            .lock()
            .get(address)
            .filter(|link| link.is_usable())
            .cloned()
    }

    /// Batches queued or in flight on its links.
    pub fn load(&self) -> usize {
        self.links.lock().values().map(|link| link.load()).sum()
    }

    /// Drops ended links, closes links idle for `max_idle`, and says since when it has had no links.
    pub fn sweep_links(&self, max_idle: Duration) -> Option<Instant> {
        let mut links = self.links.lock();
        links.retain(|_, link| !link.has_ended());
        for link in links.values() {
            if link.load() == 0 && link.last_used().elapsed() >= max_idle {
                debug!(
                    connection = self.id,
                    address = link.address(),
                    "closing an idle link"
                );
                link.close();
            }
        }
        let mut idle_since = self.idle_since.lock();
        if !links.is_empty() || self.attaching.load(Ordering::Relaxed) > 0 {
            *idle_since = Instant::now();
            None
        } else {
            Some(*idle_since)
        }
    }

    /// A link to `hub` (or one of its partitions) on this connection: the existing one, or a new one attached
    /// after authorizing the hub. The caller has reserved a slot with [`Self::reserve_link`].
    pub async fn attach_link(
        self: &Arc<Self>,
        hub: &str,
        partition: Option<&str>,
    ) -> Result<Arc<Link>, SendError> {
        let _reservation = DecrementOnDrop(&self.attaching);
        let address = link_address(hub, partition);
        let mut token_put_again = false;
        loop {
            self.authorize(hub).await?;
            match self.attach_authorized(hub, partition, &address).await {
                Err(error) if error.class() == ErrorClass::Unauthorized && !token_put_again => {
                    token_put_again = true;
                    self.token_refused(hub, &error);
                }
                attached => return attached,
            }
        }
    }

    /// Event Hubs refused the hub's token although it was accepted here (expired by the service's clock, or
    /// revoked): asks the cache for a new one and has the next attach put a token again.
    fn token_refused(&self, hub: &str, error: &SendError) {
        self.context.tokens.refresh_now(&self.context.audience(hub));
        self.note_problem(hub, Step::Token, Err(error));
    }

    /// Watches `link` end: when Event Hubs dropped its authorization, the hub's token is put again on the next
    /// attach (its batches are retried, so they come back to attach).
    fn watch_token(self: &Arc<Self>, hub: &str, link: &Arc<Link>) {
        let (connection, link, hub) = (Arc::downgrade(self), Arc::clone(link), hub.to_owned());
        tokio::spawn(async move {
            link.ended().await;
            if let (Some(error), Some(connection)) = (link.token_lost(), connection.upgrade()) {
                connection.token_refused(&hub, &error);
            }
        });
    }

    /// Attaches the link to `address` once the hub is authorized on this connection.
    async fn attach_authorized(
        self: &Arc<Self>,
        hub: &str,
        partition: Option<&str>,
        address: &str,
    ) -> Result<Arc<Link>, SendError> {
        let mut session = self.session.lock().await;
        if let Some(link) = self.link_to(address) {
            return Ok(link);
        }
        let awaiting = self.awaiting_peer();
        let attached = self
            .or_lost(async {
                tokio::time::timeout(
                    self.context.request_timeout,
                    Link::attach(
                        &mut session,
                        address.to_owned(),
                        self.context.link_settings,
                        self.lost.clone(),
                    ),
                )
                .await
                .map_err(|_| SendError::Connection(format!("attaching {address} timed out")))
                .and_then(|attached| attached)
            })
            .await;
        drop(awaiting);
        drop(session);
        // The hub's own link refused for want of rights or of the entity makes the hub unusable here; other
        // failures (a lost connection, a busy service, a partition's link) say nothing of the hub.
        let link = match attached {
            Ok(link) => link,
            Err(error) => {
                let refused = match &error {
                    SendError::Auth(_) => true,
                    SendError::Service(service) => matches!(
                        service.condition,
                        AmqpCondition::Unauthorized | AmqpCondition::NotFound
                    ),
                    _ => false,
                };
                if refused && partition.is_none() {
                    self.note_problem(hub, Step::Attach, Err(&error));
                }
                return Err(error);
            }
        };
        self.attached.store(true, Ordering::Relaxed);
        self.note_problem(hub, Step::Attach, Ok(()));
        self.links
            .lock()
            .insert(address.to_owned(), Arc::clone(&link));
        self.watch_token(hub, &link);
        self.send_ready_message(&link).await;
        Ok(link)
    }

    /// The hub's audience and its current token from the shared cache (waiting at most the request timeout).
    async fn hub_token(&self, hub: &str) -> Result<(String, Arc<AccessToken>), SendError> {
        let audience = self.context.audience(hub);
        let token = self
            .context
            .tokens
            .token(&audience, self.context.request_timeout)
            .await
            .map_err(|e| SendError::Auth(e.to_string()))?;
        Ok((audience, token))
    }

    /// Puts the hub's token on this connection and keeps it fresh from the cache.
    async fn authorize(self: &Arc<Self>, hub: &str) -> Result<(), SendError> {
        // Put once; again only while its last token was refused (a refresh, or this put).
        let refused = || {
            self.problems
                .lock()
                .get(hub)
                .is_some_and(|problem| problem.step == Step::Token)
        };
        if self.authorized.lock().contains(hub) && !refused() {
            return Ok(());
        }
        let (audience, token) = match self.hub_token(hub).await {
            Ok(found) => found,
            Err(error) => {
                self.note_problem(hub, Step::Token, Err(&error));
                return Err(error);
            }
        };
        let put = self.put_token(&audience, &token).await;
        if let Err(error) = put {
            self.note_problem(hub, Step::Token, Err(&error));
            return Err(error);
        }
        self.note_problem(hub, Step::Token, Ok(()));
        if self.authorized.lock().insert(hub.to_owned()) {
            tokio::spawn(Arc::clone(self).keep_authorized(hub.to_owned(), audience));
        }
        Ok(())
    }

    /// Puts `token` for `audience` on `$cbs`, attaching the pair again if an earlier exchange broke it. A
    /// refusal in the answer (401, 404) keeps the pair; a broken exchange drops it.
    async fn put_token(&self, audience: &str, token: &AccessToken) -> Result<(), SendError> {
        let mut cbs = self.cbs.lock().await;
        let _awaiting = self.awaiting_peer();
        if cbs.is_none() {
            let mut session = self.session.lock().await;
            let attached = self
                .or_lost(async {
                    tokio::time::timeout(
                        self.context.request_timeout,
                        NodeClient::attach(&mut session, CBS_NODE),
                    )
                    .await
                    .map_err(|_| SendError::Connection(format!("attaching {CBS_NODE} timed out")))?
                })
                .await?;
            *cbs = Some(attached);
        }
        let Some(client) = cbs.as_mut() else {
            return Err(SendError::Connection("$cbs link missing".into()));
        };
        let put = self
            .or_lost(client.put_token(audience, token, self.context.request_timeout))
            .await;
        // A broken exchange, or one cut short by the connection's end, leaves the pair not to be trusted.
        if client.is_broken() || self.is_lost() {
            *cbs = None;
        }
        put
    }

    /// Re-puts the audience's token each time the cache refreshes it, until the connection ends.
    async fn keep_authorized(self: Arc<Self>, hub: String, audience: String) {
        let mut tokens = self.context.tokens.watch(&audience);
        tokens.borrow_and_update();
        loop {
            tokio::select! {
                changed = tokens.changed() => if changed.is_err() { return },
                () = self.lost.cancelled() => return,
            }
            let Some(token) = tokens.borrow_and_update().valid_token() else {
                continue;
            };
            let put = self.put_token(&audience, &token).await;
            match &put {
                Ok(()) => {
                    debug!(connection = self.id, %audience, "token refreshed on the connection")
                }
                Err(error) => {
                    warn!(connection = self.id, %audience, %error, "token refresh refused")
                }
            }
            self.note_problem(&hub, Step::Token, put.as_ref().map(|_| ()));
        }
    }

    /// Sends `ready_message` once, on the first link this connection attaches.
    async fn send_ready_message(&self, link: &Link) {
        let Some(text) = &self.context.ready_message else {
            return;
        };
        if self.ready_message_sent.swap(true, Ordering::SeqCst) {
            return;
        }
        let encoded = match Event::text(text.clone()).encode() {
            Ok(encoded) => encoded,
            Err(error) => {
                warn!(connection = self.id, %error, "ready message cannot be encoded");
                return;
            }
        };
        let mut batch = BatchBuilder::new(None, link.max_message_size());
        if batch.try_push(encoded).is_err() {
            warn!(
                connection = self.id,
                "ready message is larger than the link allows"
            );
            return;
        }
        let claims = vec![Arc::new(Claim::new())];
        match link.send(Arc::new(SealedBatch::new(batch, claims))).await {
            Ok(()) => debug!(
                connection = self.id,
                address = link.address(),
                "ready message sent"
            ),
            Err(error) => warn!(connection = self.id, %error, "ready message not accepted"),
        }
    }

    /// Sends a `$management` READ for `hub` (and a partition) and returns the response body.
    pub async fn management_read(
        self: &Arc<Self>,
        hub: &str,
        partition: Option<&str>,
    ) -> Result<serde_amqp::Value, SendError> {
        let (_, token) = self.hub_token(hub).await?;
        let mut management = self.management.lock().await;
        if management.is_none() {
            let mut session = self.session.lock().await;
            let _awaiting = self.awaiting_peer();
            let attached = self
                .or_lost(async {
                    tokio::time::timeout(
                        self.context.request_timeout,
                        NodeClient::attach(&mut session, MANAGEMENT_NODE),
                    )
                    .await
                    .map_err(|_| {
                        SendError::Connection(format!("attaching {MANAGEMENT_NODE} timed out"))
                    })?
                })
                .await?;
            *management = Some(attached);
        }
        let Some(client) = management.as_mut() else {
            return Err(SendError::Connection("management link missing".into()));
        };
        let mut properties = fe2o3_amqp_types::messaging::ApplicationProperties::builder()
            .insert("operation", "READ")
            .insert("name", hub)
            .insert("security_token", token.token.as_str());
        properties = match partition {
            Some(id) => properties
                .insert("type", "com.microsoft:partition")
                .insert("partition", id),
            None => properties.insert("type", "com.microsoft:eventhub"),
        };
        let awaiting = self.awaiting_peer();
        let response = self
            .or_lost(client.request(
                properties.build(),
                serde_amqp::Value::Null,
                self.context.request_timeout,
            ))
            .await;
        drop(awaiting);
        if response.is_err() {
            *management = None; // a half-broken pair is not reused
        }
        let response = response?;
        super::node::status_result(&response, hub)?;
        Ok(response.body)
    }
}

/// How long a closing handshake may take before the socket is cut.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Clears a flag when dropped, however its holder's future ends.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The address of a hub's sender link: the hub, or one of its partitions.
pub fn link_address(hub: &str, partition: Option<&str>) -> String {
    match partition {
        Some(id) => format!("{hub}/Partitions/{id}"),
        None => hub.to_owned(),
    }
}
