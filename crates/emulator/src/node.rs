//! Request/response nodes (`$cbs`, `$management`): reading requests, building responses with the
//! service's status properties, and routing each response to the reply link of the same connection.

use fe2o3_amqp_types::messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp_types::primitives::SimpleValue;
use parking_lot::Mutex;
use serde_amqp::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use std::sync::Arc;

use fe2o3_amqp::link::{Receiver, Sender};

use super::cbs::{self, PutToken};
use super::connection::{
    ConnectionContext, LinkSlot, authorization_lapsed, authorization_timed_out, bounded_close,
    next_message,
};
use super::management;
use super::namespace::now_ms;

/// A message as the emulator's nodes read and write it.
pub type AnyMessage = Message<Body<Value>>;

/// A node's answer: the status code and description the service would send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// HTTP-like status: 200/202 ok, 400 bad request, 401 unauthorized, 404 not found.
    pub code: i32,
    /// A human-readable reason.
    pub description: String,
}

impl Status {
    /// A status with a code and a reason.
    pub fn new(code: i32, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
        }
    }
}

/// Which request/response node a link belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// `$cbs`.
    Cbs,
    /// `$management`.
    Management,
}

/// A string-valued application property of a request (symbols count as strings).
pub fn string_property(message: &AnyMessage, name: &str) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// The response to `request`: its correlation-id is the request's message-id, its status goes into
/// `status-code` and `status-description`, and `body` is its AMQP value.
pub fn response(request: &AnyMessage, status: &Status, body: Value) -> AnyMessage {
    let request_id = request
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    Message::builder()
        .properties(Properties {
            correlation_id: request_id,
            ..Default::default()
        })
        .application_properties(
            ApplicationProperties::builder()
                .insert("status-code", SimpleValue::Int(status.code))
                .insert(
                    "status-description",
                    SimpleValue::String(status.description.clone()),
                )
                .build(),
        )
        .body(Body::Value(AmqpValue(body)))
        .build()
}

/// The reply links of one connection, by node.
#[derive(Debug, Default)]
pub struct ReplyRoutes {
    routes: Mutex<Vec<(Node, mpsc::UnboundedSender<AnyMessage>)>>,
}

impl ReplyRoutes {
    /// Registers a reply link; responses for `node` are sent into the returned channel.
    pub fn register(&self, node: Node) -> mpsc::UnboundedReceiver<AnyMessage> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut routes = self.routes.lock();
        routes.retain(|(_, route)| !route.is_closed());
        routes.push((node, sender));
        receiver
    }

    /// Sends a response to the newest live reply link of `node`; false when there is none.
    pub fn send(&self, node: Node, response: AnyMessage) -> bool {
        let routes = self.routes.lock();
        let route = routes
            .iter()
            .rev()
            .find(|(n, route)| *n == node && !route.is_closed());
        route.is_some_and(|(_, route)| route.send(response).is_ok())
    }
}

/// Serves a request link on `$cbs` or `$management`: each request is accepted, answered by its node, and
/// the response sent to the connection's reply link for that node.
/// A link attached before its connection was authorized is detached if no valid token comes in time.
pub(crate) async fn serve_requests(
    mut receiver: Receiver,
    node: Node,
    context: Arc<ConnectionContext>,
    slot: LinkSlot,
) {
    loop {
        let next = tokio::select! {
            next = next_message(&mut receiver) => Some(next),
            () = authorization_lapsed(&context, slot.authorization_deadline) => None,
        };
        let request = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => {
                debug!(%err, ?node, "request link ended");
                return;
            }
            None => {
                debug!(
                    ?node,
                    "detaching a request link: its connection put no valid token in time"
                );
                bounded_close(receiver.close_with_error(authorization_timed_out(&context))).await;
                return;
            }
        };
        if receiver.accept(&request).await.is_err() {
            return;
        }
        let request = request.into_message();
        let shared = &context.shared;
        let (now, generation) = (now_ms(), shared.faults.token_generation());
        let answer = match node {
            Node::Cbs => {
                let status = cbs::put_token(
                    &shared.namespace,
                    &context.grants,
                    &PutToken::from_message(&request),
                    now,
                    generation,
                );
                if status.code == 202 {
                    context.mark_authorized();
                }
                response(&request, &status, Value::Null)
            }
            Node::Management => match management::handle(
                &shared.namespace,
                &context.grants,
                &request,
                now,
                generation,
            ) {
                Ok(body) => {
                    // Answered only with a valid token (its own, or one put on $cbs).
                    context.mark_authorized();
                    response(&request, &Status::new(200, "OK"), body)
                }
                Err(status) => response(&request, &status, Value::Null),
            },
        };
        if !context.replies.send(node, answer) {
            warn!(
                ?node,
                "a request arrived but its connection has no reply link for that node; the answer is dropped"
            );
        }
    }
}

/// Serves a reply link: sends each response routed to it until the client detaches, or (attached before its
/// connection was authorized) no valid token comes in time.
pub(crate) async fn serve_replies(
    mut sender: Sender,
    mut responses: mpsc::UnboundedReceiver<AnyMessage>,
    context: Arc<ConnectionContext>,
    slot: LinkSlot,
) {
    let shutdown: &CancellationToken = &context.shared.shutdown;
    loop {
        tokio::select! {
            () = authorization_lapsed(&context, slot.authorization_deadline) => {
                debug!("detaching a reply link: its connection put no valid token in time");
                bounded_close(sender.close_with_error(authorization_timed_out(&context))).await;
                return;
            }
            response = responses.recv() => {
                let Some(response) = response else { return };
                if sender.send_batchable(response).await.is_err() {
                    return;
                }
            }
            // fe2o3 answers the client's detach before on_detach returns.
            _ = sender.on_detach() => return,
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::MessageId;

    #[test]
    fn responses_correlate_and_carry_the_status() {
        let request: AnyMessage = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String("req-1".into())),
                ..Default::default()
            })
            .application_properties(
                ApplicationProperties::builder()
                    .insert("operation", "READ")
                    .build(),
            )
            .body(Body::Value(AmqpValue(Value::Null)))
            .build();
        assert_eq!(
            string_property(&request, "operation").as_deref(),
            Some("READ")
        );
        let answer = response(&request, &Status::new(404, "gone"), Value::Null);
        let props = answer.properties.unwrap();
        assert_eq!(
            props.correlation_id,
            Some(MessageId::String("req-1".into()))
        );
        let status = answer.application_properties.unwrap();
        assert_eq!(status.0.get("status-code"), Some(&SimpleValue::Int(404)));
    }

    #[test]
    fn replies_go_to_the_live_link_of_their_node() {
        let routes = ReplyRoutes::default();
        let mut cbs = routes.register(Node::Cbs);
        let message = |_: ()| {
            response(
                &Message::builder()
                    .body(Body::Value(AmqpValue(Value::Null)))
                    .build(),
                &Status::new(202, ""),
                Value::Null,
            )
        };
        assert!(!routes.send(Node::Management, message(())));
        assert!(routes.send(Node::Cbs, message(())));
        assert!(cbs.try_recv().is_ok());
        drop(cbs);
        assert!(!routes.send(Node::Cbs, message(())));
    }
}
