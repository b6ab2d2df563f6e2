"""Processes of their own for ``gapaware train``, the benchmarks and the tests: start one, wait until
it is ready, and say why when it never is.

Each process writes its stdout and stderr into one log file. A process is ready once it has written
its ready file: ``gapaware server --ready-file`` writes JSON with the port it listens on.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from gapaware.command_line import gapaware_command

STARTUP_TIMEOUT = 120.0
"""Seconds a process may take to get ready: loading torch and a task on a busy machine is slow."""
POLL_SECONDS = 0.05
LOG_TAIL_CHARS = 3000


class NotReady(RuntimeError):
    """A process that exited, or was not ready in time, before it wrote its ready file; the
    message ends with the tail of its log."""


def spawn(argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Starts ``argv`` with its stdout and stderr written into ``log_path`` and ``env`` added to this
    process's environment."""
    with log_path.open("w") as log:
        return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def spawn_ready(argv: Sequence[str], ready_file: Path, log_path: Path, *, timeout: float = STARTUP_TIMEOUT,
                env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
    """Starts ``argv`` as :func:`spawn` does and waits until it has written ``ready_file``; returns the
    process and the JSON the file holds. Raises :class:`NotReady` when the process exits first, or
    when ``timeout`` seconds pass (the process is then killed)."""
    ready_file.unlink(missing_ok=True)
    proc = spawn(argv, log_path, env=env)
    deadline = time.monotonic() + timeout
    while (ready := _read_ready(ready_file)) is None:
        if proc.poll() is not None:
            raise NotReady(f"`{shlex.join(argv)}` exited with code {proc.returncode} before it was ready; "
                           f"the end of its log ({log_path}):\n{log_tail(log_path)}")
        if time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            raise NotReady(f"`{shlex.join(argv)}` was not ready after {timeout:g} s and was killed; "
                           f"the end of its log ({log_path}):\n{log_tail(log_path)}")
        try:
            proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    return proc, ready


def _read_ready(ready_file: Path) -> dict | None:
    """What ``ready_file`` holds, or None while it is absent or still being written."""
    try:
        return json.loads(ready_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def log_tail(log_path: Path) -> str:
    """The end of a log, where a failing process says why."""
    return log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]


class ServerProcess:
    """A ``gapaware server`` on a free loopback port, started and ready, writing ``NAME.log`` and
    ``NAME.metrics.jsonl`` (or ``metrics_file``) into ``workdir``.

    ``prefix`` runs it under another command (``ip netns exec NS``); flags after the defaults
    override them (``--host``, ``--port``, ``--linger``); ``env`` adds environment variables.
    """

    def __init__(self, workdir: Path, *flags: str, name: str = "server", metrics_file: Path | None = None,
                 prefix: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 timeout: float = STARTUP_TIMEOUT) -> None:
        self.metrics_file = metrics_file or workdir / f"{name}.metrics.jsonl"
        self.log_path = workdir / f"{name}.log"
        ready_file = workdir / f"{name}.ready"
        argv = [*prefix, *gapaware_command("server", "--host", "127.0.0.1", "--port", "0",
                                           "--ready-file", str(ready_file), "--metrics-file", str(self.metrics_file),
                                           "--linger", "5", *flags)]
        self.proc, ready = spawn_ready(argv, ready_file, self.log_path, timeout=timeout, env=env)
        self.port: int = ready["port"]
        self.address = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def records(self, event: str | None = None) -> list[dict]:
        """The metrics file's records so far (those of ``event`` when given)."""
        if not self.metrics_file.exists():
            return []
        rows = [json.loads(line) for line in self.metrics_file.read_text().splitlines()]
        return [r for r in rows if event is None or r["event"] == event]

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_worker(address: str, workdir: Path, index: int, *flags: str, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """A ``gapaware worker`` of ``address`` logging into ``workdir/worker-INDEX.log``."""
    return spawn([*prefix, *gapaware_command("worker", "--server", address, *flags)], workdir / f"worker-{index}.log")
