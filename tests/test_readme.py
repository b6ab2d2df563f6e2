"""The README's CLI reference is what the CLI prints today."""
from pathlib import Path

from gapaware import cli_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cli_reference_is_current():
    text = README.read_text()
    assert cli_reference.replace_block(text, cli_reference.render()) == text, (
        "README.md's CLI reference is out of date: run `make docs`"
    )


def test_readme_opens_with_the_two_commands():
    first_screen = "\n".join(README.read_text().splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
