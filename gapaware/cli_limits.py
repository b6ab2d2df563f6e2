"""The flags that bound what one peer may hold of the server (docs/SECURITY.md), beyond those the
``server`` command already names itself (``--max-concurrent-rpcs``, ``--chunk-timeout``,
``--receive-window``)."""
from __future__ import annotations

import functools

import click

from gapaware.server.limits import DEFAULT_MAX_WORKERS, DEFAULT_MIN_TRANSFER_RATE, DEFAULT_REQUEST_TIMEOUT

LIMIT_FIELDS = ("max_workers", "request_timeout", "min_transfer_rate")


def server_limit_options(fn):
    """``--max-workers``, ``--request-timeout``, ``--min-transfer-rate``."""
    options = [
        click.option("--max-workers", type=click.IntRange(min=1), default=DEFAULT_MAX_WORKERS, show_default=True,
                     help="Workers registered at once; a Join beyond it gets RESOURCE_EXHAUSTED (and is retried)."),
        click.option("--request-timeout", type=click.FloatRange(min=0.1), default=DEFAULT_REQUEST_TIMEOUT,
                     show_default=True, metavar="SECONDS",
                     help="A call whose request message has not arrived this long after it started is ended "
                          "with DEADLINE_EXCEEDED."),
        click.option("--min-transfer-rate", type=click.FloatRange(min=0.001), default=DEFAULT_MIN_TRANSFER_RATE,
                     show_default=True, metavar="MIB_PER_S",
                     help="A gradient or the parameters must travel within --chunk-timeout plus their size at "
                          "this rate, or the transfer is ended (DEADLINE_EXCEEDED, nothing applied)."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def server_limits_from_options(values: dict) -> dict:
    """Pops the limit flags out of ``values``: keyword arguments of ``ServerOptions``."""
    return {name: values.pop(name) for name in LIMIT_FIELDS}
