"""``--server`` needs its port, and a worker that has never reached its server gives up after
``--connect-timeout`` (default 30 s) with a message saying what to check, not after the whole
``--retry-give-up-after`` (a joined worker retries that long: tests/test_reconnect.py)."""
from __future__ import annotations

import socket
import subprocess
import time
from datetime import datetime

import pytest
from click.testing import CliRunner

from gapaware.cli import main
from gapaware.cli_errors import ExitCode
from gapaware.command_line import gapaware_command
from tests.invocations import parse_invocation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["worker", "status", "health"])
@pytest.mark.parametrize(("address", "says"), [
    ("head", "'head' has no port: give HOST:PORT, e.g. head:7070 (the server listens on 7070 unless given --port)"),
    ("[fd00::1]", "'[fd00::1]' has no port"),
    ("fd00::1", "an IPv6 address goes in brackets, as [ADDRESS]:PORT"),
    ("head:http", "the port 'http' is not a number from 1 to 65535"),
    (":7070", "':7070' has no host"),
])
def test_a_server_address_without_a_usable_port_is_refused_naming_the_flag(command, address, says):
    result = CliRunner().invoke(main, [command, "--server", address])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "Invalid value for '--server'" in result.output and says in result.output


def test_addresses_with_a_port_are_taken_as_given():
    for address in ("head:7070", "10.0.0.5:1", "[fd00::1]:65535"):
        assert parse_invocation(["worker", "--server", address])[1]["address"] == address
    assert parse_invocation(["worker", "--server", "head:7070"])[1]["connect_timeout"] == 30.0


def test_a_worker_that_never_reached_its_server_gives_up_after_the_connect_timeout(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    ended = subprocess.run(gapaware_command("worker", "--server", address, "--connect-timeout", "2"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    exited = time.time()
    lines = ended.stdout.splitlines()
    assert ended.returncode == ExitCode.UNREACHABLE, ended.stdout
    assert lines[-1].startswith(f"Error: no answer from the server at {address} for 2s (UNAVAILABLE: "), ended.stdout
    assert "Connection refused" in lines[-1] and "is it running, and is --server its HOST:PORT?" in lines[-1]
    assert "Traceback" not in ended.stdout and len(lines) <= 10, ended.stdout
    connecting = next(line for line in lines if f"connecting to {address}" in line)
    since = datetime.strptime(connecting[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert exited - since < 2 + 10, f"exited {exited - since:.1f}s after it began to connect, with --connect-timeout 2"
