"""The worker's retry policy: bounded exponential backoff with jitter, only for retryable statuses."""
import random
import threading
import time

import grpc
import pytest

from gapaware.worker.retry import RetryAborted, RetryPolicy, call_with_retries


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"


def failing(codes: list[grpc.StatusCode], result="ok"):
    calls = []

    def call():
        calls.append(len(calls))
        if len(calls) <= len(codes):
            raise FakeRpcError(codes[len(calls) - 1])
        return result
    return call, calls


def test_backoffs_grow_exponentially_within_jitter_and_are_capped():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    waits = [w for w, _ in zip(policy.backoffs(random.Random(0)), range(8))]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings)), waits
    assert len({round(w, 6) for w in waits[4:]}) == 4, "jitter spreads the capped waits"


def test_unavailable_deadline_and_a_full_server_are_retried_until_success(caplog):
    call, calls = failing([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.RESOURCE_EXHAUSTED])
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.02)
    assert call_with_retries(call, policy, what="push 7") == "ok"
    assert len(calls) == 4
    assert "push 7 failed (UNAVAILABLE: fake UNAVAILABLE); retry 1" in caplog.text
    assert "retry 2" in caplog.text


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.FAILED_PRECONDITION])
def test_answers_are_not_retried(code):
    call, calls = failing([code])
    with pytest.raises(FakeRpcError):
        call_with_retries(call, RetryPolicy(initial_backoff=0.01), what="push")
    assert len(calls) == 1


def test_gives_up_after_the_time_bound(caplog):
    call, calls = failing([grpc.StatusCode.UNAVAILABLE] * 1000)
    with pytest.raises(FakeRpcError):
        call_with_retries(call, RetryPolicy(initial_backoff=0.01, max_backoff=0.05, give_up_after=0.3),
                          what="pull")
    assert 3 <= len(calls) < 100
    assert "giving up after retrying" in caplog.text


def test_a_stop_request_interrupts_the_wait():
    call, calls = failing([grpc.StatusCode.UNAVAILABLE] * 10)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(RetryAborted):
        call_with_retries(call, RetryPolicy(initial_backoff=30, max_backoff=30), what="join", stop=stop)
    assert len(calls) == 1


def test_invalid_policies_are_refused():
    with pytest.raises(ValueError, match="initial"):
        RetryPolicy(initial_backoff=5, max_backoff=1)
    with pytest.raises(ValueError, match="multiplier"):
        RetryPolicy(multiplier=0.5)


class FakeConnection:
    """A connection that is up while ``up_event`` is set; ``wait_until_up`` counts the times it is asked."""

    def __init__(self, up: bool) -> None:
        self.up_event = threading.Event()
        if up:
            self.up_event.set()
        self.asked = 0

    def up(self) -> bool:
        return self.up_event.is_set()

    def wait_until_up(self, timeout: float) -> bool:
        self.asked += 1
        return self.up_event.wait(timeout)


@pytest.mark.parametrize("noticed_before_the_failure", [True, False])
def test_a_retry_after_a_lost_connection_goes_as_soon_as_it_is_back(noticed_before_the_failure):
    """The channel may notice the lost connection before the call fails, or only after it (the call's
    stream broke first, the channel's state still says connected)."""
    call, calls = failing([grpc.StatusCode.UNAVAILABLE])
    connection = FakeConnection(up=not noticed_before_the_failure)
    if not noticed_before_the_failure:
        threading.Timer(0.1, connection.up_event.clear).start()
    threading.Timer(0.4, connection.up_event.set).start()
    started = time.monotonic()
    assert call_with_retries(call, RetryPolicy(initial_backoff=60, max_backoff=60), what="push",
                             connection=connection) == "ok"
    assert time.monotonic() - started < 5, "waited for the backoff (30 s or more), not for the connection"
    assert len(calls) == 2 and connection.asked >= 1


@pytest.mark.parametrize(("code", "up"), [(grpc.StatusCode.UNAVAILABLE, True),
                                          (grpc.StatusCode.DEADLINE_EXCEEDED, False)])
def test_a_connection_that_is_up_or_a_call_that_timed_out_waits_the_whole_backoff(code, up):
    """A server (or a proxy in front of it) answering UNAVAILABLE on a live connection, or one too slow
    to answer, is not retried at once: the backoff is what spares it."""
    call, calls = failing([code])
    connection = FakeConnection(up=up)
    if not up:
        threading.Timer(0.05, connection.up_event.set).start()
    started = time.monotonic()
    call_with_retries(call, RetryPolicy(initial_backoff=0.6, max_backoff=0.6), what="push", connection=connection)
    assert time.monotonic() - started >= 0.3, "the backoff is uniform in [0.3, 0.6] s"
    assert len(calls) == 2


def test_a_stop_request_interrupts_the_wait_for_the_connection():
    call, calls = failing([grpc.StatusCode.UNAVAILABLE] * 10)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RetryAborted):
        call_with_retries(call, RetryPolicy(initial_backoff=30, max_backoff=30), what="join", stop=stop,
                          connection=FakeConnection(up=False))
    assert time.monotonic() - started < 5 and len(calls) == 1
