"""Sharding: which contiguous slice of the flat parameter vector server process I of S owns.

Gap-Aware, its momentum, C and the Gap are element-wise (docs/ALGORITHMS.md), and so are the other
policies' updates, so a server that owns elements ``[start, stop)`` of θ, of the gradient and of
the policy state computes exactly the slice of the update one server would: the split is exact.

The cuts fall on whole tensors when every shard then holds its fair share ``N/S`` within
:data:`BALANCE_TOLERANCE`; otherwise (a model dominated by one big tensor, say an embedding) they
are plain element ranges ``[I·N/S, (I+1)·N/S)``. Whole tensors cost nothing in exactness; they only
keep a tensor on one server, which reads better in a shard's checkpoint. Each shard's slice travels
as its own one-tensor layout (:func:`shard_layout`), whose name says the model's fingerprint, I, S
and the range: a worker of another model, or one that lists the shards in another order, is
refused at Join by the layout check every server already makes. The model's buffers (BatchNorm's
statistics) live on shard 0 only: they are not trained by gradients and are small.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from itertools import accumulate

from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout

BALANCE_TOLERANCE = 0.1
"""How far (as a fraction of N/S) a whole-tensor cut may be from the even cut before element ranges are used."""

_SPEC = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): ``Shard(0, 1)`` is the whole model on one server."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"Invalid shard {self.index}/{self.count}: need 0 <= I < S (I/S, e.g. 0/2 and 1/2)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/S"`` as given to ``gapaware server --shard``."""
        match = _SPEC.match(text.strip())
        if match is None:
            raise ValueError(f"Invalid shard {text!r}: give I/S, this server's index and the number of shards (0/2)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def bounds(self, layout: ParamLayout) -> tuple[int, int]:
        """The elements ``[start, stop)`` of the flat vector this shard owns."""
        cuts = shard_cuts(layout, self.count)
        return cuts[self.index], cuts[self.index + 1]


def shard_cuts(layout: ParamLayout, count: int) -> list[int]:
    """The ``count + 1`` offsets that split ``layout``'s flat vector into shards: on tensor boundaries
    when each is within :data:`BALANCE_TOLERANCE` of the even cut, else the even cuts themselves."""
    numel = layout.numel
    even = [k * numel // count for k in range(count + 1)]
    boundaries = [0, *accumulate(math.prod(shape) for shape in layout.shapes)]
    aligned = [min(boundaries, key=lambda b: abs(b - cut)) for cut in even]
    slack = BALANCE_TOLERANCE * numel / count
    balanced = all(abs(a - cut) <= slack for a, cut in zip(aligned, even))
    increasing = all(a < b for a, b in zip(aligned, aligned[1:]))
    return aligned if balanced and increasing else even


def shard_layout(layout: ParamLayout, shard: Shard) -> ParamLayout:
    """The layout shard ``shard`` serves: one flat tensor, named for the model and the range."""
    if shard.count == 1:
        return layout
    start, stop = shard.bounds(layout)
    name = f"shard {shard} of model {layout.fingerprint[:16]}, elements [{start}:{stop}]"
    return ParamLayout((name,), ((stop - start,),), layout.buffers if shard.index == 0 else ())


def run_identity(config: RunConfig) -> str:
    """The SHA-256 (hex) of a run's config: every shard of one run has the same, a worker presents shard
    0's to the others (JoinRequest.run_config_sha256)."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()
