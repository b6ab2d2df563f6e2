"""``gapaware worker --procs K``: K worker processes on this host (e.g. one per GPU), as one command.

Each child is a plain ``gapaware worker`` process; the parent forwards SIGTERM and SIGINT to
them (each leaves gracefully). It reports each child's exit the moment it happens and lets the
others go on training (an asynchronous run does not need every worker); once all have exited it
exits 0 if every child did, else with the exit code of the first child that failed (1 for one
killed by a signal).
"""
from __future__ import annotations

import logging
import queue
import signal
import subprocess
import threading
from collections.abc import Callable

from gapaware.command_line import gapaware_command

log = logging.getLogger("gapaware.worker")


def run_worker_processes(count: int, argv_for: Callable[[int], list[str]]) -> int:
    """Runs ``gapaware <argv_for(i)>`` for i in 0..count-1 until all exit; returns the exit code."""
    children: list[subprocess.Popen] = []
    exits: queue.Queue[int] = queue.Queue()  # indices of children, as they exit

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    def watch(index: int) -> None:
        children[index].wait()
        exits.put(index)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    failures: list[int] = []
    try:
        for index in range(count):
            children.append(subprocess.Popen(gapaware_command(*argv_for(index))))
            threading.Thread(target=watch, args=(index,), name=f"gapaware-procs-{index}", daemon=True).start()
        for running in reversed(range(count)):
            child = children[index := exits.get()]
            if child.returncode != 0:
                failures.append(child.returncode)
            _report(index, child.pid, child.returncode, running)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if not failures:
        return 0
    return failures[0] if failures[0] > 0 else 1


def _report(index: int, pid: int, code: int, running: int) -> None:
    others = f"{running} other worker process{'es' if running != 1 else ''} still running"
    if code == 0:
        log.info("worker process %d (pid %d) exited 0; %s", index, pid, others)
    elif code < 0:
        log.error("worker process %d (pid %d) was killed by %s; %s", index, pid, signal.Signals(-code).name, others)
    else:
        log.error("worker process %d (pid %d) exited with code %d (its log above says why); %s", index, pid,
                  code, others)
