//! One client connection: its sessions, and each incoming link checked (address, entity, token) and
//! handed to the task that serves it, or refused with the error the service would send.

use std::future::Future;
use std::sync::Arc;
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
use serde_amqp::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::cbs::Grants;
use super::faults::Faults;
use super::filter::start_position;
use super::framing::FullFieldFrames;
use super::namespace::{Hub, Namespace, now_ms};
use super::node::{Node, ReplyRoutes};
use super::sasl::EventHubsSasl;
use super::{consume, ingest, node};
use crate::eventhubs::address::EntityAddress;
use crate::eventhubs::conditions;

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
}

/// Serves one connection over any byte stream (plain TCP, TLS or WebSocket messages) until the client closes
/// it, a fault closes it or the emulator shuts down.
pub(crate) async fn serve_stream<S>(stream: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    if shared.faults.refusing_connections() {
        debug!("refusing a connection (injected fault)");
        return;
    }
    let handshake = async {
        let (header, stream) = read_protocol_header(stream).await?;
        let stream = FullFieldFrames::new(Replay::new(header, stream));
        Some(if header[4] == SASL_PROTOCOL_ID {
            shared.sasl_acceptor.accept(stream).await
        } else {
            shared.plain_acceptor.accept(stream).await
        })
    };
    // A client that sends no header, or garbage instead of its open, is dropped after a bounded wait.
    let Ok(Some(opened)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await else {
        debug!("no protocol header and open within {HANDSHAKE_TIMEOUT:?}; connection dropped");
        return;
    };
    let mut connection = match opened {
        Ok(connection) => connection,
        Err(err) => {
            debug!(%err, "connection not opened");
            return;
        }
    };
    let context = Arc::new(ConnectionContext {
        shared: Arc::clone(&shared),
        grants: Grants::default(),
        replies: ReplyRoutes::default(),
        force_close: Notify::new(),
    });
    // fe2o3 writes a field equal to its default as null, and pyamqp cannot compare a null handle-max;
    // one below the default is written out and limits nothing in practice.
    let session_acceptor = SessionAcceptor::builder().handle_max(u32::MAX - 1).build();
    loop {
        tokio::select! {
            incoming = connection.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                match session_acceptor.accept_incoming_session(incoming, &mut connection).await {
                    Ok(session) => {
                        shared.tasks.spawn(serve_session(session, Arc::clone(&context)));
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
                let closed = connection.close_with_error(error).await;
                debug!(?closed, "connection force-closed");
                return;
            }
            () = shared.shutdown.cancelled() => break,
        }
    }
    let _ = connection.close().await;
}

/// The protocol id of the SASL layer's header, `AMQP\x03\x01\x00\x00`.
const SASL_PROTOCOL_ID: u8 = 3;
/// How long a new connection may take to send its protocol header, SASL exchange and open.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the client's 8-byte protocol header; the acceptor gets it again through [`Replay`].
/// (A TLS or WebSocket stream cannot be peeked like a socket, so every transport reads and replays.)
async fn read_protocol_header<S: AsyncRead + Unpin>(mut stream: S) -> Option<([u8; 8], S)> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await.ok()?;
    Some((header, stream))
}

async fn serve_session(mut session: ListenerSessionHandle, context: Arc<ConnectionContext>) {
    loop {
        tokio::select! {
            attach = session.next_incoming_attach() => match attach {
                Some(attach) => accept_link(attach, &mut session, &context).await,
                None => break,
            },
            () = context.shared.shutdown.cancelled() => break,
        }
    }
    let _ = session.end().await;
}

/// What a link will be served as, once its attach has been checked.
enum LinkPlan {
    Requests(Node),
    Replies(Node),
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
    let plan = plan_link(&attach, context);
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
        (Ok(LinkPlan::Requests(node)), LinkEndpoint::Receiver(receiver)) => {
            shared
                .tasks
                .spawn(node::serve_requests(receiver, node, context));
        }
        (Ok(LinkPlan::Replies(node)), LinkEndpoint::Sender(sender)) => {
            let responses = context.replies.register(node);
            shared.tasks.spawn(node::serve_replies(
                sender,
                responses,
                context.shared.shutdown.clone(),
            ));
        }
        (
            Ok(LinkPlan::Ingest {
                hub,
                partition,
                authorization_path,
            }),
            LinkEndpoint::Receiver(receiver),
        ) => {
            shared.tasks.spawn(ingest::serve(
                receiver,
                hub,
                partition,
                authorization_path,
                context,
            ));
        }
        (Ok(LinkPlan::Consume(link)), LinkEndpoint::Sender(sender)) => {
            shared.tasks.spawn(consume::serve(sender, link, context));
        }
        (Ok(_), _) => warn!("a link was attached with a role its plan does not fit"),
    }
}

/// Checks an attach the way the service does: a known address, an existing entity, a valid token.
fn plan_link(attach: &Attach, context: &ConnectionContext) -> Result<LinkPlan, definitions::Error> {
    let client_sends = matches!(attach.role, Role::Sender);
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
    let address = address.ok_or_else(|| {
        let side = if client_sends { "target" } else { "source" };
        amqp_error(
            AmqpError::InvalidField,
            format!("the link has no {side} address"),
        )
    })?;
    let entity = EntityAddress::parse(&address)
        .map_err(|err| amqp_error(AmqpError::NotFound, err.to_string()))?;
    let namespace = &context.shared.namespace;
    let not_found = || {
        amqp_error(
            AmqpError::NotFound,
            format!("the messaging entity '{address}' could not be found"),
        )
    };
    let hub = match entity.hub() {
        Some(name) => Some(Arc::clone(namespace.hub(name).ok_or_else(not_found)?)),
        None => None,
    };
    let authorized = |path: &str| {
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
    };
    // Every hub entity authorizes against its own path; None for the $cbs/$management nodes.
    let authorization_path = entity.authorization_path().unwrap_or_default();
    match (client_sends, &entity, hub) {
        (true, EntityAddress::Cbs, _) => Ok(LinkPlan::Requests(Node::Cbs)),
        (true, EntityAddress::Management, _) => Ok(LinkPlan::Requests(Node::Management)),
        (false, EntityAddress::Cbs, _) => Ok(LinkPlan::Replies(Node::Cbs)),
        (false, EntityAddress::Management, _) => Ok(LinkPlan::Replies(Node::Management)),
        (true, EntityAddress::Hub { .. }, Some(hub)) => {
            authorized(&authorization_path)?;
            Ok(LinkPlan::Ingest {
                hub,
                partition: None,
                authorization_path,
            })
        }
        (true, EntityAddress::Partition { partition, .. }, Some(hub)) => {
            let partition = Some(hub.partition_index(partition).ok_or_else(not_found)?);
            authorized(&authorization_path)?;
            Ok(LinkPlan::Ingest {
                hub,
                partition,
                authorization_path,
            })
        }
        (
            false,
            EntityAddress::ConsumerPartition {
                consumer_group,
                partition,
                ..
            },
            Some(hub),
        ) => {
            if !hub.has_consumer_group(consumer_group) {
                return Err(not_found());
            }
            let partition = hub.partition_index(partition).ok_or_else(not_found)?;
            authorized(&authorization_path)?;
            let filters = attach
                .source
                .as_deref()
                .and_then(|source| source.filter.as_ref());
            let position = start_position(filters)
                .map_err(|err| amqp_error(AmqpError::NotImplemented, err.to_string()))?;
            let reader = hub
                .readers
                .register(consumer_group, partition, epoch_of(attach)?)
                .map_err(|reason| service_error(conditions::RECEIVER_DISCONNECTED, reason))?;
            Ok(LinkPlan::Consume(consume::ConsumerLink {
                hub,
                partition,
                position,
                authorization_path,
                reader,
            }))
        }
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
        (true, _, None) => Err(not_found()),
    }
}

/// The `com.microsoft:epoch` link property (owner level) of a receiver, if it set one.
fn epoch_of(attach: &Attach) -> Result<Option<i64>, definitions::Error> {
    let key = Symbol::from(crate::eventhubs::link_properties::EPOCH);
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
pub(crate) fn amqp_error(
    condition: impl Into<ErrorCondition>,
    description: String,
) -> definitions::Error {
    definitions::Error::new(condition, Some(description), None)
}

/// An AMQP error with an Event Hubs condition such as `com.microsoft:server-busy`.
pub(crate) fn service_error(condition: &str, description: String) -> definitions::Error {
    definitions::Error::new(
        ErrorCondition::Custom(Symbol::from(condition)),
        Some(description),
        None,
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
