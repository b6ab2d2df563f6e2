"""The README's CLI reference is what the CLI prints today, and its prose names what the registry holds."""
import re
from pathlib import Path

from gapaware import cli_reference
from gapaware.common.registry import DEFAULTS, POLICY_NAMES, TASK_NAMES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cli_reference_is_current():
    text = README.read_text()
    assert cli_reference.replace_block(text, cli_reference.render()) == text, (
        "README.md's CLI reference is out of date: run `make docs`"
    )


def test_readme_opens_with_the_two_commands():
    first_screen = "\n".join(README.read_text().splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_describes_every_registry_policy_and_task():
    text = README.read_text()
    policies = text.partition("## Staleness policies")[2].partition("\n## ")[0]
    rows = re.findall(r"^\| `([a-z-]+)`( \(default\))? \|", policies, flags=re.MULTILINE)
    assert tuple(name for name, _ in rows) == POLICY_NAMES
    assert [name for name, default in rows if default] == [DEFAULTS.policy]
    tasks = text.partition("Built-in tasks:")[2].partition("\n\n")[0]
    assert re.findall(r"`([a-z0-9][a-z0-9-]*)`", tasks) == list(TASK_NAMES)  # not the flags it names
