//! The HTTP/1 listener beside gRPC (`metrics_listen`): `GET /metrics` in the Prometheus text format, and the
//! Kubernetes probes `GET /healthz` (the process is alive) and `GET /readyz` (`metrics::readiness`: not draining, a
//! live connection authorized for every hub; 503 with the one-line reason otherwise).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::metrics::{Metrics, ScrapeSource};

/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a stop waits for open scrapes before dropping them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("metrics listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound listener not serving yet: bound early so a taken port fails the start before anything runs.
pub struct MetricsListener {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, HttpError> {
        let bind_error = |source| HttpError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        Ok(Self {
            listener,
            local_addr,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves the metrics page and the probes of `source` until [`MetricsServer::shutdown`].
    pub fn serve(self, metrics: Metrics, source: ScrapeSource) -> MetricsServer {
        let router = Router::new()
            .route("/metrics", get(scrape))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Shared { metrics, source });
        let stop = CancellationToken::new();
        let signal = stop.clone().cancelled_owned();
        let local_addr = self.local_addr;
        let task = tokio::spawn(async move {
            let served = axum::serve(self.listener, router)
                .with_graceful_shutdown(signal)
                .await;
            if let Err(error) = served {
                tracing::warn!(%local_addr, %error, "the metrics listener stopped");
            }
        });
        tracing::info!(%local_addr, "metrics and probes listening");
        MetricsServer {
            local_addr,
            stop,
            task,
        }
    }
}

/// The running listener.
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets open requests finish (briefly), then ends.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, self.task).await.is_err() {
            // A scraper holding a request open must not hold the process's exit.
            abort.abort();
        }
    }
}

#[derive(Clone)]
struct Shared {
    metrics: Metrics,
    source: ScrapeSource,
}

async fn scrape(State(shared): State<Shared>) -> impl IntoResponse {
    let page = shared.metrics.scrape(&shared.source);
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], page)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Shared>) -> (StatusCode, String) {
    match shared.source.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}
