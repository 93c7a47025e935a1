//! `emulator --fault-control ADDR`: an HTTP/1 listener that injects the emulator's faults into the running
//! process from outside it (`POST /faults/...`) and shows them (`GET /faults`). Every parameter is checked
//! against a limit and a refusal is a 400 naming it; the listener holds at most [`MAX_CONNECTIONS`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use eventhub_emulator::{Faults, FaultsSnapshot};
use eventhub_gateway::listener::{BoundEarly, Connections, serve_http1};
use hyper_util::rt::TokioTimer;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The most transfers one counted fault (`throttle`, `release`, `force-close`) may name.
pub const MAX_COUNT: u64 = 1_000_000;
/// The longest extra disposition delay, in milliseconds (5 minutes: past every SDK's send timeout).
pub const MAX_DISPOSITION_DELAY_MS: u64 = 300_000;
/// The longest window of refused connections, in milliseconds (10 minutes).
pub const MAX_REFUSE_CONNECTIONS_MS: u64 = 600_000;
/// The longest marker of refused events, in bytes.
pub const MAX_MARKER_BYTES: usize = 1024;
/// Connections open at once; more are closed as accepted (a script needs one or two).
pub const MAX_CONNECTIONS: usize = 16;
/// A request's line and headers must arrive within this (an idle keep-alive connection too).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer, and so the longest request line and headers (its smallest allowed value).
const MAX_HEAD_BYTES: usize = 8192;
/// How long a stop waits for open requests before dropping them.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How much of a refused value a 400 repeats.
const ECHO_CHARS: usize = 40;

/// Every endpoint, for the 404 answer.
const ENDPOINTS: &[&str] = &[
    "GET /faults",
    "POST /faults/throttle?count=N",
    "POST /faults/release?count=N",
    "POST /faults/disposition-delay?ms=N",
    "POST /faults/force-close?after=N",
    "POST /faults/refuse-connections?ms=N",
    "POST /faults/refuse-events?marker=TEXT",
    "POST /faults/detach",
    "POST /faults/expire-tokens",
    "POST /faults/clear",
];

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum FaultControlError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("--fault-control {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a request's parameters were refused: a 400 whose body names the parameter.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A parameter the endpoint needs is absent.
    #[error("{name}: required, {expected}")]
    Missing {
        /// The parameter.
        name: &'static str,
        /// What it takes.
        expected: String,
    },
    /// Not a whole number.
    #[error("{name}: {value:?} is not {expected}")]
    NotANumber {
        /// The parameter.
        name: &'static str,
        /// What was given (clipped).
        value: String,
        /// What it takes.
        expected: String,
    },
    /// A whole number above the parameter's limit.
    #[error("{name}: {value} is over the limit of {max}")]
    OverLimit {
        /// The parameter.
        name: &'static str,
        /// What was given (clipped).
        value: String,
        /// The largest value taken.
        max: u64,
    },
    /// A text parameter that is empty.
    #[error("{name}: empty; it takes 1 to {max} bytes")]
    Empty {
        /// The parameter.
        name: &'static str,
        /// The longest value taken, in bytes.
        max: usize,
    },
    /// A text parameter that is too long.
    #[error("{name}: {len} bytes, over the limit of {max}")]
    TooLong {
        /// The parameter.
        name: &'static str,
        /// Its length, in bytes.
        len: usize,
        /// The longest value taken, in bytes.
        max: usize,
    },
    /// A parameter given twice.
    #[error("{name}: given more than once")]
    Repeated {
        /// The parameter.
        name: &'static str,
    },
    /// A parameter the endpoint does not take.
    #[error("{name}: not a parameter of {path} ({takes})")]
    Unknown {
        /// The parameter (clipped).
        name: String,
        /// The endpoint.
        path: &'static str,
        /// What it takes instead.
        takes: String,
    },
}

impl ParamError {
    /// The parameter the refusal is about.
    pub fn parameter(&self) -> &str {
        match self {
            Self::Missing { name, .. }
            | Self::NotANumber { name, .. }
            | Self::OverLimit { name, .. }
            | Self::Empty { name, .. }
            | Self::TooLong { name, .. }
            | Self::Repeated { name } => name,
            Self::Unknown { name, .. } => name,
        }
    }
}

impl IntoResponse for ParamError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.to_string(), "parameter": self.parameter() });
        json_response(StatusCode::BAD_REQUEST, &body)
    }
}

/// A bound listener not serving yet: bound before the emulator starts, so a taken port fails the start.
pub struct FaultControlListener(BoundEarly);

impl FaultControlListener {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, FaultControlError> {
        BoundEarly::bind(addr)
            .await
            .map(Self)
            .map_err(|source| FaultControlError::Bind { addr, source })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr
    }

    /// Serves the fault endpoints over `faults` until [`FaultControl::shutdown`].
    pub fn serve(self, faults: Arc<Faults>) -> FaultControl {
        let router = router(faults);
        let stop = CancellationToken::new();
        let connections = Connections::new(MAX_CONNECTIONS, MAX_CONNECTIONS);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES);
        let task = serve_http1(
            self.0.listener,
            router,
            connections,
            http,
            stop.clone(),
            "fault control",
        );
        FaultControl { stop, task }
    }
}

/// The running listener.
pub struct FaultControl {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl FaultControl {
    /// Stops accepting, lets open requests finish (briefly), then ends.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, self.task).await.is_err() {
            abort.abort();
        }
    }
}

/// The warning to give when `addr` is reachable from beyond this host, if it is.
pub fn exposure_warning(addr: SocketAddr) -> Option<String> {
    (!addr.ip().to_canonical().is_loopback()).then(|| {
        format!(
            "the fault control listens on {addr}, beyond loopback: anyone who reaches it can throttle, detach \
             or cut off every client of this emulator"
        )
    })
}

fn router(faults: Arc<Faults>) -> Router {
    Router::new()
        .route("/faults", get(show))
        .route("/faults/throttle", post(throttle))
        .route("/faults/release", post(release))
        .route("/faults/disposition-delay", post(disposition_delay))
        .route("/faults/force-close", post(force_close))
        .route("/faults/refuse-connections", post(refuse_connections))
        .route("/faults/refuse-events", post(refuse_events))
        .route("/faults/detach", post(detach))
        .route("/faults/expire-tokens", post(expire_tokens))
        .route("/faults/clear", post(clear))
        .fallback(not_found)
        .with_state(faults)
}

type Faulted = Result<Response, ParamError>;

async fn show(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    Params::parse(&uri, "/faults", &[])?;
    Ok(shown(&faults))
}

async fn throttle(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    let mut params = Params::parse(&uri, "/faults/throttle", &["count"])?;
    faults.throttle_next_sends(params.number("count", MAX_COUNT, "transfers")?);
    Ok(shown(&faults))
}

async fn release(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    let mut params = Params::parse(&uri, "/faults/release", &["count"])?;
    faults.release_next_sends(params.number("count", MAX_COUNT, "transfers")?);
    Ok(shown(&faults))
}

async fn disposition_delay(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    let mut params = Params::parse(&uri, "/faults/disposition-delay", &["ms"])?;
    let ms = params.number("ms", MAX_DISPOSITION_DELAY_MS, "milliseconds")?;
    faults.delay_dispositions(Duration::from_millis(ms));
    Ok(shown(&faults))
}

async fn force_close(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    let mut params = Params::parse(&uri, "/faults/force-close", &["after"])?;
    faults.force_close_after_transfers(params.number("after", MAX_COUNT, "transfers")?);
    Ok(shown(&faults))
}

async fn refuse_connections(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    let mut params = Params::parse(&uri, "/faults/refuse-connections", &["ms"])?;
    let ms = params.number("ms", MAX_REFUSE_CONNECTIONS_MS, "milliseconds")?;
    faults.refuse_connections_for(Duration::from_millis(ms));
    Ok(shown(&faults))
}

async fn refuse_events(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    let mut params = Params::parse(&uri, "/faults/refuse-events", &["marker"])?;
    let marker = params.bytes("marker", MAX_MARKER_BYTES)?;
    faults.refuse_events_containing(Some(&marker));
    Ok(shown(&faults))
}

async fn detach(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    Params::parse(&uri, "/faults/detach", &[])?;
    faults.detach_all_links();
    Ok(shown(&faults))
}

async fn expire_tokens(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    Params::parse(&uri, "/faults/expire-tokens", &[])?;
    faults.expire_tokens();
    Ok(shown(&faults))
}

async fn clear(State(faults): State<Arc<Faults>>, uri: Uri) -> Faulted {
    Params::parse(&uri, "/faults/clear", &[])?;
    faults.clear();
    Ok(shown(&faults))
}

async fn not_found(uri: Uri) -> Response {
    let path: String = uri.path().chars().take(ECHO_CHARS).collect();
    let body = json!({ "error": format!("no endpoint {path:?}"), "endpoints": ENDPOINTS });
    json_response(StatusCode::NOT_FOUND, &body)
}

fn shown(faults: &Faults) -> Response {
    json_response(StatusCode::OK, &snapshot_json(&faults.snapshot()))
}

/// One JSON document and a newline (axum's `json` feature is not built in).
fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

/// The JSON of `GET /faults`: what is injected now (counts left, delays, windows left) and the counters.
pub fn snapshot_json(snapshot: &FaultsSnapshot) -> Value {
    let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    json!({
        "throttle_left": snapshot.throttled_sends,
        "release_left": snapshot.released_sends,
        "disposition_delay_ms": millis(snapshot.extra_disposition_delay),
        "force_close_after": snapshot.transfers_before_forced_close,
        "refuse_connections_ms_left": millis(snapshot.refusing_connections_for),
        "refuse_events_marker": snapshot
            .refused_marker
            .as_deref()
            .map(String::from_utf8_lossy),
        "detaches": snapshot.detaches,
        "token_expiries": snapshot.token_expiries,
        "transfers_seen": snapshot.transfers_seen,
    })
}

/// The query parameters of one request, each known to its endpoint and given at most once.
#[derive(Debug)]
struct Params {
    values: HashMap<&'static str, Vec<u8>>,
}

impl Params {
    /// Reads the query of `uri` (form encoding: `%XX`, `+` for a space); `takes` are the names allowed.
    fn parse(uri: &Uri, path: &'static str, takes: &[&'static str]) -> Result<Self, ParamError> {
        let mut values = HashMap::new();
        let pairs = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty());
        for pair in pairs {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = form_decode(raw_name);
            let Some(&known) = takes.iter().find(|known| known.as_bytes() == name) else {
                return Err(ParamError::Unknown {
                    name: clip(&name),
                    path,
                    takes: match takes {
                        [] => "it takes none".to_owned(),
                        _ => format!("it takes {}", takes.join(", ")),
                    },
                });
            };
            if values.insert(known, form_decode(raw_value)).is_some() {
                return Err(ParamError::Repeated { name: known });
            }
        }
        Ok(Self { values })
    }

    /// A whole number from 0 to `max`.
    fn number(&mut self, name: &'static str, max: u64, unit: &str) -> Result<u64, ParamError> {
        let expected = format!("a whole number of {unit} from 0 to {max}");
        let value = self
            .values
            .remove(name)
            .ok_or_else(|| ParamError::Missing {
                name,
                expected: expected.clone(),
            })?;
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Err(ParamError::NotANumber {
                name,
                value: clip(&value),
                expected,
            });
        }
        // All digits: the only failure left is overflow, which is over any limit too.
        match std::str::from_utf8(&value)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
        {
            Some(number) if number <= max => Ok(number),
            _ => Err(ParamError::OverLimit {
                name,
                value: clip(&value),
                max,
            }),
        }
    }

    /// Bytes, 1 to `max` of them.
    fn bytes(&mut self, name: &'static str, max: usize) -> Result<Vec<u8>, ParamError> {
        let value = self
            .values
            .remove(name)
            .ok_or_else(|| ParamError::Missing {
                name,
                expected: format!("1 to {max} bytes"),
            })?;
        match value.len() {
            0 => Err(ParamError::Empty { name, max }),
            len if len > max => Err(ParamError::TooLong { name, len, max }),
            _ => Ok(value),
        }
    }
}

fn form_decode(raw: &str) -> Vec<u8> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced).collect()
}

/// A refused value as a 400 repeats it: as text, at most [`ECHO_CHARS`] characters.
fn clip(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut clipped: String = text.chars().take(ECHO_CHARS).collect();
    if clipped.len() < text.len() {
        clipped.push('…');
    }
    clipped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str, takes: &[&'static str]) -> Result<Params, ParamError> {
        let uri: Uri = format!("/faults/x?{query}").parse().unwrap();
        Params::parse(&uri, "/faults/x", takes)
    }

    fn count(query: &str) -> Result<u64, ParamError> {
        params(query, &["count"])?.number("count", 100, "transfers")
    }

    #[test]
    fn numbers_are_whole_and_within_their_limit() {
        assert_eq!(count("count=0"), Ok(0));
        assert_eq!(count("count=100"), Ok(100));
        assert_eq!(count("count=007"), Ok(7));
        let over = count("count=101").unwrap_err();
        assert_eq!(over.to_string(), "count: 101 is over the limit of 100");
        let huge = count("count=99999999999999999999999").unwrap_err();
        assert!(
            matches!(huge, ParamError::OverLimit { max: 100, .. }),
            "{huge:?}"
        );
        for bad in [
            "count=-1",
            "count=1.5",
            "count=",
            "count=+3",
            "count=1e3",
            "count=%201",
        ] {
            let refused = count(bad).unwrap_err();
            assert!(
                matches!(refused, ParamError::NotANumber { .. }),
                "{bad}: {refused:?}"
            );
            assert!(
                refused
                    .to_string()
                    .ends_with("is not a whole number of transfers from 0 to 100"),
                "{refused}"
            );
        }
        assert_eq!(
            count("").unwrap_err().to_string(),
            "count: required, a whole number of transfers from 0 to 100"
        );
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused_by_name() {
        let unknown = count("count=1&verbose=1").unwrap_err();
        assert_eq!(unknown.parameter(), "verbose");
        assert_eq!(
            unknown.to_string(),
            "verbose: not a parameter of /faults/x (it takes count)"
        );
        let none = params("x=1", &[]).unwrap_err();
        assert_eq!(
            none.to_string(),
            "x: not a parameter of /faults/x (it takes none)"
        );
        assert_eq!(
            count("count=1&count=2").unwrap_err(),
            ParamError::Repeated { name: "count" }
        );
        // Case matters, as in every URL query.
        assert_eq!(count("COUNT=1").unwrap_err().parameter(), "COUNT");
    }

    #[test]
    fn markers_are_form_decoded_and_bounded() {
        let marker = |query: &str| params(query, &["marker"])?.bytes("marker", 8);
        assert_eq!(marker("marker=a+b%2Bc%00").unwrap(), b"a b+c\0");
        assert_eq!(
            marker("marker=").unwrap_err(),
            ParamError::Empty {
                name: "marker",
                max: 8
            }
        );
        assert_eq!(
            marker("marker=123456789").unwrap_err().to_string(),
            "marker: 9 bytes, over the limit of 8"
        );
        assert_eq!(marker("").unwrap_err().parameter(), "marker");
    }

    #[test]
    fn refused_values_are_echoed_clipped() {
        let long = "x".repeat(500);
        let refused = count(&format!("count={long}")).unwrap_err();
        assert!(refused.to_string().len() < 200, "{refused}");
        let name = params(&format!("{long}=1"), &[]).unwrap_err();
        assert_eq!(name.parameter().chars().count(), ECHO_CHARS + 1);
    }

    #[test]
    fn only_addresses_beyond_loopback_are_warned_about() {
        for quiet in [
            "127.0.0.1:0",
            "127.0.0.2:9",
            "[::1]:0",
            "[::ffff:127.0.0.1]:0",
        ] {
            assert_eq!(exposure_warning(quiet.parse().unwrap()), None, "{quiet}");
        }
        for exposed in ["0.0.0.0:0", "10.200.0.2:7000", "[::]:0", "192.168.1.5:80"] {
            let warning = exposure_warning(exposed.parse().unwrap());
            assert!(
                warning.is_some_and(|text| text.contains("anyone who reaches it")),
                "{exposed}"
            );
        }
    }

    #[test]
    fn the_snapshot_json_names_every_setting_and_counter() {
        let faults = Faults::default();
        faults.throttle_next_sends(3);
        faults.delay_dispositions(Duration::from_millis(40));
        faults.refuse_events_containing(Some(b"poison"));
        faults.detach_all_links();
        let shown = snapshot_json(&faults.snapshot());
        assert_eq!(shown["throttle_left"], 3);
        assert_eq!(shown["release_left"], 0);
        assert_eq!(shown["disposition_delay_ms"], 40);
        assert_eq!(shown["force_close_after"], 0);
        assert_eq!(shown["refuse_connections_ms_left"], 0);
        assert_eq!(shown["refuse_events_marker"], "poison");
        assert_eq!(shown["detaches"], 1);
        assert_eq!(shown["token_expiries"], 0);
        assert_eq!(shown["transfers_seen"], 0);
    }
}
