"""How the server ends a call it refuses: with a status code and a message, and without
``context.abort``.

grpc.aio keeps the exception of an aborted call on the call's state, and its traceback holds every
frame of the handler with their locals (a request of up to 4 MiB, a tensor): a reference cycle that
only the garbage collector breaks, so a stream of refused calls would hold their requests meanwhile.
A handler raises :class:`Refused` instead; the outermost wrapper (:mod:`gapaware.server.decoding`)
catches it and :func:`answer` sets the status, and the exception, its traceback and the frames go
as soon as it is handled.
"""
from __future__ import annotations

import grpc


class Refused(Exception):
    """Ends the call being handled with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def answer(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """Makes ``code`` and ``details`` the call's status; the handler then returns (its reply, if any,
    is not sent under a status other than OK)."""
    context.set_code(code)
    context.set_details(details)
