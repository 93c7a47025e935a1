//! The W3C trace context of a gRPC call: `traceparent`/`tracestate` into the request's extensions, and the
//! call's `grpc` span around its response future and its response body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;

use eventhub_telemetry::trace_context::TraceContext;

/// The W3C header naming the caller's span.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C header carrying vendor trace state.
pub const TRACESTATE_HEADER: &str = "tracestate";

/// Puts a valid W3C [`TraceContext`] into the request's extensions and runs the call in a `grpc` span.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextLayer;

impl TraceContextLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> TraceContextService<S> {
        TraceContextService { inner }
    }
}

/// The service of [`TraceContextLayer`].
#[derive(Clone, Debug)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S, B, ResBody> Service<Request<B>> for TraceContextService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = TraceContextFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let context = trace_context(request.headers());
        let trace_id = context
            .as_ref()
            .and_then(|context| context.traceparent.get(3..35))
            .unwrap_or("");
        // The path is the client's text (an unknown method's can be kilobytes): logged clipped.
        let path = crate::gateway::status::clip(request.uri().path());
        let path = path.as_ref();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        // OpenTelemetry's RPC conventions: a server span named `service/method`.
        let span = tracing::info_span!(
            "grpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            trace_id = %trace_id,
            identity = tracing::field::Empty,
        );
        if let Some(context) = context {
            eventhub_telemetry::otel::set_remote_parent(&span, &context);
            request.extensions_mut().insert(context);
        }
        // Services may do work (and log) in `call` itself, before their future is first polled.
        let inner = span.in_scope(|| self.inner.call(request));
        TraceContextFuture { inner, span }
    }
}

/// The request's trace context, if it has exactly one valid `traceparent` (for listeners other than gRPC's).
pub fn trace_context(headers: &HeaderMap) -> Option<TraceContext> {
    let mut parents = headers.get_all(TRACEPARENT_HEADER).iter();
    let parent = parents.next()?.to_str().ok()?;
    if parents.next().is_some() {
        // Two parents are ambiguous, so neither is trusted.
        return None;
    }
    // W3C lets tracestate arrive split over several headers, to be read as one comma-separated list; a part
    // that is not text makes the whole list unreliable, so it is dropped rather than passed on damaged.
    let state = headers
        .get_all(TRACESTATE_HEADER)
        .iter()
        .map(|value| value.to_str().ok())
        .collect::<Option<Vec<&str>>>()
        .map(|parts| parts.join(","));
    // An invalid traceparent is ignored, never an error: the call simply starts a new trace.
    TraceContext::parse(parent, state.as_deref()).ok()
}

pin_project! {
    /// The response future of [`TraceContextService`]: polls the inner future in the call's span.
    pub struct TraceContextFuture<F> {
        #[pin]
        inner: F,
        span: Span,
    }
}

impl<F, ResBody, E> Future for TraceContextFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<TracedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let response = ready!(this.inner.poll(cx))?;
        // A failed call answers trailers-only: its status is in these headers (an OK one comes in trailers).
        if let Some(code) = response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<i64>().ok())
        {
            this.span.record("rpc.grpc.status_code", code);
            if code != 0 {
                this.span.record("otel.status_code", "ERROR");
            }
        }
        // Streaming calls do most of their work while the body is polled, after this future is done.
        let span = this.span.clone();
        Poll::Ready(Ok(response.map(|inner| TracedBody { inner, span })))
    }
}

pin_project! {
    /// A response body polled in the call's span.
    pub struct TracedBody<B> {
        #[pin]
        inner: B,
        span: Span,
    }
}

impl<B: Default> Default for TracedBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            span: Span::none(),
        }
    }
}

impl<B: Body> Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let _entered = this.span.enter();
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::fmt::Write as _;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use tower::{ServiceExt, service_fn};
    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::builder().uri("/eventhub.gateway.v1.Gateway/SendEvent");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap()
    }

    /// The TraceContext the layer puts on `request`.
    async fn context_of(request: Request<()>) -> Option<TraceContext> {
        let service =
            TraceContextLayer::new().layer(service_fn(|request: Request<()>| async move {
                let context = request.extensions().get::<TraceContext>().cloned();
                Ok::<_, Infallible>(Response::new(ProbeBody {
                    context,
                    seen: None,
                }))
            }));
        let response = service.oneshot(request).await.unwrap();
        response.into_body().inner.context
    }

    #[tokio::test]
    async fn valid_traceparent_and_tracestate_are_kept() {
        let context = context_of(request(&[
            ("traceparent", TRACEPARENT),
            ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ]))
        .await;
        assert_eq!(
            context,
            Some(TraceContext {
                traceparent: TRACEPARENT.to_owned(),
                tracestate: Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_owned()),
            })
        );
    }

    #[tokio::test]
    async fn split_tracestate_is_joined() {
        let context = context_of(request(&[
            ("traceparent", TRACEPARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ]))
        .await;
        assert_eq!(
            context.and_then(|context| context.tracestate),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_owned())
        );
    }

    #[tokio::test]
    async fn traceparent_without_tracestate() {
        let context = context_of(request(&[("traceparent", TRACEPARENT)])).await;
        assert_eq!(
            context,
            Some(TraceContext {
                traceparent: TRACEPARENT.to_owned(),
                tracestate: None,
            })
        );
    }

    #[tokio::test]
    async fn malformed_traceparent_is_ignored() {
        for bad in [
            // Version ff is forbidden, and a version is two hex digits.
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            // Wrong lengths.
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c0-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            // Uppercase hex, missing parts, nothing.
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "",
        ] {
            let context = context_of(request(&[("traceparent", bad), ("tracestate", "a=b")])).await;
            assert_eq!(context, None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn two_traceparents_are_ignored() {
        let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = context_of(request(&[
            ("traceparent", TRACEPARENT),
            ("traceparent", other),
        ]))
        .await;
        assert_eq!(context, None);
    }

    #[tokio::test]
    async fn absent_traceparent_is_absent() {
        assert_eq!(context_of(request(&[])).await, None);
        assert_eq!(context_of(request(&[("tracestate", "a=b")])).await, None);
    }

    #[tokio::test]
    async fn call_and_body_run_in_the_grpc_span() {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(SpanFields(spans.clone()));
        let _default = tracing::subscriber::set_default(subscriber);

        let service = TraceContextLayer::new().layer(service_fn(|_: Request<()>| async {
            assert_eq!(current_span_name(), Some("grpc"));
            Ok::<_, Infallible>(Response::new(ProbeBody {
                context: None,
                seen: Some(Arc::new(Mutex::new(None))),
            }))
        }));
        let response = service
            .oneshot(request(&[("traceparent", TRACEPARENT)]))
            .await
            .unwrap();
        let mut body = response.into_body();
        let seen = body.inner.seen.clone().unwrap();
        assert!(
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                .await
                .is_none()
        );
        assert_eq!(*seen.lock().unwrap(), Some("grpc"));
        assert_eq!(
            *spans.lock().unwrap(),
            vec![
                "grpc otel.name=eventhub.gateway.v1.Gateway/SendEvent otel.kind=\"server\" \
                 rpc.system=\"grpc\" rpc.service=eventhub.gateway.v1.Gateway rpc.method=SendEvent \
                 trace_id=0af7651916cd43dd8448eb211c80319c"
                    .to_owned()
            ]
        );
    }

    #[tokio::test]
    async fn span_without_trace_context_has_an_empty_trace_id() {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(SpanFields(spans.clone()));
        let _default = tracing::subscriber::set_default(subscriber);

        let service = TraceContextLayer::new().layer(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(ProbeBody {
                context: None,
                seen: None,
            }))
        }));
        let _response = service
            .oneshot(request(&[("traceparent", "garbage")]))
            .await
            .unwrap();
        assert_eq!(
            *spans.lock().unwrap(),
            vec![
                "grpc otel.name=eventhub.gateway.v1.Gateway/SendEvent otel.kind=\"server\" \
                 rpc.system=\"grpc\" rpc.service=eventhub.gateway.v1.Gateway rpc.method=SendEvent \
                 trace_id="
                    .to_owned()
            ]
        );
    }

    fn current_span_name() -> Option<&'static str> {
        Span::current().metadata().map(|metadata| metadata.name())
    }

    /// An empty body that remembers the span it was polled in.
    struct ProbeBody {
        context: Option<TraceContext>,
        seen: Option<Arc<Mutex<Option<&'static str>>>>,
    }

    impl Body for ProbeBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if let Some(seen) = &self.seen {
                *seen.lock().unwrap() = current_span_name();
            }
            Poll::Ready(None)
        }
    }

    /// Records each new span as `name field=value ...`.
    struct SpanFields(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanFields {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Fields(String);
            impl Visit for Fields {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    let _ = write!(self.0, " {}={:?}", field.name(), value);
                }
            }
            let mut fields = Fields(attrs.metadata().name().to_owned());
            attrs.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}
