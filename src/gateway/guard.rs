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
        // The last chunk received, not yet looked at: whole frames are cut from it without a copy.
        chunk: Bytes,
        // A frame that spans chunks, gathered.
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
            chunk: Bytes::new(),
            buffer: BytesMut::new(),
            out: VecDeque::new(),
            ended: false,
            trailers: None,
        }
    }
}

/// What the bytes at hand hold.
enum Cut {
    /// A whole frame: its compression flag and payload.
    Frame(u8, Bytes),
    /// A frame whose header announces more than the method takes.
    TooLarge(usize),
    /// Not a whole frame yet.
    Partial,
}

/// The header's flag and length, if `bytes` holds a whole header.
fn peek_header(bytes: &[u8]) -> Option<(u8, usize)> {
    let header: [u8; HEADER] = bytes.get(..HEADER)?.try_into().ok()?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    Some((header[0], len))
}

impl MethodBounds {
    /// Cuts the next frame from the unread `chunk` (no copy) when nothing is gathered, else gathers.
    fn cut(&self, chunk: &mut Bytes, buffer: &mut BytesMut) -> Cut {
        if buffer.is_empty()
            && let Some((flag, len)) = peek_header(chunk)
        {
            if len > self.max_bytes {
                return Cut::TooLarge(len);
            }
            if chunk.len() >= HEADER + len {
                let mut frame = chunk.split_to(HEADER + len);
                frame.advance(HEADER);
                return Cut::Frame(flag, frame);
            }
        }
        if !chunk.is_empty() {
            buffer.extend_from_slice(chunk);
            *chunk = Bytes::new();
        }
        let Some((flag, len)) = peek_header(buffer) else {
            return Cut::Partial;
        };
        if len > self.max_bytes {
            return Cut::TooLarge(len);
        }
        if buffer.len() < HEADER + len {
            buffer.reserve(HEADER + len - buffer.len());
            return Cut::Partial;
        }
        buffer.advance(HEADER);
        Cut::Frame(flag, buffer.split_to(len).freeze())
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
            let refusal = match this.bounds.cut(this.chunk, this.buffer) {
                Cut::Frame(flag, payload) => match this.bounds.check(flag, *this.gzip, payload) {
                    Ok(payload) => {
                        this.out.push_back(header(payload.len()));
                        this.out.push_back(payload);
                        continue;
                    }
                    Err(refusal) => refusal,
                },
                // Refused on its header: none of it is read, and nothing after it.
                Cut::TooLarge(len) => Refusal::TooLarge {
                    limit: this.bounds.max_bytes,
                    detail: format!(
                        "the message is {len} bytes; at most {} are taken ({})",
                        this.bounds.max_bytes, this.bounds.setting
                    ),
                },
                Cut::Partial => match ready!(this.inner.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        match frame.into_data() {
                            Ok(data) => *this.chunk = data,
                            Err(frame) => {
                                if let Ok(trailers) = frame.into_trailers() {
                                    *this.trailers = Some(trailers);
                                }
                            }
                        }
                        continue;
                    }
                    Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                    None if this.buffer.is_empty() => {
                        *this.ended = true;
                        continue;
                    }
                    None => Refusal::Malformed {
                        field: None,
                        detail: format!(
                            "the request ends inside a message ({} bytes of it read)",
                            this.buffer.len()
                        ),
                    },
                },
            };
            this.out.push_back(refusal.frame());
            *this.ended = true;
            this.buffer.clear();
            *this.chunk = Bytes::new();
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.out.is_empty() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1;
    use http_body_util::BodyExt;
    use prost::Message;
    use rand::{Rng, SeedableRng};

    const LIMITS: GuardLimits = GuardLimits {
        max_request_bytes: 2 << 20,
        max_events: 100,
    };

    fn frame(payload: &[u8], compressed: bool) -> Vec<u8> {
        let mut frame = vec![u8::from(compressed)];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// The frames the guard passes on for `bytes` arriving in `chunks` pieces: (flag, payload) each.
    async fn guarded(method: &str, gzip: bool, bytes: &[u8], cuts: &[usize]) -> Vec<(u8, Vec<u8>)> {
        let mut chunks = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain([&bytes.len()]) {
            chunks.push(Ok::<_, Status>(Frame::data(Bytes::copy_from_slice(
                &bytes[at..cut],
            ))));
            at = cut;
        }
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        let bounds = LIMITS.method(method).unwrap();
        let out = GuardBody::new(inner, bounds, gzip)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let mut frames = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let (flag, len) = peek_header(rest).expect("whole frames only");
            frames.push((flag, rest[HEADER..HEADER + len].to_vec()));
            rest = &rest[HEADER + len..];
        }
        frames
    }

    fn refusal(frames: &[(u8, Vec<u8>)]) -> Refusal {
        let (flag, payload) = frames.last().unwrap();
        assert_eq!((*flag, payload[0]), (0, REFUSAL_MARK), "{frames:?}");
        Refusal::parse(&payload[1..])
    }

    fn stream_message(sequence: u64, events: usize) -> Vec<u8> {
        v1::SendStreamRequest {
            event_hub: String::new(),
            sequence,
            event: None,
            events: (0..events)
                .map(|i| v1::Event {
                    body: Some(v1::event::Body::Text(format!("event {i}"))),
                    ..Default::default()
                })
                .collect(),
        }
        .encode_to_vec()
    }

    #[tokio::test]
    async fn messages_pass_whole_and_in_order_however_they_are_split_and_compressed() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let messages: Vec<Vec<u8>> = (0..6)
            .map(|i| stream_message(i, 1 + i as usize * 7))
            .collect();
        for round in 0..200 {
            let compressed = round % 2 == 1;
            let mut bytes = Vec::new();
            for message in &messages {
                bytes.extend(if compressed {
                    frame(&gzip(message), true)
                } else {
                    frame(message, false)
                });
            }
            let mut cuts: Vec<usize> = (0..rng.random_range(0..8))
                .map(|_| rng.random_range(0..=bytes.len()))
                .collect();
            cuts.sort_unstable();
            let frames = guarded(
                "/eventhub.gateway.v1.EventHubGateway/SendStream",
                compressed,
                &bytes,
                &cuts,
            )
            .await;
            let expected: Vec<(u8, Vec<u8>)> = messages.iter().map(|m| (0, m.clone())).collect();
            assert_eq!(frames, expected, "round {round}, cuts {cuts:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_message_ends_what_is_passed_on_after_the_messages_before_it() {
        let first = stream_message(1, 2);
        let too_many = stream_message(2, 101);
        let mut bytes = frame(&first, false);
        bytes.extend(frame(&too_many, false));
        bytes.extend(frame(&first, false));
        let frames = guarded("/x.y/SendStream", false, &bytes, &[3, 40]).await;
        assert_eq!(frames.len(), 2, "the message after the refusal is not read");
        assert_eq!(frames[0], (0, first));
        let Refusal::Invalid { field, reason } = refusal(&frames) else {
            panic!("{frames:?}")
        };
        assert_eq!(field, "events");
        assert!(
            reason.contains("at most 100 events") && reason.contains("got 101"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn sizes_are_bounded_per_method_as_sent_and_once_decompressed() {
        // A SendEvent over 1088 KiB is refused on its header alone.
        let header_only = [0, 0x00, 0x11, 0x00, 0x01];
        let frames = guarded("/p/SendEvent", false, &header_only, &[]).await;
        assert!(matches!(
            refusal(&frames),
            Refusal::TooLarge {
                limit: SEND_EVENT_MAX_BYTES,
                ..
            }
        ));
        // The same size is fine in SendEvents... up to max_request_bytes.
        let frames = guarded("/p/SendEvents", false, &[0, 0x00, 0x21, 0x00, 0x00], &[]).await;
        assert!(matches!(refusal(&frames), Refusal::TooLarge { limit, .. } if limit == 2 << 20));
        // 3 MiB of zeros in an unknown field gzip to a few KB: over the ratio (and over the size).
        let mut zeros = vec![0x1a];
        prost::encoding::encode_varint(3 << 20, &mut zeros);
        zeros.resize(zeros.len() + (3 << 20), 0);
        let frames = guarded("/p/SendEvents", true, &frame(&gzip(&zeros), true), &[]).await;
        let Refusal::TooLarge { limit, detail } = refusal(&frames) else {
            panic!("{frames:?}")
        };
        assert!(
            limit < 2 << 20 && detail.contains("128 times"),
            "{limit}: {detail}"
        );
        // Under 1 MiB decompressed, any ratio is taken.
        let mut small = vec![0x1a];
        prost::encoding::encode_varint(900_000, &mut small);
        small.resize(small.len() + 900_000, 0);
        let frames = guarded("/p/SendEvents", true, &frame(&gzip(&small), true), &[]).await;
        assert_eq!(frames, [(0, small)]);
    }

    #[tokio::test]
    async fn broken_compression_flags_and_cut_messages_are_malformed() {
        let message = stream_message(1, 1);
        let cases: Vec<(bool, Vec<u8>, &str)> = vec![
            (true, frame(b"not gzip", true), "cannot be decompressed"),
            (
                false,
                frame(&gzip(&message), true),
                "without grpc-encoding gzip",
            ),
            (
                false,
                {
                    let mut f = frame(&message, false);
                    f[0] = 7;
                    f
                },
                "invalid compression flag 7",
            ),
            (
                false,
                frame(&message, false)[..9].to_vec(),
                "ends inside a message",
            ),
            (false, vec![0, 0], "ends inside a message"),
        ];
        for (gzip, bytes, expected) in cases {
            let frames = guarded("/p/SendStream", gzip, &bytes, &[1]).await;
            let Refusal::Malformed { detail, .. } = refusal(&frames) else {
                panic!("{frames:?}")
            };
            assert!(detail.contains(expected), "{detail}");
        }
        // An empty request passes as empty (tonic answers that it has no message).
        assert!(guarded("/p/SendEvent", false, &[], &[]).await.is_empty());
    }
}
