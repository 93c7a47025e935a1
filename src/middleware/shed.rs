//! Load shedding: caps on the calls in flight across the whole server and per peer address, past which a call
//! is answered at once with a fixed gRPC status instead of being queued, so no one client can take every slot.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use super::HeldBody;
use super::client_id::peer_ip;
use eventhub_telemetry::metrics::{CALLS_IN_FLIGHT, Report, SHED_CALLS};

/// Which cap shed a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedBound {
    /// `max_concurrent_calls`: the whole server is full.
    Total,
    /// `max_calls_per_client`: the caller's peer address holds its whole share.
    PerClient,
}

/// Sheds calls beyond a number in flight; clones share one limit and one set of counters.
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    permits: Arc<Semaphore>,
    max_concurrent_calls: usize,
    max_calls_per_client: usize,
    /// Calls in flight per peer address; an address leaves the table with its last call, so the table holds
    /// at most `max_concurrent_calls` entries.
    per_client: Mutex<HashMap<IpAddr, usize>>,
    rejection: tonic::Status,
    per_client_rejection: tonic::Status,
    shed: AtomicU64,
    shed_per_client: AtomicU64,
}

impl Report for LoadShedLayer {
    fn report(&self) {
        let shed_per_client = self.shed_per_client_total();
        metrics::counter!(SHED_CALLS, "bound" => "total")
            .absolute(self.shed_total() - shed_per_client);
        metrics::counter!(SHED_CALLS, "bound" => "per_client").absolute(shed_per_client);
        metrics::gauge!(CALLS_IN_FLIGHT).set(self.in_flight() as f64);
    }
}

impl LoadShedLayer {
    /// A layer letting `max_concurrent_calls` calls in at once (capped at [`Semaphore::MAX_PERMITS`]; 0 sheds
    /// every call), at most `max_calls_per_client` of them from one peer address, and answering the others
    /// with the status `rejection` gives for the cap they hit.
    pub fn new(
        max_concurrent_calls: usize,
        max_calls_per_client: usize,
        rejection: impl Fn(ShedBound) -> tonic::Status,
    ) -> Self {
        // More than MAX_PERMITS would panic in the semaphore; that many calls is no limit anyway.
        let max_concurrent_calls = max_concurrent_calls.min(Semaphore::MAX_PERMITS);
        Self {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(max_concurrent_calls)),
                max_concurrent_calls,
                max_calls_per_client,
                per_client: Mutex::new(HashMap::new()),
                rejection: rejection(ShedBound::Total),
                per_client_rejection: rejection(ShedBound::PerClient),
                shed: AtomicU64::new(0),
                shed_per_client: AtomicU64::new(0),
            }),
        }
    }

    /// Calls rejected so far, at either cap.
    pub fn shed_total(&self) -> u64 {
        self.shared.shed.load(Ordering::Relaxed) + self.shed_per_client_total()
    }

    /// Calls rejected so far because their peer address held its whole share.
    pub fn shed_per_client_total(&self) -> u64 {
        self.shared.shed_per_client.load(Ordering::Relaxed)
    }

    /// Peer addresses with calls in flight now.
    pub fn clients_in_flight(&self) -> usize {
        self.shared.per_client.lock().len()
    }

    /// Calls in flight now (from their start until their response body is finished or dropped).
    pub fn in_flight(&self) -> usize {
        self.shared
            .max_concurrent_calls
            .saturating_sub(self.shared.permits.available_permits())
    }

    /// The most calls in flight at once.
    pub fn max_concurrent_calls(&self) -> usize {
        self.shared.max_concurrent_calls
    }

    /// A place for one call from `peer` outside the gRPC server (the REST listener's requests share the same
    /// caps and counters), or the cap it hit; the place is held until the slot is dropped.
    pub fn admit(&self, peer: Option<IpAddr>) -> Result<CallSlot, ShedBound> {
        let client = ClientSlot::take(&self.shared, peer).map_err(|()| {
            self.shared.shed_per_client.fetch_add(1, Ordering::Relaxed);
            ShedBound::PerClient
        })?;
        match self.shared.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(CallSlot {
                _total: permit,
                _client: client,
            }),
            Err(_) => {
                self.shared.shed.fetch_add(1, Ordering::Relaxed);
                Err(ShedBound::Total)
            }
        }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> LoadShed<S> {
        LoadShed {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`LoadShedLayer`].
#[derive(Clone, Debug)]
pub struct LoadShed<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, ResBody> Service<Request<B>> for LoadShed<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<PermitBody<ResBody>>;
    type Error = S::Error;
    type Future = ShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let client = match ClientSlot::take(&self.shared, peer_ip(request.extensions())) {
            Ok(client) => client,
            Err(()) => {
                self.shared.shed_per_client.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    max_calls_per_client = self.shared.max_calls_per_client,
                    "call shed: its client holds its whole share"
                );
                return ShedFuture::rejected(self.shared.per_client_rejection.clone());
            }
        };
        match self.shared.permits.clone().try_acquire_owned() {
            Ok(permit) => ShedFuture {
                state: State::Called {
                    inner: self.inner.call(request),
                    permit: Some(CallSlot {
                        _total: permit,
                        _client: client,
                    }),
                },
            },
            // The semaphore is never closed, so no permit always means "full".
            Err(_) => {
                self.shared.shed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    max_concurrent_calls = self.shared.max_concurrent_calls,
                    "call shed"
                );
                ShedFuture::rejected(self.shared.rejection.clone())
            }
        }
    }
}

/// A call's place: one of `max_concurrent_calls`, and one of its peer's `max_calls_per_client`.
#[derive(Debug)]
pub struct CallSlot {
    _total: OwnedSemaphorePermit,
    _client: Option<ClientSlot>,
}

/// One of a peer address's calls in flight; leaving, it frees its place (and the address's entry with the
/// last one).
#[derive(Debug)]
pub struct ClientSlot {
    shared: Arc<Shared>,
    peer: IpAddr,
}

impl ClientSlot {
    /// A place for a call from `peer`, unless it holds its whole share; no peer address (not a TCP
    /// listener) takes no share.
    fn take(shared: &Arc<Shared>, peer: Option<IpAddr>) -> Result<Option<Self>, ()> {
        let Some(peer) = peer else {
            return Ok(None);
        };
        let mut per_client = shared.per_client.lock();
        let calls = per_client.entry(peer).or_insert(0);
        if *calls >= shared.max_calls_per_client {
            if *calls == 0 {
                per_client.remove(&peer);
            }
            return Err(());
        }
        *calls += 1;
        Ok(Some(Self {
            shared: Arc::clone(shared),
            peer,
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut per_client = self.shared.per_client.lock();
        if let Some(calls) = per_client.get_mut(&self.peer) {
            *calls -= 1;
            if *calls == 0 {
                per_client.remove(&self.peer);
            }
        }
    }
}

pin_project! {
    /// The response future of [`LoadShed`]: the inner call's, or an immediate rejection.
    pub struct ShedFuture<F> {
        #[pin]
        state: State<F>,
    }
}

impl<F> ShedFuture<F> {
    fn rejected(status: tonic::Status) -> Self {
        Self {
            state: State::Rejected { status },
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called {
            #[pin]
            inner: F,
            permit: Option<CallSlot>,
        },
        Rejected {
            status: tonic::Status,
        },
    }
}

impl<F, ResBody, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<Response<PermitBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { inner, permit } => {
                let result = ready!(inner.poll(cx));
                // A failed call frees its permit now; a response keeps it until its body is done.
                let permit = permit.take();
                Poll::Ready(
                    result.map(|response| response.map(|inner| HeldBody::new(inner, permit))),
                )
            }
            // Trailers-only: grpc-status, grpc-message and grpc-status-details-bin in the headers, no body.
            StateProj::Rejected { status } => Poll::Ready(Ok(status
                .clone()
                .into_http::<ResBody>()
                .map(|inner| HeldBody::new(inner, None)))),
        }
    }
}

/// A response body holding its call's place in the limit until it ends or is dropped.
pub type PermitBody<B> = HeldBody<B, CallSlot>;

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body::{Body, Frame};
    use tokio::sync::mpsc;
    use tonic::Code;
    use tower::{ServiceExt, service_fn};

    use super::*;

    /// A body that stays open until its sender is dropped; the default one is empty, as tonic's is.
    #[derive(Default)]
    struct OpenBody {
        frames: Option<mpsc::Receiver<Bytes>>,
    }

    impl Body for OpenBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match &mut self.frames {
                Some(frames) => frames
                    .poll_recv(cx)
                    .map(|data| data.map(|data| Ok(Frame::data(data)))),
                None => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.frames.is_none()
        }
    }

    /// A shedding service over an inner one that counts its calls and answers with open bodies whose senders
    /// go to `senders`.
    fn service(
        layer: &LoadShedLayer,
        calls: Arc<AtomicUsize>,
        senders: mpsc::UnboundedSender<mpsc::Sender<Bytes>>,
    ) -> impl Service<Request<()>, Response = Response<PermitBody<OpenBody>>, Error = Infallible> + Clone
    {
        layer.layer(service_fn(move |_: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let (sender, frames) = mpsc::channel(1);
            let _ = senders.send(sender);
            async move {
                Ok::<_, Infallible>(Response::new(OpenBody {
                    frames: Some(frames),
                }))
            }
        }))
    }

    async fn next_frame(body: &mut PermitBody<OpenBody>) -> Option<Bytes> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await
            .map(|frame| frame.unwrap().into_data().unwrap())
    }

    fn grpc_status(response: &Response<PermitBody<OpenBody>>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
    }

    #[tokio::test]
    async fn third_call_is_shed_while_two_bodies_are_open() {
        let layer = LoadShedLayer::new(2, usize::MAX, |_| {
            tonic::Status::resource_exhausted("overloaded")
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let (senders_tx, _senders) = mpsc::unbounded_channel();
        let service = service(&layer, calls.clone(), senders_tx);

        let first = service.clone().oneshot(Request::new(())).await.unwrap();
        let _second = service.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(layer.in_flight(), 2);
        assert_eq!(grpc_status(&first), None);

        let shed = service.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the inner service was called"
        );
        assert_eq!(layer.shed_total(), 1);
        assert_eq!(shed.status(), http::StatusCode::OK);
        assert_eq!(
            shed.headers()
                .get("content-type")
                .and_then(|value| value.to_str().ok()),
            Some("application/grpc")
        );
        assert_eq!(grpc_status(&shed), Some("8"));
        assert_eq!(
            shed.headers()
                .get("grpc-message")
                .and_then(|value| value.to_str().ok()),
            Some("overloaded")
        );
        let status = tonic::Status::from_header_map(shed.headers()).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            shed.body().is_end_stream(),
            "trailers-only responses have no body"
        );
        drop(shed);
        assert_eq!(layer.in_flight(), 2, "a shed call held no permit");
    }

    #[tokio::test]
    async fn dropped_body_frees_its_permit() {
        let layer = LoadShedLayer::new(2, usize::MAX, |_| tonic::Status::unavailable("busy"));
        let calls = Arc::new(AtomicUsize::new(0));
        let (senders_tx, _senders) = mpsc::unbounded_channel();
        let service = service(&layer, calls.clone(), senders_tx);

        let first = service.clone().oneshot(Request::new(())).await.unwrap();
        let _second = service.clone().oneshot(Request::new(())).await.unwrap();
        let shed = service.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&shed), Some("14"));

        drop(first);
        assert_eq!(layer.in_flight(), 1);
        let third = service.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&third), None);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(layer.shed_total(), 1);
    }

    #[tokio::test]
    async fn finished_body_frees_its_permit_before_it_is_dropped() {
        let layer = LoadShedLayer::new(2, usize::MAX, |_| {
            tonic::Status::resource_exhausted("overloaded")
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let (senders_tx, mut senders) = mpsc::unbounded_channel();
        let service = service(&layer, calls.clone(), senders_tx);

        let mut first = service
            .clone()
            .oneshot(Request::new(()))
            .await
            .unwrap()
            .into_body();
        let first_sender = senders.recv().await.unwrap();
        let _second = service.clone().oneshot(Request::new(())).await.unwrap();

        // Still streaming: a frame goes through and the call keeps its place.
        first_sender.send(Bytes::from_static(b"ack")).await.unwrap();
        assert_eq!(
            next_frame(&mut first).await,
            Some(Bytes::from_static(b"ack"))
        );
        assert_eq!(layer.in_flight(), 2);
        let shed = service.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&shed), Some("8"));

        drop(first_sender);
        assert_eq!(next_frame(&mut first).await, None);
        assert_eq!(layer.in_flight(), 1);
        let third = service.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(grpc_status(&third), None);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn dropped_response_future_frees_its_permit() {
        let layer = LoadShedLayer::new(1, usize::MAX, |_| {
            tonic::Status::resource_exhausted("overloaded")
        });
        let mut service = layer.layer(service_fn(|_: Request<()>| {
            std::future::pending::<Result<Response<OpenBody>, Infallible>>()
        }));
        let pending = service.call(Request::new(()));
        assert_eq!(layer.in_flight(), 1);
        drop(pending);
        assert_eq!(layer.in_flight(), 0);
    }

    #[tokio::test]
    async fn rejection_carries_status_details() {
        let details = Bytes::from_static(b"\x08\x08\x12\x0aoverloaded");
        let layer = LoadShedLayer::new(0, usize::MAX, |_| {
            tonic::Status::with_details(Code::ResourceExhausted, "overloaded", details.clone())
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let (senders_tx, _senders) = mpsc::unbounded_channel();
        let shed = service(&layer, calls.clone(), senders_tx)
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert!(shed.headers().contains_key("grpc-status-details-bin"));
        let status = tonic::Status::from_header_map(shed.headers()).unwrap();
        assert_eq!(status.details(), &details[..]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    fn from(peer: [u8; 4]) -> Request<()> {
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: Some((peer, 40000).into()),
            });
        request
    }

    #[tokio::test]
    async fn one_peer_takes_at_most_its_share_and_others_are_still_served() {
        let layer = LoadShedLayer::new(10, 2, |bound| {
            tonic::Status::resource_exhausted(format!("{bound:?}"))
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let (senders_tx, _senders) = mpsc::unbounded_channel();
        let service = service(&layer, calls.clone(), senders_tx);
        let greedy = [10, 0, 0, 1];

        let first = service.clone().oneshot(from(greedy)).await.unwrap();
        let _second = service.clone().oneshot(from(greedy)).await.unwrap();
        let shed = service.clone().oneshot(from(greedy)).await.unwrap();
        assert_eq!(grpc_status(&shed), Some("8"));
        assert_eq!(
            tonic::Status::from_header_map(shed.headers())
                .unwrap()
                .message(),
            "PerClient"
        );
        assert_eq!(layer.shed_per_client_total(), 1);
        let other = service.clone().oneshot(from([10, 0, 0, 2])).await.unwrap();
        assert_eq!(grpc_status(&other), None, "another peer is served");
        assert_eq!(layer.clients_in_flight(), 2);

        drop(first);
        let again = service.clone().oneshot(from(greedy)).await.unwrap();
        assert_eq!(
            grpc_status(&again),
            None,
            "a finished call gives its place back"
        );
        drop((again, other, _second));
        assert_eq!(layer.in_flight(), 0);
        assert_eq!(
            layer.clients_in_flight(),
            0,
            "peers leave the table with their last call"
        );
    }

    #[tokio::test]
    async fn a_peer_shed_by_the_total_cap_keeps_no_share() {
        let layer = LoadShedLayer::new(1, 5, |bound| {
            tonic::Status::resource_exhausted(format!("{bound:?}"))
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let (senders_tx, _senders) = mpsc::unbounded_channel();
        let service = service(&layer, calls.clone(), senders_tx);
        let _held = service.clone().oneshot(from([10, 0, 0, 1])).await.unwrap();
        let shed = service.clone().oneshot(from([10, 0, 0, 2])).await.unwrap();
        assert_eq!(
            tonic::Status::from_header_map(shed.headers())
                .unwrap()
                .message(),
            "Total"
        );
        assert_eq!(layer.clients_in_flight(), 1);
    }

    #[test]
    fn clones_share_the_limit() {
        let layer = LoadShedLayer::new(3, usize::MAX, |_| {
            tonic::Status::resource_exhausted("overloaded")
        });
        let clone = layer.clone();
        let _permit = layer.shared.permits.clone().try_acquire_owned().unwrap();
        assert_eq!(clone.in_flight(), 1);
        assert_eq!(clone.max_concurrent_calls(), 3);
    }
}
