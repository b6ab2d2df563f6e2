"""Staleness policies: how the master applies a (possibly stale) gradient. One file per policy.

``POLICIES`` maps each CLI name (``--policy``) to its class; a new policy is one new file that
subclasses :class:`Policy` plus its entry here. The arithmetic is in pure functions over flat
tensors (:func:`sgd_step`, :func:`gap_aware_direction`, ...) that the simulator can call too;
:mod:`.fused` runs GA's and DANA-GA's arithmetic in one pass of C code where a compiler is at hand.
"""
from __future__ import annotations

from typing import Any

from .asgd import ASGD
from .base import Policy
from .dana import DanaGapAware, DanaZero, dana_look_ahead, dana_step
from .gap_aware import (GapAware, GapStatistics, compute_gap, gap_aware_direction, gap_scalars,
                        update_second_moment_)
from .sgd import sgd_step, weight_decayed
from .staleness_aware import StalenessAware, staleness_aware_lr

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    ASGD,
    StalenessAware,
    GapAware,
    DanaZero,
    DanaGapAware,
)}


def make_policy(name: str, numel: int, **hyper: Any) -> Policy:
    """Build the policy registered as ``name`` for ``numel`` parameters with ``hyper`` settings."""
    if name not in POLICIES:
        raise ValueError(f"Unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name](numel, **hyper)


__all__ = [
    "ASGD", "DanaGapAware", "DanaZero", "GapAware", "GapStatistics", "POLICIES", "Policy", "StalenessAware",
    "compute_gap", "dana_look_ahead", "dana_step", "gap_aware_direction", "gap_scalars", "make_policy", "sgd_step",
    "staleness_aware_lr", "update_second_moment_", "weight_decayed",
]
