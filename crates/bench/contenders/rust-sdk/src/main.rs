//! `rust-sdk-contender`: the `rust-sdk` contender of the benchmark harness (issue 7). Microsoft's official Rust SDK
//! (`azure_messaging_eventhubs`) sending full batches straight to our Event Hubs emulator, as a careful Rust user
//! writes it without the gateway.
//!
//! ```text
//! rust-sdk-contender --emulator CONNECTION_STRING [--hub bench] [--size 100] [--duration 10] [--max-events N]
//!                    [--senders 4] [--clients N] [--drain-timeout 30] [--setup-timeout 30] [--verbose]
//! ```
//!
//! The conventions are those of `crates/bench/contenders/python/contenders.py` (see its docstring):
//!
//! - Bodies are `b"x" * size`, sent to `--hub` with no partition key or id (the service picks the partition).
//! - `--senders` tasks each loop `create_batch` / `try_add_event_data` until the batch is full / `send_batch`, over
//!   `--clients` producer clients (default: one each). One client per sender on purpose: the SDK holds its send
//!   link's lock until the outcome of a send arrives, so the senders of one client take turns, one batch in flight
//!   per client (`--clients 1` measures that).
//! - The clock starts once every client is connected and its send link attached (`create_batch` attaches the link
//!   to learn its maximum message size, and sends nothing) and stops when the last outcome arrived.
//! - An event is sent when it is added to a batch (or taken for one and did not fit: it goes first into the next
//!   batch). Each is counted exactly once: ok when its `send_batch` succeeded, failed otherwise (an SDK error, no
//!   outcome within `--drain-timeout`, too large for an empty batch).
//! - Prints exactly one JSON line on stdout, `{"scenario":"rust-sdk","events_ok":N,"events_failed":M,"seconds":T,
//!   "events_per_second":N/T,"latency_ms":null}`; logs go to stderr. Exit status 0 when the run completed (failed
//!   events are counted, not fatal), 2 with a message when it could not run at all. SIGINT or SIGTERM stops sending
//!   early and still reports; a second one ends the process.
//!
//! Connecting: the SDK takes the connection string as it is (`open_with_connection_string`, which signs SAS tokens
//! with its key and puts them on `$cbs`), but it ignores `UseDevelopmentEmulator` and the endpoint's port: it always
//! dials `amqps://HOST:5671`. Its custom endpoint (an "AMQP proxy": the socket goes there while the AMQP hostname
//! and the token audience stay `amqps://HOST/HUB`) points it at the emulator's plain AMQP port instead, as the other
//! SDKs do for `UseDevelopmentEmulator=true`. Hence this program insists on `UseDevelopmentEmulator=true` and a
//! loopback host: it is built without TLS and talks to a local emulator only.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use azure_core::http::Url;
use azure_messaging_eventhubs::{ConnectionString, ProducerClient};
use tokio::task::JoinSet;
use tracing::{info, warn};
use tracing_subscriber::filter::{LevelFilter, Targets};

const SCENARIO: &str = "rust-sdk";

/// The command line.
#[derive(Debug)]
struct Args {
    emulator: String,
    hub: String,
    size: usize,
    duration: f64,
    max_events: Option<u64>,
    senders: usize,
    clients: Option<usize>,
    drain_timeout: f64,
    setup_timeout: f64,
    verbose: bool,
}

const USAGE: &str = "usage: rust-sdk-contender --emulator CONNECTION_STRING [--hub NAME] [--size BYTES] \
[--duration SECS] [--max-events N] [--senders N] [--clients N] [--drain-timeout SECS] [--setup-timeout SECS] \
[--verbose]";

impl Args {
    fn parse(mut raw: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut args = Args {
            emulator: String::new(),
            hub: "bench".into(),
            size: 100,
            duration: 10.0,
            max_events: None,
            senders: 4,
            clients: None,
            drain_timeout: 30.0,
            setup_timeout: 30.0,
            verbose: false,
        };
        let mut emulator = None;
        while let Some(arg) = raw.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg.clone(), None),
            };
            if flag == "--verbose" {
                args.verbose = true;
                continue;
            }
            if flag == "--help" || flag == "-h" {
                return Err(USAGE.into());
            }
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| raw.next())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--emulator" => emulator = Some(value()?),
                "--hub" => args.hub = value()?,
                "--size" => args.size = positive(&flag, &value()?)?,
                "--duration" => args.duration = positive_float(&flag, &value()?)?,
                "--max-events" => args.max_events = Some(positive(&flag, &value()?)?),
                "--senders" => args.senders = positive(&flag, &value()?)?,
                "--clients" => args.clients = Some(positive(&flag, &value()?)?),
                "--drain-timeout" => args.drain_timeout = positive_float(&flag, &value()?)?,
                "--setup-timeout" => args.setup_timeout = positive_float(&flag, &value()?)?,
                _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
            }
        }
        args.emulator = emulator.ok_or_else(|| format!("--emulator is required\n{USAGE}"))?;
        if args.hub.is_empty() {
            return Err("--hub must not be empty".into());
        }
        Ok(args)
    }

    fn clients(&self) -> usize {
        self.clients.unwrap_or(self.senders).min(self.senders)
    }
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(
    flag: &str,
    text: &str,
) -> Result<T, String> {
    match text.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(format!(
            "{flag} takes a positive whole number, not {text:?}"
        )),
    }
}

fn positive_float(flag: &str, text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(n),
        _ => Err(format!("{flag} takes a positive number, not {text:?}")),
    }
}

/// Where the SDK must dial: the emulator's plain AMQP listener, from the connection string.
fn emulator_endpoint(connection_string: &str) -> Result<String, String> {
    let parsed: ConnectionString = connection_string
        .parse()
        .map_err(|e| format!("--emulator is not a connection string the SDK accepts: {e}"))?;
    let development = connection_string.split(';').any(|part| {
        part.trim().split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("UseDevelopmentEmulator") && v.trim() == "true"
        })
    });
    if !development {
        return Err("--emulator needs UseDevelopmentEmulator=true: this contender talks plain AMQP to a local \
                    emulator only (it is built without TLS)"
            .into());
    }
    let endpoint = Url::parse(&parsed.endpoint)
        .map_err(|e| format!("bad Endpoint {:?}: {e}", parsed.endpoint))?;
    let host = endpoint.host_str().ok_or("the Endpoint has no host")?;
    let loopback = match host.trim_start_matches('[').trim_end_matches(']') {
        "localhost" => true,
        other => other
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
    };
    if !loopback {
        return Err(format!(
            "the emulator's host {host:?} is not a loopback address"
        ));
    }
    // Microsoft's emulator and ours listen on 5672 unless the endpoint names a port.
    Ok(format!(
        "amqp://{host}:{}/",
        endpoint.port().unwrap_or(5672)
    ))
}

/// What every sender shares: the end of sending (deadline, --max-events, a signal) and the event tickets.
struct Run {
    started: Instant,
    deadline: Instant,
    drain_timeout: Duration,
    stop: Arc<AtomicBool>,
    max_events: Option<u64>,
    tickets: AtomicU64,
}

impl Run {
    /// Whether one more event may be sent at `now`; takes its ticket when --max-events bounds the run.
    fn sending(&self, now: Instant) -> bool {
        if now >= self.deadline || self.stop.load(Ordering::Relaxed) {
            return false;
        }
        if let Some(max) = self.max_events
            && self.tickets.fetch_add(1, Ordering::Relaxed) >= max
        {
            self.stop.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }
}

/// One sender's counts. Atomics, so that the main task can still read them if it has to give up on the sender.
#[derive(Default)]
struct Recorder {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Events sent (added to a batch, or taken and carried to the next) whose outcome is not counted yet; kept
    /// exact at every await, where the sender can be stopped.
    pending: AtomicU64,
    batches: AtomicU64,
    /// When the last outcome arrived, in ns after the start; 0 when none did.
    finished_ns: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Recorder {
    /// `count` events failed, now.
    fn fail(&self, run: &Run, count: u64, why: impl Into<String>) {
        if count == 0 {
            return;
        }
        self.failed.fetch_add(count, Ordering::Relaxed);
        *self.errors.lock().unwrap().entry(why.into()).or_default() += count;
        self.answered(run);
    }

    /// An outcome arrived now.
    fn answered(&self, run: &Run) {
        let ns = run.started.elapsed().as_nanos() as u64;
        self.finished_ns.fetch_max(ns.max(1), Ordering::Relaxed);
    }
}

fn describe(error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(200).collect()
}

/// One sender: full batches, one after the other, on its client.
async fn sender(client: Arc<ProducerClient>, run: Arc<Run>, rec: Arc<Recorder>, body: Arc<[u8]>) {
    // An event taken for the previous batch that did not fit: it goes first into the next one.
    let mut carried = false;
    loop {
        rec.pending.store(carried as u64, Ordering::Relaxed);
        let batch = match tokio::time::timeout(run.drain_timeout, client.create_batch(None)).await {
            Ok(Ok(batch)) => batch,
            outcome => {
                let why = match outcome {
                    Ok(Err(error)) => format!("create_batch: {}", describe(&error)),
                    _ => "create_batch: no answer within --drain-timeout".into(),
                };
                warn!("{why}");
                if carried {
                    rec.fail(&run, 1, why);
                    carried = false;
                    rec.pending.store(0, Ordering::Relaxed);
                }
                if run.over() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut count = 0u64;
        if std::mem::take(&mut carried) {
            match batch.try_add_event_data(body.to_vec(), None) {
                Ok(true) => count += 1,
                Ok(false) => rec.fail(&run, 1, "the event does not fit an empty batch"),
                Err(error) => {
                    rec.fail(&run, 1, format!("try_add_event_data: {}", describe(&error)))
                }
            }
        }
        while run.sending(Instant::now()) {
            match batch.try_add_event_data(body.to_vec(), None) {
                Ok(true) => count += 1,
                Ok(false) => {
                    carried = true;
                    break;
                }
                Err(error) => {
                    rec.fail(&run, 1, format!("try_add_event_data: {}", describe(&error)));
                    break;
                }
            }
        }
        if count == 0 {
            if carried {
                // A fresh batch that cannot hold one event never will.
                rec.fail(&run, 1, "the event does not fit an empty batch");
            }
            rec.pending.store(0, Ordering::Relaxed);
            break;
        }
        rec.pending.store(count + carried as u64, Ordering::Relaxed);
        match tokio::time::timeout(run.drain_timeout, client.send_batch(batch, None)).await {
            Ok(Ok(())) => {
                rec.ok.fetch_add(count, Ordering::Relaxed);
                rec.answered(&run);
            }
            Ok(Err(error)) => rec.fail(&run, count, format!("send_batch: {}", describe(&error))),
            Err(_) => rec.fail(&run, count, "send_batch: no outcome within --drain-timeout"),
        }
        rec.batches.fetch_add(1, Ordering::Relaxed);
        if !carried && run.over() {
            rec.pending.store(0, Ordering::Relaxed);
            break;
        }
    }
}

/// Opens `count` clients, each with its send link attached, within --setup-timeout.
async fn connect(
    args: &Args,
    endpoint: &str,
    count: usize,
) -> Result<Vec<Arc<ProducerClient>>, String> {
    let mut opening = JoinSet::new();
    for _ in 0..count {
        let connection_string = args.emulator.clone();
        let hub = args.hub.clone();
        let endpoint = endpoint.to_owned();
        opening.spawn(async move {
            let client = ProducerClient::builder()
                .with_application_id("rust-sdk-contender".into())
                .with_custom_endpoint(endpoint)
                .open_with_connection_string(&connection_string, Some(&hub))
                .await
                .map_err(|e| format!("open_with_connection_string: {e}"))?;
            // Attaches the send link (to learn its maximum message size); sends nothing.
            let attached = client.create_batch(None).await.map(drop);
            match attached {
                Ok(()) => Ok(client),
                Err(error) => {
                    let _ = client.close().await;
                    Err(format!("create_batch: {error}"))
                }
            }
        });
    }
    let started = Instant::now();
    let mut clients = Vec::new();
    let mut failure = None;
    let collect = async {
        while let Some(joined) = opening.join_next().await {
            match joined {
                Ok(Ok(client)) => clients.push(Arc::new(client)),
                Ok(Err(error)) => failure = failure.take().or(Some(error)),
                Err(error) => {
                    failure = failure
                        .take()
                        .or(Some(format!("a connecting task failed: {error}")))
                }
            }
        }
    };
    let timed_out = tokio::time::timeout(Duration::from_secs_f64(args.setup_timeout), collect)
        .await
        .is_err();
    opening.abort_all();
    if timed_out || clients.len() < count {
        let ready = clients.len();
        close_all(clients).await;
        let why = failure.unwrap_or_else(|| {
            format!(
                "not connected within --setup-timeout {} s",
                args.setup_timeout
            )
        });
        return Err(format!(
            "only {ready} of {count} SDK clients connected: {why}"
        ));
    }
    info!(
        "{count} SDK clients connected in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    Ok(clients)
}

/// Closes every client at once, waiting at most 10 s (a hung close must not hang the run).
async fn close_all(clients: Vec<Arc<ProducerClient>>) {
    let mut closing = JoinSet::new();
    for client in clients {
        match Arc::try_unwrap(client) {
            Ok(client) => {
                closing.spawn(async move { client.close().await.map_err(|e| describe(&e)) });
            }
            Err(_) => warn!("a client is still in use; dropped without closing"),
        }
    }
    let all = async {
        while let Some(joined) = closing.join_next().await {
            if let Ok(Err(error)) = joined {
                warn!("closing failed: {error}");
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .is_err()
    {
        warn!("{} clients did not close within 10 s", closing.len());
    }
}

/// Stops sending on the first SIGINT or SIGTERM; the second ends the process.
fn watch_signals(stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        for first in [true, false] {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if first {
                warn!("signal: stop sending");
                stop.store(true, Ordering::Relaxed);
            } else {
                std::process::exit(130);
            }
        }
    });
}

async fn run(args: Args) -> Result<String, String> {
    let endpoint = emulator_endpoint(&args.emulator)?;
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(stop.clone());
    let clients = connect(&args, &endpoint, args.clients()).await?;
    info!(
        "{SCENARIO}: {} senders over {} clients to {endpoint} (hub {}), {} B bodies, {} s",
        args.senders,
        clients.len(),
        args.hub,
        args.size,
        args.duration
    );

    let body: Arc<[u8]> = vec![b'x'; args.size].into();
    let started = Instant::now();
    let run = Arc::new(Run {
        started,
        deadline: started + Duration::from_secs_f64(args.duration),
        drain_timeout: Duration::from_secs_f64(args.drain_timeout),
        stop,
        max_events: args.max_events,
        tickets: AtomicU64::new(0),
    });
    let recorders: Vec<Arc<Recorder>> = (0..args.senders).map(|_| Arc::default()).collect();
    let mut senders = JoinSet::new();
    for (index, rec) in recorders.iter().enumerate() {
        let client = clients[index % clients.len()].clone();
        senders.spawn(sender(client, run.clone(), rec.clone(), body.clone()));
    }

    // Each sender stops by itself within one create_batch and one send_batch (each bounded by --drain-timeout)
    // of the deadline, or two when an event is carried; past that, give up on it and count what it had in flight.
    let give_up = run.deadline.max(Instant::now()) + 2 * run.drain_timeout + Duration::from_secs(5);
    let all = async { while senders.join_next().await.is_some() {} };
    if tokio::time::timeout_at(give_up.into(), all).await.is_err() {
        warn!(
            "{} of {} senders still waiting for an outcome; their events in flight count as failed",
            senders.len(),
            args.senders
        );
        senders.abort_all();
        while senders.join_next().await.is_some() {}
        for rec in &recorders {
            rec.fail(
                &run,
                rec.pending.swap(0, Ordering::Relaxed),
                "no outcome within --drain-timeout",
            );
        }
    }

    let ok: u64 = recorders.iter().map(|r| r.ok.load(Ordering::Relaxed)).sum();
    let failed: u64 = recorders
        .iter()
        .map(|r| r.failed.load(Ordering::Relaxed))
        .sum();
    let batches: u64 = recorders
        .iter()
        .map(|r| r.batches.load(Ordering::Relaxed))
        .sum();
    let ended_ns = recorders
        .iter()
        .map(|r| r.finished_ns.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let seconds = ended_ns as f64 / 1e9;
    let rate = if seconds > 0.0 {
        ok as f64 / seconds
    } else {
        0.0
    };
    info!(
        "{SCENARIO}: {ok} ok, {failed} failed in {seconds:.3} s: {rate:.1} events/s; {batches} batches ({:.1} events each)",
        (ok + failed) as f64 / batches.max(1) as f64
    );
    let mut errors = BTreeMap::<String, u64>::new();
    for rec in &recorders {
        for (why, count) in rec.errors.lock().unwrap().iter() {
            *errors.entry(why.clone()).or_default() += count;
        }
    }
    let mut errors: Vec<_> = errors.into_iter().collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    for (why, count) in errors.iter().take(10) {
        warn!("{SCENARIO}: {count} events failed: {why}");
    }
    let mut answered: Vec<u64> = recorders
        .iter()
        .map(|r| r.ok.load(Ordering::Relaxed) + r.failed.load(Ordering::Relaxed))
        .collect();
    answered.sort_unstable();
    info!(
        "{SCENARIO}: events per sender: min {}, median {}, max {}",
        answered[0],
        answered[answered.len() / 2],
        answered[answered.len() - 1]
    );
    drop(recorders);
    close_all(clients).await;

    Ok(format!(
        "{{\"scenario\":\"{SCENARIO}\",\"events_ok\":{ok},\"events_failed\":{failed},\"seconds\":{seconds:.6},\
         \"events_per_second\":{rate:.3},\"latency_ms\":null}}"
    ))
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("rust-sdk-contender: {message}");
            return ExitCode::from(2);
        }
    };
    // Our own INFO lines always; the SDK's only with --verbose (it logs every link and token at INFO).
    use tracing_subscriber::prelude::*;
    let others = if args.verbose {
        LevelFilter::INFO
    } else {
        LevelFilter::WARN
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(
            Targets::new()
                .with_default(others)
                .with_target("rust_sdk_contender", LevelFilter::INFO),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rust-sdk-contender: no tokio runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("rust-sdk-contender: cannot run: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "Endpoint=sb://localhost:40123;SharedAccessKeyName=RootManageSharedAccessKey;\
                        SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;";

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn dials_the_emulators_plain_amqp_port() {
        assert_eq!(emulator_endpoint(OURS).unwrap(), "amqp://localhost:40123/");
        let slash = "Endpoint=sb://127.0.0.1:5999/;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true";
        assert_eq!(emulator_endpoint(slash).unwrap(), "amqp://127.0.0.1:5999/");
        let no_port = "Endpoint=sb://[::1];SharedAccessKeyName=k;SharedAccessKey=v;usedevelopmentemulator=true";
        assert_eq!(emulator_endpoint(no_port).unwrap(), "amqp://[::1]:5672/");
    }

    #[test]
    fn refuses_anything_but_a_local_emulator() {
        let service =
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v";
        assert!(
            emulator_endpoint(service)
                .unwrap_err()
                .contains("UseDevelopmentEmulator=true")
        );
        let remote = "Endpoint=sb://10.1.2.3:5672;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true";
        assert!(
            emulator_endpoint(remote)
                .unwrap_err()
                .contains("not a loopback")
        );
        let keyless = "Endpoint=sb://localhost:5672;UseDevelopmentEmulator=true";
        assert!(
            emulator_endpoint(keyless)
                .unwrap_err()
                .contains("connection string")
        );
    }

    #[test]
    fn parses_the_harness_arguments() {
        let args = parse(&[
            "--emulator",
            OURS,
            "--hub",
            "bench",
            "--size",
            "1024",
            "--duration",
            "2.5",
            "--max-events=300",
        ])
        .unwrap();
        assert_eq!(
            (args.hub.as_str(), args.size, args.duration),
            ("bench", 1024, 2.5)
        );
        assert_eq!(args.max_events, Some(300));
        assert_eq!((args.senders, args.clients()), (4, 4));
        let args = parse(&["--emulator", OURS, "--senders", "8", "--clients", "1"]).unwrap();
        assert_eq!((args.senders, args.clients()), (8, 1));
        // Never more clients than senders: a client without a sender would only idle.
        assert_eq!(
            parse(&["--emulator", OURS, "--senders", "2", "--clients", "5"])
                .unwrap()
                .clients(),
            2
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(parse(&[]).unwrap_err().contains("--emulator is required"));
        assert!(parse(&["--emulator", OURS, "--size", "0"]).is_err());
        assert!(parse(&["--emulator", OURS, "--duration", "-1"]).is_err());
        assert!(
            parse(&["--emulator", OURS, "--senders"])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            parse(&["--emulator", OURS, "--partition-key", "k"])
                .unwrap_err()
                .contains("unknown argument")
        );
    }

    #[test]
    fn max_events_hands_out_exactly_that_many_tickets() {
        let started = Instant::now();
        let run = Run {
            started,
            deadline: started + Duration::from_secs(60),
            drain_timeout: Duration::from_secs(1),
            stop: Arc::default(),
            max_events: Some(3),
            tickets: AtomicU64::new(0),
        };
        let sent = (0..10).filter(|_| run.sending(Instant::now())).count();
        assert_eq!(sent, 3);
        assert!(run.over());
    }
}
