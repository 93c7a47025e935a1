"""docs/running.md outside Kubernetes: the systemd unit is valid for systemd and stops slower than the drain."""

import configparser
import re
import shutil
import subprocess

import pytest

from conftest import REPO

UNIT = REPO / "examples" / "systemd" / "eventhub-gateway.service"


def unit():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_verifies_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package)")
    # verify checks that ExecStart's program exists: point it at a stand-in that does.
    copy = tmp_path / "eventhub-gateway.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/eventhub-gateway", shutil.which("true")))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_unit_keeps_the_secret_off_the_command_line_and_outlasts_the_drain():
    service = unit()["Service"]
    assert service["LoadCredential"].startswith("connection-string:")
    assert "--connection-string-file %d/connection-string" in service["ExecStart"]
    assert "--connection-string " not in service["ExecStart"]
    drain = 30  # the gateway's default drain_timeout_seconds (config.rs)
    assert int(service["TimeoutStopSec"]) > drain
    assert service["KillSignal"] == "SIGTERM"
    assert re.fullmatch(r"serve --config \S+ .*", service["ExecStart"].split(" ", 1)[1])
