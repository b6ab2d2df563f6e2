"""``gapaware worker --procs K``: K worker processes on this host (e.g. one per GPU), as one command.

Each child is a plain ``gapaware worker`` process; the parent forwards SIGTERM and SIGINT to
them (each leaves gracefully), waits for all of them and exits 0 only when every child did.
"""
from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Callable

from gapaware.command_line import gapaware_command

log = logging.getLogger("gapaware.worker")


def run_worker_processes(count: int, argv_for: Callable[[int], list[str]]) -> int:
    """Runs ``gapaware <argv_for(i)>`` for i in 0..count-1 until all exit; returns the exit code."""
    children: list[subprocess.Popen] = []

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            children.append(subprocess.Popen(gapaware_command(*argv_for(index))))
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    failed = {index: code for index, code in enumerate(codes) if code != 0}
    if failed:
        log.error("worker processes exited with errors (index: exit code): %s", failed)
    return 1 if failed else 0
