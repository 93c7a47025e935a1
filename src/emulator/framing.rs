//! Outgoing frames written the way the service writes them: every performative with all of its fields.
//!
//! AMQP lets an encoder drop trailing null fields of a performative, and fe2o3 does. The service never does,
//! and some clients depend on it: pyamqp (the Python SDK's stack) reads fields by position, and appends a
//! transfer's payload after the fields it decoded, so a shortened `open`, `attach`, `detach` or `transfer`
//! breaks it. This adapter sits between fe2o3 and the socket and pads each performative's list with nulls.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Above this much rewritten-but-unwritten output, writes wait for the socket.
const MAX_BUFFERED: usize = 256 * 1024;

/// A stream whose outgoing performatives carry every field.
#[derive(Debug)]
pub struct FullFieldFrames<S> {
    inner: S,
    /// Bytes written by fe2o3 that do not yet form a whole frame.
    incoming: BytesMut,
    /// Rewritten bytes waiting for the socket.
    outgoing: BytesMut,
}

impl<S> FullFieldFrames<S> {
    /// Wraps a stream.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            incoming: BytesMut::new(),
            outgoing: BytesMut::new(),
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

/// Moves every complete protocol header and frame from `incoming` to `outgoing`, padding performatives.
fn rewrite_complete_frames(incoming: &mut BytesMut, outgoing: &mut BytesMut) {
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
        write_padded(&frame, outgoing);
    }
}

/// Writes one frame, its performative padded to the full field count when it was shortened.
fn write_padded(frame: &[u8], out: &mut BytesMut) {
    match padded(frame) {
        Some(padded) => out.put_slice(&padded),
        None => out.put_slice(frame),
    }
}

fn padded(frame: &[u8]) -> Option<Vec<u8>> {
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
    if count >= full {
        return None;
    }
    let mut fields = elements.to_vec();
    fields.resize(elements.len() + (full - count), 0x40); // 0x40: null
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FullFieldFrames<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.outgoing.len() >= MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        let this = &mut *self;
        this.incoming.extend_from_slice(buf);
        rewrite_complete_frames(&mut this.incoming, &mut this.outgoing);
        // Start sending now; what the socket cannot take yet waits for the next write or flush.
        if let Poll::Ready(Err(err)) = this.poll_drain(cx) {
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
        let padded = padded(&short).expect("needs padding");
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
            padded(&frame(0, &[0x00, 0x53, 0x18, 0x45])).unwrap(),
            frame(0, &[0x00, 0x53, 0x18, 0xc0, 0x02, 0x01, 0x40])
        );

        // transfer(handle=0) followed by a payload "pl".
        let short = frame(0, &[0x00, 0x53, 0x14, 0xc0, 0x02, 0x01, 0x43, b'p', b'l']);
        let padded = padded(&short).unwrap();
        let mut expected_body = vec![0x00, 0x53, 0x14, 0xc0, 12, 11, 0x43];
        expected_body.extend_from_slice(&[0x40; 10]);
        expected_body.extend_from_slice(b"pl");
        assert_eq!(padded, frame(0, &expected_body));
    }

    #[test]
    fn leaves_complete_and_unknown_frames_alone() {
        let complete = frame(0, &[0x00, 0x53, 0x17, 0xc0, 0x02, 0x01, 0x40]);
        assert_eq!(padded(&complete), None);
        assert_eq!(padded(&frame(0, &[])), None, "an empty (heartbeat) frame");
        assert_eq!(
            padded(&frame(0, &[0x00, 0x53, 0x70, 0x45])),
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
        let padded = padded(&frame(0, &body)).unwrap();
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
