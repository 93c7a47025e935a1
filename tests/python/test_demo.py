"""The README's run command (scripts/demo.sh) with the test binary: the tour runs, says what it does and
ends with what to try next; a port that is taken is named as the one that failed."""

import os
import socket
import subprocess

from conftest import BINARY, REPO


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(listen, metrics_listen, http_listen="127.0.0.1:0"):
    return subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=REPO,
        env={
            **os.environ,
            "EVENTHUB_GATEWAY_BIN": BINARY,
            "DEMO_EXIT": "1",
            "DEMO_LISTEN": listen,
            "DEMO_METRICS_LISTEN": metrics_listen,
            "DEMO_HTTP_LISTEN": http_listen,
        },
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_the_demo_tours_the_gateway_and_ends_with_next_steps():
    listen = f"127.0.0.1:{free_port()}"
    demo = run_demo(listen, "127.0.0.1:0")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    steps = [line for line in demo.stdout.splitlines() if line.startswith("==> ")]
    assert steps[0].startswith("==> Python venv"), steps
    assert any(step.startswith(f"==> Serving the gateway on {listen} ") for step in steps), steps
    assert "SendStream: 1000 of 1000 accepted" in demo.stdout
    assert "REST: 201 Created" in demo.stdout
    tail = demo.stdout[demo.stdout.index("Try next:"):]
    for hint in ("send --gateway", "examples/read_back.py", "/eh1/messages", "/metrics", "README.md"):
        assert hint in tail, tail


def test_a_taken_metrics_port_is_named_not_the_grpc_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_listen = f"127.0.0.1:{taken.getsockname()[1]}"
        listen = f"127.0.0.1:{free_port()}"
        demo = run_demo(listen, metrics_listen)
    assert demo.returncode == 1
    assert metrics_listen in demo.stderr, demo.stderr
    assert listen not in demo.stderr, demo.stderr
    assert "DEMO_METRICS_LISTEN" in demo.stderr
