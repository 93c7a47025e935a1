//! The request guard in front of the gRPC service: reads each request message's frame and holds it to its
//! method's bounds before tonic buffers or prost decodes it — size as sent and once decompressed (gzip is
//! decompressed here, under a ratio cap), then the pre-scan (`prescan.rs`: event count, JSON depth, decoded
//! size, well-formedness). A message that passes goes on uncompressed; one that does not is replaced by a
//! refusal the codec (`codec.rs`) turns into the call's status, so a bad message costs what it was sent as.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Frame;
use pin_project_lite::pin_project;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use super::prescan::{self, MAX_JSON_DEPTH, ScanError, ScanLimits, Schema};
use super::status::{GatewayError, StreamFault, StreamProgress};

/// Largest `SendEvent` request, bytes: one event of at most 1 MiB (Event Hubs' limit) plus its envelope.
pub const SEND_EVENT_MAX_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Largest `GetEventHubProperties` request, bytes (it carries a hub name).
pub const PROPERTIES_MAX_BYTES: usize = 64 * 1024;

/// Most bytes a compressed message may decompress to per compressed byte...
pub const MAX_COMPRESSION_RATIO: usize = 128;

/// ...once it decompresses to more than this (small messages compress poorly and cost little).
pub const RATIO_FREE_BYTES: usize = 1024 * 1024;

/// The decoded message may occupy at most this many times `max_request_bytes` (the pre-scan's estimate).
pub const DECODED_MULTIPLE: usize = 4;

/// The first byte of a refusal in place of a message: never the first byte of a protobuf message (field 0
/// does not exist), so the codec cannot mistake one for the other.
pub(crate) const REFUSAL_MARK: u8 = 0;

/// gRPC's message header: a compression flag and a 4-byte big-endian length.
const HEADER: usize = 5;

/// The bounds the guard applies, from the gateway's limits.
#[derive(Debug, Clone, Copy)]
pub struct GuardLimits {
    /// `max_request_bytes`: `SendEvents` and each `SendStream` message.
    pub max_request_bytes: usize,
    /// `max_events_per_request`: `SendEvents` and each `SendStream` message.
    pub max_events: usize,
}

/// One method's bounds.
#[derive(Debug, Clone, Copy)]
struct MethodBounds {
    schema: Schema,
    max_bytes: usize,
    /// How the size bound is named to the client.
    setting: &'static str,
    scan: ScanLimits,
}

impl GuardLimits {
    fn method(&self, path: &str) -> Option<MethodBounds> {
        let method = path.rsplit('/').next()?;
        let (schema, max_bytes, setting) = match method {
            "SendEvent" => (
                Schema::SendEvent,
                SEND_EVENT_MAX_BYTES.min(self.max_request_bytes),
                "a SendEvent request's limit",
            ),
            "SendEvents" => (
                Schema::SendEvents,
                self.max_request_bytes,
                "max_request_bytes",
            ),
            "SendStream" => (
                Schema::SendStream,
                self.max_request_bytes,
                "max_request_bytes",
            ),
            "GetEventHubProperties" => (
                Schema::GetEventHubProperties,
                PROPERTIES_MAX_BYTES,
                "a GetEventHubProperties request's limit",
            ),
            _ => return None,
        };
        Some(MethodBounds {
            schema,
            max_bytes,
            setting,
            scan: ScanLimits {
                max_events: self.max_events,
                max_decoded_bytes: DECODED_MULTIPLE.saturating_mul(self.max_request_bytes),
                max_json_depth: MAX_JSON_DEPTH,
            },
        })
    }
}

/// Why the guard refused a message; carried to the codec in place of the message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum Refusal {
    /// Larger than its method allows: as sent, once decompressed, or for its compressed size.
    #[error("{detail}")]
    TooLarge {
        /// The bound crossed, bytes.
        limit: usize,
        /// Which bound, and the size.
        detail: String,
    },
    /// Not the method's message: bad protobuf or UTF-8, broken compression, cut short.
    #[error("{detail}")]
    Malformed {
        /// Where it broke, when known.
        field: Option<String>,
        /// What is wrong.
        detail: String,
    },
    /// Well formed, but over a count, depth or decoded-size limit at `field`.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field path.
        field: String,
        /// The limit broken.
        reason: String,
    },
}

impl Refusal {
    /// The error of a unary call refused this way.
    pub fn into_error(self) -> GatewayError {
        match self {
            Self::TooLarge { limit, detail } => GatewayError::RequestTooLarge { limit, detail },
            Self::Malformed { field, detail } => GatewayError::MalformedRequest { field, detail },
            Self::Invalid { field, reason } => GatewayError::InvalidRequest { field, reason },
        }
    }

    /// The ending of a stream whose next message was refused this way, after `progress`.
    pub fn into_stream_error(self, progress: StreamProgress) -> GatewayError {
        match self {
            Self::TooLarge { limit, detail } => {
                StreamFault::TooLarge { limit }.with_progress(detail, progress)
            }
            Self::Malformed { detail, .. } => {
                StreamFault::Malformed.with_progress(detail, progress)
            }
            Self::Invalid { field, reason } => {
                StreamFault::Invalid { field }.with_progress(reason, progress)
            }
        }
    }

    fn scanned(error: ScanError) -> Self {
        match error {
            ScanError::Malformed { .. } => Self::Malformed {
                field: Some(error.field().to_owned()).filter(|field| !field.is_empty()),
                detail: error.to_string(),
            },
            _ => Self::Invalid {
                field: error.field().to_owned(),
                reason: error.to_string(),
            },
        }
    }

    /// The frame that carries this refusal to the codec.
    fn frame(&self) -> Bytes {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut frame = BytesMut::with_capacity(HEADER + 1 + body.len());
        frame.put_u8(0);
        frame.put_u32((1 + body.len()) as u32);
        frame.put_u8(REFUSAL_MARK);
        frame.put_slice(&body);
        frame.freeze()
    }

    /// The refusal a message starting with [`REFUSAL_MARK`] carries (`payload` without the mark).
    pub(crate) fn parse(payload: &[u8]) -> Self {
        serde_json::from_slice(payload).unwrap_or_else(|_| Self::Malformed {
            field: None,
            detail: "invalid tag value: 0".into(),
        })
    }
}

/// The guard around the gateway's generated service.
#[derive(Debug, Clone)]
pub struct RequestGuard<S> {
    inner: S,
    limits: Arc<GuardLimits>,
}

impl<S> RequestGuard<S> {
    /// Guards `inner` with `limits`.
    pub fn new(inner: S, limits: GuardLimits) -> Self {
        Self {
            inner,
            limits: Arc::new(limits),
        }
    }
}

impl<S: NamedService> NamedService for RequestGuard<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for RequestGuard<S>
where
    S: Service<http::Request<Body>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(bounds) = self.limits.method(request.uri().path()) else {
            // Not a method of ours: tonic answers UNIMPLEMENTED without reading it.
            return self.inner.call(request);
        };
        let gzip = request
            .headers()
            .get("grpc-encoding")
            .is_some_and(|encoding| encoding.as_bytes() == b"gzip");
        self.inner
            .call(request.map(|body| Body::new(GuardBody::new(body, bounds, gzip))))
    }
}

pin_project! {
    /// A request body that passes on each message once it is within bounds, or a refusal in its place.
    pub struct GuardBody<B> {
        #[pin]
        inner: B,
        bounds: MethodBounds,
        gzip: bool,
        buffer: BytesMut,
        out: VecDeque<Bytes>,
        ended: bool,
        trailers: Option<HeaderMap>,
    }
}

impl<B> GuardBody<B> {
    fn new(inner: B, bounds: MethodBounds, gzip: bool) -> Self {
        Self {
            inner,
            bounds,
            gzip,
            buffer: BytesMut::new(),
            out: VecDeque::new(),
            ended: false,
            trailers: None,
        }
    }
}

impl MethodBounds {
    /// A whole frame: passed on plain, or refused.
    fn check(&self, compressed: u8, gzip: bool, payload: Bytes) -> Result<Bytes, Refusal> {
        let payload = match (compressed, gzip) {
            (0, _) => payload,
            (1, true) => self.gunzip(&payload)?,
            (1, false) => {
                return Err(Refusal::Malformed {
                    field: None,
                    detail: "a compressed message without grpc-encoding gzip".into(),
                });
            }
            (flag, _) => {
                return Err(Refusal::Malformed {
                    field: None,
                    detail: format!("invalid compression flag {flag} in the message header"),
                });
            }
        };
        prescan::scan(self.schema, &payload, &self.scan).map_err(Refusal::scanned)?;
        Ok(payload)
    }

    fn gunzip(&self, compressed: &[u8]) -> Result<Bytes, Refusal> {
        let by_ratio = compressed
            .len()
            .saturating_mul(MAX_COMPRESSION_RATIO)
            .max(RATIO_FREE_BYTES);
        let cap = self.max_bytes.min(by_ratio);
        let mut plain = Vec::with_capacity(compressed.len().saturating_mul(4).min(cap) + 1);
        flate2::read::GzDecoder::new(compressed)
            .take(cap as u64 + 1)
            .read_to_end(&mut plain)
            .map_err(|error| Refusal::Malformed {
                field: None,
                detail: format!("its gzip data cannot be decompressed: {error}"),
            })?;
        if plain.len() > cap {
            let detail = if cap == self.max_bytes {
                format!(
                    "it decompresses to more than {cap} bytes ({})",
                    self.setting
                )
            } else {
                format!(
                    "its {} compressed bytes decompress to more than {cap} bytes: above {RATIO_FREE_BYTES} bytes, \
                     at most {MAX_COMPRESSION_RATIO} times the compressed size is taken",
                    compressed.len()
                )
            };
            return Err(Refusal::TooLarge { limit: cap, detail });
        }
        Ok(plain.into())
    }
}

fn header(len: usize) -> Bytes {
    let mut header = BytesMut::with_capacity(HEADER);
    header.put_u8(0);
    header.put_u32(len as u32);
    header.freeze()
}

impl<B> http_body::Body for GuardBody<B>
where
    B: http_body::Body<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut this = self.project();
        loop {
            if let Some(bytes) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if *this.ended {
                return Poll::Ready(
                    this.trailers
                        .take()
                        .map(|trailers| Ok(Frame::trailers(trailers))),
                );
            }
            if this.buffer.len() >= HEADER {
                let flag = this.buffer[0];
                let len = u32::from_be_bytes([
                    this.buffer[1],
                    this.buffer[2],
                    this.buffer[3],
                    this.buffer[4],
                ]) as usize;
                if len > this.bounds.max_bytes {
                    // Refused on its header: none of it is read, and nothing after it.
                    let refusal = Refusal::TooLarge {
                        limit: this.bounds.max_bytes,
                        detail: format!(
                            "the message is {len} bytes; at most {} are taken ({})",
                            this.bounds.max_bytes, this.bounds.setting
                        ),
                    };
                    this.out.push_back(refusal.frame());
                    *this.ended = true;
                    this.buffer.clear();
                    continue;
                }
                if this.buffer.len() >= HEADER + len {
                    this.buffer.advance(HEADER);
                    let payload = this.buffer.split_to(len).freeze();
                    match this.bounds.check(flag, *this.gzip, payload) {
                        Ok(payload) => {
                            this.out.push_back(header(payload.len()));
                            this.out.push_back(payload);
                        }
                        Err(refusal) => {
                            this.out.push_back(refusal.frame());
                            *this.ended = true;
                            this.buffer.clear();
                        }
                    }
                    continue;
                }
                this.buffer.reserve(HEADER + len - this.buffer.len());
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.buffer.extend_from_slice(&data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            *this.trailers = Some(trailers);
                        }
                    }
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => {
                    if !this.buffer.is_empty() {
                        let refusal = Refusal::Malformed {
                            field: None,
                            detail: format!(
                                "the request ends inside a message ({} bytes of it read)",
                                this.buffer.len()
                            ),
                        };
                        this.out.push_back(refusal.frame());
                        this.buffer.clear();
                    }
                    *this.ended = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.out.is_empty() && self.trailers.is_none()
    }
}
