//! The processes under test: the emulator in its own namespace, the gateway beside the harness; starting,
//! probing, signalling and sampling them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use crate::network::Network;

/// The one hub every scenario sends to.
pub const HUB: &str = "chaos";
/// Its partitions.
pub const PARTITIONS: u32 = 4;
/// The emulator's shared access key name and key: a made-up credential for a made-up namespace.
pub const KEY_NAME: &str = "chaos";
/// See [`KEY_NAME`].
pub const KEY: &str = "Y2hhb3MtdGVzdC1rZXktbm90LWEtc2VjcmV0";
/// The emulator's AMQP port, on its namespace's address.
pub const EMULATOR_PORT: u16 = 5672;
/// The emulator's fault control (HTTP), on its namespace's address.
pub const FAULT_CONTROL_PORT: u16 = 5680;
/// The gateway's gRPC listener, on the gateway namespace's loopback.
pub const GATEWAY_GRPC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 50051);
/// The gateway's metrics and probes listener.
pub const GATEWAY_METRICS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// How long a process may take to come up before the run fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What the gateway is configured with, per run mode.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    /// `producer.send_timeout`: an event's longest wait for Event Hubs.
    pub send_timeout: Duration,
    /// `producer.stall_timeout`.
    pub stall_timeout: Duration,
    /// `drain_timeout_seconds`.
    pub drain_timeout: Duration,
    /// `limits.http2_keepalive_interval_seconds` (its timeout is the same).
    pub keepalive: Duration,
    /// `producer.reconnect_backoff_max_seconds`.
    pub reconnect_backoff_max: Duration,
}

/// The emulator, running in its namespace; killed when dropped.
pub struct EmulatorProcess {
    child: Child,
    amqp: SocketAddr,
    control: SocketAddr,
    http: reqwest::Client,
}

impl EmulatorProcess {
    /// Starts `eventhub-gateway emulator` in the emulator namespace and waits for its AMQP port.
    pub async fn start(network: &Network, gateway_bin: &Path, log: &Path) -> Result<Self> {
        let ip = network.emulator_ip;
        let amqp = SocketAddr::new(ip, EMULATOR_PORT);
        let control = SocketAddr::new(ip, FAULT_CONTROL_PORT);
        let args = [
            "emulator".to_owned(),
            "--listen".into(),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), EMULATOR_PORT).to_string(),
            "--event-hub".into(),
            format!("{HUB}:{PARTITIONS}"),
            "--key-name".into(),
            KEY_NAME.into(),
            "--key".into(),
            KEY.into(),
            "--fault-control".into(),
            control.to_string(),
        ];
        let mut command = network.emulator_command(gateway_bin, &args);
        command.stdout(Stdio::null()).stderr(log_file(log)?);
        let child = command.spawn().context("the emulator starts")?;
        let emulator = Self {
            child,
            amqp,
            control,
            http: reqwest::Client::new(),
        };
        wait_for_port(amqp).await.context("the emulator listens")?;
        wait_for_port(control)
            .await
            .context("the emulator's fault control listens")?;
        Ok(emulator)
    }

    /// The emulator's AMQP address, on the veth.
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp
    }

    /// A connection string to this emulator at `addr` (the emulator itself, or a proxy in front of it).
    pub fn connection_string_via(addr: SocketAddr) -> String {
        format!(
            "Endpoint=sb://{}:{};SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY};UseDevelopmentEmulator=true;",
            addr.ip(),
            addr.port()
        )
    }

    /// Injects one of the emulator's own faults (`POST /faults/<path>`).
    pub async fn fault(&self, path_and_query: &str) -> Result<()> {
        let url = format!("http://{}/faults/{path_and_query}", self.control);
        let response = self
            .http
            .post(&url)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        if !response.status().is_success() {
            let status = response.status();
            bail!(
                "POST {url}: {status} {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Stops the emulator.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The gateway, running beside the harness; killed when dropped.
pub struct GatewayProcess {
    child: Child,
    pid: i32,
    http: reqwest::Client,
}

impl GatewayProcess {
    /// Starts `eventhub-gateway serve` toward `upstream` (the proxy in front of the emulator) and waits until
    /// it is ready.
    pub async fn start(
        gateway_bin: &Path,
        upstream: SocketAddr,
        settings: &GatewaySettings,
        dir: &Path,
        log: &Path,
    ) -> Result<Self> {
        let config = dir.join("gateway.toml");
        std::fs::write(&config, gateway_config(upstream, settings))
            .with_context(|| format!("writes {}", config.display()))?;
        let mut command = Command::new(gateway_bin);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(log)?)
            .kill_on_drop(true);
        let child = command.spawn().context("the gateway starts")?;
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .context("the gateway has a pid")?;
        let gateway = Self {
            child,
            pid,
            http: probe_client(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while gateway.readyz().await != Some(200) {
            if Instant::now() > deadline {
                bail!(
                    "the gateway was not ready within {START_TIMEOUT:?}: see {}",
                    log.display()
                );
            }
            sleep(Duration::from_millis(100)).await;
        }
        Ok(gateway)
    }

    /// The gateway's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `/readyz`'s status code, or `None` when the listener does not answer.
    pub async fn readyz(&self) -> Option<u16> {
        readyz(&self.http).await
    }

    /// The `/metrics` text, or empty when it does not answer.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{GATEWAY_METRICS}/metrics");
        match self.http.get(url).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// SIGTERM, then waits (at most `bound`) for the exit; `None` when it did not exit in time.
    pub async fn terminate(mut self, bound: Duration) -> Option<ExitStatus> {
        signal(self.pid, rustix::process::Signal::TERM);
        timeout(bound, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// SIGKILL, and reaps it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// An HTTP client for the gateway's probes, with a short timeout (a probe that hangs is an answer too).
pub fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default()
}

/// The gateway's `/readyz` status code, or `None` when its listener does not answer.
pub async fn readyz(http: &reqwest::Client) -> Option<u16> {
    let url = format!("http://{GATEWAY_METRICS}/readyz");
    http.get(url).send().await.ok().map(|r| r.status().as_u16())
}

fn signal(pid: i32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// The gateway's configuration file for one run.
fn gateway_config(upstream: SocketAddr, settings: &GatewaySettings) -> String {
    let seconds = |d: Duration| d.as_secs_f64();
    format!(
        r#"listen = "{GATEWAY_GRPC}"
metrics_listen = "{GATEWAY_METRICS}"
event_hubs = ["{HUB}"]
connection_string = "{connection}"
drain_timeout_seconds = {drain}

[limits]
http2_keepalive_interval_seconds = {keepalive}
http2_keepalive_timeout_seconds = {keepalive}

[producer]
send_timeout = {send}
stall_timeout = {stall}
reconnect_backoff_max_seconds = {backoff}
"#,
        connection = EmulatorProcess::connection_string_via(upstream),
        drain = seconds(settings.drain_timeout),
        keepalive = seconds(settings.keepalive),
        send = seconds(settings.send_timeout),
        stall = seconds(settings.stall_timeout),
        backoff = seconds(settings.reconnect_backoff_max),
    )
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opens {}", path.display()))
}

async fn wait_for_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {START_TIMEOUT:?}");
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// One reading of a process's resources.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Resources {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// The most it ever was, KiB.
    pub peak_rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

/// Reads `/proc/<pid>` (the gateway shares the harness's PID namespace).
pub fn resources(pid: i32) -> Resources {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count() as u64)
        .unwrap_or(0);
    Resources {
        rss_kib: field("VmRSS:"),
        peak_rss_kib: field("VmHWM:"),
        fds,
        threads: field("Threads:"),
    }
}

/// A gauge's value in Prometheus text (summed over its label sets), or 0.
pub fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Where one scenario's files go.
pub fn scenario_dir(out: &Path, scenario: &str) -> Result<PathBuf> {
    let dir = out.join(scenario);
    std::fs::create_dir_all(&dir).with_context(|| format!("creates {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_sums_its_label_sets_and_ignores_longer_names() {
        let text = "# HELP x\nx_total 9\nx{hub=\"a\"} 2\nx{hub=\"b\"} 3.5\nx 1\n";
        assert_eq!(gauge(text, "x"), 6.5);
        assert_eq!(gauge(text, "missing"), 0.0);
    }

    #[test]
    fn the_config_names_the_proxy_and_the_timeouts() {
        let settings = GatewaySettings {
            send_timeout: Duration::from_secs(8),
            stall_timeout: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(5),
            reconnect_backoff_max: Duration::from_secs(3),
        };
        let text = gateway_config("127.0.0.1:4000".parse().unwrap(), &settings);
        assert!(text.contains("Endpoint=sb://127.0.0.1:4000;"));
        assert!(text.contains("send_timeout = 8\n"));
        assert!(text.contains("http2_keepalive_timeout_seconds = 5\n"));
    }
}
