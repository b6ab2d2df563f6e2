"""Renders every command's ``--help`` into the README, so the flag reference cannot drift.

``python -m gapaware.cli_reference README.md`` rewrites the block between the markers;
a test fails when the README's block differs from what the CLI prints today.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from gapaware.cli import main

START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"


def render() -> str:
    parts = []
    # The group's context settings (help option names, width) apply as when the CLI runs.
    ctx = click.Context(main, info_name="gapaware", terminal_width=100, **main.context_settings)
    for name in sorted(main.list_commands(ctx)):
        command = main.get_command(ctx, name)
        sub = click.Context(command, info_name=name, parent=ctx, terminal_width=100)
        parts.append(f"### `gapaware {name}`\n\n```text\n{command.get_help(sub)}\n```\n")
    return "\n".join(parts)


def replace_block(text: str, block: str, start: str = START, end: str = END) -> str:
    """``text`` with what stands between the markers ``start`` and ``end`` replaced by ``block``."""
    head, found, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not found or not found_end:
        raise ValueError(f"the file has no {start} ... {end} block")
    return f"{head}{start}\n{block}{end}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(replace_block(path.read_text(), render()))
