"""Emulated stragglers: a delay after each training step, drawn from a distribution a SPEC describes.

Synchronous training waits for its slowest worker at every step; asynchronous training does
not. Showing that on one machine needs workers that are slow the way shared cloud machines
are, and the *same* slowness for every system compared, so ``gapaware worker --delay SPEC``
and the benchmark's DistributedDataParallel workers (``bench/time_to_accuracy.py``) draw their
delays here. A SPEC is ``;``-separated parts, each optional, in any order::

    gamma:mean=0.05,shape=4     a gamma-distributed delay per step (seconds; shape defaults to 4,
                                coefficient of variation 1/sqrt(shape), as `gapaware simulate`)
    hiccup:p=0.02,length=1      with probability p a step is followed by `length` more seconds
                                (a preemption, a noisy neighbour, a garbage collection)
    slow:fraction=0.25,factor=3 persistent heterogeneity: a fraction of the workers draw gamma
                                delays `factor` times longer (hiccups are not scaled)
    seed=7                      the sequences' seed (default 0)

``none`` (or an empty SPEC) is no delay. Worker rank ``k`` (DDP's rank, gapaware's worker id
minus 1) draws from its own generator seeded by ``(seed, k)``, so rank ``k`` waits the same
sequence in every system. Rank ``k`` is slow when ``floor((k+1)·fraction) > floor(k·fraction)``:
exactly ``floor(N·fraction)`` of ranks ``0..N-1`` are, spread evenly (a quarter: 3, 7, 11, ...),
whatever N. Plain Python, no torch: the CLI parses a SPEC without importing it.
"""
from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass
from fractions import Fraction

_PARAMETERS = {"gamma": ("mean", "shape"), "hiccup": ("p", "length"), "slow": ("fraction", "factor")}
_REQUIRED = {"gamma": ("mean",), "hiccup": ("p", "length"), "slow": ("fraction", "factor")}
_FIELDS = {("gamma", "mean"): "gamma_mean", ("gamma", "shape"): "gamma_shape", ("hiccup", "p"): "hiccup_p",
           ("hiccup", "length"): "hiccup_length", ("slow", "fraction"): "slow_fraction",
           ("slow", "factor"): "slow_factor"}


@dataclass(frozen=True)
class DelaySpec:
    """A parsed SPEC (see the module docstring); the defaults are no delay at all."""

    gamma_mean: float = 0.0
    gamma_shape: float = 4.0
    hiccup_p: float = 0.0
    hiccup_length: float = 0.0
    slow_fraction: float = 0.0
    slow_factor: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.gamma_mean >= 0, f"gamma mean={self.gamma_mean:g} must be >= 0 seconds"),
            (self.gamma_shape > 0, f"gamma shape={self.gamma_shape:g} must be > 0"),
            (0 <= self.hiccup_p <= 1, f"hiccup p={self.hiccup_p:g} must be a probability in [0, 1]"),
            (self.hiccup_length >= 0, f"hiccup length={self.hiccup_length:g} must be >= 0 seconds"),
            (0 <= self.slow_fraction <= 1, f"slow fraction={self.slow_fraction:g} must be in [0, 1]"),
            (self.slow_factor > 0, f"slow factor={self.slow_factor:g} must be > 0"),
            (self.seed >= 0, f"seed={self.seed} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def parse(cls, text: str) -> DelaySpec:
        """The spec ``text`` describes; a :class:`ValueError` quotes the part that is wrong and why."""
        values: dict[str, float | int] = {}
        seen: set[str] = set()
        if text.strip().lower() in ("", "none"):
            return cls()
        for part in (p.strip() for p in text.split(";")):
            if not part:
                continue
            name, colon, rest = part.partition(":")
            name = name.strip()
            if name.partition("=")[0].strip() == "seed":
                name, rest = "seed", name.partition("=")[2]
            if name in seen:
                raise ValueError(f"{part!r}: {name} is given twice")
            seen.add(name)
            if name == "seed":
                if colon:
                    raise ValueError(f"{part!r}: the seed is written seed=N")
                values["seed"] = _number(part, "seed", rest, int)
            elif name in _PARAMETERS:
                values.update(_component(part, name, rest))
            else:
                raise ValueError(f"{part!r}: unknown part {name!r}; a SPEC is 'none' or ';'-separated "
                                 "gamma:mean=S[,shape=K], hiccup:p=P,length=S, slow:fraction=F,factor=X, seed=N")
        return cls(**values)

    def __str__(self) -> str:
        """The canonical SPEC, parsed back to this spec (``gapaware worker --procs`` passes it on)."""
        default, parts = DelaySpec(), []
        for name, keys in _PARAMETERS.items():
            fields = [_FIELDS[name, key] for key in keys]
            if any(getattr(self, f) != getattr(default, f) for f in fields):
                parts.append(f"{name}:" + ",".join(f"{key}={getattr(self, f)!r}" for key, f in zip(keys, fields)))
        if parts or self.seed:
            parts.append(f"seed={self.seed}")
        return ";".join(parts) or "none"

    def is_slow(self, rank: int) -> bool:
        """Whether rank ``rank`` is one of the persistently slow workers."""
        fraction = Fraction(self.slow_fraction).limit_denominator(1_000_000)
        return math.floor((rank + 1) * fraction) > math.floor(rank * fraction)

    def sampler(self, rank: int) -> DelaySampler:
        return DelaySampler(self, rank)


class DelaySampler:
    """Rank ``rank``'s sequence of delays under ``spec``: the same in every process and system."""

    def __init__(self, spec: DelaySpec, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.factor = spec.slow_factor if spec.is_slow(rank) else 1.0
        # A string seed is hashed with SHA-512 by random.Random: deterministic across processes.
        self._rng = random.Random(f"gapaware-delay/{spec.seed}/{rank}")

    def next(self) -> float:
        """Seconds to wait after the next step."""
        spec, seconds = self.spec, 0.0
        if spec.gamma_mean > 0:
            seconds = self.factor * self._rng.gammavariate(spec.gamma_shape, spec.gamma_mean / spec.gamma_shape)
        if spec.hiccup_p > 0 and self._rng.random() < spec.hiccup_p:
            seconds += spec.hiccup_length
        return seconds

    def wait(self, stop: threading.Event) -> bool:
        """Waits out the next delay, or until ``stop`` is set (a SIGTERM ends a worker promptly);
        returns whether ``stop`` is set."""
        seconds = self.next()
        return stop.wait(seconds) if seconds > 0 else stop.is_set()


def _component(part: str, name: str, rest: str) -> dict[str, float]:
    values = {}
    for item in (i.strip() for i in rest.split(",")):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals:
            raise ValueError(f"{part!r}: {item!r} is not KEY=VALUE")
        if key not in _PARAMETERS[name]:
            raise ValueError(f"{part!r}: unknown key {key!r} ({name} takes {', '.join(_PARAMETERS[name])})")
        field = _FIELDS[name, key]
        if field in values:
            raise ValueError(f"{part!r}: {key} is given twice")
        values[field] = _number(part, key, value, float)
    missing = [key for key in _REQUIRED[name] if _FIELDS[name, key] not in values]
    if missing:
        raise ValueError(f"{part!r}: {name} needs {', '.join(f'{key}=...' for key in missing)}")
    return values


def _number(part: str, key: str, value: str, kind: type) -> float | int:
    value = value.strip()
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{part!r}: {key}={value!r} is not a {'whole ' if kind is int else ''}number") from None
    if not math.isfinite(number):
        raise ValueError(f"{part!r}: {key}={value} is not finite")
    return number
