"""``gapaware`` command lines built from settings: the one place that turns values back into flags."""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping

from gapaware.common.config import RunConfig


def gapaware_command(*args: str) -> list[str]:
    """``gapaware ARGS`` run by this Python, whatever is on ``PATH``."""
    return [sys.executable, "-m", "gapaware", *args]


def flags(options: Mapping[str, object]) -> list[str]:
    """The flags that give each option its value, named as in Python or as on the command line
    (``max_updates`` and ``max-updates`` are ``--max-updates``): a bool is ``--name`` or ``--no-name``,
    a tuple or list its items joined by commas, and None leaves the option out."""
    words = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):
            words += [flag, ",".join(map(str, value))]
        else:
            words += [flag, str(value)]
    return words


def config_flags(config: RunConfig) -> list[str]:
    """The ``gapaware server`` (and ``train``) flags that reproduce ``config``; ``max_updates`` and
    ``epochs`` only where set (not 0)."""
    values = dataclasses.asdict(config)
    repeated = group_flags(values)
    return flags({**values, "max_updates": config.max_updates or None, "epochs": config.epochs or None}) + repeated


def group_flags(values: dict) -> list[str]:
    """Pops the repeatable parameter-group settings out of ``values`` (``no_weight_decay``, ``lr_scale``)
    and returns their flags, one flag a pattern."""
    repeated = [("--no-weight-decay", pattern) for pattern in values.pop("no_weight_decay")]
    repeated += [("--lr-scale", f"{pattern}={factor!r}") for pattern, factor in values.pop("lr_scale")]
    return [word for pair in repeated for word in pair]
