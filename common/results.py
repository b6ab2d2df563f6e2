"""What a push returns, as both sides see it."""
from dataclasses import dataclass


@dataclass(frozen=True)
class PushResult:
    version: int      # the server's version after the push
    staleness: int    # updates applied between the worker's pull and this push
    mean_gap: float   # mean per-element Gap of the update (1.0 for policies without one)
    finished: bool    # the run is over
    applied: bool     # False for a push after the end or a skipped non-finite gradient
