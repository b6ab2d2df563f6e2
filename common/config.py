"""The run's configuration, shared by server and workers as JSON, and its learning-rate schedule."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from gapaware.common.registry import DEFAULTS, FROM_WORKER, SCHEDULES, SNAPSHOT_DTYPES


MAX_LR = 1000.0
"""The largest learning rate a run accepts: far above any SGD recipe's, it keeps a config (one
read from a checkpoint too) from scaling every update by 1e30."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run. The server owns it; workers receive it at Join."""

    task: str = DEFAULTS.task
    policy: str = DEFAULTS.policy
    seed: int = DEFAULTS.seed
    lr: float = DEFAULTS.lr
    momentum: float = DEFAULTS.momentum
    nesterov: bool = DEFAULTS.nesterov
    weight_decay: float = DEFAULTS.weight_decay
    warmup_updates: int = DEFAULTS.warmup_updates
    schedule: str = DEFAULTS.schedule
    decay_at: tuple[float, ...] = DEFAULTS.decay_at
    decay_factor: float = DEFAULTS.decay_factor
    ga_beta: float = DEFAULTS.ga_beta
    ga_eps: float = DEFAULTS.ga_eps
    batch_size: int = DEFAULTS.batch_size
    max_updates: int = 0
    epochs: float = 0.0
    eval_every: int = DEFAULTS.eval_every
    data_dir: str | None = None
    snapshot_dtype: str = DEFAULTS.snapshot_dtype   # how the server stores each worker's θ⁽ⁱ⁾ (GA, DANA-GA)
    full_pull_every: int = DEFAULTS.full_pull_every  # a delta-pulling worker's every K-th pull is full
    # Parameter groups (gapaware.server.policies.groups): names weight decay skips (shell patterns),
    # whether it skips every parameter of at most one dimension (biases, normalisation weights), and
    # (pattern, factor) learning-rate multipliers, the first match winning.
    no_weight_decay: tuple[str, ...] = ()
    weight_decay_skip_bias_norm: bool = False
    lr_scale: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.lr <= MAX_LR, f"Invalid learning rate: {self.lr} (at most {MAX_LR:g})"),
            (0 <= self.momentum < 1, f"Invalid momentum: {self.momentum} (must be in [0, 1))"),
            (not self.nesterov or self.momentum > 0, "Nesterov momentum requires a momentum > 0"),
            (0 <= self.weight_decay < math.inf, f"Invalid weight decay: {self.weight_decay}"),
            (self.warmup_updates >= 0, f"Invalid warm-up: {self.warmup_updates}"),
            (self.schedule in SCHEDULES, f"Invalid schedule: {self.schedule!r} (choose from {', '.join(SCHEDULES)})"),
            (all(0 < f < 1 for f in self.decay_at), f"Invalid decay points: {self.decay_at} (fractions in (0, 1))"),
            (0 < self.decay_factor <= 1, f"Invalid decay factor: {self.decay_factor}"),
            (0 <= self.ga_beta < 1, f"Invalid GA beta: {self.ga_beta}"),
            (0 < self.ga_eps < math.inf, f"Invalid GA epsilon: {self.ga_eps}"),
            (self.batch_size >= 1, f"Invalid batch size: {self.batch_size}"),
            (self.max_updates >= 0, f"Invalid max updates: {self.max_updates}"),
            (0 <= self.epochs < math.inf, f"Invalid epochs: {self.epochs}"),
            (self.max_updates > 0 or self.epochs > 0, "Give --max-updates or --epochs: the run needs an end"),
            (self.task != FROM_WORKER or not self.epochs,
             "--epochs needs the training set's size, which a server taking its model from a worker does not "
             "know: give --max-updates"),
            (self.eval_every >= 1, f"Invalid eval interval: {self.eval_every}"),
            (all(isinstance(p, str) and p for p in self.no_weight_decay),
             f"Invalid --no-weight-decay patterns: {self.no_weight_decay} (non-empty names or shell patterns)"),
            (all(isinstance(p, str) and p and 0 < f < math.inf for p, f in self.lr_scale),
             f"Invalid --lr-scale: {self.lr_scale} (PATTERN=FACTOR with a factor > 0; freeze a parameter "
             "with requires_grad=False instead of a factor 0)"),
            (self.snapshot_dtype in SNAPSHOT_DTYPES,
             f"Invalid snapshot dtype: {self.snapshot_dtype!r} (choose from {', '.join(SNAPSHOT_DTYPES)})"),
            (self.full_pull_every >= 1, f"Invalid full pull interval: {self.full_pull_every} (must be >= 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run config fields: {', '.join(unknown)}")
        for name in ("decay_at", "no_weight_decay"):
            if name in data:
                data[name] = tuple(data[name])
        if "lr_scale" in data:
            data["lr_scale"] = tuple((pattern, float(factor)) for pattern, factor in data["lr_scale"])
        return cls(**data)

    def total_updates(self, train_size: int) -> int:
        """The update at which the run ends: ``max_updates`` or ``epochs`` of ``train_size`` examples,
        whichever comes first, estimated at ``batch_size`` examples an update."""
        by_epochs = math.ceil(self.epochs * train_size / self.batch_size) if self.epochs else 0
        candidates = [n for n in (self.max_updates, by_epochs) if n > 0]
        return min(candidates)


def learning_rate(config: RunConfig, update: int, total_updates: int) -> float:
    """η at update ``update`` (0-based): a linear warm-up from 0, then constant, step or cosine decay.

    The step schedule multiplies by ``decay_factor`` at each fraction ``decay_at`` of the
    updates, the paper's recipe (ALGORITHMS.md, "How the paper evaluated").
    """
    if update < config.warmup_updates:
        return config.lr * update / config.warmup_updates
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        passed = sum(1 for f in config.decay_at if update >= f * total_updates)
        return config.lr * config.decay_factor**passed
    span = max(1, total_updates - config.warmup_updates)
    progress = min(1.0, (update - config.warmup_updates) / span)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
