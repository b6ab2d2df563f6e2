"""The bound on a push's gradient: refuse a gradient far larger than those accepted before it.

A worker holding the token can push any finite tensor; one of norm 1e30 destroys θ in one
update. With ``m`` the median of the norms of the last :data:`WINDOW` accepted pushes and ``k`` the
server's ``--grad-norm-bound``, a push is refused when (docs/ALGORITHMS.md#bounding-a-push)::

    ‖g‖₂ ≥ NORM_CEILING          always (≈ 1.8e19: beyond it ‖g‖² overflows float32)
    ‖g‖₂ > k·m                   once WINDOW pushes were accepted

Only accepted pushes with a positive norm enter the median, so a refused push cannot raise it,
and the bound follows the norms as training changes them. The norms are part of a checkpoint,
so a resumed run is bounded from its first push.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable

import torch

from gapaware.server.errors import OversizedGradient

WINDOW = 100
"""Accepted pushes whose median norm the bound follows; also the pushes before it applies."""

NORM_CEILING = math.sqrt(torch.finfo(torch.float32).max)
"""No gradient this large is applied: its square, which Gap-Aware's running average and momentum
statistics accumulate, does not fit in float32."""


def gradient_norm(grad: torch.Tensor) -> float:
    """‖g‖₂ (scaled by torch, so a finite gradient has a finite norm unless it exceeds float32)."""
    return float(torch.linalg.vector_norm(grad))


class NormBound:
    """The push bound with ratio ``k`` over the median of the recent accepted norms (``norms``,
    oldest first, as :meth:`recent` returned them). Not thread-safe: the updater's owner holds its lock."""

    def __init__(self, ratio: float, norms: Iterable[float] = ()) -> None:
        if not (ratio > 1 and math.isfinite(ratio)):
            raise ValueError(f"Invalid gradient norm bound: {ratio} (a ratio above 1, or 0 for none)")
        self.ratio = ratio
        self._norms: deque[float] = deque(maxlen=WINDOW)
        self._limit = NORM_CEILING
        self.load(norms)

    def limit(self) -> float:
        """The largest norm a push may have now."""
        return self._limit

    def check(self, norm: float) -> None:
        """Raises :class:`OversizedGradient` when a gradient of norm ``norm`` is refused."""
        if norm < NORM_CEILING and norm <= self._limit:
            return
        if not norm < NORM_CEILING:
            raise OversizedGradient(
                f"gradient norm {norm:.3g} is at or above {NORM_CEILING:.3g}, where its square overflows float32: "
                "nothing was applied")
        raise OversizedGradient(
            f"gradient norm {norm:.3g} exceeds the bound {self._limit:.3g} ({self.ratio:g} x {self.median():.3g}, the "
            f"median norm of the last {WINDOW} accepted pushes): nothing was applied; the worker drops it and pulls "
            "afresh. If your training makes such gradients, raise --grad-norm-bound or set it to 0 (off)")

    def accepted(self, norm: float) -> None:
        """Counts the norm of a push that was applied."""
        if norm > 0:
            self._norms.append(norm)
            if len(self._norms) == WINDOW:
                self._limit = min(NORM_CEILING, self.ratio * self.median())

    def median(self) -> float:
        return statistics.median(self._norms) if self._norms else math.nan

    def recent(self) -> list[float]:
        """The norms the median is over, oldest first: what a checkpoint keeps."""
        return list(self._norms)

    def load(self, norms: Iterable[float]) -> None:
        """Replaces the recent norms with ``norms`` (a checkpoint's); refuses any that is not a
        positive finite number."""
        norms = list(norms)
        if not all(isinstance(n, float) and 0 < n < NORM_CEILING for n in norms):
            raise ValueError("gradient norms must be positive finite numbers below the ceiling")
        self._norms.clear()
        self._limit = NORM_CEILING
        for norm in norms[-WINDOW:]:
            self.accepted(norm)
