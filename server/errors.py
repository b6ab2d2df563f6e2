"""Why the server refuses a request. The servicer maps each class to one gRPC status code."""


class RequestRefused(Exception):
    """Base class: a request the server refuses with a message the worker's user can act on.
    Nothing in the server's state changed."""


class UnknownWorker(RequestRefused):
    """The worker id is not (or no longer) registered: its lease expired or the server restarted."""

    def __init__(self, worker_id: int) -> None:
        super().__init__(
            f"worker {worker_id} is not registered with this server (its lease expired, it left, "
            "or the server restarted): join again"
        )


class LayoutMismatch(RequestRefused):
    """The worker's model does not have the server's parameter layout."""


class BadPush(RequestRefused):
    """A push whose content is invalid (size, base version, values)."""


class StaleSnapshot(RequestRefused):
    """A push computed on parameters other than those the server last sent this worker."""


class NonFiniteGradient(BadPush):
    """A gradient with NaN or Inf elements, refused under ``--nonfinite reject``."""


class InvalidLayout(RequestRefused):
    """A layout message that contradicts itself: its fingerprint is not that of the parameters it lists."""


class PushInFlight(RequestRefused):
    """A worker started a second push while its first one is still being received or applied."""

    def __init__(self, worker_id: int) -> None:
        super().__init__(
            f"worker {worker_id} already has a push in progress: wait for its reply before pushing again "
            "(two processes may be sharing one worker id; give each its own WorkerClient and join)"
        )


class OversizedGradient(RequestRefused):
    """A gradient whose norm exceeds the push bound (docs/ALGORITHMS.md#bounding-a-push). The bound
    follows the pushes accepted before it, so the same gradient may pass later: the worker drops it."""


class NonFiniteUpdate(RequestRefused):
    """A push whose update would have left NaN or Inf in θ: θ was restored as it was before it."""
class WrongWorkerSecret(RequestRefused):
    """A call for a worker id that does not present the secret its Join was given."""

    def __init__(self, worker_id: int) -> None:
        super().__init__(
            f"this call does not present worker {worker_id}'s secret: only the client that joined as worker "
            f"{worker_id} may act as it (a WorkerClient sends its secret itself; join to get an id of your own)"
        )


class TooManyWorkers(RequestRefused):
    """A Join while the server already has its most workers (``--max-workers``)."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(
            f"the server already has {max_workers} workers, its --max-workers: retry later (a worker that leaves "
            "or whose lease expires frees its place), or restart the server with a higher --max-workers"
        )


class InvalidJoin(RequestRefused):
    """A Join whose hostname or device cannot be a real one (too long, or with control characters)."""


class ParametersInFlight(RequestRefused):
    """A worker asked for the parameters while they are still being sent to it."""

    def __init__(self, worker_id: int) -> None:
        super().__init__(
            f"the parameters are still being sent to worker {worker_id} by an earlier call: retry once it has "
            "ended (a stalled one is ended by the server's send deadline)"
        )
