//! The HTTP/1 listener beside gRPC (`metrics_listen`): `GET /metrics` in the Prometheus text format, and the
//! Kubernetes probes `GET /healthz` (the process is alive) and `GET /readyz` (its [`Readiness`]; 503 with the
//! one-line reason otherwise). Bounded like the gRPC listener: at most `limits.metrics_max_connections` open,
//! a request's line and headers read within `limits.header_read_timeout_seconds` (an idle keep-alive
//! connection too: hyper's clock runs from the end of the previous response).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use hyper_util::rt::TokioTimer;

use crate::gateway::limits::Limits;
use crate::listener::{BoundEarly, Connections, serve_http1};
use eventhub_telemetry::metrics::{Metrics, Reports};

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

/// Whether the process should take traffic, and why not (the body of a 503 from `/readyz`).
pub trait Readiness: Send + Sync {
    /// Ready, or the one-line reason it is not.
    fn readiness(&self) -> Result<(), String>;
}

/// What the listener serves: the reports a scrape collects, and the readiness the probe answers.
#[derive(Clone)]
pub struct Exposed {
    /// Every owner of gauges and totals, asked in order at each scrape.
    pub reports: Reports,
    /// The readiness behind `/readyz`.
    pub readiness: Arc<dyn Readiness>,
}

/// A bound listener not serving yet: bound early so a taken port fails the start before anything runs.
pub struct MetricsListener(BoundEarly);

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, HttpError> {
        BoundEarly::bind(addr)
            .await
            .map(Self)
            .map_err(|source| HttpError::Bind { addr, source })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr
    }

    /// Serves the metrics page and the probes of `exposed` until [`MetricsServer::shutdown`].
    pub fn serve(self, metrics: Metrics, exposed: Exposed, limits: &Limits) -> MetricsServer {
        let router = Router::new()
            .route("/metrics", get(scrape))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Shared { metrics, exposed });
        let stop = CancellationToken::new();
        let local_addr = self.0.local_addr;
        let connections = Connections::new(
            limits.metrics_max_connections,
            limits.metrics_max_connections,
        );
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let task = serve_http1(
            self.0.listener,
            router,
            connections,
            http,
            stop.clone(),
            "metrics",
        );
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
    exposed: Exposed,
}

async fn scrape(State(shared): State<Shared>) -> impl IntoResponse {
    let page = shared.metrics.scrape(&shared.exposed.reports);
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], page)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Shared>) -> (StatusCode, String) {
    match shared.exposed.readiness.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}
