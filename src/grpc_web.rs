//! gRPC-Web on the gRPC listener (`[grpc_web]`): its settings and their checks, and the CORS layers that answer
//! browsers' preflights and mark the actual calls' answers readable by the origins the settings allow (and
//! only by them: another origin gets no `Access-Control-*` header at all).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::ConfigError;
use crate::listener::{ConnectionHandle, OpenCall};
use eventhub_wire::settings::seconds;

/// The one origin pattern that is not an origin: any origin, never with credentials.
pub const ANY_ORIGIN: &str = "*";

/// Request headers a browser's gRPC-Web call may carry (what grpc-web and Connect's gRPC-Web transport send,
/// plus the gateway's own: credentials, client id, trace context).
pub const ALLOWED_HEADERS: [&str; 11] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "authorization",
    "x-client-id",
    "traceparent",
    "tracestate",
    "baggage",
];

/// Response headers a browser lets the page read: a trailers-only answer (every refusal) carries its status
/// and rich details in headers.
pub const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// `[grpc_web]`: gRPC-Web (binary and text) on the gRPC listener, which then accepts HTTP/1.1 as well.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcWebConfig {
    /// Serve gRPC-Web, and accept HTTP/1.1 on the gRPC listener. Off by default: HTTP/2 gRPC only.
    pub enabled: bool,
    /// Origins (`https://app.example`, `http://localhost:5173`) whose pages may call, matched exactly; `"*"`
    /// alone allows any. Empty: no CORS headers at all (non-browser gRPC-Web clients need none).
    pub cors_allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight's answer.
    #[serde(rename = "cors_max_age_seconds", with = "seconds")]
    pub cors_max_age: Duration,
}

impl Default for GrpcWebConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cors_allowed_origins: Vec::new(),
            cors_max_age: Duration::from_secs(600),
        }
    }
}

impl GrpcWebConfig {
    /// Checks the section; errors name the key within it (the caller adds `grpc_web`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled && !self.cors_allowed_origins.is_empty() {
            return Err(ConfigError::invalid(
                "cors_allowed_origins",
                "set while grpc_web.enabled is false: set enabled = true, or leave the list empty",
            ));
        }
        let any = self.cors_allowed_origins.iter().any(|o| o == ANY_ORIGIN);
        if any && self.cors_allowed_origins.len() > 1 {
            return Err(ConfigError::invalid(
                "cors_allowed_origins",
                "\"*\" (any origin) stands alone: it already allows every other entry",
            ));
        }
        for (index, origin) in self.cors_allowed_origins.iter().enumerate() {
            if origin != ANY_ORIGIN {
                check_origin(origin).map_err(|problem| {
                    ConfigError::invalid(format!("cors_allowed_origins[{index}]"), problem)
                })?;
            }
        }
        if self.cors_max_age > Duration::from_secs(86_400) {
            return Err(ConfigError::invalid(
                "cors_max_age_seconds",
                "must be at most 86400 s (a day; browsers cap it lower)",
            ));
        }
        Ok(())
    }

    /// The CORS of these settings: [`OriginGateLayer`] outside tower-http's [`CorsLayer`].
    pub fn cors_layers(&self) -> tower::layer::util::Stack<CorsLayer, OriginGateLayer> {
        tower::layer::util::Stack::new(self.cors(), self.origin_gate())
    }

    /// The gate in front of the CORS layer: a preflight from an origin not allowed is refused (403) here, and
    /// any other request from one gets its answer without `Access-Control-*` headers.
    pub fn origin_gate(&self) -> OriginGateLayer {
        let any = self.cors_allowed_origins.iter().any(|o| o == ANY_ORIGIN);
        OriginGateLayer {
            allowed: Arc::new(if any {
                AllowedOrigins::Any
            } else {
                AllowedOrigins::List(
                    self.cors_allowed_origins
                        .iter()
                        .filter_map(|origin| HeaderValue::from_str(origin).ok())
                        .collect(),
                )
            }),
        }
    }

    /// The CORS layer of these settings: preflights (any `OPTIONS`) are answered here and never reach the
    /// service; an allowed origin's preflight and calls get their `Access-Control-*` headers, any other gets
    /// none. Credentials mode is never allowed: callers send `authorization`, not cookies.
    pub fn cors(&self) -> CorsLayer {
        let names = |names: &[&'static str]| -> Vec<HeaderName> {
            names
                .iter()
                .map(|name| HeaderName::from_static(name))
                .collect()
        };
        let origins = if self.cors_allowed_origins.iter().any(|o| o == ANY_ORIGIN) {
            AllowOrigin::any()
        } else {
            // Checked by `validate`: every entry is a valid header value.
            AllowOrigin::list(
                self.cors_allowed_origins
                    .iter()
                    .filter_map(|origin| HeaderValue::from_str(origin).ok()),
            )
        };
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::POST])
            .allow_headers(names(&ALLOWED_HEADERS))
            .expose_headers(names(&EXPOSED_HEADERS))
            .max_age(self.cors_max_age)
    }
}

#[derive(Debug)]
enum AllowedOrigins {
    Any,
    List(Vec<HeaderValue>),
}

impl AllowedOrigins {
    fn allows(&self, origin: &HeaderValue) -> bool {
        match self {
            Self::Any => true,
            Self::List(origins) => origins.contains(origin),
        }
    }
}

/// See [`GrpcWebConfig::origin_gate`].
#[derive(Clone, Debug)]
pub struct OriginGateLayer {
    allowed: Arc<AllowedOrigins>,
}

impl<S> Layer<S> for OriginGateLayer {
    type Service = OriginGate<S>;

    fn layer(&self, inner: S) -> OriginGate<S> {
        OriginGate {
            inner,
            allowed: Arc::clone(&self.allowed),
        }
    }
}

/// The service of [`OriginGateLayer`].
#[derive(Clone, Debug)]
pub struct OriginGate<S> {
    inner: S,
    allowed: Arc<AllowedOrigins>,
}

impl<S, B, ResBody> Service<Request<B>> for OriginGate<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = OriginGateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // No Origin: not a browser's cross-origin call, nothing to hide (CORS adds nothing but Vary either).
        let foreign = request
            .headers()
            .get(header::ORIGIN)
            .is_some_and(|origin| !self.allowed.allows(origin));
        if foreign && request.method() == Method::OPTIONS {
            return OriginGateFuture {
                inner: None,
                foreign,
            };
        }
        OriginGateFuture {
            inner: Some(self.inner.call(request)),
            foreign,
        }
    }
}

pin_project! {
    /// The response future of [`OriginGate`].
    pub struct OriginGateFuture<F> {
        #[pin]
        inner: Option<F>,
        foreign: bool,
    }
}

impl<F, ResBody, E> Future for OriginGateFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            let mut refused = Response::new(ResBody::default());
            *refused.status_mut() = StatusCode::FORBIDDEN;
            return Poll::Ready(Ok(refused));
        };
        let mut response = ready!(inner.poll(cx))?;
        if *this.foreign {
            let headers = response.headers_mut();
            let cors: Vec<HeaderName> = headers
                .keys()
                .filter(|name| name.as_str().starts_with("access-control-"))
                .cloned()
                .collect();
            for name in cors {
                headers.remove(name);
            }
        }
        Poll::Ready(Ok(response))
    }
}

/// How long the rest of a refused HTTP/1.1 request body is read, at most.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads the rest of an HTTP/1.1 request body its call left unread (a request refused by its frame header, say)
/// after the answer, up to `max_bytes` and [`DRAIN_TIME`], with the connection held busy meanwhile. Without
/// it hyper closes the connection under a client still sending, whose write then fails before it reads the
/// refusal; HTTP/2 needs none (a stream is reset alone).
#[derive(Clone, Copy, Debug)]
pub struct Http1DrainLayer {
    /// Most bytes read after the call ended; beyond them the connection is closed.
    pub max_bytes: usize,
}

impl<S> Layer<S> for Http1DrainLayer {
    type Service = Http1Drain<S>;

    fn layer(&self, inner: S) -> Http1Drain<S> {
        Http1Drain {
            inner,
            max_bytes: self.max_bytes,
        }
    }
}

/// The service of [`Http1DrainLayer`].
#[derive(Clone, Debug)]
pub struct Http1Drain<S> {
    inner: S,
    max_bytes: usize,
}

impl<S> Service<Request<tonic::body::Body>> for Http1Drain<S>
where
    S: Service<Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> S::Future {
        if request.version() >= Version::HTTP_2 {
            return self.inner.call(request);
        }
        let hold = request
            .extensions()
            .get::<ConnectionHandle>()
            .map(ConnectionHandle::hold);
        let max_bytes = self.max_bytes;
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(DrainOnDrop {
                inner: Some(body),
                hold,
                max_bytes,
            })
        }))
    }
}

/// A request body whose unread rest is read in a task of its own when it is dropped.
struct DrainOnDrop {
    inner: Option<tonic::body::Body>,
    hold: Option<OpenCall>,
    max_bytes: usize,
}

impl http_body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        match self.inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let (Some(mut body), hold) = (self.inner.take(), self.hold.take()) else {
            return;
        };
        if http_body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let max_bytes = self.max_bytes;
        runtime.spawn(async move {
            let _busy = hold;
            let drained = async {
                let mut read = 0usize;
                while let Some(Ok(frame)) =
                    std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx))
                        .await
                {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > max_bytes {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drained).await;
        });
    }
}

/// Makes a gRPC-Web text body that is not base64 (tonic-web's INTERNAL "tonic-web: Invalid symbol ...") the
/// client's error it is: INVALID_ARGUMENT MALFORMED_REQUEST with its rich details, as for any unreadable
/// message. Other body errors (a connection lost mid-body) pass as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct WebDecodeErrorsLayer;

impl<S> Layer<S> for WebDecodeErrorsLayer {
    type Service = WebDecodeErrors<S>;

    fn layer(&self, inner: S) -> WebDecodeErrors<S> {
        WebDecodeErrors { inner }
    }
}

/// The service of [`WebDecodeErrorsLayer`].
#[derive(Clone, Debug)]
pub struct WebDecodeErrors<S> {
    inner: S,
}

impl<S> Service<Request<tonic::body::Body>> for WebDecodeErrors<S>
where
    S: Service<Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> S::Future {
        self.inner
            .call(request.map(|body| tonic::body::Body::new(DecodeErrors { inner: body })))
    }
}

/// A request body whose base64 decoding errors become MALFORMED_REQUEST.
struct DecodeErrors {
    inner: tonic::body::Body,
}

/// How tonic-web words a text body that does not decode (base64's errors, leftover bytes).
fn undecodable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Internal
        && ["tonic-web: Invalid", "tonic-web: malformed base64"]
            .iter()
            .any(|prefix| status.message().starts_with(prefix))
}

impl http_body::Body for DecodeErrors {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Err(status)) if undecodable(&status) => {
                let detail = status
                    .message()
                    .trim_start_matches("tonic-web: ")
                    .to_owned();
                Poll::Ready(Some(Err(crate::gateway::GatewayError::MalformedRequest {
                    field: None,
                    detail: format!("the gRPC-Web text body is not base64: {detail}"),
                }
                .to_status())))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `origin` is an origin as browsers send it: `http` or `https`, `://`, a lowercase host and an
/// optional port, nothing after (no path, not even `/`).
fn check_origin(origin: &str) -> Result<(), String> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("{origin:?}: an origin starts with https:// or http://"))?;
    if rest.is_empty() {
        return Err(format!("{origin:?}: no host"));
    }
    if let Some(bad) = rest
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:[]".contains(*c)))
    {
        return Err(format!(
            "{origin:?}: {bad:?} is not part of an origin (scheme://host[:port], lowercase, no path or slash)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(origins: &[&str]) -> GrpcWebConfig {
        GrpcWebConfig {
            enabled: true,
            cors_allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..GrpcWebConfig::default()
        }
    }

    fn field_of(config: &GrpcWebConfig) -> String {
        match config.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_section_reads_from_a_config_file_and_errors_name_its_dotted_path() {
        use crate::config::GatewayConfig;
        let config = GatewayConfig::from_file_text(
            "emulator = true\n[grpc_web]\nenabled = true\n\
             cors_allowed_origins = [\"https://app.example\"]\ncors_max_age_seconds = \"10m\"\n",
            false,
        )
        .unwrap();
        assert_eq!(
            config.grpc_web,
            GrpcWebConfig {
                enabled: true,
                cors_allowed_origins: vec!["https://app.example".into()],
                cors_max_age: Duration::from_secs(600),
            }
        );
        match GatewayConfig::from_file_text(
            "emulator = true\n[grpc_web]\nenabled = true\ncors_allowed_origins = [\"app.example\"]\n",
            false,
        ) {
            Err(ConfigError::Invalid { field, .. }) => {
                assert_eq!(field, "grpc_web.cors_allowed_origins[0]")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(GatewayConfig::default().grpc_web, GrpcWebConfig::default());
    }

    #[test]
    fn the_helm_charts_grpc_web_values_are_the_settings_with_their_defaults() {
        use figment::Figment;
        use figment::providers::{Format, Yaml};
        let values = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("helm/eventhub-gateway/values.yaml");
        let chart: GrpcWebConfig = Figment::from(Yaml::file_exact(values))
            .extract_inner("config.grpc_web")
            .unwrap();
        assert_eq!(chart, GrpcWebConfig::default());
    }

    #[test]
    fn origins_are_exact_browser_origins_or_any_alone() {
        assert!(
            config(&[
                "https://app.example",
                "http://localhost:5173",
                "http://[::1]:8080"
            ])
            .validate()
            .is_ok()
        );
        assert!(config(&["*"]).validate().is_ok());
        assert!(config(&[]).validate().is_ok());
        for bad in [
            "app.example",
            "https://app.example/",
            "https://App.example",
            "https://app.example/path",
            "null",
            "https://",
            "ftp://app.example",
        ] {
            assert_eq!(
                field_of(&config(&["https://ok.example", bad])),
                "cors_allowed_origins[1]",
                "{bad}"
            );
        }
        assert_eq!(
            field_of(&config(&["*", "https://app.example"])),
            "cors_allowed_origins"
        );
        let mut off = config(&["https://app.example"]);
        off.enabled = false;
        assert_eq!(field_of(&off), "cors_allowed_origins");
        let mut long = config(&[]);
        long.cors_max_age = Duration::from_secs(86_401);
        assert_eq!(field_of(&long), "cors_max_age_seconds");
    }
}
