//! The byte stream between fe2o3 and the socket: outgoing frames written the way the service writes them,
//! incoming frame headers checked before fe2o3 decodes them, and the time of the peer's last byte.
//!
//! AMQP lets an encoder drop trailing null fields of a performative, and fe2o3 does. The service never does,
//! and some clients depend on it: pyamqp (the Python SDK's stack) reads fields by position, and appends a
//! transfer's payload after the fields it decoded, so a shortened `open`, `attach`, `detach` or `transfer`
//! breaks it. This adapter pads each performative's list with nulls, and writes the emulator's
//! `idle-time-out` into its `open` (fe2o3 would enforce one set on its acceptor to the millisecond, without
//! the slack a peer heartbeating at exactly that period needs).
//!
//! fe2o3's frame decoder panics on a frame whose size field is 4 to 7 (shorter than the 8-byte frame header),
//! so incoming frames are checked here first: such a frame, or a data offset outside its frame, ends the
//! stream with an `InvalidData` error instead.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::info;

/// Above this much rewritten-but-unwritten output, writes wait for the socket.
const MAX_BUFFERED: usize = 256 * 1024;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// The size of an AMQP frame header, and so the smallest frame there is.
const FRAME_HEADER_SIZE: u32 = 8;

/// A stream whose outgoing performatives carry every field and whose incoming frames are well-formed.
#[derive(Debug)]
pub struct FullFieldFrames<S> {
    inner: S,
    /// Bytes written by fe2o3 that do not yet form a whole frame.
    incoming: BytesMut,
    /// Rewritten bytes waiting for the socket.
    outgoing: BytesMut,
    /// Written into an outgoing `open` that has none.
    idle_time_out_ms: Option<u32>,
    /// Checks what the peer sends before fe2o3 reads it.
    received: IncomingFrames,
    /// Told of every byte the peer sends.
    activity: Option<Arc<PeerActivity>>,
    /// Once this resolves, every read and write fails, so that fe2o3's engine lets go of the socket even
    /// when a dead peer never answers its `close`.
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<S> FullFieldFrames<S> {
    /// Wraps a stream.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            incoming: BytesMut::new(),
            outgoing: BytesMut::new(),
            idle_time_out_ms: None,
            received: IncomingFrames::default(),
            activity: None,
            cut: None,
        }
    }

    /// Fails every read and write once `token` is cancelled.
    pub fn cut_by(mut self, token: CancellationToken) -> Self {
        self.cut = Some(Box::pin(token.cancelled_owned()));
        self
    }

    /// An error once the stream has been cut (registering the task to be woken when it is).
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(cut) = &mut self.cut else {
            return Ok(());
        };
        if cut.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the emulator ended the connection",
            ));
        }
        Ok(())
    }

    /// Announces `idle_time_out_ms` in the `open` sent (0: none).
    pub fn announcing_idle_time_out(mut self, idle_time_out_ms: u32) -> Self {
        self.idle_time_out_ms = (idle_time_out_ms > 0).then_some(idle_time_out_ms);
        self
    }

    /// Records in `activity` when the peer last sent anything.
    pub fn recording_activity(mut self, activity: Arc<PeerActivity>) -> Self {
        self.activity = Some(activity);
        self
    }
}

/// When a peer last sent a byte: a peer silent for longer than its heartbeat period is gone.
#[derive(Debug)]
pub struct PeerActivity {
    since: Instant,
    /// Milliseconds after `since` of the last byte received.
    last_ms: AtomicU64,
}

impl PeerActivity {
    /// A peer heard from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(elapsed, Ordering::Relaxed);
    }

    /// How long since the peer last sent anything.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

/// The receiving side's check of frame headers. Bytes are handed on only once the header of the frame they
/// belong to has been checked, so fe2o3 never sees a size field it would panic on.
#[derive(Debug, Default)]
struct IncomingFrames {
    /// Bytes read from the socket and not yet handed on.
    pending: BytesMut,
    /// How many bytes at the front of `pending` are checked and may be handed on.
    checked: usize,
    /// How many bytes of the current frame's body have not been read yet.
    frame_rest: usize,
    /// Why the stream was found malformed; every later read fails with it.
    malformed: Option<String>,
}

impl IncomingFrames {
    /// Checks what can be checked of `pending`; an error says what is malformed.
    fn check(&mut self) -> Result<(), String> {
        loop {
            let unchecked = &self.pending[self.checked..];
            if self.frame_rest > 0 {
                let n = self.frame_rest.min(unchecked.len());
                if n == 0 {
                    return Ok(());
                }
                self.checked += n;
                self.frame_rest -= n;
                continue;
            }
            if unchecked.len() < 4 {
                return Ok(());
            }
            // Protocol headers come at frame boundaries: first, and again after SASL.
            if unchecked.starts_with(b"AMQP") {
                if unchecked.len() < 8 {
                    return Ok(());
                }
                self.checked += 8;
                continue;
            }
            let size = u32::from_be_bytes([unchecked[0], unchecked[1], unchecked[2], unchecked[3]]);
            if size < FRAME_HEADER_SIZE {
                return Err(format!(
                    "a frame's size field says {size} bytes, less than the {FRAME_HEADER_SIZE}-byte frame header"
                ));
            }
            let Some(&data_offset) = unchecked.get(4) else {
                return Ok(());
            };
            if data_offset < 2 || u32::from(data_offset) * 4 > size {
                return Err(format!(
                    "a frame of {size} bytes has data offset {data_offset}: its body must start after the \
                     8-byte header and within the frame"
                ));
            }
            self.checked += 5;
            self.frame_rest = size as usize - 5;
        }
    }
}

/// How many fields a performative has, by frame type and descriptor code.
fn field_count(frame_type: u8, code: u64) -> Option<usize> {
    match (frame_type, code) {
        (0, 0x10) => Some(10),                        // open
        (0, 0x11) => Some(8),                         // begin
        (0, 0x12) => Some(14),                        // attach
        (0, 0x13) => Some(11),                        // flow
        (0, 0x14) => Some(11),                        // transfer
        (0, 0x15) => Some(6),                         // disposition
        (0, 0x16) => Some(3),                         // detach
        (0, 0x17) | (0, 0x18) => Some(1),             // end, close
        (1, 0x40) | (1, 0x42) | (1, 0x43) => Some(1), // sasl-mechanisms, -challenge, -response
        (1, 0x41) => Some(3),                         // sasl-init
        (1, 0x44) => Some(2),                         // sasl-outcome
        _ => None,
    }
}

/// Moves every complete protocol header and frame from `incoming` to `outgoing`, padding performatives
/// (and giving an `open` the idle time-out, if one is to be announced).
fn rewrite_complete_frames(
    incoming: &mut BytesMut,
    outgoing: &mut BytesMut,
    idle_time_out_ms: Option<u32>,
) {
    loop {
        if incoming.starts_with(b"AMQP") || (incoming.len() < 4 && b"AMQP".starts_with(incoming)) {
            if incoming.len() < 8 {
                return;
            }
            outgoing.put(incoming.split_to(8));
            continue;
        }
        if incoming.len() < 4 {
            return;
        }
        let size =
            u32::from_be_bytes([incoming[0], incoming[1], incoming[2], incoming[3]]) as usize;
        if size < 8 {
            // Not a frame this adapter understands: pass everything through untouched.
            outgoing.put(incoming.split());
            return;
        }
        if incoming.len() < size {
            return;
        }
        let frame = incoming.split_to(size);
        match padded(&frame, idle_time_out_ms) {
            Some(padded) => outgoing.put_slice(&padded),
            None => outgoing.put_slice(&frame),
        }
    }
}

/// The frame with its performative padded to the full field count (and an `open`'s null idle-time-out set
/// to `idle_time_out_ms`); `None` when it needs no change.
fn padded(frame: &[u8], idle_time_out_ms: Option<u32>) -> Option<Vec<u8>> {
    let body_start = usize::from(*frame.get(4)?) * 4;
    let frame_type = *frame.get(5)?;
    let body = frame.get(body_start..)?;
    if body.first() != Some(&0x00) {
        return None;
    }
    let (code, descriptor_len) = match *body.get(1)? {
        0x53 => (u64::from(*body.get(2)?), 3),
        0x80 => (u64::from_be_bytes(body.get(2..10)?.try_into().ok()?), 10),
        _ => return None,
    };
    let full = field_count(frame_type, code)?;
    let list = body.get(descriptor_len..)?;
    let (count, elements, list_len) = match *list.first()? {
        0x45 => (0, &[][..], 1),
        0xc0 => {
            let size = usize::from(*list.get(1)?);
            (usize::from(*list.get(2)?), list.get(3..2 + size)?, 2 + size)
        }
        0xd0 => {
            let size = u32::from_be_bytes(list.get(1..5)?.try_into().ok()?) as usize;
            let count = u32::from_be_bytes(list.get(5..9)?.try_into().ok()?) as usize;
            (count, list.get(9..5 + size)?, 5 + size)
        }
        _ => return None,
    };
    let mut fields = elements.to_vec();
    fields.resize(elements.len() + full.saturating_sub(count), 0x40); // 0x40: null
    let announced = match (frame_type, code, idle_time_out_ms) {
        (0, 0x10, Some(ms)) => set_null_field(&mut fields, OPEN_IDLE_TIME_OUT_FIELD, ms),
        _ => false,
    };
    if count >= full && !announced {
        return None;
    }
    let full = full.max(count);
    let mut encoded_list = Vec::with_capacity(fields.len() + 9);
    if fields.len() < 255 {
        encoded_list.extend_from_slice(&[0xc0, (fields.len() + 1) as u8, full as u8]);
    } else {
        encoded_list.push(0xd0);
        encoded_list.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
        encoded_list.extend_from_slice(&(full as u32).to_be_bytes());
    }
    encoded_list.extend_from_slice(&fields);
    let payload = list.get(list_len..)?;

    let header = &frame[4..body_start];
    let size = 4 + header.len() + descriptor_len + encoded_list.len() + payload.len();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(size as u32).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(&body[..descriptor_len]);
    out.extend_from_slice(&encoded_list);
    out.extend_from_slice(payload);
    Some(out)
}

/// The position of `idle-time-out` among an `open`'s fields.
const OPEN_IDLE_TIME_OUT_FIELD: usize = 4;

/// Replaces the field at `index` of an encoded list's elements with a uint, when it is null; true when it was.
fn set_null_field(fields: &mut Vec<u8>, index: usize, value: u32) -> bool {
    let mut start = 0;
    for _ in 0..index {
        match fields.get(start..).and_then(encoded_len) {
            Some(len) => start += len,
            None => return false,
        }
    }
    if fields.get(start) != Some(&0x40) {
        return false;
    }
    let mut uint = vec![0x70]; // uint, 4 bytes
    uint.extend_from_slice(&value.to_be_bytes());
    fields.splice(start..=start, uint);
    true
}

/// The length of the AMQP-encoded value at the start of `bytes`, from its constructor.
fn encoded_len(bytes: &[u8]) -> Option<usize> {
    let constructor = *bytes.first()?;
    if constructor == 0x00 {
        // A described value: the descriptor, then the value.
        let descriptor = encoded_len(bytes.get(1..)?)?;
        let value = encoded_len(bytes.get(1 + descriptor..)?)?;
        return Some(1 + descriptor + value);
    }
    let width = match constructor >> 4 {
        0x4 => 0,
        0x5 => 1,
        0x6 => 2,
        0x7 => 4,
        0x8 => 8,
        0x9 => 16,
        0xa | 0xc | 0xe => 1 + usize::from(*bytes.get(1)?),
        0xb | 0xd | 0xf => 4 + u32::from_be_bytes(bytes.get(1..5)?.try_into().ok()?) as usize,
        _ => return None,
    };
    (bytes.len() > width).then_some(1 + width)
}

impl<S: AsyncWrite + Unpin> FullFieldFrames<S> {
    /// Writes buffered output to the socket until it is empty or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.outgoing))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.advance(written);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FullFieldFrames<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.poll_cut(cx)?;
        let received = &mut this.received;
        loop {
            if let Some(reason) = &received.malformed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    reason.clone(),
                )));
            }
            if received.checked > 0 {
                let n = received.checked.min(buf.remaining());
                buf.put_slice(&received.pending[..n]);
                received.pending.advance(n);
                received.checked -= n;
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut chunk = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                // End of stream: what is left is an incomplete header; fe2o3 reports it as a truncated frame.
                let n = received.pending.len().min(buf.remaining());
                buf.put_slice(&received.pending[..n]);
                received.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(activity) = &this.activity {
                activity.touch();
            }
            received.pending.extend_from_slice(chunk.filled());
            if let Err(reason) = received.check() {
                info!(%reason, "malformed AMQP frame received; closing the connection");
                received.malformed = Some(reason);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FullFieldFrames<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_cut(cx)?;
        if self.outgoing.len() >= MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        let this = &mut *self;
        this.incoming.extend_from_slice(buf);
        rewrite_complete_frames(
            &mut this.incoming,
            &mut this.outgoing,
            this.idle_time_out_ms,
        );
        // Start sending now; what the socket cannot take yet waits for the next write or flush.
        if let Poll::Ready(Err(err)) = this.poll_drain(cx) {
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_cut(cx)?;
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A frame: size, doff 2, type, channel 0, then the body.
    fn frame(frame_type: u8, body: &[u8]) -> Vec<u8> {
        let mut frame = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[2, frame_type, 0, 0]);
        frame.extend_from_slice(body);
        frame
    }

    #[test]
    fn pads_a_shortened_detach() {
        // detach(handle=1, closed=true): two of three fields.
        let short = frame(0, &[0x00, 0x53, 0x16, 0xc0, 0x04, 0x02, 0x52, 0x01, 0x41]);
        let padded = padded(&short, None).expect("needs padding");
        assert_eq!(
            padded,
            frame(
                0,
                &[0x00, 0x53, 0x16, 0xc0, 0x05, 0x03, 0x52, 0x01, 0x41, 0x40]
            )
        );
    }

    #[test]
    fn pads_an_empty_close_and_keeps_a_transfer_payload_after_the_fields() {
        assert_eq!(
            padded(&frame(0, &[0x00, 0x53, 0x18, 0x45]), None).unwrap(),
            frame(0, &[0x00, 0x53, 0x18, 0xc0, 0x02, 0x01, 0x40])
        );

        // transfer(handle=0) followed by a payload "pl".
        let short = frame(0, &[0x00, 0x53, 0x14, 0xc0, 0x02, 0x01, 0x43, b'p', b'l']);
        let padded = padded(&short, None).unwrap();
        let mut expected_body = vec![0x00, 0x53, 0x14, 0xc0, 12, 11, 0x43];
        expected_body.extend_from_slice(&[0x40; 10]);
        expected_body.extend_from_slice(b"pl");
        assert_eq!(padded, frame(0, &expected_body));
    }

    #[test]
    fn leaves_complete_and_unknown_frames_alone() {
        let complete = frame(0, &[0x00, 0x53, 0x17, 0xc0, 0x02, 0x01, 0x40]);
        assert_eq!(padded(&complete, None), None);
        assert_eq!(
            padded(&frame(0, &[]), None),
            None,
            "an empty (heartbeat) frame"
        );
        assert_eq!(
            padded(&frame(0, &[0x00, 0x53, 0x70, 0x45]), None),
            None,
            "not a performative"
        );
    }

    #[test]
    fn grows_into_list32_when_list8_cannot_hold_the_fields() {
        // open with one 250-byte container id: padding takes the list past 255 bytes.
        let mut body = vec![0x00, 0x53, 0x10, 0xc0, 0, 0x01, 0xa1, 248];
        body.extend_from_slice(&[b'c'; 248]);
        body[4] = (body.len() - 5) as u8;
        let padded = padded(&frame(0, &body), None).unwrap();
        assert_eq!(padded[8 + 3], 0xd0);
        assert_eq!(
            u32::from_be_bytes(padded[8 + 8..8 + 12].try_into().unwrap()),
            10,
            "ten fields"
        );
        assert_eq!(
            u32::from_be_bytes(padded[..4].try_into().unwrap()) as usize,
            padded.len()
        );
    }

    #[test]
    fn an_open_announces_the_idle_time_out() {
        // open(container-id "c", hostname null, max-frame-size 65536): idle-time-out (field 4) absent.
        let open = frame(
            0,
            &[
                0x00, 0x53, 0x10, 0xc0, 0x0a, 0x03, 0xa1, 0x01, b'c', 0x40, 0x70, 0, 1, 0, 0,
            ],
        );
        let announced = padded(&open, Some(60_000)).unwrap();
        let fields = &announced[8 + 6..];
        let mut expected = vec![0xa1, 0x01, b'c', 0x40, 0x70, 0, 1, 0, 0, 0x40, 0x70];
        expected.extend_from_slice(&60_000u32.to_be_bytes());
        expected.extend_from_slice(&[0x40; 5]);
        assert_eq!(fields, expected);
        assert_eq!(announced[8 + 5], 10, "ten fields");
        // Another performative is left as it is.
        let close = frame(0, &[0x00, 0x53, 0x18, 0xc0, 0x02, 0x01, 0x40]);
        assert_eq!(padded(&close, Some(60_000)), None);
    }

    /// What a guard lets through of `input` read in pieces of `piece` bytes, and the error it ends with.
    async fn read_through_guard(input: &[u8], piece: usize) -> (Vec<u8>, Option<io::Error>) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut guarded = FullFieldFrames::new(server);
        for chunk in input.chunks(piece) {
            client.write_all(chunk).await.unwrap();
        }
        drop(client);
        let mut seen = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match tokio::io::AsyncReadExt::read(&mut guarded, &mut buf).await {
                Ok(0) => return (seen, None),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(err) => return (seen, Some(err)),
            }
        }
    }

    #[tokio::test]
    async fn well_formed_frames_pass_the_guard_unchanged_however_they_are_split() {
        let mut stream = b"AMQP\x03\x01\x00\x00".to_vec();
        stream.extend(frame(1, &[0x00, 0x53, 0x41, 0x45]));
        stream.extend_from_slice(b"AMQP\x00\x01\x00\x00");
        stream.extend(frame(0, &[]));
        stream.extend(frame(0, &[0x00, 0x53, 0x18, 0x45]));
        for piece in [1, 3, 8, 1000] {
            let (seen, error) = read_through_guard(&stream, piece).await;
            assert!(error.is_none(), "piece {piece}: {error:?}");
            assert_eq!(seen, stream, "piece {piece}");
        }
    }

    #[tokio::test]
    async fn frames_shorter_than_their_header_or_with_a_bad_offset_end_the_stream() {
        let mut bad_frames: Vec<Vec<u8>> = (0u32..8)
            .map(|size| {
                let mut bytes = size.to_be_bytes().to_vec();
                bytes.extend_from_slice(&[2, 0, 0, 0]);
                bytes
            })
            .collect();
        bad_frames.push(vec![0, 0, 0, 8, 0, 0, 0, 0]); // data offset 0
        bad_frames.push(vec![0, 0, 0, 8, 1, 0, 0, 0]); // data offset 1
        bad_frames.push(vec![0, 0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 0]); // offset 16 in a 12-byte frame
        for bad in bad_frames {
            let mut stream = b"AMQP\x00\x01\x00\x00".to_vec();
            stream.extend(frame(0, &[]));
            stream.extend(&bad);
            let (seen, error) = read_through_guard(&stream, 1).await;
            let error = error.unwrap_or_else(|| panic!("{bad:?} went through"));
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{bad:?}");
            assert!(
                seen.len() <= 16,
                "{bad:?}: the bad frame was handed on: {seen:?}"
            );
        }
    }

    /// Frames (protocol headers among them) a well-formed stream would hold up to its first bad header.
    fn well_formed_prefix(stream: &[u8]) -> usize {
        let mut at = 0;
        loop {
            let rest = &stream[at..];
            if rest.starts_with(b"AMQP") && rest.len() >= 8 {
                at += 8;
                continue;
            }
            if rest.len() < 5 {
                return at;
            }
            let size = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let data_offset = usize::from(rest[4]);
            if size < 8 || data_offset < 2 || data_offset * 4 > size || rest.len() < size {
                return at;
            }
            at += size;
        }
    }

    #[tokio::test]
    async fn random_streams_pass_only_up_to_their_first_malformed_frame() {
        // xorshift: the same 2,000 streams every run.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2_000 {
            let mut stream = b"AMQP\x00\x01\x00\x00".to_vec();
            for _ in 0..(next() % 6) {
                let size = match next() % 4 {
                    0 => next() % 8,
                    _ => 8 + next() % 40,
                } as u32;
                stream.extend_from_slice(&size.to_be_bytes());
                let data_offset = if next() % 5 == 0 {
                    (next() % 12) as u8
                } else {
                    2
                };
                stream.push(data_offset);
                for _ in 5..size.max(5) {
                    stream.push(next() as u8);
                }
            }
            let piece = 1 + (next() % 16) as usize;
            let (seen, error) = read_through_guard(&stream, piece).await;
            let good = well_formed_prefix(&stream);
            assert!(
                stream.starts_with(&seen) && seen.len() <= good + 4,
                "{stream:?}: handed on {seen:?}"
            );
            if good == stream.len() {
                assert!(error.is_none(), "{stream:?}: {error:?}");
                assert_eq!(seen, stream);
            } else {
                assert!(
                    error.is_some() || seen.len() < good + 5,
                    "{stream:?}: a malformed frame went through"
                );
            }
        }
    }

    #[tokio::test]
    async fn frames_split_across_writes_are_reassembled() {
        let (client, mut server) = tokio::io::duplex(4096);
        let mut writer = FullFieldFrames::new(client);
        let mut stream = b"AMQP\x00\x01\x00\x00".to_vec();
        stream.extend(frame(0, &[0x00, 0x53, 0x18, 0x45]));
        for chunk in stream.chunks(3) {
            writer.write_all(chunk).await.unwrap();
        }
        writer.flush().await.unwrap();
        drop(writer);
        let mut received = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut received)
            .await
            .unwrap();
        let mut expected = b"AMQP\x00\x01\x00\x00".to_vec();
        expected.extend(frame(0, &[0x00, 0x53, 0x18, 0xc0, 0x02, 0x01, 0x40]));
        assert_eq!(received, expected);
    }
}
