"""What gapaware offers by name, and where a run starts when a setting is not given: one place, free
of torch, so that ``gapaware --help`` starts fast.

The command line, :class:`~gapaware.common.config.RunConfig`, the simulator's settings and the
README (its flag reference is generated from the command line) read these. The modules that give
a name its meaning key their own tables by it, and tests keep the two equal:
``gapaware.server.policies.POLICIES`` (:data:`POLICY_NAMES`), ``gapaware.common.tasks.BUILTIN_TASKS``
(:data:`TASK_NAMES`), ``gapaware.common.transport.DTYPE_NAMES`` (:data:`TRANSPORT_DTYPES`) and
``WIRE_DTYPE_NAMES`` (:data:`WIRE_DTYPES`), and the default β and ε of ``gapaware.server.policies.GapAware``.
"""
from __future__ import annotations

from dataclasses import dataclass

POLICY_NAMES = ("asgd", "staleness-aware", "gap-aware", "dana", "dana-ga")
"""The server's staleness policies (``--policy``)."""

NESTEROV_ASGD = "nag-asgd"
"""``asgd`` with Nesterov momentum (NAG-ASGD, the paper's strongest unmitigated baseline), a policy of
the simulator only: the server runs it as ``asgd`` with ``nesterov``."""

SYNCHRONOUS_SGD = "ssgd"
"""Synchronous SGD, the simulator's reference for every asynchronous policy."""

SIMULATED_POLICY_NAMES = (POLICY_NAMES[0], NESTEROV_ASGD, *POLICY_NAMES[1:], SYNCHRONOUS_SGD)
"""What ``gapaware simulate --policies`` compares, in the order its tables list them."""

TASK_NAMES = ("digits-mlp", "digits-cnn", "synthetic", "cifar10-resnet20", "image-folder")
"""The built-in tasks (``--task``); a task may also be a user's ``package.module:factory``."""

FROM_WORKER = "from-worker"
"""The run config's task when the server takes its model from the first worker (``server --init
from-worker``) and has none of the user's code."""

TRANSPORT_DTYPES = ("float32", "bfloat16", "float16")
"""How gradients and parameters may travel on the wire (``gapaware worker --transport-dtype``)."""

CODEC_NAMES = ("int8", "float8")
"""The 8-bit codecs with a scale per block (``gapaware.common.codecs.CODECS``): pushes with error
feedback, pulls as deltas."""

WIRE_DTYPES = (*TRANSPORT_DTYPES, *CODEC_NAMES)
"""How each direction may travel on its own (``gapaware worker --push-dtype``, ``--pull-dtype``)."""

SNAPSHOT_DTYPES = ("float32", "bfloat16")
"""How the server may keep each worker's pulled parameters θ⁽ⁱ⁾ for the Gap (``--snapshot-dtype``)."""

SCHEDULES = ("constant", "step", "cosine")
"""Learning-rate schedules after the warm-up (``--schedule``)."""

NONFINITE_ACTIONS = ("reject", "skip", "apply")
"""What a push with NaN or Inf gets: refused, acknowledged and dropped, or applied as it is (the
parameters then diverge, as plain arithmetic would: the simulator uses this to report divergence)."""


@dataclass(frozen=True)
class Defaults:
    """The value of each setting that is not given: a run's hyper-parameters (the fields of
    ``RunConfig`` of the same names), the wire's dtype and the simulator's own settings."""

    task: str = "digits-cnn"
    policy: str = "gap-aware"
    seed: int = 0
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    warmup_updates: int = 0
    schedule: str = "step"
    decay_at: tuple[float, ...] = (0.5, 0.75)
    decay_factor: float = 0.1
    ga_beta: float = 0.999
    ga_eps: float = 1e-8
    batch_size: int = 32
    max_updates: int = 3000
    """The run's length when the command line gives neither ``--max-updates`` nor ``--epochs``."""
    eval_every: int = 100
    snapshot_dtype: str = "float32"
    nonfinite: str = "reject"
    grad_norm_bound: float = 100.0
    """The server refuses a push whose gradient norm exceeds this many times the median of the
    recent accepted ones (docs/ALGORITHMS.md#bounding-a-push)."""
    transport_dtype: str = "float32"
    full_pull_every: int = 100
    """A delta-pulling worker's every this-many-th pull is a full float32 one."""
    simulated_epochs: float = 40.0
    """Passes over the training set of each simulated run."""
    gamma_shape: float = 4.0
    """Shape of the gamma distribution of a simulated worker's time per batch."""
    eval_points: int = 20
    """Test-set evaluations of each simulated run."""


DEFAULTS = Defaults()
