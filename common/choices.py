"""``gapaware.server.state``'s name for :data:`gapaware.common.registry.NONFINITE_ACTIONS`, kept until it
imports it from :mod:`gapaware.common.registry`, where every name a flag offers now lives."""
from gapaware.common.registry import NONFINITE_ACTIONS

__all__ = ["NONFINITE_ACTIONS"]
