//! The Event Hubs REST send API on its own listener (`http_listen`, off by default; HTTP/1.1, TLS with the
//! gRPC listener's material): the service's send routes and formats, answered by calling the gateway's
//! `EventHubGateway` service in-process, so authentication, grants, limits and metrics apply unchanged.

mod answer;
mod request;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;
use tonic::transport::server::Connected;

use crate::auth::ResourceTail;
use crate::gateway::limits::Limits;
use crate::gateway::{Gateway, GatewayError};
use crate::listener::{BoundEarly, Connections, accept_with_backoff};
use crate::middleware::{ClientId, LoadShedLayer, ShedBound, peer_ip, trace_context};
use crate::proto::v1;
use crate::proto::v1::event_hub_gateway_server::EventHubGateway as _;
use eventhub_telemetry::metrics::REST_REQUESTS;

pub use answer::{Refusal, http_status};
pub use request::{BATCH_MEDIA_TYPE, Route, Target};

/// At most this many request header fields (hyper answers more with 431).
const MAX_HEADERS: usize = 100;
/// At most this many bytes of request line and headers buffered (hyper answers more with 431).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a stop waits for open requests before dropping them.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a client is told to wait when the call slots are full (as gRPC's OVERLOADED).
const SHED_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Why the REST listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// The address could not be bound.
    #[error("http_listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What every request needs: the service, the shared call slots, the bounds.
#[derive(Clone)]
pub struct RestSettings {
    /// The gateway's service, called in-process.
    pub gateway: Gateway,
    /// The gRPC listener's load shedding: REST requests take the same call slots.
    pub shed: LoadShedLayer,
    /// The gateway's limits (`max_request_bytes`, connection caps, timeouts).
    pub limits: Limits,
    /// The producer's send timeout: bounds a request's body read when it gives no `?timeout=`.
    pub send_timeout: Duration,
    /// The listener's TLS (the gRPC listener's certificate, key and client CA), if any.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A bound listener not serving yet: bound early so a taken port fails the start before anything runs.
pub struct RestListener(BoundEarly);

impl RestListener {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, RestError> {
        BoundEarly::bind(addr)
            .await
            .map(Self)
            .map_err(|source| RestError::Bind { addr, source })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr
    }

    /// Serves the send routes until [`RestServer::shutdown`].
    pub fn serve(self, settings: RestSettings) -> RestServer {
        let stop = CancellationToken::new();
        let local_addr = self.0.local_addr;
        let task = tokio::spawn(accept_loop(self.0.listener, settings, stop.clone()));
        tracing::info!(%local_addr, "REST send API listening");
        RestServer {
            local_addr,
            stop,
            task,
        }
    }
}

/// The running listener.
pub struct RestServer {
    local_addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RestServer {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets open requests finish (briefly), then ends.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, self.task).await.is_err() {
            abort.abort();
        }
    }
}

/// Accepts with the gRPC listener's backoff and caps (its own count of `max_connections`, per client too),
/// does each TLS handshake under `handshake_timeout`, and serves each connection as HTTP/1.1 with the request
/// head read within `header_read_timeout` (an idle keep-alive connection too).
async fn accept_loop(listener: TcpListener, settings: RestSettings, stop: CancellationToken) {
    let limits = &settings.limits;
    let connections = Connections::new(limits.max_connections, limits.max_connections_per_client);
    let incoming = connections.limit(accept_with_backoff(listener));
    tokio::pin!(incoming);
    let acceptor = settings.tls.clone().map(TlsAcceptor::from);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES);
    let open = TaskTracker::new();
    let settings = Arc::new(settings);
    loop {
        let stream = tokio::select! {
            stream = incoming.next() => stream,
            () = stop.cancelled() => break,
        };
        let Some(stream) = stream else { break };
        let (settings, http, stop, acceptor) = (
            Arc::clone(&settings),
            http.clone(),
            stop.clone(),
            acceptor.clone(),
        );
        open.spawn(async move {
            match acceptor {
                None => {
                    let info = stream.connect_info();
                    serve_connection(stream, info, settings, http, stop).await;
                }
                Some(acceptor) => {
                    let handshake = settings.limits.handshake_timeout;
                    match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let info = stream.connect_info();
                            serve_connection(stream, info, settings, http, stop).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, "REST: TLS handshake failed"),
                        Err(_) => tracing::debug!(
                            handshake_timeout = ?handshake,
                            "REST: connection closed, no TLS handshake in time"
                        ),
                    }
                }
            }
        });
    }
    open.close();
    open.wait().await;
}

/// Serves one connection; its connect info (peer address, TLS certificates) goes into every request, where
/// tonic's server would put it, so the gateway reads it the same way.
async fn serve_connection<S, I>(
    stream: S,
    info: I,
    settings: Arc<RestSettings>,
    http: hyper::server::conn::http1::Builder,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(info.clone());
        let settings = Arc::clone(&settings);
        async move { Ok::<_, std::convert::Infallible>(handle(&settings, request).await) }
    });
    let served = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = stop.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "REST connection closed");
    }
}

/// One request, from its route to its answer.
async fn handle(settings: &RestSettings, request: http::Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let trace = trace_context(&parts.headers);
    let route = Route::parse(parts.uri.path());
    let span = tracing::info_span!(
        "rest",
        otel.name = route.as_ref().map_or("unknown route", |route| match route.target {
            Target::Hub => "POST /{hub}/messages",
            Target::Partition(_) => "POST /{hub}/partitions/{id}/messages",
            Target::Publisher(_) => "POST /{hub}/publishers/{publisher}/messages",
        }),
        otel.kind = "server",
        http.request.method = %parts.method,
        http.response.status_code = tracing::field::Empty,
        identity = tracing::field::Empty,
    );
    if let Some(context) = &trace {
        eventhub_telemetry::otel::set_remote_parent(&span, context);
    }
    let route_kind = route.as_ref().map(|route| route.target.clone());
    let response =
        tracing::Instrument::instrument(answer(settings, parts, body, route, trace), span.clone())
            .await;
    span.record("http.response.status_code", response.status().as_u16());
    let route_label = match route_kind {
        Some(Target::Hub) => "hub",
        Some(Target::Partition(_)) => "partition",
        Some(Target::Publisher(_)) => "publisher",
        None => "none",
    };
    metrics::counter!(
        REST_REQUESTS,
        "route" => route_label,
        "status" => response.status().as_str().to_owned()
    )
    .increment(1);
    response
}

async fn answer(
    settings: &RestSettings,
    parts: http::request::Parts,
    body: Incoming,
    route: Option<Route>,
    trace: Option<eventhub_producer::TraceContext>,
) -> Response<Body> {
    let Some(route) = route else {
        return Refusal::routing(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "no such route: POST /{hub}/messages, /{hub}/partitions/{id}/messages or \
             /{hub}/publishers/{publisher}/messages",
        )
        .into_response();
    };
    if parts.method != Method::POST {
        let mut response = Refusal::routing(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unimplemented,
            "the send routes take POST only",
        )
        .into_response();
        response
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let refuse = |error: GatewayError| Refusal::from_error(&error).into_response();
    // A place among the gRPC calls' slots, held to the answer: REST requests are shed as gRPC calls are.
    let _slot = match settings.shed.admit(peer_ip(&parts.extensions)) {
        Ok(slot) => slot,
        Err(bound) => {
            return refuse(GatewayError::Overloaded {
                bound: match bound {
                    ShedBound::Total => "limits.max_concurrent_calls",
                    ShedBound::PerClient => "limits.max_calls_per_client",
                },
                retry_after: SHED_RETRY_AFTER,
            });
        }
    };
    let timeout = match request::timeout(parts.uri.query()) {
        Ok(timeout) => timeout,
        Err(error) => return refuse(error),
    };
    if let Some(encoding) = parts.headers.get(http::header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        let mut response = refuse(GatewayError::MalformedRequest {
            field: Some("Content-Encoding".into()),
            detail: "compressed bodies are not accepted: send the body as is".into(),
        });
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return response;
    }
    let read_within = timeout
        .unwrap_or(settings.send_timeout)
        .min(settings.send_timeout);
    let body = match read_body(
        body,
        &parts.headers,
        settings.limits.max_request_bytes,
        read_within,
    )
    .await
    {
        Ok(body) => body,
        Err(error) => return refuse(error),
    };
    let batch = request::is_batch(&parts.headers);
    let events = match request::events(&route, &parts.headers, body) {
        Ok(events) => events,
        Err(error) => return refuse(error),
    };
    let call = CallParts {
        headers: &parts.headers,
        extensions: &parts.extensions,
        timeout,
        trace,
        tail: route.tail(),
    };
    let gateway = &settings.gateway;
    if batch {
        let count = events.len();
        let request = call.request(v1::SendEventsRequest {
            event_hub: route.hub.clone(),
            events,
        });
        match gateway.send_events(request).await {
            Ok(response) => {
                let results = response.into_inner().results;
                let outcomes = (0..count)
                    .map(|index| match results.get(index) {
                        Some(result) => outcome(result),
                        None => missing_outcome(),
                    })
                    .collect();
                answer::batch_response(outcomes)
            }
            Err(status) => Refusal::from_status(&status).into_response(),
        }
    } else {
        let event = events.into_iter().next();
        let request = call.request(v1::SendEventRequest {
            event_hub: route.hub.clone(),
            event,
        });
        match gateway.send_event(request).await {
            Ok(_) => answer::created(),
            Err(status) => Refusal::from_status(&status).into_response(),
        }
    }
}

fn outcome(result: &v1::EventResult) -> answer::EventOutcome {
    match &result.status {
        Some(status) if status.code != Code::Ok as i32 => {
            let refusal = Refusal::from_rpc(status);
            answer::EventOutcome {
                status: refusal.http,
                partition_id: None,
                error: Some(refusal),
            }
        }
        _ => answer::EventOutcome {
            status: StatusCode::CREATED.as_u16(),
            partition_id: Some(result.partition_id.clone()).filter(|id| !id.is_empty()),
            error: None,
        },
    }
}

fn missing_outcome() -> answer::EventOutcome {
    let refusal = Refusal::routing(
        StatusCode::INTERNAL_SERVER_ERROR,
        Code::Internal,
        "the gateway gave no result for this event",
    );
    answer::EventOutcome {
        status: refusal.http,
        partition_id: None,
        error: Some(refusal),
    }
}

/// The body, at most `limit` bytes (refused as soon as `Content-Length` or the bytes read pass it), read
/// within `within`.
async fn read_body(
    body: Incoming,
    headers: &HeaderMap,
    limit: usize,
    within: Duration,
) -> Result<Bytes, GatewayError> {
    let too_large = |detail: String| GatewayError::RequestTooLarge { limit, detail };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if let Some(length) = declared
        && length > limit as u64
    {
        return Err(too_large(format!(
            "the body is {length} bytes; at most {limit} are accepted (limits.max_request_bytes)"
        )));
    }
    let collected = tokio::time::timeout(within, Limited::new(body, limit).collect()).await;
    match collected {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large(
            format!("the body is over {limit} bytes (limits.max_request_bytes)"),
        )),
        Ok(Err(error)) => Err(GatewayError::MalformedRequest {
            field: Some("body".into()),
            detail: format!("the body could not be read: {error}"),
        }),
        Err(_) => Err(GatewayError::MalformedRequest {
            field: Some("body".into()),
            detail: format!("the body did not arrive within {within:?}"),
        }),
    }
}

/// What the gRPC middleware would have left in a call: its credentials, deadline, client id, peer, trace.
struct CallParts<'a> {
    headers: &'a HeaderMap,
    extensions: &'a http::Extensions,
    timeout: Option<Duration>,
    trace: Option<eventhub_producer::TraceContext>,
    tail: Vec<String>,
}

impl CallParts<'_> {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut headers = HeaderMap::new();
        if let Some(authorization) = self.headers.get(http::header::AUTHORIZATION) {
            headers.insert(http::header::AUTHORIZATION, authorization.clone());
        }
        if let Some(timeout) = self.timeout
            && let Ok(value) = HeaderValue::from_str(&format!("{}S", timeout.as_secs()))
        {
            headers.insert("grpc-timeout", value);
        }
        let mut request = http::Request::new(message);
        *request.headers_mut() = headers;
        let extensions = request.extensions_mut();
        // The connect info first: the client id falls back to the peer address it holds.
        *extensions = self.extensions.clone();
        let client = ClientId::of_request(self.headers, extensions);
        extensions.insert(client);
        if let Some(trace) = &self.trace {
            extensions.insert(trace.clone());
        }
        if !self.tail.is_empty() {
            extensions.insert(ResourceTail(self.tail.clone()));
        }
        tonic::Request::from_http(request)
    }
}
