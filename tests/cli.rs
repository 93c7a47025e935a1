//! The `eventhub-gateway` command line as a person meets it: the real binary against an in-process gateway on
//! loopback; what `send` and `health` print and their exit status.

mod support;

use std::time::Duration;

use support::*;

/// Runs the binary with `args` (and `env`), stdin from `input`; returns its exit code, stdout and stderr.
async fn run(
    args: &[&str],
    env: &[(&str, &str)],
    input: Option<&str>,
) -> (Option<i32>, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventhub-gateway"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("the binary runs");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).await.unwrap();
    }
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the command ends in time")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn send_file_with_a_line_over_max_request_bytes_says_why_the_rest_was_not_acknowledged() {
    let gateway = start_gateway(|config| config.limits.max_request_bytes = 1088 * 1024).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.txt");
    std::fs::write(
        &file,
        format!("small\n{}\nsmall2\n", "b".repeat(1200 * 1024)),
    )
    .unwrap();
    let address = gateway.local_addr().to_string();
    let (code, stdout, stderr) = run(
        &[
            "send",
            "--quiet",
            "--gateway",
            &address,
            "--file",
            file.to_str().unwrap(),
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("1 accepted, 0 failed, 2 not acknowledged"),
        "{stdout}"
    );
    let why = stdout
        .lines()
        .find(|line| line.starts_with("not acknowledged:"))
        .unwrap_or_else(|| panic!("no reason printed: {stdout}"));
    assert!(why.contains("not sent (from line 2)"), "{why}");
    assert!(why.contains("OutOfRange REQUEST_TOO_LARGE"), "{why}");
    assert!(why.contains("max_request_bytes (1114112 bytes)"), "{why}");
    assert_eq!(
        stored_events(gateway.emulator().unwrap(), "eh1", 4).len(),
        1
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn many_identical_failures_print_the_first_few_then_a_count_per_reason() {
    let gateway = start_gateway(|_| {}).await;
    let address = gateway.local_addr().to_string();
    let input: String = (1..=300).map(|n| format!("{n}\n")).collect();
    let (code, stdout, stderr) = run(
        &[
            "send",
            "--quiet",
            "--gateway",
            &address,
            "--partition-id",
            "9",
            "-",
        ],
        &[],
        Some(&input),
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() <= 15, "{} lines: {stdout}", lines.len());
    assert_eq!(
        lines
            .iter()
            .filter(|line| line.starts_with("failed: line"))
            .count(),
        10
    );
    assert!(
        lines.contains(&"  300 InvalidArgument INVALID_EVENT"),
        "{stdout}"
    );
    assert!(
        lines.contains(&"0 accepted, 300 failed, 0 not acknowledged"),
        "{stdout}"
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failing_send_prints_at_most_two_lines_and_no_backtrace_unless_verbose() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (code, stdout, stderr) = run(
        &["send", "--gateway", &closed, "--text", "hi"],
        &[("RUST_BACKTRACE", "1")],
        None,
    )
    .await;
    assert_eq!(code, Some(1));
    let printed = format!("{stdout}{stderr}");
    assert!(printed.lines().count() <= 2, "{printed}");
    assert!(
        !printed.contains("backtrace") && !printed.contains("Caused by"),
        "{printed}"
    );
    assert!(
        printed.contains(&closed) && printed.contains("refused"),
        "{printed}"
    );
    // Each cause once.
    let line = printed.lines().next().unwrap();
    for word in ["transport error", "Connection refused"] {
        assert!(line.matches(word).count() <= 1, "{line}");
    }
    // -v prints the whole chain and the backtrace.
    let (code, stdout, stderr) = run(
        &["send", "-v", "--gateway", &closed, "--text", "hi"],
        &[("RUST_BACKTRACE", "1")],
        None,
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("Caused by") && stderr.contains("backtrace"),
        "{stdout}{stderr}"
    );
}

#[tokio::test]
async fn send_and_health_take_host_port_or_a_url_under_either_flag_name() {
    let gateway = start_gateway(|_| {}).await;
    let address = gateway.local_addr().to_string();
    let url = format!("http://{address}");
    wait_until_serving(&address).await;
    for target in [&address, &url] {
        for flag in ["--gateway", "--address"] {
            let (code, stdout, stderr) =
                run(&["send", flag, target, "--text", "hi"], &[], None).await;
            assert_eq!(code, Some(0), "send {flag} {target}: {stdout}{stderr}");
            let (code, stdout, stderr) =
                run(&["health", flag, target, "--timeout", "10"], &[], None).await;
            assert_eq!(code, Some(0), "health {flag} {target}: {stdout}{stderr}");
        }
    }
    let (code, _, stderr) = run(
        &["send", "--gateway", "ftp://host:1", "--text", "x"],
        &[],
        None,
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not ftp://"), "{stderr}");
    assert_eq!(
        stored_events(gateway.emulator().unwrap(), "eh1", 4).len(),
        4
    );
    gateway.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_wrong_scheme_is_named_and_the_other_one_suggested() {
    let plain = start_gateway(|_| {}).await;
    let port = plain.local_addr().port();
    for command in ["send", "health"] {
        let (code, stdout, stderr) = run(
            &[
                command,
                "--gateway",
                &format!("https://localhost:{port}"),
                "--text",
                "x",
            ][..if command == "send" { 5 } else { 3 }],
            &[],
            None,
        )
        .await;
        assert_eq!(code, Some(1), "{stdout}{stderr}");
        assert!(
            stderr.contains(&format!(
                "does not speak TLS (a plain-text gateway?); try http://localhost:{port}"
            )),
            "{command}: {stdout}{stderr}"
        );
        assert!(stderr.lines().count() <= 2, "{stderr}");
    }
    plain.shutdown().await.unwrap();

    let pki = TestPki::generate();
    let dir = tempfile::tempdir().unwrap();
    let tls = pki.server_tls(dir.path(), false);
    let secure = start_gateway(|config| config.tls = Some(tls)).await;
    let port = secure.local_addr().port();
    for target in [
        format!("localhost:{port}"),
        format!("http://localhost:{port}"),
    ] {
        for command in ["send", "health"] {
            let args = [command, "--gateway", &target, "--text", "x"];
            let (code, stdout, stderr) =
                run(&args[..if command == "send" { 5 } else { 3 }], &[], None).await;
            assert_eq!(code, Some(1), "{stdout}{stderr}");
            assert!(
                stderr.contains(&format!("speaks TLS; try https://localhost:{port}")),
                "{command} {target}: {stdout}{stderr}"
            );
        }
    }
    // And the suggestion works.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let (code, stdout, stderr) = run(
        &[
            "send",
            "--gateway",
            &format!("https://localhost:{port}"),
            "--ca-cert",
            ca.to_str().unwrap(),
            "--text",
            "x",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    secure.shutdown().await.unwrap();
}
