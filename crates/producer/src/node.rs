//! Request/response over a service node (`$cbs` put-token, `$management` READ): one link pair per connection,
//! requests one at a time, each answer matched to its request by correlation id.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Receiver, Sender};
use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp_types::primitives::{SimpleValue, Timestamp};
use serde_amqp::Value;

use super::auth::AccessToken;
use super::error::{AmqpCondition, SendError, ServiceError};
use eventhub_wire::message::AmqpMessage;

/// A node's answer: status code, description and body.
#[derive(Debug)]
pub struct Response {
    /// `status-code` (2xx is success).
    pub code: i32,
    /// `status-description`.
    pub description: String,
    /// The body value.
    pub body: Value,
}

/// A link pair to one node.
pub struct NodeClient {
    node: &'static str,
    requests: Sender,
    responses: Receiver,
    reply_to: String,
    next_id: u64,
    broken: bool,
}

impl NodeClient {
    /// Attaches the request and response links of `node`.
    pub async fn attach(
        session: &mut SessionHandle<()>,
        node: &'static str,
    ) -> Result<Self, SendError> {
        let id = uuid::Uuid::new_v4();
        let reply_to = format!("{node}-client-{id}");
        let lost =
            |e: &dyn std::fmt::Display| SendError::Connection(format!("attaching {node}: {e}"));
        let requests = Sender::attach(session, format!("{node}-requests-{id}"), node)
            .await
            .map_err(|e| lost(&e))?;
        let responses = Receiver::builder()
            .name(format!("{node}-responses-{id}"))
            .source(node)
            .target(reply_to.clone())
            .attach(session)
            .await
            .map_err(|e| lost(&e))?;
        Ok(Self {
            node,
            requests,
            responses,
            reply_to,
            next_id: 0,
            broken: false,
        })
    }

    /// Sends a request with these application properties and body, and waits (at most `wait`) for its answer.
    pub async fn request(
        &mut self,
        properties: ApplicationProperties,
        body: Value,
        wait: Duration,
    ) -> Result<Response, SendError> {
        self.next_id += 1;
        let message_id = MessageId::String(format!("{}-{}", self.reply_to, self.next_id));
        let message: AmqpMessage = Message::builder()
            .properties(Properties {
                message_id: Some(message_id.clone()),
                reply_to: Some(self.reply_to.clone()),
                ..Default::default()
            })
            .application_properties(properties)
            .body(Body::Value(AmqpValue(body)))
            .build();
        let node = self.node;
        let exchange = async {
            let outcome = self
                .requests
                .send(message)
                .await
                .map_err(|e| request_error(node, e))?;
            if !matches!(outcome, Outcome::Accepted(_)) {
                return Err(SendError::Connection(format!(
                    "{node} refused the request: {outcome:?}"
                )));
            }
            loop {
                let delivery = self
                    .responses
                    .recv::<Body<Value>>()
                    .await
                    .map_err(|e| SendError::Connection(format!("{node} response: {e}")))?;
                let _ = self.responses.accept(&delivery).await;
                let message = delivery.into_message();
                let correlation = message
                    .properties
                    .as_ref()
                    .and_then(|p| p.correlation_id.clone());
                if correlation.as_ref() != Some(&message_id) {
                    continue; // the late answer of a request that timed out
                }
                return Ok(parse_response(message));
            }
        };
        let answer = tokio::time::timeout(wait, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(SendError::Connection(format!(
                    "{node} did not answer within {wait:?}"
                )))
            });
        // No answer (a detach, a refused request, a timeout): the pair is not to be trusted again.
        self.broken |= answer.is_err();
        answer
    }

    /// Whether an exchange failed without an answer, so the pair should be attached again.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Puts a token on `$cbs` for `audience`.
    pub async fn put_token(
        &mut self,
        audience: &str,
        token: &AccessToken,
        wait: Duration,
    ) -> Result<(), SendError> {
        let expiration = token
            .expires_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        let properties = ApplicationProperties::builder()
            .insert("operation", "put-token")
            .insert("type", token.token_type)
            .insert("name", audience)
            .insert(
                "expiration",
                SimpleValue::Timestamp(Timestamp::from_milliseconds(expiration)),
            )
            .build();
        let response = self
            .request(properties, Value::String(token.token.clone()), wait)
            .await?;
        status_result(&response, audience)
    }
}

/// A failed request send: the node's link detached for want of authorization is an authentication failure (the
/// emulator, like the service, detaches `$cbs` when no valid token comes); anything else ends the pair.
fn request_error(node: &str, error: fe2o3_amqp::link::SendError) -> SendError {
    use fe2o3_amqp::link::{DetachError, LinkStateError, SendError as LinkSendError};
    let detached = match &error {
        LinkSendError::Detached(
            DetachError::RemoteDetachedWithError(error) | DetachError::RemoteClosedWithError(error),
        )
        | LinkSendError::LinkStateError(
            LinkStateError::RemoteDetachedWithError(error)
            | LinkStateError::RemoteClosedWithError(error),
        ) => Some(ServiceError::from(error)),
        _ => None,
    };
    match detached {
        Some(service) if service.condition == AmqpCondition::Unauthorized => {
            SendError::Auth(format!("{node} link detached: {service}"))
        }
        _ => SendError::Connection(format!("{node} request: {error}")),
    }
}

/// Maps a node's status code to the error the service means by it.
pub fn status_result(response: &Response, what: &str) -> Result<(), SendError> {
    let condition = match response.code {
        200..=299 => return Ok(()),
        401 | 403 => AmqpCondition::Unauthorized,
        404 => AmqpCondition::NotFound,
        400 => AmqpCondition::InvalidArgument,
        429 | 503 => AmqpCondition::ServerBusy,
        _ => AmqpCondition::InternalError,
    };
    let description = format!("{what}: {} {}", response.code, response.description);
    Err(match condition {
        AmqpCondition::Unauthorized => SendError::Auth(description),
        condition => SendError::service(condition, description),
    })
}

fn parse_response(message: AmqpMessage) -> Response {
    let properties = message
        .application_properties
        .map(|p| p.0)
        .unwrap_or_default();
    let code = match properties
        .get("status-code")
        .or_else(|| properties.get("statusCode"))
    {
        Some(SimpleValue::Int(code)) => *code,
        Some(SimpleValue::Long(code)) => *code as i32,
        _ => 0,
    };
    let description = match properties
        .get("status-description")
        .or_else(|| properties.get("statusDescription"))
    {
        Some(SimpleValue::String(text)) => text.clone(),
        _ => String::new(),
    };
    let body = match message.body {
        Body::Value(AmqpValue(value)) => value,
        _ => Value::Null,
    };
    Response {
        code,
        description,
        body,
    }
}

/// Milliseconds since the Unix epoch of an AMQP timestamp, as a `SystemTime`.
pub fn timestamp_time(timestamp: &Timestamp) -> SystemTime {
    let millis = timestamp.milliseconds();
    if millis >= 0 {
        UNIX_EPOCH + Duration::from_millis(millis as u64)
    } else {
        UNIX_EPOCH
    }
}
