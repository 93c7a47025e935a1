//! Readiness tells the truth (`/readyz`, grpc.health.v1 and the `eventhub_gateway_ready` gauge agree): a gateway
//! whose key Event Hubs refuses is never ready and says why; a blackhole between the gateway and Event Hubs
//! makes it not ready within `stall_timeout` (10 s) plus the probes' periods, sends in the blackhole get a true
//! outcome (OK only for stored events, DEADLINE_EXCEEDED only for events never stored), and it is ready again
//! after the heal; an idle connection behind a kernel blackhole is found dead by TCP keepalive in about twice
//! `tcp_keepalive_seconds`, not at the AMQP idle timeout. The blackhole is a userspace relay that stops
//! forwarding (always runs) and, where the machine allows, nftables dropping packets in a network namespace of
//! its own.
//!
//! Each test runs the real binary (`EVENTHUB_GATEWAY_BIN` may name another build, such as main's, to see these
//! fail on it) against an in-process emulator.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use eventhub_emulator::Emulator;
use eventhub_gateway::proto::v1::SendEventRequest;
use support::relay::Relay;
use support::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const HUB: &str = "health";
const PARTITIONS: usize = 2;

/// The gateway's default `stall_timeout`.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Stall detection runs on the pool's 200 ms tick and gRPC health follows every 500 ms; polls here every 100 ms.
const NOT_READY_BOUND: Duration = Duration::from_secs(13);
/// How long the blackhole lasts.
const BLACKHOLE: Duration = Duration::from_secs(20);

/// `connection` with another shared access key.
fn with_key(connection: &str, key: &str) -> String {
    connection
        .split(';')
        .map(|part| match part.strip_prefix("SharedAccessKey=") {
            Some(_) => format!("SharedAccessKey={key}"),
            None => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// `connection` pointing at another loopback port.
fn with_port(connection: &str, port: u16) -> String {
    connection
        .split(';')
        .map(|part| match part.strip_prefix("Endpoint=sb://") {
            Some(rest) => {
                let host = rest.split(':').next().unwrap_or("localhost");
                format!("Endpoint=sb://{host}:{port}")
            }
            None => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// `/readyz`: status and body.
async fn readyz(metrics: SocketAddr) -> (u16, String) {
    let response = http_get(metrics, "/readyz").await.expect("/readyz answers");
    (response.status, response.body.trim().to_owned())
}

/// The `eventhub_gateway_ready` gauge.
async fn ready_gauge(metrics: SocketAddr) -> Option<f64> {
    let page = http_get(metrics, "/metrics")
        .await
        .expect("/metrics answers");
    sample_value(
        &prometheus_samples(&page.body),
        "eventhub_gateway_ready",
        &[],
    )
}

/// grpc.health.v1 Check of the whole server.
async fn grpc_health(address: SocketAddr) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .expect("a valid URI")
        .connect()
        .await
        .expect("connects for health");
    let mut client = HealthClient::new(channel);
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known status")
}

/// The three views of readiness at once: `/readyz`, gRPC health, the gauge.
async fn views(gateway: &GatewayProcess) -> (u16, String, ServingStatus, Option<f64>) {
    let (status, body) = readyz(gateway.metrics).await;
    (
        status,
        body,
        grpc_health(gateway.address).await,
        ready_gauge(gateway.metrics).await,
    )
}

/// Whether all three views say ready (`true`) or all say not ready (`false`).
async fn all_say(gateway: &GatewayProcess, ready: bool) -> bool {
    let (status, _, health, gauge) = views(gateway).await;
    if ready {
        status == 200 && health == ServingStatus::Serving && gauge == Some(1.0)
    } else {
        status == 503 && health == ServingStatus::NotServing && gauge == Some(0.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_is_never_ready_and_says_why_and_the_right_key_is_ready() {
    let emulator = start(&[&format!("{HUB}:{PARTITIONS}")]).await;
    let wrong = with_key(
        &emulator.connection_string(),
        "bm90LXRoZS1lbXVsYXRvcnMta2V5LWF0LWFsbA==",
    );
    let gateway = GatewayProcess::start(
        &["--connection-string", &wrong, "--event-hub", HUB],
        &[("RUST_LOG", "info")],
    );

    // It connects (the emulator accepts the connection) and is refused at the CBS put-token.
    let refused = |body: &str| {
        body.starts_with("no ready connection to Event Hubs: event hub health:")
            && body.contains("authentication failed")
    };
    let mut last = readyz(gateway.metrics).await;
    let until = Instant::now() + TIMEOUT;
    while !(last.0 == 503 && refused(&last.1)) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = readyz(gateway.metrics).await;
    }
    assert!(
        last.0 == 503 && refused(&last.1),
        "/readyz never said the key was refused: {last:?}"
    );
    // And it stays so (the warm-up is retried every 5 s and refused again): never a moment of ready.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let (status, body, health, gauge) = views(&gateway).await;
        assert_eq!(
            (status, health, gauge),
            (503, ServingStatus::NotServing, Some(0.0)),
            "{body}"
        );
        assert!(refused(&body), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Sends are refused as before, with the service's answer.
    let mut client = gateway.client().await;
    let refusal = send_text(&mut client, "with a wrong key")
        .await
        .expect_err("a wrong key cannot send");
    assert_eq!(refusal.code(), tonic::Code::PermissionDenied, "{refusal:?}");
    // The reason is in the log, once per change.
    let log = gateway.stderr();
    assert!(
        log.contains("not usable on this connection") && log.contains("authentication failed"),
        "{log}"
    );
    assert!(log.contains("not ready"), "{log}");
    drop(gateway);

    let right = GatewayProcess::start(
        &[
            "--connection-string",
            &emulator.connection_string(),
            "--event-hub",
            HUB,
        ],
        &[],
    );
    assert!(
        eventually(|| all_say(&right, true)).await,
        "{:?}",
        views(&right).await
    );
    let mut client = right.client().await;
    send_text(&mut client, "with the right key")
        .await
        .expect("sent");
    drop(right);
    emulator.shutdown(TIMEOUT).await;
}

/// The gateway's `ErrorInfo` reason, or `-` for a status without details (the client's own deadline).
fn reason_of(status: &tonic::Status) -> String {
    if status.details().is_empty() {
        return "-".into();
    }
    error_reason(&rich_status(status))
}

/// What a blackhole did, for the assertions and the report.
#[derive(Debug)]
struct Figures {
    not_ready_after: Option<Duration>,
    ready_after_heal: Option<Duration>,
    ok: usize,
    ok_missing: Vec<String>,
    deadline_exceeded_but_stored: Vec<String>,
    outcomes: std::collections::BTreeMap<String, usize>,
    sent_in_blackhole: usize,
}

/// When the blackhole began, and when it healed (once it has).
type Window = (Instant, Option<Instant>);

/// Runs senders against `gateway` (which reaches `emulator` through something `blackhole` can cut), cuts it for
/// [`BLACKHOLE`], heals it, and measures: from the cut to not ready, from the heal to ready, every outcome
/// checked against what the emulator stored.
async fn blackhole_run(
    gateway: &GatewayProcess,
    emulator: &Emulator,
    blackhole: impl Fn(bool),
) -> Figures {
    assert!(
        eventually(|| all_say(gateway, true)).await,
        "never ready before the blackhole: {:?}",
        views(gateway).await
    );
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let cut_at: Arc<parking_lot::Mutex<Option<Window>>> = Arc::default();
    let mut senders = Vec::new();
    for sender in 0..4 {
        let mut client = gateway.client().await;
        let stop = Arc::clone(&stop);
        let cut_at = Arc::clone(&cut_at);
        senders.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut index = 0;
            while !stop.load(Ordering::Relaxed) {
                index += 1;
                let body = format!("blackhole-{sender}-{index}");
                let mut request = tonic::Request::new(SendEventRequest {
                    event_hub: HUB.into(),
                    event: Some(text_event(&body)),
                });
                request.set_timeout(Duration::from_secs(15));
                let sent_at = Instant::now();
                let outcome = match client.send_event(request).await {
                    Ok(_) => "OK".to_owned(),
                    Err(status) => format!("{:?}/{}", status.code(), reason_of(&status)),
                };
                let in_blackhole = match *cut_at.lock() {
                    Some((cut, healed)) => sent_at >= cut && healed.is_none_or(|h| sent_at < h),
                    None => false,
                };
                outcomes.push((body, outcome, in_blackhole));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    blackhole(true);
    let cut = Instant::now();
    *cut_at.lock() = Some((cut, None));
    let mut not_ready_after = None;
    while cut.elapsed() < BLACKHOLE {
        if not_ready_after.is_none() && readyz(gateway.metrics).await.0 == 503 {
            not_ready_after = Some(cut.elapsed());
            // The other two views follow within their periods.
            assert!(
                eventually(|| all_say(gateway, false)).await,
                "/readyz 503 but {:?}",
                views(gateway).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let not_ready_view = views(gateway).await;
    blackhole(false);
    let healed = Instant::now();
    *cut_at.lock() = Some((cut, Some(healed)));
    let mut ready_after_heal = None;
    while healed.elapsed() < Duration::from_secs(40) {
        if all_say(gateway, true).await {
            ready_after_heal = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for sender in senders {
        all.extend(sender.await.expect("sender task"));
    }
    eprintln!(
        "blackhole view before the heal: {not_ready_view:?}; run took {:?}",
        started.elapsed()
    );

    // Late transfers held in the blackhole may still land: wait for the emulator to settle them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored: std::collections::HashSet<String> = stored_events(emulator, HUB, PARTITIONS)
        .iter()
        .map(|(_, message)| body_text(message))
        .collect();
    let mut outcomes = std::collections::BTreeMap::new();
    let mut ok_missing = Vec::new();
    let mut deadline_exceeded_but_stored = Vec::new();
    let mut ok = 0;
    let mut sent_in_blackhole = 0;
    for (body, outcome, in_blackhole) in &all {
        *outcomes.entry(outcome.clone()).or_insert(0) += 1;
        sent_in_blackhole += usize::from(*in_blackhole);
        if outcome == "OK" {
            ok += 1;
            if !stored.contains(body) {
                ok_missing.push(body.clone());
            }
        }
        // The gateway's own DEADLINE_EXCEEDED (with its reason): the event never left.
        if outcome.ends_with("/DEADLINE_EXCEEDED") && stored.contains(body) {
            deadline_exceeded_but_stored.push(body.clone());
        }
    }
    Figures {
        not_ready_after,
        ready_after_heal,
        ok,
        ok_missing,
        deadline_exceeded_but_stored,
        outcomes,
        sent_in_blackhole,
    }
}

fn assert_honest(figures: &Figures) {
    eprintln!("{figures:#?}");
    eprintln!("outcomes: {:?}", figures.outcomes);
    let not_ready_after = figures
        .not_ready_after
        .unwrap_or_else(|| panic!("/readyz stayed 200 through the blackhole: {figures:#?}"));
    assert!(
        not_ready_after <= NOT_READY_BOUND,
        "not ready only after {not_ready_after:?} (bound {NOT_READY_BOUND:?}, stall_timeout {STALL_TIMEOUT:?})"
    );
    assert!(
        figures.ready_after_heal.is_some(),
        "never ready again after the heal: {figures:#?}"
    );
    assert!(figures.ok > 0, "{figures:#?}");
    assert!(figures.sent_in_blackhole > 0, "{figures:#?}");
    assert!(
        figures.ok_missing.is_empty(),
        "answered OK but not stored: {:?}",
        figures.ok_missing
    );
    assert!(
        figures.deadline_exceeded_but_stored.is_empty(),
        "answered DEADLINE_EXCEEDED but stored: {:?}",
        figures.deadline_exceeded_but_stored
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_blackhole_is_not_ready_within_the_stall_bound_and_ready_after_the_heal() {
    let emulator = start(&[&format!("{HUB}:{PARTITIONS}")]).await;
    let relay = Relay::start(emulator.local_addr()).await;
    let gateway = GatewayProcess::start(
        &[
            "--connection-string",
            &with_port(&emulator.connection_string(), relay.addr.port()),
            "--event-hub",
            HUB,
        ],
        &[("RUST_LOG", "info")],
    );
    let figures = blackhole_run(&gateway, &emulator, |paused| relay.set_paused(paused)).await;
    let log = gateway.stderr();
    assert_honest(&figures);
    assert!(log.contains("connection stalled"), "{log}");
    let page = http_get(gateway.metrics, "/metrics").await.unwrap().body;
    let stalled = sample_value(
        &prometheus_samples(&page),
        "eventhub_gateway_connections_stalled_total",
        &[],
    );
    assert!(stalled >= Some(1.0), "{stalled:?}");
    drop(gateway);
    drop(relay);
    emulator.shutdown(TIMEOUT).await;
}

/// Set inside the network namespace this test re-runs itself in.
const IN_NETNS: &str = "EVENTHUB_GATEWAY_TEST_IN_NETNS";
/// Set (by scripts/test.sh when it runs as root) to make a missing nft or netns a failure, not a skip.
const REQUIRE_NFT: &str = "EVENTHUB_GATEWAY_REQUIRE_NFT";

/// Runs `program args`, returning its stderr when it fails.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|error| format!("{program}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Drops every TCP segment to or from `port` (nftables, in the current network namespace), or lets them pass.
fn nft_blackhole(port: u16, on: bool) {
    if on {
        let rules = format!(
            "table inet blackhole {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
             tcp dport {port} drop\n    tcp sport {port} drop\n  }}\n}}\n"
        );
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft runs");
        child.stdin.take().unwrap().write_all_sync(rules.as_bytes());
        assert!(child.wait().unwrap().success(), "nft refused {rules}");
    } else {
        run("nft", &["delete", "table", "inet", "blackhole"]).expect("the blackhole lifts");
    }
}

trait WriteAllSync {
    fn write_all_sync(self, bytes: &[u8]);
}

impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self, bytes).expect("writes to nft");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nftables_blackhole_in_a_network_namespace_is_not_ready_within_the_stall_bound() {
    if std::env::var_os(IN_NETNS).is_some() {
        // Inside the namespace: the emulator (in this process), the gateway process and the rules share it.
        let emulator = start(&[&format!("{HUB}:{PARTITIONS}")]).await;
        let port = emulator.local_addr().port();
        let gateway = GatewayProcess::start(
            &[
                "--connection-string",
                &emulator.connection_string(),
                "--event-hub",
                HUB,
            ],
            &[("RUST_LOG", "info")],
        );
        let figures = blackhole_run(&gateway, &emulator, |on| nft_blackhole(port, on)).await;
        assert_honest(&figures);
        drop(gateway);
        emulator.shutdown(TIMEOUT).await;
        return;
    }
    in_network_namespace(
        "an_nftables_blackhole_in_a_network_namespace_is_not_ready_within_the_stall_bound",
    );
}

/// Re-runs the test `name` of this binary inside a network namespace of its own (with [`IN_NETNS`] set), and
/// fails if it fails there; skips (or fails, with [`REQUIRE_NFT`]) where root, nft or ip are missing.
fn in_network_namespace(name: &str) {
    let missing = if !nix_is_root() {
        Some("not root".to_owned())
    } else {
        ["nft", "ip"]
            .iter()
            .find(|tool| run(tool, &["--version"]).is_err() && run(tool, &["-V"]).is_err())
            .map(|tool| format!("`{tool}` is not installed"))
    };
    if let Some(why) = missing {
        let message = format!(
            "SKIPPED: {name} needs root, nft and ip ({why}); the relay blackhole tests still run"
        );
        assert!(std::env::var_os(REQUIRE_NFT).is_none(), "{message}");
        eprintln!("\n{}\n{message}\n{}\n", "!".repeat(80), "!".repeat(80));
        return;
    }
    let namespace = format!("ehg-health-{}-{}", std::process::id(), name.len());
    if let Err(error) = run("ip", &["netns", "add", &namespace]) {
        let message = format!("SKIPPED: cannot make a network namespace: {error}");
        assert!(std::env::var_os(REQUIRE_NFT).is_none(), "{message}");
        eprintln!("\n{}\n{message}\n{}\n", "!".repeat(80), "!".repeat(80));
        return;
    }
    let outcome = (|| {
        run(
            "ip",
            &["netns", "exec", &namespace, "ip", "link", "set", "lo", "up"],
        )?;
        let exe = std::env::current_exe().map_err(|error| error.to_string())?;
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &namespace])
            .arg(exe)
            .args(["--exact", name, "--nocapture", "--test-threads", "1"])
            .env(IN_NETNS, "1")
            .status()
            .map_err(|error| error.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("the run inside {namespace} failed: {status}"))
        }
    })();
    let _ = run("ip", &["netns", "delete", &namespace]);
    if let Err(error) = outcome {
        panic!("{error}");
    }
}

/// TCP keepalive of the test below: a dead idle peer is found in about twice this.
const TCP_KEEPALIVE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_behind_a_kernel_blackhole_is_found_dead_by_tcp_keepalive() {
    if std::env::var_os(IN_NETNS).is_none() {
        in_network_namespace(
            "an_idle_connection_behind_a_kernel_blackhole_is_found_dead_by_tcp_keepalive",
        );
        return;
    }
    // Inside the namespace: the emulator and the producer in this process, the rules between them.
    let emulator = start(&[&format!("{HUB}:{PARTITIONS}")]).await;
    let port = emulator.local_addr().port();
    let producer = Producer::from_connection_string(
        &emulator.connection_string(),
        false,
        Default::default(),
        ProducerConfig {
            tcp_keepalive: TCP_KEEPALIVE,
            ..ProducerConfig::default()
        },
    )
    .expect("valid producer config");
    producer.expect_hubs(&[HUB.to_owned()]);
    assert!(
        eventually(|| async { producer.is_ready() }).await,
        "{:?}",
        producer.readiness()
    );
    producer
        .send(HUB, Event::text("before"))
        .await
        .expect("sent before the blackhole");

    // Idle: nothing awaits an answer, so the stall check has nothing to go on; the AMQP idle timeout (120 s)
    // and the kernel's retransmissions (about 15 minutes) would take minutes.
    nft_blackhole(port, true);
    let cut = Instant::now();
    let bound = TCP_KEEPALIVE * 2 + Duration::from_secs(4);
    while producer.is_ready() && cut.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let found_after = cut.elapsed();
    let readiness = producer.readiness();
    nft_blackhole(port, false);
    eprintln!("an idle blackholed connection was found dead after {found_after:?}: {readiness:?}");
    assert!(
        readiness.is_err(),
        "still ready {found_after:?} into the blackhole (keepalive {TCP_KEEPALIVE:?})"
    );
    assert!(
        found_after >= TCP_KEEPALIVE,
        "{found_after:?}: {readiness:?}"
    );
    assert_eq!(
        producer.stats().pool.stalled_total,
        0,
        "not the stall check"
    );
    // Healed: a new connection takes over.
    assert!(
        eventually(|| async { producer.is_ready() }).await,
        "{:?}",
        producer.readiness()
    );
    producer
        .send(HUB, Event::text("after"))
        .await
        .expect("sent after the heal");
    producer.close().await;
    emulator.shutdown(TIMEOUT).await;
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A producer of `emulator` reached through `relay`, with `edit` applied to a test configuration, serving `HUB`.
fn relayed_producer(
    emulator: &Emulator,
    relay: &Relay,
    edit: impl FnOnce(&mut ProducerConfig),
) -> Producer {
    let mut config = ProducerConfig {
        send_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    edit(&mut config);
    let producer = Producer::from_connection_string(
        &with_port(&emulator.connection_string(), relay.addr.port()),
        false,
        Default::default(),
        config,
    )
    .expect("valid producer config");
    producer.expect_hubs(&[HUB.to_owned()]);
    producer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_with_a_send_awaiting_its_disposition_kills_the_connection_and_the_send_is_answered_truly()
 {
    let emulator = start(&[&format!("{HUB}:{PARTITIONS}")]).await;
    let relay = Relay::start(emulator.local_addr()).await;
    let producer = relayed_producer(&emulator, &relay, |config| {
        config.stall_timeout = Duration::from_secs(1)
    });
    assert!(
        eventually(|| async { producer.is_ready() }).await,
        "{:?}",
        producer.readiness()
    );
    producer
        .send(HUB, Event::text("before"))
        .await
        .expect("sent before the blackhole");

    relay.set_paused(true);
    let cut = Instant::now();
    let send = tokio::spawn({
        let producer = producer.clone();
        async move { producer.send(HUB, Event::text("in the blackhole")).await }
    });
    assert!(
        eventually(|| async { !producer.is_ready() }).await,
        "still ready in the blackhole"
    );
    let not_ready_after = cut.elapsed();
    assert_eq!(producer.stats().pool.stalled_total, 1);
    // stall_timeout (1 s) plus the maintenance tick; nothing else declares it dead this soon (the link's
    // disposition_timeout is 30 s, the AMQP idle timeout 120 s).
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(3)).contains(&not_ready_after),
        "{not_ready_after:?}"
    );
    relay.set_paused(false);
    let outcome = tokio::time::timeout(TIMEOUT, send)
        .await
        .expect("answered after the heal")
        .expect("send task");
    let stored: Vec<String> = stored_events(&emulator, HUB, PARTITIONS)
        .iter()
        .map(|(_, message)| body_text(message))
        .collect();
    match &outcome {
        // Resent on a fresh connection (the first copy may land too: at least once).
        Ok(_) => assert!(stored.iter().any(|body| body == "in the blackhole")),
        Err(error) => assert!(
            matches!(error, SendError::OutcomeUnknown { .. }),
            "a send in doubt is OK or OUTCOME_UNKNOWN, not {error:?}"
        ),
    }
    assert!(
        eventually(|| async { producer.is_ready() }).await,
        "{:?}",
        producer.readiness()
    );
    producer.close().await;
    drop(relay);
    emulator.shutdown(TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_that_heartbeats_is_not_taken_for_dead() {
    let emulator = start(&[&format!("{HUB}:{PARTITIONS}")]).await;
    let relay = Relay::start(emulator.local_addr()).await;
    // Announcing 0.5 s (half of idle_timeout_seconds) makes the emulator send an empty frame every 0.5 s.
    let producer = relayed_producer(&emulator, &relay, |config| {
        config.stall_timeout = Duration::from_secs(1);
        config.idle_timeout = Duration::from_secs(1);
    });
    assert!(
        eventually(|| async { producer.is_ready() }).await,
        "{:?}",
        producer.readiness()
    );
    // Dispositions take three stall timeouts; heartbeats keep coming meanwhile.
    emulator.faults().delay_dispositions(Duration::from_secs(3));
    let ready_throughout = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let producer = producer.clone();
        let ready_throughout = Arc::clone(&ready_throughout);
        async move {
            loop {
                if !producer.is_ready() {
                    ready_throughout.store(false, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    producer
        .send(HUB, Event::text("slow"))
        .await
        .expect("a slow disposition is still an answer");
    watcher.abort();
    emulator.faults().clear();
    assert!(ready_throughout.load(Ordering::Relaxed));
    assert_eq!(producer.stats().pool.stalled_total, 0);
    assert_eq!(producer.stats().pool.opened_total, 1);
    producer.close().await;
    drop(relay);
    emulator.shutdown(TIMEOUT).await;
}
