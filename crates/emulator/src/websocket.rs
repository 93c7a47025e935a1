//! The emulator's AMQP-over-WebSockets listener: the upgrade on `/$servicebus/websocket` (subprotocol
//! `AMQPWSB10` or `amqp`, echoed), over TLS (wss) when a certificate is configured, and the adapter that
//! turns binary WebSocket messages back into the byte stream the AMQP connection code reads.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::debug;

use super::connection::{self, ConnectionSlot, Shared};

/// The path Event Hubs serves AMQP over WebSockets on; the SDKs add a trailing slash or not.
pub const WEBSOCKET_PATH: &str = "/$servicebus/websocket";
/// The subprotocols accepted, preferred first: the Azure SDKs' `AMQPWSB10`, then the OASIS binding's
/// `amqp` (fe2o3-amqp-ws and the Rust SDK send it, and the service accepts it too).
const SUBPROTOCOLS: [&str; 2] = ["AMQPWSB10", "amqp"];
const SEC_WEBSOCKET_PROTOCOL: &str = "Sec-WebSocket-Protocol";

/// Serves one WebSocket connection: TLS handshake when configured (wss), upgrade, then AMQP as usual.
pub(crate) async fn serve(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    slot: ConnectionSlot,
) {
    match tls {
        Some(acceptor) => {
            if let Some(tls_stream) = super::tls::handshake(stream, &acceptor, &shared).await {
                upgrade_and_serve(tls_stream, shared, slot).await;
            }
        }
        None => upgrade_and_serve(stream, shared, slot).await,
    }
}

async fn upgrade_and_serve<S>(stream: S, shared: Arc<Shared>, slot: ConnectionSlot)
where
    S: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let handshake_timeout = shared.limits.handshake_timeout;
    let upgrade = tokio::time::timeout(
        handshake_timeout,
        tokio_tungstenite::accept_hdr_async(stream, check_upgrade),
    );
    // Only the handshake races shutdown: once AMQP runs, the connection code closes it gracefully.
    let websocket = tokio::select! {
        done = upgrade => match done {
            Ok(Ok(websocket)) => websocket,
            Ok(Err(err)) => return debug!(%err, "WebSocket upgrade refused or failed"),
            Err(_) => return debug!("no WebSocket upgrade within {handshake_timeout:?}"),
        },
        () = shared.shutdown.cancelled() => return,
    };
    connection::serve_stream(WebSocketBytes::new(websocket), shared, slot).await;
}

/// Accepts the upgrade only on the Event Hubs path and with an AMQP subprotocol, which it echoes.
#[allow(clippy::result_large_err)] // the shape tungstenite's callback requires
fn check_upgrade(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    let path = request.uri().path();
    if path.trim_end_matches('/') != WEBSOCKET_PATH {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            format!("no WebSocket endpoint at {path}; use {WEBSOCKET_PATH}"),
        ));
    }
    let offered = request
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    let Some(chosen) = SUBPROTOCOLS
        .iter()
        .find(|wanted| offered.iter().any(|o| o.eq_ignore_ascii_case(wanted)))
    else {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "the Sec-WebSocket-Protocol must offer AMQPWSB10 or amqp".into(),
        ));
    };
    response
        .headers_mut()
        .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(chosen));
    Ok(response)
}

fn refusal(status: StatusCode, reason: String) -> ErrorResponse {
    debug!(%status, %reason, "WebSocket upgrade refused");
    let mut response = ErrorResponse::new(Some(reason));
    *response.status_mut() = status;
    response
}

/// A WebSocket connection as a byte stream: each write is one binary message; reads concatenate the
/// binary messages received. (fe2o3-amqp-ws 0.18 cannot wrap a server-side stream: its constructors
/// are client handshakes only.)
#[derive(Debug)]
pub(crate) struct WebSocketBytes<S> {
    inner: WebSocketStream<S>,
    /// The rest of the binary message being read.
    current: Bytes,
}

impl<S> WebSocketBytes<S> {
    fn new(inner: WebSocketStream<S>) -> Self {
        Self {
            inner,
            current: Bytes::new(),
        }
    }
}

fn to_io_error(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(err) => err,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::ErrorKind::NotConnected.into()
        }
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WebSocketBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.current.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.current = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "AMQP over WebSockets uses binary messages only",
                    )));
                }
                // tungstenite answers pings itself; a close ends the stream as EOF.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(err)) => return Poll::Ready(Err(to_io_error(err))),
            }
        }
        let n = this.current.len().min(buf.remaining());
        buf.put_slice(&this.current[..n]);
        this.current.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WebSocketBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut inner = Pin::new(&mut self.inner);
        ready!(inner.as_mut().poll_ready(cx)).map_err(to_io_error)?;
        inner
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner)
            .poll_flush(cx)
            .map_err(to_io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner)
            .poll_close(cx)
            .map_err(to_io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    fn request(path: &str, protocols: Option<&str>) -> Request {
        let mut request = format!("ws://localhost{path}")
            .into_client_request()
            .unwrap();
        if let Some(protocols) = protocols {
            request.headers_mut().insert(
                SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(protocols).unwrap(),
            );
        }
        request
    }

    fn chosen(path: &str, protocols: Option<&str>) -> Result<String, StatusCode> {
        check_upgrade(&request(path, protocols), Response::new(()))
            .map(|r| {
                r.headers()[SEC_WEBSOCKET_PROTOCOL]
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
            .map_err(|e| e.status())
    }

    #[test]
    fn upgrade_needs_the_path_and_an_amqp_subprotocol() {
        let path = "/$servicebus/websocket";
        assert_eq!(chosen(path, Some("AMQPWSB10")).unwrap(), "AMQPWSB10");
        assert_eq!(
            chosen("/$servicebus/websocket/", Some("amqp")).unwrap(),
            "amqp"
        );
        assert_eq!(chosen(path, Some("amqp, AMQPWSB10")).unwrap(), "AMQPWSB10");
        assert_eq!(chosen("/", Some("AMQPWSB10")), Err(StatusCode::NOT_FOUND));
        assert_eq!(chosen(path, Some("mqtt")), Err(StatusCode::BAD_REQUEST));
        assert_eq!(chosen(path, None), Err(StatusCode::BAD_REQUEST));
    }

    #[tokio::test]
    async fn messages_become_a_byte_stream_and_back() {
        let (client, server) = tokio::io::duplex(4096);
        let role = tungstenite::protocol::Role::Server;
        let server = WebSocketStream::from_raw_socket(server, role, None).await;
        let mut client =
            WebSocketStream::from_raw_socket(client, tungstenite::protocol::Role::Client, None)
                .await;
        let mut bytes = WebSocketBytes::new(server);
        use futures_util::{SinkExt, StreamExt};
        client.send(Message::binary(&b"AMQP"[..])).await.unwrap();
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client
            .send(Message::binary(&b"\x00\x01\x00\x00"[..]))
            .await
            .unwrap();
        let mut header = [0u8; 8];
        bytes.read_exact(&mut header).await.unwrap();
        assert_eq!(&header, b"AMQP\x00\x01\x00\x00");
        bytes.write_all(b"reply").await.unwrap();
        bytes.flush().await.unwrap();
        // The ping is answered before the reply goes out.
        let mut seen = Vec::new();
        while let Some(message) = client.next().await {
            match message.unwrap() {
                Message::Binary(data) => {
                    seen.extend_from_slice(&data);
                    break;
                }
                Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, b"reply");
        client.close(None).await.unwrap();
        let mut rest = Vec::new();
        bytes.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
