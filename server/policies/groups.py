"""Parameter groups as element-wise rates on the flat vector: which elements weight decay reaches,
and each element's learning-rate multiplier (docs/ALGORITHMS.md#per-parameter-settings).

``torch.optim`` gives each parameter group its own ``weight_decay`` and ``lr``; here the policies
update one flat vector, so a group is a set of elements and its settings become two flat float32
tensors built once from the layout: ``λ_j`` (λ, or 0 where weight decay is excluded) and ``r_j``
(the learning-rate multiplier, 1 by default). A policy uses ``λ_j`` wherever its equation has
``λ`` and multiplies its step by ``r_j`` wherever it has ``η`` (so GA's ``C`` and DANA's
look-ahead scale with it too). Where every element has the same rate no tensor is built: ``λ``
stays a float, ``r`` is None, and the arithmetic is exactly that of the policies without groups.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import Tensor

from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout


@dataclass(frozen=True)
class ElementRates:
    """What a policy needs of the run's parameter groups.

    ``weight_decay``: λ as a float when every element decays alike, else a flat float32 tensor of
    ``λ_j``. ``lr_scale``: None when every multiplier is 1, else a flat float32 tensor of ``r_j``.
    """

    weight_decay: float | Tensor = 0.0
    lr_scale: Tensor | None = None

    def sliced(self, start: int, stop: int) -> ElementRates:
        """The rates of elements ``[start:stop]``: a shard's (gapaware.common.shards), whose own layout
        is one nameless slice, so its groups come from the whole model's layout."""
        return ElementRates(self.weight_decay[start:stop].clone() if isinstance(self.weight_decay, Tensor)
                            else self.weight_decay,
                            None if self.lr_scale is None else self.lr_scale[start:stop].clone())


def decays(name: str, shape: tuple[int, ...], config: RunConfig) -> bool:
    """Whether weight decay reaches parameter ``name`` of ``shape`` under ``config``.

    ``weight_decay_skip_bias_norm`` excludes every parameter of at most one dimension: biases and
    the weights of normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm), the usual
    exclusion (as in nanoGPT and timm), read from the layout alone; ``no_weight_decay`` excludes the
    names matching any of its shell-style patterns (``fnmatch``: ``*.bias``, ``embed.*``).
    """
    if config.weight_decay_skip_bias_norm and len(shape) <= 1:
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.no_weight_decay)


def lr_multiplier(name: str, config: RunConfig) -> float:
    """The factor of the first ``lr_scale`` pattern that matches ``name``; 1 where none does."""
    return next((factor for pattern, factor in config.lr_scale if fnmatch.fnmatchcase(name, pattern)), 1.0)


def check_patterns(layout: ParamLayout, config: RunConfig) -> None:
    """Refuses a pattern that matches no trainable parameter: a typo would silently change nothing."""
    patterns = [("--no-weight-decay", p) for p in config.no_weight_decay]
    patterns += [("--lr-scale", p) for p, _ in config.lr_scale]
    for flag, pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layout.names):
            frozen = [b.name for b in layout.frozen if fnmatch.fnmatchcase(b.name, pattern)]
            why = (f"it matches only frozen parameters ({', '.join(frozen[:5])}), which are never updated" if frozen
                   else f"the trainable parameters are {', '.join(layout.names[:8])}"
                        f"{', ...' if len(layout.names) > 8 else ''}")
            raise ValueError(f"{flag} {pattern!r} matches no trainable parameter of task {config.task!r}: {why}")


def element_rates(layout: ParamLayout, config: RunConfig) -> ElementRates:
    """The run's :class:`ElementRates` for ``layout``; raises ``ValueError`` for a pattern that
    matches no trainable parameter."""
    check_patterns(layout, config)
    segments = layout.segments()
    decayed = [decays(name, shape, config) for name, shape, _, _ in segments]
    factors = [lr_multiplier(name, config) for name, _, _, _ in segments]
    if not config.weight_decay or all(decayed):
        weight_decay: float | Tensor = config.weight_decay
    elif not any(decayed):
        weight_decay = 0.0
    else:
        weight_decay = _per_element(segments, [config.weight_decay if d else 0.0 for d in decayed])
    lr_scale = None if all(f == 1.0 for f in factors) else _per_element(segments, factors)
    return ElementRates(weight_decay, lr_scale)


def _per_element(segments: list[tuple[str, tuple[int, ...], int, int]], values: list[float]) -> Tensor:
    out = torch.empty(segments[-1][3] if segments else 0)
    for (_, _, start, stop), value in zip(segments, values):
        out[start:stop] = value
    return out
