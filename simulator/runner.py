"""One simulated run: one policy, N virtual workers, one seed.

Asynchronous policies (:func:`run_async`): every worker pulls the master's parameters when it
starts a batch and its gradient is pushed when the batch completes, in completion order
(:class:`~.clock.CompletionQueue`); the master applies it with the server's policy code.
SSGD (:func:`run_sync`): each round every worker computes one gradient on the same parameters,
their mean is applied as one fresh (τ = 0) push, and the round lasts as long as its slowest worker.

Run length (a choice, as in the paper's "same number of epochs" for every N): every run
processes the same number of training examples, ``epochs × |train|``. An asynchronous run
applies ``epochs × |train| / batch`` gradients whatever N; SSGD applies N times fewer updates,
each averaging N batches. The step decay (×0.1 at 50% and 75%) falls at those fractions of the
run's own updates, and the single-worker hyper-parameters are used unchanged for every N.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from gapaware.common.config import RunConfig
from gapaware.common.registry import DEFAULTS, NESTEROV_ASGD, SIMULATED_POLICY_NAMES, SYNCHRONOUS_SGD, WIRE_DTYPES
from gapaware.common.results import PushResult
from gapaware.server.build import build_state
from gapaware.simulator.clock import CompletionQueue, WorkerClocks
from gapaware.simulator.gradients import GradientSource
from gapaware.simulator.master import LocalMaster, Master


@dataclass(frozen=True)
class SimulationSettings:
    """What every run of a sweep shares. The defaults are the paper's recipe on ``digits-cnn``."""

    task: str = DEFAULTS.task
    data_dir: str | None = None
    lr: float = DEFAULTS.lr
    momentum: float = DEFAULTS.momentum
    weight_decay: float = DEFAULTS.weight_decay
    no_weight_decay: tuple[str, ...] = ()          # parameter groups, as the server's flags
    weight_decay_skip_bias_norm: bool = False
    lr_scale: tuple[tuple[str, float], ...] = ()
    batch_size: int = DEFAULTS.batch_size
    epochs: float = DEFAULTS.simulated_epochs
    gamma_shape: float = DEFAULTS.gamma_shape
    heterogeneous: bool = False
    eval_points: int = DEFAULTS.eval_points
    device: str = "cpu"
    push_dtype: str = DEFAULTS.transport_dtype
    pull_dtype: str = DEFAULTS.transport_dtype

    def __post_init__(self) -> None:
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"Invalid epochs: {self.epochs} (must be > 0)")
        if not self.gamma_shape > 0:
            raise ValueError(f"Invalid gamma shape: {self.gamma_shape} (must be > 0)")
        if self.eval_points < 1:
            raise ValueError(f"Invalid number of evaluation points: {self.eval_points} (must be >= 1)")
        for dtype in (self.push_dtype, self.pull_dtype):
            if dtype not in WIRE_DTYPES:
                raise ValueError(f"Invalid transport dtype: {dtype!r} (choose from {', '.join(WIRE_DTYPES)})")
        RunConfig(task=self.task, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                  batch_size=self.batch_size, epochs=self.epochs, **self.groups())  # the server's checks of the rest

    def groups(self) -> dict:
        """The parameter-group settings, as :class:`RunConfig` takes them."""
        return dict(no_weight_decay=tuple(self.no_weight_decay),
                    weight_decay_skip_bias_norm=self.weight_decay_skip_bias_norm, lr_scale=tuple(self.lr_scale))


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a policy (one of :data:`~gapaware.common.registry.SIMULATED_POLICY_NAMES`), a
    number of workers, a seed."""

    policy: str
    workers: int
    seed: int

    def __post_init__(self) -> None:
        if self.policy not in SIMULATED_POLICY_NAMES:
            raise ValueError(f"Unknown policy {self.policy!r}; choose from {', '.join(SIMULATED_POLICY_NAMES)}")
        if self.workers < 1:
            raise ValueError(f"Invalid number of workers: {self.workers}")


@dataclass(frozen=True)
class CurvePoint:
    """Test metrics after ``updates`` updates, at simulated time ``sim_time``."""

    updates: int
    sim_time: float
    loss: float
    accuracy: float


@dataclass(frozen=True)
class RunResult:
    policy: str
    workers: int
    seed: int
    final_accuracy: float
    mean_staleness: float
    mean_gap: float
    sim_time: float
    updates: int
    curve: tuple[CurvePoint, ...]


OnUpdate = Callable[[PushResult, float], None]


def run_config(settings: SimulationSettings, spec: RunSpec) -> RunConfig:
    """The server's run configuration for one run: the policy the server applies, and for SSGD a
    batch of N per-worker batches (so the run has N times fewer updates)."""
    server_policy = "asgd" if spec.policy in (NESTEROV_ASGD, SYNCHRONOUS_SGD) else spec.policy
    synchronous = spec.policy == SYNCHRONOUS_SGD
    return RunConfig(
        task=settings.task, policy=server_policy, seed=spec.seed, lr=settings.lr, momentum=settings.momentum,
        nesterov=spec.policy == NESTEROV_ASGD, weight_decay=settings.weight_decay,
        batch_size=settings.batch_size * (spec.workers if synchronous else 1), epochs=settings.epochs,
        data_dir=settings.data_dir, **settings.groups(),
    )


def run_async(master: Master, gradients: GradientSource, clocks: WorkerClocks, *, batch_size: int,
              max_pushes: int, on_update: OnUpdate | None = None) -> float:
    """Asynchronous training until the master says the run is finished; returns the simulated time
    when the last push was applied (the master's state counts the pushes and their staleness).

    Every worker starts a batch at time 0 on what it pulled; whenever one completes, its gradient
    is pushed, and it pulls and starts its next batch. Each batch costs one forward/backward,
    computed when the worker pulls (its gradient waits in ``pending`` until it completes).
    Raises ``RuntimeError`` if the run has not finished after ``max_pushes`` pushes.
    """
    queue = CompletionQueue()
    pending: dict[int, tuple[int, Tensor, float]] = {}

    def start(worker: int, now: float) -> None:
        version, theta = master.pull(worker)
        grad, loss = gradients.compute(worker, theta)
        pending[worker] = (version, grad, loss)
        queue.add(now + clocks.draw(worker), worker)

    for worker in range(clocks.workers):
        start(worker, 0.0)
    for _ in range(max_pushes):
        now, worker = queue.pop()
        version, grad, loss = pending.pop(worker)
        result = master.push(worker, grad, base_version=version, samples=batch_size, loss=loss)
        if on_update is not None:
            on_update(result, now)
        if result.finished:
            return now
        start(worker, now)
    raise RuntimeError(f"the run did not finish within {max_pushes} pushes")


def run_sync(master: Master, gradients: GradientSource, clocks: WorkerClocks, *, batch_size: int,
             max_rounds: int, on_update: OnUpdate | None = None) -> float:
    """SSGD until the master says the run is finished: per round, one gradient from every worker on
    the same parameters, averaged and pushed once by worker 0 (staleness 0); the round ends when
    its slowest worker finishes. Returns the simulated time when the last round was applied.
    Raises ``RuntimeError`` if not finished after ``max_rounds``."""
    now = 0.0
    for _ in range(max_rounds):
        version, theta = master.pull(0)
        total, loss_sum = gradients.compute(0, theta)
        for worker in range(1, clocks.workers):
            grad, loss = gradients.compute(worker, theta)
            total.add_(grad)
            loss_sum += loss
        now += max(clocks.draw(worker) for worker in range(clocks.workers))
        result = master.push(0, total.div_(clocks.workers), base_version=version,
                             samples=batch_size * clocks.workers, loss=loss_sum / clocks.workers)
        if on_update is not None:
            on_update(result, now)
        if result.finished:
            return now
    raise RuntimeError(f"the run did not finish within {max_rounds} rounds")


def evaluation_points(total_updates: int, points: int) -> set[int]:
    """The update counts at which a run is evaluated: ``points`` evenly spaced, the last one included."""
    return {math.ceil(total_updates * k / points) for k in range(1, points + 1)}


def simulate_run(settings: SimulationSettings, spec: RunSpec) -> RunResult:
    """Train one policy with ``spec.workers`` virtual workers; the test accuracy along the way."""
    config = run_config(settings, spec)
    # A diverging policy's NaN gradients are applied, as the arithmetic says, so its run ends at
    # chance accuracy instead of stopping: divergence is a result the comparison reports.
    task, state = build_state(config, nonfinite="apply")
    gradients = GradientSource(task, workers=spec.workers, batch_size=settings.batch_size, seed=spec.seed,
                               device=settings.device)
    clocks = WorkerClocks(spec.workers, seed=spec.seed, shape=settings.gamma_shape,
                          heterogeneous=settings.heterogeneous)
    master = LocalMaster(state, spec.workers, push_dtype=settings.push_dtype, pull_dtype=settings.pull_dtype)
    due = evaluation_points(state.total_updates, settings.eval_points)
    curve: list[CurvePoint] = []

    def record(result: PushResult, now: float) -> None:
        if result.version in due:
            loss, accuracy = gradients.test_metrics(state.parameters()[1])
            curve.append(CurvePoint(result.version, now, loss, accuracy))

    if spec.policy == SYNCHRONOUS_SGD:
        sim_time = run_sync(master, gradients, clocks, batch_size=settings.batch_size,
                            max_rounds=state.total_updates, on_update=record)
    else:
        sim_time = run_async(master, gradients, clocks, batch_size=settings.batch_size,
                             max_pushes=state.total_updates, on_update=record)
    totals = state.totals()
    return RunResult(spec.policy, spec.workers, spec.seed, final_accuracy=curve[-1].accuracy,
                     mean_staleness=totals["run_mean_staleness"], mean_gap=totals["run_mean_gap"], sim_time=sim_time,
                     updates=totals["pushes"], curve=tuple(curve))
