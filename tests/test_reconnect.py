"""A worker waiting out a long backoff reaches a restarted server about a second after it listens,
not at the end of its backoff (worker/retry.py, ``WorkerClient.answers``)."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from gapaware import WorkerClient
from gapaware.processes import ServerProcess, start_worker
from gapaware.worker.retry import RetryPolicy, call_with_retries
from tests.inprocess import small_state
from tests.waiting import wait_for

LONG_BACKOFF = RetryPolicy(initial_backoff=20, max_backoff=20, give_up_after=300)
"""Each wait drawn from [10, 20] s: far longer than the bound the tests assert."""
REJOIN_BOUND = 5.0
"""Seconds from the restarted server's ready file to the worker's answer: the channel re-attempts the
connection every second at most (client.CHANNEL_OPTIONS), plus a join and a pull on a busy machine."""


def test_a_retry_in_backoff_reaches_a_server_restarted_on_the_same_port(inprocess_servers, caplog):
    first = inprocess_servers(small_state(50))
    with WorkerClient(first.address, timeout=10) as client:
        client.status()
        first.close()
        answered = []
        retrying = threading.Thread(target=lambda: answered.append(
            call_with_retries(client.status, LONG_BACKOFF, what="status", answers=client.answers)))
        retrying.start()
        wait_for(lambda: "status failed" in caplog.text and "retry 1 " in caplog.text, 30, "the first retry's wait")
        inprocess_servers(small_state(50), port=first.port)
        listening = time.monotonic()
        retrying.join(timeout=30)
        waited = time.monotonic() - listening
        assert answered and waited < REJOIN_BOUND, f"answered {waited:.1f}s after the server listened again"


@pytest.mark.slow
def test_a_worker_in_backoff_rejoins_a_server_killed_and_resumed_on_its_port(tmp_path):
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    flags = ("--task", "digits-mlp", "--max-updates", "100000", "--checkpoint-dir", str(checkpoints),
             "--resume", str(checkpoints))
    first = ServerProcess(tmp_path, *flags, name="first")
    second = None
    worker = start_worker(first.address, tmp_path, 0, "--retry-initial-backoff", "20", "--retry-max-backoff", "20",
                          "--connect-timeout", "1")  # joined: the long retry applies, not the first-contact deadline
    log = tmp_path / "worker-0.log"
    try:
        wait_for(lambda: "joined" in log.read_text(), 120, "the worker to join")
        first.proc.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        wait_for(lambda: "retry 1 " in log.read_text(), 60, "the worker's first retry")
        second = ServerProcess(tmp_path, *flags, "--port", str(first.port), name="second")
        listening = time.monotonic()
        wait_for(lambda: "joined again as worker 1000001" in log.read_text(), 60, "the worker to join again")
        waited = time.monotonic() - listening
        assert waited < REJOIN_BOUND, f"joined again {waited:.1f}s after the server was ready:\n{log.read_text()}"
        assert worker.poll() is None
    finally:
        for proc in (worker, first.proc, *([second.proc] if second else [])):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
