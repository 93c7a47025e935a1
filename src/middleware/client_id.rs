//! Who is calling: the `ClientId` every request carries for the per-client rate limits, from the
//! `x-client-id` header or else the peer's IP address.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// The request header a client names itself with.
pub const CLIENT_ID_HEADER: &str = "x-client-id";

/// The longest `x-client-id` taken, in bytes; a longer one falls back to the peer address.
const MAX_CLIENT_ID_LEN: usize = 128;

/// The identity of a caller for per-client limits: its authenticated identity, else its `x-client-id`, its
/// IP address, or `unknown`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientId {
    id: Arc<str>,
    /// An authenticated identity never shares limits with a caller that merely names itself the same.
    authenticated: bool,
}

impl ClientId {
    /// A client id as given; the layer, not this constructor, validates what arrives in headers.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self {
            id: id.into(),
            authenticated: false,
        }
    }

    /// The id of an authenticated identity (`[auth]`): its limits are its own, whatever `x-client-id` says.
    pub fn authenticated(identity: impl Into<Arc<str>>) -> Self {
        Self {
            id: identity.into(),
            authenticated: true,
        }
    }

    /// The id of a caller that neither names itself nor has a known peer address.
    pub fn unknown() -> Self {
        Self::new("unknown")
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// `identity:<id>` for an authenticated identity, `client:<id>` otherwise (rate-limit subjects).
    pub fn subject(&self) -> String {
        let kind = if self.authenticated {
            "identity"
        } else {
            "client"
        };
        format!("{kind}:{}", self.id)
    }

    /// The client id of a request: a valid `x-client-id`, else the peer IP, else `unknown`.
    pub fn of_request(headers: &HeaderMap, extensions: &http::Extensions) -> Self {
        if let Some(id) = headers.get(CLIENT_ID_HEADER).and_then(|value| {
            let bytes = value.as_bytes();
            let valid = (1..=MAX_CLIENT_ID_LEN).contains(&bytes.len())
                && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
            // Visible ASCII only, so the id is safe to log and to echo in error messages.
            valid.then(|| value.to_str().ok()).flatten()
        }) {
            return Self::new(id);
        }
        match peer_ip(extensions) {
            Some(ip) => Self::new(ip.to_string()),
            None => Self::unknown(),
        }
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// The peer's address from tonic's connect info (plain TCP, or TCP under TLS).
pub fn peer_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// The peer's IP address from tonic's connect info (plain TCP, or TCP under TLS).
pub fn peer_ip(extensions: &http::Extensions) -> Option<IpAddr> {
    let addr = peer_addr(extensions)?;
    // The port is dropped so every connection of one client shares its limits; an IPv4 peer on a dual-stack
    // listener arrives as ::ffff:a.b.c.d and must get the same id as over plain IPv4.
    Some(addr.ip().to_canonical())
}

/// Inserts the caller's [`ClientId`] into every request's extensions.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientIdLayer;

impl ClientIdLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for ClientIdLayer {
    type Service = ClientIdService<S>;

    fn layer(&self, inner: S) -> ClientIdService<S> {
        ClientIdService { inner }
    }
}

/// The service of [`ClientIdLayer`].
#[derive(Clone, Debug)]
pub struct ClientIdService<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for ClientIdService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        let id = ClientId::of_request(request.headers(), request.extensions());
        request.extensions_mut().insert(id);
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use tonic::transport::server::Connected;
    use tower::{ServiceExt, service_fn};

    use super::*;

    /// The ClientId the layer puts on `request`.
    async fn client_id_of(request: Request<()>) -> Option<ClientId> {
        let service = ClientIdLayer::new().layer(service_fn(|request: Request<()>| async move {
            Ok::<_, Infallible>(request.extensions().get::<ClientId>().cloned())
        }));
        service.oneshot(request).await.unwrap()
    }

    fn tcp_info(remote: &str) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: Some("127.0.0.1:50051".parse().unwrap()),
            remote_addr: Some(remote.parse().unwrap()),
        }
    }

    fn request_with_header(value: &[u8]) -> Request<()> {
        let mut request = Request::new(());
        request.headers_mut().insert(
            CLIENT_ID_HEADER,
            http::HeaderValue::from_bytes(value).unwrap(),
        );
        request.extensions_mut().insert(tcp_info("10.1.2.3:40000"));
        request
    }

    #[tokio::test]
    async fn header_names_the_client() {
        let id = client_id_of(request_with_header(b"orders-service")).await;
        assert_eq!(id, Some(ClientId::new("orders-service")));
        let longest = "x".repeat(128);
        let id = client_id_of(request_with_header(longest.as_bytes())).await;
        assert_eq!(id.as_ref().map(ClientId::as_str), Some(longest.as_str()));
    }

    #[tokio::test]
    async fn invalid_header_falls_back_to_the_peer_ip() {
        let too_long = "x".repeat(129);
        for bad in [
            b"".as_slice(),
            too_long.as_bytes(),
            b"has space",
            b"tab\there",
            "caf\u{e9}".as_bytes(),
        ] {
            let id = client_id_of(request_with_header(bad)).await;
            assert_eq!(id, Some(ClientId::new("10.1.2.3")), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn tcp_peer_ip_without_port() {
        let mut request = Request::new(());
        request.extensions_mut().insert(tcp_info("192.0.2.7:61000"));
        assert_eq!(
            client_id_of(request).await,
            Some(ClientId::new("192.0.2.7"))
        );

        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(tcp_info("[2001:db8::1]:61000"));
        assert_eq!(
            client_id_of(request).await,
            Some(ClientId::new("2001:db8::1"))
        );
    }

    #[tokio::test]
    async fn ipv4_mapped_peer_is_its_ipv4_address() {
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(tcp_info("[::ffff:192.0.2.7]:61000"));
        assert_eq!(
            client_id_of(request).await,
            Some(ClientId::new("192.0.2.7"))
        );
    }

    #[tokio::test]
    async fn tls_peer_ip() {
        // TlsConnectInfo has no public constructor: the only way to get one is a real (loopback) handshake.
        let (server_stream, _client_stream, client_local) = loopback_tls().await;
        let info: TlsConnectInfo<TcpConnectInfo> = server_stream.connect_info();
        let mut request = Request::new(());
        request.extensions_mut().insert(info);
        assert_eq!(
            client_id_of(request).await,
            Some(ClientId::new(client_local.ip().to_string()))
        );
    }

    #[test]
    fn an_identity_is_never_the_client_that_names_itself_the_same() {
        let identity = ClientId::authenticated("billing");
        let named = ClientId::new("billing");
        assert_ne!(identity, named);
        assert_eq!(identity.as_str(), named.as_str());
        assert_eq!(identity.subject(), "identity:billing");
        assert_eq!(named.subject(), "client:billing");
    }

    #[tokio::test]
    async fn no_header_and_no_peer_is_unknown() {
        let id = client_id_of(Request::new(())).await;
        assert_eq!(id, Some(ClientId::unknown()));
        assert_eq!(id.map(|id| id.to_string()), Some("unknown".to_owned()));
    }

    /// Both ends of a TLS connection over loopback TCP, and the client's local address.
    async fn loopback_tls() -> (
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    ) {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        use rustls::{ClientConfig, RootCertStore, ServerConfig};
        use tokio::net::{TcpListener, TcpStream};

        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let local = tcp.local_addr().unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let stream = tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .unwrap();
            (stream, local)
        };
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(tcp)
                .await
                .unwrap()
        };
        let ((client_stream, local), server_stream) = tokio::join!(connect, accept);
        (server_stream, client_stream, local)
    }
}
