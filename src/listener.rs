//! The gRPC listener's connections: at most `max_connections_per_client` open at once per peer address, so one
//! client cannot hold every file descriptor and connection's memory of the gateway.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Open connections per peer address.
#[derive(Debug)]
struct Table {
    per_client: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection counted against its peer's share; leaving, it frees its place.
#[derive(Debug)]
struct Place {
    table: Arc<Table>,
    peer: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.table.open.lock();
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

impl Table {
    fn place_for(self: &Arc<Self>, peer: IpAddr) -> Option<Place> {
        let mut open = self.open.lock();
        let count = open.entry(peer).or_insert(0);
        if *count >= self.per_client {
            return None;
        }
        *count += 1;
        Some(Place {
            table: Arc::clone(self),
            peer,
        })
    }
}

/// An accepted TCP connection holding its place in its peer's share.
#[derive(Debug)]
pub struct CountedStream {
    inner: TcpStream,
    _place: Place,
}

/// Accepted connections, each counted against its peer address; a connection beyond the peer's share is
/// closed at once (its client sees the connection refused at the HTTP/2 handshake), one debug line each.
pub fn limit_per_client<S>(
    incoming: S,
    per_client: usize,
) -> impl Stream<Item = io::Result<CountedStream>> + Send + 'static
where
    S: Stream<Item = io::Result<TcpStream>> + Send + 'static,
{
    let table = Arc::new(Table {
        per_client,
        open: Mutex::new(HashMap::new()),
    });
    incoming.filter_map(move |accepted| {
        let table = Arc::clone(&table);
        async move {
            let stream = match accepted {
                Ok(stream) => stream,
                Err(error) => return Some(Err(error)),
            };
            let Ok(peer) = stream.peer_addr() else {
                return None;
            };
            // An IPv4 peer on a dual-stack listener arrives as ::ffff:a.b.c.d: one client either way.
            let peer = peer.ip().to_canonical();
            match table.place_for(peer) {
                Some(place) => Some(Ok(CountedStream {
                    inner: stream,
                    _place: place,
                })),
                None => {
                    tracing::debug!(
                        %peer,
                        max_connections_per_client = per_client,
                        "connection closed: its client holds its whole share"
                    );
                    None
                }
            }
        }
    })
}

impl Connected for CountedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_share_and_leaving_gives_it_back() {
        let table = Arc::new(Table {
            per_client: 2,
            open: Mutex::new(HashMap::new()),
        });
        let peer = IpAddr::from([10, 0, 0, 1]);
        let first = table.place_for(peer).unwrap();
        let _second = table.place_for(peer).unwrap();
        assert!(table.place_for(peer).is_none());
        assert!(table.place_for(IpAddr::from([10, 0, 0, 2])).is_some());
        drop(first);
        assert!(table.place_for(peer).is_some());
    }
}
