"""GA's and DANA-GA's whole push as one kernel: ``torch.compile`` of the plain torch reference.

Barkai, Hakimi and Schuster, "Gap Aware Mitigation of Gradient Staleness", ICLR 2020
(https://arxiv.org/abs/1909.10802). A Gap-Aware push (ALGORITHMS.md, "GA": the update of ``v``,
the Gap, ``d = (g + λ·θ) / Gap``, then the SGD or DANA step) is about ten element-wise torch
operations, each a pass over memory. Its reference is a plain torch function over flat tensors
(:func:`~.gap_aware.gap_aware_push_`, :func:`~.dana.dana_gap_aware_push_`); :func:`run` calls
either that function itself or what ``torch.compile`` makes of it, which fuses the operations
into one loop that reads and writes each tensor once. torch owns the code generation, the
compiler it calls and its cache, and the same code compiles for a GPU.

Which one runs, per push (``$GAPAWARE_COMPILE``):

* ``1``: compiled; ``0``: the reference;
* unset (or any other value): compiled for tensors of at least :data:`COMPILE_MIN_NUMEL`
  elements. A compile is paid once per process and per variant of a policy (momentum or not,
  float32 or bfloat16 θ⁽ⁱ⁾, θ⁽ⁱ⁾ being θ itself), by its first push, and on a small model it
  costs far more than it saves: the built-in tasks, the simulator and the tests run the
  reference and never wait for a compile.

A compile that fails (no working C++ compiler, an unsupported platform) logs a warning once and
that function runs as the reference from then on. The compiled code rounds as its generated
kernel does (its own square root, operations reordered), so the two agree to float32 precision,
not bit for bit. The reference runs slice by slice (:func:`~.slices.in_slices`).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

from .slices import in_slices

log = logging.getLogger("gapaware.server.policies")

SWITCH = "GAPAWARE_COMPILE"
"""Environment variable: ``1`` compiles every Gap-Aware push, ``0`` none, unset (or other) by size."""
COMPILE_MIN_NUMEL = 1 << 20
"""The smallest model (elements) whose Gap-Aware pushes are compiled when :data:`SWITCH` is unset."""

Push = Callable[..., Tensor]
"""A reference push: in-place on its tensor arguments, returns the sum of the Gaps as a 0-d tensor."""

_failed: set[Push] = set()


def run(push: Push, *tensors: Tensor | None, **scalars: float | bool) -> float:
    """``push(*tensors, **scalars)``, compiled or not (see the module's docstring); the sum of the Gaps.

    ``tensors`` are flat tensors of one length (``None`` passes through), the first of them θ.
    """
    theta = tensors[0]
    if push not in _failed and compiles(theta.numel()):
        try:
            return _compiled(push)(*tensors, **scalars).item()
        except Exception as error:  # raised while compiling, before the kernel ran: nothing changed
            _failed.add(push)
            log.warning("torch.compile of %s failed (%s: %s): its pushes run as plain torch operations",
                        push.__name__, type(error).__name__, error)
    return sum(gap_sum.item() for gap_sum in in_slices(push, *tensors, **scalars))


def compiles(numel: int) -> bool:
    """Whether :func:`run` compiles a push on tensors of ``numel`` elements (before any failure)."""
    switch = os.environ.get(SWITCH, "")
    if switch in ("0", "1"):
        return switch == "1"
    return numel >= COMPILE_MIN_NUMEL


@functools.cache
def _compiled(push: Push) -> Push:
    log.info("Compiling %s with torch.compile (on its first push)", push.__name__)
    return torch.compile(push, dynamic=True, fullgraph=True)
