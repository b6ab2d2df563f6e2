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


class FakeServer:
    """``answers`` as a client's: True once ``back`` is set (waiting for it up to ``timeout`` while the
    channel would connect)."""

    def __init__(self, answering: bool) -> None:
        self.back = threading.Event()
        if answering:
            self.back.set()
        self.asked = 0

    def answers(self, timeout: float, *, wait_for_connection: bool) -> bool:
        self.asked += 1
        return self.back.wait(timeout) if wait_for_connection else self.back.is_set()


def test_a_retry_after_a_lost_connection_goes_as_soon_as_the_server_answers_again():
    call, calls = failing([grpc.StatusCode.UNAVAILABLE])
    server = FakeServer(answering=False)
    threading.Timer(0.4, server.back.set).start()
    started = time.monotonic()
    assert call_with_retries(call, RetryPolicy(initial_backoff=60, max_backoff=60), what="push",
                             answers=server.answers) == "ok"
    assert time.monotonic() - started < 5, "waited for the backoff (30 s or more), not for the server"
    assert len(calls) == 2 and 1 <= server.asked <= 10


def test_a_server_that_answers_at_once_or_a_call_that_timed_out_waits_the_whole_backoff():
    """The server answering at once was not what failed (a proxy refusing one call), and one too slow
    to answer needs no more calls: the backoff is what spares them. Neither is retried at once."""
    for code, server, asked in ((grpc.StatusCode.UNAVAILABLE, FakeServer(answering=True), 1),
                                (grpc.StatusCode.DEADLINE_EXCEEDED, FakeServer(answering=True), 0)):
        call, calls = failing([code])
        started = time.monotonic()
        call_with_retries(call, RetryPolicy(initial_backoff=1.2, max_backoff=1.2), what="push",
                          answers=server.answers)
        assert time.monotonic() - started >= 0.6, f"{code.name}: the backoff is uniform in [0.6, 1.2] s"
        assert len(calls) == 2 and server.asked == asked, code.name


def test_a_stop_request_interrupts_the_wait_for_the_server():
    call, calls = failing([grpc.StatusCode.UNAVAILABLE] * 10)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RetryAborted):
        call_with_retries(call, RetryPolicy(initial_backoff=30, max_backoff=30), what="join", stop=stop,
                          answers=FakeServer(answering=False).answers)
    assert time.monotonic() - started < 5 and len(calls) == 1
