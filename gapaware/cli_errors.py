"""What a ``gapaware`` command prints when it fails: one line for an error its user caused and can
fix, with an exit code that says which kind; a full traceback for anything else, a bug.

Exit codes (README, "Errors and exit codes"):

0  done: the run finished, or the process was stopped with SIGTERM/SIGINT
1  an unexpected error, a bug: the traceback says where
2  a bad flag or value (click's usage errors)
3  the server refused: a wrong token, a model that is not the server's, ... (a gRPC answer)
4  this machine cannot run it: a task that does not load, a device it does not have, a file
   or port it cannot use, a checkpoint directory it cannot resume
5  the server did not answer: not reachable before the first contact within --connect-timeout,
   or lost for --retry-give-up-after once joined

Under ``--log-level debug`` the one-line errors come with their traceback too.
"""
from __future__ import annotations

import logging
import sys
from enum import IntEnum

import click

log = logging.getLogger("gapaware")


class ExitCode(IntEnum):
    OK = 0
    BUG = 1
    USAGE = 2
    REFUSED = 3
    CANNOT_RUN = 4
    UNREACHABLE = 5
    FINAL_CHECKPOINT_LOST = 6  # the run ended and was evaluated, its final checkpoint could not be written


class UserError(click.ClickException):
    """An error its user can act on: click prints ``Error: <message>`` and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = int(exit_code)


# Raised by modules that a command imports only when it runs them (torch is slow to import): each
# is looked up only if its module is loaded, since an error of a module not loaded was not raised.
USER_ERRORS: tuple[tuple[str, str, ExitCode], ...] = (
    ("gapaware.common.tasks", "TaskError", ExitCode.CANNOT_RUN),
    ("gapaware.common.devices", "DeviceUnavailable", ExitCode.CANNOT_RUN),
    ("gapaware.common.security", "SecurityConfigError", ExitCode.USAGE),
    ("gapaware.worker.session", "ServerUnreachable", ExitCode.UNREACHABLE),
    ("torch.cuda", "OutOfMemoryError", ExitCode.CANNOT_RUN),
)


def rpc_exit_code(error) -> ExitCode:
    """What a gRPC status that ended a command says: no answer from the server, or its refusal."""
    no_answer = error.code().name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    return ExitCode.UNREACHABLE if no_answer else ExitCode.REFUSED


def rpc_error(error) -> UserError:
    """The one-line error for a gRPC status that ended a command."""
    code, details = rpc_exit_code(error), error.details() or "no details"
    if error.code().name == "UNIMPLEMENTED":
        details += " (is --server a gapaware server of this version?)"
    what = "no answer from the server" if code is ExitCode.UNREACHABLE else "the server refused"
    return UserError(f"{what}: {error.code().name}: {details}", code)


def user_error(error: BaseException) -> UserError | None:
    """The one-line error for ``error`` when a user caused it, None for a bug."""
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return rpc_error(error)
    for module, name, code in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return UserError(str(error), code)
    if isinstance(error, OSError):
        return UserError(str(error), ExitCode.CANNOT_RUN)
    return None


class CleanErrors(click.Group):
    """A command group whose commands end a user's error with one line (see the module's doc)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            clean = user_error(error)
            if clean is None:
                raise
            log.debug("the traceback of the error below", exc_info=error)
            raise clean from None
