"""Staleness policies: how the master applies a (possibly stale) gradient. One file per policy.

``POLICIES`` maps each CLI name (``--policy``) to its class; a new policy is one new file that
subclasses :class:`Policy` plus its entry here. :func:`make_policy` is how a server builds one:
every policy takes the same settings (:class:`PolicySettings`), validated there once. The
arithmetic is in pure functions over flat tensors (:func:`asgd_push_`, :func:`gap_aware_push_`, ...)
that the simulator can call too; :func:`in_slices` runs them slice by slice on the CPU, and
:mod:`.fused` runs GA's and DANA-GA's push compiled by ``torch.compile`` where that pays.
"""
from __future__ import annotations

from gapaware.common.registry import DEFAULTS

from .asgd import ASGD, asgd_push_
from .base import Policy, PolicySettings
from .groups import ElementRates, element_rates
from .dana import DanaGapAware, DanaZero, dana_gap_aware_push_, dana_look_ahead, dana_push_, dana_step
from .gap_aware import GapAware, GapStatistics, gap_aware_direction_, gap_aware_push_, gap_scalars
from .sgd import add_scaled, add_scaled_, scale_add_, sgd_step, weight_decayed
from .slices import in_slices
from .staleness_aware import StalenessAware, staleness_aware_lr

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    ASGD,
    StalenessAware,
    GapAware,
    DanaZero,
    DanaGapAware,
)}


def make_policy(name: str, numel: int, *, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                ga_beta: float = DEFAULTS.ga_beta, ga_eps: float = DEFAULTS.ga_eps,
                rates: ElementRates | None = None) -> Policy:
    """The policy registered as ``name`` for ``numel`` parameters. Every policy takes every setting
    (those without a Gap ignore ``ga_beta`` and ``ga_eps``); all are validated here, a bad one
    raises ``ValueError``. ``rates`` are the parameter groups' (:func:`element_rates`); None: none."""
    if name not in POLICIES:
        raise ValueError(f"Unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    settings = PolicySettings(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ga_beta=ga_beta,
                              ga_eps=ga_eps)
    return POLICIES[name](numel, settings, rates)


__all__ = [
    "ASGD", "DanaGapAware", "DanaZero", "ElementRates", "GapAware", "GapStatistics", "POLICIES", "Policy", "PolicySettings",
    "StalenessAware", "add_scaled", "add_scaled_", "asgd_push_", "dana_gap_aware_push_", "dana_look_ahead",
    "dana_push_", "dana_step", "element_rates", "gap_aware_direction_", "gap_aware_push_", "gap_scalars", "in_slices", "make_policy",
    "scale_add_", "sgd_step", "staleness_aware_lr", "weight_decayed",
]
