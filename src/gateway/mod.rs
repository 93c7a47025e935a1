//! The `EventHubGateway` gRPC service over the producer: hub selection, per-client rate limits, deadlines,
//! per-event results, and the acknowledged stream.

pub mod cloud_event;
pub mod codec;
pub mod convert;
pub mod deadline;
pub mod guard;
pub mod limits;
pub mod prescan;
pub mod rate_limit;
pub mod schemas;
pub mod shares;
pub mod status;
pub mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Authenticator, Caller, Credentials, ResourceTail};
use crate::listener::GoingAway;
use crate::middleware::{ClientId, peer_ip};
use crate::proto::v1;
use crate::telemetry::http::Readiness;
use convert::event_from_proto;
use eventhub_producer::{Producer, Ticket, TraceContext};
use eventhub_telemetry::metrics::{
    AUTH_FAILURES, GRANT_CALLS, GRANT_EVENTS, HubEvents, RATE_LIMITED_EVENTS, Report, Rpc,
    set_ready,
};
use eventhub_telemetry::otel;
use limits::Limits;
use prost::Message;
use rate_limit::RateLimits;
use schemas::Schemas;
use shares::{BufferShares, ClientShare, HeldShare};
pub use status::GatewayError;

/// What the service shares between calls.
pub struct GatewayState {
    producer: Producer,
    hubs: Vec<String>,
    limits: Limits,
    rate_limits: RateLimits,
    authenticator: Arc<Authenticator>,
    shares: BufferShares,
    draining: CancellationToken,
    send_timeout: Duration,
    /// The `SendStream` tasks, so a drain can wait for every stream to have sent its last status.
    streams: TaskTracker,
    /// The hubs' JSON Schemas (none: nothing is checked).
    schemas: Arc<Schemas>,
}

impl GatewayState {
    /// State for a producer serving `hubs` (the first is the default), its callers checked by `authenticator`.
    pub fn new(
        producer: Producer,
        hubs: Vec<String>,
        limits: Limits,
        authenticator: Arc<Authenticator>,
        send_timeout: Duration,
    ) -> Self {
        let rate_limits = RateLimits::new(
            limits.global_events_per_second,
            limits.client_events_per_second,
            authenticator.identity_rates(),
        );
        Self {
            producer,
            hubs,
            shares: BufferShares::new(limits.max_buffered_bytes_per_client),
            limits,
            rate_limits,
            authenticator,
            draining: CancellationToken::new(),
            send_timeout,
            streams: TaskTracker::new(),
            schemas: Arc::default(),
        }
    }

    /// The same state checking JSON bodies against `schemas` (per hub).
    pub fn with_schemas(mut self, schemas: Arc<Schemas>) -> Self {
        self.schemas = schemas;
        self
    }

    /// The hubs' JSON Schemas (for a reload).
    pub fn schemas(&self) -> &Arc<Schemas> {
        &self.schemas
    }

    /// The producer behind the gateway.
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// The per-client and global rate limits.
    pub fn rate_limits(&self) -> &RateLimits {
        &self.rate_limits
    }

    /// Stops taking new work: calls are refused with DRAINING and streams stop reading.
    pub fn start_draining(&self) {
        self.draining.cancel();
    }

    /// Waits (call it once draining) until every stream has sent its last ack and status; returns whether
    /// any stream was still open.
    pub async fn streams_ended(&self) -> bool {
        self.streams.close();
        let were_open = !self.streams.is_empty();
        self.streams.wait().await;
        were_open
    }

    /// Whether the gateway is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// The caller a request's credentials prove (its `authorization` header, its client certificate); a
    /// refusal is counted by reason, and never logs the credential.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, GatewayError> {
        // A value that is not visible ASCII cannot be a bearer credential: it is checked as an empty one.
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|value| value.to_str().unwrap_or_default());
        let certificates = request.peer_certs();
        let credentials = Credentials {
            authorization,
            peer_certificate: certificates
                .as_deref()
                .and_then(|chain| chain.first())
                .map(|leaf| leaf.as_ref()),
        };
        match self.authenticator.authenticate(credentials).await {
            Ok(caller) => {
                if let Caller::Identified { identity, access } = &caller {
                    let grant = access.grant_names().next().unwrap_or("none").to_owned();
                    metrics::counter!(GRANT_CALLS, "grant" => grant).increment(1);
                    tracing::Span::current().record("identity", identity.name.as_str());
                }
                Ok(caller)
            }
            Err(error) => {
                metrics::counter!(AUTH_FAILURES, "reason" => error.reason()).increment(1);
                tracing::debug!(reason = error.reason(), %error, "call refused: unauthenticated");
                Err(error.into())
            }
        }
    }

    /// The hub a request names, or the default for an empty name.
    fn hub(&self, requested: &str) -> Result<String, GatewayError> {
        self.served_hub(requested).map(str::to_owned)
    }

    /// [`GatewayState::hub`], borrowed from the served list (a stream asks once per event).
    fn served_hub(&self, requested: &str) -> Result<&str, GatewayError> {
        if requested.is_empty() {
            return Ok(&self.hubs[0]);
        }
        if let Some(hub) = self.hubs.iter().find(|hub| *hub == requested) {
            return Ok(hub);
        }
        Err(GatewayError::UnknownHub {
            hub: status::clip(requested).into_owned(),
            served: self.hubs.join(", "),
        })
    }

    /// Holds the event's bytes in its client's buffer share, then converts and enqueues it; keep the share
    /// until the ticket is answered. `path` names the event in errors (`event`, `events[3]`).
    async fn enqueue(
        &self,
        call: &CallContext,
        hub: &str,
        proto: v1::Event,
        deadline: Instant,
        path: &(dyn Fn() -> String + Sync),
    ) -> Result<(Ticket, HeldShare), GatewayError> {
        let (event, share) = self.prepare(call, hub, proto, deadline, path).await?;
        let ticket = self
            .producer
            .enqueue(hub, event, deadline)
            .await
            .map_err(|error| GatewayError::event(path(), error))?;
        Ok((ticket, share))
    }

    /// Holds the event's bytes in its client's buffer share (waiting until `deadline` at most), then converts
    /// it for the producer.
    async fn prepare(
        &self,
        call: &CallContext,
        hub: &str,
        proto: v1::Event,
        deadline: Instant,
        path: &(dyn Fn() -> String + Sync),
    ) -> Result<(eventhub_producer::Event, HeldShare), GatewayError> {
        let share = call.share.hold(proto.encoded_len(), deadline).await?;
        let json_kind = matches!(proto.body, Some(v1::event::Body::Json(_)));
        let event = event_from_proto(proto, call.event_trace_context(hub).as_ref())
            .map_err(|error| GatewayError::event(path(), error))?;
        // Checked after conversion, so every way in (each body kind, REST, CloudEvents) meets the same rule.
        if let Some(schema) = self.schemas.for_hub(hub)
            && schemas::applies(json_kind, event.content_type.as_deref())
        {
            schema
                .check(&event.body)
                .map_err(|violations| GatewayError::SchemaViolation {
                    path: path(),
                    hub: hub.to_owned(),
                    violations,
                })?;
        }
        Ok((event, share))
    }

    fn charge(&self, call: &CallContext, events: usize) -> Result<(), GatewayError> {
        let events = u32::try_from(events).unwrap_or(u32::MAX);
        let own_rate = match &call.caller {
            Caller::Identified { access, .. } => access.events_per_second(),
            Caller::Anonymous => None,
        };
        self.rate_limits
            .charge(&call.client, own_rate, events)
            .map_err(|limited| {
                if limited.exceeds_capacity() {
                    // Waiting cannot help: one request holds more than a second of the limit.
                    GatewayError::InvalidRequest {
                        field: "events".into(),
                        reason: limited.to_string(),
                    }
                } else {
                    GatewayError::RateLimited {
                        subject: limited.subject,
                        limit_per_second: limited.limit_per_second,
                        retry_after: limited.retry_after,
                    }
                }
            })
    }

    /// What a call carries besides its message: who (authenticated here), its trace context, its deadline.
    async fn call<T>(&self, request: &Request<T>) -> Result<CallContext, GatewayError> {
        if self.is_draining() {
            return Err(GatewayError::Draining);
        }
        let caller = self.authenticate(request).await?;
        let client = match &caller {
            Caller::Identified { identity, .. } => ClientId::authenticated(identity.name.as_str()),
            Caller::Anonymous => request
                .extensions()
                .get::<ClientId>()
                .cloned()
                .unwrap_or_else(ClientId::unknown),
        };
        let trace_context = request.extensions().get::<TraceContext>().cloned();
        // The caller's deadline, but never beyond the gateway's own send timeout.
        let own = Instant::now() + self.send_timeout;
        let deadline = deadline::from_metadata(request.metadata())
            .map_or(own, |timeout| deadline::answer_before(timeout).min(own));
        // Decided once per call (streams included): only a sampled call's events get spans of their own.
        let event_spans = otel::EventSpans::for_current_call();
        let peer = peer_ip(request.extensions());
        let tail = request.extensions().get::<ResourceTail>().cloned();
        Ok(CallContext {
            tail,
            caller,
            client,
            share: self.shares.share_of(peer),
            trace_context,
            event_spans,
            deadline,
        })
    }
}

/// One call's caller, trace context and deadline.
#[derive(Clone)]
pub struct CallContext {
    /// Where under its hub the call goes (the REST publisher and partition routes); `None` is the hub itself.
    tail: Option<ResourceTail>,
    caller: Caller,
    client: ClientId,
    /// The buffer share of the peer address (the client cannot choose it, unlike its id), looked up once per
    /// call.
    share: ClientShare,
    trace_context: Option<TraceContext>,
    /// The spans of its events, if its span is exported and sampled.
    event_spans: Option<otel::EventSpans>,
    deadline: Instant,
}

impl CallContext {
    /// Whether the caller may publish to `hub` (anonymous callers may, when auth is not required); an
    /// identified caller's events are counted under the grant that admits them.
    fn check_grant(&self, hub: &str, events: u64) -> Result<(), GatewayError> {
        let Caller::Identified { identity, access } = &self.caller else {
            return Ok(());
        };
        if let Some(resource) = access.sas_resource() {
            let tail = self.tail.as_ref().map_or(&[][..], |tail| tail.0.as_slice());
            if !resource.covers(hub, tail) {
                metrics::counter!(GRANT_EVENTS, "grant" => "none").increment(events);
                let mut requested = hub.to_owned();
                for segment in tail {
                    requested.push('/');
                    requested.push_str(segment);
                }
                return Err(GatewayError::SasResourceNotCovered {
                    hub: hub.to_owned(),
                    resource: resource.as_str().to_owned(),
                    requested: status::clip(&requested).into_owned(),
                });
            }
        }
        let grant = access.grant_for(hub);
        let label = grant.map_or("none", |grant| grant.name.as_str()).to_owned();
        metrics::counter!(GRANT_EVENTS, "grant" => label).increment(events);
        match grant {
            Some(_) => Ok(()),
            None => Err(GatewayError::hub_not_allowed(hub, &identity.name)),
        }
    }

    /// The trace context written onto one event for `hub`. For a sampled call with spans exported, it is the
    /// event's own span (a child of the call's, as the Azure SDKs make one per message); otherwise the
    /// caller's context as is.
    fn event_trace_context(&self, hub: &str) -> Option<TraceContext> {
        match &self.event_spans {
            Some(spans) => spans.event(hub).or_else(|| self.trace_context.clone()),
            None => self.trace_context.clone(),
        }
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct Gateway {
    state: Arc<GatewayState>,
}

impl Gateway {
    /// The service over shared state.
    pub fn new(state: Arc<GatewayState>) -> Self {
        Self { state }
    }
}

/// `SendEvent`'s one event, from the request's `event` field to its outcome.
async fn send_one(
    state: &GatewayState,
    call: &CallContext,
    hub: &str,
    proto: Option<v1::Event>,
) -> Result<eventhub_producer::Receipt, GatewayError> {
    let proto = proto.ok_or_else(|| GatewayError::InvalidRequest {
        field: "event".into(),
        reason: "is required".into(),
    })?;
    state.charge(call, 1)?;
    let path = || "event".to_owned();
    let (ticket, _share) = state
        .enqueue(call, hub, proto, call.deadline, &path)
        .await?;
    // Answered by the deadline: an event on the wire then is OUTCOME_UNKNOWN, not a transport timeout.
    ticket
        .outcome_by(call.deadline)
        .await
        .map_err(|error| GatewayError::event("event", error))
}

fn event_result(outcome: Result<eventhub_producer::Receipt, GatewayError>) -> v1::EventResult {
    match outcome {
        Ok(receipt) => v1::EventResult {
            status: Some(status::ok()),
            partition_id: receipt.partition_id.unwrap_or_default(),
        },
        Err(error) => v1::EventResult {
            status: Some(error.to_rpc_status()),
            partition_id: String::new(),
        },
    }
}

#[tonic::async_trait]
impl v1::event_hub_gateway_server::EventHubGateway for Gateway {
    async fn send_event(
        &self,
        request: Request<v1::SendEventRequest>,
    ) -> Result<Response<v1::SendEventResponse>, Status> {
        let state = &self.state;
        let call = state.call(&request).await?;
        let body = request.into_inner();
        let hub = state.hub(&body.event_hub)?;
        // Counted from here on: an unknown hub's name is the caller's text, never a label.
        let mut outcome = HubEvents::new(&hub, Rpc::SendEvent).receive(1);
        let sent = match call.check_grant(&hub, 1) {
            Ok(()) => send_one(state, &call, &hub, body.event).await,
            Err(error) => Err(error),
        };
        match &sent {
            Ok(_) => outcome.ok(1),
            Err(error) => outcome.failed(error.reason(), 1),
        }
        let receipt = sent?;
        Ok(Response::new(v1::SendEventResponse {
            event_hub: hub,
            partition_id: receipt.partition_id.unwrap_or_default(),
        }))
    }

    async fn send_events(
        &self,
        request: Request<v1::SendEventsRequest>,
    ) -> Result<Response<v1::SendEventsResponse>, Status> {
        let state = &self.state;
        let call = state.call(&request).await?;
        let body = request.into_inner();
        let hub = state.hub(&body.event_hub)?;
        let mut outcomes = HubEvents::new(&hub, Rpc::SendEvents).receive(body.events.len() as u64);
        // A hub the caller has no grant for fails each event, as any other per-event refusal.
        if let Err(error) = call.check_grant(&hub, body.events.len() as u64) {
            outcomes.fail_remaining(error.reason());
            let results = body
                .events
                .iter()
                .map(|_| event_result(Err(error.clone())))
                .collect();
            return Ok(Response::new(v1::SendEventsResponse { results }));
        }
        let max = state.limits.max_events_per_request;
        if body.events.len() > max {
            let error = GatewayError::InvalidRequest {
                field: "events".into(),
                reason: format!(
                    "at most {max} events per request (max_events_per_request); got {}",
                    body.events.len()
                ),
            };
            outcomes.fail_remaining(error.reason());
            return Err(error.into());
        }
        if let Err(error) = state.charge(&call, body.events.len()) {
            outcomes.fail_remaining(error.reason());
            return Err(error.into());
        }
        // Enqueued one by one, in request order, so each key keeps that order; then awaited together.
        let mut tickets = Vec::with_capacity(body.events.len());
        for (index, proto) in body.events.into_iter().enumerate() {
            let path = || format!("events[{index}]");
            let enqueued = state
                .enqueue(&call, &hub, proto, call.deadline, &path)
                .await;
            tickets.push((index, enqueued));
        }
        let deadline = call.deadline;
        let answered = join_all(tickets.into_iter().map(|(index, enqueued)| async move {
            let (ticket, _share) = enqueued?;
            ticket
                .outcome_by(deadline)
                .await
                .map_err(|error| GatewayError::event(format!("events[{index}]"), error))
        }))
        .await;
        let accepted = answered.iter().filter(|outcome| outcome.is_ok()).count();
        outcomes.ok(accepted as u64);
        for error in answered.iter().filter_map(|outcome| outcome.as_ref().err()) {
            outcomes.failed(error.reason(), 1);
        }
        let results = answered.into_iter().map(event_result).collect();
        Ok(Response::new(v1::SendEventsResponse { results }))
    }

    type SendStreamStream = stream::AckStream;

    async fn send_stream(
        &self,
        request: Request<Streaming<v1::SendStreamRequest>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let call = self.state.call(&request).await?;
        // A stream is bounded by the caller's deadline only: the send timeout bounds each of its events.
        let deadline = deadline::from_metadata(request.metadata()).map(deadline::answer_before);
        // Set by the connection layer; a call it did not count (none in the server) never ages.
        let going_away = request
            .extensions()
            .get::<GoingAway>()
            .cloned()
            .unwrap_or_else(GoingAway::never);
        let acks = stream::start(
            Arc::clone(&self.state),
            call,
            deadline,
            going_away,
            request.into_inner(),
        );
        Ok(Response::new(acks))
    }

    async fn get_event_hub_properties(
        &self,
        request: Request<v1::GetEventHubPropertiesRequest>,
    ) -> Result<Response<v1::EventHubProperties>, Status> {
        let state = &self.state;
        let call = state.call(&request).await?;
        let hub = state.hub(&request.get_ref().event_hub)?;
        call.check_grant(&hub, 0)?;
        let properties = state
            .producer
            .hub_properties(&hub)
            .await
            .map_err(|error| GatewayError::event("event_hub", error))?;
        Ok(Response::new(v1::EventHubProperties {
            name: properties.name,
            partition_ids: properties.partition_ids,
            created_at: Some(timestamp(properties.created_at)),
        }))
    }
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}
/// Why the gateway is not ready (the one-line body of a 503 from `/readyz`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// The gateway is shutting down.
    #[error("draining")]
    Draining,
    /// No pooled connection is open, live and authorized for every hub; the producer's reason.
    #[error("no ready connection to Event Hubs: {0}")]
    NoConnection(String),
}

impl GatewayState {
    /// The gateway's readiness, the one truth behind `/readyz`, the `ready` gauge and gRPC health: not
    /// draining, and the producer ready ([`Producer::readiness`]).
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.is_draining() {
            return Err(NotReady::Draining);
        }
        self.producer.readiness().map_err(NotReady::NoConnection)
    }
}

impl Readiness for GatewayState {
    fn readiness(&self) -> Result<(), String> {
        GatewayState::readiness(self).map_err(|reason| reason.to_string())
    }
}

impl Report for GatewayState {
    fn report(&self) {
        self.producer.report();
        metrics::counter!(RATE_LIMITED_EVENTS).absolute(self.rate_limits.refused());
        set_ready(GatewayState::readiness(self).is_ok());
    }
}
