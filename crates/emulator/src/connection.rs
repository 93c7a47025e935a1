//! One client connection: its sessions, and each incoming link checked (address, entity, token) and
//! handed to the task that serves it, or refused with the error the service would send.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::link::{Receiver, RecvError};
use fe2o3_amqp_types::definitions::{
    self, AmqpError, ConnectionError, ErrorCondition, LinkError, Role,
};
use fe2o3_amqp_types::messaging::{Body, Source, Target, TargetArchetype};
use fe2o3_amqp_types::performatives::Attach;
use fe2o3_amqp_types::primitives::Symbol;
use parking_lot::Mutex;
use serde_amqp::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::cbs::Grants;
use super::config::LimitsConfig;
use super::faults::Faults;
use super::filter::start_position;
use super::framing::{FullFieldFrames, PeerActivity};
use super::namespace::{Hub, Namespace, now_ms};
use super::node::{AnyMessage, Node, ReplyRoutes};
use super::sasl::EventHubsSasl;
use super::{consume, ingest, node};
use eventhub_wire::address::EntityAddress;
use eventhub_wire::conditions;

/// fe2o3's link acceptor with its default (refusing) handlers for dynamic termini.
pub(crate) type DefaultLinkAcceptor =
    LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

/// What every connection of one emulator shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub namespace: Namespace,
    pub faults: Arc<Faults>,
    /// Added to every disposition, to model a network round trip.
    pub latency: Duration,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// For clients that start with SASL (the .NET, Java and JS SDKs).
    pub sasl_acceptor: ConnectionAcceptor<(), EventHubsSasl>,
    /// For clients that open AMQP directly (pyamqp on a plain connection); tokens still come through CBS.
    pub plain_acceptor: ConnectionAcceptor<(), ()>,
    /// Accepts every link, announcing the configured max-message-size.
    pub link_acceptor: DefaultLinkAcceptor,
    /// The caps on connections, sessions and links, and the timeouts that reclaim them.
    pub limits: LimitsConfig,
    /// The connections open, in total and per peer address.
    pub admissions: Arc<Admissions>,
}

/// How many over-cap connections may be in their handshake at once, to be told why they are refused;
/// beyond that, an over-cap connection is dropped unanswered.
const MAX_CONCURRENT_REFUSALS: usize = 64;
/// How long closing a connection, session or link may wait for the peer's answer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The connections open, in total and per peer address, against `limits.max_connections[_per_peer]`.
#[derive(Debug, Default)]
pub(crate) struct Admissions {
    counts: Mutex<AdmissionCounts>,
}

#[derive(Debug, Default)]
struct AdmissionCounts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
    refusing: usize,
}

/// A connection's place among the open ones (freed when dropped), or its refusal.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    admissions: Arc<Admissions>,
    peer: IpAddr,
    /// Why the connection is refused, once its handshake is done; `None` when it is admitted.
    refusal: Option<String>,
}

impl Admissions {
    /// Admits a connection from `peer`, or (within a bound) takes it in only to refuse it with a reason;
    /// `None`: drop it unanswered.
    pub(crate) fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        limits: &LimitsConfig,
    ) -> Option<ConnectionSlot> {
        let mut counts = self.counts.lock();
        let from_peer = counts.per_peer.get(&peer).copied().unwrap_or(0);
        let refusal = if counts.total >= limits.max_connections {
            Some(format!(
                "the emulator already holds its maximum of {} connections (limits.max_connections)",
                limits.max_connections
            ))
        } else if from_peer >= limits.max_connections_per_peer {
            Some(format!(
                "{peer} already holds the maximum of {} connections per peer address \
                 (limits.max_connections_per_peer)",
                limits.max_connections_per_peer
            ))
        } else {
            None
        };
        match &refusal {
            None => {
                counts.total += 1;
                *counts.per_peer.entry(peer).or_default() += 1;
            }
            Some(_) if counts.refusing < MAX_CONCURRENT_REFUSALS => counts.refusing += 1,
            Some(reason) => {
                debug!(%peer, %reason, "connection dropped: too many refusals under way");
                return None;
            }
        }
        Some(ConnectionSlot {
            admissions: Arc::clone(self),
            peer,
            refusal,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.admissions.counts.lock();
        if self.refusal.is_some() {
            counts.refusing -= 1;
            return;
        }
        counts.total -= 1;
        if let Some(from_peer) = counts.per_peer.get_mut(&self.peer) {
            *from_peer -= 1;
            if *from_peer == 0 {
                counts.per_peer.remove(&self.peer);
            }
        }
    }
}

/// What the links of one connection share.
#[derive(Debug)]
pub(crate) struct ConnectionContext {
    pub shared: Arc<Shared>,
    /// The tokens this connection has put.
    pub grants: Grants,
    /// Where `$cbs` and `$management` responses go.
    pub replies: ReplyRoutes,
    /// Signalled to close this connection with `amqp:connection:forced`.
    pub force_close: Notify,
    /// Whether the connection has put a valid token on `$cbs` (or used one on `$management`).
    pub authorized: AtomicBool,
    /// How many links are attached.
    pub links: watch::Sender<usize>,
    /// How many of them were attached to `$cbs`/`$management` before the connection was authorized.
    pub unauthorized_links: AtomicUsize,
    /// How many sessions are begun.
    pub sessions: AtomicUsize,
}

impl ConnectionContext {
    /// Whether a valid token has been put or used on this connection.
    pub(crate) fn is_authorized(&self) -> bool {
        self.authorized.load(Ordering::Relaxed)
    }

    /// Records that a valid token was put or used.
    pub(crate) fn mark_authorized(&self) {
        self.authorized.store(true, Ordering::Relaxed);
    }

    /// Takes a link's place against the caps; a `$cbs`/`$management` link (`node`) attached before the
    /// connection is authorized also counts against the unauthorized cap and gets an authorization deadline.
    fn reserve_link(self: &Arc<Self>, node: bool) -> Result<LinkSlot, definitions::Error> {
        let limits = &self.shared.limits;
        if *self.links.borrow() >= limits.max_links_per_connection {
            return Err(resource_limit(format!(
                "the connection already has its maximum of {} links (limits.max_links_per_connection)",
                limits.max_links_per_connection
            )));
        }
        let unauthorized = node && !self.is_authorized();
        if unauthorized {
            let max = limits.max_unauthorized_links_per_connection;
            let reserved =
                self.unauthorized_links
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        (n < max).then_some(n + 1)
                    });
            if reserved.is_err() {
                return Err(resource_limit(format!(
                    "the connection already has its maximum of {max} links attached before putting a valid \
                     token on $cbs (limits.max_unauthorized_links_per_connection)"
                )));
            }
        }
        self.links.send_modify(|links| *links += 1);
        let timeout = limits.authorization_timeout;
        Ok(LinkSlot {
            context: Arc::clone(self),
            unauthorized,
            authorization_deadline: unauthorized.then(|| Instant::now() + timeout),
        })
    }
}

/// A link's place against the connection's caps, freed when the task serving the link ends.
#[derive(Debug)]
pub(crate) struct LinkSlot {
    context: Arc<ConnectionContext>,
    unauthorized: bool,
    /// When a link attached before its connection was authorized must be detached if it still is not.
    pub authorization_deadline: Option<Instant>,
}

impl Drop for LinkSlot {
    fn drop(&mut self) {
        self.context.links.send_modify(|links| *links -= 1);
        if self.unauthorized {
            self.context
                .unauthorized_links
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Resolves once `deadline` has passed with the connection still unauthorized; never when there is none
/// or the connection was authorized by then.
pub(crate) async fn authorization_lapsed(context: &ConnectionContext, deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
        if !context.is_authorized() {
            return;
        }
    }
    std::future::pending().await
}

/// The error a `$cbs`/`$management` link is detached with when no valid token came in time.
pub(crate) fn authorization_timed_out(context: &ConnectionContext) -> definitions::Error {
    amqp_error(
        AmqpError::UnauthorizedAccess,
        format!(
            "no valid token was put on $cbs within {} ms of this link's attach (limits.authorization_timeout_ms)",
            context.shared.limits.authorization_timeout.as_millis()
        ),
    )
}

/// Bounds a closing handshake: a dead peer never answers it.
pub(crate) async fn bounded_close<T>(closing: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(CLOSE_TIMEOUT, closing).await.ok()
}

fn resource_limit(description: String) -> definitions::Error {
    amqp_error(AmqpError::ResourceLimitExceeded, description)
}

/// Resolves once the connection has had no link for `timeout` at a stretch.
async fn no_links_for(links: &watch::Sender<usize>, timeout: Duration) {
    let mut count = links.subscribe();
    loop {
        if count.wait_for(|links| *links == 0).await.is_err() {
            return std::future::pending().await;
        }
        tokio::select! {
            () = tokio::time::sleep(timeout) => return,
            _ = count.wait_for(|links| *links > 0) => {}
        }
    }
}

/// Resolves once the peer has sent nothing for `silence`; never when `silence` is `None`.
async fn peer_silent(activity: &PeerActivity, silence: Option<Duration>) {
    let Some(silence) = silence else {
        return std::future::pending().await;
    };
    loop {
        let silent_for = activity.silent_for();
        if silent_for >= silence {
            return;
        }
        tokio::time::sleep(silence - silent_for).await;
    }
}

/// Serves one connection over any byte stream (plain TCP, TLS or WebSocket messages) until the client closes
/// it, a fault closes it or the emulator shuts down.
pub(crate) async fn serve_stream<S>(stream: S, shared: Arc<Shared>, slot: ConnectionSlot)
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    if shared.faults.refusing_connections() {
        debug!("refusing a connection (injected fault)");
        return;
    }
    let limits = &shared.limits;
    let activity = PeerActivity::new();
    // However serving ends, the socket is let go: fe2o3 would hold it while a dead peer owes it a `close`.
    let cut = CancellationToken::new();
    let _cut_when_done = cut.clone().drop_guard();
    let handshake = async {
        let (header, stream) = read_protocol_header(stream).await?;
        let stream = FullFieldFrames::new(Replay::new(header, stream))
            .announcing_idle_time_out(limits.idle_time_out_ms())
            .recording_activity(Arc::clone(&activity))
            .cut_by(cut.clone());
        Some(if header[4] == SASL_PROTOCOL_ID {
            shared.sasl_acceptor.accept(stream).await
        } else {
            shared.plain_acceptor.accept(stream).await
        })
    };
    // A client that sends no header, or garbage instead of its open, is dropped after a bounded wait.
    let handshake_timeout = limits.handshake_timeout;
    let Ok(Some(opened)) = tokio::time::timeout(handshake_timeout, handshake).await else {
        debug!("no protocol header and open within {handshake_timeout:?}; connection dropped");
        return;
    };
    let mut connection = match opened {
        Ok(connection) => connection,
        Err(err) => {
            debug!(%err, "connection not opened");
            return;
        }
    };
    if let Some(reason) = &slot.refusal {
        info!(peer = %slot.peer, %reason, "connection refused");
        let error = resource_limit(reason.clone());
        bounded_close(connection.close_with_error(error)).await;
        return;
    }
    let context = Arc::new(ConnectionContext {
        shared: Arc::clone(&shared),
        grants: Grants::default(),
        replies: ReplyRoutes::default(),
        force_close: Notify::new(),
        authorized: AtomicBool::new(false),
        links: watch::Sender::new(0),
        unauthorized_links: AtomicUsize::new(0),
        sessions: AtomicUsize::new(0),
    });
    let idle_connection_timeout = limits.idle_connection_timeout;
    let idle = no_links_for(&context.links, idle_connection_timeout);
    // A peer heartbeats at most every idle-time-out (fe2o3 at exactly that period): twice that is slack enough.
    let silence = (!limits.idle_time_out.is_zero()).then(|| limits.idle_time_out * 2);
    let silent = peer_silent(&activity, silence);
    tokio::pin!(idle, silent);
    // fe2o3 writes a field equal to its default as null, and pyamqp cannot compare a null handle-max;
    // one below the default is written out and limits nothing in practice.
    let session_acceptor = SessionAcceptor::builder().handle_max(u32::MAX - 1).build();
    loop {
        tokio::select! {
            incoming = connection.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                match session_acceptor.accept_incoming_session(incoming, &mut connection).await {
                    Ok(session) => {
                        let max = limits.max_sessions_per_connection;
                        let reserved = context.sessions.fetch_update(
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                            |n| (n < max).then_some(n + 1),
                        );
                        if reserved.is_ok() {
                            shared.tasks.spawn(serve_session(session, Arc::clone(&context)));
                        } else {
                            let error = resource_limit(format!(
                                "the connection already has its maximum of {max} sessions (limits.max_sessions_per_connection)"
                            ));
                            shared.tasks.spawn(refuse_session(session, error));
                        }
                    }
                    Err(err) => {
                        debug!(%err, "session not begun");
                        break;
                    }
                }
            }
            () = context.force_close.notified() => {
                debug!("closing a connection with amqp:connection:forced (injected fault)");
                let error = definitions::Error::new(
                    ConnectionError::ConnectionForced,
                    Some("the connection was closed by an injected fault".to_owned()),
                    None,
                );
                let closed = bounded_close(connection.close_with_error(error)).await;
                debug!(?closed, "connection force-closed");
                return;
            }
            () = &mut idle => {
                debug!(?idle_connection_timeout, "closing a connection that has had no links");
                let error = amqp_error(
                    ConnectionError::ConnectionForced,
                    format!(
                        "the connection had no links for {} ms (limits.idle_connection_timeout_ms)",
                        limits.idle_connection_timeout.as_millis()
                    ),
                );
                bounded_close(connection.close_with_error(error)).await;
                return;
            }
            () = &mut silent => {
                info!(?silence, "closing a connection whose peer has sent nothing, not even a heartbeat");
                let error = resource_limit(format!(
                    "nothing was received for twice the idle-time-out of {} ms (limits.idle_time_out_ms)",
                    limits.idle_time_out.as_millis()
                ));
                bounded_close(connection.close_with_error(error)).await;
                return;
            }
            () = shared.shutdown.cancelled() => break,
        }
    }
    bounded_close(connection.close()).await;
}

/// Ends a session begun over the cap with the reason.
async fn refuse_session(mut session: ListenerSessionHandle, error: definitions::Error) {
    debug!(?error, "refusing a session");
    bounded_close(session.end_with_error(error)).await;
}

/// The protocol id of the SASL layer's header, `AMQP\x03\x01\x00\x00`.
const SASL_PROTOCOL_ID: u8 = 3;

/// Reads the client's 8-byte protocol header; the acceptor gets it again through [`Replay`].
/// (A TLS or WebSocket stream cannot be peeked like a socket, so every transport reads and replays.)
async fn read_protocol_header<S: AsyncRead + Unpin>(mut stream: S) -> Option<([u8; 8], S)> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await.ok()?;
    Some((header, stream))
}

async fn serve_session(mut session: ListenerSessionHandle, context: Arc<ConnectionContext>) {
    let _slot = SessionSlot(Arc::clone(&context));
    loop {
        tokio::select! {
            attach = session.next_incoming_attach() => match attach {
                Some(attach) => accept_link(attach, &mut session, &context).await,
                None => break,
            },
            () = context.shared.shutdown.cancelled() => break,
        }
    }
    bounded_close(session.end()).await;
}

/// A session's place against `limits.max_sessions_per_connection`, freed when the session's task ends.
struct SessionSlot(Arc<ConnectionContext>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a link will be served as, once its attach has been checked.
enum LinkPlan {
    Requests(Node),
    /// The route is registered with the plan, before the client learns the link is attached: a client sends
    /// its first request once both links are, and that request's answer must find the route.
    Replies(mpsc::UnboundedReceiver<AnyMessage>),
    Ingest {
        hub: Arc<Hub>,
        partition: Option<usize>,
        authorization_path: String,
    },
    Consume(consume::ConsumerLink),
}

async fn accept_link(
    attach: Attach,
    session: &mut ListenerSessionHandle,
    context: &Arc<ConnectionContext>,
) {
    // Checked after the plan so that a refused link's name is the one its address deserves; a plan holds
    // nothing (a consumer's reader registration, a reply route) that dropping it does not release.
    let plan = plan_link(&attach, context).and_then(|plan| {
        let node = matches!(plan, LinkPlan::Requests(_) | LinkPlan::Replies(..));
        let slot = context.reserve_link(node)?;
        Ok((plan, slot))
    });
    let shared = &context.shared;
    let link = match shared
        .link_acceptor
        .accept_incoming_attach(attach, session)
        .await
    {
        Ok(link) => link,
        Err(err) => {
            debug!(%err, "link not attached");
            return;
        }
    };
    let context = Arc::clone(context);
    match (plan, link) {
        (Err(error), link) => {
            debug!(?error, "refusing a link");
            match link {
                LinkEndpoint::Sender(sender) => drop(sender.close_with_error(error).await),
                LinkEndpoint::Receiver(receiver) => drop(receiver.close_with_error(error).await),
            }
        }
        (Ok((LinkPlan::Requests(node), slot)), LinkEndpoint::Receiver(receiver)) => {
            shared
                .tasks
                .spawn(node::serve_requests(receiver, node, context, slot));
        }
        (Ok((LinkPlan::Replies(responses), slot)), LinkEndpoint::Sender(sender)) => {
            shared
                .tasks
                .spawn(node::serve_replies(sender, responses, context, slot));
        }
        (
            Ok((
                LinkPlan::Ingest {
                    hub,
                    partition,
                    authorization_path,
                },
                slot,
            )),
            LinkEndpoint::Receiver(receiver),
        ) => {
            let serving = ingest::serve(receiver, hub, partition, authorization_path, context);
            shared.tasks.spawn(async move {
                let _slot = slot;
                serving.await;
            });
        }
        (Ok((LinkPlan::Consume(link), slot)), LinkEndpoint::Sender(sender)) => {
            let serving = consume::serve(sender, link, context);
            shared.tasks.spawn(async move {
                let _slot = slot;
                serving.await;
            });
        }
        (Ok(_), _) => warn!("a link was attached with a role its plan does not fit"),
    }
}

/// Checks an attach the way the service does: a known address, an existing entity, a valid token.
fn plan_link(attach: &Attach, context: &ConnectionContext) -> Result<LinkPlan, definitions::Error> {
    let client_sends = matches!(attach.role, Role::Sender);
    let address = link_address(attach, client_sends)?;
    let entity = EntityAddress::parse(&address)
        .map_err(|err| amqp_error(AmqpError::NotFound, err.to_string()))?;
    let hub = match entity.hub() {
        Some(name) => Some(hub_named(context, name, &address)?),
        None => None,
    };
    // Every hub entity authorizes against its own path; None for the $cbs/$management nodes.
    let authorization_path = entity.authorization_path().unwrap_or_default();
    match (client_sends, &entity, hub) {
        (true, EntityAddress::Cbs, _) => Ok(LinkPlan::Requests(Node::Cbs)),
        (true, EntityAddress::Management, _) => Ok(LinkPlan::Requests(Node::Management)),
        (false, EntityAddress::Cbs, _) => Ok(replies(context, Node::Cbs)),
        (false, EntityAddress::Management, _) => Ok(replies(context, Node::Management)),
        (true, EntityAddress::Hub { .. }, Some(hub)) => {
            plan_ingest(context, hub, None, authorization_path)
        }
        (true, EntityAddress::Partition { partition, .. }, Some(hub)) => {
            let partition = hub
                .partition_index(partition)
                .ok_or_else(|| entity_not_found(&address))?;
            plan_ingest(context, hub, Some(partition), authorization_path)
        }
        (
            false,
            EntityAddress::ConsumerPartition {
                consumer_group,
                partition,
                ..
            },
            Some(hub),
        ) => plan_consumer(
            attach,
            context,
            ConsumerAddress {
                address: &address,
                consumer_group,
                partition,
            },
            hub,
            authorization_path,
        ),
        (true, EntityAddress::ConsumerPartition { .. }, _) => Err(amqp_error(
            AmqpError::NotAllowed,
            format!("'{address}' is a consumer group: send to the hub or a partition"),
        )),
        (false, _, _) => Err(amqp_error(
            AmqpError::NotFound,
            format!(
                "'{address}' is not a consumer group partition: receive from <hub>/ConsumerGroups/<group>/Partitions/<id>"
            ),
        )),
        (true, _, None) => Err(entity_not_found(&address)),
    }
}

/// A reply link's plan, its route registered.
fn replies(context: &ConnectionContext, node: Node) -> LinkPlan {
    LinkPlan::Replies(context.replies.register(node))
}

/// The address a link names: its target when the client sends, its source when it receives.
fn link_address(attach: &Attach, client_sends: bool) -> Result<String, definitions::Error> {
    let address = if client_sends {
        attach.target.as_deref().and_then(|target| match target {
            TargetArchetype::Target(target) => target.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        })
    } else {
        attach
            .source
            .as_deref()
            .and_then(|source| source.address.clone())
    };
    address.ok_or_else(|| {
        let side = if client_sends { "target" } else { "source" };
        amqp_error(
            AmqpError::InvalidField,
            format!("the link has no {side} address"),
        )
    })
}

/// The hub an address names, if the namespace has it.
fn hub_named(
    context: &ConnectionContext,
    name: &str,
    address: &str,
) -> Result<Arc<Hub>, definitions::Error> {
    context
        .shared
        .namespace
        .hub(name)
        .map(Arc::clone)
        .ok_or_else(|| entity_not_found(address))
}

/// A sender to a hub (`partition` None: the emulator routes) or one of its partitions, once the token covers it.
fn plan_ingest(
    context: &ConnectionContext,
    hub: Arc<Hub>,
    partition: Option<usize>,
    authorization_path: String,
) -> Result<LinkPlan, definitions::Error> {
    authorize_link(context, &authorization_path)?;
    Ok(LinkPlan::Ingest {
        hub,
        partition,
        authorization_path,
    })
}

/// The service's refusal of an address naming no hub, partition or consumer group it has.
fn entity_not_found(address: &str) -> definitions::Error {
    amqp_error(
        AmqpError::NotFound,
        format!("the messaging entity '{address}' could not be found"),
    )
}

/// Refuses a link to `path` unless this connection holds a live token covering it (expired or revoked by
/// the `expire_tokens` fault: no).
fn authorize_link(context: &ConnectionContext, path: &str) -> Result<(), definitions::Error> {
    let generation = context.shared.faults.token_generation();
    if context
        .grants
        .expiry_covering(path, now_ms(), generation)
        .is_some()
    {
        Ok(())
    } else {
        Err(amqp_error(
            AmqpError::UnauthorizedAccess,
            format!("unauthorized access: put a valid token for '{path}' on $cbs first"),
        ))
    }
}

/// A consumer link's address, as parsed: the whole text (for errors), its consumer group and partition id.
struct ConsumerAddress<'a> {
    address: &'a str,
    consumer_group: &'a str,
    partition: &'a str,
}

/// A receiver on a consumer group partition: the group and partition exist, the token covers them, the
/// filter gives a start position, and the epoch rule lets this reader in (registered as it is planned).
fn plan_consumer(
    attach: &Attach,
    context: &ConnectionContext,
    target: ConsumerAddress<'_>,
    hub: Arc<Hub>,
    authorization_path: String,
) -> Result<LinkPlan, definitions::Error> {
    if !hub.has_consumer_group(target.consumer_group) {
        return Err(entity_not_found(target.address));
    }
    let partition = hub
        .partition_index(target.partition)
        .ok_or_else(|| entity_not_found(target.address))?;
    authorize_link(context, &authorization_path)?;
    let filters = attach
        .source
        .as_deref()
        .and_then(|source| source.filter.as_ref());
    let position = start_position(filters)
        .map_err(|err| amqp_error(AmqpError::NotImplemented, err.to_string()))?;
    let reader = hub
        .readers
        .register(target.consumer_group, partition, epoch_of(attach)?)
        .map_err(|reason| service_error(conditions::RECEIVER_DISCONNECTED, reason))?;
    Ok(LinkPlan::Consume(consume::ConsumerLink {
        hub,
        partition,
        position,
        authorization_path,
        reader,
    }))
}

/// The `com.microsoft:epoch` link property (owner level) of a receiver, if it set one.
fn epoch_of(attach: &Attach) -> Result<Option<i64>, definitions::Error> {
    let key = Symbol::from(eventhub_wire::link_properties::EPOCH);
    match attach
        .properties
        .as_ref()
        .and_then(|properties| properties.get(&key))
    {
        None => Ok(None),
        Some(Value::Long(epoch)) => Ok(Some(*epoch)),
        Some(Value::Int(epoch)) => Ok(Some(i64::from(*epoch))),
        Some(other) => Err(amqp_error(
            AmqpError::InvalidField,
            format!("com.microsoft:epoch must be a long, not {other:?}"),
        )),
    }
}

/// The next message on a client's sender link; a transfer that does not decode is rejected with
/// `amqp:decode-error` and skipped. Errors mean the link is gone.
pub(crate) async fn next_message(
    receiver: &mut Receiver,
) -> Result<Delivery<Body<Value>>, RecvError> {
    loop {
        match receiver.recv::<Body<Value>>().await {
            Err(RecvError::MessageDecode(err)) => {
                let error = amqp_error(
                    AmqpError::DecodeError,
                    format!("the message cannot be decoded: {}", err.source),
                );
                let _ = receiver.reject(err.info, error).await;
            }
            other => return other,
        }
    }
}

/// An AMQP error with a standard condition.
///
/// Its `info` is empty, never absent: fe2o3 drops a trailing null, and the Python SDK's send callback reads the
/// error's third field, so an absent one hangs its send (an `IndexError` in a callback).
pub(crate) fn amqp_error(
    condition: impl Into<ErrorCondition>,
    description: String,
) -> definitions::Error {
    definitions::Error::new(
        condition,
        Some(description),
        Some(definitions::Fields::default()),
    )
}

/// An AMQP error with an Event Hubs condition such as `com.microsoft:server-busy` (its `info` empty, for the
/// reason [`amqp_error`] gives).
pub(crate) fn service_error(condition: &str, description: String) -> definitions::Error {
    definitions::Error::new(
        ErrorCondition::Custom(Symbol::from(condition)),
        Some(description),
        Some(definitions::Fields::default()),
    )
}

/// Why a hub link must end although its client did not detach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkEnd {
    /// No valid token covers the link's entity any more.
    TokenExpired,
    /// An injected fault detaches every hub link.
    DetachForced,
    /// The emulator is shutting down: the connection closes, so the link needs no detach of its own.
    Shutdown,
}

impl LinkEnd {
    /// The error the link is detached with, if any.
    pub(crate) fn error(self, path: &str) -> Option<definitions::Error> {
        match self {
            Self::TokenExpired => Some(amqp_error(
                AmqpError::UnauthorizedAccess,
                format!("the token for '{path}' expired: put a fresh one on $cbs before it does"),
            )),
            Self::DetachForced => Some(amqp_error(
                LinkError::DetachForced,
                "the link was detached by an injected fault".to_owned(),
            )),
            Self::Shutdown => None,
        }
    }
}

/// Runs a hub link's `work` until it finishes (the client went away) or the link must end: its token
/// lapsed with no fresher one put, a fault detaches it, or the emulator shuts down. Returns why it must end.
pub(crate) async fn until_link_end(
    context: Arc<ConnectionContext>,
    path: &str,
    work: impl Future<Output = ()>,
) -> Option<LinkEnd> {
    tokio::select! {
        biased;
        end = link_end(context, path) => Some(end),
        () = work => None,
    }
}

async fn link_end(context: Arc<ConnectionContext>, path: &str) -> LinkEnd {
    let faults = &context.shared.faults;
    let mut tokens = faults.subscribe_tokens();
    let mut detach: watch::Receiver<u64> = faults.subscribe_detach();
    loop {
        let now = now_ms();
        let Some(expiry) = context
            .grants
            .expiry_covering(path, now, faults.token_generation())
        else {
            return LinkEnd::TokenExpired;
        };
        let until_expiry = Duration::from_millis(u64::try_from(expiry - now).unwrap_or(0));
        tokio::select! {
            // On expiry, loop to see whether a fresher token was put meanwhile.
            () = tokio::time::sleep(until_expiry) => {}
            _ = tokens.changed() => {}
            _ = detach.changed() => return LinkEnd::DetachForced,
            () = context.shared.shutdown.cancelled() => return LinkEnd::Shutdown,
        }
    }
}

/// The throttling error the service rejects a transfer with.
pub(crate) fn server_busy() -> definitions::Error {
    service_error(
        conditions::SERVER_BUSY,
        "the request was terminated because the namespace is being throttled (injected fault); retry later".into(),
    )
}

/// A stream that yields some already-read bytes (the protocol header) before the rest of its input.
#[derive(Debug)]
pub(crate) struct Replay<S> {
    prefix: [u8; 8],
    /// How much of `prefix` has been read again.
    replayed: usize,
    inner: S,
}

impl<S> Replay<S> {
    fn new(prefix: [u8; 8], inner: S) -> Self {
        Self {
            prefix,
            replayed: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.prefix.len() {
            let rest = &this.prefix[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
