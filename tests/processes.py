"""Real ``gapaware`` processes for integration tests: start them, wait for them, read what they wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def gapaware_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gapaware", *args]


class ServerProcess:
    """A ``gapaware server`` on a free loopback port, logging into ``workdir``.

    ``prefix`` runs it under another command (``ip netns exec NS``); flags after the defaults
    override them (``--host``, ``--port``); ``env`` adds environment variables."""

    def __init__(self, workdir: Path, *flags: str, name: str = "server", prefix: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.ready_file = workdir / f"{name}.ready"
        self.metrics_file = workdir / f"{name}.metrics.jsonl"
        self.log_path = workdir / f"{name}.log"
        self.ready_file.unlink(missing_ok=True)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [*prefix, *gapaware_cmd("server", "--host", "127.0.0.1", "--port", "0",
                                        "--ready-file", str(self.ready_file),
                                        "--metrics-file", str(self.metrics_file), "--linger", "5", *flags)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            )
        self.port = self._wait_ready()
        self.address = f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 90.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists() and self.ready_file.read_text():
                return json.loads(self.ready_file.read_text())["port"]
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def records(self, event: str | None = None) -> list[dict]:
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


def start_worker(address: str, workdir: Path, index: int, *flags: str,
                 prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    with (workdir / f"worker-{index}.log").open("w") as log:
        return subprocess.Popen([*prefix, *gapaware_cmd("worker", "--server", address, *flags)],
                                stdout=log, stderr=subprocess.STDOUT)
