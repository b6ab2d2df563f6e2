"""``gapaware.RemoteOptimizer``: an existing PyTorch training loop as a gapaware worker.

The optimizer's step is the server's: :meth:`RemoteOptimizer.step` pushes the gradient and the model's
buffers, and loads the parameters and buffers the update produced into the model, in place. Everything
else a worker needs happens inside (:class:`~gapaware.worker.session.Session`): joining (sending the
model to a server that takes it from a worker, ``server --init from-worker``), retries, joining again
after a lease expired, heartbeats while a step computes, the end of the run (:attr:`finished`), and
leaving (:meth:`close`).

It is a ``torch.optim.Optimizer`` over the model's trainable parameters, one group, so
``torch.amp.GradScaler`` (``scaler.unscale_(optimizer)``, ``scaler.step(optimizer)``) and
``torch.nn.utils.clip_grad_norm_`` work unchanged, and gradient accumulation is calling :meth:`step`
every k micro-batches. The learning rate, its schedule, momentum and weight decay are the server's
(docs/ALGORITHMS.md): a local learning-rate scheduler is refused when it is attached.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import torch
from torch import nn

from gapaware.common.buffers import load_buffers
from gapaware.common.layout import ParamLayout, flat_gradients, flat_parameters, load_flat_parameters, trainable_parameters
from gapaware.common.registry import DEFAULTS
from gapaware.common.transport import all_finite
from gapaware.worker.retry import RetryPolicy
from gapaware.worker.session import Session
from gapaware.worker.sharded import connect

log = logging.getLogger("gapaware.worker")

SCHEDULE_FLAGS = "--lr, --warmup-updates, --schedule, --decay-at, --decay-factor"


class LocalScheduleRefused(RuntimeError):
    """A local learning-rate scheduler (or other code) tried to set a RemoteOptimizer's learning rate."""


class _ServerLearningRate(dict):
    """The optimizer's one parameter group: its ``lr`` is the run's, which only the server schedules."""

    def __setitem__(self, key, value) -> None:
        if key in ("lr", "initial_lr"):
            raise LocalScheduleRefused(
                "the learning rate of a RemoteOptimizer is the parameter server's: a local learning-rate scheduler "
                f"cannot change it. Give the server its schedule instead ({SCHEDULE_FLAGS})")
        super().__setitem__(key, value)

    def setdefault(self, key, default=None):
        if key == "initial_lr":
            self["initial_lr"] = default  # refused, with the message
        return super().setdefault(key, default)


class RemoteOptimizer(torch.optim.Optimizer):
    """Trains ``model`` with the parameter server at ``server`` (``HOST:PORT``, or a sharded run's
    ``H0:P0,H1:P1,...``). Joins at once, and loads the server's parameters and buffers into ``model``.

    ``evaluate(model) -> dict`` of named floats, where given, runs on this worker every ``every`` steps
    it pushed and once at the end of the run, on the parameters just received; its metrics (or its error,
    which is logged and never stops training) go into the server's metrics stream (``Report``).

    ``transport_dtype``, ``push_dtype``, ``pull_dtype`` are as ``gapaware worker``'s flags; TLS and the
    token, when not given, come from the ``GAPAWARE_*`` variables, as for the command line
    (:class:`~gapaware.worker.client.WorkerClient`). ``step(samples=N, loss=L)`` may tell the server the
    batch's size and loss, for its statistics.
    """

    def __init__(self, model: nn.Module, server: str, *, evaluate: Callable[[nn.Module], dict] | None = None,
                 every: int = 0, transport_dtype: str = DEFAULTS.transport_dtype, push_dtype: str | None = None,
                 pull_dtype: str | None = None, rpc_timeout: float = 60.0, retry: RetryPolicy = RetryPolicy(),
                 connect_timeout: float = 30.0, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, token: str | None = None) -> None:
        if evaluate is not None and every < 1:
            raise ValueError(f"evaluate= needs every= (evaluate every this many steps), got {every}")
        trainable = [p for _, p in trainable_parameters(model)]
        if not trainable:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        layout = ParamLayout.from_module(model)
        self._model = model
        self._evaluate_fn = evaluate
        self._every = every
        self._client = connect(server, transport_dtype=transport_dtype, push_dtype=push_dtype, pull_dtype=pull_dtype,
                               timeout=rpc_timeout, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
        self._session = Session(self._client, server, retry=retry, connect_timeout=connect_timeout)
        self._closed = False
        self._heartbeat = None
        try:
            config = self._session.first_contact()
            super().__init__([_ServerLearningRate(params=trainable, lr=config.lr)], {"lr": config.lr})
            device = trainable[0].device
            self.info = self._session.join(layout, str(device),
                                           initial=lambda: (flat_parameters(model), dict(model.named_buffers())))
            pinned = device.type == "cuda"
            # Parameters arrive into, and gradients leave from, tensors reused every step (pinned for a GPU).
            self._received = torch.empty(layout.numel, pin_memory=pinned)
            self._gradient = torch.empty(layout.numel, pin_memory=pinned)
            self._device_gradient = torch.empty(layout.numel, device=device) if device.type != "cpu" else None
            self._heartbeat = self._session.heartbeats().__enter__()
            self.version, theta = self._session.pull(self._received)
        except BaseException:
            if self._heartbeat is not None:
                self._heartbeat.__exit__(None, None, None)
            self._client.close()
            raise
        self._load(theta)
        self.finished = self.info.finished
        """True once the server ended the run: leave the training loop and :meth:`close`."""
        self.steps = 0
        """Steps whose gradient reached the server."""
        self.skipped_steps = 0
        """Steps skipped here because their gradient held NaN or Inf (never sent)."""
        log.info("joined %s as worker %d (%d parameters, server version %d)", server, self.info.worker_id,
                 layout.numel, self.version)

    @torch.no_grad()
    def step(self, closure: None = None, *, samples: int = 0, loss: float = math.nan) -> None:
        """Pushes the gradients in the model's ``.grad`` and loads the parameters and buffers the server
        answers with. A gradient with NaN or Inf is not sent: the step is skipped and counted
        (:attr:`skipped_steps`). After the run ended, does nothing."""
        if closure is not None:
            raise ValueError("RemoteOptimizer.step takes no closure: compute the loss and call backward() first")
        if self.finished:
            return
        grad = self._flat_gradients()
        if not all_finite(grad):
            self.skipped_steps += 1
            log.warning("step skipped: the gradient holds NaN or Inf (%d skipped so far)", self.skipped_steps)
            return
        result, self.version, theta = self._session.push_pull(
            grad, self.version, samples=samples, loss=loss, buffers=dict(self._model.named_buffers()),
            out=self._received)
        self._load(theta)
        if result is not None:
            self.steps += 1
        self.finished = (result is not None and result.finished) or self._session.finished
        if self._evaluate_fn is not None and (self.finished or (result is not None and self.steps % self._every == 0)):
            self._evaluate()

    def _flat_gradients(self) -> torch.Tensor:
        if self._device_gradient is None:
            return flat_gradients(self._model, out=self._gradient)
        return self._gradient.copy_(flat_gradients(self._model, out=self._device_gradient))

    def _load(self, theta: torch.Tensor) -> None:
        load_flat_parameters(self._model, theta)
        load_buffers(self._model, self._client.buffers)

    def _evaluate(self) -> None:
        """Runs the user's evaluation and reports it; an error in it is logged and reported, never raised."""
        training = self._model.training
        metrics, error = {}, ""
        try:
            returned = self._evaluate_fn(self._model)
            metrics = {str(name): float(value) for name, value in dict(returned).items()}
        except Exception as failure:  # the user's code: any error, reported, never fatal
            log.exception("evaluation failed; training goes on")
            error = f"{type(failure).__name__}: {failure}"
        finally:
            self._model.train(training)
        try:
            self._session.report(self.version, metrics, error)
        except grpc.RpcError as refused:
            log.warning("evaluation of version %d not recorded: %s: %s", self.version, refused.code().name,
                        refused.details())

    def close(self) -> None:
        """Leaves the run (once) and closes the connection. The model is left with the parameters and
        buffers the server sent last: forward passes in training mode after the run ended (the rest of
        an epoch) do not keep the BatchNorm statistics they moved."""
        if self._closed:
            return
        self._closed = True
        load_buffers(self._model, self._client.buffers)
        self._heartbeat.__exit__(None, None, None)
        self._session.leave()
        self._client.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
