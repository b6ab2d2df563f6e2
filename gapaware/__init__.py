"""gapaware: an asynchronous parameter server for PyTorch with Gap-Aware staleness mitigation.

The public API is :class:`RemoteOptimizer` (an existing training loop as a worker), :class:`Task`
(how a user plugs in a model and data for the built-in worker and a server that evaluates) and
:class:`WorkerClient` (join, pull, push, leave over gRPC). They are imported on first use, so
``import gapaware.server.policies`` does not pull in gRPC.
"""
import importlib

__all__ = ["RemoteOptimizer", "Task", "WorkerClient"]
__version__ = "0.1.0"

_LAZY = {"RemoteOptimizer": "gapaware.worker.remote_optimizer", "Task": "gapaware.common.tasks",
         "WorkerClient": "gapaware.worker.client"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gapaware' has no attribute {name!r}")
