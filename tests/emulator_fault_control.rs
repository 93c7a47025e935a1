//! `eventhub-gateway emulator --fault-control ADDR` as a real process: each endpoint's fault seen by a raw AMQP
//! client speaking to that process (the outcome, detach or close the SDKs would see), `GET /faults` in step
//! with it, and bad parameters refused with a 400 naming the parameter and its limit, changing nothing.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fe2o3_amqp::Sender;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp_types::messaging::Outcome;
use serde_json::Value;
use support::{
    Client, EmulatorProcess, TIMEOUT, batch, condition_name, detach_error, event,
    rejected_condition,
};

/// The emulator binary with its fault control on a free loopback port.
struct Controlled {
    emulator: EmulatorProcess,
    control: SocketAddr,
}

impl Controlled {
    fn start() -> Self {
        let emulator =
            EmulatorProcess::start(&["--event-hub", "eh1:1", "--fault-control", "127.0.0.1:0"]);
        let deadline = Instant::now() + TIMEOUT;
        let control = loop {
            let stderr = emulator.stderr();
            let announced = stderr
                .split("fault control on http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .and_then(|addr| addr.parse().ok());
            if let Some(addr) = announced {
                break addr;
            }
            assert!(
                Instant::now() < deadline,
                "no fault control address on stderr: {stderr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Self { emulator, control }
    }

    /// A request to the fault control: its status and JSON body.
    async fn call(&self, method: &str, path: &str) -> (u16, Value) {
        http(self.control, method, path).await
    }

    /// `POST path`, which must succeed; the faults shown after it.
    async fn post(&self, path: &str) -> Value {
        let (status, body) = self.call("POST", path).await;
        assert_eq!(status, 200, "POST {path}: {body}");
        body
    }

    /// `GET /faults`.
    async fn shown(&self) -> Value {
        let (status, body) = self.call("GET", "/faults").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// An authorized client with a sender on `eh1`.
    async fn sender(&self) -> (Client, Sender) {
        let mut client = Client::over(self.emulator.connect().await).await.unwrap();
        client.authorize("eh1", Duration::from_secs(600)).await;
        let sender = client.sender("eh1").await.unwrap();
        (client, sender)
    }
}

/// One HTTP/1.1 request with no body (`Connection: close`); the status and the body read as JSON.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    assert!(addr.ip().is_loopback(), "tests reach loopback only");
    let exchange = async {
        let mut socket = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        socket.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        socket.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .expect("answered in time")
        .expect("an HTTP exchange");
    let text = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|error| panic!("{error}: {body:?}"))
    };
    (status, body)
}

/// Opens an AMQP connection, or says why it could not.
async fn try_connect(addr: SocketAddr) -> Result<ConnectionHandle<()>, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|error| error.to_string())?;
    tokio::time::timeout(
        TIMEOUT,
        fe2o3_amqp::Connection::builder()
            .container_id("test-client")
            .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
            .open_with_stream(stream),
    )
    .await
    .map_err(|_| "open timed out".to_owned())?
    .map_err(|error| error.to_string())
}

fn accepted(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Accepted(_))
}

#[tokio::test]
async fn throttle_rejects_the_next_sends_server_busy() {
    let control = Controlled::start();
    let (client, mut sender) = control.sender().await;
    let shown = control.post("/faults/throttle?count=2").await;
    assert_eq!(shown["throttle_left"], 2);
    for _ in 0..2 {
        let outcome = sender.send(event("throttled", None)).await.unwrap();
        assert_eq!(
            rejected_condition(&outcome).as_deref(),
            Some("com.microsoft:server-busy"),
            "{outcome:?}"
        );
    }
    assert!(accepted(
        &sender.send(event("through", None)).await.unwrap()
    ));
    let shown = control.shown().await;
    assert_eq!(shown["throttle_left"], 0);
    assert_eq!(shown["transfers_seen"], 3);
    client.close().await;
}

#[tokio::test]
async fn release_answers_the_next_sends_released() {
    let control = Controlled::start();
    let (client, mut sender) = control.sender().await;
    assert_eq!(
        control.post("/faults/release?count=1").await["release_left"],
        1
    );
    let outcome = sender.send(event("released", None)).await.unwrap();
    assert!(matches!(outcome, Outcome::Released(_)), "{outcome:?}");
    assert!(accepted(&sender.send(event("kept", None)).await.unwrap()));
    assert_eq!(control.shown().await["release_left"], 0);
    client.close().await;
}

#[tokio::test]
async fn disposition_delay_holds_every_outcome_until_turned_off() {
    let control = Controlled::start();
    let (client, mut sender) = control.sender().await;
    let delay = Duration::from_millis(400);
    let shown = control.post("/faults/disposition-delay?ms=400").await;
    assert_eq!(shown["disposition_delay_ms"], 400);
    for i in 0..2 {
        let started = Instant::now();
        assert!(accepted(
            &sender.send(event(&format!("{i}"), None)).await.unwrap()
        ));
        // A lower bound only: the delay is injected, so the outcome cannot come before it.
        assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    }
    let shown = control.post("/faults/disposition-delay?ms=0").await;
    assert_eq!(shown["disposition_delay_ms"], 0);
    client.close().await;
}

#[tokio::test]
async fn force_close_cuts_the_connection_carrying_the_nth_transfer() {
    let control = Controlled::start();
    let (mut client, mut sender) = control.sender().await;
    assert_eq!(
        control.post("/faults/force-close?after=2").await["force_close_after"],
        2
    );
    assert!(accepted(&sender.send(event("first", None)).await.unwrap()));
    assert_eq!(control.shown().await["force_close_after"], 1);
    // fe2o3 does not fail a send awaiting its disposition when the peer closes the connection, so the
    // outcome is bounded here and the close error read from the connection itself.
    let cut = tokio::time::timeout(Duration::from_secs(2), sender.send(event("cut", None))).await;
    assert!(
        !matches!(cut, Ok(Ok(_))),
        "the second transfer gets no outcome: {cut:?}"
    );
    let closed = tokio::time::timeout(TIMEOUT, client.connection.on_close())
        .await
        .expect("closed in time");
    assert!(
        format!("{closed:?}").contains("ConnectionForced"),
        "{closed:?}"
    );
    assert_eq!(control.shown().await["force_close_after"], 0);
    // Fired once: a new connection sends again.
    let (again, mut sender) = control.sender().await;
    assert!(accepted(&sender.send(event("after", None)).await.unwrap()));
    again.close().await;
}

#[tokio::test]
async fn refuse_connections_closes_new_connections_until_cleared() {
    let control = Controlled::start();
    let (open_before, mut sender) = control.sender().await;
    let shown = control.post("/faults/refuse-connections?ms=600000").await;
    let left = shown["refuse_connections_ms_left"].as_u64().unwrap();
    assert!(left > 0 && left <= 600_000, "{shown}");
    let refused = try_connect(control.emulator.addr).await;
    assert!(refused.is_err(), "a new connection is refused");
    // A connection opened before the window keeps working.
    assert!(accepted(&sender.send(event("still", None)).await.unwrap()));
    let shown = control.post("/faults/clear").await;
    assert_eq!(shown["refuse_connections_ms_left"], 0);
    let mut connection = try_connect(control.emulator.addr)
        .await
        .expect("accepted once cleared");
    let _ = connection.close().await;
    open_before.close().await;
}

#[tokio::test]
async fn refuse_events_rejects_every_batch_holding_the_marker() {
    let control = Controlled::start();
    let (client, mut sender) = control.sender().await;
    let shown = control
        .post("/faults/refuse-events?marker=poison%20pill")
        .await;
    assert_eq!(shown["refuse_events_marker"], "poison pill");
    let poisoned = batch(&[event("fine", None), event("a poison pill", None)], None);
    let outcome = sender.send(poisoned).await.unwrap();
    assert_eq!(
        rejected_condition(&outcome).as_deref(),
        Some("com.microsoft:argument-error"),
        "{outcome:?}"
    );
    // Only the marker's bytes: "poison" alone passes.
    let clean = batch(&[event("fine", None), event("poison", None)], None);
    assert!(accepted(&sender.send(clean).await.unwrap()));
    client.close().await;
}

#[tokio::test]
async fn detach_detaches_every_hub_link_with_detach_forced() {
    let control = Controlled::start();
    let (mut client, mut sender) = control.sender().await;
    assert_eq!(control.shown().await["detaches"], 0);
    assert_eq!(control.post("/faults/detach").await["detaches"], 1);
    let error = tokio::time::timeout(TIMEOUT, sender.on_detach())
        .await
        .expect("detached in time");
    assert!(format!("{error:?}").contains("DetachForced"), "{error:?}");
    // The connection stays: a new link sends.
    let mut again = client.sender("eh1").await.unwrap();
    assert!(accepted(&again.send(event("again", None)).await.unwrap()));
    client.close().await;
}

#[tokio::test]
async fn expire_tokens_detaches_links_until_a_fresh_token() {
    let control = Controlled::start();
    let (mut client, mut sender) = control.sender().await;
    assert_eq!(
        control.post("/faults/expire-tokens").await["token_expiries"],
        1
    );
    let error = tokio::time::timeout(TIMEOUT, sender.send(event("x", None)))
        .await
        .expect("answered in time")
        .expect_err("the link was detached");
    let error = detach_error(&error).unwrap_or_else(|| panic!("{error:?}"));
    assert_eq!(condition_name(&error.condition), "amqp:unauthorized-access");
    client.authorize("eh1", Duration::from_secs(600)).await;
    let mut fresh = client.sender("eh1").await.unwrap();
    assert!(accepted(&fresh.send(event("fresh", None)).await.unwrap()));
    client.close().await;
}

#[tokio::test]
async fn clear_turns_every_pending_fault_off() {
    let control = Controlled::start();
    let (client, mut sender) = control.sender().await;
    for path in [
        "/faults/throttle?count=100",
        "/faults/release?count=100",
        "/faults/disposition-delay?ms=300000",
        "/faults/force-close?after=1",
        "/faults/refuse-events?marker=e",
    ] {
        control.post(path).await;
    }
    let armed = control.shown().await;
    assert_eq!(
        (&armed["throttle_left"], &armed["force_close_after"]),
        (&Value::from(100), &Value::from(1)),
        "{armed}"
    );
    let cleared = control.post("/faults/clear").await;
    for setting in [
        "throttle_left",
        "release_left",
        "disposition_delay_ms",
        "force_close_after",
        "refuse_connections_ms_left",
    ] {
        assert_eq!(cleared[setting], 0, "{setting}: {cleared}");
    }
    assert_eq!(cleared["refuse_events_marker"], Value::Null);
    // Any of them still armed would refuse, release, hold (past TIMEOUT) or cut this send.
    let outcome = tokio::time::timeout(TIMEOUT, sender.send(event("clean", None)))
        .await
        .expect("answered in time")
        .unwrap();
    assert!(accepted(&outcome), "{outcome:?}");
    client.close().await;
}

#[tokio::test]
async fn bad_parameters_get_a_400_naming_the_parameter_and_change_nothing() {
    let control = Controlled::start();
    let before = control.shown().await;
    let refusals = [
        (
            "/faults/throttle",
            "count",
            "required, a whole number of transfers from 0 to 1000000",
        ),
        (
            "/faults/throttle?count=abc",
            "count",
            "\"abc\" is not a whole number of transfers from 0 to 1000000",
        ),
        (
            "/faults/throttle?count=-1",
            "count",
            "is not a whole number",
        ),
        (
            "/faults/throttle?count=1000001",
            "count",
            "1000001 is over the limit of 1000000",
        ),
        (
            "/faults/throttle?count=99999999999999999999999",
            "count",
            "over the limit of 1000000",
        ),
        (
            "/faults/throttle?count=1&count=2",
            "count",
            "given more than once",
        ),
        (
            "/faults/throttle?count=1&verbose=1",
            "verbose",
            "not a parameter of /faults/throttle (it takes count)",
        ),
        ("/faults/release?count=2.5", "count", "not a whole number"),
        (
            "/faults/release?count=1000001",
            "count",
            "over the limit of 1000000",
        ),
        (
            "/faults/disposition-delay?ms=300001",
            "ms",
            "300001 is over the limit of 300000",
        ),
        (
            "/faults/disposition-delay",
            "ms",
            "required, a whole number of milliseconds from 0 to 300000",
        ),
        (
            "/faults/force-close?after=1000001",
            "after",
            "over the limit of 1000000",
        ),
        ("/faults/force-close?count=3", "count", "it takes after"),
        (
            "/faults/refuse-connections?ms=600001",
            "ms",
            "600001 is over the limit of 600000",
        ),
        (
            "/faults/refuse-events?marker=",
            "marker",
            "empty; it takes 1 to 1024 bytes",
        ),
        (
            "/faults/refuse-events",
            "marker",
            "required, 1 to 1024 bytes",
        ),
        (
            "/faults/detach?now=1",
            "now",
            "not a parameter of /faults/detach (it takes none)",
        ),
        ("/faults/expire-tokens?all=yes", "all", "it takes none"),
        ("/faults/clear?everything=1", "everything", "it takes none"),
    ];
    for (path, parameter, says) in refusals {
        let (status, body) = control.call("POST", path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["parameter"], parameter, "{path}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with(&format!("{parameter}: ")),
            "{path}: {error}"
        );
        assert!(error.contains(says), "{path}: {error:?} lacks {says:?}");
    }
    let long_marker = format!("/faults/refuse-events?marker={}", "x".repeat(1025));
    let (status, body) = control.call("POST", &long_marker).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("marker: 1025 bytes, over the limit of 1024"))
    );

    assert_eq!(
        control.shown().await,
        before,
        "no refused request changed a fault"
    );
    let (client, mut sender) = control.sender().await;
    assert!(accepted(
        &sender.send(event("untouched", None)).await.unwrap()
    ));
    client.close().await;

    let (status, body) = control.call("POST", "/faults/nothing").await;
    assert_eq!(status, 404);
    assert!(
        body["endpoints"]
            .as_array()
            .is_some_and(|all| all.len() == 10),
        "{body}"
    );
    let (status, _) = control.call("GET", "/faults/throttle?count=1").await;
    assert_eq!(status, 405, "faults change on POST only");
    let (status, _) = control.call("POST", "/faults").await;
    assert_eq!(status, 405);
    assert_eq!(control.shown().await["throttle_left"], 0);
}

#[tokio::test]
async fn on_loopback_the_start_gives_no_exposure_warning() {
    let control = Controlled::start();
    assert_eq!(control.shown().await["transfers_seen"], 0);
    let stderr = control.emulator.stderr();
    assert!(!stderr.contains("beyond loopback"), "{stderr}");
}

/// Set (by scripts/test.sh when it runs as root) to make a missing network namespace a failure, not a skip.
const REQUIRE_NETNS: &str = "EVENTHUB_GATEWAY_REQUIRE_NFT";

#[test]
fn beyond_loopback_the_start_warns_and_still_serves() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    // 0.0.0.0 inside a network namespace of the test's own (unshare --net): not loopback, reaching nothing.
    let binary = std::env::var("EVENTHUB_GATEWAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_eventhub-gateway").to_owned());
    let spawned = Command::new("unshare")
        .args(["--net", "--"])
        .arg(binary)
        .args([
            "emulator",
            "--listen",
            "127.0.0.1:0",
            "--fault-control",
            "0.0.0.0:0",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            let message = format!("SKIPPED: cannot run unshare --net: {error}");
            assert!(std::env::var_os(REQUIRE_NETNS).is_none(), "{message}");
            eprintln!("{message}");
            return;
        }
    };
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while let Ok(line) = lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let announced = line.contains("fault control on http://0.0.0.0:");
        seen.push(line);
        if announced {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let seen = seen.join("\n");
    if seen.contains("unshare: ") {
        let message = format!("SKIPPED: no network namespace for this test: {seen}");
        assert!(std::env::var_os(REQUIRE_NETNS).is_none(), "{message}");
        eprintln!("{message}");
        return;
    }
    assert!(seen.contains("fault control on http://0.0.0.0:"), "{seen}");
    assert!(
        seen.contains("WARN") && seen.contains("beyond loopback: anyone who reaches it"),
        "{seen}"
    );
}
