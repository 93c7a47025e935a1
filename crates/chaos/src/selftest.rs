//! `chaos selftest`: checks that every fault facility of the suite has its observable effect in the namespaces
//! `scripts/chaos.sh` made (an echo server in the emulator's namespace stands in for the emulator), one line
//! per facility; the first one missing fails the run with one line naming it. Also the hidden echo server.

use std::io;
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::network::Network;
use crate::proxy::{DelayProxy, PathShape};

/// The port the echo server listens on: the emulator's AMQP port, so the faults hit what they will in a run.
const PORT: u16 = 5672;
/// The longest any one check may take; a check that takes longer has failed.
const CHECK_BOUND: Duration = Duration::from_secs(60);
/// The longest the transfer through 30% loss may take (inside the loss check, so the loss is lifted after).
const LOSS_BOUND: Duration = Duration::from_secs(45);

/// Runs every check in order; answers failure at the first that fails.
pub async fn run() -> ExitCode {
    match checks().await {
        Ok(count) => {
            println!("selftest: all {count} facilities have their effect");
            ExitCode::SUCCESS
        }
        Err(Failure { facility, why }) => {
            println!("FAILED {facility}: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Echoes every byte back on every connection to `listen`, until killed.
pub async fn echo(listen: SocketAddr) -> ExitCode {
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("echo: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                let _ = write.shutdown().await;
            }
        });
    }
}

/// The facility that failed and what was seen instead.
struct Failure {
    facility: &'static str,
    why: String,
}

/// Turns any error into a failure of `facility`.
trait Facility<T> {
    fn of(self, facility: &'static str) -> Result<T, Failure>;
}

impl<T, E: std::fmt::Display> Facility<T> for Result<T, E> {
    fn of(self, facility: &'static str) -> Result<T, Failure> {
        self.map_err(|error| Failure {
            facility,
            why: error.to_string(),
        })
    }
}

fn ok(facility: &str, detail: impl std::fmt::Display) {
    println!("ok   {facility}: {detail}");
}

async fn bounded<T>(
    facility: &'static str,
    check: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout(CHECK_BOUND, check)
        .await
        .unwrap_or_else(|_| {
            Err(Failure {
                facility,
                why: format!("did not finish within {CHECK_BOUND:?}"),
            })
        })
}

async fn checks() -> Result<usize, Failure> {
    let mut net = Network::from_env(PORT).of("environment")?;
    net.clear().await.of("nftables (clearing the table)")?;

    let exe = std::env::current_exe().of("echo server")?;
    let listen = net.emulator_addr().to_string();
    let _echo = net
        .emulator_command(&exe, &["echo", "--listen", &listen])
        .stdin(Stdio::null())
        .spawn()
        .of("echo server")?;
    let mut direct = bounded("namespaces", async {
        let started = Instant::now();
        loop {
            match TcpStream::connect(net.emulator_addr()).await {
                Ok(stream) => return Ok(stream),
                Err(error) if started.elapsed() > Duration::from_secs(10) => {
                    return Err(Failure {
                        facility: "namespaces",
                        why: format!("{listen} unreachable: {error}"),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await?;
    let rtt = round_trip(&mut direct).await.of("namespaces")?;
    ok(
        "namespaces",
        format!(
            "echo server in {} at {listen}, reached from {} ({} on {}, {} on {}); direct round trip {}",
            net.emulator_ns,
            net.gateway_ns,
            net.gateway_ip,
            net.gateway_veth,
            net.emulator_ip,
            net.emulator_veth,
            ms(rtt)
        ),
    );

    let proxy = DelayProxy::start(
        "127.0.0.1:0".parse().of("proxy")?,
        net.emulator_addr(),
        PathShape::NONE,
    )
    .await
    .of("proxy")?;
    let mut count = 1;

    bounded("delay", delay(&proxy)).await?;
    bounded("jitter", jitter(&proxy)).await?;
    bounded("stall", stall(&proxy)).await?;
    bounded("proxy reset", proxy_reset(&proxy)).await?;
    count += 4;
    bounded("loss", loss(&proxy, &mut net)).await?;
    bounded("blackhole", blackhole(&proxy, &mut net)).await?;
    bounded("reset", reset(&proxy, &mut net)).await?;
    bounded("bandwidth", bandwidth(&proxy, &mut net)).await?;
    count += 4;

    net.clear().await.of("clear")?;
    if net.faults() != Default::default() || net.counters().await.of("clear")? != Default::default()
    {
        return Err(Failure {
            facility: "clear",
            why: "faults remain after clear".into(),
        });
    }
    Ok(count)
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

async fn connect(proxy: &DelayProxy) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(proxy.local_addr()).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One small message there and back.
async fn round_trip(stream: &mut TcpStream) -> io::Result<Duration> {
    let started = Instant::now();
    stream.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await?;
    Ok(started.elapsed())
}

/// Sends `len` numbered bytes and reads them back in order; answers how long that took.
async fn transfer(stream: TcpStream, len: usize) -> io::Result<Duration> {
    let started = Instant::now();
    let sent: Vec<u8> = (0..len / 4)
        .flat_map(|i| (i as u32).to_le_bytes())
        .collect();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn({
        let sent = sent.clone();
        async move {
            for piece in sent.chunks(16 << 10) {
                write.write_all(piece).await?;
            }
            write.shutdown().await
        }
    });
    let mut received = Vec::with_capacity(sent.len());
    read.read_to_end(&mut received).await?;
    writer.await.map_err(io::Error::other)??;
    if received != sent {
        let at = received
            .iter()
            .zip(&sent)
            .position(|(a, b)| a != b)
            .unwrap_or(received.len().min(sent.len()));
        return Err(io::Error::other(format!(
            "{} bytes back of {}, first difference at {at}",
            received.len(),
            sent.len()
        )));
    }
    Ok(started.elapsed())
}

/// Reads until the stream fails; answers the error's kind, or an error if it ended cleanly.
async fn read_until_error(stream: &mut TcpStream) -> Result<io::ErrorKind, String> {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Err("the connection ended with a FIN, not a reset".into()),
            Ok(_) => continue,
            Err(error) => return Ok(error.kind()),
        }
    }
}

fn expect_reset(
    facility: &'static str,
    kind: Result<io::ErrorKind, String>,
) -> Result<(), Failure> {
    match kind {
        Ok(io::ErrorKind::ConnectionReset) => Ok(()),
        Ok(other) => Err(Failure {
            facility,
            why: format!("the client saw {other:?}, not ECONNRESET"),
        }),
        Err(why) => Err(Failure { facility, why }),
    }
}

async fn delay(proxy: &DelayProxy) -> Result<(), Failure> {
    const F: &str = "delay";
    let one_way = Duration::from_millis(25);
    proxy.set_shape(PathShape {
        one_way_delay: one_way,
        jitter: Duration::ZERO,
    });
    let mut stream = connect(proxy).await.of(F)?;
    let mut fastest = Duration::MAX;
    for _ in 0..5 {
        fastest = fastest.min(round_trip(&mut stream).await.of(F)?);
    }
    proxy.set_shape(PathShape::NONE);
    if fastest < 2 * one_way {
        return Err(Failure {
            facility: F,
            why: format!(
                "a round trip took {} through 2 x {}",
                ms(fastest),
                ms(one_way)
            ),
        });
    }
    ok(
        F,
        format!(
            "fastest of 5 round trips {} through {} one way (>= {})",
            ms(fastest),
            ms(one_way),
            ms(2 * one_way)
        ),
    );
    Ok(())
}

async fn jitter(proxy: &DelayProxy) -> Result<(), Failure> {
    const F: &str = "jitter";
    let shape = PathShape {
        one_way_delay: Duration::from_millis(2),
        jitter: Duration::from_millis(5),
    };
    proxy.set_shape(shape);
    let len = 1 << 20;
    let took = transfer(connect(proxy).await.of(F)?, len).await.of(F)?;
    proxy.set_shape(PathShape::NONE);
    ok(
        F,
        format!(
            "1 MiB of numbered bytes back in order through 2 ms + [0, 5] ms each way, in {}",
            ms(took)
        ),
    );
    Ok(())
}

async fn stall(proxy: &DelayProxy) -> Result<(), Failure> {
    const F: &str = "stall";
    let mut stream = connect(proxy).await.of(F)?;
    round_trip(&mut stream).await.of(F)?;
    proxy.set_stalled(true);
    stream.write_all(b"held").await.of(F)?;
    let mut buf = [0u8; 4];
    let early = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await;
    let open = proxy.open_connections();
    proxy.set_stalled(false);
    if let Ok(read) = early {
        return Err(Failure {
            facility: F,
            why: format!("a stalled proxy moved bytes or closed: {read:?}"),
        });
    }
    let started = Instant::now();
    stream.read_exact(&mut buf).await.of(F)?;
    if &buf != b"held" {
        return Err(Failure {
            facility: F,
            why: format!("held bytes came back as {buf:?}"),
        });
    }
    ok(
        F,
        format!(
            "no byte for 1 s with {open} connection(s) open, then delivered {} after lifting",
            ms(started.elapsed())
        ),
    );
    Ok(())
}

async fn proxy_reset(proxy: &DelayProxy) -> Result<(), Failure> {
    const F: &str = "proxy reset";
    let mut stream = connect(proxy).await.of(F)?;
    round_trip(&mut stream).await.of(F)?;
    let reset = proxy.reset_all();
    expect_reset(F, read_until_error(&mut stream).await)?;
    ok(
        F,
        format!(
            "reset_all reset {reset} connection(s); the client saw ECONNRESET ({} accepted so far)",
            proxy.accepted_total()
        ),
    );
    Ok(())
}

async fn loss(proxy: &DelayProxy, net: &mut Network) -> Result<(), Failure> {
    const F: &str = "loss";
    let mut stream = connect(proxy).await.of(F)?;
    round_trip(&mut stream).await.of(F)?;
    net.set_loss(30).await.of(F)?;
    // Small: at 30% each way TCP's retransmission timer backs off (0.2 s, 0.4 s, ...), and a run of
    // losses of one segment can cost tens of seconds.
    let len = 64 << 10;
    let took = tokio::time::timeout(LOSS_BOUND, transfer(stream, len)).await;
    let took = match took {
        Ok(took) => took.of(F),
        Err(_) => Err(Failure {
            facility: F,
            why: format!("64 KiB did not get through 30% loss within {LOSS_BOUND:?}"),
        }),
    };
    let counters = net.counters().await.of(F);
    net.set_loss(0).await.of(F)?;
    let (took, counters) = (took?, counters?);
    if counters.lost == 0 {
        return Err(Failure {
            facility: F,
            why: "the transfer completed but the nft loss counter shows no drop".into(),
        });
    }
    ok(
        F,
        format!(
            "64 KiB through 30% loss back whole in {}; nft dropped {} segments",
            ms(took),
            counters.lost
        ),
    );
    Ok(())
}

async fn blackhole(proxy: &DelayProxy, net: &mut Network) -> Result<(), Failure> {
    const F: &str = "blackhole";
    let mut stream = connect(proxy).await.of(F)?;
    round_trip(&mut stream).await.of(F)?;
    net.set_blackhole(true).await.of(F)?;
    stream.write_all(b"lost").await.of(F)?;
    let mut buf = [0u8; 4];
    let early = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await;
    let counters = net.counters().await.of(F);
    net.set_blackhole(false).await.of(F)?;
    if let Ok(read) = early {
        return Err(Failure {
            facility: F,
            why: format!("bytes crossed the blackhole or it closed: {read:?}"),
        });
    }
    let counters = counters?;
    if counters.blackholed == 0 {
        return Err(Failure {
            facility: F,
            why: "no byte came back but the nft counter shows no drop".into(),
        });
    }
    let started = Instant::now();
    stream.read_exact(&mut buf).await.of(F)?;
    ok(
        F,
        format!(
            "no byte for 1 s ({} segments dropped, no RST), then delivered {} after lifting (TCP retransmission)",
            counters.blackholed,
            ms(started.elapsed())
        ),
    );
    Ok(())
}

async fn reset(proxy: &DelayProxy, net: &mut Network) -> Result<(), Failure> {
    const F: &str = "reset";
    let mut stream = connect(proxy).await.of(F)?;
    round_trip(&mut stream).await.of(F)?;
    net.set_reset(true).await.of(F)?;
    // The next segment on the connection meets the reject rule; its RST reaches the client through the proxy.
    let result = async {
        stream
            .write_all(b"boom")
            .await
            .map_err(|error| error.to_string())?;
        tokio::time::timeout(Duration::from_secs(5), read_until_error(&mut stream))
            .await
            .map_err(|_| "no reset within 5 s".to_string())?
    }
    .await;
    let counters = net.counters().await.of(F);
    net.set_reset(false).await.of(F)?;
    expect_reset(F, result)?;
    let counters = counters?;
    if counters.reset == 0 {
        return Err(Failure {
            facility: F,
            why: "the client was reset but the nft reject counter shows none".into(),
        });
    }
    ok(
        F,
        format!(
            "nft rejected {} segment(s) with RST; the client saw ECONNRESET through the proxy",
            counters.reset
        ),
    );
    Ok(())
}

async fn bandwidth(proxy: &DelayProxy, net: &mut Network) -> Result<(), Failure> {
    const F: &str = "bandwidth";
    let len = 1 << 20;
    let uncapped = transfer(connect(proxy).await.of(F)?, len).await.of(F)?;
    let kbit = 8_000u32;
    net.cap_bandwidth(Some(kbit)).await.of(F)?;
    let capped = async { transfer(connect(proxy).await?, len).await }.await;
    net.cap_bandwidth(None).await.of(F)?;
    let capped = capped.of(F)?;
    // Each way runs at the rate at once (echo), so 1 MiB there and back takes about len / rate; a tenth off
    // for the bucket's first burst and the clock.
    let floor = Duration::from_secs_f64(len as f64 * 8.0 / (f64::from(kbit) * 1000.0) * 0.9);
    if capped < floor {
        return Err(Failure {
            facility: F,
            why: format!(
                "1 MiB took {} under a {kbit} kbit/s cap (at least {} expected)",
                ms(capped),
                ms(floor)
            ),
        });
    }
    ok(
        F,
        format!(
            "1 MiB there and back in {} under a {kbit} kbit/s tbf cap (>= {}), {} uncapped",
            ms(capped),
            ms(floor),
            ms(uncapped)
        ),
    );
    Ok(())
}
