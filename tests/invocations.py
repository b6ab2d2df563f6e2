"""Parse a ``gapaware`` command line the way the CLI would, without running it."""
from __future__ import annotations

import os
from unittest import mock

import click

from gapaware.cli import ENVVAR_PREFIX, main


def parse_invocation(args: list[str], env: dict[str, str] | None = None) -> tuple[str, dict]:
    """``(command, params)`` that ``gapaware ARGS`` would run with under exactly ``env``'s
    ``GAPAWARE_*`` variables; a bad flag or value raises :class:`click.UsageError`."""
    if not args or args[0] not in main.commands:
        raise click.UsageError(f"not a gapaware command: {args[:1]} (choose from {', '.join(sorted(main.commands))})")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENVVAR_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True):
        # The group's context settings, as when the CLI runs: click caches each command's help option
        # (-h, --help) from the first context it is made in, and the README's reference shows it.
        parent = click.Context(main, info_name="gapaware", **main.context_settings)
        command = main.commands[args[0]]
        return args[0], command.make_context(args[0], list(args[1:]), parent=parent, resilient_parsing=False).params


def envvars_of(command: str) -> set[str]:
    return {p.envvar for p in main.commands[command].params if isinstance(p, click.Option) and p.envvar}
