"""Retrying calls to a server that is restarting or unreachable: exponential backoff with jitter.

Only failures that say nothing reached a decision are retried: ``UNAVAILABLE`` (no connection,
the server restarting, the network down), ``DEADLINE_EXCEEDED`` (no answer in time) and
``RESOURCE_EXHAUSTED`` (the server is serving its most calls, or workers, at once: a place frees
up, and backing off is what makes room). A push
may be retried safely because it carries its sequence number (the server applies it at most
once); gRPC's own transparent retries are not used for gradients, since they skip messages
bigger than gRPC's retry buffer. Every other status is an answer and goes to the caller.

A retry after ``UNAVAILABLE`` goes as soon as the server answers again, within its backoff: the
wait asks, every half second at most, whether it does (``answers``, a health check that waits for
the channel to connect; the channel re-attempts at least once a second,
:data:`gapaware.worker.client.CHANNEL_OPTIONS`). So a restarted server is reached about a second
after it listens, not one whole backoff later, and a retry made on a connection still marked
refused does not fail at once to wait a whole backoff more. A server that answers the first
question (the failure was not its absence: a proxy refusing one call) and one that only times out
(``DEADLINE_EXCEEDED``: too slow to answer) get the whole backoff, so nothing is retried in a
tight loop.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

log = logging.getLogger("gapaware.worker")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})

T = TypeVar("T")

ASK_EVERY_SECONDS = 0.5
"""While a retry waits after ``UNAVAILABLE``, how often it asks whether the server answers again
(and looks at a stop request)."""


class Answers(Protocol):
    """Whether the server answers within ``timeout`` seconds; with ``wait_for_connection`` the
    channel connects meanwhile, else a broken connection fails at once (:meth:`WorkerClient.answers`)."""

    def __call__(self, timeout: float, *, wait_for_connection: bool) -> bool: ...


class RetryAborted(Exception):
    """A stop was requested (SIGTERM) while waiting to retry; ``__cause__`` is the last failure."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff before the n-th retry: uniform in ``[c/2, c]`` with ``c = min(max_backoff,
    initial_backoff·multiplier^(n−1))`` ("equal jitter": spread out, never near zero, so a
    restarted server is not hit by all its workers at once). Retrying stops once ``give_up_after``
    seconds have passed since the first failure of the call."""

    initial_backoff: float = 0.5
    max_backoff: float = 15.0
    multiplier: float = 2.0
    give_up_after: float = 600.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError(f"Invalid backoff: initial {self.initial_backoff}s, max {self.max_backoff}s "
                             "(need 0 < initial <= max)")
        if self.multiplier < 1:
            raise ValueError(f"Invalid backoff multiplier: {self.multiplier} (at least 1)")
        if self.give_up_after < 0:
            raise ValueError(f"Invalid retry limit: {self.give_up_after}s")

    def backoffs(self, rng: random.Random) -> Iterator[float]:
        """The waits before retry 1, 2, ... (endless; the caller bounds them by time)."""
        ceiling = self.initial_backoff
        while True:
            yield rng.uniform(ceiling / 2, ceiling)
            ceiling = min(self.max_backoff, ceiling * self.multiplier)


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() in RETRYABLE


def call_with_retries(call: Callable[[], T], policy: RetryPolicy, *, what: str,
                      stop: threading.Event | None = None, rng: random.Random | None = None,
                      answers: Answers | None = None) -> T:
    """``call()``, retried per ``policy`` while it fails with a retryable status.

    ``answers`` (:meth:`WorkerClient.answers`): after an ``UNAVAILABLE``, the wait ends once a
    server that did not answer does. Raises the last
    error once the policy gives up (or at once for any other error), and :class:`RetryAborted`
    when ``stop`` is set during a wait.
    """
    rng = rng or random.Random()
    backoffs = policy.backoffs(rng)
    first_failure = None
    attempt = 0
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if not is_retryable(error):
                raise
            now = time.monotonic()
            first_failure = first_failure or now
            wait = next(backoffs)
            if now + wait - first_failure > policy.give_up_after:
                log.error("%s failed (%s: %s); giving up after retrying for %.0fs", what, error.code().name,
                          error.details(), now - first_failure)
                raise
            attempt += 1
            asking = answers if error.code() is grpc.StatusCode.UNAVAILABLE else None
            log.warning("%s failed (%s: %s); retry %d in %.1fs%s", what, error.code().name, error.details(),
                        attempt, wait, " or once the server answers" if asking else "")
            if _wait(wait, stop, asking):
                raise RetryAborted(f"{what}: stopped while waiting to retry") from error


def _wait(seconds: float, stop: threading.Event | None, answers: Answers | None) -> bool:
    """Waits ``seconds``, or less once the server, silent at first, answers (asked every
    :data:`ASK_EVERY_SECONDS`, waiting for the channel to connect). A server that answers at once,
    on the connection as it is, was not what failed: it gets the whole wait, unasked. True when
    ``stop`` was set meanwhile."""
    deadline = time.monotonic() + seconds
    if answers is not None and answers(min(seconds, ASK_EVERY_SECONDS), wait_for_connection=False):
        answers = None
    while (left := deadline - time.monotonic()) > 0:
        slot_end = time.monotonic() + (min(left, ASK_EVERY_SECONDS) if answers is not None else left)
        if answers is not None and answers(slot_end - time.monotonic(), wait_for_connection=True):
            break
        if _sleep_until(slot_end, stop):
            return True
    return stop is not None and stop.is_set()


def _sleep_until(moment: float, stop: threading.Event | None) -> bool:
    """Sleeps until ``moment`` (``time.monotonic``); True when ``stop`` was set."""
    left = max(0.0, moment - time.monotonic())
    if stop is None:
        time.sleep(left)
        return False
    return stop.wait(left)
