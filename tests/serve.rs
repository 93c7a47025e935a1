//! `serve` as operators run it: `--check-config` refuses exactly what `serve` refuses (bad connection strings, TLS
//! files that are not PEM, have no key, a key of another certificate, an expired certificate, an empty CA bundle),
//! naming the setting, the file and the problem; and `serve` reaches the emulator's AMQPS and wss listeners
//! trusting a throwaway CA through `event_hubs_ca_file` or the OS store (`SSL_CERT_FILE`), with a certificate
//! error without it.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventhub_emulator::{Emulator, EmulatorConfig};
use eventhub_gateway::config::GatewayConfig;
use eventhub_gateway::proto::v1::event_hub_gateway_client::EventHubGatewayClient;
use eventhub_gateway::proto::v1::{Event, SendEventRequest, event};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::{TestPki, body_text, start_with_tls, stored_events};

const BINARY: &str = env!("CARGO_BIN_EXE_eventhub-gateway");

/// A certificate for `localhost` signed by a fresh CA, valid from `not_before` to `not_after` (years).
fn certificate(not_before: i32, not_after: i32) -> (String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(not_before, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Runs `serve` with these arguments and environment; `check` adds `--check-config`. Returns the exit code
/// and stderr; a `serve` still running after 30 s (it started) is killed and reported as `None`.
fn serve(args: &[&str], env: &[(&str, &str)], check: bool) -> (Option<i32>, String) {
    let mut command = Command::new(BINARY);
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if check {
        command.arg("--check-config");
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("the binary runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (code, stderr)
}

struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn check_config_refuses_what_serve_refuses_naming_the_file_and_the_problem() {
    let files = Files::new();
    let (cert, key) = certificate(2020, 4000);
    let (other_cert, other_key) = certificate(2020, 4000);
    let (expired_cert, expired_key) = certificate(2000, 2001);
    let cert_file = files.write("tls.crt", &cert);
    let key_file = files.write("tls.key", &key);
    let other_key_file = files.write("other.key", &other_key);
    let expired_cert_file = files.write("expired.crt", &expired_cert);
    let expired_key_file = files.write("expired.key", &expired_key);
    let not_pem = files.write("not-pem.crt", "hello, not a certificate\n");
    let cert_as_key = files.write("cert-as.key", &other_cert);
    let empty_bundle = files.write("empty-ca.pem", "\n");
    let key_as_bundle = files.write("key-as-ca.pem", &key);
    let ca_file = files.write("ca.pem", &TestPki::generate().ca_pem);
    let wss = [
        "--connection-string",
        "Endpoint=sb://localhost:1/;SharedAccessKeyName=a;SharedAccessKey=b",
        "--event-hub",
        "eh1",
        "--websockets",
    ];
    let listener = |cert: &Path, key: &Path| -> Vec<String> {
        [
            "--emulator",
            "--tls-cert",
            text(cert),
            "--tls-key",
            text(key),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let with_client_ca = |ca: &Path| {
        let mut args = listener(&cert_file, &key_file);
        args.extend(["--client-ca".to_owned(), text(ca).to_owned()]);
        args
    };
    let strings = |args: &[&str]| args.iter().map(|arg| (*arg).to_owned()).collect::<Vec<_>>();
    type Case = (
        &'static str,
        Vec<String>,
        Vec<(&'static str, String)>,
        String,
    );
    let cases: Vec<Case> = vec![
        (
            "a connection string that does not parse",
            strings(&["--connection-string", "hello", "--event-hub", "eh1"]),
            vec![],
            "connection string part 1 is not Key=Value".into(),
        ),
        (
            "a missing certificate",
            strings(&[
                "--emulator",
                "--tls-cert",
                "/nope/tls.crt",
                "--tls-key",
                "/nope/tls.key",
            ]),
            vec![],
            "tls.cert: /nope/tls.crt: cannot read: No such file or directory".into(),
        ),
        (
            "a certificate that is not PEM",
            listener(&not_pem, &key_file),
            vec![],
            format!(
                "tls.cert: {}: not PEM (no -----BEGIN line)",
                not_pem.display()
            ),
        ),
        (
            "a key file without a key",
            listener(&cert_file, &cert_as_key),
            vec![],
            format!(
                "tls.key: {}: holds no private key (found: Certificate)",
                cert_as_key.display()
            ),
        ),
        (
            "a key of another certificate",
            listener(&cert_file, &other_key_file),
            vec![],
            format!(
                "tls.key: {}: not the private key of the certificate in {}",
                other_key_file.display(),
                cert_file.display()
            ),
        ),
        (
            "an expired certificate",
            listener(&expired_cert_file, &expired_key_file),
            vec![],
            format!(
                "tls.cert: {}: certificate 0 (CN=rcgen self signed cert) expired at",
                expired_cert_file.display()
            ),
        ),
        (
            "an empty client CA bundle",
            with_client_ca(&empty_bundle),
            vec![],
            format!(
                "tls.client_ca: {}: the CA bundle is empty",
                empty_bundle.display()
            ),
        ),
        (
            "an empty Event Hubs CA bundle",
            strings(&wss),
            vec![(
                "EVENTHUB_GATEWAY_EVENT_HUBS_CA_FILE",
                text(&empty_bundle).to_owned(),
            )],
            format!(
                "event_hubs_ca_file: {}: the CA bundle is empty",
                empty_bundle.display()
            ),
        ),
        (
            "an Event Hubs CA bundle holding a key",
            strings(&wss),
            vec![(
                "EVENTHUB_GATEWAY_EVENT_HUBS_CA_FILE",
                text(&key_as_bundle).to_owned(),
            )],
            format!(
                "event_hubs_ca_file: {}: holds no certificate (found: PrivateKey)",
                key_as_bundle.display()
            ),
        ),
        (
            "a proxy with credentials in its configured URL",
            strings(&wss),
            vec![(
                "EVENTHUB_GATEWAY_EVENT_HUBS_PROXY__URL",
                "http://user:hunter2@proxy:3128".to_owned(),
            )],
            "event_hubs_proxy.url: must not hold credentials".into(),
        ),
    ];
    for (case, args, env, expected) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        for check in [true, false] {
            let (code, stderr) = serve(&args, &env, check);
            let mode = if check { "--check-config" } else { "serve" };
            assert_eq!(code, Some(1), "{case} ({mode}): {stderr}");
            assert!(
                stderr.contains(expected.as_str()),
                "{case} ({mode}): {stderr}"
            );
            assert!(
                !stderr.contains("configuration is valid"),
                "{case}: {stderr}"
            );
            assert!(!stderr.contains("hunter2"), "{case}: {stderr}");
        }
    }
    // The same files, right, pass: the refusals above are about what each case broke.
    let mut good = with_client_ca(&ca_file);
    good.extend(["--event-hub".to_owned(), "eh1".to_owned()]);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let (code, stderr) = serve(&good, &[], true);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("configuration is valid"), "{stderr}");
    let (code, stderr) = serve(
        &wss,
        &[("EVENTHUB_GATEWAY_EVENT_HUBS_CA_FILE", text(&ca_file))],
        true,
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("event hubs: localhost:1 over WebSockets with a shared access key, trusting the webpki roots")
            && stderr.contains("and event_hubs_ca_file"),
        "{stderr}"
    );
}

#[test]
fn check_config_reads_durations_as_strings_or_numbers_and_names_a_bad_one() {
    let files = Files::new();
    let good = files.write(
        "gateway.yaml",
        "emulator: true\ndrain_timeout_seconds: 45s\nlimits:\n  stream_idle_timeout_seconds: 1m 30s\n\
         producer:\n  pool_get_timeout: 2.5\n  linger_ms: 250ms\n  max_idle_seconds: 300\n  send_timeout: \"30\"\n",
    );
    let (code, stderr) = serve(&["--config", text(&good)], &[], true);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("configuration is valid"), "{stderr}");
    let (code, stderr) = serve(
        &["--config", text(&good)],
        &[("EVENTHUB_GATEWAY_PRODUCER__STALL_TIMEOUT", "2s")],
        true,
    );
    assert_eq!(code, Some(0), "{stderr}");
    for (case, yaml, env, expected) in [
        (
            "a duration that is not one",
            "producer:\n  stall_timeout: 10 sekunden\n",
            None,
            "configuration: producer.stall_timeout: \"10 sekunden\" is not a duration",
        ),
        (
            "a duration from the environment that is not one",
            "",
            Some(("EVENTHUB_GATEWAY_LIMITS__STREAM_IDLE_TIMEOUT_SECONDS", "-5")),
            "configuration: limits.stream_idle_timeout_seconds: must not be negative",
        ),
        (
            "a zero rate",
            "limits:\n  client_events_per_second: 0\n",
            None,
            "configuration: limits.client_events_per_second: must be at least 1 when set",
        ),
    ] {
        let file = files.write("bad.yaml", &format!("emulator: true\n{yaml}"));
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let (code, stderr) = serve(&["--config", text(&file)], &env, true);
        assert_eq!(code, Some(1), "{case}: {stderr}");
        assert!(stderr.contains(expected), "{case}: {stderr}");
    }
}

/// A connection string to the emulator's TLS listener on `port` (no UseDevelopmentEmulator: TLS, as Azure).
fn tls_connection_string(port: u16) -> String {
    let defaults = EmulatorConfig::default();
    format!(
        "Endpoint=sb://localhost:{port}/;SharedAccessKeyName={};SharedAccessKey={}",
        defaults.key_name, defaults.key
    )
}

fn text_event(text: &str) -> SendEventRequest {
    SendEventRequest {
        event: Some(Event {
            body: Some(event::Body::Text(text.to_owned())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn stored_texts(emulator: &Emulator) -> Vec<String> {
    stored_events(emulator, "eh1", 2)
        .iter()
        .map(|(_, message)| body_text(message))
        .collect()
}

/// Bounds so an unreachable Event Hubs fails a send in seconds.
fn fail_fast(config: &mut GatewayConfig) {
    config.producer.pool_connection_create_timeout = Duration::from_secs(2);
    config.producer.send_timeout = Duration::from_secs(4);
    config.producer.retry_max_attempts = 1;
}

#[tokio::test]
async fn serve_reaches_the_emulators_amqps_and_wss_listeners_through_event_hubs_ca_file() {
    let pki = TestPki::generate();
    let emulator = start_with_tls(&pki, &["eh1:2"]).await;
    let files = Files::new();
    let ca_file = files.write("ca.pem", &pki.ca_pem);
    for (websockets, port) in [
        (false, emulator.tls_addr().unwrap().port()),
        (true, emulator.websocket_addr().unwrap().port()),
    ] {
        for trusted in [true, false] {
            let gateway = support::start_gateway(|config| {
                config.emulator = false;
                config.event_hubs = vec!["eh1".into()];
                config.connection_string = Some(tls_connection_string(port));
                config.websockets = websockets;
                config.event_hubs_ca_file = trusted.then(|| ca_file.clone());
                fail_fast(config);
            })
            .await;
            let mut client = support::gateway_client(&gateway).await;
            let body = format!("over TLS, websockets {websockets}, trusted {trusted}");
            let answer = client.send_event(text_event(&body)).await;
            if trusted {
                answer.unwrap_or_else(|status| panic!("{body}: {status:?}"));
                assert!(stored_texts(&emulator).contains(&body), "{body}");
            } else {
                let status = answer.expect_err("an untrusted certificate must fail the send");
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    status
                        .message()
                        .contains("TLS handshake with localhost failed: invalid peer certificate: UnknownIssuer"),
                    "{body}: {status:?}"
                );
                assert!(!stored_texts(&emulator).contains(&body));
            }
            gateway.shutdown().await.unwrap();
        }
    }
    emulator.shutdown(Duration::from_secs(5)).await;
}

/// A `serve` process; its gRPC address is read from its JSON line.
struct GatewayProcess {
    child: Child,
    address: String,
}

impl GatewayProcess {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(BINARY);
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("SSL_CERT_DIR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let announced: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("no JSON line from serve: {line:?}"));
        let address = announced["grpc"].as_str().unwrap().to_owned();
        Self { child, address }
    }

    async fn send(&self, body: &str) -> Result<(), tonic::Status> {
        let mut client = EventHubGatewayClient::connect(format!("http://{}", self.address))
            .await
            .unwrap();
        client.send_event(text_event(body)).await.map(|_| ())
    }

    /// Stops the process and returns its stderr.
    fn stop(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut stderr).unwrap();
        stderr
    }
}

#[tokio::test]
async fn serve_trusts_the_operating_systems_store() {
    let pki = TestPki::generate();
    let emulator = start_with_tls(&pki, &["eh1:2"]).await;
    let files = Files::new();
    let store = files.write("os-store.pem", &pki.ca_pem);
    let empty_store = files.write("empty-store.pem", "");
    let connection_string = tls_connection_string(emulator.tls_addr().unwrap().port());
    let args = [
        "--connection-string",
        &connection_string,
        "--event-hub",
        "eh1",
    ];
    let fast = [
        (
            "EVENTHUB_GATEWAY_PRODUCER__POOL_CONNECTION_CREATE_TIMEOUT",
            "2",
        ),
        ("EVENTHUB_GATEWAY_PRODUCER__SEND_TIMEOUT", "4"),
        ("EVENTHUB_GATEWAY_PRODUCER__RETRY_MAX_ATTEMPTS", "1"),
    ];
    // SSL_CERT_FILE stands for the OS store (rustls-native-certs reads it as openssl does): the test CA there,
    // and no event_hubs_ca_file.
    let mut env = fast.to_vec();
    env.push(("SSL_CERT_FILE", text(&store)));
    let gateway = GatewayProcess::start(&args, &env);
    let sent = gateway.send("trusted through the OS store").await;
    let stderr = gateway.stop();
    sent.unwrap_or_else(|status| panic!("{status:?}\n{stderr}"));
    assert!(stored_texts(&emulator).contains(&"trusted through the OS store".to_owned()));

    let mut env = fast.to_vec();
    env.push(("SSL_CERT_FILE", text(&empty_store)));
    let gateway = GatewayProcess::start(&args, &env);
    let status = gateway
        .send("not trusted")
        .await
        .expect_err("the CA is in no store");
    let stderr = gateway.stop();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        stderr.contains("invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );
    emulator.shutdown(Duration::from_secs(5)).await;
}
