"""Waiting in a test for something it can observe, with a deadline, instead of a fixed sleep."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str | Callable[[], str], *,
             alive: subprocess.Popen | None = None, interval: float = 0.05) -> T:
    """Polls ``condition`` until it returns something true, and returns that.

    Fails the test after ``timeout`` seconds, or as soon as the process ``alive`` has exited, saying
    ``what`` it waited for (a string, or a callable such as a log reader, called only then)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        exited = alive is not None and alive.poll() is not None
        if exited or time.monotonic() >= deadline:
            reason = f"the process exited with {alive.returncode}" if exited else f"timed out after {timeout:g}s"
            raise AssertionError(f"{reason} waiting for {what() if callable(what) else what}")
        time.sleep(interval)
    return value
