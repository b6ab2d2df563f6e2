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
    # The group's context settings (``-h`` as well as ``--help``) apply, as on the command line: click
    # caches each command's help option, so rendering without them would depend on what ran before.
    ctx = click.Context(main, info_name="gapaware", terminal_width=100, max_content_width=100,
                        help_option_names=main.context_settings["help_option_names"])
    for name in sorted(main.list_commands(ctx)):
        command = main.get_command(ctx, name)
        sub = click.Context(command, info_name=f"gapaware {name}", parent=ctx, terminal_width=100,
                            max_content_width=100)
        parts.append(f"### `gapaware {name}`\n\n```text\n{command.get_help(sub)}\n```\n")
    return "\n".join(parts)


def replace_block(text: str, block: str) -> str:
    head, found, rest = text.partition(START)
    _, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise ValueError(f"the file has no {START} ... {END} block")
    return f"{head}{START}\n{block}{END}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(replace_block(path.read_text(), render()))
